-- cancel.lua: the owner or the service gives a hold back.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{sku}:r:<rid> (layout 1's reservation hash)
-- ARGV[1] rid   ARGV[2] caller user id, or '' for the service
--
-- Replies (view = rid, user, quantity, status, expires_at, created_at, payment_ref):
--   {'ok', view...}             cancelled now (or expired now: its deadline had passed)
--   {'unchanged', view...}      already cancelled / expired (idempotent repeat)
--   {'already_confirmed', view...}
--   {'payment_in_progress', view...}   a user may not undercut a payment in flight
--   {'not_found'}                      missing, or another user's reservation
--
-- Invariant: the units of a hold return to available exactly once (see release()).
local K = sale_keys()
local caller = ARGV[2]
local now = now_ms()

local h = load_hold(K, ARGV[1])
if h == nil then
  return redis.error_reply(MOVING_REPLY)
end
if not h or (caller ~= '' and caller ~= h.user) then
  return { 'not_found' }
end

local code = 'ok'
if is_live(h.status) and now >= tonumber(h.expires_at) then
  release(K, h, 'expired', now)
elseif h.status == 'paying' and caller ~= '' then
  code = 'payment_in_progress'
elseif is_live(h.status) then
  release(K, h, 'cancelled', now)
elseif h.status == 'confirmed' then
  code = 'already_confirmed'
else
  code = 'unchanged'
end
local reply = view(K, h, now)
table.insert(reply, 1, code)
return reply
