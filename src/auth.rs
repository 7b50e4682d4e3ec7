//! Who is calling: users by JWT, the payment/order service by a shared token compared
//! in constant time. Knows nothing of HTTP.
//!
//! User tokens are HS256, signed with `FLASHGATE_JWT_SECRET` or one of the previous
//! secrets (a rolling rotation), or RS256/ES256, signed by a key of the JWK set at
//! `FLASHGATE_JWT_JWKS_URL` (see [`jwks`]). The algorithm of a token decides where its
//! key comes from, and never the other way round: an HS256 token is only checked
//! against the secrets, an RS256/ES256 token only against a public key of the set whose
//! type fits its algorithm. Every refusal says why in a few words ([`AuthFailure`]).

pub mod jwks;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

use crate::limits::USER_ID_MAX_LEN;
pub use jwks::KeySet;

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

/// A claim a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Exp,
    Nbf,
    Sub,
    Iss,
    Aud,
}

/// Why a bearer was refused: the `detail` of the 401 (its `code` is always
/// `unauthorized`). The words never contain a secret, a key or the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingBearer,
    Malformed,
    /// `alg` is not HS256 (with a secret), RS256 or ES256 (with a JWK set): `none`,
    /// HS512, PS256, ... or HS256 on a gateway without a secret.
    AlgorithmNotAccepted,
    BadSignature,
    Expired,
    NotYetValid,
    /// An RS256/ES256 token without `kid`.
    KidMissing,
    /// No key of the JWK set has the token's `kid` (after a refresh, if one was due).
    UnknownKey,
    /// The key named by `kid` cannot verify the token's algorithm (an RSA key for an
    /// ES256 token, an HMAC `oct` key, a key whose `alg` or `use` differs, ...).
    KeyNotForAlgorithm,
    WrongIssuer,
    WrongAudience,
    ClaimMissing(Claim),
    ClaimMalformed(Claim),
    SubEmpty,
    SubTooLong,
    /// The service token sent to a user route.
    ServiceTokenOnUserRoute,
    /// Something JWT-shaped sent to a service route.
    UserTokenOnServiceRoute,
    /// Any other bearer on a service route.
    NotServiceToken,
}

impl AuthFailure {
    pub fn detail(&self) -> &'static str {
        use AuthFailure::*;
        match self {
            MissingBearer => "missing bearer token (Authorization: Bearer ...)",
            Malformed => "malformed token",
            AlgorithmNotAccepted => "token algorithm not accepted",
            BadSignature => "bad token signature",
            Expired => "token expired",
            NotYetValid => "token not yet valid (nbf)",
            KidMissing => "token has no kid",
            UnknownKey => "unknown signing key (kid)",
            KeyNotForAlgorithm => "the key named by kid is not for the token's algorithm",
            WrongIssuer => "wrong token issuer",
            WrongAudience => "wrong token audience",
            ClaimMissing(Claim::Exp) => "token has no exp",
            ClaimMissing(Claim::Nbf) => "token has no nbf",
            ClaimMissing(Claim::Sub) => "token has no sub",
            ClaimMissing(Claim::Iss) => "token has no iss",
            ClaimMissing(Claim::Aud) => "token has no aud",
            ClaimMalformed(Claim::Exp) => "token exp is not a number",
            ClaimMalformed(Claim::Nbf) => "token nbf is not a number",
            ClaimMalformed(Claim::Sub) => "token sub is malformed",
            ClaimMalformed(Claim::Iss) => "token iss is malformed",
            ClaimMalformed(Claim::Aud) => "token aud is malformed",
            SubEmpty => "token sub is empty",
            SubTooLong => "token sub is longer than 64 characters",
            ServiceTokenOnUserRoute => "the service token is not a user token",
            UserTokenOnServiceRoute => "a user token is not the service token",
            NotServiceToken => "not the service token",
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.detail())
    }
}

impl std::error::Error for AuthFailure {}

/// What a user token must carry for us; the values of the rest are checked by
/// `Validation`. Optional, so that a missing claim is told as such (by `subject`)
/// instead of failing the whole deserialisation.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    /// Only whether they are there (`Validation` checks their values).
    #[serde(default)]
    iss: Option<IgnoredAny>,
    #[serde(default)]
    aud: Option<IgnoredAny>,
}

#[derive(Debug, Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// The algorithms a token may name; anything else is refused before a key is looked at.
const ACCEPTED: [&str; 3] = ["HS256", "RS256", "ES256"];

#[derive(Clone)]
pub struct Authenticator {
    /// The current secret first, then the previous ones; empty: HS256 is refused.
    secrets: Arc<[DecodingKey]>,
    /// HS256 only.
    hs256: Validation,
    rs256: Validation,
    es256: Validation,
    /// The public keys of `FLASHGATE_JWT_JWKS_URL`, if set; else RS256/ES256 are refused.
    key_set: Option<Arc<KeySet>>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    leeway_seconds: u64,
    /// An issuer, an audience is configured: the claim must be there.
    require_iss: bool,
    require_aud: bool,
    service_token_digest: [u8; 32],
    /// User tokens verified lately (shared by the clones).
    verified: Arc<VerifiedTokens>,
}

/// What verifying a user token found, kept for its next requests.
#[derive(Clone)]
struct Verified {
    sub: String,
    exp: u64,
    /// The JWK set's keys it was verified with (None: a secret, fixed for the
    /// process): a later set without them verifies it again.
    keys: Option<Arc<jwks::Keys>>,
}

/// Bytes of verified tokens kept: each weighs its bearer, its subject and 128 bytes of
/// overhead, so about 80,000 tokens of 250 bytes; the least used go first.
const VERIFIED_BYTES: u64 = 32 << 20;

#[derive(Clone)]
struct TokenWeight;

impl quick_cache::Weighter<String, Verified> for TokenWeight {
    fn weight(&self, bearer: &String, verified: &Verified) -> u64 {
        (bearer.len() + verified.sub.len() + 128) as u64
    }
}

/// Bearer → what its verification found. A user sends the same token with each of
/// its requests; a hit spares the signature check, the base64 and the JSON of the
/// header and claims (a third of the instructions of a sold-out answer).
/// Only tokens that verified are kept, so no caller can fill it with its own; the
/// claims that change with time (`exp`) are checked again on every hit.
type VerifiedTokens = quick_cache::sync::Cache<String, Verified, TokenWeight>;

fn verified_tokens() -> Arc<VerifiedTokens> {
    Arc::new(VerifiedTokens::with_weighter(
        (VERIFIED_BYTES / 400) as usize,
        VERIFIED_BYTES,
        TokenWeight,
    ))
}

impl Authenticator {
    /// HS256 with one secret (add others with [`Authenticator::with_previous_secrets`]).
    pub fn new(jwt_secret: &str, service_token: &str) -> Authenticator {
        Authenticator::with_secret(Some(jwt_secret), service_token)
    }

    /// `None`: no HS256 token verifies (a gateway that only takes tokens of a JWK set).
    pub fn with_secret(jwt_secret: Option<&str>, service_token: &str) -> Authenticator {
        let validation = |alg| {
            let mut validation = Validation::new(alg);
            // Which claims must be there is checked by `subject`, in a fixed order
            // (jsonwebtoken's order varies, and so would the detail).
            validation.set_required_spec_claims::<&str>(&[]);
            validation.validate_nbf = true;
            validation.leeway = 0;
            validation
        };
        Authenticator {
            secrets: jwt_secret
                .map(|secret| DecodingKey::from_secret(secret.as_bytes()))
                .into_iter()
                .collect(),
            hs256: validation(Algorithm::HS256),
            rs256: validation(Algorithm::RS256),
            es256: validation(Algorithm::ES256),
            key_set: None,
            leeway_seconds: 0,
            require_iss: false,
            require_aud: false,
            service_token_digest: Sha256::digest(service_token.as_bytes()).into(),
            verified: verified_tokens(),
        }
    }

    /// Earlier HS256 secrets whose tokens are still accepted (tried in order after the
    /// current one, only when its signature does not match). Ignored without a current
    /// secret (the configuration refuses that).
    pub fn with_previous_secrets<S: AsRef<str>>(mut self, previous: &[S]) -> Authenticator {
        self.verified = verified_tokens(); // other rules: what verified before may not
        if !self.secrets.is_empty() {
            let mut secrets = self.secrets.to_vec();
            secrets.extend(
                previous
                    .iter()
                    .map(|secret| DecodingKey::from_secret(secret.as_ref().as_bytes())),
            );
            self.secrets = secrets.into();
        }
        self
    }

    /// RS256 and ES256 tokens verify against the keys of this set.
    pub fn with_key_set(mut self, key_set: Arc<KeySet>) -> Authenticator {
        self.verified = verified_tokens(); // other rules: what verified before may not
        self.key_set = Some(key_set);
        self
    }

    pub fn key_set(&self) -> Option<&Arc<KeySet>> {
        self.key_set.as_ref()
    }

    /// Every user token must have `iss` equal to this.
    pub fn with_issuer(mut self, issuer: &str) -> Authenticator {
        self.verified = verified_tokens(); // other rules: what verified before may not
        for validation in self.validations() {
            validation.set_issuer(&[issuer]);
        }
        self.require_iss = true;
        self
    }

    /// Every user token must have `aud` equal to this, or an array containing it.
    /// Without one, a token that has an `aud` is refused (RFC 7519 4.1.3: we cannot
    /// tell it is meant for us).
    pub fn with_audience(mut self, audience: &str) -> Authenticator {
        self.verified = verified_tokens(); // other rules: what verified before may not
        for validation in self.validations() {
            validation.set_audience(&[audience]);
        }
        self.require_aud = true;
        self
    }

    /// Allows `leeway` of clock skew between the token issuer and us on `exp` and
    /// `nbf` (whole seconds, as the claims are).
    pub fn with_leeway(mut self, leeway: std::time::Duration) -> Authenticator {
        self.verified = verified_tokens(); // other rules: what verified before may not
        self.leeway_seconds = leeway.as_secs();
        for validation in self.validations() {
            validation.leeway = leeway.as_secs();
        }
        self
    }

    fn validations(&mut self) -> [&mut Validation; 3] {
        [&mut self.hs256, &mut self.rs256, &mut self.es256]
    }

    /// A user JWT's subject, or why the bearer is none. Awaits only for an RS256/ES256
    /// token whose `kid` the JWK set does not know: then the set is fetched again (at
    /// most once per its minimum interval, shared by all such requests) and looked at
    /// once more.
    pub async fn user(&self, bearer: &str) -> Result<String, AuthFailure> {
        let verdict = match self.user_now(bearer) {
            Err(AuthFailure::UnknownKey) => match &self.key_set {
                Some(key_set) => {
                    // Boxed: the fetch's future is large, and inline it would be
                    // copied with every reserve's future (axum boxes each handler's).
                    Box::pin(key_set.refresh_for_unknown_kid()).await;
                    self.user_now(bearer)
                }
                None => Err(AuthFailure::UnknownKey),
            },
            verdict => verdict,
        };
        // Hashing the bearer only on the refusal path keeps the valid one fast.
        verdict.map_err(|failure| {
            if self.is_service(bearer) {
                AuthFailure::ServiceTokenOnUserRoute
            } else {
                failure
            }
        })
    }

    /// [`Authenticator::user`] with the keys at hand: never waits, and answers
    /// `UnknownKey` where `user` may first refresh the JWK set.
    pub fn user_now(&self, bearer: &str) -> Result<String, AuthFailure> {
        self.user_at(bearer, unix_now())
    }

    /// [`Authenticator::user_now`] at `now` (Unix seconds; tests move it).
    fn user_at(&self, bearer: &str, now: u64) -> Result<String, AuthFailure> {
        if bearer.is_empty() {
            return Err(AuthFailure::MissingBearer);
        }
        if let Some(verified) = self.verified.get(bearer) {
            let keys_current = match (&verified.keys, &self.key_set) {
                (None, _) => true,
                (Some(keys), Some(key_set)) => Arc::ptr_eq(keys, &key_set.keys()),
                (Some(_), None) => false,
            };
            if keys_current {
                if verified.exp.saturating_add(self.leeway_seconds) <= now {
                    self.verified.remove(bearer);
                    return Err(AuthFailure::Expired);
                }
                return Ok(verified.sub);
            }
        }
        let (claims, keys) = match self.secrets.split_first() {
            Some((current, previous)) => match decode::<Claims>(bearer, current, &self.hs256) {
                Ok(data) => (data.claims, None),
                Err(error) => match error.kind() {
                    ErrorKind::InvalidSignature => (self.previous_secrets(bearer, previous)?, None),
                    // Not HS256: maybe a key of the set.
                    ErrorKind::InvalidAlgorithm => self.public_key(bearer)?,
                    _ => return Err(failure(&error, bearer)),
                },
            },
            None => self.public_key(bearer)?,
        };
        let exp = claims.exp;
        let sub = self.subject(claims, now)?;
        if let Some(exp) = exp {
            let verified = Verified {
                sub: sub.clone(),
                exp,
                keys,
            };
            self.verified.insert(bearer.to_owned(), verified);
        }
        Ok(sub)
    }

    fn previous_secrets(
        &self,
        bearer: &str,
        previous: &[DecodingKey],
    ) -> Result<Claims, AuthFailure> {
        for secret in previous {
            match decode::<Claims>(bearer, secret, &self.hs256) {
                Ok(data) => return Ok(data.claims),
                Err(error) if matches!(error.kind(), ErrorKind::InvalidSignature) => continue,
                Err(error) => return Err(failure(&error, bearer)),
            }
        }
        Err(AuthFailure::BadSignature)
    }

    /// An RS256/ES256 token, by the key of the set its `kid` names; and the set's keys
    /// it was verified with.
    fn public_key(&self, bearer: &str) -> Result<(Claims, Option<Arc<jwks::Keys>>), AuthFailure> {
        let header = decode_header(bearer).map_err(|error| failure(&error, bearer))?;
        let validation = match header.alg {
            Algorithm::RS256 => &self.rs256,
            Algorithm::ES256 => &self.es256,
            _ => return Err(AuthFailure::AlgorithmNotAccepted),
        };
        let key_set = self
            .key_set
            .as_ref()
            .ok_or(AuthFailure::AlgorithmNotAccepted)?;
        let kid = header.kid.as_deref().ok_or(AuthFailure::KidMissing)?;
        let keys = key_set.keys();
        let key = keys.find(kid, header.alg)?;
        let claims = decode::<Claims>(bearer, key, validation)
            .map(|data| data.claims)
            .map_err(|error| failure(&error, bearer))?;
        Ok((claims, Some(keys)))
    }

    fn subject(&self, claims: Claims, now: u64) -> Result<String, AuthFailure> {
        let exp = claims.exp.ok_or(AuthFailure::ClaimMissing(Claim::Exp))?;
        // jsonwebtoken still accepts `exp == now`; RFC 7519 4.1.4 says "on or after"
        // `exp` the token must be refused.
        if exp.saturating_add(self.leeway_seconds) <= now {
            return Err(AuthFailure::Expired);
        }
        let sub = claims.sub.ok_or(AuthFailure::ClaimMissing(Claim::Sub))?;
        if self.require_iss && claims.iss.is_none() {
            return Err(AuthFailure::ClaimMissing(Claim::Iss));
        }
        if self.require_aud && claims.aud.is_none() {
            return Err(AuthFailure::ClaimMissing(Claim::Aud));
        }
        match sub.chars().count() {
            0 => Err(AuthFailure::SubEmpty),
            length if length > USER_ID_MAX_LEN => Err(AuthFailure::SubTooLong),
            _ => Ok(sub),
        }
    }

    /// Constant time: both sides are hashed first, so neither content nor length leaks.
    pub fn is_service(&self, bearer: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        digest.ct_eq(&self.service_token_digest).into()
    }

    /// The service, or why not.
    pub fn service(&self, bearer: &str) -> Result<(), AuthFailure> {
        if self.is_service(bearer) {
            Ok(())
        } else if bearer.is_empty() {
            Err(AuthFailure::MissingBearer)
        } else if bearer.bytes().filter(|&b| b == b'.').count() == 2 {
            Err(AuthFailure::UserTokenOnServiceRoute)
        } else {
            Err(AuthFailure::NotServiceToken)
        }
    }

    pub async fn caller(&self, bearer: &str) -> Result<Caller, AuthFailure> {
        if self.is_service(bearer) {
            return Ok(Caller::Service);
        }
        self.user(bearer).await.map(Caller::User)
    }
}

/// The refusal for an error of jsonwebtoken.
fn failure(error: &JwtError, bearer: &str) -> AuthFailure {
    let claim = |name: &str| match name {
        "exp" => Some(Claim::Exp),
        "nbf" => Some(Claim::Nbf),
        "sub" => Some(Claim::Sub),
        "iss" => Some(Claim::Iss),
        "aud" => Some(Claim::Aud),
        _ => None,
    };
    match error.kind() {
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthFailure::AlgorithmNotAccepted
        }
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
        ErrorKind::MissingRequiredClaim(name) => {
            claim(name).map_or(AuthFailure::Malformed, AuthFailure::ClaimMissing)
        }
        ErrorKind::InvalidClaimFormat(name) => {
            claim(name).map_or(AuthFailure::Malformed, AuthFailure::ClaimMalformed)
        }
        // The key cannot verify this algorithm (the set's keys are checked when fetched,
        // so this is a safety net).
        ErrorKind::InvalidKeyFormat | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) => {
            AuthFailure::KeyNotForAlgorithm
        }
        // A header jsonwebtoken cannot read may still name an algorithm it does not
        // know (`none`): say that rather than "malformed".
        _ => match header_alg(bearer) {
            Some(alg) if !ACCEPTED.contains(&alg.as_str()) => AuthFailure::AlgorithmNotAccepted,
            _ => AuthFailure::Malformed,
        },
    }
}

/// The `alg` of a token's header, read without jsonwebtoken (which refuses to parse a
/// header naming an algorithm it does not implement). Only on the refusal path.
fn header_alg(bearer: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    let (header, _) = bearer.split_once('.')?;
    let json = URL_SAFE_NO_PAD.decode(header).ok()?;
    serde_json::from_slice::<AlgOnly>(&json).ok().map(|h| h.alg)
}

/// A development/testing token for `sub`, valid `ttl_seconds` from now.
pub fn issue_user_token(jwt_secret: &str, sub: &str, ttl_seconds: u64) -> anyhow::Result<String> {
    issue_user_token_for(jwt_secret, sub, ttl_seconds, None, None)
}

/// [`issue_user_token`] with an `iss` and an `aud` (for a gateway that requires them).
pub fn issue_user_token_for(
    jwt_secret: &str,
    sub: &str,
    ttl_seconds: u64,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    let length = sub.chars().count();
    anyhow::ensure!(
        (1..=USER_ID_MAX_LEN).contains(&length),
        "--sub must be 1..={USER_ID_MAX_LEN} characters"
    );
    let claims = IssuedClaims {
        sub,
        exp: unix_now() + ttl_seconds,
        iss: issuer,
        aud: audience,
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
mod tests;
