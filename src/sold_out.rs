//! The local sold-out flag: once Redis answered `sold_out` for a SKU and a quantity,
//! this gateway answers the same for that quantity or more without a round trip, for
//! at most SOLD_OUT_FLAG_TTL. A cheap refusal keeps a sold-out burst off Redis.
//! From SOLD_OUT_FLAG_REFRESH on, one request at a time asks Redis again while the
//! others still get the flag's answer: its `sold_out` renews the flag, so a sold-out
//! SKU sees one request per refresh, not the burst of every request at expiry.
//! Units a cancel through this gateway gives back let requests for as many units ask
//! Redis (not every request: at the tail of a sale cancels come all the time).
//! A refusal renews the flag only for what it proves: Redis refusing a larger quantity
//! says nothing about smaller ones, so it neither renews the flag's age nor clears the
//! units given back; stock that comes back any other way (expiry, restock, another
//! gateway's cancel) is asked for within SOLD_OUT_FLAG_TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Instant;

use crate::ids::SkuId;
use crate::limits::{SOLD_OUT_FLAG_REFRESH, SOLD_OUT_FLAG_TTL};

struct Flag {
    /// Redis refused this quantity: available was below it.
    smallest_refused_quantity: u64,
    raised_at: Instant,
    /// A request is asking Redis again (it got `FlagCheck::Refresh`).
    refreshing: AtomicBool,
    /// Units given back through this gateway since the flag went up, not yet passed
    /// on to requests that ask Redis for them.
    returned: AtomicU64,
}

/// What the flag says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagCheck {
    /// Ask Redis: no flag for this quantity.
    Ask,
    /// Answer `sold_out` (unless the request replays a hold).
    SoldOut,
    /// Ask Redis for everyone: the flag is old. Report the answer: `raise` on
    /// `sold_out`, `lower` when served, `refreshed` otherwise.
    Refresh,
}

#[derive(Default)]
pub struct SoldOutFlags {
    flags: RwLock<HashMap<SkuId, Flag>>,
}

impl SoldOutFlags {
    /// Whether a request of `quantity` gets `sold_out` from the flag (Redis recently
    /// refused that quantity or less for this SKU), asks Redis, or refreshes the flag.
    pub fn check(&self, sku: &SkuId, quantity: u64) -> FlagCheck {
        let flags = self.flags.read().unwrap_or_else(|e| e.into_inner());
        let Some(flag) = flags.get(sku) else {
            return FlagCheck::Ask;
        };
        let age = flag.raised_at.elapsed();
        if quantity < flag.smallest_refused_quantity
            || age >= SOLD_OUT_FLAG_TTL
            // Units given back: requests ask. One they can serve takes its quantity
            // from them; a larger one (it may fit with what was there) asks without
            // taking any, so its refusal leaves them to smaller requests.
            || flag
                .returned
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |units| {
                    (units > 0).then(|| {
                        if quantity <= units {
                            units - quantity
                        } else {
                            units
                        }
                    })
                })
                .is_ok()
        {
            FlagCheck::Ask
        } else if age >= SOLD_OUT_FLAG_REFRESH
            && flag
                .refreshing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            FlagCheck::Refresh
        } else {
            FlagCheck::SoldOut
        }
    }

    /// Redis refused `quantity`: available is below it now. The flag is (re)raised
    /// for it unless a live flag covers smaller quantities, which this refusal does not
    /// prove: then only the next refresh may go.
    pub fn raise(&self, sku: &SkuId, quantity: u64) {
        let mut flags = self.flags.write().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let flag = flags.entry(sku.clone()).or_insert(Flag {
            smallest_refused_quantity: quantity,
            raised_at: now,
            refreshing: AtomicBool::new(false),
            returned: AtomicU64::new(0),
        });
        flag.refreshing.store(false, Ordering::Release);
        let live = flag.raised_at.elapsed() < SOLD_OUT_FLAG_TTL;
        if live && quantity > flag.smallest_refused_quantity {
            return;
        }
        flag.smallest_refused_quantity = quantity;
        flag.raised_at = now;
        flag.returned.store(0, Ordering::Release);
    }

    /// A cancel through this gateway gave back `units`: requests ask Redis until they
    /// asked for that many units (a returned unit is sellable at once, as with no flag;
    /// a request for more than is left to pass asks too, since the units may be
    /// enough with what was there).
    pub fn returned(&self, sku: &SkuId, units: u64) {
        let flags = self.flags.read().unwrap_or_else(|e| e.into_inner());
        if let Some(flag) = flags.get(sku) {
            flag.returned.fetch_add(units, Ordering::AcqRel);
        }
    }

    /// A refresh (`FlagCheck::Refresh`) ended in neither `sold_out` nor a hold (an
    /// error, another refusal): the next request past the refresh age asks instead.
    pub fn refreshed(&self, sku: &SkuId) {
        let flags = self.flags.read().unwrap_or_else(|e| e.into_inner());
        if let Some(flag) = flags.get(sku) {
            flag.refreshing.store(false, Ordering::Release);
        }
    }

    /// The SKU was (re)defined, or a refresh was served: ask Redis again.
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
        let sold_out = |q| flags.check(&sku, q) == FlagCheck::SoldOut;
        assert!(!sold_out(1));
        flags.raise(&sku, 2);
        assert!(sold_out(2) && sold_out(5));
        assert!(!sold_out(1), "a smaller quantity may still fit");
        flags.raise(&sku, 1);
        assert!(sold_out(1));
        flags.lower(&sku);
        assert!(!sold_out(3));
        flags.raise(&sku, 1);
        std::thread::sleep(SOLD_OUT_FLAG_TTL);
        assert_eq!(flags.check(&sku, 1), FlagCheck::Ask, "the flag expires");
    }

    #[test]
    fn an_old_flag_lets_one_request_at_a_time_ask_redis() {
        let flags = SoldOutFlags::default();
        let sku = SkuId::parse("s").unwrap();
        assert_eq!(flags.check(&sku, 1), FlagCheck::Ask);
        flags.raise(&sku, 1);
        assert_eq!(flags.check(&sku, 1), FlagCheck::SoldOut);
        std::thread::sleep(SOLD_OUT_FLAG_REFRESH);
        assert_eq!(flags.check(&sku, 1), FlagCheck::Refresh);
        assert_eq!(flags.check(&sku, 2), FlagCheck::SoldOut, "one at a time");
        flags.refreshed(&sku); // it ended without an answer: another may ask
        assert_eq!(flags.check(&sku, 1), FlagCheck::Refresh);
        flags.raise(&sku, 1); // it was sold out: renewed
        assert_eq!(flags.check(&sku, 1), FlagCheck::SoldOut);
        std::thread::sleep(SOLD_OUT_FLAG_REFRESH);
        assert_eq!(flags.check(&sku, 1), FlagCheck::Refresh);
        flags.lower(&sku); // it was served
        assert_eq!(flags.check(&sku, 1), FlagCheck::Ask);
        flags.raise(&sku, 1);
        std::thread::sleep(SOLD_OUT_FLAG_TTL);
        assert_eq!(
            flags.check(&sku, 1),
            FlagCheck::Ask,
            "past the TTL everyone asks"
        );
    }

    #[test]
    fn a_refused_larger_quantity_renews_nothing_for_smaller_ones() {
        let flags = SoldOutFlags::default();
        let sku = SkuId::parse("s").unwrap();
        flags.raise(&sku, 1);
        std::thread::sleep(SOLD_OUT_FLAG_REFRESH);
        assert_eq!(flags.check(&sku, 2), FlagCheck::Refresh);
        flags.raise(&sku, 2); // Redis refused 2: says nothing of 1
        assert_eq!(
            flags.check(&sku, 1),
            FlagCheck::Refresh,
            "a 1 may refresh now"
        );
        flags.refreshed(&sku);
        std::thread::sleep(SOLD_OUT_FLAG_TTL - SOLD_OUT_FLAG_REFRESH);
        assert_eq!(
            flags.check(&sku, 1),
            FlagCheck::Ask,
            "the flag for 1 was not renewed by the refusal of 2"
        );
        assert_eq!(flags.check(&sku, 2), FlagCheck::Ask);
    }

    #[test]
    fn an_expired_flag_forgets_the_quantities_it_refused() {
        let flags = SoldOutFlags::default();
        let sku = SkuId::parse("s").unwrap();
        flags.raise(&sku, 1);
        std::thread::sleep(SOLD_OUT_FLAG_TTL);
        flags.raise(&sku, 5); // 3 units left, say: 1..=4 may still be served
        assert_eq!(flags.check(&sku, 1), FlagCheck::Ask);
        assert_eq!(flags.check(&sku, 4), FlagCheck::Ask);
        assert_eq!(flags.check(&sku, 5), FlagCheck::SoldOut);
    }

    #[test]
    fn a_unit_given_back_is_not_used_up_by_a_request_it_cannot_serve() {
        let flags = SoldOutFlags::default();
        let sku = SkuId::parse("s").unwrap();
        flags.raise(&sku, 1);
        flags.returned(&sku, 1);
        assert_eq!(
            flags.check(&sku, 2),
            FlagCheck::Ask,
            "it may fit with what was there"
        );
        flags.raise(&sku, 2); // it did not: that says nothing of 1
        assert_eq!(
            flags.check(&sku, 1),
            FlagCheck::Ask,
            "the unit is still passed on"
        );
        assert_eq!(flags.check(&sku, 1), FlagCheck::SoldOut, "once");
    }

    #[test]
    fn units_given_back_let_requests_for_that_many_units_ask() {
        let flags = SoldOutFlags::default();
        let sku = SkuId::parse("s").unwrap();
        flags.returned(&sku, 5); // no flag: nothing to remember
        flags.raise(&sku, 1);
        assert_eq!(flags.check(&sku, 1), FlagCheck::SoldOut);
        flags.returned(&sku, 3);
        assert_eq!(flags.check(&sku, 2), FlagCheck::Ask);
        assert_eq!(flags.check(&sku, 2), FlagCheck::Ask, "1 unit left: may do");
        assert_eq!(
            flags.check(&sku, 1),
            FlagCheck::Ask,
            "the unit left: 1 takes it"
        );
        assert_eq!(
            flags.check(&sku, 1),
            FlagCheck::SoldOut,
            "3 units asked for"
        );
        flags.returned(&sku, 1);
        flags.raise(&sku, 1); // Redis said sold_out since: the units went
        assert_eq!(flags.check(&sku, 1), FlagCheck::SoldOut);
    }
}
