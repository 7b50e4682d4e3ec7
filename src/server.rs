//! Wiring: builds the gateway from settings and runs the HTTP server (and the worker)
//! until a shutdown signal. Takes an already bound listener, so tests use port 0.

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::auth::{Authenticator, KeySet};
use crate::config::{self, GatewaySettings, ServeArgs};
use crate::gateway::Gateway;
use crate::http::{self, AppState};
use crate::worker::Worker;
use crate::{connections, db, store, telemetry};

pub async fn build_state(args: &ServeArgs) -> anyhow::Result<Arc<AppState>> {
    config::check_auth(args).map_err(anyhow::Error::msg)?;
    let connections = args.connections.limits().map_err(anyhow::Error::msg)?;
    let settings = GatewaySettings::from_serve_args(args).map_err(anyhow::Error::msg)?;
    let admission = Admission::new(&args.admission).map_err(anyhow::Error::msg)?;
    // After every check of the settings: this fetches the JWK set, if any.
    let auth = authenticator(args).await?;
    let redis = store::connect(&args.redis).await?;
    let pool = db::connect(&args.database.database_url)?;
    let store = store::Store::new(redis)
        .with_replicated_writes(store::ReplicatedWrites::connect(&args.redis)?);
    let gateway = Gateway::new(store, pool, settings);
    Ok(Arc::new(AppState {
        gateway,
        admission: Arc::new(admission),
        public_metrics: args.metrics_listen.is_none(),
        auth,
        body_timeout: connections.body_timeout,
        prometheus: telemetry::prometheus(),
        metrics_page: Default::default(),
        readiness: Default::default(),
    }))
}

/// Verifies user and service tokens as configured. With a JWK set URL, its first fetch
/// happens here; if it fails the gateway starts anyway (HS256 tokens and the service
/// work; RS256/ES256 tokens answer 401 "unknown signing key" until a fetch succeeds,
/// which is retried every FLASHGATE_JWT_JWKS_MIN_REFRESH_SECONDS).
pub async fn authenticator(args: &ServeArgs) -> anyhow::Result<Authenticator> {
    let mut auth = Authenticator::with_secret(args.jwt_secret(), &args.service_token)
        .with_previous_secrets(&args.jwt.previous_secrets())
        .with_leeway(Duration::from_secs(args.jwt_leeway_seconds));
    if let Some(issuer) = args.jwt.issuer() {
        auth = auth.with_issuer(issuer);
    }
    if let Some(audience) = args.jwt.audience() {
        auth = auth.with_audience(audience);
    }
    if let Some(settings) = args.jwt.key_set().map_err(anyhow::Error::msg)? {
        let local = matches!(
            settings.url.host_str(),
            Some("localhost" | "127.0.0.1" | "[::1]")
        );
        if settings.url.scheme() == "http" && !local {
            tracing::warn!(
                "FLASHGATE_JWT_JWKS_URL is plain http: whoever is on the path can replace \
                 the keys; use https"
            );
        }
        let key_set = Arc::new(KeySet::new(settings)?);
        match key_set.refresh().await {
            Ok(keys) => tracing::info!(keys, "JWK set fetched"),
            Err(_) => tracing::warn!(
                "starting without the JWK set (see the error above): RS256/ES256 tokens \
                 are refused until a fetch succeeds"
            ),
        }
        auth = auth.with_key_set(key_set);
    }
    Ok(auth)
}

/// Serves until `shutdown` turns true; the worker (unless `--no-worker`) stops with it
/// after finishing its current step.
pub async fn run(
    listener: TcpListener,
    args: ServeArgs,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let state = build_state(&args).await?;
    let limits = args.connections.limits().map_err(anyhow::Error::msg)?;
    // The first readiness check (which loads the scripts) before the first request.
    state.readiness.check(&state.gateway).await;
    if !state.readiness.report().ready() {
        tracing::warn!("Redis not reachable at start; /readyz answers 503 until it is");
    }
    {
        let (readiness, gateway) = (state.readiness.clone(), state.gateway.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move { readiness.run(gateway, shutdown).await });
    }
    let worker = (!args.no_worker).then(|| {
        let worker = Worker::new(state.gateway.store.clone(), state.gateway.db.clone())
            .with_claim_idle(args.worker.flush_claim_idle());
        tokio::spawn(worker.run(args.worker.clone(), shutdown.clone()))
    });
    let trim = tokio::spawn(trim_limiters(state.admission.clone(), shutdown.clone()));
    let jwks = state
        .auth
        .key_set()
        .map(|key_set| tokio::spawn(key_set.clone().run(shutdown.clone())));
    let metrics = match &args.metrics_listen {
        Some(address) => {
            let metrics_listener = connections::bind(address).await?;
            tracing::info!(listen = %metrics_listener.local_addr()?, "metrics serving");
            Some(tokio::spawn(connections::serve(
                metrics_listener,
                http::metrics_router(state.clone()),
                limits,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let http_shutdown = shutdown.clone();
    tracing::info!(listen = %listener.local_addr()?, "flashgate serving");
    connections::serve(listener, http::router(state), limits, http_shutdown).await;
    if let Some(metrics) = metrics {
        metrics.await?;
    }
    if let Some(worker) = worker {
        worker.await?;
    }
    trim.abort();
    if let Some(jwks) = jwks {
        jwks.abort();
    }
    Ok(())
}

/// The rate limiters also drop idle keys every few checks; this empties them when
/// no requests come.
async fn trim_limiters(admission: Arc<Admission>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = every.tick() => admission.trim(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler installs");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}
