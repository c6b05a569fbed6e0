//! Properties of the placement engine.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::bid::{conflict_order, winner, Bid, RunningCopy};
use crate::filter::Rejection;
use crate::hrw;
use crate::model::*;
use crate::place::*;

const ZONES: [&str; 3] = ["a", "b", "c"];

fn arb_node(i: usize) -> impl Strategy<Value = Node> {
    (
        prop::sample::select(vec![1000u64, 2000, 4000, 8000, 16000]),
        prop::sample::select(vec![1024u64, 4096, 16384]),
        0u64..4000,
        0u64..8192,
        prop::option::of(0usize..3),
        prop::bool::weighted(0.8),
        prop::collection::btree_set(8000u16..8004, 0..2),
    )
        .prop_map(
            move |(cpu, mem, used_cpu, used_mem, zone, has_docker, ports)| {
                let mut n = Node::new(format!("node-{i:03}"), cpu, mem);
                n.used = Resources {
                    cpu_millis: used_cpu.min(cpu),
                    memory_mib: used_mem.min(mem),
                };
                if let Some(z) = zone {
                    n.labels.insert("zone".into(), ZONES[z].into());
                }
                if has_docker {
                    n.drivers.insert("docker".into());
                }
                n.ports_used = ports;
                n
            },
        )
}

fn arb_nodes(max: usize) -> impl Strategy<Value = Vec<Node>> {
    (1..max).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_request() -> impl Strategy<Value = SlotRequest> {
    (
        "[a-z]{1,6}",
        0u32..50,
        0u64..3000,
        0u64..6000,
        prop::bool::ANY,
        prop::option::of(prop::sample::select(vec![
            Constraint {
                label: "zone".into(),
                op: Op::Eq("a".into()),
            },
            Constraint {
                label: "zone".into(),
                op: Op::Ne("b".into()),
            },
            Constraint {
                label: "zone".into(),
                op: Op::In(vec!["a".into(), "c".into()]),
            },
            Constraint {
                label: "zone".into(),
                op: Op::NotIn(vec!["c".into()]),
            },
            Constraint {
                label: "zone".into(),
                op: Op::Exists,
            },
        ])),
        prop::collection::vec(8000u16..8004, 0..2),
        prop::bool::ANY,
    )
        .prop_map(
            |(job, slot, cpu, mem, docker, constraint, ports, distinct)| {
                let mut r = SlotRequest::simple(job, slot, cpu, mem);
                if docker {
                    r.driver = "docker".into();
                }
                r.constraints = constraint.into_iter().collect();
                r.ports = ports;
                r.distinct_hosts = distinct;
                r
            },
        )
}

fn arb_placements(nodes: &[Node]) -> impl Strategy<Value = JobPlacements> {
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    prop::collection::btree_map(prop::sample::select(ids), 1u32..3, 0..3)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn same_inputs_same_decision_whatever_the_order(
        (nodes, placements) in arb_nodes(30).prop_flat_map(|n| { let p = arb_placements(&n); (Just(n), p) }),
        req in arb_request(),
        seed in any::<u64>(),
        k in 1usize..6,
    ) {
        let config = PlacementConfig::with_candidates(k);
        let a = place(&req, &nodes, &placements, &config);
        let mut shuffled = nodes.clone();
        // deterministic shuffle from the seed
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let b = place(&req, &shuffled, &placements, &config);
        prop_assert_eq!(a, b);
        // bids evaluated in any order pick the same winner
        if let Ok(d) = place(&req, &nodes, &placements, &config) {
            let mut rev = d.bids.clone();
            rev.reverse();
            prop_assert_eq!(winner(&rev).map(|b| b.node.clone()), Some(d.winner));
        }
    }

    #[test]
    fn filters_are_never_violated(
        (nodes, placements) in arb_nodes(30).prop_flat_map(|n| { let p = arb_placements(&n); (Just(n), p) }),
        req in arb_request(),
    ) {
        match place(&req, &nodes, &placements, &PlacementConfig::default()) {
            Ok(d) => {
                let n = nodes.iter().find(|n| n.id == d.winner).unwrap();
                prop_assert!(n.drivers.contains(&req.driver));
                for c in &req.constraints {
                    let v = n.labels.get(&c.label);
                    let ok = match &c.op {
                        Op::Eq(x) => v == Some(x),
                        Op::Ne(x) => v != Some(x),
                        Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
                        Op::NotIn(xs) => !v.is_some_and(|v| xs.contains(v)),
                        Op::Exists => v.is_some(),
                    };
                    prop_assert!(ok, "constraint {} violated on {:?}", c, n.labels);
                }
                prop_assert!(n.used.plus(n.reserved).plus(req.resources).fits_in(n.capacity));
                for p in &req.ports {
                    prop_assert!(!n.ports_used.contains(p));
                }
                if req.distinct_hosts {
                    prop_assert!(placements.get(&n.id).copied().unwrap_or(0) == 0);
                }
            }
            Err(e) => {
                // Every node is accounted for by exactly one reason.
                prop_assert_eq!(e.rejections.values().sum::<usize>(), nodes.len());
            }
        }
    }

    #[test]
    fn adding_a_node_moves_only_the_slots_it_now_wins(
        nodes in arb_nodes(20),
        new_cpu in prop::sample::select(vec![1000u64, 4000, 16000]),
    ) {
        let config = PlacementConfig::with_candidates(1);
        let mut grown = nodes.clone();
        grown.push(Node::new("newcomer", new_cpu, 4096));
        for slot in 0..200 {
            let req = SlotRequest::simple("job", slot, 0, 0);
            let before = place(&req, &nodes, &BTreeMap::new(), &config).unwrap().winner;
            let after = place(&req, &grown, &BTreeMap::new(), &config).unwrap().winner;
            prop_assert!(after == before || after == "newcomer", "slot {slot} moved {before} -> {after}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_own_slots(nodes in arb_nodes(20), victim in any::<prop::sample::Index>()) {
        let config = PlacementConfig::with_candidates(1);
        let gone = nodes[victim.index(nodes.len())].id.clone();
        let shrunk: Vec<Node> = nodes.iter().filter(|n| n.id != gone).cloned().collect();
        prop_assume!(!shrunk.is_empty());
        for slot in 0..200 {
            let req = SlotRequest::simple("job", slot, 0, 0);
            let before = place(&req, &nodes, &BTreeMap::new(), &config).unwrap().winner;
            let after = place(&req, &shrunk, &BTreeMap::new(), &config).unwrap().winner;
            if before != gone {
                prop_assert_eq!(&after, &before);
            }
        }
    }

    #[test]
    fn conflict_rule_is_total_antisymmetric_and_transitive(
        a in ("[a-d]", 0u64..4), b in ("[a-d]", 0u64..4), c in ("[a-d]", 0u64..4),
    ) {
        let mk = |(node, started): (String, u64)| RunningCopy { node, started };
        let (a, b, c) = (mk(a), mk(b), mk(c));
        prop_assert_eq!(conflict_order(&a, &b), conflict_order(&b, &a).reverse());
        if conflict_order(&a, &b) == std::cmp::Ordering::Equal {
            prop_assert_eq!(&a, &b);
        }
        if conflict_order(&a, &b).is_le() && conflict_order(&b, &c).is_le() {
            prop_assert!(conflict_order(&a, &c).is_le());
        }
    }

    #[test]
    fn winner_rule_is_order_independent(costs in prop::collection::vec((0u64..5, 0u32..5), 1..8)) {
        let bids: Vec<Bid> = costs.iter().enumerate().map(|(i, (c, r))| Bid { node: format!("n{i}"), cost: *c, rank: *r }).collect();
        let mut rev = bids.clone();
        rev.reverse();
        prop_assert_eq!(winner(&bids), winner(&rev));
        let w = winner(&bids).unwrap();
        prop_assert!(bids.iter().all(|b| (w.cost, w.rank) <= (b.cost, b.rank)));
    }
}

#[test]
fn wins_converge_to_capacity_shares() {
    // Weights 1 : 2 : 4 : 8 (both CPU and memory scale together).
    let nodes: Vec<Node> = [1u64, 2, 4, 8]
        .iter()
        .map(|m| Node::new(format!("n{m}"), 1000 * m, 1024 * m))
        .collect();
    let total_weight: f64 = 15.0;
    let mut wins: BTreeMap<String, usize> = BTreeMap::new();
    let slots = 60_000;
    for s in 0..slots {
        let ranked = hrw::rank("job", s, &nodes);
        *wins.entry(ranked[0].0.id.clone()).or_default() += 1;
    }
    for (m, n) in [1u64, 2, 4, 8].iter().zip(&nodes) {
        let share = wins[&n.id] as f64 / slots as f64;
        let expected = *m as f64 / total_weight;
        assert!(
            (share - expected).abs() / expected < 0.05,
            "{}: share {share:.4}, expected {expected:.4}",
            n.id
        );
    }
}

#[test]
fn spread_keeps_skew_within_bound() {
    let mut nodes: Vec<Node> = (0..9)
        .map(|i| Node::new(format!("n{i}"), 100_000, 100_000).with_label("zone", ZONES[i % 3]))
        .collect();
    // an unbalanced cluster: zone a has the big nodes
    nodes[0].capacity.cpu_millis = 1_000_000;
    let mut placements: JobPlacements = BTreeMap::new();
    for slot in 0..30 {
        let mut req = SlotRequest::simple("web", slot, 100, 100);
        req.spread = Some(Spread {
            label: "zone".into(),
            max_skew: 1,
        });
        let d = place(&req, &nodes, &placements, &PlacementConfig::default()).unwrap();
        *placements.entry(d.winner.clone()).or_default() += 1;
        let n = nodes.iter_mut().find(|n| n.id == d.winner).unwrap();
        n.used = n.used.plus(req.resources);
        let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
        for n in &nodes {
            *per_zone.entry(n.labels["zone"].as_str()).or_default() +=
                placements.get(&n.id).copied().unwrap_or(0);
        }
        let (min, max) = (
            per_zone.values().min().unwrap(),
            per_zone.values().max().unwrap(),
        );
        assert!(max - min <= 1, "after slot {slot}: {per_zone:?}");
    }
}

/// A zone's copies on a node that is now full still count for the zone: with
/// one copy in each of zones a and b, the next may go to b although a's only
/// node with room holds none (proptest case e25ef97a, 2026-11-22: the test,
/// not `check_spread`, had dropped the full node's copy).
#[test]
fn a_full_nodes_copies_still_count_for_its_zone() {
    let mut nodes = vec![
        Node::new("a-full", 1000, 1000).with_label("zone", "a"),
        Node::new("a-free", 1000, 1000).with_label("zone", "a"),
        Node::new("b", 1000, 1000).with_label("zone", "b"),
    ];
    nodes[0].used = Resources {
        cpu_millis: 1000,
        memory_mib: 1000,
    };
    let mut placements: JobPlacements = BTreeMap::new();
    placements.insert("a-full".into(), 1);
    placements.insert("b".into(), 1);
    let mut req = SlotRequest::simple("web", 2, 100, 100);
    req.spread = Some(Spread {
        label: "zone".into(),
        max_skew: 1,
    });
    let (ok, _) = crate::place::eligible_for_tests(&req, &nodes, &placements);
    let ids: Vec<&str> = ok.iter().map(|i| nodes[*i].id.as_str()).collect();
    assert_eq!(
        ids,
        ["a-free", "b"],
        "both zones hold one copy: either may take the next"
    );
    // Without a-full's copy zone a would count 0 and b would be refused.
    placements.remove("a-full");
    let (ok, _) = crate::place::eligible_for_tests(&req, &nodes, &placements);
    let ids: Vec<&str> = ok.iter().map(|i| nodes[*i].id.as_str()).collect();
    assert_eq!(ids, ["a-free"]);
}

#[test]
fn unplaceable_says_which_filter_removed_how_many() {
    let mut nodes = vec![
        Node::new("a", 1000, 1024),
        Node::new("b", 1000, 1024),
        Node::new("c", 1000, 256),
        Node::new("d", 1000, 1024).with_label("zone", "x"),
    ];
    nodes[0].drivers = BTreeSet::new();
    let mut req = SlotRequest::simple("j", 0, 100, 512);
    req.constraints.push(Constraint {
        label: "zone".into(),
        op: Op::Ne("x".into()),
    });
    req.distinct_hosts = true;
    let placements = BTreeMap::from([("b".to_string(), 1)]);
    let e = place(&req, &nodes, &placements, &PlacementConfig::default()).unwrap_err();
    assert_eq!(e.rejections[&Rejection::Driver("exec".into())], 1);
    assert_eq!(e.rejections[&Rejection::DistinctHosts], 1);
    assert_eq!(e.rejections[&Rejection::Memory { need: 512 }], 1);
    assert_eq!(e.rejections[&Rejection::Constraint("zone != x".into())], 1);
    let text = e.to_string();
    assert!(
        text.contains("1 node lack 512 MiB of free memory"),
        "{text}"
    );
    assert!(text.contains("lack the `exec` driver"), "{text}");
}

/// A node refused as holding the slot's old copy meets every rule the old
/// copy does not change: only then may a start-first update go stop-first
/// there.
#[test]
fn the_old_copys_node_is_refused_for_it_only_if_it_meets_the_fixed_rules() {
    let nodes = vec![
        Node::new("a", 1000, 1024).with_label("zone", "x"),
        Node::new("b", 1000, 64).with_label("zone", "y"),
    ];
    let mut req = SlotRequest::simple("j", 0, 100, 512);
    req.avoid = vec!["a".into(), "b".into()];
    let e = place(&req, &nodes, &BTreeMap::new(), &PlacementConfig::default()).unwrap_err();
    // b lacks memory, but the old copy leaving may free it: the old copy is
    // the reason given.
    assert_eq!(e.rejections[&Rejection::HoldsOldCopy], 2);
    req.constraints.push(Constraint {
        label: "zone".into(),
        op: Op::Eq("y".into()),
    });
    let e = place(&req, &nodes, &BTreeMap::new(), &PlacementConfig::default()).unwrap_err();
    assert_eq!(e.rejections[&Rejection::Constraint("zone = y".into())], 1);
    assert_eq!(e.rejections[&Rejection::HoldsOldCopy], 1);
}

#[test]
fn affinity_changes_cost_not_eligibility() {
    let nodes = vec![
        Node::new("a", 1000, 1000).with_label("ssd", "yes"),
        Node::new("b", 1000, 1000),
    ];
    let mut req = SlotRequest::simple("j", 0, 100, 100);
    req.affinities.push(Affinity {
        constraint: Constraint {
            label: "ssd".into(),
            op: Op::Exists,
        },
        weight: 100,
    });
    let d = place(&req, &nodes, &BTreeMap::new(), &PlacementConfig::default()).unwrap();
    assert_eq!(d.winner, "a");
    assert_eq!(d.bids.len(), 2, "the node without the label still bids");
    // a strong anti-affinity pushes the slot away, never makes it unplaceable
    req.affinities[0].weight = -100;
    let d = place(&req, &nodes, &BTreeMap::new(), &PlacementConfig::default()).unwrap();
    assert_eq!(d.winner, "b");
    let only_a = vec![nodes[0].clone()];
    assert!(place(&req, &only_a, &BTreeMap::new(), &PlacementConfig::default()).is_ok());
}

#[test]
fn explain_lists_every_node_with_its_outcome() {
    let nodes = vec![
        Node::new("a", 1000, 1000),
        Node::new("b", 1000, 10),
        Node::new("c", 4000, 4000),
    ];
    let req = SlotRequest::simple("j", 3, 100, 100);
    let e = explain(&req, &nodes, &BTreeMap::new(), &PlacementConfig::default());
    assert_eq!(e.nodes.len(), 3);
    assert_eq!(e.nodes.iter().filter(|n| n.winner).count(), 1);
    let b = e.nodes.iter().find(|n| n.node == "b").unwrap();
    assert!(b.rejected.as_deref().unwrap().contains("memory"));
    assert!(b.bid_cost.is_none());
    assert!(e.nodes.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(e.unplaceable.is_none());
}

fn naive_top_k(req: &SlotRequest, nodes: &[Node], k: usize) -> Vec<String> {
    let eligible: Vec<Node> = nodes
        .iter()
        .filter(|n| crate::filter::check_node(n, req, &BTreeMap::new()).is_ok())
        .cloned()
        .collect();
    hrw::rank(&req.job, req.slot, &eligible)
        .into_iter()
        .take(k)
        .map(|(n, _)| n.id.clone())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn fast_candidate_selection_matches_full_ranking(
        nodes in arb_nodes(40),
        distinct_capacities in prop::bool::ANY,
        slot in 0u32..1000,
        k in 1usize..8,
        picky in prop::bool::ANY,
    ) {
        let mut nodes = nodes;
        if distinct_capacities {
            // more capacity classes than the fast path handles
            for (i, n) in nodes.iter_mut().enumerate() {
                n.capacity.cpu_millis += i as u64 * 7;
            }
            while nodes.len() < 80 {
                let i = nodes.len();
                nodes.push(Node::new(format!("extra-{i}"), 1000 + i as u64, 4096));
            }
        }
        let mut req = SlotRequest::simple("job", slot, 10, 10);
        if picky {
            // most nodes ineligible: the fast path must look past each class's best k
            req.constraints.push(Constraint { label: "zone".into(), op: Op::Eq("a".into()) });
            req.resources = Resources { cpu_millis: 1500, memory_mib: 900 };
        }
        let fast: Vec<String> = candidates(&req, &nodes, &BTreeMap::new(), &PlacementConfig::with_candidates(k))
            .map(|c| c.into_iter().map(|c| c.node).collect())
            .unwrap_or_default();
        prop_assert_eq!(fast, naive_top_k(&req, &nodes, k));
    }
}

proptest! {
    #[test]
    fn coordinator_depends_on_membership_only(nodes in arb_nodes(30), slot in 0u32..500) {
        let members: Vec<(u64, &str)> = nodes.iter().map(|n| (hrw::node_hash(&n.id), n.id.as_str())).collect();
        let c = coordinator("job", slot, &members).unwrap();
        let mut reversed = members.clone();
        reversed.reverse();
        prop_assert_eq!(coordinator("job", slot, &reversed), Some(c));
        // It is the unweighted rendezvous favourite.
        let equal: Vec<Node> = nodes.iter().map(|n| Node::new(n.id.clone(), 1000, 1000)).collect();
        prop_assert_eq!(c, hrw::rank("job", slot, &equal)[0].0.id.as_str());
    }
}

/// The job's copies per spread value, over the values the eligible nodes
/// carry; a value's copies are counted on every node that carries it, the
/// full ones included (a zone's copies do not vanish when its nodes fill up,
/// as in Kubernetes' topology spread).
fn spread_counts(
    all: &[Node],
    eligible: &[Node],
    placements: &JobPlacements,
    label: &str,
) -> BTreeMap<String, u32> {
    let mut counts: BTreeMap<String, u32> = eligible
        .iter()
        .filter_map(|n| n.labels.get(label))
        .map(|v| (v.clone(), 0))
        .collect();
    for n in all {
        if let Some(c) = n.labels.get(label).and_then(|v| counts.get_mut(v)) {
            *c += placements.get(&n.id).copied().unwrap_or(0);
        }
    }
    counts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A job's slots assigned together keep every rule against the state as
    /// each slot is assigned (the slots before it included): resources fit,
    /// host ports are free, one copy per node with distinct hosts or host
    /// ports, the constraints hold, the spread stays within its skew; and a
    /// slot is unplaceable only when no node at all passes the filters.
    #[test]
    fn assigned_slots_keep_every_rule_and_fail_only_when_nothing_fits(
        nodes in arb_nodes(25),
        base in arb_request(),
        slots in 1u32..12,
        spread in prop::bool::weighted(0.3),
    ) {
        let mut base = base;
        if spread {
            base.spread = Some(Spread { label: "zone".into(), max_skew: 1 });
        }
        let requests: Vec<SlotRequest> = (0..slots)
            .map(|s| SlotRequest { slot: s, ..base.clone() })
            .collect();
        let config = PlacementConfig::default();
        let index = NodeIndex::new(&nodes);
        let mut state = nodes.clone();
        let mut placements = JobPlacements::new();
        let mut check_state = nodes.clone();
        let mut check_placements = JobPlacements::new();
        let results = assign(&requests, &mut state, &index, &mut placements, &config);
        prop_assert_eq!(results.len(), requests.len());
        for (req, r) in requests.iter().zip(&results) {
            match r {
                Ok(i) => {
                    let n = &check_state[*i];
                    prop_assert!(n.drivers.contains(&req.driver));
                    prop_assert!(req.constraints.iter().all(|c| c.holds(n)), "constraint broken on {}", n.id);
                    prop_assert!(n.used.plus(n.reserved).plus(req.resources).fits_in(n.capacity), "{} overcommitted", n.id);
                    prop_assert!(req.ports.iter().all(|p| !n.ports_used.contains(p)), "port taken on {}", n.id);
                    let here = check_placements.get(&n.id).copied().unwrap_or(0);
                    if req.distinct_hosts || !req.ports.is_empty() {
                        prop_assert_eq!(here, 0, "two copies on {}", n.id);
                    }
                    if let Some(sp) = &req.spread {
                        // The value it goes to was within the skew before.
                        let eligible: Vec<Node> = check_state
                            .iter()
                            .filter(|m| crate::filter::check_node(m, req, &check_placements).is_ok())
                            .cloned()
                            .collect();
                        let counts = spread_counts(&check_state, &eligible, &check_placements, &sp.label);
                        let min = counts.values().copied().min().unwrap_or(0);
                        let v = n.labels.get(&sp.label).cloned().unwrap_or_default();
                        prop_assert!(counts.get(&v).copied().unwrap_or(0) + 1 - min <= sp.max_skew, "spread skew exceeded on {}", n.id);
                    }
                    let id = n.id.clone();
                    let m = &mut check_state[*i];
                    m.reserved = m.reserved.plus(req.resources);
                    m.ports_used.extend(req.ports.iter().copied());
                    *check_placements.entry(id).or_insert(0) += 1;
                }
                Err(_) => {
                    // Nothing passes: no node takes the slot as things stand.
                    let (eligible, _) = crate::place::eligible_for_tests(req, &check_state, &check_placements);
                    prop_assert!(eligible.is_empty(), "slot {} unplaceable although {} node(s) pass", req.slot, eligible.len());
                }
            }
        }
        prop_assert_eq!(&state, &check_state, "assign's view of the nodes after the round");
        prop_assert_eq!(&placements, &check_placements);
    }

    /// The same nodes in another order give the same assignment.
    #[test]
    fn assignment_does_not_depend_on_node_order(
        nodes in arb_nodes(20),
        base in arb_request(),
        slots in 1u32..8,
        seed in any::<u64>(),
    ) {
        let requests: Vec<SlotRequest> = (0..slots).map(|s| SlotRequest { slot: s, ..base.clone() }).collect();
        let config = PlacementConfig::default();
        let run = |nodes: &[Node]| {
            let mut state = nodes.to_vec();
            let index = NodeIndex::new(&state);
            let mut p = JobPlacements::new();
            let r = assign(&requests, &mut state, &index, &mut p, &config);
            r.into_iter()
                .map(|x| x.map(|i| state[i].id.clone()).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        };
        let mut shuffled = nodes.clone();
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        // Unplaceable reasons count nodes, which does not depend on order
        // either.
        prop_assert_eq!(run(&nodes), run(&shuffled));
    }
}

#[test]
fn a_round_spreads_a_job_evenly_over_equal_nodes() {
    // Bids see each pick: 12 slots on 4 equal nodes land 3 per node.
    let mut nodes: Vec<Node> = (0..4)
        .map(|i| Node::new(format!("n{i}"), 4000, 4096))
        .collect();
    let index = NodeIndex::new(&nodes);
    let requests: Vec<SlotRequest> = (0..12)
        .map(|s| SlotRequest::simple("web", s, 100, 64))
        .collect();
    let mut p = JobPlacements::new();
    let r = assign(
        &requests,
        &mut nodes,
        &index,
        &mut p,
        &PlacementConfig::default(),
    );
    assert!(r.iter().all(Result::is_ok));
    assert!(p.values().all(|n| *n == 3), "{p:?}");
}
