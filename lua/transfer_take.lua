-- transfer_take.lua: the first step of a transfer of stock between two buckets of a SKU
-- (src/buckets.rs): the donor gives up to `wanted` available units, recorded as in
-- transit.
--
-- KEYS[1] fg:{donor}:meta   KEYS[2] fg:{donor}:transfers
-- ARGV[1] transfer id   ARGV[2] units wanted (>= 1)   ARGV[3] the receiver's hash tag
--
-- Reply: the units taken (0: none available, nothing recorded); a repeated call with
-- the same id answers what the first took and takes nothing more.
--
-- Invariant: available + held + sold == stock_total in the donor, before and after
-- (both drop by what is taken); what is taken is in `out:<id>` until transfer_done.lua,
-- so that Σ stock_total over the buckets + Σ in transit == the SKU's stock at every
-- instant.
local meta, transfers, id = KEYS[1], KEYS[2], ARGV[1]
local recorded = redis.call('HGET', transfers, 'out:' .. id)
if recorded then
  return tonumber(string.match(recorded, '^%d+'))
end
local m = redis.call('HMGET', meta, 'available', 'stock_total')
if not m[1] then
  return 0
end
local taken = math.min(tonumber(ARGV[2]), tonumber(m[1]))
if taken <= 0 then
  return 0
end
redis.call('HSET', meta, 'available', ms(tonumber(m[1]) - taken),
  'stock_total', ms(tonumber(m[2]) - taken))
redis.call('HSET', transfers, 'out:' .. id, ms(taken) .. ' ' .. ms(now_ms()) .. ' ' .. ARGV[3])
-- Counts this bucket's stock moves: a reader of several buckets (lua/bucket_stock.lua)
-- that sees it unchanged twice knows no transfer touched the bucket in between.
redis.call('HINCRBY', meta, 'moves', 1)
return taken
