-- Operators (contract v1.2): a SKU can be paused (a term of its sale, restored with it
-- from here after a Redis loss); SKUs are listed oldest definition first (`seq`, the
-- listing's cursor); a resolved compensation records the refund's reference and a note.
ALTER TABLE skus
    ADD COLUMN paused     BOOLEAN         NOT NULL DEFAULT FALSE,
    ADD COLUMN created_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    ADD COLUMN seq        BIGINT UNSIGNED NOT NULL AUTO_INCREMENT UNIQUE;
ALTER TABLE compensations
    ADD COLUMN refund_ref VARCHAR(128) NULL,
    ADD COLUMN note       VARCHAR(500) NULL;
