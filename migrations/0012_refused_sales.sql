-- A payment the flush cannot make a sale because MySQL already records the SKU's whole
-- stock as sold (a Redis rollback took back sales MySQL has, and Redis sold those units
-- again): it becomes a compensation with reason 'sold_out' (db::apply_events_in_order),
-- so MySQL never records more sales than the stock (invariant 2).
ALTER TABLE compensations
    MODIFY reason ENUM('expired', 'cancelled', 'duplicate_payment', 'sold_out') NOT NULL;
