//! The local sold-out flag: once Redis answered `sold_out` for a SKU and a quantity,
//! this gateway answers the same for that quantity or more without a round trip, for
//! at most SOLD_OUT_FLAG_TTL. A cheap refusal keeps a sold-out burst off Redis.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

use crate::ids::SkuId;
use crate::limits::SOLD_OUT_FLAG_TTL;

#[derive(Clone, Copy)]
struct Flag {
    /// Redis refused this quantity: available was below it.
    smallest_refused_quantity: u64,
    raised_at: Instant,
}

#[derive(Default)]
pub struct SoldOutFlags {
    flags: RwLock<HashMap<SkuId, Flag>>,
}

impl SoldOutFlags {
    /// True when Redis recently refused `quantity` or less for this SKU.
    pub fn is_sold_out(&self, sku: &SkuId, quantity: u64) -> bool {
        let flags = self.flags.read().unwrap_or_else(|e| e.into_inner());
        flags.get(sku).is_some_and(|flag| {
            quantity >= flag.smallest_refused_quantity
                && flag.raised_at.elapsed() < SOLD_OUT_FLAG_TTL
        })
    }

    pub fn raise(&self, sku: &SkuId, quantity: u64) {
        let mut flags = self.flags.write().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let flag = flags.entry(sku.clone()).or_insert(Flag {
            smallest_refused_quantity: quantity,
            raised_at: now,
        });
        if flag.raised_at.elapsed() >= SOLD_OUT_FLAG_TTL
            || quantity < flag.smallest_refused_quantity
        {
            flag.smallest_refused_quantity = quantity;
        }
        flag.raised_at = now;
    }

    /// Stock came back through this gateway (cancel, restock): ask Redis again.
    pub fn lower(&self, sku: &SkuId) {
        let mut flags = self.flags.write().unwrap_or_else(|e| e.into_inner());
        flags.remove(sku);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_covers_the_refused_quantity_and_more_until_it_expires() {
        let flags = SoldOutFlags::default();
        let sku = SkuId::parse("s").unwrap();
        assert!(!flags.is_sold_out(&sku, 1));
        flags.raise(&sku, 2);
        assert!(flags.is_sold_out(&sku, 2) && flags.is_sold_out(&sku, 5));
        assert!(
            !flags.is_sold_out(&sku, 1),
            "a smaller quantity may still fit"
        );
        flags.raise(&sku, 1);
        assert!(flags.is_sold_out(&sku, 1));
        flags.lower(&sku);
        assert!(!flags.is_sold_out(&sku, 3));
        flags.raise(&sku, 1);
        std::thread::sleep(SOLD_OUT_FLAG_TTL);
        assert!(!flags.is_sold_out(&sku, 1), "the flag expires");
    }
}
