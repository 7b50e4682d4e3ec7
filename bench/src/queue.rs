//! The queue phase (the waiting room, issue 26), measured from outside over HTTP:
//!
//! - **streams** (`queue-streams`, `--queue-streams`; first, so that the gateway's RSS
//!   moves with them alone): waiting users of a small sale hold `GET
//!   /v1/skus/{sku}/queue/stream` open, one connection each; the gateway's RSS before
//!   and after opening them (per stream); the few admitted users buy the stock, and
//!   every stream must be told `sold_out` within 1 s of the last sale.
//! - **joins** (`queue-join`, SKU `-qj`): `--queue-users` fresh users join a waiting
//!   room, an open loop at `--queue-join-rate` (latency from the intended send time),
//!   and do nothing more: joins/s and p50/p99, not under the sale's polls. The sale is
//!   open from its definition, so they join a moving line (positions in arrival order,
//!   the first `--queue-stock` admitted as they join).
//! - **the sale** (`queue-sale`, SKU `-q`, `--queue-stock` units, admissions lapsing
//!   after `--queue-admission-seconds`): as many other users join it at the same rate,
//!   then every user reads its ticket again when
//!   `retry_after_ms` says; an admitted user walks away (`--queue-walk-away`: its
//!   admission lapses and goes to the next user) or reserves with its `Admission-Token`
//!   and is paid (confirm by the service). It must sell out: time to sell out,
//!   admissions and lapses (the queue's counters in Redis), polls per second, and the
//!   error of `eta_seconds`: each user's first and last estimate (poll time + eta)
//!   against when it was admitted (`admitted_until` - admission_seconds, Redis's clock
//!   on this machine). After the sell-out, a sample of the users still waiting must
//!   read `sold_out`.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::client::{Answer, Auth, Method};
use crate::load::{self, Ctx};
use crate::report::PhaseReport;
use crate::sse::EventStream;
use crate::stats::{intern, Endpoint, Recorder};
use crate::validate::Check;
use crate::{ratio, Probes};

/// The contract's bound: every open stream is told `sold_out` within 1 s.
pub const STREAM_TOLD_WITHIN_MS: f64 = 1000.0;
/// The issue's targets for joins.
pub const JOIN_RATE_TARGET: f64 = 10_000.0;
pub const JOIN_P99_TARGET_MS: f64 = 5.0;
/// Units of the streams' sale: bought by as many users admitted before the streams open.
const STREAM_SALE_UNITS: u64 = 20;
/// After the sell-out, how long pollers keep polling (those near the front are told).
const SOLD_OUT_GRACE: Duration = Duration::from_millis(1500);
/// Users still waiting at the end whose ticket is read once more (must be `sold_out`).
const SOLD_OUT_SAMPLE: usize = 1000;
/// A poll that failed (transport, 5xx) is sent again after this long.
const POLL_RETRY: Duration = Duration::from_secs(1);
/// Streams dialled at once (the gateway's accept queue is 4096).
const STREAM_DIAL_CONCURRENCY: usize = 128;
/// How long the streams may take to open, and to be told after the last sale.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(60);
const STREAM_TOLD_TIMEOUT: Duration = Duration::from_secs(10);
const RESERVE_BODY: &[u8] = br#"{"quantity":1}"#;

/// Where a user of the sale stands, as the harness last saw it.
const WAITING: u8 = 0;
const DONE: u8 = 1;

/// The fields of a ticket the harness looks at.
#[derive(Debug, Clone, Deserialize)]
struct Ticket {
    state: String,
    #[serde(default)]
    eta_seconds: Option<u64>,
    #[serde(default)]
    admission_token: Option<String>,
    #[serde(default)]
    admitted_until: Option<String>,
    #[serde(default)]
    lapsed: bool,
    #[serde(default)]
    retry_after_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    pub join: JoinFigures,
    pub sale: SaleFigures,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<StreamFigures>,
    pub checks: Vec<Check>,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct JoinFigures {
    pub sku: String,
    pub users: u64,
    pub target_rate: f64,
    /// Joins answered 200 per second, from the first intended send to the last answer.
    pub joins: u64,
    pub joins_per_s: f64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Joins not answered 200 (transport errors included).
    pub failed: u64,
    /// Joins due that the generator never started (it was held at --max-in-flight).
    pub unsent: u64,
    /// How late the generator started its joins (inside the latencies).
    pub start_lag_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SaleFigures {
    pub stock: u64,
    pub admission_seconds: u32,
    pub walk_away: f64,
    pub sold_out: bool,
    /// From the first join to the confirm that sold the last unit.
    pub sell_out_s: Option<f64>,
    pub sold: u64,
    /// The queue's own counters in Redis at the end: ranks admitted, admissions a hold
    /// used, admissions unused and not lapsed yet; lapses = the rest.
    pub admissions: Option<u64>,
    pub admissions_used: Option<u64>,
    pub admissions_live: Option<u64>,
    pub lapses: Option<u64>,
    /// What the users saw: admitted (on a read), walked away, bought; admissions that
    /// lapsed before the user's next read (it never saw them: its ticket read `closed`,
    /// `lapsed`).
    pub seen_admitted: u64,
    pub walked_away: u64,
    pub reserved: u64,
    pub reserve_unanswered: u64,
    pub bought: u64,
    pub unseen_lapses: u64,
    /// Reserves with a token answered other than 201, by outcome.
    pub reserve_refused: std::collections::BTreeMap<String, u64>,
    /// Reads of waiting tickets (`GET .../queue`) and per second, from the first join to
    /// the sell-out.
    pub polls: u64,
    pub polls_per_s: Option<f64>,
    /// Users told `sold_out` by their own poll before the harness stopped polling
    /// (the sell-out + 1.5 s), and how long after the last sale, p50/p99.
    pub told_by_poll: u64,
    pub told_by_poll_p50_s: Option<f64>,
    pub told_by_poll_p99_s: Option<f64>,
    pub still_waiting: u64,
    /// Of a sample of those still waiting, read once more: how many read `sold_out`.
    pub sample_read: u64,
    pub sample_sold_out: u64,
    /// |poll time + eta_seconds - admitted at| over the users admitted with an estimate:
    /// their first estimate and their last one before admission.
    pub eta_users: u64,
    pub eta_first_error_p50_s: Option<f64>,
    pub eta_first_error_p90_s: Option<f64>,
    pub eta_last_error_p50_s: Option<f64>,
    pub eta_last_error_p90_s: Option<f64>,
    /// Signed median of the first estimate's error (positive: admitted later than said).
    pub eta_first_bias_p50_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamFigures {
    pub sku: String,
    pub streams: usize,
    pub opened: u64,
    pub failed: u64,
    /// Why streams failed to open (the first few).
    pub failures: Vec<String>,
    pub open_seconds: f64,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    /// Once the streams were closed (the allocator may keep some).
    pub rss_closed_kb: Option<u64>,
    /// (after - before) / streams opened.
    pub bytes_per_stream: Option<f64>,
    /// The last confirm took this long (the last sale happened inside it); the delays
    /// below count from when it was sent.
    pub last_confirm_ms: f64,
    pub told: u64,
    pub told_within_1s: u64,
    /// Streams that ended (or broke) without saying `sold_out`, and streams still
    /// silent when the harness stopped waiting.
    pub ended_untold: u64,
    pub never_told: u64,
    pub told_min_ms: Option<f64>,
    pub told_p50_ms: Option<f64>,
    pub told_p90_ms: Option<f64>,
    pub told_p99_ms: Option<f64>,
    pub told_max_ms: Option<f64>,
}

impl QueueReport {
    pub fn ratios(&self) -> Vec<crate::report::Ratio> {
        let j = &self.join;
        let mut rows = vec![
            // An open loop at exactly 10,000/s answers a little below it (the last joins'
            // latency lengthens the window): 1% of slack.
            ratio(
                "queue: joins per second",
                Some(j.joins_per_s),
                ">= 10000 (-1%)",
                Some(JOIN_RATE_TARGET * 0.99),
                None,
                format!(
                    "{} joins in {:.2} s (target rate {:.0}/s), {} failed, {} never sent",
                    j.joins, j.seconds, j.target_rate, j.failed, j.unsent
                ),
            ),
            ratio(
                "queue: join p99 (ms)",
                Some(j.p99_ms),
                "<= 5",
                None,
                Some(JOIN_P99_TARGET_MS),
                format!(
                    "p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms; start lag p99 {}",
                    j.p50_ms,
                    j.p90_ms,
                    j.max_ms,
                    j.start_lag_p99_ms
                        .map_or("-".into(), |v| format!("{v:.2} ms"))
                ),
            ),
        ];
        let s = &self.sale;
        rows.push(ratio(
            "  context: queue sale, eta_seconds median error (s)",
            s.eta_first_error_p50_s,
            "-",
            None,
            None,
            format!(
                "first estimate p50 {} / p90 {} s, last p50 {} / p90 {} s over {} admitted users",
                f2(s.eta_first_error_p50_s),
                f2(s.eta_first_error_p90_s),
                f2(s.eta_last_error_p50_s),
                f2(s.eta_last_error_p90_s),
                s.eta_users
            ),
        ));
        if let Some(st) = &self.streams {
            rows.push(ratio(
                "queue: streams told sold_out within 1 s (share)",
                (st.opened > 0).then(|| st.told_within_1s as f64 / st.opened as f64),
                "= 1",
                Some(1.0),
                None,
                format!(
                    "{} of {} open streams; delay p50 {} / p99 {} / max {} ms; {} bytes of gateway RSS per stream",
                    st.told_within_1s,
                    st.opened,
                    f2(st.told_p50_ms),
                    f2(st.told_p99_ms),
                    f2(st.told_max_ms),
                    st.bytes_per_stream.map_or("?".into(), |b| format!("{b:.0}"))
                ),
            ));
        }
        rows
    }
}

fn f2(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

/// Seconds since the Unix epoch, the clock `admitted_until` is in.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339_seconds(text: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros() as f64 / 1e6)
}

/// The value at quantile `q` of `values` (sorted here), nearest rank.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// What the users of the sale saw, gathered as they go.
#[derive(Default)]
struct Tally {
    seen_admitted: u64,
    walked_away: u64,
    reserved: u64,
    /// Reserves still failing in transport (or 503) after three tries: a hold or not.
    reserve_unanswered: u64,
    bought: u64,
    unseen_lapses: u64,
    reserve_refused: std::collections::BTreeMap<String, u64>,
    told_by_poll: Vec<Instant>,
    eta_first: Vec<f64>,
    eta_last: Vec<f64>,
    eta_first_signed: Vec<f64>,
}

struct Sale {
    sku: String,
    queue_path: String,
    /// Users are `<user_prefix><i>`.
    user_prefix: &'static str,
    /// After joining, the users follow their tickets (the sale); false: they only join.
    follow: bool,
    stock: u64,
    admission_seconds: f64,
    walk_away: f64,
    /// Units answered 200 confirmed; the confirm that makes it `stock` sold out.
    sold: AtomicU64,
    last_sale: watch::Sender<Option<Instant>>,
    joins_answered: AtomicU64,
    states: Vec<AtomicU8>,
    tally: Mutex<Tally>,
}

/// A ticket read (join or poll), recorded under `endpoint` with the ticket's state as
/// its outcome. Err(the answer) unless it is a 200 with a ticket.
async fn ticket_call(
    ctx: &Ctx,
    rec: &Recorder,
    endpoint: Endpoint,
    method: Method,
    path: &str,
    token: &str,
    started: Instant,
) -> Result<Ticket, Answer> {
    let answer = ctx
        .client
        .send(method, path, Auth::Bearer(token), None, None)
        .await;
    let ticket = if answer.status == 200 {
        serde_json::from_slice::<Ticket>(&answer.body).ok()
    } else {
        None
    };
    let outcome = match (&ticket, answer.error) {
        (Some(t), _) => intern(&t.state),
        (None, Some(error)) => intern(error),
        (None, None) => intern(answer.fields().code.as_deref().unwrap_or("other")),
    };
    rec.record(endpoint, started.elapsed(), answer.status, outcome);
    ticket.ok_or(answer)
}

/// A user of the sale: joins (its permit held until the join is answered), then reads
/// its ticket when told to, until admitted (walk away, or reserve and be paid), sold
/// out or closed.
#[allow(clippy::too_many_arguments)]
async fn sale_user(
    ctx: Arc<Ctx>,
    sale: Arc<Sale>,
    joins: Arc<Recorder>,
    rec: Arc<Recorder>,
    i: u64,
    intended: Instant,
    permit: OwnedSemaphorePermit,
) {
    joins.record_lag(intended.elapsed());
    let user = format!("{}{i}", sale.user_prefix);
    let token = ctx.token_for(&user);
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x7175_6575_0000_0000 ^ i);
    let joined = ticket_call(
        &ctx,
        &joins,
        Endpoint::QueueJoin,
        Method::POST,
        &sale.queue_path,
        &token,
        intended,
    )
    .await;
    sale.joins_answered.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    if !sale.follow {
        sale.states[i as usize].store(DONE, Ordering::Relaxed);
        return;
    }
    // Err(true): read again after POLL_RETRY; a join that failed is sent again as a
    // join (it is idempotent): the user may have no ticket yet.
    let mut has_ticket = joined.is_ok();
    let mut read = joined.map_err(|answer| settle_failure(&ctx, &sale, "queue join", &answer));
    let mut first_eta: Option<f64> = None;
    let mut last_eta: Option<f64> = None;
    loop {
        let ticket = match read {
            Ok(ticket) => ticket,
            Err(true) => {
                // Spread over a second: the users refused together do not come back together.
                let jitter = Duration::from_millis(rng.random_range(0..1000));
                tokio::time::sleep(POLL_RETRY + jitter).await;
                read = reread(&ctx, &sale, &rec, &token, !has_ticket).await;
                has_ticket |= read.is_ok();
                continue;
            }
            Err(false) => {
                sale.states[i as usize].store(DONE, Ordering::Relaxed);
                return;
            }
        };
        match ticket.state.as_str() {
            "waiting" => {
                if let Some(eta) = ticket.eta_seconds {
                    let at = unix_now() + eta as f64;
                    first_eta.get_or_insert(at);
                    last_eta = Some(at);
                }
                let wait = Duration::from_millis(ticket.retry_after_ms.max(1));
                tokio::time::sleep(wait).await;
                read = reread(&ctx, &sale, &rec, &token, false).await;
            }
            "admitted" => {
                sale.states[i as usize].store(DONE, Ordering::Relaxed);
                let admitted_at = ticket
                    .admitted_until
                    .as_deref()
                    .and_then(rfc3339_seconds)
                    .map(|until| until - sale.admission_seconds);
                let walk = rng.random_bool(sale.walk_away);
                {
                    let mut tally = sale.tally.lock().unwrap();
                    tally.seen_admitted += 1;
                    if let (Some(first), Some(last), Some(at)) = (first_eta, last_eta, admitted_at)
                    {
                        tally.eta_first.push((first - at).abs());
                        tally.eta_last.push((last - at).abs());
                        tally.eta_first_signed.push(at - first);
                    }
                    if walk {
                        tally.walked_away += 1;
                    }
                }
                if !walk {
                    buy(&ctx, &sale, &rec, i, &token, &ticket).await;
                }
                return;
            }
            "sold_out" => {
                sale.states[i as usize].store(DONE, Ordering::Relaxed);
                let at = Instant::now();
                sale.tally.lock().unwrap().told_by_poll.push(at);
                return;
            }
            "closed" => {
                sale.states[i as usize].store(DONE, Ordering::Relaxed);
                if ticket.lapsed {
                    sale.tally.lock().unwrap().unseen_lapses += 1;
                } else {
                    ctx.violations.add(format!(
                        "queue ticket of {user} on {}: closed while the sale is on",
                        sale.sku
                    ));
                }
                return;
            }
            other => {
                sale.states[i as usize].store(DONE, Ordering::Relaxed);
                ctx.violations.add(format!(
                    "queue ticket of {user} on {}: state {other:?}",
                    sale.sku
                ));
                return;
            }
        }
    }
}

/// A waiting user reads its ticket (or joins again, `join`). Err(true): read again
/// later (a transport failure, a 5xx, a 429); Err(false): an answer the contract does not
/// allow (a violation; the user gives up).
async fn reread(
    ctx: &Ctx,
    sale: &Sale,
    rec: &Recorder,
    token: &str,
    join: bool,
) -> Result<Ticket, bool> {
    let (endpoint, method, what) = if join {
        (Endpoint::QueueJoin, Method::POST, "queue join")
    } else {
        (Endpoint::QueuePoll, Method::GET, "queue poll")
    };
    ticket_call(
        ctx,
        rec,
        endpoint,
        method,
        &sale.queue_path,
        token,
        Instant::now(),
    )
    .await
    .map_err(|answer| settle_failure(ctx, sale, what, &answer))
}

/// Whether a failed ticket read is worth sending again; if not, it is a violation.
fn settle_failure(ctx: &Ctx, sale: &Sale, what: &str, answer: &Answer) -> bool {
    // Queue requests share the reserve's rate limits: a 429 says when to come back.
    let limited = answer.status == 429 && answer.retry_after;
    if answer.is_transport_error() || answer.status >= 500 || limited {
        return true;
    }
    ctx.violations
        .add(format!("{what} on {}: {}", sale.sku, answer.text()));
    false
}

/// An admitted user reserves with its token (sent again on a transport failure, with
/// the same key) and the payment service confirms the hold.
async fn buy(ctx: &Ctx, sale: &Sale, rec: &Recorder, i: u64, token: &str, ticket: &Ticket) {
    let Some(admission) = ticket.admission_token.as_deref() else {
        ctx.violations.add(format!(
            "admitted ticket without an admission_token on {}",
            sale.sku
        ));
        return;
    };
    let key = format!("qk{i}");
    let path = format!("/v1/skus/{}/reservations", sale.sku);
    let mut created = None;
    let mut unanswered = false;
    for _ in 0..3 {
        let started = Instant::now();
        let answer = ctx
            .client
            .send_with(
                Method::POST,
                &path,
                Auth::Bearer(token),
                Some(&key),
                Some(("admission-token", admission)),
                Some(Bytes::from_static(RESERVE_BODY)),
            )
            .await;
        let fields = answer.fields();
        let outcome = match (answer.status, answer.error) {
            (_, Some(error)) => intern(error),
            (201, _) if answer.replayed => "replayed",
            (201, _) => "created",
            _ => intern(fields.code.as_deref().unwrap_or("other")),
        };
        rec.record(
            Endpoint::AdmittedReserve,
            started.elapsed(),
            answer.status,
            outcome,
        );
        unanswered = answer.is_transport_error() || answer.status == 503;
        if unanswered {
            continue;
        }
        if answer.status == 201 {
            created = fields.reservation_id;
        } else {
            *sale
                .tally
                .lock()
                .unwrap()
                .reserve_refused
                .entry(format!("{} {outcome}", answer.status))
                .or_default() += 1;
            // A token whose admission lapsed meanwhile is refused: allowed. A unit
            // missing for an admitted user is not (admissions never exceed the units).
            if outcome != "admission_required" {
                ctx.violations.add(format!(
                    "reserve with an admission token on {}: {}",
                    sale.sku,
                    answer.text()
                ));
            }
        }
        break;
    }
    let Some(rid) = created else {
        if unanswered {
            sale.tally.lock().unwrap().reserve_unanswered += 1;
        }
        return;
    };
    sale.tally.lock().unwrap().reserved += 1;
    let payment_ref = format!("pay-{}-q{i}", ctx.run_id);
    for _ in 0..3 {
        let (answer, fields) = ctx.confirm(rec, &rid, &payment_ref).await;
        if answer.is_transport_error() || answer.status == 503 {
            continue;
        }
        if answer.status == 200 && Answer::state(&fields) == Some("confirmed") {
            let at = Instant::now();
            sale.tally.lock().unwrap().bought += 1;
            if sale.sold.fetch_add(1, Ordering::Relaxed) + 1 == sale.stock {
                sale.last_sale.send_replace(Some(at));
            }
        } else {
            ctx.violations
                .add(format!("confirm of admitted hold {rid}: {}", answer.text()));
        }
        return;
    }
}

fn waiting_room(admission_seconds: u32) -> serde_json::Value {
    serde_json::json!({"admission_seconds": admission_seconds, "admit_per_second": 0,
                       "prequeue_shuffle": true})
}

/// Runs the queue phase: joins and the sale on `<base>-q`, the streams on `<base>-qt`.
pub async fn run(
    ctx: &Arc<Ctx>,
    probes: &mut Probes,
    sku_base: &str,
    gateway_pid: Option<u32>,
) -> (Vec<PhaseReport>, Option<QueueReport>) {
    let args = &ctx.args;
    let sku = format!("{sku_base}-q");
    println!(
        "\n== queue: {}{} users join a waiting room at {:.0}/s (open loop); a sale of {} units to them, admissions lapsing after {} s, {:.0}% of the admitted walk away",
        if args.queue_streams > 0 {
            format!("{} open streams told sold_out; then ", args.queue_streams)
        } else {
            String::new()
        },
        args.queue_users,
        args.queue_join_rate,
        args.queue_stock,
        args.queue_admission_seconds,
        args.queue_walk_away * 100.0,
    );
    // The streams first, on a gateway not yet loaded by the sale: its RSS then moves
    // with the streams alone.
    let mut checks = Vec::new();
    let mut phases = Vec::new();
    let streams = if args.queue_streams > 0 {
        let (phase, figures) = streams(ctx, probes, sku_base, gateway_pid).await;
        if let Some(figures) = &figures {
            checks.push(check(
                format!("{}: every open stream told sold_out within 1 s", figures.sku),
                figures.opened as usize == args.queue_streams
                    && figures.told_within_1s == figures.opened,
                format!(
                    "{} of {} streams opened, {} told within 1 s of the last sale, {} told later, {} ended untold, {} never told",
                    figures.opened,
                    args.queue_streams,
                    figures.told_within_1s,
                    figures.told - figures.told_within_1s,
                    figures.ended_untold,
                    figures.never_told
                ),
            ));
        } else {
            checks.push(check(
                "queue streams".to_string(),
                false,
                "could not be run".to_string(),
            ));
        }
        phases.extend(phase);
        figures
    } else {
        None
    };
    // The joins alone, on a SKU of their own: its users join and do nothing more, so
    // that the joins are not measured under the sale's polls.
    let join_sku = format!("{sku_base}-qj");
    println!("\n== queue joins on {join_sku}");
    let Some(join_sale) = define_sale(ctx, &join_sku, "qj", false).await else {
        return (phases, None);
    };
    let start = Instant::now();
    let joins = Arc::new(Recorder::new(start));
    let before = probes.snapshot().await;
    let (mut tasks, unsent) = dispatch(ctx, &join_sale, &joins, &joins, start).await;
    let join_elapsed = start.elapsed();
    let after_joins = probes.snapshot().await;
    tasks.shutdown().await;
    joins.unsent.store(unsent, Ordering::Relaxed);
    let join_phase = crate::phase_report(
        "queue-join",
        format!("open loop {:.0} joins/s", args.queue_join_rate),
        vec![join_sku.clone()],
        ctx.run_start,
        &joins,
        join_elapsed,
        &before,
        &after_joins,
    );
    crate::report::print_phase(&join_phase);
    let join = join_figures(
        &join_phase,
        &join_sku,
        args.queue_users,
        args.queue_join_rate,
        unsent,
    );
    println!(
        "  joins: {} in {:.2} s = {:.0}/s (target {:.0}/s), p50 {:.2} ms, p99 {:.2} ms, {} failed",
        join.joins,
        join.seconds,
        join.joins_per_s,
        args.queue_join_rate,
        join.p50_ms,
        join.p99_ms,
        join.failed
    );

    println!(
        "\n== queue sale on {sku}: the users join at the same rate, then follow their tickets"
    );
    let Some(sale) = define_sale(ctx, &sku, "q", true).await else {
        phases.push(join_phase);
        return (phases, None);
    };
    let mut last_sale_rx = sale.last_sale.subscribe();
    let start = Instant::now();
    let rec = Arc::new(Recorder::new(start));
    let before_sale = probes.snapshot().await;
    let (mut tasks, _) = dispatch(ctx, &sale, &rec, &rec, start).await;

    // The sale goes on until the last unit is sold, or the time is up.
    let deadline = start + args.queue_timeout;
    let sold_out_at =
        tokio::time::timeout_at(deadline.into(), last_sale_rx.wait_for(|at| at.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|at| *at));
    let sale_end = sold_out_at.unwrap_or_else(Instant::now);
    if sold_out_at.is_some() {
        // Let those near the front read it, as they would.
        tokio::time::sleep(SOLD_OUT_GRACE).await;
    }
    tasks.shutdown().await;
    let elapsed = start.elapsed();
    let after = probes.snapshot().await;
    let sale_phase = crate::phase_report(
        "queue-sale",
        format!(
            "open loop {:.0} joins/s, then users poll when told",
            args.queue_join_rate
        ),
        vec![sku.clone()],
        ctx.run_start,
        &rec,
        elapsed,
        &before_sale,
        &after,
    );
    crate::report::print_phase(&sale_phase);

    let mut figures = sale_figures(ctx, &sale, &sale_phase, start, sale_end, sold_out_at).await;
    // The queue's counters, straight from Redis (the SKU's slot).
    if let Ok(mut redis) = crate::redis_connection(&args.redis_url).await {
        let prefix = format!("fg:{{{sku}}}:");
        let served: Option<u64> = redis::cmd("HGET")
            .arg(format!("{prefix}q:state"))
            .arg("served")
            .query_async(&mut redis)
            .await
            .ok()
            .flatten();
        let used: Option<u64> = redis::cmd("HLEN")
            .arg(format!("{prefix}q:used"))
            .query_async(&mut redis)
            .await
            .ok();
        let live: Option<u64> = redis::cmd("ZCARD")
            .arg(format!("{prefix}q:admits"))
            .query_async(&mut redis)
            .await
            .ok();
        figures.admissions = served;
        figures.admissions_used = used;
        figures.admissions_live = live;
        if let (Some(s), Some(u), Some(l)) = (served, used, live) {
            figures.lapses = Some(s.saturating_sub(u + l));
        }
    }
    match ctx.client.get_sku(&sku).await {
        Ok(view) => {
            figures.sold = view.sold;
            checks.push(check(
                format!("{sku}: the sale sold out"),
                view.sold == view.stock_total && sold_out_at.is_some(),
                format!(
                    "sold {} of {} (available {}, held {}); {} units answered 200 confirmed; {}",
                    view.sold,
                    view.stock_total,
                    view.available,
                    view.held,
                    sale.sold.load(Ordering::Relaxed),
                    figures
                        .sell_out_s
                        .map_or("not sold out in time".into(), |s| format!(
                            "sold out {s:.1} s after the first join"
                        ))
                ),
            ));
        }
        Err(e) => checks.push(check(
            format!("{sku}: the sale sold out"),
            false,
            format!("{e:#}"),
        )),
    }
    if let (Some(admissions), Some(used)) = (figures.admissions, figures.admissions_used) {
        // One admission, one hold: every used admission is a hold answered 201 (or a
        // reserve that went unanswered). A hold whose confirm failed expires, and its
        // unit admits another user: used may exceed sold.
        let (reserved, unanswered) = (figures.reserved, figures.reserve_unanswered);
        checks.push(check(
            format!("{sku}: admissions used == holds answered 201"),
            used >= reserved && used <= reserved + unanswered,
            format!(
                "{admissions} admissions, {used} used; {reserved} holds answered 201 (+{unanswered} unanswered reserves), {} units sold",
                figures.sold
            ),
        ));
    }
    if sold_out_at.is_some() {
        let (read, sold_out) = read_sample(ctx, &sale).await;
        figures.sample_read = read;
        figures.sample_sold_out = sold_out;
        checks.push(check(
            format!("{sku}: waiting tickets read sold_out after the sell-out"),
            read == sold_out,
            format!(
                "{sold_out} of {read} sampled users still waiting (of {}) read sold_out",
                figures.still_waiting
            ),
        ));
    }
    print_sale(&figures);

    phases.extend([join_phase, sale_phase]);
    for c in &checks {
        println!(
            "  [{}] {}: {}",
            if c.ok { " ok " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let passed = checks.iter().all(|c| c.ok);
    let report = QueueReport {
        join,
        sale: figures,
        streams,
        checks,
        passed,
    };
    (phases, Some(report))
}

/// Defines a sale of `--queue-stock` units with a waiting room; None (said) if it fails.
async fn define_sale(
    ctx: &Arc<Ctx>,
    sku: &str,
    user_prefix: &'static str,
    follow: bool,
) -> Option<Arc<Sale>> {
    let args = &ctx.args;
    let definition = serde_json::json!({"stock": args.queue_stock, "per_user_limit": 1,
        "hold_seconds": 60, "waiting_room": waiting_room(args.queue_admission_seconds)});
    match ctx.client.define_sku(sku, definition).await {
        Ok(view) if view.available == args.queue_stock => {}
        Ok(view) => {
            println!("  queue: {sku} was not fresh: {view:?}");
            return None;
        }
        Err(e) => {
            println!("  queue: cannot define {sku}: {e:#}");
            return None;
        }
    }
    let users = args.queue_users;
    Some(Arc::new(Sale {
        queue_path: format!("/v1/skus/{sku}/queue"),
        sku: sku.to_string(),
        user_prefix,
        follow,
        stock: args.queue_stock,
        admission_seconds: f64::from(args.queue_admission_seconds),
        walk_away: args.queue_walk_away,
        sold: AtomicU64::new(0),
        last_sale: watch::channel(None).0,
        joins_answered: AtomicU64::new(0),
        states: (0..users).map(|_| AtomicU8::new(WAITING)).collect(),
        tally: Mutex::new(Tally::default()),
    }))
}

/// Starts `--queue-users` users of `sale` in an open loop at `--queue-join-rate` and
/// waits until every join sent was answered. Returns the users' tasks (still running
/// when they follow their tickets) and how many joins were never sent.
async fn dispatch(
    ctx: &Arc<Ctx>,
    sale: &Arc<Sale>,
    joins: &Arc<Recorder>,
    rec: &Arc<Recorder>,
    start: Instant,
) -> (tokio::task::JoinSet<()>, u64) {
    let args = &ctx.args;
    let users = args.queue_users;
    let window = Duration::from_secs_f64(users as f64 / args.queue_join_rate);
    let mut tasks = tokio::task::JoinSet::new();
    let unsent = load::dispatch_open_loop(
        start,
        start + window,
        args.queue_join_rate,
        args.max_in_flight,
        |i, intended, permit| {
            if i >= users {
                return;
            }
            let (ctx, sale, joins, rec) = (ctx.clone(), sale.clone(), joins.clone(), rec.clone());
            tasks.spawn(sale_user(ctx, sale, joins, rec, i, intended, permit));
        },
    )
    .await;
    let sent = users.saturating_sub(unsent);
    while sale.joins_answered.load(Ordering::Relaxed) < sent
        && start.elapsed() < window + args.timeout * 2
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (tasks, unsent)
}

fn check(name: String, ok: bool, detail: String) -> Check {
    Check { name, ok, detail }
}

fn join_figures(phase: &PhaseReport, sku: &str, users: u64, rate: f64, unsent: u64) -> JoinFigures {
    let e = phase.endpoint("queue_join");
    let joins = e.map_or(0, |e| {
        e.outcomes
            .iter()
            .filter(|(k, _)| k.starts_with("200 "))
            .map(|(_, n)| n)
            .sum()
    });
    let count = e.map_or(0, |e| e.count);
    JoinFigures {
        sku: sku.to_string(),
        users,
        target_rate: rate,
        joins,
        joins_per_s: joins as f64 / phase.duration_s.max(1e-9),
        seconds: phase.duration_s,
        p50_ms: e.map_or(0.0, |e| e.p50_ms),
        p90_ms: e.map_or(0.0, |e| e.p90_ms),
        p99_ms: e.map_or(0.0, |e| e.p99_ms),
        max_ms: e.map_or(0.0, |e| e.max_ms),
        failed: count - joins,
        unsent,
        start_lag_p99_ms: phase.start_lag.as_ref().map(|l| l.p99_ms),
    }
}

async fn sale_figures(
    ctx: &Ctx,
    sale: &Sale,
    phase: &PhaseReport,
    start: Instant,
    sale_end: Instant,
    sold_out_at: Option<Instant>,
) -> SaleFigures {
    let args = &ctx.args;
    let mut tally = std::mem::take(&mut *sale.tally.lock().unwrap());
    let polls = phase.endpoint("queue_poll").map_or(0, |e| e.count);
    let window = sale_end.duration_since(start).as_secs_f64();
    let mut told: Vec<f64> = match sold_out_at {
        Some(last) => tally
            .told_by_poll
            .iter()
            .map(|at| at.saturating_duration_since(last).as_secs_f64())
            .collect(),
        None => Vec::new(),
    };
    let still_waiting = sale
        .states
        .iter()
        .filter(|s| s.load(Ordering::Relaxed) == WAITING)
        .count() as u64;
    SaleFigures {
        stock: args.queue_stock,
        admission_seconds: args.queue_admission_seconds,
        walk_away: args.queue_walk_away,
        sold_out: sold_out_at.is_some(),
        sell_out_s: sold_out_at.map(|at| at.duration_since(start).as_secs_f64()),
        sold: 0,
        admissions: None,
        admissions_used: None,
        admissions_live: None,
        lapses: None,
        seen_admitted: tally.seen_admitted,
        walked_away: tally.walked_away,
        reserved: tally.reserved,
        reserve_unanswered: tally.reserve_unanswered,
        bought: tally.bought,
        unseen_lapses: tally.unseen_lapses,
        reserve_refused: std::mem::take(&mut tally.reserve_refused),
        polls,
        polls_per_s: (window > 0.0).then(|| polls as f64 / window),
        told_by_poll: tally.told_by_poll.len() as u64,
        told_by_poll_p50_s: quantile(&mut told, 0.5),
        told_by_poll_p99_s: quantile(&mut told, 0.99),
        still_waiting,
        sample_read: 0,
        sample_sold_out: 0,
        eta_users: tally.eta_first.len() as u64,
        eta_first_error_p50_s: quantile(&mut tally.eta_first, 0.5),
        eta_first_error_p90_s: quantile(&mut tally.eta_first, 0.9),
        eta_last_error_p50_s: quantile(&mut tally.eta_last, 0.5),
        eta_last_error_p90_s: quantile(&mut tally.eta_last, 0.9),
        eta_first_bias_p50_s: quantile(&mut tally.eta_first_signed, 0.5),
    }
}

/// Reads the ticket of a sample of the users still waiting: (read, `sold_out`).
async fn read_sample(ctx: &Ctx, sale: &Sale) -> (u64, u64) {
    let waiting: Vec<usize> = sale
        .states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.load(Ordering::Relaxed) == WAITING)
        .map(|(i, _)| i)
        .collect();
    let step = (waiting.len() / SOLD_OUT_SAMPLE).max(1);
    let rec = Recorder::new(Instant::now());
    let (mut read, mut sold_out) = (0, 0);
    for i in waiting.iter().step_by(step).take(SOLD_OUT_SAMPLE) {
        let token = ctx.token_for(&format!("{}{i}", sale.user_prefix));
        let ticket = ticket_call(
            ctx,
            &rec,
            Endpoint::QueuePoll,
            Method::GET,
            &sale.queue_path,
            &token,
            Instant::now(),
        )
        .await;
        read += 1;
        if ticket.is_ok_and(|t| t.state == "sold_out") {
            sold_out += 1;
        }
    }
    (read, sold_out)
}

fn print_sale(s: &SaleFigures) {
    let n = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
    println!(
        "  sale: {} of {} units sold{}; admissions {} (used {}, lapsed {}, unused at the end {})",
        s.sold,
        s.stock,
        s.sell_out_s.map_or(" (NOT sold out)".into(), |t| format!(
            ", sold out {t:.1} s after the first join"
        )),
        n(s.admissions),
        n(s.admissions_used),
        n(s.lapses),
        n(s.admissions_live)
    );
    println!(
        "  users: {} saw their admission ({} walked away, {} reserved, {} bought), {} found it lapsed before they looked; refused reserves {:?}",
        s.seen_admitted, s.walked_away, s.reserved, s.bought, s.unseen_lapses, s.reserve_refused
    );
    println!(
        "  polls: {} = {} per second until the sell-out; {} told sold_out by their own poll (p50 {} s, p99 {} s after the last sale), {} still waiting when polling stopped",
        s.polls,
        s.polls_per_s.map_or("?".into(), |v| format!("{v:.0}")),
        s.told_by_poll,
        f2(s.told_by_poll_p50_s),
        f2(s.told_by_poll_p99_s),
        s.still_waiting
    );
    println!(
        "  eta_seconds error over {} admitted users: first estimate p50 {} s, p90 {} s (median bias {} s: + = admitted later than said); last estimate p50 {} s, p90 {} s",
        s.eta_users,
        f2(s.eta_first_error_p50_s),
        f2(s.eta_first_error_p90_s),
        f2(s.eta_first_bias_p50_s),
        f2(s.eta_last_error_p50_s),
        f2(s.eta_last_error_p90_s)
    );
}

/// The streams: waiting users of a small sale hold streams open; its admitted users buy
/// it out; every stream must say `sold_out` within 1 s of the last sale.
async fn streams(
    ctx: &Arc<Ctx>,
    probes: &mut Probes,
    sku_base: &str,
    gateway_pid: Option<u32>,
) -> (Option<PhaseReport>, Option<StreamFigures>) {
    let args = &ctx.args;
    let n = args.queue_streams;
    let sku = format!("{sku_base}-qt");
    println!(
        "\n== queue streams: {n} waiting users of {sku} hold a stream open; {STREAM_SALE_UNITS} admitted users buy its {STREAM_SALE_UNITS} units"
    );
    // Admissions must outlast the opening of the streams.
    let definition = serde_json::json!({"stock": STREAM_SALE_UNITS, "per_user_limit": 1,
        "hold_seconds": 60, "waiting_room": waiting_room(600)});
    if let Err(e) = ctx.client.define_sku(&sku, definition).await {
        println!("  cannot define {sku}: {e:#}");
        return (None, None);
    }
    let start = Instant::now();
    let rec = Arc::new(Recorder::new(start));
    let before = probes.snapshot().await;
    let path = format!("/v1/skus/{sku}/queue");
    // The buyers first: the stock admits exactly them.
    let mut buyers = Vec::new();
    for b in 0..STREAM_SALE_UNITS {
        let token = ctx.token_for(&format!("qtb{b}"));
        match ticket_call(
            ctx,
            &rec,
            Endpoint::QueueJoin,
            Method::POST,
            &path,
            &token,
            Instant::now(),
        )
        .await
        {
            Ok(t) if t.state == "admitted" => buyers.push((b, token, t)),
            Ok(t) => {
                println!("  buyer {b} was not admitted on joining: {}", t.state);
                return (None, None);
            }
            Err(answer) => {
                println!("  buyer {b} could not join: {}", answer.text());
                return (None, None);
            }
        }
    }
    // Then the waiting users, 64 joins in flight.
    let gate = Arc::new(Semaphore::new(64));
    let mut joining = tokio::task::JoinSet::new();
    for w in 0..n {
        let (ctx, rec, path, gate) = (ctx.clone(), rec.clone(), path.clone(), gate.clone());
        joining.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let token = ctx.token_for(&format!("qtw{w}"));
            let ticket = ticket_call(
                &ctx,
                &rec,
                Endpoint::QueueJoin,
                Method::POST,
                &path,
                &token,
                Instant::now(),
            )
            .await;
            (token, ticket.ok().map(|t| t.state))
        });
    }
    let mut tokens = Vec::with_capacity(n);
    while let Some(joined) = joining.join_next().await {
        match joined {
            Ok((token, Some(state))) if state == "waiting" => tokens.push(token),
            Ok((_, state)) => {
                println!("  a streaming user's join: {state:?} (not waiting)");
            }
            Err(_) => {}
        }
    }
    // Settle, so that the RSS before counts the joins' buffers, not the streams'.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = gateway_pid.and_then(crate::probe::rss_kb);
    let open_started = Instant::now();
    let stream_path = format!("/v1/skus/{sku}/queue/stream");
    let told: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; tokens.len()]));
    let opened = Arc::new(AtomicU64::new(0));
    let ended_untold = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let dial = Arc::new(Semaphore::new(STREAM_DIAL_CONCURRENCY));
    let mut holders = tokio::task::JoinSet::new();
    for (s, token) in tokens.iter().enumerate() {
        let (ctx, told, opened, ended_untold, failures, failed, dial, stream_path, token) = (
            ctx.clone(),
            told.clone(),
            opened.clone(),
            ended_untold.clone(),
            failures.clone(),
            failed.clone(),
            dial.clone(),
            stream_path.clone(),
            token.clone(),
        );
        holders.spawn(async move {
            let permit = dial.acquire_owned().await;
            let events = tokio::time::timeout(
                STREAM_OPEN_TIMEOUT,
                EventStream::open(&ctx.client, &stream_path, &token),
            )
            .await
            .unwrap_or_else(|_| Err("timeout".into()));
            drop(permit);
            let mut events = match events {
                Ok(events) => events,
                Err(why) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let mut f = failures.lock().unwrap();
                    if f.len() < 5 {
                        f.push(why);
                    }
                    return;
                }
            };
            opened.fetch_add(1, Ordering::Relaxed);
            loop {
                match events.next().await {
                    Ok(Some(event)) => {
                        let state = serde_json::from_str::<Ticket>(&event.data)
                            .map(|t| t.state)
                            .unwrap_or_default();
                        if event.name == "ticket" && (state == "sold_out" || state == "closed") {
                            let at = Instant::now();
                            told.lock().unwrap()[s] = Some(at);
                            // Hold the connection: the gateway ends it, or the harness does.
                            while let Ok(Some(_)) = events.next().await {}
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        ended_untold.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
    }
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < tokens.len() as u64
        && open_started.elapsed() < STREAM_OPEN_TIMEOUT
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_seconds = open_started.elapsed().as_secs_f64();
    // Each stream's first event is written by now; let the allocator settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = gateway_pid.and_then(crate::probe::rss_kb);
    let opened_n = opened.load(Ordering::Relaxed);
    println!(
        "  {opened_n} streams open in {open_seconds:.1} s ({} failed{}); gateway RSS {} -> {} KiB",
        failed.load(Ordering::Relaxed),
        {
            let f = failures.lock().unwrap();
            if f.is_empty() {
                String::new()
            } else {
                format!(": {}", f.join("; "))
            }
        },
        rss_before.map_or("?".into(), |v| v.to_string()),
        rss_after.map_or("?".into(), |v| v.to_string())
    );

    // The sale: every buyer but the last reserves and is paid; then the last unit,
    // alone, so that the last sale is known to within its confirm.
    let sale_path = format!("/v1/skus/{sku}/reservations");
    let mut last_confirm = None;
    let count = buyers.len();
    for (k, (b, token, ticket)) in buyers.iter().enumerate() {
        let admission = ticket.admission_token.clone().unwrap_or_default();
        let key = format!("qtk{b}");
        let started = Instant::now();
        let answer = ctx
            .client
            .send_with(
                Method::POST,
                &sale_path,
                Auth::Bearer(token),
                Some(&key),
                Some(("admission-token", &admission)),
                Some(Bytes::from_static(RESERVE_BODY)),
            )
            .await;
        let fields = answer.fields();
        rec.record(
            Endpoint::AdmittedReserve,
            started.elapsed(),
            answer.status,
            if answer.status == 201 {
                "created"
            } else {
                intern(fields.code.as_deref().unwrap_or("other"))
            },
        );
        let Some(rid) = fields.reservation_id.filter(|_| answer.status == 201) else {
            println!("  buyer {b}'s reserve: {}", answer.text());
            continue;
        };
        let sent = Instant::now();
        let (confirm, confirm_fields) = ctx
            .confirm(&rec, &rid, &format!("pay-{}-qt{b}", ctx.run_id))
            .await;
        if confirm.status != 200 || Answer::state(&confirm_fields) != Some("confirmed") {
            println!("  buyer {b}'s confirm: {}", confirm.text());
        }
        if k + 1 == count {
            last_confirm = Some((sent, Instant::now()));
        }
    }
    let sold = ctx.client.get_sku(&sku).await.map(|v| v.sold).unwrap_or(0);
    let Some((last_sent, last_answered)) = last_confirm.filter(|_| sold == STREAM_SALE_UNITS)
    else {
        println!("  the streams' sale did not sell out: sold {sold} of {STREAM_SALE_UNITS}");
        holders.shutdown().await;
        return (None, None);
    };
    let waited = Instant::now();
    while told.lock().unwrap().iter().filter(|t| t.is_some()).count() as u64
        + ended_untold.load(Ordering::Relaxed)
        < opened_n
        && waited.elapsed() < STREAM_TOLD_TIMEOUT
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holders.shutdown().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_closed = gateway_pid.and_then(crate::probe::rss_kb);
    let after = probes.snapshot().await;
    let mut delays: Vec<f64> = told
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|at| {
            if *at >= last_sent {
                at.duration_since(last_sent).as_secs_f64() * 1000.0
            } else {
                -(last_sent.duration_since(*at).as_secs_f64() * 1000.0)
            }
        })
        .collect();
    let told_n = delays.len() as u64;
    let within = delays
        .iter()
        .filter(|d| **d <= STREAM_TOLD_WITHIN_MS)
        .count() as u64;
    let ended = ended_untold.load(Ordering::Relaxed);
    let figures = StreamFigures {
        sku: sku.clone(),
        streams: n,
        opened: opened_n,
        failed: failed.load(Ordering::Relaxed),
        failures: failures.lock().unwrap().clone(),
        open_seconds,
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        rss_closed_kb: rss_closed,
        bytes_per_stream: match (rss_before, rss_after) {
            (Some(b), Some(a)) if opened_n > 0 => {
                Some((a as f64 - b as f64) * 1024.0 / opened_n as f64)
            }
            _ => None,
        },
        last_confirm_ms: last_answered.duration_since(last_sent).as_secs_f64() * 1000.0,
        told: told_n,
        told_within_1s: within,
        ended_untold: ended,
        never_told: opened_n.saturating_sub(told_n + ended),
        told_min_ms: quantile(&mut delays, 0.0),
        told_p50_ms: quantile(&mut delays, 0.5),
        told_p90_ms: quantile(&mut delays, 0.9),
        told_p99_ms: quantile(&mut delays, 0.99),
        told_max_ms: quantile(&mut delays, 1.0),
    };
    println!(
        "  told sold_out: {} of {} streams, {} within 1 s of the last sale; delay min {} ms, p50 {}, p90 {}, p99 {}, max {} (the last confirm took {:.1} ms); {} ended untold, {} never told",
        figures.told,
        figures.opened,
        figures.told_within_1s,
        f2(figures.told_min_ms),
        f2(figures.told_p50_ms),
        f2(figures.told_p90_ms),
        f2(figures.told_p99_ms),
        f2(figures.told_max_ms),
        figures.last_confirm_ms,
        figures.ended_untold,
        figures.never_told
    );
    println!(
        "  gateway memory per open stream: {} bytes (RSS {} -> {} KiB over {} streams; {} KiB once closed)",
        figures
            .bytes_per_stream
            .map_or("?".into(), |b| format!("{b:.0}")),
        rss_before.map_or("?".into(), |v| v.to_string()),
        rss_after.map_or("?".into(), |v| v.to_string()),
        opened_n,
        rss_closed.map_or("?".into(), |v| v.to_string())
    );
    let phase = crate::phase_report(
        "queue-streams",
        format!("{n} streams held open"),
        vec![sku],
        ctx.run_start,
        &rec,
        start.elapsed(),
        &before,
        &after,
    );
    (Some(phase), Some(figures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), Some(3.0));
        assert_eq!(quantile(&mut v, 0.9), Some(5.0));
        assert_eq!(quantile(&mut v, 1.0), Some(5.0));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn a_ticket_reads_with_or_without_its_optional_fields() {
        let t: Ticket = serde_json::from_str(
            r#"{"sku":"s","user_id":"u","position":3,"state":"admitted","ahead":0,"eta_seconds":null,
                "admission_token":"a.b","admitted_until":"2026-12-06T13:00:00.000Z","retry_after_ms":500}"#,
        )
        .unwrap();
        assert_eq!(t.state, "admitted");
        assert_eq!(t.admission_token.as_deref(), Some("a.b"));
        let at = rfc3339_seconds(t.admitted_until.as_deref().unwrap()).unwrap();
        assert_eq!(at, 1_796_562_000.0);
        let t: Ticket = serde_json::from_str(
            r#"{"state":"closed","position":null,"ahead":0,"eta_seconds":null,"lapsed":true,"retry_after_ms":0}"#,
        )
        .unwrap();
        assert!(t.lapsed && t.eta_seconds.is_none());
    }
}
