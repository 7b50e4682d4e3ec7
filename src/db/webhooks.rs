//! Webhook endpoints and their deliveries (src/webhooks.rs): the SQL. Times are the
//! caller's clock (ms), so tests can make time pass without sleeping.

use chrono::NaiveDateTime;
use sqlx::mysql::MySqlPool;
use sqlx::{MySql, QueryBuilder, Row};

use super::{datetime_to_ms, events as event_rows, ms_to_datetime};
use crate::error::{Error, Result};
use crate::events::{Event, EventType};

/// An endpoint as MySQL records it. Its `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    /// `whsec_…` as the operator gave it.
    pub secret: String,
    /// None: every type.
    pub types: Option<Vec<EventType>>,
    pub enabled: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &crate::webhooks::redacted_url(&self.url))
            .field("secret", &"whsec_…")
            .field("types", &self.types)
            .field("enabled", &self.enabled)
            .field("created_at_ms", &self.created_at_ms)
            .field("updated_at_ms", &self.updated_at_ms)
            .finish()
    }
}

impl Endpoint {
    pub fn wants(&self, kind: EventType) -> bool {
        self.types.as_ref().is_none_or(|t| t.contains(&kind))
    }
}

fn types_text(types: &Option<Vec<EventType>>) -> String {
    match types {
        None => String::new(),
        Some(list) => list
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn endpoint_from_row(row: &sqlx::mysql::MySqlRow) -> Result<Endpoint> {
    let types: String = row.try_get("types")?;
    Ok(Endpoint {
        name: row.try_get("name")?,
        url: row.try_get("url")?,
        secret: row.try_get("secret")?,
        types: if types.is_empty() {
            None
        } else {
            Some(
                EventType::parse_list(&types)
                    .ok_or_else(|| Error::Internal(format!("webhook types {types:?}")))?,
            )
        },
        enabled: row.try_get::<i8, _>("enabled")? != 0,
        created_at_ms: datetime_to_ms(row.try_get("created_at")?),
        updated_at_ms: datetime_to_ms(row.try_get("updated_at")?),
    })
}

const ENDPOINT_COLUMNS: &str = "name, url, secret, types, enabled, created_at, updated_at";

/// A delivery claimed for an attempt that may be in flight: its claim as the claim
/// wrote it (the owner and the lease's end), so that a later claim of the same
/// delivery is told apart from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub position: u64,
    pub owner: String,
    pub until_ms: i64,
}

/// What `put` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub created: bool,
    /// The deliveries claimed under the endpoint's former settings whose lease had not
    /// ended when the new ones were committed (at most LEASES_LISTED_MAX).
    pub in_flight: Vec<Lease>,
}

/// Leases `put` lists at most: more than every worker's deliveries claimed for one
/// endpoint (in flight, at most its concurrency, and claimed ahead, at most
/// CLAIM_AHEAD) in any deployment we know: 19 workers at the highest concurrency.
pub const LEASES_LISTED_MAX: u32 = 10_000;
const _: () = assert!(
    LEASES_LISTED_MAX as usize
        >= 16 * (crate::webhooks::CLAIM_AHEAD + crate::webhooks::ENDPOINT_CONCURRENCY_MAX)
);

/// Creates or replaces an endpoint. A new endpoint gets the events recorded from now
/// on (replay sends older ones).
///
/// A replaced endpoint's row is written under its lock, which every claim reads the
/// settings under (`claim_current`, in share mode): once this commits, no claim made
/// under the former settings is still to come, and the ones made before are listed
/// (`Written::in_flight`) for the caller to wait out. `updated_at` (the version claims
/// compare) moves on by at least 1 ms, so two PUTs in one millisecond differ too.
pub async fn put(pool: &MySqlPool, endpoint: &Endpoint, now_ms: i64) -> Result<Written> {
    if get(pool, &endpoint.name).await?.is_none() {
        // What a DELETE cut short left of an endpoint of this name (see `delete`).
        delete_deliveries(pool, &endpoint.name, STATEMENT_ROWS_MAX).await?;
    }
    let _turn = crate::explore::mysql_step("put_webhook").await;
    // READ COMMITTED: the leases are read after the write below has waited for the
    // claims holding the row in share mode, and must see what those committed. Under
    // REPEATABLE READ the snapshot of the first read (`last_position`, before that
    // wait) hid them, and the PUT answered without waiting for their requests.
    let mut tx = begin(pool).await?;
    let from = event_rows::last_position(&mut tx).await?;
    let done = sqlx::query(
        "INSERT INTO webhooks (name, url, secret, types, enabled, queued_to, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE url = VALUES(url), secret = VALUES(secret),
           types = VALUES(types), enabled = VALUES(enabled),
           updated_at = GREATEST(VALUES(updated_at), updated_at + INTERVAL 1000 MICROSECOND)",
    )
    .bind(&endpoint.name)
    .bind(&endpoint.url)
    .bind(&endpoint.secret)
    .bind(types_text(&endpoint.types))
    .bind(endpoint.enabled)
    .bind(from)
    .bind(ms_to_datetime(now_ms))
    .bind(ms_to_datetime(now_ms))
    .execute(&mut *tx)
    .await?;
    // 1: inserted; 2: updated.
    let created = done.rows_affected() == 1;
    let mut in_flight = Vec::new();
    if !created {
        let rows: Vec<(u64, String, NaiveDateTime)> = sqlx::query_as(
            "SELECT position, lease_owner, next_attempt_at FROM webhook_deliveries
             WHERE webhook = ? AND status = 'pending' AND lease_owner IS NOT NULL
               AND next_attempt_at > ?
             LIMIT ?",
        )
        .bind(&endpoint.name)
        .bind(ms_to_datetime(now_ms))
        .bind(LEASES_LISTED_MAX)
        .fetch_all(&mut *tx)
        .await?;
        in_flight = rows
            .into_iter()
            .map(|(position, owner, until)| Lease {
                position,
                owner,
                until_ms: datetime_to_ms(until),
            })
            .collect();
    }
    tx.commit().await?;
    Ok(Written { created, in_flight })
}

/// How many of `leases` are still held as they were (the attempt's outcome is not
/// recorded yet).
pub async fn leases_held(pool: &MySqlPool, name: &str, leases: &[Lease]) -> Result<u64> {
    if leases.is_empty() {
        return Ok(0);
    }
    let _turn = crate::explore::mysql_step("leases_held").await;
    let mut query =
        QueryBuilder::<MySql>::new("SELECT COUNT(*) FROM webhook_deliveries WHERE webhook = ");
    query
        .push_bind(name)
        .push(" AND status = 'pending' AND (position, lease_owner, next_attempt_at) IN (");
    push_leases(&mut query, leases);
    query.push(")");
    let held: i64 = query.build_query_scalar().fetch_one(pool).await?;
    Ok(held as u64)
}

pub async fn get(pool: &MySqlPool, name: &str) -> Result<Option<Endpoint>> {
    let _turn = crate::explore::mysql_step("get_webhook").await;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhooks WHERE name = ?"
    )))
    .bind(name)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(endpoint_from_row).transpose()
}

/// Every endpoint, by name.
pub async fn list(pool: &MySqlPool) -> Result<Vec<Endpoint>> {
    let _turn = crate::explore::mysql_step("list_webhooks").await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhooks ORDER BY name LIMIT 1000"
    )))
    .fetch_all(pool)
    .await?;
    rows.iter().map(endpoint_from_row).collect()
}

/// Rows one statement of a replay or a delete touches at most, each statement its own
/// transaction: an endpoint with millions of deliveries never holds that many row
/// locks (nor an undo log that size) in one transaction, and the flush, the claims and
/// the other endpoints' queries wait on at most this many rows at a time.
pub const STATEMENT_ROWS_MAX: u32 = 1000;

/// Deletes the endpoint, then its deliveries, STATEMENT_ROWS_MAX per statement; false
/// when there was no endpoint. The endpoint goes first, in its own statement: no
/// worker queues or claims for it after that. Deliveries a delete cut short (a crash
/// between two batches) leave no trace anyone sees: every read is by an existing
/// endpoint's name, and the next PUT or DELETE of the name removes them first.
pub async fn delete(pool: &MySqlPool, name: &str) -> Result<bool> {
    let turn = crate::explore::mysql_step("delete_webhook").await;
    let done = sqlx::query("DELETE FROM webhooks WHERE name = ?")
        .bind(name)
        .execute(pool)
        .await?;
    drop(turn);
    delete_deliveries(pool, name, STATEMENT_ROWS_MAX).await?;
    Ok(done.rows_affected() > 0)
}

/// Deletes every delivery of `name`, at most `batch` rows per statement; how many.
/// Each batch's positions are read first, without locks, and deleted by key: a
/// `DELETE … ORDER BY … LIMIT` may be planned as a scan of every row of the endpoint
/// (locking each) before the sort, the very unbounded statement this avoids.
pub async fn delete_deliveries(pool: &MySqlPool, name: &str, batch: u32) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let _turn = crate::explore::mysql_step("delete_deliveries").await;
        let positions: Vec<u64> = sqlx::query_scalar(
            "SELECT position FROM webhook_deliveries WHERE webhook = ? ORDER BY position LIMIT ?",
        )
        .bind(name)
        .bind(batch)
        .fetch_all(pool)
        .await?;
        if positions.is_empty() {
            return Ok(deleted);
        }
        let mut delete =
            QueryBuilder::<MySql>::new("DELETE FROM webhook_deliveries WHERE webhook = ");
        delete.push_bind(name).push(" AND position IN (");
        let mut list = delete.separated(", ");
        for position in &positions {
            list.push_bind(*position);
        }
        delete.push(")");
        deleted += delete.build().execute(pool).await?.rows_affected();
        if positions.len() < batch as usize {
            return Ok(deleted);
        }
    }
}

/// Queues a delivery for each event of a wanted type recorded after the endpoint's
/// `queued_to`, at most `batch` events looked at; returns how many were looked at.
/// The endpoint's row is locked meanwhile: two workers queue each event once.
pub async fn enqueue(pool: &MySqlPool, name: &str, now_ms: i64, batch: u32) -> Result<u64> {
    retried(|| enqueue_once(pool, name, now_ms, batch)).await
}

/// Deadlocks between claims, queueing and outcomes of one endpoint (InnoDB picks a
/// victim; nothing was written) are retried a few times.
async fn retried<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            // SQLSTATE 40001: deadlock or serialization failure (MySQL 1213).
            Err(Error::Internal(detail)) if detail.contains("(40001)") && tries < 4 => {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// READ COMMITTED: the claims' locking reads take no gap locks, so queueing and
/// claiming of one endpoint by several workers rarely wait on each other.
async fn begin(pool: &MySqlPool) -> Result<sqlx::Transaction<'static, MySql>> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::Transaction::begin(conn, None).await?)
}

async fn enqueue_once(pool: &MySqlPool, name: &str, now_ms: i64, batch: u32) -> Result<u64> {
    let _turn = crate::explore::mysql_step("enqueue_deliveries").await;
    let mut tx = begin(pool).await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS}, queued_to FROM webhooks WHERE name = ? FOR UPDATE"
    )))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(0);
    };
    let endpoint = endpoint_from_row(&row)?;
    let queued_to: u64 = row.try_get("queued_to")?;
    let events: Vec<(u64, String, String)> = sqlx::query_as(
        "SELECT position, id, type FROM events WHERE position > ? ORDER BY position LIMIT ?",
    )
    .bind(queued_to)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    let Some(last) = events.last().map(|e| e.0) else {
        return Ok(0);
    };
    let wanted: Vec<&(u64, String, String)> = events
        .iter()
        .filter(|(_, _, kind)| EventType::parse(kind).is_some_and(|k| endpoint.wants(k)))
        .collect();
    if !wanted.is_empty() {
        let now = ms_to_datetime(now_ms);
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO webhook_deliveries
             (webhook, position, event_id, status, attempts, first_queued_at, next_attempt_at) ",
        );
        insert.push_values(&wanted, |mut row, (position, id, _)| {
            row.push_bind(name)
                .push_bind(*position)
                .push_bind(id)
                .push_bind("pending")
                .push_bind(0u32)
                .push_bind(now)
                .push_bind(now);
        });
        insert.build().execute(&mut *tx).await?;
    }
    sqlx::query("UPDATE webhooks SET queued_to = ? WHERE name = ?")
        .bind(last)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(events.len() as u64)
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub position: u64,
    pub event_id: String,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub first_queued_at_ms: i64,
    /// None when the event is gone (pruned before it could be delivered).
    pub event: Option<Event>,
}

/// Claims up to `limit` due deliveries of the endpoint for `owner`: rows another
/// worker is claiming are skipped (SKIP LOCKED), and each claimed row's next attempt
/// moves to `now + lease` in the same transaction, so nobody else sends it until the
/// lease ends, and a worker killed mid-delivery leaves it due again then.
pub async fn claim(
    pool: &MySqlPool,
    name: &str,
    owner: &str,
    now_ms: i64,
    lease_ms: i64,
    limit: u32,
) -> Result<Vec<Claimed>> {
    let claimed = retried(|| claim_once(pool, name, None, owner, now_ms, lease_ms, limit)).await?;
    Ok(claimed.unwrap_or_default())
}

/// `claim`, only while the endpoint is still `endpoint` as MySQL has it (enabled, not
/// changed since: `updated_at`), checked in the claim's transaction; None when it is
/// not. A task holding an older version claims nothing, so no event goes to an old URL
/// once the PUT that moved it has answered, and the check costs no round trip of its own.
pub async fn claim_current(
    pool: &MySqlPool,
    endpoint: &Endpoint,
    owner: &str,
    now_ms: i64,
    lease_ms: i64,
    limit: u32,
) -> Result<Option<Vec<Claimed>>> {
    retried(|| {
        claim_once(
            pool,
            &endpoint.name,
            Some(endpoint.updated_at_ms),
            owner,
            now_ms,
            lease_ms,
            limit,
        )
    })
    .await
}

async fn claim_once(
    pool: &MySqlPool,
    name: &str,
    version: Option<i64>,
    owner: &str,
    now_ms: i64,
    lease_ms: i64,
    limit: u32,
) -> Result<Option<Vec<Claimed>>> {
    let _turn = crate::explore::mysql_step("claim_deliveries").await;
    let mut tx = begin(pool).await?;
    if let Some(version) = version {
        let current: Option<(i8, NaiveDateTime)> =
            // In share mode: a PUT's write of the row waits for this claim to commit,
            // so it sees the claim's leases (and waits them out), and no claim under
            // the former settings commits after it (`put`).
            sqlx::query_as(
                "SELECT enabled, updated_at FROM webhooks WHERE name = ? LOCK IN SHARE MODE",
            )
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if !current.is_some_and(|(enabled, at)| enabled != 0 && datetime_to_ms(at) == version) {
            tx.commit().await?;
            return Ok(None);
        }
    }
    let rows: Vec<(u64, String, u32, NaiveDateTime)> = sqlx::query_as(
        "SELECT position, event_id, attempts, first_queued_at FROM webhook_deliveries
         WHERE webhook = ? AND status = 'pending' AND next_attempt_at <= ?
         ORDER BY next_attempt_at, position LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(name)
    .bind(ms_to_datetime(now_ms))
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Some(Vec::new()));
    }
    let mut update = QueryBuilder::<MySql>::new(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = ",
    );
    update
        .push_bind(ms_to_datetime(now_ms + lease_ms))
        .push(", lease_owner = ")
        .push_bind(owner)
        .push(" WHERE webhook = ")
        .push_bind(name)
        .push(" AND position IN (");
    let mut list = update.separated(", ");
    for (position, ..) in &rows {
        list.push_bind(*position);
    }
    update.push(")");
    update.build().execute(&mut *tx).await?;
    let mut select = QueryBuilder::<MySql>::new(
        "SELECT position, id, sku, sequence, type, occurred_at, data FROM events WHERE position IN (",
    );
    let mut list = select.separated(", ");
    for (position, ..) in &rows {
        list.push_bind(*position);
    }
    select.push(")");
    let events: Vec<Event> = select
        .build()
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(event_rows::event_from_row)
        .collect::<Result<_>>()?;
    tx.commit().await?;
    Ok(Some(
        rows.into_iter()
            .map(|(position, event_id, attempts, first)| Claimed {
                event: events.iter().find(|e| e.position == position).cloned(),
                position,
                event_id,
                attempts: attempts + 1,
                first_queued_at_ms: datetime_to_ms(first),
            })
            .collect(),
    ))
}

/// `(position, lease_owner, next_attempt_at), ...` of `leases`, as their claims wrote
/// them: the rows still under exactly these leases.
fn push_leases(query: &mut QueryBuilder<MySql>, leases: &[Lease]) {
    let mut list = query.separated(", ");
    for lease in leases {
        list.push("(")
            .push_bind_unseparated(lease.position)
            .push_unseparated(", ")
            .push_bind_unseparated(&lease.owner)
            .push_unseparated(", ")
            .push_bind_unseparated(ms_to_datetime(lease.until_ms))
            .push_unseparated(")");
    }
}

/// Gives back deliveries claimed and not sent (`leases`, as their claims wrote them):
/// due at once, in their place as when they were queued (`first_queued_at`, at the
/// latest `now_ms`: a delivery given back is not overtaken by ones queued after it),
/// the claim's attempt not counted. A lease that is no longer as
/// written (it ended and another claim took the delivery) is left alone.
pub async fn release(pool: &MySqlPool, name: &str, leases: &[Lease], now_ms: i64) -> Result<()> {
    for chunk in leases.chunks(STATEMENT_ROWS_MAX as usize) {
        retried(|| release_once(pool, name, chunk, now_ms)).await?;
    }
    Ok(())
}

async fn release_once(pool: &MySqlPool, name: &str, leases: &[Lease], now_ms: i64) -> Result<()> {
    let _turn = crate::explore::mysql_step("release_deliveries").await;
    let mut update = QueryBuilder::<MySql>::new(
        "UPDATE webhook_deliveries SET attempts = attempts - 1, lease_owner = NULL,
           next_attempt_at = LEAST(first_queued_at, ",
    );
    update
        .push_bind(ms_to_datetime(now_ms))
        .push(") WHERE webhook = ")
        .push_bind(name)
        .push(" AND status = 'pending' AND attempts > 0 AND position IN (");
    // By key first (the row constructor below may not use the index): the statement
    // locks these rows only.
    let mut positions = update.separated(", ");
    for lease in leases {
        positions.push_bind(lease.position);
    }
    update.push(") AND (position, lease_owner, next_attempt_at) IN (");
    push_leases(&mut update, leases);
    update.push(")");
    update.build().execute(pool).await?;
    Ok(())
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        status: u16,
    },
    /// Retried at `retry_at_ms`.
    Retry {
        status: Option<u16>,
        error: String,
        retry_at_ms: i64,
    },
    /// Given up (the retry window is over, or the event is gone).
    Failed {
        status: Option<u16>,
        error: String,
    },
}

/// Records an attempt's end. A failure counts only while `owner` still holds the
/// claim (after its lease another worker may have sent it); a success always does.
pub async fn finish(
    pool: &MySqlPool,
    name: &str,
    position: u64,
    owner: &str,
    now_ms: i64,
    attempt: &Attempt,
) -> Result<()> {
    retried(|| finish_once(pool, name, position, owner, now_ms, attempt)).await
}

async fn finish_once(
    pool: &MySqlPool,
    name: &str,
    position: u64,
    owner: &str,
    now_ms: i64,
    attempt: &Attempt,
) -> Result<()> {
    let _turn = crate::explore::mysql_step("finish_delivery").await;
    finish_query(name, position, owner, now_ms, attempt)
        .execute(pool)
        .await?;
    Ok(())
}

/// The statement that records one attempt's end (see `finish`).
fn finish_query<'q>(
    name: &'q str,
    position: u64,
    owner: &'q str,
    now_ms: i64,
    attempt: &'q Attempt,
) -> sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments> {
    let truncate = |e: &str| e.chars().take(250).collect::<String>();
    match attempt {
        Attempt::Delivered { status } => sqlx::query(
            "UPDATE webhook_deliveries SET status = 'delivered', delivered_at = ?,
               last_status = ?, last_error = NULL, lease_owner = NULL
             WHERE webhook = ? AND position = ? AND status <> 'delivered'",
        )
        .bind(ms_to_datetime(now_ms))
        .bind(*status as i32)
        .bind(name)
        .bind(position),
        Attempt::Retry {
            status,
            error,
            retry_at_ms,
        } => sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = ?, last_status = ?, last_error = ?,
               lease_owner = NULL
             WHERE webhook = ? AND position = ? AND status = 'pending' AND lease_owner = ?",
        )
        .bind(ms_to_datetime(*retry_at_ms))
        .bind(status.map(|s| s as i32))
        .bind(truncate(error))
        .bind(name)
        .bind(position)
        .bind(owner),
        Attempt::Failed { status, error } => sqlx::query(
            "UPDATE webhook_deliveries SET status = 'failed', last_status = ?, last_error = ?,
               lease_owner = NULL
             WHERE webhook = ? AND position = ? AND status = 'pending' AND lease_owner = ?",
        )
        .bind(status.map(|s| s as i32))
        .bind(truncate(error))
        .bind(name)
        .bind(position)
        .bind(owner),
    }
}

/// Records the ends of several attempts of `owner` (by delivery position) as `finish`
/// records each, in one transaction: one commit for the lot, and the deliveries that
/// answered the same 2xx in one statement. Under load an outcome's own commit was most
/// of what a delivery cost MySQL.
pub async fn finish_many(
    pool: &MySqlPool,
    name: &str,
    owner: &str,
    now_ms: i64,
    ended: &[(u64, Attempt)],
) -> Result<()> {
    if ended.is_empty() {
        return Ok(());
    }
    retried(|| finish_many_once(pool, name, owner, now_ms, ended)).await
}

async fn finish_many_once(
    pool: &MySqlPool,
    name: &str,
    owner: &str,
    now_ms: i64,
    ended: &[(u64, Attempt)],
) -> Result<()> {
    let _turn = crate::explore::mysql_step("finish_deliveries").await;
    let mut tx = begin(pool).await?;
    let mut delivered: std::collections::BTreeMap<u16, Vec<u64>> = Default::default();
    for (position, attempt) in ended {
        match attempt {
            Attempt::Delivered { status } => delivered.entry(*status).or_default().push(*position),
            // Failures are few while an endpoint is healthy, and bounded by their
            // backoff while it is not: one statement each.
            _ => {
                finish_query(name, *position, owner, now_ms, attempt)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    for (status, positions) in &delivered {
        for chunk in positions.chunks(1000) {
            let mut update = QueryBuilder::<MySql>::new(
                "UPDATE webhook_deliveries SET status = 'delivered', delivered_at = ",
            );
            update
                .push_bind(ms_to_datetime(now_ms))
                .push(", last_status = ")
                .push_bind(*status as i32)
                .push(", last_error = NULL, lease_owner = NULL WHERE webhook = ")
                .push_bind(name)
                .push(" AND status <> 'delivered' AND position IN (");
            let mut list = update.separated(", ");
            for position in chunk {
                list.push_bind(*position);
            }
            update.push(")");
            update.build().execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// A delivery as the deliveries list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub position: u64,
    pub event_id: String,
    pub status: String,
    pub attempts: u32,
    pub first_queued_at_ms: i64,
    pub next_attempt_at_ms: i64,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub delivered_at_ms: Option<i64>,
}

/// The endpoint's deliveries in `status` (pending, failed or delivered), by event
/// position, after `after`.
pub async fn deliveries(
    pool: &MySqlPool,
    name: &str,
    status: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<Delivery>> {
    let _turn = crate::explore::mysql_step("list_deliveries").await;
    let rows = sqlx::query(
        "SELECT position, event_id, CAST(status AS CHAR) AS status, attempts, first_queued_at,
                next_attempt_at, last_status, last_error, delivered_at
         FROM webhook_deliveries WHERE webhook = ? AND status = ? AND position > ?
         ORDER BY position LIMIT ?",
    )
    .bind(name)
    .bind(status)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Delivery {
                position: row.try_get("position")?,
                event_id: row.try_get("event_id")?,
                status: row.try_get("status")?,
                attempts: row.try_get("attempts")?,
                first_queued_at_ms: datetime_to_ms(row.try_get("first_queued_at")?),
                next_attempt_at_ms: datetime_to_ms(row.try_get("next_attempt_at")?),
                last_status: row.try_get("last_status")?,
                last_error: row.try_get("last_error")?,
                delivered_at_ms: row
                    .try_get::<Option<NaiveDateTime>, _>("delivered_at")?
                    .map(datetime_to_ms),
            })
        })
        .collect()
}

/// Queues every kept event of a wanted type after `after` again (delivered or failed
/// ones too), due now, with a fresh retry window. A delivery still pending is left as
/// it is: it is queued already, and resetting its lease would let a second worker send
/// it while the first one's attempt runs. Returns how many events are queued.
///
/// In batches of STATEMENT_ROWS_MAX events, each batch one statement committed on its
/// own, oldest first: a replay of a long history locks a batch's rows at a time. Cut
/// short (a crash), the batches done stay queued and a second replay queues the rest
/// (it leaves pending ones as they are).
pub async fn replay(pool: &MySqlPool, endpoint: &Endpoint, after: u64, now_ms: i64) -> Result<u64> {
    replay_in_batches(pool, endpoint, after, now_ms, STATEMENT_ROWS_MAX).await
}

/// `replay`, `batch` events per statement.
pub async fn replay_in_batches(
    pool: &MySqlPool,
    endpoint: &Endpoint,
    after: u64,
    now_ms: i64,
    batch: u32,
) -> Result<u64> {
    let now = ms_to_datetime(now_ms);
    let filter = event_rows::Filter {
        after,
        types: endpoint.types.clone(),
        sku: None,
    };
    let mut queued = 0u64;
    let mut from = after;
    loop {
        let _turn = crate::explore::mysql_step("replay_deliveries").await;
        // The batch's last position first (an index range of the events), so that the
        // statement below touches exactly this batch and the next one starts after it.
        let mut positions =
            QueryBuilder::<MySql>::new("SELECT position FROM events WHERE position > ");
        positions.push_bind(from);
        event_rows::push_filter(&mut positions, &filter);
        positions.push(" ORDER BY position LIMIT ").push_bind(batch);
        let found: Vec<u64> = positions.build_query_scalar().fetch_all(pool).await?;
        let Some(&last) = found.last() else {
            return Ok(queued);
        };
        let mut query = QueryBuilder::<MySql>::new(
            "INSERT INTO webhook_deliveries
             (webhook, position, event_id, status, attempts, first_queued_at, next_attempt_at)
             SELECT ",
        );
        query
            .push_bind(&endpoint.name)
            .push(", position, id, 'pending', 0, ")
            .push_bind(now)
            .push(", ")
            .push_bind(now)
            .push(" FROM events WHERE position > ")
            .push_bind(from)
            .push(" AND position <= ")
            .push_bind(last);
        event_rows::push_filter(&mut query, &filter);
        // `status` last: MySQL applies these in order, and the others read the old status.
        query.push(
            " ON DUPLICATE KEY UPDATE
               attempts = IF(status = 'pending', attempts, 0),
               first_queued_at = IF(status = 'pending', first_queued_at, VALUES(first_queued_at)),
               next_attempt_at = IF(status = 'pending', next_attempt_at, VALUES(next_attempt_at)),
               lease_owner = IF(status = 'pending', lease_owner, NULL),
               delivered_at = IF(status = 'pending', delivered_at, NULL),
               status = 'pending'",
        );
        query.build().execute(pool).await?;
        queued += found.len() as u64;
        if found.len() < batch as usize {
            return Ok(queued);
        }
        from = last;
    }
}

/// Per endpoint: when the oldest event not yet delivered (pending) was recorded.
pub async fn oldest_pending(pool: &MySqlPool) -> Result<Vec<(String, i64)>> {
    let _turn = crate::explore::mysql_step("oldest_pending").await;
    let rows: Vec<(String, NaiveDateTime)> = sqlx::query_as(
        // Per endpoint, its lowest pending position (one index look-up, not a scan of
        // every pending delivery), then that event's time: positions follow recording.
        "SELECT w.name, e.recorded_at FROM webhooks w
         JOIN events e ON e.position = (SELECT MIN(d.position) FROM webhook_deliveries d
                                        WHERE d.webhook = w.name AND d.status = 'pending')",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, at)| (name, datetime_to_ms(at)))
        .collect())
}

/// Deletes at most `limit` deliveries queued before `before_ms` that are over
/// (delivered or failed); returns how many. A pending one stays until its retries end
/// (the retention is longer than the retry window: config.rs).
pub async fn prune(pool: &MySqlPool, before_ms: i64, limit: u32) -> Result<u64> {
    let _turn = crate::explore::mysql_step("prune_deliveries").await;
    let done = sqlx::query(
        "DELETE FROM webhook_deliveries WHERE first_queued_at < ? AND status <> 'pending'
         ORDER BY first_queued_at LIMIT ?",
    )
    .bind(ms_to_datetime(before_ms))
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
