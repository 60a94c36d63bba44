//! What a user asks a node to run. The bot builds a Deployment, the registry holds its hash on the
//! node contract, the node refuses any deployment whose hash differs.

use crate::canonical::{self, Hash};
use crate::capacity::Capacity;
use crate::error::CoreError;
use crate::keys::{PublicKey, Signature};
use crate::{ContractId, TwinId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const DEPLOYMENT_DOMAIN: &str = "tfgrid/deployment/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub version: u32,
    pub twin_id: TwinId,
    /// Set after the contract exists; not covered by the hash (the hash goes on the contract).
    pub contract_id: ContractId,
    #[serde(default)]
    pub metadata: String,
    #[serde(default)]
    pub description: String,
    pub workloads: Vec<Workload>,
    /// The owner's signature over [`Deployment::hash`].
    #[serde(default)]
    pub signature: Option<Signature>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub version: u32,
    /// `^[a-zA-Z0-9_]+$`, at most 36 characters, unique in its deployment.
    pub name: String,
    pub data: WorkloadData,
    #[serde(default)]
    pub metadata: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Externally tagged (`{"container": {...}}`): the internally tagged form needs a self-describing
// format and the canonical encoding is not one.
#[serde(rename_all = "kebab-case")]
pub enum WorkloadData {
    Container(ContainerSpec),
    Volume(VolumeSpec),
    Zdb(ZdbSpec),
    GatewayNameProxy(GatewayNameProxySpec),
    Vm(VmSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// OCI image reference, e.g. `127.0.0.1:5000/web:latest`.
    pub image: String,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Logical cores.
    pub cpu: u32,
    /// Memory bytes.
    pub memory: u64,
    /// Writable layer size limit, counted as SSD.
    #[serde(default)]
    pub rootfs_size: u64,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// The owner's private network (registry id) the container joins: its address is then in
    /// the network's subnet on the node, and only the network reaches it. None: the node's own
    /// workload subnet, reachable from the whole grid.
    #[serde(default)]
    pub network: Option<crate::network::NetworkId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Name of a volume workload in the same deployment.
    pub volume: String,
    pub path: String,
}

/// A virtual machine: booted either from an OCI image's rootfs with the node's kernel, or from a
/// full disk image (an OCI artifact) with its own kernel. Exactly one of `image` and
/// `disk_image` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// OCI image whose rootfs the VM runs, its entrypoint as a container's.
    #[serde(default)]
    pub image: Option<String>,
    /// OCI artifact holding one qcow2 or raw disk, booted by its own bootloader and configured
    /// with cloud-init (NoCloud).
    #[serde(default)]
    pub disk_image: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Virtual CPUs.
    pub cpu: u32,
    /// Guest memory bytes.
    pub memory: u64,
    /// The root disk: a disk image is grown to it; an image's writable layer is bounded by it.
    /// Counted as SSD.
    pub disk_size: u64,
    /// Appended to the kernel command line (image mode only: a disk image has its own).
    #[serde(default)]
    pub kernel_args: Vec<String>,
    /// OpenSSH public keys let in as root.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Volumes of the deployment attached as virtio disks, mounted at `path` in the guest.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub network: Option<crate::network::NetworkId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZdbMode {
    User,
    Seq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZdbSpec {
    pub size: u64,
    pub mode: ZdbMode,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayNameProxySpec {
    /// The name held by a name contract; served as `name.<gateway domain>`.
    pub name: String,
    /// Backend URLs, e.g. `http://10.20.1.5:8080`.
    pub backends: Vec<String>,
}

impl WorkloadData {
    pub fn kind(&self) -> &'static str {
        match self {
            WorkloadData::Container(_) => "container",
            WorkloadData::Volume(_) => "volume",
            WorkloadData::Zdb(_) => "zdb",
            WorkloadData::GatewayNameProxy(_) => "gateway-name-proxy",
            WorkloadData::Vm(_) => "vm",
        }
    }

    pub fn capacity(&self) -> Capacity {
        match self {
            WorkloadData::Container(c) => Capacity {
                cru: c.cpu.into(),
                mru: c.memory,
                sru: c.rootfs_size,
                ..Default::default()
            },
            WorkloadData::Volume(v) => Capacity {
                sru: v.size,
                ..Default::default()
            },
            // 0-db is sequential-write friendly, so it is sold from HDD capacity as on ThreeFold.
            WorkloadData::Zdb(z) => Capacity {
                hru: z.size,
                ..Default::default()
            },
            WorkloadData::GatewayNameProxy(_) => Capacity::default(),
            WorkloadData::Vm(v) => Capacity {
                cru: v.cpu.into(),
                mru: v.memory,
                sru: v.disk_size,
                ..Default::default()
            },
        }
    }
}

/// The part of a deployment the hash covers: everything the user declares, not the contract id
/// (unknown when the hash goes on the contract) and not the signature.
#[derive(Serialize)]
struct HashedView<'a> {
    version: u32,
    twin_id: TwinId,
    metadata: &'a str,
    description: &'a str,
    workloads: &'a [Workload],
}

impl Deployment {
    pub fn hash(&self) -> Hash {
        canonical::hash(
            DEPLOYMENT_DOMAIN,
            &HashedView {
                version: self.version,
                twin_id: self.twin_id,
                metadata: &self.metadata,
                description: &self.description,
                workloads: &self.workloads,
            },
        )
    }

    pub fn capacity(&self) -> Result<Capacity, CoreError> {
        self.workloads
            .iter()
            .try_fold(Capacity::default(), |acc, w| {
                acc.checked_add(&w.data.capacity())
            })
    }

    pub fn sign(&mut self, id: &crate::Identity) {
        self.signature = Some(id.sign(&self.hash().0));
    }

    pub fn verify(&self, owner: &PublicKey) -> Result<(), CoreError> {
        let sig = self.signature.as_ref().ok_or(CoreError::BadSignature)?;
        owner.verify(&self.hash().0, sig)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultState {
    Init,
    Ok,
    Error,
    Deleted,
    Paused,
    Unchanged,
}

/// What a node reports for one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub created: crate::Millis,
    pub state: ResultState,
    /// Human-readable reason for any state but ok.
    #[serde(default)]
    pub message: String,
    /// Kind-specific output: addresses, ports, endpoints, URLs.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::GIB;

    fn sample() -> Deployment {
        Deployment {
            version: 0,
            twin_id: 7,
            contract_id: 0,
            metadata: String::new(),
            description: "web".into(),
            workloads: vec![
                Workload {
                    version: 0,
                    name: "data".into(),
                    data: WorkloadData::Volume(VolumeSpec { size: GIB }),
                    metadata: String::new(),
                    description: String::new(),
                },
                Workload {
                    version: 0,
                    name: "web".into(),
                    data: WorkloadData::Container(ContainerSpec {
                        image: "127.0.0.1:5000/web:1".into(),
                        entrypoint: None,
                        cmd: Some(vec!["httpd".into()]),
                        env: [("A".to_string(), "1".to_string())].into(),
                        cpu: 1,
                        memory: 256 << 20,
                        rootfs_size: 0,
                        mounts: vec![Mount {
                            volume: "data".into(),
                            path: "/data".into(),
                        }],
                        network: Some(3),
                    }),
                    metadata: String::new(),
                    description: String::new(),
                },
            ],
            signature: None,
        }
    }

    #[test]
    fn hash_ignores_contract_and_signature_but_covers_workloads() {
        let id = crate::Identity::generate();
        let mut d = sample();
        let h = d.hash();
        d.contract_id = 42;
        d.sign(&id);
        assert_eq!(d.hash(), h);
        d.verify(&id.public_key()).unwrap();
        d.workloads[0].data = WorkloadData::Volume(VolumeSpec { size: 2 * GIB });
        assert_ne!(d.hash(), h);
        assert!(d.verify(&id.public_key()).is_err());
    }

    #[test]
    fn capacity_sums_workloads() {
        let c = sample().capacity().unwrap();
        assert_eq!((c.cru, c.mru, c.sru), (1, 256 << 20, GIB));
    }

    #[test]
    fn json_roundtrip_keeps_hash() {
        let d = sample();
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"container\":{"), "{json}");
        let back: Deployment = serde_json::from_str(&json).unwrap();
        assert_eq!(back.hash(), d.hash());
    }
}
