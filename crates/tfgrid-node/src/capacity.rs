//! What this host can offer, read from /proc and /sys as Zero-OS does: logical cores, memory, the
//! disk under the data directory (SSD or HDD by the block layer's rotational flag) and PCI GPUs.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tfgrid_core::records::Gpu;
use tfgrid_core::{capacity::MIB, Capacity};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Ssd,
    Hdd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    /// Block device name in /sys/block (e.g. `vda`), or the filesystem when none backs it.
    pub device: String,
    pub kind: DiskKind,
    /// Size of the filesystem holding the data directory.
    pub size: u64,
    pub mount: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discovered {
    pub cores: u64,
    pub memory: u64,
    /// Memory kept for the host and the agent itself, not offered to the grid.
    pub memory_reserved: u64,
    pub disk: Disk,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {what}: {text:?}")]
    Parse { what: &'static str, text: String },
}

fn read(path: impl AsRef<Path>) -> Result<String, CapacityError> {
    let p = path.as_ref();
    std::fs::read_to_string(p).map_err(|source| CapacityError::Io {
        path: p.display().to_string(),
        source,
    })
}

impl Discovered {
    /// What the node registers: all cores, memory less the host's share, the data disk as SSD
    /// or HDD capacity, and its GPUs.
    pub fn offered(&self) -> Capacity {
        let (sru, hru) = match self.disk.kind {
            DiskKind::Ssd => (self.disk.size, 0),
            DiskKind::Hdd => (0, self.disk.size),
        };
        Capacity {
            cru: self.cores,
            mru: self.memory.saturating_sub(self.memory_reserved),
            sru,
            hru,
            gpu: self.gpus.len() as u32,
            ipv4: 0,
        }
    }
}

pub fn discover(data_dir: &Path) -> Result<Discovered, CapacityError> {
    let memory = mem_total(&read("/proc/meminfo")?)?;
    Ok(Discovered {
        cores: cores()?,
        memory,
        // Zero-OS keeps a tenth of memory for itself; at least 256 MiB so a small host stays usable.
        memory_reserved: (memory / 10).max(256 * MIB).min(memory),
        disk: disk(data_dir)?,
        gpus: gpus(Path::new("/sys/bus/pci/devices")),
    })
}

fn cores() -> Result<u64, CapacityError> {
    // /proc/cpuinfo lists every logical core the host has, not only those in our cpuset.
    let text = read("/proc/cpuinfo")?;
    let n = text.lines().filter(|l| l.starts_with("processor")).count() as u64;
    if n > 0 {
        return Ok(n);
    }
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .map_err(|e| CapacityError::Io {
            path: "available_parallelism".into(),
            source: e,
        })
}

/// Room the node keeps free on its data filesystem: its store (redb), logs and zdb must always
/// be able to write, so pulls and volumes that would eat into it are refused up front.
pub const DISK_RESERVE: u64 = 256 << 20;

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64, String> {
    let v = nix::sys::statvfs::statvfs(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(v.blocks_available() * v.fragment_size())
}

/// Refuses when writing `need` more bytes under `path` would leave less than [`DISK_RESERVE`].
pub fn check_room(path: &Path, need: u64, what: &str) -> Result<(), String> {
    let free = free_space(path)?;
    if free < need.saturating_add(DISK_RESERVE) {
        return Err(format!(
            "not enough disk for {what}: it needs {}, {} are free and {} stay reserved for the node",
            tfgrid_core::capacity::human_bytes(need),
            tfgrid_core::capacity::human_bytes(free),
            tfgrid_core::capacity::human_bytes(DISK_RESERVE)
        ));
    }
    Ok(())
}

fn mem_total(meminfo: &str) -> Result<u64, CapacityError> {
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .ok_or_else(|| CapacityError::Parse {
            what: "/proc/meminfo",
            text: "no MemTotal line".into(),
        })?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| CapacityError::Parse {
            what: "MemTotal",
            text: line.into(),
        })?;
    Ok(kb * 1024)
}

fn disk(data_dir: &Path) -> Result<Disk, CapacityError> {
    let io = |source| CapacityError::Io {
        path: data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let meta = std::fs::metadata(data_dir).map_err(io)?;
    let vfs = nix::sys::statvfs::statvfs(data_dir).map_err(|e| io(e.into()))?;
    let size = vfs.blocks() * vfs.fragment_size();
    let (major, minor) = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
    );
    let (device, rotational) = block_device(major, minor);
    Ok(Disk {
        device,
        // A filesystem with no block device (tmpfs, overlay) is memory- or SSD-like; say SSD.
        kind: if rotational == Some(true) {
            DiskKind::Hdd
        } else {
            DiskKind::Ssd
        },
        size,
        mount: data_dir.to_path_buf(),
    })
}

/// The device name and rotational flag of a block device, looking through a partition to its
/// disk (partitions have no queue/ of their own).
fn block_device(major: u64, minor: u64) -> (String, Option<bool>) {
    let link = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let Ok(dir) = std::fs::canonicalize(&link) else {
        return (format!("{major}:{minor} (no block device)"), None);
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let queue = if dir.join("partition").exists() {
        dir.parent().map(|p| p.join("queue/rotational"))
    } else {
        Some(dir.join("queue/rotational"))
    };
    let rotational = queue
        .and_then(|q| std::fs::read_to_string(q).ok())
        .map(|s| s.trim() == "1");
    (name, rotational)
}

/// Display controllers (PCI class 0x03xxxx) with the vendor named from its PCI id. Video memory
/// is the largest prefetchable BAR, which is how much of it the host can address.
fn gpus(pci: &Path) -> Vec<Gpu> {
    let Ok(entries) = std::fs::read_dir(pci) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        let class = std::fs::read_to_string(dir.join("class")).unwrap_or_default();
        if !class.trim().starts_with("0x03") {
            continue;
        }
        let id = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let vendor = match id("vendor").as_str() {
            "0x10de" => "NVIDIA".to_string(),
            "0x1002" => "AMD".to_string(),
            "0x8086" => "Intel".to_string(),
            "0x1af4" => "Red Hat (virtio)".to_string(),
            "0x1234" => "QEMU".to_string(),
            other => other.to_string(),
        };
        let memory =
            largest_bar(&std::fs::read_to_string(dir.join("resource")).unwrap_or_default());
        out.push(Gpu {
            vendor,
            model: format!("{} at {}", id("device"), e.file_name().to_string_lossy()),
            memory,
        });
    }
    out.sort_by(|a, b| a.model.cmp(&b.model));
    out
}

fn largest_bar(resource: &str) -> u64 {
    resource
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let start = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            let end = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
            (end > start).then(|| end - start + 1)
        })
        .max()
        .unwrap_or(0)
}

pub use tfgrid_core::capacity::parse_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let d = discover(dir.path()).unwrap();
        assert!(d.cores >= 1);
        assert!(d.memory > d.memory_reserved, "{d:?}");
        assert!(d.disk.size > 0, "{d:?}");
        let o = d.offered();
        assert_eq!(o.sru + o.hru, d.disk.size);
        assert_eq!(o.cru, d.cores);
    }

    #[test]
    fn parses_meminfo_and_bars() {
        assert_eq!(
            mem_total("MemTotal:       24683656 kB\nMemFree: 1 kB\n").unwrap(),
            24683656 * 1024
        );
        assert!(mem_total("MemFree: 1 kB").is_err());
        let res = "0x00000000fd000000 0x00000000fdffffff 0x0000000000040200\n\
                   0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                   0x00000000e0000000 0x00000000efffffff 0x000000000014220c\n";
        assert_eq!(largest_bar(res), 256 * MIB);
    }

    #[test]
    fn finds_gpus_in_sysfs() {
        // A PCI tree as /sys/bus/pci/devices shows it: a GPU, a network card, a virtio GPU.
        let pci = tempfile::tempdir().unwrap();
        let dev = |addr: &str, class: &str, vendor: &str, device: &str, resource: &str| {
            let d = pci.path().join(addr);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
            std::fs::write(d.join("resource"), resource).unwrap();
        };
        let bar_16g = "0x0000004000000000 0x00000043ffffffff 0x000000000014220c\n";
        dev("0000:01:00.0", "0x030000", "0x10de", "0x2204", bar_16g);
        dev("0000:02:00.0", "0x020000", "0x8086", "0x1533", bar_16g);
        dev("0000:00:02.0", "0x038000", "0x1af4", "0x1050", "");
        let g = gpus(pci.path());
        assert_eq!(g.len(), 2, "{g:?}");
        let nv = g.iter().find(|x| x.vendor == "NVIDIA").unwrap();
        assert_eq!(nv.memory, 16 << 30);
        assert!(nv.model.contains("0x2204"));
        assert!(g.iter().any(|x| x.vendor == "Red Hat (virtio)"));
        assert!(gpus(&pci.path().join("missing")).is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("12Q").unwrap_err().contains("unit"));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
