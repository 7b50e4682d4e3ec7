//! Private servers and real `flashgate` processes for the crash tests. Every process
//! started here is killed when its guard drops, so a failing test leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashgate::ids::SkuId;
use flashgate::store::Store;
use redis::aio::MultiplexedConnection;
use sqlx::mysql::MySqlPool;

pub const FLASHGATE: &str = env!("CARGO_BIN_EXE_flashgate");

pub fn tool(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.into())
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "fg-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process SIGKILLed (and reaped) on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command) -> Proc {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (KILL, TERM, STOP, CONT) to this process only.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the exit (at most `timeout`, then SIGKILL).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // A stopped process must be resumed to die of anything but SIGKILL; SIGKILL
            // works either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP port outside the kernel's ephemeral range (32768 and up by default), so no
/// client socket takes it while a server is down between a kill and a restart.
/// Successive calls walk a permutation of 20000..32000, so two tests of this binary
/// never get the same port.
pub fn free_port() -> u16 {
    use std::net::TcpListener;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::process::id() as u64 * 7_919;
    for _ in 0..2_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((seed + n * 104_729) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

// ------------------------------------------------------------------------- Redis

pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    appendfsync: Option<&'static str>,
    proc: Option<Proc>,
}

impl RedisServer {
    /// `appendfsync`: Some("always" | "everysec") turns AOF on; None runs without
    /// any persistence.
    pub async fn start(appendfsync: Option<&'static str>) -> RedisServer {
        let mut server = RedisServer {
            port: 0,
            dir: TempDir::new("redis"),
            appendfsync,
            proc: None,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.launch().await {
                return server;
            }
        }
        panic!("redis-server did not start: {}", server.log());
    }

    async fn launch(&mut self) -> bool {
        let mut command =
            Command::new(tool("FLASHGATE_TEST_REDIS_SERVER", "/usr/bin/redis-server"));
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match self.appendfsync {
            Some(fsync) => command
                .arg("--appendonly")
                .arg("yes")
                .arg("--appendfsync")
                .arg(fsync),
            None => command.arg("--appendonly").arg("no"),
        };
        let mut proc = Proc::spawn("redis-server", &mut command);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if proc.try_wait().is_some() {
                return false; // port taken, most likely
            }
            if let Ok(mut conn) = self.try_client().await {
                // Not PING: it answers while the AOF is still loading.
                let ready: redis::RedisResult<i64> = redis::cmd("EXISTS")
                    .arg("fg:ready")
                    .query_async(&mut conn)
                    .await;
                if ready.is_ok() {
                    self.proc = Some(proc);
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Where it keeps its data (AOF, RDB) and its log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    async fn try_client(&self) -> redis::RedisResult<MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timed out")))?
    }

    /// A fresh connection of the test's own (not the gateway's).
    pub async fn client(&self) -> MultiplexedConnection {
        self.try_client().await.expect("redis client connects")
    }

    /// SIGKILL: no shutdown, no final fsync.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// SIGTERM: a clean shutdown (AOF fsynced).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            tokio::task::block_in_place(|| proc.terminate(Duration::from_secs(10)));
        }
    }

    pub fn pause(&self) {
        self.proc.as_ref().expect("running").signal("STOP");
    }

    pub fn resume(&self) {
        self.proc.as_ref().expect("running").signal("CONT");
    }

    /// Starts again on the same port and directory (so it loads its AOF).
    pub async fn restart(&mut self) {
        assert!(self.proc.is_none(), "kill or stop it first");
        for _ in 0..50 {
            if self.launch().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not restart: {}", self.log());
    }
}

// ----------------------------------------------------------------------- MariaDB

pub struct MariaDb {
    pub port: u16,
    dir: TempDir,
    proc: Option<Proc>,
}

pub const PRIVATE_DATABASE: &str = "flashgate";

impl MariaDb {
    /// A fresh private server with the `flashgate` database migrated.
    pub async fn start() -> MariaDb {
        let dir = TempDir::new("mariadb");
        let datadir = dir.path().join("data");
        std::fs::create_dir_all(&datadir).unwrap();
        let output = Command::new(tool(
            "FLASHGATE_TEST_MARIADB_INSTALL_DB",
            "/usr/bin/mariadb-install-db",
        ))
        .arg("--no-defaults")
        .arg(format!("--datadir={}", datadir.display()))
        .arg("--user=root")
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .output()
        .expect("mariadb-install-db runs");
        assert!(
            output.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut server = MariaDb {
            port: 0,
            dir,
            proc: None,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.launch().await {
                let admin = server.connect_url("");
                let mut conn = connect_retrying(&admin).await;
                sqlx::query(
                    "CREATE DATABASE flashgate CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
                )
                .execute(&mut conn)
                .await
                .unwrap();
                let pool = flashgate::db::connect(&server.url()).unwrap();
                flashgate::db::MIGRATOR.run(&pool).await.unwrap();
                pool.close().await;
                return server;
            }
        }
        panic!("mariadbd did not start: {}", server.log());
    }

    async fn launch(&mut self) -> bool {
        let d = self.dir.path();
        let mut command = Command::new(tool("FLASHGATE_TEST_MARIADBD", "/usr/sbin/mariadbd"));
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-name-resolve")
            .arg("--character-set-server=utf8mb4")
            .arg("--collation-server=utf8mb4_unicode_ci")
            .arg("--innodb-buffer-pool-size=64M")
            .arg("--max-connections=200")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            command.arg("--user=root");
        }
        let mut proc = Proc::spawn("mariadbd", &mut command);
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = self.connect_url("");
        while Instant::now() < deadline {
            if proc.try_wait().is_some() {
                return false;
            }
            // A real query: a ping can succeed while access is still refused.
            if let Ok(Ok(mut conn)) = tokio::time::timeout(
                Duration::from_secs(1),
                <sqlx::MySqlConnection as sqlx::Connection>::connect(&url),
            )
            .await
            {
                if sqlx::query("SELECT 1").execute(&mut conn).await.is_ok() {
                    self.proc = Some(proc);
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn connect_url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    pub fn url(&self) -> String {
        self.connect_url(PRIVATE_DATABASE)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// SIGTERM and wait for the process to be gone (a clean stop).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let stopped = tokio::task::block_in_place(|| proc.terminate(Duration::from_secs(30)));
            assert!(stopped.is_some(), "mariadbd did not stop");
        }
    }

    pub async fn restart(&mut self) {
        assert!(self.proc.is_none(), "stop it first");
        for _ in 0..50 {
            if self.launch().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mariadbd did not restart: {}", self.log());
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

async fn connect_retrying(url: &str) -> sqlx::MySqlConnection {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match <sqlx::MySqlConnection as sqlx::Connection>::connect(url).await {
            Ok(conn) => return conn,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The shared test database, migrated once per test binary (the migrator locks).
pub async fn shared_db() -> MySqlPool {
    static MIGRATED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let pool = flashgate::db::connect(&crate::common::database_url()).unwrap();
    MIGRATED
        .get_or_init(|| async {
            flashgate::db::MIGRATOR
                .run(&pool)
                .await
                .expect("shared test database migrates");
        })
        .await;
    pool
}

/// A database of its own on the shared server, migrated; its URL and a pool. For a test
/// whose workers must be alone on their MySQL: every worker process of every test
/// delivers the webhooks of the database it is pointed at, to any SKU's events.
pub async fn private_db(name: &str) -> (String, MySqlPool) {
    let shared = crate::common::database_url();
    let (server, _) = shared.rsplit_once('/').expect("a database URL with a path");
    let database: String = format!("fg_{name}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(64)
        .collect();
    let admin = flashgate::db::connect(&shared).unwrap();
    // The name is [A-Za-z0-9_] only (above).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    )))
    .execute(&admin)
    .await
    .expect("a private test database");
    let url = format!("{server}/{database}");
    let pool = flashgate::db::connect(&url).unwrap();
    flashgate::db::MIGRATOR
        .run(&pool)
        .await
        .expect("the private test database migrates");
    (url, pool)
}

/// Drops a database of `private_db` (its test passed; a failed one keeps it to look at).
pub async fn drop_private_db(url: &str) {
    let (_, database) = url.rsplit_once('/').expect("a database URL with a path");
    let admin = flashgate::db::connect(&crate::common::database_url()).unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE `{database}`")))
        .execute(&admin)
        .await
        .expect("the private test database drops");
}

// ------------------------------------------------------------- flashgate processes

/// `flashgate` with a clean environment pointing at these servers.
pub fn flashgate(redis_url: &str, database_url: &str) -> Command {
    let mut command = Command::new(FLASHGATE);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLASHGATE_REDIS_URL", redis_url)
        .env("FLASHGATE_DATABASE_URL", database_url)
        .env("FLASHGATE_REDIS_CLUSTER", "0")
        .env("FLASHGATE_LOG", "info");
    command
}

/// Output of one `flashgate reconcile` run.
pub struct ReconcileRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub async fn reconcile_cli(redis_url: &str, database_url: &str, args: &[&str]) -> ReconcileRun {
    let mut command = flashgate(redis_url, database_url);
    command.arg("reconcile").args(args);
    let output = tokio::task::spawn_blocking(move || command.output().expect("flashgate runs"))
        .await
        .unwrap();
    ReconcileRun {
        code: output.status.code().expect("exited, not signalled"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A `flashgate worker` process; its log goes to a file in `log_dir`.
pub struct WorkerProc {
    pub proc: Proc,
    log: PathBuf,
}

impl WorkerProc {
    pub fn start(
        redis_url: &str,
        database_url: &str,
        log_dir: &Path,
        claim_idle_ms: u64,
    ) -> WorkerProc {
        Self::start_with(redis_url, database_url, log_dir, claim_idle_ms, &[])
    }

    /// `start`, with more settings in its environment.
    pub fn start_with(
        redis_url: &str,
        database_url: &str,
        log_dir: &Path,
        claim_idle_ms: u64,
        env: &[(&str, &str)],
    ) -> WorkerProc {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let log = log_dir.join(format!(
            "worker-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = flashgate(redis_url, database_url);
        command
            .arg("worker")
            .env("FLASHGATE_SWEEP_INTERVAL_MS", "200")
            // The scheduled pass walks every SKU MySQL knows: keep it out of the shared
            // database's other tests.
            .env("FLASHGATE_RECONCILE_INTERVAL_SECONDS", "86400")
            .env("FLASHGATE_FLUSH_CLAIM_IDLE_MS", claim_idle_ms.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file);
        WorkerProc {
            proc: Proc::spawn("flashgate worker", &mut command),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

// ------------------------------------------------------------------- assertions

/// Redis counters of a SKU, straight from the store.
/// Retries while Redis is unavailable: the first command on a connection that a Redis
/// restart broke fails once (the manager reconnects after it).
pub async fn counters(store: &Store, sku: &str) -> (u64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.sku(&SkuId::parse(sku).unwrap()).await {
            Ok(view) => return (view.stock_total, view.available, view.held, view.sold),
            Err(e @ flashgate::error::Error::Unavailable { .. }) if Instant::now() < deadline => {
                eprintln!("counters: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("sku {sku} in redis: {e}"),
        }
    }
}

pub async fn assert_equation(store: &Store, sku: &str) -> (u64, u64, u64, u64) {
    let (total, available, held, sold) = counters(store, sku).await;
    assert_eq!(
        available + held + sold,
        total,
        "available {available} + held {held} + sold {sold} != stock_total {total}"
    );
    (total, available, held, sold)
}

/// (rows in `sales`, SUM(quantity) of them, `skus.sold`) for the SKU.
pub async fn mysql_sales(db: &MySqlPool, sku: &str) -> (i64, i64, u64) {
    let (rows, sum): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(quantity), 0) AS SIGNED) FROM sales WHERE sku = ?",
    )
    .bind(sku)
    .fetch_one(db)
    .await
    .unwrap();
    let sold: u64 = sqlx::query_scalar("SELECT sold FROM skus WHERE sku = ?")
        .bind(sku)
        .fetch_one(db)
        .await
        .unwrap();
    (rows, sum, sold)
}

/// Outbox entries of the SKU not yet acknowledged by the flush group
/// (pending on some consumer + never delivered).
pub async fn outbox_unacked(conn: &mut MultiplexedConnection, sku: &str) -> (u64, u64) {
    let key = format!("fg:{{{sku}}}:outbox");
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .query_async(conn)
        .await
        .unwrap();
    let group = groups
        .groups
        .iter()
        .find(|g| g.name == "flush")
        .expect("flush group");
    (group.pending as u64, group.lag.unwrap_or(0) as u64)
}

/// Polls `check` every 50 ms until it returns true, or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SKU's events in MySQL after a crash: numbered 1, 2, 3, … with no gap and no
/// repeat (a repeat of a fact would carry its id twice, which the unique key refuses),
/// and one `reservation.confirmed` per sale MySQL records. Returns how many of each type.
pub async fn assert_events_in_sequence(
    db: &MySqlPool,
    sku: &str,
) -> std::collections::BTreeMap<String, u64> {
    let rows: Vec<(u64, String, String)> =
        sqlx::query_as("SELECT sequence, id, type FROM events WHERE sku = ? ORDER BY sequence")
            .bind(sku)
            .fetch_all(db)
            .await
            .unwrap();
    let mut types = std::collections::BTreeMap::new();
    for (i, (sequence, _, kind)) in rows.iter().enumerate() {
        assert_eq!(*sequence, i as u64 + 1, "a gap or repeat in {sku}'s events");
        *types.entry(kind.clone()).or_insert(0) += 1;
    }
    let (sales, _, _) = mysql_sales(db, sku).await;
    assert_eq!(
        types.get("reservation.confirmed").copied().unwrap_or(0),
        sales as u64,
        "one confirmed event per sale: {types:?}"
    );
    types
}
