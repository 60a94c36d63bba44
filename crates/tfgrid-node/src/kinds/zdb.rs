//! zdb workloads: a namespace on the node's own 0-db server, made through its admin commands
//! (NSNEW, NSSET) like any 0-db client would.

use super::{Ctx, Kind, Output, WorkloadId};
use std::net::SocketAddr;
use tfgrid_core::deployment::{ResultState, WorkloadData, ZdbMode};

pub struct Zdb {
    /// Where the node itself reaches its zdb.
    endpoint: SocketAddr,
    /// Where users reach it (the workload's `endpoint`): the same, or the address a router
    /// forwards to it.
    public: SocketAddr,
    admin_password: String,
}

impl Zdb {
    pub fn new(endpoint: SocketAddr, public: Option<SocketAddr>, admin_password: String) -> Self {
        Self {
            endpoint,
            public: public.unwrap_or(endpoint),
            admin_password,
        }
    }

    async fn admin(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let client = redis::Client::open(format!("redis://{}/", self.endpoint))
            .map_err(|e| format!("zdb at {}: {e}", self.endpoint))?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("zdb at {}: {e}", self.endpoint))?;
        let _: () = redis::cmd("AUTH")
            .arg(&self.admin_password)
            .query_async(&mut c)
            .await
            .map_err(|e| format!("zdb admin login: {e}"))?;
        Ok(c)
    }

    fn namespace(id: &WorkloadId) -> String {
        id.key()
    }

    async fn make(&self, ctx: &Ctx<'_>, must_be_new: bool) -> Result<Output, String> {
        let WorkloadData::Zdb(spec) = &ctx.workload.data else {
            return Err("not a zdb workload".into());
        };
        let ns = Self::namespace(&ctx.id);
        let mut c = self.admin().await?;
        let created: Result<(), redis::RedisError> =
            redis::cmd("NSNEW").arg(&ns).query_async(&mut c).await;
        if let Err(e) = created {
            // 0-db answers "This namespace is not available" for a name in use.
            let exists = e.to_string().contains("not available");
            if must_be_new || !exists {
                return Err(format!("creating namespace {ns}: {e}"));
            }
        }
        let mode = match spec.mode {
            ZdbMode::User => "user",
            ZdbMode::Seq => "seq",
        };
        let password = if spec.password.is_empty() {
            "*"
        } else {
            spec.password.as_str()
        };
        let settings = [
            ("maxsize", spec.size.to_string()),
            ("password", password.to_string()),
            ("public", if spec.public { "1" } else { "0" }.to_string()),
            ("mode", mode.to_string()),
        ];
        for (k, v) in settings {
            let r: Result<(), _> = redis::cmd("NSSET")
                .arg(&ns)
                .arg(k)
                .arg(&v)
                .query_async(&mut c)
                .await;
            if let Err(e) = r {
                let _: Result<(), _> = redis::cmd("NSDEL").arg(&ns).query_async(&mut c).await;
                return Err(format!("setting {k} on namespace {ns}: {e}"));
            }
        }
        Ok([
            ("endpoint".to_string(), self.public.to_string()),
            ("namespace".to_string(), ns),
        ]
        .into())
    }
}

impl Kind for Zdb {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx, true).await
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        let ns = Self::namespace(id);
        let mut c = self.admin().await?;
        match redis::cmd("NSDEL").arg(&ns).query_async::<()>(&mut c).await {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("doesn't exist") => Ok(()),
            Err(e) => Err(format!("deleting namespace {ns}: {e}")),
        }
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        let ns = Self::namespace(id);
        let mut c = match self.admin().await {
            Ok(c) => c,
            Err(e) => return (ResultState::Error, e),
        };
        match redis::cmd("NSINFO")
            .arg(&ns)
            .query_async::<String>(&mut c)
            .await
        {
            Ok(_) => (ResultState::Ok, String::new()),
            Err(e) => (ResultState::Error, format!("namespace {ns}: {e}")),
        }
    }

    /// Size, password, mode and public change in place: the namespace keeps its data.
    async fn update(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx, false).await
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        // The namespace lives in the zdb data directory and survives the agent; re-applying the
        // settings is idempotent and repairs a namespace whose NSSET was cut short by a crash.
        self.make(ctx, false).await
    }
}
