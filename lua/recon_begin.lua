-- recon_begin.lua: the first step of a reconciler check, at one instant T. Reads the
-- counters and terms, and from T on has every new hold logged (lib.lua log_creation),
-- so that the rest of the check can read the holds, the usage and the outbox in short
-- slices (recon_holds.lua, recon_used.lua, XRANGE, LRANGE) while sales go on, and still
-- tell exactly what held at T. O(1) but for dropping a dead check's log.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:deadlines   KEYS[3] fg:{sku}:outbox
-- KEYS[4] fg:{sku}:rlog
-- ARGV[1] ms past its deadline after which a still counted hold is a ghost
-- ARGV[2] the claim's lease, ms: the check renews it as it reads (recon_renew.lua); a
--         check that lets it run out is incomplete
-- ARGV[3] this check's id: one check of a SKU at a time (the log is the SKU's)
--
-- Reply: {'missing'} when the SKU has no state in Redis,
--        {'busy', ms left} while another check of the SKU runs (retry later), else
--   {'ok', T (ms), stock_total, available, held, sold, overdue holds, ghost holds,
--    outbox position at T (the id of its last entry, '0-0' when empty),
--    per_user_limit, hold_ms, starts_at, ends_at, paused ('1' or '0')}
--
-- Invariant: every hold created after T is in the log until recon_end.lua (or the
-- log overflowed, which `rlog_over` says); every hold that ended after T is an outbox
-- entry after the position at T, not trimmed while the check holds the SKU's MySQL row
-- lock (the flush takes it before it writes, see db::apply_events).
local meta, deadlines, outbox, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local m = redis.call('HMGET', meta, 'stock_total', 'available', 'held', 'sold', 'per_user_limit',
  'hold_ms', 'starts_at', 'ends_at', 'paused')
if not m[1] then
  return { 'missing' }
end
local now = now_ms()
local running = redis.call('HMGET', meta, 'rlog_until', 'rlog_owner')
if running[1] and now < tonumber(running[1]) and running[2] ~= ARGV[3] then
  return { 'busy', tonumber(running[1]) - now }
end
local overdue = redis.call('ZCOUNT', deadlines, '-inf', now)
local ghosts = redis.call('ZCOUNT', deadlines, '-inf', now - tonumber(ARGV[1]))
local last = redis.call('XREVRANGE', outbox, '+', '-', 'COUNT', 1)
local position = (#last > 0) and last[1][1] or '0-0'
redis.call('UNLINK', log)
redis.call('HSET', meta, 'rlog_until', string.format('%d', now + tonumber(ARGV[2])),
  'rlog_owner', ARGV[3])
redis.call('HDEL', meta, 'rlog_over')
return { 'ok', now, m[1], m[2], m[3], m[4], overdue, ghosts, position, m[5], m[6], m[7], m[8],
  m[9] or '0' }
