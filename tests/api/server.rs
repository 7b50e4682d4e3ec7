//! The HTTP server itself: keep-alive, and a clean stop.

use crate::common::*;
use reqwest::StatusCode;
use std::time::Duration;
use tokio::sync::watch;

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_idle_keep_alive_connections() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(flashgate::server::run(
        listener,
        serve_args(&redis_url(), &database_url()),
        stopped,
    ));
    let client = crate::common::client();
    let url = format!("http://{addr}/healthz");
    for _ in 0..3 {
        // Several requests on one kept-alive connection; it stays open afterwards.
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    stop.send(true).unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(
        matches!(finished, Ok(Ok(Ok(())))),
        "the server stops although a keep-alive connection was idle: {finished:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after the stop"
    );
}
