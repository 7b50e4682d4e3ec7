//! User tokens beyond one HS256 secret: RS256/ES256 tokens verified by the keys of a
//! JWK set that a local server serves (and changes, breaks, slows and stops during the
//! tests), previous secrets of a rolling rotation, required issuer and audience, and a
//! reason in every 401, on every kind of route.

use crate::common::*;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use flashgate::auth::AuthFailure;
use flashgate::config::{AdmissionSettings, JwtSettings, ServeArgs};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const RSA1: &[u8] = include_bytes!("../fixtures/jwt/rsa1.pem");
const RSA1_PUBLIC: &[u8] = include_bytes!("../fixtures/jwt/rsa1.pub.pem");
const RSA2: &[u8] = include_bytes!("../fixtures/jwt/rsa2.pem");
const EC1: &[u8] = include_bytes!("../fixtures/jwt/ec1.pem");
const JWKS: &str = include_str!("../fixtures/jwt/jwks.json");

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "flashgate-api";

// ------------------------------------------------------------ a JWK set server

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    Error,
    Garbage,
    /// The set, padded beyond the gateway's 1 MiB cap.
    Huge,
    /// Never answers.
    Hang,
}

struct JwksState {
    keys: Mutex<Vec<Value>>,
    mode: Mutex<Mode>,
    hits: AtomicUsize,
}

struct JwksServer {
    state: Arc<JwksState>,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn jwks_document(State(state): State<Arc<JwksState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mode = *state.mode.lock().unwrap();
    let keys = state.keys.lock().unwrap().clone();
    match mode {
        Mode::Serve => axum::Json(json!({ "keys": keys })).into_response(),
        Mode::Error => (StatusCode::INTERNAL_SERVER_ERROR, "down for maintenance").into_response(),
        Mode::Garbage => "<html>not a key set</html>".into_response(),
        Mode::Huge => {
            axum::Json(json!({ "keys": keys, "padding": "x".repeat(2 << 20) })).into_response()
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

impl JwksServer {
    async fn start(keys: Vec<Value>, mode: Mode) -> JwksServer {
        let state = Arc::new(JwksState {
            keys: Mutex::new(keys),
            mode: Mutex::new(mode),
            hits: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let app = axum::Router::new()
            .route("/.well-known/jwks.json", axum::routing::get(jwks_document))
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        JwksServer {
            state,
            url,
            stop: Some(stop),
            task,
        }
    }

    fn set_keys(&self, keys: Vec<Value>) {
        *self.state.keys.lock().unwrap() = keys;
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Stops listening and closes its connections.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("the JWK set server stops")
            .unwrap();
    }
}

/// The public JWK of a fixture key, under `kid`, with `extra` members.
fn jwk(name: &str, kid: &str, extra: Value) -> Value {
    let all: Value = serde_json::from_str(JWKS).unwrap();
    let mut jwk = all[name].clone();
    let object = jwk.as_object_mut().unwrap();
    object.insert("kid".into(), kid.into());
    object.extend(extra.as_object().unwrap().clone());
    jwk
}

fn rsa1() -> Value {
    jwk("rsa1", "rsa1", json!({"use": "sig", "alg": "RS256"}))
}

fn rsa2() -> Value {
    jwk("rsa2", "rsa2", json!({"use": "sig", "alg": "RS256"}))
}

fn ec1() -> Value {
    // No alg and no use: Keycloak and others omit them.
    jwk("ec1", "ec1", json!({}))
}

/// An HMAC key in the set, its value the RSA public key's PEM.
fn oct() -> Value {
    json!({"kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(RSA1_PUBLIC)})
}

// ------------------------------------------------------------ tokens

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// What an identity provider puts in an access token.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600})
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn rs256(pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        kid,
        &EncodingKey::from_rsa_pem(pem).unwrap(),
        claims,
    )
}

fn es256(pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
    sign(
        Algorithm::ES256,
        kid,
        &EncodingKey::from_ec_pem(pem).unwrap(),
        claims,
    )
}

fn hs256(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        kid,
        &EncodingKey::from_secret(secret),
        claims,
    )
}

// ------------------------------------------------------------ gateways and calls

/// A gateway taking tokens of the set at `url` (and of JWT_SECRET), requiring our
/// issuer and audience, refreshing fast.
fn jwks_args(url: &str) -> ServeArgs {
    ServeArgs {
        jwt: JwtSettings {
            jwt_jwks_url: Some(url.into()),
            jwt_issuer: Some(ISSUER.into()),
            jwt_audience: Some(AUDIENCE.into()),
            jwt_jwks_min_refresh_seconds: 1,
            jwt_jwks_timeout_ms: 500,
            ..JwtSettings::default()
        },
        ..serve_args(&redis_url(), &database_url())
    }
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = app.client.request(method, app.url(path));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(body) = body {
        request = request
            .json(&body)
            .header("idempotency-key", unique_sku("key"));
    }
    body_of(request.send().await.unwrap()).await
}

async fn body_of(response: reqwest::Response) -> (StatusCode, Value) {
    body(response).await
}

async fn reserve_with(app: &TestApp, sku: &str, bearer: &str) -> (StatusCode, Value) {
    call(
        app,
        Method::POST,
        &format!("/v1/skus/{sku}/reservations"),
        Some(&format!("Bearer {bearer}")),
        Some(json!({"quantity": 1})),
    )
    .await
}

async fn sale(app: &TestApp) -> String {
    let sku = unique_sku("auth");
    app.create_sku(&sku, json!({"stock": 10_000, "per_user_limit": 1000}))
        .await;
    sku
}

#[track_caller]
fn assert_created(answer: &(StatusCode, Value)) {
    assert_eq!(answer.0, StatusCode::CREATED, "{}", answer.1);
}

#[track_caller]
fn assert_refused(answer: &(StatusCode, Value), failure: AuthFailure) {
    let (status, problem) = answer;
    assert_eq!(*status, StatusCode::UNAUTHORIZED, "{problem}");
    assert_eq!(problem["code"], "unauthorized", "{problem}");
    assert_eq!(problem["status"], 401, "{problem}");
    assert_eq!(problem["detail"], failure.detail(), "{problem}");
    let text = problem.to_string();
    assert!(!text.contains(JWT_SECRET) && !text.contains(SERVICE_TOKEN));
}

// ------------------------------------------------------------ the tests

#[tokio::test]
async fn jwks_tokens_are_accepted_and_its_keys_rotate() {
    let jwks = JwksServer::start(vec![rsa1(), ec1(), oct()], Mode::Serve).await;
    let app = spawn_app_with(jwks_args(&jwks.url)).await;
    let sku = sale(&app).await;

    // RS256 and ES256 tokens of the set, on the reserve route and on a user route.
    let rs = rs256(RSA1, Some("rsa1"), &claims("rs-user"));
    let created = reserve_with(&app, &sku, &rs).await;
    assert_created(&created);
    assert_eq!(created.1["user_id"], "rs-user", "{}", created.1);
    let id = created.1["reservation_id"].as_str().unwrap();
    let (status, view) = app.reservation(id, &rs).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let es = es256(EC1, Some("ec1"), &claims("es-user"));
    assert_created(&reserve_with(&app, &sku, &es).await);
    // The audience may be one of several.
    let several = with(claims("aud-user"), json!({"aud": ["other-api", AUDIENCE]}));
    assert_created(&reserve_with(&app, &sku, &rs256(RSA1, Some("rsa1"), &several)).await);

    // A key added to the set: its first token makes the gateway fetch the set again.
    jwks.set_keys(vec![rsa1(), ec1(), oct(), rsa2()]);
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the minimum interval
    let before = jwks.hits();
    let new_kid = rs256(RSA2, Some("rsa2"), &claims("new-kid-user"));
    assert_created(&reserve_with(&app, &sku, &new_kid).await);
    assert_eq!(jwks.hits() - before, 1, "one fetch for the unknown kid");
    assert_created(&reserve_with(&app, &sku, &new_kid).await);
    assert_eq!(jwks.hits() - before, 1, "known now: no fetch");

    // Many requests naming unknown kids at once share one fetch.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = jwks.hits();
    let ghost = rs256(RSA2, Some("ghost"), &claims("ghost-user"));
    let answers =
        futures::future::join_all((0..20).map(|_| reserve_with(&app, &sku, &ghost))).await;
    for answer in &answers {
        assert_refused(answer, AuthFailure::UnknownKey);
    }
    assert_eq!(
        jwks.hits() - before,
        1,
        "concurrent unknown kids share one fetch"
    );
    // And within the minimum interval, no more fetches at all.
    assert_refused(
        &reserve_with(&app, &sku, &ghost).await,
        AuthFailure::UnknownKey,
    );
    assert_eq!(jwks.hits() - before, 1);

    // A key removed from the set still verifies until the set is fetched again...
    jwks.set_keys(vec![ec1(), rsa2()]);
    assert_created(&reserve_with(&app, &sku, &rs).await);
    // ... and is refused once it was.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_refused(
        &reserve_with(&app, &sku, &ghost).await,
        AuthFailure::UnknownKey,
    );
    assert_refused(
        &reserve_with(&app, &sku, &rs).await,
        AuthFailure::UnknownKey,
    );
    let (status, problem) = app.reservation(id, &rs).await;
    assert_refused(&(status, problem), AuthFailure::UnknownKey);
    assert_created(&reserve_with(&app, &sku, &new_kid).await);
    assert_created(&reserve_with(&app, &sku, &es).await);
    // HS256 tokens of the secret work alongside (with the required iss and aud).
    let hs = flashgate::auth::issue_user_token_for(
        JWT_SECRET,
        "hs-user",
        600,
        Some(ISSUER),
        Some(AUDIENCE),
    )
    .unwrap();
    assert_created(&reserve_with(&app, &sku, &hs).await);
    jwks.stop().await;
}

#[tokio::test]
async fn an_outage_of_the_jwks_keeps_the_keys_fetched() {
    let jwks = JwksServer::start(vec![rsa1()], Mode::Serve).await;
    let app = spawn_app_with(ServeArgs {
        jwt: JwtSettings {
            // Refreshes every second in the background.
            jwt_jwks_refresh_seconds: 1,
            ..jwks_args(&jwks.url).jwt
        },
        ..jwks_args(&jwks.url)
    })
    .await;
    let sku = sale(&app).await;
    let rs = rs256(RSA1, Some("rsa1"), &claims("outage-user"));
    assert_created(&reserve_with(&app, &sku, &rs).await);
    jwks.set_keys(vec![rsa1(), rsa2()]);
    let new_kid = rs256(RSA2, Some("rsa2"), &claims("outage-new"));
    for mode in [Mode::Error, Mode::Garbage, Mode::Huge] {
        jwks.set_mode(mode);
        let before = jwks.hits();
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert!(jwks.hits() > before, "the gateway kept trying");
        assert_created(&reserve_with(&app, &sku, &rs).await);
        // What the broken answers carried was not taken.
        assert_refused(
            &reserve_with(&app, &sku, &new_kid).await,
            AuthFailure::UnknownKey,
        );
    }
    // The server gone altogether.
    jwks.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_created(&reserve_with(&app, &sku, &rs).await);
    let started = Instant::now();
    assert_refused(
        &reserve_with(&app, &sku, &new_kid).await,
        AuthFailure::UnknownKey,
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_gateway_starts_while_its_jwks_hangs_and_takes_it_when_it_answers() {
    let jwks = JwksServer::start(vec![rsa1()], Mode::Hang).await;
    let started = Instant::now();
    let app = spawn_app_with(ServeArgs {
        jwt: JwtSettings {
            jwt_jwks_timeout_ms: 300,
            ..jwks_args(&jwks.url).jwt
        },
        ..jwks_args(&jwks.url)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a hanging JWK set delays the start by its timeout only"
    );
    let sku = sale(&app).await;
    let hs = flashgate::auth::issue_user_token_for(
        JWT_SECRET,
        "hang-hs",
        600,
        Some(ISSUER),
        Some(AUDIENCE),
    )
    .unwrap();
    assert_created(&reserve_with(&app, &sku, &hs).await);
    let rs = rs256(RSA1, Some("rsa1"), &claims("hang-rs"));
    let asked = Instant::now();
    assert_refused(
        &reserve_with(&app, &sku, &rs).await,
        AuthFailure::UnknownKey,
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "a request waits for one bounded fetch at most"
    );
    jwks.set_mode(Mode::Serve);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_created(&reserve_with(&app, &sku, &rs).await);
}

#[tokio::test]
async fn forged_and_confused_tokens_are_refused_with_the_reason() {
    let jwks = JwksServer::start(vec![rsa1(), ec1(), oct()], Mode::Serve).await;
    let app = spawn_app_with(jwks_args(&jwks.url)).await;
    // The same set, no secret: HS256 is not accepted at all.
    let only_set = spawn_app_with(ServeArgs {
        jwt_secret: None,
        id_key: Some("test-id-key-of-a-gateway-without-a-jwt-secret".into()),
        ..jwks_args(&jwks.url)
    })
    .await;
    let sku = sale(&app).await;
    let sku_only_set = sale(&only_set).await;
    let good = claims("victim");
    let public_der = {
        let pem = std::str::from_utf8(RSA1_PUBLIC).unwrap();
        STANDARD
            .decode(
                pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .unwrap()
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"rsa1"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    use AuthFailure::*;
    // (what, token, reason with the secret, reason without)
    let cases = [
        (
            "HS256 signed with the RSA public key's PEM",
            hs256(RSA1_PUBLIC, Some("rsa1"), &good),
            BadSignature,
            AlgorithmNotAccepted,
        ),
        (
            "HS256 signed with the RSA public key's DER",
            hs256(&public_der, Some("rsa1"), &good),
            BadSignature,
            AlgorithmNotAccepted,
        ),
        (
            "HS256 signed with the set's oct key",
            hs256(RSA1_PUBLIC, Some("hmac"), &good),
            BadSignature,
            AlgorithmNotAccepted,
        ),
        ("alg none", none, AlgorithmNotAccepted, AlgorithmNotAccepted),
        (
            "RS256 naming the oct key",
            rs256(RSA1, Some("hmac"), &good),
            KeyNotForAlgorithm,
            KeyNotForAlgorithm,
        ),
        (
            "ES256 naming an RSA key",
            es256(EC1, Some("rsa1"), &good),
            KeyNotForAlgorithm,
            KeyNotForAlgorithm,
        ),
        (
            "RS256 without kid",
            rs256(RSA1, None, &good),
            KidMissing,
            KidMissing,
        ),
        (
            "another key under a known kid",
            rs256(RSA2, Some("rsa1"), &good),
            BadSignature,
            BadSignature,
        ),
        (
            "wrong issuer",
            rs256(
                RSA1,
                Some("rsa1"),
                &with(good.clone(), json!({"iss": "https://evil.test/"})),
            ),
            WrongIssuer,
            WrongIssuer,
        ),
        (
            "no issuer",
            rs256(
                RSA1,
                Some("rsa1"),
                &with(good.clone(), json!({"iss": null})),
            ),
            ClaimMissing(flashgate::auth::Claim::Iss),
            ClaimMissing(flashgate::auth::Claim::Iss),
        ),
        (
            "wrong audience",
            rs256(
                RSA1,
                Some("rsa1"),
                &with(good.clone(), json!({"aud": "another-api"})),
            ),
            WrongAudience,
            WrongAudience,
        ),
        (
            "audiences without ours",
            es256(
                EC1,
                Some("ec1"),
                &with(good.clone(), json!({"aud": ["a", "b"]})),
            ),
            WrongAudience,
            WrongAudience,
        ),
        (
            "expired",
            es256(
                EC1,
                Some("ec1"),
                &with(good.clone(), json!({"exp": now() - 1})),
            ),
            Expired,
            Expired,
        ),
        (
            "not yet valid",
            es256(
                EC1,
                Some("ec1"),
                &with(good.clone(), json!({"nbf": now() + 60})),
            ),
            NotYetValid,
            NotYetValid,
        ),
        (
            "sub too long",
            rs256(
                RSA1,
                Some("rsa1"),
                &with(good.clone(), json!({"sub": "x".repeat(65)})),
            ),
            SubTooLong,
            SubTooLong,
        ),
        (
            "HS256 of the secret without iss and aud",
            user_token("plain"),
            ClaimMissing(flashgate::auth::Claim::Iss),
            AlgorithmNotAccepted,
        ),
    ];
    for (what, token, with_secret, without_secret) in cases {
        let answer = reserve_with(&app, &sku, &token).await;
        assert_refused(&answer, with_secret);
        let answer = reserve_with(&only_set, &sku_only_set, &token).await;
        assert_eq!(answer.1["detail"], without_secret.detail(), "{what}");
        assert_refused(&answer, without_secret);
    }
    // The genuine article passes on both.
    assert_created(&reserve_with(&app, &sku, &rs256(RSA1, Some("rsa1"), &good)).await);
    assert_created(&reserve_with(&only_set, &sku_only_set, &es256(EC1, Some("ec1"), &good)).await);
}

const SECRET_A: &str = "rotation-secret-a-0123456789abcdef";
const SECRET_B: &str = "rotation-secret-b-0123456789abcdef";

#[tokio::test]
async fn a_rolling_secret_rotation_accepts_both_secrets() {
    let rotated = spawn_app_with(ServeArgs {
        jwt_secret: Some(SECRET_B.into()),
        jwt: JwtSettings {
            jwt_secret_previous: vec![SECRET_A.into()],
            ..JwtSettings::default()
        },
        ..serve_args(&redis_url(), &database_url())
    })
    .await;
    let old = spawn_app_with(ServeArgs {
        jwt_secret: Some(SECRET_A.into()),
        ..serve_args(&redis_url(), &database_url())
    })
    .await;
    let token =
        |secret: &str, user: &str| flashgate::auth::issue_user_token(secret, user, 600).unwrap();
    let sku = sale(&rotated).await;
    let a = token(SECRET_A, "rot-a");
    let b = token(SECRET_B, "rot-b");
    let created = reserve_with(&rotated, &sku, &a).await;
    assert_created(&created);
    assert_created(&reserve_with(&rotated, &sku, &b).await);
    // The id of one works on the other gateway too (same SKU, same stores).
    assert_created(&reserve_with(&old, &sku, &a).await);
    assert_refused(
        &reserve_with(&old, &sku, &b).await,
        AuthFailure::BadSignature,
    );
    let id = created.1["reservation_id"].as_str().unwrap();
    let (status, problem) = old.reservation(id, &b).await;
    assert_refused(&(status, problem), AuthFailure::BadSignature);
    // The original secret alone no longer opens the rotated gateway once dropped.
    let dropped = spawn_app_with(ServeArgs {
        jwt_secret: Some(SECRET_B.into()),
        ..serve_args(&redis_url(), &database_url())
    })
    .await;
    assert_refused(
        &reserve_with(&dropped, &sku, &a).await,
        AuthFailure::BadSignature,
    );
    assert_created(&reserve_with(&dropped, &sku, &b).await);
}

#[tokio::test]
async fn every_401_says_why_on_every_kind_of_route() {
    // With the admission layer verifying the reserve's user (per-user rate on), and
    // without it.
    for admission in [
        AdmissionSettings {
            rate_per_user: 1000,
            rate_per_user_burst: 1000,
            ..AdmissionSettings::off()
        },
        AdmissionSettings::off(),
    ] {
        let app = spawn_app_with(ServeArgs {
            admission,
            ..serve_args(&redis_url(), &database_url())
        })
        .await;
        let sku = sale(&app).await;
        let id = app.hold(&sku, "owner").await;
        let expired = jsonwebtoken::encode(
            &Header::default(),
            &json!({"sub": "owner", "exp": now() - 10}),
            &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .unwrap();
        let user = user_token("owner");
        let bearer = |token: &str| format!("Bearer {token}");
        use AuthFailure::*;
        let reserve = format!("/v1/skus/{sku}/reservations");
        let view = format!("/v1/reservations/{id}");
        let cancel = format!("/v1/reservations/{id}/cancel");
        let admin = format!("/v1/admin/skus/{sku}");
        let confirm = format!("/v1/reservations/{id}/confirm");
        let user_routes = [
            (Method::POST, reserve.as_str(), Some(json!({"quantity": 1}))),
            (Method::GET, view.as_str(), None),
            (Method::POST, cancel.as_str(), None),
        ];
        for (method, path, body) in &user_routes {
            for (authorization, failure) in [
                (None, MissingBearer),
                (Some("Basic b3duZXI6cHc=".to_string()), MissingBearer),
                (Some("Bearer ".to_string()), MissingBearer),
                (Some(bearer("garbage")), Malformed),
                (Some(bearer(&expired)), Expired),
                (Some(bearer(SERVICE_TOKEN)), ServiceTokenOnUserRoute),
            ] {
                if *path != reserve && failure == ServiceTokenOnUserRoute {
                    continue; // the service may view and cancel any reservation
                }
                let answer = call(
                    &app,
                    method.clone(),
                    path,
                    authorization.as_deref(),
                    body.clone(),
                )
                .await;
                assert_eq!(
                    answer.1["detail"],
                    failure.detail(),
                    "{method} {path} {authorization:?}"
                );
                assert_refused(&answer, failure);
            }
        }
        let service_routes = [
            (Method::PUT, admin.as_str(), Some(json!({"stock": 5}))),
            (
                Method::POST,
                confirm.as_str(),
                Some(json!({"payment_ref": "p-1"})),
            ),
        ];
        for (method, path, body) in &service_routes {
            for (authorization, failure) in [
                (None, MissingBearer),
                (Some(bearer(&user)), UserTokenOnServiceRoute),
                (Some(bearer("not-the-service-token")), NotServiceToken),
            ] {
                let answer = call(
                    &app,
                    method.clone(),
                    path,
                    authorization.as_deref(),
                    body.clone(),
                )
                .await;
                assert_refused(&answer, failure);
            }
        }
        // RFC 6750: a 401 challenges for a bearer token, and says when one was invalid.
        let challenge = |authorization: Option<&'static str>| {
            let mut request = app.client.get(app.url(&view));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
                response.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            }
        };
        assert_eq!(challenge(None).await, r#"Bearer realm="flashgate""#);
        assert_eq!(
            challenge(Some("Bearer garbage")).await,
            r#"Bearer realm="flashgate", error="invalid_token""#
        );
        // And the right credentials pass.
        let (status, _) = app.reservation(&id, &user).await;
        assert_eq!(status, StatusCode::OK);
    }
}
