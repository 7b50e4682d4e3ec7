-- recon_holds.lua: one slice of a reconciler check's walk over the live holds.
-- Writes nothing.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:deadlines   KEYS[3] fg:{sku}:holds
-- ARGV[1] ZSCAN cursor ('0' to start)   ARGV[2] ZSCAN COUNT (bounds the call's time)
--
-- Reply: {next cursor ('0' when done), then rid, quantity, user per live hold seen}
--
-- ZSCAN returns every hold in the index for the whole walk at least once (duplicates
-- are the caller's to drop); a hold that came or went during the walk is in the
-- creation log or in the outbox (recon_begin.lua), which is how the caller places it.
local K = { meta = KEYS[1], deadlines = KEYS[2], holds = KEYS[3], prefix = sku_prefix(KEYS[1]) }
local scan = redis.call('ZSCAN', K.deadlines, ARGV[1], 'COUNT', ARGV[2])
local reply = { scan[1] }
local items = scan[2]
local function add(h)
  if h and is_live(h.status) then
    reply[#reply + 1] = full_rid(K, h)
    reply[#reply + 1] = h.quantity
    reply[#reply + 1] = h.user
  end
end
-- The records of the page in one HMGET (most of a slice's time is per-hold work: only
-- status, quantity and user are read here).
local tails = {}
for i = 1, #items, 2 do
  tails[#tails + 1] = items[i]
end
local records = #tails > 0 and redis.call('HMGET', K.holds, unpack(tails)) or {}
for i, member in ipairs(tails) do
  local raw = records[i]
  if raw then
    local status, quantity, user = string.match(raw, '^(%a+) (%d+) %S+ %S+ %S+ %S+ 0 (.*)$')
    if not status then
      add(parse_hold(raw, member)) -- a record with compensations
    elseif is_live(status) then
      add({ tail = member, status = status, quantity = quantity, user = user })
    end
  elseif tail_of(member) ~= member then
    local h = load_hold(K, member) -- layout 1
    if h == nil then
      -- A cluster slot migrating: this slice cannot be read whole now (redis-rs retries).
      return redis.error_reply(MOVING_REPLY)
    end
    add(h)
  end
end
return reply
