//! What travels on a websocket between a twin and its relay, or between two relays.

use crate::envelope::Envelope;
use crate::error::BusError;
use serde::{Deserialize, Serialize};
use tfgrid_core::{canonical, Identity, PublicKey, Signature, TwinId};

const AUTH_DOMAIN: &str = "tfgrid/bus/auth/v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Frame {
    /// Relay -> connecting side: prove you hold your twin's key by signing this.
    Challenge {
        nonce: [u8; 32],
        relay_twin: TwinId,
    },
    Auth {
        twin: TwinId,
        signature: Signature,
    },
    Ready,
    Denied(String),
    /// From a twin (its own envelopes) or to a twin (envelopes addressed to it).
    Envelope(Envelope),
    /// Between relays: an envelope whose source is connected to the sending relay.
    Forward(Envelope),
}

impl Frame {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a frame always encodes")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, BusError> {
        postcard::from_bytes(b).map_err(|e| BusError::Malformed(format!("frame: {e}")))
    }
}

fn auth_bytes(nonce: &[u8; 32], twin: TwinId, relay_twin: TwinId) -> Vec<u8> {
    canonical::encode(AUTH_DOMAIN, &(nonce, twin, relay_twin))
}

/// The answer to a challenge: bound to this relay (a relay cannot replay it to another).
pub fn sign_auth(id: &Identity, nonce: &[u8; 32], twin: TwinId, relay_twin: TwinId) -> Frame {
    Frame::Auth {
        twin,
        signature: id.sign(&auth_bytes(nonce, twin, relay_twin)),
    }
}

pub fn verify_auth(
    key: &PublicKey,
    nonce: &[u8; 32],
    twin: TwinId,
    relay_twin: TwinId,
    sig: &Signature,
) -> Result<(), BusError> {
    key.verify(&auth_bytes(nonce, twin, relay_twin), sig)
        .map_err(|_| BusError::Auth(format!("twin {twin}: challenge signature does not verify")))
}
