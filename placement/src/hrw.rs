//! Weighted rendezvous (highest random weight) hashing.
//!
//! Each (slot, node) pair gets a pseudo-random `u` in (0, 1) from xxh3; the
//! node's score is `weight / -ln(u)` (the logarithmic method of weighted
//! rendezvous hashing), so a node wins a slot with probability
//! `weight / sum(weights)`. Scores are independent per node: adding a node
//! only changes the winner of the slots the new node now wins, and removing
//! one only moves the slots it won.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::model::{Node, Resources};

/// Hash of a node id (compute once per node).
pub fn node_hash(id: &str) -> u64 {
    xxh3_64(id.as_bytes())
}

/// Hash of a slot (compute once per slot).
pub fn slot_hash(job: &str, slot: u32) -> u64 {
    xxh3_64_with_seed(job.as_bytes(), 0x5140a1_u64.wrapping_add(slot as u64))
}

/// A node's weight: the geometric mean of its CPU and memory capacity, so
/// that a node twice as large in both wins twice as many slots.
pub fn weight(capacity: Resources) -> f64 {
    ((capacity.cpu_millis as f64) * (capacity.memory_mib as f64)).sqrt()
}

/// The pseudo-random draw of a (slot, node) pair: the murmur3 64-bit
/// finaliser over both hashes (a full avalanche, ~1 ns).
pub fn pair_hash(slot_hash: u64, node_hash: u64) -> u64 {
    let mut h = slot_hash ^ node_hash.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The score of a pair hash for a node of the given weight; higher wins.
/// For one weight it grows with the pair hash, which lets [`crate::place`]
/// skip the logarithm for nodes that cannot make the top k.
pub fn score_of(pair_hash: u64, weight: f64) -> f64 {
    // 53 random bits, shifted off zero so that ln() is finite.
    let u = ((pair_hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// The rendezvous score of a node for a slot; higher wins.
pub fn score(slot_hash: u64, node_hash: u64, weight: f64) -> f64 {
    score_of(pair_hash(slot_hash, node_hash), weight)
}

/// All nodes ranked for a slot: best first, ties broken by node id.
pub fn rank<'a>(job: &str, slot: u32, nodes: &'a [Node]) -> Vec<(&'a Node, f64)> {
    let sh = slot_hash(job, slot);
    let mut ranked: Vec<(&Node, f64)> = nodes
        .iter()
        .map(|n| (n, score(sh, node_hash(&n.id), weight(n.capacity))))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.id.cmp(&b.0.id)));
    ranked
}
