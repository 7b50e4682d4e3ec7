//! The money trail (issue 9): reservations Redis forgot or lost, compensations visible
//! at once, expired holds that count for nothing, key lifetimes, strict timestamps.

use flashgate::store::inspect;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{
    self, body, spawn_app, spawn_app_with, unique_sku, user_token, TestApp, SERVICE_TOKEN,
};

/// Redis forgets a reservation (what its retention does once the key that could replay
/// it is gone): the hold record and the claim of its idempotency key.
async fn forget(app: &TestApp, sku: &str, rid: &str, user: &str) {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let mut conn = app.store.connection();
    let forgotten = inspect::forget(&mut conn, &keys, rid, user).await.unwrap();
    assert!(forgotten, "{rid} has no record");
}

/// Moves a live hold's deadline into the past, as if its hold time had gone by.
async fn overdue(app: &TestApp, sku: &str, rid: &str) {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let mut conn = app.store.connection();
    let moved = inspect::set_deadline(&mut conn, &keys, rid, 1)
        .await
        .unwrap();
    assert!(moved, "{rid} has no record");
}

/// A SKU of `stock` units named from `prefix`, and a hold of "payer" on it that Redis
/// confirmed with "pay-1" (not flushed yet): (sku, reservation id).
async fn paid_hold(app: &TestApp, prefix: &str, stock: u64) -> (String, String) {
    let sku = unique_sku(prefix);
    app.create_sku(&sku, json!({ "stock": stock })).await;
    let rid = app.hold(&sku, "payer").await;
    assert_eq!(app.confirm(&rid, "pay-1").await.0, StatusCode::OK);
    (sku, rid)
}

/// A compensation for user "payer"'s 1 unit paid with "pay-1", as MySQL records one.
fn payer_refund(
    sku: &str,
    rid: &str,
    reason: flashgate::reservation::CompensationReason,
) -> flashgate::reservation::Compensation {
    flashgate::reservation::Compensation {
        id: flashgate::ids::compensation_id(rid, "pay-1"),
        reservation_id: rid.to_owned(),
        sku: sku.to_owned(),
        user_id: "payer".into(),
        quantity: 1,
        payment_ref: "pay-1".into(),
        reason,
        resolved: false,
        created_at_ms: chrono::Utc::now().timestamp_millis(),
        resolution: Default::default(),
    }
}

async fn get_compensation(app: &TestApp, id: &str) -> (StatusCode, serde_json::Value) {
    body(
        app.client
            .get(app.url(&format!("/v1/compensations/{id}")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn resolve(app: &TestApp, id: &str) -> (StatusCode, serde_json::Value) {
    body(
        app.client
            .post(app.url(&format!("/v1/compensations/{id}/resolve")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn reservations_redis_forgot_answer_from_mysql_and_late_payments_are_refunded() {
    let app = spawn_app().await;
    let sku = unique_sku("forgotten");
    app.create_sku(&sku, json!({ "stock": 5 })).await;
    let sold = app.hold(&sku, "buyer").await;
    let cancelled = app.hold(&sku, "quitter").await;
    assert_eq!(app.confirm(&sold, "pay-1").await.0, StatusCode::OK);
    assert_eq!(
        app.cancel(&cancelled, SERVICE_TOKEN).await.0,
        StatusCode::OK
    );
    app.flush(&sku).await;
    forget(&app, &sku, &sold, "buyer").await;
    forget(&app, &sku, &cancelled, "quitter").await;

    // Reads answer from MySQL, to the owner or the service only.
    let (status, view) = app.reservation(&sold, &user_token("buyer")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (view["status"].as_str(), view["payment_ref"].as_str()),
        (Some("confirmed"), Some("pay-1"))
    );
    assert_eq!(
        app.reservation(&sold, &user_token("other")).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, view) = app.reservation(&cancelled, SERVICE_TOKEN).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );

    // The same payment again is the same sale; another one is a refund.
    let (status, view) = app.confirm(&sold, "pay-1").await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("confirmed")),
        "{view}"
    );
    let (status, problem) = app.confirm(&sold, "pay-2").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "already_confirmed");
    assert_eq!(problem["refund_required"], true);
    let (status, again) = app.confirm(&sold, "pay-2").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        again["compensation_id"], problem["compensation_id"],
        "one per payment"
    );
    let (status, problem) = app.confirm(&cancelled, "pay-3").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("reservation_cancelled"))
    );
    let (status, pending) = app.payment_pending(&cancelled, "pay-4").await;
    assert_eq!(
        (status, pending["code"].as_str()),
        (StatusCode::CONFLICT, Some("reservation_cancelled"))
    );
    assert_eq!(
        app.cancel(&sold, SERVICE_TOKEN).await.1["code"],
        "already_confirmed"
    );
    let comps = app.compensations(&format!("sku={sku}")).await;
    let reasons: Vec<&str> = comps
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{comps:?}");
    assert!(reasons.contains(&"duplicate_payment") && reasons.contains(&"cancelled"));
    assert_eq!(
        app.mysql_compensations(&sku).await,
        2,
        "durable in MySQL at once"
    );
}

#[tokio::test]
async fn a_payment_for_a_hold_redis_lost_is_refunded_and_made_up_ids_are_not_found() {
    let app = spawn_app().await;
    let sku = unique_sku("lost-hold");
    app.create_sku(&sku, json!({ "stock": 5 })).await;
    let rid = app.hold(&sku, "payer").await;
    // Redis loses the fresh hold before anything about it reached MySQL.
    forget(&app, &sku, &rid, "payer").await;

    let (status, problem) = app.confirm(&rid, "pay-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "reservation_expired");
    assert_eq!(problem["refund_required"], true);
    let id = problem["compensation_id"].as_str().unwrap();
    let (status, comp) = get_compensation(&app, id).await;
    assert_eq!(status, StatusCode::OK, "{comp}");
    assert_eq!(
        (
            comp["reservation_id"].as_str(),
            comp["payment_ref"].as_str()
        ),
        (Some(rid.as_str()), Some("pay-1"))
    );
    assert_eq!(
        app.payment_pending(&rid, "pay-2").await.1["code"],
        "reservation_expired"
    );

    // Same shape, same SKU, not issued by us: 404, nothing recorded.
    let (head, tail) = rid.split_once('.').unwrap();
    let swap = if tail.as_bytes()[5] == b'A' { "B" } else { "A" };
    let forged = format!("{head}.{}{swap}{}", &tail[..5], &tail[6..]);
    assert!(
        flashgate::ids::sku_of_reservation(&forged).is_some(),
        "routes like ours"
    );
    let (status, problem) = app.confirm(&forged, "pay-9").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{problem}"
    );
    assert_eq!(app.mysql_compensations(&sku).await, 1);
}

#[tokio::test]
async fn a_compensation_handed_out_is_readable_listed_and_resolvable_at_once() {
    let app = spawn_app().await;
    let sku = unique_sku("comp-at-once");
    app.create_sku(&sku, json!({ "stock": 2 })).await;
    let rid = app.hold(&sku, "late").await;
    assert_eq!(app.cancel(&rid, SERVICE_TOKEN).await.0, StatusCode::OK);
    let (status, problem) = app.confirm(&rid, "pay-late").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let id = problem["compensation_id"].as_str().unwrap().to_owned();

    // Before any flush.
    let (status, comp) = get_compensation(&app, &id).await;
    assert_eq!(
        (status, comp["status"].as_str()),
        (StatusCode::OK, Some("open")),
        "{comp}"
    );
    let listed = app.compensations(&format!("sku={sku}&status=open")).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let (status, comp) = resolve(&app, &id).await;
    assert_eq!(
        (status, comp["status"].as_str()),
        (StatusCode::OK, Some("resolved")),
        "{comp}"
    );
    assert_eq!(
        resolve(&app, &id).await.1["status"],
        "resolved",
        "idempotent"
    );
    assert!(app
        .compensations(&format!("sku={sku}&status=open"))
        .await
        .is_empty());

    // The flush writes it, and applies the resolve made before.
    app.flush(&sku).await;
    let status: String =
        sqlx::query_scalar("SELECT CAST(status AS CHAR) FROM compensations WHERE id = ?")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(status, "resolved");
    assert_eq!(get_compensation(&app, &id).await.1["status"], "resolved");
    assert_eq!(
        get_compensation(&app, "c_nope").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn compensations_are_visible_and_resolvable_while_mysql_is_down() {
    let working = spawn_app().await;
    let sku = unique_sku("comp-no-mysql");
    working.create_sku(&sku, json!({ "stock": 2 })).await;
    let rid = working.hold(&sku, "late").await;
    assert_eq!(working.cancel(&rid, SERVICE_TOKEN).await.0, StatusCode::OK);

    // A gateway whose MySQL is unreachable (nothing listens there).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let no_mysql = spawn_app_with(common::serve_args(
        &common::redis_url(),
        &format!("mysql://root@127.0.0.1:{port}/flashgate"),
    ))
    .await;
    let (status, problem) = no_mysql.confirm(&rid, "pay-late").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let id = problem["compensation_id"].as_str().unwrap().to_owned();
    let (status, comp) = get_compensation(&no_mysql, &id).await;
    assert_eq!(
        (status, comp["status"].as_str()),
        (StatusCode::OK, Some("open")),
        "{comp}"
    );
    let listed = no_mysql.compensations(&format!("sku={sku}")).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (status, comp) = resolve(&no_mysql, &id).await;
    assert_eq!(
        (status, comp["status"].as_str()),
        (StatusCode::OK, Some("resolved")),
        "{comp}"
    );

    // MySQL back (the working gateway's worker): written, resolved.
    working.flush(&sku).await;
    let (status, comp) = get_compensation(&working, &id).await;
    assert_eq!(
        (status, comp["status"].as_str()),
        (StatusCode::OK, Some("resolved")),
        "{comp}"
    );
    assert_eq!(working.mysql_compensations(&sku).await, 1);
}

#[tokio::test]
async fn an_expired_hold_counts_for_nothing_before_any_sweep() {
    // No worker runs in tests: nothing sweeps.
    let app = spawn_app().await;
    let sku = unique_sku("expired-unswept");
    app.create_sku(&sku, json!({ "stock": 3, "per_user_limit": 1 }))
        .await;
    let first = app.hold(&sku, "eve").await;
    let other = app.hold(&sku, "zed").await;
    overdue(&app, &sku, &first).await;
    overdue(&app, &sku, &other).await;
    assert_eq!(
        app.reservation(&first, SERVICE_TOKEN).await.1["status"],
        "expired"
    );

    // The limit does not count it.
    let (status, view) = app.reserve(&sku, "eve", "second-key", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(
        app.reservation(&first, SERVICE_TOKEN).await.1["status"],
        "expired"
    );
    // The SKU view counts live holds only.
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["held"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(2)),
        "{view}"
    );
    // Nor does the admin check: 1 live hold fits a stock of 1.
    let (status, view) = app
        .put_sku(&sku, json!({ "stock": 1, "per_user_limit": 1 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (view["held"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(0))
    );
    let (status, problem) = app.put_sku(&sku, json!({ "stock": 0 })).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("stock_below_committed"))
    );
    let stock: u64 = sqlx::query_scalar("SELECT stock_total FROM skus WHERE sku = ?")
        .bind(&sku)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        stock, 1,
        "a refused definition is not recorded in MySQL either"
    );
}

#[tokio::test]
async fn one_idempotency_key_makes_one_hold_for_as_long_as_the_hold_can_be_paid() {
    let mut args = common::serve_args(&common::redis_url(), &common::database_url());
    args.idempotency_ttl_seconds = 1;
    args.payment_grace_seconds = 1;
    let app = spawn_app_with(args).await;
    let sku = unique_sku("short-key");
    app.create_sku(
        &sku,
        json!({ "stock": 5, "per_user_limit": 5, "hold_seconds": 3 }),
    )
    .await;
    let (status, first) = app.reserve(&sku, "kim", "the-key", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    // Past the 1 s idempotency TTL, well within the hold.
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    let response = app.reserve_raw(&sku, "kim", "the-key", 1).await;
    assert_eq!(
        response
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    let (status, again) = body(response).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        again["reservation_id"], first["reservation_id"],
        "no second hold"
    );
    let view = app.sku(&sku).await;
    assert_eq!(view["held"], 1);
}

#[tokio::test]
async fn sale_windows_outside_1970_to_9999_are_refused() {
    let app = spawn_app().await;
    let sku = unique_sku("window");
    for (field, value) in [
        ("starts_at", "0000-01-01T00:00:00+01:00"),
        ("starts_at", "9999-12-31T23:30:00-01:00"),
        ("ends_at", "1969-12-31T23:59:59Z"),
    ] {
        let (status, problem) = app.put_sku(&sku, json!({ "stock": 1, field: value })).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{value}: {problem}"
        );
    }
    let view = app
        .create_sku(
            &sku,
            json!({ "stock": 1, "starts_at": "9999-12-31T23:59:59.999Z" }),
        )
        .await;
    assert_eq!(view["starts_at"], "9999-12-31T23:59:59.999Z");
}

#[tokio::test]
async fn user_ids_are_compared_byte_for_byte_and_reconcile_recounts_per_user_limits() {
    let app = spawn_app().await;
    let sku = unique_sku("bytewise");
    app.create_sku(&sku, json!({ "stock": 5, "per_user_limit": 1 }))
        .await;
    for user in ["alice", "alice "] {
        let rid = app.hold(&sku, user).await;
        assert_eq!(
            app.confirm(&rid, &format!("pay-{}", user.len())).await.0,
            StatusCode::OK
        );
    }
    let live = app.hold(&sku, "bob").await;
    app.flush(&sku).await;
    let per_user = {
        let mut conn = app.db.acquire().await.unwrap();
        flashgate::db::sold_per_user(&mut conn, &TestApp::sku_id(&sku))
            .await
            .unwrap()
    };
    assert_eq!(per_user.len(), 2, "two users in MySQL too: {per_user:?}");

    // The per-user counts drift (lost, inflated): reconcile finds and rebuilds them.
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let _: () = redis::pipe()
        .del(&keys.used)
        .ignore()
        .hset(&keys.used, "mallory", 1)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let only = [TestApp::sku_id(&sku)];
    let report = flashgate::reconcile::run_skus(&app.store, &app.db, &only, true)
        .await
        .unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == "used_mismatch" && f.repaired),
        "{:?}",
        report.findings
    );
    let used: std::collections::HashMap<String, u64> = inspect::usage(&mut conn, &keys)
        .await
        .unwrap()
        .into_iter()
        .map(|(user, u)| (user, u.units))
        .collect();
    let expected: std::collections::HashMap<String, u64> =
        [("alice", 1), ("alice ", 1), ("bob", 1)]
            .map(|(u, q)| (u.to_string(), q))
            .into();
    assert_eq!(used, expected);
    let report = flashgate::reconcile::run_skus(&app.store, &app.db, &only, false)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.findings);
    // The limit holds again: bob's live hold counts.
    assert_eq!(
        app.reserve(&sku, "bob", "another", 1).await.1["code"],
        "limit_exceeded"
    );
    let _ = live;
}

#[tokio::test]
async fn reconcile_restores_every_term_from_mysql_and_one_broken_sku_does_not_stop_the_pass() {
    let app = spawn_app().await;
    let good = unique_sku("terms");
    let broken = unique_sku("broken");
    app.create_sku(
        &good,
        json!({ "stock": 4, "per_user_limit": 2, "hold_seconds": 60,
        "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z" }),
    )
    .await;
    app.create_sku(&broken, json!({ "stock": 1 })).await;
    let good_keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&good));
    let mut conn = app.store.connection();
    // Redis sells under terms MySQL never recorded.
    let _: () = redis::pipe()
        .hset(&good_keys.meta, "per_user_limit", 50)
        .ignore()
        .hset(&good_keys.meta, "hold_ms", 1)
        .ignore()
        .hset(&good_keys.meta, "starts_at", "")
        .ignore()
        .hset(&good_keys.meta, "ends_at", "")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    // The other SKU's state is unreadable (a key of the wrong type). Out of the SKU
    // index first: the other tests' sweeps walk it, and must not meet this one.
    let broken_keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&broken));
    // (Two commands: the index and the SKU's keys may be in two cluster slots.)
    let _: () = redis::AsyncCommands::srem(&mut conn, flashgate::keys::SKU_INDEX, &broken)
        .await
        .unwrap();
    let _: () = redis::pipe()
        .del(&broken_keys.deadlines)
        .ignore()
        .set(&broken_keys.deadlines, "not a zset")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    // The broken one first: the pass must still reach the other.
    let skus = [TestApp::sku_id(&broken), TestApp::sku_id(&good)];
    let report = flashgate::reconcile::run_skus(&app.store, &app.db, &skus, true)
        .await
        .unwrap();
    let kinds: Vec<(&str, &str)> = report
        .findings
        .iter()
        .map(|f| (f.sku.as_str(), f.kind))
        .collect();
    assert!(
        kinds.contains(&(broken.as_str(), "check_failed")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(good.as_str(), "terms_mismatch")),
        "{kinds:?}"
    );
    assert_eq!(report.exit_code(), 1);
    let _: () = redis::cmd("DEL")
        .arg(&broken_keys.deadlines)
        .query_async(&mut conn)
        .await
        .unwrap();
    let view = app.sku(&good).await;
    assert_eq!(
        (
            view["per_user_limit"].as_u64(),
            view["hold_seconds"].as_u64()
        ),
        (Some(2), Some(60)),
        "{view}"
    );
    assert_eq!(view["starts_at"], "2026-01-01T00:00:00.000Z");
    assert_eq!(view["ends_at"], "2099-01-01T00:00:00.000Z");
}

#[tokio::test]
async fn the_sweep_goes_on_past_a_batch_of_stale_index_entries() {
    let app = spawn_app().await;
    let sku = unique_sku("stale-index");
    app.create_sku(&sku, json!({ "stock": 1 })).await;
    let rid = app.hold(&sku, "u").await;
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    // More stale entries than one sweep batch, all due before the real hold.
    let mut pipe = redis::pipe();
    for i in 0..(flashgate::limits::SWEEP_BATCH + 10) {
        pipe.zadd(&keys.deadlines, format!("gone-{i}"), 0).ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    overdue(&app, &sku, &rid).await;
    let expired = app.worker.sweep_sku(TestApp::sku_id(&sku)).await.unwrap();
    assert_eq!(expired, 1);
    assert_eq!(app.sku(&sku).await["available"], 1);
}

#[tokio::test]
async fn the_sold_out_flag_answers_sold_out_only_and_only_for_its_200_ms() {
    let app = spawn_app().await;
    let sku = unique_sku("flag-answers");
    app.create_sku(&sku, json!({ "stock": 1, "per_user_limit": 1 }))
        .await;
    app.hold(&sku, "alice").await;
    assert_eq!(
        app.reserve(&sku, "bob", "b1", 1).await.1["code"],
        "sold_out"
    );
    // Within the flag's window, alice (at her limit) is told sold_out too: the flag
    // stands in for any refusal of a sold-out SKU (docs/reference.md, "The sold-out flag").
    assert_eq!(
        app.reserve(&sku, "alice", "a2", 1).await.1["code"],
        "sold_out"
    );
    tokio::time::sleep(flashgate::limits::SOLD_OUT_FLAG_TTL + std::time::Duration::from_millis(50))
        .await;
    assert_eq!(
        app.reserve(&sku, "alice", "a3", 1).await.1["code"],
        "limit_exceeded"
    );
}

/// Once the flush has written how a reservation ended, Redis keeps only the claim of
/// its idempotency key: the hold record goes, and replays, reads and late payments are
/// answered from MySQL's record (what keeps an ended reservation's Redis cost small,
/// issue 10).
#[tokio::test]
async fn an_ended_reservation_keeps_only_its_key_in_redis_once_mysql_has_it() {
    let app = spawn_app().await;
    let sku = unique_sku("ended-lean");
    app.create_sku(&sku, json!({ "stock": 5 })).await;
    let sold = app.hold(&sku, "buyer").await;
    let cancelled = app.hold(&sku, "quitter").await;
    let live = app.hold(&sku, "waiter").await;
    assert_eq!(app.confirm(&sold, "pay-1").await.0, StatusCode::OK);
    assert_eq!(
        app.cancel(&cancelled, SERVICE_TOKEN).await.0,
        StatusCode::OK
    );
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let record = inspect::hold(&mut conn, &keys, &sold).await.unwrap();
    assert_eq!(record.unwrap().status, "confirmed", "kept until flushed");
    app.flush(&sku).await;
    let usage = inspect::usage(&mut conn, &keys).await.unwrap();
    for (rid, user) in [(&sold, "buyer"), (&cancelled, "quitter")] {
        let record = inspect::hold(&mut conn, &keys, rid).await.unwrap();
        assert_eq!(record, None, "{user}'s hold record stayed");
        let claims = &usage[user].claims;
        assert!(
            claims.len() == 1 && !claims[0].live && claims[0].key == format!("key-{user}"),
            "{user}'s key: {claims:?}"
        );
    }
    let record = inspect::hold(&mut conn, &keys, &live).await.unwrap();
    assert_eq!(
        record.unwrap().status,
        "held",
        "a live hold keeps its record"
    );

    // The key still makes no second hold: it replays the reservation from MySQL.
    let response = app.reserve_raw(&sku, "buyer", "key-buyer", 1).await;
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let (status, view) = body(response).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(
        (view["reservation_id"].as_str(), view["status"].as_str()),
        (Some(sold.as_str()), Some("confirmed"))
    );
    let (status, view) = app.reserve(&sku, "quitter", "key-quitter", 1).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::CREATED, Some("cancelled"))
    );
    let (status, problem) = app.reserve(&sku, "quitter", "key-quitter", 2).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("idempotency_key_reused")
        )
    );
    // Reads and payments: the record answers, the money is never lost.
    let (status, view) = app.reservation(&sold, &user_token("buyer")).await;
    assert_eq!(
        (status, view["payment_ref"].as_str()),
        (StatusCode::OK, Some("pay-1"))
    );
    assert_eq!(app.confirm(&sold, "pay-1").await.0, StatusCode::OK);
    let (status, problem) = app.confirm(&cancelled, "pay-late").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("reservation_cancelled"))
    );
    let (status, comp) = get_compensation(&app, problem["compensation_id"].as_str().unwrap()).await;
    assert_eq!(
        (status, comp["reason"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    assert_eq!(app.mysql_compensations(&sku).await, 1);
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["held"].as_u64(), view["sold"].as_u64()),
        (Some(1), Some(1))
    );
}

/// The flush meets a second payment for a sale MySQL already records: Redis rolled the
/// SKU back after the first confirmation was flushed (what a failover without WAIT can
/// do; here its keys are restored as they were before that confirmation) and confirmed
/// the hold again. The sale stays the first payment's, and the second payment becomes
/// exactly one `duplicate_payment` compensation, found by the flush.
#[tokio::test]
async fn the_flush_makes_a_second_payment_for_a_recorded_sale_one_compensation() {
    let app = spawn_app().await;
    let sku = unique_sku("flush-second-pay");
    app.create_sku(&sku, json!({ "stock": 3 })).await;
    let rid = app.hold(&sku, "payer").await;
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let mut before = Vec::new();
    for key in keys.sale() {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        before.push((key, dump));
    }
    assert_eq!(app.confirm(&rid, "pay-1").await.0, StatusCode::OK);
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);

    // The rollback: the SKU's keys as they were before the confirmation.
    for (key, dump) in &before {
        let mut cmd = redis::cmd(if dump.is_some() { "RESTORE" } else { "DEL" });
        cmd.arg(*key);
        if let Some(dump) = dump {
            cmd.arg(0).arg(dump).arg("REPLACE");
        }
        let _: () = cmd.query_async(&mut conn).await.unwrap();
    }
    let (status, view) = app.confirm(&rid, "pay-2").await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("confirmed")),
        "Redis sees a live hold again: {view}"
    );
    app.flush(&sku).await;

    let (payment_ref, sold): (String, u64) = sqlx::query_as(
        "SELECT s.payment_ref, k.sold FROM sales s JOIN skus k ON k.sku = s.sku WHERE s.reservation_id = ?",
    )
    .bind(&rid)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((payment_ref.as_str(), sold), ("pay-1", 1));
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    let comps: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT id, payment_ref, CAST(reason AS CHAR), CAST(found_by AS CHAR)
         FROM compensations WHERE reservation_id = ?",
    )
    .bind(&rid)
    .fetch_all(&app.db)
    .await
    .unwrap();
    let expected = (
        flashgate::ids::compensation_id(&rid, "pay-2"),
        "pay-2".to_string(),
        "duplicate_payment".to_string(),
        "flush".to_string(),
    );
    assert_eq!(
        comps,
        [expected],
        "one compensation, for the second payment"
    );
}

/// The flush refuses a sale MySQL has no stock for (after a Redis rollback), but only
/// on MySQL's settled stock: an admin PUT that lowered the stock commits MySQL first
/// and takes it back if Redis refuses (reserves took the units meanwhile). A flush in
/// that window waits for the PUT's admin lock and records the sales Redis made.
#[tokio::test]
async fn a_sale_flushed_while_an_admin_put_is_half_way_is_recorded() {
    use sqlx::Connection;
    let app = spawn_app().await;
    let sku = unique_sku("put-window");
    app.create_sku(&sku, json!({ "stock": 2 })).await;
    for user in ["a", "b"] {
        let rid = app.hold(&sku, user).await;
        assert_eq!(
            app.confirm(&rid, &format!("pay-{user}")).await.0,
            StatusCode::OK
        );
    }
    // A PUT of stock 1, half-way: its lock held, MySQL's lower stock committed, Redis
    // about to refuse it (2 sold).
    let mut put = sqlx::MySqlConnection::connect(&common::database_url())
        .await
        .unwrap();
    let lock = format!("flashgate:sku:{sku}");
    let got: i64 = sqlx::query_scalar("SELECT GET_LOCK(?, 5)")
        .bind(&lock)
        .fetch_one(&mut put)
        .await
        .unwrap();
    assert_eq!(got, 1);
    sqlx::query("UPDATE skus SET stock_total = 1 WHERE sku = ?")
        .bind(&sku)
        .execute(&mut put)
        .await
        .unwrap();
    let take_back = async {
        // Once the flush waits for the lock, the PUT takes its stock back and ends.
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST
                 WHERE INFO LIKE 'SELECT GET_LOCK%' AND ID <> CONNECTION_ID()",
            )
            .fetch_one(&mut put)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        sqlx::query("UPDATE skus SET stock_total = 2 WHERE sku = ?")
            .bind(&sku)
            .execute(&mut put)
            .await
            .unwrap();
        sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(&lock)
            .execute(&mut put)
            .await
            .unwrap();
    };
    tokio::join!(app.flush(&sku), take_back);
    assert_eq!(app.mysql_sales_count(&sku).await, 2);
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert!(comps.is_empty(), "{comps:?}");
}

/// A confirmation flushed again (a worker that died between its commit and its
/// acknowledgement, a rollback that brought the outbox entry back) changes nothing: no
/// second sale, and no compensation for the payment the sale was recorded under.
#[tokio::test]
async fn a_confirmation_applied_twice_is_one_sale_and_no_refund() {
    let app = spawn_app().await;
    let (sku, _) = paid_hold(&app, "replayed", 1).await;
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let read: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, &keys.outbox)
            .await
            .unwrap();
    let events: Vec<flashgate::db::OutboxEvent> = read
        .ids
        .iter()
        .filter_map(|entry| {
            flashgate::worker::parse_event(&flashgate::store::OutboxEntry {
                stream_id: entry.id.clone(),
                fields: entry.clone(),
            })
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, flashgate::db::OutboxEvent::Confirmed { .. })),
        "{events:?}"
    );
    for _ in 0..2 {
        flashgate::db::apply_events(&app.db, &events).await.unwrap();
    }
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert!(comps.is_empty(), "{comps:?}");
}

/// One payment, one outcome: a payment MySQL already records as refunded (after a
/// Redis rollback the gateway answered it from MySQL's record, and the rolled-back
/// Redis then took it as a confirmation) does not become a sale when that confirmation
/// is flushed; the refund stands.
#[tokio::test]
async fn a_payment_recorded_as_refunded_is_not_made_a_sale_by_the_flush() {
    use flashgate::reservation::CompensationReason;
    let app = spawn_app().await;
    let (sku, rid) = paid_hold(&app, "refunded-first", 1).await;
    let refund = payer_refund(&sku, &rid, CompensationReason::Expired);
    flashgate::db::record_compensation(&app.db, &refund, flashgate::db::FoundBy::Record)
        .await
        .unwrap();
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 0);
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(comps.len(), 1, "{comps:?}");
    assert_eq!(comps[0]["payment_ref"], "pay-1");
    // Nor an event saying it was sold.
    let confirmed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM events WHERE sku = ? AND type = 'reservation.confirmed'",
    )
    .bind(&sku)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(confirmed, 0);
    // And MySQL's record of the reservation does not say it was sold.
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM reservations WHERE reservation_id = ?")
            .bind(&rid)
            .fetch_optional(&app.db)
            .await
            .unwrap();
    assert_ne!(status.as_deref(), Some("confirmed"));
}

/// Two confirmations in one flushed batch where MySQL has room for one (its record of
/// the stock is below what Redis sold: what a rollback leaves): the first is a sale,
/// the second is refused; never both.
#[tokio::test]
async fn a_batch_with_more_sales_than_mysql_has_stock_for_records_only_what_fits() {
    let app = spawn_app().await;
    let sku = unique_sku("batch-room");
    app.create_sku(&sku, json!({ "stock": 2 })).await;
    for user in ["a", "b"] {
        let rid = app.hold(&sku, user).await;
        assert_eq!(
            app.confirm(&rid, &format!("pay-{user}")).await.0,
            StatusCode::OK
        );
    }
    sqlx::query("UPDATE skus SET stock_total = 1 WHERE sku = ?")
        .bind(&sku)
        .execute(&app.db)
        .await
        .unwrap();
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(comps.len(), 1, "{comps:?}");
    assert_eq!(comps[0]["reason"], "cancelled");
}

/// A confirm of `retried` for `rid` (a hold of "payer" Redis forgot, so answered from
/// MySQL's record) while the flush, half-way, holds the SKU's row and records `rid`'s
/// sale under `sold`: the confirm's answer, once that flush committed.
async fn confirm_meeting_a_flush(
    app: &TestApp,
    sku: &str,
    rid: &str,
    retried: &str,
    sold: &str,
) -> (StatusCode, serde_json::Value) {
    let mut flush = app.db.begin().await.unwrap();
    sqlx::query("SELECT sold FROM skus WHERE sku = ? FOR UPDATE")
        .bind(sku)
        .fetch_one(&mut *flush)
        .await
        .unwrap();
    let waiting_for_the_row = || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST
             WHERE INFO LIKE 'SELECT sku FROM skus WHERE sku = % FOR UPDATE'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        waiting > 0
    };
    let (answer, ()) = tokio::join!(app.confirm(rid, retried), async {
        crate::webhooks::until("the retried payment waits for the SKU's row", || {
            waiting_for_the_row()
        })
        .await;
        sqlx::query(
            "INSERT INTO sales (reservation_id, sku, user_id, quantity, payment_ref, confirmed_at)
             VALUES (?, ?, 'payer', 1, ?, NOW(3))",
        )
        .bind(rid)
        .bind(sku)
        .bind(sold)
        .execute(&mut *flush)
        .await
        .unwrap();
        sqlx::query("UPDATE skus SET sold = sold + 1 WHERE sku = ?")
            .bind(sku)
            .execute(&mut *flush)
            .await
            .unwrap();
        flush.commit().await.unwrap();
    });
    answer
}

/// One payment, one outcome, when a payment retried for a reservation Redis forgot
/// meets the flush of that very payment's confirmation: the flush holds the SKU's row
/// while it records the sale; the retry's refund waits for that row, then sees the
/// sale and answers it (200), so MySQL records a sale and no refund. Before, the refund
/// committed beside the flush and the payment was both sold and refunded.
#[tokio::test]
async fn a_retried_payment_meeting_the_flush_of_its_sale_is_not_also_refunded() {
    let app = spawn_app().await;
    let (sku, rid) = paid_hold(&app, "retry-vs-flush", 2).await;
    // Redis forgets it (its retention) before the confirmation reaches MySQL.
    forget(&app, &sku, &rid, "payer").await;
    let (status, answer) = confirm_meeting_a_flush(&app, &sku, &rid, "pay-1", "pay-1").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "confirmed");
    assert_eq!(answer["payment_ref"], "pay-1");
    assert_eq!(app.mysql_compensations(&sku).await, 0, "refunded too");
    // The real flush of that confirmation later: a replay, still one sale, no refund.
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    assert_eq!(app.mysql_compensations(&sku).await, 0);
}

/// Another payment for the same reservation meeting that flush: the sale it waited for
/// is under another payment_ref, so this one is a duplicate payment (409
/// `already_confirmed`, a `duplicate_payment` refund), not an expired hold's refund.
#[tokio::test]
async fn a_second_payment_meeting_the_flush_of_the_first_is_a_duplicate() {
    let app = spawn_app().await;
    let (sku, rid) = paid_hold(&app, "second-vs-flush", 2).await;
    forget(&app, &sku, &rid, "payer").await;
    let (status, problem) = confirm_meeting_a_flush(&app, &sku, &rid, "pay-2", "pay-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "already_confirmed", "{problem}");
    let id = problem["compensation_id"].as_str().unwrap().to_owned();
    let (_, refund) = get_compensation(&app, &id).await;
    assert_eq!(
        (refund["reason"].as_str(), refund["payment_ref"].as_str()),
        (Some("duplicate_payment"), Some("pay-2")),
        "{refund}"
    );
}

/// A payment answered from MySQL's record whose compensation is already recorded (the
/// flush refused its sale after a Redis rollback: reason `cancelled`) is answered with
/// that compensation's reason, not the one the reservation's record alone suggests.
#[tokio::test]
async fn a_refund_answered_from_the_record_says_the_recorded_reason() {
    use flashgate::reservation::CompensationReason;
    let app = spawn_app().await;
    let sku = unique_sku("recorded-reason");
    app.create_sku(&sku, json!({ "stock": 1 })).await;
    let rid = app.hold(&sku, "payer").await;
    forget(&app, &sku, &rid, "payer").await;
    let refused = payer_refund(&sku, &rid, CompensationReason::Cancelled);
    flashgate::db::record_compensation(&app.db, &refused, flashgate::db::FoundBy::Flush)
        .await
        .unwrap();
    let (status, problem) = app.confirm(&rid, "pay-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "reservation_cancelled", "{problem}");
    assert_eq!(problem["compensation_id"], refused.id.as_str());
    assert_eq!(app.mysql_compensations(&sku).await, 1);
}

/// A payment retried for a hold Redis lost before anything of it reached MySQL is
/// refunded from the record, which knows neither the user nor the units ('' and 0).
/// When the confirmation Redis had made of that same payment is flushed, the refund
/// gets them, and the reservation gets a record: a read finds it ended, not a sale.
#[tokio::test]
async fn a_refund_recorded_without_its_hold_gets_its_user_and_units_from_the_flush() {
    let app = spawn_app().await;
    let (sku, rid) = paid_hold(&app, "refund-filled", 2).await;
    forget(&app, &sku, &rid, "payer").await;
    let (status, problem) = app.confirm(&rid, "pay-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let id = problem["compensation_id"].as_str().unwrap().to_owned();
    let (_, before) = get_compensation(&app, &id).await;
    assert_eq!(
        (before["user_id"].as_str(), before["quantity"].as_u64()),
        (Some(""), Some(0)),
        "{before}"
    );
    app.flush(&sku).await;
    let (_, after) = get_compensation(&app, &id).await;
    assert_eq!(
        (after["user_id"].as_str(), after["quantity"].as_u64()),
        (Some("payer"), Some(1)),
        "{after}"
    );
    assert_eq!(app.mysql_sales_count(&sku).await, 0);
    let (status, view) = app.reservation(&rid, SERVICE_TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "expired", "{view}");
    // With the key that made it: a rebuild puts the key back, so it replays this hold.
    let key: Option<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM reservations WHERE reservation_id = ?")
            .bind(&rid)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(key.is_some(), "recorded without its idempotency key");
}
