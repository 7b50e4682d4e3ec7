//! A SKU split over stock buckets (issue 13, src/buckets.rs): through the HTTP contract,
//! the same answers as an unsplit SKU (exact stock, exact per-user limit, idempotency,
//! `sold_out` only when no bucket has the quantity), with the stock in several hash
//! slots.

use crate::common::*;
use flashgate::buckets;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Barrier;

/// The buckets of a SKU, as Redis has them: each bucket's (stock_total, available,
/// held, sold).
async fn bucket_counters(app: &TestApp, sku: &str, k: u32) -> Vec<[u64; 4]> {
    let mut out = Vec::new();
    for sale in buckets::sales(&TestApp::sku_id(sku), k) {
        let (view, _) = app.store.sale_view(&sale).await.unwrap();
        out.push([view.stock_total, view.available, view.held, view.sold]);
    }
    out
}

/// A reserve, retried with the same key after a 503 (Redis too slow for its deadline on
/// a loaded box), as the contract says clients may: safe, and it tells the outcome.
async fn reserve_retrying(
    app: &TestApp,
    sku: &str,
    user: &str,
    key: &str,
    quantity: u64,
) -> (StatusCode, serde_json::Value) {
    let mut answer = app.reserve(sku, user, key, quantity).await;
    for _ in 0..5 {
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        answer = app.reserve(sku, user, key, quantity).await;
    }
    answer
}

/// Users homed in each bucket: `per_bucket` users per bucket, named `prefix-<n>`.
fn users_homed(sku: &str, k: u32, per_bucket: usize, prefix: &str) -> Vec<Vec<String>> {
    let id = TestApp::sku_id(sku);
    let mut homed = vec![Vec::new(); k as usize];
    for n in 0.. {
        let user = format!("{prefix}-{n}");
        let home = buckets::home(&id, &user, k) as usize;
        if homed[home].len() < per_bucket {
            homed[home].push(user);
        }
        if homed.iter().all(|users| users.len() == per_bucket) {
            return homed;
        }
    }
    unreachable!()
}

/// Exactly as many racing users as units, all homed in one bucket of three: every
/// one of them gets a hold (the stock of the two other buckets moves to theirs), and
/// the SKU ends with nothing left and nothing sold twice.
#[tokio::test]
async fn users_homed_in_one_bucket_get_every_unit_of_the_others() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("bk-one-home");
    let stock = 90;
    let view = app
        .create_sku(&sku, json!({ "stock": stock, "buckets": 3 }))
        .await;
    assert_eq!(
        (view["stock_total"].as_u64(), view["available"].as_u64()),
        (Some(stock), Some(stock)),
        "{view}"
    );
    assert_eq!(
        bucket_counters(&app, &sku, 3).await,
        vec![[30, 30, 0, 0]; 3],
        "split evenly"
    );
    let users = users_homed(&sku, 3, stock as usize, "one").swap_remove(2);
    let barrier = Arc::new(Barrier::new(users.len()));
    let answers = join_all(users.iter().map(|user| {
        let (app, sku, user, barrier) = (app.clone(), sku.clone(), user.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            app.reserve(&sku, &user, "k", 1).await
        })
    }))
    .await;
    let mut statuses: HashMap<StatusCode, usize> = HashMap::new();
    for answer in answers {
        let (status, body) = answer.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(
            body["reservation_id"].as_str().unwrap().contains("~2~"),
            "the user's bucket: {body}"
        );
        *statuses.entry(status).or_default() += 1;
    }
    assert_eq!(statuses[&StatusCode::CREATED], stock as usize);
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(0), Some(stock))
    );
    let counters = bucket_counters(&app, &sku, 3).await;
    assert_eq!(counters[2], [stock, 0, stock, 0], "{counters:?}");
    // And then it is sold out, for every user wherever they live.
    for user in ["late-a", "late-b", "late-c", "late-d"] {
        let (status, body) = app.reserve(&sku, user, "k", 1).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::CONFLICT, Some("sold_out"))
        );
    }
}

/// 1,800 racing reserves from 600 users, a small stock split over three buckets, a per-user
/// limit of 2 and users asking for 1 or 2 units with several keys: exactly the stock is
/// held, no user beyond the limit, and every refusal is `sold_out` or
/// `limit_exceeded`, `sold_out` only for a quantity no bucket could serve then.
#[tokio::test]
async fn thousands_of_users_racing_for_a_split_sku_hold_exactly_its_stock() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("bk-race");
    let stock = 200u64;
    app.create_sku(
        &sku,
        json!({ "stock": stock, "buckets": 3, "per_user_limit": 2 }),
    )
    .await;
    let users = 600;
    let attempts: Vec<(String, String, u64)> = (0..users)
        .flat_map(|u| {
            let user = format!("racer-{u}");
            // Three keys per user, 1 or 2 units each: more than the limit allows.
            (0..3).map(move |k| (user.clone(), format!("key-{k}"), 1 + (u + k) as u64 % 2))
        })
        .collect();
    let barrier = Arc::new(Barrier::new(attempts.len()));
    let answers = join_all(attempts.into_iter().map(|(user, key, quantity)| {
        let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let answer = reserve_retrying(&app, &sku, &user, &key, quantity).await;
            (user, quantity, answer.0, answer.1)
        })
    }))
    .await;
    let mut held_by: HashMap<String, u64> = HashMap::new();
    let mut held = 0;
    for answer in answers {
        let (user, quantity, status, body) = answer.unwrap();
        match status {
            StatusCode::CREATED => {
                assert_eq!(body["quantity"].as_u64(), Some(quantity));
                *held_by.entry(user).or_default() += quantity;
                held += quantity;
            }
            StatusCode::CONFLICT => assert!(
                matches!(body["code"].as_str(), Some("sold_out" | "limit_exceeded")),
                "{body}"
            ),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(held, stock, "exactly the stock is held");
    assert!(held_by.values().all(|&units| units <= 2), "the limit holds");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(0), Some(stock))
    );
    // Every bucket's own equation, and their stock adds up to the SKU's.
    let counters = bucket_counters(&app, &sku, 3).await;
    for [total, available, held, sold] in &counters {
        assert_eq!(available + held + sold, *total, "{counters:?}");
    }
    assert_eq!(counters.iter().map(|c| c[0]).sum::<u64>(), stock);
}

/// Demand equals the stock exactly and most of it comes from one bucket's users, in
/// quantities of 1 to 3: every reserve must be served (a `sold_out` here would leave
/// a unit unsold while its buyer was told there was none), and the SKU ends empty.
#[tokio::test]
async fn when_demand_equals_the_stock_every_racing_reserve_is_served() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("bk-exact");
    let stock = 600u64;
    app.create_sku(
        &sku,
        json!({ "stock": stock, "buckets": 3, "per_user_limit": 3 }),
    )
    .await;
    // Four in five reserves from users of bucket 0, the rest from the others' users;
    // one reserve per user, so the limit never refuses.
    let mut homed = users_homed(&sku, 3, 300, "exact");
    let mut attempts: Vec<(String, u64)> = Vec::new();
    let mut demand = 0;
    for n in 0.. {
        let bucket = if n % 5 == 4 { 1 + n / 5 % 2 } else { 0 };
        let user = homed[bucket].pop().unwrap();
        let quantity = (1 + n as u64 % 3).min(stock - demand);
        demand += quantity;
        attempts.push((user, quantity));
        if demand == stock {
            break;
        }
    }
    // They arrive over 40 ms, as a sale's traffic does: moved units meet fresh
    // reserves of their bucket, not only the ones that asked for them.
    let barrier = Arc::new(Barrier::new(attempts.len()));
    let answers = join_all(
        attempts
            .into_iter()
            .enumerate()
            .map(|(n, (user, quantity))| {
                let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    tokio::time::sleep(std::time::Duration::from_millis(n as u64 % 40)).await;
                    let answer = reserve_retrying(&app, &sku, &user, "k", quantity).await;
                    (quantity, answer.0, answer.1)
                })
            }),
    )
    .await;
    let mut held = 0;
    for answer in answers {
        let (quantity, status, body) = answer.unwrap();
        assert_eq!(status, StatusCode::CREATED, "stock remained: {body}");
        held += quantity;
    }
    assert_eq!(held, stock);
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(0), Some(stock))
    );
    let counters = bucket_counters(&app, &sku, 3).await;
    assert_eq!(counters.iter().map(|c| c[0]).sum::<u64>(), stock);
    let (status, body) = app.reserve(&sku, "after-the-race", "k", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("sold_out"))
    );
}

/// Two gateways sell one split SKU at once: each one's transfers are the other's
/// unknown ones, so their reads settle only by the slower rule (src/batcher.rs,
/// `BucketMoves`). Demand equal to the stock, three in four units asked for by users of
/// bucket 0, half through each gateway: every reserve is served, then both gateways
/// answer `sold_out` to anyone.
#[tokio::test]
async fn two_gateways_racing_for_a_split_sku_sell_all_of_it_and_no_more() {
    let gateways = Arc::new([spawn_app().await, spawn_app().await]);
    let sku = unique_sku("bk-two");
    let stock = 400usize;
    gateways[0]
        .create_sku(&sku, json!({ "stock": stock, "buckets": 3 }))
        .await;
    let mut homed = users_homed(&sku, 3, stock, "two");
    let buyers: Vec<String> = (0..stock)
        .map(|n| {
            homed[if n % 4 == 3 { 1 + n / 4 % 2 } else { 0 }]
                .pop()
                .unwrap()
        })
        .collect();
    let barrier = Arc::new(Barrier::new(buyers.len()));
    let answers = join_all(buyers.into_iter().enumerate().map(|(n, user)| {
        let (gateways, sku, barrier) = (gateways.clone(), sku.clone(), barrier.clone());
        tokio::spawn(async move {
            let app = &gateways[n % 2];
            barrier.wait().await;
            tokio::time::sleep(std::time::Duration::from_millis(n as u64 % 40)).await;
            let answer = reserve_retrying(app, &sku, &user, "k", 1).await;
            answer
        })
    }))
    .await;
    for answer in answers {
        let (status, body) = answer.unwrap();
        assert_eq!(status, StatusCode::CREATED, "stock remained: {body}");
    }
    let view = gateways[1].assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["available"].as_u64(), view["held"].as_u64()),
        (Some(0), Some(stock as u64))
    );
    let counters = bucket_counters(&gateways[0], &sku, 3).await;
    assert_eq!(counters.iter().map(|c| c[0]).sum::<u64>(), stock as u64);
    for (n, bucket) in homed.iter_mut().enumerate() {
        let user = bucket.pop().unwrap();
        let (status, body) = gateways[n % 2].reserve(&sku, &user, "k", 1).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::CONFLICT, Some("sold_out"))
        );
    }
}

/// One user's keys all go to the user's home bucket: the per-user limit is exact and
/// a key replays its hold, whatever bucket holds the stock.
#[tokio::test]
async fn a_users_limit_and_keys_are_exact_on_a_split_sku() {
    let app = Arc::new(spawn_app().await);
    let sku = unique_sku("bk-limit");
    app.create_sku(
        &sku,
        json!({ "stock": 60, "buckets": 4, "per_user_limit": 3 }),
    )
    .await;
    let barrier = Arc::new(Barrier::new(20));
    let answers = join_all((0..20).map(|k| {
        let (app, sku, barrier) = (app.clone(), sku.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let key = format!("k-{k}");
            let (status, body) = app.reserve(&sku, "greedy", &key, 1).await;
            (key, status, body)
        })
    }))
    .await;
    let mut created = Vec::new();
    for answer in answers {
        let (key, status, body) = answer.unwrap();
        match status {
            StatusCode::CREATED => created.push((key, body["reservation_id"].clone())),
            _ => assert_eq!(body["code"], "limit_exceeded", "{body}"),
        }
    }
    assert_eq!(created.len(), 3, "exactly the limit");
    for (key, rid) in &created {
        let (status, again) = app.reserve(&sku, "greedy", key, 1).await;
        assert_eq!(status, StatusCode::CREATED, "{again}");
        assert_eq!(&again["reservation_id"], rid, "a replay");
    }
    let (status, refused) = app.reserve(&sku, "greedy", "k-new", 1).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );
}

/// Confirm, cancel, payment-pending and reads route by the id's bucket; a hold that
/// expires returns its units to its bucket, and they are sellable to a user of another
/// bucket at once; the flush writes one record per SKU and the reconciler finds no drift.
#[tokio::test]
async fn a_split_skus_reservations_live_their_whole_life_in_their_bucket() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-life");
    app.create_sku(&sku, json!({ "stock": 4, "buckets": 2, "hold_seconds": 1 }))
        .await;
    let homed = users_homed(&sku, 2, 3, "life");
    let (a, b) = (&homed[0], &homed[1]);
    let rid = |v: &serde_json::Value| v["reservation_id"].as_str().unwrap().to_owned();
    // Bucket 0: one confirmed, one cancelled; bucket 1: one paying then confirmed.
    let (_, a0) = app.reserve(&sku, &a[0], "k", 1).await;
    let (_, a1) = app.reserve(&sku, &a[1], "k", 1).await;
    let (_, b0) = app.reserve(&sku, &b[0], "k", 1).await;
    assert!(
        !rid(&a0).contains('~') && rid(&b0).contains("~1~"),
        "{a0} {b0}"
    );
    assert_eq!(app.confirm(&rid(&a0), "pay-a0").await.0, StatusCode::OK);
    let (status, cancelled) = app.cancel(&rid(&a1), &user_token(&a[1])).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let (status, paying) = app.payment_pending(&rid(&b0), "pay-b0").await;
    assert_eq!(
        (status, paying["status"].as_str()),
        (StatusCode::OK, Some("paying"))
    );
    assert_eq!(app.confirm(&rid(&b0), "pay-b0").await.0, StatusCode::OK);
    let (status, read) = app.reservation(&rid(&b0), &user_token(&b[0])).await;
    assert_eq!(
        (status, read["status"].as_str()),
        (StatusCode::OK, Some("confirmed"))
    );
    // A second payment for a confirmed hold: 409 and a compensation, readable at once.
    let (status, refused) = app.confirm(&rid(&b0), "pay-b0-again").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let compensation = refused["compensation_id"].as_str().unwrap();
    let listed = app.compensations(&format!("sku={sku}")).await;
    assert!(listed
        .iter()
        .any(|c| c["id"] == compensation && c["sku"] == sku.as_str()));
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (
            view["available"].as_u64(),
            view["held"].as_u64(),
            view["sold"].as_u64()
        ),
        (Some(2), Some(0), Some(2))
    );
    // Bucket 1 holds its last unit for b[1]; b[2] gets bucket 0's stock moved over.
    let (status, b1) = app.reserve(&sku, &b[1], "k", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{b1}");
    let (status, b2) = app.reserve(&sku, &b[2], "k", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{b2}");
    let (status, _) = app.reserve(&sku, &a[2], "k", 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "sold out everywhere");
    // Both expire (1 s holds): their units are back and sellable to bucket 0's user.
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    let (status, a2) = app.reserve(&sku, &a[2], "k2", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{a2}");
    app.flush(&sku).await;
    assert_eq!(app.mysql_sold(&sku).await, 2);
    assert_eq!(app.mysql_sales_count(&sku).await, 2);
    assert_eq!(app.mysql_compensations(&sku).await, 1);
    let report =
        flashgate::reconcile::run_skus(&app.store, &app.db, &[TestApp::sku_id(&sku)], false)
            .await
            .unwrap();
    assert!(!report.drift_found(), "{:?}", report.findings);
}

/// The admin PUT: a SKU keeps its buckets (another number: 409 `buckets_changed`,
/// nothing changed); more stock lands in bucket 0 and is sold from any bucket; less
/// comes out of the buckets with the most available, and below what is held and sold
/// it is refused with nothing changed.
#[tokio::test]
async fn a_split_sku_is_redefined_without_losing_a_unit() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-admin");
    app.create_sku(
        &sku,
        json!({ "stock": 9, "buckets": 3, "per_user_limit": 5 }),
    )
    .await;
    for other in [1, 2, 4] {
        let (status, problem) = app
            .put_sku(&sku, json!({ "stock": 9, "buckets": other }))
            .await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (StatusCode::CONFLICT, Some("buckets_changed")),
            "{problem}"
        );
    }
    let (status, problem) = app.put_sku(&sku, json!({ "stock": 9 })).await;
    assert_eq!(
        problem["code"], "buckets_changed",
        "omitted means 1: {status}"
    );
    let homed = users_homed(&sku, 3, 1, "admin");
    for (b, users) in homed.iter().enumerate() {
        let (status, body) = app.reserve(&sku, &users[0], "k", 2).await;
        assert_eq!(status, StatusCode::CREATED, "bucket {b}: {body}");
    }
    let view = app
        .create_sku(
            &sku,
            json!({ "stock": 15, "buckets": 3, "per_user_limit": 5 }),
        )
        .await;
    assert_eq!(
        (
            view["stock_total"].as_u64(),
            view["available"].as_u64(),
            view["held"].as_u64()
        ),
        (Some(15), Some(9), Some(6))
    );
    assert_eq!(bucket_counters(&app, &sku, 3).await[0], [9, 7, 2, 0]);
    let view = app
        .create_sku(
            &sku,
            json!({ "stock": 7, "buckets": 3, "per_user_limit": 5 }),
        )
        .await;
    assert_eq!(
        (view["stock_total"].as_u64(), view["available"].as_u64()),
        (Some(7), Some(1))
    );
    let counters = bucket_counters(&app, &sku, 3).await;
    assert_eq!(
        counters.iter().map(|c| c[0]).sum::<u64>(),
        7,
        "{counters:?}"
    );
    let (status, problem) = app
        .put_sku(
            &sku,
            json!({ "stock": 5, "buckets": 3, "per_user_limit": 5 }),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::CONFLICT, Some("stock_below_committed"))
    );
    assert_eq!(
        bucket_counters(&app, &sku, 3).await,
        counters,
        "nothing changed"
    );
    assert_eq!(app.sku(&sku).await["stock_total"], 7);
    // The last unit sells to a user of any bucket.
    let (status, body) = app.reserve(&sku, &homed[1][0], "k2", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["available"], 0);
}

/// A transfer cut short after its first step (the gateway stopped between steps):
/// its units are in transit, counted as available by the SKU view; the worker's next
/// sweep of the donor finishes it exactly once and the units sell from the receiver.
#[tokio::test]
async fn the_worker_finishes_a_transfer_its_gateway_never_did() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-cut");
    app.create_sku(&sku, json!({ "stock": 6, "buckets": 2 }))
        .await;
    let sales = buckets::sales(&TestApp::sku_id(&sku), 2);
    let (from, to) = (
        flashgate::keys::SkuKeys::new(&sales[0]),
        flashgate::keys::SkuKeys::new(&sales[1]),
    );
    assert_eq!(
        app.store
            .transfer_take(&from, &to, "cut-1", 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        bucket_counters(&app, &sku, 2).await,
        vec![[1, 1, 0, 0], [3, 3, 0, 0]]
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (&view["stock_total"], &view["available"]),
        (&json!(6), &json!(6))
    );
    // Not stale yet: the sweep leaves it to its gateway.
    app.worker.sweep_sku(sales[0].clone()).await.unwrap();
    assert_eq!(bucket_counters(&app, &sku, 2).await[1], [3, 3, 0, 0]);
    // Its take made long ago (the record's time, moved back as a stopped clock would).
    let mut conn = app.store.connection();
    let record: String = redis::AsyncCommands::hget(&mut conn, &from.transfers, "out:cut-1")
        .await
        .unwrap();
    let old = record.replacen(
        record.split(' ').nth(1).unwrap(),
        &(chrono::Utc::now().timestamp_millis() - 60_000).to_string(),
        1,
    );
    let _: () = redis::AsyncCommands::hset(&mut conn, &from.transfers, "out:cut-1", old)
        .await
        .unwrap();
    for _ in 0..2 {
        app.worker.sweep_sku(sales[0].clone()).await.unwrap();
        app.worker.sweep_sku(sales[1].clone()).await.unwrap();
    }
    assert_eq!(
        bucket_counters(&app, &sku, 2).await,
        vec![[1, 1, 0, 0], [5, 5, 0, 0]],
        "given once, however often swept"
    );
    // Left: the receiver's record marked done (4 fields), kept for the give window.
    for bucket in [&from, &to] {
        let records: Vec<String> = redis::AsyncCommands::hvals(&mut conn, &bucket.transfers)
            .await
            .unwrap();
        assert!(
            records.iter().all(|r| r.split(' ').count() == 4),
            "no open record left: {records:?}"
        );
    }
    assert_eq!(app.assert_stock_adds_up(&sku).await["available"], 6);
}

/// A move of units whose give finds the receiver without state (Redis lost it) gives
/// nothing and keeps the transfer's records: the units stay in transit, counted in the
/// SKU's stock, for the finisher to give once the receiver is rebuilt.
#[tokio::test]
async fn a_move_to_a_bucket_redis_lost_keeps_its_units_in_transit() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-move-lost");
    app.create_sku(&sku, json!({ "stock": 4, "buckets": 2 }))
        .await;
    let sales = buckets::sales(&TestApp::sku_id(&sku), 2);
    let (home, other) = (
        flashgate::keys::SkuKeys::new(&sales[0]),
        flashgate::keys::SkuKeys::new(&sales[1]),
    );
    let mut conn = app.store.connection();
    let _: () = redis::AsyncCommands::del(&mut conn, &home.meta)
        .await
        .unwrap();
    assert_eq!(app.store.move_units(&other, &home, 1).await.unwrap(), 0);
    let (stock, in_transit) = app.store.split_stock(&sales).await.unwrap();
    assert_eq!((stock, in_transit), (vec![None, Some(1)], 1));
    let records: Vec<String> = redis::AsyncCommands::hvals(&mut conn, &other.transfers)
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "the take's record stays: {records:?}");
}

/// The reconciler checks each bucket against the sales it made and the SKU's stock
/// over all buckets: a bucket whose stock_total drifted is found and repaired (bucket 0
/// takes the difference), and a bucket Redis lost is rebuilt with what it sold plus
/// what the others do not hold, its buyers' limits intact.
#[tokio::test]
async fn the_reconciler_repairs_a_split_sku_bucket_by_bucket() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-recon");
    app.create_sku(
        &sku,
        json!({ "stock": 30, "buckets": 3, "per_user_limit": 2 }),
    )
    .await;
    let id = TestApp::sku_id(&sku);
    let sales = buckets::sales(&id, 3);
    let homed = users_homed(&sku, 3, 2, "recon");
    for (b, users) in homed.iter().enumerate() {
        for user in users {
            let (status, held) = app.reserve(&sku, user, "k", 2).await;
            assert_eq!(status, StatusCode::CREATED, "{held}");
            if b == 2 {
                let rid = held["reservation_id"].as_str().unwrap();
                assert_eq!(
                    app.confirm(rid, &format!("pay-{user}")).await.0,
                    StatusCode::OK
                );
            }
        }
    }
    app.flush(&sku).await;
    let reconcile = |repair| {
        let (store, db, only) = (app.store.clone(), app.db.clone(), [id.clone()]);
        async move {
            flashgate::reconcile::run_skus(&store, &db, &only, repair)
                .await
                .unwrap()
        }
    };
    assert!(!reconcile(false).await.drift_found());
    // Bucket 1's stock_total and available grow by 5 (its own equation still holds).
    let mut conn = app.store.connection();
    let meta = flashgate::keys::SkuKeys::new(&sales[1]).meta;
    for field in ["stock_total", "available"] {
        let _: i64 = redis::AsyncCommands::hincr(&mut conn, &meta, field, 5)
            .await
            .unwrap();
    }
    let found = reconcile(false).await;
    let kinds: Vec<&str> = found.findings.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, vec!["stock_total_mismatch"], "{:?}", found.findings);
    assert!(reconcile(true).await.findings.iter().all(|f| f.repaired));
    assert!(!reconcile(false).await.drift_found());
    assert_eq!(app.sku(&sku).await["stock_total"], 30);
    // Too much again, and bucket 0 has nothing available (its units moved to bucket
    // 1): the excess is taken from the bucket that has it.
    let meta_0 = flashgate::keys::SkuKeys::new(&sales[0]).meta;
    let available_0: i64 = redis::AsyncCommands::hget(&mut conn, &meta_0, "available")
        .await
        .unwrap();
    for (meta, by) in [(&meta_0, -available_0), (&meta, available_0 + 3)] {
        for field in ["stock_total", "available"] {
            let _: i64 = redis::AsyncCommands::hincr(&mut conn, meta, field, by)
                .await
                .unwrap();
        }
    }
    let repaired = reconcile(true).await;
    assert!(
        repaired
            .findings
            .iter()
            .all(|f| f.kind == "stock_total_mismatch" && f.repaired),
        "{:?}",
        repaired.findings
    );
    assert!(!reconcile(false).await.drift_found());
    assert_eq!(app.sku(&sku).await["stock_total"], 30);
    // Redis loses bucket 2 (4 units sold there, MySQL has them).
    let keys = flashgate::keys::SkuKeys::new(&sales[2]);
    let _: () = redis::pipe()
        .del(&keys.meta)
        .del(&keys.used)
        .del(&keys.holds)
        .del(&keys.deadlines)
        .query_async(&mut conn)
        .await
        .unwrap();
    let found = reconcile(true).await;
    assert!(
        found
            .findings
            .iter()
            .any(|f| f.kind == "redis_state_missing" && f.repaired),
        "{:?}",
        found.findings
    );
    // The rebuild alone gives the lost bucket its sold units and the free ones (30 less
    // what the others hold and what it sold): no stock repair had to follow it, which
    // would mean units were on sale beyond the stock, or missing, meanwhile.
    assert!(
        found
            .findings
            .iter()
            .all(|f| f.kind != "stock_total_mismatch"),
        "{:?}",
        found.findings
    );
    assert!(
        !reconcile(false).await.drift_found(),
        "clean after the repair"
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (
            view["stock_total"].as_u64(),
            view["held"].as_u64(),
            view["sold"].as_u64()
        ),
        (Some(30), Some(8), Some(4))
    );
    // Its buyers still count what they bought: the limit (2) is reached.
    let (status, refused) = app.reserve(&sku, &homed[2][0], "k2", 1).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );
}

/// A SKU of 10 units in 2 buckets, 1 per user, with `holds` units held by users named
/// `<name>-<n>`: its name, its buckets and the holds' ids.
async fn split_with_holds(
    app: &TestApp,
    name: &str,
    holds: usize,
) -> (String, Vec<flashgate::ids::SkuId>, Vec<String>) {
    let sku = unique_sku(name);
    app.create_sku(
        &sku,
        json!({ "stock": 10, "buckets": 2, "per_user_limit": 1 }),
    )
    .await;
    let mut ids = Vec::new();
    for u in 0..holds {
        let (status, held) = reserve_retrying(app, &sku, &format!("{name}-{u}"), "k", 1).await;
        assert_eq!(status, StatusCode::CREATED, "{held}");
        ids.push(held["reservation_id"].as_str().unwrap().to_string());
    }
    let sales = buckets::sales(&TestApp::sku_id(&sku), 2);
    (sku, sales, ids)
}

/// More stock than MySQL's with less of it on sale than the excess (a bucket rolled
/// back after giving a transfer gives it again, and the copies sold): the repair takes
/// every unit still on sale and reports `overcommitted`, so Redis sells nothing MySQL
/// has not left, and takes units that come back later too (explorer `--rollback`
/// seed 305).
#[tokio::test]
async fn a_repair_takes_every_unit_on_sale_when_the_excess_is_held_or_sold() {
    let app = spawn_app().await;
    let (sku, sales, holds) = split_with_holds(&app, "bk-overcommit", 8).await;
    // Bucket 1 counts 5 units more, all sold: 15 units, 2 of them on sale.
    let mut conn = app.store.connection();
    let meta = flashgate::keys::SkuKeys::new(&sales[1]).meta;
    for field in ["stock_total", "sold"] {
        let _: i64 = redis::AsyncCommands::hincr(&mut conn, &meta, field, 5)
            .await
            .unwrap();
    }
    let found = app.reconcile(&sku, true).await;
    let overcommitted = found
        .findings
        .iter()
        .find(|f| f.kind == "overcommitted")
        .unwrap_or_else(|| panic!("{:?}", found.findings));
    assert_eq!(
        overcommitted.after.as_deref(),
        Some("stock_total=13"),
        "{:?}",
        found.findings
    );
    let available = |counters: Vec<[u64; 4]>| counters.iter().map(|c| c[1]).sum::<u64>();
    assert_eq!(available(bucket_counters(&app, &sku, 2).await), 0);
    let (status, refused) = reserve_retrying(&app, &sku, "oc-late", "k", 1).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("sold_out")),
        "{refused}"
    );
    // A unit comes back: the next repair takes it too.
    assert_eq!(
        app.cancel(&holds[0], &user_token("bk-overcommit-0"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(available(bucket_counters(&app, &sku, 2).await), 1);
    let found = app.reconcile(&sku, true).await;
    assert!(
        found.findings.iter().any(|f| f.kind == "overcommitted"),
        "{:?}",
        found.findings
    );
    assert_eq!(available(bucket_counters(&app, &sku, 2).await), 0);
}

/// The same with units in a cut transfer: the repair gives them first (the finisher
/// would put them on sale after the take), then takes every unit on sale, so nothing
/// is on sale once the finisher has run.
#[tokio::test]
async fn a_repair_of_excess_stock_gives_cut_transfers_before_it_takes() {
    let app = spawn_app().await;
    let (sku, sales, _) = split_with_holds(&app, "bk-overcommit-cut", 6).await;
    // A cut transfer of 2 units from the bucket that has them, past its staleness.
    let keys: Vec<_> = sales.iter().map(flashgate::keys::SkuKeys::new).collect();
    let counters = bucket_counters(&app, &sku, 2).await;
    let (from, to) = if counters[0][1] >= 2 { (0, 1) } else { (1, 0) };
    assert_eq!(
        app.store
            .transfer_take(&keys[from], &keys[to], "cut", 2)
            .await
            .unwrap(),
        2
    );
    age_transfer(&app, &keys[from], "out:cut").await;
    // Bucket 1 counts 5 units more, all sold: 2 on sale, 2 in transit.
    let mut conn = app.store.connection();
    for field in ["stock_total", "sold"] {
        let _: i64 = redis::AsyncCommands::hincr(&mut conn, &keys[1].meta, field, 5)
            .await
            .unwrap();
    }
    let found = app.reconcile(&sku, true).await;
    assert!(
        found.findings.iter().any(|f| f.kind == "overcommitted"),
        "{:?}",
        found.findings
    );
    app.store
        .finish_transfers(&keys, std::time::Duration::ZERO)
        .await
        .unwrap();
    let (stock, in_transit) = app.store.split_stock(&sales).await.unwrap();
    assert_eq!(in_transit, 0, "{stock:?}");
    let available: u64 = bucket_counters(&app, &sku, 2)
        .await
        .iter()
        .map(|c| c[1])
        .sum();
    assert_eq!(available, 0, "{stock:?}");
}

/// A lost bucket other than bucket 0 is rebuilt with the usage of its own buyers: a
/// buyer whose key is past its lifetime (so no key claim brings the usage back) is
/// still at their limit after the rebuild (a rebuild with bucket 0's buyers' usage
/// lets them buy again: a mutant of restore_missing's bucket look-up).
#[tokio::test]
async fn a_rebuilt_bucket_keeps_its_own_buyers_limits_past_their_keys_lifetime() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-rebuild-usage");
    app.create_sku(
        &sku,
        json!({ "stock": 10, "buckets": 2, "per_user_limit": 1 }),
    )
    .await;
    let id = TestApp::sku_id(&sku);
    let sales = buckets::sales(&id, 2);
    let buyer = &homed_in(&sku, 1, 2, 1)[0];
    let (status, held) = reserve_retrying(&app, &sku, buyer, "k", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let rid = held["reservation_id"].as_str().unwrap();
    assert_eq!(app.confirm(rid, "pay-rebuild").await.0, StatusCode::OK);
    app.flush(&sku).await;
    // The key's lifetime passes; then Redis loses bucket 1.
    sqlx::query(
        "UPDATE reservations SET keep_until = NOW() - INTERVAL 1 DAY WHERE reservation_id = ?",
    )
    .bind(rid)
    .execute(&app.db)
    .await
    .unwrap();
    let keys = flashgate::keys::SkuKeys::new(&sales[1]);
    let mut conn = app.store.connection();
    let _: () = redis::pipe()
        .del(&keys.meta)
        .del(&keys.used)
        .del(&keys.holds)
        .del(&keys.deadlines)
        .query_async(&mut conn)
        .await
        .unwrap();
    let report = app.reconcile(&sku, true).await;
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == "redis_state_missing" && f.repaired),
        "{:?}",
        report.findings
    );
    let (status, refused) = reserve_retrying(&app, &sku, buyer, "k2", 1).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded")),
        "{refused}"
    );
}

/// Users of a split SKU homed in bucket `bucket` (of `k`).
fn homed_in(sku: &str, bucket: u32, k: u32, how_many: usize) -> Vec<String> {
    let id = TestApp::sku_id(sku);
    (0..)
        .map(|u| format!("homed-{u}"))
        .filter(|user| buckets::home(&id, user, k) == bucket)
        .take(how_many)
        .collect()
}

/// Moves a transfer record's take time back a minute, as a stopped gateway leaves it.
async fn age_transfer(app: &TestApp, from: &flashgate::keys::SkuKeys, field: &str) {
    let mut conn = app.store.connection();
    let record: String = redis::AsyncCommands::hget(&mut conn, &from.transfers, field)
        .await
        .unwrap();
    let at: i64 = record.split(' ').nth(1).unwrap().parse().unwrap();
    let old = record.replacen(&at.to_string(), &(at - 60_000).to_string(), 1);
    let _: () = redis::AsyncCommands::hset(&mut conn, &from.transfers, field, old)
        .await
        .unwrap();
}

/// The repair of a split SKU's stock counts units in transit: while a cut transfer
/// waits for its finisher, the SKU adds up, and a repair that added them to bucket 0
/// would sell them twice once the transfer lands (mutant N10 of the 2026-12-06 review).
#[tokio::test]
async fn a_repair_counts_the_units_of_a_cut_transfer_as_the_skus() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-transit-repair");
    app.create_sku(&sku, json!({ "stock": 6, "buckets": 2 }))
        .await;
    let sales = buckets::sales(&TestApp::sku_id(&sku), 2);
    let (from, to) = (
        flashgate::keys::SkuKeys::new(&sales[0]),
        flashgate::keys::SkuKeys::new(&sales[1]),
    );
    assert_eq!(
        app.store.transfer_take(&from, &to, "cut", 2).await.unwrap(),
        2
    );
    let report =
        flashgate::reconcile::run_skus(&app.store, &app.db, &[TestApp::sku_id(&sku)], true)
            .await
            .unwrap();
    assert!(
        report.findings.iter().all(|f| !f.is_drift()),
        "{:?}",
        report.findings
    );
    let (stock, in_transit) = app.store.split_stock(&sales).await.unwrap();
    assert_eq!((stock.clone(), in_transit), (vec![Some(1), Some(3)], 2));
    // Finished: the SKU has its 6 units, not 8.
    app.store
        .finish_transfers(&[from, to], std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        bucket_counters(&app, &sku, 2).await,
        vec![[1, 1, 0, 0], [5, 5, 0, 0]]
    );
}

/// `sold_out` only when less than the quantity is available: units sitting in a cut
/// transfer are the SKU's, and reserves that need them are served once it lands (a
/// batch answering `sold_out` on a read that missed them is mutant N13 of the review).
#[tokio::test]
async fn units_in_a_cut_transfer_are_sold_not_refused() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-transit-sold");
    app.create_sku(&sku, json!({ "stock": 2, "buckets": 2 }))
        .await;
    let sales = buckets::sales(&TestApp::sku_id(&sku), 2);
    let (from, to) = (
        flashgate::keys::SkuKeys::new(&sales[0]),
        flashgate::keys::SkuKeys::new(&sales[1]),
    );
    assert_eq!(
        app.store.transfer_take(&from, &to, "cut", 1).await.unwrap(),
        1
    );
    age_transfer(&app, &from, "out:cut").await;
    for user in homed_in(&sku, 0, 2, 2) {
        let (status, body) = reserve_retrying(&app, &sku, &user, "k", 1).await;
        assert_eq!(status, StatusCode::CREATED, "{user}: {body}");
    }
    let (status, _) = reserve_retrying(&app, &sku, &homed_in(&sku, 1, 2, 1)[0], "k", 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "now it is sold out");
}

/// A split SKU's stock change that stopped half-way (MySQL committed the new stock,
/// Redis applied none or part of it: a timeout, a gateway killed) is completed by the
/// same PUT again: the change is the new stock less what the buckets hold, not less
/// what MySQL recorded before (defect 5 of issue 21).
#[tokio::test]
async fn a_stock_change_that_stopped_half_way_is_completed_by_the_same_put() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-half-put");
    app.create_sku(&sku, json!({ "stock": 10, "buckets": 2 }))
        .await;
    sqlx::query("UPDATE skus SET stock_total = 6 WHERE sku = ?")
        .bind(&sku)
        .execute(&app.db)
        .await
        .unwrap();
    let (status, view) = app.put_sku(&sku, json!({ "stock": 6, "buckets": 2 })).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let counters = bucket_counters(&app, &sku, 2).await;
    assert_eq!(
        counters.iter().map(|c| c[0]).sum::<u64>(),
        6,
        "{counters:?}"
    );
    assert_eq!(app.assert_stock_adds_up(&sku).await["stock_total"], 6);
    // And up again, from a half-applied increase.
    sqlx::query("UPDATE skus SET stock_total = 9 WHERE sku = ?")
        .bind(&sku)
        .execute(&app.db)
        .await
        .unwrap();
    let (status, view) = app.put_sku(&sku, json!({ "stock": 9, "buckets": 2 })).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(app.assert_stock_adds_up(&sku).await["stock_total"], 9);
}

/// A gateway that finds no state for a SKU in Redis does not know its bucket count and
/// sends the reserve to the SKU's own tag: should bucket 0 of a split SKU be rebuilt
/// meanwhile, that reserve must make no hold there (its user is homed elsewhere and
/// the key may already hold a reservation there). Found by the explorer (seed 1016):
/// one key, two holds.
#[tokio::test]
async fn a_reserve_routed_without_the_bucket_count_makes_no_hold_in_a_split_skus_bucket_0() {
    let app = spawn_app().await;
    let sku = unique_sku("bk-unrouted");
    app.create_sku(
        &sku,
        json!({ "stock": 4, "buckets": 2, "per_user_limit": 2 }),
    )
    .await;
    let user = &homed_in(&sku, 1, 2, 1)[0];
    let (status, _) = reserve_retrying(&app, &sku, user, "k", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    let sku_id = TestApp::sku_id(&sku);
    let request = flashgate::store::ReserveRequest {
        user_id: user.clone(),
        quantity: 1,
        idempotency_key: "k".into(),
        reservation_id: flashgate::ids::IdKey::derive(JWT_SECRET).new_reservation_id(&sku_id),
    };
    let ttl = flashgate::store::ReserveSettings {
        idempotency_ttl_ms: 60_000,
        payment_grace_ms: 1_000,
        released_holds_cap: 0,
    };
    let outcome = app
        .store
        .reserve_if_unsplit(&sku_id, &request, ttl)
        .await
        .unwrap();
    assert!(outcome.is_none(), "{outcome:?}");
    assert_eq!(
        bucket_counters(&app, &sku, 2).await,
        vec![[2, 2, 0, 0], [2, 1, 1, 0]],
        "nothing held in bucket 0"
    );
    // An unsplit SKU takes it as any reserve.
    let plain = unique_sku("bk-unrouted-plain");
    app.create_sku(&plain, json!({ "stock": 1 })).await;
    let plain_id = TestApp::sku_id(&plain);
    let request = flashgate::store::ReserveRequest {
        reservation_id: flashgate::ids::IdKey::derive(JWT_SECRET).new_reservation_id(&plain_id),
        ..request
    };
    let outcome = app
        .store
        .reserve_if_unsplit(&plain_id, &request, ttl)
        .await
        .unwrap();
    assert!(
        matches!(outcome, Some(flashgate::store::ReserveOutcome::Created(_))),
        "{outcome:?}"
    );
}
