//! Typed client for the registry's HTTP API, used by nodes, bots and the CLI.

use serde::de::DeserializeOwned;
use std::time::Duration;
use tfgrid_core::contract::Contract;
use tfgrid_core::filter::{ContractFilter, NodeFilter};
use tfgrid_core::network::Network;
use tfgrid_core::records::{Account, ErrorBody, Farm, NodeView, RegistryConfig, Stats, Twin};
use tfgrid_core::tx::{Call, Receipt, SignedTx, BINARY_CONTENT_TYPE};
use tfgrid_core::{ContractId, FarmId, Identity, NodeId, PublicKey, TwinId};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    /// The registry answered with an error: `code` is its stable kind (nonce, capacity, ...).
    #[error("registry refused ({status} {code}): {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    #[error("registry at {url} unreachable: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Rejected { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// One page of a node search; `count` is every match when `ret_count` was asked for.
#[derive(Debug, Clone)]
pub struct NodePage {
    pub nodes: Vec<NodeView>,
    pub count: Option<u64>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchResult {
    Ok(Receipt),
    Err(ErrorBody),
}

#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

impl RegistryClient {
    pub fn new(base_url: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()
            .expect("an HTTP client with default TLS settings");
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn finish<T: DeserializeOwned>(
        &self,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<(T, reqwest::header::HeaderMap)> {
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.into(),
                source,
            })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => ClientError::Rejected {
                    status: status.as_u16(),
                    code: e.error,
                    message: e.message,
                },
                Err(_) => ClientError::Rejected {
                    status: status.as_u16(),
                    code: "http".into(),
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            });
        }
        let v = serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url: url.into(),
            reason: e.to_string(),
        })?;
        Ok((v, headers))
    }

    /// Sends one request and decodes its answer (or its error body).
    async fn send<T: DeserializeOwned>(
        &self,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(T, reqwest::header::HeaderMap)> {
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            url: url.into(),
            source,
        })?;
        self.finish(url, resp).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        Ok(self.send(&url, self.http.get(&url)).await?.0)
    }

    pub async fn submit(&self, stx: &SignedTx) -> Result<Receipt> {
        let url = format!("{}/tx", self.base);
        Ok(self.send(&url, self.http.post(&url).json(stx)).await?.0)
    }

    /// Same as [`submit`](Self::submit) with the canonical binary body: smaller and cheaper to parse.
    pub async fn submit_binary(&self, stx: &SignedTx) -> Result<Receipt> {
        let url = format!("{}/tx", self.base);
        let req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, BINARY_CONTENT_TYPE)
            .body(stx.to_bytes());
        Ok(self.send(&url, req).await?.0)
    }

    pub async fn submit_batch(&self, txs: &[SignedTx]) -> Result<Vec<BatchResult>> {
        let url = format!("{}/txs", self.base);
        Ok(self.send(&url, self.http.post(&url).json(txs)).await?.0)
    }

    pub async fn health(&self) -> Result<()> {
        let url = format!("{}/health", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(ClientError::Rejected {
                status: resp.status().as_u16(),
                code: "http".into(),
                message: "unhealthy".into(),
            })
        }
    }

    pub async fn config(&self) -> Result<RegistryConfig> {
        self.get("/config").await
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.get("/stats").await
    }

    pub async fn account(&self, key: &PublicKey) -> Result<Account> {
        self.get(&format!("/accounts/{key}")).await
    }

    pub async fn twin(&self, id: TwinId) -> Result<Twin> {
        self.get(&format!("/twins/{id}")).await
    }

    pub async fn twin_by_key(&self, key: &PublicKey) -> Result<Option<Twin>> {
        let v: Vec<Twin> = self.get(&format!("/twins?public_key={key}")).await?;
        Ok(v.into_iter().next())
    }

    pub async fn farm(&self, id: FarmId) -> Result<Farm> {
        self.get(&format!("/farms/{id}")).await
    }

    pub async fn farms_of(&self, twin: TwinId) -> Result<Vec<Farm>> {
        self.get(&format!("/farms?twin_id={twin}")).await
    }

    pub async fn farm_by_name(&self, name: &str) -> Result<Option<Farm>> {
        let url = format!("{}/farms", self.base);
        let v: Vec<Farm> = self
            .send(&url, self.http.get(&url).query(&[("name", name)]))
            .await?
            .0;
        Ok(v.into_iter().next())
    }

    pub async fn nodes(&self, f: &NodeFilter) -> Result<NodePage> {
        let url = format!("{}/nodes?{}", self.base, f.to_query());
        let (nodes, headers) = self.send(&url, self.http.get(&url)).await?;
        let count = headers
            .get("count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(NodePage { nodes, count })
    }

    /// The address the registry sees this client's requests come from.
    pub async fn whoami(&self) -> Result<std::net::IpAddr> {
        Ok(self
            .get::<tfgrid_core::records::WhoAmI>("/whoami")
            .await?
            .ip)
    }

    pub async fn node(&self, id: NodeId) -> Result<NodeView> {
        self.get(&format!("/nodes/{id}")).await
    }

    pub async fn contracts(&self, f: &ContractFilter) -> Result<Vec<Contract>> {
        self.get(&format!("/contracts?{}", f.to_query())).await
    }

    pub async fn contract(&self, id: ContractId) -> Result<Contract> {
        self.get(&format!("/contracts/{id}")).await
    }

    pub async fn network(&self, id: tfgrid_core::network::NetworkId) -> Result<Network> {
        self.get(&format!("/networks/{id}")).await
    }

    pub async fn network_by_name(&self, twin: TwinId, name: &str) -> Result<Option<Network>> {
        let url = format!("{}/networks", self.base);
        let q = [("twin_id", twin.to_string()), ("name", name.to_string())];
        let v: Vec<Network> = self.send(&url, self.http.get(&url).query(&q)).await?.0;
        Ok(v.into_iter().next())
    }

    pub async fn networks_of(&self, twin: TwinId, page: u32) -> Result<Vec<Network>> {
        self.get(&format!("/networks?twin_id={twin}&size=1000&page={page}"))
            .await
    }

    /// The networks `node` has a subnet in or is an access point of (first 1000).
    pub async fn networks_on(&self, node: NodeId) -> Result<Vec<Network>> {
        self.get(&format!("/networks?node_id={node}&size=1000"))
            .await
    }
}

/// Signs calls as one identity and keeps its nonce: the last nonce is read from the registry once,
/// then counted locally. Calls through one signer are sent one at a time so nonces arrive in order:
/// the nonce lock is held across the request on purpose (a second call cannot be signed before the
/// first one's nonce is known to be used), and the client's timeouts bound how long that is.
pub struct TwinSigner {
    id: Identity,
    client: RegistryClient,
    last_nonce: tokio::sync::Mutex<Option<u64>>,
}

impl TwinSigner {
    pub fn new(id: Identity, client: RegistryClient) -> Self {
        Self {
            id,
            client,
            last_nonce: tokio::sync::Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.id
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    pub async fn submit(&self, call: Call) -> Result<Receipt> {
        let mut last = self.last_nonce.lock().await;
        for attempt in 0..2 {
            let prev = match *last {
                Some(n) => n,
                None => self.client.account(&self.id.public_key()).await?.nonce,
            };
            let stx = SignedTx::new(&self.id, prev + 1, call.clone());
            match self.client.submit(&stx).await {
                Ok(r) => {
                    *last = Some(prev + 1);
                    return Ok(r);
                }
                // Someone else used this key meanwhile (another process, a restart): re-read once.
                Err(e) if e.code() == Some("nonce") && attempt == 0 => *last = None,
                Err(e) => {
                    // A refusal consumed no nonce; a transport error may or may not have committed.
                    if !matches!(e, ClientError::Rejected { .. }) {
                        *last = None;
                    }
                    return Err(e);
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The signer's twin id, creating the twin (with `relay`) when the key has none yet.
    pub async fn ensure_twin(&self, relay: &str) -> Result<TwinId> {
        if let Some(t) = self.client.account(&self.id.public_key()).await?.twin_id {
            return Ok(t);
        }
        match self
            .submit(Call::CreateTwin {
                relay: relay.into(),
                enc_key: None,
            })
            .await?
            .outcome
        {
            tfgrid_core::tx::Outcome::TwinCreated { twin_id } => Ok(twin_id),
            other => Err(ClientError::Decode {
                url: self.client.base.clone(),
                reason: format!("create_twin answered {other:?}"),
            }),
        }
    }
}
