//! What the two property tests (tests/model.rs, tests/buckets_model.rs) model alike: a
//! hold as the contract sees it, and the one runtime their cases run on.

use flashgate::reservation::Status;

#[derive(Debug, Clone)]
pub struct Hold {
    pub id: String,
    pub user: String,
    pub quantity: u64,
    pub status: Status,
    /// The deadline has passed (only meaningful while held/paying).
    pub overdue: bool,
    pub payment_ref: Option<String>,
}

impl Hold {
    pub fn held(id: String, user: String, quantity: u64) -> Hold {
        Hold {
            id,
            user,
            quantity,
            status: Status::Held,
            overdue: false,
            payment_ref: None,
        }
    }

    pub fn live(&self) -> bool {
        matches!(self.status, Status::Held | Status::Paying)
    }

    /// The status a read answers: a live hold past its deadline reads as expired.
    pub fn effective(&self) -> Status {
        if self.live() && self.overdue {
            Status::Expired
        } else {
            self.status
        }
    }
}

/// The hold a random `pick` points at, if there is any.
pub fn pick(holds: &[Hold], pick: usize) -> Option<usize> {
    (!holds.is_empty()).then(|| pick % holds.len())
}

/// One current-thread runtime for every case (the gateway's pools live in it).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}
