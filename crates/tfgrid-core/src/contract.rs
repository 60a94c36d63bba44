use crate::canonical::Hash;
use crate::capacity::Capacity;
use crate::{ContractId, Millis, NodeId, TwinId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contract {
    pub id: ContractId,
    pub twin_id: TwinId,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub state: ContractState,
    pub kind: ContractKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractKind {
    Node(NodeContract),
    Name(NameContract),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeContract {
    pub node_id: NodeId,
    pub deployment_hash: Hash,
    /// Reserved on the node while the contract is live.
    pub capacity: Capacity,
    /// Farm addresses held by this contract (as many as `capacity.ipv4`).
    #[serde(default)]
    pub public_ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameContract {
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractState {
    Created,
    Deleted { cause: DeleteCause, at: Millis },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteCause {
    CanceledByUser,
}

impl Contract {
    pub fn is_live(&self) -> bool {
        matches!(self.state, ContractState::Created)
    }

    pub fn node(&self) -> Option<&NodeContract> {
        match &self.kind {
            ContractKind::Node(n) => Some(n),
            ContractKind::Name(_) => None,
        }
    }

    pub fn name(&self) -> Option<&str> {
        match &self.kind {
            ContractKind::Name(n) => Some(&n.name),
            ContractKind::Node(_) => None,
        }
    }
}
