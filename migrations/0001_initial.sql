-- The durable record. Redis holds the live state of a sale; MySQL holds what must
-- survive it: SKU definitions (source of truth for stock_total), every confirmed
-- sale, every compensation, and what the reconciler found and repaired.

CREATE TABLE skus (
    sku            VARCHAR(64)     NOT NULL PRIMARY KEY,
    stock_total    BIGINT UNSIGNED NOT NULL,
    per_user_limit INT UNSIGNED    NOT NULL,
    hold_seconds   INT UNSIGNED    NOT NULL,
    starts_at      DATETIME(3)     NULL,
    ends_at        DATETIME(3)     NULL,
    -- Derived: SUM(sales.quantity) for the SKU, recomputed in the same transaction
    -- as every flush, so it is never ahead of or behind the sales rows.
    sold           BIGINT UNSIGNED NOT NULL DEFAULT 0,
    updated_at     DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per confirmed reservation. The primary key is the idempotency of the
-- flush: a replayed outbox event inserts nothing.
CREATE TABLE sales (
    reservation_id VARCHAR(128)    NOT NULL PRIMARY KEY,
    sku            VARCHAR(64)     NOT NULL,
    user_id        VARCHAR(64)     NOT NULL,
    quantity       INT UNSIGNED    NOT NULL,
    payment_ref    VARCHAR(128)    NOT NULL,
    confirmed_at   DATETIME(3)     NOT NULL,
    flushed_at     DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY sales_by_sku (sku)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per payment that could not become a sale: unique per (reservation,
-- payment_ref), however often the payment webhook was retried.
CREATE TABLE compensations (
    id             VARCHAR(64)     NOT NULL PRIMARY KEY,
    reservation_id VARCHAR(128)    NOT NULL,
    sku            VARCHAR(64)     NOT NULL,
    user_id        VARCHAR(64)     NOT NULL,
    quantity       INT UNSIGNED    NOT NULL,
    payment_ref    VARCHAR(128)    NOT NULL,
    reason         ENUM('expired', 'cancelled', 'duplicate_payment') NOT NULL,
    status         ENUM('open', 'resolved') NOT NULL DEFAULT 'open',
    created_at     DATETIME(3)     NOT NULL,
    resolved_at    DATETIME(3)     NULL,
    UNIQUE KEY compensation_per_payment (reservation_id, payment_ref),
    KEY compensations_by_status (status, created_at, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Every drift the reconciler found, with the values before and after any repair.
CREATE TABLE reconcile_audit (
    id        BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    run_at    DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    sku       VARCHAR(64)     NOT NULL,
    finding   VARCHAR(64)     NOT NULL,
    detail    TEXT            NOT NULL,
    before_value TEXT         NOT NULL,
    after_value  TEXT         NULL,
    repaired  BOOLEAN         NOT NULL DEFAULT FALSE,
    KEY audit_by_sku (sku, run_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
