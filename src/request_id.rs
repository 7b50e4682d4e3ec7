//! The request id: `x-request-id` taken from the request when it is sane, else made
//! here; returned on every answer and written into every log line of the request
//! (with its method and path: `telemetry::WithRequest`). Never rejects a request.
//!
//! The fields live in a task-local for the time the request is answered, not in a
//! tracing span: a span per request costs an allocation, the formatting of its
//! fields and a registry enter and exit at every poll, on every request, for the
//! few requests that log anything; the task-local costs a pointer swap per poll.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use std::future::Future;
use std::time::Instant;

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

/// 128 random bits in lower-case hex, formatted on the stack (one copy, into the value).
fn generate_value() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = HEX[((bits >> (4 * (31 - i))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&hex).expect("hex digits are a header value")
}

/// What every log line written while a request is answered carries.
#[derive(Clone)]
pub struct RequestFields {
    pub request_id: HeaderValue,
    pub method: Method,
    pub uri: Uri,
}

tokio::task_local! {
    /// The request the current task answers (see `RequestId::scope`).
    pub static CURRENT: RequestFields;
}

/// The fields of the request the current task answers, if any.
pub fn current<R>(f: impl FnOnce(&RequestFields) -> R) -> Option<R> {
    CURRENT.try_with(f).ok()
}

/// A request's id and the fields its log lines carry.
pub struct RequestId {
    fields: RequestFields,
    started: Instant,
}

impl RequestId {
    /// Takes the request's sane id or makes one. (Nothing below reads the request's
    /// header: a made id is not written into it.)
    pub fn begin(request: &Request) -> RequestId {
        let value = match request.headers().get(X_REQUEST_ID) {
            Some(taken) if taken.to_str().is_ok_and(sane) => taken.clone(),
            _ => generate_value(),
        };
        RequestId {
            fields: RequestFields {
                request_id: value,
                method: request.method().clone(),
                uri: request.uri().clone(),
            },
            started: Instant::now(),
        }
    }

    /// Runs `answer` (the request's handling) with the request's fields in its log lines.
    pub fn scope<F: Future>(&self, answer: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self.fields.clone(), answer)
    }

    /// Puts the id on the answer.
    pub fn finish(self, response: &mut Response) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let (status, elapsed_us) = (
                response.status().as_u16(),
                self.started.elapsed().as_micros() as u64,
            );
            CURRENT.sync_scope(self.fields.clone(), || {
                tracing::debug!(status, elapsed_us, "answered")
            });
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID, self.fields.request_id);
    }
}

/// The same as a middleware of its own. The gateway's router does this inside its
/// `observe` layer instead: one middleware layer fewer on every request.
pub async fn layer(request: Request, next: Next) -> Response {
    let id = RequestId::begin(&request);
    let mut response = id.scope(next.run(request)).await;
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
        let value = generate_value();
        let value = value.to_str().unwrap();
        assert_eq!(value.len(), 32);
        assert!(sane(value));
        assert!(value
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(value, generate_value());
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

    /// A router whose `/work` logs one WARN line, with this layer, and the lines it logs
    /// in `format` (the test runtime has one thread: requests run under the subscriber
    /// while the guard lives).
    fn logging_app(
        format: crate::config::LogFormat,
    ) -> (Capture, tracing::subscriber::DefaultGuard, axum::Router) {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = crate::telemetry::logging(
            format,
            tracing_subscriber::EnvFilter::new("info"),
            move || writer.clone(),
        );
        let guard = tracing::subscriber::set_default(subscriber);
        let app = axum::Router::new()
            .route(
                "/work",
                axum::routing::get(|| async {
                    tracing::warn!(detail = "x", "dependency unavailable");
                    "done"
                }),
            )
            .layer(axum::middleware::from_fn(layer));
        (capture, guard, app)
    }

    #[tokio::test]
    async fn json_log_lines_of_a_request_carry_its_id() {
        use tower_service::Service;
        let (capture, _guard, mut app) = logging_app(crate::config::LogFormat::Json);
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
        // Outside a request, a line carries no request fields.
        capture.0.lock().unwrap().clear();
        tracing::warn!("between requests");
        let line = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(line.trim()).expect(&line);
        assert_eq!(line["message"], "between requests");
        assert!(line.get("span").is_none(), "{line}");
    }

    #[tokio::test]
    async fn text_log_lines_of_a_request_end_with_its_fields() {
        use tower_service::Service;
        let (capture, _guard, mut app) = logging_app(crate::config::LogFormat::Text);
        let request = Request::get("/work?q=1")
            .header("x-request-id", "order-7")
            .body(axum::body::Body::empty())
            .unwrap();
        app.call(request).await.unwrap();
        let lines = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let line = lines
            .lines()
            .find(|l| l.contains("dependency unavailable"))
            .expect(&lines);
        assert!(line.contains(" WARN "), "{line}");
        assert!(
            line.ends_with("detail=\"x\" request_id=order-7 method=GET path=/work"),
            "{line}"
        );
    }
}
