//! `--baseline mysql`: the reserve done the way teams do it without Redis, straight
//! against MariaDB, one InnoDB transaction per reservation, at the same concurrency:
//! per-user limit (a usage row per user and SKU, upserted then read), the reservation
//! row (its unique index on the idempotency key makes a retry a replay), then the
//! conditional stock UPDATE last so the hot row lock is held as briefly as the schema
//! allows, and COMMIT: BEGIN + 4 statements + COMMIT, 6 round trips. Its own `bench_*`
//! tables; the gateway's tables are never touched.

use anyhow::{Context, Result};
use rand::Rng;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Connection, MySqlConnection, MySqlPool};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::dispatch_open_loop;
use crate::stats::{Endpoint, Recorder};

const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS bench_stock (
        sku            VARCHAR(64)     NOT NULL PRIMARY KEY,
        stock_total    BIGINT UNSIGNED NOT NULL,
        available      BIGINT UNSIGNED NOT NULL,
        held           BIGINT UNSIGNED NOT NULL DEFAULT 0,
        per_user_limit INT UNSIGNED    NOT NULL,
        hold_seconds   INT UNSIGNED    NOT NULL
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS bench_reservations (
        reservation_id  VARCHAR(64)  NOT NULL PRIMARY KEY,
        sku             VARCHAR(64)  NOT NULL,
        user_id         VARCHAR(64)  NOT NULL,
        idempotency_key VARCHAR(128) NOT NULL,
        quantity        INT UNSIGNED NOT NULL,
        status          ENUM('held', 'paying', 'confirmed', 'cancelled', 'expired') NOT NULL,
        expires_at      DATETIME(3)  NOT NULL,
        created_at      DATETIME(3)  NOT NULL,
        UNIQUE KEY reservation_per_key (sku, user_id, idempotency_key),
        KEY live_by_deadline (sku, status, expires_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS bench_usage (
        sku     VARCHAR(64)     NOT NULL,
        user_id VARCHAR(64)     NOT NULL,
        used    BIGINT UNSIGNED NOT NULL,
        PRIMARY KEY (sku, user_id)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
];

const BASELINE_SKU: &str = "bench-baseline";
const BASELINE_STOCK: u64 = 1_000_000_000;

pub struct MysqlBaseline {
    pub rec: Arc<Recorder>,
    pub elapsed: Duration,
    pub created: u64,
    /// Server settings that decide what a commit costs.
    pub settings: String,
    pub check: Result<(), String>,
}

#[derive(Debug)]
enum Outcome {
    Created,
    Replayed,
    SoldOut,
    LimitExceeded,
}

/// The app keeps SKU definitions in memory (as the gateway does in Redis): the
/// transaction does not read them.
const PER_USER_LIMIT: u64 = 1;
const HOLD_SECONDS: u32 = 600;

async fn reserve(
    conn: &mut MySqlConnection,
    user: &str,
    key: &str,
    quantity: u64,
    rid: &str,
) -> Result<Outcome, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "INSERT INTO bench_usage (sku, user_id, used) VALUES (?, ?, ?)
         ON DUPLICATE KEY UPDATE used = used + VALUES(used)",
    )
    .bind(BASELINE_SKU)
    .bind(user)
    .bind(quantity)
    .execute(&mut *tx)
    .await?;
    let (used,): (u64,) =
        sqlx::query_as("SELECT used FROM bench_usage WHERE sku = ? AND user_id = ?")
            .bind(BASELINE_SKU)
            .bind(user)
            .fetch_one(&mut *tx)
            .await?;
    if used > PER_USER_LIMIT {
        tx.rollback().await?;
        return Ok(Outcome::LimitExceeded);
    }
    // Optimistic idempotency: the unique index refuses a second hold for the key,
    // and only then is the first one looked up (a replay).
    let inserted = sqlx::query(
        "INSERT INTO bench_reservations
           (reservation_id, sku, user_id, idempotency_key, quantity, status, expires_at, created_at)
         VALUES (?, ?, ?, ?, ?, 'held', NOW(3) + INTERVAL ? SECOND, NOW(3))",
    )
    .bind(rid)
    .bind(BASELINE_SKU)
    .bind(user)
    .bind(key)
    .bind(quantity)
    .bind(HOLD_SECONDS)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            tx.rollback().await?;
            let _prior: Option<(String,)> = sqlx::query_as(
                "SELECT reservation_id FROM bench_reservations WHERE sku = ? AND user_id = ? AND idempotency_key = ?",
            )
            .bind(BASELINE_SKU)
            .bind(user)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
            return Ok(Outcome::Replayed);
        }
        other => {
            other?;
        }
    }
    let taken = sqlx::query(
        "UPDATE bench_stock SET available = available - ?, held = held + ? WHERE sku = ? AND available >= ?",
    )
    .bind(quantity)
    .bind(quantity)
    .bind(BASELINE_SKU)
    .bind(quantity)
    .execute(&mut *tx)
    .await?;
    if taken.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(Outcome::SoldOut);
    }
    tx.commit().await?;
    Ok(Outcome::Created)
}

struct Shared {
    rec: Arc<Recorder>,
    counter: AtomicU64,
    created: AtomicU64,
    run_id: String,
}

impl Shared {
    /// One reservation by a fresh user, recorded from `started`.
    async fn one(&self, conn: &mut MySqlConnection, started: Instant) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let user = format!("u{n}");
        let key = format!("k{n}");
        let rid = format!("{}.{n}.{:016x}", self.run_id, rand::rng().random::<u64>());
        let outcome = reserve(conn, &user, &key, 1, &rid).await;
        let (status, label) = match &outcome {
            Ok(Outcome::Created) => {
                self.created.fetch_add(1, Ordering::Relaxed);
                (201, "created")
            }
            Ok(Outcome::Replayed) => (201, "replayed"),
            Ok(Outcome::SoldOut) => (409, "sold_out"),
            Ok(Outcome::LimitExceeded) => (409, "limit_exceeded"),
            Err(sqlx::Error::Database(e)) if e.message().contains("Deadlock") => (0, "deadlock"),
            Err(_) => (0, "error"),
        };
        self.rec
            .record(Endpoint::MysqlReserve, started.elapsed(), status, label);
    }
}

/// Closed loop with `concurrency` connections, or open loop at `rate` reservations/s.
pub async fn run(
    database_url: &str,
    concurrency: usize,
    duration: Duration,
    run_id: &str,
    rate: Option<f64>,
    max_in_flight: usize,
) -> Result<MysqlBaseline> {
    let options = MySqlConnectOptions::from_str(database_url).context("--database-url")?;
    let pool: MySqlPool = MySqlPoolOptions::new()
        .max_connections(concurrency as u32 + 1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .context("connecting to MySQL for the baseline")?;
    for ddl in SCHEMA {
        sqlx::query(ddl)
            .execute(&pool)
            .await
            .context("creating bench_* tables")?;
    }
    // A clean slate each run, so runs compare (the tables are the harness's own).
    sqlx::query("TRUNCATE TABLE bench_reservations")
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE TABLE bench_usage")
        .execute(&pool)
        .await?;
    sqlx::query(
        "REPLACE INTO bench_stock (sku, stock_total, available, held, per_user_limit, hold_seconds)
         VALUES (?, ?, ?, 0, ?, ?)",
    )
    .bind(BASELINE_SKU)
    .bind(BASELINE_STOCK)
    .bind(BASELINE_STOCK)
    .bind(PER_USER_LIMIT)
    .bind(HOLD_SECONDS)
    .execute(&pool)
    .await?;
    let (version, flush, binlog): (String, i64, i64) = sqlx::query_as(
        "SELECT VERSION(), CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), CAST(@@log_bin AS SIGNED)",
    )
            .fetch_one(&pool)
            .await?;
    let settings = format!("{version}, innodb_flush_log_at_trx_commit={flush}, log_bin={binlog}");

    // One connection per client, opened before the clock starts.
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(
            pool.acquire()
                .await
                .context("opening baseline connections")?,
        );
    }
    let start = Instant::now();
    let rec = Arc::new(Recorder::new(start));
    let deadline = start + duration;
    let shared = Arc::new(Shared {
        rec: rec.clone(),
        counter: AtomicU64::new(0),
        created: AtomicU64::new(0),
        run_id: run_id.to_string(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    match rate {
        None => {
            for mut conn in conns {
                let shared = shared.clone();
                tasks.spawn(async move {
                    while Instant::now() < deadline {
                        shared.one(&mut conn, Instant::now()).await;
                    }
                });
            }
        }
        Some(rate) => {
            // Open loop, like the gateway phases: a reservation every 1/rate s whatever
            // the answers, latency from the intended start, connections from the pool.
            drop(conns);
            let unsent = dispatch_open_loop(
                start,
                deadline,
                rate,
                max_in_flight,
                |_, intended, permit| {
                    let (shared, pool) = (shared.clone(), pool.clone());
                    tasks.spawn(async move {
                        if let Ok(mut conn) = pool.acquire().await {
                            shared.one(&mut conn, intended).await;
                        } else {
                            shared.rec.record(
                                Endpoint::MysqlReserve,
                                intended.elapsed(),
                                0,
                                "error",
                            );
                        }
                        drop(permit);
                    });
                    while tasks.try_join_next().is_some() {}
                },
            )
            .await;
            shared.rec.unsent.store(unsent, Ordering::Relaxed);
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let created = shared.created.load(Ordering::Relaxed);

    // The baseline must itself be correct, or its numbers mean nothing.
    let (available, held): (u64, u64) =
        sqlx::query_as("SELECT available, held FROM bench_stock WHERE sku = ?")
            .bind(BASELINE_SKU)
            .fetch_one(&pool)
            .await?;
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM bench_reservations WHERE sku = ?")
        .bind(BASELINE_SKU)
        .fetch_one(&pool)
        .await?;
    let check = if available + held == BASELINE_STOCK && held == created && rows as u64 == created {
        Ok(())
    } else {
        Err(format!(
            "available {available} + held {held} vs stock {BASELINE_STOCK}; {rows} rows; {created} created"
        ))
    };
    pool.close().await;
    Ok(MysqlBaseline {
        rec,
        elapsed,
        created,
        settings,
        check,
    })
}
