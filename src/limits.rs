//! Every bound flashgate enforces, each with the reason it has that value.
//! Other modules take their numbers from here, never from literals of their own.

use std::time::Duration;

/// A transfer between buckets this old and not finished was cut short (its gateway
/// stopped between steps; the gateway's own lease is 1 s): the worker finishes it.
pub const TRANSFER_STALE: Duration = Duration::from_secs(5);
/// How long after a transfer was read a give of it is taken (lib.lua give_units): more
/// than the gateway's 1 s lease; a finished transfer's receiver record lasts twice this,
/// so two Redis primaries' clocks may differ by up to this much.
pub const TRANSFER_GIVE_WINDOW: Duration = Duration::from_secs(2);
/// Readings of a split SKU's buckets taken before drift is called (the reconciler) or
/// before giving up on one no transfer overlapped (an admin PUT): the buckets are read
/// one by one, so a transfer running meanwhile can make one reading look off.
pub const SPLIT_STOCK_READINGS: usize = 5;
/// How long a reserve whose home bucket ran dry waits for stock in transit to land
/// somewhere, or for a read of the buckets that no transfer overlapped, before two
/// short reads in a row answer `sold_out` (src/buckets.rs; issue 13 asks ~20 ms).
pub const TRANSFER_WAIT: Duration = Duration::from_millis(20);
/// How long a reserve whose home bucket ran dry keeps trying while the buckets together
/// have its quantity and other reserves buy it first; then 503 `unavailable` (nothing
/// done, a retry with the same key is safe). Each such round means others bought
/// units, so the stock runs out well before; within REDIS_RESPONSE_TIMEOUT, the
/// deadline of one Redis call.
pub const TRANSFER_GIVE_UP: Duration = Duration::from_secs(1);

/// SKU ids are part of every Redis key of the SKU and of reservation ids (contract).
pub const SKU_ID_MAX_LEN: usize = 64;
/// JWT `sub` is the user id; it is stored in MySQL `VARCHAR(64)` columns (contract).
pub const USER_ID_MAX_LEN: usize = 64;
/// `Idempotency-Key` header, 1..=128 visible ASCII (contract).
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 128;
/// `payment_ref`, 1..=128 visible ASCII (contract); stored in MySQL `VARCHAR(128)`.
pub const PAYMENT_REF_MAX_LEN: usize = 128;
/// Largest stock of one SKU: Redis counters are i64 and Lua numbers are doubles,
/// so stay far below 2^53 where both are exact.
pub const STOCK_MAX: u64 = 1_000_000_000_000;
/// Quantity per reservation is a `u32` in the contract.
pub const QUANTITY_MAX: u64 = u32::MAX as u64;
/// Hold and grace durations: a day is longer than any checkout.
pub const HOLD_SECONDS_MAX: u64 = 86_400;
/// Request bodies are a few small fields; anything larger is hostile.
pub const REQUEST_BODY_MAX_BYTES: usize = 16 * 1024;
/// Expired holds the reserve script may give back before answering `sold_out`:
/// enough to refill a hot SKU, few enough to keep one script call short.
pub const RESERVE_RECLAIM_BATCH: u32 = 16;
/// Most admissions one waiting-room call makes (lua/queue.lua): keeps the call short;
/// the next look at the queue admits the rest.
pub const QUEUE_ADMIT_BATCH: u32 = 1000;
/// Default polls per second of one waiting room's waiting users together.
pub const QUEUE_POLLS_PER_SECOND: u32 = 1000;
/// Shortest `retry_after_ms` a waiting ticket answers (the front of the line).
pub const QUEUE_RETRY_MIN_MS: u64 = 500;
/// `retry_after_ms` of an admitted ticket: it has nothing to wait for (reserve); a poll
/// now and then shows a lapse or the end.
pub const QUEUE_ADMITTED_RETRY_MS: u64 = 5_000;
/// A waiting room's `admission_seconds`: at least a second, at most a day.
pub const ADMISSION_SECONDS_MAX: u64 = 86_400;
/// Admission tokens longer than this are refused unread (a token carries the SKU,
/// the user id, a time and a MAC: well under 300 bytes).
pub const ADMISSION_TOKEN_MAX_LEN: usize = 512;
/// Expired holds one sweep script call returns; the sweeper repeats until none are due.
/// Bounded so one call never blocks Redis for long.
pub const SWEEP_BATCH: u32 = 500;
/// Outbox events written to MySQL in one transaction.
pub const FLUSH_BATCH: usize = 500;
/// An outbox event pending this long on a consumer is taken over (XAUTOCLAIM): the
/// consumer is presumed dead. Far above one batch's flush time.
pub const FLUSH_CLAIM_IDLE: Duration = Duration::from_secs(30);
/// A retired SKU's meta stays in Redis this long as its tombstone: reserves answer
/// `ended` and the SKU view answers from Redis, not MySQL, while latecomers still
/// call. After it, both come from MySQL (which keeps the SKU for good).
pub const RETIRED_SKU_TOMBSTONE: Duration = Duration::from_secs(86_400);
/// Longest the flush leaves an idle SKU's outbox unlooked at. Events this process
/// writes are looked at the next pass (store::OutboxHints); this bounds the delay
/// for events other processes (gateways without a worker) write.
pub const FLUSH_IDLE_PROBE_MAX: Duration = Duration::from_secs(2);
/// Longest the sweeper leaves a SKU on sale unvisited when no hold can be due sooner
/// (it plans each SKU's next visit from its first deadline and its hold length).
/// Refreshes the SKU's `available` gauge and catches terms changed behind its back.
pub const SWEEP_IDLE_RECHECK: Duration = Duration::from_secs(60);
/// How often the worker drops dead consumers from a SKU's flush group, and how long
/// a consumer with nothing pending must have been idle to count as dead (far above
/// FLUSH_CLAIM_IDLE: its entries were claimed by then).
pub const CONSUMER_REAP_EVERY: Duration = Duration::from_secs(300);
pub const CONSUMER_REAP_IDLE: Duration = Duration::from_secs(600);
/// Default FLASHGATE_MAX_RELEASED_HOLDS_PER_USER: far above what a real buyer does
/// (reserve, change their mind, reserve again), far below a reserve → cancel loop.
pub const MAX_RELEASED_HOLDS_PER_USER: u64 = 20;
/// Idempotency keys: a week is longer than any client retries. A key's claim stays in
/// its user's usage record that long (lib.lua `keep_until`), so a replay always finds
/// the reservation (in Redis, or once flushed in MySQL, which records it for longer).
pub const IDEMPOTENCY_TTL_MAX_SECONDS: u64 = 7 * 86_400;
/// Admin writes of one SKU wait this long for another's to finish (MySQL GET_LOCK).
pub const SKU_LOCK_WAIT_SECONDS: u32 = 5;
/// `starts_at` / `ends_at` (contract): 1970-01-01T00:00:00.000Z ..= 9999-12-31T23:59:59.999Z.
pub const TIMESTAMP_MIN_MS: i64 = 0;
pub const TIMESTAMP_MAX_MS: i64 = 253_402_300_799_999;
/// One Redis round trip slower than this means Redis is in trouble: answer 503.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to Redis.
/// Dedicated connections for confirms that wait for replicas (store::ReplicatedWrites):
/// each is blocked for up to FLASHGATE_REDIS_WAIT_TIMEOUT_MS per confirm, so this many
/// confirms wait at once; more queue for a connection (at most REDIS_RESPONSE_TIMEOUT).
pub const WAIT_CONNECTIONS: usize = 64;
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// MySQL pool: enough for the admin path, the flush worker and reconciliation.
pub const MYSQL_POOL_MAX: u32 = 16;
/// Waiting for a MySQL connection longer than this means MySQL is in trouble.
pub const MYSQL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Compensations listed per page (contract).
pub const COMPENSATIONS_PAGE_DEFAULT: u32 = 100;
/// Events one DELETE of the retention prune takes: short enough that the flush's
/// inserts never wait long behind it.
pub const EVENTS_PRUNE_BATCH: u32 = 1000;
/// How often the worker prunes events past their retention (hours): a minute late is
/// nothing.
pub const EVENTS_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
pub const COMPENSATIONS_PAGE_MAX: u32 = 1000;

const _: () = assert!(COMPENSATIONS_PAGE_DEFAULT <= COMPENSATIONS_PAGE_MAX);
const _: () = assert!(STOCK_MAX < (1u64 << 53));

/// How long a gateway answers `sold_out` from its local flag without asking Redis.
/// Stock that comes back (cancel, expiry, restock) must be sellable through every
/// gateway within 1 s (contract); a short flag also bounds how long a replay of an
/// idempotency key can be answered `sold_out` by the flag.
pub const SOLD_OUT_FLAG_TTL: Duration = Duration::from_millis(200);

const _: () = assert!(SOLD_OUT_FLAG_TTL.as_millis() < 1000);

/// Age of a sold-out flag from which one request at a time asks Redis again while
/// the others still get the flag's answer (src/sold_out.rs): far enough before
/// SOLD_OUT_FLAG_TTL for that request's answer (a split SKU's settles in tens of ms
/// under load) to renew the flag before every request would ask at once.
pub const SOLD_OUT_FLAG_REFRESH: Duration = Duration::from_millis(120);

const _: () = assert!(SOLD_OUT_FLAG_REFRESH.as_millis() < SOLD_OUT_FLAG_TTL.as_millis());

/// SKUs the worker sweeps (and probes for an outbox backlog) at once: their calls
/// share one pipelined connection, so a pass over many SKUs costs Redis time, not
/// round trips.
pub const WORKER_SKU_CONCURRENCY: usize = 32;

/// Requests of one SKU decided in one Redis call at most (see `batcher`): bounds how
/// long one call keeps Redis busy (about 20 µs of script time per reserve).
pub const BATCH_MAX: usize = 64;
/// Reserves of one split SKU waiting for stock moves decided in one batch at most
/// (`batcher::BucketMoves`, one batch at a time): only those the stock read can serve
/// cost script time, the others a comparison each, so at the tail of a sale, when
/// hundreds wait for a few units, they are answered together.
pub const MOVES_BATCH_MAX: usize = 1024;
/// Calls of one SKU in flight at once: while they run, new requests gather into the
/// next batch; more than one keeps Redis busy during the round trips.
pub const BATCHES_IN_FLIGHT: usize = 4;

/// A client must deliver a whole request head this long after its first byte (or
/// after connecting): a slowloris head trickles bytes to hold a connection forever.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body (at most REQUEST_BODY_MAX_BYTES) must arrive this long after its
/// head; a stalled body otherwise holds a connection and a task. Answered 408.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request in flight is closed after this long.
/// Long enough for a client's pool to reuse it between a sale's requests, short
/// enough that idle sockets do not pile up; idle ones are also closed first when the
/// connection cap is reached.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// An answer whose bytes the client does not take for this long (a pipelining client
/// that never reads) closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at most. A flash sale's clients mostly reuse pooled keep-alive
/// connections; the cap keeps a flood of sockets below the usual fd limits (raise
/// `ulimit -n` above it, with room for Redis, MySQL and the listener).
pub const MAX_CONNECTIONS: usize = 10_000;
/// On SIGTERM, in-flight requests get this long to finish; then the remaining
/// connections are dropped and the process exits. Below the usual 30 s an
/// orchestrator waits before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// hyper's read (and write) buffer per connection, which bounds a request head: far
/// above any real head (a JWT is under 1 KiB), low enough that 10,000 connections
/// cannot pin gigabytes; above hyper's 64 KiB URI limit, so an over-long URI still
/// gets its own 414 rather than 431.
pub const HTTP_BUFFER_MAX_BYTES: usize = 80 * 1024;
/// Connections waiting to be accepted (the kernel caps it at `net.core.somaxconn`):
/// a burst of new connections beyond the queue loses SYNs, which wait 1 s to retry.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Deadlines shorter than this would cut off healthy clients on a busy machine.
pub const CONNECTION_TIMEOUT_MIN: Duration = Duration::from_millis(100);

const _: () = assert!(HEAD_TIMEOUT.as_millis() >= CONNECTION_TIMEOUT_MIN.as_millis());
const _: () = assert!(BODY_TIMEOUT.as_millis() >= CONNECTION_TIMEOUT_MIN.as_millis());
const _: () = assert!(WRITE_TIMEOUT.as_millis() >= CONNECTION_TIMEOUT_MIN.as_millis());
const _: () = assert!(IDLE_TIMEOUT.as_millis() >= HEAD_TIMEOUT.as_millis());
const _: () = assert!(SHUTDOWN_GRACE.as_secs() < 30);

/// Leeway on a user JWT's `exp` and `nbf` for clock skew between the token issuer and
/// the gateway. 0: `exp == now` is already expired (RFC 7519: "on or after").
pub const JWT_LEEWAY_SECONDS: u64 = 0;

/// Reserves per second one user may make, sustained, and at once: a person presses
/// "reserve" a few times at most; a bot looping reserve/cancel (hundreds a second)
/// is held to this.
pub const RATE_PER_USER: u32 = 5;
pub const RATE_PER_USER_BURST: u32 = 10;
/// Keys one rate limiter remembers at most (about 150 bytes each): ids an attacker
/// invents cannot grow memory past this; when idle keys dropped do not make room, the
/// limiter starts over.
pub const RATE_MAX_KEYS: usize = 100_000;
/// A rate limiter drops its idle keys after this many checks at least (after a quarter
/// as many checks as it keeps keys, when that is more: admission.rs `Keyed::trim`).
pub const RATE_TRIM_EVERY: usize = 256;
/// Requests in flight at most before new ones are shed (503): far above what two cores
/// answer in one Redis round trip, low enough that a flood waits in no queue.
pub const MAX_IN_FLIGHT: usize = 4096;
/// A `rate_limited` answer leaves this long after its refusal (holding no in-flight
/// permit): shorter than any Retry-After (>= 1 s), so a client that honours it loses
/// nothing, while a client hammering in a closed loop makes at most 4 requests a second
/// per connection (a 429 costs the gateway ~25 µs of CPU: at full speed one abuser
/// took a core away from honest users on two).
pub const RATE_LIMITED_DELAY: Duration = Duration::from_millis(250);

const _: () = assert!(RATE_MAX_KEYS >= 2 * RATE_TRIM_EVERY);

/// Users or idempotency-key claims per restore_usage.lua call when a rebuild puts back
/// what MySQL records (Store::restore_usage): one call stays short.
pub const RESTORE_BATCH: usize = 500;

/// Idempotency-key claims a rebuild of one SKU restores at most (the latest kept
/// first): every key of a sale's lifetime fits many times over.
pub const RESTORE_CLAIMS_MAX: u32 = 2_000_000;

/// SKU views read at once for one page of `GET /v1/admin/skus`.
pub const LISTING_CONCURRENCY: usize = 8;
