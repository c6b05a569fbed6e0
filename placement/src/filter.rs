//! Hard filters: the reasons a node cannot take a slot.

use std::collections::BTreeMap;

use crate::model::{JobPlacements, Node, SlotRequest};

/// The words that say a node was passed over because it runs the slot's
/// older copy (a start-first update's placement), in a rejection and in a
/// holder's refusal: a holder falls back to stop-first on them.
pub const HOLDS_OLD_COPY: &str = "the slot's previous version";

/// Why a node was ruled out. Ordered as the filters run: a node is
/// attributed to the first one it fails.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    /// The node takes no new work (drained or made ineligible).
    Ineligible,
    /// The node lacks the driver.
    Driver(String),
    /// A label constraint fails (its text).
    Constraint(String),
    /// Not enough free CPU.
    Cpu {
        /// Requested millicores.
        need: u64,
    },
    /// Not enough free memory.
    Memory {
        /// Requested MiB.
        need: u64,
    },
    /// A requested host port is taken.
    Port(u16),
    /// The node already runs a replica of the job.
    DistinctHosts,
    /// The node lacks the spread label.
    SpreadLabelMissing(String),
    /// The node holds an older copy of the slot.
    HoldsOldCopy,
    /// Placing here would exceed the spread's maximum skew.
    SpreadSkew {
        /// Label.
        label: String,
        /// Allowed skew.
        max_skew: u32,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Ineligible => write!(f, "are draining or ineligible"),
            Rejection::Driver(d) => write!(f, "lack the `{d}` driver"),
            Rejection::Constraint(c) => write!(f, "do not satisfy `{c}`"),
            Rejection::Cpu { need } => write!(f, "lack {need} millicores of free CPU"),
            Rejection::Memory { need } => write!(f, "lack {need} MiB of free memory"),
            Rejection::Port(p) => write!(f, "already use port {p}"),
            Rejection::HoldsOldCopy => write!(f, "still run {HOLDS_OLD_COPY}"),
            Rejection::DistinctHosts => {
                write!(f, "already run a replica of this job (distinct_hosts)")
            }
            Rejection::SpreadLabelMissing(l) => write!(f, "have no `{l}` label to spread over"),
            Rejection::SpreadSkew { label, max_skew } => {
                write!(
                    f,
                    "would put the job's spread over `{label}` beyond skew {max_skew}"
                )
            }
        }
    }
}

/// Every filter but spread (which needs the whole eligible set).
pub fn check_node(
    node: &Node,
    req: &SlotRequest,
    placements: &JobPlacements,
) -> Result<(), Rejection> {
    if !node.eligible {
        return Err(Rejection::Ineligible);
    }
    if !node.drivers.contains(&req.driver) {
        return Err(Rejection::Driver(req.driver.clone()));
    }
    if let Some(c) = req.constraints.iter().find(|c| !c.holds(node)) {
        return Err(Rejection::Constraint(c.to_string()));
    }
    if let Some(s) = req
        .spread
        .as_ref()
        .filter(|s| !node.labels.contains_key(&s.label))
    {
        return Err(Rejection::SpreadLabelMissing(s.label.clone()));
    }
    // After the rules the old copy does not change and before those it
    // does (room, ports, distinct hosts): a node refused as holding the
    // slot's old copy could take the new one once the old one is gone, so
    // a start-first update may go stop-first there (found by the
    // simulator, `--update 6:1:start-first:stuck`, seed 1: a version no
    // node may run stopped an old copy because its node, checked first,
    // reported only the old copy).
    if req.avoid.contains(&node.id) {
        return Err(Rejection::HoldsOldCopy);
    }
    let free = node.free();
    if req.resources.cpu_millis > free.cpu_millis {
        return Err(Rejection::Cpu {
            need: req.resources.cpu_millis,
        });
    }
    if req.resources.memory_mib > free.memory_mib {
        return Err(Rejection::Memory {
            need: req.resources.memory_mib,
        });
    }
    if let Some(p) = req.ports.iter().find(|p| node.ports_used.contains(p)) {
        return Err(Rejection::Port(*p));
    }
    // Every copy of a job binds the same host ports: a node that holds one
    // cannot take another, whatever the caller knows of its ports.
    if let Some(p) = req.ports.first() {
        if placements.get(&node.id).is_some_and(|n| *n > 0) {
            return Err(Rejection::Port(*p));
        }
    }
    if req.distinct_hosts && placements.get(&node.id).is_some_and(|n| *n > 0) {
        return Err(Rejection::DistinctHosts);
    }
    Ok(())
}

/// Applies the spread rule to nodes that passed [`check_node`]: a node whose
/// label value already holds `max_skew` more of the job's slots than the
/// least used value (among all values the nodes carry) is ruled out.
pub fn check_spread<'a>(
    req: &SlotRequest,
    all_nodes: &[Node],
    passing: &[&'a Node],
    placements: &JobPlacements,
) -> Vec<Result<&'a Node, (&'a Node, Rejection)>> {
    let Some(spread) = &req.spread else {
        return passing.iter().map(|n| Ok(*n)).collect();
    };
    // Count the job's slots per label value, over every value a passing
    // node carries (a value nobody can take does not hold others back).
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for n in passing {
        if let Some(v) = n.labels.get(&spread.label) {
            counts.entry(v.as_str()).or_insert(0);
        }
    }
    for n in all_nodes {
        if let (Some(v), Some(k)) = (n.labels.get(&spread.label), placements.get(&n.id)) {
            if let Some(c) = counts.get_mut(v.as_str()) {
                *c += k;
            }
        }
    }
    let min = counts.values().copied().min().unwrap_or(0);
    passing
        .iter()
        .map(|n| {
            let v = n
                .labels
                .get(&spread.label)
                .map(String::as_str)
                .unwrap_or("");
            let c = counts.get(v).copied().unwrap_or(0);
            if c + 1 - min > spread.max_skew.max(1) {
                Err((
                    *n,
                    Rejection::SpreadSkew {
                        label: spread.label.clone(),
                        max_skew: spread.max_skew,
                    },
                ))
            } else {
                Ok(*n)
            }
        })
        .collect()
}
