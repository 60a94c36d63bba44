//! End-to-end payload encryption.
//!
//! Where the x25519 key comes from: every twin derives it from its ed25519 seed (blake3 key
//! derivation, context below), so a twin's key file stays its only secret, and publishes the
//! public half as `enc_key` in its registry record. Two twins share
//! `blake3::derive_key(SHARED_CONTEXT, dh || lower public key || higher public key)`, the same from
//! both sides; payloads are sealed with XChaCha20-Poly1305 under it with a random 24-byte nonce,
//! so random nonces never collide in practice, and with the routing header as associated data, so
//! a relay cannot move a sealed payload into another envelope.

use crate::error::BusError;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use tfgrid_core::records::X25519Key;
use tfgrid_core::Identity;

const SECRET_CONTEXT: &str = "tfgrid 2026 bus x25519 secret from ed25519 seed";
const SHARED_CONTEXT: &str = "tfgrid 2026 bus shared key v1";

pub struct EncKeys {
    secret: x25519_dalek::StaticSecret,
    pub public: X25519Key,
}

impl EncKeys {
    pub fn derive(id: &Identity) -> Self {
        let secret =
            x25519_dalek::StaticSecret::from(blake3::derive_key(SECRET_CONTEXT, &id.seed()));
        let public = X25519Key(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Self { secret, public }
    }

    pub fn shared(&self, theirs: &X25519Key) -> SharedKey {
        let dh = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(theirs.0));
        let (lo, hi) = if self.public.0 <= theirs.0 {
            (self.public.0, theirs.0)
        } else {
            (theirs.0, self.public.0)
        };
        let mut input = Vec::with_capacity(96);
        input.extend_from_slice(dh.as_bytes());
        input.extend_from_slice(&lo);
        input.extend_from_slice(&hi);
        SharedKey(blake3::derive_key(SHARED_CONTEXT, &input))
    }
}

#[derive(Clone)]
pub struct SharedKey([u8; 32]);

pub fn seal(key: &SharedKey, aad: &[u8], plaintext: &[u8]) -> ([u8; 24], Vec<u8>) {
    let mut nonce = [0u8; 24];
    getrandom::getrandom(&mut nonce).expect("the OS random source");
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let ct = cipher
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("encryption of an in-memory buffer");
    (nonce, ct)
}

pub fn open(
    key: &SharedKey,
    aad: &[u8],
    nonce: &[u8; 24],
    ciphertext: &[u8],
) -> Result<Vec<u8>, BusError> {
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    cipher
        .decrypt(
            nonce.into(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| {
            BusError::Crypto("sealed payload does not open (wrong key or tampered)".into())
        })
}
