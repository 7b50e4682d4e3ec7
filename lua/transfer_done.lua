-- transfer_done.lua: the last steps of a transfer (src/buckets.rs) on one bucket. On the
-- donor, once the receiver has the units, `out:<id>` goes; then on the receiver (never
-- before: while `out:<id>` exists the give may be repeated, and `in:<id>` makes it count
-- once) `in:<id>` is marked done with the receiver's Redis time, and stays until no give
-- of the id can be taken any more (lib.lua give_units, open_transfers).
--
-- KEYS[1] fg:{bucket}:transfers   KEYS[2] fg:{bucket}:meta   KEYS[3] fg:{bucket}:outbox
-- ARGV[1] 'out:<id>' or 'in:<id>'
--
-- Reply: 1 when the record was there (and not done yet), else 0.
--
-- A donor whose last units were in this transfer is out of stock once its `out:`
-- record goes: announced then (lib.lua announce_stock), not when the units left.
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then
  return 0
end
if string.sub(ARGV[1], 1, 3) == 'out' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'giving', -1)
    announce_stock({ meta = KEYS[2], outbox = KEYS[3], prefix = sku_prefix(KEYS[2]) },
      now_ms())
  end
  return 1
end
if string.match(record, '^%d+ %d+ %S+ %d+$') then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], record .. ' ' .. ms(now_ms()))
return 1
