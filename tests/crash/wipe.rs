//! Redis wiped (FLUSHALL) after sales were flushed: `flashgate reconcile --repair`
//! rebuilds the SKU from MySQL, and no unit is sold twice afterwards.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{self, spawn_app_with, unique_sku};
use crate::support::*;
use crate::{confirm_many, reserve_many};

const STOCK: usize = 20;
const SOLD: usize = 7;
const HELD: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_then_reconcile_repair_restores_the_sku_from_mysql() {
    let redis = RedisServer::start(None).await;
    let app =
        Arc::new(spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await);
    let db = shared_db().await;
    let sku = unique_sku("crash-wipe");
    app.create_sku(&sku, json!({ "stock": STOCK, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "buyer", SOLD + HELD).await;
    let (ok, failed) = confirm_many(app.clone(), rids[..SOLD].to_vec(), 4).await;
    assert!(failed.is_empty() && ok.len() == SOLD);
    app.flush(&sku).await;
    assert_eq!(
        mysql_sales(&db, &sku).await,
        (SOLD as i64, SOLD as i64, SOLD as u64)
    );

    let mut conn = redis.client().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let (status, _) = app.reserve(&sku, "late", "k", 1).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the SKU is gone from Redis");

    // Without --repair: found, reported, nothing changed.
    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("redis_state_missing"), "{}", run.stdout);
    assert!(run.stdout.contains("not repaired"), "{}", run.stdout);

    let run = reconcile_cli(
        &redis.url(),
        &common::database_url(),
        &["--repair", "--sku", &sku],
    )
    .await;
    assert_eq!(
        run.code, 1,
        "drift found (and repaired): {}{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("redis_state_missing"), "{}", run.stdout);
    // The finding's row says it was repaired (the table's RESULT column).
    let row = run
        .stdout
        .lines()
        .find(|l| l.contains("redis_state_missing"))
        .unwrap_or_default();
    assert!(
        row.contains(" repaired ") && !row.contains("not repaired"),
        "{}",
        run.stdout
    );

    // MySQL won: what it sold stays sold; the lost holds are gone.
    let (total, available, held, sold) = assert_equation(&app.store, &sku).await;
    assert_eq!(
        (total, available, held, sold),
        (STOCK as u64, (STOCK - SOLD) as u64, 0, SOLD as u64)
    );
    // Buyers keep their per-user usage: one who bought cannot buy again.
    let (status, view) = app.reserve(&sku, "buyer-0", "again", 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "{view}");
    assert_eq!(view["code"], "limit_exceeded", "{view}");
    // Reserving everything left gives exactly stock_total - sold holds.
    let fresh = reserve_many(&app, &sku, "fresh", STOCK - SOLD).await;
    let (status, view) = app.reserve(&sku, "one-too-many", "k", 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "{view}");
    assert_eq!(view["code"], "sold_out", "{view}");
    // Selling them all: MySQL ends at exactly stock_total, nothing sold twice.
    let (ok, failed) = confirm_many(app.clone(), fresh, 4).await;
    assert!(failed.is_empty() && ok.len() == STOCK - SOLD, "{failed:?}");
    app.flush(&sku).await;
    assert_eq!(
        mysql_sales(&db, &sku).await,
        (STOCK as i64, STOCK as i64, STOCK as u64)
    );
    let (_, available, held, sold) = assert_equation(&app.store, &sku).await;
    assert_eq!((available, held, sold), (0, 0, STOCK as u64));

    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(
        run.code, 0,
        "a second pass finds nothing: {}{}",
        run.stdout, run.stderr
    );

    // The audit trail: the finding without repair, then with it, before/after values.
    let audit: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT finding, before_value, after_value, repaired FROM reconcile_audit
         WHERE sku = ? ORDER BY id",
    )
    .bind(&sku)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0].0, "redis_state_missing");
    assert!(!audit[0].3 && audit[0].2.is_none(), "{audit:?}");
    assert_eq!(audit[1].0, "redis_state_missing");
    assert_eq!(audit[1].1, "missing");
    assert!(audit[1].3, "{audit:?}");
    assert_eq!(
        audit[1].2.as_deref(),
        Some(
            format!(
                "stock_total={STOCK} available={} held=0 sold={SOLD}",
                STOCK - SOLD
            )
            .as_str()
        )
    );
}
