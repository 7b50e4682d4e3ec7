//! Background work, each step callable on its own so tests can drive it without
//! sleeping: `sweep_once` returns the stock of expired holds, `flush_once` writes the
//! outbox to MySQL. `run` loops them until shutdown; an in-flight step finishes first.

use sqlx::mysql::MySqlPool;
use std::time::Duration;
use tokio::sync::watch;

use crate::config::WorkerSettings;
use crate::db::{self, OutboxEvent};
use crate::error::Result;
use crate::ids::SkuId;
use crate::limits;
use crate::reconcile;
use crate::reservation::{Compensation, CompensationReason};
use crate::store::{OutboxEntry, Store};
use crate::telemetry;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
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
    /// Consumer name in the outbox group: unique per process.
    pub consumer: String,
}

impl Worker {
    pub fn new(store: Store, db: MySqlPool) -> Worker {
        let consumer = format!(
            "{}-{}",
            std::process::id(),
            crate::ids::new_compensation_id()
        );
        Worker {
            store,
            db,
            consumer,
        }
    }

    /// Expires every due hold of every SKU, one bounded batch per script call.
    pub async fn sweep_once(&self) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        for sku in self.store.sku_ids().await? {
            loop {
                let (expired, still_due) = self.store.sweep(&sku).await?;
                report.expired += expired;
                if still_due == 0 || expired == 0 {
                    break;
                }
            }
            if let Ok(view) = self.store.sku(&sku).await {
                telemetry::available_stock(sku.as_str(), view.available);
            }
        }
        telemetry::expired(report.expired);
        Ok(report)
    }

    /// Flushes at most one batch per SKU; call until `flushed == 0` to drain.
    pub async fn flush_once(&self) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        let mut backlog = 0;
        for sku in self.store.sku_ids().await? {
            report.flushed += self.flush_sku(&sku).await?;
            backlog += self.store.outbox_backlog(&sku).await.unwrap_or(0);
        }
        telemetry::flushed(report.flushed);
        telemetry::outbox_backlog(backlog);
        Ok(report)
    }

    /// One transaction per batch; XACK only after the commit, so a crash anywhere
    /// leaves the events pending, to be claimed and written again (idempotently).
    pub async fn flush_sku(&self, sku: &SkuId) -> Result<u64> {
        self.store.ensure_outbox_group(sku).await?;
        let entries = self
            .store
            .read_outbox(sku, &self.consumer, limits::FLUSH_BATCH)
            .await?;
        if entries.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(entries.len());
        for entry in &entries {
            match parse_event(entry) {
                Some(event) => events.push(event),
                // A malformed entry can never be written; keeping it would block
                // nothing (entries are independent) but would be retried forever.
                None => {
                    tracing::error!(stream_id = %entry.stream_id, sku = %sku, "skipping malformed outbox entry")
                }
            }
        }
        db::apply_events(&self.db, &events).await?;
        let ids: Vec<String> = entries.iter().map(|e| e.stream_id.clone()).collect();
        self.store.ack_outbox(sku, &ids).await?;
        Ok(ids.len() as u64)
    }

    /// Drains the outbox completely (tests and shutdown).
    pub async fn flush_all(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let report = self.flush_once().await?;
            if report.flushed == 0 {
                return Ok(total);
            }
            total += report.flushed;
        }
    }

    /// Loops sweep, flush and reconcile until `shutdown` turns true. Failures are
    /// logged and retried with backoff: a MySQL outage delays the flush, never sales.
    pub async fn run(self, settings: WorkerSettings, mut shutdown: watch::Receiver<bool>) {
        let sweep_every = Duration::from_millis(settings.sweep_interval_ms.max(10));
        let reconcile_every = Duration::from_secs(settings.reconcile_interval_seconds.max(1));
        let mut next_reconcile = tokio::time::Instant::now() + reconcile_every;
        let mut flush_backoff = Duration::ZERO;
        let mut next_flush = tokio::time::Instant::now();
        tracing::info!(consumer = %self.consumer, "worker started");
        while !*shutdown.borrow() {
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "sweep failed");
            }
            if tokio::time::Instant::now() >= next_flush {
                match self.flush_all().await {
                    Ok(_) => flush_backoff = Duration::ZERO,
                    Err(e) => {
                        flush_backoff =
                            (flush_backoff * 2).clamp(sweep_every, Duration::from_secs(30));
                        tracing::warn!(error = %e, retry_in = ?flush_backoff, "flush failed");
                    }
                }
                next_flush = tokio::time::Instant::now() + flush_backoff;
            }
            if let Ok(count) = db::open_compensations(&self.db).await {
                telemetry::open_compensations(count);
            }
            if tokio::time::Instant::now() >= next_reconcile {
                next_reconcile = tokio::time::Instant::now() + reconcile_every;
                match reconcile::run(&self.store, &self.db, None, settings.reconcile_repair).await {
                    Ok(report) if report.drift_found() => {
                        tracing::warn!(findings = report.findings.len(), "reconcile found drift")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reconcile could not run"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(sweep_every) => {}
                _ = shutdown.changed() => {}
            }
        }
        // What was confirmed before shutdown goes to MySQL now if it can.
        if let Err(e) = self.flush_all().await {
            tracing::warn!(error = %e, "final flush failed; events stay in the outbox");
        }
        tracing::info!("worker stopped");
    }
}

fn parse_event(entry: &OutboxEntry) -> Option<OutboxEvent> {
    let field = |name: &str| entry.fields.get::<String>(name);
    let quantity: u64 = field("quantity")?.parse().ok()?;
    let at_ms: i64 = field("at")?.parse().ok()?;
    match field("type")?.as_str() {
        "confirmed" => Some(OutboxEvent::Confirmed {
            reservation_id: field("reservation_id")?,
            sku: field("sku")?,
            user_id: field("user_id")?,
            quantity,
            payment_ref: field("payment_ref")?,
            at_ms,
        }),
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
        })),
        _ => None,
    }
}
