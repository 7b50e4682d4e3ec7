//! `--baseline redis`: the raw Redis ceiling. `redis-benchmark` sends the gateway's own
//! reserve script (EVALSHA, same SHA as the gateway's) at the same concurrency, with
//! `__rand_int__` making users, idempotency keys and reservation ids distinct. Two
//! throwaway SKUs outside the gateway's SKU index: one with stock to spare (the
//! success path, the ratio's denominator) and one with none (the sold-out path, for
//! context). Their keys are deleted afterwards.

use anyhow::{anyhow, bail, Context, Result};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::time::Duration;

use crate::gateway;

/// The success-path SKU gets this much stock (src/limits.rs STOCK_MAX): never sold out.
const HUGE_STOCK: u64 = 1_000_000_000_000;
/// `__rand_int__` range: 10^8 values, rendered as 12 digits.
const KEYSPACE: u64 = 100_000_000;
/// redis-benchmark gives up after this long (it runs until -n requests are answered).
const TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Serialize)]
pub struct RedisBenchmark {
    pub path: &'static str,
    /// Seconds since the run started, and how long redis-benchmark ran.
    pub started_at_s: f64,
    pub duration_s: f64,
    pub command: String,
    pub requests: u64,
    pub rps: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The calls really took that path (checked on the SKU's counters afterwards).
    pub verified: bool,
    pub note: String,
}

pub struct Outcome {
    pub sha: String,
    /// The running gateway's function library holds this very lib.lua and reserve.lua.
    pub gateway_has_script: bool,
    pub runs: Vec<RedisBenchmark>,
}

pub(crate) struct RedisTarget {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) db: Option<u32>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
}

pub(crate) fn parse_url(url: &str) -> Result<RedisTarget> {
    let rest = url
        .strip_prefix("redis://")
        .context("--redis-url must be redis://")?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hostport, db) = match rest.split_once('/') {
        Some((hp, db)) if !db.is_empty() => (hp, Some(db.parse().context("redis db number")?)),
        Some((hp, _)) => (hp, None),
        None => (rest, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().context("redis port")?),
        None => (hostport.to_string(), 6379),
    };
    let (user, password) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
            None => (None, Some(a.to_string())),
        },
        None => (None, None),
    };
    Ok(RedisTarget {
        host,
        port,
        db,
        user,
        password,
    })
}

fn shell_quote(arg: &str) -> String {
    if arg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,".contains(&b))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

async fn define(conn: &mut MultiplexedConnection, sku: &str, stock: u64) -> Result<()> {
    let script = redis::Script::new(&gateway::load_sku_script());
    let mut invocation = script.prepare_invoke();
    for key in gateway::sale_keys(sku) {
        invocation.key(key);
    }
    let reply: Vec<String> = invocation
        .arg(stock)
        .arg(1_000_000_000u64) // per-user limit: random users may repeat
        .arg(600_000u64)
        .arg("")
        .arg("")
        .arg(0)
        .arg(gateway::RESERVE_RECLAIM_BATCH) // due holds expired before the check
        .arg("0") // apply, not only check
        .arg(1) // one bucket
        .arg("") // set the stock, not a change
        .arg(stock) // the SKU's stock over its buckets
        .invoke_async(conn)
        .await?;
    // 'ok' (redefined) or 'created' depending on the revision of lua/load_sku.lua;
    // what counts is the state it left.
    let available: Option<u64> = redis::cmd("HGET")
        .arg(gateway::key(sku, "meta"))
        .arg("available")
        .query_async(conn)
        .await?;
    if !matches!(reply.first().map(String::as_str), Some("ok" | "created"))
        || available != Some(stock)
    {
        bail!("defining {sku} in Redis: {reply:?}, available {available:?}");
    }
    Ok(())
}

async fn delete_sku_keys(conn: &mut MultiplexedConnection, sku: &str) -> Result<u64> {
    crate::scale::delete_matching(conn, &format!("fg:{{{sku}}}:*"), true).await
}

fn parse_csv(stdout: &str) -> Result<[f64; 7]> {
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('"') && !l.starts_with("\"test\""))
        .ok_or_else(|| anyhow!("no result line in redis-benchmark's output: {stdout:?}"))?;
    let fields: Vec<&str> = line.trim().trim_matches('"').split("\",\"").collect();
    if fields.len() < 8 {
        bail!("unexpected redis-benchmark CSV line: {line}");
    }
    let n = |i: usize| -> Result<f64> {
        fields[i]
            .parse()
            .with_context(|| format!("redis-benchmark CSV field {i}: {:?}", fields[i]))
    };
    Ok([n(1)?, n(2)?, n(3)?, n(4)?, n(5)?, n(6)?, n(7)?])
}

pub fn installed(binary: &str) -> bool {
    std::process::Command::new(binary)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub async fn run(
    binary: &str,
    redis_url: &str,
    concurrency: usize,
    requests: u64,
    sku_base: &str,
    run_start: std::time::Instant,
) -> Result<Outcome> {
    let target = parse_url(redis_url)?;
    let mut conn = crate::redis_connection(redis_url).await?;
    let script = redis::Script::new(&gateway::reserve_script());
    let sha = script.get_hash().to_string();
    let gateway_has_script = gateway::gateway_runs_this_reserve(&mut conn).await?;
    let loaded = script.prepare_invoke().load_async(&mut conn).await?;
    if loaded != sha {
        bail!("SCRIPT LOAD answered {loaded}, expected {sha}");
    }

    let mut runs = Vec::new();
    for (path, suffix, stock) in [("success", "rb", HUGE_STOCK), ("sold_out", "rbso", 0)] {
        let sku = format!("{sku_base}-{suffix}");
        define(&mut conn, &sku, stock).await?;
        let user = "rbu__rand_int__"; // 15 characters once __rand_int__ is 12 digits
        let mut argv: Vec<String> = vec![
            "-h".into(),
            target.host.clone(),
            "-p".into(),
            target.port.to_string(),
        ];
        if let Some(db) = target.db {
            argv.extend(["--dbnum".into(), db.to_string()]);
        }
        if let Some(u) = &target.user {
            argv.extend(["--user".into(), u.clone()]);
        }
        let password_args = target
            .password
            .as_ref()
            .map(|p| vec!["-a".to_string(), p.clone()])
            .unwrap_or_default();
        argv.extend([
            "-c".into(),
            concurrency.to_string(),
            "-n".into(),
            requests.to_string(),
            "-r".into(),
            KEYSPACE.to_string(),
            "--csv".into(),
            "EVALSHA".into(),
            sha.clone(),
            "10".into(),
        ]);
        argv.extend(gateway::sale_keys(&sku));
        argv.extend([
            gateway::idempotency_key(&sku, user, "k__rand_int__"),
            user.into(),
            "1".into(),
            "rb__rand_int__".into(),
            "k__rand_int__".into(),
            gateway::IDEMPOTENCY_TTL_MS.to_string(),
            gateway::PAYMENT_GRACE_MS.to_string(),
            gateway::RESERVE_RECLAIM_BATCH.to_string(),
        ]);
        let command = std::iter::once(binary.to_string())
            .chain(argv.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        println!("  $ {command}");
        let started = std::time::Instant::now();
        let child = tokio::process::Command::new(binary)
            .args(&argv)
            .args(&password_args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(TIMEOUT, child)
            .await
            .map_err(|_| {
                anyhow!(
                    "redis-benchmark did not finish within {} s",
                    TIMEOUT.as_secs()
                )
            })?
            .context("running redis-benchmark")?;
        let ran = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "redis-benchmark failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let [rps, avg, _min, p50, p95, p99, max] = parse_csv(&stdout)?;
        // Did the calls take the intended path? Success: every call is a hold.
        let held: Option<u64> = redis::cmd("HGET")
            .arg(gateway::key(&sku, "meta"))
            .arg("held")
            .query_async(&mut conn)
            .await?;
        let held = held.unwrap_or(0);
        let (verified, note) = match path {
            "success" => (
                held == requests,
                format!("{held} holds created by {requests} calls"),
            ),
            _ => (held == 0, format!("{held} holds on a SKU without stock")),
        };
        let deleted = match delete_sku_keys(&mut conn, &sku).await {
            Ok(n) => format!("{n} keys deleted afterwards"),
            Err(e) => format!("deleting its keys failed ({e}): delete fg:{{{sku}}}:* by hand"),
        };
        runs.push(RedisBenchmark {
            path,
            started_at_s: started.duration_since(run_start).as_secs_f64(),
            duration_s: ran.as_secs_f64(),
            command,
            requests,
            rps,
            avg_ms: avg,
            p50_ms: p50,
            p95_ms: p95,
            p99_ms: p99,
            max_ms: max,
            verified,
            note: format!("{note}; {deleted}"),
        });
    }
    Ok(Outcome {
        sha,
        gateway_has_script,
        runs,
    })
}

/// With AOF on, rewrites it and waits (at most a minute) until the rewrite is done.
/// None when AOF is off. The baseline writes and deletes hundreds of thousands of keys:
/// without this, the automatic rewrite they provoke would fork Redis during the
/// gateway's reserve phase and be charged to the gateway.
pub async fn compact_aof(conn: &mut MultiplexedConnection) -> Result<Option<Duration>> {
    let persistence = |info: &str, field: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(conn)
        .await?;
    if persistence(&info, "aof_enabled").as_deref() != Some("1") {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    // An error here is a rewrite already running: waiting for it is as good.
    let _: redis::RedisResult<String> = redis::cmd("BGREWRITEAOF").query_async(conn).await;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(conn)
            .await?;
        let busy = ["aof_rewrite_in_progress", "aof_rewrite_scheduled"]
            .iter()
            .any(|f| persistence(&info, f).as_deref() == Some("1"));
        if !busy {
            return Ok(Some(started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("still rewriting after 60 s");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_parse() {
        let t = parse_url("redis://127.0.0.1:6390").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6390, None));
        let t = parse_url("redis://:secret@localhost:7000/2").unwrap();
        assert_eq!(
            (t.port, t.db, t.password.as_deref()),
            (7000, Some(2), Some("secret"))
        );
    }

    #[test]
    fn csv_parses() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"EVALSHA abc 5 fg:{s}:meta\",\"41152.26\",\"5.972\",\"0.704\",\"5.879\",\"7.399\",\"7.863\",\"17.487\"\n";
        let v = parse_csv(out).unwrap();
        assert_eq!(v[0], 41152.26);
        assert_eq!(v[5], 7.863);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-c"), "-c");
        assert_eq!(shell_quote("fg:{s}:meta"), "'fg:{s}:meta'");
    }
}
