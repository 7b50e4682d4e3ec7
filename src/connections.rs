//! The HTTP/1.1 connections: every one has deadlines (head, idle keep-alive, answer
//! write; the body deadline is the HTTP edge's) and their number is capped. Knows
//! nothing of routes; never reads or answers a request itself, except hyper's own
//! bodiless refusals (400, 414, 431), which it rewrites as problem+json.
//!
//! Each connection runs in one task: hyper's connection future, raced against a
//! watchdog that reads the connection's phase (kept by the IO wrapper and the
//! service wrapper below) and drops the connection at its deadline.

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::ConnectionLimits;
use crate::{http, limits};

const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Where a connection is between requests; packed with the time it got there.
const PHASE_IDLE: u64 = 0; // waiting for the first byte of a next request
const PHASE_HEAD: u64 = 1; // connected, or a head has begun: head deadline
const PHASE_BUSY: u64 = 2; // a request is being answered: no read deadline here

/// Milliseconds since the server started; one clock for every connection.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_ms(self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    fn instant(self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// What the watchdog, the IO wrapper and the registry share about one connection.
struct Tracker {
    /// `since_ms << 2 | phase`, in one word so that no reader sees a phase with the
    /// time of another.
    phase: AtomicU64,
    /// When a write last found the socket full, plus one; 0 while writes progress.
    write_blocked: AtomicU64,
    /// Set by the registry to close the connection (the cap evicts it).
    close: Notify,
}

impl Tracker {
    fn new(now_ms: u64) -> Tracker {
        Tracker {
            phase: AtomicU64::new((now_ms << 2) | PHASE_HEAD),
            write_blocked: AtomicU64::new(0),
            close: Notify::new(),
        }
    }

    fn phase(&self) -> (u64, u64) {
        let packed = self.phase.load(Ordering::Relaxed);
        (packed & 3, packed >> 2)
    }

    fn set_phase(&self, phase: u64, now_ms: u64) {
        self.phase.store((now_ms << 2) | phase, Ordering::Relaxed);
    }

    /// Bytes arrived: an idle connection now has a head under way.
    fn on_read(&self, clock: Clock) {
        if self.phase().0 == PHASE_IDLE {
            self.set_phase(PHASE_HEAD, clock.now_ms());
        }
    }

    fn on_write(&self, clock: Clock, progressed: bool) {
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if progressed && blocked != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        } else if !progressed && blocked == 0 {
            self.write_blocked
                .store(clock.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// The earliest deadline of the connection now, in clock milliseconds.
    fn deadline_ms(&self, limits: &ConnectionLimits) -> Option<u64> {
        let (phase, since) = self.phase();
        let read = match phase {
            PHASE_IDLE => Some(since + limits.idle_timeout.as_millis() as u64),
            PHASE_HEAD => Some(since + limits.head_timeout.as_millis() as u64),
            _ => None,
        };
        let write = match self.write_blocked.load(Ordering::Relaxed) {
            0 => None,
            blocked => Some(blocked - 1 + limits.write_timeout.as_millis() as u64),
        };
        match (read, write) {
            (Some(r), Some(w)) => Some(r.min(w)),
            (r, w) => r.or(w),
        }
    }

    /// Idle for the cap: no request being answered, no answer waiting on the client.
    /// Returns since when.
    fn idle_since(&self) -> Option<u64> {
        let (phase, since) = self.phase();
        (phase != PHASE_BUSY && self.write_blocked.load(Ordering::Relaxed) == 0).then_some(since)
    }
}

/// The open connections, for the cap.
struct Registry {
    open: Mutex<HashMap<u64, Arc<Tracker>>>,
    max: usize,
}

impl Registry {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().expect("registry lock").len()
    }

    fn insert(&self, id: u64, tracker: Arc<Tracker>) {
        self.open.lock().expect("registry lock").insert(id, tracker);
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("registry lock").remove(&id);
    }

    /// Makes room for one more connection: true when there is room, after closing the
    /// connection idle for longest if the cap is reached; false when every open
    /// connection is busy. A closed one leaves the registry at once (its socket a
    /// moment later, when its task sees the notice).
    fn make_room(&self) -> bool {
        let mut open = self.open.lock().expect("registry lock");
        if open.len() < self.max {
            return true;
        }
        let oldest = open
            .iter()
            .filter_map(|(id, t)| t.idle_since().map(|since| (since, *id)))
            .min();
        match oldest {
            Some((_, id)) => {
                if let Some(tracker) = open.remove(&id) {
                    tracker.close.notify_one();
                }
                true
            }
            None => false,
        }
    }
}

/// Binds the HTTP listener with a deep accept queue: a flash sale opens thousands of
/// connections at once, and with the usual 128 the kernel drops SYNs that then wait
/// a 1 s retransmit.
pub async fn bind(address: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for address in tokio::net::lookup_host(address).await? {
        let socket = match address {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(address) {
            Ok(()) => return socket.listen(limits::LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address")))
}

/// Serves `router` on `listener` until `shutdown` turns true; then stops accepting,
/// lets in-flight requests finish and drops whatever is still open after the grace.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    shutdown: watch::Receiver<bool>,
) {
    warn_if_fd_limit_below(limits.max_connections);
    let clock = Clock(Instant::now());
    let registry = Arc::new(Registry {
        open: Mutex::new(HashMap::new()),
        max: limits.max_connections,
    });
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut stop = shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            // The guard wait_for returns is not Send: drop it inside.
            () = async { drop(stop.wait_for(|stop| *stop).await) } => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept:
                    // pause instead of spinning; the listener itself stays good.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        if !registry.make_room() {
            refuse(&stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let tracker = Arc::new(Tracker::new(clock.now_ms()));
        registry.insert(next_id, tracker.clone());
        metrics::gauge!("flashgate_http_connections_open").increment(1.0);
        tasks.spawn(connection(
            stream,
            peer,
            router.clone(),
            Watch {
                id: next_id,
                tracker,
                clock,
                limits,
                registry: registry.clone(),
            },
            shutdown.clone(),
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            grace_seconds = limits.shutdown_grace.as_secs(),
            "shutdown grace over: dropping the remaining connections"
        );
        tasks.shutdown().await;
    }
}

/// File descriptors beyond the connections: Redis, MySQL, the listener, logs.
const FD_HEADROOM: u64 = 256;

/// The cap only protects the process if the fd limit is above it: say so at start.
fn warn_if_fd_limit_below(max_connections: usize) {
    // Linux: "Max open files   <soft>   <hard>   files".
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        });
    if let Some(soft) = soft {
        let needed = max_connections as u64 + FD_HEADROOM;
        if soft < needed {
            tracing::warn!(
                fd_limit = soft,
                max_connections,
                "the open-file limit is below FLASHGATE_MAX_CONNECTIONS plus {FD_HEADROOM}: \
                 raise `ulimit -n` to at least {needed} or lower the cap, or accepts will fail \
                 with EMFILE before the cap applies"
            );
        }
    }
}

/// Full and nothing idle: a short 503 if the socket takes it at once, then close.
/// Never waits on the client.
fn refuse(stream: &TcpStream) {
    // Rendered once: refusals come in floods.
    static REFUSAL: LazyLock<Vec<u8>> = LazyLock::new(|| {
        raw_problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many open connections; retry shortly",
            &[("retry-after", "1")],
        )
    });
    metrics::counter!("flashgate_http_connections_refused_total").increment(1);
    let _ = stream.try_write(&REFUSAL);
}

/// A whole HTTP/1.1 problem+json answer that closes the connection.
fn raw_problem(
    status: StatusCode,
    code: &'static str,
    detail: &str,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let body = http::problem_json(status, code, detail);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

struct Watch {
    id: u64,
    tracker: Arc<Tracker>,
    clock: Clock,
    limits: ConnectionLimits,
    registry: Arc<Registry>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        metrics::gauge!("flashgate_http_connections_open").decrement(1.0);
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    watch: Watch,
    mut shutdown: watch::Receiver<bool>,
) {
    let io = Watched {
        io: stream,
        tracker: watch.tracker.clone(),
        clock: watch.clock,
        rewrite: None,
    };
    let service = Tracked {
        router,
        peer: ConnectInfo(peer),
        tracker: watch.tracker.clone(),
        clock: watch.clock,
    };
    // Our watchdog keeps the head deadline: hyper's own timer would also run while a
    // keep-alive connection is idle.
    let connection = http1::Builder::new()
        .header_read_timeout(None)
        .max_buf_size(limits::HTTP_BUFFER_MAX_BYTES)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    // The watchdog wakes at least this often, so a phase change (which does not
    // wake it) never makes it miss a deadline.
    let check = watch
        .limits
        .head_timeout
        .min(watch.limits.idle_timeout)
        .min(watch.limits.write_timeout);
    let mut stopping = false;
    let outcome = loop {
        let now = watch.clock.now_ms();
        let deadline = watch.tracker.deadline_ms(&watch.limits);
        if deadline.is_some_and(|d| d <= now) {
            break "deadline";
        }
        let wake = deadline.map_or(now + check.as_millis() as u64, |d| {
            d.min(now + check.as_millis() as u64)
        });
        tokio::select! {
            _ = connection.as_mut() => break "closed",
            () = watch.tracker.close.notified() => break "evicted",
            () = tokio::time::sleep_until(watch.clock.instant(wake)) => {}
            () = async { drop(shutdown.wait_for(|stop| *stop).await) }, if !stopping => {
                // Idle connections close now; one in flight after its answer.
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if outcome != "closed" {
        metrics::counter!("flashgate_http_connections_closed_total", "reason" => outcome)
            .increment(1);
    }
}

// ---------------------------------------------------------------- service wrapper

/// Marks the connection busy from the request head until its answer's body is done,
/// and gives every request the peer address (axum's `ConnectInfo`).
#[derive(Clone)]
struct Tracked {
    router: axum::Router,
    peer: ConnectInfo<SocketAddr>,
    tracker: Arc<Tracker>,
    clock: Clock,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, mut request: Request<Incoming>) -> TrackedFuture {
        self.tracker.set_phase(PHASE_BUSY, self.clock.now_ms());
        request.extensions_mut().insert(self.peer);
        // axum's Router is always ready: no poll_ready needed before call.
        let mut router = self.router.clone();
        TrackedFuture {
            inner: router.call(request),
            done: Some(Done {
                tracker: self.tracker.clone(),
                clock: self.clock,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    struct TrackedFuture {
        #[pin]
        inner: axum::routing::future::RouteFuture<Infallible>,
        done: Option<Done>,
    }
}

impl Future for TrackedFuture {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let done = this.done.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, done })))
    }
}

/// Dropped when hyper has taken the whole answer body: the connection is idle again.
struct Done {
    tracker: Arc<Tracker>,
    clock: Clock,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.tracker.set_phase(PHASE_IDLE, self.clock.now_ms());
    }
}

struct TrackedBody {
    body: Body,
    done: Option<Done>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() {
            self.done = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// ---------------------------------------------------------------- IO wrapper

/// The socket as hyper sees it: records read and write progress for the watchdog,
/// and swaps hyper's own bodiless 400/414/431 answers for problem+json ones.
struct Watched {
    io: TcpStream,
    tracker: Arc<Tracker>,
    clock: Clock,
    /// A replacement answer still being written, and how much of it is out.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl Watched {
    fn poll_io_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.tracker.on_write(self.clock, result.is_ready());
        result
    }

    /// Writes out the rest of a replacement answer.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = self.rewrite.take() {
            if written == bytes.len() {
                break;
            }
            let result = {
                let result = Pin::new(&mut self.io).poll_write(cx, &bytes[written..]);
                self.tracker.on_write(self.clock, result.is_ready());
                result
            };
            match result {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.rewrite = Some((bytes, written + n)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.rewrite = Some((bytes, written));
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes over hyper's answer when it is one of its bodiless refusals.
    fn intercept(&mut self, cx: &mut Context<'_>, head: &[u8], len: usize) -> Option<usize> {
        let replacement = hyper_refusal(head)?;
        self.rewrite = Some((replacement, 0));
        // Whatever does not go out now goes out on hyper's flush or shutdown.
        let _ = self.poll_rewrite(cx);
        Some(len)
    }
}

/// hyper answers a head it cannot parse itself, with an empty body and no content
/// type: `HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n...`. Our own answers of
/// those statuses always have a problem+json body, so they never match.
fn hyper_refusal(head: &[u8]) -> Option<Vec<u8>> {
    let (status, code, detail) = match head.get(..13)? {
        b"HTTP/1.1 400 " => (
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "malformed HTTP request",
        ),
        b"HTTP/1.1 414 " => (
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "the request target is too long",
        ),
        b"HTTP/1.1 431 " => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_fields_too_large",
            "the request head is too large or has too many fields",
        ),
        _ => return None,
    };
    let empty = head.windows(20).any(|w| w == b"\r\ncontent-length: 0\r")
        && !head
            .windows(15)
            .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-type:"));
    empty.then(|| raw_problem(status, code, detail, &[]))
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.tracker.on_read(self.clock);
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_rewrite(cx))?;
        if let Some(n) = self.intercept(cx, buf, buf.len()) {
            return Poll::Ready(Ok(n));
        }
        self.poll_io_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_rewrite(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            let total = bufs.iter().map(|b| b.len()).sum();
            if let Some(n) = self.intercept(cx, first, total) {
                return Poll::Ready(Ok(n));
            }
        }
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.tracker.on_write(self.clock, result.is_ready());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_rewrite(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_rewrite(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            head_timeout: Duration::from_millis(100),
            body_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(200),
            max_connections: 2,
            shutdown_grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn deadlines_follow_the_phase() {
        let tracker = Tracker::new(1000);
        assert_eq!(tracker.deadline_ms(&limits()), Some(1100), "fresh: head");
        tracker.set_phase(PHASE_BUSY, 1050);
        assert_eq!(tracker.deadline_ms(&limits()), None, "busy: none");
        tracker.set_phase(PHASE_IDLE, 2000);
        assert_eq!(tracker.deadline_ms(&limits()), Some(2300), "idle");
        tracker.write_blocked.store(2001, Ordering::Relaxed);
        assert_eq!(tracker.deadline_ms(&limits()), Some(2200), "write stall");
        assert_eq!(tracker.idle_since(), None, "an answer still going out");
    }

    #[test]
    fn a_full_registry_closes_the_oldest_idle_connection() {
        let registry = Registry {
            open: Mutex::new(HashMap::new()),
            max: 2,
        };
        let older = Arc::new(Tracker::new(10));
        older.set_phase(PHASE_IDLE, 10);
        let busy = Arc::new(Tracker::new(5));
        busy.set_phase(PHASE_BUSY, 5);
        registry.insert(1, older.clone());
        registry.insert(2, busy.clone());
        assert!(registry.make_room());
        assert_eq!(registry.len(), 1);
        assert!(!registry.open.lock().unwrap().contains_key(&1));
        registry.insert(3, Arc::new(Tracker::new(20)));
        registry
            .open
            .lock()
            .unwrap()
            .get(&3)
            .unwrap()
            .set_phase(PHASE_BUSY, 20);
        assert!(!registry.make_room(), "every connection busy: refuse");
    }

    #[tokio::test]
    async fn bind_listens_on_the_address_given() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        assert!(connected.is_ok() && accepted.is_ok());
        assert!(bind("definitely-not-a-host.invalid:80").await.is_err());
    }

    #[test]
    fn only_hyper_bodiless_refusals_are_rewritten() {
        let hyper =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let rewritten = String::from_utf8(hyper_refusal(hyper).unwrap()).unwrap();
        assert!(rewritten.starts_with("HTTP/1.1 431 "));
        assert!(rewritten.contains("application/problem+json"));
        assert!(rewritten.contains(r#""code":"header_fields_too_large""#));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n";
        assert!(hyper_refusal(ours).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(hyper_refusal(ok).is_none());
    }
}
