-- transfer_give.lua: the second step of a transfer (src/buckets.rs): the receiver takes
-- the units the donor gave up, once per transfer id.
--
-- KEYS[1] fg:{receiver}:meta   KEYS[2] fg:{receiver}:transfers
-- ARGV[1] transfer id   ARGV[2] units (what transfer_take.lua took)   ARGV[3] the donor's tag
--
-- Replies: 'given' (now), 'already' (given before: nothing done), 'missing' (the
-- receiver has no state: nothing done; the units stay in transit)
--
-- Invariant: available + held + sold == stock_total in the receiver (both grow by the
-- units); `in:<id>` makes a repeated give (a retry, the worker finishing a transfer cut
-- short) count once. It goes only after the donor's `out:<id>` (transfer_done.lua).
local meta, transfers, id = KEYS[1], KEYS[2], ARGV[1]
if redis.call('HEXISTS', transfers, 'in:' .. id) == 1 then
  return 'already'
end
local m = redis.call('HMGET', meta, 'available', 'stock_total')
if not m[1] then
  return 'missing'
end
local units = tonumber(ARGV[2])
redis.call('HSET', meta, 'available', ms(tonumber(m[1]) + units),
  'stock_total', ms(tonumber(m[2]) + units))
redis.call('HSET', transfers, 'in:' .. id, ms(units) .. ' ' .. ms(now_ms()) .. ' ' .. ARGV[3])
redis.call('HINCRBY', meta, 'moves', 1) -- as in transfer_take.lua
return 'given'
