-- sweep.lua: return the stock of holds whose deadline has passed, in a bounded batch;
-- retire the SKU once its sale is over and nothing of it is left to do in Redis.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{sku}:transfers (src/buckets.rs): a bucket with a transfer not finished
--          does not retire (its units in transit would be lost with it)
-- KEYS[11..14] the waiting room's q:line q:admits q:used q:state (queue.lua): they go
--          with the sale when it retires
-- ARGV[1] most holds to expire (or stale index entries to drop) in this call
-- ARGV[2] ms a retired SKU's meta stays as its tombstone
-- ARGV[3] the give window (ms, lib.lua give_units)
--
-- Reply: {expired_count, holds_still_due, available (false when the SKU has no state),
--         index entries looked at (expired + stale ones dropped), now_ms,
--         earliest deadline left (false when none), hold_ms (false when no state),
--         state, ends_at (false when none, or not on sale), buckets of the SKU,
--         held, sold (false when not on sale)}
--   state: 'open'    the sale can still take holds
--          'ended'   ends_at passed; holds, unflushed events or compensations remain
--          'retired' retired (now or earlier): only the tombstone meta and the usage
--                    records are left
--          'missing' no state at all
--
-- Retirement: once ends_at has passed no script creates a hold (the Redis clock decides
-- both), so a SKU with no live hold, an outbox the flush group has fully acknowledged
-- (MySQL has every event) and no unflushed compensation has nothing left in Redis that
-- MySQL lacks. Its keys go; meta stays as a tombstone (`retired` = when) for
-- ARGV[2] ms, so reserves answer `ended` and the SKU view answers without MySQL; the
-- admin PUT takes the tombstone back into a sale (load_sku.lua). The usage records stay
-- as long as the tombstone, and until the last claim's key lifetime ends (meta
-- `claims_until`) if later, so idempotency keys still replay (from MySQL's record) and
-- a PUT reopening the sale finds its buyers' units; layout-1 keys keep their own TTLs.
--
-- Invariant: each expired hold returns its units exactly once (see release()), so any
-- number of sweepers and the reserve script's reclaim may run at the same time.
local K = sale_keys()
local meta, deadlines, outbox = K.meta, K.deadlines, K.outbox
local now = now_ms()
local m = redis.call('HMGET', meta, 'hold_ms', 'ends_at', 'retired', 'available', 'rlog_until',
  'claims_until', 'buckets')
local buckets = tonumber(m[7] or '1')
if not m[1] then
  return { 0, 0, false, 0, now, false, false, 'missing', false, 1, false, false }
end
if m[3] then
  return { 0, 0, m[4] or false, 0, now, false, m[1], 'retired', false, buckets, false, false }
end

local expired, examined = expire_due(K, now, tonumber(ARGV[1]))
local still_due = redis.call('ZCOUNT', deadlines, '-inf', now)
local first = redis.call('ZRANGE', deadlines, 0, 0, 'WITHSCORES')
local counters = redis.call('HMGET', meta, 'available', 'held', 'sold')
local available = counters[1] or false

-- Whether the flush group has acknowledged every event the outbox ever took.
local function outbox_flushed()
  if redis.call('EXISTS', outbox) == 0 then
    return true
  end
  local last_id, length
  local info = redis.call('XINFO', 'STREAM', outbox)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last_id = info[i + 1]
    elseif info[i] == 'length' then
      length = info[i + 1]
    end
  end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', outbox)) do
    local g = {}
    for i = 1, #group, 2 do
      g[group[i]] = group[i + 1]
    end
    if g['name'] == 'flush' then
      return g['pending'] == 0 and g['last-delivered-id'] == last_id
    end
  end
  return length == 0
end

local state = 'open'
if m[2] ~= '' and now >= tonumber(m[2]) then
  state = 'ended'
  -- Not while a reconciler check reads the SKU in slices (recon_begin.lua).
  local checked = m[5] and now < tonumber(m[5])
  if #first == 0 and not checked and redis.call('HLEN', K.comps) == 0
      and open_transfers(KEYS[10], now, tonumber(ARGV[3])) == 0 and outbox_flushed() then
    redis.call('DEL', K.uholds, deadlines, outbox, K.comps, K.churn, K.holds)
    -- The waiting room ends with the sale (queue.lua).
    redis.call('DEL', KEYS[11], KEYS[12], KEYS[13], KEYS[14])
    -- The usage records stay with the tombstone, and longer while a claim's key
    -- replays: an admin PUT that looked at the sale live and reopens it after this
    -- retirement must still find its buyers' bought units.
    local claims_until = tonumber(m[6] or '0')
    redis.call('PEXPIREAT', K.used, ms(math.max(claims_until, now + tonumber(ARGV[2]))))
    redis.call('HSET', meta, 'retired', string.format('%d', now))
    redis.call('PEXPIRE', meta, ARGV[2])
    state = 'retired'
  end
end
return { expired, still_due, available, examined, now, first[2] or false, m[1], state,
  m[2] ~= '' and m[2] or false, buckets, counters[2] or false, counters[3] or false }
