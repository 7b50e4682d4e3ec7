//! Admission before any work: token buckets per user and per client address on the
//! reserve endpoint (429 `rate_limited`), and a cap on requests in flight (503
//! `overloaded`). Answers at once and never touches Redis or MySQL.
//!
//! The buckets are `governor`'s keyed GCRA limiters. Their memory is bounded whatever
//! ids come in: idle keys are dropped every few checks, and when that does not make
//! room the limiter starts over (every key gets a fresh bucket; one extra burst is all
//! an attacker gains from inventing ids).

use axum::extract::{ConnectInfo, Request};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::auth::AuthFailure;
use crate::config::AdmissionSettings;
use crate::http::{self, AppState};
use crate::limits;

/// The admission settings, validated and turned into limiters.
pub struct Admission {
    users: Option<Keyed<String>>,
    addresses: Option<Keyed<IpAddr>>,
    client: ClientAddress,
    in_flight: Option<Arc<Semaphore>>,
    /// How long a `rate_limited` answer waits before it leaves (http's `edge` layer,
    /// after the in-flight permit is released).
    pub rate_limited_delay: Duration,
}

impl Admission {
    pub fn new(settings: &AdmissionSettings) -> Result<Admission, String> {
        if settings.rate_max_keys < 2 * limits::RATE_TRIM_EVERY {
            return Err(format!(
                "FLASHGATE_RATE_MAX_KEYS must be at least {}",
                2 * limits::RATE_TRIM_EVERY
            ));
        }
        let max_keys = settings.rate_max_keys;
        Ok(Admission {
            users: quota(settings.rate_per_user, settings.rate_per_user_burst)
                .map(|quota| Keyed::new("user", quota, max_keys)),
            addresses: quota(settings.rate_per_address, settings.rate_per_address_burst)
                .map(|quota| Keyed::new("address", quota, max_keys)),
            client: ClientAddress::new(
                settings.client_ip_header.as_deref(),
                &settings.trusted_proxies,
            )?,
            in_flight: (settings.max_in_flight > 0)
                .then(|| Arc::new(Semaphore::new(settings.max_in_flight))),
            rate_limited_delay: Duration::from_millis(settings.rate_limited_delay_ms),
        })
    }

    /// Keys the user and the address limiters remember now.
    pub fn keys(&self) -> (usize, usize) {
        (
            self.users.as_ref().map_or(0, Keyed::len),
            self.addresses.as_ref().map_or(0, Keyed::len),
        )
    }

    /// One reserve by `user` (when authenticated) from `client`: the wait before the
    /// next one is allowed when refused. The address goes first: it needs no
    /// signature check and a flood from one address spends no user's bucket.
    pub fn check_reserve(&self, user: Option<&str>, client: Option<IpAddr>) -> Result<(), Refused> {
        if let (Some(limiter), Some(client)) = (&self.addresses, client) {
            limiter
                .check(&address_key(client))
                .map_err(|wait| Refused("address", wait))?;
        }
        if let (Some(limiter), Some(user)) = (&self.users, user) {
            limiter
                .check_with(user, |u| u.to_owned())
                .map_err(|wait| Refused("user", wait))?;
        }
        Ok(())
    }

    /// The client's address: the TCP peer, or what a trusted proxy says it is.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.client.resolve(peer, headers)
    }

    /// Drops idle keys now (also done every few checks); for a periodic task.
    pub fn trim(&self) {
        if let Some(users) = &self.users {
            users.trim();
        }
        if let Some(addresses) = &self.addresses {
            addresses.trim();
        }
    }
}

/// A refusal by a token bucket: which one, and how long until the next is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub &'static str, pub Duration);

impl Refused {
    /// Whole seconds for `Retry-After`, rounded up, at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        let wait = self.1;
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    }
}

/// rate per second with a burst (0: twice the rate); None when the rate is 0 (off).
fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst =
        NonZeroU32::new(burst).unwrap_or(rate.saturating_mul(NonZeroU32::MIN.saturating_add(1)));
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// IPv6 clients are keyed by their /64: one host usually owns a whole /64, and could
/// otherwise take a fresh bucket per address.
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// One keyed limiter with its memory bound.
struct Keyed<K: Hash + Eq + Clone> {
    name: &'static str,
    quota: Quota,
    max_keys: usize,
    limiter: RwLock<DefaultKeyedRateLimiter<K>>,
    checks: AtomicUsize,
    /// The check count at which the next trim runs (`trim` plans it).
    next_trim: AtomicUsize,
    /// Held by the one trim running: the checks that reach `next_trim` meanwhile (and
    /// the periodic trim) do not scan the keys again, nor start the limiter over twice.
    trimming: std::sync::Mutex<()>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(name: &'static str, quota: Quota, max_keys: usize) -> Keyed<K> {
        Keyed {
            name,
            quota,
            max_keys,
            limiter: RwLock::new(RateLimiter::dashmap(quota)),
            checks: AtomicUsize::new(0),
            next_trim: AtomicUsize::new(limits::RATE_TRIM_EVERY),
            trimming: std::sync::Mutex::new(()),
        }
    }

    fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_with(key, K::clone)
    }

    /// `owned` makes the map's key from a borrowed one (a `&str` user id).
    fn check_with<Q: ?Sized>(&self, key: &Q, owned: impl FnOnce(&Q) -> K) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) >= self.next_trim.load(Ordering::Relaxed) {
            self.trim();
        }
        let limiter = self.limiter.read().expect("limiter lock");
        match limiter.check_key(&owned(key)) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(not_until.wait_time_from(limiter.clock().now())),
        }
    }

    /// Drops keys whose bucket is full again; starts over when that leaves less room
    /// than RATE_TRIM_EVERY. Then plans the next trim: after a quarter as many checks
    /// as keys are left, so a check pays for looking at 4 keys at most however many
    /// users are active (a trim every RATE_TRIM_EVERY checks looked at all of them:
    /// with 60,000 users, 234 keys per check), and never after more checks than keys
    /// still fit (a check adds one key at most), so `len() <= max_keys` holds.
    fn trim(&self) {
        let Ok(_trimming) = self.trimming.try_lock() else {
            return;
        };
        let checked = self.checks.load(Ordering::Relaxed);
        let mut left = {
            let limiter = self.limiter.read().expect("limiter lock");
            limiter.retain_recent();
            limiter.len()
        };
        if left + limits::RATE_TRIM_EVERY > self.max_keys {
            *self.limiter.write().expect("limiter lock") = RateLimiter::dashmap(self.quota);
            metrics::counter!("flashgate_rate_limiter_resets_total", "limiter" => self.name)
                .increment(1);
            left = 0;
        }
        let next = (left / 4).clamp(limits::RATE_TRIM_EVERY, self.max_keys - left);
        self.next_trim.store(checked + next, Ordering::Relaxed);
        metrics::gauge!("flashgate_rate_limiter_keys", "limiter" => self.name)
            .set(self.len() as f64);
    }

    fn len(&self) -> usize {
        self.limiter.read().expect("limiter lock").len()
    }
}

// ---------------------------------------------------------------- client address

/// Where the client address comes from: the TCP peer, unless the peer is a trusted
/// proxy and the configured header names the client.
struct ClientAddress {
    header: Option<HeaderName>,
    trusted: Vec<Cidr>,
}

impl ClientAddress {
    fn new(header: Option<&str>, trusted: &[String]) -> Result<ClientAddress, String> {
        let header = header
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                HeaderName::try_from(h)
                    .map_err(|_| format!("FLASHGATE_CLIENT_IP_HEADER: `{h}` is not a header name"))
            })
            .transpose()?;
        let trusted = trusted
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| {
                Cidr::parse(t).ok_or_else(|| {
                    format!("FLASHGATE_TRUSTED_PROXIES: `{t}` is not an address or CIDR")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if header.is_some() && trusted.is_empty() {
            return Err(
                "FLASHGATE_CLIENT_IP_HEADER needs FLASHGATE_TRUSTED_PROXIES: a header from \
                 anyone else is whatever the client wrote"
                    .into(),
            );
        }
        Ok(ClientAddress { header, trusted })
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted.iter().any(|cidr| cidr.contains(address))
    }

    /// The header's addresses right to left (each proxy appends the one it saw): the
    /// first that is not a trusted proxy is the client. An unparsable entry stops the
    /// walk at the last good one.
    fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        let Some(header) = &self.header else {
            return peer;
        };
        if !self.is_trusted(peer) {
            return peer;
        }
        let values: Vec<&str> = headers
            .get_all(header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        let mut client = peer;
        for raw in values.into_iter().rev() {
            let Some(address) = parse_address(raw.trim()) else {
                break;
            };
            client = address;
            if !self.is_trusted(address) {
                break;
            }
        }
        client
    }
}

/// `1.2.3.4`, `2001:db8::1`, `1.2.3.4:5678` or `[2001:db8::1]:5678`.
fn parse_address(raw: &str) -> Option<IpAddr> {
    raw.parse::<IpAddr>()
        .ok()
        .or_else(|| raw.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|a| a.to_canonical())
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy)]
struct Cidr {
    network: IpAddr,
    prefix: u32,
}

impl Cidr {
    fn parse(raw: &str) -> Option<Cidr> {
        let (address, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u32>().ok()?)),
            None => (raw.parse::<IpAddr>().ok()?, None),
        };
        let address = address.to_canonical();
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Cidr {
            network: address,
            prefix,
        })
    }

    fn contains(&self, address: IpAddr) -> bool {
        let masked = |a: u128, bits: u32| {
            let host_bits = bits - self.prefix;
            if host_bits >= 128 {
                0
            } else {
                a >> host_bits
            }
        };
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), 32) == masked(u32::from(a).into(), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => masked(n.into(), 128) == masked(a.into(), 128),
            _ => false,
        }
    }
}

// ---------------------------------------------------------------- middleware

/// Paths never shed: probes and scrapes must answer while the gateway is busy.
const NEVER_SHED: [&str; 2] = ["/healthz", "/metrics"];

/// Outermost: a request beyond the in-flight cap is answered 503 at once instead of
/// waiting in a queue. The permit is held until the answer is ready.
/// Load shedding, before anything else (http's `edge` layer): a permit of the
/// in-flight cap to hold until the answer is written, none when there is no cap (or
/// for the probes that are never shed), or the refusal.
pub fn shed(
    admission: &Admission,
    request: &Request,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Overloaded> {
    let Some(in_flight) = &admission.in_flight else {
        return Ok(None);
    };
    if NEVER_SHED.contains(&request.uri().path()) {
        return Ok(None);
    }
    match in_flight.clone().try_acquire_owned() {
        Ok(permit) => Ok(Some(permit)),
        Err(_) => {
            metrics::counter!("flashgate_admission_refused_total", "reason" => "in_flight")
                .increment(1);
            Err(Overloaded)
        }
    }
}

/// The in-flight cap was reached: 503 `overloaded`, retry after a second.
pub struct Overloaded;

impl axum::response::IntoResponse for Overloaded {
    fn into_response(self) -> Response {
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight; retry shortly",
            1,
        )
    }
}

/// On the reserve route, first thing (its handler's first extractor, not a middleware
/// layer: no extra boxed future per reserve): the token buckets of the client address
/// and of the user. The token is verified once, here: a request without a valid token
/// spends only its address's bucket (a forged `sub` never spends a real user's), and
/// gets its 401 from the caller. `Err` is the 429 answer.
pub async fn admit_reserve(
    state: &AppState,
    parts: &Parts,
) -> Result<Result<String, AuthFailure>, Response> {
    let admission = &state.admission;
    let client = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| admission.client_address(peer.ip(), &parts.headers));
    let user = match bearer(&parts.headers) {
        Ok(token) => state.auth.user(token).await,
        Err(failure) => Err(failure),
    };
    match admission.check_reserve(user.as_deref().ok(), client) {
        Ok(()) => Ok(user),
        Err(refused) => Err({
            metrics::counter!("flashgate_admission_refused_total", "reason" => refused.0)
                .increment(1);
            let who = if refused.0 == "user" {
                "this user"
            } else {
                "this client address"
            };
            refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!("too many reservations from {who}; retry after the Retry-After seconds"),
                refused.retry_after_seconds(),
            )
        }),
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        // None, or two: which one would count is a guess.
        return Err(AuthFailure::MissingBearer);
    };
    let (scheme, token) = value
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .ok_or(AuthFailure::MissingBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::MissingBearer);
    }
    match token.trim() {
        "" => Err(AuthFailure::MissingBearer),
        token => Ok(token),
    }
}

fn refusal(status: StatusCode, code: &'static str, detail: &str, retry_after: u64) -> Response {
    let mut response = http::problem(status, code, detail);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

#[cfg(test)]
mod tests {

    /// `shed` as the gateway's edge layer uses it: the permit held until the answer.
    async fn shed_layer(
        axum::extract::State(admission): axum::extract::State<Arc<Admission>>,
        request: Request,
        next: Next,
    ) -> Response {
        match shed(&admission, &request) {
            Ok(_in_flight) => next.run(request).await,
            Err(refused) => axum::response::IntoResponse::into_response(refused),
        }
    }
    use super::*;
    use axum::middleware::Next;

    #[test]
    fn bearer_takes_one_authorization_header_of_the_bearer_scheme() {
        let headers = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            }
            headers
        };
        for (values, expected) in [
            (&["Bearer abc.def.ghi"][..], Ok("abc.def.ghi")),
            (&["bearer  tok "][..], Ok("tok")),
            (&["BEARER tok"][..], Ok("tok")),
            (&[][..], Err(AuthFailure::MissingBearer)),
            (&["Bearer"][..], Err(AuthFailure::MissingBearer)),
            (&["Bearer "][..], Err(AuthFailure::MissingBearer)),
            (&["Basic dXNlcjpwdw=="][..], Err(AuthFailure::MissingBearer)),
            (&["tok"][..], Err(AuthFailure::MissingBearer)),
            (
                &["Bearer a", "Bearer b"][..],
                Err(AuthFailure::MissingBearer),
            ),
        ] {
            assert_eq!(bearer(&headers(values)), expected, "{values:?}");
        }
    }

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            rate_per_user: 1,
            rate_per_user_burst: 2,
            rate_per_address: 1,
            rate_per_address_burst: 1,
            rate_max_keys: 1000,
            ..AdmissionSettings::default()
        }
    }

    #[test]
    fn a_user_over_the_burst_waits_and_others_do_not() {
        let admission = Admission::new(&settings()).unwrap();
        assert!(admission.check_reserve(Some("alice"), None).is_ok());
        assert!(admission.check_reserve(Some("alice"), None).is_ok());
        let refused = admission.check_reserve(Some("alice"), None).unwrap_err();
        assert_eq!(refused.0, "user");
        assert!(refused.1 > Duration::ZERO && refused.1 <= Duration::from_secs(1));
        assert_eq!(refused.retry_after_seconds(), 1);
        assert!(admission.check_reserve(Some("bob"), None).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(
            Refused("user", Duration::from_millis(1)).retry_after_seconds(),
            1
        );
        assert_eq!(Refused("user", Duration::ZERO).retry_after_seconds(), 1);
        assert_eq!(
            Refused("user", Duration::from_millis(2001)).retry_after_seconds(),
            3
        );
    }

    #[test]
    fn invented_ids_never_grow_a_limiter_past_its_cap() {
        let admission = Admission::new(&settings()).unwrap();
        let mut most = (0, 0);
        for n in 0..100_000u32 {
            let user = format!("invented-{n}");
            let address = IpAddr::from(n.wrapping_mul(2_654_435_761).to_be_bytes());
            let _ = admission.check_reserve(Some(&user), Some(address));
            let (users, addresses) = admission.keys();
            most = (most.0.max(users), most.1.max(addresses));
        }
        assert!(most.0 <= 1000 && most.1 <= 1000, "keys grew to {most:?}");
        assert!(most.0 > 500, "the limiter did remember keys: {most:?}");
    }

    #[test]
    fn a_trim_is_paid_for_by_checks_of_a_quarter_of_the_keys_it_keeps() {
        let admission = Admission::new(&AdmissionSettings {
            rate_max_keys: 100_000,
            ..settings()
        })
        .unwrap();
        for n in 0..40_000u32 {
            let _ = admission.check_reserve(Some(&format!("active-{n}")), None);
        }
        let users = admission.users.as_ref().unwrap();
        users.trim();
        let kept = users.len();
        assert!(kept > 30_000, "the active users are kept: {kept}");
        let until_next =
            users.next_trim.load(Ordering::Relaxed) - users.checks.load(Ordering::Relaxed);
        assert_eq!(until_next, kept / 4);
    }

    #[test]
    fn a_trim_never_plans_more_checks_than_keys_still_fit() {
        let admission = Admission::new(&AdmissionSettings {
            rate_max_keys: 2_000,
            ..settings()
        })
        .unwrap();
        let users = admission.users.as_ref().unwrap();
        for n in 0..1_700u32 {
            let _ = admission.check_reserve(Some(&format!("near-{n}")), None);
        }
        // 1,700 active keys: a quarter of them (425) is more than the 300 that fit.
        users.trim();
        let kept = users.len();
        let until_next =
            users.next_trim.load(Ordering::Relaxed) - users.checks.load(Ordering::Relaxed);
        assert_eq!((kept, until_next), (1_700, 300));
        for n in 0..600u32 {
            let _ = admission.check_reserve(Some(&format!("more-{n}")), None);
            assert!(users.len() <= 2_000, "{} keys after {n} more", users.len());
        }
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let admission = Admission::new(&AdmissionSettings::off()).unwrap();
        for _ in 0..1000 {
            assert!(admission
                .check_reserve(Some("alice"), Some([10, 0, 0, 1].into()))
                .is_ok());
        }
        assert!(admission.in_flight.is_none());
    }

    #[test]
    fn the_header_counts_only_from_trusted_proxies() {
        let client = ClientAddress::new(
            Some("X-Forwarded-For"),
            &["10.0.0.0/8".into(), "192.168.1.7".into()],
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.9, 10.1.2.3".parse().unwrap(),
        );
        let proxy: IpAddr = [10, 9, 9, 9].into();
        let stranger: IpAddr = [198, 51, 100, 1].into();
        assert_eq!(
            client.resolve(proxy, &headers),
            IpAddr::from([203, 0, 113, 9]),
            "the rightmost untrusted hop, not what the client wrote first"
        );
        assert_eq!(client.resolve(stranger, &headers), stranger);
        assert_eq!(
            client.resolve([192, 168, 1, 7].into(), &HeaderMap::new()),
            IpAddr::from([192, 168, 1, 7])
        );
        headers.insert("x-forwarded-for", "junk".parse().unwrap());
        assert_eq!(client.resolve(proxy, &headers), proxy);
        let none = ClientAddress::new(None, &[]).unwrap();
        headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        assert_eq!(none.resolve(proxy, &headers), proxy);
        assert!(ClientAddress::new(Some("x-forwarded-for"), &[]).is_err());
        assert!(ClientAddress::new(None, &["10.0.0.0/33".into()]).is_err());
        assert!(ClientAddress::new(Some("bad header"), &["10.0.0.1".into()]).is_err());
    }

    #[test]
    fn cidrs_and_ipv6_keys() {
        let block = Cidr::parse("2001:db8::/32").unwrap();
        assert!(block.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!block.contains("2001:db9::5".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains([8, 8, 8, 8].into()));
        assert!(Cidr::parse("127.0.0.1")
            .unwrap()
            .contains("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(
            address_key("2001:db8::1".parse().unwrap()),
            address_key("2001:db8::ffff:2".parse().unwrap())
        );
        assert_eq!(
            parse_address("[2001:db8::1]:443"),
            Some("2001:db8::1".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn requests_over_the_in_flight_cap_are_shed_at_once() {
        use axum::routing::get;
        use std::sync::atomic::AtomicBool;
        use tower_service::Service;
        let admission = Arc::new(
            Admission::new(&AdmissionSettings {
                max_in_flight: 1,
                ..AdmissionSettings::off()
            })
            .unwrap(),
        );
        let release = Arc::new(tokio::sync::Notify::new());
        let entered = Arc::new(AtomicBool::new(false));
        let (held, flag) = (release.clone(), entered.clone());
        let mut app = axum::Router::new()
            .route(
                "/slow",
                get(move || {
                    let (flag, held) = (flag.clone(), held.clone());
                    async move {
                        flag.store(true, Ordering::SeqCst);
                        held.notified().await;
                        "done"
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(admission, shed_layer));
        let get = |path: &str| Request::get(path).body(axum::body::Body::empty()).unwrap();
        let mut first = app.clone();
        let slow = tokio::spawn(async move { first.call(get("/slow")).await.unwrap() });
        while !entered.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        let shed = tokio::time::timeout(Duration::from_secs(1), app.call(get("/slow")))
            .await
            .expect("answered at once")
            .unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[RETRY_AFTER], "1");
        let health = app.call(get("/healthz")).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK, "probes are never shed");
        release.notify_one();
        assert_eq!(slow.await.unwrap().status(), StatusCode::OK);
        let after = app.call(get("/slow"));
        release.notify_one();
        assert_eq!(
            after.await.unwrap().status(),
            StatusCode::OK,
            "the permit came back"
        );
    }
}
