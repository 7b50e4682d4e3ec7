//! The load: user flows (reserve, then pay / cancel / abandon, with retries and
//! duplicate webhooks) driven closed-loop by N clients or open-loop at a rate (several
//! loads may share a phase: honest users next to an abuser), and the ledger of what the
//! gateway acknowledged, which the validation checks afterwards.

use crate::client::Method;
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cli::{Args, Pace};
use crate::client::{Answer, Auth, Client, Fields};
use crate::gateway::TokenMinter;
use crate::stats::{intern, Endpoint, Recorder};

/// How long minted user tokens live: longer than any run.
const TOKEN_TTL_SECONDS: u64 = 6 * 3600;
/// Violations kept verbatim for the report (all are counted).
const VIOLATION_SAMPLES: usize = 20;
/// Open loop: a flow due before the end may start this late (timer granularity, a
/// busy machine) and still count; later ones count as never sent.
pub const DISPATCH_GRACE: Duration = Duration::from_millis(100);
const RESERVE_BODY: &str = r#"{"quantity":1}"#;

/// Everything the harness knows a SKU went through, from the gateway's answers.
#[derive(Debug, Default)]
pub struct SkuLedger {
    /// Units of 201 `created` answers.
    pub created_units: u64,
    /// Units of reserves that failed in transport: they may or may not hold stock.
    pub ambiguous_reserve_units: u64,
    /// Reservations answered 200 `confirmed`: id → (payment_ref, quantity).
    pub confirmed: HashMap<String, (String, u64)>,
    /// Confirms that failed in transport (may or may not have been applied): id → quantity.
    pub ambiguous_confirms: HashMap<String, u64>,
    /// Every 409 answer with refund_required: (compensation id, reservation id, payment_ref, code).
    pub refunds: Vec<(String, String, String, String)>,
    pub cancelled: Vec<String>,
    /// Holds left to expire: (reservation id, when the 201 arrived).
    pub abandoned: Vec<(String, Instant)>,
    /// Sold-out phase: every created hold, and when its 201 arrived.
    pub holds: Vec<(String, Instant)>,
    /// Sold-out phase: when each reopen cancel was answered.
    pub reopen_cancels: Vec<Instant>,
}

#[derive(Default)]
pub struct Violations {
    pub count: AtomicU64,
    pub samples: Mutex<Vec<String>>,
}

impl Violations {
    pub fn add(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < VIOLATION_SAMPLES {
            samples.push(what);
        }
    }
}

pub struct Ctx {
    pub args: Args,
    pub client: Client,
    pub run_id: String,
    pub seed: u64,
    pub run_start: Instant,
    minter: TokenMinter,
    flows: AtomicU64,
    pub ledger: Mutex<HashMap<String, SkuLedger>>,
    pub violations: Violations,
}

impl Ctx {
    pub fn new(args: Args, client: Client, run_id: String, seed: u64) -> Ctx {
        Ctx {
            minter: TokenMinter::new(&args.jwt_secret),
            args,
            client,
            run_id,
            seed,
            run_start: Instant::now(),
            flows: AtomicU64::new(0),
            ledger: Mutex::new(HashMap::new()),
            violations: Violations::default(),
        }
    }

    pub fn with_ledger<T>(&self, sku: &str, f: impl FnOnce(&mut SkuLedger) -> T) -> T {
        let mut ledger = self.ledger.lock().unwrap();
        f(ledger.entry(sku.to_string()).or_default())
    }

    /// A fresh user (id and token) and a flow number for keys and payment refs.
    fn new_user(&self) -> (u64, String, String) {
        let n = self.next_flow();
        let user = format!("u{n}");
        let token = self.minter.mint(&user, TOKEN_TTL_SECONDS);
        (n, user, token)
    }

    /// A number no other flow of the run has (idempotency keys, payment refs).
    fn next_flow(&self) -> u64 {
        self.flows.fetch_add(1, Ordering::Relaxed)
    }

    /// A token of `user`, valid longer than any run.
    pub fn token_for(&self, user: &str) -> String {
        self.minter.mint(user, TOKEN_TTL_SECONDS)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        rec: &Recorder,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        key: Option<&str>,
        body: Option<Bytes>,
        started: Instant,
    ) -> (Answer, Fields) {
        let answer = self.client.send(method, path, auth, key, body).await;
        let fields = answer.fields();
        rec.record(
            endpoint,
            started.elapsed(),
            answer.status,
            label(endpoint, &answer, &fields),
        );
        (answer, fields)
    }

    #[allow(clippy::too_many_arguments)]
    async fn reserve(
        &self,
        rec: &Recorder,
        endpoint: Endpoint,
        sku: &str,
        token: &str,
        key: &str,
        quantity: u64,
        started: Instant,
    ) -> (Answer, Fields) {
        let body = if quantity == 1 {
            Bytes::from_static(RESERVE_BODY.as_bytes())
        } else {
            Bytes::from(format!(r#"{{"quantity":{quantity}}}"#))
        };
        self.call(
            rec,
            endpoint,
            Method::POST,
            &format!("/v1/skus/{sku}/reservations"),
            Auth::Bearer(token),
            Some(key),
            Some(body),
            started,
        )
        .await
    }

    pub async fn confirm(&self, rec: &Recorder, rid: &str, payment_ref: &str) -> (Answer, Fields) {
        self.call(
            rec,
            Endpoint::Confirm,
            Method::POST,
            &format!("/v1/reservations/{rid}/confirm"),
            Auth::Service,
            None,
            Some(Bytes::from(format!(r#"{{"payment_ref":"{payment_ref}"}}"#))),
            Instant::now(),
        )
        .await
    }

    pub async fn cancel(&self, rec: &Recorder, rid: &str, auth: Auth<'_>) -> (Answer, Fields) {
        self.call(
            rec,
            Endpoint::Cancel,
            Method::POST,
            &format!("/v1/reservations/{rid}/cancel"),
            auth,
            None,
            None,
            Instant::now(),
        )
        .await
    }

    fn payment_ref(&self, n: u64, suffix: &str) -> String {
        format!("pay-{}-{n}{suffix}", self.run_id)
    }

    /// Files a 409 refund_required answer in the ledger; false if it is not one.
    pub fn note_refund(
        &self,
        sku: &str,
        rid: &str,
        payment_ref: &str,
        answer: &Answer,
        fields: &Fields,
    ) -> bool {
        if answer.status != 409 || fields.refund_required != Some(true) {
            return false;
        }
        let Some(compensation_id) = fields.compensation_id.clone() else {
            return false;
        };
        let code = fields.code.clone().unwrap_or_default();
        self.with_ledger(sku, |l| {
            l.refunds.push((
                compensation_id,
                rid.to_string(),
                payment_ref.to_string(),
                code,
            ))
        });
        true
    }
}

/// The outcome label of an answer.
fn label(endpoint: Endpoint, answer: &Answer, fields: &Fields) -> &'static str {
    if let Some(error) = answer.error {
        return intern(error);
    }
    if (200..300).contains(&answer.status) {
        let reserve = matches!(endpoint, Endpoint::Reserve | Endpoint::AbuserReserve);
        if reserve && answer.status == 201 {
            return if answer.replayed {
                "replayed"
            } else {
                "created"
            };
        }
        return Answer::state(fields).map_or("ok", intern);
    }
    let code = fields.code.as_deref().unwrap_or("other");
    if fields.refund_required == Some(true) {
        return match code {
            "already_confirmed" => "already_confirmed+refund",
            "reservation_expired" => "reservation_expired+refund",
            "reservation_cancelled" => "reservation_cancelled+refund",
            _ => "other+refund",
        };
    }
    intern(code)
}

/// What each flow of a phase does.
pub enum Workload {
    /// Reserves by fresh users on one SKU with stock to spare: the hot path.
    Reserve { sku: String },
    /// The same where the gateway may shed load (503 `overloaded`) or rate-limit (429
    /// `rate_limited`): both are allowed answers there (the overload phase, and the
    /// warm-up, which may meet a gateway with a low FLASHGATE_MAX_IN_FLIGHT).
    Sheddable { sku: String },
    /// One reserve by the next of a fixed set of users, taken in turn (each user's pace
    /// is the load's rate over their number), recorded as `endpoint`; admission
    /// refusals are allowed answers (counted). The abuse phase's honest users, and with
    /// one user its abuser.
    Users {
        sku: String,
        tokens: Vec<String>,
        next: AtomicU64,
        endpoint: Endpoint,
    },
    /// Reserves on a SKU that is sold out (after its first units): by fresh users, or
    /// by these users' tokens taken in turn (--soldout-users).
    SoldOut { sku: String, tokens: Vec<String> },
    /// The flash sale: reserve, then pay / cancel / abandon, retries, duplicate webhooks.
    Mixed { skus: Vec<String> },
    /// GET /healthz: the cheapest answer the gateway gives, through the same client at
    /// the same concurrency. No answer can be faster on this machine, so it puts the
    /// sold-out rate in proportion.
    Ceiling,
}

impl Workload {
    async fn flow(&self, ctx: &Ctx, rec: &Recorder, rng: &mut StdRng, intended: Instant) {
        match self {
            Workload::Reserve { sku } => reserve_only(ctx, rec, sku, intended, false, false).await,
            Workload::SoldOut { sku, tokens } if tokens.is_empty() => {
                reserve_only(ctx, rec, sku, intended, true, false).await
            }
            Workload::SoldOut { sku, tokens } => {
                let n = ctx.next_flow();
                let key = format!("k{n}");
                let one = OneReserve {
                    endpoint: Endpoint::Reserve,
                    sku,
                    token: &tokens[n as usize % tokens.len()],
                    key: &key,
                    may_hold_already: true,
                };
                reserve_checked(ctx, rec, one, intended, true, false).await
            }
            Workload::Sheddable { sku } => reserve_only(ctx, rec, sku, intended, false, true).await,
            Workload::Users {
                sku,
                tokens,
                next,
                endpoint,
            } => {
                let turn = next.fetch_add(1, Ordering::Relaxed) as usize % tokens.len();
                let key = format!("k{}", ctx.next_flow());
                let one = OneReserve {
                    endpoint: *endpoint,
                    sku,
                    token: &tokens[turn],
                    key: &key,
                    may_hold_already: false,
                };
                reserve_checked(ctx, rec, one, intended, false, true).await
            }
            Workload::Mixed { skus } => {
                let sku = &skus[rng.random_range(0..skus.len())];
                mixed(ctx, rec, rng, sku, intended).await
            }
            Workload::Ceiling => {
                let (answer, _) = ctx
                    .call(
                        rec,
                        Endpoint::Healthz,
                        Method::GET,
                        "/healthz",
                        Auth::None,
                        None,
                        None,
                        intended,
                    )
                    .await;
                if answer.status != 200 && !answer.is_transport_error() {
                    ctx.violations
                        .add(format!("GET /healthz: {}", answer.text()));
                }
            }
        }
    }
}

/// One reserve by a fresh user; see `reserve_checked` for `track` and `admission`.
async fn reserve_only(
    ctx: &Ctx,
    rec: &Recorder,
    sku: &str,
    intended: Instant,
    track: bool,
    admission: bool,
) {
    let (n, _user, token) = ctx.new_user();
    let key = format!("k{n}");
    let one = OneReserve {
        endpoint: Endpoint::Reserve,
        sku,
        token: &token,
        key: &key,
        may_hold_already: false,
    };
    reserve_checked(ctx, rec, one, intended, track, admission).await
}

/// One reserve of one unit: who sends it, where, with which key.
struct OneReserve<'a> {
    endpoint: Endpoint,
    sku: &'a str,
    token: &'a str,
    key: &'a str,
    /// A user who sends again (a pool's): `limit_exceeded` is an allowed answer.
    may_hold_already: bool,
}

/// Sends one reserve and files its answer: a new hold in the ledger (with when, if
/// `track`), `sold_out` as allowed, a transport failure as ambiguous. With `admission`
/// a 429 `rate_limited` or 503 `overloaded` is allowed too, provided it says when to
/// come back (`Retry-After`); anything else is a violation.
async fn reserve_checked(
    ctx: &Ctx,
    rec: &Recorder,
    one: OneReserve<'_>,
    intended: Instant,
    track: bool,
    admission: bool,
) {
    let OneReserve {
        endpoint,
        sku,
        token,
        key,
        may_hold_already,
    } = one;
    let (answer, fields) = ctx
        .reserve(rec, endpoint, sku, token, key, 1, intended)
        .await;
    let refused = matches!(
        (answer.status, fields.code.as_deref()),
        (429, Some("rate_limited")) | (503, Some("overloaded"))
    );
    match answer.status {
        201 if !answer.replayed => {
            let at = Instant::now();
            ctx.with_ledger(sku, |l| {
                l.created_units += 1;
                if track {
                    l.holds
                        .push((fields.reservation_id.clone().unwrap_or_default(), at));
                }
            });
        }
        409 if fields.code.as_deref() == Some("sold_out") => {}
        409 if may_hold_already && fields.code.as_deref() == Some("limit_exceeded") => {}
        429 | 503 if admission && refused && answer.retry_after => {}
        429 | 503 if admission && refused => ctx.violations.add(format!(
            "admission refusal without Retry-After on {sku}: {}",
            answer.text()
        )),
        0 => ctx.with_ledger(sku, |l| l.ambiguous_reserve_units += 1),
        _ => ctx
            .violations
            .add(format!("{} on {sku}: {}", endpoint.name(), answer.text())),
    }
}

async fn mixed(ctx: &Ctx, rec: &Recorder, rng: &mut StdRng, sku: &str, intended: Instant) {
    let args = &ctx.args;
    let quantity = args.quantity;
    let (n, _user, token) = ctx.new_user();
    let key = format!("k{n}");
    // This flow's reserve; its retries send it again with the same Idempotency-Key.
    let send = |at: Instant| ctx.reserve(rec, Endpoint::Reserve, sku, &token, &key, quantity, at);
    let (answer, fields) = send(intended).await;
    let rid = match (
        answer.status,
        answer.replayed,
        fields.reservation_id.clone(),
    ) {
        (201, false, Some(rid)) => rid,
        (409, _, _) if fields.code.as_deref() == Some("sold_out") => {
            // The user presses "try again" with the same key: a refusal recorded
            // nothing, so it may succeed now (stock came back) or be refused again.
            if rng.random_bool(args.retry_ratio) {
                let (again, again_fields) = send(Instant::now()).await;
                match (again.status, again.replayed, again_fields.reservation_id) {
                    (201, false, Some(rid)) => {
                        // Stock came back: the hold is real; let it expire.
                        ctx.with_ledger(sku, |l| {
                            l.created_units += quantity;
                            l.abandoned.push((rid, Instant::now()));
                        });
                    }
                    (409, _, _) if again_fields.code.as_deref() == Some("sold_out") => {}
                    (0, _, _) => ctx.with_ledger(sku, |l| l.ambiguous_reserve_units += quantity),
                    _ => ctx.violations.add(format!(
                        "retry after sold_out with the same Idempotency-Key on {sku}: {}",
                        again.text()
                    )),
                }
            }
            return;
        }
        (0, _, _) => {
            ctx.with_ledger(sku, |l| l.ambiguous_reserve_units += quantity);
            return;
        }
        _ => {
            ctx.violations.add(format!(
                "reserve by a fresh user on {sku}: {}",
                answer.text()
            ));
            return;
        }
    };
    ctx.with_ledger(sku, |l| l.created_units += quantity);

    // The client did not see the answer: it sends the same request again.
    if rng.random_bool(args.retry_ratio) {
        let (again, again_fields) = send(Instant::now()).await;
        let same = again_fields.reservation_id.as_deref() == Some(rid.as_str());
        let replayed = again.status == 201 && again.replayed && same;
        if !replayed && !again.is_transport_error() {
            ctx.violations.add(format!(
                "retry of reserve {rid} with the same Idempotency-Key: {}",
                again.text()
            ));
        }
    }

    let roll: f64 = rng.random();
    if roll < args.pay {
        let payment_ref = ctx.payment_ref(n, "");
        if rng.random_bool(args.payment_pending_ratio) {
            let (pending, pending_fields) = ctx
                .call(
                    rec,
                    Endpoint::PaymentPending,
                    Method::POST,
                    &format!("/v1/reservations/{rid}/payment-pending"),
                    Auth::Service,
                    None,
                    Some(Bytes::from(format!(r#"{{"payment_ref":"{payment_ref}"}}"#))),
                    Instant::now(),
                )
                .await;
            let ok = pending.status == 200 && Answer::state(&pending_fields) == Some("paying");
            let late = pending.status == 409
                && pending_fields.code.as_deref() == Some("reservation_expired");
            if !ok && !late && !pending.is_transport_error() {
                ctx.violations.add(format!(
                    "payment-pending of live hold {rid}: {}",
                    pending.text()
                ));
            }
        }
        let (confirm, confirm_fields) = ctx.confirm(rec, &rid, &payment_ref).await;
        if confirm.status == 200 && Answer::state(&confirm_fields) == Some("confirmed") {
            ctx.with_ledger(sku, |l| {
                l.confirmed
                    .insert(rid.clone(), (payment_ref.clone(), quantity))
            });
        } else if confirm.is_transport_error() {
            ctx.with_ledger(sku, |l| l.ambiguous_confirms.insert(rid.clone(), quantity));
            return;
        } else if ctx.note_refund(sku, &rid, &payment_ref, &confirm, &confirm_fields)
            && confirm_fields.code.as_deref() == Some("reservation_expired")
        {
            // Paid after the hold ran out (a slow run): refunded, legitimately.
            return;
        } else {
            ctx.violations
                .add(format!("confirm of live hold {rid}: {}", confirm.text()));
            return;
        }
        if rng.random_bool(args.dup_webhook_ratio) {
            // The payment provider delivers the same webhook twice...
            let (again, again_fields) = ctx.confirm(rec, &rid, &payment_ref).await;
            let confirmed =
                again.status == 200 && Answer::state(&again_fields) == Some("confirmed");
            if !confirmed && !again.is_transport_error() {
                ctx.violations.add(format!(
                    "repeated confirm of {rid} with the same payment_ref: {}",
                    again.text()
                ));
            }
            // ...and a second, different payment arrives for the same hold.
            let other_ref = ctx.payment_ref(n, "-dup");
            let (other, other_fields) = ctx.confirm(rec, &rid, &other_ref).await;
            let refunded = ctx.note_refund(sku, &rid, &other_ref, &other, &other_fields);
            let duplicate = refunded && other_fields.code.as_deref() == Some("already_confirmed");
            if !duplicate && !other.is_transport_error() {
                ctx.violations.add(format!(
                    "confirm of confirmed {rid} with another payment_ref: {}",
                    other.text()
                ));
            }
        }
    } else if roll < args.pay + args.cancel {
        let (cancel, cancel_fields) = ctx.cancel(rec, &rid, Auth::Bearer(&token)).await;
        let state = Answer::state(&cancel_fields);
        if cancel.status == 200 && matches!(state, Some("cancelled" | "expired")) {
            ctx.with_ledger(sku, |l| l.cancelled.push(rid.clone()));
        } else {
            if !cancel.is_transport_error() {
                ctx.violations.add(format!(
                    "cancel of live hold {rid} by its owner: {}",
                    cancel.text()
                ));
            }
            return;
        }
        if rng.random_bool(args.late_pay_ratio) {
            // The payment went through after all: it must be refunded.
            let late_ref = ctx.payment_ref(n, "-late");
            let (late, late_fields) = ctx.confirm(rec, &rid, &late_ref).await;
            let refunded = ctx.note_refund(sku, &rid, &late_ref, &late, &late_fields);
            if !refunded && !late.is_transport_error() {
                ctx.violations
                    .add(format!("payment after cancel of {rid}: {}", late.text()));
            }
        }
    } else {
        let at = Instant::now();
        ctx.with_ledger(sku, |l| l.abandoned.push((rid, at)));
    }
}

/// One load of a phase: what its flows do and how they are started.
pub struct Load {
    pub workload: Arc<Workload>,
    pub pace: Pace,
}

impl Load {
    pub fn new(workload: Workload, pace: Pace) -> Load {
        Load {
            workload: Arc::new(workload),
            pace,
        }
    }
}

/// Runs `loads` side by side for `duration`, each closed loop (N clients) or open loop
/// (flows per second), all recorded in one recorder. Returns it and the phase's wall
/// time.
pub async fn run_phase(
    ctx: &Arc<Ctx>,
    loads: Vec<Load>,
    title: &str,
    phase_index: u64,
    duration: Duration,
) -> (Arc<Recorder>, Duration) {
    let start = Instant::now();
    let rec = Arc::new(Recorder::new(start));
    let deadline = start + duration;
    let bar = progress_bar(ctx, title, duration);
    let ticker = {
        let rec = rec.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = Instant::now();
                let requests = rec.requests.load(Ordering::Relaxed);
                let rate = (requests - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, requests);
                bar.set_position(
                    now.duration_since(start)
                        .as_millis()
                        .min(duration.as_millis()) as u64,
                );
                bar.set_message(format!(
                    "{rate:>8.0} req/s  {requests} requests  {} errors",
                    rec.errors.load(Ordering::Relaxed)
                ));
            }
        })
    };

    let mut clients = tokio::task::JoinSet::new();
    let mut open = Vec::new();
    for (index, load) in loads.into_iter().enumerate() {
        // The first load of a phase has the seed a phase always had.
        let seed = ctx.seed ^ (phase_index << 48) ^ ((index as u64) << 40);
        match load.pace {
            Pace::Closed { clients: n } => {
                for worker in 0..n as u64 {
                    let (ctx, rec, workload) = (ctx.clone(), rec.clone(), load.workload.clone());
                    clients.spawn(async move {
                        let mut rng = StdRng::seed_from_u64(seed ^ worker);
                        while Instant::now() < deadline {
                            workload.flow(&ctx, &rec, &mut rng, Instant::now()).await;
                        }
                    });
                }
            }
            Pace::Open {
                rate,
                max_in_flight,
            } => open.push((load.workload, rate, max_in_flight, seed)),
        }
    }
    // The first open loop is dispatched from this task, as the only one always was;
    // any other from a task of its own.
    let mut open = open.into_iter();
    let first = open.next();
    let mut dispatchers = tokio::task::JoinSet::new();
    for (workload, rate, max_in_flight, seed) in open {
        let (ctx, rec) = (ctx.clone(), rec.clone());
        dispatchers.spawn(async move {
            let window = (start, deadline);
            open_loop(&ctx, &rec, workload, rate, max_in_flight, seed, window).await
        });
    }
    let mut unsent = 0;
    if let Some((workload, rate, max_in_flight, seed)) = first {
        let window = (start, deadline);
        unsent += open_loop(ctx, &rec, workload, rate, max_in_flight, seed, window).await;
    }
    while let Some(result) = dispatchers.join_next().await {
        unsent += result.unwrap_or(0);
    }
    rec.unsent.store(unsent, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    (rec, elapsed)
}

/// One open loop of a phase (`window`: its start and end), until its last flow ended.
/// Returns how many of its flows were never started.
async fn open_loop(
    ctx: &Arc<Ctx>,
    rec: &Arc<Recorder>,
    workload: Arc<Workload>,
    rate: f64,
    max_in_flight: usize,
    seed: u64,
    (start, deadline): (Instant, Instant),
) -> u64 {
    let mut tasks = tokio::task::JoinSet::new();
    let unsent = dispatch_open_loop(
        start,
        deadline,
        rate,
        max_in_flight,
        |i, intended, permit| {
            let (ctx, rec, workload) = (ctx.clone(), rec.clone(), workload.clone());
            tasks.spawn(async move {
                rec.record_lag(intended.elapsed());
                let mut rng = StdRng::seed_from_u64(seed ^ i);
                workload.flow(&ctx, &rec, &mut rng, intended).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        },
    )
    .await;
    while tasks.join_next().await.is_some() {}
    unsent
}

/// Open loop: starts flow `i` at `start + i / rate` whatever the answers (latency is
/// measured from that intended time), with at most `max_in_flight` flows running;
/// `start_flow(i, intended, permit)` must hold the permit until its flow ends. Returns
/// how many flows of the phase were never started.
pub async fn dispatch_open_loop(
    start: Instant,
    deadline: Instant,
    rate: f64,
    max_in_flight: usize,
    mut start_flow: impl FnMut(u64, Instant, OwnedSemaphorePermit),
) -> u64 {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (deadline.saturating_duration_since(start).as_secs_f64() * rate).ceil() as u64;
    let mut i: u64 = 0;
    loop {
        let intended = start + interval.mul_f64(i as f64);
        if intended >= deadline || Instant::now() >= deadline + DISPATCH_GRACE {
            return total.saturating_sub(i);
        }
        if intended > Instant::now() {
            tokio::time::sleep_until(intended.into()).await;
        }
        let acquired = tokio::time::timeout_at(
            (deadline + DISPATCH_GRACE).into(),
            permits.clone().acquire_owned(),
        )
        .await;
        let Ok(Ok(permit)) = acquired else {
            return total.saturating_sub(i);
        };
        start_flow(i, intended, permit);
        i += 1;
    }
}

fn progress_bar(ctx: &Ctx, title: &str, duration: Duration) -> ProgressBar {
    if ctx.args.no_progress || duration < Duration::from_secs(3) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(
        Some(duration.as_millis() as u64),
        ProgressDrawTarget::stderr_with_hz(4),
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:30.cyan/blue}] {elapsed:>4}/{duration:4} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(title.to_string());
    bar
}

/// Sold-out phase: half-way, cancel `units` of the phase's holds (as the service) and
/// note when each cancel was answered; the stock must be sold again within 1 s.
pub async fn reopen(ctx: Arc<Ctx>, sku: String, units: u64, after: Duration) {
    tokio::time::sleep(after).await;
    let rids: Vec<String> = ctx.with_ledger(&sku, |l| {
        l.holds
            .iter()
            .take(units as usize)
            .map(|(rid, _)| rid.clone())
            .collect()
    });
    let rec = Recorder::new(Instant::now());
    for rid in rids {
        let (answer, fields) = ctx.cancel(&rec, &rid, Auth::Service).await;
        if answer.status == 200 && Answer::state(&fields) == Some("cancelled") {
            let at = Instant::now();
            ctx.with_ledger(&sku, |l| l.reopen_cancels.push(at));
        } else {
            ctx.violations.add(format!(
                "reopen: cancel of hold {rid} on sold-out {sku}: {}",
                answer.text()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &'static str) -> (Answer, Fields) {
        let answer = Answer {
            status,
            replayed: false,
            retry_after: status == 429 || status == 503,
            body: Bytes::from_static(body.as_bytes()),
            error: None,
        };
        let fields = answer.fields();
        (answer, fields)
    }

    #[test]
    fn reserve_answers_are_labelled_alike_for_every_reserving_endpoint() {
        let (created, fields) = answer(201, r#"{"reservation_id":"r1","status":"held"}"#);
        assert_eq!(label(Endpoint::Reserve, &created, &fields), "created");
        assert_eq!(label(Endpoint::AbuserReserve, &created, &fields), "created");
        assert_eq!(label(Endpoint::GetReservation, &created, &fields), "held");
        let (limited, fields) = answer(429, r#"{"status":429,"code":"rate_limited"}"#);
        assert_eq!(
            label(Endpoint::AbuserReserve, &limited, &fields),
            "rate_limited"
        );
        let (shed, fields) = answer(503, r#"{"status":503,"code":"overloaded"}"#);
        assert_eq!(label(Endpoint::Reserve, &shed, &fields), "overloaded");
    }
}
