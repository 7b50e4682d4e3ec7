//! The validation phase: after the load, compare what the gateway acknowledged (the
//! ledger) with what the API and MySQL hold. Every check is named, and any failed one
//! makes the run exit 1.

use crate::client::Method;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::MySqlPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::PhaseName;
use crate::client::{Answer, Auth};
use crate::load::Ctx;
use crate::stats::{Endpoint, Recorder};

/// Late payments sent on expired holds at most (they are sequential-ish and slow).
const LATE_PAY_MAX: usize = 500;
/// Concurrent requests of the validation's own reads and late payments.
const FAN_OUT: usize = 32;
/// Slack on the contract's 1 s bounds (expiry return, sold-out reopen): the harness
/// polls, and its clock is not the Redis clock.
const SLACK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// A SKU this run created and what it was for.
#[derive(Debug, Clone)]
pub struct SkuPlan {
    pub sku: String,
    pub phase: PhaseName,
    pub stock: u64,
    /// The body of its admin PUT.
    pub definition: serde_json::Value,
}

#[derive(Default)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    fn add(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let check = Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        };
        println!(
            "  [{}] {}: {}",
            if check.ok { " ok " } else { "FAIL" },
            check.name,
            check.detail
        );
        self.0.push(check);
    }
}

pub struct Validation {
    pub checks: Vec<Check>,
    pub flush_seconds: Option<f64>,
    pub reopen_ms: Option<f64>,
    pub expiry_return_ms: Option<f64>,
}

pub async fn run(
    ctx: &Arc<Ctx>,
    db: Option<&MySqlPool>,
    plans: &[SkuPlan],
    sweep_interval: Duration,
) -> Result<Validation> {
    let mut checks = Checks::default();
    let mut result = Validation {
        checks: Vec::new(),
        flush_seconds: None,
        reopen_ms: None,
        expiry_return_ms: None,
    };
    let rec = Arc::new(Recorder::new(Instant::now()));

    let violations = ctx.violations.count.load(Ordering::Relaxed);
    let samples = ctx.violations.samples.lock().unwrap().clone();
    checks.add(
        "every answer during the load was one the contract allows",
        violations == 0,
        if violations == 0 {
            "0 unexpected answers".to_string()
        } else {
            format!(
                "{violations} unexpected answers, e.g.\n      {}",
                samples.join("\n      ")
            )
        },
    );

    // ---- expiry: abandoned holds must come back to `available`
    let mixed: Vec<&SkuPlan> = plans
        .iter()
        .filter(|p| p.phase == PhaseName::Mixed)
        .collect();
    let last_abandon = {
        let ledger = ctx.ledger.lock().unwrap();
        mixed
            .iter()
            .filter_map(|p| ledger.get(&p.sku))
            .flat_map(|l| l.abandoned.iter().map(|(_, at)| *at))
            .max()
    };
    if !mixed.is_empty() {
        let hold = Duration::from_secs(ctx.args.hold_seconds);
        let deadline = last_abandon.map(|at| at + hold);
        if let Some(deadline) = deadline {
            let wait = deadline.saturating_duration_since(Instant::now());
            println!(
                "  waiting {:.1} s for the last abandoned hold to expire",
                wait.as_secs_f64()
            );
            tokio::time::sleep(wait).await;
        }
        let since = deadline.unwrap_or_else(Instant::now);
        let bound = sweep_interval + SLACK;
        let mut returned_at = None;
        let check_started = Instant::now();
        let mut first_poll = true;
        let mut back_at_first_poll = false;
        let give_up = Instant::now() + bound + Duration::from_secs(5);
        loop {
            let mut all = true;
            for plan in &mixed {
                let ambiguous = ctx.with_ledger(&plan.sku, |l| {
                    l.ambiguous_confirms.values().sum::<u64>() + l.ambiguous_reserve_units
                });
                match ctx.client.get_sku(&plan.sku).await {
                    Ok(view) if view.held <= ambiguous => {}
                    _ => all = false,
                }
            }
            if all {
                returned_at = Some(Instant::now());
                back_at_first_poll = first_poll;
                break;
            }
            first_poll = false;
            if Instant::now() > give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match returned_at {
            // A long run's last abandoned hold may have expired long before this check
            // began: all we can tell is that it was back when first looked at.
            Some(_)
                if back_at_first_poll && check_started.saturating_duration_since(since) > bound =>
            {
                checks.add(
                    "expired holds return to available in time",
                    true,
                    format!(
                        "held was already 0 on every mixed SKU when checked, {:.0} ms after the last deadline",
                        check_started.saturating_duration_since(since).as_secs_f64() * 1000.0
                    ),
                );
            }
            Some(at) => {
                let ms = at.saturating_duration_since(since).as_secs_f64() * 1000.0;
                result.expiry_return_ms = Some(ms);
                checks.add(
                    "expired holds return to available in time",
                    at.saturating_duration_since(since) <= bound,
                    format!(
                        "held reached 0 on every mixed SKU {ms:.0} ms after the last deadline (bound {} ms)",
                        bound.as_millis()
                    ),
                );
            }
            None => checks.add(
                "expired holds return to available in time",
                false,
                format!(
                    "held still above 0 on a mixed SKU {} s after the last deadline",
                    (bound + Duration::from_secs(5)).as_secs()
                ),
            ),
        }
        late_payments_on_expired(ctx, &rec, &mixed, &mut checks).await;
    }

    // ---- reservation states read back through the API
    read_back(ctx, &rec, &mixed, &mut checks).await;

    // ---- sold-out reopen: returned stock must be sellable again within 1 s
    for plan in plans.iter().filter(|p| p.phase == PhaseName::Soldout) {
        let (holds, cancels) =
            ctx.with_ledger(&plan.sku, |l| (l.holds.clone(), l.reopen_cancels.clone()));
        if cancels.is_empty() {
            continue;
        }
        let resold: Vec<Instant> = holds
            .iter()
            .skip(plan.stock as usize)
            .map(|(_, at)| *at)
            .collect();
        let mut worst = Duration::ZERO;
        for (resale, cancel) in resold.iter().zip(&cancels) {
            worst = worst.max(resale.saturating_duration_since(*cancel));
        }
        let all_resold = resold.len() == cancels.len();
        if all_resold {
            result.reopen_ms = Some(worst.as_secs_f64() * 1000.0);
        }
        checks.add(
            "sold-out SKU reopens for returned stock",
            all_resold && worst <= Duration::from_secs(1) + SLACK,
            format!(
                "{} units cancelled, {} sold again{}",
                cancels.len(),
                resold.len(),
                if all_resold {
                    format!(
                        ", the last {:.0} ms after its cancel (bound 1000 ms)",
                        worst.as_secs_f64() * 1000.0
                    )
                } else {
                    String::new()
                }
            ),
        );
    }

    // ---- the flush to MySQL
    let flush_started = Instant::now();
    let flush_deadline = flush_started + ctx.args.flush_timeout;
    let mut flushed = false;
    let mut last_backlog = None;
    while Instant::now() < flush_deadline {
        match ctx.client.outbox_backlog().await {
            Ok(Some(0)) => {
                flushed = true;
                break;
            }
            Ok(backlog) => last_backlog = backlog,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let flush_s = flush_started.elapsed().as_secs_f64();
    if flushed {
        result.flush_seconds = Some(flush_s);
    }
    checks.add(
        "outbox flushed to MySQL",
        flushed,
        if flushed {
            format!("/readyz outbox_backlog reached 0 after {flush_s:.1} s")
        } else {
            format!(
                "outbox_backlog still {} after {} s",
                last_backlog.map_or("unreported".to_string(), |b| b.to_string()),
                ctx.args.flush_timeout.as_secs()
            )
        },
    );

    // ---- counters and ledgers, per SKU
    for plan in plans {
        check_sku(ctx, db, plan, &mut checks).await;
    }
    result.checks = checks.0;
    Ok(result)
}

async fn late_payments_on_expired(
    ctx: &Arc<Ctx>,
    rec: &Arc<Recorder>,
    mixed: &[&SkuPlan],
    checks: &mut Checks,
) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x1a7e);
    let mut targets: Vec<(String, String)> = Vec::new();
    for plan in mixed {
        let abandoned = ctx.with_ledger(&plan.sku, |l| l.abandoned.clone());
        for (rid, _) in abandoned {
            if rng.random_bool(ctx.args.late_pay_ratio) {
                targets.push((plan.sku.clone(), rid));
            }
        }
    }
    targets.shuffle(&mut rng);
    targets.truncate(LATE_PAY_MAX);
    if targets.is_empty() {
        return;
    }
    let total = targets.len();
    let mut wrong = Vec::new();
    for chunk in targets.chunks(FAN_OUT) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (sku, rid)) in chunk.iter().cloned().enumerate() {
            let (ctx, rec) = (ctx.clone(), rec.clone());
            tasks.spawn(async move {
                let payment_ref = format!(
                    "pay-{}-expired-{i}-{}",
                    ctx.run_id,
                    &rid[rid.len().saturating_sub(6)..]
                );
                let (answer, fields) = ctx.confirm(&rec, &rid, &payment_ref).await;
                let refunded = ctx.note_refund(&sku, &rid, &payment_ref, &answer, &fields)
                    && fields.code.as_deref() == Some("reservation_expired");
                (!refunded).then(|| format!("{rid}: {}", answer.text()))
            });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Some(w)) = done {
                wrong.push(w);
            }
        }
    }
    checks.add(
        "payments after expiry are refused with refund_required",
        wrong.is_empty(),
        format!(
            "{} of {total} late payments answered 409 reservation_expired + refund_required{}",
            total - wrong.len(),
            wrong
                .first()
                .map(|w| format!("; e.g. {w}"))
                .unwrap_or_default()
        ),
    );
}

async fn read_back(ctx: &Arc<Ctx>, rec: &Arc<Recorder>, mixed: &[&SkuPlan], checks: &mut Checks) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x5ead);
    let mut expected: Vec<(String, &'static str)> = Vec::new();
    for plan in mixed {
        ctx.with_ledger(&plan.sku, |l| {
            expected.extend(l.confirmed.keys().map(|rid| (rid.clone(), "confirmed")));
            expected.extend(l.cancelled.iter().map(|rid| (rid.clone(), "cancelled")));
            expected.extend(l.abandoned.iter().map(|(rid, _)| (rid.clone(), "expired")));
        });
    }
    if expected.is_empty() {
        return;
    }
    expected.shuffle(&mut rng);
    expected.truncate(ctx.args.validate_sample);
    let total = expected.len();
    let mut wrong = Vec::new();
    for chunk in expected.chunks(FAN_OUT) {
        let mut tasks = tokio::task::JoinSet::new();
        for (rid, state) in chunk.iter().cloned() {
            let (ctx, rec) = (ctx.clone(), rec.clone());
            tasks.spawn(async move {
                let (answer, fields) = ctx
                    .call(
                        &rec,
                        Endpoint::GetReservation,
                        Method::GET,
                        &format!("/v1/reservations/{rid}"),
                        Auth::Service,
                        None,
                        None,
                        Instant::now(),
                    )
                    .await;
                let got = Answer::state(&fields).map(str::to_string);
                (answer.status != 200 || got.as_deref() != Some(state))
                    .then(|| format!("{rid}: expected {state}, got {}", answer.text()))
            });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Some(w)) = done {
                wrong.push(w);
            }
        }
    }
    checks.add(
        "reservations read back in the state their answers promised",
        wrong.is_empty(),
        format!(
            "{} of {total} sampled reservations (confirmed / cancelled / expired) as expected{}",
            total - wrong.len(),
            wrong
                .first()
                .map(|w| format!("; e.g. {w}"))
                .unwrap_or_default()
        ),
    );
}

async fn check_sku(ctx: &Arc<Ctx>, db: Option<&MySqlPool>, plan: &SkuPlan, checks: &mut Checks) {
    let sku = &plan.sku;
    let (created, ambiguous_reserve, confirmed, ambiguous_confirms, refunds, reopened) = ctx
        .with_ledger(sku, |l| {
            (
                l.created_units,
                l.ambiguous_reserve_units,
                l.confirmed.clone(),
                l.ambiguous_confirms.clone(),
                l.refunds.clone(),
                l.reopen_cancels.len() as u64,
            )
        });
    let confirmed_units: u64 = confirmed.values().map(|(_, q)| q).sum();
    let ambiguous_confirm_units: u64 = ambiguous_confirms.values().sum();

    // Redis, through the API.
    let view = match ctx.client.get_sku(sku).await {
        Ok(view) => view,
        Err(e) => {
            checks.add(format!("{sku}: counters"), false, format!("{e:#}"));
            return;
        }
    };
    let balanced = view.available + view.held + view.sold == view.stock_total;
    checks.add(
        format!("{sku}: available + held + sold == stock_total"),
        balanced && view.stock_total == plan.stock,
        format!(
            "{} + {} + {} = {} (stock_total {}, defined {})",
            view.available,
            view.held,
            view.sold,
            view.available + view.held + view.sold,
            view.stock_total,
            plan.stock
        ),
    );
    match plan.phase {
        PhaseName::Mixed => {
            let ok = view.sold >= confirmed_units
                && view.sold <= confirmed_units + ambiguous_confirm_units;
            checks.add(
                format!("{sku}: sold == units the harness saw confirmed"),
                ok,
                format!(
                    "sold {} in Redis, {} units answered 200 confirmed (+{} unanswered confirms)",
                    view.sold, confirmed_units, ambiguous_confirm_units
                ),
            );
        }
        PhaseName::Ceiling | PhaseName::Queue => {}
        PhaseName::Reserve | PhaseName::Soldout | PhaseName::Abuse | PhaseName::Overload => {
            let live = view.held + view.sold;
            let expected = created - reopened;
            let ok = live >= expected && live <= expected + ambiguous_reserve;
            checks.add(
                format!("{sku}: held == holds the harness was granted"),
                ok,
                format!(
                    "held {} + sold {} in Redis; {} holds answered 201 created, {} cancelled (+{} unanswered reserves)",
                    view.held, view.sold, created, reopened, ambiguous_reserve
                ),
            );
        }
    }

    let Some(pool) = db else { return };
    // /readyz's outbox_backlog is set at the end of a flush pass, so it can read 0 while
    // the events of late payments sent during the validation are still in the outbox:
    // wait (up to --flush-timeout) for the compensation rows themselves.
    let wanted: HashSet<&str> = refunds.iter().map(|(id, ..)| id.as_str()).collect();
    let deadline = Instant::now() + ctx.args.flush_timeout;
    while !wanted.is_empty() && Instant::now() < deadline {
        let found: Result<Vec<String>, _> =
            sqlx::query_scalar("SELECT id FROM compensations WHERE sku = ?")
                .bind(sku)
                .fetch_all(pool)
                .await;
        match found {
            Ok(ids) if wanted.iter().all(|w| ids.iter().any(|id| id == w)) => break,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    let row: Result<Option<(u64, u64)>, _> =
        sqlx::query_as("SELECT stock_total, sold FROM skus WHERE sku = ?")
            .bind(sku)
            .fetch_optional(pool)
            .await;
    let sales: Result<Vec<(String, String, u32)>, _> =
        sqlx::query_as("SELECT reservation_id, payment_ref, quantity FROM sales WHERE sku = ?")
            .bind(sku)
            .fetch_all(pool)
            .await;
    let comps: Result<Vec<(String, String, String, String)>, _> = sqlx::query_as(
        "SELECT id, reservation_id, payment_ref, CAST(reason AS CHAR) FROM compensations WHERE sku = ?",
    )
    .bind(sku)
    .fetch_all(pool)
    .await;
    let (row, sales, comps) = match (row, sales, comps) {
        (Ok(Some(row)), Ok(sales), Ok(comps)) => (row, sales, comps),
        (Ok(None), _, _) => {
            checks.add(format!("{sku}: MySQL"), false, "no row in skus");
            return;
        }
        (r, s, c) => {
            let e = r
                .err()
                .or(s.err())
                .or(c.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            checks.add(format!("{sku}: MySQL"), false, format!("query failed: {e}"));
            return;
        }
    };
    let (stock_total, mysql_sold) = row;
    let sales_units: u64 = sales.iter().map(|(_, _, q)| *q as u64).sum();
    checks.add(
        format!("{sku}: no oversell in MySQL"),
        mysql_sold <= stock_total && sales_units <= stock_total && sales_units == mysql_sold,
        format!(
            "skus.sold {mysql_sold}, sum(sales.quantity) {sales_units}, stock_total {stock_total}; Redis sold {}",
            view.sold
        ),
    );
    checks.add(
        format!("{sku}: MySQL sold == Redis sold after the flush"),
        mysql_sold == view.sold,
        format!("MySQL {mysql_sold}, Redis {}", view.sold),
    );
    if plan.phase != PhaseName::Mixed {
        return;
    }
    let sales_by_rid: HashMap<&str, (&str, u32)> = sales
        .iter()
        .map(|(rid, pref, q)| (rid.as_str(), (pref.as_str(), *q)))
        .collect();
    let mut missing = Vec::new();
    for (rid, (payment_ref, quantity)) in &confirmed {
        match sales_by_rid.get(rid.as_str()) {
            Some((pref, q)) if pref == payment_ref && *q as u64 == *quantity => {}
            Some((pref, q)) => missing.push(format!(
                "{rid}: sale has {pref} x{q}, answer said {payment_ref} x{quantity}"
            )),
            None => missing.push(format!("{rid}: no sales row")),
        }
    }
    checks.add(
        format!("{sku}: every confirm answered 200 is a sale in MySQL"),
        missing.is_empty(),
        format!(
            "{} of {} confirmed reservations in sales{}",
            confirmed.len() - missing.len(),
            confirmed.len(),
            missing
                .first()
                .map(|m| format!("; e.g. {m}"))
                .unwrap_or_default()
        ),
    );
    let phantom: Vec<&String> = sales
        .iter()
        .map(|(rid, _, _)| rid)
        .filter(|rid| !confirmed.contains_key(*rid) && !ambiguous_confirms.contains_key(*rid))
        .collect();
    checks.add(
        format!("{sku}: no sale the gateway did not acknowledge"),
        phantom.is_empty(),
        format!(
            "{} sales rows, {} for confirms never answered 200{}",
            sales.len(),
            phantom.len(),
            phantom
                .first()
                .map(|p| format!(" (e.g. {p})"))
                .unwrap_or_default()
        ),
    );
    let comps_by_id: HashMap<&str, (&str, &str, &str)> = comps
        .iter()
        .map(|(id, rid, pref, reason)| {
            (id.as_str(), (rid.as_str(), pref.as_str(), reason.as_str()))
        })
        .collect();
    let mut bad = Vec::new();
    let mut ids = HashSet::new();
    for (id, rid, payment_ref, code) in &refunds {
        ids.insert(id.as_str());
        let reason = match code.as_str() {
            "already_confirmed" => "duplicate_payment",
            "reservation_expired" => "expired",
            "reservation_cancelled" => "cancelled",
            _ => "?",
        };
        match comps_by_id.get(id.as_str()) {
            Some((r, p, why)) if r == rid && p == payment_ref && *why == reason => {}
            Some(other) => bad.push(format!(
                "{id}: row {other:?}, answer said ({rid}, {payment_ref}, {reason})"
            )),
            None => bad.push(format!("{id} ({code} for {rid}): no compensations row")),
        }
    }
    checks.add(
        format!("{sku}: every refund_required answer has its compensation in MySQL"),
        bad.is_empty(),
        format!(
            "{} of {} refund_required answers ({} distinct compensations) found; {} rows for the SKU{}",
            refunds.len() - bad.len(),
            refunds.len(),
            ids.len(),
            comps.len(),
            bad.first().map(|b| format!("; e.g. {b}")).unwrap_or_default()
        ),
    );
}
