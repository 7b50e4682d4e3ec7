//! Property test: random sequences of reserve / confirm / cancel / payment-pending /
//! time passing / sweep / SKU view, run against the real Redis scripts and against a
//! simple in-memory model of the contract; the two must agree, and the invariants must
//! hold, after every step. Rules it pins beyond the counters: a user's own holds past
//! their deadline never count toward the limit (reclaimed before the limit check), an
//! idempotency key lives at least as long as its hold can be paid (hold + grace, here
//! far beyond the 1 s idempotency TTL), an ended reservation outlives its key, every
//! end of a hold is one outbox event, and the per-user counts and live-hold index
//! match the holds.

#[path = "common/mod.rs"]
mod common;

use common::model::{self, runtime, Hold};
use flashgate::error::Error;
use flashgate::ids::{self, SkuId};
use flashgate::keys::SkuKeys;
use flashgate::reservation::{Refusal, SkuDefinition, Status};
use flashgate::store::{
    inspect, ConfirmOutcome, ReserveOutcome, ReserveRequest, ReserveSettings, Store,
};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

const USERS: usize = 3;
const PER_USER_LIMIT: u64 = 3;
const GRACE_MS: u64 = 300_000;
const HOLD_MS: u64 = 600_000;
/// Far below hold + grace: the key must live for the hold, not for this.
const KEYS_TTL: ReserveSettings = ReserveSettings {
    idempotency_ttl_ms: 1_000,
    payment_grace_ms: GRACE_MS,
    released_holds_cap: 0,
};

fn id_key() -> ids::IdKey {
    ids::IdKey::derive(common::JWT_SECRET)
}

#[derive(Debug, Clone)]
enum Op {
    /// Several reserves in one reserve_batch.lua call, decided in order.
    ReserveBatch(Vec<(usize, usize, u64)>),
    Reserve {
        user: usize,
        key: usize,
        quantity: u64,
    },
    Confirm {
        pick: usize,
        payment: usize,
    },
    Cancel {
        pick: usize,
        by_owner: bool,
    },
    PaymentPending {
        pick: usize,
    },
    /// Every live hold's deadline passes.
    TimePasses,
    Sweep,
    /// GET /v1/skus/{sku}: holds past their deadline count for nothing (it expires them).
    ViewSku,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..USERS, 0..3usize, 1..=2u64).prop_map(|(user, key, quantity)| Op::Reserve { user, key, quantity }),
        2 => prop::collection::vec((0..USERS, 0..3usize, 1..=2u64), 2..6).prop_map(Op::ReserveBatch),
        3 => (any::<usize>(), 0..2usize).prop_map(|(pick, payment)| Op::Confirm { pick, payment }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, by_owner)| Op::Cancel { pick, by_owner }),
        2 => any::<usize>().prop_map(|pick| Op::PaymentPending { pick }),
        1 => Just(Op::TimePasses),
        1 => Just(Op::Sweep),
        1 => Just(Op::ViewSku),
    ]
}

#[derive(Debug, Default)]
struct Model {
    stock_total: u64,
    available: u64,
    held: u64,
    sold: u64,
    used: HashMap<String, u64>,
    keys: HashMap<(String, usize), usize>,
    holds: Vec<Hold>,
    compensations: HashSet<(String, String)>,
}

impl Model {
    fn release(&mut self, index: usize, to: Status) {
        let hold = &mut self.holds[index];
        assert!(hold.live());
        hold.status = to;
        self.available += hold.quantity;
        self.held -= hold.quantity;
        *self.used.get_mut(&hold.user).unwrap() -= hold.quantity;
    }

    fn expire_overdue(&mut self) {
        for i in 0..self.holds.len() {
            if self.holds[i].live() && self.holds[i].overdue {
                self.release(i, Status::Expired);
            }
        }
    }
}

struct Harness {
    store: Store,
    sku: SkuId,
    model: Model,
}

impl Harness {
    async fn step(&mut self, op: &Op) {
        let m = &mut self.model;
        match op.clone() {
            Op::Reserve {
                user,
                key,
                quantity,
            } => {
                let request = reserve_request(&self.sku, user, key, quantity);
                let got = self.store.reserve(&self.sku, &request, KEYS_TTL).await;
                expect_reserve(m, &request, key, got);
            }
            Op::ReserveBatch(items) => {
                let requests: Vec<ReserveRequest> = items
                    .iter()
                    .map(|&(user, key, quantity)| reserve_request(&self.sku, user, key, quantity))
                    .collect();
                let outcomes = self
                    .store
                    .reserve_many(&self.sku, &requests, KEYS_TTL)
                    .await
                    .unwrap();
                assert_eq!(outcomes.len(), requests.len());
                for ((request, &(_, key, _)), got) in requests.iter().zip(&items).zip(outcomes) {
                    expect_reserve(m, request, key, got);
                }
            }
            Op::Confirm { pick, payment } => {
                let Some(i) = model::pick(&m.holds, pick) else {
                    return;
                };
                let payment_ref = format!("pay{payment}");
                let got = self
                    .store
                    .confirm(
                        &self.sku,
                        &m.holds[i].id,
                        &payment_ref,
                        &ids::compensation_id(&m.holds[i].id, &payment_ref),
                    )
                    .await
                    .unwrap();
                if m.holds[i].live() && m.holds[i].overdue {
                    m.release(i, Status::Expired);
                }
                let hold = &m.holds[i];
                let expected = match hold.status {
                    Status::Confirmed if hold.payment_ref.as_deref() == Some(&payment_ref) => None,
                    Status::Confirmed => Some(Refusal::AlreadyConfirmed),
                    Status::Expired => Some(Refusal::ReservationExpired),
                    Status::Cancelled => Some(Refusal::ReservationCancelled),
                    Status::Held | Status::Paying => None,
                };
                match (expected, got) {
                    (None, ConfirmOutcome::Confirmed(t)) => {
                        assert_eq!(t.reservation.status, Status::Confirmed);
                        assert_eq!(t.changed, m.holds[i].live(), "confirm: changed");
                        if m.holds[i].live() {
                            let q = m.holds[i].quantity;
                            m.held -= q;
                            m.sold += q;
                            m.holds[i].status = Status::Confirmed;
                            m.holds[i].payment_ref = Some(payment_ref);
                        }
                    }
                    (Some(refusal), ConfirmOutcome::Refused { refusal: got, .. }) => {
                        assert_eq!(refusal, got);
                        m.compensations.insert((m.holds[i].id.clone(), payment_ref));
                    }
                    (expected, got) => panic!("confirm: model {expected:?}, redis {got:?}"),
                }
            }
            Op::Cancel { pick, by_owner } => {
                let Some(i) = model::pick(&m.holds, pick) else {
                    return;
                };
                let caller = by_owner.then(|| m.holds[i].user.clone());
                let got = self
                    .store
                    .cancel(&self.sku, &m.holds[i].id, caller.as_deref())
                    .await;
                let hold = m.holds[i].clone();
                let expected = if hold.live() && hold.overdue {
                    m.release(i, Status::Expired);
                    Ok(Status::Expired)
                } else if hold.status == Status::Paying && by_owner {
                    Err(Refusal::PaymentInProgress)
                } else if hold.live() {
                    m.release(i, Status::Cancelled);
                    Ok(Status::Cancelled)
                } else if hold.status == Status::Confirmed {
                    Err(Refusal::AlreadyConfirmed)
                } else {
                    Ok(hold.status)
                };
                match (expected, got) {
                    (Ok(status), Ok(t)) => {
                        assert_eq!(t.reservation.status, status);
                        assert_eq!(t.changed, hold.live(), "cancel: changed");
                    }
                    (Err(refusal), Err(Error::Refused(got))) => assert_eq!(refusal, got),
                    (expected, got) => panic!("cancel: model {expected:?}, redis {got:?}"),
                }
            }
            Op::PaymentPending { pick } => {
                let Some(i) = model::pick(&m.holds, pick) else {
                    return;
                };
                let got = self
                    .store
                    .payment_pending(&self.sku, &m.holds[i].id, "pay0", GRACE_MS)
                    .await;
                let hold = m.holds[i].clone();
                let expected = if hold.live() && hold.overdue {
                    m.release(i, Status::Expired);
                    Err(Refusal::ReservationExpired)
                } else {
                    match hold.status {
                        Status::Held | Status::Paying => {
                            m.holds[i].status = Status::Paying;
                            Ok(())
                        }
                        Status::Expired => Err(Refusal::ReservationExpired),
                        Status::Cancelled => Err(Refusal::ReservationCancelled),
                        Status::Confirmed => Err(Refusal::AlreadyConfirmed),
                    }
                };
                match (expected, got) {
                    (Ok(()), Ok(t)) => {
                        assert_eq!(t.reservation.status, Status::Paying);
                        assert_eq!(
                            t.changed,
                            hold.status == Status::Held,
                            "payment-pending: changed"
                        );
                    }
                    (Err(refusal), Err(Error::Refused(got))) => assert_eq!(refusal, got),
                    (expected, got) => panic!("payment-pending: model {expected:?}, redis {got:?}"),
                }
            }
            Op::TimePasses => {
                let keys = SkuKeys::new(&self.sku);
                let mut conn = self.store.connection();
                let (seconds, _micros): (i64, i64) =
                    redis::cmd("TIME").query_async(&mut conn).await.unwrap();
                let past = seconds * 1000 - 1;
                for hold in m.holds.iter_mut().filter(|h| h.live()) {
                    hold.overdue = true;
                    let moved = inspect::set_deadline(&mut conn, &keys, &hold.id, past)
                        .await
                        .unwrap();
                    assert!(moved, "{} has no record", hold.id);
                }
            }
            Op::Sweep => {
                let swept = self.store.sweep(&self.sku).await.unwrap();
                let (expired, still_due) = (swept.expired, swept.still_due);
                let due = m.holds.iter().filter(|h| h.live() && h.overdue).count() as u64;
                assert_eq!((expired, still_due), (due, 0));
                m.expire_overdue();
                assert_eq!(swept.available, Some(m.available), "sweep: available after");
            }
            Op::ViewSku => {
                let view = self.store.sku(&self.sku).await.unwrap();
                m.expire_overdue();
                assert_eq!(
                    (view.available, view.held, view.sold),
                    (m.available, m.held, m.sold),
                    "the SKU view counts live holds only"
                );
            }
        }
        self.check().await;
    }

    /// Redis agrees with the model, and the invariants hold.
    async fn check(&self) {
        let m = &self.model;
        let keys = SkuKeys::new(&self.sku);
        let mut conn = self.store.connection();
        // Raw counters (the SKU view would expire overdue holds: Op::ViewSku does that).
        let (stock_total, available, held, sold): (u64, u64, u64, u64) = redis::cmd("HMGET")
            .arg(&keys.meta)
            .arg(&["stock_total", "available", "held", "sold"])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(available + held + sold, stock_total, "invariant 1");
        assert_eq!(
            (available, held, sold),
            (m.available, m.held, m.sold),
            "counters"
        );
        let usage = inspect::usage(&mut conn, &keys).await.unwrap();
        let used: HashMap<String, u64> = usage
            .iter()
            .filter(|(_, u)| u.units > 0)
            .map(|(user, u)| (user.clone(), u.units))
            .collect();
        let model_used: HashMap<String, u64> = m
            .used
            .iter()
            .filter(|(_, q)| **q > 0)
            .map(|(u, q)| (u.clone(), *q))
            .collect();
        assert_eq!(used, model_used, "per-user counts of the limit");
        // Every key that made a hold is claimed in its user's usage record, live exactly
        // while the hold is, and replays at least as long as the hold can be paid.
        for (&(ref user, key), &i) in &m.keys {
            let hold = &m.holds[i];
            let claim = usage
                .get(user)
                .and_then(|u| u.claims.iter().find(|c| c.key == format!("key{key}")))
                .unwrap_or_else(|| panic!("no claim of {user}'s key{key}"));
            assert_eq!(
                claim.tail,
                SkuKeys::tail(&hold.id),
                "claim of {user}'s key{key}"
            );
            assert_eq!(claim.live, hold.live(), "claim of {} live", hold.id);
            let record = inspect::hold(&mut conn, &keys, &hold.id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{} has no record", hold.id));
            assert_eq!(claim.keep_until, record.keep_until);
            assert!(
                record.keep_until - record.created_at >= (HOLD_MS + GRACE_MS) as i64,
                "the key of {} replays for less than its hold can be paid",
                hold.id
            );
        }
        let indexed: HashSet<String> = redis::cmd("ZRANGE")
            .arg(&keys.deadlines)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let live: HashSet<String> = m
            .holds
            .iter()
            .filter(|h| h.live())
            .map(|h| SkuKeys::tail(&h.id).to_owned())
            .collect();
        assert_eq!(indexed, live, "index of live holds");
        for hold in &m.holds {
            let r = self.store.reservation(&self.sku, &hold.id).await.unwrap();
            assert_eq!(r.status, hold.effective(), "status of {}", hold.id);
        }
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&keys.outbox)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut confirmed = 0;
        let mut ended = HashSet::new();
        let mut compensations = HashSet::new();
        // sku_sold_out / sku_available (lua/lib.lua announce_stock): they alternate,
        // sold_out first, and the last one says whether `available` is 0 now.
        let mut sold_out: Option<bool> = None;
        for entry in entries.ids {
            match entry.get::<String>("type").as_deref() {
                Some("sku_sold_out") => {
                    assert_ne!(sold_out, Some(true), "sold out twice in a row");
                    assert_eq!(entry.get::<String>("available").as_deref(), Some("0"));
                    sold_out = Some(true);
                }
                Some("sku_available") => {
                    assert_eq!(sold_out, Some(true), "stock back without a sell-out");
                    sold_out = Some(false);
                }
                Some("confirmed") => confirmed += 1,
                Some("ended") => {
                    assert!(
                        ended.insert(entry.get::<String>("reservation_id").unwrap()),
                        "a hold ends once"
                    );
                }
                Some("compensation") => {
                    assert!(
                        compensations.insert((
                            entry.get::<String>("reservation_id").unwrap(),
                            entry.get::<String>("payment_ref").unwrap(),
                        )),
                        "one compensation per (reservation, payment_ref)"
                    );
                }
                other => panic!("unknown outbox event {other:?}"),
            }
        }
        let confirmed_holds = m
            .holds
            .iter()
            .filter(|h| h.status == Status::Confirmed)
            .count();
        assert_eq!(confirmed, confirmed_holds, "one outbox event per sale");
        let ended_holds: HashSet<String> = m
            .holds
            .iter()
            .filter(|h| matches!(h.status, Status::Cancelled | Status::Expired))
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(ended, ended_holds, "one outbox event per hold that ended");
        assert_eq!(compensations, m.compensations, "invariant 5");
        let available: u64 = redis::cmd("HGET")
            .arg(&keys.meta)
            .arg("available")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            available == 0,
            sold_out == Some(true),
            "the last stock announcement says what `available` is ({available})"
        );
    }
}

fn reserve_request(sku: &SkuId, user: usize, key: usize, quantity: u64) -> ReserveRequest {
    ReserveRequest {
        user_id: format!("user{user}"),
        quantity,
        idempotency_key: format!("key{key}"),
        reservation_id: id_key().new_reservation_id(sku),
    }
}

/// Applies one reserve to the model and checks Redis decided the same.
fn expect_reserve(
    m: &mut Model,
    request: &ReserveRequest,
    key: usize,
    got: Result<ReserveOutcome, Error>,
) {
    let (user, quantity, rid) = (
        request.user_id.clone(),
        request.quantity,
        request.reservation_id.clone(),
    );
    let prior = m.keys.get(&(user.clone(), key)).copied();
    let expected: Result<Option<usize>, Refusal> = match prior {
        Some(i) if m.holds[i].quantity != quantity => Err(Refusal::IdempotencyKeyReused),
        Some(i) => Ok(Some(i)),
        None if {
            let already = m.used.get(&user).copied().unwrap_or(0);
            if already + quantity > PER_USER_LIMIT && already > 0 {
                // The user's own holds past their deadline count for nothing.
                for i in 0..m.holds.len() {
                    if m.holds[i].user == user && m.holds[i].live() && m.holds[i].overdue {
                        m.release(i, Status::Expired);
                    }
                }
            }
            m.used.get(&user).copied().unwrap_or(0) + quantity > PER_USER_LIMIT
        } =>
        {
            Err(Refusal::LimitExceeded)
        }
        None => {
            if m.available < quantity {
                m.expire_overdue(); // the script's reclaim (batches here are small)
            }
            if m.available < quantity {
                Err(Refusal::SoldOut)
            } else {
                Ok(None)
            }
        }
    };
    match (expected, got) {
        (Ok(Some(i)), Ok(ReserveOutcome::Replayed(r))) => {
            assert_eq!(r.reservation_id, m.holds[i].id);
            assert_eq!(r.status, m.holds[i].effective());
        }
        (Ok(None), Ok(ReserveOutcome::Created(r))) => {
            assert_eq!(
                (r.reservation_id.as_str(), r.status),
                (rid.as_str(), Status::Held)
            );
            m.available -= quantity;
            m.held += quantity;
            *m.used.entry(user.clone()).or_default() += quantity;
            m.keys.insert((user.clone(), key), m.holds.len());
            m.holds.push(Hold::held(rid, user, quantity));
        }
        (Err(refusal), Err(Error::Refused(got))) => assert_eq!(refusal, got),
        (expected, got) => panic!("reserve: model {expected:?}, redis {got:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn redis_scripts_follow_the_contract_model(stock in 1..6u64, ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(async {
            let store = Store::new(flashgate::store::connect(&common::serve_args(&common::redis_url(), "").redis).await.unwrap());
            let sku = SkuId::parse(&common::unique_sku("model")).unwrap();
            let definition = SkuDefinition { stock_total: stock, per_user_limit: PER_USER_LIMIT, hold_seconds: HOLD_MS / 1000, starts_at_ms: None, ends_at_ms: None, buckets: 1, paused: false, waiting_room: None };
            store.load_sku(&sku, &definition, 0).await.unwrap();
            let model = Model { stock_total: stock, available: stock, ..Model::default() };
            let mut harness = Harness { store, sku, model };
            harness.check().await;
            for op in &ops {
                harness.step(op).await;
            }
            assert_eq!(harness.model.stock_total, stock);
        });
    }
}
