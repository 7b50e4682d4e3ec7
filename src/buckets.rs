//! Stock buckets (issue 13): one hot SKU's stock split over k Redis hash slots, so
//! over a cluster's primaries, with the per-user limit, idempotency and `sold_out`
//! exactly as with one.
//!
//! A bucket is a complete sale of its share of the stock under its own hash tag:
//! bucket 0 is `{sku}` itself (so one bucket is today's layout, at today's cost) and
//! bucket b > 0 is `{sku~b~n}` ('~' is in no SKU id), with n the smallest suffix whose
//! slot lies in the middle of the ((k-th of bucket 0) + b) mod k-th k-th of the slot
//! space: on a cluster whose slots are split evenly over k primaries (what
//! `redis-cli --cluster create` does), the k buckets land on k different primaries.
//! Inside flashgate a bucket is named by `SkuId::of_tag`: every script, the sweep, the
//! flush and the reconciler's per-sale checks run on it unchanged.
//!
//! - A user's reserves always go to one **home bucket** (`home`): the limit, the
//!   idempotency key and the user's holds are decided by one atomic script, as with one.
//! - A reservation id carries its bucket (src/ids.rs): every later call routes by it.
//! - When the home bucket cannot serve a quantity, stock moves to it from the bucket
//!   with the most (src/gateway.rs): a **transfer** is steps that are each one atomic
//!   script (lua/transfer_take.lua, transfer_give.lua, transfer_done.lua), so that at
//!   every instant Σ over buckets of stock_total + Σ stock in transit == the SKU's
//!   stock_total; a transfer cut at any step is finished by `Store::finish_transfers`
//!   (the worker, every sweep pass; a reserve that waited) exactly once, however many
//!   finishers run and however late one acts (lib.lua give_units). `sold_out` only once no bucket has
//!   the quantity.
//! - MySQL keeps one record per SKU; the number of buckets is fixed at creation.

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

/// The sales (hash tags) of every bucket of a SKU, bucket 0 first.
pub fn sales(sku: &SkuId, buckets: u32) -> Vec<SkuId> {
    (0..buckets)
        .map(|b| SkuId::of_tag(&tag(sku, b, buckets)).expect("bucket tags are valid"))
        .collect()
}

/// The bucket a user's reserves of a SKU go to: fixed for (user, SKU, k), spread
/// evenly over the buckets.
pub fn home(sku: &SkuId, user_id: &str, buckets: u32) -> u32 {
    use sha2::{Digest, Sha256};
    if buckets <= 1 {
        return 0;
    }
    let mut hasher = Sha256::new();
    hasher.update((user_id.len() as u64).to_be_bytes());
    hasher.update(user_id.as_bytes());
    hasher.update(sku.as_str().as_bytes());
    let digest = hasher.finalize();
    let word = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (word % u64::from(buckets)) as u32
}

/// How many buckets a SKU's buyers are homed over: all of them, or only bucket 0 when
/// the SKU has a waiting room. Every reserve there spends an admission, and the
/// admissions live in bucket 0's slot with the line (lua/queue.lua), so the hold is
/// made in the same atomic call as the spend: buyers, and so the stock, stay in bucket
/// 0. The other buckets hold nothing (`split_for`); reserves come at the pace of
/// admissions, which one slot serves. Whether a split SKU has a waiting room is fixed
/// at its creation, as its number of buckets (a change would move buyers' homes, and
/// their per-user limits with them).
pub fn homes(buckets: u32, waiting_room: bool) -> u32 {
    if waiting_room {
        1
    } else {
        buckets
    }
}

/// How a SKU is split: its buckets, and how many of them its buyers are homed over
/// (`homes`). Both are fixed at the SKU's creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub buckets: u32,
    pub homes: u32,
}

/// `split` for a SKU whose buyers are homed over `homes` buckets of `buckets`: the
/// stock all in bucket 0 when that is their only home.
pub fn split_for(stock: u64, buckets: u32, homes: u32) -> Vec<u64> {
    if homes == 1 {
        let mut all_in_first = vec![0; buckets.max(1) as usize];
        all_in_first[0] = stock;
        return all_in_first;
    }
    split(stock, buckets)
}

/// The stock of each bucket of a new SKU: `stock` split as evenly as it goes, the
/// first buckets one unit more.
pub fn split(stock: u64, buckets: u32) -> Vec<u64> {
    let k = u64::from(buckets.max(1));
    (0..k)
        .map(|b| stock / k + u64::from(b < stock % k))
        .collect()
}

/// The SKU of a hash tag (`sku` or `sku~b~n`).
pub fn sku_of_tag(tag: &str) -> &str {
    tag.split_once('~').map_or(tag, |(sku, _)| sku)
}

/// The bucket of a hash tag: b of `{sku}~b~n`, 0 for the SKU's own tag.
pub fn bucket_of_tag(tag: &str) -> u32 {
    tag.split('~')
        .nth(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or(0)
}

/// Of `users` (user, units), those whose home is bucket `b` of `k`.
pub fn home_users(sku: &SkuId, users: &[(String, i64)], k: u32, b: u32) -> Vec<(String, i64)> {
    users
        .iter()
        .filter(|(user, _)| home(sku, user, k) == b)
        .cloned()
        .collect()
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
    fn stock_splits_whole_and_users_spread_over_their_homes() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split(7, 1), vec![7]);
        assert_eq!(split_for(10, 3, 3), vec![4, 3, 3]);
        assert_eq!(split_for(10, 3, homes(3, true)), vec![10, 0, 0]);
        assert_eq!(homes(3, false), 3);
        let sku = SkuId::parse("hot").unwrap();
        let mut homes = [0u32; 4];
        for u in 0..4_000 {
            let h = home(&sku, &format!("user-{u}"), 4);
            assert_eq!(
                h,
                home(&sku, &format!("user-{u}"), 4),
                "the same home every time"
            );
            homes[h as usize] += 1;
        }
        assert!(
            homes.iter().all(|&n| (800..1_200).contains(&n)),
            "{homes:?}"
        );
        assert_eq!(home(&sku, "anyone", 1), 0);
        let sales = sales(&sku, 3);
        assert_eq!(sales[0], sku);
        assert!(sales[1..].iter().all(|s| s != &sku && s.sku() == sku));
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
