//! MySQL, the durable record: SKU definitions, flushed sales and compensations, the
//! reconciliation audit. Never called on the reserve path.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
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
    row.map(|row| {
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
    })
    .transpose()
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

/// Writes a batch of events in one transaction. Replayed events change nothing (the
/// primary key of `sales`, the unique key of `compensations`); `skus.sold` is then
/// recomputed from `sales` for every SKU the batch touched.
pub async fn apply_events(pool: &MySqlPool, events: &[OutboxEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let sales: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Confirmed {
                reservation_id,
                sku,
                user_id,
                quantity,
                payment_ref,
                at_ms,
            } => Some((reservation_id, sku, user_id, quantity, payment_ref, at_ms)),
            OutboxEvent::Compensation(_) => None,
        })
        .collect();
    if !sales.is_empty() {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO sales (reservation_id, sku, user_id, quantity, payment_ref, confirmed_at) ",
        );
        insert.push_values(
            &sales,
            |mut row, (rid, sku, user, quantity, payment_ref, at)| {
                row.push_bind(*rid)
                    .push_bind(*sku)
                    .push_bind(*user)
                    .push_bind(**quantity)
                    .push_bind(*payment_ref)
                    .push_bind(ms_to_datetime(**at));
            },
        );
        insert.build().execute(&mut *tx).await?;
        let mut touched: Vec<&String> = sales.iter().map(|s| s.1).collect();
        touched.sort();
        touched.dedup();
        for sku in touched {
            sqlx::query(
                "UPDATE skus SET sold = (SELECT COALESCE(SUM(quantity), 0) FROM sales WHERE sku = ?)
                 WHERE sku = ?",
            )
            .bind(sku)
            .bind(sku)
            .execute(&mut *tx)
            .await?;
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

/// Units of the SKU MySQL records as confirmed before `before_ms`.
pub async fn sold_before(pool: &MySqlPool, sku: &SkuId, before_ms: i64) -> Result<u64> {
    let total: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS SIGNED) FROM sales WHERE sku = ? AND confirmed_at < ?",
    )
    .bind(sku.as_str())
    .bind(ms_to_datetime(before_ms))
    .fetch_one(pool)
    .await?;
    Ok(total.max(0) as u64)
}

/// Which of these reservations MySQL has as sales.
pub async fn flushed_sales(pool: &MySqlPool, reservation_ids: &[&str]) -> Result<HashSet<String>> {
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
        let rows: Vec<String> = query.build_query_scalar().fetch_all(pool).await?;
        found.extend(rows);
    }
    Ok(found)
}

pub async fn sold_per_user(pool: &MySqlPool, sku: &SkuId) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT user_id, CAST(SUM(quantity) AS SIGNED) FROM sales WHERE sku = ? GROUP BY user_id",
    )
    .bind(sku.as_str())
    .fetch_all(pool)
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
