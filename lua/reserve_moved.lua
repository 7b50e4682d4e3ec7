-- reserve_moved.lua: the reserves of a split SKU that found their home bucket short
-- (src/buckets.rs), in their home bucket, together with the gives of the stock taken for
-- them from other buckets (lib.lua give_units): the units moved here are sellable to
-- these reserves first, in the same atomic step, so no other reserve can take them in
-- between and leave these short while the SKU still has stock.
--
-- KEYS[1..9] the bucket's sale keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10]   fg:{bucket}:transfers
-- then for request i (i = 1..n): KEYS[10 + i] the layout-1 idempotency key (as in
--            reserve_batch.lua)
-- ARGV[1] idempotency TTL (ms)   ARGV[2] payment grace (ms)
-- ARGV[3] expired holds to reclaim before sold_out
-- ARGV[4] holds a user may release per key lifetime before `limit_exceeded` (0: no cap)
-- ARGV[5] g, the gives; ARGV[6] the give window (ms); then for give j (j = 1..g):
--         ARGV[6 + 4j - 3] transfer id, ARGV[6 + 4j - 2] units taken, ARGV[6 + 4j - 1]
--         the donor's hash tag, ARGV[6 + 4j] the donor's Redis time of the take (ms)
-- then for request i, from a = 6 + 4g: ARGV[a + 4i - 3] user id, ARGV[a + 4i - 2]
--         quantity, ARGV[a + 4i - 1] new rid, ARGV[a + 4i] idempotency key
--
-- Reply: { {what became of each give: 'given' | 'already' | 'late' | 'missing'}, then one
-- reserve.lua reply per request, in order }. 'missing': the bucket has no state;
-- nothing was given (the units stay in transit for the finisher) and the reserves
-- answer as reserve.lua would (`not_found`).
--
-- Invariants: those of give_units and of reserve_hold in lib.lua; the gives come
-- first, so available + held + sold == stock_total holds at the end as at the start.
local K = sale_keys()
local transfers = KEYS[10]
local idem_ttl_ms, grace_ms, reclaim_limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local churn_cap = tonumber(ARGV[4])
local gives, window = tonumber(ARGV[5]), tonumber(ARGV[6])
local given = {}
for j = 1, gives do
  local at = 6 + 4 * j
  given[j] = give_units(K.meta, transfers, ARGV[at - 3], tonumber(ARGV[at - 2]), ARGV[at - 1],
    ARGV[at], window)
end
local now = now_ms()
local sale = load_sale(K.meta)
local replies = { given }
local a = 6 + 4 * gives
for i = 1, #KEYS - 10 do
  replies[i + 1] = reserve_hold(K, sale, KEYS[10 + i], ARGV[a + 4 * i - 3], ARGV[a + 4 * i],
    tonumber(ARGV[a + 4 * i - 2]), ARGV[a + 4 * i - 1], idem_ttl_ms, grace_ms, reclaim_limit,
    churn_cap, now)
end
save_sale(K, sale)
-- Units given to a bucket that was out, and not all taken by these reserves, bring it
-- back (save_sale announces only a bucket left at 0).
announce_stock(K, now)
return replies
