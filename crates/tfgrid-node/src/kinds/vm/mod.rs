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

pub mod boot;
pub mod seed;

use super::container::{allocate_ip, mount_overlay, unmount_overlay};
use super::{is_mounted, run, Ctx, Kind, Output, Report, Reporter, WorkloadId};
use crate::images::Images;
use crate::net::Net;
use boot::{Accel, Boot};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_core::deployment::{ResultState, VmSpec, WorkloadData};

/// Restarts allowed within [`RESTART_WINDOW`] before the VM is left in error.
const MAX_RESTARTS: usize = 4;
const RESTART_WINDOW: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);

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

/// A volume's disk serial (at most 20 bytes in virtio-blk): its name, which the engine limits
/// to letters, digits and _ ; longer names are cut and keep a hash.
fn serial(volume: &str) -> String {
    if volume.len() <= 20 {
        volume.to_string()
    } else {
        let h = blake3::hash(volume.as_bytes()).to_hex();
        format!("{}{}", &volume[..12], &h[..8])
    }
}

fn image_mode_args(v: &Path, boot: &Boot, accel: Accel, spec: &VmSpec) -> Vec<String> {
    let mut cmdline = String::from(
        "console=ttyS0 quiet panic=-1 pci=off mitigations=off no_timer_check i8042.noaux 8250.nr_uarts=1 random.trust_cpu=on",
    );
    if let (Accel::Tcg, Some(khz)) = (accel, host_tsc_khz()) {
        // Under TCG the guest's TSC runs at the host's rate, and calibrating it against the
        // emulated PIT fails on a busy host (the guest then hangs at boot): it is told instead.
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    for a in &spec.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    let mut a: Vec<String> = accel_args(accel);
    a.extend(
        [
            "-M",
            "microvm,x-option-roms=off,rtc=on,isa-serial=on",
            "-kernel",
            &boot.kernel.to_string_lossy(),
            "-initrd",
            &boot.initrd.to_string_lossy(),
            "-append",
            &cmdline,
            "-fsdev",
            &format!(
                "local,id=root,path={},security_model=passthrough",
                v.join("rootfs").display()
            ),
            "-device",
            "virtio-9p-device,fsdev=root,mount_tag=rootfs",
            "-fsdev",
            &format!(
                "local,id=cfg,path={},security_model=none,readonly=on",
                v.join("config").display()
            ),
            "-device",
            "virtio-9p-device,fsdev=cfg,mount_tag=tfgrid",
        ]
        .map(String::from),
    );
    a
}

/// The host's TSC rate, as /proc/cpuinfo gives it.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1))?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

fn disk_mode_args(v: &Path, accel: Accel) -> Vec<String> {
    let mut a = accel_args(accel);
    a.extend(
        [
            "-M",
            "q35",
            "-drive",
            &format!(
                "file={},format=qcow2,if=virtio",
                v.join("disk.qcow2").display()
            ),
            "-drive",
            &format!(
                "file={},format=raw,if=virtio,readonly=on",
                v.join("seed.iso").display()
            ),
        ]
        .map(String::from),
    );
    a
}

fn accel_args(accel: Accel) -> Vec<String> {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"].map(String::from).to_vec(),
        // A bounded translation cache: TCG's default grows to a quarter of the host's memory.
        // 16 MiB keeps QEMU's own memory under 40 MiB beside the guest's; 32 MiB boots about a
        // second faster (`tfgrid bench vm`: 3.1 s against 4.2 s) for 16 MiB more per VM.
        Accel::Tcg => ["-accel", "tcg,thread=multi,tb-size=16"]
            .map(String::from)
            .to_vec(),
    }
}

/// The net device comes last: which bus it sits on depends on the machine.
fn net_device(args: &[String], mac: &str) -> Vec<String> {
    let microvm = args.iter().any(|a| a.starts_with("microvm"));
    vec![
        "-device".into(),
        format!(
            "{},netdev=net0,mac={mac}",
            if microvm {
                "virtio-net-device"
            } else {
                "virtio-net-pci"
            }
        ),
    ]
}

/// A POSIX shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script the guest's init runs in the rootfs (with busybox, which the init binds in):
/// enter the workdir, exec the entrypoint with exactly the image's and the spec's environment.
fn start_script(spec: &VmSpec, image: &crate::images::Image) -> Result<String, String> {
    let (entrypoint, cmd) = match &spec.entrypoint {
        Some(ep) => (ep.clone(), spec.cmd.clone().unwrap_or_default()),
        None => (
            image.config.entrypoint.clone(),
            spec.cmd.clone().unwrap_or_else(|| image.config.cmd.clone()),
        ),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(format!(
            "image {} has no entrypoint or cmd; give one in the workload",
            image.reference
        ));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    env.insert("HOME".into(), "/root".into());
    for kv in &image.config.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.into(), v.into());
        }
    }
    env.extend(spec.env.clone());
    let wd = if image.config.workdir.is_empty() {
        "/".to_string()
    } else {
        image.config.workdir.clone()
    };
    let mut s = format!(
        "cd {} || exit 127\nexec /dev/.tfgrid/busybox env -i",
        sh_quote(&wd)
    );
    for (k, v) in &env {
        s.push(' ');
        s.push_str(&sh_quote(&format!("{k}={v}")));
    }
    for a in &argv {
        s.push(' ');
        s.push_str(&sh_quote(a));
    }
    s.push('\n');
    Ok(s)
}

/// Starts QEMU daemonized with `args` (+ the net device); its own errors come back as the
/// message. The pid file is QEMU's own, written before it returns.
async fn start(qemu: &str, v: &Path, args: &[String]) -> Result<(), String> {
    let _ = std::fs::remove_file(v.join("pid"));
    let mac = mac_of(v);
    let mut all = args.to_vec();
    all.extend(net_device(args, &mac));
    let out = tokio::process::Command::new(qemu)
        .args(&all)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {qemu}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{qemu} did not start: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The MAC saved beside the VM (so a restarted QEMU keeps the one cloud-init matched on).
fn mac_of(v: &Path) -> String {
    std::fs::read_to_string(v.join("mac"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "52:54:00:00:00:01".into())
}

fn saved_output(v: &Path) -> Output {
    std::fs::read(v.join("output"))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

fn alive(v: &Path, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(v.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // A pid reused by another process is not this VM: its command line names it.
    cmdline
        .split(|b| *b == 0)
        .any(|a| a == name.as_bytes())
        .then_some(pid)
}

/// SIGKILL and wait until the process is gone (its tap and files are free after).
async fn stop(pid: i32) {
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        // A daemonized QEMU is nobody's child here: its parent (init) reaps it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Puts the VM's QEMU under its cgroup: cpu quota of its vCPUs, memory of the guest plus 128
/// MiB for QEMU itself. Best effort: a host without the v1 controllers runs it unconfined.
fn join_cgroup(cgroup: &str, v: &Path, spec: &VmSpec) {
    let Some(pid) = std::fs::read_to_string(v.join("pid")).ok() else {
        return;
    };
    let pid = pid.trim();
    let set = |ctl: &str, file: &str, val: String| -> std::io::Result<()> {
        let d = PathBuf::from(format!("/sys/fs/cgroup/{ctl}{cgroup}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(file), val)
    };
    let r = (|| -> std::io::Result<()> {
        set("cpu", "cpu.cfs_period_us", "100000".into())?;
        set(
            "cpu",
            "cpu.cfs_quota_us",
            (spec.cpu as u64 * 100_000).to_string(),
        )?;
        set(
            "memory",
            "memory.limit_in_bytes",
            (spec.memory + (128 << 20)).to_string(),
        )?;
        for ctl in ["cpu", "memory"] {
            set(ctl, "cgroup.procs", pid.to_string())?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::debug!("VM cgroup {cgroup}: {e}");
    }
}

fn leave_cgroup(cgroup: &str) {
    for ctl in ["cpu", "memory"] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{ctl}{cgroup}"));
    }
}

fn read_tail(path: &Path, tail: Option<u64>) -> String {
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

/// Watches one VM: when QEMU exits (the guest powered off, panicked or its entrypoint ended)
/// it says why from the console and starts it again, up to [`MAX_RESTARTS`] in
/// [`RESTART_WINDOW`]; past that the VM is left in error for its owner's bot to move.
struct Supervisor {
    qemu: String,
    name: String,
    vdir: PathBuf,
    cgroup: String,
    reporter: Reporter,
    log_limit: u64,
    spec: VmSpec,
    id: WorkloadId,
}

impl Supervisor {
    fn report(&self, state: ResultState, message: String) {
        let _ = self.reporter.send(Report {
            id: self.id.clone(),
            state,
            message,
        });
    }

    fn trim_log(&self) {
        let path = self.vdir.join("log");
        let Ok(len) = std::fs::metadata(&path).map(|m| m.len()) else {
            return;
        };
        if len <= self.log_limit {
            return;
        }
        // QEMU appends (append=on, O_APPEND), so truncating and writing back the newest half
        // keeps its descriptor valid.
        let keep = self.log_limit / 2;
        let Ok(mut f) = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
        else {
            return;
        };
        let mut tail = Vec::new();
        if f.seek(SeekFrom::Start(len - keep)).is_ok() && f.read_to_end(&mut tail).is_ok() {
            let _ = f.set_len(0);
            let _ = f.write_all(&tail);
        }
    }

    /// The console's last word on why the guest stopped.
    fn reason(&self) -> String {
        let tail = read_tail(&self.vdir.join("log"), Some(4096));
        let line = tail
            .lines()
            .rev()
            .find(|l| {
                l.contains("tfgrid: ") || l.contains("Kernel panic") || l.contains("reboot: ")
            })
            .map(|l| l.trim().to_string());
        match line {
            Some(l) if l.contains("Kernel panic") => format!("the guest kernel panicked ({l})"),
            Some(l) if l.contains("tfgrid: ") => {
                format!(
                    "the VM stopped: {}",
                    l.split("tfgrid: ").nth(1).unwrap_or(&l)
                )
            }
            _ => "the VM stopped".to_string(),
        }
    }

    async fn run(self) {
        let key = self.id.key();
        let mut restarts: Vec<Instant> = Vec::new();
        loop {
            tokio::time::sleep(POLL).await;
            self.trim_log();
            if alive(&self.vdir, &self.name).is_some() {
                continue;
            }
            let reason = self.reason();
            restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
            if restarts.len() >= MAX_RESTARTS {
                self.report(
                    ResultState::Error,
                    format!(
                        "{reason}; gave up after {MAX_RESTARTS} restarts in {} s",
                        RESTART_WINDOW.as_secs()
                    ),
                );
                return;
            }
            restarts.push(Instant::now());
            tracing::warn!(workload = %key, "{reason}; restarting");
            self.report(
                ResultState::Error,
                format!("{reason}; restart {}", restarts.len()),
            );
            let args: Vec<String> = std::fs::read(self.vdir.join("args"))
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok())
                .unwrap_or_default();
            match start(&self.qemu, &self.vdir, &args).await {
                Ok(()) => {
                    join_cgroup(&self.cgroup, &self.vdir, &self.spec);
                    self.report(
                        ResultState::Ok,
                        format!("restarted after: {reason} (restart {})", restarts.len()),
                    );
                }
                Err(e) => tracing::warn!(workload = %key, "restarting the VM: {e}"),
            }
        }
    }
}

/// Stops every VM under `dir` (a local grid shutting down) and removes their taps; their
/// files stay, so the next agent start boots them again.
pub async fn stop_all(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let v = e.path();
        let Ok(args) = std::fs::read(v.join("args")) else {
            continue;
        };
        let args: Vec<String> = serde_json::from_slice(&args).unwrap_or_default();
        let name = args
            .iter()
            .skip_while(|a| *a != "-name")
            .nth(1)
            .cloned()
            .unwrap_or_default();
        if let Some(pid) = alive(&v, &name) {
            stop(pid).await;
        }
        if let Some(tap) = args
            .iter()
            .find_map(|a| a.strip_prefix("tap,id=net0,ifname="))
            .and_then(|a| a.split(',').next())
        {
            let _ = run("ip", &["link", "del", tap]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_script_quotes_every_word() {
        let image = crate::images::Image {
            reference: "r/web".into(),
            digest: "sha256:0".into(),
            layers: vec![],
            config: crate::images::ImageConfig {
                entrypoint: vec![],
                cmd: vec!["httpd".into(), "-f".into()],
                env: vec!["A=1".into()],
                workdir: "/srv/it's".into(),
            },
        };
        let spec = VmSpec {
            image: Some("r/web".into()),
            disk_image: None,
            entrypoint: None,
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                "echo '$HOME'; exit 3".into(),
            ]),
            env: [("B".to_string(), "two words".to_string())].into(),
            cpu: 1,
            memory: 128 << 20,
            disk_size: 0,
            kernel_args: vec![],
            ssh_keys: vec![],
            mounts: vec![],
            network: None,
        };
        let s = start_script(&spec, &image).unwrap();
        assert!(s.starts_with("cd '/srv/it'\\''s' || exit 127\n"), "{s}");
        assert!(
            s.contains(" 'A=1' 'B=two words' 'HOME=/root' 'PATH="),
            "{s}"
        );
        assert!(
            s.ends_with(" 'sh' '-c' 'echo '\\''$HOME'\\''; exit 3'\n"),
            "{s}"
        );
        // sh reads it back to exactly those words.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "set -- {}; printf '%s|' \"$@\"",
                s.lines().nth(1).unwrap().trim_start_matches("exec ")
            ))
            .output()
            .unwrap();
        let words = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(words.ends_with("|sh|-c|echo '$HOME'; exit 3|"), "{words}");
        let mut no_cmd = image.clone();
        no_cmd.config.cmd.clear();
        let bare = VmSpec { cmd: None, ..spec };
        assert!(start_script(&bare, &no_cmd).is_err());
    }

    #[test]
    fn long_volume_names_make_distinct_serials() {
        assert_eq!(serial("data"), "data");
        let a = serial("a_very_long_volume_name_one");
        let b = serial("a_very_long_volume_name_two");
        assert!(a.len() <= 20 && b.len() <= 20 && a != b);
    }
}
