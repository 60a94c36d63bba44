//! Envelopes: what travels on the bus. The header is routing data a relay may read; the body is
//! plain, sealed (end-to-end encrypted) or an error. The source twin signs header and body.

use crate::crypto::{self, SharedKey};
use crate::error::BusError;
use serde::{Deserialize, Serialize};
use tfgrid_core::{canonical, Identity, Millis, PublicKey, Signature, TwinId};

pub const ENVELOPE_DOMAIN: &str = "tfgrid/bus/envelope/v1";
const AAD_DOMAIN: &str = "tfgrid/bus/aad/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Random per message; a response carries the request's id in `reply_to`.
    pub id: u64,
    pub src: TwinId,
    pub dst: TwinId,
    pub cmd: String,
    /// Wall-clock milliseconds after which nobody may deliver or act on it.
    pub expiry: Millis,
    pub reply_to: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    // serde_bytes: one length-prefixed copy instead of a sequence of single bytes.
    Plain(#[serde(with = "serde_bytes")] Vec<u8>),
    /// XChaCha20-Poly1305 under the src/dst shared key, the header as associated data.
    Sealed {
        nonce: [u8; 24],
        #[serde(with = "serde_bytes")]
        ciphertext: Vec<u8>,
    },
    /// A failure answer: from the callee (its handler failed) or from a relay (undeliverable).
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub header: Header,
    pub body: Body,
    pub signature: Signature,
}

impl Envelope {
    fn signing_bytes(header: &Header, body: &Body) -> Vec<u8> {
        canonical::encode(ENVELOPE_DOMAIN, &(header, body))
    }

    /// Signs `header` and `body` as `id` (which must be the key of `header.src`).
    pub fn new(id: &Identity, header: Header, body: Body) -> Self {
        let signature = id.sign(&Self::signing_bytes(&header, &body));
        Self {
            header,
            body,
            signature,
        }
    }

    /// Seals `plaintext` for `header.dst` under `key`, then signs.
    pub fn sealed(id: &Identity, header: Header, key: &SharedKey, plaintext: &[u8]) -> Self {
        let aad = canonical::encode(AAD_DOMAIN, &header);
        let (nonce, ciphertext) = crypto::seal(key, &aad, plaintext);
        Self::new(id, header, Body::Sealed { nonce, ciphertext })
    }

    pub fn verify(&self, src_key: &PublicKey) -> Result<(), BusError> {
        src_key
            .verify(
                &Self::signing_bytes(&self.header, &self.body),
                &self.signature,
            )
            .map_err(|_| BusError::BadSignature {
                src: self.header.src,
            })
    }

    /// The payload: plain bytes as they are, sealed bytes opened with `key` (required then).
    pub fn open(&self, key: Option<&SharedKey>) -> Result<Vec<u8>, BusError> {
        match &self.body {
            Body::Plain(p) => Ok(p.clone()),
            Body::Sealed { nonce, ciphertext } => {
                let key =
                    key.ok_or_else(|| BusError::Crypto("sealed payload but no shared key".into()))?;
                let aad = canonical::encode(AAD_DOMAIN, &self.header);
                crypto::open(key, &aad, nonce, ciphertext)
            }
            Body::Error(e) => Err(BusError::Remote(e.clone())),
        }
    }

    pub fn is_expired(&self, now: Millis) -> bool {
        now > self.header.expiry
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("an envelope always encodes")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, BusError> {
        postcard::from_bytes(b).map_err(|e| BusError::Malformed(e.to_string()))
    }
}

pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("the OS random source");
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::EncKeys;

    fn header() -> Header {
        Header {
            id: 7,
            src: 1,
            dst: 2,
            cmd: "deployment.get".into(),
            expiry: now_millis_plus(),
            reply_to: None,
        }
    }

    fn now_millis_plus() -> Millis {
        tfgrid_core::now_millis() + 60_000
    }

    #[test]
    fn sealed_roundtrip_and_tampering() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (ka, kb) = (EncKeys::derive(&a), EncKeys::derive(&b));
        let shared_ab = ka.shared(&kb.public);
        let shared_ba = kb.shared(&ka.public);
        let env = Envelope::sealed(&a, header(), &shared_ab, b"the payload");
        env.verify(&a.public_key()).unwrap();
        let wire = Envelope::from_bytes(&env.to_bytes()).unwrap();
        assert_eq!(
            wire.open(Some(&shared_ba)).unwrap(),
            b"the payload",
            "both sides derive the same key"
        );

        // A third party's key does not open it.
        let eve = EncKeys::derive(&Identity::generate());
        assert!(env.open(Some(&eve.shared(&ka.public))).is_err());
        // A flipped ciphertext bit: the signature and the AEAD both catch it.
        let mut t = env.clone();
        if let Body::Sealed { ciphertext, .. } = &mut t.body {
            ciphertext[0] ^= 1;
        }
        assert!(t.verify(&a.public_key()).is_err());
        assert!(t.open(Some(&shared_ba)).is_err());
        // The sealed body moved under another header (a relay re-routing it): the AAD catches it
        // even if someone re-signs.
        let mut h = header();
        h.cmd = "deployment.delete".into();
        let moved = Envelope::new(&a, h, env.body.clone());
        assert!(moved.open(Some(&shared_ba)).is_err());
        // Not the signer's key.
        assert!(env.verify(&b.public_key()).is_err());
    }

    #[test]
    fn plain_and_error_bodies() {
        let a = Identity::generate();
        let env = Envelope::new(&a, header(), Body::Plain(b"x".to_vec()));
        assert_eq!(env.open(None).unwrap(), b"x");
        let err = Envelope::new(&a, header(), Body::Error("boom".into()));
        assert_eq!(err.open(None), Err(BusError::Remote("boom".into())));
        let sealed = Envelope::sealed(
            &a,
            header(),
            &EncKeys::derive(&a).shared(&EncKeys::derive(&a).public),
            b"y",
        );
        assert!(sealed.open(None).is_err(), "a sealed body needs a key");
        assert!(Envelope::from_bytes(&[1, 2, 3]).is_err());
    }
}
