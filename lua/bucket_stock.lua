-- bucket_stock.lua: what one bucket of a split SKU can give (src/buckets.rs), read when
-- a reserve's home bucket cannot serve its quantity: holds past their deadline are
-- expired first (bounded, as the reserve script reclaims them), so stock that should
-- be back is seen at once, not a sweep later.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{bucket}:transfers
-- ARGV[1] most due holds to expire first
--
-- Reply: {available (0 when the bucket has no state), transfers not finished, moves: the
--         transfers that took from or gave to it so far (meta `moves`)}
--
-- Invariant: the expiries are release()s: each hold's units come back exactly once.
local K = sale_keys()
if redis.call('EXISTS', K.meta) == 0 then
  return { 0, redis.call('HLEN', KEYS[10]), 0 }
end
expire_due(K, now_ms(), tonumber(ARGV[1]))
local m = redis.call('HMGET', K.meta, 'available', 'moves')
return { tonumber(m[1] or '0'), redis.call('HLEN', KEYS[10]), tonumber(m[2] or '0') }
