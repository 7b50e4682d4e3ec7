-- snapshot.lua: one consistent read of a SKU for the reconciler. Writes nothing.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:deadlines   KEYS[3] fg:{sku}:outbox
-- ARGV[1] most live holds / outbox entries to inspect (bounds the time Redis is busy)
--
-- Reply: {'missing'} when the SKU has no state in Redis, else
--   {'ok', now_ms, stock_total, available, held, sold,
--    live_held (sum over live holds, -1 if too many to count), overdue (live holds past deadline),
--    outbox_complete (1/0), rid1, quantity1, rid2, quantity2, ...  (confirmed events in the outbox)}
local meta, deadlines, outbox = KEYS[1], KEYS[2], KEYS[3]
local cap = tonumber(ARGV[1])
local m = redis.call('HMGET', meta, 'stock_total', 'available', 'held', 'sold')
if not m[1] then
  return { 'missing' }
end
local now = now_ms()
local prefix = sku_prefix(meta)

local live_held = -1
if redis.call('ZCARD', deadlines) <= cap then
  live_held = 0
  for _, rid in ipairs(redis.call('ZRANGE', deadlines, 0, -1)) do
    local r = redis.call('HMGET', prefix .. 'r:' .. rid, 'status', 'quantity')
    if is_live(r[1]) then
      live_held = live_held + tonumber(r[2])
    end
  end
end
local overdue = redis.call('ZCOUNT', deadlines, '-inf', now)

local reply = { 'ok', now, m[1], m[2], m[3], m[4], live_held, overdue, 1 }
local entries = redis.call('XRANGE', outbox, '-', '+', 'COUNT', cap + 1)
if #entries > cap then
  reply[9] = 0
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
