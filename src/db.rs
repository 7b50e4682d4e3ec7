//! MySQL, the durable record: SKU definitions, flushed sales and compensations, the
//! reconciliation audit. Never called on the reserve path.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, QueryBuilder, Row, Transaction};
use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::limits;
use crate::reservation::{Compensation, CompensationReason, SkuDefinition};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Lazy: the gateway starts and sells while MySQL is down; only the admin path,
/// the compensation endpoints and the flush wait for it.
pub fn connect(database_url: &str) -> Result<MySqlPool> {
    MySqlPoolOptions::new()
        .max_connections(limits::MYSQL_POOL_MAX)
        .acquire_timeout(limits::MYSQL_ACQUIRE_TIMEOUT)
        .connect_lazy(database_url)
        .map_err(Error::from)
}

pub fn ms_to_datetime(ms: i64) -> NaiveDateTime {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .naive_utc()
}

fn datetime_to_ms(at: NaiveDateTime) -> i64 {
    at.and_utc().timestamp_millis()
}

/// Writes the definition and locks the row until the transaction ends, so that two
/// admin writes of one SKU apply to Redis in the order they commit. Returns the units
/// MySQL counts as sold.
pub async fn upsert_sku(
    tx: &mut Transaction<'_, MySql>,
    sku: &SkuId,
    definition: &SkuDefinition,
) -> Result<u64> {
    sqlx::query(
        "INSERT INTO skus (sku, stock_total, per_user_limit, hold_seconds, starts_at, ends_at)
         VALUES (?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE stock_total = VALUES(stock_total),
           per_user_limit = VALUES(per_user_limit), hold_seconds = VALUES(hold_seconds),
           starts_at = VALUES(starts_at), ends_at = VALUES(ends_at)",
    )
    .bind(sku.as_str())
    .bind(definition.stock_total)
    .bind(definition.per_user_limit)
    .bind(definition.hold_seconds)
    .bind(definition.starts_at_ms.map(ms_to_datetime))
    .bind(definition.ends_at_ms.map(ms_to_datetime))
    .execute(&mut **tx)
    .await?;
    let sold: u64 = sqlx::query_scalar("SELECT sold FROM skus WHERE sku = ? FOR UPDATE")
        .bind(sku.as_str())
        .fetch_one(&mut **tx)
        .await?;
    Ok(sold)
}

/// A SKU as MySQL records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuRecord {
    pub definition: SkuDefinition,
    pub sold: u64,
}

pub async fn sku_record(pool: &MySqlPool, sku: &SkuId) -> Result<Option<SkuRecord>> {
    let row = sqlx::query(
        "SELECT stock_total, per_user_limit, hold_seconds, starts_at, ends_at, sold
         FROM skus WHERE sku = ?",
    )
    .bind(sku.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(|row| sku_record_from_row(&row)).transpose()
}

fn sku_record_from_row(row: &sqlx::mysql::MySqlRow) -> Result<SkuRecord> {
    Ok(SkuRecord {
        definition: SkuDefinition {
            stock_total: row.try_get("stock_total")?,
            per_user_limit: row.try_get::<u32, _>("per_user_limit")? as u64,
            hold_seconds: row.try_get::<u32, _>("hold_seconds")? as u64,
            starts_at_ms: row
                .try_get::<Option<NaiveDateTime>, _>("starts_at")?
                .map(datetime_to_ms),
            ends_at_ms: row
                .try_get::<Option<NaiveDateTime>, _>("ends_at")?
                .map(datetime_to_ms),
        },
        sold: row.try_get("sold")?,
    })
}

/// One outbox event, as the flush writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEvent {
    Confirmed {
        reservation_id: String,
        sku: String,
        user_id: String,
        quantity: u64,
        payment_ref: String,
        at_ms: i64,
    },
    Compensation(Compensation),
}

/// Writes a batch of events in one transaction, exactly once in effect.
///
/// For every SKU with confirmations in the batch the `skus` row is locked first (in SKU
/// order, so concurrent batches cannot deadlock on it): flushes of one SKU, and the
/// reconciler's check of it, run one at a time. Under that lock the sales already
/// recorded are looked up; only the others are inserted (a plain INSERT: a duplicate
/// here would be a bug and fails the batch rather than miscount), and `skus.sold`
/// grows by exactly their quantity. So `sold` stays equal to `SUM(sales.quantity)`
/// in O(batch), and a replayed event changes nothing. Compensations are idempotent
/// by their keys (`INSERT IGNORE`).
pub async fn apply_events(pool: &MySqlPool, events: &[OutboxEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut seen = HashSet::new();
    let sales: Vec<Sale<'_>> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Confirmed {
                reservation_id,
                sku,
                user_id,
                quantity,
                payment_ref,
                at_ms,
            } => Some(Sale {
                reservation_id,
                sku,
                user_id,
                quantity: *quantity,
                payment_ref,
                at_ms: *at_ms,
            }),
            OutboxEvent::Compensation(_) => None,
        })
        // One sale per reservation, whatever the batch holds.
        .filter(|s| seen.insert(s.reservation_id))
        .collect();
    let mut tx = pool.begin().await?;
    if !sales.is_empty() {
        let mut skus: Vec<&str> = sales.iter().map(|s| s.sku).collect();
        skus.sort_unstable();
        skus.dedup();
        for sku in &skus {
            sqlx::query("SELECT sold FROM skus WHERE sku = ? FOR UPDATE")
                .bind(*sku)
                .fetch_optional(&mut *tx)
                .await?;
        }
        let rids: Vec<&str> = sales.iter().map(|s| s.reservation_id).collect();
        let recorded = recorded_sales(&mut tx, &rids, None).await?;
        let new: Vec<&Sale<'_>> = sales
            .iter()
            .filter(|s| !recorded.contains(s.reservation_id))
            .collect();
        if !new.is_empty() {
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT INTO sales (reservation_id, sku, user_id, quantity, payment_ref, confirmed_at) ",
            );
            insert.push_values(&new, |mut row, s| {
                row.push_bind(s.reservation_id)
                    .push_bind(s.sku)
                    .push_bind(s.user_id)
                    .push_bind(s.quantity)
                    .push_bind(s.payment_ref)
                    .push_bind(ms_to_datetime(s.at_ms));
            });
            insert.build().execute(&mut *tx).await?;
            for sku in &skus {
                let added: u64 = new
                    .iter()
                    .filter(|s| s.sku == *sku)
                    .map(|s| s.quantity)
                    .sum();
                if added > 0 {
                    sqlx::query("UPDATE skus SET sold = sold + ? WHERE sku = ?")
                        .bind(added)
                        .bind(*sku)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
    }
    let compensations: Vec<&Compensation> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Compensation(c) => Some(c),
            OutboxEvent::Confirmed { .. } => None,
        })
        .collect();
    if !compensations.is_empty() {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO compensations
             (id, reservation_id, sku, user_id, quantity, payment_ref, reason, created_at) ",
        );
        insert.push_values(&compensations, |mut row, c| {
            row.push_bind(&c.id)
                .push_bind(&c.reservation_id)
                .push_bind(&c.sku)
                .push_bind(&c.user_id)
                .push_bind(c.quantity)
                .push_bind(&c.payment_ref)
                .push_bind(c.reason.as_str())
                .push_bind(ms_to_datetime(c.created_at_ms));
        });
        insert.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One confirmation of a batch, borrowed from its event.
struct Sale<'a> {
    reservation_id: &'a str,
    sku: &'a str,
    user_id: &'a str,
    quantity: u64,
    payment_ref: &'a str,
    at_ms: i64,
}

/// Which of these reservations MySQL records as sales (confirmed before `before_ms`,
/// when given).
async fn recorded_sales(
    conn: &mut MySqlConnection,
    reservation_ids: &[&str],
    before_ms: Option<i64>,
) -> Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in reservation_ids.chunks(1000) {
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT reservation_id FROM sales WHERE reservation_id IN (",
        );
        let mut list = query.separated(", ");
        for rid in chunk {
            list.push_bind(*rid);
        }
        query.push(")");
        if let Some(before_ms) = before_ms {
            query
                .push(" AND confirmed_at < ")
                .push_bind(ms_to_datetime(before_ms));
        }
        let rows: Vec<String> = query.build_query_scalar().fetch_all(&mut *conn).await?;
        found.extend(rows);
    }
    Ok(found)
}

const COMPENSATION_COLUMNS: &str =
    "id, reservation_id, sku, user_id, quantity, payment_ref, reason, status, created_at";

fn compensation_from_row(row: &sqlx::mysql::MySqlRow) -> Result<Compensation> {
    let reason: String = row.try_get("reason")?;
    let status: String = row.try_get("status")?;
    Ok(Compensation {
        id: row.try_get("id")?,
        reservation_id: row.try_get("reservation_id")?,
        sku: row.try_get("sku")?,
        user_id: row.try_get("user_id")?,
        quantity: row.try_get::<u32, _>("quantity")? as u64,
        payment_ref: row.try_get("payment_ref")?,
        reason: CompensationReason::parse(&reason)
            .ok_or_else(|| Error::Internal(format!("compensation reason {reason:?}")))?,
        resolved: status == "resolved",
        created_at_ms: datetime_to_ms(row.try_get("created_at")?),
    })
}

/// Oldest first.
pub async fn list_compensations(
    pool: &MySqlPool,
    resolved: Option<bool>,
    sku: Option<&SkuId>,
    limit: u32,
) -> Result<Vec<Compensation>> {
    let mut query = QueryBuilder::<MySql>::new(format!(
        "SELECT {COMPENSATION_COLUMNS} FROM compensations WHERE 1 = 1"
    ));
    if let Some(resolved) = resolved {
        query
            .push(" AND status = ")
            .push_bind(if resolved { "resolved" } else { "open" });
    }
    if let Some(sku) = sku {
        query.push(" AND sku = ").push_bind(sku.as_str());
    }
    query
        .push(" ORDER BY created_at, id LIMIT ")
        .push_bind(limit);
    let rows = query.build().fetch_all(pool).await?;
    rows.iter().map(compensation_from_row).collect()
}

/// Idempotent: resolving a resolved compensation changes nothing.
pub async fn resolve_compensation(pool: &MySqlPool, id: &str) -> Result<Option<Compensation>> {
    sqlx::query(
        "UPDATE compensations SET status = 'resolved', resolved_at = CURRENT_TIMESTAMP(3)
         WHERE id = ? AND status = 'open'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COMPENSATION_COLUMNS} FROM compensations WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(compensation_from_row).transpose()
}

pub async fn open_compensations(pool: &MySqlPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM compensations WHERE status = 'open'")
            .fetch_one(pool)
            .await?,
    )
}

pub async fn ping(pool: &MySqlPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

pub async fn sku_ids(pool: &MySqlPool) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT sku FROM skus")
        .fetch_all(pool)
        .await?)
}

/// Opens the transaction the reconciler checks one SKU in: REPEATABLE READ, so all its
/// plain reads see one snapshot of `sales`.
pub async fn begin_check(conn: &mut MySqlConnection) -> Result<Transaction<'_, MySql>> {
    // Applies to the next transaction of this connection only.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::Connection::begin(conn).await?)
}

/// The SKU's row, locked until the transaction ends: no flush of the SKU commits and
/// no admin write of it applies meanwhile (both lock the same row first).
pub async fn lock_sku_record(conn: &mut MySqlConnection, sku: &SkuId) -> Result<Option<SkuRecord>> {
    let row = sqlx::query(
        "SELECT stock_total, per_user_limit, hold_seconds, starts_at, ends_at, sold
         FROM skus WHERE sku = ? FOR UPDATE",
    )
    .bind(sku.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| sku_record_from_row(&row)).transpose()
}

/// Units of the SKU MySQL records as sold: (all of them, those confirmed before `before_ms`).
pub async fn sales_totals(
    conn: &mut MySqlConnection,
    sku: &SkuId,
    before_ms: i64,
) -> Result<(u64, u64)> {
    let (total, before): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS SIGNED),
                CAST(COALESCE(SUM(CASE WHEN confirmed_at < ? THEN quantity ELSE 0 END), 0) AS SIGNED)
         FROM sales WHERE sku = ?",
    )
    .bind(ms_to_datetime(before_ms))
    .bind(sku.as_str())
    .fetch_one(&mut *conn)
    .await?;
    Ok((total.max(0) as u64, before.max(0) as u64))
}

/// Which of these reservations MySQL records as sales confirmed before `before_ms`.
pub async fn sales_recorded_before(
    conn: &mut MySqlConnection,
    reservation_ids: &[&str],
    before_ms: i64,
) -> Result<HashSet<String>> {
    recorded_sales(conn, reservation_ids, Some(before_ms)).await
}

/// Sets the derived `skus.sold` (the reconciler, when it differs from the sales rows).
pub async fn set_sold(conn: &mut MySqlConnection, sku: &SkuId, sold: u64) -> Result<()> {
    sqlx::query("UPDATE skus SET sold = ? WHERE sku = ?")
        .bind(sold)
        .bind(sku.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub async fn sold_per_user(conn: &mut MySqlConnection, sku: &SkuId) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT user_id, CAST(SUM(quantity) AS SIGNED) FROM sales WHERE sku = ? GROUP BY user_id",
    )
    .bind(sku.as_str())
    .fetch_all(&mut *conn)
    .await?)
}

pub async fn audit(pool: &MySqlPool, finding: &crate::reconcile::Finding) -> Result<()> {
    sqlx::query(
        "INSERT INTO reconcile_audit (sku, finding, detail, before_value, after_value, repaired)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&finding.sku)
    .bind(finding.kind)
    .bind(&finding.detail)
    .bind(&finding.before)
    .bind(&finding.after)
    .bind(finding.repaired)
    .execute(pool)
    .await?;
    Ok(())
}
