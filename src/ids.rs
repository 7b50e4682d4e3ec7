//! Identifiers: SKU ids (validated), reservation ids (opaque, unguessable, carrying
//! their SKU so they route without any global lookup, and a MAC under a server key so
//! the gateway can tell an id it issued from a made-up one even after Redis lost it)
//! and compensation ids (derived from reservation and payment, so a payment can never
//! get two).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

use crate::limits::SKU_ID_MAX_LEN;

/// Random bytes in every new reservation id: 96 bits, above the contract's 64.
const RANDOM_BYTES: usize = 12;
/// MAC bytes in a reservation id: forging one takes 2^64 tries against the gateway.
const MAC_BYTES: usize = 8;
/// Length of RANDOM_BYTES + MAC_BYTES in unpadded base64url.
const TAIL_CHARS: usize = 27;
/// Ids issued before the MAC (16 random bytes, no MAC): still routed, never vouched for.
const LEGACY_TAIL_CHARS: usize = 22;
/// Random or derived bytes in a compensation id.
const COMPENSATION_BYTES: usize = 16;

/// A SKU id: `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SkuId(String);

impl SkuId {
    pub fn parse(raw: &str) -> Option<SkuId> {
        let valid = !raw.is_empty()
            && raw.len() <= SKU_ID_MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        valid.then(|| SkuId(raw.to_owned()))
    }

    /// The sale under a hash tag: a SKU (`sku`) or one bucket of a SKU (`sku~b~n`,
    /// src/buckets.rs). Redis-side code (store, worker, reconciler) names a bucket this
    /// way, since a bucket is a whole sale of its share; clients only ever name SKUs
    /// (`parse` refuses '~').
    pub fn of_tag(tag: &str) -> Option<SkuId> {
        let (sku, bucket) = tag.split_at(tag.find('~').unwrap_or(tag.len()));
        let sku = SkuId::parse(sku)?;
        if bucket.is_empty() {
            return Some(sku);
        }
        let (b, n) = bucket[1..].split_once('~')?;
        valid_bucket_suffix(b, n).then(|| SkuId(tag.to_owned()))
    }

    /// The SKU this sale belongs to: itself, or the SKU of a bucket.
    pub fn sku(&self) -> SkuId {
        SkuId(crate::buckets::sku_of_tag(&self.0).to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `b` and `n` of a bucket tag `sku~b~n`: decimal, no leading zeros, b in 1..BUCKETS_MAX.
fn valid_bucket_suffix(b: &str, n: &str) -> bool {
    let number = |v: &str| !v.is_empty() && v.len() <= 9 && v.bytes().all(|c| c.is_ascii_digit());
    let b_ok = number(b)
        && !b.starts_with('0')
        && b.parse::<u32>()
            .is_ok_and(|b| b < crate::buckets::BUCKETS_MAX);
    b_ok && number(n) && !(n.starts_with('0') && n != "0")
}

impl fmt::Display for SkuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One key of the reservation-id MAC, kept as the HMAC state with the key absorbed:
/// each id then costs the hashing of its own bytes only, not the key's two blocks.
#[derive(Clone)]
pub struct IdKey(Hmac<Sha256>);

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(..)")
    }
}

/// The keys reservation ids are checked under: new ids are signed with the first; an
/// id is ours when any of them issued it. `FLASHGATE_ID_KEY` comes first when set, then
/// its previous values, then the keys derived from the current and every previous JWT
/// secret (ids issued before the id key was set). So neither setting the id key nor
/// rotating it or the JWT secret turns an issued id into "never issued": after Redis
/// lost the hold, a payment for it still gets its compensation, never a 404.
#[derive(Clone, Debug)]
pub struct IdKeys(Vec<IdKey>);

impl IdKeys {
    /// `id_key`: FLASHGATE_ID_KEY; `other_id_keys`: the other id keys ids are checked
    /// under; `jwt_secrets`: the JWT secret and the other accepted ones, current first.
    /// New ids are signed with the id key, else with the current JWT secret's key, never
    /// with one of the others (a key only accepted so far is not known to every gateway
    /// yet). None when there is nothing to sign with.
    pub fn new(
        id_key: Option<&str>,
        other_id_keys: &[&str],
        jwt_secrets: &[&str],
    ) -> Option<IdKeys> {
        let keys: Vec<IdKey> = id_key
            .map(IdKey::from_id_key)
            .into_iter()
            .chain(jwt_secrets.iter().map(|s| IdKey::derive(s)))
            .chain(other_id_keys.iter().map(|k| IdKey::from_id_key(k)))
            .collect();
        let signs = id_key.is_some() || !jwt_secrets.is_empty();
        signs.then_some(IdKeys(keys))
    }

    /// A reservation id of the sale under hash tag `tag`, signed with the signing key.
    pub fn new_reservation_id_in(&self, tag: &str) -> String {
        self.0[0].new_reservation_id_in(tag)
    }

    /// True when any of the keys issued the id. Every key is tried (no early exit), so
    /// the time taken says nothing about which one, if any, matched.
    pub fn issued(&self, id: &str) -> bool {
        self.0.iter().fold(false, |ours, key| key.issued(id) | ours)
    }

    /// The MAC of an admission token's payload (src/queue.rs) under the signing key.
    pub fn admission_mac(&self, payload: &[u8]) -> [u8; ADMISSION_MAC_BYTES] {
        self.0[0].admission_mac(payload)
    }

    /// True when any of the keys made `mac` for `payload`: tokens signed before a key
    /// rotation stay valid while their key is still accepted. No early exit.
    pub fn admission_signed(&self, payload: &[u8], mac: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.iter().fold(false, |ours, key| {
            bool::from(key.admission_mac(payload).ct_eq(mac)) | ours
        })
    }
}

/// MAC bytes of an admission token: forging one takes 2^128 tries.
pub const ADMISSION_MAC_BYTES: usize = 16;

impl IdKey {
    /// The key derived from a JWT secret (how ids were signed before FLASHGATE_ID_KEY).
    pub fn derive(secret: &str) -> IdKey {
        let mut hasher = Sha256::new();
        hasher.update(b"flashgate reservation id key v1\0");
        hasher.update(secret.as_bytes());
        IdKey::keyed(&hasher.finalize())
    }

    /// The key of a `FLASHGATE_ID_KEY` value (under its own label: never equal to a key
    /// derived from a JWT secret of the same bytes).
    pub fn from_id_key(id_key: &str) -> IdKey {
        let mut hasher = Sha256::new();
        hasher.update(b"flashgate reservation id key v2\0");
        hasher.update(id_key.as_bytes());
        IdKey::keyed(&hasher.finalize())
    }

    fn keyed(key: &[u8]) -> IdKey {
        IdKey(Hmac::<Sha256>::new_from_slice(key).expect("any key length"))
    }

    fn mac(&self, sku_part: &str, random: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = self.0.clone();
        mac.update(sku_part.as_bytes());
        mac.update(b".");
        mac.update(random);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    /// A reservation id's MAC covers `<base64url>.<random>`, which never starts with a
    /// NUL byte: the label keeps admission MACs apart from reservation-id MACs.
    fn admission_mac(&self, payload: &[u8]) -> [u8; ADMISSION_MAC_BYTES] {
        let mut mac = self.0.clone();
        mac.update(b"\0flashgate admission token v1\0");
        mac.update(payload);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; ADMISSION_MAC_BYTES];
        out.copy_from_slice(&full[..ADMISSION_MAC_BYTES]);
        out
    }

    /// `<base64url(sku)>.<base64url(96 random bits ++ 64-bit MAC)>`: '.' is in neither alphabet.
    pub fn new_reservation_id(&self, sku: &SkuId) -> String {
        self.new_reservation_id_in(sku.as_str())
    }

    /// A reservation id of the sale under hash tag `tag`: the SKU itself, or one of its
    /// buckets (`sku~b~n`, src/buckets.rs), whose `~b~n` follows the SKU's base64 (so
    /// the id routes to its bucket with no lookup, and the MAC covers the bucket too).
    pub fn new_reservation_id_in(&self, tag: &str) -> String {
        let sku_part = reservation_head(tag);
        let mut bytes = [0u8; RANDOM_BYTES + MAC_BYTES];
        rand::rng().fill_bytes(&mut bytes[..RANDOM_BYTES]);
        let mac = self.mac(&sku_part, &bytes[..RANDOM_BYTES]);
        bytes[RANDOM_BYTES..].copy_from_slice(&mac);
        format!("{sku_part}.{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// True when this key issued the id (checked in constant time).
    pub fn issued(&self, id: &str) -> bool {
        use subtle::ConstantTimeEq;
        let Some((sku_part, tail)) = id.split_once('.') else {
            return false;
        };
        if tail.len() != TAIL_CHARS || sku_of_reservation(id).is_none() {
            return false;
        }
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(tail) else {
            return false;
        };
        let expected = self.mac(sku_part, &bytes[..RANDOM_BYTES]);
        expected.ct_eq(&bytes[RANDOM_BYTES..]).into()
    }
}

/// What every reservation id of the sale under hash tag `tag` starts with, before its
/// '.': the SKU's base64, then the bucket's `~b~n` for a bucket (src/buckets.rs).
pub fn reservation_head(tag: &str) -> String {
    let (sku, bucket) = tag.split_at(tag.find('~').unwrap_or(tag.len()));
    format!("{}{bucket}", URL_SAFE_NO_PAD.encode(sku))
}

/// The SKU a reservation id belongs to, or None when the id is not one of ours.
pub fn sku_of_reservation(id: &str) -> Option<SkuId> {
    tag_of_reservation(id).map(|(sku, _)| sku)
}

/// The SKU of a reservation id and the hash tag of the sale that holds it: the SKU's
/// own, or a bucket's (`sku~b~n`, src/buckets.rs). None when the id is not one of ours.
pub fn tag_of_reservation(id: &str) -> Option<(SkuId, String)> {
    let (sku_part, tail) = id.split_once('.')?;
    if !matches!(tail.len(), TAIL_CHARS | LEGACY_TAIL_CHARS)
        || URL_SAFE_NO_PAD.decode(tail).is_err()
    {
        return None;
    }
    let (encoded, bucket) = sku_part.split_at(sku_part.find('~').unwrap_or(sku_part.len()));
    if !bucket.is_empty() {
        let (b, n) = bucket[1..].split_once('~')?;
        if !valid_bucket_suffix(b, n) {
            return None;
        }
    }
    let sku = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let sku = SkuId::parse(std::str::from_utf8(&sku).ok()?)?;
    let tag = format!("{sku}{bucket}");
    Some((sku, tag))
}

/// The sale (the SKU, or the bucket of it: `SkuId::of_tag`) holding a reservation id.
pub fn sale_of_reservation(id: &str) -> Option<SkuId> {
    tag_of_reservation(id).and_then(|(_, tag)| SkuId::of_tag(&tag))
}

/// The one compensation id of a (reservation, payment_ref): the gateway, the flush and
/// a retried webhook all arrive at the same id, so no payment can get two records.
/// Unguessable without the reservation id (128 random bits in it).
pub fn compensation_id(reservation_id: &str, payment_ref: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"flashgate compensation v1\0");
    // Length-prefixed: no (reservation, payment) pair can spell another pair.
    hasher.update((reservation_id.len() as u64).to_be_bytes());
    hasher.update(reservation_id.as_bytes());
    hasher.update(payment_ref.as_bytes());
    let digest = hasher.finalize();
    format!(
        "c_{}",
        URL_SAFE_NO_PAD.encode(&digest[..COMPENSATION_BYTES])
    )
}

/// A unique name (worker consumers).
pub fn random_name() -> String {
    let mut bytes = [0u8; COMPENSATION_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_ids_follow_the_contract_alphabet() {
        assert!(SkuId::parse("sku-1_A").is_some());
        assert!(SkuId::parse(&"a".repeat(64)).is_some());
        assert!(SkuId::parse(&"a".repeat(65)).is_none());
        for bad in ["", "a b", "a/b", "a.b", "{x}", "é", "a\n"] {
            assert!(SkuId::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    fn key() -> IdKey {
        IdKey::derive("test-secret")
    }

    #[test]
    fn reservation_ids_route_to_their_sku_and_differ() {
        let sku = SkuId::parse("flash-42").unwrap();
        let a = key().new_reservation_id(&sku);
        let b = key().new_reservation_id(&sku);
        assert_ne!(a, b);
        assert_eq!(sku_of_reservation(&a), Some(sku.clone()));
        assert!(!a.contains("flash-42"), "the id should be opaque: {a}");
    }

    #[test]
    fn forged_reservation_ids_are_rejected() {
        let sku = SkuId::parse("s").unwrap();
        let good = key().new_reservation_id(&sku);
        let (head, tail) = good.split_once('.').unwrap();
        for bad in [
            "".to_string(),
            "nodot".to_string(),
            format!("{head}."),
            format!("{head}.{}", &tail[1..]),
            format!("{head}.{tail}x"),
            format!("{}.{tail}", URL_SAFE_NO_PAD.encode("bad sku")),
            format!("!!.{tail}"),
        ] {
            assert_eq!(sku_of_reservation(&bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn only_ids_issued_under_the_key_are_vouched_for() {
        let sku = SkuId::parse("s").unwrap();
        let id = key().new_reservation_id(&sku);
        assert!(key().issued(&id));
        assert!(!IdKey::derive("other-secret").issued(&id));
        // Same SKU, same shape, one character of the tail changed: not ours.
        let (head, tail) = id.split_once('.').unwrap();
        let flipped: String = tail
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 3 {
                    if c == 'A' {
                        'B'
                    } else {
                        'A'
                    }
                } else {
                    c
                }
            })
            .collect();
        assert!(!key().issued(&format!("{head}.{flipped}")));
        // The id names another SKU: the MAC covers the SKU too.
        let other = URL_SAFE_NO_PAD.encode("t");
        assert!(!key().issued(&format!("{other}.{tail}")));
        // Legacy ids (no MAC) still route but are never vouched for.
        let legacy = format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 16]));
        assert_eq!(sku_of_reservation(&legacy), Some(sku));
        assert!(!key().issued(&legacy));
    }

    /// Every bit of an issued id's tail is checked: one bit flipped anywhere in the MAC
    /// (all 64 bits, not a prefix of them) or in the random part it covers, and the key
    /// no longer vouches for the id.
    #[test]
    fn every_bit_of_the_mac_and_of_the_random_part_is_checked() {
        let sku = SkuId::parse("s").unwrap();
        let id = key().new_reservation_id(&sku);
        assert!(key().issued(&id));
        let (head, tail) = id.split_once('.').unwrap();
        let bytes = URL_SAFE_NO_PAD.decode(tail).unwrap();
        assert_eq!(bytes.len(), RANDOM_BYTES + MAC_BYTES);
        for byte in 0..bytes.len() {
            let part = if byte < RANDOM_BYTES { "random" } else { "MAC" };
            for bit in 0..8 {
                let mut forged = bytes.clone();
                forged[byte] ^= 1 << bit;
                let forged = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&forged));
                assert_eq!(tag_of_reservation(&forged), tag_of_reservation(&id));
                assert!(
                    !key().issued(&forged),
                    "{part} byte {byte} bit {bit} not checked: {forged}"
                );
            }
        }
    }

    /// A rolling rotation: ids issued under the JWT secret before the id key was set,
    /// under a previous JWT secret and under a previous id key all stay ours; new ids
    /// are signed with the id key; an id of a key never configured is not ours.
    #[test]
    fn ids_of_every_configured_key_stay_ours_and_new_ids_use_the_id_key() {
        let id_key = "id-key-0123456789abcdef0123456789abcdef";
        let old_id_key = "old-id-key-0123456789abcdef0123456789ab";
        let (secret, old_secret) = ("jwt-secret-b", "jwt-secret-a");
        let keys = IdKeys::new(Some(id_key), &[old_id_key], &[secret, old_secret]).unwrap();
        for issuer in [
            IdKey::from_id_key(id_key),
            IdKey::from_id_key(old_id_key),
            IdKey::derive(secret),
            IdKey::derive(old_secret),
        ] {
            let id = issuer.new_reservation_id_in("s");
            assert!(keys.issued(&id), "{id} refused");
        }
        let new = keys.new_reservation_id_in("s");
        assert!(IdKey::from_id_key(id_key).issued(&new));
        assert!(!IdKey::derive(secret).issued(&new));
        let stranger = IdKey::derive("jwt-secret-never-set").new_reservation_id_in("s");
        assert!(!keys.issued(&stranger));
        // An id key is not the JWT secret of the same bytes.
        let derived = IdKey::derive(id_key).new_reservation_id_in("s");
        assert!(!IdKeys::new(Some(id_key), &[], &[])
            .unwrap()
            .issued(&derived));
        // Without an id key, new ids are signed with the current JWT secret's key, also
        // while another id key is accepted (the first step of a rotation).
        let accepting = IdKeys::new(None, &[id_key], &[secret, old_secret]).unwrap();
        let new = accepting.new_reservation_id_in("s");
        assert!(IdKey::derive(secret).issued(&new));
        assert!(accepting.issued(&IdKey::from_id_key(id_key).new_reservation_id_in("s")));
        // Nothing to sign with: no key set.
        assert!(IdKeys::new(None, &[id_key], &[]).is_none());
        // A key listed twice (a secret also among the previous ones) still vouches.
        let twice = IdKeys::new(Some(id_key), &[id_key], &[secret, secret]).unwrap();
        assert!(twice.issued(&IdKey::derive(secret).new_reservation_id_in("s")));
        assert!(twice.issued(&twice.new_reservation_id_in("s")));
    }

    #[test]
    fn bucket_reservation_ids_route_to_their_bucket_and_the_mac_covers_it() {
        let sku = SkuId::parse("hot").unwrap();
        let tag = crate::buckets::tag(&sku, 2, 3);
        let id = key().new_reservation_id_in(&tag);
        assert_eq!(tag_of_reservation(&id), Some((sku.clone(), tag.clone())));
        assert_eq!(sku_of_reservation(&id), Some(sku.clone()));
        assert!(key().issued(&id));
        // Pointed at another bucket: still routes, never vouched for.
        let other = id.replacen("~2~", "~1~", 1);
        assert!(tag_of_reservation(&other).is_some());
        assert!(!key().issued(&other));
        let plain = key().new_reservation_id(&sku);
        assert_eq!(tag_of_reservation(&plain), Some((sku, "hot".to_string())));
        let (head, tail) = id.split_once('.').unwrap();
        let base = head.split('~').next().unwrap();
        for bad in [
            "~", "~1", "~1~", "~0~3", "~01~3", "~1~03", "~16~0", "~x~1", "~1~1~1",
        ] {
            let forged = format!("{base}{bad}.{tail}");
            assert_eq!(tag_of_reservation(&forged), None, "{forged}");
        }
    }

    #[test]
    fn sale_tags_name_a_sku_or_one_of_its_buckets() {
        let bucket = SkuId::of_tag("hot~2~17").unwrap();
        assert_eq!(bucket.as_str(), "hot~2~17");
        assert_eq!(bucket.sku(), SkuId::parse("hot").unwrap());
        assert_eq!(SkuId::of_tag("hot"), SkuId::parse("hot"));
        assert_eq!(
            SkuId::of_tag("hot").unwrap().sku(),
            SkuId::parse("hot").unwrap()
        );
        for bad in [
            "hot~0~1",
            "hot~1~01",
            "~1~1",
            "hot~16~1",
            "hot~1",
            "hot~1~1~1",
            "h t~1~1",
        ] {
            assert_eq!(SkuId::of_tag(bad), None, "{bad}");
        }
        assert_eq!(SkuId::parse("hot~1~1"), None, "clients name SKUs only");
    }

    #[test]
    fn compensation_ids_are_one_per_reservation_and_payment() {
        let a = compensation_id("r1", "pay-1");
        assert_eq!(a, compensation_id("r1", "pay-1"));
        assert_ne!(a, compensation_id("r1", "pay-2"));
        assert_ne!(a, compensation_id("r2", "pay-1"));
        assert_ne!(compensation_id("r1", "\0x"), compensation_id("r1\0", "x"));
        assert!(a.starts_with("c_") && a.len() <= 64);
    }
}
