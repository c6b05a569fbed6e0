//! The gossip design at sizes this machine cannot run as processes (#16):
//! N simulated nodes running the agents' own state machine
//! (`shoal_membership::spread`), every message encoded with postcard and
//! its bytes counted per sender, 1 ms latency. Prints, per size, the idle
//! bytes each node sends per simulated second (state gossip, plus the
//! failure detector's ping and ack, encoded the same way, at its fixed
//! rate), and how long one change (a node's load) takes to reach every
//! node, and what one node holding 10,000 instances costs each node when
//! it changes one (the bucket holding it). The cluster starts converged
//! (the state shared in memory between nodes, so 10,000 fit), then idles
//! `--warm` seconds before measuring.
//!
//! Usage: cargo build --release -p chaos --bin spread-sim &&
//! target/release/spread-sim [--sizes 100,1000,10000]

use std::time::Duration;

use chaos::stats::percentile;
use clap::Parser;
use shoal_membership::spread::sim::{self, SimNet};
use shoal_membership::spread::SpreadConfig;
use shoal_membership::swim::{ProbeMsg, ProbeReply, SwimConfig, View};
use shoal_membership::NodeState;

#[derive(Parser, Debug)]
#[command(about = "Simulated gossip bytes per node and change propagation, by cluster size")]
struct Args {
    /// Cluster sizes.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
    /// Simulated seconds idle before measuring.
    #[arg(long, default_value_t = 60)]
    warm: u64,
    /// Simulated seconds measured (idle).
    #[arg(long, default_value_t = 1200)]
    measure: u64,
    /// Changes whose propagation is timed, each from a random node.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Bytes a node's failure detector sends per second: one ping per probe
/// interval and, on average, one ack to another node's ping.
fn probe_bytes_per_s(n: usize) -> f64 {
    let swim = SwimConfig::lan();
    let ping = ProbeMsg::Ping {
        from: (sim::name(n - 1), 1_795_000_000_000, sim::addr(n - 1)),
        target: sim::name(n / 2),
        view_of_you: Some(View {
            state: NodeState::Alive,
            generation: 1_795_000_000_000,
            incarnation: 0,
        }),
    };
    let ack = ProbeReply::Ack {
        generation: 1_795_000_000_000,
        incarnation: 0,
    };
    let bytes = postcard::to_stdvec(&ping).map_or(0, |b| b.len())
        + postcard::to_stdvec(&ack).map_or(0, |b| b.len());
    bytes as f64 / swim.probe_interval.as_secs_f64()
}

/// The large node's instances, the agent's buckets, and bytes per
/// instance in a bucket (a published instance's JSON, about).
const INSTANCES: usize = 10_000;
const BUCKETS: usize = 64;
const INSTANCE_BYTES: usize = 70;

fn main() {
    let args = Args::parse();
    println!(
        "simulated gossip, per node, idle {} s after {} s warm-up",
        args.measure, args.warm
    );
    println!(
        "| nodes | state gossip B/s per node | + probes B/s | total B/s | change to all p50 / p99 / max | bytes per change per node |"
    );
    println!("|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let mut net = SimNet::new(n, SpreadConfig::default(), args.seed ^ n as u64);
        for (i, node) in net.nodes.iter_mut().enumerate() {
            node.set("cert", &"c".repeat(760));
            node.set(
                "record",
                &format!(
                    "{{\"name\":\"{}\",\"address\":\"{}\",\"labels\":{{}},\"capacity\":{{\"cpu_millis\":2000,\"memory_mb\":24000}},\"drivers\":[\"exec\",\"docker\"],\"version\":\"0.2.0\"}}{}",
                    sim::name(i),
                    sim::addr(i),
                    "s".repeat(120)
                ),
            );
            node.set(
                "load",
                &format!(
                    "{{\"cpu_millis\":0,\"memory_mb\":0,\"instances\":0}}{}",
                    "s".repeat(120)
                ),
            );
            node.set("inc", &format!("0{}", "s".repeat(120)));
        }
        // One node holds 10,000 instances, in the agent's 64 buckets of
        // about 70 bytes per instance.
        let big = n / 3;
        let bucket = |b: usize, round: usize| {
            format!(
                "{round}:{b}:{}",
                "i".repeat(INSTANCES / BUCKETS * INSTANCE_BYTES)
            )
        };
        for b in 0..BUCKETS {
            net.nodes[big].set(&format!("app/i/{b}"), &bucket(b, 0));
        }
        net.converge_instantly();
        net.run_for(Duration::from_secs(args.warm));
        let before: u64 = net.bytes.iter().sum();
        net.run_for(Duration::from_secs(args.measure));
        let idle = (net.bytes.iter().sum::<u64>() - before) as f64 / n as f64 / args.measure as f64;
        let probes = probe_bytes_per_s(n);
        let mut times = Vec::new();
        let mut per_change = Vec::new();
        for c in 0..args.changes {
            let who = (c * 7919 + 13) % n;
            let before: u64 = net.bytes_by_kind[..3].iter().sum();
            let v = net.nodes[who].set(
                "load",
                &format!(
                    "{{\"cpu_millis\":{c}00,\"memory_mb\":0,\"instances\":{c}}}{}",
                    "s".repeat(120)
                ),
            );
            net.watch(who, v);
            let start = net.now;
            net.run_for(Duration::from_secs(5));
            for t in net.reached.iter().flatten() {
                times.push(t.saturating_duration_since(start).as_secs_f64() * 1000.0);
            }
            let missing = net.reached.iter().filter(|r| r.is_none()).count();
            if missing > 0 {
                println!("  change {c}: {missing} of {n} nodes not reached within 5 s");
            }
            // The change's cost: its notes, pulls and their answers.
            let spent = (net.bytes_by_kind[..3].iter().sum::<u64>() - before) as f64;
            per_change.push(spent / n as f64);
        }
        // The node with 10,000 instances changes one: one bucket's new
        // value, to every node.
        let before: u64 = net.bytes_by_kind[..3].iter().sum();
        let text = bucket(7, 1);
        let v = net.nodes[big].set("app/i/7", &text);
        net.watch(big, v);
        net.run_for(Duration::from_secs(5));
        let missing = net.reached.iter().filter(|r| r.is_none()).count();
        let spent = (net.bytes_by_kind[..3].iter().sum::<u64>() - before) as f64 / n as f64;
        let large = format!(
            "{spent:.0} B per node for a {} B bucket ({:.2}x){}",
            text.len(),
            spent / text.len() as f64,
            if missing > 0 {
                format!(", {missing} nodes not reached within 5 s")
            } else {
                String::new()
            }
        );
        times.sort_by(f64::total_cmp);
        let per_change = per_change.iter().sum::<f64>() / per_change.len().max(1) as f64;
        println!(
            "| {n} | {idle:.0} | {probes:.0} | {:.0} | {:.0} / {:.0} / {:.0} ms | {per_change:.0} |",
            idle + probes,
            percentile(&times, 50.0),
            percentile(&times, 99.0),
            times.last().copied().unwrap_or(f64::NAN),
        );
        println!("  a node holding {INSTANCES} instances changes one: {large}");
        let kinds = net.bytes_by_kind;
        println!(
            "  bytes by kind (notes, pulls, their answers, syncs, their answers, pushes): {kinds:?}; runs held by node 0: {}",
            net.nodes[0].len()
        );
    }
}
