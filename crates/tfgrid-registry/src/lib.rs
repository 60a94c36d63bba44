//! The tfgrid registry: the grid's source of truth for twins, farms, nodes and contracts, in the
//! role of ThreeFold's TFChain (the ledger) and GridProxy (the query API).
//!
//! Flow: HTTP handler verifies the signature (or sends the write on to the leader) ->
//! [`ledger::Ledger`] queues it -> the proposer hands a batch to raft ([`cluster`]) -> once a
//! majority of validators logged it, each one's state machine applies it to [`state::State`] and
//! commits it to [`store::Store`] -> the read side ([`index::ReadModel`]) is refreshed -> the
//! handler answers with the receipt.

pub mod api;
pub mod cluster;
pub mod error;
pub mod index;
pub mod ledger;
pub mod state;
pub mod store;

pub use error::{RegistryError, TxError};
pub use tfgrid_core::records::RegistryConfig;

use std::path::Path;
use std::sync::Arc;

pub struct Registry {
    pub ledger: Arc<ledger::Ledger>,
}

impl Registry {
    /// Opens (or creates) a registry of one validator under `dir`.
    pub async fn open(dir: &Path, config: RegistryConfig) -> Result<Self, RegistryError> {
        Self::open_cluster(
            dir,
            config,
            cluster::ClusterConfig::single("http://127.0.0.1"),
        )
        .await
    }

    /// Opens (or creates) this validator's store under `dir` and joins its cluster.
    pub async fn open_cluster(
        dir: &Path,
        config: RegistryConfig,
        cluster: cluster::ClusterConfig,
    ) -> Result<Self, RegistryError> {
        tfgrid_core::network::Layout::of(&config)
            .valid()
            .map_err(RegistryError::Config)?;
        if config.network_range.overlaps(&config.workload_range) {
            return Err(RegistryError::Config(format!(
                "the network range {} overlaps the workload range {}",
                config.network_range, config.workload_range
            )));
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            ledger: Arc::new(ledger::Ledger::start(dir, config, cluster).await?),
        })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.ledger.clone())
    }

    /// Serves the API on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        // With each connection's peer address, for `/whoami`.
        let r = axum::serve(
            listener,
            self.router()
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        // Raft's tasks hold the stores: stop them so the files close with the server.
        let _ = self.ledger.raft().shutdown().await;
        r
    }
}
