//! The waiting room (contract v1.2 "Waiting room"): one ticket per user, admission by
//! stock in position order, tokens checked before Redis and spent once by the reserve,
//! lapses and returned units admitting the next users, `sold_out` told to every ticket,
//! and a pre-queue shuffled at the start.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{body, spawn_app, unique_sku, user_token, TestApp, SERVICE_TOKEN};

async fn queue_call(app: &TestApp, sku: &str, user: &str, join: bool) -> (StatusCode, Value) {
    let url = app.url(&format!("/v1/skus/{sku}/queue"));
    let request = if join {
        app.client.post(url)
    } else {
        app.client.get(url)
    };
    body(request.bearer_auth(user_token(user)).send().await.unwrap()).await
}

/// Joins; panics unless 200. Returns the ticket.
async fn join(app: &TestApp, sku: &str, user: &str) -> Value {
    let (status, ticket) = queue_call(app, sku, user, true).await;
    assert_eq!(status, StatusCode::OK, "{ticket}");
    ticket
}

/// The user's ticket; panics unless 200.
async fn ticket(app: &TestApp, sku: &str, user: &str) -> Value {
    let (status, ticket) = queue_call(app, sku, user, false).await;
    assert_eq!(status, StatusCode::OK, "{ticket}");
    ticket
}

async fn reserve_with(
    app: &TestApp,
    sku: &str,
    user: &str,
    key: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = app
        .client
        .post(app.url(&format!("/v1/skus/{sku}/reservations")))
        .bearer_auth(user_token(user))
        .header("Idempotency-Key", key)
        .json(&json!({ "quantity": 1 }));
    if let Some(token) = token {
        request = request.header("Admission-Token", token);
    }
    body(request.send().await.unwrap()).await
}

fn token_of(ticket: &Value) -> &str {
    ticket["admission_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {ticket}"))
}

async fn waiting_room_sku(app: &TestApp, prefix: &str, stock: u64) -> String {
    let sku = unique_sku(prefix);
    app.create_sku(&sku, json!({"stock": stock, "waiting_room": {}}))
        .await;
    sku
}

/// The unused admissions of a SKU as Redis has them (user -> admitted_until).
async fn admissions(app: &TestApp, sku: &str) -> Vec<(String, i64)> {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let mut conn = app.store.connection();
    redis::cmd("ZRANGE")
        .arg(keys.queue_admits())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_sku_without_a_waiting_room_says_so_and_a_user_without_a_ticket_has_none() {
    let app = spawn_app().await;
    let plain = unique_sku("wr-none");
    app.create_sku(&plain, json!({"stock": 1})).await;
    let (status, problem) = queue_call(&app, &plain, "u1", true).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "no_waiting_room");
    assert_eq!(app.sku(&plain).await["waiting_room"], Value::Null);

    let sku = waiting_room_sku(&app, "wr-noticket", 1).await;
    let (status, problem) = queue_call(&app, &sku, "u1", false).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (status, _) = queue_call(&app, &unique_sku("wr-nosku"), "u1", true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The service token is not a user.
    let (status, _) = body(
        app.client
            .post(app.url(&format!("/v1/skus/{sku}/queue")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Nothing was joined by any of that.
    assert!(admissions(&app, &sku).await.is_empty());
}

#[tokio::test]
async fn the_definition_carries_the_waiting_room_and_refuses_bad_terms() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-def");
    let view = app
        .create_sku(
            &sku,
            json!({"stock": 3, "waiting_room": {"admission_seconds": 30, "admit_per_second": 5}}),
        )
        .await;
    assert_eq!(
        view["waiting_room"],
        json!({"admission_seconds": 30, "admit_per_second": 5, "prequeue_shuffle": true})
    );
    assert_eq!(app.sku(&sku).await["waiting_room"], view["waiting_room"]);
    for bad in [
        json!({"stock": 3, "waiting_room": {"admission_seconds": 0}}),
        json!({"stock": 3, "waiting_room": {"admission_seconds": 86401}}),
        json!({"stock": 3, "waiting_room": {"admit_per_second": -1}}),
        json!({"stock": 3, "waiting_room": {"prequeue_shuffle": "yes"}}),
        json!({"stock": 3, "waiting_room": {"admission_second": 10}}),
        json!({"stock": 3, "waiting_room": 5}),
    ] {
        let (status, problem) = app.put_sku(&unique_sku("wr-bad"), bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {problem}");
    }
    // A PUT without it removes the waiting room.
    let view = app.create_sku(&sku, json!({"stock": 3})).await;
    assert_eq!(view["waiting_room"], Value::Null);
    let (status, problem) = queue_call(&app, &sku, "u1", true).await;
    assert_eq!(
        (status, problem["code"].clone()),
        (StatusCode::CONFLICT, json!("no_waiting_room"))
    );
}

#[tokio::test]
async fn users_are_admitted_by_stock_in_order_and_one_admission_makes_one_hold() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-admit", 2).await;
    let mut tickets = Vec::new();
    for user in ["a", "b", "c", "d"] {
        tickets.push(join(&app, &sku, user).await);
    }
    // A repeat answers the same place.
    assert_eq!(join(&app, &sku, "a").await["position"], 1);
    let [a, b, c, d] = [0, 1, 2, 3].map(|i| ticket_now(&tickets[i]));
    assert_eq!((a.0.as_str(), a.1), ("admitted", 1));
    assert_eq!((b.0.as_str(), b.1), ("admitted", 2));
    // Two units, two admissions: the third user waits.
    assert_eq!((c.0.as_str(), c.1), ("waiting", 3));
    assert_eq!((d.0.as_str(), d.1), ("waiting", 4));
    let c_now = ticket(&app, &sku, "c").await;
    assert_eq!(
        (c_now["state"].as_str(), c_now["ahead"].as_u64()),
        (Some("waiting"), Some(0))
    );
    assert!(c_now["retry_after_ms"].as_u64().unwrap() >= 500);
    assert_eq!(ticket(&app, &sku, "d").await["ahead"], 1);

    // Without a token, with a forged one, with another user's: 403 before anything.
    let a_token = token_of(&tickets[0]).to_owned();
    let b_token = token_of(&tickets[1]).to_owned();
    for (user, token) in [
        ("a", None),
        ("a", Some("bm90IGEgdG9rZW4.AAAAAAAAAAAAAAAAAAAAAA")),
        ("a", Some(b_token.as_str())),
        ("c", Some(a_token.as_str())),
    ] {
        let (status, problem) = reserve_with(&app, &sku, user, "k1", token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{user} {token:?}: {problem}");
        assert_eq!(problem["code"], "admission_required");
    }
    assert_eq!(app.sku(&sku).await["available"], 2);

    // One admission: one hold; the same key replays it; another key is refused.
    let (status, hold) = reserve_with(&app, &sku, "a", "k1", Some(&a_token)).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    let (status, replay) = reserve_with(&app, &sku, "a", "k1", Some(&a_token)).await;
    assert_eq!(status, StatusCode::CREATED, "{replay}");
    assert_eq!(replay["reservation_id"], hold["reservation_id"]);
    let (status, problem) = reserve_with(&app, &sku, "a", "k2", Some(&a_token)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "admission_used");
    // The used admission still shows, and admitted no one new: b's unit is b's.
    assert_eq!(ticket(&app, &sku, "a").await["state"], "admitted");
    assert_eq!(ticket(&app, &sku, "c").await["state"], "waiting");

    // The hold comes back: the next in line is admitted.
    let (status, _) = app
        .cancel(hold["reservation_id"].as_str().unwrap(), SERVICE_TOKEN)
        .await;
    assert_eq!(status, StatusCode::OK);
    let c_now = ticket(&app, &sku, "c").await;
    assert_eq!(c_now["state"], "admitted", "{c_now}");
    assert_eq!(ticket(&app, &sku, "d").await["state"], "waiting");
    app.assert_stock_adds_up(&sku).await;
}

/// (state, position) of a ticket as joined.
fn ticket_now(ticket: &Value) -> (String, u64) {
    (
        ticket["state"].as_str().unwrap().to_owned(),
        ticket["position"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_lapsed_admission_goes_to_the_next_user_and_its_token_stops_working() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-lapse", 1).await;
    let first = join(&app, &sku, "first").await;
    assert_eq!(first["state"], "admitted");
    assert_eq!(join(&app, &sku, "second").await["state"], "waiting");
    // Time made fast: the first admission's deadline is moved into the past, as if
    // admission_seconds had gone by (Redis's clock decides the lapse).
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let _: () = redis::cmd("ZADD")
        .arg(keys.queue_admits())
        .arg("XX")
        .arg(1)
        .arg("first")
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = ticket(&app, &sku, "second").await;
    assert_eq!(second["state"], "admitted", "{second}");
    let first_now = ticket(&app, &sku, "first").await;
    assert_eq!(
        (first_now["state"].as_str(), first_now["lapsed"].as_bool()),
        (Some("closed"), Some(true)),
        "{first_now}"
    );
    let (status, problem) = reserve_with(&app, &sku, "first", "k", Some(token_of(&first))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    let (status, hold) = reserve_with(&app, &sku, "second", "k", Some(token_of(&second))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
}

#[tokio::test]
async fn once_everything_is_sold_every_ticket_says_sold_out() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-soldout", 1).await;
    let buyer = join(&app, &sku, "buyer").await;
    join(&app, &sku, "late1").await;
    let (status, hold) = reserve_with(&app, &sku, "buyer", "k", Some(token_of(&buyer))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    // Held, not sold: the hold may still come back, so the line waits.
    assert_eq!(ticket(&app, &sku, "late1").await["state"], "waiting");
    let (status, _) = app
        .confirm(hold["reservation_id"].as_str().unwrap(), "pay-1")
        .await;
    assert_eq!(status, StatusCode::OK);
    let late = ticket(&app, &sku, "late1").await;
    assert_eq!(
        (late["state"].as_str(), late["retry_after_ms"].as_u64()),
        (Some("sold_out"), Some(0))
    );
    // A join now learns it at once and takes no place.
    let late2 = join(&app, &sku, "late2").await;
    assert_eq!(late2["state"], "sold_out");
    assert_eq!(late2["position"], Value::Null);
    assert_eq!(ticket(&app, &sku, "late2").await["state"], "sold_out");
    // The buyer got their turn.
    assert_eq!(ticket(&app, &sku, "buyer").await["state"], "admitted");
}

#[tokio::test]
async fn racing_joins_get_unique_positions_and_no_more_admissions_than_units() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-race", 3).await;
    let users: Vec<String> = (0..60).map(|i| format!("racer-{i}")).collect();
    let joins = users.iter().map(|user| join(&app, &sku, user));
    let tickets = futures::future::join_all(joins).await;
    let positions: HashSet<u64> = tickets
        .iter()
        .map(|t| t["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, (1..=60).collect::<HashSet<u64>>());
    let admitted: Vec<&Value> = tickets
        .iter()
        .filter(|t| t["state"] == "admitted")
        .collect();
    assert_eq!(admitted.len(), 3, "three units, three admissions");
    let mut first_three: Vec<u64> = admitted
        .iter()
        .map(|t| t["position"].as_u64().unwrap())
        .collect();
    first_three.sort();
    assert_eq!(first_three, [1, 2, 3]);
    // Every admitted user buys at once, racing: three holds, then the line moves on
    // only as units come back.
    let buys = admitted.iter().map(|t| {
        let user = t["user_id"].as_str().unwrap().to_owned();
        let token = token_of(t).to_owned();
        let app = &app;
        let sku = &sku;
        async move { reserve_with(app, sku, &user, "k", Some(&token)).await.0 }
    });
    let statuses = futures::future::join_all(buys).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    assert!(admissions(&app, &sku).await.is_empty());
    assert_eq!(ticket(&app, &sku, "racer-59").await["state"], "waiting");
    app.assert_stock_adds_up(&sku).await;
}

#[tokio::test]
async fn the_prequeue_gets_positions_at_the_start_in_a_shuffled_order() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-pre");
    let definition = |starts_at: &str| json!({"stock": 5, "starts_at": starts_at, "waiting_room": {"prequeue_shuffle": true}});
    app.create_sku(&sku, definition("2999-01-01T00:00:00Z"))
        .await;
    let users: Vec<String> = (0..40).map(|i| format!("early-{i:02}")).collect();
    for user in &users {
        let t = join(&app, &sku, user).await;
        assert_eq!(
            (t["state"].as_str(), &t["position"]),
            (Some("waiting"), &Value::Null),
            "{t}"
        );
        assert_eq!(t["eta_seconds"], Value::Null);
    }
    // The operator starts the sale now.
    app.create_sku(&sku, definition("2020-01-01T00:00:00Z"))
        .await;
    let late = join(&app, &sku, "late").await;
    assert_eq!(
        late["position"], 41,
        "after the start, behind the pre-queue: {late}"
    );
    let mut order = Vec::new();
    for user in &users {
        order.push(ticket(&app, &sku, user).await["position"].as_u64().unwrap());
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=40).collect::<Vec<u64>>());
    // 40! orders: arrival order comes back by chance with probability 1 / 40!.
    assert_ne!(order, sorted, "the pre-queue kept its arrival order");
    // The first five positions are admitted.
    for user in &users {
        let t = ticket(&app, &sku, user).await;
        let admitted = t["position"].as_u64().unwrap() <= 5;
        assert_eq!(t["state"] == "admitted", admitted, "{t}");
    }
}

#[tokio::test]
async fn without_shuffle_the_prequeue_keeps_its_arrival_order() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-fifo");
    let definition = |starts_at: &str| json!({"stock": 1, "starts_at": starts_at, "waiting_room": {"prequeue_shuffle": false}});
    app.create_sku(&sku, definition("2999-01-01T00:00:00Z"))
        .await;
    for i in 0..10 {
        join(&app, &sku, &format!("fifo-{i}")).await;
    }
    app.create_sku(&sku, definition("2020-01-01T00:00:00Z"))
        .await;
    for i in 0..10u64 {
        let t = ticket(&app, &sku, &format!("fifo-{i}")).await;
        assert_eq!(t["position"], i + 1, "{t}");
    }
}

/// An open `queue/stream`: its `ticket` events as they come.
struct TicketStream {
    response: reqwest::Response,
    buffer: String,
}

impl TicketStream {
    async fn open(app: &TestApp, sku: &str, user: &str) -> TicketStream {
        let response = app
            .client
            .get(app.url(&format!("/v1/skus/{sku}/queue/stream")))
            .bearer_auth(user_token(user))
            .header("Accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        TicketStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next `ticket` event, None when the stream ended; panics after `within`.
    async fn next(&mut self, within: std::time::Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event:") {
                        event = Some(name.trim().to_owned());
                    } else if let Some(json) = line.strip_prefix("data:") {
                        data = Some(serde_json::from_str::<Value>(json.trim()).unwrap());
                    }
                }
                match (event.as_deref(), data) {
                    (Some("ticket"), Some(ticket)) => return Some(ticket),
                    _ => continue, // a comment line
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("a ticket event in time")
                .unwrap();
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => return None,
            }
        }
    }
}

const TOLD_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

#[tokio::test]
async fn a_stream_tells_admission_then_sold_out_within_a_second_and_ends() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-stream", 1).await;
    let first = join(&app, &sku, "first").await;
    join(&app, &sku, "second").await;
    let mut stream = TicketStream::open(&app, &sku, "second").await;
    let now = stream.next(TOLD_WITHIN).await.unwrap();
    assert_eq!(
        (now["state"].as_str(), now["ahead"].as_u64()),
        (Some("waiting"), Some(0))
    );

    // The first user's hold is cancelled: the unit comes back and admits the second.
    let (status, hold) = reserve_with(&app, &sku, "first", "k", Some(token_of(&first))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    let id = hold["reservation_id"].as_str().unwrap();
    app.cancel(id, SERVICE_TOKEN).await;
    let admitted = stream.next(TOLD_WITHIN * 2).await.unwrap();
    assert_eq!(admitted["state"], "admitted", "{admitted}");
    let token = token_of(&admitted).to_owned();

    // A third user waits on a stream of their own; the second buys the last unit.
    join(&app, &sku, "third").await;
    let mut third = TicketStream::open(&app, &sku, "third").await;
    assert_eq!(third.next(TOLD_WITHIN).await.unwrap()["state"], "waiting");
    let (status, hold) = reserve_with(&app, &sku, "second", "k", Some(&token)).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    let (status, _) = app
        .confirm(hold["reservation_id"].as_str().unwrap(), "pay")
        .await;
    assert_eq!(status, StatusCode::OK);
    let told = third.next(TOLD_WITHIN).await.unwrap();
    assert_eq!(told["state"], "sold_out", "{told}");
    assert_eq!(
        third.next(TOLD_WITHIN).await,
        None,
        "the stream ends after sold_out"
    );
    // The admitted buyer's stream ends too, showing its admission.
    let last = stream.next(TOLD_WITHIN).await.unwrap();
    assert_eq!(last["state"], "admitted", "{last}");
    assert_eq!(stream.next(TOLD_WITHIN).await, None);
}

#[tokio::test]
async fn many_streams_are_all_told_sold_out_within_a_second() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-streams", 1).await;
    let buyer = join(&app, &sku, "buyer").await;
    let users: Vec<String> = (0..200).map(|i| format!("watcher-{i}")).collect();
    for user in &users {
        join(&app, &sku, user).await;
    }
    let mut streams = futures::future::join_all(
        users
            .iter()
            .map(|user| TicketStream::open(&app, &sku, user)),
    )
    .await;
    for stream in &mut streams {
        assert_eq!(stream.next(TOLD_WITHIN).await.unwrap()["state"], "waiting");
    }
    let (_, hold) = reserve_with(&app, &sku, "buyer", "k", Some(token_of(&buyer))).await;
    let sold_at = std::time::Instant::now();
    let (status, _) = app
        .confirm(hold["reservation_id"].as_str().unwrap(), "pay")
        .await;
    assert_eq!(status, StatusCode::OK);
    let told = futures::future::join_all(streams.iter_mut().map(|stream| async move {
        loop {
            // Position moves may come first; sold_out must come within the second.
            let ticket = stream.next(TOLD_WITHIN).await.expect("told before the end");
            if ticket["state"] == "sold_out" {
                return std::time::Instant::now();
            }
        }
    }))
    .await;
    let slowest = told
        .iter()
        .map(|t| t.duration_since(sold_at))
        .max()
        .unwrap();
    assert!(
        slowest < TOLD_WITHIN,
        "the last stream was told after {slowest:?}"
    );
}

// ------------------------------------------------ rules an outside audit found unpinned

/// An admission token of `user` for `sku` until `admitted_until_ms`, signed as the test
/// gateway signs (its keys derive from the JWT secret): a token of an admission whose
/// deadline is past, without waiting for it.
fn token_until(sku: &str, user: &str, admitted_until_ms: i64) -> String {
    let keys = flashgate::ids::IdKeys::new(None, &[], &[crate::common::JWT_SECRET]).unwrap();
    flashgate::queue::sign(&keys, &TestApp::sku_id(sku), user, admitted_until_ms)
}

#[tokio::test]
async fn a_token_past_its_deadline_still_replays_its_key_and_buys_nothing_more() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-replay", 5).await;
    let admitted = join(&app, &sku, "a").await;
    let (status, hold) = reserve_with(&app, &sku, "a", "k", Some(token_of(&admitted))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    // The answer was lost; the client retries after the admission's deadline.
    let stale = token_until(&sku, "a", 1);
    let (status, replay) = reserve_with(&app, &sku, "a", "k", Some(&stale)).await;
    assert_eq!(status, StatusCode::CREATED, "{replay}");
    assert_eq!(replay["reservation_id"], hold["reservation_id"]);
    let (status, problem) = reserve_with(&app, &sku, "a", "k2", Some(&stale)).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_required"))
    );
}

#[tokio::test]
async fn a_token_that_is_not_good_counts_as_none_on_a_sku_without_a_waiting_room() {
    let app = spawn_app().await;
    let room = waiting_room_sku(&app, "wr-other", 5).await;
    let plain = unique_sku("wr-plain");
    app.create_sku(&plain, json!({"stock": 5})).await;
    let token = token_of(&join(&app, &room, "u").await).to_owned();
    for (user, token) in [("u", token.as_str()), ("v", "a.b")] {
        let (status, hold) = reserve_with(&app, &plain, user, "k", Some(token)).await;
        assert_eq!(status, StatusCode::CREATED, "{hold}");
    }
}

#[tokio::test]
async fn removing_the_waiting_room_ends_its_admissions_so_no_token_buys_twice() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-toggle");
    let room = json!({"stock": 5, "per_user_limit": 2, "waiting_room": {}});
    app.create_sku(&sku, room.clone()).await;
    let a = token_of(&join(&app, &sku, "a").await).to_owned();
    let b = token_of(&join(&app, &sku, "b").await).to_owned();
    // The operator drops the waiting room: anyone reserves, a's token or not.
    app.create_sku(&sku, json!({"stock": 5, "per_user_limit": 2}))
        .await;
    assert_eq!(
        queue_call(&app, &sku, "a", false).await.1["code"],
        "no_waiting_room"
    );
    let (status, first) = reserve_with(&app, &sku, "a", "k1", Some(&a)).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // Back on: a fresh line; the old admissions went with the old one.
    app.create_sku(&sku, room).await;
    assert!(admissions(&app, &sku).await.is_empty());
    for (user, token) in [("a", &a), ("b", &b)] {
        let (status, problem) = reserve_with(&app, &sku, user, "k2", Some(token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{user}: {problem}");
    }
    assert_eq!(join(&app, &sku, "b").await["position"], 1);
}

#[tokio::test]
async fn a_pause_holds_the_admitted_users_time_until_the_resume() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-pause", 5).await;
    let admitted = join(&app, &sku, "a").await;
    assert_eq!(admitted["state"], "admitted");
    let post = |action: &'static str| {
        app.client
            .post(app.url(&format!("/v1/admin/skus/{sku}/{action}")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
    };
    assert_eq!(post("pause").await.unwrap().status(), StatusCode::OK);
    // Time made fast: the admission was made 70 s ago with 60 s to use it, and the pause
    // began 65 s ago (5 s after it); by the clock its deadline passed 10 s ago.
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let now = chrono::Utc::now().timestamp_millis();
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg(keys.queue_admits())
        .arg("XX")
        .arg(now - 10_000)
        .arg("a")
        .cmd("HSET")
        .arg(keys.queue_state())
        .arg("frozen_at")
        .arg(now - 65_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Looks during the pause lapse nothing.
    assert_eq!(ticket(&app, &sku, "a").await["state"], "admitted");
    assert_eq!(post("resume").await.unwrap().status(), StatusCode::OK);
    // The 55 s left at the pause are left after it.
    let after = ticket(&app, &sku, "a").await;
    assert_eq!(after["state"], "admitted", "{after}");
    let (_, until): (String, i64) = admissions(&app, &sku).await.remove(0);
    assert!(
        (now + 54_000..now + 57_000).contains(&until),
        "deadline {until}, now {now}"
    );
    let (status, hold) = reserve_with(&app, &sku, "a", "k", Some(token_of(&after))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
}

#[tokio::test]
async fn a_sku_stocked_at_zero_before_its_start_keeps_its_prequeue_shuffled() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-zero");
    let starts_at = "2999-01-01T00:00:00Z";
    app.create_sku(
        &sku,
        json!({"stock": 0, "starts_at": starts_at, "waiting_room": {}}),
    )
    .await;
    let early = join(&app, &sku, "early").await;
    assert_eq!(
        (early["state"].as_str(), &early["position"]),
        (Some("waiting"), &Value::Null)
    );
    app.create_sku(
        &sku,
        json!({"stock": 100, "starts_at": starts_at, "waiting_room": {}}),
    )
    .await;
    for i in 0..5 {
        let t = join(&app, &sku, &format!("user-{i}")).await;
        assert_eq!(t["position"], Value::Null, "a place before the start: {t}");
    }
}

#[tokio::test]
async fn a_look_at_a_retired_waiting_room_writes_nothing_back() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-retired");
    app.create_sku(
        &sku,
        json!({"stock": 5, "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2020-01-02T00:00:00Z", "waiting_room": {}}),
    )
    .await;
    let id = TestApp::sku_id(&sku);
    let mut state = app.store.sweep(&id).await.unwrap().state;
    for _ in 0..100 {
        if state == flashgate::store::SaleState::Retired {
            break;
        }
        app.flush(&sku).await;
        state = app.store.sweep(&id).await.unwrap().state;
    }
    assert_eq!(state, flashgate::store::SaleState::Retired);
    assert_eq!(join(&app, &sku, "late").await["state"], "closed");
    let keys = flashgate::keys::SkuKeys::new(&id);
    let mut conn = app.store.connection();
    let exists: u32 = redis::cmd("EXISTS")
        .arg(keys.queue_state())
        .arg(keys.queue_line())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "a closed look wrote the queue back");
    // Back on sale with a start ahead: a pre-queue again.
    app.create_sku(
        &sku,
        json!({"stock": 5, "starts_at": "2999-01-01T00:00:00Z", "waiting_room": {}}),
    )
    .await;
    assert_eq!(join(&app, &sku, "next").await["position"], Value::Null);
}

#[tokio::test]
async fn less_stock_than_the_unused_admissions_revokes_the_newest_so_no_unit_is_promised_twice() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-cut", 3).await;
    for user in ["a", "b", "c", "d"] {
        join(&app, &sku, user).await;
    }
    assert_eq!(admissions(&app, &sku).await.len(), 3);
    app.create_sku(&sku, json!({"stock": 1, "waiting_room": {}}))
        .await;
    let left = admissions(&app, &sku).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(app.sku(&sku).await["available"], 1);
    let (kept, _) = &left[0];
    let mut closed = 0;
    for user in ["a", "b", "c"] {
        let t = ticket(&app, &sku, user).await;
        if user == kept {
            assert_eq!(t["state"], "admitted", "{t}");
        } else {
            assert_eq!(
                (t["state"].as_str(), t["lapsed"].as_bool()),
                (Some("closed"), Some(true)),
                "{t}"
            );
            closed += 1;
        }
    }
    assert_eq!(closed, 2);
    assert_eq!(ticket(&app, &sku, "d").await["state"], "waiting");
}

#[tokio::test]
async fn an_admission_that_lapsed_before_a_pause_stays_lapsed_after_it() {
    let app = spawn_app().await;
    let sku = waiting_room_sku(&app, "wr-pause-lapsed", 1).await;
    assert_eq!(join(&app, &sku, "a").await["state"], "admitted");
    join(&app, &sku, "b").await;
    // Time made fast: a's admission ran out 10 s ago, and nobody looked since.
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let now = chrono::Utc::now().timestamp_millis();
    let _: () = redis::cmd("ZADD")
        .arg(keys.queue_admits())
        .arg("XX")
        .arg(now - 10_000)
        .arg("a")
        .query_async(&mut conn)
        .await
        .unwrap();
    for action in ["pause", "resume"] {
        let response = app
            .client
            .post(app.url(&format!("/v1/admin/skus/{sku}/{action}")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    // The pause gives back only the time it stood still, not a lapse before it.
    assert_eq!(ticket(&app, &sku, "a").await["lapsed"], true);
    assert_eq!(ticket(&app, &sku, "b").await["state"], "admitted");
    assert!(admissions(&app, &sku).await.len() <= 1);
}

/// Each bucket's (stock_total, available, held, sold) as Redis has them.
async fn bucket_counters(app: &TestApp, sku: &str, k: u32) -> Vec<[u64; 4]> {
    let mut out = Vec::new();
    for sale in flashgate::buckets::sales(&TestApp::sku_id(sku), k) {
        let (view, _) = app.store.sale_view(&sale).await.unwrap();
        out.push([view.stock_total, view.available, view.held, view.sold]);
    }
    out
}

/// A split SKU with a waiting room: its stock and every buyer in bucket 0, where the
/// admissions are spent with the holds (buckets::homes). Admission by stock, one hold
/// per token, returned units admitting the next user and `sold_out` for those still
/// waiting work as with one bucket; the other buckets hold nothing, also after a
/// restock and after Redis loses bucket 0; whether it has a waiting room cannot
/// change.
#[tokio::test]
async fn a_split_sku_with_a_waiting_room_admits_and_sells_from_bucket_0() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-split");
    let k = 3;
    app.create_sku(
        &sku,
        json!({"stock": 3, "buckets": k, "waiting_room": {"admission_seconds": 600}}),
    )
    .await;
    assert_eq!(
        bucket_counters(&app, &sku, k).await,
        vec![[3, 3, 0, 0], [0; 4], [0; 4]]
    );
    let users: Vec<String> = (0..5).map(|i| format!("split-{i}")).collect();
    for user in &users {
        join(&app, &sku, user).await;
    }
    // Three units: the first three admitted, the others wait.
    let mut tickets = Vec::new();
    for user in &users {
        tickets.push(ticket(&app, &sku, user).await);
    }
    let states: Vec<&str> = tickets
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["admitted", "admitted", "admitted", "waiting", "waiting"]
    );
    // Without a token: refused, whatever bucket the user's hash would pick.
    let (status, problem) = reserve_with(&app, &sku, &users[3], "k", None).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("admission_required")),
        "{problem}"
    );
    let mut holds = Vec::new();
    for (user, ticket) in users.iter().zip(&tickets).take(3) {
        let (status, hold) = reserve_with(&app, &sku, user, "k", Some(token_of(ticket))).await;
        assert_eq!(status, StatusCode::CREATED, "{hold}");
        let rid = hold["reservation_id"].as_str().unwrap().to_owned();
        assert_eq!(
            flashgate::ids::sale_of_reservation(&rid),
            Some(TestApp::sku_id(&sku)),
            "held in bucket 0"
        );
        holds.push(rid);
    }
    // A token makes one hold.
    let (status, problem) =
        reserve_with(&app, &sku, &users[0], "k2", Some(token_of(&tickets[0]))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(
        bucket_counters(&app, &sku, k).await,
        vec![[3, 0, 3, 0], [0; 4], [0; 4]]
    );
    // A unit comes back: the next user in line is admitted and holds it.
    assert_eq!(app.cancel(&holds[2], SERVICE_TOKEN).await.0, StatusCode::OK);
    let next = ticket(&app, &sku, &users[3]).await;
    assert_eq!(next["state"], "admitted", "{next}");
    let (status, hold) = reserve_with(&app, &sku, &users[3], "k", Some(token_of(&next))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    holds[2] = hold["reservation_id"].as_str().unwrap().to_owned();
    // A restock goes to bucket 0 and admits the last user.
    app.create_sku(
        &sku,
        json!({"stock": 4, "buckets": k, "waiting_room": {"admission_seconds": 600}}),
    )
    .await;
    assert_eq!(bucket_counters(&app, &sku, k).await[1..], [[0; 4], [0; 4]]);
    let last = ticket(&app, &sku, &users[4]).await;
    assert_eq!(last["state"], "admitted", "{last}");
    let (status, hold) = reserve_with(&app, &sku, &users[4], "k", Some(token_of(&last))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    holds.push(hold["reservation_id"].as_str().unwrap().to_owned());
    for (i, rid) in holds.iter().enumerate() {
        assert_eq!(
            app.confirm(rid, &format!("pay-{i}")).await.0,
            StatusCode::OK
        );
    }
    // Sold out: terminal for anyone who joins now.
    let late = join(&app, &sku, "split-late").await;
    assert_eq!(late["state"], "sold_out", "{late}");
    assert_eq!(
        bucket_counters(&app, &sku, k).await,
        vec![[4, 0, 0, 4], [0; 4], [0; 4]]
    );

    // Whether a split SKU has a waiting room is fixed: removing it, or adding one to a
    // split SKU created without, is refused and changes nothing.
    let (status, problem) = app.put_sku(&sku, json!({"stock": 4, "buckets": k})).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("buckets_changed")),
        "{problem}"
    );
    assert!(app.sku(&sku).await["waiting_room"].is_object());
    let plain = unique_sku("wr-split-plain");
    app.create_sku(&plain, json!({"stock": 2, "buckets": 2}))
        .await;
    let (status, problem) = app
        .put_sku(
            &plain,
            json!({"stock": 2, "buckets": 2, "waiting_room": {}}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("buckets_changed")),
        "{problem}"
    );
    let (status, _) = queue_call(&app, &plain, "u1", true).await;
    assert_eq!(status, StatusCode::CONFLICT, "still no waiting room");
}

/// Redis loses a split SKU with a waiting room: the rebuild gives the units
/// MySQL does not record as sold back to bucket 0, none to another bucket, and admitted
/// buyers hold them there.
#[tokio::test]
async fn a_lost_split_waiting_room_gets_its_free_units_back_in_bucket_0() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-split-lost");
    let k = 2;
    app.create_sku(&sku, json!({"stock": 3, "buckets": k, "waiting_room": {}}))
        .await;
    // A buyer whose hash would home them in bucket 1 (they buy in bucket 0).
    let id = TestApp::sku_id(&sku);
    let buyer = (0..)
        .map(|n| format!("lost-{n}"))
        .find(|user| flashgate::buckets::home(&id, user, k) == 1)
        .unwrap();
    join(&app, &sku, &buyer).await;
    let admitted = ticket(&app, &sku, &buyer).await;
    let (status, hold) = reserve_with(&app, &sku, &buyer, "k", Some(token_of(&admitted))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    let rid = hold["reservation_id"].as_str().unwrap();
    assert_eq!(app.confirm(rid, "pay-lost").await.0, StatusCode::OK);
    app.flush(&sku).await;
    // A wipe: every bucket lost, and the line with bucket 0.
    for sale in flashgate::buckets::sales(&TestApp::sku_id(&sku), k) {
        app.lose_sale(sale.as_str()).await;
    }
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(&sku));
    let mut conn = app.store.connection();
    let _: () = redis::cmd("DEL")
        .arg(keys.queue_line())
        .arg(keys.queue_admits())
        .arg(keys.queue_used())
        .arg(keys.queue_state())
        .query_async(&mut conn)
        .await
        .unwrap();
    let report =
        flashgate::reconcile::run_skus(&app.store, &app.db, &[TestApp::sku_id(&sku)], true)
            .await
            .unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == "redis_state_missing" && f.repaired),
        "{:?}",
        report.findings
    );
    assert_eq!(
        bucket_counters(&app, &sku, k).await,
        vec![[3, 2, 0, 1], [0; 4]]
    );
    // The line went with bucket 0. The buyer's limit (1) counts what they bought, in
    // bucket 0: admitted again, they hold nothing more.
    join(&app, &sku, &buyer).await;
    let again = ticket(&app, &sku, &buyer).await;
    let (status, problem) = reserve_with(&app, &sku, &buyer, "k2", Some(token_of(&again))).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded")),
        "{problem}"
    );
    // A new buyer joins and holds a unit there.
    join(&app, &sku, "lost-1").await;
    let admitted = ticket(&app, &sku, "lost-1").await;
    assert_eq!(admitted["state"], "admitted", "{admitted}");
    let (status, hold) = reserve_with(&app, &sku, "lost-1", "k", Some(token_of(&admitted))).await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
}

/// Units on sale outside bucket 0 of a split SKU with a waiting room (an older gateway
/// put them there) reach no buyer: the repair moves them to bucket 0, where the next
/// admitted buyer holds one.
#[tokio::test]
async fn a_split_waiting_rooms_units_outside_bucket_0_are_moved_home() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-split-stray");
    let k = 2;
    app.create_sku(&sku, json!({"stock": 4, "buckets": k, "waiting_room": {}}))
        .await;
    // Two of bucket 0's units moved to bucket 1.
    let sales = flashgate::buckets::sales(&TestApp::sku_id(&sku), k);
    let mut conn = app.store.connection();
    for (sale, by) in [(&sales[0], -2i64), (&sales[1], 2)] {
        let meta = flashgate::keys::SkuKeys::new(sale).meta;
        for field in ["stock_total", "available"] {
            let _: i64 = redis::AsyncCommands::hincr(&mut conn, &meta, field, by)
                .await
                .unwrap();
        }
    }
    let found = app.reconcile(&sku, false).await;
    let kinds: Vec<&str> = found.findings.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, ["units_outside_home"], "{:?}", found.findings);
    assert!(!found.findings[0].repaired);
    let repaired = app.reconcile(&sku, true).await;
    assert!(
        repaired
            .findings
            .iter()
            .all(|f| f.kind == "units_outside_home" && f.repaired),
        "{:?}",
        repaired.findings
    );
    assert_eq!(
        bucket_counters(&app, &sku, k).await,
        vec![[4, 4, 0, 0], [0; 4]]
    );
    assert!(!app.reconcile(&sku, false).await.drift_found());
    // All four units sell, in bucket 0.
    for n in 0..4 {
        let user = format!("stray-{n}");
        join(&app, &sku, &user).await;
        let admitted = ticket(&app, &sku, &user).await;
        assert_eq!(admitted["state"], "admitted", "{admitted}");
        let (status, hold) = reserve_with(&app, &sku, &user, "k", Some(token_of(&admitted))).await;
        assert_eq!(status, StatusCode::CREATED, "{hold}");
    }
    assert_eq!(
        bucket_counters(&app, &sku, k).await,
        vec![[4, 0, 4, 0], [0; 4]]
    );
}

/// MySQL lost a split SKU's row (a restore, a failover that lost the commit) while Redis
/// kept its sale: a PUT may not change where its buyers live (Redis's layout counts as
/// the one it was created with), and the same layout is defined again.
#[tokio::test]
async fn a_split_sku_mysql_forgot_keeps_the_layout_redis_sells_under() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-split-forgot");
    app.create_sku(&sku, json!({"stock": 4, "buckets": 2, "waiting_room": {}}))
        .await;
    sqlx::query("DELETE FROM skus WHERE sku = ?")
        .bind(&sku)
        .execute(&app.db)
        .await
        .unwrap();
    let (status, problem) = app.put_sku(&sku, json!({"stock": 4, "buckets": 2})).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("buckets_changed")),
        "{problem}"
    );
    assert_eq!(
        bucket_counters(&app, &sku, 2).await,
        vec![[4, 4, 0, 0], [0; 4]],
        "nothing moved"
    );
    let view = app
        .create_sku(&sku, json!({"stock": 4, "buckets": 2, "waiting_room": {}}))
        .await;
    assert!(view["waiting_room"].is_object(), "{view}");
}

/// A definition written back after Redis refused a PUT (`db::restore_sku`) is the whole
/// former one, its waiting room too: MySQL and Redis do not disagree about it after.
#[tokio::test]
async fn a_definition_written_back_keeps_its_waiting_room() {
    let app = spawn_app().await;
    let sku = unique_sku("wr-restore");
    app.create_sku(&sku, json!({"stock": 2})).await;
    let id = TestApp::sku_id(&sku);
    let before = flashgate::db::sku_record(&app.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert!(before.definition.waiting_room.is_none());
    let with_room = flashgate::reservation::SkuDefinition {
        waiting_room: Some(flashgate::reservation::WaitingRoom {
            admission_seconds: 30,
            admit_per_second: 0,
            prequeue_shuffle: true,
        }),
        ..before.definition.clone()
    };
    let mut tx = app.db.begin().await.unwrap();
    flashgate::db::upsert_sku(&mut tx, &id, &with_room)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = app.db.acquire().await.unwrap();
    flashgate::db::restore_sku(&mut conn, &id, Some(&before))
        .await
        .unwrap();
    let after = flashgate::db::sku_record(&app.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.definition, before.definition);
}
