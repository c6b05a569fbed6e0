//! Candidates, decisions and explanations for one slot.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bid::{bid_order, cost, Bid};
use crate::filter::{check_node, check_spread, Rejection};
use crate::hrw::{neg_ln, node_hash, pair_hash, slot_hash, surely_below, unit, weight};
use crate::model::{JobPlacements, Node, SlotRequest};

/// Placement settings.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    /// How many of the best-ranked eligible nodes bid. 1 is plain rendezvous
    /// hashing; 2 is "power of two choices" among the rendezvous favourites.
    /// `placement-bench --ks 2,3,4,5,6,7,8` measured max/mean utilisation
    /// with heavy-tailed requests on mixed node sizes: at 100 slots per node
    /// (1,000 nodes) k = 4 is 8% worse than an omniscient least-loaded
    /// scheduler and k = 8 is 3% worse; at 1,000 slots per node k >= 5 is
    /// within 0.5%. A decision costs k bids (sent in parallel).
    pub candidates: usize,
    /// Candidates for a large request. A large slot placed on a poor
    /// candidate skews a node far more than a small one, so it is worth
    /// more bids (large slots are few in heavy-tailed workloads). With 24
    /// for requests above 2% of the mean node, `placement-bench` measured
    /// 1,000 nodes within 1% of the omniscient baseline at 100 slots per
    /// node and at it at 10 slots per node, where k = 8 alone was 13% off.
    pub candidates_large: usize,
    /// A request is large when it needs more than this share of the mean
    /// node's capacity, in CPU or memory.
    pub large_share: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            candidates: 8,
            candidates_large: 24,
            large_share: 0.02,
        }
    }
}

impl PlacementConfig {
    /// Exactly `k` candidates for every request.
    pub fn with_candidates(k: usize) -> PlacementConfig {
        PlacementConfig {
            candidates: k,
            candidates_large: k,
            large_share: f64::INFINITY,
        }
    }
}

/// No node can take the slot, and why: how many nodes each filter removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    /// Nodes considered.
    pub nodes_total: usize,
    /// Rejection -> number of nodes it removed.
    pub rejections: BTreeMap<Rejection, usize>,
}

impl std::fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nodes_total == 0 {
            return write!(f, "no node is alive to place it on");
        }
        write!(f, "no node fits (0 of {}):", self.nodes_total)?;
        let mut first = true;
        for (r, n) in &self.rejections {
            write!(
                f,
                "{} {n} node{} {r}",
                if first { "" } else { ";" },
                if *n == 1 { "" } else { "s" }
            )?;
            first = false;
        }
        Ok(())
    }
}

impl std::error::Error for Unplaceable {}

/// An eligible node, ranked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Node id.
    pub node: String,
    /// Rank among eligible nodes (0 = best).
    pub rank: u32,
    /// Rendezvous score.
    pub score: f64,
}

/// [`eligible`] for the crate's tests.
#[cfg(test)]
pub(crate) fn eligible_for_tests(
    req: &SlotRequest,
    nodes: &[Node],
    placements: &JobPlacements,
) -> (Vec<usize>, BTreeMap<Rejection, usize>) {
    eligible(req, nodes, placements)
}

/// Indices of the nodes passing every filter, and how many each filter
/// removed.
fn eligible(
    req: &SlotRequest,
    nodes: &[Node],
    placements: &JobPlacements,
) -> (Vec<usize>, BTreeMap<Rejection, usize>) {
    let mut rejections = BTreeMap::new();
    let mut passing = Vec::with_capacity(nodes.len());
    let mut passing_idx = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.iter().enumerate() {
        match check_node(n, req, placements) {
            Ok(()) => {
                passing.push(n);
                passing_idx.push(i);
            }
            Err(r) => *rejections.entry(r).or_insert(0) += 1,
        }
    }
    let mut ok = Vec::with_capacity(passing.len());
    for (r, i) in check_spread(req, nodes, &passing, placements)
        .into_iter()
        .zip(passing_idx)
    {
        match r {
            Ok(_) => ok.push(i),
            Err((_, r)) => *rejections.entry(r).or_insert(0) += 1,
        }
    }
    (ok, rejections)
}

/// What ranking needs of a node set beyond the nodes themselves, derived
/// from ids and capacities only: build it when membership changes and reuse
/// it while loads change.
#[derive(Debug, Clone)]
pub struct NodeIndex {
    hashes: Vec<u64>,
    weights: Vec<f64>,
    /// Mean capacity (CPU millicores, memory MiB), to size requests.
    mean_capacity: (f64, f64),
}

impl NodeIndex {
    /// Indexes `nodes` (the same slice, in the same order, must be passed
    /// to the `*_with` functions).
    pub fn new(nodes: &[Node]) -> NodeIndex {
        let count = nodes.len().max(1) as f64;
        let (cpu, mem) = nodes.iter().fold((0.0, 0.0), |(c, m), n| {
            (
                c + n.capacity.cpu_millis as f64,
                m + n.capacity.memory_mib as f64,
            )
        });
        NodeIndex {
            hashes: nodes.iter().map(|n| node_hash(&n.id)).collect(),
            weights: nodes.iter().map(|n| weight(n.capacity)).collect(),
            mean_capacity: (cpu / count, mem / count),
        }
    }
}

/// The `k` best-ranked eligible nodes (indices into `nodes`) with their
/// scores, best first; `None` if no node is eligible.
///
/// One pass: a node costs a hash and a comparison with a cheap upper bound
/// of its score against the current k-th best; only the few whose bound
/// passes get the logarithm, and only a node that would enter the top k has
/// its filters checked (about k ln(n/k) of them).
fn top_k(
    req: &SlotRequest,
    nodes: &[Node],
    index: &NodeIndex,
    placements: &JobPlacements,
    config: &PlacementConfig,
) -> Option<Vec<(usize, f64)>> {
    debug_assert_eq!(
        index.hashes.len(),
        nodes.len(),
        "index built for another node set"
    );
    let (mean_cpu, mean_mem) = index.mean_capacity;
    let large = req.resources.cpu_millis as f64 > config.large_share * mean_cpu
        || req.resources.memory_mib as f64 > config.large_share * mean_mem;
    let k = if large {
        config.candidates_large
    } else {
        config.candidates
    }
    .max(1);
    // Spread depends on the whole eligible set: filter everything first.
    let spread_ok: Option<Vec<bool>> = req.spread.as_ref().map(|_| {
        let mut mask = vec![false; nodes.len()];
        for i in eligible(req, nodes, placements).0 {
            mask[i] = true;
        }
        mask
    });
    let sh = slot_hash(&req.job, req.slot);
    // (score desc, id asc)
    let beats = |a: (f64, usize), b: (f64, usize)| {
        a.0 > b.0 || (a.0 == b.0 && nodes[a.1].id < nodes[b.1].id)
    };
    let mut top: Vec<(f64, usize)> = Vec::with_capacity(k + 1);
    for i in 0..nodes.len() {
        let u = unit(pair_hash(sh, index.hashes[i]));
        let w = index.weights[i];
        if top.len() == k && surely_below(w, u, top[k - 1].0) {
            continue;
        }
        let e = (w / neg_ln(u), i);
        if top.len() == k && !beats(e, top[k - 1]) {
            continue;
        }
        let ok = match &spread_ok {
            Some(mask) => mask[i],
            None => check_node(&nodes[i], req, placements).is_ok(),
        };
        if !ok {
            continue;
        }
        let pos = top.partition_point(|x| beats(*x, e));
        top.insert(pos, e);
        top.truncate(k);
    }
    (!top.is_empty()).then(|| top.into_iter().map(|(s, i)| (i, s)).collect())
}

fn unplaceable(req: &SlotRequest, nodes: &[Node], placements: &JobPlacements) -> Unplaceable {
    let (_, rejections) = eligible(req, nodes, placements);
    Unplaceable {
        nodes_total: nodes.len(),
        rejections,
    }
}

/// [`candidates`] with a prebuilt [`NodeIndex`].
pub fn candidates_with(
    req: &SlotRequest,
    nodes: &[Node],
    index: &NodeIndex,
    placements: &JobPlacements,
    config: &PlacementConfig,
) -> Result<Vec<Candidate>, Unplaceable> {
    let top = top_k(req, nodes, index, placements, config)
        .ok_or_else(|| unplaceable(req, nodes, placements))?;
    Ok(top
        .into_iter()
        .enumerate()
        .map(|(r, (i, s))| Candidate {
            node: nodes[i].id.clone(),
            rank: r as u32,
            score: s,
        })
        .collect())
}

/// [`place`] with a prebuilt [`NodeIndex`].
pub fn place_with(
    req: &SlotRequest,
    nodes: &[Node],
    index: &NodeIndex,
    placements: &JobPlacements,
    config: &PlacementConfig,
) -> Result<Decision, Unplaceable> {
    let top = top_k(req, nodes, index, placements, config)
        .ok_or_else(|| unplaceable(req, nodes, placements))?;
    let mut bids: Vec<Bid> = top
        .into_iter()
        .enumerate()
        .map(|(r, (i, _))| Bid {
            node: nodes[i].id.clone(),
            cost: cost(&nodes[i], req),
            rank: r as u32,
        })
        .collect();
    bids.sort_by(bid_order);
    Ok(Decision {
        winner: bids[0].node.clone(),
        bids,
    })
}

/// The `k` best-ranked eligible nodes for a slot: the ones that bid.
pub fn candidates(
    req: &SlotRequest,
    nodes: &[Node],
    placements: &JobPlacements,
    config: &PlacementConfig,
) -> Result<Vec<Candidate>, Unplaceable> {
    candidates_with(req, nodes, &NodeIndex::new(nodes), placements, config)
}

/// The bid a candidate makes, from its own node data.
pub fn bid_of(candidate: &Candidate, node: &Node, req: &SlotRequest) -> Bid {
    Bid {
        node: candidate.node.clone(),
        cost: cost(node, req),
        rank: candidate.rank,
    }
}

/// A whole decision computed in one place, as if every candidate bid with
/// the load in `nodes` (for simulation, `plan` and tests; the agent gathers
/// real bids over the network).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The winning node.
    pub winner: String,
    /// Every bid, best first.
    pub bids: Vec<Bid>,
}

/// Places one slot: candidates, their bids, the winner.
pub fn place(
    req: &SlotRequest,
    nodes: &[Node],
    placements: &JobPlacements,
    config: &PlacementConfig,
) -> Result<Decision, Unplaceable> {
    place_with(req, nodes, &NodeIndex::new(nodes), placements, config)
}

/// What happened to one node for a slot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeExplanation {
    /// Node id.
    pub node: String,
    /// Rendezvous score (higher is preferred).
    pub score: f64,
    /// Rank by score among all nodes (0 = best).
    pub rank: u32,
    /// `None` if it passed every filter, else why not.
    pub rejected: Option<String>,
    /// Its bid, if it was among the candidates.
    pub bid_cost: Option<u64>,
    /// Whether it wins.
    pub winner: bool,
}

/// A slot's placement, explained: every node with its score, filter outcome
/// and bid, best-ranked first; and the reason if nothing fits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    /// Job id.
    pub job: String,
    /// Slot index.
    pub slot: u32,
    /// Per node.
    pub nodes: Vec<NodeExplanation>,
    /// Why nothing fits, if so.
    pub unplaceable: Option<String>,
}

/// Explains the placement of one slot (feeds `shoal plan`).
pub fn explain(
    req: &SlotRequest,
    nodes: &[Node],
    placements: &JobPlacements,
    config: &PlacementConfig,
) -> Explanation {
    let ranked = crate::hrw::rank(&req.job, req.slot, nodes);
    let (ok, _) = eligible(req, nodes, placements);
    let decision = place(req, nodes, placements, config);
    let mut rejected_by: BTreeMap<&str, String> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if !ok.contains(&i) {
            let reason = match check_node(n, req, placements) {
                Err(r) => r.to_string(),
                Ok(()) => check_spread(req, nodes, &[n], placements)
                    .into_iter()
                    .find_map(|r| r.err().map(|(_, r)| r.to_string()))
                    .unwrap_or_else(|| "spread".into()),
            };
            rejected_by.insert(&n.id, reason);
        }
    }
    let nodes_out = ranked
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let bid = decision
                .as_ref()
                .ok()
                .and_then(|d| d.bids.iter().find(|b| b.node == n.id));
            NodeExplanation {
                node: n.id.clone(),
                score: *s,
                rank: i as u32,
                rejected: rejected_by.get(n.id.as_str()).cloned(),
                bid_cost: bid.map(|b| b.cost),
                winner: decision.as_ref().is_ok_and(|d| d.winner == n.id),
            }
        })
        .collect();
    Explanation {
        job: req.job.clone(),
        slot: req.slot,
        nodes: nodes_out,
        unplaceable: decision.err().map(|e| e.to_string()),
    }
}

/// The member that coordinates a slot's placement: the highest rendezvous
/// draw for the slot among the alive members, given as `(node_hash(name),
/// name)`. Unweighted and blind to load and records, so that every node
/// agrees on it from membership alone (capacities may not have reached
/// every node yet). It gathers the candidates' bids and tells the winner to
/// start. Ties by name.
pub fn coordinator<'m>(job: &str, slot: u32, members: &[(u64, &'m str)]) -> Option<&'m str> {
    let sh = slot_hash(job, slot);
    members
        .iter()
        .max_by(|a, b| {
            pair_hash(sh, a.0)
                .cmp(&pair_hash(sh, b.0))
                .then_with(|| b.1.cmp(a.1))
        })
        .map(|m| m.1)
}

/// Assigns the slots of one job, in order, the way a coordinator does once
/// the candidates' bids are in: for each slot, the `k` best-ranked eligible
/// nodes (weighted rendezvous over `nodes` as they stand, so every filter —
/// resources, ports, distinct hosts, spread — sees the slots assigned
/// before it) bid their cost, the lowest bid wins ([`bid_order`]), and the
/// winner's reservation, ports and the job's placements are raised before
/// the next slot. The node runs this with its candidates' fresh bids in
/// `nodes`; `placement-bench` and the simulator run the very same function.
///
/// Returns, per request, the index of the winning node or why no node fits.
pub fn assign(
    requests: &[SlotRequest],
    nodes: &mut [Node],
    index: &NodeIndex,
    placements: &mut JobPlacements,
    config: &PlacementConfig,
) -> Vec<Result<usize, Unplaceable>> {
    let mut out = Vec::with_capacity(requests.len());
    for req in requests {
        let Some(top) = top_k(req, nodes, index, placements, config) else {
            out.push(Err(unplaceable(req, nodes, placements)));
            continue;
        };
        let best = top
            .iter()
            .enumerate()
            .map(|(rank, (i, _))| {
                (
                    Bid {
                        node: nodes[*i].id.clone(),
                        cost: cost(&nodes[*i], req),
                        rank: rank as u32,
                    },
                    *i,
                )
            })
            .filter(|(b, _)| b.cost != u64::MAX)
            .min_by(|a, b| bid_order(&a.0, &b.0));
        match best {
            Some((_, i)) => {
                let n = &mut nodes[i];
                n.reserved = n.reserved.plus(req.resources);
                n.ports_used.extend(req.ports.iter().copied());
                *placements.entry(n.id.clone()).or_insert(0) += 1;
                out.push(Ok(i));
            }
            None => out.push(Err(unplaceable(req, nodes, placements))),
        }
    }
    out
}
