//! What the processes under test cost: RSS and CPU time from /proc (Linux), and
//! Redis command statistics (INFO commandstats), sampled around each phase. On a Redis
//! Cluster every node is sampled: the primaries' figures are summed, and each
//! primary's share is reported.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ; 100 on every Linux
/// architecture flashgate runs on).
const CLOCK_TICKS: f64 = 100.0;

/// The gateway under test, as its own binary and /healthz tell: a debug build is
/// several times slower than a release one, so a report must say which it measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayBinary {
    /// /proc/<pid>/exe, when the gateway runs on this machine.
    pub exe: Option<String>,
    /// `flashgate --version` of that binary, else /healthz's `version`.
    pub version: Option<String>,
    /// /healthz's `build` (a commit), when the gateway says it.
    pub build: Option<String>,
    /// `release`, `debug`, or `unknown`.
    pub profile: String,
}

impl GatewayBinary {
    /// From the gateway's pid (when found) and its /healthz answer (a JSON object).
    pub fn identify(pid: Option<u32>, healthz: Option<&serde_json::Value>) -> GatewayBinary {
        let exe = pid.and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok());
        let exe = exe.map(|p| {
            let text = p.display().to_string();
            text.strip_suffix(" (deleted)").unwrap_or(&text).to_string()
        });
        let long_version = exe.as_ref().and_then(|exe| {
            let out = std::process::Command::new(exe)
                .arg("--version")
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
        let field = |name: &str| {
            healthz
                .and_then(|h| h.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let profile = profile_of(long_version.as_deref(), exe.as_deref());
        GatewayBinary {
            version: long_version.or_else(|| field("version")),
            build: field("build"),
            exe,
            profile: profile.to_string(),
        }
    }
}

/// `flashgate --version` says "(debug build)" or "(release build)"; an older binary
/// says neither, then its path tells (cargo's target/debug or target/release).
pub fn profile_of(long_version: Option<&str>, exe: Option<&str>) -> &'static str {
    match long_version {
        Some(v) if v.contains("(debug build)") => return "debug",
        Some(v) if v.contains("(release build)") => return "release",
        _ => {}
    }
    match exe {
        Some(path) if path.contains("/debug/") => "debug",
        Some(path) if path.contains("/release/") => "release",
        _ => "unknown",
    }
}

/// The pid of the process listening on TCP `port` (any local address), found through
/// /proc/net/tcp{,6} and the socket inodes in /proc/<pid>/fd.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                continue; // not LISTEN
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// VmRSS of `pid` in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds `pid` ("self" for this process) has used.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are fixed.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLOCK_TICKS)
}

/// CPU seconds the whole machine spent busy (all cores): /proc/stat's first line.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy / CLOCK_TICKS)
}

pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Calls and microseconds per command, from INFO commandstats.
#[derive(Debug, Clone, Default)]
pub struct CommandStats {
    pub commands: BTreeMap<String, (u64, u64)>,
}

impl CommandStats {
    pub fn parse(info: &str) -> CommandStats {
        let mut commands = BTreeMap::new();
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((name, values)) = rest.split_once(':') else {
                continue;
            };
            let mut calls = 0;
            let mut usec = 0;
            for kv in values.split(',') {
                match kv.split_once('=') {
                    Some(("calls", v)) => calls = v.trim().parse().unwrap_or(0),
                    Some(("usec", v)) => usec = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
            commands.insert(name.to_string(), (calls, usec));
        }
        CommandStats { commands }
    }

    /// Every command's calls and microseconds added up over `parts` (a cluster's primaries).
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a CommandStats>) -> CommandStats {
        let mut commands: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for part in parts {
            for (name, (calls, usec)) in &part.commands {
                let entry = commands.entry(name.clone()).or_insert((0, 0));
                entry.0 += calls;
                entry.1 += usec;
            }
        }
        CommandStats { commands }
    }

    fn total(&self) -> (u64, u64) {
        self.commands
            .values()
            .fold((0, 0), |(c, u), (calls, usec)| (c + calls, u + usec))
    }

    fn get(&self, name: &str) -> (u64, u64) {
        self.commands.get(name).copied().unwrap_or((0, 0))
    }
}

/// Where the processes under test stand at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub gateway_cpu: Option<f64>,
    pub redis_cpu: Option<f64>,
    pub mysql_cpu: Option<f64>,
    pub bench_cpu: Option<f64>,
    pub machine_cpu: Option<f64>,
    pub redis_stats: Option<CommandStats>,
    /// Redis `total_forks` (AOF rewrites, BGSAVE): a fork's child burns CPU that the
    /// Redis pid does not show.
    pub redis_forks: Option<u64>,
    /// Cluster: CPU seconds of the replicas (their pids), summed.
    pub redis_replica_cpu: Option<f64>,
    /// Cluster: each node as sampled (empty for a single Redis).
    pub redis_nodes: Vec<NodeSample>,
}

/// One node of a Redis Cluster at one instant.
#[derive(Debug, Clone)]
pub struct NodeSample {
    /// `host:port`.
    pub addr: String,
    pub primary: bool,
    /// CPU seconds of its process (when the harness found its pid).
    pub cpu: Option<f64>,
    /// INFO commandstats (primaries).
    pub stats: Option<CommandStats>,
    /// INFO stats `total_forks`.
    pub forks: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Pids {
    pub gateway: Option<u32>,
    pub redis: Option<u32>,
    pub mysql: Option<u32>,
}

impl Snapshot {
    pub fn take(
        pids: &Pids,
        redis_stats: Option<CommandStats>,
        redis_forks: Option<u64>,
    ) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            gateway_cpu: pids.gateway.and_then(|p| cpu_seconds(&p.to_string())),
            redis_cpu: pids.redis.and_then(|p| cpu_seconds(&p.to_string())),
            mysql_cpu: pids.mysql.and_then(|p| cpu_seconds(&p.to_string())),
            bench_cpu: cpu_seconds("self"),
            machine_cpu: machine_busy_seconds(),
            redis_stats,
            redis_forks,
            redis_replica_cpu: None,
            redis_nodes: Vec::new(),
        }
    }

    /// A cluster's nodes: the primaries' commandstats and CPU are summed into the
    /// Redis figures (None when a primary could not be read: a partial sum would pass
    /// for a drop), the replicas' CPU apart, forks over every node.
    pub fn with_nodes(mut self, nodes: Vec<NodeSample>) -> Snapshot {
        let primaries: Vec<&NodeSample> = nodes.iter().filter(|n| n.primary).collect();
        let all =
            |f: fn(&NodeSample) -> bool| !primaries.is_empty() && primaries.iter().all(|n| f(n));
        self.redis_stats = all(|n| n.stats.is_some())
            .then(|| CommandStats::sum(primaries.iter().filter_map(|n| n.stats.as_ref())));
        self.redis_cpu =
            all(|n| n.cpu.is_some()).then(|| primaries.iter().filter_map(|n| n.cpu).sum());
        let replica_cpu: Vec<f64> = nodes
            .iter()
            .filter(|n| !n.primary)
            .filter_map(|n| n.cpu)
            .collect();
        self.redis_replica_cpu = (!replica_cpu.is_empty()).then(|| replica_cpu.iter().sum());
        self.redis_forks = (!nodes.is_empty() && nodes.iter().all(|n| n.forks.is_some()))
            .then(|| nodes.iter().filter_map(|n| n.forks).sum());
        self.redis_nodes = nodes;
        self
    }
}

/// One primary's part of a phase's Redis work.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrimaryShare {
    /// `host:port`.
    pub node: String,
    /// Commands it ran (INFO commandstats calls; a script call counts once).
    pub calls: u64,
    /// Its share of every primary's calls (0..=1).
    pub calls_share: f64,
    /// Microseconds it spent executing them (INFO commandstats usec).
    pub exec_usec: u64,
    pub exec_share: f64,
    /// Its process's CPU (from /proc, when its pid is known): cores, share of every
    /// primary's, and microseconds per request of the phase.
    pub cores: Option<f64>,
    pub cpu_share: Option<f64>,
    pub cpu_us_per_request: Option<f64>,
}

/// Each primary's calls, execution time and CPU between two samples, and its share of
/// the primaries' total; in the order of `after`. A primary missing from either sample
/// is left out.
pub fn primary_shares(
    before: &[NodeSample],
    after: &[NodeSample],
    wall_s: f64,
    requests: u64,
) -> Vec<PrimaryShare> {
    // (node, calls, usec, CPU seconds) of each primary found in both samples.
    let mut parts: Vec<(&str, u64, u64, Option<f64>)> = Vec::new();
    for a in after.iter().filter(|n| n.primary) {
        let Some(b) = before.iter().find(|b| b.addr == a.addr && b.primary) else {
            continue;
        };
        let (calls, usec) = match (&b.stats, &a.stats) {
            (Some(sb), Some(sa)) => {
                let ((cb, ub), (ca, ua)) = (sb.total(), sa.total());
                (ca.saturating_sub(cb), ua.saturating_sub(ub))
            }
            _ => (0, 0),
        };
        let cpu = match (b.cpu, a.cpu) {
            (Some(b), Some(a)) => Some((a - b).max(0.0)),
            _ => None,
        };
        parts.push((&a.addr, calls, usec, cpu));
    }
    let share = |part: f64, total: f64| if total > 0.0 { part / total } else { 0.0 };
    let calls: u64 = parts.iter().map(|p| p.1).sum();
    let usec: u64 = parts.iter().map(|p| p.2).sum();
    // The CPU shares only when every primary's CPU is known.
    let cpu: Option<f64> = parts.iter().map(|p| p.3).sum();
    let n = requests.max(1) as f64;
    parts
        .into_iter()
        .map(|(node, c, u, seconds)| PrimaryShare {
            node: node.to_string(),
            calls: c,
            calls_share: share(c as f64, calls as f64),
            exec_usec: u,
            exec_share: share(u as f64, usec as f64),
            cores: seconds.map(|s| s / wall_s.max(1e-9)),
            cpu_share: cpu.zip(seconds).map(|(all, mine)| share(mine, all)),
            cpu_us_per_request: seconds.map(|s| s * 1e6 / n),
        })
        .collect()
}

/// What a phase cost, per request and in cores (CPU seconds per wall second).
#[derive(Debug, Clone, Serialize)]
pub struct Resources {
    pub wall_s: f64,
    pub gateway_cores: Option<f64>,
    pub redis_cores: Option<f64>,
    pub mysql_cores: Option<f64>,
    pub bench_cores: Option<f64>,
    /// Cores the rest of the machine used meanwhile (builds, other tests): noise.
    pub other_cores: Option<f64>,
    pub gateway_cpu_us_per_request: Option<f64>,
    pub redis_cpu_us_per_request: Option<f64>,
    pub mysql_cpu_us_per_request: Option<f64>,
    /// Redis commands (a script call counts once) per request.
    pub redis_commands_per_request: Option<f64>,
    /// Time Redis spent executing commands per request (INFO commandstats usec).
    pub redis_exec_us_per_request: Option<f64>,
    /// Script calls in the phase (FCALL of the gateway's functions, EVALSHA of
    /// scripts) and their mean execution time inside Redis.
    pub script_calls: Option<u64>,
    pub script_us_per_call: Option<f64>,
    /// Each command's calls in the phase (those called at least once).
    pub redis_calls: BTreeMap<String, u64>,
    /// Forks of Redis in the phase (AOF rewrite, BGSAVE).
    pub redis_forks: Option<u64>,
    /// Cluster: cores the replicas used (not in `redis_cores`, which sums the primaries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_replica_cores: Option<f64>,
    /// Cluster: each primary's share of the calls, of the execution time and of the CPU.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redis_primaries: Vec<PrimaryShare>,
}

pub fn delta(before: &Snapshot, after: &Snapshot, requests: u64) -> Resources {
    let wall = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let n = requests.max(1) as f64;
    let cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    let gateway = cpu(before.gateway_cpu, after.gateway_cpu);
    let redis = cpu(before.redis_cpu, after.redis_cpu);
    let mysql = cpu(before.mysql_cpu, after.mysql_cpu);
    let bench = cpu(before.bench_cpu, after.bench_cpu);
    let machine = cpu(before.machine_cpu, after.machine_cpu);
    let replicas = cpu(before.redis_replica_cpu, after.redis_replica_cpu);
    let ours = [gateway, redis, mysql, bench, replicas]
        .iter()
        .flatten()
        .sum::<f64>();
    let mut resources = Resources {
        wall_s: wall,
        gateway_cores: gateway.map(|s| s / wall),
        redis_cores: redis.map(|s| s / wall),
        mysql_cores: mysql.map(|s| s / wall),
        bench_cores: bench.map(|s| s / wall),
        other_cores: machine.map(|m| (m - ours).max(0.0) / wall),
        gateway_cpu_us_per_request: gateway.map(|s| s * 1e6 / n),
        redis_cpu_us_per_request: redis.map(|s| s * 1e6 / n),
        mysql_cpu_us_per_request: mysql.map(|s| s * 1e6 / n),
        redis_commands_per_request: None,
        redis_exec_us_per_request: None,
        script_calls: None,
        script_us_per_call: None,
        redis_calls: BTreeMap::new(),
        redis_forks: match (before.redis_forks, after.redis_forks) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        redis_replica_cores: replicas.map(|s| s / wall),
        redis_primaries: primary_shares(&before.redis_nodes, &after.redis_nodes, wall, requests),
    };
    if let (Some(a), Some(b)) = (&before.redis_stats, &after.redis_stats) {
        let (calls_a, usec_a) = a.total();
        let (calls_b, usec_b) = b.total();
        resources.redis_commands_per_request = Some(calls_b.saturating_sub(calls_a) as f64 / n);
        resources.redis_exec_us_per_request = Some(usec_b.saturating_sub(usec_a) as f64 / n);
        let scripts = |s: &CommandStats| {
            let (evalsha, evalsha_us) = s.get("evalsha");
            let (fcall, fcall_us) = s.get("fcall");
            (evalsha + fcall, evalsha_us + fcall_us)
        };
        let (sc_a, su_a) = scripts(a);
        let (sc_b, su_b) = scripts(b);
        let calls = sc_b.saturating_sub(sc_a);
        resources.script_calls = Some(calls);
        if calls > 0 {
            resources.script_us_per_call = Some(su_b.saturating_sub(su_a) as f64 / calls as f64);
        }
        for (name, (calls_after, _)) in &b.commands {
            let calls = calls_after.saturating_sub(a.get(name).0);
            if calls > 0 {
                resources.redis_calls.insert(name.clone(), calls);
            }
        }
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_parse() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=150,usec_per_call=15.00,rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=2,usec=1,usec_per_call=0.50\r\n";
        let stats = CommandStats::parse(info);
        assert_eq!(stats.get("evalsha"), (10, 150));
        assert_eq!(stats.total(), (12, 151));
    }

    fn node(addr: &str, primary: bool, cpu: Option<f64>, info: Option<&str>) -> NodeSample {
        NodeSample {
            addr: addr.to_string(),
            primary,
            cpu,
            stats: info.map(CommandStats::parse),
            forks: Some(1),
        }
    }

    #[test]
    fn commandstats_of_primaries_add_up() {
        let a = CommandStats::parse(
            "cmdstat_evalsha:calls=10,usec=150\r\ncmdstat_get:calls=4,usec=8\r\n",
        );
        let b = CommandStats::parse(
            "cmdstat_evalsha:calls=5,usec=50\r\ncmdstat_info:calls=1,usec=20\r\n",
        );
        let sum = CommandStats::sum([&a, &b]);
        assert_eq!(sum.get("evalsha"), (15, 200));
        assert_eq!(sum.get("get"), (4, 8));
        assert_eq!(sum.get("info"), (1, 20));
        assert_eq!(sum.total(), (20, 228));
        assert_eq!(CommandStats::sum([]).total(), (0, 0));
    }

    #[test]
    fn a_cluster_snapshot_sums_its_primaries() {
        let pids = Pids::default();
        let nodes = vec![
            node(
                "127.0.0.1:7390",
                true,
                Some(1.0),
                Some("cmdstat_evalsha:calls=10,usec=100"),
            ),
            node(
                "127.0.0.1:7391",
                true,
                Some(2.0),
                Some("cmdstat_evalsha:calls=30,usec=300"),
            ),
            node("127.0.0.1:7393", false, Some(0.5), None),
        ];
        let s = Snapshot::take(&pids, None, None).with_nodes(nodes.clone());
        assert_eq!(s.redis_stats.as_ref().unwrap().get("evalsha"), (40, 400));
        assert_eq!(s.redis_cpu, Some(3.0));
        assert_eq!(s.redis_replica_cpu, Some(0.5));
        assert_eq!(s.redis_forks, Some(3));
        // A primary that could not be read blanks the sums rather than shrink them.
        let mut partial = nodes.clone();
        partial[1].stats = None;
        partial[1].cpu = None;
        let s = Snapshot::take(&pids, None, None).with_nodes(partial);
        assert!(s.redis_stats.is_none() && s.redis_cpu.is_none());
        let s = Snapshot::take(&pids, None, None).with_nodes(Vec::new());
        assert!(s.redis_stats.is_none() && s.redis_cpu.is_none() && s.redis_forks.is_none());
    }

    #[test]
    fn each_primary_gets_its_share() {
        let before = vec![
            node(
                "127.0.0.1:7390",
                true,
                Some(10.0),
                Some("cmdstat_evalsha:calls=100,usec=1000"),
            ),
            node(
                "127.0.0.1:7391",
                true,
                Some(20.0),
                Some("cmdstat_get:calls=0,usec=0"),
            ),
            node(
                "127.0.0.1:7392",
                true,
                Some(30.0),
                Some("cmdstat_get:calls=5,usec=5"),
            ),
            node("127.0.0.1:7393", false, Some(1.0), None),
        ];
        let after = vec![
            // 7390: 340 calls, 3000 usec, 1.5 s of CPU; 7391: 330, 500, 0.25 s;
            // 7392: 330, 1500, 0.25 s.
            node(
                "127.0.0.1:7390",
                true,
                Some(11.5),
                Some("cmdstat_evalsha:calls=440,usec=4000"),
            ),
            node(
                "127.0.0.1:7391",
                true,
                Some(20.25),
                Some("cmdstat_get:calls=330,usec=500"),
            ),
            node(
                "127.0.0.1:7392",
                true,
                Some(30.25),
                Some("cmdstat_get:calls=335,usec=1505"),
            ),
            node("127.0.0.1:7393", false, Some(1.5), None),
        ];
        let shares = primary_shares(&before, &after, 2.0, 1000);
        let got: Vec<(&str, u64, u64)> = shares
            .iter()
            .map(|s| (s.node.as_str(), s.calls, s.exec_usec))
            .collect();
        assert_eq!(
            got,
            vec![
                ("127.0.0.1:7390", 340, 3000),
                ("127.0.0.1:7391", 330, 500),
                ("127.0.0.1:7392", 330, 1500)
            ]
        );
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(shares[0].calls_share, 0.34) && close(shares[1].calls_share, 0.33));
        assert!(close(shares[0].exec_share, 0.6) && close(shares[1].exec_share, 0.1));
        assert!(close(shares[0].cpu_share.unwrap(), 0.75));
        assert!(close(shares[0].cores.unwrap(), 0.75));
        assert!(close(shares[0].cpu_us_per_request.unwrap(), 1500.0));
        assert!(close(
            shares.iter().map(|s| s.calls_share).sum::<f64>(),
            1.0
        ));

        // A primary without a pid: no CPU shares for anyone, calls still shared.
        let mut no_pid = after.clone();
        no_pid[2].cpu = None;
        let shares = primary_shares(&before, &no_pid, 2.0, 1000);
        assert!(shares.iter().all(|s| s.cpu_share.is_none()));
        assert!(shares[0].cpu_us_per_request.is_some() && shares[2].cpu_us_per_request.is_none());
        // A primary new since the first sample (a failover) is left out; no work at all
        // shares nothing rather than dividing by zero.
        let shares = primary_shares(&before[..1], &before, 1.0, 0);
        assert_eq!(shares.len(), 1);
        assert_eq!((shares[0].calls, shares[0].calls_share), (0, 0.0));
    }

    #[test]
    fn a_single_redis_reports_no_primaries() {
        let pids = Pids::default();
        let a = Snapshot::take(
            &pids,
            Some(CommandStats::parse("cmdstat_get:calls=1,usec=1")),
            Some(0),
        );
        let b = Snapshot::take(
            &pids,
            Some(CommandStats::parse("cmdstat_get:calls=3,usec=2")),
            Some(0),
        );
        let r = delta(&a, &b, 2);
        assert!(r.redis_primaries.is_empty() && r.redis_replica_cores.is_none());
        assert_eq!(r.redis_commands_per_request, Some(1.0));
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("redis_primaries").is_none() && json.get("redis_replica_cores").is_none());
    }

    #[test]
    fn this_process_is_measurable() {
        assert!(cpu_seconds("self").is_some());
        assert!(rss_kb(std::process::id()).unwrap() > 0);
    }
}

#[cfg(test)]
mod gateway_binary_tests {
    use super::profile_of;

    #[test]
    fn the_profile_comes_from_the_version_else_the_path() {
        assert_eq!(
            profile_of(
                Some("flashgate 0.1.0 (debug build)"),
                Some("/usr/bin/flashgate")
            ),
            "debug"
        );
        assert_eq!(
            profile_of(Some("flashgate 0.1.0 (release build)"), None),
            "release"
        );
        assert_eq!(
            profile_of(Some("flashgate 0.1.0"), Some("/w/target/debug/flashgate")),
            "debug"
        );
        assert_eq!(
            profile_of(None, Some("/w/target/release/flashgate")),
            "release"
        );
        assert_eq!(
            profile_of(Some("flashgate 0.1.0"), Some("/usr/bin/flashgate")),
            "unknown"
        );
        assert_eq!(profile_of(None, None), "unknown");
    }
}
