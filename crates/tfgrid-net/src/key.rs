//! WireGuard keys: x25519, written as base64 the way `wg` writes them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519;
use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A WireGuard private key.
#[derive(Clone)]
pub struct WgSecret([u8; 32]);

/// A WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPublic(pub [u8; 32]);

fn decode(what: &str, s: &str) -> Result<[u8; 32], Error> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|e| Error::Invalid(format!("{what}: not base64: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| Error::Invalid(format!("{what}: {} bytes, expected 32", b.len())))
}

impl WgSecret {
    pub fn generate() -> WgSecret {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).expect("the OS random source");
        WgSecret(b)
    }

    /// The overlay key of a twin, derived from its ed25519 seed so the key file stays its only
    /// secret (the bus derives its x25519 key the same way, under another context).
    pub fn derive(seed: &[u8; 32]) -> WgSecret {
        WgSecret(blake3::derive_key(
            "tfgrid 2026 overlay wireguard key from ed25519 seed",
            seed,
        ))
    }

    pub fn public(&self) -> WgPublic {
        WgPublic(x25519::PublicKey::from(&self.x25519()).to_bytes())
    }

    pub(crate) fn x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for WgSecret {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        decode("private key", s).map(WgSecret)
    }
}

impl fmt::Debug for WgSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgSecret({})", self.public())
    }
}

impl FromStr for WgPublic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        decode("public key", s).map(WgPublic)
    }
}

impl fmt::Display for WgPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublic({self})")
    }
}

impl serde::Serialize for WgPublic {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for WgPublic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_bad_keys_are_named() {
        let k = WgSecret::generate();
        let back: WgSecret = k.to_base64().parse().unwrap();
        assert_eq!(back.public(), k.public());
        let p: WgPublic = k.public().to_string().parse().unwrap();
        assert_eq!(p, k.public());
        let e = "AAAA".parse::<WgPublic>().unwrap_err().to_string();
        assert!(e.contains("3 bytes, expected 32"), "{e}");
        let e = "not base64!".parse::<WgSecret>().unwrap_err().to_string();
        assert!(e.contains("private key: not base64"), "{e}");
    }

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let a = WgSecret::derive(&[1; 32]);
        assert_eq!(a.public(), WgSecret::derive(&[1; 32]).public());
        assert_ne!(a.public(), WgSecret::derive(&[2; 32]).public());
    }
}
