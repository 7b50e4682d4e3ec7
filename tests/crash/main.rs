//! Crash safety (issue 4), proven by killing real processes: Redis (SIGKILL with AOF,
//! restarts under a running gateway, FLUSHALL), MariaDB (stopped mid-storm) and
//! `flashgate worker` (SIGKILL mid-batch); plus the reconciler's findings, repairs and
//! exit codes. Every test that kills or wipes a server starts its own (free port, temp
//! dir); SKUs are unique, so tests run in parallel with each other and with the other
//! test binaries on the shared servers.

#[path = "../common/mod.rs"]
mod common;
mod support;

mod cluster;
mod many_gateways;
mod money;
mod mysql_outage;
mod queue;
mod reconcile;
mod redis_crash;
mod redis_pitfalls;
mod redis_replicas;
mod wipe;
mod worker_kill;

use common::TestApp;
use futures::StreamExt;
use reqwest::StatusCode;
use std::sync::Arc;

/// Reserves one unit for each of `users` (user `{prefix}-{i}`); panics unless every
/// reserve answers 201. Returns the reservation ids in user order.
pub async fn reserve_many(app: &TestApp, sku: &str, prefix: &str, users: usize) -> Vec<String> {
    futures::stream::iter(0..users)
        .map(|i| async move {
            let user = format!("{prefix}-{i}");
            let (status, view) = app.reserve(sku, &user, &format!("k-{user}"), 1).await;
            assert_eq!(status, StatusCode::CREATED, "{view}");
            view["reservation_id"].as_str().unwrap().to_owned()
        })
        .buffered(16)
        .collect()
        .await
}

/// The payment reference the tests use for a reservation (a retry sends the same one).
pub fn payment_ref(rid: &str) -> String {
    format!("pay-{}", &rid[rid.len() - 12..])
}

/// Confirms every reservation once, `concurrency` at a time.
/// Returns (ids answered 200, (id, status) of the others).
pub async fn confirm_many(
    app: Arc<TestApp>,
    rids: Vec<String>,
    concurrency: usize,
) -> (Vec<String>, Vec<(String, StatusCode)>) {
    let results: Vec<(String, StatusCode)> = futures::stream::iter(rids)
        .map(|rid| {
            let app = app.clone();
            async move {
                let (status, _) = app.confirm(&rid, &payment_ref(&rid)).await;
                (rid, status)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (rid, status) in results {
        if status == StatusCode::OK {
            ok.push(rid);
        } else {
            failed.push((rid, status));
        }
    }
    (ok, failed)
}
