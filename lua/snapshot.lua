-- snapshot.lua: one consistent read of a SKU for the reconciler. Writes nothing.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:deadlines   KEYS[3] fg:{sku}:outbox
-- KEYS[4] fg:{sku}:used
-- ARGV[1] most live holds / outbox entries / users to inspect (bounds the time Redis is busy)
-- ARGV[2] ms past its deadline after which a still counted hold is a ghost
--
-- Reply: {'missing'} when the SKU has no state in Redis, else
--   {'ok', now_ms, stock_total, available, held, sold,
--    live_held (sum over live holds, -1 if too many to count),
--    overdue (holds in the deadline index past their deadline),
--    ghosts (holds in the deadline index more than ARGV[2] ms past it),
--    outbox_complete (1/0), confirms (n), live users (m, -1 when not counted),
--    used entries (k, -1 when too many),
--    then n x (rid, quantity, user)   confirmed events in the outbox
--    then m x (user, quantity)        units of the live holds per user
--    then k x (user, quantity)        the `used` hash, per-user counts of the limit}
--   plus per_user_limit, hold_ms, starts_at, ends_at at positions 14..17 (see below).
--
-- Everything here is read at one instant (the reply's now_ms, Redis clock): the
-- counters, the live holds and exactly the confirmations whose events are still in
-- the outbox. Every confirmation not in that list was either made later (its `at` is
-- >= now_ms) or trimmed from the outbox before, which happens only after MySQL
-- committed it; the reconciler's comparison with MySQL rests on that.
local meta, deadlines, outbox, used = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cap = tonumber(ARGV[1])
local ghost_after = tonumber(ARGV[2])
local m = redis.call('HMGET', meta, 'stock_total', 'available', 'held', 'sold', 'per_user_limit',
  'hold_ms', 'starts_at', 'ends_at')
if not m[1] then
  return { 'missing' }
end
local now = now_ms()

local live_held = -1
local live_users = nil
if redis.call('ZCARD', deadlines) <= cap then
  live_held = 0
  live_users = {}
  local prefix = sku_prefix(meta)
  for _, rid in ipairs(redis.call('ZRANGE', deadlines, 0, -1)) do
    local r = redis.call('HMGET', prefix .. 'r:' .. rid, 'status', 'quantity', 'user')
    if is_live(r[1]) then
      live_held = live_held + tonumber(r[2])
      live_users[r[3]] = (live_users[r[3]] or 0) + tonumber(r[2])
    end
  end
end
local overdue = redis.call('ZCOUNT', deadlines, '-inf', now)
local ghosts = redis.call('ZCOUNT', deadlines, '-inf', now - ghost_after)

local confirms = {}
local outbox_complete = 1
local entries = redis.call('XRANGE', outbox, '-', '+', 'COUNT', cap + 1)
if #entries > cap then
  outbox_complete = 0
else
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local event = {}
    for i = 1, #fields, 2 do
      event[fields[i]] = fields[i + 1]
    end
    if event['type'] == 'confirmed' then
      table.insert(confirms, { event['reservation_id'], event['quantity'], event['user_id'] })
    end
  end
end

local used_entries = nil
if redis.call('HLEN', used) <= cap then
  used_entries = redis.call('HGETALL', used)
end

local reply = { 'ok', now, m[1], m[2], m[3], m[4], live_held, overdue, ghosts, outbox_complete,
  #confirms, -1, -1, m[5], m[6], m[7], m[8] }
for _, c in ipairs(confirms) do
  table.insert(reply, c[1]); table.insert(reply, c[2]); table.insert(reply, c[3])
end
if live_users then
  local count = 0
  for user, quantity in pairs(live_users) do
    table.insert(reply, user); table.insert(reply, string.format('%d', quantity))
    count = count + 1
  end
  reply[12] = count
end
if used_entries then
  for _, v in ipairs(used_entries) do
    table.insert(reply, v)
  end
  reply[13] = #used_entries / 2
end
return reply
