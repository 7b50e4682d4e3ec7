//! Redis key names. Every key of one SKU carries the hash tag `{sku}`, so the scripts,
//! which touch several keys at once, run unchanged on Redis Cluster.

use crate::ids::SkuId;

/// Set of every SKU id ever defined: what the sweeper, flusher and reconciler walk.
/// It is the only key outside a SKU's slot, and no script touches it.
pub const SKU_INDEX: &str = "fg:skus";
/// Compensations recorded in Redis and not yet written to MySQL: id -> SKU. Lets a
/// compensation be read, listed and resolved at once, also while MySQL is down. Written
/// by the gateway right after the script that made the compensation, cleared by the
/// flush after its MySQL commit; outside every SKU's slot, so no script touches it.
pub const COMPENSATION_INDEX: &str = "fg:comps";
/// Consumer group of the flush workers on every outbox stream.
pub const FLUSH_GROUP: &str = "flush";

#[derive(Debug, Clone)]
pub struct SkuKeys {
    pub meta: String,
    pub used: String,
    pub deadlines: String,
    pub outbox: String,
    /// Compensation id -> JSON record, until the flush wrote it to MySQL.
    pub comps: String,
    prefix: String,
}

impl SkuKeys {
    pub fn new(sku: &SkuId) -> SkuKeys {
        let prefix = format!("fg:{{{sku}}}:");
        SkuKeys {
            meta: format!("{prefix}meta"),
            used: format!("{prefix}used"),
            deadlines: format!("{prefix}deadlines"),
            outbox: format!("{prefix}outbox"),
            comps: format!("{prefix}comps"),
            prefix,
        }
    }

    pub fn reservation(&self, reservation_id: &str) -> String {
        format!("{}r:{reservation_id}", self.prefix)
    }

    /// Scoped to user and SKU; the user id's length comes first so that no
    /// (user, key) pair can spell another pair's key.
    pub fn idempotency(&self, user_id: &str, key: &str) -> String {
        format!("{}idem:{}:{user_id}:{key}", self.prefix, user_id.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_sku_hash_tag() {
        let keys = SkuKeys::new(&SkuId::parse("abc").unwrap());
        for key in [
            &keys.meta,
            &keys.used,
            &keys.deadlines,
            &keys.outbox,
            &keys.comps,
        ] {
            assert!(key.starts_with("fg:{abc}:"), "{key}");
        }
        assert!(keys.reservation("x").starts_with("fg:{abc}:r:"));
        assert!(keys.idempotency("{u}", "k").starts_with("fg:{abc}:idem:"));
    }

    #[test]
    fn idempotency_keys_do_not_collide_across_users() {
        let keys = SkuKeys::new(&SkuId::parse("s").unwrap());
        assert_ne!(keys.idempotency("a:b", "c"), keys.idempotency("a", "b:c"));
    }
}
