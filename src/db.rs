//! MySQL, the durable record: SKU definitions, flushed sales and compensations, the
//! reconciliation audit. Never called on the reserve path.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, QueryBuilder, Row, Transaction};
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ids::{self, SkuId};
use crate::limits;
use crate::reservation::{
    Compensation, CompensationReason, Reservation, Resolution, SkuDefinition, Status,
};

pub mod events;
pub mod webhooks;

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
    let _turn = crate::explore::mysql_step("upsert_sku").await;
    sqlx::query(
        "INSERT INTO skus (sku, stock_total, per_user_limit, hold_seconds, starts_at, ends_at,
           buckets, paused, waiting_room)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE stock_total = VALUES(stock_total),
           per_user_limit = VALUES(per_user_limit), hold_seconds = VALUES(hold_seconds),
           starts_at = VALUES(starts_at), ends_at = VALUES(ends_at),
           waiting_room = VALUES(waiting_room)",
    )
    .bind(sku.as_str())
    .bind(definition.stock_total)
    .bind(definition.per_user_limit)
    .bind(definition.hold_seconds)
    .bind(definition.starts_at_ms.map(ms_to_datetime))
    .bind(definition.ends_at_ms.map(ms_to_datetime))
    .bind(definition.buckets)
    .bind(definition.paused)
    .bind(
        definition
            .waiting_room
            .map(|w| serde_json::to_string(&w).expect("plain struct")),
    )
    .execute(&mut **tx)
    .await?;
    let sold: u64 = sqlx::query_scalar("SELECT sold FROM skus WHERE sku = ? FOR UPDATE")
        .bind(sku.as_str())
        .fetch_one(&mut **tx)
        .await?;
    Ok(sold)
}

/// Where a SKU's sale stands: `ended` once its end passed (whatever else), else
/// `paused` while an operator paused it, else `scheduled` before its start, else
/// `on_sale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SkuState {
    OnSale,
    Scheduled,
    Ended,
    Paused,
}

impl SkuState {
    pub fn parse(raw: &str) -> Option<SkuState> {
        Some(match raw {
            "on_sale" => SkuState::OnSale,
            "scheduled" => SkuState::Scheduled,
            "ended" => SkuState::Ended,
            "paused" => SkuState::Paused,
            _ => return None,
        })
    }

    pub fn of(definition: &SkuDefinition, now_ms: i64) -> SkuState {
        if definition.ends_at_ms.is_some_and(|end| end <= now_ms) {
            SkuState::Ended
        } else if definition.paused {
            SkuState::Paused
        } else if definition.starts_at_ms.is_some_and(|start| now_ms < start) {
            SkuState::Scheduled
        } else {
            SkuState::OnSale
        }
    }
}

/// A page of SKU definitions, oldest first (by `seq`), after `after`, in `state` (all
/// when None) at `now_ms`: (seq, SKU, record).
pub async fn list_skus(
    pool: &MySqlPool,
    state: Option<SkuState>,
    after: Option<u64>,
    now_ms: i64,
    limit: u32,
) -> Result<Vec<(u64, SkuId, SkuRecord)>> {
    let _turn = crate::explore::mysql_step("list_skus").await;
    let now = ms_to_datetime(now_ms);
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT seq, sku, stock_total, per_user_limit, hold_seconds, starts_at, ends_at, sold,
           buckets, paused, waiting_room
         FROM skus WHERE seq > ",
    );
    query.push_bind(after.unwrap_or(0));
    let ended = |q: &mut QueryBuilder<MySql>| {
        q.push("(ends_at IS NOT NULL AND ends_at <= ")
            .push_bind(now)
            .push(")");
    };
    match state {
        None => {}
        Some(SkuState::Ended) => {
            query.push(" AND ");
            ended(&mut query);
        }
        Some(other) => {
            query.push(" AND NOT ");
            ended(&mut query);
            match other {
                SkuState::Paused => query.push(" AND paused"),
                SkuState::Scheduled => query
                    .push(" AND NOT paused AND starts_at IS NOT NULL AND starts_at > ")
                    .push_bind(now),
                _ => query
                    .push(" AND NOT paused AND (starts_at IS NULL OR starts_at <= ")
                    .push_bind(now)
                    .push(")"),
            };
        }
    }
    query.push(" ORDER BY seq LIMIT ").push_bind(limit);
    let rows = query.build().fetch_all(pool).await?;
    rows.iter()
        .map(|row| {
            let sku: String = row.try_get("sku")?;
            let sku = SkuId::parse(&sku)
                .ok_or_else(|| Error::Internal(format!("SKU id {sku:?} in MySQL")))?;
            Ok((row.try_get("seq")?, sku, sku_record_from_row(row)?))
        })
        .collect()
}

/// Pauses or resumes a SKU's sale in the record (the caller holds its admin lock).
pub async fn set_paused(conn: &mut MySqlConnection, sku: &SkuId, paused: bool) -> Result<()> {
    let _turn = crate::explore::mysql_step("set_paused").await;
    sqlx::query("UPDATE skus SET paused = ? WHERE sku = ?")
        .bind(paused)
        .bind(sku.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A per-SKU MySQL named lock (GET_LOCK): admin writes of one SKU run one at a time
/// across MySQL commit and Redis apply. Session-scoped, so take it on a connection
/// marked `close_on_drop`: a request cut short cannot leave it held in the pool.
pub struct SkuLock;

impl SkuLock {
    fn name(sku: &SkuId) -> String {
        format!("flashgate:sku:{sku}")
    }

    pub async fn acquire(conn: &mut MySqlConnection, sku: &SkuId) -> Result<()> {
        let _turn = crate::explore::mysql_step("acquire").await;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(Self::name(sku))
            .bind(limits::SKU_LOCK_WAIT_SECONDS)
            .fetch_one(&mut *conn)
            .await?;
        match got {
            Some(1) => Ok(()),
            _ => Err(Error::unavailable(
                "another admin write of this SKU is still running; retry",
                crate::error::Outcome::NotApplied,
            )),
        }
    }

    pub async fn release(conn: &mut MySqlConnection, sku: &SkuId) -> Result<()> {
        let _turn = crate::explore::mysql_step("release").await;
        sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(Self::name(sku))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Writes back the definition a SKU had before a write Redis refused (or removes a
/// SKU that did not exist, when nothing was ever sold of it).
pub async fn restore_sku(
    conn: &mut MySqlConnection,
    sku: &SkuId,
    previous: Option<&SkuRecord>,
) -> Result<()> {
    let _turn = crate::explore::mysql_step("restore_sku").await;
    match previous {
        Some(record) => {
            let d = &record.definition;
            // Every column `upsert_sku` writes, the waiting room too.
            sqlx::query(
                "UPDATE skus SET stock_total = ?, per_user_limit = ?, hold_seconds = ?,
                   starts_at = ?, ends_at = ?, waiting_room = ? WHERE sku = ?",
            )
            .bind(d.stock_total)
            .bind(d.per_user_limit)
            .bind(d.hold_seconds)
            .bind(d.starts_at_ms.map(ms_to_datetime))
            .bind(d.ends_at_ms.map(ms_to_datetime))
            .bind(
                d.waiting_room
                    .map(|w| serde_json::to_string(&w).expect("plain struct")),
            )
            .bind(sku.as_str())
            .execute(&mut *conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM skus WHERE sku = ? AND sold = 0")
                .bind(sku.as_str())
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// A SKU as MySQL records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuRecord {
    pub definition: SkuDefinition,
    pub sold: u64,
}

pub async fn sku_record(pool: &MySqlPool, sku: &SkuId) -> Result<Option<SkuRecord>> {
    let _turn = crate::explore::mysql_step("sku_record").await;
    let row = sqlx::query(
        "SELECT stock_total, per_user_limit, hold_seconds, starts_at, ends_at, sold, buckets, paused,
           waiting_room
         FROM skus WHERE sku = ?",
    )
    .bind(sku.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(|row| sku_record_from_row(&row)).transpose()
}

pub async fn sku_record_in(conn: &mut MySqlConnection, sku: &SkuId) -> Result<Option<SkuRecord>> {
    let _turn = crate::explore::mysql_step("sku_record_in").await;
    let row = sqlx::query(
        "SELECT stock_total, per_user_limit, hold_seconds, starts_at, ends_at, sold, buckets, paused,
           waiting_room
         FROM skus WHERE sku = ?",
    )
    .bind(sku.as_str())
    .fetch_optional(&mut *conn)
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
            buckets: row.try_get("buckets")?,
            // BOOLEAN is TINYINT(1); MariaDB does not always say so to the driver.
            paused: row.try_get::<i8, _>("paused")? != 0,
            waiting_room: row
                .try_get::<Option<String>, _>("waiting_room")?
                .map(|raw| serde_json::from_str(&raw))
                .transpose()
                .map_err(|e| Error::Internal(format!("skus.waiting_room: {e}")))?,
        },
        sold: row.try_get("sold")?,
    })
}

/// One outbox event, as the flush writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEvent {
    /// A sale (the reservation's status is `confirmed`, with its payment_ref).
    Confirmed {
        reservation: Reservation,
        at_ms: i64,
        key: Option<KeyClaim>,
    },
    /// A hold that ended `cancelled` or `expired`.
    Ended {
        reservation: Reservation,
        at_ms: i64,
        key: Option<KeyClaim>,
    },
    Compensation(Compensation),
    /// A compensation resolved before the flush wrote it.
    CompensationResolved {
        id: String,
        resolution: Resolution,
    },
    /// `available` reached 0 (`sold_out`) or came back above 0 after that
    /// (lua/lib.lua announce_stock): outbox entry `stream_id` of the sale `sale`, with
    /// the counters right after the crossing.
    StockCrossed {
        sold_out: bool,
        sale: String,
        stream_id: String,
        sku: String,
        counters: StockCounters,
        at_ms: i64,
    },
}

/// A SKU's counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockCounters {
    pub stock_total: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

/// The idempotency key that made a reservation, and until when (ms) it replays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    pub key: String,
    pub keep_until_ms: i64,
}

/// An ended reservation whose idempotency key still replays it: what a rebuild puts
/// back into the user's usage record (`Store::restore_usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedClaim {
    pub reservation_id: String,
    pub user_id: String,
    pub quantity: u64,
    pub claim: KeyClaim,
}

/// Who found a payment that could not become a sale (`compensations.found_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundBy {
    /// The confirm script, on a reservation Redis has.
    Gateway,
    /// The gateway, from MySQL's record of a reservation Redis forgot (or never kept).
    Record,
    /// The flush: MySQL already records the sale under another payment_ref.
    Flush,
}

impl FoundBy {
    fn as_str(self) -> &'static str {
        match self {
            FoundBy::Gateway => "gateway",
            FoundBy::Record => "record",
            FoundBy::Flush => "flush",
        }
    }
}

/// What a flushed batch did besides writing sales.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// Compensations the flush itself recorded, for payments Redis took but MySQL
    /// cannot make sales (both only after a Redis rollback): a second payment for a
    /// reservation MySQL records as sold under another payment_ref
    /// (`duplicate_payment`), or a sale of units MySQL records as sold to other
    /// reservations (`cancelled`: the whole stock is sold, so MySQL records the
    /// reservation cancelled).
    pub refused_payments: Vec<Compensation>,
    /// The events written (those MySQL had already are not).
    pub events: Vec<crate::events::Event>,
    /// Nothing was written: `in_order` said an earlier outbox entry of the SKU is not
    /// in MySQL yet (pending on another consumer). The batch waits for it.
    pub out_of_order: bool,
    /// Nothing was written: a sale would be refused for lack of stock, which only
    /// MySQL's settled stock may decide. Apply the batch again under the admin locks.
    pub needs_admin_locks: bool,
}

/// Asked by `apply_events_in_order` under the SKU's locks, before anything is written:
/// true when every earlier outbox entry of the batch's sale is in MySQL.
pub type OrderCheck<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send + 'a>>;

/// Writes a batch of events in one transaction, exactly once in effect.
///
/// For every SKU with confirmations in the batch the `skus` row is locked first (in SKU
/// order, so concurrent batches cannot deadlock on it): flushes of one SKU, and the
/// reconciler's check of it, run one at a time. Under that lock the sales already
/// recorded are looked up; only the others are inserted (a plain INSERT: a duplicate
/// here would be a bug and fails the batch rather than miscount), and `skus.sold`
/// grows by exactly their quantity. So `sold` stays equal to `SUM(sales.quantity)`
/// in O(batch), and a replayed event changes nothing.
///
/// A confirmation of a reservation MySQL records as sold under *another* payment_ref
/// (Redis lost the first confirmation, a rollback, and accepted a second payment) is
/// a payment that cannot become a sale: it becomes a `duplicate_payment` compensation
/// whose id derives from (reservation, payment_ref), so a replay cannot make two.
/// Compensations are idempotent by their keys (`INSERT IGNORE`); ended reservations
/// are recorded once, and a sale's record is never overwritten.
pub async fn apply_events(pool: &MySqlPool, events: &[OutboxEvent]) -> Result<Applied> {
    let applied = apply_events_in_order(pool, events, None, false).await?;
    if applied.needs_admin_locks {
        return apply_events_in_order(pool, events, None, true).await;
    }
    Ok(applied)
}

/// `apply_events`, and each fact's event (src/events.rs) in the same transaction, in
/// the batch's order. `in_order` (the flush's check that no earlier entry of the
/// stream is still pending elsewhere) runs once the SKU's row is locked: a batch that
/// overtook an earlier one writes nothing (`Applied::out_of_order`), so a SKU's
/// sequence numbers follow the order of its outbox.
///
/// `under_admin_locks`: the batch runs holding the admin lock (`SkuLock`) of each of its
/// SKUs, so no admin PUT is half-way (MySQL's new stock committed, Redis not loaded
/// yet, or the PUT about to be taken back): asked for (`Applied::needs_admin_locks`)
/// when a sale would be refused for lack of stock, so that only MySQL's settled stock
/// refuses one. Rare (a Redis rollback), so the flush pays for those locks only then.
pub async fn apply_events_in_order(
    pool: &MySqlPool,
    events: &[OutboxEvent],
    in_order: Option<OrderCheck<'_>>,
    under_admin_locks: bool,
) -> Result<Applied> {
    if events.is_empty() {
        return Ok(Applied::default());
    }
    let mut conn = pool.acquire().await?;
    if !under_admin_locks {
        return apply_on(&mut conn, events, in_order, false).await;
    }
    // A connection that fails while it holds a named lock is closed, not pooled.
    conn.close_on_drop();
    let mut skus: Vec<SkuId> = events
        .iter()
        .filter_map(|e| SkuId::parse(event_sku(e)?))
        .collect();
    skus.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    skus.dedup_by(|a, b| a.as_str() == b.as_str());
    for sku in &skus {
        SkuLock::acquire(&mut conn, sku).await?;
    }
    let applied = apply_on(&mut conn, events, in_order, true).await;
    for sku in skus.iter().rev() {
        SkuLock::release(&mut conn, sku).await?;
    }
    applied
}

/// The SKU whose row a batch's event locks (none for a resolve).
fn event_sku(event: &OutboxEvent) -> Option<&str> {
    match event {
        OutboxEvent::Confirmed { reservation, .. } | OutboxEvent::Ended { reservation, .. } => {
            Some(reservation.sku.as_str())
        }
        OutboxEvent::Compensation(c) => Some(c.sku.as_str()),
        OutboxEvent::StockCrossed { sku, .. } => Some(sku.as_str()),
        OutboxEvent::CompensationResolved { .. } => None,
    }
}

async fn apply_on(
    conn: &mut MySqlConnection,
    events: &[OutboxEvent],
    in_order: Option<OrderCheck<'_>>,
    under_admin_locks: bool,
) -> Result<Applied> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let applied = apply_in(&mut tx, events, in_order, under_admin_locks).await?;
    finish_apply(tx, &applied).await?;
    Ok(applied)
}

/// Commits what `apply_in` wrote, or rolls back when it wrote nothing.
pub async fn finish_apply(tx: Transaction<'_, MySql>, applied: &Applied) -> Result<()> {
    if applied.out_of_order || applied.needs_admin_locks {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(())
}

/// The flush's transaction, begun with the SKU's row locked before the flush reads the
/// batch it writes. A rebuild of a lost sale (the reconciler's, an admin PUT's:
/// `lock_sku_sold`) reads MySQL under the same lock, so it runs before that
/// read or after the commit (it reads what the batch wrote), never in between, where
/// a key of the batch would be in neither Redis nor MySQL and could make a second hold
/// (contract invariant 3). For a SKU MySQL lacks (a restore lost its row while Redis
/// kept the sale; nothing rebuilds it) the gap where the row would be is locked: a new
/// SKU whose id falls in it waits for the commit.
pub async fn begin_flush<'c>(
    conn: &'c mut MySqlConnection,
    sale: &SkuId,
) -> Result<Transaction<'c, MySql>> {
    let _turn = crate::explore::mysql_step("flush: lock the SKU").await;
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("SELECT sku FROM skus WHERE sku = ? FOR UPDATE")
        .bind(sale.sku().as_str())
        .fetch_optional(&mut *tx)
        .await?;
    Ok(tx)
}

/// `apply_events_in_order` in the caller's transaction (`finish_apply` ends it): with
/// `out_of_order` or `needs_admin_locks` nothing was written.
pub async fn apply_in(
    tx: &mut MySqlConnection,
    events: &[OutboxEvent],
    in_order: Option<OrderCheck<'_>>,
    under_admin_locks: bool,
) -> Result<Applied> {
    // The explorer's steps: up to the order check, the check (a Redis command), the
    // rest of the writes, the events (db::events::write).
    let turn = crate::explore::mysql_step("apply_events").await;
    let mut applied = Applied::default();
    let confirmations: Vec<&Reservation> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Confirmed { reservation, .. } => Some(reservation),
            _ => None,
        })
        .collect();
    let mut compensations: Vec<(&Compensation, FoundBy)> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Compensation(c) => Some((c, FoundBy::Gateway)),
            _ => None,
        })
        .collect();
    // Every SKU of the batch is locked first, not only those with sales: a reconciler
    // check holds the same lock, and while it runs no event of its SKU may be written
    // (and so trimmed from the outbox), which its sliced read relies on (reconcile.rs).
    let mut locked: Vec<&str> = events.iter().filter_map(event_sku).collect();
    locked.sort_unstable();
    locked.dedup();
    // SKU -> units it can still sell in MySQL (stock_total - sold), read under the lock.
    let mut unsold: HashMap<&str, u64> = HashMap::new();
    for sku in &locked {
        let row: Option<(u64, u64)> =
            sqlx::query_as("SELECT stock_total, sold FROM skus WHERE sku = ? FOR UPDATE")
                .bind(*sku)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((stock_total, sold)) = row {
            unsold.insert(*sku, stock_total.saturating_sub(sold));
        }
    }
    drop(turn);
    if let Some(check) = in_order {
        if !check.await? {
            applied.out_of_order = true;
            return Ok(applied);
        }
    }
    let turn = crate::explore::mysql_step("apply_events (writes)").await;
    // Ends of reservations MySQL records as sold: the sale stands, no end is reported.
    let ended_rids: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Ended { reservation, .. } => Some(reservation.reservation_id.as_str()),
            _ => None,
        })
        .collect();
    let sold_before: HashSet<String> = if ended_rids.is_empty() {
        HashSet::new()
    } else {
        recorded_sales(&mut *tx, &ended_rids, None)
            .await?
            .into_keys()
            .collect()
    };
    // Confirmations of payments that are not sales: (rid, payment_ref) -> why.
    let mut not_sales: HashMap<(String, String), NotSale> = HashMap::new();
    if !confirmations.is_empty() {
        let mut skus: Vec<&str> = confirmations.iter().map(|r| r.sku.as_str()).collect();
        skus.sort_unstable();
        skus.dedup();
        let rids: Vec<&str> = confirmations
            .iter()
            .map(|r| r.reservation_id.as_str())
            .collect();
        // reservation id -> the payment_ref its sale is recorded under
        let mut sold_under: HashMap<String, String> = recorded_sales(&mut *tx, &rids, None).await?;
        // Payments whose outcome MySQL already records as a compensation.
        let refunded = compensated_payments(&mut *tx, &rids).await?;
        let mut new: Vec<&Reservation> = Vec::new();
        for r in &confirmations {
            let payment_ref = r.payment_ref.as_deref().unwrap_or_default();
            let refused = |reason| Compensation {
                id: ids::compensation_id(&r.reservation_id, payment_ref),
                reservation_id: r.reservation_id.clone(),
                sku: r.sku.clone(),
                user_id: r.user_id.clone(),
                quantity: r.quantity,
                payment_ref: payment_ref.to_owned(),
                reason,
                resolved: false,
                created_at_ms: confirmed_at(events, &r.reservation_id, payment_ref),
                resolution: Resolution::default(),
            };
            let payment = (r.reservation_id.clone(), payment_ref.to_owned());
            match sold_under.get(&r.reservation_id) {
                Some(recorded) if recorded == payment_ref => {} // a replayed event
                Some(_) => applied
                    .refused_payments
                    .push(refused(CompensationReason::DuplicatePayment)),
                // One payment, one outcome: a payment MySQL records as refunded (a
                // replay after it was refused below, or a rollback that let it pay a
                // hold that had ended) stays refunded.
                None if refunded.contains(&payment) => {
                    not_sales.insert(payment, NotSale::RefundedAlready);
                }
                None => {
                    // Only a Redis rollback resells units MySQL records as sold (a unit
                    // sold and flushed, then forgotten): the later sale is refused, so
                    // MySQL never records more sales than the stock (invariant 2).
                    let room = unsold.entry(r.sku.as_str()).or_insert(u64::MAX);
                    if r.quantity > *room {
                        if !under_admin_locks {
                            applied.needs_admin_locks = true;
                            return Ok(applied);
                        }
                        applied
                            .refused_payments
                            .push(refused(CompensationReason::Cancelled));
                        not_sales.insert(payment, NotSale::NoStock);
                        continue;
                    }
                    *room -= r.quantity;
                    sold_under.insert(r.reservation_id.clone(), payment_ref.to_owned());
                    new.push(r);
                }
            }
        }
        if !new.is_empty() {
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT INTO sales (reservation_id, sku, user_id, quantity, payment_ref, confirmed_at) ",
            );
            insert.push_values(&new, |mut row, r| {
                row.push_bind(&r.reservation_id)
                    .push_bind(&r.sku)
                    .push_bind(&r.user_id)
                    .push_bind(r.quantity)
                    .push_bind(r.payment_ref.as_deref().unwrap_or_default())
                    .push_bind(ms_to_datetime(confirmed_at(
                        events,
                        &r.reservation_id,
                        r.payment_ref.as_deref().unwrap_or_default(),
                    )));
            });
            insert.build().execute(&mut *tx).await?;
            for sku in &skus {
                let added: u64 = new
                    .iter()
                    .filter(|r| r.sku == *sku)
                    .map(|r| r.quantity)
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
    compensations.extend(applied.refused_payments.iter().map(|c| (c, FoundBy::Flush)));
    insert_compensations(&mut *tx, &compensations).await?;
    record_reservations(&mut *tx, events, &not_sales).await?;
    record_refunded_payments(&mut *tx, events, &not_sales).await?;
    let voided = void_refunds_of_sales(&mut *tx, events).await?;
    // Resolves made before the flush wrote the compensation (one row each: rare).
    let mut resolved: HashMap<&str, Compensation> = HashMap::new();
    for event in events {
        if let OutboxEvent::CompensationResolved { id, resolution } = event {
            let done = sqlx::query(
                "UPDATE compensations SET status = 'resolved',
                   resolved_at = COALESCE(?, CURRENT_TIMESTAMP(3)), refund_ref = ?, note = ?
                 WHERE status = 'open' AND id = ?",
            )
            .bind(resolution.at_ms.map(ms_to_datetime))
            .bind(resolution.refund_ref.as_deref())
            .bind(resolution.note.as_deref())
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() > 0 {
                if let Some(c) = compensation_in(&mut *tx, id).await? {
                    resolved.insert(id.as_str(), c);
                }
            }
        }
    }
    // Each fact's event, in the order of the batch (the order Redis made them).
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut skus: HashMap<&str, Option<SkuRecord>> = HashMap::new();
    // The last stock crossing announced per SKU (`skus.announced_sold_out`): MySQL is
    // its authority. A rebuild or a Redis loss forgets Redis's flag and may announce a
    // crossing again, or stock back that was never announced sold out: neither is an
    // event.
    let mut announced: HashMap<&str, (Option<bool>, bool)> = HashMap::new();
    // Per split SKU: its buckets out of stock (`skus.buckets_sold_out`), and whether
    // this batch changed them.
    let mut buckets_out: HashMap<&str, (u32, bool)> = HashMap::new();
    let mut new_events = Vec::new();
    for event in events {
        match event {
            OutboxEvent::Confirmed {
                reservation, at_ms, ..
            } => {
                let payment_ref = reservation.payment_ref.as_deref().unwrap_or_default();
                let payment = (reservation.reservation_id.clone(), payment_ref.to_owned());
                match applied.refused_payments.iter().find(|c| {
                    c.reservation_id == reservation.reservation_id && c.payment_ref == payment_ref
                }) {
                    Some(c) => {
                        if not_sales.get(&payment) == Some(&NotSale::NoStock) {
                            // As MySQL records it: cancelled, and its payment refunded.
                            let cancelled = Reservation {
                                status: Status::Cancelled,
                                ..reservation.clone()
                            };
                            new_events.extend(crate::events::reservation_ended(&cancelled, *at_ms));
                        }
                        new_events.push(crate::events::compensation_created(c));
                    }
                    // Refunded already: its compensation.created was written then.
                    None if not_sales.contains_key(&payment) => {}
                    None => {
                        new_events.extend(crate::events::reservation_ended(reservation, *at_ms))
                    }
                }
            }
            OutboxEvent::Ended {
                reservation, at_ms, ..
            } => {
                if !sold_before.contains(&reservation.reservation_id) {
                    new_events.extend(crate::events::reservation_ended(reservation, *at_ms));
                }
            }
            OutboxEvent::Compensation(c) => {
                new_events.push(crate::events::compensation_created(c));
                if let Some(void) = voided.iter().find(|v| v.id == c.id) {
                    new_events.push(crate::events::compensation_resolved(void, now_ms));
                }
            }
            OutboxEvent::CompensationResolved { id, .. } => {
                if let Some(c) = resolved.get(id.as_str()) {
                    new_events.push(crate::events::compensation_resolved(c, now_ms));
                }
            }
            OutboxEvent::StockCrossed {
                sold_out,
                sale,
                stream_id,
                sku,
                counters,
                at_ms,
            } => {
                if !skus.contains_key(sku.as_str()) {
                    let record = match SkuId::parse(sku) {
                        Some(id) => sku_record_in(&mut *tx, &id).await?,
                        None => None,
                    };
                    skus.insert(sku.as_str(), record);
                }
                let Some(record) = skus.get(sku.as_str()).cloned().flatten() else {
                    continue; // a SKU MySQL does not know has no view to report
                };
                let k = record.definition.buckets;
                // A bucket's crossing is the SKU's only when it makes every bucket out,
                // or the first one back.
                let sold_out = if k > 1 {
                    let bits = match buckets_out.get(sku.as_str()) {
                        Some((bits, _)) => *bits,
                        None => buckets_sold_out_in(&mut *tx, sku).await?,
                    };
                    let bit = 1u32 << crate::buckets::bucket_of_tag(sale).min(k - 1);
                    let next = if *sold_out { bits | bit } else { bits & !bit };
                    let all = (1u32 << k) - 1;
                    let changed = buckets_out.get(sku.as_str()).is_some_and(|(_, c)| *c);
                    buckets_out.insert(sku.as_str(), (next, changed || next != bits));
                    if (bits == all) == (next == all) {
                        continue;
                    }
                    next == all
                } else {
                    *sold_out
                };
                let sold_out = &sold_out;
                let last = match announced.get(sku.as_str()) {
                    Some((last, _)) => *last,
                    None => announced_sold_out_in(&mut *tx, sku).await?,
                };
                let repeat = if *sold_out {
                    last == Some(true)
                } else {
                    last != Some(true)
                };
                if repeat {
                    announced.entry(sku.as_str()).or_insert((last, false));
                    continue;
                }
                announced.insert(sku.as_str(), (Some(*sold_out), true));
                let d = &record.definition;
                // A bucket's counters are not the SKU's: its stock and what MySQL
                // records as sold (this batch's sales included), `available` the
                // bucket's own (0 when every bucket is out), held the rest.
                let counters = if k > 1 {
                    let available = if *sold_out { 0 } else { counters.available };
                    StockCounters {
                        stock_total: d.stock_total,
                        available,
                        held: d.stock_total.saturating_sub(record.sold + available),
                        sold: record.sold,
                    }
                } else {
                    *counters
                };
                let view = crate::reservation::Sku {
                    sku: sku.clone(),
                    stock_total: counters.stock_total,
                    available: counters.available,
                    held: counters.held,
                    sold: counters.sold,
                    per_user_limit: d.per_user_limit,
                    hold_seconds: d.hold_seconds,
                    starts_at_ms: d.starts_at_ms,
                    ends_at_ms: d.ends_at_ms,
                    paused: d.paused,
                    waiting_room: d.waiting_room,
                };
                new_events.push(crate::events::stock_crossed(
                    *sold_out, sale, stream_id, &view, *at_ms,
                ));
            }
        }
    }
    for (sku, (state, changed)) in &announced {
        if *changed {
            sqlx::query("UPDATE skus SET announced_sold_out = ? WHERE sku = ?")
                .bind(*state)
                .bind(*sku)
                .execute(&mut *tx)
                .await?;
        }
    }
    for (sku, (bits, changed)) in &buckets_out {
        if *changed {
            sqlx::query("UPDATE skus SET buckets_sold_out = ? WHERE sku = ?")
                .bind(*bits)
                .bind(*sku)
                .execute(&mut *tx)
                .await?;
        }
    }
    drop(turn);
    applied.events = events::write(&mut *tx, new_events, now_ms).await?;
    Ok(applied)
}

/// The SKU's last announced crossing: Some(true) sold out, Some(false) stock back, None
/// never (the flush reads it under the SKU's row lock).
pub async fn announced_sold_out_in(conn: &mut MySqlConnection, sku: &str) -> Result<Option<bool>> {
    let state: Option<Option<bool>> =
        sqlx::query_scalar("SELECT announced_sold_out FROM skus WHERE sku = ?")
            .bind(sku)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(state.flatten())
}

/// The buckets of a split SKU that last announced themselves out of stock: bit b for
/// bucket b (migrations/0011).
pub async fn buckets_sold_out_in(conn: &mut MySqlConnection, sku: &str) -> Result<u32> {
    let bits: Option<u32> = sqlx::query_scalar("SELECT buckets_sold_out FROM skus WHERE sku = ?")
        .bind(sku)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(bits.unwrap_or(0))
}

async fn compensation_in(conn: &mut MySqlConnection, id: &str) -> Result<Option<Compensation>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COMPENSATION_COLUMNS} FROM compensations WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(compensation_from_row).transpose()
}

/// When the confirmation of (reservation, payment_ref) in this batch was made.
fn confirmed_at(events: &[OutboxEvent], reservation_id: &str, payment_ref: &str) -> i64 {
    events
        .iter()
        .find_map(|e| match e {
            OutboxEvent::Confirmed {
                reservation, at_ms, ..
            } if reservation.reservation_id == reservation_id
                && reservation.payment_ref.as_deref() == Some(payment_ref) =>
            {
                Some(*at_ms)
            }
            _ => None,
        })
        .unwrap_or_default()
}

async fn insert_compensations(
    conn: &mut MySqlConnection,
    compensations: &[(&Compensation, FoundBy)],
) -> Result<()> {
    if compensations.is_empty() {
        return Ok(());
    }
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT IGNORE INTO compensations
         (id, reservation_id, sku, user_id, quantity, payment_ref, reason, created_at, found_by) ",
    );
    insert.push_values(compensations, |mut row, (c, found_by)| {
        row.push_bind(&c.id)
            .push_bind(&c.reservation_id)
            .push_bind(&c.sku)
            .push_bind(&c.user_id)
            .push_bind(c.quantity)
            .push_bind(&c.payment_ref)
            .push_bind(c.reason.as_str())
            .push_bind(ms_to_datetime(c.created_at_ms))
            .push_bind(found_by.as_str());
    });
    insert.build().execute(&mut *conn).await?;
    Ok(())
}

/// The note of a refund the flush resolved because its payment is the reservation's
/// sale: no refund is due (the explorer's one-payment-one-outcome check reads it).
pub const NO_REFUND_DUE: &str =
    "no refund due: MySQL records this payment as the reservation's sale (Redis had gone back to before it)";

/// Refunds the confirm script made for payments MySQL records as the reservation's
/// sale: Redis went back to before that sale (a rollback), the hold then expired or
/// was cancelled there, and a retry of the same payment was refused. The payment is
/// the sale; its refund is recorded resolved with NO_REFUND_DUE (the 409's
/// compensation id still reads), so one payment keeps one outcome. Rare: one
/// indexed read per batch with compensations.
async fn void_refunds_of_sales(
    conn: &mut MySqlConnection,
    events: &[OutboxEvent],
) -> Result<Vec<Compensation>> {
    let refunds: Vec<&Compensation> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Compensation(c) => Some(c),
            _ => None,
        })
        .collect();
    if refunds.is_empty() {
        return Ok(Vec::new());
    }
    let rids: Vec<&str> = refunds.iter().map(|c| c.reservation_id.as_str()).collect();
    let sold_under = recorded_sales(conn, &rids, None).await?;
    let mut voided = Vec::new();
    for c in refunds {
        if sold_under.get(&c.reservation_id) != Some(&c.payment_ref) {
            continue;
        }
        let done = sqlx::query(
            "UPDATE compensations SET status = 'resolved', resolved_at = CURRENT_TIMESTAMP(3),
               note = ? WHERE status = 'open' AND id = ?",
        )
        .bind(NO_REFUND_DUE)
        .bind(&c.id)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() > 0 {
            tracing::warn!(
                compensation = %c.id,
                reservation = %c.reservation_id,
                "a refund Redis answered after a rollback is for a payment MySQL records as the sale: resolved, no refund due"
            );
            if let Some(void) = compensation_in(conn, &c.id).await? {
                voided.push(void);
            }
        }
    }
    Ok(voided)
}

/// Confirmations of payments MySQL records as refunded already: refunds the gateway
/// recorded from MySQL's record while Redis had forgotten the hold (`confirm_forgotten`).
/// A refund for a hold MySQL had no record of was recorded without its user and units
/// (`''`, 0); the confirmation knows them: the refund gets them, and the reservation is
/// recorded (if MySQL has no record of it) as the refund's reason says it ended, with
/// the key that made it, so the refund names a reservation a read finds. No event: the
/// refund's was written when it was recorded. Rare: one statement pair each.
async fn record_refunded_payments(
    conn: &mut MySqlConnection,
    events: &[OutboxEvent],
    not_sales: &HashMap<(String, String), NotSale>,
) -> Result<()> {
    for event in events {
        let OutboxEvent::Confirmed {
            reservation: r,
            at_ms,
            key,
        } = event
        else {
            continue;
        };
        let payment_ref = r.payment_ref.clone().unwrap_or_default();
        let payment = (r.reservation_id.clone(), payment_ref);
        if not_sales.get(&payment) != Some(&NotSale::RefundedAlready) {
            continue;
        }
        sqlx::query(
            "UPDATE compensations SET user_id = ?, quantity = ?
             WHERE reservation_id = ? AND payment_ref = ? AND user_id = '' AND quantity = 0
               AND status = 'open'",
        )
        .bind(&r.user_id)
        .bind(r.quantity)
        .bind(&payment.0)
        .bind(&payment.1)
        .execute(&mut *conn)
        .await?;
        // With the key that made it: a rebuild puts the key back (`ended_claims`), so
        // the key replays this reservation rather than make another hold.
        sqlx::query(
            "INSERT INTO reservations
             (reservation_id, sku, user_id, quantity, status, created_at, expires_at, ended_at,
              idempotency_key, keep_until)
             SELECT ?, ?, ?, ?, reason, ?, ?, ?, ?, ?
             FROM compensations
             WHERE reservation_id = ? AND payment_ref = ? AND reason IN ('expired', 'cancelled')
             ON DUPLICATE KEY UPDATE reservation_id = reservations.reservation_id",
        )
        .bind(&r.reservation_id)
        .bind(&r.sku)
        .bind(&r.user_id)
        .bind(r.quantity)
        .bind(ms_to_datetime(r.created_at_ms))
        .bind(ms_to_datetime(r.expires_at_ms))
        .bind(ms_to_datetime(*at_ms))
        .bind(key.as_ref().map(|k| k.key.as_str()))
        .bind(key.as_ref().map(|k| ms_to_datetime(k.keep_until_ms)))
        .bind(&payment.0)
        .bind(&payment.1)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Why the flush did not make a confirmation a sale (besides a duplicate payment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotSale {
    /// MySQL records the whole stock as sold: refused, refunded, recorded `cancelled`.
    NoStock,
    /// MySQL records this payment as refunded already: one payment, one outcome.
    RefundedAlready,
}

/// Records every ended reservation of the batch. A sale's record is never overwritten
/// (after a Redis rollback the same hold may end again, differently); an earlier
/// cancelled/expired record gives way to a sale. A confirmation refused for lack of
/// stock is recorded `cancelled` (with its key); one whose payment was refunded
/// already leaves the record as it is.
async fn record_reservations(
    conn: &mut MySqlConnection,
    events: &[OutboxEvent],
    not_sales: &HashMap<(String, String), NotSale>,
) -> Result<()> {
    let not_sale = |r: &Reservation| {
        not_sales
            .get(&(
                r.reservation_id.clone(),
                r.payment_ref.clone().unwrap_or_default(),
            ))
            .copied()
    };
    let ended: Vec<(&Reservation, i64, &Option<KeyClaim>)> = events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Confirmed {
                reservation,
                at_ms,
                key,
            } if not_sale(reservation) != Some(NotSale::RefundedAlready) => {
                Some((reservation, *at_ms, key))
            }
            OutboxEvent::Ended {
                reservation,
                at_ms,
                key,
            } => Some((reservation, *at_ms, key)),
            _ => None,
        })
        .collect();
    if ended.is_empty() {
        return Ok(());
    }
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT INTO reservations
         (reservation_id, sku, user_id, quantity, status, payment_ref, created_at, expires_at,
          ended_at, idempotency_key, keep_until) ",
    );
    insert.push_values(&ended, |mut row, (r, at_ms, key)| {
        row.push_bind(&r.reservation_id)
            .push_bind(&r.sku)
            .push_bind(&r.user_id)
            .push_bind(r.quantity)
            .push_bind(if not_sale(r) == Some(NotSale::NoStock) {
                Status::Cancelled.as_str()
            } else {
                r.status.as_str()
            })
            .push_bind(r.payment_ref.as_deref())
            .push_bind(ms_to_datetime(r.created_at_ms))
            .push_bind(ms_to_datetime(r.expires_at_ms))
            .push_bind(ms_to_datetime(*at_ms))
            .push_bind(key.as_ref().map(|k| k.key.as_str()))
            .push_bind(key.as_ref().map(|k| ms_to_datetime(k.keep_until_ms)));
    });
    // Assignments run left to right: `status` last, so the others still see the old one.
    insert.push(
        " ON DUPLICATE KEY UPDATE
           idempotency_key = COALESCE(idempotency_key, VALUES(idempotency_key)),
           keep_until = COALESCE(keep_until, VALUES(keep_until)),
           payment_ref = IF(status = 'confirmed', payment_ref, VALUES(payment_ref)),
           ended_at = IF(status = 'confirmed', ended_at, VALUES(ended_at)),
           status = IF(status = 'confirmed', status, VALUES(status))",
    );
    insert.build().execute(&mut *conn).await?;
    Ok(())
}

/// The (reservation, payment_ref) pairs of these reservations that MySQL records as
/// compensations: payments whose outcome is a refund.
pub async fn compensated_payments(
    conn: &mut MySqlConnection,
    reservation_ids: &[&str],
) -> Result<HashSet<(String, String)>> {
    Ok(payments_in(conn, "compensations", reservation_ids, None)
        .await?
        .into_iter()
        .collect())
}

/// Which of these reservations MySQL records as sales (confirmed before `before_ms`,
/// when given), with the payment_ref of each.
async fn recorded_sales(
    conn: &mut MySqlConnection,
    reservation_ids: &[&str],
    before_ms: Option<i64>,
) -> Result<HashMap<String, String>> {
    let before = before_ms.map(|ms| ("confirmed_at", ms));
    Ok(payments_in(conn, "sales", reservation_ids, before)
        .await?
        .into_iter()
        .collect())
}

/// The (reservation, payment_ref) rows of `table` ("sales" or "compensations") for these
/// reservations, those with `column` before the instant when `before` names one.
async fn payments_in(
    conn: &mut MySqlConnection,
    table: &'static str,
    reservation_ids: &[&str],
    before: Option<(&'static str, i64)>,
) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for chunk in reservation_ids.chunks(1000) {
        let mut query = QueryBuilder::<MySql>::new(format!(
            "SELECT reservation_id, payment_ref FROM {table} WHERE reservation_id IN ("
        ));
        let mut list = query.separated(", ");
        for rid in chunk {
            list.push_bind(*rid);
        }
        query.push(")");
        if let Some((column, ms)) = before {
            query
                .push(format!(" AND {column} < "))
                .push_bind(ms_to_datetime(ms));
        }
        let rows: Vec<(String, String)> = query.build_query_as().fetch_all(&mut *conn).await?;
        found.extend(rows);
    }
    Ok(found)
}

/// What MySQL records of a SKU's users for a rebuild of its sales: the units each user
/// bought, and the ended reservations whose keys still replay them.
#[derive(Debug, Default)]
pub struct RecordedUsage {
    pub bought: Vec<(String, i64)>,
    pub claims: Vec<EndedClaim>,
}

/// The SKU's row locked until the transaction ends, and the units MySQL records as
/// sold (`skus.sold`; 0 without a row). A flush that read a batch of the SKU before
/// Redis lost it holds the lock until it commits (`begin_flush`), so what is read
/// under it includes that batch; a flush that reads later waits for the transaction.
/// For a rebuild of a sale that holds no lock of its own (an admin PUT's).
pub async fn lock_sku_sold<'c>(
    conn: &'c mut MySqlConnection,
    sku: &SkuId,
) -> Result<(Transaction<'c, MySql>, u64)> {
    let _turn = crate::explore::mysql_step("lock_sku_sold").await;
    let mut tx = sqlx::Connection::begin(conn).await?;
    let sold: Option<u64> = sqlx::query_scalar("SELECT sold FROM skus WHERE sku = ? FOR UPDATE")
        .bind(sku.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    Ok((tx, sold.unwrap_or(0)))
}

/// `recorded_usage` read under the SKU's row lock (`lock_sku_sold`).
pub async fn recorded_usage_locked(
    conn: &mut MySqlConnection,
    sku: &SkuId,
) -> Result<RecordedUsage> {
    let (mut tx, _) = lock_sku_sold(conn, sku).await?;
    let usage = recorded_usage(&mut tx, sku).await?;
    tx.commit().await?;
    Ok(usage)
}

pub async fn recorded_usage(conn: &mut MySqlConnection, sku: &SkuId) -> Result<RecordedUsage> {
    Ok(RecordedUsage {
        bought: sold_per_user(&mut *conn, sku).await?,
        claims: ended_claims(&mut *conn, sku).await?,
    })
}

/// The ended reservations of a SKU whose idempotency key may still replay them, for a
/// rebuild to restore (restore_usage.lua drops those past their time by Redis's clock;
/// here a minute of skew between the hosts' clocks and Redis's is allowed for).
pub async fn ended_claims(conn: &mut MySqlConnection, sku: &SkuId) -> Result<Vec<EndedClaim>> {
    let _turn = crate::explore::mysql_step("ended_claims").await;
    let since_ms = chrono::Utc::now().timestamp_millis() - 60_000;
    let rows: Vec<(String, String, u32, String, NaiveDateTime)> = sqlx::query_as(
        "SELECT reservation_id, user_id, quantity, idempotency_key, keep_until
         FROM reservations
         WHERE sku = ? AND keep_until > ? AND idempotency_key IS NOT NULL
         ORDER BY keep_until DESC LIMIT ?",
    )
    .bind(sku.as_str())
    .bind(ms_to_datetime(since_ms))
    .bind(crate::limits::RESTORE_CLAIMS_MAX)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(reservation_id, user_id, quantity, key, keep_until)| EndedClaim {
                reservation_id,
                user_id,
                quantity: quantity as u64,
                claim: KeyClaim {
                    key,
                    keep_until_ms: datetime_to_ms(keep_until),
                },
            },
        )
        .collect())
}

/// A reservation as MySQL records it: from `reservations` (every ended one), or from
/// `sales` for a sale flushed before that table existed.
pub async fn reservation(pool: &MySqlPool, reservation_id: &str) -> Result<Option<Reservation>> {
    let _turn = crate::explore::mysql_step("reservation").await;
    let row = sqlx::query(
        "SELECT sku, user_id, quantity, CAST(status AS CHAR) AS status, payment_ref, created_at,
                expires_at
         FROM reservations WHERE reservation_id = ?",
    )
    .bind(reservation_id)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        let status: String = row.try_get("status")?;
        return Ok(Some(Reservation {
            reservation_id: reservation_id.to_owned(),
            sku: row.try_get("sku")?,
            user_id: row.try_get("user_id")?,
            quantity: row.try_get::<u32, _>("quantity")? as u64,
            status: Status::parse(&status)
                .ok_or_else(|| Error::Internal(format!("reservation status {status:?}")))?,
            expires_at_ms: datetime_to_ms(row.try_get("expires_at")?),
            created_at_ms: datetime_to_ms(row.try_get("created_at")?),
            payment_ref: row.try_get("payment_ref")?,
        }));
    }
    let sale: Option<(String, String, u32, String, NaiveDateTime)> = sqlx::query_as(
        "SELECT sku, user_id, quantity, payment_ref, confirmed_at FROM sales WHERE reservation_id = ?",
    )
    .bind(reservation_id)
    .fetch_optional(pool)
    .await?;
    Ok(sale.map(
        |(sku, user_id, quantity, payment_ref, confirmed_at)| Reservation {
            reservation_id: reservation_id.to_owned(),
            sku,
            user_id,
            quantity: quantity as u64,
            status: Status::Confirmed,
            expires_at_ms: datetime_to_ms(confirmed_at),
            created_at_ms: datetime_to_ms(confirmed_at),
            payment_ref: Some(payment_ref),
        },
    ))
}

/// Records a compensation straight in MySQL (a payment for a reservation only MySQL
/// remembers, or none does) and returns the one recorded for its (reservation,
/// payment_ref): the existing one when a retry arrives. None when MySQL records this
/// very payment as the reservation's sale: the caller answers from that record.
///
/// One payment, one outcome: under the SKU's row lock, which the flush holds while it
/// decides a confirmation (`apply_on`), the sales are read again. Either the flush
/// recorded the sale first (seen here: no refund), or this refund commits first (the
/// flush then finds it and makes no sale); never both. A sale of the reservation under
/// another payment makes this one a duplicate payment.
pub async fn record_compensation(
    pool: &MySqlPool,
    compensation: &Compensation,
    found_by: FoundBy,
) -> Result<Option<Compensation>> {
    let turn = crate::explore::mysql_step("record_compensation").await;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT sku FROM skus WHERE sku = ? FOR UPDATE")
        .bind(&compensation.sku)
        .fetch_optional(&mut *tx)
        .await?;
    let sold_under = recorded_sales(&mut tx, &[compensation.reservation_id.as_str()], None)
        .await?
        .remove(&compensation.reservation_id);
    let duplicate;
    let compensation = match sold_under {
        Some(payment_ref) if payment_ref == compensation.payment_ref => {
            tx.rollback().await?;
            return Ok(None);
        }
        Some(_) => {
            duplicate = Compensation {
                reason: CompensationReason::DuplicatePayment,
                ..compensation.clone()
            };
            &duplicate
        }
        None => compensation,
    };
    insert_compensations(&mut tx, &[(compensation, found_by)]).await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COMPENSATION_COLUMNS} FROM compensations WHERE reservation_id = ? AND payment_ref = ?"
    )))
    .bind(&compensation.reservation_id)
    .bind(&compensation.payment_ref)
    .fetch_one(&mut *tx)
    .await?;
    let recorded = compensation_from_row(&row)?;
    drop(turn);
    // Its event in the same transaction (a retry finds it by id and writes nothing).
    let now_ms = chrono::Utc::now().timestamp_millis();
    events::write(
        &mut tx,
        vec![crate::events::compensation_created(&recorded)],
        now_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(Some(recorded))
}

pub async fn compensation(pool: &MySqlPool, id: &str) -> Result<Option<Compensation>> {
    let _turn = crate::explore::mysql_step("compensation").await;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COMPENSATION_COLUMNS} FROM compensations WHERE id = ?"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(compensation_from_row).transpose()
}

/// Open compensations the flush recorded for the SKU: payments Redis accepted after it
/// lost an acknowledged sale. The reconciler reports them until they are resolved.
pub async fn open_flush_compensations(
    conn: &mut MySqlConnection,
    sku: &SkuId,
) -> Result<Vec<Compensation>> {
    let _turn = crate::explore::mysql_step("open_flush_compensations").await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COMPENSATION_COLUMNS} FROM compensations
         WHERE sku = ? AND found_by = 'flush' AND status = 'open' ORDER BY created_at, id LIMIT 1000"
    )))
    .bind(sku.as_str())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(compensation_from_row).collect()
}

const COMPENSATION_COLUMNS: &str = "id, reservation_id, sku, user_id, quantity, payment_ref, \
     reason, status, created_at, resolved_at, refund_ref, note";

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
        resolution: Resolution {
            at_ms: row
                .try_get::<Option<NaiveDateTime>, _>("resolved_at")?
                .map(datetime_to_ms),
            refund_ref: row.try_get("refund_ref")?,
            note: row.try_get("note")?,
        },
    })
}

/// Oldest first (by created_at, then id), after `after` (a page's last (created_at, id)).
pub async fn list_compensations(
    pool: &MySqlPool,
    resolved: Option<bool>,
    sku: Option<&SkuId>,
    after: Option<&(i64, String)>,
    limit: u32,
) -> Result<Vec<Compensation>> {
    let _turn = crate::explore::mysql_step("list_compensations").await;
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
    if let Some((at_ms, id)) = after {
        query
            .push(" AND (created_at > ")
            .push_bind(ms_to_datetime(*at_ms))
            .push(" OR (created_at = ")
            .push_bind(ms_to_datetime(*at_ms))
            .push(" AND id > ")
            .push_bind(id.as_str())
            .push("))");
    }
    query
        .push(" ORDER BY created_at, id LIMIT ")
        .push_bind(limit);
    let rows = query.build().fetch_all(pool).await?;
    rows.iter().map(compensation_from_row).collect()
}

/// Idempotent: resolving a resolved compensation changes nothing (its first refund
/// reference and note stay).
pub async fn resolve_compensation(
    pool: &MySqlPool,
    id: &str,
    resolution: &Resolution,
) -> Result<Option<Compensation>> {
    // Its inner calls are the explorer's steps.
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE compensations SET status = 'resolved', resolved_at = CURRENT_TIMESTAMP(3),
           refund_ref = ?, note = ?
         WHERE id = ? AND status = 'open'",
    )
    .bind(resolution.refund_ref.as_deref())
    .bind(resolution.note.as_deref())
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() > 0 {
        if let Some(c) = compensation_in(&mut tx, id).await? {
            let now_ms = chrono::Utc::now().timestamp_millis();
            events::write(
                &mut tx,
                vec![crate::events::compensation_resolved(&c, now_ms)],
                now_ms,
            )
            .await?;
        }
    }
    tx.commit().await?;
    compensation(pool, id).await
}

pub async fn open_compensations(pool: &MySqlPool) -> Result<i64> {
    let _turn = crate::explore::mysql_step("open_compensations").await;
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM compensations WHERE status = 'open'")
            .fetch_one(pool)
            .await?,
    )
}

pub async fn ping(pool: &MySqlPool) -> Result<()> {
    let _turn = crate::explore::mysql_step("ping").await;
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// SKUs whose sale has not ended at `now_ms` (or never ends): the ones MySQL expects
/// Redis to hold. Ended ones are retired or about to be (the Redis index lists those).
pub async fn open_sku_ids(pool: &MySqlPool, now_ms: i64) -> Result<Vec<String>> {
    let _turn = crate::explore::mysql_step("open_sku_ids").await;
    Ok(
        sqlx::query_scalar("SELECT sku FROM skus WHERE ends_at IS NULL OR ends_at > ?")
            .bind(ms_to_datetime(now_ms))
            .fetch_all(pool)
            .await?,
    )
}

/// Opens the transaction the reconciler checks one SKU in: REPEATABLE READ, so all its
/// plain reads see one snapshot of `sales`.
pub async fn begin_check(conn: &mut MySqlConnection) -> Result<Transaction<'_, MySql>> {
    let _turn = crate::explore::mysql_step("begin_check").await;
    // Applies to the next transaction of this connection only.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::Connection::begin(conn).await?)
}

/// The SKU's row, locked until the transaction ends: no flush of the SKU commits and
/// no admin write of it applies meanwhile (both lock the same row first).
pub async fn lock_sku_record(conn: &mut MySqlConnection, sku: &SkuId) -> Result<Option<SkuRecord>> {
    let _turn = crate::explore::mysql_step("lock_sku_record").await;
    let row = sqlx::query(
        "SELECT stock_total, per_user_limit, hold_seconds, starts_at, ends_at, sold, buckets, paused,
           waiting_room
         FROM skus WHERE sku = ? FOR UPDATE",
    )
    .bind(sku.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| sku_record_from_row(&row)).transpose()
}

/// The sales a query counts: all of a SKU's, or those one bucket of a split SKU made
/// (src/buckets.rs; a reservation id's head names its bucket, src/ids.rs).
#[derive(Debug, Clone)]
pub struct SalesOf {
    pub sku: SkuId,
    /// Reservation ids start with this ('' for all of the SKU's).
    head: String,
}

impl SalesOf {
    pub fn sku(sku: &SkuId) -> SalesOf {
        SalesOf {
            sku: sku.sku(),
            head: String::new(),
        }
    }

    /// One bucket's sales (bucket 0's too: its ids' head is the SKU's base64 alone).
    pub fn bucket(sale: &SkuId) -> SalesOf {
        SalesOf {
            sku: sale.sku(),
            head: format!("{}.", crate::ids::reservation_head(sale.as_str())),
        }
    }
}

/// Units MySQL records as sold: (all of them, those confirmed before `before_ms`).
pub async fn sales_totals(
    conn: &mut MySqlConnection,
    of: &SalesOf,
    before_ms: i64,
) -> Result<(u64, u64)> {
    let _turn = crate::explore::mysql_step("sales_totals").await;
    // LEFT(.., 0) = '' for all of them; not LIKE: '_' is in base64url.
    let (total, before): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS SIGNED),
                CAST(COALESCE(SUM(CASE WHEN confirmed_at < ? THEN quantity ELSE 0 END), 0) AS SIGNED)
         FROM sales WHERE sku = ? AND LEFT(reservation_id, ?) = ?",
    )
    .bind(ms_to_datetime(before_ms))
    .bind(of.sku.as_str())
    .bind(of.head.len() as u64)
    .bind(&of.head)
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
    let _turn = crate::explore::mysql_step("sales_recorded_before").await;
    Ok(recorded_sales(conn, reservation_ids, Some(before_ms))
        .await?
        .into_keys()
        .collect())
}

/// Sets the derived `skus.sold` (the reconciler, when it differs from the sales rows).
pub async fn set_sold(conn: &mut MySqlConnection, sku: &SkuId, sold: u64) -> Result<()> {
    let _turn = crate::explore::mysql_step("set_sold").await;
    sqlx::query("UPDATE skus SET sold = ? WHERE sku = ?")
        .bind(sold)
        .bind(sku.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub async fn sold_per_user(conn: &mut MySqlConnection, sku: &SkuId) -> Result<Vec<(String, i64)>> {
    let _turn = crate::explore::mysql_step("sold_per_user").await;
    Ok(sqlx::query_as(
        "SELECT user_id, CAST(SUM(quantity) AS SIGNED) FROM sales WHERE sku = ? GROUP BY user_id",
    )
    .bind(sku.as_str())
    .fetch_all(&mut *conn)
    .await?)
}

/// Units MySQL records as sold per sale of a split SKU (src/buckets.rs): a sale's
/// reservation ids name its bucket, so the head of the id (before '.') says where
/// each sale was made. Returns (hash tag, units); the unsplit SKU's heads give its id.
pub async fn sold_per_bucket(
    conn: &mut MySqlConnection,
    sku: &SkuId,
) -> Result<Vec<(String, u64)>> {
    let _turn = crate::explore::mysql_step("sold_per_bucket").await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT SUBSTRING_INDEX(reservation_id, '.', 1) AS head,
                CAST(SUM(quantity) AS SIGNED)
         FROM sales WHERE sku = ? GROUP BY head",
    )
    .bind(sku.as_str())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(head, units)| {
            let bucket = head.find('~').map_or("", |at| &head[at..]);
            (format!("{sku}{bucket}"), units.max(0) as u64)
        })
        .collect())
}

/// Units each user bought in sales confirmed before `before_ms` (the reconciler's
/// instant: later sales were still holds then).
pub async fn sold_per_user_before(
    conn: &mut MySqlConnection,
    of: &SalesOf,
    before_ms: i64,
) -> Result<Vec<(String, i64)>> {
    let _turn = crate::explore::mysql_step("sold_per_user_before").await;
    Ok(sqlx::query_as(
        "SELECT user_id, CAST(SUM(quantity) AS SIGNED) FROM sales
         WHERE sku = ? AND LEFT(reservation_id, ?) = ? AND confirmed_at < ? GROUP BY user_id",
    )
    .bind(of.sku.as_str())
    .bind(of.head.len() as u64)
    .bind(&of.head)
    .bind(ms_to_datetime(before_ms))
    .fetch_all(&mut *conn)
    .await?)
}

pub async fn audit(pool: &MySqlPool, finding: &crate::reconcile::Finding) -> Result<()> {
    let _turn = crate::explore::mysql_step("audit").await;
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
