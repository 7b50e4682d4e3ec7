//! `/v1/admin/webhooks…`: webhook endpoints (src/webhooks.rs), their deliveries and
//! replays. The secret is taken, never shown again; a URL is shown without credentials.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::events::{parse_cursor, parse_types};
use super::{json_body, page_limit, ApiResult, Problem, Service, SharedState};
use crate::db::webhooks::{Delivery, Endpoint};
use crate::events::{self, EventType};
use crate::webhooks;

/// A webhook endpoint in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // parameters: the handlers take `Path<String>`
pub(super) struct WebhookPath {
    /// The endpoint's name.
    #[param(
        pattern = "^[A-Za-z0-9_-]{1,64}$",
        min_length = 1,
        max_length = 64,
        example = "orders"
    )]
    name: String,
}

fn webhook_name(raw: &str) -> Result<&str, Problem> {
    let ok = (1..=64).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(raw)
        .ok_or_else(|| Problem::invalid("webhook names match [A-Za-z0-9_-]{1,64}"))
}

fn no_such_webhook() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not_found", "no such webhook")
}

/// `PUT /v1/admin/webhooks/{name}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookBody {
    /// Where events are POSTed: an http or https URL (loopback allowed).
    #[schema(max_length = 2048, example = "https://orders.example.com/flashgate")]
    url: String,
    /// `whsec_` + base64 of 24..=64 random bytes; the HMAC key of the signatures.
    /// Never shown again.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    secret: String,
    /// Event types to send; absent or null: all.
    #[schema(nullable = false)]
    types: Option<Vec<String>>,
    /// Default true; a disabled endpoint gets nothing (its events wait for it).
    #[schema(nullable = false)]
    enabled: Option<bool>,
}

/// An endpoint (never its secret).
#[derive(Serialize, ToSchema)]
pub(super) struct WebhookView {
    name: String,
    /// Without credentials.
    url: String,
    /// The event types it gets.
    types: Vec<String>,
    enabled: bool,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

impl From<Endpoint> for WebhookView {
    fn from(e: Endpoint) -> WebhookView {
        let types = match &e.types {
            Some(list) => list.clone(),
            None => EventType::ALL.to_vec(),
        };
        WebhookView {
            url: webhooks::redacted_url(&e.url),
            name: e.name,
            types: types.iter().map(|t| t.as_str().to_owned()).collect(),
            enabled: e.enabled,
            created_at: events::rfc3339_ms(e.created_at_ms),
            updated_at: events::rfc3339_ms(e.updated_at_ms),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct WebhookList {
    items: Vec<WebhookView>,
}

/// Create or replace a webhook endpoint. A new one gets the events recorded from
/// now on (`replay` sends older ones). A replace answers once no request under the
/// former URL or secret is in flight (at most the 10 s delivery timeout; 30 s if a
/// worker died holding some).
#[utoipa::path(
    put, path = "/v1/admin/webhooks/{name}", tag = "events",
    params(WebhookPath),
    request_body(content = WebhookBody, content_type = "application/json"),
    security(("service_token" = [])),
    responses(
        (status = 201, description = "Created", body = WebhookView),
        (status = 200, description = "Replaced", body = WebhookView),
    )
)]
pub(super) async fn put_webhook(
    State(state): State<SharedState>,
    _: Service,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = webhook_name(&name)?;
    let body = json_body::<WebhookBody>(&body)?;
    if webhooks::parse_url(&body.url).is_none() {
        return Err(Problem::invalid(
            "`url` is an http or https URL with a host, at most 2048 bytes",
        ));
    }
    if webhooks::parse_secret(&body.secret).is_none() {
        return Err(Problem::invalid(
            "`secret` is whsec_ followed by the base64 of 24 to 64 random bytes",
        ));
    }
    let types = match &body.types {
        None => None,
        Some(list) => Some(parse_types(&list.join(","))?),
    };
    let endpoint = Endpoint {
        name: name.to_owned(),
        url: body.url,
        secret: body.secret,
        types,
        enabled: body.enabled.unwrap_or(true),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    let (created, endpoint) = state.gateway.put_webhook(&endpoint).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(WebhookView::from(endpoint))).into_response())
}

/// Every webhook endpoint, by name.
#[utoipa::path(
    get, path = "/v1/admin/webhooks", tag = "events",
    security(("service_token" = [])),
    responses((status = 200, description = "The endpoints", body = WebhookList))
)]
pub(super) async fn list_webhooks(
    State(state): State<SharedState>,
    _: Service,
) -> ApiResult<Json<WebhookList>> {
    let items = state.gateway.webhooks().await?;
    Ok(Json(WebhookList {
        items: items.into_iter().map(WebhookView::from).collect(),
    }))
}

/// One webhook endpoint (never its secret).
#[utoipa::path(
    get, path = "/v1/admin/webhooks/{name}", tag = "events",
    params(WebhookPath),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The endpoint", body = WebhookView),
        (status = 404, description = "`not_found`: no such webhook", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn get_webhook(
    State(state): State<SharedState>,
    _: Service,
    Path(name): Path<String>,
) -> ApiResult<Json<WebhookView>> {
    let name = webhook_name(&name)?;
    match state.gateway.webhook(name).await? {
        Some(endpoint) => Ok(Json(endpoint.into())),
        None => Err(no_such_webhook()),
    }
}

/// Delete a webhook endpoint and its deliveries (1000 per statement).
#[utoipa::path(
    delete, path = "/v1/admin/webhooks/{name}", tag = "events",
    params(WebhookPath),
    security(("service_token" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`: no such webhook", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn delete_webhook(
    State(state): State<SharedState>,
    _: Service,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name = webhook_name(&name)?;
    match state.gateway.delete_webhook(name).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(no_such_webhook()),
    }
}

/// The query of the deliveries list, checked by hand.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveryQuery {
    /// `failed` (given up after the retry window), `pending` (not delivered yet) or
    /// `delivered`; default `failed`.
    status: Option<String>,
    /// The `next` of an earlier page.
    #[param(max_length = 64)]
    after: Option<String>,
    /// At most this many, default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// One event's delivery to one endpoint.
#[derive(Serialize, ToSchema)]
pub(super) struct DeliveryView {
    event_id: String,
    /// pending, delivered or failed.
    status: String,
    attempts: u32,
    #[schema(format = DateTime)]
    queued_at: String,
    /// When it is tried next (pending only).
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    /// The last answer's HTTP status; null when there was none (timeout, connection).
    last_status: Option<i32>,
    last_error: Option<String>,
    #[schema(format = DateTime)]
    delivered_at: Option<String>,
    /// `POST …/replay {"after": replay_from}` sends this event and every later one.
    replay_from: String,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> DeliveryView {
        DeliveryView {
            next_attempt_at: (d.status == "pending")
                .then(|| events::rfc3339_ms(d.next_attempt_at_ms)),
            event_id: d.event_id,
            status: d.status,
            attempts: d.attempts,
            queued_at: events::rfc3339_ms(d.first_queued_at_ms),
            last_status: d.last_status,
            last_error: d.last_error,
            delivered_at: d.delivered_at_ms.map(events::rfc3339_ms),
            replay_from: events::encode_cursor(d.position.saturating_sub(1)),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct DeliveryList {
    items: Vec<DeliveryView>,
    /// The cursor of the next page; null when this page is the last.
    next: Option<String>,
}

/// An endpoint's deliveries by status, oldest event first.
#[utoipa::path(
    get, path = "/v1/admin/webhooks/{name}/deliveries", tag = "events",
    params(WebhookPath, DeliveryQuery),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The page", body = DeliveryList),
        (status = 404, description = "`not_found`: no such webhook", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn list_deliveries(
    State(state): State<SharedState>,
    _: Service,
    Path(name): Path<String>,
    Query(query): Query<DeliveryQuery>,
) -> ApiResult<Json<DeliveryList>> {
    let name = webhook_name(&name)?;
    let status = match query.status.as_deref() {
        None | Some("failed") => "failed",
        Some("pending") => "pending",
        Some("delivered") => "delivered",
        Some(_) => return Err(Problem::invalid("`status` is failed, pending or delivered")),
    };
    let after = query.after.as_deref().map(parse_cursor).transpose()?;
    let limit = page_limit(query.limit.as_deref())?;
    if state.gateway.webhook(name).await?.is_none() {
        return Err(no_such_webhook());
    }
    let page = state
        .gateway
        .webhook_deliveries(name, status, after.unwrap_or(0), limit)
        .await?;
    let next = (page.len() == limit as usize)
        .then(|| page.last().map(|d| events::encode_cursor(d.position)))
        .flatten();
    Ok(Json(DeliveryList {
        items: page.into_iter().map(DeliveryView::from).collect(),
        next,
    }))
}

/// `POST /v1/admin/webhooks/{name}/replay`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayBody {
    /// A feed cursor (`GET /v1/events`' `next`, or a delivery's `replay_from`): every
    /// kept event after it of the endpoint's types is sent again.
    after: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct Replayed {
    /// Deliveries queued again.
    queued: u64,
}

/// Send the endpoint's events after a cursor again (delivered and failed ones too),
/// with a fresh retry window.
#[utoipa::path(
    post, path = "/v1/admin/webhooks/{name}/replay", tag = "events",
    params(WebhookPath),
    request_body(content = ReplayBody, content_type = "application/json"),
    security(("service_token" = [])),
    responses(
        (status = 202, description = "Queued", body = Replayed),
        (status = 404, description = "`not_found`: no such webhook", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn replay(
    State(state): State<SharedState>,
    _: Service,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = webhook_name(&name)?;
    let body = json_body::<ReplayBody>(&body)?;
    let after = parse_cursor(&body.after)?;
    let Some(endpoint) = state.gateway.webhook(name).await? else {
        return Err(no_such_webhook());
    };
    let queued = state.gateway.replay_webhook(&endpoint, after).await?;
    Ok((StatusCode::ACCEPTED, Json(Replayed { queued })).into_response())
}
