//! The waiting room of a SKU: buyers join a line and are admitted by stock, fairly.
//!
//! The line, the admissions and their counters live in Redis in the SKU's slot
//! (lua/queue.lua; one call per batch of a SKU's joins and reads, `batcher::QueueReads`,
//! which also admits whom the stock allows).
//! An admission is a signed token bound to the user, the SKU and its deadline; the
//! gateway checks it before Redis, and the reserve script spends the admission (one
//! admission, at most one hold). This module reads the script's replies into tickets,
//! signs and checks tokens, and sizes how often the waiting users poll.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::gateway::Gateway;
use crate::ids::{IdKeys, SkuId, ADMISSION_MAC_BYTES};
use crate::limits;
use crate::reservation::Refusal;
use crate::store::Admission;

/// Where a ticket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    /// In line (also before the start, when `position` is null).
    Waiting,
    /// Admitted: reserve with `admission_token` before `admitted_until` (also once the
    /// admission made its hold).
    Admitted,
    /// Every unit is sold: nothing more will be admitted.
    SoldOut,
    /// The sale ended, or this admission lapsed unused (`lapsed`).
    Closed,
}

impl TicketState {
    /// Nothing more will change for this ticket.
    pub fn is_terminal(self) -> bool {
        matches!(self, TicketState::SoldOut | TicketState::Closed)
    }
}

/// A user's ticket as the contract shows it, and the queue around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub sku: String,
    pub user_id: String,
    /// 1-based; None before the sale starts (the pre-queue is ordered at the start).
    pub position: Option<u64>,
    pub state: TicketState,
    /// Users in line ahead of this one, not admitted yet.
    pub ahead: u64,
    pub eta_seconds: Option<u64>,
    pub admission_token: Option<String>,
    pub admitted_until_ms: Option<i64>,
    /// The admission went unused past its deadline (state `closed`).
    pub lapsed: bool,
    /// The admission made a hold.
    pub used: bool,
    pub retry_after_ms: u32,
}

/// One read of the queue as lua/queue.lua answers `join` and `ticket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRead {
    /// The script's word: none, waiting, admitted, used, lapsed, sold_out, closed.
    pub state: String,
    pub position: Option<u64>,
    /// Ranks admitted so far.
    pub served: u64,
    /// Tickets in line, admitted or not.
    pub line: u64,
    pub admitted_until_ms: Option<i64>,
    pub first_admit_at_ms: Option<i64>,
    pub now_ms: i64,
    pub admit_per_second: u64,
    /// The waiting room's admission_seconds, in ms.
    pub admission_ms: u64,
    pub tail: QueueTail,
}

/// What every reply of lua/queue.lua ends with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueTail {
    /// Units not sold yet (stock_total - sold): how far back in line an admission can
    /// still reach without more stock.
    pub unsold: u64,
    pub starts_at_ms: Option<i64>,
    /// The first admissions, made at once at `first_admit_at` (the stock on hand).
    pub first_burst: u64,
}

impl QueueTail {
    fn parse(fields: &[String]) -> Result<QueueTail> {
        let [unsold, starts_at, first_burst] = fields else {
            return Err(bad_reply("queue tail arity"));
        };
        Ok(QueueTail {
            unsold: number(unsold)?,
            starts_at_ms: optional(starts_at)?.map(|v| v as i64),
            first_burst: number(first_burst)?,
        })
    }
}

impl QueueRead {
    /// Reads a `join` / `ticket` reply; refusals become errors.
    pub fn parse(reply: &[String]) -> Result<QueueRead> {
        match reply.first().map(String::as_str) {
            // No such SKU in Redis, or (`ticket`) the user has no ticket.
            Some("not_found") | Some("none") => return Err(Error::Refused(Refusal::NotFound)),
            Some("no_waiting_room") => return Err(Error::Refused(Refusal::NoWaitingRoom)),
            _ => {}
        }
        let [state, position, served, line, until, first, now, rate, admission, tail @ ..] = reply
        else {
            return Err(bad_reply("queue arity"));
        };
        Ok(QueueRead {
            state: state.clone(),
            position: optional(position)?,
            served: number(served)?,
            line: number(line)?,
            admitted_until_ms: optional(until)?.map(|v| v as i64),
            first_admit_at_ms: optional(first)?.map(|v| v as i64),
            now_ms: number(now)? as i64,
            admit_per_second: number(rate)?,
            admission_ms: number(admission)?,
            tail: QueueTail::parse(tail)?,
        })
    }
}

/// One read of the queue as lua/queue.lua answers `watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueWatch {
    /// pre, open, sold_out, closed.
    pub phase: String,
    pub served: u64,
    pub line: u64,
    pub first_admit_at_ms: Option<i64>,
    pub now_ms: i64,
    pub admit_per_second: u64,
    pub admission_ms: u64,
    pub tail: QueueTail,
}

impl QueueWatch {
    pub fn parse(reply: &[String]) -> Result<QueueWatch> {
        match reply.first().map(String::as_str) {
            Some("not_found") => return Err(Error::Refused(Refusal::NotFound)),
            Some("no_waiting_room") => return Err(Error::Refused(Refusal::NoWaitingRoom)),
            _ => {}
        }
        let [phase, served, line, first, now, rate, admission, tail @ ..] = reply else {
            return Err(bad_reply("queue watch arity"));
        };
        Ok(QueueWatch {
            phase: phase.clone(),
            served: number(served)?,
            line: number(line)?,
            first_admit_at_ms: optional(first)?.map(|v| v as i64),
            now_ms: number(now)? as i64,
            admit_per_second: number(rate)?,
            admission_ms: number(admission)?,
            tail: QueueTail::parse(tail)?,
        })
    }
}

/// The ticket of `user_id` from a read of the queue (`read.state` not `none`).
pub fn ticket(
    keys: &IdKeys,
    sku: &SkuId,
    user_id: &str,
    read: &QueueRead,
    polls_per_second: u32,
) -> Ticket {
    let (state, lapsed, used) = match read.state.as_str() {
        "admitted" => (TicketState::Admitted, false, false),
        "used" => (TicketState::Admitted, false, true),
        "lapsed" => (TicketState::Closed, true, false),
        "sold_out" => (TicketState::SoldOut, false, false),
        "closed" => (TicketState::Closed, false, false),
        _ => (TicketState::Waiting, false, false),
    };
    let waiting = read.line.saturating_sub(read.served);
    let ahead = match (state, read.position) {
        (TicketState::Waiting, Some(position)) => position.saturating_sub(read.served + 1),
        // Before the start the order is not drawn yet: everyone is ahead or behind.
        (TicketState::Waiting, None) => waiting.saturating_sub(1),
        _ => 0,
    };
    let eta_seconds = (state == TicketState::Waiting && read.position.is_some())
        .then(|| eta_seconds(ahead, read))
        .flatten();
    let retry_after_ms = match (state, read.position) {
        // Nobody is admitted before the start: come back at it, the line spread over
        // as long as the budget needs for everyone's first poll.
        (TicketState::Waiting, None) => {
            let to_start = read
                .tail
                .starts_at_ms
                .map_or(0, |start| (start - read.now_ms).max(0) as u64);
            let spread = read.line * 1000 / u64::from(polls_per_second.max(1));
            let jitter = (rand::random::<f64>() * spread as f64) as u64;
            (to_start + jitter).clamp(limits::QUEUE_RETRY_MIN_MS, u64::from(u32::MAX)) as u32
        }
        (TicketState::Waiting, Some(_)) => {
            // Only a place the unsold units can still reach must see its admission in
            // time; further back nothing comes without more stock.
            let admission_ms = if ahead < read.tail.unsold {
                read.admission_ms
            } else {
                u64::MAX
            };
            retry_after_ms(ahead, waiting, polls_per_second, admission_ms)
        }
        // Nothing to wait for: reserve. A poll now and then shows a lapse or the end.
        (TicketState::Admitted, _) => limits::QUEUE_ADMITTED_RETRY_MS as u32,
        (TicketState::SoldOut | TicketState::Closed, _) => 0,
    };
    let admission = (state == TicketState::Admitted)
        .then_some(read.admitted_until_ms)
        .flatten();
    Ticket {
        sku: sku.to_string(),
        user_id: user_id.to_owned(),
        position: read.position,
        state,
        ahead,
        eta_seconds,
        admission_token: admission.map(|until| sign(keys, sku, user_id, until)),
        admitted_until_ms: admission,
        lapsed,
        used,
        retry_after_ms,
    }
}

/// Seconds until `ahead` more users are admitted, at the rate admissions went so far
/// (or at `admit_per_second` before the first); None when nothing tells.
fn eta_seconds(ahead: u64, read: &QueueRead) -> Option<u64> {
    // The first admissions came at once (the stock on hand): the pace is what came
    // after them, as units came back or the rate let more in.
    let after_burst = read.served.saturating_sub(read.tail.first_burst);
    let per_second = match read.first_admit_at_ms {
        Some(first) if after_burst > 0 => {
            let elapsed_ms = (read.now_ms - first).max(1000) as f64;
            after_burst as f64 * 1000.0 / elapsed_ms
        }
        _ if read.admit_per_second > 0 => read.admit_per_second as f64,
        _ => return None,
    };
    Some(((ahead + 1) as f64 / per_second).ceil() as u64)
}

/// How long a waiting ticket `ahead` users from the front should wait before its next
/// poll, so that the `waiting` users of the line together poll at most
/// `polls_per_second` times a second: user i (0-based from the front) waits
/// (i + 1) * H(waiting) / polls_per_second seconds, H the harmonic number, and
/// Σ 1 / ((i + 1) * H / p) = p. The front polls often, the back rarely; the floor only
/// lowers the total. Never longer than half of `admission_ms`: an admission made right
/// after a poll is seen before it lapses (units can come back all at once, so anyone
/// may be admitted). With very long lines that cap adds up to
/// waiting / (admission_seconds / 2) polls a second to the budget (docs/reference.md).
pub fn retry_after_ms(ahead: u64, waiting: u64, polls_per_second: u32, admission_ms: u64) -> u32 {
    let n = waiting.max(1) as f64;
    // H(n) ~ ln n + γ + 1/(2n); an upper bound for every n >= 1.
    let harmonic = n.ln() + 0.5772156649 + 1.0 / (2.0 * n);
    let ms = 1000.0 * (ahead + 1) as f64 * harmonic / f64::from(polls_per_second.max(1));
    let cap = (admission_ms / 2).max(limits::QUEUE_RETRY_MIN_MS);
    (ms.ceil() as u64).clamp(limits::QUEUE_RETRY_MIN_MS, cap.min(u32::MAX as u64)) as u32
}

/// How long a gateway answers a reserve without a token `admission_required` itself
/// after Redis did for the SKU.
pub const SEEN_WAITING_ROOM_FOR: Duration = Duration::from_secs(1);
/// SKUs a gateway remembers that for; past it the memory starts over.
const SEEN_WAITING_ROOMS_MAX: usize = 65_536;

/// SKUs whose reserve script answered `admission_required` to a reserve without a token
/// lately: for SEEN_WAITING_ROOM_FOR such reserves of them get their 403 before Redis
/// (a crowd without tokens costs a look-up here, not a script call in Redis). A PUT
/// that removes the waiting room reaches every gateway within that time. Costs an
/// atomic load per reserve until the gateway has seen a waiting room.
#[derive(Default)]
pub struct SeenWaitingRooms {
    any: AtomicBool,
    seen: RwLock<HashMap<SkuId, Instant>>,
}

impl SeenWaitingRooms {
    /// True when Redis refused a reserve without a token for the SKU lately.
    pub fn refuses(&self, sku: &SkuId) -> bool {
        self.any.load(Ordering::Relaxed)
            && self
                .seen
                .read()
                .expect("seen waiting rooms lock")
                .get(sku)
                .is_some_and(|at| at.elapsed() < SEEN_WAITING_ROOM_FOR)
    }

    pub fn saw(&self, sku: &SkuId) {
        let mut seen = self.seen.write().expect("seen waiting rooms lock");
        if seen.len() >= SEEN_WAITING_ROOMS_MAX {
            seen.clear();
        }
        seen.insert(sku.clone(), Instant::now());
        self.any.store(true, Ordering::Relaxed);
    }
}

/// How often a SKU's watcher looks at its queue while streams are open: a terminal
/// `sold_out` / `closed` reaches every stream within this plus the fan-out (the
/// contract asks 1 s).
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// The latest look at a SKU's waiting room, shared by every stream of it on this
/// gateway (None until the first look answered).
pub type Snapshot = Option<Arc<QueueWatch>>;

/// One watcher per SKU with open streams on this gateway: it reads the queue every
/// WATCH_INTERVAL (one Redis call, however many streams) and every stream of the SKU
/// follows its snapshots. A watcher stops when its last stream went.
#[derive(Default)]
pub struct Watchers {
    sales: Mutex<HashMap<SkuId, watch::Sender<Snapshot>>>,
}

impl Watchers {
    /// Follows the SKU's waiting room, starting its watcher if none runs.
    pub fn subscribe(
        self: &Arc<Self>,
        gateway: &Gateway,
        sku: &SkuId,
    ) -> watch::Receiver<Snapshot> {
        let mut sales = self.sales.lock().expect("watchers lock");
        if let Some(sender) = sales.get(sku) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        sales.insert(sku.clone(), sender.clone());
        metrics::gauge!("flashgate_queue_watchers").set(sales.len() as f64);
        tokio::spawn(self.clone().run(gateway.clone(), sku.clone(), sender));
        receiver
    }

    async fn run(self: Arc<Self>, gateway: Gateway, sku: SkuId, sender: watch::Sender<Snapshot>) {
        loop {
            {
                // Under the lock subscribe takes too: no stream joins a watcher that is
                // about to stop.
                let mut sales = self.sales.lock().expect("watchers lock");
                if sender.receiver_count() == 0 {
                    sales.remove(&sku);
                    metrics::gauge!("flashgate_queue_watchers").set(sales.len() as f64);
                    return;
                }
            }
            match gateway.queue_watch(&sku).await {
                Ok(look) => {
                    sender.send_replace(Some(Arc::new(look)));
                }
                // The operator removed the waiting room: its streams end, `closed`.
                Err(Error::Refused(Refusal::NoWaitingRoom)) => {
                    let last = sender.borrow().clone();
                    sender.send_replace(Some(Arc::new(QueueWatch {
                        phase: "closed".into(),
                        ..last.as_deref().cloned().unwrap_or(QueueWatch {
                            phase: String::new(),
                            served: 0,
                            line: 0,
                            first_admit_at_ms: None,
                            now_ms: crate::explore::host_clock_ms(),
                            admit_per_second: 0,
                            admission_ms: 0,
                            tail: QueueTail::default(),
                        })
                    })));
                }
                // The streams keep their last ticket; the next look may answer (a SKU
                // Redis lost is rebuilt by the reconciler).
                Err(e) => tracing::warn!(sku = %sku, error = %e, "waiting room watch failed"),
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
        }
    }
}

/// What a stream knows of its ticket between reads, and when it must read it again
/// (one Redis call) rather than work it out from the SKU's snapshot: at the start (a
/// pre-queue place gets its position), when its position is admitted, when its
/// admission may have lapsed, and at the end for an admitted ticket (used or not).
/// Everything else (the line moving, `sold_out` or `closed` for a waiting ticket) comes
/// from the snapshot alone, so the reads grow with admissions, not with time.
pub fn needs_read(last: &Ticket, look: &QueueWatch) -> bool {
    let terminal = look.phase == "sold_out" || look.phase == "closed";
    match last.state {
        TicketState::Admitted => {
            terminal
                || (!last.used
                    && last
                        .admitted_until_ms
                        .is_some_and(|until| look.now_ms >= until))
        }
        TicketState::Waiting => match last.position {
            None => look.phase != "pre",
            Some(position) => !terminal && position <= look.served,
        },
        TicketState::SoldOut | TicketState::Closed => false,
    }
}

/// A waiting ticket moved on by a snapshot (no Redis read; see `needs_read`).
pub fn advance(
    keys: &IdKeys,
    sku: &SkuId,
    last: &Ticket,
    look: &QueueWatch,
    polls_per_second: u32,
) -> Ticket {
    let state = match look.phase.as_str() {
        "sold_out" | "closed" => look.phase.clone(),
        _ => "waiting".to_owned(),
    };
    let read = QueueRead {
        state,
        position: last.position,
        served: look.served,
        line: look.line,
        admitted_until_ms: None,
        first_admit_at_ms: look.first_admit_at_ms,
        now_ms: look.now_ms,
        admit_per_second: look.admit_per_second,
        admission_ms: look.admission_ms,
        tail: look.tail,
    };
    ticket(keys, sku, &last.user_id, &read, polls_per_second)
}

const TOKEN_VERSION: &str = "1";

/// The admission token of `user_id` for `sku` until `admitted_until_ms`:
/// `<base64url(payload)>.<base64url(MAC)>`, payload `1\n<sku>\n<until>\n<user>` (the
/// user id last: it may hold any byte but a newline never ends it early, since it is
/// the rest). Deterministic: every read of one admission shows the same token.
pub fn sign(keys: &IdKeys, sku: &SkuId, user_id: &str, admitted_until_ms: i64) -> String {
    let payload = format!("{TOKEN_VERSION}\n{sku}\n{admitted_until_ms}\n{user_id}");
    let mac = keys.admission_mac(payload.as_bytes());
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(payload.as_bytes()),
        URL_SAFE_NO_PAD.encode(mac)
    )
}

/// How far past its deadline, by this gateway's clock, a token is still sent to Redis
/// (whose clock decides): host clocks differ by a little.
const TOKEN_CLOCK_SLACK_MS: i64 = 5_000;

/// Checks an admission token before Redis: signed by one of our keys, for this SKU
/// and user (anything else is an error: the token is not good). A good one is
/// `Admitted` before its deadline (plus a slack for clocks), `Lapsed` after it: then it
/// may still replay the key it made a hold with, and buys nothing (lua/reserve.lua).
pub fn verify(
    keys: &IdKeys,
    token: &str,
    sku: &SkuId,
    user_id: &str,
    now_ms: i64,
) -> Result<Admission> {
    let refused = Error::Refused(Refusal::AdmissionRequired);
    if token.len() > limits::ADMISSION_TOKEN_MAX_LEN {
        return Err(refused);
    }
    let Some((payload, mac)) = token.split_once('.') else {
        return Err(refused);
    };
    let (Ok(payload), Ok(mac)) = (URL_SAFE_NO_PAD.decode(payload), URL_SAFE_NO_PAD.decode(mac))
    else {
        return Err(refused);
    };
    if mac.len() != ADMISSION_MAC_BYTES || !keys.admission_signed(&payload, &mac) {
        return Err(refused);
    }
    // Signed by us, so well formed; checked anyway.
    let Ok(payload) = std::str::from_utf8(&payload) else {
        return Err(refused);
    };
    let mut parts = payload.splitn(4, '\n');
    let (Some(TOKEN_VERSION), Some(for_sku), Some(until), Some(for_user)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refused);
    };
    let Ok(until) = until.parse::<i64>() else {
        return Err(refused);
    };
    if for_sku != sku.as_str() || for_user != user_id {
        return Err(refused);
    }
    Ok(if until + TOKEN_CLOCK_SLACK_MS <= now_ms {
        Admission::Lapsed
    } else {
        Admission::Admitted
    })
}

fn optional(raw: &str) -> Result<Option<u64>> {
    if raw.is_empty() {
        Ok(None)
    } else {
        number(raw).map(Some)
    }
}

fn number(raw: &str) -> Result<u64> {
    raw.parse().map_err(|_| bad_reply("queue number"))
}

fn bad_reply(what: &str) -> Error {
    Error::Internal(format!("unexpected queue script reply ({what})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> IdKeys {
        IdKeys::new(Some("queue-test-id-key-0123456789abcdef"), &[], &[]).unwrap()
    }

    fn sku(raw: &str) -> SkuId {
        SkuId::parse(raw).unwrap()
    }

    #[test]
    fn a_token_buys_for_its_user_and_sku_until_its_deadline_then_only_replays() {
        let keys = keys();
        let token = sign(&keys, &sku("s1"), "alice", 10_000);
        let at = |now: i64| verify(&keys, &token, &sku("s1"), "alice", now).unwrap();
        assert_eq!(at(9_000), Admission::Admitted);
        assert_eq!(at(10_000 + TOKEN_CLOCK_SLACK_MS - 1), Admission::Admitted);
        // Past the deadline by more than the slack: it may only replay its key.
        assert_eq!(at(10_000 + TOKEN_CLOCK_SLACK_MS), Admission::Lapsed);
        assert!(verify(&keys, &token, &sku("s2"), "alice", 9_000).is_err());
        assert!(verify(&keys, &token, &sku("s1"), "alice ", 9_000).is_err());
        assert!(verify(&keys, &token, &sku("s1"), "bob", 9_000).is_err());
    }

    #[test]
    fn forged_or_mangled_tokens_are_refused() {
        let keys = keys();
        let token = sign(&keys, &sku("s1"), "alice", 10_000);
        let other = IdKeys::new(Some("another-id-key-0123456789abcdefgh"), &[], &[]).unwrap();
        let forged = sign(&other, &sku("s1"), "alice", 10_000);
        assert!(verify(&keys, &forged, &sku("s1"), "alice", 9_000).is_err());
        // The payload of another deadline under the original MAC.
        let (_, mac) = token.split_once('.').unwrap();
        let later = URL_SAFE_NO_PAD.encode("1\ns1\n99999999\nalice");
        assert!(verify(&keys, &format!("{later}.{mac}"), &sku("s1"), "alice", 9_000).is_err());
        // Half a MAC, no MAC, garbage, too long.
        let half = &token[..token.len() - 11];
        for bad in [
            half,
            "",
            ".",
            "a.b",
            &"x".repeat(600),
            token.split_once('.').unwrap().0,
        ] {
            assert!(
                verify(&keys, bad, &sku("s1"), "alice", 9_000).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_survive_a_key_rotation_while_the_old_key_is_accepted() {
        let old = IdKeys::new(Some("old-id-key-0123456789abcdefghijkl"), &[], &[]).unwrap();
        let token = sign(&old, &sku("s1"), "alice", 10_000);
        let rotated = IdKeys::new(
            Some("new-id-key-0123456789abcdefghijkl"),
            &["old-id-key-0123456789abcdefghijkl"],
            &[],
        )
        .unwrap();
        assert!(verify(&rotated, &token, &sku("s1"), "alice", 9_000).is_ok());
    }

    #[test]
    fn the_waiting_users_together_poll_at_most_the_budget() {
        for (waiting, budget) in [(1u64, 1000u32), (10, 1000), (5_000, 1000), (50_000, 200)] {
            let total: f64 = (0..waiting)
                .map(|ahead| 1000.0 / f64::from(retry_after_ms(ahead, waiting, budget, u64::MAX)))
                .sum();
            assert!(
                total <= f64::from(budget),
                "{waiting} users poll {total}/s > {budget}"
            );
        }
        // The front polls more often than the back.
        assert!(
            retry_after_ms(0, 50_000, 1000, u64::MAX)
                < retry_after_ms(40_000, 50_000, 1000, u64::MAX)
        );
        assert_eq!(
            retry_after_ms(0, 1, 1000, 120_000),
            limits::QUEUE_RETRY_MIN_MS as u32
        );
        // Never past half the admission time: an admission is seen before it lapses
        // (an outside audit found users 10,529 places back told to wait past 120 s).
        assert_eq!(retry_after_ms(49_999, 50_000, 1000, 120_000), 60_000);
        assert_eq!(retry_after_ms(10_529, 50_000, 1000, 120_000), 60_000);
    }

    #[test]
    fn tickets_read_the_script_reply() {
        let keys = keys();
        let read = |state: &str, position: &str, until: &str| {
            QueueRead::parse(&[
                state.into(),
                position.into(),
                "10".into(),
                "100".into(),
                until.into(),
                "1000".into(),
                "11000".into(),
                "0".into(),
                "120000".into(),
                "50".into(),
                "".into(),
                "0".into(),
            ])
            .unwrap()
        };
        let t = ticket(&keys, &sku("s"), "u", &read("waiting", "31", ""), 1000);
        assert_eq!(
            (t.state, t.position, t.ahead),
            (TicketState::Waiting, Some(31), 20)
        );
        // 10 admitted in 10 s: one a second, 21 to go.
        assert_eq!(t.eta_seconds, Some(21));
        assert!(t.admission_token.is_none());
        let t = ticket(&keys, &sku("s"), "u", &read("admitted", "5", "70000"), 1000);
        assert_eq!((t.state, t.ahead), (TicketState::Admitted, 0));
        let token = t.admission_token.unwrap();
        assert!(verify(&keys, &token, &sku("s"), "u", 60_000).is_ok());
        let t = ticket(&keys, &sku("s"), "u", &read("lapsed", "5", ""), 1000);
        assert_eq!(
            (t.state, t.lapsed, t.retry_after_ms),
            (TicketState::Closed, true, 0)
        );
        let t = ticket(&keys, &sku("s"), "u", &read("waiting", "", ""), 1000);
        assert_eq!((t.position, t.eta_seconds), (None, None));
        assert_eq!(
            QueueRead::parse(&["no_waiting_room".into()])
                .unwrap_err()
                .to_string(),
            Error::Refused(Refusal::NoWaitingRoom).to_string()
        );
    }

    fn look(phase: &str, served: u64, now_ms: i64) -> QueueWatch {
        QueueWatch {
            phase: phase.into(),
            served,
            line: 100,
            first_admit_at_ms: Some(0),
            now_ms,
            admit_per_second: 0,
            admission_ms: 60_000,
            tail: QueueTail {
                unsold: 100,
                starts_at_ms: None,
                first_burst: 0,
            },
        }
    }

    fn waiting_at(position: Option<u64>) -> Ticket {
        Ticket {
            sku: "s".into(),
            user_id: "u".into(),
            position,
            state: TicketState::Waiting,
            ahead: 0,
            eta_seconds: None,
            admission_token: None,
            admitted_until_ms: None,
            lapsed: false,
            used: false,
            retry_after_ms: 500,
        }
    }

    #[test]
    fn a_stream_reads_its_ticket_only_when_the_snapshot_cannot_tell() {
        let waiting = waiting_at(Some(10));
        // The line moving, or the sale over, is told by the snapshot alone.
        assert!(!needs_read(&waiting, &look("open", 9, 0)));
        assert!(!needs_read(&waiting, &look("sold_out", 20, 0)));
        assert!(!needs_read(&waiting, &look("closed", 20, 0)));
        // Its own rank admitted: the token is in Redis.
        assert!(needs_read(&waiting, &look("open", 10, 0)));
        // A pre-queue place gets its position at the start, not before.
        let pre = waiting_at(None);
        assert!(!needs_read(&pre, &look("pre", 0, 0)));
        assert!(needs_read(&pre, &look("open", 0, 0)));
        // Admitted: read again at its deadline (lapsed or used?) and at the end.
        let admitted = Ticket {
            state: TicketState::Admitted,
            admitted_until_ms: Some(5_000),
            ..waiting.clone()
        };
        assert!(!needs_read(&admitted, &look("open", 20, 4_999)));
        assert!(needs_read(&admitted, &look("open", 20, 5_000)));
        assert!(needs_read(&admitted, &look("sold_out", 20, 0)));
        let used = Ticket {
            used: true,
            ..admitted.clone()
        };
        assert!(!needs_read(&used, &look("open", 20, 9_000)));
        let over = Ticket {
            state: TicketState::SoldOut,
            ..waiting
        };
        assert!(!needs_read(&over, &look("open", 20, 0)));
    }

    #[test]
    fn a_waiting_ticket_moves_on_with_the_snapshot() {
        let keys = keys();
        let waiting = waiting_at(Some(10));
        let moved = advance(&keys, &sku("s"), &waiting, &look("open", 4, 4_000), 1000);
        assert_eq!(
            (moved.state, moved.ahead, moved.position),
            (TicketState::Waiting, 5, Some(10))
        );
        // 4 admitted in 4 s: one a second, 6 to go.
        assert_eq!(moved.eta_seconds, Some(6));
        for phase in ["sold_out", "closed"] {
            let over = advance(&keys, &sku("s"), &waiting, &look(phase, 4, 4_000), 1000);
            assert!(over.state.is_terminal(), "{phase}: {over:?}");
            assert_eq!((over.retry_after_ms, over.admission_token), (0, None));
        }
    }

    #[test]
    fn a_gateway_refuses_token_less_reserves_itself_only_for_a_while_after_redis_did() {
        let seen = SeenWaitingRooms::default();
        assert!(!seen.refuses(&sku("s")));
        seen.saw(&sku("s"));
        assert!(seen.refuses(&sku("s")));
        assert!(!seen.refuses(&sku("t")));
        seen.seen
            .write()
            .unwrap()
            .insert(sku("s"), Instant::now() - SEEN_WAITING_ROOM_FOR);
        assert!(
            !seen.refuses(&sku("s")),
            "past its time the flag asks Redis again"
        );
    }

    fn read_of(position: Option<u64>, served: u64, tail: QueueTail) -> QueueRead {
        QueueRead {
            state: "waiting".into(),
            position,
            served,
            line: 2_000,
            admitted_until_ms: None,
            first_admit_at_ms: Some(0),
            now_ms: 10_000,
            admit_per_second: 0,
            admission_ms: 10_000,
            tail,
        }
    }

    #[test]
    fn the_prequeue_comes_back_at_the_start_spread_over_the_budget() {
        let tail = QueueTail {
            unsold: 1_000,
            starts_at_ms: Some(30_000),
            first_burst: 0,
        };
        for _ in 0..50 {
            let t = ticket(&keys(), &sku("s"), "u", &read_of(None, 0, tail), 1000);
            // 20 s to the start, 2,000 waiting at 1,000 polls a second: within 2 s of it.
            assert!((20_000..=22_000).contains(&t.retry_after_ms), "{t:?}");
        }
    }

    #[test]
    fn only_places_the_unsold_units_can_reach_are_held_to_half_the_admission_time() {
        let tail = QueueTail {
            unsold: 100,
            starts_at_ms: None,
            first_burst: 0,
        };
        let near = ticket(
            &keys(),
            &sku("s"),
            "u",
            &read_of(Some(1_050), 1_000, tail),
            1,
        );
        assert_eq!(near.retry_after_ms, 5_000, "49 ahead of 100 unsold: capped");
        let far = ticket(
            &keys(),
            &sku("s"),
            "u",
            &read_of(Some(1_500), 1_000, tail),
            1,
        );
        assert!(
            far.retry_after_ms > 5_000,
            "499 ahead of 100 unsold: {far:?}"
        );
    }

    #[test]
    fn the_eta_counts_the_pace_after_the_first_admissions() {
        let burst_only = QueueTail {
            unsold: 1_000,
            starts_at_ms: None,
            first_burst: 1_000,
        };
        // 1,000 admitted at once, none since: nothing tells the pace yet.
        let t = ticket(
            &keys(),
            &sku("s"),
            "u",
            &read_of(Some(1_011), 1_000, burst_only),
            1000,
        );
        assert_eq!(t.eta_seconds, None);
        // 10 more in 10 s: one a second, 11 to go (10 ahead, then this one).
        let t = ticket(
            &keys(),
            &sku("s"),
            "u",
            &read_of(Some(1_021), 1_010, burst_only),
            1000,
        );
        assert_eq!(t.eta_seconds, Some(11));
    }
}
