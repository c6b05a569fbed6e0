//! The cluster under test: one agent per network namespace, faults on them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chaos::netns::Hosts;
use chaos::procs::{shoal_bin, wait_for, Proc};
use rand::Rng;

const QUIC_PORT: u16 = 7100;
const HTTP_PORT: u16 = 7200;
/// The API listens on the namespace's address, so it needs a token.
const HTTP_TOKEN: &str = "chaos-http-token-0001";

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
}

impl Fault {
    /// A fault drawn from `rng`.
    pub fn draw(rng: &mut impl Rng, nodes: usize) -> Fault {
        let node = rng.random_range(0..nodes);
        let side = || {
            let size = 1 + (node % (nodes / 2).max(1));
            (0..size).map(|k| (node + k) % nodes).collect::<Vec<_>>()
        };
        match rng.random_range(0..8) {
            0 => Fault::MachineCrash(node),
            1 => Fault::AgentCrash(node),
            2 => Fault::Hang(node),
            3 => Fault::Restart(node),
            4 => Fault::Wipe(node),
            5 => Fault::Partition(side()),
            6 => Fault::OneWay(side()),
            _ => Fault::Loss(rng.random_range(10..=30)),
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
}

/// The cluster.
pub struct Cluster {
    /// The namespaces (removed on drop, after the agents).
    hosts: Hosts,
    /// The agents.
    pub nodes: Vec<Node>,
    root: PathBuf,
}

impl Cluster {
    /// Starts `n` agents, each in its own namespace.
    pub fn start(root: &Path, n: usize) -> Result<Cluster> {
        let hosts = Hosts::create("shch", n, [10, 214, 0])
            .context("cannot create the namespaces (run as root with iproute2)")?;
        hosts.reach_from_root()?;
        let mut cluster = Cluster {
            hosts,
            nodes: (0..n)
                .map(|i| Node {
                    name: format!("n{i}"),
                    dir: root.join(format!("n{i}")),
                    proc: None,
                    hung: false,
                })
                .collect(),
            root: root.to_path_buf(),
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
        let mut launch = shoal::launch::Launch::new(shoal_bin(), &node.name, &node.dir)
            .wrapper(["ip", "netns", "exec", &self.hosts.ns(i)])
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
                std::fs::remove_dir_all(&self.nodes[*i].dir)?;
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
        for i in 0..self.nodes.len() {
            self.hosts.clear_loss(i);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].proc.is_none() {
                self.launch(i, true)?;
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
    }
}
