//! A real HTTP receiver of webhooks in the test process, and the independent check of
//! what it received: the `standardwebhooks` package from PyPI (scripts/dev installs it
//! into .dev/venv-webhooks; tests/webhooks_verify.py runs it).

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The secret the tests' endpoints sign with.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYqr";

/// How the receiver answers the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Status(u16),
    /// Never answers.
    Hang,
    /// Closes the connection without answering.
    Close,
    /// 302 to elsewhere.
    Redirect,
    /// 200, one byte of the head every 200 ms.
    Trickle,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The mode it was answered in.
    pub mode: Mode,
}

impl Received {
    pub fn event(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A raw HTTP/1.1 receiver on 127.0.0.1:0: every request is recorded, then answered
/// as the current mode says (one request per connection).
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
    /// Requests in flight now, and the most ever at once.
    in_flight: Arc<Mutex<(usize, usize)>>,
    /// Delay before answering (slow, but within the timeout).
    delay: Arc<Mutex<Duration>>,
    /// Answers wait while the test holds this (`hold`).
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            received: Default::default(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
            in_flight: Default::default(),
            delay: Default::default(),
            gate: Default::default(),
        };
        let me = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(me.clone().serve(socket));
            }
        });
        receiver
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Holds every answer (requests are still received and recorded) until the guard
    /// is dropped: the test decides when an attempt ends, without sleeping.
    pub async fn hold(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// Requests it is answering now.
    pub fn in_flight_now(&self) -> usize {
        self.in_flight.lock().unwrap().0
    }

    pub fn most_at_once(&self) -> usize {
        self.in_flight.lock().unwrap().1
    }

    async fn serve(self, mut socket: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut headers = HashMap::new();
        for line in head.lines().skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
        let mode = *self.mode.lock().unwrap();
        {
            let mut flight = self.in_flight.lock().unwrap();
            flight.0 += 1;
            flight.1 = flight.1.max(flight.0);
        }
        self.received.lock().unwrap().push(Received {
            headers,
            body,
            mode,
        });
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        drop(self.gate.read().await);
        let answer = |status: &str, extra: &str| {
            format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n{extra}\r\nok")
        };
        match mode {
            Mode::Ok => {
                let _ = socket.write_all(answer("200 OK", "").as_bytes()).await;
            }
            Mode::Status(code) => {
                let _ = socket
                    .write_all(answer(&format!("{code} Nope"), "").as_bytes())
                    .await;
            }
            Mode::Redirect => {
                let _ = socket
                    .write_all(
                        answer("302 Found", "location: http://127.0.0.1:1/elsewhere\r\n")
                            .as_bytes(),
                    )
                    .await;
            }
            Mode::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
            Mode::Close => drop(socket),
            Mode::Trickle => {
                for byte in answer("200 OK", "").bytes() {
                    if socket.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        self.in_flight.lock().unwrap().0 -= 1;
    }

    /// What it received of one SKU's events.
    pub fn of_sku(&self, sku: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                serde_json::from_str::<Value>(&r.body).is_ok_and(|e| e["sku"] == json!(sku))
            })
            .cloned()
            .collect()
    }
}

/// Checks every request with the standardwebhooks package; panics on any that fails.
pub fn verify_independently(secret: &str, requests: &[Received]) {
    let python = std::env::var("FLASHGATE_TEST_WEBHOOK_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.dev/venv-webhooks/bin/python",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: `scripts/dev test` installs the standardwebhooks verifier"
    );
    let file = std::env::temp_dir().join(format!(
        "flashgate-webhooks-{}-{}.json",
        std::process::id(),
        super::unique_sku("v")
    ));
    let dump: Vec<Value> = requests
        .iter()
        .map(|r| json!({"headers": r.headers, "body": r.body}))
        .collect();
    std::fs::write(&file, serde_json::to_vec(&dump).unwrap()).unwrap();
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/webhooks_verify.py"
        ))
        .arg(secret)
        .arg(&file)
        .output()
        .expect("the verifier runs");
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "standardwebhooks refused: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        requests.len()
    );
}
