//! The HTTP edge: routes, authentication extractors, request parsing and the
//! problem+json mapping. Handlers parse into domain types, make one gateway call and
//! map the result; HTTP types never leave this module.

use axum::body::Bytes;
use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crate::auth::{AuthFailure, Authenticator, Caller};
use crate::buckets;
use crate::error::{self, Error};
use crate::gateway::Gateway;
use crate::ids::SkuId;
use crate::limits;
use crate::reservation::{
    Compensation, CompensationReason, Refusal, Reservation, Resolution, Sku, SkuDefinition, Status,
    WaitingRoom,
};
use crate::telemetry;
use utoipa::{IntoParams, ToSchema};

mod events;
mod openapi;
mod queue;
mod webhooks;

pub use openapi::ApiDoc;

pub struct AppState {
    pub gateway: Gateway,
    /// Rate limits and the in-flight cap, checked before any work.
    pub admission: Arc<crate::admission::Admission>,
    /// False when `/metrics` has its own listener (`metrics_router`): then the public
    /// router answers it 404.
    pub public_metrics: bool,
    pub auth: Authenticator,
    pub prometheus: PrometheusHandle,
    /// A request body must have arrived this long after its head (else 408).
    pub body_timeout: Duration,
    /// `/metrics`, rendered at most once per second.
    pub metrics_page: telemetry::MetricsPage,
    /// `/readyz`, kept fresh in the background.
    pub readiness: Arc<crate::readiness::Readiness>,
}

type SharedState = Arc<AppState>;

/// Every route, also the label of its request metrics.
const ROUTES: [&str; 24] = [
    "/v1/admin/skus",
    "/v1/admin/skus/{sku}",
    "/v1/admin/skus/{sku}/pause",
    "/v1/admin/skus/{sku}/resume",
    "/v1/skus/{sku}",
    "/v1/skus/{sku}/reservations",
    "/v1/skus/{sku}/queue",
    "/v1/skus/{sku}/queue/stream",
    "/v1/reservations/{id}",
    "/v1/reservations/{id}/cancel",
    "/v1/reservations/{id}/payment-pending",
    "/v1/reservations/{id}/confirm",
    "/v1/compensations",
    "/v1/compensations/{id}",
    "/v1/compensations/{id}/resolve",
    "/v1/events",
    "/v1/admin/webhooks",
    "/v1/admin/webhooks/{name}",
    "/v1/admin/webhooks/{name}/deliveries",
    "/v1/admin/webhooks/{name}/replay",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

pub fn router(state: SharedState) -> Router {
    let [admin_skus, admin_sku, pause, resume, sku, reservations, queue_route, queue_stream, reservation, cancel_route, pending, confirm_route, compensations, compensation, resolve, events_route, webhooks_route, webhook_route, deliveries_route, replay_route, health, ready, metrics, openapi_route] =
        ROUTES;
    let public_metrics = state.public_metrics;
    let router = Router::new()
        .route(admin_skus, get(list_skus))
        .route(admin_sku, put(define_sku))
        .route(pause, post(pause_sku))
        .route(resume, post(resume_sku))
        .route(sku, get(get_sku))
        .route(reservations, post(reserve))
        .route(queue_route, post(queue::join).get(queue::ticket))
        .route(queue_stream, get(queue::stream))
        .route(reservation, get(get_reservation))
        .route(cancel_route, post(cancel))
        .route(pending, post(payment_pending))
        .route(confirm_route, post(confirm))
        .route(compensations, get(list_compensations))
        .route(compensation, get(get_compensation))
        .route(resolve, post(resolve_compensation))
        .route(events_route, get(events::list_events))
        .route(webhooks_route, get(webhooks::list_webhooks))
        .route(
            webhook_route,
            put(webhooks::put_webhook)
                .get(webhooks::get_webhook)
                .delete(webhooks::delete_webhook),
        )
        .route(deliveries_route, get(webhooks::list_deliveries))
        .route(replay_route, post(webhooks::replay))
        .route(health, get(healthz))
        .route(ready, get(readyz))
        .route(openapi_route, get(openapi_json));
    let router = if public_metrics {
        router.route(metrics, get(render_metrics))
    } else {
        router
    };
    router
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .layer(DefaultBodyLimit::max(limits::REQUEST_BODY_MAX_BYTES))
        .with_state(state)
}

/// `/metrics` (and `/healthz`) alone, for FLASHGATE_METRICS_LISTEN.
pub fn metrics_router(state: SharedState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state)
}

/// `/metrics` and `/healthz` of a `flashgate worker` process (FLASHGATE_METRICS_LISTEN).
pub fn worker_metrics_router() -> Router {
    let page = Arc::new(telemetry::MetricsPage::default());
    let metrics = move || {
        let page = page.clone();
        async move {
            (
                [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                page.get(&telemetry::prometheus()),
            )
                .into_response()
        }
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
}

// ---------------------------------------------------------------- errors

/// The outcome code of a response, for the request metrics.
#[derive(Clone, Copy)]
struct Outcome(&'static str);

/// An RFC 9457 problem with the contract's stable `code`.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
    extra: Option<Map<String, Value>>,
    /// The rendered body, when it is the same for every request (refusals).
    rendered: Option<Bytes>,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
            extra: None,
            rendered: None,
        }
    }

    fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("https://flashgate.dev/problems/{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        if let (Some(extra), Some(object)) = (&self.extra, body.as_object_mut()) {
            object.extend(extra.clone());
        }
        body
    }

    /// Refusals are answered often (a sold-out burst): their bodies are rendered once.
    fn refused(refusal: Refusal) -> Problem {
        fn plain(refusal: Refusal) -> Problem {
            Problem::new(
                refusal_status(refusal),
                refusal.code(),
                refusal_detail(refusal),
            )
        }
        static RENDERED: LazyLock<HashMap<&'static str, Bytes>> = LazyLock::new(|| {
            Refusal::ALL
                .into_iter()
                .map(|r| (r.code(), Bytes::from(plain(r).body().to_string())))
                .collect()
        });
        let mut problem = plain(refusal);
        problem.rendered = RENDERED.get(refusal.code()).cloned();
        problem
    }

    fn invalid(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    /// Always `code: unauthorized`; the detail says why in a few words.
    fn unauthorized(failure: AuthFailure) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", failure.detail())
    }

    /// `WWW-Authenticate` of a 401 (RFC 6750 3): a bearer token is wanted, and the one
    /// sent (if any) was invalid.
    fn challenge(&self) -> Option<HeaderValue> {
        (self.status == StatusCode::UNAUTHORIZED).then(|| {
            HeaderValue::from_static(if self.detail == AuthFailure::MissingBearer.detail() {
                r#"Bearer realm="flashgate""#
            } else {
                r#"Bearer realm="flashgate", error="invalid_token""#
            })
        })
    }
}

fn refusal_status(refusal: Refusal) -> StatusCode {
    match refusal {
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::SoldOut
        | Refusal::LimitExceeded
        | Refusal::NotStarted
        | Refusal::Ended
        | Refusal::AlreadyConfirmed
        | Refusal::PaymentInProgress
        | Refusal::ReservationExpired
        | Refusal::ReservationCancelled
        | Refusal::StockBelowCommitted
        | Refusal::BucketsChanged
        | Refusal::Paused
        | Refusal::AdmissionUsed
        | Refusal::NoWaitingRoom => StatusCode::CONFLICT,
        Refusal::AdmissionRequired => StatusCode::FORBIDDEN,
    }
}

fn refusal_detail(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::NotFound => "no such resource",
        Refusal::SoldOut => "not enough stock available for this quantity",
        Refusal::LimitExceeded => "this would exceed the per-user limit for the SKU",
        Refusal::NotStarted => "the sale has not started yet",
        Refusal::Ended => "the sale has ended",
        Refusal::IdempotencyKeyReused => {
            "this Idempotency-Key was already used with a different request body"
        }
        Refusal::AlreadyConfirmed => "the reservation is already confirmed",
        Refusal::PaymentInProgress => "a payment is in progress for this reservation",
        Refusal::ReservationExpired => "the reservation has expired",
        Refusal::ReservationCancelled => "the reservation was cancelled",
        Refusal::StockBelowCommitted => "the new stock is below the units held and sold",
        Refusal::BucketsChanged => {
            "a SKU keeps the number of buckets it was created with, and a split SKU whether \
             it has a waiting room; define a new SKU instead"
        }
        Refusal::Paused => "an operator paused the sale of this SKU; retry later",
        Refusal::AdmissionRequired => {
            "this SKU has a waiting room: join its queue and reserve with the \
             `Admission-Token` of your admission"
        }
        Refusal::AdmissionUsed => {
            "this admission already made a hold (under another Idempotency-Key)"
        }
        Refusal::NoWaitingRoom => "this SKU has no waiting room",
    }
}

impl From<Error> for Problem {
    fn from(err: Error) -> Problem {
        match err {
            Error::InvalidRequest(detail) => Problem::invalid(detail),
            Error::Unauthorized => Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid bearer token",
            ),
            Error::Refused(refusal) => Problem::refused(refusal),
            Error::RefundRequired {
                refusal,
                compensation_id,
            } => {
                let mut problem = Problem::new(
                    refusal_status(refusal),
                    refusal.code(),
                    format!("{}; the payment must be refunded", refusal_detail(refusal)),
                );
                let mut extra = Map::new();
                extra.insert("refund_required".into(), Value::Bool(true));
                extra.insert("compensation_id".into(), Value::String(compensation_id));
                problem.extra = Some(extra);
                problem
            }
            Error::Unavailable { detail, outcome } => {
                tracing::warn!(%detail, outcome = outcome.as_str(), "dependency unavailable");
                let text = match outcome {
                    error::Outcome::NotApplied => {
                        "a backing store is unreachable and nothing was changed; retry later \
                         (with the same Idempotency-Key or payment_ref)"
                    }
                    error::Outcome::Unknown => {
                        "a backing store did not answer in time: the request may or may not \
                         have been applied; retry with the same Idempotency-Key or payment_ref, \
                         which is safe and tells the outcome"
                    }
                };
                let mut problem =
                    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", text);
                let mut extra = Map::new();
                extra.insert("outcome".into(), Value::String(outcome.as_str().into()));
                problem.extra = Some(extra);
                problem
            }
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = match &self.rendered {
            Some(rendered) => rendered.clone(),
            None => Bytes::from(self.body().to_string()),
        };
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(challenge) = self.challenge() {
            response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
        }
        response.extensions_mut().insert(Outcome(self.code));
        response
    }
}

/// Counts and times every request, and turns any error answer not produced by us
/// (a body over the limit, a malformed query) into problem+json.
/// Also gives the request its id (`request_id`): on the answer, and on its log lines.
/// What every request goes through, in one layer (each axum middleware layer boxes and
/// moves the request's future): its id and log span, load shedding, the body rules,
/// then, on the way out, problem+json for bodiless refusals and the request metrics.
async fn edge(
    State(state): State<SharedState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = crate::request_id::RequestId::begin(&request);
    let admitted = async {
        let _in_flight = match crate::admission::shed(&state.admission, &request) {
            Ok(permit) => permit,
            Err(refused) => return refused.into_response(),
        };
        match request_body(state.body_timeout, request).await {
            Ok(request) => next.run(request).await,
            Err(refused) => refused,
        }
    };
    let response = id.scope(admitted).await;
    let mut response =
        if response.status().is_success() || response.extensions().get::<Outcome>().is_some() {
            response
        } else {
            let status = response.status();
            let code = match status {
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::NOT_FOUND => "not_found",
                StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                StatusCode::REQUEST_TIMEOUT => "request_timeout",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                s if s.is_server_error() => "internal",
                _ => "invalid_request",
            };
            Problem::new(status, code, status.canonical_reason().unwrap_or("error")).into_response()
        };
    let outcome = response.extensions().get::<Outcome>().map_or("ok", |o| o.0);
    let route = matched
        .and_then(|m| ROUTES.into_iter().find(|r| *r == m.as_str()))
        .unwrap_or("unmatched");
    telemetry::request(route, outcome, started.elapsed());
    id.finish(&mut response);
    if outcome == "rate_limited" {
        // Slows a closed-loop abuser to a few requests a second per connection; the
        // permit is back already, so waiting refusals never crowd out other requests.
        tokio::time::sleep(state.admission.rate_limited_delay).await;
    }
    response
}

/// A problem+json answer, for the admission layers (`admission`).
pub fn problem(status: StatusCode, code: &'static str, detail: &str) -> Response {
    Problem::new(status, code, detail).into_response()
}

/// A problem+json body, for answers written below the router (`connections`).
pub fn problem_json(status: StatusCode, code: &'static str, detail: &str) -> String {
    Problem::new(status, code, detail).body().to_string()
}

// ---------------------------------------------------------------- request bodies

/// Every request body, before routing and handlers: a declared length over the limit
/// is refused before a byte of it is read (413), the body must arrive within the body
/// deadline (408), and a non-empty one must be `application/json` (415). Handlers then
/// take it whole from memory. A request without a body passes untouched (a reserve's
/// body is optional). Refusals that leave body bytes unread close the connection.
async fn request_body(deadline: Duration, request: Request) -> Result<Request, Response> {
    if request.body().is_end_stream() {
        return Ok(request);
    }
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits::REQUEST_BODY_MAX_BYTES as u64) {
        return Err(closing(too_large()));
    }
    let json = is_json(&request);
    if declared.is_some_and(|n| n > 0) && !json {
        return Err(closing(unsupported_media_type()));
    }
    let (parts, body) = request.into_parts();
    let read = http_body_util::Limited::new(body, limits::REQUEST_BODY_MAX_BYTES);
    let bytes = match tokio::time::timeout(deadline, http_body_util::BodyExt::collect(read)).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(closing(too_large()))
        }
        Ok(Err(_)) => {
            return Err(closing(Problem::invalid(
                "the request body could not be read",
            )))
        }
        Err(_) => {
            return Err(closing(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    deadline.as_millis()
                ),
            )))
        }
    };
    if !bytes.is_empty() && !json {
        return Err(unsupported_media_type().into_response());
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// `application/json`, any case, parameters (`; charset=utf-8`) allowed.
fn is_json(request: &Request) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

fn too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "request bodies are at most {} bytes",
            limits::REQUEST_BODY_MAX_BYTES
        ),
    )
}

fn unsupported_media_type() -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "a request body must be Content-Type: application/json",
    )
}

/// The answer, and the connection closes after it (body bytes may be left unread).
fn closing(problem: Problem) -> Response {
    let mut response = problem.into_response();
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

// ---------------------------------------------------------------- authentication

fn bearer(parts: &Parts) -> Result<&str, AuthFailure> {
    crate::admission::bearer(&parts.headers)
}

/// The `Idempotency-Key` header of a reserve (read alone: the reserve path does not
/// copy the whole header map).
struct IdempotencyKey(String);

impl<S: Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let mut keys = parts.headers.get_all(IDEMPOTENCY_KEY).iter();
        let (key, None) = (keys.next(), keys.next()) else {
            // Which of two keys would be the right one is a guess: refuse.
            return Err(Problem::invalid("send exactly one Idempotency-Key header"));
        };
        key.and_then(|v| v.to_str().ok())
            .filter(|k| visible_ascii(k, limits::IDEMPOTENCY_KEY_MAX_LEN))
            .map(|k| IdempotencyKey(k.to_owned()))
            .ok_or_else(|| {
                Problem::invalid(format!(
                    "header Idempotency-Key is required: 1..={} visible ASCII characters",
                    limits::IDEMPOTENCY_KEY_MAX_LEN
                ))
            })
    }
}
/// The payment/order service or an operator.
struct Service;

/// A reserve's user, past the reserve admission (`admission::admit_reserve`): the
/// user's and the address's token buckets, 429 when either is empty, 401 for a bad token.
struct AdmittedUser(String);

impl FromRequestParts<SharedState> for AdmittedUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Response> {
        match crate::admission::admit_reserve(state, parts).await? {
            Ok(user) => Ok(AdmittedUser(user)),
            Err(failure) => Err(Problem::unauthorized(failure).into_response()),
        }
    }
}

impl FromRequestParts<SharedState> for Service {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Problem> {
        let token = bearer(parts).map_err(Problem::unauthorized)?;
        state
            .auth
            .service(token)
            .map(|()| Service)
            .map_err(Problem::unauthorized)
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Problem> {
        let token = bearer(parts).map_err(Problem::unauthorized)?;
        state
            .auth
            .caller(token)
            .await
            .map_err(Problem::unauthorized)
    }
}

// ---------------------------------------------------------------- request parsing

fn sku_id(raw: &str) -> Result<SkuId, Problem> {
    SkuId::parse(raw).ok_or_else(|| Problem::invalid("SKU ids match [A-Za-z0-9_-]{1,64}"))
}

/// 1..=max visible ASCII characters (0x21..=0x7e).
fn visible_ascii(value: &str, max: usize) -> bool {
    (1..=max).contains(&value.len()) && value.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// `PUT /v1/admin/skus/{sku}`: the whole definition; omitted optional fields take
/// their defaults. A field it does not know is refused (a misspelt one must never
/// silently take its default). Integers are written as integers (`600.0` is refused).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DefineSku {
    /// Units on sale.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_u64)]
    stock: u64,
    /// Units one user may hold, pay and buy of this SKU in all.
    #[serde(default = "DefineSku::default_per_user_limit")]
    #[schema(default = 1, minimum = 1, maximum = 4_294_967_295_u64)]
    per_user_limit: u64,
    /// How long a hold lasts before it expires.
    #[serde(default = "DefineSku::default_hold_seconds")]
    #[schema(default = 600, minimum = 1, maximum = 86_400)]
    hold_seconds: u64,
    /// Start of the sale (RFC 3339, a real instant within 1970-01-01..=9999-12-31 UTC);
    /// absent or null: started. The pattern is the form (years 1970..=9999); a date
    /// that does not exist (February 30) or an instant outside the range after its
    /// offset is still refused.
    #[schema(format = DateTime, pattern = r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")]
    starts_at: Option<String>,
    /// End of the sale, after `starts_at`; absent or null: no end.
    #[schema(format = DateTime, pattern = r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")]
    ends_at: Option<String>,
    /// Redis hash slots the SKU's stock is split over (so over a cluster's primaries),
    /// 1..=16; fixed when the SKU is created (another value later: 409
    /// `buckets_changed`). More than one is for a SKU hotter than one Redis core.
    #[serde(default = "DefineSku::default_buckets")]
    #[schema(default = 1, minimum = 1, maximum = 16)]
    buckets: u64,
    /// Buyers queue and are admitted by stock (`/v1/skus/{sku}/queue`); absent or null:
    /// no waiting room. On a SKU of more than one bucket: fixed when it is created (409
    /// `buckets_changed`), and its stock and buyers stay in bucket 0.
    #[serde(default)]
    waiting_room: Option<WaitingRoomBody>,
}

/// A waiting room's terms in a SKU definition.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct WaitingRoomBody {
    /// How long an admission waits for its reserve before it lapses and its unit goes
    /// to the next user in line.
    #[serde(default = "WaitingRoomBody::default_admission_seconds")]
    #[schema(default = 120, minimum = 1, maximum = 86_400)]
    admission_seconds: u64,
    /// Most admissions per second; 0: as fast as the stock allows.
    #[serde(default)]
    #[schema(default = 0, minimum = 0, maximum = 4_294_967_295_u64)]
    admit_per_second: u64,
    /// Users who joined before `starts_at` are placed in a random order at the start
    /// (else in their order of arrival).
    #[serde(default = "WaitingRoomBody::default_prequeue_shuffle")]
    #[schema(default = true)]
    prequeue_shuffle: bool,
}

impl WaitingRoomBody {
    fn default_admission_seconds() -> u64 {
        120
    }

    fn default_prequeue_shuffle() -> bool {
        true
    }

    fn terms(&self) -> Result<WaitingRoom, Problem> {
        Ok(WaitingRoom {
            admission_seconds: within(
                "waiting_room.admission_seconds",
                self.admission_seconds,
                1..=limits::ADMISSION_SECONDS_MAX,
            )? as u32,
            admit_per_second: within(
                "waiting_room.admit_per_second",
                self.admit_per_second,
                0..=u64::from(u32::MAX),
            )? as u32,
            prequeue_shuffle: self.prequeue_shuffle,
        })
    }
}

impl DefineSku {
    fn default_per_user_limit() -> u64 {
        1
    }

    fn default_hold_seconds() -> u64 {
        600
    }

    fn default_buckets() -> u64 {
        1
    }

    fn definition(self) -> Result<SkuDefinition, Problem> {
        let definition = SkuDefinition {
            stock_total: within("stock", self.stock, 0..=limits::STOCK_MAX)?,
            per_user_limit: within("per_user_limit", self.per_user_limit, 1..=u32::MAX as u64)?,
            hold_seconds: within(
                "hold_seconds",
                self.hold_seconds,
                1..=limits::HOLD_SECONDS_MAX,
            )?,
            starts_at_ms: timestamp("starts_at", self.starts_at.as_deref())?,
            ends_at_ms: timestamp("ends_at", self.ends_at.as_deref())?,
            buckets: within("buckets", self.buckets, 1..=u64::from(buckets::BUCKETS_MAX))? as u32,
            // A PUT keeps the SKU's pause (Gateway::define_sku carries it over).
            paused: false,
            waiting_room: self
                .waiting_room
                .as_ref()
                .map(WaitingRoomBody::terms)
                .transpose()?,
        };
        if let (Some(starts), Some(ends)) = (definition.starts_at_ms, definition.ends_at_ms) {
            if ends <= starts {
                return Err(Problem::invalid("`ends_at` must be after `starts_at`"));
            }
        }
        Ok(definition)
    }
}

/// `POST /v1/skus/{sku}/reservations`; an empty body is `{}`.
#[derive(Debug, Deserialize, ToSchema)]
struct ReserveBody {
    /// Units to hold; null, strings, numbers out of range and any number written with a
    /// fraction or an exponent (also `1.0`) are refused.
    #[serde(default = "ReserveBody::default_quantity")]
    #[schema(default = 1, minimum = 1, maximum = 4_294_967_295_u64)]
    quantity: u64,
}

impl ReserveBody {
    fn default_quantity() -> u64 {
        1
    }

    fn quantity(&self) -> Result<u64, Problem> {
        within("quantity", self.quantity, 1..=limits::QUANTITY_MAX)
    }
}

/// `POST /v1/reservations/{id}/payment-pending` and `/confirm`.
#[derive(Debug, Deserialize, ToSchema)]
struct PaymentBody {
    /// The payment service's reference of this payment.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]{1,128}$")]
    payment_ref: String,
}

impl PaymentBody {
    fn payment_ref(self) -> Result<String, Problem> {
        if visible_ascii(&self.payment_ref, limits::PAYMENT_REF_MAX_LEN) {
            Ok(self.payment_ref)
        } else {
            Err(Problem::invalid(format!(
                "`payment_ref` is required: 1..={} visible ASCII characters",
                limits::PAYMENT_REF_MAX_LEN
            )))
        }
    }
}

/// A JSON object body into its type; an empty body is `{}`. Whatever serde refuses
/// (a missing field, null, a fraction, a string for a number, a duplicate key) is
/// `400 invalid_request`. Only an object is a body: serde would also read a struct
/// from an array.
fn json_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    let text: &[u8] = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => b"{}",
        Some(b'{') => body,
        Some(_) => return Err(Problem::invalid("the body must be a JSON object")),
    };
    serde_json::from_slice(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Problem::invalid(format!("invalid body: {e}")),
        _ => Problem::invalid(format!("malformed JSON: {e}")),
    })
}

/// `value` of field `name`, if within `range`.
fn within(name: &str, value: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, Problem> {
    if !range.contains(&value) {
        return Err(Problem::invalid(format!(
            "`{name}` must be within {}..={}",
            range.start(),
            range.end()
        )));
    }
    Ok(value)
}

/// An optional RFC 3339 timestamp between 1970-01-01 and 9999-12-31 (UTC), in ms.
fn timestamp(name: &str, raw: Option<&str>) -> Result<Option<i64>, Problem> {
    let Some(raw) = raw else { return Ok(None) };
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.timestamp_millis())
        .filter(|ms| (limits::TIMESTAMP_MIN_MS..=limits::TIMESTAMP_MAX_MS).contains(ms))
        .map(Some)
        .ok_or_else(|| {
            Problem::invalid(format!(
                "`{name}` must be an RFC 3339 timestamp between 1970-01-01T00:00:00Z \
                 and 9999-12-31T23:59:59.999Z"
            ))
        })
}

fn reservation_id(raw: &str) -> Result<&str, Problem> {
    // Anything that is not one of our ids is simply not found (gateway::sku_of), but
    // hostile lengths stop here.
    if raw.len() > 256 {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such reservation",
        ));
    }
    Ok(raw)
}

// ---------------------------------------------------------------- views

fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A reservation as callers see it.
#[derive(Serialize, ToSchema)]
struct ReservationView {
    /// Opaque, unguessable; routes to its SKU.
    reservation_id: String,
    sku: String,
    /// The JWT `sub` of the user who holds it.
    user_id: String,
    #[schema(minimum = 1)]
    quantity: u64,
    status: Status,
    /// RFC 3339, UTC, milliseconds.
    #[schema(format = DateTime)]
    expires_at: String,
    #[schema(format = DateTime)]
    created_at: String,
    /// Present once a payment was announced or confirmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    payment_ref: Option<String>,
}

impl From<Reservation> for ReservationView {
    fn from(r: Reservation) -> ReservationView {
        ReservationView {
            reservation_id: r.reservation_id,
            sku: r.sku,
            user_id: r.user_id,
            quantity: r.quantity,
            status: r.status,
            expires_at: rfc3339_ms(r.expires_at_ms),
            created_at: rfc3339_ms(r.created_at_ms),
            payment_ref: r.payment_ref,
        }
    }
}

/// A SKU's definition and counters (`available + held + sold == stock_total`).
#[derive(Serialize, ToSchema)]
struct SkuView {
    sku: String,
    stock_total: u64,
    available: u64,
    held: u64,
    sold: u64,
    per_user_limit: u64,
    hold_seconds: u64,
    /// Null when the sale has no start.
    #[schema(format = DateTime)]
    starts_at: Option<String>,
    /// Null when the sale has no end.
    #[schema(format = DateTime)]
    ends_at: Option<String>,
    /// Paused by an operator: reserves answer `409 paused`, the rest goes on.
    paused: bool,
    /// The waiting room's terms; null: none.
    waiting_room: Option<WaitingRoomView>,
}

/// A waiting room's terms, as defined.
#[derive(Serialize, ToSchema)]
struct WaitingRoomView {
    admission_seconds: u32,
    admit_per_second: u32,
    prequeue_shuffle: bool,
}

impl From<Sku> for SkuView {
    fn from(s: Sku) -> SkuView {
        SkuView {
            sku: s.sku,
            stock_total: s.stock_total,
            available: s.available,
            held: s.held,
            sold: s.sold,
            per_user_limit: s.per_user_limit,
            hold_seconds: s.hold_seconds,
            starts_at: s.starts_at_ms.map(rfc3339_ms),
            ends_at: s.ends_at_ms.map(rfc3339_ms),
            paused: s.paused,
            waiting_room: s.waiting_room.map(|w| WaitingRoomView {
                admission_seconds: w.admission_seconds,
                admit_per_second: w.admit_per_second,
                prequeue_shuffle: w.prequeue_shuffle,
            }),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum CompensationStatus {
    Open,
    Resolved,
}

/// A payment that could not become a sale and must be refunded.
#[derive(Serialize, ToSchema)]
struct CompensationView {
    id: String,
    reservation_id: String,
    sku: String,
    user_id: String,
    quantity: u64,
    payment_ref: String,
    reason: CompensationReason,
    status: CompensationStatus,
    #[schema(format = DateTime)]
    created_at: String,
    /// When it was resolved; null while open.
    #[schema(format = DateTime)]
    resolved_at: Option<String>,
    /// The refund's reference given when resolving; null if none.
    refund_ref: Option<String>,
    /// The note given when resolving; null if none.
    note: Option<String>,
}

impl From<Compensation> for CompensationView {
    fn from(c: Compensation) -> CompensationView {
        CompensationView {
            id: c.id,
            reservation_id: c.reservation_id,
            sku: c.sku,
            user_id: c.user_id,
            quantity: c.quantity,
            payment_ref: c.payment_ref,
            reason: c.reason,
            status: if c.resolved {
                CompensationStatus::Resolved
            } else {
                CompensationStatus::Open
            },
            created_at: rfc3339_ms(c.created_at_ms),
            resolved_at: c.resolution.at_ms.map(rfc3339_ms),
            refund_ref: c.resolution.refund_ref,
            note: c.resolution.note,
        }
    }
}

/// The query of `GET /v1/compensations`, checked by hand (strings, so that a bad
/// value gets our own message).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CompensationQuery {
    /// Which compensations; default all.
    #[param(value_type = Option<openapi::CompensationFilter>)]
    status: Option<String>,
    /// Only this SKU's.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    sku: Option<String>,
    /// The `next` of the page before (opaque); absent: from the oldest.
    #[param(max_length = 128)]
    after: Option<String>,
    /// At most this many, default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// `GET /v1/compensations`: oldest first.
#[derive(Serialize, ToSchema)]
struct CompensationList {
    items: Vec<CompensationView>,
    /// The cursor of the next page (`after=`); null when this page is the last.
    next: Option<String>,
}

/// The cursor after a compensation: `<created_at ms>.<id>` ('.' is in no id).
fn compensation_cursor(c: &Compensation) -> String {
    format!("{}.{}", c.created_at_ms, c.id)
}

fn parse_compensation_cursor(raw: &str) -> Result<(i64, String), Problem> {
    raw.split_once('.')
        .and_then(|(at, id)| {
            let at: i64 = at.parse().ok().filter(|at| *at >= 0)?;
            (!id.is_empty() && id.len() <= 64).then(|| (at, id.to_owned()))
        })
        .ok_or_else(|| Problem::invalid("`after` is the `next` of an earlier page"))
}

/// `POST /v1/compensations/{id}/resolve`; the body is optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    /// The refund's reference in the payment system.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]{1,128}$")]
    refund_ref: Option<String>,
    /// A note for the record.
    #[schema(max_length = 500)]
    note: Option<String>,
}

impl ResolveBody {
    fn resolution(self) -> Result<Resolution, Problem> {
        if let Some(r) = &self.refund_ref {
            if !visible_ascii(r, 128) {
                return Err(Problem::invalid(
                    "`refund_ref` is 1..=128 visible ASCII characters",
                ));
            }
        }
        if self.note.as_ref().is_some_and(|n| n.chars().count() > 500) {
            return Err(Problem::invalid("`note` is at most 500 characters"));
        }
        Ok(Resolution {
            at_ms: None,
            refund_ref: self.refund_ref,
            note: self.note,
        })
    }
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(example = "ok")]
    status: &'static str,
    /// The crate version of this binary.
    #[schema(example = "0.1.0")]
    version: &'static str,
    /// The commit it was built from, or `unknown`.
    #[schema(example = "8aa505c1d2e3")]
    build: &'static str,
}

type ApiResult<T> = Result<T, Problem>;

// ---------------------------------------------------------------- handlers

/// Define or replace a SKU; held and sold units carry over.
#[utoipa::path(
    put, path = "/v1/admin/skus/{sku}", tag = "admin",
    params(openapi::SkuPath),
    request_body(content = DefineSku, content_type = "application/json"),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The SKU after the change", body = SkuView),
        (status = 409, description = "`stock_below_committed`: new stock < held + sold", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn define_sku(
    State(state): State<SharedState>,
    _: Service,
    Path(sku): Path<String>,
    body: Bytes,
) -> ApiResult<Json<SkuView>> {
    let sku = sku_id(&sku)?;
    let definition = json_body::<DefineSku>(&body)?.definition()?;
    let sku = state.gateway.define_sku(&sku, &definition).await?;
    Ok(Json(sku.into()))
}

/// Pause a SKU's sale (idempotent): reserves answer `409 paused`; confirms, cancels
/// and payments go on.
#[utoipa::path(
    post, path = "/v1/admin/skus/{sku}/pause", tag = "admin",
    params(openapi::SkuPath),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The SKU, paused", body = SkuView),
        (status = 404, description = "`not_found`: no such SKU", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn pause_sku(
    State(state): State<SharedState>,
    _: Service,
    Path(sku): Path<String>,
) -> ApiResult<Json<SkuView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(state.gateway.set_paused(&sku, true).await?.into()))
}

/// Resume a paused SKU's sale (idempotent).
#[utoipa::path(
    post, path = "/v1/admin/skus/{sku}/resume", tag = "admin",
    params(openapi::SkuPath),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The SKU, on sale again", body = SkuView),
        (status = 404, description = "`not_found`: no such SKU", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn resume_sku(
    State(state): State<SharedState>,
    _: Service,
    Path(sku): Path<String>,
) -> ApiResult<Json<SkuView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(state.gateway.set_paused(&sku, false).await?.into()))
}

/// The query of `GET /v1/admin/skus`, checked by hand.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SkuListQuery {
    /// Which SKUs; default all.
    #[param(value_type = Option<openapi::SkuStateFilter>)]
    state: Option<String>,
    /// The `next` of the page before (opaque); absent: from the oldest.
    #[param(max_length = 20)]
    after: Option<String>,
    /// At most this many, default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// A SKU of the listing: its view and its state.
#[derive(Serialize, ToSchema)]
struct SkuListItem {
    #[serde(flatten)]
    sku: SkuView,
    state: crate::db::SkuState,
}

/// `GET /v1/admin/skus`: oldest definition first.
#[derive(Serialize, ToSchema)]
struct SkuList {
    items: Vec<SkuListItem>,
    /// The cursor of the next page (`after=`); null when this page is the last.
    next: Option<String>,
}

/// The SKUs defined, oldest definition first, with their state and counters.
#[utoipa::path(
    get, path = "/v1/admin/skus", tag = "admin",
    params(SkuListQuery),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The page", body = SkuList),
    )
)]
async fn list_skus(
    State(state): State<SharedState>,
    _: Service,
    Query(query): Query<SkuListQuery>,
) -> ApiResult<Json<SkuList>> {
    let filter = match query.state.as_deref() {
        None | Some("all") => None,
        Some(raw) => Some(crate::db::SkuState::parse(raw).ok_or_else(|| {
            Problem::invalid("`state` is on_sale, scheduled, ended, paused or all")
        })?),
    };
    let after = query
        .after
        .as_deref()
        .map(|raw| {
            raw.parse::<u64>()
                .map_err(|_| Problem::invalid("`after` is the `next` of an earlier page"))
        })
        .transpose()?;
    let limit = page_limit(query.limit.as_deref())?;
    let (page, next) = state.gateway.list_skus(filter, after, limit).await?;
    let items = page
        .into_iter()
        .map(|(sku, state)| SkuListItem {
            sku: sku.into(),
            state,
        })
        .collect();
    Ok(Json(SkuList {
        items,
        next: next.map(|seq| seq.to_string()),
    }))
}

/// A page's `limit`: 1..=1000, default 100.
fn page_limit(raw: Option<&str>) -> Result<u32, Problem> {
    match raw {
        None => Ok(limits::COMPENSATIONS_PAGE_DEFAULT),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=limits::COMPENSATIONS_PAGE_MAX).contains(n))
            .ok_or_else(|| {
                Problem::invalid(format!(
                    "`limit` is an integer within 1..={}",
                    limits::COMPENSATIONS_PAGE_MAX
                ))
            }),
    }
}

/// A SKU's definition and counters.
#[utoipa::path(
    get, path = "/v1/skus/{sku}", tag = "sale",
    params(openapi::SkuPath),
    responses(
        (status = 200, description = "The SKU", body = SkuView),
        (status = 404, description = "`not_found`: no such SKU", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn get_sku(
    State(state): State<SharedState>,
    Path(sku): Path<String>,
) -> ApiResult<Json<SkuView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(state.gateway.sku(&sku).await?.into()))
}

const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const ADMISSION_TOKEN: HeaderName = HeaderName::from_static("admission-token");

/// The `Admission-Token` header of a reserve, if any: one value of visible ASCII, else
/// 403 `admission_required`, as any token that is not good.
struct AdmissionToken(Option<String>);

impl FromRequestParts<SharedState> for AdmissionToken {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &SharedState) -> Result<Self, Problem> {
        let mut values = parts.headers.get_all(ADMISSION_TOKEN).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(AdmissionToken(None)),
            (Some(value), None) => match value.to_str() {
                Ok(token) if visible_ascii(token, limits::ADMISSION_TOKEN_MAX_LEN) => {
                    Ok(AdmissionToken(Some(token.to_owned())))
                }
                _ => Err(Problem::refused(Refusal::AdmissionRequired)),
            },
            _ => Err(Problem::refused(Refusal::AdmissionRequired)),
        }
    }
}

/// A constant name: looked up without parsing a string on every reserve.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Hold stock for the calling user; a replayed `Idempotency-Key` answers the same hold.
#[utoipa::path(
    post, path = "/v1/skus/{sku}/reservations", tag = "sale",
    params(openapi::SkuPath, openapi::IdempotencyKeyHeader, openapi::AdmissionTokenHeader),
    request_body(content = ReserveBody, content_type = "application/json",
        description = "Optional (see `EdgeProblems`): no body holds one unit"),
    security(("user_jwt" = [])),
    responses(
        (status = 201, description = "The hold (new, or replayed)", body = ReservationView,
            headers(("Idempotent-Replayed" = String, description = "`true` on a replay"))),
        (status = 403, description = "`admission_required`: the SKU has a waiting room and the `Admission-Token` is missing, not good, or not the caller's", body = openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such SKU", body = openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`sold_out`, `limit_exceeded`, `not_started` (with `starts_at` and `Retry-After`), `ended`, `paused` or `admission_used`", body = openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency_key_reused`: same key, other body", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn reserve(
    State(state): State<SharedState>,
    AdmittedUser(user_id): AdmittedUser,
    Path(sku): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    AdmissionToken(token): AdmissionToken,
    body: Bytes,
) -> ApiResult<Response> {
    let sku = sku_id(&sku)?;
    let quantity = json_body::<ReserveBody>(&body)?.quantity()?;
    let answer = match token {
        None => state.gateway.reserve(&sku, &user_id, quantity, &key).await,
        // Boxed: a cold path kept out of every reserve's future.
        Some(token) => {
            Box::pin(
                state
                    .gateway
                    .reserve_admitted(&sku, &user_id, quantity, &key, &token),
            )
            .await
        }
    };
    let (reservation, replayed) = match answer {
        Err(Error::Refused(Refusal::NotStarted)) => {
            return Ok(Box::pin(not_started(&state, &sku)).await);
        }
        other => other?,
    };
    let mut response = (
        StatusCode::CREATED,
        Json(ReservationView::from(reservation)),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response.extensions_mut().insert(Outcome("replayed"));
    }
    Ok(response)
}

/// `409 not_started` with the start (`starts_at`) and `Retry-After` (seconds to it, at
/// least 1), read from Redis only on this path.
async fn not_started(state: &AppState, sku: &SkuId) -> Response {
    let mut problem = Problem::refused(Refusal::NotStarted);
    let Ok(Some(starts_at_ms)) = state.gateway.starts_at(sku).await else {
        return problem.into_response();
    };
    problem.rendered = None;
    let mut extra = Map::new();
    extra.insert("starts_at".into(), Value::String(rfc3339_ms(starts_at_ms)));
    problem.extra = Some(extra);
    let wait_ms = (starts_at_ms - crate::explore::host_clock_ms()).max(0) as u64;
    let mut response = problem.into_response();
    response.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(wait_ms.div_ceil(1000).max(1)),
    );
    response
}

/// A reservation, to its owner or the service.
#[utoipa::path(
    get, path = "/v1/reservations/{id}", tag = "sale",
    params(openapi::ReservationPath),
    security(("user_jwt" = []), ("service_token" = [])),
    responses(
        (status = 200, description = "The reservation", body = ReservationView),
        (status = 404, description = "`not_found`: no such reservation, or another user's", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn get_reservation(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    Ok(Json(state.gateway.reservation(id, &caller).await?.into()))
}

/// Cancel a hold; its stock returns to `available`.
#[utoipa::path(
    post, path = "/v1/reservations/{id}/cancel", tag = "sale",
    params(openapi::ReservationPath),
    security(("user_jwt" = []), ("service_token" = [])),
    responses(
        (status = 200, description = "Status `cancelled`, or `expired` if it had expired", body = ReservationView),
        (status = 404, description = "`not_found`: no such reservation, or another user's", body = openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`already_confirmed`, or `payment_in_progress` (a user while `paying`)", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn cancel(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    Ok(Json(state.gateway.cancel(id, &caller).await?.into()))
}

/// A payment is in flight: status `paying`, deadline pushed out once by the grace.
#[utoipa::path(
    post, path = "/v1/reservations/{id}/payment-pending", tag = "payment",
    params(openapi::ReservationPath),
    request_body(content = PaymentBody, content_type = "application/json"),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "Status `paying`", body = ReservationView),
        (status = 404, description = "`not_found`: no such reservation", body = openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`reservation_expired`, `reservation_cancelled` or `already_confirmed` (no compensation)", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn payment_pending(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    let payment_ref = json_body::<PaymentBody>(&body)?.payment_ref()?;
    Ok(Json(
        state
            .gateway
            .payment_pending(id, &payment_ref)
            .await?
            .into(),
    ))
}

/// A payment arrived: the hold becomes a sale, or the payment a compensation.
#[utoipa::path(
    post, path = "/v1/reservations/{id}/confirm", tag = "payment",
    params(openapi::ReservationPath),
    request_body(content = PaymentBody, content_type = "application/json"),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "Status `confirmed` (also again with the same `payment_ref`)", body = ReservationView),
        (status = 404, description = "`not_found`: flashgate never issued this id", body = openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`reservation_expired`, `reservation_cancelled` or `already_confirmed` (other `payment_ref`): `refund_required` and `compensation_id` set", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn confirm(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    let payment_ref = json_body::<PaymentBody>(&body)?.payment_ref()?;
    Ok(Json(state.gateway.confirm(id, &payment_ref).await?.into()))
}

/// Compensations, oldest first.
#[utoipa::path(
    get, path = "/v1/compensations", tag = "compensations",
    params(CompensationQuery),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The page", body = CompensationList),
    )
)]
async fn list_compensations(
    State(state): State<SharedState>,
    _: Service,
    Query(query): Query<CompensationQuery>,
) -> ApiResult<Json<CompensationList>> {
    let resolved = match query.status.as_deref() {
        None | Some("all") => None,
        Some("open") => Some(false),
        Some("resolved") => Some(true),
        Some(_) => return Err(Problem::invalid("`status` is open, resolved or all")),
    };
    let sku = query.sku.as_deref().map(sku_id).transpose()?;
    let limit = page_limit(query.limit.as_deref())?;
    let after = query
        .after
        .as_deref()
        .map(parse_compensation_cursor)
        .transpose()?;
    let page = state
        .gateway
        .compensations(resolved, sku.as_ref(), after.as_ref(), limit)
        .await?;
    let next = (page.len() == limit as usize)
        .then(|| page.last().map(compensation_cursor))
        .flatten();
    let items = page.into_iter().map(CompensationView::from).collect();
    Ok(Json(CompensationList { items, next }))
}

/// Mark a compensation refunded (idempotent).
#[utoipa::path(
    post, path = "/v1/compensations/{id}/resolve", tag = "compensations",
    params(openapi::CompensationPath),
    request_body(content = ResolveBody, content_type = "application/json",
        description = "Optional: a refund reference and a note, kept with the compensation"),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "Status `resolved`", body = CompensationView),
        (status = 404, description = "`not_found`: no such compensation", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn resolve_compensation(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<CompensationView>> {
    let id = compensation_id(&id)?;
    let resolution = match body.is_empty() {
        true => Resolution::default(),
        false => json_body::<ResolveBody>(&body)?.resolution()?,
    };
    Ok(Json(
        state
            .gateway
            .resolve_compensation(id, &resolution)
            .await?
            .into(),
    ))
}

/// One compensation.
#[utoipa::path(
    get, path = "/v1/compensations/{id}", tag = "compensations",
    params(openapi::CompensationPath),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The compensation", body = CompensationView),
        (status = 404, description = "`not_found`: no such compensation", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn get_compensation(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
) -> ApiResult<Json<CompensationView>> {
    let id = compensation_id(&id)?;
    Ok(Json(state.gateway.compensation(id).await?.into()))
}

/// Compensation ids are at most 64 characters (MySQL `VARCHAR(64)`); longer is not ours.
fn compensation_id(raw: &str) -> Result<&str, Problem> {
    if raw.is_empty() || raw.len() > 64 {
        return Err(Error::Refused(Refusal::NotFound).into());
    }
    Ok(raw)
}

/// The process is alive.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        // Set by build.rs; a stale build-script output must not break the build.
        build: option_env!("FLASHGATE_BUILD").unwrap_or("unknown"),
    })
}

/// Ready when Redis answers and the scripts are loaded. MySQL and the outbox backlog
/// are reported but do not make the gateway unready: sales go on without MySQL. The
/// answer is the last background check (`readiness`): constant time.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = crate::readiness::Report),
        (status = 503, description = "`unavailable`: Redis is unreachable or its scripts are not loaded (as of the last check); the report's members follow the problem's", body = openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(state): State<SharedState>) -> Response {
    let report = state.readiness.report();
    let body = serde_json::to_value(&report).unwrap_or_default();
    if report.ready() {
        return Json(body).into_response();
    }
    let mut problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Redis is unreachable or its scripts are not loaded (as of the last check)",
    );
    problem.extra = body.as_object().cloned();
    problem.into_response()
}

/// Prometheus text format.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "The metrics", body = String,
        content_type = "text/plain"))
)]
async fn render_metrics(State(state): State<SharedState>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics_page.get(&state.prometheus),
    )
        .into_response()
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object,
        content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    (
        [(CONTENT_TYPE, "application/json")],
        openapi::DOCUMENT.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_contract_statuses() {
        let p: Problem = Error::Refused(Refusal::SoldOut).into();
        assert_eq!((p.status, p.code), (StatusCode::CONFLICT, "sold_out"));
        let p: Problem = Error::Refused(Refusal::IdempotencyKeyReused).into();
        assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
        let p: Problem = Error::Refused(Refusal::NotFound).into();
        assert_eq!(p.status, StatusCode::NOT_FOUND);
        let p: Problem = Error::unavailable("redis down", error::Outcome::NotApplied).into();
        assert_eq!(
            (p.status, p.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        assert!(
            !p.detail.contains("redis down"),
            "internal details stay in the logs"
        );
        assert_eq!(p.extra.as_ref().unwrap()["outcome"], "not_applied");
        assert!(p.detail.contains("nothing was changed"));
        let p: Problem = Error::unavailable("redis: timed out", error::Outcome::Unknown).into();
        assert_eq!(p.extra.as_ref().unwrap()["outcome"], "unknown");
        assert!(
            !p.detail.contains("nothing was changed"),
            "a timeout cannot know: {}",
            p.detail
        );
        let p: Problem = Error::Internal("boom".into()).into();
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!p.detail.contains("boom"));
    }

    #[test]
    fn refund_required_carries_the_compensation() {
        let p: Problem = Error::RefundRequired {
            refusal: Refusal::ReservationExpired,
            compensation_id: "c_1".into(),
        }
        .into();
        assert_eq!(p.code, "reservation_expired");
        let extra = p.extra.unwrap();
        assert_eq!(extra["refund_required"], Value::Bool(true));
        assert_eq!(extra["compensation_id"], "c_1");
    }

    #[test]
    fn quantity_parsing_follows_the_contract() {
        let parse = |raw: &str| json_body::<ReserveBody>(&Bytes::from(raw.to_owned()))?.quantity();
        assert_eq!(parse("").unwrap(), 1);
        assert_eq!(parse("{}").unwrap(), 1);
        assert_eq!(parse(r#"{"quantity": 3}"#).unwrap(), 3);
        assert_eq!(parse(r#"{"quantity": 2, "other": [null]}"#).unwrap(), 2);
        assert_eq!(parse(" \n ").unwrap(), 1);
        for bad in [
            r#"{"quantity": 0}"#,
            r#"{"quantity": -1}"#,
            r#"{"quantity": 1.5}"#,
            r#"{"quantity": "1"}"#,
            r#"{"quantity": null}"#,
            r#"{"quantity": 4294967296}"#,
            r#"{"quantity": 1, "quantity": 2}"#,
            "[1]",
            "{",
            "null",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn timestamps_outside_1970_to_9999_are_refused() {
        let parse = |raw: &str| {
            let body = Bytes::from(format!(r#"{{"stock": 1, "starts_at": "{raw}"}}"#));
            Ok::<_, Problem>(json_body::<DefineSku>(&body)?.definition()?.starts_at_ms)
        };
        for bad in [
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:30:00-01:00",
            "1969-12-31T23:59:59.999Z",
            "1970-01-01T00:30:00+01:00",
            "not a time",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(parse("1970-01-01T00:00:00Z").unwrap(), Some(0));
        assert_eq!(
            parse("9999-12-31T23:59:59.999Z").unwrap(),
            Some(limits::TIMESTAMP_MAX_MS)
        );
        assert_eq!(
            rfc3339_ms(limits::TIMESTAMP_MAX_MS),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn visible_ascii_bounds() {
        assert!(visible_ascii("abc-123_!~", 128));
        assert!(!visible_ascii("", 128));
        assert!(!visible_ascii("a b", 128));
        assert!(!visible_ascii("é", 128));
        assert!(!visible_ascii(&"a".repeat(129), 128));
    }

    #[test]
    fn timestamps_render_in_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(1_795_255_200_000), "2026-11-21T10:00:00.000Z");
    }
}
