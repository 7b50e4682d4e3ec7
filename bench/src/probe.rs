//! What the processes under test cost: RSS and CPU time from /proc (Linux), and
//! Redis command statistics (INFO commandstats), sampled around each phase.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ; 100 on every Linux
/// architecture flashgate runs on).
const CLOCK_TICKS: f64 = 100.0;

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
        }
    }
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
    /// EVALSHA calls in the phase and their mean execution time inside Redis.
    pub evalsha_calls: Option<u64>,
    pub evalsha_us_per_call: Option<f64>,
    /// Each command's calls in the phase (those called at least once).
    pub redis_calls: BTreeMap<String, u64>,
    /// Forks of Redis in the phase (AOF rewrite, BGSAVE).
    pub redis_forks: Option<u64>,
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
    let ours = [gateway, redis, mysql, bench].iter().flatten().sum::<f64>();
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
        evalsha_calls: None,
        evalsha_us_per_call: None,
        redis_calls: BTreeMap::new(),
        redis_forks: match (before.redis_forks, after.redis_forks) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    };
    if let (Some(a), Some(b)) = (&before.redis_stats, &after.redis_stats) {
        let (calls_a, usec_a) = a.total();
        let (calls_b, usec_b) = b.total();
        resources.redis_commands_per_request = Some(calls_b.saturating_sub(calls_a) as f64 / n);
        resources.redis_exec_us_per_request = Some(usec_b.saturating_sub(usec_a) as f64 / n);
        let (ec_a, eu_a) = a.get("evalsha");
        let (ec_b, eu_b) = b.get("evalsha");
        let calls = ec_b.saturating_sub(ec_a);
        resources.evalsha_calls = Some(calls);
        if calls > 0 {
            resources.evalsha_us_per_call = Some(eu_b.saturating_sub(eu_a) as f64 / calls as f64);
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

    #[test]
    fn this_process_is_measurable() {
        assert!(cpu_seconds("self").is_some());
        assert!(rss_kb(std::process::id()).unwrap() > 0);
    }
}
