//! Command line and environment: every flag also reads a `FLASHGATE_*` variable.
//! Parsing and validation only; nothing here connects to anything.

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use std::time::Duration;

use crate::limits;

/// `flashgate --version` (`-V` prints the version alone): the build profile too, so a
/// benchmark (or an operator) can tell a debug binary, several times slower, from a
/// release one.
pub const LONG_VERSION: &str = if cfg!(debug_assertions) {
    concat!(env!("CARGO_PKG_VERSION"), " (debug build)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (release build)")
};

#[derive(Debug, Parser)]
#[command(
    name = "flashgate",
    version,
    long_version = LONG_VERSION,
    about = "Flash-sale reservation gateway"
)]
pub struct Cli {
    /// `text` (for people) or `json` (one object per line, for log pipelines).
    #[arg(long, global = true, env = "FLASHGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// HTTP API, plus the background worker unless --no-worker.
    Serve(Box<ServeArgs>),
    /// Only the worker: sweep expired holds, flush the outbox, reconcile.
    Worker(WorkerArgs),
    /// One reconciliation pass, for cron. Exit 0 no drift, 1 drift found, 2 could not run.
    Reconcile(ReconcileArgs),
    /// Apply the embedded migrations to FLASHGATE_DATABASE_URL.
    Migrate(DatabaseArgs),
    /// Print a user JWT signed with FLASHGATE_JWT_SECRET.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// A redis:// URL, or a comma-separated list of cluster nodes with --redis-cluster.
    #[arg(
        long,
        env = "FLASHGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    #[arg(long, env = "FLASHGATE_REDIS_CLUSTER", default_value = "0",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub redis_cluster: bool,
    /// Replicas that must acknowledge a confirm or compensation (Redis WAIT) before it is answered.
    #[arg(long, env = "FLASHGATE_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,
    #[arg(long, env = "FLASHGATE_REDIS_WAIT_TIMEOUT_MS", default_value_t = 500)]
    pub redis_wait_timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    #[arg(
        long,
        env = "FLASHGATE_DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306/flashgate"
    )]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// How often expired holds are swept (the contract's upper bound on their return).
    #[arg(long, env = "FLASHGATE_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,
    #[arg(
        long,
        env = "FLASHGATE_RECONCILE_INTERVAL_SECONDS",
        default_value_t = 60
    )]
    pub reconcile_interval_seconds: u64,
    #[arg(long, env = "FLASHGATE_RECONCILE_REPAIR", default_value = "1",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub reconcile_repair: bool,
    /// Outbox entries pending this long on another (presumably dead) worker are taken
    /// over. Keep it far above one batch's flush time, or live workers steal each
    /// other's batches (harmless, the flush is idempotent, but wasted work).
    #[arg(long, env = "FLASHGATE_FLUSH_CLAIM_IDLE_MS", default_value_t = crate::limits::FLUSH_CLAIM_IDLE.as_millis() as u64)]
    pub flush_claim_idle_ms: u64,
    /// Events (the feed, webhook deliveries) are kept at least this long, then pruned
    /// by the worker in bounded batches. At least 25: a delivery is retried for 24 h
    /// (plus a backoff of up to 1 h), and its event must outlive its retries.
    #[arg(long, env = "FLASHGATE_EVENTS_RETENTION_HOURS", default_value_t = 72,
          value_parser = clap::value_parser!(u64).range(25..))]
    pub events_retention_hours: u64,
    /// A webhook delivery must be answered 2xx within this (the contract's 10 s); a
    /// claim's lease is three times as long (src/webhooks.rs).
    #[arg(long, env = "FLASHGATE_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=10_000))]
    pub webhook_timeout_ms: u64,
    /// Requests in flight to one webhook endpoint at most, per worker (src/webhooks.rs):
    /// what one endpoint takes per second is about this over its answer's time (plus a
    /// claim's). Each is one connection to it.
    #[arg(long, env = "FLASHGATE_WEBHOOK_CONCURRENCY",
          default_value_t = crate::webhooks::ENDPOINT_CONCURRENCY as u64,
          value_parser = clap::value_parser!(u64).range(1..=crate::webhooks::ENDPOINT_CONCURRENCY_MAX as u64))]
    pub webhook_concurrency: u64,
}

impl WorkerSettings {
    pub fn flush_claim_idle(&self) -> Duration {
        Duration::from_millis(self.flush_claim_idle_ms.max(1))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(long, env = "FLASHGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Serve `/metrics` on this address instead of FLASHGATE_LISTEN (where it then
    /// answers 404), so the public port need not expose it.
    #[arg(long, env = "FLASHGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Run only the HTTP API; run `flashgate worker` elsewhere.
    #[arg(long, env = "FLASHGATE_NO_WORKER", default_value = "0",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "1")]
    pub no_worker: bool,
    /// HS256 key of user tokens; may be unset (or empty) with FLASHGATE_JWT_JWKS_URL,
    /// then HS256 tokens are refused.
    #[arg(long, env = "FLASHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    #[arg(long, env = "FLASHGATE_SERVICE_TOKEN", hide_env_values = true)]
    pub service_token: String,
    #[command(flatten)]
    pub jwt: JwtSettings,
    #[arg(long, env = "FLASHGATE_PAYMENT_GRACE_SECONDS", default_value_t = 300)]
    pub payment_grace_seconds: u64,
    #[arg(
        long,
        env = "FLASHGATE_IDEMPOTENCY_TTL_SECONDS",
        default_value_t = 86_400
    )]
    pub idempotency_ttl_seconds: u64,
    /// Holds one user may release (cancel or let expire) per SKU within one key
    /// lifetime (max(idempotency TTL, hold + grace)) before further reserves of that SKU
    /// answer `limit_exceeded`: what one account can leave behind in Redis is bounded.
    /// 0: no cap.
    #[arg(
        long,
        env = "FLASHGATE_MAX_RELEASED_HOLDS_PER_USER",
        default_value_t = limits::MAX_RELEASED_HOLDS_PER_USER
    )]
    pub max_released_holds_per_user: u64,
    /// Polls per second that all the waiting users of one SKU's waiting room make
    /// together: each poll's `retry_after_ms` is sized for it, shorter near the front
    /// of the line (src/queue.rs).
    #[arg(
        long,
        env = "FLASHGATE_QUEUE_POLLS_PER_SECOND",
        default_value_t = limits::QUEUE_POLLS_PER_SECOND
    )]
    pub queue_polls_per_second: u32,
    /// Seconds of clock skew allowed on a user JWT's `exp` and `nbf`.
    #[arg(long, env = "FLASHGATE_JWT_LEEWAY_SECONDS", default_value_t = limits::JWT_LEEWAY_SECONDS)]
    pub jwt_leeway_seconds: u64,
    /// The key of the reservation-id MAC (>= 32 bytes). Unset: a key derived from
    /// FLASHGATE_JWT_SECRET. Ids are checked under it, under FLASHGATE_ID_KEY_PREVIOUS
    /// and under the keys of the current and previous JWT secrets.
    #[arg(long, env = "FLASHGATE_ID_KEY", hide_env_values = true)]
    pub id_key: Option<String>,
    /// Comma-separated earlier values of FLASHGATE_ID_KEY: ids they signed stay ours.
    #[arg(
        long,
        env = "FLASHGATE_ID_KEY_PREVIOUS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub id_key_previous: Vec<String>,
    #[command(flatten)]
    pub connections: ConnectionSettings,
    #[command(flatten)]
    pub admission: AdmissionSettings,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub worker: WorkerSettings,
}

impl ServeArgs {
    /// The current HS256 secret; an empty value counts as unset.
    pub fn jwt_secret(&self) -> Option<&str> {
        self.jwt_secret
            .as_deref()
            .filter(|secret| !secret.is_empty())
    }
}

/// User tokens besides the current HS256 secret (see `auth`).
#[derive(Debug, Clone, Args)]
pub struct JwtSettings {
    /// Earlier HS256 secrets, comma-separated, whose tokens are still accepted (a
    /// rolling rotation); each at least 32 bytes.
    #[arg(
        long,
        env = "FLASHGATE_JWT_SECRET_PREVIOUS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub jwt_secret_previous: Vec<String>,
    /// JWK set of an identity provider: user tokens may also be RS256 or ES256, signed
    /// by one of its keys (named by `kid`).
    #[arg(long, env = "FLASHGATE_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// When set, every user token must have this `iss`.
    #[arg(long, env = "FLASHGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// When set, every user token's `aud` must be this or contain it. Unset: a token
    /// with an `aud` is refused.
    #[arg(long, env = "FLASHGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Seconds between two fetches of the JWK set.
    #[arg(long, env = "FLASHGATE_JWT_JWKS_REFRESH_SECONDS", default_value_t = crate::auth::jwks::REFRESH_EVERY.as_secs(), hide = true)]
    pub jwt_jwks_refresh_seconds: u64,
    /// Seconds at least between two fetches caused by unknown `kid`s (and between
    /// retries while fetches fail).
    #[arg(long, env = "FLASHGATE_JWT_JWKS_MIN_REFRESH_SECONDS", default_value_t = crate::auth::jwks::MIN_REFRESH.as_secs(), hide = true)]
    pub jwt_jwks_min_refresh_seconds: u64,
    /// Milliseconds one fetch of the JWK set may take in all.
    #[arg(long, env = "FLASHGATE_JWT_JWKS_TIMEOUT_MS", default_value_t = crate::auth::jwks::FETCH_TIMEOUT.as_millis() as u64, hide = true)]
    pub jwt_jwks_timeout_ms: u64,
}

impl Default for JwtSettings {
    fn default() -> JwtSettings {
        JwtSettings {
            jwt_secret_previous: Vec::new(),
            jwt_jwks_url: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_jwks_refresh_seconds: crate::auth::jwks::REFRESH_EVERY.as_secs(),
            jwt_jwks_min_refresh_seconds: crate::auth::jwks::MIN_REFRESH.as_secs(),
            jwt_jwks_timeout_ms: crate::auth::jwks::FETCH_TIMEOUT.as_millis() as u64,
        }
    }
}

impl JwtSettings {
    /// The previous secrets, without empty entries (an empty variable means none).
    pub fn previous_secrets(&self) -> Vec<&str> {
        self.jwt_secret_previous
            .iter()
            .map(String::as_str)
            .filter(|secret| !secret.is_empty())
            .collect()
    }

    pub fn issuer(&self) -> Option<&str> {
        self.jwt_issuer.as_deref().filter(|value| !value.is_empty())
    }

    pub fn audience(&self) -> Option<&str> {
        self.jwt_audience
            .as_deref()
            .filter(|value| !value.is_empty())
    }

    /// Where and how often to fetch the JWK set; None without a URL.
    pub fn key_set(&self) -> Result<Option<crate::auth::jwks::KeySetSettings>, String> {
        let Some(url) = self.jwt_jwks_url.as_deref().filter(|url| !url.is_empty()) else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)
            .map_err(|error| format!("FLASHGATE_JWT_JWKS_URL is not a URL: {error}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err("FLASHGATE_JWT_JWKS_URL must be an https:// (or http://) URL".into());
        }
        if self.jwt_jwks_refresh_seconds == 0 || self.jwt_jwks_min_refresh_seconds == 0 {
            return Err(
                "FLASHGATE_JWT_JWKS_REFRESH_SECONDS and FLASHGATE_JWT_JWKS_MIN_REFRESH_SECONDS must be at least 1"
                    .into(),
            );
        }
        if self.jwt_jwks_timeout_ms == 0 {
            return Err("FLASHGATE_JWT_JWKS_TIMEOUT_MS must be at least 1".into());
        }
        Ok(Some(crate::auth::jwks::KeySetSettings {
            url,
            refresh_every: Duration::from_secs(self.jwt_jwks_refresh_seconds),
            min_refresh: Duration::from_secs(self.jwt_jwks_min_refresh_seconds),
            timeout: Duration::from_millis(self.jwt_jwks_timeout_ms),
        }))
    }
}

/// Deadlines and the cap of the HTTP connections (see `connections`).
#[derive(Debug, Clone, Args)]
pub struct ConnectionSettings {
    /// A whole request head must arrive within this after its first byte.
    #[arg(long, env = "FLASHGATE_HEAD_TIMEOUT_MS", default_value_t = limits::HEAD_TIMEOUT.as_millis() as u64)]
    pub head_timeout_ms: u64,
    /// A request body must arrive within this after its head (else 408).
    #[arg(long, env = "FLASHGATE_BODY_TIMEOUT_MS", default_value_t = limits::BODY_TIMEOUT.as_millis() as u64)]
    pub body_timeout_ms: u64,
    /// A keep-alive connection with no request in flight is closed after this.
    #[arg(long, env = "FLASHGATE_IDLE_TIMEOUT_MS", default_value_t = limits::IDLE_TIMEOUT.as_millis() as u64)]
    pub idle_timeout_ms: u64,
    /// A connection whose client takes no answer bytes for this long is closed.
    #[arg(long, env = "FLASHGATE_WRITE_TIMEOUT_MS", default_value_t = limits::WRITE_TIMEOUT.as_millis() as u64)]
    pub write_timeout_ms: u64,
    /// Open connections at most; when full, the oldest idle one is closed for a new
    /// one, and a new one is refused when none is idle.
    #[arg(long, env = "FLASHGATE_MAX_CONNECTIONS", default_value_t = limits::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// On SIGTERM, in-flight requests get this long; then connections are dropped.
    #[arg(long, env = "FLASHGATE_SHUTDOWN_GRACE_SECONDS", default_value_t = limits::SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace_seconds: u64,
}

impl Default for ConnectionSettings {
    fn default() -> ConnectionSettings {
        ConnectionSettings {
            head_timeout_ms: limits::HEAD_TIMEOUT.as_millis() as u64,
            body_timeout_ms: limits::BODY_TIMEOUT.as_millis() as u64,
            idle_timeout_ms: limits::IDLE_TIMEOUT.as_millis() as u64,
            write_timeout_ms: limits::WRITE_TIMEOUT.as_millis() as u64,
            max_connections: limits::MAX_CONNECTIONS,
            shutdown_grace_seconds: limits::SHUTDOWN_GRACE.as_secs(),
        }
    }
}

/// [`ConnectionSettings`], validated.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub head_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl ConnectionSettings {
    pub fn limits(&self) -> Result<ConnectionLimits, String> {
        let timeout = |name: &str, ms: u64| {
            let value = Duration::from_millis(ms);
            if value < limits::CONNECTION_TIMEOUT_MIN {
                return Err(format!(
                    "{name} must be at least {} ms",
                    limits::CONNECTION_TIMEOUT_MIN.as_millis()
                ));
            }
            Ok(value)
        };
        if self.max_connections == 0 {
            return Err("FLASHGATE_MAX_CONNECTIONS must be at least 1".into());
        }
        Ok(ConnectionLimits {
            head_timeout: timeout("FLASHGATE_HEAD_TIMEOUT_MS", self.head_timeout_ms)?,
            body_timeout: timeout("FLASHGATE_BODY_TIMEOUT_MS", self.body_timeout_ms)?,
            idle_timeout: timeout("FLASHGATE_IDLE_TIMEOUT_MS", self.idle_timeout_ms)?,
            write_timeout: timeout("FLASHGATE_WRITE_TIMEOUT_MS", self.write_timeout_ms)?,
            max_connections: self.max_connections,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
        })
    }
}

/// Admission before any work (see `admission`): token buckets on the reserve
/// endpoint per user and per client address, and a cap on requests in flight.
/// A rate of 0 turns that limit off; a burst of 0 is twice the rate.
#[derive(Debug, Clone, Args)]
pub struct AdmissionSettings {
    /// Reserves per second one user may make (sustained); 0 = no per-user limit.
    #[arg(long, env = "FLASHGATE_RATE_PER_USER", default_value_t = limits::RATE_PER_USER)]
    pub rate_per_user: u32,
    /// Reserves one user may make at once before the rate applies.
    #[arg(long, env = "FLASHGATE_RATE_PER_USER_BURST", default_value_t = limits::RATE_PER_USER_BURST)]
    pub rate_per_user_burst: u32,
    /// Reserves per second from one client address; 0 (the default) = no limit. Off by
    /// default because many users share an address behind a NAT or a proxy.
    #[arg(long, env = "FLASHGATE_RATE_PER_ADDRESS", default_value_t = 0)]
    pub rate_per_address: u32,
    #[arg(long, env = "FLASHGATE_RATE_PER_ADDRESS_BURST", default_value_t = 0)]
    pub rate_per_address_burst: u32,
    /// Keys (users, addresses) each limiter remembers at most, whatever ids come in.
    #[arg(long, env = "FLASHGATE_RATE_MAX_KEYS", default_value_t = limits::RATE_MAX_KEYS)]
    pub rate_max_keys: usize,
    /// Take the client address from this header (e.g. `x-forwarded-for`), but only on
    /// connections from FLASHGATE_TRUSTED_PROXIES; unset: the TCP peer address.
    #[arg(long, env = "FLASHGATE_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,
    /// Comma-separated addresses or CIDRs of the proxies whose header is believed.
    #[arg(long, env = "FLASHGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// Requests in flight at most (health and metrics excepted); more are answered
    /// 503 `overloaded` at once. 0 = no cap.
    #[arg(long, env = "FLASHGATE_MAX_IN_FLIGHT", default_value_t = limits::MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Milliseconds a `rate_limited` answer waits before it leaves (no in-flight permit
    /// held meanwhile; less than its Retry-After): what slows a client that hammers in
    /// a closed loop. 0 = at once.
    #[arg(long, env = "FLASHGATE_RATE_LIMITED_DELAY_MS",
          default_value_t = limits::RATE_LIMITED_DELAY.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub rate_limited_delay_ms: u64,
}

impl Default for AdmissionSettings {
    fn default() -> AdmissionSettings {
        AdmissionSettings {
            rate_per_user: limits::RATE_PER_USER,
            rate_per_user_burst: limits::RATE_PER_USER_BURST,
            rate_per_address: 0,
            rate_per_address_burst: 0,
            rate_max_keys: limits::RATE_MAX_KEYS,
            client_ip_header: None,
            trusted_proxies: Vec::new(),
            max_in_flight: limits::MAX_IN_FLIGHT,
            rate_limited_delay_ms: limits::RATE_LIMITED_DELAY.as_millis() as u64,
        }
    }
}

impl AdmissionSettings {
    /// Every limit off: no token bucket, no in-flight cap.
    pub fn off() -> AdmissionSettings {
        AdmissionSettings {
            rate_per_user: 0,
            max_in_flight: 0,
            rate_limited_delay_ms: 0,
            ..AdmissionSettings::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Serve `/metrics` (and `/healthz`) on this address: the worker's own figures
    /// (sweep pass, outbox backlog, reconcile drift, open compensations).
    #[arg(long, env = "FLASHGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub connections: ConnectionSettings,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub worker: WorkerSettings,
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// Check only this SKU.
    #[arg(long)]
    pub sku: Option<String>,
    /// Repair what is found (MySQL wins for sales).
    #[arg(long)]
    pub repair: bool,
    /// Print one JSON document on stdout: {"checked", "findings", "repaired",
    /// "needs_attention"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[arg(long)]
    pub sub: String,
    #[arg(long, default_value_t = 3600)]
    pub ttl_seconds: u64,
    #[arg(long, env = "FLASHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// The token's `iss` (the gateway's FLASHGATE_JWT_ISSUER, if it requires one).
    #[arg(long, env = "FLASHGATE_JWT_ISSUER")]
    pub issuer: Option<String>,
    /// The token's `aud` (the gateway's FLASHGATE_JWT_AUDIENCE, if it requires one).
    #[arg(long, env = "FLASHGATE_JWT_AUDIENCE")]
    pub audience: Option<String>,
}

/// What the gateway's reservation logic needs, validated.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub payment_grace: Duration,
    pub idempotency_ttl: Duration,
    /// See ServeArgs::max_released_holds_per_user.
    pub released_holds_cap: u64,
    /// Sign and check reservation ids and admission tokens (`ids::IdKeys`).
    pub id_keys: crate::ids::IdKeys,
    /// See ServeArgs::queue_polls_per_second.
    pub queue_polls_per_second: u32,
}

impl GatewaySettings {
    pub fn from_serve_args(args: &ServeArgs) -> Result<GatewaySettings, String> {
        if args.payment_grace_seconds == 0 || args.payment_grace_seconds > limits::HOLD_SECONDS_MAX
        {
            return Err(format!(
                "FLASHGATE_PAYMENT_GRACE_SECONDS must be 1..={}",
                limits::HOLD_SECONDS_MAX
            ));
        }
        if args.idempotency_ttl_seconds == 0
            || args.idempotency_ttl_seconds > limits::IDEMPOTENCY_TTL_MAX_SECONDS
        {
            return Err(format!(
                "FLASHGATE_IDEMPOTENCY_TTL_SECONDS must be 1..={}",
                limits::IDEMPOTENCY_TTL_MAX_SECONDS,
            ));
        }
        Ok(GatewaySettings {
            payment_grace: Duration::from_secs(args.payment_grace_seconds),
            idempotency_ttl: Duration::from_secs(args.idempotency_ttl_seconds),
            released_holds_cap: args.max_released_holds_per_user,
            id_keys: id_keys(args)?,
            queue_polls_per_second: match args.queue_polls_per_second {
                0 => return Err("FLASHGATE_QUEUE_POLLS_PER_SECOND must be at least 1".into()),
                n => n,
            },
        })
    }
}

/// The keys of the reservation-id MAC: FLASHGATE_ID_KEY and its previous values, each
/// at least SECRET_MIN_LEN bytes and none the service token, then the JWT secrets'.
/// The previous list may name a key no gateway signs with yet: the first step of a
/// rolling rotation (docs/configuration.md, Rotating keys) lets every gateway accept a
/// key before any signs with it.
fn id_keys(args: &ServeArgs) -> Result<crate::ids::IdKeys, String> {
    let id_keys: Vec<&str> = args
        .id_key
        .iter()
        .chain(&args.id_key_previous)
        .map(|k| k.as_str())
        .filter(|k| !k.is_empty())
        .collect();
    for key in &id_keys {
        check_secret(
            "FLASHGATE_ID_KEY and each of FLASHGATE_ID_KEY_PREVIOUS",
            key,
        )?;
        if *key == args.service_token {
            return Err("FLASHGATE_ID_KEY must differ from FLASHGATE_SERVICE_TOKEN".into());
        }
    }
    let jwt_secrets: Vec<&str> = args
        .jwt_secret()
        .into_iter()
        .chain(args.jwt.previous_secrets())
        .collect();
    let id_key = args.id_key.as_deref().filter(|k| !k.is_empty());
    let others: Vec<&str> = id_keys
        .iter()
        .copied()
        .filter(|k| Some(*k) != id_key)
        .collect();
    crate::ids::IdKeys::new(id_key, &others, &jwt_secrets)
        .ok_or_else(|| "set FLASHGATE_ID_KEY (the key of the reservation-id MAC)".into())
}

/// Secrets shorter than this are refused: an HS256 key should be at least 256 bits
/// (RFC 7518 3.2), and a short service token can be guessed.
pub const SECRET_MIN_LEN: usize = 32;

pub fn check_secret(name: &str, value: &str) -> Result<(), String> {
    if value.len() < SECRET_MIN_LEN {
        return Err(format!(
            "{name} must be at least {SECRET_MIN_LEN} bytes (e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(())
}

/// Both secrets long enough, and different: with one value for both, anyone holding
/// the service token could sign user JWTs, and a leaked JWT key would be the service
/// token.
pub fn check_secrets(jwt_secret: &str, service_token: &str) -> Result<(), String> {
    check_secret("FLASHGATE_JWT_SECRET", jwt_secret)?;
    check_secret("FLASHGATE_SERVICE_TOKEN", service_token)?;
    if jwt_secret == service_token {
        return Err("FLASHGATE_JWT_SECRET and FLASHGATE_SERVICE_TOKEN must differ".into());
    }
    Ok(())
}

/// The settings of user and service tokens: the secrets long enough and distinct, a
/// current secret unless a JWK set is configured, previous secrets only with a current
/// one, the JWK set URL and intervals sane.
pub fn check_auth(args: &ServeArgs) -> Result<(), String> {
    check_secret("FLASHGATE_SERVICE_TOKEN", &args.service_token)?;
    match args.jwt_secret() {
        Some(secret) => check_secrets(secret, &args.service_token)?,
        None if args.jwt.key_set()?.is_some() => {}
        None => {
            return Err(
                "FLASHGATE_JWT_SECRET is required (unless FLASHGATE_JWT_JWKS_URL is set)".into(),
            )
        }
    }
    let previous = args.jwt.previous_secrets();
    if !previous.is_empty() && args.jwt_secret().is_none() {
        return Err("FLASHGATE_JWT_SECRET_PREVIOUS needs a current FLASHGATE_JWT_SECRET".into());
    }
    for secret in previous {
        check_secret("each of FLASHGATE_JWT_SECRET_PREVIOUS", secret)?;
        if secret == args.service_token {
            return Err(
                "FLASHGATE_JWT_SECRET_PREVIOUS and FLASHGATE_SERVICE_TOKEN must differ".into(),
            );
        }
    }
    args.jwt.key_set()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flashgate").chain(args.iter().copied()))
    }

    #[test]
    fn serve_reads_flags_and_defaults() {
        let cli = parse(&[
            "serve",
            "--jwt-secret",
            "0123456789abcdef0123",
            "--service-token",
            "tok",
            "--no-worker",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert!(args.no_worker);
        assert_eq!(args.payment_grace_seconds, 300);
        assert_eq!(args.idempotency_ttl_seconds, 86_400);
        assert!(args.worker.reconcile_repair);
        let settings = GatewaySettings::from_serve_args(&args).unwrap();
        assert_eq!(settings.payment_grace, Duration::from_secs(300));
    }

    #[test]
    fn bad_settings_are_refused() {
        let cli = parse(&[
            "serve",
            "--jwt-secret",
            "x",
            "--service-token",
            "y",
            "--idempotency-ttl-seconds",
            "99999999",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert!(GatewaySettings::from_serve_args(&args).is_err());
        let secret = args.jwt_secret().unwrap();
        assert!(check_secret("FLASHGATE_JWT_SECRET", secret).is_err());
        assert!(check_secrets(secret, &args.service_token).is_err());
        assert!(check_auth(&args).is_err());
        assert!(parse(&["serve", "--sweep-interval-ms", "abc"]).is_err());
        assert!(parse(&["reconcile", "--redis-cluster", "maybe"]).is_err());
    }

    #[test]
    fn secrets_are_long_and_distinct() {
        let a = "a".repeat(SECRET_MIN_LEN);
        let b = "b".repeat(SECRET_MIN_LEN);
        assert!(check_secrets(&a, &b).is_ok());
        let short = "s".repeat(SECRET_MIN_LEN - 1);
        assert!(check_secrets(&short, &b)
            .unwrap_err()
            .contains("JWT_SECRET"));
        assert!(check_secrets(&a, &short)
            .unwrap_err()
            .contains("SERVICE_TOKEN"));
        assert!(check_secrets(&a, &a).unwrap_err().contains("differ"));
    }

    #[test]
    fn jwt_settings_parse_and_validate() {
        let a = "a".repeat(SECRET_MIN_LEN);
        let b = "b".repeat(SECRET_MIN_LEN);
        let service = "s".repeat(SECRET_MIN_LEN);
        let serve = |extra: &[&str]| {
            let mut args = vec!["serve", "--service-token", service.as_str()];
            args.extend_from_slice(extra);
            let Command::Serve(args) = parse(&args).unwrap().command else {
                panic!("not serve")
            };
            args
        };
        let args = serve(&[
            "--jwt-secret",
            &b,
            "--jwt-secret-previous",
            &format!("{a},,{a}"),
        ]);
        assert_eq!(args.jwt.previous_secrets(), vec![a.as_str(), a.as_str()]);
        assert!(check_auth(&args).is_ok());
        assert!(args.jwt.key_set().unwrap().is_none());
        assert_eq!(args.jwt.jwt_jwks_refresh_seconds, 600);
        assert_eq!(args.jwt.jwt_jwks_min_refresh_seconds, 30);
        let short = serve(&["--jwt-secret", &b, "--jwt-secret-previous", "short"]);
        assert!(check_auth(&short).unwrap_err().contains("PREVIOUS"));
        let shared = serve(&["--jwt-secret", &b, "--jwt-secret-previous", &service]);
        assert!(check_auth(&shared).unwrap_err().contains("differ"));
        // No secret: only with a JWK set, and then no previous secrets.
        let neither = serve(&[]);
        assert!(check_auth(&neither).unwrap_err().contains("JWKS_URL"));
        let empty = serve(&["--jwt-secret", ""]);
        assert!(empty.jwt_secret().is_none());
        assert!(check_auth(&empty).is_err());
        let url = "https://idp.example/.well-known/jwks.json";
        let jwks = serve(&["--jwt-jwks-url", url, "--jwt-audience", "fg"]);
        assert!(check_auth(&jwks).is_ok());
        let settings = jwks.jwt.key_set().unwrap().unwrap();
        assert_eq!(settings.url.as_str(), url);
        assert_eq!(settings.min_refresh, Duration::from_secs(30));
        assert_eq!(jwks.jwt.audience(), Some("fg"));
        assert_eq!(jwks.jwt.issuer(), None);
        let orphan = serve(&["--jwt-jwks-url", url, "--jwt-secret-previous", &a]);
        assert!(check_auth(&orphan).unwrap_err().contains("current"));
        for bad in ["not a url", "ftp://idp.example/jwks"] {
            assert!(
                check_auth(&serve(&["--jwt-jwks-url", bad])).is_err(),
                "{bad}"
            );
        }
        let zero = serve(&["--jwt-jwks-url", url, "--jwt-jwks-min-refresh-seconds", "0"]);
        assert!(check_auth(&zero).is_err());
        // Without a JWT secret the ids need their own key, never one derived from nothing.
        let no_id_key = GatewaySettings::from_serve_args(&jwks).unwrap_err();
        assert!(no_id_key.contains("FLASHGATE_ID_KEY"), "{no_id_key}");
        let mut with_id_key = jwks;
        with_id_key.id_key = Some("i".repeat(32));
        assert!(GatewaySettings::from_serve_args(&with_id_key).is_ok());
    }

    #[test]
    fn connection_settings_default_and_validate() {
        let cli = parse(&["serve", "--jwt-secret", "x", "--service-token", "y"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let limits = args.connections.limits().unwrap();
        assert_eq!(limits.head_timeout, crate::limits::HEAD_TIMEOUT);
        assert_eq!(limits.max_connections, crate::limits::MAX_CONNECTIONS);
        assert_eq!(limits.shutdown_grace, crate::limits::SHUTDOWN_GRACE);
        assert_eq!(args.jwt_leeway_seconds, crate::limits::JWT_LEEWAY_SECONDS);
        assert_eq!(args.admission.rate_per_user, crate::limits::RATE_PER_USER);
        assert_eq!(args.admission.rate_per_address, 0, "off by default");
        assert_eq!(args.admission.max_in_flight, crate::limits::MAX_IN_FLIGHT);
        assert!(args.admission.client_ip_header.is_none());
        assert!(args.metrics_listen.is_none());
        assert_eq!(cli.log_format, LogFormat::Text);
        let cli = parse(&["--log-format", "json", "worker"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(parse(&["serve", "--log-format", "xml"]).is_err());
        let cli = parse(&[
            "serve",
            "--jwt-secret",
            "x",
            "--service-token",
            "y",
            "--write-timeout-ms",
            "5",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert!(args.connections.limits().is_err());
        let cli = parse(&[
            "serve",
            "--jwt-secret",
            "x",
            "--service-token",
            "y",
            "--client-ip-header",
            "x-forwarded-for",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.1.1",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.admission.trusted_proxies.len(), 2);
        let zero = ConnectionSettings {
            max_connections: 0,
            ..ConnectionSettings::default()
        };
        assert!(zero.limits().is_err());
    }

    #[test]
    fn reconcile_and_token_parse() {
        let cli = parse(&["reconcile", "--sku", "s1", "--repair"]).unwrap();
        let Command::Reconcile(args) = cli.command else {
            panic!("not reconcile")
        };
        assert_eq!(args.sku.as_deref(), Some("s1"));
        assert!(args.repair);
        assert!(!args.json);
        let cli = parse(&["reconcile", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Reconcile(r) if r.json && !r.repair));
        let cli = parse(&["token", "--sub", "alice", "--jwt-secret", "s"]).unwrap();
        assert!(
            matches!(cli.command, Command::Token(t) if t.sub == "alice" && t.ttl_seconds == 3600)
        );
    }
}
