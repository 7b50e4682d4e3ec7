//! Directed schedules: an interleaving the seeded runs found once and may not find again
//! soon, written out step by step. Still the real code against the real servers, each
//! call through the gate; the explorer's own calls (OBSERVER) pass at once.

use crate::schedule::{seed_rng, Scheduler, Turnstile};
use crate::world::{self, Env};
use flashgate::auth::Caller;
use flashgate::gateway::Gateway;
use flashgate::ids::SkuId;
use flashgate::keys::SkuKeys;
use flashgate::reservation::SkuDefinition;
use flashgate::store::Store;
use flashgate::worker::Worker;
use std::time::Duration;

/// Every directed schedule, in turn: the first failure, by name.
pub async fn run_all(env: &Env, turnstile: &Turnstile) -> Result<usize, String> {
    a_flush_batch_redis_lost_keeps_its_keys(env, turnstile)
        .await
        .map_err(|e| format!("a flush batch Redis lost keeps its keys: {e}"))?;
    Ok(1)
}

/// A flush reads a batch with the end of a hold; Redis loses the sale; the reconciler
/// rebuilds it from MySQL, which does not have that end yet; then the flush writes it.
/// The hold's key must still replay it (contract invariant 3): the admin world's seed
/// 4 once saw the key make a second hold ("key k1 made … though MySQL records its …").
async fn a_flush_batch_redis_lost_keeps_its_keys(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), String> {
    let sku = SkuId::parse("explore-directed-flush-lost").unwrap();
    world::forget_sku(env, &sku).await;
    let settings = world::gateway_settings();
    let gateway = Gateway::new(env.observer.clone(), env.pool.clone(), settings);
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
    let e = |e: flashgate::error::Error| e.to_string();
    gateway.define_sku(&sku, &definition).await.map_err(e)?;
    let (held, _) = gateway.reserve(&sku, "u1", 1, "k1").await.map_err(e)?;
    gateway
        .cancel(&held.reservation_id, &Caller::Service)
        .await
        .map_err(e)?;
    // The flush, as process 1, up to its write: the batch is read.
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
            break;
        }
        if flush.is_finished() {
            return Err("the flush ended before its write".into());
        }
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Redis loses the sale, and the reconciler rebuilds it from MySQL.
    world::lose(env, &[SkuKeys::new(&sku)]).await;
    flashgate::reconcile::run_skus(&env.observer, &env.pool, std::slice::from_ref(&sku), true)
        .await
        .map_err(e)?;
    // The flush writes its batch.
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
    let (again, _) = gateway.reserve(&sku, "u1", 1, "k1").await.map_err(e)?;
    if again.reservation_id != held.reservation_id {
        return Err(format!(
            "key k1 made {} though MySQL records its {} (invariant 3)",
            again.reservation_id, held.reservation_id
        ));
    }
    Ok(())
}
