//! Races that run for real: barriers release hundreds of requests at once, and the
//! invariants are checked afterwards.

use crate::common::*;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

async fn holds(app: &Arc<TestApp>, sku: &str, count: usize, prefix: &str) -> Vec<String> {
    let tasks = (0..count).map(|i| {
        let (app, sku) = (app.clone(), sku.to_owned());
        let user = format!("{prefix}-{i}");
        tokio::spawn(async move { app.hold(&sku, &user).await })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test]
async fn cancel_and_confirm_fired_at_once_end_each_hold_exactly_one_way() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("cancel-vs-confirm");
    let count = 1000;
    app.create_sku(&sku, json!({"stock": count})).await;
    let ids = holds(&app, &sku, count, "cc").await;
    let barrier = Arc::new(Barrier::new(2 * count));
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (a, b) = (app.clone(), app.clone());
        let (id1, id2) = (id.clone(), id.clone());
        let (b1, b2) = (barrier.clone(), barrier.clone());
        // 2,000 calls at once on 2 shared cores: one may outlast the gateway's Redis
        // deadline (503, outcome unknown). A client retries it with the same
        // payment_ref, which the contract makes safe and which tells the outcome.
        tasks.push(tokio::spawn(async move {
            b1.wait().await;
            let mut answer = a.confirm(&id1, &format!("pay-{i}")).await;
            for _ in 0..5 {
                if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
                    break;
                }
                answer = a.confirm(&id1, &format!("pay-{i}")).await;
            }
            ("confirm", answer.0, answer.1)
        }));
        tasks.push(tokio::spawn(async move {
            b2.wait().await;
            let token = user_token(&format!("cc-{i}"));
            let mut answer = b.cancel(&id2, &token).await;
            for _ in 0..5 {
                if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
                    break;
                }
                answer = b.cancel(&id2, &token).await;
            }
            ("cancel", answer.0, answer.1)
        }));
    }
    let (mut confirmed, mut cancelled, mut refunds) = (0, 0, 0);
    for answer in join_all(tasks).await {
        let (what, status, view) = answer.unwrap();
        match (what, status) {
            ("confirm", StatusCode::OK) => confirmed += 1,
            ("confirm", StatusCode::CONFLICT) => {
                assert_eq!(view["code"], "reservation_cancelled", "{view}");
                assert_eq!(view["refund_required"], true);
                refunds += 1;
            }
            ("cancel", StatusCode::OK) => {
                assert_eq!(view["status"], "cancelled");
                cancelled += 1;
            }
            ("cancel", StatusCode::CONFLICT) => assert_eq!(view["code"], "already_confirmed"),
            other => panic!("unexpected {other:?}: {view}"),
        }
    }
    assert_eq!(
        confirmed + cancelled,
        count,
        "each hold ended exactly one way"
    );
    assert_eq!(
        refunds, cancelled,
        "every cancelled-wins payment is refunded"
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["sold"].as_u64(), Some(confirmed as u64));
    assert_eq!(view["available"].as_u64(), Some(cancelled as u64));
    app.flush(&sku).await;
    assert_eq!(app.mysql_sold(&sku).await, confirmed as u64);
    assert_eq!(app.mysql_compensations(&sku).await, cancelled as i64);
}

#[tokio::test]
async fn the_same_confirm_webhook_twenty_times_at_once_sells_once() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("webhook");
    app.create_sku(&sku, json!({"stock": 1})).await;
    let id = app.hold(&sku, "w").await;
    let barrier = Arc::new(Barrier::new(20));
    let answers = join_all((0..20).map(|_| {
        let (app, id, barrier) = (app.clone(), id.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            app.confirm(&id, "pay-once").await
        })
    }))
    .await;
    for answer in answers {
        let (status, view) = answer.unwrap();
        assert_eq!(
            (status, &view["status"]),
            (StatusCode::OK, &json!("confirmed"))
        );
    }
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["sold"], 1);
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    assert_eq!(app.mysql_compensations(&sku).await, 0);
}

#[tokio::test]
async fn confirm_racing_the_deadline_either_sells_or_refunds() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("deadline");
    let count = 200;
    app.create_sku(&sku, json!({"stock": count, "hold_seconds": 1}))
        .await;
    let ids = holds(&app, &sku, count, "dl").await;
    // Fire the confirms spread across the deadline, with sweepers running meanwhile.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let sweeper = {
        let app = app.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                app.worker.sweep_once().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let answers = join_all(ids.iter().enumerate().map(|(i, id)| {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i as u64)).await;
            (app.confirm(&id, "pay").await, id)
        })
    }))
    .await;
    sweeper.await.unwrap();
    let (mut sold, mut refunded) = (0u64, 0i64);
    for answer in answers {
        let ((status, view), id) = answer.unwrap();
        match status {
            StatusCode::OK => sold += 1,
            StatusCode::CONFLICT => {
                assert_eq!(view["code"], "reservation_expired", "{view}");
                refunded += 1;
            }
            other => panic!("{other}: {view}"),
        }
        // The answer and the stored state agree.
        let (_, stored) = app.reservation(&id, SERVICE_TOKEN).await;
        let expected = if status == StatusCode::OK {
            "confirmed"
        } else {
            "expired"
        };
        assert_eq!(stored["status"], expected);
    }
    assert_eq!(sold as i64 + refunded, count as i64);
    app.worker.sweep_once().await.unwrap();
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["sold"].as_u64(), Some(sold));
    assert_eq!(view["held"], 0);
    app.flush(&sku).await;
    assert_eq!(app.mysql_sold(&sku).await, sold);
    assert_eq!(app.mysql_compensations(&sku).await, refunded);
}

#[tokio::test]
async fn sweepers_and_lazy_reclaim_racing_release_each_hold_once() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("sweepers");
    let count = 300;
    app.create_sku(&sku, json!({"stock": count, "hold_seconds": 1}))
        .await;
    holds(&app, &sku, count, "sw").await;
    // The late buyers' holds must outlive the test (it may take more than a second in
    // a debug build): new holds get 10 minutes, the first 300 keep their 1 s deadline.
    app.create_sku(&sku, json!({"stock": count, "hold_seconds": 600}))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second_worker = Arc::new(flashgate::worker::Worker::new(
        app.store.clone(),
        app.db.clone(),
    ));
    let barrier = Arc::new(Barrier::new(2 + 200));
    let mut tasks = Vec::new();
    for worker in [None, Some(second_worker.clone())] {
        let (app, barrier) = (app.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let report = match worker {
                Some(w) => w.sweep_once().await.unwrap(),
                None => app.worker.sweep_once().await.unwrap(),
            };
            (report.expired, StatusCode::OK)
        }));
    }
    for i in 0..200 {
        let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let (status, _) = app.reserve(&sku, &format!("late-{i}"), "k", 1).await;
            (0, status)
        }));
    }
    let mut created = 0;
    for answer in join_all(tasks).await {
        let (_, status) = answer.unwrap();
        if status == StatusCode::CREATED {
            created += 1;
        } else {
            assert_eq!(status, StatusCode::OK);
        }
    }
    assert_eq!(
        created, 200,
        "the reclaimed stock was enough for every late buyer"
    );
    app.worker.sweep_once().await.unwrap();
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 200, "each expired hold released exactly once");
    assert_eq!(view["available"].as_u64(), Some(count as u64 - 200));
}

#[tokio::test]
async fn replays_and_refusals_racing_under_the_sold_out_flag_are_told_apart() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("flag-burst");
    let winners = 50;
    app.create_sku(&sku, json!({"stock": winners})).await;
    let mut first_ids = Vec::new();
    for i in 0..winners {
        let (status, view) = app.reserve(&sku, &format!("w-{i}"), "key", 1).await;
        assert_eq!(status, StatusCode::CREATED);
        first_ids.push(view["reservation_id"].clone());
    }
    let losers = 250;
    let barrier = Arc::new(Barrier::new(winners + losers + 1));
    let tasks: Vec<_> = (0..winners + losers)
        .map(|i| {
            let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
            tokio::spawn(async move {
                let user = if i < winners {
                    format!("w-{i}")
                } else {
                    format!("l-{i}")
                };
                barrier.wait().await;
                let response = app.reserve_raw(&sku, &user, "key", 1).await;
                let replayed = response.headers().get("idempotent-replayed").is_some();
                let (status, view) = body(response).await;
                (i, status, replayed, view)
            })
        })
        .collect();
    // Redis refuses once, and the burst (already waiting) goes at once: the flag is
    // up for it (200 ms), so replays and refusals share probe batches.
    let (status, _) = app.reserve(&sku, "late", "key", 1).await;
    assert_eq!(status, StatusCode::CONFLICT);
    barrier.wait().await;
    for answer in join_all(tasks).await {
        let (i, status, replayed, view) = answer.unwrap();
        if i < winners {
            assert_eq!((status, replayed), (StatusCode::CREATED, true), "{view}");
            assert_eq!(view["reservation_id"], first_ids[i]);
        } else {
            assert_eq!(status, StatusCode::CONFLICT, "{view}");
            assert_eq!(view["code"], "sold_out");
        }
    }
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], winners);
}
