//! The plain data placement works on.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// An amount of CPU and memory.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Resources {
    /// Component-wise sum, saturating: loads and capacities come from
    /// peers, and a sum must not wrap into a small number.
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
        }
    }

    /// Component-wise saturating difference.
    pub fn minus(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
        }
    }

    /// Whether `self` fits within `cap` in every dimension.
    pub fn fits_in(self, cap: Resources) -> bool {
        self.cpu_millis <= cap.cpu_millis && self.memory_mib <= cap.memory_mib
    }
}

/// A node as placement sees it: identity, what it offers, what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique node id (its name).
    pub id: String,
    /// What it offers.
    pub capacity: Resources,
    /// What its running instances hold.
    pub used: Resources,
    /// What its outstanding bids hold (won but not yet started).
    pub reserved: Resources,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Available drivers.
    pub drivers: BTreeSet<String>,
    /// Host ports in use.
    pub ports_used: BTreeSet<u16>,
    /// Whether it takes new work (`false` while an operator drains it or
    /// made it ineligible; absent in a bid from an older release).
    #[serde(default = "yes")]
    pub eligible: bool,
}

fn yes() -> bool {
    true
}

impl Node {
    /// A node with capacity and nothing else (tests, simulations).
    pub fn new(id: impl Into<String>, cpu_millis: u64, memory_mib: u64) -> Node {
        Node {
            id: id.into(),
            capacity: Resources {
                cpu_millis,
                memory_mib,
            },
            used: Resources::default(),
            reserved: Resources::default(),
            labels: BTreeMap::new(),
            drivers: BTreeSet::from(["exec".to_string()]),
            ports_used: BTreeSet::new(),
            eligible: true,
        }
    }

    /// Adds a label (builder style).
    pub fn with_label(mut self, k: &str, v: &str) -> Node {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// What is still free (capacity less used and reserved).
    pub fn free(&self) -> Resources {
        self.capacity.minus(self.used.plus(self.reserved))
    }
}

/// Operators of a label constraint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Label equals the value.
    Eq(String),
    /// Label is absent or differs.
    Ne(String),
    /// Label is one of the values.
    In(Vec<String>),
    /// Label is absent or none of the values.
    NotIn(Vec<String>),
    /// Label is present.
    Exists,
}

/// A hard rule on a node label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// Label key.
    pub label: String,
    /// Test.
    pub op: Op,
}

impl Constraint {
    /// Whether `node` satisfies it.
    pub fn holds(&self, node: &Node) -> bool {
        let v = node.labels.get(&self.label);
        match &self.op {
            Op::Eq(x) => v == Some(x),
            Op::Ne(x) => v != Some(x),
            Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
            Op::NotIn(xs) => v.is_none_or(|v| !xs.contains(v)),
            Op::Exists => v.is_some(),
        }
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.label;
        match &self.op {
            Op::Eq(x) => write!(f, "{l} = {x}"),
            Op::Ne(x) => write!(f, "{l} != {x}"),
            Op::In(xs) => write!(f, "{l} in [{}]", xs.join(", ")),
            Op::NotIn(xs) => write!(f, "{l} not in [{}]", xs.join(", ")),
            Op::Exists => write!(f, "{l} exists"),
        }
    }
}

/// A soft preference: matching nodes bid lower (positive weight) or higher
/// (negative weight). Never changes eligibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    /// The label test.
    pub constraint: Constraint,
    /// -100..=100; 100 takes a tenth off a matching node's cost.
    pub weight: i32,
}

/// Spread a job's slots evenly over the values of a label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spread {
    /// Label key, e.g. `zone`.
    pub label: String,
    /// Largest allowed difference between the most and least used value.
    pub max_skew: u32,
}

/// What one slot of a job needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRequest {
    /// Job id.
    pub job: String,
    /// Slot index within the job.
    pub slot: u32,
    /// Resources per instance.
    pub resources: Resources,
    /// Required driver.
    pub driver: String,
    /// Hard label rules.
    pub constraints: Vec<Constraint>,
    /// Host ports the instance binds.
    pub ports: Vec<u16>,
    /// Replicas of the job on different nodes.
    pub distinct_hosts: bool,
    /// Spread over a label.
    pub spread: Option<Spread>,
    /// Soft preferences.
    pub affinities: Vec<Affinity>,
    /// Nodes that hold an older copy of this very slot (a start-first
    /// update puts the new one elsewhere: a node holds one copy per slot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
}

impl SlotRequest {
    /// A request with resources only (tests, simulations).
    pub fn simple(
        job: impl Into<String>,
        slot: u32,
        cpu_millis: u64,
        memory_mib: u64,
    ) -> SlotRequest {
        SlotRequest {
            job: job.into(),
            slot,
            resources: Resources {
                cpu_millis,
                memory_mib,
            },
            driver: "exec".into(),
            constraints: Vec::new(),
            ports: Vec::new(),
            distinct_hosts: false,
            spread: None,
            affinities: Vec::new(),
            avoid: Vec::new(),
        }
    }
}

/// Where the job's other slots already are (for `distinct_hosts` and
/// `spread`): node id -> number of the job's slots on it.
pub type JobPlacements = BTreeMap<String, u32>;
