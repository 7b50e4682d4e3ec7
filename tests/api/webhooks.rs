//! Webhooks against a real HTTP receiver in this process (one that answers, fails,
//! hangs, closes the connection, redirects, trickles its answer), with signatures
//! checked by an independent verifier: the `standardwebhooks` package from PyPI
//! (scripts/dev installs it into .dev/venv-webhooks). Time passes by a manual clock.

use crate::common::receiver::{verify_independently, Mode, Received, Receiver, SECRET};
use crate::common::*;
use crate::events::{expire_now, feed_all};
use flashgate::webhooks::{Deliverer, ManualClock, StepReport};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub async fn put_webhook(app: &TestApp, name: &str, body: Value) -> (StatusCode, Value) {
    body_of(
        app.client
            .put(app.url(&format!("/v1/admin/webhooks/{name}")))
            .bearer_auth(SERVICE_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn body_of(response: reqwest::Response) -> (StatusCode, Value) {
    body(response).await
}

pub async fn admin_get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    body(
        app.client
            .get(app.url(path))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Queues every delivery of `name` up to the feed's end. One `enqueue` looks at 1000
/// events of every SKU; the other tests write that many between a PUT and a queueing.
pub async fn enqueue_all(app: &TestApp, name: &str, now_ms: i64) {
    while flashgate::db::webhooks::enqueue(&app.db, name, now_ms, 1000)
        .await
        .unwrap()
        > 0
    {}
}

/// Steps the endpoint until nothing due is left; the sum of the reports.
pub async fn drain(deliverer: &Deliverer, app: &TestApp, name: &str) -> StepReport {
    let endpoint = flashgate::db::webhooks::get(&app.db, name)
        .await
        .unwrap()
        .unwrap();
    let mut total = StepReport::default();
    for _ in 0..100 {
        let report = deliverer.step(&endpoint).await.unwrap();
        total.attempted += report.attempted;
        total.delivered += report.delivered;
        total.retried += report.retried;
        total.failed += report.failed;
        if report.attempted == 0 {
            return total;
        }
    }
    panic!("deliveries of {name} never drained");
}

/// A SKU's short sale: a sale, a cancel, an expiry, a late payment, a sell-out.
async fn a_sale(app: &TestApp, sku: &str) {
    app.create_sku(sku, json!({"stock": 2})).await;
    let a = app.hold(sku, "w1").await;
    app.confirm(&a, "pay-a").await;
    let b = app.hold(sku, "w2").await;
    app.cancel(&b, SERVICE_TOKEN).await;
    let c = app.hold(sku, "w3").await;
    expire_now(app, sku, &c).await;
    app.worker.sweep_sku(TestApp::sku_id(sku)).await.unwrap();
    app.confirm(&c, "pay-c").await; // late: a compensation
    app.hold(sku, "w4").await; // the last unit
    app.flush(sku).await;
}

#[tokio::test]
async fn every_event_arrives_signed_as_standard_webhooks_verifies_it() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let name = unique_sku("hook");
    let url = receiver.url.replace("http://", "http://user:pw@");
    let (status, view) = put_webhook(&app, &name, json!({"url": url, "secret": SECRET})).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(view["url"], json!(receiver.url), "no credentials shown");
    assert!(view.get("secret").is_none());
    assert_eq!(view["types"].as_array().unwrap().len(), 7);
    let (status, again) = put_webhook(
        &app,
        &name,
        json!({"url": url, "secret": SECRET, "enabled": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    let (status, listed) = admin_get(&app, "/v1/admin/webhooks").await;
    assert_eq!(status, StatusCode::OK);
    assert!(listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["name"] == json!(name)));
    assert!(
        !listed.to_string().contains("whsec_"),
        "the secret is never shown"
    );

    let sku = unique_sku("hooked");
    a_sale(&app, &sku).await;
    let deliverer = Deliverer::new(app.db.clone(), Arc::new(ManualClock::default()));
    drain(&deliverer, &app, &name).await;

    let got = receiver.of_sku(&sku);
    let feed = feed_all(&app, &format!("sku={sku}"), 100).await;
    // sale, sold out, back, cancel, sold out, back, expiry, compensation, sold out
    assert_eq!(feed.len(), 9, "{feed:#?}");
    let mut bodies: Vec<Value> = got.iter().map(|r| r.event()).collect();
    bodies.sort_by_key(|e| e["sequence"].as_u64());
    assert_eq!(bodies, feed, "each event once, as the feed has it");
    for r in &got {
        assert_eq!(r.headers["webhook-id"], r.event()["id"].as_str().unwrap());
        assert!(r.headers["webhook-signature"].starts_with("v1,"));
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(
            r.headers.contains_key("authorization"),
            "credentials of the URL are sent"
        );
    }
    verify_independently(SECRET, &got);
    // A tampered body does not verify (the verifier really checks).
    let mut forged = got[0].clone();
    forged.body = forged.body.replace("\"sku\"", "\"sku\" ");
    let result = std::panic::catch_unwind(|| verify_independently(SECRET, &[forged]));
    assert!(result.is_err(), "a forged body must not verify");

    let (_, delivered) = admin_get(
        &app,
        &format!("/v1/admin/webhooks/{name}/deliveries?status=delivered&limit=1000"),
    )
    .await;
    assert!(delivered["items"].as_array().unwrap().len() >= 9);
    let (status, _) = admin_get(
        &app,
        &format!("/v1/admin/webhooks/{name}/deliveries?status=pending"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    delete_webhook(&app, &name).await;
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_with_backoff_for_a_day_then_failed_and_replayable() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let name = unique_sku("retry");
    let types = json!(["reservation.cancelled"]);
    put_webhook(
        &app,
        &name,
        json!({"url": receiver.url, "secret": SECRET, "types": types}),
    )
    .await;
    let sku = unique_sku("retried");
    app.create_sku(&sku, json!({"stock": 5})).await;
    let id = app.hold(&sku, "r1").await;
    app.cancel(&id, SERVICE_TOKEN).await;
    app.flush(&sku).await;
    let event_id = feed_all(&app, &format!("sku={sku}"), 10).await[0]["id"].clone();

    let clock = ManualClock::default();
    let deliverer = Deliverer::new(app.db.clone(), Arc::new(clock.clone()))
        .with_timeout(Duration::from_millis(300));
    let mine = |receiver: &Receiver| receiver.of_sku(&sku);
    // Every way of failing, each retried later, never at once.
    for mode in [
        Mode::Status(500),
        Mode::Close,
        Mode::Hang,
        Mode::Redirect,
        Mode::Status(404),
        Mode::Trickle,
    ] {
        receiver.set(mode);
        let before = mine(&receiver).len();
        drain(&deliverer, &app, &name).await;
        assert_eq!(mine(&receiver).len(), before + 1, "{mode:?}: one attempt");
        drain(&deliverer, &app, &name).await;
        assert_eq!(
            mine(&receiver).len(),
            before + 1,
            "{mode:?}: not again before its backoff"
        );
        let pending = pending_of(&app, &name, &event_id).await;
        assert!(pending["last_error"].is_string(), "{pending}");
        clock.advance(Duration::from_secs(3600));
    }
    let pending = pending_of(&app, &name, &event_id).await;
    assert_eq!(pending["attempts"], 6, "{pending}");
    // 500 for the rest of the day: failed after 24 h, having waited at most an hour
    // between attempts.
    receiver.set(Mode::Status(500));
    let mut attempts = 6;
    loop {
        clock.advance(Duration::from_secs(4500));
        drain(&deliverer, &app, &name).await;
        attempts += 1;
        let (_, failed) = admin_get(
            &app,
            &format!("/v1/admin/webhooks/{name}/deliveries?status=failed"),
        )
        .await;
        if failed["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["event_id"] == event_id)
        {
            break;
        }
        assert!(attempts < 40, "never failed");
    }
    assert_eq!(mine(&receiver).len(), attempts);
    let (_, failed) = admin_get(
        &app,
        &format!("/v1/admin/webhooks/{name}/deliveries?status=failed"),
    )
    .await;
    let delivery = failed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["event_id"] == event_id)
        .unwrap()
        .clone();
    assert_eq!(delivery["last_status"], 500);
    // Replayed from its cursor, it is sent again and delivered.
    receiver.set(Mode::Ok);
    let (status, replayed) = body(
        app.client
            .post(app.url(&format!("/v1/admin/webhooks/{name}/replay")))
            .bearer_auth(SERVICE_TOKEN)
            .json(&json!({"after": delivery["replay_from"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    assert!(replayed["queued"].as_u64().unwrap() >= 1);
    drain(&deliverer, &app, &name).await;
    let got = mine(&receiver);
    assert_eq!(got.last().unwrap().mode, Mode::Ok);
    // Every attempt carried the same id and a valid signature.
    assert!(got
        .iter()
        .all(|r| json!(r.headers["webhook-id"]) == event_id));
    let answered: Vec<Received> = got.into_iter().filter(|r| r.mode != Mode::Hang).collect();
    verify_independently(SECRET, &answered);
    delete_webhook(&app, &name).await;
}

async fn pending_of(app: &TestApp, name: &str, event_id: &Value) -> Value {
    let (_, pending) = admin_get(
        app,
        &format!("/v1/admin/webhooks/{name}/deliveries?status=pending&limit=1000"),
    )
    .await;
    pending["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| &d["event_id"] == event_id)
        .unwrap_or_else(|| panic!("{event_id} not pending: {pending}"))
        .clone()
}

#[tokio::test]
async fn two_workers_never_send_one_event_at_once_and_a_dead_ones_claim_comes_due() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(50));
    let name = unique_sku("race");
    put_webhook(&app, &name, json!({"url": receiver.url, "secret": SECRET})).await;
    let sku = unique_sku("raced");
    app.create_sku(&sku, json!({"stock": 100})).await;
    for i in 0..40 {
        let id = app.hold(&sku, &format!("rc{i}")).await;
        app.cancel(&id, SERVICE_TOKEN).await;
    }
    app.flush(&sku).await;
    let clock = ManualClock::default();
    let a = Deliverer::new(app.db.clone(), Arc::new(clock.clone()));
    let b = Deliverer::new(app.db.clone(), Arc::new(clock.clone()));
    let (ra, rb) = tokio::join!(drain(&a, &app, &name), drain(&b, &app, &name));
    assert!(
        ra.delivered > 0 && rb.delivered > 0,
        "both worked: {ra:?} {rb:?}"
    );
    let got = receiver.of_sku(&sku);
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert_eq!(ids.len(), 40);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "no event sent twice");

    // A worker that claims and dies: nobody sends its deliveries until the lease ends.
    let id = app.hold(&sku, "dead").await;
    app.cancel(&id, SERVICE_TOKEN).await;
    app.flush(&sku).await;
    enqueue_all(&app, &name, clock_now(&clock)).await;
    let claimed = flashgate::db::webhooks::claim(
        &app.db,
        &name,
        "killed-worker",
        clock_now(&clock),
        30_000,
        1000,
    )
    .await
    .unwrap();
    assert!(!claimed.is_empty());
    drain(&a, &app, &name).await;
    assert_eq!(receiver.of_sku(&sku).len(), 40, "its claim holds");
    clock.advance(flashgate::webhooks::LEASE);
    drain(&a, &app, &name).await;
    assert_eq!(
        receiver.of_sku(&sku).len(),
        41,
        "retried once the lease ended"
    );
    delete_webhook(&app, &name).await;
}

fn clock_now(clock: &ManualClock) -> i64 {
    use flashgate::webhooks::Clock;
    clock.now_ms()
}

/// Two workers' endpoint loops (pipelined: a claim takes the requests free now, and
/// another starts as each ends) on one healthy endpoint: every event arrives once, the
/// outcomes recorded in batches leave nothing pending, and each worker keeps at most
/// ENDPOINT_CONCURRENCY requests open.
#[tokio::test]
async fn two_pipelined_workers_deliver_each_event_once_and_record_it() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(20));
    let name = unique_sku("pipe");
    put_webhook(
        &app,
        &name,
        json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
    )
    .await;
    let sku = unique_sku("piped");
    app.create_sku(&sku, json!({"stock": 200})).await;
    for i in 0..150 {
        let id = app.hold(&sku, &format!("p{i}")).await;
        app.cancel(&id, SERVICE_TOKEN).await;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = |stopped| {
        let d = Deliverer::new(app.db.clone(), Arc::new(flashgate::webhooks::SystemClock))
            .only(&[&name]);
        tokio::spawn(d.run(stopped))
    };
    let (a, b) = (worker(stopped.clone()), worker(stopped));
    app.flush(&sku).await;
    let started = std::time::Instant::now();
    while receiver.of_sku(&sku).len() < 150 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last outcomes are recorded a moment after their answers. Only this SKU's
    // deliveries: the endpoint also gets the cancellations of tests running beside.
    let pending = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM webhook_deliveries d JOIN events e ON e.position = d.position
             WHERE d.webhook = ? AND e.sku = ? AND d.status <> 'delivered'",
        )
        .bind(&name)
        .bind(&sku)
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    while pending().await > 0 && started.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    let _ = tokio::join!(a, b);
    let got = receiver.of_sku(&sku);
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    ids.sort();
    ids.dedup();
    println!(
        "{} arrivals, {} events, {:?}, at most {} at once, {} not recorded delivered",
        got.len(),
        ids.len(),
        started.elapsed(),
        receiver.most_at_once(),
        pending().await
    );
    assert_eq!((got.len(), ids.len()), (150, 150), "each event once");
    assert_eq!(pending().await, 0, "every outcome recorded");
    assert!(receiver.most_at_once() <= 2 * flashgate::webhooks::ENDPOINT_CONCURRENCY);
    verify_independently(SECRET, &got[..5]);
    delete_webhook(&app, &name).await;
}

#[tokio::test]
async fn a_hanging_endpoint_delays_neither_another_endpoint_nor_the_sale() {
    let app = spawn_app().await;
    let stuck = Receiver::start().await;
    stuck.set(Mode::Hang);
    let healthy = Receiver::start().await;
    let (stuck_name, healthy_name) = (unique_sku("stuck"), unique_sku("healthy"));
    put_webhook(
        &app,
        &stuck_name,
        json!({"url": stuck.url, "secret": SECRET}),
    )
    .await;
    put_webhook(
        &app,
        &healthy_name,
        json!({"url": healthy.url, "secret": SECRET}),
    )
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let deliverer = Deliverer::new(app.db.clone(), Arc::new(flashgate::webhooks::SystemClock))
        .only(&[&stuck_name, &healthy_name]);
    let running = tokio::spawn(deliverer.run(stopped));
    let sku = unique_sku("unblocked");
    app.create_sku(&sku, json!({"stock": 50})).await;
    for round in 0..3 {
        let started = std::time::Instant::now();
        let id = app.hold(&sku, &format!("h{round}")).await;
        app.cancel(&id, SERVICE_TOKEN).await;
        app.flush(&sku).await;
        while healthy.of_sku(&sku).len() < round + 1 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the healthy endpoint waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // (It may still be hanging on events of other tests queued before these.)
    assert!(
        !stuck.received.lock().unwrap().is_empty(),
        "the stuck one was tried"
    );
    assert!(stuck.most_at_once() <= flashgate::webhooks::ENDPOINT_CONCURRENCY);
    verify_independently(SECRET, &healthy.of_sku(&sku));
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    delete_webhook(&app, &stuck_name).await;
    delete_webhook(&app, &healthy_name).await;
}

#[tokio::test]
async fn webhook_input_is_checked_and_unknown_names_are_not_found() {
    let app = spawn_app().await;
    let name = unique_sku("bad");
    for body in [
        json!({"url": "ftp://example.com/", "secret": SECRET}),
        json!({"url": "not a url", "secret": SECRET}),
        json!({"url": "https://example.com/", "secret": "nope"}),
        json!({"url": "https://example.com/", "secret": "whsec_c2hvcnQ="}),
        json!({"url": "https://example.com/", "secret": SECRET, "types": ["reservation.created"]}),
        json!({"url": "https://example.com/", "secret": SECRET, "colour": "red"}),
        json!({"secret": SECRET}),
    ] {
        let (status, problem) = put_webhook(&app, &name, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert_eq!(problem["code"], "invalid_request");
    }
    let (status, _) = put_webhook(
        &app,
        "bad name!",
        json!({"url": "https://example.com/", "secret": SECRET}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, problem) = admin_get(&app, &format!("/v1/admin/webhooks/{name}")).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
    let (status, _) = admin_get(
        &app,
        &format!("/v1/admin/webhooks/{name}/deliveries?status=failed"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    put_webhook(
        &app,
        &name,
        json!({"url": "https://example.com/", "secret": SECRET}),
    )
    .await;
    let (status, problem) = admin_get(
        &app,
        &format!("/v1/admin/webhooks/{name}/deliveries?status=lost"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    let deleted = app
        .client
        .delete(app.url(&format!("/v1/admin/webhooks/{name}")))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let again = app
        .client
        .delete(app.url(&format!("/v1/admin/webhooks/{name}")))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let (status, _) = body(
        app.client
            .get(app.url("/v1/admin/webhooks"))
            .bearer_auth(user_token("nobody"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Tests share one database: an endpoint left behind would get every later event.
pub async fn delete_webhook(app: &TestApp, name: &str) {
    let response = app
        .client
        .delete(app.url(&format!("/v1/admin/webhooks/{name}")))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

/// Our deliveries of `positions` to `name` in `status`.
async fn deliveries_in(app: &TestApp, name: &str, positions: &[u64], status: &str) -> i64 {
    let (low, high) = (positions[0], *positions.last().unwrap());
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_deliveries
         WHERE webhook = ? AND position BETWEEN ? AND ? AND status LIKE ?",
    )
    .bind(name)
    .bind(low)
    .bind(high)
    .bind(status)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// Waits (up to 10 s) for `done` to hold.
pub async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !done().await {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replay and a DELETE of an endpoint with a long history touch a bounded number of
/// rows per statement, each committed on its own: a lock held on one delivery far down
/// the history holds back only the batch it is in, never the batches before it.
#[tokio::test]
async fn replay_and_delete_work_in_bounded_batches() {
    use flashgate::events::{event_id, EventType, NewEvent};
    let app = spawn_app().await;
    let name = unique_sku("bounded");
    let (status, _) = put_webhook(
        &app,
        &name,
        json!({"url": "http://127.0.0.1:9/none", "secret": SECRET, "types": ["sku.available"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // A history of 2500 events (written as the flush writes them).
    let sku = unique_sku("history");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let after = {
        let mut conn = app.db.acquire().await.unwrap();
        flashgate::db::events::last_position(&mut conn)
            .await
            .unwrap()
    };
    let history: Vec<NewEvent> = (0..2500)
        .map(|i| NewEvent {
            id: event_id(EventType::SkuAvailable, &[&sku, &i.to_string()]),
            kind: EventType::SkuAvailable,
            sku: sku.clone(),
            occurred_at_ms: now_ms,
            data: json!({"sku": sku}),
        })
        .collect();
    let mut tx = app.db.begin().await.unwrap();
    let written = flashgate::db::events::write(&mut tx, history, now_ms)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let positions: Vec<u64> = written.iter().map(|e| e.position).collect();
    let replay = || {
        app.client
            .post(app.url(&format!("/v1/admin/webhooks/{name}/replay")))
            .bearer_auth(SERVICE_TOKEN)
            .json(&json!({"after": flashgate::events::encode_cursor(after)}))
            .send()
    };
    let (status, replayed) = body(replay().await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    assert!(replayed["queued"].as_u64().unwrap() >= 2500, "{replayed}");
    assert_eq!(
        deliveries_in(&app, &name, &positions, "pending").await,
        2500
    );
    // All delivered; then a replay while another transaction locks the 1500th.
    sqlx::query("UPDATE webhook_deliveries SET status = 'delivered' WHERE webhook = ?")
        .bind(&name)
        .execute(&app.db)
        .await
        .unwrap();
    let lock_row = |position: u64| {
        let db = app.db.clone();
        let name = name.clone();
        async move {
            let mut lock = db.begin().await.unwrap();
            sqlx::query(
                "SELECT status FROM webhook_deliveries WHERE webhook = ? AND position = ? FOR UPDATE",
            )
            .bind(&name)
            .bind(position)
            .fetch_one(&mut *lock)
            .await
            .unwrap();
            lock
        }
    };
    let lock = lock_row(positions[1499]).await;
    let replaying = tokio::spawn(replay());
    until("a replay commits nothing before the locked row", || async {
        deliveries_in(&app, &name, &positions, "pending").await > 0
    })
    .await;
    assert_eq!(
        deliveries_in(&app, &name, &positions[1499..], "delivered").await,
        1001,
        "nothing at or past the locked row was replayed while it was locked"
    );
    lock.rollback().await.unwrap();
    let (status, replayed) = body(replaying.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    assert!(replayed["queued"].as_u64().unwrap() >= 2500, "{replayed}");
    assert_eq!(
        deliveries_in(&app, &name, &positions, "pending").await,
        2500
    );

    // DELETE: the endpoint goes at once, its deliveries in batches.
    let lock = lock_row(positions[1499]).await;
    let client = app.client.clone();
    let url = app.url(&format!("/v1/admin/webhooks/{name}"));
    let deleting =
        tokio::spawn(async move { client.delete(url).bearer_auth(SERVICE_TOKEN).send().await });
    until("a delete commits nothing before the locked row", || async {
        deliveries_in(&app, &name, &positions, "%").await < 2500
    })
    .await;
    let (status, _) = admin_get(&app, &format!("/v1/admin/webhooks/{name}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the endpoint went first");
    assert_eq!(
        deliveries_in(&app, &name, &positions[1499..], "%").await,
        1001,
        "nothing at or past the locked row was deleted while it was locked"
    );
    lock.rollback().await.unwrap();
    assert_eq!(
        deleting.await.unwrap().unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(deliveries_in(&app, &name, &positions, "%").await, 0);
}

/// `/metrics` as a gateway started now renders it (each caches its page for 1 s).
async fn fresh_metrics() -> String {
    let fresh = spawn_app().await;
    fresh
        .client
        .get(fresh.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A deleted endpoint's series (lag, attempts, failures) leave `/metrics`: at once in
/// the process that answered the DELETE, at the next refresh of the endpoints in a
/// worker elsewhere. Another endpoint's stay.
#[tokio::test]
async fn a_deleted_endpoints_series_leave_metrics() {
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let (gone, elsewhere, kept) = (
        unique_sku("gone"),
        unique_sku("elsewhere"),
        unique_sku("kept"),
    );
    for name in [&gone, &elsewhere, &kept] {
        let (status, _) = put_webhook(
            &app,
            name,
            json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let sku = unique_sku("series");
    app.create_sku(&sku, json!({"stock": 5})).await;
    let id = app.hold(&sku, "s1").await;
    app.cancel(&id, SERVICE_TOKEN).await;
    app.flush(&sku).await;
    let names = [gone.as_str(), elsewhere.as_str(), kept.as_str()];
    let deliverer =
        Deliverer::new(app.db.clone(), Arc::new(flashgate::webhooks::SystemClock)).only(&names);
    let mut endpoints = Vec::new();
    for name in names {
        assert!(drain(&deliverer, &app, name).await.delivered >= 1);
        endpoints.push(
            flashgate::db::webhooks::get(&app.db, name)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    deliverer.measure_lag(&endpoints).await.unwrap();
    let series = |name: &str| {
        [
            format!(r#"flashgate_webhook_lag_seconds{{webhook="{name}"}} 0"#),
            format!(r#"flashgate_webhook_attempts_total{{webhook="{name}",outcome="delivered"}} "#),
        ]
    };
    let page = fresh_metrics().await;
    for name in names {
        for line in series(name) {
            assert!(page.contains(&line), "{line} missing");
        }
    }

    delete_webhook(&app, &gone).await;
    let page = fresh_metrics().await;
    assert!(
        !page.contains(&format!(r#"webhook="{gone}""#)),
        "the deleted endpoint's series stayed"
    );
    for line in series(&kept) {
        assert!(page.contains(&line), "{line} missing");
    }

    // Deleted by another process (straight in MySQL): a running worker drops its
    // series when it reads the endpoints again.
    assert!(flashgate::db::webhooks::delete(&app.db, &elsewhere)
        .await
        .unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(deliverer.clone().run(stopped));
    until("the worker never dropped the series", || async {
        !fresh_metrics()
            .await
            .contains(&format!(r#"webhook="{elsewhere}""#))
    })
    .await;
    let page = fresh_metrics().await;
    for line in series(&kept) {
        assert!(page.contains(&line), "{line} missing");
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    delete_webhook(&app, &kept).await;
}

/// Another secret than SECRET, for an endpoint that moved.
const NEW_SECRET: &str = "whsec_dGhlIG5ldyBzZWNyZXQgb2YgYSBtb3ZlZCBlbmRwb2ludA==";

/// Once a PUT that moved an endpoint to another URL and secret has answered, no request
/// to the old URL is in flight and none starts later: every event after it goes to the
/// new URL, signed with the new secret. The old receiver answers slowly, so that the
/// PUT comes while requests to it are in flight.
#[tokio::test]
async fn once_a_put_answers_nothing_goes_to_the_old_url_or_with_the_old_secret() {
    let app = spawn_app().await;
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    old.set_delay(Duration::from_millis(1500));
    let name = unique_sku("moved");
    let types = json!(["reservation.cancelled"]);
    let (status, _) = put_webhook(
        &app,
        &name,
        json!({"url": old.url, "secret": SECRET, "types": types}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(
        Deliverer::new(app.db.clone(), Arc::new(flashgate::webhooks::SystemClock))
            .only(&[&name])
            .run(stopped),
    );
    let sku = unique_sku("moving");
    app.create_sku(&sku, json!({"stock": 50})).await;
    let cancel = |user: String| {
        let (app, sku) = (&app, &sku);
        async move {
            let id = app.hold(sku, &user).await;
            app.cancel(&id, SERVICE_TOKEN).await;
        }
    };
    for i in 0..3 {
        cancel(format!("before{i}")).await;
    }
    app.flush(&sku).await;
    until("the old URL never got a request", || async {
        old.in_flight_now() > 0
    })
    .await;

    let (status, view) = put_webhook(
        &app,
        &name,
        json!({"url": new.url, "secret": NEW_SECRET, "types": types}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        old.in_flight_now(),
        0,
        "a request to the old URL was in flight when the PUT answered"
    );
    let sent_to_old = old.received.lock().unwrap().len();

    for i in 0..3 {
        cancel(format!("after{i}")).await;
    }
    app.flush(&sku).await;
    let after: Vec<Value> = feed_all(&app, &format!("sku={sku}"), 100)
        .await
        .into_iter()
        .filter(|e| e["data"]["user_id"].as_str().unwrap().starts_with("after"))
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(after.len(), 3);
    until("the new URL never got every later event", || async {
        let got: Vec<Value> = new
            .of_sku(&sku)
            .iter()
            .map(|r| json!(r.headers["webhook-id"]))
            .collect();
        after.iter().all(|id| got.contains(id))
    })
    .await;
    assert_eq!(
        old.received.lock().unwrap().len(),
        sent_to_old,
        "a request went to the old URL after the PUT answered"
    );
    // Every request to the new URL, the earlier events' retries too, carries the new
    // secret's signature.
    verify_independently(NEW_SECRET, &new.of_sku(&sku));
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    delete_webhook(&app, &name).await;
}

/// A worker gives back what it claimed and did not send (told to stop, or too late to
/// start within its lease): due at once, the attempt not counted. A lease that is no
/// longer as its claim wrote it (it ended and another claim took the delivery) is left
/// to that claim.
#[tokio::test]
async fn claimed_deliveries_not_sent_are_given_back_and_only_under_their_own_lease() {
    use flashgate::db::webhooks::{self as rows, Lease};
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let name = unique_sku("given");
    put_webhook(
        &app,
        &name,
        json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
    )
    .await;
    let sku = unique_sku("given-back");
    app.create_sku(&sku, json!({"stock": 10})).await;
    for i in 0..3 {
        let id = app.hold(&sku, &format!("g{i}")).await;
        app.cancel(&id, SERVICE_TOKEN).await;
    }
    app.flush(&sku).await;
    let clock = ManualClock::default();
    let now = clock_now(&clock);
    enqueue_all(&app, &name, now).await;
    let lease_ms = 30_000;
    let claimed = rows::claim(&app.db, &name, "w", now, lease_ms, 1000)
        .await
        .unwrap();
    assert!(claimed.len() >= 3, "{}", claimed.len());
    let lease = |position, until_ms| Lease {
        position,
        owner: "w".into(),
        until_ms,
    };
    // The first two under their lease; the third under a lease it no longer has.
    let leases = [
        lease(claimed[0].position, now + lease_ms),
        lease(claimed[1].position, now + lease_ms),
        lease(claimed[2].position, now + lease_ms + 1),
    ];
    clock.advance(Duration::from_millis(5));
    rows::release(&app.db, &name, &leases, clock_now(&clock))
        .await
        .unwrap();
    let row = |position: u64| {
        let db = app.db.clone();
        let name = name.clone();
        async move {
            sqlx::query_as::<_, (u32, Option<String>, chrono::NaiveDateTime)>(
                "SELECT attempts, lease_owner, next_attempt_at FROM webhook_deliveries
                 WHERE webhook = ? AND position = ?",
            )
            .bind(&name)
            .bind(position)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    for given in &claimed[..2] {
        let (attempts, owner, due) = row(given.position).await;
        assert_eq!((attempts, owner), (0, None), "given back, not counted");
        // Due at once, in its place among the others: as when it was queued.
        assert_eq!(due.and_utc().timestamp_millis(), now, "due at once");
    }
    let (attempts, owner, due) = row(claimed[2].position).await;
    assert_eq!(
        (attempts, owner.as_deref()),
        (1, Some("w")),
        "left to its claim"
    );
    assert_eq!(due.and_utc().timestamp_millis(), now + lease_ms);
    // What was given back is claimed (and sent) at once; the other waits out its lease.
    let d = Deliverer::new(app.db.clone(), Arc::new(clock.clone())).only(&[&name]);
    drain(&d, &app, &name).await;
    // (The endpoint also gets other tests' events: the claim may hold some of them.)
    let sent: Vec<String> = receiver
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert!(sent.contains(&claimed[0].event_id) && sent.contains(&claimed[1].event_id));
    assert!(
        !sent.contains(&claimed[2].event_id),
        "sent under another's lease"
    );
    delete_webhook(&app, &name).await;
}

/// Two workers queueing one endpoint's events at once queue each event once.
#[tokio::test]
async fn two_workers_queueing_at_once_queue_each_event_once() {
    use flashgate::db::webhooks as rows;
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let name = unique_sku("requeue");
    put_webhook(
        &app,
        &name,
        json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
    )
    .await;
    let sku = unique_sku("requeued");
    app.create_sku(&sku, json!({"stock": 10})).await;
    for i in 0..4 {
        let id = app.hold(&sku, &format!("q{i}")).await;
        app.cancel(&id, SERVICE_TOKEN).await;
    }
    app.flush(&sku).await;
    // Two workers queue at once: each event once.
    let now = chrono::Utc::now().timestamp_millis();
    let (a, b) = tokio::join!(
        rows::enqueue(&app.db, &name, now, 1000),
        rows::enqueue(&app.db, &name, now, 1000)
    );
    a.unwrap();
    b.unwrap();
    enqueue_all(&app, &name, now).await;
    let queued: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_deliveries d JOIN events e ON e.position = d.position
         WHERE d.webhook = ? AND e.sku = ?",
    )
    .bind(&name)
    .bind(&sku)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(queued, 4, "each cancel queued once");
    delete_webhook(&app, &name).await;
}

/// The positions of one SKU's events, in sequence.
async fn positions_of(app: &TestApp, sku: &str) -> Vec<u64> {
    sqlx::query_scalar("SELECT position FROM events WHERE sku = ? ORDER BY sequence")
        .bind(sku)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

/// How many of `positions` of `name` are claimed (leased, not recorded).
async fn claimed_now(app: &TestApp, name: &str, positions: &[u64]) -> usize {
    let mut count = 0;
    for position in positions {
        let leased: Option<Option<String>> = sqlx::query_scalar(
            "SELECT lease_owner FROM webhook_deliveries
             WHERE webhook = ? AND position = ? AND status = 'pending'",
        )
        .bind(name)
        .bind(position)
        .fetch_optional(&app.db)
        .await
        .unwrap();
        count += usize::from(matches!(leased, Some(Some(_))));
    }
    count
}

/// An endpoint of one request at a time whose answers wait (`held`), four of its SKU's
/// cancellations queued, and a worker on a manual clock: one request in flight, the
/// rest claimed ahead of it. (The endpoint gets the cancellations of tests running
/// beside too: the request in flight may be one of theirs.)
struct HeldEndpoint {
    receiver: Receiver,
    held: tokio::sync::OwnedRwLockWriteGuard<()>,
    name: String,
    sku: String,
    positions: Vec<u64>,
    clock: ManualClock,
    stop: tokio::sync::watch::Sender<bool>,
    running: tokio::task::JoinHandle<()>,
}

impl HeldEndpoint {
    async fn start(app: &TestApp, prefix: &str) -> HeldEndpoint {
        let receiver = Receiver::start().await;
        let held = receiver.hold().await;
        let name = unique_sku(prefix);
        put_webhook(
            app,
            &name,
            json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
        )
        .await;
        let sku = unique_sku(prefix);
        app.create_sku(&sku, json!({"stock": 20})).await;
        for i in 0..4 {
            cancel_one(app, &sku, &format!("e{i}")).await;
        }
        app.flush(&sku).await;
        let positions = positions_of(app, &sku).await;
        assert_eq!(positions.len(), 4);
        let clock = ManualClock::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(
            Deliverer::new(app.db.clone(), Arc::new(clock.clone()))
                .only(&[&name])
                .with_concurrency(1)
                .run(stopped),
        );
        until("no request held", || async {
            receiver.in_flight_now() == 1
        })
        .await;
        until("the events were not claimed", || async {
            claimed_now(app, &name, &positions).await == 4
        })
        .await;
        HeldEndpoint {
            receiver,
            held,
            name,
            sku,
            positions,
            clock,
            stop,
            running,
        }
    }
}

/// A hold of `user` on `sku`, cancelled.
async fn cancel_one(app: &TestApp, sku: &str, user: &str) {
    let id = app.hold(sku, user).await;
    app.cancel(&id, SERVICE_TOKEN).await;
}

/// A slow but healthy endpoint (never an error) gets one SKU's events in sequence with
/// one request at a time, as before the claims ahead: deliveries claimed ahead that
/// could not start within their window are given back, and the ones claimed after them
/// must not overtake them.
#[tokio::test]
async fn given_back_deliveries_are_not_overtaken_by_later_ones() {
    let app = spawn_app().await;
    let HeldEndpoint {
        receiver,
        held,
        name,
        sku,
        positions: _,
        clock,
        stop,
        running,
    } = HeldEndpoint::start(&app, "inorder").await;
    // Past their start window (within their lease): they are given back once the
    // request's place is free. Meanwhile later events are queued and claimed.
    clock.advance(flashgate::webhooks::DELIVERY_TIMEOUT + Duration::from_secs(1));
    for i in 0..2 {
        cancel_one(&app, &sku, &format!("f{i}")).await;
    }
    app.flush(&sku).await;
    let all = positions_of(&app, &sku).await;
    assert_eq!(all.len(), 6);
    until("the later events were not claimed", || async {
        claimed_now(&app, &name, &all[4..]).await == 2
    })
    .await;
    clock.advance(Duration::from_secs(1));
    drop(held);
    until("not every event arrived", || async {
        receiver.of_sku(&sku).len() >= 6
    })
    .await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    let mut seen = Vec::new();
    for got in receiver.of_sku(&sku) {
        let sequence = got.event()["sequence"].as_u64().unwrap();
        if !seen.contains(&sequence) {
            seen.push(sequence);
        }
    }
    assert_eq!(seen, (1..=6).collect::<Vec<u64>>(), "arrival order");
    delete_webhook(&app, &name).await;
}

/// A worker told to stop (a deploy, a scale-down) gives back the deliveries it claimed
/// ahead and records the one in flight: none is left leased to a worker that is gone,
/// to wait out its lease (issue 25's audit: the stop used to cut every task short).
#[tokio::test]
async fn a_stopping_worker_gives_back_what_it_claimed_ahead() {
    use flashgate::webhooks::Clock;
    let app = spawn_app().await;
    let HeldEndpoint {
        receiver,
        held,
        name,
        sku,
        positions,
        clock,
        stop,
        running,
    } = HeldEndpoint::start(&app, "stopping").await;
    stop.send(true).unwrap();
    until("the events claimed ahead were not given back", || async {
        claimed_now(&app, &name, &positions).await <= 1
    })
    .await;
    // The request in flight ends (within its timeout) and its outcome is recorded.
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the worker stopped within the request timeout and its grace")
        .unwrap();
    assert_eq!(
        claimed_now(&app, &name, &positions).await,
        0,
        "nothing left leased"
    );
    let mut delivered = 0;
    for position in &positions {
        let row: (String, u32, i64) = sqlx::query_as(
            "SELECT status, attempts, next_attempt_at <= ? FROM webhook_deliveries
             WHERE webhook = ? AND position = ?",
        )
        .bind(flashgate::db::ms_to_datetime(clock.now_ms()))
        .bind(&name)
        .bind(position)
        .fetch_one(&app.db)
        .await
        .unwrap();
        match (row.0.as_str(), row.1) {
            ("delivered", 1) => delivered += 1,
            // Given back unsent: due at once, no attempt counted.
            _ => assert_eq!(
                (row.0.as_str(), row.1, row.2),
                ("pending", 0, 1),
                "{position}"
            ),
        }
    }
    assert!(
        delivered <= 1,
        "only the request in flight was sent: {delivered}"
    );
    assert_eq!(receiver.of_sku(&sku).len(), delivered);
    delete_webhook(&app, &name).await;
}

/// A claim that read the endpoint's former settings (and took their deliveries) while
/// a PUT was changing them commits before the PUT's write: the PUT must list its
/// leases (and wait for them), or the old task sends them after the PUT answered. The
/// claim is held just before its commit by a lock on `events` (its last read).
#[tokio::test]
async fn a_put_lists_the_leases_of_a_claim_that_committed_while_it_waited() {
    use flashgate::db::webhooks as rows;
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let name = unique_sku("racing");
    put_webhook(
        &app,
        &name,
        json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
    )
    .await;
    let sku = unique_sku("raced");
    app.create_sku(&sku, json!({"stock": 10})).await;
    for i in 0..3 {
        let id = app.hold(&sku, &format!("r{i}")).await;
        app.cancel(&id, SERVICE_TOKEN).await;
    }
    app.flush(&sku).await;
    let now = chrono::Utc::now().timestamp_millis();
    enqueue_all(&app, &name, now).await;
    let endpoint = rows::get(&app.db, &name).await.unwrap().unwrap();

    let mut lock = app.db.acquire().await.unwrap();
    sqlx::raw_sql("LOCK TABLES events WRITE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let claiming = tokio::spawn({
        let (db, endpoint) = (app.db.clone(), endpoint.clone());
        async move { rows::claim_current(&db, &endpoint, "old", now, 30_000, 1000).await }
    });
    // The claim has read the settings and leased the deliveries (not committed yet:
    // read uncommitted, without taking a lock it would skip).
    until("the claim leased nothing", || async {
        let mut conn = app.db.acquire().await.unwrap();
        sqlx::raw_sql("SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
            .execute(&mut *conn)
            .await
            .unwrap();
        let leased: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE webhook = ? AND lease_owner = 'old'",
        )
        .bind(&name)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        leased >= 3
    })
    .await;
    let putting = tokio::spawn({
        let db = app.db.clone();
        let moved = rows::Endpoint {
            url: "http://127.0.0.1:1/moved".into(),
            ..endpoint.clone()
        };
        async move {
            rows::put(&db, &moved, chrono::Utc::now().timestamp_millis())
                .await
                .unwrap()
        }
    });
    // Its write waits for the claim's share lock (after the PUT's first read).
    until("the PUT did not wait for the claim", || async {
        let writing: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST
             WHERE INFO LIKE 'INSERT INTO webhooks%'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        writing > 0
    })
    .await;
    assert!(!putting.is_finished(), "the PUT did not wait for the claim");
    sqlx::raw_sql("UNLOCK TABLES")
        .execute(&mut *lock)
        .await
        .unwrap();
    drop(lock);
    let claimed = claiming
        .await
        .unwrap()
        .unwrap()
        .expect("claimed before the PUT");
    assert!(claimed.len() >= 3, "{}", claimed.len());
    let written = putting.await.unwrap();
    let listed: Vec<u64> = written.in_flight.iter().map(|l| l.position).collect();
    let missed: Vec<u64> = claimed
        .iter()
        .map(|c| c.position)
        .filter(|p| !listed.contains(p))
        .collect();
    assert!(
        missed.is_empty(),
        "the PUT answered without waiting for {} deliveries claimed under the former settings",
        missed.len()
    );
    delete_webhook(&app, &name).await;
}

/// A delivery given back keeps its place: deliveries queued after it (due before it was
/// given back) are not claimed before it, so a backlog does not overtake it.
#[tokio::test]
async fn a_delivery_given_back_keeps_its_place_in_the_queue() {
    use flashgate::db::webhooks::{self as rows, Lease};
    let app = spawn_app().await;
    let receiver = Receiver::start().await;
    let name = unique_sku("place");
    put_webhook(
        &app,
        &name,
        json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}),
    )
    .await;
    let sku = unique_sku("in-place");
    app.create_sku(&sku, json!({"stock": 10})).await;
    let cancel = |user: String| {
        let (app, sku) = (&app, &sku);
        async move {
            let id = app.hold(sku, &user).await;
            app.cancel(&id, SERVICE_TOKEN).await;
        }
    };
    let clock = ManualClock::default();
    for i in 0..2 {
        cancel(format!("e{i}")).await;
    }
    app.flush(&sku).await;
    enqueue_all(&app, &name, clock_now(&clock)).await;
    let lease_ms = 30_000;
    let claimed = rows::claim(&app.db, &name, "w", clock_now(&clock), lease_ms, 1000)
        .await
        .unwrap();
    let early = positions_of(&app, &sku).await;
    assert!(early
        .iter()
        .all(|p| claimed.iter().any(|c| c.position == *p)));
    // Later events queued while those are claimed, then those given back.
    clock.advance(Duration::from_secs(5));
    for i in 0..2 {
        cancel(format!("f{i}")).await;
    }
    app.flush(&sku).await;
    enqueue_all(&app, &name, clock_now(&clock)).await;
    let leases: Vec<Lease> = claimed
        .iter()
        .map(|c| Lease {
            position: c.position,
            owner: "w".into(),
            until_ms: clock_now(&clock) - 5_000 + lease_ms,
        })
        .collect();
    clock.advance(Duration::from_secs(6));
    rows::release(&app.db, &name, &leases, clock_now(&clock))
        .await
        .unwrap();
    let again: Vec<u64> = rows::claim(&app.db, &name, "w2", clock_now(&clock), lease_ms, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.position)
        .collect();
    let all = positions_of(&app, &sku).await;
    let order: Vec<u64> = again.into_iter().filter(|p| all.contains(p)).collect();
    assert_eq!(order, all, "claimed again in their order");
    delete_webhook(&app, &name).await;
}
