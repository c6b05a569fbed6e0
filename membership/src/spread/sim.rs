//! An in-memory network of [`Spread`] nodes, deterministic for a seed:
//! messages are encoded with postcard (their bytes counted per sender) and
//! delivered after a fixed latency, or lost with a given probability. Used
//! by the unit tests and by the scale simulator (`spread-sim`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Action, Msg, Reply, RunId, RunState, Spread, SpreadConfig};

enum Kind {
    OneWay(Msg),
    Request(Msg),
    Reply(Reply),
}

struct Pending {
    at: Instant,
    seq: u64,
    to: usize,
    from: SocketAddr,
    kind: Kind,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The simulated network.
pub struct SimNet {
    /// The nodes, by index.
    pub nodes: Vec<Spread>,
    /// Each node's address.
    pub addrs: Vec<SocketAddr>,
    index: HashMap<SocketAddr, usize>,
    pending: BinaryHeap<Pending>,
    seq: u64,
    /// Simulated time now.
    pub now: Instant,
    /// The simulation's start.
    pub start: Instant,
    /// One-way delay of every message.
    pub latency: Duration,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Timer granularity.
    pub tick: Duration,
    next_tick: Instant,
    /// Nodes that are down: they neither tick nor receive.
    pub down: Vec<bool>,
    /// Bytes each node sent (encoded messages).
    pub bytes: Vec<u64>,
    /// Messages each node sent.
    pub messages: Vec<u64>,
    /// Bytes sent, by message kind: notes, pulls, answers to pulls, syncs,
    /// answers to syncs, pushes.
    pub bytes_by_kind: [u64; 6],
    watch: Option<(RunId, u64)>,
    /// When each node first held the watched version (simulated time).
    pub reached: Vec<Option<Instant>>,
    rng: StdRng,
}

/// The name of simulated node `i`.
pub fn name(i: usize) -> String {
    format!("node-{i:05}")
}

/// The address of simulated node `i`.
pub fn addr(i: usize) -> SocketAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000 | i), 7946))
}

impl SimNet {
    /// `n` nodes, each knowing nothing but itself.
    pub fn new(n: usize, config: SpreadConfig, seed: u64) -> SimNet {
        let start = Instant::now();
        let addrs: Vec<SocketAddr> = (0..n).map(addr).collect();
        let nodes = (0..n)
            .map(|i| {
                let me = RunId {
                    name: Arc::from(name(i)),
                    // Realistic generations (start times in ms): varints of
                    // their real length.
                    generation: 1_795_000_000_000 + i as u64,
                    addr: addrs[i],
                };
                Spread::new(
                    config.clone(),
                    me,
                    seed ^ (i as u64).wrapping_mul(0x9e37),
                    start,
                )
            })
            .collect();
        SimNet {
            nodes,
            index: addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect(),
            addrs,
            pending: BinaryHeap::new(),
            seq: 0,
            now: start,
            start,
            latency: Duration::from_millis(1),
            loss: 0.0,
            tick: Duration::from_millis(10),
            next_tick: start,
            down: vec![false; n],
            bytes: vec![0; n],
            messages: vec![0; n],
            bytes_by_kind: [0; 6],
            watch: None,
            reached: vec![None; n],
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Makes every node hold every node's current state, as after a long
    /// quiet period (the state is shared between nodes, so that 10,000
    /// simulated nodes fit in memory).
    pub fn converge_instantly(&mut self) {
        let mut all: imbl::OrdMap<RunId, Arc<RunState>> = imbl::OrdMap::new();
        for node in &self.nodes {
            if let Some(state) = node.runs.get(node.me()) {
                all.insert(node.me().clone(), state.clone());
            }
        }
        for node in &mut self.nodes {
            node.adopt(all.clone());
        }
    }

    /// Watches for `version` of node `i`'s run reaching every node.
    pub fn watch(&mut self, i: usize, version: u64) {
        self.watch = Some((self.nodes[i].me().clone(), version));
        self.reached = vec![None; self.nodes.len()];
        self.reached[i] = Some(self.now);
    }

    fn check_reached(&mut self, i: usize) {
        if let Some((run, version)) = &self.watch {
            if self.reached[i].is_none()
                && self.nodes[i]
                    .run(run)
                    .is_some_and(|s| s.max_version >= *version)
            {
                self.reached[i] = Some(self.now);
            }
        }
    }

    fn kind_index(kind: &Kind) -> usize {
        match kind {
            Kind::OneWay(Msg::Notes(_)) => 0,
            Kind::Request(Msg::Pull(_)) => 1,
            Kind::Reply(Reply::Deltas(_)) => 2,
            Kind::Request(Msg::Sync { .. }) => 3,
            Kind::Reply(Reply::Sync { .. }) => 4,
            _ => 5,
        }
    }

    fn post(&mut self, from: usize, to: SocketAddr, kind: Kind) {
        let len = match &kind {
            Kind::OneWay(m) | Kind::Request(m) => postcard::to_stdvec(m).map_or(0, |b| b.len()),
            Kind::Reply(r) => postcard::to_stdvec(r).map_or(0, |b| b.len()),
        };
        self.bytes[from] += len as u64;
        self.messages[from] += 1;
        self.bytes_by_kind[Self::kind_index(&kind)] += len as u64;
        let Some(&to) = self.index.get(&to) else {
            return;
        };
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        self.seq += 1;
        self.pending.push(Pending {
            at: self.now + self.latency,
            seq: self.seq,
            to,
            from: self.addrs[from],
            kind,
        });
    }

    fn execute(&mut self, from: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, msg } => self.post(from, to, Kind::OneWay(msg)),
                Action::Request { to, msg } => self.post(from, to, Kind::Request(msg)),
            }
        }
    }

    /// Runs the network until `until` (simulated), with every node up
    /// treating every other node as live.
    pub fn run_until(&mut self, until: Instant) {
        let live: Vec<SocketAddr> = self
            .addrs
            .iter()
            .zip(&self.down)
            .filter(|(_, d)| !**d)
            .map(|(a, _)| *a)
            .collect();
        loop {
            let next_msg = self.pending.peek().map(|p| p.at);
            let next = match next_msg {
                Some(t) if t < self.next_tick => t,
                _ => self.next_tick,
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            if next_msg == Some(next) && next < self.next_tick {
                let p = self.pending.pop().expect("peeked");
                if self.down[p.to] {
                    continue;
                }
                let node = &mut self.nodes[p.to];
                let actions = match p.kind {
                    Kind::OneWay(m) => node.on_message(p.from, m, self.now).1,
                    Kind::Request(m) => {
                        let (reply, actions) = node.on_message(p.from, m, self.now);
                        if let Some(r) = reply {
                            self.post(p.to, p.from, Kind::Reply(r));
                        }
                        actions
                    }
                    Kind::Reply(r) => node.on_reply(p.from, r, self.now),
                };
                self.execute(p.to, actions);
                self.check_reached(p.to);
            } else {
                self.next_tick = self.now + self.tick;
                for i in 0..self.nodes.len() {
                    if self.down[i] {
                        continue;
                    }
                    let actions = self.nodes[i].tick(self.now, &live);
                    if !actions.is_empty() {
                        self.execute(i, actions);
                    }
                }
            }
        }
    }

    /// Runs for `d` more.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Whether every node up holds every up node's run at its version.
    pub fn converged(&self) -> bool {
        let want: Vec<(RunId, u64)> = self
            .nodes
            .iter()
            .zip(&self.down)
            .filter(|(_, d)| !**d)
            .map(|(n, _)| (n.me().clone(), n.run(n.me()).map_or(0, |s| s.max_version)))
            .collect();
        self.nodes
            .iter()
            .zip(&self.down)
            .filter(|(_, d)| !**d)
            .all(|(n, _)| {
                want.iter()
                    .all(|(r, v)| n.run(r).is_some_and(|s| s.max_version == *v))
            })
    }
}
