-- confirm.lua: turn a live hold into a sale, or record the payment as a compensation.
--
-- KEYS[1..8] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog
-- KEYS[9] fg:{sku}:r:<rid>
-- ARGV[1] rid   ARGV[2] sku   ARGV[3] payment_ref
-- ARGV[4] id for a new compensation (derived from rid and payment_ref: ids::compensation_id)
--
-- Replies (view = rid, user, quantity, status, expires_at, created_at, payment_ref):
--   {'confirmed', view...}                      the sale, now
--   {'unchanged', view...}                      confirmed before with this payment_ref
--   {'already_confirmed', compensation_id, view...}      confirmed with another payment_ref
--   {'reservation_expired', compensation_id, view...}    deadline passed (swept or not)
--   {'reservation_cancelled', compensation_id, view...}
--   {'not_found'}   no such reservation in Redis, or its SKU is retired (or has no state):
--                   the caller answers from MySQL, which records how it ended
--
-- Invariants: a reservation is confirmed at most once; the confirmation and its outbox
-- event (which records the reservation and the sale in MySQL) are written in one step; every refused payment yields exactly one
-- compensation per (reservation, payment_ref), however often it is retried.
local meta, used, deadlines, outbox, rkey = KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[9]
local rid, sku, payment_ref, new_compensation_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()

local r = redis.call('HMGET', rkey, 'status', 'expires_at', 'payment_ref', 'user', 'quantity',
  'created_at', 'keep_until')
local status = r[1]
if not status then
  return { 'not_found' }
end
-- A retired SKU takes no more outbox events (nothing would flush them); its ended
-- reservations are all in MySQL.
local sale = redis.call('HMGET', meta, 'stock_total', 'retired')
if not sale[1] or sale[2] then
  return { 'not_found' }
end

local function refused(code, reason)
  local compensation_id = compensate(outbox, rkey, rid, sku, payment_ref, reason, new_compensation_id, now)
  local reply = view(rkey, rid, now)
  table.insert(reply, 1, compensation_id)
  table.insert(reply, 1, code)
  return reply
end

if status == 'confirmed' then
  if r[3] == payment_ref then
    local reply = view(rkey, rid, now)
    table.insert(reply, 1, 'unchanged')
    return reply
  end
  return refused('already_confirmed', 'duplicate_payment')
end
if is_live(status) and now >= tonumber(r[2]) then
  release(meta, used, deadlines, rkey, rid, 'expired', now)
  status = 'expired'
end
if status == 'expired' then
  return refused('reservation_expired', 'expired')
end
if status == 'cancelled' then
  return refused('reservation_cancelled', 'cancelled')
end

-- A live hold within its deadline: the sale.
local quantity = tonumber(r[5])
redis.call('HSET', rkey, 'status', 'confirmed', 'payment_ref', payment_ref,
  'ended_at', string.format('%d', now))
redis.call('HINCRBY', meta, 'held', -quantity)
redis.call('HINCRBY', meta, 'sold', quantity)
redis.call('ZREM', deadlines, rid)
local prefix = sku_prefix(meta)
forget_user_hold(prefix, r[4], rid)
record_end(prefix, rid, { 'confirmed', r[4], r[5], r[6], r[2], payment_ref }, now)
keep_ended(rkey, r[7], now)
local reply = view(rkey, rid, now)
table.insert(reply, 1, 'confirmed')
return reply
