-- repair.lua: rebuild a SKU's counters, terms and per-user usage from the truth the
-- reconciler found (MySQL for the definition and the sales).
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:used   KEYS[3] fg:{sku}:deadlines
-- ARGV[1] stock_total (MySQL, the source of truth)
-- ARGV[2] sold floor: MySQL sold + confirmed events not yet flushed
-- ARGV[3] most due holds to expire first
-- ARGV[4] most live holds to recount; above that `held` and `used` are kept as they
--         are (a recount would keep Redis busy too long)
-- ARGV[5] per_user_limit  ARGV[6] hold_ms  ARGV[7] starts_at ms or ''  ARGV[8] ends_at ms or ''
-- ARGV[9] JSON {user: units sold} (MySQL sales + unflushed confirmations), or '' to
--         leave `used` alone
--
-- Reply: {'ok', stock_total, available, held, sold}
--        {'overcommitted', stock_total, available, held, sold}  held + sold > stock_total:
--            available is set to 0 so nothing more can be sold; operators must act
--        {'missing'}  no state in Redis (the caller reloads the SKU from MySQL)
--
-- Invariant restored: available + held + sold == stock_total, available >= 0, with
-- held recounted from the live holds and sold never below what MySQL has recorded;
-- used[user] = the user's live holds + sales, and the live-hold index rebuilt.
-- MySQL wins for sales: sold only ever moves up here, so no unit is sold twice.
local meta, used, deadlines = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', meta) == 0 then
  return { 'missing' }
end
local now = now_ms()
expire_due(meta, used, deadlines, now, tonumber(ARGV[3]))

local held = tonumber(redis.call('HGET', meta, 'held') or '0')
if redis.call('ZCARD', deadlines) <= tonumber(ARGV[4]) then
  local prefix = sku_prefix(meta)
  local per_user, holds_of = {}, {}
  held = 0
  for _, rid in ipairs(redis.call('ZRANGE', deadlines, 0, -1)) do
    local r = redis.call('HMGET', prefix .. 'r:' .. rid, 'status', 'quantity', 'user')
    if is_live(r[1]) then
      held = held + tonumber(r[2])
      per_user[r[3]] = (per_user[r[3]] or 0) + tonumber(r[2])
      holds_of[r[3]] = (holds_of[r[3]] and (holds_of[r[3]] .. ' ') or '') .. rid
    else
      redis.call('ZREM', deadlines, rid)
    end
  end
  if ARGV[9] ~= '' then
    for user, quantity in pairs(cjson.decode(ARGV[9])) do
      per_user[user] = (per_user[user] or 0) + tonumber(quantity)
    end
    redis.call('DEL', used, prefix .. 'uholds')
    for user, quantity in pairs(per_user) do
      if quantity > 0 then
        redis.call('HSET', used, user, string.format('%d', quantity))
      end
    end
    for user, rids in pairs(holds_of) do
      redis.call('HSET', prefix .. 'uholds', user, rids)
    end
  end
end
local stock_total = tonumber(ARGV[1])
local sold = math.max(tonumber(redis.call('HGET', meta, 'sold') or '0'), tonumber(ARGV[2]))
local available = stock_total - held - sold
local code = 'ok'
if available < 0 then
  -- Cannot hold: take stock_total up to what is committed rather than break the
  -- equation, and sell nothing more.
  code = 'overcommitted'
  available = 0
  stock_total = held + sold
end
redis.call('HSET', meta, 'stock_total', stock_total, 'available', available, 'held', held,
  'sold', sold, 'per_user_limit', ARGV[5], 'hold_ms', ARGV[6], 'starts_at', ARGV[7],
  'ends_at', ARGV[8])
return { code, stock_total, available, held, sold }
