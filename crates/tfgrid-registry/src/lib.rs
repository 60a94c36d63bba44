//! The tfgrid registry: the grid's source of truth for twins, farms, nodes and contracts, in the
//! role of ThreeFold's TFChain (the ledger) and GridProxy (the query API).
//!
//! Flow: HTTP handler verifies the signature -> [`ledger::Ledger`] queues it -> the writer thread
//! applies it to [`state::State`] and commits the batch to [`store::Store`] -> the read side
//! ([`index::ReadModel`]) is refreshed -> the handler answers with the receipt.

pub mod api;
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
    /// Opens (or creates) the registry under `dir` and starts its writer.
    pub fn open(dir: &Path, config: RegistryConfig) -> Result<Self, RegistryError> {
        tfgrid_core::network::Layout::of(&config)
            .valid()
            .map_err(RegistryError::Config)?;
        if config.network_range.overlaps(&config.workload_range) {
            return Err(RegistryError::Config(format!(
                "the network range {} overlaps the workload range {}",
                config.network_range, config.workload_range
            )));
        }
        let store = store::Store::open(dir)?;
        let state = store.load(config)?;
        tracing::info!(
            height = state.height,
            twins = state.twins.len(),
            nodes = state.nodes.len(),
            "registry loaded"
        );
        Ok(Self {
            ledger: Arc::new(ledger::Ledger::start(store, state)),
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
        axum::serve(
            listener,
            self.router()
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
    }
}
