-- The last stock crossing announced as an event per SKU (sku.sold_out: 1, sku.available:
-- 0, never: NULL). MySQL is the authority on it: a rebuild of a lost SKU or a Redis
-- loss forgets Redis's own flag, and the flush then drops a crossing that repeats the
-- last one (db::apply_events_in_order): one event per real crossing.
ALTER TABLE skus ADD COLUMN announced_sold_out BOOLEAN NULL;
