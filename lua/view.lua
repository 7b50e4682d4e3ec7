-- view.lua: read one reservation as callers see it (a live hold past its deadline
-- reads as expired). Writes nothing.
--
-- KEYS[1] fg:{sku}:holds   KEYS[2] fg:{sku}:r:<rid> (layout 1's reservation hash)
-- ARGV[1] rid
--
-- Replies: {'ok', rid, user, quantity, status, expires_at, created_at, payment_ref}
--          {'not_found'}
local holds = KEYS[1]
local K = { holds = holds, prefix = string.sub(holds, 1, #holds - 5) }
local h = load_hold(K, ARGV[1])
if h == nil then
  return redis.error_reply(MOVING_REPLY)
elseif not h then
  return { 'not_found' }
end
local reply = view(K, h, now_ms())
table.insert(reply, 1, 'ok')
return reply
