//! Registry transactions: every change to the registry is one, signed by the key that makes it.

use crate::canonical::{self, Hash};
use crate::capacity::Capacity;
use crate::error::CoreError;
use crate::keys::{Identity, PublicKey, Signature};
use crate::network::{NetworkHost, NetworkId};
use crate::records::{Gpu, Location, Overlay, PublicConfig, X25519Key};
use crate::{ContractId, FarmId, Millis, NodeId, TwinId};
use serde::{Deserialize, Serialize};

pub const TX_DOMAIN: &str = "tfgrid/tx/v1";
pub const SIGNED_TX_DOMAIN: &str = "tfgrid/signed-tx/v1";
/// HTTP content type of a transaction sent in its canonical binary form instead of JSON.
pub const BINARY_CONTENT_TYPE: &str = "application/x-tfgrid-tx";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tx {
    /// The key that signs; the registry maps it to its twin (none yet for `CreateTwin`).
    pub signer: PublicKey,
    /// Strictly greater than the signer's previous nonce: a replayed transaction is refused.
    pub nonce: u64,
    pub call: Call,
}

// A call is made once, signed and sent (or applied once): its size in memory is not worth a box
// in every match on `RegisterNode`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    CreateTwin {
        relay: String,
        enc_key: Option<X25519Key>,
    },
    UpdateTwin {
        relay: String,
        enc_key: Option<X25519Key>,
    },
    CreateFarm {
        name: String,
        dedicated: bool,
    },
    UpdateFarm {
        farm_id: FarmId,
        name: String,
        dedicated: bool,
    },
    AddFarmIp {
        farm_id: FarmId,
        ip: String,
        gateway: String,
    },
    RemoveFarmIp {
        farm_id: FarmId,
        ip: String,
    },
    /// Signed by the node's own twin. Creates the node, or updates it when the twin has one.
    RegisterNode(NodeSpec),
    /// Signed by the node's twin; the registry stamps its own time on it.
    ReportUptime {
        uptime: u64,
    },
    CreateNodeContract {
        node_id: NodeId,
        deployment_hash: Hash,
        capacity: Capacity,
    },
    UpdateNodeContract {
        contract_id: ContractId,
        deployment_hash: Hash,
        capacity: Capacity,
    },
    CreateNameContract {
        name: String,
    },
    CancelContract {
        contract_id: ContractId,
    },
    /// A private network of the signer's, named uniquely among the signer's networks.
    CreateNetwork {
        name: String,
    },
    /// Gives the network a subnet on the node (nothing changes when it has one).
    AddNetworkNode {
        network_id: NetworkId,
        node_id: NodeId,
    },
    /// One of the owner's machines joins with this WireGuard key, peering with that node; the
    /// key's address is kept when it is added again (with another node, say).
    AddNetworkAccess {
        network_id: NetworkId,
        wg_key: X25519Key,
        node_id: NodeId,
    },
    /// The network's service names, replacing the ones it had.
    SetNetworkHosts {
        network_id: NetworkId,
        hosts: Vec<NetworkHost>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub farm_id: FarmId,
    /// What the node offers. `ipv4` must be 0: public addresses belong to the farm.
    pub total: Capacity,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub public_config: PublicConfig,
    #[serde(default)]
    pub overlay: Option<Overlay>,
}

impl Call {
    pub fn name(&self) -> &'static str {
        match self {
            Call::CreateTwin { .. } => "create_twin",
            Call::UpdateTwin { .. } => "update_twin",
            Call::CreateFarm { .. } => "create_farm",
            Call::UpdateFarm { .. } => "update_farm",
            Call::AddFarmIp { .. } => "add_farm_ip",
            Call::RemoveFarmIp { .. } => "remove_farm_ip",
            Call::RegisterNode(_) => "register_node",
            Call::ReportUptime { .. } => "report_uptime",
            Call::CreateNodeContract { .. } => "create_node_contract",
            Call::UpdateNodeContract { .. } => "update_node_contract",
            Call::CreateNameContract { .. } => "create_name_contract",
            Call::CancelContract { .. } => "cancel_contract",
            Call::CreateNetwork { .. } => "create_network",
            Call::AddNetworkNode { .. } => "add_network_node",
            Call::AddNetworkAccess { .. } => "add_network_access",
            Call::SetNetworkHosts { .. } => "set_network_hosts",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedTx {
    pub tx: Tx,
    /// Over `canonical::encode(TX_DOMAIN, tx)`.
    pub signature: Signature,
}

impl Tx {
    pub fn signing_bytes(&self) -> Vec<u8> {
        canonical::encode(TX_DOMAIN, self)
    }

    pub fn sign(self, id: &Identity) -> SignedTx {
        let signature = id.sign(&self.signing_bytes());
        SignedTx {
            tx: self,
            signature,
        }
    }
}

impl SignedTx {
    pub fn new(id: &Identity, nonce: u64, call: Call) -> Self {
        Tx {
            signer: id.public_key(),
            nonce,
            call,
        }
        .sign(id)
    }

    pub fn verify(&self) -> Result<(), CoreError> {
        self.tx
            .signer
            .verify(&self.tx.signing_bytes(), &self.signature)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        canonical::encode(SIGNED_TX_DOMAIN, self)
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, CoreError> {
        canonical::decode(SIGNED_TX_DOMAIN, b)
    }

    pub fn hash(&self) -> Hash {
        canonical::hash(SIGNED_TX_DOMAIN, self)
    }
}

/// What a committed transaction did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// Position in the registry's transaction log.
    pub height: u64,
    pub tx_hash: Hash,
    /// Registry time at which it was applied.
    pub at: Millis,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    TwinCreated {
        twin_id: TwinId,
    },
    TwinUpdated {
        twin_id: TwinId,
    },
    FarmCreated {
        farm_id: FarmId,
    },
    FarmUpdated {
        farm_id: FarmId,
    },
    NodeRegistered {
        node_id: NodeId,
    },
    NodeUpdated {
        node_id: NodeId,
    },
    UptimeRecorded {
        node_id: NodeId,
    },
    ContractCreated {
        contract_id: ContractId,
        public_ips: Vec<String>,
    },
    ContractUpdated {
        contract_id: ContractId,
    },
    ContractCanceled {
        contract_id: ContractId,
    },
    NetworkCreated {
        network_id: NetworkId,
    },
    NetworkUpdated {
        network_id: NetworkId,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_string() -> impl Strategy<Value = String> {
        "\\PC{0,24}"
    }

    fn arb_capacity() -> impl Strategy<Value = Capacity> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(cru, mru, sru, hru, gpu, ipv4)| Capacity {
                cru,
                mru,
                sru,
                hru,
                gpu,
                ipv4,
            })
    }

    fn arb_call() -> impl Strategy<Value = Call> {
        let key = any::<[u8; 32]>();
        prop_oneof![
            (arb_string(), proptest::option::of(key)).prop_map(|(relay, k)| {
                Call::CreateTwin {
                    relay,
                    enc_key: k.map(X25519Key),
                }
            }),
            (arb_string(), any::<bool>())
                .prop_map(|(name, dedicated)| Call::CreateFarm { name, dedicated }),
            (any::<u32>(), arb_string(), arb_string()).prop_map(|(farm_id, ip, gateway)| {
                Call::AddFarmIp {
                    farm_id,
                    ip,
                    gateway,
                }
            }),
            (
                any::<u32>(),
                arb_capacity(),
                proptest::collection::vec((arb_string(), arb_string(), any::<u64>()), 0..3),
                arb_string(),
                proptest::option::of(-90.0f64..90.0),
                proptest::option::of(arb_string()),
            )
                .prop_map(|(farm_id, total, gpus, country, latitude, domain)| {
                    Call::RegisterNode(NodeSpec {
                        farm_id,
                        total,
                        gpus: gpus
                            .into_iter()
                            .map(|(vendor, model, memory)| Gpu {
                                vendor,
                                model,
                                memory,
                            })
                            .collect(),
                        location: Location {
                            country,
                            city: String::new(),
                            latitude,
                            longitude: None,
                        },
                        public_config: PublicConfig {
                            domain,
                            ..Default::default()
                        },
                        overlay: None,
                    })
                }),
            any::<u64>().prop_map(|uptime| Call::ReportUptime { uptime }),
            (any::<u32>(), key, arb_capacity()).prop_map(|(node_id, h, capacity)| {
                Call::CreateNodeContract {
                    node_id,
                    deployment_hash: Hash(h),
                    capacity,
                }
            }),
            arb_string().prop_map(|name| Call::CreateNameContract { name }),
            any::<u64>().prop_map(|contract_id| Call::CancelContract { contract_id }),
        ]
    }

    proptest! {
        #[test]
        fn canonical_roundtrip(seed in any::<[u8; 32]>(), nonce in any::<u64>(), call in arb_call()) {
            let id = Identity::from_seed(seed);
            let stx = SignedTx::new(&id, nonce, call);
            stx.verify().unwrap();
            // binary: decode(encode(x)) == x, and encoding is a function of the value alone
            let bytes = stx.to_bytes();
            let back = SignedTx::from_bytes(&bytes).unwrap();
            prop_assert_eq!(&back, &stx);
            prop_assert_eq!(back.to_bytes(), bytes.clone());
            // JSON (the HTTP form) carries exactly the signed value
            let json = serde_json::to_string(&stx).unwrap();
            let from_json: SignedTx = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(from_json.to_bytes(), bytes);
            from_json.verify().unwrap();
        }

        #[test]
        fn any_bit_flip_breaks_signature_or_decoding(seed in any::<[u8; 32]>(), call in arb_call(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let stx = SignedTx::new(&Identity::from_seed(seed), 1, call);
            let mut bytes = stx.to_bytes();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            if let Ok(t) = SignedTx::from_bytes(&bytes) {
                prop_assert!(t.verify().is_err() || t == stx);
            }
        }
    }

    #[test]
    fn decode_rejects_wrong_domain_and_trailing_bytes() {
        let stx = SignedTx::new(&Identity::generate(), 1, Call::ReportUptime { uptime: 5 });
        let mut b = stx.to_bytes();
        b.push(0);
        assert!(SignedTx::from_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let other = canonical::encode(TX_DOMAIN, &stx);
        assert!(SignedTx::from_bytes(&other)
            .unwrap_err()
            .to_string()
            .contains("domain"));
    }

    #[test]
    fn signature_is_bound_to_the_tx_domain() {
        let id = Identity::generate();
        let tx = Tx {
            signer: id.public_key(),
            nonce: 1,
            call: Call::ReportUptime { uptime: 1 },
        };
        let raw = postcard::to_stdvec(&tx).unwrap();
        let forged = SignedTx {
            tx,
            signature: id.sign(&raw),
        };
        assert!(forged.verify().is_err());
    }
}
