//! Readiness, kept fresh in the background: `/readyz` answers from the last check in
//! constant time, whatever the number of SKUs or the request rate (no script upload,
//! no MySQL ping, no per-SKU work on the request path).
//!
//! A check makes sure every script is loaded (one SCRIPT EXISTS; uploading only those
//! Redis lost) and pings MySQL: two commands, whatever the number of SKUs. The outbox
//! backlog is the one the worker's last flush pass measured in this process (null with
//! `--no-worker`: the worker's own `/metrics` has it). A check older than
//! READINESS_STALE_AFTER counts as failed: a refresh loop stuck on a hung Redis must not
//! keep reporting "ready".

use serde::Serialize;
use std::sync::RwLock;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::db;
use crate::gateway::Gateway;
use crate::telemetry;

/// How often the readiness check runs.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(1);
/// A check older than this no longer vouches for readiness.
pub const READINESS_STALE_AFTER: Duration = Duration::from_secs(5);

/// What the last check found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[schema(as = Readiness)]
pub struct Report {
    /// `ok`, `unreachable`, or `unknown` before the first check.
    pub redis: &'static str,
    /// `loaded` or `unknown`.
    pub scripts: &'static str,
    /// `ok`, `unreachable`, or `unknown` before the first check.
    pub mysql: &'static str,
    /// Events not yet written to MySQL, as the in-process worker last measured them.
    pub outbox_backlog: Option<u64>,
    /// Milliseconds since the check ran (None: no check yet).
    pub checked_ms_ago: Option<u64>,
}

impl Report {
    /// Ready when Redis answers and the scripts are loaded; MySQL and the backlog are
    /// reported, not required (a MySQL outage delays the flush, it does not stop sales).
    pub fn ready(&self) -> bool {
        self.redis == "ok"
            && self.scripts == "loaded"
            && self
                .checked_ms_ago
                .is_some_and(|ms| ms <= READINESS_STALE_AFTER.as_millis() as u64)
    }
}

struct Checked {
    redis_ok: bool,
    scripts_loaded: bool,
    mysql_ok: bool,
    at: Instant,
}

#[derive(Default)]
pub struct Readiness {
    last: RwLock<Option<Checked>>,
}

impl Readiness {
    /// The last check, as `/readyz` reports it.
    pub fn report(&self) -> Report {
        let last = self.last.read().unwrap_or_else(|e| e.into_inner());
        match &*last {
            None => Report {
                redis: "unknown",
                scripts: "unknown",
                mysql: "unknown",
                outbox_backlog: telemetry::last_outbox_backlog(),
                checked_ms_ago: None,
            },
            Some(c) => Report {
                redis: if c.redis_ok { "ok" } else { "unreachable" },
                scripts: if c.scripts_loaded {
                    "loaded"
                } else {
                    "unknown"
                },
                mysql: if c.mysql_ok { "ok" } else { "unreachable" },
                outbox_backlog: telemetry::last_outbox_backlog(),
                checked_ms_ago: Some(c.at.elapsed().as_millis() as u64),
            },
        }
    }

    /// One check: the scripts (which needs Redis) and MySQL.
    pub async fn check(&self, gateway: &Gateway) {
        let store = &gateway.store;
        let scripts_loaded = store.ensure_scripts().await.is_ok();
        let redis_ok = scripts_loaded || store.ping().await.is_ok();
        let mysql_ok = db::ping(&gateway.db).await.is_ok();
        *self.last.write().unwrap_or_else(|e| e.into_inner()) = Some(Checked {
            redis_ok,
            scripts_loaded,
            mysql_ok,
            at: Instant::now(),
        });
    }

    /// Checks every READINESS_INTERVAL until shutdown.
    pub async fn run(&self, gateway: Gateway, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(READINESS_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*shutdown.borrow() {
            tokio::select! {
                _ = ticks.tick() => {}
                changed = shutdown.changed() => if changed.is_err() { break } else { continue },
            }
            self.check(&gateway).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_check_or_a_stale_one_is_not_ready() {
        let readiness = Readiness::default();
        assert!(!readiness.report().ready());
        *readiness.last.write().unwrap() = Some(Checked {
            redis_ok: true,
            scripts_loaded: true,
            mysql_ok: false,
            at: Instant::now(),
        });
        let report = readiness.report();
        assert!(
            report.ready(),
            "MySQL down does not make the gateway unready"
        );
        let mut stale = report.clone();
        stale.checked_ms_ago = Some(READINESS_STALE_AFTER.as_millis() as u64 + 1);
        assert!(!stale.ready());
    }
}
