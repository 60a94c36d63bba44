//! One zdb namespace of a pool, spoken to over the 0-db protocol (the redis crate, one
//! multiplexed connection, so concurrent requests are pipelined).

use crate::Error;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a slot's namespace is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAddr {
    /// `host:port` of the node's zdb.
    pub endpoint: String,
    pub namespace: String,
    pub password: String,
}

impl std::fmt::Display for SlotAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.endpoint, self.namespace)
    }
}

pub struct Slot {
    pub addr: SlotAddr,
    /// The connection in use; taken out on an error so the next call dials again. The lock is
    /// held only to clone or swap it, never across a request.
    conn: Mutex<Option<MultiplexedConnection>>,
}

/// 0-db's error as it sent it: the redis crate splits a server error into a code (its first
/// word) and the rest ("No space left" would read "No: space left").
fn server_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

impl Slot {
    pub fn new(addr: SlotAddr) -> Slot {
        Slot {
            addr,
            conn: Mutex::new(None),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Backend(format!("zdb {}: {e}", self.addr))
    }

    async fn conn(&self) -> Result<MultiplexedConnection, Error> {
        if let Some(c) = self.conn.lock().unwrap().clone() {
            return Ok(c);
        }
        let client = redis::Client::open(format!("redis://{}/", self.addr.endpoint))
            .map_err(|e| self.err(e))?;
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let mut c = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| self.err(e))?;
        let mut select = redis::cmd("SELECT");
        select.arg(&self.addr.namespace);
        if !self.addr.password.is_empty() {
            select.arg(&self.addr.password);
        }
        select
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(format!("select: {e}")))?;
        *self.conn.lock().unwrap() = Some(c.clone());
        Ok(c)
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        match self.run_once(cmd).await {
            // The namespace was deleted under this connection; it may exist again (made anew):
            // once more on a new connection, which selects it afresh.
            Err(Error::Backend(e)) if e.contains("namespace is not available") => {
                self.run_once(cmd).await
            }
            r => r,
        }
    }

    async fn run_once<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        let mut c = self.conn().await?;
        match cmd.query_async(&mut c).await {
            Ok(v) => Ok(v),
            Err(e) => {
                // A server error (a full namespace, a bad key) leaves the connection usable; a
                // broken or timed-out one is dialled again next time, and so is one whose
                // namespace was deleted under it (made again, it needs a new SELECT).
                let text = server_text(&e);
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || text.contains("namespace is not available")
                {
                    self.conn.lock().unwrap().take();
                }
                Err(self.err(text))
            }
        }
    }

    pub async fn set(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        // 0-db answers nil for a value it already holds: fine.
        self.run::<redis::Value>(redis::cmd("SET").arg(key).arg(value))
            .await
            .map(|_| ())
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        self.run::<Option<Vec<u8>>>(redis::cmd("GET").arg(key))
            .await
            .map(|v| v.map(Bytes::from))
    }

    pub async fn del(&self, key: &[u8]) -> Result<(), Error> {
        match self.run::<redis::Value>(redis::cmd("DEL").arg(key)).await {
            Ok(_) => Ok(()),
            // Deleting what is not there is done.
            Err(Error::Backend(e)) if e.contains("Key not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn exists(&self, key: &[u8]) -> Result<bool, Error> {
        self.run::<bool>(redis::cmd("EXISTS").arg(key)).await
    }

    pub async fn ping(&self) -> Result<(), Error> {
        self.run::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    /// Every key in the namespace, in 0-db's SCAN order.
    pub async fn keys(&self) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let mut cmd = redis::cmd("SCAN");
            if let Some(c) = &cursor {
                cmd.arg(c);
            }
            match self.run::<(Vec<u8>, Vec<(Vec<u8>, u64, u64)>)>(&cmd).await {
                Ok((next, batch)) => {
                    out.extend(batch.into_iter().map(|(k, _, _)| k));
                    cursor = Some(next);
                }
                // 0-db ends a scan with the error "No more data".
                Err(Error::Backend(e)) if e.ends_with("No more data") => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }
}
