-- confirm.lua: turn a live hold into a sale, or record the payment as a compensation.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{sku}:r:<rid> (layout 1's reservation hash)
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
-- event (which records the reservation and the sale in MySQL) are written in one step;
-- every refused payment yields exactly one compensation per (reservation, payment_ref),
-- however often it is retried.
local K = sale_keys()
local payment_ref, new_compensation_id = ARGV[3], ARGV[4]
local now = now_ms()

local h = load_hold(K, ARGV[1])
if h == nil then
  return redis.error_reply(MOVING_REPLY)
elseif not h then
  return { 'not_found' }
end
-- A retired SKU takes no more outbox events (nothing would flush them); its ended
-- reservations are all in MySQL.
local sale = redis.call('HMGET', K.meta, 'stock_total', 'retired')
if not sale[1] or sale[2] then
  return { 'not_found' }
end

local function answer(code, compensation_id)
  local reply = view(K, h, now)
  if compensation_id then
    table.insert(reply, 1, compensation_id)
  end
  table.insert(reply, 1, code)
  return reply
end

local function refused(code, reason)
  return answer(code, compensate(K, h, payment_ref, reason, new_compensation_id, now))
end

if h.status == 'confirmed' then
  if h.payment_ref == payment_ref then
    return answer('unchanged')
  end
  return refused('already_confirmed', 'duplicate_payment')
end
if is_live(h.status) and now >= tonumber(h.expires_at) then
  release(K, h, 'expired', now)
end
if h.status == 'expired' then
  return refused('reservation_expired', 'expired')
end
if h.status == 'cancelled' then
  return refused('reservation_cancelled', 'cancelled')
end

-- A live hold within its deadline: the sale. Its units stay in the user's usage (a
-- purchase counts toward the limit); its claim ends.
local quantity = tonumber(h.quantity)
h.status, h.payment_ref = 'confirmed', payment_ref
store_hold(K, h)
redis.call('HINCRBY', K.meta, 'held', -quantity)
redis.call('HINCRBY', K.meta, 'sold', quantity)
redis.call('ZREM', K.deadlines, h.tail)
local u = load_usage(K, h.user)
local key = end_claim(u, h.tail, now)
save_usage(K, u, now)
record_end(K, h, key, now)
return answer('confirmed')
