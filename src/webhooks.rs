//! Webhooks (contract v1.2): each event of a type an endpoint wants is POSTed to it,
//! signed the Standard Webhooks way, at least once. Owns the endpoint's settings
//! (URL, secret), the signature and the delivery loop; never blocks a sale, the flush
//! or another endpoint on an endpoint's answer.
//!
//! Deliveries live in MySQL (`webhook_deliveries`, db::webhooks): the worker queues
//! the events after each endpoint's `queued_to`, claims due ones with a lease (`SELECT
//! … FOR UPDATE SKIP LOCKED` moving `next_attempt_at` past the request's timeout), so
//! two workers never send one event to one endpoint at once and a killed worker's
//! claim comes due again. A 2xx within DELIVERY_TIMEOUT is delivered; anything else
//! (an error status, a redirect, a timeout, a closed connection) is retried after
//! ~1 s doubling to at most an hour, with jitter, until RETRY_WINDOW has passed since
//! it was queued, then failed (listed, replayable).
//!
//! Latency: an endpoint's task queues new events as soon as the flush of this process
//! wrote some (and every IDLE_POLL for other writers); it claims deliveries ahead of
//! its requests (up to CLAIM_AHEAD, one transaction for many) and starts each as soon
//! as a request's place is free, so no request waits for a claim; the outcomes are
//! recorded in batches, one commit for many.
//!
//! Isolation: each endpoint has its own task, at most its concurrency
//! (FLASHGATE_WEBHOOK_CONCURRENCY, ENDPOINT_CONCURRENCY by default) of requests in
//! flight, at most CLAIM_AHEAD deliveries claimed and not sent (each started within
//! START_WINDOW_TIMEOUTS of its claim or released, so none outlives its lease) and at
//! most RECORD_BATCH outcomes waiting to be recorded, and reads at most
//! RESPONSE_BODY_MAX bytes of an answer: a slow, dead or hostile endpoint holds
//! bounded memory and delays only itself.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use futures::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::mysql::MySqlPool;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::db::webhooks::{self as rows, Attempt, Claimed, Endpoint};
use crate::error::Result;
use crate::telemetry;

/// A 2xx must come within this (the contract's 10 s), body included.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting may take at most this (within DELIVERY_TIMEOUT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of an answer read at most (kept for the delivery's `last_error`); the rest is
/// never read.
pub const RESPONSE_BODY_MAX: usize = 16 * 1024;
/// A claim's lease, in request timeouts: longer than a claimed delivery can take (it
/// starts within START_WINDOW_TIMEOUTS of its claim, its request is bounded by the
/// timeout, its outcome recorded right after), so a live worker's claim never ends
/// under it and no second worker sends it meanwhile; a killed worker's deliveries come
/// due again after it.
pub const LEASE_TIMEOUTS: u32 = 3;
/// A claimed delivery starts within this many request timeouts of its claim, or is
/// released unsent: the rest of the lease (LEASE_TIMEOUTS − this) covers its request
/// and the record of its outcome, with a timeout to spare.
pub const START_WINDOW_TIMEOUTS: u32 = 1;
const _: () = assert!(START_WINDOW_TIMEOUTS + 2 <= LEASE_TIMEOUTS);
/// Deliveries one endpoint's task holds claimed ahead of its requests at most (claimed,
/// not sent yet), topped up by a claim once half are sent. A claim is one MySQL
/// transaction, a few round trips and a commit whatever its size: claimed a few at a
/// time, as requests ended, the claims bounded the sending (~2,400 deliveries/s to one
/// endpoint during a sale on 2 cores, behind a burst of ~4,700 events). Each holds its
/// event's document (a few hundred bytes).
pub const CLAIM_AHEAD: usize = 256;

/// How long a stopping worker waits for its endpoints' tasks to give back their claims
/// and record the outcomes of their requests in flight (a deploy should not wait for a
/// hanging endpoint's full timeout).
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The lease with the contract's timeout.
pub const LEASE: Duration = Duration::from_secs(DELIVERY_TIMEOUT.as_secs() * LEASE_TIMEOUTS as u64);
/// Requests in flight to one endpoint at most, by default
/// (FLASHGATE_WEBHOOK_CONCURRENCY, at most ENDPOINT_CONCURRENCY_MAX).
pub const ENDPOINT_CONCURRENCY: usize = 32;
/// The most FLASHGATE_WEBHOOK_CONCURRENCY may be: what one endpoint may cost this
/// process at most (connections, attempts' tasks, answers' prefixes).
pub const ENDPOINT_CONCURRENCY_MAX: usize = 256;
/// Outcomes of one endpoint recorded in one transaction at most; also how many may
/// wait to be recorded (attempts that ended hold their request's place until then).
pub const RECORD_BATCH: usize = 256;
/// Events looked at per queueing step of one endpoint.
pub const ENQUEUE_BATCH: u32 = 1000;
/// The first retry waits about this; each further one twice as long ...
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// ... up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// A delivery is retried at least this long after it was queued, then failed.
pub const RETRY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How often an idle endpoint's task looks for new events (events written by another
/// process) and for retries come due; the flush of this process wakes it at once.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How often the set of endpoints is read again.
const ENDPOINTS_REFRESH: Duration = Duration::from_secs(2);

/// How often a PUT that changed an endpoint looks whether the requests under its
/// former settings have ended.
const WAIT_OUT_POLL: Duration = Duration::from_millis(10);

/// Waits until the attempts of `leases` (deliveries claimed under an endpoint's former
/// settings, db::webhooks::put) have ended and been recorded, or their leases have
/// ended: then no request under those settings is in flight, and none can start (no
/// claim is made under them any more). At most LEASE (a worker killed holding a claim
/// never records it); normally one request's time (DELIVERY_TIMEOUT at most). False
/// when it stopped at the bound.
pub async fn wait_out(db: &MySqlPool, name: &str, leases: &[rows::Lease]) -> Result<bool> {
    let started = std::time::Instant::now();
    let now_ms = SystemClock.now_ms();
    let last_end_ms = leases.iter().map(|l| l.until_ms).max().unwrap_or(now_ms);
    let bound = Duration::from_millis((last_end_ms - now_ms).max(0) as u64).min(LEASE);
    loop {
        if rows::leases_held(db, name, leases).await? == 0 {
            return Ok(true);
        }
        if started.elapsed() >= bound {
            tracing::warn!(webhook = %name, leases = leases.len(),
                "webhook changed while claims under its former settings were held; their leases ended");
            return Ok(false);
        }
        tokio::time::sleep(WAIT_OUT_POLL).await;
    }
}

/// Now, in ms since the epoch: the system's, or a test's that moves when told.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that starts at the system's time and moves only by `advance`.
#[derive(Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(SystemClock.now_ms())))
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// `whsec_` + base64 of 24..=64 bytes: the key's bytes.
pub fn parse_secret(raw: &str) -> Option<Vec<u8>> {
    let encoded = raw.strip_prefix("whsec_")?;
    let key = STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

/// An http(s) URL with a host, at most 2048 bytes. Loopback is allowed: the holder of
/// the service token is trusted (contract).
pub fn parse_url(raw: &str) -> Option<reqwest::Url> {
    if raw.len() > 2048 {
        return None;
    }
    let url = reqwest::Url::parse(raw).ok()?;
    (matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty()))
        .then_some(url)
}

/// The URL without its credentials, for logs and answers.
pub fn redacted_url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut url) => {
            if !url.username().is_empty() || url.password().is_some() {
                let _ = url.set_username("");
                let _ = url.set_password(None);
            }
            url.to_string()
        }
        Err(_) => "(invalid url)".into(),
    }
}

/// `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The wait before retry `attempts` (1 after the first failure): BACKOFF_FIRST
/// doubling, at most BACKOFF_MAX, times a jitter in [0.8, 1.2).
pub fn backoff(attempts: u32, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    let base = BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// A claimed delivery not sent yet (`send_loop`).
struct Ready {
    claimed: Claimed,
    /// Started after this, its request could outlast the lease: released instead.
    start_by_ms: i64,
    /// The lease's end as the claim wrote it (`next_attempt_at`).
    leased_until_ms: i64,
}

/// What one step of one endpoint did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepReport {
    pub attempted: u64,
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
}

/// Sends deliveries. Cheap to clone; several may run against one database.
#[derive(Clone)]
pub struct Deliverer {
    pub db: MySqlPool,
    client: reqwest::Client,
    pub clock: Arc<dyn Clock>,
    /// Names this deliverer's claims (unique per process and deliverer).
    pub owner: String,
    /// Only these endpoints (tests that share a database); None: all.
    only: Option<Vec<String>>,
    /// How long a claim holds (LEASE_TIMEOUTS request timeouts).
    lease: Duration,
    /// Requests in flight to one endpoint at most (ENDPOINT_CONCURRENCY by default).
    concurrency: usize,
    timeout: Duration,
    /// Changes when this process's flush wrote events (Worker::events_written).
    wake: Option<watch::Receiver<()>>,
}

impl Deliverer {
    pub fn new(db: MySqlPool, clock: Arc<dyn Clock>) -> Deliverer {
        Deliverer {
            db,
            client: client(DELIVERY_TIMEOUT, ENDPOINT_CONCURRENCY),
            clock,
            owner: format!("{}-{}", std::process::id(), crate::ids::random_name()),
            only: None,
            lease: LEASE,
            concurrency: ENDPOINT_CONCURRENCY,
            timeout: DELIVERY_TIMEOUT,
            wake: None,
        }
    }

    /// Queues new events as soon as `wake` changes (the flush wrote some), not only
    /// every IDLE_POLL.
    pub fn woken_by(mut self, wake: watch::Receiver<()>) -> Deliverer {
        self.wake = Some(wake);
        self
    }

    /// Runs only these endpoints (tests sharing one database).
    pub fn only(mut self, names: &[&str]) -> Deliverer {
        self.only = Some(names.iter().map(|n| n.to_string()).collect());
        self
    }

    /// Another request timeout than the contract's DELIVERY_TIMEOUT (tests, which
    /// make the network's time short instead of sleeping it).
    pub fn with_timeout(mut self, timeout: Duration) -> Deliverer {
        self.client = client(timeout, self.concurrency);
        self.timeout = timeout;
        self.lease = timeout * LEASE_TIMEOUTS;
        self
    }

    /// At most `concurrency` requests in flight to one endpoint (1 to
    /// ENDPOINT_CONCURRENCY_MAX); `step` claims as many at a time.
    pub fn with_concurrency(mut self, concurrency: usize) -> Deliverer {
        self.concurrency = concurrency.clamp(1, ENDPOINT_CONCURRENCY_MAX);
        self.client = client(self.timeout, self.concurrency);
        self
    }

    /// One step for one endpoint: queue its new events, claim what is due, send it
    /// (all at once, at most the concurrency), record each outcome. Call until it attempts
    /// nothing to drain what is due now.
    pub async fn step(&self, endpoint: &Endpoint) -> Result<StepReport> {
        let mut report = StepReport::default();
        if !endpoint.enabled {
            return Ok(report);
        }
        let now_ms = self.clock.now_ms();
        rows::enqueue(&self.db, &endpoint.name, now_ms, ENQUEUE_BATCH).await?;
        // Only while the endpoint is as MySQL has it now: a task still holding an older
        // version (a PUT moved its URL or secret, disabled or deleted it since its last
        // refresh) claims nothing, so no event goes to the old URL once the PUT answered.
        let Some(claimed) = rows::claim_current(
            &self.db,
            endpoint,
            &self.owner,
            now_ms,
            self.lease.as_millis() as i64,
            self.concurrency as u32,
        )
        .await?
        else {
            return Ok(report);
        };
        let Some(key) = parse_secret(&endpoint.secret) else {
            tracing::error!(webhook = %endpoint.name, "webhook secret unreadable; deliveries wait");
            return Ok(report);
        };
        let url = endpoint.url.clone();
        // Each outcome is recorded as soon as its attempt ends, the records running side
        // by side: one slow attempt never holds back the others' records, and a step
        // costs about one query's time, not one per delivery (under load that was most
        // of the step, and the delivery rate).
        let outcomes: Vec<Result<Attempt>> = stream::iter(claimed)
            .map(|claimed| {
                let (key, url) = (&key, &url);
                async move {
                    let attempt = self.attempt(endpoint, url, key, &claimed).await;
                    telemetry::webhook_attempt(&endpoint.name, &attempt);
                    rows::finish(
                        &self.db,
                        &endpoint.name,
                        claimed.position,
                        &self.owner,
                        self.clock.now_ms(),
                        &attempt,
                    )
                    .await?;
                    Ok(attempt)
                }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for outcome in outcomes {
            let attempt = outcome?;
            report.attempted += 1;
            match &attempt {
                Attempt::Delivered { .. } => report.delivered += 1,
                Attempt::Retry { .. } => report.retried += 1,
                Attempt::Failed { .. } => report.failed += 1,
            }
        }
        Ok(report)
    }

    async fn attempt(
        &self,
        endpoint: &Endpoint,
        url: &str,
        key: &[u8],
        claimed: &Claimed,
    ) -> Attempt {
        let Some(event) = &claimed.event else {
            return Attempt::Failed {
                status: None,
                error: "the event is past its retention".into(),
            };
        };
        let body = event.document().to_string();
        // The send time by the system's clock: what the receiver checks against its own.
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(key, &event.id, timestamp, body.as_bytes());
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let (status, error) = match sent {
            Ok(mut response) => {
                let status = response.status();
                // Read a bounded prefix of the answer (the whole answer must come
                // within the timeout), for the record; never more.
                let mut kept = Vec::new();
                let read = loop {
                    match response.chunk().await {
                        Ok(Some(chunk)) => {
                            let room = RESPONSE_BODY_MAX.saturating_sub(kept.len());
                            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                            if kept.len() >= RESPONSE_BODY_MAX {
                                break Ok(());
                            }
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                match read {
                    Ok(()) if status.is_success() => {
                        return Attempt::Delivered {
                            status: status.as_u16(),
                        }
                    }
                    Ok(()) if status.is_redirection() => (
                        Some(status.as_u16()),
                        "a redirect (not followed)".to_owned(),
                    ),
                    Ok(()) => (
                        Some(status.as_u16()),
                        format!(
                            "answered {status}: {}",
                            String::from_utf8_lossy(&kept[..kept.len().min(120)])
                        ),
                    ),
                    Err(e) => (Some(status.as_u16()), describe(&e)),
                }
            }
            Err(e) => (None, describe(&e)),
        };
        let now_ms = self.clock.now_ms();
        if now_ms - claimed.first_queued_at_ms >= RETRY_WINDOW.as_millis() as i64 {
            tracing::warn!(webhook = %endpoint.name, event_id = %event.id, attempts = claimed.attempts,
                error = %error, "webhook delivery failed for good");
            return Attempt::Failed { status, error };
        }
        let wait = backoff(claimed.attempts, rand::random::<f64>());
        tracing::debug!(webhook = %endpoint.name, url = %redacted_url(url), event_id = %event.id,
            attempts = claimed.attempts, ?wait, error = %error, "webhook delivery failed; retried");
        Attempt::Retry {
            status,
            error,
            retry_at_ms: now_ms + wait.as_millis() as i64,
        }
    }

    /// Publishes each endpoint's lag: the age of its oldest event not delivered yet.
    pub async fn measure_lag(&self, endpoints: &[Endpoint]) -> Result<()> {
        let now_ms = self.clock.now_ms();
        let oldest: HashMap<String, i64> =
            rows::oldest_pending(&self.db).await?.into_iter().collect();
        for endpoint in endpoints {
            let lag_ms = oldest
                .get(&endpoint.name)
                .map_or(0, |at| (now_ms - at).max(0));
            telemetry::webhook_lag(&endpoint.name, Duration::from_millis(lag_ms as u64));
        }
        Ok(())
    }

    /// Runs one task per enabled endpoint until shutdown (each polls its deliveries on
    /// its own: an endpoint that hangs holds only its own task), re-reading the
    /// endpoints every ENDPOINTS_REFRESH.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        type Task = (Endpoint, tokio::task::JoinHandle<()>, watch::Sender<bool>);
        let mut tasks: HashMap<String, Task> = HashMap::new();
        // Tasks of endpoints changed or disabled since they started: told to stop, they
        // claim nothing more and end once their attempts in flight are recorded (the
        // PUT that changed the endpoint waits for those, webhooks::wait_out).
        let mut draining: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        loop {
            match rows::list(&self.db).await {
                Ok(mut endpoints) => {
                    // A deleted endpoint's series go (its DELETE, answered by another
                    // process perhaps, cannot reach this one's).
                    telemetry::retain_webhooks(|name| endpoints.iter().any(|e| e.name == name));
                    if let Some(only) = &self.only {
                        endpoints.retain(|e| only.contains(&e.name));
                    }
                    draining.retain(|task| !task.is_finished());
                    let stale: Vec<String> = tasks
                        .iter()
                        .filter(|(_, (known, task, _))| {
                            task.is_finished() || !endpoints.iter().any(|e| e == known && e.enabled)
                        })
                        .map(|(name, _)| name.clone())
                        .collect();
                    for name in stale {
                        let (_, task, stop) = tasks.remove(&name).expect("listed above");
                        if endpoints.iter().any(|e| e.name == name) {
                            let _ = stop.send(true);
                            draining.push(task);
                        } else {
                            // Deleted: its deliveries are gone, nothing to record.
                            task.abort();
                        }
                        tracing::debug!(webhook = %name, "webhook task stopped");
                    }
                    for endpoint in endpoints.iter().filter(|e| e.enabled) {
                        if !tasks.contains_key(&endpoint.name) {
                            let (stop, stopped) = watch::channel(false);
                            let task =
                                tokio::spawn(self.clone().endpoint_loop(endpoint.clone(), stopped));
                            tasks.insert(endpoint.name.clone(), (endpoint.clone(), task, stop));
                        }
                    }
                    if let Err(e) = self.measure_lag(&endpoints).await {
                        tracing::warn!(error = %e, "webhook lag could not be measured");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "webhook endpoints could not be read"),
            }
            tokio::select! {
                _ = tokio::time::sleep(ENDPOINTS_REFRESH) => {}
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
            }
        }
        // Told to stop, each endpoint's task claims nothing more, gives back what it
        // claimed ahead (due again at once, for another worker) and records the
        // attempts in flight that end within STOP_GRACE. What is still running then (a
        // slow or hanging endpoint) is cut short: its claims come due after the lease.
        let mut stopping: Vec<tokio::task::JoinHandle<()>> = draining;
        for (_, (_, task, stop)) in tasks {
            let _ = stop.send(true);
            stopping.push(task);
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for task in &mut stopping {
            if tokio::time::timeout_at(deadline, &mut *task).await.is_err() {
                task.abort();
            }
        }
    }

    /// One endpoint until `stop` (then it claims nothing more, gives back what it
    /// claimed ahead and returns once its attempts in flight are recorded) or until
    /// `run` aborts it (a deleted endpoint, or a stop that outlasted its grace: attempts
    /// in flight are cut short, their claims come due again after the lease): new events queued as
    /// they are written, requests pipelined, outcomes recorded in batches.
    async fn endpoint_loop(self, endpoint: Endpoint, mut shutdown: watch::Receiver<bool>) {
        let Some(key) = parse_secret(&endpoint.secret) else {
            tracing::error!(webhook = %endpoint.name, "webhook secret unreadable; deliveries wait");
            let _ = shutdown.wait_for(|stop| *stop).await;
            return;
        };
        let queued = Notify::new();
        let (ended, to_record) = mpsc::channel(RECORD_BATCH);
        let this = Arc::new(self);
        let endpoint = Arc::new(endpoint);
        tokio::join!(
            this.queue_loop(&endpoint, &queued, shutdown.clone()),
            this.clone()
                .send_loop(endpoint.clone(), key.into(), &queued, ended, shutdown),
            this.record_loop(&endpoint, to_record),
        );
    }

    /// Queues the endpoint's new events: at once when this process's flush wrote some,
    /// batch after batch while there are more, else every IDLE_POLL (other writers).
    async fn queue_loop(
        &self,
        endpoint: &Endpoint,
        queued: &Notify,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut wake = self.wake.clone();
        let mut backoff_ms = 0u64;
        while !*shutdown.borrow() {
            if let Some(wake) = &mut wake {
                wake.borrow_and_update();
            }
            let now_ms = self.clock.now_ms();
            let wait = match rows::enqueue(&self.db, &endpoint.name, now_ms, ENQUEUE_BATCH).await {
                Ok(looked) => {
                    backoff_ms = 0;
                    if looked > 0 {
                        queued.notify_one();
                    }
                    if looked >= ENQUEUE_BATCH as u64 {
                        continue;
                    }
                    IDLE_POLL
                }
                Err(e) => {
                    backoff_ms = (backoff_ms * 2).clamp(250, 5_000);
                    tracing::warn!(webhook = %endpoint.name, error = %e, "webhook deliveries could not be queued");
                    Duration::from_millis(backoff_ms)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = woken(&mut wake), if backoff_ms == 0 => {}
                changed = shutdown.changed() => if changed.is_err() { break },
            }
        }
    }

    /// Keeps up to CLAIM_AHEAD due deliveries claimed ahead of the requests (a claim of
    /// many while the last claim's requests run, topped up once half are sent), and
    /// starts each as soon as a request's place is free: no request waits for a claim's
    /// transaction, and one claim feeds many requests. A claimed delivery starts only
    /// within START_WINDOW_TIMEOUTS of its claim, so its lease outlasts its request and the
    /// record of its outcome; one that could not start by then (all places held by a
    /// slow endpoint) is released, due again at once. Each outcome goes to
    /// `record_loop`; its place is free once it is handed over. Told to stop, it
    /// releases what it has not sent.
    async fn send_loop(
        self: Arc<Self>,
        endpoint: Arc<Endpoint>,
        key: Arc<[u8]>,
        queued: &Notify,
        ended: mpsc::Sender<(u64, Attempt)>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        type Claiming = std::pin::Pin<
            Box<
                dyn std::future::Future<Output = (usize, i64, Result<Option<Vec<Claimed>>>)> + Send,
            >,
        >;
        let places = Arc::new(Semaphore::new(self.concurrency));
        // Aborted with this task.
        let mut attempts = tokio::task::JoinSet::new();
        // Claimed, not sent yet, oldest first.
        let mut ready: VecDeque<Ready> = VecDeque::new();
        let mut claiming: Option<Claiming> = None;
        // Nothing more was due, or the claim failed: no claim before this (or, when
        // idle, before new events are queued).
        let mut rest_until: Option<tokio::time::Instant> = None;
        let mut backoff_ms = 0u64;
        let lease_ms = self.lease.as_millis() as i64;
        let start_window_ms = (self.timeout * START_WINDOW_TIMEOUTS).as_millis() as i64;
        loop {
            while attempts.try_join_next().is_some() {}
            if *shutdown.borrow() {
                break;
            }
            if claiming.is_none() && rest_until.is_none() && ready.len() <= CLAIM_AHEAD / 2 {
                let asked = CLAIM_AHEAD - ready.len();
                let (this, endpoint) = (self.clone(), endpoint.clone());
                claiming = Some(Box::pin(async move {
                    let now_ms = this.clock.now_ms();
                    let claimed = rows::claim_current(
                        &this.db,
                        &endpoint,
                        &this.owner,
                        now_ms,
                        lease_ms,
                        asked as u32,
                    )
                    .await;
                    (asked, now_ms, claimed)
                }));
            }
            tokio::select! {
                (asked, claimed_at_ms, claimed) = async { claiming.as_mut().expect("guarded").await },
                    if claiming.is_some() =>
                {
                    claiming = None;
                    match claimed {
                        Ok(Some(claimed)) => {
                            backoff_ms = 0;
                            // Fewer than asked: nothing else is due until new events are
                            // queued or a retry comes due.
                            if claimed.len() < asked {
                                rest_until = Some(tokio::time::Instant::now() + IDLE_POLL);
                            }
                            ready.extend(claimed.into_iter().map(|claimed| Ready {
                                claimed,
                                start_by_ms: claimed_at_ms + start_window_ms,
                                leased_until_ms: claimed_at_ms + lease_ms,
                            }));
                        }
                        // Changed since this task started: the next refresh replaces it.
                        // What it claimed under the former settings is not sent (the
                        // PUT that changed them waits for it to be given back).
                        Ok(None) => {
                            attempts.spawn(self.clone().release(endpoint.clone(), ready.drain(..).collect()));
                            rest_until = Some(tokio::time::Instant::now() + IDLE_POLL);
                        }
                        Err(e) => {
                            backoff_ms = (backoff_ms * 2).clamp(250, 5_000);
                            tracing::warn!(webhook = %endpoint.name, error = %e, "webhook deliveries could not be claimed");
                            rest_until = Some(tokio::time::Instant::now() + Duration::from_millis(backoff_ms));
                        }
                    }
                }
                place = places.clone().acquire_owned(), if !ready.is_empty() => {
                    let place = place.expect("never closed");
                    let now_ms = self.clock.now_ms();
                    if ready.front().is_some_and(|r| r.start_by_ms < now_ms) {
                        // Claims are made one after another: the late ones are in front.
                        // Given back with everything claimed after them, so that the
                        // next claim takes them again in their order: sent now, the
                        // later ones would overtake them (one SKU's events out of
                        // sequence at an endpoint that is only slow). Awaited: a claim
                        // made before the release commits would skip them and take the
                        // later ones first.
                        drop(place);
                        let unsent = ready.drain(..).collect();
                        self.clone().release(endpoint.clone(), unsent).await;
                        continue;
                    }
                    let claimed = ready.pop_front().expect("guarded").claimed;
                    let (this, endpoint, key, ended) =
                        (self.clone(), endpoint.clone(), key.clone(), ended.clone());
                    attempts.spawn(async move {
                        let attempt = this.attempt(&endpoint, &endpoint.url, &key, &claimed).await;
                        telemetry::webhook_attempt(&endpoint.name, &attempt);
                        let _ = ended.send((claimed.position, attempt)).await;
                        drop(place);
                    });
                }
                _ = tokio::time::sleep_until(rest_until.unwrap_or_else(tokio::time::Instant::now)),
                    if rest_until.is_some() && claiming.is_none() => rest_until = None,
                _ = queued.notified(), if rest_until.is_some() && backoff_ms == 0 => rest_until = None,
                changed = shutdown.changed() => if changed.is_err() { break },
            }
        }
        // Told to stop: a claim under way ends (its transaction may have committed), and
        // what was claimed and not sent is released, so no lease is left to lapse (a PUT
        // that changed the endpoint waits for them: `wait_out`).
        if let Some(claiming) = claiming.take() {
            if let (_, claimed_at_ms, Ok(Some(claimed))) = claiming.await {
                ready.extend(claimed.into_iter().map(|claimed| Ready {
                    claimed,
                    start_by_ms: claimed_at_ms,
                    leased_until_ms: claimed_at_ms + lease_ms,
                }));
            }
        }
        attempts.spawn(
            self.clone()
                .release(endpoint.clone(), ready.drain(..).collect()),
        );
        // The attempts in flight end (each within the request's timeout) and hand their
        // outcomes over, so their claims are recorded, not left to lapse.
        while attempts.join_next().await.is_some() {}
    }

    /// Gives claimed deliveries that were not sent back: due at once, their attempt not
    /// counted. Not released (MySQL down), they are due again when their lease ends.
    async fn release(self: Arc<Self>, endpoint: Arc<Endpoint>, unsent: Vec<Ready>) {
        if unsent.is_empty() {
            return;
        }
        let leases: Vec<rows::Lease> = unsent
            .iter()
            .map(|r| rows::Lease {
                position: r.claimed.position,
                owner: self.owner.clone(),
                until_ms: r.leased_until_ms,
            })
            .collect();
        if let Err(e) = rows::release(&self.db, &endpoint.name, &leases, self.clock.now_ms()).await
        {
            tracing::warn!(webhook = %endpoint.name, error = %e, deliveries = unsent.len(),
                "claimed webhook deliveries could not be released; due again when their lease ends");
        }
    }

    /// Records the outcomes as they come, all that are waiting in one transaction (up
    /// to RECORD_BATCH). A batch that cannot be recorded (MySQL down) is tried again:
    /// meanwhile the outcomes waiting fill up and no new request starts. A delivery
    /// whose outcome is late stays claimed until its lease ends; recorded after that,
    /// a failure no longer counts (another worker may hold it) and a success does.
    async fn record_loop(
        &self,
        endpoint: &Endpoint,
        mut to_record: mpsc::Receiver<(u64, Attempt)>,
    ) {
        let mut batch = Vec::with_capacity(RECORD_BATCH);
        while to_record.recv_many(&mut batch, RECORD_BATCH).await > 0 {
            let mut backoff_ms = 0u64;
            while let Err(e) = rows::finish_many(
                &self.db,
                &endpoint.name,
                &self.owner,
                self.clock.now_ms(),
                &batch,
            )
            .await
            {
                backoff_ms = (backoff_ms * 2).clamp(250, 5_000);
                tracing::warn!(webhook = %endpoint.name, error = %e, outcomes = batch.len(),
                    "webhook outcomes could not be recorded; retried");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            }
            batch.clear();
        }
    }
}

/// Returns when `wake` changes; never when there is none (or its sender is gone).
async fn woken(wake: &mut Option<watch::Receiver<()>>) {
    if let Some(rx) = wake {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// No redirects (a redirect is a failed attempt), a timeout over the whole exchange
/// (an answer trickling in byte by byte counts), few idle connections per endpoint.
fn client(timeout: Duration, concurrency: usize) -> reqwest::Client {
    crate::auth::jwks::install_tls_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .pool_max_idle_per_host(concurrency)
        .user_agent(concat!("flashgate-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the webhook client builds")
}

/// An error in a few words, never with the URL (it may carry credentials).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else if e.is_request() {
        "the request failed (connection closed?)"
    } else {
        "failed"
    };
    kind.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_whsec_and_24_to_64_bytes() {
        let of = |n: usize| format!("whsec_{}", STANDARD.encode(vec![7u8; n]));
        assert!(parse_secret(&of(23)).is_none());
        assert_eq!(parse_secret(&of(24)).unwrap().len(), 24);
        assert_eq!(parse_secret(&of(64)).unwrap().len(), 64);
        assert!(parse_secret(&of(65)).is_none());
        assert!(parse_secret(&STANDARD.encode([1u8; 32])).is_none());
        assert!(parse_secret("whsec_!!!").is_none());
    }

    #[test]
    fn urls_are_http_or_https_and_credentials_never_shown() {
        assert!(parse_url("https://example.com/hook").is_some());
        assert!(parse_url("http://127.0.0.1:9/x").is_some());
        for bad in [
            "ftp://example.com/",
            "example.com",
            "http://",
            "file:///etc/passwd",
            "",
        ] {
            assert!(parse_url(bad).is_none(), "{bad}");
        }
        assert_eq!(
            redacted_url("https://user:pw@example.com/hook?x=1"),
            "https://example.com/hook?x=1"
        );
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks reference implementations.
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn backoff_doubles_from_a_second_to_an_hour_with_jitter() {
        assert_eq!(backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(2, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(5, 0.5), Duration::from_secs(16));
        assert_eq!(backoff(30, 0.5), Duration::from_secs(3600));
        assert!(backoff(3, 0.0) < backoff(3, 1.0));
        assert!(backoff(3, 0.0) >= Duration::from_millis(3200));
        // Retrying until the window closes takes well over 24 h of attempts.
        let mut waited = Duration::ZERO;
        let mut attempts = 0;
        while waited < RETRY_WINDOW {
            attempts += 1;
            waited += backoff(attempts, 0.0);
        }
        assert!(attempts > 24, "{attempts}");
    }
}
