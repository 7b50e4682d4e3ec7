//! A lean HTTP/1.1 client for one gateway, written for the load phases: the harness
//! shares the machine's cores with the gateway and Redis, so every microsecond it
//! spends per request is taken from what it measures. A request is formatted straight
//! into one buffer and written with one call; the answer is read into a per-connection
//! buffer and parsed with `httparse` in the same task (no connection task, no channel,
//! no header map). Keep-alive connections are kept in a stack (a closed-loop client
//! finds the one it just gave back; the pool grows to the concurrency and no further),
//! Nagle off. A request that fails or times out drops its connection; the next one
//! dials a new one. No pipelining: one request in flight per connection, as a browser
//! or an app sends them.

use anyhow::{anyhow, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
pub use http::Method;
use http::StatusCode;
use serde::Deserialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::Target;

/// Response headers read at most; the gateway sends about ten.
const MAX_RESPONSE_HEADERS: usize = 32;
/// A connection idle longer than this is checked before reuse: servers close idle
/// keep-alive connections (the gateway after 30 s). Busy ones skip the syscall.
const CHECK_IF_IDLE_FOR: Duration = Duration::from_secs(1);
/// A response head larger than this is not a gateway's.
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;

struct Connection {
    stream: TcpStream,
    /// When it was last given back to the pool.
    idle_since: Instant,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// The request being written (reused).
    write: Vec<u8>,
}

pub struct Client {
    addr: SocketAddr,
    authority: String,
    prefix: String,
    service_token: String,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    /// Connections dialled so far.
    pub opened: AtomicU64,
}

/// What a request came back with. `status` 0 is a transport error or timeout
/// (`error` says which); the body is kept raw and parsed on demand.
pub struct Answer {
    pub status: u16,
    pub replayed: bool,
    /// The answer carried a `Retry-After` header (429 and 503 refusals must).
    pub retry_after: bool,
    pub body: Bytes,
    pub error: Option<&'static str>,
}

/// The fields of a reservation view or a problem the harness looks at.
#[derive(Debug, Default, Deserialize)]
pub struct Fields {
    #[serde(default)]
    pub reservation_id: Option<String>,
    #[serde(default)]
    pub status: Option<StatusField>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub refund_required: Option<bool>,
    #[serde(default)]
    pub compensation_id: Option<String>,
}

/// `status` is a string in a reservation view and a number in a problem.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StatusField {
    Text(String),
    Number(#[allow(dead_code)] u16),
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct SkuView {
    pub sku: String,
    pub stock_total: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    pub per_user_limit: u64,
    pub hold_seconds: u64,
}

impl Answer {
    pub fn fields(&self) -> Fields {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The reservation state in a 2xx view.
    pub fn state(fields: &Fields) -> Option<&str> {
        match &fields.status {
            Some(StatusField::Text(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn is_transport_error(&self) -> bool {
        self.status == 0
    }

    pub fn text(&self) -> String {
        match self.error {
            Some(e) => format!("transport error: {e}"),
            None => format!(
                "{} {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            ),
        }
    }
}

pub enum Auth<'a> {
    None,
    Service,
    Bearer(&'a str),
}

impl Client {
    pub async fn new(target: &Target, service_token: &str, timeout: Duration) -> Result<Client> {
        let addr = tokio::net::lookup_host(&target.authority)
            .await
            .with_context(|| format!("resolving {}", target.authority))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", target.authority))?;
        if !is_header_value(service_token) {
            return Err(anyhow!("the service token is not a valid header value"));
        }
        Ok(Client {
            addr,
            authority: target.authority.clone(),
            prefix: target.prefix.clone(),
            service_token: service_token.to_string(),
            timeout,
            idle: Mutex::new(Vec::new()),
            opened: AtomicU64::new(0),
        })
    }

    /// Where requests go: the address, the Host header, the path prefix (for the
    /// streams of src/sse.rs, which hold a connection of their own).
    pub fn target(&self) -> (SocketAddr, &str, &str) {
        (self.addr, &self.authority, &self.prefix)
    }

    async fn connect(&self) -> Result<Connection, &'static str> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let stream = TcpStream::connect(self.addr).await.map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            idle_since: Instant::now(),
            read: BytesMut::with_capacity(4096),
            write: Vec::with_capacity(1024),
        })
    }

    async fn checkout(&self) -> Result<Connection, &'static str> {
        loop {
            let idle = self.idle.lock().unwrap().pop();
            match idle {
                Some(connection) if connection.is_reusable() => return Ok(connection),
                Some(_) => continue,
                None => return self.connect().await,
            }
        }
    }

    /// Opens connections ahead of the load, so that the first second does not measure
    /// TCP handshakes.
    pub async fn prewarm(&self, connections: usize) {
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            match self.connect().await {
                Ok(connection) => opened.push(connection),
                Err(_) => break,
            }
        }
        self.idle.lock().unwrap().extend(opened);
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        idempotency_key: Option<&str>,
        body: Option<Bytes>,
    ) -> Answer {
        self.send_with(method, path, auth, idempotency_key, None, body)
            .await
    }

    /// `send` with one more header (`(name, value)`), e.g. a reserve's `Admission-Token`.
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        idempotency_key: Option<&str>,
        header: Option<(&str, &str)>,
        body: Option<Bytes>,
    ) -> Answer {
        match tokio::time::timeout(
            self.timeout,
            self.exchange(method, path, auth, idempotency_key, header, body),
        )
        .await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => Answer::failed(error),
            Err(_) => Answer::failed("timeout"),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        idempotency_key: Option<&str>,
        header: Option<(&str, &str)>,
        body: Option<Bytes>,
    ) -> Result<Answer, &'static str> {
        let token = match auth {
            Auth::None => None,
            Auth::Service => Some(self.service_token.as_str()),
            Auth::Bearer(token) => Some(token),
        };
        if !token.is_none_or(is_header_value)
            || !idempotency_key.is_none_or(is_header_value)
            || !header.is_none_or(|(name, value)| {
                !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && is_header_value(value)
            })
        {
            return Err("header");
        }
        let mut connection = self.checkout().await?;
        let request = &mut connection.write;
        request.clear();
        let _ = write!(
            request,
            "{method} {}{path} HTTP/1.1\r\nhost: {}\r\n",
            self.prefix, self.authority
        );
        if let Some(token) = token {
            let _ = write!(request, "authorization: Bearer {token}\r\n");
        }
        if let Some(key) = idempotency_key {
            let _ = write!(request, "idempotency-key: {key}\r\n");
        }
        if let Some((name, value)) = header {
            let _ = write!(request, "{name}: {value}\r\n");
        }
        match &body {
            Some(body) => {
                let _ = write!(
                    request,
                    "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                request.extend_from_slice(body);
            }
            None if method == Method::GET => request.extend_from_slice(b"\r\n"),
            None => request.extend_from_slice(b"content-length: 0\r\n\r\n"),
        }
        connection
            .stream
            .write_all(&connection.write)
            .await
            .map_err(|_| "send")?;
        let (answer, keep_alive) = read_response(&mut connection).await?;
        if keep_alive {
            connection.idle_since = Instant::now();
            self.idle.lock().unwrap().push(connection);
        }
        Ok(answer)
    }

    pub async fn get_sku(&self, sku: &str) -> Result<SkuView> {
        let answer = self
            .send(
                Method::GET,
                &format!("/v1/skus/{sku}"),
                Auth::None,
                None,
                None,
            )
            .await;
        if answer.status != StatusCode::OK.as_u16() {
            return Err(anyhow!("GET /v1/skus/{sku}: {}", answer.text()));
        }
        serde_json::from_slice(&answer.body)
            .with_context(|| format!("GET /v1/skus/{sku}: bad body"))
    }

    pub async fn define_sku(&self, sku: &str, body: serde_json::Value) -> Result<SkuView> {
        let answer = self
            .send(
                Method::PUT,
                &format!("/v1/admin/skus/{sku}"),
                Auth::Service,
                None,
                Some(Bytes::from(body.to_string())),
            )
            .await;
        if answer.status != StatusCode::OK.as_u16() {
            return Err(anyhow!("PUT /v1/admin/skus/{sku}: {}", answer.text()));
        }
        serde_json::from_slice(&answer.body)
            .with_context(|| format!("PUT /v1/admin/skus/{sku}: bad body"))
    }

    /// The outbox backlog /readyz reports (None when it is not reported).
    pub async fn outbox_backlog(&self) -> Result<Option<u64>> {
        let answer = self
            .send(Method::GET, "/readyz", Auth::None, None, None)
            .await;
        if answer.is_transport_error() {
            return Err(anyhow!("GET /readyz: {}", answer.text()));
        }
        let value: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        Ok(value.get("outbox_backlog").and_then(|v| v.as_u64()))
    }
}

impl Connection {
    /// False when the server closed it (or sent something unasked) while it was idle.
    fn is_reusable(&self) -> bool {
        if self.idle_since.elapsed() < CHECK_IF_IDLE_FOR {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Reads one response off the connection: its status, the headers the harness looks
/// at, and the body (Content-Length or chunked). Returns whether the connection may
/// be reused.
async fn read_response(connection: &mut Connection) -> Result<(Answer, bool), &'static str> {
    let (status, replayed, retry_after, keep_alive, framing, head_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&connection.read) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.ok_or("status")?;
                let mut replayed = false;
                let mut retry_after = false;
                let mut keep_alive = response.version == Some(1);
                let mut framing = Framing::UntilClose;
                for header in response.headers.iter() {
                    let name = header.name;
                    if name.eq_ignore_ascii_case("content-length") {
                        let length = std::str::from_utf8(header.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or("content-length")?;
                        framing = Framing::Length(length);
                    } else if name.eq_ignore_ascii_case("transfer-encoding") {
                        if header.value.eq_ignore_ascii_case(b"chunked") {
                            framing = Framing::Chunked;
                        }
                    } else if name.eq_ignore_ascii_case("idempotent-replayed") {
                        replayed = header.value == b"true";
                    } else if name.eq_ignore_ascii_case("connection") {
                        keep_alive = !header.value.eq_ignore_ascii_case(b"close");
                    } else if name.eq_ignore_ascii_case("retry-after") {
                        retry_after = true;
                    }
                }
                // Informational answers (100 Continue) carry no body: skip them.
                if (100..200).contains(&status) {
                    connection.read.advance(head_len);
                    continue;
                }
                break (status, replayed, retry_after, keep_alive, framing, head_len);
            }
            Ok(httparse::Status::Partial) => {
                if connection.read.len() > MAX_RESPONSE_HEAD_BYTES {
                    return Err("response head too large");
                }
                fill(connection).await?;
            }
            Err(_) => return Err("bad response"),
        }
    };
    connection.read.advance(head_len);
    let body = match framing {
        Framing::Length(length) => {
            while connection.read.len() < length {
                fill(connection).await?;
            }
            connection.read.split_to(length).freeze()
        }
        Framing::Chunked => read_chunked(connection).await?,
        Framing::UntilClose => {
            while fill(connection).await.is_ok() {}
            let body = connection.read.split().freeze();
            return Ok((Answer::ok(status, replayed, retry_after, body), false));
        }
    };
    Ok((Answer::ok(status, replayed, retry_after, body), keep_alive))
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads more bytes into the connection's buffer; an end of stream is an error.
async fn fill(connection: &mut Connection) -> Result<(), &'static str> {
    if connection.read.capacity() - connection.read.len() < 1024 {
        connection.read.reserve(4096);
    }
    match connection.stream.read_buf(&mut connection.read).await {
        Ok(0) => Err("connection closed"),
        Ok(_) => Ok(()),
        Err(_) => Err("receive"),
    }
}

/// A chunked body: `<hex size>[;ext]\r\n<data>\r\n` ... `0\r\n[trailers]\r\n`.
async fn read_chunked(connection: &mut Connection) -> Result<Bytes, &'static str> {
    let mut body = BytesMut::new();
    loop {
        let line_end = loop {
            if let Some(at) = connection.read.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            fill(connection).await?;
        };
        let line = std::str::from_utf8(&connection.read[..line_end]).map_err(|_| "chunk")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "chunk size")?;
        connection.read.advance(line_end + 2);
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                if let Some(at) = connection.read.windows(2).position(|w| w == b"\r\n") {
                    connection.read.advance(at + 2);
                    if at == 0 {
                        return Ok(body.freeze());
                    }
                } else {
                    fill(connection).await?;
                }
            }
        }
        while connection.read.len() < size + 2 {
            fill(connection).await?;
        }
        body.extend_from_slice(&connection.read[..size]);
        connection.read.advance(size + 2);
    }
}

/// Visible ASCII and spaces: what may go into a header line as is.
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

impl Answer {
    fn ok(status: u16, replayed: bool, retry_after: bool, body: Bytes) -> Answer {
        Answer {
            status,
            replayed,
            retry_after,
            body,
            error: None,
        }
    }

    fn failed(error: &'static str) -> Answer {
        Answer {
            status: 0,
            replayed: false,
            retry_after: false,
            body: Bytes::new(),
            error: Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each request with the next canned response, written in
    /// small pieces so that the parser sees partial heads and bodies.
    async fn canned(responses: Vec<&'static [u8]>) -> Client {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            for response in responses {
                let _ = stream.read(&mut buf).await.unwrap();
                for piece in response.chunks(7) {
                    stream.write_all(piece).await.unwrap();
                    stream.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        let target = Target {
            authority: addr.to_string(),
            port: addr.port(),
            prefix: String::new(),
        };
        Client::new(&target, "svc", Duration::from_secs(5))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn reads_length_and_chunked_bodies_on_one_connection() {
        let client = canned(vec![
            b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\nidempotent-replayed: true\r\n\r\nhello",
            b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\nRetry-After: 1\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nrest of it",
        ])
        .await;
        let first = client
            .send(Method::POST, "/a", Auth::Service, Some("k"), None)
            .await;
        assert_eq!(
            (first.status, first.replayed, first.retry_after),
            (201, true, false)
        );
        assert_eq!(&first.body[..], b"hello");
        let second = client.send(Method::GET, "/b", Auth::None, None, None).await;
        assert_eq!(
            (second.status, second.replayed, second.retry_after),
            (409, false, true)
        );
        assert_eq!(&second.body[..], b"abcde");
        let third = client.send(Method::GET, "/c", Auth::None, None, None).await;
        assert_eq!(third.status, 200);
        assert_eq!(&third.body[..], b"rest of it");
        assert_eq!(
            client.opened.load(Ordering::Relaxed),
            1,
            "keep-alive reused the connection"
        );
        assert!(client.idle.lock().unwrap().is_empty(), "closed: not reused");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // The first connection answers once and is closed, the second answers.
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.unwrap();
                let _ = stream.read(&mut buf).await.unwrap();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        });
        let target = Target {
            authority: addr.to_string(),
            port: addr.port(),
            prefix: String::new(),
        };
        let client = Client::new(&target, "svc", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            client
                .send(Method::GET, "/", Auth::None, None, None)
                .await
                .status,
            200
        );
        // Make the pooled connection look long idle; the server has closed it by now.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.idle.lock().unwrap()[0].idle_since -= CHECK_IF_IDLE_FOR;
        let again = client.send(Method::GET, "/", Auth::None, None, None).await;
        assert_eq!((again.status, again.error), (200, None));
        assert_eq!(client.opened.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_header_value_with_a_line_break_is_refused_before_sending() {
        let client = canned(vec![]).await;
        let answer = client
            .send(Method::GET, "/", Auth::Bearer("a\r\nb"), None, None)
            .await;
        assert_eq!((answer.status, answer.error), (0, Some("header")));
    }
}
