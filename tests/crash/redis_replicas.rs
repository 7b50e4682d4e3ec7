//! FLASHGATE_REDIS_WAIT_REPLICAS: a confirm is answered only once a replica has it;
//! when no replica acknowledges in time the answer is 503 and a retry with the same
//! payment_ref is safe (one sale, no compensation).

use crate::common::*;
use crate::support::RedisServer;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

async fn replication_up(replica: &RedisServer) -> bool {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut replica.client().await)
        .await
        .unwrap_or_default();
    info.contains("master_link_status:up")
}

/// Makes `replica` replicate `primary`, and waits until it is in sync.
async fn replicate(primary: &RedisServer, replica: &RedisServer) {
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary.port)
        .query_async(&mut replica.client().await)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !replication_up(replica).await {
        assert!(Instant::now() < deadline, "replication did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn confirms_wait_for_a_replica_and_a_timed_out_wait_is_safe_to_retry() {
    let primary = RedisServer::start(Some("everysec")).await;
    let replica = RedisServer::start(None).await;
    replicate(&primary, &replica).await;

    let mut args = serve_args(&primary.url(), &database_url());
    args.redis.redis_wait_replicas = 1;
    args.redis.redis_wait_timeout_ms = 300;
    let app = spawn_app_with(args).await;
    let sku = unique_sku("wait");
    app.create_sku(&sku, json!({"stock": 3})).await;

    let first = app.hold(&sku, "w1").await;
    let (status, view) = app.confirm(&first, "pay-1").await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("confirmed")),
        "{view}"
    );

    // The replica stops acknowledging: the confirm is applied on the primary but not
    // answered 200.
    let second = app.hold(&sku, "w2").await;
    replica.pause();
    let started = Instant::now();
    let (status, problem) = app.confirm(&second, "pay-2").await;
    replica.resume();
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("unavailable"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "WAIT is bounded by its timeout"
    );
    // The retry with the same payment_ref is the same sale, not a refund.
    let (status, view) = app.confirm(&second, "pay-2").await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("confirmed")),
        "{view}"
    );

    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["sold"], 2);
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 2);
    assert_eq!(app.mysql_compensations(&sku).await, 0);
}

/// WAIT blocks the connection it runs on. A confirm waiting for a stalled replica
/// runs on a dedicated connection, so reserves (which share the multiplexed one) are
/// answered while it waits: every reserve started after the confirm is answered
/// before the confirm is.
#[tokio::test]
async fn a_confirm_waiting_for_a_stalled_replica_stalls_no_reserve() {
    let primary = RedisServer::start(None).await;
    let replica = RedisServer::start(None).await;
    replicate(&primary, &replica).await;
    let mut args = serve_args(&primary.url(), &database_url());
    args.redis.redis_wait_replicas = 1;
    args.redis.redis_wait_timeout_ms = 3_000;
    let app = std::sync::Arc::new(spawn_app_with(args).await);
    let sku = unique_sku("wait-stall");
    app.create_sku(&sku, json!({"stock": 100})).await;
    let paid = app.hold(&sku, "payer").await;

    replica.pause();
    let confirm = {
        let app = app.clone();
        tokio::spawn(async move {
            let answer = app.confirm(&paid, "pay").await;
            (answer, Instant::now())
        })
    };
    // Let the confirm reach its WAIT first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reserves = futures::future::join_all((0..50).map(|i| {
        let (app, sku) = (&app, &sku);
        async move { app.reserve(sku, &format!("buyer{i}"), "k", 1).await }
    }))
    .await;
    let reserves_done = Instant::now();
    let ((status, problem), confirm_done) = confirm.await.unwrap();
    replica.resume();
    assert!(reserves.iter().all(|(s, _)| *s == StatusCode::CREATED));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(problem["outcome"], "unknown");
    assert!(
        reserves_done < confirm_done,
        "the reserves waited behind the confirm's WAIT"
    );
    // A retry with the same payment_ref, the replica back, is the one sale.
    let (status, view) = app.confirm(&view_id(&app, &sku).await, "pay").await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("confirmed"))
    );
}

/// The one reservation of `payer` (the test's first hold).
async fn view_id(app: &TestApp, sku: &str) -> String {
    let (status, view) = app.reserve(sku, "payer", "key-payer", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    view["reservation_id"].as_str().unwrap().to_owned()
}
