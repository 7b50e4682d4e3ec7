//! The OpenAPI 3.1 document of the HTTP contract, generated from the handlers'
//! `#[utoipa::path]` annotations and the body types, served at `/openapi.json`. It
//! describes only what the code answers: schemathesis checks the live gateway against it.

use std::sync::LazyLock;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Required, Response, Type};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

/// Security scheme of the user endpoints: `Authorization: Bearer <JWT>`.
pub(super) const USER: &str = "user_jwt";
/// Security scheme of the service endpoints: `Authorization: Bearer <service token>`.
pub(super) const SERVICE: &str = "service_token";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flashgate",
        version = "1.1",
        description = "Flash-sale reservation gateway: holds, payments and compensations. \
            Every non-2xx answer is application/problem+json with a stable `code`."
    ),
    paths(
        super::define_sku,
        super::list_skus,
        super::pause_sku,
        super::resume_sku,
        super::get_sku,
        super::reserve,
        super::queue::join,
        super::queue::ticket,
        super::queue::stream,
        super::get_reservation,
        super::cancel,
        super::payment_pending,
        super::confirm,
        super::list_compensations,
        super::get_compensation,
        super::resolve_compensation,
        super::events::list_events,
        super::webhooks::put_webhook,
        super::webhooks::list_webhooks,
        super::webhooks::get_webhook,
        super::webhooks::delete_webhook,
        super::webhooks::list_deliveries,
        super::webhooks::replay,
        super::healthz,
        super::readyz,
        super::render_metrics,
        super::openapi_json,
    ),
    components(schemas(ProblemBody, CompensationFilter, SkuStateFilter)),
    modifiers(&Security, &EdgeProblems),
    tags(
        (name = "admin", description = "SKU definitions (service token)"),
        (name = "sale", description = "SKUs and reservations"),
        (name = "payment", description = "Payments (service token)"),
        (name = "compensations", description = "Payments to refund (service token)"),
        (name = "events", description = "The event feed and webhooks (service token)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// The document, rendered once.
pub(super) static DOCUMENT: LazyLock<Bytes> = LazyLock::new(|| {
    Bytes::from(
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serialises"),
    )
});

/// An RFC 9457 problem (`application/problem+json`). Further members may follow
/// (`/readyz` adds its report to its 503).
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)] // a schema: the bodies are written by `Problem::body`
pub(super) struct ProblemBody {
    /// `https://flashgate.dev/problems/{code}`.
    #[serde(rename = "type")]
    kind: String,
    /// The status's reason phrase.
    title: String,
    /// The HTTP status again.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// Stable machine-readable code, e.g. `sold_out`, `invalid_request`.
    code: String,
    /// Human-readable explanation.
    detail: String,
    /// True on a 409 of confirm: the payment must be refunded.
    #[schema(nullable = false)]
    refund_required: Option<bool>,
    /// The compensation record of that refund (`GET /v1/compensations/{id}`).
    #[schema(nullable = false)]
    compensation_id: Option<String>,
    /// On 503 `unavailable`: whether the request may have been applied.
    #[schema(nullable = false)]
    outcome: Option<ProblemOutcome>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // a schema: see `error::Outcome`
pub(super) enum ProblemOutcome {
    NotApplied,
    Unknown,
}

/// Which compensations `GET /v1/compensations` lists.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // a schema: the query is checked by hand
pub(super) enum CompensationFilter {
    Open,
    Resolved,
    All,
}

/// `GET /v1/admin/skus?state=`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // a schema: the query is checked by hand
pub(super) enum SkuStateFilter {
    OnSale,
    Scheduled,
    Ended,
    Paused,
    All,
}

/// A SKU in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // parameters: the handlers take `Path<String>`
pub(super) struct SkuPath {
    /// SKU id; anything else is `400 invalid_request`.
    #[param(
        pattern = "^[A-Za-z0-9_-]{1,64}$",
        min_length = 1,
        max_length = 64,
        example = "sneaker-42"
    )]
    sku: String,
}

/// A reservation in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // parameters: the handlers take `Path<String>`
pub(super) struct ReservationPath {
    /// A `reservation_id`; an id flashgate never issued is `404 not_found`.
    id: String,
}

/// A compensation in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // parameters: the handlers take `Path<String>`
pub(super) struct CompensationPath {
    /// A compensation `id`.
    id: String,
}

/// The header that makes a reserve idempotent.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // parameters: read by the `IdempotencyKey` extractor
pub(super) struct IdempotencyKeyHeader {
    /// Scoped to the user and the SKU; exactly one such header.
    #[param(
        rename = "Idempotency-Key",
        pattern = "^[!-~]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    idempotency_key: String,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // parameters: read by the `AdmissionToken` extractor
pub(super) struct AdmissionTokenHeader {
    /// On a SKU with a waiting room: the `admission_token` of the caller's admitted
    /// ticket (`/v1/skus/{sku}/queue`); one admission makes at most one hold.
    #[param(
        rename = "Admission-Token",
        pattern = "^[!-~]{1,512}$",
        max_length = 512
    )]
    admission_token: Option<String>,
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            USER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "JWT: HS256 signed with FLASHGATE_JWT_SECRET (or one of \
                         FLASHGATE_JWT_SECRET_PREVIOUS), or RS256/ES256 signed by the key \
                         its `kid` names in the JWK set at FLASHGATE_JWT_JWKS_URL. `sub` is \
                         the user id (1..=64 characters), `exp` required, `nbf` checked; \
                         `iss`/`aud` required when FLASHGATE_JWT_ISSUER/_AUDIENCE are set",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            SERVICE,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("FLASHGATE_SERVICE_TOKEN"))
                    .build(),
            ),
        );
    }
}

/// The refusals of the HTTP edge, which every operation of a kind can answer: they
/// are added here so that no annotation can forget one. Business refusals (404, 409,
/// 422) stay on the handlers.
struct EdgeProblems;

impl Modify for EdgeProblems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            for operation in [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                edge_problems(path, operation);
            }
        }
    }
}

fn edge_problems(path: &str, operation: &mut Operation) {
    let has_input = operation.parameters.as_ref().is_some_and(|p| !p.is_empty())
        || operation.request_body.is_some();
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let has_body = operation.request_body.is_some();
    let reserve = path == "/v1/skus/{sku}/reservations";
    // The per-user and per-address token buckets of the reserve also meter the queue.
    let rate_limited = reserve || path.starts_with("/v1/skus/{sku}/queue");
    if reserve || path == "/v1/compensations/{id}/resolve" {
        // The reserve body may be left out (one unit). utoipa says "optional" only
        // through `Option<T>`, which also admits a JSON `null` body: the parser
        // refuses that one (400), so the body is a plain object, not required.
        if let Some(RefOr::T(body)) = operation.request_body.as_mut() {
            body.required = Some(Required::False);
        }
    }
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, response: Response| {
        responses
            .entry(status.to_owned())
            .or_insert(RefOr::T(response));
    };
    if has_input {
        add(
            "400",
            problem("`invalid_request`: a malformed path, query, header or body"),
        );
    }
    if secured {
        add(
            "401",
            problem(
                "`unauthorized`: missing or invalid bearer token; `detail` says why \
                 (expired, bad signature, unknown key, wrong audience, ...)",
            ),
        );
    }
    if has_body {
        add(
            "408",
            problem("`request_timeout`: the body did not arrive in time"),
        );
        add("413", problem("`payload_too_large`: a body over 16 KiB"));
        add(
            "415",
            problem("`unsupported_media_type`: a body that is not `application/json`"),
        );
    }
    if rate_limited {
        add(
            "429",
            retry_after(problem(
                "`rate_limited`: too many reserves or queue requests from this user or address",
            )),
        );
    }
    add(
        "503",
        retry_after(problem(
            "`unavailable` (Redis or MySQL unreachable or too slow; `outcome` says whether \
             anything may have changed) or `overloaded` (load shed)",
        )),
    );
}

/// A problem+json answer.
pub(super) fn problem(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

fn retry_after(mut response: Response) -> Response {
    response.headers.insert(
        "Retry-After".to_owned(),
        RefOr::T(
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0)),
                ))
                .description(Some("seconds; may be absent on `unavailable`"))
                .build(),
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn document() -> Value {
        serde_json::from_slice(&DOCUMENT).expect("the document is JSON")
    }

    fn properties<'a>(doc: &'a Value, schema: &str) -> Vec<&'a str> {
        doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {schema} has properties"))
            .keys()
            .map(String::as_str)
            .collect() // sorted: serde_json's map
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = doc["paths"].as_object().unwrap();
        for route in super::super::ROUTES {
            assert!(
                paths.contains_key(route),
                "{route} missing from the document"
            );
        }
        assert_eq!(
            paths.len(),
            super::super::ROUTES.len(),
            "a path the router lacks"
        );
    }

    #[test]
    fn views_carry_the_contract_fields() {
        let doc = document();
        let reservation = properties(&doc, "ReservationView");
        for field in [
            "reservation_id",
            "sku",
            "user_id",
            "quantity",
            "status",
            "expires_at",
            "payment_ref",
        ] {
            assert!(reservation.contains(&field), "ReservationView.{field}");
        }
        let required = doc["components"]["schemas"]["ReservationView"]["required"]
            .as_array()
            .unwrap();
        assert!(
            !required.contains(&"payment_ref".into()),
            "payment_ref is optional"
        );
        let sku = properties(&doc, "SkuView");
        for field in [
            "sku",
            "stock_total",
            "available",
            "held",
            "sold",
            "per_user_limit",
            "hold_seconds",
            "starts_at",
            "ends_at",
            "waiting_room",
        ] {
            assert!(sku.contains(&field), "SkuView.{field}");
        }
        let ticket = properties(&doc, "TicketView");
        for field in [
            "sku",
            "user_id",
            "position",
            "state",
            "ahead",
            "eta_seconds",
            "admission_token",
            "admitted_until",
            "retry_after_ms",
        ] {
            assert!(ticket.contains(&field), "TicketView.{field}");
        }
        let compensation = properties(&doc, "CompensationView");
        for field in [
            "id",
            "reservation_id",
            "sku",
            "user_id",
            "quantity",
            "payment_ref",
            "reason",
            "status",
            "created_at",
            "resolved_at",
            "refund_ref",
            "note",
        ] {
            assert!(compensation.contains(&field), "CompensationView.{field}");
        }
        assert_eq!(properties(&doc, "CompensationList"), ["items", "next"]);
        assert_eq!(properties(&doc, "SkuList"), ["items", "next"]);
        assert!(properties(&doc, "Health").contains(&"build"));
        let problem = properties(&doc, "Problem");
        for field in [
            "type",
            "title",
            "status",
            "code",
            "detail",
            "refund_required",
            "compensation_id",
            "outcome",
        ] {
            assert!(problem.contains(&field), "Problem.{field}");
        }
        let statuses = &doc["components"]["schemas"]["Status"]["enum"];
        for status in ["held", "paying", "confirmed", "cancelled", "expired"] {
            assert!(
                statuses.as_array().unwrap().contains(&status.into()),
                "{status}"
            );
        }
        for (schema, fields) in [
            (
                "DefineSku",
                &[
                    "stock",
                    "per_user_limit",
                    "hold_seconds",
                    "starts_at",
                    "ends_at",
                    "buckets",
                    "waiting_room",
                ][..],
            ),
            (
                "WaitingRoomBody",
                &["admission_seconds", "admit_per_second", "prequeue_shuffle"],
            ),
            ("ReserveBody", &["quantity"]),
            ("PaymentBody", &["payment_ref"]),
        ] {
            let mut expected = fields.to_vec();
            expected.sort_unstable();
            assert_eq!(properties(&doc, schema), expected, "{schema}");
        }
    }

    #[test]
    fn operations_name_their_security_and_errors() {
        let doc = document();
        let op = |path: &str, method: &str| doc["paths"][path][method].clone();
        let reserve = op("/v1/skus/{sku}/reservations", "post");
        assert_eq!(reserve["security"], serde_json::json!([{ USER: [] }]));
        let header = reserve["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["in"] == "header")
            .expect("the Idempotency-Key header");
        assert_eq!(header["name"], "Idempotency-Key");
        assert_eq!(header["required"], true);
        for status in [
            "201", "400", "401", "404", "409", "413", "415", "422", "429", "503",
        ] {
            let response = &reserve["responses"][status];
            assert!(response.is_object(), "reserve answers {status}");
            if status != "201" {
                assert!(
                    response["content"]["application/problem+json"].is_object(),
                    "{status} is a problem"
                );
            }
        }
        assert_eq!(reserve["requestBody"]["required"], false);
        assert_eq!(
            reserve["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ReserveBody",
            "an object, never null"
        );
        let confirm = op("/v1/reservations/{id}/confirm", "post");
        assert_eq!(confirm["security"], serde_json::json!([{ SERVICE: [] }]));
        assert!(confirm["requestBody"]["content"]["application/json"].is_object());
        let cancel = op("/v1/reservations/{id}/cancel", "post");
        assert_eq!(
            cancel["security"],
            serde_json::json!([{ USER: [] }, { SERVICE: [] }])
        );
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes[USER]["scheme"], "bearer");
        assert_eq!(schemes[SERVICE]["scheme"], "bearer");
        assert!(op("/healthz", "get")["security"].is_null());
    }
}
