-- trim_outbox.lua: drop outbox entries below what every group has acknowledged,
-- unless a reconciler check of the SKU is running.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:outbox
-- ARGV[1] MINID: entries below it are acknowledged by every group
--
-- Reply: entries dropped (0 while a check runs).
--
-- Invariant: while a check runs (meta `rlog_until`, recon_begin.lua) no entry is
-- trimmed: the check finds every hold that ended after its instant in the outbox.
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'rlog_until') or '0')
if now_ms() < until_ms then
  return 0
end
return redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[1])
