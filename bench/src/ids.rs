//! Reservation ids as the gateway mints them, for holds the harness writes straight
//! into Redis (`flashgate-bench scale`): `base64url(sku) "." base64url(96 random bits
//! ++ the first 64 bits of HMAC-SHA256(key, base64url(sku) "." random))`, the key being
//! SHA-256("flashgate reservation id key v1\0" ++ FLASHGATE_JWT_SECRET).
//!
//! Kept in step with src/ids.rs (`IdKey::derive`, `IdKey::new_reservation_id`). The
//! harness has the JWT secret, so its ids carry a valid MAC: the gateway cannot tell
//! them from its own. SHA-256, HMAC and base64url are written out here (a few dozen
//! lines, checked against the published test vectors) so that the harness needs no
//! dependency beyond those it has.

use rand::RngCore;

const RANDOM_BYTES: usize = 12;
const MAC_BYTES: usize = 8;

/// The key the gateway signs reservation ids with, derived from the JWT secret.
pub struct IdKey([u8; 32]);

impl IdKey {
    pub fn derive(secret: &str) -> IdKey {
        let mut input = b"flashgate reservation id key v1\0".to_vec();
        input.extend_from_slice(secret.as_bytes());
        IdKey(sha256(&input))
    }

    /// A fresh id for a hold on `sku`.
    pub fn new_reservation_id(&self, sku: &str, rng: &mut impl RngCore) -> String {
        let mut random = [0u8; RANDOM_BYTES];
        rng.fill_bytes(&mut random);
        self.reservation_id(sku, &random)
    }

    fn reservation_id(&self, sku: &str, random: &[u8; RANDOM_BYTES]) -> String {
        let sku_part = base64url(sku.as_bytes());
        let mut message = Vec::with_capacity(sku_part.len() + 1 + RANDOM_BYTES);
        message.extend_from_slice(sku_part.as_bytes());
        message.push(b'.');
        message.extend_from_slice(random);
        let mac = hmac_sha256(&self.0, &message);
        let mut tail = [0u8; RANDOM_BYTES + MAC_BYTES];
        tail[..RANDOM_BYTES].copy_from_slice(random);
        tail[RANDOM_BYTES..].copy_from_slice(&mac[..MAC_BYTES]);
        format!("{sku_part}.{}", base64url(&tail))
    }
}

/// Unpadded base64url (RFC 4648 §5).
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// SHA-256 (FIPS 180-4).
pub fn sha256(message: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut padded = message.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&((message.len() as u64) * 8).to_be_bytes());
    for block in padded.chunks(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, value) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(value);
        }
    }
    let mut out = [0u8; 32];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(message);
    let mut outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_matches_the_published_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231_and_jsonwebtoken() {
        // RFC 4231 test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A key longer than a block (RFC 4231 test case 6).
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // The HS256 signature jsonwebtoken makes is base64url(HMAC-SHA256).
        let key = jsonwebtoken::EncodingKey::from_secret(b"bench-secret");
        let signature =
            jsonwebtoken::crypto::sign(b"a.b", &key, jsonwebtoken::Algorithm::HS256).unwrap();
        assert_eq!(signature, base64url(&hmac_sha256(b"bench-secret", b"a.b")));
    }

    #[test]
    fn base64url_is_unpadded() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn reservation_ids_have_the_gateways_shape() {
        let key = IdKey::derive("bench-jwt-secret-0123456789abcdef");
        let id = key.reservation_id("phone-x", &[7; RANDOM_BYTES]);
        let (sku_part, tail) = id.split_once('.').unwrap();
        assert_eq!(sku_part, "cGhvbmUteA"); // as in README's example
        assert_eq!(tail.len(), 27);
        // Deterministic for the same random part, different for another.
        assert_eq!(id, key.reservation_id("phone-x", &[7; RANDOM_BYTES]));
        assert_ne!(id, key.reservation_id("phone-x", &[8; RANDOM_BYTES]));
    }
}
