//! One stripe's way to and from its shards: zstd (when it pays), AES-256-GCM, then
//! Reed-Solomon into k data and m parity shards, each with a BLAKE3 checksum kept in the
//! (encrypted) metadata. Reading takes any k shards whose checksums hold.

use crate::keys::StorageKey;
use crate::Error;
use bytes::Bytes;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use ring::aead;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// k data shards and m parity shards: any k of the k + m read the stripe back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub k: u8,
    pub m: u8,
}

impl Layout {
    pub fn new(k: u8, m: u8) -> Result<Layout, Error> {
        if k == 0 || m == 0 {
            return Err(Error::Invalid(format!(
                "shards {k}+{m}: need at least one data and one parity shard"
            )));
        }
        if usize::from(k) + usize::from(m) > 64 {
            return Err(Error::Invalid(format!(
                "shards {k}+{m}: at most 64 shards in all"
            )));
        }
        Ok(Layout { k, m })
    }

    pub fn n(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }

    pub fn k(&self) -> usize {
        usize::from(self.k)
    }
}

impl std::str::FromStr for Layout {
    type Err = Error;
    /// `16+4`
    fn from_str(s: &str) -> Result<Layout, Error> {
        let bad = || Error::Invalid(format!("shards {s:?}: write data+parity, e.g. 16+4"));
        let (k, m) = s.split_once('+').ok_or_else(bad)?;
        Layout::new(
            k.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        )
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

pub type Sum = [u8; 16];

pub fn sum(shard: &[u8]) -> Sum {
    let mut s = [0; 16];
    s.copy_from_slice(&blake3::hash(shard).as_bytes()[..16]);
    s
}

/// What reading a stripe back needs besides its shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeMeta {
    /// Plain bytes.
    pub len: u32,
    /// Bytes sealed (compressed or not, with the tag); the shards hold them zero-padded.
    pub sealed: u32,
    pub zstd: bool,
    pub shard_len: u32,
    /// One per shard, data shards first.
    pub sums: Vec<Sum>,
}

pub struct Encoded {
    pub meta: StripeMeta,
    pub shards: Vec<Bytes>,
}

/// Shards read back: `bad` are those whose checksum failed (tampered or rotten).
pub struct Opened {
    pub plain: Vec<u8>,
    pub bad: Vec<usize>,
}

/// Zstd is tried on a sample first: already compressed data (most large objects) is then
/// sealed as it is, at the cost of one small trial.
const SAMPLE: usize = 64 << 10;
const ZSTD_LEVEL: i32 = 1;
/// Shards are a multiple of this: reed-solomon-simd needs an even length and is fastest on 64.
const SHARD_ALIGN: usize = 64;

thread_local! {
    static ENCODER: RefCell<Option<ReedSolomonEncoder>> = const { RefCell::new(None) };
    static DECODER: RefCell<Option<ReedSolomonDecoder>> = const { RefCell::new(None) };
}

fn nonce(idx: u32) -> aead::Nonce {
    let mut n = [0; 12];
    n[..4].copy_from_slice(&idx.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn aad(idx: u32, len: u32) -> [u8; 8] {
    let mut a = [0; 8];
    a[..4].copy_from_slice(&idx.to_le_bytes());
    a[4..].copy_from_slice(&len.to_le_bytes());
    a
}

fn compressible(plain: &[u8]) -> bool {
    let sample = &plain[..plain.len().min(SAMPLE)];
    match zstd::bulk::compress(sample, ZSTD_LEVEL) {
        Ok(c) => c.len() < sample.len() * 9 / 10,
        Err(_) => false,
    }
}

/// Room a stripe buffer needs beyond its bytes so [`seal_owned`] never reallocates it: the
/// tag and the padding of the last shard.
pub fn seal_room(layout: Layout) -> usize {
    16 + layout.k() * SHARD_ALIGN
}

/// Seals stripe `idx` of a segment (whose key is `key`) into `layout.n()` shards.
pub fn seal(
    key: &aead::LessSafeKey,
    idx: u32,
    plain: &[u8],
    layout: Layout,
) -> Result<Encoded, Error> {
    let mut buf = Vec::with_capacity(plain.len() + seal_room(layout));
    buf.extend_from_slice(plain);
    seal_owned(key, idx, buf, layout)
}

/// [`seal`] of a buffer it may encrypt in place (no copy of the stripe when it is not
/// compressed).
pub fn seal_owned(
    key: &aead::LessSafeKey,
    idx: u32,
    plain: Vec<u8>,
    layout: Layout,
) -> Result<Encoded, Error> {
    let len = u32::try_from(plain.len()).map_err(|_| Error::Invalid("stripe too large".into()))?;
    let k = layout.k();
    let (mut buf, zstd) = if !plain.is_empty() && compressible(&plain) {
        let c = zstd::bulk::compress(&plain, ZSTD_LEVEL)
            .map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
        if c.len() < plain.len() {
            (c, true)
        } else {
            (plain, false)
        }
    } else {
        (plain, false)
    };
    let tag = key
        .seal_in_place_separate_tag(nonce(idx), aead::Aad::from(aad(idx, len)), &mut buf)
        .map_err(|_| Error::Invalid("sealing failed".into()))?;
    buf.extend_from_slice(tag.as_ref());
    let sealed = buf.len();
    let shard_len = sealed.div_ceil(k).div_ceil(SHARD_ALIGN) * SHARD_ALIGN;
    buf.resize(shard_len * k, 0);
    let data = Bytes::from(buf);
    let mut shards: Vec<Bytes> = (0..k)
        .map(|i| data.slice(i * shard_len..(i + 1) * shard_len))
        .collect();
    ENCODER.with(|e| -> Result<(), Error> {
        let mut e = e.borrow_mut();
        let enc = match e.as_mut() {
            Some(enc) => {
                enc.reset(k, usize::from(layout.m), shard_len)
                    .map_err(rs_error)?;
                enc
            }
            None => e.insert(
                ReedSolomonEncoder::new(k, usize::from(layout.m), shard_len).map_err(rs_error)?,
            ),
        };
        for s in &shards {
            enc.add_original_shard(s).map_err(rs_error)?;
        }
        let out = enc.encode().map_err(rs_error)?;
        shards.extend(out.recovery_iter().map(Bytes::copy_from_slice));
        Ok(())
    })?;
    let sums = shards.iter().map(|s| sum(s)).collect();
    Ok(Encoded {
        meta: StripeMeta {
            len,
            sealed: sealed as u32,
            zstd,
            shard_len: shard_len as u32,
            sums,
        },
        shards,
    })
}

fn rs_error(e: reed_solomon_simd::Error) -> Error {
    Error::Invalid(format!("erasure coding: {e}"))
}

/// The stripe's data shards, whole: from those present if all are, else decoded from any k
/// good shards. Shards whose checksum fails are left out and named in the second value.
fn originals(
    meta: &StripeMeta,
    shards: &[Option<Bytes>],
    layout: Layout,
) -> Result<(Vec<u8>, Vec<usize>), Error> {
    let k = layout.k();
    let n = layout.n();
    let sl = meta.shard_len as usize;
    if shards.len() != n || meta.sums.len() != n {
        return Err(Error::Corrupt(format!(
            "a stripe has {} shards and {} checksums, {n} expected",
            shards.len(),
            meta.sums.len()
        )));
    }
    let mut bad = Vec::new();
    let good: Vec<Option<&Bytes>> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Some(s) if s.len() == sl && sum(s) == meta.sums[i] => Some(s),
            Some(_) => {
                bad.push(i);
                None
            }
            None => None,
        })
        .collect();
    let have = good.iter().filter(|s| s.is_some()).count();
    if have < k {
        return Err(Error::Unreadable {
            have,
            need: k,
            bad: bad.len(),
        });
    }
    let mut out = Vec::with_capacity(sl * k);
    if good[..k].iter().all(|s| s.is_some()) {
        for s in &good[..k] {
            out.extend_from_slice(s.unwrap());
        }
        return Ok((out, bad));
    }
    DECODER.with(|d| -> Result<(), Error> {
        let mut d = d.borrow_mut();
        let dec = match d.as_mut() {
            Some(dec) => {
                dec.reset(k, usize::from(layout.m), sl).map_err(rs_error)?;
                dec
            }
            None => {
                d.insert(ReedSolomonDecoder::new(k, usize::from(layout.m), sl).map_err(rs_error)?)
            }
        };
        let mut added = 0;
        for (i, s) in good.iter().enumerate() {
            let Some(s) = s else { continue };
            if added == k {
                break;
            }
            if i < k {
                dec.add_original_shard(i, s).map_err(rs_error)?;
            } else {
                dec.add_recovery_shard(i - k, s).map_err(rs_error)?;
            }
            added += 1;
        }
        let res = dec.decode().map_err(rs_error)?;
        for (i, s) in good[..k].iter().enumerate() {
            match s {
                Some(s) => out.extend_from_slice(s),
                None => out.extend_from_slice(
                    res.restored_original(i)
                        .ok_or_else(|| Error::Corrupt("erasure decoding lost a shard".into()))?,
                ),
            }
        }
        Ok(())
    })?;
    Ok((out, bad))
}

/// Reads stripe `idx` back from its shards (`None` where a shard could not be had).
pub fn open(
    key: &aead::LessSafeKey,
    idx: u32,
    meta: &StripeMeta,
    shards: &[Option<Bytes>],
    layout: Layout,
) -> Result<Opened, Error> {
    let (mut buf, bad) = originals(meta, shards, layout)?;
    buf.truncate(meta.sealed as usize);
    let plain = key
        .open_in_place(nonce(idx), aead::Aad::from(aad(idx, meta.len)), &mut buf)
        .map_err(|_| {
            Error::Corrupt(format!(
                "stripe {idx} fails authentication: its shards were altered"
            ))
        })?;
    let plain = if meta.zstd {
        zstd::bulk::decompress(plain, meta.len as usize)
            .map_err(|e| Error::Corrupt(format!("stripe {idx}: zstd: {e}")))?
    } else {
        let n = plain.len();
        buf.truncate(n);
        buf
    };
    if plain.len() != meta.len as usize {
        return Err(Error::Corrupt(format!(
            "stripe {idx} holds {} bytes, {} expected",
            plain.len(),
            meta.len
        )));
    }
    Ok(Opened { plain, bad })
}

/// Shards `want` of a stripe made again from any k good ones (for repair).
pub fn rebuild(
    meta: &StripeMeta,
    shards: &[Option<Bytes>],
    layout: Layout,
    want: &[usize],
) -> Result<Vec<Bytes>, Error> {
    let (data, _) = originals(meta, shards, layout)?;
    let k = layout.k();
    let sl = meta.shard_len as usize;
    let data = Bytes::from(data);
    let parity: Vec<Bytes> = if want.iter().any(|&w| w >= k) {
        let mut enc = ReedSolomonEncoder::new(k, usize::from(layout.m), sl).map_err(rs_error)?;
        for i in 0..k {
            enc.add_original_shard(&data[i * sl..(i + 1) * sl])
                .map_err(rs_error)?;
        }
        let out = enc.encode().map_err(rs_error)?;
        out.recovery_iter().map(Bytes::copy_from_slice).collect()
    } else {
        Vec::new()
    };
    want.iter()
        .map(|&w| {
            let s = if w < k {
                data.slice(w * sl..(w + 1) * sl)
            } else {
                parity
                    .get(w - k)
                    .cloned()
                    .ok_or_else(|| Error::Invalid(format!("no shard {w}")))?
            };
            if sum(&s) != meta.sums[w] {
                return Err(Error::Corrupt(format!(
                    "shard {w} rebuilt unlike its checksum"
                )));
            }
            Ok(s)
        })
        .collect()
}

/// The key a segment's stripes are sealed with.
pub fn segment_key(key: &StorageKey, uid: &[u8; 16]) -> aead::LessSafeKey {
    key.segment_key(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> aead::LessSafeKey {
        StorageKey::from_seed(&[7; 32]).segment_key(&[1; 16])
    }

    fn random(n: usize) -> Vec<u8> {
        use rand::RngCore;
        let mut v = vec![0; n];
        rand::thread_rng().fill_bytes(&mut v);
        v
    }

    #[test]
    fn any_k_shards_read_a_stripe_back() {
        let l = Layout::new(4, 2).unwrap();
        for plain in [
            random(1_000_003),
            vec![b'a'; 300_000],
            Vec::new(),
            random(1),
        ] {
            let e = seal(&key(), 3, &plain, l).unwrap();
            assert_eq!(e.shards.len(), 6);
            let all: Vec<Option<Bytes>> = e.shards.iter().cloned().map(Some).collect();
            assert_eq!(open(&key(), 3, &e.meta, &all, l).unwrap().plain, plain);
            // Every pair of lost shards.
            for a in 0..6 {
                for b in a + 1..6 {
                    let mut s = all.clone();
                    s[a] = None;
                    s[b] = None;
                    let o = open(&key(), 3, &e.meta, &s, l).unwrap();
                    assert_eq!(o.plain, plain);
                    assert!(o.bad.is_empty());
                }
            }
            // Three lost: unreadable, and said so.
            let mut s = all.clone();
            s[0] = None;
            s[2] = None;
            s[5] = None;
            match open(&key(), 3, &e.meta, &s, l) {
                Err(Error::Unreadable {
                    have: 3,
                    need: 4,
                    bad: 0,
                }) => {}
                _ => panic!("three of six shards read a 4+2 stripe"),
            }
        }
    }

    #[test]
    fn compressible_stripes_are_compressed_and_others_not() {
        let l = Layout::new(4, 2).unwrap();
        let e = seal(&key(), 0, &vec![b'x'; 1 << 20], l).unwrap();
        assert!(e.meta.zstd);
        assert!(e.meta.sealed < 10_000);
        let e = seal(&key(), 0, &random(1 << 20), l).unwrap();
        assert!(!e.meta.zstd);
        assert_eq!(e.meta.sealed, (1 << 20) + 16);
    }

    #[test]
    fn tampered_shards_are_left_out_and_named() {
        let l = Layout::new(4, 2).unwrap();
        let plain = random(100_000);
        let e = seal(&key(), 9, &plain, l).unwrap();
        let mut s: Vec<Option<Bytes>> = e.shards.iter().cloned().map(Some).collect();
        let mut t = s[1].as_ref().unwrap().to_vec();
        t[10] ^= 1;
        s[1] = Some(t.into());
        let o = open(&key(), 9, &e.meta, &s, l).unwrap();
        assert_eq!(o.plain, plain);
        assert_eq!(o.bad, vec![1]);
        // Three altered: refused, naming the altered ones.
        for i in [2, 4] {
            let mut t = s[i].as_ref().unwrap().to_vec();
            t[0] ^= 0xff;
            s[i] = Some(t.into());
        }
        match open(&key(), 9, &e.meta, &s, l) {
            Err(Error::Unreadable {
                have: 3,
                need: 4,
                bad: 3,
            }) => {}
            _ => panic!("a stripe with three altered shards was read"),
        }
    }

    #[test]
    fn a_stripe_opens_only_with_its_key_and_index() {
        let l = Layout::new(2, 1).unwrap();
        let plain = random(5000);
        let e = seal(&key(), 1, &plain, l).unwrap();
        let s: Vec<Option<Bytes>> = e.shards.iter().cloned().map(Some).collect();
        let other = StorageKey::from_seed(&[8; 32]).segment_key(&[1; 16]);
        assert!(matches!(
            open(&other, 1, &e.meta, &s, l),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            open(&key(), 2, &e.meta, &s, l),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn rebuilt_shards_equal_the_lost_ones() {
        let l = Layout::new(4, 2).unwrap();
        let e = seal(&key(), 0, &random(777_777), l).unwrap();
        for lost in [[0, 5], [3, 4], [1, 2]] {
            let mut s: Vec<Option<Bytes>> = e.shards.iter().cloned().map(Some).collect();
            for i in lost {
                s[i] = None;
            }
            let r = rebuild(&e.meta, &s, l, &lost).unwrap();
            assert_eq!(r[0], e.shards[lost[0]]);
            assert_eq!(r[1], e.shards[lost[1]]);
        }
    }

    #[test]
    fn layouts_parse_and_bad_ones_are_refused() {
        assert_eq!("16+4".parse::<Layout>().unwrap(), Layout { k: 16, m: 4 });
        assert_eq!(Layout::new(4, 2).unwrap().to_string(), "4+2");
        for bad in ["16", "0+4", "4+0", "a+b", "60+10"] {
            assert!(bad.parse::<Layout>().is_err(), "{bad}");
        }
    }
}
