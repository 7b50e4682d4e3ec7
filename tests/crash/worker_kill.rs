//! The flush worker killed in the middle of a batch: a new consumer takes over what
//! the dead one left pending, and every event is in MySQL exactly once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashgate::db::OutboxEvent;
use flashgate::worker::Worker;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use serde_json::json;

use crate::common::{self, spawn_app_with, unique_sku};
use crate::support::*;
use crate::{confirm_many, reserve_many};

/// Short, so the test does not wait limits::FLUSH_CLAIM_IDLE (30 s); still far above
/// one batch's flush time here.
const CLAIM_IDLE_MS: u64 = 1_000;

async fn sales_ids(db: &sqlx::MySqlPool, sku: &str) -> HashSet<String> {
    sqlx::query_scalar("SELECT reservation_id FROM sales WHERE sku = ?")
        .bind(sku)
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkilled_mid_batch_leaves_each_event_in_mysql_exactly_once() {
    const SALES: usize = 2_500;
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    let db = shared_db().await;
    let sku = unique_sku("crash-worker");
    app.create_sku(&sku, json!({ "stock": SALES, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", SALES).await;
    let (ok, failed) = confirm_many(app.clone(), rids, 16).await;
    assert!(failed.is_empty(), "{failed:?}");
    let ok: HashSet<String> = ok.into_iter().collect();
    let mut conn = redis.client().await;
    // Every sale, and the announcement that the last hold sold the SKU out.
    assert_eq!(outbox_unacked(&mut conn, &sku).await, (0, SALES as u64 + 1));

    // Kill a worker while it holds a batch: read (pending) and not yet acknowledged.
    let logs = TempDir::new("worker-kill");
    let mut stranded = 0;
    for _attempt in 0..5 {
        let mut worker = WorkerProc::start(
            &redis.url(),
            &common::database_url(),
            logs.path(),
            CLAIM_IDLE_MS,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Some batches done, one in flight.
            let (pending, lag) = outbox_unacked(&mut conn, &sku).await;
            if pending > 0 && lag <= (SALES / 2) as u64 {
                break;
            }
            assert!(
                lag > 0,
                "the worker flushed everything before it could be killed"
            );
            assert!(
                Instant::now() < deadline,
                "worker never read a batch:\n{}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        worker.proc.kill();
        let (pending, _) = outbox_unacked(&mut conn, &sku).await;
        if pending > 0 {
            stranded = pending;
            break;
        }
    }
    assert!(stranded > 0, "no kill landed inside a batch");
    let already_written = sales_ids(&db, &sku).await.len();
    assert!(already_written < SALES, "the kill came too late");
    eprintln!("killed mid-batch: {stranded} entries pending on the dead consumer, {already_written} sales already in MySQL");

    // A new worker (a new consumer) takes over and finishes.
    let mut worker = WorkerProc::start(
        &redis.url(),
        &common::database_url(),
        logs.path(),
        CLAIM_IDLE_MS,
    );
    eventually(Duration::from_secs(30), "outbox drained", || {
        let mut conn = conn.clone();
        let sku = sku.clone();
        async move { outbox_unacked(&mut conn, &sku).await == (0, 0) }
    })
    .await;
    let log = worker.log();
    assert!(
        log.contains("took over outbox entries"),
        "no takeover logged:\n{log}"
    );
    worker.proc.terminate(Duration::from_secs(10));

    let (rows, sum, sold) = mysql_sales(&db, &sku).await;
    assert_eq!(
        (rows, sum, sold),
        (SALES as i64, SALES as i64, SALES as u64)
    );
    assert_eq!(
        sales_ids(&db, &sku).await,
        ok,
        "MySQL sales = confirms answered 200"
    );
    let (_, available, held, redis_sold) = assert_equation(&app.store, &sku).await;
    assert_eq!((available, held, redis_sold), (0, 0, SALES as u64));
    // Nothing is left pending on any consumer, dead or alive.
    let consumers: redis::streams::StreamInfoConsumersReply = conn
        .xinfo_consumers(format!("fg:{{{sku}}}:outbox"), "flush")
        .await
        .unwrap();
    assert!(consumers.consumers.len() >= 2);
    assert!(consumers.consumers.iter().all(|c| c.pending == 0));
    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let events = assert_events_in_sequence(&db, &sku).await;
    assert_eq!(events.get("sku.sold_out"), Some(&1), "{events:?}");
}

/// The worst instant to die, made deterministic: a consumer committed its batch to
/// MySQL and died before XACK. The takeover writes the batch again, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_committed_but_not_acknowledged_is_taken_over_and_written_once() {
    const SALES: usize = 200;
    const DEAD_BATCH: usize = 50;
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    let db = shared_db().await;
    let sku = unique_sku("crash-unacked");
    // One unit more than sold: no sold-out announcement among the entries.
    app.create_sku(&sku, json!({ "stock": SALES + 1, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", SALES).await;
    let (ok, _) = confirm_many(app.clone(), rids, 16).await;
    assert_eq!(ok.len(), SALES);

    // The dead consumer: reads a batch, commits it, never acknowledges.
    let mut conn = redis.client().await;
    let outbox = format!("fg:{{{sku}}}:outbox");
    let reply: StreamReadReply = conn
        .xread_options(
            &[&outbox],
            &[">"],
            &StreamReadOptions::default()
                .group("flush", "dead-consumer")
                .count(DEAD_BATCH),
        )
        .await
        .unwrap();
    let events: Vec<OutboxEvent> = reply.keys[0]
        .ids
        .iter()
        .map(|entry| {
            assert_eq!(entry.get::<String>("type").unwrap(), "confirmed");
            let event = flashgate::worker::parse_event(&flashgate::store::OutboxEntry {
                stream_id: entry.id.clone(),
                fields: entry.clone(),
            });
            assert!(matches!(event, Some(OutboxEvent::Confirmed { .. })));
            event.unwrap()
        })
        .collect();
    assert_eq!(events.len(), DEAD_BATCH);
    flashgate::db::apply_events(&db, &events).await.unwrap();
    assert_eq!(
        outbox_unacked(&mut conn, &sku).await,
        (DEAD_BATCH as u64, (SALES - DEAD_BATCH) as u64)
    );

    // A live worker reads the later entries but writes them only after the dead
    // consumer's (a SKU's events are numbered in outbox order: db::apply_events_in_order),
    // which it takes over once they are idle.
    let worker =
        Worker::new(app.store.clone(), db.clone()).with_claim_idle(Duration::from_millis(2_000));
    worker.flush_all().await.unwrap();
    assert_eq!(
        outbox_unacked(&mut conn, &sku).await,
        (SALES as u64, 0),
        "not idle long enough yet: the later entries wait"
    );
    assert_eq!(
        mysql_sales(&db, &sku).await,
        (DEAD_BATCH as i64, DEAD_BATCH as i64, DEAD_BATCH as u64)
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let flushed = worker.flush_all().await.unwrap();
    assert_eq!(
        flushed, SALES as u64,
        "the dead consumer's batch is taken over, then the rest follows"
    );
    assert_eq!(outbox_unacked(&mut conn, &sku).await, (0, 0));
    // Written twice, recorded once.
    assert_eq!(
        mysql_sales(&db, &sku).await,
        (SALES as i64, SALES as i64, SALES as u64)
    );
    // And the stream is trimmed only below what was acknowledged: nothing pending lost.
    let left: usize = conn.xlen(&outbox).await.unwrap();
    assert!(left <= SALES);
    let report = flashgate::reconcile::run(
        &app.store,
        &db,
        Some(&flashgate::ids::SkuId::parse(&sku).unwrap()),
        false,
    )
    .await
    .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_events_in_sequence(&db, &sku).await;
}

/// Several workers at once on one SKU's outbox (the contract allows it): each batch
/// goes to one of them, and `skus.sold` stays the sum of the sales rows, with no
/// failed batch (concurrent flushes of one SKU serialise on its row, never deadlock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_flush_one_sku_exactly_once() {
    const SALES: usize = 1_200;
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    let db = shared_db().await;
    let sku = unique_sku("crash-workers");
    app.create_sku(&sku, json!({ "stock": SALES, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", SALES).await;
    let (ok, failed) = confirm_many(app.clone(), rids, 16).await;
    assert!(failed.is_empty(), "{failed:?}");

    let sku_id = flashgate::ids::SkuId::parse(&sku).unwrap();
    let flushes: Vec<_> = (0..4)
        .map(|_| {
            let worker = Worker::new(app.store.clone(), db.clone());
            let sku_id = sku_id.clone();
            tokio::spawn(async move {
                let mut total = 0;
                loop {
                    // Small batches would be nicer; FLUSH_BATCH is what it is: keep
                    // several workers busy by flushing until nothing is left.
                    // 0 may also mean "an earlier batch is pending on the other
                    // worker": go on until the outbox is empty.
                    let flushed = worker.flush_sku(&sku_id).await.expect("no batch fails");
                    total += flushed;
                    if worker.store.outbox_backlog(&sku_id).await.unwrap() == 0 {
                        return total;
                    }
                    if flushed == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for flush in flushes {
        total += flush.await.unwrap();
    }
    assert_eq!(
        total,
        SALES as u64 + 1,
        "each entry (every sale, and the sold-out announcement) flushed by exactly one worker"
    );
    let mut conn = redis.client().await;
    assert_eq!(outbox_unacked(&mut conn, &sku).await, (0, 0));
    assert_eq!(
        mysql_sales(&db, &sku).await,
        (SALES as i64, SALES as i64, SALES as u64)
    );
    assert_eq!(sales_ids(&db, &sku).await, ok.into_iter().collect());
    assert_events_in_sequence(&db, &sku).await;
}

/// A worker SIGKILLed while a webhook delivery is in flight: its claim holds for the
/// lease (three request timeouts), then another worker sends the event; the receiver
/// gets it, signed as standardwebhooks verifies. On a database of its own: the
/// webhook gets every SKU's events of its database, and other tests' workers (killed
/// at will) would deliver to it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkilled_mid_delivery_leaves_it_to_another_worker() {
    use crate::common::receiver::{verify_independently, Mode, Receiver, SECRET};
    let redis = RedisServer::start(None).await;
    let (database_url, db) = private_db(&unique_sku("kill-delivery")).await;
    let app = spawn_app_with(common::serve_args(&redis.url(), &database_url)).await;
    let receiver = Receiver::start().await;
    receiver.set(Mode::Hang);
    let name = unique_sku("kill-hook");
    let response = app
        .client
        .put(app.url(&format!("/v1/admin/webhooks/{name}")))
        .bearer_auth(common::SERVICE_TOKEN)
        .json(&json!({"url": receiver.url, "secret": SECRET, "types": ["reservation.cancelled"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let sku = unique_sku("kill-delivery");
    app.create_sku(&sku, json!({ "stock": 5 })).await;
    let id = app.hold(&sku, "k1").await;
    app.cancel(&id, common::SERVICE_TOKEN).await;
    app.flush(&sku).await;
    let event_id: String = sqlx::query_scalar("SELECT id FROM events WHERE sku = ?")
        .bind(&sku)
        .fetch_one(&db)
        .await
        .unwrap();

    let logs = TempDir::new("delivery-kill");
    let fast = [("FLASHGATE_WEBHOOK_TIMEOUT_MS", "1000")];
    let mut first = WorkerProc::start_with(&redis.url(), &database_url, logs.path(), 30_000, &fast);
    eventually(
        Duration::from_secs(20),
        "the first worker sends the event",
        || {
            let receiver = receiver.clone();
            let sku = sku.clone();
            async move { !receiver.of_sku(&sku).is_empty() }
        },
    )
    .await;
    first.proc.kill(); // the receiver hangs: the attempt is in flight
    let (owner, attempts): (Option<String>, u32) = sqlx::query_as(
        "SELECT lease_owner, attempts FROM webhook_deliveries WHERE webhook = ? AND event_id = ?",
    )
    .bind(&name)
    .bind(&event_id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(owner.is_some(), "killed while its claim was held");
    assert_eq!(attempts, 1);

    receiver.set(Mode::Ok);
    let second = WorkerProc::start_with(&redis.url(), &database_url, logs.path(), 30_000, &fast);
    eventually(Duration::from_secs(20), "another worker delivers it", || {
        let (db, name, event_id) = (db.clone(), name.clone(), event_id.clone());
        async move {
            let status: String = sqlx::query_scalar(
                "SELECT CAST(status AS CHAR) FROM webhook_deliveries WHERE webhook = ? AND event_id = ?",
            )
            .bind(&name)
            .bind(&event_id)
            .fetch_one(&db)
            .await
            .unwrap();
            status == "delivered"
        }
    })
    .await;
    let got = receiver.of_sku(&sku);
    assert_eq!(
        got.len(),
        2,
        "sent once per claim: the dead one's, then after its lease"
    );
    assert_eq!((got[0].mode, got[1].mode), (Mode::Hang, Mode::Ok));
    assert!(got.iter().all(|r| r.headers["webhook-id"] == event_id));
    verify_independently(SECRET, &got);
    let deleted = app
        .client
        .delete(app.url(&format!("/v1/admin/webhooks/{name}")))
        .bearer_auth(common::SERVICE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), reqwest::StatusCode::NO_CONTENT);
    drop((app, second));
    drop_private_db(&database_url).await;
}
