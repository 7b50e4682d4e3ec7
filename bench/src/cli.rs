//! Flags (every one also reads an environment variable) and their validation.
//! Parsing only: nothing here connects to anything.

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// Where results go unless --output-dir says otherwise: `bench/results/` of this
/// checkout, whatever the working directory (it is gitignored).
const DEFAULT_OUTPUT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results");

#[derive(Debug, Clone, Parser)]
#[command(
    name = "flashgate-bench",
    version,
    about = "Flash-sale load test for a running flashgate gateway, with validation and baselines",
    long_about = "Drives a running flashgate gateway over HTTP with a flash sale (many users, a \
burst on a few SKUs, pay / cancel / abandon / retry / duplicate webhooks), then validates the \
result against the API and MySQL, and measures the same reserve path straight against MariaDB \
(--baseline mysql) and straight against Redis with redis-benchmark (--baseline redis).\n\n\
Exit status: 0 everything held, 1 a validation check failed (or a target was missed with \
--enforce-targets), 2 the run could not be done."
)]
pub struct Args {
    /// Gateway base URL (plain http).
    #[arg(
        long,
        env = "FLASHGATE_BENCH_BASE_URL",
        global = true,
        default_value = "http://127.0.0.1:8080"
    )]
    pub base_url: String,

    /// HS256 secret the gateway verifies user JWTs with.
    #[arg(long, env = "FLASHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,

    /// Service token: SKU setup, payment webhooks, validation reads.
    #[arg(long, env = "FLASHGATE_SERVICE_TOKEN", hide_env_values = true)]
    pub service_token: String,

    /// The gateway's Redis (command statistics, redis-benchmark baseline): a redis://
    /// URL, or with --redis-cluster a comma-separated list of cluster nodes, as the
    /// gateway takes it.
    #[arg(
        long,
        env = "FLASHGATE_REDIS_URL",
        global = true,
        default_value = "redis://127.0.0.1:6390"
    )]
    pub redis_url: String,

    /// The gateway runs on a Redis Cluster (FLASHGATE_REDIS_CLUSTER=1, as for the
    /// gateway): statistics are read from every primary (found with CLUSTER NODES on
    /// the first --redis-url node that answers) and summed; each phase also reports
    /// every primary's share. No redis-benchmark baseline.
    #[arg(long, env = "FLASHGATE_REDIS_CLUSTER", global = true, default_value = "0",
          num_args = 0..=1, require_equals = true, default_missing_value = "1",
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub redis_cluster: bool,

    /// The gateway's MySQL/MariaDB (validation; the MySQL baseline creates bench_* tables there).
    #[arg(
        long,
        env = "FLASHGATE_DATABASE_URL",
        global = true,
        default_value = "mysql://root@127.0.0.1:3316/flashgate",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Closed loop: this many clients, each sending its next request when the last answered.
    /// Also the concurrency of the MySQL baseline and of redis-benchmark.
    #[arg(
        short = 'c',
        long,
        env = "FLASHGATE_BENCH_CONCURRENCY",
        global = true,
        default_value_t = 256
    )]
    pub concurrency: usize,

    /// Open loop: start this many user flows per second whatever the answers (each flow
    /// starts with a reserve); latencies count from the intended send time, so a stalled
    /// gateway shows up in them (no coordinated omission). Omit for closed loop.
    #[arg(long, env = "FLASHGATE_BENCH_RATE")]
    pub rate: Option<f64>,

    /// Open loop: most flows in flight at once; past it new flows wait (and their
    /// latency, counted from the intended time, grows).
    #[arg(long, env = "FLASHGATE_BENCH_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// Length of the reserve and mixed phases and of the MySQL baseline (e.g. 15s, 2m).
    #[arg(long, env = "FLASHGATE_BENCH_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Length of the sold-out phase.
    #[arg(long, env = "FLASHGATE_BENCH_SOLDOUT_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub soldout_duration: Duration,

    /// Unrecorded load before the first phase (warms connections, allocator and caches).
    #[arg(long, env = "FLASHGATE_BENCH_WARMUP", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Phases to run, in this order: reserve (pure reserves on a SKU with huge stock),
    /// soldout (reserves on a sold-out SKU, with a reopen check), ceiling (GET /healthz:
    /// what this machine and this client can do over HTTP at all, for --soldout-duration),
    /// mixed (the flash sale); and, not by default, abuse (honest users alone, then next
    /// to one abusive user; 2 x --duration) and overload (an open loop at twice the
    /// sustainable reserve rate; --overload-probe + 2 x --duration).
    #[arg(
        long,
        env = "FLASHGATE_BENCH_PHASES",
        value_delimiter = ',',
        default_value = "reserve,soldout,ceiling,mixed"
    )]
    pub phases: Vec<PhaseName>,

    /// Baselines in the same run: mysql, redis (redis-benchmark EVALSHA), all, none.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_BASELINE",
        value_delimiter = ',',
        default_value = "all"
    )]
    pub baseline: Vec<BaselineName>,

    /// Stock buckets of every SKU the run defines (the admin PUT's `buckets`, 1..=16):
    /// above 1 each SKU's stock is split over that many hash slots (on a cluster, over
    /// that many primaries).
    #[arg(long, env = "FLASHGATE_BENCH_BUCKETS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub buckets: u32,

    /// Mixed phase: number of SKUs on sale at once (the burst is spread evenly).
    #[arg(long, env = "FLASHGATE_BENCH_SKUS", default_value_t = 2)]
    pub skus: usize,

    /// Mixed phase: stock of each SKU.
    #[arg(long, env = "FLASHGATE_BENCH_STOCK", default_value_t = 2000)]
    pub stock: u64,

    /// Mixed phase: hold duration of each SKU; abandoned holds expire after it, and the
    /// validation waits for that.
    #[arg(long, env = "FLASHGATE_BENCH_HOLD_SECONDS", default_value_t = 5)]
    pub hold_seconds: u64,

    /// Mixed phase: units per reservation.
    #[arg(long, env = "FLASHGATE_BENCH_QUANTITY", default_value_t = 1)]
    pub quantity: u64,

    /// Sold-out phase: stock of its SKU (gone in the first milliseconds).
    #[arg(long, env = "FLASHGATE_BENCH_SOLDOUT_STOCK", default_value_t = 100)]
    pub soldout_stock: u64,

    /// Sold-out phase: its reserves come from this many users taken in turn, each with
    /// one token for the run, as an outside probe's users send again and again (the
    /// gateway then answers their tokens from its verified-token cache); a user who
    /// holds a unit may be told `limit_exceeded`. 0: a fresh user and token per reserve.
    #[arg(long, env = "FLASHGATE_BENCH_SOLDOUT_USERS", default_value_t = 0)]
    pub soldout_users: u64,

    /// Sold-out phase: holds cancelled half-way; each unit must be sold again within 1 s.
    #[arg(long, env = "FLASHGATE_BENCH_REOPEN_UNITS", default_value_t = 10)]
    pub reopen_units: u64,

    /// Mixed phase, share of holds that are paid (payment webhook → confirm).
    #[arg(long, env = "FLASHGATE_BENCH_PAY", default_value_t = 0.6)]
    pub pay: f64,

    /// Mixed phase, share of holds the user cancels.
    #[arg(long, env = "FLASHGATE_BENCH_CANCEL", default_value_t = 0.2)]
    pub cancel: f64,

    /// Mixed phase, share of holds abandoned to expire (pay + cancel + abandon = 1).
    #[arg(long, env = "FLASHGATE_BENCH_ABANDON", default_value_t = 0.2)]
    pub abandon: f64,

    /// Share of reserves sent again with the same Idempotency-Key: after a 201 it must
    /// replay (201, Idempotent-Replayed, same reservation); after a sold_out it may
    /// succeed (a refusal records nothing) or be refused again.
    #[arg(long, env = "FLASHGATE_BENCH_RETRY_RATIO", default_value_t = 0.1)]
    pub retry_ratio: f64,

    /// Share of paid holds whose webhook is delivered twice with the same payment_ref
    /// (→ 200 again) and once more with another payment_ref (→ 409 refund_required).
    #[arg(long, env = "FLASHGATE_BENCH_DUP_WEBHOOK_RATIO", default_value_t = 0.2)]
    pub dup_webhook_ratio: f64,

    /// Share of paid holds that go through payment-pending before confirm.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_PAYMENT_PENDING_RATIO",
        default_value_t = 0.3
    )]
    pub payment_pending_ratio: f64,

    /// Share of cancelled (at once) and abandoned (at validation) holds that are paid
    /// anyway, late: → 409 reservation_cancelled / reservation_expired, refund_required.
    #[arg(long, env = "FLASHGATE_BENCH_LATE_PAY_RATIO", default_value_t = 0.3)]
    pub late_pay_ratio: f64,

    /// Abuse phase: honest reserves per second (open loop), spread evenly over
    /// --abuse-users users taken in turn.
    #[arg(long, env = "FLASHGATE_BENCH_ABUSE_RATE", default_value_t = 2000.0)]
    pub abuse_rate: f64,

    /// Abuse phase: honest users; each sends --abuse-rate / --abuse-users reserves per
    /// second, which must stay within the gateway's FLASHGATE_RATE_PER_USER (5 by default).
    #[arg(long, env = "FLASHGATE_BENCH_ABUSE_USERS", default_value_t = 1000)]
    pub abuse_users: usize,

    /// Abuse phase: connections of the one abusive user, each sending its next reserve
    /// as soon as the last is answered.
    #[arg(long, env = "FLASHGATE_BENCH_ABUSER_CONNECTIONS", default_value_t = 64)]
    pub abuser_connections: usize,

    /// Overload phase: the sustainable reserve rate X (201 answers per second); the
    /// phase runs open loops at 0.8 X and 2 X. Measured by a closed-loop probe (-c
    /// clients, --overload-probe) when omitted.
    #[arg(long, env = "FLASHGATE_BENCH_SUSTAINABLE_RATE")]
    pub sustainable_rate: Option<f64>,

    /// Overload phase: length of the closed-loop probe that measures the sustainable rate.
    #[arg(long, env = "FLASHGATE_BENCH_OVERLOAD_PROBE", default_value = "5s", value_parser = parse_duration)]
    pub overload_probe: Duration,

    /// Queue phase: joins per second (open loop, each by a fresh user) of the sale's
    /// waiting room, until --queue-users have joined.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_QUEUE_JOIN_RATE",
        default_value_t = 10_000.0
    )]
    pub queue_join_rate: f64,

    /// Queue phase: users who join the sale's waiting room.
    #[arg(long, env = "FLASHGATE_BENCH_QUEUE_USERS", default_value_t = 50_000)]
    pub queue_users: u64,

    /// Queue phase: units of the sale (it must sell out).
    #[arg(long, env = "FLASHGATE_BENCH_QUEUE_STOCK", default_value_t = 1000)]
    pub queue_stock: u64,

    /// Queue phase: the waiting room's admission_seconds: an admission unused this long
    /// lapses and goes to the next user. Short keeps the run short, but the gateway tells
    /// waiting users to poll at least every admission_seconds / 2: 50,000 users with 10 s
    /// poll 10,000 times a second.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_QUEUE_ADMISSION_SECONDS",
        default_value_t = 10
    )]
    pub queue_admission_seconds: u32,

    /// Queue phase: share of admitted users who walk away (never reserve; their
    /// admissions lapse).
    #[arg(long, env = "FLASHGATE_BENCH_QUEUE_WALK_AWAY", default_value_t = 0.5)]
    pub queue_walk_away: f64,

    /// Queue phase: the sale must sell out within this long after its first join.
    #[arg(long, env = "FLASHGATE_BENCH_QUEUE_TIMEOUT", default_value = "240s", value_parser = parse_duration)]
    pub queue_timeout: Duration,

    /// Queue phase: open Server-Sent Event streams (`GET /v1/skus/{sku}/queue/stream`)
    /// of waiting users on a second sale, which must all be told `sold_out` within 1 s
    /// of its last sale; the gateway's RSS before and after opening them. 0: none.
    #[arg(long, env = "FLASHGATE_BENCH_QUEUE_STREAMS", default_value_t = 5000)]
    pub queue_streams: usize,

    /// Seed of every random choice (printed; random by default).
    #[arg(long, env = "FLASHGATE_BENCH_SEED", global = true)]
    pub seed: Option<u64>,

    /// Prefix of the SKU ids this run creates (each run adds a unique suffix).
    #[arg(long, env = "FLASHGATE_BENCH_SKU_PREFIX", default_value = "bench")]
    pub sku_prefix: String,

    /// Gateway process to read RSS and CPU from; found by the listening port when omitted.
    #[arg(long, env = "FLASHGATE_BENCH_GATEWAY_PID", global = true)]
    pub gateway_pid: Option<u32>,

    /// redis-benchmark binary.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_REDIS_BENCHMARK",
        default_value = "redis-benchmark"
    )]
    pub redis_benchmark: String,

    /// Requests redis-benchmark sends (per path: success and sold-out).
    #[arg(
        long,
        env = "FLASHGATE_BENCH_REDIS_BENCHMARK_REQUESTS",
        default_value_t = 200_000
    )]
    pub redis_benchmark_requests: u64,

    /// Per-request timeout; a timed-out request counts as an error.
    #[arg(long, env = "FLASHGATE_BENCH_TIMEOUT", global = true, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// How long the validation waits for the outbox to drain to MySQL.
    #[arg(long, env = "FLASHGATE_BENCH_FLUSH_TIMEOUT", global = true, default_value = "60s", value_parser = parse_duration)]
    pub flush_timeout: Duration,

    /// The gateway's sweep interval (ms): expired holds must be back in `available`
    /// within it after their deadline (checked with 0.5 s of slack).
    #[arg(long, env = "FLASHGATE_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,

    /// Reservations read back one by one through the API at validation.
    #[arg(long, env = "FLASHGATE_BENCH_VALIDATE_SAMPLE", default_value_t = 2000)]
    pub validate_sample: usize,

    /// Threads of the load generator (it shares the machine with the gateway and Redis).
    #[arg(
        long,
        env = "FLASHGATE_BENCH_THREADS",
        global = true,
        default_value_t = 1
    )]
    pub threads: usize,

    /// Where the JSON report and the SVG chart go.
    #[arg(long, env = "FLASHGATE_BENCH_OUTPUT_DIR", global = true, default_value = DEFAULT_OUTPUT_DIR)]
    pub output_dir: PathBuf,

    /// Exit 1 when a performance target is missed (not only on a failed validation).
    #[arg(long, env = "FLASHGATE_BENCH_ENFORCE_TARGETS")]
    pub enforce_targets: bool,

    /// No progress bars.
    #[arg(long, env = "FLASHGATE_BENCH_NO_PROGRESS", global = true)]
    pub no_progress: bool,

    /// At the end of the run, end every sale it defined (a PUT with `ends_at` now), take
    /// its SKUs out of the gateway's index and delete their Redis keys (their MySQL rows
    /// stay, ended): nothing of the run is left for a worker to sweep or rebuild
    /// (`compare` runs each of its runs so).
    #[arg(long, env = "FLASHGATE_BENCH_END_SALES")]
    pub end_sales: bool,

    /// Run a webhook receiver on loopback, register it for the run (every event type)
    /// and, after the validation, report how its deliveries kept up with the mixed
    /// phase: arrivals, duplicates, gaps per SKU, lag from each fact (src/webhook.rs).
    #[arg(long, env = "FLASHGATE_BENCH_WEBHOOKS")]
    pub webhooks: bool,

    /// Without a subcommand: the load run (phases, validation, baselines).
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Cost curves: what the gateway's background work, health endpoints and
    /// reconciliation cost as the number of SKUs and of live holds grows. Defines its
    /// own SKUs (scale-<run id>-...), writes holds straight into Redis with the gateway's
    /// reserve script, runs `flashgate reconcile` as a subprocess, deletes the SKUs' Redis
    /// keys at the end. Prints tables, writes scale-<run id>.json and .svg.
    Scale(ScaleArgs),
    /// The regression gate: runs two gateway binaries alternately (ABBA over
    /// --rounds) against the same Redis and MySQL, the same load run against each
    /// (every default of the gateway on), and prints each figure's median per
    /// build and the new/old ratio per round. Writes compare-<time>/compare.json.
    Compare(CompareArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// The build to compare against (e.g. the last release's target/release/flashgate).
    #[arg(long)]
    pub old: PathBuf,

    /// The build under test (e.g. this checkout's target/release/flashgate).
    #[arg(long, default_value = DEFAULT_FLASHGATE_BIN)]
    pub new: PathBuf,

    /// Rounds; each runs both builds, the first of the two alternating.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,

    /// Phases of each run (the load run's --phases).
    #[arg(long, value_delimiter = ',', default_value = "reserve,soldout,ceiling")]
    pub compare_phases: Vec<PhaseName>,

    /// Length of each run's reserve phase, and of its soldout and ceiling phases.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub compare_duration: Duration,

    /// Also run redis-benchmark of the reserve script in every run (the raw ceiling).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub compare_redis_ceiling: bool,

    /// More flags for each run, after `--` (e.g. `-- --concurrency 128`).
    #[arg(last = true)]
    pub run_args: Vec<String>,
}

impl CompareArgs {
    /// The flags of each child load run (besides --base-url and --output-dir).
    pub fn child_args(&self) -> Vec<String> {
        let phases: Vec<String> = self
            .compare_phases
            .iter()
            .map(|p| {
                clap::ValueEnum::to_possible_value(p)
                    .map_or_else(String::new, |v| v.get_name().to_string())
            })
            .collect();
        let duration = format!("{}ms", self.compare_duration.as_millis());
        let mut args = vec![
            "--phases".to_string(),
            phases.join(","),
            "--baseline".to_string(),
            if self.compare_redis_ceiling {
                "redis"
            } else {
                "none"
            }
            .to_string(),
            "--duration".to_string(),
            duration.clone(),
            "--soldout-duration".to_string(),
            duration,
        ];
        args.extend(self.run_args.iter().cloned());
        args
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalePart {
    /// The SKU-count curve.
    Skus,
    /// The hold-count curve on one SKU.
    Holds,
}

/// Where `flashgate` is unless --flashgate-bin says otherwise: this checkout's release build.
const DEFAULT_FLASHGATE_BIN: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/flashgate");

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Which curves: skus, holds.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_SCALE_PARTS",
        value_delimiter = ',',
        default_value = "skus,holds"
    )]
    pub scale_parts: Vec<ScalePart>,

    /// SKU-count curve: total SKUs at each step, increasing (each step defines the
    /// difference through the admin API). `k` and `m` suffixes allowed (100k).
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_SKUS", value_delimiter = ',',
          default_value = "100,10000,100000", value_parser = parse_count)]
    pub scale_skus: Vec<u64>,

    /// SKU-count curve: how many of them stay on sale (no ends_at; the first defined);
    /// every other one's sale ends --scale-ends-after after its definition.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_ON_SALE", default_value_t = 100)]
    pub scale_on_sale: u64,

    /// SKU-count curve: a SKU that does not stay on sale ends this long after it was defined.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_ENDS_AFTER", default_value = "5s", value_parser = parse_duration)]
    pub scale_ends_after: Duration,

    /// SKU-count curve: wait this long after the last sale ended before measuring.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_SETTLE", default_value = "5s", value_parser = parse_duration)]
    pub scale_settle: Duration,

    /// SKU-count curve: then wait up to this long more, until the ended SKUs have left
    /// the gateway's index (it retires them at its next planned visit), before
    /// measuring; 0: measure at once, retired or not.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_RETIRE_WAIT", default_value = "90s", value_parser = parse_duration)]
    pub scale_retire_wait: Duration,

    /// Admin PUTs in flight while defining SKUs.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_SCALE_DEFINE_CONCURRENCY",
        default_value_t = 64
    )]
    pub scale_define_concurrency: usize,

    /// SKU-count curve: the idle window over which Redis commands per second are counted.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_WINDOW", default_value = "5s", value_parser = parse_duration)]
    pub scale_window: Duration,

    /// SKU-count curve: sequential GET /readyz per step.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_SCALE_READYZ_REQUESTS",
        default_value_t = 200
    )]
    pub scale_readyz_requests: usize,

    /// SKU-count curve: sequential GET /metrics per step.
    #[arg(
        long,
        env = "FLASHGATE_BENCH_SCALE_METRICS_REQUESTS",
        default_value_t = 100
    )]
    pub scale_metrics_requests: usize,

    /// SKU-count curve: scrapes of flashgate_sweep_pass_seconds per step, a second apart.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_SWEEP_SAMPLES", default_value_t = 5)]
    pub scale_sweep_samples: usize,

    /// Hold-count curve: live holds on one SKU at each step, increasing (each step
    /// writes the difference). `k` and `m` suffixes allowed (1m).
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_HOLDS", value_delimiter = ',',
          default_value = "1000,100000,1000000", value_parser = parse_count)]
    pub scale_holds: Vec<u64>,

    /// Hold-count curve: reserve script calls per Redis pipeline while writing holds.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_PIPELINE", default_value_t = 1000)]
    pub scale_pipeline: usize,

    /// Hold-count curve: holds cancelled over HTTP at the end (bytes per ended
    /// reservation); at most the last --scale-holds step.
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_CANCEL", default_value = "10000", value_parser = parse_count)]
    pub scale_cancel: u64,

    /// Hold-count curve: length of each reserve-throughput window on the second SKU
    /// (alone, then while `flashgate reconcile --sku` runs on the SKU with the most holds).
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_LOAD_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub scale_load_duration: Duration,

    /// The gateway binary, for `flashgate reconcile` (gets the harness's Redis and MySQL
    /// URLs and secrets in its environment).
    #[arg(long, env = "FLASHGATE_BENCH_FLASHGATE_BIN", default_value = DEFAULT_FLASHGATE_BIN)]
    pub flashgate_bin: PathBuf,

    /// A `flashgate reconcile` running longer than this is killed (and reported so).
    #[arg(long, env = "FLASHGATE_BENCH_SCALE_RECONCILE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub scale_reconcile_timeout: Duration,

    /// Only clean up after an earlier run (its id, as printed): end its sales still
    /// open (admin API), take its SKUs out of the gateway's index, delete their keys.
    #[arg(long, value_name = "RUN_ID")]
    pub scale_cleanup: Option<String>,

    /// Only redraw the SVG of a scale report written before (its JSON), next to it.
    #[arg(long, value_name = "JSON")]
    pub scale_replot: Option<PathBuf>,

    /// Where the gateway serves /metrics, when not on --base-url
    /// (FLASHGATE_METRICS_LISTEN), e.g. http://127.0.0.1:9100/metrics.
    #[arg(long, env = "FLASHGATE_BENCH_METRICS_URL")]
    pub metrics_url: Option<String>,
}

impl ScaleArgs {
    /// Holds cancelled at the end: --scale-cancel, at most the holds written.
    pub fn cancels(&self) -> u64 {
        self.scale_cancel
            .min(self.scale_holds.last().copied().unwrap_or(0))
    }

    pub fn wants(&self, part: ScalePart) -> bool {
        self.scale_parts.contains(&part)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.scale_parts.is_empty(), "--scale-parts names nothing");
        check_steps("--scale-skus", &self.scale_skus, 1_000_000)?;
        check_steps("--scale-holds", &self.scale_holds, 10_000_000)?;
        ensure!(
            (1..=1024).contains(&self.scale_define_concurrency),
            "--scale-define-concurrency must be within 1..=1024"
        );
        ensure!(
            (1..=100_000).contains(&self.scale_pipeline),
            "--scale-pipeline must be within 1..=100000"
        );
        ensure!(
            self.scale_window >= Duration::from_millis(500),
            "--scale-window must be at least 500ms"
        );
        ensure!(
            self.scale_ends_after >= Duration::from_secs(1),
            "--scale-ends-after must be at least 1s (the admin PUT must land before the end)"
        );
        ensure!(
            self.scale_readyz_requests >= 1 && self.scale_metrics_requests >= 1,
            "--scale-readyz-requests and --scale-metrics-requests must be at least 1"
        );
        ensure!(
            !self.scale_load_duration.is_zero(),
            "--scale-load-duration must be positive"
        );
        if let Some(id) = &self.scale_cleanup {
            ensure!(
                (1..=24).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "--scale-cleanup takes a run id as printed (lowercase letters and digits)"
            );
        }
        if let Some(url) = &self.metrics_url {
            ensure!(
                url.starts_with("http://"),
                "--metrics-url must be an http:// URL"
            );
        }
        Ok(())
    }
}

/// Steps of a curve: non-empty, each at least 1, strictly increasing, at most `max`.
fn check_steps(flag: &str, steps: &[u64], max: u64) -> Result<()> {
    ensure!(!steps.is_empty(), "{flag} names no step");
    ensure!(steps[0] >= 1, "{flag}: steps must be at least 1");
    ensure!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "{flag}: steps must increase ({steps:?}): each step adds to the last"
    );
    ensure!(
        steps.last().is_some_and(|&last| last <= max),
        "{flag}: at most {max}"
    );
    Ok(())
}

/// `100`, `10_000`, `100k`, `1m`, `1M`.
pub fn parse_count(raw: &str) -> Result<u64> {
    let raw = raw.trim().replace('_', "");
    let (number, factor) = match raw.char_indices().last() {
        Some((i, 'k' | 'K')) => (&raw[..i], 1_000),
        Some((i, 'm' | 'M')) => (&raw[..i], 1_000_000),
        _ => (raw.as_str(), 1),
    };
    let value: u64 = number
        .parse()
        .with_context(|| format!("not a count: {raw:?} (try 100, 10000, 100k, 1m)"))?;
    value
        .checked_mul(factor)
        .with_context(|| format!("count too large: {raw:?}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseName {
    Reserve,
    Soldout,
    Ceiling,
    Mixed,
    /// Honest users alone, then next to one abusive user (issue 11).
    Abuse,
    /// An open loop at twice the sustainable reserve rate, against one at 0.8 times it.
    Overload,
    /// The waiting room: joins at a rate, a sale to queued users (half the admitted
    /// walk away), open streams told `sold_out` (src/queue.rs).
    Queue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BaselineName {
    Mysql,
    Redis,
    All,
    None,
}

/// The gateway's address, split out of --base-url.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`, for the Host header and for connecting.
    pub authority: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub prefix: String,
}

impl Args {
    /// Checks everything that can be checked without connecting.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=20_000).contains(&self.concurrency),
            "--concurrency must be within 1..=20000"
        );
        if let Some(rate) = self.rate {
            ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0,
                "--rate must be within (0, 1000000] flows per second"
            );
        }
        ensure!(
            self.max_in_flight >= 1,
            "--max-in-flight must be at least 1"
        );
        ensure!(!self.duration.is_zero(), "--duration must be positive");
        ensure!(
            !self.soldout_duration.is_zero(),
            "--soldout-duration must be positive"
        );
        ensure!(!self.phases.is_empty(), "--phases names no phase");
        let unique: BTreeSet<_> = self.phases.iter().collect();
        ensure!(
            unique.len() == self.phases.len(),
            "--phases repeats a phase"
        );
        ensure!(
            (1..=100).contains(&self.skus),
            "--skus must be within 1..=100"
        );
        ensure!(
            (1..=1_000_000_000_000).contains(&self.stock),
            "--stock must be within 1..=10^12"
        );
        ensure!(
            (1..=86_400).contains(&self.hold_seconds),
            "--hold-seconds must be within 1..=86400"
        );
        ensure!(
            (1..=1000).contains(&self.quantity),
            "--quantity must be within 1..=1000"
        );
        ensure!(
            (1..=1_000_000).contains(&self.soldout_stock),
            "--soldout-stock must be within 1..=1000000"
        );
        ensure!(
            self.reopen_units <= self.soldout_stock,
            "--reopen-units cannot exceed --soldout-stock"
        );
        for (name, value) in [
            ("--pay", self.pay),
            ("--cancel", self.cancel),
            ("--abandon", self.abandon),
            ("--retry-ratio", self.retry_ratio),
            ("--dup-webhook-ratio", self.dup_webhook_ratio),
            ("--payment-pending-ratio", self.payment_pending_ratio),
            ("--late-pay-ratio", self.late_pay_ratio),
        ] {
            ensure!(
                value.is_finite() && (0.0..=1.0).contains(&value),
                "{name} must be within 0..=1"
            );
        }
        let sum = self.pay + self.cancel + self.abandon;
        ensure!(
            (sum - 1.0).abs() < 1e-6,
            "--pay + --cancel + --abandon must add up to 1 (they add up to {sum})"
        );
        ensure!(
            !self.sku_prefix.is_empty()
                && self.sku_prefix.len() <= 24
                && self
                    .sku_prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "--sku-prefix must be 1..=24 characters of [A-Za-z0-9_-]"
        );
        // The gateway refuses to serve with shorter or equal secrets (flashgate's
        // config::check_secrets); say so here rather than with 401s mid-run.
        ensure!(
            self.jwt_secret.len() >= 32,
            "--jwt-secret / FLASHGATE_JWT_SECRET is missing or shorter than 32 bytes"
        );
        ensure!(
            self.service_token.len() >= 32,
            "--service-token / FLASHGATE_SERVICE_TOKEN is missing or shorter than 32 bytes"
        );
        ensure!(
            self.jwt_secret != self.service_token,
            "--jwt-secret and --service-token must differ"
        );
        ensure!(
            (1..=10_000_000).contains(&self.redis_benchmark_requests),
            "--redis-benchmark-requests must be within 1..=10000000"
        );
        ensure!(!self.timeout.is_zero(), "--timeout must be positive");
        ensure!(
            (1..=64).contains(&self.threads),
            "--threads must be within 1..=64"
        );
        if self.redis_cluster {
            let urls = self.redis_urls();
            ensure!(
                !urls.is_empty() && urls.iter().all(|u| u.starts_with("redis://")),
                "--redis-url must be a comma-separated list of redis:// URLs of cluster nodes"
            );
        } else {
            ensure!(
                !self.redis_url.contains(','),
                "--redis-url lists several nodes: add --redis-cluster (FLASHGATE_REDIS_CLUSTER=1)"
            );
            ensure!(
                self.redis_url.starts_with("redis://"),
                "--redis-url must be a redis:// URL (single node)"
            );
        }
        ensure!(
            self.abuse_rate.is_finite() && self.abuse_rate > 0.0 && self.abuse_rate <= 1_000_000.0,
            "--abuse-rate must be within (0, 1000000] reserves per second"
        );
        ensure!(
            (1..=1_000_000).contains(&self.abuse_users),
            "--abuse-users must be within 1..=1000000"
        );
        ensure!(
            (1..=4096).contains(&self.abuser_connections),
            "--abuser-connections must be within 1..=4096"
        );
        if let Some(rate) = self.sustainable_rate {
            ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0,
                "--sustainable-rate must be within (0, 1000000] reserves per second"
            );
        }
        ensure!(
            !self.overload_probe.is_zero(),
            "--overload-probe must be positive"
        );
        ensure!(
            self.queue_join_rate.is_finite()
                && self.queue_join_rate > 0.0
                && self.queue_join_rate <= 1_000_000.0,
            "--queue-join-rate must be within (0, 1000000] joins per second"
        );
        ensure!(
            (1..=10_000_000).contains(&self.queue_users),
            "--queue-users must be within 1..=10000000"
        );
        ensure!(
            (1..=self.queue_users).contains(&self.queue_stock),
            "--queue-stock must be within 1..=--queue-users"
        );
        ensure!(
            (1..=86_400).contains(&self.queue_admission_seconds),
            "--queue-admission-seconds must be within 1..=86400"
        );
        ensure!(
            self.queue_walk_away.is_finite() && (0.0..1.0).contains(&self.queue_walk_away),
            "--queue-walk-away must be within 0..1 (at 1 nobody would ever buy)"
        );
        ensure!(
            !self.queue_timeout.is_zero(),
            "--queue-timeout must be positive"
        );
        ensure!(
            self.queue_streams <= 100_000,
            "--queue-streams must be at most 100000"
        );
        ensure!(
            self.database_url.starts_with("mysql://")
                || self.database_url.starts_with("mariadb://"),
            "--database-url must be a mysql:// URL"
        );
        self.target()?;
        Ok(())
    }

    pub fn target(&self) -> Result<Target> {
        let rest = self
            .base_url
            .strip_prefix("http://")
            .context("--base-url must start with http:// (the harness speaks plain HTTP/1.1)")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        ensure!(!authority.is_empty(), "--base-url has no host");
        let port = match authority.rsplit_once(':') {
            Some((_, port)) if !authority.ends_with(']') => port
                .parse::<u16>()
                .with_context(|| format!("--base-url has a bad port: {port:?}"))?,
            _ => 80,
        };
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:{port}")
        };
        Ok(Target {
            authority,
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    pub fn wants_baseline(&self, which: BaselineName) -> bool {
        if self.baseline.contains(&BaselineName::None) {
            return false;
        }
        self.baseline.contains(&BaselineName::All) || self.baseline.contains(&which)
    }

    /// The nodes --redis-url names (one, or a cluster's).
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// How the load phases start their flows: --rate (open loop) or -c (closed loop).
    pub fn pace(&self) -> Pace {
        match self.rate {
            Some(rate) => Pace::Open {
                rate,
                max_in_flight: self.max_in_flight,
            },
            None => Pace::Closed {
                clients: self.concurrency,
            },
        }
    }

    pub fn mode(&self) -> String {
        self.pace().describe()
    }
}

/// How a load starts its flows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// This many clients, each starting its next flow when its last one ended.
    Closed { clients: usize },
    /// `rate` flows per second whatever the answers, at most `max_in_flight` at once;
    /// latency counts from each flow's intended start.
    Open { rate: f64, max_in_flight: usize },
}

impl Pace {
    pub fn describe(&self) -> String {
        match self {
            Pace::Open {
                rate,
                max_in_flight,
            } => format!("open loop at {rate} flows/s (max {max_in_flight} in flight)"),
            Pace::Closed { clients } => format!("closed loop, {clients} clients"),
        }
    }
}

/// `250ms`, `15s`, `2m`, `1h`, or a bare number of seconds (fractions allowed).
pub fn parse_duration(raw: &str) -> Result<Duration> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("not a duration: {raw:?} (try 500ms, 15s, 2m)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => bail!("unknown duration unit {other:?} in {raw:?} (ms, s, m, h)"),
    };
    ensure!(
        seconds.is_finite() && (0.0..=86_400.0).contains(&seconds),
        "duration out of range: {raw:?}"
    );
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "flashgate-bench",
            "--jwt-secret",
            "bench-jwt-secret-0123456789abcdef",
            "--service-token",
            "bench-service-token-0123456789abcdef",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    fn args(extra: &[&str]) -> Args {
        try_args(extra).unwrap()
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let a = args(&[]);
        a.validate().unwrap();
        let t = a.target().unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.port, 8080);
        assert!(a.wants_baseline(BaselineName::Mysql));
        assert!(a.wants_baseline(BaselineName::Redis));
    }

    #[test]
    fn counts_parse() {
        assert_eq!(parse_count("100").unwrap(), 100);
        assert_eq!(parse_count("10_000").unwrap(), 10_000);
        assert_eq!(parse_count("100k").unwrap(), 100_000);
        assert_eq!(parse_count("1M").unwrap(), 1_000_000);
        assert!(parse_count("").is_err());
        assert!(parse_count("1.5k").is_err());
        assert!(parse_count("-3").is_err());
    }

    fn scale(extra: &[&str]) -> ScaleArgs {
        let mut argv = vec!["scale"];
        argv.extend_from_slice(extra);
        match args(&argv).command {
            Some(Command::Scale(s)) => s,
            other => panic!("not scale: {other:?}"),
        }
    }

    #[test]
    fn compare_passes_its_run_flags_to_each_run() {
        let compare =
            match args(&["compare", "--old", "/a", "--rounds", "4", "--", "-c", "64"]).command {
                Some(Command::Compare(c)) => c,
                other => panic!("not compare: {other:?}"),
            };
        assert_eq!(compare.rounds, 4);
        assert_eq!(
            compare.child_args(),
            [
                "--phases",
                "reserve,soldout,ceiling",
                "--baseline",
                "redis",
                "--duration",
                "10000ms",
                "--soldout-duration",
                "10000ms",
                "-c",
                "64"
            ]
        );
        assert!(try_args(&["compare", "--old", "/a", "--rounds", "0"]).is_err());
    }

    #[test]
    fn scale_subcommand_parses() {
        assert!(
            args(&[]).command.is_none(),
            "the default run has no subcommand"
        );
        let s = scale(&[]);
        s.validate().unwrap();
        assert_eq!(s.scale_skus, vec![100, 10_000, 100_000]);
        assert_eq!(s.scale_holds, vec![1_000, 100_000, 1_000_000]);
        assert!(s.wants(ScalePart::Skus) && s.wants(ScalePart::Holds));
        let s = scale(&[
            "--scale-skus",
            "100,2k",
            "--scale-holds",
            "1000,20000",
            "--scale-cancel",
            "500",
            "--scale-parts",
            "holds",
        ]);
        s.validate().unwrap();
        assert_eq!(s.scale_skus, vec![100, 2_000]);
        assert_eq!(s.scale_holds, vec![1_000, 20_000]);
        assert!(!s.wants(ScalePart::Skus));
        // Global flags may come after the subcommand.
        let a = args(&["scale", "--base-url", "http://127.0.0.1:8097", "-c", "64"]);
        assert_eq!(a.target().unwrap().port, 8097);
        assert_eq!(a.concurrency, 64);
        assert!(scale(&["--scale-skus", "100,100"]).validate().is_err());
        assert!(scale(&["--scale-skus", "1000,100"]).validate().is_err());
        assert!(scale(&["--scale-holds", "0,10"]).validate().is_err());
        assert!(scale(&["--scale-cleanup", "tpebmn23b5"]).validate().is_ok());
        assert!(scale(&["--scale-cleanup", "x%"]).validate().is_err());
        assert_eq!(
            scale(&["--scale-holds", "1000"]).cancels(),
            1000,
            "capped by the holds"
        );
    }

    #[test]
    fn a_cluster_takes_a_list_of_nodes() {
        // Explicit flags: the environment (FLASHGATE_REDIS_URL in CI) must not decide.
        let a = args(&["--redis-url", "redis://127.0.0.1:6390", "--redis-cluster=0"]);
        assert!(!a.redis_cluster);
        assert_eq!(a.redis_urls(), vec!["redis://127.0.0.1:6390"]);
        let list = "redis://127.0.0.1:7390, redis://127.0.0.1:7391,redis://127.0.0.1:7392";
        assert!(
            args(&["--redis-url", list, "--redis-cluster=0"])
                .validate()
                .is_err(),
            "a list needs --redis-cluster"
        );
        for flag in [
            "--redis-cluster",
            "--redis-cluster=1",
            "--redis-cluster=true",
        ] {
            let a = args(&["--redis-url", list, flag]);
            assert!(a.redis_cluster, "{flag}");
            a.validate().unwrap();
            assert_eq!(
                a.redis_urls(),
                vec![
                    "redis://127.0.0.1:7390",
                    "redis://127.0.0.1:7391",
                    "redis://127.0.0.1:7392"
                ]
            );
        }
        assert!(!args(&["--redis-cluster=0"]).redis_cluster);
        assert!(!args(&["--redis-cluster=false"]).redis_cluster);
        let bad = args(&["--redis-cluster", "--redis-url", "redis://a:1,http://b:2"]);
        assert!(bad.validate().is_err());
        // The flag takes no separate value: what follows is the next argument.
        let a = args(&["--redis-cluster", "scale"]);
        assert!(a.redis_cluster && a.command.is_some());
    }

    #[test]
    fn admission_phases_parse() {
        let a = args(&["--phases", "abuse,overload"]);
        a.validate().unwrap();
        assert_eq!(a.phases, vec![PhaseName::Abuse, PhaseName::Overload]);
        assert_eq!(
            (a.abuse_rate, a.abuse_users, a.abuser_connections),
            (2000.0, 1000, 64)
        );
        assert_eq!(a.sustainable_rate, None);
        assert_eq!(a.overload_probe, Duration::from_secs(5));
        assert!(args(&["--abuse-users", "0"]).validate().is_err());
        assert!(args(&["--abuser-connections", "0"]).validate().is_err());
        assert!(args(&["--sustainable-rate", "0"]).validate().is_err());
        assert!(args(&["--sustainable-rate", "12000"]).validate().is_ok());
    }

    #[test]
    fn the_pace_says_what_it_was_always_said() {
        assert_eq!(args(&[]).mode(), "closed loop, 256 clients");
        assert_eq!(
            args(&["--rate", "8000"]).mode(),
            "open loop at 8000 flows/s (max 4096 in flight)"
        );
        assert_eq!(
            args(&["--rate", "8000"]).pace(),
            Pace::Open {
                rate: 8000.0,
                max_in_flight: 4096
            }
        );
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(args(&["--pay", "0.9"]).validate().is_err());
        assert!(args(&["--concurrency", "0"]).validate().is_err());
        assert!(args(&["--base-url", "https://x"]).validate().is_err());
        assert!(args(&["--sku-prefix", "a b"]).validate().is_err());
        assert!(args(&["--rate=-1"]).validate().is_err());
        assert!(args(&["--phases", "mixed,mixed"]).validate().is_err());
        let mut a = args(&[]);
        a.service_token = "short".into();
        assert!(a.validate().is_err());
        a.service_token = a.jwt_secret.clone();
        assert!(a.validate().is_err(), "one secret for both");
        let a = args(&["--baseline", "none"]);
        assert!(!a.wants_baseline(BaselineName::Mysql));
        let a = args(&[
            "--baseline",
            "mysql",
            "--base-url",
            "http://localhost:9000/api/",
        ]);
        assert!(!a.wants_baseline(BaselineName::Redis));
        let t = a.target().unwrap();
        assert_eq!(
            (t.authority.as_str(), t.port, t.prefix.as_str()),
            ("localhost:9000", 9000, "/api")
        );
    }
}
