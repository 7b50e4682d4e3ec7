//! Shared test harness: a real gateway on port 0 against the Redis and MariaDB that
//! `scripts/dev test` starts (FLASHGATE_REDIS_URL, FLASHGATE_DATABASE_URL), with typed
//! helpers. Tests isolate themselves by unique SKU ids.
#![allow(dead_code)]

use flashgate::config::{
    AdmissionSettings, ConnectionSettings, DatabaseArgs, JwtSettings, RedisArgs, ServeArgs,
    WorkerSettings,
};
use flashgate::ids::SkuId;
use flashgate::store::Store;
use flashgate::worker::Worker;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef";
pub mod model;
pub mod receiver;

pub const SERVICE_TOKEN: &str = "test-service-token-0123456789abcdef";

pub fn redis_url() -> String {
    std::env::var("FLASHGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390/1".into())
}

/// FLASHGATE_REDIS_CLUSTER=1: FLASHGATE_REDIS_URL lists the nodes of a Redis Cluster
/// (`scripts/dev test` runs the API suite a second time so).
pub fn redis_cluster() -> bool {
    std::env::var("FLASHGATE_REDIS_CLUSTER").is_ok_and(|v| v == "1" || v == "true")
}

pub fn database_url() -> String {
    std::env::var("FLASHGATE_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3316/flashgate_test".into())
}

/// A SKU id no other test (or earlier run) uses.
pub fn unique_sku(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn serve_args(redis_url: &str, database_url: &str) -> ServeArgs {
    ServeArgs {
        listen: "127.0.0.1:0".into(),
        metrics_listen: None,
        no_worker: true,
        jwt_secret: Some(JWT_SECRET.into()),
        service_token: SERVICE_TOKEN.into(),
        jwt: JwtSettings::default(),
        payment_grace_seconds: 300,
        idempotency_ttl_seconds: 86_400,
        // Off: race tests cancel and reserve again freely; tests/api/admission.rs turns
        // it on.
        max_released_holds_per_user: 0,
        queue_polls_per_second: flashgate::limits::QUEUE_POLLS_PER_SECOND,
        jwt_leeway_seconds: 0,
        id_key: None,
        id_key_previous: Vec::new(),
        connections: ConnectionSettings::default(),
        // Off: the race tests reserve hundreds of times from one address, some users
        // many times; tests/api/admission.rs turns the limits on.
        admission: AdmissionSettings::off(),
        redis: RedisArgs {
            redis_url: redis_url.into(),
            // Only the shared servers may be a cluster; tests that start their own
            // Redis pass its URL.
            redis_cluster: redis_cluster() && redis_url == self::redis_url(),
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 500,
        },
        database: DatabaseArgs {
            database_url: database_url.into(),
        },
        worker: WorkerSettings {
            sweep_interval_ms: 1000,
            reconcile_interval_seconds: 60,
            reconcile_repair: true,
            flush_claim_idle_ms: 30_000,
            events_retention_hours: 72,
            webhook_timeout_ms: 10_000,
            webhook_concurrency: flashgate::webhooks::ENDPOINT_CONCURRENCY as u64,
        },
    }
}

pub struct TestApp {
    pub base: String,
    pub client: Client,
    /// Drives sweeps and flushes step by step (the app runs with --no-worker).
    pub worker: Worker,
    pub store: Store,
    pub db: sqlx::MySqlPool,
    shutdown: watch::Sender<bool>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(serve_args(&redis_url(), &database_url())).await
}

pub async fn spawn_app_with(args: ServeArgs) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, rx) = watch::channel(false);
    let state = flashgate::server::build_state(&args)
        .await
        .expect("gateway builds");
    let store = state.gateway.store.clone();
    let db = state.gateway.db.clone();
    tokio::spawn(flashgate::server::run(listener, args, rx));
    tls_provider();
    let client = Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    TestApp {
        base,
        client,
        worker: Worker::new(store.clone(), db.clone()),
        store,
        db,
        shutdown,
    }
}

/// reqwest is built without a TLS provider of its own (see flashgate::auth::jwks):
/// call this before building a client.
pub fn tls_provider() {
    flashgate::auth::jwks::install_tls_provider();
}

/// A plain HTTP client.
pub fn client() -> Client {
    tls_provider();
    Client::new()
}

pub fn user_token(user: &str) -> String {
    flashgate::auth::issue_user_token(JWT_SECRET, user, 3600).unwrap()
}

pub async fn body(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let value = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, value)
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Defines a SKU; panics unless 200.
    pub async fn create_sku(&self, sku: &str, definition: Value) -> Value {
        let (status, value) = self.put_sku(sku, definition).await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value
    }

    pub async fn put_sku(&self, sku: &str, definition: Value) -> (StatusCode, Value) {
        body(
            self.client
                .put(self.url(&format!("/v1/admin/skus/{sku}")))
                .bearer_auth(SERVICE_TOKEN)
                .json(&definition)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn sku(&self, sku: &str) -> Value {
        let (status, value) = body(
            self.client
                .get(self.url(&format!("/v1/skus/{sku}")))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value
    }

    pub async fn reserve_raw(&self, sku: &str, user: &str, key: &str, quantity: u64) -> Response {
        self.client
            .post(self.url(&format!("/v1/skus/{sku}/reservations")))
            .bearer_auth(user_token(user))
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }))
            .send()
            .await
            .unwrap()
    }

    pub async fn reserve(
        &self,
        sku: &str,
        user: &str,
        key: &str,
        quantity: u64,
    ) -> (StatusCode, Value) {
        body(self.reserve_raw(sku, user, key, quantity).await).await
    }

    /// Reserves one unit; panics unless 201. Returns the reservation id.
    pub async fn hold(&self, sku: &str, user: &str) -> String {
        let (status, value) = self.reserve(sku, user, &format!("key-{user}"), 1).await;
        assert_eq!(status, StatusCode::CREATED, "{value}");
        value["reservation_id"].as_str().unwrap().to_owned()
    }

    /// A payment webhook (`confirm` or `payment-pending`) from the service.
    async fn payment_call(&self, id: &str, action: &str, payment_ref: &str) -> (StatusCode, Value) {
        body(
            self.client
                .post(self.url(&format!("/v1/reservations/{id}/{action}")))
                .bearer_auth(SERVICE_TOKEN)
                .json(&json!({ "payment_ref": payment_ref }))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn confirm(&self, id: &str, payment_ref: &str) -> (StatusCode, Value) {
        self.payment_call(id, "confirm", payment_ref).await
    }

    pub async fn payment_pending(&self, id: &str, payment_ref: &str) -> (StatusCode, Value) {
        self.payment_call(id, "payment-pending", payment_ref).await
    }

    /// `bearer` is a user token or the service token.
    pub async fn cancel(&self, id: &str, bearer: &str) -> (StatusCode, Value) {
        body(
            self.client
                .post(self.url(&format!("/v1/reservations/{id}/cancel")))
                .bearer_auth(bearer)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn reservation(&self, id: &str, bearer: &str) -> (StatusCode, Value) {
        body(
            self.client
                .get(self.url(&format!("/v1/reservations/{id}")))
                .bearer_auth(bearer)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn compensations(&self, query: &str) -> Vec<Value> {
        let (status, value) = body(
            self.client
                .get(self.url(&format!("/v1/compensations?{query}")))
                .bearer_auth(SERVICE_TOKEN)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value["items"].as_array().unwrap().clone()
    }

    /// Writes every outbox event of this SKU to MySQL. Only this SKU: other tests
    /// flush theirs at the same time, and entries they hold are not ours to wait on.
    /// (Every bucket's, for a SKU split over several.)
    /// Redis loses every key of one sale (a SKU, or one bucket of a split SKU named by
    /// its tag): a wipe, a failover that lost the writes, a restart without persistence.
    pub async fn lose_sale(&self, tag: &str) {
        let keys = flashgate::keys::SkuKeys::for_tag(tag);
        let mut conn = self.store.connection();
        let _: () = redis::cmd("DEL")
            .arg(&keys.sale()[..])
            .arg(&keys.transfers)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// One reconciler pass over this SKU alone, repairing or not.
    pub async fn reconcile(
        &self,
        sku: &str,
        repair: bool,
    ) -> flashgate::reconcile::ReconcileReport {
        flashgate::reconcile::run_skus(&self.store, &self.db, &[Self::sku_id(sku)], repair)
            .await
            .unwrap()
    }

    pub async fn flush(&self, sku: &str) {
        let sku = Self::sku_id(sku);
        let buckets = self.store.bucket_count(&sku).await.unwrap().unwrap_or(1);
        for sale in flashgate::buckets::sales(&sku, buckets) {
            self.flush_sale(&sale).await;
        }
    }

    async fn flush_sale(&self, sale: &SkuId) {
        for _ in 0..1000 {
            self.worker.flush_sku(sale).await.expect("flush");
            if self.store.outbox_backlog(sale).await.expect("backlog") == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the outbox of {sale} did not drain");
    }

    /// The contract's invariant 1, read from the API; returns the SKU view.
    pub async fn assert_stock_adds_up(&self, sku: &str) -> Value {
        let view = self.sku(sku).await;
        let n = |f: &str| view[f].as_u64().unwrap_or_else(|| panic!("{f} in {view}"));
        assert_eq!(
            n("available") + n("held") + n("sold"),
            n("stock_total"),
            "available + held + sold != stock_total: {view}"
        );
        view
    }

    /// Units MySQL records as sold for the SKU (after a flush).
    pub async fn mysql_sold(&self, sku: &str) -> u64 {
        sqlx::query_scalar::<_, u64>("SELECT sold FROM skus WHERE sku = ?")
            .bind(sku)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub async fn mysql_sales_count(&self, sku: &str) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sales WHERE sku = ?")
            .bind(sku)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub async fn mysql_compensations(&self, sku: &str) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM compensations WHERE sku = ?")
            .bind(sku)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub fn sku_id(sku: &str) -> SkuId {
        SkuId::parse(sku).unwrap()
    }
}
