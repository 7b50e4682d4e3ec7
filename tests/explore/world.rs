//! One seed's world: a split SKU, the processes that sell, finish, flush and repair it,
//! the faults, and the invariants checked after every step.

use crate::schedule::{one_in, seed_rng, Scheduler, Turnstile};
use flashgate::auth::Caller;
use flashgate::config::GatewaySettings;
use flashgate::error::Error;
use flashgate::gateway::Gateway;
use flashgate::ids::{self, SkuId};
use flashgate::keys::SkuKeys;
use flashgate::reservation::SkuDefinition;
use flashgate::store::{Store, TransferTiming};
use flashgate::worker::Worker;
use rand::rngs::StdRng;
use rand::Rng;
use redis::AsyncCommands;
use sqlx::mysql::MySqlPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Which code the finisher and the rebuild run: today's, or the versions the outside
/// audit broke (kept so that a change that blinds the explorer is caught).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Current,
    OldFinisher,
    OldRebuild,
}

impl Variant {
    pub fn flag(self) -> &'static str {
        match self {
            Variant::Current => "",
            Variant::OldFinisher => " --old-finisher",
            Variant::OldRebuild => " --old-rebuild",
        }
    }
}

/// Short leases, so that stalls and cut transfers happen within a seed.
pub(crate) const TIMING: TransferTiming = TransferTiming {
    lease: Duration::from_millis(40),
    stale: Duration::from_millis(150),
    give_window: Duration::from_millis(80),
};
/// Steps in which faults may strike; then the actors finish their work.
const FAULT_STEPS: u64 = 500;
/// A seed's steps at most.
const MAX_STEPS: u64 = 2_500;
/// How long the processes may call nothing before the seed fails as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(20);
/// A seed's real time at most before it fails as stuck (they take 4 to 8 s).
const SEED_TIME_MAX: Duration = Duration::from_secs(90);

pub struct Env {
    pub(crate) redis_url: String,
    pub(crate) observer: Store,
    /// The processes' MySQL pool (gateways, workers, reconcilers, as one deployment's).
    pub(crate) pool: MySqlPool,
    /// The explorer's own reads of MySQL, for the invariants: a pool apart, so that
    /// processes holding every connection of theirs (blocked on a lock a stalled
    /// process holds) do not stop the checks.
    pub(crate) checks: MySqlPool,
}

impl Env {
    pub async fn connect() -> Env {
        let redis_url = std::env::var("FLASHGATE_REDIS_URL")
            .expect("FLASHGATE_REDIS_URL (run through scripts/dev explore or test)");
        let database_url = std::env::var("FLASHGATE_DATABASE_URL").expect("FLASHGATE_DATABASE_URL");
        let observer = Store::new(connect_redis(&redis_url).await);
        let pool = flashgate::db::connect(&database_url).expect("mysql");
        let checks = flashgate::db::connect(&database_url).expect("mysql");
        Env {
            redis_url,
            observer,
            pool,
            checks,
        }
    }
}

pub(crate) async fn connect_redis(url: &str) -> flashgate::store::RedisConnection {
    let args = flashgate::config::RedisArgs {
        redis_url: url.into(),
        redis_cluster: false,
        redis_wait_replicas: 0,
        redis_wait_timeout_ms: 500,
    };
    flashgate::store::connect(&args).await.expect("redis")
}

pub struct Outcome {
    pub steps: u64,
    pub faults: u64,
    /// Rollbacks to a snapshot that happened (`--rollback`).
    pub rollbacks: u64,
    pub failure: Option<String>,
    pub trace_tail: String,
}

/// What the processes were answered: what the invariants hold them to.
#[derive(Default)]
pub(crate) struct Journal {
    /// (user, key) -> the reservations it was answered with, and the era of each (how
    /// often Redis forgot before it: a live hold's key is lost with Redis; an ended
    /// one's is restored by a rebuild, not by a rollback).
    pub(crate) holds: HashMap<(String, String), Vec<(String, Span)>>,
    /// Reservations made, for the payments and cancels to pick from.
    pub(crate) reservations: Vec<String>,
    /// (reservation, payment_ref) answered 200: a sale (or, if Redis forgot it, a
    /// compensation) must reach MySQL.
    pub(crate) sold: Vec<(String, String)>,
    /// Compensation ids answered with a 409.
    pub(crate) compensated: Vec<String>,
    /// Answers given while a snapshot was pending (200s, then 409s' compensation ids):
    /// a rollback to it may take them back before the flush copied them (no `WAIT`),
    /// which the contract allows.
    pub(crate) sold_at_risk: Vec<(String, String)>,
    pub(crate) compensated_at_risk: Vec<String>,
    /// Errors no input may cause.
    pub(crate) internal: Vec<String>,
    /// Invariants an actor saw broken at the instant it was answered.
    pub(crate) broken: Vec<String>,
    /// Redis losses so far.
    pub(crate) losses: u64,
    /// Rollbacks so far (`--rollback`), and the era each one began.
    pub(crate) rollbacks: u64,
    pub(crate) rollback_eras: Vec<u64>,
    /// Snapshots taken so far, and whether one is pending (not yet rolled back to).
    pub(crate) snapshots: u64,
    pub(crate) snapshot_pending: bool,
}

impl Journal {
    /// How often Redis forgot so far (a loss or a rollback).
    pub(crate) fn era(&self) -> u64 {
        self.losses + self.rollbacks
    }

    /// What an answer's risk depends on: a snapshot pending, taken or rolled back to
    /// around the call.
    fn snapshot_state(&self) -> (bool, u64, u64) {
        (self.snapshot_pending, self.snapshots, self.rollbacks)
    }

    /// Whether a rollback may have taken back an answer given between `before` and
    /// now (`snapshot_state` before the call).
    fn at_risk(&self, before: (bool, u64, u64)) -> bool {
        before.0 || before != self.snapshot_state()
    }

    /// Whether a rollback came after a hold of era `earlier` (up to now).
    fn rolled_back_since(&self, earlier: u64) -> bool {
        self.rollback_eras.iter().any(|&e| e > earlier)
    }
}

/// One simulated process: its tasks, killed together.
struct Process {
    tasks: Vec<JoinHandle<()>>,
}

pub async fn run_seed(
    env: &Env,
    turnstile: &Turnstile,
    seed: u64,
    variant: Variant,
    with_admin: bool,
    with_rollback: bool,
    verbose: bool,
) -> Outcome {
    let started = std::time::Instant::now();
    let mut rng = seed_rng(seed, 0);
    let mut scheduler = Scheduler::new(turnstile, seed_rng(seed, 1));
    let buckets = rng.random_range(2..=3u32);
    let stock = rng.random_range(6..=14u64);
    // The same SKU for the same seed (its buckets' tags and its users' homes follow
    // from its name): what an earlier run of the seed left goes first.
    let sku = SkuId::parse(&format!("explore-{seed}")).unwrap();
    forget_sku(env, &sku).await;
    let definition = SkuDefinition {
        stock_total: stock,
        per_user_limit: 2,
        hold_seconds: 1,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets,
        paused: false,
        waiting_room: None,
    };
    let settings = gateway_settings();
    flashgate::explore::skew_host_clock(0);
    let admin = Gateway::new(env.observer.clone(), env.pool.clone(), settings.clone());
    admin
        .define_sku(&sku, &definition)
        .await
        .expect("define the SKU");
    let world = Arc::new(World {
        sku: sku.clone(),
        keys: flashgate::buckets::sales(&sku, buckets)
            .iter()
            .map(SkuKeys::new)
            .collect(),
        users: (0..8).map(|u| format!("u{u}")).collect(),
        journal: Mutex::new(Journal::default()),
        variant,
        definition: definition.clone(),
        settings: settings.clone(),
        put_in_flight: Mutex::new(None),
        stop: Default::default(),
    });

    let mut processes: HashMap<u32, Process> = HashMap::new();
    let mut next_process = 1u32;
    let mut gateways: Vec<u32> = Vec::new();
    let spawn_gateway = |p: u32, processes: &mut HashMap<u32, Process>, rng: &mut StdRng| {
        let world = world.clone();
        let (redis_url, pool, settings) =
            (env.redis_url.clone(), env.pool.clone(), settings.clone());
        let buyers = (0..2)
            .map(|b| {
                let (world, redis_url, pool, settings) = (
                    world.clone(),
                    redis_url.clone(),
                    pool.clone(),
                    settings.clone(),
                );
                let actor_rng = seed_rng(rng.random(), u64::from(p) * 10 + b);
                tokio::spawn(flashgate::explore::as_process(p, async move {
                    let store = Store::new(connect_redis(&redis_url).await).with_timing(TIMING);
                    let gateway = Gateway::new(store, pool, settings);
                    world.buyer(&gateway, actor_rng, 25).await;
                }))
            })
            .collect();
        processes.insert(p, Process { tasks: buyers });
    };
    for _ in 0..2 {
        spawn_gateway(next_process, &mut processes, &mut rng);
        gateways.push(next_process);
        next_process += 1;
    }
    // The worker, the reconcile cron, two lone finishers (finishers race by design) and,
    // with `--admin`, an operator changing the stock.
    let roles = [
        Role::Worker,
        Role::Cron,
        Role::Finisher,
        Role::Finisher,
        Role::Admin,
    ];
    for role in roles.into_iter().take(if with_admin { 5 } else { 4 }) {
        let p = next_process;
        next_process += 1;
        let world = world.clone();
        let (redis_url, pool) = (env.redis_url.clone(), env.pool.clone());
        let actor_rng = seed_rng(rng.random(), u64::from(p) * 10);
        let task = tokio::spawn(flashgate::explore::as_process(p, async move {
            let store = Store::new(connect_redis(&redis_url).await).with_timing(TIMING);
            // Finishers are cheap: they run on through the seed.
            let ops = match role {
                Role::Finisher => 60,
                Role::Admin => 4,
                _ => 15,
            };
            world.service(role, store, pool, actor_rng, ops).await;
        }));
        processes.insert(p, Process { tasks: vec![task] });
    }

    let mut faults = 0u64;
    let mut failure = None;
    let mut snapshot: Option<Snapshot> = None;
    let mut last_step = std::time::Instant::now();
    let mut last_stock = String::new();
    loop {
        scheduler.settle().await;
        let stock_now = stock_line(env, &world).await;
        if stock_now != last_stock {
            scheduler.trace.push(format!("      = {stock_now}"));
            last_stock = stock_now;
        }
        if let Err(e) = check(env, &world).await {
            failure = Some(e);
            break;
        }
        let live = processes
            .values()
            .any(|p| p.tasks.iter().any(|t| !t.is_finished()));
        if !live || scheduler.steps >= MAX_STEPS {
            break;
        }
        // One roll per step, not per look (the looks between two steps are as many as
        // real time lets the scheduler find nothing to run).
        if scheduler.steps < FAULT_STEPS && scheduler.first_look() {
            if let Some(fault) = Fault::pick(&mut rng, with_rollback) {
                faults += 1;
                scheduler.trace.push(format!(
                    "      FAULT {fault:?} (after step {})",
                    scheduler.steps
                ));
                // A gateway between the take of a transfer and its give, if any.
                let mid_transfer = scheduler
                    .waiting_on(flashgate::store::SCRIPTS.reserve_moved.name())
                    .filter(|p| gateways.contains(p));
                match fault {
                    Fault::KillGateway | Fault::CutTransfer => {
                        let victim = match (fault, mid_transfer) {
                            (Fault::CutTransfer, Some(p)) => p,
                            _ => gateways[rng.random_range(0..gateways.len())],
                        };
                        gateways.retain(|&p| p != victim);
                        for task in &processes[&victim].tasks {
                            task.abort();
                        }
                        scheduler.kill(victim);
                        spawn_gateway(next_process, &mut processes, &mut rng);
                        gateways.push(next_process);
                        next_process += 1;
                    }
                    Fault::Stall => {
                        let waiting = scheduler.waiting_processes();
                        if !waiting.is_empty() {
                            let p = waiting[rng.random_range(0..waiting.len())];
                            scheduler.stall(p, rng.random_range(20..80));
                            // Past every lease and staleness bound meanwhile.
                            tokio::time::sleep(TIMING.stale + Duration::from_millis(10)).await;
                        }
                    }
                    Fault::LoseSku => {
                        lose(env, &world.keys).await;
                        world.journal.lock().unwrap().losses += 1;
                    }
                    Fault::LoseBucket => {
                        let b = rng.random_range(0..world.keys.len());
                        lose(env, &world.keys[b..=b]).await;
                        world.journal.lock().unwrap().losses += 1;
                    }
                    Fault::ClockAhead => {
                        flashgate::explore::skew_host_clock(4 * TIMING.stale.as_millis() as i64)
                    }
                    Fault::ClockRight => flashgate::explore::skew_host_clock(0),
                    Fault::Snapshot => {
                        // An older snapshot stays: the replica lags further behind.
                        if snapshot.is_none() {
                            snapshot = Some(Snapshot::take(env, &world.keys).await);
                            let mut journal = world.journal.lock().unwrap();
                            journal.snapshots += 1;
                            journal.snapshot_pending = true;
                        }
                    }
                    Fault::RollBack | Fault::RollBackBucket => {
                        if let Some(taken) = snapshot.take() {
                            let all: Vec<usize> = (0..world.keys.len()).collect();
                            let buckets = match fault {
                                Fault::RollBack => all,
                                _ => vec![rng.random_range(0..world.keys.len())],
                            };
                            taken.restore(env, &world.keys, &buckets).await;
                            scheduler.trace.push(format!(
                                "      (buckets {buckets:?} back to the snapshot of {} ms ago)",
                                taken.at.elapsed().as_millis()
                            ));
                            let mut journal = world.journal.lock().unwrap();
                            journal.snapshot_pending = false;
                            journal.rollbacks += 1;
                            let era = journal.era();
                            journal.rollback_eras.push(era);
                        }
                    }
                }
                scheduler.settle().await;
            }
        }
        // A seed takes seconds; one whose processes only poll (a reconciler waiting on
        // a check that will not end) would take the rest of MAX_STEPS at their pace.
        if started.elapsed() > SEED_TIME_MAX {
            failure = Some(format!(
                "stuck: still running after {SEED_TIME_MAX:?} ({} steps)",
                scheduler.steps
            ));
            break;
        }
        if scheduler.step().await {
            last_step = std::time::Instant::now();
        } else {
            // Nothing waits at the gate: tasks are sleeping on timers.
            tokio::time::sleep(Duration::from_millis(2)).await;
            // Every timer of the product and the actors is far shorter: live processes
            // that call nothing for this long are stuck.
            if last_step.elapsed() > STUCK_AFTER {
                let stuck: Vec<u32> = processes
                    .iter()
                    .filter(|(_, p)| p.tasks.iter().any(|t| !t.is_finished()))
                    .map(|(&p, _)| p)
                    .collect();
                failure = Some(format!(
                    "stuck: processes {stuck:?} live but no call for {} s",
                    STUCK_AFTER.as_secs()
                ));
                break;
            }
        }
    }
    for process in processes.values() {
        for task in &process.tasks {
            task.abort();
        }
    }
    flashgate::explore::skew_host_clock(0);
    if failure.is_none() {
        failure = settle_and_check_money(env, &world).await.err();
    }
    if verbose {
        eprintln!(
            "seed {seed}: {} steps, {} blocked, {:.1} s{}",
            scheduler.steps,
            scheduler.blocked_calls,
            started.elapsed().as_secs_f64(),
            failure
                .as_deref()
                .map(|f| format!(": {f}"))
                .unwrap_or_default()
        );
    }
    if std::env::var_os("EXPLORE_DUMP").is_some() {
        eprintln!("{}", scheduler.trace.join("\n"));
    }
    let rollbacks = world.journal.lock().unwrap().rollbacks;
    Outcome {
        steps: scheduler.steps,
        faults,
        rollbacks,
        failure,
        trace_tail: scheduler.tail(60),
    }
}

/// A copy of every key of the SKU's buckets at one instant, between two calls: what a
/// replica that stopped replicating there, or the last RDB/AOF written there, holds.
pub(crate) struct Snapshot {
    /// Per bucket, its keys.
    buckets: Vec<Vec<KeyCopy>>,
    at: std::time::Instant,
}

struct KeyCopy {
    key: String,
    dump: Vec<u8>,
    /// Its deadline, ms by Redis's clock (0: none).
    deadline_ms: i64,
}

impl Snapshot {
    pub(crate) async fn take(env: &Env, buckets: &[SkuKeys]) -> Snapshot {
        let mut conn = env.observer.connection();
        let mut copies = Vec::new();
        for keys in buckets {
            let mut copy = Vec::new();
            for key in bucket_keys(env, keys).await {
                let (dump, deadline): (Option<Vec<u8>>, i64) = redis::pipe()
                    .cmd("DUMP")
                    .arg(&key)
                    .cmd("PEXPIRETIME")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("dump");
                if let Some(dump) = dump {
                    copy.push(KeyCopy {
                        key,
                        dump,
                        deadline_ms: deadline.max(0),
                    });
                }
            }
            copies.push(copy);
        }
        Snapshot {
            buckets: copies,
            at: std::time::Instant::now(),
        }
    }

    /// These buckets go back to the copy: keys made since are gone, keys past their
    /// deadline by now stay gone (as Redis loads an older file).
    pub(crate) async fn restore(&self, env: &Env, buckets: &[SkuKeys], which: &[usize]) {
        let mut conn = env.observer.connection();
        for &b in which {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for key in bucket_keys(env, &buckets[b]).await {
                pipe.cmd("DEL").arg(key).ignore();
            }
            for copy in &self.buckets[b] {
                // RESTORE with a deadline already past makes no key.
                pipe.cmd("RESTORE")
                    .arg(&copy.key)
                    .arg(copy.deadline_ms)
                    .arg(&copy.dump)
                    .arg("ABSTTL")
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.expect("restore");
        }
    }
}

/// The rollback fault itself (the plain run checks it in a few ms): a snapshot, then
/// writes (a counter changed, a key made, a key deleted), then the rollback puts back
/// exactly the copy, a key's deadline included.
pub async fn check_rollback_fault(env: &Env) -> Result<(), String> {
    let sku = SkuId::parse("explore-rollback-fault").unwrap();
    let keys = vec![SkuKeys::new(&sku)];
    lose(env, &keys).await;
    let mut conn = env.observer.connection();
    let k = &keys[0];
    let e = |e: redis::RedisError| e.to_string();
    let _: () = conn.hset(&k.meta, "available", 3).await.map_err(e)?;
    let _: () = conn.pset_ex(&k.used, "claim", 60_000).await.map_err(e)?;
    let snapshot = Snapshot::take(env, &keys).await;
    let _: () = conn.hset(&k.meta, "available", 2).await.map_err(e)?;
    let _: () = conn.set(&k.holds, "made since").await.map_err(e)?;
    let _: () = conn.del(&k.used).await.map_err(e)?;
    snapshot.restore(env, &keys, &[0]).await;
    let available: Option<i64> = conn.hget(&k.meta, "available").await.map_err(e)?;
    let made_since: bool = conn.exists(&k.holds).await.map_err(e)?;
    let used: Option<String> = conn.get(&k.used).await.map_err(e)?;
    let deadline_ms: i64 = conn.pttl(&k.used).await.map_err(e)?;
    lose(env, &keys).await;
    if available != Some(3) || made_since || used.as_deref() != Some("claim") {
        return Err(format!(
            "rollback left available {available:?}, a key made since: {made_since}, the deleted key: {used:?}"
        ));
    }
    if !(0 < deadline_ms && deadline_ms <= 60_000) {
        return Err(format!(
            "rollback left the key's deadline {deadline_ms} ms away"
        ));
    }
    Ok(())
}

/// Every key of one bucket (they share its hash tag).
async fn bucket_keys(env: &Env, keys: &SkuKeys) -> Vec<String> {
    let pattern = format!("{}*", keys.meta.trim_end_matches("meta"));
    redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut env.observer.connection())
        .await
        .expect("keys")
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillGateway,
    /// A gateway killed between the take of a transfer and its give, when one is there
    /// (else any gateway).
    CutTransfer,
    Stall,
    LoseSku,
    LoseBucket,
    ClockAhead,
    ClockRight,
    /// Redis copies the SKU's keys (`--rollback`)...
    Snapshot,
    /// ...and goes back to the copy: a failover to a replica that lagged, a restart from
    /// an older RDB/AOF (every bucket: one Redis holds them all)...
    RollBack,
    /// ...or only one bucket does: its primary failed over, the others did not.
    RollBackBucket,
}

impl Fault {
    /// At most one fault per step, each rare enough that the protocols make progress.
    /// The rollback's rolls are none without `--rollback`, so other runs keep their seeds.
    fn pick(rng: &mut StdRng, with_rollback: bool) -> Option<Fault> {
        let roll = rng.random_range(0..1_000);
        Some(match roll {
            35..=40 if with_rollback => Fault::Snapshot,
            41..=44 if with_rollback => Fault::RollBack,
            45..=46 if with_rollback => Fault::RollBackBucket,
            0..=5 => Fault::KillGateway,
            6..=13 => Fault::Stall,
            14..=15 => Fault::LoseSku,
            16..=18 => Fault::LoseBucket,
            19..=20 => Fault::ClockAhead,
            21..=24 => Fault::ClockRight,
            25..=34 => Fault::CutTransfer,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Worker,
    Cron,
    Finisher,
    Admin,
}

pub(crate) struct World {
    pub(crate) sku: SkuId,
    pub(crate) keys: Vec<SkuKeys>,
    pub(crate) users: Vec<String>,
    pub(crate) journal: Mutex<Journal>,
    pub(crate) variant: Variant,
    pub(crate) definition: SkuDefinition,
    pub(crate) settings: GatewaySettings,
    /// While an admin PUT runs: the larger of the stock before and after it (MySQL
    /// takes the new stock first, then the buckets theirs).
    pub(crate) put_in_flight: Mutex<Option<u64>>,
    /// Set when the services are to stop after their current pass (a pass cut short
    /// would leave a reconcile check open that the last one waits out).
    pub(crate) stop: std::sync::atomic::AtomicBool,
}

impl World {
    /// A buyer behind one gateway: reserves, pays, cancels, and now and then finishes
    /// transfers itself (as a reserve that waited does).
    async fn buyer(&self, gateway: &Gateway, mut rng: StdRng, ops: u32) {
        for _ in 0..ops {
            let roll = rng.random_range(0..100);
            let pick = |rng: &mut StdRng, journal: &Journal| {
                (!journal.reservations.is_empty()).then(|| {
                    journal.reservations[rng.random_range(0..journal.reservations.len())].clone()
                })
            };
            if roll < 55 {
                let user = self.users[rng.random_range(0..self.users.len())].clone();
                let key = format!("k{}", rng.random_range(0..3));
                let quantity = if one_in(&mut rng, 5) { 2 } else { 1 };
                // The era the call started in: a rollback or loss while the call ran
                // (between its script and its answer) may already have taken its hold.
                let era = self.journal.lock().unwrap().era();
                match gateway.reserve(&self.sku, &user, quantity, &key).await {
                    Ok((reservation, _)) => {
                        let rid = reservation.reservation_id.clone();
                        let earlier: Vec<String> = {
                            let mut journal = self.journal.lock().unwrap();
                            let span = Span {
                                started: era,
                                ended: journal.era(),
                            };
                            let seen = journal.holds.entry((user, key.clone())).or_default();
                            if seen.iter().any(|(r, _)| *r == rid) {
                                continue;
                            }
                            let seen_before: Vec<(String, Span)> = seen.clone();
                            seen.push((rid.clone(), span));
                            journal.reservations.push(rid.clone());
                            // A rollback forgets the key's claim and rebuilds nothing:
                            // the contract promises the replay after a rebuild only.
                            seen_before
                                .into_iter()
                                .filter(|(_, made)| !journal.rolled_back_since(made.started))
                                .map(|(r, _)| r)
                                .collect()
                        };
                        // A new hold for a key that made one before: only after a Redis
                        // loss, and only if MySQL did not record the earlier one with
                        // its key (then the rebuild restores the key, which replays it).
                        // Read at once, ungated: no other actor has run since the reserve.
                        if let Some(recorded) = recorded_with_key(&gateway.db, &earlier, &key).await
                        {
                            self.journal.lock().unwrap().broken.push(format!(
                                "key {key} made {rid} though MySQL records its {recorded} (invariant 3)"
                            ));
                        }
                    }
                    Err(e) => self.note_error(e),
                }
            } else if roll < 80 {
                let Some(rid) = pick(&mut rng, &self.journal.lock().unwrap()) else {
                    continue;
                };
                let payment_ref = format!("pay-{}", rng.random_range(0..2));
                let before = self.journal.lock().unwrap().snapshot_state();
                let result = gateway.confirm(&rid, &payment_ref).await;
                let mut journal = self.journal.lock().unwrap();
                let at_risk = journal.at_risk(before);
                match result {
                    Ok(_) if at_risk => journal.sold_at_risk.push((rid, payment_ref)),
                    Ok(_) => journal.sold.push((rid, payment_ref)),
                    Err(Error::RefundRequired {
                        compensation_id, ..
                    }) if at_risk => journal.compensated_at_risk.push(compensation_id),
                    Err(Error::RefundRequired {
                        compensation_id, ..
                    }) => journal.compensated.push(compensation_id),
                    Err(e) => {
                        drop(journal);
                        self.note_error(e)
                    }
                }
            } else if roll < 92 {
                let Some(rid) = pick(&mut rng, &self.journal.lock().unwrap()) else {
                    continue;
                };
                if let Err(e) = gateway.cancel(&rid, &Caller::Service).await {
                    self.note_error(e);
                }
            } else {
                self.finish(&gateway.store).await;
            }
        }
    }

    async fn finish(&self, store: &Store) {
        let result = match self.variant {
            Variant::OldFinisher => {
                store
                    .finish_transfers_reading_once(&self.keys, TIMING.stale)
                    .await
            }
            _ => store.finish_transfers(&self.keys, TIMING.stale).await,
        };
        if let Err(e) = result {
            self.note_error(e);
        }
    }

    /// The worker (sweep, flush, finish, scheduled repair), the reconcile cron, or a
    /// lone finisher.
    pub(crate) async fn service(
        &self,
        role: Role,
        store: Store,
        pool: MySqlPool,
        mut rng: StdRng,
        ops: u32,
    ) {
        let worker = Worker::new(store.clone(), pool.clone());
        for _ in 0..ops {
            if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let op = match role {
                Role::Worker => rng.random_range(0..4),
                Role::Cron => 3,
                Role::Finisher => 2,
                Role::Admin => 4,
            };
            // The worker's passes over this SKU's buckets (its passes over every SKU
            // would walk whatever earlier runs left in the test database).
            let result = match op {
                0 => self.each_bucket(|sale| worker.sweep_sku(sale)).await,
                1 => {
                    self.each_bucket(|sale| {
                        let worker = &worker;
                        async move { worker.flush_sku(&sale).await }
                    })
                    .await
                }
                2 => {
                    self.finish(&store).await;
                    Ok(())
                }
                3 => self.reconcile(&store, &pool).await,
                _ => self.put_stock(&store, &pool, &mut rng).await,
            };
            if let Err(e) = result {
                self.note_error(e);
            }
            flashgate::explore::pause().await;
        }
    }

    /// An operator's PUT of a few units more or less, as the admin endpoint runs it
    /// (retried after an error, as a client would).
    async fn put_stock(
        &self,
        store: &Store,
        pool: &MySqlPool,
        rng: &mut StdRng,
    ) -> flashgate::error::Result<()> {
        let before = mysql_stock(pool, &self.sku)
            .await
            .map_err(Error::Internal)?;
        let after = (before as i64 + rng.random_range(-3..=3i64)).max(1) as u64;
        *self.put_in_flight.lock().unwrap() = Some(before.max(after));
        let gateway = Gateway::new(store.clone(), pool.clone(), self.settings.clone());
        let definition = SkuDefinition {
            stock_total: after,
            ..self.definition.clone()
        };
        let mut result = Ok(());
        for _ in 0..3 {
            result = gateway.define_sku(&self.sku, &definition).await.map(drop);
            if !matches!(result, Err(Error::Unavailable { .. })) {
                break;
            }
        }
        *self.put_in_flight.lock().unwrap() = None;
        if std::env::var_os("EXPLORE_DUMP").is_some() {
            eprintln!("PUT stock {before} -> {after}: {result:?}");
        }
        match result {
            Err(Error::Refused(_)) => Ok(()), // stock_below_committed: nothing changed
            other => other,
        }
    }

    async fn each_bucket<F, Fut>(&self, mut visit: F) -> flashgate::error::Result<()>
    where
        F: FnMut(SkuId) -> Fut,
        Fut: std::future::Future<Output = flashgate::error::Result<u64>>,
    {
        for keys in &self.keys {
            visit(SkuId::of_tag(keys.tag()).expect("bucket tag")).await?;
        }
        Ok(())
    }

    async fn reconcile(&self, store: &Store, pool: &MySqlPool) -> flashgate::error::Result<()> {
        let old = self.variant == Variant::OldRebuild;
        flashgate::reconcile::run_skus_with(store, pool, std::slice::from_ref(&self.sku), true, old)
            .await
            .map(drop)
    }

    pub(crate) fn note_error(&self, e: Error) {
        if let Error::Internal(detail) = e {
            self.journal.lock().unwrap().internal.push(detail);
        }
    }
}

/// The gateways' settings in every world: a payment grace of 1 s (late payments happen
/// within a seed), keys kept 10 minutes.
pub(crate) fn gateway_settings() -> GatewaySettings {
    GatewaySettings {
        payment_grace: Duration::from_secs(1),
        idempotency_ttl: Duration::from_secs(600),
        released_holds_cap: 0,
        queue_polls_per_second: flashgate::limits::QUEUE_POLLS_PER_SECOND,
        id_keys: ids::IdKeys::new(None, &[], &["explore-jwt-secret-0123456789abcdef"]).unwrap(),
    }
}

pub(crate) async fn forget_sku(env: &Env, sku: &SkuId) {
    let keys: Vec<SkuKeys> = flashgate::buckets::sales(sku, 3)
        .iter()
        .chain(&flashgate::buckets::sales(sku, 2))
        .chain(&flashgate::buckets::sales(sku, 1))
        .map(SkuKeys::new)
        .collect();
    lose(env, &keys).await;
    for table in [
        "skus",
        "sales",
        "compensations",
        "reservations",
        "reconcile_audit",
        "events",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE sku = ?"
        )))
        .bind(sku.as_str())
        .execute(&env.pool)
        .await
        .expect("forget the seed's SKU");
    }
    // Its sequence starts at 1 again.
    sqlx::query("DELETE FROM event_counters WHERE name = ?")
        .bind(sku.as_str())
        .execute(&env.pool)
        .await
        .expect("forget the seed's SKU's events");
}

/// Redis loses these buckets' every key (a restart without persistence, a wipe).
pub(crate) async fn lose(env: &Env, buckets: &[SkuKeys]) {
    let mut conn = env.observer.connection();
    for keys in buckets {
        let found = bucket_keys(env, keys).await;
        if !found.is_empty() {
            let _: () = conn.del(found).await.expect("del");
        }
    }
}

/// The invariants of the contract that hold at every instant.
async fn mysql_stock(pool: &MySqlPool, sku: &SkuId) -> Result<u64, String> {
    sqlx::query_scalar::<_, u64>("SELECT stock_total FROM skus WHERE sku = ?")
        .bind(sku.as_str())
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())
}

/// The buckets' stock_total (None: lost) and the units in transit: what the trace
/// shows whenever it changes.
async fn stock_line(env: &Env, world: &World) -> String {
    let sales: Vec<SkuId> = world
        .keys
        .iter()
        .map(|k| SkuId::of_tag(k.tag()).unwrap())
        .collect();
    match env.observer.split_stock(&sales).await {
        Ok((stock, in_transit)) => format!("stock_total {stock:?} + {in_transit} in transit"),
        Err(e) => format!("stock unreadable: {e}"),
    }
}

/// The eras (Redis losses and rollbacks so far) at the start and at the end of the call
/// that made a hold: one that ran across a loss or rollback may have lost its hold's
/// claim already (Redis forgot it) or made it after the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub started: u64,
    pub ended: u64,
}

pub(crate) async fn check(env: &Env, world: &World) -> Result<(), String> {
    let put_in_flight = *world.put_in_flight.lock().unwrap();
    let stock = mysql_stock(&env.checks, &world.sku)
        .await?
        .max(put_in_flight.unwrap_or(0));
    // After a rollback the buckets may hold more than the stock until the repair
    // (checked exactly at the end, by `settle_and_check_money`): they went back to the
    // stock of the snapshot's time (a PUT since may have lowered it), a give whose take
    // the donor forgot counts its units twice (also when only one bucket went back),
    // and the repair's `overcommitted` raises a bucket's stock_total to what it holds
    // and sold.
    let rolled_back = world.journal.lock().unwrap().rollbacks > 0;
    let mut conn = env.observer.connection();
    let mut present_total = 0u64;
    let mut missing = Vec::new();
    for (b, keys) in world.keys.iter().enumerate() {
        let (available, held, sold, total): (Option<i64>, Option<i64>, Option<i64>, Option<i64>) =
            redis::cmd("HMGET")
                .arg(&keys.meta)
                .arg("available")
                .arg("held")
                .arg("sold")
                .arg("stock_total")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        match (available, held, sold, total) {
            (Some(a), Some(h), Some(s), Some(t)) => {
                if a < 0 || a + h + s != t {
                    return Err(format!(
                        "bucket {b}: available {a} + held {h} + sold {s} != stock_total {t} (invariant 1)"
                    ));
                }
                present_total += t as u64;
            }
            (None, None, None, None) => missing.push(b),
            other => return Err(format!("bucket {b}: partial counters {other:?}")),
        }
    }
    let sales: Vec<SkuId> = world
        .keys
        .iter()
        .map(|k| SkuId::of_tag(k.tag()).unwrap())
        .collect();
    let (_, in_transit) = env
        .observer
        .split_stock(&sales)
        .await
        .map_err(|e| e.to_string())?;
    // A lost bucket's sales are committed still (MySQL has them).
    let sold_per_bucket = mysql_sold_per_bucket(&env.checks, &world.sku, &sales).await?;
    let committed_missing: u64 = missing.iter().map(|&b| sold_per_bucket[b]).sum();
    let allocated = present_total + in_transit + committed_missing;
    if allocated > stock && !rolled_back {
        return Err(format!(
            "over-allocated: Σ stock_total {present_total} + in transit {in_transit} + sold in lost buckets {committed_missing} = {allocated} > stock {stock} (invariant 1; missing buckets {missing:?})"
        ));
    }
    if missing.is_empty() && put_in_flight.is_none() && present_total + in_transit != stock {
        // Less is drift the reconciler repairs; never more (above).
        let journal = world.journal.lock().unwrap();
        if journal.era() == 0 {
            return Err(format!(
                "Σ stock_total {present_total} + in transit {in_transit} != stock {stock} with no Redis loss (invariant 1)"
            ));
        }
    }
    let sold: u64 = sold_per_bucket.iter().sum();
    if sold > stock {
        return Err(format!(
            "MySQL records {sold} sold of {stock} (invariant 2)"
        ));
    }
    // The flush refuses a sale of a unit MySQL records as sold (a `cancelled`
    // compensation the flush found: db::apply_events_in_order): only a Redis rollback
    // can make Redis sell one. Without one, a refusal means Redis oversold and the
    // flush hid it.
    if !rolled_back {
        let refused: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM compensations
             WHERE sku = ? AND reason = 'cancelled' AND found_by = 'flush'",
        )
        .bind(world.sku.as_str())
        .fetch_one(&env.checks)
        .await
        .map_err(|e| e.to_string())?;
        if refused > 0 {
            return Err(format!(
                "the flush refused {refused} sale(s) of units MySQL had sold, with no Redis rollback: Redis oversold (invariant 2)"
            ));
        }
    }
    let journal = world.journal.lock().unwrap();
    for ((user, key), rids) in &journal.holds {
        // Two holds for one key with no Redis loss between them.
        for pair in rids.windows(2) {
            if pair[1].1.ended == pair[0].1.started {
                return Err(format!(
                    "key {key} of {user} made two holds: {} and {} (invariant 3)",
                    pair[0].0, pair[1].0
                ));
            }
        }
    }
    if let Some(broken) = journal.broken.first() {
        return Err(broken.clone());
    }
    if let Some(e) = journal.internal.first() {
        return Err(format!("internal error: {e}"));
    }
    Ok(())
}

/// The first of `reservations` that MySQL records as made by idempotency key `key`.
async fn recorded_with_key(pool: &MySqlPool, reservations: &[String], key: &str) -> Option<String> {
    for rid in reservations {
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT reservation_id FROM reservations WHERE reservation_id = ? AND idempotency_key = ?",
        )
        .bind(rid)
        .bind(key)
        .fetch_optional(pool)
        .await
        .expect("mysql");
        if found.is_some() {
            return Some(rid.clone());
        }
    }
    None
}

async fn mysql_sold_per_bucket(
    pool: &MySqlPool,
    sku: &SkuId,
    sales: &[SkuId],
) -> Result<Vec<u64>, String> {
    let rows: Vec<(String, u32)> =
        sqlx::query_as("SELECT reservation_id, quantity FROM sales WHERE sku = ?")
            .bind(sku.as_str())
            .fetch_all(pool)
            .await
            .map_err(|e| e.to_string())?;
    let mut sold = vec![0u64; sales.len()];
    for (rid, quantity) in rows {
        let sale = ids::sale_of_reservation(&rid).ok_or(format!("bad id {rid}"))?;
        let b = sales
            .iter()
            .position(|s| *s == sale)
            .ok_or(format!("no bucket for {rid}"))?;
        sold[b] += u64::from(quantity);
    }
    Ok(sold)
}

/// After the actors: the finisher, the sweep, the flush and the reconciler run until
/// nothing is left to do; then the SKU adds up exactly and every payment answered is a
/// sale or a compensation in MySQL.
pub(crate) async fn settle_and_check_money(env: &Env, world: &World) -> Result<(), String> {
    let store = env.observer.clone().with_timing(TIMING);
    let worker = Worker::new(store.clone(), env.pool.clone());
    tokio::time::sleep(TIMING.stale).await;
    // Each pass bounded, so that a stuck one is named.
    let bounded = |what: &'static str| move |_| format!("stuck: the {what}, over {STUCK_AFTER:?}");
    for _ in 0..3 {
        tokio::time::timeout(STUCK_AFTER, world.finish(&store))
            .await
            .map_err(bounded("finisher"))?;
        tokio::time::timeout(STUCK_AFTER, world.reconcile(&store, &env.pool))
            .await
            .map_err(bounded("reconciler"))?
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            STUCK_AFTER,
            world.each_bucket(|sale| {
                let worker = &worker;
                async move { worker.flush_sku(&sale).await }
            }),
        )
        .await
        .map_err(bounded("flush"))?
        .map_err(|e| e.to_string())?;
    }
    check(env, world).await?;
    check_events(env, world).await?;
    let stock = mysql_stock(&env.checks, &world.sku).await?;
    let sales: Vec<SkuId> = world
        .keys
        .iter()
        .map(|k| SkuId::of_tag(k.tag()).unwrap())
        .collect();
    let (totals, in_transit) = store.split_stock(&sales).await.map_err(|e| e.to_string())?;
    let total: u64 = totals.iter().flatten().sum::<u64>() + in_transit;
    if totals.iter().all(Option::is_some) {
        let rolled_back = world.journal.lock().unwrap().rollbacks > 0;
        // After a rollback Redis may count as sold units MySQL does not record as sales
        // (a sale the flush refused because MySQL had sold its units; a rebuild that
        // counted confirmations of its outbox the flush then did not make sales): they
        // are never resold (`sold_ahead_of_mysql` is reported, not repaired), and a
        // repair that raised a bucket's stock_total for a sale Redis forgot
        // (`overcommitted`) leaves Σ above the stock by at most those units; and the
        // units on sale, held or sold in MySQL fall short of the stock by at most those
        // units. What may never be: Σ below the stock, units lost beyond those, or more
        // units on sale than MySQL has left (an oversell Redis could still make).
        let mut counted = (0u64, 0u64, 0u64); // available, held, sold
        let mut per_bucket = Vec::new();
        let mut conn = env.observer.connection();
        for keys in &world.keys {
            let (available, held, sold): (Option<u64>, Option<u64>, Option<u64>) =
                redis::cmd("HMGET")
                    .arg(&keys.meta)
                    .arg("available")
                    .arg("held")
                    .arg("sold")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
            per_bucket.push((available, held, sold));
            counted.0 += available.unwrap_or(0);
            counted.1 += held.unwrap_or(0);
            counted.2 += sold.unwrap_or(0);
        }
        let (available, held, redis_sold) = counted;
        let mysql_sold_per_bucket = mysql_sold_per_bucket(&env.checks, &world.sku, &sales).await?;
        let mysql_sold: u64 = mysql_sold_per_bucket.iter().sum();
        // Per bucket: one bucket ahead does not cancel another behind.
        let sold_ahead: u64 = per_bucket
            .iter()
            .zip(&mysql_sold_per_bucket)
            .map(|((_, _, sold), mysql)| sold.unwrap_or(0).saturating_sub(*mysql))
            .sum();
        let accounted = available + in_transit + held + mysql_sold;
        let lost = stock.saturating_sub(accounted);
        let total_explained =
            total == stock || (rolled_back && total > stock && total - stock <= sold_ahead);
        let lost_explained = lost == 0 || (rolled_back && lost <= sold_ahead);
        if !total_explained || !lost_explained || accounted > stock {
            return Err(format!(
                "after repair: Σ stock_total {totals:?} + in transit {in_transit} (stock {stock}); on sale, held or sold in MySQL {accounted} (Redis: available {available}, held {held}, sold {redis_sold}; MySQL sold {mysql_sold}; per bucket (available, held, sold) {per_bucket:?}, MySQL sold {mysql_sold_per_bucket:?})"
            ));
        }
    }
    // One payment, one outcome, whatever Redis lost: never both a sale and a refund.
    let both: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.reservation_id, s.payment_ref FROM sales s JOIN compensations c
         ON c.reservation_id = s.reservation_id AND c.payment_ref = s.payment_ref
         WHERE s.sku = ? AND NOT (c.status = 'resolved' AND c.note <=> ?)",
    )
    .bind(world.sku.as_str())
    .bind(flashgate::db::NO_REFUND_DUE)
    .fetch_all(&env.checks)
    .await
    .map_err(|e| e.to_string())?;
    if let Some((rid, payment_ref)) = both.first() {
        return Err(format!(
            "payment {payment_ref} for {rid} is both a sale and a compensation in MySQL (invariant 5)"
        ));
    }
    // Answers a rollback may have taken back before they were flushed are not
    // promised without `WAIT` (docs/design.md, "Durability"); every other one is.
    let (losses, sold, compensated) = {
        let journal = world.journal.lock().unwrap();
        (
            journal.losses,
            journal.sold.clone(),
            journal.compensated.clone(),
        )
    };
    if losses > 0 {
        // A sale Redis lost before its flush is lost with it (no AOF here): the money
        // check covers runs without a Redis loss.
        return Ok(());
    }
    let recorded: HashSet<(String, String)> = sqlx::query_as::<_, (String, String)>(
        "SELECT reservation_id, payment_ref FROM sales WHERE sku = ?
         UNION SELECT reservation_id, payment_ref FROM compensations WHERE sku = ?",
    )
    .bind(world.sku.as_str())
    .bind(world.sku.as_str())
    .fetch_all(&env.checks)
    .await
    .map_err(|e| e.to_string())?
    .into_iter()
    .collect();
    for (rid, payment_ref) in &sold {
        if !recorded.contains(&(rid.clone(), payment_ref.clone())) {
            return Err(format!(
                "payment {payment_ref} for {rid} was answered 200 but MySQL has neither a sale nor a compensation (invariant 5)"
            ));
        }
    }
    let compensations: HashSet<String> =
        sqlx::query_scalar::<_, String>("SELECT id FROM compensations WHERE sku = ?")
            .bind(world.sku.as_str())
            .fetch_all(&env.checks)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
    for id in &compensated {
        if !compensations.contains(id) {
            return Err(format!(
                "compensation {id} answered in a 409 is not in MySQL (invariant 5)"
            ));
        }
    }
    Ok(())
}

/// The SKU's events (src/events.rs), once everything settled: numbered 1, 2, 3, … with
/// no gap or repeat, one `reservation.confirmed` per sale and one
/// `compensation.created` per compensation MySQL records, whatever crashed, stalled or
/// was flushed twice on the way.
async fn check_events(env: &Env, world: &World) -> Result<(), String> {
    let sku = world.sku.as_str();
    let rows: Vec<(u64, String)> =
        sqlx::query_as("SELECT sequence, type FROM events WHERE sku = ? ORDER BY sequence")
            .bind(sku)
            .fetch_all(&env.checks)
            .await
            .map_err(|e| e.to_string())?;
    for (i, (sequence, kind)) in rows.iter().enumerate() {
        if *sequence != i as u64 + 1 {
            return Err(format!(
                "event {kind} has sequence {sequence}, expected {} (a gap or a repeat)",
                i + 1
            ));
        }
    }
    let count = |kind: &str| rows.iter().filter(|(_, k)| k == kind).count() as i64;
    let (sales, compensations): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM sales WHERE sku = ?),
                (SELECT COUNT(*) FROM compensations WHERE sku = ?)",
    )
    .bind(sku)
    .bind(sku)
    .fetch_one(&env.checks)
    .await
    .map_err(|e| e.to_string())?;
    if count("reservation.confirmed") != sales {
        return Err(format!(
            "{} reservation.confirmed events for {sales} sales",
            count("reservation.confirmed")
        ));
    }
    if count("compensation.created") != compensations {
        return Err(format!(
            "{} compensation.created events for {compensations} compensations",
            count("compensation.created")
        ));
    }
    Ok(())
}
