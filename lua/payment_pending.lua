-- payment_pending.lua: a payment has started; keep the hold for it a little longer, once.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{sku}:r:<rid> (layout 1's reservation hash)
-- ARGV[1] rid   ARGV[2] payment_ref   ARGV[3] payment grace (ms)
--
-- Replies (view = rid, user, quantity, status, expires_at, created_at, payment_ref):
--   {'ok', view...}          now paying, with expires_at = max(expires_at, now + grace)
--   {'unchanged', view...}   already paying (idempotent repeat: the deadline stays)
--   {'reservation_expired', view...} {'reservation_cancelled', view...}
--   {'already_confirmed', view...}   {'not_found'}
--
-- Invariant: the deadline moves at most once, and only for a live hold within it;
-- no refusal here creates a compensation (no money has arrived yet).
local K = sale_keys()
local payment_ref, grace_ms = ARGV[2], tonumber(ARGV[3])
local now = now_ms()

local h = load_hold(K, ARGV[1])
if h == nil then
  return redis.error_reply(MOVING_REPLY)
end
if not h then
  return { 'not_found' }
end

local code = 'ok'
if is_live(h.status) and now >= tonumber(h.expires_at) then
  release(K, h, 'expired', now)
  code = 'reservation_expired'
elseif h.status == 'held' then
  h.status, h.payment_ref = 'paying', payment_ref
  h.expires_at = ms(math.max(tonumber(h.expires_at), now + grace_ms))
  store_hold(K, h)
  redis.call('ZADD', K.deadlines, h.expires_at, h.tail)
elseif h.status == 'paying' then
  code = 'unchanged'
elseif h.status == 'expired' then
  code = 'reservation_expired'
elseif h.status == 'cancelled' then
  code = 'reservation_cancelled'
elseif h.status == 'confirmed' then
  code = 'already_confirmed'
end
local reply = view(K, h, now)
table.insert(reply, 1, code)
return reply
