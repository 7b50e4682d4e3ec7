//! The state rules, each pinned by a fixed test at a chosen millisecond (the scripts
//! run with lib.lua's clock replaced by `store::script_with_clock`), so that no rule
//! depends on a random seed of the property test.

#[path = "common/mod.rs"]
mod common;

use flashgate::ids::{self, SkuId};
use flashgate::keys::SkuKeys;
use flashgate::reservation::SkuDefinition;
use flashgate::store::{
    script_with_clock, with_sale_keys, ReserveOutcome, ReserveRequest, ReserveSettings, Store,
};
use redis::aio::ConnectionLike;

const GRACE_MS: u64 = 1;

struct Sale {
    store: Store,
    sku: SkuId,
    keys: SkuKeys,
}

impl Sale {
    async fn new(prefix: &str, per_user_limit: u64) -> Sale {
        let args = common::serve_args(&common::redis_url(), "");
        let store = Store::new(flashgate::store::connect(&args.redis).await.unwrap());
        let sku = SkuId::parse(&common::unique_sku(prefix)).unwrap();
        let definition = SkuDefinition {
            stock_total: 10,
            per_user_limit,
            hold_seconds: 60,
            starts_at_ms: None,
            ends_at_ms: None,
        };
        store.load_sku(&sku, &definition, 0).await.unwrap();
        let keys = SkuKeys::new(&sku);
        Sale { store, sku, keys }
    }

    /// A hold (real clock); returns (rid, expires_at ms).
    async fn hold(&self, user: &str, key: &str, quantity: u64) -> (String, i64) {
        let request = ReserveRequest {
            user_id: user.into(),
            quantity,
            idempotency_key: key.into(),
            reservation_id: ids::IdKey::derive(common::JWT_SECRET).new_reservation_id(&self.sku),
        };
        let ttl = ReserveSettings {
            idempotency_ttl_ms: 1_000,
            payment_grace_ms: GRACE_MS,
            released_holds_cap: 2,
        };
        match self.store.reserve(&self.sku, &request, ttl).await.unwrap() {
            ReserveOutcome::Created(r) => (r.reservation_id, r.expires_at_ms),
            other => panic!("{other:?}"),
        }
    }

    fn conn(&self) -> impl ConnectionLike {
        self.store.connection()
    }

    /// view.lua at `now`: the status a caller sees.
    async fn status_at(&self, rid: &str, now: i64) -> String {
        let reply: Vec<String> = script_with_clock(include_str!("../lua/view.lua"), now)
            .key(self.keys.reservation(rid))
            .arg(rid)
            .invoke_async(&mut self.conn())
            .await
            .unwrap();
        reply[4].clone()
    }

    async fn cancel_at(&self, rid: &str, now: i64) -> Vec<String> {
        with_sale_keys(
            &script_with_clock(include_str!("../lua/cancel.lua"), now),
            &self.keys,
        )
        .key(self.keys.reservation(rid))
        .arg(rid)
        .arg("")
        .invoke_async(&mut self.conn())
        .await
        .unwrap()
    }

    async fn confirm_at(&self, rid: &str, payment_ref: &str, now: i64) -> Vec<String> {
        with_sale_keys(
            &script_with_clock(include_str!("../lua/confirm.lua"), now),
            &self.keys,
        )
        .key(self.keys.reservation(rid))
        .arg(rid)
        .arg(self.sku.as_str())
        .arg(payment_ref)
        .arg(ids::compensation_id(rid, payment_ref))
        .invoke_async(&mut self.conn())
        .await
        .unwrap()
    }

    /// sweep.lua at `now`: (expired, still due).
    async fn sweep_at(&self, now: i64, batch: u32) -> (i64, i64) {
        let (expired, due, _) = self.sweep_state_at(now, batch).await;
        (expired, due)
    }

    /// sweep.lua at `now`: (expired, still due, the SKU's life-cycle state).
    async fn sweep_state_at(&self, now: i64, batch: u32) -> (i64, i64, String) {
        type Reply = (
            i64,
            i64,
            Option<i64>,
            i64,
            i64,
            Option<String>,
            Option<i64>,
            String,
            Option<i64>,
        );
        let (expired, due, _, _, _, _, _, state, _): Reply = with_sale_keys(
            &script_with_clock(include_str!("../lua/sweep.lua"), now),
            &self.keys,
        )
        .arg(batch)
        .arg(86_400_000)
        .invoke_async(&mut self.conn())
        .await
        .unwrap();
        (expired, due, state)
    }

    async fn used(&self, user: &str) -> Option<i64> {
        redis::cmd("HGET")
            .arg(&self.keys.used)
            .arg(user)
            .query_async(&mut self.conn())
            .await
            .unwrap()
    }

    async fn pttl(&self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_hold_is_expired_from_its_deadline_millisecond_on() {
    let sale = Sale::new("rule-deadline", 1).await;
    let (rid, expires_at) = sale.hold("u", "k", 1).await;
    assert_eq!(sale.status_at(&rid, expires_at - 1).await, "held");
    assert_eq!(sale.status_at(&rid, expires_at).await, "expired");
}

#[tokio::test]
async fn cancelling_an_overdue_hold_before_the_sweep_expires_it() {
    let sale = Sale::new("rule-cancel-overdue", 1).await;
    let (rid, expires_at) = sale.hold("u", "k", 1).await;
    let reply = sale.cancel_at(&rid, expires_at).await;
    assert_eq!((reply[0].as_str(), reply[4].as_str()), ("ok", "expired"));
    let (live, live_until) = sale.hold("v", "k", 1).await;
    let reply = sale.cancel_at(&live, live_until - 1).await;
    assert_eq!((reply[0].as_str(), reply[4].as_str()), ("ok", "cancelled"));
}

#[tokio::test]
async fn a_multi_unit_release_gives_back_the_users_whole_usage() {
    let sale = Sale::new("rule-multi", 5).await;
    let (rid, expires_at) = sale.hold("u", "k1", 3).await;
    assert_eq!(sale.used("u").await, Some(3));
    sale.cancel_at(&rid, expires_at - 1).await;
    assert_eq!(sale.used("u").await, None, "the entry goes at zero");
    sale.hold("u", "k2", 5).await; // the whole limit again
    assert_eq!(sale.used("u").await, Some(5));
}

#[tokio::test]
async fn the_sweep_counts_what_is_still_due_after_its_batch() {
    let sale = Sale::new("rule-sweep", 5).await;
    let mut deadlines = Vec::new();
    for user in ["a", "b", "c"] {
        deadlines.push(sale.hold(user, "k", 1).await.1);
    }
    let last = *deadlines.iter().max().unwrap();
    assert_eq!(sale.sweep_at(last, 1).await, (1, 2));
    assert_eq!(sale.sweep_at(last, 10).await, (2, 0));
    assert_eq!(sale.sweep_at(last, 10).await, (0, 0));
}

#[tokio::test]
async fn confirming_a_paying_hold_after_its_deadline_is_a_refund_with_one_id() {
    let sale = Sale::new("rule-paying-late", 1).await;
    let (rid, _) = sale.hold("u", "k", 1).await;
    // Paying, with a 1 ms grace: the deadline stays where it was.
    let paying = sale
        .store
        .payment_pending(&sale.sku, &rid, "pay", GRACE_MS)
        .await
        .unwrap()
        .reservation;
    let deadline = paying.expires_at_ms;
    let first = sale.confirm_at(&rid, "pay", deadline).await;
    assert_eq!(first[0], "reservation_expired");
    let again = sale.confirm_at(&rid, "pay", deadline + 5).await;
    assert_eq!(
        again[..2],
        first[..2],
        "a retried refused confirm: the same compensation"
    );
    assert_eq!(first[1], ids::compensation_id(&rid, "pay"));
    // One compensation event, one record readable before the flush.
    let comps: i64 = redis::cmd("HLEN")
        .arg(&sale.keys.comps)
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(comps, 1);
}

#[tokio::test]
async fn a_key_outlives_the_idempotency_ttl_while_its_hold_can_be_paid_and_the_reservation_outlives_the_key(
) {
    let sale = Sale::new("rule-retention", 1).await;
    let (rid, expires_at) = sale.hold("u", "k", 1).await;
    let key = sale.keys.idempotency("u", "k");
    let key_ttl = sale.pttl(&key).await;
    assert!(
        key_ttl > 59_000,
        "hold 60 s + grace, not the 1 s TTL: {key_ttl}"
    );
    sale.cancel_at(&rid, expires_at - 1).await;
    let kept = sale.pttl(&sale.keys.reservation(&rid)).await;
    assert!(kept > sale.pttl(&key).await, "{kept} ms");
    // Ended reservations are kept at least 15 minutes (the flush records them).
    assert!(kept >= 15 * 60 * 1000 - 5_000, "{kept} ms");
}

#[tokio::test]
async fn a_batch_written_twice_counts_its_sales_once() {
    let sale = Sale::new("rule-flush-twice", 5).await;
    let db = flashgate::db::connect(&common::database_url()).unwrap();
    sqlx::query(
        "INSERT INTO skus (sku, stock_total, per_user_limit, hold_seconds) VALUES (?, 10, 5, 60)",
    )
    .bind(sale.sku.as_str())
    .execute(&db)
    .await
    .unwrap();
    let (rid, _) = sale.hold("u", "k", 2).await;
    let mut confirmed = sale.store.reservation(&sale.sku, &rid).await.unwrap();
    confirmed.status = flashgate::reservation::Status::Confirmed;
    confirmed.payment_ref = Some("pay".into());
    let batch = vec![flashgate::db::OutboxEvent::Confirmed {
        reservation: confirmed,
        at_ms: 1_000,
    }];
    flashgate::db::apply_events(&db, &batch).await.unwrap();
    flashgate::db::apply_events(&db, &batch).await.unwrap();
    let (sold, sales): (u64, i64) = sqlx::query_as(
        "SELECT k.sold, (SELECT COUNT(*) FROM sales s WHERE s.sku = k.sku) FROM skus k WHERE k.sku = ?",
    )
    .bind(sale.sku.as_str())
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((sold, sales), (2, 1));
}

/// The flush group has taken and acknowledged everything in the outbox.
async fn flushed_everything(sale: &Sale) {
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&sale.keys.outbox)
        .arg(flashgate::keys::FLUSH_GROUP)
        .arg("$")
        .query_async(&mut sale.conn())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_sale_retires_from_its_end_millisecond_once_it_has_no_hold_and_mysql_has_everything() {
    let sale = Sale::new("rule-retire", 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Ends after the first hold's deadline, before the second one's.
    let end = now + 90_000;
    let definition = SkuDefinition {
        stock_total: 10,
        per_user_limit: 1,
        hold_seconds: 60,
        starts_at_ms: None,
        ends_at_ms: Some(end),
    };
    sale.store
        .load_sku(&sale.sku, &definition, 0)
        .await
        .unwrap();
    let (_, first_due) = sale.hold("u", "k", 1).await;
    assert!(first_due < end);
    assert_eq!(
        sale.sweep_state_at(end - 1, 10).await,
        (1, 0, "open".into())
    );
    // Ended, but the expiry's outbox event is not acknowledged by the flush yet.
    assert_eq!(sale.sweep_state_at(end, 10).await.2, "ended");
    flushed_everything(&sale).await;
    assert_eq!(sale.sweep_state_at(end, 10).await.2, "retired");
    assert_eq!(sale.sweep_state_at(end + 1, 10).await.2, "retired");
    assert_eq!(sale.used("u").await, None, "the usage went with it");

    // A live hold past the end keeps the SKU until it ends and is flushed.
    let sale = Sale::new("rule-retire-live", 1).await;
    let definition = SkuDefinition {
        ends_at_ms: Some(now + 30_000),
        ..definition
    };
    sale.store
        .load_sku(&sale.sku, &definition, 0)
        .await
        .unwrap();
    let (_, due) = sale.hold("u", "k", 1).await;
    let end = now + 30_000;
    assert!(due > end);
    assert_eq!(sale.sweep_state_at(end, 10).await, (0, 0, "ended".into()));
    flushed_everything(&sale).await;
    assert_eq!(sale.sweep_state_at(due - 1, 10).await.2, "ended");
    assert_eq!(sale.sweep_state_at(due, 10).await, (1, 0, "ended".into()));
    flushed_everything(&sale).await;
    assert_eq!(sale.sweep_state_at(due, 10).await.2, "retired");
}

impl Sale {
    /// reserve.lua at `now` with a cap of 2 released holds: the reply's first word.
    async fn reserve_at(&self, user: &str, key: &str, now: i64) -> String {
        let rid = ids::IdKey::derive(common::JWT_SECRET).new_reservation_id(&self.sku);
        let reply: Vec<String> = with_sale_keys(
            &script_with_clock(include_str!("../lua/reserve.lua"), now),
            &self.keys,
        )
        .key(self.keys.idempotency(user, key))
        .key(self.keys.reservation(&rid))
        .arg(user)
        .arg(1)
        .arg(&rid)
        .arg(1_000)
        .arg(GRACE_MS)
        .arg(10)
        .arg(2)
        .invoke_async(&mut self.conn())
        .await
        .unwrap();
        reply[0].clone()
    }
}

#[tokio::test]
async fn a_user_who_released_the_cap_of_holds_waits_for_the_window_to_end() {
    let sale = Sale::new("rule-churn", 1).await;
    let (first, expires_at) = sale.hold("u", "k1", 1).await;
    // The window opens with the first release and lasts one key lifetime:
    // max(idempotency TTL 1 s, hold 60 s + grace).
    let released_at = expires_at - 30_000;
    let window_end = released_at + 60_000 + GRACE_MS as i64;
    sale.cancel_at(&first, released_at).await;
    let (second, _) = sale.hold("u", "k2", 1).await;
    sale.cancel_at(&second, released_at + 1).await;
    assert_eq!(
        sale.reserve_at("u", "k3", window_end - 1).await,
        "limit_exceeded"
    );
    assert_eq!(sale.reserve_at("v", "k3", window_end - 1).await, "created");
    assert_eq!(sale.reserve_at("u", "k3", window_end).await, "created");
    // A new window: the entry of the old one was dropped.
    let churn: Option<String> = redis::cmd("HGET")
        .arg(format!("fg:{{{}}}:churn", sale.sku))
        .arg("u")
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(churn, None);
}
