//! Virtual machines on `tfgrid up`, through the bot and the CLI as a user drives them:
//! - a vm from the example web image, its volume a virtio disk, answers through the gateway;
//! - a vm whose guest kernel panics is restarted by its node, and moved by the bot once the node
//!   gives up on it;
//! - a vm from a small disk image (an OCI artifact pushed with `tfgrid disk push`) boots with its
//!   own kernel, takes its hostname, environment, address and the user's SSH key from the
//!   cloud-init seed, and `tfgrid ssh` reaches it over the deployment's network from this machine
//!   (joined with wireguard-go);
//! - `tfgrid rm` leaves no QEMU, tap, mount or file on any node.

mod common;
mod grid;
use common::have;
use grid::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn skip() -> Option<String> {
    if let Some(why) = grid_skip().or_else(tfgrid_net::hosts::unavailable) {
        return Some(why);
    }
    for c in [
        "qemu-system-x86_64",
        "qemu-img",
        "cloud-localds",
        "ssh",
        "ssh-keygen",
    ] {
        if !have(c) {
            return Some(format!(
                "{c} is not installed (apt-get install qemu-system-x86 qemu-utils cloud-image-utils openssh-client)"
            ));
        }
    }
    if tfgrid_node::kinds::vm::boot::find_kernel().is_err() {
        return Some("no kernel in /boot with modules (apt-get install linux-image-amd64)".into());
    }
    None
}

/// GET `path` of `host` through the gateway.
fn get(g: &Grid, host: &str, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "-m", "5", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://{}{path}", g.gateway))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn replica(g: &Grid, name: &str) -> serde_json::Value {
    inspect(g, name)["replicas"][0].clone()
}

/// Removes deployment `name` and waits until no node has a VM directory of its `service`.
fn rm_and_check_clean(g: &Grid, name: &str, service: &str) {
    ok(cli(g, &["rm", name]));
    wait_for(
        &format!("{name}'s VMs gone"),
        Duration::from_secs(30),
        || {
            let vms: Vec<_> = (1..=3)
                .flat_map(|i| {
                    std::fs::read_dir(g.data.join(format!("nodes/node{i}/vms")))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .ends_with(&format!("-{service}"))
                        })
                        .map(|e| e.path())
                })
                .collect();
            vms.is_empty()
        },
    );
}

#[test]
fn vms_boot_from_an_image_and_a_disk_heal_and_leave_nothing_behind() {
    if let Some(why) = skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = up(dir.path());

    // An image vm: the web image's httpd, its volume a virtio disk mounted at /data.
    let web = spec_file(
        dir.path(),
        "vmweb.yaml",
        &format!(
            "name: vmweb\nservices:\n  web:\n    kind: vm\n    image: {}\n    command: [sh, -c, \"cat /proc/mounts > /www/mounts.txt; httpd -f -p 8080 -h /www\"]\n    memory: 128M\n    disk: 64M\n    volumes: [{{name: data, size: 32M, path: /data}}]\n    expose: {{name: vmweb, port: 8080}}\n",
            g.image
        ),
    );
    ok(cli(&g, &["deploy", web.to_str().unwrap()]));
    wait_for(
        "the vm through the gateway",
        Duration::from_secs(90),
        || get(&g, "vmweb.gw.local", "/").as_deref() == Some("hello from tfgrid\n"),
    );
    let mounts = get(&g, "vmweb.gw.local", "/mounts.txt").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("/dev/vda /data ext4 ")),
        "{mounts}"
    );
    let r = replica(&g, "vmweb");
    let vmw = r["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["kind"] == "vm")
        .unwrap()
        .clone();
    assert_eq!(vmw["data"]["boot"], "image", "{vmw}");
    assert!(vmw["data"]["accel"] == "kvm" || vmw["data"]["accel"] == "tcg");
    let log = ok(cli(&g, &["logs", "vmweb"]));
    assert!(log.contains("tfgrid: starting the entrypoint"), "{log}");

    // A vm whose kernel panics: its node boots it again, up to 4 times in 2 minutes, then
    // gives up; the bot moves it to another node.
    let crashy = spec_file(
        dir.path(),
        "crashy.yaml",
        &format!(
            "name: crashy\nservices:\n  app:\n    kind: vm\n    image: {}\n    command: [sh, -c, \"sleep 1; echo c > /proc/sysrq-trigger\"]\n    memory: 128M\n",
            g.image
        ),
    );
    ok(cli(&g, &["deploy", crashy.to_str().unwrap()]));
    let first = replica(&g, "crashy")["node_id"].as_u64().unwrap();
    wait_for("the crashing vm moved", Duration::from_secs(180), || {
        replica(&g, "crashy")["node_id"].as_u64() != Some(first)
    });
    let events = ok(cli(&g, &["events", "--deployment", "crashy"]));
    assert!(events.contains("gave up after 4 restarts"), "{events}");
    assert!(events.contains("kernel panicked"), "{events}");
    rm_and_check_clean(&g, "crashy", "app");

    // A disk-image vm with cloud-init, reached with `tfgrid ssh` over its network.
    let disk = dir.path().join("cloud-disk.qcow2");
    let made = Command::new("sh")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloud-disk.sh"))
        .arg(&disk)
        .arg(dir.path().join("disk-work"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let registry = g.image.split('/').next().unwrap().to_string();
    let reference = format!("{registry}/cloud-disk:1");
    let pushed = ok(cli_plain(&[
        "disk",
        "push",
        disk.to_str().unwrap(),
        &reference,
        "--plain-http",
    ]));
    assert!(pushed.contains("pushed"), "{pushed}");
    let key = dir.path().join("id");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&key)
        .status()
        .unwrap();
    assert!(kg.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let boxspec = spec_file(
        dir.path(),
        "box.yaml",
        &format!(
            "name: box\nservices:\n  box:\n    kind: vm\n    disk_image: {reference}\n    memory: 512M\n    disk: 1G\n    env: {{GREETING: hello vm}}\n    ssh_keys: [\"{}\"]\n",
            public.trim()
        ),
    );
    ok(cli(&g, &["deploy", boxspec.to_str().unwrap()]));
    let r = replica(&g, "box");
    let vmw = r["workloads"][0].clone();
    assert_eq!(vmw["data"]["boot"], "disk", "{r}");
    let conf = ok(cli(
        &g,
        &[
            "network",
            "access",
            "box",
            "--key",
            dir.path().join("machine.key").to_str().unwrap(),
        ],
    ));
    let machine = join_machine(dir.path(), &conf);
    let ssh = |cmd: &str| {
        cli_ssh(
            &g,
            &[
                "box",
                "--",
                "-B",
                &machine.iface,
                "-i",
                key.to_str().unwrap(),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "BatchMode=yes",
                cmd,
            ],
        )
    };
    let t0 = std::time::Instant::now();
    let out = loop {
        let o = ssh("hostname; cat /etc/environment; uname -r");
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "ssh into the disk vm: {}\n{conf}\nconsole:\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&cli(&g, &["logs", "box"]).stdout)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "box", "{out}");
    assert!(out.contains("GREETING=\"hello vm\""), "{out}");
    // Another key is not let in.
    let other = dir.path().join("other");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&other)
        .status()
        .unwrap();
    let refused = cli_ssh(
        &g,
        &[
            "box",
            "--",
            "-B",
            &machine.iface,
            "-i",
            other.to_str().unwrap(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "true",
        ],
    );
    assert!(!refused.status.success());
    drop(machine);

    // A spec that asks a container for vm fields, or a vm for both boot modes, is refused.
    let bad = spec_file(
        dir.path(),
        "bad.yaml",
        &format!(
            "name: bad\nservices:\n  s:\n    kind: vm\n    image: {}\n    disk_image: {reference}\n",
            g.image
        ),
    );
    let o = cli(&g, &["deploy", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not both"),
        "{o:?}"
    );

    rm_and_check_clean(&g, "box", "box");
    rm_and_check_clean(&g, "vmweb", "web");
    assert_eq!(
        qemu_of(&format!("tfgrid-{}", bridge_prefix(&g.data))),
        Vec::<u32>::new()
    );
    drop(g);
    assert_eq!(
        host_leftovers(&dir.path().join("grid")),
        Vec::<String>::new()
    );
}

/// `tfgrid ssh ARGS`, the bot's address from the environment: everything after `--` is ssh's.
fn cli_ssh(g: &Grid, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .arg("ssh")
        .args(args)
        .env("TFGRID_BOT", &g.bot)
        .output()
        .unwrap()
}

/// `tfgrid ARGS` without a bot address.
fn cli_plain(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .args(args)
        .output()
        .unwrap()
}
