//! Virtual machines, run by QEMU (Debian's qemu-system-x86): KVM where it boots the node's
//! kernel, TCG elsewhere. Two boot modes:
//! - image: an OCI image's rootfs (the same overlay a container gets) shared into a microvm
//!   over virtio-9p, booted with the node's kernel and initramfs (`boot`), the entrypoint run
//!   as a container's would be;
//! - disk: a qcow2 or raw disk image pulled as an OCI artifact, a copy-on-write qcow2 of it
//!   grown to the root disk size, booted by its own bootloader, configured by a cloud-init
//!   NoCloud seed (`seed`).
//!
//! Either way the VM sits on the node's bridge (or its private network's) through a tap, with
//! an address from the same pool as containers; volumes are virtio disks; the serial console is
//! the workload's log. QEMU runs daemonized, so an agent restart does not take VMs down; a
//! supervisor restarts a VM that stops, up to 4 times in 2 minutes (zos's rule for zmachines).
//! `args` builds QEMU's command lines, `process` runs and watches QEMU.

mod args;
pub mod boot;
mod process;
pub mod seed;

use super::container::{allocate_ip, mount_overlay, unmount_overlay};
use super::{is_mounted, read_tail, run, Ctx, Kind, Output, Reporter, WorkloadId};
use crate::images::Images;
use crate::net::Net;
use args::{disk_mode_args, image_mode_args, serial, start_script};
use boot::{Accel, Boot};
pub use process::stop_all;
use process::{alive, join_cgroup, leave_cgroup, saved_output, start, stop, Supervisor};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tfgrid_core::deployment::{ResultState, VmSpec, WorkloadData};

/// Where a node finds what VMs need; defaults are Debian's paths.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub qemu: String,
    /// The kernel for image-mode VMs; None: the newest in /boot with modules.
    pub kernel: Option<PathBuf>,
    pub busybox: PathBuf,
    /// None: try KVM, else TCG.
    pub accel: Option<Accel>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            qemu: "qemu-system-x86_64".into(),
            kernel: None,
            busybox: "/bin/busybox".into(),
            accel: None,
        }
    }
}

pub struct Vm {
    dir: PathBuf,
    volumes: PathBuf,
    containers: PathBuf,
    images: Arc<Images>,
    net: Net,
    networks: Option<crate::networks::Networks>,
    reporter: Reporter,
    opts: VmOptions,
    boot: tokio::sync::OnceCell<Result<(Boot, Accel), String>>,
    supervisors: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    log_limit: u64,
}

impl Vm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: PathBuf,
        volumes: PathBuf,
        containers: PathBuf,
        images: Arc<Images>,
        net: Net,
        networks: Option<crate::networks::Networks>,
        reporter: Reporter,
        opts: VmOptions,
    ) -> Self {
        Self {
            dir,
            volumes,
            containers,
            images,
            net,
            networks,
            reporter,
            opts,
            boot: tokio::sync::OnceCell::new(),
            supervisors: Mutex::new(HashMap::new()),
            log_limit: 1 << 20,
        }
    }

    fn vdir(&self, id: &WorkloadId) -> PathBuf {
        self.dir.join(id.key())
    }

    /// The serial console's last `tail` bytes (all of it by default).
    pub fn logs(&self, id: &WorkloadId, tail: Option<u64>) -> String {
        read_tail(&self.vdir(id).join("log"), tail)
    }

    /// The node kernel and initramfs, and the accelerator that boots them; made on first use.
    async fn boot(&self) -> Result<(Boot, Accel), String> {
        self.boot
            .get_or_init(|| async {
                let b = Boot::prepare(
                    &self.dir.join(".boot"),
                    self.opts.kernel.clone(),
                    &self.opts.busybox,
                )
                .await?;
                let accel = match self.opts.accel {
                    Some(a) => a,
                    None => probe_once(&b, &self.opts.qemu).await,
                };
                tracing::info!(accel = accel.name(), kernel = %b.version, "VMs ready");
                Ok((b, accel))
            })
            .await
            .clone()
    }

    /// QEMU's `-name`: how a pid is known to be this VM's after an agent restart.
    fn qemu_name(&self, id: &WorkloadId) -> String {
        format!("tfgrid-{}-{}", self.net.bridge, id.key())
    }

    fn tap(&self, id: &WorkloadId) -> String {
        let h = blake3::hash(format!("{}/{}", self.net.bridge, id.key()).as_bytes());
        format!("tt{}", &h.to_hex()[..12])
    }

    fn mac(&self, id: &WorkloadId) -> String {
        let h = blake3::hash(format!("mac/{}/{}", self.net.bridge, id.key()).as_bytes());
        let b = h.as_bytes();
        format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
    }

    async fn make(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        let WorkloadData::Vm(spec) = &ctx.workload.data else {
            return Err("not a vm workload".into());
        };
        let id = &ctx.id;
        let v = self.vdir(id);
        std::fs::create_dir_all(&v).map_err(|e| format!("{}: {e}", v.display()))?;
        let bridge = match spec.network {
            None => self.net.clone(),
            Some(nid) => {
                let n = self.networks.as_ref().ok_or_else(|| {
                    "this node is not on the grid overlay, so it takes no network workloads"
                        .to_string()
                })?;
                std::fs::write(v.join("network"), nid.to_string()).map_err(|e| e.to_string())?;
                n.join(ctx.deployment.twin_id, nid, &id.key()).await?
            }
        };
        let ip = match std::fs::read_to_string(v.join("ip"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(ip) if bridge.contains(ip) => ip,
            _ => {
                let ip = allocate_ip(&[self.containers.clone(), self.dir.clone()], &bridge)?;
                std::fs::write(v.join("ip"), ip.to_string()).map_err(|e| e.to_string())?;
                ip
            }
        };
        let mut out: Output = [("ip".to_string(), ip.to_string())].into();
        if let Some(pid) = self.running(id) {
            // An agent restart: the VM kept running; its mounts and tap are still in place.
            tracing::info!(workload = %id.key(), pid, "adopting a running VM");
            out.extend(saved_output(&v));
            self.supervise(id.clone(), spec.clone());
            return Ok(out);
        }
        std::fs::write(v.join("mac"), self.mac(id)).map_err(|e| e.to_string())?;
        let tap = self.tap(id);
        if !crate::net::link_exists(&tap).await {
            run("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"]).await?;
        }
        run("ip", &["link", "set", &tap, "master", &bridge.bridge, "up"]).await?;
        let hostname = id.name.replace('_', "-");
        let mut args = self.common_args(id, spec, &tap)?;
        let mode = match (&spec.image, &spec.disk_image) {
            (Some(image), None) => {
                let (boot, accel) = self.boot().await?;
                let image = self.images.ensure(image).await?;
                mount_overlay(
                    &v,
                    &image,
                    spec.disk_size,
                    &format!("the root disk of {}", id.key()),
                )
                .await?;
                self.write_config(id, spec, &image, &bridge, ip, &hostname)?;
                args.extend(image_mode_args(&v, &boot, accel, spec));
                out.insert("image_digest".into(), image.digest);
                out.insert("kernel".into(), boot.version.clone());
                ("image", accel)
            }
            (None, Some(disk)) => {
                let accel = match self.opts.accel {
                    Some(a) => a,
                    None => self.boot().await.map(|(_, a)| a).unwrap_or(Accel::Tcg),
                };
                let (base, digest) = self.images.disk(disk).await?;
                self.make_disk(&v, &base, spec.disk_size).await?;
                let n = seed::SeedNet {
                    mac: self.mac(id),
                    ip,
                    prefix: bridge.prefix(),
                    gateway: bridge.gateway(),
                };
                seed::make(&v, &id.key(), &hostname, spec, &n).await?;
                args.extend(disk_mode_args(&v, accel));
                out.insert("image_digest".into(), digest);
                ("disk", accel)
            }
            _ => return Err("a vm needs exactly one of image and disk_image".into()),
        };
        args.extend(self.volume_args(id, spec, mode.0 == "image").await?);
        out.insert("boot".into(), mode.0.into());
        out.insert("accel".into(), mode.1.name().into());
        std::fs::write(
            v.join("args"),
            serde_json::to_vec(&args).expect("strings serialize"),
        )
        .map_err(|e| format!("saving the QEMU arguments: {e}"))?;
        std::fs::write(
            v.join("output"),
            serde_json::to_vec(&out).expect("strings serialize"),
        )
        .map_err(|e| e.to_string())?;
        start(&self.opts.qemu, &v, &args).await?;
        join_cgroup(&self.net.cgroup(&id.key()), &v, spec);
        tfgrid_core::faults::crash_point("node-vm-after-start");
        self.supervise(id.clone(), spec.clone());
        Ok(out)
    }

    /// Arguments every VM has: identity, accelerator-independent machine size, console, network.
    fn common_args(
        &self,
        id: &WorkloadId,
        spec: &VmSpec,
        tap: &str,
    ) -> Result<Vec<String>, String> {
        let v = self.vdir(id);
        let s = |x: &str| x.to_string();
        Ok(vec![
            s("-name"),
            self.qemu_name(id),
            s("-m"),
            format!("{}M", spec.memory >> 20),
            s("-smp"),
            spec.cpu.to_string(),
            s("-nodefaults"),
            s("-no-user-config"),
            s("-display"),
            s("none"),
            s("-no-reboot"),
            s("-chardev"),
            format!("file,id=con,path={},append=on", v.join("log").display()),
            s("-serial"),
            s("chardev:con"),
            s("-netdev"),
            format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            s("-daemonize"),
            s("-pidfile"),
            v.join("pid").to_string_lossy().into_owned(),
        ])
    }

    /// The guest's side of an image-mode boot, in the `tfgrid` 9p share.
    fn write_config(
        &self,
        id: &WorkloadId,
        spec: &VmSpec,
        image: &crate::images::Image,
        bridge: &Net,
        ip: Ipv4Addr,
        hostname: &str,
    ) -> Result<(), String> {
        let c = self.vdir(id).join("config");
        std::fs::create_dir_all(&c).map_err(|e| format!("{}: {e}", c.display()))?;
        let w = |n: &str, t: &str| std::fs::write(c.join(n), t).map_err(|e| format!("{n}: {e}"));
        w(
            "net",
            &format!("{ip}/{} {}\n", bridge.prefix(), bridge.gateway()),
        )?;
        w("hostname", &format!("{hostname}\n"))?;
        w("start", &start_script(spec, image)?)?;
        let keys: String = spec
            .ssh_keys
            .iter()
            .map(|k| format!("{}\n", k.trim()))
            .collect();
        w("authorized_keys", &keys)?;
        let mounts: String = spec
            .mounts
            .iter()
            .map(|m| format!("{} {}\n", serial(&m.volume), m.path))
            .collect();
        w("mounts", &mounts)?;
        if let (Some(nid), Some(n)) = (spec.network, &self.networks) {
            // The network's names, kept current by the node: a bind mount of its hosts file,
            // read through 9p without a cache, so the guest sees each rewrite.
            let hosts = c.join("hosts");
            if !is_mounted(&hosts) {
                std::fs::write(&hosts, "").map_err(|e| e.to_string())?;
                nix::mount::mount(
                    Some(&n.hosts_file(nid)),
                    &hosts,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| format!("binding the network's hosts file: {e}"))?;
            }
        }
        Ok(())
    }

    /// The root disk of a disk-image VM: a qcow2 over the shared, read-only base, grown to the
    /// size the contract pays for.
    async fn make_disk(&self, v: &Path, base: &Path, size: u64) -> Result<(), String> {
        let disk = v.join("disk.qcow2");
        if disk.exists() {
            return Ok(());
        }
        let info = run(
            "qemu-img",
            &["info", "--output=json", &base.to_string_lossy()],
        )
        .await?;
        let info: serde_json::Value =
            serde_json::from_str(&info).map_err(|e| format!("qemu-img info: {e}"))?;
        let format = info["format"].as_str().unwrap_or("raw").to_string();
        if format != "raw" && format != "qcow2" {
            return Err(format!(
                "the disk image is {format}; a VM boots qcow2 or raw disks"
            ));
        }
        let virt = info["virtual-size"].as_u64().unwrap_or(0);
        if size < virt {
            return Err(format!(
                "disk_size {} is smaller than the disk image ({})",
                tfgrid_core::capacity::human_bytes(size),
                tfgrid_core::capacity::human_bytes(virt)
            ));
        }
        crate::capacity::check_room(v, size, "a VM's root disk")?;
        let tmp = v.join("disk.partial");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                &format,
                "-b",
                &base.to_string_lossy(),
                &tmp.to_string_lossy(),
                &size.to_string(),
            ],
        )
        .await?;
        std::fs::rename(&tmp, &disk).map_err(|e| format!("{}: {e}", disk.display()))
    }

    /// Volumes as virtio disks, each with its name as serial. A volume is a loop-mounted ext4
    /// image on the host (for containers): it is unmounted there first, so only the guest
    /// writes it.
    async fn volume_args(
        &self,
        id: &WorkloadId,
        spec: &VmSpec,
        mmio: bool,
    ) -> Result<Vec<String>, String> {
        let mut a = Vec::new();
        for (i, m) in spec.mounts.iter().enumerate() {
            let vid = WorkloadId::new(id.contract, &m.volume);
            let img = self.volumes.join(format!("{}.img", vid.key()));
            if !img.is_file() {
                return Err(format!("volume {} has no image on this node", m.volume));
            }
            let at = self.volumes.join(vid.key());
            if is_mounted(&at) {
                nix::mount::umount2(&at, nix::mount::MntFlags::empty())
                    .map_err(|e| format!("unmounting volume {} on the host: {e}", m.volume))?;
            }
            a.push("-drive".into());
            a.push(format!(
                "file={},format=raw,if=none,id=vol{i},cache=none,aio=threads",
                img.display()
            ));
            a.push("-device".into());
            a.push(format!(
                "{},drive=vol{i},serial={}",
                if mmio {
                    "virtio-blk-device"
                } else {
                    "virtio-blk-pci"
                },
                serial(&m.volume)
            ));
        }
        Ok(a)
    }

    /// The QEMU pid of this VM when it runs (the pid file's process, carrying this VM's name).
    fn running(&self, id: &WorkloadId) -> Option<i32> {
        alive(&self.vdir(id), &self.qemu_name(id))
    }

    fn supervise(&self, id: WorkloadId, spec: VmSpec) {
        let sup = Supervisor {
            qemu: self.opts.qemu.clone(),
            name: self.qemu_name(&id),
            vdir: self.vdir(&id),
            cgroup: self.net.cgroup(&id.key()),
            reporter: self.reporter.clone(),
            log_limit: self.log_limit,
            spec,
            id: id.clone(),
        };
        let task = tokio::spawn(sup.run());
        if let Some(old) = self
            .supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.key(), task)
        {
            old.abort();
        }
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
        let v = self.vdir(id);
        if let Some(pid) = self.running(id) {
            stop(pid).await;
        }
        let tap = self.tap(id);
        if crate::net::link_exists(&tap).await {
            run("ip", &["link", "del", &tap]).await?;
        }
        let hosts = v.join("config").join("hosts");
        if is_mounted(&hosts) {
            nix::mount::umount2(&hosts, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("unmounting {}: {e}", hosts.display()))?;
        }
        unmount_overlay(&v)?;
        // Volumes the VM had go back to the host, where containers (or a next VM) find them.
        if let Ok(t) = std::fs::read(v.join("args")) {
            let args: Vec<String> = serde_json::from_slice(&t).unwrap_or_default();
            for a in args
                .iter()
                .filter(|a| a.starts_with("file=") && a.contains("id=vol"))
            {
                let img = a["file=".len()..].split(',').next().unwrap_or_default();
                let at = Path::new(img).with_extension("");
                if Path::new(img).is_file() && at.is_dir() && !is_mounted(&at) {
                    let _ = run("mount", &["-o", "loop", img, &at.to_string_lossy()]).await;
                }
            }
        }
        leave_cgroup(&self.net.cgroup(&key));
        let network = std::fs::read_to_string(v.join("network"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let (Some(nid), Some(n)) = (network, &self.networks) {
            n.leave(nid, &key).await;
        }
        match std::fs::remove_dir_all(&v) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {}: {e}", v.display())),
        }
    }
}

impl Kind for Vm {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        match self.make(ctx).await {
            Ok(o) => Ok(o),
            Err(e) => {
                if let Err(e2) = self.remove(&ctx.id).await {
                    tracing::warn!(workload = %ctx.id.key(), "cleaning up after a failed VM start: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        self.remove(id).await
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        match self.running(id) {
            Some(_) => (ResultState::Ok, String::new()),
            None => (ResultState::Error, "the VM is not running".into()),
        }
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        // make() adopts a running VM and only starts one that is not running.
        self.provision(ctx).await
    }
}

/// The probe's answer is kept beside the kernel for as long as the host runs (its boot id): an
/// agent restart does not boot a probe guest again.
async fn probe_once(b: &Boot, qemu: &str) -> Accel {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = b.kernel.with_file_name(format!("accel-{}", boot_id.trim()));
    match std::fs::read_to_string(&cache).ok().as_deref() {
        Some("kvm") => return Accel::Kvm,
        Some("tcg") => return Accel::Tcg,
        _ => {}
    }
    let a = b.probe(qemu).await;
    let _ = std::fs::write(&cache, a.name());
    a
}
