-- transfer_done.lua: the last steps of a transfer (src/buckets.rs): drops a transfer's
-- record from one bucket. On the donor (`out:<id>`) once the receiver has the units;
-- then on the receiver (`in:<id>`), never before: while `out:<id>` exists the give may
-- be retried, and `in:<id>` is what makes that retry count once.
--
-- KEYS[1] fg:{bucket}:transfers   ARGV[1] 'out:<id>' or 'in:<id>'
--
-- Reply: 1 when the record was there, else 0.
return redis.call('HDEL', KEYS[1], ARGV[1])
