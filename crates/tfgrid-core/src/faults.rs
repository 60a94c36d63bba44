//! Crash points, so process tests can kill a process at a chosen step of a flow (after the first
//! contract, during a removal, ...) instead of hoping a timed `kill -9` lands there.
//!
//! `TFGRID_CRASH_AT=point[,point...]` makes the process SIGKILL itself when it reaches a named
//! point: no destructor, flush or handler runs, exactly as `kill -9`. With
//! `TFGRID_CRASH_ONCE_DIR=DIR` each point fires only once (a marker `DIR/<point>` is made before the
//! kill), so a supervisor that restarts the process does not see it die again at the same step.
//! `TFGRID_PAUSE_AT=point[,...]` (with `TFGRID_CRASH_ONCE_DIR`) makes the process wait at a point
//! instead: it creates `DIR/<point>.paused` and goes on once the test removes that file (at most
//! 60 s), so a test can act (kill another process, walk away as a client) at that exact step. The
//! wait blocks the calling thread; other tasks go on on the runtime's other workers.
//! Unset, a point costs one read of a cached environment lookup.

use std::sync::OnceLock;

struct Plan {
    points: Vec<String>,
    pauses: Vec<String>,
    once_dir: Option<std::path::PathBuf>,
}

fn list(var: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let (points, pauses) = (list("TFGRID_CRASH_AT"), list("TFGRID_PAUSE_AT"));
        if points.is_empty() && pauses.is_empty() {
            return None;
        }
        Some(Plan {
            points,
            pauses,
            once_dir: std::env::var_os("TFGRID_CRASH_ONCE_DIR").map(Into::into),
        })
    })
    .as_ref()
}

/// Whether this point fires now: listed, and (with a once-dir) not fired before.
fn fires(p: &Plan, list: &[String], name: &str) -> bool {
    if !list.iter().any(|x| x == name) {
        return false;
    }
    match &p.once_dir {
        // create_new: the first process (or thread) to reach the point takes it; others pass.
        Some(dir) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .is_ok(),
        None => true,
    }
}

pub fn crash_point(name: &str) {
    let Some(p) = plan() else { return };
    if fires(p, &p.pauses, name) {
        if let Some(dir) = &p.once_dir {
            let flag = dir.join(format!("{name}.paused"));
            let _ = std::fs::write(&flag, b"");
            eprintln!(
                "pause point {name}: waiting until {} is removed",
                flag.display()
            );
            let t0 = std::time::Instant::now();
            while flag.exists() && t0.elapsed() < std::time::Duration::from_secs(60) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    if !fires(p, &p.points, name) {
        return;
    }
    eprintln!("crash point {name}: killing this process (TFGRID_CRASH_AT)");
    // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
