//! Node drain benchmark on real agents on 127.0.0.1: a service of
//! `--replicas` (50) busybox httpd copies, checked over HTTP, all on one
//! node (the others made ineligible while it is placed, then eligible
//! again); that node drained start-first with `max_parallel` 5 and 10, and
//! as a baseline in the same run, with `--force` (everything stops at
//! once and is placed elsewhere, as after a crash): the time until the
//! node holds none of the service's copies and every slot serves
//! elsewhere, and the fewest slots serving at any 100 ms sample.
//!
//! Usage: cargo build --release -p chaos --bin drain-bench &&
//! target/release/drain-bench [--help] (needs /bin/busybox)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chaos::procs::{served_site, start_ranged_cluster, wait_for, Agent};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Node drains of shoal on real agents: time to empty a node and lowest serving count"
)]
struct Args {
    /// Agents.
    #[arg(long, default_value_t = 6)]
    nodes: usize,
    /// Slots of the service, all on the drained node.
    #[arg(long, default_value_t = 50)]
    replicas: u32,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const WAIT: Duration = Duration::from_secs(300);

/// The drained node.
const DRAINED: &str = "n1";

fn job(name: &str, replicas: u32, site: &str, max_parallel: u32) -> String {
    format!(
        r#"name = "{name}"
type = "service"
replicas = {replicas}

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{site}"]
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8

[[task.check]]
type = "http"
port = "http"
path = "/ok"
interval = "500ms"
grace = "0s"
failures = 2

[update]
max_parallel = {max_parallel}
min_healthy_time = "1s"
"#
    )
}

/// Slots of `job` served (a copy running and passing), and its live copies
/// on the drained node, per an agent's `/v1/instances`.
fn serving(agent: &Agent, job: &str) -> Option<(usize, usize)> {
    let all = agent.get("/v1/instances")?;
    let mine: Vec<&serde_json::Value> =
        all.as_array()?.iter().filter(|i| i["job"] == job).collect();
    let slots: BTreeSet<u64> = mine
        .iter()
        .filter(|i| i["state"] == "running" && i["health"] == "passing")
        .filter_map(|i| i["slot"].as_u64())
        .collect();
    let on_drained = mine
        .iter()
        .filter(|i| i["node"] == DRAINED && (i["state"] == "running" || i["state"] == "starting"))
        .count();
    Some((slots.len(), on_drained))
}

fn eligibility(agent: &Agent, node: &str, eligible: bool) -> Result<()> {
    agent.post(
        &format!("/v1/nodes/{node}/eligibility"),
        &serde_json::json!({ "eligible": eligible }).to_string(),
    )?;
    Ok(())
}

/// Places `name` on the drained node alone: the others ineligible while
/// its slots are placed, then eligible again.
fn place_on_drained(
    agents: &[Agent],
    name: &str,
    replicas: u32,
    site: &str,
    mp: u32,
) -> Result<()> {
    for a in agents.iter().filter(|a| a.name != DRAINED) {
        eligibility(&agents[0], &a.name, false)?;
    }
    eligibility(&agents[0], DRAINED, true)?;
    let r = replicas as usize;
    // Every node knows the settings before the job is written.
    wait_for("the settings to reach every node", WAIT, || {
        agents.iter().all(|a| {
            a.get("/v1/nodes").is_some_and(|v| {
                v.as_array().is_some_and(|ns| {
                    ns.iter()
                        .all(|n| n["eligible"] == (n["name"] == DRAINED) && n["drain"].is_null())
                })
            })
        })
    })?;
    agents[0].post("/v1/jobs", &job(name, replicas, site, mp))?;
    wait_for("every slot to serve on the drained node", WAIT, || {
        serving(&agents[2], name).is_some_and(|(s, on)| s == r && on == r)
    })?;
    for a in agents.iter().filter(|a| a.name != DRAINED) {
        eligibility(&agents[0], &a.name, true)?;
    }
    Ok(())
}

/// Drains the node (`force`: at once) and returns (seconds until it holds
/// none of `name`'s copies and every slot serves elsewhere, fewest slots
/// serving meanwhile).
fn drain(agents: &[Agent], name: &str, replicas: u32, force: bool) -> Result<(f64, usize)> {
    agents[0].post(
        &format!("/v1/nodes/{DRAINED}/drain"),
        &serde_json::json!({ "deadline": "10m", "force": force }).to_string(),
    )?;
    let started = Instant::now();
    let mut lowest = usize::MAX;
    loop {
        if let Some((n, on)) = serving(&agents[2], name) {
            lowest = lowest.min(n);
            if n == replicas as usize && on == 0 {
                return Ok((started.elapsed().as_secs_f64(), lowest));
            }
        }
        if started.elapsed() > WAIT {
            bail!("the drain did not finish in {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !std::path::Path::new("/bin/busybox").exists() {
        bail!("needs /bin/busybox (apt-get install busybox-static)");
    }
    if args.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    let root = tempfile::tempdir()?;
    let site = served_site(root.path())?;
    // The agents share 127.0.0.1: each its own port range, wide enough for every slot on one node.
    let agents = start_ranged_cluster(root.path(), args.nodes, 25_000, 200)?;
    let r = args.replicas;
    let mut figures = serde_json::Map::new();
    for (name, mp, force) in [
        ("web-a", 5, false),
        ("web-b", 10, false),
        ("web-c", 5, true),
    ] {
        place_on_drained(&agents, name, r, &site, mp)?;
        let (secs, lowest) = drain(&agents, name, r, force)?;
        let what = if force {
            "--force (baseline)".to_string()
        } else {
            format!("start-first, max_parallel {mp}")
        };
        println!("drain of a node holding {r} slots, {what}: empty in {secs:.1} s, lowest serving {lowest} of {r}");
        figures.insert(
            if force {
                "force".into()
            } else {
                format!("max_parallel_{mp}")
            },
            serde_json::json!({"seconds": secs, "lowest_serving": lowest, "replicas": r}),
        );
        // Stop it (its copies elsewhere would hold the ports and room the
        // next round's placement on the drained node needs).
        ureq::delete(&format!("{}/v1/jobs/{name}", agents[0].http))
            .set("Authorization", &format!("Bearer {}", agents[0].http_token))
            .call()?;
        wait_for("the job's copies to stop", WAIT, || {
            agents[2].get("/v1/instances").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| !a.iter().any(|i| i["job"] == name))
            })
        })?;
    }
    let json = serde_json::Value::Object(figures);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    }
    // Dropping an agent kills it and its instances.
    drop(agents);
    Ok(())
}
