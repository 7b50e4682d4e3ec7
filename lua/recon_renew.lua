-- recon_renew.lua: a reconciler check keeps its claim on the SKU's creation log. The
-- claim is a short lease the check renews as it reads (src/reconcile.rs CheckLease), so
-- a check that died, or a claim a Redis rollback brought back, keeps the SKU's other
-- checks waiting for one lease at most.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:rlog
-- ARGV[1] the check's id (recon_begin.lua)   ARGV[2] the lease, ms
--
-- Reply: 1 renewed; 0 the claim is not this check's any more, or it ran out (holds made
-- since went unlogged: recon_end.lua tells the check it is incomplete).
--
-- Invariant: a claim is renewed only while it holds, never revived, so every hold made
-- while a check owns the log is in the log (or the check learns it is incomplete).
local meta, log = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'rlog_until', 'rlog_owner')
local now = now_ms()
if m[2] ~= ARGV[1] or not m[1] or now >= tonumber(m[1]) then
  return 0
end
local until_ms = now + tonumber(ARGV[2])
if until_ms > tonumber(m[1]) then
  redis.call('HSET', meta, 'rlog_until', string.format('%d', until_ms))
  -- The log outlives its claim by a minute (lib.lua log_creation), renewed with it.
  if redis.call('EXISTS', log) == 1 then
    redis.call('PEXPIREAT', log, until_ms + 60000)
  end
end
return 1
