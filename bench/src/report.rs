//! The report: printed tables, the JSON file and the SVG chart.

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

use crate::admission::{AbuseReport, OverloadReport};
use crate::baseline_redis::RedisBenchmark;
use crate::probe::Resources;
use crate::stats::{EndpointSummary, OutcomeLatency, TickSummary};
use crate::validate::Check;

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub mode: String,
    pub skus: Vec<String>,
    /// Seconds since the run started.
    pub started_at_s: f64,
    pub duration_s: f64,
    pub requests: u64,
    pub throughput_rps: f64,
    /// Open loop: flows due in the phase that never started (rate not reached).
    pub unsent_flows: u64,
    /// Open loop: how late flows started after their intended time (inside the
    /// latencies, which count from the intended time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_lag: Option<OutcomeLatency>,
    /// New client connections the phase needed (HTTP phases).
    pub connections_opened: Option<u64>,
    pub endpoints: Vec<EndpointSummary>,
    pub timeline: Vec<TickSummary>,
    pub resources: Option<Resources>,
}

impl PhaseReport {
    pub fn endpoint(&self, name: &str) -> Option<&EndpointSummary> {
        self.endpoints.iter().find(|e| e.endpoint == name)
    }

    /// Answers with this outcome per second of the phase.
    pub fn outcome_rate(&self, endpoint: &str, outcome: &str) -> Option<f64> {
        self.endpoint(endpoint)
            .map(|e| e.outcome(outcome) as f64 / self.duration_s.max(1e-9))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: Option<f64>,
    /// "≥ 8" style.
    pub target: String,
    pub met: Option<bool>,
    pub how: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MysqlReport {
    pub phase: PhaseReport,
    pub server: String,
    pub created: u64,
    pub self_check: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisReport {
    pub script_sha: String,
    pub gateway_has_script: bool,
    pub runs: Vec<RedisBenchmark>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Memory {
    pub gateway_pid: Option<u32>,
    pub rss_idle_kb: Option<u64>,
    pub rss_after_warmup_kb: Option<u64>,
    pub rss_end_kb: Option<u64>,
    pub rss_max_kb: Option<u64>,
    /// (seconds since the run started, RSS in KiB), once a second.
    pub samples: Vec<(f64, u64)>,
}

/// The gateway with no load: what its background work costs.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub seconds: f64,
    pub gateway_cores: Option<f64>,
    pub redis_cores: Option<f64>,
    pub redis_commands_per_s: Option<f64>,
    pub redis_calls_per_s: std::collections::BTreeMap<String, f64>,
    /// SKUs in the gateway's index (`fg:skus`): its worker walks all of them.
    pub skus_indexed: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub gateway_pid: Option<u32>,
    /// The gateway's binary: version, build, profile (a debug build measures slow).
    pub gateway: crate::probe::GatewayBinary,
    pub redis: String,
    /// Cluster (--redis-cluster): every node the harness reads, as found at the start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redis_nodes: Vec<RedisNode>,
    pub mysql: String,
    pub cpus: usize,
    pub bench_threads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisNode {
    /// `host:port`.
    pub addr: String,
    pub primary: bool,
    pub pid: Option<u32>,
    /// Slot ranges (primaries), inclusive.
    pub slots: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub passed: bool,
    pub flush_seconds: Option<f64>,
    pub reopen_ms: Option<f64>,
    pub expiry_return_ms: Option<f64>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub run_id: String,
    pub seed: u64,
    pub started_at: String,
    pub base_url: String,
    pub mode: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub command_line: Vec<String>,
    pub environment: Environment,
    pub phases: Vec<PhaseReport>,
    pub mysql_baseline: Option<MysqlReport>,
    pub redis_benchmark: Option<RedisReport>,
    pub ratios: Vec<Ratio>,
    pub idle: Idle,
    pub memory: Memory,
    /// The abuse phase's figures (its phases are `abuse-alone` and `abuse`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abuse: Option<AbuseReport>,
    /// The overload phase's figures (`overload-probe`, `overload-0.8x`, `overload-2x`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overload: Option<OverloadReport>,
    /// `--webhooks`: how deliveries kept up with the mixed phase (src/webhook.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<crate::webhook::WebhookReport>,
    /// The queue phase's figures (its phases are `queue-join`, `queue-sale` and
    /// `queue-streams`; src/queue.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<crate::queue::QueueReport>,
    pub validation: Option<ValidationReport>,
    pub passed: bool,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
}

pub fn print_phase(p: &PhaseReport) {
    let count = |keep: fn(&str) -> bool| -> u64 {
        p.endpoints
            .iter()
            .flat_map(|e| e.outcomes.iter())
            .filter(|(k, _)| keep(k))
            .map(|(_, n)| n)
            .sum()
    };
    let errors = count(|k| (k.starts_with("error") || k.starts_with('5')) && k != SHED);
    let refused = [
        (count(|k| k == SHED), "shed (503 overloaded)"),
        (count(|k| k == RATE_LIMITED), "rate-limited (429)"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!(", {n} {what}"))
    .collect::<String>();
    println!(
        "  {} requests in {:.1} s = {:.0} req/s, {} errors (5xx or transport){refused}{}",
        p.requests,
        p.duration_s,
        p.throughput_rps,
        errors,
        p.connections_opened
            .filter(|n| *n > 0)
            .map(|n| format!(", {n} new connections"))
            .unwrap_or_default()
    );
    if p.unsent_flows > 0 {
        println!(
            "  NOTE     {} flows due in this phase never started: the system under test did not keep up with the offered rate (held at --max-in-flight)",
            p.unsent_flows
        );
    }
    if let Some(lag) = p.start_lag {
        println!(
            "  lag      flows started p50 {:.2} / p99 {:.2} / max {:.2} ms after their intended time (the harness's own delay, inside the latencies below)",
            lag.p50_ms, lag.p99_ms, lag.max_ms
        );
    }
    println!(
        "  {:<16} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "endpoint", "count", "req/s", "p50 ms", "p90 ms", "p99 ms", "p999 ms", "max ms"
    );
    for e in &p.endpoints {
        println!(
            "  {:<16} {:>9} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            e.endpoint, e.count, e.rate_rps, e.p50_ms, e.p90_ms, e.p99_ms, e.p999_ms, e.max_ms
        );
    }
    for e in &p.endpoints {
        let outcomes: Vec<String> = e.outcomes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("  outcomes {:<16} {}", e.endpoint, outcomes.join(", "));
    }
    if let Some(r) = &p.resources {
        let mut cost = Vec::new();
        if let Some(c) = r.gateway_cores {
            cost.push(format!(
                "gateway {c:.2} cores ({} µs/req)",
                opt(r.gateway_cpu_us_per_request, 0)
            ));
        }
        if let Some(c) = r.redis_cores {
            cost.push(format!(
                "redis {c:.2} cores ({} µs/req)",
                opt(r.redis_cpu_us_per_request, 0)
            ));
        }
        if let Some(c) = r.mysql_cores {
            if c > 0.01 {
                cost.push(format!(
                    "mysql {c:.2} cores ({} µs/req)",
                    opt(r.mysql_cpu_us_per_request, 0)
                ));
            }
        }
        if let Some(c) = r.bench_cores {
            cost.push(format!("bench {c:.2} cores"));
        }
        if let Some(c) = r.other_cores {
            cost.push(format!("other processes {c:.2} cores"));
        }
        println!("  cpu      {}", cost.join(" · "));
        if let Some(forks) = r.redis_forks.filter(|f| *f > 0) {
            println!(
                "  NOTE     Redis forked {forks} time(s) in this phase (AOF rewrite or BGSAVE); the child's CPU counts as other processes"
            );
        }
        if r.other_cores.is_some_and(|c| c > 0.25) {
            println!(
                "  WARNING  other processes were busy during this phase: its numbers are not clean"
            );
        }
        if let Some(cmds) = r.redis_commands_per_request {
            let calls: Vec<String> = r
                .redis_calls
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "  redis    {cmds:.2} commands/req, {} µs executing/req, script {} µs/call; calls: {}",
                opt(r.redis_exec_us_per_request, 1),
                opt(r.script_us_per_call, 1),
                calls.join(", ")
            );
        }
        if let Some(line) = primaries_line(r) {
            println!("  {line}");
        }
    }
}

/// The outcome key of a load shed and of a rate-limit refusal.
pub const SHED: &str = "503 overloaded";
pub const RATE_LIMITED: &str = "429 rate_limited";

/// Cluster: "redis per primary: 127.0.0.1:7390 34% / 7391 33% / 7392 33% of calls, …".
pub fn primaries_line(r: &Resources) -> Option<String> {
    if r.redis_primaries.is_empty() {
        return None;
    }
    let nodes: Vec<&str> = r.redis_primaries.iter().map(|p| p.node.as_str()).collect();
    let names = crate::cluster::short_addrs(&nodes);
    let pct = |v: f64| format!("{:.0}%", v * 100.0);
    let join = |f: &dyn Fn(&crate::probe::PrimaryShare) -> String| {
        r.redis_primaries
            .iter()
            .map(f)
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let calls: Vec<String> = names
        .iter()
        .zip(&r.redis_primaries)
        .map(|(name, p)| format!("{name} {}", pct(p.calls_share)))
        .collect();
    let mut line = format!(
        "redis per primary: {} of calls · {} of executing time",
        calls.join(" / "),
        join(&|p| pct(p.exec_share))
    );
    if r.redis_primaries.iter().all(|p| p.cpu_share.is_some()) {
        line += &format!(
            " · {} of CPU ({} µs/req)",
            join(&|p| p.cpu_share.map_or("-".into(), pct)),
            join(&|p| opt(p.cpu_us_per_request, 0))
        );
    }
    if let Some(c) = r.redis_replica_cores {
        line += &format!(" · replicas {c:.2} cores");
    }
    Some(line)
}

pub fn print_ratios(ratios: &[Ratio]) {
    println!(
        "  {:<58} {:>9} {:>8} {:>6}",
        "ratio", "value", "target", "met"
    );
    for r in ratios {
        println!(
            "  {:<58} {:>9} {:>8} {:>6}",
            r.name,
            opt(r.value, 2),
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
        println!("      {}", r.how);
    }
}

pub fn write(report: &Report, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("{}.json", report.run_id));
    let svg_path = dir.join(format!("{}.svg", report.run_id));
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(dir.join("latest.json"), &json)?;
    chart(report, &svg_path).with_context(|| format!("drawing {}", svg_path.display()))?;
    std::fs::copy(&svg_path, dir.join("latest.svg"))?;
    Ok((json_path, svg_path))
}

fn phase_color(name: &str) -> RGBColor {
    match name {
        "reserve" => RGBColor(31, 119, 180),
        "soldout" => RGBColor(255, 127, 14),
        "mixed" => RGBColor(44, 160, 44),
        "mysql" => RGBColor(214, 39, 40),
        "abuse-alone" | "abuse" => RGBColor(148, 103, 189),
        "overload-probe" | "overload-0.8x" | "overload-2x" => RGBColor(140, 86, 75),
        _ => RGBColor(110, 110, 110),
    }
}

/// Three panels on one time axis (seconds since the run started): throughput, latency
/// percentiles (log scale) and the gateway's RSS.
fn chart(report: &Report, path: &Path) -> Result<()> {
    let mut phases: Vec<&PhaseReport> = report.phases.iter().collect();
    if let Some(m) = &report.mysql_baseline {
        phases.push(&m.phase);
    }
    let t_max = phases
        .iter()
        .map(|p| p.started_at_s + p.duration_s)
        .chain(report.memory.samples.iter().map(|(t, _)| *t))
        .fold(1.0f64, f64::max);
    let rb_runs: Vec<&RedisBenchmark> = report
        .redis_benchmark
        .iter()
        .flat_map(|r| r.runs.iter())
        .collect();
    let rps_max = phases
        .iter()
        .flat_map(|p| p.timeline.iter().map(|t| t.requests as f64))
        .chain(rb_runs.iter().map(|r| r.rps))
        .fold(1.0f64, f64::max)
        * 1.7; // headroom for the legend
    let lat_max = phases
        .iter()
        .flat_map(|p| p.timeline.iter().map(|t| t.p999_ms))
        .chain(rb_runs.iter().map(|r| r.p99_ms))
        .fold(1.0f64, f64::max)
        * 1.5;
    let lat_min = phases
        .iter()
        .flat_map(|p| p.timeline.iter().map(|t| t.p50_ms))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .min(lat_max / 10.0)
        .max(0.001)
        * 0.7;

    let root = SVGBackend::new(path, (1200, 1050)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "flashgate-bench {} · seed {} · {}",
        report.run_id, report.seed, report.mode
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let panels = root.split_evenly((3, 1));

    // Throughput.
    let mut c = ChartBuilder::on(&panels[0])
        .caption(
            "throughput (requests answered per second)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..rps_max)?;
    c.configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("s")
        .y_desc("req/s")
        .draw()?;
    for p in &phases {
        let color = phase_color(&p.name);
        c.draw_series(LineSeries::new(
            p.timeline.iter().map(|t| (t.t_s + 0.5, t.requests as f64)),
            color.stroke_width(2),
        ))?
        .label(format!("{} ({:.0} req/s)", p.name, p.throughput_rps))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        if p.timeline.iter().any(|t| t.sold_out > 0) {
            c.draw_series(LineSeries::new(
                p.timeline.iter().map(|t| (t.t_s + 0.5, t.sold_out as f64)),
                color.mix(0.45).stroke_width(1),
            ))?
            .label(format!("{} sold_out answers", p.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.mix(0.45)));
        }
    }
    let rb_color = RGBColor(148, 103, 189);
    for r in report.redis_benchmark.iter().flat_map(|r| r.runs.iter()) {
        let style = if r.path == "success" {
            rb_color.stroke_width(2)
        } else {
            rb_color.mix(0.45).stroke_width(2)
        };
        c.draw_series(LineSeries::new(
            [
                (r.started_at_s, r.rps),
                (r.started_at_s + r.duration_s, r.rps),
            ],
            style,
        ))?
        .label(format!(
            "redis-benchmark EVALSHA {} ({:.0} req/s)",
            r.path, r.rps
        ))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;

    // Latency.
    let mut c = ChartBuilder::on(&panels[1])
        .caption(
            "latency per second, all endpoints: p50 (thick), p99 (thin), p99.9 (faint); ms, log scale",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, (lat_min..lat_max).log_scale())?;
    c.configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("s")
        .y_desc("ms")
        .y_labels(30)
        .y_label_formatter(&|v| {
            // Only 1, 2 and 5 times a power of ten: a log axis stays readable.
            let mantissa = v / 10f64.powf(v.log10().floor());
            if [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6) {
                if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v}")
                }
            } else {
                String::new()
            }
        })
        .draw()?;
    for p in &phases {
        let color = phase_color(&p.name);
        let pts = |f: fn(&TickSummary) -> f64| -> Vec<(f64, f64)> {
            p.timeline
                .iter()
                .filter(|t| t.requests > 0)
                .map(|t| (t.t_s + 0.5, f(t).max(lat_min)))
                .collect()
        };
        c.draw_series(LineSeries::new(pts(|t| t.p50_ms), color.stroke_width(3)))?
            .label(p.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        c.draw_series(LineSeries::new(pts(|t| t.p99_ms), color.stroke_width(1)))?;
        c.draw_series(LineSeries::new(
            pts(|t| t.p999_ms),
            color.mix(0.35).stroke_width(1),
        ))?;
    }
    for r in report.redis_benchmark.iter().flat_map(|r| r.runs.iter()) {
        let span = |v: f64| {
            [
                (r.started_at_s, v.max(lat_min)),
                (r.started_at_s + r.duration_s, v.max(lat_min)),
            ]
        };
        let color = if r.path == "success" {
            rb_color.to_rgba()
        } else {
            rb_color.mix(0.45)
        };
        c.draw_series(LineSeries::new(span(r.p50_ms), color.stroke_width(3)))?;
        c.draw_series(LineSeries::new(span(r.p99_ms), color.stroke_width(1)))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;

    // Gateway memory.
    let samples = &report.memory.samples;
    let mb_max = samples
        .iter()
        .map(|(_, kb)| *kb as f64 / 1024.0)
        .fold(1.0f64, f64::max)
        * 1.2;
    let mut c = ChartBuilder::on(&panels[2])
        .caption("gateway RSS (MiB)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..mb_max)?;
    c.configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("s since start")
        .y_desc("MiB")
        .draw()?;
    c.draw_series(LineSeries::new(
        samples.iter().map(|(t, kb)| (*t, *kb as f64 / 1024.0)),
        BLACK.stroke_width(2),
    ))?;
    for p in &phases {
        let color = phase_color(&p.name);
        c.draw_series(std::iter::once(Rectangle::new(
            [
                (p.started_at_s, 0.0),
                (p.started_at_s + p.duration_s, mb_max * 0.04),
            ],
            color.mix(0.6).filled(),
        )))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{self, CommandStats, NodeSample, Pids, Snapshot};

    fn sample(addr: &str, calls: u64, cpu: f64) -> NodeSample {
        NodeSample {
            addr: addr.to_string(),
            primary: true,
            cpu: Some(cpu),
            stats: Some(CommandStats::parse(&format!(
                "cmdstat_evalsha:calls={calls},usec={calls}"
            ))),
            forks: Some(0),
        }
    }

    #[test]
    fn the_primaries_line_gives_each_share() {
        let pids = Pids::default();
        let at = |c: [u64; 3], cpu: [f64; 3]| {
            let nodes = ["127.0.0.1:7390", "127.0.0.1:7391", "127.0.0.1:7392"]
                .iter()
                .zip(c.iter().zip(cpu))
                .map(|(a, (c, cpu))| sample(a, *c, cpu))
                .collect();
            Snapshot::take(&pids, None, None).with_nodes(nodes)
        };
        let before = at([0, 0, 0], [0.0, 0.0, 0.0]);
        let after = at([34, 33, 33], [0.002, 0.001, 0.001]);
        let r = probe::delta(&before, &after, 100);
        assert_eq!(
            primaries_line(&r).unwrap(),
            "redis per primary: 127.0.0.1:7390 34% / 7391 33% / 7392 33% of calls · 34% / 33% / 33% of executing time · 50% / 25% / 25% of CPU (20 / 10 / 10 µs/req)"
        );
        let single = probe::delta(
            &Snapshot::take(&pids, None, None),
            &Snapshot::take(&pids, None, None),
            1,
        );
        assert_eq!(primaries_line(&single), None);
    }
}
