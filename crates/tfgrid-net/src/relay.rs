//! The relayed path: WireGuard datagrams for a peer that no UDP reaches travel over the bus, as
//! one-way sealed messages to the twin that speaks for the peer's key. The bus authenticates the
//! sending twin, and a datagram is fed to the device only as that twin's own peer's, so a twin
//! cannot speak for another's key (and WireGuard's own authentication still applies on top).

use std::sync::Arc;
use std::time::Duration;
use tfgrid_bus::Peer;
use tfgrid_core::TwinId;

use crate::{batch, Device, RelaySink, WgPublic};

/// The bus command that carries WireGuard datagrams (a batch of them per message).
pub const WG_CMD: &str = "net.wg";
/// Datagrams waiting for the bus; past this they are dropped, as a full link drops them.
const QUEUE: usize = 4096;
/// Twins with a batch in one round; the rest wait for the next.
const MAX_TWINS_PER_ROUND: usize = 64;

/// Who speaks for which WireGuard key on the bus.
pub trait Directory: Send + Sync + 'static {
    fn twin_of(&self, key: &WgPublic) -> Option<TwinId>;
    fn key_of(&self, twin: TwinId) -> Option<WgPublic>;
    /// Datagrams came from a twin with no known key (dropped); the directory may look it up.
    fn unknown_twin(&self, _twin: TwinId) {}
}

/// Makes `peer` the device's relayed path.
pub fn attach(peer: &Peer, dev: &Arc<Device>, dir: Arc<dyn Directory>) {
    let d = dev.clone();
    let inbound = dir.clone();
    peer.on_notify(WG_CMD, move |src, msg| {
        let Some(datagrams) = batch::unpack(&msg) else {
            tracing::debug!(twin = src, "a malformed relayed batch");
            return;
        };
        let Some(k) = inbound.key_of(src) else {
            inbound.unknown_twin(src);
            return;
        };
        for datagram in datagrams {
            d.receive_relayed(k, datagram);
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(TwinId, Vec<u8>)>(QUEUE);
    let sink: RelaySink = Arc::new(move |key, datagram| {
        if let Some(t) = dir.twin_of(&key) {
            // Called on the data path: never wait for the bus.
            let _ = tx.try_send((t, datagram.to_vec()));
        }
    });
    dev.set_relay(Some(sink));
    let p = peer.clone();
    tokio::spawn(async move {
        // What queued while the last message went out goes in the next, one batch per twin.
        let mut batches: Vec<(TwinId, Vec<u8>)> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some((twin, datagram)) = next.take().or_else(|| rx.try_recv().ok()) {
                match batches.iter_mut().find(|(t, _)| *t == twin) {
                    Some((_, b)) => {
                        if !batch::push(b, &datagram) {
                            send(&p, twin, b).await;
                            batch::push(b, &datagram);
                        }
                    }
                    None => {
                        let mut b = Vec::new();
                        batch::push(&mut b, &datagram);
                        batches.push((twin, b));
                    }
                }
                if batches.len() >= MAX_TWINS_PER_ROUND {
                    break;
                }
            }
            for (twin, b) in batches.iter_mut() {
                send(&p, *twin, b).await;
            }
            batches.clear();
        }
    });
}

async fn send(p: &Peer, twin: TwinId, b: &mut Vec<u8>) {
    if b.is_empty() {
        return;
    }
    if let Err(e) = p.notify(twin, WG_CMD, b, Duration::from_secs(5)).await {
        tracing::debug!("relaying {} bytes to twin {twin}: {e}", b.len());
    }
    b.clear();
}

/// A fixed directory (the `--peer-twin` pairs of `tfgrid net run`).
pub struct Fixed(pub Vec<(WgPublic, TwinId)>);

impl Directory for Fixed {
    fn twin_of(&self, key: &WgPublic) -> Option<TwinId> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, t)| *t)
    }
    fn key_of(&self, twin: TwinId) -> Option<WgPublic> {
        self.0.iter().find(|(_, t)| *t == twin).map(|(k, _)| *k)
    }
}
