//! The cloud-init NoCloud seed for disk-image VMs: user-data (hostname, the user's SSH keys, the
//! environment as /etc/environment), meta-data and a version 2 network-config, packed into an
//! ISO labelled `cidata` by Debian's cloud-localds (cloud-image-utils).

use super::super::run;
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use tfgrid_core::deployment::VmSpec;

/// A YAML double-quoted scalar: everything a user gives is escaped, so no key or env value can
/// add configuration of its own.
fn q(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(o, "\\x{:02x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub struct SeedNet {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

pub fn user_data(hostname: &str, spec: &VmSpec) -> String {
    let mut u = String::from("#cloud-config\n");
    let _ = writeln!(u, "hostname: {}", q(hostname));
    let _ = writeln!(u, "preserve_hostname: false");
    let _ = writeln!(u, "disable_root: false");
    let _ = writeln!(u, "ssh_pwauth: false");
    if !spec.ssh_keys.is_empty() {
        u.push_str("ssh_authorized_keys:\n");
        for k in &spec.ssh_keys {
            let _ = writeln!(u, "  - {}", q(k.trim()));
        }
    }
    if !spec.env.is_empty() {
        let mut env = String::new();
        for (k, v) in &spec.env {
            let _ = writeln!(
                env,
                "{k}=\"{}\"",
                v.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        u.push_str("write_files:\n  - path: /etc/environment\n    append: true\n");
        let _ = writeln!(u, "    content: {}", q(&env));
    }
    if !spec.mounts.is_empty() {
        u.push_str("mounts:\n");
        for m in &spec.mounts {
            let _ = writeln!(
                u,
                "  - [{}, {}, ext4, \"defaults,nofail\", \"0\", \"2\"]",
                q(&format!("/dev/disk/by-id/virtio-{}", m.volume)),
                q(&m.path)
            );
        }
    }
    u
}

pub fn network_config(n: &SeedNet) -> String {
    format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{}\"\n    set-name: eth0\n    addresses: [\"{}/{}\"]\n    routes:\n      - to: 0.0.0.0/0\n        via: {}\n",
        n.mac, n.ip, n.prefix, n.gateway
    )
}

/// Writes the three files under `dir` and packs them into `dir/seed.iso`.
pub async fn make(
    dir: &Path,
    instance: &str,
    hostname: &str,
    spec: &VmSpec,
    net: &SeedNet,
) -> Result<(), String> {
    let files = dir.join("seed");
    std::fs::create_dir_all(&files).map_err(|e| format!("{}: {e}", files.display()))?;
    let w = |name: &str, text: String| {
        std::fs::write(files.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    w("user-data", user_data(hostname, spec))?;
    w(
        "meta-data",
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            q(instance),
            q(hostname)
        ),
    )?;
    w("network-config", network_config(net))?;
    let p = |n: &str| files.join(n).to_string_lossy().into_owned();
    run(
        "cloud-localds",
        &[
            "-N",
            &p("network-config"),
            &dir.join("seed.iso").to_string_lossy(),
            &p("user-data"),
            &p("meta-data"),
        ],
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_values_cannot_break_out_of_their_scalars() {
        let spec = VmSpec {
            image: None,
            disk_image: Some("r/x".into()),
            entrypoint: None,
            cmd: None,
            env: [("A".to_string(), "x\"\nruncmd: [reboot]".to_string())].into(),
            cpu: 1,
            memory: 256 << 20,
            disk_size: 1 << 30,
            kernel_args: vec![],
            ssh_keys: vec!["ssh-ed25519 AAAA me\"\nruncmd: [x]".into()],
            mounts: vec![],
            network: None,
        };
        let u = user_data("web", &spec);
        // Every line is ours: no user text starts a line of its own.
        for l in u.lines() {
            assert!(!l.starts_with("runcmd"), "{u}");
        }
        assert!(u.contains("ssh_authorized_keys:\n  - \"ssh-ed25519 AAAA me\\\"\\nruncmd: [x]\""));
    }
}
