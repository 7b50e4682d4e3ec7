//! Directed schedules: an interleaving the seeded runs found once and may not find again
//! soon, written out step by step. Still the real code against the real servers, each
//! call through the gate; the explorer's own calls (OBSERVER) pass at once.

use crate::schedule::{seed_rng, Scheduler, Turnstile};
use crate::world::{self, Env, Snapshot};
use flashgate::auth::Caller;
use flashgate::gateway::Gateway;
use flashgate::ids::SkuId;
use flashgate::keys::SkuKeys;
use flashgate::reservation::{Refusal, Reservation, SkuDefinition};
use flashgate::store::Store;
use flashgate::worker::Worker;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Every directed schedule, in turn: the first failure, by name.
pub async fn run_all(env: &Env, turnstile: &Turnstile) -> Result<usize, String> {
    for rebuilder in [Rebuilder::Reconciler, Rebuilder::AdminPut] {
        a_flush_batch_redis_lost_keeps_its_keys(env, turnstile, rebuilder)
            .await
            .map_err(|e| format!("a flush batch Redis lost keeps its keys ({rebuilder:?}): {e}"))?;
    }
    an_admin_puts_rebuild_waits_for_a_flush_that_read_before_the_loss(env, turnstile)
        .await
        .map_err(|e| {
            format!("an admin PUT's rebuild waits for a flush that read before the loss: {e}")
        })?;
    a_flush_batch_a_rollback_lost_gives_its_keys_back(env, turnstile)
        .await
        .map_err(|e| format!("a flush batch a rollback lost gives its keys back: {e}"))?;
    a_lost_batch_the_flush_does_not_write_gives_no_keys_back(env, turnstile)
        .await
        .map_err(|e| format!("a lost batch the flush does not write gives no keys back: {e}"))?;
    a_reserve_during_a_puts_rebuild_finds_its_buyers_usage(env, turnstile)
        .await
        .map_err(|e| format!("a reserve during a PUT's rebuild finds its buyers' usage: {e}"))?;
    a_sale_retired_during_a_put_reopening_it_keeps_its_buyers_usage(env, turnstile)
        .await
        .map_err(|e| {
            format!("a sale retired during a PUT reopening it keeps its buyers' usage: {e}")
        })?;
    for rebuilder in [Rebuilder::Reconciler, Rebuilder::AdminPut] {
        for loss in [
            LossAt::BeforeTheLoad,
            LossAt::BetweenRestoreCalls,
            LossAt::AfterTheLook,
        ] {
            a_loss_during_a_rebuilds_restore_puts_no_sale_on_sale(env, turnstile, rebuilder, loss)
                .await
                .map_err(|e| {
                    format!("a loss during a rebuild's restore ({rebuilder:?}, {loss:?}): {e}")
                })?;
        }
    }
    Ok(13)
}

type Failure = String;

fn e(e: flashgate::error::Error) -> Failure {
    e.to_string()
}

/// A fresh one-bucket SKU of 5 units, 2 per user, and a gateway over it.
async fn fresh_sku(env: &Env, name: &str) -> Result<(SkuId, Gateway), Failure> {
    let sku = SkuId::parse(name).unwrap();
    world::forget_sku(env, &sku).await;
    let gateway = Gateway::new(
        env.observer.clone(),
        env.pool.clone(),
        world::gateway_settings(),
    );
    gateway.define_sku(&sku, &definition()).await.map_err(e)?;
    Ok((sku, gateway))
}

fn definition() -> SkuDefinition {
    SkuDefinition {
        stock_total: 5,
        per_user_limit: 2,
        hold_seconds: 60,
        starts_at_ms: None,
        ends_at_ms: None,
        buckets: 1,
        paused: false,
        waiting_room: None,
    }
}

/// Who rebuilds a sale Redis lost from MySQL.
#[derive(Debug, Clone, Copy)]
enum Rebuilder {
    /// `reconcile --repair` (or the worker's scheduled repair).
    Reconciler,
    /// An operator's PUT of the SKU's definition, unchanged.
    AdminPut,
}

/// What `rebuilder` runs to rebuild `sku` from MySQL.
fn rebuild_of(
    env: &Env,
    gateway: &Gateway,
    sku: &SkuId,
    rebuilder: Rebuilder,
) -> impl std::future::Future<Output = flashgate::error::Result<()>> + Send + 'static {
    let (store, pool, sku) = (env.observer.clone(), env.pool.clone(), sku.clone());
    let gateway = gateway.clone();
    async move {
        match rebuilder {
            Rebuilder::Reconciler => {
                flashgate::reconcile::run_skus(&store, &pool, std::slice::from_ref(&sku), true)
                    .await
                    .map(drop)
            }
            Rebuilder::AdminPut => gateway.define_sku(&sku, &definition()).await.map(drop),
        }
    }
}

/// u1 buys a unit with key k0, and MySQL records the sale.
async fn bought_and_flushed(
    env: &Env,
    gateway: &Gateway,
    sku: &SkuId,
) -> Result<Reservation, Failure> {
    let (bought, _) = gateway.reserve(sku, "u1", 1, "k0").await.map_err(e)?;
    gateway
        .confirm(&bought.reservation_id, "pay-0")
        .await
        .map_err(e)?;
    let worker = Worker::new(env.observer.clone(), env.pool.clone());
    while worker.flush_sku(sku).await.map_err(e)? > 0 {}
    Ok(bought)
}

/// An operator's PUT of `definition()`, as `process`.
fn put_as(
    process: u32,
    gateway: &Gateway,
    sku: &SkuId,
) -> JoinHandle<flashgate::error::Result<()>> {
    let (gateway, sku) = (gateway.clone(), sku.clone());
    tokio::spawn(flashgate::explore::as_process(process, async move {
        gateway.define_sku(&sku, &definition()).await.map(drop)
    }))
}

/// u1 (who bought 1 of a limit of 2) may hold one more unit, and no other.
async fn u1s_limit_counts_its_unit(gateway: &Gateway, sku: &SkuId) -> Result<(), Failure> {
    gateway.reserve(sku, "u1", 1, "k2").await.map_err(e)?;
    match gateway.reserve(sku, "u1", 1, "k3").await {
        Err(flashgate::error::Error::Refused(Refusal::LimitExceeded)) => Ok(()),
        other => Err(format!(
            "u1 bought 1 and holds 1 of a limit of 2, yet a third reserve answered {other:?}"
        )),
    }
}

/// If the sale was rebuilt while the flush had yet to write the end of `held`, key k1
/// must replay it all the same.
async fn k1_replays_early(
    gateway: &Gateway,
    sku: &SkuId,
    held: &Reservation,
) -> Result<(), Failure> {
    let (early, _) = gateway.reserve(sku, "u1", 1, "k1").await.map_err(e)?;
    if early.reservation_id != held.reservation_id {
        return Err(format!(
            "the sale was rebuilt while the flush held a batch with the end of {}: key k1 made {} (invariant 3)",
            held.reservation_id, early.reservation_id
        ));
    }
    Ok(())
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
    let scheduler = Scheduler::new(turnstile, seed_rng(0, 0));
    flush_up_to_its_write_with(env, scheduler, sku, 1).await
}

/// `flush_up_to_its_write` as `process`, under a scheduler already running others.
async fn flush_up_to_its_write_with(
    env: &Env,
    mut scheduler: Scheduler,
    sku: &SkuId,
    process: u32,
) -> Result<(Scheduler, JoinHandle<flashgate::error::Result<u64>>), Failure> {
    let store = Store::new(world::connect_redis(&env.redis_url).await);
    let worker = Worker::new(store, env.pool.clone());
    let flushed = sku.clone();
    let flush = tokio::spawn(flashgate::explore::as_process(process, async move {
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
    scheduler: &mut Scheduler,
    flush: JoinHandle<flashgate::error::Result<u64>>,
) -> Result<(), Failure> {
    if flush_entries_written(scheduler, flush).await? == 0 {
        return Err("the flush wrote nothing".into());
    }
    Ok(())
}

/// Runs the flush to its end: the entries it wrote.
async fn flush_entries_written(
    scheduler: &mut Scheduler,
    flush: JoinHandle<flashgate::error::Result<u64>>,
) -> Result<u64, Failure> {
    while !flush.is_finished() {
        scheduler.settle().await;
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    flush.await.map_err(|e| e.to_string())?.map_err(e)
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
/// (or an operator's PUT) rebuilds it from MySQL, which does not have that end yet;
/// then the flush writes it.
/// The hold's key must still replay it (contract invariant 3): the admin world's seed
/// 4 once saw the key make a second hold ("key k1 made … though MySQL records its …").
/// And no reserve with the key may make a hold of its own while the batch is read and
/// not yet written: the rebuild waits for the flush (db::begin_flush), else it would
/// restore the sale without the key and a reserve with it would make a second hold.
async fn a_flush_batch_redis_lost_keeps_its_keys(
    env: &Env,
    turnstile: &Turnstile,
    rebuilder: Rebuilder,
) -> Result<(), Failure> {
    let (sku, gateway) = fresh_sku(env, "explore-directed-flush-lost").await?;
    bought_and_flushed(env, &gateway, &sku).await?;
    let held = ended_hold(&gateway, &sku).await?;
    let (mut scheduler, flush) = flush_up_to_its_write(env, turnstile, &sku).await?;
    // Redis loses the sale, and it is rebuilt from MySQL: after the flush commits. If
    // it is done before that, a reserve with the key must replay the hold.
    world::lose(env, &[SkuKeys::new(&sku)]).await;
    // The explorer's own call: it passes the gate at once.
    let rebuild = tokio::spawn(flashgate::explore::inherit(rebuild_of(
        env, &gateway, &sku, rebuilder,
    )));
    let waited = tokio::time::timeout(Duration::from_secs(1), async {
        while !rebuild.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if waited.is_ok() {
        k1_replays_early(&gateway, &sku, &held).await?;
    }
    flush_to_its_end(&mut scheduler, flush).await?;
    rebuild.await.map_err(|e| e.to_string())?.map_err(e)?;
    k1_replays(&gateway, &sku, &held).await?;
    // The rebuild gave u1 back the unit it bought (a usage record the flush wrote into
    // the lost sale would have kept it out).
    u1s_limit_counts_its_unit(&gateway, &sku).await
}

/// An operator's PUT commits the SKU's definition; a flush then reads a batch with the
/// end of a hold; Redis loses the sale; the PUT, going on, finds the sale gone and
/// rebuilds it from MySQL, which does not have that end yet (an outside review's
/// interleaving). The PUT reads MySQL under the SKU's row lock, so it waits for the
/// flush's commit, and the hold's key replays the hold.
async fn an_admin_puts_rebuild_waits_for_a_flush_that_read_before_the_loss(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    const FLUSH: u32 = 1;
    const PUT: u32 = 2;
    let (sku, gateway) = fresh_sku(env, "explore-directed-put-rebuild").await?;
    bought_and_flushed(env, &gateway, &sku)
        .await
        .map_err(|f| format!("u1's purchase: {f}"))?;
    let held = ended_hold(&gateway, &sku)
        .await
        .map_err(|f| format!("u1's hold: {f}"))?;
    // And u2's sale, in the same batch.
    let (u2s, _) = gateway
        .reserve(&sku, "u2", 1, "k9")
        .await
        .map_err(|f| format!("u2's reserve: {f}"))?;
    gateway
        .confirm(&u2s.reservation_id, "pay-9")
        .await
        .map_err(|f| format!("u2's confirm: {f}"))?;
    let mut scheduler = Scheduler::new(turnstile, seed_rng(0, 0));
    // The PUT, up to its commit and no further (its load takes the row lock first).
    let put = put_as(PUT, &gateway, &sku);
    scheduler.only(Some(PUT));
    loop {
        scheduler.settle().await;
        if scheduler.waiting_on("mysql lock_sku_sold").is_some() {
            break;
        }
        if put.is_finished() {
            return Err("the PUT ended before its load".into());
        }
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // The flush reads its batch while the PUT waits; then Redis loses the sale.
    scheduler.only(Some(FLUSH));
    let (mut scheduler, flush) = flush_up_to_its_write_with(env, scheduler, &sku, FLUSH).await?;
    world::lose(env, &[SkuKeys::new(&sku)]).await;
    // The PUT goes on while the flush waits, as long as it can: until it is done, or
    // its call blocks (on the flush's row lock) and nothing else of it can run.
    scheduler.only(Some(PUT));
    let mut idle = 0;
    while !put.is_finished() && idle < 50 {
        scheduler.settle().await;
        if put.is_finished() {
            break;
        }
        if scheduler.step().await {
            idle = 0;
        } else {
            idle += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if put.is_finished() && !flush.is_finished() {
        k1_replays_early(&gateway, &sku, &held).await?;
    }
    scheduler.only(None);
    flush_to_its_end(&mut scheduler, flush)
        .await
        .map_err(|f| format!("the flush: {f}"))?;
    while !put.is_finished() {
        scheduler.settle().await;
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    put.await
        .map_err(|e| e.to_string())?
        .map_err(|f| format!("the PUT: {f}"))?;
    // The rebuilt sale counts both sales MySQL records, u2's included (the flush
    // committed it after the PUT's upsert read MySQL's `sold`).
    let view = gateway
        .sku(&sku)
        .await
        .map_err(|f| format!("the sale after the PUT: {f}"))?;
    if (view.sold, view.held, view.available) != (2, 0, 3) {
        return Err(format!(
            "the rebuilt sale has sold {}, held {}, available {}, where MySQL records 2 of 5 sold",
            view.sold, view.held, view.available
        ));
    }
    k1_replays(&gateway, &sku, &held).await?;
    u1s_limit_counts_its_unit(&gateway, &sku).await
}

/// A flush reads a batch with the end of a hold; Redis goes back to before the hold (a
/// failover to a replica that had not had it): the sale is there, without the hold,
/// its key or the batch. The flush writes the batch and, finding it no longer pending,
/// gives the key's claim back to the sale with its writes (`Worker::apply`): from then on
/// the key replays the hold MySQL records, as after a rebuild.
async fn a_flush_batch_a_rollback_lost_gives_its_keys_back(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    let (sku, gateway) = fresh_sku(env, "explore-directed-flush-rolled-back").await?;
    let keys = [SkuKeys::new(&sku)];
    let before = Snapshot::take(env, &keys).await;
    let held = ended_hold(&gateway, &sku).await?;
    let (mut scheduler, flush) = flush_up_to_its_write(env, turnstile, &sku).await?;
    before.restore(env, &keys, &[0]).await;
    flush_to_its_end(&mut scheduler, flush).await?;
    k1_replays(&gateway, &sku, &held).await
}

/// As above, but the batch also has a sale MySQL has no room for (a Redis rollback
/// resold a unit), so the flush writes nothing at first and reads its batch again
/// under the admin lock, where the lost batch is gone: nothing of it is written, and
/// no key of it may be given back (an outside review's finding: the key then pointed
/// at a reservation in neither Redis nor MySQL, and its reserves failed).
async fn a_lost_batch_the_flush_does_not_write_gives_no_keys_back(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    let (sku, gateway) = fresh_sku(env, "explore-directed-flush-lost-unwritten").await?;
    let keys = [SkuKeys::new(&sku)];
    let before = Snapshot::take(env, &keys).await;
    let held = ended_hold(&gateway, &sku).await?;
    let (u2s, _) = gateway.reserve(&sku, "u2", 1, "k9").await.map_err(e)?;
    gateway
        .confirm(&u2s.reservation_id, "pay-9")
        .await
        .map_err(e)?;
    // MySQL full: every unit sold already.
    sqlx::query("UPDATE skus SET sold = stock_total WHERE sku = ?")
        .bind(sku.as_str())
        .execute(&env.pool)
        .await
        .map_err(|e| e.to_string())?;
    let (mut scheduler, flush) = flush_up_to_its_write(env, turnstile, &sku).await?;
    before.restore(env, &keys, &[0]).await;
    flush_entries_written(&mut scheduler, flush).await?;
    match gateway.reserve(&sku, "u1", 1, "k1").await {
        Ok((again, _)) if again.reservation_id == held.reservation_id => Err(format!(
            "key k1 replays {}, which MySQL does not record",
            held.reservation_id
        )),
        Ok(_) => Ok(()),
        Err(failed) => Err(format!(
            "key k1, whose batch Redis lost before it was written, answers {failed}"
        )),
    }
}

/// Redis loses a sale; an operator's PUT rebuilds it, and reserves run the moment its
/// load is done, before anything else of the PUT. The buyers' usage must be there
/// already (restored before the load, `Gateway::load_locked`): u1's limit counts the
/// unit it bought and its key replays that purchase.
async fn a_reserve_during_a_puts_rebuild_finds_its_buyers_usage(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    const PUT: u32 = 1;
    let (sku, gateway) = fresh_sku(env, "explore-directed-put-usage").await?;
    let bought = bought_and_flushed(env, &gateway, &sku).await?;
    world::lose(env, &[SkuKeys::new(&sku)]).await;
    let mut scheduler = Scheduler::new(turnstile, seed_rng(0, 0));
    scheduler.only(Some(PUT));
    let put = put_as(PUT, &gateway, &sku);
    // Up to the load's last call (the outbox's group), and no further.
    step_until(&mut scheduler, &put, "the outbox's group", |s| {
        s.last_ran
            .as_deref()
            .is_some_and(|step| step.starts_with("XGROUP"))
    })
    .await?;
    u1s_usage_is_there(&gateway, &sku, &bought).await?;
    finish(&mut scheduler, put).await
}

/// When Redis loses the sale again during a rebuild's restore of its buyers' usage.
#[derive(Debug, Clone, Copy)]
enum LossAt {
    /// After the restore's last call, before the load.
    BeforeTheLoad,
    /// After the restore's first call (u1's units), before its next (k0's claim).
    BetweenRestoreCalls,
    /// Redis still had the sale when the rebuild looked (so it restored nothing), and
    /// loses it right after the look.
    AfterTheLook,
}

/// Redis loses a sale; a rebuild from MySQL (the reconciler's, or an operator's PUT)
/// restores its buyers' usage, then Redis loses the sale again, before the rebuild's
/// load or between two calls of the restore (the explorer's seed 6000, with a split
/// SKU's bucket). The load must not put the sale on sale without that usage: a reserve
/// with k0 right after it made a second hold for a key whose reservation MySQL records.
/// The rebuild refuses instead (the restore's marker went with the usage), and a
/// rebuild tried again brings the sale back whole.
async fn a_loss_during_a_rebuilds_restore_puts_no_sale_on_sale(
    env: &Env,
    turnstile: &Turnstile,
    rebuilder: Rebuilder,
    loss: LossAt,
) -> Result<(), Failure> {
    const REBUILDER: u32 = 1;
    let name = match (rebuilder, loss) {
        (Rebuilder::Reconciler, LossAt::BeforeTheLoad) => "explore-directed-restore-lost-r",
        (Rebuilder::AdminPut, LossAt::BeforeTheLoad) => "explore-directed-restore-lost-p",
        (Rebuilder::Reconciler, LossAt::BetweenRestoreCalls) => "explore-directed-restore-cut-r",
        (Rebuilder::AdminPut, LossAt::BetweenRestoreCalls) => "explore-directed-restore-cut-p",
        (Rebuilder::Reconciler, LossAt::AfterTheLook) => "explore-directed-look-lost-r",
        (Rebuilder::AdminPut, LossAt::AfterTheLook) => "explore-directed-look-lost-p",
    };
    let (sku, gateway) = fresh_sku(env, name).await?;
    let bought = bought_and_flushed(env, &gateway, &sku).await?;
    if !matches!(loss, LossAt::AfterTheLook) {
        world::lose(env, &[SkuKeys::new(&sku)]).await;
    }
    let rebuild = |process: u32| {
        tokio::spawn(flashgate::explore::as_process(
            process,
            rebuild_of(env, &gateway, &sku, rebuilder),
        ))
    };
    let mut scheduler = Scheduler::new(turnstile, seed_rng(0, 0));
    scheduler.only(Some(REBUILDER));
    let first = rebuild(REBUILDER);
    if matches!(loss, LossAt::AfterTheLook) {
        // The PUT's look (`sale_is_live`, its first read of the sale's meta) finds the
        // sale; the reconciler finds nothing to rebuild.
        let looked = step_until(&mut scheduler, &first, "the look", |s| {
            s.last_ran
                .as_deref()
                .is_some_and(|step| step.starts_with("HMGET"))
        })
        .await;
        if looked.is_err() {
            return first.await.map_err(|e| e.to_string())?.map_err(e);
        }
    }
    if !matches!(loss, LossAt::AfterTheLook) {
        loop {
            step_until(&mut scheduler, &first, "the usage restored", |s| {
                s.last_ran
                    .as_deref()
                    .is_some_and(|step| step.contains("restore_usage"))
            })
            .await?;
            scheduler.settle().await;
            if matches!(loss, LossAt::BetweenRestoreCalls)
                || scheduler.waiting_on("restore_usage").is_none()
            {
                break;
            }
        }
    }
    world::lose(env, &[SkuKeys::new(&sku)]).await;
    // The rebuild goes on to its load; a reserve right after it.
    loop {
        scheduler.settle().await;
        if first.is_finished() || !scheduler.step().await {
            break;
        }
        if scheduler
            .last_ran
            .as_deref()
            .is_some_and(|step| step.contains("load_sku"))
        {
            break;
        }
    }
    if let Ok((again, _)) = gateway.reserve(&sku, "u1", 1, "k0").await {
        if again.reservation_id != bought.reservation_id {
            return Err(format!(
                "key k0 made {} though MySQL records its {} (invariant 3)",
                again.reservation_id, bought.reservation_id
            ));
        }
    }
    // This try may fail (Redis lost the sale under it); the next brings it back.
    let _ = finish(&mut scheduler, first).await;
    finish(&mut scheduler, rebuild(REBUILDER + 1)).await?;
    u1s_usage_is_there(&gateway, &sku, &bought).await
}

/// Runs the process of `task` (the scheduler's `only`) until `reached` holds after a
/// step; an error if the task ends first.
async fn step_until(
    scheduler: &mut Scheduler,
    task: &JoinHandle<flashgate::error::Result<()>>,
    what: &str,
    reached: impl Fn(&Scheduler) -> bool,
) -> Result<(), Failure> {
    loop {
        scheduler.settle().await;
        if task.is_finished() {
            return Err(format!("the task ended before {what}"));
        }
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        } else if reached(scheduler) {
            return Ok(());
        }
    }
}

/// Every process runs until `task` ends; its result.
async fn finish(
    scheduler: &mut Scheduler,
    task: JoinHandle<flashgate::error::Result<()>>,
) -> Result<(), Failure> {
    scheduler.only(None);
    while !task.is_finished() {
        scheduler.settle().await;
        if !scheduler.step().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    task.await.map_err(|e| e.to_string())?.map_err(e)
}

/// u1 bought `bought` with key k0: the key replays it, and u1's limit counts it.
async fn u1s_usage_is_there(
    gateway: &Gateway,
    sku: &SkuId,
    bought: &Reservation,
) -> Result<(), Failure> {
    let (again, _) = gateway.reserve(sku, "u1", 1, "k0").await.map_err(e)?;
    if again.reservation_id != bought.reservation_id {
        return Err(format!(
            "key k0 made {} though MySQL records its {} (invariant 3)",
            again.reservation_id, bought.reservation_id
        ));
    }
    u1s_limit_counts_its_unit(gateway, sku).await
}

/// A sale ended and nothing of it is left to flush; an operator's PUT reopens it. The
/// sweep retires it after the PUT looked at it (live: no usage restored first) and
/// before its load, its keys' lifetime over: the load reopens the retired sale, and a
/// reserve right after must still find u1's usage. The retirement keeps the usage
/// records as long as the tombstone (sweep.lua); deleted with the keys' lifetime, they
/// were back only once the PUT restored them after its load.
async fn a_sale_retired_during_a_put_reopening_it_keeps_its_buyers_usage(
    env: &Env,
    turnstile: &Turnstile,
) -> Result<(), Failure> {
    const PUT: u32 = 1;
    let (sku, gateway) = fresh_sku(env, "explore-directed-put-reopen").await?;
    let bought = bought_and_flushed(env, &gateway, &sku).await?;
    let worker = Worker::new(env.observer.clone(), env.pool.clone());
    let ended = SkuDefinition {
        ends_at_ms: Some(flashgate::explore::host_clock_ms() - 1_000),
        ..definition()
    };
    gateway.define_sku(&sku, &ended).await.map_err(e)?;
    let mut scheduler = Scheduler::new(turnstile, seed_rng(0, 0));
    scheduler.only(Some(PUT));
    let put = put_as(PUT, &gateway, &sku);
    // Past the commit (the row locked again for the load), up to the load.
    step_until(&mut scheduler, &put, "its load's lock", |s| {
        s.last_ran
            .as_deref()
            .is_some_and(|step| step.contains("lock_sku_sold"))
    })
    .await?;
    loop {
        scheduler.settle().await;
        if scheduler.waiting_on("FCALL load_sku").is_some() {
            break;
        }
        step_until(&mut scheduler, &put, "its load", |_| true).await?;
    }
    let keys = SkuKeys::new(&sku);
    let mut conn = env.observer.connection();
    // Every key's lifetime over, as far as the retirement looks.
    let _: () = redis::cmd("HSET")
        .arg(&keys.meta)
        .arg("claims_until")
        .arg(0)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    worker.sweep_sku(sku.clone()).await.map_err(e)?;
    if !env.observer.is_retired(&sku).await.map_err(e)? {
        return Err("the sweep did not retire the ended sale".into());
    }
    // The load, and nothing more of the PUT.
    step_until(&mut scheduler, &put, "its load", |s| {
        s.last_ran
            .as_deref()
            .is_some_and(|step| step.starts_with("FCALL load_sku"))
    })
    .await?;
    u1s_usage_is_there(&gateway, &sku, &bought).await?;
    finish(&mut scheduler, put).await
}
