//! Reconciliation: finds drift between Redis (the live sale) and MySQL (the record)
//! and, when asked, repairs it with MySQL winning for sales. Returns a report; the
//! caller prints it and picks the exit code. Every finding is audited in MySQL.
//!
//! Soundness while sales go on. One SKU is checked inside one MySQL transaction that
//! first locks the SKU's `skus` row: the flush of that SKU (which locks the same row
//! before writing sales) and admin writes of it wait until the check is done. Then
//! one Redis snapshot (an atomic script, at Redis time T) gives the counters and the
//! confirmations still in the outbox; every other confirmation was either made after
//! T (its `confirmed_at` is >= T) or trimmed from the outbox before T, which happens
//! only after MySQL committed it. So the units Redis counted as sold at T are exactly
//!
//!   MySQL sales confirmed before T + outbox confirmations MySQL does not have (before T)
//!
//! read from one MySQL snapshot; confirms racing with the check never show as drift.

use sqlx::mysql::{MySqlConnection, MySqlPool};
use std::collections::{HashMap, HashSet};

use crate::db::{self, SkuRecord};
use crate::error::{Error, Result};
use crate::ids::SkuId;
use crate::keys::SkuKeys;
use crate::reservation::SkuDefinition;
use crate::store::{Store, SCRIPTS};
use crate::telemetry;

/// Live holds and outbox entries one snapshot (or repair) inspects; above that a check
/// is skipped (and said so) rather than blocking Redis: inspecting one hold costs about
/// 20 µs of script time, so 5,000 keep a snapshot near 100 ms (100,000 once stalled a
/// loaded Redis for 1.8 s, close to the gateway's response timeout).
const SNAPSHOT_CAP: u64 = 5_000;
/// Holds this far past their deadline and still counted are ghosts: the sweeper
/// (interval 1 s by default) should have returned them long ago.
pub const GHOST_AFTER_MS: i64 = 10_000;
/// Sweep batches the repair runs at most to return ghost holds before recounting.
const REPAIR_SWEEP_ROUNDS: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub sku: String,
    /// `redis_state_missing`, `mysql_record_missing`, `equation_broken`, `held_mismatch`,
    /// `ghost_holds`, `stock_total_mismatch`, `terms_mismatch`, `used_mismatch`,
    /// `mysql_sold_mismatch`, `sold_behind_mysql`, `sold_ahead_of_mysql`,
    /// `overcommitted`, `payment_after_rollback`, and the drift-unknown ones:
    /// `check_skipped` (a part too large to check), `check_failed` (an error)
    pub kind: &'static str,
    pub detail: String,
    pub before: String,
    pub after: Option<String>,
    pub repaired: bool,
}

impl Finding {
    /// Drift, or a check that could not complete (drift unknown): either way the
    /// reconcile exit code is 1, never 0.
    pub fn is_drift(&self) -> bool {
        true
    }

    /// A check that could not complete: drift unknown.
    pub fn is_unknown(&self) -> bool {
        matches!(self.kind, "check_skipped" | "check_failed")
    }
}

#[derive(Debug, Default, Clone)]
pub struct ReconcileReport {
    pub skus_checked: usize,
    pub findings: Vec<Finding>,
}

impl ReconcileReport {
    pub fn drift_found(&self) -> bool {
        self.findings.iter().any(Finding::is_drift)
    }

    /// 0 no drift, 1 drift found (repaired or not) or a check that could not complete.
    /// (2, could not run at all, is an Err.)
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
    /// Holds more than GHOST_AFTER_MS past their deadline.
    ghosts: i64,
    /// Confirmations whose events are in the outbox (reservation id, quantity, user);
    /// None when the outbox was too long to read.
    outbox_confirms: Option<Vec<(String, i64, String)>>,
    /// Units of the live holds per user; None when too many holds to count.
    live_per_user: Option<HashMap<String, i64>>,
    /// The `used` hash; None when too many users to read.
    used: Option<HashMap<String, i64>>,
    /// per_user_limit, hold_ms, starts_at, ends_at as Redis has them.
    terms: [String; 4],
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
        .key(&keys.used)
        .arg(SNAPSHOT_CAP)
        .arg(GHOST_AFTER_MS)
        .invoke_async(&mut conn)
        .await?;
    parse_snapshot(&reply)
}

/// Fixed fields at 0..=16, then the confirms, live users and used entries (snapshot.lua).
fn parse_snapshot(reply: &[String]) -> Result<Option<Snapshot>> {
    if reply.first().map(String::as_str) != Some("ok") {
        return Ok(None);
    }
    let bad = || Error::Internal(format!("unexpected snapshot reply {reply:?}"));
    let n = |i: usize| -> Result<i64> { reply.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad) };
    let live_held = n(6)?;
    let outbox_complete = n(9)? == 1;
    let (confirm_count, live_users, used_count) = (n(10)?, n(11)?, n(12)?);
    let terms: [String; 4] = reply
        .get(13..17)
        .ok_or_else(bad)?
        .to_vec()
        .try_into()
        .map_err(|_| bad())?;
    let mut rest = reply.get(17..).ok_or_else(bad)?;
    let mut take = |count: i64, width: usize| -> Result<&[String]> {
        let len = count.max(0) as usize * width;
        let (head, tail) = (rest.get(..len).ok_or_else(bad)?, &rest[len..]);
        rest = tail;
        Ok(head)
    };
    let mut confirms = Vec::new();
    for c in take(confirm_count, 3)?.chunks(3) {
        confirms.push((c[0].clone(), c[1].parse().map_err(|_| bad())?, c[2].clone()));
    }
    let pairs = |items: &[String]| -> Result<HashMap<String, i64>> {
        items
            .chunks(2)
            .map(|p| Ok((p[0].clone(), p[1].parse().map_err(|_| bad())?)))
            .collect()
    };
    let live_per_user = pairs(take(live_users, 2)?)?;
    let used = pairs(take(used_count, 2)?)?;
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(Some(Snapshot {
        now_ms: n(1)?,
        stock_total: n(2)?,
        available: n(3)?,
        held: n(4)?,
        sold: n(5)?,
        live_held: (live_held >= 0).then_some(live_held),
        ghosts: n(8)?,
        outbox_confirms: outbox_complete.then_some(confirms),
        live_per_user: (live_users >= 0).then_some(live_per_user),
        used: (used_count >= 0).then_some(used),
        terms,
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
    run_skus(store, pool, &skus, repair).await
}

/// One pass over these SKUs, in order.
pub async fn run_skus(
    store: &Store,
    pool: &MySqlPool,
    skus: &[SkuId],
    repair: bool,
) -> Result<ReconcileReport> {
    let mut report = ReconcileReport::default();
    for sku in skus {
        // One SKU that cannot be checked is reported (drift unknown) and the pass goes
        // on; an outage of Redis or MySQL ends it (could not run).
        let findings = match reconcile_sku(store, pool, sku, repair).await {
            Ok(findings) => findings,
            Err(e) if store.ping().await.is_err() || db::ping(pool).await.is_err() => {
                return Err(e)
            }
            Err(e) => vec![Finding {
                sku: sku.to_string(),
                kind: "check_failed",
                detail: format!("the check could not complete: {e}"),
                before: "unknown".into(),
                after: None,
                repaired: false,
            }],
        };
        telemetry::reconcile_drift(
            sku.as_str(),
            findings.iter().filter(|f| f.is_drift()).count(),
        );
        for finding in &findings {
            if let Err(e) = db::audit(pool, finding).await {
                tracing::warn!(sku = %finding.sku, error = %e, "could not audit a finding");
            }
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

/// Checks (and repairs) one SKU inside one MySQL transaction holding the SKU's row lock.
async fn reconcile_sku(
    store: &Store,
    pool: &MySqlPool,
    sku: &SkuId,
    repair: bool,
) -> Result<Vec<Finding>> {
    let mut conn = pool.acquire().await?;
    let mut tx = db::begin_check(&mut conn).await?;
    let findings = check_sku(store, &mut tx, sku, repair).await?;
    tx.commit().await?;
    Ok(findings)
}

async fn check_sku(
    store: &Store,
    tx: &mut MySqlConnection,
    sku: &SkuId,
    repair: bool,
) -> Result<Vec<Finding>> {
    let record = db::lock_sku_record(tx, sku).await?;
    let snap = snapshot(store, sku).await?;
    match (snap, record) {
        // Indexed in Redis but defined nowhere: nothing to compare.
        (None, None) => Ok(Vec::new()),
        (None, Some(record)) => restore_missing(store, tx, sku, &record, repair).await,
        (Some(snap), record) => compare(store, tx, sku, snap, record, repair).await,
    }
}

/// Redis lost the SKU (a restart without persistence, a wipe): rebuild it from MySQL,
/// with every unit MySQL records as sold counted as sold, so none is sold twice.
async fn restore_missing(
    store: &Store,
    tx: &mut MySqlConnection,
    sku: &SkuId,
    record: &SkuRecord,
    repair: bool,
) -> Result<Vec<Finding>> {
    let mut finding = Finding {
        sku: sku.to_string(),
        kind: "redis_state_missing",
        detail: format!(
            "MySQL defines the SKU (stock_total={} sold={}) but Redis has no state for it",
            record.definition.stock_total, record.sold
        ),
        before: "missing".into(),
        after: None,
        repaired: false,
    };
    if repair {
        let (sold, _) = db::sales_totals(tx, sku, 0).await?;
        store.load_sku(sku, &record.definition, sold).await?;
        store
            .restore_usage(sku, &db::sold_per_user(tx, sku).await?)
            .await?;
        if sold != record.sold {
            db::set_sold(tx, sku, sold).await?;
        }
        // Only the counters may be gone (a partial loss): recount the holds that
        // survived and count the confirmations still waiting in the outbox as sold.
        let (floor, used_sold) = match snapshot(store, sku).await? {
            Some(snap) => match &snap.outbox_confirms {
                Some(confirms) => {
                    let expected = expected_sold(tx, sku, &snap, confirms).await?;
                    let per_user = sold_per_user(tx, sku, &expected).await?;
                    (expected.total, Some(per_user))
                }
                None => (sold, None),
            },
            None => (sold, None),
        };
        let (code, after) =
            repair_counters(store, sku, &record.definition, floor, used_sold.as_ref()).await?;
        finding.after = Some(after.clone());
        finding.repaired = true;
        if code == "overcommitted" {
            return Ok(vec![finding, overcommitted(sku, "missing".into(), after)]);
        }
    }
    Ok(vec![finding])
}

async fn compare(
    store: &Store,
    tx: &mut MySqlConnection,
    sku: &SkuId,
    snap: Snapshot,
    record: Option<SkuRecord>,
    repair: bool,
) -> Result<Vec<Finding>> {
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
    if snap.ghosts > 0 {
        finding(
            "ghost_holds",
            format!(
                "{} holds more than {GHOST_AFTER_MS} ms past their deadline still counted",
                snap.ghosts
            ),
        );
    }
    let Some(record) = record else {
        finding(
            "mysql_record_missing",
            "Redis has state for a SKU MySQL does not define; not repaired (define it again)"
                .into(),
        );
        return Ok(findings);
    };
    if record.definition.stock_total as i64 != snap.stock_total {
        finding(
            "stock_total_mismatch",
            format!("MySQL stock_total {}", record.definition.stock_total),
        );
    }
    let terms = terms_of(&record.definition);
    if terms != snap.terms {
        finding(
            "terms_mismatch",
            format!(
                "Redis sells under [per_user_limit, hold_ms, starts_at, ends_at] = {:?}, \
                 MySQL defines {terms:?}",
                snap.terms
            ),
        );
    }
    let rollbacks = db::open_flush_compensations(tx, sku).await?;
    if !rollbacks.is_empty() {
        let ids: Vec<&str> = rollbacks.iter().map(|c| c.id.as_str()).take(10).collect();
        finding(
            "payment_after_rollback",
            format!(
                "{} open compensation(s) for payments Redis accepted after losing a sale \
                 MySQL records (a rollback or failover); refund and resolve them: {}",
                rollbacks.len(),
                ids.join(" ")
            ),
        );
    }
    // One MySQL snapshot for all of this (REPEATABLE READ; and the row lock keeps
    // flushes of this SKU out until the check is done).
    let (mysql_sold, _) = db::sales_totals(tx, sku, snap.now_ms).await?;
    let mut mysql_sold_fix = None;
    if mysql_sold != record.sold {
        finding(
            "mysql_sold_mismatch",
            format!(
                "MySQL skus.sold {} but its sales add up to {mysql_sold}",
                record.sold
            ),
        );
        mysql_sold_fix = Some(mysql_sold);
    }
    let mut sold_floor = mysql_sold;
    let mut used_sold = None;
    match &snap.outbox_confirms {
        Some(confirms) => {
            let breakdown = expected_sold(tx, sku, &snap, confirms).await?;
            let (sold_before_snapshot, unflushed) = (breakdown.recorded, breakdown.unflushed);
            sold_floor = breakdown.total;
            let expected = breakdown.total as i64;
            let per_user = sold_per_user(tx, sku, &breakdown).await?;
            match (&snap.used, &snap.live_per_user) {
                (Some(used), Some(live)) => {
                    let drift = used_drift(used, live, &per_user);
                    if !drift.is_empty() {
                        let shown: Vec<String> = drift
                            .iter()
                            .take(5)
                            .map(|(u, has, should)| format!("{u:?}: {has} should be {should}"))
                            .collect();
                        finding(
                            "used_mismatch",
                            format!(
                                "{} users' per-user limit counts differ from their live holds + \
                                 purchases: {}",
                                drift.len(),
                                shown.join(", ")
                            ),
                        );
                    }
                    used_sold = Some(per_user);
                }
                _ => finding(
                    "check_skipped",
                    "too many users or holds to recount the per-user limits".into(),
                ),
            }
            if snap.sold < expected {
                finding(
                    "sold_behind_mysql",
                    format!(
                        "Redis sold {} < MySQL sold {sold_before_snapshot} + unflushed {unflushed}",
                        snap.sold
                    ),
                );
            } else if snap.sold > expected {
                finding(
                    "sold_ahead_of_mysql",
                    format!(
                        "Redis sold {} > MySQL sold {sold_before_snapshot} + unflushed {unflushed}: \
                         confirmations missing from the record; not repaired (MySQL cannot \
                         invent sales, and selling those units again could oversell)",
                        snap.sold
                    ),
                );
            }
        }
        None => finding("check_skipped", "outbox too long to compare sold".into()),
    }

    let drift = findings.iter().any(|f| !f.is_unknown());
    if !(repair && drift) {
        return Ok(findings);
    }
    if snap.ghosts > 0 {
        // Return every overdue hold first (bounded batches), then recount.
        for _ in 0..REPAIR_SWEEP_ROUNDS {
            let swept = store.sweep(sku).await?;
            if swept.still_due == 0 || swept.examined == 0 {
                break;
            }
        }
    }
    let (code, after) = repair_counters(
        store,
        sku,
        &record.definition,
        sold_floor,
        used_sold.as_ref(),
    )
    .await?;
    if let Some(sold) = mysql_sold_fix {
        db::set_sold(tx, sku, sold).await?;
    }
    for f in findings.iter_mut().filter(|f| !f.is_unknown()) {
        f.after = Some(after.clone());
        // Sales MySQL never recorded cannot be invented, and refunds are an
        // operator's: reported, not repaired.
        f.repaired = !matches!(f.kind, "sold_ahead_of_mysql" | "payment_after_rollback");
    }
    if code == "overcommitted" {
        findings.push(overcommitted(sku, snap.counters(), after));
    }
    Ok(findings)
}

fn overcommitted(sku: &SkuId, before: String, after: String) -> Finding {
    Finding {
        sku: sku.to_string(),
        kind: "overcommitted",
        detail: "held + sold exceed MySQL stock_total; available set to 0".into(),
        before,
        after: Some(after),
        repaired: false,
    }
}

/// What Redis `sold` must be at the snapshot's instant T.
struct ExpectedSold {
    /// The sales MySQL records as confirmed before T, plus the confirmations in the
    /// snapshot's outbox MySQL does not have (as of before T).
    total: u64,
    /// The MySQL part.
    recorded: u64,
    /// The unflushed part, and the same per user.
    unflushed: u64,
    unflushed_per_user: HashMap<String, i64>,
}

async fn expected_sold(
    tx: &mut MySqlConnection,
    sku: &SkuId,
    snap: &Snapshot,
    outbox_confirms: &[(String, i64, String)],
) -> Result<ExpectedSold> {
    let (_, sold_before) = db::sales_totals(tx, sku, snap.now_ms).await?;
    let rids: Vec<&str> = outbox_confirms
        .iter()
        .map(|(rid, _, _)| rid.as_str())
        .collect();
    let recorded = db::sales_recorded_before(tx, &rids, snap.now_ms).await?;
    let mut unflushed = 0;
    let mut unflushed_per_user: HashMap<String, i64> = HashMap::new();
    for (rid, quantity, user) in outbox_confirms {
        if !recorded.contains(rid) {
            unflushed += (*quantity).max(0) as u64;
            *unflushed_per_user.entry(user.clone()).or_default() += quantity;
        }
    }
    Ok(ExpectedSold {
        total: sold_before + unflushed,
        recorded: sold_before,
        unflushed,
        unflushed_per_user,
    })
}

/// Units each user bought: MySQL's sales plus the unflushed confirmations. (Under the
/// SKU's row lock no flush commits, so MySQL's sales are exactly those before T.)
async fn sold_per_user(
    tx: &mut MySqlConnection,
    sku: &SkuId,
    expected: &ExpectedSold,
) -> Result<HashMap<String, i64>> {
    let mut per_user: HashMap<String, i64> =
        db::sold_per_user(tx, sku).await?.into_iter().collect();
    for (user, quantity) in &expected.unflushed_per_user {
        *per_user.entry(user.clone()).or_default() += quantity;
    }
    Ok(per_user)
}

/// Users whose `used` count differs from their live holds + purchases: (user, has, should).
fn used_drift(
    used: &HashMap<String, i64>,
    live: &HashMap<String, i64>,
    sold: &HashMap<String, i64>,
) -> Vec<(String, i64, i64)> {
    let mut expected: HashMap<&str, i64> = HashMap::new();
    for (user, quantity) in live.iter().chain(sold) {
        *expected.entry(user.as_str()).or_default() += quantity;
    }
    let mut users: HashSet<&str> = expected.keys().copied().collect();
    users.extend(used.keys().map(String::as_str));
    let mut drift: Vec<(String, i64, i64)> = users
        .into_iter()
        .map(|u| {
            let has = used.get(u).copied().unwrap_or(0).max(0);
            let should = expected.get(u).copied().unwrap_or(0);
            (u.to_owned(), has, should)
        })
        .filter(|(_, has, should)| has != should)
        .collect();
    drift.sort();
    drift
}

/// Redis's terms of sale ([per_user_limit, hold_ms, starts_at, ends_at]) as MySQL
/// defines them.
fn terms_of(definition: &SkuDefinition) -> [String; 4] {
    let ms = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    [
        definition.per_user_limit.to_string(),
        (definition.hold_seconds * 1000).to_string(),
        ms(definition.starts_at_ms),
        ms(definition.ends_at_ms),
    ]
}

/// Returns (reply code, "stock_total=.. available=.. held=.. sold=..").
/// Counters from `sold_floor` and the live holds, terms from MySQL's definition, and,
/// given each user's purchases, `used` from the live holds + those.
async fn repair_counters(
    store: &Store,
    sku: &SkuId,
    definition: &SkuDefinition,
    sold_floor: u64,
    sold_per_user: Option<&HashMap<String, i64>>,
) -> Result<(String, String)> {
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    let used_sold = match sold_per_user {
        Some(per_user) => serde_json::to_string(per_user)
            .map_err(|e| Error::Internal(format!("per-user sales: {e}")))?,
        None => String::new(),
    };
    let mut invocation = SCRIPTS.repair.prepare_invoke();
    invocation
        .key(&keys.meta)
        .key(&keys.used)
        .key(&keys.deadlines)
        .arg(definition.stock_total)
        .arg(sold_floor)
        .arg(crate::limits::SWEEP_BATCH)
        .arg(SNAPSHOT_CAP);
    for term in terms_of(definition) {
        invocation.arg(term);
    }
    let reply: Vec<String> = invocation.arg(used_sold).invoke_async(&mut conn).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn snapshots_parse() {
        assert!(parse_snapshot(&reply(&["missing"])).unwrap().is_none());
        let snap = parse_snapshot(&reply(&[
            "ok", "1000", "10", "5", "3", "2", "3", "1", "0", "1", "2", "1", "2", "1", "600000",
            "", "", "r1", "1", "alice", "r2", "1", "bob", "carol", "3", "alice", "1", "carol", "3",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (snap.stock_total, snap.available, snap.held, snap.sold),
            (10, 5, 3, 2)
        );
        assert_eq!(snap.live_held, Some(3));
        assert_eq!(snap.outbox_confirms.as_ref().unwrap().len(), 2);
        assert_eq!(snap.live_per_user.as_ref().unwrap()["carol"], 3);
        assert_eq!(snap.used.as_ref().unwrap().len(), 2);
        assert_eq!(snap.terms[1], "600000");
        let snap = parse_snapshot(&reply(&[
            "ok", "1", "1", "1", "0", "0", "-1", "0", "0", "0", "0", "-1", "-1", "1", "1000", "",
            "",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((snap.live_held, snap.outbox_confirms), (None, None));
        assert_eq!((snap.live_per_user, snap.used), (None, None));
        assert!(parse_snapshot(&reply(&["ok", "1", "x"])).is_err());
        // A count that promises more entries than the reply has.
        assert!(parse_snapshot(&reply(&[
            "ok", "1", "1", "1", "0", "0", "0", "0", "0", "1", "1", "0", "0", "1", "1000", "", "",
            "r1", "1"
        ]))
        .is_err());
    }

    #[test]
    fn used_drift_compares_live_holds_plus_purchases() {
        let map = |pairs: &[(&str, i64)]| -> HashMap<String, i64> {
            pairs.iter().map(|(u, q)| (u.to_string(), *q)).collect()
        };
        let used = map(&[("alice", 2), ("bob", 1), ("alice ", 1)]);
        let live = map(&[("alice", 1)]);
        let sold = map(&[("alice", 1), ("alice ", 1), ("carol", 2)]);
        // bob has nothing live or bought; carol's purchases are not counted.
        assert_eq!(
            used_drift(&used, &live, &sold),
            vec![("bob".to_string(), 1, 0), ("carol".to_string(), 0, 2)]
        );
    }
}
