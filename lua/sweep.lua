-- sweep.lua: return the stock of holds whose deadline has passed, in a bounded batch.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:used   KEYS[3] fg:{sku}:deadlines
-- ARGV[1] most holds to expire (or stale index entries to drop) in this call
--
-- Reply: {expired_count, holds_still_due, available (nil when the SKU has no state),
--         index entries looked at (expired + stale ones dropped)}
--
-- Invariant: each expired hold returns its units exactly once (see release()), so any
-- number of sweepers and the reserve script's reclaim may run at the same time.
local meta, used, deadlines = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()
local expired, examined = expire_due(meta, used, deadlines, now, tonumber(ARGV[1]))
return { expired, redis.call('ZCOUNT', deadlines, '-inf', now),
  redis.call('HGET', meta, 'available') or false, examined }
