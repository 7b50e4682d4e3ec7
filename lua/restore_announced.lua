-- restore_announced.lua: after a rebuild of a sale Redis lost, put back what MySQL says
-- was last announced of its stock (skus.announced_sold_out; for a bucket of a split SKU,
-- its bit of skus.buckets_sold_out), so that the stock a rebuild brings back after
-- sku.sold_out is announced (sku.available), and a sale still sold out is not announced
-- again.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale)
-- ARGV[1] '1': MySQL's last announcement of the SKU (or of the bucket) is sold out
--
-- Reply: 1 when it set the flag (and announced what changed since), else 0.
--
-- Invariant: only ever sets meta `sold_out` where Redis has none, then lets
-- announce_stock (lib.lua) compare it with `available`, as every script that writes
-- stock does: one announcement per crossing, whoever crossed first.
local K = sale_keys()
if ARGV[1] ~= '1' or redis.call('EXISTS', K.meta) == 0 then
  return 0
end
if redis.call('HGET', K.meta, 'sold_out') == '1' then
  return 0
end
redis.call('HSET', K.meta, 'sold_out', '1')
announce_stock(K, now_ms())
return 1
