//! What a node gives VMs booted from an OCI image: its kernel (Debian's linux-image package,
//! unpacked once to a plain ELF so the guest skips decompressing itself) and an initramfs made
//! here from busybox-static and the kernel's virtio modules, whose init mounts the image's rootfs
//! over 9p and runs the entrypoint. Also which accelerator works: /dev/kvm can exist and still
//! not boot a stock kernel (a paravirtual KVM such as kvm-pvm), so it is tried, not assumed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Modules the init loads, in an order that satisfies their dependencies once expanded by
/// modules.dep. ext4 mounts volumes (it asks the crypto API for crc32c, which modules.dep does
/// not list); 9p carries the rootfs and the VM's configuration.
const MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "ext4",
];

/// The guest's pid 1 (busybox sh). Its configuration is a second 9p share, `tfgrid`, written
/// by the node: `net` (address/prefix and gateway), `hostname`, `start` (a script that enters
/// the workdir and execs the entrypoint with the image's environment), `mounts` (serial and
/// path per volume disk), `authorized_keys` and `hosts` (the network's names, kept current).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod /lib/modules/$m.ko 2>/dev/null; done
for a in $(cat /proc/cmdline); do [ "$a" = tfgrid.probe ] && { echo tfgrid-probe-ok; poweroff -f; }; done
fail() { echo "tfgrid: $*"; poweroff -f; }
mkdir -p /tf /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none tfgrid /tf || fail "no configuration share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose rootfs /newroot || fail "cannot mount the rootfs"
ip link set lo up
if [ -s /tf/net ]; then
  read addr gw < /tf/net
  ip link set eth0 up && ip addr add "$addr" dev eth0 && ip route add default via "$gw" || fail "network setup failed"
fi
[ -s /tf/hostname ] && hostname "$(cat /tf/hostname)"
R=/newroot
for d in proc sys dev tmp; do mkdir -p $R/$d; done
mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
if [ -f /tf/hosts ]; then [ -e $R/etc/hosts ] || { mkdir -p $R/etc; touch $R/etc/hosts; }; mount --bind /tf/hosts $R/etc/hosts; fi
if [ -s /tf/authorized_keys ]; then mkdir -p $R/root/.ssh; chmod 700 $R/root/.ssh; cp /tf/authorized_keys $R/root/.ssh/authorized_keys; chmod 600 $R/root/.ssh/authorized_keys; fi
if [ -s /tf/mounts ]; then
  while read serial path; do
    for b in /sys/block/vd*; do
      if [ "$(cat $b/serial 2>/dev/null)" = "$serial" ]; then mkdir -p "$R$path"; mount -t ext4 /dev/${b##*/} "$R$path" || fail "cannot mount volume $serial"; fi
    done
  done < /tf/mounts
fi
mkdir -p $R/dev/.tfgrid; touch $R/dev/.tfgrid/busybox
mount --bind /bin/busybox $R/dev/.tfgrid/busybox; cp /tf/start $R/dev/.tfgrid/start
echo "tfgrid: starting the entrypoint"
chroot $R /dev/.tfgrid/busybox sh /dev/.tfgrid/start
echo "tfgrid: the entrypoint exited with status $?"
sync
poweroff -f
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The node's kernel and initramfs for image-mode VMs, made once per kernel and init version.
#[derive(Debug, Clone)]
pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub version: String,
}

/// The newest installed kernel that has its modules: non-realtime builds first (their timers
/// are what a guest expects).
pub fn find_kernel() -> Result<(PathBuf, String), String> {
    let mut found: Vec<(bool, String)> = std::fs::read_dir("/boot")
        .map_err(|e| format!("/boot: {e}"))?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let v = n.strip_prefix("vmlinuz-")?.to_string();
            Path::new("/lib/modules")
                .join(&v)
                .join("modules.dep")
                .exists()
                .then_some((v.contains("-rt"), v))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| version_cmp(&a.1, &b.1)));
    let (_, v) = found.pop().ok_or(
        "no kernel in /boot with modules in /lib/modules (install Debian's linux-image-amd64)",
    )?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{v}")), v))
}

/// Orders kernel versions by their numeric parts (6.1.0-57 < 6.12.1).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let nums = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    nums(a).cmp(&nums(b))
}

impl Boot {
    /// Makes (or finds) the unpacked kernel and the initramfs under `dir`.
    pub async fn prepare(
        dir: &Path,
        kernel: Option<PathBuf>,
        busybox: &Path,
    ) -> Result<Boot, String> {
        let (bz, version) = match kernel {
            Some(k) => {
                let n = k.file_name().unwrap_or_default().to_string_lossy();
                let v = n.strip_prefix("vmlinuz-").unwrap_or(&n).to_string();
                (k, v)
            }
            None => find_kernel()?,
        };
        let stamp = blake3::hash(format!("{version}\n{INIT}\n{MODULES:?}").as_bytes()).to_hex();
        let out = dir.join(format!("{version}-{}", &stamp[..12]));
        let (kernel, initrd) = (out.join("kernel"), out.join("initrd.cpio"));
        if kernel.exists() && initrd.exists() {
            return Ok(Boot {
                kernel,
                initrd,
                version,
            });
        }
        let (busybox, version2, out2) = (busybox.to_path_buf(), version.clone(), out.clone());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let tmp = out2.with_extension("partial");
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            let image = std::fs::read(&bz).map_err(|e| format!("{}: {e}", bz.display()))?;
            let elf = unpack_kernel(&image);
            // A kernel that cannot be unpacked boots as it is, decompressing itself.
            std::fs::write(tmp.join("kernel"), elf.as_deref().unwrap_or(&image))
                .map_err(|e| format!("writing the kernel: {e}"))?;
            let cpio = initramfs(&version2, &busybox)?;
            std::fs::write(tmp.join("initrd.cpio"), cpio)
                .map_err(|e| format!("writing the initramfs: {e}"))?;
            let _ = std::fs::remove_dir_all(&out2);
            std::fs::rename(&tmp, &out2).map_err(|e| format!("{}: {e}", out2.display()))
        })
        .await
        .map_err(|e| e.to_string())??;
        tracing::info!(kernel = %version, "made the VM kernel and initramfs");
        Ok(Boot {
            kernel,
            initrd,
            version,
        })
    }

    /// Whether KVM boots this kernel here: a guest that only prints and powers off, given a
    /// few seconds. Anything else (no /dev/kvm, an error, a hang) means TCG.
    pub async fn probe(&self, qemu: &str) -> Accel {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Accel::Tcg;
        }
        let run = tokio::process::Command::new(qemu)
            .args(["-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1"])
            .args(["-M", "microvm", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 tfgrid.probe"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(8), run).await {
            Ok(Ok(o)) if String::from_utf8_lossy(&o.stdout).contains("tfgrid-probe-ok") => {
                Accel::Kvm
            }
            Ok(Ok(o)) => {
                tracing::warn!(
                    "KVM is there but did not boot the kernel ({}); VMs use TCG",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                Accel::Tcg
            }
            _ => {
                tracing::warn!("KVM did not boot the kernel within 8 s; VMs use TCG");
                Accel::Tcg
            }
        }
    }
}

/// The ELF inside a bzImage: the payload after the first xz, zstd or gzip magic, decompressed
/// by Debian's own tools (the kernel's payload carries trailing data these stop at).
fn unpack_kernel(image: &[u8]) -> Option<Vec<u8>> {
    let tries: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x1f\x8b\x08\x00", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in tries {
        let Some(at) = image.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let Ok(mut child) = std::process::Command::new(tool)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            continue;
        };
        let mut stdin = child.stdin.take()?;
        let payload = image[at..].to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&payload);
        });
        let out = child.wait_with_output().ok()?;
        let _ = feeder.join();
        if out.stdout.starts_with(b"\x7fELF") {
            return Some(out.stdout);
        }
    }
    None
}

/// `modules` and what they need, from modules.dep, dependencies first; built-in ones skipped.
fn module_files(version: &str, wanted: &[&str]) -> Result<Vec<PathBuf>, String> {
    let base = Path::new("/lib/modules").join(version);
    let dep = std::fs::read_to_string(base.join("modules.dep"))
        .map_err(|e| format!("{}: {e}", base.join("modules.dep").display()))?;
    let builtin = std::fs::read_to_string(base.join("modules.builtin")).unwrap_or_default();
    let deps: std::collections::HashMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m, d.split_whitespace().collect()))
        })
        .collect();
    let name = |p: &str| -> String {
        let f = p.rsplit('/').next().unwrap_or(p);
        f.split(".ko").next().unwrap_or(f).replace('-', "_")
    };
    let mut order: Vec<&str> = Vec::new();
    fn visit<'a>(
        m: &'a str,
        deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
        order: &mut Vec<&'a str>,
    ) {
        if order.contains(&m) {
            return;
        }
        // modules.dep lists a module's whole closure; loading it in reverse is modprobe's order.
        for d in deps.get(m).into_iter().flatten().rev() {
            visit(d, deps, order);
        }
        order.push(m);
    }
    for w in wanted {
        match deps.keys().find(|p| name(p) == *w) {
            Some(p) => visit(p, &deps, &mut order),
            None if builtin.lines().any(|l| name(l) == *w) => {}
            None => return Err(format!("kernel {version} has no module {w}")),
        }
    }
    Ok(order.into_iter().map(|p| base.join(p)).collect())
}

/// The initramfs as an uncompressed newc cpio: nothing for the guest to decompress.
fn initramfs(version: &str, busybox: &Path) -> Result<Vec<u8>, String> {
    let bb = std::fs::read(busybox).map_err(|e| format!("{}: {e}", busybox.display()))?;
    if !is_static_elf(&bb) {
        return Err(format!(
            "{} is not a static executable (install Debian's busybox-static)",
            busybox.display()
        ));
    }
    let mut c = Cpio::default();
    for d in ["bin", "lib", "lib/modules", "proc", "sys", "dev", "tmp"] {
        c.dir(d);
    }
    c.file("init", 0o755, INIT.as_bytes());
    c.file("bin/busybox", 0o755, &bb);
    let mut names = String::new();
    for m in module_files(version, MODULES)? {
        let data = std::fs::read(&m).map_err(|e| format!("{}: {e}", m.display()))?;
        let data = match m.extension().and_then(|e| e.to_str()) {
            Some("ko") => data,
            Some(ext) => decompress(&data, ext)
                .ok_or_else(|| format!("{}: cannot decompress a .{ext} module", m.display()))?,
            None => data,
        };
        let n = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .split(".ko")
            .next()
            .unwrap_or_default()
            .to_string();
        c.file(&format!("lib/modules/{n}.ko"), 0o644, &data);
        names.push_str(&n);
        names.push('\n');
    }
    c.file("modules", 0o644, names.as_bytes());
    Ok(c.finish())
}

fn decompress(data: &[u8], ext: &str) -> Option<Vec<u8>> {
    let (tool, args): (&str, &[&str]) = match ext {
        "xz" => ("xz", &["-dc"]),
        "zst" => ("zstd", &["-dcq"]),
        "gz" => ("gzip", &["-dc"]),
        _ => return None,
    };
    let mut child = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let data = data.to_vec();
    let t = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().ok()?;
    let _ = t.join();
    out.status.success().then_some(out.stdout)
}

/// An ELF executable with no program interpreter (PT_INTERP): it runs without a libc beside it.
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        b.get(o..o + 4)
            .map(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) != 3)
            .unwrap_or(false)
    })
}

/// A newc cpio writer. The format is a fixed ASCII header per entry; the crates for it add
/// nothing this needs (no reading, no other formats).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_order_by_numbers() {
        assert_eq!(
            version_cmp("6.1.0-57-amd64", "6.12.1"),
            std::cmp::Ordering::Less
        );
        assert_eq!(version_cmp("6.1.0-9", "6.1.0-57"), std::cmp::Ordering::Less);
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let tail = String::from_utf8_lossy(&out);
        assert!(tail.contains("TRAILER!!!"));
        // cpio(1) reads it back: the names and sizes are as written.
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipping the cpio(1) read-back: cpio is not installed");
            return;
        };
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let listed = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&listed.stdout), "bin\ninit\n");
    }

    #[test]
    fn static_busybox_is_told_from_a_dynamic_binary() {
        let dynamic = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&dynamic));
        match std::fs::read("/bin/busybox") {
            Ok(b) if is_static_elf(&b) => {}
            _ => eprintln!("skipping the static case: no busybox-static at /bin/busybox"),
        }
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
