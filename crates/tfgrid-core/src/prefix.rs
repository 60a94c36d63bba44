//! IPv4 prefixes for grid-wide workload addressing: the registry hands each node one prefix of
//! the grid's workload range, so no two workloads anywhere share an address.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// `a.b.c.d/len` with the host bits zero. Serialized as that string (also in canonical
/// encoding, where it is a length-prefixed string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Prefix {
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, String> {
        if len > 32 {
            return Err(format!("{addr}/{len}: a prefix length is 0 to 32"));
        }
        let bits = u32::from(addr);
        if bits & !mask(len) != 0 {
            return Err(format!(
                "{addr}/{len}: host bits are set (the network is {}/{len})",
                Ipv4Addr::from(bits & mask(len))
            ));
        }
        Ok(Self { addr, len })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// How many prefixes of length `sub` this one holds (0 when `sub` is shorter).
    pub fn count(&self, sub: u8) -> u64 {
        if sub < self.len || sub > 32 {
            0
        } else {
            1u64 << (sub - self.len)
        }
    }

    /// The `i`th prefix of length `sub` inside this one.
    pub fn nth(&self, sub: u8, i: u64) -> Option<Ipv4Prefix> {
        if i >= self.count(sub) {
            return None;
        }
        let step = if sub == 0 { 0 } else { 1u64 << (32 - sub) };
        let a = u64::from(u32::from(self.addr)) + i * step;
        Some(Ipv4Prefix {
            addr: Ipv4Addr::from(a as u32),
            len: sub,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Ipv4Prefix) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len)
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected address/length"))?;
        let addr: Ipv4Addr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s:?}: length: {e}"))?;
        Ipv4Prefix::new(addr, len)
    }
}

impl Serialize for Ipv4Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carves_and_refuses() {
        let r: Ipv4Prefix = "10.64.0.0/10".parse().unwrap();
        assert_eq!(r.count(24), 16384);
        assert_eq!(r.nth(24, 0).unwrap().to_string(), "10.64.0.0/24");
        assert_eq!(r.nth(24, 257).unwrap().to_string(), "10.65.1.0/24");
        assert_eq!(r.nth(24, 16383).unwrap().to_string(), "10.127.255.0/24");
        assert!(r.nth(24, 16384).is_none());
        assert!(r.contains("10.100.3.4".parse().unwrap()));
        assert!(!r.contains("10.128.0.1".parse().unwrap()));
        assert!("10.64.0.1/10"
            .parse::<Ipv4Prefix>()
            .unwrap_err()
            .contains("host bits"));
        assert!("10.64.0.0/33".parse::<Ipv4Prefix>().is_err());
        assert!("10.64.0.0".parse::<Ipv4Prefix>().is_err());
        let back: Ipv4Prefix = postcard::from_bytes(&postcard::to_stdvec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"10.64.0.0/10\"");
    }
}
