//! `--webhooks`: how the gateway's webhooks keep up with a sale. The harness runs a
//! receiver on loopback, registers it as an endpoint for the run (every event type),
//! and after the validation (the flush done) waits until every event the feed has for
//! the mixed phase's SKUs arrived, then reports: arrivals, duplicates (same
//! `webhook-id`), gaps in each SKU's sequence, and the lag from each event's fact
//! (`occurred_at`, Redis's clock) to its arrival. Signatures are not checked here (the
//! tests check them with an independent verifier).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Auth, Client};

/// `whsec_` + base64 of 24 bytes: the harness does not verify what it receives.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One arrival: when (unix seconds) and the event's fields that matter here.
#[derive(Debug, Clone)]
struct Arrival {
    at: f64,
    id: String,
    sku: String,
    sequence: u64,
    occurred_at: f64,
}

pub struct Receiver {
    pub url: String,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

impl Receiver {
    /// Listens on 127.0.0.1 (an ephemeral port); answers every POST 204 at once.
    pub async fn start() -> Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let record = arrivals.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, record).await;
                });
            }
        });
        Ok(Receiver { url, arrivals })
    }

    fn arrived(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// Requests of one keep-alive connection, one at a time.
async fn serve(mut socket: tokio::net::TcpStream, record: Arc<Mutex<Vec<Arrival>>>) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let (head_len, content_length) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = request.parse(&buf)? {
                let length = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0usize);
                break (n, length);
            }
            let read = socket.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..read]);
        };
        while buf.len() < head_len + content_length {
            let read = socket.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..read]);
        }
        let at = now_seconds();
        let body: serde_json::Value =
            serde_json::from_slice(&buf[head_len..head_len + content_length]).unwrap_or_default();
        buf.drain(..head_len + content_length);
        if let Some(arrival) = arrival(at, &body) {
            record.lock().unwrap().push(arrival);
        }
        socket
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

fn arrival(at: f64, event: &serde_json::Value) -> Option<Arrival> {
    Some(Arrival {
        at,
        id: event["id"].as_str()?.to_owned(),
        sku: event["sku"].as_str()?.to_owned(),
        sequence: event["sequence"].as_u64()?,
        occurred_at: chrono::DateTime::parse_from_rfc3339(event["occurred_at"].as_str()?)
            .ok()?
            .timestamp_micros() as f64
            / 1e6,
    })
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Registers the receiver as endpoint `name` (all types).
pub async fn register(client: &Client, name: &str, url: &str) -> Result<()> {
    let body = serde_json::json!({"url": url, "secret": SECRET});
    let answer = client
        .send(
            Method::PUT,
            &format!("/v1/admin/webhooks/{name}"),
            Auth::Service,
            None,
            Some(Bytes::from(body.to_string())),
        )
        .await;
    if !matches!(answer.status, 200 | 201) {
        bail!(
            "PUT /v1/admin/webhooks/{name}: {} (a gateway without webhooks?)",
            answer.text()
        );
    }
    Ok(())
}

pub async fn unregister(client: &Client, name: &str) {
    let _ = client
        .send(
            Method::DELETE,
            &format!("/v1/admin/webhooks/{name}"),
            Auth::Service,
            None,
            None,
        )
        .await;
}

/// The ids of every event the feed has for `sku`.
async fn feed_ids(client: &Client, sku: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(cursor) => format!("/v1/events?sku={sku}&limit=1000&after={cursor}"),
            None => format!("/v1/events?sku={sku}&limit=1000"),
        };
        let answer = client
            .send(Method::GET, &path, Auth::Service, None, None)
            .await;
        if answer.status != 200 {
            bail!("GET {path}: {}", answer.text());
        }
        let page: serde_json::Value =
            serde_json::from_slice(&answer.body).context("the feed's answer")?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        ids.extend(
            items
                .iter()
                .filter_map(|e| e["id"].as_str().map(str::to_owned)),
        );
        if items.len() < 1000 {
            return Ok(ids);
        }
        after = page["next"].as_str().map(str::to_owned);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WebhookReport {
    /// Events the feed has for the SKUs.
    pub events: usize,
    /// Of them, arrived at the receiver by the end of the wait.
    pub delivered: usize,
    pub arrivals: usize,
    pub duplicates: usize,
    /// Per SKU: sequence numbers missing between the lowest and the highest arrived.
    pub gaps: BTreeMap<String, u64>,
    pub lag_p50_s: Option<f64>,
    pub lag_p99_s: Option<f64>,
    pub lag_max_s: Option<f64>,
    pub waited_s: f64,
}

/// Waits (at most `limit`) until every feed event of `skus` arrived, then reports.
pub async fn report(
    client: &Client,
    receiver: &Receiver,
    skus: &[String],
    limit: Duration,
) -> Result<WebhookReport> {
    let mut wanted = Vec::new();
    for sku in skus {
        wanted.extend(feed_ids(client, sku).await?);
    }
    let started = Instant::now();
    let arrived = loop {
        let arrived = receiver.arrived();
        let seen: std::collections::HashSet<&str> = arrived.iter().map(|a| a.id.as_str()).collect();
        if wanted.iter().all(|id| seen.contains(id.as_str())) || started.elapsed() > limit {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mine: Vec<&Arrival> = arrived.iter().filter(|a| skus.contains(&a.sku)).collect();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for a in &mine {
        *per_id.entry(a.id.as_str()).or_default() += 1;
    }
    let mut sequences: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for a in &mine {
        sequences.entry(a.sku.clone()).or_default().push(a.sequence);
    }
    let gaps = sequences
        .into_iter()
        .map(|(sku, mut seqs)| {
            seqs.sort_unstable();
            seqs.dedup();
            let span = seqs.last().copied().unwrap_or(0) - seqs.first().copied().unwrap_or(0) + 1;
            (sku, span.saturating_sub(seqs.len() as u64))
        })
        .collect();
    let mut lags: Vec<f64> = mine.iter().map(|a| a.at - a.occurred_at).collect();
    lags.sort_by(f64::total_cmp);
    let quantile =
        |q: f64| (!lags.is_empty()).then(|| lags[((lags.len() - 1) as f64 * q).round() as usize]);
    Ok(WebhookReport {
        events: wanted.len(),
        delivered: wanted
            .iter()
            .filter(|id| per_id.contains_key(id.as_str()))
            .count(),
        arrivals: mine.len(),
        duplicates: per_id.values().map(|n| n - 1).sum(),
        gaps,
        lag_p50_s: quantile(0.5),
        lag_p99_s: quantile(0.99),
        lag_max_s: lags.last().copied(),
        waited_s: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_document_becomes_an_arrival() {
        let event = serde_json::json!({"id": "evt_1", "type": "sku.sold_out", "sku": "s",
            "sequence": 3, "occurred_at": "2026-12-06T10:00:00.500Z", "data": {}});
        let a = arrival(1_796_551_201.0, &event).unwrap();
        assert_eq!(
            (a.id.as_str(), a.sku.as_str(), a.sequence),
            ("evt_1", "s", 3)
        );
        assert!((a.at - a.occurred_at - 0.5).abs() < 1e-3, "{a:?}");
        assert!(arrival(0.0, &serde_json::json!({"id": "x"})).is_none());
    }

    #[tokio::test]
    async fn the_receiver_answers_204_and_records_each_post() {
        let receiver = Receiver::start().await.unwrap();
        let addr = receiver
            .url
            .trim_start_matches("http://")
            .trim_end_matches("/hook");
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        for sequence in [1, 2] {
            let body = format!(
                r#"{{"id":"evt_{sequence}","sku":"s","sequence":{sequence},"occurred_at":"2026-12-06T10:00:00Z"}}"#
            );
            let request = format!(
                "POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(request.as_bytes()).await.unwrap();
            let mut answer = [0u8; 64];
            let n = socket.read(&mut answer).await.unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 204"));
        }
        let arrived = receiver.arrived();
        assert_eq!(
            arrived.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            [1, 2]
        );
    }
}
