//! The cluster under test: one agent per network namespace, faults on them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chaos::delay::Relay;
use chaos::netns::Hosts;
use chaos::procs::{shoal_bin, wait_for, Proc};
use rand::{Rng, SeedableRng};

const QUIC_PORT: u16 = 7100;
const HTTP_PORT: u16 = 7200;
/// The API listens on the namespace's address, so it needs a token.
const HTTP_TOKEN: &str = "chaos-http-token-0001";
const SUBNET: [u8; 3] = [10, 214, 0];
/// Size of each node's data dir (a tmpfs): room for its store and its
/// instances' logs, small enough to fill at once.
const DATA_DIR_MB: u64 = 64;
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Name of the file that fills a node's disk.
const FILLER: &str = "chaos-filler";

fn mount_tmpfs(dir: &Path) -> Result<()> {
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o"])
        .arg(format!("size={DATA_DIR_MB}m,mode=0700"))
        .arg("tmpfs")
        .arg(dir)
        .output()
        .context("cannot run mount")?;
    anyhow::ensure!(
        out.status.success(),
        "mount tmpfs on {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Removes everything inside `dir` (a mount point, which stays).
fn empty_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Writes `dir/FILLER` until the file system is full.
fn fill(dir: &Path) -> Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(FILLER))?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial blocks too.
    for size in [4096usize, 512, 1] {
        while f.write(&chunk[..size]).map(|n| n > 0).unwrap_or(false) {
            written += size as u64;
        }
    }
    Ok(written)
}

/// Overwrites 4 KiB of `path` with garbage (seeded): its first page (the
/// database's header) half the time, else a page drawn from the file.
/// Returns the offset.
fn corrupt(path: &Path, seed: u64) -> Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(path)?.len();
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let at = if rng.random_bool(0.5) {
        0
    } else {
        rng.random_range(0..(len / 4096).max(1)) * 4096
    };
    f.seek(SeekFrom::Start(at))?;
    let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    f.write_all(&garbage)?;
    f.sync_all()?;
    Ok(at)
}

/// A fault and the nodes it hits.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The agent and every workload it started killed at once.
    MachineCrash(usize),
    /// SIGKILL of the agent alone; its workloads keep running.
    AgentCrash(usize),
    /// SIGSTOP, SIGCONT at the end.
    Hang(usize),
    /// Graceful stop and start again with the same data dir.
    Restart(usize),
    /// Machine crash, data dir wiped, started again.
    Wipe(usize),
    /// Two sides that cannot reach each other (first side listed).
    Partition(Vec<usize>),
    /// The listed nodes' packets to all others are dropped; the reverse
    /// direction works.
    OneWay(Vec<usize>),
    /// Random loss of this many percent on every node's egress.
    Loss(u32),
    /// Every packet between nodes held `base` ± `jitter` ms (a userspace
    /// relay: the kernel has no netem).
    Delay {
        /// Mean delay, ms.
        base_ms: u64,
        /// Spread either side, ms.
        jitter_ms: u64,
    },
    /// The agent restarted under libfaketime with its clock this many ms
    /// off (beyond `--max-clock-offset` when large); restarted with the
    /// true time at the end.
    Skew(usize, i64),
    /// The node's data dir (a small tmpfs) filled up; freed at the end.
    DiskFull(usize),
    /// The agent stopped, 4 KiB of its store overwritten with garbage
    /// (seeded by the second field: its header or a page drawn from it);
    /// started again at the end with `--recover-from-peers`.
    CorruptStore(usize, u64),
}

/// Every fault kind, as [`Fault::kind`] names it.
pub const FAULT_KINDS: [&str; 12] = [
    "machine_crash",
    "agent_crash",
    "hang",
    "restart",
    "wipe_restart",
    "partition",
    "one_way_partition",
    "packet_loss",
    "delay",
    "clock_skew",
    "disk_full",
    "corrupt_store",
];

impl Fault {
    /// A fault drawn from `rng`, of a kind in `only` (any when empty).
    pub fn draw_of(rng: &mut impl Rng, nodes: usize, only: &[String]) -> Fault {
        loop {
            let f = Fault::draw(rng, nodes);
            if only.is_empty() || only.iter().any(|k| k == f.kind()) {
                return f;
            }
        }
    }

    /// A fault drawn from `rng`.
    pub fn draw(rng: &mut impl Rng, nodes: usize) -> Fault {
        let node = rng.random_range(0..nodes);
        let side = || {
            let size = 1 + (node % (nodes / 2).max(1));
            (0..size).map(|k| (node + k) % nodes).collect::<Vec<_>>()
        };
        match rng.random_range(0..12) {
            0 => Fault::MachineCrash(node),
            1 => Fault::AgentCrash(node),
            2 => Fault::Hang(node),
            3 => Fault::Restart(node),
            4 => Fault::Wipe(node),
            5 => Fault::Partition(side()),
            6 => Fault::OneWay(side()),
            7 => Fault::Loss(rng.random_range(10..=30)),
            8 => {
                let base_ms = rng.random_range(20..=150);
                Fault::Delay {
                    base_ms,
                    jitter_ms: rng.random_range(0..=base_ms / 2),
                }
            }
            9 => {
                // Half within the bound (tolerated), half far beyond it
                // (the node must notice and refuse writes).
                let ms = if rng.random_bool(0.5) {
                    rng.random_range(50..=400)
                } else {
                    rng.random_range(2_000..=10_000)
                };
                Fault::Skew(node, if rng.random_bool(0.5) { ms } else { -ms })
            }
            10 => Fault::DiskFull(node),
            _ => Fault::CorruptStore(node, rng.random()),
        }
    }

    /// Whether it splits the network (a completed batch slot may then run
    /// again on the side that did not hear of it; anywhere else that is a
    /// violation).
    pub fn partitions(&self) -> bool {
        matches!(self, Fault::Partition(_) | Fault::OneWay(_))
    }

    /// The kind, for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::MachineCrash(_) => "machine_crash",
            Fault::AgentCrash(_) => "agent_crash",
            Fault::Hang(_) => "hang",
            Fault::Restart(_) => "restart",
            Fault::Wipe(_) => "wipe_restart",
            Fault::Partition(_) => "partition",
            Fault::OneWay(_) => "one_way_partition",
            Fault::Loss(_) => "packet_loss",
            Fault::Delay { .. } => "delay",
            Fault::Skew(..) => "clock_skew",
            Fault::DiskFull(_) => "disk_full",
            Fault::CorruptStore(..) => "corrupt_store",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::MachineCrash(i) => write!(f, "machine crash of n{i}"),
            Fault::AgentCrash(i) => write!(f, "agent crash of n{i}"),
            Fault::Hang(i) => write!(f, "hang of n{i}"),
            Fault::Restart(i) => write!(f, "restart of n{i}"),
            Fault::Wipe(i) => write!(f, "crash of n{i} with its data dir wiped"),
            Fault::Partition(a) => write!(f, "partition {a:?} | rest"),
            Fault::OneWay(a) => write!(f, "one-way partition: {a:?} cannot send to the rest"),
            Fault::Loss(p) => write!(f, "{p}% packet loss everywhere"),
            Fault::Delay { base_ms, jitter_ms } => {
                write!(f, "every packet delayed {base_ms} ± {jitter_ms} ms")
            }
            Fault::Skew(i, ms) => write!(f, "n{i}'s clock {ms:+} ms off"),
            Fault::DiskFull(i) => write!(f, "n{i}'s disk full"),
            Fault::CorruptStore(i, _) => write!(f, "n{i} stopped and its store corrupted"),
        }
    }
}

/// One agent.
pub struct Node {
    /// `n<i>`.
    pub name: String,
    /// Its data dir.
    pub dir: PathBuf,
    proc: Option<Proc>,
    /// Stopped with SIGSTOP.
    pub hung: bool,
    /// Clock offset it runs with (libfaketime), ms.
    pub skew_ms: Option<i64>,
    /// Start it next with `--recover-from-peers`.
    pub recover: bool,
}

/// The cluster.
pub struct Cluster {
    /// The delay relay (stopped on drop, before the namespaces go).
    relay: Relay,
    /// The namespaces (removed on drop, after the agents).
    hosts: Hosts,
    /// The agents.
    pub nodes: Vec<Node>,
    root: PathBuf,
    /// Stores corrupted, and how many of them the agent found corrupt (and
    /// moved aside; the others' garbage hit no page in use).
    pub corrupt_stores: u64,
    /// See `corrupt_stores`.
    pub corrupt_detected: u64,
}

impl Cluster {
    /// Starts `n` agents, each in its own namespace.
    pub fn start(root: &Path, n: usize) -> Result<Cluster> {
        let hosts = Hosts::create("shch", n, SUBNET)
            .context("cannot create the namespaces (run as root with iproute2)")?;
        hosts.reach_from_root()?;
        let namespaces: Vec<String> = (0..n).map(|i| hosts.ns(i)).collect();
        let relay = Relay::start(&namespaces, SUBNET, 0)
            .context("cannot start the delay relay (needs /dev/net/tun)")?;
        // Each data dir is a small tmpfs of its own, so that one can fill up.
        for i in 0..n {
            let dir = root.join(format!("n{i}"));
            std::fs::create_dir_all(&dir)?;
            mount_tmpfs(&dir)?;
        }
        let mut cluster = Cluster {
            relay,
            hosts,
            nodes: (0..n)
                .map(|i| Node {
                    name: format!("n{i}"),
                    dir: root.join(format!("n{i}")),
                    proc: None,
                    hung: false,
                    skew_ms: None,
                    recover: false,
                })
                .collect(),
            root: root.to_path_buf(),
            corrupt_stores: 0,
            corrupt_detected: 0,
        };
        cluster.launch(0, false)?;
        std::fs::copy(
            cluster.nodes[0].dir.join("join-token"),
            root.join("join-token"),
        )
        .context("the first node wrote no join token")?;
        for i in 1..n {
            cluster.launch(i, true)?;
        }
        let all = n;
        wait_for(
            "every node to see every node alive",
            Duration::from_secs(60),
            || (0..all).all(|i| cluster.alive_seen_by(i) == all),
        )?;
        Ok(cluster)
    }

    fn addr(&self, i: usize) -> Ipv4Addr {
        self.hosts.addr(i)
    }

    fn launch(&mut self, i: usize, join: bool) -> Result<()> {
        let node = &self.nodes[i];
        let log = self.root.join(format!("{}.log", node.name));
        let ns = self.hosts.ns(i);
        let mut wrapper: Vec<String> = ["ip", "netns", "exec", &ns]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(ms) = node.skew_ms {
            // libfaketime shifts the wall clock only (timers and the
            // monotonic clock stay true); the agent's tasks do not
            // inherit it (the exec driver clears their environment).
            wrapper.extend([
                "env".to_string(),
                format!("LD_PRELOAD={LIBFAKETIME}"),
                format!("FAKETIME={:+.3}", ms as f64 / 1000.0),
                "FAKETIME_DONT_FAKE_MONOTONIC=1".to_string(),
                "FAKETIME_NO_CACHE=1".to_string(),
            ]);
        }
        let mut launch = shoal::launch::Launch::new(shoal_bin(), &node.name, &node.dir)
            .wrapper(wrapper)
            .listen(
                &format!("{}:{QUIC_PORT}", self.addr(i)),
                &format!("{}:{HTTP_PORT}", self.addr(i)),
            )
            .args([
                "--http-token",
                HTTP_TOKEN,
                "--cpu",
                "4000",
                "--memory",
                "4096",
            ])
            .logs(&log, &log);
        if node.recover {
            launch = launch.args(["--recover-from-peers"]);
        }
        if join {
            let seeds: Vec<String> = (0..self.nodes.len())
                .filter(|j| *j != i)
                .map(|j| format!("{}:{QUIC_PORT}", self.addr(j)))
                .collect();
            launch = launch.join(&seeds, &self.root.join("join-token"));
        }
        let mut launched = launch.spawn()?;
        let child = launched.child.take().context("the agent exited")?;
        self.nodes[i].proc = Some(Proc::adopt(&self.nodes[i].name, child, &log));
        self.nodes[i].hung = false;
        self.nodes[i].recover = false;
        Ok(())
    }

    /// Nodes whose agent runs and is not hung.
    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].proc.is_some() && !self.nodes[*i].hung)
            .collect()
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}:{HTTP_PORT}{path}", self.addr(i))
    }

    /// GET from node `i`'s API.
    pub fn get(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        ureq::get(&self.url(i, path))
            .set("Authorization", &format!("Bearer {HTTP_TOKEN}"))
            .timeout(Duration::from_secs(3))
            .call()
            .ok()?
            .into_json()
            .ok()
    }

    /// A write to node `i`'s API: the JSON answer, or why it failed.
    pub fn send(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<serde_json::Value> {
        let resp = ureq::request(method, &self.url(i, path))
            .set("Authorization", &format!("Bearer {HTTP_TOKEN}"))
            .timeout(Duration::from_secs(10))
            .send_string(body)?;
        Ok(resp.into_json()?)
    }

    /// Members node `i` sees alive.
    fn alive_seen_by(&self, i: usize) -> usize {
        self.get(i, "/v1/nodes")
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().filter(|n| n["state"] == "alive").count())
            })
            .unwrap_or(0)
    }

    fn kill(&mut self, i: usize, machine: bool) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            if self.nodes[i].hung {
                p.signal(libc::SIGCONT);
            }
            p.stop(libc::SIGKILL);
        }
        self.nodes[i].hung = false;
        if machine {
            shoal::driver::exec::kill_instances_under(&self.nodes[i].dir.join("instances"));
        }
    }

    fn all_blocked(&self, side: &[usize]) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
        let a = side.iter().map(|i| self.addr(*i)).collect();
        let b = (0..self.nodes.len())
            .filter(|i| !side.contains(i))
            .map(|i| self.addr(i))
            .collect();
        (a, b)
    }

    /// Starts a fault.
    pub fn inject(&mut self, fault: &Fault) -> Result<()> {
        match fault {
            Fault::MachineCrash(i) => self.kill(*i, true),
            Fault::AgentCrash(i) => self.kill(*i, false),
            Fault::Hang(i) => {
                if let Some(p) = &self.nodes[*i].proc {
                    p.signal(libc::SIGSTOP);
                    self.nodes[*i].hung = true;
                }
            }
            Fault::Restart(i) => {
                if let Some(mut p) = self.nodes[*i].proc.take() {
                    p.stop(libc::SIGTERM);
                }
                self.launch(*i, true)?;
            }
            Fault::Wipe(i) => {
                self.kill(*i, true);
                empty_dir(&self.nodes[*i].dir)?;
            }
            Fault::Partition(side) => {
                let (a, b) = self.all_blocked(side);
                for i in 0..self.nodes.len() {
                    let blocked = if side.contains(&i) { &b } else { &a };
                    self.hosts.faults(i, 0, blocked)?;
                }
            }
            Fault::OneWay(side) => {
                let (_, b) = self.all_blocked(side);
                for i in side {
                    self.hosts.faults(*i, 0, &b)?;
                }
            }
            Fault::Loss(pct) => {
                for i in 0..self.nodes.len() {
                    self.hosts.faults(i, *pct, &[])?;
                }
            }
            Fault::Delay { base_ms, jitter_ms } => {
                self.relay.delay(
                    Duration::from_millis(*base_ms),
                    Duration::from_millis(*jitter_ms),
                )?;
            }
            Fault::Skew(i, ms) => {
                if let Some(mut p) = self.nodes[*i].proc.take() {
                    p.stop(libc::SIGTERM);
                }
                self.nodes[*i].skew_ms = Some(*ms);
                self.launch(*i, true)?;
            }
            Fault::DiskFull(i) => {
                let bytes = fill(&self.nodes[*i].dir)?;
                println!("  filled n{i}'s disk with {} KiB", bytes / 1024);
            }
            Fault::CorruptStore(i, seed) => {
                if let Some(mut p) = self.nodes[*i].proc.take() {
                    p.stop(libc::SIGTERM);
                }
                self.nodes[*i].hung = false;
                let store = self.nodes[*i].dir.join("state.redb");
                if store.exists() {
                    let at = corrupt(&store, *seed)?;
                    println!("  4 KiB of garbage at offset {at} of n{i}'s store");
                }
                self.nodes[*i].recover = true;
            }
        }
        Ok(())
    }

    /// Ends a fault: every node up, no network fault.
    pub fn heal(&mut self, fault: &Fault) -> Result<()> {
        if let Fault::Hang(i) = fault {
            if let Some(p) = &self.nodes[*i].proc {
                p.signal(libc::SIGCONT);
            }
            self.nodes[*i].hung = false;
        }
        match fault {
            Fault::Delay { .. } => {
                self.relay.clear()?;
                let (relayed, dropped) = self.relay.counts();
                println!("  relay: {relayed} packets delayed, {dropped} dropped (queue full)");
            }
            Fault::Skew(i, _) => {
                if let Some(mut p) = self.nodes[*i].proc.take() {
                    p.stop(libc::SIGTERM);
                }
                self.nodes[*i].skew_ms = None;
            }
            Fault::DiskFull(i) => {
                std::fs::remove_file(self.nodes[*i].dir.join(FILLER))?;
            }
            _ => {}
        }
        for i in 0..self.nodes.len() {
            self.hosts.clear_loss(i);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].proc.is_none() {
                self.launch(i, true)?;
            }
        }
        if let Fault::CorruptStore(i, _) = fault {
            // What the agent made of it: a store it found corrupt is moved
            // aside (removed here, it fills the small disk).
            self.corrupt_stores += 1;
            let mut moved = false;
            for e in std::fs::read_dir(&self.nodes[*i].dir)?.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().contains(".corrupt-") {
                    moved = true;
                    let _ = std::fs::remove_file(e.path());
                }
            }
            if moved {
                self.corrupt_detected += 1;
                println!("  n{i} found its store corrupt and refills it from its peers");
            } else {
                println!(
                    "  n{i}'s store still opens and reads whole (the garbage hit no page in use)"
                );
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i, true);
        }
        for node in &self.nodes {
            let _ = std::process::Command::new("umount")
                .arg("--lazy")
                .arg(&node.dir)
                .output();
        }
    }
}
