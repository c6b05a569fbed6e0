//! Scheduling benchmark on real agents on 127.0.0.1:
//!
//! 1. failure to replacement: `--nodes` agents (default 20), a service of
//!    `--slots` (200) `sleep` processes; crash a node holding slots (agent
//!    and processes killed at once); time until every lost slot runs on
//!    another node, as a survivor's API reports it; `--trials` times;
//! 2. submission to running: 10,000 slots with the `hollow` driver, and
//!    1,000 with real processes (`sleep`);
//! 3. node-to-node bytes per second per node (frame payloads), idle and
//!    during the 10,000-slot submission; agent RSS idle and holding
//!    10,000 slots.
//!
//! Usage: cargo build --release && target/release/sched-bench [--help]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos::procs::{rss_kib, start_cluster, wait_for, Agent};
use chaos::stats::percentile;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Failure-to-replacement, submission-to-running, gossip bytes and RSS of shoal")]
struct Args {
    /// Agents.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Service slots for the failure trials.
    #[arg(long, default_value_t = 200)]
    slots: u32,
    /// Failure trials.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Slots of the hollow submission.
    #[arg(long, default_value_t = 10_000)]
    hollow_slots: u32,
    /// Slots of the real-process submission.
    #[arg(long, default_value_t = 1_000)]
    process_slots: u32,
    /// Jobs a new node must catch up on (0 skips the measurement).
    #[arg(long, default_value_t = 10_000)]
    catchup_jobs: u32,
    /// Skip the failure and submission phases (catch-up only).
    #[arg(long)]
    catchup_only: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Submits `jobs` one-slot hollow jobs to a 3-node cluster, then starts a
/// fourth node and times until its store holds them all. Returns (seconds
/// to submit, seconds to catch up, store bytes per job on the new node).
fn catchup(root: &Path, jobs: u32) -> Result<(f64, f64, f64)> {
    let mut agents = start_cluster(root, 3, &["--hollow"])?;
    converge(&agents)?;
    let started = Instant::now();
    for i in 0..jobs {
        let text = format!(
            "name = \"job-{i}\"\ntype = \"service\"\nreplicas = 1\n[task]\ndriver = \"hollow\"\ncommand = \"sleep\"\n[task.resources]\ncpu = 1\nmemory = 1\n"
        );
        agents[(i % 3) as usize].post("/v1/jobs", &text)?;
    }
    let submit = started.elapsed().as_secs_f64();
    let count = |a: &Agent| {
        a.get("/v1/jobs")
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0)
    };
    wait_for("the three nodes to agree", WAIT, || {
        agents.iter().all(|a| count(a) == jobs as usize)
    })?;
    let seed = agents[0].quic.clone();
    let started = Instant::now();
    let fresh = Agent::start(root, "late", Some(&seed), &["--hollow"])?;
    wait_for("the new node to catch up", WAIT, || {
        count(&fresh) == jobs as usize
    })?;
    let took = started.elapsed().as_secs_f64();
    let store = std::fs::metadata(fresh.dir.join("state.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    agents.push(fresh);
    Ok((submit, took, store as f64 / jobs as f64))
}

const WAIT: Duration = Duration::from_secs(120);

fn service(name: &str, replicas: u32, driver: &str) -> String {
    format!(
        "name = \"{name}\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ndriver = \"{driver}\"\ncommand = \"sleep\"\nargs = [\"100000\"]\n[task.resources]\ncpu = 1\nmemory = 1\n"
    )
}

/// (slot -> node) of running slots of `job`, per `observer`.
fn running(observer: &Agent, job: &str) -> Vec<(u64, String)> {
    let Some(v) = observer.get(&format!("/v1/jobs/{job}")) else {
        return Vec::new();
    };
    let replicas = v["replicas"].as_u64().unwrap_or(0);
    v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| {
                    i["state"] == "running" && i["slot"].as_u64().unwrap_or(u64::MAX) < replicas
                })
                .map(|i| {
                    (
                        i["slot"].as_u64().unwrap_or(0),
                        i["node"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn bytes_sent(a: &Agent) -> u64 {
    a.get("/v1/stats")
        .and_then(|v| v["transport"]["bytes_sent"].as_u64())
        .unwrap_or(0)
}

fn total_bytes(agents: &[Agent]) -> u64 {
    agents
        .iter()
        .filter(|a| a.proc_running())
        .map(bytes_sent)
        .sum()
}

trait Running {
    fn proc_running(&self) -> bool;
}

impl Running for Agent {
    fn proc_running(&self) -> bool {
        self.proc.pid().is_some()
    }
}

fn converge(agents: &[Agent]) -> Result<()> {
    let n = agents.len();
    wait_for("every agent to see every node alive", WAIT, || {
        agents.iter().all(|a| {
            a.get("/v1/nodes")
                .and_then(|v| {
                    v.as_array()
                        .map(|ns| ns.iter().filter(|x| x["state"] == "alive").count() == n)
                })
                .unwrap_or(false)
        })
    })?;
    // Let joining nodes finish their grace before submitting.
    std::thread::sleep(Duration::from_millis(2500));
    Ok(())
}

fn failure_trials(args: &Args, root: &Path) -> Result<Vec<f64>> {
    let mut agents = start_cluster(root, args.nodes, &[])?;
    converge(&agents)?;
    agents[0].post("/v1/jobs", &service("web", args.slots, "exec"))?;
    let n = args.slots as usize;
    wait_for("all slots running", WAIT, || {
        running(&agents[0], "web").len() == n
    })?;
    let mut samples = Vec::new();
    for trial in 0..args.trials {
        let placed = running(&agents[0], "web");
        let victim_name = {
            // a node holding slots, other than the observer (n0)
            let mut holders: Vec<&String> = placed
                .iter()
                .map(|(_, n)| n)
                .filter(|n| *n != "n0")
                .collect();
            holders.sort();
            holders.dedup();
            holders
                .get(trial % holders.len().max(1))
                .map(|s| s.to_string())
                .context("no holder")?
        };
        let lost = placed.iter().filter(|(_, n)| *n == victim_name).count();
        let vi = agents
            .iter()
            .position(|a| a.name == victim_name)
            .expect("an agent");
        let started = Instant::now();
        agents[vi].crash();
        wait_for("the lost slots to run elsewhere", WAIT, || {
            let r = running(&agents[0], "web");
            r.len() == n && r.iter().all(|(_, node)| *node != victim_name)
        })?;
        let secs = started.elapsed().as_secs_f64();
        println!("  trial {:2}: {victim_name} held {lost} slots; all running elsewhere after {secs:.3} s", trial + 1);
        samples.push(secs);
        // Bring the node back and let the cluster settle.
        let seed = agents[0].quic.clone();
        agents[vi] = Agent::start(root, &victim_name, Some(&seed), &[])?;
        converge(&agents)?;
    }
    Ok(samples)
}

struct Submission {
    seconds: f64,
    bytes_per_node_per_s_idle: f64,
    bytes_per_node_per_s_busy: f64,
    rss_idle_kib: u64,
    rss_loaded_kib: u64,
}

fn submission(
    args: &Args,
    root: &Path,
    driver: &str,
    slots: u32,
    measure_idle: bool,
) -> Result<Submission> {
    let extra: &[&str] = if driver == "hollow" {
        &["--hollow"]
    } else {
        &[]
    };
    let agents = start_cluster(root, args.nodes, extra)?;
    converge(&agents)?;
    let (mut idle_rate, mut rss_idle) = (0.0, 0);
    if measure_idle {
        let b0 = total_bytes(&agents);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(10));
        idle_rate =
            (total_bytes(&agents) - b0) as f64 / t0.elapsed().as_secs_f64() / agents.len() as f64;
        rss_idle = agents.iter().map(|a| rss_kib(a.pid)).max().unwrap_or(0);
    }
    let b0 = total_bytes(&agents);
    let started = Instant::now();
    agents[0].post("/v1/jobs", &service("bulk", slots, driver))?;
    wait_for("every slot running", WAIT, || {
        running(&agents[0], "bulk").len() == slots as usize
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let busy_rate = (total_bytes(&agents) - b0) as f64 / seconds / agents.len() as f64;
    let rss_loaded = agents.iter().map(|a| rss_kib(a.pid)).max().unwrap_or(0);
    Ok(Submission {
        seconds,
        bytes_per_node_per_s_idle: idle_rate,
        bytes_per_node_per_s_busy: busy_rate,
        rss_idle_kib: rss_idle,
        rss_loaded_kib: rss_loaded,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    if args.catchup_jobs > 0 {
        let tmp = tempfile::tempdir()?;
        let (submit, took, per_job) = catchup(tmp.path(), args.catchup_jobs)?;
        println!(
            "catch-up: {} jobs submitted in {submit:.1} s; a new node held all of them {took:.2} s after it started; its store: {per_job:.0} bytes per job",
            args.catchup_jobs
        );
    }
    if args.catchup_only {
        return Ok(());
    }
    println!("{} agents on 127.0.0.1", args.nodes);
    let failure = {
        let tmp = tempfile::tempdir()?;
        println!("failure to replacement ({} service slots of `sleep`, crash = agent and its processes killed):", args.slots);
        failure_trials(&args, tmp.path())?
    };
    let hollow = {
        let tmp = tempfile::tempdir()?;
        submission(&args, tmp.path(), "hollow", args.hollow_slots, true)?
    };
    let procs = {
        let tmp = tempfile::tempdir()?;
        submission(&args, tmp.path(), "exec", args.process_slots, false)?
    };
    println!();
    println!(
        "failure -> all lost slots running elsewhere: p50 {:.3} s  p99 {:.3} s  (min {:.3}, max {:.3}, {} trials)",
        percentile(&failure, 50.0),
        percentile(&failure, 99.0),
        percentile(&failure, 0.0),
        percentile(&failure, 100.0),
        failure.len()
    );
    println!(
        "submission -> running: {} hollow slots in {:.2} s; {} process slots in {:.2} s",
        args.hollow_slots, hollow.seconds, args.process_slots, procs.seconds
    );
    println!(
        "node-to-node payload per node: idle {:.0} B/s; during the {}-slot submission {:.0} B/s",
        hollow.bytes_per_node_per_s_idle, args.hollow_slots, hollow.bytes_per_node_per_s_busy
    );
    println!(
        "agent RSS (largest of {}): idle {:.1} MB; holding {} hollow slots {:.1} MB",
        args.nodes,
        hollow.rss_idle_kib as f64 / 1024.0,
        args.hollow_slots,
        hollow.rss_loaded_kib as f64 / 1024.0
    );
    if let Some(out) = &args.out {
        let v = serde_json::json!({
            "nodes": args.nodes,
            "failure_to_replacement_s": {"p50": percentile(&failure, 50.0), "p99": percentile(&failure, 99.0), "samples": failure},
            "hollow_submission": {"slots": args.hollow_slots, "seconds": hollow.seconds},
            "process_submission": {"slots": args.process_slots, "seconds": procs.seconds},
            "payload_bytes_per_node_per_s": {"idle": hollow.bytes_per_node_per_s_idle, "busy": hollow.bytes_per_node_per_s_busy},
            "rss_kib": {"idle": hollow.rss_idle_kib, "holding_hollow_slots": hollow.rss_loaded_kib},
        });
        std::fs::write(out, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
