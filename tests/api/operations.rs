//! Operations: the request id on every answer, and `/metrics` on its own listener.

use crate::common::*;
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn every_answer_carries_a_request_id_taken_or_made() {
    let app = spawn_app().await;
    let taken = app
        .client
        .get(app.url("/v1/skus/no-such-sku"))
        .header("x-request-id", "lb-7f3a.1")
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), StatusCode::NOT_FOUND);
    assert_eq!(taken.headers()["x-request-id"], "lb-7f3a.1");
    let mut seen = std::collections::HashSet::new();
    for request in [
        app.client.get(app.url("/healthz")),
        app.client.get(app.url("/no/such/route")),
        app.client
            .get(app.url("/healthz"))
            .header("x-request-id", "has space"),
        app.client
            .get(app.url("/healthz"))
            .header("x-request-id", "x".repeat(129)),
    ] {
        let response = request.send().await.unwrap();
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 32, "made here: {id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert!(seen.insert(id), "ids are not reused");
    }
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    // A free port for the metrics listener (the server binds it by address).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(flashgate::config::ServeArgs {
        metrics_listen: Some(format!("127.0.0.1:{port}")),
        ..serve_args(&redis_url(), &database_url())
    })
    .await;
    let (status, problem) = body(app.client.get(app.url("/metrics")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    assert_eq!(problem["code"], "not_found");
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "the public port still serves"
    );
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let mut scraped = None;
    for _ in 0..100 {
        if let Ok(response) = app.client.get(&metrics_url).send().await {
            scraped = Some(response);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let scraped = scraped.expect("the metrics listener answers");
    assert_eq!(scraped.status(), StatusCode::OK);
    let text = scraped.text().await.unwrap();
    assert!(
        text.contains("flashgate_requests_total"),
        "the gateway's metrics: {text}"
    );
    let (status, _): (StatusCode, Value) = body(
        app.client
            .get(format!("http://127.0.0.1:{port}/v1/skus/x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "only metrics there");
}

/// Every metric name the code emits has a row in the metrics table of docs/monitoring.md.
#[test]
fn every_metric_is_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/monitoring.md")).unwrap();
    let mut names = std::collections::BTreeSet::new();
    let mut sources = vec![root.join("src")];
    while let Some(path) = sources.pop() {
        if path.is_dir() {
            sources.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        for piece in source.split("\"flashgate_").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if piece[name.len()..].starts_with('"') {
                names.insert(format!("flashgate_{name}"));
            }
        }
    }
    assert!(names.len() >= 15, "found the metrics: {names:?}");
    for name in names {
        assert!(
            doc.contains(&format!("| `{name}` |")),
            "{name} has no row in docs/monitoring.md's metrics table"
        );
    }
}
