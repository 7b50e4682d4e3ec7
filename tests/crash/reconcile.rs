//! The reconciler: each finding it can make, provoked by hand, found, repaired (or
//! rightly not), audited; its exit codes from the real binary; and no false positive
//! while confirms, flushes and cancels run under it.
//!
//! A private Redis per test (the shared one's SKUs are swept and flushed by other
//! tests, which would race with hand-made corruption); the shared MariaDB with
//! unique SKUs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashgate::ids::SkuId;
use flashgate::reconcile::{self, ReconcileReport};
use flashgate::reservation::SkuDefinition;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{self, spawn_app_with, unique_sku, TestApp, SERVICE_TOKEN};
use crate::support::*;
use crate::{confirm_many, reserve_many};

fn id(sku: &str) -> SkuId {
    SkuId::parse(sku).unwrap()
}

async fn pass(app: &TestApp, sku: &str, repair: bool) -> ReconcileReport {
    reconcile::run(&app.store, &app.db, Some(&id(sku)), repair)
        .await
        .expect("reconcile runs")
}

fn kinds(report: &ReconcileReport) -> Vec<&'static str> {
    report.findings.iter().map(|f| f.kind).collect()
}

/// A SKU with 10 units: 3 sold (flushed), 2 held.
async fn sku_with_sales(app: &Arc<TestApp>, tag: &str) -> (String, Vec<String>) {
    let sku = unique_sku(tag);
    app.create_sku(&sku, json!({ "stock": 10, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(app, &sku, "u", 5).await;
    let (ok, _) = confirm_many(app.clone(), rids[..3].to_vec(), 3).await;
    assert_eq!(ok.len(), 3);
    app.flush(&sku).await;
    (sku, rids[3..].to_vec())
}

async fn hincrby(conn: &mut MultiplexedConnection, sku: &str, pairs: &[(&str, i64)]) {
    for (field, by) in pairs {
        let _: i64 = conn
            .hincr(format!("fg:{{{sku}}}:meta"), *field, *by)
            .await
            .unwrap();
    }
}

/// Finds exactly `kind` without repair (twice: a check changes nothing), repairs it,
/// and finds nothing afterwards; the equation holds and the audit has the rows.
async fn found_then_repaired(app: &TestApp, sku: &str, kind: &str) -> ReconcileReport {
    for _ in 0..2 {
        let report = pass(app, sku, false).await;
        assert_eq!(kinds(&report), vec![kind], "{:?}", report.findings);
        assert_eq!(report.exit_code(), 1);
        assert!(!report.findings[0].repaired);
    }
    let report = pass(app, sku, true).await;
    assert_eq!(kinds(&report), vec![kind], "{:?}", report.findings);
    assert_eq!(report.exit_code(), 1, "drift found, even if repaired");
    assert!(report.findings[0].repaired, "{:?}", report.findings);
    let after = pass(app, sku, false).await;
    assert!(
        after.findings.is_empty(),
        "after repair: {:?}",
        after.findings
    );
    assert_eq!(after.exit_code(), 0);
    assert_equation(&app.store, sku).await;
    let audited: Vec<(String, bool)> =
        sqlx::query_as("SELECT finding, repaired FROM reconcile_audit WHERE sku = ? ORDER BY id")
            .bind(sku)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        audited,
        vec![
            (kind.to_string(), false),
            (kind.to_string(), false),
            (kind.to_string(), true)
        ]
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_finding_is_detected_repaired_and_audited() {
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    shared_db().await;
    let mut conn = redis.client().await;

    // Clean: nothing to say.
    let (clean, _) = sku_with_sales(&app, "rec-clean").await;
    let report = pass(&app, &clean, true).await;
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.exit_code(), 0);

    // The Redis equation broken.
    let (sku, _) = sku_with_sales(&app, "rec-eq").await;
    hincrby(&mut conn, &sku, &[("available", 3)]).await;
    let report = found_then_repaired(&app, &sku, "equation_broken").await;
    assert_eq!(
        report.findings[0].before,
        "stock_total=10 available=8 held=2 sold=3"
    );
    assert_eq!(
        report.findings[0].after.as_deref(),
        Some("stock_total=10 available=5 held=2 sold=3")
    );

    // The held counter off from the live holds (the equation still holds).
    let (sku, _) = sku_with_sales(&app, "rec-held").await;
    hincrby(&mut conn, &sku, &[("held", 2), ("available", -2)]).await;
    found_then_repaired(&app, &sku, "held_mismatch").await;
    assert_eq!(counters(&app.store, &sku).await, (10, 5, 2, 3));

    // A ghost hold: long past its deadline and still counted (no sweeper ran).
    let (sku, holds) = sku_with_sales(&app, "rec-ghost").await;
    let past: i64 = chrono::Utc::now().timestamp_millis() - 60_000;
    let rkey = format!("fg:{{{sku}}}:r:{}", holds[0]);
    let _: () = conn.hset(&rkey, "expires_at", past).await.unwrap();
    let _: () = conn
        .zadd(format!("fg:{{{sku}}}:deadlines"), &holds[0], past)
        .await
        .unwrap();
    found_then_repaired(&app, &sku, "ghost_holds").await;
    assert_eq!(
        counters(&app.store, &sku).await,
        (10, 6, 1, 3),
        "its unit is back"
    );
    let (status, view) = app.reservation(&holds[0], SERVICE_TOKEN).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("expired"))
    );

    // Redis lost confirmations MySQL has (e.g. AOF everysec): sold behind MySQL.
    let (sku, _) = sku_with_sales(&app, "rec-behind").await;
    hincrby(&mut conn, &sku, &[("sold", -2), ("available", 2)]).await;
    found_then_repaired(&app, &sku, "sold_behind_mysql").await;
    assert_eq!(
        counters(&app.store, &sku).await,
        (10, 5, 2, 3),
        "MySQL wins"
    );

    // Redis sold ahead of MySQL + outbox: reported, never "repaired" by selling again.
    let (sku, _) = sku_with_sales(&app, "rec-ahead").await;
    hincrby(&mut conn, &sku, &[("sold", 1), ("available", -1)]).await;
    for repair in [false, true, true] {
        let report = pass(&app, &sku, repair).await;
        assert_eq!(kinds(&report), vec!["sold_ahead_of_mysql"]);
        assert!(!report.findings[0].repaired);
        assert_eq!(report.exit_code(), 1);
    }
    assert_eq!(
        counters(&app.store, &sku).await,
        (10, 4, 2, 4),
        "sold never lowered"
    );

    // stock_total differs from MySQL (the source of truth for it).
    let (sku, _) = sku_with_sales(&app, "rec-stock").await;
    hincrby(&mut conn, &sku, &[("stock_total", 5), ("available", 5)]).await;
    found_then_repaired(&app, &sku, "stock_total_mismatch").await;
    assert_eq!(counters(&app.store, &sku).await, (10, 5, 2, 3));

    // MySQL's derived skus.sold off from its own sales rows.
    let (sku, _) = sku_with_sales(&app, "rec-mysql").await;
    sqlx::query("UPDATE skus SET sold = sold + 2 WHERE sku = ?")
        .bind(&sku)
        .execute(&app.db)
        .await
        .unwrap();
    found_then_repaired(&app, &sku, "mysql_sold_mismatch").await;
    assert_eq!(mysql_sales(&app.db, &sku).await, (3, 3, 3));

    // Redis lost one SKU's state (not a FLUSHALL: the other keys stay).
    let (sku, _) = sku_with_sales(&app, "rec-missing").await;
    let _: () = conn.del(format!("fg:{{{sku}}}:meta")).await.unwrap();
    found_then_repaired(&app, &sku, "redis_state_missing").await;
    assert_eq!(
        counters(&app.store, &sku).await,
        (10, 5, 2, 3),
        "sold from MySQL, and the holds that survived still counted"
    );

    // A SKU only Redis knows: reported, not repaired (nothing to rebuild it from).
    let orphan = unique_sku("rec-orphan");
    let definition = SkuDefinition {
        stock_total: 4,
        per_user_limit: 1,
        hold_seconds: 600,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets: 1,
        paused: false,
        waiting_room: None,
    };
    app.store
        .load_sku(&id(&orphan), &definition, 0)
        .await
        .unwrap();
    let report = pass(&app, &orphan, true).await;
    assert_eq!(kinds(&report), vec!["mysql_record_missing"]);
    assert!(!report.findings[0].repaired);

    // Several at once, all repaired in one pass.
    let (sku, _) = sku_with_sales(&app, "rec-many").await;
    hincrby(
        &mut conn,
        &sku,
        &[("available", 1), ("held", 1), ("sold", -1)],
    )
    .await;
    let report = pass(&app, &sku, true).await;
    let mut found = kinds(&report);
    found.sort();
    assert_eq!(
        found,
        vec!["equation_broken", "held_mismatch", "sold_behind_mysql"]
    );
    assert!(report.findings.iter().all(|f| f.repaired));
    assert!(pass(&app, &sku, false).await.findings.is_empty());
    assert_eq!(counters(&app.store, &sku).await, (10, 5, 2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exit_codes_are_0_1_and_2() {
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    shared_db().await;
    let db_url = common::database_url();
    let (sku, _) = sku_with_sales(&app, "rec-cli").await;

    let run = reconcile_cli(&redis.url(), &db_url, &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("checked 1 SKU: no drift"),
        "{}",
        run.stdout
    );

    let mut conn = redis.client().await;
    hincrby(&mut conn, &sku, &[("available", 1)]).await;
    let run = reconcile_cli(&redis.url(), &db_url, &["--sku", &sku]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("equation_broken"), "{}", run.stdout);
    let run = reconcile_cli(&redis.url(), &db_url, &["--sku", &sku, "--repair"]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let run = reconcile_cli(&redis.url(), &db_url, &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // 2: could not run. Redis unreachable (nothing listens there) ...
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let run = reconcile_cli(&nowhere, &db_url, &["--sku", &sku]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    // ... MySQL unreachable ...
    let no_db = format!("mysql://root@127.0.0.1:{}/flashgate", free_port());
    let run = reconcile_cli(&redis.url(), &no_db, &["--sku", &sku]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    // ... Redis hung (accepts connections, never answers): 2 as well, not a hang.
    redis.pause();
    let started = std::time::Instant::now();
    let run = reconcile_cli(&redis.url(), &db_url, &["--sku", &sku]).await;
    redis.resume();
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(started.elapsed() < Duration::from_secs(15));
    // ... or a bad argument.
    let run = reconcile_cli(&redis.url(), &db_url, &["--sku", "not a sku!"]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
}

/// The reconciler compares a Redis snapshot with MySQL while confirms, flushes and
/// cancels run: it must never take the race for drift (a false `sold_behind_mysql`
/// repaired would take units off sale; a false `sold_ahead_of_mysql` pages someone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_false_drift_while_confirms_and_flushes_run() {
    const HOLDS: usize = 600;
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    shared_db().await;
    let sku = unique_sku("rec-race");
    app.create_sku(&sku, json!({ "stock": HOLDS + 100, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", HOLDS).await;
    let done = Arc::new(AtomicBool::new(false));

    let storm = {
        let app = app.clone();
        let done = done.clone();
        let rids = rids.clone();
        let sku = sku.clone();
        tokio::spawn(async move {
            // Most confirmed, some cancelled, new holds meanwhile.
            let (to_confirm, to_cancel) = rids.split_at(HOLDS * 5 / 6);
            let cancels = {
                let app = app.clone();
                let to_cancel = to_cancel.to_vec();
                async move {
                    for rid in to_cancel {
                        let (status, _) = app.cancel(&rid, SERVICE_TOKEN).await;
                        assert_eq!(status, StatusCode::OK);
                    }
                }
            };
            let (confirmed, _, _) = tokio::join!(
                confirm_many(app.clone(), to_confirm.to_vec(), 8),
                cancels,
                reserve_many(&app, &sku, "late", 50),
            );
            done.store(true, Ordering::SeqCst);
            confirmed
        })
    };
    let flusher = {
        let app = app.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                app.worker.flush_once().await.unwrap();
            }
        })
    };
    let mut passes = 0;
    while !done.load(Ordering::SeqCst) {
        let report = pass(&app, &sku, false).await;
        assert!(
            report.findings.is_empty(),
            "false drift while sales run: {:?}",
            report.findings
        );
        passes += 1;
    }
    let (ok, failed) = storm.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    flusher.await.unwrap();
    app.flush(&sku).await;
    let report = pass(&app, &sku, false).await;
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert!(passes >= 3, "only {passes} passes ran during the storm");
    let (rows, _, sold) = mysql_sales(&app.db, &sku).await;
    assert_eq!((rows as usize, sold as usize), (ok.len(), ok.len()));
}

/// A SKU with more holds and users than one slice reads, checked while reserves,
/// cancels, confirms and flushes run: no false drift, and a real drift injected while
/// they run is found exactly (its size, nothing else) and repaired by correction.
#[tokio::test]
async fn a_sliced_check_is_exact_while_the_sale_runs() {
    const HOLDS: usize = 1_200;
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    shared_db().await;
    let sku = unique_sku("rec-slices");
    app.create_sku(&sku, json!({ "stock": 3 * HOLDS, "per_user_limit": 2 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", HOLDS).await;
    const { assert!(HOLDS > 3 * reconcile::SLICE) };

    // Storm: new holds (the check's creation log), cancels and confirms (outbox
    // entries after its instant), flushes; checks without repair run under it.
    let storm = |round: usize, cancel: Vec<String>, confirm: Vec<String>| {
        let app = app.clone();
        let sku = sku.clone();
        tokio::spawn(async move {
            let cancels = {
                let app = app.clone();
                async move {
                    for rid in cancel {
                        let (status, _) = app.cancel(&rid, SERVICE_TOKEN).await;
                        assert_eq!(status, StatusCode::OK);
                    }
                }
            };
            let prefix = format!("late{round}");
            let (confirmed, _, _) = tokio::join!(
                confirm_many(app.clone(), confirm, 4),
                cancels,
                reserve_many(&app, &sku, &prefix, 300),
            );
            assert!(confirmed.1.is_empty(), "{:?}", confirmed.1);
        })
    };
    let checks_while = |task: &tokio::task::JoinHandle<()>| task.is_finished();

    let first = storm(1, rids[..200].to_vec(), rids[200..400].to_vec());
    let mut passes = 0;
    while !checks_while(&first) {
        app.worker.flush_once().await.unwrap();
        let report = pass(&app, &sku, false).await;
        assert!(
            report.findings.is_empty(),
            "false drift: {:?}",
            report.findings
        );
        passes += 1;
    }
    first.await.unwrap();
    assert!(passes >= 2, "only {passes} checks ran during the storm");

    // Drift made by hand: two units counted as held that no hold has (the equation
    // still adds up), and one unit too many in a user's usage.
    let mut conn = redis.client().await;
    hincrby(&mut conn, &sku, &[("held", 2), ("available", -2)]).await;
    // (The units are the first field of a usage record, lua/lib.lua.)
    let _: () = redis::Script::new(
        "local r = redis.call('HGET', KEYS[1], ARGV[1])
         local units, rest = string.match(r, '^(%d+)(.*)$')
         redis.call('HSET', KEYS[1], ARGV[1], (tonumber(units) + 1) .. rest)",
    )
    .key(format!("fg:{{{sku}}}:used"))
    .arg("u-900")
    .invoke_async(&mut conn)
    .await
    .unwrap();
    let second = storm(2, rids[400..500].to_vec(), rids[500..600].to_vec());
    let report = pass(&app, &sku, false).await;
    assert_eq!(
        kinds(&report),
        ["held_mismatch", "used_mismatch"],
        "{report:?}"
    );
    let held = &report.findings[0].detail;
    let numbers: Vec<i64> = held
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(numbers[0] - numbers[1], 2, "{held}");
    assert!(
        report.findings[1]
            .detail
            .contains("\"u-900\": 2 should be 1"),
        "{report:?}"
    );
    let repaired = pass(&app, &sku, true).await;
    assert_eq!(kinds(&repaired), ["held_mismatch", "used_mismatch"]);
    assert!(repaired.findings.iter().all(|f| f.repaired));
    while !second.is_finished() {
        let report = pass(&app, &sku, false).await;
        assert!(
            report.findings.is_empty(),
            "after the repair: {:?}",
            report.findings
        );
    }
    second.await.unwrap();
    app.flush(&sku).await;
    let report = pass(&app, &sku, false).await;
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    let view = app.assert_stock_adds_up(&sku).await;
    // 1,200 + 600 holds made, 300 cancelled, 300 sold.
    assert_eq!(
        (view["held"].as_u64(), view["sold"].as_u64()),
        (Some(1_200), Some(300))
    );
}

/// Two checks of one SKU at once (the worker's schedule and a cron run meet): they
/// take turns (the creation log is the SKU's), and neither reports false drift or an
/// incomplete check, while reserves go on.
#[tokio::test]
async fn two_checks_of_one_sku_at_once_take_turns() {
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    shared_db().await;
    let sku = unique_sku("rec-twice");
    app.create_sku(&sku, json!({ "stock": 5_000, "per_user_limit": 1 }))
        .await;
    reserve_many(&app, &sku, "u", 1_500).await;
    for round in 0..3 {
        let prefix = format!("more{round}");
        let (a, b, _) = tokio::join!(
            pass(&app, &sku, false),
            pass(&app, &sku, false),
            reserve_many(&app, &sku, &prefix, 200),
        );
        assert!(a.findings.is_empty(), "{:?}", a.findings);
        assert!(b.findings.is_empty(), "{:?}", b.findings);
    }
}
