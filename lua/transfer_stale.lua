-- transfer_stale.lua: what a finisher (src/store.rs finish_transfers) must finish on one
-- bucket, by this bucket's Redis clock alone: its `out:` records taken at least ARGV[1] ms
-- ago, and its `in:` records not marked done.
--
-- KEYS[1] fg:{bucket}:transfers   ARGV[1] age (ms) past which a transfer was cut short
-- ARGV[2] the give window (ms): receiver records marked done longer than twice it ago
--         go (lib.lua open_transfers)
--
-- Reply: { now (ms), then field, record for each: 'out:<id>', 'units at receiver' or
--          'in:<id>', 'units at donor' }
--
-- Invariant: drops only records no give can need any more (give_units); `now` is the
-- read time the finisher's gives carry.
local now = now_ms()
open_transfers(KEYS[1], now, tonumber(ARGV[2]))
local reply = { now }
local records = redis.call('HGETALL', KEYS[1])
for i = 1, #records, 2 do
  local field, record = records[i], records[i + 1]
  local at, done = string.match(record, '^%d+ (%d+) %S+ ?(%d*)$')
  local stale = string.sub(field, 1, 4) == 'out:' and tonumber(at) + tonumber(ARGV[1]) <= now
  if stale or (string.sub(field, 1, 3) == 'in:' and done == '') then
    reply[#reply + 1] = field
    reply[#reply + 1] = record
  end
end
return reply
