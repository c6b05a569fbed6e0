//! A deterministic simulator of a whole shoal cluster in one process: N
//! nodes of the real scheduler core (`shoal-core`) and, by default, the
//! real SWIM state machine, on virtual time, over a seeded network with
//! loss, latency and reordering, partitions (two-sided and one-way),
//! crashes, restarts, wiped restarts, pauses and clock skew, under a
//! workload of services and batch jobs submitted, scaled, updated and
//! stopped at random nodes. The checker holds shoal's invariants against
//! the ground truth of what every simulated machine runs.
//!
//! The same seed gives the same run: every choice comes from one seeded
//! RNG, events are ordered by (time, sequence), and nothing iterates a
//! randomly seeded hash map. The report's `trace_digest` hashes every
//! event processed.
//!
//! # Layout
//! - [`options`]: every knob in one struct.
//! - [`host`]: a machine's store and processes.
//! - [`gossip`]: gossip modelled as shared epochs per network component.
//! - [`checker`]: the invariants.

#![recursion_limit = "256"]

pub mod checker;
pub mod gossip;
pub mod host;
pub mod options;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shoal_core::instance::{DriverEvent, InstanceId, InstanceState};
use shoal_core::job::JobSpec;
use shoal_core::scheduler::{ApiAnswer, ApiRequest, Effect, LogsTo, Now, Recovered};
use shoal_core::view::{ClusterView, MemberView, Members};
use shoal_core::wire::{Request, Response};
use shoal_core::Scheduler;
use shoal_membership::swim::{
    Action, ProbeMsg, ProbeOutcome, ProbeReply, Swim, SwimConfig, Update,
};
use shoal_membership::{Capacity, NodeRecord, NodeState};

use checker::{Checker, Running};
use gossip::Gossip;
use host::{behaviour, Behaviour, SimDriver, SimStore};
pub use options::{MembershipMode, NewVersion, Options, Workload};

/// Wall-clock milliseconds at the simulated time zero (2026-01-01).
const EPOCH_MS: u64 = 1_767_225_600_000;
/// A driver start takes this long.
const START_DELAY: Duration = Duration::from_millis(2);
/// A stopped process is gone after this long.
const STOP_DELAY: Duration = Duration::from_millis(1);
/// A store write is durable after this long.
const FSYNC_DELAY: Duration = Duration::from_millis(2);
/// SWIM's timer granularity in the simulation.
const SWIM_TICK: Duration = Duration::from_millis(20);
/// The checker samples this often.
const SAMPLE: Duration = Duration::from_millis(100);
/// The benchmark workload is submitted once the cluster has formed.
const BULK_AT: Duration = Duration::from_secs(5);
/// How long after the network or a node's liveness changed the truth's
/// minority check applies: failure detection (a few seconds with SWIM
/// under loss) plus a view's spread, with a margin.
const MINORITY_SETTLE: Duration = Duration::from_secs(5);
/// Oracle membership: a failure is suspected this long after it happens.
const ORACLE_SUSPECT: Duration = Duration::from_millis(200);
/// Oracle membership: and declared dead this long after (fd-bench measured
/// SWIM's kill-to-dead-everywhere at p50 0.6 s, p99 0.76 s on 10 nodes).
const ORACLE_DEAD: Duration = Duration::from_millis(700);

/// Where a probe's answer goes.
#[derive(Debug, Clone)]
enum ProbeReplyTo {
    /// The prober, directly.
    Owner { node: usize, gen: u64, probe: u64 },
    /// A relay probing on behalf of `owner`.
    Relay {
        relay: usize,
        relay_gen: u64,
        owner: usize,
        owner_gen: u64,
        probe: u64,
    },
}

#[derive(Debug)]
enum Ev {
    Timer(usize, u64),
    SwimTick(usize, u64),
    Refresh(usize, u64),
    QuickRefresh(usize, u64),
    Request {
        from: usize,
        to: usize,
        req: Request,
        call: Option<(u64, u64)>,
    },
    Response {
        to: usize,
        gen: u64,
        call: u64,
        resp: Response,
    },
    CallTimeout {
        node: usize,
        gen: u64,
        call: u64,
    },
    Probe {
        to: usize,
        msg: ProbeMsg,
        reply: Option<ProbeReplyTo>,
    },
    ProbeAnswer {
        to: ProbeReplyTo,
        outcome: ProbeOutcome,
    },
    ProbeTimeout {
        node: usize,
        gen: u64,
        probe: u64,
    },
    Started {
        node: usize,
        gen: u64,
        id: InstanceId,
        result: Result<(), String>,
    },
    Ended {
        node: usize,
        mgen: u64,
        id: InstanceId,
        state: InstanceState,
    },
    /// A health check of a copy is due.
    Check {
        node: usize,
        gen: u64,
        id: InstanceId,
        index: usize,
    },
    DriverNews {
        node: usize,
        gen: u64,
        event: DriverEvent,
    },
    Persisted {
        node: usize,
        gen: u64,
        write: u64,
        jobs: Vec<Arc<shoal_core::records::JobRecord>>,
        completions: Vec<shoal_core::records::Completion>,
    },
    Commit,
    Submit,
    OracleRebuild,
    Sample,
    Step,
    Restart(usize),
    Resume(usize),
    Kill,
    /// An operator forgets a crashed machine (`shoal node forget`), if it
    /// is still down (its machine generation).
    Forget(usize, u64),
    /// A client whose agent died before answering sends its request again.
    ClientRetry(ApiRequest),
}

impl Ev {
    fn kind(&self) -> &'static str {
        match self {
            Ev::Timer { .. } => "Timer",
            Ev::SwimTick { .. } => "SwimTick",
            Ev::Refresh { .. } => "Refresh",
            Ev::QuickRefresh { .. } => "QuickRefresh",
            Ev::Request { .. } => "Request",
            Ev::Response { .. } => "Response",
            Ev::CallTimeout { .. } => "CallTimeout",
            Ev::Probe { .. } => "Probe",
            Ev::ProbeAnswer { .. } => "ProbeAnswer",
            Ev::ProbeTimeout { .. } => "ProbeTimeout",
            Ev::Started { .. } => "Started",
            Ev::Ended { .. } => "Ended",
            Ev::Check { .. } => "Check",
            Ev::DriverNews { .. } => "DriverNews",
            Ev::Persisted { .. } => "Persisted",
            Ev::Commit => "Commit",
            Ev::Submit => "Submit",
            Ev::OracleRebuild => "OracleRebuild",
            Ev::Sample => "Sample",
            Ev::Step => "Step",
            Ev::Restart { .. } => "Restart",
            Ev::Resume { .. } => "Resume",
            Ev::Kill => "Kill",
            Ev::Forget(..) => "Forget",
            Ev::ClientRetry(..) => "ClientRetry",
        }
    }
}

/// A scheduled event; ordered by (time, sequence) only.
struct Queued {
    when: Duration,
    seq: u64,
    ev: Box<Ev>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.when, self.seq) == (other.when, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.when, self.seq).cmp(&(other.when, other.seq))
    }
}

struct SimNode {
    name: Arc<str>,
    addr: SocketAddr,
    labels: BTreeMap<String, String>,
    gen: u64,
    /// Machine generation: bumped when the machine (and its processes) dies.
    mgen: u64,
    agent_up: bool,
    machine_up: bool,
    paused_until: Option<Duration>,
    skew_ms: i64,
    core: Option<Scheduler>,
    swim: Option<Swim>,
    record: Arc<NodeRecord>,
    store: SimStore,
    driver: SimDriver,
    /// The gossip epoch the node's view holds (views never go back).
    held: Option<gossip::Epoch>,
    view_swim: u64,
    refresh_phase: Duration,
    /// What this node's SWIM took in from gossip of each node.
    observed: Vec<gossip::Peer>,
    /// A refresh for a SWIM change is scheduled.
    refresh_soon: bool,
    /// The members as last built from SWIM (rebuilt when SWIM changed).
    members: Arc<Members>,
    /// Wall time spent in this node's scheduler core.
    cpu: Duration,
    /// The health checks the agent runs, by copy.
    checks: BTreeMap<InstanceId, Vec<shoal_core::health::Probe>>,
}

/// Where a peer's request's answer goes.
#[derive(Debug, Clone, Copy)]
struct ReplyTo {
    caller: usize,
    caller_gen: u64,
    call: u64,
    callee: usize,
}

/// A fault.
#[derive(Debug, Clone)]
enum Fault {
    MachineCrash(usize),
    AgentCrash(usize),
    Pause(usize),
    Restart(usize),
    Wipe(usize),
    Partition(Vec<usize>),
    OneWay(Vec<usize>),
    Loss(f64),
    Delay(Duration),
    Skew(usize, i64),
}

impl Fault {
    fn partitions(&self) -> bool {
        matches!(self, Fault::Partition(_) | Fault::OneWay(_))
    }

    fn kind(&self) -> &'static str {
        match self {
            Fault::MachineCrash(_) => "machine_crash",
            Fault::AgentCrash(_) => "agent_crash",
            Fault::Pause(_) => "pause",
            Fault::Restart(_) => "restart",
            Fault::Wipe(_) => "wipe_restart",
            Fault::Partition(_) => "partition",
            Fault::OneWay(_) => "one_way_partition",
            Fault::Loss(_) => "packet_loss",
            Fault::Delay(_) => "delay",
            Fault::Skew(..) => "clock_skew",
        }
    }
}

/// Where the run is.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// The initial workload settles.
    Warmup,
    /// A fault is on until `until`.
    Fault { until: Duration },
    /// Waiting for the cluster to reconverge since `since`.
    Converge { since: Duration },
    /// Faults over; the liveness bound runs from `since`.
    Final { since: Duration },
    /// Done.
    Done,
}

/// FNV-1a, incrementally: the trace digest.
struct Digest(u64);

impl Digest {
    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn add_u64(&mut self, v: u64) {
        self.add(&v.to_le_bytes());
    }
}

/// The simulator.
pub struct Sim {
    opts: Options,
    rng: StdRng,
    base: Instant,
    t: Duration,
    /// Events by (time, sequence): the sequence breaks ties in the order
    /// they were scheduled, so a run replays exactly.
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    nodes: Vec<SimNode>,
    by_addr: BTreeMap<SocketAddr, usize>,
    component_of: Vec<u32>,
    /// Gossip's components: a one-way cut stops scuttlebutt both ways (an
    /// exchange needs both directions), so it splits gossip like a
    /// partition even though one direction still carries probes.
    gossip_of: Vec<u32>,
    blocked: BTreeSet<(usize, usize)>,
    loss: f64,
    extra_latency: Duration,
    gossip: Gossip,
    pending_calls: BTreeSet<(usize, u64, u64)>,
    pending_probes: BTreeSet<(usize, u64, u64)>,
    tokens: BTreeMap<u64, ReplyTo>,
    next_token: u64,
    /// API calls waiting for their answer.
    /// By token: the node asked and the request (re-sent elsewhere if
    /// that agent dies before answering, as a client would).
    api: BTreeMap<u64, (usize, ApiRequest)>,
    next_api: u64,
    /// The run's checker.
    pub checker: Checker,
    digest: Digest,
    phase: Phase,
    fault: Option<Fault>,
    faults: BTreeMap<&'static str, u64>,
    fault_phase_end: Duration,
    next_job: u64,
    events_processed: u64,
    /// Events handled, by kind (the report's `events_by_kind`).
    by_kind: BTreeMap<&'static str, u64>,
    /// Starts of `partition = "never"` copies, and forgets issued.
    never_starts: u64,
    forgets: u64,
    /// The most events ever waiting (the report's `queue_max`).
    queue_max: usize,
    messages: u64,
    /// The batch of effects being carried out comes from a winner taking
    /// a start (not from a coordinator's round).
    handling_start_request: bool,
    /// Oracle membership: the members each network component sees.
    oracle: BTreeMap<u32, Arc<Members>>,
    /// Since when each node's agent has been down or paused.
    down_since: Vec<Option<Duration>>,
    /// When the network last split or healed.
    split_since: Duration,
    /// When the network or a node's liveness last changed (the truth the
    /// minority check measures against settles this long after).
    net_changed_at: Duration,
    /// Nodes down that left on purpose or were forgotten: no longer
    /// members by the truth's count (until their agent starts again).
    uncounted: Vec<bool>,
    /// Times at which an oracle rebuild is scheduled.
    oracle_pending: BTreeSet<Duration>,
    /// (bench) when the workload was submitted, when every slot first
    /// ran, and when the kill happened.
    submitted_at: Option<Duration>,
    all_running_at: Option<Duration>,
    killed_at: Option<Duration>,
    recovered_at: Option<Duration>,
    max_reconverge: Duration,
    /// (update workload) when the new version was submitted, when the
    /// update finished, and the fewest slots served meanwhile.
    update_at: Option<Duration>,
    update_done_at: Option<Duration>,
    update_min_serving: Option<u32>,
    /// Times of the cron job checked by `check_cron`.
    cron_due: u64,
    /// When the update workload last asked to promote its canaries.
    promote_tried: Option<Duration>,
    /// When the `Twice` update wrote its second new version (v3).
    second_at: Option<Duration>,
    /// (drain workload) the node drained, and its batch copies then.
    drained: Option<usize>,
    drained_batch: usize,
    /// When its service copies had all left it, and when it was empty.
    drained_services_at: Option<Duration>,
    drained_empty_at: Option<Duration>,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The JSON report.
    pub json: serde_json::Value,
    /// Violations.
    pub violations: Vec<String>,
}

fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7000))
}

impl Sim {
    /// A cluster per `opts`, every node up and joined.
    pub fn new(opts: Options) -> Sim {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let base = Instant::now();
        let n = opts.nodes;
        let zones = ["a", "b", "c"];
        let mut nodes = Vec::with_capacity(n);
        let mut by_addr = BTreeMap::new();
        for i in 0..n {
            let name: Arc<str> = Arc::from(format!("n{i}"));
            let addr = node_addr(i);
            by_addr.insert(addr, i);
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), zones[i % 3].to_string());
            if i % 4 == 0 {
                labels.insert("ssd".to_string(), "true".to_string());
            }
            let size = [2u64, 4, 8][rng.random_range(0..3)];
            let capacity = Capacity {
                cpu_millis: 1000 * size,
                memory_mib: 2048 * size,
            };
            let skew_ms = if opts.skew_max_ms > 0 {
                rng.random_range(-opts.skew_max_ms..=opts.skew_max_ms)
            } else {
                0
            };
            nodes.push(SimNode {
                record: Arc::new(NodeRecord {
                    name: name.to_string(),
                    address: addr,
                    labels: labels.clone(),
                    capacity,
                    drivers: vec!["exec".into()],
                    version: "sim".into(),
                    http: None,
                    notes: Vec::new(),
                }),
                name,
                addr,
                labels,
                gen: 0,
                mgen: 0,
                agent_up: false,
                machine_up: true,
                paused_until: None,
                skew_ms,
                core: None,
                swim: None,
                store: SimStore::default(),
                driver: SimDriver::default(),
                held: None,
                view_swim: u64::MAX,
                refresh_phase: Duration::from_micros(rng.random_range(0..100_000)),
                observed: vec![gossip::Peer::default(); n],
                refresh_soon: false,
                members: Arc::new(Members::default()),
                cpu: Duration::ZERO,
                checks: BTreeMap::new(),
            });
        }
        let names = nodes.iter().map(|n| n.name.clone()).collect();
        let duration = opts.duration;
        let mut sim = Sim {
            loss: opts.loss,
            opts,
            rng,
            base,
            t: Duration::ZERO,
            queue: BinaryHeap::new(),
            seq: 0,
            nodes,
            by_addr,
            component_of: vec![0; n],
            gossip_of: vec![0; n],
            blocked: BTreeSet::new(),
            extra_latency: Duration::ZERO,
            gossip: Gossip::new(names),
            pending_calls: BTreeSet::new(),
            pending_probes: BTreeSet::new(),
            tokens: BTreeMap::new(),
            next_token: 0,
            api: BTreeMap::new(),
            next_api: 0,
            checker: Checker::default(),
            digest: Digest(0xcbf2_9ce4_8422_2325),
            phase: Phase::Warmup,
            fault: None,
            faults: BTreeMap::new(),
            fault_phase_end: duration,
            next_job: 0,
            events_processed: 0,
            by_kind: BTreeMap::new(),
            never_starts: 0,
            forgets: 0,
            queue_max: 0,
            messages: 0,
            handling_start_request: false,
            oracle: BTreeMap::new(),
            down_since: vec![None; n],
            split_since: Duration::ZERO,
            net_changed_at: Duration::ZERO,
            uncounted: vec![false; n],
            oracle_pending: BTreeSet::new(),
            submitted_at: None,
            all_running_at: None,
            killed_at: None,
            recovered_at: None,
            max_reconverge: Duration::ZERO,
            update_at: None,
            update_done_at: None,
            update_min_serving: None,
            drained: None,
            drained_batch: 0,
            drained_services_at: None,
            drained_empty_at: None,
            cron_due: 0,
            promote_tried: None,
            second_at: None,
        };
        sim.checker = Checker::new(
            sim.opts.conflict_window,
            sim.opts.after_fault,
            sim.opts.verbose,
        );
        for i in 0..n {
            // The first node bootstraps; the others join through it.
            sim.start_agent(i, i != 0);
        }
        if sim.opts.membership == MembershipMode::Oracle {
            sim.oracle_rebuild();
        }
        sim.at(sim.opts.gossip_epoch, Ev::Commit);
        sim.at(SAMPLE, Ev::Sample);
        sim.at(Duration::from_secs(1), Ev::Step);
        if sim.opts.kill_fraction > 0.0 {
            sim.at(sim.opts.kill_at, Ev::Kill);
        }
        sim
    }

    fn at(&mut self, delay: Duration, ev: Ev) {
        self.seq += 1;
        let when = self.t + delay;
        self.queue.push(Reverse(Queued {
            when,
            seq: self.seq,
            ev: Box::new(ev),
        }));
    }

    fn now(&self, node: usize) -> Now {
        let wall = (EPOCH_MS as i64 + self.t.as_millis() as i64 + self.nodes[node].skew_ms).max(0);
        Now {
            mono: self.base + self.t,
            wall_ms: wall as u64,
        }
    }

    fn mono(&self) -> Instant {
        self.base + self.t
    }

    // ---- nodes ----

    fn start_agent(&mut self, i: usize, joining: bool) {
        self.uncounted[i] = false;
        let node = &mut self.nodes[i];
        node.gen += 1;
        node.agent_up = true;
        node.machine_up = true;
        node.paused_until = None;
        node.held = None;
        node.view_swim = u64::MAX;
        let gen = node.gen;
        let seed = self.opts.seed ^ (i as u64).wrapping_mul(0x9e37_79b9) ^ gen;
        let drivers = BTreeSet::from(["exec".to_string()]);
        let store = node.store.clone();
        let now = self.now(i);
        let mut core = Scheduler::new(
            self.opts.scheduler.clone(),
            &self.nodes[i].name,
            drivers,
            seed,
            store.jobs.into_values().map(|r| (*r).clone()).collect(),
            store.completions.into_values().collect(),
            store.members,
            joining,
            now,
        );
        let recovered: Vec<Recovered> = self.nodes[i]
            .driver
            .instances
            .values()
            .map(|inst| Recovered {
                driver: inst.driver.clone(),
                spec: inst.spec.clone(),
                state: inst.ended.clone().unwrap_or(InstanceState::Running),
            })
            .collect();
        let effects = core.handle_recovered(recovered, now);
        self.nodes[i].core = Some(core);
        if self.opts.membership == MembershipMode::Swim {
            let swim = Swim::new(
                SwimConfig::lan(),
                &self.nodes[i].name,
                gen,
                self.nodes[i].addr,
                seed,
            );
            self.nodes[i].swim = Some(swim);
            self.nodes[i].observed = vec![gossip::Peer::default(); self.nodes.len()];
            self.at(SWIM_TICK, Ev::SwimTick(i, gen));
        }
        self.gossip.restart(i, gen);
        self.effects(i, effects);
        let tick = self.opts.scheduler.tick;
        let jitter = Duration::from_micros(self.rng.random_range(0..tick.as_micros() as u64));
        self.at(jitter, Ev::Timer(i, gen));
        let phase = self.nodes[i].refresh_phase;
        self.at(phase, Ev::Refresh(i, gen));
        self.down_since[i] = None;
        self.oracle_changed();
    }

    /// Runs `f` on node `i`'s core if its process `gen` is up, and carries
    /// out the effects.
    fn with_core(&mut self, i: usize, gen: u64, f: impl FnOnce(&mut Scheduler) -> Vec<Effect>) {
        // The wall time each node's decisions take is measured (it is not
        // simulated: a node's compute is instantaneous in virtual time) and
        // reported, so the busiest node's work can be set beside the
        // simulated time. It never feeds back into the run.
        let started = Instant::now();
        let effects = match self.core_mut(i, gen) {
            Some(core) => f(core),
            None => return,
        };
        self.nodes[i].cpu += started.elapsed();
        self.effects(i, effects);
    }

    /// Runs `f` on node `i`'s SWIM state machine and carries out its actions.
    fn with_swim(&mut self, i: usize, f: impl FnOnce(&mut Swim) -> Vec<Action>) {
        let actions = match self.nodes[i].swim.as_mut() {
            Some(swim) => f(swim),
            None => return,
        };
        self.swim_actions(i, actions);
    }

    fn core_mut(&mut self, i: usize, gen: u64) -> Option<&mut Scheduler> {
        let n = &mut self.nodes[i];
        if !n.agent_up || n.gen != gen {
            return None;
        }
        n.core.as_mut()
    }

    /// The agent process dies (its instances keep running unless the
    /// machine dies too).
    fn kill_agent(&mut self, i: usize) {
        // The agent's API callers see the connection drop and ask another
        // node a second later. The first try may still take effect (it was
        // persisted and replicated before the crash): the write is then
        // applied twice, as a real client's retry would.
        let lost: Vec<u64> = self
            .api
            .iter()
            .filter(|(_, (at, _))| *at == i)
            .map(|(t, _)| *t)
            .collect();
        for token in lost {
            if let Some((_, req)) = self.api.remove(&token) {
                self.at(Duration::from_secs(1), Ev::ClientRetry(req));
            }
        }
        let n = &mut self.nodes[i];
        n.agent_up = false;
        n.core = None;
        n.swim = None;
        n.paused_until = None;
        self.down_since[i] = Some(self.t);
        self.oracle_changed();
    }

    fn kill_machine(&mut self, i: usize) {
        self.kill_agent(i);
        let n = &mut self.nodes[i];
        n.mgen += 1;
        // Every process dies with the machine; the records the driver
        // keeps on disk remain (and say they were lost).
        for inst in n.driver.instances.values_mut() {
            if inst.ended.is_none() {
                inst.ended = Some(InstanceState::Lost);
            }
        }
        n.machine_up = false;
    }

    fn wipe(&mut self, i: usize) {
        self.kill_machine(i);
        let n = &mut self.nodes[i];
        n.store = SimStore::default();
        n.driver = SimDriver::default();
    }

    /// A graceful stop: SWIM leave, the core stops its instances.
    fn stop_agent(&mut self, i: usize) {
        let gen = self.nodes[i].gen;
        if let Some(swim) = self.nodes[i].swim.as_mut() {
            let (to, update) = swim.leave();
            let inc = swim.incarnation();
            self.gossip.set_liveness(i, inc, true);
            self.broadcast(i, to, vec![update]);
        }
        let effects = self
            .core_mut(i, gen)
            .map(|c| c.shutdown())
            .unwrap_or_default();
        for e in effects {
            if let Effect::Discard { id, .. } = e {
                if self.nodes[i].driver.end(&id, SimDriver::stopped()) {
                    self.on_instance_ended(i, &id, &SimDriver::stopped());
                }
                node_remove(&mut self.nodes[i], &id);
            }
        }
        self.kill_agent(i);
        self.uncounted[i] = true;
    }

    /// Whether node `i` is, in truth, cut off with a minority of the
    /// members, and has been since the network and the nodes' liveness
    /// last changed at least `settle` ago: it is linked (in either
    /// direction) with fewer than half of the members that did not leave
    /// or were not forgotten. Independent of what the node itself
    /// believes. Either direction, not both: a node whose messages out are
    /// cut but that hears the others (a one-way partition) sees them alive
    /// and cannot tell (seed 76 with both: a start on the sending-only
    /// side; the `never` policy's confirmation round trip covers that case
    /// for the jobs that must never run twice).
    fn truly_minority(&self, i: usize, settle: Duration) -> bool {
        if self.t < self.net_changed_at + settle {
            return false;
        }
        let n = self.nodes.len();
        // Down for `remember_dead`: a majority side stops counting it (a
        // minority does not, but the truth errs on the side of fewer
        // reports).
        let dead_after = self.opts.scheduler.remember_dead;
        let counted = (0..n)
            .filter(|&j| {
                !self.uncounted[j] && self.down_since[j].is_none_or(|d| self.t < d + dead_after)
            })
            .count();
        let reach = (0..n)
            .filter(|&j| {
                j == i
                    || (self.nodes[j].agent_up
                        && !self.paused(j)
                        && (self.link_up(i, j) || self.link_up(j, i)))
            })
            .count();
        reach * 2 < counted
    }

    fn paused(&self, i: usize) -> bool {
        self.nodes[i].paused_until.is_some_and(|u| u > self.t)
    }

    // ---- the network ----

    fn link_up(&self, a: usize, b: usize) -> bool {
        self.component_of[a] == self.component_of[b] && !self.blocked.contains(&(a, b))
    }

    /// One hop's delay, or `None` if the link is cut.
    fn hop(&mut self, from: usize, to: usize) -> Option<Duration> {
        if !self.link_up(from, to) {
            return None;
        }
        self.messages += 1;
        let mut d = self.opts.latency
            + self.extra_latency
            + Duration::from_micros(
                self.rng
                    .random_range(0..=self.opts.jitter.as_micros() as u64),
            );
        let mut rto = Duration::from_millis(30);
        let mut tries = 0;
        while self.loss > 0.0 && self.rng.random_bool(self.loss.min(0.95)) && tries < 8 {
            d += rto;
            rto *= 2;
            tries += 1;
        }
        Some(d)
    }

    fn broadcast(&mut self, from: usize, to: Vec<SocketAddr>, updates: Vec<Update>) {
        for addr in to {
            self.send_probe(from, addr, ProbeMsg::Updates(updates.clone()), None);
        }
    }

    /// One SWIM message from node `from` to whoever has `addr`, if the link
    /// carries it.
    fn send_probe(
        &mut self,
        from: usize,
        addr: SocketAddr,
        msg: ProbeMsg,
        reply: Option<ProbeReplyTo>,
    ) {
        let Some(&to) = self.by_addr.get(&addr) else {
            return;
        };
        if let Some(d) = self.hop(from, to) {
            self.at(d, Ev::Probe { to, msg, reply });
        }
    }

    fn swim_actions(&mut self, i: usize, actions: Vec<Action>) {
        let gen = self.nodes[i].gen;
        if let Some(swim) = &self.nodes[i].swim {
            let inc = swim.incarnation();
            let changed = swim.changes() != self.nodes[i].view_swim;
            self.gossip.set_liveness(i, inc, false);
            // The membership task publishes a changed view at once.
            if changed && !self.nodes[i].refresh_soon {
                self.nodes[i].refresh_soon = true;
                self.at(Duration::from_micros(100), Ev::QuickRefresh(i, gen));
            }
        }
        for a in actions {
            match a {
                // A direct probe, or a request that a relay probe for us:
                // either way one message out and an answer (or a timeout)
                // back to the prober.
                Action::Ping {
                    probe,
                    addr,
                    msg,
                    timeout,
                }
                | Action::PingReq {
                    probe,
                    via: addr,
                    msg,
                    timeout,
                } => {
                    self.pending_probes.insert((i, gen, probe));
                    self.at(
                        timeout,
                        Ev::ProbeTimeout {
                            node: i,
                            gen,
                            probe,
                        },
                    );
                    let reply = ProbeReplyTo::Owner {
                        node: i,
                        gen,
                        probe,
                    };
                    self.send_probe(i, addr, msg, Some(reply));
                }
                Action::Broadcast { to, updates } => self.broadcast(i, to, updates),
            }
        }
    }

    fn probe_answer(&mut self, from: usize, to: ProbeReplyTo, outcome: ProbeOutcome) {
        let dest = match &to {
            ProbeReplyTo::Owner { node, .. } => *node,
            ProbeReplyTo::Relay { relay, .. } => *relay,
        };
        if let Some(d) = self.hop(from, dest) {
            self.at(d, Ev::ProbeAnswer { to, outcome });
        }
    }

    // ---- effects ----

    fn trace(&self, i: usize, what: &str) {
        if let Ok(filter) = std::env::var("SIM_TRACE") {
            if filter.is_empty() || what.contains(&filter) {
                eprintln!("{:>9.3}s n{i}: {what}", self.t.as_secs_f64());
            }
        }
    }

    fn effects(&mut self, i: usize, effects: Vec<Effect>) {
        let gen = self.nodes[i].gen;
        // The starts a coordinator decided in this batch (a placement
        // round): checked together against the job's spread.
        let mut round: BTreeMap<String, Vec<(usize, u32)>> = BTreeMap::new();
        for e in &effects {
            match e {
                Effect::Send {
                    request: Request::Start { job, slots, .. },
                    addr,
                    ..
                } => {
                    if let Some(&j) = self.by_addr.get(addr) {
                        let r = round.entry(job.name.clone()).or_default();
                        r.extend(slots.iter().map(|s| (j, *s)));
                    }
                }
                Effect::StartInstance { spec, .. } if !self.handling_start_request => {
                    round
                        .entry(spec.id.job.clone())
                        .or_default()
                        .push((i, spec.id.slot));
                }
                _ => {}
            }
        }
        for (job, starts) in round {
            self.check_spread(&job, &starts);
        }
        for e in effects {
            if std::env::var_os("SIM_TRACE").is_some() {
                let text = match &e {
                    Effect::StartInstance { spec, .. } => format!("start {}", spec.id),
                    Effect::StopInstance { id, .. } => format!("stop {id}"),
                    Effect::Send {
                        request: Request::Start { job, slots, .. },
                        to,
                        ..
                    } => {
                        format!("send start {} {slots:?} to {to}", job.name)
                    }
                    Effect::Send {
                        request: Request::PutCompletions(cs),
                        to,
                        ..
                    } => {
                        format!(
                            "send completions {:?} to {to}",
                            cs.iter()
                                .map(|c| (c.job.clone(), c.slot))
                                .collect::<Vec<_>>()
                        )
                    }
                    Effect::Persist {
                        completions, jobs, ..
                    } => format!(
                        "persist jobs {:?} completions {:?}",
                        jobs.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                        completions
                            .iter()
                            .map(|c| (c.job.clone(), c.slot))
                            .collect::<Vec<_>>()
                    ),
                    Effect::Publish { key, value } => format!("publish {key} = {value:?}"),
                    _ => String::new(),
                };
                if !text.is_empty() {
                    self.trace(i, &text);
                }
            }
            match e {
                Effect::StartInstance { driver, spec } => {
                    if self.nodes[i]
                        .store
                        .completions
                        .contains_key(&(spec.id.job.clone(), spec.id.slot))
                    {
                        let name = self.nodes[i].name.clone();
                        self.checker.rerun_known_locally(
                            &name,
                            &spec.id.job,
                            spec.id.slot,
                            "its holder",
                        );
                    }
                    let result = if self.nodes[i].machine_up {
                        self.nodes[i].driver.start(&driver, &spec)
                    } else {
                        Err("the machine is down".into())
                    };
                    match &result {
                        Ok(()) => self.on_instance_started(i, &spec),
                        Err(why) if why.contains("port") => {
                            let name = self.nodes[i].name.clone();
                            self.checker.port_clash(&name, &spec, why);
                        }
                        Err(_) => {}
                    }
                    let id = spec.id.clone();
                    self.at(
                        START_DELAY,
                        Ev::Started {
                            node: i,
                            gen,
                            id,
                            result,
                        },
                    );
                }
                Effect::StopInstance { id, .. } => {
                    let node = &mut self.nodes[i];
                    if let Some(inst) = node.driver.instances.get_mut(&id) {
                        if inst.ended.is_none() {
                            inst.stopping = true;
                            let mgen = node.mgen;
                            self.at(
                                STOP_DELAY,
                                Ev::Ended {
                                    node: i,
                                    mgen,
                                    id,
                                    state: SimDriver::stopped(),
                                },
                            );
                        }
                    }
                }
                Effect::WatchChecks { id, probes, .. } => {
                    for p in &probes {
                        self.at(
                            p.interval,
                            Ev::Check {
                                node: i,
                                gen,
                                id: id.clone(),
                                index: p.index,
                            },
                        );
                    }
                    self.nodes[i].checks.insert(id, probes);
                }
                Effect::UnwatchChecks { id } => {
                    self.nodes[i].checks.remove(&id);
                }
                Effect::RemoveInstance { id, .. } => {
                    self.nodes[i].checks.remove(&id);
                    node_remove(&mut self.nodes[i], &id)
                }
                Effect::Discard { id, .. } => {
                    self.nodes[i].checks.remove(&id);
                    if self.nodes[i].driver.end(&id, SimDriver::stopped()) {
                        self.on_instance_ended(i, &id, &SimDriver::stopped());
                    }
                    node_remove(&mut self.nodes[i], &id);
                }
                Effect::Send {
                    to,
                    addr,
                    request,
                    call,
                    timeout,
                } => {
                    let _ = to;
                    if let Request::Start { job, slots, .. } = &request {
                        for s in slots {
                            if self.nodes[i]
                                .store
                                .completions
                                .contains_key(&(job.name.clone(), *s))
                            {
                                let name = self.nodes[i].name.clone();
                                self.checker.rerun_known_locally(
                                    &name,
                                    &job.name,
                                    *s,
                                    "its coordinator",
                                );
                            }
                        }
                    }
                    if let Some(c) = call {
                        self.pending_calls.insert((i, gen, c));
                        self.at(
                            timeout,
                            Ev::CallTimeout {
                                node: i,
                                gen,
                                call: c,
                            },
                        );
                    }
                    let Some(&j) = self.by_addr.get(&addr) else {
                        continue;
                    };
                    if let Some(d) = self.hop(i, j) {
                        self.at(
                            d,
                            Ev::Request {
                                from: i,
                                to: j,
                                req: request,
                                call: call.map(|c| (gen, c)),
                            },
                        );
                    }
                }
                Effect::Reply { token, response } => self.reply(token, response),
                Effect::Persist {
                    write,
                    jobs,
                    completions,
                } => self.at(
                    FSYNC_DELAY,
                    Ev::Persisted {
                        node: i,
                        gen,
                        write,
                        jobs,
                        completions,
                    },
                ),
                Effect::Forget { jobs } => self.nodes[i].store.forget(&jobs),
                Effect::Remember { members } => self.nodes[i].store.members = members,
                Effect::Publish { key, value } => self.gossip.set_key(i, key, value),
                Effect::PublishLoad(load) => self.gossip.set_load(i, load),
                Effect::Answer { token, answer } => {
                    if let Some((_, req)) = self.api.remove(&token) {
                        match (answer, &req) {
                            // Unchanged: the job is at the submitted spec
                            // already, in that record.
                            (ApiAnswer::Written(r) | ApiAnswer::Unchanged(r), _) => {
                                self.checker.accepted(r)
                            }
                            // A retried stop whose first try took effect
                            // (its answer lost with a crashed agent): the
                            // tombstone is what the client asked for (seed
                            // 1791: the checker kept expecting the job).
                            (ApiAnswer::Failed(_), ApiRequest::Stop { name }) => {
                                let tombstone = self.nodes[i]
                                    .core
                                    .as_ref()
                                    .and_then(|c| c.desired().get(name).cloned())
                                    .filter(|r| r.spec.is_none());
                                match tombstone {
                                    Some(t) => self.checker.accepted(t),
                                    None => self.checker.writes_refused += 1,
                                }
                            }
                            (ApiAnswer::Failed(_), _) => self.checker.writes_refused += 1,
                        }
                    }
                }
                Effect::ReadLogs { to, .. } => match to {
                    LogsTo::Api(token) => {
                        self.api.remove(&token);
                    }
                    LogsTo::Peer(token) => self.reply(token, Response::Logs(Vec::new())),
                },
                Effect::FetchLogs { token, .. } => {
                    self.api.remove(&token);
                }
            }
        }
    }

    fn reply(&mut self, token: u64, response: Response) {
        let Some(r) = self.tokens.remove(&token) else {
            return;
        };
        if let Some(d) = self.hop(r.callee, r.caller) {
            self.at(
                d,
                Ev::Response {
                    to: r.caller,
                    gen: r.caller_gen,
                    call: r.call,
                    resp: response,
                },
            );
        }
    }

    fn on_instance_started(&mut self, i: usize, spec: &shoal_core::instance::InstanceSpec) {
        // partition = "majority" (batch jobs' default): a node that sees
        // itself cut off with a minority starts nothing new of the job (a
        // restart in place of a copy it runs is no new start).
        let core = self.nodes[i].core.as_ref();
        let restart = core
            .and_then(|c| c.local().get(&spec.id.job, spec.id.slot))
            .is_some_and(|l| l.restarts > 0);
        if !restart {
            let minority = core.is_some_and(|c| c.seen().minority());
            // A cron job's run follows its cron job's policy.
            let majority = self.job_spec_of(i, spec).is_some_and(|j| {
                let policy = match j.parent.as_deref() {
                    Some(p) => core
                        .and_then(|c| c.desired().spec(p))
                        .map_or(shoal_core::job::PartitionPolicy::Majority, |s| {
                            s.partition_policy()
                        }),
                    None => j.partition_policy(),
                };
                policy == shoal_core::job::PartitionPolicy::Majority
            });
            // The same against the truth (the network as it is), so that a
            // node wrong about its own side is caught too: once failure
            // detection had its time.
            if !minority && majority && self.truly_minority(i, MINORITY_SETTLE) {
                let name = self.nodes[i].name.clone();
                self.checker.violate(
                    &format!("minority start (truth): {}", spec.id.job),
                    format!(
                        "{name} reaches fewer than half of the members, and has for {:?}, yet \
                         started {} of a job whose partition policy is majority at {:.2}s",
                        self.t - self.net_changed_at,
                        spec.id,
                        self.t.as_secs_f64()
                    ),
                );
            }
            if minority && majority {
                let name = self.nodes[i].name.clone();
                self.checker.violate(
                    &format!("minority start: {}", spec.id.job),
                    format!(
                        "{name}, cut off with a minority, started {} of a job whose partition policy is majority at {:.2}s",
                        spec.id,
                        self.t.as_secs_f64()
                    ),
                );
            }
        }
        if let (Some(d), Some(at)) = (self.drained, self.update_at) {
            // Every node has the drain's record within gossip's lag.
            if d == i && self.t > at + Duration::from_secs(3) {
                self.checker.violate(
                    "drain",
                    format!(
                        "{} started {} on the draining node {:?} after the drain",
                        self.nodes[i].name,
                        spec.id,
                        self.t - at
                    ),
                );
            }
        }
        // partition = "never": no other copy of the slot runs anywhere,
        // whatever the faults (a stopping copy's process still runs).
        let never = self
            .checker
            .accepted
            .get(&spec.id.job)
            .and_then(|r| r.spec.as_ref())
            .is_some_and(|j| j.partition_policy() == shoal_core::job::PartitionPolicy::Never);
        if never {
            self.never_starts += 1;
            let others: Vec<String> = self
                .running()
                .iter()
                .filter(|r| {
                    r.node != i && r.spec.id.job == spec.id.job && r.spec.id.slot == spec.id.slot
                })
                .map(|r| self.nodes[r.node].name.to_string())
                .collect();
            if !others.is_empty() {
                let name = self.nodes[i].name.clone();
                self.checker.violate(
                    &format!("never twice: {}.{}", spec.id.job, spec.id.slot),
                    format!(
                        "never twice: {}.{} started on {name} at {:.2}s while it runs on {}",
                        spec.id.job,
                        spec.id.slot,
                        self.t.as_secs_f64(),
                        others.join(", ")
                    ),
                );
            }
        }
        let job = self.job_spec_of(i, spec);
        let running: Vec<Running> = self.nodes[i]
            .driver
            .running()
            .filter(|r| r.spec.id != spec.id)
            .map(|r| Running {
                node: i,
                spec: &r.spec,
                stopping: r.stopping,
            })
            .collect();
        let (t, name, labels) = (
            self.t,
            self.nodes[i].name.clone(),
            self.nodes[i].labels.clone(),
        );
        self.checker
            .started(t, i, &name, &labels, spec, job.as_ref(), &running);
        // A batch task's run, modelled.
        let mgen = self.nodes[i].mgen;
        let end = match behaviour(spec) {
            Behaviour::Succeed(d) => Some((
                d,
                InstanceState::Exited(shoal_core::instance::ExitStatus::code(0)),
            )),
            Behaviour::Fail(d) => Some((
                d,
                InstanceState::Exited(shoal_core::instance::ExitStatus::code(1)),
            )),
            _ => None,
        };
        if let Some((d, state)) = end {
            self.at(
                d,
                Ev::Ended {
                    node: i,
                    mgen,
                    id: spec.id.clone(),
                    state,
                },
            );
        }
    }

    /// A coordinator's round placed `starts` ((node, slot)) of `job`: with
    /// the job's copies running now (not stopping), the copies per value of
    /// its spread label, over the values of up nodes that satisfy its
    /// constraints, must stay within the skew.
    fn check_spread(&mut self, job: &str, starts: &[(usize, u32)]) {
        let Some(spec) = self.checker.accepted.get(job).and_then(|r| r.spec.clone()) else {
            return;
        };
        let Some(spread) = spec.spread.clone() else {
            return;
        };
        let req = spec.slot_request(0);
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.agent_up && n.machine_up) {
            let mut probe = shoal_placement::Node::new(n.name.to_string(), 0, 0);
            probe.labels = n.labels.clone();
            if req.constraints.iter().all(|c| c.holds(&probe)) {
                if let Some(v) = n.labels.get(&spread.label) {
                    counts.entry(v.clone()).or_insert(0);
                }
            }
        }
        let placed: BTreeSet<u32> = starts.iter().map(|(_, s)| *s).collect();
        let add = |n: &SimNode, counts: &mut BTreeMap<String, u32>| {
            if let Some(c) = n.labels.get(&spread.label).and_then(|v| counts.get_mut(v)) {
                *c += 1;
            }
        };
        for n in &self.nodes {
            for inst in n.driver.running() {
                if inst.spec.id.job == job
                    && !inst.stopping
                    && inst.spec.id.slot < spec.replicas
                    && !placed.contains(&inst.spec.id.slot)
                {
                    add(n, &mut counts);
                }
            }
        }
        for (node, _) in starts {
            add(&self.nodes[*node], &mut counts);
        }
        let (Some(min), Some(max)) = (counts.values().min(), counts.values().max()) else {
            return;
        };
        let raised = starts.iter().any(|(node, _)| {
            self.nodes[*node]
                .labels
                .get(&spread.label)
                .and_then(|v| counts.get(v))
                .is_some_and(|c| c - min > spread.max_skew)
        });
        if max - min > spread.max_skew && raised {
            let t = self.t;
            let msg = format!(
                "{job}: a round placed slots {:?} leaving the copies per `{}` at {counts:?} (max skew {})",
                placed, spread.label, spread.max_skew
            );
            self.checker.spread_exceeded(t, msg);
        }
    }

    fn on_instance_ended(&mut self, _i: usize, id: &InstanceId, state: &InstanceState) {
        if matches!(state, InstanceState::Exited(s) if s.success()) {
            let t = self.t;
            self.checker.exited_ok(t, &id.job, id.slot);
        }
    }

    /// The spec of the job version an instance runs.
    fn job_spec_of(&self, i: usize, spec: &shoal_core::instance::InstanceSpec) -> Option<JobSpec> {
        // The instance carries its task; the job-level rules come from the
        // record of that version: the one its holder started it from
        // (a coordinator's revert is no API's answer), else the one the
        // accepting API answered.
        let held = self.nodes[i]
            .core
            .as_ref()
            .and_then(|c| c.desired().get(&spec.id.job))
            .filter(|r| r.version == spec.job_version);
        let rec = held.or_else(|| self.checker.accepted.get(&spec.id.job))?;
        let mut job = rec.spec.clone()?;
        job.task = spec.task.clone();
        Some(job)
    }

    // ---- views ----

    fn refresh(&mut self, i: usize) {
        let comp = self.gossip_of[i];
        let lag = Duration::from_micros(
            self.rng
                .random_range(0..=self.opts.gossip_lag_max.as_micros() as u64),
        );
        let want = self.t.saturating_sub(lag);
        let epoch = self
            .gossip
            .lineages
            .get(&comp)
            .and_then(|l| l.at_or_before(want).or_else(|| l.epochs.front()))
            .cloned();
        let Some(mut epoch) = epoch else { return };
        let newer_epoch = self.nodes[i].held.as_ref().is_none_or(|h| epoch.at > h.at);
        if !newer_epoch {
            if let Some(h) = &self.nodes[i].held {
                epoch = h.clone();
            }
        }
        let members = match self.opts.membership {
            MembershipMode::Swim => {
                if newer_epoch {
                    self.swim_observe(i, &epoch.peers);
                }
                let changes = self.nodes[i]
                    .swim
                    .as_ref()
                    .map(|s| s.changes())
                    .unwrap_or(0);
                if !newer_epoch && changes == self.nodes[i].view_swim {
                    return;
                }
                if changes != self.nodes[i].view_swim {
                    self.nodes[i].view_swim = changes;
                    self.nodes[i].members = self.swim_members(i);
                }
                self.nodes[i].members.clone()
            }
            MembershipMode::Oracle => {
                if !newer_epoch {
                    return;
                }
                self.oracle
                    .get(&self.component_of[i])
                    .cloned()
                    .unwrap_or_default()
            }
        };
        if newer_epoch {
            self.nodes[i].held = Some(epoch.clone());
        }
        let view = ClusterView {
            members,
            loads: epoch.loads.clone(),
            index: epoch.index.clone(),
        };
        let gen = self.nodes[i].gen;
        let now = self.now(i);
        self.with_core(i, gen, |core| core.handle_view(view, now));
    }

    fn member_view(&self, j: usize, state: NodeState, generation: u64) -> MemberView {
        MemberView {
            name: self.nodes[j].name.clone(),
            generation,
            state,
            record: self.nodes[j].record.clone(),
        }
    }

    /// SWIM takes in what gossip says of each node (generation,
    /// incarnation, leave), as the agent does from spread.
    fn swim_observe(&mut self, i: usize, peers: &[gossip::Peer]) {
        let mono = self.mono();
        for (j, p) in peers.iter().enumerate() {
            if j == i || p.generation == 0 || self.nodes[i].observed[j] == *p {
                continue;
            }
            let seen = self.nodes[i].observed[j];
            self.nodes[i].observed[j] = *p;
            if (seen.generation, seen.incarnation, seen.left)
                == (p.generation, p.incarnation, p.left)
            {
                continue;
            }
            let (name, addr) = (self.nodes[j].name.clone(), self.nodes[j].addr);
            if let Some(swim) = self.nodes[i].swim.as_mut() {
                swim.observe(&name, p.generation, addr, p.incarnation, p.left, mono);
            }
        }
    }

    fn swim_members(&self, i: usize) -> Arc<Members> {
        let mut list = vec![self.member_view(i, NodeState::Alive, self.nodes[i].gen)];
        if let Some(swim) = &self.nodes[i].swim {
            for m in swim.members() {
                let Some(&j) = self.by_addr.get(&m.addr) else {
                    continue;
                };
                list.push(self.member_view(j, m.state, m.generation));
            }
        }
        Arc::new(Members::new(list))
    }

    /// A node's liveness changed (oracle membership): its new state shows
    /// after SWIM's measured delays.
    fn oracle_changed(&mut self) {
        self.net_changed_at = self.t;
        if self.opts.membership != MembershipMode::Oracle {
            return;
        }
        // One rebuild per instant however many nodes changed at it (a
        // tenth of 10,000 nodes killed at once is one rebuild, not 1,000).
        for d in [Duration::ZERO, ORACLE_SUSPECT, ORACLE_DEAD] {
            if self.oracle_pending.insert(self.t + d) {
                self.at(d, Ev::OracleRebuild);
            }
        }
    }

    /// Oracle membership: members as each network component sees them, a
    /// failure showing as suspect after ~0.2 s and dead after ~0.7 s (the
    /// SWIM detector's measured timings), shared by the component's nodes.
    fn oracle_rebuild(&mut self) {
        let comps: BTreeSet<u32> = self.component_of.iter().copied().collect();
        let mut out = BTreeMap::new();
        for c in comps {
            let list: Vec<MemberView> = (0..self.nodes.len())
                .map(|j| {
                    let unreachable_since = match self.down_since[j] {
                        Some(d) => Some(d),
                        None if self.component_of[j] != c => Some(self.split_since),
                        None => None,
                    };
                    let state = match unreachable_since {
                        None => NodeState::Alive,
                        Some(u) => {
                            let d = self.t.saturating_sub(u);
                            if d < ORACLE_SUSPECT {
                                NodeState::Alive
                            } else if d < ORACLE_DEAD {
                                NodeState::Suspect
                            } else {
                                NodeState::Dead
                            }
                        }
                    };
                    self.member_view(j, state, self.nodes[j].gen)
                })
                .collect();
            out.insert(c, Arc::new(Members::new(list)));
        }
        self.oracle = out;
    }

    // ---- the checker's view of the ground truth ----

    fn running(&self) -> Vec<Running<'_>> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.machine_up {
                continue;
            }
            for inst in n.driver.running() {
                out.push(Running {
                    node: i,
                    spec: &inst.spec,
                    stopping: inst.stopping,
                });
            }
        }
        out
    }

    fn sample(&mut self) {
        if let (
            Workload::Drain {
                replicas, deadline, ..
            },
            Some(_),
            Some(at),
        ) = (self.opts.workload.clone(), self.drained, self.update_at)
        {
            // Until the deadline (after it, what is left stops), as the
            // clocks that set it and read it may be skewed.
            let skew = Duration::from_millis(2 * self.opts.skew_max_ms.unsigned_abs());
            if self.update_done_at.is_none() && self.t + skew < at + deadline {
                let serving = self.roll_copies().0.len() as u32;
                let min = self.update_min_serving.map_or(serving, |m| m.min(serving));
                self.update_min_serving = Some(min);
                if serving < replicas {
                    self.checker.violate(
                        "drain capacity",
                        format!(
                            "{serving} of {replicas} slots served at {:.2}s during a drain",
                            self.t.as_secs_f64()
                        ),
                    );
                }
            }
        }
        if let Workload::Update {
            replicas,
            max_parallel,
            stop_first,
            canary,
            ..
        } = self.opts.workload.clone()
        {
            if self.update_at.is_some() && self.update_done_at.is_none() {
                let serving = self.roll_copies().0.len() as u32;
                let min = self.update_min_serving.map_or(serving, |m| m.min(serving));
                self.update_min_serving = Some(min);
                let floor = if stop_first {
                    replicas.saturating_sub(max_parallel.max(canary))
                } else {
                    replicas
                };
                if serving < floor {
                    self.checker.violate(
                        "update capacity",
                        format!(
                            "{serving} of {replicas} slots served at {:.2}s during a {} update (floor {floor})",
                            self.t.as_secs_f64(),
                            if stop_first { "stop-first" } else { "start-first" }
                        ),
                    );
                }
            }
        }
        // The copies of a slot that run one task (an old and a new copy of
        // a slot side by side are a start-first update's surge, not a
        // duplicate): per slot, the largest such group.
        let mut groups: BTreeMap<(String, u32, u64), Vec<usize>> = BTreeMap::new();
        for r in self.running() {
            groups
                .entry((
                    r.spec.id.job.clone(),
                    r.spec.id.slot,
                    r.spec.task.fingerprint(),
                ))
                .or_default()
                .push(r.node);
        }
        let mut holders: BTreeMap<(String, u32), Vec<usize>> = BTreeMap::new();
        for ((job, slot, _), nodes) in groups {
            let h = holders.entry((job, slot)).or_default();
            if nodes.len() > h.len() {
                *h = nodes;
            }
        }
        let t = self.t;
        self.checker.sample(t, &holders);
    }

    /// Per system job, the nodes that must run it: up (machine and
    /// agent), meeting its constraints, and not saying it does not fit
    /// them.
    fn system_expected(&self) -> BTreeMap<String, BTreeSet<usize>> {
        let mut out = BTreeMap::new();
        for (name, rec) in &self.checker.accepted {
            let Some(spec) = rec
                .spec
                .as_ref()
                .filter(|s| s.job_type == shoal_core::job::JobType::System)
            else {
                continue;
            };
            let req = spec.slot_request(shoal_core::system::SLOT);
            let nodes = (0..self.nodes.len())
                .filter(|i| {
                    let n = &self.nodes[*i];
                    let Some(core) = n.core.as_ref().filter(|_| n.machine_up && n.agent_up) else {
                        return false;
                    };
                    let mut view = shoal_placement::Node::new(n.name.to_string(), 0, 0);
                    view.labels = n.labels.clone();
                    req.constraints.iter().all(|c| c.holds(&view))
                        && core
                            .placing()
                            .backoff_of(name, shoal_core::system::SLOT)
                            .is_none()
                })
                .collect();
            out.insert(name.clone(), nodes);
        }
        out
    }

    fn converged(&self) -> bool {
        self.checker
            .mismatches(&self.running(), 1, &self.system_expected())
            .is_empty()
    }

    // ---- workload ----

    fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].agent_up && !self.paused(*i))
            .collect()
    }

    fn api_call(&mut self, req: ApiRequest) {
        let up = self.up_nodes();
        if up.is_empty() {
            return;
        }
        let i = up[self.rng.random_range(0..up.len())];
        self.next_api += 1;
        let token = self.next_api;
        let gen = self.nodes[i].gen;
        self.api.insert(token, (i, req.clone()));
        let now = self.now(i);
        self.with_core(i, gen, |core| core.handle_api(token, req, now));
    }

    fn service_text(&mut self, name: &str) -> String {
        let n = self.nodes.len() as u32;
        let kind = self.rng.random_range(0..10);
        let replicas = self.rng.random_range(1..=6u32).min(n.max(1));
        let mut extra = String::new();
        let mut task_extra = String::new();
        let mut checks = String::new();
        let replicas = match kind {
            // One replica per node.
            0 => {
                extra.push_str("distinct_hosts = true\n");
                replicas.min(n.saturating_sub(2).max(1))
            }
            // A static host port: at most one per node.
            1 if self.next_job.is_multiple_of(2) => {
                task_extra.push_str(&format!(
                    "ports = {{ http = {} }}\n",
                    8000 + self.next_job % 1000
                ));
                extra.push_str("[update]\norder = \"stop-first\"\n");
                replicas.min(n.saturating_sub(2).max(1))
            }
            // Dynamic ports: any number per node, each copy its own (the
            // simulated nodes own a small range, so ports are reused).
            // Checked on a port (restarted when critical); one in three
            // never passes and runs on critical, unrestarted (a restart
            // loop never converges to running).
            1 => {
                task_extra.push_str("ports = { http = 0, admin = 0 }\n");
                let failing = self.rng.random_range(0..3) == 0;
                if failing {
                    task_extra.push_str("env = { SIM_HEALTH = \"fail\" }\n");
                }
                checks.push_str(&format!(
                    "[[task.check]]\ntype = \"tcp\"\nport = \"http\"\ninterval = \"1s\"\ngrace = \"0s\"\nfailures = 2\nrestart = {}\n",
                    !failing
                ));
                // Served: every such job pools its copies into `web`
                // (gated by the check) and `admin` (not gated); the
                // catalog is checked at the end (`catalog_mismatch`).
                checks.push_str(
                    "[[service]]\nname = \"web\"\nport = \"http\"\ntags = [\"sim\"]\n[[service]]\nname = \"admin\"\nport = \"admin\"\nchecks = []\n",
                );
                replicas
            }
            // Only on zones a and b.
            2 => {
                extra.push_str(
                    "[[constraints]]\nlabel = \"zone\"\nop = \"in\"\nvalues = [\"a\", \"b\"]\n",
                );
                replicas
            }
            // Spread over zones.
            3 => {
                extra.push_str("[spread]\nlabel = \"zone\"\nmax_skew = 1\n");
                replicas
            }
            // Rolling updates of every kind.
            4..=6 => {
                let order = if self.rng.random_range(0..2) == 0 {
                    "start-first"
                } else {
                    "stop-first"
                };
                let mp = self.rng.random_range(1..=3u32);
                extra.push_str(&format!(
                    "[update]\nmax_parallel = {mp}\norder = \"{order}\"\n"
                ));
                replicas
            }
            // A side cut off with a minority starts none of it.
            7 => {
                extra.push_str("partition = \"majority\"\n");
                replicas
            }
            // Never two copies of a slot (see `on_instance_started`).
            8 => {
                extra.push_str("partition = \"never\"\n");
                replicas.min(3)
            }
            _ => replicas,
        };
        let (head, tables) = match extra.find('[') {
            Some(p) => (extra[..p].to_string(), extra[p..].to_string()),
            None => (extra.clone(), String::new()),
        };
        format!(
            "name = \"{name}\"\ntype = \"service\"\nreplicas = {replicas}\n{head}[task]\ncommand = \"sleep\"\nargs = [\"v{}\"]\n{task_extra}[task.resources]\ncpu = 50\nmemory = 32\n{tables}{checks}",
            self.rng.random_range(0..3)
        )
    }

    fn batch_text(&mut self, name: &str) -> String {
        let replicas = self.rng.random_range(1..=4u32);
        let secs = self.rng.random_range(1..=4u32);
        format!(
            "name = \"{name}\"\ntype = \"batch\"\nreplicas = {replicas}\n[task]\ncommand = \"sim-batch\"\nargs = [\"{secs}s\"]\n[task.resources]\ncpu = 50\nmemory = 32\n"
        )
    }

    fn new_name(&mut self, prefix: &str) -> String {
        self.next_job += 1;
        format!("{prefix}{}", self.next_job)
    }

    fn initial_workload(&mut self) {
        match self.opts.workload.clone() {
            Workload::Mixed => {
                let services = (self.nodes.len() / 10).clamp(4, 30);
                for _ in 0..services {
                    let name = self.new_name("svc");
                    let text = self.service_text(&name);
                    self.api_call(ApiRequest::Submit {
                        text,
                        check_version: None,
                    });
                }
                // System jobs: one on every node, one on zone a only. Up
                // to SYSTEM_JOBS_NODES_MAX nodes: each copy is gossip state
                // every simulated node indexes, and at 500 nodes their
                // 670 copies made the run 4x slower (48 s to 208 s).
                let system: &[(&str, &str)] = if self.nodes.len() <= SYSTEM_JOBS_NODES_MAX {
                    &[
                        ("sys-all", ""),
                        (
                            "sys-a",
                            "[[constraints]]\nlabel = \"zone\"\nop = \"=\"\nvalue = \"a\"\n",
                        ),
                    ]
                } else {
                    &[]
                };
                for &(name, constraint) in system {
                    self.api_call(ApiRequest::Submit {
                        text: system_text(name, 1, constraint, self.nodes.len()),
                        check_version: None,
                    });
                }
                // A cron job: every 10 s, a run of 1 s (see `check_cron`).
                // Up to SYSTEM_JOBS_NODES_MAX nodes too: its submission
                // draws from the RNG, and the 500-node seed 42 of `.ci/run`
                // drawn differently ran into a fault sequence whose
                // membership churn took 754 s instead of 45 s (Members::new
                // and SWIM ticks, not cron, in the profile).
                if self.nodes.len() <= SYSTEM_JOBS_NODES_MAX {
                    self.api_call(ApiRequest::Submit {
                        text: CRON_TEXT.to_string(),
                        check_version: None,
                    });
                }
                for _ in 0..2 {
                    let name = self.new_name("batch");
                    let text = self.batch_text(&name);
                    self.api_call(ApiRequest::Submit {
                        text,
                        check_version: None,
                    });
                }
            }
            Workload::Bulk { .. } => self.at(BULK_AT, Ev::Submit),
            Workload::Drain { .. } => {
                for text in [
                    self.drain_text(1),
                    // Batch runs far longer than the drain's deadline.
                    format!(
                        "name = \"long\"\ntype = \"batch\"\nreplicas = {}\n[task]\ncommand = \"sim-batch\"\nargs = [\"1000s\"]\n[task.resources]\ncpu = 50\nmemory = 32\n",
                        self.nodes.len()
                    ),
                    system_text("sys-all", 1, "", self.nodes.len()),
                ] {
                    self.api_call(ApiRequest::Submit {
                        text,
                        check_version: None,
                    });
                }
            }
            Workload::Update { .. } => {
                let text = self.roll_text(1);
                self.api_call(ApiRequest::Submit {
                    text,
                    check_version: None,
                });
            }
        }
    }

    /// The update workload's job, version `v`.
    fn roll_text(&self, v: u32) -> String {
        let Workload::Update {
            replicas,
            max_parallel,
            stop_first,
            version,
            canary,
        } = self.opts.workload.clone()
        else {
            return String::new();
        };
        let new = v > 1;
        format!(
            "name = \"roll\"\ntype = \"service\"\nreplicas = {replicas}\n{}[task]\ncommand = \"sleep\"\nargs = [\"v{v}\"]\nports = {{ http = 0 }}\n{}[task.resources]\ncpu = 50\nmemory = 32\n\
             [[task.check]]\ntype = \"tcp\"\nport = \"http\"\ninterval = \"500ms\"\ngrace = \"0s\"\nfailures = 2\n\
             [update]\nmax_parallel = {max_parallel}\norder = \"{}\"\nmin_healthy_time = \"{}\"\nhealthy_deadline = \"10s\"\nprogress_deadline = \"{}\"\ncanary = {canary}\nauto_revert = {}\n",
            if new && version == NewVersion::Stuck {
                "[[constraints]]\nlabel = \"nowhere\"\nop = \"=\"\nvalue = \"yes\"\n"
            } else {
                ""
            },
            if new && version == NewVersion::Broken {
                "env = { SIM_HEALTH = \"fail\" }\n"
            } else if version == NewVersion::Twice && v == 2 {
                // The first of two versions serves only after 8 checks
                // (4 s), so that its slots are still down well after the
                // second is written (beyond `update_settle`).
                "env = { SIM_HEALTH = \"slow=8\" }\n"
            } else {
                ""
            },
            if stop_first { "stop-first" } else { "start-first" },
            "1s",
            // Stuck: the copies never get placed, so only this catches it;
            // else beyond healthy_deadline, which fails a broken one first.
            if version == NewVersion::Stuck { "8s" } else { "30s" },
            version != NewVersion::Good,
        )
    }

    /// The update workload's copies as their holders know them: per slot,
    /// whether a copy serves (runs, passes, is not stopping), and the
    /// version (args) of each live copy and whether it is ready.
    fn roll_copies(&self) -> (BTreeSet<u32>, Vec<(u32, String, bool)>) {
        let mut serving = BTreeSet::new();
        let mut copies = Vec::new();
        for n in &self.nodes {
            let Some(core) = n.core.as_ref().filter(|_| n.agent_up && n.machine_up) else {
                continue;
            };
            for l in core.local().of_job("roll") {
                if !l.state.is_live() || l.stopping {
                    continue;
                }
                let runs = n
                    .driver
                    .instances
                    .get(&l.id)
                    .is_some_and(|i| i.ended.is_none());
                let version = l
                    .record
                    .spec
                    .as_ref()
                    .filter(|s| s.task.fingerprint() == l.task)
                    .and_then(|s| s.task.args.first().cloned())
                    .unwrap_or_else(|| "old".into());
                if runs
                    && l.state == shoal_core::instance::SlotState::Running
                    && l.health() == shoal_core::health::Health::Passing
                {
                    serving.insert(l.id.slot);
                }
                copies.push((l.id.slot, version, l.ready));
            }
        }
        (serving, copies)
    }

    /// The update workload's step: submit the new version once every slot
    /// is ready, promote its canaries once they are, then watch it finish
    /// (or, broken or stuck, stay on its first slots and be reverted).
    fn roll_step(&mut self) {
        let Workload::Update {
            replicas,
            max_parallel,
            version,
            canary,
            ..
        } = self.opts.workload.clone()
        else {
            return;
        };
        let (_, copies) = self.roll_copies();
        let ready_of = |v: &str| {
            copies
                .iter()
                .filter(|(_, ver, ready)| ver == v && *ready)
                .map(|(s, _, _)| *s)
                .collect::<BTreeSet<u32>>()
        };
        let Some(at) = self.update_at else {
            if ready_of("v1").len() as u32 == replicas {
                let text = self.roll_text(2);
                self.api_call(ApiRequest::Submit {
                    text,
                    check_version: None,
                });
                self.update_at = Some(self.t);
            } else if self.t > Duration::from_secs(120) {
                self.checker
                    .violate("update", "the first version never got ready".to_string());
                self.phase = Phase::Done;
            }
            return;
        };
        let on_v2: BTreeSet<u32> = copies
            .iter()
            .filter(|(_, v, _)| v == "v2")
            .map(|(s, _, _)| *s)
            .collect();
        let took = self.t.saturating_sub(at);
        let twice = version == NewVersion::Twice;
        let v2_ready = ready_of("v2").len() as u32;
        if twice
            && self.second_at.is_none()
            && v2_ready >= max_parallel
            && on_v2.len() as u32 > v2_ready
        {
            // v2 has rolled max_parallel slots and has a copy placed but
            // not ready (under stop-first, its slot is down): write v3
            // now, whose slot-order window holds only slots v2 serves.
            let text = self.roll_text(3);
            self.api_call(ApiRequest::Submit {
                text,
                check_version: None,
            });
            self.second_at = Some(self.t);
        }
        let (target, target_seq) = if twice && self.second_at.is_some() {
            ("v3", 3)
        } else {
            ("v2", 2)
        };
        let promoted = self
            .roll_records()
            .any(|r| r.seq == target_seq && r.promoted);
        // Before its canaries are promoted, a version moves only them; a
        // version that never gets ready moves at most its window.
        let most = if twice {
            None
        } else if canary > 0 && (!promoted || version != NewVersion::Good) {
            Some((canary, "canaries"))
        } else if version != NewVersion::Good {
            Some((max_parallel, "max_parallel"))
        } else {
            None
        };
        if let Some((most, what)) = most.filter(|(m, _)| on_v2.len() as u32 > *m) {
            self.checker.violate(
                "update",
                format!(
                    "v2 reached {} slots ({what} {most}, promoted {promoted})",
                    on_v2.len()
                ),
            );
            self.phase = Phase::Done;
            return;
        }
        if version == NewVersion::Good || twice {
            if canary > 0
                && !promoted
                && self
                    .promote_tried
                    .is_none_or(|t| self.t >= t + Duration::from_secs(1))
                && self.roll_awaiting_promotion()
            {
                self.promote_tried = Some(self.t);
                self.api_call(ApiRequest::Promote {
                    name: "roll".into(),
                });
            }
            let marked = self.roll_all(|r| {
                r.seq == target_seq
                    && r.deployment == Some(shoal_core::records::Outcome::Successful)
            });
            if ready_of(target).len() as u32 == replicas
                && copies.len() as u32 == replicas
                && marked
            {
                self.update_done_at = Some(self.t);
                self.phase = Phase::Done;
            } else if took > Duration::from_secs(180) {
                self.checker.violate(
                    "update",
                    format!(
                        "the update did not finish in {took:?}: {} of {replicas} slots ready on {target}, {} copies, marked successful everywhere: {marked}",
                        ready_of(target).len(),
                        copies.len()
                    ),
                );
                self.phase = Phase::Done;
            }
            return;
        }
        // Reverted (v3, the spec of v1) everywhere, v2's deployment
        // recorded as failed for the right reason, every slot on v1 alone.
        let why = if version == NewVersion::Broken {
            shoal_core::records::Outcome::FailedUnhealthy
        } else {
            shoal_core::records::Outcome::FailedNoProgress
        };
        let reverted = self.roll_all(|r| {
            r.reverted_from == Some(2)
                && r.history
                    .first()
                    .is_some_and(|e| e.seq == 2 && e.outcome == Some(why))
        });
        if reverted && ready_of("v1").len() as u32 == replicas && copies.len() as u32 == replicas {
            self.update_done_at = Some(self.t);
            self.phase = Phase::Done;
        } else if took > Duration::from_secs(90) {
            self.checker.violate(
                "update",
                format!(
                    "the {version:?} version was not reverted as {why:?} in {took:?}: reverted everywhere {reverted}, {} slots ready on v1, {} copies, records {:?}",
                    ready_of("v1").len(),
                    copies.len(),
                    self.roll_records()
                        .map(|r| (r.seq, r.reverted_from, r.deployment, r.history.first().map(|e| (e.seq, e.outcome))))
                        .collect::<Vec<_>>()
                ),
            );
            self.phase = Phase::Done;
        }
    }

    /// The drain workload's service, version `v` (v2 with a canary).
    fn drain_text(&self, v: u32) -> String {
        let Workload::Drain {
            replicas,
            max_parallel,
            ..
        } = self.opts.workload.clone()
        else {
            return String::new();
        };
        format!(
            "name = \"roll\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ncommand = \"sleep\"\nargs = [\"v{v}\"]\nports = {{ http = 0 }}\n[task.resources]\ncpu = 50\nmemory = 32\n\
             [[task.check]]\ntype = \"tcp\"\nport = \"http\"\ninterval = \"500ms\"\ngrace = \"0s\"\nfailures = 2\n\
             [update]\nmax_parallel = {max_parallel}\nmin_healthy_time = \"1s\"\ncanary = {}\n",
            u32::from(v > 1)
        )
    }

    /// Live copies on node `i` by job, as its driver runs them (not
    /// stopping).
    fn copies_on(&self, i: usize) -> BTreeMap<String, usize> {
        let mut by_job = BTreeMap::new();
        for r in self
            .running()
            .into_iter()
            .filter(|r| r.node == i && !r.stopping)
        {
            *by_job.entry(r.spec.id.job.clone()).or_insert(0) += 1;
        }
        by_job
    }

    /// The drain workload's step: once every slot runs (the service's
    /// ready), drain the node holding the most service copies; then
    /// watch its batch copies run to the deadline, its system copy
    /// outlast the rest, and the node empty with every slot elsewhere.
    fn drain_step(&mut self) {
        let Workload::Drain {
            replicas,
            deadline,
            paused_update,
            ..
        } = self.opts.workload.clone()
        else {
            return;
        };
        let n = self.nodes.len();
        let Some(node) = self.drained else {
            let (_, copies) = self.roll_copies();
            let ready_of =
                |v: &str| copies.iter().filter(|(_, ver, r)| ver == v && *r).count() as u32;
            let ready = if paused_update {
                // v2's canary ready (never promoted), the rest on v1.
                if self.second_at.is_none() {
                    if ready_of("v1") == replicas {
                        let text = self.drain_text(2);
                        self.api_call(ApiRequest::Submit {
                            text,
                            check_version: None,
                        });
                        self.second_at = Some(self.t);
                    }
                    return;
                }
                if ready_of("v2") == 1 {
                    ready_of("v1") + 1
                } else {
                    0
                }
            } else {
                ready_of("v1")
            };
            let per_node: Vec<BTreeMap<String, usize>> =
                (0..n).map(|i| self.copies_on(i)).collect();
            let count = |job: &str| {
                per_node
                    .iter()
                    .map(|m| m.get(job).copied().unwrap_or(0))
                    .sum::<usize>()
            };
            if ready == replicas && count("long") == n && count("sys-all") == n {
                let target = (0..n)
                    .max_by_key(|i| (per_node[*i].get("roll").copied().unwrap_or(0), n - i))
                    .unwrap_or(0);
                self.drained = Some(target);
                self.drained_batch = per_node[target].get("long").copied().unwrap_or(0);
                self.update_at = Some(self.t);
                let name = self.nodes[target].name.clone();
                self.api_call(ApiRequest::Node {
                    node: name.to_string(),
                    change: shoal_core::scheduler::NodeChange::Drain {
                        deadline,
                        keep_system: false,
                    },
                });
            } else if self.t > Duration::from_secs(120) {
                self.checker
                    .violate("drain", "the jobs never all ran".to_string());
                self.phase = Phase::Done;
            }
            return;
        };
        let Some(at) = self.update_at else { return };
        let took = self.t.saturating_sub(at);
        let on = self.copies_on(node);
        let other = on
            .iter()
            .filter(|(j, _)| *j != "sys-all")
            .map(|(_, k)| k)
            .sum::<usize>();
        let batch = on.get("long").copied().unwrap_or(0);
        // A stop takes up to the grace; the system copy goes after.
        let slack = Duration::from_secs(1);
        if took + slack < deadline && batch < self.drained_batch {
            self.checker.violate(
                "drain",
                format!("a batch copy on the draining node stopped {took:?} into a {deadline:?} deadline"),
            );
            self.phase = Phase::Done;
            return;
        }
        if other > 0 && !on.contains_key("sys-all") {
            self.checker.violate(
                "drain",
                format!("the system copy stopped before the node's other copies: {on:?}"),
            );
            self.phase = Phase::Done;
            return;
        }
        if !on.contains_key("roll") && self.drained_services_at.is_none() {
            self.drained_services_at = Some(self.t);
        }
        // Given time (a move takes a few seconds), the service copies all
        // move before the deadline, whatever version they run: none is
        // left for the deadline to stop.
        let skew = Duration::from_millis(2 * self.opts.skew_max_ms.unsigned_abs());
        if deadline >= Duration::from_secs(20)
            && self.drained_services_at.is_none()
            && took + skew >= deadline
        {
            self.checker.violate(
                "drain",
                format!("service copies were still on the draining node at the deadline: {on:?}"),
            );
            self.phase = Phase::Done;
            return;
        }
        if on.is_empty() && self.drained_empty_at.is_none() {
            self.drained_empty_at = Some(self.t);
        }
        // What is left stops at the deadline, within the stop grace.
        let grace = self.opts.scheduler.stop_grace + Duration::from_secs(2);
        if !on.is_empty() && took > deadline + grace {
            self.checker.violate(
                "drain",
                format!("the node still runs {on:?} {took:?} after a {deadline:?} drain"),
            );
            self.phase = Phase::Done;
            return;
        }
        let (serving, copies) = self.roll_copies();
        let ready = copies.iter().filter(|(_, _, r)| *r).count() as u32;
        let elsewhere = |job: &str| {
            (0..n)
                .filter(|i| *i != node)
                .map(|i| self.copies_on(i).get(job).copied().unwrap_or(0))
                .sum::<usize>()
        };
        let drained_everywhere = self.nodes.iter().filter_map(|x| x.core.as_ref()).all(|c| {
            c.node_statuses(self.mono())
                .iter()
                .any(|s| *s.node == *self.nodes[node].name && s.drained())
        });
        if on.is_empty()
            && ready == replicas
            && serving.len() as u32 == replicas
            && copies.len() as u32 == replicas
            && elsewhere("long") == n
            && drained_everywhere
        {
            self.update_done_at = Some(self.t);
            self.phase = Phase::Done;
        } else if took > deadline + Duration::from_secs(15) {
            self.checker.violate(
                "drain",
                format!(
                    "the node was not drained {took:?} after a {deadline:?} drain: left {on:?}, {ready} of {replicas} service slots ready in {} copies, {} batch copies elsewhere, drained at every node: {drained_everywhere}",
                    copies.len(),
                    elsewhere("long"),
                ),
            );
            self.phase = Phase::Done;
        }
    }

    /// The update workload's record at every up node.
    fn roll_records(&self) -> impl Iterator<Item = &Arc<shoal_core::records::JobRecord>> {
        self.nodes
            .iter()
            .filter(|n| n.agent_up)
            .filter_map(|n| n.core.as_ref())
            .filter_map(|c| c.desired().get("roll"))
    }

    /// Whether every up node holds the update workload's record and it
    /// passes `f` at each.
    fn roll_all(&self, f: impl Fn(&shoal_core::records::JobRecord) -> bool) -> bool {
        let up = self
            .nodes
            .iter()
            .filter(|n| n.agent_up && n.core.is_some())
            .count();
        let records: Vec<_> = self.roll_records().collect();
        records.len() == up && records.iter().all(|r| f(r))
    }

    /// Whether some up node sees the update waiting for its canaries'
    /// promotion.
    fn roll_awaiting_promotion(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.agent_up && n.machine_up)
            .filter_map(|n| n.core.as_ref())
            .any(|c| {
                c.desired().get("roll").is_some_and(|r| {
                    let copies = c.copies_of("roll", self.mono());
                    shoal_core::deployment::of(r, copies.iter().map(|(_, p)| p))
                        .is_some_and(|d| d.awaiting_promotion)
                })
            })
    }

    /// The benchmark's submission: every job at once, at random nodes.
    fn bulk_submit(&mut self) {
        if let Workload::Bulk { jobs, replicas } = self.opts.workload.clone() {
            self.submitted_at = Some(self.t);
            {
                for _ in 0..jobs {
                    let name = self.new_name("bulk");
                    let text = format!(
                        "name = \"{name}\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ncommand = \"sleep\"\n[task.resources]\ncpu = 10\nmemory = 8\n"
                    );
                    self.api_call(ApiRequest::Submit {
                        text,
                        check_version: None,
                    });
                }
            }
        }
    }

    fn live_services(&self) -> Vec<(String, JobSpec)> {
        self.checker
            .accepted
            .values()
            .filter_map(|r| {
                let s = r.spec.as_ref()?;
                (s.job_type == shoal_core::job::JobType::Service)
                    .then(|| (r.name.clone(), s.clone()))
            })
            .collect()
    }

    fn workload_step(&mut self) {
        let live = self.live_services();
        match self.rng.random_range(0..10) {
            0..=2 => {
                let name = self.new_name("svc");
                let text = self.service_text(&name);
                self.api_call(ApiRequest::Submit {
                    text,
                    check_version: None,
                });
            }
            3..=4 => {
                let name = self.new_name("batch");
                let text = self.batch_text(&name);
                self.api_call(ApiRequest::Submit {
                    text,
                    check_version: None,
                });
            }
            5..=6 if !live.is_empty() => {
                let (name, spec) = live[self.rng.random_range(0..live.len())].clone();
                let limited = spec.distinct_hosts || spec.task.ports.values().any(|p| *p != 0);
                let max = if limited {
                    (self.nodes.len() as u32).saturating_sub(2).max(1)
                } else {
                    6
                };
                let replicas = self.rng.random_range(1..=max);
                self.api_call(ApiRequest::Scale { name, replicas });
            }
            7 if live.iter().any(|(_, s)| !never_ready(s)) => {
                // An update: a new task (outdated copies are replaced, by
                // the job's rolling update). A version that never passes
                // would stop the update on its first slots by design: not
                // drawn here.
                let updatable: Vec<&(String, JobSpec)> =
                    live.iter().filter(|(_, s)| !never_ready(s)).collect();
                let (_, mut spec) = updatable[self.rng.random_range(0..updatable.len())].clone();
                spec.task.args = vec![format!("v{}", self.rng.random_range(3..1000))];
                if let Ok(text) = toml::to_string(&spec) {
                    self.api_call(ApiRequest::Submit {
                        text,
                        check_version: None,
                    });
                }
            }
            9 if self.checker.accepted.contains_key("sys-all") => {
                // A system job's update (rolls node by node).
                let (name, constraint) = if self.rng.random_range(0..2) == 0 {
                    ("sys-all", String::new())
                } else {
                    (
                        "sys-a",
                        "[[constraints]]\nlabel = \"zone\"\nop = \"=\"\nvalue = \"a\"\n"
                            .to_string(),
                    )
                };
                let v = self.rng.random_range(2..1000);
                self.api_call(ApiRequest::Submit {
                    text: system_text(name, v, &constraint, self.nodes.len()),
                    check_version: None,
                });
            }
            _ if live.len() > 3 => {
                let (name, _) = live[self.rng.random_range(0..live.len())].clone();
                self.api_call(ApiRequest::Stop { name });
            }
            _ => {}
        }
    }

    // ---- faults ----

    fn draw_fault(&mut self) -> Fault {
        let n = self.nodes.len();
        let node = self.rng.random_range(0..n);
        let side = |rng: &mut StdRng| {
            let size = rng.random_range(1..=(n / 2).max(1));
            let start = rng.random_range(0..n);
            (0..size).map(|k| (start + k) % n).collect::<Vec<_>>()
        };
        match self.rng.random_range(0..10) {
            0 => Fault::MachineCrash(node),
            1 => Fault::AgentCrash(node),
            2 => Fault::Pause(node),
            3 => Fault::Restart(node),
            4 => Fault::Wipe(node),
            5 => Fault::Partition(side(&mut self.rng)),
            6 => Fault::OneWay(side(&mut self.rng)),
            7 => Fault::Loss(self.rng.random_range(0.05..0.3)),
            8 => Fault::Delay(Duration::from_millis(self.rng.random_range(5..100))),
            _ => Fault::Skew(node, self.rng.random_range(-500..=500)),
        }
    }

    fn inject(&mut self, f: &Fault, hold: Duration) {
        if let (Fault::MachineCrash(i) | Fault::Wipe(i), Workload::Mixed) = (f, &self.opts.workload)
        {
            // Its processes died with it: an operator may forget it, just
            // before it comes back (so that it comes back forgotten).
            if hold >= Duration::from_millis(2_500) && self.nodes[*i].machine_up {
                let mgen = self.nodes[*i].mgen + 1;
                self.at(hold - Duration::from_millis(300), Ev::Forget(*i, mgen));
            }
        }
        match f {
            Fault::MachineCrash(i) => self.kill_machine(*i),
            Fault::AgentCrash(i) => self.kill_agent(*i),
            Fault::Pause(i) => {
                if self.nodes[*i].agent_up {
                    self.nodes[*i].paused_until = Some(self.t + hold);
                    self.at(hold, Ev::Resume(*i));
                    self.down_since[*i] = Some(self.t);
                    self.oracle_changed();
                }
            }
            Fault::Restart(i) => {
                if self.nodes[*i].agent_up {
                    self.stop_agent(*i);
                }
                self.at(Duration::from_millis(500), Ev::Restart(*i));
            }
            Fault::Wipe(i) => self.wipe(*i),
            Fault::Partition(side) => {
                let before = self.gossip_of.clone();
                for (j, c) in self.component_of.iter_mut().enumerate() {
                    *c = u32::from(side.contains(&j));
                }
                self.gossip_of = self.component_of.clone();
                let after = self.gossip_of.clone();
                self.gossip.split(&before, &after);
                self.split_since = self.t;
                self.oracle_changed();
            }
            Fault::OneWay(side) => {
                let n = self.nodes.len();
                for &a in side {
                    for b in (0..n).filter(|b| !side.contains(b)) {
                        self.blocked.insert((a, b));
                    }
                }
                let before = self.gossip_of.clone();
                for (j, c) in self.gossip_of.iter_mut().enumerate() {
                    *c = u32::from(side.contains(&j));
                }
                let after = self.gossip_of.clone();
                self.gossip.split(&before, &after);
                self.net_changed_at = self.t;
            }
            Fault::Loss(p) => {
                self.loss = *p;
                self.net_changed_at = self.t;
            }
            Fault::Delay(d) => {
                self.extra_latency = *d;
                self.net_changed_at = self.t;
            }
            Fault::Skew(i, ms) => self.nodes[*i].skew_ms = *ms,
        }
    }

    fn heal(&mut self, f: &Fault) {
        match f {
            Fault::Partition(_) | Fault::OneWay(_) => {
                self.component_of = vec![0; self.nodes.len()];
                self.gossip_of = vec![0; self.nodes.len()];
                self.blocked.clear();
                let t = self.t;
                self.gossip.heal(t);
                self.split_since = self.t;
                self.oracle_changed();
            }
            Fault::Loss(_) => self.loss = self.opts.loss,
            Fault::Delay(_) => self.extra_latency = Duration::ZERO,
            Fault::Skew(..) => {}
            Fault::Pause(i) => {
                self.nodes[*i].paused_until = None;
                if self.nodes[*i].agent_up {
                    self.down_since[*i] = None;
                    self.oracle_changed();
                }
            }
            _ => {}
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].agent_up {
                self.start_agent(i, true);
            }
        }
    }

    // ---- the loop ----

    /// Runs to the end; returns the report.
    pub fn run(mut self) -> Report {
        let wall = Instant::now();
        self.initial_workload();
        let hard_end = self.opts.duration + self.opts.liveness_bound * 3 + Duration::from_secs(60);
        while let Some(Reverse(Queued { when, ev, .. })) = self.queue.pop() {
            let ev = *ev;
            self.t = when;
            if self.phase == Phase::Done || self.t > hard_end {
                break;
            }
            self.events_processed += 1;
            *self.by_kind.entry(ev.kind()).or_insert(0) += 1;
            self.queue_max = self.queue_max.max(self.queue.len());
            self.digest.add_u64(when.as_nanos() as u64);
            self.handle(ev);
        }
        self.finish(wall.elapsed())
    }

    fn defer_if_paused(&mut self, i: usize, ev: Ev) -> Option<Ev> {
        match self.nodes[i].paused_until {
            Some(u) if u > self.t => {
                let d = u - self.t;
                self.at(d, ev);
                None
            }
            _ => Some(ev),
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Timer(i, gen) => {
                self.digest.add(b"T");
                self.digest.add_u64(i as u64);
                if self.nodes[i].gen != gen || !self.nodes[i].agent_up {
                    return;
                }
                let Some(Ev::Timer(i, gen)) = self.defer_if_paused(i, Ev::Timer(i, gen)) else {
                    return;
                };
                let now = self.now(i);
                self.with_core(i, gen, |core| core.handle_timer(now));
                let tick = self.opts.scheduler.tick;
                self.at(tick, Ev::Timer(i, gen));
            }
            Ev::SwimTick(i, gen) => {
                if self.nodes[i].gen != gen || !self.nodes[i].agent_up {
                    return;
                }
                let Some(Ev::SwimTick(i, gen)) = self.defer_if_paused(i, Ev::SwimTick(i, gen))
                else {
                    return;
                };
                let mono = self.mono();
                self.with_swim(i, |swim| swim.tick(mono));
                self.at(SWIM_TICK, Ev::SwimTick(i, gen));
            }
            Ev::Refresh(i, gen) => {
                if self.nodes[i].gen != gen || !self.nodes[i].agent_up {
                    return;
                }
                let Some(Ev::Refresh(i, gen)) = self.defer_if_paused(i, Ev::Refresh(i, gen)) else {
                    return;
                };
                self.refresh(i);
                let every = self.opts.view_refresh;
                self.at(every, Ev::Refresh(i, gen));
            }
            Ev::QuickRefresh(i, gen) => {
                self.nodes[i].refresh_soon = false;
                if self.nodes[i].gen != gen || !self.nodes[i].agent_up || self.paused(i) {
                    return;
                }
                self.refresh(i);
            }
            Ev::Request {
                from,
                to,
                req,
                call,
            } => {
                self.digest.add(b"R");
                self.digest.add_u64(((from as u64) << 32) | to as u64);
                if !self.nodes[to].agent_up {
                    return;
                }
                let Some(Ev::Request {
                    from,
                    to,
                    req,
                    call,
                }) = self.defer_if_paused(
                    to,
                    Ev::Request {
                        from,
                        to,
                        req,
                        call,
                    },
                )
                else {
                    return;
                };
                self.next_token += 1;
                let token = self.next_token;
                if let Some((caller_gen, c)) = call {
                    self.tokens.insert(
                        token,
                        ReplyTo {
                            caller: from,
                            caller_gen,
                            call: c,
                            callee: to,
                        },
                    );
                }
                let gen = self.nodes[to].gen;
                let now = self.now(to);
                self.handling_start_request = matches!(req, Request::Start { .. });
                self.with_core(to, gen, |core| core.handle_request(token, req, now));
                self.handling_start_request = false;
                self.tokens.remove(&token);
            }
            Ev::Response {
                to,
                gen,
                call,
                resp,
            } => {
                self.digest.add(b"r");
                if !self.pending_calls.contains(&(to, gen, call)) {
                    return;
                }
                let Some(Ev::Response {
                    to,
                    gen,
                    call,
                    resp,
                }) = self.defer_if_paused(
                    to,
                    Ev::Response {
                        to,
                        gen,
                        call,
                        resp,
                    },
                )
                else {
                    return;
                };
                if !self.pending_calls.remove(&(to, gen, call)) {
                    return;
                }
                let now = self.now(to);
                self.with_core(to, gen, |core| core.handle_reply(call, Ok(resp), now));
            }
            Ev::CallTimeout { node, gen, call } => {
                if !self.pending_calls.contains(&(node, gen, call)) {
                    return;
                }
                let Some(Ev::CallTimeout { node, gen, call }) =
                    self.defer_if_paused(node, Ev::CallTimeout { node, gen, call })
                else {
                    return;
                };
                if !self.pending_calls.remove(&(node, gen, call)) {
                    return;
                }
                let now = self.now(node);
                self.with_core(node, gen, |core| {
                    core.handle_reply(call, Err("timed out".into()), now)
                });
            }
            Ev::Probe { to, msg, reply } => {
                self.digest.add(b"P");
                self.digest.add_u64(to as u64);
                if !self.nodes[to].agent_up {
                    return;
                }
                let Some(Ev::Probe { to, msg, reply }) =
                    self.defer_if_paused(to, Ev::Probe { to, msg, reply })
                else {
                    return;
                };
                self.on_probe(to, msg, reply);
            }
            Ev::ProbeAnswer { to, outcome } => self.on_probe_answer(to, outcome),
            Ev::ProbeTimeout { node, gen, probe } => {
                if !self.pending_probes.remove(&(node, gen, probe)) {
                    return;
                }
                let mono = self.mono();
                if self.nodes[node].gen == gen {
                    self.with_swim(node, |swim| {
                        swim.probe_outcome(probe, ProbeOutcome::Failed, mono)
                    });
                }
            }
            Ev::Started {
                node,
                gen,
                id,
                result,
            } => {
                self.digest.add(b"S");
                let Some(Ev::Started {
                    node,
                    gen,
                    id,
                    result,
                }) = self.defer_if_paused(
                    node,
                    Ev::Started {
                        node,
                        gen,
                        id,
                        result,
                    },
                )
                else {
                    return;
                };
                let now = self.now(node);
                self.with_core(node, gen, |core| core.handle_started(id, result, now));
            }
            Ev::Check {
                node,
                gen,
                id,
                index,
            } => {
                if self.nodes[node].gen != gen || !self.nodes[node].agent_up {
                    return;
                }
                let Some(interval) = self.nodes[node]
                    .checks
                    .get(&id)
                    .and_then(|ps| ps.iter().find(|p| p.index == index))
                    .map(|p| p.interval)
                else {
                    return;
                };
                self.digest.add(b"C");
                let result = match self.nodes[node].driver.instances.get_mut(&id) {
                    Some(inst) if inst.ended.is_none() => host::health(inst),
                    _ => Err("connection refused".to_string()),
                };
                self.at(
                    interval,
                    Ev::Check {
                        node,
                        gen,
                        id: id.clone(),
                        index,
                    },
                );
                let now = self.now(node);
                self.with_core(node, gen, |core| core.handle_check(id, index, result, now));
            }
            Ev::Ended {
                node,
                mgen,
                id,
                state,
            } => {
                self.digest.add(b"E");
                if std::env::var_os("SIM_TRACE").is_some() {
                    self.trace(
                        node,
                        &format!(
                            "ended event {id} {state:?} mgen {mgen}/{} up {}",
                            self.nodes[node].mgen, self.nodes[node].agent_up
                        ),
                    );
                }
                if self.nodes[node].mgen != mgen {
                    return;
                }
                if !self.nodes[node].driver.end(&id, state.clone()) {
                    return;
                }
                self.on_instance_ended(node, &id, &state);
                let gen = self.nodes[node].gen;
                if self.nodes[node].agent_up {
                    let event = DriverEvent::Ended { id, state };
                    self.at(Duration::ZERO, Ev::DriverNews { node, gen, event });
                }
            }
            Ev::DriverNews { node, gen, event } => {
                let Some(Ev::DriverNews { node, gen, event }) =
                    self.defer_if_paused(node, Ev::DriverNews { node, gen, event })
                else {
                    return;
                };
                if std::env::var_os("SIM_TRACE").is_some() {
                    let DriverEvent::Ended { id, state } = &event;
                    self.trace(
                        node,
                        &format!(
                            "driver: {id} ended {state:?} (gen {gen}, now {})",
                            self.nodes[node].gen
                        ),
                    );
                }
                let now = self.now(node);
                self.with_core(node, gen, |core| core.handle_driver(event, now));
            }
            Ev::Persisted {
                node,
                gen,
                write,
                jobs,
                completions,
            } => {
                self.digest.add(b"W");
                if self.nodes[node].gen != gen || !self.nodes[node].agent_up {
                    return;
                }
                let Some(Ev::Persisted {
                    node,
                    gen,
                    write,
                    jobs,
                    completions,
                }) = self.defer_if_paused(
                    node,
                    Ev::Persisted {
                        node,
                        gen,
                        write,
                        jobs,
                        completions,
                    },
                )
                else {
                    return;
                };
                self.nodes[node].store.write(&jobs, &completions);
                let t = self.t;
                for c in &completions {
                    self.checker.completed(t, &c.job, c.slot);
                }
                let now = self.now(node);
                self.with_core(node, gen, |core| core.handle_persisted(write, Ok(()), now));
            }
            Ev::Commit => {
                let t = self.t;
                let comps = self.gossip_of.clone();
                self.gossip.commit(t, &comps);
                let every = self.opts.gossip_epoch;
                self.at(every, Ev::Commit);
            }
            Ev::Submit => self.bulk_submit(),
            Ev::OracleRebuild => {
                self.oracle_pending.remove(&self.t);
                self.oracle_rebuild();
            }
            Ev::Sample => {
                self.sample();
                self.at(SAMPLE, Ev::Sample);
            }
            Ev::Step => self.step(),
            Ev::Restart(i) => {
                if !self.nodes[i].agent_up {
                    self.start_agent(i, true);
                }
            }
            Ev::Resume(i) => {
                if self.nodes[i].paused_until.is_some_and(|u| u <= self.t) {
                    self.nodes[i].paused_until = None;
                    if self.nodes[i].agent_up {
                        self.down_since[i] = None;
                        self.oracle_changed();
                    }
                }
            }
            Ev::Forget(i, mgen) => {
                if self.nodes[i].mgen == mgen && !self.nodes[i].machine_up {
                    self.forgets += 1;
                    self.uncounted[i] = true;
                    let node = self.nodes[i].name.clone();
                    self.api_call(ApiRequest::Node {
                        node: node.to_string(),
                        change: shoal_core::scheduler::NodeChange::Forget,
                    });
                }
            }
            Ev::ClientRetry(req) => {
                self.digest.add(b"C");
                self.api_call(req);
            }
            Ev::Kill => {
                let n = self.nodes.len();
                let k = ((n as f64) * self.opts.kill_fraction).round() as usize;
                let mut victims: Vec<usize> = (1..n).collect();
                for v in 0..k.min(victims.len()) {
                    let j = self.rng.random_range(v..victims.len());
                    victims.swap(v, j);
                }
                for &v in victims.iter().take(k) {
                    self.kill_machine(v);
                }
                self.killed_at = Some(self.t);
            }
        }
    }

    fn on_probe(&mut self, to: usize, msg: ProbeMsg, reply: Option<ProbeReplyTo>) {
        let mono = self.mono();
        match msg {
            ProbeMsg::Ping {
                from,
                target,
                view_of_you,
            } => {
                let Some(swim) = self.nodes[to].swim.as_mut() else {
                    return;
                };
                let (answer, actions) = swim.on_ping(from, &target, view_of_you, mono);
                self.swim_actions(to, actions);
                let outcome = match answer {
                    ProbeReply::Ack {
                        generation,
                        incarnation,
                    } => ProbeOutcome::Ack {
                        generation,
                        incarnation,
                    },
                    _ => ProbeOutcome::Failed,
                };
                if let Some(r) = reply {
                    self.probe_answer(to, r, outcome);
                }
            }
            ProbeMsg::PingReq { target, addr } => {
                // Probe the target for the asker, and answer it.
                let Some(ProbeReplyTo::Owner { node, gen, probe }) = reply else {
                    return;
                };
                let Some(&j) = self.by_addr.get(&addr) else {
                    return;
                };
                let relay_gen = self.nodes[to].gen;
                let ping = ProbeMsg::Ping {
                    from: (
                        self.nodes[to].name.to_string(),
                        relay_gen,
                        self.nodes[to].addr,
                    ),
                    target,
                    view_of_you: None,
                };
                let relay_to = ProbeReplyTo::Relay {
                    relay: to,
                    relay_gen,
                    owner: node,
                    owner_gen: gen,
                    probe,
                };
                match self.hop(to, j) {
                    Some(d) => self.at(
                        d,
                        Ev::Probe {
                            to: j,
                            msg: ping,
                            reply: Some(relay_to),
                        },
                    ),
                    None => {
                        // The relay's own probe times out: it says Nack.
                        let timeout = SwimConfig::lan().probe_timeout;
                        self.at(
                            timeout,
                            Ev::ProbeAnswer {
                                to: relay_to,
                                outcome: ProbeOutcome::Failed,
                            },
                        );
                    }
                }
            }
            ProbeMsg::Updates(updates) => {
                let Some(swim) = self.nodes[to].swim.as_mut() else {
                    return;
                };
                let actions = swim.on_updates(updates, mono);
                self.swim_actions(to, actions);
            }
        }
    }

    fn on_probe_answer(&mut self, to: ProbeReplyTo, outcome: ProbeOutcome) {
        match to {
            ProbeReplyTo::Owner { node, gen, probe } => {
                if self.paused(node) {
                    let d = self.nodes[node].paused_until.unwrap_or(self.t) - self.t;
                    self.at(
                        d,
                        Ev::ProbeAnswer {
                            to: ProbeReplyTo::Owner { node, gen, probe },
                            outcome,
                        },
                    );
                    return;
                }
                if !self.pending_probes.remove(&(node, gen, probe)) {
                    return;
                }
                let mono = self.mono();
                if self.nodes[node].gen == gen {
                    self.with_swim(node, |swim| swim.probe_outcome(probe, outcome, mono));
                }
            }
            ProbeReplyTo::Relay {
                relay,
                relay_gen,
                owner,
                owner_gen,
                probe,
            } => {
                if self.nodes[relay].gen != relay_gen || !self.nodes[relay].agent_up {
                    return;
                }
                self.probe_answer(
                    relay,
                    ProbeReplyTo::Owner {
                        node: owner,
                        gen: owner_gen,
                        probe,
                    },
                    outcome,
                );
            }
        }
    }

    /// The run's schedule: warm-up, then faults one at a time, each
    /// followed by a wait for reconvergence, then the final liveness phase.
    fn step(&mut self) {
        let poll = Duration::from_millis(250);
        match self.phase.clone() {
            Phase::Warmup => {
                let converged = self.converged();
                if let Workload::Update { .. } = self.opts.workload {
                    self.roll_step();
                    self.at(poll, Ev::Step);
                    return;
                }
                if let Workload::Drain { .. } = self.opts.workload {
                    self.drain_step();
                    self.at(poll, Ev::Step);
                    return;
                }
                if let Workload::Bulk { .. } = self.opts.workload {
                    if converged
                        && self.all_running_at.is_none()
                        && self.submitted_at.is_some()
                        && !self.checker.accepted.is_empty()
                    {
                        self.all_running_at = Some(self.t);
                    }
                    if let Some(k) = self.killed_at {
                        if converged && self.recovered_at.is_none() {
                            self.recovered_at = Some(self.t);
                            self.phase = Phase::Done;
                            return;
                        }
                        let _ = k;
                    } else if self.all_running_at.is_some() && self.opts.kill_fraction == 0.0 {
                        self.phase = Phase::Done;
                        return;
                    }
                    if self.t > self.opts.duration + self.opts.liveness_bound * 4 {
                        self.phase = Phase::Done;
                        return;
                    }
                    // Finer polls: this is what the benchmark measures.
                    self.at(Duration::from_millis(50), Ev::Step);
                    return;
                }
                if converged || self.t > Duration::from_secs(30) {
                    self.fault_phase_end = self.t + self.opts.duration;
                    if !self.opts.faults {
                        self.phase = Phase::Final { since: self.t };
                    } else {
                        self.begin_fault();
                    }
                }
                self.at(poll, Ev::Step);
            }
            Phase::Fault { until } => {
                if self.t >= until {
                    let f = self.fault.take().expect("a fault is on");
                    self.heal(&f);
                    let t = self.t;
                    self.checker.fault_ended(t);
                    self.phase = Phase::Converge { since: self.t };
                }
                self.at(poll, Ev::Step);
            }
            Phase::Converge { since } => {
                let took = self.t.saturating_sub(since);
                if self.converged() || took > self.opts.liveness_bound {
                    if took > self.opts.liveness_bound {
                        let wrong =
                            self.checker
                                .mismatches(&self.running(), 8, &self.system_expected());
                        self.checker.violate(
                            &format!("liveness at {:.1}s", since.as_secs_f64()),
                            format!(
                                "liveness at {:.1}s: not reconverged {:?} after a fault: {}",
                                since.as_secs_f64(),
                                self.opts.liveness_bound,
                                wrong.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                            ),
                        );
                    }
                    self.checker.reconverge_s.push(took.as_secs_f64());
                    self.max_reconverge = self.max_reconverge.max(took);
                    for _ in 0..self.rng.random_range(1..=3) {
                        self.workload_step();
                    }
                    if self.t >= self.fault_phase_end {
                        self.phase = Phase::Final { since: self.t };
                    } else {
                        self.begin_fault();
                    }
                }
                self.at(poll, Ev::Step);
            }
            Phase::Final { since } => {
                let took = self.t.saturating_sub(since);
                // Let writes settle before judging: the workload is quiet.
                if took >= Duration::from_secs(2)
                    && (self.converged() && self.stores_agree())
                    && self.catalog_mismatch().is_none()
                {
                    self.check_health();
                    self.max_reconverge = self.max_reconverge.max(took);
                    self.checker.reconverge_s.push(took.as_secs_f64());
                    self.phase = Phase::Done;
                    return;
                }
                if took > self.opts.liveness_bound {
                    if let Some(m) = self.catalog_mismatch() {
                        self.checker.violate(
                            "catalog at the end",
                            format!(
                                "catalog at the end: not the live passing copies {:?} after faults stopped: {m}",
                                self.opts.liveness_bound
                            ),
                        );
                    }
                    let wrong =
                        self.checker
                            .mismatches(&self.running(), 8, &self.system_expected());
                    self.checker.violate(
                        "liveness at the end",
                        format!(
                            "liveness at the end: not converged {:?} after faults stopped: {}",
                            self.opts.liveness_bound,
                            wrong.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
                        ),
                    );
                    self.max_reconverge = self.max_reconverge.max(took);
                    self.phase = Phase::Done;
                    return;
                }
                self.at(poll, Ev::Step);
            }
            Phase::Done => {}
        }
    }

    fn begin_fault(&mut self) {
        let f = self.draw_fault();
        let hold = Duration::from_millis(self.rng.random_range(1_000..8_000));
        *self.faults.entry(f.kind()).or_default() += 1;
        if self.opts.verbose {
            eprintln!(
                "[{:>7.2}s] {f:?} for {:.1}s",
                self.t.as_secs_f64(),
                hold.as_secs_f64()
            );
        }
        self.inject(&f, hold);
        let t = self.t;
        self.checker.fault_began(t, f.partitions());
        // A write during the fault.
        if self.rng.random_bool(0.5) {
            self.workload_step();
        }
        self.fault = Some(f);
        self.phase = Phase::Fault {
            until: self.t + hold,
        };
    }

    /// Every up node holds the newest accepted version of every job.
    /// Health as every live node sees it once converged: a copy of a
    /// task that never passes is never shown passing, one of a task that
    /// always passes never critical, and each checked copy that has run
    /// for a few check intervals is known (passing or critical) at every
    /// node, by gossip.
    fn check_health(&mut self) {
        let mut wrong = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(core) = n.core.as_ref().filter(|_| n.agent_up) else {
                continue;
            };
            let now = self.now(i);
            for row in shoal_core::status::instances(core, now.mono) {
                let Some(spec) = self
                    .checker
                    .accepted
                    .get(&row.job)
                    .and_then(|r| r.spec.as_ref())
                    .filter(|s| !s.task.checks.is_empty())
                else {
                    continue;
                };
                let failing = spec.task.env.get("SIM_HEALTH").map(String::as_str) == Some("fail");
                let bad = match row.copy.health {
                    shoal_core::health::Health::Passing => failing,
                    shoal_core::health::Health::Critical => !failing,
                    shoal_core::health::Health::Unknown => {
                        // Known within a few intervals of its start (run
                        // ids are the start's packed HLC).
                        let started_ms = row.copy.run >> 20;
                        row.copy.state == shoal_core::instance::SlotState::Running
                            && now.wall_ms.saturating_sub(started_ms) > 10_000
                    }
                };
                if bad {
                    wrong.push(format!(
                        "n{i} shows {}.{} on {} {:?}",
                        row.job, row.copy.slot, row.node, row.copy.health
                    ));
                }
            }
        }
        if let Some(w) = wrong.first() {
            self.checker.violate(
                "health",
                format!("health at the end: {w} ({} such)", wrong.len()),
            );
        }
    }

    /// Where some up node's catalog is not exactly the copies that run,
    /// are not stopping and pass the checks gating their service, as the
    /// nodes running them say (the same on every node, derived from
    /// gossip): a description of the first difference.
    fn catalog_mismatch(&mut self) -> Option<String> {
        type Entries = BTreeMap<String, BTreeSet<(String, u32, String, u16)>>;
        let mut truth: Entries = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.agent_up) {
            let Some(core) = n.core.as_ref() else {
                continue;
            };
            for l in core.local().iter() {
                if l.state != shoal_core::instance::SlotState::Running || l.stopping {
                    continue;
                }
                let Some(spec) = core.desired().spec(&l.id.job) else {
                    continue;
                };
                let copy = l.published();
                for svc in &spec.services {
                    // Not through the catalog's own gating: the services
                    // here are gated by every check or by none.
                    let passing = match &svc.checks {
                        Some(c) if c.is_empty() => true,
                        None => copy.health == shoal_core::health::Health::Passing,
                        Some(_) => {
                            shoal_core::catalog::gated_health(&copy, svc.gate(&spec.task))
                                == shoal_core::health::Health::Passing
                        }
                    };
                    if !passing {
                        continue;
                    }
                    if let Some(&port) = copy.ports.get(&svc.port) {
                        truth.entry(svc.name.clone()).or_default().insert((
                            l.id.job.clone(),
                            l.id.slot,
                            n.name.to_string(),
                            port,
                        ));
                    }
                }
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].agent_up || self.paused(i) {
                continue;
            }
            let name = self.nodes[i].name.clone();
            let Some(core) = self.nodes[i].core.as_mut() else {
                continue;
            };
            let mut got: Entries = BTreeMap::new();
            for (svc, entry) in core.catalog().iter() {
                for inst in entry.passing() {
                    got.entry(svc.clone()).or_default().insert((
                        inst.job.clone(),
                        inst.slot,
                        inst.node.clone(),
                        inst.port,
                    ));
                }
            }
            if got != truth {
                let diff = truth
                    .iter()
                    .flat_map(|(s, e)| e.iter().map(move |x| (s, x)))
                    .find(|(s, x)| !got.get(*s).is_some_and(|g| g.contains(x)))
                    .map(|(s, x)| format!("{name} lacks {s} {x:?}"))
                    .or_else(|| {
                        got.iter()
                            .flat_map(|(s, e)| e.iter().map(move |x| (s, x)))
                            .find(|(s, x)| !truth.get(*s).is_some_and(|t| t.contains(x)))
                            .map(|(s, x)| {
                                format!("{name} lists {s} {x:?}, which is not a live passing copy")
                            })
                    })
                    .unwrap_or_default();
                return Some(diff);
            }
        }
        None
    }

    fn stores_agree(&self) -> bool {
        self.lagging().is_empty()
    }

    fn lagging(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(core) = n.core.as_ref().filter(|_| n.agent_up) else {
                continue;
            };
            for (job, rec) in &self.checker.accepted {
                let have = core.desired().get(job).map(|r| &r.version);
                if have.is_none_or(|v| *v < rec.version) {
                    out.push(format!("n{i} lacks {job} at {}", rec.version));
                }
            }
        }
        out
    }

    /// Every time of the mixed workload's cron job due from its write
    /// until `CRON_CHECK_MARGIN` before the end ran: a run of it is on
    /// some up node (a run's name is its time, so it cannot run twice;
    /// the batch checker holds its slot to one run).
    fn check_cron(&mut self) {
        let Some(rec) = self.checker.accepted.get(CRON_JOB).cloned() else {
            return;
        };
        let Some(cs) = rec.spec.as_ref().and_then(|s| s.cron.clone()) else {
            return;
        };
        let Some(clock) = shoal_core::cron::CronClock::new(&cs, rec.version.clone()) else {
            return;
        };
        let end_ms = (EPOCH_MS + self.t.as_millis() as u64)
            .saturating_sub(CRON_CHECK_MARGIN.as_millis() as u64);
        let first = (rec.version.hlc.wall_ms / 1000) as i64 - 1;
        let mut missing = Vec::new();
        for t in clock.schedule().upcoming(first, 10_000) {
            if (t as u64) * 1000 > end_ms {
                break;
            }
            if (t as u64) * 1000 < rec.version.hlc.wall_ms {
                continue;
            }
            self.cron_due += 1;
            let child = shoal_core::cron::child_name(CRON_JOB, t);
            let held = self.nodes.iter().any(|n| {
                n.agent_up
                    && n.core
                        .as_ref()
                        .is_some_and(|c| c.desired().get(&child).is_some())
            });
            if !held {
                missing.push(child);
            }
        }
        if let Some(m) = missing.first() {
            self.checker.violate(
                "cron: time never ran",
                format!("cron: {m} never ran ({} such)", missing.len()),
            );
        }
    }

    fn finish(mut self, wall: Duration) -> Report {
        self.check_cron();
        let lagging = self.lagging();
        let jobs_lost: BTreeSet<String> = lagging
            .iter()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .collect();
        for l in lagging.iter().take(5) {
            self.checker.violate(
                &format!("job lost: {l}"),
                format!("job lost or stale at the end: {l}"),
            );
        }
        let sim_seconds = self.t.as_secs_f64();
        let c = &self.checker;
        let counters = self.nodes.iter().filter_map(|n| n.core.as_ref()).fold(
            (0u64, 0u64, 0u64, 0u64),
            |a, core| {
                let k = core.counters();
                (
                    a.0 + k.placed,
                    a.1 + k.unplaceable,
                    a.2 + k.starts,
                    a.3 + k.syncs,
                )
            },
        );
        let json = json!({
            "seed": self.opts.seed,
            "nodes": self.opts.nodes,
            "membership": format!("{:?}", self.opts.membership).to_lowercase(),
            "sim_seconds": (sim_seconds * 1000.0).round() / 1000.0,
            "wall_seconds": (wall.as_secs_f64() * 1000.0).round() / 1000.0,
            "wall_per_sim_second": (wall.as_secs_f64() / sim_seconds.max(1e-9) * 1000.0).round() / 1000.0,
            "events": self.events_processed,
            "events_by_kind": self.by_kind,
            "never_starts": self.never_starts,
            "forgets": self.forgets,
            "queue_max": self.queue_max,
            "messages": self.messages,
            "faults": self.faults,
            "faults_total": self.faults.values().sum::<u64>(),
            "violations": c.violations,
            "max_reconverge_s": (self.max_reconverge.as_secs_f64() * 1000.0).round() / 1000.0,
            "reconverge_s": c.reconverge_s.iter().map(|s| (s * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            "duplicate_slot_seconds": (c.duplicate_slot_seconds * 100.0).round() / 100.0,
            "duplicate_slot_seconds_during_faults": (c.duplicate_slot_seconds_during_faults * 100.0).round() / 100.0,
            "longest_duplicate_outside_faults_s": (c.longest_duplicate_s * 100.0).round() / 100.0,
            "batch_reruns": c.batch_reruns,
            "cron_times_due": self.cron_due,
            "cron_runs_written": self.nodes.iter().filter_map(|n| n.core.as_ref()).map(|c| c.counters().cron_fired).sum::<u64>(),
            "batch_reruns_during_partitions": c.batch_reruns_in_partitions,
            "batch_reruns_of_unreported_completions": c.batch_reruns_unreported,
            "spread_violations_outside_faults": c.spread_violations,
            "jobs_lost": jobs_lost.len(),
            "writes_accepted": c.writes_accepted,
            "writes_refused": c.writes_refused,
            "instance_starts": c.starts,
            "slots_placed": counters.0,
            "placements_failed": counters.1,
            "anti_entropy_exchanges": counters.3,
            "gossip_bytes_published": self.gossip.bytes_published,
            "core_cpu_s_total": (self.nodes.iter().map(|n| n.cpu.as_secs_f64()).sum::<f64>() * 1000.0).round() / 1000.0,
            "core_cpu_s_busiest_node": (self.nodes.iter().map(|n| n.cpu.as_secs_f64()).fold(0.0, f64::max) * 1000.0).round() / 1000.0,
            "submitted_at_s": self.submitted_at.map(|t| t.as_secs_f64()),
            "update_s": self.update_done_at.zip(self.update_at).map(|(d, s)| (d - s).as_secs_f64()),
            "update_min_serving": self.update_min_serving,
            "drain_services_moved_s": self.drained_services_at.zip(self.update_at).map(|(d, s)| (d - s).as_secs_f64()),
            "drain_empty_s": self.drained_empty_at.zip(self.update_at).map(|(d, s)| (d - s).as_secs_f64()),
            "update_second_version_s": self.second_at.zip(self.update_at).map(|(d, s)| d.saturating_sub(s).as_secs_f64()),
            "submission_to_all_running_s": self.all_running_at.zip(self.submitted_at).map(|(a, s)| (a - s).as_secs_f64()),
            "killed_at_s": self.killed_at.map(|t| t.as_secs_f64()),
            "recovered_after_kill_s": self.recovered_at.zip(self.killed_at).map(|(r, k)| (r - k).as_secs_f64()),
            "trace_digest": format!("{:016x}", self.digest.0),
        });
        Report {
            violations: self.checker.violations.clone(),
            json,
        }
    }
}

/// The mixed workload's cron job.
const CRON_JOB: &str = "cron-tick";
const CRON_TEXT: &str = "name = \"cron-tick\"\ntype = \"cron\"\n[cron]\nschedule = \"*/10 * * * * *\"\nstarting_deadline = \"15s\"\n[task]\ncommand = \"sim-batch\"\nargs = [\"1s\"]\n[task.resources]\ncpu = 50\nmemory = 32\n";
/// Times of the cron job due this close to the end are not checked: they
/// may still be within their starting deadline (15 s) and waiting for a
/// majority.
const CRON_CHECK_MARGIN: Duration = Duration::from_secs(17);

/// Largest cluster whose mixed workload runs system jobs.
const SYSTEM_JOBS_NODES_MAX: usize = 100;

/// The mixed workload's system job `name` at version `v` (its args),
/// with `constraints` (TOML tables) and a rolling update of a tenth of the
/// `nodes` at a time (at least 2): one node in a step of about half a
/// second, 2 at a time, did not roll 500 nodes within the 30 s liveness
/// bound (seed 42 at 500 nodes, `.ci/run`).
fn system_text(name: &str, v: u32, constraints: &str, nodes: usize) -> String {
    let max_parallel = (nodes / 10).max(2);
    format!(
        "name = \"{name}\"\ntype = \"system\"\n{constraints}[task]\ncommand = \"sleep\"\nargs = [\"v{v}\"]\n[task.resources]\ncpu = 10\nmemory = 8\n[update]\nmax_parallel = {max_parallel}\n"
    )
}

/// A service whose copies never pass their checks (`SIM_HEALTH = fail`).
fn never_ready(spec: &JobSpec) -> bool {
    !spec.task.checks.is_empty()
        && spec.task.env.get("SIM_HEALTH").map(String::as_str) == Some("fail")
}

fn node_remove(n: &mut SimNode, id: &InstanceId) {
    if n.driver
        .instances
        .get(id)
        .is_some_and(|i| i.ended.is_some())
    {
        n.driver.instances.remove(id);
    }
}
