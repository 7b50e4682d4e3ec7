//! The reserve path: contract, idempotency, limits, window, stock.

use crate::common::*;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Barrier;

#[tokio::test]
async fn reserve_creates_a_hold_that_owner_and_service_can_read() {
    let app = spawn_app().await;
    let sku = unique_sku("contract");
    let created = app
        .create_sku(
            &sku,
            json!({"stock": 10, "per_user_limit": 3, "hold_seconds": 120}),
        )
        .await;
    assert_eq!(created["available"], 10);
    assert_eq!(created["hold_seconds"], 120);
    assert_eq!(created["starts_at"], serde_json::Value::Null);

    let response = app.reserve_raw(&sku, "alice", "k-1", 2).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.headers().get("idempotent-replayed").is_none());
    let (_, view) = body(response).await;
    assert_eq!(view["sku"], sku.as_str());
    assert_eq!(view["user_id"], "alice");
    assert_eq!(view["quantity"], 2);
    assert_eq!(view["status"], "held");
    assert!(view.get("payment_ref").is_none());
    let expires_at = view["expires_at"].as_str().unwrap();
    let created_at = view["created_at"].as_str().unwrap();
    assert!(
        expires_at.ends_with('Z') && expires_at.len() == 24,
        "{expires_at}"
    );
    let lifetime = chrono::DateTime::parse_from_rfc3339(expires_at).unwrap()
        - chrono::DateTime::parse_from_rfc3339(created_at).unwrap();
    assert_eq!(lifetime.num_seconds(), 120);

    let id = view["reservation_id"].as_str().unwrap();
    assert!(!id.contains(&sku), "reservation ids are opaque");
    let (status, read) = app.reservation(id, &user_token("alice")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read, view);
    let (status, read) = app.reservation(id, SERVICE_TOKEN).await;
    assert_eq!((status, &read["status"]), (StatusCode::OK, &json!("held")));
    let (status, problem) = app.reservation(id, &user_token("mallory")).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );

    let sku_view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (sku_view["available"].as_u64(), sku_view["held"].as_u64()),
        (Some(8), Some(2))
    );
}

#[tokio::test]
async fn a_replayed_key_answers_the_same_reservation_and_another_body_is_422() {
    let app = spawn_app().await;
    let sku = unique_sku("idem");
    app.create_sku(&sku, json!({"stock": 10, "per_user_limit": 5}))
        .await;
    let (_, first) = app.reserve(&sku, "bob", "same-key", 1).await;
    let replay = app.reserve_raw(&sku, "bob", "same-key", 1).await;
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let (_, replayed) = body(replay).await;
    assert_eq!(replayed["reservation_id"], first["reservation_id"]);

    let (status, problem) = app.reserve(&sku, "bob", "same-key", 2).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["code"], "idempotency_key_reused");

    // The key is scoped to the user: another user's identical key is a new hold.
    let (status, other) = app.reserve(&sku, "carol", "same-key", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(other["reservation_id"], first["reservation_id"]);
    // ... and to the SKU.
    let sku2 = unique_sku("idem2");
    app.create_sku(&sku2, json!({"stock": 1})).await;
    let (status, _) = app.reserve(&sku2, "bob", "same-key", 1).await;
    assert_eq!(status, StatusCode::CREATED);

    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 2);
}

#[tokio::test]
async fn fifty_concurrent_requests_with_one_key_create_one_hold() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("idem-race");
    app.create_sku(&sku, json!({"stock": 100, "per_user_limit": 100}))
        .await;
    let barrier = Arc::new(Barrier::new(50));
    let answers = join_all((0..50).map(|_| {
        let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            app.reserve(&sku, "dave", "one-key", 1).await
        })
    }))
    .await;
    let mut ids = HashSet::new();
    for answer in answers {
        let (status, view) = answer.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{view}");
        ids.insert(view["reservation_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "one key, one reservation");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 1);
}

#[tokio::test]
async fn the_per_user_limit_counts_held_paying_and_confirmed() {
    let app = spawn_app().await;
    let sku = unique_sku("limit");
    app.create_sku(&sku, json!({"stock": 10, "per_user_limit": 3}))
        .await;
    let (status, problem) = app.reserve(&sku, "erin", "too-many", 4).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("limit_exceeded"))
    );

    let (_, a) = app.reserve(&sku, "erin", "a", 1).await;
    let (_, b) = app.reserve(&sku, "erin", "b", 1).await;
    let (_, c) = app.reserve(&sku, "erin", "c", 1).await;
    app.payment_pending(b["reservation_id"].as_str().unwrap(), "pay-b")
        .await;
    let (status, _) = app
        .confirm(c["reservation_id"].as_str().unwrap(), "pay-c")
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, problem) = app.reserve(&sku, "erin", "d", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("limit_exceeded"))
    );

    // A rejection recorded nothing: once a unit comes back, the same key succeeds.
    let (status, _) = app
        .cancel(a["reservation_id"].as_str().unwrap(), &user_token("erin"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, view) = app.reserve(&sku, "erin", "d", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["held"].as_u64(), view["sold"].as_u64()),
        (Some(2), Some(1))
    );
}

#[tokio::test]
async fn the_sale_window_is_enforced_by_redis_time() {
    let app = spawn_app().await;
    let later = unique_sku("not-started");
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    app.create_sku(&later, json!({"stock": 5, "starts_at": in_an_hour}))
        .await;
    let (status, problem) = app.reserve(&later, "frank", "k", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("not_started"))
    );

    let over = unique_sku("ended");
    let an_hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    app.create_sku(
        &over,
        json!({"stock": 5, "starts_at": two_hours_ago, "ends_at": an_hour_ago}),
    )
    .await;
    let (status, problem) = app.reserve(&over, "frank", "k", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("ended"))
    );

    let open = unique_sku("open");
    let in_a_minute = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    app.create_sku(
        &open,
        json!({"stock": 5, "starts_at": an_hour_ago, "ends_at": in_a_minute}),
    )
    .await;
    let (status, _) = app.reserve(&open, "frank", "k", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    for sku in [&later, &over] {
        let view = app.assert_stock_adds_up(sku).await;
        assert_eq!(view["available"], 5, "a rejection changes nothing");
    }
    let view = app.sku(&open).await;
    assert_eq!(view["starts_at"].as_str().unwrap().len(), 24);
}

#[tokio::test]
async fn more_than_available_is_sold_out_with_nothing_partial() {
    let app = spawn_app().await;
    let sku = unique_sku("partial");
    app.create_sku(&sku, json!({"stock": 2, "per_user_limit": 5}))
        .await;
    let (status, problem) = app.reserve(&sku, "gina", "k", 3).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("sold_out"))
    );
    assert_eq!(app.sku(&sku).await["available"], 2);
    let (status, problem) = app.reserve(&unique_sku("missing"), "gina", "k", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
}

#[tokio::test]
async fn admin_redefinition_keeps_held_and_sold_and_refuses_going_below_them() {
    let app = spawn_app().await;
    let sku = unique_sku("restock");
    app.create_sku(&sku, json!({"stock": 3, "per_user_limit": 1}))
        .await;
    let held = app.hold(&sku, "h1").await;
    let sold = app.hold(&sku, "h2").await;
    app.confirm(&sold, "pay").await;
    let _ = held;
    let (status, problem) = app.put_sku(&sku, json!({"stock": 1})).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("stock_below_committed"))
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        view["stock_total"], 3,
        "a refused redefinition changes nothing"
    );
    let stored: u64 = sqlx::query_scalar("SELECT stock_total FROM skus WHERE sku = ?")
        .bind(&sku)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 3, "MySQL was rolled back too");

    let view = app
        .create_sku(&sku, json!({"stock": 10, "hold_seconds": 60}))
        .await;
    assert_eq!(
        (
            view["available"].as_u64(),
            view["held"].as_u64(),
            view["sold"].as_u64()
        ),
        (Some(8), Some(1), Some(1))
    );
    assert_eq!(
        view["per_user_limit"], 1,
        "omitted fields take their defaults"
    );
    let view = app.create_sku(&sku, json!({"stock": 2})).await;
    assert_eq!(view["available"], 0);
    app.assert_stock_adds_up(&sku).await;
}

#[tokio::test]
async fn two_thousand_users_race_for_one_hundred_units() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("race");
    app.create_sku(&sku, json!({"stock": 100})).await;
    let users = 2000;
    let barrier = Arc::new(Barrier::new(users));
    let tasks = (0..users).map(|i| {
        let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
        tokio::spawn(async move {
            let user = format!("racer-{i}");
            let request = app
                .client
                .post(app.url(&format!("/v1/skus/{sku}/reservations")))
                .bearer_auth(user_token(&user))
                .header("Idempotency-Key", "race")
                .json(&json!({"quantity": 1}));
            barrier.wait().await;
            let response = request.send().await.unwrap();
            body(response).await
        })
    });
    let mut created = HashSet::new();
    let mut sold_out = 0;
    for answer in join_all(tasks).await {
        let (status, view) = answer.unwrap();
        match status {
            StatusCode::CREATED => {
                assert!(created.insert(view["reservation_id"].as_str().unwrap().to_owned()));
            }
            StatusCode::CONFLICT => {
                assert_eq!(view["code"], "sold_out");
                sold_out += 1;
            }
            other => panic!("unexpected {other}: {view}"),
        }
    }
    assert_eq!(created.len(), 100, "exactly the stock is held");
    assert_eq!(sold_out, users - 100);
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(0), Some(100))
    );
}

#[tokio::test]
async fn redefining_a_sku_redis_lost_restores_sold_and_per_user_usage_from_mysql() {
    let app = spawn_app().await;
    let sku = unique_sku("lost");
    app.create_sku(&sku, json!({"stock": 5, "per_user_limit": 1}))
        .await;
    let id = app.hold(&sku, "buyer").await;
    app.confirm(&id, "pay").await;
    app.flush(&sku).await;
    // Redis loses every key of this SKU (a wipe, a restart without persistence).
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let _: () = redis::cmd("DEL")
        .arg(&keys.meta)
        .arg(&keys.used)
        .arg(&keys.deadlines)
        .arg(&keys.outbox)
        .arg(&keys.holds)
        .query_async(&mut conn)
        .await
        .unwrap();
    let view = app
        .create_sku(&sku, json!({"stock": 5, "per_user_limit": 1}))
        .await;
    assert_eq!(
        (view["sold"].as_u64(), view["available"].as_u64()),
        (Some(1), Some(4))
    );
    let (status, problem) = app.reserve(&sku, "buyer", "again", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("limit_exceeded"))
    );
    let (status, _) = app.reserve(&sku, "newcomer", "k", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    app.assert_stock_adds_up(&sku).await;
}

#[tokio::test]
async fn a_replay_is_answered_even_while_the_sold_out_flag_is_up() {
    let app = spawn_app().await;
    let sku = unique_sku("flag");
    app.create_sku(&sku, json!({"stock": 1})).await;
    let (status, first) = app.reserve(&sku, "winner", "w-key", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    // Redis answers sold_out once: this gateway raises its local flag.
    let (status, problem) = app.reserve(&sku, "loser", "l-key", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("sold_out"))
    );
    let replay = app.reserve_raw(&sku, "winner", "w-key", 1).await;
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let (_, replayed) = body(replay).await;
    assert_eq!(replayed["reservation_id"], first["reservation_id"]);
    // Stock that comes back is sellable again: a cancel through this gateway lowers the flag.
    let id = first["reservation_id"].as_str().unwrap();
    app.cancel(id, &user_token("winner")).await;
    let (status, _) = app.reserve(&sku, "loser", "l-key", 1).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn stock_returned_through_another_gateway_is_sellable_within_a_second() {
    let first = spawn_app().await;
    let second = spawn_app().await;
    let sku = unique_sku("two-gateways");
    first.create_sku(&sku, json!({"stock": 1})).await;
    let id = first.hold(&sku, "holder").await;
    let (status, _) = second.reserve(&sku, "waiter", "k", 1).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the second gateway's flag is now up"
    );
    first.cancel(&id, SERVICE_TOKEN).await;
    let started = std::time::Instant::now();
    loop {
        let (status, _) = second.reserve(&sku, "waiter", "k", 1).await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "still sold out after 1 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
