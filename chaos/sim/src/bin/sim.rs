//! `sim`: a deterministic simulation of a whole shoal cluster — N nodes of
//! the real scheduler core and SWIM state machine in one process, on
//! virtual time, under seeded faults and workload — with shoal's
//! invariants checked. Exits non-zero on a violation and prints the command
//! that reproduces it.
//!
//! Usage: target/release/sim --seed S --nodes N --duration SIM_SECONDS [--report PATH]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use shoal_sim::{MembershipMode, Options, Sim, Workload};

#[derive(Parser, Debug)]
#[command(
    about = "shoal's deterministic simulator: real scheduler core and SWIM, seeded faults, invariants checked"
)]
struct Args {
    /// Seed of the run (random if absent; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Simulated seconds of faults.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Where to write the JSON report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Failure detection: `swim` (the real state machine on every node;
    /// the default up to 2,000 nodes) or `oracle` (modelled, shared per
    /// network component; the default above).
    #[arg(long)]
    membership: Option<String>,
    /// Run no faults (benchmarks).
    #[arg(long)]
    no_faults: bool,
    /// Benchmark workload: this many services of `--replicas` slots each,
    /// submitted at once.
    #[arg(long)]
    jobs: Option<usize>,
    /// Slots per job with `--jobs`.
    #[arg(long, default_value_t = 100)]
    replicas: u32,
    /// Kill this share of the nodes at once at `--kill-at` (benchmark).
    #[arg(long, default_value_t = 0.0)]
    kill_fraction: f64,
    /// When to kill them, simulated seconds.
    #[arg(long, default_value_t = 20)]
    kill_at: u64,
    /// Packet loss probability on every link, throughout.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Liveness bound, simulated seconds.
    #[arg(long, default_value_t = 30)]
    liveness_bound: u64,
    /// Print nothing but the summary.
    #[arg(long)]
    quiet: bool,
    /// A rolling update instead of the mixed workload:
    /// `N:MAX_PARALLEL:start-first|stop-first[:broken|:stuck|:twice][:canary=C]`
    /// (no faults).
    #[arg(long)]
    update: Option<String>,
    /// A node drain instead of the mixed workload:
    /// `N:MAX_PARALLEL[:DEADLINE_SECONDS][:paused]` (a checked service of N
    /// slots, a batch job and a system job; the node with the most service
    /// copies drained; `paused`: first a new version whose canary is never
    /// promoted; no faults).
    #[arg(long)]
    drain: Option<String>,
    /// Scheduler timings: `lan` (the default) or `local-test` (the preset
    /// the integration tests use: short join grace and retries).
    #[arg(long, default_value = "lan", value_parser = ["lan", "local-test"])]
    preset: String,
    /// Turn a safeguard off, to see what it prevents: `catch-up` (a
    /// joining node acts before it has caught up with a peer).
    #[arg(long, hide = true)]
    without: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut opts = Options::new(seed, args.nodes, Duration::from_secs(args.duration));
    opts.verbose = !args.quiet;
    opts.loss = args.loss;
    opts.faults = !args.no_faults;
    opts.liveness_bound = Duration::from_secs(args.liveness_bound);
    match args.membership.as_deref() {
        Some("swim") => opts.membership = MembershipMode::Swim,
        Some("oracle") => opts.membership = MembershipMode::Oracle,
        Some(other) => {
            eprintln!("sim: --membership {other}: use `swim` or `oracle`");
            std::process::exit(2);
        }
        None => {}
    }
    if let Some(jobs) = args.jobs {
        opts.workload = Workload::Bulk {
            jobs,
            replicas: args.replicas,
        };
        opts.faults = false;
        // Skew would only blur the timings the benchmark measures.
        opts.skew_max_ms = 0;
    }
    if let Some(u) = &args.update {
        // N:MAX_PARALLEL:start-first|stop-first[:broken|:stuck|:twice][:canary=C]
        let usage = || -> ! {
            eprintln!(
                "sim: --update takes N:MAX_PARALLEL:start-first|stop-first[:broken|:stuck|:twice][:canary=C], not `{u}`"
            );
            std::process::exit(2);
        };
        let parts: Vec<&str> = u.split(':').collect();
        let (Some(n), Some(mp), Some(order)) = (
            parts.first().and_then(|p| p.parse().ok()),
            parts.get(1).and_then(|p| p.parse().ok()),
            parts
                .get(2)
                .filter(|o| ["start-first", "stop-first"].contains(o)),
        ) else {
            usage()
        };
        let mut version = shoal_sim::NewVersion::Good;
        let mut canary = 0;
        for p in parts.iter().skip(3) {
            match *p {
                "broken" => version = shoal_sim::NewVersion::Broken,
                "stuck" => version = shoal_sim::NewVersion::Stuck,
                "twice" => version = shoal_sim::NewVersion::Twice,
                _ => match p.strip_prefix("canary=").and_then(|c| c.parse().ok()) {
                    Some(c) => canary = c,
                    None => usage(),
                },
            }
        }
        opts.workload = Workload::Update {
            replicas: n,
            max_parallel: mp,
            stop_first: *order == "stop-first",
            version,
            canary,
        };
        opts.faults = false;
    }
    if let Some(d) = &args.drain {
        // N:MAX_PARALLEL[:DEADLINE_S][:paused]
        let parts: Vec<&str> = d.split(':').collect();
        let paused_update = parts.get(3) == Some(&"paused");
        let (Some(n), Some(mp), Some(deadline)) = (
            parts.first().and_then(|p| p.parse().ok()),
            parts.get(1).and_then(|p| p.parse().ok()),
            parts.get(2).map_or(Some(30), |p| p.parse().ok()),
        ) else {
            eprintln!("sim: --drain takes N:MAX_PARALLEL[:DEADLINE_SECONDS][:paused], not `{d}`");
            std::process::exit(2);
        };
        opts.workload = Workload::Drain {
            replicas: n,
            max_parallel: mp,
            deadline: Duration::from_secs(deadline),
            paused_update,
        };
        opts.faults = false;
    }
    if args.preset == "local-test" {
        opts.scheduler = shoal_core::SchedulerConfig::local_test();
    }
    for w in &args.without {
        match w.as_str() {
            "catch-up" => opts.scheduler.act_before_catch_up = true,
            other => {
                eprintln!("sim: --without {other}: the only safeguard that can be turned off is `catch-up`");
                std::process::exit(2);
            }
        }
    }
    opts.kill_fraction = args.kill_fraction;
    opts.kill_at = Duration::from_secs(args.kill_at);
    let mut repro = format!(
        "sim --seed {seed} --nodes {} --duration {}",
        args.nodes, args.duration
    );
    if let Some(m) = &args.membership {
        repro.push_str(&format!(" --membership {m}"));
    }
    if args.loss > 0.0 {
        repro.push_str(&format!(" --loss {}", args.loss));
    }
    if args.no_faults {
        repro.push_str(" --no-faults");
    }
    if let Some(j) = args.jobs {
        repro.push_str(&format!(" --jobs {j} --replicas {}", args.replicas));
    }
    if args.preset != "lan" {
        repro.push_str(&format!(" --preset {}", args.preset));
    }
    for w in &args.without {
        repro.push_str(&format!(" --without {w}"));
    }
    if let Some(u) = &args.update {
        repro.push_str(&format!(" --update {u}"));
    }
    if let Some(d) = &args.drain {
        repro.push_str(&format!(" --drain {d}"));
    }
    if args.kill_fraction > 0.0 {
        repro.push_str(&format!(
            " --kill-fraction {} --kill-at {}",
            args.kill_fraction, args.kill_at
        ));
    }
    eprintln!(
        "sim: seed {seed}, {} nodes, {} s of faults",
        args.nodes, args.duration
    );
    let report = Sim::new(opts).run();
    let text = serde_json::to_string_pretty(&report.json).unwrap_or_default();
    if let Some(path) = &args.report {
        if let Err(e) = std::fs::write(path, &text) {
            eprintln!("sim: cannot write {}: {e}", path.display());
        }
    }
    println!("{text}");
    if report.violations.is_empty() {
        eprintln!("sim: no violation (seed {seed})");
    } else {
        eprintln!(
            "sim: {} violation(s) with seed {seed}:",
            report.violations.len()
        );
        for v in &report.violations {
            eprintln!("  - {v}");
        }
        eprintln!("reproduce with: {repro}");
        std::process::exit(1);
    }
}
