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
use crate::limits;
use crate::reservation::SkuDefinition;
use crate::store::{Store, SCRIPTS};
use crate::telemetry;

/// Entries one slice of a check reads (holds, users, outbox entries, log entries): each
/// slice is one short Redis call (well under 5 ms), so a check of any size never
/// blocks a sale. Inspecting one hold costs about 2-4 µs of script time.
pub const SLICE: usize = 256;
/// Holds one `recon_holds.lua` slice reads: each is a hash read besides the ZSCAN
/// step (measured: up to 7 ms for 256 on a busy Redis; 128 keeps a slice near 3 ms).
const HOLDS_SLICE: usize = 128;
/// Past its first PACE_AFTER slices, a check keeps to this share of the time (it
/// waits between slices), so a check of a million holds slows the sale on that Redis
/// by a few percent, not by half. Smaller checks (a few thousand holds, a few ms of
/// Redis time) run at once.
const CHECK_DUTY: f64 = 0.2;
const PACE_AFTER: usize = 16;

/// Waits after slice number `slice` so that slices take at most CHECK_DUTY of the time.
async fn pace(slice: usize, slice_started: std::time::Instant) {
    if slice >= PACE_AFTER {
        let busy = slice_started.elapsed();
        tokio::time::sleep(busy.mul_f64(1.0 / CHECK_DUTY - 1.0)).await;
    }
}

/// How long a check waits for another check of the same SKU to end.
const CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// A check's claim on the SKU's creation log (lua/recon_begin.lua) is a lease this
/// long, renewed as the check reads (`CheckLease`): a check that died, or a claim a
/// Redis rollback brought back, keeps the SKU's other checks waiting this long at
/// most. A check that goes longer without renewing (stalled) is incomplete: drift
/// unknown.
const CHECK_LEASE_MS: i64 = 10_000;
/// How often a check renews its lease: well inside it.
const CHECK_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Holds this far past their deadline and still counted are ghosts: the sweeper
/// (interval 1 s by default) should have returned them long ago.
pub const GHOST_AFTER_MS: i64 = 10_000;
/// Sweep batches the repair runs at most to return ghost holds.
const REPAIR_SWEEP_ROUNDS: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub sku: String,
    /// `redis_state_missing`, `mysql_record_missing`, `equation_broken`, `held_mismatch`,
    /// `ghost_holds`, `stock_total_mismatch`, `terms_mismatch`, `used_mismatch`,
    /// `mysql_sold_mismatch`, `sold_behind_mysql`, `sold_ahead_of_mysql`,
    /// `overcommitted`, `payment_after_rollback`, `units_outside_home`, and the
    /// drift-unknown ones:
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

/// What `flashgate reconcile` prints: `--json` (the contract's document) or a table.
impl ReconcileReport {
    /// Findings repaired by this pass.
    pub fn repaired(&self) -> usize {
        self.findings.iter().filter(|f| f.repaired).count()
    }

    /// Findings left for a person: drift not repaired, and checks that could not
    /// complete (drift unknown).
    pub fn needs_attention(&self) -> usize {
        self.findings.iter().filter(|f| !f.repaired).count()
    }

    /// `{"checked", "findings": [{"sku", "kind", "detail", "repaired", "before",
    /// "after"}], "repaired", "needs_attention"}`; `after` is null when nothing was
    /// changed.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "checked": self.skus_checked,
            "findings": self.findings,
            "repaired": self.repaired(),
            "needs_attention": self.needs_attention(),
        })
    }

    /// A header line and one row per finding (its counters before and after on the
    /// lines below it), then a summary line; only the summary when nothing was found.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if !self.findings.is_empty() {
            let sku_width = self
                .findings
                .iter()
                .map(|f| f.sku.len())
                .max()
                .unwrap_or(0)
                .max(3);
            let kind_width = self
                .findings
                .iter()
                .map(|f| f.kind.len())
                .max()
                .unwrap_or(0)
                .max(4);
            let row = |out: &mut String, sku: &str, kind: &str, result: &str, detail: &str| {
                let line =
                    format!("{sku:<sku_width$}  {kind:<kind_width$}  {result:<12}  {detail}");
                let _ = writeln!(out, "{}", line.trim_end());
            };
            row(&mut out, "SKU", "KIND", "RESULT", "DETAIL");
            let indent = " ".repeat(sku_width + 2);
            for f in &self.findings {
                let result = if f.repaired {
                    "repaired"
                } else if f.is_unknown() {
                    "unknown"
                } else {
                    "not repaired"
                };
                row(&mut out, &f.sku, f.kind, result, &f.detail);
                let _ = writeln!(out, "{indent}before: {}", f.before);
                if let Some(after) = &f.after {
                    let _ = writeln!(out, "{indent}after:  {after}");
                }
            }
        }
        let skus = match self.skus_checked {
            1 => "1 SKU".to_string(),
            n => format!("{n} SKUs"),
        };
        if self.findings.is_empty() {
            let _ = writeln!(out, "checked {skus}: no drift");
        } else {
            let findings = match self.findings.len() {
                1 => "1 finding".to_string(),
                n => format!("{n} findings"),
            };
            let _ = writeln!(
                out,
                "checked {skus}: {findings}, {} repaired, {} need attention",
                self.repaired(),
                self.needs_attention()
            );
        }
        out
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
    /// Confirmations whose events are in the outbox; None when the outbox was too long
    /// to read.
    outbox_confirms: Option<Vec<OutboxConfirm>>,
    /// Units of the live holds per user; None when too many holds to count.
    live_per_user: Option<HashMap<String, i64>>,
    /// The `used` hash; None when too many users to read.
    used: Option<HashMap<String, i64>>,
    /// per_user_limit, hold_ms, starts_at, ends_at, paused as Redis has them.
    terms: [String; 5],
}

impl Snapshot {
    fn counters(&self) -> String {
        format!(
            "stock_total={} available={} held={} sold={}",
            self.stock_total, self.available, self.held, self.sold
        )
    }
}

/// The SKU as it was at one instant T, read in slices while sales go on (see
/// `lua/recon_begin.lua`): holds created after T are in the check's creation log,
/// holds that ended after T are outbox entries after T's position, so the live holds
/// and each user's usage at T are exact whatever happened during the read. None when
/// Redis has no state for the SKU. The parts that could not be made exact (the log
/// overflowed or the check outlasted its window) come back as None: drift unknown.
async fn snapshot(store: &Store, sku: &SkuId) -> Result<Option<Snapshot>> {
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    let check_id = format!("{:016x}", rand::random::<u64>());
    let waiting_since = std::time::Instant::now();
    // One check of a SKU at a time (the creation log is the SKU's): wait for one that
    // runs (the worker's schedule and a cron may meet), for a while.
    let head: Vec<String> = loop {
        let head: Vec<String> = SCRIPTS
            .recon_begin
            .key(&keys.meta)
            .key(&keys.deadlines)
            .key(&keys.outbox)
            .key(&keys.rlog)
            .arg(GHOST_AFTER_MS)
            .arg(CHECK_LEASE_MS)
            .arg(&check_id)
            .invoke_async(&mut conn)
            .await?;
        if head.first().map(String::as_str) != Some("busy") {
            break head;
        }
        if waiting_since.elapsed() >= CHECK_WAIT {
            return Err(Error::Internal(format!(
                "another check of {sku} has been running for over {CHECK_WAIT:?}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let Some(mut snap) = parse_head(&head)? else {
        return Ok(None);
    };
    let position_t = head[8].clone();
    let mut lease = CheckLease {
        keys: &keys,
        check_id: &check_id,
        renewed: std::time::Instant::now(),
    };
    let read = read_slices(store, &keys, &position_t, &mut lease).await;
    // Whatever happened, the log stops here.
    let incomplete: i64 = SCRIPTS
        .recon_end
        .key(&keys.meta)
        .key(&keys.rlog)
        .arg(&check_id)
        .invoke_async(&mut conn)
        .await?;
    let mut slices = read?;
    snap.outbox_confirms = Some(std::mem::take(&mut slices.confirms_before_t));
    if incomplete == 0 {
        let at_t = slices.at_t();
        snap.live_held = Some(at_t.live.values().map(|(q, _)| q).sum());
        let mut per_user: HashMap<String, i64> = HashMap::new();
        for (q, user) in at_t.live.values() {
            *per_user.entry(user.clone()).or_default() += q;
        }
        snap.live_per_user = Some(per_user);
        snap.used = Some(at_t.used);
    }
    Ok(Some(snap))
}

/// recon_begin.lua's reply: the counters at T; the sliced parts are filled in later.
fn parse_head(reply: &[String]) -> Result<Option<Snapshot>> {
    if reply.first().map(String::as_str) != Some("ok") {
        return Ok(None);
    }
    let bad = || Error::Internal(format!("unexpected check reply {reply:?}"));
    // 13 fields from a script before `paused` was a term, else 14.
    if !matches!(reply.len(), 13 | 14) {
        return Err(bad());
    }
    let n = |i: usize| -> Result<i64> { reply[i].parse().map_err(|_| bad()) };
    Ok(Some(Snapshot {
        now_ms: n(1)?,
        stock_total: n(2)?,
        available: n(3)?,
        held: n(4)?,
        sold: n(5)?,
        live_held: None,
        ghosts: n(7)?,
        outbox_confirms: None,
        live_per_user: None,
        used: None,
        terms: [
            reply[9].clone(),
            reply[10].clone(),
            reply[11].clone(),
            reply[12].clone(),
            reply.get(13).cloned().unwrap_or_else(|| "0".into()),
        ],
    }))
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(id: &str) -> Result<EntryId> {
        let (ms, seq) = id
            .split_once('-')
            .ok_or_else(|| Error::Internal(format!("bad stream id {id}")))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| Error::Internal(format!("bad stream id {id}")))
        };
        Ok(EntryId(num(ms)?, num(seq)?))
    }
}

/// A hold that ended after T (its outbox event).
struct Ended {
    id: EntryId,
    rid: String,
    quantity: i64,
    user: String,
    /// Cancelled or expired: its units left `used` (a sale's stay).
    released: bool,
}

/// What the slices read; `at_t` turns it into the state at T.
#[derive(Default)]
struct Slices {
    /// Live holds seen by the walk: rid -> (quantity, user).
    seen_holds: HashMap<String, (i64, String)>,
    /// `used` as read: user -> (units, log length and outbox position of the read).
    seen_used: HashMap<String, (i64, usize, EntryId)>,
    confirms_before_t: Vec<OutboxConfirm>,
    /// Holds created after T, in order: (rid, quantity, user).
    created: Vec<(String, i64, String)>,
    ended: Vec<Ended>,
}

struct AtT {
    live: HashMap<String, (i64, String)>,
    used: HashMap<String, i64>,
}

impl Slices {
    fn at_t(&self) -> AtT {
        let created: HashSet<&str> = self
            .created
            .iter()
            .map(|(rid, _, _)| rid.as_str())
            .collect();
        // Live at T: seen live and not made since, or made before T and ended since.
        let mut live: HashMap<String, (i64, String)> = self
            .seen_holds
            .iter()
            .filter(|(rid, _)| !created.contains(rid.as_str()))
            .map(|(rid, v)| (rid.clone(), v.clone()))
            .collect();
        for e in &self.ended {
            if !created.contains(e.rid.as_str()) {
                live.insert(e.rid.clone(), (e.quantity, e.user.clone()));
            }
        }
        // used at T = as read, less the holds made since T, plus those released since
        // T, each counted up to the position the value was read at.
        let mut made_by: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
        for (index, (_, quantity, user)) in self.created.iter().enumerate() {
            made_by.entry(user).or_default().push((index, *quantity));
        }
        let mut released_by: HashMap<&str, Vec<(EntryId, i64)>> = HashMap::new();
        for e in self.ended.iter().filter(|e| e.released) {
            released_by
                .entry(&e.user)
                .or_default()
                .push((e.id, e.quantity));
        }
        let used = self
            .seen_used
            .iter()
            .map(|(user, (units, log_len, position))| {
                let made: i64 = made_by
                    .get(user.as_str())
                    .map(|v| v.iter().filter(|(i, _)| i < log_len).map(|(_, q)| q).sum())
                    .unwrap_or(0);
                let released: i64 = released_by
                    .get(user.as_str())
                    .map(|v| {
                        v.iter()
                            .filter(|(id, _)| id <= position)
                            .map(|(_, q)| q)
                            .sum()
                    })
                    .unwrap_or(0);
                (user.clone(), units - made + released)
            })
            .collect();
        AtT { live, used }
    }
}

/// A running check's claim on its SKU's creation log, renewed every CHECK_RENEW_EVERY
/// as the check reads (lua/recon_renew.lua). A claim that ran out or was taken over is
/// not renewed: recon_end.lua then says the check is incomplete.
struct CheckLease<'a> {
    keys: &'a SkuKeys,
    check_id: &'a str,
    renewed: std::time::Instant,
}

impl CheckLease<'_> {
    async fn keep(&mut self, conn: &mut crate::store::RedisConnection) -> Result<()> {
        if self.renewed.elapsed() < CHECK_RENEW_EVERY {
            return Ok(());
        }
        let _held: i64 = SCRIPTS
            .recon_renew
            .key(&self.keys.meta)
            .key(&self.keys.rlog)
            .arg(self.check_id)
            .arg(CHECK_LEASE_MS)
            .invoke_async(conn)
            .await?;
        self.renewed = std::time::Instant::now();
        Ok(())
    }
}

async fn read_slices(
    store: &Store,
    keys: &SkuKeys,
    position_t: &str,
    lease: &mut CheckLease<'_>,
) -> Result<Slices> {
    let mut conn = store.connection();
    let mut slices = Slices::default();
    let t = EntryId::parse(position_t)?;

    // 1. The live holds.
    let mut cursor = "0".to_string();
    for slice in 0.. {
        lease.keep(&mut conn).await?;
        let started = std::time::Instant::now();
        let reply: Vec<String> = SCRIPTS
            .recon_holds
            .key(&keys.meta)
            .key(&keys.deadlines)
            .key(&keys.holds)
            .arg(&cursor)
            .arg(HOLDS_SLICE)
            .invoke_async(&mut conn)
            .await?;
        let (next, holds) = reply.split_first().ok_or_else(|| bad_slice(&reply))?;
        for h in holds.chunks(3) {
            let [rid, quantity, user] = h else {
                return Err(bad_slice(&reply));
            };
            let quantity = quantity.parse().map_err(|_| bad_slice(&reply))?;
            slices
                .seen_holds
                .insert(rid.clone(), (quantity, user.clone()));
        }
        if next == "0" {
            break;
        }
        cursor = next.clone();
        pace(slice, started).await;
    }

    // 2. The per-user usage, with the position of each read.
    let mut cursor = "0".to_string();
    for slice in 0.. {
        lease.keep(&mut conn).await?;
        let started = std::time::Instant::now();
        let (next, read) = read_used(
            &mut conn,
            keys,
            &["scan".to_string(), cursor, SLICE.to_string()],
        )
        .await?;
        for (user, entry) in read {
            slices.seen_used.entry(user).or_insert(entry);
        }
        if next == "0" {
            break;
        }
        cursor = next;
        pace(slice, started).await;
    }

    // 3. The confirmations in the outbox up to T.
    let mut from = "-".to_string();
    loop {
        lease.keep(&mut conn).await?;
        let page = read_outbox(&mut conn, keys, &from, position_t).await?;
        for (id, event) in &page {
            if event.get("type").map(String::as_str) == Some("confirmed") {
                let (rid, quantity, user) = event_hold(event)?;
                slices.confirms_before_t.push(OutboxConfirm {
                    rid,
                    quantity,
                    user,
                    payment_ref: event.get("payment_ref").cloned().unwrap_or_default(),
                });
            }
            from = format!("({id}");
        }
        if page.len() < SLICE {
            break;
        }
    }

    // 4. What changed since T, up to now: ends (outbox after T), then creations (the
    // log, read after the outbox so that every hold that ended is also there if it
    // was made after T).
    let mut ended_to = t;
    lease.keep(&mut conn).await?;
    read_ended(&mut conn, keys, &mut slices, &mut ended_to, None).await?;
    lease.keep(&mut conn).await?;
    let mut log_read = 0;
    read_created(&mut conn, keys, &mut slices, &mut log_read, None).await?;

    // 5. Users the scan may have missed (their entry came or went during it) all
    // changed since T: read them now, then the changes up to where they were read.
    let mut missing: Vec<String> = slices
        .created
        .iter()
        .map(|(_, _, user)| user)
        .chain(slices.ended.iter().filter(|e| e.released).map(|e| &e.user))
        .filter(|user| !slices.seen_used.contains_key(*user))
        .cloned()
        .collect::<HashSet<String>>()
        .into_iter()
        .collect();
    missing.sort();
    let (mut log_needed, mut outbox_needed) = (log_read, ended_to);
    for users in missing.chunks(SLICE) {
        lease.keep(&mut conn).await?;
        let mut args = vec!["users".to_string()];
        args.extend(users.iter().cloned());
        let (_, read) = read_used(&mut conn, keys, &args).await?;
        for (user, entry) in read {
            log_needed = log_needed.max(entry.1);
            outbox_needed = outbox_needed.max(entry.2);
            slices.seen_used.entry(user).or_insert(entry);
        }
    }
    lease.keep(&mut conn).await?;
    read_ended(
        &mut conn,
        keys,
        &mut slices,
        &mut ended_to,
        Some(outbox_needed),
    )
    .await?;
    lease.keep(&mut conn).await?;
    read_created(
        &mut conn,
        keys,
        &mut slices,
        &mut log_read,
        Some(log_needed),
    )
    .await?;
    Ok(slices)
}

fn bad_slice(reply: &[String]) -> Error {
    Error::Internal(format!("unexpected check slice {reply:?}"))
}

type UsedRead = (i64, usize, EntryId);

async fn read_used(
    conn: &mut crate::store::RedisConnection,
    keys: &SkuKeys,
    args: &[String],
) -> Result<(String, Vec<(String, UsedRead)>)> {
    let mut invocation = SCRIPTS.recon_used.prepare_invoke();
    invocation.key(&keys.used).key(&keys.rlog).key(&keys.outbox);
    for arg in args {
        invocation.arg(arg);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    let [next, log_len, position, pairs @ ..] = reply.as_slice() else {
        return Err(bad_slice(&reply));
    };
    let log_len: usize = log_len.parse().map_err(|_| bad_slice(&reply))?;
    let position = EntryId::parse(position)?;
    let mut read = Vec::with_capacity(pairs.len() / 2);
    for p in pairs.chunks(2) {
        let [user, units] = p else {
            return Err(bad_slice(&reply));
        };
        let units = units.parse().map_err(|_| bad_slice(&reply))?;
        read.push((user.clone(), (units, log_len, position)));
    }
    Ok((next.clone(), read))
}

/// One page of outbox entries in (`from`, `to`], as field maps.
async fn read_outbox(
    conn: &mut crate::store::RedisConnection,
    keys: &SkuKeys,
    from: &str,
    to: &str,
) -> Result<Vec<(String, HashMap<String, String>)>> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&keys.outbox)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(SLICE)
        .query_async(conn)
        .await?;
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let mut fields = HashMap::new();
            for (k, v) in entry.map {
                let v: String = redis::from_redis_value(v)
                    .map_err(|e| Error::Internal(format!("outbox field {k}: {e}")))?;
                fields.insert(k, v);
            }
            Ok((entry.id, fields))
        })
        .collect()
}

/// A confirmation whose event is in the outbox.
#[derive(Debug, Clone)]
struct OutboxConfirm {
    rid: String,
    quantity: i64,
    user: String,
    payment_ref: String,
}

fn event_hold(event: &HashMap<String, String>) -> Result<(String, i64, String)> {
    let field = |name: &str| {
        event
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("outbox event without {name}: {event:?}")))
    };
    let quantity = field("quantity")?
        .parse()
        .map_err(|_| Error::Internal(format!("bad quantity in {event:?}")))?;
    Ok((field("reservation_id")?, quantity, field("user_id")?))
}

/// Reads the holds that ended after `*from` up to `until` (or the outbox's end as
/// first looked at), advancing `*from`.
async fn read_ended(
    conn: &mut crate::store::RedisConnection,
    keys: &SkuKeys,
    slices: &mut Slices,
    from: &mut EntryId,
    until: Option<EntryId>,
) -> Result<()> {
    let until = match until {
        Some(id) => id,
        None => {
            let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&keys.outbox)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            match last.ids.first() {
                Some(entry) => EntryId::parse(&entry.id)?,
                None => return Ok(()),
            }
        }
    };
    while *from < until {
        let page = read_outbox(
            conn,
            keys,
            &format!("({}-{}", from.0, from.1),
            &format!("{}-{}", until.0, until.1),
        )
        .await?;
        for (id, event) in &page {
            *from = EntryId::parse(id)?;
            let released = match event.get("type").map(String::as_str) {
                Some("ended") => true,
                Some("confirmed") => false,
                _ => continue,
            };
            let (rid, quantity, user) = event_hold(event)?;
            slices.ended.push(Ended {
                id: *from,
                rid,
                quantity,
                user,
                released,
            });
        }
        if page.len() < SLICE {
            break;
        }
    }
    Ok(())
}

/// Reads the creation log from `*read` up to `until` entries (or its length as first
/// looked at), advancing `*read`.
async fn read_created(
    conn: &mut crate::store::RedisConnection,
    keys: &SkuKeys,
    slices: &mut Slices,
    read: &mut usize,
    until: Option<usize>,
) -> Result<()> {
    let until = match until {
        Some(n) => n,
        None => {
            let n: usize = redis::cmd("LLEN").arg(&keys.rlog).query_async(conn).await?;
            n
        }
    };
    while *read < until {
        let last = (*read + SLICE).min(until) - 1;
        let page: Vec<String> = redis::cmd("LRANGE")
            .arg(&keys.rlog)
            .arg(*read)
            .arg(last)
            .query_async(conn)
            .await?;
        if page.is_empty() {
            break;
        }
        for entry in &page {
            let mut parts = entry.splitn(3, ' ');
            let (Some(quantity), Some(rid), Some(user)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(Error::Internal(format!("bad creation log entry {entry:?}")));
            };
            let quantity = quantity
                .parse()
                .map_err(|_| Error::Internal(format!("bad creation log entry {entry:?}")))?;
            slices
                .created
                .push((rid.to_string(), quantity, user.to_string()));
        }
        *read += page.len();
    }
    Ok(())
}

/// One pass over `only`, or every SKU Redis has on sale or MySQL expects on sale
/// (not every SKU ever defined: a retired one has nothing in Redis to check).
pub async fn run(
    store: &Store,
    pool: &MySqlPool,
    only: Option<&SkuId>,
    repair: bool,
) -> Result<ReconcileReport> {
    let skus: Vec<SkuId> = match only {
        Some(sku) => vec![sku.sku()],
        None => {
            // A split SKU's buckets are indexed one by one: each SKU is checked once.
            let mut all: HashSet<String> = store
                .sku_ids()
                .await?
                .into_iter()
                .map(|s| s.sku().to_string())
                .collect();
            all.extend(db::open_sku_ids(pool, crate::explore::host_clock_ms()).await?);
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
    run_skus_with(store, pool, skus, repair, false).await
}

/// `run_skus`, or with `old_rebuild` the rebuild of a split SKU as it was before the
/// explorer (one lost bucket planned at a time): kept, hidden, so that tests/explore
/// can show it still finds the over-allocation that planner made.
#[doc(hidden)]
pub async fn run_skus_with(
    store: &Store,
    pool: &MySqlPool,
    skus: &[SkuId],
    repair: bool,
    old_rebuild: bool,
) -> Result<ReconcileReport> {
    let mut report = ReconcileReport::default();
    for sku in skus {
        // One SKU that cannot be checked is reported (drift unknown) and the pass goes
        // on; an outage of Redis or MySQL ends it (could not run).
        let findings = match reconcile_sku(store, pool, sku, repair, old_rebuild).await {
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

/// What one check covers: a SKU, or one bucket of a SKU split over several
/// (src/buckets.rs). A bucket is checked as a sale of its own against the MySQL sales
/// it made (its reservation ids name it); what only the whole SKU has (its stock_total,
/// skus.sold, compensations after a rollback) is checked once per SKU.
struct Scope {
    sku: SkuId,
    sale: SkuId,
    sales: db::SalesOf,
    buckets: u32,
    /// A lost bucket of a split SKU: the stock_total the rebuild planned for it with
    /// the SKU's other lost buckets (`rebuild_lost_buckets`); None outside that plan.
    planned: Option<u64>,
    /// The explorer's old planner: each lost bucket planned alone.
    old_rebuild: bool,
}

impl Scope {
    fn whole(sku: &SkuId) -> Scope {
        Scope {
            sku: sku.clone(),
            sale: sku.clone(),
            sales: db::SalesOf::sku(sku),
            buckets: 1,
            planned: None,
            old_rebuild: false,
        }
    }

    fn bucket(sale: &SkuId, buckets: u32) -> Scope {
        Scope {
            sku: sale.sku(),
            sale: sale.clone(),
            sales: db::SalesOf::bucket(sale),
            buckets,
            planned: None,
            old_rebuild: false,
        }
    }

    fn split(&self) -> bool {
        self.buckets > 1
    }

    /// The check that also covers what belongs to the whole SKU (bucket 0's).
    fn first(&self) -> bool {
        self.sale == self.sku
    }
}

/// Checks (and repairs) one SKU: Redis first, read in slices at one instant T while
/// sales go on (no MySQL lock held meanwhile: a big SKU takes a while), then MySQL in
/// one transaction that locks the SKU's row, comparing what MySQL records before T.
/// Sales flushed after T are filtered by their `confirmed_at`; no outbox entry after T
/// is trimmed while the check runs (lua/trim_outbox.lua), and one before T trimmed
/// before it was read was committed to MySQL before it was trimmed. A split SKU is
/// checked bucket by bucket, then its stock over all buckets.
async fn reconcile_sku(
    store: &Store,
    pool: &MySqlPool,
    sku: &SkuId,
    repair: bool,
    old_rebuild: bool,
) -> Result<Vec<Finding>> {
    // Fixed at creation: MySQL's word, else what Redis says (a SKU MySQL lacks).
    let buckets = match db::sku_record(pool, sku).await? {
        Some(record) => record.definition.buckets,
        None => store.bucket_count(sku).await?.unwrap_or(1),
    };
    if buckets <= 1 && !repair {
        return reconcile_sale(store, pool, &Scope::whole(sku), false).await;
    }
    if buckets > 1 && (!repair || old_rebuild) {
        let mut findings = Vec::new();
        for sale in crate::buckets::sales(sku, buckets) {
            let mut scope = Scope::bucket(&sale, buckets);
            scope.old_rebuild = old_rebuild;
            findings.extend(reconcile_sale(store, pool, &scope, repair).await?);
        }
        findings.extend(check_split_stock_now(store, pool, sku, buckets, repair).await?);
        findings.extend(bring_units_home(store, pool, sku, buckets, repair).await?);
        return Ok(findings);
    }
    // A repair runs under the SKU's admin lock (`db::SkuLock`), whole. An admin PUT
    // commits MySQL's new definition, then loads Redis, and puts MySQL's old one back
    // if Redis refuses (reserves took the units a cut counted on): a repair in between
    // would set Redis to a stock that MySQL then takes back (and, below the committed
    // units, report `overcommitted` with units left unsold: the explorer's waiting room
    // with an operator found it). For a split SKU the PUT changes each bucket in turn,
    // and a repair in between would either apply the change again (the SKU-wide stock)
    // or, correcting a bucket by what it found before the PUT changed that bucket,
    // raise the bucket's stock_total past its share (the explorer's operator found both).
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    db::SkuLock::acquire(&mut conn, sku).await?;
    let findings = match buckets {
        0 | 1 => reconcile_sale(store, pool, &Scope::whole(sku), true).await,
        _ => repair_split_sku(store, pool, &mut conn, sku, buckets).await,
    };
    db::SkuLock::release(&mut conn, sku).await?;
    findings
}

/// `reconcile_sku` with repair for a split SKU; the caller holds its admin lock on `conn`.
async fn repair_split_sku(
    store: &Store,
    pool: &MySqlPool,
    conn: &mut MySqlConnection,
    sku: &SkuId,
    buckets: u32,
) -> Result<Vec<Finding>> {
    let mut findings = rebuild_lost_buckets(store, conn, sku, buckets, false).await?;
    for sale in crate::buckets::sales(sku, buckets) {
        let scope = Scope::bucket(&sale, buckets);
        findings.extend(reconcile_sale(store, pool, &scope, true).await?);
    }
    findings.extend(check_split_stock_now(store, pool, sku, buckets, true).await?);
    findings.extend(bring_units_home(store, pool, sku, buckets, true).await?);
    Ok(findings)
}

/// A split SKU whose buyers are all homed in bucket 0 (a waiting room: buckets::homes)
/// sells only there, and no transfer runs: units on sale in another bucket (put there
/// by a gateway older than that rule, say) would never sell. The repair moves them to
/// bucket 0 by the transfer protocol (`Store::move_units`): the SKU adds up at every
/// instant, and a move cut short is given by the finisher. Holds and sales stay where
/// they are.
async fn bring_units_home(
    store: &Store,
    pool: &MySqlPool,
    sku: &SkuId,
    buckets: u32,
    repair: bool,
) -> Result<Vec<Finding>> {
    let Some(record) = db::sku_record(pool, sku).await? else {
        return Ok(Vec::new());
    };
    if record.definition.homes() != 1 || sale_over(&record) {
        return Ok(Vec::new());
    }
    let sales = crate::buckets::sales(sku, buckets);
    let now = store.split_stock_still(&sales).await?;
    if now.stock_total.iter().any(Option::is_none) {
        return Ok(Vec::new()); // a lost bucket: its rebuild plans
    }
    let away: u64 = now.available.iter().skip(1).sum();
    if away == 0 {
        return Ok(Vec::new());
    }
    let mut finding = Finding {
        sku: sku.to_string(),
        kind: "units_outside_home",
        detail: format!(
            "a SKU whose buyers are all homed in bucket 0 has units on sale in other buckets: \
             available {:?}",
            now.available
        ),
        before: format!("available outside bucket 0={away}"),
        after: None,
        repaired: false,
    };
    if !repair {
        return Ok(vec![finding]);
    }
    let home = SkuKeys::new(&sales[0]);
    let mut moved = 0u64;
    for (sale, &available) in sales.iter().zip(&now.available).skip(1) {
        if available > 0 {
            // Fewer when reserves (an older gateway's) took some since the reading, or
            // none when the give is left to the finisher (the next pass sees).
            moved += store
                .move_units(&SkuKeys::new(sale), &home, available)
                .await?;
        }
    }
    finding.repaired = moved == away;
    finding.after = Some(format!("available outside bucket 0={}", away - moved));
    Ok(vec![finding])
}

async fn reconcile_sale(
    store: &Store,
    pool: &MySqlPool,
    scope: &Scope,
    repair: bool,
) -> Result<Vec<Finding>> {
    // Retired: the sweep found nothing in Redis MySQL lacks, and dropped the rest but
    // the tombstone and the usage records.
    if store.is_retired(&scope.sale).await? {
        return Ok(Vec::new());
    }
    let snap = snapshot(store, &scope.sale).await?;
    let mut conn = pool.acquire().await?;
    let mut tx = db::begin_check(&mut conn).await?;
    let findings = check_sku(store, &mut tx, scope, snap, repair).await?;
    tx.commit().await?;
    Ok(findings)
}

/// A split SKU's stock over all its buckets: Σ stock_total + in transit == MySQL's
/// stock_total. Drift only when every reading agrees on it; the repair adds what is
/// missing to bucket 0 (transfers spread it) and takes what is too much from the
/// buckets with the most available, never below a bucket's committed units. A repair
/// runs under the SKU's admin lock (`reconcile_sku`).
async fn check_split_stock_now(
    store: &Store,
    pool: &MySqlPool,
    sku: &SkuId,
    buckets: u32,
    repair: bool,
) -> Result<Vec<Finding>> {
    let Some(record) = db::sku_record(pool, sku).await? else {
        return Ok(Vec::new());
    };
    let sales = crate::buckets::sales(sku, buckets);
    let mut readings = Vec::new();
    for reading in 0..limits::SPLIT_STOCK_READINGS {
        if reading > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (stock, in_transit) = store.split_stock(&sales).await?;
        if stock.iter().all(Option::is_none) {
            return Ok(Vec::new()); // retired everywhere: nothing left to sell
        }
        if stock.iter().any(Option::is_none) {
            // A lost bucket: its rebuild (`rebuild_lost_buckets`) plans the stock; a
            // change to bucket 0 now would count the lost bucket's units twice.
            return Ok(Vec::new());
        }
        let held: u64 = stock.iter().flatten().sum::<u64>() + in_transit;
        if held == record.definition.stock_total {
            return Ok(Vec::new());
        }
        readings.push((stock, in_transit, held));
    }
    let (stock, in_transit, held) = readings.pop().expect("readings");
    let change = record.definition.stock_total as i64 - held as i64;
    let mut finding = Finding {
        sku: sku.to_string(),
        kind: "stock_total_mismatch",
        detail: format!(
            "the buckets' stock_total {stock:?} + {in_transit} in transit add up to {held}, \
             MySQL stock_total {}",
            record.definition.stock_total
        ),
        before: format!("stock_total={held}"),
        after: None,
        repaired: false,
    };
    if repair {
        // More goes to bucket 0 (transfers carry it on); less is taken from the buckets
        // with the most available, as an admin PUT does (gateway::stock_changes).
        let (needed, available) = if change < 0 {
            // Cut transfers given first: their units would go on sale after the take.
            let keys: Vec<SkuKeys> = sales.iter().map(SkuKeys::new).collect();
            store
                .finish_transfers(&keys, store.transfer_timing.stale)
                .await?;
            // Read again while no transfer runs: the change and where units are.
            let now = store.split_stock_still(&sales).await?;
            let Some(total) = now.stock_total.iter().copied().sum::<Option<u64>>() else {
                return Ok(vec![finding]); // a bucket lost meanwhile: its rebuild plans
            };
            let change = record.definition.stock_total as i64 - (total + now.in_transit) as i64;
            (change, now.available)
        } else {
            (change, vec![0; sales.len()])
        };
        // Too much stock with too little of it available (a rolled-back bucket gave a
        // transfer's units again, and they sold): take every unit still on sale, as
        // the repair of one bucket sets available to 0 (`overcommitted`), so that
        // Redis sells no unit MySQL has not left; the rest is held or sold already.
        // Units Redis counts as sold and MySQL does not (`sold_ahead_of_mysql`) count
        // as sold here, as for an unsplit SKU: never resold, an operator decides.
        let change = needed.max(-(available.iter().sum::<u64>() as i64));
        let Some(changes) = crate::gateway::stock_changes(change, &available) else {
            return Err(Error::Internal(format!(
                "stock change {change} over available {available:?}"
            )));
        };
        let mut taken = 0i64;
        for (b, sale) in sales.iter().enumerate() {
            if changes[b] == 0 {
                continue;
            }
            let fix = crate::store::BucketStock {
                if_new: None,
                change: Some(changes[b]),
                after_restore: false,
            };
            // Reserves may have taken the units since the reading: what a bucket
            // refuses (atomically, in its load) is left to the next pass.
            match store.load_bucket(sale, &record.definition, &fix, 0).await {
                Ok(_) => taken += changes[b],
                Err(Error::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if taken == needed {
            finding.after = Some(format!("stock_total={}", record.definition.stock_total));
            finding.repaired = true;
            return Ok(vec![finding]);
        }
        let now = record.definition.stock_total as i64 - needed;
        let after = format!("stock_total={}", now + taken);
        if taken != change {
            finding.detail += &format!(
                "; changed by {taken} of {change}: reserves took units meanwhile (the next pass takes more)"
            );
        }
        finding.after = Some(after.clone());
        if change != needed {
            return Ok(vec![
                finding,
                overcommitted(sku, format!("stock_total={now}"), after),
            ]);
        }
    }
    Ok(vec![finding])
}

async fn check_sku(
    store: &Store,
    tx: &mut MySqlConnection,
    scope: &Scope,
    snap: Option<Snapshot>,
    repair: bool,
) -> Result<Vec<Finding>> {
    let record = db::lock_sku_record(tx, &scope.sku).await?;
    match (snap, record) {
        // Indexed in Redis but defined nowhere: nothing to compare.
        (None, None) => Ok(Vec::new()),
        // Its sale is over and Redis has nothing of it: retired (the tombstone expired),
        // and nothing can be sold under it again until an admin PUT reopens it.
        (None, Some(record)) if sale_over(&record) => Ok(Vec::new()),
        (None, Some(record)) => restore_missing(store, tx, scope, &record, repair).await,
        (Some(snap), record) => compare(store, tx, scope, snap, record, repair).await,
    }
}

/// Rebuilds every lost bucket of a split SKU in one plan. The caller holds the SKU's
/// admin lock (`db::SkuLock`) on `conn`, so the worker's scheduled repair, `flashgate
/// reconcile --repair` and an admin PUT plan one after the other, each reading what
/// the one before loaded; the buckets are read while no transfer ran
/// (`Store::split_stock_still`). Each lost bucket gets the
/// units MySQL records as sold through it, and the stock no bucket holds is shared
/// among them: Σ stock_total over the buckets + in transit never exceeds the SKU's
/// stock, also while the rebuild runs (a lost bucket's sold units are counted before
/// any bucket is loaded). Units in transit to a lost bucket stay in transit.
///
/// A sale that ended is rebuilt only `for_a_put`: the reconciler has nothing to sell
/// under it, but an admin PUT reopening it plans its change on every bucket's stock.
pub(crate) async fn rebuild_lost_buckets(
    store: &Store,
    conn: &mut MySqlConnection,
    sku: &SkuId,
    buckets: u32,
    for_a_put: bool,
) -> Result<Vec<Finding>> {
    let sales = crate::buckets::sales(sku, buckets);
    let (stock, _) = store.split_stock(&sales).await?;
    if stock.iter().all(Option::is_some) {
        return Ok(Vec::new());
    }
    let mut tx = db::begin_check(conn).await?;
    let Some(record) = db::lock_sku_record(&mut tx, sku).await? else {
        return Ok(Vec::new());
    };
    if sale_over(&record) && !for_a_put {
        return Ok(Vec::new());
    }
    let crate::store::SplitStock {
        stock_total: stock,
        in_transit,
        ..
    } = store.split_stock_still(&sales).await?;
    let mut lost = Vec::new();
    for (b, sale) in sales.iter().enumerate() {
        if stock[b].is_none() && !store.is_retired(sale).await? {
            let (sold, _) = db::sales_totals(&mut tx, &db::SalesOf::bucket(sale), 0).await?;
            lost.push((b, sold));
        }
    }
    let held: u64 = stock.iter().flatten().sum::<u64>() + in_transit;
    let lost_sold: u64 = lost.iter().map(|(_, sold)| sold).sum();
    let free = record
        .definition
        .stock_total
        .saturating_sub(held + lost_sold);
    // Buyers homed in bucket 0 alone (a waiting room): the free units go there, or, if
    // bucket 0 is not lost, to no lost bucket (the stock check adds them to bucket 0).
    let shares = if record.definition.homes() == 1 {
        lost.iter()
            .map(|&(b, _)| if b == 0 { free } else { 0 })
            .collect()
    } else {
        crate::buckets::split(free, lost.len() as u32)
    };
    let mut findings = Vec::new();
    for ((b, sold), share) in lost.into_iter().zip(shares) {
        let mut scope = Scope::bucket(&sales[b], buckets);
        scope.planned = Some(sold + share);
        findings.extend(restore_missing(store, &mut tx, &scope, &record, true).await?);
    }
    tx.commit().await?;
    Ok(findings)
}

fn sale_over(record: &SkuRecord) -> bool {
    record
        .definition
        .ends_at_ms
        .is_some_and(|end| end <= crate::explore::host_clock_ms())
}

/// Redis lost the SKU (a restart without persistence, a wipe): rebuild it from MySQL,
/// with every unit MySQL records as sold counted as sold, so none is sold twice. A
/// lost bucket of a split SKU gets the units its sales took plus whatever of the SKU's
/// stock the other buckets (and transfers) do not hold.
async fn restore_missing(
    store: &Store,
    tx: &mut MySqlConnection,
    scope: &Scope,
    record: &SkuRecord,
    repair: bool,
) -> Result<Vec<Finding>> {
    let sku = &scope.sale;
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
        let (sold, _) = db::sales_totals(tx, &scope.sales, 0).await?;
        let usage = db::recorded_usage(tx, &scope.sku).await?;
        if scope.split() {
            let sales = crate::buckets::sales(&scope.sku, scope.buckets);
            let if_new = match scope.planned {
                Some(planned) => planned,
                // The planner the explorer broke: whatever the present buckets lack,
                // while other lost buckets may still have sold units of their own.
                None if scope.old_rebuild => {
                    let (stock, in_transit) = store.split_stock(&sales).await?;
                    let elsewhere: u64 = stock.iter().flatten().sum::<u64>() + in_transit;
                    sold + record
                        .definition
                        .stock_total
                        .saturating_sub(elsewhere + sold)
                }
                None => {
                    finding.detail +=
                        "; rebuilt together with the SKU's other lost buckets (next pass)";
                    return Ok(vec![finding]);
                }
            };
            let stock = crate::store::BucketStock {
                if_new: Some(if_new),
                change: None,
                after_restore: true,
            };
            let b = sales.iter().position(|s| s == sku).unwrap_or(0) as u32;
            let homes = record.definition.homes();
            let home = crate::buckets::home_users(&scope.sku, &usage.bought, homes, b);
            // Usage first, so no reserve finds the bucket without it; again after the
            // load for the bucket's claims_until (restore_usage.lua).
            store.restore_usage(sku, &home, &usage.claims).await?;
            store
                .load_bucket(sku, &record.definition, &stock, sold)
                .await?;
            store.restore_usage(sku, &home, &usage.claims).await?;
            // The bucket's last announcement (its bit of skus.buckets_sold_out), as
            // for an unsplit SKU below: stock it comes back with after it was out is
            // announced, a bucket still out is not announced again.
            let out = db::buckets_sold_out_in(&mut *tx, scope.sku.as_str()).await?;
            store.restore_announced(sku, out & (1 << b) != 0).await?;
        } else {
            store
                .restore_usage(sku, &usage.bought, &usage.claims)
                .await?;
            let stock = crate::store::BucketStock {
                after_restore: true,
                ..crate::store::BucketStock::whole(&record.definition)
            };
            store
                .load_bucket(sku, &record.definition, &stock, sold)
                .await?;
            store
                .restore_usage(sku, &usage.bought, &usage.claims)
                .await?;
            let announced = db::announced_sold_out_in(&mut *tx, sku.as_str()).await?;
            store
                .restore_announced(sku, announced == Some(true))
                .await?;
            if sold != record.sold {
                db::set_sold(tx, sku, sold).await?;
            }
        }
        // Only the counters may be gone (a partial loss): count the holds that
        // survived and the confirmations still waiting in the outbox.
        let mut fix = Corrections::default();
        if let Some(snap) = snapshot(store, sku).await? {
            if let Some(live) = snap.live_held {
                fix.held = live - snap.held;
            }
            if let Some(confirms) = &snap.outbox_confirms {
                let room = record.definition.stock_total.saturating_sub(record.sold);
                let expected = expected_sold(tx, &scope.sales, &snap, confirms, room).await?;
                fix.sold = (expected.total as i64 - snap.sold).max(0);
                if let (Some(used), Some(live)) = (&snap.used, &snap.live_per_user) {
                    let per_user = sold_per_user(tx, &scope.sales, &expected).await?;
                    fix.used = used_corrections(&used_drift(used, live, &per_user));
                }
            }
        }
        let (code, after) = repair_counters(store, scope, &record.definition, &fix).await?;
        finding.after = Some(after.clone());
        finding.repaired = code != "missing";
        if code == "overcommitted" {
            return Ok(vec![finding, overcommitted(sku, "missing".into(), after)]);
        }
    }
    Ok(vec![finding])
}

async fn compare(
    store: &Store,
    tx: &mut MySqlConnection,
    scope: &Scope,
    snap: Snapshot,
    record: Option<SkuRecord>,
    repair: bool,
) -> Result<Vec<Finding>> {
    let sku = &scope.sale;
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
        None => finding(
            "check_skipped",
            "too many reserves during the check to count the live holds at its instant".into(),
        ),
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
    // A bucket's share moves with transfers: the SKU's sum is checked apart.
    if !scope.split() && record.definition.stock_total as i64 != snap.stock_total {
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
                "Redis sells under [per_user_limit, hold_ms, starts_at, ends_at, paused] = {:?}, \
                 MySQL defines {terms:?}",
                snap.terms
            ),
        );
    }
    let rollbacks = match scope.first() {
        true => db::open_flush_compensations(tx, &scope.sku).await?,
        false => Vec::new(),
    };
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
    let (mysql_sold, _) = db::sales_totals(tx, &db::SalesOf::sku(&scope.sku), snap.now_ms).await?;
    let mut mysql_sold_fix = None;
    if scope.first() && mysql_sold != record.sold {
        finding(
            "mysql_sold_mismatch",
            format!(
                "MySQL skus.sold {} but its sales add up to {mysql_sold}",
                record.sold
            ),
        );
        mysql_sold_fix = Some(mysql_sold);
    }
    let mut fix = Corrections {
        held: snap.live_held.map_or(0, |live| live - snap.held),
        ..Corrections::default()
    };
    match &snap.outbox_confirms {
        Some(confirms) => {
            let room = record.definition.stock_total.saturating_sub(mysql_sold);
            let breakdown = expected_sold(tx, &scope.sales, &snap, confirms, room).await?;
            let (sold_before_snapshot, unflushed) = (breakdown.recorded, breakdown.unflushed);
            let expected = breakdown.total as i64;
            fix.sold = (expected - snap.sold).max(0);
            let per_user = sold_per_user(tx, &scope.sales, &breakdown).await?;
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
                    fix.used = used_corrections(&drift);
                }
                _ => finding(
                    "check_skipped",
                    "too many reserves during the check to place every hold at its instant \
                     (the creation log overflowed or the check outlasted its window)"
                        .into(),
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
        None => finding("check_skipped", "the outbox could not be read".into()),
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
    let (code, after) = repair_counters(store, scope, &record.definition, &fix).await?;
    if let Some(sold) = mysql_sold_fix {
        db::set_sold(tx, &scope.sku, sold).await?;
    }
    for f in findings.iter_mut().filter(|f| !f.is_unknown()) {
        f.after = Some(after.clone());
        // Sales MySQL never recorded cannot be invented, and refunds are an
        // operator's: reported, not repaired.
        f.repaired = code != "missing"
            && !matches!(f.kind, "sold_ahead_of_mysql" | "payment_after_rollback");
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
    /// The instant T it is for.
    at_ms: i64,
}

async fn expected_sold(
    tx: &mut MySqlConnection,
    sales: &db::SalesOf,
    snap: &Snapshot,
    outbox_confirms: &[OutboxConfirm],
    room: u64,
) -> Result<ExpectedSold> {
    let (_, sold_before) = db::sales_totals(tx, sales, snap.now_ms).await?;
    let rids: Vec<&str> = outbox_confirms.iter().map(|c| c.rid.as_str()).collect();
    let recorded = db::sales_recorded_before(tx, &rids, snap.now_ms).await?;
    // Not sales, flushed or not: payments MySQL records as refunded, and those the
    // flush will refuse because MySQL has no stock left for them (the same rule, in
    // outbox order: db::apply_events_in_order). Both only after a Redis rollback
    // resold units MySQL had sold; counting them would push Redis past the stock.
    let refunded = db::compensated_payments(tx, &rids).await?;
    let mut room = room;
    let mut unflushed = 0;
    let mut unflushed_per_user: HashMap<String, i64> = HashMap::new();
    // A reservation is sold once: after a rollback the outbox may confirm it twice
    // (under two payment_refs), and the flush makes the second a compensation.
    let mut counted: HashSet<&str> = HashSet::new();
    for c in outbox_confirms {
        let quantity = c.quantity.max(0) as u64;
        if recorded.contains(&c.rid)
            || refunded.contains(&(c.rid.clone(), c.payment_ref.clone()))
            || quantity > room
            || !counted.insert(c.rid.as_str())
        {
            continue;
        }
        room -= quantity;
        unflushed += quantity;
        *unflushed_per_user.entry(c.user.clone()).or_default() += c.quantity;
    }
    Ok(ExpectedSold {
        at_ms: snap.now_ms,
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
    sales: &db::SalesOf,
    expected: &ExpectedSold,
) -> Result<HashMap<String, i64>> {
    let mut per_user: HashMap<String, i64> = db::sold_per_user_before(tx, sales, expected.at_ms)
        .await?
        .into_iter()
        .collect();
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

/// Redis's terms of sale ([per_user_limit, hold_ms, starts_at, ends_at, paused]) as MySQL
/// defines them.
fn terms_of(definition: &SkuDefinition) -> [String; 5] {
    let ms = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    [
        definition.per_user_limit.to_string(),
        (definition.hold_seconds * 1000).to_string(),
        ms(definition.starts_at_ms),
        ms(definition.ends_at_ms),
        paused_arg(definition.paused).into(),
    ]
}

/// The `paused` term as the scripts take it.
pub fn paused_arg(paused: bool) -> &'static str {
    if paused {
        "1"
    } else {
        "0"
    }
}

/// What a repair adds to Redis's counters: the differences found at the check's
/// instant T (lua/repair.lua).
#[derive(Debug, Default)]
struct Corrections {
    /// Live holds at T - `held` at T.
    held: i64,
    /// MySQL sold + unflushed confirmations at T - `sold` at T, when positive.
    sold: i64,
    /// Per user: live holds + purchases at T - `used` at T.
    used: HashMap<String, i64>,
}

fn used_corrections(drift: &[(String, i64, i64)]) -> HashMap<String, i64> {
    drift
        .iter()
        .map(|(user, has, should)| (user.clone(), should - has))
        .collect()
}

/// Returns (reply code, "stock_total=.. available=.. held=.. sold=..").
/// Terms and stock_total from MySQL's definition; counters and `used` corrected by `fix`.
async fn repair_counters(
    store: &Store,
    scope: &Scope,
    definition: &SkuDefinition,
    fix: &Corrections,
) -> Result<(String, String)> {
    let sku = &scope.sale;
    let keys = SkuKeys::new(sku);
    let mut conn = store.connection();
    let used = if fix.used.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&fix.used)
            .map_err(|e| Error::Internal(format!("usage corrections: {e}")))?
    };
    let mut invocation = SCRIPTS.repair.prepare_invoke();
    invocation
        .key(&keys.meta)
        .key(&keys.used)
        .key(keys.queue_admits())
        .key(keys.queue_state())
        .arg(match scope.split() {
            true => String::new(),
            false => definition.stock_total.to_string(),
        })
        .arg(fix.held)
        .arg(fix.sold);
    for term in terms_of(definition) {
        invocation.arg(term);
    }
    let reply: Vec<String> = invocation.arg(used).invoke_async(&mut conn).await?;
    if reply.first().map(String::as_str) == Some("missing") {
        // Redis lost the sale since the check: nothing written; the next pass finds it
        // missing and rebuilds it from MySQL.
        return Ok((
            "missing".into(),
            "missing (lost during the repair; rebuilt by the next pass)".into(),
        ));
    }
    // The repair may have taken back a retired SKU: it is swept and flushed again.
    store.index_sku(sku).await?;
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
    fn check_heads_parse() {
        assert!(parse_head(&reply(&["missing"])).unwrap().is_none());
        let snap = parse_head(&reply(&[
            "ok",
            "1000",
            "10",
            "5",
            "3",
            "2",
            "4",
            "1",
            "1700000000000-3",
            "2",
            "600000",
            "",
            "9",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (snap.stock_total, snap.available, snap.held, snap.sold),
            (10, 5, 3, 2)
        );
        assert_eq!((snap.now_ms, snap.ghosts), (1000, 1));
        assert_eq!(snap.terms, ["2", "600000", "", "9", "0"].map(String::from));
        assert!(snap.live_held.is_none() && snap.used.is_none());
        assert!(parse_head(&reply(&["ok", "1", "x"])).is_err());
        assert_eq!(EntryId::parse("5-2").unwrap(), EntryId(5, 2));
        assert!(EntryId::parse("5-2").unwrap() < EntryId::parse("10-0").unwrap());
        assert!(EntryId::parse("x").is_err());
    }

    #[test]
    fn a_sliced_read_is_placed_at_its_instant() {
        let hold = |q: i64, user: &str| (q, user.to_string());
        let mut slices = Slices::default();
        // r1 live throughout; r2 made after T; r4 seen live, confirmed after T.
        slices.seen_holds.insert("r1".into(), hold(1, "alice"));
        slices.seen_holds.insert("r2".into(), hold(2, "bob"));
        slices.seen_holds.insert("r4".into(), hold(1, "erin"));
        slices.created.push(("r2".into(), 2, "bob".into()));
        slices.created.push(("r5".into(), 1, "dave".into()));
        // r3 live at T, cancelled after T before the walk reached it; r5 made and
        // cancelled after T; r4's sale.
        let ended = |id: u64, rid: &str, q: i64, user: &str, released: bool| Ended {
            id: EntryId(id, 0),
            rid: rid.into(),
            quantity: q,
            user: user.into(),
            released,
        };
        slices.ended.push(ended(10, "r3", 1, "carol", true));
        slices.ended.push(ended(11, "r5", 1, "dave", true));
        slices.ended.push(ended(12, "r4", 1, "erin", false));
        let read = |units: i64, log_len: usize, at: u64| (units, log_len, EntryId(at, 0));
        slices.seen_used.insert("alice".into(), read(1, 0, 1));
        // bob read after his hold was made: it is taken back.
        slices.seen_used.insert("bob".into(), read(2, 1, 1));
        // carol read after her cancel: it is given back.
        slices.seen_used.insert("carol".into(), read(0, 0, 10));
        // dave read before his hold was made, erin after her sale (no change of usage).
        slices.seen_used.insert("dave".into(), read(0, 1, 9));
        slices.seen_used.insert("erin".into(), read(1, 2, 12));
        let at_t = slices.at_t();
        let mut live: Vec<&str> = at_t.live.keys().map(String::as_str).collect();
        live.sort();
        assert_eq!(live, ["r1", "r3", "r4"]);
        let used = |u: &str| at_t.used[u];
        assert_eq!(
            (
                used("alice"),
                used("bob"),
                used("carol"),
                used("dave"),
                used("erin")
            ),
            (1, 0, 1, 0, 1)
        );
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

#[cfg(test)]
mod report_tests {
    use super::*;

    fn finding(sku: &str, kind: &'static str, repaired: bool, after: Option<&str>) -> Finding {
        Finding {
            sku: sku.into(),
            kind,
            detail: format!("{kind} detail"),
            before: "available=3 held=1".into(),
            after: after.map(str::to_string),
            repaired,
        }
    }

    fn report() -> ReconcileReport {
        ReconcileReport {
            skus_checked: 3,
            findings: vec![
                finding("phone-x", "held_mismatch", true, Some("available=4 held=0")),
                finding("tv", "check_failed", false, None),
            ],
        }
    }

    #[test]
    fn json_has_the_contract_shape() {
        let json = report().to_json();
        let object = json.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["checked", "findings", "needs_attention", "repaired"]);
        assert_eq!(json["checked"], 3);
        assert_eq!(json["repaired"], 1);
        assert_eq!(json["needs_attention"], 1);
        let findings = json["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 2);
        let mut keys: Vec<&str> = findings[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["after", "before", "detail", "kind", "repaired", "sku"]
        );
        assert_eq!(
            findings[0],
            serde_json::json!({"sku": "phone-x", "kind": "held_mismatch",
                "detail": "held_mismatch detail", "repaired": true,
                "before": "available=3 held=1", "after": "available=4 held=0"})
        );
        assert_eq!(findings[1]["after"], serde_json::Value::Null);
        assert_eq!(findings[1]["repaired"], false);
        let clean = ReconcileReport {
            skus_checked: 0,
            findings: vec![],
        };
        assert_eq!(
            clean.to_json(),
            serde_json::json!({"checked": 0, "findings": [], "repaired": 0, "needs_attention": 0})
        );
    }

    #[test]
    fn text_has_a_header_and_columns() {
        let text = report().to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "SKU      KIND           RESULT        DETAIL",
                "phone-x  held_mismatch  repaired      held_mismatch detail",
                "         before: available=3 held=1",
                "         after:  available=4 held=0",
                "tv       check_failed   unknown       check_failed detail",
                "         before: available=3 held=1",
                "checked 3 SKUs: 2 findings, 1 repaired, 1 need attention",
            ]
        );
        assert!(!text.contains('\t'));
        let one = ReconcileReport {
            skus_checked: 1,
            findings: vec![],
        };
        assert_eq!(one.to_text(), "checked 1 SKU: no drift\n");
    }
}
