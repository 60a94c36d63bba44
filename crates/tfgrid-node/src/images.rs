//! OCI images: pulled with oci-client, each layer unpacked once into a directory named by its digest
//! and shared (read-only, as an overlay lower layer) by every container that uses it.

use oci_client::client::{ClientConfig, ClientProtocol};
pub use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a container takes from its image besides the layers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub reference: String,
    pub digest: String,
    /// Unpacked layer directories, bottom layer first.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

/// The `config` part of an OCI image configuration, as registries serve it.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

#[derive(Deserialize)]
struct RawImageConfig {
    #[serde(default)]
    config: Option<RawConfig>,
}

pub struct Images {
    dir: PathBuf,
    client: Client,
    logins: HashMap<String, (String, String)>,
    /// Registry host:port -> the host:port to pull it from instead (a mirror).
    mirrors: HashMap<String, String>,
    /// One pull per reference at a time; others wait and then find it cached.
    pulling: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub fn install_crypto() {
    // oci-client is built without a bundled TLS crypto provider; ring is already in the tree.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Images {
    /// `insecure` lists registries (host:port) spoken to over plain HTTP; `logins` maps a
    /// registry to basic-auth credentials. All others are HTTPS and anonymous.
    /// `cas` are PEM certificates trusted for HTTPS registries besides the system's roots.
    pub fn new(
        dir: PathBuf,
        insecure: Vec<String>,
        logins: HashMap<String, (String, String)>,
        cas: Vec<Vec<u8>>,
    ) -> Self {
        install_crypto();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            extra_root_certificates: pem_certs(cas),
            ..Default::default()
        });
        Self {
            dir,
            client,
            logins,
            mirrors: HashMap::new(),
            pulling: Default::default(),
        }
    }

    /// Pull images of registry `from` (host:port) from `to` instead; references and the cache
    /// keep the name the workload gave.
    pub fn with_mirrors(mut self, mirrors: HashMap<String, String>) -> Self {
        self.mirrors = mirrors;
        self
    }

    fn layer_dir(&self, digest: &str) -> PathBuf {
        self.dir.join("layers").join(digest.replace(':', "-"))
    }

    fn ref_file(&self, reference: &str) -> PathBuf {
        self.dir.join("refs").join(format!(
            "{}.json",
            blake3::hash(reference.as_bytes()).to_hex()
        ))
    }

    /// The image, from the cache when this node has pulled the reference before (as a container
    /// engine's "if not present" policy), else from its registry.
    pub async fn ensure(&self, reference: &str) -> Result<Image, String> {
        if let Some(img) = self.cached(reference) {
            return Ok(img);
        }
        let gate = self
            .pulling
            .lock()
            .await
            .entry(reference.to_string())
            .or_default()
            .clone();
        let _g = gate.lock().await;
        if let Some(img) = self.cached(reference) {
            return Ok(img);
        }
        self.pull(reference).await
    }

    fn cached(&self, reference: &str) -> Option<Image> {
        let text = std::fs::read(self.ref_file(reference)).ok()?;
        let img: Image = serde_json::from_slice(&text).ok()?;
        img.layers.iter().all(|l| l.is_dir()).then_some(img)
    }

    /// The reference to pull, on its mirror when its registry has one.
    fn resolve(&self, reference: &str) -> Result<Reference, String> {
        let r: Reference = reference
            .parse()
            .map_err(|e| format!("image reference {reference:?}: {e}"))?;
        let Some(m) = self.mirrors.get(r.resolve_registry()) else {
            return Ok(r);
        };
        let (repo, m) = (r.repository().to_string(), m.clone());
        Ok(match (r.tag(), r.digest()) {
            (Some(t), Some(d)) => {
                Reference::with_tag_and_digest(m, repo, t.to_string(), d.to_string())
            }
            (None, Some(d)) => Reference::with_digest(m, repo, d.to_string()),
            (t, None) => Reference::with_tag(m, repo, t.unwrap_or("latest").to_string()),
        })
    }

    pub async fn pull(&self, reference: &str) -> Result<Image, String> {
        let r = self.resolve(reference)?;
        let auth = match self.logins.get(r.resolve_registry()) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(&r, &auth)
            .await
            .map_err(|e| format!("pulling {reference}: {e}"))?;
        let raw: RawImageConfig = serde_json::from_str(&config)
            .map_err(|e| format!("image {reference} has a bad config: {e}"))?;
        let c = raw.config.unwrap_or_default();
        let config = ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            workdir: c.working_dir.unwrap_or_default(),
        };
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let dir = self.layer_dir(&l.digest);
            if !dir.is_dir() {
                self.fetch_layer(&r, l, &dir).await?;
            }
            layers.push(dir);
        }
        let img = Image {
            reference: reference.to_string(),
            digest,
            layers,
            config,
        };
        let f = self.ref_file(reference);
        write_atomic(&f, &serde_json::to_vec(&img).expect("image serializes"))
            .map_err(|e| format!("saving {}: {e}", f.display()))?;
        tracing::info!(image = reference, digest = %img.digest, "pulled");
        Ok(img)
    }

    /// A disk image published as an OCI artifact: a manifest with one layer, the disk itself
    /// (qcow2 or raw, uncompressed). Fetched once into `disks/<digest>` and shared read-only as
    /// the backing file of every VM that boots it. Returns the file and the manifest digest.
    pub async fn disk(&self, reference: &str) -> Result<(PathBuf, String), String> {
        let gate = self
            .pulling
            .lock()
            .await
            .entry(reference.to_string())
            .or_default()
            .clone();
        let _g = gate.lock().await;
        let refs = self.dir.join("disk-refs").join(format!(
            "{}.json",
            blake3::hash(reference.as_bytes()).to_hex()
        ));
        if let Ok(t) = std::fs::read(&refs) {
            if let Ok((path, digest)) = serde_json::from_slice::<(PathBuf, String)>(&t) {
                if path.is_file() {
                    return Ok((path, digest));
                }
            }
        }
        let r = self.resolve(reference)?;
        let auth = match self.logins.get(r.resolve_registry()) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let (manifest, digest) = self
            .client
            .pull_image_manifest(&r, &auth)
            .await
            .map_err(|e| format!("pulling {reference}: {e}"))?;
        let [layer] = manifest.layers.as_slice() else {
            return Err(format!(
                "{reference} has {} layers; a disk image has exactly one (the disk)",
                manifest.layers.len()
            ));
        };
        let disks = self.dir.join("disks");
        std::fs::create_dir_all(&disks).map_err(|e| format!("{}: {e}", disks.display()))?;
        let size = u64::try_from(layer.size).unwrap_or(0);
        crate::capacity::check_room(&disks, size, &format!("disk image {reference}"))?;
        let path = disks.join(layer.digest.replace(':', "-"));
        if !path.is_file() {
            let tmp = path.with_extension("partial");
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            // oci-client checks the blob against its digest while it streams it.
            if let Err(e) = self.client.pull_blob(&r, layer, file).await {
                let _ = std::fs::remove_file(&tmp);
                return Err(format!("pulling the disk of {reference}: {e}"));
            }
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        write_atomic(
            &refs,
            &serde_json::to_vec(&(&path, &digest)).expect("serializes"),
        )
        .map_err(|e| format!("saving {}: {e}", refs.display()))?;
        tracing::info!(image = reference, %digest, "pulled a disk image");
        Ok((path, digest))
    }

    async fn fetch_layer(
        &self,
        r: &Reference,
        l: &oci_client::manifest::OciDescriptor,
        dir: &Path,
    ) -> Result<(), String> {
        let blobs = self.dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
        let gz = l.media_type.ends_with("gzip") || l.media_type.ends_with(".tar.gzip");
        // The blob, then its unpacked files (a gzip layer unpacks to a few times its size).
        let size = u64::try_from(l.size).unwrap_or(0);
        let need = size.saturating_mul(if gz { 5 } else { 2 });
        crate::capacity::check_room(&blobs, need, &format!("image layer {}", l.digest))?;
        tfgrid_core::faults::crash_point("node-before-blob");
        let blob = blobs.join(l.digest.replace(':', "-"));
        let r = self.fetch_and_unpack(r, l, &blob, gz, dir).await;
        // Whatever happened, the blob goes, and so does a half-unpacked layer: a failed pull
        // (a full disk, a broken connection) leaves nothing behind.
        let _ = std::fs::remove_file(&blob);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(dir.with_extension("partial"));
        }
        r
    }

    async fn fetch_and_unpack(
        &self,
        r: &Reference,
        l: &oci_client::manifest::OciDescriptor,
        blob: &Path,
        gz: bool,
        dir: &Path,
    ) -> Result<(), String> {
        let file = tokio::fs::File::create(blob)
            .await
            .map_err(|e| format!("{}: {e}", blob.display()))?;
        // oci-client checks the blob against its digest while it streams it.
        self.client
            .pull_blob(r, l, file)
            .await
            .map_err(|e| format!("pulling layer {}: {e}", l.digest))?;
        let (blob2, dir2) = (blob.to_path_buf(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || unpack(&blob2, gz, &dir2))
            .await
            .map_err(|e| format!("unpacking: {e}"))?
            .map_err(|e| format!("unpacking layer {}: {}", l.digest, chain(&e)))
    }
}

/// An error with its causes: tar hides the reason (e.g. EPERM) in its source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Unpacks a layer tar into `dir` (via a temporary sibling, so a half-unpacked layer is never
/// taken for a cached one), turning OCI whiteouts into overlayfs ones.
fn unpack(blob: &Path, gz: bool, dir: &Path) -> std::io::Result<()> {
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let f = std::fs::File::open(blob)?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = tmp.join(path.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            std::fs::create_dir_all(&parent)?;
            xattr::set(&parent, "trusted.overlay.opaque", b"y")?;
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            std::fs::create_dir_all(&parent)?;
            // overlayfs marks a deleted lower file with a 0:0 character device of its name.
            nix::sys::stat::mknod(
                &parent.join(hidden),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(std::io::Error::from)?;
        } else {
            entry.unpack_in(&tmp)?;
        }
    }
    std::fs::rename(&tmp, dir)
}

/// A minimal image for local grids, examples, tests and benchmarks, made from the host's static
/// busybox (Debian's busybox-static): busybox with its common applets linked, `/www/index.html`
/// holding `page`, and `cmd` as the image's command. Pushed to `registry` (plain HTTP, anonymous)
/// as `<registry>/<name>:latest`, which is returned.
pub async fn push_busybox_image(
    registry: &str,
    name: &str,
    cmd: &[&str],
    page: &str,
) -> Result<String, String> {
    push_busybox_image_as(registry, name, cmd, page, &RegistryAuth::Anonymous, None).await
}

/// Publishes a disk image (qcow2 or raw) as an OCI artifact a VM boots with `disk_image`: one
/// layer, the disk as it is, typed by its format. Plain HTTP when `plain_http` (a local
/// registry), else HTTPS. Returns the manifest's URL. The disk is read whole into memory.
pub async fn push_disk_image(
    reference: &str,
    file: &Path,
    plain_http: bool,
    auth: &RegistryAuth,
) -> Result<String, String> {
    let disk = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let format = if disk.starts_with(b"QFI\xfb") {
        "qcow2"
    } else {
        "raw"
    };
    let config = serde_json::json!({"format": format});
    install_crypto();
    let client = Client::new(ClientConfig {
        protocol: if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    let r: Reference = reference.parse().map_err(|e| format!("{reference}: {e}"))?;
    let pushed = client
        .push(
            &r,
            &[oci_client::client::ImageLayer::new(
                disk,
                format!("application/vnd.tfgrid.disk.{format}"),
                None,
            )],
            oci_client::client::Config::new(
                serde_json::to_vec(&config).expect("config serializes"),
                "application/vnd.tfgrid.disk.config.v1+json".into(),
                None,
            ),
            auth,
            None,
        )
        .await
        .map_err(|e| format!("pushing {reference}: {e}"))?;
    Ok(pushed.manifest_url)
}

fn pem_certs(cas: Vec<Vec<u8>>) -> Vec<oci_client::client::Certificate> {
    cas.into_iter()
        .map(|data| oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data,
        })
        .collect()
}

/// [`push_busybox_image`] with credentials, and over HTTPS trusting `ca` (PEM) when given.
pub async fn push_busybox_image_as(
    registry: &str,
    name: &str,
    cmd: &[&str],
    page: &str,
    auth: &RegistryAuth,
    ca: Option<&[u8]>,
) -> Result<String, String> {
    use sha2::Digest;
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| format!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
    let header = |kind: tar::EntryType, size: u64, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    let io = |e: std::io::Error| format!("building the layer: {e}");
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["bin", "tmp", "proc", "sys", "dev", "etc", "www"] {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        tar.append_data(&mut h, dir, std::io::empty()).map_err(io)?;
    }
    let mut h = header(tar::EntryType::Regular, busybox.len() as u64, 0o755);
    tar.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .map_err(io)?;
    for applet in [
        "sh", "httpd", "head", "tail", "cat", "sleep", "echo", "ls", "wget", "nc", "env",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0, 0o777);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .map_err(io)?;
    }
    let mut h = header(tar::EntryType::Regular, page.len() as u64, 0o644);
    tar.append_data(&mut h, "www/index.html", page.as_bytes())
        .map_err(io)?;
    let layer = tar.into_inner().map_err(io)?;
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&layer)));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    install_crypto();
    let client = Client::new(ClientConfig {
        protocol: match ca {
            Some(_) => ClientProtocol::Https,
            None => ClientProtocol::Http,
        },
        extra_root_certificates: pem_certs(ca.map(|c| c.to_vec()).into_iter().collect()),
        ..Default::default()
    });
    let reference = format!("{registry}/{name}:latest");
    let r: Reference = reference.parse().map_err(|e| format!("{reference}: {e}"))?;
    client
        .push(
            &r,
            &[oci_client::client::ImageLayer::new(
                layer,
                "application/vnd.oci.image.layer.v1.tar".into(),
                None,
            )],
            oci_client::client::Config::new(
                serde_json::to_vec(&config).expect("config serializes"),
                "application/vnd.oci.image.config.v1+json".into(),
                None,
            ),
            auth,
            None,
        )
        .await
        .map_err(|e| format!("pushing {reference}: {e}"))?;
    Ok(reference)
}

/// A local OCI registry: Debian's docker-registry (the CNCF distribution registry) on a free
/// loopback port, storing under `dir`. For local grids, tests and benchmarks; stopped on drop.
pub struct LocalRegistry {
    child: std::process::Child,
    /// `127.0.0.1:<port>`, as image references and `--insecure-registry` name it.
    pub addr: String,
}

impl LocalRegistry {
    pub fn start(dir: &Path) -> Result<Self, String> {
        Self::start_with(dir, None, None, None)
    }

    /// With `htpasswd` (a bcrypt htpasswd file), every request needs basic auth; with `tls`
    /// (certificate and key PEM files) it speaks HTTPS.
    /// `listen` picks the address (a free loopback port when `None`).
    pub fn start_with(
        dir: &Path,
        listen: Option<std::net::SocketAddr>,
        htpasswd: Option<&Path>,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Self, String> {
        let addr = match listen {
            Some(a) => a.to_string(),
            None => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map_err(|e| format!("finding a free port: {e}"))?
                    .port();
                format!("127.0.0.1:{port}")
            }
        };
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Err(format!(
                "{addr} is in use (another image registry or grid running?)"
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cfg = dir.join("registry.yml");
        let auth = htpasswd
            .map(|p| {
                format!(
                    "auth:\n  htpasswd:\n    realm: tfgrid\n    path: {}\n",
                    p.display()
                )
            })
            .unwrap_or_default();
        let tls = tls
            .map(|(cert, key)| {
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                )
            })
            .unwrap_or_default();
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{tls}{auth}",
                dir.join("data").display()
            ),
        )
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("docker-registry: {e} (apt-get install docker-registry)"))?;
        let mut me = Self { child, addr };
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(&me.addr).is_err() {
            // (a TCP connect: ready for HTTP and HTTPS alike)
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(format!("docker-registry exited: {status}"));
            }
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                return Err("docker-registry did not listen within 10 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        me.child.try_wait().ok();
        Ok(me)
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
