//! The scripts of `lua/` as one Redis function library, called with FCALL.
//!
//! `lua/lib.lua` (the state machine) and every script are loaded once per Redis
//! (`FUNCTION LOAD`), so a call runs only its script: with EVALSHA of lib.lua + script,
//! each call re-created the library's helpers first (about 13 µs of Redis time per
//! call, bench/README.md "Redis Functions against EVALSHA").
//!
//! - **Versioned names.** The library is `flashgate_<tag>` and each function
//!   `<script>_<tag>`, where the tag is a digest of the library's source. Gateways of
//!   two versions (a rolling upgrade) each call their own functions on the same Redis;
//!   an old version's library stays until an operator deletes it
//!   (docs/operations.md "Redis function libraries").
//! - **Loaded where it is missing.** At start and by the readiness check, and by any
//!   call answered "Function not found" (a Redis restarted without persistence, a
//!   `FUNCTION FLUSH`, a new empty node): it loads the library (`FUNCTION LOAD
//!   REPLACE`, on every primary of a cluster) and calls again, as EVALSHA did on
//!   NOSCRIPT. Redis keeps functions in its RDB and AOF files and replicates them, so a
//!   restart with persistence or a failover needs no reload.
//! - **Refused before running** (at maxmemory, too few replicas, a failed save: Redis
//!   checks a function that may write once, up front), a call runs its script by
//!   EVALSHA instead, which Redis refuses only at a first write that needs memory.
//! - **Each script still reads KEYS and ARGV**: the library declares them once and every
//!   function sets them to its call's keys and arguments before its script's body runs
//!   (Redis runs one function at a time).
//!
//! Tests of a script at a chosen millisecond (`script_with_clock`) still use EVAL with
//! lib.lua prepended: a library has one clock for every call.

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, RedisResult, Script, ToRedisArgs};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use crate::keys::SkuKeys;

/// The shared state machine, part of the library (and prepended to EVAL'd scripts).
pub(crate) const LUA_LIB: &str = include_str!("../lua/lib.lua");

/// Debug builds (every test) check that each script names only keys it declared
/// (lua/check_keys.lua): what keeps scripts whole while a cluster slot migrates.
pub(crate) const LUA_KEY_CHECK: &str = if cfg!(debug_assertions) {
    concat!(include_str!("../lua/check_keys.lua"), "\n")
} else {
    ""
};

/// One script of `lua/`, a function of the library.
pub struct LuaFunction {
    /// `<script>_<tag>`: what FCALL names.
    name: String,
    /// The same script for EVALSHA (lib.lua + the script): what runs when Redis refuses
    /// the function before it starts (`refused_before_running`).
    eval: Script,
}

impl LuaFunction {
    /// The function's name in Redis.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A call of the function, to which keys and arguments are added in order.
    pub fn prepare_invoke(&self) -> FunctionCall<'_> {
        FunctionCall {
            function: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// A call of the function, starting with this key.
    pub fn key<T: ToRedisArgs>(&self, key: T) -> FunctionCall<'_> {
        let mut call = self.prepare_invoke();
        call.key(key);
        call
    }

    /// A call of the function without keys, starting with this argument.
    pub fn arg<T: ToRedisArgs>(&self, arg: T) -> FunctionCall<'_> {
        let mut call = self.prepare_invoke();
        call.arg(arg);
        call
    }
}

macro_rules! scripts {
    ($($name:ident),* $(,)?) => {
        /// Every script of `lua/`, each a function of the library.
        pub struct Scripts {
            $(pub $name: LuaFunction,)*
        }

        /// Each script's name and source, in the library's order.
        pub const SOURCES: &[(&str, &str)] = &[
            $((stringify!($name), include_str!(concat!("../lua/", stringify!($name), ".lua"))),)*
        ];

        fn scripts_of(library: &Library) -> Scripts {
            Scripts {
                $($name: LuaFunction {
                    name: library.function_name(stringify!($name)),
                    eval: script(include_str!(concat!("../lua/", stringify!($name), ".lua"))),
                },)*
            }
        }
    };
}

scripts!(
    reserve,
    reserve_batch,
    confirm,
    cancel,
    payment_pending,
    sweep,
    view,
    sku_view,
    load_sku,
    recon_begin,
    recon_holds,
    recon_used,
    recon_end,
    recon_renew,
    repair,
    resolve_compensation,
    reap_consumers,
    mark_changed,
    trim_outbox,
    probe_keys,
    transfer_take,
    transfer_give,
    transfer_done,
    bucket_stock,
    reserve_moved,
    transfer_stale,
    restore_usage,
    restore_announced,
    queue,
);

/// The library's source and its versioned name.
pub struct Library {
    /// `flashgate_<tag>`.
    pub name: String,
    tag: String,
    /// What `FUNCTION LOAD` is given.
    pub source: String,
}

impl Library {
    /// The library of these scripts (name, source), named by a digest of its whole
    /// source (the registration included: a library that registers its functions in
    /// another way is another version). The gateway's is `LIBRARY`; tests build others.
    #[doc(hidden)]
    pub fn build(scripts: &[(&str, &str)]) -> Library {
        const TAG: &str = "@TAG@";
        // register_function is taken before check_keys.lua shadows `redis` (debug builds).
        let mut source = format!(
            "#!lua name=flashgate_{TAG}\n\
             local KEYS, ARGV\n\
             local register_function = redis.register_function\n\
             {LUA_KEY_CHECK}{LUA_LIB}\n"
        );
        for (script, text) in scripts {
            source.push_str(&format!(
                "register_function('{script}_{TAG}', function(keys, args)\n\
                 KEYS, ARGV = keys, args\n{text}\nend)\n"
            ));
        }
        let tag = hex::encode(&Sha256::digest(source.as_bytes())[..6]);
        Library {
            name: format!("flashgate_{tag}"),
            source: source.replace(TAG, &tag),
            tag,
        }
    }

    /// The name of a script's function in this library.
    pub fn function_name(&self, script: &str) -> String {
        format!("{script}_{}", self.tag)
    }
}

pub static LIBRARY: LazyLock<Library> = LazyLock::new(|| Library::build(SOURCES));

pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| scripts_of(&LIBRARY));

/// A function call being built: keys, then arguments, as `redis::ScriptInvocation`.
pub struct FunctionCall<'a> {
    function: &'a LuaFunction,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl FunctionCall<'_> {
    /// Adds a key (`KEYS[i]` in the script).
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (`ARGV[i]` in the script).
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn command(&self) -> Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(self.function.name.as_str())
            .arg(self.keys.len())
            .arg(&*self.keys)
            .arg(&*self.args);
        cmd
    }

    /// FCALL; loads the library and calls again when Redis does not have it. When
    /// Redis refuses the function before it starts (out of memory, too few replicas,
    /// a failed save), the same script runs by EVALSHA: Redis then refuses only a
    /// script's first write that needs memory, so reads, replays and the scripts that
    /// free memory still run, as they did before scripts were functions.
    pub async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        let call = self.command();
        let loads_seen = LOADS.load(Ordering::SeqCst);
        let mut result = call.query_async(conn).await;
        // A second "not found" after another call's load (of another Redis, in a
        // process that talks to several) loads it here.
        for after_loads in [Some(loads_seen), None] {
            match &result {
                Err(e) if is_missing_function(e) => {
                    reload(conn, after_loads, e).await?;
                    result = call.query_async(conn).await;
                }
                _ => break,
            }
        }
        match result {
            Err(e) if refused_before_running(&e) => self.eval().invoke_async(conn).await,
            done => done,
        }
    }

    /// This call as an EVALSHA of lib.lua + the script.
    fn eval(&self) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.function.eval.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        for arg in &self.args {
            invocation.arg(arg);
        }
        invocation
    }
}

/// Loads of the library this process made; a call that saw "Function not found"
/// before the latest load only calls again.
static LOADS: AtomicU64 = AtomicU64::new(0);

/// One load at a time per process (a restarted Redis answers every call in flight
/// "not found", and each load compiles the whole library), and none within
/// RELOAD_BACKOFF of a failed one: the time of the last failure.
static RELOAD: tokio::sync::Mutex<Option<Instant>> = tokio::sync::Mutex::const_new(None);

const RELOAD_BACKOFF: Duration = Duration::from_secs(1);

/// Loads the library unless another call did since `after_loads` (when given); the
/// calls waiting for it call again at once, side by side. `missing`: the answer that
/// asked for it, returned while a failed load's backoff runs.
async fn reload(
    conn: &mut impl ConnectionLike,
    after_loads: Option<u64>,
    missing: &redis::RedisError,
) -> RedisResult<()> {
    let mut last_failure = RELOAD.lock().await;
    if after_loads.is_some_and(|seen| LOADS.load(Ordering::SeqCst) != seen) {
        return Ok(());
    }
    if last_failure.is_some_and(|at| at.elapsed() < RELOAD_BACKOFF) {
        return Err(missing.clone());
    }
    match load_library(conn).await {
        Ok(()) => {
            LOADS.fetch_add(1, Ordering::SeqCst);
            *last_failure = None;
            Ok(())
        }
        Err(e) => {
            *last_failure = Some(Instant::now());
            Err(e)
        }
    }
}

/// Redis's answer to FCALL of a function no library it has defines.
fn is_missing_function(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d == "Function not found")
}

/// Redis's refusals of a function as a whole, before it runs (a function that may
/// write is checked once, up front; EVAL without flags is checked at its first write).
fn refused_before_running(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("OOM" | "NOREPLICAS" | "MISCONF"))
}

/// `FUNCTION LOAD REPLACE` of the library: on every primary of a cluster. Replacing a
/// library by the same source changes nothing a call could see.
pub async fn load_library(conn: &mut impl ConnectionLike) -> RedisResult<()> {
    let _: redis::Value = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY.source.as_str())
        .query_async(conn)
        .await?;
    Ok(())
}

/// Whether the Redis this command reaches has the library (on a cluster, some node).
pub async fn has_library(conn: &mut impl ConnectionLike) -> RedisResult<bool> {
    let listed: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(LIBRARY.name.as_str())
        .query_async(conn)
        .await?;
    Ok(!listed.is_empty())
}

/// What a call of a script that changes a sale is made from: a function of the
/// library, or (tests at a chosen millisecond) a script run by EVAL.
pub trait SaleScript {
    type Call<'a>
    where
        Self: 'a;
    /// A call with the sale's keys declared first (KEYS[1..9], see `SkuKeys::sale`).
    fn with_sale_keys(&self, keys: &SkuKeys) -> Self::Call<'_>;
}

impl SaleScript for LuaFunction {
    type Call<'a> = FunctionCall<'a>;
    fn with_sale_keys(&self, keys: &SkuKeys) -> FunctionCall<'_> {
        let mut call = self.prepare_invoke();
        for key in keys.sale() {
            call.key(key);
        }
        call
    }
}

impl SaleScript for Script {
    type Call<'a> = redis::ScriptInvocation<'a>;
    fn with_sale_keys(&self, keys: &SkuKeys) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.prepare_invoke();
        for key in keys.sale() {
            invocation.key(key);
        }
        invocation
    }
}

/// A call of a script that changes a sale, with the sale's keys declared first.
pub fn with_sale_keys<'a, S: SaleScript>(script: &'a S, keys: &SkuKeys) -> S::Call<'a> {
    script.with_sale_keys(keys)
}

/// lib.lua + `source`, as one script for EVAL (tests' ad-hoc scripts).
pub fn script(source: &str) -> Script {
    Script::new(&format!("{LUA_KEY_CHECK}{LUA_LIB}\n{source}"))
}

/// A script whose clock reads `now_ms` instead of Redis `TIME` (script-level tests of
/// the state machine at a chosen millisecond), run by EVAL. Never used by the gateway.
#[doc(hidden)]
pub fn script_with_clock(source: &str, now_ms: i64) -> Script {
    let clock = "return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";
    assert!(LUA_LIB.contains(clock), "lib.lua's clock moved");
    let lib = LUA_LIB.replace(clock, &format!("return {now_ms}"));
    Script::new(&format!("{LUA_KEY_CHECK}{lib}\n{source}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_is_a_function_of_the_library_named_by_its_version() {
        let library = &*LIBRARY;
        assert!(library
            .source
            .starts_with(&format!("#!lua name={}\n", library.name)));
        for (script, _) in SOURCES {
            let name = library.function_name(script);
            assert!(
                library
                    .source
                    .contains(&format!("register_function('{name}',")),
                "{script} is registered as {name}"
            );
        }
        assert_eq!(SCRIPTS.reserve.name(), library.function_name("reserve"));
    }

    #[test]
    fn the_tag_is_a_digest_of_the_whole_source_its_registration_included() {
        let library = &*LIBRARY;
        let template = library.source.replace(&library.tag, "@TAG@");
        assert!(template.contains("register_function('reserve_@TAG@', function(keys, args)"));
        assert_eq!(
            hex::encode(&Sha256::digest(template.as_bytes())[..6]),
            library.tag
        );
    }

    #[test]
    fn another_version_of_a_script_makes_another_library_and_other_names() {
        let mut changed: Vec<(&str, String)> =
            SOURCES.iter().map(|(n, s)| (*n, s.to_string())).collect();
        changed[0].1.push_str("\n-- a new version\n");
        let changed: Vec<(&str, &str)> = changed.iter().map(|(n, s)| (*n, s.as_str())).collect();
        let new = Library::build(&changed);
        assert_ne!(new.name, LIBRARY.name);
        for (script, _) in SOURCES {
            assert_ne!(new.function_name(script), LIBRARY.function_name(script));
        }
        assert_eq!(
            Library::build(SOURCES).name,
            LIBRARY.name,
            "the same sources make the same library"
        );
    }
}
