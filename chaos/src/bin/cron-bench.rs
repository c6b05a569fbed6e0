//! Cron benchmark on real agents on 127.0.0.1: a cron job every 10 s on
//! `--nodes` (10) agents; each run's task records when it started. Every
//! other scheduled time, the node ranked first to fire it is killed
//! (SIGKILL, with its instances) at that very time, and restarted once the
//! run has started. Prints scheduled time to run started, p50 and p99, with
//! and without the kill (the runs without are the baseline of the same
//! run), and how many times ran more than once (must be 0).
//!
//! Usage: cargo build --release -p chaos --bin cron-bench &&
//! target/release/cron-bench [--help]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use chaos::procs::{wait_for, Agent};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Cron on real agents: scheduled time to run started, with the firing node killed"
)]
struct Args {
    /// Agents.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Scheduled times measured (half of them with the kill).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const WAIT: Duration = Duration::from_secs(120);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Each run's start times (ms since the epoch), by run name.
fn starts(log: &Path) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let mut w = line.split_whitespace();
        if let (Some(run), Some(ns)) = (w.next(), w.next().and_then(|n| n.parse::<i64>().ok())) {
            out.entry(run.to_string()).or_default().push(ns / 1_000_000);
        }
    }
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let shared = root.path().join("shared");
    std::fs::create_dir_all(&shared)?;
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let log = shared.join("starts.log");
    let mut agents = chaos::procs::start_cluster(root.path(), args.nodes, &[])?;
    let n = args.nodes;
    let alive = |agents: &[Agent], i: usize| {
        agents[i].get("/v1/nodes").and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter(|m| m["state"] == "alive").count())
        })
    };
    wait_for("the agents to see each other", WAIT, || {
        (0..n).all(|i| alive(&agents, i) == Some(n))
    })?;
    let job = format!(
        r#"name = "tick"
type = "cron"

[cron]
schedule = "*/10 * * * * *"

[task]
command = "sh"
args = ["-c", "echo $SHOAL_JOB $(date +%s%N) >> {}"]

[task.resources]
cpu = 10
memory = 8
"#,
        log.display()
    );
    agents[0].post("/v1/jobs", &job)?;
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let (mut killed_lat, mut base_lat) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // The next time at least 3 s away.
        let mut t = (now_ms() / 10_000 + 1) * 10;
        if t * 1000 - now_ms() < 3_000 {
            t += 10;
        }
        let kill = round % 2 == 1;
        let victim = names.iter().position(|name| {
            shoal_core::cron::fire_rank("tick", t, name, names.iter().map(String::as_str))
                == Some(0)
        });
        while now_ms() < t * 1000 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let killed = match victim.filter(|_| kill) {
            Some(v) => {
                agents[v].crash();
                Some(v)
            }
            None => None,
        };
        let run = format!("tick@{t}");
        wait_for(&format!("{run} to start"), WAIT, || {
            starts(&log).contains_key(&run)
        })?;
        let started = starts(&log)[&run][0];
        let lat = (started - t * 1000) as f64 / 1000.0;
        println!(
            "{run}: started {lat:.3} s after its time{}",
            killed.map_or(String::new(), |v| format!(
                " ({} killed at the time)",
                names[v]
            ))
        );
        if let Some(v) = killed {
            killed_lat.push(lat);
            // Back with its data dir, rejoining through another node.
            let seed = agents[(v + 1) % n].quic.clone();
            let name = names[v].clone();
            agents[v] = Agent::start(root.path(), &name, Some(&seed), &[])?;
            wait_for("the restarted node to be seen alive", WAIT, || {
                (0..n).all(|i| alive(&agents, i) == Some(n))
            })?;
        } else {
            base_lat.push(lat);
        }
    }
    // Let the last run's stragglers show (a run written twice would start
    // twice).
    std::thread::sleep(Duration::from_secs(2));
    let twice = starts(&log).values().filter(|v| v.len() > 1).count();
    let (kp50, kp99) = (
        percentile(&mut killed_lat, 0.5),
        percentile(&mut killed_lat, 0.99),
    );
    let (bp50, bp99) = (
        percentile(&mut base_lat, 0.5),
        percentile(&mut base_lat, 0.99),
    );
    println!(
        "\n{} nodes, schedule every 10 s: scheduled time to run started\n  firing node killed at the time ({} runs): p50 {kp50:.3} s, p99 {kp99:.3} s\n  no kill, baseline ({} runs): p50 {bp50:.3} s, p99 {bp99:.3} s (kill/baseline p50 {:.1}x)\n  times that ran more than once: {twice}",
        n,
        killed_lat.len(),
        base_lat.len(),
        kp50 / bp50
    );
    if let Some(out) = args.out {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&serde_json::json!({
                "nodes": n,
                "killed": {"runs": killed_lat.len(), "p50_s": kp50, "p99_s": kp99},
                "baseline": {"runs": base_lat.len(), "p50_s": bp50, "p99_s": bp99},
                "ran_twice": twice,
            }))?,
        )?;
    }
    if twice > 0 {
        bail!("{twice} time(s) ran more than once");
    }
    Ok(())
}
