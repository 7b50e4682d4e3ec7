-- transfer_take.lua: the first step of a transfer of stock between two buckets of a SKU
-- (src/buckets.rs): the donor gives up to `wanted` available units, recorded as in
-- transit.
--
-- KEYS[1] fg:{donor}:meta   KEYS[2] fg:{donor}:transfers
-- ARGV[1] transfer id   ARGV[2] units wanted (>= 1)   ARGV[3] the receiver's hash tag
--
-- Reply: {units taken (0: none available, nothing recorded), the donor's Redis time of
-- the take (ms)}; a repeated call with the same id answers what the first took (and
-- when) and takes nothing more.
--
-- Invariant: available + held + sold == stock_total in the donor, before and after
-- (both drop by what is taken); what is taken is in `out:<id>` until transfer_done.lua,
-- so that Σ stock_total over the buckets + Σ in transit == the SKU's stock at every
-- instant.
local meta, transfers, id = KEYS[1], KEYS[2], ARGV[1]
local recorded = redis.call('HGET', transfers, 'out:' .. id)
if recorded then
  local units, at = string.match(recorded, '^(%d+) (%d+)')
  return { tonumber(units), tonumber(at) }
end
local now = now_ms()
local m = redis.call('HMGET', meta, 'available', 'stock_total')
if not m[1] then
  return { 0, now }
end
local taken = math.min(tonumber(ARGV[2]), tonumber(m[1]))
if taken <= 0 then
  return { 0, now }
end
redis.call('HSET', meta, 'available', ms(tonumber(m[1]) - taken),
  'stock_total', ms(tonumber(m[2]) - taken))
redis.call('HSET', transfers, 'out:' .. id, ms(taken) .. ' ' .. ms(now) .. ' ' .. ARGV[3])
-- Counts this bucket's stock moves: a reader of several buckets (lua/bucket_stock.lua)
-- that sees it unchanged twice knows no transfer touched the bucket in between.
redis.call('HINCRBY', meta, 'moves', 1)
-- Until transfer_done.lua drops `out:<id>`, the units are the SKU's still: the donor is
-- not announced out of stock meanwhile (lib.lua announce_stock).
redis.call('HINCRBY', meta, 'giving', 1)
return { taken, now }
