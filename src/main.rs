//! The `flashgate` binary: parses the command line and hands off to the library.

use clap::Parser;
use std::process::ExitCode;

use flashgate::config::{Cli, Command};
use flashgate::ids::SkuId;
use flashgate::{auth, db, reconcile, server, store, telemetry, worker};

// glibc malloc was a fifth of the gateway's CPU under load (perf); mimalloc's
// thread-local free lists suit the many small, short-lived request allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flashgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => {
            let listener = flashgate::connections::bind(&args.listen).await?;
            server::run(listener, *args, server::shutdown_signal()).await?;
        }
        Command::Worker(args) => {
            let _metrics = telemetry::prometheus();
            let shutdown = server::shutdown_signal();
            let metrics = match &args.metrics_listen {
                Some(address) => {
                    let listener = flashgate::connections::bind(address).await?;
                    tracing::info!(listen = %listener.local_addr()?, "worker metrics serving");
                    let limits = args.connections.limits().map_err(anyhow::Error::msg)?;
                    Some(tokio::spawn(flashgate::connections::serve(
                        listener,
                        flashgate::http::worker_metrics_router(),
                        limits,
                        shutdown.clone(),
                    )))
                }
                None => None,
            };
            let redis = store::Store::new(store::connect(&args.redis).await?);
            let pool = db::connect(&args.database.database_url)?;
            worker::Worker::new(redis, pool)
                .with_claim_idle(args.worker.flush_claim_idle())
                .run(args.worker, shutdown)
                .await;
            if let Some(metrics) = metrics {
                metrics.await?;
            }
        }
        Command::Reconcile(args) => {
            let only = match &args.sku {
                Some(raw) => Some(
                    SkuId::parse(raw)
                        .ok_or_else(|| anyhow::anyhow!("--sku must match [A-Za-z0-9_-]{{1,64}}"))?,
                ),
                None => None,
            };
            let redis = store::Store::new(store::connect(&args.redis).await?);
            redis.ping().await?;
            let pool = db::connect(&args.database.database_url)?;
            let report = reconcile::run(&redis, &pool, only.as_ref(), args.repair).await?;
            for f in &report.findings {
                println!(
                    "{}\t{}\t{}\tbefore: {}\tafter: {}\t{}",
                    f.sku,
                    f.kind,
                    f.detail,
                    f.before,
                    f.after.as_deref().unwrap_or("-"),
                    if f.repaired {
                        "repaired"
                    } else {
                        "not repaired"
                    }
                );
            }
            println!(
                "checked {} SKUs, {} findings",
                report.skus_checked,
                report.findings.len()
            );
            return Ok(ExitCode::from(report.exit_code() as u8));
        }
        Command::Migrate(args) => {
            let pool = db::connect(&args.database_url)?;
            db::MIGRATOR.run(&pool).await?;
            println!("migrations applied");
        }
        Command::Token(args) => {
            println!(
                "{}",
                auth::issue_user_token_for(
                    &args.jwt_secret,
                    &args.sub,
                    args.ttl_seconds,
                    args.issuer.as_deref().filter(|issuer| !issuer.is_empty()),
                    args.audience
                        .as_deref()
                        .filter(|audience| !audience.is_empty()),
                )?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
