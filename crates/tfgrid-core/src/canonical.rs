//! The one byte encoding of everything that is signed or hashed.
//!
//! Choice: postcard (a stable, documented serde wire format, frozen at 1.0) over the Rust types,
//! prefixed by a domain tag. It is deterministic because the types carry no maps with unspecified
//! order (only `BTreeMap`), no floats that may be NaN (validated where floats appear), and serde
//! visits struct fields in declaration order (JSON carries floats exactly: serde_json is built
//! with `float_roundtrip`, without which a latitude comes back one ulp off and its signature fails); integers are LEB128 varints, strings and sequences are
//! length-prefixed, enums are a varint variant index. The domain tag ("tfgrid/tx/v1", ...) keeps a
//! signature made for one purpose from being valid for another. Changing a signed type's fields
//! or their order is a wire-format change and needs a new domain version.

use crate::error::CoreError;
use crate::keys::hex_bytes;
use serde::{de::DeserializeOwned, Serialize};

hex_bytes!(Hash, 32, "hash");

pub fn encode<T: Serialize + ?Sized>(domain: &str, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(domain.len() as u8);
    out.extend_from_slice(domain.as_bytes());
    // postcard only fails on types it cannot represent (none of ours) or on writer errors (a Vec
    // has none), so a failure here is a programming error.
    postcard::to_extend(value, out).expect("canonical encoding of an in-memory value")
}

pub fn decode<T: DeserializeOwned>(domain: &str, bytes: &[u8]) -> Result<T, CoreError> {
    let tag_len = *bytes
        .first()
        .ok_or_else(|| CoreError::Decode("empty input".into()))? as usize;
    let tag = bytes
        .get(1..1 + tag_len)
        .ok_or_else(|| CoreError::Decode("truncated domain tag".into()))?;
    if tag != domain.as_bytes() {
        return Err(CoreError::Decode(format!(
            "domain tag {:?}, expected {domain:?}",
            String::from_utf8_lossy(tag)
        )));
    }
    let (value, rest) = postcard::take_from_bytes(&bytes[1 + tag_len..])
        .map_err(|e| CoreError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CoreError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

pub fn hash<T: Serialize + ?Sized>(domain: &str, value: &T) -> Hash {
    Hash(*blake3::hash(&encode(domain, value)).as_bytes())
}
