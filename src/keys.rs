//! Redis key names. Every key of one SKU carries the hash tag `{sku}`, so the scripts,
//! which touch several keys at once, run unchanged on Redis Cluster.

use crate::ids::SkuId;

/// Set of the SKUs Redis holds a sale for (defined and not retired): what the sweeper,
/// flusher and reconciler walk. A retired SKU leaves it (worker::Worker::sweep_sku);
/// the admin PUT puts it back. Outside every SKU's slot: no script touches it.
pub const SKU_INDEX: &str = "fg:skus";
/// Counter bumped whenever a SKU's sale changes (defined, terms, reopened): workers
/// look for changes only when it moved, one GET per pass.
pub const SKU_INDEX_GENERATION: &str = "fg:{skus}:gen";
/// SKU -> the generation of its last change (lua/mark_changed.lua, same slot as the
/// counter): a worker that sees the generation move re-plans only the SKUs changed
/// since, not every SKU on sale.
pub const SKU_CHANGES: &str = "fg:{skus}:changed";
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
    /// User id -> the user's live holds (layout 1's index, see lua/lib.lua).
    pub uholds: String,
    /// Holds created while a reconciler check runs (lua/recon_begin.lua).
    pub rlog: String,
    /// User id -> holds released in the current window (layout 1; layout 2 keeps this
    /// in the usage record, lua/lib.lua).
    pub churn: String,
    /// Reservation tail -> hold record (lua/lib.lua), until MySQL has its end.
    pub holds: String,
    /// Transfers of stock to or from this bucket not finished yet (src/buckets.rs).
    pub transfers: String,
    prefix: String,
}

impl SkuKeys {
    pub fn new(sku: &SkuId) -> SkuKeys {
        SkuKeys::for_tag(sku.as_str())
    }

    /// The keys of one bucket of a SKU, by its hash tag (`buckets::tag`).
    pub fn for_tag(tag: &str) -> SkuKeys {
        let prefix = format!("fg:{{{tag}}}:");
        SkuKeys {
            meta: format!("{prefix}meta"),
            used: format!("{prefix}used"),
            deadlines: format!("{prefix}deadlines"),
            outbox: format!("{prefix}outbox"),
            comps: format!("{prefix}comps"),
            uholds: format!("{prefix}uholds"),
            rlog: format!("{prefix}rlog"),
            churn: format!("{prefix}churn"),
            holds: format!("{prefix}holds"),
            transfers: format!("{prefix}transfers"),
            prefix,
        }
    }

    /// The keys a script that changes the sale may touch, declared first (KEYS[1..9])
    /// by each such script: on a cluster only declared keys are checked before a
    /// script runs, so while the SKU's slot migrates the script waits (TRYAGAIN)
    /// instead of failing half-way on a key that already moved (lua/check_keys.lua).
    pub fn sale(&self) -> [&str; 9] {
        [
            &self.meta,
            &self.used,
            &self.deadlines,
            &self.uholds,
            &self.outbox,
            &self.comps,
            &self.churn,
            &self.rlog,
            &self.holds,
        ]
    }

    /// The part of a reservation id Redis keeps (`holds`, `deadlines`): what follows the
    /// SKU's head (src/ids.rs); the whole id when it has no head.
    pub fn tail(reservation_id: &str) -> &str {
        reservation_id
            .split_once('.')
            .map_or(reservation_id, |(_, tail)| tail)
    }

    /// The waiting room's line: user -> order (lua/queue.lua).
    pub fn queue_line(&self) -> String {
        format!("{}q:line", self.prefix)
    }

    /// The waiting room's admissions not used yet: user -> admitted_until.
    pub fn queue_admits(&self) -> String {
        format!("{}q:admits", self.prefix)
    }

    /// The waiting room's admissions a hold used: user -> admitted_until.
    pub fn queue_used(&self) -> String {
        format!("{}q:used", self.prefix)
    }

    /// The waiting room's counters (served, arrivals, ...).
    pub fn queue_state(&self) -> String {
        format!("{}q:state", self.prefix)
    }

    /// Left by a rebuild's restore of the buyers' usage into a sale Redis has no live
    /// state for, and taken by the load that follows (lua/restore_usage.lua,
    /// lua/load_sku.lua): a load that does not find it knows Redis lost the restored
    /// usage in between.
    pub fn usage_restored(&self) -> String {
        format!("{}restored", self.prefix)
    }

    /// The hash tag of these keys: the SKU, or one of its buckets (src/buckets.rs).
    pub fn tag(&self) -> &str {
        &self.prefix[4..self.prefix.len() - 2]
    }

    /// Layout 1's hash of one reservation (lua/lib.lua): read, and moved into `holds`.
    pub fn reservation(&self, reservation_id: &str) -> String {
        format!("{}r:{reservation_id}", self.prefix)
    }

    /// Layout 1's idempotency key (read for layout-1 SKUs; layout 2 keeps the key in the
    /// user's usage record). Scoped to user and SKU; the user id's length comes first so that no
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
            &keys.uholds,
            &keys.rlog,
            &keys.churn,
            &keys.holds,
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
