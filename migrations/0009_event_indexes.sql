-- The feed filtered by type or by SKU reads its index from the cursor on, instead of
-- every event after the cursor; a webhook endpoint's oldest pending delivery is found
-- by its index instead of every pending delivery (db/events.rs, db/webhooks.rs).
ALTER TABLE events ADD KEY events_by_type (type, position), ADD KEY events_by_sku_position (sku, position);
ALTER TABLE webhook_deliveries ADD KEY deliveries_pending (webhook, status, position);
