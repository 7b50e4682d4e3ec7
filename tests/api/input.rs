//! Authentication failures and hostile input: always a 4xx problem+json, never a
//! 5xx, and nothing changes.

use crate::common::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn forged(header: &str, claims: serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode("not-a-signature")
    )
}

#[tokio::test]
async fn bad_credentials_are_401_problems() {
    let app = spawn_app().await;
    let sku = unique_sku("auth");
    app.create_sku(&sku, json!({"stock": 5})).await;
    let exp = chrono::Utc::now().timestamp() + 600;
    let wrong_secret =
        flashgate::auth::issue_user_token("some-other-secret-0123456789", "eve", 60).unwrap();
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(json!({"sub": "eve", "exp": exp}).to_string())
    );
    let hs512 = forged(
        r#"{"alg":"HS512","typ":"JWT"}"#,
        json!({"sub": "eve", "exp": exp}),
    );
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "eve", "exp": chrono::Utc::now().timestamp() - 10}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let long_sub = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "x".repeat(65), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let reserve_url = app.url(&format!("/v1/skus/{sku}/reservations"));
    for bearer in [
        None,
        Some(""),
        Some("garbage"),
        Some(wrong_secret.as_str()),
        Some(alg_none.as_str()),
        Some(hs512.as_str()),
        Some(expired.as_str()),
        Some(long_sub.as_str()),
        // the service token is not a user
        Some(SERVICE_TOKEN),
    ] {
        let mut request = app.client.post(&reserve_url).header("Idempotency-Key", "k");
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let (status, problem) = body(response).await;
        assert_eq!(
            (status, &problem["code"]),
            (StatusCode::UNAUTHORIZED, &json!("unauthorized")),
            "{bearer:?}"
        );
    }
    // Basic auth with the right token is still not a bearer token.
    let response = app
        .client
        .put(app.url(&format!("/v1/admin/skus/{sku}")))
        .header("Authorization", format!("Basic {SERVICE_TOKEN}"))
        .json(&json!({"stock": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // A user cannot act as the service.
    let id = app.hold(&sku, "eve").await;
    for (method, path, body_json) in [
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            json!({"stock": 1}),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/confirm"),
            json!({"payment_ref": "p"}),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/payment-pending"),
            json!({"payment_ref": "p"}),
        ),
        (Method::GET, "/v1/compensations".to_string(), json!({})),
        (
            Method::POST,
            "/v1/compensations/c_x/resolve".to_string(),
            json!({}),
        ),
    ] {
        let response = app
            .client
            .request(method, app.url(&path))
            .bearer_auth(user_token("eve"))
            .json(&body_json)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (view["stock_total"].as_u64(), view["held"].as_u64()),
        (Some(5), Some(1))
    );
}

#[tokio::test]
async fn hostile_input_gets_a_4xx_problem_and_changes_nothing() {
    let app = spawn_app().await;
    let sku = unique_sku("hostile");
    app.create_sku(&sku, json!({"stock": 5, "per_user_limit": 5}))
        .await;
    let id = app.hold(&sku, "ivan").await;
    let user = user_token("ivan");
    let reserve = format!("/v1/skus/{sku}/reservations");
    let big = "x".repeat(64 * 1024);
    let long_key = "k".repeat(129);
    // (method, path, bearer, idempotency key, body)
    let cases: Vec<(Method, String, &str, Option<&str>, String)> = vec![
        (
            Method::POST,
            reserve.clone(),
            &user,
            None,
            r#"{"quantity":1}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some(""),
            r#"{"quantity":1}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some(&long_key),
            r#"{"quantity":1}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("has space"),
            r#"{"quantity":1}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":0}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":-1}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":1.5}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":"1"}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":null}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":1e400}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            r#"{"quantity":99999999999999999999999}"#.into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            "{not json".into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            "[1,2]".into(),
        ),
        (
            Method::POST,
            reserve.clone(),
            &user,
            Some("k"),
            format!(r#"{{"quantity":1,"pad":"{big}"}}"#),
        ),
        (
            Method::POST,
            "/v1/skus/bad%20sku/reservations".into(),
            &user,
            Some("k"),
            "{}".into(),
        ),
        (
            Method::POST,
            format!("/v1/skus/{}/reservations", "s".repeat(65)),
            &user,
            Some("k"),
            "{}".into(),
        ),
        (
            Method::POST,
            "/v1/skus/%E2%82%AC/reservations".into(),
            &user,
            Some("k"),
            "{}".into(),
        ),
        (
            Method::POST,
            "/v1/skus/%ZZ/reservations".into(),
            &user,
            Some("k"),
            "{}".into(),
        ),
        (
            Method::GET,
            "/v1/skus/a.b".into(),
            &user,
            None,
            String::new(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"stock":-5}"#.into(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"per_user_limit":2}"#.into(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"stock":5,"per_user_limit":0}"#.into(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"stock":5,"hold_seconds":0}"#.into(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"stock":5,"starts_at":"yesterday"}"#.into(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"stock":5,"starts_at":"2030-01-02T00:00:00Z","ends_at":"2030-01-01T00:00:00Z"}"#
                .into(),
        ),
        (
            Method::PUT,
            format!("/v1/admin/skus/{sku}"),
            SERVICE_TOKEN,
            None,
            r#"{"stock":18446744073709551615}"#.into(),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/confirm"),
            SERVICE_TOKEN,
            None,
            "{}".into(),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/confirm"),
            SERVICE_TOKEN,
            None,
            r#"{"payment_ref":""}"#.into(),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/confirm"),
            SERVICE_TOKEN,
            None,
            format!(r#"{{"payment_ref":"{}"}}"#, "p".repeat(129)),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/confirm"),
            SERVICE_TOKEN,
            None,
            r#"{"payment_ref":"tab\there"}"#.into(),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/confirm"),
            SERVICE_TOKEN,
            None,
            r#"{"payment_ref":42}"#.into(),
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/payment-pending"),
            SERVICE_TOKEN,
            None,
            r#"{"payment_ref":null}"#.into(),
        ),
        (
            Method::GET,
            "/v1/compensations?limit=0".into(),
            SERVICE_TOKEN,
            None,
            String::new(),
        ),
        (
            Method::GET,
            "/v1/compensations?limit=1001".into(),
            SERVICE_TOKEN,
            None,
            String::new(),
        ),
        (
            Method::GET,
            "/v1/compensations?status=weird".into(),
            SERVICE_TOKEN,
            None,
            String::new(),
        ),
        (
            Method::GET,
            "/v1/compensations?sku=a.b".into(),
            SERVICE_TOKEN,
            None,
            String::new(),
        ),
    ];
    for (method, path, bearer, key, payload) in cases {
        let mut request = app
            .client
            .request(method.clone(), app.url(&path))
            .bearer_auth(bearer)
            .header("content-type", "application/json")
            .body(payload.clone());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let content_type = response.headers().get("content-type").cloned();
        let (_, problem) = body(response).await;
        let shown = &payload[..payload.len().min(80)];
        assert!(
            status.is_client_error(),
            "{method} {path} {shown}: {status} {problem}"
        );
        assert_eq!(
            content_type.unwrap(),
            "application/problem+json",
            "{method} {path}"
        );
        assert!(problem["code"].is_string(), "{problem}");
        assert_eq!(problem["status"], status.as_u16());
    }
    // Ids that are not ours, or are someone else's, are simply not found.
    for bogus in [
        "x",
        "....",
        "AAAA.BBBB",
        "ZGVtbw.AAAAAAAAAAAAAAAAAAAAAA",
        &"z".repeat(300),
    ] {
        let (status, problem) = app.reservation(bogus, SERVICE_TOKEN).await;
        assert_eq!(
            (status, &problem["code"]),
            (StatusCode::NOT_FOUND, &json!("not_found")),
            "{bogus}"
        );
        let (status, _) = app.confirm(bogus, "pay").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bogus}");
        let (status, _) = app.cancel(bogus, &user).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bogus}");
        let (status, _) = app.payment_pending(bogus, "pay").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bogus}");
    }
    let (status, _) = app.cancel(&id, &user_token("someone-else")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (
            view["stock_total"].as_u64(),
            view["held"].as_u64(),
            view["per_user_limit"].as_u64()
        ),
        (Some(5), Some(1), Some(5)),
        "nothing changed"
    );
    let (_, reservation) = app.reservation(&id, &user).await;
    assert_eq!(reservation["status"], "held");
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = spawn_app().await;
    let sku = unique_sku("metrics");
    app.create_sku(&sku, json!({"stock": 1})).await;
    app.hold(&sku, "m1").await;
    app.reserve(&sku, "m2", "k", 1).await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let (status, ready) = body(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(
        (&ready["redis"], &ready["scripts"], &ready["mysql"]),
        (&json!("ok"), &json!("loaded"), &json!("ok"))
    );
    // Measured by the worker's flush pass; this gateway runs without one (null) unless
    // another test of this process ran a pass.
    assert!(
        ready["outbox_backlog"].is_u64() || ready["outbox_backlog"].is_null(),
        "{ready}"
    );
    app.worker.sweep_once().await.unwrap();
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
        metrics.contains(
            r#"flashgate_requests_total{route="/v1/skus/{sku}/reservations",outcome="sold_out"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"outcome="ok""#));
    assert!(metrics.contains("flashgate_request_duration_seconds_bucket"));
    assert!(metrics.contains(&format!(r#"flashgate_available_stock{{sku="{sku}"}} 0"#)));
    assert!(metrics.contains(r#"flashgate_transitions_total{to="held"}"#));
}

#[tokio::test]
async fn redis_down_answers_503_unavailable() {
    // Nothing listens on this port: the gateway must answer, not hang or crash.
    let app = spawn_app_with(serve_args("redis://127.0.0.1:1", &database_url())).await;
    let response = app.reserve_raw("anything", "u", "k", 1).await;
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let (status, problem) = body(response).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("unavailable"))
    );
    let (status, ready) = body(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["redis"], "unreachable");
}

/// Every key of `answer` is a property of `schema` in the served document, and every
/// required property is there.
fn conforms(doc: &Value, schema: &str, answer: &Value) {
    let schema_doc = &doc["components"]["schemas"][schema];
    let properties = schema_doc["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{schema} in the document"));
    let answer = answer.as_object().unwrap();
    for key in answer.keys() {
        assert!(properties.contains_key(key), "{schema} lacks `{key}`");
    }
    for required in schema_doc["required"].as_array().into_iter().flatten() {
        let required = required.as_str().unwrap();
        assert!(
            answer.contains_key(required),
            "{schema} answer lacks `{required}`"
        );
    }
}

#[tokio::test]
async fn the_openapi_document_is_served_and_describes_real_answers() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let sku = unique_sku("openapi");
    let defined = app
        .create_sku(
            &sku,
            json!({"stock": 1, "starts_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    conforms(&doc, "SkuView", &defined);
    let (status, held) = app.reserve(&sku, "oa-user", "k1", 1).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    conforms(&doc, "ReservationView", &held);
    let id = held["reservation_id"].as_str().unwrap();
    let (status, paying) = app.payment_pending(id, "pay-1").await;
    assert_eq!(status, StatusCode::OK, "{paying}");
    conforms(&doc, "ReservationView", &paying);
    let (status, sold_out) = app.reserve(&sku, "oa-other", "k2", 1).await;
    assert_eq!(status, StatusCode::CONFLICT);
    conforms(&doc, "Problem", &sold_out);
    let (status, confirmed) = app.confirm(id, "pay-1").await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    let (status, refund) = app.confirm(id, "pay-2").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refund}");
    assert_eq!(refund["refund_required"], true);
    conforms(&doc, "Problem", &refund);
    let compensations = app.compensations(&format!("sku={sku}")).await;
    assert_eq!(compensations.len(), 1);
    conforms(&doc, "CompensationView", &compensations[0]);

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
        metrics.contains(r#"flashgate_requests_total{route="/openapi.json",outcome="ok"}"#),
        "the document's route has its own metrics label"
    );
}

/// `buckets` (contract v1.1): 1..=16, a whole number; anything else is a 400 problem
/// that defines nothing.
#[tokio::test]
async fn a_sku_with_buckets_out_of_range_is_refused_and_defines_nothing() {
    let app = spawn_app().await;
    let sku = unique_sku("buckets");
    for buckets in [
        json!(0),
        json!(17),
        json!(-1),
        json!(1.5),
        json!("2"),
        json!(null),
    ] {
        let (status, problem) = app
            .put_sku(&sku, json!({ "stock": 10, "buckets": buckets }))
            .await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{buckets}: {problem}"
        );
    }
    let status = app
        .client
        .get(app.url(&format!("/v1/skus/{sku}")))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a refused PUT defined nothing"
    );
    let (status, view) = app
        .put_sku(&sku, json!({ "stock": 10, "buckets": 16 }))
        .await;
    assert!(status.is_success(), "{view}");
    assert_eq!(view["stock_total"], 10);
}
