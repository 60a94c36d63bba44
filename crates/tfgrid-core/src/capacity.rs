//! Capacity: what a node offers and what a contract reserves. All arithmetic is checked: a wrapped
//! subtraction is how search indexes end up advertising capacity that is not there.

use crate::error::CoreError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Capacity {
    /// Logical cores.
    pub cru: u64,
    /// Memory bytes.
    pub mru: u64,
    /// SSD bytes.
    pub sru: u64,
    /// HDD bytes.
    pub hru: u64,
    /// Whole GPUs.
    pub gpu: u32,
    /// Public IPv4 addresses (taken from the node's farm).
    pub ipv4: u32,
}

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

impl Capacity {
    pub fn checked_add(&self, o: &Capacity) -> Result<Capacity, CoreError> {
        let e = || CoreError::CapacityOverflow;
        Ok(Capacity {
            cru: self.cru.checked_add(o.cru).ok_or_else(e)?,
            mru: self.mru.checked_add(o.mru).ok_or_else(e)?,
            sru: self.sru.checked_add(o.sru).ok_or_else(e)?,
            hru: self.hru.checked_add(o.hru).ok_or_else(e)?,
            gpu: self.gpu.checked_add(o.gpu).ok_or_else(e)?,
            ipv4: self.ipv4.checked_add(o.ipv4).ok_or_else(e)?,
        })
    }

    /// `None` when any unit of `o` exceeds ours.
    pub fn checked_sub(&self, o: &Capacity) -> Option<Capacity> {
        Some(Capacity {
            cru: self.cru.checked_sub(o.cru)?,
            mru: self.mru.checked_sub(o.mru)?,
            sru: self.sru.checked_sub(o.sru)?,
            hru: self.hru.checked_sub(o.hru)?,
            gpu: self.gpu.checked_sub(o.gpu)?,
            ipv4: self.ipv4.checked_sub(o.ipv4)?,
        })
    }

    pub fn saturating_sub(&self, o: &Capacity) -> Capacity {
        Capacity {
            cru: self.cru.saturating_sub(o.cru),
            mru: self.mru.saturating_sub(o.mru),
            sru: self.sru.saturating_sub(o.sru),
            hru: self.hru.saturating_sub(o.hru),
            gpu: self.gpu.saturating_sub(o.gpu),
            ipv4: self.ipv4.saturating_sub(o.ipv4),
        }
    }

    /// True when every unit of `self` is at most the same unit of `avail`.
    pub fn fits_in(&self, avail: &Capacity) -> bool {
        avail.checked_sub(self).is_some()
    }

    /// The units of `self` that exceed `avail`, named, for error messages that say what is short.
    pub fn shortfall(&self, avail: &Capacity) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, want: u64, have: u64, bytes: bool| {
            if want > have {
                out.push(if bytes {
                    format!(
                        "{name}: want {}, free {}",
                        human_bytes(want),
                        human_bytes(have)
                    )
                } else {
                    format!("{name}: want {want}, free {have}")
                });
            }
        };
        check("cru", self.cru, avail.cru, false);
        check("mru", self.mru, avail.mru, true);
        check("sru", self.sru, avail.sru, true);
        check("hru", self.hru, avail.hru, true);
        check("gpu", self.gpu.into(), avail.gpu.into(), false);
        check("ipv4", self.ipv4.into(), avail.ipv4.into(), false);
        out
    }

    pub fn is_zero(&self) -> bool {
        *self == Capacity::default()
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Sizes as people write them: `512M`, `20G`, `1T` (powers of 1024) or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?} (e.g. 512M, 20G or bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked() {
        let a = Capacity {
            cru: 4,
            mru: 8 * GIB,
            sru: 100 * GIB,
            hru: 0,
            gpu: 1,
            ipv4: 2,
        };
        let b = Capacity {
            cru: 1,
            mru: GIB,
            sru: 10 * GIB,
            hru: 0,
            gpu: 1,
            ipv4: 0,
        };
        let free = a.checked_sub(&b).unwrap();
        assert_eq!(free.cru, 3);
        assert_eq!(free.gpu, 0);
        assert!(b.fits_in(&a));
        assert!(!a.fits_in(&b));
        assert_eq!(b.checked_sub(&a), None);
        assert_eq!(a.checked_add(&b).unwrap().cru, 5);
        let max = Capacity {
            cru: u64::MAX,
            ..Default::default()
        };
        assert!(max.checked_add(&a).is_err());
        let short = a.shortfall(&b);
        assert_eq!(short.len(), 4, "{short:?}");
        assert!(
            short[1].starts_with("mru: want 8.0 GiB, free 1.0 GiB"),
            "{short:?}"
        );
    }
}
