//! The Rust Redis clients' known pitfalls, each with Redis restarted (or stopped, or
//! hung) under a running gateway: a multiplexed connection that never reconnects
//! (redis-rs #1190), scripts not reloaded on NOSCRIPT (#1394), and a request that
//! waits forever while Redis is down (deadpool #452).

use std::time::{Duration, Instant};

use futures::FutureExt;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use crate::common::{self, body, spawn_app_with, unique_sku, TestApp, SERVICE_TOKEN};
use crate::support::*;

/// Only as a hang detector: far above the gateway's own Redis timeouts (1 s connect,
/// 2 s response), far below "forever".
const HANG: Duration = Duration::from_secs(5);

async fn app_on(redis: &RedisServer) -> TestApp {
    spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await
}

/// Retries `attempt` until it answers `want` (a 503 meanwhile is fine); returns how long
/// it took. Panics after `within`.
async fn until_status<F, Fut>(within: Duration, want: StatusCode, mut attempt: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (StatusCode, Value)>,
{
    let started = Instant::now();
    let mut unavailable = 0;
    loop {
        let (status, view) = attempt().await;
        if status == want {
            eprintln!(
                "{want} after {:?} and {unavailable} answers 503",
                started.elapsed()
            );
            return started.elapsed();
        }
        unavailable += 1;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{view}");
        assert!(
            started.elapsed() < within,
            "still {status} after {within:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reconnects_after_redis_restarts() {
    let mut redis = RedisServer::start(Some("everysec")).await;
    let app = app_on(&redis).await;
    let sku = unique_sku("pit-reconnect");
    app.create_sku(&sku, json!({ "stock": 100, "per_user_limit": 1 }))
        .await;
    app.hold(&sku, "before").await;

    for (round, kill) in [(0, false), (1, true)] {
        if kill {
            redis.kill(); // everysec: the hold made a second ago may be lost; fine here
        } else {
            redis.stop(); // clean: AOF fsynced
        }
        redis.restart().await;
        // Requests succeed again without restarting the gateway.
        let user = format!("after-{round}");
        let took = until_status(Duration::from_secs(10), StatusCode::CREATED, || {
            app.reserve(&sku, &user, "k", 1)
        })
        .await;
        assert!(took < HANG, "reconnect took {took:?}");
        // And keep succeeding: no flapping connection.
        for i in 0..20 {
            let (status, view) = app
                .reserve(&sku, &format!("steady-{round}-{i}"), "k", 1)
                .await;
            assert_eq!(status, StatusCode::CREATED, "{view}");
        }
        assert_equation(&app.store, &sku).await;
    }
    // The harness's own store (another connection manager) reconnected as well.
    app.store.ping().await.expect("store reconnects");
}

/// Whether this Redis has the library (`FUNCTION LIST LIBRARYNAME`).
async fn has_library(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> bool {
    let listed: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(name)
        .query_async(conn)
        .await
        .unwrap();
    !listed.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_reload_after_function_flush_and_survive_an_aof_restart() {
    let library = &flashgate::lua::LIBRARY.name;
    let mut redis = RedisServer::start(Some("everysec")).await;
    let app = app_on(&redis).await;
    let sku = unique_sku("pit-nofunction");
    app.create_sku(&sku, json!({ "stock": 100, "per_user_limit": 1 }))
        .await;
    let rid = app.hold(&sku, "a").await;

    // FUNCTION FLUSH: the very next call must succeed ("Function not found", load, call).
    let mut conn = redis.client().await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!has_library(&mut conn, library).await);
    let (status, view) = app.reserve(&sku, "b", "k-b", 1).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "first reserve after FUNCTION FLUSH: {view}"
    );
    assert!(has_library(&mut conn, library).await, "the call loaded it");

    // Redis keeps functions in its AOF: after a restart the library is there before
    // any call (a plain read, not /readyz, waits for the connection).
    redis.stop();
    redis.restart().await;
    until_status(Duration::from_secs(10), StatusCode::OK, || async {
        body(
            app.client
                .get(app.url(&format!("/v1/skus/{sku}")))
                .send()
                .await
                .unwrap(),
        )
        .await
    })
    .await;
    let mut conn = redis.client().await;
    assert!(
        has_library(&mut conn, library).await,
        "the restarted Redis loaded the library from its AOF"
    );
    let (status, view) = app.confirm(&rid, "pay-a").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "first confirm after restart: {view}"
    );
    assert_eq!(view["status"], "confirmed");
    let (status, view) = app.reserve(&sku, "c", "k-c", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_equation(&app.store, &sku).await;
}

/// Redis at maxmemory (`noeviction`) refuses a function that may write as a whole,
/// before it runs; the gateway then runs the same script by EVALSHA, which Redis refuses
/// only at its first write that needs memory: reads and replays answer, a new hold is
/// refused (503, nothing changed), and the SKU adds up once memory is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_maxmemory_reads_and_replays_answer_and_a_new_hold_is_refused() {
    let redis = RedisServer::start(None).await;
    let app = app_on(&redis).await;
    let sku = unique_sku("pit-oom");
    app.create_sku(&sku, json!({ "stock": 10, "per_user_limit": 1 }))
        .await;
    let rid = app.hold(&sku, "a").await;
    let (status, first) = app.reserve(&sku, "b", "key-b", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let mut conn = redis.client().await;
    let set_maxmemory = |bytes: u64| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory").arg(bytes);
        cmd
    };
    let _: () = set_maxmemory(1).query_async(&mut conn).await.unwrap();
    let (view_status, view) = app.reservation(&rid, &common::user_token("a")).await;
    let (replay_status, replay) = app.reserve(&sku, "b", "key-b", 1).await;
    let (new_status, refused) = app.reserve(&sku, "c", "key-c", 1).await;
    let (sku_status, sku_view) = body(
        app.client
            .get(app.url(&format!("/v1/skus/{sku}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let _: () = set_maxmemory(0).query_async(&mut conn).await.unwrap();
    assert_eq!(view_status, StatusCode::OK, "a read at maxmemory: {view}");
    assert_eq!(
        (replay_status, &replay["id"]),
        (StatusCode::CREATED, &first["id"]),
        "a replay at maxmemory: {replay}"
    );
    assert_eq!(
        sku_status,
        StatusCode::OK,
        "the SKU view at maxmemory: {sku_view}"
    );
    assert_eq!(
        new_status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a new hold at maxmemory: {refused}"
    );
    assert_eq!(refused["outcome"], "not_applied", "{refused}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 2, "{view}");
    let (status, view) = app.reserve(&sku, "c", "key-c", 1).await;
    assert_eq!(status, StatusCode::CREATED, "once memory is back: {view}");
}

/// After `FUNCTION FLUSH`, the calls in flight load the library once between them and
/// all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_function_flush_the_calls_in_flight_load_the_library_once() {
    let redis = RedisServer::start(None).await;
    let mut conn = redis.client().await;
    let keys = flashgate::keys::SkuKeys::new(&flashgate::ids::SkuId::parse("pit-flush").unwrap());
    flashgate::lua::load_library(&mut conn).await.unwrap();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let calls = (0..500).map(|_| {
        let mut conn = conn.clone();
        let keys = &keys;
        async move {
            flashgate::store::with_sale_keys(&flashgate::store::SCRIPTS.sku_view, keys)
                .arg(100)
                .invoke_async::<redis::Value>(&mut conn)
                .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    assert!(
        answers.iter().all(|a| a.is_ok()),
        "{:?}",
        answers.iter().find(|a| a.is_err())
    );
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let loads = stats
        .lines()
        .find(|line| line.starts_with("cmdstat_function|load:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        loads.starts_with("cmdstat_function|load:calls=1,"),
        "{loads}"
    );
}

/// A rolling upgrade: gateways of two versions on one Redis each call their own
/// library, and neither's loading removes the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_of_the_library_serve_side_by_side() {
    let redis = RedisServer::start(None).await;
    let sources = flashgate::lua::SOURCES;
    let changed: Vec<(&str, String)> = sources
        .iter()
        .map(|(name, source)| match *name {
            "sku_view" => (*name, format!("{source}\n-- the next version\n")),
            _ => (*name, source.to_string()),
        })
        .collect();
    let changed: Vec<(&str, &str)> = changed.iter().map(|(n, s)| (*n, s.as_str())).collect();
    let other = flashgate::lua::Library::build(&changed);
    assert_ne!(other.name, flashgate::lua::LIBRARY.name);
    let mut conn = redis.client().await;
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&other.source)
        .query_async(&mut conn)
        .await
        .unwrap();

    let app = app_on(&redis).await;
    let sku = unique_sku("pit-versions");
    app.create_sku(&sku, json!({ "stock": 10, "per_user_limit": 1 }))
        .await;
    app.hold(&sku, "a").await;
    assert!(has_library(&mut conn, &other.name).await);
    assert!(has_library(&mut conn, &flashgate::lua::LIBRARY.name).await);

    // The other version's SKU view reads the same sale.
    let keys = flashgate::keys::SkuKeys::new(&flashgate::ids::SkuId::parse(&sku).unwrap());
    let mut call = redis::cmd("FCALL");
    call.arg(other.function_name("sku_view"))
        .arg(keys.sale().len());
    for key in keys.sale() {
        call.arg(key);
    }
    call.arg(100); // the sweep batch
    let fields: Vec<Option<String>> = call.query_async(&mut conn).await.unwrap();
    let ours: Vec<Option<String>> =
        flashgate::store::with_sale_keys(&flashgate::store::SCRIPTS.sku_view, &keys)
            .arg(100)
            .invoke_async(&mut conn)
            .await
            .unwrap();
    assert_eq!(fields, ours, "both versions read the same sale");
    assert_equation(&app.store, &sku).await;
}

/// Sends one request and times it; panics if it is not a 503 problem+json
/// `unavailable` within HANG.
async fn assert_unavailable_in_bounded_time(response: impl std::future::Future<Output = Response>) {
    let started = Instant::now();
    let response = tokio::time::timeout(HANG * 2, response)
        .await
        .expect("the request hangs");
    let elapsed = started.elapsed();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, view) = body(response).await;
    eprintln!("{status} after {elapsed:?}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{view}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(view["code"], "unavailable", "{view}");
    assert_eq!(view["status"], 503, "{view}");
    assert!(elapsed < HANG, "answered only after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answer_503_in_bounded_time_while_redis_is_down_or_hung() {
    let mut redis = RedisServer::start(Some("everysec")).await;
    let app = app_on(&redis).await;
    let sku = unique_sku("pit-down");
    app.create_sku(&sku, json!({ "stock": 100, "per_user_limit": 1 }))
        .await;
    let rid = app.hold(&sku, "a").await;

    // Down: connection refused.
    redis.stop();
    for _ in 0..3 {
        assert_unavailable_in_bounded_time(app.reserve_raw(&sku, "b", "k-b", 1)).await;
    }
    assert_unavailable_in_bounded_time(
        app.client
            .post(app.url(&format!("/v1/reservations/{rid}/confirm")))
            .bearer_auth(SERVICE_TOKEN)
            .json(&json!({ "payment_ref": "pay-a" }))
            .send()
            .map(Result::unwrap),
    )
    .await;
    // /readyz answers from a background check (at most a second old): never hangs,
    // and turns 503 once the check has seen Redis go.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let readyz = tokio::time::timeout(HANG, app.client.get(app.url("/readyz")).send())
            .await
            .expect("readyz hangs")
            .unwrap();
        if readyz.status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/readyz still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.restart().await;
    until_status(Duration::from_secs(10), StatusCode::CREATED, || {
        app.reserve(&sku, "b", "k-b", 1)
    })
    .await;

    // Hung: the process is stopped (SIGSTOP), so connections open but nothing answers.
    // (Should the assertion fail, the guard SIGKILLs the stopped process.)
    redis.pause();
    assert_unavailable_in_bounded_time(app.reserve_raw(&sku, "c", "k-c", 1)).await;
    redis.resume();
    // The timed-out reserve may have run once Redis woke up; a retry with the same
    // key is safe either way: one hold for user c, and the counters add up.
    let (status, view) = until_status_value(&app, &sku, "c", "k-c").await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    let (_, _, held, _) = assert_equation(&app.store, &sku).await;
    assert_eq!(held, 3, "holds of a, b and c exactly once");
}

async fn until_status_value(
    app: &TestApp,
    sku: &str,
    user: &str,
    key: &str,
) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, view) = app.reserve(sku, user, key, 1).await;
        if status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return (status, view);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
