//! The same scripts on Redis Cluster: three primaries, SKUs spread over their slots,
//! every key of a SKU in one slot thanks to the `{sku}` hash tag.

use crate::common::*;
use crate::support::{free_port, tool, Proc, TempDir};
use flashgate::reconcile;
use reqwest::StatusCode;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct ClusterNode {
    port: u16,
    bus_port: u16,
    extra: Vec<String>,
    dir: TempDir,
    proc: Proc,
}

/// A cluster node; `extra` are more redis-server options.
fn start_node_with(extra: &[&str]) -> ClusterNode {
    let port = free_port();
    // The bus port would default to port + 10000, outside the ports free_port hands
    // out (and possibly in the ephemeral range): pick it the same way.
    let bus_port = free_port();
    let dir = TempDir::new("cluster");
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let proc = spawn_node(port, bus_port, &extra, &dir);
    ClusterNode {
        port,
        bus_port,
        extra,
        dir,
        proc,
    }
}

fn spawn_node(port: u16, bus_port: u16, extra: &[String], dir: &TempDir) -> Proc {
    let mut command = Command::new(tool("FLASHGATE_TEST_REDIS_SERVER", "/usr/bin/redis-server"));
    command
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--cluster-enabled", "yes"])
        .args(["--cluster-port", &bus_port.to_string()])
        .args(extra)
        .arg("--dir")
        .arg(dir.path())
        .arg("--cluster-config-file")
        .arg(dir.path().join("nodes.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn("redis-server (cluster)", &mut command)
}

impl ClusterNode {
    /// Starts the node again with its cluster config: it rejoins the cluster (a primary
    /// that was failed over comes back as a replica of its successor).
    fn restart(&mut self) {
        self.proc = spawn_node(self.port, self.bus_port, &self.extra, &self.dir);
    }
}

async fn cluster_state_ok(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await;
    info.is_ok_and(|i| i.contains("cluster_state:ok"))
}

#[tokio::test]
async fn the_scripts_run_unchanged_on_redis_cluster() {
    let nodes = three_primaries(&[]).await;
    let addresses: Vec<String> = nodes.iter().map(address).collect();

    let urls: Vec<String> = addresses.iter().map(|a| format!("redis://{a}")).collect();
    let mut args = serve_args(&urls.join(","), &database_url());
    args.redis.redis_cluster = true;
    let app = spawn_app_with(args).await;
    let (status, ready) = body(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    // The script library is on every primary (FUNCTION LOAD goes to each). One that
    // loses it gets it back from the first call it answers "Function not found".
    let library_on = |port: u16| async move {
        let listed: Vec<redis::Value> = query(
            port,
            redis::cmd("FUNCTION")
                .arg("LIST")
                .arg("LIBRARYNAME")
                .arg(&flashgate::lua::LIBRARY.name),
        )
        .await;
        !listed.is_empty()
    };
    for node in &nodes {
        assert!(library_on(node.port).await, "library on {}", node.port);
    }
    let _: () = query(nodes[1].port, redis::cmd("FUNCTION").arg("FLUSH")).await;
    assert!(!library_on(nodes[1].port).await);

    // Enough SKUs that their slots land on every node; the first on the node that lost
    // the library.
    let mut skus: Vec<String> = (0..6).map(|_| unique_sku("cluster")).collect();
    while !serves(nodes[1].port, &skus[0]).await {
        skus[0] = unique_sku("cluster");
    }
    for sku in &skus {
        app.create_sku(sku, json!({"stock": 3, "hold_seconds": 1}))
            .await;
        let sold = app.hold(sku, "buyer").await;
        let (status, view) = app.confirm(&sold, "pay").await;
        assert_eq!(status, StatusCode::OK, "{view}");
        let cancelled = app.hold(sku, "canceller").await;
        let (status, _) = app.cancel(&cancelled, SERVICE_TOKEN).await;
        assert_eq!(status, StatusCode::OK);
        let (status, problem) = app.confirm(&cancelled, "late-pay").await;
        assert_eq!(
            (status, &problem["refund_required"]),
            (StatusCode::CONFLICT, &json!(true))
        );
        app.hold(sku, "abandoner").await;
        // Batched: several reserves of one SKU at once.
        let racers: Vec<String> = (0..4).map(|i| format!("racer{i}")).collect();
        let answers =
            futures::future::join_all(racers.iter().map(|user| app.reserve(sku, user, "k", 1)))
                .await;
        assert_eq!(
            answers
                .iter()
                .filter(|(s, _)| *s == StatusCode::CREATED)
                .count(),
            1
        );
    }
    assert!(library_on(nodes[1].port).await, "loaded again");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.worker.sweep_once().await.unwrap();
    for sku in &skus {
        let view = app.assert_stock_adds_up(sku).await;
        assert_eq!(
            (view["sold"].as_u64(), view["held"].as_u64()),
            (Some(1), Some(0)),
            "{view}"
        );
        app.flush(sku).await;
        assert_eq!(app.mysql_sold(sku).await, 1);
        assert_eq!(app.mysql_compensations(sku).await, 1);
        let report = reconcile::run(&app.store, &app.db, Some(&TestApp::sku_id(sku)), false)
            .await
            .unwrap();
        assert_eq!(report.exit_code(), 0, "{:?}", report.findings);
    }
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// Whether `port`'s node serves `sku`'s slot (as its own `CLUSTER NODES` line says).
async fn serves(port: u16, sku: &str) -> bool {
    let slot: u16 = query(
        port,
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("fg:{{{sku}}}:meta")),
    )
    .await;
    let nodes: String = query(port, redis::cmd("CLUSTER").arg("NODES")).await;
    let me = nodes.lines().find(|l| l.contains("myself")).unwrap();
    me.split_whitespace().skip(8).any(|range| {
        let (from, to) = range.split_once('-').unwrap_or((range, range));
        match (from.parse::<u16>(), to.parse::<u16>()) {
            (Ok(from), Ok(to)) => (from..=to).contains(&slot),
            _ => false,
        }
    })
}

/// FLASHGATE_REDIS_WAIT_REPLICAS on a cluster waits for the replicas of the primary
/// that ran the confirm, not for the least over every primary: with one replica on
/// one primary only, confirms of its SKUs are answered 200, those of another
/// primary's SKUs 503 (no replica there to acknowledge).
/// Three primaries, and a fourth node replicating the first one only (synced).
/// `extra`: more redis-server options for every node.
async fn cluster_with_one_replica(extra: &[&str]) -> Vec<ClusterNode> {
    let mut nodes = three_primaries(extra).await;
    add_replica(&mut nodes, 0, extra).await;
    nodes
}

fn address(node: &ClusterNode) -> String {
    format!("127.0.0.1:{}", node.port)
}

/// Two SKUs: one served by the first node, one by another primary.
async fn skus_on_and_off(first: &ClusterNode) -> (String, String) {
    let mut on = None;
    let mut off = None;
    while on.is_none() || off.is_none() {
        let sku = unique_sku("shard");
        if serves(first.port, &sku).await {
            on.get_or_insert(sku);
        } else {
            off.get_or_insert(sku);
        }
    }
    (on.unwrap(), off.unwrap())
}

/// Gateway settings for a cluster reached through `nodes`.
fn cluster_serve_args(nodes: &[ClusterNode]) -> flashgate::config::ServeArgs {
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("redis://{}", address(n)))
        .collect();
    let mut args = serve_args(&urls.join(","), &database_url());
    args.redis.redis_cluster = true;
    args
}

/// Gateway settings for the three primaries, waiting for one replica.
fn cluster_args(nodes: &[ClusterNode]) -> flashgate::config::ServeArgs {
    let mut args = cluster_serve_args(&nodes[..3]);
    args.redis.redis_wait_replicas = 1;
    // Long enough for a replica on a loaded machine, short enough for the 503s.
    args.redis.redis_wait_timeout_ms = 1_000;
    args
}

#[tokio::test]
async fn a_confirm_waits_for_the_replicas_of_its_own_primary() {
    let nodes = cluster_with_one_replica(&[]).await;
    let (with_replica, without_replica) = skus_on_and_off(&nodes[0]).await;
    let app = spawn_app_with(cluster_args(&nodes)).await;
    for sku in [&with_replica, &without_replica] {
        app.create_sku(sku, json!({"stock": 2})).await;
    }
    let held = app.hold(&with_replica, "buyer").await;
    let (status, view) = app.confirm(&held, "pay").await;
    assert_eq!(
        (status, &view["status"]),
        (StatusCode::OK, &json!("confirmed")),
        "{view}"
    );
    let held = app.hold(&without_replica, "buyer").await;
    let (status, problem) = app.confirm(&held, "pay").await;
    assert_eq!(
        (status, &problem["code"], &problem["outcome"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("unavailable"),
            &json!("unknown")
        ),
        "{problem}"
    );
}

/// A primary SIGKILLed during a sale (FLASHGATE_REDIS_WAIT_REPLICAS=1), ten times in a
/// row, the killed node coming back each time as its successor's replica. Until the
/// replica is promoted, requests for its slots answer 503 (never 500, never a wrong
/// answer) while other shards keep selling; then reserves succeed again (within the
/// node timeout plus a few seconds); its confirms answer 503 `unknown` while the new
/// primary has no replica to acknowledge them, and 200 once the old one rejoined; no
/// confirm answered 200 is ever lost.
#[tokio::test]
async fn primaries_killed_mid_sale_fail_over_without_a_wrong_answer_or_a_lost_confirm() {
    const FAILOVERS: usize = 10;
    let mut nodes = cluster_with_one_replica(&[
        "--cluster-node-timeout",
        "1000",
        "--cluster-require-full-coverage",
        "no",
    ])
    .await;
    let (doomed, other) = skus_on_and_off(&nodes[0]).await;
    let app = spawn_app_with(cluster_args(&nodes)).await;
    for sku in [&doomed, &other] {
        app.create_sku(sku, json!({"stock": 10_000})).await;
    }
    let mut confirmed = Vec::new();
    for i in 0..5 {
        let rid = app.hold(&doomed, &format!("before{i}")).await;
        let (status, view) = app.confirm(&rid, "pay").await;
        assert_eq!(status, StatusCode::OK, "{view}");
        confirmed.push(rid);
    }

    // A worker flushes the outbox to MySQL all along, through every failover.
    let app = std::sync::Arc::new(app);
    let flushing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flusher = {
        let (app, flushing) = (app.clone(), flushing.clone());
        tokio::spawn(async move {
            while flushing.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = app.worker.flush_once().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut outages = Vec::new();
    for failover in 0..FAILOVERS {
        // The doomed slot's primary: node 0 first, then its replica, and so on.
        let victim = if failover % 2 == 0 { 0 } else { 3 };
        nodes[victim].proc.kill();
        let killed = Instant::now();
        let mut round = 0;
        let held = loop {
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "failover {failover}: the killed primary's slots never served again"
            );
            round += 1;
            let user = format!("during{failover}-{round}");
            let (on_doomed, on_other) = tokio::join!(
                app.reserve(&doomed, &user, "k", 1),
                // The other primary has no replica (its confirms cannot be acknowledged,
                // by design); its reserves must go on.
                app.reserve(&other, &user, "k", 1),
            );
            assert_eq!(
                on_other.0,
                StatusCode::CREATED,
                "another shard was disturbed: {}",
                on_other.1
            );
            match on_doomed.0 {
                StatusCode::CREATED => {
                    break on_doomed.1["reservation_id"].as_str().unwrap().to_owned()
                }
                StatusCode::SERVICE_UNAVAILABLE => {}
                _ => panic!("a wrong answer during the failover: {}", on_doomed.1),
            }
        };
        outages.push(killed.elapsed());
        let (status, problem) = app.confirm(&held, "pay").await;
        assert_eq!(
            (status, &problem["outcome"]),
            (StatusCode::SERVICE_UNAVAILABLE, &json!("unknown")),
            "no replica to acknowledge: {problem}"
        );
        // The killed node rejoins as the new primary's replica: the retry of that
        // confirm is acknowledged, and is its one sale.
        nodes[victim].restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, view) = app.confirm(&held, "pay").await;
            if status == StatusCode::OK {
                assert_eq!(view["status"], "confirmed");
                break;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{view}");
            assert!(
                Instant::now() < deadline,
                "failover {failover}: confirms never acknowledged again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        confirmed.push(held);
    }
    for rid in &confirmed {
        let (status, view) = app.reservation(rid, SERVICE_TOKEN).await;
        assert_eq!(
            (status, &view["status"]),
            (StatusCode::OK, &json!("confirmed")),
            "{view}"
        );
    }
    let view = app.assert_stock_adds_up(&doomed).await;
    assert_eq!(
        view["sold"].as_u64(),
        Some(confirmed.len() as u64),
        "{view}"
    );
    // MySQL has every sale exactly once: nothing flushed twice, nothing skipped.
    flushing.store(false, std::sync::atomic::Ordering::SeqCst);
    flusher.await.unwrap();
    app.flush(&doomed).await;
    assert_eq!(app.mysql_sales_count(&doomed).await, confirmed.len() as i64);
    assert_eq!(app.mysql_sold(&doomed).await, confirmed.len() as u64);
    let worst = outages.iter().max().unwrap();
    assert!(*worst < Duration::from_secs(15), "outages {outages:?}");
    eprintln!("failovers: the killed primary's slots served again after {outages:?}");
}

/// Three primaries, no replica. `extra`: more redis-server options for every node.
async fn three_primaries(extra: &[&str]) -> Vec<ClusterNode> {
    let nodes: Vec<ClusterNode> = (0..3).map(|_| start_node_with(extra)).collect();
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            assert!(Instant::now() < deadline, "cluster node did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let created = Command::new(tool("FLASHGATE_TEST_REDIS_CLI", "redis-cli"))
        .args(["--cluster", "create"])
        .args(nodes.iter().map(address))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli runs");
    assert!(created.status.success(), "{created:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        while !cluster_state_ok(node.port).await {
            assert!(Instant::now() < deadline, "cluster did not become ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes
}

/// The SKU's slot moves to another primary (`redis-cli --cluster reshard`, key by key)
/// while it sells and a worker flushes: answers are right or 503 (never 500, never a
/// wrong one), no unit is sold twice, MySQL records each sale once, and the reconciler
/// finds no drift afterwards.
#[tokio::test]
async fn a_sku_resharded_during_a_sale_keeps_its_invariants() {
    let nodes = three_primaries(&[]).await;
    // A SKU in the first 200 slots of the first node: the ones the reshard moves.
    let sku = loop {
        let sku = unique_sku("reshard");
        let slot: u16 = query(
            nodes[0].port,
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("fg:{{{sku}}}:meta")),
        )
        .await;
        if slot < 200 && serves(nodes[0].port, &sku).await {
            break sku;
        }
    };
    let args = cluster_serve_args(&nodes);
    let app = std::sync::Arc::new(spawn_app_with(args).await);
    const STOCK: u64 = 5_000;
    app.create_sku(&sku, json!({"stock": STOCK, "per_user_limit": 1}))
        .await;
    // Keys in the slot before the move: 1,500 reservations, a third confirmed.
    let mut sold = 0;
    for i in 0..1_500 {
        let rid = app.hold(&sku, &format!("early{i}")).await;
        if i % 3 == 0 {
            assert_eq!(app.confirm(&rid, "pay").await.0, StatusCode::OK);
            sold += 1;
        }
    }

    let from: String = query(nodes[0].port, redis::cmd("CLUSTER").arg("MYID")).await;
    let to: String = query(nodes[1].port, redis::cmd("CLUSTER").arg("MYID")).await;
    let mut reshard = Command::new(tool("FLASHGATE_TEST_REDIS_CLI", "redis-cli"))
        .args(["--cluster", "reshard", &address(&nodes[0])])
        .args([
            "--cluster-from",
            &from,
            "--cluster-to",
            &to,
            "--cluster-slots",
            "200",
        ])
        .args(["--cluster-pipeline", "1", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli runs");
    // Eight buyers at once until the move is over.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let moving = std::sync::Arc::new(AtomicBool::new(true));
    let (sold_during, answered_503, rounds) = (
        std::sync::Arc::new(AtomicU64::new(0)),
        std::sync::Arc::new(AtomicU64::new(0)),
        std::sync::Arc::new(AtomicU64::new(0)),
    );
    let buyers: Vec<_> = (0..8)
        .map(|buyer| {
            let (app, sku, moving) = (app.clone(), sku.clone(), moving.clone());
            let (sold_during, answered_503, rounds) =
                (sold_during.clone(), answered_503.clone(), rounds.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while moving.load(Ordering::SeqCst) {
                    round += 1;
                    rounds.fetch_add(1, Ordering::SeqCst);
                    let user = format!("during{buyer}-{round}");
                    let (status, view) = app.reserve(&sku, &user, "k", 1).await;
                    match status {
                        StatusCode::CREATED => {}
                        StatusCode::SERVICE_UNAVAILABLE => {
                            answered_503.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        _ => panic!("a wrong answer during the reshard: {view}"),
                    }
                    let rid = view["reservation_id"].as_str().unwrap().to_owned();
                    // A 503 is retried: the retry tells, and the sale happens once.
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        let (status, view) = app.confirm(&rid, "pay").await;
                        match status {
                            StatusCode::OK => break,
                            StatusCode::SERVICE_UNAVAILABLE => {
                                answered_503.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => panic!("a wrong answer during the reshard: {view}"),
                        }
                        assert!(Instant::now() < deadline, "confirm never went through");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    sold_during.fetch_add(1, Ordering::SeqCst);
                    if round % 20 == 0 {
                        let _ = app.worker.flush_once().await;
                    }
                }
            })
        })
        .collect();
    let move_started = Instant::now();
    let finished = loop {
        if let Some(status) = reshard.try_wait().unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    moving.store(false, Ordering::SeqCst);
    for buyer in buyers {
        buyer.await.unwrap();
    }
    sold += sold_during.load(Ordering::SeqCst);
    let (round, unavailable) = (
        rounds.load(Ordering::SeqCst),
        answered_503.load(Ordering::SeqCst),
    );
    assert!(finished.success(), "redis-cli --cluster reshard failed");
    assert!(serves(nodes[1].port, &sku).await, "the slot did not move");
    let slot: u16 = query(
        nodes[1].port,
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("fg:{{{sku}}}:meta")),
    )
    .await;
    let moved: u64 = query(
        nodes[1].port,
        redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot),
    )
    .await;
    eprintln!(
        "reshard: {moved} keys of the SKU moved in {:?}; {round} reserves meanwhile, {unavailable} answered 503",
        move_started.elapsed()
    );

    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["sold"].as_u64(), Some(sold), "{view}");
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, sold as i64);
    let report = reconcile::run(&app.store, &app.db, Some(&TestApp::sku_id(&sku)), false)
        .await
        .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

/// While a SKU's slot migrates key by key, a script runs on the old node only when
/// every key it declared is still there (else Redis answers TRYAGAIN before it runs):
/// with one of the sale's keys already moved, a sweep does nothing rather than half of
/// its writes. Once the slot has moved, the holds end there and the stock adds up. (The
/// debug builds of every test also check that scripts name only declared keys, or
/// layout-1 hashes read through redis.pcall first: lua/check_keys.lua.)
#[tokio::test]
async fn a_slot_migrating_under_a_sweep_never_leaves_half_a_script() {
    let nodes = three_primaries(&[]).await;
    let (sku, _) = skus_on_and_off(&nodes[0]).await;
    let args = cluster_serve_args(&nodes);
    let app = spawn_app_with(args).await;
    app.create_sku(
        &sku,
        json!({"stock": 10, "per_user_limit": 2, "hold_seconds": 1}),
    )
    .await;
    let mut holds = Vec::new();
    for user in ["a", "b", "mover"] {
        holds.push(app.hold(&sku, user).await);
    }
    let sku_id = TestApp::sku_id(&sku);
    let keys = flashgate::keys::SkuKeys::new(&sku_id);
    // Every declared key exists on the old node (the state in which a script still
    // runs there during the move): give the ones this sale has not made yet an entry.
    let (from, to) = (nodes[0].port, nodes[1].port);
    let placeholders = [&keys.churn, &keys.uholds, &keys.comps];
    for key in placeholders {
        let _: () = query(from, redis::cmd("HSET").arg(key).arg("x").arg("0")).await;
    }
    let _: () = query(from, redis::cmd("RPUSH").arg(&keys.rlog).arg("x")).await;
    for key in keys.sale() {
        let exists: u32 = query(from, redis::cmd("EXISTS").arg(key)).await;
        assert_eq!(exists, 1, "{key} should exist");
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await; // all three are due

    let slot: u16 = query(from, redis::cmd("CLUSTER").arg("KEYSLOT").arg(&keys.meta)).await;
    let from_id: String = query(from, redis::cmd("CLUSTER").arg("MYID")).await;
    let to_id: String = query(to, redis::cmd("CLUSTER").arg("MYID")).await;
    let setslot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let _: () = query(to, &setslot("IMPORTING", &from_id)).await;
    let _: () = query(from, &setslot("MIGRATING", &to_id)).await;
    let migrate = |keys: &[String]| {
        let mut cmd = redis::cmd("MIGRATE");
        cmd.arg("127.0.0.1").arg(to).arg("").arg(0).arg(5_000);
        cmd.arg("KEYS").arg(keys);
        cmd
    };
    // The hold records move first: the sweep, which reads them, must not run.
    let _: () = query(from, &migrate(std::slice::from_ref(&keys.holds))).await;
    let sweep = app.store.sweep(&sku_id).await;
    assert!(sweep.is_err(), "a sweep ran without its keys: {sweep:?}");
    let due: u64 = query(from, redis::cmd("ZCARD").arg(&keys.deadlines)).await;
    assert_eq!(due, 3, "the index lost holds while the records were away");
    let held: Option<u64> = query(from, redis::cmd("HGET").arg(&keys.meta).arg("held")).await;
    assert_eq!(held, Some(3), "held changed without the records");

    // The rest of the slot moves; the slot is the new node's.
    let rest: Vec<String> = query(
        from,
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(10_000),
    )
    .await;
    let _: () = query(from, &migrate(&rest)).await;
    for node in &nodes {
        let _: () = query(node.port, &setslot("NODE", &to_id)).await;
    }
    for key in placeholders {
        let _: () = query(to, redis::cmd("HDEL").arg(key).arg("x")).await;
    }
    let _: () = query(to, redis::cmd("DEL").arg(&keys.rlog)).await;
    let moved = holds.pop().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let swept = loop {
        match app.store.sweep(&sku_id).await {
            Ok(swept) => break swept,
            Err(e) => assert!(Instant::now() < deadline, "sweep after the move: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(swept.expired, 3, "{swept:?}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["held"].as_u64(), view["available"].as_u64()),
        (Some(0), Some(10))
    );
    let (status, view) = app.reservation(&moved, &user_token("mover")).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("expired"))
    );
    app.flush(&sku).await;
    let report = reconcile::run(&app.store, &app.db, Some(&sku_id), false)
        .await
        .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

/// A node replicating `nodes[primary]`, synced.
async fn add_replica(nodes: &mut Vec<ClusterNode>, primary: usize, extra: &[&str]) {
    let node = start_node_with(extra);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
        assert!(Instant::now() < deadline, "cluster node did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let primary_id: String = query(nodes[primary].port, redis::cmd("CLUSTER").arg("MYID")).await;
    let added = Command::new(tool("FLASHGATE_TEST_REDIS_CLI", "redis-cli"))
        .args([
            "--cluster",
            "add-node",
            &address(&node),
            &address(&nodes[primary]),
        ])
        .args(["--cluster-slave", "--cluster-master-id", &primary_id])
        .output()
        .expect("redis-cli runs");
    assert!(added.status.success(), "{added:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = query(node.port, redis::cmd("INFO").arg("replication")).await;
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not sync: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes.push(node);
}

/// A SKU split over three buckets, one per primary of a 3 + 3 cluster
/// (FLASHGATE_REDIS_WAIT_REPLICAS=1), sells to users homed mostly in one bucket, so
/// stock keeps moving to it from the others; the primary of another bucket is
/// SIGKILLed mid-sale (and comes back as its successor's replica). Every answer is
/// right or 503 (never 500); clients retry a 503 with the same key or payment_ref.
/// (Units a transfer cut by the kill left in transit are sellable again once the
/// transfer is past TRANSFER_STALE, 5 s: until then the SKU may answer `sold_out` for
/// them.) Afterwards, transfers cut by the kill finished: each bucket's equation holds, the
/// buckets' stock adds up to the SKU's with nothing in transit, nothing is sold beyond
/// the stock, every confirm answered 200 is a sale Redis and MySQL both have once, and
/// the reconciler finds no drift.
#[tokio::test]
async fn a_buckets_primary_killed_mid_transfer_loses_no_unit_and_sells_none_twice() {
    static REFUNDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let extra = [
        "--cluster-node-timeout",
        "1000",
        "--cluster-require-full-coverage",
        "no",
    ];
    let mut nodes = three_primaries(&extra).await;
    for primary in 0..3 {
        add_replica(&mut nodes, primary, &extra).await;
    }
    let sku = unique_sku("bk-kill");
    let id = TestApp::sku_id(&sku);
    let sales = flashgate::buckets::sales(&id, 3);
    let mut victim_bucket = None;
    for (b, sale) in sales.iter().enumerate() {
        if serves(nodes[0].port, sale.as_str()).await {
            victim_bucket = Some(b);
        }
    }
    let victim_bucket = victim_bucket.expect("one bucket on each primary");
    let hot_bucket = (victim_bucket + 1) % 3;
    let mut args = cluster_serve_args(&nodes[..3]);
    args.redis.redis_wait_replicas = 1;
    args.redis.redis_wait_timeout_ms = 1_000;
    let app = std::sync::Arc::new(spawn_app_with(args).await);
    let stock = 300u64;
    app.create_sku(&sku, json!({ "stock": stock, "buckets": 3 }))
        .await;
    // Four users in five are homed in the hot bucket, the fifth in the victim's.
    let mut users = Vec::new();
    for n in 0.. {
        let user = format!("kill-{n}");
        let home = flashgate::buckets::home(&id, &user, 3) as usize;
        if home == hot_bucket || (home == victim_bucket && users.len() % 5 == 4) {
            users.push(user);
        }
        if users.len() == 2 * stock as usize {
            break;
        }
    }
    let flushing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flusher = {
        let (app, flushing) = (app.clone(), flushing.clone());
        tokio::spawn(async move {
            while flushing.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = app.worker.flush_once().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Each buyer: reserve (a 503 retried with the same key), then confirm (a 503
    // retried with the same payment_ref) until a definite answer.
    let buyers = users.into_iter().map(|user| {
        let (app, sku) = (app.clone(), sku.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let held = loop {
                let (status, body) = app.reserve(&sku, &user, "k", 1).await;
                match status {
                    StatusCode::CREATED => {
                        break Some(body["reservation_id"].as_str().unwrap().to_owned())
                    }
                    StatusCode::CONFLICT => {
                        assert_eq!(body["code"], "sold_out", "{body}");
                        break None;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {}
                    other => panic!("a wrong answer: {other} {body}"),
                }
                assert!(Instant::now() < deadline, "{user}: no definite answer");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let rid = held?;
            loop {
                let (status, body) = app.confirm(&rid, &format!("pay-{user}")).await;
                match status {
                    StatusCode::OK => return Some(rid),
                    // Its hold was lost with the killed primary's last writes: a refund.
                    StatusCode::CONFLICT => {
                        assert_eq!(body["refund_required"], true, "{body}");
                        REFUNDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return None;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {}
                    other => panic!("a wrong answer: {other} {body}"),
                }
                assert!(Instant::now() < deadline, "{user}: confirm never answered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // 32 at a time, as a closed loop of clients.
    let buyers: Vec<_> = buyers.collect();
    let sale = tokio::spawn(async move {
        use futures::StreamExt;
        futures::stream::iter(buyers)
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
    });
    // Mid-sale, with the hot bucket drawing on the others: the victim's primary dies.
    tokio::time::sleep(Duration::from_millis(700)).await;
    nodes[0].proc.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    nodes[0].restart();
    let confirmed: Vec<String> = sale.await.unwrap().into_iter().flatten().collect();
    flushing.store(false, std::sync::atomic::Ordering::SeqCst);
    flusher.await.unwrap();
    // Transfers the kill cut short are finished (or undone) by the worker's finisher.
    let keys: Vec<flashgate::keys::SkuKeys> =
        sales.iter().map(flashgate::keys::SkuKeys::new).collect();
    // (WAIT may refuse until the restarted node has synced as a replica.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = app.store.finish_transfers(&keys, Duration::ZERO).await {
        assert!(Instant::now() < deadline, "transfers never finished: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (bucket_stock, in_transit) = app.store.split_stock(&sales).await.unwrap();
    assert_eq!(in_transit, 0);
    assert_eq!(
        bucket_stock.iter().flatten().sum::<u64>(),
        stock,
        "no unit made or lost: {bucket_stock:?}"
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        view["sold"].as_u64(),
        Some(confirmed.len() as u64),
        "{view}"
    );
    assert!(confirmed.len() as u64 <= stock);
    for rid in &confirmed {
        let (status, read) = app.reservation(rid, SERVICE_TOKEN).await;
        assert_eq!(
            (status, read["status"].as_str()),
            (StatusCode::OK, Some("confirmed"))
        );
    }
    app.flush(&sku).await;
    assert_eq!(app.mysql_sales_count(&sku).await, confirmed.len() as i64);
    let report = reconcile::run_skus(&app.store, &app.db, &[id], false)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.findings);
    eprintln!(
        "bucket kill: {} confirmed of {stock}, {} refunded (holds lost with the primary), \
         {} available after, buckets {bucket_stock:?}",
        confirmed.len(),
        REFUNDS.load(std::sync::atomic::Ordering::Relaxed),
        view["available"]
    );
}
