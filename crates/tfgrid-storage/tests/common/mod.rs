//! Real zdb servers on loopback for the storage tests (each on a runtime of its own, so a test
//! can take one down as a node dying takes its zdb down).
#![allow(dead_code)]

use std::net::SocketAddr;
use tfgrid_storage::{Layout, PoolConfig, SlotAddr, StorageKey};
use tfgrid_zdb::{Config, Mode, Server, StoreOptions};

pub struct Zdb {
    pub addr: SocketAddr,
    pub rt: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Zdb {
    pub fn start() -> Zdb {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::open(Config {
            data: dir.path().to_path_buf(),
            admin_password: Some("admin".into()),
            mode: Mode::User,
            store: StoreOptions::default(),
        })
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = server.serve(listener).await;
        });
        Zdb {
            addr,
            rt: Some(rt),
            _dir: dir,
        }
    }

    /// A namespace with a password, made as a node's zdb workload makes it.
    pub fn namespace(&self, name: &str, password: &str) -> SlotAddr {
        let mut c = redis::Client::open(format!("redis://{}/", self.addr))
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("AUTH").arg("admin").query::<()>(&mut c).unwrap();
        redis::cmd("NSNEW").arg(name).query::<()>(&mut c).unwrap();
        redis::cmd("NSSET")
            .arg(name)
            .arg("password")
            .arg(password)
            .query::<()>(&mut c)
            .unwrap();
        SlotAddr {
            endpoint: self.addr.to_string(),
            namespace: name.into(),
            password: password.into(),
        }
    }

    /// The zdb stops answering, its port closed: a node gone.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    pub fn conn(&self, slot: &SlotAddr) -> redis::Connection {
        let mut c = redis::Client::open(format!("redis://{}/", self.addr))
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("SELECT")
            .arg(&slot.namespace)
            .arg(&slot.password)
            .query::<()>(&mut c)
            .unwrap();
        c
    }
}

impl Drop for Zdb {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Pool {
    pub zdbs: Vec<Zdb>,
    pub cfg: PoolConfig,
    pub key: StorageKey,
}

pub fn pool(k: u8, m: u8, stripe: usize) -> Pool {
    let key = StorageKey::from_seed(&[42; 32]);
    let layout = Layout::new(k, m).unwrap();
    let zdbs: Vec<Zdb> = (0..layout.n()).map(|_| Zdb::start()).collect();
    let password = key.zdb_password("p");
    let slots = zdbs
        .iter()
        .enumerate()
        .map(|(i, z)| z.namespace(&format!("p-{i}"), &password))
        .collect();
    Pool {
        zdbs,
        cfg: PoolConfig {
            name: "p".into(),
            layout,
            slots,
            stripe_size: stripe,
        },
        key,
    }
}

/// Every key of the namespace `c` has selected, by 0-db's SCAN (it ends with "No more data").
pub fn keys(c: &mut redis::Connection) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let mut cmd = redis::cmd("SCAN");
        if let Some(c) = &cursor {
            cmd.arg(c);
        }
        match cmd.query::<(Vec<u8>, Vec<(Vec<u8>, u64, u64)>)>(c) {
            Ok((next, batch)) => {
                out.extend(batch.into_iter().map(|(k, _, _)| k));
                cursor = Some(next);
            }
            Err(_) => return out,
        }
    }
}
