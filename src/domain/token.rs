//! Bearer tokens: how they are made, and the one form in which they are stored or compared (a SHA-256 digest).
//! A token itself is shown once, to whoever asked for it, and never stored or logged.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new bearer token: 160 random bits, hex, with a prefix that says what it is (secret scanners match on it).
pub fn new_token() -> String {
    let bytes: [u8; 20] = rand::random();
    format!("g2w_{}", hex(&bytes))
}

/// What the store keeps of a token: its SHA-256, hex.
pub fn hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// The admin token's digest, held in memory to compare requests against.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `given` is the token whose digest is `expected`. Digests are compared, in constant time, so neither
/// the token's content nor its length leaks through timing.
pub fn matches(given: &str, expected: &[u8; 32]) -> bool {
    bool::from(digest(given).ct_eq(expected))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_new_each_time_and_stored_as_their_digest() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("g2w_") && a.len() == 4 + 40, "{a}");
        // SHA-256 of "abc", the FIPS 180-2 vector.
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(matches("abc", &digest("abc")));
        assert!(!matches("abd", &digest("abc")));
        assert!(!matches("", &digest("abc")));
    }
}
