//! Strict edges: media types, duplicated headers, hyper's own refusals as
//! problem+json, JWT time claims and the secrets `serve` accepts.

use crate::common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn reserve_with(
    app: &TestApp,
    sku: &str,
    key: &str,
    content_type: Option<&str>,
    payload: &'static str,
) -> (StatusCode, Value, Option<String>) {
    let mut request = app
        .client
        .post(app.url(&format!("/v1/skus/{sku}/reservations")))
        .bearer_auth(user_token("edge-user"))
        .header("Idempotency-Key", key)
        .body(payload);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, value) = body(response).await;
    (status, value, content_type)
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_415_and_holds_nothing() {
    let app = spawn_app().await;
    let sku = unique_sku("media");
    app.create_sku(&sku, json!({"stock": 10, "per_user_limit": 10}))
        .await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonx"),
        None,
    ] {
        let (status, problem, media) =
            reserve_with(&app, &sku, "k-bad", content_type, r#"{"quantity": 1}"#).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(problem["code"], "unsupported_media_type");
        assert_eq!(problem["status"], 415);
        assert_eq!(media.as_deref(), Some("application/problem+json"));
    }
    assert_eq!(app.sku(&sku).await["held"], 0, "nothing was held");
    // JSON in any case, with parameters; and no body at all (the quantity defaults).
    for (key, content_type, payload) in [
        (
            "k-1",
            Some("application/json; charset=utf-8"),
            r#"{"quantity": 1}"#,
        ),
        ("k-2", Some("Application/JSON"), r#"{"quantity": 1}"#),
        ("k-3", None, ""),
        ("k-4", Some("text/plain"), ""),
    ] {
        let (status, view, _) = reserve_with(&app, &sku, key, content_type, payload).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{content_type:?} {payload:?}: {view}"
        );
    }
    assert_eq!(app.sku(&sku).await["held"], 4);
}

#[tokio::test]
async fn two_idempotency_keys_are_400() {
    let app = spawn_app().await;
    let sku = unique_sku("twokeys");
    app.create_sku(&sku, json!({"stock": 10, "per_user_limit": 10}))
        .await;
    let response = app
        .client
        .post(app.url(&format!("/v1/skus/{sku}/reservations")))
        .bearer_auth(user_token("edge-user"))
        .header("Idempotency-Key", "first")
        .header("Idempotency-Key", "second")
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    let (status, problem) = body(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["code"], "invalid_request");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));
    assert_eq!(app.sku(&sku).await["held"], 0);
}

/// Sends raw bytes, returns the whole answer (the server closes after these).
async fn raw(app: &TestApp, request: &[u8]) -> String {
    let addr = app.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("read");
    String::from_utf8(answer).unwrap()
}

#[tokio::test]
async fn hyper_refusals_are_problem_json() {
    let app = spawn_app().await;
    let many_headers: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_uri = format!("/{}", "a".repeat(70_000));
    let cases = [
        (
            "GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n".to_owned(),
            400,
            "invalid_request",
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n"),
            431,
            "header_fields_too_large",
        ),
        (
            format!("GET {long_uri} HTTP/1.1\r\nHost: t\r\n\r\n"),
            414,
            "uri_too_long",
        ),
    ];
    for (request, status, code) in cases {
        let answer = raw(&app, request.as_bytes()).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect(&answer);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status}: {head}"
        );
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        let problem: Value = serde_json::from_str(body).expect(body);
        assert_eq!(problem["status"], status);
        assert_eq!(problem["code"], code);
        for field in ["type", "title", "detail"] {
            assert!(problem[field].is_string(), "{field} in {problem}");
        }
    }
    // And ordinary answers on the same server are untouched.
    let answer = raw(
        &app,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwts_not_yet_valid_or_expiring_now_are_401() {
    let app = spawn_app().await;
    let now = unix_now();
    let get = |token: String| {
        let app = &app;
        async move { app.reservation("x", &token).await }
    };
    for (what, claims) in [
        (
            "nbf in the future",
            json!({"sub": "a", "exp": now + 60, "nbf": now + 30}),
        ),
        ("exp == now", json!({"sub": "a", "exp": now})),
        ("exp in the past", json!({"sub": "a", "exp": now - 1})),
    ] {
        let (status, problem) = get(signed(claims)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(problem["code"], "unauthorized");
    }
    // Valid ones reach the handler (an unknown id is 404, not 401).
    let (status, _) = get(signed(json!({"sub": "a", "exp": now + 60, "nbf": now}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn serve_refuses_short_or_shared_secrets() {
    let good = serve_args(&redis_url(), &database_url());
    let short = flashgate::server::build_state(&flashgate::config::ServeArgs {
        service_token: "s".repeat(31),
        ..good.clone()
    })
    .await;
    let message = format!("{:#}", short.err().expect("a 31-byte token is refused"));
    assert!(message.contains("FLASHGATE_SERVICE_TOKEN"), "{message}");
    assert!(message.contains("32"), "{message}");
    let shared = flashgate::server::build_state(&flashgate::config::ServeArgs {
        service_token: good.jwt_secret.clone().unwrap(),
        ..good.clone()
    })
    .await;
    let message = format!(
        "{:#}",
        shared.err().expect("one secret for both is refused")
    );
    assert!(message.contains("differ"), "{message}");
}
