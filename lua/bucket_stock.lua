-- bucket_stock.lua: what one bucket of a split SKU can give (src/buckets.rs), read when
-- a reserve's home bucket cannot serve its quantity: holds past their deadline are
-- expired first (bounded, as the reserve script reclaims them), so stock that should
-- be back is seen at once, not a sweep later.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{bucket}:transfers
-- ARGV[1] most due holds to expire first   ARGV[2] the give window (ms, lib.lua give_units)
--
-- Reply: {available (0 when the bucket has no state), transfers not finished, moves: the
--         transfers that took from or gave to it so far (meta `moves`)}
--
-- Invariant: the expiries are release()s: each hold's units come back exactly once.
local K = sale_keys()
local now, window = now_ms(), tonumber(ARGV[2])
if redis.call('EXISTS', K.meta) == 0 then
  return { 0, open_transfers(KEYS[10], now, window), 0 }
end
expire_due(K, now, tonumber(ARGV[1]))
local m = redis.call('HMGET', K.meta, 'available', 'moves')
return { tonumber(m[1] or '0'), open_transfers(KEYS[10], now, window), tonumber(m[2] or '0') }
