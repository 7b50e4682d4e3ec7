-- recon_end.lua: the last step of a reconciler check: stops the creation log and
-- drops it, if the check still owns it.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:rlog
-- ARGV[1] the check's id (recon_begin.lua)
--
-- Reply: 1 when the log overflowed, its time ran out or another check took it over
-- (the check is incomplete), else 0.
local meta, log = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'rlog_until', 'rlog_over', 'rlog_owner')
if m[3] ~= ARGV[1] then
  return 1
end
local incomplete = (m[2] or not m[1] or now_ms() >= tonumber(m[1])) and 1 or 0
redis.call('HDEL', meta, 'rlog_until', 'rlog_over', 'rlog_owner')
redis.call('UNLINK', log)
return incomplete
