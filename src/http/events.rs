//! `GET /v1/events`: the event feed (src/events.rs), oldest first, from MySQL.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{page_limit, sku_id, ApiResult, Problem, Service, SharedState};
use crate::db::events::Filter;
use crate::events::{self, Event, EventType};

/// One event: a fact the order service or finance acts on.
#[derive(Serialize, ToSchema)]
pub(super) struct EventView {
    /// `evt_…`: the same fact always has the same id (dedupe by it).
    id: String,
    /// `reservation.confirmed`, `reservation.cancelled`, `reservation.expired`,
    /// `compensation.created`, `compensation.resolved`, `sku.sold_out`, `sku.available`.
    #[serde(rename = "type")]
    kind: String,
    sku: String,
    /// Per SKU, consecutive from 1 over every type, in the order the facts happened.
    #[schema(minimum = 1)]
    sequence: u64,
    /// When the fact happened (Redis's clock), RFC 3339, UTC, milliseconds.
    #[schema(format = DateTime)]
    occurred_at: String,
    /// The reservation view (`reservation.*`), the compensation (`compensation.*`) or
    /// the SKU view at the moment of the fact (`sku.*`).
    #[schema(value_type = Object)]
    data: serde_json::Value,
}

impl From<Event> for EventView {
    fn from(e: Event) -> EventView {
        EventView {
            id: e.id,
            kind: e.kind.as_str().to_owned(),
            sku: e.sku,
            sequence: e.sequence,
            occurred_at: events::rfc3339_ms(e.occurred_at_ms),
            data: e.data,
        }
    }
}

/// `GET /v1/events`.
#[derive(Serialize, ToSchema)]
pub(super) struct EventList {
    items: Vec<EventView>,
    /// Where to go on from (`after=`): after this page's last event, or where this
    /// request started when it found none. Poll with it to get what happens next.
    next: String,
}

/// The query of `GET /v1/events`, checked by hand.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventQuery {
    /// The `next` of an earlier page (opaque); absent: from the oldest event kept.
    #[param(max_length = 64)]
    after: Option<String>,
    /// Comma-separated event types; default all.
    #[param(example = "reservation.expired,compensation.created")]
    types: Option<String>,
    /// Only this SKU's events.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    sku: Option<String>,
    /// At most this many, default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

pub(super) fn parse_cursor(raw: &str) -> Result<u64, Problem> {
    events::decode_cursor(raw)
        .ok_or_else(|| Problem::invalid("`after` is the `next` of an earlier page"))
}

pub(super) fn parse_types(raw: &str) -> Result<Vec<EventType>, Problem> {
    EventType::parse_list(raw).ok_or_else(|| {
        let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        Problem::invalid(format!(
            "`types` is a comma-separated list of {}",
            names.join(", ")
        ))
    })
}

/// Events, oldest first.
#[utoipa::path(
    get, path = "/v1/events", tag = "events",
    params(EventQuery),
    security(("service_token" = [])),
    responses(
        (status = 200, description = "The page", body = EventList),
    )
)]
pub(super) async fn list_events(
    State(state): State<SharedState>,
    _: Service,
    Query(query): Query<EventQuery>,
) -> ApiResult<Json<EventList>> {
    let after = query.after.as_deref().map(parse_cursor).transpose()?;
    let filter = Filter {
        after: after.unwrap_or(0),
        types: query.types.as_deref().map(parse_types).transpose()?,
        sku: query
            .sku
            .as_deref()
            .map(sku_id)
            .transpose()?
            .map(|s| s.as_str().to_owned()),
    };
    let limit = page_limit(query.limit.as_deref())?;
    let (page, next) = state.gateway.events(&filter, limit).await?;
    let next = events::encode_cursor(next);
    Ok(Json(EventList {
        items: page.into_iter().map(EventView::from).collect(),
        next,
    }))
}
