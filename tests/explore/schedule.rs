//! The scheduler: every Redis command and MySQL call of the simulated processes waits at
//! the gate (flashgate::explore) until the scheduler, from its seed, picks it. One call
//! runs at a time; after it completes every task runs on until it waits at the gate
//! again (or ends), then the world's invariants are checked and the next call is picked.

use flashgate::explore::{Gate, Permit, Step};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// The explorer's own calls (the invariants' reads, the faults) pass the gate at once.
pub const OBSERVER: u32 = u32::MAX;

/// How long a granted call may take before the scheduler treats it as blocked (a MySQL
/// lock held by a process waiting at the gate) and goes on with the others.
const BLOCKED_AFTER: Duration = Duration::from_millis(300);

struct Waiting {
    step: Step,
    /// Sends the call its permit; the permit's drop closes `done`.
    grant: oneshot::Sender<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Calls that reached the gate so far: the scheduler's sign of life.
    arrivals: u64,
}

/// The gate installed in the process: queues every step for the scheduler.
#[derive(Clone, Default)]
pub struct Turnstile {
    queue: Arc<Mutex<Queue>>,
}

impl Gate for Turnstile {
    fn enter(&self, step: Step) -> Pin<Box<dyn Future<Output = Permit> + Send>> {
        if step.process == OBSERVER {
            return Box::pin(async { Permit::new(()) });
        }
        let (grant, granted) = oneshot::channel();
        {
            let mut queue = self.queue.lock().unwrap();
            queue.arrivals += 1;
            queue.waiting.push(Waiting { step, grant });
        }
        Box::pin(async move {
            match granted.await {
                Ok(done) => Permit::new(done),
                // The scheduler dropped the call (its process was killed, or the seed
                // ended): it never runs.
                Err(_) => std::future::pending().await,
            }
        })
    }
}

/// One seed's scheduler over the turnstile.
pub struct Scheduler {
    turnstile: Turnstile,
    pub rng: StdRng,
    /// Processes whose calls are never granted again (killed).
    dead: HashSet<u32>,
    /// Process -> the step number until which it is not scheduled (stalled).
    stalled: HashMap<u32, u64>,
    pub steps: u64,
    /// Calls granted that did not complete in time (blocked on a lock).
    blocked: Vec<oneshot::Receiver<()>>,
    /// The schedule so far, for the report of a failing seed.
    pub trace: Vec<String>,
    /// How many granted calls blocked.
    pub blocked_calls: u64,
    /// The label of the call the last step ran to its end (None: it ran none, or the
    /// call blocked), for invariants that hold right after one kind of call.
    pub last_ran: Option<String>,
    /// When (ms since the epoch) the last step's call was let through: it ran after.
    pub last_granted_ms: i64,
    /// The step count at the last `first_look`.
    looked_at: Option<u64>,
    /// Set by a directed schedule: only this process's calls are granted.
    only: Option<u32>,
    /// Processes let through to the SKU's admin lock (`db::SkuLock`, MySQL GET_LOCK)
    /// and not yet to its release: another process's acquire would wait in MySQL.
    lock_holders: Vec<u32>,
}

/// The labels of the admin lock's calls (src/db.rs `SkuLock`).
const LOCK_ACQUIRE: &str = "mysql acquire";
const LOCK_RELEASE: &str = "mysql release";

impl Scheduler {
    pub fn new(turnstile: &Turnstile, rng: StdRng) -> Scheduler {
        turnstile.queue.lock().unwrap().waiting.clear();
        Scheduler {
            turnstile: turnstile.clone(),
            rng,
            dead: HashSet::new(),
            stalled: HashMap::new(),
            steps: 0,
            blocked: Vec::new(),
            trace: Vec::new(),
            blocked_calls: 0,
            last_ran: None,
            last_granted_ms: 0,
            looked_at: None,
            lock_holders: Vec::new(),
            only: None,
        }
    }

    /// Grants only `process`'s calls from now on (None: every process's again): a
    /// directed schedule holding the others where they wait.
    pub fn only(&mut self, process: Option<u32>) {
        self.only = process;
    }

    /// True the first time it is asked after each step (and before the first): what a
    /// world rolls its faults on, so that they strike at the same steps however often
    /// it finds nothing to run in between.
    pub fn first_look(&mut self) -> bool {
        let first = self.looked_at != Some(self.steps);
        self.looked_at = Some(self.steps);
        first
    }

    fn arrivals(&self) -> u64 {
        self.turnstile.queue.lock().unwrap().arrivals
    }

    /// Lets every task that can run reach the gate (or its end).
    pub async fn settle(&mut self) {
        let mut last = self.arrivals();
        let mut quiet = 0;
        while quiet < 3 {
            // A yield lets every ready task run and the I/O driver be polled.
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let now = self.arrivals();
            if now == last {
                quiet += 1;
            } else {
                last = now;
                quiet = 0;
            }
        }
        self.blocked
            .retain_mut(|done| matches!(done.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
    }

    pub fn kill(&mut self, process: u32) {
        self.dead.insert(process);
        self.turnstile
            .queue
            .lock()
            .unwrap()
            .waiting
            .retain(|w| w.step.process != process);
    }

    pub fn stall(&mut self, process: u32, steps: u64) {
        self.stalled.insert(process, self.steps + steps);
    }

    /// Calls waiting now, by process (for the faults' choices).
    pub fn waiting_processes(&self) -> Vec<u32> {
        let queue = self.turnstile.queue.lock().unwrap();
        let mut processes: Vec<u32> = queue.waiting.iter().map(|w| w.step.process).collect();
        processes.sort_unstable();
        processes.dedup();
        processes
    }

    /// A live process with a call waiting whose label contains `part`.
    pub fn waiting_on(&self, part: &str) -> Option<u32> {
        let queue = self.turnstile.queue.lock().unwrap();
        queue
            .waiting
            .iter()
            .find(|w| w.step.label.contains(part) && !self.dead.contains(&w.step.process))
            .map(|w| w.step.process)
    }

    /// Grants one waiting call, chosen by the seed among those of live processes not
    /// stalled, and waits for it to complete. False when no call could run.
    pub async fn step(&mut self) -> bool {
        self.last_ran = None;
        let chosen = {
            let mut queue = self.turnstile.queue.lock().unwrap();
            let mut runnable: Vec<usize> = (0..queue.waiting.len())
                .filter(|&i| {
                    let p = queue.waiting[i].step.process;
                    self.only.is_none_or(|only| only == p)
                        && !self.dead.contains(&p)
                        && self
                            .stalled
                            .get(&p)
                            .is_none_or(|&until| until <= self.steps)
                })
                .collect();
            // The seed picks among the calls in process order, not in the order they
            // arrived (which the time of real I/O decides).
            runnable.sort_by_key(|&i| queue.waiting[i].step.process);
            // An acquire of the admin lock another live process holds would wait in
            // MySQL until the scheduler gives up on it (BLOCKED_AFTER of real time, in
            // which timers fire): it waits at the gate instead while anything else can
            // run.
            let would_wait = |w: &Waiting| {
                w.step.label == LOCK_ACQUIRE
                    && self
                        .lock_holders
                        .iter()
                        .any(|&h| h != w.step.process && !self.dead.contains(&h))
            };
            if runnable.iter().any(|&i| !would_wait(&queue.waiting[i])) {
                runnable.retain(|&i| !would_wait(&queue.waiting[i]));
            }
            if runnable.is_empty() {
                None
            } else {
                let i = runnable[self.rng.random_range(0..runnable.len())];
                Some(queue.waiting.remove(i))
            }
        };
        let Some(chosen) = chosen else {
            if self.only.is_some() {
                return false;
            }
            // Only stalled processes wait: time passes for them.
            if let Some((&p, _)) = self.stalled.iter().min_by_key(|(_, &until)| until) {
                self.stalled.remove(&p);
                return true;
            }
            return false;
        };
        self.steps += 1;
        match chosen.step.label.as_str() {
            LOCK_ACQUIRE => self.lock_holders.push(chosen.step.process),
            LOCK_RELEASE => self.lock_holders.retain(|&h| h != chosen.step.process),
            _ => {}
        }
        self.trace.push(format!(
            "{:>5} p{} {}",
            self.steps, chosen.step.process, chosen.step.label
        ));
        let (done_tx, mut done) = oneshot::channel();
        self.last_granted_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if chosen.grant.send(done_tx).is_err() {
            return true; // its task is gone (aborted)
        }
        if tokio::time::timeout(BLOCKED_AFTER, &mut done)
            .await
            .is_err()
        {
            self.trace
                .push("      (blocked: goes on in the background)".into());
            self.blocked.push(done);
            self.blocked_calls += 1;
        } else {
            self.last_ran = Some(chosen.step.label);
        }
        true
    }

    /// The faults of the whole run, then the last lines of the schedule.
    pub fn tail(&self, lines: usize) -> String {
        let from = self.trace.len().saturating_sub(lines);
        let earlier_faults = self.trace[..from].iter().filter(|l| l.contains("FAULT"));
        let mut out: Vec<&str> = earlier_faults.map(String::as_str).collect();
        out.push("  ...");
        out.extend(self.trace[from..].iter().map(String::as_str));
        out.join("\n")
    }
}

/// Whether the seed's generator says yes with probability 1/n.
pub fn one_in(rng: &mut StdRng, n: u32) -> bool {
    rng.random_range(0..n) == 0
}

#[allow(dead_code)]
pub fn seed_rng(seed: u64, salt: u64) -> StdRng {
    use rand::SeedableRng;
    StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
}
