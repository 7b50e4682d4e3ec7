//! The admission phases of issue 11, through the same client, load and recorder as
//! the other phases:
//!
//! - **abuse**: honest users, an open loop spread over many users (each within the
//!   gateway's per-user rate), alone for --duration, then for --duration next to ONE
//!   abusive user sending reserves as fast as it can on --abuser-connections
//!   connections with its own token. Honest p99 with the abuser over without (target
//!   ≤ 1.5), the abuser's answers (429 `rate_limited` vs 201), and no 429 for the
//!   honest users.
//! - **overload**: the sustainable reserve rate X (a closed-loop probe, or
//!   --sustainable-rate), then open loops of fresh users at 0.8 X and at 2 X (latency
//!   from the intended send time): accepted (201) and shed (503 `overloaded`) answers
//!   and their latencies; accepted p99 at 2 X over at 0.8 X.

use serde::Serialize;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::Pace;
use crate::load::{Ctx, Load, Workload};
use crate::report::{PhaseReport, Ratio, RATE_LIMITED, SHED};
use crate::stats::{Endpoint, EndpointSummary, OutcomeLatency};
use crate::{measure, ratio, Probes};

/// Honest p99 next to the abuser over alone, at most (issue 11).
pub const ABUSE_P99_TARGET: f64 = 1.5;
/// Accepted p99 at 2 X over at 0.8 X, at most: the issue asks that accepted requests
/// keep their p99 under overload and names no bound; the abuse phase's is used.
pub const OVERLOAD_P99_TARGET: f64 = 1.5;
/// The overload phase's reference and overload rates, in X.
pub const REFERENCE_FACTOR: f64 = 0.8;
pub const OVERLOAD_FACTOR: f64 = 2.0;
/// The gateway's defaults (FLASHGATE_RATE_PER_USER, _BURST): what the abuser may get.
pub const GATEWAY_RATE_PER_USER: f64 = 5.0;
pub const GATEWAY_BURST_PER_USER: f64 = 10.0;
const CREATED: &str = "201 created";

/// Reserves of one kind in one phase, by answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answers {
    pub requests: u64,
    pub per_second: f64,
    /// Latency of every answer (from the intended send time in open loop).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// 201 created, per second, and their latency.
    pub created: u64,
    pub created_per_second: f64,
    pub created_p50_ms: Option<f64>,
    pub created_p99_ms: Option<f64>,
    /// 429 rate_limited.
    pub rate_limited: u64,
    /// 503 overloaded, and their latency.
    pub shed: u64,
    pub shed_p50_ms: Option<f64>,
    pub shed_p99_ms: Option<f64>,
    /// Transport errors and other 5xx.
    pub errors: u64,
    /// Any other answer.
    pub other: u64,
}

impl Answers {
    pub fn of(e: &EndpointSummary, seconds: f64) -> Answers {
        let created = e.outcome(CREATED);
        let rate_limited = e.outcome(RATE_LIMITED);
        let shed = e.outcome(SHED);
        let errors: u64 = e
            .outcomes
            .iter()
            .filter(|(k, _)| (k.starts_with("error") || k.starts_with('5')) && *k != SHED)
            .map(|(_, n)| n)
            .sum();
        let created_latency = e.latency_of(CREATED);
        let shed_latency = e.latency_of(SHED);
        Answers {
            requests: e.count,
            per_second: e.count as f64 / seconds.max(1e-9),
            p50_ms: e.p50_ms,
            p99_ms: e.p99_ms,
            created,
            created_per_second: created as f64 / seconds.max(1e-9),
            created_p50_ms: created_latency.map(|l| l.p50_ms),
            created_p99_ms: created_latency.map(|l| l.p99_ms),
            rate_limited,
            shed,
            shed_p50_ms: shed_latency.map(|l| l.p50_ms),
            shed_p99_ms: shed_latency.map(|l| l.p99_ms),
            errors,
            other: e.count - created - rate_limited - shed - errors,
        }
    }

    fn in_phase(phase: &PhaseReport, endpoint: &str) -> Option<Answers> {
        phase
            .endpoint(endpoint)
            .map(|e| Answers::of(e, phase.duration_s))
    }
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

#[derive(Debug, Clone, Serialize)]
pub struct AbuseReport {
    pub honest_rate: f64,
    pub honest_users: usize,
    /// Reserves per second each honest user sends.
    pub honest_pace_per_user: f64,
    pub abuser_connections: usize,
    pub honest_alone: Option<Answers>,
    pub honest_with_abuser: Option<Answers>,
    /// Honest p99 with the abuser over alone (target ≤ 1.5).
    pub honest_p99_ratio: Option<f64>,
    pub abuser: Option<Answers>,
    /// 201s the abuser could get with the gateway's default per-user limit: its burst
    /// plus its rate times the phase.
    pub abuser_created_allowed: f64,
}

impl AbuseReport {
    pub fn new(
        args: &crate::cli::Args,
        alone: Option<Answers>,
        with: Option<Answers>,
        abuser: Option<Answers>,
        seconds: f64,
    ) -> AbuseReport {
        AbuseReport {
            honest_rate: args.abuse_rate,
            honest_users: args.abuse_users,
            honest_pace_per_user: args.abuse_rate / args.abuse_users as f64,
            abuser_connections: args.abuser_connections,
            honest_p99_ratio: div(
                with.as_ref().map(|a| a.p99_ms),
                alone.as_ref().map(|a| a.p99_ms),
            ),
            honest_alone: alone,
            honest_with_abuser: with,
            abuser,
            abuser_created_allowed: GATEWAY_BURST_PER_USER + GATEWAY_RATE_PER_USER * seconds,
        }
    }

    /// Honest reserves refused 429 in either half.
    pub fn honest_rate_limited(&self) -> Option<u64> {
        match (&self.honest_alone, &self.honest_with_abuser) {
            (None, None) => None,
            (a, b) => Some(
                a.as_ref().map_or(0, |a| a.rate_limited) + b.as_ref().map_or(0, |b| b.rate_limited),
            ),
        }
    }

    pub fn ratios(&self) -> Vec<Ratio> {
        let (alone, with) = (self.honest_alone.as_ref(), self.honest_with_abuser.as_ref());
        let abuser = self.abuser.as_ref();
        vec![
            ratio(
                "abuse: honest p99 with the abuser / alone",
                self.honest_p99_ratio,
                "<= 1.5",
                None,
                Some(ABUSE_P99_TARGET),
                format!(
                    "{} vs {} ms; abuser: {} reserves, {} answered 429, {} answered 201",
                    ms(with.map(|a| a.p99_ms)),
                    ms(alone.map(|a| a.p99_ms)),
                    abuser.map_or(0, |a| a.requests),
                    abuser.map_or(0, |a| a.rate_limited),
                    abuser.map_or(0, |a| a.created)
                ),
            ),
            ratio(
                "abuse: honest reserves answered 429 (count)",
                self.honest_rate_limited().map(|n| n as f64),
                "= 0",
                None,
                Some(0.0),
                format!(
                    "{} alone, {} next to the abuser; each honest user sends {:.2} reserves/s",
                    alone.map_or(0, |a| a.rate_limited),
                    with.map_or(0, |a| a.rate_limited),
                    self.honest_pace_per_user
                ),
            ),
        ]
    }
}

/// Runs the abuse phase on `sku` (huge stock, per-user limit high enough for every
/// hold an honest user or the abuser gets).
pub async fn abuse(
    ctx: &Arc<Ctx>,
    probes: &mut Probes,
    sku: &str,
    index: u64,
) -> (Vec<PhaseReport>, AbuseReport) {
    let args = &ctx.args;
    let pace_each = args.abuse_rate / args.abuse_users as f64;
    println!(
        "\n== abuse (2 x {:.0} s): honest users, open loop at {} reserves/s over {} users ({pace_each:.2}/s each) on one SKU; alone, then next to one abusive user on {} connections as fast as it can",
        args.duration.as_secs_f64(),
        args.abuse_rate,
        args.abuse_users,
        args.abuser_connections
    );
    if pace_each > GATEWAY_RATE_PER_USER {
        println!(
            "  WARNING  {pace_each:.2} reserves/s per honest user is above the gateway's default FLASHGATE_RATE_PER_USER ({GATEWAY_RATE_PER_USER}): raise --abuse-users"
        );
    }
    let tokens: Vec<String> = (0..args.abuse_users)
        .map(|i| ctx.token_for(&format!("{}-h{i}", ctx.run_id)))
        .collect();
    // One workload for both halves: the users keep their turns across them.
    let honest = Arc::new(Workload::Users {
        sku: sku.to_string(),
        tokens,
        next: AtomicU64::new(0),
        endpoint: Endpoint::Reserve,
    });
    let honest_pace = Pace::Open {
        rate: args.abuse_rate,
        max_in_flight: args.max_in_flight,
    };
    let honest_load = || Load {
        workload: honest.clone(),
        pace: honest_pace,
    };
    let abuser = Load::new(
        Workload::Users {
            sku: sku.to_string(),
            tokens: vec![ctx.token_for(&format!("{}-abuser", ctx.run_id))],
            next: AtomicU64::new(0),
            endpoint: Endpoint::AbuserReserve,
        },
        Pace::Closed {
            clients: args.abuser_connections,
        },
    );
    let skus = vec![sku.to_string()];

    println!("-- honest users alone");
    let alone = measure(
        ctx,
        probes,
        "abuse-alone",
        vec![honest_load()],
        index,
        args.duration,
        skus.clone(),
    )
    .await;
    println!("-- the same honest users next to the abuser (abuser_reserve)");
    let with = measure(
        ctx,
        probes,
        "abuse",
        vec![honest_load(), abuser],
        index + 16,
        args.duration,
        skus,
    )
    .await;
    let report = AbuseReport::new(
        args,
        Answers::in_phase(&alone, "reserve"),
        Answers::in_phase(&with, "reserve"),
        Answers::in_phase(&with, "abuser_reserve"),
        with.duration_s,
    );
    print_abuse(&report);
    (vec![alone, with], report)
}

fn print_abuse(r: &AbuseReport) {
    if let (Some(a), Some(w)) = (&r.honest_alone, &r.honest_with_abuser) {
        println!(
            "  honest   p50 {:.2} -> {:.2} ms, p99 {:.2} -> {:.2} ms with the abuser: x{} (target <= {ABUSE_P99_TARGET}); 429 answers to honest users: {} alone, {} with the abuser",
            a.p50_ms,
            w.p50_ms,
            a.p99_ms,
            w.p99_ms,
            r.honest_p99_ratio.map_or("-".into(), |v| format!("{v:.2}")),
            a.rate_limited,
            w.rate_limited
        );
    }
    if let Some(ab) = &r.abuser {
        println!(
            "  abuser   {} reserves ({:.0}/s): 429 rate_limited {} ({:.2}%), 201 created {} (the default limit allows {:.0}), 503 shed {}, errors {}, other {}",
            ab.requests,
            ab.per_second,
            ab.rate_limited,
            100.0 * ab.rate_limited as f64 / ab.requests.max(1) as f64,
            ab.created,
            r.abuser_created_allowed,
            ab.shed,
            ab.errors,
            ab.other
        );
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OverloadReport {
    /// X: 201 answers per second the gateway sustains.
    pub sustainable_rps: f64,
    /// "probe" (measured in this run) or "--sustainable-rate".
    pub sustainable_from: String,
    pub reference_rate: f64,
    pub overload_rate: f64,
    /// The open loop at 0.8 X, and at 2 X.
    pub reference: Option<OpenRun>,
    pub overload: Option<OpenRun>,
    /// Accepted (201) p99 at 2 X over at 0.8 X.
    pub accepted_p99_ratio: Option<f64>,
    /// Shed (503) p99 at 2 X over accepted p99 at 0.8 X: how fast a refusal is.
    pub shed_p99_ratio: Option<f64>,
    /// Accepted per second at 2 X over X: the work done under overload.
    pub goodput_ratio: Option<f64>,
}

/// One open loop of the overload phase.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpenRun {
    pub answers: Answers,
    /// Flows due that never started (the generator was held at --max-in-flight).
    pub unsent: u64,
    /// How late flows started after their intended time: the generator's own delay,
    /// inside every latency above (a saturated machine shows here first).
    pub start_lag: Option<OutcomeLatency>,
}

impl OpenRun {
    fn of(phase: &PhaseReport) -> Option<OpenRun> {
        Some(OpenRun {
            answers: Answers::in_phase(phase, "reserve")?,
            unsent: phase.unsent_flows,
            start_lag: phase.start_lag,
        })
    }
}

impl OverloadReport {
    pub fn new(
        sustainable_rps: f64,
        sustainable_from: &str,
        reference: Option<OpenRun>,
        overload: Option<OpenRun>,
    ) -> OverloadReport {
        let (reference_rate, overload_rate) = overload_rates(sustainable_rps);
        let r = reference.as_ref().map(|run| &run.answers);
        let o = overload.as_ref().map(|run| &run.answers);
        OverloadReport {
            sustainable_rps,
            sustainable_from: sustainable_from.to_string(),
            reference_rate,
            overload_rate,
            accepted_p99_ratio: div(
                o.and_then(|o| o.created_p99_ms),
                r.and_then(|r| r.created_p99_ms),
            ),
            shed_p99_ratio: div(
                o.and_then(|o| o.shed_p99_ms),
                r.and_then(|r| r.created_p99_ms),
            ),
            goodput_ratio: div(o.map(|o| o.created_per_second), Some(sustainable_rps)),
            reference,
            overload,
        }
    }

    pub fn ratios(&self) -> Vec<Ratio> {
        let r = self.reference.as_ref().map(|run| &run.answers);
        let o = self.overload.as_ref().map(|run| &run.answers);
        let lag =
            |run: &Option<OpenRun>| ms(run.as_ref().and_then(|r| r.start_lag).map(|l| l.p99_ms));
        vec![
            ratio(
                "overload: accepted p99 at 2x / at 0.8x the sustainable rate",
                self.accepted_p99_ratio,
                "<= 1.5",
                None,
                Some(OVERLOAD_P99_TARGET),
                format!(
                    "{} vs {} ms (201 answers, from the intended send time; the harness started flows up to {} vs {} ms late, p99); X = {:.0}/s ({})",
                    ms(o.and_then(|o| o.created_p99_ms)),
                    ms(r.and_then(|r| r.created_p99_ms)),
                    lag(&self.overload),
                    lag(&self.reference),
                    self.sustainable_rps,
                    self.sustainable_from
                ),
            ),
            ratio(
                "  context: shed (503) p99 at 2x / accepted p99 at 0.8x",
                self.shed_p99_ratio,
                "-",
                None,
                None,
                format!(
                    "{} vs {} ms: {} answers shed",
                    ms(o.and_then(|o| o.shed_p99_ms)),
                    ms(r.and_then(|r| r.created_p99_ms)),
                    o.map_or(0, |o| o.shed)
                ),
            ),
            ratio(
                "  context: accepted/s at 2x / sustainable rate X",
                self.goodput_ratio,
                "-",
                None,
                None,
                format!(
                    "{:.0} vs {:.0} per second: the work still done under overload",
                    o.map_or(0.0, |o| o.created_per_second),
                    self.sustainable_rps
                ),
            ),
        ]
    }
}

/// The reference (0.8 X) and overload (2 X) rates, in whole flows per second.
pub fn overload_rates(sustainable_rps: f64) -> (f64, f64) {
    (
        (sustainable_rps * REFERENCE_FACTOR).round().max(1.0),
        (sustainable_rps * OVERLOAD_FACTOR).round().max(1.0),
    )
}

/// Runs the overload phase on `sku` (huge stock, fresh users). None when no
/// sustainable rate could be found (the probe got no 201).
pub async fn overload(
    ctx: &Arc<Ctx>,
    probes: &mut Probes,
    sku: &str,
    index: u64,
) -> (Vec<PhaseReport>, Option<OverloadReport>) {
    let args = &ctx.args;
    println!(
        "\n== overload ({} + 2 x {:.0} s): reserves by fresh users, open loop at {REFERENCE_FACTOR} and {OVERLOAD_FACTOR} times the sustainable rate X; the gateway is expected to shed (503 overloaded) at its FLASHGATE_MAX_IN_FLIGHT",
        match args.sustainable_rate {
            Some(_) => "X from --sustainable-rate".to_string(),
            None => format!("{:.0} s probe", args.overload_probe.as_secs_f64()),
        },
        args.duration.as_secs_f64()
    );
    let skus = vec![sku.to_string()];
    let workload = Arc::new(Workload::Sheddable {
        sku: sku.to_string(),
    });
    let load = |pace: Pace| Load {
        workload: workload.clone(),
        pace,
    };
    let mut phases = Vec::new();
    let (x, from) = match args.sustainable_rate {
        Some(x) => (x, "--sustainable-rate"),
        None => {
            println!(
                "-- probe ({:.0} s, closed loop, {} clients): the sustainable rate X = 201 answers per second",
                args.overload_probe.as_secs_f64(),
                args.concurrency
            );
            let pace = Pace::Closed {
                clients: args.concurrency,
            };
            let probe = measure(
                ctx,
                probes,
                "overload-probe",
                vec![load(pace)],
                index,
                args.overload_probe,
                skus.clone(),
            )
            .await;
            let x = probe.outcome_rate("reserve", CREATED);
            phases.push(probe);
            match x {
                Some(x) if x >= 1.0 => (x, "probe"),
                _ => {
                    println!("  no reserve was accepted in the probe: no sustainable rate, the phase stops here");
                    return (phases, None);
                }
            }
        }
    };
    let (reference_rate, overload_rate) = overload_rates(x);
    let open = |name: &'static str, rate: f64, offset: u64| {
        println!("-- {name}: open loop at {rate:.0} reserves/s");
        let pace = Pace::Open {
            rate,
            max_in_flight: args.max_in_flight,
        };
        (name, vec![load(pace)], index + offset)
    };
    let (name, loads, at) = open("overload-0.8x", reference_rate, 16);
    let reference = measure(ctx, probes, name, loads, at, args.duration, skus.clone()).await;
    let (name, loads, at) = open("overload-2x", overload_rate, 32);
    let over = measure(ctx, probes, name, loads, at, args.duration, skus).await;
    let report = OverloadReport::new(x, from, OpenRun::of(&reference), OpenRun::of(&over));
    print_overload(&report);
    phases.extend([reference, over]);
    (phases, Some(report))
}

fn print_overload(r: &OverloadReport) {
    println!(
        "  X = {:.0} reserves/s ({}); 0.8 X = {:.0}/s, 2 X = {:.0}/s",
        r.sustainable_rps, r.sustainable_from, r.reference_rate, r.overload_rate
    );
    for (name, run) in [("0.8 X", &r.reference), ("2 X", &r.overload)] {
        let Some(OpenRun {
            answers: a,
            unsent,
            start_lag,
        }) = run
        else {
            continue;
        };
        println!(
            "  {name:<6} accepted (201) {} = {:.0}/s, p50 {} p99 {} ms · shed (503 overloaded) {}, p50 {} p99 {} ms · 429 {} · errors {} · other {} · never sent {unsent} · started late p99 {} ms",
            a.created,
            a.created_per_second,
            ms(a.created_p50_ms),
            ms(a.created_p99_ms),
            a.shed,
            ms(a.shed_p50_ms),
            ms(a.shed_p99_ms),
            a.rate_limited,
            a.errors,
            a.other,
            ms(start_lag.map(|l| l.p99_ms))
        );
    }
    println!(
        "  accepted p99 at 2 X / at 0.8 X: {} (target <= {OVERLOAD_P99_TARGET})",
        r.accepted_p99_ratio
            .map_or("-".into(), |v| format!("{v:.2}"))
    );
}

/// How long the phase takes, for the hold length of the run's SKUs.
pub fn phase_time(args: &crate::cli::Args, overload: bool) -> Duration {
    if overload && args.sustainable_rate.is_none() {
        args.overload_probe + args.duration * 2
    } else {
        args.duration * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Recorder;
    use std::time::Instant;

    fn endpoint(answers: &[(u16, &'static str, u64, u64)]) -> EndpointSummary {
        let rec = Recorder::new(Instant::now());
        for &(status, label, n, ms) in answers {
            for _ in 0..n {
                rec.record(Endpoint::Reserve, Duration::from_millis(ms), status, label);
            }
        }
        rec.summary(Duration::from_secs(10), 0.0).0.remove(0)
    }

    #[test]
    fn answers_are_split_by_outcome() {
        let e = endpoint(&[
            (201, "created", 900, 10),
            (503, "overloaded", 80, 1),
            (429, "rate_limited", 10, 1),
            (0, "timeout", 5, 100),
            (409, "sold_out", 5, 2),
        ]);
        let a = Answers::of(&e, 10.0);
        assert_eq!(
            (
                a.requests,
                a.created,
                a.shed,
                a.rate_limited,
                a.errors,
                a.other
            ),
            (1000, 900, 80, 10, 5, 5)
        );
        assert!((a.per_second - 100.0).abs() < 1e-9);
        assert!((a.created_p99_ms.unwrap() - 10.0).abs() < 0.1);
        assert!((a.shed_p99_ms.unwrap() - 1.0).abs() < 0.01);
        assert_eq!(
            Answers::of(&endpoint(&[(201, "created", 1, 1)]), 1.0).shed_p99_ms,
            None
        );
    }

    fn args() -> crate::cli::Args {
        use clap::Parser;
        crate::cli::Args::try_parse_from([
            "flashgate-bench",
            "--jwt-secret",
            "bench-jwt-secret-0123456789abcdef",
            "--service-token",
            "bench-service-token-0123456789abcdef",
            "--abuse-rate",
            "1000",
            "--abuse-users",
            "500",
        ])
        .unwrap()
    }

    #[test]
    fn abuse_figures_and_targets() {
        let alone = Answers::of(&endpoint(&[(201, "created", 100, 4)]), 10.0);
        let with = Answers::of(&endpoint(&[(201, "created", 100, 5)]), 10.0);
        let abuser = Answers::of(
            &endpoint(&[(201, "created", 60, 1), (429, "rate_limited", 9000, 1)]),
            10.0,
        );
        let r = AbuseReport::new(&args(), Some(alone), Some(with), Some(abuser), 10.0);
        assert_eq!(r.honest_pace_per_user, 2.0);
        assert!((r.honest_p99_ratio.unwrap() - 1.25).abs() < 0.01);
        assert_eq!(r.abuser_created_allowed, 60.0);
        assert_eq!(r.honest_rate_limited(), Some(0));
        let ratios = r.ratios();
        assert_eq!(ratios[0].met, Some(true));
        assert_eq!(ratios[1].met, Some(true), "no honest 429");

        let slow = Answers::of(
            &endpoint(&[(201, "created", 98, 5), (429, "rate_limited", 2, 9)]),
            10.0,
        );
        let fast = Answers::of(&endpoint(&[(201, "created", 100, 3)]), 10.0);
        let r = AbuseReport::new(&args(), Some(fast), Some(slow), None, 10.0);
        assert!(r.honest_p99_ratio.unwrap() > 1.5);
        assert_eq!(r.honest_rate_limited(), Some(2));
        assert!(r.ratios().iter().all(|r| r.met == Some(false)));
        let r = AbuseReport::new(&args(), None, None, None, 10.0);
        assert!(
            r.ratios().iter().all(|r| r.met.is_none()),
            "nothing measured"
        );
    }

    #[test]
    fn overload_figures_and_targets() {
        assert_eq!(overload_rates(10_000.4), (8_000.0, 20_001.0));
        assert_eq!(overload_rates(0.2), (1.0, 1.0));
        // 0.8 X: 8,000 accepted in 1 s, p99 4 ms.
        let reference = Answers::of(&endpoint(&[(201, "created", 8_000, 4)]), 1.0);
        // 2 X: 9,000 accepted (p99 5 ms), 11,000 shed in 1 ms.
        let overload = Answers::of(
            &endpoint(&[(201, "created", 9_000, 5), (503, "overloaded", 11_000, 1)]),
            1.0,
        );
        let run = |answers: Answers, unsent: u64| OpenRun {
            answers,
            unsent,
            start_lag: None,
        };
        let r = OverloadReport::new(
            10_000.0,
            "probe",
            Some(run(reference, 0)),
            Some(run(overload, 7)),
        );
        assert!((r.accepted_p99_ratio.unwrap() - 1.25).abs() < 0.02);
        assert!((r.goodput_ratio.unwrap() - 0.9).abs() < 1e-9);
        assert!((r.shed_p99_ratio.unwrap() - 0.25).abs() < 0.01);
        assert_eq!(r.overload.as_ref().map(|o| o.unsent), Some(7));
        let ratios = r.ratios();
        assert_eq!(ratios[0].met, Some(true));
        assert_eq!((ratios[1].met, ratios[2].met), (None, None), "context rows");
        let slow = Answers::of(&endpoint(&[(201, "created", 100, 9)]), 1.0);
        let fast = Answers::of(&endpoint(&[(201, "created", 100, 3)]), 1.0);
        let r = OverloadReport::new(
            100.0,
            "--sustainable-rate",
            Some(run(fast, 0)),
            Some(run(slow, 0)),
        );
        assert_eq!(r.ratios()[0].met, Some(false));
    }
}
