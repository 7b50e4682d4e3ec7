//! Every path out of a hold: confirm, cancel, payment in flight, expiry, and the
//! compensation for every payment that cannot become a sale.

use crate::common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn confirm_sells_once_and_a_retried_webhook_gets_the_same_answer() {
    let app = spawn_app().await;
    let sku = unique_sku("confirm");
    app.create_sku(&sku, json!({"stock": 3})).await;
    let id = app.hold(&sku, "u1").await;
    let (status, view) = app.confirm(&id, "pay-1").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (&view["status"], &view["payment_ref"]),
        (&json!("confirmed"), &json!("pay-1"))
    );
    let (status, again) = app.confirm(&id, "pay-1").await;
    assert_eq!((status, &again), (StatusCode::OK, &view));

    // A second, different payment for a sold reservation must be refunded, once.
    for _ in 0..3 {
        let (status, problem) = app.confirm(&id, "pay-2").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(problem["code"], "already_confirmed");
        assert_eq!(problem["refund_required"], true);
    }
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["sold"].as_u64(), view["held"].as_u64()),
        (Some(1), Some(0))
    );
    app.flush(&sku).await;
    assert_eq!(app.mysql_sold(&sku).await, 1);
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    let compensations = app.compensations(&format!("status=open&sku={sku}")).await;
    assert_eq!(compensations.len(), 1, "{compensations:?}");
    let c = &compensations[0];
    assert_eq!(
        (&c["reason"], &c["payment_ref"], &c["reservation_id"]),
        (&json!("duplicate_payment"), &json!("pay-2"), &json!(id))
    );
    assert_eq!(
        (&c["user_id"], &c["quantity"], &c["status"]),
        (&json!("u1"), &json!(1), &json!("open"))
    );
}

#[tokio::test]
async fn confirm_after_cancel_or_deadline_requires_a_refund() {
    let app = spawn_app().await;
    let sku = unique_sku("late");
    app.create_sku(&sku, json!({"stock": 5, "hold_seconds": 1}))
        .await;
    let cancelled = app.hold(&sku, "c1").await;
    let (status, view) = app.cancel(&cancelled, &user_token("c1")).await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    let (status, problem) = app.confirm(&cancelled, "pay-c").await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("reservation_cancelled"))
    );
    assert_eq!(problem["refund_required"], true);

    let late = app.hold(&sku, "l1").await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // let the 1 s deadline pass
                                                           // No sweeper has run: the hold must already behave as expired.
    let (_, view) = app.reservation(&late, SERVICE_TOKEN).await;
    assert_eq!(view["status"], "expired");
    let (status, problem) = app.confirm(&late, "pay-l").await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("reservation_expired"))
    );
    let (status, again) = app.confirm(&late, "pay-l").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        again["compensation_id"], problem["compensation_id"],
        "one record per payment"
    );

    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["sold"].as_u64()),
        (Some(5), Some(0))
    );
    app.flush(&sku).await;
    assert_eq!(app.mysql_compensations(&sku).await, 2);
    let reasons: Vec<_> = app
        .compensations(&format!("sku={sku}"))
        .await
        .iter()
        .map(|c| c["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons.contains(&"cancelled".into()) && reasons.contains(&"expired".into()));
}

#[tokio::test]
async fn cancel_returns_stock_once_and_respects_confirm_and_payments_in_flight() {
    let app = spawn_app().await;
    let sku = unique_sku("cancel");
    app.create_sku(&sku, json!({"stock": 4})).await;
    let owner = user_token("k1");
    let id = app.hold(&sku, "k1").await;
    for _ in 0..3 {
        let (status, view) = app.cancel(&id, &owner).await;
        assert_eq!(
            (status, &view["status"]),
            (StatusCode::OK, &json!("cancelled"))
        );
    }
    assert_eq!(app.sku(&sku).await["available"], 4, "returned exactly once");

    let sold = app.hold(&sku, "k2").await;
    app.confirm(&sold, "pay").await;
    let (status, problem) = app.cancel(&sold, &user_token("k2")).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("already_confirmed"))
    );

    let paying = app.hold(&sku, "k3").await;
    let (status, view) = app.payment_pending(&paying, "pay-3").await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("paying"))
    );
    let (status, problem) = app.cancel(&paying, &user_token("k3")).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("payment_in_progress"))
    );
    // The service (which knows the payment failed) may cancel it.
    let (status, view) = app.cancel(&paying, SERVICE_TOKEN).await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );

    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["sold"].as_u64()),
        (Some(3), Some(1))
    );
}

#[tokio::test]
async fn payment_pending_extends_the_deadline_once_and_refuses_without_compensation() {
    let app = spawn_app().await;
    let sku = unique_sku("pending");
    app.create_sku(&sku, json!({"stock": 5, "hold_seconds": 60}))
        .await;
    let id = app.hold(&sku, "p1").await;
    let (_, before) = app.reservation(&id, SERVICE_TOKEN).await;
    let (status, paying) = app.payment_pending(&id, "pay-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&paying["status"], &paying["payment_ref"]),
        (&json!("paying"), &json!("pay-1"))
    );
    let deadline = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap()
    };
    let pushed = deadline(&paying) - deadline(&before);
    assert!(
        pushed.num_seconds() >= 230,
        "grace 300 s from now, hold 60 s: pushed {pushed}"
    );
    let (status, again) = app.payment_pending(&id, "pay-1").await;
    assert_eq!((status, &again), (StatusCode::OK, &paying), "once only");
    let (status, view) = app.confirm(&id, "pay-1").await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("confirmed"))
    );
    let (status, problem) = app.payment_pending(&id, "pay-1").await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("already_confirmed"))
    );
    assert!(problem.get("refund_required").is_none());

    let cancelled = app.hold(&sku, "p2").await;
    app.cancel(&cancelled, SERVICE_TOKEN).await;
    let (status, problem) = app.payment_pending(&cancelled, "pay-2").await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("reservation_cancelled"))
    );
    app.flush(&sku).await;
    assert_eq!(
        app.mysql_compensations(&sku).await,
        0,
        "no money arrived, nothing to refund"
    );
}

#[tokio::test]
async fn expired_holds_return_their_stock_by_sweep_or_by_the_next_reserve() {
    let app = spawn_app().await;
    let sku = unique_sku("expiry");
    app.create_sku(&sku, json!({"stock": 2, "hold_seconds": 1}))
        .await;
    let a = app.hold(&sku, "e1").await;
    app.hold(&sku, "e2").await;
    let (status, problem) = app.reserve(&sku, "e3", "k", 1).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("sold_out"))
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The reserve script reclaims expired holds before it would answer sold_out.
    let (status, view) = app.reserve(&sku, "e3", "k", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, expired) = app.reservation(&a, &user_token("e1")).await;
    assert_eq!(expired["status"], "expired");
    let (status, view) = app.cancel(&a, &user_token("e1")).await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("expired"))
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Another test's sweeper may get there first; the stock must be back either way.
    app.worker.sweep_once().await.unwrap();
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(2), Some(0))
    );
    // The user's limit is free again.
    let (status, _) = app.reserve(&sku, "e1", "again", 1).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn compensations_are_listed_oldest_first_and_resolved_idempotently() {
    let app = spawn_app().await;
    let sku = unique_sku("comp");
    app.create_sku(&sku, json!({"stock": 5})).await;
    let mut ids = Vec::new();
    for user in ["r1", "r2", "r3"] {
        let id = app.hold(&sku, user).await;
        app.cancel(&id, SERVICE_TOKEN).await;
        let (_, problem) = app.confirm(&id, &format!("pay-{user}")).await;
        ids.push(problem["compensation_id"].as_str().unwrap().to_owned());
    }
    app.flush(&sku).await;
    let listed = app
        .compensations(&format!("status=open&sku={sku}&limit=2"))
        .await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["id"], ids[0].as_str());
    let resolve = |id: String| {
        let app = &app;
        async move {
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
    };
    for _ in 0..2 {
        let (status, resolved) = resolve(ids[0].clone()).await;
        assert_eq!(
            (status, &resolved["status"]),
            (StatusCode::OK, &json!("resolved"))
        );
    }
    let (status, problem) = resolve("c_missing".into()).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
    let open = app.compensations(&format!("status=open&sku={sku}")).await;
    assert_eq!(open.len(), 2);
    let resolved = app
        .compensations(&format!("status=resolved&sku={sku}"))
        .await;
    assert_eq!(resolved.len(), 1);
}

#[tokio::test]
async fn one_sweep_pass_returns_the_expired_stock_of_every_sku() {
    let app = std::sync::Arc::new(spawn_app().await);
    let skus: Vec<String> = (0..64)
        .map(|i| unique_sku(&format!("sweep-many-{i}")))
        .collect();
    let tasks = skus.iter().cloned().map(|sku| {
        let app = app.clone();
        tokio::spawn(async move {
            app.create_sku(&sku, json!({"stock": 2})).await;
            let id = app.hold(&sku, "holder").await;
            // Its deadline, moved into the past (as if the hold time had gone by).
            let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
            let mut conn = app.store.connection();
            let moved = flashgate::store::inspect::set_deadline(&mut conn, &keys, &id, 1)
                .await
                .unwrap();
            assert!(moved);
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    // Other tests' passes sweep every SKU too and may return some of these first:
    // what counts is that after this one pass every hold's stock is back.
    app.worker.sweep_once().await.unwrap();
    for sku in &skus {
        let view = app.assert_stock_adds_up(sku).await;
        assert_eq!(
            (view["held"].as_u64(), view["available"].as_u64()),
            (Some(0), Some(2)),
            "{sku}"
        );
    }
}
