use super::jwks::{KeySetSettings, Keys};
use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use serde_json::{json, Value};
use std::time::Duration;

const SECRET: &str = "test-secret-0123456789abcdef";
const SERVICE: &str = "service-token-xyz";

const RSA1: &[u8] = include_bytes!("../../tests/fixtures/jwt/rsa1.pem");
const RSA1_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/jwt/rsa1.pub.pem");
const RSA2: &[u8] = include_bytes!("../../tests/fixtures/jwt/rsa2.pem");
const EC1: &[u8] = include_bytes!("../../tests/fixtures/jwt/ec1.pem");
const JWKS: &str = include_str!("../../tests/fixtures/jwt/jwks.json");

use AuthFailure::*;

fn auth() -> Authenticator {
    Authenticator::new(SECRET, SERVICE)
}

fn forge(header: &str, claims: &str, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims),
        signature
    )
}

fn hs256(secret: &str, claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn signed(claims: Value) -> String {
    hs256(SECRET, claims)
}

fn valid_claims() -> Value {
    json!({"sub": "alice", "exp": unix_now() + 60})
}

#[test]
fn valid_token_names_its_user() {
    let token = issue_user_token(SECRET, "alice", 60).unwrap();
    assert_eq!(auth().user_now(&token).as_deref(), Ok("alice"));
}

#[tokio::test]
async fn callers_and_service_token() {
    let token = issue_user_token(SECRET, "alice", 60).unwrap();
    assert_eq!(auth().user(&token).await.as_deref(), Ok("alice"));
    assert_eq!(
        auth().caller(&token).await,
        Ok(Caller::User("alice".into()))
    );
    assert_eq!(auth().caller(SERVICE).await, Ok(Caller::Service));
    assert_eq!(auth().user(SERVICE).await, Err(ServiceTokenOnUserRoute));
    assert_eq!(auth().caller("garbage").await, Err(Malformed));
    assert_eq!(auth().service(SERVICE), Ok(()));
    assert_eq!(auth().service(&token), Err(UserTokenOnServiceRoute));
    assert_eq!(auth().service("not-it"), Err(NotServiceToken));
    assert_eq!(auth().service(""), Err(MissingBearer));
}

#[test]
fn each_refusal_says_why() {
    let now = unix_now();
    let claims = format!(r#"{{"sub":"alice","exp":{}}}"#, now + 60);
    let other = issue_user_token("another-secret-0123456789", "alice", 60).unwrap();
    let cases: Vec<(&str, String, AuthFailure)> = vec![
        ("empty", String::new(), MissingBearer),
        ("garbage", "garbage".into(), Malformed),
        ("two parts", "abc.def".into(), Malformed),
        ("bad base64", "!!!.???.###".into(), Malformed),
        ("other secret", other, BadSignature),
        (
            "alg none",
            forge(r#"{"alg":"none","typ":"JWT"}"#, &claims, ""),
            AlgorithmNotAccepted,
        ),
        (
            "alg None",
            forge(r#"{"alg":"None"}"#, &claims, ""),
            AlgorithmNotAccepted,
        ),
        (
            "HS512",
            forge(r#"{"alg":"HS512","typ":"JWT"}"#, &claims, "AAAA"),
            AlgorithmNotAccepted,
        ),
        (
            "RS256 without a key set",
            forge(r#"{"alg":"RS256","kid":"k"}"#, &claims, "AAAA"),
            AlgorithmNotAccepted,
        ),
        (
            "expired",
            signed(json!({"sub": "alice", "exp": now - 5})),
            Expired,
        ),
        (
            "exp == now",
            signed(json!({"sub": "alice", "exp": now})),
            Expired,
        ),
        (
            "not yet valid",
            signed(json!({"sub": "alice", "exp": now + 60, "nbf": now + 30})),
            NotYetValid,
        ),
        (
            "nbf not a number",
            signed(json!({"sub": "alice", "exp": now + 60, "nbf": "soon"})),
            ClaimMalformed(Claim::Nbf),
        ),
        (
            "no exp",
            signed(json!({"sub": "alice"})),
            ClaimMissing(Claim::Exp),
        ),
        (
            "no sub",
            signed(json!({"exp": now + 60})),
            ClaimMissing(Claim::Sub),
        ),
        (
            "empty sub",
            signed(json!({"sub": "", "exp": now + 60})),
            SubEmpty,
        ),
        (
            "65 characters",
            signed(json!({"sub": "a".repeat(65), "exp": now + 60})),
            SubTooLong,
        ),
        (
            "an aud nobody asked for",
            signed(json!({"sub": "alice", "exp": now + 60, "aud": "someone"})),
            WrongAudience,
        ),
    ];
    for (what, token, failure) in cases {
        assert_eq!(auth().user_now(&token), Err(failure), "{what}");
    }
    // 64 characters (not bytes) is the most.
    let long = "é".repeat(64);
    assert_eq!(
        auth().user_now(&signed(json!({"sub": long, "exp": now + 60}))),
        Ok(long)
    );
    assert!(issue_user_token(SECRET, "", 60).is_err());
}

#[test]
fn details_are_short_and_say_nothing_secret() {
    let all = [
        MissingBearer,
        Malformed,
        AlgorithmNotAccepted,
        BadSignature,
        Expired,
        NotYetValid,
        KidMissing,
        UnknownKey,
        KeyNotForAlgorithm,
        WrongIssuer,
        WrongAudience,
        ClaimMissing(Claim::Exp),
        ClaimMalformed(Claim::Nbf),
        SubEmpty,
        SubTooLong,
        ServiceTokenOnUserRoute,
        UserTokenOnServiceRoute,
        NotServiceToken,
    ];
    let details: HashSet<&str> = all.iter().map(AuthFailure::detail).collect();
    assert_eq!(details.len(), all.len(), "each reason its own words");
    for failure in all {
        assert!(failure.detail().len() < 80, "{failure}");
        assert_eq!(failure.to_string(), failure.detail());
    }
}

use std::collections::HashSet;

#[test]
fn exp_must_be_in_the_future_and_nbf_in_the_past() {
    let now = unix_now();
    let at = |exp: u64| signed(json!({"sub": "alice", "exp": exp}));
    assert_eq!(auth().user_now(&at(now)), Err(Expired), "exp == now");
    assert_eq!(auth().user_now(&at(now - 1)), Err(Expired));
    assert_eq!(auth().user_now(&at(now + 5)).as_deref(), Ok("alice"));
    let nbf = |nbf: u64| signed(json!({"sub": "alice", "exp": now + 60, "nbf": nbf}));
    assert_eq!(auth().user_now(&nbf(now + 30)), Err(NotYetValid));
    assert_eq!(auth().user_now(&nbf(now)).as_deref(), Ok("alice"));
    // With leeway, a little skew either way passes, and no more.
    let lenient = auth().with_leeway(Duration::from_secs(10));
    assert_eq!(lenient.user_now(&at(now)).as_deref(), Ok("alice"));
    assert_eq!(lenient.user_now(&nbf(now + 5)).as_deref(), Ok("alice"));
    assert_eq!(lenient.user_now(&nbf(now + 30)), Err(NotYetValid));
    assert_eq!(lenient.user_now(&at(now - 30)), Err(Expired));
}

const A: &str = "secret-a-0123456789abcdef0123456789";
const B: &str = "secret-b-0123456789abcdef0123456789";
const C: &str = "secret-c-0123456789abcdef0123456789";

#[test]
fn previous_secrets_are_accepted_in_a_rolling_rotation() {
    let rotated = Authenticator::new(B, SERVICE).with_previous_secrets(&[C, A]);
    for secret in [A, B, C] {
        assert_eq!(
            rotated.user_now(&hs256(secret, valid_claims())).as_deref(),
            Ok("alice")
        );
    }
    // A previous secret's token is held to every other rule.
    let expired = json!({"sub": "alice", "exp": unix_now() - 1});
    assert_eq!(rotated.user_now(&hs256(A, expired)), Err(Expired));
    assert_eq!(
        rotated.user_now(&hs256(A, json!({"exp": unix_now() + 60}))),
        Err(ClaimMissing(Claim::Sub))
    );
    // Not yet rotated: the new secret's tokens are refused.
    let old = Authenticator::new(A, SERVICE);
    assert_eq!(old.user_now(&hs256(B, valid_claims())), Err(BadSignature));
    let other = "secret-x-0123456789abcdef0123456789";
    assert_eq!(
        rotated.user_now(&hs256(other, valid_claims())),
        Err(BadSignature)
    );
    // Previous secrets without a current one verify nothing.
    let none = Authenticator::with_secret(None, SERVICE).with_previous_secrets(&[A]);
    assert_eq!(
        none.user_now(&hs256(A, valid_claims())),
        Err(AlgorithmNotAccepted)
    );
}

#[test]
fn issuer_and_audience_when_set_are_required() {
    let now = unix_now();
    let strict = auth()
        .with_issuer("https://idp.example/")
        .with_audience("flashgate");
    let with = |extra: Value| {
        let mut claims = valid_claims();
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        signed(claims)
    };
    let good = json!({"iss": "https://idp.example/", "aud": "flashgate"});
    assert_eq!(strict.user_now(&with(good)).as_deref(), Ok("alice"));
    let array = json!({"iss": "https://idp.example/", "aud": ["other", "flashgate"]});
    assert_eq!(strict.user_now(&with(array)).as_deref(), Ok("alice"));
    for (what, extra, failure) in [
        (
            "no iss",
            json!({"aud": "flashgate"}),
            ClaimMissing(Claim::Iss),
        ),
        (
            "no aud",
            json!({"iss": "https://idp.example/"}),
            ClaimMissing(Claim::Aud),
        ),
        (
            "other iss",
            json!({"iss": "https://evil.example/", "aud": "flashgate"}),
            WrongIssuer,
        ),
        (
            "other aud",
            json!({"iss": "https://idp.example/", "aud": "flashgate2"}),
            WrongAudience,
        ),
        (
            "aud array without us",
            json!({"iss": "https://idp.example/", "aud": ["a", "b"]}),
            WrongAudience,
        ),
    ] {
        assert_eq!(strict.user_now(&with(extra)), Err(failure), "{what}");
    }
    // Several claims missing: always the same one is named.
    for _ in 0..20 {
        assert_eq!(
            strict.user_now(&signed(valid_claims())),
            Err(ClaimMissing(Claim::Iss))
        );
        assert_eq!(
            strict.user_now(&signed(json!({}))),
            Err(ClaimMissing(Claim::Exp))
        );
        let no_sub = json!({"exp": unix_now() + 60});
        assert_eq!(
            strict.user_now(&signed(no_sub)),
            Err(ClaimMissing(Claim::Sub))
        );
    }
    let token = issue_user_token_for(
        SECRET,
        "bob",
        60,
        Some("https://idp.example/"),
        Some("flashgate"),
    )
    .unwrap();
    assert_eq!(strict.user_now(&token).as_deref(), Ok("bob"));
    let _ = now;
}

// ------------------------------------------------------------- JWK sets

fn fixture_jwk(kid: &str, extra: Value) -> Value {
    let all: Value = serde_json::from_str(JWKS).unwrap();
    let name = kid.split('#').next().unwrap();
    let mut jwk = all[name].clone();
    let object = jwk.as_object_mut().unwrap();
    object.insert("kid".into(), kid.into());
    object.extend(extra.as_object().unwrap().clone());
    jwk
}

fn key_set(keys: Vec<Value>) -> Arc<KeySet> {
    let set = KeySet::new(KeySetSettings {
        // Never answers: unit tests set the keys themselves.
        url: "http://127.0.0.1:9/jwks.json".parse().unwrap(),
        refresh_every: Duration::from_secs(600),
        min_refresh: Duration::from_secs(30),
        timeout: Duration::from_millis(200),
    })
    .unwrap();
    let body = json!({ "keys": keys }).to_string();
    set.set_keys(Keys::from_json(body.as_bytes()).unwrap());
    Arc::new(set)
}

fn standard_set() -> Arc<KeySet> {
    key_set(vec![
        fixture_jwk("rsa1", json!({"use": "sig", "alg": "RS256"})),
        fixture_jwk("ec1", json!({"use": "sig", "alg": "ES256"})),
        // Same material, announced for other uses or algorithms.
        fixture_jwk("rsa1#enc", json!({"use": "enc"})),
        fixture_jwk("rsa1#rs384", json!({"alg": "RS384"})),
        fixture_jwk("rsa1#es256", json!({"alg": "ES256"})),
        fixture_jwk("rsa1#ops", json!({"key_ops": ["encrypt"]})),
        fixture_jwk("ec384", json!({})),
        // An HMAC key whose value is the RSA public key's PEM: the classic confusion.
        json!({"kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(RSA1_PUBLIC)}),
        json!({"kty": "oct", "kid": "hmac-sig", "alg": "HS256", "use": "sig", "k": URL_SAFE_NO_PAD.encode(SECRET)}),
        // Unparseable members are skipped, not the set.
        json!({"kty": "RSA", "kid": "broken", "n": 5}),
        json!({"kty": "XYZ", "kid": "strange"}),
    ])
}

fn rs256(pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

fn es256(pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &EncodingKey::from_ec_pem(pem).unwrap()).unwrap()
}

#[test]
fn fixture_jwks_match_the_pem_keys() {
    // jwks.json was written by openssl (make_jwks.py); jsonwebtoken derives the same.
    let all: Value = serde_json::from_str(JWKS).unwrap();
    for (name, pem, alg) in [
        ("rsa1", RSA1, Algorithm::RS256),
        ("rsa2", RSA2, Algorithm::RS256),
    ] {
        let jwk = Jwk::from_encoding_key(&EncodingKey::from_rsa_pem(pem).unwrap(), alg).unwrap();
        let derived = serde_json::to_value(&jwk).unwrap();
        assert_eq!(derived["n"], all[name]["n"], "{name}");
        assert_eq!(derived["e"], all[name]["e"], "{name}");
    }
    let jwk =
        Jwk::from_encoding_key(&EncodingKey::from_ec_pem(EC1).unwrap(), Algorithm::ES256).unwrap();
    let derived = serde_json::to_value(&jwk).unwrap();
    assert_eq!(derived["x"], all["ec1"]["x"]);
    assert_eq!(derived["y"], all["ec1"]["y"]);
}

#[tokio::test]
async fn rs256_and_es256_tokens_of_the_set_are_accepted() {
    let auth = auth().with_key_set(standard_set());
    let claims = valid_claims();
    assert_eq!(
        auth.user(&rs256(RSA1, Some("rsa1"), &claims))
            .await
            .as_deref(),
        Ok("alice")
    );
    assert_eq!(
        auth.user(&es256(EC1, Some("ec1"), &claims))
            .await
            .as_deref(),
        Ok("alice")
    );
    // Without a secret, the set alone.
    let only_set = Authenticator::with_secret(None, SERVICE).with_key_set(standard_set());
    assert_eq!(
        only_set
            .user_now(&rs256(RSA1, Some("rsa1"), &claims))
            .as_deref(),
        Ok("alice")
    );
    assert_eq!(
        only_set.user_now(&signed(claims.clone())),
        Err(AlgorithmNotAccepted),
        "HS256 without a secret"
    );
    // Every claim rule holds for them too.
    let expired = json!({"sub": "alice", "exp": unix_now() - 1});
    assert_eq!(
        auth.user_now(&es256(EC1, Some("ec1"), &expired)),
        Err(Expired)
    );
    let long = json!({"sub": "x".repeat(65), "exp": unix_now() + 60});
    assert_eq!(
        auth.user_now(&rs256(RSA1, Some("rsa1"), &long)),
        Err(SubTooLong)
    );
}

#[test]
fn algorithm_confusion_is_refused() {
    let with_secret = auth().with_key_set(standard_set());
    let only_set = Authenticator::with_secret(None, SERVICE).with_key_set(standard_set());
    let claims = valid_claims();
    let hs256_with = |key: &[u8], kid: &str| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        encode(&header, &claims, &EncodingKey::from_secret(key)).unwrap()
    };
    let rsa_der = {
        let pem = std::str::from_utf8(RSA1_PUBLIC).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    };
    // HS256 "signed" with the public key: never checked against the public key.
    for token in [
        hs256_with(RSA1_PUBLIC, "rsa1"),
        hs256_with(&rsa_der, "rsa1"),
    ] {
        assert_eq!(with_secret.user_now(&token), Err(BadSignature));
        assert_eq!(only_set.user_now(&token), Err(AlgorithmNotAccepted));
    }
    // HS256 naming the set's HMAC key, signed with its value: the set's oct keys verify
    // nothing.
    assert_eq!(
        only_set.user_now(&hs256_with(SECRET.as_bytes(), "hmac-sig")),
        Err(AlgorithmNotAccepted)
    );
    let claims_json = claims.to_string();
    for (what, token, failure) in [
        (
            "alg none with a kid",
            forge(r#"{"alg":"none","kid":"rsa1"}"#, &claims_json, ""),
            AlgorithmNotAccepted,
        ),
        (
            "RS256 naming an oct key",
            forge(r#"{"alg":"RS256","kid":"hmac"}"#, &claims_json, "AAAA"),
            KeyNotForAlgorithm,
        ),
        (
            "ES256 naming an RSA key",
            es256(EC1, Some("rsa1"), &claims),
            KeyNotForAlgorithm,
        ),
        (
            "RS256 naming an EC key",
            rs256(RSA1, Some("ec1"), &claims),
            KeyNotForAlgorithm,
        ),
        (
            "a key for encryption",
            rs256(RSA1, Some("rsa1#enc"), &claims),
            KeyNotForAlgorithm,
        ),
        (
            "a key announced for RS384",
            rs256(RSA1, Some("rsa1#rs384"), &claims),
            KeyNotForAlgorithm,
        ),
        (
            "an RSA key announced for ES256",
            rs256(RSA1, Some("rsa1#es256"), &claims),
            KeyNotForAlgorithm,
        ),
        (
            "a key whose key_ops do not verify",
            rs256(RSA1, Some("rsa1#ops"), &claims),
            KeyNotForAlgorithm,
        ),
        (
            "a P-384 key",
            forge(r#"{"alg":"ES256","kid":"ec384"}"#, &claims_json, "AAAA"),
            KeyNotForAlgorithm,
        ),
        (
            "an unparseable key",
            rs256(RSA1, Some("broken"), &claims),
            KeyNotForAlgorithm,
        ),
        ("no kid", rs256(RSA1, None, &claims), KidMissing),
        (
            "another RSA key under a known kid",
            rs256(RSA2, Some("rsa1"), &claims),
            BadSignature,
        ),
        (
            "a forged ES256 signature",
            es256(EC1, Some("ec1"), &claims)
                .rsplit_once('.')
                .map(|(head, _)| format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 64])))
                .unwrap(),
            BadSignature,
        ),
        (
            "PS256",
            forge(r#"{"alg":"PS256","kid":"rsa1"}"#, &claims_json, "AAAA"),
            AlgorithmNotAccepted,
        ),
        (
            "RS512",
            forge(r#"{"alg":"RS512","kid":"rsa1"}"#, &claims_json, "AAAA"),
            AlgorithmNotAccepted,
        ),
    ] {
        assert_eq!(with_secret.user_now(&token), Err(failure), "{what}");
        assert_eq!(only_set.user_now(&token), Err(failure), "{what}");
    }
    assert_eq!(
        with_secret.user_now(&rs256(RSA2, Some("rsa2"), &claims)),
        Err(UnknownKey)
    );
}

#[test]
fn keys_carried_by_the_token_itself_are_ignored() {
    // An attacker signs with their own key and ships it (or a URL to it) in the header.
    let auth = auth().with_key_set(standard_set());
    let all: Value = serde_json::from_str(JWKS).unwrap();
    let mut own = all["rsa2"].clone();
    own["kid"] = "rsa1".into();
    let attacker_jwk: Jwk = serde_json::from_value(own).unwrap();
    for kid in ["rsa1", "evil"] {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        header.jwk = Some(attacker_jwk.clone());
        header.jku = Some("https://evil.example/jwks.json".into());
        header.x5u = Some("https://evil.example/cert.pem".into());
        let token = encode(
            &header,
            &valid_claims(),
            &EncodingKey::from_rsa_pem(RSA2).unwrap(),
        )
        .unwrap();
        let expected = if kid == "rsa1" {
            BadSignature
        } else {
            UnknownKey
        };
        assert_eq!(auth.user_now(&token), Err(expected), "{kid}");
    }
}

#[tokio::test]
async fn an_unknown_kid_fetches_again_at_most_once_per_interval() {
    // The set's URL answers nothing: the fetch fails fast and the keys stay.
    let set = standard_set();
    let auth = auth().with_key_set(set.clone());
    let claims = valid_claims();
    let unknown = rs256(RSA2, Some("rsa2"), &claims);
    assert_eq!(auth.user(&unknown).await, Err(UnknownKey));
    assert!(!set.is_fresh(), "the fetch failed");
    // The known keys still work after the failed fetch.
    assert_eq!(
        auth.user(&rs256(RSA1, Some("rsa1"), &claims))
            .await
            .as_deref(),
        Ok("alice")
    );
    // Within the minimum interval no second fetch: answered at once.
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(auth.user(&unknown).await, Err(UnknownKey));
    }
    assert!(started.elapsed() < Duration::from_millis(150));
}

#[test]
fn small_rsa_keys_points_off_the_curve_and_keys_without_kid_are_ignored() {
    let all: Value = serde_json::from_str(JWKS).unwrap();
    let mut no_kid = all["rsa1"].clone();
    no_kid.as_object_mut().unwrap().remove("kid");
    // A 512-bit modulus.
    let small = json!({"kty": "RSA", "kid": "small", "e": "AQAB", "n": URL_SAFE_NO_PAD.encode([0xC5u8; 64])});
    let keys = Keys::from_json(json!({"keys": [no_kid, small]}).to_string().as_bytes()).unwrap();
    assert!(keys.is_empty());
    assert_eq!(
        keys.find("small", Algorithm::RS256).err(),
        Some(KeyNotForAlgorithm)
    );
    // A P-256 "key" whose point is not on the curve.
    let mut off_curve = all["ec1"].clone();
    off_curve["kid"] = "off".into();
    off_curve["y"] = URL_SAFE_NO_PAD.encode([1u8; 32]).into();
    let keys = Keys::from_json(json!({"keys": [off_curve]}).to_string().as_bytes()).unwrap();
    assert!(keys.is_empty());
    assert_eq!(
        keys.find("off", Algorithm::ES256).err(),
        Some(KeyNotForAlgorithm)
    );
    assert!(Keys::from_json(b"[]").is_err());
    assert!(Keys::from_json(b"{\"keys\": 5}").is_err());
    assert!(Keys::from_json(b"{\"keys\": []}").unwrap().is_empty());
}

#[test]
fn a_verified_token_is_kept_until_its_exp_and_nothing_else_rides_on_it() {
    let auth = auth();
    let now = unix_now();
    let token = signed(json!({"sub": "alice", "exp": now + 60}));
    assert_eq!(auth.user_at(&token, now).as_deref(), Ok("alice"));
    assert!(auth.verified.get(&token).is_some(), "kept");
    assert_eq!(
        auth.clone().user_at(&token, now + 59).as_deref(),
        Ok("alice")
    );
    // Its exp still ends it, on the kept verdict as on a fresh one.
    assert_eq!(auth.user_at(&token, now + 60), Err(Expired));
    assert_eq!(auth.user_at(&token, now + 59).as_deref(), Ok("alice"));
    // A token that differs from a kept one in any byte is verified on its own.
    let (body, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.ends_with('A') { "B" } else { "A" };
    let forged = format!("{body}.{}{flipped}", &signature[..signature.len() - 1]);
    assert_eq!(auth.user_at(&forged, now), Err(BadSignature));
    let claims = body.split('.').nth(1).unwrap();
    let other_claims = URL_SAFE_NO_PAD.encode(r#"{"sub":"mallory","exp":9999999999}"#);
    let swapped = token.replace(claims, &other_claims);
    assert_eq!(auth.user_at(&swapped, now), Err(BadSignature));
    // Refusals are not kept.
    assert!(auth.verified.get(&forged).is_none());
    // Leeway applies to a kept verdict as to a fresh one.
    let lenient = auth.clone().with_leeway(Duration::from_secs(10));
    assert_eq!(lenient.user_at(&token, now).as_deref(), Ok("alice"));
    assert_eq!(lenient.user_at(&token, now + 69).as_deref(), Ok("alice"));
    assert_eq!(lenient.user_at(&token, now + 70), Err(Expired));
}

#[test]
fn new_rules_verify_again_what_the_old_ones_kept() {
    let now = unix_now();
    let token = signed(json!({"sub": "alice", "exp": now + 60}));
    let base = auth();
    assert_eq!(base.user_at(&token, now).as_deref(), Ok("alice"));
    let with_issuer = base.clone().with_issuer("https://id.example");
    assert_eq!(
        with_issuer.user_at(&token, now),
        Err(ClaimMissing(Claim::Iss))
    );
    let with_audience = base.clone().with_audience("flashgate");
    assert_eq!(
        with_audience.user_at(&token, now),
        Err(ClaimMissing(Claim::Aud))
    );
    let rotated = Authenticator::new(A, SERVICE).with_previous_secrets(&[SECRET]);
    assert_eq!(rotated.user_at(&token, now).as_deref(), Ok("alice"));
    let dropped = Authenticator::new(A, SERVICE);
    assert_eq!(dropped.user_at(&token, now), Err(BadSignature));
}

#[tokio::test]
async fn a_kept_token_of_a_key_the_set_no_longer_has_is_refused() {
    let set = key_set(vec![fixture_jwk(
        "rsa1",
        json!({"use": "sig", "alg": "RS256"}),
    )]);
    let auth = auth().with_key_set(set.clone());
    let token = rs256(RSA1, Some("rsa1"), &valid_claims());
    assert_eq!(auth.user_now(&token).as_deref(), Ok("alice"));
    assert!(auth.verified.get(&token).is_some(), "kept");
    assert_eq!(auth.user_now(&token).as_deref(), Ok("alice"));
    // The identity provider rotated rsa1 out.
    let body = json!({ "keys": [fixture_jwk("ec1", json!({"use": "sig", "alg": "ES256"}))] });
    set.set_keys(Keys::from_json(body.to_string().as_bytes()).unwrap());
    assert_eq!(auth.user_now(&token), Err(UnknownKey));
    // Refreshed with the same key again: verified again, and kept again.
    let body = json!({ "keys": [fixture_jwk("rsa1", json!({"use": "sig", "alg": "RS256"}))] });
    set.set_keys(Keys::from_json(body.to_string().as_bytes()).unwrap());
    assert_eq!(auth.user_now(&token).as_deref(), Ok("alice"));
}
