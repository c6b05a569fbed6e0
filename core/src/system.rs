//! System jobs: one copy on every node that meets the job's constraints
//! and fits it (a log shipper, a monitoring agent: fleet's global units,
//! Kubernetes' DaemonSets).
//!
//! **Each node decides for itself.** There is no coordinator and no bid:
//! whether a node qualifies depends only on the node (its labels, drivers
//! and free room), which the node knows first hand. A node that qualifies
//! and holds no copy starts one (`start_slots`, the same checks a winner
//! makes); one where it does not fit publishes why, as a coordinator
//! publishes an unplaceable slot, so every node shows it; one that stops
//! qualifying (its labels changed, the job's constraints changed) stops
//! its copy. Every copy is slot [`SLOT`] of its node: the identity of a
//! system copy is (job, node), so the rules between copies of one slot on
//! different nodes (the conflict rule, a restarted node's superseded
//! copies) do not apply to it.
//!
//! **Updates roll node by node, stop-first** (one copy per node: the new
//! one cannot start beside the old). The nodes that qualify, in name
//! order, are the "slots" of a stop-first window
//! ([`crate::update::stop_first_window`]): nodes whose copy is not ready on
//! the new version and none that serves count first, then the first
//! serving ones in name order, up to `max_parallel`. A node stops its old
//! copy only when it is in the window (and has known the version for
//! `update_settle`), then starts the new one as any node with no copy.

/// The slot of every system copy.
pub const SLOT: u32 = 0;

/// The nodes among `nodes` (every node that qualifies, in name order)
/// whose old copies may stop now: a stop-first window of `max_parallel`
/// over them, where `ready` says a node's copy runs the new version and
/// is ready, and `serving` that some ready copy (any version) runs there.
pub fn window<'a>(
    nodes: &[&'a str],
    max_parallel: u32,
    ready: impl Fn(&str) -> bool,
    serving: impl Fn(&str) -> bool,
) -> Vec<&'a str> {
    let n = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
    let at = |i: u32| nodes[i as usize];
    crate::update::stop_first_window(n, 0..n, max_parallel, |i| ready(at(i)), |i| serving(at(i)))
        .into_iter()
        .map(at)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_update_in_name_order_counting_those_already_down() {
        let nodes = ["a", "b", "c", "d"];
        // Nothing down: the first node not ready.
        assert_eq!(window(&nodes, 1, |n| n == "a", |_| true), vec!["b"]);
        // "c" is down (its old copy stopped): nobody else stops.
        assert_eq!(window(&nodes, 1, |n| n == "a", |n| n != "c"), vec!["c"]);
        // Two at once.
        assert_eq!(window(&nodes, 2, |_| false, |_| true), vec!["a", "b"]);
        // Every node ready: nothing to move.
        assert!(window(&nodes, 2, |_| true, |_| true).is_empty());
    }
}
