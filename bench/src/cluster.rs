//! The gateway's Redis Cluster, for statistics (`--redis-cluster`): its nodes found
//! with `CLUSTER NODES` on the first `--redis-url` node that answers, one connection
//! to each, and what each says (INFO commandstats of the primaries, total_forks and
//! the pid of every node, for its CPU from /proc).
//!
//! The harness sees the cluster as it was when the run started: a failover during the
//! run leaves the new primary out (its figures count as a replica's CPU, its calls not
//! at all) and makes the old one's figures missing, so the Redis lines go blank.

use anyhow::{bail, Context, Result};
use redis::aio::MultiplexedConnection;
use std::time::Duration;

use crate::probe::{self, CommandStats, NodeSample};

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    /// `host:port` (the client port; the bus port and hostname are dropped).
    pub addr: String,
    /// A primary (`master` flag) not marked failed.
    pub primary: bool,
    /// The id of its primary, for a replica.
    pub primary_id: Option<String>,
    /// Marked `fail`, `fail?`, `handshake` or `noaddr`: nothing to ask.
    pub unusable: bool,
    /// The slot ranges it serves (inclusive), importing/migrating entries left out.
    pub slots: Vec<(u16, u16)>,
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <primary id | ->
/// <ping-sent> <pong-recv> <config-epoch> <link-state> <slot ranges...>`. Lines that do
/// not have that shape are skipped.
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    let mut nodes = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let addr = fields[1]
            .split(',')
            .next()
            .unwrap_or("")
            .split('@')
            .next()
            .unwrap_or("");
        let flags: Vec<&str> = fields[2].split(',').collect();
        let unusable = addr.is_empty()
            || addr.starts_with(':')
            || flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"));
        let slots = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|one| (one, one)),
            })
            .collect();
        nodes.push(ClusterNode {
            id: fields[0].to_string(),
            addr: addr.to_string(),
            primary: flags.contains(&"master") && !unusable,
            primary_id: (fields[3] != "-").then(|| fields[3].to_string()),
            unusable,
            slots,
        });
    }
    // Ordered by host, then port as a number.
    nodes.sort_by_key(|n| addr_key(&n.addr));
    nodes
}

fn addr_key(addr: &str) -> (String, u32) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

/// The URL of a node at `addr` (`host:port`) with the credentials of `seed` (a
/// `redis://[user:password@]host:port[/db]` URL; a cluster has no db).
pub fn node_url(seed: &str, addr: &str) -> String {
    let rest = seed.strip_prefix("redis://").unwrap_or(seed);
    let authority = rest.split('/').next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => format!("redis://{userinfo}@{addr}"),
        None => format!("redis://{addr}"),
    }
}

/// `127.0.0.1:7390`, `127.0.0.1:7391` → `127.0.0.1:7390`, `7391`: the host once.
pub fn short_addrs(addrs: &[&str]) -> Vec<String> {
    let first_host = addrs
        .first()
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h);
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| match addr.rsplit_once(':') {
            Some((host, port)) if i > 0 && Some(host) == first_host => port.to_string(),
            _ => addr.to_string(),
        })
        .collect()
}

/// A node the harness talks to.
pub struct Node {
    pub info: ClusterNode,
    /// Its process on this machine (INFO server `process_id`, checked in /proc).
    pub pid: Option<u32>,
    pub version: Option<String>,
    conn: Option<MultiplexedConnection>,
}

pub struct Cluster {
    /// Primaries first, then replicas, each by address.
    pub nodes: Vec<Node>,
}

async fn connect(url: &str) -> Option<MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
}

/// INFO `section` of a Redis server (None when unreachable or refused).
pub async fn info(conn: &mut Option<MultiplexedConnection>, section: &str) -> Option<String> {
    let c = conn.as_mut()?;
    redis::cmd("INFO").arg(section).query_async(c).await.ok()
}

/// A setting of a Redis server by CONFIG GET (None when unreachable or refused).
pub async fn config_get(conn: Option<&mut MultiplexedConnection>, name: &str) -> Option<String> {
    redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async::<Vec<String>>(conn?)
        .await
        .ok()
        .and_then(|v| v.get(1).cloned())
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

impl Cluster {
    /// Asks the `urls` in turn for `CLUSTER NODES`, then connects to every usable node.
    pub async fn discover(urls: &[String]) -> Result<Cluster> {
        let mut found = None;
        let mut errors = Vec::new();
        for url in urls {
            let Some(mut conn) = connect(url).await else {
                errors.push(format!("{url}: unreachable"));
                continue;
            };
            match redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
            {
                Ok(text) => {
                    found = Some((url.clone(), text));
                    break;
                }
                Err(e) => errors.push(format!("{url}: CLUSTER NODES: {e}")),
            }
        }
        let Some((seed, text)) = found else {
            bail!("no cluster node answered ({})", errors.join("; "));
        };
        let mut listed = parse_cluster_nodes(&text);
        listed.retain(|n| !n.unusable);
        listed.sort_by_key(|n| !n.primary);
        if !listed.iter().any(|n| n.primary) {
            bail!("CLUSTER NODES on {seed} lists no primary");
        }
        let mut nodes = Vec::new();
        for info_line in listed {
            let mut conn = connect(&node_url(&seed, &info_line.addr)).await;
            let server = self::info(&mut conn, "server").await.unwrap_or_default();
            let pid = info_field(&server, "process_id")
                .and_then(|p| p.parse().ok())
                .filter(|pid: &u32| std::path::Path::new(&format!("/proc/{pid}")).exists());
            nodes.push(Node {
                version: info_field(&server, "redis_version").map(str::to_string),
                info: info_line,
                pid,
                conn,
            });
        }
        Ok(Cluster { nodes })
    }

    pub fn primaries(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.info.primary)
    }

    /// One line for the run's header.
    pub async fn describe(&mut self) -> String {
        let version = self
            .nodes
            .iter()
            .find_map(|n| n.version.clone())
            .unwrap_or_else(|| "?".into());
        let pid = |n: &Node| n.pid.map_or("pid ?".into(), |p| format!("pid {p}"));
        let primaries: Vec<String> = self
            .primaries()
            .map(|n| {
                let slots: Vec<String> = n
                    .info
                    .slots
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                format!(
                    "{} ({}{}{})",
                    n.info.addr,
                    pid(n),
                    if slots.is_empty() { "" } else { ", slots " },
                    slots.join(" ")
                )
            })
            .collect();
        let replicas: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.info.primary)
            .map(|n| format!("{} ({})", n.info.addr, pid(n)))
            .collect();
        let unreachable: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.conn.is_none())
            .map(|n| n.info.addr.clone())
            .collect();
        let mut aof = Vec::new();
        for node in self.nodes.iter_mut().filter(|n| n.info.primary) {
            let persistence = info(&mut node.conn, "persistence")
                .await
                .unwrap_or_default();
            aof.push(info_field(&persistence, "aof_enabled").map(|v| v == "1"));
        }
        let any = self.nodes.iter_mut().find_map(|n| n.conn.as_mut());
        let appendfsync = config_get(any, "appendfsync").await;
        format!(
            "Redis Cluster {version}: {} primaries {}; {} replicas {}; AOF {}{}{}",
            primaries.len(),
            primaries.join(", "),
            replicas.len(),
            replicas.join(", "),
            if aof.iter().all(|a| *a == Some(true)) {
                "on"
            } else if aof.iter().all(|a| *a == Some(false)) {
                "off"
            } else {
                "?"
            },
            appendfsync
                .map(|f| format!(" (appendfsync {f})"))
                .unwrap_or_default(),
            if unreachable.is_empty() {
                String::new()
            } else {
                format!("; UNREACHABLE: {}", unreachable.join(", "))
            }
        )
    }

    /// Every node now: commandstats of the primaries, forks and CPU of all.
    pub async fn sample(&mut self) -> Vec<NodeSample> {
        let mut samples = Vec::with_capacity(self.nodes.len());
        for node in &mut self.nodes {
            let stats = if node.info.primary {
                info(&mut node.conn, "commandstats")
                    .await
                    .map(|i| CommandStats::parse(&i))
            } else {
                None
            };
            let forks = info(&mut node.conn, "stats")
                .await
                .and_then(|i| info_field(&i, "total_forks").and_then(|v| v.parse().ok()));
            samples.push(NodeSample {
                addr: node.info.addr.clone(),
                primary: node.info.primary,
                cpu: None,
                stats,
                forks,
            });
        }
        // The CPU of every node at (nearly) one instant, after the round trips.
        for (sample, node) in samples.iter_mut().zip(&self.nodes) {
            sample.cpu = node.pid.and_then(|p| probe::cpu_seconds(&p.to_string()));
        }
        samples
    }

    /// SCARD of a key on the primary serving its slot (asked with CLUSTER KEYSLOT).
    pub async fn scard(&mut self, key: &str) -> Result<u64> {
        let conn = self
            .nodes
            .iter_mut()
            .find_map(|n| n.conn.as_mut())
            .context("no node reachable")?;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(conn)
            .await?;
        let owner = self
            .nodes
            .iter_mut()
            .filter(|n| n.info.primary)
            .find(|n| n.info.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .with_context(|| format!("no primary serves slot {slot}"))?;
        let conn = owner.conn.as_mut().context("its primary is unreachable")?;
        Ok(redis::cmd("SCARD").arg(key).query_async(conn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CLUSTER NODES` of `scripts/dev cluster` (Redis 7, one replica per primary),
    /// after one failover: 7393 took over from 7390, which failed.
    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:7394@17394,host-b slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:7391@17391 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:7392@17392 master - 0 1426238318243 3 connected 10923-16383 [16000->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:7395@17395 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:7393@17393 myself,master - 0 0 6 connected 0-5459 5460
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:7390@17390 master,fail - 1426238316232 1426238315000 1 disconnected
";

    #[test]
    fn cluster_nodes_give_the_primaries_and_their_slots() {
        let nodes = parse_cluster_nodes(NODES);
        assert_eq!(nodes.len(), 6);
        let primaries: Vec<(&str, &[(u16, u16)])> = nodes
            .iter()
            .filter(|n| n.primary)
            .map(|n| (n.addr.as_str(), n.slots.as_slice()))
            .collect();
        assert_eq!(
            primaries,
            vec![
                ("127.0.0.1:7391", &[(5461, 10922)][..]),
                ("127.0.0.1:7392", &[(10923, 16383)][..]),
                ("127.0.0.1:7393", &[(0, 5459), (5460, 5460)][..]),
            ],
            "the failed 7390 is no primary; a migrating entry is no range"
        );
        let failed = nodes.iter().find(|n| n.addr == "127.0.0.1:7390").unwrap();
        assert!(failed.unusable && !failed.primary);
        let replica = nodes.iter().find(|n| n.addr == "127.0.0.1:7394").unwrap();
        assert!(!replica.primary && !replica.unusable, "hostname dropped");
        assert_eq!(
            replica.primary_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert!(parse_cluster_nodes("ERR This instance has cluster support disabled\n").is_empty());
    }

    #[test]
    fn node_urls_keep_the_credentials_and_drop_the_db() {
        assert_eq!(
            node_url("redis://127.0.0.1:7390", "127.0.0.1:7392"),
            "redis://127.0.0.1:7392"
        );
        assert_eq!(
            node_url("redis://user:secret@10.0.0.1:7000/0", "10.0.0.2:7001"),
            "redis://user:secret@10.0.0.2:7001"
        );
    }

    #[test]
    fn addresses_shorten_to_their_ports() {
        assert_eq!(
            short_addrs(&["127.0.0.1:7390", "127.0.0.1:7391", "10.0.0.1:7392"]),
            vec!["127.0.0.1:7390", "7391", "10.0.0.1:7392"]
        );
        assert!(short_addrs(&[]).is_empty());
    }
}
