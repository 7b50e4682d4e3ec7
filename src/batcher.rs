//! Per-SKU micro-batching. The first request of an idle SKU runs at once (no added
//! latency); requests that arrive while BATCHES_IN_FLIGHT calls of that SKU are running
//! wait and go together in the next call. No task outlives the work: a SKU's queue is
//! dropped as soon as it is empty.
//!
//! Three kinds of work use it: reserves (one `reserve_batch.lua` call decides a batch in
//! order, exactly as single calls would); while a SKU's sold-out flag is up, the
//! idempotency probes that tell a replay from a refusal (one script call per batch);
//! and, for a split SKU, the reads of its buckets and moves of stock for reserves that
//! found their home bucket short.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::limits::{BATCHES_IN_FLIGHT, BATCH_MAX};
use crate::store::{BucketState, ReserveOutcome, ReserveRequest, ReserveSettings, Store};

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
}

impl<W: BatchWork> Batcher<W> {
    pub fn new(work: W) -> Batcher<W> {
        Batcher {
            work,
            queues: Mutex::new(HashMap::new()),
        }
    }

    pub async fn submit(self: &Arc<Self>, sku: &SkuId, request: W::Request) -> Result<W::Outcome> {
        self.submit_sharing(sku, request, 1).await
    }

    /// `submit` for one of `shares` sales that split one SKU's traffic (the buckets of
    /// a split SKU): each runs at most BATCHES_IN_FLIGHT / shares calls at once (at
    /// least one), so the SKU as a whole keeps about the calls in flight, and the batch
    /// sizes, of an unsplit one.
    pub async fn submit_sharing(
        self: &Arc<Self>,
        sku: &SkuId,
        request: W::Request,
        shares: u32,
    ) -> Result<W::Outcome> {
        let in_flight = (BATCHES_IN_FLIGHT / shares.max(1) as usize).max(1);
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
            tokio::spawn(self.clone().run(sku.clone()));
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
                let take = queue.waiting.len().min(BATCH_MAX);
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

/// Stock moves towards the home buckets of reserves that found theirs short (src/buckets.rs):
/// every reserve waiting shares the next batch, which reads the buckets once (one script
/// call each, lua/bucket_stock.lua), adds up what each home bucket lacks for the
/// reserves waiting on it (those the buckets together could serve), and moves that (or
/// half a donor's spare stock, if more) from the buckets with the most to spare, one
/// transfer per (donor, receiver). A burst of reserves on empty buckets makes a few
/// transfers, not one race per request. Request: (bucket count, home bucket,
/// quantity); outcome: the buckets as read before the moves.
pub struct BucketMoves {
    pub store: Store,
}

impl BatchWork for BucketMoves {
    type Request = (u32, u32, u64);
    type Outcome = Vec<BucketState>;

    async fn run(
        &self,
        sku: &SkuId,
        requests: Vec<(u32, u32, u64)>,
    ) -> Vec<Result<Vec<BucketState>>> {
        let buckets = requests.first().map_or(1, |r| r.0);
        let sales = crate::buckets::sales(sku, buckets);
        let read = async {
            let stock = self.store.bucket_stock(&sales).await?;
            let available: Vec<u64> = stock.iter().map(|b| b.available).collect();
            let total: u64 = available.iter().sum();
            let mut wanted = vec![0u64; sales.len()];
            for &(_, home, quantity) in &requests {
                if quantity <= total {
                    wanted[home as usize] += quantity;
                }
            }
            for (donor, receiver, units) in plan_moves(&available, &wanted) {
                let moved = self
                    .store
                    .transfer(
                        &crate::keys::SkuKeys::new(&sales[donor]),
                        &crate::keys::SkuKeys::new(&sales[receiver]),
                        units,
                    )
                    .await?;
                crate::telemetry::bucket_transfer(moved);
            }
            Ok::<_, crate::error::Error>(stock)
        }
        .await;
        match read {
            Ok(stock) => requests.iter().map(|_| Ok(stock.clone())).collect(),
            Err(e) => requests.iter().map(|_| Err(e.duplicate())).collect(),
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
    }

    impl BatchWork for Arc<Probe> {
        type Request = ();
        type Outcome = ();

        async fn run(&self, _: &SkuId, requests: Vec<()>) -> Vec<Result<()>> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
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
