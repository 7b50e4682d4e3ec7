//! Wiring: builds the gateway from settings and runs the HTTP server (and the worker)
//! until a shutdown signal. Takes an already bound listener, so tests use port 0.

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::{self, GatewaySettings, ServeArgs};
use crate::gateway::Gateway;
use crate::http::{self, AppState};
use crate::worker::Worker;
use crate::{db, store, telemetry};

const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// A client that has not sent a whole request head by then is dropped (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn build_state(args: &ServeArgs) -> anyhow::Result<Arc<AppState>> {
    config::check_secret("FLASHGATE_JWT_SECRET", &args.jwt_secret).map_err(anyhow::Error::msg)?;
    config::check_secret("FLASHGATE_SERVICE_TOKEN", &args.service_token)
        .map_err(anyhow::Error::msg)?;
    let settings = GatewaySettings::from_serve_args(args).map_err(anyhow::Error::msg)?;
    let redis = store::connect(&args.redis).await?;
    let pool = db::connect(&args.database.database_url)?;
    let gateway = Gateway::new(store::Store::new(redis), pool, settings);
    Ok(Arc::new(AppState {
        gateway,
        auth: Authenticator::new(&args.jwt_secret, &args.service_token),
        prometheus: telemetry::prometheus(),
    }))
}

/// Serves until `shutdown` turns true; the worker (unless `--no-worker`) stops with it
/// after finishing its current step.
pub async fn run(
    listener: TcpListener,
    args: ServeArgs,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let state = build_state(&args).await?;
    if let Err(e) = state.gateway.store.load_scripts().await {
        tracing::warn!(error = %e, "Redis not reachable at start; /readyz answers 503 until it is");
    }
    let worker = (!args.no_worker).then(|| {
        let worker = Worker::new(state.gateway.store.clone(), state.gateway.db.clone())
            .with_claim_idle(args.worker.flush_claim_idle());
        tokio::spawn(worker.run(args.worker.clone(), shutdown.clone()))
    });
    let http_shutdown = shutdown.clone();
    tracing::info!(listen = %listener.local_addr()?, "flashgate serving");
    serve_http1(listener, http::router(state), http_shutdown).await;
    if let Some(worker) = worker {
        worker.await?;
    }
    Ok(())
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

/// HTTP/1.1 straight on hyper (what `axum::serve` does, minus its HTTP/2 sniffing,
/// which the reserve path paid for on every request), Nagle off. On shutdown: stop
/// accepting, let in-flight requests finish, close idle connections.
async fn serve_http1(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept:
                    // pause instead of spinning; the listener itself stays good.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            // The guard wait_for returns is not Send: drop it inside.
            () = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            );
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    connections.shutdown().await;
}
