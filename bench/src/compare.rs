//! `flashgate-bench compare`: the regression gate. Runs two gateway binaries (say the
//! last release and the working tree) one after the other against the same Redis and
//! MySQL, alternating which goes first in each round (ABBA...), with the same load run
//! for each, then prints every figure's median per build and the new/old ratio with its
//! spread over the rounds.
//!
//! Each run: start `<binary> serve` on a free port (every default on, its worker
//! included), wait for `/healthz`, run this harness against it as a child process
//! (`--end-sales`: its SKUs end and leave Redis afterwards, so one run's holds cannot
//! load the next run's worker), read the child's JSON report, stop the gateway.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cli::{Args, CompareArgs};

/// One figure of one run: higher is better unless `lower_is_better`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    ReservesPerSecond,
    ReserveP99Ms,
    SoldOutPerSecond,
    SoldOutP99Ms,
    HealthzPerSecond,
    RedisBenchmarkPerSecond,
    GatewayCpuUsPerReserve,
    RedisCpuUsPerReserve,
    GatewayCpuUsPerSoldOut,
    GatewayCpuUsPerHealthz,
}

impl Figure {
    const ALL: [Figure; 10] = [
        Figure::ReservesPerSecond,
        Figure::ReserveP99Ms,
        Figure::SoldOutPerSecond,
        Figure::SoldOutP99Ms,
        Figure::HealthzPerSecond,
        Figure::RedisBenchmarkPerSecond,
        Figure::GatewayCpuUsPerReserve,
        Figure::RedisCpuUsPerReserve,
        Figure::GatewayCpuUsPerSoldOut,
        Figure::GatewayCpuUsPerHealthz,
    ];

    fn label(self) -> &'static str {
        match self {
            Figure::ReservesPerSecond => "reserves/s (201)",
            Figure::ReserveP99Ms => "reserve p99 ms",
            Figure::SoldOutPerSecond => "sold_out answers/s",
            Figure::SoldOutP99Ms => "sold_out p99 ms",
            Figure::HealthzPerSecond => "GET /healthz/s",
            Figure::RedisBenchmarkPerSecond => "redis-benchmark reserve script/s",
            Figure::GatewayCpuUsPerReserve => "gateway CPU µs per reserve",
            Figure::RedisCpuUsPerReserve => "Redis CPU µs per reserve",
            Figure::GatewayCpuUsPerSoldOut => "gateway CPU µs per sold_out",
            Figure::GatewayCpuUsPerHealthz => "gateway CPU µs per GET /healthz",
        }
    }

    /// Latencies and CPU costs. The CPU per request is the steadiest figure on a
    /// shared machine: another process's load slows a run but barely changes it.
    fn lower_is_better(self) -> bool {
        matches!(
            self,
            Figure::ReserveP99Ms
                | Figure::SoldOutP99Ms
                | Figure::GatewayCpuUsPerReserve
                | Figure::RedisCpuUsPerReserve
                | Figure::GatewayCpuUsPerSoldOut
                | Figure::GatewayCpuUsPerHealthz
        )
    }

    /// The figure from a child's JSON report (None when that phase did not run).
    fn read(self, report: &serde_json::Value) -> Option<f64> {
        let phase = |name: &str| {
            report["phases"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == name)
                .cloned()
        };
        let endpoint = |phase: &serde_json::Value, name: &str| {
            phase["endpoints"]
                .as_array()?
                .iter()
                .find(|e| e["endpoint"] == name)
                .cloned()
        };
        let rate = |name: &str, endpoint_name: &str, outcome: &str| {
            let p = phase(name)?;
            let e = endpoint(&p, endpoint_name)?;
            Some(e["outcomes"][outcome].as_f64()? / p["duration_s"].as_f64()?.max(1e-9))
        };
        let cpu = |name: &str, field: &str| phase(name)?["resources"][field].as_f64();
        match self {
            Figure::GatewayCpuUsPerReserve => cpu("reserve", "gateway_cpu_us_per_request"),
            Figure::RedisCpuUsPerReserve => cpu("reserve", "redis_cpu_us_per_request"),
            Figure::GatewayCpuUsPerSoldOut => cpu("soldout", "gateway_cpu_us_per_request"),
            Figure::GatewayCpuUsPerHealthz => cpu("ceiling", "gateway_cpu_us_per_request"),
            Figure::ReservesPerSecond => rate("reserve", "reserve", "201 created"),
            Figure::ReserveP99Ms => endpoint(&phase("reserve")?, "reserve")?["p99_ms"].as_f64(),
            Figure::SoldOutPerSecond => rate("soldout", "reserve", "409 sold_out"),
            Figure::SoldOutP99Ms => endpoint(&phase("soldout")?, "reserve")?["p99_ms"].as_f64(),
            Figure::HealthzPerSecond => rate("ceiling", "healthz", "200 ok"),
            Figure::RedisBenchmarkPerSecond => report["redis_benchmark"]["runs"]
                .as_array()?
                .iter()
                .find(|r| r["path"] == "success" && r["verified"] == true)?["rps"]
                .as_f64(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    round: usize,
    build: &'static str,
    binary: PathBuf,
    report: PathBuf,
    figures: Vec<(Figure, f64)>,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    figure: Figure,
    label: &'static str,
    old_median: f64,
    old_min: f64,
    old_max: f64,
    new_median: f64,
    new_min: f64,
    new_max: f64,
    /// new / old per round (same round, same sitting), and their median: > 1 is
    /// better for rates, < 1 for latencies.
    round_ratios: Vec<f64>,
    ratio_median: f64,
}

#[derive(Debug, Serialize)]
struct CompareReport {
    tool: String,
    started_at: String,
    old: PathBuf,
    new: PathBuf,
    rounds: u32,
    child_args: Vec<String>,
    runs: Vec<Run>,
    rows: Vec<Row>,
}

pub async fn run(args: Args, compare: CompareArgs) -> Result<bool> {
    for binary in [&compare.old, &compare.new] {
        if !binary.is_file() {
            bail!("{} is not a file", binary.display());
        }
    }
    let started_at = chrono::Utc::now();
    let scratch = args
        .output_dir
        .join(format!("compare-{}", started_at.format("%Y%m%dT%H%M%S")));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    println!(
        "flashgate-bench compare: old {} vs new {}, {} rounds, alternating; each run: {}",
        compare.old.display(),
        compare.new.display(),
        compare.rounds,
        compare.child_args().join(" ")
    );
    let mut runs = Vec::new();
    for round in 1..=compare.rounds as usize {
        // ABBA: the build that goes second in one round goes first in the next, so a
        // trend over the sitting (Redis growing, the machine warming) hits both alike.
        let order: [(&'static str, &Path); 2] = if round % 2 == 1 {
            [("old", &compare.old), ("new", &compare.new)]
        } else {
            [("new", &compare.new), ("old", &compare.old)]
        };
        for (build, binary) in order {
            let run = one_run(&args, &compare, &scratch, round, build, binary).await?;
            println!(
                "  round {round} {build}: {}",
                run.figures
                    .iter()
                    .map(|(f, v)| format!("{} {v:.1}", f.label()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            runs.push(run);
        }
    }
    let rows = rows(&runs, compare.rounds as usize);
    print_table(&rows, &compare);
    let report = CompareReport {
        tool: format!("flashgate-bench {}", env!("CARGO_PKG_VERSION")),
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        old: compare.old.clone(),
        new: compare.new.clone(),
        rounds: compare.rounds,
        child_args: compare.child_args(),
        runs,
        rows,
    };
    let path = scratch.join("compare.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("\n  report {}", path.display());
    Ok(true)
}

async fn one_run(
    args: &Args,
    compare: &CompareArgs,
    scratch: &Path,
    round: usize,
    build: &'static str,
    binary: &Path,
) -> Result<Run> {
    let port = free_port()?;
    let base_url = format!("http://127.0.0.1:{port}");
    let log_path = scratch.join(format!("gateway-{round}-{build}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut gateway = tokio::process::Command::new(binary)
        .arg("serve")
        .env("FLASHGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLASHGATE_JWT_SECRET", &args.jwt_secret)
        .env("FLASHGATE_SERVICE_TOKEN", &args.service_token)
        .env("FLASHGATE_REDIS_URL", &args.redis_url)
        .env("FLASHGATE_DATABASE_URL", &args.database_url)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} serve", binary.display()))?;
    let outcome = async {
        wait_healthy(&base_url, &mut gateway, &log_path).await?;
        let out_dir = scratch.join(format!("run-{round}-{build}"));
        let mut child = tokio::process::Command::new(std::env::current_exe()?);
        child
            .args(compare.child_args())
            .arg("--base-url")
            .arg(&base_url)
            .arg("--output-dir")
            .arg(&out_dir)
            .arg("--end-sales")
            .arg("--no-progress")
            .env("FLASHGATE_JWT_SECRET", &args.jwt_secret)
            .env("FLASHGATE_SERVICE_TOKEN", &args.service_token)
            .env("FLASHGATE_REDIS_URL", &args.redis_url)
            .env("FLASHGATE_DATABASE_URL", &args.database_url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(
                scratch.join(format!("run-{round}-{build}.txt")),
            )?)
            .stderr(Stdio::inherit());
        if let Some(pid) = gateway.id() {
            child.arg("--gateway-pid").arg(pid.to_string());
        }
        let status = child.status().await?;
        // Exit 1 is a failed validation: the figures are still worth reading, and the
        // child's report says what failed. Exit 2: the run was not done.
        if status.code() == Some(2) || status.code().is_none() {
            bail!("the run against {} failed ({status})", binary.display());
        }
        let report_path = out_dir.join("latest.json");
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&report_path)
                .with_context(|| format!("reading {}", report_path.display()))?,
        )?;
        if report["passed"] != true {
            println!(
                "  NOTE round {round} {build}: the run's validation failed (see {})",
                report_path.display()
            );
        }
        let figures = Figure::ALL
            .iter()
            .filter_map(|f| f.read(&report).map(|v| (*f, v)))
            .collect();
        Ok(Run {
            round,
            build,
            binary: binary.to_path_buf(),
            report: report_path,
            figures,
        })
    }
    .await;
    let _ = gateway.start_kill();
    let _ = gateway.wait().await;
    outcome
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_healthy(
    base_url: &str,
    gateway: &mut tokio::process::Child,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = base_url.trim_start_matches("http://").to_string();
    while Instant::now() < deadline {
        if let Some(status) = gateway.try_wait()? {
            bail!(
                "the gateway exited ({status}) before answering; its log: {}",
                log.display()
            );
        }
        if healthz_ok(&addr).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the gateway did not answer GET /healthz within 30 s; its log: {}",
        log.display()
    )
}

async fn healthz_ok(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer));
    matches!(read.await, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 200")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn rows(runs: &[Run], rounds: usize) -> Vec<Row> {
    let value = |round: usize, build: &str, figure: Figure| {
        runs.iter()
            .find(|r| r.round == round && r.build == build)
            .and_then(|r| r.figures.iter().find(|(f, _)| *f == figure))
            .map(|(_, v)| *v)
    };
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Figure::ALL
        .iter()
        .filter_map(|&figure| {
            let mut old = Vec::new();
            let mut new = Vec::new();
            let mut ratios = Vec::new();
            for round in 1..=rounds {
                let (o, n) = (value(round, "old", figure), value(round, "new", figure));
                old.extend(o);
                new.extend(n);
                if let (Some(o), Some(n)) = (o, n) {
                    if o > 0.0 {
                        ratios.push(n / o);
                    }
                }
            }
            if ratios.is_empty() {
                return None;
            }
            let round_ratios = ratios.clone();
            Some(Row {
                figure,
                label: figure.label(),
                old_min: min(&old),
                old_max: max(&old),
                new_min: min(&new),
                new_max: max(&new),
                old_median: median(&mut old),
                new_median: median(&mut new),
                round_ratios,
                ratio_median: median(&mut ratios),
            })
        })
        .collect()
}

fn print_table(rows: &[Row], compare: &CompareArgs) {
    println!(
        "\n| figure | old median (min-max) | new median (min-max) | new/old median | new/old per round |"
    );
    println!("|---|---|---|---|---|");
    for row in rows {
        let better = if row.figure.lower_is_better() {
            "lower is better"
        } else {
            "higher is better"
        };
        println!(
            "| {} ({better}) | {:.1} ({:.1}-{:.1}) | {:.1} ({:.1}-{:.1}) | {:.3} | {} |",
            row.label,
            row.old_median,
            row.old_min,
            row.old_max,
            row.new_median,
            row.new_min,
            row.new_max,
            row.ratio_median,
            row.round_ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!(
        "\nold = {}\nnew = {}",
        compare.old.display(),
        compare.new.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, build: &'static str, reserves: f64, p99: f64) -> Run {
        Run {
            round,
            build,
            binary: PathBuf::new(),
            report: PathBuf::new(),
            figures: vec![
                (Figure::ReservesPerSecond, reserves),
                (Figure::ReserveP99Ms, p99),
            ],
        }
    }

    #[test]
    fn ratios_pair_runs_of_the_same_round() {
        let runs = vec![
            run(1, "old", 100.0, 20.0),
            run(1, "new", 110.0, 18.0),
            run(2, "new", 90.0, 22.0),
            run(2, "old", 100.0, 20.0),
            run(3, "old", 200.0, 10.0),
            run(3, "new", 240.0, 10.0),
        ];
        let rows = rows(&runs, 3);
        assert_eq!(rows.len(), 2);
        let reserves = &rows[0];
        assert_eq!(reserves.figure, Figure::ReservesPerSecond);
        assert_eq!(reserves.round_ratios, vec![1.1, 0.9, 1.2]);
        assert_eq!(reserves.ratio_median, 1.1);
        assert_eq!((reserves.old_median, reserves.new_median), (100.0, 110.0));
        assert_eq!((reserves.new_min, reserves.new_max), (90.0, 240.0));
        assert_eq!(rows[1].round_ratios, vec![0.9, 1.1, 1.0]);
    }

    #[test]
    fn figures_are_read_from_a_child_report() {
        let report = serde_json::json!({
            "phases": [
                {"name": "reserve", "duration_s": 10.0, "endpoints": [
                    {"endpoint": "reserve", "p99_ms": 21.5, "outcomes": {"201 created": 250000}}],
                 "resources": {"gateway_cpu_us_per_request": 31.5}},
                {"name": "ceiling", "duration_s": 5.0, "endpoints": [
                    {"endpoint": "healthz", "p99_ms": 3.0, "outcomes": {"200 ok": 400000}}]}
            ],
            "redis_benchmark": {"runs": [
                {"path": "sold_out", "rps": 90000.0, "verified": true},
                {"path": "success", "rps": 40000.0, "verified": true}]}
        });
        assert_eq!(Figure::ReservesPerSecond.read(&report), Some(25_000.0));
        assert_eq!(Figure::ReserveP99Ms.read(&report), Some(21.5));
        assert_eq!(Figure::HealthzPerSecond.read(&report), Some(80_000.0));
        assert_eq!(
            Figure::RedisBenchmarkPerSecond.read(&report),
            Some(40_000.0)
        );
        assert_eq!(Figure::SoldOutPerSecond.read(&report), None);
        assert_eq!(Figure::GatewayCpuUsPerReserve.read(&report), Some(31.5));
        assert_eq!(Figure::RedisCpuUsPerReserve.read(&report), None);
    }
}
