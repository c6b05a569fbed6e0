//! Routing-mesh benchmark on real agents on loopback: a busybox httpd
//! service of 2 copies on 3 agents (n0 holds none), each agent's ingress
//! on its own address (127.0.0.N).
//!
//! 1. Throughput and latency, the same client in the same run, in
//!    alternating rounds: straight to an instance (the baseline), through
//!    n0's ingress (no local instance: every connection is forwarded to
//!    another node's), and through n1's ingress (its own instance). Each
//!    request is a fresh connection (HTTP/1.0), so every one is routed.
//!    Printed: requests per second, p50 and p99 latency, and the mesh's
//!    ratio to the baseline and added latency.
//! 2. A node holding an instance killed (agent and processes, as a
//!    machine dies) while a client loops through n0's ingress: failed
//!    requests and their time window, and when n0 declared the node dead.
//!
//! Usage: cargo build --release -p chaos --bin mesh-bench && cargo build --release --bin shoal &&
//! target/release/mesh-bench [--help] (needs /bin/busybox)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos::procs::{served_site, wait_for, Agent};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "shoal's routing mesh against direct connections: throughput, latency, failures when a node dies"
)]
struct Args {
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds of each kind (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const WAIT: Duration = Duration::from_secs(120);

/// One HTTP/1.0 GET on a fresh connection; its latency if it answered 200.
fn request(to: SocketAddr) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /ok HTTP/1.0\r\n\r\n").ok()?;
    let mut body = Vec::with_capacity(256);
    s.read_to_end(&mut body).ok()?;
    (body.starts_with(b"HTTP/1.") && body.get(8..13) == Some(b" 200 ")).then(|| t.elapsed())
}

/// Requests by `clients` threads for `secs` to `to`: (ok latencies,
/// failures).
fn load(to: SocketAddr, clients: usize, secs: u64) -> (Vec<Duration>, usize) {
    let until = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (Vec::new(), 0);
                while Instant::now() < until {
                    match request(to) {
                        Some(l) => ok.push(l),
                        None => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (Vec::new(), 0);
    for t in threads {
        let (o, f) = t.join().unwrap_or_default();
        ok.extend(o);
        failed += f;
    }
    (ok, failed)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[derive(Default, Clone, serde::Serialize)]
struct Figures {
    requests: usize,
    failed: usize,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn job(site: &str, port: u16) -> String {
    format!(
        r#"name = "web"
type = "service"
replicas = 2
distinct_hosts = true

[[constraints]]
label = "role"
op = "="
value = "web"

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{site}"]
ports = {{ http = 0 }}

[task.resources]
cpu = 1000
memory = 16

[[task.check]]
type = "http"
port = "http"
path = "/ok"
interval = "500ms"
grace = "0s"
failures = 1

[[service]]
name = "web"
port = "http"
ingress_port = {port}
"#
    )
}

/// (node, address) of each passing instance `agent` lists.
fn instances(agent: &Agent) -> Vec<(String, SocketAddr)> {
    let Some(v) = agent.get("/v1/services/web") else {
        return Vec::new();
    };
    v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let addr = format!("{}:{}", i["address"].as_str()?, i["port"].as_u64()?);
            Some((i["node"].as_str()?.to_string(), addr.parse().ok()?))
        })
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !std::path::Path::new("/bin/busybox").exists() {
        bail!("needs /bin/busybox (apt-get install busybox-static)");
    }
    let root = tempfile::tempdir()?;
    let site = served_site(root.path())?;
    let ips = ["127.0.0.51", "127.0.0.52", "127.0.0.53"];
    let port = {
        let l = std::net::TcpListener::bind(format!("{}:0", ips[0]))?;
        l.local_addr()?.port()
    };
    let mut agents = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let range = format!("{}-{}", 26_000 + i * 50, 26_000 + i * 50 + 49);
        let role = if i == 0 { "role=edge" } else { "role=web" };
        let extra = [
            "--ingress-addr",
            ip,
            "--label",
            role,
            "--port-range",
            &range,
        ];
        let seed = agents.first().map(|a: &Agent| a.quic.clone());
        agents.push(Agent::start(
            root.path(),
            &format!("n{i}"),
            seed.as_deref(),
            &extra,
        )?);
    }
    wait_for("the agents to see each other", WAIT, || {
        agents.iter().all(|a| {
            a.get("/v1/nodes").and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().filter(|m| m["state"] == "alive").count())
            }) == Some(3)
        })
    })?;
    agents[0]
        .post("/v1/jobs", &job(&site, port))
        .context("submitting the service")?;
    wait_for("2 passing instances everywhere", WAIT, || {
        agents.iter().all(|a| instances(a).len() == 2)
    })?;
    let through = |i: usize| -> SocketAddr { format!("{}:{port}", ips[i]).parse().unwrap() };
    for i in 0..3 {
        wait_for("the ingress answers", WAIT, || {
            request(through(i)).is_some()
        })?;
    }
    let n1_instance = instances(&agents[0])
        .into_iter()
        .find(|(n, _)| n == "n1")
        .map(|(_, a)| a)
        .context("n1 holds an instance")?;

    // 1. Throughput and latency, alternating rounds.
    let kinds: [(&str, SocketAddr); 3] = [
        ("direct to an instance", n1_instance),
        ("mesh, forwarded to another node", through(0)),
        ("mesh, the node's own instance", through(1)),
    ];
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let mut failed = [0usize; 3];
    let mut secs = [0f64; 3];
    for _ in 0..args.rounds {
        for (k, (_, to)) in kinds.iter().enumerate() {
            let t = Instant::now();
            let (ok, f) = load(*to, args.clients, args.seconds);
            secs[k] += t.elapsed().as_secs_f64();
            lat[k].extend(ok);
            failed[k] += f;
        }
    }
    let mut figures = Vec::new();
    println!(
        "{} client threads, a fresh connection per request, {} rounds of {} s each, alternating",
        args.clients, args.rounds, args.seconds
    );
    println!(
        "{:<34} {:>9} {:>8} {:>9} {:>9} {:>7}",
        "path", "requests", "req/s", "p50 ms", "p99 ms", "failed"
    );
    for k in 0..3 {
        lat[k].sort_unstable();
        let f = Figures {
            requests: lat[k].len(),
            failed: failed[k],
            seconds: secs[k],
            rps: lat[k].len() as f64 / secs[k],
            p50_ms: pct(&lat[k], 0.5),
            p99_ms: pct(&lat[k], 0.99),
        };
        println!(
            "{:<34} {:>9} {:>8.0} {:>9.3} {:>9.3} {:>7}",
            kinds[k].0, f.requests, f.rps, f.p50_ms, f.p99_ms, f.failed
        );
        figures.push(f);
    }
    for k in 1..3 {
        println!(
            "{}: {:.2}x the direct throughput, p50 +{:.3} ms, p99 +{:.3} ms",
            kinds[k].0,
            figures[k].rps / figures[0].rps,
            figures[k].p50_ms - figures[0].p50_ms,
            figures[k].p99_ms - figures[0].p99_ms
        );
    }

    // 2. A node holding an instance dies while a client loops through n0.
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, log, to) = (stop.clone(), log.clone(), through(0));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let ok = request(to).is_some();
                    log.lock().unwrap_or_else(|p| p.into_inner()).push((at, ok));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    agents[2].crash();
    wait_for("n0 to declare n2 dead", WAIT, || {
        agents[0].get("/v1/nodes").is_some_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|m| m["name"] == "n2" && m["state"] == "dead")
        })
    })?;
    let dead = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let fails: Vec<f64> = log
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(at, _)| at.saturating_duration_since(killed).as_secs_f64())
        .collect();
    let window = match (fails.first(), fails.last()) {
        (Some(a), Some(b)) => format!("{a:.3} s to {b:.3} s after the kill"),
        _ => "none".into(),
    };
    println!(
        "node killed: {} requests through n0's ingress, {} failed (window: {window}); n0 declared it dead {:.3} s after the kill",
        log.len(),
        fails.len(),
        dead.as_secs_f64()
    );
    if let Some(out) = args.out {
        let json = serde_json::json!({
            "clients": args.clients,
            "paths": kinds.iter().map(|k| k.0).collect::<Vec<_>>(),
            "figures": figures,
            "kill": {
                "requests": log.len(),
                "failed": fails.len(),
                "failed_at_s": fails,
                "declared_dead_s": dead.as_secs_f64(),
            },
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
