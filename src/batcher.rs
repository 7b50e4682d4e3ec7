//! Per-SKU micro-batching. The first request of an idle SKU runs at once (no added
//! latency); requests that arrive while BATCHES_IN_FLIGHT calls of that SKU are running
//! wait and go together in the next call. No task outlives the work: a SKU's queue is
//! dropped as soon as it is empty.
//!
//! Four kinds of work use it: reserves (one `reserve_batch.lua` call decides a batch in
//! order, exactly as single calls would); while a SKU's sold-out flag is up, the
//! idempotency probes that tell a replay from a refusal (one script call per batch);
//! for a split SKU, the reads of its buckets and moves of stock for reserves that
//! found their home bucket short; and the joins and polls of a waiting room (one
//! `queue.lua` call per batch).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::keys::SkuKeys;
use crate::limits::{BATCHES_IN_FLIGHT, BATCH_MAX};
use crate::reservation::Refusal;
use crate::store::{
    BucketState, Give, QueueRequest, ReserveOutcome, ReserveRequest, ReserveSettings, Store, Taken,
};

/// What one batch call does: one outcome per request, in order.
pub trait BatchWork: Send + Sync + 'static {
    type Request: Send + 'static;
    type Outcome: Send + 'static;
    fn run(
        &self,
        sku: &SkuId,
        requests: Vec<Self::Request>,
    ) -> impl Future<Output = Vec<Result<Self::Outcome>>> + Send;
}

struct Waiting<W: BatchWork> {
    request: W::Request,
    reply: oneshot::Sender<Result<W::Outcome>>,
}

struct Queue<W: BatchWork> {
    waiting: Vec<Waiting<W>>,
    /// Runner tasks of this SKU; each runs one call at a time.
    runners: usize,
}

pub struct Batcher<W: BatchWork> {
    work: W,
    queues: Mutex<HashMap<SkuId, Queue<W>>>,
    /// Calls of one SKU running at once at most.
    in_flight: usize,
    /// Requests decided in one call at most.
    batch_max: usize,
}

impl<W: BatchWork> Batcher<W> {
    pub fn new(work: W) -> Batcher<W> {
        Batcher {
            work,
            queues: Mutex::new(HashMap::new()),
            in_flight: BATCHES_IN_FLIGHT,
            batch_max: BATCH_MAX,
        }
    }

    /// A batcher that runs one call of a SKU at a time, each call seeing what the one
    /// before it did, with up to `batch_max` requests (BucketMoves).
    pub fn one_at_a_time(work: W, batch_max: usize) -> Batcher<W> {
        Batcher {
            in_flight: 1,
            batch_max,
            ..Batcher::new(work)
        }
    }

    pub async fn submit(self: &Arc<Self>, sku: &SkuId, request: W::Request) -> Result<W::Outcome> {
        self.submit_sharing(sku, request, 1).await
    }

    /// `submit` for one of `shares` sales that split one SKU's traffic (the buckets of
    /// a split SKU): each runs at most `in_flight` / shares calls at once (at least
    /// one), so the SKU as a whole keeps about the calls in flight, and the batch sizes,
    /// of an unsplit one.
    pub async fn submit_sharing(
        self: &Arc<Self>,
        sku: &SkuId,
        request: W::Request,
        shares: u32,
    ) -> Result<W::Outcome> {
        let in_flight = (self.in_flight / shares.max(1) as usize).max(1);
        let (reply, answer) = oneshot::channel();
        let start_runner = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues.entry(sku.clone()).or_insert_with(|| Queue {
                waiting: Vec::new(),
                runners: 0,
            });
            queue.waiting.push(Waiting { request, reply });
            let start = queue.runners < in_flight;
            if start {
                queue.runners += 1;
            }
            start
        };
        if start_runner {
            // A task, not this request: it keeps serving the queue after our answer,
            // and a client that hangs up does not stop it.
            tokio::spawn(crate::explore::inherit(self.clone().run(sku.clone())));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::Internal("batch runner stopped".into())))
    }

    /// Takes batches off the SKU's queue until it is empty.
    async fn run(self: Arc<Self>, sku: SkuId) {
        loop {
            let batch: Vec<Waiting<W>> = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&sku) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.runners -= 1;
                    if queue.runners == 0 {
                        queues.remove(&sku);
                    }
                    return;
                }
                let take = queue.waiting.len().min(self.batch_max);
                queue.waiting.drain(..take).collect()
            };
            let (requests, replies): (Vec<W::Request>, Vec<_>) =
                batch.into_iter().map(|w| (w.request, w.reply)).unzip();
            let outcomes = self.work.run(&sku, requests).await;
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
    }
}

/// Reserves: a batch of one runs `reserve.lua`, more run `reserve_batch.lua`.
pub struct Reserves {
    pub store: Store,
    pub keys_ttl: ReserveSettings,
}

impl BatchWork for Reserves {
    type Request = ReserveRequest;
    type Outcome = ReserveOutcome;

    async fn run(&self, sku: &SkuId, requests: Vec<ReserveRequest>) -> Vec<Result<ReserveOutcome>> {
        if let [request] = requests.as_slice() {
            return vec![self.store.reserve(sku, request, self.keys_ttl).await];
        }
        match self.store.reserve_many(sku, &requests, self.keys_ttl).await {
            Ok(outcomes) => outcomes,
            Err(e) => requests.iter().map(|_| Err(e.duplicate())).collect(),
        }
    }
}

/// Idempotency probes: (user id, key) → whether that key created a hold.
pub struct IdempotencyProbes {
    pub store: Store,
}

impl BatchWork for IdempotencyProbes {
    type Request = (String, String);
    type Outcome = bool;

    async fn run(&self, sku: &SkuId, requests: Vec<(String, String)>) -> Vec<Result<bool>> {
        match self.store.idempotency_keys_exist(sku, &requests).await {
            Ok(found) => found.into_iter().map(Ok).collect(),
            Err(e) => requests.iter().map(|_| Err(e.duplicate())).collect(),
        }
    }
}

/// Joins and ticket reads of a waiting room: a batch is one `queue.lua` call that takes
/// them in order and admits once (lua/queue.lua 'batch'); each reply is the one a call
/// of its own would have got then. A burst of joins costs a few calls, not one each.
pub struct QueueReads {
    pub store: Store,
}

impl BatchWork for QueueReads {
    type Request = QueueRequest;
    type Outcome = Vec<String>;

    async fn run(&self, sku: &SkuId, requests: Vec<QueueRequest>) -> Vec<Result<Vec<String>>> {
        match self.store.queue_batch(sku, &requests).await {
            Ok(replies) => replies.into_iter().map(Ok).collect(),
            Err(e) => requests.iter().map(|_| Err(e.duplicate())).collect(),
        }
    }
}

/// Reserves of a split SKU whose home bucket was short (src/buckets.rs), with the stock
/// they need moved to their home buckets: every such reserve waiting shares the next
/// batch, which reads the buckets once (one script call each, lua/bucket_stock.lua),
/// adds up what each home bucket lacks for the reserves waiting on it (in arrival
/// order, those the buckets together can serve), takes that (or half a donor's spare
/// stock, if more) from the buckets with the most to spare, one take per (donor,
/// receiver), and runs each home bucket's reserves together with the gives of what was
/// taken for them, in one atomic call (lua/reserve_moved.lua): moved units go to the
/// reserves that asked for them, never to another reserve in between. A burst of
/// reserves on empty buckets makes a few transfers, not one race per request.
///
/// Batches of one SKU run one at a time, so that each knows what the one before did.
/// `sold_out` is decided here when the read was *settled*: it saw nothing in transit,
/// and neither did the SKU's read before it, whose `moves` (plus those of the previous
/// batch's own transfers, finished and their records dropped before this read) it
/// matches in every bucket. The buckets are read one by one: units hide from a read
/// only in a transfer taken before the donor's read and given after the receiver's.
/// Such a transfer, if not the previous batch's own, was in transit at the read
/// before if it was taken before that read's donor read, or changed `moves` beyond
/// the expected if taken after: settled reads miss no unit. A reserve the batch
/// serves nothing to is then `sold_out` when what the read found, less what the batch
/// sold, is below its quantity: stock only leaves meanwhile, except for units
/// returned since, which count as after it (as with one bucket).
pub struct BucketMoves {
    pub store: Store,
    pub keys_ttl: ReserveSettings,
    /// Per split SKU: what its last batch read and did (capped at LAST_READS_MAX SKUs).
    last_batches: Mutex<HashMap<SkuId, LastBatch>>,
}

/// SKUs whose last batch BucketMoves remembers; past it the memory starts over (a
/// forgotten batch costs one more read, nothing else).
const LAST_READS_MAX: usize = 65_536;
/// A remembered batch older than this is not compared with (a bucket retired and
/// remade since would count its transfers anew).
const LAST_READ_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// What a SKU's last batch of moves left behind.
#[derive(Default)]
struct LastBatch {
    /// The buckets as the batch read them, their `moves` advanced by the batch's own
    /// transfers; None when what it did is not known exactly (a call failed).
    expected: Option<(Vec<BucketState>, std::time::Instant)>,
    /// The dropping of its transfers' records, awaited before the next read.
    drops: Vec<tokio::task::JoinHandle<()>>,
}

impl BucketMoves {
    pub fn new(store: Store, keys_ttl: ReserveSettings) -> BucketMoves {
        BucketMoves {
            store,
            keys_ttl,
            last_batches: Mutex::new(HashMap::new()),
        }
    }
}

/// A reserve whose home bucket was short: the SKU's bucket count, its home bucket, and
/// the reserve itself.
pub struct MoveRequest {
    pub buckets: u32,
    pub home: u32,
    pub reserve: ReserveRequest,
}

/// What one reserve got from a batch of moves.
#[derive(Debug)]
pub enum Moved {
    /// Its answer: served (or refused) in its home bucket, or `sold_out` on a settled
    /// read.
    Answered(Result<ReserveOutcome>),
    /// Not served, and no settled `sold_out`: the reserve needs another batch.
    Again {
        /// The buckets together had less than its quantity.
        short: bool,
        /// Some transfer was not finished (its units may land).
        in_transit: bool,
    },
}

impl BatchWork for BucketMoves {
    type Request = MoveRequest;
    type Outcome = Moved;

    async fn run(&self, sku: &SkuId, requests: Vec<MoveRequest>) -> Vec<Result<Moved>> {
        let buckets = requests.first().map_or(1, |r| r.buckets);
        let sales = crate::buckets::sales(sku, buckets);
        let before = self.previous_batch(sku).await;
        let stock = match self.store.bucket_stock(&sales).await {
            Ok(stock) => stock,
            Err(e) => {
                self.remember(sku, None, Vec::new());
                return requests.iter().map(|_| Err(e.duplicate())).collect();
            }
        };
        let in_transit = stock.iter().any(|b| b.transfers > 0);
        let settled = !in_transit
            && before.is_some_and(|before| {
                before.len() == stock.len()
                    && before
                        .iter()
                        .zip(&stock)
                        .all(|(b, s)| b.transfers == 0 && b.moves == s.moves)
            });
        let available: Vec<u64> = stock.iter().map(|b| b.available).collect();
        let total: u64 = available.iter().sum();
        let done = self.move_and_reserve(&sales, &available, &requests).await;
        let expected = done.moves.map(|moves| {
            stock
                .iter()
                .zip(moves)
                .map(|(read, own)| BucketState {
                    moves: read.moves + own,
                    ..*read
                })
                .collect()
        });
        self.remember(sku, expected, done.drops);
        let sold: u64 = done
            .outcomes
            .iter()
            .zip(&requests)
            .filter(|(o, _)| matches!(o, Some(Ok(ReserveOutcome::Created(_)))))
            .map(|(_, r)| r.reserve.quantity)
            .sum();
        let left = total.saturating_sub(sold);
        done.outcomes
            .into_iter()
            .zip(&requests)
            .map(|(outcome, request)| {
                let quantity = request.reserve.quantity;
                Ok(match outcome {
                    Some(Err(Error::Refused(Refusal::SoldOut))) | None => {
                        if settled && left < quantity {
                            Moved::Answered(Err(Error::Refused(Refusal::SoldOut)))
                        } else {
                            Moved::Again {
                                short: total < quantity,
                                in_transit,
                            }
                        }
                    }
                    Some(outcome) => Moved::Answered(outcome),
                })
            })
            .collect()
    }
}

/// What `move_and_reserve` did.
struct MovesDone {
    /// Per request: its outcome, or None when not tried (what the read found was
    /// planned for the reserves ahead of it).
    outcomes: Vec<Option<Result<ReserveOutcome>>>,
    /// Per bucket, how much its `moves` grew by this batch's transfers; None when not
    /// known exactly (a call failed: it may or may not have run).
    moves: Option<Vec<u64>>,
    /// The dropping of the records of the transfers given.
    drops: Vec<tokio::task::JoinHandle<()>>,
}

impl BucketMoves {
    /// What the SKU's previous batch expected the buckets' moves to be, once the
    /// dropping of its transfers' records has finished.
    async fn previous_batch(&self, sku: &SkuId) -> Option<Vec<BucketState>> {
        let (expected, drops) = {
            let mut last = self.last_batches.lock().unwrap_or_else(|e| e.into_inner());
            let entry = last.entry(sku.clone()).or_default();
            (entry.expected.take(), std::mem::take(&mut entry.drops))
        };
        for drop in drops {
            let _ = drop.await;
        }
        expected
            .filter(|(_, at)| at.elapsed() < LAST_READ_FRESH)
            .map(|(stock, _)| stock)
    }

    fn remember(
        &self,
        sku: &SkuId,
        expected: Option<Vec<BucketState>>,
        drops: Vec<tokio::task::JoinHandle<()>>,
    ) {
        let mut last = self.last_batches.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= LAST_READS_MAX && !last.contains_key(sku) {
            last.clear();
        }
        last.insert(
            sku.clone(),
            LastBatch {
                expected: expected.map(|e| (e, std::time::Instant::now())),
                drops,
            },
        );
    }

    /// Takes what the home buckets lack from the others and runs every home bucket's
    /// reserves with the gives of their units (lua/reserve_moved.lua).
    async fn move_and_reserve(
        &self,
        sales: &[SkuId],
        available: &[u64],
        requests: &[MoveRequest],
    ) -> MovesDone {
        let total: u64 = available.iter().sum();
        // In arrival order, as one bucket would serve them.
        let mut wanted = vec![0u64; sales.len()];
        let mut planned = vec![false; requests.len()];
        let mut units_planned = 0u64;
        for (i, request) in requests.iter().enumerate() {
            let quantity = request.reserve.quantity;
            if units_planned + quantity <= total {
                units_planned += quantity;
                wanted[request.home as usize] += quantity;
                planned[i] = true;
            }
        }
        let keys: Vec<SkuKeys> = sales.iter().map(SkuKeys::new).collect();
        let keys = &keys;
        let takes =
            plan_moves(available, &wanted)
                .into_iter()
                .map(|(donor, receiver, units)| async move {
                    let taken = self.store.take(&keys[donor], &keys[receiver], units).await;
                    (donor, receiver, taken)
                });
        let mut moves = Some(vec![0u64; sales.len()]);
        let mut gives: Vec<Vec<Taken>> = vec![Vec::new(); sales.len()];
        for (donor, receiver, taken) in futures::future::join_all(takes).await {
            match taken {
                Ok(Some(taken)) => {
                    crate::telemetry::bucket_transfer(taken.units);
                    if let Some(moves) = &mut moves {
                        moves[donor] += 1;
                    }
                    gives[receiver].push(taken);
                }
                Ok(None) => {}
                // It may have taken: the reserves' next batch reads again.
                Err(_) => moves = None,
            }
        }
        // Every home bucket with a reserve planned: those reserves (in arrival order)
        // with the units taken for them. (The others wait for the next batch: what the
        // read found is planned for the reserves ahead of them.)
        let mut outcomes: Vec<Option<Result<ReserveOutcome>>> =
            requests.iter().map(|_| None).collect();
        let calls = (0..sales.len()).filter_map(|bucket| {
            let homed: Vec<usize> = (0..requests.len())
                .filter(|&i| planned[i] && requests[i].home as usize == bucket)
                .collect();
            if homed.is_empty() {
                return None;
            }
            let reserves: Vec<ReserveRequest> =
                homed.iter().map(|&i| requests[i].reserve.clone()).collect();
            let (store, sale, gives) = (&self.store, &sales[bucket], &gives[bucket]);
            Some(async move {
                let replies = store
                    .reserve_moved(sale, gives, &reserves, self.keys_ttl)
                    .await;
                (bucket, homed, replies)
            })
        });
        let mut drops = Vec::new();
        for (bucket, homed, replies) in futures::future::join_all(calls).await {
            match replies {
                Ok((given, replies)) => {
                    for (taken, give) in gives[bucket].iter().zip(given) {
                        if give == Give::Given {
                            if let Some(moves) = &mut moves {
                                moves[bucket] += 1;
                            }
                        }
                        if matches!(give, Give::Given | Give::Already) {
                            let (store, taken, to) =
                                (self.store.clone(), taken.clone(), keys[bucket].clone());
                            drops.push(tokio::spawn(crate::explore::inherit(async move {
                                let _ = store.drop_transfer_records(&taken, &to).await;
                            })));
                        }
                    }
                    for (i, reply) in homed.into_iter().zip(replies) {
                        outcomes[i] = Some(reply);
                    }
                }
                Err(e) => {
                    moves = None;
                    for i in homed {
                        outcomes[i] = Some(Err(e.duplicate()));
                    }
                }
            }
        }
        MovesDone {
            outcomes,
            moves,
            drops,
        }
    }
}

/// Transfers (donor, receiver, units) that give each bucket what it lacks for the
/// units `wanted` of it: from the donors with the most to spare (what they have beyond
/// their own wants), at least the lack, half the donor's spare if that is more.
pub fn plan_moves(available: &[u64], wanted: &[u64]) -> Vec<(usize, usize, u64)> {
    let mut spare: Vec<u64> = available
        .iter()
        .zip(wanted)
        .map(|(a, w)| a.saturating_sub(*w))
        .collect();
    let mut moves = Vec::new();
    for receiver in 0..available.len() {
        let mut lack = wanted[receiver].saturating_sub(available[receiver]);
        while lack > 0 {
            let Some(donor) = (0..spare.len())
                .filter(|&d| d != receiver && spare[d] > 0)
                .max_by_key(|&d| spare[d])
            else {
                break;
            };
            let units = lack.max(spare[donor].div_ceil(2)).min(spare[donor]);
            spare[donor] -= units;
            lack = lack.saturating_sub(units);
            moves.push((donor, receiver, units));
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the calls running at once and the largest batch.
    #[derive(Default)]
    struct Probe {
        running: AtomicUsize,
        most_running: AtomicUsize,
        largest_batch: AtomicUsize,
    }

    impl BatchWork for Arc<Probe> {
        type Request = ();
        type Outcome = ();

        async fn run(&self, _: &SkuId, requests: Vec<()>) -> Vec<Result<()>> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            self.largest_batch
                .fetch_max(requests.len(), Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            requests.iter().map(|_| Ok(())).collect()
        }
    }

    #[tokio::test]
    async fn a_split_skus_buckets_share_the_calls_in_flight_of_one_sku() {
        let sku = SkuId::parse("s").unwrap();
        for (shares, most) in [(1, BATCHES_IN_FLIGHT), (3, 1), (2, BATCHES_IN_FLIGHT / 2)] {
            let probe = Arc::new(Probe::default());
            let batcher = Arc::new(Batcher::new(probe.clone()));
            let calls = (0..200).map(|_| {
                let (batcher, sku) = (batcher.clone(), sku.clone());
                tokio::spawn(async move { batcher.submit_sharing(&sku, (), shares).await })
            });
            for call in futures::future::join_all(calls).await {
                call.unwrap().unwrap();
            }
            assert_eq!(
                probe.most_running.load(Ordering::SeqCst),
                most,
                "{shares} shares"
            );
        }
    }

    #[tokio::test]
    async fn a_one_at_a_time_batcher_runs_one_call_per_sku_with_larger_batches() {
        let sku = SkuId::parse("s").unwrap();
        let probe = Arc::new(Probe::default());
        let batcher = Arc::new(Batcher::one_at_a_time(probe.clone(), 300));
        let calls = (0..1000).map(|_| {
            let (batcher, sku) = (batcher.clone(), sku.clone());
            tokio::spawn(async move { batcher.submit(&sku, ()).await })
        });
        for call in futures::future::join_all(calls).await {
            call.unwrap().unwrap();
        }
        assert_eq!(probe.most_running.load(Ordering::SeqCst), 1);
        let largest = probe.largest_batch.load(Ordering::SeqCst);
        assert!(largest > BATCH_MAX && largest <= 300, "{largest}");
    }

    #[test]
    fn moves_give_each_short_bucket_its_lack_from_the_richest_spare() {
        // Bucket 0 lacks 5; bucket 2 has 10 to spare, bucket 1 wants its own 3.
        assert_eq!(plan_moves(&[0, 3, 10], &[5, 3, 0]), vec![(2, 0, 5)]);
        // Half of a large spare, not just the lack.
        assert_eq!(plan_moves(&[0, 0, 40], &[1, 0, 0]), vec![(2, 0, 20)]);
        // A lack bigger than any one donor: several donors.
        assert_eq!(
            plan_moves(&[0, 2, 3], &[4, 0, 0]),
            vec![(2, 0, 3), (1, 0, 1)]
        );
        // Not enough anywhere: all there is.
        assert_eq!(plan_moves(&[0, 1, 0], &[9, 0, 0]), vec![(1, 0, 1)]);
        // Two short buckets share the one donor.
        assert_eq!(
            plan_moves(&[0, 0, 4], &[2, 2, 0]),
            vec![(2, 0, 2), (2, 1, 2)]
        );
        assert!(plan_moves(&[5, 5], &[1, 1]).is_empty());
    }
}
