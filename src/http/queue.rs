//! The waiting room (src/queue.rs): `POST /v1/skus/{sku}/queue` joins,
//! `GET /v1/skus/{sku}/queue` reads the caller's ticket.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{rfc3339_ms, sku_id, ApiResult, SharedState, User};
use crate::queue::{Ticket, TicketState};

/// A user's place in a SKU's waiting room.
#[derive(Serialize, ToSchema)]
pub(super) struct TicketView {
    sku: String,
    user_id: String,
    /// 1-based; null before the sale starts (the pre-queue is ordered at the start).
    #[schema(minimum = 1)]
    position: Option<u64>,
    state: TicketState,
    /// Users in line ahead, not admitted yet.
    ahead: u64,
    /// Estimated seconds to admission at the rate admissions went so far; null when
    /// nothing tells yet.
    eta_seconds: Option<u64>,
    /// While admitted: send it as header `Admission-Token` with the reserve. One
    /// admission makes at most one hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    admission_token: Option<String>,
    /// While admitted: the admission lapses unused at this instant.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    admitted_until: Option<String>,
    /// `closed` because this admission went unused past `admitted_until` (its unit
    /// went to the next user in line).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lapsed: bool,
    /// Poll again after this long (0: nothing more will change): sized so that all the
    /// waiting users together make a bounded number of polls per second.
    retry_after_ms: u32,
}

impl From<Ticket> for TicketView {
    fn from(t: Ticket) -> TicketView {
        TicketView {
            sku: t.sku,
            user_id: t.user_id,
            position: t.position,
            state: t.state,
            ahead: t.ahead,
            eta_seconds: t.eta_seconds,
            admission_token: t.admission_token,
            admitted_until: t.admitted_until_ms.map(rfc3339_ms),
            lapsed: t.lapsed,
            retry_after_ms: t.retry_after_ms,
        }
    }
}

/// Join the SKU's waiting room, or read the ticket the caller already has (one per
/// user and SKU; its position never changes).
#[utoipa::path(
    post, path = "/v1/skus/{sku}/queue", tag = "sale",
    params(("sku" = String, Path, description = "SKU id")),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The caller's ticket", body = TicketView),
        (status = 404, description = "`not_found`: no such SKU", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`no_waiting_room`", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn join(
    State(state): State<SharedState>,
    User(user_id): User,
    Path(sku): Path<String>,
) -> ApiResult<Json<TicketView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(state.gateway.queue_join(&sku, &user_id).await?.into()))
}

/// The caller's ticket in the SKU's waiting room.
#[utoipa::path(
    get, path = "/v1/skus/{sku}/queue", tag = "sale",
    params(("sku" = String, Path, description = "SKU id")),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The caller's ticket", body = TicketView),
        (status = 404, description = "`not_found`: no such SKU, or the caller has no ticket", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`no_waiting_room`", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn ticket(
    State(state): State<SharedState>,
    User(user_id): User,
    Path(sku): Path<String>,
) -> ApiResult<Json<TicketView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(
        state.gateway.queue_ticket(&sku, &user_id).await?.into(),
    ))
}
