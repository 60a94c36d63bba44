//! wg-quick configuration files: what `tfgrid net run` reads and `tfgrid network access` prints,
//! so a user's standard WireGuard tools read the same file.

use ipnet::IpNet;
use std::fmt::{self, Write};
use std::net::SocketAddr;

use crate::{Error, WgPublic, WgSecret};

#[derive(Debug, Clone)]
pub struct Config {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    pub private_key: WgSecret,
    pub addresses: Vec<IpNet>,
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: WgPublic,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    pub fn new(public_key: WgPublic) -> PeerConfig {
        PeerConfig {
            public_key,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        }
    }
}

/// Longest accepted file: a config is a few hundred bytes per peer.
const MAX_LEN: usize = 1 << 20;

impl Config {
    /// Parses a wg-quick file. Keys are case-insensitive, as in wg-quick; keys this overlay does
    /// not act on (DNS, PreUp, Table, ...) are refused rather than silently ignored.
    pub fn parse(text: &str) -> Result<Config, Error> {
        if text.len() > MAX_LEN {
            return Err(Error::Invalid(format!(
                "config: {} bytes, at most {MAX_LEN}",
                text.len()
            )));
        }
        enum Section {
            None,
            Interface,
            Peer,
        }
        let mut section = Section::None;
        let mut private_key = None;
        let mut addresses = Vec::new();
        let mut listen_port = None;
        let mut mtu = None;
        let mut peers: Vec<PeerConfig> = Vec::new();
        let mut peer: Option<(usize, Option<WgPublic>, PeerConfig)> = None;
        let finish_peer = |p: Option<(usize, Option<WgPublic>, PeerConfig)>,
                           peers: &mut Vec<PeerConfig>|
         -> Result<(), Error> {
            if let Some((line, key, mut cfg)) = p {
                let key = key.ok_or_else(|| {
                    Error::Invalid(format!("line {line}: [Peer] without a PublicKey"))
                })?;
                if peers.iter().any(|q| q.public_key == key) {
                    return Err(Error::Invalid(format!(
                        "line {line}: peer {key} appears twice"
                    )));
                }
                cfg.public_key = key;
                peers.push(cfg);
            }
            Ok(())
        };
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |m: String| Error::Invalid(format!("line {n}: {m}"));
            if line.starts_with('[') {
                match line.to_ascii_lowercase().as_str() {
                    "[interface]" => {
                        if private_key.is_some() || !matches!(section, Section::None) {
                            return Err(bad("[Interface] must come first, once".into()));
                        }
                        section = Section::Interface;
                    }
                    "[peer]" => {
                        finish_peer(peer.take(), &mut peers)?;
                        peer = Some((n, None, PeerConfig::new(WgPublic([0; 32]))));
                        section = Section::Peer;
                    }
                    _ => return Err(bad(format!("unknown section {line}"))),
                }
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("expected Key = Value, got {line:?}")))?;
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match section {
                Section::None => return Err(bad("a key before [Interface]".into())),
                Section::Interface => match k.as_str() {
                    "privatekey" => private_key = Some(v.parse().map_err(|e| bad(format!("{e}")))?),
                    "address" => addresses.extend(nets(v).map_err(bad)?),
                    "listenport" => {
                        listen_port = Some(v.parse().map_err(|e| bad(format!("ListenPort: {e}")))?)
                    }
                    "mtu" => {
                        let m: u16 = v.parse().map_err(|e| bad(format!("MTU: {e}")))?;
                        if !(576..=9000).contains(&m) {
                            return Err(bad(format!("MTU {m}: 576 to 9000")));
                        }
                        mtu = Some(m)
                    }
                    _ => return Err(bad(format!("[Interface] key {k:?} is not supported"))),
                },
                Section::Peer => {
                    let (_, key, cfg) = peer.as_mut().expect("in a [Peer] section");
                    match k.as_str() {
                        "publickey" => *key = Some(v.parse().map_err(|e| bad(format!("{e}")))?),
                        "endpoint" => {
                            cfg.endpoint = Some(v.parse().map_err(|e| {
                                bad(format!("Endpoint {v:?}: {e} (an IP address and port)"))
                            })?)
                        }
                        "allowedips" => cfg.allowed_ips.extend(nets(v).map_err(bad)?),
                        "persistentkeepalive" => {
                            cfg.persistent_keepalive = match v {
                                "off" => None,
                                _ => Some(
                                    v.parse()
                                        .map_err(|e| bad(format!("PersistentKeepalive: {e}")))?,
                                ),
                            }
                        }
                        _ => return Err(bad(format!("[Peer] key {k:?} is not supported"))),
                    }
                }
            }
        }
        finish_peer(peer.take(), &mut peers)?;
        let private_key =
            private_key.ok_or_else(|| Error::Invalid("[Interface] has no PrivateKey".into()))?;
        Ok(Config {
            interface: InterfaceConfig {
                private_key,
                addresses,
                listen_port,
                mtu,
            },
            peers,
        })
    }

    /// The file without the wg-quick-only keys (Address, MTU), which `wg setconf` refuses.
    pub fn to_setconf(&self) -> String {
        self.render(false)
    }

    fn render(&self, quick: bool) -> String {
        let mut s = String::from("[Interface]\n");
        let i = &self.interface;
        let _ = writeln!(s, "PrivateKey = {}", i.private_key.to_base64());
        if quick && !i.addresses.is_empty() {
            let _ = writeln!(s, "Address = {}", join(&i.addresses));
        }
        if let Some(p) = i.listen_port {
            let _ = writeln!(s, "ListenPort = {p}");
        }
        if let (true, Some(m)) = (quick, i.mtu) {
            let _ = writeln!(s, "MTU = {m}");
        }
        for p in &self.peers {
            let _ = writeln!(s, "\n[Peer]\nPublicKey = {}", p.public_key);
            if let Some(e) = p.endpoint {
                let _ = writeln!(s, "Endpoint = {e}");
            }
            if !p.allowed_ips.is_empty() {
                let _ = writeln!(s, "AllowedIPs = {}", join(&p.allowed_ips));
            }
            if let Some(k) = p.persistent_keepalive {
                let _ = writeln!(s, "PersistentKeepalive = {k}");
            }
        }
        s
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(true))
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn nets(v: &str) -> Result<Vec<IpNet>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is not an address or CIDR range"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints() {
        let k = WgSecret::generate();
        let p = WgSecret::generate().public();
        let text = format!(
            "# a comment\n[Interface]\nPrivateKey = {}\nAddress = 10.1.0.1/24, fd00::1/64\n\
             ListenPort = 51820\nMTU = 1420\n\n[Peer]\npublickey={p}\nEndpoint = 192.0.2.1:51820\n\
             AllowedIPs = 10.1.0.0/24,10.2.0.7\nPersistentKeepalive = 25 # seconds\n",
            k.to_base64()
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips[1].to_string(), "10.2.0.7/32");
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        let again = Config::parse(&c.to_string()).unwrap();
        assert_eq!(again.peers, c.peers);
        assert_eq!(again.interface.addresses, c.interface.addresses);
        assert!(!c.to_setconf().contains("Address"));
        assert!(!c.to_setconf().contains("MTU"));
    }

    #[test]
    fn bad_files_name_the_line() {
        let k = WgSecret::generate().to_base64();
        let cases = [
            ("PrivateKey = x".to_string(), "before [Interface]"),
            (
                format!("[Interface]\nPrivateKey = {k}\nDNS = 1.1.1.1"),
                "line 3",
            ),
            (
                format!("[Interface]\nPrivateKey = {k}\n[Peer]\nEndpoint = 1.2.3.4:5"),
                "without a PublicKey",
            ),
            (
                format!(
                    "[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {}\nEndpoint = host:5",
                    WgSecret::generate().public()
                ),
                "line 5: Endpoint",
            ),
            (format!("[Interface]\nPrivateKey = {k}\nMTU = 70000"), "MTU"),
            (
                format!("[Interface]\nPrivateKey = {k}\nAddress = 10.0.0.300/24"),
                "not an address",
            ),
            ("[Interface]\nListenPort = 1".to_string(), "no PrivateKey"),
            (
                format!("[Interface]\nPrivateKey = {k}\n[Wat]"),
                "unknown section",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let p = WgSecret::generate().public();
        let twice = format!(
            "[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\n[Peer]\nPublicKey = {p}\n"
        );
        assert!(Config::parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
