//! The reservation service: the one place where a request becomes a script call and a
//! script reply becomes an outcome. The state machine itself lives in `lua/lib.lua`;
//! this module validates, routes reservation ids to their SKU, and records metrics.
//! It knows nothing of HTTP.

use sqlx::mysql::MySqlPool;

use crate::auth::Caller;
use crate::batcher::{
    Batcher, BucketMoves, IdempotencyProbes, MoveRequest, Moved, QueueReads, Reserves,
};
use crate::buckets::{self, Layout};
use crate::config::GatewaySettings;
use crate::db;
use crate::error::{Error, Outcome, Result};
use crate::ids::{self, SkuId};
use crate::keys::SkuKeys;
use crate::limits;
use crate::queue;
use crate::reservation::{
    Compensation, CompensationReason, Refusal, Reservation, Resolution, Sku, SkuDefinition, Status,
};
use crate::sold_out::{FlagCheck, SoldOutFlags};
use crate::store::{
    BucketStock, ConfirmOutcome, Loaded, QueueMode, QueueRequest, ReserveOutcome, ReserveRequest,
    ReserveSettings, Store,
};
use crate::telemetry;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// SKUs whose layout a gateway remembers; past it the memory starts over.
const LAYOUTS_MAX: usize = 65_536;

#[derive(Clone)]
pub struct Gateway {
    pub store: Store,
    pub db: MySqlPool,
    pub settings: GatewaySettings,
    sold_out: Arc<SoldOutFlags>,
    reserves: Arc<Batcher<Reserves>>,
    replay_probes: Arc<Batcher<IdempotencyProbes>>,
    bucket_moves: Arc<Batcher<BucketMoves>>,
    /// Joins and ticket reads of waiting rooms, batched per SKU.
    queue_reads: Arc<Batcher<QueueReads>>,
    /// SKU -> its buckets and its buyers' homes (fixed when the SKU is created, so
    /// never stale).
    layouts: Arc<RwLock<HashMap<SkuId, Layout>>>,
    /// The waiting rooms streams follow on this gateway (src/queue.rs).
    pub queue_watchers: Arc<queue::Watchers>,
    /// SKUs that refused a reserve without an admission token lately.
    waiting_rooms: Arc<queue::SeenWaitingRooms>,
}

/// How long a reserve's idempotency key lives, from the gateway's settings.
fn keys_ttl(settings: &GatewaySettings) -> ReserveSettings {
    ReserveSettings {
        idempotency_ttl_ms: settings.idempotency_ttl.as_millis() as u64,
        payment_grace_ms: settings.payment_grace.as_millis() as u64,
        released_holds_cap: settings.released_holds_cap,
    }
}

/// The sale (the SKU, or its bucket) holding a reservation id; an id that is not
/// ours is simply not found.
fn sale_of(reservation_id: &str) -> Result<SkuId> {
    ids::sale_of_reservation(reservation_id).ok_or(Error::Refused(Refusal::NotFound))
}

impl Gateway {
    pub fn new(store: Store, db: MySqlPool, settings: GatewaySettings) -> Gateway {
        let keys_ttl = keys_ttl(&settings);
        let reserves = Arc::new(Batcher::new(Reserves {
            store: store.clone(),
            keys_ttl,
        }));
        let replay_probes = Arc::new(Batcher::new(IdempotencyProbes {
            store: store.clone(),
        }));
        let queue_reads = Arc::new(Batcher::new(QueueReads {
            store: store.clone(),
        }));
        let bucket_moves = Arc::new(Batcher::one_at_a_time(
            BucketMoves::new(store.clone(), keys_ttl),
            limits::MOVES_BATCH_MAX,
        ));
        Gateway {
            store,
            db,
            settings,
            sold_out: Default::default(),
            reserves,
            replay_probes,
            bucket_moves,
            queue_reads,
            layouts: Default::default(),
            queue_watchers: Default::default(),
            waiting_rooms: Default::default(),
        }
    }

    /// The buckets a SKU is split over: from memory, else from Redis (None when Redis
    /// has no state for the SKU's bucket 0).
    async fn bucket_count(&self, sku: &SkuId) -> Result<Option<u32>> {
        Ok(self.layout(sku).await?.map(|layout| layout.buckets))
    }

    /// The SKU's buckets and its buyers' homes: from memory, else from Redis.
    async fn layout(&self, sku: &SkuId) -> Result<Option<Layout>> {
        if let Some(&layout) = self
            .layouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(sku)
        {
            return Ok(Some(layout));
        }
        let Some(layout) = Box::pin(self.store.layout(sku)).await? else {
            return Ok(None);
        };
        let mut layouts = self.layouts.write().unwrap_or_else(|e| e.into_inner());
        if layouts.len() >= LAYOUTS_MAX {
            layouts.clear();
        }
        layouts.insert(sku.clone(), layout);
        Ok(Some(layout))
    }

    /// Joins the SKU's waiting room (or answers the ticket the user has).
    pub async fn queue_join(&self, sku: &SkuId, user_id: &str) -> Result<queue::Ticket> {
        // The user's place in a shuffled pre-queue: drawn from the OS-seeded CSPRNG,
        // secret until the start, below 2^52 (lua/queue.lua).
        let draw = rand::random::<u64>() >> 12;
        self.queue_read(sku, user_id, QueueMode::Join, draw).await
    }

    /// The user's ticket in the SKU's waiting room (`not_found` when none).
    pub async fn queue_ticket(&self, sku: &SkuId, user_id: &str) -> Result<queue::Ticket> {
        self.queue_read(sku, user_id, QueueMode::Ticket, 0).await
    }

    /// A join or a ticket read, batched with the SKU's others (`batcher::QueueReads`).
    async fn queue_read(
        &self,
        sku: &SkuId,
        user_id: &str,
        mode: QueueMode,
        draw: u64,
    ) -> Result<queue::Ticket> {
        let request = QueueRequest {
            mode,
            user_id: user_id.to_string(),
            draw,
        };
        let reply = self.queue_reads.submit(sku, request).await?;
        let read = queue::QueueRead::parse(&reply)?;
        Ok(queue::ticket(
            &self.settings.id_keys,
            sku,
            user_id,
            &read,
            self.settings.queue_polls_per_second,
        ))
    }

    /// One look at the SKU's waiting room for its watcher (src/queue.rs); it admits
    /// whom the stock allows, as every look does.
    pub async fn queue_watch(&self, sku: &SkuId) -> Result<queue::QueueWatch> {
        let reply = self.store.queue(sku, "watch", "", "").await?;
        queue::QueueWatch::parse(&reply)
    }

    /// A reserve that carries an `Admission-Token`: checked before Redis, then spent by
    /// the reserve script on a SKU with a waiting room (one admission, one hold; a token
    /// past its deadline only replays its key). A token that is not good counts as none:
    /// a SKU without a waiting room does not need one, and one with a waiting room
    /// refuses the reserve (from this gateway's memory once Redis said so). A split SKU
    /// with a waiting room spends it in bucket 0, its buyers' only home.
    pub async fn reserve_admitted(
        &self,
        sku: &SkuId,
        user_id: &str,
        quantity: u64,
        idempotency_key: &str,
        token: &str,
    ) -> Result<(Reservation, bool)> {
        let checked = queue::verify(
            &self.settings.id_keys,
            token,
            sku,
            user_id,
            crate::explore::host_clock_ms(),
        );
        let Ok(admission) = checked else {
            return self.reserve(sku, user_id, quantity, idempotency_key).await;
        };
        // Admissions are spent in bucket 0, where the SKU's buyers are homed when it
        // has a waiting room (buckets::homes).
        if self.layout(sku).await?.map(|layout| layout.homes) != Some(1) {
            return self.reserve(sku, user_id, quantity, idempotency_key).await;
        }
        let request = ReserveRequest {
            user_id: user_id.to_owned(),
            quantity,
            idempotency_key: idempotency_key.to_owned(),
            reservation_id: self.settings.id_keys.new_reservation_id_in(sku.as_str()),
        };
        let outcome = self
            .store
            .reserve_admitted(sku, &request, keys_ttl(&self.settings), admission)
            .await;
        self.answer(sku, outcome).await
    }

    /// Returns the reservation and whether it is an idempotent replay.
    pub async fn reserve(
        &self,
        sku: &SkuId,
        user_id: &str,
        quantity: u64,
        idempotency_key: &str,
    ) -> Result<(Reservation, bool)> {
        if self.waiting_rooms.refuses(sku) {
            return Err(Error::Refused(Refusal::AdmissionRequired));
        }
        // A user's reserves of a SKU always go to one bucket: the limit and the key
        // are decided there, in one script, as for an unsplit SKU.
        let Layout { buckets: k, homes } = match self.layout(sku).await? {
            Some(layout) => layout,
            // Redis has no state for the SKU (never defined, retired long ago, or lost
            // and being rebuilt): the reserve says why, or replays its key, but makes
            // no hold in bucket 0 of a SKU split meanwhile (a user homed elsewhere
            // would hold twice under one key).
            None => {
                let request = ReserveRequest {
                    user_id: user_id.to_owned(),
                    quantity,
                    idempotency_key: idempotency_key.to_owned(),
                    reservation_id: self.settings.id_keys.new_reservation_id_in(sku.as_str()),
                };
                let keys_ttl = keys_ttl(&self.settings);
                // Boxed, as every path a reserve rarely takes: an inline future is
                // part of every reserve's future, which is copied whole when axum
                // boxes it (cold paths made it kilobytes).
                match Box::pin(self.store.reserve_if_unsplit(sku, &request, keys_ttl)).await {
                    Ok(Some(outcome)) => return self.answer(sku, Ok(outcome)).await,
                    Err(e) => return self.answer(sku, Err(e)).await,
                    Ok(None) => self.layout(sku).await?.unwrap_or(Layout {
                        buckets: 1,
                        homes: 1,
                    }),
                }
            }
        };
        let home = buckets::home(sku, user_id, homes);
        let sale = match home {
            0 => sku.clone(),
            _ => buckets::sales(sku, k).swap_remove(home as usize),
        };
        // The flag spares the script, not the replay: a key that created a hold
        // still gets its reservation back. The probes of a burst share one MGET.
        let flag = self.sold_out.check(sku, quantity);
        if flag == FlagCheck::SoldOut
            && !self
                .replay_probes
                .submit(&sale, (user_id.to_owned(), idempotency_key.to_owned()))
                .await?
        {
            return Err(Error::Refused(Refusal::SoldOut));
        }
        let request = ReserveRequest {
            user_id: user_id.to_owned(),
            quantity,
            idempotency_key: idempotency_key.to_owned(),
            reservation_id: self.settings.id_keys.new_reservation_id_in(sale.as_str()),
        };
        let outcome = match self
            .reserves
            .submit_sharing(&sale, request.clone(), homes)
            .await
        {
            Err(Error::Refused(Refusal::SoldOut)) if homes > 1 => {
                Box::pin(self.reserve_with_transfer(sku, k, home, request)).await
            }
            other => other,
        };
        let outcome = match outcome {
            Err(Error::Refused(Refusal::SoldOut)) => {
                self.sold_out.raise(sku, quantity);
                Err(Error::Refused(Refusal::SoldOut))
            }
            Err(Error::Refused(Refusal::AdmissionRequired)) => {
                self.waiting_rooms.saw(sku);
                Err(Error::Refused(Refusal::AdmissionRequired))
            }
            other => other,
        };
        if flag == FlagCheck::Refresh {
            match &outcome {
                Ok(ReserveOutcome::Created(_)) => self.sold_out.lower(sku),
                Err(Error::Refused(Refusal::SoldOut)) => {} // raised again above
                _ => self.sold_out.refreshed(sku),
            }
        }
        self.answer(sku, outcome).await
    }

    /// A reserve's answer: the reservation and whether it is an idempotent replay.
    async fn answer(
        &self,
        sku: &SkuId,
        outcome: Result<ReserveOutcome>,
    ) -> Result<(Reservation, bool)> {
        let outcome = match outcome {
            // Retired long enough for its tombstone to be gone: MySQL tells.
            Err(Error::Refused(Refusal::NotFound)) => {
                return Err(Box::pin(self.not_in_redis(sku)).await)
            }
            other => other,
        };
        Ok(match outcome? {
            ReserveOutcome::Created(r) => {
                telemetry::transition("held");
                (r, false)
            }
            ReserveOutcome::Replayed(r) => (r, true),
            // Only MySQL keeps it now: the record answers (a replay of an ended
            // reservation; rare, and bounded per user by the rate limit).
            ReserveOutcome::ReplayedFromRecord(rid) => match Box::pin(self.recorded(&rid)).await? {
                Recorded::Reservation(r) => (r, true),
                Recorded::Lost => {
                    return Err(Error::Internal(format!(
                        "reservation {rid} left Redis without a record in MySQL"
                    )))
                }
            },
        })
    }

    /// The user's home bucket cannot serve the quantity: stock moves to it, and the
    /// reserve runs there together with the give (the reserves short at the same moment
    /// share one batch, `BucketMoves`), so the units moved for it are its own. The
    /// batch answers `sold_out` once a settled read of the buckets (see `BucketMoves`)
    /// shows less than the quantity left. Otherwise the reserve runs again: while the
    /// buckets together have its quantity and others took it first (each such round,
    /// they bought it), for TRANSFER_GIVE_UP at most, then 503 (nothing done; a retry
    /// with the same key is safe); and while reads are short but not settled, for
    /// TRANSFER_WAIT, after which two short reads in a row are `sold_out` (at the tail of
    /// a sale returned units trickle in and move all the time), units stuck in transfers
    /// past their lease being finished first.
    async fn reserve_with_transfer(
        &self,
        sku: &SkuId,
        k: u32,
        home: u32,
        request: ReserveRequest,
    ) -> Result<ReserveOutcome> {
        let started = Instant::now();
        let quantity = request.quantity;
        let mut short_before = false;
        let mut finished_stale = false;
        loop {
            let moved = self
                .bucket_moves
                .submit(
                    sku,
                    MoveRequest {
                        buckets: k,
                        home,
                        reserve: request.clone(),
                    },
                )
                .await?;
            let (short, in_transit) = match moved {
                Moved::Answered(outcome) => {
                    let sold_out = matches!(outcome, Err(Error::Refused(Refusal::SoldOut)));
                    let label = if sold_out { "sold_out" } else { "served" };
                    telemetry::bucket_transfer_wait(started.elapsed(), label);
                    return outcome;
                }
                Moved::Again { short, in_transit } => (short, in_transit),
            };
            let waited = started.elapsed();
            if !short {
                // Other reserves took the units first: they are sold; look again.
                short_before = false;
                if waited >= limits::TRANSFER_GIVE_UP {
                    telemetry::bucket_transfer_wait(waited, "gave_up");
                    return Err(Error::unavailable(
                        "redis: the stock of this SKU's buckets kept going to other reserves",
                        Outcome::NotApplied,
                    ));
                }
                continue;
            }
            // The burst behind this reserve is answered from the flag at once (as
            // with one bucket), not each down this path; this one still settles.
            self.sold_out.raise(sku, quantity);
            if in_transit && waited >= limits::TRANSFER_WAIT && !finished_stale {
                // Units stuck in a transfer its gateway never finished (it stopped,
                // or a failover cut it): finish those past their lease now rather
                // than answer `sold_out` until the worker's sweep does.
                finished_stale = true;
                let keys: Vec<SkuKeys> = buckets::sales(sku, k).iter().map(SkuKeys::new).collect();
                if self
                    .store
                    .finish_transfers(&keys, self.store.transfer_timing.stale)
                    .await?
                    > 0
                {
                    short_before = false;
                    continue;
                }
            }
            if short_before && waited >= limits::TRANSFER_WAIT {
                telemetry::bucket_transfer_wait(waited, "sold_out");
                return Err(Error::Refused(Refusal::SoldOut));
            }
            if in_transit {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            short_before = true;
        }
    }

    /// A confirm that cannot become a sale answers `RefundRequired`: the compensation
    /// exists before the answer leaves (in Redis, readable by id, and in the outbox; or
    /// in MySQL for a reservation Redis no longer has).
    pub async fn confirm(&self, reservation_id: &str, payment_ref: &str) -> Result<Reservation> {
        let sale = sale_of(reservation_id)?;
        let sku = sale.sku();
        let compensation_id = ids::compensation_id(reservation_id, payment_ref);
        let outcome = match self
            .store
            .confirm(&sale, reservation_id, payment_ref, &compensation_id)
            .await
        {
            Err(Error::Refused(Refusal::NotFound)) => {
                return self
                    .confirm_forgotten(&sku, reservation_id, payment_ref)
                    .await
            }
            other => other?,
        };
        if let ConfirmOutcome::Refused {
            compensation_id, ..
        } = &outcome
        {
            self.store
                .index_compensation(compensation_id, &sale)
                .await?;
        }
        match outcome {
            ConfirmOutcome::Confirmed(t) => {
                if t.changed {
                    telemetry::transition("confirmed");
                }
                Ok(t.reservation)
            }
            ConfirmOutcome::Refused {
                refusal,
                compensation_id,
            } => {
                telemetry::compensation_recorded(refusal.code());
                Err(Error::RefundRequired {
                    refusal,
                    compensation_id,
                })
            }
        }
    }

    /// A payment for a reservation Redis does not have: forgotten after its retention
    /// (MySQL records how it ended), or lost with Redis data before anything about it
    /// reached MySQL (the id's MAC says we issued it). Either way the answer comes from
    /// the record, and a payment that cannot become a sale gets its compensation in
    /// MySQL before the answer leaves. 404 only for ids flashgate never issued.
    async fn confirm_forgotten(
        &self,
        sku: &SkuId,
        reservation_id: &str,
        payment_ref: &str,
    ) -> Result<Reservation> {
        let (reason, record) = match self.recorded(reservation_id).await? {
            Recorded::Reservation(r) => match r.status {
                Status::Confirmed if r.payment_ref.as_deref() == Some(payment_ref) => return Ok(r),
                Status::Confirmed => (CompensationReason::DuplicatePayment, Some(r)),
                Status::Cancelled => (CompensationReason::Cancelled, Some(r)),
                Status::Held | Status::Paying | Status::Expired => {
                    (CompensationReason::Expired, Some(r))
                }
            },
            // The hold is gone with its stock (the reconciler returns the units): it
            // can no longer be sold, so the payment is refunded as for an expired hold.
            // Who held it and how many are unknown: recorded as '' and 0.
            Recorded::Lost => (CompensationReason::Expired, None),
        };
        let now_ms = crate::explore::host_clock_ms();
        let compensation = db::record_compensation(
            &self.db,
            &Compensation {
                id: ids::compensation_id(reservation_id, payment_ref),
                reservation_id: reservation_id.to_owned(),
                sku: sku.to_string(),
                user_id: record
                    .as_ref()
                    .map(|r| r.user_id.clone())
                    .unwrap_or_default(),
                quantity: record.as_ref().map_or(0, |r| r.quantity),
                payment_ref: payment_ref.to_owned(),
                reason,
                resolved: false,
                created_at_ms: now_ms,
                resolution: Resolution::default(),
            },
            db::FoundBy::Record,
        )
        .await?;
        let Some(compensation) = compensation else {
            // The flush recorded this very payment as the sale meanwhile.
            return self.forgotten(reservation_id).await;
        };
        // The answer says what the record says: a sale of the reservation under
        // another payment seen under the SKU's lock, or a compensation recorded
        // before (the flush's, after a rollback) with its own reason.
        let refusal = match compensation.reason {
            CompensationReason::DuplicatePayment => Refusal::AlreadyConfirmed,
            CompensationReason::Cancelled => Refusal::ReservationCancelled,
            CompensationReason::Expired => Refusal::ReservationExpired,
        };
        telemetry::compensation_recorded(refusal.code());
        Err(Error::RefundRequired {
            refusal,
            compensation_id: compensation.id,
        })
    }

    /// What MySQL knows of a reservation Redis does not have.
    async fn recorded(&self, reservation_id: &str) -> Result<Recorded> {
        match db::reservation(&self.db, reservation_id).await? {
            Some(r) => Ok(Recorded::Reservation(r)),
            None if self.settings.id_keys.issued(reservation_id) => Ok(Recorded::Lost),
            None => Err(Error::Refused(Refusal::NotFound)),
        }
    }

    /// The record of a reservation Redis forgot, for reads and for calls that do not
    /// bring money. A lost hold (issued by us, recorded nowhere) is not found here.
    async fn forgotten(&self, reservation_id: &str) -> Result<Reservation> {
        match self.recorded(reservation_id).await? {
            Recorded::Reservation(r) => Ok(r),
            Recorded::Lost => Err(Error::Refused(Refusal::NotFound)),
        }
    }

    pub async fn cancel(&self, reservation_id: &str, caller: &Caller) -> Result<Reservation> {
        let sale = sale_of(reservation_id)?;
        let t = match self
            .store
            .cancel(&sale, reservation_id, caller.user_id())
            .await
        {
            // Ended long ago: cancelling it again changes nothing, as in Redis.
            Err(Error::Refused(Refusal::NotFound)) => {
                let r = owned_by(self.forgotten(reservation_id).await?, caller)?;
                return match r.status {
                    Status::Confirmed => Err(Error::Refused(Refusal::AlreadyConfirmed)),
                    _ => Ok(r),
                };
            }
            other => other?,
        };
        if t.changed {
            self.sold_out.returned(&sale.sku(), t.reservation.quantity);
            telemetry::transition(t.reservation.status.as_str());
        }
        Ok(t.reservation)
    }

    pub async fn payment_pending(
        &self,
        reservation_id: &str,
        payment_ref: &str,
    ) -> Result<Reservation> {
        let sale = sale_of(reservation_id)?;
        let grace_ms = self.settings.payment_grace.as_millis() as u64;
        let t = match self
            .store
            .payment_pending(&sale, reservation_id, payment_ref, grace_ms)
            .await
        {
            // No money has arrived: say why it must not be taken, record nothing.
            Err(Error::Refused(Refusal::NotFound)) => {
                return Err(Error::Refused(
                    match self.recorded(reservation_id).await? {
                        Recorded::Reservation(r) => match r.status {
                            Status::Confirmed => Refusal::AlreadyConfirmed,
                            Status::Cancelled => Refusal::ReservationCancelled,
                            _ => Refusal::ReservationExpired,
                        },
                        Recorded::Lost => Refusal::ReservationExpired,
                    },
                ))
            }
            other => other?,
        };
        if t.changed {
            telemetry::transition("paying");
        }
        Ok(t.reservation)
    }

    /// Another user's reservation is not found, exactly like a missing one.
    pub async fn reservation(&self, reservation_id: &str, caller: &Caller) -> Result<Reservation> {
        let sale = sale_of(reservation_id)?;
        let r = match self.store.reservation(&sale, reservation_id).await {
            Err(Error::Refused(Refusal::NotFound)) => self.forgotten(reservation_id).await?,
            other => other?,
        };
        owned_by(r, caller)
    }

    /// From Redis while the SKU is on sale (or its retirement's tombstone is there),
    /// else from MySQL's record: a retired SKU has no holds, and MySQL has every sale.
    pub async fn sku(&self, sku: &SkuId) -> Result<Sku> {
        match self.sale_views(sku).await {
            Err(Error::Refused(Refusal::NotFound)) => {
                let record = db::sku_record(&self.db, sku)
                    .await?
                    .ok_or(Error::Refused(Refusal::NotFound))?;
                Ok(record_view(sku, &record))
            }
            other => other,
        }
    }

    /// The SKU's view from Redis: a split SKU's is the sum of its buckets', with the
    /// units in transit between them counted as available (they are on their way to
    /// a bucket that sells them).
    async fn sale_views(&self, sku: &SkuId) -> Result<Sku> {
        let k = self.bucket_count(sku).await?.unwrap_or(1);
        if k == 1 {
            return self.store.sku(sku).await;
        }
        let views = buckets::sales(sku, k)
            .into_iter()
            .map(|sale| async move { self.store.sale_view(&sale).await });
        let views = futures::future::join_all(views).await;
        let mut views = views.into_iter();
        let (mut sum, sku_stock) = views.next().expect("bucket 0")?;
        for view in views {
            match view {
                Ok((bucket, _)) => {
                    sum.held += bucket.held;
                    sum.sold += bucket.sold;
                    sum.paused |= bucket.paused;
                }
                // Retired and its tombstone gone before bucket 0's: nothing held.
                Err(Error::Refused(Refusal::NotFound)) => {}
                Err(e) => return Err(e),
            }
        }
        sum.stock_total = sku_stock.unwrap_or(sum.stock_total);
        sum.available = sum.stock_total.saturating_sub(sum.held + sum.sold);
        Ok(sum)
    }

    /// Why a reserve found no sale in Redis: `ended` for a SKU MySQL records as ended
    /// (retired), else not found (never defined; or Redis lost it, which the reconciler
    /// restores from MySQL).
    async fn not_in_redis(&self, sku: &SkuId) -> Error {
        match db::sku_record(&self.db, sku).await {
            Ok(Some(record))
                if record
                    .definition
                    .ends_at_ms
                    .is_some_and(|end| end <= crate::explore::host_clock_ms()) =>
            {
                Error::Refused(Refusal::Ended)
            }
            Ok(_) => Error::Refused(Refusal::NotFound),
            Err(e) => e,
        }
    }

    /// MySQL commits first, Redis applies after: Redis never sells under terms MySQL
    /// did not record. Under a per-SKU MySQL lock (held across both steps, so two admin
    /// writes of one SKU reach Redis in the order they committed): the definition is
    /// written, Redis checks it would take it (holds past their deadline do not count),
    /// MySQL commits, then Redis applies it. Should Redis refuse at that point (holds
    /// grew meanwhile) the previous definition is written back; should Redis be
    /// unreachable, MySQL has the new terms and the reconciler (or a retried PUT)
    /// applies them.
    pub async fn define_sku(&self, sku: &SkuId, definition: &SkuDefinition) -> Result<Sku> {
        let mut conn = self.db.acquire().await?;
        conn.close_on_drop();
        db::SkuLock::acquire(&mut conn, sku).await?;
        let applied = self.define_sku_locked(&mut conn, sku, definition).await;
        db::SkuLock::release(&mut conn, sku).await?;
        let loaded = applied?;
        self.sold_out.lower(sku);
        telemetry::available_stock(sku.as_str(), loaded.available);
        Ok(loaded)
    }

    /// A page of SKUs, oldest definition first, each with its view (from Redis, or
    /// MySQL's record for one retired) and its state; and the cursor of the next page.
    pub async fn list_skus(
        &self,
        state: Option<db::SkuState>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<(Sku, db::SkuState)>, Option<u64>)> {
        let now_ms = crate::explore::host_clock_ms();
        let page = db::list_skus(&self.db, state, after, now_ms, limit).await?;
        let next = (page.len() == limit as usize)
            .then(|| page.last().map(|(seq, _, _)| *seq))
            .flatten();
        // A few at a time: a page of 1000 must not take every pooled connection.
        let mut items = Vec::with_capacity(page.len());
        for chunk in page.chunks(limits::LISTING_CONCURRENCY) {
            let views = chunk.iter().map(|(_, sku, record)| async move {
                let view = match self.sku(sku).await {
                    Ok(view) => view,
                    // One SKU Redis cannot show (unreachable, or its keys broken) is
                    // listed from MySQL's record rather than failing the page.
                    Err(e) => {
                        tracing::warn!(%sku, error = %e, "SKU listed from MySQL's record");
                        record_view(sku, record)
                    }
                };
                (view, db::SkuState::of(&record.definition, now_ms))
            });
            items.extend(futures::future::join_all(views).await);
        }
        Ok((items, next))
    }

    /// When the SKU's sale starts, as Redis sells it (bucket 0's terms are every
    /// bucket's); None without a start or a sale.
    pub async fn starts_at(&self, sku: &SkuId) -> Result<Option<i64>> {
        self.store.starts_at(sku).await
    }

    /// Pauses (or resumes) a SKU's sale: reserves answer `paused` while everything else
    /// goes on. Idempotent. MySQL first (a rebuild from MySQL keeps it), then every
    /// sale of the SKU in Redis (a bucket Redis lost gets it with its rebuild; one
    /// retired has nothing to sell), under the SKU's admin lock.
    pub async fn set_paused(&self, sku: &SkuId, paused: bool) -> Result<Sku> {
        let mut conn = self.db.acquire().await?;
        conn.close_on_drop();
        db::SkuLock::acquire(&mut conn, sku).await?;
        let applied = self.set_paused_locked(&mut conn, sku, paused).await;
        db::SkuLock::release(&mut conn, sku).await?;
        applied?;
        if !paused {
            self.sold_out.lower(sku);
        }
        self.sku(sku).await
    }

    async fn set_paused_locked(
        &self,
        conn: &mut sqlx::MySqlConnection,
        sku: &SkuId,
        paused: bool,
    ) -> Result<()> {
        let record = db::sku_record_in(&mut *conn, sku)
            .await?
            .ok_or(Error::Refused(Refusal::NotFound))?;
        db::set_paused(&mut *conn, sku, paused).await?;
        let definition = SkuDefinition {
            paused,
            ..record.definition
        };
        let unchanged = BucketStock {
            if_new: None,
            change: Some(0),
            after_restore: false,
        };
        for sale in buckets::sales(sku, definition.buckets) {
            if !self.store.sale_is_live(&sale).await? {
                continue;
            }
            match self
                .store
                .load_bucket(&sale, &definition, &unchanged, 0)
                .await
            {
                // Lost since the look: its rebuild takes the pause from MySQL.
                Ok(_) | Err(Error::Unavailable { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn define_sku_locked(
        &self,
        conn: &mut sqlx::MySqlConnection,
        sku: &SkuId,
        definition: &SkuDefinition,
    ) -> Result<Sku> {
        // A plain read: the named lock keeps other admin writes of the SKU out, and a
        // locking read of a row not there yet would take gap locks that deadlock
        // concurrent inserts of other new SKUs.
        let previous = db::sku_record_in(&mut *conn, sku).await?;
        let layout = Layout {
            buckets: definition.buckets,
            homes: definition.homes(),
        };
        let was = match &previous {
            Some(p) => Some(Layout {
                buckets: p.definition.buckets,
                homes: p.definition.homes(),
            }),
            // MySQL lost the row (a restore, a failover that lost the commit) while
            // Redis kept the sale: its layout is the one the buyers live in.
            None => self.store.layout(sku).await?,
        };
        if was.is_some_and(|was| was != layout) {
            return Err(Error::Refused(Refusal::BucketsChanged));
        }
        // A PUT keeps the SKU's pause: only pause and resume change it.
        let definition = &SkuDefinition {
            paused: previous.as_ref().is_some_and(|p| p.definition.paused),
            ..definition.clone()
        };
        if definition.buckets > 1 {
            return self
                .define_buckets_locked(conn, sku, definition, previous)
                .await;
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let sold_in_mysql = db::upsert_sku(&mut tx, sku, definition).await?;
        // Redis checks its own sold, which a rollback may have taken below MySQL's.
        if definition.stock_total < sold_in_mysql {
            return Err(Error::Refused(Refusal::StockBelowCommitted));
        }
        self.store.check_sku(sku, definition, sold_in_mysql).await?;
        tx.commit().await?;
        // Loaded with the SKU's row locked again: a flush that read a batch before Redis
        // lost the sale holds that lock until it commits (db::begin_flush), so a sale
        // rebuilt here counts the units that batch sold; a flush that reads later waits
        // for the load. (With the upsert's `sold`, read before such a flush committed,
        // the rebuilt sale would sell a unit MySQL records as sold.)
        let (mut locked, sold_in_mysql) = db::lock_sku_sold(&mut *conn, sku).await?;
        let loaded = self
            .load_locked(&mut locked, sku, definition, sold_in_mysql)
            .await;
        locked.commit().await?;
        match loaded {
            Err(refused @ Error::Refused(_)) => {
                db::restore_sku(&mut *conn, sku, previous.as_ref()).await?;
                Err(refused)
            }
            other => other,
        }
    }

    /// Loads a SKU's definition into Redis; `locked` holds the SKU's row
    /// (db::lock_sku_sold), and `sold_in_mysql` was read under it.
    async fn load_locked(
        &self,
        locked: &mut sqlx::MySqlConnection,
        sku: &SkuId,
        definition: &SkuDefinition,
        sold_in_mysql: u64,
    ) -> Result<Sku> {
        // Redis lost this SKU (a wipe before any reconcile) or retired it: its buyers'
        // limits must still count what they bought, and their keys replay what MySQL
        // records. Restored before the load, so no reserve finds the SKU without them.
        let mut usage = None;
        if !self.store.sale_is_live(sku).await? {
            let recorded = db::recorded_usage(&mut *locked, sku).await?;
            self.store
                .restore_usage(sku, &recorded.bought, &recorded.claims)
                .await?;
            usage = Some(recorded);
        }
        // A sale this creates or reopens must have the usage restored above, still: one
        // live at the look but lost since was not restored for, and is refused too (the
        // PUT answers 503; a retry restores it).
        let stock = BucketStock {
            after_restore: true,
            ..BucketStock::whole(definition)
        };
        let how = self
            .store
            .load_bucket(sku, definition, &stock, sold_in_mysql)
            .await?;
        let loaded = self.store.sku(sku).await?;
        if how != Loaded::Updated {
            // Again after the load: the sale's claims_until, and whatever a loss
            // between the check and the load took.
            let recorded = match usage {
                Some(recorded) => recorded,
                None => db::recorded_usage(&mut *locked, sku).await?,
            };
            self.store
                .restore_usage(sku, &recorded.bought, &recorded.claims)
                .await?;
            let announced = db::announced_sold_out_in(&mut *locked, sku.as_str()).await?;
            self.store
                .restore_announced(sku, announced == Some(true))
                .await?;
        }
        Ok(loaded)
    }

    /// `define_sku_locked` for a SKU split over buckets. Each bucket is loaded with the
    /// same terms; the stock goes as a change, never as a total (transfers move stock
    /// between buckets at any time): a new SKU's stock is split evenly; later, the
    /// change is the new stock less what the buckets hold now (Σ stock_total + in
    /// transit, read while no transfer ran), so a change that stopped half-way is
    /// completed by the same PUT again; more goes to bucket 0 (transfers carry it on),
    /// less is taken from the buckets with the most available. Buckets Redis lost are
    /// rebuilt first, together (reconcile::rebuild_lost_buckets), also those of a sale
    /// that ended (the PUT may reopen it, and plans its change on every bucket's stock).
    async fn define_buckets_locked(
        &self,
        conn: &mut sqlx::MySqlConnection,
        sku: &SkuId,
        definition: &SkuDefinition,
        previous: Option<db::SkuRecord>,
    ) -> Result<Sku> {
        let k = definition.buckets;
        if previous.is_some() {
            crate::reconcile::rebuild_lost_buckets(&self.store, &mut *conn, sku, k, true).await?;
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let sales = buckets::sales(sku, k);
        let sold_in_mysql = db::upsert_sku(&mut tx, sku, definition).await?;
        if definition.stock_total < sold_in_mysql {
            return Err(Error::Refused(Refusal::StockBelowCommitted));
        }
        let sold: HashMap<String, u64> = db::sold_per_bucket(&mut tx, sku)
            .await?
            .into_iter()
            .collect();
        let sold: Vec<u64> = sales
            .iter()
            .map(|s| sold.get(s.as_str()).copied().unwrap_or(0))
            .collect();
        let fresh = buckets::split_for(
            definition.stock_total - sold.iter().sum::<u64>(),
            k,
            definition.homes(),
        );
        let changes = match &previous {
            None => vec![0; k as usize],
            Some(_) => {
                // What the buckets hold, and what those without state will get.
                let now = self.store.split_stock_still(&sales).await?;
                let held: u64 = (0..k as usize)
                    .map(|b| now.stock_total[b].unwrap_or(sold[b] + fresh[b]))
                    .sum::<u64>()
                    + now.in_transit;
                stock_changes(definition.stock_total as i64 - held as i64, &now.available)
                    .ok_or(Error::Refused(Refusal::StockBelowCommitted))?
            }
        };
        let plan: Vec<BucketStock> = (0..k as usize)
            .map(|b| BucketStock {
                // An existing SKU's buckets all have state (lost ones were rebuilt
                // above); one lost since is not recreated from this plan.
                if_new: previous.is_none().then_some(sold[b] + fresh[b]),
                change: Some(changes[b]),
                // A bucket this creates or reopens must have the usage restored below.
                after_restore: true,
            })
            .collect();
        for (b, sale) in sales.iter().enumerate() {
            self.store
                .check_bucket(sale, definition, &plan[b], sold[b])
                .await?;
        }
        tx.commit().await?;
        // Buckets Redis does not have live (a new SKU, or one retired) get their buyers'
        // usage before their load, as in define_sku_locked.
        let mut recorded = None;
        for (b, sale) in sales.iter().enumerate() {
            if !self.store.sale_is_live(sale).await? {
                if recorded.is_none() {
                    recorded = Some(db::recorded_usage_locked(&mut *conn, sku).await?);
                }
                let usage = recorded.as_ref().expect("read above");
                let bought = buckets::home_users(sku, &usage.bought, definition.homes(), b as u32);
                self.store
                    .restore_usage(sale, &bought, &usage.claims)
                    .await?;
            }
        }
        let mut usage_gone = false;
        for (b, sale) in sales.iter().enumerate() {
            match self
                .store
                .load_bucket(sale, definition, &plan[b], sold[b])
                .await
            {
                Ok(Loaded::Created | Loaded::Reopened) => usage_gone = true,
                Ok(Loaded::Updated) => {}
                Err(refused @ Error::Refused(_)) => {
                    // Reserves took the stock a decrease counted on: the buckets done
                    // get their stock and terms back, then MySQL its definition.
                    if let Some(p) = &previous {
                        for (done, sale) in sales.iter().enumerate().take(b) {
                            let back = BucketStock {
                                if_new: None,
                                change: Some(-changes[done]),
                                after_restore: false,
                            };
                            match self
                                .store
                                .load_bucket(sale, &p.definition, &back, sold[done])
                                .await
                            {
                                // Lost since (or the call's outcome unknown): MySQL's
                                // definition goes back all the same; the joint rebuild
                                // or the stock repair (reconcile) make the buckets add
                                // up to it.
                                Ok(_) | Err(Error::Unavailable { .. }) => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    db::restore_sku(&mut *conn, sku, previous.as_ref()).await?;
                    return Err(refused);
                }
                Err(e) => return Err(e),
            }
        }
        if usage_gone {
            // Its buyers' limits must still count what they bought, in their home
            // bucket; their keys replay what MySQL records (and claims_until is kept).
            let usage = match recorded {
                Some(usage) => usage,
                None => db::recorded_usage_locked(&mut *conn, sku).await?,
            };
            for (b, sale) in sales.iter().enumerate() {
                let bought = buckets::home_users(sku, &usage.bought, definition.homes(), b as u32);
                self.store
                    .restore_usage(sale, &bought, &usage.claims)
                    .await?;
            }
        }
        self.sale_views(sku).await
    }

    /// Oldest first: MySQL's record, merged with the compensations still waiting in
    /// Redis for the flush (so one handed out a moment ago is listed at once, also
    /// while MySQL is down).
    /// Oldest first (created_at, then id), after `after` (the last of a page: the
    /// cursor `next` of `GET /v1/compensations`).
    pub async fn compensations(
        &self,
        resolved: Option<bool>,
        sku: Option<&SkuId>,
        after: Option<&(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Compensation>> {
        let recorded = db::list_compensations(&self.db, resolved, sku, after, limit).await;
        let pending = self.store.pending_compensations().await;
        let (recorded, pending) = match (recorded, pending) {
            (Err(e), Err(_)) => return Err(e),
            (Err(e), Ok(_)) if !matches!(e, Error::Unavailable { .. }) => return Err(e),
            (recorded, pending) => (recorded.unwrap_or_default(), pending.unwrap_or_default()),
        };
        let mut merged: std::collections::HashMap<String, Compensation> =
            recorded.into_iter().map(|c| (c.id.clone(), c)).collect();
        for c in pending {
            merged
                .entry(c.id.clone())
                .and_modify(|m| {
                    if c.resolved && !m.resolved {
                        m.resolved = true;
                        m.resolution = c.resolution.clone();
                    }
                })
                .or_insert(c);
        }
        let mut items: Vec<Compensation> = merged
            .into_values()
            .filter(|c| resolved.is_none_or(|r| c.resolved == r))
            .filter(|c| sku.is_none_or(|s| c.sku == s.as_str()))
            .filter(|c| after.is_none_or(|(at, id)| (c.created_at_ms, &c.id) > (*at, id)))
            .collect();
        items.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        items.truncate(limit as usize);
        Ok(items)
    }

    /// Creates or replaces a webhook endpoint: (created, the endpoint as recorded).
    pub async fn put_webhook(
        &self,
        endpoint: &db::webhooks::Endpoint,
    ) -> Result<(bool, db::webhooks::Endpoint)> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let written = db::webhooks::put(&self.db, endpoint, now_ms).await?;
        // Answered only once no request under the former URL or secret is in flight:
        // after the answer, every request goes to the new URL, signed with the new
        // secret (contract; see webhooks::wait_out for the bound).
        crate::webhooks::wait_out(&self.db, &endpoint.name, &written.in_flight).await?;
        let created = written.created;
        let recorded = db::webhooks::get(&self.db, &endpoint.name)
            .await?
            .ok_or_else(|| crate::error::Error::Internal("webhook gone after its write".into()))?;
        tracing::info!(webhook = %endpoint.name, url = %crate::webhooks::redacted_url(&endpoint.url),
            created, "webhook endpoint written");
        Ok((created, recorded))
    }

    pub async fn webhooks(&self) -> Result<Vec<db::webhooks::Endpoint>> {
        db::webhooks::list(&self.db).await
    }

    pub async fn webhook(&self, name: &str) -> Result<Option<db::webhooks::Endpoint>> {
        db::webhooks::get(&self.db, name).await
    }

    pub async fn delete_webhook(&self, name: &str) -> Result<bool> {
        let deleted = db::webhooks::delete(&self.db, name).await?;
        // This process's series of it go now; a worker elsewhere drops its own at its
        // next refresh of the endpoints (webhooks::Deliverer::run).
        crate::telemetry::forget_webhook(name);
        Ok(deleted)
    }

    pub async fn webhook_deliveries(
        &self,
        name: &str,
        status: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<db::webhooks::Delivery>> {
        db::webhooks::deliveries(&self.db, name, status, after, limit).await
    }

    pub async fn replay_webhook(
        &self,
        endpoint: &db::webhooks::Endpoint,
        after: u64,
    ) -> Result<u64> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        db::webhooks::replay(&self.db, endpoint, after, now_ms).await
    }

    /// The event feed: a page, oldest first, from MySQL (src/events.rs), and the cursor
    /// after it. A page that is not full moves the cursor up to the last position
    /// committed before it was read, matched or not: a poller filtering by type or SKU
    /// never reads again what it has passed. Safe because positions commit in order
    /// (migrations/0007): every event at or below that position was visible to the page.
    pub async fn events(
        &self,
        filter: &db::events::Filter,
        limit: u32,
    ) -> Result<(Vec<crate::events::Event>, u64)> {
        let committed = {
            let mut conn = self.db.acquire().await?;
            db::events::last_position(&mut conn).await?
        };
        let page = db::events::list(&self.db, filter, limit).await?;
        let last = page.last().map_or(filter.after, |e| e.position);
        let next = if page.len() < limit as usize {
            last.max(committed).max(filter.after)
        } else {
            last
        };
        Ok((page, next))
    }

    /// From MySQL, or from Redis while the flush has not written it yet.
    pub async fn compensation(&self, id: &str) -> Result<Compensation> {
        let recorded = db::compensation(&self.db, id).await;
        let pending = self.store.pending_compensation(id).await?;
        match (recorded, pending) {
            (Ok(Some(mut c)), Some(p)) => {
                if p.resolved && !c.resolved {
                    c.resolved = true;
                    c.resolution = p.resolution;
                }
                Ok(c)
            }
            (Ok(Some(c)), None) | (_, Some(c)) => Ok(c),
            (Ok(None), None) => Err(Error::Refused(Refusal::NotFound)),
            (Err(e), None) => Err(e),
        }
    }

    /// Idempotent. In MySQL when it has the compensation; else in Redis, from where the
    /// flush applies it after writing the compensation.
    pub async fn resolve_compensation(
        &self,
        id: &str,
        resolution: &Resolution,
    ) -> Result<Compensation> {
        let recorded = db::resolve_compensation(&self.db, id, resolution).await;
        if let Ok(Some(c)) = recorded {
            return Ok(c);
        }
        match self
            .store
            .resolve_pending_compensation(id, resolution)
            .await?
        {
            Some(c) => Ok(c),
            None => match recorded {
                Err(e) => Err(e),
                _ => Err(Error::Refused(Refusal::NotFound)),
            },
        }
    }
}

/// A SKU's view from MySQL's record alone: nothing held (a retired SKU has no holds).
fn record_view(sku: &SkuId, record: &db::SkuRecord) -> Sku {
    let d = &record.definition;
    Sku {
        sku: sku.to_string(),
        stock_total: d.stock_total,
        available: d.stock_total.saturating_sub(record.sold),
        held: 0,
        sold: record.sold,
        per_user_limit: d.per_user_limit,
        hold_seconds: d.hold_seconds,
        starts_at_ms: d.starts_at_ms,
        ends_at_ms: d.ends_at_ms,
        paused: d.paused,
        waiting_room: d.waiting_room,
    }
}

/// What MySQL knows of a reservation Redis does not have.
enum Recorded {
    Reservation(Reservation),
    /// Issued by this deployment (its MAC holds) and recorded nowhere: Redis lost the
    /// hold before anything about it reached MySQL.
    Lost,
}

/// How a change of a split SKU's stock is spread over its buckets: an increase goes
/// to bucket 0; a decrease comes from the buckets with the most available. None when
/// the buckets together have less available than the decrease.
pub(crate) fn stock_changes(change: i64, available: &[u64]) -> Option<Vec<i64>> {
    let mut changes = vec![0i64; available.len()];
    if change >= 0 {
        changes[0] = change;
        return Some(changes);
    }
    let mut left = change.unsigned_abs();
    let mut richest: Vec<usize> = (0..available.len()).collect();
    richest.sort_by_key(|&b| std::cmp::Reverse(available[b]));
    for b in richest {
        let taken = left.min(available[b]);
        changes[b] = -(taken as i64);
        left -= taken;
    }
    (left == 0).then_some(changes)
}

/// Another user's reservation is not found, exactly like a missing one.
fn owned_by(r: Reservation, caller: &Caller) -> Result<Reservation> {
    match caller.user_id() {
        Some(user) if user != r.user_id => Err(Error::Refused(Refusal::NotFound)),
        _ => Ok(r),
    }
}
