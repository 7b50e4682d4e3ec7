//! Redis: the connection (single node or cluster, reconnecting, with timeouts) and one
//! typed wrapper per script in `lua/`. Raw script replies never leave this module.
//! Only these scripts change a SKU's stock keys.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamId;
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, Value};

use crate::config::RedisArgs;
use crate::error::{Error, Outcome, Result};
use crate::ids::SkuId;
use crate::keys::{
    SkuKeys, COMPENSATION_INDEX, FLUSH_GROUP, SKU_CHANGES, SKU_INDEX, SKU_INDEX_GENERATION,
};
use crate::limits;
use crate::reservation::{
    Compensation, CompensationReason, Refusal, Reservation, Resolution, Sku, SkuDefinition, Status,
    WaitingRoom,
};

pub use crate::lua::{script_with_clock, with_sale_keys, FunctionCall, SCRIPTS};

/// A join or a ticket read of a waiting room, as `Store::queue_batch` sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRequest {
    pub mode: QueueMode,
    pub user_id: String,
    /// join: the user's secret draw for a shuffled pre-queue (lua/queue.lua ARGV).
    pub draw: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMode {
    Join,
    Ticket,
}

impl QueueMode {
    fn word(self) -> &'static str {
        match self {
            QueueMode::Join => "join",
            QueueMode::Ticket => "ticket",
        }
    }
}

/// What a reserve's admission token told the gateway (src/queue.rs, lua/reserve.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// No token (or one that is not good): a SKU with a waiting room refuses it.
    None,
    /// A token of this user and SKU before its deadline: the script spends it.
    Admitted,
    /// A token of this user and SKU past its deadline: it may only replay its key.
    Lapsed,
}

/// How long after its take a transfer's own caller may still give (src/buckets.rs);
/// past it only `finish_transfers`, which waits much longer, does.
pub const TRANSFER_LEASE: std::time::Duration = std::time::Duration::from_secs(1);

/// The times of the transfer protocol (src/buckets.rs): its caller's lease, and the
/// age past which a finisher takes a transfer over. The explorer shortens both.
#[derive(Debug, Clone, Copy)]
pub struct TransferTiming {
    pub lease: std::time::Duration,
    pub stale: std::time::Duration,
    /// How long after its giver read a transfer (by the donor's Redis clock) a give is
    /// taken (lib.lua give_units): longer than the lease, and than the clocks of two
    /// Redis primaries may differ.
    pub give_window: std::time::Duration,
}

impl Default for TransferTiming {
    fn default() -> TransferTiming {
        TransferTiming {
            lease: TRANSFER_LEASE,
            stale: limits::TRANSFER_STALE,
            give_window: limits::TRANSFER_GIVE_WINDOW,
        }
    }
}

/// One multiplexed connection, cloned per request (no pool checkout round trip).
/// The single-node manager reconnects by itself after a Redis restart; the cluster
/// connection follows slot moves and failovers.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// A command sent on a connection that dropped under it (Redis restarted, failed
/// over) is sent once more, on the connection the manager has re-established: the
/// first command after a restart would otherwise fail although Redis is back. Safe
/// because every command we send is idempotent for its caller: reserve by idempotency
/// key, confirm by payment_ref (and the same compensation id), cancel and
/// payment-pending by state, the rest are reads or absolute writes. A timeout is not
/// retried: Redis is there but slow, and waiting twice would only double the wait.
fn worth_retrying(err: &redis::RedisError) -> bool {
    err.is_connection_dropped() && !err.is_timeout()
}

/// The error to report when a retried command failed twice: the first one, unless it
/// was a refused connection (nothing sent). A command that went out on a connection
/// that then dropped may have run, whatever the retry met.
fn first_failure(first: redis::RedisError, retry: redis::RedisError) -> redis::RedisError {
    if first.is_connection_refusal() {
        retry
    } else {
        first
    }
}

impl RedisConnection {
    fn send<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn send_pipeline<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let _turn = crate::explore::redis_step(cmd).await;
            match self.send(cmd).await {
                // A retry that fails too reports the first failure: the command may
                // have run before the connection dropped (outcome unknown).
                Err(e) if worth_retrying(&e) => self
                    .send(cmd)
                    .await
                    .map_err(|retry| first_failure(e, retry)),
                other => other,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let _turn = match pipeline.cmd_iter().next() {
                Some(first) => crate::explore::redis_step(first).await,
                None => None,
            };
            match self.send_pipeline(pipeline, offset, count).await {
                Err(e) if worth_retrying(&e) => self
                    .send_pipeline(pipeline, offset, count)
                    .await
                    .map_err(|retry| first_failure(e, retry)),
                other => other,
            }
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

pub async fn connect(args: &RedisArgs) -> Result<RedisConnection> {
    if args.redis_cluster {
        let nodes: Vec<&str> = args.redis_url.split(',').map(str::trim).collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .response_timeout(limits::REDIS_RESPONSE_TIMEOUT)
            .connection_timeout(limits::REDIS_CONNECT_TIMEOUT)
            .build()?;
        return Ok(RedisConnection::Cluster(
            client.get_async_connection().await?,
        ));
    }
    let client = redis::Client::open(args.redis_url.as_str())?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(limits::REDIS_RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(limits::REDIS_CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(std::time::Duration::from_millis(500));
    // Lazy: the gateway starts (and answers /readyz 503) while Redis is still down.
    Ok(RedisConnection::Single(
        ConnectionManager::new_lazy_with_config(client, config)?,
    ))
}

/// Writes that must reach replicas before they are answered
/// (FLASHGATE_REDIS_WAIT_REPLICAS): the script and its WAIT run on one connection taken
/// from a small pool of dedicated ones, so the WAIT counts exactly that connection's
/// writes and blocks nobody else (every reserve shares the multiplexed connection, and
/// WAIT blocks the connection it runs on). On a cluster the WAIT goes to the primary
/// that owns the SKU's slot, the one that ran the script: its own replicas'
/// acknowledgements, never the least over every primary (a shard without a replica,
/// as a failover leaves one for a while, does not stall every other shard's confirms).
#[derive(Clone)]
pub struct ReplicatedWrites {
    pool: WaitPool,
    replicas: u32,
    timeout: std::time::Duration,
}

/// The settings both kinds of wait pool (single, cluster) are built with.
macro_rules! wait_pool {
    ($builder:expr) => {
        $builder
            .max_size(limits::WAIT_CONNECTIONS)
            .wait_timeout(Some(limits::REDIS_RESPONSE_TIMEOUT))
            .create_timeout(Some(limits::REDIS_CONNECT_TIMEOUT))
            .recycle_timeout(Some(limits::REDIS_RESPONSE_TIMEOUT))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
    };
}

#[derive(Clone)]
enum WaitPool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl ReplicatedWrites {
    /// None when no replica is waited for.
    pub fn connect(args: &RedisArgs) -> Result<Option<ReplicatedWrites>> {
        if args.redis_wait_replicas == 0 {
            return Ok(None);
        }
        let timeout = std::time::Duration::from_millis(args.redis_wait_timeout_ms);
        let setup = |e: &dyn std::fmt::Display| Error::Internal(format!("redis wait pool: {e}"));
        let pool = if args.redis_cluster {
            let nodes: Vec<String> = args
                .redis_url
                .split(',')
                .map(|n| n.trim().to_string())
                .collect();
            let manager = deadpool_redis::cluster::Manager::new(nodes, false)?;
            WaitPool::Cluster(
                wait_pool!(deadpool_redis::cluster::Pool::builder(manager))
                    .map_err(|e| setup(&e))?,
            )
        } else {
            // The WAIT may block up to its timeout: the response deadline is longer.
            let config = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(timeout + limits::REDIS_RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(limits::REDIS_CONNECT_TIMEOUT));
            let manager =
                deadpool_redis::Manager::new_with_config(args.redis_url.as_str(), config)?;
            WaitPool::Single(
                wait_pool!(deadpool_redis::Pool::builder(manager)).map_err(|e| setup(&e))?,
            )
        };
        Ok(Some(ReplicatedWrites {
            pool,
            replicas: args.redis_wait_replicas,
            timeout,
        }))
    }

    /// Runs the script on a dedicated connection, then WAIT on that same connection
    /// (on a cluster, routed to the primary of `slot_key`'s slot). Err unavailable with
    /// an unknown outcome when fewer replicas acknowledged in time: the write is on the
    /// primary and a failover now could lose it; a retry tells.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &FunctionCall<'_>,
        slot_key: &str,
    ) -> Result<T> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replicas).arg(self.timeout.as_millis() as u64);
        let run = async {
            let (reply, acknowledged): (T, u32) = match &self.pool {
                WaitPool::Single(pool) => {
                    let mut conn = pool.get().await.map_err(pool_error)?;
                    let reply = invocation.invoke_async(&mut conn).await?;
                    (reply, wait.query_async(&mut conn).await?)
                }
                WaitPool::Cluster(pool) => {
                    use redis::cluster_routing::{
                        Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
                    };
                    let mut conn = pool.get().await.map_err(pool_error)?;
                    let reply = invocation.invoke_async(&mut conn).await?;
                    let primary = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::with_key(slot_key, SlotAddr::Master),
                    ));
                    let acknowledged = conn.route_command(wait, primary).await?;
                    // Anything but a count (a node failing over) is an outage: the
                    // script ran, whether it reached a replica is unknown.
                    let acknowledged = redis::from_redis_value(acknowledged).map_err(|e| {
                        Error::unavailable(format!("redis: WAIT: {e}"), Outcome::Unknown)
                    })?;
                    (reply, acknowledged)
                }
            };
            Ok::<_, Error>((reply, acknowledged))
        };
        let deadline = self.timeout + 2 * limits::REDIS_RESPONSE_TIMEOUT;
        let (reply, acknowledged) = tokio::time::timeout(deadline, run).await.map_err(|_| {
            Error::unavailable(
                "redis: a write waiting for replicas timed out",
                Outcome::Unknown,
            )
        })??;
        if acknowledged < self.replicas {
            return Err(Error::unavailable(
                format!(
                    "fewer than {} replicas acknowledged in {:?}; a retry (same payment_ref or Idempotency-Key) tells the outcome",
                    self.replicas, self.timeout
                ),
                Outcome::Unknown,
            ));
        }
        Ok(reply)
    }
}

/// No pooled connection could be had: nothing was sent.
fn pool_error(e: deadpool_redis::PoolError) -> Error {
    match e {
        deadpool_redis::PoolError::Backend(e) => e.into(),
        other => Error::unavailable(format!("redis: {other}"), Outcome::NotApplied),
    }
}

/// One reserve request as the scripts take it.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub user_id: String,
    pub quantity: u64,
    pub idempotency_key: String,
    /// The id the hold gets if one is created.
    pub reservation_id: String,
}

/// How long an idempotency key lives: the configured TTL, and never less than the
/// hold it creates can live (hold + payment grace; the script takes the larger).
#[derive(Debug, Clone, Copy)]
pub struct ReserveSettings {
    pub idempotency_ttl_ms: u64,
    pub payment_grace_ms: u64,
    /// Holds one user may release (cancel, or let expire) per SKU within one key
    /// lifetime before reserves of that SKU answer `limit_exceeded`; 0: no cap.
    pub released_holds_cap: u64,
}

/// What the reserve script decided.
#[derive(Debug)]
pub enum ReserveOutcome {
    Created(Reservation),
    Replayed(Reservation),
    /// The idempotency key replays this reservation, which ended and is in MySQL only.
    ReplayedFromRecord(String),
}

/// What the confirm script decided.
#[derive(Debug)]
pub enum ConfirmOutcome {
    Confirmed(Transition),
    /// The payment cannot become a sale; a compensation with this id exists for it.
    Refused {
        refusal: Refusal,
        compensation_id: String,
    },
}

/// A reservation after a call that may change it, and whether this call did: false
/// for an idempotent repeat (cancel of an ended hold, payment-pending of a paying
/// one, confirm with the payment_ref it was confirmed with).
#[derive(Debug)]
pub struct Transition {
    pub reservation: Reservation,
    pub changed: bool,
}

/// What one sweep call did.
#[derive(Debug)]
pub struct Swept {
    pub expired: u64,
    /// Holds past their deadline left for the next call (the batch is bounded).
    pub still_due: u64,
    /// Units available after it; None when the SKU has no state in Redis.
    pub available: Option<u64>,
    /// Units held and sold after it, while the sale has its counters (not retired).
    pub held: Option<u64>,
    pub sold: Option<u64>,
    /// Index entries it looked at: expired holds and stale entries it dropped. Zero
    /// means there is nothing more this call could do.
    pub examined: u64,
    /// Redis time of the call (ms).
    pub now_ms: i64,
    /// Deadline of the first live hold left, if any.
    pub next_deadline_ms: Option<i64>,
    /// The SKU's hold length: no hold created after this call is due sooner.
    pub hold_ms: Option<i64>,
    pub state: SaleState,
    /// When the sale ends, if it does: the SKU may retire from then on.
    pub ends_at_ms: Option<i64>,
    /// Buckets of the SKU (src/buckets.rs): above 1, the worker also finishes the
    /// sale's transfers cut short.
    pub buckets: u32,
}

/// Where a SKU is in its life cycle, as the sweep found it (lua/sweep.lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleState {
    /// It can still take holds.
    Open,
    /// Its `ends_at` passed; holds, unflushed events or compensations remain.
    Ended,
    /// Retired: only a tombstone is left in Redis, MySQL keeps the record.
    Retired,
    /// Redis has no state for it.
    Missing,
}

/// What an admin write did to the SKU in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Redefined in place.
    Updated,
    /// Redis had no state for it (first definition, or Redis lost it).
    Created,
    /// It was retired: back on sale, without the per-user usage retirement dropped.
    Reopened,
}

/// SKUs whose outbox this process has just written to: the flush looks at them at its
/// next pass instead of waiting for their idle probe (worker.rs). Noted only after a
/// script wrote an event, so bounded by the SKUs on sale; a hint lost (or written by
/// another process) only delays a flush. A first hint wakes a flush loop that waits
/// (`written`), so an event does not wait out the flush interval.
#[derive(Default)]
pub struct OutboxHints(
    std::sync::Mutex<std::collections::HashSet<SkuId>>,
    tokio::sync::Notify,
);

impl OutboxHints {
    pub fn note(&self, sku: &SkuId) {
        let mut hinted = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !hinted.contains(sku) {
            hinted.insert(sku.clone());
            self.1.notify_one();
        }
    }

    /// Returns once a SKU was hinted since the last call (at once if one was meanwhile).
    pub async fn written(&self) {
        self.1.notified().await
    }

    pub fn take(&self) -> Vec<SkuId> {
        let mut hinted = self.0.lock().unwrap_or_else(|e| e.into_inner());
        hinted.drain().collect()
    }
}

/// One outbox entry as read from the stream.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub stream_id: String,
    pub fields: StreamId,
}

/// Units a transfer took from a donor bucket (step 1, lua/transfer_take.lua), not yet
/// given to the receiver.
#[derive(Debug, Clone)]
pub struct Taken {
    pub id: String,
    pub from: SkuKeys,
    pub units: u64,
    taken_at: std::time::Instant,
    /// The donor's Redis time of the take (ms): what the give carries as its read time.
    taken_at_ms: i64,
}

impl Taken {
    /// Whether its taker may still give it (TransferTiming::lease).
    fn within_lease(&self, lease: std::time::Duration) -> bool {
        self.taken_at.elapsed() < lease
    }
}

/// A split SKU's buckets at one instant (`Store::split_stock_still`).
#[derive(Debug, Clone)]
pub struct SplitStock {
    /// Per bucket; None: Redis has no state for it.
    pub stock_total: Vec<Option<u64>>,
    pub in_transit: u64,
    pub available: Vec<u64>,
}

/// What became of one give of `Store::reserve_moved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Give {
    /// Given now (the receiver's `moves` grew by one).
    Given,
    /// Given before (a retry): nothing done.
    Already,
    /// The receiver has no state: the units stay in transit.
    Missing,
    /// Past its lease: not sent, the finisher's now.
    Late,
}

/// One bucket of a split SKU as a reserve looking for stock reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// Units available (0 when the bucket has no state).
    pub available: u64,
    /// Transfers to or from it not finished (units may be in transit).
    pub transfers: u64,
    /// Transfers that ever took from or gave to it: the same count in two reads means
    /// no transfer touched it in between.
    pub moves: u64,
}

/// How much of a SKU's stock one sale (the SKU, or one of its buckets) takes in a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketStock {
    /// Its stock_total when Redis has no state for it (and the total when `change` is
    /// None). None: it must have state, the load refuses otherwise (Error::Unavailable):
    /// a lost bucket of a split SKU is rebuilt only together with the SKU's other lost
    /// buckets (`reconcile::rebuild_lost_buckets`), never by a change planned before
    /// the loss.
    pub if_new: Option<u64>,
    /// When it has state: change its stock_total by this much instead of setting it
    /// (a bucketed SKU: transfers move stock between buckets, so only a change applies).
    pub change: Option<i64>,
    /// The caller restored the buyers' usage into it (`restore_usage`) if Redis had no
    /// live sale when it looked: if the load creates the sale, the restore's marker must
    /// be there, else Redis lost the sale since that restore (or since a look that found
    /// it live) and the load refuses (Error::Unavailable; the caller restores again), so
    /// no reserve finds the sale without its claims. A retired sale it reopens kept its
    /// usage records.
    pub after_restore: bool,
}

impl BucketStock {
    /// An unsplit SKU: its stock_total is the definition's.
    pub fn whole(definition: &SkuDefinition) -> BucketStock {
        BucketStock {
            if_new: Some(definition.stock_total),
            change: None,
            after_restore: false,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    conn: RedisConnection,
    /// Confirms go here when they must wait for replicas (see ReplicatedWrites).
    replicated: Option<ReplicatedWrites>,
    pub outbox_hints: std::sync::Arc<OutboxHints>,
    pub transfer_timing: TransferTiming,
    /// Held by `finish_transfers`: one finisher at a time in this process.
    finishing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    pub fn new(conn: RedisConnection) -> Store {
        Store {
            conn,
            replicated: None,
            outbox_hints: Default::default(),
            transfer_timing: TransferTiming::default(),
            finishing: Default::default(),
        }
    }

    /// Confirms (and the compensations they record) wait for replicas on these.
    /// The same store with the transfer protocol's times set (the explorer's short ones).
    pub fn with_timing(mut self, timing: TransferTiming) -> Store {
        self.transfer_timing = timing;
        self
    }

    pub fn with_replicated_writes(mut self, replicated: Option<ReplicatedWrites>) -> Store {
        self.replicated = replicated;
        self
    }

    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Loads the script library when the Redis this reaches lacks it (the readiness
    /// check; calls load it themselves when Redis answers "Function not found").
    pub async fn ensure_scripts(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        if !crate::lua::has_library(&mut conn).await? {
            crate::lua::load_library(&mut conn).await?;
        }
        Ok(())
    }

    pub async fn reserve(
        &self,
        sku: &SkuId,
        request: &ReserveRequest,
        keys_ttl: ReserveSettings,
    ) -> Result<ReserveOutcome> {
        self.run_reserve(sku, request, keys_ttl, false, Admission::None)
            .await?
            .ok_or_else(|| bad_reply("split"))
    }

    /// `reserve` by a caller that does not know the SKU's bucket count (Redis had no
    /// state for the SKU): None, and nothing done, when the SKU turns out split over
    /// buckets (its users' reserves go to their home buckets).
    pub async fn reserve_if_unsplit(
        &self,
        sku: &SkuId,
        request: &ReserveRequest,
        keys_ttl: ReserveSettings,
    ) -> Result<Option<ReserveOutcome>> {
        self.run_reserve(sku, request, keys_ttl, true, Admission::None)
            .await
    }

    /// `reserve` with an admission token of this user and SKU, checked by the caller
    /// (src/queue.rs): on a SKU with a waiting room it spends the user's admission (or,
    /// `Admission::Lapsed`, only replays the key).
    pub async fn reserve_admitted(
        &self,
        sku: &SkuId,
        request: &ReserveRequest,
        keys_ttl: ReserveSettings,
        admission: Admission,
    ) -> Result<ReserveOutcome> {
        self.run_reserve(sku, request, keys_ttl, false, admission)
            .await?
            .ok_or_else(|| bad_reply("split"))
    }

    /// One call of lua/queue.lua (see its header): `mode` join, ticket or watch; its
    /// reply as strings.
    pub async fn queue(
        &self,
        sku: &SkuId,
        mode: &str,
        user_id: &str,
        third: &str,
    ) -> Result<Vec<String>> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        Ok(SCRIPTS
            .queue
            .key(&keys.meta)
            .key(keys.queue_line())
            .key(keys.queue_admits())
            .key(keys.queue_used())
            .key(keys.queue_state())
            .arg(mode)
            .arg(user_id)
            .arg(third)
            .arg(limits::QUEUE_ADMIT_BATCH)
            .invoke_async(&mut conn)
            .await?)
    }

    /// Several joins and ticket reads of one SKU in one call of lua/queue.lua ('batch'
    /// mode): one reply per request, in order, each as its own call would answer.
    pub async fn queue_batch(
        &self,
        sku: &SkuId,
        requests: &[QueueRequest],
    ) -> Result<Vec<Vec<String>>> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let mut call = SCRIPTS.queue.key(&keys.meta);
        call.key(keys.queue_line())
            .key(keys.queue_admits())
            .key(keys.queue_used())
            .key(keys.queue_state())
            .arg("batch")
            .arg(limits::QUEUE_ADMIT_BATCH);
        for request in requests {
            call.arg(request.mode.word())
                .arg(&request.user_id)
                .arg(request.draw);
        }
        let replies: Vec<Vec<String>> = call.invoke_async(&mut conn).await?;
        if replies.len() != requests.len() {
            return Err(bad_reply("queue batch arity"));
        }
        Ok(replies)
    }

    async fn run_reserve(
        &self,
        sku: &SkuId,
        request: &ReserveRequest,
        keys_ttl: ReserveSettings,
        unsplit_only: bool,
        admission: Admission,
    ) -> Result<Option<ReserveOutcome>> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = with_sale_keys(&SCRIPTS.reserve, &keys)
            .key(keys.idempotency(&request.user_id, &request.idempotency_key))
            .key(keys.queue_admits())
            .key(keys.queue_used())
            .key(keys.queue_state())
            .arg(&request.user_id)
            .arg(request.quantity)
            .arg(&request.reservation_id)
            .arg(&request.idempotency_key)
            .arg(keys_ttl.idempotency_ttl_ms)
            .arg(keys_ttl.payment_grace_ms)
            .arg(limits::RESERVE_RECLAIM_BATCH)
            .arg(keys_ttl.released_holds_cap)
            .arg(if unsplit_only { "1" } else { "0" })
            .arg(match admission {
                Admission::None => "0",
                Admission::Admitted => "1",
                Admission::Lapsed => "2",
            })
            .invoke_async(&mut conn)
            .await?;
        if reply.first().map(String::as_str) == Some("split") {
            return Ok(None);
        }
        reserve_outcome(sku, request, &reply).map(Some)
    }

    /// For each (user id, idempotency key) of the SKU: whether it may have created a
    /// hold. The sold-out flag's answer costs one read of the users' records (layout 2:
    /// `HMGET used`), no script: a key named anywhere in its user's claims counts as
    /// found, so a claim past its time only sends that request to the reserve script,
    /// which answers it exactly. Layout 1 (an upgrade's older sales) asks
    /// lua/probe_keys.lua.
    pub async fn idempotency_keys_exist(
        &self,
        sku: &SkuId,
        user_keys: &[(String, String)],
    ) -> Result<Vec<bool>> {
        let keys = SkuKeys::new(sku);
        let mut users: Vec<&str> = user_keys.iter().map(|(user, _)| user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        let mut conn = self.conn.clone();
        let (layout, records): (Option<String>, Vec<Option<String>>) = redis::pipe()
            .hget(&keys.meta, "layout")
            .cmd("HMGET")
            .arg(&keys.used)
            .arg(&users)
            .query_async(&mut conn)
            .await?;
        if layout.as_deref() == Some("2") {
            if records.len() != users.len() {
                return Err(bad_reply("probe arity"));
            }
            return Ok(user_keys
                .iter()
                .map(|(user, key)| {
                    let at = users
                        .binary_search(&user.as_str())
                        .expect("every user was read");
                    records[at]
                        .as_deref()
                        .is_some_and(|record| usage_names_key(record, key))
                })
                .collect());
        }
        let mut invocation = SCRIPTS.probe_keys.prepare_invoke();
        invocation.key(&keys.meta).key(&keys.used);
        for (user_id, key) in user_keys {
            invocation
                .key(keys.idempotency(user_id, key))
                .arg(user_id)
                .arg(key);
        }
        let found: Vec<u8> = invocation.invoke_async(&mut conn).await?;
        if found.len() != user_keys.len() {
            return Err(bad_reply("probe arity"));
        }
        Ok(found.iter().map(|f| *f == 1).collect())
    }

    /// Several reserves of one SKU in one script call, decided in order; one outcome
    /// per request, exactly as `reserve` called once per request would give.
    pub async fn reserve_many(
        &self,
        sku: &SkuId,
        requests: &[ReserveRequest],
        keys_ttl: ReserveSettings,
    ) -> Result<Vec<Result<ReserveOutcome>>> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let mut invocation = with_sale_keys(&SCRIPTS.reserve_batch, &keys);
        invocation
            .arg(keys_ttl.idempotency_ttl_ms)
            .arg(keys_ttl.payment_grace_ms)
            .arg(limits::RESERVE_RECLAIM_BATCH)
            .arg(keys_ttl.released_holds_cap);
        push_reserves(&mut invocation, &keys, requests);
        let replies: Vec<Vec<String>> = invocation.invoke_async(&mut conn).await?;
        if replies.len() != requests.len() {
            return Err(bad_reply("batch arity"));
        }
        Ok(replies
            .iter()
            .zip(requests)
            .map(|(reply, request)| reserve_outcome(sku, request, reply))
            .collect())
    }

    pub async fn confirm(
        &self,
        sku: &SkuId,
        reservation_id: &str,
        payment_ref: &str,
        new_compensation_id: &str,
    ) -> Result<ConfirmOutcome> {
        let keys = SkuKeys::new(sku);
        let mut invocation = with_sale_keys(&SCRIPTS.confirm, &keys);
        invocation
            .key(keys.reservation(reservation_id))
            .arg(reservation_id)
            .arg(sku.sku().as_str())
            .arg(payment_ref)
            .arg(new_compensation_id);
        let reply: Vec<String> = match &self.replicated {
            Some(replicated) => replicated.invoke(&invocation, &keys.meta).await?,
            None => invocation.invoke_async(&mut self.conn.clone()).await?,
        };
        match reply.first().map(String::as_str) {
            Some("confirmed" | "unchanged") => {
                let confirmed = transition(sku, &reply)?;
                if confirmed.changed {
                    self.outbox_hints.note(sku);
                }
                Ok(ConfirmOutcome::Confirmed(confirmed))
            }
            Some(
                code @ ("already_confirmed" | "reservation_expired" | "reservation_cancelled"),
            ) => {
                self.outbox_hints.note(sku);
                Ok(ConfirmOutcome::Refused {
                    refusal: Refusal::from_code(code).expect("listed above"),
                    compensation_id: reply.get(1).cloned().unwrap_or_default(),
                })
            }
            _ => Err(refusal_of(&reply)),
        }
    }

    /// `caller_user_id` None is the service.
    pub async fn cancel(
        &self,
        sku: &SkuId,
        reservation_id: &str,
        caller_user_id: Option<&str>,
    ) -> Result<Transition> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = with_sale_keys(&SCRIPTS.cancel, &keys)
            .key(keys.reservation(reservation_id))
            .arg(reservation_id)
            .arg(caller_user_id.unwrap_or(""))
            .invoke_async(&mut conn)
            .await?;
        let cancelled = transition(sku, &reply)?;
        // Only a call that wrote an event: the hints stay bounded by real SKUs,
        // whatever ids a client invents.
        if cancelled.changed {
            self.outbox_hints.note(sku);
        }
        Ok(cancelled)
    }

    pub async fn payment_pending(
        &self,
        sku: &SkuId,
        reservation_id: &str,
        payment_ref: &str,
        grace_ms: u64,
    ) -> Result<Transition> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = with_sale_keys(&SCRIPTS.payment_pending, &keys)
            .key(keys.reservation(reservation_id))
            .arg(reservation_id)
            .arg(payment_ref)
            .arg(grace_ms)
            .invoke_async(&mut conn)
            .await?;
        transition(sku, &reply)
    }

    pub async fn reservation(&self, sku: &SkuId, reservation_id: &str) -> Result<Reservation> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = SCRIPTS
            .view
            .key(&keys.holds)
            .key(keys.reservation(reservation_id))
            .arg(reservation_id)
            .invoke_async(&mut conn)
            .await?;
        ok_view(sku, &reply)
    }

    /// Expires at most one batch of due holds; retires the SKU when its sale is over
    /// and Redis has nothing of it MySQL lacks (lua/sweep.lua).
    pub async fn sweep(&self, sku: &SkuId) -> Result<Swept> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        #[allow(clippy::type_complexity)]
        let (
            expired,
            still_due,
            available,
            examined,
            now_ms,
            next_deadline,
            hold_ms,
            state,
            ends_at,
            buckets,
            held,
            sold,
        ): (
            u64,
            u64,
            Option<u64>,
            u64,
            i64,
            Option<String>,
            Option<i64>,
            String,
            Option<i64>,
            u32,
            Option<u64>,
            Option<u64>,
        ) = with_sale_keys(&SCRIPTS.sweep, &keys)
            .key(&keys.transfers)
            .key(keys.queue_line())
            .key(keys.queue_admits())
            .key(keys.queue_used())
            .key(keys.queue_state())
            .arg(limits::SWEEP_BATCH)
            .arg(limits::RETIRED_SKU_TOMBSTONE.as_millis() as u64)
            .arg(self.transfer_timing.give_window.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        if expired > 0 {
            self.outbox_hints.note(sku);
        }
        Ok(Swept {
            expired,
            still_due,
            available,
            held,
            sold,
            examined,
            now_ms,
            // A ZSET score comes back as text.
            next_deadline_ms: next_deadline
                .and_then(|s| s.parse::<f64>().ok())
                .map(|f| f as i64),
            hold_ms,
            ends_at_ms: ends_at,
            buckets,
            state: match state.as_str() {
                "open" => SaleState::Open,
                "ended" => SaleState::Ended,
                "retired" => SaleState::Retired,
                "missing" => SaleState::Missing,
                _ => return Err(bad_reply("sweep state")),
            },
        })
    }

    /// Puts the SKU in the index the workers walk and tells them to look again.
    pub async fn index_sku(&self, sku: &SkuId) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.sadd(SKU_INDEX, sku.as_str()).await?;
        self.mark_changed(sku).await
    }

    /// Puts the SKU in the index without telling the workers yet (the admin write,
    /// before its terms are in place: it marks the change once they are).
    async fn index_quietly(&self, sku: &SkuId) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.sadd(SKU_INDEX, sku.as_str()).await?;
        Ok(())
    }

    /// Tells the workers the SKU's sale changed (defined, terms, reopened): they plan
    /// its next visits again. The change is recorded before the generation moves, so
    /// a worker that sees the new generation finds it. (Keys in several cluster slots:
    /// one command each.)
    pub async fn mark_changed(&self, sku: &SkuId) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: u64 = SCRIPTS
            .mark_changed
            .key(SKU_INDEX_GENERATION)
            .key(SKU_CHANGES)
            .arg(sku.as_str())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// SKUs whose sale changed after generation `since` (mark_changed).
    pub async fn changed_since(&self, since: u64) -> Result<Vec<SkuId>> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn
            .zrangebyscore(SKU_CHANGES, format!("({since}"), "+inf")
            .await?;
        Ok(raw.iter().filter_map(|s| SkuId::of_tag(s)).collect())
    }

    /// Takes a SKU the sweep retired out of the index. An admin PUT may have put it
    /// back on sale in between (it indexes before it loads): then it stays indexed.
    pub async fn unindex_retired(&self, sku: &SkuId) -> Result<()> {
        // No generation bump: other workers drop it when their next visit finds it
        // retired; a bump would make every worker re-plan every SKU.
        let mut conn = self.conn.clone();
        let _: () = conn.srem(SKU_INDEX, sku.as_str()).await?;
        let _: () = conn.zrem(SKU_CHANGES, sku.as_str()).await?;
        if self.on_sale(sku).await? {
            self.index_sku(sku).await?;
        }
        Ok(())
    }

    /// Whether Redis holds a sale for the SKU: defined and not retired.
    pub async fn on_sale(&self, sku: &SkuId) -> Result<bool> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let state: (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&keys.meta)
            .arg("stock_total")
            .arg("retired")
            .query_async(&mut conn)
            .await?;
        Ok(matches!(state, (Some(_), None)))
    }

    /// Whether the sale is retired: only its tombstone and its usage records are left.
    pub async fn is_retired(&self, sku: &SkuId) -> Result<bool> {
        let mut conn = self.conn.clone();
        Ok(conn.hexists(SkuKeys::new(sku).meta, "retired").await?)
    }

    /// Moves whenever the index or some SKU's terms change.
    pub async fn sku_index_generation(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        let generation: Option<u64> = conn.get(SKU_INDEX_GENERATION).await?;
        Ok(generation.unwrap_or(0))
    }

    /// Removes consumers of the flush group that have nothing pending and were idle for
    /// `min_idle` (workers that stopped), never `keep` (the caller). Atomic per consumer,
    /// so a consumer that just read entries is never dropped with them. Returns how many.
    pub async fn reap_flush_consumers(
        &self,
        sku: &SkuId,
        min_idle: std::time::Duration,
        keep: &str,
    ) -> Result<u64> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let reaped: u64 = SCRIPTS
            .reap_consumers
            .key(&keys.outbox)
            .arg(FLUSH_GROUP)
            .arg(min_idle.as_millis() as u64)
            .arg(keep)
            .invoke_async(&mut conn)
            .await?;
        Ok(reaped)
    }

    /// Creates or redefines the SKU in Redis; `sold_in_mysql` seeds `sold` only when
    /// Redis has no state for it (first load, or after a data loss). Returns the SKU
    /// and whether Redis had no state for it. Holds past their deadline are expired
    /// first: they never count as committed stock.
    pub async fn load_sku(
        &self,
        sku: &SkuId,
        definition: &SkuDefinition,
        sold_in_mysql: u64,
    ) -> Result<(Sku, Loaded)> {
        let stock = BucketStock::whole(definition);
        let loaded = self
            .load_bucket(sku, definition, &stock, sold_in_mysql)
            .await?;
        Ok((self.sku(sku).await?, loaded))
    }

    /// Creates or redefines one sale: a whole SKU, or one bucket of a split one
    /// (`stock` says how much of the SKU's stock is its own).
    pub async fn load_bucket(
        &self,
        sale: &SkuId,
        definition: &SkuDefinition,
        stock: &BucketStock,
        sold_in_mysql: u64,
    ) -> Result<Loaded> {
        // Indexed first: a SKU that exists must never be missed by the sweeper (its
        // full re-reads of the index find it even if this write stops half-way).
        self.index_quietly(sale).await?;
        let loaded = self
            .run_load_sku(sale, definition, stock, sold_in_mysql, false)
            .await?;
        self.ensure_outbox_group(sale).await?;
        // Its terms are in place now: workers plan its visits under them.
        self.mark_changed(sale).await?;
        Ok(loaded)
    }

    /// Whether Redis would take this definition (`stock_below_committed` otherwise);
    /// writes nothing but the expiry of holds past their deadline.
    pub async fn check_sku(
        &self,
        sku: &SkuId,
        definition: &SkuDefinition,
        sold_in_mysql: u64,
    ) -> Result<()> {
        let stock = BucketStock::whole(definition);
        self.check_bucket(sku, definition, &stock, sold_in_mysql)
            .await
    }

    /// `check_sku` for one sale (a SKU or one of its buckets).
    pub async fn check_bucket(
        &self,
        sale: &SkuId,
        definition: &SkuDefinition,
        stock: &BucketStock,
        sold_in_mysql: u64,
    ) -> Result<()> {
        self.run_load_sku(sale, definition, stock, sold_in_mysql, true)
            .await
            .map(drop)
    }

    async fn run_load_sku(
        &self,
        sale: &SkuId,
        definition: &SkuDefinition,
        stock: &BucketStock,
        sold_in_mysql: u64,
        check_only: bool,
    ) -> Result<Loaded> {
        let keys = SkuKeys::new(sale);
        let mut conn = self.conn.clone();
        let reply: Vec<String> = with_sale_keys(&SCRIPTS.load_sku, &keys)
            .key(keys.queue_line())
            .key(keys.queue_admits())
            .key(keys.queue_used())
            .key(keys.queue_state())
            .key(keys.usage_restored())
            .arg(stock.if_new.unwrap_or(0))
            .arg(definition.per_user_limit)
            .arg(definition.hold_seconds * 1000)
            .arg(optional_ms(definition.starts_at_ms))
            .arg(optional_ms(definition.ends_at_ms))
            .arg(sold_in_mysql)
            .arg(limits::SWEEP_BATCH)
            .arg(if check_only { "1" } else { "0" })
            .arg(definition.buckets)
            .arg(stock.change.map_or(String::new(), |c| c.to_string()))
            .arg(definition.stock_total)
            .arg(if stock.if_new.is_none() { "1" } else { "" })
            .arg(crate::reconcile::paused_arg(definition.paused))
            .arg(definition.waiting_room.map_or(String::new(), |w| {
                (u64::from(w.admission_seconds) * 1000).to_string()
            }))
            .arg(definition.waiting_room.map_or(0, |w| w.admit_per_second))
            .arg(match definition.waiting_room {
                Some(w) if w.prequeue_shuffle => "1",
                _ => "0",
            })
            .arg(if stock.after_restore { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Loaded::Updated),
            Some("missing") => Err(Error::Unavailable {
                detail: format!(
                    "Redis lost {sale} during the change; retry (a lost sale is rebuilt first, \
                     with its buyers' usage)"
                ),
                outcome: crate::error::Outcome::Unknown,
            }),
            Some("created") => Ok(Loaded::Created),
            Some("reopened") => Ok(Loaded::Reopened),
            _ => Err(refusal_of(&reply)),
        }
    }

    /// After a rebuild: MySQL's last announcement of the sale's stock back in Redis
    /// (lua/restore_announced.lua); stock back since `sku.sold_out` is announced.
    pub async fn restore_announced(&self, sale: &SkuId, sold_out: bool) -> Result<()> {
        if !sold_out {
            return Ok(());
        }
        let keys = SkuKeys::new(sale);
        let mut conn = self.conn.clone();
        let _: i64 = with_sale_keys(&SCRIPTS.restore_announced, &keys)
            .arg("1")
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The sale's start (ms) as its meta has it.
    pub async fn starts_at(&self, sale: &SkuId) -> Result<Option<i64>> {
        let keys = SkuKeys::new(sale);
        let mut conn = self.conn.clone();
        let starts_at: Option<String> = conn.hget(&keys.meta, "starts_at").await?;
        Ok(starts_at.and_then(|ms| ms.parse().ok()))
    }

    /// Whether Redis has the sale on sale or ended, not lost nor retired (then a load
    /// must bring its usage back first: `restore_usage`).
    pub async fn sale_is_live(&self, sale: &SkuId) -> Result<bool> {
        let keys = SkuKeys::new(sale);
        let mut conn = self.conn.clone();
        let (stock_total, retired): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&keys.meta)
            .arg("stock_total")
            .arg("retired")
            .query_async(&mut conn)
            .await?;
        Ok(stock_total.is_some() && retired.is_none())
    }

    /// Per-user usage from the record, where Redis has none (after a data loss): limits
    /// must still count what each user bought, and each idempotency key whose ended
    /// reservation MySQL records must replay it for its lifetime (contract invariant
    /// 3). `claims` may be the whole SKU's: only those of reservations of this sale
    /// (their id names it) go here. Never overwrites a count or a claim
    /// (restore_usage.lua). Into a sale without live state its first call leaves the
    /// marker the load that follows takes (`BucketStock::after_restore`); a later call
    /// that finds the marker gone (Redis lost the sale since) fails (Error::Unavailable)
    /// and the caller starts over.
    pub async fn restore_usage(
        &self,
        sale: &SkuId,
        bought: &[(String, i64)],
        claims: &[crate::db::EndedClaim],
    ) -> Result<()> {
        let keys = SkuKeys::new(sale);
        let mut conn = self.conn.clone();
        let claims: Vec<(&crate::db::EndedClaim, &str)> = claims
            .iter()
            .filter_map(|c| {
                let (_, tag) = crate::ids::tag_of_reservation(&c.reservation_id)?;
                let (_, tail) = c.reservation_id.split_once('.')?;
                (tag == sale.as_str()).then_some((c, tail))
            })
            .collect();
        // One call at least: the first leaves the marker, also when there is nothing to
        // put back.
        let mut calls = Vec::new();
        for chunk in bought.chunks(limits::RESTORE_BATCH) {
            let mut call = with_sale_keys(&SCRIPTS.restore_usage, &keys);
            call.key(keys.usage_restored()).arg(chunk.len());
            for (user, units) in chunk {
                call.arg(user).arg(units);
            }
            calls.push(call);
        }
        for chunk in claims.chunks(limits::RESTORE_BATCH) {
            let mut call = with_sale_keys(&SCRIPTS.restore_usage, &keys);
            call.key(keys.usage_restored()).arg(0);
            for (c, tail) in chunk {
                call.arg(&c.user_id)
                    .arg(&c.claim.key)
                    .arg(*tail)
                    .arg(c.quantity)
                    .arg(c.claim.keep_until_ms);
            }
            calls.push(call);
        }
        if calls.is_empty() {
            let mut call = with_sale_keys(&SCRIPTS.restore_usage, &keys);
            call.key(keys.usage_restored()).arg(0);
            calls.push(call);
        }
        for (i, mut call) in calls.into_iter().enumerate() {
            call.arg(if i == 0 { "1" } else { "0" });
            let restored: i64 = call.invoke_async(&mut conn).await?;
            if restored < 0 {
                return Err(Error::Unavailable {
                    detail: format!(
                        "Redis lost {sale} while its buyers' usage was restored; retry"
                    ),
                    outcome: crate::error::Outcome::Unknown,
                });
            }
        }
        Ok(())
    }

    pub async fn sku(&self, sku: &SkuId) -> Result<Sku> {
        Ok(self.sale_view(sku).await?.0)
    }

    /// One sale's view (its own counters: a bucket's share) and, for a bucket, its
    /// SKU's stock_total over every bucket (`sku_stock`, set by every load).
    pub async fn sale_view(&self, sale: &SkuId) -> Result<(Sku, Option<u64>)> {
        let keys = SkuKeys::new(sale);
        let mut conn = self.conn.clone();
        // Holds past their deadline count for nothing: the script expires them first.
        let fields: Vec<Option<String>> = with_sale_keys(&SCRIPTS.sku_view, &keys)
            .arg(limits::SWEEP_BATCH)
            .invoke_async(&mut conn)
            .await?;
        if fields.is_empty() {
            return Err(Error::Refused(Refusal::NotFound));
        }
        let [Some(stock_total), Some(available), Some(held), Some(sold), Some(limit), Some(hold_ms), Some(starts), Some(ends), sku_stock, paused, wr_ms, wr_rate, wr_shuffle] =
            <[Option<String>; 13]>::try_from(fields).map_err(|_| bad_reply("HMGET arity"))?
        else {
            return Err(Error::Refused(Refusal::NotFound));
        };
        let sku = Sku {
            sku: sale.sku().to_string(),
            stock_total: number(&stock_total)?,
            available: number(&available)?,
            held: number(&held)?,
            sold: number(&sold)?,
            per_user_limit: number(&limit)?,
            hold_seconds: number(&hold_ms)? / 1000,
            starts_at_ms: parse_optional_ms(&starts)?,
            ends_at_ms: parse_optional_ms(&ends)?,
            paused: paused.as_deref() == Some("1"),
            waiting_room: match wr_ms.as_deref() {
                None | Some("") => None,
                Some(admission_ms) => Some(WaitingRoom {
                    admission_seconds: (number(admission_ms)? / 1000) as u32,
                    admit_per_second: wr_rate.as_deref().map_or(Ok(0), number)? as u32,
                    prequeue_shuffle: wr_shuffle.as_deref() == Some("1"),
                }),
            },
        };
        Ok((sku, sku_stock.as_deref().map(number).transpose()?))
    }

    /// The buckets a SKU is split over, from its bucket 0 (the SKU's own tag): None
    /// when Redis has no sale for it; 1 for a SKU defined before buckets existed.
    pub async fn bucket_count(&self, sku: &SkuId) -> Result<Option<u32>> {
        Ok(self.layout(sku).await?.map(|layout| layout.buckets))
    }

    /// The SKU's buckets and its buyers' homes (src/buckets.rs), from bucket 0's meta:
    /// None when Redis has no state for it.
    pub async fn layout(&self, sku: &SkuId) -> Result<Option<crate::buckets::Layout>> {
        let mut conn = self.conn.clone();
        let (stock_total, buckets, waiting_room): (Option<String>, Option<u32>, Option<String>) =
            redis::cmd("HMGET")
                .arg(SkuKeys::new(sku).meta)
                .arg("stock_total")
                .arg("buckets")
                .arg("wr_ms")
                .query_async(&mut conn)
                .await?;
        Ok(stock_total.map(|_| {
            let buckets = buckets.unwrap_or(1);
            crate::buckets::Layout {
                buckets,
                homes: crate::buckets::homes(buckets, waiting_room.is_some_and(|w| !w.is_empty())),
            }
        }))
    }

    /// For each of these sales (buckets of one SKU): what lua/bucket_stock.lua reads
    /// (holds past their deadline expired first). One script call each, concurrently
    /// (the buckets are in different slots).
    pub async fn bucket_stock(&self, sales: &[SkuId]) -> Result<Vec<BucketState>> {
        let window_ms = self.transfer_timing.give_window.as_millis() as u64;
        let reads = sales.iter().map(|sale| {
            let mut conn = self.conn.clone();
            let keys = SkuKeys::new(sale);
            async move {
                let (available, transfers, moves): (u64, u64, u64) =
                    with_sale_keys(&SCRIPTS.bucket_stock, &keys)
                        .key(&keys.transfers)
                        .arg(limits::RESERVE_RECLAIM_BATCH)
                        .arg(window_ms)
                        .invoke_async(&mut conn)
                        .await?;
                Ok::<_, Error>(BucketState {
                    available,
                    transfers,
                    moves,
                })
            }
        });
        futures::future::try_join_all(reads).await
    }

    /// A split SKU's stock as its buckets hold it: each bucket's stock_total (None: no
    /// state) and the units in transit (taken from a donor, not yet given to the
    /// receiver). Σ stock_total + in transit is the SKU's stock. Not one instant (the
    /// buckets are in different slots): a transfer running meanwhile may show.
    pub async fn split_stock(&self, sales: &[SkuId]) -> Result<(Vec<Option<u64>>, u64)> {
        let reads = sales.iter().map(|sale| {
            let mut conn = self.conn.clone();
            let keys = SkuKeys::new(sale);
            async move {
                let read: (Option<u64>, std::collections::HashMap<String, String>) = redis::pipe()
                    .hget(&keys.meta, "stock_total")
                    .hgetall(&keys.transfers)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, Error>(read)
            }
        });
        let reads = futures::future::try_join_all(reads).await?;
        let given: std::collections::HashSet<&str> = reads
            .iter()
            .flat_map(|(_, records)| records.keys())
            .filter_map(|field| field.strip_prefix("in:"))
            .collect();
        let mut in_transit = 0;
        for (_, records) in &reads {
            for (field, record) in records {
                if let Some(id) = field.strip_prefix("out:") {
                    if !given.contains(id) {
                        let units = record.split(' ').next().and_then(|u| u.parse::<u64>().ok());
                        in_transit += units.ok_or_else(|| bad_reply("transfer record"))?;
                    }
                }
            }
        }
        Ok((reads.iter().map(|(stock, _)| *stock).collect(), in_transit))
    }

    /// `split_stock` with each bucket's available, read between two reads of the
    /// buckets' `moves` that agree: no transfer ran meanwhile, so no unit was counted
    /// twice or missed. Unavailable (nothing done) when transfers kept running.
    pub async fn split_stock_still(&self, sales: &[SkuId]) -> Result<SplitStock> {
        for _ in 0..limits::SPLIT_STOCK_READINGS {
            let before = self.bucket_stock(sales).await?;
            let (stock_total, in_transit) = self.split_stock(sales).await?;
            let after = self.bucket_stock(sales).await?;
            if before.iter().zip(&after).all(|(b, a)| b.moves == a.moves) {
                return Ok(SplitStock {
                    stock_total,
                    in_transit,
                    available: after.iter().map(|b| b.available).collect(),
                });
            }
        }
        Err(Error::unavailable(
            "redis: the SKU's buckets kept moving stock; retry the PUT",
            Outcome::NotApplied,
        ))
    }

    pub async fn sku_ids(&self) -> Result<Vec<SkuId>> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn.smembers(SKU_INDEX).await?;
        Ok(raw.iter().filter_map(|s| SkuId::of_tag(s)).collect())
    }

    pub async fn ensure_outbox_group(&self, sku: &SkuId) -> Result<()> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let created: redis::RedisResult<()> = conn
            .xgroup_create_mkstream(&keys.outbox, FLUSH_GROUP, "0")
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// Acknowledges flushed entries, then trims the stream below what every group
    /// has acknowledged (never an entry some group still has to flush).
    pub async fn ack_outbox(&self, sku: &SkuId, stream_ids: &[String]) -> Result<()> {
        if stream_ids.is_empty() {
            return Ok(());
        }
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let _: usize = conn.xack(&keys.outbox, FLUSH_GROUP, stream_ids).await?;
        self.trim_outbox(sku).await
    }

    pub async fn trim_outbox(&self, sku: &SkuId) -> Result<()> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        match self.trim_outbox_below_groups(&keys).await {
            // Retired by a sweep (stream and groups deleted) since the caller
            // acknowledged: nothing left to trim.
            Err(_) if !conn.exists::<_, bool>(&keys.outbox).await? => Ok(()),
            other => other,
        }
    }

    async fn trim_outbox_below_groups(&self, keys: &SkuKeys) -> Result<()> {
        let mut conn = self.conn.clone();
        let groups: redis::streams::StreamInfoGroupsReply =
            match conn.xinfo_groups(&keys.outbox).await {
                Ok(groups) => groups,
                // No stream (lost, or retired, since the caller acknowledged; a PUT may
                // be making it again): nothing to trim.
                Err(e) if e.to_string().contains("no such key") => return Ok(()),
                Err(e) => return Err(e.into()),
            };
        let mut floor: Option<StreamPosition> = None;
        for group in &groups.groups {
            let bound = if group.pending > 0 {
                let pending: redis::streams::StreamPendingReply =
                    conn.xpending(&keys.outbox, &group.name).await?;
                match pending {
                    redis::streams::StreamPendingReply::Data(data) => data.start_id,
                    _ => group.last_delivered_id.clone(),
                }
            } else {
                // Everything up to and including last_delivered is acknowledged;
                // MINID keeps that one entry, which is harmless.
                group.last_delivered_id.clone()
            };
            let position = StreamPosition::parse(&bound);
            floor = Some(match floor {
                Some(f) if f <= position => f,
                _ => position,
            });
        }
        if let Some(floor) = floor {
            // Not while a reconciler check reads the outbox (lua/trim_outbox.lua).
            let _: usize = SCRIPTS
                .trim_outbox
                .key(&keys.meta)
                .key(&keys.outbox)
                .arg(floor.to_string())
                .invoke_async(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Events written to the outbox and not yet acknowledged by the flush group.
    pub async fn outbox_backlog(&self, sku: &SkuId) -> Result<u64> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
            conn.xinfo_groups(&keys.outbox).await;
        let Ok(groups) = groups else { return Ok(0) }; // no stream: nothing written yet
        match groups.groups.iter().find(|g| g.name == FLUSH_GROUP) {
            Some(group) => match group.lag {
                Some(lag) => Ok(group.pending as u64 + lag as u64),
                // Redis cannot always tell the lag (after deletions): count the
                // stream, an overestimate that never hides an unflushed event.
                None => Ok(group.pending as u64 + conn.xlen::<_, u64>(&keys.outbox).await?),
            },
            // Events written before the group existed (after a wipe): all unflushed.
            None => Ok(conn.xlen(&keys.outbox).await?),
        }
    }

    /// Makes a compensation the confirm script recorded findable by id (and listable)
    /// before the flush writes it to MySQL.
    pub async fn index_compensation(&self, id: &str, sku: &SkuId) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.hset(COMPENSATION_INDEX, id, sku.as_str()).await?;
        Ok(())
    }

    /// A compensation recorded in Redis and not yet flushed to MySQL.
    pub async fn pending_compensation(&self, id: &str) -> Result<Option<Compensation>> {
        let mut conn = self.conn.clone();
        let sku: Option<String> = conn.hget(COMPENSATION_INDEX, id).await?;
        let Some(sku) = sku.as_deref().and_then(SkuId::of_tag) else {
            return Ok(None);
        };
        let raw: Option<String> = conn.hget(SkuKeys::new(&sku).comps, id).await?;
        raw.map(|raw| parse_compensation(&sku, id, &raw))
            .transpose()
    }

    /// Every compensation recorded in Redis and not yet flushed to MySQL (few: the
    /// flush writes them within a second while MySQL is up).
    pub async fn pending_compensations(&self) -> Result<Vec<Compensation>> {
        let mut conn = self.conn.clone();
        let index: Vec<(String, String)> = conn.hgetall(COMPENSATION_INDEX).await?;
        let mut by_sku: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (id, sku) in index {
            by_sku.entry(sku).or_default().push(id);
        }
        let mut found = Vec::new();
        for (sku, ids) in by_sku {
            let Some(sku) = SkuId::of_tag(&sku) else {
                continue;
            };
            let raw: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(SkuKeys::new(&sku).comps)
                .arg(&ids)
                .query_async(&mut conn)
                .await?;
            let mut flushed = Vec::new();
            for (id, raw) in ids.iter().zip(raw) {
                match raw {
                    Some(raw) => found.push(parse_compensation(&sku, id, &raw)?),
                    // The record is written before the index entry and dropped only
                    // after MySQL has it: an entry without one was flushed (the index
                    // write lost a race with the flush). MySQL answers for it.
                    None => flushed.push(id.clone()),
                }
            }
            if !flushed.is_empty() {
                let _: () = conn.hdel(COMPENSATION_INDEX, &flushed).await?;
            }
        }
        Ok(found)
    }

    /// Resolves a compensation the flush has not written yet (the flush applies the
    /// resolve after the compensation). None when Redis has no unflushed record of it.
    pub async fn resolve_pending_compensation(
        &self,
        id: &str,
        resolution: &Resolution,
    ) -> Result<Option<Compensation>> {
        let mut conn = self.conn.clone();
        let sku: Option<String> = conn.hget(COMPENSATION_INDEX, id).await?;
        let Some(sku) = sku.as_deref().and_then(SkuId::of_tag) else {
            return Ok(None);
        };
        let keys = SkuKeys::new(&sku);
        let reply: Vec<String> = SCRIPTS
            .resolve_compensation
            .key(&keys.comps)
            .key(&keys.outbox)
            .arg(id)
            .arg(resolution.refund_ref.as_deref().unwrap_or_default())
            .arg(resolution.note.as_deref().unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        match reply.as_slice() {
            [ok, raw] if ok == "ok" => {
                self.outbox_hints.note(&sku);
                Ok(Some(parse_compensation(&sku, id, raw)?))
            }
            _ => Ok(None),
        }
    }

    /// The flush wrote these compensations (and resolves) to MySQL: Redis forgets its
    /// copies. The SKU's records go first, so an index entry never outlives nothing.
    pub async fn forget_compensations(&self, sku: &SkuId, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: () = conn.hdel(SkuKeys::new(sku).comps, ids).await?;
        let _: () = conn.hdel(COMPENSATION_INDEX, ids).await?;
        Ok(())
    }

    /// Step 1 of a transfer with a new id: None when the donor had nothing to give.
    pub async fn take(&self, from: &SkuKeys, to: &SkuKeys, wanted: u64) -> Result<Option<Taken>> {
        let id = crate::ids::random_name();
        let taken_at = std::time::Instant::now();
        let (units, taken_at_ms) = self.transfer_take_at(from, to, &id, wanted).await?;
        Ok((units > 0).then(|| Taken {
            id,
            from: from.clone(),
            units,
            taken_at,
            taken_at_ms,
        }))
    }

    /// Whether Redis has the sale's state (its meta).
    pub async fn sale_exists(&self, sale: &SkuId) -> Result<bool> {
        let exists: bool = self.conn.clone().exists(SkuKeys::new(sale).meta).await?;
        Ok(exists)
    }

    /// Moves up to `wanted` available units from one bucket of a SKU to another by the
    /// transfer protocol (take, give, records dropped), so Σ stock_total + in transit
    /// stays the SKU's stock at every instant. A give past the lease is left to
    /// `finish_transfers` (the units stay in transit meanwhile): never two givers.
    /// Returns the units given now.
    pub async fn move_units(&self, from: &SkuKeys, to: &SkuKeys, wanted: u64) -> Result<u64> {
        let Some(taken) = self.take(from, to, wanted).await? else {
            return Ok(0);
        };
        if taken.within_lease(self.transfer_timing.lease) {
            let id = &taken.id;
            let read_at = Some(taken.taken_at_ms);
            let gave = self
                .transfer_give_read(from, to, id, taken.units, read_at)
                .await?;
            if gave == "given" || gave == "already" {
                self.drop_transfer_records(&taken, to).await?;
                return Ok(taken.units);
            }
        }
        Ok(0)
    }

    /// The reserves `requests` (all homed in the bucket `sale`) together with the gives
    /// of the units `gives` took for them, in one atomic call (lua/reserve_moved.lua):
    /// the moved units go to these reserves before any other can take them. Returns
    /// what became of each give, and one outcome per request as `reserve_many` gives.
    /// The records of the gives made are the caller's to drop (`drop_transfer_records`).
    pub async fn reserve_moved(
        &self,
        sale: &SkuId,
        gives: &[Taken],
        requests: &[ReserveRequest],
        keys_ttl: ReserveSettings,
    ) -> Result<(Vec<Give>, Vec<Result<ReserveOutcome>>)> {
        let keys = SkuKeys::new(sale);
        // Past the lease, a give is `finish_transfers`'s alone: never two givers.
        let lease = self.transfer_timing.lease;
        let in_lease: Vec<bool> = gives.iter().map(|g| g.within_lease(lease)).collect();
        let sent: Vec<&Taken> = gives
            .iter()
            .zip(&in_lease)
            .filter_map(|(give, &in_lease)| in_lease.then_some(give))
            .collect();
        let mut invocation = with_sale_keys(&SCRIPTS.reserve_moved, &keys);
        invocation
            .key(&keys.transfers)
            .arg(keys_ttl.idempotency_ttl_ms)
            .arg(keys_ttl.payment_grace_ms)
            .arg(limits::RESERVE_RECLAIM_BATCH)
            .arg(keys_ttl.released_holds_cap)
            .arg(sent.len())
            .arg(self.transfer_timing.give_window.as_millis() as u64);
        for give in &sent {
            invocation
                .arg(&give.id)
                .arg(give.units)
                .arg(give.from.tag())
                .arg(give.taken_at_ms);
        }
        push_reserves(&mut invocation, &keys, requests);
        // The gives must survive a failover before their records go (transfer_give).
        let replies: Vec<Vec<String>> = match (&self.replicated, sent.is_empty()) {
            (Some(replicated), false) => replicated.invoke(&invocation, &keys.meta).await?,
            _ => invocation.invoke_async(&mut self.conn.clone()).await?,
        };
        let Some((given, replies)) = replies.split_first() else {
            return Err(bad_reply("reserve_moved arity"));
        };
        if replies.len() != requests.len() || given.len() != sent.len() {
            return Err(bad_reply("reserve_moved arity"));
        }
        let mut statuses = given.iter();
        let gives = in_lease
            .iter()
            .map(|&in_lease| match in_lease {
                false => Ok(Give::Late),
                true => match statuses.next().map(String::as_str) {
                    Some("given") => Ok(Give::Given),
                    Some("already") => Ok(Give::Already),
                    Some("late") => Ok(Give::Late),
                    Some("missing") => Ok(Give::Missing),
                    _ => Err(bad_reply("reserve_moved give")),
                },
            })
            .collect::<Result<Vec<Give>>>()?;
        let outcomes = replies
            .iter()
            .zip(requests)
            .map(|(reply, request)| reserve_outcome(sale, request, reply))
            .collect();
        Ok((gives, outcomes))
    }

    /// Steps 3 and 4 of a given transfer: the units are the receiver's now (a record
    /// left by a stop here is the finisher's: the give counts once).
    pub async fn drop_transfer_records(&self, taken: &Taken, to: &SkuKeys) -> Result<()> {
        self.transfer_done(&taken.from, &format!("out:{}", taken.id))
            .await?;
        self.transfer_done(to, &format!("in:{}", taken.id)).await?;
        Ok(())
    }

    /// Step 1 of a transfer (lua/transfer_take.lua): the units taken from the donor.
    /// With FLASHGATE_REDIS_WAIT_REPLICAS, each step is acknowledged by the donor's (or
    /// receiver's) replicas before the next runs, as a confirm is: a failover that
    /// loses a take can then not have its give applied (stock made from nothing), nor
    /// one that loses a give have its records dropped (stock lost). Without, a lost
    /// step is the reconciler's `stock_total_mismatch`.
    pub async fn transfer_take(
        &self,
        from: &SkuKeys,
        to: &SkuKeys,
        id: &str,
        wanted: u64,
    ) -> Result<u64> {
        Ok(self.transfer_take_at(from, to, id, wanted).await?.0)
    }

    /// `transfer_take`, with the donor's Redis time of the take (ms).
    async fn transfer_take_at(
        &self,
        from: &SkuKeys,
        to: &SkuKeys,
        id: &str,
        wanted: u64,
    ) -> Result<(u64, i64)> {
        let mut invocation = SCRIPTS.transfer_take.prepare_invoke();
        invocation
            .key(&from.meta)
            .key(&from.transfers)
            .arg(id)
            .arg(wanted)
            .arg(to.tag());
        match &self.replicated {
            Some(replicated) => replicated.invoke(&invocation, &from.meta).await,
            None => Ok(invocation.invoke_async(&mut self.conn.clone()).await?),
        }
    }

    /// Step 2 of a transfer (lua/transfer_give.lua) by a caller that has just read it:
    /// true when the receiver has the units (now or before), false when it has no state
    /// (the units stay in transit).
    pub async fn transfer_give(
        &self,
        from: &SkuKeys,
        to: &SkuKeys,
        id: &str,
        units: u64,
    ) -> Result<bool> {
        Ok(self.transfer_give_read(from, to, id, units, None).await? != "missing")
    }

    /// Step 2 of a transfer read at `read_at` (the donor's Redis time, ms; None: now):
    /// 'given', 'already', 'late' or 'missing' (lib.lua give_units).
    async fn transfer_give_read(
        &self,
        from: &SkuKeys,
        to: &SkuKeys,
        id: &str,
        units: u64,
        read_at: Option<i64>,
    ) -> Result<String> {
        let mut invocation = SCRIPTS.transfer_give.prepare_invoke();
        invocation
            .key(&to.meta)
            .key(&to.transfers)
            .key(&to.outbox)
            .arg(id)
            .arg(units)
            .arg(from.tag())
            .arg(read_at.map_or(String::new(), |at| at.to_string()))
            .arg(self.transfer_timing.give_window.as_millis() as u64);
        match &self.replicated {
            Some(replicated) => replicated.invoke(&invocation, &to.meta).await,
            None => Ok(invocation.invoke_async(&mut self.conn.clone()).await?),
        }
    }

    /// Steps 3 and 4 of a transfer (lua/transfer_done.lua): `out:<id>` on the donor,
    /// then `in:<id>` on the receiver.
    pub async fn transfer_done(&self, bucket: &SkuKeys, record: &str) -> Result<bool> {
        let dropped: u64 = SCRIPTS
            .transfer_done
            .key(&bucket.transfers)
            .key(&bucket.meta)
            .key(&bucket.outbox)
            .arg(record)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(dropped == 1)
    }

    /// Finishes the transfers among `buckets` (one SKU's) that were cut short: every
    /// take older than `older_than` by its donor's Redis clock (far more than the
    /// lease) is given, then its records go; a receiver's record whose take is gone is
    /// marked done. A give counts once however many finishers run at once and however
    /// late one acts (lib.lua give_units); one finisher at a time per process. Units in
    /// transit to a receiver with no state stay in transit until its rebuild (which
    /// leaves them out of its plan) and are given then. Returns the transfers finished.
    pub async fn finish_transfers(
        &self,
        buckets: &[SkuKeys],
        older_than: std::time::Duration,
    ) -> Result<usize> {
        let _one_at_a_time = self.finishing.lock().await;
        let mut conn = self.conn.clone();
        let mut finished = 0;
        for from in buckets {
            let reply: Vec<String> = SCRIPTS
                .transfer_stale
                .key(&from.transfers)
                .arg(older_than.as_millis() as u64)
                .arg(self.transfer_timing.give_window.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            let Some((read_at, records)) = reply.split_first() else {
                return Err(bad_reply("transfer_stale"));
            };
            let read_at: i64 = read_at.parse().map_err(|_| bad_reply("transfer_stale"))?;
            for pair in records.chunks(2) {
                let [field, record] = pair else {
                    return Err(bad_reply("transfer_stale"));
                };
                let mut parts = record.splitn(4, ' ');
                let (Some(units), Some(_at), Some(peer)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad_reply("transfer record"));
                };
                let peer = SkuKeys::for_tag(peer);
                if let Some(id) = field.strip_prefix("out:") {
                    let units: u64 = units.parse().map_err(|_| bad_reply("transfer units"))?;
                    let give = self
                        .transfer_give_read(from, &peer, id, units, Some(read_at))
                        .await?;
                    // 'late': this read is too old now, the next pass reads again;
                    // 'missing': the units wait for the receiver's rebuild.
                    if give == "given" || give == "already" {
                        self.transfer_done(from, field).await?;
                        self.transfer_done(&peer, &format!("in:{id}")).await?;
                        finished += 1;
                    }
                } else if let Some(id) = field.strip_prefix("in:") {
                    let taken: bool = conn.hexists(&peer.transfers, format!("out:{id}")).await?;
                    if !taken {
                        self.transfer_done(from, field).await?;
                    }
                }
            }
        }
        Ok(finished)
    }

    /// The finisher as it was before the explorer: it reads each donor's records once
    /// by this host's clock, and drops the receiver's record outright, so a second
    /// finisher that read before the drop gives again. Kept, hidden, so that
    /// tests/explore can show it still finds that double give.
    #[doc(hidden)]
    pub async fn finish_transfers_reading_once(
        &self,
        buckets: &[SkuKeys],
        older_than: std::time::Duration,
    ) -> Result<usize> {
        let mut conn = self.conn.clone();
        let now_ms = crate::explore::host_clock_ms();
        let stale = |at: &str| {
            at.parse::<i64>()
                .is_ok_and(|at| now_ms - at >= older_than.as_millis() as i64)
        };
        let mut finished = 0;
        for from in buckets {
            let records: std::collections::HashMap<String, String> =
                conn.hgetall(&from.transfers).await?;
            for (field, record) in records {
                let mut parts = record.splitn(3, ' ');
                let (Some(units), Some(at), Some(peer)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad_reply("transfer record"));
                };
                if !stale(at) {
                    continue;
                }
                let peer = SkuKeys::for_tag(peer);
                if let Some(id) = field.strip_prefix("out:") {
                    let units: u64 = units.parse().map_err(|_| bad_reply("transfer units"))?;
                    // A receiver with no state (gone since): the units go back.
                    let receiver = if self.transfer_give(from, &peer, id, units).await? {
                        &peer
                    } else {
                        self.transfer_give(from, from, id, units).await?;
                        from
                    };
                    self.transfer_done(from, &field).await?;
                    let _: () = conn.hdel(&receiver.transfers, format!("in:{id}")).await?;
                    finished += 1;
                } else if let Some(id) = field.strip_prefix("in:") {
                    let taken: bool = conn.hexists(&peer.transfers, format!("out:{id}")).await?;
                    if !taken {
                        let _: () = conn.hdel(&from.transfers, &field).await?;
                    }
                }
            }
        }
        Ok(finished)
    }

    /// Drops the records of reservations whose end MySQL has committed: what keeps an
    /// ended reservation's Redis cost to its claim in the user's usage record (layout
    /// 1: to its idempotency key). One HDEL, and one UNLINK for layout-1 hashes (the
    /// keys share the SKU's slot).
    pub async fn forget_ended_reservations(&self, sku: &SkuId, ids: &[&str]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys = SkuKeys::new(sku);
        let tails: Vec<&str> = ids.iter().map(|id| SkuKeys::tail(id)).collect();
        let hashes: Vec<String> = ids.iter().map(|id| keys.reservation(id)).collect();
        let _: () = redis::pipe()
            .cmd("HDEL")
            .arg(&keys.holds)
            .arg(&tails)
            .ignore()
            .cmd("UNLINK")
            .arg(&hashes)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

/// A compensation record as compensate() in lib.lua writes it:
/// `[rid, user, quantity, payment_ref, reason, created_at_ms, status]`, and once
/// resolved (lua/resolve_compensation.lua) `resolved_at_ms, refund_ref, note` after it
/// ('' for none).
fn parse_compensation(sku: &SkuId, id: &str, raw: &str) -> Result<Compensation> {
    let fields: Vec<String> =
        serde_json::from_str(raw).map_err(|_| bad_reply("compensation record"))?;
    let ([rid, user, quantity, payment_ref, reason, created_at, status], resolution) =
        match fields.as_slice() {
            [head @ .., at, refund_ref, note] if fields.len() == 10 => (
                <&[String; 7]>::try_from(head).map_err(|_| bad_reply("compensation record"))?,
                Resolution {
                    at_ms: at.parse().ok(),
                    refund_ref: Some(refund_ref.clone()).filter(|r| !r.is_empty()),
                    note: Some(note.clone()).filter(|n| !n.is_empty()),
                },
            ),
            head if head.len() == 7 => (
                <&[String; 7]>::try_from(head).map_err(|_| bad_reply("compensation record"))?,
                Resolution::default(),
            ),
            _ => return Err(bad_reply("compensation record arity")),
        };
    Ok(Compensation {
        id: id.to_owned(),
        reservation_id: rid.clone(),
        sku: sku.sku().to_string(),
        user_id: user.clone(),
        quantity: number(quantity)?,
        payment_ref: payment_ref.clone(),
        reason: CompensationReason::parse(reason).ok_or_else(|| bad_reply("reason"))?,
        resolved: status == "resolved",
        created_at_ms: created_at.parse().map_err(|_| bad_reply("created_at"))?,
        resolution,
    })
}

/// A stream entry id `<ms>-<seq>`, ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct StreamPosition(u64, u64);

impl StreamPosition {
    pub(crate) fn parse(raw: &str) -> StreamPosition {
        let (ms, seq) = raw.split_once('-').unwrap_or((raw, "0"));
        StreamPosition(ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
}

impl std::fmt::Display for StreamPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

fn optional_ms(ms: Option<i64>) -> String {
    ms.map(|v| v.to_string()).unwrap_or_default()
}

fn parse_optional_ms(raw: &str) -> Result<Option<i64>> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| bad_reply("timestamp"))
}

fn number(raw: &str) -> Result<u64> {
    raw.parse().map_err(|_| bad_reply("counter"))
}

/// Whether a user's usage record (lib.lua `load_usage`: "units released window_end",
/// then one " <key>|<claim>" per idempotency key) names idempotency key `key`. Keys hold
/// no space, so " <key>|" matches only where a claim starts (or inside a longer key
/// with a '|': a false "found", which costs only the reserve script's exact answer).
fn usage_names_key(record: &str, key: &str) -> bool {
    record
        .match_indices(key)
        .any(|(at, _)| record[..at].ends_with(' ') && record[at + key.len()..].starts_with('|'))
}

fn bad_reply(what: &str) -> Error {
    Error::Internal(format!("unexpected script reply ({what})"))
}

/// A reply whose first element is a refusal code.
fn refusal_of(reply: &[String]) -> Error {
    match reply.first().and_then(|code| Refusal::from_code(code)) {
        Some(refusal) => Error::Refused(refusal),
        None => bad_reply(reply.first().map(String::as_str).unwrap_or("empty")),
    }
}

/// `{'created', expires_at, created_at}` (the rest is the request's) or
/// `{'replayed', view...}` or `{refusal code}`.
/// Declares each request's layout-1 idempotency key and passes its user, quantity,
/// new reservation id and key, in order (lua/reserve_batch.lua, lua/reserve_moved.lua).
fn push_reserves(invocation: &mut FunctionCall<'_>, keys: &SkuKeys, requests: &[ReserveRequest]) {
    for request in requests {
        invocation
            .key(keys.idempotency(&request.user_id, &request.idempotency_key))
            .arg(&request.user_id)
            .arg(request.quantity)
            .arg(&request.reservation_id)
            .arg(&request.idempotency_key);
    }
}

fn reserve_outcome(
    sku: &SkuId,
    request: &ReserveRequest,
    reply: &[String],
) -> Result<ReserveOutcome> {
    match reply.first().map(String::as_str) {
        Some("created") => {
            let [_, expires_at, created_at] = reply else {
                return Err(bad_reply("created arity"));
            };
            Ok(ReserveOutcome::Created(Reservation {
                reservation_id: request.reservation_id.clone(),
                sku: sku.sku().to_string(),
                user_id: request.user_id.clone(),
                quantity: request.quantity,
                status: Status::Held,
                expires_at_ms: expires_at.parse().map_err(|_| bad_reply("expires_at"))?,
                created_at_ms: created_at.parse().map_err(|_| bad_reply("created_at"))?,
                payment_ref: None,
            }))
        }
        // Our own reservation id: the first attempt created it and its answer was lost
        // with the connection (the call was retried); for the caller it is new.
        Some("replayed") if reply.get(1) == Some(&request.reservation_id) => {
            Ok(ReserveOutcome::Created(parse_view(sku, &reply[1..])?))
        }
        Some("replayed") => Ok(ReserveOutcome::Replayed(parse_view(sku, &reply[1..])?)),
        Some("forgotten") => match reply {
            [_, rid] => Ok(ReserveOutcome::ReplayedFromRecord(rid.clone())),
            _ => Err(bad_reply("forgotten arity")),
        },
        Some("moving") => Err(Error::unavailable(
            "redis: the reservation this key replays is moving to another node",
            Outcome::NotApplied,
        )),
        _ => Err(refusal_of(reply)),
    }
}

/// `{'ok', view...}` → the view; `{code, ...}` → that refusal.
fn ok_view(sku: &SkuId, reply: &[String]) -> Result<Reservation> {
    match reply.first().map(String::as_str) {
        Some("ok") => parse_view(sku, &reply[1..]),
        _ => Err(refusal_of(reply)),
    }
}

/// `{'ok' | 'confirmed', view...}` changed it, `{'unchanged', view...}` did not;
/// `{code, ...}` → that refusal.
fn transition(sku: &SkuId, reply: &[String]) -> Result<Transition> {
    let changed = match reply.first().map(String::as_str) {
        Some("ok" | "confirmed") => true,
        Some("unchanged") => false,
        _ => return Err(refusal_of(reply)),
    };
    Ok(Transition {
        reservation: parse_view(sku, &reply[1..])?,
        changed,
    })
}

/// view = rid, user, quantity, status, expires_at, created_at, payment_ref
fn parse_view(sku: &SkuId, view: &[String]) -> Result<Reservation> {
    let [rid, user, quantity, status, expires_at, created_at, payment_ref] = view else {
        return Err(bad_reply("view arity"));
    };
    Ok(Reservation {
        reservation_id: rid.clone(),
        sku: sku.sku().to_string(),
        user_id: user.clone(),
        quantity: number(quantity)?,
        status: Status::parse(status).ok_or_else(|| bad_reply("status"))?,
        expires_at_ms: expires_at.parse().map_err(|_| bad_reply("expires_at"))?,
        created_at_ms: created_at.parse().map_err(|_| bad_reply("created_at"))?,
        payment_ref: (!payment_ref.is_empty()).then(|| payment_ref.clone()),
    })
}

/// The Redis records of lua/lib.lua (hold and usage records), read and nudged from
/// outside the scripts: for tests and an operator's debugging; the gateway never uses it.
pub mod inspect {
    use std::collections::HashMap;

    use super::RedisConnection;
    use crate::error::Result;
    use crate::keys::SkuKeys;
    use crate::lua::script;

    /// A hold record: `fg:{sku}:holds` field (the reservation's tail).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Hold {
        pub status: String,
        pub quantity: u64,
        pub created_at: i64,
        pub expires_at: i64,
        pub keep_until: i64,
        pub payment_ref: Option<String>,
        /// (compensation id, payment_ref)
        pub compensations: Vec<(String, String)>,
        pub user: String,
    }

    /// A user's usage record: `fg:{sku}:used` field (the user id).
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct Usage {
        pub units: u64,
        pub released: u64,
        pub window_end: i64,
        pub claims: Vec<Claim>,
    }

    /// One idempotency key of a user and the hold it made.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Claim {
        pub live: bool,
        pub tail: String,
        pub quantity: u64,
        pub keep_until: i64,
        pub key: String,
    }

    pub fn parse_hold(raw: &str) -> Option<Hold> {
        let mut parts = raw.splitn(8, ' ');
        let mut next = || parts.next();
        let (status, quantity, created_at, expires_at, keep_until, payment, n) = (
            next()?,
            next()?,
            next()?,
            next()?,
            next()?,
            next()?,
            next()?,
        );
        let mut rest = next()?;
        let mut compensations = Vec::new();
        for _ in 0..n.parse::<usize>().ok()? {
            let (comp, after) = rest.split_once(' ')?;
            let (id, payment_ref) = comp.split_once('=')?;
            compensations.push((id.to_owned(), payment_ref.to_owned()));
            rest = after;
        }
        Some(Hold {
            status: status.to_owned(),
            quantity: quantity.parse().ok()?,
            created_at: created_at.parse().ok()?,
            expires_at: expires_at.parse().ok()?,
            keep_until: keep_until.parse().ok()?,
            payment_ref: payment.strip_prefix('=').map(str::to_owned),
            compensations,
            user: rest.to_owned(),
        })
    }

    pub fn parse_usage(raw: &str) -> Option<Usage> {
        let mut tokens = raw.split(' ');
        let mut usage = Usage {
            units: tokens.next()?.parse().ok()?,
            ..Usage::default()
        };
        if let Some(released) = tokens.next() {
            usage.released = released.parse().ok()?;
            usage.window_end = tokens.next()?.parse().ok()?;
        }
        for token in tokens {
            // "<key>|<+|-><tail>:<quantity>:<keep_until>": the suffix follows the last '|'.
            let (key, suffix) = token.rsplit_once('|')?;
            let live = suffix.starts_with('+');
            let mut fields = suffix.get(1..)?.split(':');
            usage.claims.push(Claim {
                live,
                tail: fields.next()?.to_owned(),
                quantity: fields.next()?.parse().ok()?,
                keep_until: fields.next()?.parse().ok()?,
                key: key.to_owned(),
            });
        }
        Some(usage)
    }

    /// The hold record of a reservation (layout 2 only).
    pub async fn hold(
        conn: &mut RedisConnection,
        keys: &SkuKeys,
        reservation_id: &str,
    ) -> Result<Option<Hold>> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&keys.holds)
            .arg(SkuKeys::tail(reservation_id))
            .query_async(conn)
            .await?;
        Ok(raw.and_then(|r| parse_hold(&r)))
    }

    /// Every usage record of the SKU, by user.
    pub async fn usage(
        conn: &mut RedisConnection,
        keys: &SkuKeys,
    ) -> Result<HashMap<String, Usage>> {
        let raw: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.used)
            .query_async(conn)
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(user, r)| parse_usage(&r).map(|u| (user, u)))
            .collect())
    }

    /// Moves a hold's deadline (record and index) as if its time had passed; true when
    /// there was such a hold.
    pub async fn set_deadline(
        conn: &mut RedisConnection,
        keys: &SkuKeys,
        reservation_id: &str,
        expires_at_ms: i64,
    ) -> Result<bool> {
        let rewind = script(
            "local K = sale_keys()\n\
             local h = load_hold(K, ARGV[1])\n\
             if not h then return 0 end\n\
             h.expires_at = ARGV[2]\n\
             store_hold(K, h)\n\
             if is_live(h.status) then redis.call('ZADD', K.deadlines, ARGV[2], h.tail) end\n\
             return 1",
        );
        let mut invocation = rewind.prepare_invoke();
        for key in keys.sale() {
            invocation.key(key);
        }
        let found: i64 = invocation
            .key(keys.reservation(reservation_id))
            .arg(reservation_id)
            .arg(expires_at_ms)
            .invoke_async(conn)
            .await?;
        Ok(found == 1)
    }

    /// Makes Redis forget a reservation of `user`, as a lost write or an expired
    /// retention would: its hold record (if the flush has not dropped it already) and
    /// its claim (so its idempotency key) go; the counters stay. True when there was a
    /// record or a claim.
    pub async fn forget(
        conn: &mut RedisConnection,
        keys: &SkuKeys,
        reservation_id: &str,
        user: &str,
    ) -> Result<bool> {
        let forget = script(
            "local K = sale_keys()\n\
             local tail = tail_of(ARGV[1])\n\
             local found = redis.call('HDEL', K.holds, tail)\n\
             local u = load_usage(K, ARGV[2])\n\
             local dropped = 0\n\
             local claims = string.gsub(u.claims, ' (%S+)', function(token)\n\
               if string.match(token, '|[+-]([%w_-]+):%d+:%d+$') == tail then\n\
                 dropped = dropped + 1\n\
                 return ''\n\
               end\n\
             end)\n\
             if dropped == 0 and found == 0 then return 0 end\n\
             u.claims = claims\n\
             save_usage(K, u, now_ms())\n\
             return 1",
        );
        let mut invocation = forget.prepare_invoke();
        for key in keys.sale() {
            invocation.key(key);
        }
        let found: i64 = invocation
            .arg(reservation_id)
            .arg(user)
            .invoke_async(conn)
            .await?;
        Ok(found == 1)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn records_parse_as_lib_lua_writes_them() {
            let hold = parse_hold("paying 2 10 20 30 =pay-1 1 cid=pay 0 a user").unwrap();
            assert_eq!(hold.status, "paying");
            assert_eq!(
                (hold.quantity, hold.created_at, hold.expires_at),
                (2, 10, 20)
            );
            assert_eq!(hold.payment_ref.as_deref(), Some("pay-1"));
            assert_eq!(hold.compensations, vec![("cid".into(), "pay".into())]);
            assert_eq!(hold.user, "0 a user");
            assert_eq!(parse_hold("held 1 1 2 3 - 0 u").unwrap().payment_ref, None);
            let usage = parse_usage("3 1 99 k:1|+t1:1:50 k|2|-t2:2:60").unwrap();
            assert_eq!((usage.units, usage.released, usage.window_end), (3, 1, 99));
            assert_eq!(usage.claims[0].key, "k:1");
            assert_eq!(
                (usage.claims[1].key.as_str(), usage.claims[1].tail.as_str()),
                ("k|2", "t2")
            );
            assert!(usage.claims[0].live && !usage.claims[1].live);
            assert_eq!(parse_usage("7").unwrap().units, 7);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_record_names_the_keys_of_its_claims_and_no_other() {
        let record = "2 1 1700000000000 k1|+aaaa:1:0 a|b|-bbbb:1:1700000009000 k10|+cc:1:0";
        for key in ["k1", "a|b", "k10"] {
            assert!(usage_names_key(record, key), "{key}");
        }
        for key in ["k", "1", "b", "aaaa", "k100", "0", "1700000000000"] {
            assert!(!usage_names_key(record, key), "{key}");
        }
        // A key ending where a longer key's '|' sits: found, which only costs the script.
        assert!(usage_names_key(record, "a"));
        assert!(!usage_names_key("3", "3"), "a bare count names no key");
        assert!(!usage_names_key("1 0 5", "5"));
    }

    #[test]
    fn a_replay_of_our_own_new_id_is_a_creation() {
        // The reserve was sent, the connection dropped before its answer, the retry
        // found the hold the first attempt made: for the caller it is new.
        let sku = SkuId::parse("s").unwrap();
        let request = ReserveRequest {
            user_id: "u".into(),
            quantity: 1,
            idempotency_key: "k".into(),
            reservation_id: "mine".into(),
        };
        let reply = |rid: &str| -> Vec<String> {
            ["replayed", rid, "u", "1", "held", "100", "50", ""]
                .map(String::from)
                .to_vec()
        };
        assert!(matches!(
            reserve_outcome(&sku, &request, &reply("mine")),
            Ok(ReserveOutcome::Created(_))
        ));
        assert!(matches!(
            reserve_outcome(&sku, &request, &reply("earlier")),
            Ok(ReserveOutcome::Replayed(_))
        ));
    }

    #[test]
    fn stream_positions_order_numerically() {
        assert!(StreamPosition::parse("10-0") > StreamPosition::parse("9-5"));
        assert!(StreamPosition::parse("10-10") > StreamPosition::parse("10-9"));
        assert_eq!(StreamPosition::parse("5-3").to_string(), "5-3");
    }

    #[test]
    fn views_decode_and_bad_replies_are_internal_errors() {
        let sku = SkuId::parse("s").unwrap();
        let view: Vec<String> = ["r", "u", "2", "paying", "100", "50", "pay-1"]
            .map(String::from)
            .to_vec();
        let r = parse_view(&sku, &view).unwrap();
        assert_eq!(r.status, Status::Paying);
        assert_eq!(r.payment_ref.as_deref(), Some("pay-1"));
        assert!(matches!(
            parse_view(&sku, &view[1..]),
            Err(Error::Internal(_))
        ));
        let reply = vec!["sold_out".to_string()];
        assert!(matches!(
            refusal_of(&reply),
            Error::Refused(Refusal::SoldOut)
        ));
        assert!(matches!(refusal_of(&["weird".into()]), Error::Internal(_)));
    }
}
