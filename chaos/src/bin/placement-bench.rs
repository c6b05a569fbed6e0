//! Placement benchmark: balance, fragmentation and speed of shoal's
//! rendezvous-plus-bids placement against the alternatives, in one run.
//!
//! Slots have heavy-tailed CPU and memory requests (most small, a few
//! large, as in published production traces); nodes are of mixed sizes,
//! scaled so that the total request is `--fill` of the total capacity.
//!
//! Usage: cargo run -p chaos --release --bin placement-bench -- [--help]

use std::time::Instant;

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_placement::{
    assign, cost, JobPlacements, Node, NodeIndex, PlacementConfig, Resources, SlotRequest,
};

#[derive(Parser, Debug)]
#[command(about = "Placement balance and speed: random, HRW, power-of-two, least-loaded, shoal")]
struct Args {
    /// Slot counts to place.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    slots: Vec<usize>,
    /// Node counts.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    nodes: Vec<usize>,
    /// Total request as a share of total capacity.
    #[arg(long, default_value_t = 0.85)]
    fill: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Values of k (candidates that bid, for every request) to run shoal
    /// with; 0 is the default configuration (k for most requests, more for
    /// large ones). E.g. `--ks 0,2,4,8,16` to sweep.
    #[arg(long, value_delimiter = ',')]
    ks: Vec<usize>,
    /// Override the default configuration's candidates for large requests.
    #[arg(long)]
    large_k: Option<usize>,
    /// Override the default configuration's large-request threshold.
    #[arg(long)]
    large_share: Option<f64>,
    /// Slots per job: shoal assigns a job's slots together, as its
    /// coordinator does (`placement::assign`, the function the node runs).
    #[arg(long, default_value_t = 50)]
    job_size: usize,
}

fn requests(n: usize, rng: &mut StdRng) -> Vec<Resources> {
    (0..n)
        .map(|_| {
            // 80% small, 15% medium, 5% large: the heavy tail of real traces.
            let p: f64 = rng.random();
            let cpu = if p < 0.80 {
                rng.random_range(50..500)
            } else if p < 0.95 {
                rng.random_range(500..2000)
            } else {
                rng.random_range(2000..8000)
            };
            let mib_per_milli: f64 = [0.5, 1.0, 2.0, 4.0][rng.random_range(0..4)];
            Resources {
                cpu_millis: cpu,
                memory_mib: ((cpu as f64) * mib_per_milli) as u64,
            }
        })
        .collect()
}

fn cluster(n: usize, demand: Resources, fill: f64, rng: &mut StdRng) -> Vec<Node> {
    let mut shapes: Vec<(f64, f64)> = (0..n)
        .map(|_| {
            let cores = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0][rng.random_range(0..6)];
            let gib_per_core = [2.0, 4.0, 8.0][rng.random_range(0..3)];
            (cores, cores * gib_per_core)
        })
        .collect();
    let (sc, sm): (f64, f64) = shapes
        .iter()
        .fold((0.0, 0.0), |(a, b), (c, m)| (a + c, b + m));
    let cpu_scale = demand.cpu_millis as f64 / fill / sc;
    let mem_scale = demand.memory_mib as f64 / fill / sm;
    shapes
        .drain(..)
        .enumerate()
        .map(|(i, (c, m))| {
            Node::new(
                format!("node-{i:04}"),
                (c * cpu_scale) as u64,
                (m * mem_scale) as u64,
            )
        })
        .collect()
}

fn fits(n: &Node, r: Resources) -> bool {
    n.used.plus(r).fits_in(n.capacity)
}

#[derive(Clone, Copy)]
enum Strategy {
    Random,
    PowerOfTwo,
    LeastLoaded,
    Shoal(usize),
}

impl Strategy {
    fn name(self) -> String {
        match self {
            Strategy::Random => "random".into(),
            Strategy::PowerOfTwo => "power-of-two".into(),
            Strategy::LeastLoaded => "least-loaded (omniscient)".into(),
            Strategy::Shoal(0) => {
                let d = default_config();
                format!(
                    "shoal (k={}/{} @{})",
                    d.candidates, d.candidates_large, d.large_share
                )
            }
            Strategy::Shoal(1) => "HRW alone (k=1)".into(),
            Strategy::Shoal(k) => format!("HRW + bids (k={k})"),
        }
    }
}

struct Outcome {
    max_over_mean: f64,
    unplaced: f64,
    decisions_per_s: f64,
}

fn default_config() -> PlacementConfig {
    let mut c = PlacementConfig::default();
    if let Some(k) = LARGE_K.get().copied().flatten() {
        c.candidates_large = k;
    }
    if let Some(s) = LARGE_SHARE.get().copied().flatten() {
        c.large_share = s;
    }
    c
}

static LARGE_K: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
static LARGE_SHARE: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
static JOB_SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn run(strategy: Strategy, reqs: &[Resources], base: &[Node], seed: u64) -> Outcome {
    let mut nodes = base.to_vec();
    let mut rng = StdRng::seed_from_u64(seed);
    let config = match strategy {
        Strategy::Shoal(0) => default_config(),
        Strategy::Shoal(k) => PlacementConfig::with_candidates(k),
        _ => PlacementConfig::with_candidates(1),
    };
    let mut unplaced = 0usize;
    let index = NodeIndex::new(&nodes);
    let started = Instant::now();
    if let Strategy::Shoal(_) = strategy {
        // Every candidate bids with its true load (as when every bid comes
        // back), and a job's slots are assigned together with the winner's
        // reservation raised after each pick: the node's own code.
        let job_size = JOB_SIZE.get().copied().unwrap_or(50).max(1);
        for (k, chunk) in reqs.chunks(job_size).enumerate() {
            let job = format!("job-{k}");
            let requests: Vec<SlotRequest> = chunk
                .iter()
                .enumerate()
                .map(|(s, r)| {
                    SlotRequest::simple(job.clone(), s as u32, r.cpu_millis, r.memory_mib)
                })
                .collect();
            let mut placements = JobPlacements::new();
            for result in assign(&requests, &mut nodes, &index, &mut placements, &config) {
                if result.is_err() {
                    unplaced += 1;
                }
            }
        }
        // `assign` reserves; count reservations as use.
        for n in nodes.iter_mut() {
            n.used = n.used.plus(n.reserved);
            n.reserved = Resources::default();
        }
    }
    for r in reqs
        .iter()
        .filter(|_| !matches!(strategy, Strategy::Shoal(_)))
    {
        let chosen: Option<usize> = match strategy {
            Strategy::Random => {
                let feasible: Vec<usize> =
                    (0..nodes.len()).filter(|&j| fits(&nodes[j], *r)).collect();
                (!feasible.is_empty()).then(|| feasible[rng.random_range(0..feasible.len())])
            }
            Strategy::PowerOfTwo => {
                let feasible: Vec<usize> =
                    (0..nodes.len()).filter(|&j| fits(&nodes[j], *r)).collect();
                if feasible.is_empty() {
                    None
                } else {
                    let a = feasible[rng.random_range(0..feasible.len())];
                    let b = feasible[rng.random_range(0..feasible.len())];
                    let req = SlotRequest::simple("j", 0, r.cpu_millis, r.memory_mib);
                    Some(if cost(&nodes[a], &req) <= cost(&nodes[b], &req) {
                        a
                    } else {
                        b
                    })
                }
            }
            Strategy::LeastLoaded => {
                let req = SlotRequest::simple("j", 0, r.cpu_millis, r.memory_mib);
                (0..nodes.len())
                    .filter(|&j| fits(&nodes[j], *r))
                    .min_by_key(|&j| cost(&nodes[j], &req))
            }
            Strategy::Shoal(_) => unreachable!("assigned per job above"),
        };
        match chosen {
            Some(j) => nodes[j].used = nodes[j].used.plus(*r),
            None => unplaced += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let util: Vec<f64> = nodes
        .iter()
        .map(|n| {
            (n.used.cpu_millis as f64 / n.capacity.cpu_millis as f64)
                .max(n.used.memory_mib as f64 / n.capacity.memory_mib as f64)
        })
        .collect();
    let mean = util.iter().sum::<f64>() / util.len() as f64;
    let max = util.iter().cloned().fold(0.0, f64::max);
    Outcome {
        max_over_mean: max / mean,
        unplaced: unplaced as f64 / reqs.len() as f64,
        decisions_per_s: reqs.len() as f64 / secs,
    }
}

fn main() {
    let args = Args::parse();
    LARGE_K.set(args.large_k).expect("set once");
    LARGE_SHARE.set(args.large_share).expect("set once");
    JOB_SIZE.set(args.job_size).expect("set once");
    let mut strategies = vec![
        Strategy::Random,
        Strategy::Shoal(1),
        Strategy::PowerOfTwo,
        Strategy::LeastLoaded,
    ];
    if args.ks.is_empty() {
        strategies.push(Strategy::Shoal(0));
    } else {
        strategies.extend(args.ks.iter().map(|&k| Strategy::Shoal(k)));
    }
    println!(
        "fill {:.0}% of capacity, heavy-tailed requests, mixed node sizes, seed {}",
        args.fill * 100.0,
        args.seed
    );
    println!(
        "{:<8} {:<6} {:<28} {:>9} {:>9} {:>10} {:>14}",
        "slots", "nodes", "strategy", "max/mean", "vs omni", "unplaced", "decisions/s"
    );
    for &slots in &args.slots {
        for &n in &args.nodes {
            let mut rng = StdRng::seed_from_u64(args.seed);
            let reqs = requests(slots, &mut rng);
            let demand = reqs.iter().fold(Resources::default(), |a, r| a.plus(*r));
            let nodes = cluster(n, demand, args.fill, &mut rng);
            let omni = run(Strategy::LeastLoaded, &reqs, &nodes, args.seed);
            for &s in &strategies {
                let o = if matches!(s, Strategy::LeastLoaded) {
                    Outcome {
                        max_over_mean: omni.max_over_mean,
                        unplaced: omni.unplaced,
                        decisions_per_s: omni.decisions_per_s,
                    }
                } else {
                    run(s, &reqs, &nodes, args.seed)
                };
                println!(
                    "{:<8} {:<6} {:<28} {:>9.3} {:>8.1}% {:>9.2}% {:>14.0}",
                    slots,
                    n,
                    s.name(),
                    o.max_over_mean,
                    (o.max_over_mean / omni.max_over_mean - 1.0) * 100.0,
                    o.unplaced * 100.0,
                    o.decisions_per_s
                );
            }
        }
    }
}
