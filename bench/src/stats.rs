//! Recording: one latency histogram and outcome counts per endpoint, and a timeline of
//! one-second ticks (throughput and latency over time) per phase. Latencies are in
//! microseconds. One mutex per phase: held for a few hundred nanoseconds per request
//! by at most a handful of threads, far below what the requests themselves cost.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest latency a histogram tracks exactly (60 s); longer ones are clamped.
const MAX_US: u64 = 60_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Reserve,
    PaymentPending,
    Confirm,
    Cancel,
    GetReservation,
    Healthz,
    MysqlReserve,
    /// The abuse phase's abusive user (its honest users' reserves are `Reserve`).
    AbuserReserve,
    /// The waiting room: `POST /v1/skus/{sku}/queue`.
    QueueJoin,
    /// The waiting room: `GET /v1/skus/{sku}/queue` (a waiting user's poll).
    QueuePoll,
    /// A reserve with an `Admission-Token`.
    AdmittedReserve,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Reserve => "reserve",
            Endpoint::PaymentPending => "payment_pending",
            Endpoint::Confirm => "confirm",
            Endpoint::Cancel => "cancel",
            Endpoint::GetReservation => "get_reservation",
            Endpoint::Healthz => "healthz",
            Endpoint::MysqlReserve => "mysql_reserve",
            Endpoint::AbuserReserve => "abuser_reserve",
            Endpoint::QueueJoin => "queue_join",
            Endpoint::QueuePoll => "queue_poll",
            Endpoint::AdmittedReserve => "admitted_reserve",
        }
    }
}

/// An answer's outcome as a short static label: the problem `code`, or for a success
/// the state it reports (`created`, `replayed`, `confirmed`, ...).
pub fn intern(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "created",
        "replayed",
        "held",
        "paying",
        "confirmed",
        "cancelled",
        "expired",
        "ok",
        "sold_out",
        "limit_exceeded",
        "not_started",
        "ended",
        "not_found",
        "idempotency_key_reused",
        "invalid_request",
        "unauthorized",
        "already_confirmed",
        "payment_in_progress",
        "reservation_expired",
        "reservation_cancelled",
        "already_confirmed+refund",
        "reservation_expired+refund",
        "reservation_cancelled+refund",
        "other+refund",
        "stock_below_committed",
        "rate_limited",
        "overloaded",
        "unavailable",
        "internal",
        "connect",
        "handshake",
        "send",
        "body",
        "timeout",
        "deadlock",
        "error",
        "waiting",
        "admitted",
        "closed",
        "lapsed",
        "no_waiting_room",
        "admission_required",
        "admission_used",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("other")
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, sigfig).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

struct EndpointStats {
    hist: Histogram<u64>,
    /// (HTTP status, outcome label) → the latencies of those answers (2 significant
    /// figures; its length is the count); status 0 = transport error.
    outcomes: BTreeMap<(u16, &'static str), Histogram<u64>>,
}

#[derive(Default)]
struct Tick {
    requests: u64,
    success: u64,
    sold_out: u64,
    errors: u64,
    hist: Option<Histogram<u64>>,
}

struct Inner {
    endpoints: BTreeMap<Endpoint, EndpointStats>,
    timeline: Vec<Tick>,
    /// Open loop: how late each flow started after its intended time.
    lag: Option<Histogram<u64>>,
}

pub struct Recorder {
    pub start: Instant,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Open loop: flows that were due but never started (the generator was held at
    /// --max-in-flight until the phase ended): the target rate was not reached.
    pub unsent: AtomicU64,
    inner: Mutex<Inner>,
}

impl Recorder {
    pub fn new(start: Instant) -> Recorder {
        Recorder {
            start,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unsent: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                endpoints: BTreeMap::new(),
                timeline: Vec::new(),
                lag: None,
            }),
        }
    }

    /// One answered (or failed) request that completed now.
    pub fn record(
        &self,
        endpoint: Endpoint,
        latency: Duration,
        status: u16,
        outcome: &'static str,
    ) {
        let us = micros(latency);
        let second = self.start.elapsed().as_secs() as usize;
        // A load shed (503 overloaded) is the gateway's intended answer to overload,
        // counted apart from failures.
        let error = status == 0 || (status >= 500 && outcome != "overloaded");
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = self.inner.lock().unwrap();
        let stats = inner
            .endpoints
            .entry(endpoint)
            .or_insert_with(|| EndpointStats {
                hist: histogram(3),
                outcomes: BTreeMap::new(),
            });
        let _ = stats.hist.record(us);
        let _ = stats
            .outcomes
            .entry((status, outcome))
            .or_insert_with(|| histogram(2))
            .record(us);
        if inner.timeline.len() <= second {
            inner.timeline.resize_with(second + 1, Tick::default);
        }
        let tick = &mut inner.timeline[second];
        tick.requests += 1;
        if (200..300).contains(&status) {
            tick.success += 1;
        } else if outcome == "sold_out" {
            tick.sold_out += 1;
        } else if error {
            tick.errors += 1;
        }
        let _ = tick.hist.get_or_insert_with(|| histogram(2)).record(us);
    }

    /// Open loop: a flow started `lag` after its intended time (the generator's own
    /// delay: dispatch, a permit, the runtime's queue), which its latencies include.
    pub fn record_lag(&self, lag: Duration) {
        let mut inner = self.inner.lock().unwrap();
        let _ = inner
            .lag
            .get_or_insert_with(|| histogram(2))
            .record(micros(lag));
    }

    /// Open loop: the flows' start lag (None in closed loop).
    pub fn lag(&self) -> Option<OutcomeLatency> {
        let inner = self.inner.lock().unwrap();
        inner.lag.as_ref().map(|h| OutcomeLatency {
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            max_ms: h.max() as f64 / 1000.0,
        })
    }

    /// Summarises the phase; `offset_s` places its ticks on the run's time axis.
    pub fn summary(
        &self,
        elapsed: Duration,
        offset_s: f64,
    ) -> (Vec<EndpointSummary>, Vec<TickSummary>) {
        let inner = self.inner.lock().unwrap();
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let endpoints = inner
            .endpoints
            .iter()
            .map(|(endpoint, stats)| {
                let h = &stats.hist;
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                EndpointSummary {
                    endpoint: endpoint.name().to_string(),
                    count: h.len(),
                    rate_rps: h.len() as f64 / seconds,
                    mean_ms: h.mean() / 1000.0,
                    p50_ms: ms(0.50),
                    p90_ms: ms(0.90),
                    p99_ms: ms(0.99),
                    p999_ms: ms(0.999),
                    max_ms: h.max() as f64 / 1000.0,
                    outcomes: stats
                        .outcomes
                        .iter()
                        .map(|((status, label), h)| (outcome_key(*status, label), h.len()))
                        .collect(),
                    outcome_latency: stats
                        .outcomes
                        .iter()
                        .map(|((status, label), h)| {
                            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                            let latency = OutcomeLatency {
                                p50_ms: ms(0.50),
                                p99_ms: ms(0.99),
                                max_ms: h.max() as f64 / 1000.0,
                            };
                            (outcome_key(*status, label), latency)
                        })
                        .collect(),
                }
            })
            .collect();
        // The last tick is partial (the phase ends mid-second): leave it out of the
        // timeline unless it is the only one.
        let full_ticks = (elapsed.as_secs() as usize).max(1);
        let timeline = inner
            .timeline
            .iter()
            .take(full_ticks)
            .enumerate()
            .map(|(i, tick)| {
                let q = |q: f64| {
                    tick.hist
                        .as_ref()
                        .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
                };
                TickSummary {
                    t_s: offset_s + i as f64,
                    requests: tick.requests,
                    success: tick.success,
                    sold_out: tick.sold_out,
                    errors: tick.errors,
                    p50_ms: q(0.5),
                    p99_ms: q(0.99),
                    p999_ms: q(0.999),
                    max_ms: tick.hist.as_ref().map_or(0.0, |h| h.max() as f64 / 1000.0),
                }
            })
            .collect();
        (endpoints, timeline)
    }
}

pub fn outcome_key(status: u16, label: &str) -> String {
    if status == 0 {
        format!("error {label}")
    } else {
        format!("{status} {label}")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointSummary {
    pub endpoint: String,
    pub count: u64,
    pub rate_rps: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub outcomes: BTreeMap<String, u64>,
    /// Latency of each outcome's answers (2 significant figures): a 201's and a
    /// refusal's are told apart.
    pub outcome_latency: BTreeMap<String, OutcomeLatency>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct OutcomeLatency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl EndpointSummary {
    pub fn outcome(&self, key: &str) -> u64 {
        self.outcomes.get(key).copied().unwrap_or(0)
    }

    pub fn latency_of(&self, key: &str) -> Option<OutcomeLatency> {
        self.outcome_latency.get(key).copied()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TickSummary {
    /// Seconds since the run started.
    pub t_s: f64,
    pub requests: u64,
    pub success: u64,
    pub sold_out: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_endpoint_and_per_second() {
        let rec = Recorder::new(Instant::now());
        for ms in 1..=100u64 {
            rec.record(Endpoint::Reserve, Duration::from_millis(ms), 201, "created");
        }
        rec.record(Endpoint::Reserve, Duration::from_millis(5), 409, "sold_out");
        rec.record(Endpoint::Confirm, Duration::from_millis(5), 0, "timeout");
        let (endpoints, timeline) = rec.summary(Duration::from_secs(1), 10.0);
        let reserve = endpoints.iter().find(|e| e.endpoint == "reserve").unwrap();
        assert_eq!(reserve.count, 101);
        assert_eq!(reserve.outcome("201 created"), 100);
        assert_eq!(reserve.outcome("409 sold_out"), 1);
        assert!((reserve.p50_ms - 50.0).abs() < 1.0, "{}", reserve.p50_ms);
        assert!((reserve.p99_ms - 99.0).abs() < 1.0, "{}", reserve.p99_ms);
        let created = reserve.latency_of("201 created").unwrap();
        assert!((created.p99_ms - 99.0).abs() < 1.0, "{created:?}");
        let sold_out = reserve.latency_of("409 sold_out").unwrap();
        assert!((sold_out.p99_ms - 5.0).abs() < 0.1, "{sold_out:?}");
        assert_eq!(reserve.latency_of("503 overloaded"), None);
        let confirm = endpoints.iter().find(|e| e.endpoint == "confirm").unwrap();
        assert_eq!(confirm.outcome("error timeout"), 1);
        assert_eq!(timeline.len(), 1);
        assert_eq!(timeline[0].t_s, 10.0);
        assert_eq!(
            (
                timeline[0].requests,
                timeline[0].success,
                timeline[0].sold_out,
                timeline[0].errors
            ),
            (102, 100, 1, 1)
        );
        assert_eq!(rec.errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn open_loop_lag_is_kept_apart() {
        let rec = Recorder::new(Instant::now());
        assert_eq!(rec.lag(), None, "closed loop: no lag");
        for ms in 1..=100u64 {
            rec.record_lag(Duration::from_millis(ms));
        }
        let lag = rec.lag().unwrap();
        assert!((lag.p50_ms - 50.0).abs() < 1.0 && (lag.p99_ms - 99.0).abs() < 1.0);
        assert_eq!(rec.requests.load(Ordering::Relaxed), 0, "not a request");
    }

    #[test]
    fn a_load_shed_is_not_an_error() {
        let rec = Recorder::new(Instant::now());
        rec.record(
            Endpoint::Reserve,
            Duration::from_millis(1),
            503,
            "overloaded",
        );
        rec.record(
            Endpoint::Reserve,
            Duration::from_millis(1),
            429,
            "rate_limited",
        );
        rec.record(
            Endpoint::Reserve,
            Duration::from_millis(1),
            503,
            "unavailable",
        );
        assert_eq!(rec.errors.load(Ordering::Relaxed), 1);
        let (endpoints, _) = rec.summary(Duration::from_secs(1), 0.0);
        assert_eq!(endpoints[0].outcome("503 overloaded"), 1);
        assert_eq!(endpoints[0].outcome("429 rate_limited"), 1);
    }

    #[test]
    fn unknown_codes_intern_as_other() {
        assert_eq!(intern("sold_out"), "sold_out");
        assert_eq!(intern("something_new"), "other");
    }
}
