-- transfer_done.lua: the last steps of a transfer (src/buckets.rs) on one bucket. On the
-- donor, once the receiver has the units, `out:<id>` goes; then on the receiver (never
-- before: while `out:<id>` exists the give may be repeated, and `in:<id>` makes it count
-- once) `in:<id>` is marked done with the receiver's Redis time, and stays until no give
-- of the id can be taken any more (lib.lua give_units, open_transfers).
--
-- KEYS[1] fg:{bucket}:transfers   ARGV[1] 'out:<id>' or 'in:<id>'
--
-- Reply: 1 when the record was there (and not done yet), else 0.
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then
  return 0
end
if string.sub(ARGV[1], 1, 3) == 'out' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
if string.match(record, '^%d+ %d+ %S+ %d+$') then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], record .. ' ' .. ms(now_ms()))
return 1
