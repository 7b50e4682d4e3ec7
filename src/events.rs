//! Events (contract v1.2): the facts an order service or finance acts on, each written
//! to MySQL in the transaction that writes its fact (`db::apply_events`, and the
//! compensations and resolves written straight to MySQL). Owns the event's document,
//! its type names and its id; never decides a fact, only reports one.
//!
//! - **Id**: derived from the fact, never random: `evt_` + 128 bits of SHA-256 over the
//!   type and what names the fact (a reservation id, a compensation id, or for a stock
//!   crossing the sale and the outbox entry id that Redis appended it under). A
//!   re-flush after a crash, a replayed outbox entry or a rebuild arrives at the same
//!   id, and the unique key on `events.id` makes it write nothing.
//! - **Sequence**: per SKU, 1, 2, 3, … handed out by MySQL (`event_counters`) under that
//!   row's lock, in the order the flush writes the facts, which is the order Redis made
//!   them: one SKU's outbox is flushed in stream order (a batch that finds an earlier
//!   entry still pending on another consumer waits, `Worker::flush_sku`). MySQL, not
//!   Redis, is the authority, so a Redis that lost data or a rebuilt SKU can neither
//!   reuse nor skip a number, and facts MySQL makes itself (a compensation for a
//!   reservation Redis forgot, a resolve) take their place in the same sequence.
//! - **Position**: the feed's cursor over every SKU, handed out last before the commit
//!   (see migrations/0007_events.sql), so positions commit in order.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::reservation::{Compensation, Reservation, Sku};

/// Event types, as the contract names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    ReservationConfirmed,
    ReservationCancelled,
    ReservationExpired,
    CompensationCreated,
    CompensationResolved,
    SkuSoldOut,
    SkuAvailable,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::ReservationConfirmed,
        EventType::ReservationCancelled,
        EventType::ReservationExpired,
        EventType::CompensationCreated,
        EventType::CompensationResolved,
        EventType::SkuSoldOut,
        EventType::SkuAvailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ReservationConfirmed => "reservation.confirmed",
            EventType::ReservationCancelled => "reservation.cancelled",
            EventType::ReservationExpired => "reservation.expired",
            EventType::CompensationCreated => "compensation.created",
            EventType::CompensationResolved => "compensation.resolved",
            EventType::SkuSoldOut => "sku.sold_out",
            EventType::SkuAvailable => "sku.available",
        }
    }

    pub fn parse(raw: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == raw)
    }

    /// A comma-separated list (`types=a,b`); None when a name is unknown or the list
    /// is empty. Deduplicated, in the order of ALL.
    pub fn parse_list(raw: &str) -> Option<Vec<EventType>> {
        let mut wanted = Vec::new();
        for name in raw.split(',') {
            wanted.push(EventType::parse(name.trim())?);
        }
        let list: Vec<EventType> = EventType::ALL
            .into_iter()
            .filter(|t| wanted.contains(t))
            .collect();
        (!list.is_empty()).then_some(list)
    }
}

/// An event about to be written: everything but its sequence and position.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: String,
    pub kind: EventType,
    pub sku: String,
    pub occurred_at_ms: i64,
    pub data: Value,
}

/// An event as MySQL records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub position: u64,
    pub id: String,
    pub kind: EventType,
    pub sku: String,
    pub sequence: u64,
    pub occurred_at_ms: i64,
    pub data: Value,
}

impl Event {
    /// The event's document, as the feed lists it and a webhook sends it.
    pub fn document(&self) -> Value {
        json!({
            "id": self.id,
            "type": self.kind.as_str(),
            "sku": self.sku,
            "sequence": self.sequence,
            "occurred_at": rfc3339_ms(self.occurred_at_ms),
            "data": self.data,
        })
    }
}

/// `evt_` + 32 hex digits of SHA-256 over the type and the parts that name the fact,
/// each length-prefixed (no two lists of parts spell the same input).
pub fn event_id(kind: EventType, parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"flashgate event v1\0");
    hasher.update(kind.as_str().as_bytes());
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    format!("evt_{}", hex::encode(&hasher.finalize()[..16]))
}

/// A reservation that ended (confirmed, cancelled or expired): one event per end.
pub fn reservation_ended(reservation: &Reservation, at_ms: i64) -> Option<NewEvent> {
    use crate::reservation::Status;
    let kind = match reservation.status {
        Status::Confirmed => EventType::ReservationConfirmed,
        Status::Cancelled => EventType::ReservationCancelled,
        Status::Expired => EventType::ReservationExpired,
        _ => return None,
    };
    Some(NewEvent {
        id: event_id(kind, &[&reservation.reservation_id]),
        kind,
        sku: reservation.sku.clone(),
        occurred_at_ms: at_ms,
        data: reservation_data(reservation),
    })
}

pub fn compensation_created(compensation: &Compensation) -> NewEvent {
    let kind = EventType::CompensationCreated;
    NewEvent {
        id: event_id(kind, &[&compensation.id]),
        kind,
        sku: compensation.sku.clone(),
        occurred_at_ms: compensation.created_at_ms,
        data: compensation_data(&Compensation {
            resolved: false,
            resolution: Default::default(),
            ..compensation.clone()
        }),
    }
}

/// `compensation` as resolved (its resolution's time is when it happened).
pub fn compensation_resolved(compensation: &Compensation, fallback_at_ms: i64) -> NewEvent {
    let kind = EventType::CompensationResolved;
    NewEvent {
        id: event_id(kind, &[&compensation.id]),
        kind,
        sku: compensation.sku.clone(),
        occurred_at_ms: compensation.resolution.at_ms.unwrap_or(fallback_at_ms),
        data: compensation_data(compensation),
    }
}

/// `available` reached 0 (`sold_out`) or came back above it: appended by the script
/// that crossed (lua/lib.lua announce_stock) as outbox entry `stream_id` of `sale`.
pub fn stock_crossed(
    sold_out: bool,
    sale: &str,
    stream_id: &str,
    view: &Sku,
    at_ms: i64,
) -> NewEvent {
    let kind = if sold_out {
        EventType::SkuSoldOut
    } else {
        EventType::SkuAvailable
    };
    NewEvent {
        id: event_id(kind, &[sale, stream_id]),
        kind,
        sku: view.sku.clone(),
        occurred_at_ms: at_ms,
        data: sku_data(view),
    }
}

pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The reservation view of the contract (the same fields as `GET /v1/reservations/{id}`;
/// a test in src/http.rs holds the two together).
pub fn reservation_data(r: &Reservation) -> Value {
    let mut data = json!({
        "reservation_id": r.reservation_id,
        "sku": r.sku,
        "user_id": r.user_id,
        "quantity": r.quantity,
        "status": r.status.as_str(),
        "expires_at": rfc3339_ms(r.expires_at_ms),
        "created_at": rfc3339_ms(r.created_at_ms),
    });
    if let Some(payment_ref) = &r.payment_ref {
        data["payment_ref"] = json!(payment_ref);
    }
    data
}

/// The compensation of the contract (as `GET /v1/compensations/{id}`).
pub fn compensation_data(c: &Compensation) -> Value {
    json!({
        "id": c.id,
        "reservation_id": c.reservation_id,
        "sku": c.sku,
        "user_id": c.user_id,
        "quantity": c.quantity,
        "payment_ref": c.payment_ref,
        "reason": c.reason.as_str(),
        "status": if c.resolved { "resolved" } else { "open" },
        "created_at": rfc3339_ms(c.created_at_ms),
        "resolved_at": c.resolution.at_ms.map(rfc3339_ms),
        "refund_ref": c.resolution.refund_ref,
        "note": c.resolution.note,
    })
}

/// The SKU view of the contract (as `GET /v1/skus/{sku}`), at the crossing.
pub fn sku_data(s: &Sku) -> Value {
    json!({
        "sku": s.sku,
        "stock_total": s.stock_total,
        "available": s.available,
        "held": s.held,
        "sold": s.sold,
        "per_user_limit": s.per_user_limit,
        "hold_seconds": s.hold_seconds,
        "starts_at": s.starts_at_ms.map(rfc3339_ms),
        "ends_at": s.ends_at_ms.map(rfc3339_ms),
        "paused": s.paused,
    })
}

/// The feed's cursor: opaque to clients, a position to us.
pub fn encode_cursor(position: u64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("e1:{position}"))
}

pub fn decode_cursor(cursor: &str) -> Option<u64> {
    use base64::Engine;
    if cursor.len() > 64 {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let digits = text.strip_prefix("e1:")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_derive_from_the_fact_alone() {
        let a = event_id(EventType::ReservationConfirmed, &["r1"]);
        assert_eq!(a, event_id(EventType::ReservationConfirmed, &["r1"]));
        assert_ne!(a, event_id(EventType::ReservationExpired, &["r1"]));
        assert_ne!(a, event_id(EventType::ReservationConfirmed, &["r2"]));
        assert_ne!(
            event_id(EventType::SkuSoldOut, &["a", "b"]),
            event_id(EventType::SkuSoldOut, &["ab", ""])
        );
        assert!(a.starts_with("evt_") && a.len() == 36);
    }

    #[test]
    fn type_lists_parse_strictly() {
        assert_eq!(
            EventType::parse_list("sku.sold_out,reservation.confirmed,sku.sold_out"),
            Some(vec![EventType::ReservationConfirmed, EventType::SkuSoldOut])
        );
        assert_eq!(EventType::parse_list(""), None);
        assert_eq!(EventType::parse_list("reservation.confirmed,nope"), None);
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        for p in [0, 1, 42, u64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(p)), Some(p));
        }
        for bad in ["", "e1:5", "!!", "ZTE6", "ZTE6LTE", "ZTI6NQ"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
