//! The state rules, each pinned by a fixed test at a chosen millisecond (the scripts
//! run with lib.lua's clock replaced by `store::script_with_clock`), so that no rule
//! depends on a random seed of the property test.

#[path = "common/mod.rs"]
mod common;

use flashgate::ids::{self, SkuId};
use flashgate::keys::SkuKeys;
use flashgate::reservation::{SkuDefinition, WaitingRoom};
use flashgate::store::{
    inspect, script_with_clock, with_sale_keys, Give, ReserveOutcome, ReserveRequest,
    ReserveSettings, Store,
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
        Sale::with_stock(prefix, 10, per_user_limit).await
    }

    async fn with_stock(prefix: &str, stock_total: u64, per_user_limit: u64) -> Sale {
        let args = common::serve_args(&common::redis_url(), "");
        let store = Store::new(flashgate::store::connect(&args.redis).await.unwrap());
        let sku = SkuId::parse(&common::unique_sku(prefix)).unwrap();
        let definition = SkuDefinition {
            stock_total,
            per_user_limit,
            hold_seconds: 60,
            starts_at_ms: None,
            ends_at_ms: None,
            buckets: 1,
            paused: false,
            waiting_room: None,
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
            .key(&self.keys.holds)
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
            u32,
            Option<i64>,
            Option<i64>,
        );
        let (expired, due, _, _, _, _, _, state, _, _, _, _): Reply = with_sale_keys(
            &script_with_clock(include_str!("../lua/sweep.lua"), now),
            &self.keys,
        )
        .key(&self.keys.transfers)
        .key(self.keys.queue_line())
        .key(self.keys.queue_admits())
        .key(self.keys.queue_used())
        .key(self.keys.queue_state())
        .arg(batch)
        .arg(86_400_000)
        .invoke_async(&mut self.conn())
        .await
        .unwrap();
        (expired, due, state)
    }

    /// The user's usage record, if any.
    async fn usage(&self, user: &str) -> Option<inspect::Usage> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.used)
            .arg(user)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        raw.map(|r| inspect::parse_usage(&r).unwrap())
    }

    /// The units the user's limit counts.
    async fn used(&self, user: &str) -> u64 {
        self.usage(user).await.map_or(0, |u| u.units)
    }
}

#[tokio::test]
async fn a_hold_is_expired_from_its_deadline_millisecond_on() {
    let sale = Sale::new("rule-deadline", 1).await;
    let (rid, expires_at) = sale.hold("u", "k", 1).await;
    assert_eq!(sale.status_at(&rid, expires_at - 1).await, "held");
    assert_eq!(sale.status_at(&rid, expires_at).await, "expired");
}

/// The user's own reclaim before the limit check counts the deadline millisecond as
/// expired, as every other call does: at `expires_at - 1` the hold still fills the
/// limit, at `expires_at` it counts for nothing (swept or not).
#[tokio::test]
async fn a_hold_stops_counting_toward_the_limit_from_its_deadline_millisecond_on() {
    let sale = Sale::new("rule-limit-deadline", 1).await;
    let (rid, expires_at) = sale.hold("u", "k1", 1).await;
    assert_eq!(
        sale.reserve_at("u", "k2", expires_at - 1).await,
        "limit_exceeded"
    );
    assert_eq!(sale.status_at(&rid, expires_at).await, "expired");
    assert_eq!(sale.reserve_at("u", "k2", expires_at).await, "created");
    assert_eq!(sale.used("u").await, 1, "the new hold alone counts");
}

/// A reserve that finds the SKU sold out reclaims every overdue hold, the caller's own
/// among them: what the user's limit counts afterwards is the new hold alone, and the
/// claim of the reclaimed hold stays ended.
#[tokio::test]
async fn a_reserve_that_reclaims_the_users_own_overdue_hold_counts_only_the_new_one() {
    // Limit 2: the user's own reclaim (at the limit only) leaves it to the sold-out one.
    let sale = Sale::with_stock("rule-reclaim-own", 2, 2).await;
    let (_, first_due) = sale.hold("u0", "k1", 1).await;
    let (_, second_due) = sale.hold("u1", "k1", 1).await;
    let now = first_due.max(second_due);
    assert_eq!(available(&sale, &sale.keys).await, 0);
    assert_eq!(sale.reserve_at("u0", "k2", now).await, "created");
    assert_eq!(sale.used("u0").await, 1, "{:?}", sale.usage("u0").await);
    assert_eq!(sale.used("u1").await, 0);
    let claims = sale.usage("u0").await.unwrap().claims;
    let live: Vec<(&str, bool)> = claims.iter().map(|c| (c.key.as_str(), c.live)).collect();
    assert_eq!(live, [("k1", false), ("k2", true)]);
    assert_eq!(available(&sale, &sale.keys).await, 1);
}

/// The sweep at a paying hold's deadline (payment started, 1 ms grace, no confirm)
/// expires it and its units come back, as for a hold that was never paid.
#[tokio::test]
async fn the_sweep_expires_a_paying_hold_at_its_deadline_and_returns_its_units() {
    let sale = Sale::new("rule-paying-sweep", 1).await;
    let (rid, _) = sale.hold("u", "k", 1).await;
    let paying = sale
        .store
        .payment_pending(&sale.sku, &rid, "pay", GRACE_MS)
        .await
        .unwrap()
        .reservation;
    assert_eq!(paying.status, flashgate::reservation::Status::Paying);
    let deadline = paying.expires_at_ms;
    assert_eq!(sale.sweep_at(deadline - 1, 10).await, (0, 0));
    assert_eq!(available(&sale, &sale.keys).await, 9);
    assert_eq!(sale.sweep_at(deadline, 10).await, (1, 0));
    assert_eq!(available(&sale, &sale.keys).await, 10);
    assert_eq!(sale.used("u").await, 0);
    let record = inspect::hold(&mut sale.store.connection(), &sale.keys, &rid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, "expired");
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
    assert_eq!(sale.used("u").await, 3);
    sale.cancel_at(&rid, expires_at - 1).await;
    assert_eq!(sale.used("u").await, 0);
    sale.hold("u", "k2", 5).await; // the whole limit again
    assert_eq!(sale.used("u").await, 5);
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
async fn a_key_replays_its_hold_beyond_the_idempotency_ttl_while_the_hold_can_be_paid() {
    let sale = Sale::new("rule-retention", 1).await;
    let (rid, expires_at) = sale.hold("u", "k", 1).await;
    let claim = sale.usage("u").await.unwrap().claims.remove(0);
    let hold = inspect::hold(&mut sale.store.connection(), &sale.keys, &rid)
        .await
        .unwrap()
        .unwrap();
    // max(idempotency TTL 1 s, hold 60 s + grace)
    assert_eq!(claim.keep_until, hold.created_at + 60_000 + GRACE_MS as i64);
    assert_eq!((claim.key.as_str(), claim.live), ("k", true));
    sale.cancel_at(&rid, expires_at - 1).await;
    let claim = sale.usage("u").await.unwrap().claims.remove(0);
    assert!(!claim.live, "an ended hold's claim stays, ended");
    // Long past the 1 s TTL, within the key lifetime: the cancelled hold replays.
    assert_eq!(
        sale.reserve_at("u", "k", claim.keep_until - 1).await,
        "replayed"
    );
    // From the end of the key lifetime on, the key is free again.
    assert_eq!(sale.reserve_at("u", "k", claim.keep_until).await, "created");
    assert_eq!(
        sale.reserve_at("u", "k", claim.keep_until + 1).await,
        "replayed",
        "the key now replays its new hold"
    );
    let claims = sale.usage("u").await.unwrap().claims;
    assert_eq!(claims.len(), 2, "{claims:?}");
    assert!(!claims[0].live && claims[1].live, "{claims:?}");
    // The old claim goes with the user's next end of a hold (here the new one's expiry).
    let second = sale.usage("u").await.unwrap().claims.remove(1);
    let record = inspect::hold(&mut sale.store.connection(), &sale.keys, &second.tail)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sale.sweep_at(record.expires_at, 10).await, (1, 0));
    let claims = sale.usage("u").await.unwrap().claims;
    assert_eq!(
        claims.len(),
        1,
        "the old ended claim was dropped: {claims:?}"
    );
    assert_eq!(
        (claims[0].tail.as_str(), claims[0].live),
        (second.tail.as_str(), false)
    );
    assert_ne!(claims[0].tail, SkuKeys::tail(&rid));
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
        key: None,
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
        buckets: 1,
        paused: false,
        waiting_room: None,
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
    // The usage records stay as long as the tombstone (an admin PUT reopening the sale
    // counts each buyer's units from them), then expire with it.
    assert!(sale.usage("u").await.is_some(), "the usage stays");
    let ttl = |key: String| {
        let mut conn = sale.conn();
        async move {
            let ms: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            ms
        }
    };
    let (used_ttl, tombstone_ttl) = (
        ttl(sale.keys.used.clone()).await,
        ttl(sale.keys.meta.clone()).await,
    );
    assert!(
        tombstone_ttl > 0 && used_ttl >= tombstone_ttl,
        "the usage expires with the tombstone or later: {used_ttl} ms, {tombstone_ttl} ms"
    );
    // About to expire when a PUT reopening the sale restores its usage (which finds the
    // records and writes nothing): they live on until the load takes them back.
    let _: () = redis::cmd("PEXPIRE")
        .arg(&sale.keys.used)
        .arg(50)
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    sale.store
        .restore_usage(&sale.sku, &[("u".to_string(), 1)], &[])
        .await
        .unwrap();
    let used_ttl = ttl(sale.keys.used.clone()).await;
    assert!(used_ttl > 50_000, "a minute more: {used_ttl} ms");
    assert!(sale.usage("u").await.is_some());
    // The reconciler's repair takes the retired sale back (MySQL's terms say it goes
    // on): its tombstone and its usage records are the sale's again, for good.
    let reply: Vec<String> = flashgate::lua::script(include_str!("../lua/repair.lua"))
        .key(&sale.keys.meta)
        .key(&sale.keys.used)
        .key(sale.keys.queue_admits())
        .key(sale.keys.queue_state())
        .arg("10")
        .arg(0)
        .arg(0)
        .arg(1)
        .arg(60_000)
        .arg("")
        .arg(end + 86_400_000)
        .arg("0")
        .arg("")
        .invoke_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(reply[0], "ok");
    assert_eq!(
        (
            ttl(sale.keys.meta.clone()).await,
            ttl(sale.keys.used.clone()).await
        ),
        (-1, -1),
        "no expiry left on the taken-back sale"
    );

    // A live hold past the end keeps the SKU until it ends and is flushed.
    let sale = Sale::new("rule-retire-live", 1).await;
    let definition = SkuDefinition {
        ends_at_ms: Some(now + 30_000),
        buckets: 1,
        paused: false,
        waiting_room: None,
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
        self.reserve_id_at(user, key, now).await.0
    }

    /// reserve.lua at `now` (as `reserve_at`): the reply's first word and the id the
    /// call would give a new hold.
    async fn reserve_id_at(&self, user: &str, key: &str, now: i64) -> (String, String) {
        let rid = ids::IdKey::derive(common::JWT_SECRET).new_reservation_id(&self.sku);
        let reply: Vec<String> = with_sale_keys(
            &script_with_clock(include_str!("../lua/reserve.lua"), now),
            &self.keys,
        )
        .key(self.keys.idempotency(user, key))
        .arg(user)
        .arg(1)
        .arg(&rid)
        .arg(key)
        .arg(1_000)
        .arg(GRACE_MS)
        .arg(10)
        .arg(2)
        .invoke_async(&mut self.conn())
        .await
        .unwrap();
        (reply[0].clone(), rid)
    }

    /// payment_pending.lua at `now`: the reply's code and the deadline it answers.
    async fn payment_pending_at(
        &self,
        rid: &str,
        payment_ref: &str,
        grace_ms: i64,
        now: i64,
    ) -> (String, i64) {
        let reply: Vec<String> = with_sale_keys(
            &script_with_clock(include_str!("../lua/payment_pending.lua"), now),
            &self.keys,
        )
        .key(self.keys.reservation(rid))
        .arg(rid)
        .arg(payment_ref)
        .arg(grace_ms)
        .invoke_async(&mut self.conn())
        .await
        .unwrap();
        (reply[0].clone(), reply[5].parse().unwrap())
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
    // A new window: the count of the old one was dropped.
    let usage = sale.usage("u").await.unwrap();
    assert_eq!((usage.units, usage.released), (1, 0), "{usage:?}");
}

/// The window of released holds: a release at the window's end millisecond opens a new
/// window (its count 1, its end one key lifetime later) instead of counting in the
/// old one, so the cap cannot be passed by one release at that millisecond.
#[tokio::test]
async fn a_release_at_the_windows_end_millisecond_counts_in_a_new_window() {
    let sale = Sale::new("rule-churn-edge", 1).await;
    // One key lifetime: max(idempotency TTL 1 s, hold 60 s + grace).
    let lifetime = 60_000 + GRACE_MS as i64;
    let t = chrono::Utc::now().timestamp_millis();
    let (reply, first) = sale.reserve_id_at("u", "k1", t).await;
    assert_eq!(reply, "created");
    sale.cancel_at(&first, t + 1).await;
    let window_end = t + 1 + lifetime;
    let usage = sale.usage("u").await.unwrap();
    assert_eq!((usage.released, usage.window_end), (1, window_end));
    let (reply, second) = sale.reserve_id_at("u", "k2", t + 3).await;
    assert_eq!(reply, "created");
    let cancelled = sale.cancel_at(&second, window_end).await;
    assert_eq!(
        (cancelled[0].as_str(), cancelled[4].as_str()),
        ("ok", "cancelled")
    );
    let usage = sale.usage("u").await.unwrap();
    assert_eq!(
        (usage.released, usage.window_end),
        (1, window_end + lifetime),
        "a new window"
    );
    // Its second release reaches the cap of 2.
    let (reply, third) = sale.reserve_id_at("u", "k3", window_end + 1).await;
    assert_eq!(reply, "created");
    sale.cancel_at(&third, window_end + 2).await;
    assert_eq!(
        sale.reserve_at("u", "k4", window_end + 3).await,
        "limit_exceeded"
    );
    assert_eq!(
        sale.reserve_at("u", "k4", window_end + lifetime).await,
        "created"
    );
}

/// payment_pending moves a deadline once, and only later: to max(deadline, now + grace).
#[tokio::test]
async fn payment_pending_moves_the_deadline_only_later_and_once() {
    let sale = Sale::new("rule-pending-deadline", 2).await;
    let (short, short_due) = sale.hold("u", "k1", 1).await;
    // A grace shorter than what is left: the deadline stays.
    assert_eq!(
        sale.payment_pending_at(&short, "pay-1", 1_000, short_due - 5_000)
            .await,
        ("ok".into(), short_due)
    );
    let (long, long_due) = sale.hold("u", "k2", 1).await;
    // Longer: now + grace.
    assert_eq!(
        sale.payment_pending_at(&long, "pay-2", 1_000, long_due - 10)
            .await,
        ("ok".into(), long_due + 990)
    );
    // Once: a repeat with a longer grace leaves it.
    assert_eq!(
        sale.payment_pending_at(&long, "pay-2", 5_000, long_due)
            .await,
        ("unchanged".into(), long_due + 990)
    );
    assert_eq!(sale.status_at(&long, long_due + 989).await, "paying");
    assert_eq!(sale.status_at(&long, long_due + 990).await, "expired");
    assert_eq!(sale.sweep_at(short_due, 10).await, (1, 0));
    assert_eq!(sale.sweep_at(long_due + 989, 10).await, (0, 0));
    assert_eq!(sale.sweep_at(long_due + 990, 10).await, (1, 0));
}

impl Sale {
    /// A hold as layout 1 wrote it (a SKU from before layout 2: no `layout` in meta): its
    /// own hash, the user's live-hold index, a key per idempotency key, a bare count
    /// of units. Returns (rid, expires_at ms).
    async fn layout_1_hold(&self, user: &str, key: &str, now: i64) -> (String, i64) {
        let rid = ids::IdKey::derive(common::JWT_SECRET).new_reservation_id(&self.sku);
        let (expires_at, keep_until) = (now + 60_000, now + 61_001);
        let _: () = redis::pipe()
            .atomic()
            .hdel(&self.keys.meta, "layout")
            .hset_multiple(
                self.keys.reservation(&rid),
                &[
                    ("user", user.to_string()),
                    ("quantity", "1".into()),
                    ("status", "held".into()),
                    ("expires_at", expires_at.to_string()),
                    ("created_at", now.to_string()),
                    ("keep_until", keep_until.to_string()),
                ],
            )
            .zadd(&self.keys.deadlines, &rid, expires_at)
            .hset(&self.keys.uholds, user, &rid)
            .cmd("SET")
            .arg(self.keys.idempotency(user, key))
            .arg(format!("1 {rid}"))
            .arg("PX")
            .arg(61_001)
            .hincr(&self.keys.used, user, 1)
            .hincr(&self.keys.meta, "available", -1)
            .hincr(&self.keys.meta, "held", 1)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        (rid, expires_at)
    }

    /// The sold-out flag's probe: whether each (user, key) may have made a hold.
    async fn probe(&self, user_keys: &[(&str, &str)]) -> Vec<bool> {
        let user_keys: Vec<(String, String)> = user_keys
            .iter()
            .map(|(user, key)| (user.to_string(), key.to_string()))
            .collect();
        self.store
            .idempotency_keys_exist(&self.sku, &user_keys)
            .await
            .unwrap()
    }

    async fn exists(&self, key: &str) -> bool {
        let n: u32 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        n == 1
    }
}

/// A gateway upgraded in the middle of a sale finds holds layout 1 wrote: it reads
/// them, replays their keys, counts them toward the limit, and its next transition of
/// each moves it into layout 2 (record in `holds`, index by tail), exactly once.
#[tokio::test]
async fn layout_1_holds_are_read_and_moved_by_their_next_transition() {
    let sale = Sale::new("rule-layout-1", 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    let (expiring, expires_at) = sale.layout_1_hold("u", "k", now - 1_000).await;
    let (paid, _) = sale.layout_1_hold("v", "k", now).await;

    assert_eq!(sale.status_at(&expiring, now).await, "held");
    assert_eq!(sale.reserve_at("u", "k", now).await, "replayed");
    assert_eq!(sale.reserve_at("u", "k2", now).await, "limit_exceeded");
    // The sold-out flag's probe finds layout 1's keys too (they are not in `used`).
    assert_eq!(
        sale.probe(&[("u", "k"), ("u", "k2"), ("w", "k"), ("v", "k")])
            .await,
        [true, false, false, true]
    );

    // The sweep expires the layout-1 hold and moves it.
    assert_eq!(sale.sweep_at(expires_at, 10).await, (1, 0));
    assert!(!sale.exists(&sale.keys.reservation(&expiring)).await);
    let record = inspect::hold(&mut sale.store.connection(), &sale.keys, &expiring)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.status.as_str(), record.user.as_str()),
        ("expired", "u")
    );
    assert_eq!(sale.used("u").await, 0);
    assert_eq!(sale.status_at(&expiring, expires_at).await, "expired");
    assert_eq!(sale.reserve_at("u", "k", expires_at).await, "replayed");

    // A payment for the other one: confirmed, moved, its index entries gone.
    let confirmed = sale.confirm_at(&paid, "pay", now + 1).await;
    assert_eq!(
        (confirmed[0].as_str(), confirmed[4].as_str()),
        ("confirmed", "confirmed")
    );
    assert!(!sale.exists(&sale.keys.reservation(&paid)).await);
    assert!(
        !sale.exists(&sale.keys.uholds).await,
        "the live-hold index emptied"
    );
    let indexed: u64 = redis::cmd("ZCARD")
        .arg(&sale.keys.deadlines)
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(indexed, 0);
    assert_eq!(
        sale.used("v").await,
        1,
        "a purchase counts toward the limit"
    );
    let view = sale.store.sku(&sale.sku).await.unwrap();
    assert_eq!((view.available, view.held, view.sold), (9, 0, 1));
}

/// Idempotency keys are any visible ASCII: a key that spells another key's prefix, a
/// claim separator or another hold's suffix still replays exactly its own hold, and
/// ending one hold ends exactly its claim.
#[tokio::test]
async fn keys_that_spell_claim_syntax_replay_only_their_own_hold() {
    let sale = Sale::new("rule-hostile-keys", 5).await;
    let (first, expires_at) = sale.hold("u", "a|b", 1).await;
    let first_tail = SkuKeys::tail(&first).to_owned();
    let hostile = [
        "a".to_string(),
        "a|".to_string(),
        format!("x|+{first_tail}:1:9"),
        format!("|+{first_tail}:1:{}", i64::MAX),
    ];
    let mut holds = vec![("a|b".to_string(), first.clone())];
    assert_eq!(
        sale.probe(&[("u", "a|b"), ("u", "a"), ("u", "b"), ("v", "a|b")]).await,
        [true, true, false, false],
        "the probe: a key's own claim, or a prefix of one before its '|' (found: the script decides)"
    );
    for key in &hostile {
        holds.push((key.clone(), sale.hold("u", key, 1).await.0));
    }
    let now = expires_at - 1;
    for (key, rid) in &holds {
        let reply: Vec<String> = with_sale_keys(
            &script_with_clock(include_str!("../lua/reserve.lua"), now),
            &sale.keys,
        )
        .key(sale.keys.idempotency("u", key))
        .arg("u")
        .arg(1)
        .arg(ids::IdKey::derive(common::JWT_SECRET).new_reservation_id(&sale.sku))
        .arg(key)
        .arg(1_000)
        .arg(GRACE_MS)
        .arg(10)
        .arg(2)
        .invoke_async(&mut sale.conn())
        .await
        .unwrap();
        assert_eq!(
            (reply[0].as_str(), reply[1].as_str()),
            ("replayed", rid.as_str()),
            "{key}"
        );
    }
    // Cancel the first: its claim alone ends.
    sale.cancel_at(&first, now).await;
    let usage = sale.usage("u").await.unwrap();
    assert_eq!(usage.units, 4);
    for claim in &usage.claims {
        assert_eq!(claim.live, claim.tail != first_tail, "{claim:?}");
    }
    assert_eq!(usage.claims.len(), 5, "{usage:?}");
}

/// Buckets of one SKU for the transfer tests (src/buckets.rs): bucket 0 defined through
/// the store, the others given their share the way a bucketed definition will.
async fn buckets_of(sale: &Sale, shares: &[u64]) -> Vec<SkuKeys> {
    let k = shares.len() as u32;
    let mut keys = Vec::new();
    for (b, share) in shares.iter().enumerate() {
        let bucket = SkuKeys::for_tag(&flashgate::buckets::tag(&sale.sku, b as u32, k));
        let _: () = redis::cmd("HSET")
            .arg(&bucket.meta)
            .arg(&[
                ("stock_total", share.to_string()),
                ("available", share.to_string()),
                ("held", "0".into()),
                ("sold", "0".into()),
            ])
            .query_async(&mut sale.conn())
            .await
            .unwrap();
        keys.push(bucket);
    }
    keys
}

/// A whole transfer, step by step: take, give (unless the receiver has no state: the
/// units stay in transit for `finish_transfers`), then both records go. The units
/// moved (0: the donor had none, or nobody received them).
async fn transfer(store: &Store, from: &SkuKeys, to: &SkuKeys, wanted: u64) -> u64 {
    let Some(taken) = store.take(from, to, wanted).await.unwrap() else {
        return 0;
    };
    if !store
        .transfer_give(from, to, &taken.id, taken.units)
        .await
        .unwrap()
    {
        return 0;
    }
    store.drop_transfer_records(&taken, to).await.unwrap();
    taken.units
}

/// (Σ stock_total, Σ units in transit: taken, not yet given) over the buckets; panics
/// unless every bucket's own equation holds.
async fn stock_of(sale: &Sale, buckets: &[SkuKeys]) -> (u64, u64) {
    let mut conn = sale.conn();
    let (mut total, mut transit) = (0, 0);
    for bucket in buckets {
        let m: Vec<u64> = redis::cmd("HMGET")
            .arg(&bucket.meta)
            .arg(&["stock_total", "available", "held", "sold"])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(m[1] + m[2] + m[3], m[0], "{}: {m:?}", bucket.tag());
        total += m[0];
        let records: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&bucket.transfers)
            .query_async(&mut conn)
            .await
            .unwrap();
        for (field, record) in records {
            let Some(id) = field.strip_prefix("out:") else {
                continue;
            };
            let mut parts = record.splitn(3, ' ');
            let units: u64 = parts.next().unwrap().parse().unwrap();
            let receiver = SkuKeys::for_tag(parts.nth(1).unwrap());
            let given: bool = redis::cmd("HEXISTS")
                .arg(&receiver.transfers)
                .arg(format!("in:{id}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            if !given {
                transit += units;
            }
        }
    }
    (total, transit)
}

/// No transfer left open: what remains are receivers' records marked done, kept for
/// the give window (lib.lua give_units).
async fn assert_no_open_transfer(sale: &Sale, buckets: &[SkuKeys]) {
    for bucket in buckets {
        let records: Vec<String> = redis::cmd("HVALS")
            .arg(&bucket.transfers)
            .query_async(&mut sale.conn())
            .await
            .unwrap();
        assert!(
            records.iter().all(|r| r.split(' ').count() == 4),
            "{} kept an open record: {records:?}",
            bucket.tag()
        );
    }
}

async fn available(sale: &Sale, bucket: &SkuKeys) -> u64 {
    redis::cmd("HGET")
        .arg(&bucket.meta)
        .arg("available")
        .query_async(&mut sale.conn())
        .await
        .unwrap()
}

/// A transfer is take → give → done (donor) → done (receiver), each one script: the
/// SKU's stock (Σ stock_total + in transit) is the same after every step, a repeated
/// step counts once, and a transfer cut after any step is finished exactly once.
#[tokio::test]
async fn a_transfer_keeps_the_skus_stock_at_every_step_and_moves_it_once() {
    let sale = Sale::new("rule-transfer", 1).await;
    let b = buckets_of(&sale, &[10, 10, 10]).await;
    let store = &sale.store;
    assert_eq!(stock_of(&sale, &b).await, (30, 0));

    // Step by step, each step twice.
    for _ in 0..2 {
        assert_eq!(store.transfer_take(&b[0], &b[1], "t1", 4).await.unwrap(), 4);
        assert_eq!(stock_of(&sale, &b).await, (26, 4));
    }
    for _ in 0..2 {
        assert!(store.transfer_give(&b[0], &b[1], "t1", 4).await.unwrap());
        assert_eq!(stock_of(&sale, &b).await, (30, 0));
    }
    assert_eq!(
        (available(&sale, &b[0]).await, available(&sale, &b[1]).await),
        (6, 14)
    );
    assert!(store.transfer_done(&b[0], "out:t1").await.unwrap());
    assert!(store.transfer_done(&b[1], "in:t1").await.unwrap());
    assert_eq!(stock_of(&sale, &b).await, (30, 0));

    // More than the donor has: what it has; from an empty donor: nothing, no record.
    assert_eq!(transfer(store, &b[0], &b[2], 100).await, 6);
    assert_eq!(transfer(store, &b[0], &b[2], 1).await, 0);
    assert_eq!(available(&sale, &b[2]).await, 16);

    // Cut after the take, after the give, after the donor's done: finished once.
    let now = std::time::Duration::ZERO;
    store.transfer_take(&b[1], &b[0], "cut-1", 3).await.unwrap();
    store.transfer_take(&b[2], &b[0], "cut-2", 2).await.unwrap();
    store.transfer_give(&b[2], &b[0], "cut-2", 2).await.unwrap();
    store.transfer_take(&b[2], &b[1], "cut-3", 1).await.unwrap();
    store.transfer_give(&b[2], &b[1], "cut-3", 1).await.unwrap();
    store.transfer_done(&b[2], "out:cut-3").await.unwrap();
    assert_eq!(stock_of(&sale, &b).await, (27, 3));
    assert_eq!(store.finish_transfers(&b, now).await.unwrap(), 2);
    assert_eq!(stock_of(&sale, &b).await, (30, 0));
    assert_eq!(store.finish_transfers(&b, now).await.unwrap(), 0, "once");
    let available_now = [
        available(&sale, &b[0]).await,
        available(&sale, &b[1]).await,
        available(&sale, &b[2]).await,
    ];
    assert_eq!(available_now, [5, 12, 13]);
    assert_no_open_transfer(&sale, &b).await;

    // A receiver with no state: the units wait in transit (its rebuild leaves them
    // out of its plan), never back to the donor, where a late finisher's give to the
    // rebuilt receiver would count them twice.
    let gone = SkuKeys::for_tag(&format!("{}~9~0", sale.sku));
    assert_eq!(transfer(store, &b[1], &gone, 2).await, 0);
    assert_eq!(stock_of(&sale, &b).await, (28, 2));
    assert_eq!(store.finish_transfers(&b, now).await.unwrap(), 0);
    assert_eq!(stock_of(&sale, &b).await, (28, 2));
}

/// A give counts once however many finishers run at once and however late one acts:
/// the receiver's record outlives every give that can still be taken (defect 1 of
/// issue 21: two finishers that read the same cut transfer gave it twice).
#[tokio::test]
async fn a_cut_transfer_is_given_once_by_racing_and_late_finishers() {
    let sale = Sale::new("finishers", 1).await;
    let store = &sale.store;
    let b = buckets_of(&sale, &[10, 10]).await;
    // Two processes: each its own connection and its own one-finisher-at-a-time.
    let args = common::serve_args(&common::redis_url(), "");
    let first = Store::new(flashgate::store::connect(&args.redis).await.unwrap());
    let second = Store::new(flashgate::store::connect(&args.redis).await.unwrap());
    store.transfer_take(&b[0], &b[1], "cut", 3).await.unwrap();
    assert_eq!(stock_of(&sale, &b).await, (17, 3));
    let zero = std::time::Duration::ZERO;
    let (one, two) = tokio::join!(
        first.finish_transfers(&b, zero),
        second.finish_transfers(&b, zero)
    );
    // Each may see it through (one gives, the other finds it given): given once.
    assert!(one.unwrap() + two.unwrap() >= 1);
    assert_eq!(stock_of(&sale, &b).await, (20, 0));
    assert_eq!(available(&sale, &b[1]).await, 13);
    // A finisher that read the record before it was finished gives it now: refused.
    assert!(store.transfer_give(&b[0], &b[1], "cut", 3).await.unwrap());
    assert_eq!(stock_of(&sale, &b).await, (20, 0));
    assert_eq!(available(&sale, &b[1]).await, 13);
}

/// A reserve on a short home bucket gets the units taken for it in the same step as
/// their give (lua/reserve_moved.lua): the reserves that asked are served first, in
/// order; a repeated give counts once; a home bucket with no state gives nothing and
/// serves nothing (`not_found`), the units waiting in transit for the finisher.
#[tokio::test]
async fn moved_units_are_sold_to_the_reserves_that_asked_for_them() {
    let sale = Sale::new("rule-moved", 1).await;
    let store = &sale.store;
    let definition = SkuDefinition {
        stock_total: 10,
        per_user_limit: 2,
        hold_seconds: 60,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets: 2,
        paused: false,
        waiting_room: None,
    };
    let sales = flashgate::buckets::sales(&sale.sku, 2);
    for (sale_of_bucket, share) in sales.iter().zip([0, 5]) {
        let stock = flashgate::store::BucketStock {
            if_new: Some(share),
            change: None,
            after_restore: false,
        };
        store
            .load_bucket(sale_of_bucket, &definition, &stock, 0)
            .await
            .unwrap();
    }
    let b: Vec<SkuKeys> = sales.iter().map(SkuKeys::new).collect();
    let id_key = ids::IdKey::derive(common::JWT_SECRET);
    let request = |user: &str, quantity| ReserveRequest {
        user_id: user.into(),
        quantity,
        idempotency_key: "k".into(),
        reservation_id: id_key.new_reservation_id_in(sales[0].as_str()),
    };
    let ttl = ReserveSettings {
        idempotency_ttl_ms: 60_000,
        payment_grace_ms: GRACE_MS,
        released_holds_cap: 2,
    };
    let taken = store.take(&b[1], &b[0], 3).await.unwrap().unwrap();
    assert_eq!((taken.units, stock_of(&sale, &b).await), (3, (2, 3)));
    // The two reserves, the give first: the one that fits gets the moved units.
    let (given, outcomes) = store
        .reserve_moved(
            &sales[0],
            std::slice::from_ref(&taken),
            &[request("a", 2), request("b", 2)],
            ttl,
        )
        .await
        .unwrap();
    assert_eq!(given, [Give::Given]);
    assert!(matches!(&outcomes[0], Ok(ReserveOutcome::Created(r)) if r.quantity == 2));
    assert!(
        matches!(&outcomes[1], Err(flashgate::error::Error::Refused(r)) if r.code() == "sold_out"),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(stock_of(&sale, &b).await, (5, 0));
    assert_eq!(
        (available(&sale, &b[0]).await, available(&sale, &b[1]).await),
        (1, 2)
    );
    store.drop_transfer_records(&taken, &b[0]).await.unwrap();

    // A give made before (a first attempt whose answer was lost) counts once.
    let taken = store.take(&b[1], &b[0], 1).await.unwrap().unwrap();
    assert!(store
        .transfer_give(&b[1], &b[0], &taken.id, 1)
        .await
        .unwrap());
    let (given, outcomes) = store
        .reserve_moved(
            &sales[0],
            std::slice::from_ref(&taken),
            &[request("b", 2)],
            ttl,
        )
        .await
        .unwrap();
    assert_eq!(given, [Give::Already]);
    assert!(
        matches!(&outcomes[0], Ok(ReserveOutcome::Created(_))),
        "{outcomes:?}"
    );
    assert_eq!(stock_of(&sale, &b).await, (5, 0));
    assert_eq!(
        (available(&sale, &b[0]).await, available(&sale, &b[1]).await),
        (0, 1)
    );
    store.drop_transfer_records(&taken, &b[0]).await.unwrap();
    assert_no_open_transfer(&sale, &b).await;

    // No state in the home bucket: nothing given, nothing sold, the units in transit.
    let gone_sale = SkuId::of_tag(&format!("{}~9~0", sale.sku)).unwrap();
    let gone = SkuKeys::new(&gone_sale);
    let taken = store.take(&b[1], &gone, 1).await.unwrap().unwrap();
    let (given, outcomes) = store
        .reserve_moved(&gone_sale, &[taken], &[request("c", 1)], ttl)
        .await
        .unwrap();
    assert_eq!(given, [Give::Missing]);
    assert!(
        matches!(&outcomes[0], Err(flashgate::error::Error::Refused(r)) if r.code() == "not_found"),
        "{outcomes:?}"
    );
    assert_eq!(stock_of(&sale, &b).await, (4, 1));
    // The finisher leaves them in transit until the receiver is rebuilt.
    assert_eq!(
        store
            .finish_transfers(&b, std::time::Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    assert_eq!(stock_of(&sale, &b).await, (4, 1));
}

/// Hundreds of transfers racing between three buckets, with the worker's finishing
/// pass running alongside: no bucket goes below zero, the SKU's stock never changes,
/// and nothing stays in transit.
#[tokio::test]
async fn racing_transfers_between_buckets_never_make_or_lose_stock() {
    let sale = Sale::new("rule-transfer-race", 1).await;
    let b = buckets_of(&sale, &[100, 100, 100]).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    let moves = (0..300u64).map(|i| {
        let (store, b, barrier) = (sale.store.clone(), b.clone(), barrier.clone());
        tokio::spawn(async move {
            let (from, to) = ((i % 3) as usize, ((i / 3 + 1 + i % 3) % 3) as usize);
            barrier.wait().await;
            if from == to {
                return 0;
            }
            transfer(&store, &b[from], &b[to], 1 + i % 7).await
        })
    });
    let finisher = {
        let (store, b) = (sale.store.clone(), b.clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                store
                    .finish_transfers(&b, std::time::Duration::from_secs(10))
                    .await
                    .unwrap();
            }
        })
    };
    let moved: u64 = futures::future::join_all(moves)
        .await
        .into_iter()
        .map(|m| m.unwrap())
        .sum();
    finisher.await.unwrap();
    assert!(moved > 0);
    assert_eq!(stock_of(&sale, &b).await, (300, 0));
    assert_no_open_transfer(&sale, &b).await;
}

/// A bucket (src/buckets.rs) is a whole sale under its own hash tag: the scripts run on
/// it unchanged, its reservation ids carry the bucket (Lua's and Rust's heads agree),
/// and its outbox events name the SKU itself.
#[tokio::test]
async fn a_bucket_is_a_whole_sale_under_its_own_tag() {
    let sale = Sale::new("rule-bucket", 2).await;
    let tag = flashgate::buckets::tag(&sale.sku, 1, 3);
    let keys = SkuKeys::for_tag(&tag);
    let defined: Vec<String> = with_sale_keys(&flashgate::store::SCRIPTS.load_sku, &keys)
        .arg(5)
        .arg(2)
        .arg(60_000)
        .arg("")
        .arg("")
        .arg(0)
        .arg(10)
        .arg(0)
        .arg(3)
        .arg("")
        .arg(15)
        .invoke_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(defined[0], "created");
    let rid = ids::IdKey::derive(common::JWT_SECRET).new_reservation_id_in(&tag);
    assert_eq!(
        ids::tag_of_reservation(&rid),
        Some((sale.sku.clone(), tag.clone()))
    );
    let reserve = |rid: String| {
        let keys = keys.clone();
        let mut conn = sale.conn();
        async move {
            let reply: Vec<String> = with_sale_keys(&flashgate::store::SCRIPTS.reserve, &keys)
                .key(keys.idempotency("u", "k"))
                .arg("u")
                .arg(1)
                .arg(rid)
                .arg("k")
                .arg(1_000)
                .arg(GRACE_MS)
                .arg(10)
                .arg(2)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            reply
        }
    };
    assert_eq!(reserve(rid.clone()).await[0], "created");
    let replayed = reserve("unused.AAAAAAAAAAAAAAAAAAAAAAAAAAA".into()).await;
    assert_eq!(
        (replayed[0].as_str(), replayed[1].as_str()),
        ("replayed", rid.as_str())
    );
    let cancelled: Vec<String> = with_sale_keys(&flashgate::store::SCRIPTS.cancel, &keys)
        .key(keys.reservation(&rid))
        .arg(&rid)
        .arg("")
        .invoke_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(
        (cancelled[0].as_str(), cancelled[4].as_str()),
        ("ok", "cancelled")
    );
    let events: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&keys.outbox)
        .arg("-")
        .arg("+")
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    let event = &events.ids[0];
    assert_eq!(
        event.get::<String>("sku").as_deref(),
        Some(sale.sku.as_str())
    );
    assert_eq!(event.get::<String>("reservation_id"), Some(rid));
}

/// The receiver's record of a finished transfer outlives every give of it that can
/// still be taken, also one read by a donor whose clock is up to a window ahead; past
/// that the record goes and every give of it is late (lib.lua give_units,
/// open_transfers; transfer_done.lua marks, never drops, a receiver's record).
const WINDOW: i64 = 1_000;

/// transfer_give.lua at `now`: transfer "t" of 3 units from b[0] to b[1], read by its
/// giver at `read_at`.
async fn give_at(sale: &Sale, b: &[SkuKeys], now: i64, read_at: i64) -> String {
    script_with_clock(include_str!("../lua/transfer_give.lua"), now)
        .key(&b[1].meta)
        .key(&b[1].transfers)
        .arg("t")
        .arg(3)
        .arg(b[0].tag())
        .arg(read_at)
        .arg(WINDOW)
        .invoke_async(&mut sale.conn())
        .await
        .unwrap()
}

/// bucket_stock.lua on `bucket` at `now`: what open_transfers purges goes.
async fn read_receiver_at(sale: &Sale, bucket: &SkuKeys, now: i64) {
    let _: (u64, u64, u64) = with_sale_keys(
        &script_with_clock(include_str!("../lua/bucket_stock.lua"), now),
        bucket,
    )
    .key(&bucket.transfers)
    .arg(16)
    .arg(WINDOW)
    .invoke_async(&mut sale.conn())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_finished_transfers_record_outlives_every_give_that_can_still_be_taken() {
    let sale = Sale::new("give-window", 1).await;
    let b = buckets_of(&sale, &[10, 10]).await;
    let store = &sale.store;
    assert_eq!(store.transfer_take(&b[0], &b[1], "t", 3).await.unwrap(), 3);
    let record: String = redis::cmd("HGET")
        .arg(&b[0].transfers)
        .arg("out:t")
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    let taken_at: i64 = record.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(give_at(&sale, &b, taken_at + 10, taken_at).await, "given");
    assert!(store.transfer_done(&b[0], "out:t").await.unwrap());
    let done = taken_at + 20;
    let marked: u64 = script_with_clock(include_str!("../lua/transfer_done.lua"), done)
        .key(&b[1].transfers)
        .arg("in:t")
        .invoke_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(marked, 1);
    // Read before the done by a donor a window ahead: still takeable, so answered.
    read_receiver_at(&sale, &b[1], done + 2 * WINDOW - 1).await;
    assert_eq!(
        give_at(&sale, &b, done + 2 * WINDOW - 1, done + WINDOW).await,
        "already"
    );
    // Two windows after the done the record goes; no give of it can be taken now.
    read_receiver_at(&sale, &b[1], done + 2 * WINDOW).await;
    assert_eq!(
        give_at(&sale, &b, done + 2 * WINDOW, done + WINDOW).await,
        "late"
    );
    assert_eq!(stock_of(&sale, &b).await, (20, 0));
    assert_eq!(available(&sale, &b[1]).await, 13);
    let left: u64 = redis::cmd("HLEN")
        .arg(&b[1].transfers)
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    assert_eq!(left, 0, "the record went");
}

/// restore_usage.lua (a rebuild puts back what MySQL records): a key the user claims
/// already keeps its claim (one key, at most one hold), a claim past its time is not
/// restored, a restored key replays its reservation from MySQL's record, a user's units
/// in Redis are never overwritten, and a user without a record gets MySQL's count.
#[tokio::test]
async fn a_rebuild_restores_key_claims_without_overwriting_what_redis_has() {
    let sale = Sale::with_stock("restore-claims", 10, 3).await;
    let (live, _) = sale.hold("u", "k-live", 1).await;
    let id_key = ids::IdKey::derive(common::JWT_SECRET);
    let now = chrono::Utc::now().timestamp_millis();
    let claim = |user: &str, key: &str, keep_until_ms: i64| flashgate::db::EndedClaim {
        reservation_id: id_key.new_reservation_id(&sale.sku),
        user_id: user.into(),
        quantity: 1,
        claim: flashgate::db::KeyClaim {
            key: key.into(),
            keep_until_ms,
        },
    };
    let restored = claim("u", "k-ended", now + 600_000);
    let claims = [
        claim("u", "k-live", now + 600_000),
        claim("u", "k-past", now - 1_000),
        restored.clone(),
        claim("v", "k-v", now + 600_000),
    ];
    let bought = [("u".to_string(), 7), ("v".to_string(), 2)];
    sale.store
        .restore_usage(&sale.sku, &bought, &claims)
        .await
        .unwrap();
    let sale = &sale;
    let record = |user: &'static str| async move {
        let raw: String = redis::cmd("HGET")
            .arg(&sale.keys.used)
            .arg(user)
            .query_async(&mut sale.conn())
            .await
            .unwrap();
        raw
    };
    let u = record("u").await;
    assert!(u.starts_with("1 "), "u's units overwritten: {u}");
    assert!(
        u.contains(&format!("k-live|+{}", SkuKeys::tail(&live))),
        "{u}"
    );
    assert!(!u.contains("k-past"), "{u}");
    assert_eq!(u.matches("k-live|").count(), 1, "{u}");
    let v = record("v").await;
    assert!(v.starts_with("2 0 0 k-v|-"), "{v}");
    // The restored key replays its reservation (from MySQL's record); the live one its hold.
    let request = |key: &str| ReserveRequest {
        user_id: "u".into(),
        quantity: 1,
        idempotency_key: key.into(),
        reservation_id: id_key.new_reservation_id(&sale.sku),
    };
    let settings = ReserveSettings {
        idempotency_ttl_ms: 1_000,
        payment_grace_ms: GRACE_MS,
        released_holds_cap: 2,
    };
    match sale
        .store
        .reserve(&sale.sku, &request("k-ended"), settings)
        .await
        .unwrap()
    {
        ReserveOutcome::ReplayedFromRecord(rid) => assert_eq!(rid, restored.reservation_id),
        other => panic!("{other:?}"),
    }
    match sale
        .store
        .reserve(&sale.sku, &request("k-live"), settings)
        .await
        .unwrap()
    {
        ReserveOutcome::Replayed(r) => assert_eq!(r.reservation_id, live),
        other => panic!("{other:?}"),
    }
    // The past key makes a new hold.
    match sale
        .store
        .reserve(&sale.sku, &request("k-past"), settings)
        .await
        .unwrap()
    {
        ReserveOutcome::Created(_) => {}
        other => panic!("{other:?}"),
    }
}

/// load_sku.lua with ARGV[12] = '1' (a change to an existing bucket of a split SKU): a
/// bucket Redis lost is refused and left without state, never recreated from a plan
/// made before the loss (the joint rebuild plans it with the SKU's other lost buckets).
#[tokio::test]
async fn a_change_to_a_lost_bucket_is_refused_and_creates_nothing() {
    let sale = Sale::new("rule-lost-bucket", 2).await;
    let tag = flashgate::buckets::tag(&sale.sku, 1, 2);
    let bucket = SkuId::of_tag(&tag).unwrap();
    let definition = SkuDefinition {
        stock_total: 10,
        per_user_limit: 2,
        hold_seconds: 60,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets: 2,
        paused: false,
        waiting_room: None,
    };
    let change = flashgate::store::BucketStock {
        if_new: None,
        change: Some(3),
        after_restore: false,
    };
    let refused = sale
        .store
        .load_bucket(&bucket, &definition, &change, 0)
        .await;
    assert!(
        matches!(refused, Err(flashgate::error::Error::Unavailable { .. })),
        "{refused:?}"
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(SkuKeys::for_tag(&tag).meta)
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    assert!(!exists, "the lost bucket was recreated");
    // A new bucket (a plan for it) is created.
    let create = flashgate::store::BucketStock {
        if_new: Some(5),
        change: Some(3),
        after_restore: false,
    };
    sale.store
        .load_bucket(&bucket, &definition, &create, 0)
        .await
        .unwrap();
}

// ---------------------------------------------------------------- the waiting room

/// A SKU with a waiting room (lua/queue.lua), its clock at the test's choosing.
async fn queue_sale(
    prefix: &str,
    stock_total: u64,
    per_user_limit: u64,
    waiting_room: WaitingRoom,
    starts_at_ms: Option<i64>,
) -> Sale {
    let sale = Sale::with_stock(prefix, stock_total, per_user_limit).await;
    let definition = SkuDefinition {
        stock_total,
        per_user_limit,
        hold_seconds: 60,
        starts_at_ms,
        ends_at_ms: None,
        buckets: 1,
        paused: false,
        waiting_room: Some(waiting_room),
    };
    sale.store
        .load_sku(&sale.sku, &definition, 0)
        .await
        .unwrap();
    sale
}

fn room(admission_seconds: u32, admit_per_second: u32) -> WaitingRoom {
    WaitingRoom {
        admission_seconds,
        admit_per_second,
        prequeue_shuffle: true,
    }
}

/// queue.lua at `now`: its reply (see its header).
async fn queue_at(sale: &Sale, now: i64, mode: &str, user: &str, third: &str) -> Vec<String> {
    let k = &sale.keys;
    script_with_clock(include_str!("../lua/queue.lua"), now)
        .key(&k.meta)
        .key(k.queue_line())
        .key(k.queue_admits())
        .key(k.queue_used())
        .key(k.queue_state())
        .arg(mode)
        .arg(user)
        .arg(third)
        .arg(1000)
        .invoke_async(&mut sale.conn())
        .await
        .unwrap()
}

/// The state word of the user's ticket at `now` (`ticket` mode, which also admits).
async fn ticket_at(sale: &Sale, now: i64, user: &str) -> String {
    queue_at(sale, now, "ticket", user, "").await[0].clone()
}

/// reserve.lua at `now` with an admission token the gateway found good: the reply code.
async fn reserve_admitted_at(
    sale: &Sale,
    now: i64,
    user: &str,
    key: &str,
    quantity: u64,
) -> String {
    reserve_with_admission_at(sale, now, user, key, quantity, "1").await
}

/// reserve.lua at `now`; `admission` is its ARGV[10] ('0': no token, '1': a good one).
async fn reserve_with_admission_at(
    sale: &Sale,
    now: i64,
    user: &str,
    key: &str,
    quantity: u64,
    admission: &str,
) -> String {
    let reply: Vec<String> = with_sale_keys(
        &script_with_clock(include_str!("../lua/reserve.lua"), now),
        &sale.keys,
    )
    .key(sale.keys.idempotency(user, key))
    .key(sale.keys.queue_admits())
    .key(sale.keys.queue_used())
    .key(sale.keys.queue_state())
    .arg(user)
    .arg(quantity)
    .arg(ids::IdKey::derive(common::JWT_SECRET).new_reservation_id(&sale.sku))
    .arg(key)
    .arg(86_400_000)
    .arg(GRACE_MS)
    .arg(16)
    .arg(0)
    .arg("0")
    .arg(admission)
    .invoke_async(&mut sale.conn())
    .await
    .unwrap();
    reply[0].clone()
}

const T0: i64 = 1_900_000_000_000;

#[tokio::test]
async fn an_admission_lapses_at_its_deadline_millisecond_and_its_unit_goes_to_the_next() {
    let sale = queue_sale("q-lapse", 1, 1, room(10, 0), None).await;
    queue_at(&sale, T0, "join", "first", "0").await;
    queue_at(&sale, T0, "join", "second", "0").await;
    assert_eq!(ticket_at(&sale, T0, "first").await, "admitted");
    // One unit, promised to the first user until their deadline.
    assert_eq!(ticket_at(&sale, T0 + 9_999, "second").await, "waiting");
    assert_eq!(ticket_at(&sale, T0 + 10_000, "first").await, "lapsed");
    assert_eq!(ticket_at(&sale, T0 + 10_000, "second").await, "admitted");
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 10_000, "first", "k", 1).await,
        "admission_required"
    );
    // The second user's admission counts from its own admission.
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 19_999, "second", "k", 1).await,
        "created"
    );
}

#[tokio::test]
async fn a_reserve_at_the_admission_deadline_millisecond_is_refused() {
    let sale = queue_sale("q-deadline", 2, 1, room(10, 0), None).await;
    queue_at(&sale, T0, "join", "late", "0").await;
    queue_at(&sale, T0, "join", "early", "0").await;
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 10_000, "late", "k", 1).await,
        "admission_required"
    );
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 9_999, "early", "k", 1).await,
        "created"
    );
}

#[tokio::test]
async fn an_admitted_user_cannot_take_the_units_promised_to_the_others() {
    let sale = queue_sale("q-promised", 3, 2, room(60, 0), None).await;
    for user in ["a", "b", "c"] {
        queue_at(&sale, T0, "join", user, "0").await;
    }
    assert_eq!(ticket_at(&sale, T0, "c").await, "admitted");
    // 3 available, 2 promised to b and c: a may take 1, not 2.
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 1, "a", "k2", 2).await,
        "sold_out"
    );
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 1, "a", "k1", 1).await,
        "created"
    );
    // One admission, one hold: a replay answers it, another key does not.
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 2, "a", "k1", 1).await,
        "replayed"
    );
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 2, "a", "k3", 1).await,
        "admission_used"
    );
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 2, "b", "k", 1).await,
        "created"
    );
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 2, "c", "k", 1).await,
        "created"
    );
    assert_eq!(ticket_at(&sale, T0 + 3, "a").await, "used");
}

#[tokio::test]
async fn a_reserve_without_an_admission_is_refused_on_a_sku_with_a_waiting_room() {
    let sale = queue_sale("q-noadmission", 3, 1, room(60, 0), None).await;
    queue_at(&sale, T0, "join", "a", "0").await;
    queue_at(&sale, T0, "join", "b", "0").await;
    // Never joined, or joined and admitted but without the gateway's word on a token,
    // even for the key that made a hold (a replay carries its token too).
    assert_eq!(
        reserve_admitted_at(&sale, T0, "stranger", "k", 1).await,
        "admission_required"
    );
    assert_eq!(reserve_admitted_at(&sale, T0, "a", "k", 1).await, "created");
    assert_eq!(
        reserve_with_admission_at(&sale, T0, "a", "k", 1, "0").await,
        "admission_required"
    );
}

#[tokio::test]
async fn nobody_is_admitted_before_the_start_and_the_prequeue_takes_the_order_of_its_draws() {
    let start = T0 + 60_000;
    let sale = queue_sale("q-prequeue", 1, 1, room(60, 0), Some(start)).await;
    for (user, draw) in [("x", "30"), ("y", "10"), ("z", "20")] {
        let reply = queue_at(&sale, start - 1, "join", user, draw).await;
        assert_eq!(
            (reply[0].as_str(), reply[1].as_str()),
            ("waiting", ""),
            "{reply:?}"
        );
    }
    assert_eq!(ticket_at(&sale, start - 1, "y").await, "waiting");
    // From the start: positions by draw, and the first is admitted.
    let position = |reply: Vec<String>| reply[1].clone();
    assert_eq!(
        position(queue_at(&sale, start, "ticket", "y", "").await),
        "1"
    );
    assert_eq!(
        position(queue_at(&sale, start, "ticket", "z", "").await),
        "2"
    );
    assert_eq!(
        position(queue_at(&sale, start, "ticket", "x", "").await),
        "3"
    );
    assert_eq!(ticket_at(&sale, start, "y").await, "admitted");
    assert_eq!(ticket_at(&sale, start, "z").await, "waiting");
    // Later joins follow the pre-queue, whatever their draw.
    assert_eq!(
        position(queue_at(&sale, start + 1, "join", "w", "0").await),
        "4"
    );
}

/// queue.lua's 'batch' at `now`: one reply per (mode, user, draw), in order.
async fn queue_batch_at(
    sale: &Sale,
    now: i64,
    requests: &[(&str, &str, &str)],
) -> Vec<Vec<String>> {
    let k = &sale.keys;
    let script = script_with_clock(include_str!("../lua/queue.lua"), now);
    let mut call = script.key(&k.meta);
    call.key(k.queue_line())
        .key(k.queue_admits())
        .key(k.queue_used())
        .key(k.queue_state())
        .arg("batch")
        .arg(1000);
    for (mode, user, draw) in requests {
        call.arg(*mode).arg(*user).arg(*draw);
    }
    call.invoke_async(&mut sale.conn()).await.unwrap()
}

/// A batch of joins and polls (how the gateway sends a burst of them) takes the joins
/// in order, admits once, and answers each as a ticket read right after would: the
/// same places and admissions as the calls one by one.
#[tokio::test]
async fn a_batch_of_joins_and_polls_makes_the_places_and_answers_of_the_calls_one_by_one() {
    let requests = [
        ("join", "u1", "0"),
        ("ticket", "nobody", ""),
        ("join", "u2", "0"),
        ("join", "u1", "0"), // again: the same place
        ("join", "u3", "0"),
        ("ticket", "u2", ""),
    ];
    let one_by_one = queue_sale("q-single", 2, 1, room(60, 0), None).await;
    for (mode, user, draw) in requests {
        queue_at(&one_by_one, T0, mode, user, draw).await;
    }
    let mut expected = Vec::new();
    for (_, user, _) in requests {
        expected.push(queue_at(&one_by_one, T0, "ticket", user, "").await);
    }
    let batched = queue_sale("q-batch", 2, 1, room(60, 0), None).await;
    let replies = queue_batch_at(&batched, T0, &requests).await;
    // All but the last field (the first admissions' count: the batch made both of its
    // admissions at once, the calls one by one made one, then one).
    let head = |replies: &[Vec<String>]| -> Vec<Vec<String>> {
        replies.iter().map(|r| r[..r.len() - 1].to_vec()).collect()
    };
    assert_eq!(head(&replies), head(&expected));
    assert!(
        replies.iter().all(|r| r.last().unwrap() == "2"),
        "{replies:?}"
    );
    let states: Vec<&str> = replies.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        states,
        ["admitted", "none", "admitted", "admitted", "waiting", "admitted"]
    );
    let positions: Vec<&str> = replies.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(positions, ["1", "", "2", "1", "3", "2"]);

    // A SKU without a waiting room answers every request of the batch so.
    let plain = Sale::with_stock("q-batch-plain", 2, 1).await;
    assert_eq!(
        queue_batch_at(&plain, T0, &[("join", "a", "0"), ("ticket", "b", "")]).await,
        vec![vec!["no_waiting_room".to_string()]; 2]
    );
}

#[tokio::test]
async fn admissions_keep_to_admit_per_second() {
    let sale = queue_sale("q-rate", 10, 1, room(60, 2), None).await;
    for user in ["a", "b", "c", "d", "e"] {
        queue_at(&sale, T0, "join", user, "0").await;
    }
    let served = |reply: Vec<String>| reply[2].clone();
    assert_eq!(
        served(queue_at(&sale, T0 + 999, "ticket", "a", "").await),
        "2"
    );
    assert_eq!(ticket_at(&sale, T0 + 999, "c").await, "waiting");
    assert_eq!(
        served(queue_at(&sale, T0 + 1_000, "ticket", "a", "").await),
        "4"
    );
    assert_eq!(
        served(queue_at(&sale, T0 + 2_000, "ticket", "a", "").await),
        "5"
    );
}

#[tokio::test]
async fn a_paused_or_sold_out_sale_admits_nobody_and_sold_out_reaches_every_ticket() {
    let sale = queue_sale("q-paused", 1, 1, room(60, 0), None).await;
    let paused = SkuDefinition {
        stock_total: 1,
        per_user_limit: 1,
        hold_seconds: 60,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets: 1,
        paused: true,
        waiting_room: Some(room(60, 0)),
    };
    sale.store.load_sku(&sale.sku, &paused, 0).await.unwrap();
    queue_at(&sale, T0, "join", "a", "0").await;
    queue_at(&sale, T0, "join", "b", "0").await;
    assert_eq!(ticket_at(&sale, T0, "a").await, "waiting");
    let resumed = SkuDefinition {
        paused: false,
        ..paused
    };
    sale.store.load_sku(&sale.sku, &resumed, 0).await.unwrap();
    assert_eq!(ticket_at(&sale, T0 + 1, "a").await, "admitted");
    assert_eq!(
        reserve_admitted_at(&sale, T0 + 2, "a", "k", 1).await,
        "created"
    );
    let rid: Vec<String> = redis::cmd("HKEYS")
        .arg(&sale.keys.holds)
        .query_async(&mut sale.conn())
        .await
        .unwrap();
    let rid = format!("{}.{}", ids::reservation_head(sale.sku.as_str()), rid[0]);
    assert_eq!(sale.confirm_at(&rid, "pay", T0 + 3).await[0], "confirmed");
    assert_eq!(ticket_at(&sale, T0 + 4, "b").await, "sold_out");
    assert_eq!(
        queue_at(&sale, T0 + 4, "join", "c", "0").await[0],
        "sold_out"
    );
    assert_eq!(ticket_at(&sale, T0 + 4, "a").await, "used");
}

impl Sale {
    /// A reconciler check's first step at `now` (its claim a lease of `lease_ms`): the
    /// reply's first word, 'ok' or 'busy'.
    async fn check_begin_at(&self, check: &str, now: i64, lease_ms: i64) -> String {
        let reply: Vec<String> = script_with_clock(include_str!("../lua/recon_begin.lua"), now)
            .key(&self.keys.meta)
            .key(&self.keys.deadlines)
            .key(&self.keys.outbox)
            .key(&self.keys.rlog)
            .arg(10_000)
            .arg(lease_ms)
            .arg(check)
            .invoke_async(&mut self.conn())
            .await
            .unwrap();
        reply[0].clone()
    }

    /// recon_renew.lua at `now`: whether the check still holds its claim.
    async fn check_renew_at(&self, check: &str, now: i64, lease_ms: i64) -> bool {
        let held: i64 = script_with_clock(include_str!("../lua/recon_renew.lua"), now)
            .key(&self.keys.meta)
            .key(&self.keys.rlog)
            .arg(check)
            .arg(lease_ms)
            .invoke_async(&mut self.conn())
            .await
            .unwrap();
        held == 1
    }

    /// recon_end.lua at `now`: whether the check is incomplete.
    async fn check_end_at(&self, check: &str, now: i64) -> bool {
        let incomplete: i64 = script_with_clock(include_str!("../lua/recon_end.lua"), now)
            .key(&self.keys.meta)
            .key(&self.keys.rlog)
            .arg(check)
            .invoke_async(&mut self.conn())
            .await
            .unwrap();
        incomplete == 1
    }

    async fn check_until(&self) -> Option<i64> {
        redis::cmd("HGET")
            .arg(&self.keys.meta)
            .arg("rlog_until")
            .query_async(&mut self.conn())
            .await
            .unwrap()
    }
}

/// A reconciler check's claim on the SKU's creation log is a lease its owner renews as
/// it reads: renewed by its owner only, and only while it holds (never revived: holds
/// made after it ran out went unlogged, so the check is told it is incomplete). A claim
/// nobody renews (a check that died, or one a Redis rollback brought back) frees the
/// SKU's checks after one lease.
#[tokio::test]
async fn a_check_claim_is_a_lease_its_owner_renews_and_that_lapses() {
    let sale = Sale::new("rule-check-lease", 1).await;
    let t = chrono::Utc::now().timestamp_millis();
    assert_eq!(sale.check_begin_at("a", t, 1_000).await, "ok");
    assert_eq!(sale.check_begin_at("b", t + 10, 1_000).await, "busy");
    assert!(!sale.check_renew_at("b", t + 10, 1_000).await, "not b's");
    assert!(sale.check_renew_at("a", t + 500, 1_000).await);
    assert_eq!(sale.check_until().await, Some(t + 1_500));
    assert_eq!(sale.check_begin_at("b", t + 1_499, 1_000).await, "busy");
    // Ran out: not revived, and the check is incomplete.
    assert!(!sale.check_renew_at("a", t + 1_500, 1_000).await);
    assert_eq!(sale.check_until().await, Some(t + 1_500));
    assert!(sale.check_end_at("a", t + 1_600).await, "incomplete");

    // A check that renews in time is complete, however long it reads.
    assert_eq!(sale.check_begin_at("c", t + 2_000, 1_000).await, "ok");
    for step in 1..=5 {
        assert!(
            sale.check_renew_at("c", t + 2_000 + step * 900, 1_000)
                .await
        );
    }
    assert!(!sale.check_end_at("c", t + 6_600).await, "complete");

    // A claim nobody renews holds the SKU for one lease, not longer.
    assert_eq!(sale.check_begin_at("dead", t + 7_000, 1_000).await, "ok");
    assert_eq!(sale.check_begin_at("d", t + 7_999, 1_000).await, "busy");
    assert_eq!(sale.check_begin_at("d", t + 8_000, 1_000).await, "ok");
    assert!(!sale.check_end_at("d", t + 8_100).await);
}
