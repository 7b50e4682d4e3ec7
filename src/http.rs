//! The HTTP edge: routes, authentication extractors, request parsing and the
//! problem+json mapping. Handlers parse into domain types, make one gateway call and
//! map the result; HTTP types never leave this module.

use axum::body::Bytes;
use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crate::auth::{Authenticator, Caller};
use crate::error::{self, Error};
use crate::gateway::Gateway;
use crate::ids::SkuId;
use crate::limits;
use crate::reservation::{Compensation, Refusal, Reservation, Sku, SkuDefinition};
use crate::telemetry;

pub struct AppState {
    pub gateway: Gateway,
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
const ROUTES: [&str; 13] = [
    "/v1/admin/skus/{sku}",
    "/v1/skus/{sku}",
    "/v1/skus/{sku}/reservations",
    "/v1/reservations/{id}",
    "/v1/reservations/{id}/cancel",
    "/v1/reservations/{id}/payment-pending",
    "/v1/reservations/{id}/confirm",
    "/v1/compensations",
    "/v1/compensations/{id}",
    "/v1/compensations/{id}/resolve",
    "/healthz",
    "/readyz",
    "/metrics",
];

pub fn router(state: SharedState) -> Router {
    let [admin_sku, sku, reservations, reservation, cancel_route, pending, confirm_route, compensations, compensation, resolve, health, ready, metrics] =
        ROUTES;
    Router::new()
        .route(admin_sku, put(define_sku))
        .route(sku, get(get_sku))
        .route(reservations, post(reserve))
        .route(reservation, get(get_reservation))
        .route(cancel_route, post(cancel))
        .route(pending, post(payment_pending))
        .route(confirm_route, post(confirm))
        .route(compensations, get(list_compensations))
        .route(compensation, get(get_compensation))
        .route(resolve, post(resolve_compensation))
        .route(health, get(healthz))
        .route(ready, get(readyz))
        .route(metrics, get(render_metrics))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(
            state.body_timeout,
            request_body,
        ))
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(limits::REQUEST_BODY_MAX_BYTES))
        .with_state(state)
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

    fn unauthorized() -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
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
        | Refusal::StockBelowCommitted => StatusCode::CONFLICT,
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
    }
}

impl From<Error> for Problem {
    fn from(err: Error) -> Problem {
        match err {
            Error::InvalidRequest(detail) => Problem::invalid(detail),
            Error::Unauthorized => Problem::unauthorized(),
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
        response.extensions_mut().insert(Outcome(self.code));
        response
    }
}

/// Counts and times every request, and turns any error answer not produced by us
/// (a body over the limit, a malformed query) into problem+json.
async fn observe(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let response =
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
    response
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
async fn request_body(State(deadline): State<Duration>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits::REQUEST_BODY_MAX_BYTES as u64) {
        return closing(too_large());
    }
    let json = is_json(&request);
    if declared.is_some_and(|n| n > 0) && !json {
        return closing(unsupported_media_type());
    }
    let (parts, body) = request.into_parts();
    let read = http_body_util::Limited::new(body, limits::REQUEST_BODY_MAX_BYTES);
    let bytes = match tokio::time::timeout(deadline, http_body_util::BodyExt::collect(read)).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return closing(too_large()),
        Ok(Err(_)) => return closing(Problem::invalid("the request body could not be read")),
        Err(_) => {
            return closing(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    deadline.as_millis()
                ),
            ))
        }
    };
    if !bytes.is_empty() && !json {
        return unsupported_media_type().into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
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

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A user with a valid JWT.
struct User(String);
/// The `Idempotency-Key` header of a reserve (read alone: the reserve path does not
/// copy the whole header map).
struct IdempotencyKey(String);

impl<S: Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let mut keys = parts.headers.get_all("idempotency-key").iter();
        if let (Some(_), Some(_)) = (keys.next(), keys.next()) {
            // Which of two keys would be the right one is a guess: refuse.
            return Err(Problem::invalid("send exactly one Idempotency-Key header"));
        }
        parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
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

impl FromRequestParts<SharedState> for User {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Problem> {
        bearer(parts)
            .and_then(|token| state.auth.user(token))
            .map(User)
            .ok_or_else(Problem::unauthorized)
    }
}

impl FromRequestParts<SharedState> for Service {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Problem> {
        match bearer(parts) {
            Some(token) if state.auth.is_service(token) => Ok(Service),
            _ => Err(Problem::unauthorized()),
        }
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Problem> {
        bearer(parts)
            .and_then(|token| state.auth.caller(token))
            .ok_or_else(Problem::unauthorized)
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

/// A JSON object body; an empty body is an empty object.
fn json_object(body: &Bytes) -> Result<Map<String, Value>, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Problem::invalid("the body must be a JSON object")),
        Err(e) => Err(Problem::invalid(format!("malformed JSON: {e}"))),
    }
}

/// An integer field within `range`; absent takes `default` (None: required).
/// Null, strings, fractions and negatives are refused.
fn integer_field(
    body: &Map<String, Value>,
    name: &str,
    default: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, Problem> {
    let value = match body.get(name) {
        None => default.ok_or_else(|| Problem::invalid(format!("`{name}` is required")))?,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| Problem::invalid(format!("`{name}` must be a non-negative integer")))?,
    };
    if !range.contains(&value) {
        return Err(Problem::invalid(format!(
            "`{name}` must be within {}..={}",
            range.start(),
            range.end()
        )));
    }
    Ok(value)
}

/// An optional RFC 3339 timestamp between 1970-01-01 and 9999-12-31 (UTC); null is
/// the same as absent.
fn timestamp_field(body: &Map<String, Value>, name: &str) -> Result<Option<i64>, Problem> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(raw)) => DateTime::parse_from_rfc3339(raw)
            .ok()
            .map(|t| t.timestamp_millis())
            .filter(|ms| (limits::TIMESTAMP_MIN_MS..=limits::TIMESTAMP_MAX_MS).contains(ms))
            .map(Some)
            .ok_or_else(|| {
                Problem::invalid(format!(
                    "`{name}` must be an RFC 3339 timestamp between 1970-01-01T00:00:00Z \
                     and 9999-12-31T23:59:59.999Z"
                ))
            }),
        Some(_) => Err(Problem::invalid(format!(
            "`{name}` must be an RFC 3339 string"
        ))),
    }
}

fn payment_ref_field(body: &Map<String, Value>) -> Result<String, Problem> {
    match body.get("payment_ref") {
        Some(Value::String(s)) if visible_ascii(s, limits::PAYMENT_REF_MAX_LEN) => Ok(s.clone()),
        _ => Err(Problem::invalid(format!(
            "`payment_ref` is required: 1..={} visible ASCII characters",
            limits::PAYMENT_REF_MAX_LEN
        ))),
    }
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

#[derive(Serialize)]
struct ReservationView {
    reservation_id: String,
    sku: String,
    user_id: String,
    quantity: u64,
    status: &'static str,
    expires_at: String,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    payment_ref: Option<String>,
}

impl From<Reservation> for ReservationView {
    fn from(r: Reservation) -> ReservationView {
        ReservationView {
            reservation_id: r.reservation_id,
            sku: r.sku,
            user_id: r.user_id,
            quantity: r.quantity,
            status: r.status.as_str(),
            expires_at: rfc3339_ms(r.expires_at_ms),
            created_at: rfc3339_ms(r.created_at_ms),
            payment_ref: r.payment_ref,
        }
    }
}

#[derive(Serialize)]
struct SkuView {
    sku: String,
    stock_total: u64,
    available: u64,
    held: u64,
    sold: u64,
    per_user_limit: u64,
    hold_seconds: u64,
    starts_at: Option<String>,
    ends_at: Option<String>,
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
        }
    }
}

#[derive(Serialize)]
struct CompensationView {
    id: String,
    reservation_id: String,
    sku: String,
    user_id: String,
    quantity: u64,
    payment_ref: String,
    reason: &'static str,
    status: &'static str,
    created_at: String,
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
            reason: c.reason.as_str(),
            status: if c.resolved { "resolved" } else { "open" },
            created_at: rfc3339_ms(c.created_at_ms),
        }
    }
}

type ApiResult<T> = Result<T, Problem>;

// ---------------------------------------------------------------- handlers

async fn define_sku(
    State(state): State<SharedState>,
    _: Service,
    Path(sku): Path<String>,
    body: Bytes,
) -> ApiResult<Json<SkuView>> {
    let sku = sku_id(&sku)?;
    let body = json_object(&body)?;
    let definition = SkuDefinition {
        stock_total: integer_field(&body, "stock", None, 0..=limits::STOCK_MAX)?,
        per_user_limit: integer_field(&body, "per_user_limit", Some(1), 1..=u32::MAX as u64)?,
        hold_seconds: integer_field(
            &body,
            "hold_seconds",
            Some(600),
            1..=limits::HOLD_SECONDS_MAX,
        )?,
        starts_at_ms: timestamp_field(&body, "starts_at")?,
        ends_at_ms: timestamp_field(&body, "ends_at")?,
    };
    if let (Some(starts), Some(ends)) = (definition.starts_at_ms, definition.ends_at_ms) {
        if ends <= starts {
            return Err(Problem::invalid("`ends_at` must be after `starts_at`"));
        }
    }
    let sku = state.gateway.define_sku(&sku, &definition).await?;
    Ok(Json(sku.into()))
}

async fn get_sku(
    State(state): State<SharedState>,
    Path(sku): Path<String>,
) -> ApiResult<Json<SkuView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(state.gateway.sku(&sku).await?.into()))
}

const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

async fn reserve(
    State(state): State<SharedState>,
    User(user_id): User,
    Path(sku): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: Bytes,
) -> ApiResult<Response> {
    let sku = sku_id(&sku)?;
    let body = json_object(&body)?;
    let quantity = integer_field(&body, "quantity", Some(1), 1..=limits::QUANTITY_MAX)?;
    let (reservation, replayed) = state
        .gateway
        .reserve(&sku, &user_id, quantity, &key)
        .await?;
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

async fn get_reservation(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    Ok(Json(state.gateway.reservation(id, &caller).await?.into()))
}

async fn cancel(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    Ok(Json(state.gateway.cancel(id, &caller).await?.into()))
}

async fn payment_pending(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    let payment_ref = payment_ref_field(&json_object(&body)?)?;
    Ok(Json(
        state
            .gateway
            .payment_pending(id, &payment_ref)
            .await?
            .into(),
    ))
}

async fn confirm(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ReservationView>> {
    let id = reservation_id(&id)?;
    let payment_ref = payment_ref_field(&json_object(&body)?)?;
    Ok(Json(state.gateway.confirm(id, &payment_ref).await?.into()))
}

async fn list_compensations(
    State(state): State<SharedState>,
    _: Service,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let resolved = match query.get("status").map(String::as_str) {
        None | Some("all") => None,
        Some("open") => Some(false),
        Some("resolved") => Some(true),
        Some(_) => return Err(Problem::invalid("`status` is open, resolved or all")),
    };
    let sku = query.get("sku").map(|s| sku_id(s)).transpose()?;
    let limit = match query.get("limit") {
        None => limits::COMPENSATIONS_PAGE_DEFAULT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=limits::COMPENSATIONS_PAGE_MAX).contains(n))
            .ok_or_else(|| {
                Problem::invalid(format!(
                    "`limit` is an integer within 1..={}",
                    limits::COMPENSATIONS_PAGE_MAX
                ))
            })?,
    };
    let items: Vec<CompensationView> = state
        .gateway
        .compensations(resolved, sku.as_ref(), limit)
        .await?
        .into_iter()
        .map(CompensationView::from)
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn resolve_compensation(
    State(state): State<SharedState>,
    _: Service,
    Path(id): Path<String>,
) -> ApiResult<Json<CompensationView>> {
    let id = compensation_id(&id)?;
    Ok(Json(state.gateway.resolve_compensation(id).await?.into()))
}

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

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Redis answers and the scripts are loaded. MySQL and the outbox backlog
/// are reported but do not make the gateway unready: sales go on without MySQL. The
/// answer is the last background check (`readiness`): constant time.
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

async fn render_metrics(State(state): State<SharedState>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics_page.get(&state.prometheus),
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
        let parse = |raw: &str| {
            let body = json_object(&Bytes::from(raw.to_owned()))?;
            integer_field(&body, "quantity", Some(1), 1..=limits::QUANTITY_MAX)
        };
        assert_eq!(parse("").unwrap(), 1);
        assert_eq!(parse("{}").unwrap(), 1);
        assert_eq!(parse(r#"{"quantity": 3}"#).unwrap(), 3);
        for bad in [
            r#"{"quantity": 0}"#,
            r#"{"quantity": -1}"#,
            r#"{"quantity": 1.5}"#,
            r#"{"quantity": "1"}"#,
            r#"{"quantity": null}"#,
            r#"{"quantity": 4294967296}"#,
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
            let body = json_object(&Bytes::from(format!(r#"{{"starts_at": "{raw}"}}"#)))?;
            timestamp_field(&body, "starts_at")
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
