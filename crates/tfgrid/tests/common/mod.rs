//! What the process tests share: whether they may run here.
// Each test binary includes this module and uses only some of it.
#![allow(dead_code)]

use std::process::{Command, Stdio};

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when `cmd` is on the PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
