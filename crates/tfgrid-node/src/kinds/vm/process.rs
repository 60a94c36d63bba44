//! QEMU as a process: started daemonized, found again by its pid file and name, stopped, put in
//! its cgroup, and watched by a supervisor that boots it again when it stops.

use super::super::{read_tail, run, trim_log, Output, Report, Reporter, WorkloadId};
use super::args::net_device;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tfgrid_core::deployment::{ResultState, VmSpec};

/// Restarts allowed within [`RESTART_WINDOW`] before the VM is left in error.
const MAX_RESTARTS: usize = 4;
const RESTART_WINDOW: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);
/// Starts QEMU daemonized with `args` (+ the net device); its own errors come back as the
/// message. The pid file is QEMU's own, written before it returns.
pub(super) async fn start(qemu: &str, v: &Path, args: &[String]) -> Result<(), String> {
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
pub(super) fn mac_of(v: &Path) -> String {
    std::fs::read_to_string(v.join("mac"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "52:54:00:00:00:01".into())
}

pub(super) fn saved_output(v: &Path) -> Output {
    std::fs::read(v.join("output"))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

pub(super) fn alive(v: &Path, name: &str) -> Option<i32> {
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
pub(super) async fn stop(pid: i32) {
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
pub(super) fn join_cgroup(cgroup: &str, v: &Path, spec: &VmSpec) {
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

pub(super) fn leave_cgroup(cgroup: &str) {
    for ctl in ["cpu", "memory"] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{ctl}{cgroup}"));
    }
}

/// Watches one VM: when QEMU exits (the guest powered off, panicked or its entrypoint ended)
/// it says why from the console and starts it again, up to [`MAX_RESTARTS`] in
/// [`RESTART_WINDOW`]; past that the VM is left in error for its owner's bot to move.
pub(super) struct Supervisor {
    pub(super) qemu: String,
    pub(super) name: String,
    pub(super) vdir: PathBuf,
    pub(super) cgroup: String,
    pub(super) reporter: Reporter,
    pub(super) log_limit: u64,
    pub(super) spec: VmSpec,
    pub(super) id: WorkloadId,
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
        // QEMU appends (append=on, O_APPEND): see `trim_log`.
        trim_log(&self.vdir.join("log"), self.log_limit);
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

    pub(super) async fn run(self) {
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
