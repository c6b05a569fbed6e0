//! The chaos suite: N real agents, each in its own network namespace on a
//! private bridge, a workload of services and batch jobs driven through
//! random nodes' APIs, and faults on a schedule drawn from a seed — machine
//! crash, agent crash, hang (SIGSTOP/SIGCONT), restart, restart with a wiped
//! data dir, two-sided and one-way partitions, packet loss. A checker samples
//! the processes every node really runs and every agent's API, and checks
//! shoal's invariants (../shared/PRODUCT.md): liveness after each fault,
//! no accepted job lost, duplicates only within the conflict window outside
//! faults, completed batch slots never rerun.
//!
//! Usage (root; needs iproute2 and nftables):
//!   cargo run -p chaos --release -- --seed 7 --duration 1800 --nodes 7 --report chaos.json
//!   (`--only delay --only clock_skew` injects only those kinds)
//! Exits non-zero on a violation and prints the seed that reproduces it.

mod checker;
mod cluster;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use checker::{Checker, Model};
use cluster::{Cluster, Fault};

#[derive(Parser, Debug)]
#[command(about = "shoal chaos suite: faults from a seed, invariants checked, JSON report")]
struct Args {
    /// Seed of the fault and workload schedule (random if absent).
    #[arg(long)]
    seed: Option<u64>,
    /// How long to inject faults, seconds.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Agents.
    #[arg(long, default_value_t = 7)]
    nodes: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "chaos-report.json")]
    report: PathBuf,
    /// Liveness bound: every desired slot must run this long after a fault
    /// ends, seconds.
    #[arg(long, default_value_t = 30)]
    reconverge_bound: u64,
    /// Keep the run's directory (logs) for inspection.
    #[arg(long)]
    keep: bool,
    /// Inject only faults of these kinds (repeatable): machine_crash,
    /// agent_crash, hang, restart, wipe_restart, partition,
    /// one_way_partition, packet_loss, delay, clock_skew, disk_full,
    /// corrupt_store [default: all].
    #[arg(long = "only", value_parser = clap::builder::PossibleValuesParser::new(cluster::FAULT_KINDS))]
    only: Vec<String>,
}

/// Set by SIGINT/SIGTERM: the run stops at the next step and removes what
/// it made (agents, workloads, namespaces, bridge, firewall rules).
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether the run was interrupted.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

fn main() {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    match run(&args, seed) {
        Ok(violations) if violations.is_empty() => {
            println!(
                "chaos: no violation (seed {seed}); report in {}",
                args.report.display()
            );
        }
        Ok(violations) => {
            eprintln!("chaos: {} violation(s) with seed {seed}:", violations.len());
            for v in &violations {
                eprintln!("  - {v}");
            }
            // The binaries this run used, so that the line reproduces it
            // exactly (CI runs the debug build).
            let me = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "chaos".into());
            eprintln!(
                "reproduce: SHOAL_BIN={} {me} --seed {seed} --duration {} --nodes {}",
                chaos::procs::shoal_bin().display(),
                args.duration,
                args.nodes
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("chaos: the harness failed (seed {seed}): {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: &Args, seed: u64) -> Result<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::Builder::new().prefix("shoal-chaos-").tempdir()?;
    let root = if args.keep {
        dir.keep()
    } else {
        dir.path().to_path_buf()
    };
    println!(
        "chaos: seed {seed}, {} nodes, {} s of faults, run dir {}",
        args.nodes,
        args.duration,
        root.display()
    );
    let mut cluster = Cluster::start(&root, args.nodes)?;
    let mut model = Model::default();
    let mut checker = Checker::new(
        root.canonicalize()?,
        Duration::from_secs(args.reconverge_bound),
    );

    // A starting workload.
    for k in 0..3 {
        model.submit_service(&mut cluster, &mut checker, &mut rng, &format!("svc{k}"));
    }
    let runs = checker.runs_path().to_path_buf();
    model.submit_batch(&mut cluster, &mut checker, "batch0", &runs);
    checker.converge(&mut cluster, &model, "initial workload")?;

    let started = Instant::now();
    let mut next_job = 3;
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(args.duration) {
        if interrupted() {
            anyhow::bail!("interrupted; everything the run started is removed");
        }
        // Workload changes between faults, at random live nodes.
        for _ in 0..rng.random_range(1..=3) {
            match rng.random_range(0..10) {
                0..=2 => {
                    model.submit_service(
                        &mut cluster,
                        &mut checker,
                        &mut rng,
                        &format!("svc{next_job}"),
                    );
                    next_job += 1;
                }
                3..=4 => {
                    model.submit_batch(
                        &mut cluster,
                        &mut checker,
                        &format!("batch{next_job}"),
                        &runs,
                    );
                    next_job += 1;
                }
                5..=7 => model.scale_random(&mut cluster, &mut checker, &mut rng),
                _ => model.stop_random(&mut cluster, &mut checker, &mut rng),
            }
        }
        let fault = Fault::draw_of(&mut rng, args.nodes, &args.only);
        *faults.entry(fault.kind()).or_default() += 1;
        let hold = Duration::from_millis(rng.random_range(2_000..8_000));
        println!(
            "[{:>6.1}s] {fault} for {:.1} s",
            started.elapsed().as_secs_f64(),
            hold.as_secs_f64()
        );
        cluster.inject(&fault)?;
        checker.fault_began(fault.partitions());
        // A submission during the fault, at a node that is up.
        if rng.random_bool(0.5) {
            model.scale_random(&mut cluster, &mut checker, &mut rng);
        }
        checker.watch_for(&mut cluster, &model, hold);
        cluster.heal(&fault)?;
        checker.fault_ended(&mut cluster, &model);
        checker.converge(&mut cluster, &model, &fault.to_string())?;
    }
    // The end: every node up and healed, every accepted job everywhere.
    checker.final_checks(&mut cluster, &model)?;
    let mut report = checker.report(seed, args, &faults);
    report["corrupt_stores"] = cluster.corrupt_stores.into();
    report["corrupt_stores_detected"] = cluster.corrupt_detected.into();
    std::fs::write(&args.report, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(checker.violations().to_vec())
}

impl checker::ArgsView for Args {
    fn nodes(&self) -> usize {
        self.nodes
    }
    fn duration(&self) -> u64 {
        self.duration
    }
}
