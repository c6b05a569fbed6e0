//! Cost of `/metrics` on an agent holding `--slots` (10,000) slots of the
//! benchmark-only `hollow` driver: the agent's CPU and RSS over equal
//! windows without scrapes (the baseline) and scraped every `--every`
//! (1 s), alternating, in the same run; and how long a scrape takes.
//!
//! Usage: cargo build --release -p chaos --bin metrics-bench &&
//! cargo build --release --bin shoal && target/release/metrics-bench [--help]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos::procs::{rss_kib, wait_for, Agent};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Cost of shoal's /metrics on an agent holding many slots")]
struct Args {
    /// Slots the agent holds.
    #[arg(long, default_value_t = 10_000)]
    slots: u32,
    /// Seconds per window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Windows of each kind (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Time between scrapes, ms.
    #[arg(long, default_value_t = 1000)]
    every_ms: u64,
}

/// CPU seconds (user + system) the process has used.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 0, utime 11, stime 12 (clock ticks).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (tick(11) + tick(12)) / hz.max(1.0)
}

fn scrape(agent: &Agent) -> Result<(Duration, usize)> {
    let t = Instant::now();
    let text = ureq::get(&format!("{}/metrics", agent.http))
        .set("Authorization", &format!("Bearer {}", agent.http_token))
        .timeout(Duration::from_secs(30))
        .call()?
        .into_string()?;
    Ok((t.elapsed(), text.len()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let agent = Agent::start(
        root.path(),
        "n0",
        None,
        &["--hollow", "--cpu", "1000000", "--memory", "1000000"],
    )?;
    let job = format!(
        "name = \"bulk\"\ntype = \"service\"\nreplicas = {}\n[task]\ndriver = \"hollow\"\ncommand = \"sleep\"\n[task.resources]\ncpu = 1\nmemory = 1\n",
        args.slots
    );
    agent.post("/v1/jobs", &job).context("submitting")?;
    wait_for("every slot running", Duration::from_secs(600), || {
        agent.get("/v1/jobs/bulk").is_some_and(|j| {
            j["instances"].as_array().is_some_and(|a| {
                a.iter().filter(|i| i["state"] == "running").count() == args.slots as usize
            })
        })
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let (mut idle_cpu, mut scraped_cpu) = (0.0, 0.0);
    let (mut idle_rss, mut scraped_rss) = (0u64, 0u64);
    let mut took = Vec::new();
    let mut size = 0;
    for _ in 0..args.rounds {
        let c0 = cpu_s(agent.pid);
        std::thread::sleep(Duration::from_secs(args.seconds));
        idle_cpu += cpu_s(agent.pid) - c0;
        idle_rss = idle_rss.max(rss_kib(agent.pid));
        let c0 = cpu_s(agent.pid);
        let until = Instant::now() + Duration::from_secs(args.seconds);
        while Instant::now() < until {
            let (t, n) = scrape(&agent)?;
            took.push(t);
            size = n;
            std::thread::sleep(Duration::from_millis(args.every_ms).saturating_sub(t));
        }
        scraped_cpu += cpu_s(agent.pid) - c0;
        scraped_rss = scraped_rss.max(rss_kib(agent.pid));
    }
    let window = (args.seconds as f64) * args.rounds as f64;
    took.sort_unstable();
    let p = |q: f64| took[((took.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "an agent holding {} hollow slots; {} windows of {} s each, alternating",
        args.slots, args.rounds, args.seconds
    );
    println!(
        "no scrapes (baseline): {:.2}% of a core, RSS {} MiB",
        idle_cpu / window * 100.0,
        idle_rss / 1024
    );
    println!(
        "/metrics every {} ms: {:.2}% of a core ({:+.2} points), RSS {} MiB; a scrape: p50 {:.2} ms, p99 {:.2} ms, {} bytes",
        args.every_ms,
        scraped_cpu / window * 100.0,
        (scraped_cpu - idle_cpu) / window * 100.0,
        scraped_rss / 1024,
        p(0.5),
        p(0.99),
        size
    );
    Ok(())
}
