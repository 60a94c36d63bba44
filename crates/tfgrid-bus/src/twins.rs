//! Twin records from the registry, cached: signatures are checked against the key a twin
//! registered, routing follows the relay it names.

use crate::error::BusError;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tfgrid_core::records::Twin;
use tfgrid_core::TwinId;
use tfgrid_registry_client::{ClientError, RegistryClient};

/// Keys never change; relays and encryption keys may, so entries expire.
const TTL: Duration = Duration::from_secs(30);

pub struct TwinCache {
    registry: RegistryClient,
    entries: Mutex<HashMap<TwinId, (Twin, Instant)>>,
}

impl TwinCache {
    pub fn new(registry: RegistryClient) -> Self {
        Self {
            registry,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// `Ok(None)` when the registry has no such twin.
    pub async fn get(&self, id: TwinId) -> Result<Option<Twin>, BusError> {
        if let Some((t, at)) = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            if at.elapsed() < TTL {
                return Ok(Some(t.clone()));
            }
        }
        match self.registry.twin(id).await {
            Ok(t) => {
                self.entries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, (t.clone(), Instant::now()));
                Ok(Some(t))
            }
            Err(ClientError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(BusError::Registry(e.to_string())),
        }
    }

    pub fn forget(&self, id: TwinId) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}
