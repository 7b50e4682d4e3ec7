//! The little the harness must know of the gateway's internals, in one place:
//! the user JWT it accepts, the Redis key layout and the reserve script (for the
//! redis-benchmark ceiling), taken from this checkout's `lua/` at build time.
//!
//! Kept in step with src/auth.rs (`issue_user_token`: HS256, claims `sub` + `exp`),
//! src/keys.rs (`SkuKeys`), src/lua.rs (the gateway loads `lua/lib.lua` and every
//! script as one function library; the harness's reference script is lib.lua + "\n" +
//! the script, run by EVALSHA) and src/limits.rs (`RESERVE_RECLAIM_BATCH`). At run time
//! the harness checks that a library the gateway loaded holds this lib.lua and
//! reserve.lua (`gateway_runs_this_reserve`).

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

const LUA_LIB: &str = include_str!("../../lua/lib.lua");
const LUA_RESERVE: &str = include_str!("../../lua/reserve.lua");
const LUA_LOAD_SKU: &str = include_str!("../../lua/load_sku.lua");

/// src/limits.rs RESERVE_RECLAIM_BATCH: ARGV[7] of the reserve script.
pub const RESERVE_RECLAIM_BATCH: u32 = 16;
/// The gateway's default FLASHGATE_IDEMPOTENCY_TTL_SECONDS, in ms: ARGV[5] of reserve.
pub const IDEMPOTENCY_TTL_MS: u64 = 86_400_000;
/// The gateway's default FLASHGATE_PAYMENT_GRACE_SECONDS, in ms: ARGV[6] of reserve.
pub const PAYMENT_GRACE_MS: u64 = 300_000;

/// The reference reserve script: lib.lua + reserve.lua, what the gateway's library
/// function `reserve_<tag>` runs (the ceiling redis-benchmark measures by EVALSHA).
pub fn reserve_script() -> String {
    format!("{LUA_LIB}\n{LUA_RESERVE}")
}

/// Whether Redis has a gateway library (`flashgate_*`, src/lua.rs) made of this
/// checkout's lib.lua and reserve.lua, so that the reference script is the gateway's.
pub async fn gateway_runs_this_reserve(
    conn: &mut impl redis::aio::ConnectionLike,
) -> redis::RedisResult<bool> {
    let libraries: Vec<Vec<redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("flashgate_*")
        .arg("WITHCODE")
        .query_async(conn)
        .await?;
    Ok(libraries.iter().any(|fields| {
        fields.iter().any(|field| match field {
            redis::Value::BulkString(code) => {
                let code = String::from_utf8_lossy(code);
                code.contains(LUA_LIB) && code.contains(LUA_RESERVE)
            }
            _ => false,
        })
    }))
}

/// The SKU-definition script (admin PUT), lib.lua + the script.
pub fn load_sku_script() -> String {
    format!("{LUA_LIB}\n{LUA_LOAD_SKU}")
}

/// Every key of a SKU shares the hash tag `{sku}`.
pub fn key(sku: &str, suffix: &str) -> String {
    format!("fg:{{{sku}}}:{suffix}")
}

/// The keys every script that changes a sale declares first, in this order (the
/// gateway's `SkuKeys::sale`, lua/lib.lua).
pub fn sale_keys(sku: &str) -> Vec<String> {
    [
        "meta",
        "used",
        "deadlines",
        "uholds",
        "outbox",
        "comps",
        "churn",
        "rlog",
        "holds",
    ]
    .iter()
    .map(|suffix| key(sku, suffix))
    .collect()
}

/// `fg:{sku}:idem:<len(user)>:<user>:<key>`.
pub fn idempotency_key(sku: &str, user: &str, key: &str) -> String {
    format!("fg:{{{sku}}}:idem:{}:{user}:{key}", user.len())
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// A user JWT as `flashgate token --sub USER` issues it.
pub struct TokenMinter {
    key: EncodingKey,
    header: Header,
}

impl TokenMinter {
    pub fn new(secret: &str) -> TokenMinter {
        TokenMinter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
        }
    }

    pub fn mint(&self, sub: &str, ttl_seconds: u64) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + ttl_seconds;
        encode(&self.header, &Claims { sub, exp }, &self.key).expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_gateway_layout() {
        assert_eq!(key("s1", "meta"), "fg:{s1}:meta");
        let sale = sale_keys("s1");
        assert_eq!(sale.len(), 9);
        assert_eq!(sale[0], "fg:{s1}:meta");
        assert_eq!(sale[7], "fg:{s1}:rlog");
        assert_eq!(sale[8], "fg:{s1}:holds");
        assert_eq!(
            idempotency_key("s1", "alice", "k1"),
            "fg:{s1}:idem:5:alice:k1"
        );
    }

    #[test]
    fn scripts_are_lib_plus_script() {
        assert!(reserve_script().starts_with(LUA_LIB));
        assert!(reserve_script().contains("reserve.lua"));
    }

    #[test]
    fn tokens_are_hs256_with_sub_and_exp() {
        let token = TokenMinter::new("secret-0123456789").mint("alice", 60);
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        #[derive(serde::Deserialize)]
        struct C {
            sub: String,
        }
        let data = jsonwebtoken::decode::<C>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"secret-0123456789"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims.sub, "alice");
    }
}
