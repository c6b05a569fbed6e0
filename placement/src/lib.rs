//! shoal's placement engine: pure and deterministic.
//!
//! Every node runs this code on the same gossiped facts and reaches the same
//! answer. It does no IO, reads no clock and draws no random numbers: all
//! pseudo-randomness comes from hashing the job, slot and node ids.
//!
//! The pipeline for one slot: hard filters ([`filter`]) remove nodes that
//! cannot take it; weighted rendezvous hashing ([`hrw`]) ranks the rest; the
//! top `k` ([`PlacementConfig::candidates`]) bid with a cost computed from
//! their own load ([`bid::cost`]); the lowest bid wins ([`bid::winner`]).
//! Two running copies of one slot are resolved by [`bid::conflict_order`].
//!
//! # Layout
//! - [`model`]: nodes, resources, slot requests, constraints.
//! - [`hrw`]: weighted rendezvous hashing.
//! - [`filter`]: hard filters and their reasons.
//! - [`bid`]: bid cost, winner rule, conflict rule.
//! - [`place`]: candidates, whole decisions, explanations.
#![deny(missing_docs)]

pub mod bid;
pub mod filter;
pub mod hrw;
pub mod model;
pub mod place;

pub use bid::{conflict_order, cost, survivor, winner, Bid, RunningCopy};
pub use filter::{Rejection, HOLDS_OLD_COPY};
pub use model::{Affinity, Constraint, JobPlacements, Node, Op, Resources, SlotRequest, Spread};
pub use place::{
    assign, candidates, candidates_with, coordinator, explain, place, place_with, Candidate,
    Decision, Explanation, NodeIndex, PlacementConfig, Unplaceable,
};

#[cfg(test)]
mod tests;
