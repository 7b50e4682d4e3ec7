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
    _dir: TempDir,
    _proc: Proc,
}

fn start_node() -> ClusterNode {
    let port = free_port();
    // The bus port would default to port + 10000, outside the ports free_port hands
    // out (and possibly in the ephemeral range): pick it the same way.
    let bus_port = free_port();
    let dir = TempDir::new("cluster");
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
        .arg("--dir")
        .arg(dir.path())
        .arg("--cluster-config-file")
        .arg(dir.path().join("nodes.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc::spawn("redis-server (cluster)", &mut command);
    ClusterNode {
        port,
        _dir: dir,
        _proc: proc,
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
    let nodes: Vec<ClusterNode> = (0..3).map(|_| start_node()).collect();
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    // Wait until every node accepts connections, then join them.
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            assert!(Instant::now() < deadline, "cluster node did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let created = Command::new(tool("FLASHGATE_TEST_REDIS_CLI", "redis-cli"))
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli runs");
    assert!(
        created.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        while !cluster_state_ok(node.port).await {
            assert!(Instant::now() < deadline, "cluster did not become ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let urls: Vec<String> = addresses.iter().map(|a| format!("redis://{a}")).collect();
    let mut args = serve_args(&urls.join(","), &database_url());
    args.redis.redis_cluster = true;
    let app = spawn_app_with(args).await;
    let (status, ready) = body(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    // Enough SKUs that their slots land on every node.
    let skus: Vec<String> = (0..6).map(|_| unique_sku("cluster")).collect();
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
#[tokio::test]
async fn a_confirm_waits_for_the_replicas_of_its_own_primary() {
    let nodes: Vec<ClusterNode> = (0..4).map(|_| start_node()).collect();
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            assert!(Instant::now() < deadline, "cluster node did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let address = |n: &ClusterNode| format!("127.0.0.1:{}", n.port);
    let cli = || Command::new(tool("FLASHGATE_TEST_REDIS_CLI", "redis-cli"));
    let created = cli()
        .args(["--cluster", "create"])
        .args(nodes[..3].iter().map(address))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli runs");
    assert!(created.status.success(), "{created:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes[..3] {
        while !cluster_state_ok(node.port).await {
            assert!(Instant::now() < deadline, "cluster did not become ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The fourth node replicates the first primary only.
    let first_id: String = query(nodes[0].port, redis::cmd("CLUSTER").arg("MYID")).await;
    let added = cli()
        .args([
            "--cluster",
            "add-node",
            &address(&nodes[3]),
            &address(&nodes[0]),
        ])
        .args(["--cluster-slave", "--cluster-master-id", &first_id])
        .output()
        .expect("redis-cli runs");
    assert!(added.status.success(), "{added:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = query(nodes[3].port, redis::cmd("INFO").arg("replication")).await;
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not sync: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut with_replica = None;
    let mut without_replica = None;
    while with_replica.is_none() || without_replica.is_none() {
        let sku = unique_sku("wait-own");
        if serves(nodes[0].port, &sku).await {
            with_replica.get_or_insert(sku);
        } else {
            without_replica.get_or_insert(sku);
        }
    }
    let (with_replica, without_replica) = (with_replica.unwrap(), without_replica.unwrap());
    let urls: Vec<String> = nodes[..3]
        .iter()
        .map(|n| format!("redis://{}", address(n)))
        .collect();
    let mut args = serve_args(&urls.join(","), &database_url());
    args.redis.redis_cluster = true;
    args.redis.redis_wait_replicas = 1;
    args.redis.redis_wait_timeout_ms = 500;
    let app = spawn_app_with(args).await;
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
