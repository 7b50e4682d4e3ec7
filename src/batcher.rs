//! Per-SKU micro-batching of reserves. The first reserve of an idle SKU runs at once
//! (no added latency); reserves that arrive while RESERVE_BATCHES_IN_FLIGHT calls of
//! that SKU are running wait and go together in the next call, which decides them in
//! order exactly as single calls would. No task outlives the work: a SKU's queue is
//! dropped as soon as it is empty.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::limits::{RESERVE_BATCHES_IN_FLIGHT, RESERVE_BATCH_MAX};
use crate::store::{ReserveOutcome, ReserveRequest, Store};

struct Waiting {
    request: ReserveRequest,
    reply: oneshot::Sender<Result<ReserveOutcome>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Runner tasks of this SKU; each runs one script call at a time.
    runners: usize,
}

pub struct ReserveBatcher {
    store: Store,
    idempotency_ttl_ms: u64,
    queues: Mutex<HashMap<SkuId, Queue>>,
}

impl ReserveBatcher {
    pub fn new(store: Store, idempotency_ttl_ms: u64) -> ReserveBatcher {
        ReserveBatcher {
            store,
            idempotency_ttl_ms,
            queues: Mutex::new(HashMap::new()),
        }
    }

    pub async fn reserve(
        self: &Arc<Self>,
        sku: &SkuId,
        request: ReserveRequest,
    ) -> Result<ReserveOutcome> {
        let (reply, answer) = oneshot::channel();
        let start_runner = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues.entry(sku.clone()).or_default();
            queue.waiting.push(Waiting { request, reply });
            let start = queue.runners < RESERVE_BATCHES_IN_FLIGHT;
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
            .unwrap_or_else(|_| Err(Error::Internal("reserve batch runner stopped".into())))
    }

    /// Takes batches off the SKU's queue until it is empty.
    async fn run(self: Arc<Self>, sku: SkuId) {
        loop {
            let batch: Vec<Waiting> = {
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
                let take = queue.waiting.len().min(RESERVE_BATCH_MAX);
                queue.waiting.drain(..take).collect()
            };
            self.execute(&sku, batch).await;
        }
    }

    async fn execute(&self, sku: &SkuId, batch: Vec<Waiting>) {
        let (requests, replies): (Vec<ReserveRequest>, Vec<_>) =
            batch.into_iter().map(|w| (w.request, w.reply)).unzip();
        let outcomes = if let [request] = requests.as_slice() {
            vec![
                self.store
                    .reserve(sku, request, self.idempotency_ttl_ms)
                    .await,
            ]
        } else {
            match self
                .store
                .reserve_many(sku, &requests, self.idempotency_ttl_ms)
                .await
            {
                Ok(outcomes) => outcomes,
                Err(e) => requests.iter().map(|_| Err(e.duplicate())).collect(),
            }
        };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}
