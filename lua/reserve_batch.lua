-- reserve_batch.lua: the reserves of one SKU that arrived together, in one call, in
-- order; exactly as if reserve.lua had run once per request in that order.
--
-- KEYS[1..8] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog
-- then for request i (i = 1..n):
--   KEYS[7 + 2i] fg:{sku}:idem:<n>:<user>:<key>   KEYS[8 + 2i] fg:{sku}:r:<new rid>
-- ARGV[1] idempotency TTL (ms)   ARGV[2] payment grace (ms)
-- ARGV[3] expired holds to reclaim before sold_out
-- ARGV[4] holds a user may release per key lifetime before `limit_exceeded` (0: no cap)
-- then for request i: ARGV[3i + 2] user id   ARGV[3i + 3] quantity   ARGV[3i + 4] new rid
--
-- Reply: one reserve.lua reply per request, in order.
--
-- Invariants: those of reserve_hold in lib.lua, for every request of the batch.
local meta, used, deadlines = KEYS[1], KEYS[2], KEYS[3]
local idem_ttl_ms, grace_ms, reclaim_limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local churn_cap = tonumber(ARGV[4])
local now = now_ms()
local sale = load_sale(meta)
local replies = {}
for i = 1, (#KEYS - 8) / 2 do
  replies[i] = reserve_hold(sale, meta, used, deadlines, KEYS[7 + 2 * i], KEYS[8 + 2 * i],
    ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3]), ARGV[3 * i + 4], idem_ttl_ms, grace_ms,
    reclaim_limit, churn_cap, now)
end
save_sale(meta, sale)
return replies
