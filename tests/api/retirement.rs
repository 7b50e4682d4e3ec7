//! SKU life cycle (issue 10 item 1): a SKU whose sale ended, with no live hold and
//! nothing left to flush, is retired by the sweep: its keys go, it leaves the index the
//! workers walk and the per-SKU metric series, reads answer from its tombstone or from
//! MySQL, and the admin PUT puts it back on sale with its buyers' limits intact.

use crate::common::*;
use flashgate::keys::SkuKeys;
use flashgate::store::SaleState;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

fn rfc3339_in(ms: i64) -> String {
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(ms);
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

async fn exists(app: &TestApp, key: &str) -> bool {
    let mut conn = app.store.connection();
    let n: u64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    n == 1
}

async fn indexed(app: &TestApp, sku: &str) -> bool {
    app.store
        .sku_ids()
        .await
        .unwrap()
        .iter()
        .any(|s| s.as_str() == sku)
}

async fn sweep(app: &TestApp, sku: &str) -> SaleState {
    let id = TestApp::sku_id(sku);
    app.worker.sweep_sku(id.clone()).await.unwrap();
    app.store.sweep(&id).await.unwrap().state
}

/// Flushes and sweeps until the sweep retires the SKU: other tests' worker passes over
/// the shared Redis may hold one of its events pending for a moment.
async fn flush_until_retired(app: &TestApp, sku: &str) {
    for _ in 0..200 {
        app.flush(sku).await;
        if sweep(app, sku).await == SaleState::Retired {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{sku} was never retired");
}

/// The user's key (`key-<user>`, as `TestApp::hold` makes it) replays `rid`, whose status
/// is `status` now.
async fn key_replays(app: &TestApp, sku: &str, user: &str, rid: &str, status: &str) {
    let response = app.reserve_raw(sku, user, &format!("key-{user}"), 1).await;
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let (code, replayed) = crate::common::body(response).await;
    assert_eq!(
        (
            code,
            replayed["reservation_id"].as_str(),
            replayed["status"].as_str()
        ),
        (StatusCode::CREATED, Some(rid), Some(status))
    );
}

async fn wait_until(deadline: tokio::time::Instant) {
    tokio::time::sleep_until(deadline + Duration::from_millis(50)).await;
}

#[tokio::test]
async fn an_ended_sale_retires_once_nothing_is_left_and_comes_back_with_a_put() {
    let app = spawn_app().await;
    let sku = unique_sku("retire");
    let start = tokio::time::Instant::now();
    app.create_sku(
        &sku,
        json!({"stock": 5, "per_user_limit": 1, "hold_seconds": 2, "ends_at": rfc3339_in(1_000)}),
    )
    .await;
    assert!(indexed(&app, &sku).await);
    let sold = app.hold(&sku, "ann").await;
    let cancelled = app.hold(&sku, "bob").await;
    let _left_to_expire = app.hold(&sku, "cid").await;
    assert_eq!(app.confirm(&sold, "pay-ann").await.0, StatusCode::OK);
    assert_eq!(
        app.cancel(&cancelled, SERVICE_TOKEN).await.0,
        StatusCode::OK
    );

    // Ended, but a hold is still live: not retired.
    wait_until(start + Duration::from_millis(1_000)).await;
    assert_eq!(sweep(&app, &sku).await, SaleState::Ended);
    app.flush(&sku).await;
    assert_eq!(sweep(&app, &sku).await, SaleState::Ended);
    let (status, body) = app.reserve(&sku, "dan", "k-dan", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ended"))
    );

    // The last hold expires: its expiry event is not in MySQL yet, so still not retired.
    wait_until(start + Duration::from_millis(2_000)).await;
    assert_eq!(sweep(&app, &sku).await, SaleState::Ended);
    let keys = SkuKeys::new(&TestApp::sku_id(&sku));
    assert!(exists(&app, &keys.outbox).await);
    flush_until_retired(&app, &sku).await;

    // Retired: every per-SKU key but the tombstone and the usage records is gone, and it
    // left the index.
    for key in [
        &keys.deadlines,
        &keys.outbox,
        &keys.comps,
        &keys.uholds,
        &keys.holds,
    ] {
        assert!(!exists(&app, key).await, "{key} should be gone");
    }
    // The usage records stay as long as an idempotency key may replay, then expire:
    // bob's key still replays his cancelled hold (from MySQL's record).
    let used_ttl: i64 = redis::cmd("PTTL")
        .arg(&keys.used)
        .query_async(&mut app.store.connection())
        .await
        .unwrap();
    assert!(used_ttl > 0, "the usage records expire: {used_ttl}");
    key_replays(&app, &sku, "bob", &cancelled, "cancelled").await;
    assert!(!indexed(&app, &sku).await);
    assert!(!flashgate::telemetry::sku_series_contains(&sku));
    // A flush that acknowledged its last batch just before another worker's sweep
    // retired the SKU finishes cleanly (the stream and its group are gone).
    let id = TestApp::sku_id(&sku);
    app.store
        .ack_outbox(&id, &["1-1".to_string()])
        .await
        .expect("acknowledging into a retired outbox");
    assert_eq!(app.worker.flush_sku(&id).await.expect("flush"), 0);
    let mut conn = app.store.connection();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys.meta)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "the tombstone expires: {ttl}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["sold"].as_u64(), view["held"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(app.mysql_sold(&sku).await, 1);

    // Reads and payments still work: the sale from Redis or MySQL, a late payment for
    // the cancelled hold is refunded through a compensation MySQL records at once.
    let (status, view) = app.reservation(&sold, SERVICE_TOKEN).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("confirmed"))
    );
    assert_eq!(app.confirm(&sold, "pay-ann").await.0, StatusCode::OK);
    let (status, refused) = app.confirm(&cancelled, "pay-bob").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["refund_required"], json!(true));
    assert_eq!(app.mysql_compensations(&sku).await, 1);
    // The retired SKU took no new outbox: nothing of it is back in Redis.
    assert!(!exists(&app, &keys.outbox).await);

    // The tombstone gone (its TTL): MySQL answers the view, reserves are `ended`.
    let _: () = redis::cmd("DEL")
        .arg(&keys.meta)
        .query_async(&mut conn)
        .await
        .unwrap();
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["sold"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(4))
    );
    let (status, body) = app.reserve(&sku, "eve", "k-eve", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ended"))
    );
    let report =
        flashgate::reconcile::run_skus(&app.store, &app.db, &[TestApp::sku_id(&sku)], false)
            .await
            .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);

    // Back on sale: what was sold stays sold, and ann's purchase still counts
    // toward her limit.
    let view = app
        .create_sku(
            &sku,
            json!({"stock": 5, "per_user_limit": 1, "hold_seconds": 60}),
        )
        .await;
    assert_eq!(
        (view["sold"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(4))
    );
    assert!(indexed(&app, &sku).await);
    let (status, body) = app.reserve(&sku, "ann", "k-ann-2", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );
    app.hold(&sku, "fay").await;
    assert_eq!(sweep(&app, &sku).await, SaleState::Open);
    let report =
        flashgate::reconcile::run_skus(&app.store, &app.db, &[TestApp::sku_id(&sku)], false)
            .await
            .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

#[tokio::test]
async fn a_retired_sale_put_back_while_its_tombstone_lives_keeps_its_counts() {
    let app = spawn_app().await;
    let sku = unique_sku("reopen");
    let start = tokio::time::Instant::now();
    app.create_sku(
        &sku,
        json!({"stock": 3, "per_user_limit": 2, "hold_seconds": 60, "ends_at": rfc3339_in(500)}),
    )
    .await;
    let sold = app.hold(&sku, "gus").await;
    assert_eq!(app.confirm(&sold, "pay-gus").await.0, StatusCode::OK);
    wait_until(start + Duration::from_millis(500)).await;
    flush_until_retired(&app, &sku).await;
    // Redis keeps the tombstone; the PUT takes it back into a sale.
    let view = app
        .create_sku(
            &sku,
            json!({"stock": 3, "per_user_limit": 1, "hold_seconds": 60}),
        )
        .await;
    assert_eq!(
        (view["sold"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(2))
    );
    let (status, body) = app.reserve(&sku, "gus", "k-gus-2", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );
    assert_eq!(sweep(&app, &sku).await, SaleState::Open);
    assert!(indexed(&app, &sku).await);
}

/// A sale Redis lost and a PUT rebuilt keeps its keys' lifetime (`claims_until`, put
/// back after the load): once it ends and retires, the buyers' usage records stay and
/// a key replays its reservation instead of answering `ended`.
#[tokio::test]
async fn a_rebuilt_sale_retires_with_its_keys_still_replaying() {
    let app = spawn_app().await;
    let sku = unique_sku("retire-rebuilt");
    let start = tokio::time::Instant::now();
    let definition =
        json!({"stock": 3, "per_user_limit": 1, "hold_seconds": 60, "ends_at": rfc3339_in(800)});
    app.create_sku(&sku, definition.clone()).await;
    let sold = app.hold(&sku, "gus").await;
    assert_eq!(app.confirm(&sold, "pay-gus").await.0, StatusCode::OK);
    app.flush(&sku).await;
    app.lose_sale(&sku).await;
    app.create_sku(&sku, definition).await;
    wait_until(start + Duration::from_millis(800)).await;
    flush_until_retired(&app, &sku).await;
    key_replays(&app, &sku, "gus", &sold, "confirmed").await;
}

#[tokio::test]
async fn many_ended_sales_leave_the_sweep_at_once() {
    let app = spawn_app().await;
    let start = tokio::time::Instant::now();
    let ends_at = rfc3339_in(1_500);
    let skus: Vec<String> = (0..40).map(|_| unique_sku("retire-many")).collect();
    for sku in &skus {
        app.create_sku(sku, json!({"stock": 1, "ends_at": ends_at}))
            .await;
    }
    wait_until(start + Duration::from_millis(1_500)).await;
    // One pass of the real worker over every SKU on sale retires them all.
    app.worker.sweep_once().await.unwrap();
    for sku in &skus {
        assert!(!indexed(&app, sku).await, "{sku} still indexed");
        assert!(!flashgate::telemetry::sku_series_contains(sku));
        let view = app.sku(sku).await;
        assert_eq!(view["available"].as_u64(), Some(1));
    }
}

#[tokio::test]
async fn stopped_flush_consumers_are_dropped_once_they_have_nothing_pending() {
    let app = spawn_app().await;
    // A stream and group of a SKU no worker walks (never defined): its test entry is
    // never flushed by another test's worker pass.
    let sku = unique_sku("reap");
    let id = TestApp::sku_id(&sku);
    let keys = SkuKeys::new(&id);
    let mut conn = app.store.connection();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.outbox)
        .arg(flashgate::keys::FLUSH_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let read = |consumer: &'static str| {
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(flashgate::keys::FLUSH_GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(&keys.outbox)
            .arg(">")
            .clone()
    };
    // An idle consumer with nothing pending, and one that holds an unacknowledged entry.
    let _: u64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&keys.outbox)
        .arg(flashgate::keys::FLUSH_GROUP)
        .arg("stopped-idle")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&keys.outbox)
        .arg("*")
        .arg("type")
        .arg("noop")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = read("stopped-pending")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reaped = app
        .store
        .reap_flush_consumers(&id, Duration::ZERO, "stopped-keep")
        .await
        .unwrap();
    assert_eq!(reaped, 1);
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&keys.outbox)
        .arg(flashgate::keys::FLUSH_GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = format!("{consumers:?}");
    assert!(
        text.contains("stopped-pending") && !text.contains("stopped-idle"),
        "{text}"
    );
    // A consumer that was idle less than the threshold stays.
    let reaped = app
        .store
        .reap_flush_consumers(&id, Duration::from_secs(3600), "stopped-keep")
        .await
        .unwrap();
    assert_eq!(reaped, 0);
}

/// The flush hints (SKUs this process just wrote an outbox event for) are noted only
/// after a script wrote one: cancels and payments for ids of SKUs that do not exist
/// leave nothing behind, whatever a client invents; a real confirm leaves its SKU.
#[tokio::test]
async fn calls_for_invented_skus_leave_no_flush_hint() {
    let app = spawn_app().await;
    let store = &app.store;
    let key = flashgate::ids::IdKey::derive(JWT_SECRET);
    let _ = store.outbox_hints.take();
    for _ in 0..20 {
        let sku = TestApp::sku_id(&unique_sku("invented"));
        let rid = key.new_reservation_id(&sku);
        assert!(store.cancel(&sku, &rid, None).await.is_err());
        assert!(store.confirm(&sku, &rid, "p", "c").await.is_err());
        assert!(store.payment_pending(&sku, &rid, "p", 1_000).await.is_err());
    }
    assert_eq!(store.outbox_hints.take(), vec![]);
    let sku = unique_sku("hinted");
    app.create_sku(&sku, json!({"stock": 1})).await;
    let rid = app.hold(&sku, "ann").await;
    let _ = store.outbox_hints.take();
    assert!(store
        .confirm(&TestApp::sku_id(&sku), &rid, "p", "c")
        .await
        .is_ok());
    assert_eq!(store.outbox_hints.take(), vec![TestApp::sku_id(&sku)]);
}

/// A SKU split over buckets retires bucket by bucket, each once nothing of it is left
/// in Redis; the SKU view then answers from MySQL, and a PUT reopens every bucket with
/// its buyers' limits intact.
#[tokio::test]
async fn a_split_sku_retires_bucket_by_bucket_and_reopens_whole() {
    retire_split_and_reopen(false).await;
}

/// As above, but the buyers' usage records went before the tombstones (they expire
/// with them at the earliest, but a Redis short of memory may evict keys with a TTL
/// first): the PUT takes their limits from MySQL.
#[tokio::test]
async fn a_split_sku_reopened_after_its_usage_records_expired_counts_what_was_bought() {
    retire_split_and_reopen(true).await;
}

async fn retire_split_and_reopen(usage_expired: bool) {
    let app = spawn_app().await;
    let sku = unique_sku("retire-split");
    let start = tokio::time::Instant::now();
    app.create_sku(
        &sku,
        json!({"stock": 6, "per_user_limit": 1, "buckets": 3, "ends_at": rfc3339_in(1_000)}),
    )
    .await;
    let id = TestApp::sku_id(&sku);
    let sales = flashgate::buckets::sales(&id, 3);
    let bought = app.hold(&sku, "ann").await;
    assert_eq!(app.confirm(&bought, "pay-ann").await.0, StatusCode::OK);
    wait_until(start + Duration::from_millis(1_000)).await;
    for sale in &sales {
        for _ in 0..200 {
            app.flush(&sku).await;
            app.worker.sweep_sku(sale.clone()).await.unwrap();
            if app.store.sweep(sale).await.unwrap().state == SaleState::Retired {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(app.store.is_retired(sale).await.unwrap(), "{sale} retired");
        assert!(!exists(&app, &SkuKeys::new(sale).deadlines).await);
    }
    let indexed: Vec<String> = app
        .store
        .sku_ids()
        .await
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(
        sales.iter().all(|s| !indexed.contains(&s.to_string())),
        "out of the index"
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["sold"].as_u64(), view["stock_total"].as_u64()),
        (Some(1), Some(6))
    );
    let (status, refused) = app.reserve(&sku, "bob", "k", 1).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("ended"))
    );
    if usage_expired {
        for sale in &sales {
            let _: () = redis::cmd("DEL")
                .arg(&SkuKeys::new(sale).used)
                .query_async(&mut app.store.connection())
                .await
                .unwrap();
        }
    }
    // Reopened: every bucket on sale again, ann's purchase still counts for her limit.
    let view = app
        .create_sku(&sku, json!({"stock": 6, "per_user_limit": 1, "buckets": 3}))
        .await;
    assert_eq!(
        (view["sold"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(5))
    );
    let (status, refused) = app.reserve(&sku, "ann", "k2", 1).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );
    let (status, body) = app.reserve(&sku, "bob", "k2", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
