//! Rolling-update benchmark on real agents on 127.0.0.1: a service of
//! `--replicas` (20) busybox httpd copies on `--nodes` (10) agents, checked
//! over HTTP; a new version rolled out with `max_parallel` 1 and 4
//! (start-first) and 4 (stop-first): the time until every slot serves the
//! new version alone, and the fewest slots serving at any 100 ms sample; a
//! version that never passes, with `auto_revert`: how many slots it
//! reaches, and the time until every slot serves the last good version.
//!
//! Usage: cargo build --release -p chaos --bin update-bench &&
//! target/release/update-bench [--help] (needs /bin/busybox)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos::procs::{served_site, start_ranged_cluster, wait_for, Agent};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Rolling updates of shoal on real agents: duration and lowest serving count")]
struct Args {
    /// Agents.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Slots of the service.
    #[arg(long, default_value_t = 20)]
    replicas: u32,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const WAIT: Duration = Duration::from_secs(300);

fn job(
    replicas: u32,
    site: &str,
    release: u32,
    max_parallel: u32,
    order: &str,
    broken: bool,
) -> String {
    format!(
        r#"name = "web"
type = "service"
replicas = {replicas}

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{site}"]
env = {{ RELEASE = "{release}" }}
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8

[[task.check]]
type = "http"
port = "http"
path = "{path}"
interval = "500ms"
grace = "0s"
failures = 2

[update]
max_parallel = {max_parallel}
order = "{order}"
min_healthy_time = "1s"
healthy_deadline = "10s"
auto_revert = {broken}
"#,
        path = if broken { "/missing" } else { "/ok" },
    )
}

/// Slots served (a copy running and passing) and the versions of the live
/// copies, per an agent's `/v1/instances`.
fn serving(agent: &Agent) -> Option<(usize, Vec<String>)> {
    let all = agent.get("/v1/instances")?;
    let mine: Vec<&serde_json::Value> = all
        .as_array()?
        .iter()
        .filter(|i| i["job"] == "web")
        .collect();
    let slots: BTreeSet<u64> = mine
        .iter()
        .filter(|i| i["state"] == "running" && i["health"] == "passing")
        .filter_map(|i| i["slot"].as_u64())
        .collect();
    let versions = mine
        .iter()
        .filter(|i| i["state"] == "running" || i["state"] == "starting")
        .map(|i| i["version"].as_str().unwrap_or("-").to_string())
        .collect();
    Some((slots.len(), versions))
}

/// Rolls out `release` and returns (seconds until every slot serves it
/// alone, fewest slots served meanwhile).
fn roll(
    agents: &[Agent],
    args: &Args,
    site: &str,
    release: u32,
    mp: u32,
    order: &str,
) -> Result<(f64, usize)> {
    let accepted = agents[0].post(
        "/v1/jobs",
        &job(args.replicas, site, release, mp, order, false),
    )?;
    let want = accepted["version"]
        .as_str()
        .context("a version")?
        .to_string();
    let started = Instant::now();
    let mut lowest = usize::MAX;
    loop {
        if let Some((n, versions)) = serving(&agents[1]) {
            lowest = lowest.min(n);
            if n == args.replicas as usize
                && versions.len() == args.replicas as usize
                && versions.iter().all(|v| *v == want)
            {
                return Ok((started.elapsed().as_secs_f64(), lowest));
            }
        }
        if started.elapsed() > WAIT {
            bail!("the update to {want} did not finish in {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !std::path::Path::new("/bin/busybox").exists() {
        bail!("needs /bin/busybox (apt-get install busybox-static)");
    }
    let root = tempfile::tempdir()?;
    let site = served_site(root.path())?;
    // The agents share 127.0.0.1: each its own port range.
    let agents = start_ranged_cluster(root.path(), args.nodes, 24_000, 100)?;
    agents[0].post(
        "/v1/jobs",
        &job(args.replicas, &site, 1, 1, "start-first", false),
    )?;
    let r = args.replicas as usize;
    wait_for("every slot to serve", WAIT, || {
        serving(&agents[1]).is_some_and(|(s, v)| s == r && v.len() == r)
    })?;
    let mut figures = serde_json::Map::new();
    let mut release = 1;
    for (mp, order) in [(1, "start-first"), (4, "start-first"), (4, "stop-first")] {
        release += 1;
        let (secs, lowest) = roll(&agents, &args, &site, release, mp, order)?;
        println!(
            "{order} max_parallel {mp}: {secs:.1} s for {r} slots, lowest serving {lowest} of {r}"
        );
        figures.insert(
            format!("{order}_mp{mp}"),
            serde_json::json!({"seconds": secs, "lowest_serving": lowest, "replicas": r}),
        );
    }
    // A version that never passes, with auto_revert: how far it gets and
    // how long until every slot serves the last good version alone again.
    let accepted = agents[0].post(
        "/v1/jobs",
        &job(args.replicas, &site, release + 1, 4, "start-first", true),
    )?;
    let broken = accepted["version"]
        .as_str()
        .context("a version")?
        .to_string();
    let started = Instant::now();
    let mut reached = 0usize;
    let mut lowest = usize::MAX;
    let reverted_after = loop {
        if let Some((n, versions)) = serving(&agents[1]) {
            lowest = lowest.min(n);
            reached = reached.max(versions.iter().filter(|v| **v == broken).count());
            let now_at = agents[1]
                .get("/v1/jobs/web")
                .and_then(|j| j["version"].as_str().map(str::to_string));
            if let Some(at) = now_at.filter(|v| *v != broken) {
                if n == r && versions.len() == r && versions.iter().all(|v| *v == at) {
                    break started.elapsed().as_secs_f64();
                }
            }
        }
        if started.elapsed() > WAIT {
            bail!("the broken version {broken} was not reverted in {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "broken version (healthy_deadline 10 s, auto_revert), max_parallel 4: reached {reached} of {r} slots, reverted and settled in {reverted_after:.1} s, lowest serving {lowest}"
    );
    figures.insert(
        "broken_mp4_auto_revert".into(),
        serde_json::json!({"slots_reached": reached, "lowest_serving": lowest, "reverted_s": reverted_after, "healthy_deadline_s": 10}),
    );
    let json = serde_json::Value::Object(figures);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    }
    // Dropping an agent kills it and its instances.
    drop(agents);
    Ok(())
}
