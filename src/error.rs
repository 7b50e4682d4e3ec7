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
    /// Redis or MySQL cannot be reached; nothing was changed, or a retry is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
            Error::Unavailable(detail) => Error::Unavailable(detail.clone()),
            Error::Internal(detail) => Error::Internal(detail.clone()),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Error {
        // Any failure to talk to Redis (refused, dropped, timed out, loading, failing
        // over, out of memory) is an outage from the client's side: every script is
        // atomic, so a failed call changed nothing. A reply we cannot read is our bug.
        match err.kind() {
            redis::ErrorKind::UnexpectedReturnType | redis::ErrorKind::Parse => {
                Error::Internal(format!("redis: {err}"))
            }
            _ => Error::Unavailable(format!("redis: {err}")),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Error {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Error::Unavailable(format!("mysql: {err}")),
            other => Error::Internal(format!("mysql: {other}")),
        }
    }
}
