-- payment_pending.lua: a payment has started; keep the hold for it a little longer, once.
--
-- KEYS[1..8] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog
-- KEYS[9] fg:{sku}:r:<rid>
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
local meta, used, deadlines, rkey = KEYS[1], KEYS[2], KEYS[3], KEYS[9]
local rid, payment_ref, grace_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()

local r = redis.call('HMGET', rkey, 'status', 'expires_at')
local status = r[1]
if not status then
  return { 'not_found' }
end

local code = 'ok'
if is_live(status) and now >= tonumber(r[2]) then
  release(meta, used, deadlines, rkey, rid, 'expired', now)
  code = 'reservation_expired'
elseif status == 'held' then
  local expires_at = math.max(tonumber(r[2]), now + grace_ms)
  redis.call('HSET', rkey, 'status', 'paying', 'expires_at', expires_at, 'payment_ref', payment_ref)
  redis.call('ZADD', deadlines, expires_at, rid)
elseif status == 'paying' then
  code = 'unchanged'
elseif status == 'expired' then
  code = 'reservation_expired'
elseif status == 'cancelled' then
  code = 'reservation_cancelled'
elseif status == 'confirmed' then
  code = 'already_confirmed'
end
local reply = view(rkey, rid, now)
table.insert(reply, 1, code)
return reply
