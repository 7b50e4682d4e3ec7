//! Logs and metrics. Metric names live here, so every module counts the same way.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Request latency buckets (seconds): the reserve path answers in well under a millisecond
/// when healthy; the tail up to a few seconds shows timeouts.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The process-wide recorder; installed once (tests build many apps in one process).
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("flashgate_request_duration_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .expect("static buckets are valid")
                .install_recorder()
                .expect("a metrics recorder is installed once");
            describe();
            let upkeep = handle.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        upkeep.run_upkeep();
                    }
                });
            }
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        "flashgate_requests_total",
        "HTTP requests by route and outcome code"
    );
    describe_histogram!(
        "flashgate_request_duration_seconds",
        "HTTP request latency by route"
    );
    describe_counter!(
        "flashgate_events_recorded_total",
        "Events written to MySQL with their facts"
    );
    describe_counter!(
        "flashgate_sku_series_dropped_total",
        "Per-SKU series not kept: more than SKU_SERIES_MAX SKUs on sale"
    );
    describe_gauge!(
        "flashgate_http_connections_open",
        "HTTP connections open (capped by FLASHGATE_MAX_CONNECTIONS)"
    );
    describe_counter!(
        "flashgate_http_connections_refused_total",
        "New connections refused: at the cap with none idle"
    );
    describe_counter!(
        "flashgate_http_connections_closed_total",
        "Connections closed by the server, by reason (deadline, evicted)"
    );
    describe_counter!(
        "flashgate_admission_refused_total",
        "Requests refused before any work, by reason: user and address (rate limits, 429), in_flight (shed, 503)"
    );
    describe_gauge!(
        "flashgate_rate_limiter_keys",
        "Keys a rate limiter remembers (bounded by FLASHGATE_RATE_MAX_KEYS), by limiter"
    );
    describe_counter!(
        "flashgate_rate_limiter_resets_total",
        "Times a rate limiter started over because its keys reached FLASHGATE_RATE_MAX_KEYS"
    );
    describe_counter!(
        "flashgate_transitions_total",
        "Reservation state changes by the state entered"
    );
    describe_counter!(
        "flashgate_compensations_total",
        "Payments answered refund_required, by refusal"
    );
    describe_gauge!(
        "flashgate_compensations_open",
        "Open compensations in MySQL"
    );
    describe_counter!(
        "flashgate_bucket_transfers_total",
        "Transfers of stock between the buckets of a split SKU (src/buckets.rs)"
    );
    describe_counter!(
        "flashgate_bucket_transferred_units_total",
        "Units moved between the buckets of split SKUs"
    );
    describe_histogram!(
        "flashgate_bucket_transfer_wait_seconds",
        "Time a reserve whose home bucket ran dry spent moving stock, by outcome (served; sold_out: too little in every bucket; gave_up: 503 after 1 s of rounds whose stock other reserves took first)"
    );
    describe_counter!("flashgate_expired_total", "Holds expired by the sweeper");
    describe_gauge!(
        "flashgate_sweep_pass_seconds",
        "Duration of the last sweep pass over every SKU (above the sweep interval, expired stock comes back late)"
    );
    describe_counter!(
        "flashgate_flushed_events_total",
        "Outbox events written to MySQL"
    );
    describe_gauge!("flashgate_outbox_backlog", "Outbox events not yet in MySQL");
    describe_gauge!(
        "flashgate_reconcile_last_run_seconds",
        "Unix time of the last reconciliation"
    );
}

/// A request's (route, outcome) labels.
type RouteOutcome = (&'static str, &'static str);

thread_local! {
    /// (route, outcome) -> the request's counter and latency histogram. Made once per
    /// thread and pair (both come from small static sets): a request then builds no
    /// label list and looks nothing up in the shared registry (the macros do both on
    /// every call: ~0.6 µs of a sold-out answer, bench/README.md).
    static REQUEST_SERIES: RefCell<HashMap<RouteOutcome, (Counter, Histogram)>> =
        RefCell::new(HashMap::new());
}

/// Counts a request and records its latency.
pub fn request(route: &'static str, outcome: &'static str, elapsed: Duration) {
    let series = || {
        (
            counter!("flashgate_requests_total", "route" => route, "outcome" => outcome),
            histogram!("flashgate_request_duration_seconds", "route" => route),
        )
    };
    if PROMETHEUS.get().is_none() {
        // No recorder yet: a handle made now would count nowhere, forever.
        let (requests, latency) = series();
        requests.increment(1);
        latency.record(elapsed.as_secs_f64());
        return;
    }
    REQUEST_SERIES.with(|cache| {
        let mut cache = cache.borrow_mut();
        let (requests, latency) = cache.entry((route, outcome)).or_insert_with(series);
        requests.increment(1);
        latency.record(elapsed.as_secs_f64());
    });
}

pub fn transition(to: &'static str) {
    counter!("flashgate_transitions_total", "to" => to).increment(1);
}

pub fn compensation_recorded(refusal: &'static str) {
    counter!("flashgate_compensations_total", "refusal" => refusal).increment(1);
}

pub fn available_stock(sku: &str, available: u64) {
    sku_series().set(sku, |g| g.available = Some(available));
}

/// A sale's held and sold units (the worker's sweep sets them with `available_stock`).
pub fn units(sale: &str, held: u64, sold: u64) {
    sku_series().set(sale, |g| {
        g.held = Some(held);
        g.sold = Some(sold);
    });
}

pub fn bucket_transfer(units: u64) {
    counter!("flashgate_bucket_transfers_total").increment(1);
    counter!("flashgate_bucket_transferred_units_total").increment(units);
}

pub fn bucket_transfer_wait(waited: Duration, outcome: &'static str) {
    histogram!("flashgate_bucket_transfer_wait_seconds", "outcome" => outcome)
        .record(waited.as_secs_f64());
}

pub fn expired(count: u64) {
    counter!("flashgate_expired_total").increment(count);
    counter!("flashgate_transitions_total", "to" => "expired").increment(count);
}

pub fn sweep_pass(took: Duration) {
    gauge!("flashgate_sweep_pass_seconds").set(took.as_secs_f64());
}

pub fn flushed(count: u64) {
    counter!("flashgate_flushed_events_total").increment(count);
}

/// One webhook delivery attempt and how it ended (`delivered`, `retried`, `failed`:
/// given up).
pub fn webhook_attempt(webhook: &str, attempt: &crate::db::webhooks::Attempt) {
    use crate::db::webhooks::Attempt;
    let outcome = match attempt {
        Attempt::Delivered { .. } => 0,
        Attempt::Retry { .. } => 1,
        Attempt::Failed { .. } => 2,
    };
    webhook_series().update(webhook, |s| s.attempts[outcome] += 1);
}

/// How old the endpoint's oldest event not yet delivered is (0: none waiting).
pub fn webhook_lag(webhook: &str, lag: Duration) {
    webhook_series().update(webhook, |s| s.lag_seconds = Some(lag.as_secs_f64()));
}

/// A deleted endpoint's series leave `/metrics` at once.
pub fn forget_webhook(webhook: &str) {
    webhook_series().lock().remove(webhook);
}

/// Keeps the series of the endpoints `exists` says MySQL still has (the worker's
/// refresh of the endpoints: one deleted by another process goes within it).
pub fn retain_webhooks(exists: impl Fn(&str) -> bool) {
    webhook_series().lock().retain(|name, _| exists(name));
}

/// Per-endpoint series live here, not in the recorder, for the reason the per-SKU ones
/// do: the recorder cannot drop one series, and a deleted endpoint's lag would stay at
/// its last value forever (and set off the lag alert). At most as many as endpoints the
/// worker runs (db::webhooks::list, 1000).
#[derive(Default)]
struct WebhookSeries(std::sync::Mutex<std::collections::BTreeMap<String, WebhookCounts>>);

#[derive(Default)]
struct WebhookCounts {
    /// Attempts delivered, retried, failed.
    attempts: [u64; 3],
    lag_seconds: Option<f64>,
}

fn webhook_series() -> &'static WebhookSeries {
    static SERIES: OnceLock<WebhookSeries> = OnceLock::new();
    SERIES.get_or_init(WebhookSeries::default)
}

impl WebhookSeries {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, WebhookCounts>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, webhook: &str, change: impl FnOnce(&mut WebhookCounts)) {
        let mut series = self.lock();
        match series.get_mut(webhook) {
            Some(counts) => change(counts),
            None => change(series.entry(webhook.to_owned()).or_default()),
        }
    }

    /// The series in Prometheus text format.
    fn render(&self) -> String {
        use std::fmt::Write;
        let series = self.lock();
        let mut page = String::new();
        let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            if lines.is_empty() {
                return;
            }
            let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for line in lines {
                let _ = writeln!(page, "{name}{line}");
            }
            page.push('\n');
        };
        // Endpoint names are [A-Za-z0-9_-]: nothing to escape in a label value.
        let mut attempts = Vec::new();
        for (webhook, counts) in series.iter() {
            for (outcome, n) in ["delivered", "retried", "failed"]
                .iter()
                .zip(counts.attempts)
            {
                if n > 0 {
                    attempts.push(format!(
                        "{{webhook=\"{webhook}\",outcome=\"{outcome}\"}} {n}"
                    ));
                }
            }
        }
        family(
            "flashgate_webhook_attempts_total",
            "counter",
            "Webhook delivery attempts by endpoint and outcome (delivered, retried, failed)",
            attempts,
        );
        family(
            "flashgate_webhook_failed_total",
            "counter",
            "Webhook deliveries given up after the retry window (listed as failed, replayable)",
            series
                .iter()
                .filter(|(_, c)| c.attempts[2] > 0)
                .map(|(webhook, c)| format!("{{webhook=\"{webhook}\"}} {}", c.attempts[2]))
                .collect(),
        );
        family(
            "flashgate_webhook_lag_seconds",
            "gauge",
            "Age of the endpoint's oldest event not delivered yet (0: none waiting)",
            series
                .iter()
                .filter_map(|(webhook, c)| {
                    c.lag_seconds
                        .map(|lag| format!("{{webhook=\"{webhook}\"}} {lag}"))
                })
                .collect(),
        );
        page
    }
}

/// Events (src/events.rs) written to MySQL with their facts.
pub fn events_recorded(count: u64) {
    counter!("flashgate_events_recorded_total").increment(count);
}

/// The outbox backlog the last flush pass of this process measured (u64::MAX: none yet).
static LAST_OUTBOX_BACKLOG: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(u64::MAX);

pub fn outbox_backlog(events: u64) {
    gauge!("flashgate_outbox_backlog").set(events as f64);
    LAST_OUTBOX_BACKLOG.store(events, std::sync::atomic::Ordering::Relaxed);
}

/// What the last flush pass in this process measured; None when no worker runs here.
pub fn last_outbox_backlog() -> Option<u64> {
    let events = LAST_OUTBOX_BACKLOG.load(std::sync::atomic::Ordering::Relaxed);
    (events != u64::MAX).then_some(events)
}

pub fn open_compensations(count: i64) {
    gauge!("flashgate_compensations_open").set(count as f64);
}

/// Only SKUs with drift have a series: a pass over every SKU on sale (some retiring
/// while it runs) leaves no series behind for the clean ones. Absent means no drift.
pub fn reconcile_drift(sku: &str, findings: usize) {
    if findings > 0 {
        sku_series().set(sku, |g| g.drift = Some(findings));
    } else {
        sku_series().clear_drift(sku);
    }
}

/// A retired SKU's series leave `/metrics` at once.
pub fn forget_sku(sku: &str) {
    sku_series().forget(sku);
}

/// Per-SKU series live here, not in the recorder: the recorder cannot drop one series,
/// and a series per SKU ever defined would grow `/metrics` with history. Only SKUs on
/// sale are set (by the worker and the admin PUT); a retired SKU's series go with it,
/// one not set for SKU_SERIES_IDLE (retired by another process) goes at the next
/// render, and at most SKU_SERIES_MAX are kept.
pub const SKU_SERIES_MAX: usize = 10_000;
pub const SKU_SERIES_IDLE: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct SkuSeries(std::sync::Mutex<std::collections::BTreeMap<String, SkuGauges>>);

#[derive(Debug, Clone)]
pub struct SkuGauges {
    pub available: Option<u64>,
    pub held: Option<u64>,
    pub sold: Option<u64>,
    pub drift: Option<usize>,
    set_at: std::time::Instant,
}

fn sku_series() -> &'static SkuSeries {
    static SERIES: OnceLock<SkuSeries> = OnceLock::new();
    SERIES.get_or_init(SkuSeries::default)
}

impl SkuSeries {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, SkuGauges>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, sku: &str, update: impl FnOnce(&mut SkuGauges)) {
        let mut series = self.lock();
        let now = std::time::Instant::now();
        if let Some(gauges) = series.get_mut(sku) {
            update(gauges);
            gauges.set_at = now;
            return;
        }
        if series.len() >= SKU_SERIES_MAX {
            series.retain(|_, g| g.set_at.elapsed() < SKU_SERIES_IDLE);
            if series.len() >= SKU_SERIES_MAX {
                counter!("flashgate_sku_series_dropped_total").increment(1);
                return;
            }
        }
        let mut gauges = SkuGauges {
            available: None,
            held: None,
            sold: None,
            drift: None,
            set_at: now,
        };
        update(&mut gauges);
        series.insert(sku.to_owned(), gauges);
    }

    /// Drops the SKU's drift gauge (the whole entry when it has nothing else).
    pub fn clear_drift(&self, sku: &str) {
        let mut series = self.lock();
        if let Some(gauges) = series.get_mut(sku) {
            gauges.drift = None;
            if gauges.available.is_none() && gauges.held.is_none() {
                series.remove(sku);
            }
        }
    }

    pub fn forget(&self, sku: &str) {
        self.lock().remove(sku);
    }

    pub fn contains(&self, sku: &str) -> bool {
        self.lock().contains_key(sku)
    }

    /// The series in Prometheus text format (after dropping the idle ones).
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut series = self.lock();
        series.retain(|_, g| g.set_at.elapsed() < SKU_SERIES_IDLE);
        let mut page = String::new();
        let mut family = |name: &str, help: &str, value: &dyn Fn(&SkuGauges) -> Option<f64>| {
            let lines: Vec<(&String, f64)> = series
                .iter()
                .filter_map(|(sku, g)| value(g).map(|v| (sku, v)))
                .collect();
            if lines.is_empty() {
                return;
            }
            let _ = writeln!(page, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (sku, v) in lines {
                // SKU ids are [A-Za-z0-9_-]: nothing to escape in a label value.
                let _ = writeln!(page, "{name}{{sku=\"{sku}\"}} {v}");
            }
            page.push('\n');
        };
        family(
            "flashgate_available_stock",
            "Units available per SKU on sale",
            &|g| g.available.map(|v| v as f64),
        );
        family(
            "flashgate_reconcile_drift",
            "Drift found per SKU on sale at the last reconcile",
            &|g| g.drift.map(|v| v as f64),
        );
        // Units by state per SKU on sale, a split SKU's buckets summed.
        let mut units: std::collections::BTreeMap<&str, [u64; 3]> = Default::default();
        for (sale, g) in series.iter() {
            if let (Some(available), Some(held), Some(sold)) = (g.available, g.held, g.sold) {
                let sum = units.entry(crate::buckets::sku_of_tag(sale)).or_default();
                for (total, v) in sum.iter_mut().zip([available, held, sold]) {
                    *total += v;
                }
            }
        }
        if !units.is_empty() {
            let name = "flashgate_sku_units";
            let _ = writeln!(
                page,
                "# HELP {name} Units per SKU on sale by state (available + held + sold = stock)\n\
                 # TYPE {name} gauge"
            );
            for (sku, values) in units {
                for (state, v) in ["available", "held", "sold"].into_iter().zip(values) {
                    let _ = writeln!(page, "{name}{{sku=\"{sku}\",state=\"{state}\"}} {v}");
                }
            }
            page.push('\n');
        }
        page
    }
}

/// The per-SKU series (tests).
pub fn sku_series_contains(sku: &str) -> bool {
    sku_series().contains(sku)
}

pub fn reconcile_ran(unix_seconds: f64) {
    gauge!("flashgate_reconcile_last_run_seconds").set(unix_seconds);
}

/// Logs to stderr, filtered by FLASHGATE_LOG (default `info`).
/// Logs to stderr, ANSI-coloured only when stderr is a terminal and `NO_COLOR` is unset
/// or empty (no escape codes in files, journald or cron mail). `skip_findings` leaves
/// out the reconciler's line per finding: `flashgate reconcile` prints its findings on
/// stdout itself, once.
pub fn init_logging(format: crate::config::LogFormat, skip_findings: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLASHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let subscriber = logging_with(format, filter, std::io::stderr, ansi);
    let _ = if skip_findings {
        subscriber
            .with(tracing_subscriber::filter::filter_fn(|meta| {
                !is_finding_line(meta)
            }))
            .try_init()
    } else {
        subscriber.try_init()
    };
}

/// Colour on a terminal, unless `NO_COLOR` has a value (<https://no-color.org>).
pub fn colour_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The reconciler's WARN line for one finding (it carries `repaired`).
fn is_finding_line(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event()
        && meta.target() == "flashgate::reconcile"
        && meta.fields().field("repaired").is_some()
}

/// The log subscriber. In JSON, one object per line whose `span` holds the fields of
/// the span it was written in: a request's lines carry its `request_id`.
pub fn logging<W>(
    format: crate::config::LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    logging_with(format, filter, writer, false)
}

/// `logging`, with ANSI colours in the text format when `ansi`.
pub fn logging_with<W>(
    format: crate::config::LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::fmt::format::Format;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        crate::config::LogFormat::Text => Box::new(
            builder
                .event_format(WithRequest {
                    inner: Format::default().with_ansi(ansi),
                    json: false,
                })
                .finish(),
        ),
        crate::config::LogFormat::Json => Box::new(
            builder
                .json()
                .event_format(WithRequest {
                    inner: Format::default()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false),
                    json: true,
                })
                .finish(),
        ),
    }
}

/// An event format that adds the fields of the request being answered
/// (`request_id::current`) to every line written while it is: in JSON as the line's
/// `span` object (`{"span": {"request_id", "method", "path"}}`), in text at the end.
pub struct WithRequest<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithRequest<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(request) = crate::request_id::current(|r| r.clone()) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let body = line.trim_end_matches('\n');
        let id = request.request_id.to_str().unwrap_or("");
        let (method, path) = (request.method.as_str(), request.uri.path());
        if self.json {
            let Some(open) = body.strip_suffix('}') else {
                return writeln!(writer, "{body}");
            };
            let span = serde_json::json!({"request_id": id, "method": method, "path": path});
            let comma = if open.ends_with('{') { "" } else { "," };
            writeln!(writer, "{open}{comma}\"span\":{span}}}")
        } else {
            writeln!(writer, "{body} request_id={id} method={method} path={path}")
        }
    }
}

/// How often `/metrics` is rendered at most: between two renders every scrape gets the
/// same page, so a flood of scrapes costs a copy each, not a render each.
pub const METRICS_RENDER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The last rendered `/metrics` page.
#[derive(Default)]
pub struct MetricsPage {
    last: std::sync::Mutex<Option<(std::time::Instant, bytes::Bytes)>>,
}

impl MetricsPage {
    /// The page, rendered again only when the last one is METRICS_RENDER_EVERY old.
    /// Scrapes arriving while one renders wait for it (the lock) instead of rendering too.
    pub fn get(&self, handle: &PrometheusHandle) -> bytes::Bytes {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, page)) = &*last {
            if at.elapsed() < METRICS_RENDER_EVERY {
                return page.clone();
            }
        }
        let mut text = handle.render();
        text.push_str(&sku_series().render());
        text.push_str(&webhook_series().render());
        let page = bytes::Bytes::from(text);
        *last = Some((std::time::Instant::now(), page.clone()));
        page
    }
}

#[cfg(test)]
mod colour_tests {
    use super::colour_wanted;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn text_logs_to_a_writer_carry_no_escape_codes() {
        use std::sync::{Arc, Mutex};
        let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = captured.clone();
        let subscriber = super::logging(
            crate::config::LogFormat::Text,
            tracing_subscriber::EnvFilter::new("info"),
            move || Capture(sink.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(sku = "phone-x", "something to say");
        });
        let text = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
        assert!(text.contains("something to say"), "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
