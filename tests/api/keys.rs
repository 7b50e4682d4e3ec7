//! Keys and identity (contract v1.2 "Keys and identity", invariant 3): idempotency keys
//! that replay their reservation after Redis lost the SKU, reservation ids that stay ours
//! across a rotation of the id key or the JWT secret.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{
    body, database_url, redis_url, serve_args, spawn_app, spawn_app_with, unique_sku, TestApp,
};

const ID_KEY: &str = "test-id-key-0123456789abcdef0123456789";
const OLD_ID_KEY: &str = "test-old-id-key-0123456789abcdef012345";

/// Reserves with `key`; the answer's status, whether it was a replay, and its body.
async fn reserve_with(
    app: &TestApp,
    sku: &str,
    user: &str,
    key: &str,
) -> (StatusCode, bool, Value) {
    let response = app.reserve_raw(sku, user, key, 1).await;
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let (status, value) = body(response).await;
    (status, replayed, value)
}

/// Three keys of one user whose reservations ended (confirmed, cancelled, expired is
/// like cancelled here) and reached MySQL; then Redis loses the SKU and `rebuild` puts it
/// back. Each key must replay its own reservation (201, replayed, same id and status),
/// never make a second hold; a new key of the same user still reserves.
async fn keys_replay_after_a_rebuild(app: &TestApp, sku: &str, rebuild: impl AsyncFnOnce()) {
    let (status, _, sold) = reserve_with(app, sku, "buyer", "order-42").await;
    assert_eq!(status, StatusCode::CREATED, "{sold}");
    let sold_id = sold["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(app.confirm(&sold_id, "pay-42").await.0, StatusCode::OK);
    let (_, _, cancelled) = reserve_with(app, sku, "buyer", "order-43").await;
    let cancelled_id = cancelled["reservation_id"].as_str().unwrap().to_owned();
    app.cancel(&cancelled_id, crate::common::SERVICE_TOKEN)
        .await;
    app.flush(sku).await;

    rebuild().await;

    for (key, id, status) in [
        ("order-42", &sold_id, "confirmed"),
        ("order-43", &cancelled_id, "cancelled"),
    ] {
        let (code, replayed, view) = reserve_with(app, sku, "buyer", key).await;
        assert_eq!(code, StatusCode::CREATED, "{key}: {view}");
        assert!(replayed, "{key} made a new hold after the rebuild: {view}");
        assert_eq!(view["reservation_id"], json!(id), "{key}");
        assert_eq!(view["status"], status, "{key}");
    }
    // The user bought one of a limit of 2: a new key makes one more hold.
    let (code, replayed, view) = reserve_with(app, sku, "buyer", "order-44").await;
    assert_eq!((code, replayed), (StatusCode::CREATED, false), "{view}");
    let view = app.assert_stock_adds_up(sku).await;
    assert_eq!(
        (view["sold"].as_u64(), view["held"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn a_key_replays_its_reservation_after_redis_lost_the_sku_and_a_put_rebuilt_it() {
    let app = spawn_app().await;
    let sku = unique_sku("key-put");
    let definition = json!({"stock": 5, "per_user_limit": 2});
    app.create_sku(&sku, definition.clone()).await;
    keys_replay_after_a_rebuild(&app, &sku, async || {
        app.lose_sale(&sku).await;
        app.create_sku(&sku, definition.clone()).await;
    })
    .await;
}

#[tokio::test]
async fn a_key_replays_its_reservation_after_the_reconciler_rebuilt_the_sku() {
    let app = spawn_app().await;
    let sku = unique_sku("key-recon");
    app.create_sku(&sku, json!({"stock": 5, "per_user_limit": 2}))
        .await;
    keys_replay_after_a_rebuild(&app, &sku, async || {
        app.lose_sale(&sku).await;
        let only = [TestApp::sku_id(&sku)];
        flashgate::reconcile::run_skus(&app.store, &app.db, &only, true)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_key_replays_its_reservation_after_a_split_sku_lost_every_bucket() {
    let app = spawn_app().await;
    let sku = unique_sku("key-split");
    app.create_sku(&sku, json!({"stock": 8, "per_user_limit": 2, "buckets": 2}))
        .await;
    keys_replay_after_a_rebuild(&app, &sku, async || {
        let id = TestApp::sku_id(&sku);
        for sale in flashgate::buckets::sales(&id, 2) {
            app.lose_sale(sale.as_str()).await;
        }
        let only = [id];
        flashgate::reconcile::run_skus(&app.store, &app.db, &only, true)
            .await
            .unwrap();
    })
    .await;
}

/// A split SKU whose sale ended, then lost by Redis, is not rebuilt by the reconciler
/// (nothing of an ended sale is sold); an operator's PUT reopens it, and its buyers'
/// keys and limits come from MySQL's record into every bucket.
#[tokio::test]
async fn a_key_replays_its_reservation_after_an_ended_split_sku_lost_every_bucket_and_a_put_reopened_it(
) {
    let app = spawn_app().await;
    let sku = unique_sku("key-split-reopen");
    let ends_in = std::time::Duration::from_millis(800);
    let ends_at = (chrono::Utc::now() + chrono::Duration::milliseconds(800))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    let start = tokio::time::Instant::now();
    app.create_sku(
        &sku,
        json!({"stock": 8, "per_user_limit": 2, "buckets": 2, "ends_at": ends_at}),
    )
    .await;
    keys_replay_after_a_rebuild(&app, &sku, async || {
        tokio::time::sleep_until(start + ends_in).await;
        let id = TestApp::sku_id(&sku);
        for sale in flashgate::buckets::sales(&id, 2) {
            app.lose_sale(sale.as_str()).await;
        }
        app.create_sku(&sku, json!({"stock": 8, "per_user_limit": 2, "buckets": 2}))
            .await;
    })
    .await;
}

/// The id key is set (or rotated) on a running deployment: a hold issued under the key
/// before, that Redis then lost, is still one flashgate issued: its payment answers 409
/// with one compensation, never 404. An id no configured key issued is still 404.
#[tokio::test]
async fn ids_issued_before_the_id_key_was_set_or_rotated_stay_ours_after_a_redis_loss() {
    let sku = unique_sku("id-rotation");
    // Before: no id key (ids under the JWT secret's key), then the first id key.
    let before = spawn_app().await;
    before.create_sku(&sku, json!({"stock": 5})).await;
    let under_secret = before.hold(&sku, "early").await;
    let mut first_key = serve_args(&redis_url(), &database_url());
    first_key.id_key = Some(OLD_ID_KEY.into());
    let first = spawn_app_with(first_key).await;
    let under_old_key = first.hold(&sku, "middle").await;
    // Now: the id key rotated, the old one listed as previous.
    let mut rotated = serve_args(&redis_url(), &database_url());
    rotated.id_key = Some(ID_KEY.into());
    rotated.id_key_previous = vec![OLD_ID_KEY.into()];
    let now = spawn_app_with(rotated).await;
    let under_new_key = now.hold(&sku, "late").await;
    now.lose_sale(&sku).await;
    now.create_sku(&sku, json!({"stock": 5})).await;
    for (id, payment) in [
        (&under_secret, "pay-a"),
        (&under_old_key, "pay-b"),
        (&under_new_key, "pay-c"),
    ] {
        let (status, problem) = now.confirm(id, payment).await;
        assert_eq!(status, StatusCode::CONFLICT, "{id}: {problem}");
        assert!(
            problem["compensation_id"].is_string(),
            "{id}: no compensation: {problem}"
        );
        // The retried webhook finds the same compensation.
        let (again, retried) = now.confirm(id, payment).await;
        assert_eq!(again, StatusCode::CONFLICT);
        assert_eq!(retried["compensation_id"], problem["compensation_id"]);
    }
    let opened: Vec<Value> = now
        .compensations(&format!("sku={sku}"))
        .await
        .into_iter()
        .collect();
    assert_eq!(opened.len(), 3, "{opened:?}");
    // A made-up id of the same shape: never issued, 404, nothing recorded.
    let forged = {
        let (head, tail) = under_new_key.split_once('.').unwrap();
        let mut tail = tail.to_owned();
        let last = if tail.ends_with('A') { "B" } else { "A" };
        tail.replace_range(tail.len() - 1.., last);
        format!("{head}.{tail}")
    };
    let (status, problem) = now.confirm(&forged, "pay-d").await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
    // A gateway that never had the old keys cannot vouch for their ids.
    let mut stranger = serve_args(&redis_url(), &database_url());
    stranger.id_key = Some(ID_KEY.into());
    stranger.jwt_secret = Some("another-jwt-secret-0123456789abcdef".into());
    let stranger = spawn_app_with(stranger).await;
    let (status, _) = stranger.confirm(&under_old_key, "pay-e").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

const NEW_JWT_SECRET: &str = "test-new-jwt-secret-0123456789abcdef01";

/// The settings of one step of the documented rotation (docs/configuration.md, Rotating
/// keys) of both the JWT secret (A → B) and the id key (none → ID_KEY) at once.
fn rotation_step(step: u8) -> flashgate::config::ServeArgs {
    let mut args = serve_args(&redis_url(), &database_url());
    match step {
        0 => {}
        // Accept: every gateway takes the new values, none signs with them.
        1 => {
            args.jwt.jwt_secret_previous = vec![NEW_JWT_SECRET.into()];
            args.id_key_previous = vec![ID_KEY.into()];
        }
        // Switch: the new values are current, the old JWT secret still accepted.
        _ => {
            args.jwt_secret = Some(NEW_JWT_SECRET.into());
            args.jwt.jwt_secret_previous = vec![crate::common::JWT_SECRET.into()];
            args.id_key = Some(ID_KEY.into());
        }
    }
    args
}

/// Reserves one unit for `user` with a token of `secret`; panics unless 201.
async fn hold_with(app: &TestApp, sku: &str, user: &str, secret: &str) -> String {
    let token = flashgate::auth::issue_user_token(secret, user, 3600).unwrap();
    let response = app
        .client
        .post(app.url(&format!("/v1/skus/{sku}/reservations")))
        .bearer_auth(&token)
        .header("Idempotency-Key", format!("key-{user}"))
        .json(&json!({ "quantity": 1 }))
        .send()
        .await
        .unwrap();
    let (status, view) = body(response).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{user} on {}: {view}",
        app.base
    );
    let id = view["reservation_id"].as_str().unwrap().to_owned();
    // Its owner reads it back through the same token.
    let read = app
        .client
        .get(app.url(&format!("/v1/reservations/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK, "{user} reads {id}");
    id
}

/// The documented rotation done on a running pair of gateways, one restarted at a time,
/// with holds made and paid through both all along: no token the contract accepts is
/// refused (tokens of the old secret, then of the new one, at either gateway), and no
/// payment is dropped: after each restart Redis loses the SKU, and a payment for every
/// hold not paid yet, whichever gateway issued it under whichever key, answers 409 with
/// one compensation at both gateways (the one on the older settings first). A made-up
/// id is 404.
#[tokio::test]
async fn a_rolling_rotation_of_the_jwt_secret_and_the_id_key_refuses_and_drops_nothing() {
    let sku = unique_sku("rotation");
    let definition = json!({"stock": 100, "per_user_limit": 1});
    let old_secret = crate::common::JWT_SECRET;
    let mut gateways = [
        spawn_app_with(rotation_step(0)).await,
        spawn_app_with(rotation_step(0)).await,
    ];
    gateways[0].create_sku(&sku, definition.clone()).await;
    let (mut paid, mut compensated) = (Vec::new(), 0);
    let mut n = 0;
    // Tokens of the issuer, which switches to the new secret after the accept step.
    let mut issuing = vec![old_secret];
    for step in [1u8, 2] {
        for restarted in 0..2 {
            gateways[restarted] = spawn_app_with(rotation_step(step)).await;
            let older = 1 - restarted;
            // Traffic through both gateways, one on the new settings, one on the old.
            let mut unpaid = Vec::new();
            for g in [restarted, older] {
                for secret in &issuing {
                    n += 1;
                    let id = hold_with(&gateways[g], &sku, &format!("buyer-{n}"), secret).await;
                    if n % 2 == 0 {
                        let payment = format!("pay-{n}");
                        let (status, view) = gateways[1 - g].confirm(&id, &payment).await;
                        assert_eq!(status, StatusCode::OK, "{id}: {view}");
                        paid.push((id, payment));
                    } else {
                        unpaid.push(id);
                    }
                }
            }
            gateways[0].flush(&sku).await;
            // Redis loses the SKU mid-rotation; an operator's PUT rebuilds it.
            gateways[0].lose_sale(&sku).await;
            gateways[restarted]
                .create_sku(&sku, definition.clone())
                .await;
            for id in &unpaid {
                let (status, problem) = gateways[older].confirm(id, "late-pay").await;
                assert_eq!(status, StatusCode::CONFLICT, "step {step}: {id}: {problem}");
                let (again, retried) = gateways[restarted].confirm(id, "late-pay").await;
                assert_eq!(again, StatusCode::CONFLICT, "step {step}: {id}: {retried}");
                assert_eq!(retried["compensation_id"], problem["compensation_id"]);
                compensated += 1;
            }
        }
        if step == 1 {
            // Every gateway accepts the new secret: the issuer switches; tokens of the
            // old one are still out there.
            issuing = vec![old_secret, NEW_JWT_SECRET];
        }
    }
    for (i, (id, payment)) in paid.iter().enumerate() {
        // A retried webhook of a sale: still the sale, from MySQL's record.
        let (status, view) = gateways[i % 2].confirm(id, payment).await;
        assert_eq!(status, StatusCode::OK, "{id}: {view}");
    }
    let compensations = gateways[1].compensations(&format!("sku={sku}")).await;
    assert_eq!(compensations.len(), compensated, "one per unpaid hold");
    assert_eq!(gateways[1].mysql_sold(&sku).await, paid.len() as u64);
    let (head, _) = paid[0].0.split_once('.').unwrap();
    let made_up = format!("{head}.{}", "A".repeat(27));
    for gateway in &gateways {
        let (status, _) = gateway.confirm(&made_up, "pay-x").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
