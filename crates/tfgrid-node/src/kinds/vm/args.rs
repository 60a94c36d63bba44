//! The QEMU command lines of the two boot modes, and what image mode hands the guest's init: the
//! start script and the volumes' disk serials.

use super::boot::{Accel, Boot};
use std::collections::BTreeMap;
use std::path::Path;
use tfgrid_core::deployment::VmSpec;

/// A volume's disk serial (at most 20 bytes in virtio-blk): its name, which the engine limits
/// to letters, digits and _ ; longer names are cut and keep a hash.
pub(super) fn serial(volume: &str) -> String {
    if volume.len() <= 20 {
        volume.to_string()
    } else {
        let h = blake3::hash(volume.as_bytes()).to_hex();
        format!("{}{}", &volume[..12], &h[..8])
    }
}

pub(super) fn image_mode_args(v: &Path, boot: &Boot, accel: Accel, spec: &VmSpec) -> Vec<String> {
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
pub(super) fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1))?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

pub(super) fn disk_mode_args(v: &Path, accel: Accel) -> Vec<String> {
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

pub(super) fn accel_args(accel: Accel) -> Vec<String> {
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
pub(super) fn net_device(args: &[String], mac: &str) -> Vec<String> {
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
pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script the guest's init runs in the rootfs (with busybox, which the init binds in):
/// enter the workdir, exec the entrypoint with exactly the image's and the spec's environment.
pub(super) fn start_script(spec: &VmSpec, image: &crate::images::Image) -> Result<String, String> {
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
