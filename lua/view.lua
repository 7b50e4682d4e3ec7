-- view.lua: read one reservation as callers see it (a live hold past its deadline
-- reads as expired). Writes nothing.
--
-- KEYS[1] fg:{sku}:r:<rid>
-- ARGV[1] rid
--
-- Replies: {'ok', rid, user, quantity, status, expires_at, created_at, payment_ref}
--          {'not_found'}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return { 'not_found' }
end
local reply = view(KEYS[1], ARGV[1], now_ms())
table.insert(reply, 1, 'ok')
return reply
