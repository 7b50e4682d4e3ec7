//! Directed schedules: an interleaving the seeded runs found once and may not find again
//! soon, written out step by step. Still the real code against the real servers, each
//! call through the gate; the explorer's own calls (OBSERVER) pass at once.

use crate::schedule::{seed_rng, Scheduler, Turnstile};
use crate::world::{self, Env, Snapshot};
use flashgate::auth::Caller;
use flashgate::gateway::Gateway;
use flashgate::ids::SkuId;
use flashgate::keys::SkuKeys;
use flashgate::reservation::{Reservation, SkuDefinition};
use flashgate::store::Store;
use flashgate::worker::Worker;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Every directed schedule, in turn: the first failure, by name.
pub async fn run_all(env: &Env, turnstile: &Turnstile) -> Result<usize, String> {
    a_flush_batch_redis_lost_keeps_its_keys(env, turnstile)
        .await
        .map_err(|e| format!("a flush batch Redis lost keeps its keys: {e}"))?;
    a_flush_batch_a_rollback_lost_gives_its_keys_back(env, turnstile)
        .await
        .map_err(|e| format!("a flush batch a rollback lost gives its keys back: {e}"))?;
    Ok(2)
}

type Failure = String;

fn e(e: flashgate::error::Error) -> Failure {
    e.to_string()
}

/// A fresh one-bucket SKU of 5 units, and a gateway over it.
async fn fresh_sku(env: &Env, name: &str) -> Result<(SkuId, Gateway), Failure> {
    let sku = SkuId::parse(name).unwrap();
    world::forget_sku(env, &sku).await;
    let gateway = Gateway::new(
        env.observer.clone(),
        env.pool.clone(),
        world::gateway_settings(),
    );
    let definition = SkuDefinition {
        stock_total: 5,
        per_user_limit: 5,
        hold_seconds: 60,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets: 1,
        paused: false,
        waiting_room: None,
    };
    gateway.define_sku(&sku, &definition).await.map_err(e)?;
    Ok((sku, gateway))
}

/// u1's hold with key k1, cancelled: its end waits in the outbox.
async fn ended_hold(gateway: &Gateway, sku: &SkuId) -> Result<Reservation, Failure> {
    let (held, _) = gateway.reserve(sku, "u1", 1, "k1").await.map_err(e)?;
    gateway
        .cancel(&held.reservation_id, &Caller::Service)
        .await
        .map_err(e)?;
    Ok(held)
}

/// The flush, as process 1, run up to its write: its batch is read, nothing written.
async fn flush_up_to_its_write(
    env: &Env,
    turnstile: &Turnstile,
    sku: &SkuId,
) -> Result<(Scheduler, JoinHandle<flashgate::error::Result<u64>>), Failure> {
    let mut scheduler = Scheduler::new(turnstile, seed_rng(0, 0));
    let store = Store::new(world::connect_redis(&env.redis_url).await);
    let worker = Worker::new(store, env.pool.clone());
    let flushed = sku.clone();
    let flush = tokio::spawn(flashgate::explore::as_process(1, async move {
        worker.flush_sku(&flushed).await
    }));
    loop {
        scheduler.settle().await;
        if scheduler.waiting_on("mysql apply_events").is_some() {
            return Ok((scheduler, flush));
        }
        if flush.is_finished() {
            return Err("the flush ended before its write".into());
        }
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Runs the flush to its end: it must have written its batch.
async fn flush_to_its_end(
    mut scheduler: Scheduler,
    flush: JoinHandle<flashgate::error::Result<u64>>,
) -> Result<(), Failure> {
    while !flush.is_finished() {
        scheduler.settle().await;
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let written = flush.await.map_err(|e| e.to_string())?.map_err(e)?;
    if written == 0 {
        return Err("the flush wrote nothing".into());
    }
    Ok(())
}

/// Key k1 replays `held`, which MySQL records (contract invariant 3).
async fn k1_replays(gateway: &Gateway, sku: &SkuId, held: &Reservation) -> Result<(), Failure> {
    let (again, _) = gateway.reserve(sku, "u1", 1, "k1").await.map_err(e)?;
    if again.reservation_id != held.reservation_id {
        return Err(format!(
            "key k1 made {} though MySQL records its {} (invariant 3)",
            again.reservation_id, held.reservation_id
        ));
    }
    Ok(())
}

/// A flush reads a batch with the end of a hold; Redis loses the sale; the reconciler
/// rebuilds it from MySQL, which does not have that end yet; then the flush writes it.
/// The hold's key must still replay it (contract invariant 3): the admin world's seed
/// 4 once saw the key make a second hold ("key k1 made … though MySQL records its …").
/// And no reserve with the key may make a hold of its own while the batch is read and
/// not yet written: the rebuild waits for the flush (db::begin_flush), else it would
/// restore the sale without the key and a reserve with it would make a second hold.
async fn a_flush_batch_redis_lost_keeps_its_keys(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    let (sku, gateway) = fresh_sku(env, "explore-directed-flush-lost").await?;
    let held = ended_hold(&gateway, &sku).await?;
    let (scheduler, flush) = flush_up_to_its_write(env, turnstile, &sku).await?;
    // Redis loses the sale, and the reconciler rebuilds it from MySQL: after the flush
    // commits. If it is done before that, a reserve with the key must replay the hold.
    world::lose(env, &[SkuKeys::new(&sku)]).await;
    let rebuild = {
        let (store, pool, sku) = (env.observer.clone(), env.pool.clone(), sku.clone());
        // The explorer's own call, as the reconciler: it passes the gate at once.
        tokio::spawn(flashgate::explore::inherit(async move {
            flashgate::reconcile::run_skus(&store, &pool, std::slice::from_ref(&sku), true).await
        }))
    };
    let waited = tokio::time::timeout(Duration::from_secs(1), async {
        while !rebuild.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if waited.is_ok() {
        let (early, _) = gateway.reserve(&sku, "u1", 1, "k1").await.map_err(e)?;
        if early.reservation_id != held.reservation_id {
            return Err(format!(
                "the sale was rebuilt while the flush held a batch with the end of {}: key k1 made {} (invariant 3)",
                held.reservation_id, early.reservation_id
            ));
        }
    }
    flush_to_its_end(scheduler, flush).await?;
    rebuild.await.map_err(|e| e.to_string())?.map_err(e)?;
    k1_replays(&gateway, &sku, &held).await
}

/// A flush reads a batch with the end of a hold; Redis goes back to before the hold (a
/// failover to a replica that had not had it): the sale is there, without the hold,
/// its key or the batch. The flush writes the batch and, finding it no longer pending,
/// gives the key's claim back to the sale first (`Worker::may_write`): from then on
/// the key replays the hold MySQL records, as after a rebuild.
async fn a_flush_batch_a_rollback_lost_gives_its_keys_back(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    let (sku, gateway) = fresh_sku(env, "explore-directed-flush-rolled-back").await?;
    let keys = [SkuKeys::new(&sku)];
    let before = Snapshot::take(env, &keys).await;
    let held = ended_hold(&gateway, &sku).await?;
    let (scheduler, flush) = flush_up_to_its_write(env, turnstile, &sku).await?;
    before.restore(env, &keys, &[0]).await;
    flush_to_its_end(scheduler, flush).await?;
    k1_replays(&gateway, &sku, &held).await
}
