//! The waiting room (src/queue.rs): `POST /v1/skus/{sku}/queue` joins,
//! `GET /v1/skus/{sku}/queue` reads the caller's ticket, `GET .../queue/stream` follows
//! it as Server-Sent Events.

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::watch;
use utoipa::ToSchema;

use super::{rfc3339_ms, sku_id, AdmittedUser, ApiResult, SharedState};
use crate::error::Error;
use crate::gateway::Gateway;
use crate::ids::SkuId;
use crate::queue::{self, Snapshot, Ticket, TicketState};
use crate::reservation::Refusal;

/// A comment line this often keeps proxies from closing a quiet stream.
const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(15);

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
    params(super::openapi::SkuPath),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The caller's ticket", body = TicketView),
        (status = 404, description = "`not_found`: no such SKU", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`no_waiting_room`", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn join(
    State(state): State<SharedState>,
    AdmittedUser(user_id): AdmittedUser,
    Path(sku): Path<String>,
) -> ApiResult<Json<TicketView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(state.gateway.queue_join(&sku, &user_id).await?.into()))
}

/// The caller's ticket in the SKU's waiting room.
#[utoipa::path(
    get, path = "/v1/skus/{sku}/queue", tag = "sale",
    params(super::openapi::SkuPath),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The caller's ticket", body = TicketView),
        (status = 404, description = "`not_found`: no such SKU, or the caller has no ticket", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`no_waiting_room`", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn ticket(
    State(state): State<SharedState>,
    AdmittedUser(user_id): AdmittedUser,
    Path(sku): Path<String>,
) -> ApiResult<Json<TicketView>> {
    let sku = sku_id(&sku)?;
    Ok(Json(
        state.gateway.queue_ticket(&sku, &user_id).await?.into(),
    ))
}

/// Follow the caller's ticket: a `ticket` event with the ticket now, then one whenever
/// it changes (admitted, the line moving, sold out, closed, lapsed); the stream ends
/// after `sold_out` or `closed`. A comment line every 15 s. The streams of one SKU on
/// a gateway share one watcher (one Redis read per 250 ms, however many are open); a
/// stream reads its own ticket only when it is admitted, at the start and at the end.
#[utoipa::path(
    get, path = "/v1/skus/{sku}/queue/stream", tag = "sale",
    params(super::openapi::SkuPath),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "`text/event-stream` of `ticket` events, each a ticket", body = TicketView, content_type = "text/event-stream"),
        (status = 404, description = "`not_found`: no such SKU, or the caller has no ticket", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`no_waiting_room`", body = super::openapi::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub(super) async fn stream(
    State(state): State<SharedState>,
    AdmittedUser(user_id): AdmittedUser,
    Path(sku): Path<String>,
) -> ApiResult<Response> {
    let sku = sku_id(&sku)?;
    let first = state.gateway.queue_ticket(&sku, &user_id).await?;
    let receiver = state.gateway.queue_watchers.subscribe(&state.gateway, &sku);
    metrics::gauge!("flashgate_queue_streams").increment(1.0);
    let follow = Follow {
        gateway: state.gateway.clone(),
        sku,
        last: first,
        receiver,
        sent_first: false,
        done: false,
    };
    let events = futures::stream::unfold(follow, |mut follow| async move {
        let ticket = follow.next().await?;
        let event = Event::default()
            .event("ticket")
            .json_data(TicketView::from(ticket))
            .expect("a ticket serializes");
        Some((Ok::<_, Infallible>(event), follow))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(STREAM_KEEP_ALIVE))
        .into_response())
}

/// One stream's ticket, moved on by its SKU's watcher.
struct Follow {
    gateway: Gateway,
    sku: SkuId,
    last: Ticket,
    receiver: watch::Receiver<Snapshot>,
    sent_first: bool,
    done: bool,
}

impl Drop for Follow {
    fn drop(&mut self) {
        metrics::gauge!("flashgate_queue_streams").decrement(1.0);
    }
}

impl Follow {
    /// The next ticket to send; None ends the stream.
    async fn next(&mut self) -> Option<Ticket> {
        if self.done {
            return None;
        }
        if !self.sent_first {
            self.sent_first = true;
            self.done = self.last.state.is_terminal();
            return Some(self.last.clone());
        }
        loop {
            self.receiver.changed().await.ok()?;
            let Some(look) = self.receiver.borrow_and_update().clone() else {
                continue;
            };
            let next = if queue::needs_read(&self.last, &look) {
                match self
                    .gateway
                    .queue_ticket(&self.sku, &self.last.user_id)
                    .await
                {
                    Ok(ticket) => ticket,
                    // The ticket is gone: the sale retired (its queue went with it), or
                    // Redis lost it. Only the first is an answer; without one the stream
                    // ends, and a reconnect tells (404: join again).
                    Err(Error::Refused(Refusal::NotFound)) if look.phase == "closed" => Ticket {
                        state: TicketState::Closed,
                        ahead: 0,
                        eta_seconds: None,
                        admission_token: None,
                        admitted_until_ms: None,
                        retry_after_ms: 0,
                        ..self.last.clone()
                    },
                    Err(Error::Refused(Refusal::NotFound)) => return None,
                    // Redis did not answer: the next look tries again.
                    Err(_) => continue,
                }
            } else if self.last.state == TicketState::Waiting {
                queue::advance(
                    &self.gateway.settings.id_keys,
                    &self.sku,
                    &self.last,
                    &look,
                    self.gateway.settings.queue_polls_per_second,
                )
            } else {
                continue;
            };
            // Once the sale is sold out or closed every stream ends, an admitted one
            // with its last ticket (a used admission stays `admitted`).
            let sale_over = look.phase == "sold_out" || look.phase == "closed";
            if sale_over || changed(&self.last, &next) {
                self.done = sale_over || next.state.is_terminal();
                self.last = next.clone();
                return Some(next);
            }
        }
    }
}

/// Whether a ticket changed in what its holder acts on (the estimate and the poll
/// interval follow the line and the clock; they ride along, they do not make events).
fn changed(last: &Ticket, next: &Ticket) -> bool {
    (
        last.state,
        last.position,
        last.ahead,
        &last.admission_token,
        last.lapsed,
    ) != (
        next.state,
        next.position,
        next.ahead,
        &next.admission_token,
        next.lapsed,
    )
}
