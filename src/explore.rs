//! The hooks of the interleaving explorer (`scripts/dev explore`, tests/explore): with a
//! gate installed, which only the explorer does, every Redis command and every MySQL call
//! of the process waits for its turn, so that a seeded scheduler picks the order of every
//! step of every actor and may stop an actor between any two steps. Without a gate each
//! hook costs one atomic load.
//!
//! A step is one Redis command (a script runs atomically in Redis, so it is one step) or
//! one call of `db` (a query, or a transaction's statements up to the next step). The
//! step's `Permit` is dropped when the call has completed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

/// One call waiting for its turn.
#[derive(Debug, Clone)]
pub struct Step {
    /// Who calls: the explorer's number for the simulated process (0: none set).
    pub process: u32,
    /// What is called, for the printed schedule.
    pub label: String,
}

/// Held while the step's call runs; dropping it tells the gate the call completed.
pub struct Permit(#[allow(dead_code)] Box<dyn Send>);

impl Permit {
    pub fn new(on_drop: impl Send + 'static) -> Permit {
        Permit(Box::new(on_drop))
    }
}

/// What the explorer installs: answers each step with a permit when its turn comes.
pub trait Gate: Send + Sync + 'static {
    fn enter(&self, step: Step) -> Pin<Box<dyn Future<Output = Permit> + Send>>;
}

static GATE: OnceLock<Arc<dyn Gate>> = OnceLock::new();

tokio::task_local! {
    static PROCESS: u32;
}

/// Installs the gate for the rest of the process; false if one was installed already.
pub fn install(gate: Arc<dyn Gate>) -> bool {
    GATE.set(gate).is_ok()
}

/// Runs `future` as (part of) the simulated process `process`.
pub fn as_process<F: Future>(process: u32, future: F) -> impl Future<Output = F::Output> {
    PROCESS.scope(process, future)
}

/// A future spawned by a task keeps the task's process (what `tokio::spawn` forgets).
pub fn inherit<F: Future>(future: F) -> impl Future<Output = F::Output> {
    PROCESS.scope(PROCESS.try_with(|p| *p).unwrap_or(0), future)
}

fn enter(label: impl FnOnce() -> String) -> Option<Pin<Box<dyn Future<Output = Permit> + Send>>> {
    let gate = GATE.get()?;
    let process = PROCESS.try_with(|p| *p).unwrap_or(0);
    Some(gate.enter(Step {
        process,
        label: label(),
    }))
}

/// The turn of one Redis command (or pipeline, described by its first command).
pub async fn redis_step(cmd: &redis::Cmd) -> Option<Permit> {
    match enter(|| describe(cmd)) {
        Some(turn) => Some(turn.await),
        None => None,
    }
}

/// The turn of one MySQL call of `db`.
pub async fn mysql_step(call: &'static str) -> Option<Permit> {
    match enter(|| format!("mysql {call}")) {
        Some(turn) => Some(turn.await),
        None => None,
    }
}

/// A turn that calls nothing: an explorer actor's pause between two of its operations,
/// so that the scheduler, not real time, decides when the actor goes on (a replay of a
/// seed then finds the same calls waiting).
pub async fn pause() {
    if let Some(turn) = enter(|| "pause".to_owned()) {
        drop(turn.await);
    }
}

/// `FCALL <function> <first key>` (`EVALSHA <sha> <first key>`), or the command and
/// its first argument.
fn describe(cmd: &redis::Cmd) -> String {
    let words: Vec<String> = cmd
        .args_iter()
        .take(4)
        .map(|arg| match arg {
            redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            _ => "<arg>".into(),
        })
        .collect();
    match words.first().map(String::as_str) {
        Some("FCALL") | Some("EVALSHA") | Some("EVAL") => words
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, w)| w.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => words.into_iter().take(2).collect::<Vec<_>>().join(" "),
    }
}

static HOST_CLOCK_SKEW_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// This host's wall clock (ms since the epoch), which the explorer may set apart from
/// Redis's: no deadline may depend on it (the contract's one clock is Redis `TIME`).
pub fn host_clock_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
        + HOST_CLOCK_SKEW_MS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets how far this host's clock is off (the explorer's clock fault).
pub fn skew_host_clock(ms: i64) {
    HOST_CLOCK_SKEW_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}
