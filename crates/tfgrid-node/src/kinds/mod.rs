//! One module per workload kind, each behind [`Kind`]: the engine decides what must exist, a kind
//! knows how to make it exist on this host, take it away, look at it and pick it up after a restart.

pub mod backends;
pub mod container;
pub mod gateway;
pub mod health;
pub mod proxy;
pub mod simulated;
pub mod vm;
pub mod volume;
pub mod zdb;

use std::collections::BTreeMap;
use std::future::Future;
use tfgrid_core::deployment::{Deployment, ResultState, Workload};
use tfgrid_core::ContractId;

/// A workload's identity on this node; `key()` names everything made for it (files, cgroups,
/// links, namespaces), so deleting by key finds it all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    pub contract: ContractId,
    pub name: String,
}

impl WorkloadId {
    pub fn new(contract: ContractId, name: &str) -> Self {
        Self {
            contract,
            name: name.to_string(),
        }
    }

    pub fn key(&self) -> String {
        format!("c{}-{}", self.contract, self.name)
    }
}

/// Kind-specific output a result carries: addresses, endpoints, URLs.
pub type Output = BTreeMap<String, String>;

pub struct Ctx<'a> {
    pub id: WorkloadId,
    pub deployment: &'a Deployment,
    pub workload: &'a Workload,
}

/// A state change a kind notices on its own (a container exited, was OOM-killed, came back).
#[derive(Debug, Clone)]
pub struct Report {
    pub id: WorkloadId,
    pub state: ResultState,
    pub message: String,
}

pub type Reporter = tokio::sync::mpsc::UnboundedSender<Report>;

pub trait Kind: Send + Sync {
    /// Makes the workload exist. An error leaves nothing behind.
    fn provision(&self, ctx: &Ctx<'_>) -> impl Future<Output = Result<Output, String>> + Send;
    /// Removes everything `provision` made; succeeds when there is nothing left to remove.
    fn deprovision(&self, id: &WorkloadId) -> impl Future<Output = Result<(), String>> + Send;
    /// The workload's state as the host shows it now.
    fn inspect(&self, id: &WorkloadId) -> impl Future<Output = (ResultState, String)> + Send;
    /// After an agent restart: adopt what still runs, remake what is gone.
    fn recover(&self, ctx: &Ctx<'_>) -> impl Future<Output = Result<Output, String>> + Send;
    /// The workload's spec changed in a deployment update. By default it is remade; kinds that
    /// can change in place (keeping data) say so.
    fn update(&self, ctx: &Ctx<'_>) -> impl Future<Output = Result<Output, String>> + Send {
        async move {
            self.deprovision(&ctx.id).await?;
            self.provision(ctx).await
        }
    }
}

/// Runs an external tool (mkfs, mount, crun, ip) and turns a failure into its stderr.
pub(crate) async fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// True when `path` is a mount point in this mount namespace.
pub(crate) fn is_mounted(path: &std::path::Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_ref()))
}

/// A bounded log's last `tail` bytes (all of it by default); empty when it cannot be read.
pub(crate) fn read_tail(path: &std::path::Path, tail: Option<u64>) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = tail.map(|t| len.saturating_sub(t)).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Keeps a log its writer appends to (O_APPEND) under `limit`: past it, the file is truncated
/// and its newest half written back, which keeps the writer's descriptor valid; lines written in
/// between are lost, which a bounded log allows.
pub(crate) fn trim_log(path: &std::path::Path, limit: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
        return;
    };
    if len <= limit {
        return;
    }
    let keep = limit / 2;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len - keep)).is_ok() && f.read_to_end(&mut tail).is_ok() {
        let _ = f.set_len(0);
        let _ = f.write_all(&tail);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bounded_log_keeps_its_newest_half_and_its_writer() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let text: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        w.write_all(text.as_bytes()).unwrap();
        super::trim_log(&path, 10_000);
        assert_eq!(
            super::read_tail(&path, None),
            text,
            "under the limit: untouched"
        );
        super::trim_log(&path, 400);
        let kept = super::read_tail(&path, None);
        assert_eq!(kept.len(), 200);
        assert!(kept.ends_with("line 099\n"), "{kept}");
        // The writer's descriptor still appends at the new end.
        w.write_all(b"after\n").unwrap();
        assert_eq!(super::read_tail(&path, Some(6)), "after\n");
        assert_eq!(super::read_tail(&dir.path().join("none"), None), "");
    }
}
