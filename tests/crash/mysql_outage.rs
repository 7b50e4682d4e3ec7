//! MariaDB stopped during a confirm storm and started again, with a real
//! `flashgate worker` process flushing: sales go on, the worker backs off and
//! retries, the backlog drains, MySQL ends equal to Redis, reconcile exits 0.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{self, body, spawn_app_with, unique_sku};
use crate::support::*;
use crate::{confirm_many, reserve_many};

const HOLDS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_outage_delays_the_flush_but_not_sales() {
    let redis = RedisServer::start(Some("always")).await;
    let mut mariadb = MariaDb::start().await;
    let app = Arc::new(spawn_app_with(common::serve_args(&redis.url(), &mariadb.url())).await);
    let sku = unique_sku("crash-mysql");
    app.create_sku(&sku, json!({ "stock": HOLDS, "per_user_limit": 1 }))
        .await;
    let rids = reserve_many(&app, &sku, "u", HOLDS).await;
    let logs = TempDir::new("mysql-outage");
    let mut worker = WorkerProc::start(&redis.url(), &mariadb.url(), logs.path(), 30_000);
    let db = flashgate::db::connect(&mariadb.url()).unwrap();
    let third = HOLDS / 3;

    // 1. A storm with MariaDB up; it is stopped while the storm runs.
    let storm = tokio::spawn(confirm_many(app.clone(), rids[..third].to_vec(), 8));
    tokio::time::sleep(Duration::from_millis(20)).await;
    mariadb.stop();
    let (ok, failed) = storm.await.unwrap();
    assert!(
        failed.is_empty(),
        "confirms refused while MariaDB stopped: {failed:?}"
    );
    assert_eq!(ok.len(), third);

    // 2. MariaDB down: sales go on.
    let (ok, failed) = confirm_many(app.clone(), rids[third..2 * third].to_vec(), 8).await;
    assert!(
        failed.is_empty(),
        "confirms refused while MariaDB down: {failed:?}"
    );
    assert_eq!(ok.len(), third);
    // /readyz reports the background check's view (at most a second old).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, ready) = body(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a MySQL outage does not make the gateway unready: {ready}"
        );
        if ready["mysql"] == "unreachable" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the worker fail and back off a few times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        worker.proc.is_running(),
        "the worker died:\n{}",
        worker.log()
    );

    // 3. MariaDB back, while the last third is confirmed.
    let storm = tokio::spawn(confirm_many(app.clone(), rids[2 * third..].to_vec(), 8));
    mariadb.restart().await;
    let (ok, failed) = storm.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(ok.len(), HOLDS - 2 * third);

    // The backlog drains by itself (the worker retries at most FLUSH_BACKOFF_MAX apart).
    let conn = redis.client().await;
    eventually(
        Duration::from_secs(30),
        "backlog drained into MariaDB",
        || {
            let db = db.clone();
            let mut conn = conn.clone();
            let sku = sku.clone();
            async move {
                let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sales WHERE sku = ?")
                    .bind(&sku)
                    .fetch_one(&db)
                    .await
                    .unwrap_or(-1);
                rows == HOLDS as i64 && outbox_unacked(&mut conn, &sku).await == (0, 0)
            }
        },
    )
    .await;
    let (_, available, held, redis_sold) = assert_equation(&app.store, &sku).await;
    assert_eq!((available, held, redis_sold), (0, 0, HOLDS as u64));
    let (rows, sum, mysql_sold) = mysql_sales(&db, &sku).await;
    assert_eq!(
        (rows, sum as u64, mysql_sold),
        (HOLDS as i64, redis_sold, redis_sold)
    );

    let run = reconcile_cli(&redis.url(), &mariadb.url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    // The events of the facts the outage held back came with them, in order.
    let events = assert_events_in_sequence(&db, &sku).await;
    assert_eq!(events.get("sku.sold_out"), Some(&1), "{events:?}");

    let log = worker.log();
    assert!(
        log.contains("flush failed"),
        "no failed flush logged:\n{log}"
    );
    assert!(log.contains("retry_in"), "no backoff logged:\n{log}");
    assert!(
        log.contains("flush recovered"),
        "no recovery logged:\n{log}"
    );
    assert!(worker.proc.is_running(), "the worker died:\n{log}");
    worker.proc.terminate(Duration::from_secs(10));
}
