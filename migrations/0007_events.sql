-- Events (contract v1.2, "Events: a feed and signed webhooks"): every fact the order
-- service or finance acts on, written in the same transaction as the fact (the flush of
-- the outbox, or a compensation / resolve written straight to MySQL).
--
-- `position`: the feed's order over every SKU, assigned from event_counters('*') as the
-- last statement before the commit, under that row's lock: positions commit in
-- increasing order, so a reader that saw position p can never later find an event
-- below p (an AUTO_INCREMENT is allocated at insert time and may commit out of order).
-- `sequence`: per SKU, consecutive from 1, assigned under event_counters(<sku>)'s lock
-- in the order of the SKU's facts; MySQL is its authority, so a Redis loss or a
-- rebuild never reuses or skips a number. `id` derives from the fact (events.rs):
-- a re-flush, a replay or a rebuild finds it and writes nothing.
CREATE TABLE events (
    position    BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    id          VARCHAR(40)     NOT NULL,
    sku         VARCHAR(64)     NOT NULL,
    sequence    BIGINT UNSIGNED NOT NULL,
    type        VARCHAR(32)     NOT NULL,
    occurred_at DATETIME(3)     NOT NULL,
    recorded_at DATETIME(3)     NOT NULL,
    data        MEDIUMTEXT      NOT NULL,
    UNIQUE KEY events_by_id (id),
    UNIQUE KEY events_by_sku (sku, sequence),
    KEY events_by_recorded (recorded_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The last number handed out: name '*' for the feed's position, else a SKU id for its
-- sequence. Never pruned, so numbers are never reused after old events are.
CREATE TABLE event_counters (
    name VARCHAR(64)     NOT NULL PRIMARY KEY,
    last BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Webhook endpoints (PUT /v1/admin/webhooks/{name}). `queued_to`: the feed position up
-- to which matching events have deliveries (a new endpoint starts at the feed's end;
-- replay queues older ones again).
CREATE TABLE webhooks (
    name       VARCHAR(64)     NOT NULL PRIMARY KEY,
    url        VARCHAR(2048)   NOT NULL,
    secret     VARCHAR(100)    NOT NULL,
    types      VARCHAR(512)    NOT NULL,
    enabled    BOOLEAN         NOT NULL,
    queued_to  BIGINT UNSIGNED NOT NULL,
    created_at DATETIME(3)     NOT NULL,
    updated_at DATETIME(3)     NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One event to one endpoint. A worker claims due rows (SELECT .. FOR UPDATE SKIP
-- LOCKED) and moves `next_attempt_at` past the request's timeout (the lease) in the
-- same transaction: no other worker sends it meanwhile, and a worker killed
-- mid-delivery leaves it due again when the lease ends. `first_queued_at` bounds the
-- retries (failed after the retry window).
CREATE TABLE webhook_deliveries (
    webhook         VARCHAR(64)     NOT NULL,
    position        BIGINT UNSIGNED NOT NULL,
    event_id        VARCHAR(40)     NOT NULL,
    status          ENUM('pending', 'delivered', 'failed') NOT NULL,
    attempts        INT UNSIGNED    NOT NULL,
    first_queued_at DATETIME(3)     NOT NULL,
    next_attempt_at DATETIME(3)     NOT NULL,
    lease_owner     VARCHAR(64)     NULL,
    last_status     INT             NULL,
    last_error      VARCHAR(255)    NULL,
    delivered_at    DATETIME(3)     NULL,
    PRIMARY KEY (webhook, position),
    KEY deliveries_due (webhook, status, next_attempt_at),
    KEY deliveries_by_queued (first_queued_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
