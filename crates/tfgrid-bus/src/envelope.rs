//! Envelopes: what travels on the bus. The header is routing data a relay may read; the body is
//! plain, sealed (end-to-end encrypted) or an error.
//!
//! Authenticity: plain and error envelopes carry the source twin's ed25519 signature over header
//! and body. Sealed envelopes are authenticated by their AEAD instead: the key is the static
//! x25519 agreement between source and destination (each published in the registry), and the
//! header is the associated data, so only the source (or the destination itself) can produce one
//! that opens, for exactly that header. That costs about 1 µs where an ed25519 sign and verify
//! cost 150 µs on the 2-core machine the benchmarks run on, and it is what lets the bus carry
//! thousands of round trips per second. A relay cannot check a sealed envelope; its destination does.

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
    /// Present on plain and error envelopes; sealed ones are authenticated by their AEAD.
    pub signature: Option<Signature>,
}

impl Envelope {
    fn signing_bytes(header: &Header, body: &Body) -> Vec<u8> {
        canonical::encode(ENVELOPE_DOMAIN, &(header, body))
    }

    /// Signs `header` and `body` as `id` (which must be the key of `header.src`).
    pub fn new(id: &Identity, header: Header, body: Body) -> Self {
        let signature = Some(id.sign(&Self::signing_bytes(&header, &body)));
        Self {
            header,
            body,
            signature,
        }
    }

    /// Seals `plaintext` for `header.dst` under the key `header.src` shares with it.
    pub fn sealed(header: Header, key: &SharedKey, plaintext: &[u8]) -> Self {
        let aad = canonical::encode(AAD_DOMAIN, &header);
        let (nonce, ciphertext) = crypto::seal(key, &aad, plaintext);
        Self {
            header,
            body: Body::Sealed { nonce, ciphertext },
            signature: None,
        }
    }

    /// Checks the ed25519 signature. An unsigned envelope passes only if sealed, and then
    /// [`open`](Self::open) is what authenticates it: callers must open it before trusting it.
    pub fn verify(&self, src_key: &PublicKey) -> Result<(), BusError> {
        match (&self.signature, &self.body) {
            (Some(sig), _) => src_key
                .verify(&Self::signing_bytes(&self.header, &self.body), sig)
                .map_err(|_| BusError::BadSignature {
                    src: self.header.src,
                }),
            (None, Body::Sealed { .. }) => Ok(()),
            (None, _) => Err(BusError::BadSignature {
                src: self.header.src,
            }),
        }
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
        let env = Envelope::sealed(header(), &shared_ab, b"the payload");
        assert_eq!(env.signature, None);
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
        // A flipped ciphertext bit does not open.
        let mut t = env.clone();
        if let Body::Sealed { ciphertext, .. } = &mut t.body {
            ciphertext[0] ^= 1;
        }
        assert!(t.open(Some(&shared_ba)).is_err());
        // The sealed body under another header (a relay re-routing it, or claiming another
        // source or command) does not open: the header is the AEAD's associated data.
        for change in [
            |h: &mut Header| h.cmd = "deployment.delete".into(),
            |h: &mut Header| h.src = 9,
            |h: &mut Header| h.expiry += 1,
        ] {
            let mut moved = env.clone();
            change(&mut moved.header);
            assert!(moved.open(Some(&shared_ba)).is_err());
        }
        // Sealed by someone else (eve) in a's name: b opens with the key it shares with a: fails.
        let forged = Envelope::sealed(header(), &eve.shared(&kb.public), b"in a's name");
        assert!(forged.open(Some(&shared_ba)).is_err());
        // Signed envelopes: the signer's key only, and unsigned plain ones never.
        let signed = Envelope::new(&a, header(), Body::Plain(b"p".to_vec()));
        signed.verify(&a.public_key()).unwrap();
        assert!(signed.verify(&b.public_key()).is_err());
        let unsigned = Envelope {
            signature: None,
            ..signed
        };
        assert!(unsigned.verify(&a.public_key()).is_err());
    }

    #[test]
    fn plain_and_error_bodies() {
        let a = Identity::generate();
        let env = Envelope::new(&a, header(), Body::Plain(b"x".to_vec()));
        assert_eq!(env.open(None).unwrap(), b"x");
        let err = Envelope::new(&a, header(), Body::Error("boom".into()));
        assert_eq!(err.open(None), Err(BusError::Remote("boom".into())));
        let sealed = Envelope::sealed(
            header(),
            &EncKeys::derive(&a).shared(&EncKeys::derive(&a).public),
            b"y",
        );
        assert!(sealed.open(None).is_err(), "a sealed body needs a key");
        assert!(Envelope::from_bytes(&[1, 2, 3]).is_err());
    }
}
