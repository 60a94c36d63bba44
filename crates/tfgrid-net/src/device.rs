//! The data path: packets the kernel routes into the TUN device are encrypted for the peer whose
//! allowed IPs hold their destination and sent to it; datagrams from peers are decrypted and
//! written to the TUN device only when their inner source is one of that peer's allowed IPs
//! (WireGuard's cryptokey routing, which is what keeps one peer from speaking for another).
//!
//! boringtun's own `device` module would do this, but it owns its TUN and UDP sockets and has no
//! way to send a peer's datagrams anywhere else; the relayed path needs exactly that, so this module
//! drives `boringtun::noise::Tunn` itself. Two blocking threads carry the packets (TUN to UDP and
//! UDP to TUN: on two cores, threads in blocking reads beat an async runtime's wake-ups per
//! packet), and a third runs the protocol timers.
//!
//! Per-packet system calls are what cost most, so both directions work in batches: the TUN device
//! runs with offloads (tun-rs: the kernel hands over up to 64 KiB of a TCP stream at once, which
//! is cut into MTU-sized packets here, and packets written back are coalesced the same way), and
//! the UDP socket sends a run of equal-sized datagrams to one peer in one call (UDP GSO) and
//! receives many per call (recvmmsg, UDP GRO), both through quinn-udp.

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, PeerConfig, WgPublic, WgSecret};

/// Where a peer's datagrams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Nothing has come from the peer yet (or not for a while).
    None,
    /// Straight over UDP: the peer's datagrams arrive over UDP.
    Direct,
    /// Through the relay: only relayed datagrams arrive from the peer.
    Relay,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::None => "none",
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }
}

/// Carries a datagram to a peer by some other way than UDP (the bus relay). Called on the data
/// path: it must not block (queue and return).
pub type RelaySink = Arc<dyn Fn(WgPublic, &[u8]) + Send + Sync>;

/// Told of a packet whose destination no peer's allowed IPs hold (the packet is dropped), so the
/// caller can look up who has that address and add the peer. Called on the data path: it must
/// not block, and is called for every such packet (the caller rate-limits its look-ups).
pub type MissHook = Arc<dyn Fn(IpAddr) + Send + Sync>;

/// Told of an authentic packet from a peer whose inner source is not one of its allowed IPs (the
/// packet is held for a few seconds), so the caller can learn whether the peer has gained that
/// address and widen its allowed IPs, which delivers what was held. On the data path: it must
/// not block, and is called for every such packet.
pub type RejectHook = Arc<dyn Fn(WgPublic, IpAddr) + Send + Sync>;

pub struct DeviceOptions {
    /// TUN interface name (at most 15 bytes).
    pub name: String,
    pub secret: WgSecret,
    /// UDP address to listen on; port 0 picks one.
    pub listen: SocketAddr,
    /// Addresses of the interface: at most one IPv4, any number of IPv6.
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    /// Add a route through the interface for each peer's allowed IPs (as wg-quick does).
    pub routes: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub public_key: WgPublic,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub path: Path,
    /// Seconds since the last completed handshake.
    pub last_handshake_s: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A datagram not received for this long means the path it came by is no longer known to work.
const PATH_FRESH: Duration = Duration::from_secs(20);
/// Socket buffers: at 1 Gbit/s a 64 KiB default holds half a millisecond, and a datagram that
/// finds it full is lost (wireguard-go's losses here were exactly that).
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Largest datagram read: boringtun needs room for the packet plus 32 bytes, and 148 at least.
const BUF: usize = 65536;
/// Largest payload of one GSO send (a UDP datagram's 65,507 bytes, rounded down).
const GSO_MAX_BYTES: usize = 65000;
/// Digests of relayed datagrams kept per peer (see `Peer::relayed`).
const RELAYED_KEPT: usize = 256;
/// Packets held for a peer being looked up: how many and for how long.
const PENDING_MAX: usize = 64;
const PENDING_FOR: Duration = Duration::from_secs(3);
/// Packets per batch in each direction.
const BATCH: usize = 64;
const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;

struct Peer {
    public: WgPublic,
    tunn: Mutex<Tunn>,
    endpoint: Mutex<Option<SocketAddr>>,
    /// Changed in place when a peer gains addresses, so its session goes on.
    allowed: RwLock<Vec<IpNet>>,
    /// Device-clock milliseconds (+1, so 0 is never) of the last authentic datagram by each path.
    udp_rx: AtomicU64,
    relay_rx: AtomicU64,
    /// Digests of the last datagrams that came by the relay. While the direct path is not yet
    /// known to work, a peer sends each datagram both ways, and the relay's copy often wins:
    /// the UDP copy is then refused as a replay and, without this, would never show that UDP
    /// works. A UDP datagram identical to one the relay brought is the peer's own (only it can
    /// make one that authenticates), so it shows the direct path, and where the peer is.
    relayed: Mutex<std::collections::VecDeque<[u8; 16]>>,
}

#[derive(Default)]
struct Table {
    by_key: HashMap<WgPublic, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Allowed IPs, most specific first. A node has peers for the hosts it shares a network or a
    /// gateway route with (tens, not thousands), so a scan beats a trie's pointer chasing.
    routes: Vec<(IpNet, Arc<Peer>)>,
}

struct Inner {
    name: String,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    tun: tun_rs::SyncDevice,
    udp: UdpSocket,
    udp_state: quinn_udp::UdpSocketState,
    mtu: usize,
    table: RwLock<Table>,
    limiter: RateLimiter,
    relay: RwLock<Option<RelaySink>>,
    miss: RwLock<Option<MissHook>>,
    reject: RwLock<Option<RejectHook>>,
    /// Decrypted packets from a peer's address it was not known to hold yet: taken if the peer
    /// is widened within `PENDING_FOR`.
    rejected: Mutex<std::collections::VecDeque<(Instant, WgPublic, Vec<u8>)>>,
    /// Packets that found no peer, kept briefly: a peer made for them (the miss hook's look-up)
    /// takes them, so a connection's first packet is not lost to the look-up.
    pending: Mutex<std::collections::VecDeque<(Instant, Vec<u8>)>>,
    next_index: AtomicU32,
    start: Instant,
    stop: AtomicBool,
    routes: bool,
    own_nets: Vec<IpNet>,
}

/// A running WireGuard interface. Dropping it stops its threads and removes the interface.
pub struct Device {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

enum Source {
    Udp(SocketAddr),
    Relay(WgPublic),
}

impl Device {
    pub fn start(opts: DeviceOptions) -> Result<Device, Error> {
        if opts.name.is_empty() || opts.name.len() > 15 {
            return Err(Error::Invalid(format!(
                "interface name {:?}: 1 to 15 bytes",
                opts.name
            )));
        }
        let mut b = tun_rs::DeviceBuilder::new()
            .name(&opts.name)
            .mtu(opts.mtu)
            .offload(true)
            .enable(true);
        let mut v4 = 0;
        for a in &opts.addresses {
            match a {
                IpNet::V4(n) => {
                    v4 += 1;
                    b = b.ipv4(n.addr(), n.prefix_len(), None);
                }
                IpNet::V6(n) => b = b.ipv6(n.addr(), n.prefix_len()),
            }
        }
        if v4 > 1 {
            return Err(Error::Invalid("at most one IPv4 address".into()));
        }
        let tun = b
            .build_sync()
            .map_err(Error::io(format!("TUN device {}", opts.name)))?;
        tun.set_nonblocking(true)
            .map_err(Error::io("TUN non-blocking"))?;
        let udp =
            UdpSocket::bind(opts.listen).map_err(Error::io(format!("UDP {}", opts.listen)))?;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // Root may exceed net.core.[rw]mem_max; elsewhere the kernel's cap applies.
            let ok = setsockopt(&udp, opt, SOCKET_BUFFER);
            if !ok {
                let plain = if opt == libc::SO_RCVBUFFORCE {
                    libc::SO_RCVBUF
                } else {
                    libc::SO_SNDBUF
                };
                setsockopt(&udp, plain, SOCKET_BUFFER);
            }
        }
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())
            .map_err(Error::io("UDP socket options"))?;
        // quinn-udp's recvmmsg waits for a whole batch on a blocking socket; non-blocking, a
        // reader takes what is there and polls when nothing is (waking to see a stop).
        udp.set_nonblocking(true)
            .map_err(Error::io("UDP non-blocking"))?;
        let secret = opts.secret.x25519();
        let public = x25519::PublicKey::from(&secret);
        let mut first = [0u8; 4];
        getrandom::getrandom(&mut first).expect("the OS random source");
        let inner = Arc::new(Inner {
            name: opts.name,
            limiter: RateLimiter::new(&public, 100),
            secret,
            public,
            tun,
            udp,
            udp_state,
            mtu: opts.mtu as usize,
            table: RwLock::new(Table::default()),
            relay: RwLock::new(None),
            miss: RwLock::new(None),
            pending: Mutex::default(),
            reject: RwLock::new(None),
            rejected: Mutex::default(),
            // boringtun keeps the low 8 bits of a session index for itself.
            next_index: AtomicU32::new(u32::from_le_bytes(first) >> 8),
            start: Instant::now(),
            stop: AtomicBool::new(false),
            routes: opts.routes,
            own_nets: opts.addresses.iter().map(|a| a.trunc()).collect(),
        });
        let mut threads = Vec::new();
        for (name, f) in [
            ("wg-tun", Inner::tun_loop as fn(&Inner)),
            ("wg-udp", Inner::udp_loop),
            ("wg-timers", Inner::timer_loop),
        ] {
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || f(&i))
                    .map_err(Error::io("thread"))?,
            );
        }
        Ok(Device { inner, threads })
    }

    pub fn public_key(&self) -> WgPublic {
        WgPublic(self.inner.public.to_bytes())
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn listen_port(&self) -> u16 {
        self.inner.udp.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sets where datagrams go for peers that no UDP reaches (and while a peer's direct path is
    /// not yet known to work).
    pub fn set_relay(&self, sink: Option<RelaySink>) {
        *self.inner.relay.write().unwrap() = sink;
    }

    /// Sets who is told of packets for addresses no peer holds.
    pub fn set_reject_hook(&self, hook: Option<RejectHook>) {
        *self.inner.reject.write().unwrap() = hook;
    }

    pub fn set_miss_hook(&self, hook: Option<MissHook>) {
        *self.inner.miss.write().unwrap() = hook;
    }

    /// Starts a handshake with a peer now instead of on its first packet: the side that learns
    /// of a peer second calls this, so neither waits for a handshake to time out and be retried.
    /// False if there is no such peer.
    pub fn initiate(&self, key: &WgPublic) -> bool {
        let Some(peer) = self.inner.table.read().unwrap().by_key.get(key).cloned() else {
            return false;
        };
        let mut out = vec![0u8; 256];
        let r = peer
            .tunn
            .lock()
            .unwrap()
            .format_handshake_initiation(&mut out, false);
        if let TunnResult::WriteToNetwork(d) = r {
            self.inner.send(&peer, d);
        }
        true
    }

    /// Adds a peer, or updates the one with the same key (its session is kept: a roaming
    /// endpoint or new allowed IPs cost no handshake). An allowed IP another peer has is refused.
    pub fn set_peer(&self, cfg: &PeerConfig) -> Result<(), Error> {
        self.set_peer_inner(cfg, false)
    }

    /// As [`set_peer`](Self::set_peer), but an allowed IP another peer has is taken from it (the
    /// grid's registry moved that address: a user's machine now joins through another node).
    pub fn claim_peer(&self, cfg: &PeerConfig) -> Result<(), Error> {
        self.set_peer_inner(cfg, true)
    }

    fn set_peer_inner(&self, cfg: &PeerConfig, steal: bool) -> Result<(), Error> {
        if cfg.public_key.0 == self.inner.public.to_bytes() {
            return Err(Error::Invalid("a peer with this device's own key".into()));
        }
        let mut t = self.inner.table.write().unwrap();
        let mut taken = Vec::new();
        for (net, p) in &t.routes {
            if p.public != cfg.public_key && cfg.allowed_ips.iter().any(|a| a.trunc() == *net) {
                if !steal {
                    return Err(Error::Invalid(format!(
                        "allowed IP {net} is already peer {}'s",
                        p.public
                    )));
                }
                taken.push((*net, p.clone()));
            }
        }
        for (net, p) in &taken {
            p.allowed.write().unwrap().retain(|a| a.trunc() != *net);
            t.routes.retain(|(n, q)| !(n == net && Arc::ptr_eq(p, q)));
        }
        if let Some(old) = t.by_key.get(&cfg.public_key).cloned() {
            if cfg.endpoint.is_some() {
                *old.endpoint.lock().unwrap() = cfg.endpoint;
            }
            if *old.allowed.read().unwrap() == cfg.allowed_ips {
                return Ok(());
            }
            *old.allowed.write().unwrap() = cfg.allowed_ips.clone();
            t.routes.retain(|(_, q)| !Arc::ptr_eq(q, &old));
            route_to(&mut t, &old, &cfg.allowed_ips);
            drop(t);
            self.inner.release(&old);
            self.inner.readmit(&old);
            return self.add_routes(&cfg.allowed_ips);
        }
        let index = self.inner.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let peer = Arc::new(Peer {
            public: cfg.public_key,
            tunn: Mutex::new(Tunn::new(
                self.inner.secret.clone(),
                x25519::PublicKey::from(cfg.public_key.0),
                None,
                cfg.persistent_keepalive,
                index,
                None,
            )),
            endpoint: Mutex::new(cfg.endpoint),
            allowed: RwLock::new(cfg.allowed_ips.clone()),
            udp_rx: AtomicU64::new(0),
            relay_rx: AtomicU64::new(0),
            relayed: Mutex::default(),
        });
        remove_from(&mut t, &cfg.public_key);
        t.by_key.insert(cfg.public_key, peer.clone());
        t.by_index.insert(index, peer.clone());
        route_to(&mut t, &peer, &cfg.allowed_ips);
        drop(t);
        self.inner.release(&peer);
        self.add_routes(&cfg.allowed_ips)
    }

    fn add_routes(&self, nets: &[IpNet]) -> Result<(), Error> {
        if self.inner.routes {
            for net in nets {
                let net = net.trunc();
                if !self.inner.own_nets.iter().any(|o| o.contains(&net)) {
                    ip(&[
                        "route",
                        "replace",
                        &net.to_string(),
                        "dev",
                        &self.inner.name,
                    ])?;
                }
            }
        }
        Ok(())
    }

    pub fn remove_peer(&self, key: &WgPublic) -> bool {
        let removed = {
            let mut t = self.inner.table.write().unwrap();
            remove_from(&mut t, key)
        };
        if let (true, Some(p)) = (self.inner.routes, &removed) {
            for net in p.allowed.read().unwrap().iter() {
                let net = net.trunc();
                if !self.inner.own_nets.iter().any(|o| o.contains(&net)) {
                    let _ = ip(&["route", "del", &net.to_string(), "dev", &self.inner.name]);
                }
            }
        }
        removed.is_some()
    }

    /// A datagram that came for this device through the relay, from the twin whose overlay key is
    /// `from` (the bus authenticated it). It is taken only if its session is `from`'s.
    pub fn receive_relayed(&self, from: WgPublic, datagram: &[u8]) {
        thread_local! {
            static OUT: std::cell::RefCell<(Vec<u8>, tun_rs::GROTable)> =
                std::cell::RefCell::new((vec![0u8; BUF], tun_rs::GROTable::default()));
        }
        OUT.with(|o| {
            let (out, gro) = &mut *o.borrow_mut();
            if let Some(n) = self.inner.receive(Source::Relay(from), datagram, out) {
                let mut one = [packet_buf(&out[..n])];
                self.inner.write_tun(gro, &mut one);
            }
        });
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        let t = self.inner.table.read().unwrap();
        let now = self.inner.now_ms();
        let mut v: Vec<PeerStatus> = t
            .by_key
            .values()
            .map(|p| {
                let (hs, tx, rx, _, _) = p.tunn.lock().unwrap().stats();
                PeerStatus {
                    public_key: p.public,
                    endpoint: *p.endpoint.lock().unwrap(),
                    allowed_ips: p.allowed.read().unwrap().clone(),
                    path: p.path(now),
                    last_handshake_s: hs.map(|d| d.as_secs_f64()),
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect();
        v.sort_by_key(|s| s.public_key);
        v
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An IP packet's source address.
fn src_address(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?)),
        _ => None,
    }
}

/// Routes `nets` to `peer`, keeping the table most specific first.
fn route_to(t: &mut Table, peer: &Arc<Peer>, nets: &[IpNet]) {
    for net in nets {
        t.routes.push((net.trunc(), peer.clone()));
    }
    t.routes
        .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
}

fn remove_from(t: &mut Table, key: &WgPublic) -> Option<Arc<Peer>> {
    let p = t.by_key.remove(key)?;
    t.by_index.retain(|_, q| !Arc::ptr_eq(q, &p));
    t.routes.retain(|(_, q)| !Arc::ptr_eq(q, &p));
    Some(p)
}

fn digest(d: &[u8]) -> [u8; 16] {
    let h = blake3::hash(d);
    h.as_bytes()[..16].try_into().expect("16 of 32 bytes")
}

fn setsockopt(s: &UdpSocket, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

pub(crate) fn ip(args: &[&str]) -> Result<(), Error> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(Error::io("ip"))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn fresh(now: u64, at: u64) -> bool {
    at != 0 && now + 1 - at < PATH_FRESH.as_millis() as u64
}

impl Peer {
    /// Cryptokey routing: a packet is taken from a peer only from one of its allowed IPs.
    fn admits(&self, len: usize, inner_src: IpAddr) -> Option<usize> {
        if self
            .allowed
            .read()
            .unwrap()
            .iter()
            .any(|n| n.contains(&inner_src))
        {
            Some(len)
        } else {
            tracing::debug!(peer = %self.public, "dropped a packet from {inner_src}: not its allowed IP");
            None
        }
    }

    fn path(&self, now: u64) -> Path {
        if fresh(now, self.udp_rx.load(Ordering::Relaxed)) {
            Path::Direct
        } else if fresh(now, self.relay_rx.load(Ordering::Relaxed)) {
            Path::Relay
        } else {
            Path::None
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// Sends one datagram the way [`queue`](Self::queue) decides (for the timers and the
    /// packets a handshake released, which come one at a time).
    fn send(&self, peer: &Arc<Peer>, datagram: &[u8]) {
        let mut run = Run::default();
        self.queue(&mut run, peer, datagram);
        self.flush(&mut run);
    }

    fn route(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        let t = self.table.read().unwrap();
        t.routes
            .iter()
            .find(|(n, _)| n.contains(&dst))
            .map(|(_, p)| p.clone())
    }

    fn tun_loop(&self) {
        let mut orig = vec![0u8; HDR + 65535];
        let mut segs = vec![vec![0u8; self.mtu + 64]; BATCH];
        let mut sizes = vec![0usize; BATCH];
        let mut scratch = vec![0u8; BUF];
        let mut run = Run::default();
        let fd = self.tun.as_raw_fd();
        while !self.stop.load(Ordering::Relaxed) {
            let n = match self.tun.recv_multiple(&mut orig, &mut segs, &mut sizes, 0) {
                Ok(n) => n,
                // Non-blocking, so a busy path costs one read per batch and an idle one wakes
                // to see a stop.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    readable(fd, 200);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(iface = %self.name, "TUN read: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for (seg, &len) in segs.iter().zip(&sizes).take(n) {
                let packet = &seg[..len];
                let Some(dst) = Tunn::dst_address(packet) else {
                    continue;
                };
                let Some(peer) = self.route(dst) else {
                    if let Some(hook) = self.miss.read().unwrap().as_ref() {
                        self.hold(packet);
                        hook(dst);
                    }
                    continue;
                };
                let r = peer.tunn.lock().unwrap().encapsulate(packet, &mut scratch);
                match r {
                    TunnResult::WriteToNetwork(d) => self.queue(&mut run, &peer, d),
                    TunnResult::Err(e) => tracing::debug!("encapsulate: {e:?}"),
                    _ => {}
                }
            }
            self.flush(&mut run);
        }
    }

    fn hold(&self, packet: &[u8]) {
        let mut q = self.pending.lock().unwrap();
        while q.len() >= PENDING_MAX || q.front().is_some_and(|(t, _)| t.elapsed() > PENDING_FOR) {
            q.pop_front();
        }
        q.push_back((Instant::now(), packet.to_vec()));
    }

    /// Sends what was held for addresses `peer` now holds (boringtun queues them until the
    /// handshake completes).
    fn release(&self, peer: &Arc<Peer>) {
        let taken: Vec<Vec<u8>> = {
            let mut q = self.pending.lock().unwrap();
            let mut taken = Vec::new();
            q.retain(|(t, p)| {
                let mine = t.elapsed() <= PENDING_FOR
                    && Tunn::dst_address(p).is_some_and(|d| {
                        peer.allowed.read().unwrap().iter().any(|n| n.contains(&d))
                    });
                if mine {
                    taken.push(p.clone());
                }
                !mine
            });
            taken
        };
        let mut out = vec![0u8; BUF];
        for p in taken {
            let r = peer.tunn.lock().unwrap().encapsulate(&p, &mut out);
            if let TunnResult::WriteToNetwork(d) = r {
                self.send(peer, d);
            }
        }
    }

    /// Adds a datagram to the run of equal-sized datagrams to one address that goes out in one
    /// GSO send; what is not direct also goes to the relay.
    fn queue(&self, run: &mut Run, peer: &Arc<Peer>, d: &[u8]) {
        let endpoint = *peer.endpoint.lock().unwrap();
        let direct = fresh(self.now_ms(), peer.udp_rx.load(Ordering::Relaxed));
        if !direct {
            if let Some(sink) = self.relay.read().unwrap().as_ref() {
                sink(peer.public, d);
            }
        }
        let Some(e) = endpoint else {
            return;
        };
        let fits = run.takes(e, d.len(), self.udp_state.max_gso_segments());
        if !fits {
            self.flush(run);
            run.dest = Some(e);
            run.seg = d.len();
        }
        run.buf.extend_from_slice(d);
        run.count += 1;
    }

    fn flush(&self, run: &mut Run) {
        if let (Some(dest), false) = (run.dest, run.buf.is_empty()) {
            let t = quinn_udp::Transmit {
                destination: dest,
                ecn: None,
                contents: &run.buf,
                segment_size: (run.count > 1).then_some(run.seg),
                src_ip: None,
            };
            let mut r = self.udp_state.try_send((&self.udp).into(), &t);
            if matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                // A full send buffer: wait for room briefly (back pressure on the TUN reader,
                // so TCP slows down) rather than drop a whole run.
                writable(self.udp.as_raw_fd(), 10);
                r = self.udp_state.try_send((&self.udp).into(), &t);
            }
            // What still fails (an unreachable host, no room) is lost, as on a wire.
            if let Err(e) = r {
                tracing::debug!("UDP send of {} bytes to {dest}: {e}", run.buf.len());
            }
        }
        run.buf.clear();
        run.count = 0;
        run.dest = None;
    }

    fn udp_loop(&self) {
        let per = BATCH.min(quinn_udp::BATCH_SIZE);
        let mut bufs = vec![vec![0u8; BUF]; per];
        let mut meta = vec![quinn_udp::RecvMeta::default(); per];
        let mut scratch = vec![0u8; BUF];
        let mut out: Vec<Vec<u8>> = (0..BATCH).map(|_| packet_buf(&[])).collect();
        let mut gro = tun_rs::GROTable::default();
        while !self.stop.load(Ordering::Relaxed) {
            let mut slices: Vec<std::io::IoSliceMut> = bufs
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(b))
                .collect();
            let n = match self
                .udp_state
                .recv((&self.udp).into(), &mut slices, &mut meta)
            {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                            // An ICMP unreachable for an earlier send.
                            | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(iface = %self.name, "UDP read: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            drop(slices);
            let mut k = 0;
            for (b, m) in bufs.iter().zip(&meta).take(n) {
                // With GRO one buffer holds several datagrams of `stride` bytes.
                for d in b[..m.len].chunks(m.stride.max(1)) {
                    if let Some(len) = self.receive(Source::Udp(m.addr), d, &mut scratch) {
                        out[k].truncate(HDR);
                        out[k].extend_from_slice(&scratch[..len]);
                        k += 1;
                        if k == out.len() {
                            self.write_tun(&mut gro, &mut out[..k]);
                            k = 0;
                        }
                    }
                }
            }
            if k > 0 {
                self.write_tun(&mut gro, &mut out[..k]);
            }
        }
    }

    /// Writes packets (each after `HDR` bytes of room) to the TUN device, coalescing segments of
    /// one TCP stream into one write.
    fn write_tun(&self, gro: &mut tun_rs::GROTable, bufs: &mut [Vec<u8>]) {
        if let Err(e) = self.tun.send_multiple(gro, bufs, HDR) {
            tracing::debug!("TUN write: {e}");
        }
        for b in bufs.iter_mut() {
            b.truncate(HDR);
        }
    }

    /// Handles one datagram; returns the length of a packet for the TUN device left in `out`.
    fn receive(&self, from: Source, datagram: &[u8], out: &mut [u8]) -> Option<usize> {
        let src_ip = match &from {
            Source::Udp(a) => Some(a.ip()),
            Source::Relay(_) => None,
        };
        // Checks the MACs and, under a handshake flood, answers with a cookie instead of doing
        // the Diffie-Hellman work below.
        let packet = match self.limiter.verify_packet(src_ip, datagram, out) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                if let Source::Udp(a) = from {
                    let _ = self.udp.send_to(cookie, a);
                }
                return None;
            }
            Err(_) => return None,
        };
        let peer = {
            let t = self.table.read().unwrap();
            match &packet {
                Packet::HandshakeInit(h) => parse_handshake_anon(&self.secret, &self.public, h)
                    .ok()
                    .and_then(|hh| t.by_key.get(&WgPublic(hh.peer_static_public)).cloned()),
                Packet::HandshakeResponse(p) => t.by_index.get(&(p.receiver_idx >> 8)).cloned(),
                Packet::PacketCookieReply(p) => t.by_index.get(&(p.receiver_idx >> 8)).cloned(),
                Packet::PacketData(p) => t.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            }
        };
        let peer = peer?;
        if let Source::Relay(k) = &from {
            if *k != peer.public {
                return None;
            }
        }
        let mut tunn = peer.tunn.lock().unwrap();
        let r = tunn.decapsulate(src_ip, datagram, out);
        let authentic = match (&r, &from) {
            (TunnResult::Err(WireGuardError::DuplicateCounter), Source::Udp(_)) => {
                peer.relayed.lock().unwrap().contains(&digest(datagram))
            }
            (TunnResult::Err(_), _) => false,
            (_, Source::Relay(_)) => {
                let mut q = peer.relayed.lock().unwrap();
                if q.len() >= RELAYED_KEPT {
                    q.pop_front();
                }
                q.push_back(digest(datagram));
                true
            }
            _ => true,
        };
        let mut delivered = None;
        match r {
            TunnResult::WriteToNetwork(d) => {
                drop(tunn);
                self.reply(&from, d);
                // Packets queued while the handshake ran go out now.
                let mut more = vec![0u8; BUF];
                loop {
                    let r = peer.tunn.lock().unwrap().decapsulate(None, &[], &mut more);
                    match r {
                        TunnResult::WriteToNetwork(d) => self.send(&peer, d),
                        _ => break,
                    }
                }
            }
            TunnResult::WriteToTunnelV4(p, inner_src) => {
                delivered = peer.admits(p.len(), inner_src.into());
                if delivered.is_none() {
                    self.rejected(&peer, p, inner_src.into());
                }
            }
            TunnResult::WriteToTunnelV6(p, inner_src) => {
                delivered = peer.admits(p.len(), inner_src.into());
            }
            TunnResult::Done => {}
            TunnResult::Err(e) => tracing::debug!("decapsulate: {e:?}"),
        }
        if authentic {
            let now = self.now_ms();
            match from {
                Source::Udp(a) => {
                    peer.udp_rx.store(now, Ordering::Relaxed);
                    // Roaming, as WireGuard does: answer where the peer now is.
                    let mut e = peer.endpoint.lock().unwrap();
                    if *e != Some(a) {
                        *e = Some(a);
                    }
                }
                Source::Relay(_) => peer.relay_rx.store(now, Ordering::Relaxed),
            }
        }
        delivered
    }

    /// Holds a packet from an address the peer is not known to have and tells the reject hook.
    fn rejected(&self, peer: &Arc<Peer>, packet: &[u8], src: IpAddr) {
        let Some(hook) = self.reject.read().unwrap().clone() else {
            return;
        };
        {
            let mut q = self.rejected.lock().unwrap();
            while q.len() >= PENDING_MAX
                || q.front().is_some_and(|(t, _, _)| t.elapsed() > PENDING_FOR)
            {
                q.pop_front();
            }
            q.push_back((Instant::now(), peer.public, packet.to_vec()));
        }
        hook(peer.public, src);
    }

    /// Delivers held packets from `peer` that its allowed IPs now admit.
    fn readmit(&self, peer: &Arc<Peer>) {
        let taken: Vec<Vec<u8>> = {
            let allowed = peer.allowed.read().unwrap();
            let mut q = self.rejected.lock().unwrap();
            let mut taken = Vec::new();
            q.retain(|(t, k, p)| {
                let mine = *k == peer.public
                    && t.elapsed() <= PENDING_FOR
                    && src_address(p).is_some_and(|s| allowed.iter().any(|n| n.contains(&s)));
                if mine {
                    taken.push(packet_buf(p));
                }
                !mine
            });
            taken
        };
        if !taken.is_empty() {
            let mut gro = tun_rs::GROTable::default();
            let mut bufs = taken;
            self.write_tun(&mut gro, &mut bufs);
        }
    }

    fn reply(&self, from: &Source, d: &[u8]) {
        match from {
            Source::Udp(a) => {
                let _ = self.udp.send_to(d, a);
            }
            Source::Relay(k) => {
                if let Some(sink) = self.relay.read().unwrap().as_ref() {
                    sink(*k, d);
                }
            }
        }
    }

    fn timer_loop(&self) {
        let mut out = vec![0u8; BUF];
        let mut last_reset = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if last_reset.elapsed() >= Duration::from_secs(1) {
                self.limiter.reset_count();
                last_reset = Instant::now();
            }
            let peers: Vec<Arc<Peer>> = self
                .table
                .read()
                .unwrap()
                .by_key
                .values()
                .cloned()
                .collect();
            for p in peers {
                let r = p.tunn.lock().unwrap().update_timers(&mut out);
                match r {
                    TunnResult::WriteToNetwork(d) => self.send(&p, d),
                    TunnResult::Err(e) => tracing::trace!("timers: {e:?}"),
                    _ => {}
                }
            }
        }
    }
}

/// Datagrams waiting to go to one address in one send.
#[derive(Default)]
struct Run {
    dest: Option<SocketAddr>,
    seg: usize,
    count: usize,
    buf: Vec<u8>,
}

impl Run {
    /// Whether a datagram of `len` bytes to `dest` can join this run: same address, room for one
    /// more segment, no longer than the run's segment size, and only the last may be shorter.
    fn takes(&self, dest: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.dest == Some(dest)
            && self.count < max_segments
            // One GSO send is one UDP datagram to the kernel: 64 KiB at most.
            && self.buf.len() + len <= GSO_MAX_BYTES
            && len <= self.seg
            && self.buf.len().is_multiple_of(self.seg)
    }
}

/// A TUN write buffer: `HDR` bytes of room for the offload header, then the packet.
fn packet_buf(packet: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HDR + 2048);
    v.resize(HDR, 0);
    v.extend_from_slice(packet);
    v
}

/// Waits up to `ms` for `fd` to be readable.
fn readable(fd: i32, ms: i32) -> bool {
    wait(fd, libc::POLLIN, ms)
}

fn writable(fd: i32, ms: i32) -> bool {
    wait(fd, libc::POLLOUT, ms)
}

fn wait(fd: i32, events: libc::c_short, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_runs_stay_within_what_the_kernel_takes() {
        let dest: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut run = Run::default();
        let mut sends = Vec::new();
        let mut push = |run: &mut Run, to: SocketAddr, len: usize| {
            if !run.takes(to, len, 64) {
                if !run.buf.is_empty() {
                    sends.push((run.dest, run.seg, run.count, run.buf.len()));
                }
                *run = Run {
                    dest: Some(to),
                    seg: len,
                    ..Run::default()
                };
            }
            run.buf.extend(std::iter::repeat_n(0u8, len));
            run.count += 1;
        };
        // A TSO burst of 60 full packets, a short tail, then another peer.
        for _ in 0..60 {
            push(&mut run, dest, 1452);
        }
        push(&mut run, dest, 200);
        push(&mut run, dest, 1452);
        push(&mut run, other, 1452);
        let sends_len = sends.len();
        assert!(sends_len >= 3, "{sends:?}");
        for (_, seg, count, bytes) in &sends {
            assert!(*bytes <= GSO_MAX_BYTES, "{sends:?}");
            assert!(
                *bytes <= seg * count && *bytes > seg * (count - 1),
                "{sends:?}"
            );
        }
        // 44 full packets fit in 64 KiB; the burst is cut there, not at 64 segments.
        assert_eq!(sends[0].2, 44);
        assert_eq!(sends[0].3, 44 * 1452);
    }
}
