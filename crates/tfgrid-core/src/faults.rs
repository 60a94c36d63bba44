//! Crash points, so process tests can kill a process at a chosen step of a flow (after the first
//! contract, during a removal, ...) instead of hoping a timed `kill -9` lands there.
//!
//! `TFGRID_CRASH_AT=point[,point...]` makes the process SIGKILL itself when it reaches a named
//! point: no destructor, flush or handler runs, exactly as `kill -9`. With
//! `TFGRID_CRASH_ONCE_DIR=DIR` each point fires only once (a marker `DIR/<point>` is made before the
//! kill), so a supervisor that restarts the process does not see it die again at the same step.
//! Unset, a point costs one read of a cached environment lookup.

use std::sync::OnceLock;

struct Plan {
    points: Vec<String>,
    once_dir: Option<std::path::PathBuf>,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let points: Vec<String> = std::env::var("TFGRID_CRASH_AT")
            .ok()?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Some(Plan {
            points,
            once_dir: std::env::var_os("TFGRID_CRASH_ONCE_DIR").map(Into::into),
        })
    })
    .as_ref()
}

pub fn crash_point(name: &str) {
    let Some(p) = plan() else { return };
    if !p.points.iter().any(|x| x == name) {
        return;
    }
    if let Some(dir) = &p.once_dir {
        let marker = dir.join(name);
        // create_new: the first process to reach the point takes it; the others pass.
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_err()
        {
            return;
        }
    }
    eprintln!("crash point {name}: killing this process (TFGRID_CRASH_AT)");
    // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
