//! Who is calling: users by HS256 JWT (algorithm pinned), the payment/order service
//! by a shared token compared in constant time. Knows nothing of HTTP.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limits::USER_ID_MAX_LEN;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    User(String),
    Service,
}

impl Caller {
    /// The user id to check ownership against; None for the service, which may act on any.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Caller::User(id) => Some(id),
            Caller::Service => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    validation: Validation,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    leeway_seconds: u64,
    service_token_digest: [u8; 32],
}

impl Authenticator {
    pub fn new(jwt_secret: &str, service_token: &str) -> Authenticator {
        // Only HS256 verifies: `alg: none` and every other algorithm are refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        Authenticator {
            decoding: DecodingKey::from_secret(jwt_secret.as_bytes()),
            validation,
            leeway_seconds: 0,
            service_token_digest: Sha256::digest(service_token.as_bytes()).into(),
        }
    }

    /// Allows `leeway` of clock skew between the token issuer and us on `exp` and
    /// `nbf` (whole seconds, as the claims are).
    pub fn with_leeway(mut self, leeway: std::time::Duration) -> Authenticator {
        self.leeway_seconds = leeway.as_secs();
        self.validation.leeway = self.leeway_seconds;
        self
    }

    /// A user JWT's subject, or None for anything that is not a valid, unexpired
    /// HS256 token with a 1..=64 character `sub` (and an `nbf`, if any, not in the
    /// future).
    pub fn user(&self, bearer: &str) -> Option<String> {
        let data = decode::<Claims>(bearer, &self.decoding, &self.validation).ok()?;
        // jsonwebtoken still accepts `exp == now`; RFC 7519 4.1.4 says "on or after"
        // `exp` the token must be refused.
        if data.claims.exp.saturating_add(self.leeway_seconds) <= unix_now() {
            return None;
        }
        let length = data.claims.sub.chars().count();
        (1..=USER_ID_MAX_LEN)
            .contains(&length)
            .then_some(data.claims.sub)
    }

    /// Constant time: both sides are hashed first, so neither content nor length leaks.
    pub fn is_service(&self, bearer: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        digest.ct_eq(&self.service_token_digest).into()
    }

    pub fn caller(&self, bearer: &str) -> Option<Caller> {
        if self.is_service(bearer) {
            return Some(Caller::Service);
        }
        self.user(bearer).map(Caller::User)
    }
}

/// A development/testing token for `sub`, valid `ttl_seconds` from now.
pub fn issue_user_token(jwt_secret: &str, sub: &str, ttl_seconds: u64) -> anyhow::Result<String> {
    let length = sub.chars().count();
    anyhow::ensure!(
        (1..=USER_ID_MAX_LEN).contains(&length),
        "--sub must be 1..={USER_ID_MAX_LEN} characters"
    );
    let exp = unix_now() + ttl_seconds;
    let claims = Claims {
        sub: sub.to_owned(),
        exp,
    };
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(jwt_secret.as_bytes()),
    )?)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    const SECRET: &str = "test-secret-0123456789abcdef";

    fn auth() -> Authenticator {
        Authenticator::new(SECRET, "service-token-xyz")
    }

    fn forge(header: &str, claims: &str, signature: &str) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims),
            signature
        )
    }

    #[test]
    fn valid_token_names_its_user() {
        let token = issue_user_token(SECRET, "alice", 60).unwrap();
        assert_eq!(auth().user(&token).as_deref(), Some("alice"));
        assert_eq!(auth().caller(&token), Some(Caller::User("alice".into())));
    }

    #[test]
    fn wrong_secret_expired_and_alg_none_are_refused() {
        let other = issue_user_token("another-secret-0123456789", "alice", 60).unwrap();
        assert_eq!(auth().user(&other), None);
        let claims = format!(r#"{{"sub":"alice","exp":{}}}"#, unix_now() + 60);
        assert_eq!(
            auth().user(&forge(r#"{"alg":"none","typ":"JWT"}"#, &claims, "")),
            None
        );
        assert_eq!(
            auth().user(&forge(r#"{"alg":"HS512","typ":"JWT"}"#, &claims, "AAAA")),
            None
        );
        let expired = Claims {
            sub: "alice".into(),
            exp: unix_now() - 5,
        };
        let token = encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth().user(&token), None);
        assert_eq!(auth().user("garbage"), None);
        assert_eq!(auth().user(""), None);
    }

    fn signed(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn exp_must_be_in_the_future_and_nbf_in_the_past() {
        let now = unix_now();
        let at = |exp: u64| signed(serde_json::json!({"sub": "alice", "exp": exp}));
        assert_eq!(auth().user(&at(now)), None, "exp == now is expired");
        assert_eq!(auth().user(&at(now - 1)), None);
        assert_eq!(auth().user(&at(now + 5)).as_deref(), Some("alice"));
        let nbf =
            |nbf: u64| signed(serde_json::json!({"sub": "alice", "exp": now + 60, "nbf": nbf}));
        assert_eq!(auth().user(&nbf(now + 30)), None, "not yet valid");
        assert_eq!(auth().user(&nbf(now)).as_deref(), Some("alice"));
        let bad_nbf = signed(serde_json::json!({"sub": "alice", "exp": now + 60, "nbf": "soon"}));
        assert_eq!(auth().user(&bad_nbf), None);
        // With leeway, a little skew either way passes, and no more.
        let lenient = auth().with_leeway(std::time::Duration::from_secs(10));
        assert_eq!(lenient.user(&at(now)).as_deref(), Some("alice"));
        assert_eq!(lenient.user(&nbf(now + 5)).as_deref(), Some("alice"));
        assert_eq!(lenient.user(&nbf(now + 30)), None);
        assert_eq!(lenient.user(&at(now - 30)), None);
    }

    #[test]
    fn missing_or_oversized_sub_and_missing_exp_are_refused() {
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let header = Header::new(Algorithm::HS256);
        let no_exp = serde_json::json!({"sub": "alice"});
        assert_eq!(auth().user(&encode(&header, &no_exp, &key).unwrap()), None);
        let no_sub = serde_json::json!({"exp": unix_now() + 60});
        assert_eq!(auth().user(&encode(&header, &no_sub, &key).unwrap()), None);
        let long = serde_json::json!({"sub": "a".repeat(65), "exp": unix_now() + 60});
        assert_eq!(auth().user(&encode(&header, &long, &key).unwrap()), None);
        let empty = serde_json::json!({"sub": "", "exp": unix_now() + 60});
        assert_eq!(auth().user(&encode(&header, &empty, &key).unwrap()), None);
        assert!(issue_user_token(SECRET, "", 60).is_err());
    }

    #[test]
    fn service_token_must_match_exactly() {
        assert!(auth().is_service("service-token-xyz"));
        assert_eq!(auth().caller("service-token-xyz"), Some(Caller::Service));
        for bad in [
            "",
            "service-token-xy",
            "service-token-xyzz",
            "SERVICE-TOKEN-XYZ",
        ] {
            assert!(!auth().is_service(bad), "{bad:?}");
        }
    }
}
