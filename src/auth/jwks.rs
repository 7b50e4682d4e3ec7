//! The public keys of an identity provider's JWK set (`FLASHGATE_JWT_JWKS_URL`), for
//! RS256 and ES256 user tokens.
//!
//! Fetched at start, again every `refresh_every` (sooner, every `min_refresh`, while
//! the last fetch failed), and when a token names a `kid` the set does not know (at
//! most once per `min_refresh`, one fetch shared by all the requests that wait for it).
//! A failed fetch (unreachable, slow, an error status, too large, not a JWK set) keeps
//! the keys already fetched. A fetch is bounded by `timeout` and its body by
//! [`MAX_BODY`], so a slow or hostile server can neither stall nor bloat the gateway.
//!
//! Usable keys: `kty: RSA` (at least [`MIN_RSA_BITS`]) for RS256 and `kty: EC` on
//! P-256 for ES256, with a `kid`; a key whose `alg` is present must name that same
//! algorithm, whose `use` is present must be `sig`, whose `key_ops` are present must
//! include `verify`. Everything else (HMAC `oct` keys above all) is ignored: its `kid`
//! is remembered only to answer "not for this algorithm" instead of fetching again.

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::AuthFailure;

/// Default time between two fetches of the set.
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// Default least time between two fetches for unknown kids (and retries after a
/// failed fetch).
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Default bound of one fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWK set larger than this is refused (real ones are a few KiB).
pub const MAX_BODY: usize = 1 << 20;
/// Smaller RSA keys are ignored (NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

/// Installs rustls's `ring` provider as the process default (once; later calls do
/// nothing). Every reqwest client of this build needs it before it is built: reqwest is
/// compiled without a provider of its own, so that no aws-lc is built.
pub fn install_tls_provider() {
    // An error only says a provider is installed already. `ring` has no post-quantum
    // key exchange (hence the deprecation); what is fetched is a public key set.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where and how often.
#[derive(Debug, Clone)]
pub struct KeySetSettings {
    pub url: reqwest::Url,
    pub refresh_every: Duration,
    pub min_refresh: Duration,
    /// For one whole fetch: connecting, the answer and its body.
    pub timeout: Duration,
}

/// One fetched set: the usable keys by `kid`.
#[derive(Default)]
pub struct Keys {
    usable: HashMap<String, (Algorithm, DecodingKey)>,
    /// Kids of keys in the set that verify nothing we accept.
    unusable: HashSet<String>,
}

impl Keys {
    /// A JWK set document (`{"keys": [...]}`). A key that does not parse is skipped,
    /// not the whole set: providers add members we do not know.
    pub fn from_json(body: &[u8]) -> Result<Keys, String> {
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let raw: RawSet = serde_json::from_slice(body)
            .map_err(|_| "the answer is not a JWK set (a JSON object with \"keys\")".to_string())?;
        let mut keys = Keys::default();
        for value in raw.keys {
            let kid = value
                .get("kid")
                .and_then(|kid| kid.as_str())
                .map(str::to_owned);
            match serde_json::from_value::<Jwk>(value) {
                Ok(jwk) => keys.add(&jwk),
                Err(_) => {
                    if let Some(kid) = kid {
                        keys.add_unusable(kid);
                    }
                }
            }
        }
        Ok(keys)
    }

    pub fn from_jwks<'a>(jwks: impl IntoIterator<Item = &'a Jwk>) -> Keys {
        let mut keys = Keys::default();
        for jwk in jwks {
            keys.add(jwk);
        }
        keys
    }

    fn add(&mut self, jwk: &Jwk) {
        let Some(kid) = jwk.common.key_id.clone() else {
            return; // a token must name its key
        };
        match usable(jwk) {
            // The first usable key of a kid wins.
            Some(key) if !self.usable.contains_key(&kid) => {
                self.unusable.remove(&kid);
                self.usable.insert(kid, key);
            }
            Some(_) => {}
            None => self.add_unusable(kid),
        }
    }

    fn add_unusable(&mut self, kid: String) {
        if !self.usable.contains_key(&kid) {
            self.unusable.insert(kid);
        }
    }

    /// The key for a token of `alg` naming `kid`.
    pub fn find(&self, kid: &str, alg: Algorithm) -> Result<&DecodingKey, AuthFailure> {
        match self.usable.get(kid) {
            Some((key_alg, key)) if *key_alg == alg => Ok(key),
            Some(_) => Err(AuthFailure::KeyNotForAlgorithm),
            None if self.unusable.contains(kid) => Err(AuthFailure::KeyNotForAlgorithm),
            None => Err(AuthFailure::UnknownKey),
        }
    }

    /// Usable keys.
    pub fn len(&self) -> usize {
        self.usable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.usable.is_empty()
    }
}

/// The algorithm a JWK verifies, and its key; None if it verifies nothing we accept.
fn usable(jwk: &Jwk) -> Option<(Algorithm, DecodingKey)> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return None;
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    match (jwk.common.key_algorithm, alg) {
        (None, _) | (Some(KeyAlgorithm::RS256), Algorithm::RS256) => {}
        (Some(KeyAlgorithm::ES256), Algorithm::ES256) => {}
        _ => return None,
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    let fits = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, .. } => {
            let significant = n.iter().skip_while(|&&byte| byte == 0).count();
            significant * 8 >= MIN_RSA_BITS
        }
        // An uncompressed P-256 point (0x04, x and y of 32 bytes each) on the curve:
        // jsonwebtoken's verifier refuses to be built for a point that is not, which
        // `verify` tells apart from a signature that does not match.
        DecodingKeyKind::SecretOrDer(point) => {
            point.len() == 65
                && jsonwebtoken::crypto::verify("AA", b"probe", &key, Algorithm::ES256).is_ok()
        }
    };
    fits.then_some((alg, key))
}

/// A fetch error with its causes ("error sending request" alone says little), without
/// the URL (which may carry credentials).
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The keys in use, swapped whole by each successful fetch.
pub struct KeySet {
    settings: KeySetSettings,
    client: reqwest::Client,
    keys: RwLock<Arc<Keys>>,
    /// When the last fetch began (None: never); held during a fetch, so that requests
    /// wanting one at the same time wait for it instead of fetching again.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// The last fetch succeeded.
    fresh: AtomicBool,
}

impl KeySet {
    /// No keys until [`KeySet::refresh`].
    pub fn new(settings: KeySetSettings) -> anyhow::Result<KeySet> {
        install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let downgrade = attempt.url().scheme() != "https"
                    && attempt.previous().iter().any(|url| url.scheme() == "https");
                if attempt.previous().len() > 3 {
                    attempt.error("more than 3 redirects")
                } else if downgrade {
                    attempt.error("a redirect from https to http")
                } else {
                    attempt.follow()
                }
            }))
            .user_agent(concat!("flashgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(KeySet {
            settings,
            client,
            keys: RwLock::new(Arc::new(Keys::default())),
            last_fetch: tokio::sync::Mutex::new(None),
            fresh: AtomicBool::new(false),
        })
    }

    /// The keys now (a brief read lock, an `Arc` clone).
    pub fn keys(&self) -> Arc<Keys> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Uses `keys` from now on, as a successful fetch would (for tests, or a set
    /// obtained otherwise).
    pub fn set_keys(&self, keys: Keys) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }

    /// Whether the last fetch succeeded.
    pub fn is_fresh(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> &KeySetSettings {
        &self.settings
    }

    /// Fetches the set now and, if that works, uses it; answers the number of usable
    /// keys, or why the fetch failed (the keys stay as they were).
    pub async fn refresh(&self) -> Result<usize, String> {
        let mut last_fetch = self.last_fetch.lock().await;
        *last_fetch = Some(Instant::now());
        self.fetch_and_swap().await
    }

    /// A token named a kid we do not know: fetch again unless a fetch began less than
    /// `min_refresh` ago (or is under way: then wait for it).
    pub async fn refresh_for_unknown_kid(&self) {
        let mut last_fetch = self.last_fetch.lock().await;
        if last_fetch.is_some_and(|at| at.elapsed() < self.settings.min_refresh) {
            return;
        }
        *last_fetch = Some(Instant::now());
        let _ = self.fetch_and_swap().await;
    }

    async fn fetch_and_swap(&self) -> Result<usize, String> {
        let outcome = match tokio::time::timeout(self.settings.timeout, self.fetch()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "no complete answer within {} ms",
                self.settings.timeout.as_millis()
            )),
        };
        self.fresh.store(outcome.is_ok(), Ordering::Relaxed);
        match outcome {
            Ok(keys) => {
                let count = keys.len();
                self.set_keys(keys);
                metrics::counter!("flashgate_jwks_fetches_total", "outcome" => "ok").increment(1);
                metrics::gauge!("flashgate_jwks_keys").set(count as f64);
                tracing::debug!(keys = count, "JWK set fetched");
                Ok(count)
            }
            Err(error) => {
                metrics::counter!("flashgate_jwks_fetches_total", "outcome" => "failed")
                    .increment(1);
                tracing::warn!(
                    url = %self.display_url(),
                    %error,
                    "JWK set fetch failed; the keys fetched before stay in use"
                );
                Err(error)
            }
        }
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let mut response = self
            .client
            .get(self.settings.url.clone())
            .header(
                reqwest::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(describe)?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("answered HTTP {status}"));
        }
        let too_large = || format!("the answer is larger than {MAX_BODY} bytes");
        if response
            .content_length()
            .is_some_and(|length| length > MAX_BODY as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Keys::from_json(&body)
    }

    /// The URL for logs, without credentials or query.
    fn display_url(&self) -> String {
        let mut url = self.settings.url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
        url.to_string()
    }

    /// Refreshes every `refresh_every` (every `min_refresh` while fetches fail) until
    /// `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let wait = if self.is_fresh() {
                self.settings.refresh_every
            } else {
                self.settings.min_refresh
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let _ = self.refresh().await;
        }
    }
}
