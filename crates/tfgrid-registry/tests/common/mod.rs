#![allow(dead_code)]

use std::time::Duration;
use tfgrid_core::capacity::GIB;
use tfgrid_core::records::{Location, PublicConfig, RegistryConfig};
use tfgrid_core::tx::{Call, NodeSpec, Outcome, Receipt, SignedTx};
use tfgrid_core::{Capacity, Identity};
use tfgrid_registry::Registry;
use tfgrid_registry_client::{ClientError, RegistryClient};

pub struct Grid {
    pub url: String,
    pub client: RegistryClient,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Grid {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start(config: RegistryConfig) -> Grid {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path(), config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registry.serve(listener, async {
        let _ = rx.await;
    }));
    let client = RegistryClient::new(&url);
    Grid {
        url,
        client,
        dir,
        stop: Some(tx),
    }
}

pub async fn start_default() -> Grid {
    start(RegistryConfig {
        down_after_ms: 60_000,
        ..Default::default()
    })
    .await
}

/// A key plus a locally counted nonce, so tests control exactly which nonce each tx carries.
pub struct Actor {
    pub id: Identity,
    pub nonce: u64,
}

impl Default for Actor {
    fn default() -> Self {
        Self::new()
    }
}

impl Actor {
    pub fn new() -> Self {
        Self {
            id: Identity::generate(),
            nonce: 0,
        }
    }

    pub fn sign(&mut self, call: Call) -> SignedTx {
        self.nonce += 1;
        SignedTx::new(&self.id, self.nonce, call)
    }

    pub async fn send(&mut self, g: &Grid, call: Call) -> Result<Receipt, ClientError> {
        let stx = self.sign(call);
        let r = g.client.submit(&stx).await;
        if r.is_err() {
            self.nonce -= 1; // refused transactions consume no nonce
        }
        r
    }

    pub async fn ok(&mut self, g: &Grid, call: Call) -> Outcome {
        let name = call.name();
        match self.send(g, call).await {
            Ok(r) => r.outcome,
            Err(e) => panic!("{name} refused: {e}"),
        }
    }

    pub async fn twin(&mut self, g: &Grid) -> u32 {
        match self
            .ok(
                g,
                Call::CreateTwin {
                    relay: "ws://127.0.0.1:1".into(),
                    enc_key: None,
                },
            )
            .await
        {
            Outcome::TwinCreated { twin_id } => twin_id,
            o => panic!("{o:?}"),
        }
    }

    pub async fn farm(&mut self, g: &Grid, name: &str) -> u32 {
        match self
            .ok(
                g,
                Call::CreateFarm {
                    name: name.into(),
                    dedicated: false,
                },
            )
            .await
        {
            Outcome::FarmCreated { farm_id } => farm_id,
            o => panic!("{o:?}"),
        }
    }
}

pub fn spec(farm_id: u32, cru: u64, mru_gib: u64) -> NodeSpec {
    NodeSpec {
        farm_id,
        total: Capacity {
            cru,
            mru: mru_gib * GIB,
            sru: 100 * GIB,
            hru: 1000 * GIB,
            gpu: 0,
            ipv4: 0,
        },
        gpus: vec![],
        location: Location {
            country: "Belgium".into(),
            city: "Ghent".into(),
            latitude: Some(51.05),
            longitude: Some(3.71),
        },
        public_config: PublicConfig::default(),
        overlay: None,
    }
}

/// A farmer with a farm, and a node of `cru` cores and `mru_gib` GiB in it.
pub async fn farm_with_node(g: &Grid, cru: u64, mru_gib: u64) -> (Actor, u32, Actor, u32) {
    let mut farmer = Actor::new();
    farmer.twin(g).await;
    let farm = farmer
        .farm(
            g,
            &format!("farm_{}", &farmer.id.public_key().to_hex()[..8]),
        )
        .await;
    let mut node = Actor::new();
    node.twin(g).await;
    let node_id = match node
        .ok(g, Call::RegisterNode(spec(farm, cru, mru_gib)))
        .await
    {
        Outcome::NodeRegistered { node_id } => node_id,
        o => panic!("{o:?}"),
    };
    (farmer, farm, node, node_id)
}

pub fn assert_refused<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    status: u16,
    code: &str,
    needle: &str,
) {
    match r {
        Err(ClientError::Rejected {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!((s, c.as_str()), (status, code), "message: {message}");
            assert!(
                message.contains(needle),
                "{message:?} should mention {needle:?}"
            );
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

pub async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
