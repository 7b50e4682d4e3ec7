-- repair.lua: correct a SKU's counters, terms and per-user usage by what the reconciler
-- found them off by at its check's instant T (reconcile.rs). Corrections, not values:
-- every script run since T moved Redis's counters exactly as it moved the truth, so
-- adding the difference found at T makes them right now, whatever was sold meanwhile.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:used
-- KEYS[3] fg:{sku}:q:admits   KEYS[4] fg:{sku}:q:state (the waiting room, queue.lua)
-- ARGV[1] stock_total (MySQL, the source of truth); '' keeps the sale's own (a bucket of
--         a split SKU: its share moves with transfers; the SKU-wide sum is checked apart)
-- ARGV[2] held correction (live holds at T - held at T)
-- ARGV[3] sold correction (>= 0: MySQL sold + unflushed confirmations at T - sold at T)
-- ARGV[4] per_user_limit  ARGV[5] hold_ms  ARGV[6] starts_at ms or ''  ARGV[7] ends_at ms or ''
-- ARGV[8] paused ('1' or '0')
-- ARGV[9] JSON {user: correction of used}, or '' for none
--
-- Reply: {'ok', stock_total, available, held, sold}
--        {'overcommitted', stock_total, available, held, sold}  held + sold > stock_total:
--            available is set to 0 so nothing more can be sold; operators must act
--        {'missing'}  no state in Redis (the caller reloads the SKU from MySQL)
--
-- Invariant restored: available + held + sold == stock_total, available >= 0 and a
-- waiting room's unused admissions <= available (the newest are revoked), with
-- held equal to the live holds and sold never below what MySQL has recorded;
-- the user's units = the user's live holds + purchases. MySQL wins for sales: sold only ever
-- moves up here, so no unit is sold twice.
local meta, used = KEYS[1], KEYS[2]
if redis.call('EXISTS', meta) == 0 then
  return { 'missing' }
end
local m = redis.call('HMGET', meta, 'held', 'sold')
local held = math.max(0, tonumber(m[1] or '0') + tonumber(ARGV[2]))
local sold = tonumber(m[2] or '0') + math.max(0, tonumber(ARGV[3]))
if ARGV[9] ~= '' then
  local K, now = { used = used }, now_ms()
  for user, correction in pairs(cjson.decode(ARGV[9])) do
    local u = load_usage(K, user)
    u.units = u.units + correction
    save_usage(K, u, now)
  end
end
local stock_total = tonumber(ARGV[1] ~= '' and ARGV[1] or redis.call('HGET', meta, 'stock_total'))
local available = stock_total - held - sold
local code = 'ok'
if available < 0 then
  -- Cannot hold: take stock_total up to what is committed rather than break the
  -- equation, and sell nothing more.
  code = 'overcommitted'
  available = 0
  stock_total = held + sold
end
redis.call('HSET', meta, 'stock_total', string.format('%d', stock_total),
  'available', string.format('%d', available), 'held', string.format('%d', held),
  'sold', string.format('%d', sold), 'per_user_limit', ARGV[4], 'hold_ms', ARGV[5],
  'starts_at', ARGV[6], 'ends_at', ARGV[7], 'paused', ARGV[8])
-- Less available than the waiting room's unused admissions: the newest are revoked, as
-- for an operator's stock cut (load_sku.lua); those still owed while the sale stands
-- still count too (lib.lua thaw_admissions).
local since = redis.call('HGET', KEYS[4], 'frozen_at') or string.format('%d', now_ms())
local over = redis.call('ZCOUNT', KEYS[3], '(' .. since, '+inf') - available
if over > 0 then
  redis.call('ZREM', KEYS[3], unpack(redis.call('ZRANGE', KEYS[3], -over, -1)))
end
-- MySQL's terms win, also over a retirement Redis made under older ones (the caller
-- puts the SKU back in the index): the tombstone and the usage records it kept are the
-- sale's again, with no expiry (else the buyers' units and claims would go mid-sale).
redis.call('HDEL', meta, 'retired')
redis.call('PERSIST', meta)
redis.call('PERSIST', used)
return { code, stock_total, available, held, sold }
