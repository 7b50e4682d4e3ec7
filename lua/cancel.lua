-- cancel.lua: the owner or the service gives a hold back.
--
-- KEYS[1..8] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog
-- KEYS[9] fg:{sku}:r:<rid>
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
local meta, used, deadlines, rkey = KEYS[1], KEYS[2], KEYS[3], KEYS[9]
local rid, caller = ARGV[1], ARGV[2]
local now = now_ms()

local r = redis.call('HMGET', rkey, 'status', 'expires_at', 'user')
local status = r[1]
if not status or (caller ~= '' and caller ~= r[3]) then
  return { 'not_found' }
end

local code = 'ok'
if is_live(status) and now >= tonumber(r[2]) then
  release(meta, used, deadlines, rkey, rid, 'expired', now)
elseif status == 'paying' and caller ~= '' then
  code = 'payment_in_progress'
elseif is_live(status) then
  release(meta, used, deadlines, rkey, rid, 'cancelled', now)
elseif status == 'confirmed' then
  code = 'already_confirmed'
else
  code = 'unchanged'
end
local reply = view(rkey, rid, now)
table.insert(reply, 1, code)
return reply
