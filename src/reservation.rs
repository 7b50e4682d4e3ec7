//! The words of the contract as types: reservation states, the views callers get,
//! and the refusals a client can act on (each with its stable code).

use serde::Serialize;

/// A reservation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Held,
    Paying,
    Confirmed,
    Cancelled,
    Expired,
}

impl Status {
    pub fn parse(raw: &str) -> Option<Status> {
        Some(match raw {
            "held" => Status::Held,
            "paying" => Status::Paying,
            "confirmed" => Status::Confirmed,
            "cancelled" => Status::Cancelled,
            "expired" => Status::Expired,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Held => "held",
            Status::Paying => "paying",
            Status::Confirmed => "confirmed",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
        }
    }
}

/// One reservation as the scripts report it; times in ms since the epoch (Redis clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub reservation_id: String,
    pub sku: String,
    pub user_id: String,
    pub quantity: u64,
    pub status: Status,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub payment_ref: Option<String>,
}

/// One SKU's definition and counters in Redis; times in ms since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku {
    pub sku: String,
    pub stock_total: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    pub per_user_limit: u64,
    pub hold_seconds: u64,
    pub starts_at_ms: Option<i64>,
    pub ends_at_ms: Option<i64>,
    /// Paused by an operator: reserves answer `paused`, everything else goes on.
    pub paused: bool,
    /// The SKU's waiting room, if it has one (src/queue.rs).
    pub waiting_room: Option<WaitingRoom>,
}

/// A waiting room's terms: buyers queue, and are admitted by stock (src/queue.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WaitingRoom {
    /// How long an admission may wait for its reserve before it lapses.
    pub admission_seconds: u32,
    /// Most admissions per second; 0: as fast as the stock allows.
    pub admit_per_second: u32,
    /// Users who joined before the start are placed in a random order.
    pub prequeue_shuffle: bool,
}

/// A SKU definition as an operator writes it (`PUT /v1/admin/skus/{sku}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuDefinition {
    pub stock_total: u64,
    pub per_user_limit: u64,
    pub hold_seconds: u64,
    pub starts_at_ms: Option<i64>,
    pub ends_at_ms: Option<i64>,
    /// Redis hash slots the stock is split over (src/buckets.rs); fixed at creation.
    pub buckets: u32,
    /// Paused by an operator (`POST /v1/admin/skus/{sku}/pause`); a PUT keeps it.
    pub paused: bool,
    /// Buyers queue and are admitted by stock (src/queue.rs); None: no waiting room.
    pub waiting_room: Option<WaitingRoom>,
}

impl SkuDefinition {
    /// The buckets its buyers are homed over (`buckets::homes`).
    pub fn homes(&self) -> u32 {
        crate::buckets::homes(self.buckets, self.waiting_room.is_some())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompensationReason {
    Expired,
    Cancelled,
    DuplicatePayment,
}

impl CompensationReason {
    pub fn parse(raw: &str) -> Option<CompensationReason> {
        Some(match raw {
            "expired" => CompensationReason::Expired,
            "cancelled" => CompensationReason::Cancelled,
            "duplicate_payment" => CompensationReason::DuplicatePayment,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CompensationReason::Expired => "expired",
            CompensationReason::Cancelled => "cancelled",
            CompensationReason::DuplicatePayment => "duplicate_payment",
        }
    }
}

/// A payment that could not become a sale, as recorded in MySQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compensation {
    pub id: String,
    pub reservation_id: String,
    pub sku: String,
    pub user_id: String,
    pub quantity: u64,
    pub payment_ref: String,
    pub reason: CompensationReason,
    pub resolved: bool,
    pub created_at_ms: i64,
    /// How it was resolved (all None while open).
    pub resolution: Resolution,
}

/// What an operator says when resolving a compensation: the refund's reference in
/// their payment system and a note; `at_ms` is when it was resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    pub at_ms: Option<i64>,
    pub refund_ref: Option<String>,
    pub note: Option<String>,
}

/// Business outcomes a client can act on; each has a stable contract code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    SoldOut,
    LimitExceeded,
    NotStarted,
    Ended,
    IdempotencyKeyReused,
    AlreadyConfirmed,
    PaymentInProgress,
    ReservationExpired,
    ReservationCancelled,
    StockBelowCommitted,
    /// An admin PUT asked a defined SKU for another number of buckets.
    BucketsChanged,
    /// An operator paused the SKU's sale.
    Paused,
    /// A reserve on a SKU with a waiting room without a valid admission token (403).
    AdmissionRequired,
    /// The admission token already made a hold under another idempotency key.
    AdmissionUsed,
    /// A queue request for a SKU that has no waiting room.
    NoWaitingRoom,
}

impl Refusal {
    pub const ALL: [Refusal; 16] = [
        Refusal::NotFound,
        Refusal::SoldOut,
        Refusal::LimitExceeded,
        Refusal::NotStarted,
        Refusal::Ended,
        Refusal::IdempotencyKeyReused,
        Refusal::AlreadyConfirmed,
        Refusal::PaymentInProgress,
        Refusal::ReservationExpired,
        Refusal::ReservationCancelled,
        Refusal::StockBelowCommitted,
        Refusal::BucketsChanged,
        Refusal::Paused,
        Refusal::AdmissionRequired,
        Refusal::AdmissionUsed,
        Refusal::NoWaitingRoom,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::SoldOut => "sold_out",
            Refusal::LimitExceeded => "limit_exceeded",
            Refusal::NotStarted => "not_started",
            Refusal::Ended => "ended",
            Refusal::IdempotencyKeyReused => "idempotency_key_reused",
            Refusal::AlreadyConfirmed => "already_confirmed",
            Refusal::PaymentInProgress => "payment_in_progress",
            Refusal::ReservationExpired => "reservation_expired",
            Refusal::ReservationCancelled => "reservation_cancelled",
            Refusal::StockBelowCommitted => "stock_below_committed",
            Refusal::BucketsChanged => "buckets_changed",
            Refusal::Paused => "paused",
            Refusal::AdmissionRequired => "admission_required",
            Refusal::AdmissionUsed => "admission_used",
            Refusal::NoWaitingRoom => "no_waiting_room",
        }
    }

    /// The refusal a script reply code stands for.
    pub fn from_code(code: &str) -> Option<Refusal> {
        Some(match code {
            "not_found" => Refusal::NotFound,
            "sold_out" => Refusal::SoldOut,
            "limit_exceeded" => Refusal::LimitExceeded,
            "not_started" => Refusal::NotStarted,
            "ended" => Refusal::Ended,
            "idempotency_key_reused" => Refusal::IdempotencyKeyReused,
            "already_confirmed" => Refusal::AlreadyConfirmed,
            "payment_in_progress" => Refusal::PaymentInProgress,
            "reservation_expired" => Refusal::ReservationExpired,
            "reservation_cancelled" => Refusal::ReservationCancelled,
            "stock_below_committed" => Refusal::StockBelowCommitted,
            "buckets_changed" => Refusal::BucketsChanged,
            "paused" => Refusal::Paused,
            "admission_required" => Refusal::AdmissionRequired,
            "admission_used" => Refusal::AdmissionUsed,
            "no_waiting_room" => Refusal::NoWaitingRoom,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes_round_trip() {
        let all = Refusal::ALL;
        for refusal in all {
            assert_eq!(Refusal::from_code(refusal.code()), Some(refusal));
        }
        assert_eq!(Refusal::from_code("created"), None);
    }

    #[test]
    fn status_and_reason_words_round_trip() {
        for s in ["held", "paying", "confirmed", "cancelled", "expired"] {
            assert_eq!(Status::parse(s).unwrap().as_str(), s);
        }
        for r in ["expired", "cancelled", "duplicate_payment"] {
            assert_eq!(CompensationReason::parse(r).unwrap().as_str(), r);
        }
        assert_eq!(Status::parse("HELD"), None);
    }
}
