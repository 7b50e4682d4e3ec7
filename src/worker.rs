//! Background work, each step callable on its own so tests can drive it without
//! sleeping: `sweep_once` returns the stock of expired holds, `flush_once` writes the
//! outbox to MySQL. `run` loops them until shutdown; an in-flight step finishes first.
//!
//! The flush, per SKU stream, in the consumer group `flush`:
//! 1. entries already delivered to this consumer and not acknowledged (a batch whose
//!    MySQL write or XACK failed) are retried first, at once;
//! 2. else entries pending on another consumer idle for `claim_idle` (a worker that
//!    died mid-batch) are taken over with XAUTOCLAIM;
//! 3. else new entries are read.
//!
//! A batch is written in one MySQL transaction (idempotently: see `db::apply_events`)
//! and acknowledged only after the commit, so a crash anywhere leaves its entries
//! pending, to be written again by whoever takes them over; writing twice changes
//! nothing. The stream is trimmed only below what every group has acknowledged.
//!
//! Cost grows with the SKUs on sale, not with every SKU ever defined. The worker walks
//! the index of SKUs on sale (`keys::SKU_INDEX`, re-read only when its generation
//! counter moves) and keeps a plan per SKU: the sweeper visits a SKU when its first
//! hold falls due, and at the latest one hold length after its last visit (no hold
//! created since can be due sooner; a change of terms moves the generation and every
//! SKU is visited again); the flush looks at a SKU's outbox when this process wrote to
//! it (store::OutboxHints), while it has a backlog, and else at a backing-off interval
//! up to FLUSH_IDLE_PROBE_MAX. A SKU whose sale is over and that has nothing left in
//! Redis that MySQL lacks is retired by the sweep (lua/sweep.lua) and leaves the index.

use futures::stream::{self, StreamExt};
use redis::Value;
use sqlx::mysql::MySqlPool;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::config::WorkerSettings;
use crate::db::{self, KeyClaim, OutboxEvent, StockCounters};
use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::keys::{SkuKeys, FLUSH_GROUP};
use crate::limits;
use crate::reconcile;
use crate::reservation::{Compensation, CompensationReason, Reservation, Resolution, Status};
use crate::store::{OutboxEntry, SaleState, Store, StreamPosition, Swept};
use crate::telemetry;
use std::sync::{Arc, Mutex};

/// First retry delay of a failing flush (MySQL down); doubles up to the maximum.
const FLUSH_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between two flush attempts while MySQL is down: bounds how long the
/// backlog waits after MySQL is back.
const FLUSH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the flush, woken by a write to an outbox, waits for more writes before it
/// looks: a burst goes to MySQL in few batches, and an event waits about this, not the
/// flush interval.
const FLUSH_HINT_GATHER: Duration = Duration::from_millis(20);
/// Longest the worker keeps flushing after shutdown was asked for.
const FINAL_FLUSH_LIMIT: Duration = Duration::from_secs(10);
/// Wait before the first idle probe of a SKU's outbox; it doubles with every idle one.
const IDLE_PROBE_FIRST: Duration = Duration::from_millis(100);
/// XAUTOCLAIM calls per batch: each scans at most 10 x COUNT pending entries.
const AUTOCLAIM_ROUNDS: usize = 4;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
}

/// Where a batch read by the flush stands in its outbox's flush group.
enum OutboxPosition {
    /// No earlier entry is pending: the batch is written now.
    First,
    /// An earlier entry is pending on another consumer: the batch waits for it.
    Behind,
    /// The batch is pending no more: Redis lost it since it was read.
    Lost,
}

/// One batch of a sale's outbox as the flush writes it.
struct Batch {
    entries: Vec<OutboxEntry>,
    /// The entries' events (a malformed entry has none).
    events: Vec<OutboxEvent>,
}

/// What one batch of a SKU's flush did.
enum Flushed {
    /// Entries written (or found written) and acknowledged.
    Written(u64),
    /// An earlier entry is pending on another consumer: nothing written. `took_over`:
    /// that consumer was idle for claim_idle and its entries are now this one's.
    Waiting { took_over: bool },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Events written (or found already written) and acknowledged.
    pub flushed: u64,
}

#[derive(Clone)]
pub struct Worker {
    pub store: Store,
    pub db: MySqlPool,
    /// Consumer name in the outbox group: unique per process (and per `Worker`), so a
    /// restarted worker never mistakes a dead one's entries for its own; it takes
    /// them over once they are `claim_idle` old.
    pub consumer: String,
    /// Entries pending this long on another consumer are taken over (XAUTOCLAIM).
    pub claim_idle: Duration,
    plans: Arc<Mutex<Plans>>,
    /// Changes whenever a flush committed new events: the webhook deliverer queues
    /// them at once instead of at its next poll.
    events_written: Arc<watch::Sender<()>>,
}

/// When the worker looks at each SKU on sale next.
#[derive(Default)]
struct Plans {
    /// SKU_INDEX generation the map was built from; None before the first read.
    generation: Option<u64>,
    /// When the whole index was last read.
    read_at: Option<Instant>,

    skus: HashMap<SkuId, Plan>,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    next_sweep: Instant,
    next_probe: Instant,
    /// Probes in a row that found nothing to flush: the next one waits longer.
    idle_probes: u32,
    /// Events waiting at the last probe.
    backlog: u64,
    next_reap: Instant,
}

impl Plan {
    fn now() -> Plan {
        let now = Instant::now();
        Plan {
            next_sweep: now,
            next_probe: now,
            idle_probes: 0,
            backlog: 0,
            next_reap: now,
        }
    }
}

impl Plans {
    fn plan(&mut self, sku: &SkuId) -> &mut Plan {
        self.skus.entry(sku.clone()).or_insert_with(Plan::now)
    }

    fn forget(&mut self, sku: &SkuId) {
        self.skus.remove(sku);
        telemetry::forget_sku(sku.as_str());
    }
}

impl Worker {
    pub fn new(store: Store, db: MySqlPool) -> Worker {
        let consumer = format!("{}-{}", std::process::id(), crate::ids::random_name());
        Worker {
            store,
            db,
            consumer,
            claim_idle: limits::FLUSH_CLAIM_IDLE,
            plans: Default::default(),
            events_written: Arc::new(watch::channel(()).0),
        }
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, Plans> {
        self.plans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The SKUs on sale. The whole index is read at start and every
    /// SWEEP_IDLE_RECHECK (new SKUs are due at once, SKUs gone are forgotten); when its
    /// generation moves, only the SKUs whose sale changed since the generation it saw
    /// last (keys::SKU_CHANGES) are re-planned: due for a sweep and a probe at once. An
    /// admin PUT costs one SKU's re-planning, not a pass over every SKU on sale.
    async fn refresh_plans(&self) -> Result<()> {
        let generation = self.store.sku_index_generation().await?;
        let (full, seen) = {
            let plans = self.plans();
            (
                plans
                    .read_at
                    .is_none_or(|at| at.elapsed() >= limits::SWEEP_IDLE_RECHECK),
                plans.generation,
            )
        };
        if !full && seen == Some(generation) {
            return Ok(());
        }
        let indexed = if full {
            Some(self.store.sku_ids().await?)
        } else {
            None
        };
        let changed = match seen {
            Some(seen) if seen != generation => self.store.changed_since(seen).await?,
            _ => Vec::new(),
        };
        let mut plans = self.plans();
        if let Some(indexed) = indexed {
            let keep: std::collections::HashSet<&SkuId> = indexed.iter().collect();
            let gone: Vec<SkuId> = plans
                .skus
                .keys()
                .filter(|s| !keep.contains(s))
                .cloned()
                .collect();
            for sku in gone {
                plans.forget(&sku);
            }
            for sku in &indexed {
                plans.plan(sku);
            }
            plans.read_at = Some(Instant::now());
        }
        let now = Instant::now();
        for sku in &changed {
            let plan = plans.plan(sku);
            plan.next_sweep = now;
            plan.next_probe = now;
        }
        plans.generation = Some(generation);
        Ok(())
    }

    /// The SKUs whose planned sweep has come, after looking for changes (tests).
    #[doc(hidden)]
    pub async fn due_for_sweep(&self) -> Result<Vec<SkuId>> {
        self.refresh_plans().await?;
        Ok(self.planned(true, |plan| plan.next_sweep))
    }

    /// Every SKU on sale, or only those whose planned time has come.
    fn planned(&self, due_only: bool, pick: impl Fn(&Plan) -> Instant) -> Vec<SkuId> {
        let now = Instant::now();
        self.plans()
            .skus
            .iter()
            .filter(|(_, plan)| !due_only || pick(plan) <= now)
            .map(|(sku, _)| sku.clone())
            .collect()
    }

    pub fn with_claim_idle(mut self, claim_idle: Duration) -> Worker {
        self.claim_idle = claim_idle;
        self
    }

    /// Expires every due hold of every SKU on sale (and retires the SKUs whose sale is
    /// over), one bounded batch per script call. SKUs are swept WORKER_SKU_CONCURRENCY
    /// at a time (their calls share the multiplexed connection's pipeline). A SKU that
    /// fails does not stop the others; the pass then returns the first error.
    pub async fn sweep_once(&self) -> Result<SweepReport> {
        self.sweep_pass(false).await
    }

    /// A pass over the SKUs on sale whose planned visit has come (`due_only`), or all.
    async fn sweep_pass(&self, due_only: bool) -> Result<SweepReport> {
        self.refresh_plans().await?;
        let skus = self.planned(due_only, |plan| plan.next_sweep);
        let swept: Vec<Result<u64>> = stream::iter(skus)
            .map(|sku| self.sweep_sku(sku))
            .buffer_unordered(limits::WORKER_SKU_CONCURRENCY)
            .collect()
            .await;
        let mut report = SweepReport::default();
        let mut failure = None;
        for result in swept {
            match result {
                Ok(expired) => report.expired += expired,
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        telemetry::expired(report.expired);
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Expires every due hold of one SKU, batch after batch, then plans its next visit
    /// (or, when the sweep retired it, takes it out of the index).
    pub async fn sweep_sku(&self, sku: SkuId) -> Result<u64> {
        let mut expired = 0;
        loop {
            let started = Instant::now();
            let swept = self.store.sweep(&sku).await?;
            expired += swept.expired;
            // A batch of stale index entries expires nothing but still makes progress.
            if swept.still_due == 0 || swept.examined == 0 {
                if swept.buckets > 1 {
                    // A transfer cut short (a gateway stopped between its steps) is
                    // finished exactly once; its units are never lost in transit.
                    self.store
                        .finish_transfers(&[SkuKeys::new(&sku)], self.store.transfer_timing.stale)
                        .await?;
                }
                self.after_sweep(&sku, &swept, started).await?;
                return Ok(expired);
            }
        }
    }

    async fn after_sweep(&self, sku: &SkuId, swept: &Swept, started: Instant) -> Result<()> {
        if swept.state == SaleState::Retired {
            self.store.unindex_retired(sku).await?;
            self.plans().forget(sku);
            tracing::info!(sku = %sku, "SKU retired: its sale is over and MySQL has everything");
            return Ok(());
        }
        if let Some(available) = swept.available {
            telemetry::available_stock(sku.as_str(), available);
        }
        if let (Some(held), Some(sold)) = (swept.held, swept.sold) {
            telemetry::units(sku.as_str(), held, sold);
        }
        let wait_ms = match swept.state {
            // Waiting for its last holds to end and its outbox to drain.
            SaleState::Ended => swept
                .next_deadline_ms
                .map_or(0, |d| d - swept.now_ms)
                .min(1_000),
            // No hold created after this call can fall due before one hold length;
            // and the SKU may retire once its sale ends.
            SaleState::Open => {
                let first_due = swept.next_deadline_ms.map(|d| d - swept.now_ms);
                let hold = swept.hold_ms.unwrap_or(0);
                let ends = swept.ends_at_ms.map_or(i64::MAX, |e| e - swept.now_ms);
                first_due.map_or(hold, |d| d.min(hold)).min(ends)
            }
            SaleState::Missing | SaleState::Retired => i64::MAX,
        };
        let mut wait = Duration::from_millis(wait_ms.max(0) as u64).min(limits::SWEEP_IDLE_RECHECK);
        if swept.buckets > 1 {
            // A bucket's transfers cut short are finished by its sweep: soon.
            wait = wait.min(limits::TRANSFER_STALE);
        }
        self.plans().plan(sku).next_sweep = started + wait;
        Ok(())
    }

    /// Flushes at most one batch per SKU on sale; call until `flushed == 0` to drain.
    /// A SKU whose flush fails does not hold the others back: every SKU gets its batch,
    /// then the first failure is returned (an outage of MySQL or Redis ends the pass's
    /// flushing).
    pub async fn flush_once(&self) -> Result<FlushReport> {
        let (report, failure) = self.flush_pass(false).await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// One batch per SKU looked at: all SKUs on sale, or (`planned`) those this process
    /// wrote to, those with a backlog and those whose idle probe is due. Err only when
    /// the SKUs cannot even be listed.
    async fn flush_pass(&self, planned: bool) -> Result<(FlushReport, Option<Error>)> {
        self.refresh_plans().await?;
        let mut skus = self.planned(planned, |plan| plan.next_probe);
        let hinted: std::collections::HashSet<SkuId> =
            self.store.outbox_hints.take().into_iter().collect();
        if planned {
            let listed: std::collections::HashSet<SkuId> = skus.iter().cloned().collect();
            skus.extend(hinted.iter().filter(|s| !listed.contains(*s)).cloned());
        }
        let mut report = FlushReport::default();
        let mut failure = None;
        // One cheap XINFO per SKU first, many at once: most SKUs have nothing to
        // flush most of the time.
        let probed: Vec<(SkuId, u64)> = stream::iter(skus)
            .map(|sku| async move {
                let waiting = self.store.outbox_backlog(&sku).await.unwrap_or(1);
                (sku, waiting)
            })
            .buffer_unordered(limits::WORKER_SKU_CONCURRENCY)
            .collect()
            .await;
        // The backlog as probed, published before any flushing: a flush that waits
        // (MySQL slow, a reconcile holding the SKU's row lock) must not hide it.
        {
            let mut plans = self.plans();
            for (sku, waiting) in &probed {
                if let Some(plan) = plans.skus.get_mut(sku) {
                    plan.backlog = *waiting;
                }
            }
            telemetry::outbox_backlog(plans.skus.values().map(|p| p.backlog).sum());
        }
        // The SKUs' batches side by side (each SKU's own batches stay one at a time, in
        // its outbox's order): during a sale the flush of one SKU waits mostly on round
        // trips, and a pass of several SKUs one after the other made every SKU's events
        // wait for the others' (the first part of a webhook's lag).
        let outage = std::sync::atomic::AtomicBool::new(false);
        let outcomes: Vec<(u64, Option<Error>)> = stream::iter(probed)
            .map(|(sku, mut waiting)| {
                let (outage, hinted) = (&outage, &hinted);
                async move {
                    let mut flushed = 0;
                    let mut failure = None;
                    // After an outage of MySQL or Redis, every other SKU would only wait
                    // for the same timeouts: the pass just measures the backlog from
                    // there on.
                    if !outage.load(Relaxed) && waiting > 0 {
                        match self.flush_sku(&sku).await {
                            Ok(n) => flushed = n,
                            Err(e @ Error::Unavailable { .. }) => {
                                outage.store(true, Relaxed);
                                failure = Some(e);
                            }
                            Err(e) => {
                                tracing::warn!(sku = %sku, error = %e, "flush of one SKU failed");
                                failure = Some(e);
                            }
                        }
                        waiting = self.store.outbox_backlog(&sku).await.unwrap_or(waiting);
                    }
                    if !outage.load(Relaxed) {
                        self.reap_consumers(&sku).await;
                    }
                    self.after_probe(&sku, waiting, hinted.contains(&sku));
                    (flushed, failure)
                }
            })
            .buffer_unordered(limits::WORKER_SKU_CONCURRENCY)
            .collect()
            .await;
        for (flushed, e) in outcomes {
            report.flushed += flushed;
            // An outage first: it is what the caller backs off for.
            match e {
                Some(e @ Error::Unavailable { .. })
                    if !matches!(failure, Some(Error::Unavailable { .. })) =>
                {
                    failure = Some(e)
                }
                Some(e) => {
                    failure.get_or_insert(e);
                }
                None => {}
            }
        }
        let backlog = self.plans().skus.values().map(|p| p.backlog).sum();
        telemetry::flushed(report.flushed);
        telemetry::outbox_backlog(backlog);
        Ok((report, failure))
    }

    /// Plans the SKU's next probe: at once while it has a backlog, else after a wait
    /// that doubles with every idle probe, from one flush interval up to
    /// FLUSH_IDLE_PROBE_MAX.
    fn after_probe(&self, sku: &SkuId, waiting: u64, hinted: bool) {
        let mut plans = self.plans();
        let Some(plan) = plans.skus.get_mut(sku) else {
            return; // not (or no longer) on sale
        };
        plan.backlog = waiting;
        if waiting > 0 || hinted {
            plan.idle_probes = 0;
            plan.next_probe = Instant::now();
        } else {
            plan.idle_probes = plan.idle_probes.saturating_add(1);
            let wait = IDLE_PROBE_FIRST
                .saturating_mul(1 << plan.idle_probes.min(8))
                .min(limits::FLUSH_IDLE_PROBE_MAX);
            plan.next_probe = Instant::now() + wait;
        }
    }

    /// Drops the SKU's dead flush consumers, at most every CONSUMER_REAP_EVERY.
    async fn reap_consumers(&self, sku: &SkuId) {
        {
            let mut plans = self.plans();
            let Some(plan) = plans.skus.get_mut(sku) else {
                return;
            };
            if plan.next_reap > Instant::now() {
                return;
            }
            plan.next_reap = Instant::now() + limits::CONSUMER_REAP_EVERY;
        }
        match self
            .store
            .reap_flush_consumers(sku, limits::CONSUMER_REAP_IDLE, &self.consumer)
            .await
        {
            Ok(0) => {}
            Ok(reaped) => {
                tracing::info!(sku = %sku, reaped, "dropped stopped consumers from the flush group")
            }
            Err(e) => {
                tracing::warn!(sku = %sku, error = %e, "could not drop stopped flush consumers")
            }
        }
    }

    /// One transaction per batch; XACK only after the commit, so a crash anywhere
    /// leaves the events pending, to be claimed and written again (idempotently).
    pub async fn flush_sku(&self, sku: &SkuId) -> Result<u64> {
        match self.flush_batch(sku).await? {
            Flushed::Written(n) => Ok(n),
            // The earlier entries were a dead consumer's, taken over just now: they
            // are this consumer's pending entries, read first, in order.
            Flushed::Waiting { took_over: true } => match self.flush_batch(sku).await? {
                Flushed::Written(n) => Ok(n),
                Flushed::Waiting { .. } => Ok(0),
            },
            Flushed::Waiting { took_over: false } => Ok(0),
        }
    }

    async fn flush_batch(&self, sku: &SkuId) -> Result<Flushed> {
        // A first read without MySQL: most probes of a SKU find nothing to flush.
        if self.read_batch(sku).await?.is_empty() {
            return Ok(Flushed::Written(0));
        }
        let mut conn = self.db.acquire().await?;
        let mut applied = match self.read_locked(&mut conn, sku).await? {
            None => return Ok(Flushed::Written(0)),
            Some((mut tx, batch)) => {
                let applied = self.apply(&mut tx, sku, &batch, false).await?;
                db::finish_apply(tx, &applied).await?;
                (batch, applied)
            }
        };
        if applied.1.needs_admin_locks {
            // A sale MySQL has no stock for: decided again with no admin PUT half-way.
            // The admin lock comes before the row lock (as an admin PUT takes them), so
            // the batch is read again once both are held.
            let parent = sku.sku();
            // A connection that fails while it holds a named lock is closed, not pooled.
            conn.close_on_drop();
            db::SkuLock::acquire(&mut conn, &parent).await?;
            let again: Result<Option<(Batch, db::Applied)>> = async {
                let Some((mut tx, batch)) = self.read_locked(&mut conn, sku).await? else {
                    return Ok(None);
                };
                let applied = self.apply(&mut tx, sku, &batch, true).await?;
                db::finish_apply(tx, &applied).await?;
                Ok(Some((batch, applied)))
            }
            .await;
            db::SkuLock::release(&mut conn, &parent).await?;
            match again? {
                Some(written) => applied = written,
                None => return Ok(Flushed::Written(0)),
            }
        }
        drop(conn);
        let (Batch { entries, events }, applied) = applied;
        if applied.out_of_order {
            // Whoever holds the earlier entries writes them first; a dead consumer's
            // are taken over here once idle for claim_idle, then read with ours.
            let claimed = self.autoclaim(sku).await?;
            if claimed.is_empty() {
                tracing::debug!(sku = %sku, "flush waits for an earlier batch of the outbox");
            } else {
                tracing::info!(sku = %sku, entries = claimed.len(), consumer = %self.consumer,
                    "took over outbox entries left pending by an idle consumer");
            }
            return Ok(Flushed::Waiting {
                took_over: !claimed.is_empty(),
            });
        }
        telemetry::events_recorded(applied.events.len() as u64);
        if !applied.events.is_empty() {
            self.events_written.send_replace(());
        }
        for c in &applied.refused_payments {
            if c.reason == CompensationReason::Cancelled {
                tracing::error!(sku = %sku, reservation_id = %c.reservation_id, payment_ref = %c.payment_ref,
                    compensation_id = %c.id,
                    "a sale of a unit MySQL records as sold already (Redis lost sales it had flushed and sold their units again): not recorded, compensation recorded");
                telemetry::compensation_recorded("sold_out_after_rollback");
            } else {
                tracing::warn!(sku = %sku, reservation_id = %c.reservation_id, payment_ref = %c.payment_ref,
                    compensation_id = %c.id,
                    "a second payment for a sale MySQL already records (Redis lost the first confirmation): compensation recorded");
                telemetry::compensation_recorded("duplicate_payment_after_rollback");
            }
        }
        // MySQL has the compensations (and resolves) now: Redis forgets its copies.
        let written: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                OutboxEvent::Compensation(c) => Some(c.id.clone()),
                OutboxEvent::CompensationResolved { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        self.store.forget_compensations(sku, &written).await?;
        // MySQL records how these reservations ended: their hashes go (reads, replays
        // and late payments are answered from the record), the idempotency keys stay.
        let ended: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                OutboxEvent::Confirmed { reservation, .. }
                | OutboxEvent::Ended { reservation, .. } => {
                    Some(reservation.reservation_id.as_str())
                }
                _ => None,
            })
            .collect();
        self.store.forget_ended_reservations(sku, &ended).await?;
        let ids: Vec<String> = entries.iter().map(|e| e.stream_id.clone()).collect();
        self.store.ack_outbox(sku, &ids).await?;
        Ok(Flushed::Written(ids.len() as u64))
    }

    /// The flush's transaction with the SKU's row locked (db::begin_flush), and the
    /// batch it writes: this consumer's pending entries, read under the lock (the read
    /// before the lock made them this consumer's). A rebuild of the sale reads MySQL
    /// under the same lock, so it never runs between this read and the commit, where a
    /// key of the batch would be in neither Redis nor MySQL and a reserve with it could
    /// make a second hold (contract invariant 3). Entries Redis lost before this read
    /// are lost as if before any read. None: nothing pending (the transaction ended).
    async fn read_locked<'c>(
        &self,
        conn: &'c mut sqlx::MySqlConnection,
        sku: &SkuId,
    ) -> Result<Option<(sqlx::Transaction<'c, sqlx::MySql>, Batch)>> {
        let tx = db::begin_flush(conn, sku).await?;
        let mut entries = self.read_group(sku, "0").await?;
        if entries.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let run = self.run_before_foreign_pending(sku, &entries).await?;
        entries.truncate(run);
        let mut events = Vec::with_capacity(entries.len());
        for entry in &entries {
            match parse_event(entry) {
                Some(event) => events.push(event),
                // A malformed (or deleted) entry can never be written; keeping it
                // pending would retry it forever. Logged, and acknowledged below.
                None => {
                    tracing::error!(stream_id = %entry.stream_id, sku = %sku, "skipping malformed outbox entry")
                }
            }
        }
        Ok(Some((tx, Batch { entries, events })))
    }

    /// Writes the batch in the flush's transaction (db::apply_in; the caller ends it).
    /// A SKU's events take their sequence numbers in the order of its outbox: a batch
    /// read while an earlier entry is pending on another consumer (which may commit
    /// after us) waits for it (`outbox_position`, asked under the row lock).
    ///
    /// A batch Redis lost since it was read under the lock (a failover, a rollback, a
    /// wipe) is written all the same. A sale Redis still has (a rollback) gets the
    /// batch's keys' claims back once the writes are settled, before the commit and
    /// under the row lock, so that a key MySQL records a reservation for replays it
    /// (contract invariant 3; a reserve with the key between the rollback and now made a
    /// hold of its own, which the contract allows: a rollback rebuilds nothing). Not
    /// before: a batch that writes nothing (out of order, or to be written again under
    /// the admin locks, where a lost batch is read as empty) would leave claims of
    /// reservations MySQL never records. A sale Redis lacks is rebuilt after the commit,
    /// from MySQL, under the same row lock. (Another consumer that wrote the batch
    /// already is the harmless other case: a claim is never written over.)
    async fn apply(
        &self,
        tx: &mut sqlx::MySqlConnection,
        sku: &SkuId,
        batch: &Batch,
        under_admin_locks: bool,
    ) -> Result<db::Applied> {
        let first = &batch.entries[0].stream_id;
        let lost = std::sync::atomic::AtomicBool::new(false);
        let check: db::OrderCheck<'_> = Box::pin(async {
            Ok(match self.outbox_position(sku, first).await? {
                OutboxPosition::First => true,
                OutboxPosition::Behind => false,
                OutboxPosition::Lost => {
                    lost.store(true, Relaxed);
                    true
                }
            })
        });
        let applied = db::apply_in(tx, &batch.events, Some(check), under_admin_locks).await?;
        let written = !applied.out_of_order && !applied.needs_admin_locks;
        if written && lost.load(Relaxed) {
            let claims = claims_of(&batch.events);
            // Only into a sale Redis has: a usage record written into one it lacks
            // would keep its rebuild from restoring that user's bought units.
            if !claims.is_empty() && self.store.sale_exists(sku).await? {
                tracing::warn!(sku = %sku, claims = claims.len(),
                    "Redis lost an outbox batch being flushed: its keys' claims are put back");
                self.store.restore_usage(sku, &[], &claims).await?;
            }
        }
        Ok(applied)
    }

    /// Where the batch starting at `first` stands in the flush group, under the SKU's
    /// row lock: first of what is pending (on any consumer: this one's own pending
    /// entries are always read first, so they are never before a batch it reads),
    /// behind an entry still pending, or pending no more (Redis lost it).
    async fn outbox_position(&self, sku: &SkuId, first: &str) -> Result<OutboxPosition> {
        // The oldest entry pending up to `first` (inclusive).
        let reply = self.pending_range(sku, "-", first, 1).await?;
        Ok(match first_pending(&reply)? {
            Some(oldest) if oldest == first => OutboxPosition::First,
            Some(_) => OutboxPosition::Behind,
            None => OutboxPosition::Lost,
        })
    }

    /// The flush group's pending entries from `start` to `end` (inclusive; `-` from the
    /// first), at most `count`, oldest first: `[[id, consumer, idle ms, deliveries],
    /// ...]`; Nil when the stream or its group is gone.
    async fn pending_range(
        &self,
        sku: &SkuId,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Value> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.store.connection();
        Ok(redis::cmd("XPENDING")
            .arg(&keys.outbox)
            .arg(FLUSH_GROUP)
            .arg(start)
            .arg(end)
            .arg(count)
            .query_async(&mut conn)
            .await
            .or_else(|e| match e.code() {
                Some("NOGROUP") => Ok(Value::Nil),
                _ => Err(e),
            })?)
    }

    /// How many of this consumer's pending entries (in stream order) come before the
    /// first entry between them pending on another consumer, under the SKU's row lock
    /// (whose holder alone acknowledges). Entries taken over from dead consumers (say
    /// the 1st and the 3rd) may have a live consumer's (the 2nd) between them: that
    /// one is written first, or a resolve would be written before its compensation and
    /// the sequence numbers would leave the outbox's order. At least one: the first is
    /// "elsewhere" only once claimed away or lost since the read, and writing it is
    /// idempotent (`outbox_position` decides). Entries cut off here that a Redis
    /// rollback took since the locked read are lost as if before it. One more round
    /// trip per batch of more than one entry, under the row lock.
    async fn run_before_foreign_pending(
        &self,
        sku: &SkuId,
        entries: &[OutboxEntry],
    ) -> Result<usize> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(0);
        };
        if entries.len() == 1 {
            return Ok(1);
        }
        // One pending elsewhere lies before `last` (this consumer's): among the first
        // len entries of the range.
        let reply = self
            .pending_range(sku, &first.stream_id, &last.stream_id, entries.len())
            .await?;
        let Some(foreign) = first_pending_elsewhere(&reply, &self.consumer)? else {
            return Ok(entries.len());
        };
        let run = run_before(entries, &foreign);
        if run < entries.len() {
            tracing::info!(sku = %sku, written = run, waiting = entries.len() - run,
                "flush stops before an outbox entry pending on another consumer");
        }
        Ok(run)
    }

    /// This consumer's unacknowledged entries first, then entries a dead consumer left
    /// pending, then new ones: at most one batch.
    async fn read_batch(&self, sku: &SkuId) -> Result<Vec<OutboxEntry>> {
        let own = self.read_group(sku, "0").await?;
        if !own.is_empty() {
            return Ok(own);
        }
        let claimed = self.autoclaim(sku).await?;
        if !claimed.is_empty() {
            tracing::info!(sku = %sku, entries = claimed.len(), consumer = %self.consumer,
                "took over outbox entries left pending by an idle consumer");
            return Ok(claimed);
        }
        self.read_group(sku, ">").await
    }

    /// XREADGROUP from `id` ("0": this consumer's pending entries; ">": new ones).
    async fn read_group(&self, sku: &SkuId, id: &str) -> Result<Vec<OutboxEntry>> {
        let keys = SkuKeys::new(sku);
        let command = || {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(FLUSH_GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(limits::FLUSH_BATCH)
                .arg("STREAMS")
                .arg(&keys.outbox)
                .arg(id);
            cmd
        };
        let mut conn = self.store.connection();
        let reply: Value = match command().query_async(&mut conn).await {
            Err(e) if e.code() == Some("NOGROUP") => {
                // Retired meanwhile: nothing to flush, and no stream to create again.
                if !self.store.on_sale(sku).await? {
                    return Ok(Vec::new());
                }
                // The group (or the stream) is gone, e.g. after Redis lost data: the
                // group starts from the beginning of whatever the stream holds.
                self.store.ensure_outbox_group(sku).await?;
                command().query_async(&mut conn).await?
            }
            other => other?,
        };
        // [[key, [entry...]]] or nil
        let mut entries = Vec::new();
        if let Value::Array(streams) = reply {
            for stream in streams {
                if let Value::Array(mut parts) = stream {
                    if parts.len() == 2 {
                        entries.extend(parse_entries(parts.remove(1))?);
                    }
                }
            }
        }
        Ok(entries)
    }

    /// XAUTOCLAIM: entries pending on any consumer for at least `claim_idle`.
    async fn autoclaim(&self, sku: &SkuId) -> Result<Vec<OutboxEntry>> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.store.connection();
        let mut cursor = "0-0".to_string();
        let mut claimed = Vec::new();
        for _ in 0..AUTOCLAIM_ROUNDS {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&keys.outbox)
                .arg(FLUSH_GROUP)
                .arg(&self.consumer)
                .arg(self.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(limits::FLUSH_BATCH - claimed.len())
                .query_async(&mut conn)
                .await
                .or_else(|e| match e.code() {
                    // No stream or no group yet: nothing pending anywhere.
                    Some("NOGROUP") => Ok(Value::Nil),
                    _ => Err(e),
                })?;
            // [next cursor, [entry...], [deleted id...]]
            let Value::Array(mut parts) = reply else {
                break;
            };
            if parts.len() < 2 {
                return Err(bad_stream_reply("XAUTOCLAIM"));
            }
            claimed.extend(parse_entries(parts.remove(1))?);
            cursor = string_of(&parts[0]).ok_or_else(|| bad_stream_reply("XAUTOCLAIM cursor"))?;
            if cursor == "0-0" || claimed.len() >= limits::FLUSH_BATCH {
                break;
            }
        }
        Ok(claimed)
    }

    /// Drains the outbox completely (tests and shutdown). Err when some SKU could not
    /// be flushed (after the others were drained as far as they go).
    pub async fn flush_all(&self) -> Result<u64> {
        let (stop, _) = watch::channel(false);
        self.drain(&stop.subscribe(), false).await
    }

    /// Runs the sweeper, the flush and the reconciler side by side until `shutdown`
    /// turns true, each on its own clock: a MySQL outage (a flush backing off, a
    /// reconcile waiting) never delays the return of expired stock, and sales go on.
    pub async fn run(self, settings: WorkerSettings, shutdown: watch::Receiver<bool>) {
        let sweep_every = Duration::from_millis(settings.sweep_interval_ms.max(10));
        let reconcile_every = Duration::from_secs(settings.reconcile_interval_seconds.max(1));
        tracing::info!(consumer = %self.consumer, claim_idle = ?self.claim_idle, "worker started");
        let retention = Duration::from_secs(settings.events_retention_hours.saturating_mul(3600));
        tokio::join!(
            self.sweep_loop(sweep_every, shutdown.clone()),
            self.flush_loop(sweep_every, shutdown.clone()),
            self.prune_loop(retention, shutdown.clone()),
            // Webhooks run on their own tasks (one per endpoint): an endpoint that
            // hangs delays neither the sweep nor the flush (src/webhooks.rs).
            crate::webhooks::Deliverer::new(
                self.db.clone(),
                std::sync::Arc::new(crate::webhooks::SystemClock)
            )
            .with_timeout(Duration::from_millis(settings.webhook_timeout_ms))
            .with_concurrency(settings.webhook_concurrency as usize)
            .woken_by(self.events_written.subscribe())
            .run(shutdown.clone()),
            self.reconcile_loop(reconcile_every, settings.reconcile_repair, shutdown),
        );
        // What was confirmed before shutdown goes to MySQL now if it can, within a
        // bound: gateways may still be confirming. Cutting a batch short is safe (it
        // stays pending, and another worker takes it over).
        match tokio::time::timeout(FINAL_FLUSH_LIMIT, self.flush_all()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "final flush failed; events stay in the outbox")
            }
            Err(_) => tracing::warn!("final flush cut short; events stay in the outbox"),
        }
        tracing::info!("worker stopped");
    }

    /// A pass starts every `every` (not `every` after the last one ended), so a hold
    /// is swept at most `every` after its deadline while a pass takes less than that;
    /// a pass that takes longer is logged and measured.
    async fn sweep_loop(&self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while !*shutdown.borrow() {
            tokio::select! {
                _ = ticks.tick() => {}
                // A dropped sender is a shutdown too.
                changed = shutdown.changed() => if changed.is_err() { break } else { continue },
            }
            let started = Instant::now();
            if let Err(e) = self.sweep_pass(true).await {
                tracing::warn!(error = %e, "sweep failed");
            }
            let took = started.elapsed();
            telemetry::sweep_pass(took);
            if took > every {
                tracing::warn!(?took, ?every, "a sweep pass took longer than the sweep interval: expired stock comes back late");
            }
        }
    }

    /// Drains the outbox every `every`; while it fails (MySQL or Redis down) retries
    /// with exponential backoff from FLUSH_BACKOFF_MIN to FLUSH_BACKOFF_MAX. Nothing is
    /// dropped: unwritten entries stay pending and are retried first.
    async fn flush_loop(&self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::ZERO;
        while !*shutdown.borrow() {
            let wait = match self.drain(&shutdown, true).await {
                Ok(_) => {
                    if !backoff.is_zero() {
                        tracing::info!("flush recovered");
                    }
                    backoff = Duration::ZERO;
                    if let Ok(count) = db::open_compensations(&self.db).await {
                        telemetry::open_compensations(count);
                    }
                    // Until the next interval, or sooner: as soon as this process wrote
                    // to an outbox (a hint), after FLUSH_HINT_GATHER to gather the
                    // writes of a burst into one batch.
                    let hinted = async {
                        self.store.outbox_hints.written().await;
                        tokio::time::sleep(FLUSH_HINT_GATHER).await;
                    };
                    tokio::select! {
                        _ = hinted => Duration::ZERO,
                        _ = tokio::time::sleep(every) => Duration::ZERO,
                        changed = shutdown.changed() => if changed.is_err() { break } else { Duration::ZERO },
                    }
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(FLUSH_BACKOFF_MIN, FLUSH_BACKOFF_MAX);
                    tracing::warn!(error = %e, retry_in = ?backoff, "flush failed");
                    backoff
                }
            };
            if !sleep_or_shutdown(wait, &mut shutdown).await {
                break;
            }
        }
    }

    /// Flushes batch after batch while any SKU makes progress (a failing SKU does not
    /// stop the others); stops between batches when shutdown is asked for. Err when,
    /// at the end, some SKU still failed. `planned`: only the SKUs the plan says to
    /// look at (see flush_pass), else every SKU on sale.
    async fn drain(&self, shutdown: &watch::Receiver<bool>, planned: bool) -> Result<u64> {
        let mut total = 0;
        while !*shutdown.borrow() {
            let (report, failure) = self.flush_pass(planned).await?;
            total += report.flushed;
            if report.flushed == 0 {
                return match failure {
                    Some(e) => Err(e),
                    None => Ok(total),
                };
            }
        }
        Ok(total)
    }

    /// Deletes the events recorded before `now_ms - retention`, EVENTS_PRUNE_BATCH at a
    /// time (each a short statement, so the flush's inserts never wait long on it).
    /// Returns how many went.
    pub async fn prune_events_once(&self, now_ms: i64, retention: Duration) -> Result<u64> {
        let before_ms = now_ms.saturating_sub(retention.as_millis() as i64);
        let mut total = 0;
        loop {
            let pruned = db::events::prune(&self.db, before_ms, limits::EVENTS_PRUNE_BATCH).await?
                + db::webhooks::prune(&self.db, before_ms, limits::EVENTS_PRUNE_BATCH).await?;
            total += pruned;
            if pruned < limits::EVENTS_PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    async fn prune_loop(&self, retention: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            if !sleep_or_shutdown(limits::EVENTS_PRUNE_EVERY, &mut shutdown).await {
                break;
            }
            let now_ms = chrono::Utc::now().timestamp_millis();
            match self.prune_events_once(now_ms, retention).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "events past their retention pruned"),
                Err(e) => tracing::warn!(error = %e, "events could not be pruned"),
            }
        }
    }

    async fn reconcile_loop(
        &self,
        every: Duration,
        repair: bool,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            if !sleep_or_shutdown(every, &mut shutdown).await {
                break;
            }
            match reconcile::run(&self.store, &self.db, None, repair).await {
                Ok(report) if report.drift_found() => {
                    tracing::warn!(findings = report.findings.len(), "reconcile found drift")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconcile could not run"),
            }
        }
    }
}

/// Sleeps `wait`; false when shutdown was asked for (or can no longer be signalled).
async fn sleep_or_shutdown(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => !*shutdown.borrow(),
        changed = shutdown.changed() => changed.is_ok() && !*shutdown.borrow(),
    }
}

fn bad_stream_reply(what: &str) -> Error {
    Error::Internal(format!("unexpected {what} reply"))
}

fn string_of(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[[id, [field, value, ...] | nil], ...]`; a nil body is an entry deleted from the
/// stream while pending, kept with no fields (so it is acknowledged, not retried).
fn parse_entries(value: Value) -> Result<Vec<OutboxEntry>> {
    let Value::Array(items) = value else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else {
            return Err(bad_stream_reply("stream entry"));
        };
        let mut parts = parts.into_iter();
        let id = parts
            .next()
            .as_ref()
            .and_then(string_of)
            .ok_or_else(|| bad_stream_reply("stream entry id"))?;
        let mut map = HashMap::new();
        match parts.next() {
            Some(Value::Array(fields)) => {
                let mut fields = fields.into_iter();
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    let name = string_of(&name).ok_or_else(|| bad_stream_reply("field name"))?;
                    map.insert(name, value);
                }
            }
            Some(Value::Map(pairs)) => {
                for (name, value) in pairs {
                    let name = string_of(&name).ok_or_else(|| bad_stream_reply("field name"))?;
                    map.insert(name, value);
                }
            }
            _ => {}
        }
        entries.push(OutboxEntry {
            stream_id: id.clone(),
            fields: redis::streams::StreamId {
                id,
                map,
                milliseconds_elapsed_from_delivery: None,
                delivered_count: None,
            },
        });
    }
    Ok(entries)
}

/// The id of the first entry of an XPENDING range reply (None: nothing pending).
fn first_pending(reply: &Value) -> Result<Option<String>> {
    let unexpected = || Error::Internal(format!("unexpected XPENDING reply {reply:?}"));
    match reply {
        Value::Nil => Ok(None),
        Value::Array(items) => match items.first() {
            None => Ok(None),
            Some(Value::Array(fields)) => match fields.first() {
                Some(Value::BulkString(id)) => Ok(Some(String::from_utf8_lossy(id).into_owned())),
                _ => Err(unexpected()),
            },
            Some(_) => Err(unexpected()),
        },
        _ => Err(unexpected()),
    }
}

/// How many of `entries` (in stream order) come before the entry `foreign`; at least
/// one (see `Worker::run_before_foreign_pending`).
fn run_before(entries: &[OutboxEntry], foreign: &str) -> usize {
    let foreign = StreamPosition::parse(foreign);
    let run = entries
        .iter()
        .take_while(|e| StreamPosition::parse(&e.stream_id) < foreign)
        .count();
    run.max(1)
}

/// The id of the first entry of an extended XPENDING reply pending on a consumer other
/// than `consumer`.
fn first_pending_elsewhere(reply: &Value, consumer: &str) -> Result<Option<String>> {
    let unexpected = || Error::Internal(format!("unexpected XPENDING reply {reply:?}"));
    let items = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        _ => return Err(unexpected()),
    };
    for item in items {
        let Value::Array(fields) = item else {
            return Err(unexpected());
        };
        let (Some(id), Some(owner)) = (
            fields.first().and_then(string_of),
            fields.get(1).and_then(string_of),
        ) else {
            return Err(unexpected());
        };
        if owner != consumer {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The idempotency keys' claims of the reservations a batch records (confirmed or
/// ended), as a rebuild restores them.
fn claims_of(events: &[OutboxEvent]) -> Vec<db::EndedClaim> {
    events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Confirmed {
                reservation, key, ..
            }
            | OutboxEvent::Ended {
                reservation, key, ..
            } => Some(db::EndedClaim {
                reservation_id: reservation.reservation_id.clone(),
                user_id: reservation.user_id.clone(),
                quantity: reservation.quantity,
                claim: key.clone()?,
            }),
            _ => None,
        })
        .collect()
}

/// One outbox entry as the event the flush writes; None for one it cannot read.
pub fn parse_event(entry: &OutboxEntry) -> Option<OutboxEvent> {
    let field = |name: &str| entry.fields.get::<String>(name);
    let kind = field("type")?;
    if kind == "compensation_resolved" {
        // Events written before resolutions carried a reference carry none.
        let text = |name: &str| field(name).filter(|v| !v.is_empty());
        return Some(OutboxEvent::CompensationResolved {
            id: field("id")?,
            resolution: Resolution {
                at_ms: field("at").and_then(|at| at.parse().ok()),
                refund_ref: text("refund_ref"),
                note: text("note"),
            },
        });
    }
    if kind == "sku_sold_out" || kind == "sku_available" {
        let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
        let sku = field("sku")?;
        return Some(OutboxEvent::StockCrossed {
            sold_out: kind == "sku_sold_out",
            // The bucket's hash tag (entries written before buckets announced carry
            // none: theirs is the SKU's own).
            sale: field("sale").unwrap_or_else(|| sku.clone()),
            stream_id: entry.stream_id.clone(),
            sku,
            counters: StockCounters {
                stock_total: number("stock_total")?,
                available: number("available")?,
                held: number("held")?,
                sold: number("sold")?,
            },
            at_ms: field("at")?.parse().ok()?,
        });
    }
    let quantity: u64 = field("quantity")?.parse().ok()?;
    let at_ms: i64 = field("at")?.parse().ok()?;
    // Events written before reservations were recorded carry no times of the hold.
    let ms_or_at = |name: &str| field(name).and_then(|v| v.parse().ok()).unwrap_or(at_ms);
    let reservation = |status: Status| -> Option<Reservation> {
        Some(Reservation {
            reservation_id: field("reservation_id")?,
            sku: field("sku")?,
            user_id: field("user_id")?,
            quantity,
            status,
            expires_at_ms: ms_or_at("expires_at"),
            created_at_ms: ms_or_at("created_at"),
            payment_ref: field("payment_ref").filter(|p| !p.is_empty()),
        })
    };
    // Events written before keys were recorded carry none (nor do layout-1 holds).
    let key = field("idempotency_key")
        .filter(|k| !k.is_empty())
        .and_then(|key| {
            let keep_until_ms: i64 = field("keep_until")?.parse().ok()?;
            (keep_until_ms > 0).then_some(KeyClaim { key, keep_until_ms })
        });
    match kind.as_str() {
        "confirmed" => Some(OutboxEvent::Confirmed {
            reservation: reservation(Status::Confirmed)?,
            at_ms,
            key,
        }),
        "ended" => {
            let status = Status::parse(&field("status")?)
                .filter(|s| matches!(s, Status::Cancelled | Status::Expired))?;
            Some(OutboxEvent::Ended {
                reservation: reservation(status)?,
                at_ms,
                key,
            })
        }
        "compensation" => Some(OutboxEvent::Compensation(Compensation {
            id: field("id")?,
            reservation_id: field("reservation_id")?,
            sku: field("sku")?,
            user_id: field("user_id")?,
            quantity,
            payment_ref: field("payment_ref")?,
            reason: CompensationReason::parse(&field("reason")?)?,
            resolved: false,
            created_at_ms: at_ms,
            resolution: Resolution::default(),
        })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_first_pending_entry_is_read_from_an_xpending_range() {
        let entry = |id: &str| {
            Value::Array(vec![
                bulk(id),
                bulk("consumer"),
                Value::Int(5),
                Value::Int(1),
            ])
        };
        let two = Value::Array(vec![entry("1-0"), entry("2-0")]);
        assert_eq!(first_pending(&two).unwrap().as_deref(), Some("1-0"));
        assert_eq!(first_pending(&Value::Array(vec![])).unwrap(), None);
        assert_eq!(first_pending(&Value::Nil).unwrap(), None);
        // Not a range reply: an error, never "nothing pending" (a lost batch).
        assert!(first_pending(&Value::Int(0)).is_err());
        assert!(first_pending(&Value::Array(vec![Value::Int(1)])).is_err());
    }

    #[test]
    fn the_first_entry_pending_elsewhere_is_found_in_stream_order() {
        let entry = |id: &str, consumer: &str| {
            Value::Array(vec![bulk(id), bulk(consumer), Value::Int(5), Value::Int(1)])
        };
        let range = Value::Array(vec![
            entry("9-0", "me"),
            entry("10-0", "other"),
            entry("11-0", "me"),
        ]);
        assert_eq!(
            first_pending_elsewhere(&range, "me").unwrap().as_deref(),
            Some("10-0")
        );
        assert_eq!(
            first_pending_elsewhere(&range, "other").unwrap().as_deref(),
            Some("9-0")
        );
        let mine = Value::Array(vec![entry("9-0", "me")]);
        assert_eq!(first_pending_elsewhere(&mine, "me").unwrap(), None);
        assert_eq!(first_pending_elsewhere(&Value::Nil, "me").unwrap(), None);
        assert!(first_pending_elsewhere(&Value::Int(0), "me").is_err());
        // Ids order by milliseconds, then sequence, as numbers (not as text).
        assert!(StreamPosition::parse("9-5") < StreamPosition::parse("10-0"));
        assert!(StreamPosition::parse("10-2") < StreamPosition::parse("10-10"));
    }

    #[test]
    fn a_batch_is_cut_before_the_entry_pending_elsewhere() {
        let entries: Vec<OutboxEntry> = ["9-5", "10-2", "10-11", "12-0"]
            .iter()
            .map(|id| OutboxEntry {
                stream_id: id.to_string(),
                fields: Default::default(),
            })
            .collect();
        assert_eq!(run_before(&entries, "10-10"), 2);
        assert_eq!(run_before(&entries, "11-0"), 3);
        assert_eq!(run_before(&entries, "13-0"), 4);
        // The first itself elsewhere since the read: it is written all the same.
        assert_eq!(run_before(&entries, "9-0"), 1);
    }

    #[test]
    fn stream_entries_parse_including_deleted_ones() {
        let value = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![
                    bulk("type"),
                    bulk("confirmed"),
                    bulk("reservation_id"),
                    bulk("r"),
                    bulk("sku"),
                    bulk("s"),
                    bulk("user_id"),
                    bulk("u"),
                    bulk("quantity"),
                    bulk("2"),
                    bulk("payment_ref"),
                    bulk("p"),
                    bulk("at"),
                    bulk("5"),
                ]),
            ]),
            Value::Array(vec![bulk("2-0"), Value::Nil]),
        ]);
        let entries = parse_entries(value).unwrap();
        assert_eq!(entries.len(), 2);
        match parse_event(&entries[0]) {
            Some(OutboxEvent::Confirmed {
                reservation, at_ms, ..
            }) => {
                assert_eq!((reservation.quantity, at_ms), (2, 5));
                assert_eq!(reservation.payment_ref.as_deref(), Some("p"));
                // An event written before the hold's times were carried: the confirm time.
                assert_eq!(reservation.created_at_ms, 5);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(entries[1].stream_id, "2-0");
        assert!(parse_event(&entries[1]).is_none());
        assert!(parse_entries(Value::Nil).unwrap().is_empty());
    }
}
