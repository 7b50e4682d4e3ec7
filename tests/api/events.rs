//! Events (contract v1.2): every fact makes exactly one event, in MySQL with the fact,
//! numbered 1, 2, 3, … per SKU in the order Redis made the facts; a re-flush makes none.

use crate::common::*;
use flashgate::db::events::Filter;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Moves a live hold's deadline into the past: time made fast instead of slept.
pub async fn expire_now(app: &TestApp, sku: &str, rid: &str) {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let tail = rid.split_once('.').unwrap().1;
    let mut conn = app.store.connection();
    let record: String = redis::cmd("HGET")
        .arg(&keys.holds)
        .arg(tail)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut parts: Vec<&str> = record.splitn(5, ' ').collect();
    let past = (chrono::Utc::now().timestamp_millis() - 60_000).to_string();
    let created = (chrono::Utc::now().timestamp_millis() - 120_000).to_string();
    parts[2] = &created;
    parts[3] = &past;
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&keys.holds)
        .arg(tail)
        .arg(parts.join(" "))
        .cmd("ZADD")
        .arg(&keys.deadlines)
        .arg(&past)
        .arg(tail)
        .query_async(&mut conn)
        .await
        .unwrap();
}

pub async fn resolve(app: &TestApp, id: &str) -> Value {
    let (status, value) = body(
        app.client
            .post(app.url(&format!("/v1/compensations/{id}/resolve")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{value}");
    value
}

/// The SKU's events in MySQL, oldest first, as documents.
pub async fn recorded_events(app: &TestApp, sku: &str) -> Vec<Value> {
    let filter = Filter {
        sku: Some(sku.to_owned()),
        ..Filter::default()
    };
    flashgate::db::events::list(&app.db, &filter, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.document())
        .collect()
}

fn types_of(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

pub fn assert_consecutive(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence"], json!(i as u64 + 1), "{events:#?}");
    }
}

#[tokio::test]
async fn every_fact_makes_one_event_numbered_in_the_order_redis_made_them() {
    let app = spawn_app().await;
    let sku = unique_sku("events");
    app.create_sku(&sku, json!({"stock": 3})).await;

    let a = app.hold(&sku, "u1").await;
    assert_eq!(app.confirm(&a, "pay-a").await.0, StatusCode::OK);
    let b = app.hold(&sku, "u2").await;
    assert_eq!(app.cancel(&b, SERVICE_TOKEN).await.0, StatusCode::OK);
    let c = app.hold(&sku, "u3").await;
    expire_now(&app, &sku, &c).await;
    assert_eq!(
        app.worker.sweep_sku(TestApp::sku_id(&sku)).await.unwrap(),
        1
    );
    let (status, late) = app.confirm(&c, "pay-c").await;
    assert_eq!(status, StatusCode::CONFLICT, "{late}");
    let late_id = late["compensation_id"].as_str().unwrap().to_owned();
    resolve(&app, &late_id).await; // before the flush: through the outbox
    let d = app.hold(&sku, "u4").await;
    app.hold(&sku, "u5").await; // the last unit: sold out
    assert_eq!(app.cancel(&d, SERVICE_TOKEN).await.0, StatusCode::OK); // back

    // What the flush writes must survive a crash between the commit and the XACK:
    // the same entries written again make no second event.
    let entries = outbox_events(&app, &sku).await;
    app.flush(&sku).await;
    let events = recorded_events(&app, &sku).await;
    assert_eq!(
        types_of(&events),
        [
            "reservation.confirmed",
            "reservation.cancelled",
            "reservation.expired",
            "compensation.created",
            "compensation.resolved",
            "sku.sold_out",
            "sku.available",
            "reservation.cancelled",
        ],
        "{events:#?}"
    );
    assert_consecutive(&events);
    let again = flashgate::db::apply_events(&app.db, &entries)
        .await
        .unwrap();
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert_eq!(recorded_events(&app, &sku).await, events);

    // The data is what the API answers.
    let (_, view) = app.reservation(&a, SERVICE_TOKEN).await;
    assert_eq!(events[0]["data"], view);
    assert!(events[0]["id"].as_str().unwrap().starts_with("evt_"));
    let (_, view) = app.reservation(&b, SERVICE_TOKEN).await;
    assert_eq!(events[1]["data"], view);
    assert_eq!(events[2]["data"]["status"], "expired");
    assert_eq!(events[3]["data"]["id"], json!(late_id));
    assert_eq!(events[3]["data"]["status"], "open");
    assert_eq!(events[4]["data"]["status"], "resolved");
    assert_eq!(events[5]["data"]["available"], 0);
    assert_eq!(events[5]["data"]["sold"], 1);
    assert_eq!(events[5]["data"]["held"], 2);
    assert_eq!(events[6]["data"]["available"], 1);
    assert_eq!(events[5]["sku"], json!(sku));

    // Facts MySQL makes itself take the next numbers: a late payment's compensation
    // flushed, then resolved straight in MySQL.
    let (status, refused) = app.confirm(&b, "pay-b").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    app.flush(&sku).await;
    resolve(&app, refused["compensation_id"].as_str().unwrap()).await;
    resolve(&app, refused["compensation_id"].as_str().unwrap()).await; // idempotent
    let events = recorded_events(&app, &sku).await;
    assert_eq!(
        types_of(&events[8..]),
        ["compensation.created", "compensation.resolved"]
    );
    assert_consecutive(&events);
}

/// Every outbox entry of the SKU still in the stream, parsed as the flush would.
pub async fn outbox_events(app: &TestApp, sku: &str) -> Vec<flashgate::db::OutboxEvent> {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let mut conn = app.store.connection();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&keys.outbox)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|id| {
            let entry = flashgate::store::OutboxEntry {
                stream_id: id.id.clone(),
                fields: id,
            };
            flashgate::worker::parse_event(&entry).expect("a readable entry")
        })
        .collect()
}

pub async fn feed(app: &TestApp, query: &str) -> (StatusCode, Value) {
    body(
        app.client
            .get(app.url(&format!("/v1/events?{query}")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Every event of the SKU through the feed, page after page of `limit`.
pub async fn feed_all(app: &TestApp, query: &str, limit: u32) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = feed(app, &format!("{query}&limit={limit}{after}")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let got = page["items"].as_array().unwrap().clone();
        let next = page["next"].as_str().unwrap().to_owned();
        if got.is_empty() {
            // Polling from the end finds nothing again.
            let (_, again) = feed(app, &format!("{query}&limit={limit}&after={next}")).await;
            assert_eq!(again["items"], json!([]), "{again}");
            return items;
        }
        items.extend(got);
        after = format!("&after={next}");
    }
}

#[tokio::test]
async fn the_feed_pages_oldest_first_by_sku_and_type_with_a_stable_cursor() {
    let app = spawn_app().await;
    let sku = unique_sku("feed");
    let other = unique_sku("feed-other");
    app.create_sku(&sku, json!({"stock": 2})).await;
    app.create_sku(&other, json!({"stock": 5})).await;
    let a = app.hold(&sku, "f1").await;
    app.hold(&other, "f1").await;
    let b = app.hold(&sku, "f2").await; // sold out
    app.confirm(&a, "pay-a").await;
    app.cancel(&b, SERVICE_TOKEN).await; // available again
    app.flush(&sku).await;
    app.flush(&other).await;

    let all = feed_all(&app, &format!("sku={sku}"), 2).await;
    assert_eq!(all, recorded_events(&app, &sku).await);
    assert_eq!(
        types_of(&all),
        [
            "sku.sold_out",
            "reservation.confirmed",
            "sku.available",
            "reservation.cancelled"
        ]
    );
    assert_consecutive(&all);
    assert!(all.iter().all(|e| e["sku"] == json!(sku)));
    let ended = feed_all(
        &app,
        &format!("sku={sku}&types=reservation.cancelled,reservation.confirmed"),
        1,
    )
    .await;
    assert_eq!(
        types_of(&ended),
        ["reservation.confirmed", "reservation.cancelled"]
    );
    assert_eq!(ended[0]["data"]["payment_ref"], "pay-a");

    // Without a SKU: every SKU's, oldest first; a cursor taken before an event is
    // written finds it afterwards.
    let (_, page) = feed(&app, &format!("sku={other}")).await;
    assert!(page["items"].as_array().unwrap().is_empty(), "{page}");
    // An empty filtered page moves the cursor past what it passed (a poller of one SKU
    // does not read every other SKU's events again), and finds what comes later.
    let quiet = unique_sku("feed-quiet");
    app.create_sku(&quiet, json!({"stock": 5})).await;
    let (_, empty) = feed(&app, &format!("sku={quiet}")).await;
    assert_eq!(empty["items"], json!([]), "{empty}");
    let passed = empty["next"].as_str().unwrap().to_owned();
    let (_, after_passed) = feed(&app, &format!("sku={sku}&after={passed}")).await;
    assert_eq!(
        after_passed["items"],
        json!([]),
        "the cursor moved past the events recorded before the empty page"
    );
    let q = app.hold(&quiet, "q1").await;
    app.cancel(&q, SERVICE_TOKEN).await;
    app.flush(&quiet).await;
    let (_, later) = feed(&app, &format!("sku={quiet}&after={passed}")).await;
    assert_eq!(
        types_of(later["items"].as_array().unwrap()),
        ["reservation.cancelled"],
        "{later}"
    );
    let mut cursor = String::new();
    loop {
        let (_, page) = feed(&app, &format!("limit=1000{cursor}")).await;
        cursor = format!("&after={}", page["next"].as_str().unwrap());
        if page["items"].as_array().unwrap().is_empty() {
            break;
        }
    }
    let c = app.hold(&other, "f3").await;
    app.cancel(&c, SERVICE_TOKEN).await;
    app.flush(&other).await;
    let (_, page) = feed(&app, &format!("limit=1000{cursor}")).await;
    let fresh: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["sku"] == json!(other))
        .collect();
    assert_eq!(fresh.len(), 1, "{page}");
    assert_eq!(fresh[0]["type"], "reservation.cancelled");
    assert_eq!(fresh[0]["sequence"], 1);
}

#[tokio::test]
async fn the_feed_refuses_bad_input_with_a_problem_and_wants_the_service_token() {
    let app = spawn_app().await;
    for query in [
        "after=nope",
        "after=ZTE6LTE",
        "types=reservation.created",
        "types=",
        "limit=0",
        "limit=1001",
        "limit=x",
        "sku=bad%20sku",
    ] {
        let response = app
            .client
            .get(app.url(&format!("/v1/events?{query}")))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{query}"
        );
        let (status, problem) = body(response).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {problem}");
        assert_eq!(problem["code"], "invalid_request");
    }
    let (status, problem) = body(
        app.client
            .get(app.url("/v1/events"))
            .bearer_auth(user_token("someone"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
}

#[tokio::test]
async fn events_past_their_retention_are_pruned_and_newer_ones_kept() {
    let app = spawn_app().await;
    let sku = unique_sku("prune");
    let old = flashgate::events::NewEvent {
        id: flashgate::events::event_id(flashgate::events::EventType::SkuSoldOut, &[&sku, "old"]),
        kind: flashgate::events::EventType::SkuSoldOut,
        sku: sku.clone(),
        occurred_at_ms: 1_000,
        data: json!({}),
    };
    let new = flashgate::events::NewEvent {
        id: flashgate::events::event_id(flashgate::events::EventType::SkuSoldOut, &[&sku, "new"]),
        occurred_at_ms: 2_000,
        ..old.clone()
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let retention = std::time::Duration::from_secs(72 * 3600);
    for (event, recorded_at) in [
        (old, now_ms - 73 * 3600 * 1000),
        (new, now_ms - 71 * 3600 * 1000),
    ] {
        let mut tx = app.db.begin().await.unwrap();
        flashgate::db::events::write(&mut tx, vec![event], recorded_at)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert!(
        app.worker
            .prune_events_once(now_ms, retention)
            .await
            .unwrap()
            >= 1
    );
    let kept = recorded_events(&app, &sku).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["sequence"], 2, "numbers are never reused");
}

#[tokio::test]
async fn two_workers_flushing_one_sku_at_once_keep_its_sequence_in_outbox_order() {
    let app = spawn_app().await;
    let sku = unique_sku("order");
    // More ends than one flush batch (limits::FLUSH_BATCH), so the two workers each
    // take a batch of the same stream at once.
    let n = flashgate::limits::FLUSH_BATCH + 40;
    app.create_sku(&sku, json!({"stock": n})).await;
    let mut ids = Vec::with_capacity(n);
    let (app_ref, sku_ref) = (&app, &sku);
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let holds = futures::future::join_all(
            chunk
                .iter()
                .map(|i| async move { app_ref.hold(sku_ref, &format!("o{i}")).await }),
        )
        .await;
        ids.extend(holds);
    }
    for id in &ids {
        assert_eq!(app.cancel(id, SERVICE_TOKEN).await.0, StatusCode::OK);
    }
    let a = flashgate::worker::Worker::new(app.store.clone(), app.db.clone());
    let b = flashgate::worker::Worker::new(app.store.clone(), app.db.clone());
    let sale = TestApp::sku_id(&sku);
    let drain = |w: flashgate::worker::Worker, sale: flashgate::ids::SkuId| async move {
        for _ in 0..2000 {
            w.flush_sku(&sale).await.unwrap();
            if w.store.outbox_backlog(&sale).await.unwrap() == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never drained");
    };
    tokio::join!(drain(a, sale.clone()), drain(b, sale.clone()));
    let events = recorded_events(&app, &sku).await;
    assert_consecutive(&events);
    let cancelled: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "reservation.cancelled")
        .map(|e| e["data"]["reservation_id"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    let first_wrong = cancelled.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        cancelled.len() == expected.len() && first_wrong.is_none(),
        "sequence must follow the order of the cancels: {} of {} events, first out of order at {first_wrong:?}",
        cancelled.len(),
        expected.len()
    );
    assert_eq!(
        types_of(&events)[..2],
        ["sku.sold_out", "sku.available"],
        "the last hold sold out, the first cancel brought stock back"
    );
}

/// The outbox entries of every bucket of a split SKU still in their streams, parsed as
/// the flush would, bucket by bucket.
async fn split_outbox_events(app: &TestApp, sku: &str, k: u32) -> Vec<flashgate::db::OutboxEvent> {
    let mut events = Vec::new();
    for sale in flashgate::buckets::sales(&TestApp::sku_id(sku), k) {
        let keys = flashgate::keys::SkuKeys::new(&sale);
        let mut conn = app.store.connection();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&keys.outbox)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        for id in reply.ids {
            let entry = flashgate::store::OutboxEntry {
                stream_id: id.id.clone(),
                fields: id,
            };
            events.push(flashgate::worker::parse_event(&entry).expect("a readable entry"));
        }
    }
    events
}

/// A SKU split over buckets announces its stock as one SKU: `sku.sold_out` once no
/// bucket has a unit left (not when one bucket runs dry and takes the others' units),
/// `sku.available` when a unit comes back in any bucket; a re-flush of the same outbox
/// entries makes no second event, and the sequence stays consecutive.
#[tokio::test]
async fn a_split_sku_announces_sold_out_and_stock_back_for_the_whole_sku() {
    let app = spawn_app().await;
    let sku = unique_sku("split-cross");
    app.create_sku(&sku, json!({"stock": 4, "buckets": 2}))
        .await;
    let id = TestApp::sku_id(&sku);
    let stock_events = || async {
        recorded_events(&app, &sku)
            .await
            .into_iter()
            .filter(|e| e["type"].as_str().unwrap().starts_with("sku."))
            .collect::<Vec<_>>()
    };
    // Buyers all homed in bucket 0: it runs dry after 2, then takes bucket 1's units.
    let users: Vec<String> = (0..)
        .map(|i| format!("s{i}"))
        .filter(|u| flashgate::buckets::home(&id, u, 2) == 0)
        .take(5)
        .collect();
    let mut holds = Vec::new();
    for user in &users[..2] {
        holds.push(app.hold(&sku, user).await);
    }
    app.flush(&sku).await;
    assert_eq!(
        stock_events().await,
        Vec::<Value>::new(),
        "bucket 0 ran dry, not the SKU"
    );
    for user in &users[2..4] {
        holds.push(app.hold(&sku, user).await);
    }
    assert_eq!(app.sku(&sku).await["available"], 0);
    app.flush(&sku).await;
    let events = stock_events().await;
    assert_eq!(types_of(&events), ["sku.sold_out"], "{events:#?}");
    assert_eq!(events[0]["data"]["available"], 0);
    assert_eq!(events[0]["data"]["stock_total"], 4);
    assert_eq!(events[0]["data"]["held"], 4);
    assert_eq!(events[0]["sku"], json!(sku));

    // One unit back, in whichever bucket: the SKU has stock again.
    let flushed = split_outbox_events(&app, &sku, 2).await;
    assert_eq!(app.cancel(&holds[3], SERVICE_TOKEN).await.0, StatusCode::OK);
    let batch: Vec<_> = split_outbox_events(&app, &sku, 2)
        .await
        .into_iter()
        .filter(|e| !flushed.contains(e))
        .collect();
    app.flush(&sku).await;
    let events = stock_events().await;
    assert_eq!(
        types_of(&events),
        ["sku.sold_out", "sku.available"],
        "{events:#?}"
    );
    assert_eq!(events[1]["data"]["available"], 1);

    // The same entries written again (a crash between the commit and the XACK) make
    // nothing new.
    let all = recorded_events(&app, &sku).await;
    assert!(!batch.is_empty());
    let again = flashgate::db::apply_events(&app.db, &batch).await.unwrap();
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert_eq!(recorded_events(&app, &sku).await, all);
    assert_consecutive(&all);

    // Sold out again, then the stock grows: announced once each.
    app.hold(&sku, &users[4]).await;
    app.flush(&sku).await;
    app.create_sku(&sku, json!({"stock": 6, "buckets": 2}))
        .await;
    app.flush(&sku).await;
    let events = stock_events().await;
    assert_eq!(
        types_of(&events),
        [
            "sku.sold_out",
            "sku.available",
            "sku.sold_out",
            "sku.available"
        ],
        "{events:#?}"
    );
    assert_consecutive(&recorded_events(&app, &sku).await);
}

/// A split SKU sold out; Redis loses one bucket (holds and all) and the reconciler
/// rebuilds it from MySQL with its held units available again: MySQL's record that the
/// bucket was out goes back into Redis, so the stock back is announced (sku.available),
/// once; a bucket rebuilt still out announces nothing.
#[tokio::test]
async fn a_rebuilt_bucket_announces_the_stock_it_brings_back() {
    let app = spawn_app().await;
    let sku = unique_sku("split-rebuild");
    app.create_sku(&sku, json!({"stock": 4, "buckets": 2}))
        .await;
    let id = TestApp::sku_id(&sku);
    for b in 0..2 {
        let users: Vec<String> = (0..)
            .map(|i| format!("r{i}"))
            .filter(|u| flashgate::buckets::home(&id, u, 2) == b)
            .take(2)
            .collect();
        for user in &users {
            let rid = app.hold(&sku, user).await;
            if b == 0 {
                assert_eq!(
                    app.confirm(&rid, &format!("pay-{user}")).await.0,
                    StatusCode::OK
                );
            }
        }
    }
    app.flush(&sku).await;
    let stock_types = || async {
        recorded_events(&app, &sku)
            .await
            .into_iter()
            .filter(|e| e["type"].as_str().unwrap().starts_with("sku."))
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(stock_types().await, ["sku.sold_out"]);
    let sales = flashgate::buckets::sales(&id, 2);
    let rebuild = |b: usize| {
        let (app, sales, id, sku) = (&app, &sales, &id, &sku);
        async move {
            app.lose_sale(sales[b].as_str()).await;
            flashgate::reconcile::run_skus(&app.store, &app.db, std::slice::from_ref(id), true)
                .await
                .unwrap();
            app.flush(sku).await;
        }
    };
    // Bucket 0 sold both its units: rebuilt, it is still out.
    rebuild(0).await;
    assert_eq!(stock_types().await, ["sku.sold_out"]);
    // Bucket 1's holds are gone with it: rebuilt, its 2 units are available again.
    rebuild(1).await;
    assert_eq!(app.sku(&sku).await["available"], 2);
    assert_eq!(stock_types().await, ["sku.sold_out", "sku.available"]);
    assert_consecutive(&recorded_events(&app, &sku).await);
}

/// A consumer of the flush group reads every new entry of the SKU's outbox; the ids.
async fn read_new_as(app: &TestApp, sku: &str, consumer: &str) -> Vec<String> {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(flashgate::keys::FLUSH_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&keys.outbox)
        .arg(">")
        .query_async(&mut app.store.connection())
        .await
        .unwrap();
    let ids: Vec<String> = reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids.into_iter().map(|e| e.id))
        .collect();
    assert!(!ids.is_empty(), "{consumer} read nothing");
    ids
}

/// Entries pending on `consumer` idle for an hour: what a consumer that read them and
/// died leaves, ready to be taken over (time made fast).
async fn leave_idle(app: &TestApp, sku: &str, consumer: &str, ids: &[String]) {
    let keys = flashgate::keys::SkuKeys::new(&TestApp::sku_id(sku));
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&keys.outbox)
        .arg(flashgate::keys::FLUSH_GROUP)
        .arg(consumer)
        .arg(0)
        .arg(ids)
        .arg("IDLE")
        .arg(3_600_000)
        .arg("JUSTID")
        .query_async(&mut app.store.connection())
        .await
        .unwrap();
}

/// Two consumers died holding the 1st and the 3rd of a SKU's outbox entries while a
/// live one holds the 2nd, a compensation whose resolve is the 3rd. The worker taking
/// the dead ones' entries over writes the 1st alone, the live one its compensation,
/// and only then the resolve: written first, it would find no compensation to
/// resolve, and the compensation would stay open in MySQL though it was resolved.
#[tokio::test]
async fn entries_taken_over_from_dead_consumers_wait_for_one_pending_on_a_live_consumer() {
    let app = spawn_app().await;
    let sku = unique_sku("takeover-order");
    app.create_sku(&sku, json!({"stock": 5})).await;
    app.flush(&sku).await;
    let sale = TestApp::sku_id(&sku);
    let held = app.hold(&sku, "ann").await;
    assert_eq!(app.cancel(&held, SERVICE_TOKEN).await.0, StatusCode::OK);
    let first = read_new_as(&app, &sku, "dead-1").await;
    let (status, late) = app.confirm(&held, "pay-late").await;
    assert_eq!(status, StatusCode::CONFLICT, "{late}");
    let compensation = late["compensation_id"].as_str().unwrap().to_owned();
    read_new_as(&app, &sku, "live").await;
    resolve(&app, &compensation).await;
    let third = read_new_as(&app, &sku, "dead-2").await;
    leave_idle(&app, &sku, "dead-1", &first).await;
    leave_idle(&app, &sku, "dead-2", &third).await;

    let taker = flashgate::worker::Worker::new(app.store.clone(), app.db.clone());
    let mut live = flashgate::worker::Worker::new(app.store.clone(), app.db.clone());
    live.consumer = "live".into();
    while taker.flush_sku(&sale).await.unwrap() > 0 {}
    while live.flush_sku(&sale).await.unwrap() > 0 {}
    while taker.flush_sku(&sale).await.unwrap() > 0 {}
    assert_eq!(app.store.outbox_backlog(&sale).await.unwrap(), 0);

    let status: String = sqlx::query_scalar("SELECT status FROM compensations WHERE id = ?")
        .bind(&compensation)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "resolved", "the resolve was lost");
    let events = recorded_events(&app, &sku).await;
    assert_consecutive(&events);
    assert_eq!(
        types_of(&events),
        [
            "reservation.cancelled",
            "compensation.created",
            "compensation.resolved"
        ]
    );
    // With nothing pending elsewhere, a batch is written whole, not cut.
    for user in ["bob", "cid", "dan"] {
        let held = app.hold(&sku, user).await;
        assert_eq!(app.cancel(&held, SERVICE_TOKEN).await.0, StatusCode::OK);
    }
    assert_eq!(taker.flush_sku(&sale).await.unwrap(), 3);
}
