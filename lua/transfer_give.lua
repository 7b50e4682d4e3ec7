-- transfer_give.lua: the second step of a transfer (src/buckets.rs) on its own, as the
-- worker's finisher runs it for a transfer cut short (lib.lua give_units);
-- lua/reserve_moved.lua is the same step with the reserves that asked for the units.
--
-- KEYS[1] fg:{receiver}:meta   KEYS[2] fg:{receiver}:transfers   KEYS[3] fg:{receiver}:outbox
-- ARGV[1] transfer id   ARGV[2] units (what transfer_take.lua took)   ARGV[3] the donor's tag
-- ARGV[4] the donor's Redis time (ms) when the giver read the transfer ('' for now)
-- ARGV[5] the give window (ms)
--
-- Replies: 'given' (now), 'already' (given before: nothing done), 'late' (read more
-- than the window ago: nothing done), 'missing' (the receiver has no state: nothing
-- done; the units stay in transit)
--
-- Invariant: available + held + sold == stock_total in the receiver (both grow by the
-- units); `in:<id>` makes a repeated give (a retry, several finishers at once, however
-- late) count once (see give_units).
-- Units given to a bucket that was out of stock bring it back (lib.lua announce_stock).
local given = give_units(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4],
  tonumber(ARGV[5]))
if given == 'given' then
  announce_stock({ meta = KEYS[1], outbox = KEYS[3], prefix = sku_prefix(KEYS[1]) }, now_ms())
end
return given
