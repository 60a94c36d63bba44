//! Deployment specs: what a user declares, in YAML. Parse errors carry the YAML parser's line and
//! column and the field path; checks after parsing name the field they are about.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use tfgrid_core::checks;
use tfgrid_core::deployment::ZdbMode;
use tfgrid_core::FarmId;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// YAML that does not parse into a spec (the message has the line and column).
    #[error("{0}")]
    Parse(String),
    /// A value that parses but is not allowed: `field` is its path, e.g. `services.web.memory`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// Bytes, written as `256M`, `1G`, or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not an untagged enum: buffering would lose the value's line in errors.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as 256M, 1G or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                tfgrid_core::capacity::parse_size(s)
                    .map(Size)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The deployment's name: `tfgrid ps`, `rm` and the dashboard use it.
    pub name: String,
    /// The private network its services live in (made when first used; kept after `rm`).
    /// Deployments that name the same network reach each other; the default is one of its own,
    /// named after the deployment.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    /// Object storage: the bot places a pool of zdb namespaces (the service [`STORAGE_SERVICE`],
    /// one replica per shard) and serves it over S3.
    #[serde(default)]
    pub storage: Option<StorageDecl>,
}

/// The service a `storage:` section becomes: one replica per shard, each a zdb namespace.
pub const STORAGE_SERVICE: &str = "storage";
/// The zdb workload of each storage replica.
pub const STORAGE_ZDB: &str = "shards";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageDecl {
    /// `data+parity`, e.g. `16+4`: any `data` of the shards read an object back.
    #[serde(default = "default_shards")]
    pub shards: String,
    /// What the pool holds (the user's bytes); each of the data+parity namespaces gets
    /// size/data plus 1/16 for padding and metadata.
    pub size: Size,
    #[serde(default)]
    pub placement: Placement,
}

fn default_shards() -> String {
    "16+4".into()
}

impl StorageDecl {
    /// (data, parity)
    pub fn layout(&self) -> Result<(u8, u8), String> {
        let bad = || format!("{:?}: write data+parity, e.g. 16+4", self.shards);
        let (k, m) = self.shards.split_once('+').ok_or_else(bad)?;
        let (k, m): (u8, u8) = (
            k.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if k == 0 || m == 0 || usize::from(k) + usize::from(m) > 64 {
            return Err(format!(
                "{k}+{m}: at least one data and one parity shard, at most 64 in all"
            ));
        }
        Ok((k, m))
    }

    pub fn slot_size(&self) -> u64 {
        let k = self.layout().map(|(k, _)| u64::from(k)).unwrap_or(1);
        let per = self.size.0.div_ceil(k);
        per + per / 16
    }

    /// The service this section stands for (zdb passwords are filled in by the bot, from the
    /// user's key).
    pub fn service(&self) -> Service {
        let (k, m) = self.layout().unwrap_or((1, 1));
        Service {
            kind: ServiceKind::Container,
            image: String::new(),
            disk_image: None,
            kernel_args: Vec::new(),
            ssh_keys: Vec::new(),
            command: None,
            entrypoint: None,
            env: BTreeMap::new(),
            cpu: 1,
            memory: default_memory(),
            disk: default_disk(),
            volumes: Vec::new(),
            replicas: u32::from(k) + u32::from(m),
            zdbs: vec![ZdbDecl {
                name: STORAGE_ZDB.into(),
                size: Size(self.slot_size()),
                mode: ZdbMode::User,
                password: String::new(),
            }],
            expose: None,
            placement: Placement {
                distinct_nodes: true,
                ..self.placement.clone()
            },
        }
    }
}

impl Spec {
    /// Whether any service runs a container (a spec of namespaces only is in no network).
    pub fn needs_network(&self) -> bool {
        self.services.values().any(|s| s.runs())
    }

    pub fn network_name(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }
}

fn one() -> u32 {
    1
}

fn default_memory() -> Size {
    Size(256 << 20)
}

fn default_disk() -> Size {
    Size(256 << 20)
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `container` (the default) or `vm`: the same service run as a virtual machine, with its
    /// own kernel.
    #[serde(default)]
    pub kind: ServiceKind,
    /// The container's image (for a vm: the image whose rootfs it boots with the node's
    /// kernel); a service without one (nor a disk_image) is only its zdb namespaces.
    #[serde(default)]
    pub image: String,
    /// A vm booted from a full disk image (qcow2 or raw, an OCI artifact) with its own kernel,
    /// configured by cloud-init; instead of `image`.
    #[serde(default)]
    pub disk_image: Option<String>,
    /// A vm's extra kernel command line words (image vms).
    #[serde(default)]
    pub kernel_args: Vec<String>,
    /// OpenSSH public keys a vm lets in as root.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Replaces the image's command (as `docker run IMAGE command...`).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub cpu: u32,
    #[serde(default = "default_memory")]
    pub memory: Size,
    /// The container's writable layer (its own files outside volumes), or a vm's root disk,
    /// bounded and reserved as SSD on the node.
    #[serde(default = "default_disk")]
    pub disk: Size,
    #[serde(default)]
    pub volumes: Vec<VolumeDecl>,
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub zdbs: Vec<ZdbDecl>,
    #[serde(default)]
    pub expose: Option<Expose>,
    #[serde(default)]
    pub placement: Placement,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    #[default]
    Container,
    Vm,
}

impl Service {
    /// Whether the service runs anything (a container or a vm) besides its namespaces.
    pub fn runs(&self) -> bool {
        !self.image.is_empty() || self.disk_image.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDecl {
    pub name: String,
    pub size: Size,
    /// Where it is mounted in the container.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZdbDecl {
    pub name: String,
    pub size: Size,
    #[serde(default = "user_mode")]
    pub mode: ZdbMode,
    #[serde(default)]
    pub password: String,
}

fn user_mode() -> ZdbMode {
    ZdbMode::User
}

/// A public name through a gateway: `name.<gateway domain>` -> the replicas' `port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expose {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub country: Option<String>,
    #[serde(default)]
    pub farms: Option<Vec<FarmId>>,
    /// Each replica on its own node (default true).
    #[serde(default = "yes")]
    pub distinct_nodes: bool,
    #[serde(default)]
    pub gpu: bool,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            country: None,
            farms: None,
            distinct_nodes: true,
            gpu: false,
        }
    }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
}

pub const MAX_YAML: usize = 256 << 10;
pub const MAX_DEPTH: usize = 16;

/// An upper bound on how deeply a YAML text nests: indentation levels on the stack, plus `- `
/// sequence markers on a line, plus open flow brackets (`[`, `{`). Quotes are not parsed, so a
/// bracket inside a string counts too: the bound is only ever too high, never too low.
fn nesting(yaml: &str) -> usize {
    let mut indents: Vec<usize> = Vec::new();
    let (mut flow, mut max) = (0usize, 0usize);
    for line in yaml.lines() {
        let t = line.trim_start_matches([' ', '\t']);
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let ind = line.len() - t.len();
        while indents.last().is_some_and(|&i| i > ind) {
            indents.pop();
        }
        if indents.last() != Some(&ind) {
            indents.push(ind);
        }
        let mut rest = t;
        let mut dashes = 0;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("-\t")) {
            dashes += 1;
            rest = r.trim_start();
        }
        let mut peak = flow;
        for b in rest.bytes() {
            match b {
                b'[' | b'{' => {
                    flow += 1;
                    peak = peak.max(flow);
                }
                b']' | b'}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
        max = max.max(indents.len() + dashes + peak);
    }
    max
}

impl Spec {
    /// [`Spec::parse`] on a blocking thread, so a large spec never stalls the async workers.
    pub async fn parse_blocking(yaml: String) -> Result<Spec, SpecError> {
        tokio::task::spawn_blocking(move || Spec::parse(&yaml))
            .await
            .unwrap_or_else(|e| Err(SpecError::Parse(format!("the parser failed: {e}"))))
    }

    /// Parses and checks a spec. Its size and nesting are bounded first: the YAML parser's time
    /// grows with nesting, and a spec is a few kilobytes of shallow YAML. The parse is CPU work;
    /// async callers run it on a blocking thread ([`Spec::parse_blocking`]).
    pub fn parse(yaml: &str) -> Result<Spec, SpecError> {
        if yaml.len() > MAX_YAML {
            return Err(SpecError::Parse(format!(
                "the spec is {} bytes; at most {MAX_YAML} are accepted",
                yaml.len()
            )));
        }
        let depth = nesting(yaml);
        if depth > MAX_DEPTH {
            return Err(SpecError::Parse(format!(
                "the spec nests {depth} levels deep; at most {MAX_DEPTH} are accepted"
            )));
        }
        let mut spec: Spec =
            serde_yaml_ng::from_str(yaml).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        if let Some(st) = &spec.storage {
            spec.services.insert(STORAGE_SERVICE.into(), st.service());
        }
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: String, message: &str| {
            Err(SpecError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if !valid_name(&self.name, 32) {
            return bad(
                "name".into(),
                "use 1 to 32 lowercase letters, digits or - (not first)",
            );
        }
        if let Some(n) = &self.network {
            if let Err(e) = tfgrid_core::network::check_name(n) {
                return bad("network".into(), &e);
            }
        }
        if let Some(st) = &self.storage {
            if let Err(e) = st.layout() {
                return bad("storage.shards".into(), &e);
            }
            checks::size(st.size.0, 1 << 20).or_else(|e| bad("storage.size".into(), &e))?;
            if self.services.contains_key(STORAGE_SERVICE) {
                return bad(
                    format!("services.{STORAGE_SERVICE}"),
                    "is the name of the storage section's service; choose another",
                );
            }
        } else if self.services.is_empty() {
            return bad(
                "services".into(),
                "declare at least one service (or a storage section)",
            );
        }
        let mut exposed = std::collections::HashSet::new();
        for (sname, s) in &self.services {
            let f = |x: &str| format!("services.{sname}.{x}");
            // Workload names on nodes are `<service>_<volume>` etc. within 36 characters.
            if !valid_name(sname, 16) {
                return bad(
                    format!("services.{sname}"),
                    "service names: 1 to 16 lowercase letters, digits or -",
                );
            }
            let vm = s.kind == ServiceKind::Vm;
            if !vm
                && (s.disk_image.is_some() || !s.kernel_args.is_empty() || !s.ssh_keys.is_empty())
            {
                return bad(
                    f("kind"),
                    "disk_image, kernel_args and ssh_keys are for kind: vm",
                );
            }
            if vm {
                match (s.image.is_empty(), &s.disk_image) {
                    (false, Some(_)) => {
                        return bad(
                            f("disk_image"),
                            "a vm boots an image or a disk_image, not both",
                        )
                    }
                    (true, None) => return bad(f("image"), "a vm needs an image or a disk_image"),
                    (_, Some(d)) => {
                        checks::image_ref(d).or_else(|e| bad(f("disk_image"), &e))?;
                        if s.command.is_some()
                            || s.entrypoint.is_some()
                            || !s.kernel_args.is_empty()
                        {
                            return bad(
                                f("disk_image"),
                                "boots its own system: command, entrypoint and kernel_args are for image vms",
                            );
                        }
                    }
                    _ => {}
                }
                checks::size(s.memory.0, 64 << 20)
                    .or_else(|_| bad(f("memory"), "a vm needs at least 64M"))?;
                for (i, a) in s.kernel_args.iter().enumerate() {
                    checks::kernel_arg(a).or_else(|e| bad(f(&format!("kernel_args[{i}]")), &e))?;
                }
                for (i, k) in s.ssh_keys.iter().enumerate() {
                    checks::ssh_key(k).or_else(|e| bad(f(&format!("ssh_keys[{i}]")), &e))?;
                }
            }
            if !s.runs() {
                // Namespaces only: nothing that belongs to a container.
                if s.zdbs.is_empty() {
                    return bad(
                        f("image"),
                        "is required (a service without one declares zdbs only)",
                    );
                }
                if !s.volumes.is_empty()
                    || s.command.is_some()
                    || s.entrypoint.is_some()
                    || !s.env.is_empty()
                    || s.expose.is_some()
                {
                    return bad(
                        f("image"),
                        "is required for volumes, command, entrypoint, env or expose",
                    );
                }
            } else if !s.image.is_empty() {
                checks::image_ref(&s.image).or_else(|e| bad(f("image"), &e))?;
            }
            if s.cpu == 0 || s.cpu > 64 {
                return bad(f("cpu"), "must be 1 to 64 cores");
            }
            checks::size(s.memory.0, 16 << 20).or_else(|e| bad(f("memory"), &e))?;
            checks::size(s.disk.0, 16 << 20).or_else(|e| bad(f("disk"), &e))?;
            if s.replicas == 0 || s.replicas > 100 {
                return bad(f("replicas"), "must be 1 to 100");
            }
            for (what, args) in [("command", &s.command), ("entrypoint", &s.entrypoint)] {
                if let Some(a) = args {
                    checks::command(a).or_else(|(i, e)| {
                        let at = if a.is_empty() {
                            what.to_string()
                        } else {
                            format!("{what}[{i}]")
                        };
                        bad(f(&at), &e)
                    })?;
                }
            }
            let mut names = std::collections::HashSet::new();
            let mut paths = std::collections::HashSet::new();
            for (i, v) in s.volumes.iter().enumerate() {
                if !valid_name(&v.name, 16) || !names.insert(v.name.clone()) {
                    return bad(
                        f(&format!("volumes[{i}].name")),
                        "1 to 16 lowercase letters, digits or -, unique in the service",
                    );
                }
                checks::size(v.size.0, 1 << 20)
                    .or_else(|e| bad(f(&format!("volumes[{i}].size")), &e))?;
                checks::mount_path(&v.path)
                    .or_else(|e| bad(f(&format!("volumes[{i}].path")), &e))?;
                if !paths.insert(v.path.as_str()) {
                    return bad(
                        f(&format!("volumes[{i}].path")),
                        "another volume of the service is mounted there",
                    );
                }
            }
            for (i, z) in s.zdbs.iter().enumerate() {
                if !valid_name(&z.name, 16) || !names.insert(z.name.clone()) {
                    return bad(
                        f(&format!("zdbs[{i}].name")),
                        "1 to 16 lowercase letters, digits or -, unique in the service",
                    );
                }
                checks::size(z.size.0, 1).or_else(|e| bad(f(&format!("zdbs[{i}].size")), &e))?;
                checks::zdb_password(&z.password)
                    .or_else(|e| bad(f(&format!("zdbs[{i}].password")), &e))?;
            }
            if let Some(e) = &s.expose {
                if !valid_name(&e.name, 63) {
                    return bad(
                        f("expose.name"),
                        "a DNS label: 1 to 63 lowercase letters, digits or -",
                    );
                }
                if !exposed.insert(e.name.clone()) {
                    return bad(f("expose.name"), "is exposed by another service too");
                }
                if e.port == 0 {
                    return bad(f("expose.port"), "must not be 0");
                }
            }
            for (k, v) in &s.env {
                // The key is printed escaped: it may hold the very characters that are refused.
                let field = || f(&format!("env.{}", k.escape_debug()));
                checks::env_name(k).or_else(|e| bad(field(), &e))?;
                checks::arg(v).or_else(|e| bad(field(), &e))?;
            }
            if let Some(c) = &s.placement.country {
                if c.len() > 64 || c.chars().any(|c| c.is_control()) {
                    return bad(f("placement.country"), "is not a country name or code");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
name: shop
services:
  web:
    image: 127.0.0.1:5000/web:latest
    command: [/bin/httpd, -f, -p, '8080', -h, /www]
    env: {MODE: prod}
    cpu: 1
    memory: 128M
    replicas: 2
    volumes:
      - {name: data, size: 1G, path: /data}
    zdbs:
      - {name: cache, size: 512M, mode: seq, password: s3cret}
    expose: {name: shop, port: 8080}
    placement: {farms: [1, 2], distinct_nodes: true}
";

    #[test]
    fn parses_a_full_spec() {
        let s = Spec::parse(GOOD).unwrap();
        let web = &s.services["web"];
        assert_eq!(web.memory, Size(128 << 20));
        assert_eq!(web.volumes[0].size, Size(1 << 30));
        assert_eq!(web.zdbs[0].mode, ZdbMode::Seq);
        assert_eq!(web.replicas, 2);
        assert_eq!(web.expose.as_ref().unwrap().port, 8080);
        assert_eq!(web.placement.farms, Some(vec![1, 2]));
    }

    #[test]
    fn defaults() {
        let s = Spec::parse("name: a\nservices:\n  s:\n    image: x\n").unwrap();
        let s = &s.services["s"];
        assert_eq!((s.cpu, s.memory, s.replicas), (1, Size(256 << 20), 1));
        assert!(s.placement.distinct_nodes);
    }

    #[test]
    fn errors_point_at_the_line_or_field() {
        let typo = GOOD.replace("    cpu: 1", "    cpus: 1");
        let e = Spec::parse(&typo).unwrap_err().to_string();
        assert!(e.contains("cpus") && e.contains("line 8"), "{e}");
        let bad_size = GOOD.replace("128M", "128Q");
        let e = Spec::parse(&bad_size).unwrap_err().to_string();
        assert!(e.contains("unit") && e.contains("line 9"), "{e}");
        let small = GOOD.replace("128M", "1M");
        assert_eq!(
            Spec::parse(&small).unwrap_err().to_string(),
            "services.web.memory: must be at least 16.0 MiB"
        );
        let no_name = GOOD.replace("name: shop\n", "");
        assert!(Spec::parse(&no_name)
            .unwrap_err()
            .to_string()
            .contains("missing field `name`"));
        let rel = GOOD.replace("path: /data", "path: data");
        assert!(Spec::parse(&rel)
            .unwrap_err()
            .to_string()
            .starts_with("services.web.volumes[0].path"));
        assert!(Spec::parse("{{{").is_err());
        assert!(Spec::parse("name: x\nservices: {}\n")
            .unwrap_err()
            .to_string()
            .starts_with("services:"));
    }

    /// Every mistake the adversarial run found only after contracts were made (or accepted when
    /// it should not have) is refused by the spec check, naming the field.
    #[test]
    fn refuses_what_a_node_would_fail_on() {
        let base = "name: a\nservices:\n  s:\n    image: 127.0.0.1:5000/web:latest\n";
        let cases: &[(&str, &str)] = &[
            ("    image: 'not a ref!!'\n", "services.s.image"),
            ("    image: 127.0.0.1:99999/web\n", "services.s.image"),
            ("    volumes: [{name: v, size: 1G, path: /}]\n", "services.s.volumes[0].path"),
            ("    volumes: [{name: v, size: 1G, path: /proc}]\n", "services.s.volumes[0].path"),
            ("    volumes: [{name: v, size: 1G, path: /dev}]\n", "services.s.volumes[0].path"),
            ("    volumes: [{name: v, size: 1G, path: /sys}]\n", "services.s.volumes[0].path"),
            ("    volumes: [{name: v, size: 1G, path: //}]\n", "services.s.volumes[0].path"),
            (
                "    volumes: [{name: v, size: 1G, path: /d}, {name: w, size: 1G, path: /d}]\n",
                "services.s.volumes[1].path",
            ),
            ("    env: {A: \"x\\0y\"}\n", "services.s.env.A"),
            ("    env: {\"A\\nB\": x}\n", "services.s.env.A\\nB"),
            ("    command: [/bin/sh, \"a\\0\"]\n", "services.s.command[1]"),
            ("    command: []\n", "services.s.command"),
            ("    entrypoint: []\n", "services.s.entrypoint"),
            (
                "    zdbs: [{name: z, size: 1G, password: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx}]\n",
                "services.s.zdbs[0].password",
            ),
            ("    memory: 18446744073709551615\n", "services.s.memory"),
            (
                "    volumes: [{name: v, size: 18446744073709551615, path: /d}]\n",
                "services.s.volumes[0].size",
            ),
            ("    zdbs: [{name: z, size: 16000000T}]\n", "services.s.zdbs[0].size"),
        ];
        for (extra, field) in cases {
            let yaml = if extra.starts_with("    image:") {
                format!("name: a\nservices:\n  s:\n{extra}")
            } else {
                format!("{base}{extra}")
            };
            match Spec::parse(&yaml) {
                Err(SpecError::Invalid { field: got, .. }) => {
                    assert_eq!(&got, field, "{yaml}")
                }
                other => panic!("{yaml}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_storage_section_is_a_service_of_namespaces_on_distinct_nodes() {
        let s = Spec::parse(
            "name: files\nstorage:\n  shards: 4+2\n  size: 4G\n  placement: {farms: [2]}\n",
        )
        .unwrap();
        let svc = &s.services[STORAGE_SERVICE];
        assert_eq!(svc.replicas, 6);
        assert!(svc.image.is_empty());
        assert!(svc.placement.distinct_nodes);
        assert_eq!(svc.placement.farms, Some(vec![2]));
        // 4G / 4 data shards = 1G each, plus 1/16.
        assert_eq!(svc.zdbs[0].size.0, (1 << 30) + (1 << 26));
        assert_eq!(svc.zdbs[0].name, STORAGE_ZDB);
        // The default is 16+4.
        let s = Spec::parse("name: f\nstorage: {size: 1G}\n").unwrap();
        assert_eq!(s.services[STORAGE_SERVICE].replicas, 20);
        for (yaml, field) in [
            (
                "name: f\nstorage: {size: 1G, shards: '4'}\n",
                "storage.shards",
            ),
            (
                "name: f\nstorage: {size: 1G, shards: 0+2}\n",
                "storage.shards",
            ),
            (
                "name: f\nstorage: {size: 1G, shards: 60+10}\n",
                "storage.shards",
            ),
            ("name: f\nstorage: {size: 0}\n", "storage.size"),
            (
                "name: f\nstorage: {size: 1G}\nservices:\n  storage: {image: x}\n",
                "services.storage",
            ),
            ("name: f\n", "services"),
            // Without an image only zdbs; with volumes or env it needs one.
            ("name: f\nservices:\n  s: {cpu: 1}\n", "services.s.image"),
            (
                "name: f\nservices:\n  s: {zdbs: [{name: z, size: 1G}], env: {A: b}}\n",
                "services.s.image",
            ),
        ] {
            match Spec::parse(yaml) {
                Err(SpecError::Invalid { field: got, .. }) => assert_eq!(got, field, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
        assert!(Spec::parse("name: f\nservices:\n  s: {zdbs: [{name: z, size: 1G}]}\n").is_ok());
    }

    #[test]
    fn large_or_deep_yaml_is_refused_quickly() {
        let deep = format!(
            "name: a\nservices: {}{}\n",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        let e = Spec::parse(&deep).unwrap_err().to_string();
        assert!(e.contains("levels deep"), "{e}");
        let mut block = String::from("name: a\nservices:\n");
        for i in 0..40 {
            block.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 1)));
        }
        assert!(Spec::parse(&block)
            .unwrap_err()
            .to_string()
            .contains("levels deep"));
        let dashes = format!("name: a\nservices:\n  x:\n    {}1\n", "- ".repeat(100));
        assert!(Spec::parse(&dashes)
            .unwrap_err()
            .to_string()
            .contains("levels deep"));
        let big = format!("name: a\n#{}\nservices: {{}}\n", "x".repeat(MAX_YAML));
        assert!(Spec::parse(&big)
            .unwrap_err()
            .to_string()
            .contains("at most"));
        // The example specs are far from the bounds.
        for f in ["web.yaml", "shop.yaml", "vm.yaml"] {
            let y = std::fs::read_to_string(format!(
                "{}/../../examples/{f}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            assert!(nesting(&y) <= 6, "{f}: {}", nesting(&y));
        }
    }

    #[test]
    fn vm_services_parse_and_bad_ones_say_which_field() {
        let y = std::fs::read_to_string(format!(
            "{}/../../examples/vm.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let s = Spec::parse(&y).unwrap();
        assert_eq!(s.services["web"].kind, ServiceKind::Vm);
        assert!(s.needs_network());
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx7 me";
        let disk = Spec::parse(&format!(
            "name: b\nservices:\n  b:\n    kind: vm\n    disk_image: r/d:1\n    memory: 512M\n    ssh_keys: [\"{key}\"]\n"
        ))
        .unwrap();
        assert!(disk.services["b"].runs() && disk.needs_network());
        for (bad, field) in [
            (
                "    kind: vm\n    image: r/x\n    disk_image: r/d\n",
                "disk_image",
            ),
            ("    kind: vm\n    memory: 256M\n", "image"),
            ("    kind: vm\n    image: r/x\n    memory: 32M\n", "memory"),
            (
                "    kind: vm\n    disk_image: r/d\n    command: [x]\n",
                "disk_image",
            ),
            (
                "    kind: vm\n    image: r/x\n    kernel_args: [\"a b\"]\n",
                "kernel_args[0]",
            ),
            (
                "    kind: vm\n    image: r/x\n    ssh_keys: [nonsense]\n",
                "ssh_keys[0]",
            ),
            (
                "    image: r/x\n    ssh_keys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx7\"]\n",
                "kind",
            ),
            ("    kind: machine\n    image: r/x\n", "kind"),
        ] {
            let e = Spec::parse(&format!("name: a\nservices:\n  s:\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }
}
