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

/// `-ln(u)` for `u` in (0, 1), from IEEE-754 basic operations only (no
/// libm): every platform computes the same bits, so every node ranks
/// identically, and it costs about a dozen flops. Relative error < 1e-9.
pub fn neg_ln(u: f64) -> f64 {
    // u = m * 2^e with m in [sqrt(1/2), sqrt(2)); ln u = e ln 2 + ln m and
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172.
    let bits = u.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = s
        * (2.0
            + s2 * (2.0 / 3.0
                + s2 * (2.0 / 5.0 + s2 * (2.0 / 7.0 + s2 * (2.0 / 9.0 + s2 * (2.0 / 11.0))))));
    -(e as f64 * std::f64::consts::LN_2 + series)
}

/// The uniform draw in (0, 1) of a pair hash: 52 random bits, kept off 0
/// and 1 so that scores are finite.
pub fn unit(pair_hash: u64) -> f64 {
    ((pair_hash >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// The score of a pair hash for a node of the given weight; higher wins.
pub fn score_of(pair_hash: u64, weight: f64) -> f64 {
    weight / neg_ln(unit(pair_hash))
}

/// Whether a node of weight `weight` whose draw is `u` surely scores below
/// `threshold`, without a logarithm: with `v = 1 - u`,
/// `-ln u = v + v^2/2 + v^3/3 + ... >= v (1 + v/2 + v^2/3)`, so its score
/// is at most `weight / (v (1 + v/2 + v^2/3))`. The margin covers
/// [`neg_ln`]'s error and rounding, so a node this rejects can never score
/// at or above the threshold.
pub fn surely_below(weight: f64, u: f64, threshold: f64) -> bool {
    let v = 1.0 - u;
    weight < threshold * v * (1.0 + v * (0.5 + v * (1.0 / 3.0))) * (1.0 - 1e-6)
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

#[cfg(test)]
mod tests {
    #[test]
    fn neg_ln_matches_libm() {
        let mut u = 1e-15;
        while u < 1.0 {
            let (ours, libm) = (super::neg_ln(u), -u.ln());
            assert!(
                ((ours - libm) / libm).abs() < 1e-9,
                "u={u}: {ours} vs {libm}"
            );
            u *= 1.37;
        }
        // the cheap bound never rejects a node that scores at the threshold
        let mut u = 1e-12;
        while u < 1.0 {
            for w in [0.5, 1.0, 7.0, 1e4] {
                let s = w / super::neg_ln(u);
                assert!(!super::surely_below(w, u, s), "u={u} w={w}");
                assert!(!super::surely_below(w, u, s * 1.000_000_01), "u={u} w={w}");
            }
            u += (1.0 - u) * 0.01 + 1e-12;
        }
        for h in [0u64, 1, u64::MAX, 1 << 63, 12345678901234567] {
            let s = super::score_of(h, 1.0);
            assert!(s.is_finite() && s > 0.0);
        }
    }
}
