//! Cost of `/metrics` and of open event streams on an agent holding
//! `--slots` (10,000) slots of the benchmark-only `hollow` driver: the
//! agent's CPU and RSS over equal windows of three kinds, alternating in
//! the same run: nothing (the baseline), scraped every `--every` (1 s), and
//! `--streams` (10) clients following `/v1/events`. In every window a small
//! job is scaled between 1 and `--churn` copies every 2 s, so there are
//! events to stream (their derivation is in the baseline too).
//!
//! Usage: cargo build --release -p chaos --bin metrics-bench &&
//! cargo build --release --bin shoal && target/release/metrics-bench [--help]

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos::procs::{cpu_s, rss_kib, wait_for, Agent};
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
    /// Event streams open in the stream windows.
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Copies the churn job is scaled to (and back to 1) every 2 s.
    #[arg(long, default_value_t = 50)]
    churn: u32,
}

/// Clients following `/v1/events` over plain sockets (closed with
/// `shutdown`), counting the lines they read.
struct Streams {
    sockets: Vec<std::net::TcpStream>,
    lines: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Streams {
    fn open(agent: &Agent, n: usize) -> Result<Streams> {
        let addr = agent.http.trim_start_matches("http://").to_string();
        let lines = Arc::new(AtomicU64::new(0));
        let (mut sockets, mut threads) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let mut s = std::net::TcpStream::connect(&addr)?;
            write!(
                s,
                "GET /v1/events?since=now HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                agent.http_token
            )?;
            let mut r = std::io::BufReader::new(s.try_clone()?);
            sockets.push(s);
            let lines = lines.clone();
            threads.push(std::thread::spawn(move || {
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line.starts_with('{') {
                        lines.fetch_add(1, Ordering::Relaxed);
                    }
                    line.clear();
                }
            }));
        }
        Ok(Streams {
            sockets,
            lines,
            threads,
        })
    }

    /// Closes them; the events each read.
    fn close(self) -> u64 {
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads {
            let _ = t.join();
        }
        self.lines.load(Ordering::Relaxed)
    }
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
    // What deriving events costs per snapshot: the diff of two states of
    // every instance, one copy changed.
    let instances: Vec<shoal::api::InstanceView> =
        serde_json::from_value(agent.get("/v1/instances").context("instances")?)?;
    let jobs: Vec<shoal::api::JobStatus> =
        serde_json::from_value(agent.get("/v1/jobs").context("jobs")?)?;
    let before = shoal::api::Snapshot {
        instances,
        jobs,
        ..Default::default()
    };
    let mut after = before.clone();
    after.instances[0].restarts += 1;
    let view = shoal_membership::MembershipView {
        self_name: "n0".into(),
        members: Vec::new(),
    };
    let t = Instant::now();
    let runs = 50;
    for _ in 0..runs {
        let changes = shoal::events::diff(&before, &view, &after, &view);
        assert_eq!(changes.len(), 1);
    }
    let diff_ms = t.elapsed().as_secs_f64() * 1e3 / runs as f64;
    let churn = "name = \"churn\"\ntype = \"service\"\nreplicas = 1\n[task]\ndriver = \"hollow\"\ncommand = \"sleep\"\n[task.resources]\ncpu = 1\nmemory = 1\n";
    agent.post("/v1/jobs", churn).context("submitting churn")?;
    std::thread::sleep(Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let (stop, http, token, n) = (
            stop.clone(),
            agent.http.clone(),
            agent.http_token.clone(),
            args.churn,
        );
        std::thread::spawn(move || {
            let mut up = true;
            while !stop.load(Ordering::Relaxed) {
                let _ = ureq::post(&format!("{http}/v1/jobs/churn/scale"))
                    .set("Authorization", &format!("Bearer {token}"))
                    .send_string(&format!("{{\"replicas\":{}}}", if up { n } else { 1 }));
                up = !up;
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    let (mut idle_cpu, mut scraped_cpu, mut streamed_cpu) = (0.0, 0.0, 0.0);
    let (mut idle_rss, mut scraped_rss, mut streamed_rss) = (0u64, 0u64, 0u64);
    let mut streamed = 0;
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
        let streams = Streams::open(&agent, args.streams)?;
        let c0 = cpu_s(agent.pid);
        std::thread::sleep(Duration::from_secs(args.seconds));
        streamed_cpu += cpu_s(agent.pid) - c0;
        streamed_rss = streamed_rss.max(rss_kib(agent.pid));
        streamed += streams.close();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churner.join();
    let window = (args.seconds as f64) * args.rounds as f64;
    took.sort_unstable();
    let p = |q: f64| took[((took.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "an agent holding {} hollow slots, a job scaled 1 <-> {} every 2 s; {} windows of each kind, {} s each, alternating",
        args.slots, args.churn, args.rounds, args.seconds
    );
    println!(
        "deriving events: the diff of two snapshots of {} instances takes {diff_ms:.2} ms",
        before.instances.len()
    );
    println!(
        "baseline (no scrapes, no streams): {:.2}% of a core, RSS {} MiB",
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
    println!(
        "{} event streams open: {:.2}% of a core ({:+.2} points), RSS {} MiB; {:.0} events/s per stream",
        args.streams,
        streamed_cpu / window * 100.0,
        (streamed_cpu - idle_cpu) / window * 100.0,
        streamed_rss / 1024,
        streamed as f64 / window / args.streams.max(1) as f64
    );
    Ok(())
}
