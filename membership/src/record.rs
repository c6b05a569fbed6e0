//! Plain-data descriptions of nodes: what each node publishes about itself
//! and the [`MembershipView`] every other crate reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a node can offer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// What a node is using now, published by the node itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// CPU reserved by running instances, millicores.
    pub cpu_millis: u64,
    /// Memory reserved by running instances, MiB.
    pub memory_mib: u64,
    /// Number of instances the node runs.
    pub instances: u64,
}

/// What a node publishes about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique node name.
    pub name: String,
    /// Address of the node's QUIC endpoint, as peers reach it.
    pub address: SocketAddr,
    /// Operator-given labels (`--label k=v`).
    pub labels: BTreeMap<String, String>,
    /// Resources the node offers.
    pub capacity: Capacity,
    /// Workload drivers available on the node.
    pub drivers: Vec<String>,
    /// shoal version the node runs.
    pub version: String,
    /// Address of the node's HTTP API, if it is reachable from peers.
    pub http: Option<String>,
    /// Notes on what the node cannot enforce (e.g. no writable cgroup v2).
    pub notes: Vec<String>,
}

/// A node's liveness as seen by the node holding the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Answers probes.
    Alive,
    /// Failed a probe; being confirmed before it is declared dead.
    Suspect,
    /// Declared failed.
    Dead,
    /// Left the cluster on purpose.
    Left,
}

impl NodeState {
    /// Lower-case name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Suspect => "suspect",
            NodeState::Dead => "dead",
            NodeState::Left => "left",
        }
    }
}

/// One node as the holder of a [`MembershipView`] sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's record (for a node known only by a probe message, a
    /// minimal record with its name and address).
    pub record: NodeRecord,
    /// Start-up generation; a restarted node has a larger one.
    pub generation: u64,
    /// SWIM incarnation within the generation.
    pub incarnation: u64,
    /// Liveness.
    pub state: NodeState,
    /// The node's last published load.
    pub load: Load,
    /// Application state the node publishes (see
    /// `Membership::publish_app`), by key. Shared, not copied, between
    /// views: a view is published many times a second and only a changed
    /// node's map is rebuilt (values unchanged since are shared too).
    pub app: AppState,
}

/// The application keys of one node, shared between views.
pub type AppState = Arc<BTreeMap<String, Arc<str>>>;

/// A snapshot of the cluster as one node sees it: plain data, no chitchat
/// types, so placement and the API can use it and tests can build one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipView {
    /// Name of the node holding this view.
    pub self_name: String,
    /// Every known node, including this one, sorted by name.
    pub members: Vec<Member>,
}

impl MembershipView {
    /// The member with this name.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.record.name == name)
    }

    /// Members in the given state.
    pub fn in_state(&self, state: NodeState) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.state == state)
    }
}
