-- recon_end.lua: the last step of a reconciler check: stops the creation log and
-- drops it.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:rlog
--
-- Reply: 1 when the log overflowed or its time ran out (the check is incomplete), else 0.
local meta, log = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'rlog_until', 'rlog_over')
local incomplete = (m[2] or not m[1] or now_ms() >= tonumber(m[1])) and 1 or 0
redis.call('HDEL', meta, 'rlog_until', 'rlog_over')
redis.call('UNLINK', log)
return incomplete
