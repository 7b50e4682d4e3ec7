-- The idempotency key that made each ended reservation, and until when that key
-- replays it (the hold's keep_until): a rebuild of a SKU that Redis lost restores the
-- keys from here, so a key replays its reservation for its whole lifetime
-- (contract invariant 3). NULL for reservations recorded before this column.
ALTER TABLE reservations
    ADD COLUMN idempotency_key VARCHAR(128) NULL,
    ADD COLUMN keep_until      DATETIME(3)  NULL,
    ADD KEY reservations_by_key_lifetime (sku, keep_until);
