//! The SQL of events (src/events.rs): writing them with their sequence and position
//! inside the caller's transaction, the feed's pages, retention.

use chrono::NaiveDateTime;
use sqlx::mysql::{MySqlConnection, MySqlPool};
use sqlx::{MySql, QueryBuilder, Row};
use std::collections::{HashMap, HashSet};

use super::{datetime_to_ms, ms_to_datetime};
use crate::error::{Error, Result};
use crate::events::{Event, EventType, NewEvent};

/// The counter row of the feed's position (no SKU id is '*').
const POSITION: &str = "*";

/// Writes the events MySQL does not have yet (by id), in the order given, inside the
/// caller's transaction: each SKU's next sequence numbers, then positions, then the
/// rows. Counter rows are locked in SKU order, then the position's row last, so two
/// writers never wait on each other in a cycle, and positions commit in order (the
/// position's lock is held from here to the commit: call this last).
pub async fn write(
    conn: &mut MySqlConnection,
    events: Vec<NewEvent>,
    now_ms: i64,
) -> Result<Vec<Event>> {
    let _turn = crate::explore::mysql_step("write_events").await;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut existing: HashSet<String> = HashSet::new();
    for chunk in events.chunks(1000) {
        let mut query = QueryBuilder::<MySql>::new("SELECT id FROM events WHERE id IN (");
        let mut list = query.separated(", ");
        for e in chunk {
            list.push_bind(&e.id);
        }
        query.push(")");
        let rows: Vec<(String,)> = query.build_query_as().fetch_all(&mut *conn).await?;
        existing.extend(rows.into_iter().map(|(id,)| id));
    }
    let fresh: Vec<NewEvent> = events
        .into_iter()
        .filter(|e| existing.insert(e.id.clone()))
        .collect();
    if fresh.is_empty() {
        return Ok(Vec::new());
    }
    let mut per_sku: Vec<(&str, u64)> = Vec::new();
    for e in &fresh {
        match per_sku.iter_mut().find(|(sku, _)| *sku == e.sku) {
            Some((_, n)) => *n += 1,
            None => per_sku.push((&e.sku, 1)),
        }
    }
    per_sku.sort_unstable();
    let mut next: HashMap<String, u64> = HashMap::new();
    for (sku, n) in &per_sku {
        let first = take_numbers(conn, sku, *n).await?;
        next.insert((*sku).to_owned(), first);
    }
    let mut position = take_numbers(conn, POSITION, fresh.len() as u64).await?;
    let mut written = Vec::with_capacity(fresh.len());
    for e in fresh {
        let sequence = next.get_mut(&e.sku).expect("counted above");
        written.push(Event {
            position,
            id: e.id,
            kind: e.kind,
            sku: e.sku,
            sequence: *sequence,
            occurred_at_ms: e.occurred_at_ms,
            data: e.data,
        });
        *sequence += 1;
        position += 1;
    }
    let recorded_at = ms_to_datetime(now_ms);
    for chunk in written.chunks(500) {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO events (position, id, sku, sequence, type, occurred_at, recorded_at, data) ",
        );
        insert.push_values(chunk, |mut row, e| {
            row.push_bind(e.position)
                .push_bind(&e.id)
                .push_bind(&e.sku)
                .push_bind(e.sequence)
                .push_bind(e.kind.as_str())
                .push_bind(ms_to_datetime(e.occurred_at_ms))
                .push_bind(recorded_at)
                .push_bind(e.data.to_string());
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(written)
}

/// Hands out `n` consecutive numbers of counter `name` (locking its row until the
/// transaction ends); returns the first.
async fn take_numbers(conn: &mut MySqlConnection, name: &str, n: u64) -> Result<u64> {
    sqlx::query(
        "INSERT INTO event_counters (name, last) VALUES (?, ?)
         ON DUPLICATE KEY UPDATE last = last + VALUES(last)",
    )
    .bind(name)
    .bind(n)
    .execute(&mut *conn)
    .await?;
    let last: u64 = sqlx::query_scalar("SELECT last FROM event_counters WHERE name = ?")
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    Ok(last + 1 - n)
}

/// What the feed asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub after: u64,
    /// None: every type.
    pub types: Option<Vec<EventType>>,
    pub sku: Option<String>,
}

/// Oldest first: events after `filter.after` of the types and SKU asked for.
pub async fn list(pool: &MySqlPool, filter: &Filter, limit: u32) -> Result<Vec<Event>> {
    let _turn = crate::explore::mysql_step("list_events").await;
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT position, id, sku, sequence, type, occurred_at, data FROM events WHERE position > ",
    );
    query.push_bind(filter.after);
    push_filter(&mut query, filter);
    query.push(" ORDER BY position LIMIT ").push_bind(limit);
    let rows = query.build().fetch_all(pool).await?;
    rows.iter().map(event_from_row).collect()
}

pub(super) fn push_filter(query: &mut QueryBuilder<MySql>, filter: &Filter) {
    if let Some(types) = &filter.types {
        query.push(" AND type IN (");
        let mut list = query.separated(", ");
        for t in types {
            list.push_bind(t.as_str());
        }
        query.push(")");
    }
    if let Some(sku) = &filter.sku {
        query.push(" AND sku = ").push_bind(sku.clone());
    }
}

pub(super) fn event_from_row(row: &sqlx::mysql::MySqlRow) -> Result<Event> {
    let kind: String = row.try_get("type")?;
    let data: String = row.try_get("data")?;
    Ok(Event {
        position: row.try_get("position")?,
        id: row.try_get("id")?,
        kind: EventType::parse(&kind)
            .ok_or_else(|| Error::Internal(format!("event type {kind:?}")))?,
        sku: row.try_get("sku")?,
        sequence: row.try_get("sequence")?,
        occurred_at_ms: datetime_to_ms(row.try_get::<NaiveDateTime, _>("occurred_at")?),
        data: serde_json::from_str(&data)
            .map_err(|e| Error::Internal(format!("event data: {e}")))?,
    })
}

/// Deletes at most `limit` events recorded before `before_ms`, oldest first; returns
/// how many went (call again while it returns `limit`).
pub async fn prune(pool: &MySqlPool, before_ms: i64, limit: u32) -> Result<u64> {
    let _turn = crate::explore::mysql_step("prune_events").await;
    // By `recorded_at`, its index: ordered by position, each batch would sort every
    // old row (a backlog of N rows would cost N²/limit).
    let done = sqlx::query("DELETE FROM events WHERE recorded_at < ? ORDER BY recorded_at LIMIT ?")
        .bind(ms_to_datetime(before_ms))
        .bind(limit)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// The last position handed out (0 before the first event).
pub async fn last_position(conn: &mut MySqlConnection) -> Result<u64> {
    let last: Option<u64> = sqlx::query_scalar("SELECT last FROM event_counters WHERE name = ?")
        .bind(POSITION)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(last.unwrap_or(0))
}
