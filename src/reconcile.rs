//! Reconciliation: finds drift between Redis (the live sale) and MySQL (the record)
//! and, when asked, repairs it with MySQL winning for sales. Returns a report; the
//! caller prints it and picks the exit code. Every finding is audited in MySQL.

use redis::AsyncCommands;
use sqlx::mysql::MySqlPool;
use std::collections::HashSet;

use crate::db;
use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::keys::SkuKeys;
use crate::store::{Store, SCRIPTS};
use crate::telemetry;

/// Live holds and outbox entries one snapshot inspects; above that a check is skipped
/// (and said so) rather than blocking Redis.
const SNAPSHOT_CAP: u64 = 100_000;
/// Holds this far past their deadline and still counted are ghosts: the sweeper
/// (interval 1 s by default) should have returned them long ago.
const GHOST_AFTER_MS: i64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub sku: String,
    /// `redis_state_missing`, `equation_broken`, `held_mismatch`, `sold_behind_mysql`,
    /// `sold_ahead_of_mysql`, `stock_total_mismatch`, `ghost_holds`, `overcommitted`,
    /// `check_skipped`
    pub kind: &'static str,
    pub detail: String,
    pub before: String,
    pub after: Option<String>,
    pub repaired: bool,
}

#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub skus_checked: usize,
    pub findings: Vec<Finding>,
}

impl ReconcileReport {
    pub fn drift_found(&self) -> bool {
        self.findings.iter().any(|f| f.kind != "check_skipped")
    }

    /// 0 no drift, 1 drift found (repaired or not). (2, could not run, is an Err.)
    pub fn exit_code(&self) -> i32 {
        if self.drift_found() {
            1
        } else {
            0
        }
    }
}

/// Redis state of one SKU at one instant.
#[derive(Debug)]
struct Snapshot {
    now_ms: i64,
    stock_total: i64,
    available: i64,
    held: i64,
    sold: i64,
    /// None when there were too many holds to count.
    live_held: Option<i64>,
    overdue: i64,
    /// None when the outbox was too long to read.
    unflushed_confirms: Option<Vec<(String, i64)>>,
}

impl Snapshot {
    fn counters(&self) -> String {
        format!(
            "stock_total={} available={} held={} sold={}",
            self.stock_total, self.available, self.held, self.sold
        )
    }
}

async fn snapshot(store: &Store, sku: &SkuId) -> Result<Option<Snapshot>> {
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    let reply: Vec<String> = SCRIPTS
        .snapshot
        .key(&keys.meta)
        .key(&keys.deadlines)
        .key(&keys.outbox)
        .arg(SNAPSHOT_CAP)
        .invoke_async(&mut conn)
        .await?;
    if reply.first().map(String::as_str) != Some("ok") {
        return Ok(None);
    }
    let bad = || Error::Internal("unexpected snapshot reply".into());
    let n = |i: usize| -> Result<i64> { reply.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad) };
    let live_held = n(6)?;
    let outbox_complete = n(8)? == 1;
    let mut confirms = Vec::new();
    for pair in reply[9..].chunks(2) {
        let [rid, quantity] = pair else {
            return Err(bad());
        };
        confirms.push((rid.clone(), quantity.parse().map_err(|_| bad())?));
    }
    Ok(Some(Snapshot {
        now_ms: n(1)?,
        stock_total: n(2)?,
        available: n(3)?,
        held: n(4)?,
        sold: n(5)?,
        live_held: (live_held >= 0).then_some(live_held),
        overdue: n(7)?,
        unflushed_confirms: outbox_complete.then_some(confirms),
    }))
}

/// One pass over `only` or every SKU known to Redis or MySQL.
pub async fn run(
    store: &Store,
    pool: &MySqlPool,
    only: Option<&SkuId>,
    repair: bool,
) -> Result<ReconcileReport> {
    let skus: Vec<SkuId> = match only {
        Some(sku) => vec![sku.clone()],
        None => {
            let mut all: HashSet<String> = store
                .sku_ids()
                .await?
                .into_iter()
                .map(|s| s.to_string())
                .collect();
            all.extend(db::sku_ids(pool).await?);
            let mut all: Vec<SkuId> = all.iter().filter_map(|s| SkuId::parse(s)).collect();
            all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            all
        }
    };
    let mut report = ReconcileReport::default();
    for sku in &skus {
        let findings = reconcile_sku(store, pool, sku, repair).await?;
        telemetry::reconcile_drift(sku.as_str(), findings.len());
        for finding in &findings {
            db::audit(pool, finding).await?;
            tracing::warn!(sku = %finding.sku, kind = finding.kind, detail = %finding.detail,
                before = %finding.before, after = ?finding.after, repaired = finding.repaired,
                "reconcile finding");
        }
        report.findings.extend(findings);
        report.skus_checked += 1;
    }
    telemetry::reconcile_ran(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    );
    Ok(report)
}

async fn reconcile_sku(
    store: &Store,
    pool: &MySqlPool,
    sku: &SkuId,
    repair: bool,
) -> Result<Vec<Finding>> {
    let record = db::sku_record(pool, sku).await?;
    let Some(snap) = snapshot(store, sku).await? else {
        let Some(record) = record else {
            return Ok(Vec::new()); // indexed in Redis but defined nowhere: nothing to compare
        };
        let mut finding = Finding {
            sku: sku.to_string(),
            kind: "redis_state_missing",
            detail: "MySQL defines the SKU but Redis has no state for it".into(),
            before: "missing".into(),
            after: None,
            repaired: false,
        };
        if repair {
            let loaded = store.load_sku(sku, &record.definition, record.sold).await?;
            restore_per_user_usage(store, pool, sku).await?;
            finding.after = Some(format!(
                "stock_total={} available={} held={} sold={}",
                loaded.stock_total, loaded.available, loaded.held, loaded.sold
            ));
            finding.repaired = true;
        }
        return Ok(vec![finding]);
    };

    let mut findings = Vec::new();
    let mut finding = |kind: &'static str, detail: String| {
        findings.push(Finding {
            sku: sku.to_string(),
            kind,
            detail,
            before: snap.counters(),
            after: None,
            repaired: false,
        })
    };
    if snap.available + snap.held + snap.sold != snap.stock_total || snap.available < 0 {
        finding(
            "equation_broken",
            "available + held + sold != stock_total".into(),
        );
    }
    match snap.live_held {
        Some(live) if live != snap.held => finding(
            "held_mismatch",
            format!("held counter {} but live holds add up to {live}", snap.held),
        ),
        Some(_) => {}
        None => finding("check_skipped", "too many live holds to count".into()),
    }
    let overdue_ghosts = if snap.overdue > 0 {
        count_ghosts(store, sku, snap.now_ms - GHOST_AFTER_MS).await?
    } else {
        0
    };
    if overdue_ghosts > 0 {
        finding(
            "ghost_holds",
            format!("{overdue_ghosts} holds more than {GHOST_AFTER_MS} ms past their deadline still counted"),
        );
    }
    let mut sold_floor = None;
    if let Some(record) = &record {
        if record.definition.stock_total as i64 != snap.stock_total {
            finding(
                "stock_total_mismatch",
                format!("MySQL stock_total {}", record.definition.stock_total),
            );
        }
        match &snap.unflushed_confirms {
            Some(confirms) => {
                let rids: Vec<&str> = confirms.iter().map(|(rid, _)| rid.as_str()).collect();
                let flushed = db::flushed_sales(pool, &rids).await?;
                let unflushed: i64 = confirms
                    .iter()
                    .filter(|(rid, _)| !flushed.contains(rid))
                    .map(|(_, q)| q)
                    .sum();
                // Only sales confirmed before the snapshot count: later ones may
                // have been flushed since, and are not in the snapshot's `sold`.
                let mysql_sold = db::sold_before(pool, sku, snap.now_ms).await? as i64;
                let expected = mysql_sold + unflushed;
                sold_floor = Some(expected);
                if snap.sold < expected {
                    finding(
                        "sold_behind_mysql",
                        format!(
                            "Redis sold {} < MySQL sold {mysql_sold} + unflushed {unflushed}",
                            snap.sold
                        ),
                    );
                } else if snap.sold > expected {
                    finding(
                        "sold_ahead_of_mysql",
                        format!("Redis sold {} > MySQL sold {mysql_sold} + unflushed {unflushed}: confirmations missing from the record", snap.sold),
                    );
                }
            }
            None => finding("check_skipped", "outbox too long to compare sold".into()),
        }
    }

    let drift = findings.iter().any(|f| f.kind != "check_skipped");
    if repair && drift {
        if let Some(record) = &record {
            let floor = sold_floor.unwrap_or(record.sold as i64).max(0) as u64;
            let after = repair_counters(store, sku, record.definition.stock_total, floor).await?;
            let overcommitted = after.0 == "overcommitted";
            for f in findings.iter_mut().filter(|f| f.kind != "check_skipped") {
                f.after = Some(after.1.clone());
                // Sales MySQL never recorded cannot be invented: reported, not repaired.
                f.repaired = f.kind != "sold_ahead_of_mysql";
            }
            if overcommitted {
                findings.push(Finding {
                    sku: sku.to_string(),
                    kind: "overcommitted",
                    detail: "held + sold exceed MySQL stock_total; available set to 0".into(),
                    before: snap.counters(),
                    after: Some(after.1),
                    repaired: false,
                });
            }
        }
    }
    Ok(findings)
}

async fn count_ghosts(store: &Store, sku: &SkuId, older_than_ms: i64) -> Result<i64> {
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    Ok(conn.zcount(&keys.deadlines, "-inf", older_than_ms).await?)
}

/// Returns (reply code, "stock_total=.. available=.. held=.. sold=..").
async fn repair_counters(
    store: &Store,
    sku: &SkuId,
    stock_total: u64,
    sold_floor: u64,
) -> Result<(String, String)> {
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    let reply: Vec<String> = SCRIPTS
        .repair
        .key(&keys.meta)
        .key(&keys.used)
        .key(&keys.deadlines)
        .arg(stock_total)
        .arg(sold_floor)
        .arg(crate::limits::SWEEP_BATCH)
        .invoke_async(&mut conn)
        .await?;
    let [code, stock_total, available, held, sold] = reply.as_slice() else {
        return Err(Error::Internal(format!(
            "unexpected repair reply {reply:?}"
        )));
    };
    Ok((
        code.clone(),
        format!("stock_total={stock_total} available={available} held={held} sold={sold}"),
    ))
}

/// After Redis lost a SKU, per-user limits must still count what each user bought.
async fn restore_per_user_usage(store: &Store, pool: &MySqlPool, sku: &SkuId) -> Result<()> {
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    for (user, quantity) in db::sold_per_user(pool, sku).await? {
        let _: () = conn.hset(&keys.used, user, quantity).await?;
    }
    Ok(())
}
