//! Property test of a SKU split over stock buckets (issue 13, src/buckets.rs): random
//! sequences of reserves across users (through the gateway's real reserve path: home
//! bucket, transfers, sold-out flag), confirms, cancels, time passing, sweeps, and
//! transfers cut after each of their steps and finished later by the worker's
//! finisher, run against the real Redis scripts and a model of the contract for one
//! whole SKU. After every step: the SKU view agrees with the model, every bucket keeps
//! its own equation, Σ stock_total over buckets + units in transit == the SKU's stock,
//! and every reservation reads back with the status the model gives it.

#[path = "common/mod.rs"]
mod common;

use common::model::{self, runtime, Hold};
use flashgate::auth::Caller;
use flashgate::buckets;
use flashgate::error::Error;
use flashgate::gateway::Gateway;
use flashgate::ids::{self, SkuId};
use flashgate::keys::SkuKeys;
use flashgate::reservation::{Refusal, Status};
use flashgate::store::inspect;
use proptest::prelude::*;
use std::collections::HashMap;

const USERS: usize = 5;
const PER_USER_LIMIT: u64 = 3;
const BUCKETS: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
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
    },
    /// Every live hold's deadline passes.
    TimePasses,
    /// Every bucket swept.
    Sweep,
    /// A transfer between two buckets cut after `steps` of its steps (1: taken only;
    /// 2: given too; 3: the donor's record dropped too), as a gateway stopped mid-way.
    CutTransfer {
        from: u32,
        to: u32,
        units: u64,
        steps: u8,
    },
    /// The worker's finisher runs over every bucket.
    FinishTransfers,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..USERS, 0..3usize, 1..=2u64).prop_map(|(user, key, quantity)| Op::Reserve { user, key, quantity }),
        3 => (any::<usize>(), 0..2usize).prop_map(|(pick, payment)| Op::Confirm { pick, payment }),
        2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => Just(Op::TimePasses),
        1 => Just(Op::Sweep),
        2 => (0..BUCKETS, 0..BUCKETS, 1..4u64, 1..=3u8)
            .prop_filter("two buckets", |(from, to, _, _)| from != to)
            .prop_map(|(from, to, units, steps)| Op::CutTransfer { from, to, units, steps }),
        1 => Just(Op::FinishTransfers),
    ]
}

/// The contract for the whole SKU, plus the units a cut transfer left in transit.
#[derive(Debug, Default)]
struct Model {
    stock: u64,
    held: u64,
    sold: u64,
    in_transit: u64,
    used: HashMap<String, u64>,
    keys: HashMap<(String, usize), usize>,
    holds: Vec<Hold>,
    /// The gateway's local sold-out flag (src/sold_out.rs): the smallest quantity
    /// refused since the last cancel. While up, a new key of that quantity or more
    /// may be refused `sold_out` without asking Redis (for at most 200 ms).
    flag: Option<u64>,
    /// Units cancels gave back since the flag went up, not yet passed on to requests
    /// (`SoldOutFlags::returned`).
    returned: u64,
}

impl Model {
    fn sellable(&self) -> u64 {
        self.stock - self.held - self.sold - self.in_transit
    }

    fn release(&mut self, i: usize, to: Status) {
        let hold = &mut self.holds[i];
        hold.status = to;
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
    gateway: Gateway,
    sku: SkuId,
    sales: Vec<SkuId>,
    model: Model,
    transfers: usize,
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
                let user = format!("user{user}");
                let got = self
                    .gateway
                    .reserve(&self.sku, &user, quantity, &format!("key{key}"))
                    .await;
                let prior = m.keys.get(&(user.clone(), key)).copied();
                // Units given back let requests through to Redis, as many units' worth
                // (replays too: the flag is looked at before the key).
                let covered = m.flag.is_some_and(|q| quantity >= q);
                let flagged = prior.is_none() && covered && m.returned == 0;
                if covered {
                    m.returned = m.returned.saturating_sub(quantity);
                }
                let expected: Result<Option<usize>, Refusal> = match prior {
                    Some(i) if m.holds[i].quantity != quantity => {
                        Err(Refusal::IdempotencyKeyReused)
                    }
                    Some(i) => Ok(Some(i)),
                    None => {
                        // The user's own holds past their deadline count for nothing.
                        for i in 0..m.holds.len() {
                            if m.holds[i].user == user && m.holds[i].live() && m.holds[i].overdue {
                                m.release(i, Status::Expired);
                            }
                        }
                        if m.used.get(&user).copied().unwrap_or(0) + quantity > PER_USER_LIMIT {
                            Err(Refusal::LimitExceeded)
                        } else {
                            if m.sellable() < quantity {
                                m.expire_overdue(); // what the buckets' reads expire
                            }
                            if m.sellable() < quantity {
                                Err(Refusal::SoldOut)
                            } else {
                                Ok(None)
                            }
                        }
                    }
                };
                match (expected, got) {
                    (Ok(Some(i)), Ok((r, true))) => {
                        assert_eq!(r.reservation_id, m.holds[i].id);
                        assert_eq!(r.status, m.holds[i].effective());
                    }
                    (Ok(None), Ok((r, false))) => {
                        assert_eq!(r.status, Status::Held);
                        let home = buckets::home(&self.sku, &user, BUCKETS) as usize;
                        assert_eq!(
                            ids::sale_of_reservation(&r.reservation_id).as_ref(),
                            Some(&self.sales[home]),
                            "held in the user's home bucket"
                        );
                        m.held += quantity;
                        *m.used.entry(user.clone()).or_default() += quantity;
                        m.keys.insert((user.clone(), key), m.holds.len());
                        m.holds.push(Hold::held(r.reservation_id, user, quantity));
                    }
                    (_, Err(Error::Refused(Refusal::SoldOut))) if flagged => {}
                    (Err(refusal), Err(Error::Refused(got))) => {
                        assert_eq!(refusal, got);
                        if refusal == Refusal::SoldOut {
                            m.flag = Some(m.flag.map_or(quantity, |q| q.min(quantity)));
                            m.returned = 0;
                        }
                    }
                    (expected, got) => panic!("reserve: model {expected:?}, gateway {got:?}"),
                }
            }
            Op::Confirm { pick, payment } => {
                let Some(i) = model::pick(&m.holds, pick) else {
                    return;
                };
                let payment_ref = format!("pay{payment}");
                let got = self.gateway.confirm(&m.holds[i].id, &payment_ref).await;
                if m.holds[i].live() && m.holds[i].overdue {
                    m.release(i, Status::Expired);
                }
                let hold = m.holds[i].clone();
                let expected = match hold.status {
                    Status::Confirmed if hold.payment_ref.as_deref() == Some(&payment_ref) => None,
                    Status::Confirmed => Some(Refusal::AlreadyConfirmed),
                    Status::Expired => Some(Refusal::ReservationExpired),
                    Status::Cancelled => Some(Refusal::ReservationCancelled),
                    Status::Held | Status::Paying => None,
                };
                match (expected, got) {
                    (None, Ok(r)) => {
                        assert_eq!(r.status, Status::Confirmed);
                        if hold.live() {
                            m.held -= hold.quantity;
                            m.sold += hold.quantity;
                            m.holds[i].status = Status::Confirmed;
                            m.holds[i].payment_ref = Some(payment_ref);
                        }
                    }
                    (Some(refusal), Err(Error::RefundRequired { refusal: got, .. })) => {
                        assert_eq!(refusal, got)
                    }
                    (expected, got) => panic!("confirm: model {expected:?}, gateway {got:?}"),
                }
            }
            Op::Cancel { pick } => {
                let Some(i) = model::pick(&m.holds, pick) else {
                    return;
                };
                let got = self.gateway.cancel(&m.holds[i].id, &Caller::Service).await;
                let hold = m.holds[i].clone();
                let expected = if hold.live() && hold.overdue {
                    m.release(i, Status::Expired);
                    Ok(Status::Expired)
                } else if hold.live() {
                    m.release(i, Status::Cancelled);
                    Ok(Status::Cancelled)
                } else if hold.status == Status::Confirmed {
                    Err(Refusal::AlreadyConfirmed)
                } else {
                    Ok(hold.status)
                };
                if hold.live() && m.flag.is_some() {
                    m.returned += hold.quantity; // the gateway lets that much through
                }
                match (expected, got) {
                    (Ok(status), Ok(r)) => assert_eq!(r.status, status),
                    (Err(refusal), Err(Error::Refused(got))) => assert_eq!(refusal, got),
                    (expected, got) => panic!("cancel: model {expected:?}, gateway {got:?}"),
                }
            }
            Op::TimePasses => {
                let mut conn = self.gateway.store.connection();
                let (seconds, _micros): (i64, i64) =
                    redis::cmd("TIME").query_async(&mut conn).await.unwrap();
                for hold in m.holds.iter_mut().filter(|h| h.live()) {
                    hold.overdue = true;
                    let sale = ids::sale_of_reservation(&hold.id).unwrap();
                    let moved = inspect::set_deadline(
                        &mut conn,
                        &SkuKeys::new(&sale),
                        &hold.id,
                        seconds * 1000 - 1,
                    )
                    .await
                    .unwrap();
                    assert!(moved, "{} has no record", hold.id);
                }
            }
            Op::Sweep => {
                for sale in &self.sales {
                    self.gateway.store.sweep(sale).await.unwrap();
                }
                m.expire_overdue();
            }
            Op::CutTransfer {
                from,
                to,
                units,
                steps,
            } => {
                let store = &self.gateway.store;
                let (from, to) = (
                    SkuKeys::new(&self.sales[from as usize]),
                    SkuKeys::new(&self.sales[to as usize]),
                );
                self.transfers += 1;
                let id = format!("cut-{}", self.transfers);
                let taken = store.transfer_take(&from, &to, &id, units).await.unwrap();
                assert!(taken <= units);
                if taken > 0 && steps >= 2 {
                    assert!(store.transfer_give(&from, &to, &id, taken).await.unwrap());
                    if steps >= 3 {
                        store
                            .transfer_done(&from, &format!("out:{id}"))
                            .await
                            .unwrap();
                    }
                } else {
                    m.in_transit += taken;
                }
            }
            Op::FinishTransfers => {
                let keys: Vec<SkuKeys> = self.sales.iter().map(SkuKeys::new).collect();
                self.gateway
                    .store
                    .finish_transfers(&keys, std::time::Duration::ZERO)
                    .await
                    .unwrap();
                m.in_transit = 0;
            }
        }
        self.check().await;
    }

    /// The gateway agrees with the model, and the invariants hold.
    async fn check(&mut self) {
        let view = self.gateway.sku(&self.sku).await.unwrap();
        let m = &mut self.model;
        m.expire_overdue(); // the view expires every bucket's holds past their deadline
        assert_eq!(
            (view.stock_total, view.held, view.sold),
            (m.stock, m.held, m.sold),
            "the SKU view"
        );
        assert_eq!(
            view.available,
            m.stock - m.held - m.sold,
            "in transit counts as available"
        );
        let mut conn = self.gateway.store.connection();
        for sale in &self.sales {
            let (total, available, held, sold): (u64, u64, u64, u64) = redis::cmd("HMGET")
                .arg(SkuKeys::new(sale).meta)
                .arg(&["stock_total", "available", "held", "sold"])
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(available + held + sold, total, "the equation of {sale}");
        }
        let (stock, in_transit) = self.gateway.store.split_stock(&self.sales).await.unwrap();
        assert_eq!(in_transit, m.in_transit, "units in transit");
        assert_eq!(
            stock.iter().flatten().sum::<u64>() + in_transit,
            m.stock,
            "Σ stock_total + in transit == the SKU's stock"
        );
        for hold in &m.holds {
            let r = self
                .gateway
                .reservation(&hold.id, &Caller::Service)
                .await
                .unwrap();
            assert_eq!(r.status, hold.effective(), "status of {}", hold.id);
        }
        let used: u64 = m.used.values().sum();
        assert_eq!(
            used,
            m.held + m.sold,
            "the limit counts live holds and purchases"
        );
    }
}

/// One gateway for every case (its pools live in `runtime()`).
fn gateway() -> Gateway {
    static STATE: tokio::sync::OnceCell<Gateway> = tokio::sync::OnceCell::const_new();
    runtime().block_on(async {
        STATE
            .get_or_init(|| async {
                let args = common::serve_args(&common::redis_url(), &common::database_url());
                flashgate::server::build_state(&args)
                    .await
                    .expect("gateway builds")
                    .gateway
                    .clone()
            })
            .await
            .clone()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_split_sku_follows_the_contract_model(stock in 1..12u64, ops in prop::collection::vec(op(), 1..40)) {
        let gateway = gateway();
        runtime().block_on(async {
            let sku = SkuId::parse(&common::unique_sku("bmodel")).unwrap();
            let definition = flashgate::reservation::SkuDefinition {
                stock_total: stock,
                per_user_limit: PER_USER_LIMIT,
                hold_seconds: 600,
                starts_at_ms: None,
                ends_at_ms: None,
                buckets: BUCKETS, paused: false, waiting_room: None,
            };
            gateway.define_sku(&sku, &definition).await.unwrap();
            let sales = buckets::sales(&sku, BUCKETS);
            let model = Model { stock, ..Model::default() };
            let mut harness = Harness { gateway, sku, sales, model, transfers: 0 };
            harness.check().await;
            for op in &ops {
                harness.step(op).await;
            }
        });
    }
}
