//! Connection deadlines, the connection cap and the shutdown grace, with real stalled
//! TCP clients (raw sockets: an HTTP client library would never misbehave this way).

use crate::common::*;
use flashgate::config::{ConnectionSettings, ServeArgs};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Longest we wait for anything the server should do "at once" or at a short deadline.
const PATIENCE: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    run: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn args(connections: ConnectionSettings) -> ServeArgs {
    ServeArgs {
        connections,
        ..serve_args(&redis_url(), &database_url())
    }
}

async fn start(args: ServeArgs) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(flashgate::server::run(listener, args, stopped));
    // Ready when it answers.
    let client = crate::common::client();
    let started = Instant::now();
    while client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(started.elapsed() < PATIENCE, "the server did not come up");
        tokio::task::yield_now().await;
    }
    Server { addr, stop, run }
}

/// Reads until the server closes the connection (EOF or reset); returns what came
/// and how long it took. Panics if it stays open past `PATIENCE`.
async fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout_at((started + PATIENCE).into(), stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "still open after {PATIENCE:?}; received {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (received, started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one whole answer (head and Content-Length body) from a kept-alive connection.
async fn one_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before a whole answer: {received:?}");
        received.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&received).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                let status = text[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + length].to_owned());
            }
        }
    }
}

/// Status, problem body, and the head of a whole answer text.
fn problem(answer: &[u8]) -> (u16, Value, String) {
    let text = String::from_utf8_lossy(answer).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {text:?}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{text}"));
    (text[9..12].parse().unwrap(), body, head.to_owned())
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

/// A connection whose request is being answered: its body never comes. Returns once
/// the server asked for the body (`100 Continue`), so the request is surely in flight.
async fn stalled_body(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"PUT /v1/admin/skus/x HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Expect: 100-continue\r\nContent-Length: 20\r\n\r\n",
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 256];
    while !received.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("100 Continue in time")
            .unwrap();
        assert!(n > 0, "closed: {received:?}");
        received.extend_from_slice(&chunk[..n]);
    }
    assert!(received.starts_with(b"HTTP/1.1 100 "), "{received:?}");
    stream
}

async fn kept_alive(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    assert_eq!(one_answer(&mut stream).await.0, 200);
    stream
}

#[tokio::test]
async fn a_silent_or_trickling_head_is_closed_at_the_head_deadline() {
    let server = start(args(ConnectionSettings {
        head_timeout_ms: 300,
        ..ConnectionSettings::default()
    }))
    .await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(b"POST /v1/skus/x/reservations HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    for stream in [&mut silent, &mut partial] {
        let (received, took) = until_closed(stream).await;
        assert!(received.is_empty(), "{received:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_past_the_head_deadline_then_closes() {
    let server = start(args(ConnectionSettings {
        head_timeout_ms: 200,
        idle_timeout_ms: 1500,
        ..ConnectionSettings::default()
    }))
    .await;
    let mut stream = kept_alive(server.addr).await;
    let idle_since = Instant::now();
    // Still open well past the head deadline: idle is not head.
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(700), stream.read(&mut byte)).await;
    assert!(early.is_err(), "closed early: {early:?}");
    // And a request on it is still served.
    stream.write_all(HEALTHZ).await.unwrap();
    assert_eq!(one_answer(&mut stream).await.0, 200);
    let idle_since_last = Instant::now();
    let (received, _) = until_closed(&mut stream).await;
    assert!(received.is_empty());
    let idle = idle_since_last.elapsed();
    assert!(
        idle >= Duration::from_millis(1200) && idle < Duration::from_secs(4),
        "closed after {idle:?} idle (first idle {:?} ago)",
        idle_since.elapsed()
    );
}

#[tokio::test]
async fn a_head_begun_on_a_kept_alive_connection_has_the_head_deadline_not_the_idle_one() {
    let server = start(args(ConnectionSettings {
        head_timeout_ms: 300,
        idle_timeout_ms: 20_000,
        ..ConnectionSettings::default()
    }))
    .await;
    let mut stream = kept_alive(server.addr).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let (received, took) = until_closed(&mut stream).await;
    assert!(received.is_empty(), "{received:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_the_connection_closes() {
    let server = start(args(ConnectionSettings {
        body_timeout_ms: 300,
        ..ConnectionSettings::default()
    }))
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/skus/stalled/reservations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Idempotency-Key: k1\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n",
        user_token("slow")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (received, took) = until_closed(&mut stream).await;
    let (status, body, head) = problem(&received);
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("request_timeout"))
    );
    assert!(head.to_ascii_lowercase().contains("connection: close"));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let server = start(args(ConnectionSettings::default())).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"PUT /v1/admin/skus/big HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Content-Length: 10000000\r\n\r\n",
        )
        .await
        .unwrap();
    // The body deadline is 10 s: an answer well before it was not waiting for the body.
    let (received, took) = until_closed(&mut stream).await;
    let (status, body, _) = problem(&received);
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_closed_at_the_write_deadline() {
    let server = start(args(ConnectionSettings {
        write_timeout_ms: 300,
        ..ConnectionSettings::default()
    }))
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (_read_half, mut write_half) = stream.into_split();
    // Pipelined requests, never read: the server's answers back up until it gives up.
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let batch = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".repeat(64);
        loop {
            if let Err(e) = write_half.write_all(&batch).await {
                return e;
            }
        }
    });
    let error = tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("the connection is closed at the write deadline")
        .unwrap();
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{error:?} after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_cap_closes_the_oldest_idle_connections_first() {
    let server = start(args(ConnectionSettings {
        max_connections: 4,
        ..ConnectionSettings::default()
    }))
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(kept_alive(server.addr).await);
    }
    // Two more: each one pushes out the connection idle for longest.
    let mut newer = Vec::new();
    for _ in 0..2 {
        newer.push(kept_alive(server.addr).await);
    }
    for oldest in &mut idle[..2] {
        let (received, took) = until_closed(oldest).await;
        assert!(received.is_empty(), "{received:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    // The two younger idle ones and the new ones are still served.
    for stream in idle[2..].iter_mut().chain(newer.iter_mut()) {
        stream.write_all(HEALTHZ).await.unwrap();
        assert_eq!(one_answer(stream).await.0, 200);
    }
}

#[tokio::test]
async fn a_full_server_with_nothing_idle_refuses_a_new_connection_at_once() {
    let server = start(args(ConnectionSettings {
        max_connections: 2,
        ..ConnectionSettings::default()
    }))
    .await;
    // Two requests in flight (bodies that do not come): nothing to close for a third.
    let busy = [
        stalled_body(server.addr).await,
        stalled_body(server.addr).await,
    ];
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let (received, took) = until_closed(&mut third).await;
    let (status, body, head) = problem(&received);
    assert_eq!((status, body["code"].as_str()), (503, Some("overloaded")));
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"));
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(busy);
    let client = crate::common::client();
    // Once they are gone, new connections are served again.
    let started = Instant::now();
    loop {
        match client
            .get(format!("http://{}/healthz", server.addr))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break,
            other => {
                assert!(started.elapsed() < PATIENCE, "{other:?}");
                tokio::task::yield_now().await;
            }
        }
    }
}

#[tokio::test]
async fn real_requests_are_served_while_stalled_connections_flood_the_server() {
    let server = start(args(ConnectionSettings {
        max_connections: 64,
        ..ConnectionSettings::default()
    }))
    .await;
    let sku = unique_sku("flood");
    let app_client = crate::common::client();
    let base = format!("http://{}", server.addr);
    let response = app_client
        .put(format!("{base}/v1/admin/skus/{sku}"))
        .bearer_auth(SERVICE_TOKEN)
        .json(&serde_json::json!({"stock": 100, "per_user_limit": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // 300 attackers: silent, trickling a head, or stalling a body (those hold a
    // request open; keep them below the cap so that something can be closed).
    let mut attackers = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        match i % 10 {
            0 => {
                let _ = stream
                    .write_all(
                        b"PUT /v1/admin/skus/x HTTP/1.1\r\nHost: t\r\n\
                          Content-Type: application/json\r\nContent-Length: 99\r\n\r\n",
                    )
                    .await;
            }
            1..=4 => {
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHo").await;
            }
            _ => {}
        }
        attackers.push(stream);
    }
    for i in 0..20 {
        let started = Instant::now();
        let response = app_client
            .post(format!("{base}/v1/skus/{sku}/reservations"))
            .bearer_auth(user_token("flood-user"))
            .header("Idempotency-Key", format!("flood-{i}"))
            .json(&serde_json::json!({"quantity": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "request {i}");
        assert!(started.elapsed() < Duration::from_secs(2), "request {i}");
    }
    drop(attackers);
}

#[tokio::test]
async fn shutdown_completes_within_the_grace_whatever_the_clients_do() {
    let grace = Duration::from_secs(1);
    let mut settings = ConnectionSettings {
        shutdown_grace_seconds: 1,
        ..ConnectionSettings::default()
    };
    settings.max_connections = 100;
    let server = start(args(settings)).await;
    // A body that never comes (a request in flight), a trickled head, an idle
    // keep-alive connection, and a silent one.
    let mut in_flight = stalled_body(server.addr).await;
    let mut trickled = TcpStream::connect(server.addr).await.unwrap();
    trickled.write_all(b"GET /heal").await.unwrap();
    let mut idle = kept_alive(server.addr).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();

    let mut server = server;
    let asked = Instant::now();
    server.stop.send(true).unwrap();
    let run = tokio::time::timeout(grace + Duration::from_secs(2), &mut server.run).await;
    let took = asked.elapsed();
    assert!(
        matches!(run, Ok(Ok(Ok(())))),
        "run did not finish within the grace: {took:?}"
    );
    for stream in [&mut in_flight, &mut trickled, &mut idle, &mut silent] {
        until_closed(stream).await;
    }
}
