use std::time::Duration;

use super::sim::SimNet;
use super::*;

fn run(name: &str, generation: u64, port: u16) -> RunId {
    RunId {
        name: Arc::from(name),
        generation,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn entry(key: &str, version: u64, text: &str) -> Entry {
    Entry {
        key: Arc::from(key),
        version,
        text: Arc::from(text),
    }
}

fn node(me: RunId) -> Spread {
    Spread::new(SpreadConfig::default(), me, 7, Instant::now())
}

/// Every node sets the same keys (record, load, incarnation and a
/// certificate-sized value), as agents do at start.
fn set_initial(net: &mut SimNet) {
    for (i, n) in net.nodes.iter_mut().enumerate() {
        n.set("cert", &"c".repeat(700));
        n.set("record", &format!("{{\"name\":\"{}\"}}", sim::name(i)));
        n.set("load", "0");
        n.set("inc", "0");
    }
}

#[test]
fn a_joining_cluster_converges_by_notes_and_sync() {
    let mut net = SimNet::new(40, SpreadConfig::default(), 1);
    set_initial(&mut net);
    net.run_for(Duration::from_secs(5));
    assert!(
        net.converged(),
        "40 nodes hold each other's state after 5 s"
    );
    for n in &net.nodes {
        for other in &net.nodes {
            let held = n.run(other.me()).expect("held");
            let own = other.run(other.me()).expect("own");
            assert_eq!(held, own, "same keys and values");
        }
    }
}

#[test]
fn a_change_reaches_every_node_by_notes_alone() {
    // Anti-entropy off after convergence: only notes and pulls move it.
    let config = SpreadConfig {
        sync_min: Duration::from_secs(3600),
        ..SpreadConfig::default()
    };
    let mut net = SimNet::new(200, config, 2);
    set_initial(&mut net);
    net.converge_instantly();
    let v = net.nodes[17].set("load", "42");
    net.watch(17, v);
    net.run_for(Duration::from_secs(2));
    let last = net
        .reached
        .iter()
        .map(|t| t.expect("every node reached"))
        .max();
    let took = last.expect("nodes").duration_since(net.start);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    for n in &net.nodes {
        let s = n.run(net.nodes[17].me()).expect("held");
        assert_eq!(s.get("load"), Some((v, "42")));
    }
    // Every queue drained once the budget is spent: an idle cluster is
    // quiet again.
    net.run_for(Duration::from_secs(5));
    assert!(net.nodes.iter().all(|n| n.queued() == 0));
    let before: u64 = net.bytes.iter().sum();
    net.run_for(Duration::from_secs(10));
    assert_eq!(
        net.bytes.iter().sum::<u64>(),
        before,
        "no traffic when idle"
    );
}

#[test]
fn lost_messages_are_repaired_by_sync() {
    let mut net = SimNet::new(30, SpreadConfig::default(), 3);
    net.loss = 0.3;
    set_initial(&mut net);
    net.run_for(Duration::from_secs(20));
    for i in 0..30 {
        net.nodes[i].set("load", &format!("{i}"));
    }
    net.run_for(Duration::from_secs(30));
    assert!(net.converged(), "30% loss: converged by 50 s");
}

#[test]
fn a_node_back_from_a_partition_catches_up() {
    let mut net = SimNet::new(20, SpreadConfig::default(), 4);
    set_initial(&mut net);
    net.run_for(Duration::from_secs(5));
    assert!(net.converged());
    net.down[3] = true;
    for i in [0, 5, 9] {
        for k in 0..10 {
            net.nodes[i].set(&format!("app/{k}"), &format!("v{k}"));
        }
    }
    net.run_for(Duration::from_secs(5));
    net.down[3] = false;
    net.run_for(Duration::from_secs(10));
    assert!(net.converged(), "the node away caught up");
}

#[test]
fn idle_traffic_per_node_does_not_grow_with_the_cluster() {
    let mut per_node = Vec::new();
    for n in [50, 400] {
        let mut net = SimNet::new(n, SpreadConfig::default(), 5);
        set_initial(&mut net);
        net.converge_instantly();
        net.run_for(Duration::from_secs(60));
        let before: u64 = net.bytes.iter().sum();
        let secs = 300;
        net.run_for(Duration::from_secs(secs));
        let sent = net.bytes.iter().sum::<u64>() - before;
        per_node.push(sent as f64 / n as f64 / secs as f64);
    }
    let ratio = per_node[1] / per_node[0];
    assert!(
        (0.67..1.5).contains(&ratio),
        "bytes per node per second {per_node:?}"
    );
}

#[test]
fn a_delta_cut_by_size_stays_complete() {
    let me = run("a", 1, 1);
    let mut a = node(me.clone());
    for k in 0..50 {
        a.set(&format!("k{k}"), &"x".repeat(1000));
    }
    // Rewrite some keys: their old versions are superseded.
    a.set("k3", "new");
    a.set("k10", "new");
    let mut b = node(run("b", 1, 2));
    let state = a.run(&me).expect("own").clone();
    let mut from = 0;
    let mut pieces = 0;
    while from < state.max_version {
        let mut budget = 5000;
        let d = state.delta(&me, from, &mut budget).expect("more");
        let bytes: usize = d.entries.iter().map(|e| entry_bytes(&e.key, &e.text)).sum();
        assert!(
            bytes <= 5000 || d.entries.len() == 1,
            "cut to the budget: {bytes}"
        );
        from = d.to;
        assert_eq!(b.apply(d), Applied::Advanced);
        pieces += 1;
    }
    assert!(pieces > 5);
    assert_eq!(b.run(&me), Some(&state));
}

#[test]
fn gaps_older_runs_and_own_run_are_refused() {
    let me = run("b", 1, 2);
    let mut b = node(me.clone());
    let a1 = run("a", 1, 1);
    let d = |r: &RunId, from, to, e: Vec<Entry>| Delta {
        run: r.clone(),
        from,
        to,
        entries: e,
    };
    // Unknown run from the middle: a gap.
    assert_eq!(
        b.apply(d(&a1, 2, 3, vec![entry("k", 3, "x")])),
        Applied::Gap(0)
    );
    assert_eq!(
        b.apply(d(&a1, 0, 2, vec![entry("k", 2, "x")])),
        Applied::Advanced
    );
    assert_eq!(
        b.apply(d(&a1, 5, 6, vec![entry("k", 6, "y")])),
        Applied::Gap(2)
    );
    assert_eq!(
        b.apply(d(&a1, 0, 2, vec![entry("k", 2, "x")])),
        Applied::Nothing
    );
    // A newer run replaces the older; the older is refused after.
    let a2 = run("a", 2, 1);
    assert_eq!(
        b.apply(d(&a2, 0, 1, vec![entry("k", 1, "z")])),
        Applied::Advanced
    );
    assert!(b.run(&a1).is_none());
    assert_eq!(
        b.apply(d(&a1, 0, 9, vec![entry("k", 9, "old")])),
        Applied::Refused
    );
    // Nobody else writes this node's run.
    assert_eq!(
        b.apply(d(&me, 0, 9, vec![entry("k", 9, "forged")])),
        Applied::Refused
    );
}

#[test]
fn messages_out_of_bounds_are_refused() {
    let config = SpreadConfig::default();
    let long = Arc::<str>::from("n".repeat(NAME_LEN_MAX + 1));
    let bad_run = RunId {
        name: long,
        generation: 1,
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
    };
    assert!(Msg::Notes(vec![Note {
        run: bad_run,
        version: 1
    }])
    .check(&config)
    .is_err());
    let r = run("a", 1, 1);
    let outside = Delta {
        run: r.clone(),
        from: 5,
        to: 6,
        entries: vec![entry("k", 9, "x")],
    };
    assert!(Msg::Push(vec![outside]).check(&config).is_err());
    let backwards = Delta {
        run: r.clone(),
        from: 6,
        to: 5,
        entries: vec![],
    };
    assert!(Reply::Deltas(vec![backwards]).check(&config).is_err());
    // Versions announced without the write at the last one: an honest
    // delta always carries it (it is its key's newest write).
    let hollow = Delta {
        run: r.clone(),
        from: 1,
        to: u64::MAX,
        entries: vec![entry("k", 5, "x")],
    };
    assert!(Msg::Push(vec![hollow.clone()]).check(&config).is_err());
    assert!(Reply::Sync {
        deltas: vec![hollow],
        behind: vec![]
    }
    .check(&config)
    .is_err());
    let huge = Delta {
        run: r,
        from: 0,
        to: 1,
        entries: vec![entry("k", 1, &"x".repeat(TEXT_LEN_MAX + 1))],
    };
    assert!(Reply::Deltas(vec![huge]).check(&config).is_err());
    let many = Msg::Pull(vec![(run("a", 1, 1), 0); config.digest_max + 1]);
    assert!(many.check(&config).is_err());
    // A refused message changes nothing and answers nothing.
    let mut b = node(run("b", 1, 2));
    let (reply, actions) =
        b.on_message(SocketAddr::from(([127, 0, 0, 1], 1)), many, Instant::now());
    assert!(reply.is_none() && actions.is_empty());
}

#[test]
fn runs_beyond_the_bound_are_ignored() {
    let config = SpreadConfig {
        runs_max: 4,
        ..SpreadConfig::default()
    };
    let mut b = Spread::new(config, run("b", 1, 2), 7, Instant::now());
    for i in 0..10u16 {
        let r = run(&format!("n{i}"), 1, 100 + i);
        b.apply(Delta {
            run: r,
            from: 0,
            to: 1,
            entries: vec![entry("k", 1, "x")],
        });
    }
    assert_eq!(b.len(), 4);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Seeded runs with loss: every run converges once the loss stops, and
    /// no node ever holds a value its owner did not write at that version.
    #[test]
    fn every_seed_converges_to_the_owners_values(seed in 0u64..10_000, loss in 0.0f64..0.5) {
        let mut net = SimNet::new(12, SpreadConfig::default(), seed);
        net.loss = loss;
        set_initial(&mut net);
        for round in 0..5u64 {
            for i in 0..12usize {
                if (seed + round + i as u64).is_multiple_of(3) {
                    net.nodes[i].set(&format!("app/{round}"), &format!("{seed}-{round}-{i}"));
                }
            }
            net.run_for(Duration::from_millis(700));
        }
        net.loss = 0.0;
        net.run_for(Duration::from_secs(15));
        proptest::prop_assert!(net.converged());
        for n in &net.nodes {
            for owner in &net.nodes {
                proptest::prop_assert_eq!(n.run(owner.me()), owner.run(owner.me()));
            }
        }
    }
}
