//! The `flashgate` binary: parses the command line and hands off to the library.

use clap::Parser;
use std::process::ExitCode;

use flashgate::config::{Cli, Command, ReconcileArgs};
use flashgate::ids::SkuId;
use flashgate::{auth, db, reconcile, server, store, telemetry, worker};

// glibc malloc was a fifth of the gateway's CPU under load (perf); mimalloc's
// thread-local free lists suit the many small, short-lived request allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // reconcile prints its findings itself (stdout): not once more as log lines.
    let skip_findings = matches!(cli.command, Command::Reconcile(_));
    telemetry::init_logging(cli.log_format, skip_findings);
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
        Command::Reconcile(args) => return reconcile_command(args).await,
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

/// `flashgate reconcile`: 0 no drift, 1 drift found, 2 (an Err) could not run; every
/// message of the last names the address tried, without its password.
async fn reconcile_command(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let only = match &args.sku {
        Some(raw) => Some(
            SkuId::parse(raw)
                .ok_or_else(|| anyhow::anyhow!("--sku must match [A-Za-z0-9_-]{{1,64}}"))?,
        ),
        None => None,
    };
    let redis_at = redis_address(&args.redis);
    let database_at = redact_url(&args.database.database_url);
    let connection = store::connect(&args.redis)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {redis_at}: {}", plain(&e)))?;
    let redis = store::Store::new(connection);
    redis
        .ping()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {redis_at}: {}", plain(&e)))?;
    let pool = db::connect(&args.database.database_url)
        .map_err(|e| anyhow::anyhow!("bad database URL {database_at}: {}", plain(&e)))?;
    if let Err(e) = db::ping(&pool).await {
        return Err(anyhow::anyhow!(
            "cannot reach MySQL at {database_at}: {}",
            mysql_failure(&args.database.database_url, &e).await
        ));
    }
    if let Some(sku) = &only {
        let known = async {
            Ok::<bool, flashgate::error::Error>(
                db::sku_record(&pool, sku).await?.is_some()
                    || redis.bucket_count(sku).await?.is_some()
                    || redis.sku_ids().await?.iter().any(|s| s.sku() == *sku),
            )
        };
        if !known.await.map_err(|e| anyhow::anyhow!("{}", plain(&e)))? {
            anyhow::bail!(
                "no such SKU: {sku} (neither MySQL at {database_at} nor {redis_at} has it)"
            );
        }
    }
    let report = match reconcile::run(&redis, &pool, only.as_ref(), args.repair).await {
        Ok(report) => report,
        Err(e) if redis.ping().await.is_err() => {
            anyhow::bail!("lost {redis_at} during the pass: {}", plain(&e))
        }
        Err(e) if db::ping(&pool).await.is_err() => {
            anyhow::bail!("lost MySQL at {database_at} during the pass: {}", plain(&e))
        }
        Err(e) => anyhow::bail!("the pass failed: {}", plain(&e)),
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::from(report.exit_code() as u8))
}

/// "Redis at URL" or "Redis Cluster at URL,URL", passwords removed.
fn redis_address(args: &flashgate::config::RedisArgs) -> String {
    let urls: Vec<String> = args
        .redis_url
        .split(',')
        .map(|url| redact_url(url.trim()))
        .collect();
    if args.redis_cluster {
        format!("Redis Cluster at {}", urls.join(","))
    } else {
        format!("Redis at {}", urls.join(","))
    }
}

/// The URL with the password of its user info (`user:password@`) replaced by `***`.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let user_info = &authority[..at];
    let user = match user_info.find(':') {
        Some(colon) => format!("{}:***", &user_info[..colon]),
        None => user_info.to_string(),
    };
    format!("{}{user}{}", &url[..scheme_end], &rest[at..])
}

/// An error without the API's outcome wording ("unavailable (not_applied): redis: ").
fn plain(error: &flashgate::error::Error) -> String {
    use flashgate::error::Error;
    let text = match error {
        Error::Unavailable { detail, .. } => detail.clone(),
        Error::Internal(detail) => detail.clone(),
        other => other.to_string(),
    };
    ["redis: ", "mysql: "]
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .map(str::to_string)
        .unwrap_or(text)
}

/// Why MySQL cannot be used: the pool only says it timed out, so one direct
/// connection tells the cause (refused, unknown database, access denied).
async fn mysql_failure(url: &str, pool_error: &flashgate::error::Error) -> String {
    use sqlx::Connection;
    let direct = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        sqlx::MySqlConnection::connect(url),
    )
    .await;
    match direct {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            plain(pool_error)
        }
        Err(_) => "no answer within 5 s".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_removed_from_urls() {
        assert_eq!(
            redact_url("mysql://root:s3cret@db.internal:3306/flashgate"),
            "mysql://root:***@db.internal:3306/flashgate"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/1"),
            "redis://:***@127.0.0.1:6379/1"
        );
        assert_eq!(
            redact_url("redis://default:p@ss@r:6379"),
            "redis://default:***@r:6379"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1:3316/flashgate_test"),
            "mysql://root@127.0.0.1:3316/flashgate_test"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6390"),
            "redis://127.0.0.1:6390"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        let cluster = flashgate::config::RedisArgs {
            redis_url: "redis://:a@n1:7000, redis://:a@n2:7001".into(),
            redis_cluster: true,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 500,
        };
        assert_eq!(
            redis_address(&cluster),
            "Redis Cluster at redis://:***@n1:7000,redis://:***@n2:7001"
        );
    }

    #[test]
    fn errors_lose_the_api_wording() {
        let e = flashgate::error::Error::unavailable(
            "redis: Connection refused",
            flashgate::error::Outcome::NotApplied,
        );
        assert_eq!(plain(&e), "Connection refused");
    }
}
