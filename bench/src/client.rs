//! A lean HTTP/1.1 client for one gateway: keep-alive connections straight on hyper,
//! kept in a stack (a closed-loop client finds the connection it just gave back; the
//! pool grows to the concurrency and no further), Nagle off. A request that fails or
//! times out drops its connection; the next one dials a new one.

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;

use crate::cli::Target;

type Sender = SendRequest<Full<Bytes>>;

pub struct Client {
    addr: SocketAddr,
    host: HeaderValue,
    prefix: String,
    service_auth: HeaderValue,
    timeout: Duration,
    idle: Mutex<Vec<Sender>>,
    /// Connections dialled so far.
    pub opened: AtomicU64,
}

/// What a request came back with. `status` 0 is a transport error or timeout
/// (`error` says which); the body is kept raw and parsed on demand.
pub struct Answer {
    pub status: u16,
    pub replayed: bool,
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
        Ok(Client {
            addr,
            host: HeaderValue::from_str(&target.authority)?,
            prefix: target.prefix.clone(),
            service_auth: HeaderValue::from_str(&format!("Bearer {service_token}"))
                .context("the service token is not a valid header value")?,
            timeout,
            idle: Mutex::new(Vec::new()),
            opened: AtomicU64::new(0),
        })
    }

    async fn connect(&self) -> Result<Sender, &'static str> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let stream = TcpStream::connect(self.addr).await.map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "handshake")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn checkout(&self) -> Result<Sender, &'static str> {
        loop {
            let idle = self.idle.lock().unwrap().pop();
            match idle {
                Some(mut sender) => {
                    if sender.is_closed() {
                        continue;
                    }
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
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
                Ok(sender) => opened.push(sender),
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
        match tokio::time::timeout(
            self.timeout,
            self.exchange(method, path, auth, idempotency_key, body),
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
        body: Option<Bytes>,
    ) -> Result<Answer, &'static str> {
        let uri = if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}{path}", self.prefix)
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(HOST, self.host.clone());
        match auth {
            Auth::None => {}
            Auth::Service => request = request.header(AUTHORIZATION, self.service_auth.clone()),
            Auth::Bearer(token) => {
                let value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "header")?;
                request = request.header(AUTHORIZATION, value);
            }
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let body = match body {
            Some(b) => {
                request =
                    request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                b
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).map_err(|_| "request")?;
        let mut sender = self.checkout().await?;
        let response = sender.send_request(request).await.map_err(|_| "send")?;
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        let keep_alive = !response
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| "body")?
            .to_bytes();
        if keep_alive {
            self.idle.lock().unwrap().push(sender);
        }
        Ok(Answer {
            status: status.as_u16(),
            replayed,
            body,
            error: None,
        })
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

impl Answer {
    fn failed(error: &'static str) -> Answer {
        Answer {
            status: 0,
            replayed: false,
            body: Bytes::new(),
            error: Some(error),
        }
    }
}
