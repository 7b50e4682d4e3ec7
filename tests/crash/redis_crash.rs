//! Redis SIGKILLed in the middle of a confirm storm, with `appendfsync always`, and
//! restarted on the same port and directory under the same running gateway.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{self, body, spawn_app_with, unique_sku, SERVICE_TOKEN};
use crate::support::*;
use crate::{payment_ref, reserve_many};

const HOLDS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkill_during_confirm_storm_loses_no_acknowledged_sale() {
    let mut redis = RedisServer::start(Some("always")).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    let sku = unique_sku("crash-kill");
    app.create_sku(&sku, json!({ "stock": HOLDS, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", HOLDS).await;

    // The storm: every hold confirmed once, 16 at a time; Redis dies under it.
    let answered_ok = Arc::new(AtomicUsize::new(0));
    let storm = {
        let app = app.clone();
        let answered_ok = answered_ok.clone();
        let rids = rids.clone();
        tokio::spawn(async move {
            futures::stream::iter(rids)
                .map(|rid| {
                    let app = app.clone();
                    let answered_ok = answered_ok.clone();
                    async move {
                        let (status, view) = app.confirm(&rid, &payment_ref(&rid)).await;
                        if status == StatusCode::OK {
                            assert_eq!(view["status"], "confirmed", "{view}");
                            answered_ok.fetch_add(1, Ordering::SeqCst);
                        } else {
                            // Redis unreachable: 503 unavailable, safe to retry.
                            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{view}");
                            assert_eq!(view["code"], "unavailable", "{view}");
                        }
                        (rid, status)
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered_ok.load(Ordering::SeqCst) < HOLDS / 4 {
        assert!(Instant::now() < deadline, "storm did not get going");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    redis.kill();
    let at_kill = answered_ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;
    let results = storm.await.unwrap();
    let ok: Vec<&String> = results
        .iter()
        .filter(|(_, s)| *s == StatusCode::OK)
        .map(|(rid, _)| rid)
        .collect();
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, s)| *s != StatusCode::OK)
        .map(|(rid, _)| rid)
        .collect();
    eprintln!(
        "redis SIGKILL: {at_kill} confirms answered 200 before the kill, {} in all, {} refused (503)",
        ok.len(),
        failed.len()
    );
    // Requests in flight at the kill either fail (503) or, retried once on the
    // re-established connection, succeed after the restart; both are fine.
    assert!(
        at_kill < HOLDS,
        "the kill must land inside the storm (200s at kill: {at_kill}, failed: {})",
        failed.len()
    );

    // Every confirm answered 200 survived the crash: the AOF had it before the answer.
    for rid in &ok {
        let (status, view) = app.reservation(rid, SERVICE_TOKEN).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(
            view["status"], "confirmed",
            "200 before the crash, now {view}"
        );
    }
    // The others are safe to retry with the same payment_ref: each becomes one sale
    // (or is found already confirmed, when Redis ran it but the answer was lost).
    for rid in &failed {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, view) = app.confirm(rid, &payment_ref(rid)).await;
            if status == StatusCode::OK {
                assert_eq!(view["status"], "confirmed");
                break;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{view}");
            assert!(Instant::now() < deadline, "confirm retry never succeeded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (_, available, held, sold) = assert_equation(&app.store, &sku).await;
    assert_eq!((available, held, sold), (0, 0, HOLDS as u64));

    // Everything reaches MySQL, once.
    app.flush(&sku).await;
    let db = shared_db().await;
    let (rows, sum, mysql_sold) = mysql_sales(&db, &sku).await;
    assert_eq!(
        (rows, sum, mysql_sold),
        (HOLDS as i64, HOLDS as i64, HOLDS as u64)
    );
    // Entries flushed before the kill and again after the restart (AOF) made no second
    // event, and none is missing.
    assert_events_in_sequence(&db, &sku).await;
    let recorded: HashSet<String> =
        sqlx::query_scalar("SELECT reservation_id FROM sales WHERE sku = ?")
            .bind(&sku)
            .fetch_all(&db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for rid in &ok {
        assert!(
            recorded.contains(*rid),
            "acknowledged sale {rid} not in MySQL"
        );
    }
    assert_eq!(
        app.mysql_compensations(&sku).await,
        0,
        "a retried confirm is no refund"
    );
    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // The gateway kept serving across the restart.
    let (status, view) = body(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{view}");
}
