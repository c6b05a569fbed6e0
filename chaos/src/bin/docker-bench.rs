//! Time from submission to every container running: shoal's `docker`
//! driver on a 3-node cluster (3 agents on 127.0.0.1 sharing this machine's
//! Docker Engine) against `docker service create` on a single-node Docker
//! Swarm, same image, same replica count, in the same run.
//!
//! Usage: cargo build --release && target/release/docker-bench [--replicas 50] [--trials 3]
//! Needs a Docker Engine and `scripts/test-image.sh` (busybox-static).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos::procs::{start_cluster, wait_for};
use chaos::stats::percentile;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "shoal docker driver vs docker service create: submission to all containers running"
)]
struct Args {
    /// Containers per run.
    #[arg(long, default_value_t = 50)]
    replicas: u32,
    /// Runs of each.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const IMAGE: &str = "shoal-test/busybox:1";
const WAIT: Duration = Duration::from_secs(300);

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn running_with_label(label: &str) -> usize {
    docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label={label}"),
        "--filter",
        "status=running",
    ])
    .map(|s| s.lines().count())
    .unwrap_or(0)
}

fn remove_with_label(label: &str) {
    if let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label={label}")]) {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = docker(&args);
        }
    }
}

/// One shoal run: seconds from POST to `replicas` containers running.
fn shoal_once(replicas: u32, trial: usize) -> Result<f64> {
    let tmp = tempfile::tempdir()?;
    let agents = start_cluster(tmp.path(), 3, &[])?;
    wait_for("3 alive", Duration::from_secs(30), || {
        agents.iter().all(|a| {
            a.get("/v1/nodes").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|ns| ns.iter().filter(|n| n["state"] == "alive").count() == 3)
            })
        })
    })?;
    let job = format!("dbench{trial}");
    let text = format!(
        "name = \"{job}\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ndriver = \"docker\"\nimage = \"{IMAGE}\"\ncommand = \"sleep\"\nargs = [\"100000\"]\n[task.resources]\ncpu = 10\nmemory = 8\n"
    );
    let label = format!("shoal.job={job}");
    let started = Instant::now();
    agents[0].post("/v1/jobs", &text)?;
    let result = wait_for("every container running", WAIT, || {
        running_with_label(&label) == replicas as usize
    });
    let took = started.elapsed().as_secs_f64();
    drop(agents);
    remove_with_label(&label);
    result?;
    Ok(took)
}

/// One Swarm run: seconds from `docker service create` to `replicas`
/// tasks' containers running.
fn swarm_once(replicas: u32, trial: usize) -> Result<f64> {
    let name = format!("shoal-bench-{trial}");
    let started = Instant::now();
    docker(&[
        "service",
        "create",
        "--detach",
        "--name",
        &name,
        "--replicas",
        &replicas.to_string(),
        "--limit-cpu",
        "0.01",
        "--limit-memory",
        "8m",
        IMAGE,
        "sleep",
        "100000",
    ])?;
    let label = format!("com.docker.swarm.service.name={name}");
    let result = wait_for("every task running", WAIT, || {
        running_with_label(&label) == replicas as usize
    });
    let took = started.elapsed().as_secs_f64();
    let _ = docker(&["service", "rm", &name]);
    wait_for("the service's containers gone", WAIT, || {
        docker(&["ps", "-aq", "--filter", &format!("label={label}")])
            .map(|s| s.trim().is_empty())
            .unwrap_or(true)
    })?;
    result?;
    Ok(took)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-image.sh");
    let ok = Command::new(&script).arg(IMAGE).status()?.success();
    if !ok {
        bail!("cannot make {IMAGE} (scripts/test-image.sh)");
    }
    let engine = docker(&["version", "--format", "{{.Server.Version}}"])?;
    let mut shoal = Vec::new();
    for t in 0..args.trials {
        let s = shoal_once(args.replicas, t)?;
        println!(
            "shoal trial {t}: {} containers running {s:.2} s after submission",
            args.replicas
        );
        shoal.push(s);
    }
    // A single-node Swarm, made here and left again unless one existed.
    let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
    let made_swarm = state.trim() != "active";
    if made_swarm {
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
    }
    let mut swarm = Vec::new();
    let mut failure = None;
    for t in 0..args.trials {
        match swarm_once(args.replicas, t) {
            Ok(s) => {
                println!(
                    "swarm trial {t}: {} containers running {s:.2} s after `docker service create`",
                    args.replicas
                );
                swarm.push(s);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if made_swarm {
        let _ = docker(&["swarm", "leave", "--force"]);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    shoal.sort_by(f64::total_cmp);
    swarm.sort_by(f64::total_cmp);
    let (s50, w50) = (percentile(&shoal, 50.0), percentile(&swarm, 50.0));
    println!(
        "\n{} replicas, Docker Engine {}: shoal (3 nodes) median {s50:.2} s (min {:.2}, max {:.2}); docker service create (1-node Swarm) median {w50:.2} s (min {:.2}, max {:.2}); Swarm/shoal {:.2}x",
        args.replicas,
        engine.trim(),
        shoal[0],
        shoal[shoal.len() - 1],
        swarm[0],
        swarm[swarm.len() - 1],
        w50 / s50
    );
    if let Some(path) = args.out {
        let json = serde_json::json!({
            "replicas": args.replicas,
            "engine": engine.trim(),
            "shoal_s": shoal,
            "swarm_s": swarm,
            "shoal_median_s": s50,
            "swarm_median_s": w50,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
