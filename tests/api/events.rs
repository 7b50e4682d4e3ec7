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
