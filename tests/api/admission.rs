//! Admission before Redis: per-user and per-address token buckets on the reserve
//! endpoint (429 `rate_limited` + Retry-After), the trusted proxy header, and load
//! shedding beyond the in-flight cap (503 `overloaded`), against the real servers.

use crate::common::*;
use flashgate::config::{AdmissionSettings, ServeArgs};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn args(admission: AdmissionSettings) -> ServeArgs {
    ServeArgs {
        admission,
        ..serve_args(&redis_url(), &database_url())
    }
}

async fn sale(app: &TestApp) -> String {
    let sku = unique_sku("admit");
    app.create_sku(&sku, json!({ "stock": 1000, "per_user_limit": 1000 }))
        .await;
    sku
}

/// A 429 from the admission layer: problem+json, `rate_limited`, whole seconds >= 1.
fn assert_rate_limited(status: StatusCode, retry_after: Option<String>, body: &Value) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert_eq!(body["status"], 429);
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
    let seconds: u64 = retry_after
        .expect("Retry-After")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(seconds >= 1);
}

async fn reserve_from(
    app: &TestApp,
    sku: &str,
    user: &str,
    key: &str,
    forwarded_for: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = app
        .client
        .post(app.url(&format!("/v1/skus/{sku}/reservations")))
        .bearer_auth(user_token(user))
        .header("Idempotency-Key", key)
        .json(&json!({ "quantity": 1 }));
    if let Some(address) = forwarded_for {
        request = request.header("X-Forwarded-For", address);
    }
    let response = request.send().await.unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, value) = body(response).await;
    (status, retry_after, value)
}

#[tokio::test]
async fn a_user_over_the_limit_gets_429_while_another_user_is_served() {
    let app = spawn_app_with(args(AdmissionSettings {
        rate_per_user: 1,
        rate_per_user_burst: 3,
        ..AdmissionSettings::off()
    }))
    .await;
    let sku = sale(&app).await;
    // The abuser races 20 reserves at once: exactly the burst gets through.
    let attempts = (0..20).map(|i| {
        let (app, sku) = (&app, &sku);
        async move { reserve_from(app, sku, "abuser", &format!("k{i}"), None).await }
    });
    let answers = futures::future::join_all(attempts).await;
    let created = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 3, "the burst, no more");
    for (status, retry_after, value) in answers
        .into_iter()
        .filter(|(s, _, _)| *s != StatusCode::CREATED)
    {
        assert_rate_limited(status, retry_after, &value);
    }
    // Refused before Redis: the refusals took no stock.
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 3, "{view}");
    // Another user is served at once.
    let (status, _, value) = reserve_from(&app, &sku, "honest", "h1", None).await;
    assert_eq!(status, StatusCode::CREATED, "{value}");
    // A forged token naming the abuser is not limited but refused as unauthorized,
    // and spends nothing of anyone's bucket.
    let forged = app
        .client
        .post(app.url(&format!("/v1/skus/{sku}/reservations")))
        .bearer_auth("not.a.jwt")
        .header("Idempotency-Key", "f1")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    // The bucket refills at the rate: after a second the abuser gets one more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, value) = reserve_from(&app, &sku, "abuser", "later", None).await;
    assert_eq!(status, StatusCode::CREATED, "{value}");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"outcome="rate_limited""#),
        "the outcome is counted"
    );
}

#[tokio::test]
async fn the_address_limit_ignores_the_forwarded_header_unless_told_to_trust_it() {
    let limit = AdmissionSettings {
        rate_per_address: 1,
        rate_per_address_burst: 2,
        ..AdmissionSettings::off()
    };
    // Not configured: every request is from 127.0.0.1, whatever the header says.
    let app = spawn_app_with(args(limit.clone())).await;
    let sku = sale(&app).await;
    for i in 0..2 {
        let forwarded = format!("203.0.113.{i}");
        let (status, _, value) =
            reserve_from(&app, &sku, &format!("u{i}"), "k", Some(&forwarded)).await;
        assert_eq!(status, StatusCode::CREATED, "{value}");
    }
    let (status, retry_after, value) =
        reserve_from(&app, &sku, "u9", "k", Some("203.0.113.9")).await;
    assert_rate_limited(status, retry_after, &value);
    drop(app);

    // Trusted proxy on loopback: each forwarded client has its own bucket.
    let app = spawn_app_with(args(AdmissionSettings {
        client_ip_header: Some("x-forwarded-for".into()),
        trusted_proxies: vec!["127.0.0.1".into(), "::1".into()],
        ..limit
    }))
    .await;
    let sku = sale(&app).await;
    for i in 0..2 {
        let (status, _, value) =
            reserve_from(&app, &sku, &format!("a{i}"), "k", Some("203.0.113.1")).await;
        assert_eq!(status, StatusCode::CREATED, "{value}");
    }
    // What the client wrote left of the proxy's entry does not change the address.
    let (status, retry_after, value) =
        reserve_from(&app, &sku, "a2", "k", Some("198.51.100.7, 203.0.113.1")).await;
    assert_rate_limited(status, retry_after, &value);
    let (status, _, value) = reserve_from(&app, &sku, "b0", "k", Some("203.0.113.2")).await;
    assert_eq!(status, StatusCode::CREATED, "another client: {value}");
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 3, "{view}");
}

#[tokio::test]
async fn beyond_the_in_flight_cap_requests_are_shed_at_once() {
    let app = spawn_app_with(args(AdmissionSettings {
        max_in_flight: 1,
        ..AdmissionSettings::off()
    }))
    .await;
    let sku = sale(&app).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // One reserve held in flight: its head promises a body that has not come yet.
    let body = br#"{"quantity":1}"#;
    let mut held = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/skus/{sku}/reservations HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         idempotency-key: held\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        user_token("held"),
        body.len()
    );
    held.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let shed = loop {
        let (status, retry_after, value) = reserve_from(&app, &sku, "next", "n", None).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break (retry_after, value);
        }
        // Until the held request is in flight, the next one is served.
        assert_eq!(status, StatusCode::CREATED, "{value}");
        assert!(started.elapsed() < Duration::from_secs(5), "never shed");
    };
    assert_eq!(shed.1["code"], "overloaded", "{}", shed.1);
    assert_eq!(shed.0.as_deref(), Some("1"));
    // Shed at once, not queued behind the held request (body deadline 10 s).
    let asked = Instant::now();
    let (status, _, _) = reserve_from(&app, &sku, "next2", "n", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(asked.elapsed() < Duration::from_secs(1));
    // Probes are never shed.
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    // The held request completes; then the cap has room again.
    held.write_all(body).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), held.read(&mut answer))
        .await
        .expect("the held request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
    // The permit is released once the answer is out.
    let served = Instant::now();
    loop {
        let (status, _, value) = reserve_from(&app, &sku, "after", "a", None).await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(served.elapsed() < Duration::from_secs(2), "{value}");
    }
    let view = app.assert_stock_adds_up(&sku).await;
    assert!(view["held"].as_u64().unwrap() >= 2, "{view}");
}

/// Reserve → cancel churn: one account may release FLASHGATE_MAX_RELEASED_HOLDS_PER_USER
/// holds of a SKU per key lifetime, then gets `limit_exceeded` for that SKU: what it can
/// leave behind in Redis (ended reservations and their keys) is bounded. Concurrent
/// loops of the same user cannot slip past the cap (one script decides each reserve).
#[tokio::test]
async fn one_user_cannot_churn_reserve_and_cancel_without_bound() {
    const CAP: u64 = 3;
    let app = spawn_app_with(ServeArgs {
        max_released_holds_per_user: CAP,
        ..serve_args(&redis_url(), &database_url())
    })
    .await;
    let sku = unique_sku("churn");
    app.create_sku(&sku, json!({ "stock": 100, "per_user_limit": 2 }))
        .await;
    let token = user_token("churner");
    // Two loops at once, each reserve → cancel until refused.
    let churn = |lane: u32| {
        let app = &app;
        let (sku, token) = (sku.clone(), token.clone());
        async move {
            for (released, i) in (0..20).enumerate() {
                let (status, body) = app
                    .reserve(&sku, "churner", &format!("k{lane}-{i}"), 1)
                    .await;
                if status == StatusCode::CONFLICT {
                    assert_eq!(body["code"], "limit_exceeded", "{body}");
                    return released as u64;
                }
                assert_eq!(status, StatusCode::CREATED, "{body}");
                let id = body["reservation_id"].as_str().unwrap();
                assert_eq!(app.cancel(id, &token).await.0, StatusCode::OK);
            }
            panic!("never capped");
        }
    };
    let (a, b) = tokio::join!(churn(1), churn(2));
    // Each loop stops at its first refusal; together they released at most CAP + 1
    // (a reserve admitted at CAP - 1 releases may be cancelled after the other lane's).
    assert!(a + b >= CAP && a + b <= CAP + 1, "released {a} + {b}");
    // Refused from now on, whatever the key; other users are not affected.
    let (status, body) = app.reserve(&sku, "churner", "k-late", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("limit_exceeded"))
    );
    app.hold(&sku, "honest").await;
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 1);
}

/// A refused reserve leaves after the refusal delay (what slows a client hammering in
/// a closed loop), and while it waits it holds no in-flight permit: with a cap of one
/// request in flight, another user's reserve is served meanwhile.
#[tokio::test]
async fn a_rate_limited_answer_waits_without_holding_a_place_in_flight() {
    let delay = Duration::from_millis(400);
    let app = spawn_app_with(args(AdmissionSettings {
        rate_per_user: 1,
        rate_per_user_burst: 1,
        max_in_flight: 1,
        rate_limited_delay_ms: delay.as_millis() as u64,
        ..AdmissionSettings::off()
    }))
    .await;
    let sku = sale(&app).await;
    let (status, _, value) = reserve_from(&app, &sku, "abuser", "k1", None).await;
    assert_eq!(status, StatusCode::CREATED, "{value}");
    let started = Instant::now();
    let refused = reserve_from(&app, &sku, "abuser", "k2", None);
    let honest = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = reserve_from(&app, &sku, "honest", "h1", None).await;
        (answer, started.elapsed())
    };
    let ((status, retry_after, value), ((honest_status, _, honest_value), honest_at)) =
        tokio::join!(refused, honest);
    let refused_at = started.elapsed();
    assert_rate_limited(status, retry_after, &value);
    assert!(refused_at >= delay, "the refusal left after {refused_at:?}");
    assert_eq!(honest_status, StatusCode::CREATED, "{honest_value}");
    assert!(
        honest_at < delay,
        "the honest reserve waited for the refusal: {honest_at:?}"
    );
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(view["held"], 2, "{view}");
}
