//! Properties of the reconciler over generated cluster states, checked
//! across every node's output together (as Nomad's reconciler property
//! tests do): the nodes must split the work exactly.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use shoal_placement::Node;

use super::*;
use crate::hlc::{Hlc, Version};
use crate::instance::{Published, SlotState};
use crate::job::JobSpec;
use crate::records::JobRecord;

fn job(name: &str, replicas: u32, batch: bool) -> JobRecord {
    let text = format!(
        "name = \"{name}\"\ntype = \"{}\"\nreplicas = {replicas}\n[task]\ncommand = \"sleep\"\n",
        if batch { "batch" } else { "service" }
    );
    JobRecord {
        name: name.into(),
        version: Version {
            hlc: Hlc {
                wall_ms: 1,
                logical: 0,
            },
            node: "n0".into(),
        },
        spec: Some(JobSpec::parse(&text).unwrap()),
        seq: 1,
        history: Vec::new(),
        reverted_from: None,
        promoted: false,
        deployment: None,
        node: None,
        claim: None,
    }
}

#[derive(Debug, Clone)]
struct World {
    nodes: Vec<Node>,
    jobs: Vec<JobRecord>,
    observed: Vec<Observed>,
    completed: BTreeSet<(String, u32)>,
}

fn arb_world() -> impl Strategy<Value = World> {
    (
        2usize..8,
        prop::collection::vec((1u32..6, prop::bool::ANY, prop::bool::ANY), 1..4),
        prop::collection::vec((0usize..4, 0u32..8, 0usize..8, 0u64..5, 0u8..10), 0..30),
        prop::collection::vec((0usize..4, 0u32..8), 0..4),
    )
        .prop_map(|(n, jobs, copies, done)| {
            let nodes: Vec<Node> = (0..n)
                .map(|i| Node::new(format!("n{i}"), 4000, 4096))
                .collect();
            let mut records: Vec<JobRecord> = jobs
                .iter()
                .enumerate()
                .map(|(i, (r, batch, _))| {
                    let mut j = job(&format!("j{i}"), *r, *batch);
                    // Rolling updates of both orders and widths.
                    if let Some(s) = j.spec.as_mut() {
                        s.update.max_parallel = 1 + (i as u32 % 2);
                        if i % 3 == 1 {
                            s.update.order = crate::update::Order::StopFirst;
                        }
                    }
                    j
                })
                .collect();
            // some jobs stopped
            for (i, (_, _, stopped)) in jobs.iter().enumerate() {
                if *stopped && i % 2 == 1 {
                    records[i].spec = None;
                }
            }
            let fp = |j: &JobRecord| j.spec.as_ref().map(|s| s.task.fingerprint()).unwrap_or(0);
            let observed = copies
                .into_iter()
                .filter(|(j, ..)| *j < records.len())
                .map(|(j, slot, node, run, kind)| Observed {
                    node: format!("n{}", node % n).into(),
                    job: records[j].name.as_str().into(),
                    copy: Published {
                        health: Default::default(),
                        check: None,
                        checks_passing: 0,
                        checks_critical: 0,
                        stopping: false,
                        ready: kind >= 6,
                        failed: false,
                        version: 0,
                        slot,
                        run,
                        state: match kind {
                            0 => SlotState::Completed,
                            1 => SlotState::Starting,
                            _ => SlotState::Running,
                        },
                        task: if kind == 9 { 12345 } else { fp(&records[j]) },
                        restarts: 0,
                        error: None,
                        ports: Default::default(),
                    },
                })
                .collect::<Vec<_>>();
            // one copy per (node, job, slot): a node holds one run of a slot
            let mut seen = BTreeSet::new();
            let observed = observed
                .into_iter()
                .filter(|o| seen.insert((o.node.to_string(), o.job.to_string(), o.copy.slot)))
                .collect();
            let completed = done
                .into_iter()
                .filter(|(j, _)| *j < records.len())
                .map(|(j, s)| (records[j].name.clone(), s))
                .collect();
            World {
                nodes,
                jobs: records,
                observed,
                completed,
            }
        })
}

/// Whether a ready copy of the job's current task holds `slot`.
fn ready_in(w: &World, spec: &JobSpec, slot: u32) -> bool {
    let fp = spec.task.fingerprint();
    w.observed.iter().any(|o| {
        *o.job == *spec.name
            && o.copy.slot == slot
            && o.copy.task == fp
            && o.copy.ready
            && o.copy.state == SlotState::Running
    })
}

/// The job's rolling-update window in the world.
fn window_of(w: &World, spec: &JobSpec) -> Vec<u32> {
    crate::update::window(spec.replicas, spec.update.max_parallel, |s| {
        ready_in(w, spec, s)
    })
}

fn run_all(w: &World) -> BTreeMap<String, Actions> {
    let members: Vec<String> = w.nodes.iter().map(|n| n.id.clone()).collect();
    let pending = BTreeSet::new();
    w.nodes
        .iter()
        .map(|n| {
            let inp = Inputs {
                me: &n.id,
                jobs: &w.jobs,
                completed: &w.completed,
                observed: &w.observed,
                members: &members,
                pending: &pending,
            };
            (n.id.clone(), reconcile(&inp))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn every_empty_slot_is_placed_by_exactly_one_node(w in arb_world()) {
        let all = run_all(&w);
        let mut placed: BTreeMap<(String, u32), usize> = BTreeMap::new();
        for a in all.values() {
            for k in &a.place {
                *placed.entry(k.clone()).or_default() += 1;
            }
        }
        for (k, n) in &placed {
            prop_assert_eq!(*n, 1, "slot {:?} placed by {} nodes", k, n);
        }
        for j in w.jobs.iter().filter_map(|j| j.spec.as_ref()) {
            let fp = j.task.fingerprint();
            for slot in 0..j.replicas {
                let key = (j.name.clone(), slot);
                let copies: Vec<&Observed> = w.observed.iter().filter(|o| *o.job == *j.name && o.copy.slot == slot).collect();
                let live = copies.iter().any(|o| o.copy.state.is_live() && o.copy.task == fp);
                let old = copies.iter().any(|o| o.copy.state.is_live() && o.copy.task != fp);
                let finished = j.job_type == crate::job::JobType::Batch
                    && (w.completed.contains(&key) || copies.iter().any(|o| matches!(o.copy.state, SlotState::Completed | SlotState::Failed)));
                // A slot whose old copy runs moves only by the rolling
                // update: start-first in the window, stop-first never
                // beside it (batch at once).
                let in_window = window_of(&w, j).contains(&slot);
                let update_allows = !old
                    || j.job_type == crate::job::JobType::Batch
                    || (j.update.order == crate::update::Order::StartFirst && in_window);
                let should = !live && !finished && update_allows;
                prop_assert_eq!(placed.contains_key(&key), should, "slot {:?}: live {} old {} finished {}", key, live, old, finished);
            }
        }
    }

    #[test]
    fn nodes_stop_only_their_own_copies_and_one_copy_survives(w in arb_world()) {
        let all = run_all(&w);
        let mut stopped: BTreeSet<(String, String, u32, u64)> = BTreeSet::new();
        for (node, a) in &all {
            for (job, slot, run, _) in &a.stop {
                prop_assert!(
                    w.observed.iter().any(|o| *o.node == **node && *o.job == **job && o.copy.slot == *slot && o.copy.run == *run),
                    "{} stops a copy it does not hold", node
                );
                stopped.insert((node.clone(), job.clone(), *slot, *run));
            }
        }
        for j in w.jobs.iter() {
            let live_after: Vec<&Observed> = w
                .observed
                .iter()
                .filter(|o| *o.job == *j.name && o.copy.state.is_live())
                .filter(|o| !stopped.contains(&(o.node.to_string(), o.job.to_string(), o.copy.slot, o.copy.run)))
                .collect();
            match &j.spec {
                None => prop_assert!(live_after.is_empty(), "a stopped job keeps running"),
                Some(spec) => {
                    let fp = spec.task.fingerprint();
                    let window = window_of(&w, spec);
                    for slot in 0..spec.replicas + 8 {
                        let n = live_after.iter().filter(|o| o.copy.slot == slot).count();
                        let current = live_after.iter().filter(|o| o.copy.slot == slot && o.copy.task == fp).count();
                        if slot >= spec.replicas {
                            prop_assert_eq!(n, 0, "slot {} beyond replicas still runs", slot);
                            continue;
                        }
                        prop_assert!(current <= 1, "slot {} keeps {} copies of its task", slot, current);
                        // Old copies outlive the pass only as the rolling
                        // update says: start-first until the slot is
                        // ready, stop-first outside the window.
                        if n > current {
                            let ready = ready_in(&w, spec, slot);
                            let allowed = spec.job_type == crate::job::JobType::Service
                                && match spec.update.order {
                                    crate::update::Order::StartFirst => !ready,
                                    crate::update::Order::StopFirst => !ready && !window.contains(&slot),
                                };
                            prop_assert!(allowed, "slot {} keeps an old copy (ready {}, window {:?})", slot, ready, window);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_older_copy_survives_a_conflict() {
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(format!("n{i}"), 1000, 1000))
        .collect();
    let jobs = vec![job("web", 1, false)];
    let fp = jobs[0].spec.as_ref().unwrap().task.fingerprint();
    let copy = |node: &str, run| Observed {
        node: node.into(),
        job: "web".into(),
        copy: running_copy(fp, run, false),
    };
    let w = World {
        nodes,
        jobs,
        observed: vec![copy("n1", 5), copy("n2", 3)],
        completed: BTreeSet::new(),
    };
    let all = run_all(&w);
    assert_eq!(
        all["n1"].stop,
        vec![("web".to_string(), 0, 5, StopReason::Duplicate)]
    );
    assert!(all["n2"].stop.is_empty());
    assert!(all.values().all(|a| a.place.is_empty()));
}

/// A copy of `fp` for the drain tests: running, `ready` or not, started
/// at `run`.
fn running_copy(fp: u64, run: u64, ready: bool) -> Published {
    Published {
        health: Default::default(),
        check: None,
        checks_passing: 0,
        checks_critical: 0,
        stopping: false,
        ready,
        failed: false,
        version: 0,
        slot: 0,
        run,
        state: SlotState::Running,
        task: fp,
        restarts: 0,
        error: None,
        ports: Default::default(),
    }
}

#[test]
fn a_draining_service_copy_gives_way_only_to_a_ready_copy_elsewhere() {
    let record = job("web", 1, false);
    let spec = record.spec.as_ref().unwrap();
    let fp = spec.task.fingerprint();
    let leaving = |n: &str| n == "old";
    // The draining node's copy is the older one: by the conflict rule it
    // would win, and the new copy would stop.
    let draining = running_copy(fp, 1, true);
    let starting = running_copy(fp, 9, false);
    let stop = |me: &str, mine: &Published, other: (&str, &Published)| {
        own_copy_stop(me, Some((spec, fp)), false, false, mine, [other], leaving)
    };
    // The new copy elsewhere is not ready: both stay.
    assert_eq!(stop("old", &draining, ("new", &starting)), None);
    assert_eq!(stop("new", &starting, ("old", &draining)), None);
    // Once it is ready, the draining copy stops; the new one stays.
    let ready = running_copy(fp, 9, true);
    assert_eq!(
        stop("old", &draining, ("new", &ready)),
        Some(StopReason::Drained)
    );
    assert_eq!(stop("new", &ready, ("old", &draining)), None);
    // Without a drain, the conflict rule stops the younger copy.
    let none = |_: &str| false;
    assert_eq!(
        own_copy_stop(
            "new",
            Some((spec, fp)),
            false,
            false,
            &ready,
            [("old", &draining)],
            none
        ),
        Some(StopReason::Duplicate)
    );
}

#[test]
fn a_batch_copy_on_a_draining_node_keeps_the_conflict_rule() {
    let record = job("crunch", 1, true);
    let spec = record.spec.as_ref().unwrap();
    let fp = spec.task.fingerprint();
    let leaving = |n: &str| n == "old";
    let draining = running_copy(fp, 1, true);
    let other = running_copy(fp, 9, true);
    // One copy per batch slot wherever it is: the younger one stops, and
    // the draining node's runs on until its deadline.
    assert_eq!(
        own_copy_stop(
            "new",
            Some((spec, fp)),
            false,
            false,
            &other,
            [("old", &draining)],
            leaving
        ),
        Some(StopReason::Duplicate)
    );
    assert_eq!(
        own_copy_stop(
            "old",
            Some((spec, fp)),
            false,
            false,
            &draining,
            [("new", &other)],
            leaving
        ),
        None
    );
}
