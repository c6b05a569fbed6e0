//! Every knob of a simulated run in one struct (as TigerBeetle's VOPR keeps
//! its fault knobs together), with the defaults the CI run uses.

use std::time::Duration;

/// How members learn of each other's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipMode {
    /// The real SWIM state machine on every node, probing over the
    /// simulated network. Its state is N entries per node (N² in all), so
    /// it is the default up to a few thousand nodes.
    Swim,
    /// A failure detector modelled from SWIM's measured timings (a crash is
    /// suspected after ~0.2 s and declared dead after ~0.6 s everywhere,
    /// a partition's far side likewise), shared by the nodes of a network
    /// component: for runs of 5,000 to 10,000 nodes, which would not fit
    /// in one process with a SWIM table per node.
    Oracle,
}

/// The workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Services and batch jobs with every placement rule (distinct hosts,
    /// host ports, constraints, spread), submissions, scale changes,
    /// updates and stops at random nodes throughout the run.
    Mixed,
    /// `jobs` services of `replicas` slots each submitted at once at
    /// random nodes (the C1M-style benchmark); no faults.
    Bulk {
        /// Jobs.
        jobs: usize,
        /// Slots per job.
        replicas: u32,
    },
    /// One checked service of `replicas` slots; once every slot is ready,
    /// a new version of it rolled out by its `[update]`; no faults. Checks
    /// that the copies serving never fall below `replicas` (start-first)
    /// or `replicas - max(max_parallel, canary)` (stop-first); that a good
    /// version finishes and its deployment is marked successful at every
    /// node (promoted by the simulator once its canaries are ready, and
    /// never beyond its canaries before that); that a broken one changes
    /// at most `max_parallel` (or `canary`) slots and is reverted; and
    /// that a stuck one fails by `progress_deadline` and is reverted.
    Update {
        /// Slots.
        replicas: u32,
        /// `[update] max_parallel`.
        max_parallel: u32,
        /// `stop-first` rather than `start-first`.
        stop_first: bool,
        /// What the new version is like.
        version: NewVersion,
        /// `[update] canary`.
        canary: u32,
    },
    /// A checked service of `replicas` slots (its `max_parallel` moving
    /// at a time), a batch job of long runs and a system job; once every
    /// slot is ready, the node holding the most service copies is
    /// drained with a `deadline`; no faults. Checks that the service's
    /// serving slots never fall below `replicas`, that nothing starts on
    /// the node once every node knows of the drain, that its batch copies
    /// run until the deadline and its system copy outlasts every other
    /// copy there, and that the node is empty by the deadline (plus the
    /// time a stop takes) with every slot running elsewhere.
    Drain {
        /// Service slots.
        replicas: u32,
        /// The service's `[update] max_parallel`.
        max_parallel: u32,
        /// The drain's deadline.
        deadline: Duration,
        /// Before the drain, a new version with a canary that is never
        /// promoted: the drained node's copies are of the old version,
        /// which no update moves.
        paused_update: bool,
    },
}

/// The new version of the update workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewVersion {
    /// It passes its checks.
    Good,
    /// It never passes its checks (`healthy_deadline` fails it).
    Broken,
    /// No node may run it (a constraint none meets): no slot makes
    /// progress, and `progress_deadline` fails it.
    Stuck,
    /// A good version, then another good one written while the first
    /// rolls (its first new copy placed, not yet ready): the floor holds
    /// across both, and every slot ends on the second.
    Twice,
}

/// A simulated run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seed of everything random in the run.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Seconds of faults (simulated), after the initial workload settles.
    pub duration: Duration,
    /// After faults stop, every desired slot must run within this long.
    pub liveness_bound: Duration,
    /// Two copies of one slot outside faults must not outlast this.
    pub conflict_window: Duration,
    /// After a fault ends, its effects (duplicates, a minority side's
    /// reruns) are still the fault's for this long.
    pub after_fault: Duration,
    /// Failure detection.
    pub membership: MembershipMode,
    /// What the simulated users do.
    pub workload: Workload,
    /// Inject faults.
    pub faults: bool,
    /// Probability that a packet is lost (each loss costs a QUIC
    /// retransmission: ~30 ms, doubling).
    pub loss: f64,
    /// One-way latency of a hop, and its random extra (reordering).
    pub latency: Duration,
    /// Random extra latency per hop, at most.
    pub jitter: Duration,
    /// Gossip (records, loads, published copies) reaches a node this long
    /// after it was published, at most (drawn per node and refresh).
    pub gossip_lag_max: Duration,
    /// How often the gossip state advances (one shared epoch per network
    /// component).
    pub gossip_epoch: Duration,
    /// How often a node refreshes its view from gossip.
    pub view_refresh: Duration,
    /// Kill this share of the nodes at once at `kill_at` (benchmark).
    pub kill_fraction: f64,
    /// When to kill them.
    pub kill_at: Duration,
    /// Largest clock skew a node is given (±).
    pub skew_max_ms: i64,
    /// The scheduler preset: `lan` or `local_test`.
    pub scheduler: shoal_core::SchedulerConfig,
    /// Print each violation as it happens.
    pub verbose: bool,
}

impl Options {
    /// The defaults of a CI run of `nodes` nodes and `duration` seconds of
    /// faults.
    pub fn new(seed: u64, nodes: usize, duration: Duration) -> Options {
        Options {
            seed,
            nodes,
            duration,
            liveness_bound: Duration::from_secs(30),
            conflict_window: Duration::from_secs(10),
            after_fault: Duration::from_secs(10),
            membership: if nodes > 2_000 {
                MembershipMode::Oracle
            } else {
                MembershipMode::Swim
            },
            workload: Workload::Mixed,
            faults: true,
            loss: 0.0,
            latency: Duration::from_micros(200),
            jitter: Duration::from_micros(300),
            gossip_lag_max: Duration::from_millis(800),
            gossip_epoch: Duration::from_millis(100),
            view_refresh: Duration::from_millis(100),
            kill_fraction: 0.0,
            kill_at: Duration::from_secs(20),
            skew_max_ms: 200,
            scheduler: shoal_core::SchedulerConfig {
                // Small, so that dynamic ports run out and are reused: the
                // driver fails a start whose port a copy on the machine
                // still binds, and the checker reports it.
                port_range: (20_000, 20_019),
                // Short, so that a majority side drops members down this
                // long within a run's faults (1 to 8 s each), and comes
                // to count them again when they return.
                remember_dead: Duration::from_secs(6),
                ..shoal_core::SchedulerConfig::lan()
            },
            verbose: true,
        }
    }
}
