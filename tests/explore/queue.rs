//! The waiting room's world (`--queue`): one unsplit SKU with a waiting room (lua/queue.lua,
//! src/queue.rs), and the processes around it. Users join (some before the start when
//! the seed has a pre-start phase), poll their tickets (every poll admits whom the stock
//! allows), reserve with their admission tokens (a replay of the key, another key), pay,
//! cancel, let holds expire, or walk away (their admissions lapse after a second of
//! Redis time); a watcher looks at the queue as the SSE fan-out does; the worker sweeps
//! and flushes, the cron reconciles; gateways die, also between an admission and its
//! reserve. After every step the stock invariants (world::check) and the queue's
//! (`check_queue`) are checked.

use crate::schedule::{one_in, seed_rng, Scheduler, Turnstile};
use crate::world::{self, Env, Journal, Outcome, Role, World, TIMING};
use flashgate::auth::Caller;
use flashgate::error::Error;
use flashgate::gateway::Gateway;
use flashgate::ids::SkuId;
use flashgate::keys::SkuKeys;
use flashgate::queue::TicketState;
use flashgate::reservation::{Refusal, SkuDefinition, WaitingRoom};
use flashgate::store::Store;
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// An admission lapses after this long unused: the shortest the contract allows, so
/// that lapses happen within a seed.
const ADMISSION_SECONDS: u32 = 1;
/// Steps in which faults may strike.
const FAULT_STEPS: u64 = 400;
/// A seed's steps at most.
const MAX_STEPS: u64 = 2_000;
/// Polls of a waiting ticket before its user gives up (walks away).
const MAX_POLLS: u32 = 60;
/// Buyer tasks per gateway: each serves users one after another.
const BUYERS: u64 = 3;

/// The queue world's shared state: the stock world (its SKU, journal, worker and cron)
/// and what the queue's actors were answered.
struct Queue {
    world: Arc<World>,
    /// Users no buyer task took yet (a killed gateway's users may come back).
    pending: Mutex<Vec<String>>,
    /// Process -> the users its buyer tasks serve now.
    active: Mutex<HashMap<u32, Vec<String>>>,
    tickets: Mutex<Tickets>,
    /// Odd while an operator's pause may be in force: bumped before the pause and after
    /// the resume (a pause moves admission deadlines on, lib.lua thaw_admissions).
    pauses: AtomicU64,
    /// An operator changes the stock: less stock than the unused admissions revokes the
    /// newest of them (load_sku.lua), so an admitted user may be refused before its
    /// deadline.
    stock_changes: bool,
    /// Units were put on sale outside bucket 0 (`Fault::StrayUnits`): until the repair
    /// moves them home (reconcile.rs `bring_units_home`), another bucket may have
    /// stock, never a hold or a sale.
    strays: AtomicBool,
}

/// What the users' tickets said.
#[derive(Default)]
struct Tickets {
    /// User -> its position, from the first ticket that showed one.
    positions: HashMap<String, u64>,
    /// Users whose first join was answered before the start (no position), and those
    /// answered with one: the first all rank before the second.
    before_start: HashSet<String>,
    after_start: HashSet<String>,
    /// Users whose ticket said admitted (or used) once.
    admitted: HashSet<String>,
    /// What an actor saw break at the instant it was answered.
    broken: Vec<String>,
}

/// What the checker remembers from one step to the next.
#[derive(Default)]
struct Seen {
    served: u64,
    line: u64,
    /// User -> rank, once the line is ordered (the start): it never moves.
    ranks: HashMap<String, u64>,
    /// Hold tail -> user, every hold ever seen in Redis.
    holds: HashMap<String, String>,
}

pub async fn run_seed(
    env: &Env,
    turnstile: &Turnstile,
    seed: u64,
    with_admin: bool,
    verbose: bool,
) -> Outcome {
    let started = std::time::Instant::now();
    let mut rng = seed_rng(seed, 0);
    let mut scheduler = Scheduler::new(turnstile, seed_rng(seed, 1));
    let stock = rng.random_range(3..=8u64);
    let users = stock as usize + rng.random_range(3..=8usize);
    // Half the seeds split the SKU: its buyers and stock stay in bucket 0
    // (buckets::homes), the other buckets must hold nothing.
    let buckets = if one_in(&mut rng, 2) { 2 } else { 1 };
    let sku = SkuId::parse(&format!("explore-q-{seed}")).unwrap();
    world::forget_sku(env, &sku).await;
    let redis_now = redis_now_ms(env).await;
    // Half the seeds open with a pre-queue: its users are placed in a drawn order.
    let starts_at_ms = one_in(&mut rng, 2).then(|| redis_now + rng.random_range(150..500));
    let waiting_room = WaitingRoom {
        admission_seconds: ADMISSION_SECONDS,
        // Mostly as fast as the stock allows (the check that no unit waits unoffered
        // holds only then); now and then a rate.
        admit_per_second: if one_in(&mut rng, 4) { 3 } else { 0 },
        prequeue_shuffle: !one_in(&mut rng, 4),
    };
    let definition = SkuDefinition {
        stock_total: stock,
        per_user_limit: 2,
        hold_seconds: 1,
        starts_at_ms,
        ends_at_ms: None,
        buckets,
        paused: false,
        waiting_room: Some(waiting_room),
    };
    let settings = world::gateway_settings();
    flashgate::explore::skew_host_clock(0);
    let admin = Gateway::new(env.observer.clone(), env.pool.clone(), settings.clone());
    admin
        .define_sku(&sku, &definition)
        .await
        .expect("define the SKU");
    let names: Vec<String> = (0..users).map(|u| format!("q{u}")).collect();
    let world = Arc::new(World {
        sku: sku.clone(),
        keys: flashgate::buckets::sales(&sku, buckets)
            .iter()
            .map(SkuKeys::new)
            .collect(),
        users: names.clone(),
        journal: Mutex::new(Journal::default()),
        variant: world::Variant::Current,
        definition: definition.clone(),
        settings: settings.clone(),
        put_in_flight: Mutex::new(None),
        stop: Default::default(),
    });
    let queue = Arc::new(Queue {
        world: world.clone(),
        pending: Mutex::new(names.into_iter().rev().collect()),
        active: Mutex::new(HashMap::new()),
        tickets: Mutex::new(Tickets::default()),
        pauses: AtomicU64::new(0),
        stock_changes: with_admin,
        strays: AtomicBool::new(false),
    });

    // Buyer tasks by process (gateways), and the services' tasks.
    let mut buyers: HashMap<u32, Vec<JoinHandle<()>>> = HashMap::new();
    let mut services: Vec<JoinHandle<()>> = Vec::new();
    let mut next_process = 1u32;
    let mut gateways: Vec<u32> = Vec::new();
    let spawn_gateway = |p: u32, rng: &mut StdRng| -> Vec<JoinHandle<()>> {
        (0..BUYERS)
            .map(|b| {
                let (queue, redis_url, pool, settings) = (
                    queue.clone(),
                    env.redis_url.clone(),
                    env.pool.clone(),
                    settings.clone(),
                );
                let actor_rng = seed_rng(rng.random(), u64::from(p) * 10 + b);
                tokio::spawn(flashgate::explore::as_process(p, async move {
                    let store = Store::new(world::connect_redis(&redis_url).await);
                    let gateway = Gateway::new(store, pool, settings);
                    queue.buyer(p, &gateway, actor_rng).await;
                }))
            })
            .collect()
    };
    for _ in 0..2 {
        buyers.insert(next_process, spawn_gateway(next_process, &mut rng));
        gateways.push(next_process);
        next_process += 1;
    }
    // The watcher of one gateway (what its SSE streams read), the worker, the cron.
    {
        let p = next_process;
        next_process += 1;
        let (queue, redis_url, pool, settings) = (
            queue.clone(),
            env.redis_url.clone(),
            env.pool.clone(),
            settings.clone(),
        );
        let actor_rng = seed_rng(rng.random(), u64::from(p) * 10);
        services.push(tokio::spawn(flashgate::explore::as_process(
            p,
            async move {
                let store = Store::new(world::connect_redis(&redis_url).await);
                let gateway = Gateway::new(store, pool, settings);
                queue.watcher(&gateway, actor_rng).await;
            },
        )));
    }
    let roles = [Role::Worker, Role::Cron, Role::Admin];
    for role in roles.into_iter().take(if with_admin { 3 } else { 2 }) {
        let p = next_process;
        next_process += 1;
        let (world, redis_url, pool) = (world.clone(), env.redis_url.clone(), env.pool.clone());
        let actor_rng = seed_rng(rng.random(), u64::from(p) * 10);
        services.push(tokio::spawn(flashgate::explore::as_process(
            p,
            async move {
                let store = Store::new(world::connect_redis(&redis_url).await).with_timing(TIMING);
                // They run until the buyers are done (then they are stopped); an
                // operator changes the stock a few times.
                let ops = if matches!(role, Role::Admin) {
                    4
                } else {
                    10_000
                };
                world.service(role, store, pool, actor_rng, ops).await;
            },
        )));
    }

    if one_in(&mut rng, 3) {
        // An operator pauses the sale and resumes it (admissions stand still meanwhile).
        let p = next_process;
        next_process += 1;
        let (queue, redis_url, pool, settings) = (
            queue.clone(),
            env.redis_url.clone(),
            env.pool.clone(),
            settings.clone(),
        );
        let actor_rng = seed_rng(rng.random(), u64::from(p) * 10);
        services.push(tokio::spawn(flashgate::explore::as_process(
            p,
            async move {
                let store = Store::new(world::connect_redis(&redis_url).await);
                let gateway = Gateway::new(store, pool, settings);
                queue.pauser(&gateway, actor_rng).await;
            },
        )));
    }
    let queue_script = flashgate::store::SCRIPTS.queue.name().to_owned();
    let reserve_script = flashgate::store::SCRIPTS.reserve.name().to_owned();
    let mut seen = Seen::default();
    let mut faults = 0u64;
    let mut failure = None;
    loop {
        scheduler.settle().await;
        // Right after a queue call: when it was let through (it ran after that).
        let after_queue_call = scheduler
            .last_ran
            .as_deref()
            .is_some_and(|label| label.contains(&queue_script))
            .then_some(scheduler.last_granted_ms);
        let checked = match world::check(env, &world).await {
            Ok(()) => check_queue(env, &queue, &mut seen, after_queue_call).await,
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            failure = Some(e);
            break;
        }
        let buying = buyers.values().flatten().any(|t| !t.is_finished());
        if !buying || scheduler.steps >= MAX_STEPS {
            // The buyers are done (or out of steps): the services finish their pass.
            for task in buyers.values().flatten() {
                task.abort();
            }
            world.stop.store(true, Ordering::Relaxed);
            if services.iter().all(|t| t.is_finished()) || scheduler.steps >= MAX_STEPS * 2 {
                break;
            }
        }
        // One roll per step, not per look (the looks between two steps are as many as
        // real time lets the scheduler find nothing to run).
        if scheduler.steps < FAULT_STEPS && scheduler.first_look() {
            if let Some(fault) = Fault::pick(&mut rng) {
                faults += 1;
                scheduler.trace.push(format!(
                    "      FAULT {fault:?} (after step {})",
                    scheduler.steps
                ));
                match fault {
                    Fault::KillGateway | Fault::KillMidAdmission => {
                        // Mid-admission: a gateway about to admit (its queue call
                        // waits) or admitted and about to reserve.
                        let mid = scheduler
                            .waiting_on(&queue_script)
                            .or_else(|| scheduler.waiting_on(&reserve_script))
                            .filter(|p| gateways.contains(p));
                        let victim = match (fault, mid) {
                            (Fault::KillMidAdmission, Some(p)) => p,
                            _ => gateways[rng.random_range(0..gateways.len())],
                        };
                        gateways.retain(|&p| p != victim);
                        for task in &buyers[&victim] {
                            task.abort();
                        }
                        scheduler.kill(victim);
                        // Some of its users come back through another gateway.
                        let orphans = queue.active.lock().unwrap().remove(&victim);
                        for user in orphans.unwrap_or_default() {
                            if one_in(&mut rng, 2) {
                                queue.pending.lock().unwrap().push(user);
                            }
                        }
                        buyers.insert(next_process, spawn_gateway(next_process, &mut rng));
                        gateways.push(next_process);
                        next_process += 1;
                    }
                    Fault::StrayUnits => {
                        if let Err(e) = put_units_astray(env, &queue, &mut rng).await {
                            failure = Some(e);
                            break;
                        }
                    }
                    Fault::Stall => {
                        let waiting = scheduler.waiting_processes();
                        if !waiting.is_empty() {
                            let p = waiting[rng.random_range(0..waiting.len())];
                            scheduler.stall(p, rng.random_range(20..80));
                            tokio::time::sleep(TIMING.stale + Duration::from_millis(10)).await;
                        }
                    }
                }
                scheduler.settle().await;
            }
        }
        if !scheduler.step().await {
            // Nothing waits at the gate: tasks are sleeping on timers.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for task in buyers.values().flatten().chain(&services) {
        task.abort();
    }
    if failure.is_none() {
        failure = world::settle_and_check_money(env, &world).await.err();
    }
    if failure.is_none() {
        // The repair has moved every stray unit home by now.
        queue.strays.store(false, Ordering::Relaxed);
        failure = check_queue(env, &queue, &mut seen, None).await.err();
    }
    if verbose {
        let (sold, compensated) = {
            let journal = world.journal.lock().unwrap();
            (journal.sold.len(), journal.compensated.len())
        };
        eprintln!(
            "queue seed {seed}: stock {stock}, {users} users{}, served {} of {}, {} holds, {sold} paid, {compensated} refunds, {} pauses; {} steps, {} blocked, {:.1} s{}",
            if starts_at_ms.is_some() { " (pre-queue)" } else { "" },
            seen.served,
            seen.line,
            seen.holds.len(),
            queue.pauses.load(Ordering::Relaxed) / 2,
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
    Outcome {
        steps: scheduler.steps,
        faults,
        rollbacks: 0,
        failure,
        trace_tail: scheduler.tail(60),
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillGateway,
    /// A gateway killed while its queue call or its reserve waits (else any gateway).
    KillMidAdmission,
    Stall,
    /// Units of bucket 0 not spoken for put on sale in bucket 1 of a split SKU (as a
    /// gateway older than the waiting room's layout could), Σ kept.
    StrayUnits,
}

impl Fault {
    fn pick(rng: &mut StdRng) -> Option<Fault> {
        Some(match rng.random_range(0..1_000) {
            0..=2 => Fault::KillGateway,
            3..=10 => Fault::Stall,
            11..=16 => Fault::KillMidAdmission,
            17..=20 => Fault::StrayUnits,
            _ => return None,
        })
    }
}

impl Queue {
    /// A buyer task behind gateway `p`: serves pending users one after another.
    async fn buyer(&self, p: u32, gateway: &Gateway, mut rng: StdRng) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        loop {
            let Some(user) = self.pending.lock().unwrap().pop() else {
                return;
            };
            self.active
                .lock()
                .unwrap()
                .entry(p)
                .or_default()
                .push(user.clone());
            self.user(gateway, &user, &mut rng).await;
            if let Some(users) = self.active.lock().unwrap().get_mut(&p) {
                users.retain(|u| *u != user);
            }
        }
    }

    /// One user: joins, polls until admitted (or gives up), reserves with the token,
    /// then pays, cancels or lets the hold expire.
    async fn user(&self, gateway: &Gateway, user: &str, rng: &mut StdRng) {
        let sku = &self.world.sku;
        let mut ticket = match gateway.queue_join(sku, user).await {
            Ok(ticket) => ticket,
            Err(e) => {
                self.fate(user, format!("join: {e}"));
                return self.world.note_error(e);
            }
        };
        self.saw(user, &ticket, true);
        let gives_up_after = if one_in(rng, 5) {
            rng.random_range(0..10)
        } else {
            MAX_POLLS
        };
        let mut polls = 0;
        while ticket.state == TicketState::Waiting {
            if polls >= gives_up_after {
                // Walks away; if admitted later, the admission lapses.
                return self.fate(user, format!("walked away after {polls} polls"));
            }
            polls += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..100))).await;
            ticket = match gateway.queue_ticket(sku, user).await {
                Ok(ticket) => ticket,
                Err(e) => {
                    self.fate(user, format!("poll: {e}"));
                    return self.world.note_error(e);
                }
            };
            self.saw(user, &ticket, false);
        }
        let pauses = self.pauses.load(Ordering::Relaxed);
        let (Some(token), Some(until)) = (ticket.admission_token.clone(), ticket.admitted_until_ms)
        else {
            return self.fate(
                user,
                format!("{:?} (lapsed {})", ticket.state, ticket.lapsed),
            );
        };
        if one_in(rng, 6) {
            // Admitted, never reserves: the admission lapses.
            return self.fate(user, "admitted, walked away".into());
        }
        if one_in(rng, 8) {
            // Reserves too late: the admission has lapsed.
            tokio::time::sleep(Duration::from_millis(
                u64::from(ADMISSION_SECONDS) * 1000 + 50,
            ))
            .await;
        }
        let quantity = if one_in(rng, 6) { 2 } else { 1 };
        // Redis runs the reserve between these two instants (its clock is this host's:
        // no skew in this world).
        let sent_at = flashgate::explore::host_clock_ms();
        // k0 first: a user coming back through another gateway replays it.
        let reserved = gateway
            .reserve_admitted(sku, user, quantity, "k0", &token)
            .await;
        let answered_at = flashgate::explore::host_clock_ms();
        let rid = match reserved {
            Ok((reservation, replayed)) => {
                self.record_hold(user, "k0", &reservation.reservation_id);
                // (A pause since the ticket moved its deadline on.)
                let unpaused =
                    pauses.is_multiple_of(2) && self.pauses.load(Ordering::Relaxed) == pauses;
                if !replayed && sent_at > until && unpaused {
                    return self.broke(format!(
                        "{user}'s admission, lapsed at {until}, made {} at {sent_at} or later",
                        reservation.reservation_id
                    ));
                }
                reservation.reservation_id
            }
            Err(Error::Refused(Refusal::SoldOut))
                if quantity == 1 && answered_at < until && !self.stock_changes =>
            {
                // Its admission holds a unit for it until admitted_until.
                return self.broke(format!(
                    "{user}, admitted until {until}, was answered sold_out for one unit (an admission keeps one unit for its user)"
                ));
            }
            Err(Error::Refused(Refusal::AdmissionRequired))
                if answered_at < until && !self.stock_changes =>
            {
                return self.broke(format!(
                    "{user}, admitted until {until}, was answered admission_required at {answered_at}"
                ));
            }
            Err(e) => {
                self.fate(
                    user,
                    format!(
                        "reserve of {quantity}: {e} ({} ms before its deadline)",
                        until - answered_at
                    ),
                );
                return self.world.note_error(e);
            }
        };
        self.fate(user, "held".into());
        if one_in(rng, 3) {
            // The same key again: the same hold.
            match gateway
                .reserve_admitted(sku, user, quantity, "k0", &token)
                .await
            {
                Ok((reservation, _)) if reservation.reservation_id == rid => {}
                Ok((reservation, _)) => {
                    self.record_hold(user, "k0", &reservation.reservation_id);
                    return self.broke(format!(
                        "{user}'s replay of k0 made {} besides {rid}",
                        reservation.reservation_id
                    ));
                }
                // Past the gateway's slack the token is refused unread.
                Err(Error::Refused(Refusal::AdmissionRequired))
                    if flashgate::explore::host_clock_ms() > until + 4_000 => {}
                Err(e) => return self.broke(format!("{user}'s replay of k0 answered {e}")),
            }
        }
        if one_in(rng, 3) {
            // Another key with the spent token: admission_used (or, once the token is
            // past the gateway's slack, refused unread).
            match gateway.reserve_admitted(sku, user, 1, "k1", &token).await {
                Err(Error::Refused(Refusal::AdmissionUsed)) => {}
                // An operator's pause refuses every new hold first.
                Err(Error::Refused(Refusal::Paused)) => {}
                Err(Error::Refused(Refusal::AdmissionRequired))
                    if flashgate::explore::host_clock_ms() > until + 4_000 => {}
                Ok((reservation, _)) => {
                    self.record_hold(user, "k1", &reservation.reservation_id);
                    return self.broke(format!(
                        "{user}'s spent admission made {} under another key (besides {rid})",
                        reservation.reservation_id
                    ));
                }
                Err(e) => {
                    return self.broke(format!(
                    "{user}'s spent admission under another key answered {e}, not admission_used"
                ))
                }
            }
        }
        match rng.random_range(0..10) {
            0..=3 => {
                let payment_ref = format!("pay-{user}");
                if one_in(rng, 4) {
                    // Pays after the hold expired: a compensation.
                    tokio::time::sleep(Duration::from_millis(1_100)).await;
                }
                if let Err(e) = gateway.payment_pending(&rid, &payment_ref).await {
                    if !matches!(e, Error::Refused(_)) {
                        return self.world.note_error(e);
                    }
                }
                match gateway.confirm(&rid, &payment_ref).await {
                    Ok(_) => self
                        .world
                        .journal
                        .lock()
                        .unwrap()
                        .sold
                        .push((rid, payment_ref)),
                    Err(Error::RefundRequired {
                        compensation_id, ..
                    }) => self
                        .world
                        .journal
                        .lock()
                        .unwrap()
                        .compensated
                        .push(compensation_id),
                    Err(e) => self.world.note_error(e),
                }
            }
            4..=6 => {
                let caller = if one_in(rng, 2) {
                    Caller::Service
                } else {
                    Caller::User(user.to_owned())
                };
                if let Err(e) = gateway.cancel(&rid, &caller).await {
                    self.world.note_error(e);
                }
            }
            _ => {} // the hold expires; the sweep (or a reserve) returns its units
        }
    }

    /// The per-SKU watcher of a gateway's streams: looks at the queue (which admits)
    /// and follows `served`.
    async fn watcher(&self, gateway: &Gateway, mut rng: StdRng) {
        let mut served = 0u64;
        while !self.world.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
            match gateway.queue_watch(&self.world.sku).await {
                Ok(watch) => {
                    if watch.served < served {
                        self.broke(format!(
                            "the watcher saw served go back from {served} to {}",
                            watch.served
                        ));
                    }
                    served = watch.served;
                }
                Err(e) => self.world.note_error(e),
            }
        }
    }

    /// An operator who pauses the sale for a while, once or twice, and always resumes it.
    async fn pauser(&self, gateway: &Gateway, mut rng: StdRng) {
        for _ in 0..rng.random_range(1..=2) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
            if self.world.stop.load(Ordering::Relaxed) {
                return;
            }
            self.pauses.fetch_add(1, Ordering::Relaxed);
            let paused = gateway.set_paused(&self.world.sku, true).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_500))).await;
            // Resumed whatever the pause answered (retried, as an operator would).
            for _ in 0..3 {
                match gateway.set_paused(&self.world.sku, false).await {
                    Err(Error::Unavailable { .. }) => continue,
                    Err(e) => self.world.note_error(e),
                    Ok(_) => {}
                }
                break;
            }
            self.pauses.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = paused {
                self.world.note_error(e);
            }
        }
    }

    /// A user's ticket: one position for good, never waiting again once admitted.
    fn saw(&self, user: &str, ticket: &flashgate::queue::Ticket, join: bool) {
        let mut tickets = self.tickets.lock().unwrap();
        let classified = tickets.before_start.contains(user) || tickets.after_start.contains(user);
        if join && !classified {
            // Its first join: before the start (no position yet) or after.
            match ticket.position {
                None => tickets.before_start.insert(user.to_owned()),
                Some(_) => tickets.after_start.insert(user.to_owned()),
            };
        }
        if let Some(position) = ticket.position {
            let was = *tickets.positions.entry(user.to_owned()).or_insert(position);
            if was != position {
                tickets
                    .broken
                    .push(format!("{user}'s position moved from {was} to {position}"));
            }
        }
        match ticket.state {
            TicketState::Admitted => {
                tickets.admitted.insert(user.to_owned());
            }
            TicketState::Waiting if tickets.admitted.contains(user) => {
                tickets.broken.push(format!(
                    "{user}'s ticket says waiting after it was admitted"
                ));
            }
            _ => {}
        }
    }

    fn record_hold(&self, user: &str, key: &str, rid: &str) {
        let mut journal = self.world.journal.lock().unwrap();
        let era = journal.era();
        let seen = journal
            .holds
            .entry((user.to_owned(), key.to_owned()))
            .or_default();
        if !seen.iter().any(|(r, _)| r == rid) {
            seen.push((
                rid.to_owned(),
                crate::world::Span {
                    started: era,
                    ended: era,
                },
            ));
            journal.reservations.push(rid.to_owned());
        }
    }

    /// How a user's visit ended (printed with EXPLORE_DUMP).
    fn fate(&self, user: &str, how: String) {
        if std::env::var_os("EXPLORE_DUMP").is_some() {
            eprintln!("user {user}: {how}");
        }
    }

    fn broke(&self, what: String) {
        self.tickets.lock().unwrap().broken.push(what);
    }
}

async fn redis_now_ms(env: &Env) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut env.observer.connection())
        .await
        .expect("redis TIME");
    secs * 1000 + micros / 1000
}

/// Moves 1 to 3 of bucket 0's units not spoken for (available less every admission in
/// q:admits, lapsed or not) to bucket 1, atomically, as an older gateway's transfer
/// would; nothing on an unsplit SKU. The actors wait at their gates meanwhile.
async fn put_units_astray(env: &Env, queue: &Queue, rng: &mut StdRng) -> Result<(), String> {
    let keys = &queue.world.keys;
    if keys.len() < 2 {
        return Ok(());
    }
    let mut conn = env.observer.connection();
    let (available, admits): (Option<u64>, u64) = redis::pipe()
        .atomic()
        .hget(&keys[0].meta, "available")
        .zcard(keys[0].queue_admits())
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("stray look: {e}"))?;
    let free = available.unwrap_or(0).saturating_sub(admits);
    let units = free.min(rng.random_range(1..=3)) as i64;
    if units == 0 {
        return Ok(());
    }
    // `moves` grows on both, as a transfer's take and give make it (lib.lua): a reading
    // of the buckets (Store::split_stock_still) sees that units moved meanwhile.
    let _: () = redis::pipe()
        .atomic()
        .hincr(&keys[0].meta, "stock_total", -units)
        .hincr(&keys[0].meta, "available", -units)
        .hincr(&keys[0].meta, "moves", 1)
        .hincr(&keys[1].meta, "stock_total", units)
        .hincr(&keys[1].meta, "available", units)
        .hincr(&keys[1].meta, "moves", 1)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("stray move: {e}"))?;
    queue.strays.store(true, Ordering::Relaxed);
    Ok(())
}

/// The waiting room's invariants, read from Redis in one atomic look:
/// - unused admissions (admitted_until after Redis's now) <= available;
/// - one admission, one hold: no user has two holds, every user with a hold is in
///   q:used, and every user in q:used has (had) a hold;
/// - `served` <= the line's length, and neither ever goes back; once the line is
///   ordered (the start) no user's rank moves;
/// - admissions in rank order: every admitted or used user ranks below `served`;
/// - right after a queue call (`after_queue_call`: when it was let through): no
///   admission lapsed by then is left in q:admits, and with no rate set and the sale
///   open no unit is left unoffered while someone waits (available - unused = 0, or
///   nobody waits);
/// - what the actors were answered (`Tickets::broken`), no two users told one
///   position, and the pre-queue placed before every later join.
async fn check_queue(
    env: &Env,
    queue: &Queue,
    seen: &mut Seen,
    after_queue_call: Option<i64>,
) -> Result<(), String> {
    let keys = &queue.world.keys[0];
    // A split SKU's other buckets hold nothing: no stock, no hold, no sale.
    for other in &queue.world.keys[1..] {
        let counters: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&other.meta)
            .arg(&["stock_total", "available", "held", "sold"])
            .query_async(&mut env.observer.connection())
            .await
            .map_err(|e| format!("bucket look: {e}"))?;
        let strays_only = queue.strays.load(Ordering::Relaxed)
            && counters[0] == counters[1]
            && counters[2..]
                .iter()
                .all(|v| v.as_deref().is_none_or(|v| v == "0"));
        if !strays_only && counters.iter().flatten().any(|v| v != "0") {
            return Err(format!(
                "bucket {} of a waiting room's SKU holds [stock_total, available, held, sold] = {counters:?}, not nothing",
                other.meta
            ));
        }
    }
    type Look = (
        (i64, i64),
        Vec<Option<String>>,
        Vec<Option<String>>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
        HashMap<String, String>,
    );
    let (time, meta, state, line, admits, used, holds): Look = redis::pipe()
        .atomic()
        .cmd("TIME")
        .cmd("HMGET")
        .arg(&keys.meta)
        .arg(&[
            "available",
            "sold",
            "stock_total",
            "starts_at",
            "wr_rate",
            "paused",
            "retired",
            "ends_at",
        ])
        .cmd("HMGET")
        .arg(keys.queue_state())
        .arg(&["served", "started"])
        .cmd("ZRANGE")
        .arg(keys.queue_line())
        .arg(0)
        .arg(-1)
        .cmd("ZRANGE")
        .arg(keys.queue_admits())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("HKEYS")
        .arg(keys.queue_used())
        .cmd("HGETALL")
        .arg(&keys.holds)
        .query_async(&mut env.observer.connection())
        .await
        .map_err(|e| format!("queue look: {e}"))?;
    let now = time.0 * 1000 + time.1 / 1000;
    let number = |i: usize| -> i64 { meta[i].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0) };
    let (available, sold, stock_total) = (number(0), number(1), number(2));
    let paused = meta[5].as_deref() == Some("1");
    let rate = number(4);
    let admits: Vec<(String, i64)> = admits
        .chunks(2)
        .map(|pair| {
            (
                pair[0].clone(),
                pair[1].parse::<f64>().unwrap_or(0.0) as i64,
            )
        })
        .collect();
    let unused = admits.iter().filter(|(_, until)| *until > now).count() as i64;
    if unused > available {
        return Err(format!(
            "{unused} unused admissions > available {available}: a unit promised twice (admits {admits:?}, now {now})"
        ));
    }
    let served: u64 = state[0].as_deref().map_or(0, |v| v.parse().unwrap_or(0));
    let started = state[1].as_deref() == Some("1");
    let length = line.len() as u64;
    if served > length {
        return Err(format!("served {served} > line length {length}"));
    }
    if served < seen.served || length < seen.line {
        return Err(format!(
            "the queue went back: served {} -> {served}, line {} -> {length}",
            seen.served, seen.line
        ));
    }
    (seen.served, seen.line) = (served, length);
    let rank: HashMap<&str, u64> = line
        .iter()
        .enumerate()
        .map(|(r, u)| (u.as_str(), r as u64))
        .collect();
    if started {
        for (user, &r) in &rank {
            let was = *seen.ranks.entry(user.to_string()).or_insert(r);
            if was != r {
                return Err(format!(
                    "{user}'s rank moved from {was} to {r} after the start"
                ));
            }
        }
    }
    for user in admits.iter().map(|(u, _)| u).chain(&used) {
        match rank.get(user.as_str()) {
            Some(&r) if r < served => {}
            Some(&r) => {
                return Err(format!(
                "{user} admitted at rank {r} though only {served} ranks were served (out of order)"
            ))
            }
            None => return Err(format!("{user} admitted without a place in line")),
        }
    }
    for (tail, record) in &holds {
        // "<status> <quantity> <created> <expires> <keep_until> <payment> <n> <comp>... <user>"
        let words: Vec<&str> = record.split(' ').collect();
        let comps: usize = words.get(6).and_then(|n| n.parse().ok()).unwrap_or(0);
        let user = words
            .get(7 + comps..)
            .map(|w| w.join(" "))
            .unwrap_or_default();
        seen.holds.entry(tail.clone()).or_insert(user);
    }
    let mut per_user: HashMap<&str, Vec<&str>> = HashMap::new();
    for (tail, user) in &seen.holds {
        per_user.entry(user).or_default().push(tail);
    }
    let used: HashSet<&str> = used.iter().map(String::as_str).collect();
    for (user, tails) in &per_user {
        if tails.len() > 1 {
            return Err(format!(
                "{user} made {} holds through one admission: {tails:?}",
                tails.len()
            ));
        }
        if !used.contains(user) {
            return Err(format!(
                "{user} holds {tails:?} but its admission is not spent (q:used)"
            ));
        }
    }
    for user in &used {
        if !per_user.contains_key(user) {
            return Err(format!(
                "{user}'s admission is spent (q:used) without a hold"
            ));
        }
    }
    let open = started
        && !paused
        && meta[6].is_none()
        && sold < stock_total
        && meta[3]
            .as_deref()
            .is_none_or(|s| s.is_empty() || s.parse::<i64>().is_ok_and(|s| now >= s))
        && meta[7]
            .as_deref()
            .is_none_or(|e| e.is_empty() || e.parse::<i64>().is_ok_and(|e| now < e));
    if let (Some(granted), true, false) = (after_queue_call, started, paused) {
        // The call ran after `granted`: what had lapsed by then is gone from q:admits
        // (deadlines a pause moved on are moved before that).
        if let Some((user, until)) = admits.iter().find(|(_, until)| *until <= granted) {
            return Err(format!(
                "{user}'s admission lapsed at {until} but is still in q:admits after a queue call at {granted} or later"
            ));
        }
    }
    // Right after a queue call nothing has lapsed for it yet: its unused are all of q:admits.
    if after_queue_call.is_some() && rate == 0 && open {
        let free = available - admits.len() as i64;
        if free > 0 && served < length {
            return Err(format!(
                "{free} units unoffered while {} wait, right after a queue call (available {available}, unused {})",
                length - served,
                admits.len()
            ));
        }
    }
    let tickets = queue.tickets.lock().unwrap();
    if let Some(broken) = tickets.broken.first() {
        return Err(broken.clone());
    }
    // Positions are unique: no two users were told the same one.
    let mut told: HashMap<u64, &str> = HashMap::new();
    for (user, &position) in &tickets.positions {
        if let Some(other) = told.insert(position, user) {
            return Err(format!(
                "{user} and {other} were both told position {position}"
            ));
        }
    }
    if started {
        // The pre-queue is placed before everyone who joined after the start.
        let last_pre = tickets
            .before_start
            .iter()
            .filter_map(|u| tickets.positions.get(u))
            .max();
        let first_post = tickets
            .after_start
            .iter()
            .filter_map(|u| tickets.positions.get(u))
            .min();
        if let (Some(pre), Some(post)) = (last_pre, first_post) {
            if pre > post {
                return Err(format!(
                    "a pre-queue user is at position {pre}, behind a later join at {post}"
                ));
            }
        }
    }
    Ok(())
}
