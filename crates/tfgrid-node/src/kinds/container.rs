//! Containers: an OCI image's layers under an overlay rootfs, run by an OCI runtime from Debian
//! (runc by default; crun 1.8 refuses hosts with cgroup v1 and v2 controllers mixed) from a
//! config built with oci-spec: pid, mount, ipc, uts and net namespaces, cgroup
//! limits for cpu and memory, the node bridge for networking, stdout/stderr into a bounded log.
//! A supervisor task per container restarts it with backoff when it exits.

use super::{
    is_mounted, read_tail, run, trim_log, Ctx, Kind, Output, Report, Reporter, WorkloadId,
};
use crate::images::{Image, Images};
use crate::net::Net;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec,
};
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_core::deployment::{ContainerSpec, ResultState, WorkloadData};

/// Restarts in a row (each run shorter than [`STABLE`]) before the container is left in error.
const MAX_RESTARTS: u32 = 5;
/// A run this long resets the restart count.
const STABLE: Duration = Duration::from_secs(10);
const CPU_PERIOD: u64 = 100_000;

pub struct Container {
    runtime: Runtime,
    dir: PathBuf,
    volumes: PathBuf,
    images: Arc<Images>,
    net: Net,
    networks: Option<crate::networks::Networks>,
    reporter: Reporter,
    log_limit: u64,
    supervisors: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Other kinds' workload directories whose addresses come from the same bridges (VMs).
    peer_dirs: Vec<PathBuf>,
}

#[derive(PartialEq)]
enum RunState {
    Running,
    Stopped,
    Missing,
}

/// The OCI runtime binary (runc or crun), driven through its standard command line with its
/// state under `root`. The container kind and each supervisor hold one.
#[derive(Clone)]
struct Runtime {
    bin: String,
    root: PathBuf,
}

impl Runtime {
    async fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let root = self.root.to_string_lossy().into_owned();
        let mut all = vec!["--root", root.as_str()];
        all.extend_from_slice(args);
        run(&self.bin, &all).await
    }

    async fn state(&self, key: &str) -> RunState {
        match self.cmd(&["state", key]).await {
            Err(_) => RunState::Missing,
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
                match (v["status"].as_str(), v["pid"].as_i64()) {
                    (Some("running"), Some(pid)) if pid > 0 => RunState::Running,
                    _ => RunState::Stopped,
                }
            }
        }
    }

    /// Starts the bundle in `cdir` detached, its stdout and stderr appended to `cdir/log`. A
    /// start that fails is deleted, and the log's last line says why.
    async fn start(&self, cdir: &Path, key: &str) -> Result<(), String> {
        let log_path = cdir.join("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening the log: {e}"))?;
        let out = tokio::process::Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["run", "--detach", "--bundle"])
            .arg(cdir)
            .arg(key)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .status()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.bin))?;
        if !out.success() {
            let tail = read_tail(&log_path, Some(400));
            let _ = self.cmd(&["delete", "--force", key]).await;
            return Err(format!(
                "{} could not start the container: {}",
                self.bin,
                tail.lines().last().unwrap_or("no output").trim()
            ));
        }
        Ok(())
    }
}

impl Container {
    pub fn new(
        runtime: String,
        dir: PathBuf,
        runtime_root: PathBuf,
        volumes: PathBuf,
        images: Arc<Images>,
        net: Net,
        reporter: Reporter,
    ) -> Self {
        Self {
            runtime: Runtime {
                bin: runtime,
                root: runtime_root,
            },
            dir,
            volumes,
            images,
            net,
            networks: None,
            reporter,
            log_limit: 1 << 20,
            supervisors: Mutex::new(HashMap::new()),
            peer_dirs: Vec::new(),
        }
    }

    /// Addresses held by workloads under `dir` (VMs) are not given to containers.
    pub fn with_peer_dir(mut self, dir: PathBuf) -> Self {
        self.peer_dirs.push(dir);
        self
    }

    /// Containers may join the users' private networks (a node on the overlay).
    pub fn with_networks(mut self, networks: Option<crate::networks::Networks>) -> Self {
        self.networks = networks;
        self
    }

    pub fn images(&self) -> &Images {
        &self.images
    }

    fn cdir(&self, id: &WorkloadId) -> PathBuf {
        self.dir.join(id.key())
    }

    /// The bounded log's last `tail` bytes (all of it by default).
    pub fn logs(&self, id: &WorkloadId, tail: Option<u64>) -> String {
        read_tail(&self.cdir(id).join("log"), tail)
    }

    fn allocate_ip(&self, net: &Net) -> Result<Ipv4Addr, String> {
        let mut dirs = vec![self.dir.clone()];
        dirs.extend(self.peer_dirs.iter().cloned());
        allocate_ip(&dirs, net)
    }

    fn config(&self, id: &WorkloadId, spec: &ContainerSpec, image: &Image) -> Result<Spec, String> {
        let (entrypoint, cmd) = match &spec.entrypoint {
            // As docker run --entrypoint: a new entrypoint drops the image's cmd.
            Some(ep) => (ep.clone(), spec.cmd.clone().unwrap_or_default()),
            None => (
                image.config.entrypoint.clone(),
                spec.cmd.clone().unwrap_or_else(|| image.config.cmd.clone()),
            ),
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(format!(
                "image {} has no entrypoint or cmd; give one in the workload",
                spec.image
            ));
        }
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        for kv in &image.config.env {
            if let Some((k, v)) = kv.split_once('=') {
                env.insert(k.into(), v.into());
            }
        }
        env.extend(spec.env.clone());
        let e = |e: oci_spec::OciSpecError| format!("building the OCI config: {e}");
        let cwd = if image.config.workdir.is_empty() {
            "/".to_string()
        } else {
            image.config.workdir.clone()
        };
        let process = ProcessBuilder::default()
            .terminal(false)
            .args(args)
            .env(
                env.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>(),
            )
            .cwd(cwd)
            .no_new_privileges(true)
            .build()
            .map_err(e)?;
        let mut namespaces: Vec<LinuxNamespace> = oci_spec::runtime::get_default_namespaces()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        let mut netns = LinuxNamespace::default();
        netns.set_typ(LinuxNamespaceType::Network);
        netns.set_path(Some(self.net.netns_path(&id.key())));
        namespaces.push(netns);
        let resources = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(spec.memory as i64)
                    // No swap beyond the limit: memory.memsw would let it spill to swap instead.
                    .swappiness(0u64)
                    .build()
                    .map_err(e)?,
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(spec.cpu as i64 * CPU_PERIOD as i64)
                    .period(CPU_PERIOD)
                    .build()
                    .map_err(e)?,
            )
            .pids(LinuxPidsBuilder::default().limit(4096).build().map_err(e)?)
            .build()
            .map_err(e)?;
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(resources)
            .cgroups_path(PathBuf::from(self.net.cgroup(&id.key())))
            .build()
            .map_err(e)?;
        let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
        if let (Some(id), Some(n)) = (spec.network, &self.networks) {
            // The network's service names, kept current by the node.
            mounts.push(
                MountBuilder::default()
                    .destination("/etc/hosts")
                    .typ("bind")
                    .source(n.hosts_file(id))
                    .options(vec!["bind".to_string(), "ro".to_string()])
                    .build()
                    .map_err(e)?,
            );
        }
        for m in &spec.mounts {
            let src = self
                .volumes
                .join(WorkloadId::new(id.contract, &m.volume).key());
            mounts.push(
                MountBuilder::default()
                    .destination(&m.path)
                    .typ("bind")
                    .source(src)
                    .options(vec!["rbind".to_string(), "rw".to_string()])
                    .build()
                    .map_err(e)?,
            );
        }
        let mut s = Spec::default();
        s.set_hostname(Some(id.name.replace('_', "-")));
        s.set_process(Some(process));
        s.set_root(Some(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(e)?,
        ));
        s.set_linux(Some(linux));
        s.set_mounts(Some(mounts));
        Ok(s)
    }

    async fn mount_rootfs(&self, id: &WorkloadId, image: &Image, size: u64) -> Result<(), String> {
        mount_overlay(
            &self.cdir(id),
            image,
            size,
            &format!("the rootfs of {}", id.key()),
        )
        .await
    }

    fn supervise(&self, id: WorkloadId, memory: u64) {
        let key = id.key();
        let sup = Supervisor {
            runtime: self.runtime.clone(),
            id: id.clone(),
            cdir: self.cdir(&id),
            reporter: self.reporter.clone(),
            log_limit: self.log_limit,
            memory,
            cgroup: self.net.cgroup(&id.key()),
        };
        let task = tokio::spawn(sup.run());
        if let Some(old) = self
            .supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, task)
        {
            old.abort();
        }
    }

    async fn make(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        let WorkloadData::Container(spec) = &ctx.workload.data else {
            return Err("not a container workload".into());
        };
        let id = &ctx.id;
        let image = self.images.ensure(&spec.image).await?;
        let c = self.cdir(id);
        std::fs::create_dir_all(&c).map_err(|e| format!("{}: {e}", c.display()))?;
        let bridge = match spec.network {
            None => self.net.clone(),
            Some(nid) => {
                let n = self.networks.as_ref().ok_or_else(|| {
                    "this node is not on the grid overlay, so it takes no network workloads"
                        .to_string()
                })?;
                // Written first: a failed start that is cleaned up leaves the network too.
                std::fs::write(c.join("network"), nid.to_string()).map_err(|e| e.to_string())?;
                n.join(ctx.deployment.twin_id, nid, &id.key()).await?
            }
        };
        let ip = match std::fs::read_to_string(c.join("ip"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(ip) if bridge.contains(ip) => ip,
            _ => {
                let ip = self.allocate_ip(&bridge)?;
                std::fs::write(c.join("ip"), ip.to_string()).map_err(|e| e.to_string())?;
                ip
            }
        };
        let config = self.config(id, spec, &image)?;
        config
            .save(c.join("config.json"))
            .map_err(|e| format!("writing config.json: {e}"))?;
        self.mount_rootfs(id, &image, spec.rootfs_size).await?;
        let key = id.key();
        match self.runtime.state(&key).await {
            RunState::Running => {}
            state => {
                if matches!(state, RunState::Stopped) {
                    let _ = self.runtime.cmd(&["delete", "--force", &key]).await;
                }
                if !self.net.attached(&key) {
                    self.net.attach_via(&key, ip, &bridge).await?;
                }
                self.runtime.start(&self.cdir(id), &key).await?;
            }
        }
        self.supervise(id.clone(), spec.memory);
        Ok([
            ("ip".to_string(), ip.to_string()),
            ("image_digest".to_string(), image.digest),
        ]
        .into())
    }

    async fn remove(&self, id: &WorkloadId) -> Result<(), String> {
        let key = id.key();
        if let Some(t) = self
            .supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
        {
            t.abort();
        }
        let st = self.runtime.state(&key).await;
        tracing::debug!(workload = %key, missing = matches!(st, RunState::Missing), mounted = is_mounted(&self.cdir(id).join("rootfs")), "removing");
        if !matches!(st, RunState::Missing) {
            let _ = self.runtime.cmd(&["kill", &key, "KILL"]).await;
            self.runtime.cmd(&["delete", "--force", &key]).await?;
        }
        let c = self.cdir(id);
        unmount_overlay(&c)?;
        self.net.detach(&key).await?;
        let network = std::fs::read_to_string(c.join("network"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let (Some(nid), Some(n)) = (network, &self.networks) {
            n.leave(nid, &key).await;
        }
        match std::fs::remove_dir_all(&c) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {}: {e}", c.display())),
        }
    }
}

impl Kind for Container {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        match self.make(ctx).await {
            Ok(o) => Ok(o),
            Err(e) => {
                if let Err(e2) = self.remove(&ctx.id).await {
                    tracing::warn!(workload = %ctx.id.key(), "cleaning up after a failed start: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        self.remove(id).await
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        match self.runtime.state(&id.key()).await {
            RunState::Running => (ResultState::Ok, String::new()),
            RunState::Stopped => (ResultState::Error, "container is not running".into()),
            RunState::Missing => (ResultState::Error, "container does not exist".into()),
        }
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        // make() adopts a running container (it only (re)starts what is not running), so a
        // restarted agent never runs a second copy.
        self.make(ctx).await
    }
}

/// The overlay rootfs at `dir/rootfs`: the image's layers under a writable layer. With a `size`,
/// the writable layer lives on an ext4 image of that size (sparse, on a loop device, at
/// `dir/rw`), so the workload's writes stop there instead of filling the node's disk.
pub(crate) async fn mount_overlay(
    c: &Path,
    image: &Image,
    size: u64,
    what: &str,
) -> Result<(), String> {
    let rootfs = c.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    if is_mounted(&rootfs) {
        return Ok(());
    }
    let rw = if size > 0 {
        let (img, dir) = (c.join("rw.img"), c.join("rw"));
        if !img.exists() {
            crate::capacity::check_room(c, size, what)?;
            let f = std::fs::File::create(&img).map_err(|e| format!("{}: {e}", img.display()))?;
            f.set_len(size)
                .map_err(|e| format!("{}: {e}", img.display()))?;
            drop(f);
            run("mkfs.ext4", &["-q", "-F", &img.to_string_lossy()]).await?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !is_mounted(&dir) {
            run(
                "mount",
                &["-o", "loop", &img.to_string_lossy(), &dir.to_string_lossy()],
            )
            .await?;
        }
        dir
    } else {
        c.to_path_buf()
    };
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let lower: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting the overlay rootfs: {e}"))
}

/// Unmounts the rootfs, then the sized writable layer under it (if any).
pub(crate) fn unmount_overlay(c: &Path) -> Result<(), String> {
    for m in [c.join("rootfs"), c.join("rw")] {
        if is_mounted(&m) {
            nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("unmounting {}: {e}", m.display()))?;
        }
    }
    Ok(())
}

/// The lowest address of `net`'s subnet that no workload directory under `dirs` holds (each
/// keeps its address in `<dir>/<key>/ip`): containers and VMs share the bridge's subnet.
pub(crate) fn allocate_ip(dirs: &[PathBuf], net: &Net) -> Result<Ipv4Addr, String> {
    let mut used = std::collections::HashSet::new();
    for dir in dirs {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("ip")) {
                    if let Ok(ip) = s.trim().parse::<Ipv4Addr>() {
                        used.insert(ip);
                    }
                }
            }
        }
    }
    net.hosts()
        .find(|ip| !used.contains(ip))
        .ok_or_else(|| format!("the subnet of bridge {} is full", net.bridge))
}

/// Watches one container: on exit it records why (out of memory, or exited), and restarts it
/// with exponential backoff; too many quick deaths in a row leave it in error.
struct Supervisor {
    runtime: Runtime,
    id: WorkloadId,
    cdir: PathBuf,
    reporter: Reporter,
    log_limit: u64,
    memory: u64,
    cgroup: String,
}

impl Supervisor {
    fn report(&self, state: ResultState, message: String) {
        let _ = self.reporter.send(Report {
            id: self.id.clone(),
            state,
            message,
        });
    }

    fn oom_kills(&self) -> u64 {
        let v1 = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory{}/memory.oom_control",
            self.cgroup
        ))
        .unwrap_or_default();
        let v2 = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.events", self.cgroup))
            .unwrap_or_default();
        v1.lines()
            .chain(v2.lines())
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn trim_log(&self) {
        // The container appends (O_APPEND): see `trim_log`.
        trim_log(&self.cdir.join("log"), self.log_limit);
    }

    async fn run(self) {
        let key = self.id.key();
        let mut started = Instant::now();
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.trim_log();
            if self.runtime.state(&key).await == RunState::Running {
                if failures > 0 && started.elapsed() > STABLE {
                    failures = 0;
                }
                continue;
            }
            let reason = if self.oom_kills() > 0 {
                format!(
                    "killed: out of memory (limit {})",
                    tfgrid_core::capacity::human_bytes(self.memory)
                )
            } else {
                "the container's process exited".to_string()
            };
            let _ = self.runtime.cmd(&["delete", "--force", &key]).await;
            failures += 1;
            if failures > MAX_RESTARTS {
                self.report(
                    ResultState::Error,
                    format!("{reason}; gave up after {MAX_RESTARTS} restarts"),
                );
                return;
            }
            let backoff = Duration::from_millis(500 * (1 << (failures - 1).min(6)));
            tracing::warn!(workload = %key, "{reason}; restarting in {backoff:?}");
            self.report(
                ResultState::Error,
                format!("{reason}; restart {failures} in {backoff:?}"),
            );
            tokio::time::sleep(backoff).await;
            let ok = self.runtime.start(&self.cdir, &key).await.is_ok();
            started = Instant::now();
            if ok {
                self.report(
                    ResultState::Ok,
                    format!("restarted after: {reason} (restart {failures})"),
                );
            }
        }
    }
}
