//! The messages of [`crate::Service::Join`] (JSON): a node without
//! credentials asking a member to admit it, and the steps of a CA rotation
//! between members. Here rather than in the agent so that the decoders can
//! be fuzzed with the rest of the transport's.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Longest join request accepted (bytes): a token, a name and an address.
pub const JOIN_REQUEST_LEN_MAX: usize = 16 * 1024;

/// What a node without credentials sends a member (JSON, on a join
/// connection).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token, as given to the joining node.
    pub token: String,
    /// The name the node will run under.
    pub name: String,
    /// The address it will advertise (its IP decides whether the name is
    /// free; the port may still be unknown, 0).
    pub address: SocketAddr,
}

impl JoinRequest {
    /// Decodes a request, refusing one over [`JOIN_REQUEST_LEN_MAX`].
    pub fn decode(body: &[u8]) -> Result<JoinRequest, String> {
        if body.len() > JOIN_REQUEST_LEN_MAX {
            return Err(format!("a join request of {} bytes", body.len()));
        }
        serde_json::from_slice(body).map_err(|e| format!("undecodable join request: {e}"))
    }
}

/// A member's answer to a [`JoinRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinReply {
    /// Welcome: the cluster CA (encoded, key included), and whether the
    /// member has been in touch with its cluster lately (see
    /// `Response::Claimed`).
    Joined {
        /// `ClusterCa::encode`.
        ca: String,
        /// The member completed an anti-entropy exchange lately.
        in_touch: bool,
    },
    /// Refused, and why (an expired or foreign token, a taken name).
    Refused(String),
}

/// A step of a CA rotation, sent by the member running it to every other
/// (JSON on `Service::Join`, over their authenticated connections).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Rotation {
    /// Trust this CA (encoded, key included) beside the current one.
    Trust {
        /// `ClusterCa::encode` of the new CA.
        ca: String,
    },
    /// Issue this node's certificate with the new CA (whose certificate
    /// this is), and keep trusting the old one.
    Switch {
        /// The new CA's certificate.
        ca_cert_der: Vec<u8>,
    },
    /// Stop trusting the old CA: every member presents the new one's.
    Drop {
        /// The new (now current) CA's certificate.
        ca_cert_der: Vec<u8>,
    },
}

impl Rotation {
    /// The step's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Rotation::Trust { .. } => "trust",
            Rotation::Switch { .. } => "switch",
            Rotation::Drop { .. } => "drop",
        }
    }
}

/// The answer to a [`Rotation`] step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RotationReply {
    /// Done (or already done).
    Done,
    /// Refused, and why.
    Refused(String),
}
