//! The money trail when Redis forgets (issue 9): a real rollback of Redis to a copy of
//! its data taken before a confirmation, and a Redis too slow to answer a confirm.

use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{self, spawn_app_with, unique_sku, TestApp};
use crate::support::*;

/// Copies a stopped Redis's data directory (AOF and all) to `to`.
fn copy_data(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Puts a stopped Redis's data directory back to the copy.
fn restore_data(copy: &Path, to: &Path) {
    for entry in std::fs::read_dir(to).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else if path.file_name().is_some_and(|n| n != "redis.log") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    copy_data(copy, to);
}

/// A call retried while the gateway's connection to a restarted Redis comes back.
async fn confirm_when_up(
    app: &TestApp,
    rid: &str,
    payment_ref: &str,
) -> (StatusCode, serde_json::Value) {
    for _ in 0..50 {
        let (status, view) = app.confirm(rid, payment_ref).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            return (status, view);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Redis did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_payment_after_a_redis_rollback_becomes_a_compensation() {
    let mut redis = RedisServer::start(Some("always")).await;
    let app = spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    let sku = unique_sku("rollback");
    app.create_sku(&sku, json!({ "stock": 3 })).await;
    let rid = app.hold(&sku, "payer").await;

    // The copy of Redis before the confirmation: what a failover without WAIT, or a
    // crash with `appendfsync everysec`, can roll back to.
    let before = TempDir::new("rollback-copy");
    redis.stop();
    copy_data(redis.dir(), before.path());
    redis.restart().await;

    let (status, view) = confirm_when_up(&app, &rid, "pay-1").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);

    // The rollback: Redis forgets the confirmation MySQL already has.
    redis.stop();
    restore_data(before.path(), redis.dir());
    redis.restart().await;
    let (status, view) = confirm_when_up(&app, &rid, "pay-2").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Redis sees a live hold again: {view}"
    );
    // Read before the flush, which drops the hash once MySQL has the end.
    let event = flashgate::db::OutboxEvent::Confirmed {
        reservation: app
            .store
            .reservation(&TestApp::sku_id(&sku), &rid)
            .await
            .unwrap(),
        at_ms: 1,
        key: None,
    };
    app.flush(&sku).await;
    // Replayed event (a worker that dies before its XACK): still one compensation.
    flashgate::db::apply_events(&app.db, &[event.clone(), event])
        .await
        .unwrap();

    // MySQL keeps the first sale, and the second payment is a refund to make.
    let (payment_ref, sold): (String, u64) = sqlx::query_as(
        "SELECT s.payment_ref, k.sold FROM sales s JOIN skus k ON k.sku = s.sku WHERE s.reservation_id = ?",
    )
    .bind(&rid)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((payment_ref.as_str(), sold), ("pay-1", 1));
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(comps.len(), 1, "{comps:?}");
    assert_eq!(comps[0]["reason"], "duplicate_payment");
    assert_eq!(comps[0]["payment_ref"], "pay-2");
    assert_eq!(comps[0]["status"], "open");
    assert_eq!(
        comps[0]["id"],
        flashgate::ids::compensation_id(&rid, "pay-2"),
        "the id derives from (reservation, payment_ref)"
    );

    // The reconciler reports it (exit 1) until an operator resolves the refund.
    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("payment_after_rollback"),
        "{}",
        run.stdout
    );
    let id = comps[0]["id"].as_str().unwrap();
    let resolved = app
        .client
        .post(app.url(&format!("/v1/compensations/{id}/resolve")))
        .bearer_auth(common::SERVICE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), StatusCode::OK);
    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

/// A hold made while the gateway's connection to a restarted Redis comes back.
async fn hold_when_up(app: &TestApp, sku: &str, user: &str) -> String {
    for _ in 0..50 {
        let (status, value) = app.reserve(sku, user, &format!("key-{user}"), 1).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(status, StatusCode::CREATED, "{value}");
            return value["reservation_id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Redis did not come back");
}

/// A SKU of `terms` on a Redis (AOF always) that sold one unit to "first", flushed to
/// MySQL, and then went back to a copy of its data taken before that sale: Redis has
/// forgotten the sale MySQL records, and its unit is available again.
async fn sold_then_rolled_back(
    prefix: &str,
    terms: serde_json::Value,
) -> (RedisServer, TestApp, String, String) {
    let mut redis = RedisServer::start(Some("always")).await;
    let app = spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    let sku = unique_sku(prefix);
    app.create_sku(&sku, terms).await;
    let before = TempDir::new(&format!("{prefix}-copy"));
    redis.stop();
    copy_data(redis.dir(), before.path());
    redis.restart().await;
    let first = hold_when_up(&app, &sku, "first").await;
    assert_eq!(app.confirm(&first, "pay-1").await.0, StatusCode::OK);
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    redis.stop();
    restore_data(before.path(), redis.dir());
    redis.restart().await;
    (redis, app, sku, first)
}

/// Issue 21, found by the explorer's rollback fault (`scripts/dev explore --rollback`,
/// seed 13): a unit sold and flushed after the copy Redis goes back to is `available`
/// again in Redis, and Redis sells it again (MySQL is not on the reserve path). The
/// flush refuses that second sale: MySQL already records the whole stock as sold, so
/// its reservation is recorded `cancelled` and its payment becomes a compensation,
/// never a second sale (invariants 2 and 5). Neither a repair before that flush nor an
/// operator's PUT may push the stock below what MySQL records as sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_sold_before_a_redis_rollback_is_not_sold_again() {
    let (redis, app, sku, first) = sold_then_rolled_back("resold", json!({ "stock": 1 })).await;
    // Redis (sold 0) would take a stock of 0; MySQL records 1 sold.
    let mut put = (StatusCode::SERVICE_UNAVAILABLE, json!(null));
    for _ in 0..50 {
        put = app.put_sku(&sku, json!({ "stock": 0 })).await;
        if put.0 != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(put.0, StatusCode::CONFLICT, "{}", put.1);
    assert_eq!(put.1["code"], "stock_below_committed", "{}", put.1);

    let second = hold_when_up(&app, &sku, "second").await;
    let (status, view) = confirm_when_up(&app, &second, "pay-2").await;
    assert_eq!(status, StatusCode::OK, "Redis took the payment: {view}");
    // A repair before the flush counts MySQL's sale, not the one it will refuse.
    let run = reconcile_cli(
        &redis.url(),
        &common::database_url(),
        &["--sku", &sku, "--repair"],
    )
    .await;
    assert!(
        run.stdout.contains("checked 1 SKU") && run.stdout.contains("0 need attention"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert!(!run.stdout.contains("overcommitted"), "{}", run.stdout);
    let sku_id = TestApp::sku_id(&sku);
    let view = app.store.sku(&sku_id).await.unwrap();
    assert_eq!(
        (view.stock_total, view.available, view.held, view.sold),
        (1, 0, 0, 1),
        "{}",
        run.stdout
    );
    app.flush(&sku).await;
    app.flush(&sku).await; // a second flush of the same outbox changes nothing

    let sold: u64 = sqlx::query_scalar("SELECT sold FROM skus WHERE sku = ?")
        .bind(&sku)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(sold, 1, "MySQL records {sold} sold of a stock of 1");
    let sales: Vec<(String, String)> =
        sqlx::query_as("SELECT reservation_id, payment_ref FROM sales WHERE sku = ?")
            .bind(&sku)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(sales, vec![(first.clone(), "pay-1".to_owned())]);
    // The second payment is followed: one compensation, in the list of refunds owed.
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(comps.len(), 1, "{comps:?}");
    assert_eq!(comps[0]["reason"], "cancelled", "{comps:?}");
    assert_eq!(comps[0]["reservation_id"], second.as_str());
    assert_eq!(comps[0]["payment_ref"], "pay-2");
    assert_eq!(comps[0]["user_id"], "second");
    assert_eq!(comps[0]["quantity"], 1);
    assert_eq!(
        comps[0]["id"],
        flashgate::ids::compensation_id(&second, "pay-2")
    );
    // MySQL's record of that reservation is not a sale.
    let status: String =
        sqlx::query_scalar("SELECT status FROM reservations WHERE reservation_id = ?")
            .bind(&second)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(status, "cancelled");
    // Its events say what MySQL records: cancelled, and a refund owed.
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT type FROM events WHERE sku = ? AND data LIKE ? ORDER BY sequence",
    )
    .bind(&sku)
    .bind(format!("%{second}%"))
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        vec!["reservation.cancelled", "compensation.created"],
        "{kinds:?}"
    );

    // The reconciler reports the refund (exit 1) until an operator resolves it; Redis
    // (sold 1: the second sale) and MySQL (sold 1: the first) agree on the counts.
    let run = reconcile_cli(&redis.url(), &common::database_url(), &["--sku", &sku]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("payment_after_rollback"),
        "{}",
        run.stdout
    );
    for kind in ["sold_behind_mysql", "sold_ahead_of_mysql", "overcommitted"] {
        assert!(!run.stdout.contains(kind), "{}", run.stdout);
    }
}

/// A refused sale of more units than the rollback freed (2 for 1): Redis counts 2 sold
/// where MySQL records 1, and the refused 2 as cancelled. The repair does not give the
/// units back (a buyer of them could be refused and refunded again): it reports
/// `sold_ahead_of_mysql`, and the unit MySQL has not sold stays unsold, never oversold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sale_of_more_units_than_were_freed_is_not_resold() {
    let (redis, app, sku, _) =
        sold_then_rolled_back("refused-more", json!({ "stock": 2, "per_user_limit": 2 })).await;
    let mut two = json!(null);
    for _ in 0..50 {
        let (status, value) = app.reserve(&sku, "second", "key-second", 2).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(status, StatusCode::CREATED, "{value}");
            two = value;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = two["reservation_id"].as_str().unwrap().to_owned();
    assert_eq!(
        confirm_when_up(&app, &second, "pay-2").await.0,
        StatusCode::OK
    );
    app.flush(&sku).await;
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(comps.len(), 1, "{comps:?}");
    assert_eq!(
        (comps[0]["reason"].as_str(), comps[0]["quantity"].as_u64()),
        (Some("cancelled"), Some(2))
    );

    let run = reconcile_cli(
        &redis.url(),
        &common::database_url(),
        &["--sku", &sku, "--repair"],
    )
    .await;
    assert!(
        run.stdout.contains("sold_ahead_of_mysql"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let view = app.store.sku(&TestApp::sku_id(&sku)).await.unwrap();
    assert_eq!(
        (view.stock_total, view.available, view.held, view.sold),
        (2, 0, 0, 2),
        "{}",
        run.stdout
    );
    let (status, refused) = app.reserve(&sku, "third", "key-third", 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_timed_out_says_its_outcome_is_unknown() {
    let redis = RedisServer::start(None).await;
    let app = spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    let sku = unique_sku("slow-redis");
    app.create_sku(&sku, json!({ "stock": 1 })).await;
    let rid = app.hold(&sku, "payer").await;

    // Redis stops answering for longer than the gateway waits (2 s): the confirm is
    // sent, and runs once Redis resumes.
    redis.pause();
    let confirm = app.confirm(&rid, "pay-1");
    let resume = async {
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        redis.resume();
    };
    let ((status, problem), ()) = tokio::join!(confirm, resume);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(problem["code"], "unavailable");
    assert_eq!(problem["outcome"], "unknown", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.contains("nothing was changed"), "{detail}");
    assert!(detail.contains("retry"), "{detail}");

    // It did run: the retry with the same payment_ref tells so.
    let (status, view) = app.confirm(&rid, "pay-1").await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("confirmed")),
        "{view}"
    );

    // Redis gone altogether. The call that finds the connection dropped cannot know
    // whether its command left first ("unknown"); once reconnecting is refused,
    // nothing can have been sent ("not_applied").
    drop(redis);
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let (status, problem) = app.confirm(&rid, "pay-1").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        let outcome = problem["outcome"].as_str().unwrap().to_owned();
        assert!(
            outcome == "unknown" || outcome == "not_applied",
            "{problem}"
        );
        outcomes.push(outcome);
        if outcomes.last().unwrap() == "not_applied" {
            break;
        }
    }
    assert_eq!(outcomes.last().unwrap(), "not_applied", "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_write_redis_cannot_take_is_not_recorded_in_mysql() {
    let mut redis = RedisServer::start(None).await;
    let app = spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    let sku = unique_sku("admin-order");
    app.create_sku(&sku, json!({ "stock": 5, "per_user_limit": 2 }))
        .await;
    redis.kill();
    let (status, problem) = app
        .put_sku(&sku, json!({ "stock": 9, "per_user_limit": 7 }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    let (stock, limit): (u64, u32) =
        sqlx::query_as("SELECT stock_total, per_user_limit FROM skus WHERE sku = ?")
            .bind(&sku)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        (stock, limit),
        (5, 2),
        "MySQL keeps the terms Redis sells under"
    );
}

/// An answer until Redis is back: `call` again while it answers 503 (a restart).
async fn when_up<F, Fut>(mut call: F) -> (StatusCode, serde_json::Value)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (StatusCode, serde_json::Value)>,
{
    for _ in 0..50 {
        let answer = call().await;
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Redis did not come back");
}

/// One payment, one outcome, through Redis: a unit sold and flushed, then Redis goes
/// back to a copy taken while it was only held; the hold is cancelled there and a retry
/// of the same payment is refused with a refund. MySQL records that payment as the
/// sale, so the flush records the refund resolved, no refund due (the 409's
/// compensation id still reads): never a sale and an open refund for one payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_redis_gives_after_a_rollback_for_a_recorded_sale_is_no_refund_due() {
    let mut redis = RedisServer::start(Some("always")).await;
    let app = spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    let sku = unique_sku("no-refund-due");
    app.create_sku(&sku, json!({ "stock": 1 })).await;
    let rid = hold_when_up(&app, &sku, "first").await;
    let held = TempDir::new("no-refund-due-copy");
    redis.stop();
    copy_data(redis.dir(), held.path());
    redis.restart().await;
    let (status, _) = when_up(|| app.confirm(&rid, "pay-1")).await;
    assert_eq!(status, StatusCode::OK);
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    redis.stop();
    restore_data(held.path(), redis.dir());
    redis.restart().await;
    // Held again in Redis: cancelled there, then the payment's retry is refused.
    let (status, _) = when_up(|| app.cancel(&rid, common::SERVICE_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, problem) = when_up(|| app.confirm(&rid, "pay-1")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let id = problem["compensation_id"].as_str().unwrap().to_owned();
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, 1);
    let comps = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(comps.len(), 1, "{comps:?}");
    assert_eq!(comps[0]["id"], id.as_str());
    assert_eq!(comps[0]["status"], "resolved", "{comps:?}");
    assert_eq!(comps[0]["note"], flashgate::db::NO_REFUND_DUE);
    // The feed tells it once: created, then resolved (a flush of the same batch again
    // adds nothing).
    app.flush(&sku).await;
    let (status, feed) = common::body(
        app.client
            .get(app.url(&format!(
                "/v1/events?sku={sku}&types=compensation.created,compensation.resolved&limit=100"
            )))
            .bearer_auth(common::SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{feed}");
    let told: Vec<(&str, &str)> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["data"]["id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        told,
        [
            ("compensation.created", id.as_str()),
            ("compensation.resolved", id.as_str())
        ],
        "{feed}"
    );
    drop(redis);
}
