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
for i = 1, #items, 2 do
  local h = load_hold(K, items[i])
  if h == nil then
    -- A cluster slot migrating: this slice cannot be read whole now (redis-rs retries).
    return redis.error_reply(MOVING_REPLY)
  elseif h and is_live(h.status) then
    reply[#reply + 1] = full_rid(K, h)
    reply[#reply + 1] = h.quantity
    reply[#reply + 1] = h.user
  end
end
return reply
