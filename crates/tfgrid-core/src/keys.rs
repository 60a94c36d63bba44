//! ed25519 identities. A twin *is* its key pair: the public key is how the registry recognises the
//! signer of a transaction, and the numeric twin id is assigned when the key registers.

use crate::error::CoreError;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use std::fmt;
use std::path::Path;

/// Fixed-size byte strings that travel as lowercase hex in JSON (readable, copy-pasteable) and as
/// raw bytes in the canonical encoding (compact, one representation only).
macro_rules! hex_bytes {
    ($name:ident, $len:expr, $what:expr) => {
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            pub fn from_hex(s: &str) -> Result<Self, crate::error::CoreError> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(s.trim(), &mut out).map_err(|e| {
                    crate::error::CoreError::Hex(format!(
                        "{}: expected {} hex digits: {e}",
                        $what,
                        $len * 2
                    ))
                })?;
                Ok(Self(out))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::error::CoreError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::from_hex(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    serde::Serialize::serialize(&crate::keys::ByteArray(self.0), s)
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    Self::from_hex(&s).map_err(serde::de::Error::custom)
                } else {
                    let b = <crate::keys::ByteArray<$len>>::deserialize(d)?;
                    Ok(Self(b.0))
                }
            }
        }
    };
}
pub(crate) use hex_bytes;

/// A `[u8; N]` encoded as a fixed-length tuple (no length prefix) in binary formats; serde's
/// own array impls stop at 32 elements, signatures are 64.
pub(crate) struct ByteArray<const N: usize>(pub [u8; N]);

impl<const N: usize> serde::Serialize for ByteArray<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(N)?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de, const N: usize> serde::Deserialize<'de> for ByteArray<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<'de, const N: usize> serde::de::Visitor<'de> for V<N> {
            type Value = ByteArray<N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{N} bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; N];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = a
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(ByteArray(out))
            }
        }
        d.deserialize_tuple(N, V::<N>)
    }
}

hex_bytes!(PublicKey, 32, "public key");
hex_bytes!(Signature, 64, "signature");

impl PublicKey {
    /// Verifies with `verify_strict`, which rejects the malleable and small-order encodings that
    /// plain ed25519 verification accepts: a signature is valid in exactly one form.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> Result<(), CoreError> {
        let vk = VerifyingKey::from_bytes(&self.0)
            .map_err(|e| CoreError::BadPublicKey(e.to_string()))?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        vk.verify_strict(msg, &sig)
            .map_err(|_| CoreError::BadSignature)
    }
}

/// A key pair held by its owner. The secret never leaves the process except into the owner's
/// key file.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public_key())
    }
}

impl Identity {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).expect("the OS random source is unavailable");
        Self::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The secret seed, for deriving other keys of this twin (the bus's x25519 key). Never
    /// send it anywhere.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature(self.key.sign(msg).to_bytes())
    }

    /// Writes the 32-byte seed as hex, created with mode 0600 so no other user can read it even
    /// for an instant. Refuses to overwrite an existing key: losing a key loses the twin.
    pub fn save(&self, path: &Path) -> Result<(), CoreError> {
        use std::io::Write;
        let err = |reason: String| CoreError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err("already exists; refusing to overwrite a key".into())
            } else {
                err(e.to_string())
            }
        })?;
        writeln!(f, "{}", hex::encode(self.key.to_bytes())).map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))
    }

    /// Loads a key file written by [`Identity::save`]. A file readable by group or others is
    /// refused, as ssh does, because the key is the twin.
    pub fn load(path: &Path) -> Result<Self, CoreError> {
        let err = |reason: String| CoreError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "permissions {mode:04o} are too open; run `chmod 600 {}`",
                    path.display()
                )));
            }
        }
        let _ = meta;
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed)
            .map_err(|_| err("not a tfgrid key file (expected 64 hex digits)".into()))?;
        Ok(Self::from_seed(seed))
    }

    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), CoreError> {
        if path.exists() {
            Ok((Self::load(path)?, false))
        } else {
            let id = Self::generate();
            id.save(path)?;
            Ok((id, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let id = Identity::generate();
        let sig = id.sign(b"hello");
        id.public_key().verify(b"hello", &sig).unwrap();
        assert!(id.public_key().verify(b"hellO", &sig).is_err());
        let other = Identity::generate();
        assert!(other.public_key().verify(b"hello", &sig).is_err());
        let mut bad = sig;
        bad.0[3] ^= 1;
        assert!(id.public_key().verify(b"hello", &bad).is_err());
    }

    #[test]
    fn key_file_roundtrip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        let id = Identity::generate();
        id.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(Identity::load(&path).unwrap().public_key(), id.public_key());
        let again = Identity::generate().save(&path).unwrap_err();
        assert!(
            again.to_string().contains("refusing to overwrite"),
            "{again}"
        );
        assert_eq!(Identity::load(&path).unwrap().public_key(), id.public_key());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = Identity::load(&path).unwrap_err().to_string();
            assert!(e.contains("too open"), "{e}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(&path, "not a key\n").unwrap();
        let e = Identity::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a tfgrid key file"), "{e}");
    }

    #[test]
    fn hex_serde_forms() {
        let pk = Identity::from_seed([7; 32]).public_key();
        let json = serde_json::to_string(&pk).unwrap();
        assert_eq!(json, format!("\"{}\"", pk.to_hex()));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), pk);
        let bin = postcard::to_stdvec(&pk).unwrap();
        assert_eq!(bin.as_slice(), &pk.0[..], "raw bytes, no length prefix");
        assert!(serde_json::from_str::<PublicKey>("\"abcd\"").is_err());
        let sig = Signature([9; 64]);
        let bin = postcard::to_stdvec(&sig).unwrap();
        assert_eq!(bin.len(), 64);
        assert_eq!(postcard::from_bytes::<Signature>(&bin).unwrap(), sig);
    }
}
