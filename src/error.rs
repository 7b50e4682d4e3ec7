//! The one error type of the library. Business refusals a client can act on are
//! `Refused`; everything else is `Unavailable` (retry later) or `Internal` (our bug).

use crate::reservation::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("unauthorized")]
    Unauthorized,
    #[error("{}", .0.code())]
    Refused(Refusal),
    /// A payment that cannot become a sale: a compensation record exists for it.
    #[error("{}: refund required (compensation {compensation_id})", refusal.code())]
    RefundRequired {
        refusal: Refusal,
        compensation_id: String,
    },
    /// Redis or MySQL cannot be reached or too slow. A retry with the same
    /// Idempotency-Key / payment_ref is always safe and tells the outcome.
    #[error("unavailable ({}): {detail}", .outcome.as_str())]
    Unavailable { detail: String, outcome: Outcome },
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a failed call to Redis or MySQL may have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was sent, or the server refused it: nothing changed.
    NotApplied,
    /// Sent, and no answer came (a timeout, a connection lost mid-call): it may have run.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NotApplied => "not_applied",
            Outcome::Unknown => "unknown",
        }
    }
}

impl Error {
    /// The same error for another caller (one failed batch call answers many requests).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidRequest(detail) => Error::InvalidRequest(detail.clone()),
            Error::Unauthorized => Error::Unauthorized,
            Error::Refused(refusal) => Error::Refused(*refusal),
            Error::RefundRequired {
                refusal,
                compensation_id,
            } => Error::RefundRequired {
                refusal: *refusal,
                compensation_id: compensation_id.clone(),
            },
            Error::Unavailable { detail, outcome } => Error::Unavailable {
                detail: detail.clone(),
                outcome: *outcome,
            },
            Error::Internal(detail) => Error::Internal(detail.clone()),
        }
    }
}

impl Error {
    pub fn unavailable(detail: impl Into<String>, outcome: Outcome) -> Error {
        Error::Unavailable {
            detail: detail.into(),
            outcome,
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Error {
        // Any failure to talk to Redis (refused, dropped, timed out, loading, failing
        // over, out of memory) is an outage from the client's side. Every script is
        // atomic: one Redis refused (an error reply) or never received changed nothing;
        // one that timed out or lost its connection after sending may have run.
        // A reply we cannot read is our bug.
        match err.kind() {
            redis::ErrorKind::UnexpectedReturnType | redis::ErrorKind::Parse => {
                Error::Internal(format!("redis: {err}"))
            }
            // Refused: no connection, nothing sent (redis-rs counts it as "dropped" too).
            _ if err.is_connection_refusal() => {
                Error::unavailable(format!("redis: {err}"), Outcome::NotApplied)
            }
            _ if err.is_timeout() || err.is_connection_dropped() => {
                Error::unavailable(format!("redis: {err}"), Outcome::Unknown)
            }
            _ => Error::unavailable(format!("redis: {err}"), Outcome::NotApplied),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Error {
        // No connection could be had: nothing was sent. A connection that broke
        // mid-statement (or a commit whose answer never came) may have applied it.
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                Error::unavailable(format!("mysql: {err}"), Outcome::NotApplied)
            }
            sqlx::Error::Io(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => {
                Error::unavailable(format!("mysql: {err}"), Outcome::Unknown)
            }
            other => Error::Internal(format!("mysql: {other}")),
        }
    }
}
