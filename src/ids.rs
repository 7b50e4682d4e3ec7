//! Identifiers: SKU ids (validated), reservation ids (opaque, unguessable, and carrying
//! their SKU so they route without any global lookup) and compensation ids.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use std::fmt;

use crate::limits::SKU_ID_MAX_LEN;

/// Random bytes in every id: 128 bits, far above the contract's 64.
const RANDOM_BYTES: usize = 16;
/// Length of RANDOM_BYTES in unpadded base64url.
const RANDOM_CHARS: usize = 22;

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

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SkuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn random_part() -> String {
    let mut bytes = [0u8; RANDOM_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `<base64url(sku)>.<base64url(128 random bits)>`: '.' is in neither alphabet.
pub fn new_reservation_id(sku: &SkuId) -> String {
    format!("{}.{}", URL_SAFE_NO_PAD.encode(sku.as_str()), random_part())
}

/// The SKU a reservation id belongs to, or None when the id is not one of ours.
pub fn sku_of_reservation(id: &str) -> Option<SkuId> {
    let (sku_part, random) = id.split_once('.')?;
    if random.len() != RANDOM_CHARS || URL_SAFE_NO_PAD.decode(random).is_err() {
        return None;
    }
    let sku = URL_SAFE_NO_PAD.decode(sku_part).ok()?;
    SkuId::parse(std::str::from_utf8(&sku).ok()?)
}

pub fn new_compensation_id() -> String {
    format!("c_{}", random_part())
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

    #[test]
    fn reservation_ids_route_to_their_sku_and_differ() {
        let sku = SkuId::parse("flash-42").unwrap();
        let a = new_reservation_id(&sku);
        let b = new_reservation_id(&sku);
        assert_ne!(a, b);
        assert_eq!(sku_of_reservation(&a), Some(sku.clone()));
        assert!(!a.contains("flash-42"), "the id should be opaque: {a}");
    }

    #[test]
    fn forged_reservation_ids_are_rejected() {
        let sku = SkuId::parse("s").unwrap();
        let good = new_reservation_id(&sku);
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
}
