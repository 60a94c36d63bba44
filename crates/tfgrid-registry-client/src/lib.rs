//! Typed client for the registry's HTTP API, used by nodes, bots and the CLI.
//!
//! A client takes several registry URLs (comma-separated): the validators of one registry. A
//! request goes to the one that answered last; when it cannot be reached it goes to the next. A
//! read moves on after any transport failure; a write only when the connection was never made,
//! since a write that timed out may have been committed (its nonce then refuses a resend).

use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
    bases: Arc<[String]>,
    /// The URL that answered last: requests start there.
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
}

impl RegistryClient {
    /// `base_urls`: one registry URL, or several separated by commas.
    pub fn new(base_urls: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()
            .expect("an HTTP client with default TLS settings");
        let mut bases: Vec<String> = base_urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if bases.is_empty() {
            bases.push(String::new());
        }
        Self {
            bases: bases.into(),
            current: Arc::default(),
            http,
        }
    }

    /// The URL requests go to first now (the one that answered last).
    pub fn base_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    pub fn base_urls(&self) -> &[String] {
        &self.bases
    }

    /// Sends `make(url)` for `path` to the registry URLs in turn, from the one that answered
    /// last, and decodes the first answer (or its error body).
    async fn call<T: DeserializeOwned>(
        &self,
        path: &str,
        read: bool,
        make: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<(T, reqwest::header::HeaderMap)> {
        let (url, resp) = self.answer(path, read, make).await?;
        self.finish(&url, resp).await
    }

    /// The first answer to `make(url)` from the registry URLs in turn, and the URL it came from.
    async fn answer(
        &self,
        path: &str,
        read: bool,
        make: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<(String, reqwest::Response)> {
        let n = self.bases.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut failed = None;
        for k in 0..n {
            let i = (start + k) % n;
            let url = format!("{}{path}", self.bases[i]);
            match make(&url).send().await {
                Ok(resp) => {
                    if k > 0 {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return Ok((url, resp));
                }
                Err(source) => {
                    let next = source.is_connect() || (read && !source.is_builder());
                    let e = ClientError::Transport { url, source };
                    if !next {
                        return Err(e);
                    }
                    failed = Some(e);
                }
            }
        }
        Err(failed.expect("at least one URL was tried"))
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

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.call(path, true, |url| self.http.get(url)).await?.0)
    }

    pub async fn submit(&self, stx: &SignedTx) -> Result<Receipt> {
        Ok(self
            .call("/tx", false, |url| self.http.post(url).json(stx))
            .await?
            .0)
    }

    /// Same as [`submit`](Self::submit) with the canonical binary body: smaller and cheaper to parse.
    pub async fn submit_binary(&self, stx: &SignedTx) -> Result<Receipt> {
        let body = stx.to_bytes();
        let r = self
            .call("/tx", false, |url| {
                self.http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, BINARY_CONTENT_TYPE)
                    .body(body.clone())
            })
            .await?;
        Ok(r.0)
    }

    pub async fn submit_batch(&self, txs: &[SignedTx]) -> Result<Vec<BatchResult>> {
        Ok(self
            .call("/txs", false, |url| self.http.post(url).json(txs))
            .await?
            .0)
    }

    /// A read passed through as it is (a proxy's): its status and body.
    pub async fn get_raw(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        let (url, resp) = self.answer(path, true, |url| self.http.get(url)).await?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        Ok((status, body.to_vec()))
    }

    pub async fn health(&self) -> Result<()> {
        let (_, resp) = self
            .answer("/health", true, |url| self.http.get(url))
            .await?;
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
        let q = [("name", name)];
        let v: Vec<Farm> = self
            .call("/farms", true, |url| self.http.get(url).query(&q))
            .await?
            .0;
        Ok(v.into_iter().next())
    }

    pub async fn nodes(&self, f: &NodeFilter) -> Result<NodePage> {
        let path = format!("/nodes?{}", f.to_query());
        let (nodes, headers) = self.call(&path, true, |url| self.http.get(url)).await?;
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
        let q = [("twin_id", twin.to_string()), ("name", name.to_string())];
        let v: Vec<Network> = self
            .call("/networks", true, |url| self.http.get(url).query(&q))
            .await?
            .0;
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
                url: self.client.base_url().to_string(),
                reason: format!("create_twin answered {other:?}"),
            }),
        }
    }
}
