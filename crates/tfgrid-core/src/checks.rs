//! The rules a workload's fields must follow, shared by the bot (which checks a spec before it
//! makes any contract) and the node (which never trusts what it is sent). Each check returns a
//! message that says what is allowed; the caller adds the field it is about.

/// The largest size any one workload may ask for (1 PiB): with at most a thousand workloads per
/// deployment, no sum of sizes can overflow a u64.
pub const MAX_SIZE: u64 = 1 << 50;
/// A zdb namespace password (0-db keeps it as given; it travels in one RESP argument).
pub const MAX_PASSWORD: usize = 128;
pub const MAX_ARG: usize = 32 << 10;
pub const MAX_ARGS_TOTAL: usize = 128 << 10;
pub const MAX_ENV: usize = 256;
pub const MAX_PATH: usize = 255;

/// A container mount point: absolute and normal (no empty, `.` or `..` parts, no trailing `/`),
/// and not `/` or the kernel's filesystems (`/proc`, `/sys`, `/dev`), which the runtime mounts.
pub fn mount_path(p: &str) -> Result<(), String> {
    if p.len() > MAX_PATH {
        return Err(format!("longer than {MAX_PATH} bytes"));
    }
    if p.chars().any(|c| c.is_control()) {
        return Err("contains control characters".into());
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Err("must be an absolute path".into());
    };
    if rest.is_empty() {
        return Err("cannot be / (the container's root)".into());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err("must be a normal path: no //, /./, /../ or trailing /".into());
    }
    if matches!(parts[0], "proc" | "sys" | "dev") {
        return Err(format!(
            "cannot be under /{} (the runtime mounts it)",
            parts[0]
        ));
    }
    Ok(())
}

/// An environment variable name as POSIX shells take it: letters, digits, `_`, not first a digit.
pub fn env_name(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= MAX_ENV
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "is not a variable name (1 to {MAX_ENV} letters, digits or _, not first a digit)"
        ))
    }
}

/// An argument or environment value: no NUL (it cannot reach a process), bounded.
pub fn arg(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if s.len() > MAX_ARG {
        return Err(format!("longer than {MAX_ARG} bytes"));
    }
    Ok(())
}

/// A command or entrypoint: when given, it names something to run.
pub fn command(args: &[String]) -> Result<(), (usize, String)> {
    if args.is_empty() {
        return Err((0, "is empty: leave it out to use the image's".into()));
    }
    let mut total = 0;
    for (i, a) in args.iter().enumerate() {
        arg(a).map_err(|e| (i, e))?;
        total += a.len();
    }
    if total > MAX_ARGS_TOTAL {
        return Err((0, format!("longer than {MAX_ARGS_TOTAL} bytes in all")));
    }
    if args[0].is_empty() {
        return Err((0, "the program to run is empty".into()));
    }
    Ok(())
}

/// One kernel command-line word for a VM: printable, no spaces or quotes (the node joins them
/// with spaces), bounded.
pub fn kernel_arg(a: &str) -> Result<(), String> {
    if a.is_empty() || a.len() > 256 {
        return Err("must be 1 to 256 bytes".into());
    }
    if !a
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\'')
    {
        return Err("use printable ASCII without spaces or quotes (one word per argument)".into());
    }
    Ok(())
}

/// An OpenSSH public key line: a key type, base64 key data and an optional comment, one line.
pub fn ssh_key(k: &str) -> Result<(), String> {
    if k.len() > 16 << 10 {
        return Err("longer than 16 KiB".into());
    }
    if k.chars().any(|c| c.is_control()) {
        return Err("must be one line (no control characters)".into());
    }
    let mut parts = k.split_whitespace();
    let (Some(kind), Some(data)) = (parts.next(), parts.next()) else {
        return Err("expected \"TYPE BASE64 [comment]\" as in an .pub file".into());
    };
    let kinds = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !kinds.contains(&kind) {
        return Err(format!("key type {kind:?} is not one OpenSSH takes"));
    }
    if data.len() < 16
        || !data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
    {
        return Err("the key data is not base64".into());
    }
    Ok(())
}

pub fn zdb_password(p: &str) -> Result<(), String> {
    if p.len() > MAX_PASSWORD {
        return Err(format!("longer than {MAX_PASSWORD} bytes"));
    }
    if !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("use printable ASCII without spaces".into());
    }
    Ok(())
}

pub fn size(n: u64, min: u64) -> Result<(), String> {
    if n < min {
        return Err(format!(
            "must be at least {}",
            crate::capacity::human_bytes(min)
        ));
    }
    if n > MAX_SIZE {
        return Err("must be at most 1P".into());
    }
    Ok(())
}

/// An OCI image reference: `[host[:port]/]path[:tag][@digest]` in the distribution spec's grammar.
/// Written here because the reference parsers at hand live in the image-pulling crates, which the
/// bot (and this crate) must not depend on; the node parses it again with oci-client to pull.
pub fn image_ref(r: &str) -> Result<(), String> {
    if r.is_empty() {
        return Err("is empty".into());
    }
    if r.len() > 512 {
        return Err("longer than 512 bytes".into());
    }
    if r.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{r:?} is not an image reference: it contains spaces or control characters"
        ));
    }
    let bad = |why: &str| Err(format!("{r:?} is not an image reference: {why}"));
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let Some((algo, hex)) = d.split_once(':') else {
            return bad("a digest is algorithm:hex");
        };
        let algo_ok = !algo.is_empty()
            && algo
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !algo_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("a digest is algorithm:hex (at least 32 hex digits)");
        }
    }
    // A tag follows the last `:` after the last `/` (an earlier `:` is a registry port).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            return bad("a tag is 1 to 128 letters, digits, _, . or - (not first . or -)");
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // The first part is a registry host when it has a `.` or `:`, or is `localhost`.
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        host_port(parts[0]).or_else(|e| bad(&e))?;
        parts.remove(0);
    }
    for p in parts {
        let comp_ok = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && p.as_bytes()[0].is_ascii_alphanumeric()
            && p.as_bytes()[p.len() - 1].is_ascii_alphanumeric();
        if !comp_ok {
            return bad("each path part is lowercase letters and digits, joined by ., _ or -");
        }
    }
    Ok(())
}

/// `host[:port]` or `[ipv6][:port]`, as in URLs and image references.
pub fn host_port(h: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or("an IPv6 registry address is [addr]:port")?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        (None, after.strip_prefix(':'))
    } else {
        match h.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(h), None),
        }
    };
    if let Some(host) = host {
        let ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("{host:?} is not a registry host name"));
        }
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => {}
            _ => return Err(format!("registry port {p:?} is not 1 to 65535")),
        }
    }
    Ok(())
}

/// A gateway backend, `http://a.b.c.d:port` with an optional `/`: its address. The node checks
/// backends with it; the bot reads the networks of its routes' backends with it.
pub fn backend_ip(backend: &str) -> Result<std::net::Ipv4Addr, String> {
    let bad = || format!("backend {backend:?}: expected http://<workload IPv4>:<port>");
    let rest = backend.strip_prefix("http://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    host.parse().map_err(|_| bad())
}

/// A relay address in a twin's record: `ws://` or `wss://` with a host, or empty (no relay). Other
/// peers and relays dial it, so nothing else (`javascript:`, `file:`, a bare word) is taken.
pub fn relay_url(u: &str) -> Result<(), String> {
    if u.is_empty() {
        return Ok(());
    }
    let rest = u
        .strip_prefix("ws://")
        .or_else(|| u.strip_prefix("wss://"))
        .ok_or_else(|| format!("relay address {u:?} must start with ws:// or wss://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "relay address {u:?} must name a host (and no user)"
        ));
    }
    host_port(authority).map_err(|e| format!("relay address {u:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "library/busybox:1.36",
            "127.0.0.1:5000/web:latest",
            "localhost/a/b",
            "registry.example.org:443/team/app-x_y.z:v1.2-rc",
            "[::1]:5000/web",
            "web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "web:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            image_ref(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "not a ref!!",
            "127.0.0.1:99999/web",
            "127.0.0.1:0/web",
            "Web",
            "web:",
            "web:-x",
            "web@sha256:12",
            "a//b",
            "-a",
            "a-",
            "web\0",
            "host..x:5000/web",
            "[zz]:5000/web",
        ] {
            assert!(image_ref(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn relay_urls() {
        for good in [
            "",
            "ws://127.0.0.1:9000/",
            "wss://relay.example.org",
            "ws://[::1]:9000/x",
        ] {
            relay_url(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "javascript:alert(1)",
            "http://x",
            "ws://",
            "ws:///x",
            "ws://a@b",
            "ws://h:99999/",
            "ws://bad host/",
            "file:///etc/passwd",
        ] {
            assert!(relay_url(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn mount_paths() {
        for good in ["/data", "/var/lib/db", "/procfs", "/devices/x"] {
            mount_path(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "/", "//", "data", "/proc", "/proc/x", "/sys", "/sys/fs", "/dev", "/dev/shm", "/a//b",
            "/a/", "/a/./b", "/a/../b", "/a\0", "/a\nb",
        ] {
            assert!(mount_path(bad).is_err(), "{bad:?} passed");
        }
        assert!(mount_path(&format!("/{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn env_args_passwords_sizes() {
        env_name("PATH").unwrap();
        env_name("_x1").unwrap();
        for bad in ["", "1A", "A=B", "A\nB", "A B", "A\0"] {
            assert!(env_name(bad).is_err(), "{bad:?}");
        }
        assert!(arg("a\0b").is_err());
        assert!(command(&[]).is_err());
        assert!(command(&["".into()]).is_err());
        assert_eq!(command(&["x".into(), "a\0".into()]).unwrap_err().0, 1);
        command(&["/bin/sh".into(), "-c".into(), "echo hi".into()]).unwrap();
        zdb_password("s3cret!").unwrap();
        assert!(zdb_password(&"x".repeat(129)).is_err());
        assert!(zdb_password("with space").is_err());
        assert!(size(u64::MAX, 1).is_err());
        assert!(size(0, 1).is_err());
        size(1 << 30, 1 << 20).unwrap();
    }

    #[test]
    fn vm_kernel_args_and_ssh_keys() {
        kernel_arg("init=/bin/sh").unwrap();
        for bad in ["", "a b", "a\nb", "x\"y", "it's"] {
            assert!(kernel_arg(bad).is_err(), "{bad:?}");
        }
        ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx7 me@host").unwrap();
        ssh_key("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB").unwrap();
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx7 me\nssh-rsa AAAA",
            "ssh-ed25519 not*base64*at*all*here",
        ] {
            assert!(ssh_key(bad).is_err(), "{bad:?}");
        }
    }
}
