-- reserve_batch.lua: the reserves of one SKU that arrived together, in one call, in
-- order; exactly as if reserve.lua had run once per request in that order.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- then for request i (i = 1..n): KEYS[9 + i] fg:{sku}:idem:<n>:<user>:<key> (layout 1's
--            idempotency key, read only for a layout-1 SKU)
-- ARGV[1] idempotency TTL (ms)   ARGV[2] payment grace (ms)
-- ARGV[3] expired holds to reclaim before sold_out
-- ARGV[4] holds a user may release per key lifetime before `limit_exceeded` (0: no cap)
-- then for request i: ARGV[4i + 1] user id   ARGV[4i + 2] quantity   ARGV[4i + 3] new rid
--                     ARGV[4i + 4] idempotency key
--
-- Reply: one reserve.lua reply per request, in order. No request carries an admission
-- token here: on a SKU with a waiting room each new hold answers 'admission_required'.
--
-- Invariants: those of reserve_hold in lib.lua, for every request of the batch.
local K = sale_keys()
local idem_ttl_ms, grace_ms, reclaim_limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local churn_cap = tonumber(ARGV[4])
local now = now_ms()
local sale = load_sale(K.meta)
local replies = {}
for i = 1, #KEYS - 9 do
  replies[i] = reserve_hold(K, sale, KEYS[9 + i], ARGV[4 * i + 1], ARGV[4 * i + 4],
    tonumber(ARGV[4 * i + 2]), ARGV[4 * i + 3], idem_ttl_ms, grace_ms, reclaim_limit, churn_cap,
    now)
end
save_sale(K, sale)
return replies
