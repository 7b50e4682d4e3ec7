-- snapshot.lua: one consistent read of a SKU for the reconciler. Writes nothing.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:deadlines   KEYS[3] fg:{sku}:outbox
-- ARGV[1] most live holds / outbox entries to inspect (bounds the time Redis is busy)
-- ARGV[2] ms past its deadline after which a still counted hold is a ghost
--
-- Reply: {'missing'} when the SKU has no state in Redis, else
--   {'ok', now_ms, stock_total, available, held, sold,
--    live_held (sum over live holds, -1 if too many to count),
--    overdue (holds in the deadline index past their deadline),
--    ghosts (holds in the deadline index more than ARGV[2] ms past it),
--    outbox_complete (1/0),
--    rid1, quantity1, rid2, quantity2, ...  (confirmed events in the outbox)}
--
-- Everything here is read at one instant (the reply's now_ms, Redis clock): the
-- counters, the live holds and exactly the confirmations whose events are still in
-- the outbox. Every confirmation not in that list was either made later (its `at` is
-- >= now_ms) or trimmed from the outbox before, which happens only after MySQL
-- committed it; the reconciler's comparison with MySQL rests on that.
local meta, deadlines, outbox = KEYS[1], KEYS[2], KEYS[3]
local cap = tonumber(ARGV[1])
local ghost_after = tonumber(ARGV[2])
local m = redis.call('HMGET', meta, 'stock_total', 'available', 'held', 'sold')
if not m[1] then
  return { 'missing' }
end
local now = now_ms()

local live_held = -1
if redis.call('ZCARD', deadlines) <= cap then
  live_held = count_live_held(meta, deadlines, false)
end
local overdue = redis.call('ZCOUNT', deadlines, '-inf', now)
local ghosts = redis.call('ZCOUNT', deadlines, '-inf', now - ghost_after)

local reply = { 'ok', now, m[1], m[2], m[3], m[4], live_held, overdue, ghosts, 1 }
local entries = redis.call('XRANGE', outbox, '-', '+', 'COUNT', cap + 1)
if #entries > cap then
  reply[10] = 0
else
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local event = {}
    for i = 1, #fields, 2 do
      event[fields[i]] = fields[i + 1]
    end
    if event['type'] == 'confirmed' then
      table.insert(reply, event['reservation_id'])
      table.insert(reply, event['quantity'])
    end
  end
end
return reply
