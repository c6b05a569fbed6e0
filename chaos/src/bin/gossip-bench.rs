//! What membership and state gossip cost an idle cluster, by size (#16):
//! N real agents on 127.0.0.1, and per node the UDP bytes on the wire
//! (QUIC and TLS included, counted by an nftables counter on the agents'
//! ports), the frame payload bytes the transport counts, and the CPU each
//! agent uses, over `--measure` seconds after the cluster converged and
//! settled; then how long one change (a job written at n0) takes to reach
//! every node's event stream; then the same figures while busy (a job of
//! one instance written every `1 / --busy-jobs-per-s` seconds at a random
//! agent, each placed, started and gossiped).
//!
//! Usage: cargo build --release --bin shoal && cargo build --release -p chaos
//! --bin gossip-bench && target/release/gossip-bench [--sizes 10,20,40]
//! (run as root: the nftables counter; without it the wire column says n/a)

use std::io::{BufRead, Write};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos::procs::{cpu_s, start_cluster, wait_all_alive, Agent};
use chaos::stats::percentile;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Idle gossip cost per node, and propagation of one change, by cluster size")]
struct Args {
    /// Cluster sizes to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "10,20,40")]
    sizes: Vec<usize>,
    /// Seconds to wait after every node sees every other alive.
    #[arg(long, default_value_t = 10)]
    settle: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    measure: u64,
    /// Busy phase, after the idle one: jobs written per second (each one
    /// instance, at a random agent) while measuring again; 0 skips it.
    #[arg(long, default_value_t = 2)]
    busy_jobs_per_s: u64,
}

/// Wire KB/s, payload KB/s and its split by service, and CPU % per agent,
/// over `secs` seconds while `during` runs (it returns when they are over).
fn measure(
    agents: &[Agent],
    ports: &[u16],
    secs: u64,
    during: impl FnOnce(Instant),
) -> (Option<f64>, f64, String, f64) {
    let n = agents.len();
    let wire = WireCounter::new(ports);
    let w0 = wire.as_ref().map(WireCounter::bytes);
    let p0: u64 = agents.iter().map(payload_sent).sum();
    let s0 = agents.iter().map(sent_by_service).fold([0; 3], sum3);
    let c0: Vec<f64> = agents.iter().map(|a| cpu_s(a.pid)).collect();
    let t0 = Instant::now();
    during(t0 + Duration::from_secs(secs));
    if let Some(left) = (t0 + Duration::from_secs(secs)).checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    let secs = t0.elapsed().as_secs_f64();
    let wire_kbs = wire
        .as_ref()
        .zip(w0)
        .map(|(w, w0)| (w.bytes() - w0) as f64 / 1024.0 / secs / n as f64);
    let payload_kbs =
        (agents.iter().map(payload_sent).sum::<u64>() - p0) as f64 / 1024.0 / secs / n as f64;
    let s1 = agents.iter().map(sent_by_service).fold([0; 3], sum3);
    let split: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "{:.1}",
                s1[i].saturating_sub(s0[i]) as f64 / 1024.0 / secs / n as f64
            )
        })
        .collect();
    let cpu: f64 = agents
        .iter()
        .zip(&c0)
        .map(|(a, c)| cpu_s(a.pid) - c)
        .sum::<f64>()
        / secs
        / n as f64
        * 100.0;
    (wire_kbs, payload_kbs, split.join(" / "), cpu)
}

const TABLE: &str = "shoal_gossip_bench";

/// An nftables counter of the UDP bytes the agents' QUIC ports send.
struct WireCounter;

impl WireCounter {
    fn new(ports: &[u16]) -> Option<WireCounter> {
        let set: Vec<String> = ports.iter().map(u16::to_string).collect();
        let rules = format!(
            "table inet {TABLE} {{\n  counter sent {{ }}\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    udp sport {{ {} }} counter name sent\n  }}\n}}\n",
            set.join(", ")
        );
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .output();
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(rules.as_bytes()).ok()?;
        child.wait().ok()?.success().then_some(WireCounter)
    }

    fn bytes(&self) -> u64 {
        let out = Command::new("nft")
            .args(["list", "counter", "inet", TABLE, "sent"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for WireCounter {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .output();
    }
}

fn payload_sent(agent: &Agent) -> u64 {
    agent
        .get("/v1/stats")
        .and_then(|v| v["transport"]["bytes_sent"].as_u64())
        .unwrap_or(0)
}

/// Frame payload bytes `agent` sent, by service (gossip, probe, rpc), from
/// its `/metrics`.
fn sent_by_service(agent: &Agent) -> [u64; 3] {
    let text = ureq::get(&format!("{}/metrics", agent.http))
        .set("Authorization", &format!("Bearer {}", agent.http_token))
        .timeout(Duration::from_secs(10))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    let of = |service: &str| {
        let head = format!(
            "shoal_transport_service_bytes_total{{service=\"{service}\",direction=\"sent\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(head.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    [of("gossip"), of("probe"), of("rpc")]
}

fn sum3(a: [u64; 3], b: [u64; 3]) -> [u64; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

/// Opens `agent`'s event stream from now, filtered to `job`; the arrival
/// time of its first event comes on the channel.
fn watch(agent: &Agent, job: &str, tx: mpsc::Sender<Instant>) -> Result<()> {
    let resp = ureq::get(&format!(
        "{}/v1/events?since=now&topic=job:{job}",
        agent.http
    ))
    .set("Authorization", &format!("Bearer {}", agent.http_token))
    .call()?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { return };
            if line.contains("\"job.submitted\"") {
                let _ = tx.send(Instant::now());
                return;
            }
        }
    });
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!("| nodes | wire KB/s per node | frame payload KB/s per node | of which gossip / probe / rpc | CPU per agent | a change reaches every node p50 / p99 / max |");
    println!("|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let root = tempfile::tempdir()?;
        let agents = start_cluster(root.path(), n, &["--dns", "off", "--ingress", "false"])
            .with_context(|| format!("starting {n} agents"))?;
        wait_all_alive(&agents, Duration::from_secs(600))?;
        std::thread::sleep(Duration::from_secs(args.settle));
        let ports: Vec<u16> = agents
            .iter()
            .filter_map(|a| a.quic.rsplit(':').next()?.parse().ok())
            .collect();
        let (wire_kbs, payload_kbs, split, cpu) = measure(&agents, &ports, args.measure, |_| {});
        // One change: a job written at n0, seen in every node's stream.
        let (tx, rx) = mpsc::channel();
        for a in &agents {
            watch(a, "probe", tx.clone())?;
        }
        let job = "name = \"probe\"\ntype = \"service\"\nreplicas = 1\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\n[task.resources]\ncpu = 1\nmemory = 1\n";
        let written = Instant::now();
        agents[0].post("/v1/jobs", job)?;
        let mut took: Vec<f64> = Vec::new();
        while took.len() < n {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(at) => took.push(at.saturating_duration_since(written).as_secs_f64() * 1e3),
                Err(_) => break,
            }
        }
        took.sort_by(f64::total_cmp);
        let spread = if took.len() == n {
            format!(
                "{:.0} / {:.0} / {:.0} ms",
                percentile(&took, 50.0),
                percentile(&took, 99.0),
                took.last().copied().unwrap_or(0.0)
            )
        } else {
            format!("{} of {n} nodes within 30 s", took.len())
        };
        println!(
            "| {n} | {} | {payload_kbs:.1} | {split} | {cpu:.1}% | {spread} |",
            wire_kbs.map_or("n/a".to_string(), |w| format!("{w:.1}")),
        );
        if args.busy_jobs_per_s > 0 {
            // Busy: jobs written at random agents, each placed and started
            // somewhere, every instance change gossiped.
            let rate = args.busy_jobs_per_s;
            let mut written = 0u64;
            let mut failed = 0u64;
            let (wire_kbs, payload_kbs, split, cpu) = measure(
                &agents,
                &ports,
                args.measure,
                |until| {
                    let mut next = Instant::now();
                    while next < until {
                        let at = &agents[written as usize * 7919 % n];
                        let job = format!("name = \"busy{written}\"\ntype = \"service\"\nreplicas = 1\n[task]\ncommand = \"sleep\"\nargs = [\"600\"]\n[task.resources]\ncpu = 1\nmemory = 1\n");
                        if at.post("/v1/jobs", &job).is_err() {
                            failed += 1;
                        }
                        written += 1;
                        next += Duration::from_millis(1000 / rate.max(1));
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                },
            );
            println!(
                "| {n}, busy ({written} jobs in {} s{}) | {} | {payload_kbs:.1} | {split} | {cpu:.1}% | |",
                args.measure,
                if failed > 0 { format!(", {failed} refused") } else { String::new() },
                wire_kbs.map_or("n/a".to_string(), |w| format!("{w:.1}")),
            );
        }
        drop(agents);
    }
    Ok(())
}
