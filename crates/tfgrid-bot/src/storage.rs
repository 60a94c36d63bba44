//! The bot's storage service: each deployment with a `storage:` section is a pool whose slot i
//! is the zdb namespace of its storage replica i. The pool is opened once every replica has a
//! namespace; when the reconciler moves a replica (its node died), the slot is pointed at the
//! new, empty namespace and the pool's repair fills it. One S3 endpoint serves every pool.

use crate::bot::{wname, Bot};
use crate::spec::{Spec, STORAGE_SERVICE, STORAGE_ZDB};
use crate::store::Record;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tfgrid_storage::{Layout, PoolConfig, Pools, SlotAddr, Status, StorageKey, Store};

/// How often a pool checks its slots when nothing calls for it sooner.
const REPAIR_EVERY: Duration = Duration::from_secs(2);

pub struct Storage {
    pub key: StorageKey,
    pub pools: Arc<Pools>,
    /// Per pool: its repair task, or why it is not open.
    open: Mutex<HashMap<String, PoolState>>,
    /// Where S3 is served, once it is.
    pub endpoint: std::sync::OnceLock<String>,
}

enum PoolState {
    Open(tokio::task::JoinHandle<()>),
    Waiting(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub name: String,
    pub shards: String,
    /// Why the pool is not open (yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Credentials {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

impl Storage {
    pub fn new(key: StorageKey) -> Storage {
        Storage {
            pools: Pools::new(key.clone()),
            key,
            open: Mutex::default(),
            endpoint: Default::default(),
        }
    }
}

/// A storage record's layout and the namespace of each of its slots (None: no replica yet).
fn slots_of(rec: &Record, key: &StorageKey) -> Option<(Layout, Vec<Option<SlotAddr>>)> {
    // Most records have no storage: skip them without parsing.
    if !rec.yaml.contains("storage") {
        return None;
    }
    let spec = Spec::parse(&rec.yaml).ok()?;
    let (k, m) = spec.storage.as_ref()?.layout().ok()?;
    let layout = Layout::new(k, m).ok()?;
    let password = key.zdb_password(&rec.name);
    let mut slots = vec![None; layout.n()];
    let zdb = wname(&format!("{STORAGE_SERVICE}_{STORAGE_ZDB}"));
    for r in rec.replicas.iter().filter(|r| r.service == STORAGE_SERVICE) {
        let Some(w) = r.workloads.iter().find(|w| w.name == zdb) else {
            continue;
        };
        let (Some(endpoint), Some(namespace)) = (w.data.get("endpoint"), w.data.get("namespace"))
        else {
            continue;
        };
        if let Some(s) = slots.get_mut(r.index as usize) {
            *s = Some(SlotAddr {
                endpoint: endpoint.clone(),
                namespace: namespace.clone(),
                password: password.clone(),
            });
        }
    }
    Some((layout, slots))
}

impl Bot {
    pub(crate) fn storage_key(&self) -> &StorageKey {
        &self.storage.key
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Keeps the open pools in step with the records: opens new ones, points moved slots at
    /// their new namespaces, closes removed ones.
    pub async fn run_storage(self: Arc<Self>, every: Duration) {
        loop {
            if let Err(e) = self.sync_storage().await {
                tracing::warn!("storage: {e}");
            }
            tokio::time::sleep(every).await;
        }
    }

    pub async fn sync_storage(&self) -> Result<(), crate::bot::BotError> {
        let recs = self.store.all()?;
        let mut seen = Vec::new();
        for rec in &recs {
            let Some((layout, slots)) = slots_of(rec, &self.storage.key) else {
                continue;
            };
            seen.push(rec.name.clone());
            if let Some(store) = self.storage.pools.get(&rec.name) {
                for (i, s) in slots.into_iter().enumerate() {
                    if let Some(addr) = s {
                        if let Err(e) = store.replace_slot(i, addr) {
                            tracing::warn!("storage {}: {e}", rec.name);
                        }
                    }
                }
                continue;
            }
            let Some(slots) = slots.into_iter().collect::<Option<Vec<SlotAddr>>>() else {
                self.pool_waits(&rec.name, "its namespaces are being deployed".into());
                continue;
            };
            let cfg = PoolConfig {
                name: rec.name.clone(),
                layout,
                slots,
                stripe_size: PoolConfig::default_stripe(layout),
            };
            match Store::open(self.storage.key.clone(), cfg).await {
                Ok(store) => {
                    let repair = store.spawn_repair(REPAIR_EVERY);
                    self.storage.pools.insert(store);
                    self.storage
                        .open
                        .lock()
                        .unwrap()
                        .insert(rec.name.clone(), PoolState::Open(repair));
                    self.event(
                        &rec.name,
                        "storage",
                        format!("pool {} ({layout}) open", rec.name),
                    );
                }
                Err(e) => self.pool_waits(&rec.name, format!("cannot open yet: {e}")),
            }
        }
        let mut open = self.storage.open.lock().unwrap();
        open.retain(|name, state| {
            let keep = seen.contains(name);
            if !keep {
                if let PoolState::Open(task) = state {
                    task.abort();
                }
                self.storage.pools.remove(name);
            }
            keep
        });
        Ok(())
    }

    fn pool_waits(&self, name: &str, why: String) {
        self.storage
            .open
            .lock()
            .unwrap()
            .insert(name.to_string(), PoolState::Waiting(why));
    }

    pub fn storage_pools(&self) -> Vec<PoolView> {
        let open = self.storage.open.lock().unwrap();
        let mut out: Vec<PoolView> = open
            .iter()
            .map(|(name, state)| {
                let store = self.storage.pools.get(name);
                PoolView {
                    name: name.clone(),
                    shards: store
                        .as_ref()
                        .map(|s| s.layout().to_string())
                        .unwrap_or_default(),
                    waiting: match state {
                        PoolState::Waiting(w) => Some(w.clone()),
                        PoolState::Open(_) => None,
                    },
                    status: store.map(|s| s.status()),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn storage_credentials(&self) -> Credentials {
        let (access_key, secret_key) = self.storage.key.credentials();
        Credentials {
            endpoint: self
                .storage
                .endpoint
                .get()
                .cloned()
                .unwrap_or_else(|| "(S3 is not served: start the bot with --s3-listen)".into()),
            access_key,
            secret_key,
        }
    }
}
