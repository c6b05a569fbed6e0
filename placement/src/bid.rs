//! Bids, the winner rule and the conflict rule.
//!
//! Every rule here is a total order over plain data, so every node that
//! sees the same bids (or the same running copies) picks the same one.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::model::{Node, SlotRequest};

/// Cost unit: parts per million of a node's capacity.
pub const COST_SCALE: u64 = 1_000_000;

/// A candidate's offer to run a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bid {
    /// The bidding node.
    pub node: String,
    /// Its cost; lower wins.
    pub cost: u64,
    /// Its rendezvous rank for the slot (0 = best); breaks cost ties.
    pub rank: u32,
}

/// The cost a node bids for a slot, from its own current load: its dominant
/// utilisation (the larger of CPU and memory share) once the slot is added,
/// in millionths, lowered by matching affinities (a weight of 100 takes a
/// tenth off) and raised by anti-affinities. A node too full to take the
/// slot bids `u64::MAX` (the filters keep it from being a candidate anyway).
pub fn cost(node: &Node, req: &SlotRequest) -> u64 {
    let after = node.used.plus(node.reserved).plus(req.resources);
    if !after.fits_in(node.capacity) {
        return u64::MAX;
    }
    // In u128: `used` comes from peers' loads and can be anything.
    let share = |used: u64, cap: u64| {
        (u128::from(used) * u128::from(COST_SCALE))
            .checked_div(u128::from(cap))
            .map(|s| s.min(u128::from(u64::MAX)) as u64)
            .unwrap_or(COST_SCALE)
    };
    let dominant = share(after.cpu_millis, node.capacity.cpu_millis)
        .max(share(after.memory_mib, node.capacity.memory_mib));
    let affinity: i64 = req
        .affinities
        .iter()
        .filter(|a| a.constraint.holds(node))
        .map(|a| a.weight.clamp(-100, 100) as i64)
        .sum();
    let factor = (1000 - affinity).max(0) as u128;
    (u128::from(dominant) * factor / 1000).min(u128::from(u64::MAX)) as u64
}

/// Orders bids: lower cost, then better rank, then node id.
pub fn bid_order(a: &Bid, b: &Bid) -> Ordering {
    a.cost
        .cmp(&b.cost)
        .then(a.rank.cmp(&b.rank))
        .then_with(|| a.node.cmp(&b.node))
}

/// The winning bid, identical on every node that sees the same bids in any
/// order.
pub fn winner(bids: &[Bid]) -> Option<&Bid> {
    bids.iter().min_by(|a, b| bid_order(a, b))
}

/// One running copy of a slot, as its holder publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningCopy {
    /// The node running it.
    pub node: String,
    /// When it started, as a hybrid logical clock value (ordered).
    pub started: u64,
}

/// Orders two copies of the same slot: the one that sorts first stays, the
/// other stops. The older copy stays (it has run longest, so keeping it
/// disturbs least), ties broken by node id. Total and antisymmetric.
pub fn conflict_order(a: &RunningCopy, b: &RunningCopy) -> Ordering {
    a.started.cmp(&b.started).then_with(|| a.node.cmp(&b.node))
}

/// The copy that stays among several.
pub fn survivor(copies: &[RunningCopy]) -> Option<&RunningCopy> {
    copies.iter().min_by(|a, b| conflict_order(a, b))
}
