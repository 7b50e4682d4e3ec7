//! Stock buckets (issue 13), the pieces built so far: where bucket b of a SKU lives, and
//! moving stock between buckets. Not wired into the admin API or the reserve path yet
//! (`buckets` other than 1 is refused: README, "Deviations from the contract").
//!
//! A bucket is a complete sale of its share of the stock under its own hash tag:
//! bucket 0 is `{sku}` itself (so one bucket is today's layout, at today's cost) and
//! bucket b > 0 is `{sku~b~n}` ('~' is in no SKU id), with n the smallest suffix whose
//! slot lies in the middle of the ((k-th of bucket 0) + b) mod k-th k-th of the slot
//! space: on a cluster whose slots are split evenly over k primaries (what
//! `redis-cli --cluster create` does), the k buckets land on k different primaries.
//!
//! A transfer moves stock from a donor bucket to a receiver in steps that are each one
//! atomic script (lua/transfer_take.lua, transfer_give.lua, transfer_done.lua), so that
//! at every instant Σ over buckets of stock_total + Σ stock in transit == the SKU's
//! stock_total, and a transfer cut at any step is finished by `Store::finish_transfers`
//! exactly once.

use crate::ids::SkuId;

/// Buckets a SKU may have at most.
pub const BUCKETS_MAX: u32 = 16;
/// Redis Cluster's hash slots.
const SLOTS: u32 = 16_384;

/// The hash slot of a key or a hash tag (CRC16/XMODEM mod 16384, as Redis Cluster).
pub fn slot(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS as u16
}

/// The hash tag of bucket `bucket` (0-based) of a SKU split over `buckets`.
pub fn tag(sku: &SkuId, bucket: u32, buckets: u32) -> String {
    assert!(
        (1..=BUCKETS_MAX).contains(&buckets) && bucket < buckets,
        "bucket {bucket} of {buckets}"
    );
    if bucket == 0 {
        return sku.as_str().to_owned();
    }
    let width = SLOTS / buckets;
    let home = (u32::from(slot(sku.as_str())) / width).min(buckets - 1);
    let arc = (home + bucket) % buckets;
    // The middle three quarters of the arc: clear of a boundary that a cluster's own
    // split may draw a slot or two off ours.
    let (low, high) = (arc * width + width / 8, arc * width + width - width / 8);
    (0u32..)
        .map(|n| format!("{sku}~{bucket}~{n}"))
        .find(|tag| (low..high).contains(&u32::from(slot(tag))))
        .expect("a suffix lands in any arc")
}

/// The SKU of a hash tag (`sku` or `sku~b~n`).
pub fn sku_of_tag(tag: &str) -> &str {
    tag.split_once('~').map_or(tag, |(sku, _)| sku)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // CLUSTER KEYSLOT of these, from redis-cli.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("123456789"), 12739);
    }

    #[test]
    fn buckets_spread_over_evenly_split_primaries() {
        for name in ["a", "hot-item", "sku_2026-12", "x9"] {
            let sku = SkuId::parse(name).unwrap();
            assert_eq!(tag(&sku, 0, 1), name);
            for k in 1..=BUCKETS_MAX {
                // The primaries of a k-node cluster as redis-cli splits the slots.
                let node = |s: u16| {
                    (0..k)
                        .find(|&i| u32::from(s) < (i + 1) * SLOTS / k)
                        .unwrap()
                };
                let mut nodes: Vec<u32> = (0..k).map(|b| node(slot(&tag(&sku, b, k)))).collect();
                nodes.sort_unstable();
                nodes.dedup();
                assert_eq!(nodes.len() as u32, k, "{name}, {k} buckets: {nodes:?}");
                for b in 1..k {
                    let t = tag(&sku, b, k);
                    assert_eq!(sku_of_tag(&t), name);
                    assert_eq!(t, tag(&sku, b, k), "the same tag every time");
                }
            }
        }
    }
}
