-- The money trail (issue 9).
--
-- Every reservation that ended (confirmed, cancelled, expired) is recorded here by the
-- flush, from the outbox event its end wrote in the same step: Redis may forget it
-- after its idempotency window, and reads and late payments answer from this table.
CREATE TABLE reservations (
    reservation_id VARCHAR(128)    NOT NULL PRIMARY KEY,
    sku            VARCHAR(64)     NOT NULL,
    user_id        VARCHAR(64)     CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    quantity       INT UNSIGNED    NOT NULL,
    status         ENUM('confirmed', 'cancelled', 'expired') NOT NULL,
    payment_ref    VARCHAR(128)    NULL,
    created_at     DATETIME(3)     NOT NULL,
    expires_at     DATETIME(3)     NOT NULL,
    ended_at       DATETIME(3)     NOT NULL,
    KEY reservations_by_sku (sku, status, ended_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- User ids are compared byte for byte: `utf8mb4_bin` is a PAD SPACE collation, under
-- which 'alice' and 'alice ' are equal (GROUP BY merged them). NO PAD compares every byte.
ALTER TABLE sales
    MODIFY user_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL;
ALTER TABLE compensations
    MODIFY user_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL;

-- Who found the payment that could not become a sale: the confirm script ('gateway'),
-- the gateway answering for a reservation Redis forgot ('record'), or the flush
-- finding a sale MySQL already has under another payment_ref ('flush': Redis lost a
-- confirmation it had acknowledged, a rollback). The reconciler reports open 'flush' ones.
ALTER TABLE compensations
    ADD COLUMN found_by ENUM('gateway', 'record', 'flush') NOT NULL DEFAULT 'gateway';
