//! `flashgate-bench scale`: the gateway's cost curves, measured side by side in one run.
//!
//! A. SKU count. For each step N of --scale-skus: the SKUs up to N are defined through
//!    the admin API (the first --scale-on-sale stay on sale, every other one's sale ends
//!    a few seconds after its definition, so the gateway may retire it); once they have
//!    ended and settled: Redis commands per second with no load, the sweep pass
//!    (`flashgate_sweep_pass_seconds`), `/readyz` and `/metrics` latency (and the size
//!    of `/metrics`), and a full `flashgate reconcile` run as a subprocess.
//! B. Live holds on one SKU. For each step H of --scale-holds: holds are written straight
//!    into Redis with the gateway's reserve script (pipelined EVALSHA, ids minted as the
//!    gateway mints them); then Redis memory per live hold, `flashgate reconcile --sku`
//!    and the slowest single Redis call during it (SLOWLOG). At the largest H: reserve
//!    throughput on a second SKU through the gateway, alone and while that reconcile runs
//!    over and over; then bytes per ended reservation (holds cancelled over HTTP, after
//!    the worker flushed them to MySQL).
//!
//! At the end the open sales are ended through the admin API (so that the reconciler
//! does not rebuild them in Redis from MySQL) and every Redis key of this run's SKUs
//! (`fg:{scale-<run id>-…}`) is deleted.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use plotters::coord::Shift;
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{Args, Pace, ScaleArgs, ScalePart};
use crate::client::{Answer, Auth, Client, Method};
use crate::ids::IdKey;
use crate::load::{self, Ctx, Load, Workload};
use crate::probe::{self, Pids, Snapshot};
use crate::{gateway, redis_connection};

/// Stock, per-user limit and hold of the SKU-count curve's SKUs (as the issue says).
const SKU_STOCK: u64 = 10;
const SKU_HOLD_SECONDS: u64 = 60;
/// Holds of the hold-count curve must stay live for the whole run.
const HOLD_SECONDS: u64 = 3600;
/// The second SKU's stock: never sold out by a throughput window.
const HOT_STOCK: u64 = 1_000_000_000;
/// Reserve pipelines in flight at once while writing holds.
const PIPELINES_IN_FLIGHT: usize = 4;
/// SLOWLOG threshold while a reconcile runs, in µs, and how many entries Redis keeps.
const SLOWLOG_THRESHOLD_US: u64 = 1000;
const SLOWLOG_MAX_LEN: u64 = 100_000;
/// Holds per step whose keys are weighed one by one (MEMORY USAGE).
const MEMORY_SAMPLE: usize = 100;
/// Retries of an admin PUT or a cancel that failed in transport or with a 503.
const RETRIES: usize = 3;
/// Errors kept verbatim.
const ERROR_SAMPLES: usize = 5;
/// Clean-up waits at most this long for a reconcile pass of the gateway's worker to end
/// (FLASHGATE_RECONCILE_INTERVAL_SECONDS is 60 by default).
const RECONCILE_PASS_WAIT: Duration = Duration::from_secs(75);

// ---------------------------------------------------------------- report types ---

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Latency {
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileRun {
    pub command: String,
    pub seconds: f64,
    /// None: killed by a signal, timed out or did not start.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// What its JSON document says ("checked N SKUs, M findings (...)").
    pub summary: String,
    /// Findings printed, by kind.
    pub findings: BTreeMap<String, u64>,
    /// The last lines of its stderr (errors, warnings), shortened.
    pub stderr_tail: Vec<String>,
}

impl ReconcileRun {
    fn exit_text(&self) -> String {
        match (self.exit_code, self.timed_out) {
            (_, true) => "timeout".into(),
            (Some(code), _) => code.to_string(),
            (None, _) => "signal".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkuStep {
    /// SKUs this run defined so far, and those of them that stay on sale.
    pub skus: u64,
    pub on_sale: u64,
    /// Defined in this step, how long that took, admin PUTs that failed.
    pub defined: u64,
    pub define_seconds: f64,
    pub define_per_s: f64,
    pub define_errors: u64,
    /// `SCARD fg:skus` when measured: the SKUs the gateway's worker walks (every
    /// process's, not only this run's).
    pub indexed_skus: Option<u64>,
    /// This run's SKUs in that index when measured (those on sale stay; ended ones
    /// leave it when the gateway retires them).
    pub ours_indexed: Option<u64>,
    /// How long after the last sale ended the last ended SKU left the index, when the
    /// run waited for it (--scale-retire-wait) and it happened.
    pub retired_after_end_s: Option<f64>,
    pub idle_window_s: f64,
    /// INFO stats total_commands_processed over the idle window, less the harness's own:
    /// the whole server's (other databases' clients count too).
    pub redis_commands_per_s: Option<f64>,
    /// The same counted with MONITOR in the gateway's database only, without the
    /// harness's own (commands scripts run count, as in total_commands_processed).
    pub db_commands_per_s: Option<f64>,
    /// Those by command (`lua:` prefix: run inside a script), per second.
    pub db_calls_per_s: BTreeMap<String, f64>,
    pub redis_cores: Option<f64>,
    pub gateway_cores: Option<f64>,
    /// CPU the rest of the machine used in the window (noise: builds, other tests).
    pub other_cores: Option<f64>,
    /// `flashgate_sweep_pass_seconds` scraped a second apart, in ms.
    pub sweep_pass_ms: Vec<f64>,
    /// Its largest value scraped once a second while this step's SKUs were defined
    /// (every admin PUT makes every SKU on sale due for a visit at once).
    pub sweep_pass_ms_max_while_defining: Option<f64>,
    pub sweep_pass_ms_max: Option<f64>,
    pub sweep_pass_ms_last: Option<f64>,
    pub readyz: Latency,
    pub metrics: Latency,
    pub metrics_bytes: Option<usize>,
    pub reconcile: Option<ReconcileRun>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlowCall {
    pub micros: u64,
    /// The command and its first arguments, shortened.
    pub command: String,
    pub client: String,
    /// Sent by the reconcile subprocess (a connection that did not exist before it).
    pub by_reconcile: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldStep {
    pub holds: u64,
    /// Written in this step, how long that took.
    pub written: u64,
    pub write_seconds: f64,
    pub write_per_s: f64,
    /// `held` of the SKU in Redis afterwards (must equal `holds`).
    pub held_in_redis: Option<u64>,
    pub used_memory: Option<u64>,
    /// (used_memory now - before the first hold) / holds: server-wide, so other
    /// databases' activity counts too.
    pub bytes_per_hold: Option<f64>,
    /// The same over this step's holds only.
    pub step_bytes_per_hold: Option<f64>,
    /// MEMORY USAGE of the SKU's per-hold structures (holds, deadlines, used) / holds:
    /// immune to other databases, but an estimate (MEMORY USAGE samples elements).
    pub sampled_bytes_per_hold: Option<f64>,
    pub reconcile: Option<ReconcileRun>,
    /// SLOWLOG entries (calls over 1 ms) during the reconcile, every client.
    pub slow_calls: usize,
    pub slowest: Option<SlowCall>,
    /// The slowest call the reconcile itself sent.
    pub slowest_by_reconcile: Option<SlowCall>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ReserveWindow {
    pub seconds: f64,
    pub created: u64,
    pub created_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Reconcile runs during the window (the next starts when one ends).
    pub reconcile_runs: usize,
    pub reconcile_seconds: Vec<f64>,
    pub reconcile_exit_codes: Vec<String>,
    /// The gateway's worker reconciled during the window (its own schedule).
    pub worker_reconcile_ran: Option<bool>,
    pub gateway_cores: Option<f64>,
    pub redis_cores: Option<f64>,
    /// CPU the rest of the machine used (the reconcile subprocess and MySQL count here).
    pub other_cores: Option<f64>,
    pub redis_forks: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReserveUnderReconcile {
    pub sku: String,
    pub concurrency: usize,
    /// Live holds on the reconciled SKU.
    pub holds: u64,
    pub alone: ReserveWindow,
    pub with_reconcile: ReserveWindow,
    /// with_reconcile / alone (reserves answered 201 per second).
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ended {
    pub asked: u64,
    pub cancelled: u64,
    pub cancel_errors: u64,
    pub error_samples: Vec<String>,
    pub cancel_seconds: f64,
    /// From the last cancel answer until the flush group had acknowledged every event
    /// of the SKU's outbox (they are in MySQL).
    pub flush_seconds: Option<f64>,
    /// Entries still in the outbox stream then (trimming is approximate).
    pub outbox_entries_left: Option<u64>,
    pub used_memory_before: Option<u64>,
    pub used_memory_after: Option<u64>,
    /// (used_memory after the flush - before the cancels) / cancelled: what ending a
    /// hold frees (negative) or costs.
    pub bytes_delta_per_ended: Option<f64>,
    /// Bytes per live hold + that delta: what an ended reservation still holds.
    pub bytes_per_ended: Option<f64>,
    /// Bytes of a sample of the ended reservations' usage records (user id and record,
    /// where the claim of the idempotency key stays until `keep_until`; the hash
    /// entry's own ~40 bytes not counted): immune to other databases.
    pub sampled_bytes_per_ended: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleEnvironment {
    pub gateway_pid: Option<u32>,
    pub redis: String,
    pub cpus: usize,
    pub flashgate_bin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleReport {
    pub tool: String,
    pub run_id: String,
    pub started_at: String,
    pub base_url: String,
    pub command_line: Vec<String>,
    pub environment: ScaleEnvironment,
    pub sku_prefix: String,
    pub sku_curve: Vec<SkuStep>,
    pub hold_curve: Vec<HoldStep>,
    pub reserve_under_reconcile: Option<ReserveUnderReconcile>,
    pub ended: Option<Ended>,
    pub cleanup: Option<String>,
    /// What stopped the run early, if anything.
    pub error: Option<String>,
}

// ---------------------------------------------------------------- pure helpers ---

/// Nearest-rank percentile of ascending `sorted` (q in 0..=1); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn latency(mut samples_ms: Vec<f64>, errors: usize) -> Latency {
    samples_ms.sort_by(f64::total_cmp);
    Latency {
        requests: samples_ms.len() + errors,
        errors,
        p50_ms: percentile(&samples_ms, 0.50),
        p99_ms: percentile(&samples_ms, 0.99),
        max_ms: samples_ms.last().copied().unwrap_or(0.0),
    }
}

/// Commands per second between two readings of total_commands_processed, less the
/// `own` commands the harness sent in between (the first INFO counts in the second
/// reading; the second does not count in itself).
pub fn commands_per_s(before: u64, after: u64, own: u64, seconds: f64) -> f64 {
    after.saturating_sub(before).saturating_sub(own) as f64 / seconds.max(1e-9)
}

/// Bytes per item of a memory delta (negative when memory went down).
pub fn per_item(before: u64, after: u64, items: u64) -> Option<f64> {
    (items > 0).then(|| (after as f64 - before as f64) / items as f64)
}

/// b / a, when both are known and a is not 0.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && a.is_finite() && b.is_finite()).then(|| b / a)
}

/// A field of an INFO reply.
pub fn info_u64(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The value of an unlabelled sample (or the first labelled one) in a Prometheus text body.
pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            return None;
        }
        rest.split_whitespace().last()?.parse().ok()
    })
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// The slowest call of a SLOWLOG GET reply (entries: id, time, µs, args, client addr,
/// client name) but those of `own` (the harness's connection), and the slowest from a
/// client not in `known` (addresses connected before the reconcile started). Returns
/// (entries counted, slowest, slowest of a new client).
pub fn slowest_calls(
    reply: &redis::Value,
    known: &HashSet<String>,
    own: &HashSet<String>,
) -> (usize, Option<SlowCall>, Option<SlowCall>) {
    let redis::Value::Array(entries) = reply else {
        return (0, None, None);
    };
    let mut worst: Option<SlowCall> = None;
    let mut worst_new: Option<SlowCall> = None;
    let mut counted = 0;
    for entry in entries {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let Some(redis::Value::Int(micros)) = fields.get(2) else {
            continue;
        };
        let command = match fields.get(3) {
            Some(redis::Value::Array(args)) => args
                .iter()
                .take(4)
                .map(|a| shorten(&text(a), 48))
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        let client = fields.get(4).map(text).unwrap_or_default();
        if own.contains(&client) {
            continue;
        }
        counted += 1;
        let call = SlowCall {
            micros: (*micros).max(0) as u64,
            by_reconcile: !client.is_empty() && !known.contains(&client),
            command,
            client,
        };
        if call.by_reconcile && worst_new.as_ref().is_none_or(|w| call.micros > w.micros) {
            worst_new = Some(call.clone());
        }
        if worst.as_ref().is_none_or(|w| call.micros > w.micros) {
            worst = Some(call);
        }
    }
    (counted, worst, worst_new)
}

/// Client addresses in a CLIENT LIST reply.
fn client_addresses(list: &str) -> HashSet<String> {
    list.lines()
        .filter_map(|l| {
            l.split(' ')
                .find_map(|kv| kv.strip_prefix("addr="))
                .map(str::to_string)
        })
        .collect()
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n.is_multiple_of(1_000_000) => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n.is_multiple_of(1_000) => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
}

fn rfc3339_in(d: Duration) -> String {
    (chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------- the run ---

struct Scale {
    args: Args,
    opts: ScaleArgs,
    client: Arc<Client>,
    /// Where /metrics is (the gateway's port unless --metrics-url).
    metrics_client: Arc<Client>,
    metrics_path: String,
    redis: MultiplexedConnection,
    pids: Pids,
    run_id: String,
    seed: u64,
    base: String,
    /// Every SKU this run defined, and those still on sale (with their definition).
    skus: Vec<String>,
    open: Vec<(String, serde_json::Value)>,
    progress: bool,
}

pub async fn run(args: Args, opts: ScaleArgs) -> Result<bool> {
    if let Some(json) = &opts.scale_replot {
        let report: ScaleReport = serde_json::from_slice(
            &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
        )
        .with_context(|| format!("{} is not a scale report", json.display()))?;
        let svg = json.with_extension("svg");
        chart(&report, &svg).with_context(|| format!("drawing {}", svg.display()))?;
        println!("chart {}", svg.display());
        return Ok(true);
    }
    let seed = args
        .seed
        .unwrap_or_else(|| rand::rng().random::<u64>() >> 11);
    let started_at = chrono::Utc::now();
    let run_id = match &opts.scale_cleanup {
        Some(earlier) => earlier.clone(),
        None => format!(
            "{}{}",
            crate::base36(started_at.timestamp() as u64),
            &format!("{:04x}", seed & 0xffff)
        ),
    };
    let target = args.target()?;
    let base = format!("scale-{run_id}");
    println!("flashgate-bench scale run {run_id}: SKUs {base}-…");
    println!(
        "  gateway {} · SKU steps {:?} ({} on sale) · hold steps {:?} · parts {:?}",
        args.base_url, opts.scale_skus, opts.scale_on_sale, opts.scale_holds, opts.scale_parts
    );

    let client = Arc::new(Client::new(&target, &args.service_token, args.timeout).await?);
    let ready = client
        .send(Method::GET, "/readyz", Auth::None, None, None)
        .await;
    if ready.status != 200 {
        bail!(
            "the gateway at {} is not ready: {}",
            args.base_url,
            ready.text()
        );
    }
    let (metrics_client, metrics_path) = match &opts.metrics_url {
        Some(url) => {
            let metrics_args = Args {
                base_url: url.clone(),
                ..args.clone()
            };
            let t = metrics_args.target()?;
            (
                Arc::new(Client::new(&t, &args.service_token, args.timeout).await?),
                if t.prefix.is_empty() {
                    "/metrics".to_string()
                } else {
                    String::new()
                },
            )
        }
        None => (client.clone(), "/metrics".to_string()),
    };
    let bin = &opts.flashgate_bin;
    if !bin.is_file() && opts.scale_cleanup.is_none() {
        bail!(
            "{} does not exist: build it (cargo build --release --bin flashgate) or pass --flashgate-bin",
            bin.display()
        );
    }
    let mut redis = redis_connection(&args.redis_url)
        .await
        .context("connecting to Redis (--redis-url)")?;
    let server: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut redis)
        .await?;
    let persistence: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut redis)
        .await?;
    let pids = Pids {
        gateway: args
            .gateway_pid
            .or_else(|| probe::pid_listening_on(target.port)),
        redis: info_u64(&server, "process_id").map(|p| p as u32),
        mysql: None,
    };
    let redis_desc = format!(
        "Redis {} pid {}, AOF {}",
        server
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim(),
        pids.redis.map_or("?".into(), |p| p.to_string()),
        if info_u64(&persistence, "aof_enabled") == Some(1) {
            "on"
        } else {
            "off"
        }
    );
    println!(
        "  gateway pid {} · {redis_desc} · {} CPUs · {}",
        pids.gateway
            .map_or("? (pass --gateway-pid)".into(), |p| p.to_string()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bin.display()
    );

    let mut scale = Scale {
        progress: !args.no_progress,
        args: args.clone(),
        opts: opts.clone(),
        client,
        metrics_client,
        metrics_path,
        redis,
        pids,
        run_id: run_id.clone(),
        seed,
        base: base.clone(),
        skus: Vec::new(),
        open: Vec::new(),
    };
    if opts.scale_cleanup.is_some() {
        scale.load_run_from_mysql().await?;
        println!(
            "\n== clean-up of run {run_id}: {} SKUs in MySQL, {} of them still on sale",
            scale.skus.len(),
            scale.open.len()
        );
        let done = scale.cleanup().await?;
        println!("  {done}");
        return Ok(true);
    }
    let mut report = ScaleReport {
        tool: format!("flashgate-bench {}", env!("CARGO_PKG_VERSION")),
        run_id: run_id.clone(),
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        base_url: args.base_url.clone(),
        command_line: std::env::args().collect(),
        environment: ScaleEnvironment {
            gateway_pid: pids.gateway,
            redis: redis_desc,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            flashgate_bin: bin.display().to_string(),
        },
        sku_prefix: base.clone(),
        sku_curve: Vec::new(),
        hold_curve: Vec::new(),
        reserve_under_reconcile: None,
        ended: None,
        cleanup: None,
        error: None,
    };

    let outcome = async {
        if opts.wants(ScalePart::Skus) {
            scale.sku_curve(&mut report).await?;
        }
        if opts.wants(ScalePart::Holds) {
            scale.hold_curve(&mut report).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = &outcome {
        println!("\n  STOPPED: {e:#}");
        report.error = Some(format!("{e:#}"));
    }
    println!("\n== clean-up");
    report.cleanup = Some(match scale.cleanup().await {
        Ok(done) => done,
        Err(e) => {
            format!("failed: {e:#}; delete fg:{{{base}-*}} keys and SREM them from fg:skus by hand")
        }
    });
    println!("  {}", report.cleanup.as_deref().unwrap_or_default());

    print_tables(&report);
    let (json_path, svg_path) = write(&report, &args.output_dir)?;
    println!(
        "\n  report {}\n  chart  {}",
        json_path.display(),
        svg_path.display()
    );
    outcome.map(|()| true)
}

impl Scale {
    fn bar(&self, total: u64, title: &str) -> indicatif::ProgressBar {
        if !self.progress || total < 2000 {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>9} [{bar:30.cyan/blue}] {pos}/{len} {per_sec} {elapsed}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(title.to_string());
        bar
    }

    /// Defines `skus` through the admin API, `--scale-define-concurrency` at a time.
    /// Returns (defined, errors with samples, when the last sale ends).
    async fn define(
        &mut self,
        skus: Vec<(String, serde_json::Value, Option<Duration>)>,
    ) -> Result<(u64, Vec<String>, u64, Option<Instant>)> {
        let total = skus.len() as u64;
        let work = Arc::new(skus);
        let next = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(Mutex::new(Vec::<String>::new()));
        let last_end = Arc::new(Mutex::new(None::<Instant>));
        let bar = self.bar(total, "define");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.opts.scale_define_concurrency.min(work.len().max(1)) {
            let (work, next, failed, samples, last_end, client, bar) = (
                work.clone(),
                next.clone(),
                failed.clone(),
                samples.clone(),
                last_end.clone(),
                self.client.clone(),
                bar.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((sku, body, ends_after)) = work.get(i) else {
                        break;
                    };
                    let mut answer = None;
                    for attempt in 0..=RETRIES {
                        let mut body = body.clone();
                        let ends = ends_after.map(|d| {
                            body["ends_at"] = json!(rfc3339_in(d));
                            Instant::now() + d
                        });
                        let a = client
                            .send(
                                Method::PUT,
                                &format!("/v1/admin/skus/{sku}"),
                                Auth::Service,
                                None,
                                Some(Bytes::from(body.to_string())),
                            )
                            .await;
                        let retry = a.status == 0 || a.status == 503;
                        if a.status == 200 {
                            if let Some(ends) = ends {
                                let mut last = last_end.lock().unwrap();
                                *last = Some(last.map_or(ends, |l: Instant| l.max(ends)));
                            }
                        }
                        answer = Some(a);
                        if !retry || attempt == RETRIES {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let answer = answer.expect("one attempt at least");
                    if answer.status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut s = samples.lock().unwrap();
                        if s.len() < ERROR_SAMPLES {
                            s.push(format!("PUT /v1/admin/skus/{sku}: {}", answer.text()));
                        }
                    }
                    bar.inc(1);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        bar.finish_and_clear();
        let failed = failed.load(Ordering::Relaxed);
        for (sku, body, ends_after) in work.iter() {
            self.skus.push(sku.clone());
            if ends_after.is_none() {
                self.open.push((sku.clone(), body.clone()));
            }
        }
        let samples = samples.lock().unwrap().clone();
        let last = *last_end.lock().unwrap();
        Ok((total - failed, samples, failed, last))
    }

    async fn get(&self, client: &Client, path: &str) -> Answer {
        client.send(Method::GET, path, Auth::None, None, None).await
    }

    async fn metrics_body(&self) -> Option<String> {
        let a = self.get(&self.metrics_client, &self.metrics_path).await;
        (a.status == 200).then(|| String::from_utf8_lossy(&a.body).into_owned())
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics_body().await?, name)
    }

    /// `n` sequential GETs of `path`: their latency, and the last body's size.
    async fn sequential(&self, client: &Client, path: &str, n: usize) -> (Latency, Option<usize>) {
        let mut samples = Vec::with_capacity(n);
        let mut errors = 0;
        let mut size = None;
        for _ in 0..n {
            let started = Instant::now();
            let a = self.get(client, path).await;
            let took = started.elapsed().as_secs_f64() * 1000.0;
            if a.status == 200 {
                samples.push(took);
                size = Some(a.body.len());
            } else {
                errors += 1;
            }
        }
        (latency(samples, errors), size)
    }

    async fn info(&mut self, section: &str) -> Result<String> {
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.redis)
            .await?)
    }

    /// INFO through a clone of the connection (for `&self` callers).
    async fn info_shared(&self, section: &str) -> Result<String> {
        let mut conn = self.redis.clone();
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await?)
    }

    async fn used_memory(&mut self) -> Option<u64> {
        self.info("memory")
            .await
            .ok()
            .and_then(|i| info_u64(&i, "used_memory"))
    }

    async fn reconcile(&self, sku: Option<&str>) -> ReconcileRun {
        reconcile(
            &self.opts.flashgate_bin,
            &self.args,
            sku,
            self.opts.scale_reconcile_timeout,
        )
        .await
    }

    // ------------------------------------------------------------ A. SKU count ---

    async fn sku_curve(&mut self, report: &mut ScaleReport) -> Result<()> {
        let on_sale_total = self.opts.scale_on_sale;
        let mut defined_so_far = 0u64;
        for &n in &self.opts.scale_skus.clone() {
            println!(
                "\n== SKU count {n}: defining {} SKUs ({} in flight)",
                n - defined_so_far,
                self.opts.scale_define_concurrency
            );
            let body =
                json!({"stock": SKU_STOCK, "per_user_limit": 1, "hold_seconds": SKU_HOLD_SECONDS});
            let work: Vec<(String, serde_json::Value, Option<Duration>)> = (defined_so_far..n)
                .map(|i| {
                    let ends = (i >= on_sale_total).then_some(self.opts.scale_ends_after);
                    (format!("{}-n{i}", self.base), body.clone(), ends)
                })
                .collect();
            let started = Instant::now();
            // The largest sweep pass scraped meanwhile, as f64 bits (MAX: none yet).
            let sweep_max = Arc::new(AtomicU64::new(u64::MAX));
            let sampling = {
                let (client, path, sweep_max) = (
                    self.metrics_client.clone(),
                    self.metrics_path.clone(),
                    sweep_max.clone(),
                );
                tokio::spawn(async move {
                    let mut max: Option<f64> = None;
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let a = client
                            .send(Method::GET, &path, Auth::None, None, None)
                            .await;
                        let v = metric_value(
                            &String::from_utf8_lossy(&a.body),
                            "flashgate_sweep_pass_seconds",
                        );
                        if let Some(v) = v {
                            max = Some(max.map_or(v * 1000.0, |m: f64| m.max(v * 1000.0)));
                        }
                        sweep_max.store(max.map_or(u64::MAX, f64::to_bits), Ordering::Relaxed);
                    }
                })
            };
            let (ok, samples, failed, last_end) = self.define(work).await?;
            sampling.abort();
            let sweep_max_defining = match sweep_max.load(Ordering::Relaxed) {
                u64::MAX => None,
                bits => Some(f64::from_bits(bits)),
            };
            let define_seconds = started.elapsed().as_secs_f64();
            println!(
                "  {ok} defined in {define_seconds:.1} s ({:.0}/s); sweep pass meanwhile up to {} ms{}",
                ok as f64 / define_seconds.max(1e-9),
                opt(sweep_max_defining, 1),
                if failed > 0 {
                    format!(", {failed} FAILED: {}", samples.join(" | "))
                } else {
                    String::new()
                }
            );
            if failed * 100 > n - defined_so_far {
                bail!(
                    "more than 1% of the admin PUTs failed: {}",
                    samples.join(" | ")
                );
            }
            let wait_until = last_end.unwrap_or_else(Instant::now) + self.opts.scale_settle;
            let wait = wait_until.saturating_duration_since(Instant::now());
            match last_end {
                Some(_) => println!(
                    "  waiting {:.1} s: the last sale ends, then {:.0} s to settle",
                    wait.as_secs_f64(),
                    self.opts.scale_settle.as_secs_f64()
                ),
                None => println!("  waiting {:.1} s to settle", wait.as_secs_f64()),
            }
            tokio::time::sleep(wait).await;
            let on_sale = n.min(on_sale_total);
            let mut retired_after_end_s = None;
            if let (Some(end), false) = (last_end, self.opts.scale_retire_wait.is_zero()) {
                let deadline = Instant::now() + self.opts.scale_retire_wait;
                loop {
                    let indexed = self.ours_indexed().await?;
                    if indexed <= on_sale {
                        retired_after_end_s = Some(end.elapsed().as_secs_f64());
                        println!(
                            "  every ended SKU left the index {:.1} s after the last sale ended",
                            end.elapsed().as_secs_f64()
                        );
                        break;
                    }
                    if Instant::now() >= deadline {
                        println!(
                            "  {} ended SKUs still indexed {:.1} s after the last sale ended (--scale-retire-wait {:.0} s)",
                            indexed - on_sale,
                            end.elapsed().as_secs_f64(),
                            self.opts.scale_retire_wait.as_secs_f64()
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            let mut step = self
                .measure_skus(n, on_sale, n - defined_so_far, define_seconds)
                .await?;
            step.define_errors = failed;
            step.retired_after_end_s = retired_after_end_s;
            step.sweep_pass_ms_max_while_defining = sweep_max_defining;
            print_sku_step(&step);
            report.sku_curve.push(step);
            defined_so_far = n;
        }
        Ok(())
    }

    /// This run's SKUs in the gateway's index.
    async fn ours_indexed(&mut self) -> Result<u64> {
        let mut indexed = 0;
        for chunk in self.skus.chunks(1000) {
            let members: Vec<bool> = redis::cmd("SMISMEMBER")
                .arg("fg:skus")
                .arg(chunk)
                .query_async(&mut self.redis)
                .await?;
            indexed += members.iter().filter(|m| **m).count() as u64;
        }
        Ok(indexed)
    }

    async fn measure_skus(
        &mut self,
        skus: u64,
        on_sale: u64,
        defined: u64,
        define_seconds: f64,
    ) -> Result<SkuStep> {
        let indexed_skus: Option<u64> = redis::cmd("SCARD")
            .arg("fg:skus")
            .query_async(&mut self.redis)
            .await
            .ok();
        let ours_indexed = self.ours_indexed().await.ok();
        // Idle Redis load: nothing else from the harness in the window.
        let own: String = redis::cmd("CLIENT")
            .arg("INFO")
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        let monitor = match Monitor::start(&self.args.redis_url, client_addresses(&own)).await {
            Ok(m) => Some(m),
            Err(e) => {
                println!("  (no MONITOR count: {e:#})");
                None
            }
        };
        let before_info = self.info("stats").await?;
        let t0 = Instant::now();
        let snap0 = Snapshot::take(&self.pids, None, None);
        tokio::time::sleep(self.opts.scale_window).await;
        let after_info = self.info("stats").await?;
        let seconds = t0.elapsed().as_secs_f64();
        let db_calls = match monitor {
            Some(m) => m.stop().await.ok(),
            None => None,
        };
        let db_commands_per_s = db_calls
            .as_ref()
            .map(|c| c.values().sum::<u64>() as f64 / seconds);
        let db_calls_per_s: BTreeMap<String, f64> = db_calls
            .unwrap_or_default()
            .into_iter()
            .map(|(k, n)| (k, n as f64 / seconds))
            .collect();
        let snap1 = Snapshot::take(&self.pids, None, None);
        let cost = probe::delta(&snap0, &snap1, 1);
        let redis_commands_per_s = match (
            info_u64(&before_info, "total_commands_processed"),
            info_u64(&after_info, "total_commands_processed"),
        ) {
            (Some(a), Some(b)) => Some(commands_per_s(a, b, 1, seconds)),
            _ => None,
        };
        // The sweep pass, a second apart.
        let mut sweep_pass_ms = Vec::new();
        for i in 0..self.opts.scale_sweep_samples {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if let Some(v) = self.metric("flashgate_sweep_pass_seconds").await {
                sweep_pass_ms.push(v * 1000.0);
            }
        }
        let (readyz, _) = self
            .sequential(&self.client, "/readyz", self.opts.scale_readyz_requests)
            .await;
        let (metrics, metrics_bytes) = self
            .sequential(
                &self.metrics_client,
                &self.metrics_path,
                self.opts.scale_metrics_requests,
            )
            .await;
        println!(
            "  full reconcile: {} reconcile",
            self.opts.flashgate_bin.display()
        );
        let reconcile = self.reconcile(None).await;
        Ok(SkuStep {
            skus,
            on_sale,
            defined,
            define_seconds,
            define_per_s: defined as f64 / define_seconds.max(1e-9),
            define_errors: 0,
            indexed_skus,
            ours_indexed,
            retired_after_end_s: None,
            idle_window_s: seconds,
            redis_commands_per_s,
            db_commands_per_s,
            db_calls_per_s,
            redis_cores: cost.redis_cores,
            gateway_cores: cost.gateway_cores,
            other_cores: cost.other_cores,
            sweep_pass_ms_max_while_defining: None,
            sweep_pass_ms_max: sweep_pass_ms.iter().copied().reduce(f64::max),
            sweep_pass_ms_last: sweep_pass_ms.last().copied(),
            sweep_pass_ms,
            readyz,
            metrics,
            metrics_bytes,
            reconcile: Some(reconcile),
        })
    }

    // ------------------------------------------------------------ B. live holds ---

    async fn hold_curve(&mut self, report: &mut ScaleReport) -> Result<()> {
        let most = *self.opts.scale_holds.last().expect("validated");
        let sku = format!("{}-h", self.base);
        let hot = format!("{}-hot", self.base);
        println!(
            "\n== live holds on {sku}: up to {} holds (stock {most}, hold {HOLD_SECONDS} s); reserve throughput on {hot}",
            count(most)
        );
        let hold_body = json!({"stock": most, "per_user_limit": 1, "hold_seconds": HOLD_SECONDS});
        let hot_body =
            json!({"stock": HOT_STOCK, "per_user_limit": 1, "hold_seconds": HOLD_SECONDS});
        let (_, samples, failed, _) = self
            .define(vec![
                (sku.clone(), hold_body, None),
                (hot.clone(), hot_body, None),
            ])
            .await?;
        if failed > 0 {
            bail!("defining the hold SKUs: {}", samples.join(" | "));
        }
        let script = redis::Script::new(&gateway::reserve_script());
        let loaded = gateway::gateway_runs_this_reserve(&mut self.redis).await?;
        if !loaded {
            println!(
                "  WARNING the gateway has not loaded this checkout's reserve script (lua/ differs from the running gateway's): the holds are written by this checkout's"
            );
        }
        let sha = script
            .prepare_invoke()
            .load_async(&mut self.redis)
            .await
            .context("SCRIPT LOAD of the reserve script")?;
        let key = IdKey::derive(&self.args.jwt_secret);
        let mut rng = StdRng::seed_from_u64(self.seed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let memory_at_zero = self.used_memory().await;
        let mut memory_before_step = memory_at_zero;
        let cancels = self.opts.cancels();
        let mut keep: Vec<String> = Vec::with_capacity(cancels as usize);
        let mut written_so_far = 0u64;
        for &h in &self.opts.scale_holds.clone() {
            println!(
                "\n== {} live holds: writing {}",
                count(h),
                h - written_so_far
            );
            let started = Instant::now();
            self.write_holds(
                &sku,
                &sha,
                written_so_far,
                h,
                &key,
                &mut rng,
                &mut keep,
                cancels,
            )
            .await?;
            let write_seconds = started.elapsed().as_secs_f64();
            let written = h - written_so_far;
            // Let the AOF buffer drain before weighing.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let held_in_redis: Option<u64> = redis::cmd("HGET")
                .arg(gateway::key(&sku, "meta"))
                .arg("held")
                .query_async(&mut self.redis)
                .await
                .ok()
                .flatten();
            let used_memory = self.used_memory().await;
            let sampled_bytes_per_hold = self.sampled_bytes_per_hold(&sku, h).await;
            // Reconcile of this SKU, with the slowlog around it.
            let (reconcile, slow) = self.reconcile_with_slowlog(&sku).await?;
            let step = HoldStep {
                holds: h,
                written,
                write_seconds,
                write_per_s: written as f64 / write_seconds.max(1e-9),
                held_in_redis,
                used_memory,
                bytes_per_hold: match (memory_at_zero, used_memory) {
                    (Some(a), Some(b)) => per_item(a, b, h),
                    _ => None,
                },
                step_bytes_per_hold: match (memory_before_step, used_memory) {
                    (Some(a), Some(b)) => per_item(a, b, written),
                    _ => None,
                },
                sampled_bytes_per_hold,
                reconcile: Some(reconcile),
                slow_calls: slow.0,
                slowest: slow.1,
                slowest_by_reconcile: slow.2,
            };
            memory_before_step = used_memory;
            print_hold_step(&step);
            if held_in_redis != Some(h) {
                println!(
                    "  WARNING held in Redis is {held_in_redis:?}, expected {h}: the reserve script refused some holds"
                );
            }
            report.hold_curve.push(step);
            written_so_far = h;
        }

        report.reserve_under_reconcile =
            Some(self.reserve_under_reconcile(&hot, &sku, most).await?);
        let live_bytes = report
            .hold_curve
            .last()
            .and_then(|s| s.bytes_per_hold.or(s.sampled_bytes_per_hold));
        report.ended = Some(self.end_holds(&sku, keep, live_bytes).await?);
        Ok(())
    }

    /// Writes holds `from..to` on `sku` with the gateway's reserve script, pipelined.
    /// Keeps the first `keep_max` reservation ids in `keep`.
    #[allow(clippy::too_many_arguments)]
    async fn write_holds(
        &mut self,
        sku: &str,
        sha: &str,
        from: u64,
        to: u64,
        key: &IdKey,
        rng: &mut StdRng,
        keep: &mut Vec<String>,
        keep_max: u64,
    ) -> Result<()> {
        let bar = self.bar(to - from, "holds");
        let mut tasks: tokio::task::JoinSet<Result<(u64, Option<String>)>> =
            tokio::task::JoinSet::new();
        let mut created = 0u64;
        let mut refused: Option<String> = None;
        let mut start = from;
        let settle = |r: Result<Result<(u64, Option<String>)>, tokio::task::JoinError>,
                      created: &mut u64,
                      refused: &mut Option<String>|
         -> Result<()> {
            let (n, first_refusal) = r.map_err(|e| anyhow!("pipeline task: {e}"))??;
            *created += n;
            if refused.is_none() {
                *refused = first_refusal;
            }
            Ok(())
        };
        while start < to {
            let end = (start + self.opts.scale_pipeline as u64).min(to);
            let mut pipe = redis::pipe();
            for i in start..end {
                let rid = key.new_reservation_id(sku, rng);
                let user = format!("h{i}");
                let idem = format!("k{i}");
                if keep.len() < keep_max as usize {
                    keep.push(rid.clone());
                }
                pipe.cmd("EVALSHA")
                    .arg(sha)
                    .arg(10)
                    .arg(gateway::sale_keys(sku))
                    .arg(gateway::idempotency_key(sku, &user, &idem))
                    .arg(&user)
                    .arg(1)
                    .arg(&rid)
                    .arg(&idem)
                    .arg(gateway::IDEMPOTENCY_TTL_MS)
                    .arg(gateway::PAYMENT_GRACE_MS)
                    .arg(gateway::RESERVE_RECLAIM_BATCH);
            }
            let mut conn = self.redis.clone();
            let bar = bar.clone();
            let n = end - start;
            tasks.spawn(async move {
                let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
                let mut ok = 0;
                let mut refusal = None;
                for reply in &replies {
                    match reply {
                        redis::Value::Array(fields)
                            if fields.first().map(text).as_deref() == Some("created") =>
                        {
                            ok += 1
                        }
                        other => {
                            refusal.get_or_insert_with(|| format!("{other:?}"));
                        }
                    }
                }
                bar.inc(n);
                Ok((ok, refusal))
            });
            while tasks.len() >= PIPELINES_IN_FLIGHT {
                let r = tasks.join_next().await.expect("tasks are running");
                settle(r, &mut created, &mut refused)?;
            }
            start = end;
        }
        while let Some(r) = tasks.join_next().await {
            settle(r, &mut created, &mut refused)?;
        }
        bar.finish_and_clear();
        if created != to - from {
            bail!(
                "{} of {} reserve calls did not create a hold; first answer: {}",
                to - from - created,
                to - from,
                refused.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// MEMORY USAGE of the SKU's per-hold structures (hold records, deadlines, usage
    /// records with the idempotency claims; layout 2 keeps no key per hold), per hold.
    /// (MEMORY USAGE samples the elements of large structures: an estimate.)
    async fn sampled_bytes_per_hold(&mut self, sku: &str, holds: u64) -> Option<f64> {
        if holds == 0 {
            return None;
        }
        let mut pipe = redis::pipe();
        for shared in ["holds", "deadlines", "used"] {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(gateway::key(sku, shared));
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(&mut self.redis).await.ok()?;
        let shared: u64 = sizes.iter().flatten().sum();
        Some(shared as f64 / holds as f64)
    }

    async fn reconcile_with_slowlog(
        &mut self,
        sku: &str,
    ) -> Result<(ReconcileRun, (usize, Option<SlowCall>, Option<SlowCall>))> {
        let threshold = config_get(&mut self.redis, "slowlog-log-slower-than").await?;
        let max_len = config_get(&mut self.redis, "slowlog-max-len").await?;
        config_set(
            &mut self.redis,
            "slowlog-log-slower-than",
            &SLOWLOG_THRESHOLD_US.to_string(),
        )
        .await?;
        config_set(
            &mut self.redis,
            "slowlog-max-len",
            &SLOWLOG_MAX_LEN.to_string(),
        )
        .await?;
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        let known = client_addresses(&clients);
        let own: String = redis::cmd("CLIENT")
            .arg("INFO")
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        let own = client_addresses(&own);
        let _: () = redis::cmd("SLOWLOG")
            .arg("RESET")
            .query_async(&mut self.redis)
            .await?;
        println!("  reconcile --sku {sku}");
        let run = self.reconcile(Some(sku)).await;
        let slowlog: redis::RedisResult<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(SLOWLOG_MAX_LEN)
            .query_async(&mut self.redis)
            .await;
        // Restore before anything can fail.
        let restored = (
            config_set(&mut self.redis, "slowlog-log-slower-than", &threshold).await,
            config_set(&mut self.redis, "slowlog-max-len", &max_len).await,
        );
        restored.0?;
        restored.1?;
        Ok((run, slowest_calls(&slowlog?, &known, &own)))
    }

    async fn reserve_window(
        &self,
        ctx: &Arc<Ctx>,
        sku: &str,
        index: u64,
        title: &str,
    ) -> ReserveWindow {
        let before = self.metric("flashgate_reconcile_last_run_seconds").await;
        let forks = |info: Option<String>| info.and_then(|i| info_u64(&i, "total_forks"));
        let snap0 = Snapshot::take(
            &self.pids,
            None,
            forks(self.info_shared("stats").await.ok()),
        );
        let reserves = Load::new(
            Workload::Reserve {
                sku: sku.to_string(),
            },
            Pace::Closed {
                clients: self.args.concurrency,
            },
        );
        let (rec, elapsed) = load::run_phase(
            ctx,
            vec![reserves],
            title,
            100 + index,
            self.opts.scale_load_duration,
        )
        .await;
        let snap1 = Snapshot::take(
            &self.pids,
            None,
            forks(self.info_shared("stats").await.ok()),
        );
        let cost = probe::delta(&snap0, &snap1, 1);
        let after = self.metric("flashgate_reconcile_last_run_seconds").await;
        let (endpoints, _) = rec.summary(elapsed, 0.0);
        let reserve = endpoints.iter().find(|e| e.endpoint == "reserve");
        let created = reserve.map_or(0, |e| e.outcome("201 created"));
        ReserveWindow {
            seconds: elapsed.as_secs_f64(),
            created,
            created_per_s: created as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: reserve.map_or(0.0, |e| e.p50_ms),
            p99_ms: reserve.map_or(0.0, |e| e.p99_ms),
            errors: rec.errors.load(Ordering::Relaxed),
            worker_reconcile_ran: match (before, after) {
                (Some(a), Some(b)) => Some(a != b),
                _ => None,
            },
            gateway_cores: cost.gateway_cores,
            redis_cores: cost.redis_cores,
            other_cores: cost.other_cores,
            redis_forks: cost.redis_forks,
            ..ReserveWindow::default()
        }
    }

    async fn reserve_under_reconcile(
        &mut self,
        hot: &str,
        sku: &str,
        holds: u64,
    ) -> Result<ReserveUnderReconcile> {
        let load_client = Client::new(
            &self.args.target()?,
            &self.args.service_token,
            self.args.timeout,
        )
        .await?;
        let ctx = Arc::new(Ctx::new(
            self.args.clone(),
            load_client,
            format!("{}x", self.run_id),
            self.seed,
        ));
        ctx.client.prewarm(self.args.concurrency).await;
        // The holds just written would trigger an automatic AOF rewrite (a fork of a
        // Redis of a GB or more) in one of the windows: have it now, and wait.
        match crate::baseline_redis::compact_aof(&mut self.redis).await {
            Ok(Some(took)) => println!(
                "\n  AOF rewritten before the throughput windows ({:.1} s)",
                took.as_secs_f64()
            ),
            Ok(None) => {}
            Err(e) => println!("\n  AOF rewrite before the throughput windows failed: {e:#}"),
        }
        let secs = self.opts.scale_load_duration.as_secs_f64();
        println!(
            "\n== reserve throughput on {hot} ({secs:.0} s, closed loop, {} clients): alone",
            self.args.concurrency
        );
        let alone = self.reserve_window(&ctx, hot, 0, "alone").await;
        println!(
            "  {:.0} reserves/s (201), p50 {:.2} ms, p99 {:.2} ms, {} errors; {}",
            alone.created_per_s,
            alone.p50_ms,
            alone.p99_ms,
            alone.errors,
            window_cost(&alone)
        );
        println!(
            "== the same while `flashgate reconcile --sku {sku}` ({} live holds) runs, again and again",
            count(holds)
        );
        let stop = Arc::new(AtomicBool::new(false));
        let looping = {
            let (stop, bin, args, sku, timeout) = (
                stop.clone(),
                self.opts.flashgate_bin.clone(),
                self.args.clone(),
                sku.to_string(),
                self.opts.scale_reconcile_timeout,
            );
            tokio::spawn(async move {
                let mut runs = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    runs.push(reconcile(&bin, &args, Some(&sku), timeout).await);
                }
                runs
            })
        };
        // Let the first reconcile get going (process start, connections).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut with = self.reserve_window(&ctx, hot, 1, "+reconcile").await;
        stop.store(true, Ordering::Relaxed);
        let runs = looping.await.map_err(|e| anyhow!("reconcile loop: {e}"))?;
        with.reconcile_runs = runs.len();
        with.reconcile_seconds = runs.iter().map(|r| r.seconds).collect();
        with.reconcile_exit_codes = runs.iter().map(ReconcileRun::exit_text).collect();
        println!(
            "  {:.0} reserves/s (201), p50 {:.2} ms, p99 {:.2} ms, {} errors; {}; {} reconcile runs ({} s each, exit {})",
            with.created_per_s,
            with.p50_ms,
            with.p99_ms,
            with.errors,
            window_cost(&with),
            with.reconcile_runs,
            with.reconcile_seconds
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join("/"),
            dedup(&with.reconcile_exit_codes)
        );
        let r = ratio(alone.created_per_s, with.created_per_s);
        println!("  with / alone: {}", opt(r, 2));
        Ok(ReserveUnderReconcile {
            sku: hot.to_string(),
            concurrency: self.args.concurrency,
            holds,
            alone,
            with_reconcile: with,
            ratio: r,
        })
    }

    /// Cancels the kept holds over HTTP, waits for the flush, weighs the difference.
    async fn end_holds(
        &mut self,
        sku: &str,
        rids: Vec<String>,
        live_bytes: Option<f64>,
    ) -> Result<Ended> {
        println!(
            "\n== ended reservations: cancelling {} holds of {sku} (POST /v1/reservations/{{id}}/cancel, {} in flight)",
            rids.len(),
            self.opts.scale_define_concurrency
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = self.used_memory().await;
        let asked = rids.len() as u64;
        let work = Arc::new(rids);
        let next = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(Mutex::new(Vec::<String>::new()));
        let bar = self.bar(asked, "cancel");
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.opts.scale_define_concurrency {
            let (work, next, cancelled, failed, samples, client, bar) = (
                work.clone(),
                next.clone(),
                cancelled.clone(),
                failed.clone(),
                samples.clone(),
                self.client.clone(),
                bar.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(rid) = work.get(i) else { break };
                    let mut answer = None;
                    for attempt in 0..=RETRIES {
                        let a = client
                            .send(
                                Method::POST,
                                &format!("/v1/reservations/{rid}/cancel"),
                                Auth::Service,
                                None,
                                None,
                            )
                            .await;
                        let retry = a.status == 0 || a.status == 503;
                        answer = Some(a);
                        if !retry || attempt == RETRIES {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let answer = answer.expect("one attempt at least");
                    let fields = answer.fields();
                    if answer.status == 200 && Answer::state(&fields) == Some("cancelled") {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut s = samples.lock().unwrap();
                        if s.len() < ERROR_SAMPLES {
                            s.push(format!("cancel {rid}: {}", answer.text()));
                        }
                    }
                    bar.inc(1);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        bar.finish_and_clear();
        let cancel_seconds = started.elapsed().as_secs_f64();
        let cancelled = cancelled.load(Ordering::Relaxed);
        let failed = failed.load(Ordering::Relaxed);
        let error_samples = samples.lock().unwrap().clone();
        println!(
            "  {cancelled} cancelled in {cancel_seconds:.1} s{}",
            if failed > 0 {
                format!(", {failed} FAILED: {}", error_samples.join(" | "))
            } else {
                String::new()
            }
        );
        // The worker flushes the cancellations to MySQL, acknowledges them, then trims
        // the outbox. Watched on the SKU's stream itself: `flashgate_outbox_backlog` is
        // set at the end of a flush pass, so it still reads the last pass's value while
        // a pass waits (on a MySQL row lock, say).
        let flush_started = Instant::now();
        let mut flush_seconds = None;
        let mut stale_gauge = false;
        let mut outbox_entries_left = None;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let state = outbox_state(&mut self.redis, sku).await?;
            if state.0 == 0 {
                flush_seconds = Some(flush_started.elapsed().as_secs_f64());
                // Acknowledged entries are trimmed approximately (whole stream nodes).
                outbox_entries_left = Some(state.1);
                break;
            }
            stale_gauge |= self.metric("flashgate_outbox_backlog").await == Some(0.0);
            if flush_started.elapsed() > self.args.flush_timeout {
                println!(
                    "  WARNING {} events unflushed, {} in the outbox after {:.0} s (--flush-timeout)",
                    state.0,
                    state.1,
                    self.args.flush_timeout.as_secs_f64()
                );
                break;
            }
        }
        if stale_gauge {
            println!(
                "  NOTE flashgate_outbox_backlog read 0 while the outbox still had unflushed events"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = self.used_memory().await;
        let sampled_bytes_per_ended = {
            let mut pipe = redis::pipe();
            // The kept ids are holds 0, 1, 2, … in order: user h<i>. What an ended
            // reservation keeps is its claim in the user's usage record (layout 2): the
            // record's bytes and the user id, without the hash entry's own overhead.
            let users: Vec<String> = (0..work.len())
                .step_by((work.len() / MEMORY_SAMPLE).max(1))
                .take(MEMORY_SAMPLE)
                .map(|i| format!("h{i}"))
                .collect();
            for user in &users {
                pipe.cmd("HSTRLEN").arg(gateway::key(sku, "used")).arg(user);
            }
            let sizes: Option<Vec<u64>> = pipe.query_async(&mut self.redis).await.ok();
            sizes.filter(|_| !users.is_empty()).map(|sizes| {
                let bytes: usize = users.iter().map(String::len).sum();
                (sizes.iter().sum::<u64>() + bytes as u64) as f64 / users.len() as f64
            })
        };
        let delta = match (before, after) {
            (Some(a), Some(b)) => per_item(a, b, cancelled),
            _ => None,
        };
        let ended = Ended {
            asked,
            cancelled,
            cancel_errors: failed,
            error_samples,
            cancel_seconds,
            flush_seconds,
            outbox_entries_left,
            used_memory_before: before,
            used_memory_after: after,
            bytes_delta_per_ended: delta,
            bytes_per_ended: match (live_bytes, delta) {
                (Some(l), Some(d)) => Some(l + d),
                _ => None,
            },
            sampled_bytes_per_ended,
        };
        println!(
            "  outbox flushed {} s after the last cancel ({} entries left in the stream); memory {} bytes per ended reservation ({} vs a live hold; {} by MEMORY USAGE of its keys)",
            opt(ended.flush_seconds, 1),
            ended
                .outbox_entries_left
                .map_or("?".into(), |n| n.to_string()),
            opt(ended.bytes_per_ended, 0),
            opt(ended.bytes_delta_per_ended, 0),
            opt(ended.sampled_bytes_per_ended, 0)
        );
        Ok(ended)
    }

    // ------------------------------------------------------------ clean-up ---

    /// The SKUs of the run `self.base` names, from MySQL (read only), and which of them
    /// are still on sale there: for --scale-cleanup.
    async fn load_run_from_mysql(&mut self) -> Result<()> {
        let options = sqlx::mysql::MySqlConnectOptions::from_str(&self.args.database_url)
            .context("--database-url")?;
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .context("connecting to MySQL (--database-url)")?;
        let rows: Vec<(String, u64, u32, u32, i64)> = sqlx::query_as(
            "SELECT sku, stock_total, per_user_limit, hold_seconds,
                    (ends_at IS NULL OR ends_at > NOW(3)) AS on_sale
             FROM skus WHERE sku LIKE ? ORDER BY sku",
        )
        .bind(format!("{}-%", self.base))
        .fetch_all(&pool)
        .await?;
        for (sku, stock, limit, hold, on_sale) in rows {
            if on_sale != 0 {
                let body = json!({"stock": stock, "per_user_limit": limit, "hold_seconds": hold});
                self.open.push((sku.clone(), body));
            }
            self.skus.push(sku);
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<String> {
        // 1. End the sales still open, in MySQL too: the reconciler rebuilds in Redis
        //    any SKU MySQL has on sale and Redis lacks.
        let open = std::mem::take(&mut self.open);
        let opened = open.len();
        let skus_before = std::mem::take(&mut self.skus);
        let work: Vec<_> = open
            .into_iter()
            .map(|(sku, body)| (sku, body, Some(Duration::ZERO)))
            .collect();
        let (_, samples, failed, _) = self.define(work).await?;
        self.skus = skus_before;
        if failed > 0 {
            // Deleting their keys now would have the reconciler rebuild them in Redis
            // from MySQL, on sale for good: keep everything for a later clean-up.
            return Ok(format!(
                "NOT DONE: {failed} of {opened} open sales could not be ended ({}); nothing deleted: run `flashgate-bench scale --scale-cleanup {}` against a running gateway",
                samples.join(" | "),
                self.run_id
            ));
        }
        // 2. Out of the worker's index, and tell the workers.
        let mut unindexed = self.unindex().await?;
        // 3. A reconcile pass of the gateway's worker that began before may still have
        //    these SKUs on its list; deleting their keys under it would have it "repair"
        //    them (findings in MySQL's audit, a SKU back in the index). The passes after
        //    it do not see them (not indexed, not on sale in MySQL): let it end first.
        let waited = self.wait_for_worker_reconcile(RECONCILE_PASS_WAIT).await;
        // 4. Every key of this run's SKUs, until none is left and none is indexed (a
        //    worker's visit in flight may have touched one).
        let pattern = format!("fg:{{{}-*", self.base);
        let mut deleted = 0;
        for _ in 0..3 {
            deleted += delete_matching(&mut self.redis, &pattern, true).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let again = self.unindex().await?;
            unindexed += again;
            let left = delete_matching(&mut self.redis, &pattern, false).await?;
            if again == 0 && left == 0 {
                break;
            }
        }
        Ok(format!(
            "{} open sales ended ({failed} failed), {unindexed} of {} SKUs taken out of fg:skus, {}{deleted} keys matching {pattern} deleted (their MySQL rows stay)",
            opened - failed as usize,
            self.skus.len(),
            waited.map_or(String::new(), |w| format!(
                "waited {:.0} s for the worker's reconcile pass, ",
                w.as_secs_f64()
            )),
        ))
    }

    /// SREM of this run's SKUs from the gateway's index (and a generation bump when
    /// some were there). Returns how many were.
    async fn unindex(&mut self) -> Result<u64> {
        let mut unindexed = 0u64;
        for chunk in self.skus.chunks(1000) {
            let n: u64 = redis::cmd("SREM")
                .arg("fg:skus")
                .arg(chunk)
                .query_async(&mut self.redis)
                .await?;
            unindexed += n;
        }
        if unindexed > 0 {
            let _: u64 = redis::cmd("INCR")
                .arg("fg:{skus}:gen")
                .query_async(&mut self.redis)
                .await?;
        }
        Ok(unindexed)
    }

    /// Waits (at most `limit`) until the gateway's worker ends a reconcile pass
    /// (`flashgate_reconcile_last_run_seconds` moves). None when the gateway does not
    /// export it (no worker in that process).
    async fn wait_for_worker_reconcile(&self, limit: Duration) -> Option<Duration> {
        let first = self.metric("flashgate_reconcile_last_run_seconds").await?;
        println!(
            "  waiting for the end of the gateway worker's reconcile pass (at most {:.0} s) before deleting keys",
            limit.as_secs_f64()
        );
        let started = Instant::now();
        while started.elapsed() < limit {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.metric("flashgate_reconcile_last_run_seconds").await != Some(first) {
                break;
            }
        }
        Some(started.elapsed())
    }
}

/// Counts, with MONITOR on a connection of its own, the commands Redis runs in the
/// gateway's database (`--redis-url`'s), except those of the `exclude` client addresses.
struct Monitor {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<BTreeMap<String, u64>>>,
}

impl Monitor {
    async fn start(url: &str, exclude: HashSet<String>) -> Result<Monitor> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let target = crate::baseline_redis::parse_url(url)?;
        let db = target.db.unwrap_or(0).to_string();
        let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
        let mut stream = BufReader::new(stream);
        if let Some(password) = &target.password {
            let mut auth = vec!["AUTH".to_string()];
            auth.extend(target.user.clone());
            auth.push(password.clone());
            let mut command = format!("*{}\r\n", auth.len());
            for a in &auth {
                command += &format!("${}\r\n{a}\r\n", a.len());
            }
            stream.get_mut().write_all(command.as_bytes()).await?;
            let mut line = String::new();
            stream.read_line(&mut line).await?;
            if !line.starts_with('+') {
                bail!("AUTH: {}", line.trim());
            }
        }
        stream.get_mut().write_all(b"MONITOR\r\n").await?;
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        if !line.starts_with("+OK") {
            bail!("MONITOR: {}", line.trim());
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut counts = BTreeMap::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                tokio::select! {
                    _ = &mut stopped => return Ok(counts),
                    read = stream.read_until(b'\n', &mut line) => {
                        if read? == 0 {
                            bail!("MONITOR connection closed");
                        }
                        if let Some((line_db, client, command)) =
                            monitor_line(&String::from_utf8_lossy(&line))
                        {
                            if line_db == db && !exclude.contains(client) {
                                let name = if client == "lua" {
                                    format!("lua:{command}")
                                } else {
                                    command.to_string()
                                };
                                *counts.entry(name).or_insert(0u64) += 1;
                            }
                        }
                    }
                }
            }
        });
        Ok(Monitor { stop, task })
    }

    async fn stop(self) -> Result<BTreeMap<String, u64>> {
        let _ = self.stop.send(());
        self.task.await.map_err(|e| anyhow!("MONITOR task: {e}"))?
    }
}

/// A MONITOR line `+<time> [<db> <client>] "<command>" ...` as (db, client, command
/// in lower case).
fn monitor_line(line: &str) -> Option<(&str, &str, String)> {
    let rest = line.strip_prefix('+')?;
    let (_, rest) = rest.split_once(" [")?;
    let (inside, rest) = rest.split_once("] \"")?;
    let (db, client) = inside.split_once(' ')?;
    let command = rest.split('"').next()?;
    Some((db, client, command.to_ascii_lowercase()))
}

async fn config_get(conn: &mut MultiplexedConnection, name: &str) -> Result<String> {
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await?;
    v.get(1)
        .cloned()
        .ok_or_else(|| anyhow!("CONFIG GET {name}: {v:?}"))
}

async fn config_set(conn: &mut MultiplexedConnection, name: &str, value: &str) -> Result<()> {
    Ok(redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async::<()>(conn)
        .await?)
}

fn window_cost(w: &ReserveWindow) -> String {
    format!(
        "gateway {} cores, redis {} cores, other processes {} cores{}{}",
        opt(w.gateway_cores, 2),
        opt(w.redis_cores, 2),
        opt(w.other_cores, 2),
        match w.redis_forks {
            Some(n) if n > 0 => format!(", Redis forked {n} time(s)"),
            _ => String::new(),
        },
        match w.worker_reconcile_ran {
            Some(true) => ", the gateway's worker reconciled",
            _ => "",
        }
    )
}

fn dedup(codes: &[String]) -> String {
    let mut seen: Vec<&String> = Vec::new();
    for c in codes {
        if !seen.contains(&c) {
            seen.push(c);
        }
    }
    seen.iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A SKU's outbox: (events the flush group has not acknowledged, entries in the stream).
/// Acknowledged means written to MySQL: the flush acknowledges after its commit.
async fn outbox_state(conn: &mut MultiplexedConnection, sku: &str) -> Result<(u64, u64)> {
    let outbox = gateway::key(sku, "outbox");
    let length: u64 = redis::cmd("XLEN").arg(&outbox).query_async(conn).await?;
    if length == 0 {
        return Ok((0, 0));
    }
    let groups: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&outbox)
        .query_async(conn)
        .await?;
    Ok((unacknowledged(&groups, "flush").unwrap_or(length), length))
}

/// pending + lag of a consumer group in an XINFO GROUPS reply (None when the group is
/// missing or Redis cannot tell its lag).
pub fn unacknowledged(groups: &[Vec<redis::Value>], name: &str) -> Option<u64> {
    let field = |group: &[redis::Value], key: &str| {
        group
            .chunks(2)
            .find(|kv| text(&kv[0]) == key)
            .and_then(|kv| kv.get(1))
            .and_then(|v| match v {
                redis::Value::Int(i) => Some(*i as u64),
                _ => None,
            })
    };
    let group = groups.iter().find(|g| {
        g.chunks(2)
            .any(|kv| text(&kv[0]) == "name" && kv.get(1).map(text).as_deref() == Some(name))
    })?;
    Some(field(group, "pending")? + field(group, "lag")?)
}

/// UNLINKs (or only counts, when `delete` is false) the keys matching `pattern`.
pub async fn delete_matching(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    delete: bool,
) -> Result<u64> {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        deleted += keys.len() as u64;
        if delete && !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Runs `flashgate reconcile [--sku S]` with the harness's Redis, MySQL and secrets.
async fn reconcile(bin: &Path, args: &Args, sku: Option<&str>, timeout: Duration) -> ReconcileRun {
    let mut command = tokio::process::Command::new(bin);
    command.arg("reconcile").arg("--json");
    if let Some(sku) = sku {
        command.arg("--sku").arg(sku);
    }
    command
        .env("FLASHGATE_REDIS_URL", &args.redis_url)
        .env("FLASHGATE_DATABASE_URL", &args.database_url)
        .env("FLASHGATE_JWT_SECRET", &args.jwt_secret)
        .env("FLASHGATE_SERVICE_TOKEN", &args.service_token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let shown = format!(
        "{} reconcile{}",
        bin.display(),
        sku.map(|s| format!(" --sku {s}")).unwrap_or_default()
    );
    let started = Instant::now();
    let output = tokio::time::timeout(timeout, command.output()).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut run = ReconcileRun {
        command: shown,
        seconds,
        exit_code: None,
        timed_out: false,
        summary: String::new(),
        findings: BTreeMap::new(),
        stderr_tail: Vec::new(),
    };
    match output {
        Err(_) => run.timed_out = true,
        Ok(Err(e)) => run.stderr_tail = vec![format!("could not run: {e}")],
        Ok(Ok(out)) => {
            run.exit_code = out.status.code();
            // `--json`: {"checked", "findings": [{"kind", ...}], "repaired", "needs_attention"}.
            if let Ok(report) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let findings = report["findings"].as_array().cloned().unwrap_or_default();
                for finding in &findings {
                    let kind = finding["kind"].as_str().unwrap_or("?").to_string();
                    *run.findings.entry(kind).or_insert(0) += 1;
                }
                run.summary = format!(
                    "checked {} SKUs, {} findings ({} repaired, {} need attention)",
                    report["checked"],
                    findings.len(),
                    report["repaired"],
                    report["needs_attention"]
                );
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            run.stderr_tail = lines[lines.len().saturating_sub(3)..]
                .iter()
                .map(|l| shorten(l, 300))
                .collect();
        }
    }
    run
}

// ---------------------------------------------------------------- printing ---

fn reconcile_cell(r: &Option<ReconcileRun>) -> String {
    match r {
        Some(r) => format!("{:.2} s (exit {})", r.seconds, r.exit_text()),
        None => "-".into(),
    }
}

fn findings_text(r: &ReconcileRun) -> String {
    if r.findings.is_empty() {
        return String::new();
    }
    r.findings
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_sku_step(s: &SkuStep) {
    println!(
        "  index {} SKUs ({} of this run's) · idle: Redis {} commands/s ({} in the gateway's db), redis {} cores, gateway {} cores (other processes {} cores)",
        s.indexed_skus.map_or("?".into(), |n| n.to_string()),
        s.ours_indexed.map_or("?".into(), |n| n.to_string()),
        opt(s.redis_commands_per_s, 1),
        opt(s.db_commands_per_s, 1),
        opt(s.redis_cores, 3),
        opt(s.gateway_cores, 3),
        opt(s.other_cores, 2)
    );
    if !s.db_calls_per_s.is_empty() {
        let mut calls: Vec<(&String, &f64)> = s.db_calls_per_s.iter().collect();
        calls.sort_by(|a, b| b.1.total_cmp(a.1));
        println!(
            "  gateway's db, per second: {}",
            calls
                .iter()
                .take(12)
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  sweep pass {} ms (max {}, last {}) · /readyz p50 {:.2} p99 {:.2} ms · /metrics p50 {:.2} p99 {:.2} ms, {} bytes",
        s.sweep_pass_ms
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join("/"),
        opt(s.sweep_pass_ms_max, 1),
        opt(s.sweep_pass_ms_last, 1),
        s.readyz.p50_ms,
        s.readyz.p99_ms,
        s.metrics.p50_ms,
        s.metrics.p99_ms,
        s.metrics_bytes.map_or("?".into(), |b| b.to_string())
    );
    if let Some(r) = &s.reconcile {
        print_reconcile(r);
    }
}

fn print_reconcile(r: &ReconcileRun) {
    println!(
        "  reconcile {:.2} s, exit {}: {}{}",
        r.seconds,
        r.exit_text(),
        r.summary,
        match findings_text(r) {
            f if f.is_empty() => String::new(),
            f => format!(" ({f})"),
        }
    );
    if r.exit_code != Some(0) {
        for l in &r.stderr_tail {
            println!("    stderr: {l}");
        }
    }
}

fn slow_text(s: &Option<SlowCall>) -> String {
    match s {
        Some(s) => format!("{:.1} ms {}", s.micros as f64 / 1000.0, s.command),
        None => "< 1 ms".into(),
    }
}

fn print_hold_step(s: &HoldStep) {
    println!(
        "  written in {:.1} s ({:.0} holds/s); held {} · {} bytes per live hold (used_memory; {} over this step; {} by MEMORY USAGE)",
        s.write_seconds,
        s.write_per_s,
        s.held_in_redis.map_or("?".into(), |h| h.to_string()),
        opt(s.bytes_per_hold, 0),
        opt(s.step_bytes_per_hold, 0),
        opt(s.sampled_bytes_per_hold, 0)
    );
    if let Some(r) = &s.reconcile {
        print_reconcile(r);
    }
    println!(
        "  slowest Redis call during it: {} ({} calls over 1 ms); slowest of the reconcile's own: {}",
        slow_text(&s.slowest),
        s.slow_calls,
        slow_text(&s.slowest_by_reconcile)
    );
}

fn print_tables(report: &ScaleReport) {
    if !report.sku_curve.is_empty() {
        println!("\n== cost curve: SKU count");
        println!(
            "  {:>8} {:>8} {:>12} {:>9} {:>10} {:>21} {:>17} {:>19} {:>11} {:>22}",
            "SKUs",
            "in index",
            "Redis cmd/s",
            "db cmd/s",
            "define/s",
            "sweep ms def/max/last",
            "/readyz p50/p99",
            "/metrics p50/p99",
            "/metrics KiB",
            "full reconcile"
        );
        for s in &report.sku_curve {
            println!(
                "  {:>8} {:>8} {:>12} {:>9} {:>10.0} {:>21} {:>17} {:>19} {:>11} {:>22}",
                count(s.skus),
                s.ours_indexed.map_or("?".into(), |n| n.to_string()),
                opt(s.redis_commands_per_s, 1),
                opt(s.db_commands_per_s, 1),
                s.define_per_s,
                format!(
                    "{}/{}/{}",
                    opt(s.sweep_pass_ms_max_while_defining, 1),
                    opt(s.sweep_pass_ms_max, 1),
                    opt(s.sweep_pass_ms_last, 1)
                ),
                format!("{:.2}/{:.2} ms", s.readyz.p50_ms, s.readyz.p99_ms),
                format!("{:.2}/{:.2} ms", s.metrics.p50_ms, s.metrics.p99_ms),
                s.metrics_bytes
                    .map_or("?".into(), |b| format!("{:.1}", b as f64 / 1024.0)),
                reconcile_cell(&s.reconcile)
            );
        }
    }
    if !report.hold_curve.is_empty() {
        println!("\n== cost curve: live holds on one SKU");
        println!(
            "  {:>8} {:>11} {:>14} {:>14} {:>22} {:>30}",
            "holds",
            "written/s",
            "bytes/hold",
            "(MEMORY USAGE)",
            "reconcile --sku",
            "slowest Redis call"
        );
        for s in &report.hold_curve {
            println!(
                "  {:>8} {:>11.0} {:>14} {:>14} {:>22} {:>30}",
                count(s.holds),
                s.write_per_s,
                opt(s.bytes_per_hold, 0),
                opt(s.sampled_bytes_per_hold, 0),
                reconcile_cell(&s.reconcile),
                shorten(
                    &slow_text(&s.slowest_by_reconcile.clone().or(s.slowest.clone())),
                    30
                )
            );
        }
    }
    if let Some(r) = &report.reserve_under_reconcile {
        println!(
            "\n  reserve throughput on {} ({} clients): alone {:.0}/s (p99 {:.1} ms), during reconcile --sku of {} holds {:.0}/s (p99 {:.1} ms): ratio {} ({} reconcile runs)",
            r.sku,
            r.concurrency,
            r.alone.created_per_s,
            r.alone.p99_ms,
            count(r.holds),
            r.with_reconcile.created_per_s,
            r.with_reconcile.p99_ms,
            opt(r.ratio, 2),
            r.with_reconcile.reconcile_runs
        );
    }
    if let Some(e) = &report.ended {
        println!(
            "  ended reservations: {} cancelled, memory delta {} bytes each → {} bytes per ended reservation ({} by MEMORY USAGE of its keys)",
            e.cancelled,
            opt(e.bytes_delta_per_ended, 0),
            opt(e.bytes_per_ended, 0),
            opt(e.sampled_bytes_per_ended, 0)
        );
    }
}

// ---------------------------------------------------------------- files ---

fn write(report: &ScaleReport, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("scale-{}.json", report.run_id));
    let svg_path = dir.join(format!("scale-{}.svg", report.run_id));
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(dir.join("scale-latest.json"), &json)?;
    chart(report, &svg_path).with_context(|| format!("drawing {}", svg_path.display()))?;
    std::fs::copy(&svg_path, dir.join("scale-latest.svg"))?;
    Ok((json_path, svg_path))
}

type Series = (String, RGBColor, Vec<(f64, f64)>);

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const LIGHT_BLUE: RGBColor = RGBColor(140, 180, 225);
const LIGHT_ORANGE: RGBColor = RGBColor(255, 187, 120);
const LIGHT_GREEN: RGBColor = RGBColor(152, 223, 138);
const LIGHT_PURPLE: RGBColor = RGBColor(197, 176, 213);

fn x_range(xs: &[f64]) -> std::ops::Range<f64> {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(1.0, f64::max);
    let lo = if lo.is_finite() { lo } else { 1.0 };
    (lo / 2.0).max(0.5)..hi * 2.0
}

fn count_label(v: &f64) -> String {
    let v = *v;
    let mantissa = v / 10f64.powf(v.log10().floor());
    if (mantissa - 1.0).abs() > 1e-6 {
        return String::new();
    }
    count(v.round() as u64)
}

/// One panel: counts on a log x axis, values on a linear (or log) y axis.
fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .collect();
    let y_max = ys.iter().copied().fold(0.0, f64::max).max(1e-3) * 1.6;
    macro_rules! draw {
        ($chart:expr, $floor:expr) => {{
            let mut c = $chart;
            c.configure_mesh()
                .light_line_style(TRANSPARENT)
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&count_label)
                .draw()?;
            for (label, color, points) in series {
                let color = *color;
                let points: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.1.is_finite())
                    .map(|&(x, y)| (x, y.max($floor)))
                    .collect();
                c.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                c.draw_series(
                    points
                        .iter()
                        .map(move |&p| Circle::new(p, 3, color.filled())),
                )?;
            }
            c.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60);
    if log_y {
        let y_min = ys
            .iter()
            .copied()
            .filter(|y| *y > 0.0)
            .fold(f64::INFINITY, f64::min)
            .min(y_max / 100.0)
            .max(1e-3)
            * 0.5;
        draw!(
            builder
                .build_cartesian_2d(x_range(&xs).log_scale(), (y_min..y_max * 3.0).log_scale())?,
            y_min
        );
    } else {
        draw!(
            builder.build_cartesian_2d(x_range(&xs).log_scale(), 0f64..y_max)?,
            0.0
        );
    }
    Ok(())
}

fn chart(report: &ScaleReport, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut title = format!("flashgate-bench scale {}", report.run_id);
    if let Some(r) = &report.reserve_under_reconcile {
        title += &format!(
            " · reserves/s on a second SKU during reconcile --sku of {} holds: {:.0} vs {:.0} alone ({})",
            count(r.holds),
            r.with_reconcile.created_per_s,
            r.alone.created_per_s,
            opt(r.ratio, 2)
        );
    }
    let root = root.titled(&title, ("sans-serif", 17))?;
    let panels = root.split_evenly((3, 2));
    let skus = &report.sku_curve;
    let sx = |f: &dyn Fn(&SkuStep) -> Option<f64>| -> Vec<(f64, f64)> {
        skus.iter()
            .filter_map(|s| Some((s.skus as f64, f(s)?)))
            .collect()
    };
    if !skus.is_empty() {
        panel(
            &panels[0],
            "Redis commands/s with no load",
            "SKUs defined",
            "commands/s",
            &[
                (
                    "whole server (total_commands_processed)".into(),
                    LIGHT_BLUE,
                    sx(&|s| s.redis_commands_per_s),
                ),
                (
                    "the gateway's db (MONITOR)".into(),
                    BLUE,
                    sx(&|s| s.db_commands_per_s),
                ),
            ],
            false,
        )?;
        panel(
            &panels[1],
            "sweep pass (flashgate_sweep_pass_seconds), ms",
            "SKUs defined",
            "ms",
            &[
                (
                    "max while the step's SKUs were defined".into(),
                    RED,
                    sx(&|s| s.sweep_pass_ms_max_while_defining),
                ),
                (
                    "max of the scrapes".into(),
                    ORANGE,
                    sx(&|s| s.sweep_pass_ms_max),
                ),
                ("last".into(), LIGHT_ORANGE, sx(&|s| s.sweep_pass_ms_last)),
            ],
            true,
        )?;
        panel(
            &panels[2],
            "/readyz and /metrics latency (sequential), ms",
            "SKUs defined",
            "ms",
            &[
                ("/readyz p50".into(), GREEN, sx(&|s| Some(s.readyz.p50_ms))),
                (
                    "/readyz p99".into(),
                    LIGHT_GREEN,
                    sx(&|s| Some(s.readyz.p99_ms)),
                ),
                (
                    "/metrics p50".into(),
                    PURPLE,
                    sx(&|s| Some(s.metrics.p50_ms)),
                ),
                (
                    "/metrics p99".into(),
                    LIGHT_PURPLE,
                    sx(&|s| Some(s.metrics.p99_ms)),
                ),
            ],
            true,
        )?;
        let exits: Vec<String> = skus
            .iter()
            .map(|s| {
                s.reconcile
                    .as_ref()
                    .map_or("-".into(), ReconcileRun::exit_text)
            })
            .collect();
        panel(
            &panels[3],
            &format!(
                "full `flashgate reconcile`, s (exit codes {})",
                exits.join(", ")
            ),
            "SKUs defined",
            "s",
            &[(
                "wall time".into(),
                RED,
                sx(&|s| s.reconcile.as_ref().map(|r| r.seconds)),
            )],
            false,
        )?;
    }
    let holds = &report.hold_curve;
    let hx = |f: &dyn Fn(&HoldStep) -> Option<f64>| -> Vec<(f64, f64)> {
        holds
            .iter()
            .filter_map(|s| Some((s.holds as f64, f(s)?)))
            .collect()
    };
    if !holds.is_empty() {
        let mut memory: Vec<Series> = vec![
            (
                "used_memory delta / holds".into(),
                BLUE,
                hx(&|s| s.bytes_per_hold),
            ),
            (
                "MEMORY USAGE estimate".into(),
                LIGHT_BLUE,
                hx(&|s| s.sampled_bytes_per_hold),
            ),
        ];
        let x = holds.last().map_or(1.0, |s| s.holds as f64);
        if let Some(e) = report.ended.as_ref().and_then(|e| e.bytes_per_ended) {
            memory.push((
                format!("an ended reservation ({e:.0} B)"),
                GREEN,
                vec![(x, e)],
            ));
        }
        if let Some(e) = report
            .ended
            .as_ref()
            .and_then(|e| e.sampled_bytes_per_ended)
        {
            memory.push((
                format!("its keys by MEMORY USAGE ({e:.0} B)"),
                LIGHT_GREEN,
                vec![(x, e)],
            ));
        }
        panel(
            &panels[4],
            "Redis bytes per live hold (one SKU)",
            "live holds",
            "bytes",
            &memory,
            false,
        )?;
        let exits: Vec<String> = holds
            .iter()
            .map(|s| {
                s.reconcile
                    .as_ref()
                    .map_or("-".into(), ReconcileRun::exit_text)
            })
            .collect();
        panel(
            &panels[5],
            &format!(
                "reconcile --sku and its slowest Redis call, ms (exit codes {})",
                exits.join(", ")
            ),
            "live holds",
            "ms",
            &[
                (
                    "reconcile --sku wall time".into(),
                    RED,
                    hx(&|s| s.reconcile.as_ref().map(|r| r.seconds * 1000.0)),
                ),
                (
                    "slowest Redis call (≥ 1 ms, else 1)".into(),
                    PURPLE,
                    hx(&|s| {
                        Some(
                            s.slowest_by_reconcile
                                .as_ref()
                                .or(s.slowest.as_ref())
                                .map_or(1.0, |c| c.micros as f64 / 1000.0),
                        )
                    }),
                ),
            ],
            true,
        )?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 100.0);
        assert_eq!(percentile(&v, 0.99), 198.0);
        assert_eq!(percentile(&v, 1.0), 200.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let l = latency(vec![3.0, 1.0, 2.0], 1);
        assert_eq!((l.requests, l.errors, l.p50_ms, l.max_ms), (4, 1, 2.0, 3.0));
    }

    #[test]
    fn rates_and_ratios() {
        // 1001 commands in 5 s, one of them the harness's first INFO.
        assert_eq!(commands_per_s(10_000, 11_001, 1, 5.0), 200.0);
        assert_eq!(commands_per_s(10, 10, 1, 5.0), 0.0, "never negative");
        assert_eq!(per_item(1_000, 3_000, 4), Some(500.0));
        assert_eq!(per_item(3_000, 1_000, 4), Some(-500.0));
        assert_eq!(per_item(1, 2, 0), None);
        assert_eq!(ratio(200.0, 150.0), Some(0.75));
        assert_eq!(ratio(0.0, 150.0), None);
    }

    #[test]
    fn info_and_metrics_parse() {
        let info = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:12345\r\n";
        assert_eq!(info_u64(info, "total_commands_processed"), Some(12345));
        assert_eq!(info_u64(info, "total_commands"), None);
        let body = "# HELP flashgate_sweep_pass_seconds Duration\n# TYPE flashgate_sweep_pass_seconds gauge\nflashgate_sweep_pass_seconds 0.0125\nflashgate_sweep_pass_seconds_total 9\nflashgate_outbox_backlog{x=\"y\"} 3\n";
        assert_eq!(
            metric_value(body, "flashgate_sweep_pass_seconds"),
            Some(0.0125)
        );
        assert_eq!(metric_value(body, "flashgate_outbox_backlog"), Some(3.0));
        assert_eq!(metric_value(body, "flashgate_missing"), None);
    }

    #[test]
    fn slowlog_picks_the_slowest_and_the_reconciles_own() {
        use redis::Value::{Array, BulkString, Int};
        let entry = |id: i64, micros: i64, cmd: &str, addr: &str| {
            Array(vec![
                Int(id),
                Int(1_700_000_000),
                Int(micros),
                Array(
                    cmd.split(' ')
                        .map(|a| BulkString(a.as_bytes().to_vec()))
                        .collect(),
                ),
                BulkString(addr.as_bytes().to_vec()),
                BulkString(Vec::new()),
            ])
        };
        let reply = Array(vec![
            entry(4, 20000, "SLOWLOG RESET", "127.0.0.1:4000"),
            entry(3, 1500, "EVALSHA abc 1 fg:{s}:meta", "127.0.0.1:5000"),
            entry(2, 9000, "ZRANGE fg:{s}:deadlines 0 -1", "127.0.0.1:6000"),
            entry(1, 4000, "HGETALL fg:{s}:used", "127.0.0.1:6000"),
        ]);
        let known: HashSet<String> =
            ["127.0.0.1:4000".to_string(), "127.0.0.1:5000".to_string()].into();
        let harness: HashSet<String> = ["127.0.0.1:4000".to_string()].into();
        let (n, worst, own) = slowest_calls(&reply, &known, &harness);
        assert_eq!(n, 3);
        let worst = worst.unwrap();
        assert_eq!(worst.micros, 9000);
        assert!(worst.by_reconcile);
        assert_eq!(worst.command, "ZRANGE fg:{s}:deadlines 0 -1");
        assert_eq!(own.unwrap().micros, 9000);
        let (n, worst, own) = slowest_calls(&Array(vec![]), &known, &harness);
        assert_eq!((n, worst.is_none(), own.is_none()), (0, true, true));
        let addrs = client_addresses(
            "id=3 addr=127.0.0.1:5000 laddr=127.0.0.1:6390 fd=8 name=\nid=4 addr=127.0.0.1:5001 fd=9\n",
        );
        assert!(addrs.contains("127.0.0.1:5000") && addrs.contains("127.0.0.1:5001"));
    }

    #[test]
    fn outbox_groups_parse() {
        use redis::Value::{BulkString, Int, Nil};
        let b = |s: &str| BulkString(s.as_bytes().to_vec());
        let groups = vec![vec![
            b("name"),
            b("flush"),
            b("consumers"),
            Int(1),
            b("pending"),
            Int(3),
            b("last-delivered-id"),
            b("1-0"),
            b("entries-read"),
            Int(10),
            b("lag"),
            Int(4),
        ]];
        assert_eq!(unacknowledged(&groups, "flush"), Some(7));
        assert_eq!(unacknowledged(&groups, "other"), None);
        let mut unknown_lag = groups.clone();
        unknown_lag[0][11] = Nil;
        assert_eq!(unacknowledged(&unknown_lag, "flush"), None);
    }

    #[test]
    fn monitor_lines_parse() {
        assert_eq!(
            monitor_line("+1701481234.123456 [0 127.0.0.1:54321] \"EVALSHA\" \"abc\" \"2\"\r\n"),
            Some(("0", "127.0.0.1:54321", "evalsha".to_string()))
        );
        assert_eq!(
            monitor_line("+1701481234.123457 [1 lua] \"hget\" \"fg:{s}:meta\" \"held\"\r\n"),
            Some(("1", "lua", "hget".to_string()))
        );
        assert_eq!(
            monitor_line("+1701481234.1 [0 unix:/tmp/redis.sock] \"ping\"\n"),
            Some(("0", "unix:/tmp/redis.sock", "ping".to_string()))
        );
        assert_eq!(monitor_line("+OK\r\n"), None);
    }

    #[test]
    fn counts_print_short() {
        assert_eq!(count(100), "100");
        assert_eq!(count(10_000), "10k");
        assert_eq!(count(1_000_000), "1M");
        assert_eq!(count(2_500), "2500");
        assert_eq!(count_label(&100_000.0), "100k");
        assert_eq!(count_label(&300.0), "");
    }
}
