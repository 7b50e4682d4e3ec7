//! Several gateways and workers (issue 12 item 5): two `flashgate serve` processes
//! (no worker) behind an imaginary load balancer and two `flashgate worker` processes
//! sharing the sweep and the flush, on one Redis and one MySQL. Buyers race through
//! both gateways at once; the stock is sold exactly, expired and cancelled units come
//! back through either gateway, and MySQL records each sale once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Barrier;

use crate::common::{self, unique_sku, user_token, JWT_SECRET, SERVICE_TOKEN};
use crate::support::*;

pub(crate) struct Gateway {
    pub(crate) base: String,
    pub(crate) proc: Proc,
}

pub(crate) async fn start_gateway(redis_url: &str, database_url: &str) -> Gateway {
    let port = free_port();
    let mut command = flashgate(redis_url, database_url);
    command
        .arg("serve")
        .arg("--no-worker")
        .env("FLASHGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLASHGATE_JWT_SECRET", JWT_SECRET)
        .env("FLASHGATE_SERVICE_TOKEN", SERVICE_TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let proc = Proc::spawn("flashgate serve", &mut command);
    let base = format!("http://127.0.0.1:{port}");
    let client = common::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == StatusCode::OK {
                break;
            }
        }
        assert!(Instant::now() < deadline, "gateway on {port} never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Gateway { base, proc }
}

pub(crate) async fn answer(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn reserve(client: &Client, base: &str, sku: &str, user: &str) -> (StatusCode, Value) {
    answer(
        client
            .post(format!("{base}/v1/skus/{sku}/reservations"))
            .bearer_auth(user_token(user))
            .header("Idempotency-Key", "k")
            .json(&json!({"quantity": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Defines a SKU through a gateway; panics unless 200.
pub(crate) async fn define_sku(client: &Client, gateway: &Gateway, sku: &str, definition: Value) {
    let (status, view) = answer(
        client
            .put(format!("{}/v1/admin/skus/{sku}", gateway.base))
            .bearer_auth(SERVICE_TOKEN)
            .json(&definition)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
}

/// The SKU view a gateway answers (for a split SKU, summed over its buckets).
async fn sku_view(client: &Client, gateway: &Gateway, sku: &str) -> Value {
    let url = format!("{}/v1/skus/{sku}", gateway.base);
    answer(client.get(url).send().await.unwrap()).await.1
}

pub(crate) async fn service_post(client: &Client, url: String, body: Value) -> (StatusCode, Value) {
    answer(
        client
            .post(url)
            .bearer_auth(SERVICE_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// `users` buyers released at once, alternating between the gateways: the ids of the
/// holds made (every other answer must be `sold_out`).
async fn rush(
    client: &Client,
    gateways: &[Gateway],
    sku: &str,
    wave: &str,
    users: usize,
) -> Vec<String> {
    let barrier = Arc::new(Barrier::new(users));
    let tasks = (0..users).map(|i| {
        let (client, barrier) = (client.clone(), barrier.clone());
        let base = gateways[i % gateways.len()].base.clone();
        let (sku, user) = (sku.to_owned(), format!("{wave}-{i}"));
        tokio::spawn(async move {
            barrier.wait().await;
            reserve(&client, &base, &sku, &user).await
        })
    });
    let mut held = Vec::new();
    for result in join_all(tasks).await {
        let (status, view) = result.unwrap();
        match status {
            StatusCode::CREATED => held.push(view["reservation_id"].as_str().unwrap().to_owned()),
            StatusCode::CONFLICT => assert_eq!(view["code"], "sold_out", "{view}"),
            _ => panic!("unexpected answer {status}: {view}"),
        }
    }
    held
}

#[tokio::test]
async fn two_gateways_and_two_workers_sell_the_stock_exactly() {
    const STOCK: usize = 100;
    let redis = RedisServer::start(None).await;
    let database_url = common::database_url();
    shared_db().await;
    let gateways = [
        start_gateway(&redis.url(), &database_url).await,
        start_gateway(&redis.url(), &database_url).await,
    ];
    let logs = TempDir::new("workers");
    let _workers = [
        WorkerProc::start(&redis.url(), &database_url, logs.path(), 2_000),
        WorkerProc::start(&redis.url(), &database_url, logs.path(), 2_000),
    ];
    common::tls_provider();
    let client = Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap();
    let sku = unique_sku("two-gateways");
    define_sku(
        &client,
        &gateways[0],
        &sku,
        json!({"stock": STOCK, "per_user_limit": 1, "hold_seconds": 2}),
    )
    .await;

    // Wave 1: 600 buyers for 100 units, through both gateways at once.
    let held = rush(&client, &gateways, &sku, "w1", 600).await;
    assert_eq!(held.len(), STOCK);
    // Half pay (through one gateway), a quarter cancel (through the other), the rest
    // let their hold expire: the workers return those units.
    let mut sold = Vec::new();
    for (i, rid) in held.iter().enumerate() {
        let base = &gateways[i % 2].base;
        match i % 4 {
            0 | 1 => {
                let (status, view) = service_post(
                    &client,
                    format!("{base}/v1/reservations/{rid}/confirm"),
                    json!({"payment_ref": format!("pay-{i}")}),
                )
                .await;
                assert_eq!(status, StatusCode::OK, "{view}");
                sold.push(rid.clone());
            }
            2 => {
                let (status, view) = service_post(
                    &client,
                    format!("{base}/v1/reservations/{rid}/cancel"),
                    json!({}),
                )
                .await;
                assert_eq!(status, StatusCode::OK, "{view}");
            }
            _ => {}
        }
    }
    // The abandoned holds expire (2 s) and the workers give their units back; the
    // cancelled ones are back already. Wave 2 buys exactly what is left.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let again = rush(&client, &gateways, &sku, "w2", 300).await;
    assert_eq!(
        again.len(),
        STOCK - sold.len(),
        "the returned units, sold once more"
    );

    let view = sku_view(&client, &gateways[1], &sku).await;
    let n = |f: &str| view[f].as_u64().unwrap();
    assert_eq!(
        n("available") + n("held") + n("sold"),
        STOCK as u64,
        "{view}"
    );
    assert_eq!(
        (n("available"), n("sold")),
        (0, sold.len() as u64),
        "{view}"
    );
    // Both workers flush; MySQL ends with each sale once.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (rows, _, mysql_sold) = mysql_sales(&shared_db().await, &sku).await;
        if rows as usize == sold.len() {
            assert_eq!(mysql_sold as usize, sold.len());
            break;
        }
        assert!(rows as usize <= sold.len(), "a sale recorded twice");
        assert!(
            Instant::now() < deadline,
            "the workers never flushed: {rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Buyers of a SKU split over `k` buckets: three in four homed in bucket 0 (so its
/// stock runs out first and the others' moves to it), the rest spread over the others.
fn buyers_mostly_of_bucket_0(sku: &str, k: u32, wave: &str, count: usize) -> Vec<String> {
    let id = flashgate::ids::SkuId::parse(sku).unwrap();
    let (mut of_0, mut others) = (Vec::new(), Vec::new());
    for n in 0.. {
        let user = format!("{wave}-{n}");
        match flashgate::buckets::home(&id, &user, k) {
            0 if of_0.len() < count * 3 / 4 => of_0.push(user),
            b if b > 0 && others.len() < count - count * 3 / 4 => others.push(user),
            _ => {}
        }
        if of_0.len() + others.len() == count {
            break;
        }
    }
    of_0.into_iter().chain(others).collect()
}

/// A gateway SIGKILLed while it moves stock between the buckets of a split SKU (issue
/// 13): the transfers it cut (taken and not given, or given with their records left)
/// are finished by a `flashgate worker` once past TRANSFER_STALE; then nothing is in
/// transit, each bucket's equation holds, the buckets' stock adds up to the SKU's, and
/// a second gateway sells exactly what is left: no unit lost, none sold twice.
#[tokio::test]
async fn a_gateway_killed_mid_transfer_loses_no_unit_of_a_split_sku() {
    const STOCK: u64 = 300;
    let redis = RedisServer::start(None).await;
    let database_url = common::database_url();
    shared_db().await;
    let args = common::serve_args(&redis.url(), &database_url);
    let store = flashgate::store::Store::new(flashgate::store::connect(&args.redis).await.unwrap());
    common::tls_provider();
    let client = Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap();
    // Until a kill leaves a transfer unfinished.
    let mut cut = None;
    for _attempt in 0..12 {
        let mut gateway = start_gateway(&redis.url(), &database_url).await;
        let sku = unique_sku("bk-gw-kill");
        define_sku(
            &client,
            &gateway,
            &sku,
            json!({"stock": STOCK, "per_user_limit": 1, "buckets": 3}),
        )
        .await;
        let buyers = buyers_mostly_of_bucket_0(&sku, 3, "first", 2 * STOCK as usize);
        let barrier = Arc::new(Barrier::new(buyers.len() + 1));
        let tasks: Vec<_> = buyers
            .into_iter()
            .enumerate()
            .map(|(n, user)| {
                let (client, barrier) = (client.clone(), barrier.clone());
                let url = format!("{}/v1/skus/{sku}/reservations", gateway.base);
                tokio::spawn(async move {
                    barrier.wait().await;
                    // Arriving over 300 ms: bucket 0 runs dry early, then stock keeps
                    // moving to it for the rest of the rush.
                    tokio::time::sleep(Duration::from_millis(n as u64 % 300)).await;
                    let sent = client
                        .post(url)
                        .bearer_auth(user_token(&user))
                        .header("Idempotency-Key", "k")
                        .json(&json!({"quantity": 1}))
                        .send()
                        .await;
                    match sent {
                        Ok(response) => Some(answer(response).await),
                        Err(_) => None, // the gateway died under it
                    }
                })
            })
            .collect();
        let sales = flashgate::buckets::sales(&flashgate::ids::SkuId::parse(&sku).unwrap(), 3);
        barrier.wait().await;
        // Kill as soon as a transfer is seen under way (or when the rush is over).
        let watch_until = Instant::now() + Duration::from_secs(5);
        while transfer_records(&redis, &sales).await == 0
            && Instant::now() < watch_until
            && !tasks.iter().all(|t| t.is_finished())
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        gateway.proc.kill();
        let mut created = 0;
        for task in join_all(tasks).await {
            match task.unwrap() {
                Some((StatusCode::CREATED, _)) => created += 1,
                Some((StatusCode::CONFLICT, view)) => assert_eq!(view["code"], "sold_out"),
                Some((status, view)) => panic!("unexpected answer {status}: {view}"),
                None => {}
            }
        }
        let records = transfer_records(&redis, &sales).await;
        if records > 0 {
            cut = Some((sku, sales, created));
            break;
        }
    }
    let (sku, sales, created) = cut.expect("no kill in 12 cut a transfer short");

    // A worker finishes what the dead gateway left (past TRANSFER_STALE, 5 s).
    let logs = TempDir::new("bk-gw-kill");
    let worker = WorkerProc::start(&redis.url(), &database_url, logs.path(), 2_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while transfer_records(&redis, &sales).await > 0 {
        assert!(
            Instant::now() < deadline,
            "transfers never finished: {}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stock, in_transit) = store.split_stock(&sales).await.unwrap();
    assert_eq!(in_transit, 0);
    assert_eq!(stock.iter().map(|s| s.unwrap()).sum::<u64>(), STOCK);
    let mut held_before = 0;
    for sale in &sales {
        let (view, _) = store.sale_view(sale).await.unwrap();
        assert_eq!(
            view.available + view.held + view.sold,
            view.stock_total,
            "{sale:?}"
        );
        held_before += view.held;
    }
    assert!(held_before >= created, "every hold answered is held");

    // A second gateway sells what is left, exactly.
    let gateway = start_gateway(&redis.url(), &database_url).await;
    let more = buyers_mostly_of_bucket_0(&sku, 3, "second", STOCK as usize + 100);
    let again = rush_users(&client, &gateway, &sku, more).await;
    assert_eq!(held_before + again, STOCK, "the units left, sold once");
    // The SKU's view sums its buckets.
    let view = sku_view(&client, &gateway, &sku).await;
    let n = |f: &str| view[f].as_u64().unwrap();
    assert_eq!(
        (n("stock_total"), n("available"), n("held"), n("sold")),
        (STOCK, 0, STOCK, 0),
        "{view}"
    );
    let run = reconcile_cli(&redis.url(), &database_url, &["--sku", &sku]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // Its stock events, once the worker flushed every bucket: however the transfers
    // were cut, they alternate from sku.sold_out and end on it (nothing is available),
    // numbered with the SKU's other events without a gap.
    eventually(
        Duration::from_secs(30),
        "the buckets' outboxes drain",
        || async {
            for sale in &sales {
                if store.outbox_backlog(sale).await.unwrap() > 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let db = shared_db().await;
    assert_events_in_sequence(&db, &sku).await;
    let stock: Vec<String> = sqlx::query_scalar(
        "SELECT type FROM events WHERE sku = ? AND type LIKE 'sku.%' ORDER BY sequence",
    )
    .bind(&sku)
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(
        !stock.is_empty(),
        "sold out, never announced: {}",
        worker.log()
    );
    for (i, kind) in stock.iter().enumerate() {
        let expected = if i % 2 == 0 {
            "sku.sold_out"
        } else {
            "sku.available"
        };
        assert_eq!(kind, expected, "{stock:?}");
    }
    assert_eq!(stock.last().unwrap(), "sku.sold_out", "{stock:?}");
}

/// Open transfer records (`out:`, and `in:` not marked done) over a split SKU's
/// buckets: none once every transfer finished (a receiver's record marked done stays
/// for the give window, src/store.rs TransferTiming).
async fn transfer_records(redis: &RedisServer, sales: &[flashgate::ids::SkuId]) -> usize {
    let mut conn = redis.client().await;
    let mut records = 0;
    for sale in sales {
        let keys = flashgate::keys::SkuKeys::new(sale);
        let values: Vec<String> = redis::cmd("HVALS")
            .arg(&keys.transfers)
            .query_async(&mut conn)
            .await
            .unwrap();
        records += values.iter().filter(|r| r.split(' ').count() == 3).count();
    }
    records
}

/// Named buyers released at once through one gateway: the holds made (every other
/// answer must be `sold_out`).
async fn rush_users(client: &Client, gateway: &Gateway, sku: &str, users: Vec<String>) -> u64 {
    let barrier = Arc::new(Barrier::new(users.len()));
    let tasks = users.into_iter().map(|user| {
        let (client, barrier) = (client.clone(), barrier.clone());
        let (base, sku) = (gateway.base.clone(), sku.to_owned());
        tokio::spawn(async move {
            barrier.wait().await;
            reserve(&client, &base, &sku, &user).await
        })
    });
    let mut held = 0;
    for result in join_all(tasks).await {
        let (status, view) = result.unwrap();
        match status {
            StatusCode::CREATED => held += 1,
            StatusCode::CONFLICT => assert_eq!(view["code"], "sold_out", "{view}"),
            _ => panic!("unexpected answer {status}: {view}"),
        }
    }
    held
}

/// `flashgate worker` with FLASHGATE_METRICS_LISTEN serves its own figures, so the
/// alert rules on the sweep, the backlog and the reconciler see workers that run apart
/// from the gateways.
#[tokio::test]
async fn a_worker_process_serves_its_metrics() {
    let redis = RedisServer::start(None).await;
    let port = free_port();
    let mut command = flashgate(&redis.url(), &common::database_url());
    command
        .arg("worker")
        .env("FLASHGATE_METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLASHGATE_SWEEP_INTERVAL_MS", "100")
        .env("FLASHGATE_RECONCILE_INTERVAL_SECONDS", "86400")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _worker = Proc::spawn("flashgate worker", &mut command);
    let client = common::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        {
            let page = r.text().await.unwrap_or_default();
            if page.contains("flashgate_sweep_pass_seconds") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no worker metrics on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// The worker plans a SKU's next visit at its `ends_at` at the latest: a sale that
/// ends (with nothing to flush) retires within a sweep interval or two of its end, not
/// one hold length (up to a minute) later. Private Redis: the worker runs for real.
#[tokio::test]
async fn a_sale_retires_right_after_it_ends_under_the_running_worker() {
    let redis = RedisServer::start(None).await;
    let app =
        common::spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    shared_db().await;
    let sku = unique_sku("retire-on-time");
    let ends_in = Duration::from_millis(1_500);
    let ends_at = (chrono::Utc::now() + chrono::Duration::milliseconds(1_500))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    app.create_sku(
        &sku,
        json!({"stock": 5, "hold_seconds": 600, "ends_at": ends_at}),
    )
    .await;
    let defined = Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut settings = common::serve_args("", "").worker;
    settings.sweep_interval_ms = 200;
    settings.reconcile_interval_seconds = 86_400;
    let worker = tokio::spawn(
        flashgate::worker::Worker::new(app.store.clone(), app.db.clone()).run(settings, stopped),
    );
    let retired_after = loop {
        let indexed = app.store.sku_ids().await.unwrap();
        if !indexed.iter().any(|s| s.as_str() == sku) {
            break defined.elapsed();
        }
        assert!(
            defined.elapsed() < ends_in + Duration::from_secs(10),
            "not retired 10 s after its end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        retired_after >= ends_in,
        "retired before its end: {retired_after:?}"
    );
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// An admin PUT makes only its own SKU due for the worker, not every SKU on sale (a
/// burst of definitions must not turn into back-to-back passes over all of them).
#[tokio::test]
async fn an_admin_write_replans_only_its_sku() {
    let redis = RedisServer::start(None).await;
    let app =
        common::spawn_app_with(common::serve_args(&redis.url(), &common::database_url())).await;
    shared_db().await;
    let skus: Vec<String> = (0..30).map(|_| unique_sku("replan")).collect();
    for sku in &skus {
        app.create_sku(sku, json!({"stock": 5, "hold_seconds": 600}))
            .await;
    }
    // One pass visits them all; the next visits are a while away.
    app.worker.sweep_once().await.unwrap();
    assert_eq!(app.worker.due_for_sweep().await.unwrap(), vec![]);
    // Redefining one makes that one due, and no other.
    app.create_sku(&skus[7], json!({"stock": 6, "hold_seconds": 5}))
        .await;
    let due: Vec<String> = app
        .worker
        .due_for_sweep()
        .await
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(due, vec![skus[7].clone()]);
}
