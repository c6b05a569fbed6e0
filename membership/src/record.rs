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

/// Labels per node, at most.
pub const LABELS_MAX: usize = 64;
/// Longest label key or value.
pub const LABEL_LEN_MAX: usize = 256;
/// Longest node name.
pub const NAME_LEN_MAX: usize = 128;
/// Drivers, notes per node, at most.
pub const LIST_MAX: usize = 16;
/// Longest driver name, version or note.
pub const TEXT_LEN_MAX: usize = 512;
/// Largest capacity a node may offer: a million cores, an exbibyte. Keeps
/// every sum of capacities and loads far from overflow.
pub const CAPACITY_MAX: Capacity = Capacity {
    cpu_millis: 1_000_000_000,
    memory_mib: 1 << 40,
};

/// Whether `name` is a valid node name: 1 to [`NAME_LEN_MAX`] letters,
/// digits, '.', '_' or '-'.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_LEN_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Checks one label as `--label key=value` and gossip both must.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > LABEL_LEN_MAX || value.len() > LABEL_LEN_MAX {
        return Err(format!(
            "label `{key}={value}`: key must be 1 to {LABEL_LEN_MAX} characters, value at most {LABEL_LEN_MAX}"
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
    {
        return Err(format!(
            "label key `{key}` may only hold letters, digits and . _ - /"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "label `{key}`: its value holds a control character"
        ));
    }
    Ok(())
}

impl NodeRecord {
    /// A record that says nothing but a node's name and address: what a
    /// view shows for a member whose own record has not been read yet.
    pub fn bare(name: &str, address: SocketAddr) -> NodeRecord {
        NodeRecord {
            name: name.to_string(),
            address,
            labels: Default::default(),
            capacity: Default::default(),
            drivers: Vec::new(),
            version: String::new(),
            http: None,
            notes: Vec::new(),
        }
    }

    /// Checks a record as the node's own flags are checked: a peer's
    /// record that fails is ignored (the peer is then known by its probes
    /// only), so no peer can publish what its operator could not have
    /// configured.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_node_name(&self.name) {
            return Err(format!("invalid node name `{}`", self.name.escape_debug()));
        }
        if self.labels.len() > LABELS_MAX {
            return Err(format!(
                "{} labels (at most {LABELS_MAX})",
                self.labels.len()
            ));
        }
        for (k, v) in &self.labels {
            check_label(k, v)?;
        }
        if self.capacity.cpu_millis > CAPACITY_MAX.cpu_millis
            || self.capacity.memory_mib > CAPACITY_MAX.memory_mib
        {
            return Err(format!(
                "capacity {}m/{}Mi beyond {}m/{}Mi",
                self.capacity.cpu_millis,
                self.capacity.memory_mib,
                CAPACITY_MAX.cpu_millis,
                CAPACITY_MAX.memory_mib
            ));
        }
        if self.drivers.len() > LIST_MAX || self.notes.len() > LIST_MAX {
            return Err(format!("more than {LIST_MAX} drivers or notes"));
        }
        let texts = self
            .drivers
            .iter()
            .chain(&self.notes)
            .chain(std::iter::once(&self.version))
            .chain(self.http.iter());
        for t in texts {
            if t.len() > TEXT_LEN_MAX {
                return Err(format!(
                    "a text field of {} bytes (at most {TEXT_LEN_MAX})",
                    t.len()
                ));
            }
        }
        Ok(())
    }
}

impl Load {
    /// Whether a published load is within what any node could carry.
    pub fn is_plausible(&self) -> bool {
        self.cpu_millis <= CAPACITY_MAX.cpu_millis
            && self.memory_mib <= CAPACITY_MAX.memory_mib
            && self.instances <= 100_000_000
    }
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

/// A snapshot of the cluster as one node sees it: plain data, no gossip
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        NodeRecord {
            name: "n1".into(),
            address: "127.0.0.1:4700".parse().unwrap(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            capacity: Capacity {
                cpu_millis: 2000,
                memory_mib: 4096,
            },
            drivers: vec!["exec".into()],
            version: "0.1.0".into(),
            http: None,
            notes: Vec::new(),
        }
    }

    /// A peer's record is held to the rules the operator's flags are: the
    /// #11 probe's records (a path for a name, huge capacities, thousands
    /// of labels) are refused.
    #[test]
    fn a_peer_record_is_held_to_the_flags_rules() {
        assert_eq!(record().validate(), Ok(()));
        let bad = [
            NodeRecord {
                name: "../../x".into(),
                ..record()
            },
            NodeRecord {
                name: String::new(),
                ..record()
            },
            NodeRecord {
                capacity: Capacity {
                    cpu_millis: u64::MAX,
                    memory_mib: 1,
                },
                ..record()
            },
            NodeRecord {
                labels: (0..=LABELS_MAX)
                    .map(|i| (format!("k{i}"), "v".into()))
                    .collect(),
                ..record()
            },
            NodeRecord {
                labels: BTreeMap::from([("bad key".into(), "v".into())]),
                ..record()
            },
            NodeRecord {
                drivers: vec!["x".repeat(TEXT_LEN_MAX + 1)],
                ..record()
            },
        ];
        for r in bad {
            assert!(r.validate().is_err(), "{r:?}");
        }
        assert!(!Load {
            cpu_millis: u64::MAX,
            memory_mib: 0,
            instances: 0
        }
        .is_plausible());
        assert!(Load::default().is_plausible());
    }
}
