-- sku_view.lua: a SKU's definition and counters as callers see them: holds past their
-- deadline count for nothing, swept or not, so the due ones are expired first
-- (bounded; the sweeper does the same work at most one interval later).
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- ARGV[1] most due holds to expire first
--
-- Reply: {stock_total, available, held, sold, per_user_limit, hold_ms, starts_at, ends_at,
--         sku_stock (a bucket: its SKU's stock_total over every bucket; else false),
--         paused ('1' while paused, else false), the waiting room's admission ms,
--         admit_per_second and shuffle ('1') (false without a waiting room)}
--        ({} when the SKU has no state)
--
-- Invariant: the expiries are release()s: each hold's units come back exactly once.
local K = sale_keys()
local meta = K.meta
if redis.call('EXISTS', meta) == 0 then
  return {}
end
expire_due(K, now_ms(), tonumber(ARGV[1]))
return redis.call('HMGET', meta, 'stock_total', 'available', 'held', 'sold', 'per_user_limit',
  'hold_ms', 'starts_at', 'ends_at', 'sku_stock', 'paused', 'wr_ms', 'wr_rate', 'wr_shuffle')
