//! The request id: `x-request-id` taken from the request when it is sane, else made
//! here; returned on every answer and carried by the span every log line of the
//! request is written in. Never rejects a request.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;
use tracing::Instrument;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id taken from a client; longer ones are replaced, not cut.
const REQUEST_ID_MAX_LEN: usize = 128;

/// A client's id is kept when it is 1..=128 characters of `[A-Za-z0-9._:/+=@~-]`:
/// enough for UUIDs, ULIDs, trace ids and proxy formats, nothing that could break a
/// log line or a header.
pub fn sane(id: &str) -> bool {
    (1..=REQUEST_ID_MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/+=@~-".contains(&b))
}

/// 128 random bits, hex.
pub fn generate() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A request's id and the span its log lines are written in.
pub struct RequestId {
    value: HeaderValue,
    span: tracing::Span,
    started: Instant,
}

impl RequestId {
    /// Takes the request's sane id or makes one, and sets it on the request.
    pub fn begin(request: &mut Request) -> RequestId {
        let id = request
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| sane(id))
            .map(str::to_owned)
            .unwrap_or_else(generate);
        let value = HeaderValue::from_str(&id).expect("a sane id is a header value");
        request.headers_mut().insert(X_REQUEST_ID, value.clone());
        let span = tracing::info_span!(
            "request",
            request_id = %id,
            method = %request.method(),
            path = %request.uri().path(),
        );
        RequestId {
            value,
            span,
            started: Instant::now(),
        }
    }

    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Puts the id on the answer.
    pub fn finish(self, response: &mut Response) {
        self.span.in_scope(|| {
            tracing::debug!(
                status = response.status().as_u16(),
                elapsed_us = self.started.elapsed().as_micros() as u64,
                "answered"
            )
        });
        response.headers_mut().insert(X_REQUEST_ID, self.value);
    }
}

/// The same as a middleware of its own. The gateway's router does this inside its
/// `observe` layer instead: one middleware layer fewer on every request.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = RequestId::begin(&mut request);
    let mut response = next.run(request).instrument(id.span()).await;
    id.finish(&mut response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_sane() {
        assert!(sane("3f2a9c1e-7b4d-4e21-9a0c-5d6e7f8a9b0c"));
        assert!(sane("01J9ZQ3X8M2K7V5T4R6P0N1B2C"));
        assert!(sane("Root=1-5759e988-bd862e3fe1be46a994272793"));
        for bad in ["", "a b", "x\"y", "line\nbreak", "é", &"a".repeat(129)] {
            assert!(!sane(bad), "{bad:?}");
        }
        let made = generate();
        assert_eq!(made.len(), 32);
        assert!(sane(&made));
        assert_ne!(made, generate());
    }

    /// What a test's log lines were written to.
    #[derive(Clone, Default)]
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

    #[tokio::test]
    async fn json_log_lines_of_a_request_carry_its_id() {
        use axum::routing::get;
        use tower_service::Service;
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = crate::telemetry::logging(
            crate::config::LogFormat::Json,
            tracing_subscriber::EnvFilter::new("info"),
            move || writer.clone(),
        );
        // The test runtime has one thread: the request runs under this subscriber.
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut app = axum::Router::new()
            .route(
                "/work",
                get(|| async {
                    tracing::warn!(detail = "x", "dependency unavailable");
                    "done"
                }),
            )
            .layer(axum::middleware::from_fn(layer));
        let request = |id: Option<&str>| {
            let mut request = Request::get("/work");
            if let Some(id) = id {
                request = request.header("x-request-id", id);
            }
            request.body(axum::body::Body::empty()).unwrap()
        };
        let taken = app.call(request(Some("order-42.retry-1"))).await.unwrap();
        assert_eq!(taken.headers()[X_REQUEST_ID], "order-42.retry-1");
        let made = app.call(request(None)).await.unwrap();
        let made = made.headers()[X_REQUEST_ID].to_str().unwrap().to_owned();
        assert_eq!(made.len(), 32);
        let replaced = app.call(request(Some("two words"))).await.unwrap();
        assert_ne!(replaced.headers()[X_REQUEST_ID], "two words");
        let lines = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let ids: Vec<String> = lines
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect(line))
            .filter(|line| line["message"] == "dependency unavailable")
            .map(|line| {
                assert_eq!(line["level"], "WARN", "{line}");
                assert_eq!(line["span"]["path"], "/work", "{line}");
                line["span"]["request_id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 3, "{lines}");
        assert_eq!(ids[0], "order-42.retry-1");
        assert_eq!(ids[1], made);
        assert_ne!(ids[2], "two words");
    }
}
