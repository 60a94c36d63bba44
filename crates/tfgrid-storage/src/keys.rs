//! Keys of a user's store, all derived from one master key that is itself derived from the
//! user's twin key: a bot started afresh with the same key finds and reads everything again.

use ring::aead;

/// The store's master key. Never written anywhere: it is derived again at each start.
#[derive(Clone)]
pub struct StorageKey([u8; 32]);

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKey(..)")
    }
}

impl StorageKey {
    /// From the user's ed25519 secret seed. A separate context from every other use of the
    /// seed, so this key reveals nothing of the twin key.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        StorageKey(blake3::derive_key("tfgrid storage v1 master key", seed))
    }

    fn sub(&self, context: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&(context.len() as u32).to_le_bytes());
        h.update(context);
        for p in parts {
            // Length-prefixed, so no two lists of parts hash alike.
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// The AEAD key of one object segment (`uid` is random per segment, so each key seals one
    /// segment's stripes, and a stripe's index is a nonce that is never reused under it).
    pub(crate) fn segment_key(&self, uid: &[u8; 16]) -> aead::LessSafeKey {
        aead_key(&self.sub(b"segment", &[uid]))
    }

    /// The AEAD key of one metadata record (`salt` is random per record).
    pub(crate) fn record_key(&self, salt: &[u8; 16]) -> aead::LessSafeKey {
        aead_key(&self.sub(b"record", &[salt]))
    }

    /// Where a name's metadata lives in zdb: a keyed hash, so zdb sees no names.
    pub(crate) fn name_id(&self, name: &[u8]) -> [u8; 32] {
        self.sub(b"name", &[name])
    }

    /// The password of a pool's zdb namespaces (the same for each slot: a namespace moved by
    /// repair gets it again without anything to look up).
    pub fn zdb_password(&self, pool: &str) -> String {
        hex::encode(&self.sub(b"zdb password", &[pool.as_bytes()])[..16])
    }

    /// The S3 access key id and secret of this store.
    pub fn credentials(&self) -> (String, String) {
        let id = self.sub(b"s3 access key", &[]);
        let secret = self.sub(b"s3 secret key", &[]);
        (
            format!("TFG{}", hex::encode_upper(&id[..8])),
            hex::encode(&secret[..20]),
        )
    }
}

fn aead_key(k: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, k).expect("a 32-byte key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_seed_and_context() {
        let a = StorageKey::from_seed(&[1; 32]);
        let b = StorageKey::from_seed(&[2; 32]);
        assert_ne!(a.credentials(), b.credentials());
        assert_eq!(
            a.credentials(),
            StorageKey::from_seed(&[1; 32]).credentials()
        );
        assert_ne!(a.name_id(b"x"), a.name_id(b"y"));
        assert_ne!(a.zdb_password("p"), a.zdb_password("q"));
        // Parts are length-prefixed: ("ab","c") and ("a","bc") differ.
        assert_ne!(a.sub(b"t", &[b"ab", b"c"]), a.sub(b"t", &[b"a", b"bc"]));
        let (id, secret) = a.credentials();
        assert!(id.starts_with("TFG") && id.len() == 19);
        assert_eq!(secret.len(), 40);
    }
}
