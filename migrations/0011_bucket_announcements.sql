-- The buckets of a split SKU (buckets > 1) that last announced themselves out of stock:
-- bit b set after bucket b's sku_sold_out, cleared after its sku_available (lua/lib.lua
-- announce_stock). The flush keeps it under the SKU's row lock and makes the SKU's own
-- events from it: sku.sold_out when the last bucket goes out (every bit set),
-- sku.available when one comes back (db::apply_events_in_order). Setting a bit that is
-- set changes nothing, so a re-flush or a rebuild that announces a bucket again makes
-- no event; a rebuilt bucket gets its bit back into Redis (restore_announced.lua).
ALTER TABLE skus ADD COLUMN buckets_sold_out INT UNSIGNED NOT NULL DEFAULT 0;
