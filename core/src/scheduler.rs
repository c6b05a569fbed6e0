//! [`Scheduler`]: one node's scheduling decisions as a state machine.
//!
//! Every input comes with the time ([`Now`]): a membership view, a peer's
//! request or the reply to one of ours, an API command, a driver's news, a
//! durable write, a timer. Each returns [`Effect`]s for the shell to carry
//! out (start or stop an instance, send a message, persist records, publish
//! gossip values, answer an API call). Nothing here reads a clock, draws
//! from the thread RNG or does IO, so a run is a pure function of its
//! inputs: the simulator drives thousands of these with a seed and replays
//! any run.
//!
//! State is split by owner: [`DesiredState`] (jobs and completions, as
//! durable on this node), [`Seen`] (the cluster as seen), [`LocalInstances`]
//! (this node's copies), [`Placing`] (what it coordinates) and
//! [`AntiEntropy`]; this file holds the glue and the handlers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use shoal_membership::{Load, NodeState};
use shoal_placement::{assign, candidates_with, cost, JobPlacements, Node, NodeIndex};

use crate::config::SchedulerConfig;
use crate::desired::DesiredState;
use crate::hlc::{Clock, Version};
use crate::instance::{
    DriverEvent, ExitStatus, InstanceId, InstanceSpec, InstanceState, Published, SlotState,
};
use crate::job::{JobSpec, JobType, REPLICAS_MAX};
use crate::local::{Local, LocalInstances};
use crate::placing::{Placing, Round};
use crate::reconcile::{finished, needs_placing, own_copy_stop, StopReason};
use crate::records::{Completion, JobRecord, Outcome};
use crate::seen::Seen;
use crate::skew::{Offsets, Skewed};
use crate::sync::{AntiEntropy, Exchange, Step};
use crate::view::ClusterView;
use crate::wire::{Request, Response};

/// The time of an input: monotonic for timers, wall-clock milliseconds for
/// versions and run ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub mono: Instant,
    /// Milliseconds since the Unix epoch on this node's clock.
    pub wall_ms: u64,
}

/// Id of a call this node made, reported back with its reply.
pub type CallId = u64;
/// Id the shell gives a peer's request, used to answer it.
pub type ReplyToken = u64;
/// Id the shell gives an API command, used to answer it.
pub type ApiToken = u64;
/// Id of a write the shell persists.
pub type WriteId = u64;

/// A job's windows, computed at the first slot that needs one and kept
/// for the pass: the rolling update's and the drain's.
#[derive(Default)]
struct Windows {
    update: Option<Vec<u32>>,
    drain: Option<Vec<u32>>,
}

/// A command from the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// Submit (or update) a job from its file.
    Submit {
        /// The TOML.
        text: String,
        /// Write only if the job's current version is this number (`0`:
        /// only if there is no live job of that name): a compare-and-set
        /// at the accepting node (`shoal run --check-version`).
        check_version: Option<u64>,
    },
    /// Write an earlier version's spec as the job's next version.
    Revert {
        /// Job name.
        name: String,
        /// The version's number.
        version: u64,
    },
    /// Stop a job.
    Stop {
        /// Job name.
        name: String,
    },
    /// Let a job's update go on past its canaries.
    Promote {
        /// Job name.
        name: String,
    },
    /// Change a job's replica count.
    Scale {
        /// Job name.
        name: String,
        /// New count.
        replicas: u32,
    },
    /// Start a run of a cron job now (`shoal cron force`).
    CronForce {
        /// The cron job.
        name: String,
    },
    /// Change what a node may take (`shoal node drain|eligible|ineligible`).
    Node {
        /// The node.
        node: String,
        /// The change.
        change: NodeChange,
    },
    /// The tail of a slot's output, from whichever node holds it.
    Logs {
        /// Job.
        job: String,
        /// Slot.
        slot: u32,
        /// The node whose copy (`None`: whichever holds the slot; a system
        /// job, whose copies are all slot 0, needs it unless this node
        /// runs one).
        node: Option<String>,
        /// `stdout` or `stderr`.
        stream: String,
        /// At most this many bytes.
        max_bytes: u64,
    },
}

/// Why an API command failed (the API maps each to an HTTP status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request was wrong; the message says how.
    BadRequest(String),
    /// No such job or instance.
    NotFound(String),
    /// The write could not be stored; nothing was accepted.
    Storage(String),
    /// The node cannot serve it now.
    Unavailable(String),
    /// The job moved on since the version the request named.
    Conflict(String),
}

/// The answer to an API command.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiAnswer {
    /// The write is durable on this node and on its way to every node.
    Written(Arc<JobRecord>),
    /// The spec is the job's current one: nothing was written.
    Unchanged(Arc<JobRecord>),
    /// Failed.
    Failed(ApiError),
}

/// Where output read by the shell goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogsTo {
    /// An API command.
    Api(ApiToken),
    /// A peer's request.
    Peer(ReplyToken),
}

/// Work for the shell.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Start an instance; report with [`Scheduler::handle_started`].
    StartInstance {
        /// Driver.
        driver: String,
        /// What to run.
        spec: Box<InstanceSpec>,
    },
    /// Stop an instance (its end comes as a driver event).
    StopInstance {
        /// Driver.
        driver: String,
        /// Which.
        id: InstanceId,
        /// Time between the stop signal and the kill.
        grace: Duration,
    },
    /// Stop an instance if it runs (the signal, a kill after `grace`), then
    /// forget it, in that order: for copies this node does not keep (after
    /// a restart, or at shutdown), whose end it will not wait for.
    Discard {
        /// Driver.
        driver: String,
        /// Which.
        id: InstanceId,
        /// Time between the stop signal and the kill.
        grace: Duration,
    },
    /// Run a running copy's health checks, each every its interval,
    /// until [`Effect::UnwatchChecks`]; report each result with
    /// [`Scheduler::handle_check`].
    WatchChecks {
        /// Driver (it runs exec checks).
        driver: String,
        /// Which copy.
        id: InstanceId,
        /// Its checks.
        probes: Vec<crate::health::Probe>,
    },
    /// Stop running a copy's checks (it stops, or ended).
    UnwatchChecks {
        /// Which copy.
        id: InstanceId,
    },
    /// Forget an ended instance (its files).
    RemoveInstance {
        /// Driver.
        driver: String,
        /// Which.
        id: InstanceId,
    },
    /// Send a request; with a call id, report the reply (or the failure)
    /// with [`Scheduler::handle_reply`].
    Send {
        /// Peer name.
        to: Arc<str>,
        /// Peer address.
        addr: SocketAddr,
        /// The request.
        request: Request,
        /// Report the reply for this call.
        call: Option<CallId>,
        /// Give up after this long.
        timeout: Duration,
    },
    /// Answer a peer's request.
    Reply {
        /// Which request.
        token: ReplyToken,
        /// The answer.
        response: Response,
    },
    /// Make records durable; report with [`Scheduler::handle_persisted`].
    Persist {
        /// Report with this id.
        write: WriteId,
        /// Job records (the store keeps the newer per job).
        jobs: Vec<Arc<JobRecord>>,
        /// Completions.
        completions: Vec<Completion>,
    },
    /// Make the remembered membership durable (replacing what the store
    /// held; see [`crate::seen`]); give it to [`Scheduler::new`] at the next
    /// start. Not reported: it is written again at the next change and
    /// every [`REMEMBER_REWRITE`].
    Remember {
        /// Every remembered member, this node included, with when it was
        /// last seen live (ms since the epoch; 0: never).
        members: Vec<(String, u64)>,
    },
    /// Delete collected jobs from the store: each job's record if the store
    /// still holds it at that version (`None`: no record), and its
    /// completions. Not reported: a delete that fails leaves a tombstone
    /// that is collected again after the next start.
    Forget {
        /// (job, version of its tombstone).
        jobs: Vec<(String, Option<Version>)>,
    },
    /// Set (or delete) a gossip key of this node.
    Publish {
        /// Key.
        key: String,
        /// Value, or `None` to delete.
        value: Option<String>,
    },
    /// Publish this node's load.
    PublishLoad(Load),
    /// Answer an API command.
    Answer {
        /// Which command.
        token: ApiToken,
        /// The answer.
        answer: ApiAnswer,
    },
    /// Read an instance's output from its driver and send it (to the API,
    /// or as the reply to a peer's request).
    ReadLogs {
        /// Driver.
        driver: String,
        /// Which instance.
        id: InstanceId,
        /// `stdout` or `stderr`.
        stream: String,
        /// At most this many bytes.
        max_bytes: u64,
        /// For a chunked read (a peer's `Request::Logs` with `chunked`):
        /// the offset to start at (`None`: the start of the last
        /// `max_bytes`). The answer is then one `Response::LogChunk` of at
        /// most `wire::LOG_CHUNK_MAX` bytes.
        chunk: Option<Option<u64>>,
        /// Where the bytes go.
        to: LogsTo,
    },
    /// Ask the holder of an instance for its output and answer the API
    /// command with it.
    FetchLogs {
        /// Holder address.
        addr: SocketAddr,
        /// The request.
        request: Request,
        /// The API command.
        token: ApiToken,
        /// Give up after this long.
        timeout: Duration,
    },
}

/// An instance a driver still has after an agent restart.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Its driver.
    pub driver: String,
    /// What it runs.
    pub spec: InstanceSpec,
    /// Its state.
    pub state: InstanceState,
}

enum Call {
    Bid {
        round: u64,
        bidder: Arc<str>,
    },
    /// A push of an API write whose answer waits for a peer's copy.
    Replicate {
        write: WriteId,
    },
    Start {
        job: String,
        slots: Vec<u32>,
        winner: Arc<str>,
    },
    Sync,
    /// Whether a peer holds a claim this node holds (see [`never`]).
    ClaimCheck {
        job: String,
        slot: u32,
        version: Version,
        peer: Arc<str>,
    },
}

enum Origin {
    Api(ApiToken),
    /// What this node wrote as a job's coordinator (an automatic revert,
    /// a deployment's end): pushed to every node once durable.
    Coordinator,
    /// A peer's push: answered once durable, when it asked (`Some`).
    Peer(Option<ReplyToken>),
    Sync,
    Completion,
}

/// API writes held while the node catches up, at most.
const HELD_API_MAX: usize = 256;

/// Peers asked to confirm an API write's second copy (the others get the
/// push without an answer).
const REPLICAS_ASKED: usize = 3;

/// What became of records or completions offered to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Nothing was newer.
    Nothing,
    /// The newer ones are being written.
    Writing,
    /// Too many writes in flight: dropped (they come again).
    Dropped,
}

/// An API write durable here, waiting for a peer to have it too.
struct Replicating {
    token: ApiToken,
    record: Arc<JobRecord>,
    deadline: Instant,
}

struct Write {
    jobs: Vec<Arc<JobRecord>>,
    completions: Vec<Completion>,
    origin: Origin,
}

/// A deployment's progress as its coordinator saw it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    seq: u64,
    ready: u32,
    since: Instant,
}

/// Counters of what this node did (for `/v1/stats` and the simulator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reconcile passes.
    pub passes: u64,
    /// Placement rounds begun.
    pub rounds: u64,
    /// Slots assigned to a winner.
    pub placed: u64,
    /// Slot placements that failed (no node fits, or refused).
    pub unplaceable: u64,
    /// Instance starts issued.
    pub starts: u64,
    /// Stops issued.
    pub stops: u64,
    /// Anti-entropy exchanges begun.
    pub syncs: u64,
    /// Records and completions learned by anti-entropy.
    pub synced_items: u64,
    /// Freezes noticed (longer than `stall` between timers).
    pub stalls: u64,
    /// Records refused (or, from the disk, not let move the clock) for a
    /// version more than `max_clock_offset` ahead of this node's clock.
    pub future_records: u64,
    /// Stopped jobs forgotten after `job_gc_after`.
    pub jobs_collected: u64,
    /// Joining nodes refused because a live member has their name.
    pub name_claims_refused: u64,
    /// Anti-entropy exchanges completed (`syncs` counts those begun).
    pub syncs_done: u64,
    /// API writes refused because of a clock skew.
    pub skew_refusals: u64,
    /// Copies whose health changed.
    pub health_changes: u64,
    /// Copies restarted because a check turned critical.
    pub health_restarts: u64,
    /// Automatic reverts written.
    pub reverts: u64,
    /// Deployments' ends written (successful or failed).
    pub deployments_ended: u64,
    /// Cron runs this node wrote (the same run written by two nodes is
    /// one run: see [`crate::cron`]).
    pub cron_fired: u64,
    /// Scheduled times skipped: past `starting_deadline` before any node
    /// wrote them, or skipped by `concurrency = "forbid"`.
    pub cron_skipped: u64,
    /// Writes of slot claims (`partition = "never"`): claims and
    /// releases.
    pub claims_written: u64,
}

/// What a catalog was built from: the records' fingerprint, the view's
/// number, and this node's own copies.
type CatalogKey = (u64, u64, Vec<(String, crate::instance::Published)>);

/// The remembered membership is written to disk at least this often (see
/// [`crate::seen`]).
pub const REMEMBER_REWRITE: Duration = Duration::from_secs(60);

/// Most own completions held to announce once the node sees a peer (see
/// `Scheduler::unannounced`; a restart recovers at most the node's copies).
pub const UNANNOUNCED_MAX: usize = 100_000;

/// One node's scheduler.
pub struct Scheduler {
    config: SchedulerConfig,
    me: Arc<str>,
    drivers: BTreeSet<String>,
    rng: StdRng,
    clock: Clock,
    desired: DesiredState,
    seen: Seen,
    local: LocalInstances,
    placing: Placing,
    sync: AntiEntropy,
    next_id: u64,
    calls: BTreeMap<CallId, Call>,
    writes: BTreeMap<WriteId, Write>,
    /// Deployments of the jobs this node coordinates: the version, its
    /// ready slots, and when that count last grew (`progress_deadline`).
    progress: BTreeMap<String, Progress>,
    /// Per job with an older copy here, the task it runs now and when
    /// this node first saw it: an old copy stops by the update window only
    /// `update_settle` later (see `own_copies`). At most one entry per job.
    task_seen: BTreeMap<String, (u64, Instant)>,
    /// Per system job, the task this node last tried to start (a new one
    /// is tried at once, whatever the backoff). One entry per system job.
    system_tried: BTreeMap<String, u64>,
    /// Completions whose write failed, tried again on the timer.
    unsaved: Vec<Completion>,
    /// This node's own completions that became durable while it saw no
    /// live peer or had not caught up (a batch success found after an
    /// agent restart lands before the first view): pushed to every peer
    /// once it has (simulator, seed 1957: the push went to nobody, the
    /// node died again, and the slot's coordinator, which had not pulled
    /// the completion yet, ran the slot a second time). At most
    /// [`UNANNOUNCED_MAX`]; anti-entropy spreads any beyond.
    unannounced: Vec<Completion>,
    /// API writes durable here whose answer waits for a peer's copy.
    replicating: BTreeMap<WriteId, Replicating>,
    /// API writes that came before the node caught up, with when.
    held_api: Vec<(ApiToken, ApiRequest, Instant)>,
    out: Vec<Effect>,
    last_timer: Option<Instant>,
    /// When tombstones were last collected.
    last_gc: Option<Instant>,
    last_pass: Option<Instant>,
    pass_cost: Duration,
    dirty: bool,
    /// No coordination before this instant (see `join_grace`).
    coordinate_after: Instant,
    /// The node's disk held jobs or completions when it started (a restart,
    /// not a new or wiped node): it may answer anti-entropy before it has
    /// caught up, so that a whole cluster restarted with seeds recovers.
    started_with_state: bool,
    counters: Counters,
    /// Clock offsets to peers (see [`crate::skew`]).
    offsets: Offsets,
    /// The wall clock of the input being handled (ms since the epoch).
    wall_ms: u64,
    /// The last run id given (run ids only grow).
    last_run_id: u64,
    /// Cron jobs' clocks (see [`crate::cron`]), one per live cron job.
    cron_clocks: BTreeMap<String, crate::cron::CronClock>,
    /// When this node first knew each claim naming it (see
    /// [`never`]): one entry per slot it holds.
    claims_seen: BTreeMap<(String, u32), never::HeldClaim>,
    /// The last catalog built, with what it was built from.
    catalog_cache: Option<(CatalogKey, Arc<crate::catalog::Catalog>)>,
    /// Views taken so far.
    views: u64,
    /// When the remembered membership was last given to the disk.
    remembered_at: Option<Instant>,
}

impl Scheduler {
    /// A scheduler for node `me` with the state its disk holds. `joining`:
    /// the node was started with seeds, so it catches up with a peer before
    /// it places or starts anything, and holds coordination for the join
    /// grace. `seed` drives its random choices (derive it from the node's
    /// name and generation so that a run can be replayed).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: SchedulerConfig,
        me: &str,
        drivers: BTreeSet<String>,
        seed: u64,
        stored_jobs: Vec<JobRecord>,
        stored_completions: Vec<Completion>,
        remembered: Vec<(String, u64)>,
        joining: bool,
        now: Now,
    ) -> Scheduler {
        let mut clock = Clock::default();
        let stored_jobs: Vec<JobRecord> = stored_jobs
            .into_iter()
            .filter(|r| r.validate().is_ok())
            .collect();
        let mut counters = Counters::default();
        let bound = config.max_clock_offset_ms();
        for r in &stored_jobs {
            // A record this node stored when its clock (or a peer's) ran
            // ahead stays, but does not drag the clock along: a write to
            // its job is refused until the clock passes it (see `write`).
            if clock.observe(r.version.hlc, now.wall_ms, bound).is_err() {
                counters.future_records = counters.future_records.saturating_add(1);
            }
        }
        let coordinate_after = if joining {
            now.mono + config.join_grace
        } else {
            now.mono
        };
        let started_with_state = !stored_jobs.is_empty() || !stored_completions.is_empty();
        let mut seen = Seen::default();
        seen.restore_remembered(remembered);
        Scheduler {
            started_with_state,
            desired: DesiredState::from_stored(stored_jobs, stored_completions),
            me: Arc::from(me),
            drivers,
            rng: StdRng::seed_from_u64(seed),
            clock,
            seen,
            local: LocalInstances::default(),
            placing: Placing::default(),
            sync: AntiEntropy::new(!joining || config.act_before_catch_up),
            next_id: 0,
            calls: BTreeMap::new(),
            writes: BTreeMap::new(),
            progress: BTreeMap::new(),
            task_seen: BTreeMap::new(),
            system_tried: BTreeMap::new(),
            unsaved: Vec::new(),
            unannounced: Vec::new(),
            replicating: BTreeMap::new(),
            held_api: Vec::new(),
            out: Vec::new(),
            last_timer: None,
            last_gc: None,
            last_pass: None,
            pass_cost: Duration::ZERO,
            dirty: true,
            coordinate_after,
            counters,
            offsets: Offsets::default(),
            wall_ms: now.wall_ms,
            last_run_id: 0,
            cron_clocks: BTreeMap::new(),
            claims_seen: BTreeMap::new(),
            catalog_cache: None,
            views: 0,
            remembered_at: None,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// What this node did so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Clock offsets to the peers measured so far.
    pub fn clock_offsets(&self) -> &Offsets {
        &self.offsets
    }

    /// Whether this node's clock is off most of its peers' by more than
    /// `max_clock_offset` (it then refuses API writes).
    pub fn clock_skew(&self, now: Instant) -> Option<Skewed> {
        self.offsets.verdict(self.config.max_clock_offset_ms(), now)
    }

    /// Whether this node has caught up with a peer since it started.
    pub fn caught_up(&self) -> bool {
        self.sync.caught_up
    }

    /// The desired state this node holds.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The cluster as this node sees it.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }

    /// The service catalog as this node sees it (see [`crate::catalog`]),
    /// built again only when the records or the view changed.
    pub fn catalog(&mut self) -> Arc<crate::catalog::Catalog> {
        let own: Vec<(String, crate::instance::Published)> = self
            .local
            .iter()
            .map(|l| (l.id.job.clone(), l.published()))
            .collect();
        let key = (self.desired.fingerprints().0, self.views, own);
        if let Some((k, c)) = &self.catalog_cache {
            if *k == key {
                return c.clone();
            }
        }
        let c = Arc::new(crate::catalog::build(
            &self.desired,
            &self.seen.view,
            &self.me,
            &key.2,
        ));
        self.catalog_cache = Some((key, c.clone()));
        c
    }

    /// This node's copies.
    pub fn local(&self) -> &LocalInstances {
        &self.local
    }

    /// The coordinator's state.
    pub fn placing(&self) -> &Placing {
        &self.placing
    }

    /// Writes handed to the store and not yet reported.
    pub fn writes_in_flight(&self) -> usize {
        self.writes.len()
    }

    /// The peer of the anti-entropy exchange in flight, if any.
    pub fn exchange_peer(&self) -> Option<&str> {
        self.sync.exchange.as_ref().map(|e| &*e.peer)
    }

    /// The shell reports how long the last whole pass took: the next one
    /// waits `pace` times as long.
    pub fn set_pass_cost(&mut self, cost: Duration) {
        self.pass_cost = cost;
    }

    fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn next_version(&mut self, now: Now) -> Version {
        Version {
            hlc: self.clock.tick(now.wall_ms),
            node: self.me.to_string(),
        }
    }

    /// A new run id: from the clock (so ids order by start time across
    /// restarts), and always above the last one given, so two copies
    /// never share one. A clock beyond what the packing holds (year 2527:
    /// a wall clock 1,000 years fast, the #11 probe) packs as `u64::MAX`;
    /// ids then simply count up.
    pub(crate) fn run_id(&mut self, now: Now) -> u64 {
        let packed = self.clock.tick(now.wall_ms).packed();
        let next = self.last_run_id.saturating_add(1);
        let id = if packed == u64::MAX {
            next
        } else {
            packed.max(next)
        };
        self.last_run_id = id;
        id
    }

    fn send(&mut self, to: &Arc<str>, request: Request, call: Option<Call>, timeout: Duration) {
        let Some(addr) = self.seen.view.members.get(to).map(|m| m.record.address) else {
            if let Some(c) = call {
                // Nowhere to send it: the call fails at once.
                let id = self.id();
                self.calls.insert(id, c);
                self.out.push(Effect::Send {
                    to: to.clone(),
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    request,
                    call: Some(id),
                    timeout: Duration::ZERO,
                });
            }
            return;
        };
        let call = call.map(|c| {
            let id = self.id();
            self.calls.insert(id, c);
            id
        });
        self.out.push(Effect::Send {
            to: to.clone(),
            addr,
            request,
            call,
            timeout,
        });
    }

    /// Alive peers (name, address).
    fn alive_peers(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.seen
            .view
            .members
            .iter()
            .filter(|m| m.name != self.me && m.state == NodeState::Alive)
            .map(|m| (m.name.clone(), m.record.address))
            .collect()
    }

    fn push_to_all(&mut self, request: Request) {
        for (to, addr) in self.alive_peers() {
            self.out.push(Effect::Send {
                to,
                addr,
                request: request.clone(),
                call: None,
                timeout: self.config.call_timeout,
            });
        }
    }

    fn persist(&mut self, jobs: Vec<Arc<JobRecord>>, completions: Vec<Completion>, origin: Origin) {
        let id = self.id();
        self.out.push(Effect::Persist {
            write: id,
            jobs: jobs.clone(),
            completions: completions.clone(),
        });
        self.writes.insert(
            id,
            Write {
                jobs,
                completions,
                origin,
            },
        );
    }

    /// This node as placement sees it, with its own fresh load.
    pub fn fresh_node(&self) -> Node {
        let record = self.seen.view.members.get(&self.me).map(|m| &*m.record);
        let mut node = self.local.fresh_node(&self.me, record, &self.drivers);
        node.eligible = self.eligible(&self.me);
        node
    }

    // ---- inputs ----

    /// Instances the drivers still have from before an agent restart.
    pub fn handle_recovered(&mut self, recovered: Vec<Recovered>, now: Now) -> Vec<Effect> {
        for r in recovered {
            let id = r.spec.id.clone();
            let record = self.desired.get(&id.job).filter(|r| r.is_live()).cloned();
            let Some(record) = record else {
                // Its job is gone: make sure it is too (stop, then forget:
                // in parallel the forget could lose the process before the
                // stop found it — found in review).
                self.out.push(Effect::Discard {
                    driver: r.driver,
                    id,
                    grace: r.spec.task.kill_timeout.unwrap_or(self.config.stop_grace),
                });
                continue;
            };
            if self.local.get(&id.job, id.slot).is_some() {
                // Two runs of one slot on this node: keep the first.
                self.out.push(Effect::Discard {
                    driver: r.driver,
                    id,
                    grace: r.spec.task.kill_timeout.unwrap_or(self.config.stop_grace),
                });
                continue;
            }
            let running = r.state == InstanceState::Running;
            let batch = record
                .spec
                .as_ref()
                .is_some_and(|s| s.job_type == JobType::Batch);
            let success = matches!(&r.state, InstanceState::Exited(s) if s.success());
            if !(running || batch && success) {
                // It ended while the agent was down. Anything but a batch
                // success is forgotten rather than restarted: its slot may
                // run elsewhere by now, and is placed again if not.
                self.out.push(Effect::RemoveInstance {
                    driver: r.driver,
                    id,
                });
                continue;
            }
            let seq = if r.spec.seq == 0 && r.spec.job_version == record.version {
                record.seq
            } else {
                r.spec.seq
            };
            self.local.insert(Local {
                id: id.clone(),
                driver: r.driver,
                task: r.spec.task.fingerprint(),
                record,
                state: SlotState::Running,
                restarts: 0,
                restart_at: None,
                stopping: false,
                stop_sent: None,
                stop_at: None,
                restarting: false,
                ready: false,
                placed_at: now.mono,
                was_ready: false,
                failed: false,
                start_in_flight: false,
                error: None,
                unconfirmed: running,
                ports: r.spec.ports.clone(),
                seq,
                checks: r.spec.task.checks.clone(),
                tracker: None,
            });
            // A copy found running is watched at the first pass (once the
            // view holds this node's address, which its checks probe).
            if !running {
                self.ended(id, r.state, now);
            }
        }
        // Copies found running wait for gossip to show whether the cluster
        // replaced them, also on a node started without seeds (found in
        // review: a restarted bootstrap node kept them at its first pass).
        if self.local.iter().any(|l| l.unconfirmed) {
            self.coordinate_after = self.coordinate_after.max(now.mono + self.config.join_grace);
        }
        self.dirty = true;
        self.take()
    }

    /// A new view of the cluster.
    pub fn handle_view(&mut self, view: ClusterView, now: Now) -> Vec<Effect> {
        self.notice_stall(now);
        self.views = self.views.wrapping_add(1);
        let news = self
            .seen
            .update(&self.me, view, self.config.join_grace, now.mono);
        self.recount(now);
        if news.member_added {
            self.placing.retry_now(None, now.mono);
        }
        self.dirty = true;
        self.take()
    }

    /// Brings the remembered membership and the minority flags up to date
    /// with the view, the forgets and the long dead (see [`crate::seen`]);
    /// a node back on a majority side re-checks its copies.
    fn recount(&mut self, now: Now) {
        let desired = &self.desired;
        let forgotten = |n: &str| desired.node_setting(n).and_then(|s| s.forgotten.clone());
        let remember = crate::seen::Remember {
            me: &self.me,
            dead_after: self.config.remember_dead,
            forgotten: &forgotten,
            wall_ms: now.wall_ms,
        };
        if self.seen.recount(&remember, now.mono) {
            self.recheck_local(now);
        }
        self.remembered_to_disk(now);
    }

    /// Makes the remembered membership durable if it changed, and every
    /// [`REMEMBER_REWRITE`] whatever (when members were last seen live
    /// moves on; and a write lost to a full queue or disk is made again).
    fn remembered_to_disk(&mut self, now: Now) {
        let due = self
            .remembered_at
            .is_none_or(|t| now.mono.saturating_duration_since(t) >= REMEMBER_REWRITE);
        if let Some(members) = self.seen.take_remembered(due) {
            self.remembered_at = Some(now.mono);
            self.out.push(Effect::Remember { members });
        }
    }

    /// A peer's request (always answered with an [`Effect::Reply`] for
    /// `token`, or by the shell for [`Effect::ReadLogs`]).
    pub fn handle_request(&mut self, token: ReplyToken, request: Request, now: Now) -> Vec<Effect> {
        self.notice_stall(now);
        let response = match request {
            Request::PutJobs(records) => {
                // Answered once the records are on this node's disk: the
                // pusher counts that as a second copy. A record from too
                // far in the future is refused whole, and the pusher told
                // why (its clock, or the writer's, is off).
                let bound = self.config.max_clock_offset_ms();
                let future = records.iter().find_map(|r| {
                    r.version
                        .hlc
                        .ahead_of(now.wall_ms, bound)
                        .err()
                        .map(|e| (r, e))
                });
                if let Some((r, e)) = future {
                    self.counters.future_records = self.counters.future_records.saturating_add(1);
                    let response = Response::Error(format!(
                        "{} job `{}`: {e} (max_clock_offset is {bound} ms); check the clocks \
                         (`shoal nodes` shows each peer's offset)",
                        crate::wire::CLOCK_REFUSAL,
                        r.name
                    ));
                    self.out.push(Effect::Reply { token, response });
                    return self.take();
                }
                match self.take_records(records, Origin::Peer(Some(token))) {
                    Taken::Writing => return self.take(),
                    Taken::Nothing => Response::Ok,
                    // Not stored: the pusher must not count this node as a
                    // copy (found in review).
                    Taken::Dropped => {
                        Response::Error("too many writes in flight here; not stored".into())
                    }
                }
            }
            Request::PutCompletions(cs) => {
                let _ = self.take_completions(cs, Origin::Peer(None));
                Response::Ok
            }
            // A node that has not caught up and started with nothing (new,
            // or wiped) has nothing to teach: two such nodes comparing their
            // empty states would each count as caught up (found in review).
            Request::SyncHash { .. }
            | Request::SyncJobs { .. }
            | Request::SyncCompletions { .. }
                if !self.sync.caught_up && !self.started_with_state && !self.sync.was_caught_up =>
            {
                Response::Error("this node is still catching up".into())
            }
            Request::SyncHash {
                jobs,
                completions,
                clock,
            } => {
                let wall_ms = now.wall_ms;
                match ((jobs, completions) == self.desired.fingerprints(), clock) {
                    (true, true) => Response::InSyncAt { wall_ms },
                    (false, true) => Response::DiffersAt { wall_ms },
                    (true, false) => Response::InSync,
                    (false, false) => Response::Differs,
                }
            }
            Request::SyncJobs {
                after,
                until,
                digest,
            } => {
                if digest.len() > self.config.sync_digest_page.saturating_mul(2) {
                    Response::Error(format!("digest page of {} names refused", digest.len()))
                } else {
                    let (newer, want, more) = self.desired.compare_page(
                        after.as_deref(),
                        until.as_deref(),
                        &digest,
                        self.config.sync_records_max,
                    );
                    Response::SyncedJobs { newer, want, more }
                }
            }
            Request::SyncCompletions {
                after,
                until,
                digest,
            } => {
                if digest.len() > self.config.sync_completions_page.saturating_mul(2) {
                    Response::Error(format!("digest page of {} slots refused", digest.len()))
                } else {
                    let (missing, more) = self.desired.missing_completions(
                        after.as_ref(),
                        until.as_ref(),
                        &digest,
                        self.config.sync_completions_page,
                    );
                    Response::SyncedCompletions { missing, more }
                }
            }
            Request::Bid => Response::Bid(self.fresh_node()),
            Request::Start {
                job,
                slots,
                sent_ms,
            } => {
                let age_ms = now.wall_ms.saturating_sub(sent_ms);
                let refused = if age_ms > self.config.start_max_age.as_millis() as u64 {
                    // Found by the simulator (seed 118): a start that waited
                    // 7 s at a paused winner ran a batch slot that had been
                    // placed again and completed elsewhere meanwhile.
                    slots
                        .iter()
                        .map(|s| {
                            (
                                *s,
                                format!("the start arrived {age_ms} ms after it was sent"),
                            )
                        })
                        .collect()
                } else {
                    self.start_requested(job, &slots, now)
                };
                Response::Started { refused }
            }
            Request::Claim { name, address } => {
                let taken = self
                    .seen
                    .view
                    .members
                    .get(&name)
                    // Another machine: a restart on the same one (maybe
                    // on another port) before the old process was
                    // declared dead is the same node coming back.
                    .filter(|m| m.is_live() && m.record.address.ip() != address.ip())
                    .map(|m| m.record.address);
                match taken {
                    Some(at) => {
                        self.counters.name_claims_refused =
                            self.counters.name_claims_refused.saturating_add(1);
                        Response::Error(format!(
                            "{} the name `{name}` belongs to the live node at {at}, not to the \
                             node at {address}; a second node of that name would take its place \
                             in every view (its work would run twice): give the new node another \
                             --name, or stop the other one first",
                            crate::wire::NAME_TAKEN
                        ))
                    }
                    None => Response::Claimed {
                        in_touch: self.in_touch(now.wall_ms),
                    },
                }
            }
            Request::HoldsClaim { name, version } => {
                if crate::records::claim_of_record(&name).is_some() {
                    Response::HoldsClaim {
                        holds: self
                            .desired
                            .get(&name)
                            .is_some_and(|r| r.version == version),
                    }
                } else {
                    Response::Error(format!("`{name}` is no claim record"))
                }
            }
            Request::Logs {
                job,
                slot,
                stream,
                max_bytes,
                from,
                chunked,
            } => match self.local.get(&job, slot) {
                Some(l) => {
                    self.out.push(Effect::ReadLogs {
                        driver: l.driver.clone(),
                        id: l.id.clone(),
                        stream,
                        max_bytes,
                        chunk: chunked.then_some(from),
                        to: LogsTo::Peer(token),
                    });
                    return self.take();
                }
                None => Response::Error(format!(
                    "{} holds no instance of {job} slot {slot}",
                    self.me
                )),
            },
        };
        self.out.push(Effect::Reply { token, response });
        self.take()
    }

    /// The reply to one of this node's calls (or why there is none).
    pub fn handle_reply(
        &mut self,
        call: CallId,
        result: Result<Response, String>,
        now: Now,
    ) -> Vec<Effect> {
        self.notice_stall(now);
        let Some(c) = self.calls.remove(&call) else {
            return self.take();
        };
        match c {
            Call::Bid { round, bidder } => {
                let bid = match result {
                    Ok(Response::Bid(node)) if *node.id == *bidder => Some(node),
                    _ => None,
                };
                let done = match self.placing.round_mut(round) {
                    Some(r) => {
                        r.awaiting.remove(&bidder);
                        if let Some(b) = bid {
                            r.bids.insert(bidder, b);
                        }
                        r.awaiting.is_empty()
                    }
                    None => false,
                };
                if done {
                    self.finish_round(round, now);
                }
            }
            // Without an answer the start may or may not have happened, so
            // the slots stay in flight until their copies show or the
            // placement's time runs out.
            Call::Start { job, slots, winner } => {
                if let Ok(Response::Started { refused }) = result {
                    for (slot, why) in refused {
                        if slots.contains(&slot) {
                            self.counters.unplaceable += 1;
                            self.placing.failed(
                                &job,
                                slot,
                                format!("{winner} refused it: {why}"),
                                now.mono,
                                (self.config.retry_min, self.config.retry_max),
                            );
                        }
                    }
                    self.dirty = true;
                }
            }
            Call::Sync => self.sync_reply(call, result, now),
            Call::ClaimCheck {
                job,
                slot,
                version,
                peer,
            } => {
                if let Ok(Response::HoldsClaim { holds: true }) = result {
                    self.claim_acked(&job, slot, &version, peer);
                }
            }
            // A peer that refused the write for its clock (`CLOCK_REFUSAL`)
            // does not count as a copy; the answer waits for another one, or
            // the timeout. The write is durable here and takes effect
            // everywhere once its version is no longer ahead: answering it
            // as failed would be wrong (the simulator, 4 of 30 seeds at 30
            // nodes with ±500 ms skew, reported writes that ran although
            // their client was told they failed).
            Call::Replicate { write } => {
                if let Ok(Response::Ok) = result {
                    if let Some(r) = self.replicating.remove(&write) {
                        self.answer(r.token, Ok(r.record));
                    }
                }
            }
        }
        self.take()
    }

    /// An API command.
    pub fn handle_api(&mut self, token: ApiToken, request: ApiRequest, now: Now) -> Vec<Effect> {
        self.notice_stall(now);
        let is_write = !matches!(request, ApiRequest::Logs { .. });
        if is_write && !self.sync.caught_up {
            // A node still catching up would answer a stop or a scale with
            // "no such job", and give a submission a version that a newer
            // write it has not seen yet beats (found in review): writes wait
            // until it has caught up, a bounded while.
            if self.held_api.len() >= HELD_API_MAX {
                self.answer(
                    token,
                    Err(ApiError::Unavailable(
                        "this node is still catching up with the cluster; try again shortly or ask another node".into(),
                    )),
                );
            } else {
                self.held_api.push((token, request, now.mono));
            }
            return self.take();
        }
        self.api(token, request, now);
        self.take()
    }

    fn api(&mut self, token: ApiToken, request: ApiRequest, now: Now) {
        match request {
            ApiRequest::Submit {
                text,
                check_version,
            } => match JobSpec::parse(&text) {
                Err(e) => self.answer(token, Err(ApiError::BadRequest(e.to_string()))),
                Ok(spec) if spec.parent.is_some() => self.answer(
                    token,
                    Err(ApiError::BadRequest(
                        "`parent` is set by shoal on a cron job's runs; a job file cannot set it: remove it".into(),
                    )),
                ),
                Ok(spec) => {
                    let current = self.desired.get(&spec.name).cloned();
                    let live = current.as_ref().filter(|r| r.is_live());
                    if let Some(want) = check_version {
                        let have = live.map_or(0, |r| r.seq.max(1));
                        if have != want {
                            return self.answer(
                                token,
                                Err(ApiError::Conflict(format!(
                                    "job `{}` is at {}, not {}: it moved on; look at `shoal job history {}` and plan again",
                                    spec.name,
                                    if have == 0 { "no live version".to_string() } else { format!("v{have}") },
                                    if want == 0 { "absent".to_string() } else { format!("v{want}") },
                                    spec.name
                                ))),
                            );
                        }
                    }
                    if let Some(why) = crate::catalog::ingress_conflict(
                        &self.desired,
                        self.config.port_range,
                        &spec,
                    ) {
                        return self.answer(token, Err(ApiError::Conflict(why)));
                    }
                    match live {
                        Some(r) if r.spec.as_ref() == Some(&spec) => {
                            self.out.push(Effect::Answer {
                                token,
                                answer: ApiAnswer::Unchanged(r.clone()),
                            });
                        }
                        _ => self.write(token, spec.name.clone(), Some(spec), now),
                    }
                }
            },
            ApiRequest::Revert { name, version } => {
                let Some(current) = self.desired.get(&name).cloned() else {
                    return self.answer(
                        token,
                        Err(ApiError::NotFound(format!("no job named `{name}`"))),
                    );
                };
                let Some(spec) = current
                    .spec_of(version)
                    .filter(|s| s.validate("").is_ok())
                    .cloned()
                else {
                    let kept: Vec<String> = current
                        .spec
                        .iter()
                        .map(|_| current.seq)
                        .chain(current.history.iter().map(|e| e.seq))
                        .map(|s| format!("v{s}"))
                        .collect();
                    return self.answer(
                        token,
                        Err(ApiError::NotFound(format!(
                            "job `{name}` keeps no version v{version}; it keeps {}",
                            if kept.is_empty() { "none".to_string() } else { kept.join(", ") }
                        ))),
                    );
                };
                if current.spec.as_ref() == Some(&spec) {
                    self.out.push(Effect::Answer {
                        token,
                        answer: ApiAnswer::Unchanged(current),
                    });
                } else if let Some(why) =
                    crate::catalog::ingress_conflict(&self.desired, self.config.port_range, &spec)
                {
                    self.answer(token, Err(ApiError::Conflict(why)));
                } else {
                    self.write(token, name, Some(spec), now);
                }
            }
            ApiRequest::Promote { name } => self.promote(token, name, now),
            ApiRequest::CronForce { name } => self.cron_force(token, name, now),
            ApiRequest::Node { node, change } => self.set_node(token, node, change, now),
            ApiRequest::Stop { name } => match self.desired.spec(&name) {
                None => self.answer(
                    token,
                    Err(ApiError::NotFound(format!("no job named `{name}` is running"))),
                ),
                Some(_) => self.write(token, name, None, now),
            },
            ApiRequest::Scale { name, replicas } => match self.desired.spec(&name).cloned() {
                None => self.answer(
                    token,
                    Err(ApiError::NotFound(format!("no job named `{name}` is running"))),
                ),
                Some(spec) if spec.job_type == JobType::System => self.answer(
                    token,
                    Err(ApiError::BadRequest(format!(
                        "`{name}` is a system job: it runs on every node that meets its constraints; change its constraints to change where"
                    ))),
                ),
                Some(_) if replicas == 0 || replicas > REPLICAS_MAX => self.answer(
                    token,
                    Err(ApiError::BadRequest(format!(
                        "replicas must be between 1 and {REPLICAS_MAX} (use `shoal stop` to stop a job)"
                    ))),
                ),
                Some(spec) if spec.replicas == replicas => {
                    if let Some(r) = self.desired.get(&name).cloned() {
                        self.out.push(Effect::Answer {
                            token,
                            answer: ApiAnswer::Unchanged(r),
                        });
                    }
                }
                Some(mut spec) => {
                    spec.replicas = replicas;
                    self.write(token, name, Some(spec), now)
                }
            },
            ApiRequest::Logs {
                job,
                slot,
                node,
                stream,
                max_bytes,
            } => self.logs(token, job, slot, node, stream, max_bytes, now),
        }
    }

    /// A write the shell persisted (or could not).
    pub fn handle_persisted(
        &mut self,
        write: WriteId,
        result: Result<(), String>,
        now: Now,
    ) -> Vec<Effect> {
        let Some(w) = self.writes.remove(&write) else {
            return self.take();
        };
        match result {
            Ok(()) => {
                for r in &w.jobs {
                    self.apply_record(r.clone(), now);
                }
                let mut new_completions = Vec::new();
                for c in &w.completions {
                    if self.desired.complete(c.clone()) {
                        new_completions.push(c.clone());
                        self.dirty = true;
                    }
                }
                match w.origin {
                    Origin::Api(token) => self.replicate(write, token, w.jobs, now),
                    Origin::Completion => {
                        if !new_completions.is_empty() {
                            if !self.sync.caught_up || self.alive_peers().is_empty() {
                                let room = UNANNOUNCED_MAX.saturating_sub(self.unannounced.len());
                                self.unannounced
                                    .extend(new_completions.iter().take(room).cloned());
                            }
                            self.push_to_all(Request::PutCompletions(new_completions));
                        }
                    }
                    Origin::Peer(Some(reply)) => self.out.push(Effect::Reply {
                        token: reply,
                        response: Response::Ok,
                    }),
                    Origin::Peer(None) | Origin::Sync => {}
                    Origin::Coordinator => self.push_to_all(Request::PutJobs(w.jobs.clone())),
                }
            }
            Err(e) => match w.origin {
                Origin::Api(token) => self.answer(
                    token,
                    Err(ApiError::Storage(format!(
                        "the write could not be stored on this node ({e}); nothing was accepted"
                    ))),
                ),
                // Tried again on the timer: a completion must not be lost.
                Origin::Completion => self.unsaved.extend(w.completions),
                Origin::Peer(Some(reply)) => self.out.push(Effect::Reply {
                    token: reply,
                    response: Response::Error(format!("not stored: {e}")),
                }),
                // What anti-entropy brought is not on disk: the node has not
                // caught up (found in review), and the next exchange brings
                // it again.
                Origin::Sync => {
                    if !self.sync.caught_up {
                        self.sync.exchange_done = false;
                    }
                }
                // A peer's write comes again by anti-entropy; a revert is
                // decided again at the next pass.
                Origin::Peer(None) | Origin::Coordinator => {}
            },
        }
        self.maybe_caught_up();
        self.take()
    }

    /// A driver's start finished.
    pub fn handle_started(
        &mut self,
        id: InstanceId,
        result: Result<(), String>,
        now: Now,
    ) -> Vec<Effect> {
        let default_grace = self.config.stop_grace;
        let mut ended = None;
        let mut watch = false;
        if let Some(l) = self.local.get_run_mut(&id) {
            let grace = l.stop_grace(default_grace);
            l.start_in_flight = false;
            match result {
                Ok(()) if l.restart_at.is_some() => {
                    // Its end was reported before its start (two channels):
                    // it waits for its restart, which is watched when it runs.
                }
                Ok(()) => {
                    l.error = None;
                    if l.stopping {
                        // Stopped while it was starting: that stop found
                        // nothing to signal yet (found by the chaos suite
                        // as an orphan process), so stop it now that it runs.
                        self.out.push(Effect::StopInstance {
                            driver: l.driver.clone(),
                            id: l.id.clone(),
                            grace,
                        });
                    } else if l.state == SlotState::Starting {
                        l.state = SlotState::Running;
                        watch = true;
                    }
                }
                Err(e) => {
                    l.error = Some(crate::gossip::bounded(format!("start failed: {e}")));
                    ended = Some(InstanceState::Exited(ExitStatus::code(127)));
                }
            }
            self.dirty = true;
        }
        if let Some(state) = ended {
            self.ended(id, state, now);
        } else if watch {
            self.watch_checks(&id, now);
        }
        self.take()
    }

    /// The result of check `index` of copy `id`: `Ok` passed, `Err(why)`
    /// failed. A copy whose health changes is published again; one whose
    /// check asks for it is restarted when the check turns critical.
    pub fn handle_check(
        &mut self,
        id: InstanceId,
        index: usize,
        result: Result<(), String>,
        now: Now,
    ) -> Vec<Effect> {
        self.notice_stall(now);
        let default_grace = self.config.stop_grace;
        let Some(l) = self.local.get_run_mut(&id) else {
            return self.take();
        };
        if l.state != SlotState::Running || l.stopping || l.restarting {
            return self.take();
        }
        let (Some(tracker), Some(spec)) = (l.tracker.as_mut(), l.checks.get(index)) else {
            return self.take();
        };
        let change = tracker.record(index, spec, result, now.mono);
        if change.before != change.after {
            self.dirty = true;
            self.counters.health_changes = self.counters.health_changes.saturating_add(1);
        }
        if change.restart {
            // Restarted as if it had failed: its end comes as a driver
            // event and takes the restart policy's path.
            let reason = tracker.reason(&l.checks).unwrap_or_default();
            l.error = Some(crate::gossip::bounded(format!("restarted: {reason}")));
            // The tracker stays (critical) until the end is reported; one
            // stop per critical turn (requested again if its end does not
            // come: `stops_overdue`).
            l.restarting = true;
            l.stop_sent = Some(now.mono);
            self.counters.health_restarts = self.counters.health_restarts.saturating_add(1);
            let grace = l.stop_grace(default_grace);
            let driver = l.driver.clone();
            self.out.push(Effect::UnwatchChecks { id: id.clone() });
            self.out.push(Effect::StopInstance { driver, id, grace });
            self.dirty = true;
        }
        self.take()
    }

    /// Starts the checks of a copy that runs now (a fresh tracker: its
    /// grace counts from now).
    fn watch_checks(&mut self, id: &InstanceId, now: Now) {
        // The address the copy was given (`SHOAL_ADDR_*`) is the node's in
        // the view; without it yet, the pass watches the copy later.
        let Some(ip) = self
            .seen
            .view
            .members
            .get(&self.me)
            .map(|m| m.record.address.ip())
        else {
            return;
        };
        let Some(l) = self.local.get_run_mut(id) else {
            return;
        };
        l.tracker = Some(crate::health::Tracker::new(l.checks.len(), now.mono));
        if l.checks.is_empty() {
            return;
        }
        let env = crate::ports::instance_env(&l.id, &self.me, &l.ports, Some(ip));
        let probes = l
            .checks
            .iter()
            .enumerate()
            .map(|(index, c)| crate::health::Probe {
                index,
                name: c.display_name(),
                kind: c.kind,
                addr: c
                    .port
                    .as_ref()
                    .and_then(|p| l.ports.get(p))
                    .map(|port| std::net::SocketAddr::new(ip, *port)),
                path: c.path.clone().unwrap_or_else(|| "/".into()),
                command: c
                    .command
                    .iter()
                    .chain(&c.args)
                    .map(|a| crate::ports::interpolate(a, &env))
                    .collect(),
                interval: c.interval,
                timeout: c.timeout(),
            })
            .collect();
        self.out.push(Effect::WatchChecks {
            driver: l.driver.clone(),
            id: id.clone(),
            probes,
        });
    }

    /// News from a driver.
    pub fn handle_driver(&mut self, event: DriverEvent, now: Now) -> Vec<Effect> {
        self.notice_stall(now);
        match event {
            DriverEvent::Ended { id, state } => self.ended(id, state, now),
        }
        self.take()
    }

    /// Time passed: restarts, rounds and placements that ran out, the
    /// reconcile pass when due, anti-entropy.
    pub fn handle_timer(&mut self, now: Now) -> Vec<Effect> {
        self.notice_stall(now);
        self.last_timer = Some(now.mono);
        self.restarts_due(now);
        self.stops_overdue(now);
        self.release_held_api(now);
        let overdue: Vec<WriteId> = self
            .replicating
            .iter()
            .filter(|(_, r)| r.deadline <= now.mono)
            .map(|(w, _)| *w)
            .collect();
        for w in overdue {
            if let Some(r) = self.replicating.remove(&w) {
                self.answer(r.token, Ok(r.record));
            }
        }
        for round in self.placing.overdue(now.mono) {
            self.finish_round(round, now);
        }
        self.placing.expire(now.mono);
        self.cron_step(now);
        let since = self
            .last_pass
            .map(|t| now.mono.saturating_duration_since(t))
            .unwrap_or(Duration::MAX);
        let gap = self
            .config
            .reconcile_interval_min
            .max(self.pass_cost.saturating_mul(self.config.pace));
        if (self.dirty && since >= gap) || since >= self.config.reconcile_interval_max.max(gap) {
            self.dirty = false;
            self.last_pass = Some(now.mono);
            self.pass(now);
        }
        self.anti_entropy(now);
        self.collect_garbage(now);
        if !self.unannounced.is_empty() && self.sync.caught_up && !self.alive_peers().is_empty() {
            let cs = std::mem::take(&mut self.unannounced);
            self.push_to_all(Request::PutCompletions(cs));
        }
        if !self.unsaved.is_empty() && self.writes.len() < self.config.writes_in_flight_max {
            let cs = std::mem::take(&mut self.unsaved);
            self.persist(Vec::new(), cs, Origin::Completion);
        }
        self.take()
    }

    /// Graceful leave: stops every local copy (their slots move to other
    /// nodes).
    pub fn shutdown(&mut self) -> Vec<Effect> {
        let locals: Vec<Local> = self.local.iter().cloned().collect();
        for l in locals {
            self.local.remove(&l.id.job, l.id.slot);
            let grace = l.stop_grace(self.config.stop_grace);
            self.out.push(Effect::Discard {
                driver: l.driver,
                id: l.id,
                grace,
            });
        }
        self.take()
    }

    // ---- writes ----

    fn answer(&mut self, token: ApiToken, result: Result<Arc<JobRecord>, ApiError>) {
        let answer = match result {
            Ok(r) => ApiAnswer::Written(r),
            Err(e) => ApiAnswer::Failed(e),
        };
        self.out.push(Effect::Answer { token, answer });
    }

    /// `shoal deployment promote`: written only while every canary slot
    /// is ready (as this node sees it) and the update waits.
    fn promote(&mut self, token: ApiToken, name: String, now: Now) {
        let Some(record) = self.desired.get(&name).filter(|r| r.is_live()).cloned() else {
            return self.answer(
                token,
                Err(ApiError::NotFound(format!(
                    "no job named `{name}` is running"
                ))),
            );
        };
        let copies = self.copies_of(&name, now.mono);
        let Some(d) = crate::deployment::of(&record, copies.iter().map(|(_, c)| c)) else {
            return self.answer(
                token,
                Err(ApiError::BadRequest(format!(
                    "job `{name}` is not a service: it has no deployments"
                ))),
            );
        };
        if d.canary == 0 {
            return self.answer(
                token,
                Err(ApiError::BadRequest(format!(
                    "job `{name}` has no canaries (set `canary` in its [update]); its updates go on by themselves"
                ))),
            );
        }
        if record.promoted {
            self.out.push(Effect::Answer {
                token,
                answer: ApiAnswer::Unchanged(record),
            });
            return;
        }
        if !d.awaiting_promotion {
            return self.answer(
                token,
                Err(ApiError::Conflict(format!(
                    "v{} of `{name}` has no canaries waiting: {}; see `shoal deployment status {name}`",
                    record.seq,
                    d.describe(&name)
                ))),
            );
        }
        self.write_with(token, name, now, |current, version| {
            current.unwrap_or(&record).promote(version)
        });
    }

    /// Writes a new version of a job (or its tombstone): durable first,
    /// answered and pushed to every node once the store has it.
    fn write(&mut self, token: ApiToken, name: String, spec: Option<JobSpec>, now: Now) {
        self.write_with(token, name.clone(), now, |current, version| {
            JobRecord::next(current, name, version, spec)
        });
    }

    /// Writes the record `make` builds from the job's current one at a new
    /// version, answering `token` once durable (and replicated), or why
    /// not.
    fn write_with(
        &mut self,
        token: ApiToken,
        name: String,
        now: Now,
        make: impl FnOnce(Option<&JobRecord>, Version) -> JobRecord,
    ) {
        if self.writes.len() >= self.config.writes_in_flight_max {
            return self.answer(
                token,
                Err(ApiError::Unavailable(
                    "too many writes are waiting for the disk; try again shortly".into(),
                )),
            );
        }
        if let Some(skew) = self.clock_skew(now.mono) {
            self.counters.skew_refusals = self.counters.skew_refusals.saturating_add(1);
            return self.answer(
                token,
                Err(ApiError::Unavailable(format!(
                    "{skew}, beyond max_clock_offset ({} ms): its writes would be refused or \
                     would overrule newer ones. Fix its time sync (chrony or ntpd), or write \
                     through another node",
                    self.config.max_clock_offset_ms()
                ))),
            );
        }
        let version = self.next_version(now);
        if let Some(current) = self.desired.get(&name).filter(|c| c.version >= version) {
            // The job's current version is from this clock's future (it
            // came from a node whose clock ran ahead): a write now would be
            // older than it and lose everywhere, though answered.
            self.counters.skew_refusals = self.counters.skew_refusals.saturating_add(1);
            let ahead = current.version.hlc.wall_ms.saturating_sub(now.wall_ms);
            return self.answer(
                token,
                Err(ApiError::Unavailable(format!(
                    "job `{name}` was last written by {} at a time {ahead} ms ahead of this \
                     node's clock; a write now would be older and lose. Check the clocks \
                     (`shoal nodes` shows each peer's offset) and try again{}",
                    current.version.node,
                    if ahead > 3_600_000 {
                        "; a record that far ahead will not be caught up with: restart the \
                         nodes that hold it with --drop-future-records"
                    } else {
                        ""
                    }
                ))),
            );
        }
        let current = self.desired.get(&name).map(|r| &**r);
        if current.is_some_and(|c| c.seq >= crate::records::SEQ_MAX) {
            return self.answer(
                token,
                Err(ApiError::BadRequest(format!(
                    "job `{name}` has run out of version numbers; stop it and submit it again"
                ))),
            );
        }
        let was_cron = current
            .and_then(|c| c.spec.as_ref())
            .is_some_and(|s| s.job_type == JobType::Cron);
        let record = Arc::new(make(current, version));
        let mut records = vec![record.clone()];
        if was_cron && record.spec.is_none() {
            // A cron job's stop stops its runs with it.
            records.extend(self.runs_stopped_with(&name, &record.version));
        }
        self.persist(records, Vec::new(), Origin::Api(token));
    }

    /// Whether this node completed an anti-entropy exchange within
    /// `job_gc_after`: its state then holds every tombstone the cluster
    /// has not collected, and a node that was away longer should refill
    /// from it rather than hand back its own (see `Request::Claim`).
    pub fn in_touch(&self, wall_ms: u64) -> bool {
        self.sync
            .last_done_ms
            .is_some_and(|t| wall_ms.saturating_sub(t) <= self.config.job_gc_after_ms())
    }

    /// Versions older than this (ms since the epoch) belong to collected
    /// tombstones' time: `None` while the clock is younger than
    /// `job_gc_after`.
    fn gc_horizon_ms(&self, wall_ms: u64) -> Option<u64> {
        wall_ms.checked_sub(self.config.job_gc_after_ms())
    }

    /// Forgets stopped jobs whose stop is older than `job_gc_after` (and
    /// completions left without a job), every `gc_interval`, at most
    /// `gc_batch_max` at a time.
    fn collect_garbage(&mut self, now: Now) {
        if self
            .last_gc
            .is_some_and(|t| now.mono.saturating_duration_since(t) < self.config.gc_interval)
        {
            return;
        }
        self.last_gc = Some(now.mono);
        let Some(horizon) = self.gc_horizon_ms(now.wall_ms) else {
            return;
        };
        let max = self.config.gc_batch_max;
        // A job with a write on its way to the disk waits for the next
        // collection: the write may hold a newer version than the memory's
        // tombstone, and the disk would then keep what memory dropped
        // (found in review).
        let writing: std::collections::BTreeSet<&str> = self
            .writes
            .values()
            .flat_map(|w| {
                w.jobs
                    .iter()
                    .map(|r| r.name.as_str())
                    .chain(w.completions.iter().map(|c| c.job.as_str()))
            })
            .collect();
        let mut jobs: Vec<(String, Option<Version>)> = self
            .desired
            .tombstones_before(horizon, max)
            .into_iter()
            .filter(|(n, _)| !writing.contains(n.as_str()))
            .map(|(n, v)| (n, Some(v)))
            .collect();
        let room = max.saturating_sub(jobs.len());
        jobs.extend(
            self.desired
                .orphan_completions_before(horizon, room)
                .into_iter()
                .filter(|n| !writing.contains(n.as_str()))
                .map(|n| (n, None)),
        );
        if jobs.is_empty() {
            return;
        }
        for (name, version) in &jobs {
            if self.desired.forget(name, version.as_ref()) {
                self.counters.jobs_collected = self.counters.jobs_collected.saturating_add(1);
            }
        }
        self.dirty = true;
        self.out.push(Effect::Forget { jobs });
    }

    /// Whether a record from a peer is a tombstone this node would collect
    /// at once and holds nothing of: not taken, so that nodes that collect
    /// a moment apart do not hand it back and forth. (One that is newer than
    /// a live record held here is taken: it stops that job.)
    fn collected_already(&self, r: &JobRecord, wall_ms: u64) -> bool {
        r.is_tombstone()
            && self.desired.get(&r.name).is_none()
            && self
                .gc_horizon_ms(wall_ms)
                .is_some_and(|h| r.version.hlc.wall_ms < h)
    }

    /// Records from a peer: validated like a submission, the newer ones
    /// persisted (and applied once durable). Returns whether a write was
    /// issued (its origin is told when it is durable).
    fn take_records(&mut self, records: Vec<Arc<JobRecord>>, origin: Origin) -> Taken {
        let bound = self.config.max_clock_offset_ms();
        let wall_ms = self.wall_ms;
        let mut future = 0u64;
        let newer: Vec<Arc<JobRecord>> = records
            .into_iter()
            .filter(|r| {
                // From too far in the future: refused, so one fast or forged
                // clock cannot pin every node's versions ahead (a later
                // write would lose to it). Anti-entropy brings it again,
                // and it is taken once this clock has caught up.
                let ahead = r.version.hlc.ahead_of(wall_ms, bound).is_err();
                future += u64::from(ahead);
                !ahead
                    && r.validate().is_ok()
                    && self.desired.is_newer(r)
                    && !self.collected_already(r, wall_ms)
            })
            .collect();
        self.counters.future_records = self.counters.future_records.saturating_add(future);
        if newer.is_empty() {
            return Taken::Nothing;
        }
        if self.writes.len() >= self.config.writes_in_flight_max {
            return Taken::Dropped;
        }
        self.persist(newer, Vec::new(), origin);
        Taken::Writing
    }

    /// An API write is durable here: it goes to every node, and the API is
    /// answered once one of them has it on its disk too (or no peer is
    /// alive, or `replicate_timeout` passed: the write is durable here and
    /// anti-entropy spreads it). Found by the chaos suite (seed 42): a write
    /// answered at a node whose machine was wiped a moment later was lost,
    /// because its push had not left yet.
    fn replicate(&mut self, write: WriteId, token: ApiToken, jobs: Vec<Arc<JobRecord>>, now: Now) {
        let Some(record) = jobs.first().cloned() else {
            return;
        };
        let peers = self.alive_peers();
        if peers.is_empty() {
            self.answer(token, Ok(record));
            return;
        }
        // A few peers are asked to confirm (one is enough); the others get
        // the push without an answer to wait for, so a write to a large
        // cluster does not tie up a call per member (found in review).
        let mut peers = peers;
        peers.shuffle(&mut self.rng);
        for (i, (to, addr)) in peers.into_iter().enumerate() {
            let call = (i < REPLICAS_ASKED).then(|| {
                let call = self.id();
                self.calls.insert(call, Call::Replicate { write });
                call
            });
            self.out.push(Effect::Send {
                to,
                addr,
                request: Request::PutJobs(jobs.clone()),
                call,
                timeout: self.config.call_timeout,
            });
        }
        self.replicating.insert(
            write,
            Replicating {
                token,
                record,
                deadline: now.mono + self.config.replicate_timeout,
            },
        );
    }

    fn take_completions(&mut self, cs: Vec<Completion>, origin: Origin) -> Taken {
        let new: Vec<Completion> = cs
            .into_iter()
            .filter(|c| {
                // A completion of a job collected here (no record, from
                // before the horizon) is not taken again.
                let collected = self.desired.get(&c.job).is_none()
                    && self
                        .gc_horizon_ms(self.wall_ms)
                        .is_some_and(|h| c.job_version.hlc.wall_ms < h);
                crate::job::valid_job_name(&c.job)
                    && !collected
                    && !self.desired.is_completed(&c.job, c.slot)
            })
            .collect();
        if new.is_empty() {
            return Taken::Nothing;
        }
        if self.writes.len() >= self.config.writes_in_flight_max {
            return Taken::Dropped;
        }
        self.persist(Vec::new(), new, origin);
        Taken::Writing
    }

    fn apply_record(&mut self, r: Arc<JobRecord>, now: Now) {
        // Checked when it came in; if the wall clock stepped back since, the
        // record is applied but does not move the clock.
        let _ = self.clock.observe(
            r.version.hlc,
            now.wall_ms,
            self.config.max_clock_offset_ms(),
        );
        let name = r.name.clone();
        let live = r.is_live();
        let node = crate::records::node_of_record(&name).is_some();
        if self.desired.apply(r) {
            self.dirty = true;
            if node {
                // Where work may go changed: every slot tries again.
                self.placing.retry_now(None, now.mono);
            } else if live {
                self.placing.retry_now(Some(&name), now.mono);
            } else {
                self.placing.forget_job(&name);
            }
        }
    }

    // ---- local copies ----

    /// A coordinator asks this node to start slots of `job`.
    fn start_requested(
        &mut self,
        job: Arc<JobRecord>,
        slots: &[u32],
        now: Now,
    ) -> Vec<(u32, String)> {
        let refuse_all = |why: &str| slots.iter().map(|s| (*s, why.to_string())).collect();
        if !self.sync.caught_up {
            return refuse_all("it is still catching up with the cluster's state");
        }
        if let Err(e) = job.validate() {
            return refuse_all(&format!("invalid job record: {e}"));
        }
        let bound = self.config.max_clock_offset_ms();
        if let Err(e) = job.version.hlc.ahead_of(now.wall_ms, bound) {
            return refuse_all(&format!(
                "the job's version is from the future: {e} (max_clock_offset is {bound} ms)"
            ));
        }
        if self.desired.is_newer(&job) {
            // Newer than ours: keep it (durably, like any peer's write)
            // and start from it.
            let _ = self.take_records(vec![job.clone()], Origin::Peer(None));
        } else if self
            .desired
            .get(&job.name)
            .is_some_and(|r| r.version != job.version)
        {
            return refuse_all("the job changed since it was placed");
        }
        if job.spec.as_ref().is_some_and(never::is_never) {
            // Its slots start where their claims name (a coordinator on an
            // older release, or one that has not heard the job changed).
            return refuse_all(
                "the job's partition policy is `never`: its slots start from their claims",
            );
        }
        self.start_slots(&job, slots, now)
    }

    /// Starts slots of `job` here, checking every rule this node can check
    /// for itself (it fits, its ports are free, no other replica of a
    /// distinct-hosts job runs here, the constraints hold, a batch slot did
    /// not complete); returns the slots it refused and why.
    fn start_slots(&mut self, job: &Arc<JobRecord>, slots: &[u32], now: Now) -> Vec<(u32, String)> {
        let Some(spec) = job.spec.clone() else {
            return slots
                .iter()
                .map(|s| (*s, "the job is stopped".to_string()))
                .collect();
        };
        if !self.drivers.contains(&spec.task.driver) {
            return slots
                .iter()
                .map(|s| (*s, format!("it has no `{}` driver", spec.task.driver)))
                .collect();
        }
        if spec.job_type != JobType::System && !self.eligible(&self.me) {
            // A coordinator that has not heard of the drain yet.
            return slots
                .iter()
                .map(|s| (*s, "it is draining or ineligible".to_string()))
                .collect();
        }
        let mut refused = Vec::new();
        let mut fresh = self.fresh_node();
        let fp = spec.task.fingerprint();
        for &slot in slots {
            if slot >= spec.slots() {
                refused.push((slot, "the slot is beyond the replica count".into()));
                continue;
            }
            match self.local.get(&job.name, slot) {
                // Its previous copy still runs here and holds the slot's
                // ports until it is gone (found by the simulator, seed 35;
                // removing the entry now would also lose the process).
                Some(l) if l.stopping => {
                    refused.push((
                        slot,
                        "the slot's previous copy is still stopping there".into(),
                    ));
                    continue;
                }
                Some(l) if l.state.is_live() && l.task != fp => {
                    // One copy per slot and node: the new version goes
                    // elsewhere while this one runs (start-first).
                    refused.push((
                        slot,
                        format!("it still runs {}", shoal_placement::HOLDS_OLD_COPY),
                    ));
                    continue;
                }
                Some(l) if l.state.is_live() || l.state == SlotState::Completed => {
                    continue; // already here
                }
                _ => {}
            }
            if spec.job_type == JobType::Batch && self.desired.is_completed(&job.name, slot) {
                refused.push((slot, "the slot already completed".into()));
                continue;
            }
            if self.holds_back(&spec) {
                refused.push((
                    slot,
                    "it is cut off with a minority and the job's partition policy is `majority`"
                        .into(),
                ));
                continue;
            }
            let req = spec.slot_request(slot);
            if let Some(c) = req.constraints.iter().find(|c| !c.holds(&fresh)) {
                refused.push((slot, format!("it does not satisfy `{c}`")));
                continue;
            }
            if spec.distinct_hosts
                && self
                    .local
                    .live_of_job(&job.name)
                    .any(|l| l.id.slot != slot && !l.stopping)
            {
                refused.push((
                    slot,
                    "it already runs a replica of the job (distinct_hosts)".into(),
                ));
                continue;
            }
            if let Some(p) = req.ports.iter().find(|p| fresh.ports_used.contains(p)) {
                refused.push((slot, format!("port {p} is taken there")));
                continue;
            }
            if cost(&fresh, &req) == u64::MAX {
                refused.push((slot, "not enough CPU or memory is free there".into()));
                continue;
            }
            let seed = crate::job::fnv1a(format!("{}/{slot}", job.name).as_bytes());
            let Some(ports) = crate::ports::assign(
                &spec.task.ports,
                self.config.port_range,
                &fresh.ports_used,
                seed,
            ) else {
                let (lo, hi) = self.config.port_range;
                refused.push((slot, format!("no free port left in its range {lo}-{hi}")));
                continue;
            };
            fresh.used = fresh.used.plus(req.resources);
            fresh.ports_used.extend(ports.values().copied());
            let id = InstanceId {
                job: job.name.clone(),
                slot,
                run: self.run_id(now),
            };
            if let Some(old) = self.local.remove(&job.name, slot) {
                // A finished or stopping run of the slot: forget it.
                self.out.push(Effect::RemoveInstance {
                    driver: old.driver,
                    id: old.id,
                });
            }
            let local = Local {
                id,
                driver: spec.task.driver.clone(),
                record: job.clone(),
                task: fp,
                state: SlotState::Starting,
                restarts: 0,
                restart_at: None,
                stopping: false,
                stop_sent: None,
                stop_at: None,
                restarting: false,
                ready: false,
                placed_at: now.mono,
                was_ready: false,
                failed: false,
                start_in_flight: true,
                error: None,
                unconfirmed: false,
                ports,
                seq: job.seq,
                checks: spec.task.checks.clone(),
                tracker: None,
            };
            self.launch(&local);
            self.local.insert(local);
        }
        self.dirty = true;
        refused
    }

    fn launch(&mut self, l: &Local) {
        let Some(spec) = &l.record.spec else { return };
        let ip = self
            .seen
            .view
            .members
            .get(&self.me)
            .map(|m| m.record.address.ip());
        let mut env = crate::ports::instance_env(&l.id, &self.me, &l.ports, ip);
        if !spec.uses.is_empty() {
            // The services it uses: an instance passing now (one on this
            // node first), and the DNS name that follows them later.
            let catalog = self.catalog();
            for name in &spec.uses {
                let var = crate::catalog::service_var(name);
                let addr = catalog.get(name).and_then(|svc| {
                    crate::catalog::address_for(svc, &self.me, |n| self.rng.random_range(0..n))
                });
                if let Some(addr) = addr {
                    env.insert(var.clone(), addr);
                }
                env.insert(format!("{var}_DNS"), crate::catalog::service_dns_name(name));
            }
        }
        self.counters.starts += 1;
        self.out.push(Effect::StartInstance {
            driver: l.driver.clone(),
            spec: Box::new(InstanceSpec {
                id: l.id.clone(),
                job_version: l.record.version.clone(),
                seq: l.seq,
                task: spec.task.clone(),
                env,
                ports: l.ports.clone(),
            }),
        });
    }

    fn ended(&mut self, id: InstanceId, state: InstanceState, now: Now) {
        let me = self.me.to_string();
        let Some(l) = self.local.get_run_mut(&id) else {
            return;
        };
        self.dirty = true;
        if l.tracker.take().is_some() && !l.checks.is_empty() {
            self.out.push(Effect::UnwatchChecks { id: id.clone() });
        }
        if l.restarting {
            l.restarting = false;
            l.stop_sent = None;
        }
        if l.stopping {
            let driver = l.driver.clone();
            self.local.remove(&id.job, id.slot);
            self.out.push(Effect::RemoveInstance { driver, id });
            return;
        }
        if let InstanceState::Exited(ExitStatus { error: Some(e), .. }) = &state {
            l.error = Some(crate::gossip::bounded(e.clone()));
        }
        let success = matches!(&state, InstanceState::Exited(s) if s.success());
        let Some(spec) = l.record.spec.clone() else {
            return;
        };
        match spec.job_type {
            JobType::Batch if success => {
                l.state = SlotState::Completed;
                let c = Completion {
                    job: id.job.clone(),
                    slot: id.slot,
                    job_version: l.record.version.clone(),
                    node: me,
                    exit_code: 0,
                };
                self.persist(Vec::new(), vec![c], Origin::Completion);
            }
            JobType::Batch if l.restarts >= spec.restart.attempts => {
                l.state = SlotState::Failed;
            }
            _ => {
                // Restart in place after a backoff; the slot stays ours (a
                // live copy) so nobody else places it meanwhile.
                let delay = spec.restart.backoff(l.restarts);
                l.restarts = l.restarts.saturating_add(1);
                l.state = SlotState::Starting;
                l.restart_at = Some(now.mono.checked_add(delay).unwrap_or(now.mono));
            }
        }
    }

    fn restarts_due(&mut self, now: Now) {
        let due: Vec<(String, u32)> = self
            .local
            .iter()
            .filter(|l| l.restart_at.is_some_and(|t| t <= now.mono) && !l.stopping)
            .map(|l| (l.id.job.clone(), l.id.slot))
            .collect();
        for (job, slot) in due {
            let run = self.run_id(now);
            let Some(l) = self.local.get_mut(&job, slot) else {
                continue;
            };
            let old = l.id.clone();
            l.id = InstanceId { job, slot, run };
            l.restart_at = None;
            l.start_in_flight = true;
            l.state = SlotState::Starting;
            let l = l.clone();
            self.out.push(Effect::RemoveInstance {
                driver: l.driver.clone(),
                id: old,
            });
            self.launch(&l);
            self.dirty = true;
        }
    }

    /// A stop whose copy has not ended well after the stop grace (the
    /// stop failed, or its driver lost it) is requested again (found in
    /// review: a copy stuck `stopping` held its resources and ports for
    /// good).
    fn stops_overdue(&mut self, now: Now) {
        let default_grace = self.config.stop_grace;
        let mut again = Vec::new();
        for l in self.local.iter_mut() {
            if l.stop_at.is_some_and(|t| t <= now.mono) {
                // Its shutdown delay is over: the signal.
                l.stop_at = None;
                l.stop_sent = Some(now.mono);
                again.push((l.driver.clone(), l.id.clone(), l.stop_grace(default_grace)));
                continue;
            }
            let grace = l.stop_grace(default_grace);
            let again_after = grace
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1));
            if (l.stopping || l.restarting)
                && l.stop_sent
                    .is_some_and(|t| now.mono.saturating_duration_since(t) >= again_after)
            {
                l.stop_sent = Some(now.mono);
                again.push((l.driver.clone(), l.id.clone(), grace));
            }
        }
        for (driver, id, grace) in again {
            self.out.push(Effect::StopInstance { driver, id, grace });
        }
    }

    /// Writes held while catching up: carried out once caught up, refused
    /// after `held_api_timeout`.
    fn release_held_api(&mut self, now: Now) {
        if self.held_api.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held_api);
        for (token, request, since) in held {
            if self.sync.caught_up {
                self.api(token, request, now);
            } else if now.mono.saturating_duration_since(since) >= self.config.held_api_timeout {
                self.answer(
                    token,
                    Err(ApiError::Unavailable(
                        "this node has not caught up with the cluster yet (no peer answered); try again or ask another node".into(),
                    )),
                );
            } else {
                self.held_api.push((token, request, since));
            }
        }
    }

    fn stop_local(&mut self, job: &str, slot: u32, reason: StopReason, now: Now) {
        let default_grace = self.config.stop_grace;
        let Some(l) = self.local.get_mut(job, slot) else {
            return;
        };
        let grace = l.stop_grace(default_grace);
        if l.stopping {
            return;
        }
        let _ = reason;
        if l.tracker.take().is_some() && !l.checks.is_empty() {
            self.out.push(Effect::UnwatchChecks { id: l.id.clone() });
        }
        let serving = l.state == SlotState::Running && !l.start_in_flight;
        l.stopping = true;
        l.unconfirmed = false;
        l.state = SlotState::Pending;
        self.dirty = true;
        self.counters.stops += 1;
        let (driver, id) = (l.driver.clone(), l.id.clone());
        if l.restart_at.take().is_some() {
            // Nothing runs (it was waiting to restart): forget it now.
            self.local.remove(job, slot);
            self.out.push(Effect::RemoveInstance { driver, id });
            return;
        }
        let delay = l
            .record
            .spec
            .as_ref()
            .and_then(|s| {
                s.task
                    .shutdown_delay
                    .or((!s.services.is_empty()).then_some(crate::catalog::SERVICE_SHUTDOWN_DELAY))
            })
            .filter(|d| !d.is_zero() && serving);
        if let Some(delay) = delay {
            // Shown stopping (published now) for the delay, then the
            // signal (`stops_due`): traffic leaves it first.
            l.stop_at = Some(now.mono.checked_add(delay).unwrap_or(now.mono));
            return;
        }
        l.stop_sent = Some(now.mono);
        self.out.push(Effect::StopInstance { driver, id, grace });
    }

    /// Holds this node's live copies back from gossip and from its own
    /// verdicts, and coordinates nothing, for the join grace; then
    /// [`Self::confirm_adopted`] keeps those the cluster did not replace.
    /// Notices that this node was frozen (SIGSTOP, a paused VM, a starved
    /// process): longer than `stall` since the last timer. Peers have
    /// probably declared it dead, replaced its copies and moved on; what it
    /// knows is stale. It holds its copies back until gossip shows whether
    /// they were replaced (as after a restart), coordinates nothing for the
    /// join grace, and places and starts nothing until a fresh anti-entropy
    /// exchange has brought what it missed (completions above all).
    ///
    /// Checked at every input, not only the timer's: after a freeze the
    /// first input is often a queued message or view. Chaos seed 166239: a
    /// node resumed from a 4.5 s hang and started a batch slot that had
    /// completed elsewhere while it was frozen.
    fn notice_stall(&mut self, now: Now) {
        self.wall_ms = now.wall_ms;
        let Some(last) = self.last_timer else {
            return;
        };
        if now.mono.saturating_duration_since(last) <= self.config.stall {
            return;
        }
        self.last_timer = Some(now.mono);
        self.counters.stalls = self.counters.stalls.saturating_add(1);
        self.recheck_local(now);
        self.sync.caught_up = false;
        self.sync.exchange_done = false;
        if let Some(e) = self.sync.exchange.take() {
            self.calls.remove(&e.call);
        }
        self.sync.last = None;
    }

    fn recheck_local(&mut self, now: Now) {
        for l in self.local.iter_mut().filter(|l| l.state.is_live()) {
            l.unconfirmed = true;
        }
        self.coordinate_after = now.mono + self.config.join_grace;
        self.dirty = true;
    }

    /// Settles the copies found after a restart or a stall, once gossip has
    /// had the join grace to show the cluster's state: a copy whose slot
    /// another node runs now is stopped; the others are ours again.
    fn confirm_adopted(&mut self, now: Now) {
        let unconfirmed: Vec<(String, u32)> = self
            .local
            .iter()
            .filter(|l| l.unconfirmed)
            .map(|l| (l.id.job.clone(), l.id.slot))
            .collect();
        for (job, slot) in unconfirmed {
            // Replaced by a copy of the same task; one of another version
            // is a rolling update's to settle (found in review: an agent
            // restarted mid-update stopped all its old copies at once).
            let task = self.local.get(&job, slot).map(|l| l.task);
            // A system job's copies share their slot on every node.
            let elsewhere = !self.is_system(&job)
                && self
                    .seen
                    .copies(&self.me, &job, slot, now.mono)
                    .any(|(_, c)| c.state.is_live() && Some(c.task) == task);
            if let Some(l) = self.local.get_mut(&job, slot) {
                l.unconfirmed = false;
            }
            if elsewhere {
                self.stop_local(&job, slot, StopReason::Superseded, now);
            }
        }
    }

    // ---- the pass ----

    fn pass(&mut self, now: Now) {
        self.counters.passes += 1;
        self.recount(now);
        // Running copies whose checks are not watched yet (found after an
        // agent restart, or started before the view held this node).
        let unwatched: Vec<InstanceId> = self
            .local
            .iter()
            .filter(|l| {
                l.state == SlotState::Running
                    && l.tracker.is_none()
                    && !l.stopping
                    && !l.restarting
                    && !l.start_in_flight
                    && l.restart_at.is_none()
            })
            .map(|l| l.id.clone())
            .collect();
        for id in unwatched {
            self.watch_checks(&id, now);
        }
        // Which copies are ready: passing for their own version's
        // min_healthy_time, whatever version is current (a stop-first
        // window counts the slots no copy serves; readers that want the
        // current version compare the task).
        for l in self.local.iter_mut() {
            let current = self.desired.task_fp(&l.id.job) == Some(l.task);
            let min = l
                .record
                .spec
                .as_ref()
                .map(|s| s.update.min_healthy_time)
                .unwrap_or_default();
            let ready = l.state == SlotState::Running
                && !l.stopping
                && !l.restarting
                && l.tracker
                    .as_ref()
                    .is_some_and(|t| t.passing_for(min, now.mono));
            l.was_ready |= ready;
            let deadline = l
                .record
                .spec
                .as_ref()
                .map(|s| s.update.healthy_deadline)
                .unwrap_or(Duration::MAX);
            let failed = current
                && !l.was_ready
                && !l.stopping
                && now.mono.saturating_duration_since(l.placed_at) > deadline;
            if ready != l.ready || failed != l.failed {
                l.ready = ready;
                l.failed = failed;
                self.dirty = true;
            }
        }
        if self.sync.caught_up && !self.seen.view.members.is_empty() {
            let coordinating = now.mono >= self.coordinate_after;
            if coordinating {
                self.confirm_adopted(now);
            }
            self.own_copies(now);
            self.held_slots(now);
            self.system_jobs(now);
            if coordinating {
                self.coordinate(now);
            }
        }
        self.publish();
    }

    /// Verdicts on this node's own copies.
    fn own_copies(&mut self, now: Now) {
        let mut stops = Vec::new();
        let mut windows: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut first_seen: Vec<(String, u64)> = Vec::new();
        let mut renumber = Vec::new();
        let mut forget = Vec::new();
        for l in self.local.iter() {
            let live = l.state.is_live();
            let job = self
                .desired
                .spec(&l.id.job)
                .zip(self.desired.task_fp(&l.id.job));
            if !live {
                // A finished copy of a stopped job is forgotten (one being
                // stopped goes when its end is reported: forgetting it now
                // would lose its process before the stop reached it).
                if job.is_none() && !l.stopping && l.restart_at.is_none() {
                    forget.push((l.id.job.clone(), l.id.slot));
                }
                continue;
            }
            if l.stopping || l.unconfirmed {
                continue;
            }
            if let Some(current) = self
                .desired
                .get(&l.id.job)
                .filter(|r| r.seq != l.seq && job.is_some_and(|(_, fp)| fp == l.task))
            {
                // The job moved on without changing the task (replicas,
                // placement rules): the copy runs the new version as it is.
                renumber.push((l.id.job.clone(), l.id.slot, current.clone()));
            }
            let mine = l.published();
            let system = job.is_some_and(|(spec, _)| spec.job_type == JobType::System);
            let never = job.is_some_and(|(spec, _)| never::is_never(spec));
            if never && self.claim_lost(&l.id.job, l.id.slot) {
                stops.push((l.id.job.clone(), l.id.slot, StopReason::Unclaimed));
                continue;
            }
            if never && self.leaving(&self.me) {
                // It cannot move start-first (two copies): it stops now,
                // and its slot goes elsewhere once it is gone.
                stops.push((l.id.job.clone(), l.id.slot, StopReason::Drained));
                continue;
            }
            if !system && job.is_some() && self.drain_overdue(&self.me, now.wall_ms) {
                // The drain's deadline: what is left stops (and is placed
                // elsewhere as after any stop).
                stops.push((l.id.job.clone(), l.id.slot, StopReason::Drained));
                continue;
            }
            if system && job.is_some_and(|(spec, _)| !self.qualifies(spec, false, now)) {
                stops.push((l.id.job.clone(), l.id.slot, StopReason::Ineligible));
                continue;
            }
            // A system job's copies on other nodes are not copies of this
            // one (each node runs its own); a `never` job's slot is its
            // holder's, whatever the conflict rule says.
            let others: Vec<(&str, &crate::instance::Published)> = if system || never {
                Vec::new()
            } else {
                self.seen
                    .copies(&self.me, &l.id.job, l.id.slot, now.mono)
                    .map(|(n, c)| (&**n, c))
                    .collect()
            };
            let fin = job.is_some_and(|(spec, _)| {
                finished(
                    spec,
                    self.desired.is_completed(&l.id.job, l.id.slot),
                    others.iter().map(|(_, c)| *c),
                )
            });
            let may_stop = job.is_some_and(|(spec, fp)| {
                mine.task == fp || {
                    // The window stops an old copy only once this node has
                    // known the task for `update_settle`: a version
                    // written while an older update had slots down comes
                    // with a window that counts them (a stop-first window
                    // counts down slots first), and gossip needs that long
                    // to bring the stops made just before. Seen at once,
                    // seed 4 of `--update 6:1:stop-first:twice` stopped a
                    // second slot (4 of 6 served, floor 5).
                    let settled = match self.task_seen.get(&l.id.job) {
                        Some((seen, at)) if *seen == fp => {
                            now.mono.saturating_duration_since(*at) >= self.config.update_settle
                        }
                        _ => {
                            first_seen.push((l.id.job.clone(), fp));
                            false
                        }
                    };
                    if system {
                        return settled && self.in_system_window(spec, fp, now);
                    }
                    let mut in_window = || {
                        settled
                            && windows
                                .entry(l.id.job.clone())
                                .or_insert_with(|| self.update_window(spec, fp, now))
                                .contains(&l.id.slot)
                    };
                    let ready = self.slot_ready(&l.id.job, l.id.slot, fp, now);
                    match spec.update.order {
                        crate::update::Order::StopFirst => {
                            crate::reconcile::old_copy_may_stop(spec, ready, in_window())
                        }
                        // Start-first where the new copy has room; where
                        // no node can take it beside the old one (one
                        // node, a full cluster), this window slot goes
                        // stop-first.
                        crate::update::Order::StartFirst => {
                            crate::reconcile::old_copy_may_stop(spec, ready, false)
                                || (self.slot_unplaceable(&l.id.job, l.id.slot, fp, now)
                                    && in_window())
                        }
                    }
                }
            });
            if let Some(r) = own_copy_stop(
                &self.me,
                job,
                fin,
                may_stop,
                &mine,
                others.iter().copied(),
                |n| self.leaving(n),
            ) {
                stops.push((l.id.job.clone(), l.id.slot, r));
            }
        }
        if !first_seen.is_empty() {
            for (job, fp) in first_seen {
                self.task_seen.insert(job, (fp, now.mono));
            }
            let desired = &self.desired;
            self.task_seen.retain(|job, _| desired.spec(job).is_some());
        }
        for (job, slot, record) in renumber {
            if let Some(l) = self.local.get_mut(&job, slot) {
                l.seq = record.seq;
                l.record = record;
                self.dirty = true;
            }
        }
        for (job, slot, r) in stops {
            self.stop_local(&job, slot, r, now);
        }
        for (job, slot) in forget {
            if let Some(l) = self.local.remove(&job, slot) {
                self.out.push(Effect::RemoveInstance {
                    driver: l.driver,
                    id: l.id,
                });
            }
        }
    }

    /// Whether this node, cut off with a minority, starts and places
    /// nothing of the job (`partition = "majority"`, the default of batch
    /// and cron jobs).
    fn holds_back(&self, spec: &JobSpec) -> bool {
        if !self.seen.minority() && (self.seen.strict_majority() || !never::is_never(spec)) {
            return false;
        }
        // A cron job's run follows its cron job's policy (a `replace` cron
        // job fires on every side, and its runs run there; found in
        // review: the run, a batch job, was held back).
        let policy = match spec.parent.as_deref() {
            Some(parent) => self.desired.spec(parent).map_or(
                crate::job::PartitionPolicy::Majority,
                JobSpec::partition_policy,
            ),
            None => spec.partition_policy(),
        };
        match policy {
            crate::job::PartitionPolicy::Majority => true,
            // Of two halves exactly, neither side places or starts it.
            crate::job::PartitionPolicy::Never => !self.seen.strict_majority(),
            crate::job::PartitionPolicy::Replace => false,
        }
    }

    /// Whether `job` is a live system job.
    fn is_system(&self, job: &str) -> bool {
        self.desired
            .spec(job)
            .is_some_and(|s| s.job_type == JobType::System)
    }

    /// Whether this node qualifies for a system job: it has the driver
    /// and meets the constraints (whether it fits is for the start to
    /// say, and a running copy is not stopped for want of room).
    /// A drain stops the copy once nothing else is left here and never
    /// starts one (`starting`).
    fn qualifies(&self, spec: &JobSpec, starting: bool, now: Now) -> bool {
        Self::node_qualifies(spec, &self.fresh_node())
            && !self.drain_stops_system(&self.me, starting, now)
    }

    /// Whether a placement node qualifies for a system job, as this node
    /// sees it (its labels and drivers from gossip).
    fn node_qualifies(spec: &JobSpec, node: &shoal_placement::Node) -> bool {
        node.drivers.contains(&spec.task.driver)
            && spec
                .slot_request(crate::system::SLOT)
                .constraints
                .iter()
                .all(|c| c.holds(node))
    }

    /// The alive nodes that qualify for a system job as this node sees
    /// them (labels and drivers from gossip; this node first hand), in
    /// name order.
    pub fn qualifying_nodes(&self, spec: &JobSpec, now: Instant) -> Vec<String> {
        let now = Now {
            mono: now,
            wall_ms: self.wall_ms,
        };
        let mut names: Vec<String> = self
            .seen
            .placement_nodes()
            .iter()
            .filter(|n| {
                *n.id != *self.me
                    && Self::node_qualifies(spec, n)
                    && !self.drain_stops_system(&n.id, false, now)
            })
            .map(|n| n.id.clone())
            .collect();
        if self.qualifies(spec, false, now) {
            names.push(self.me.to_string());
        }
        names.sort_unstable();
        names
    }

    /// Every node's part in its system jobs: a node that qualifies and
    /// holds no copy starts one (the checks of a winner's start), or
    /// publishes why it cannot, backing off as an unplaceable slot does.
    fn system_jobs(&mut self, now: Now) {
        let jobs: Vec<Arc<JobRecord>> = self
            .desired
            .records()
            .filter(|r| {
                r.spec
                    .as_ref()
                    .is_some_and(|s| s.job_type == JobType::System)
            })
            .cloned()
            .collect();
        let slot = crate::system::SLOT;
        if self.system_tried.len() > jobs.len() {
            self.system_tried
                .retain(|j, _| jobs.iter().any(|r| r.name == *j));
        }
        for record in jobs {
            let Some(spec) = record.spec.as_ref() else {
                continue;
            };
            if !self.qualifies(spec, true, now) || self.holds_back(spec) {
                self.placing.settled(&record.name, slot);
                continue;
            }
            // Why an earlier version could not run here says nothing of
            // this one: try it at once.
            let fp = spec.task.fingerprint();
            if self.system_tried.get(&record.name) != Some(&fp) {
                self.placing.settled(&record.name, slot);
                self.system_tried.insert(record.name.clone(), fp);
            }
            if self
                .local
                .get(&record.name, slot)
                .is_some_and(|l| l.state.is_live() || l.stopping)
                || self.placing.backing_off(&record.name, slot, now.mono)
            {
                continue;
            }
            let refused = self.start_slots(&record, &[slot], now);
            match refused.into_iter().next() {
                Some((_, why)) => {
                    self.counters.unplaceable += 1;
                    self.placing.failed(
                        &record.name,
                        slot,
                        format!("{} cannot run it: {why}", self.me),
                        now.mono,
                        (self.config.retry_min, self.config.retry_max),
                    );
                }
                None => self.placing.settled(&record.name, slot),
            }
        }
    }

    /// Whether this node's old copy of a system job is in the job's update
    /// window (see [`crate::system`]) over the nodes that qualify as this
    /// node sees them (it is one: `own_copies` stops a copy that does not).
    fn in_system_window(&self, spec: &JobSpec, fp: u64, now: Now) -> bool {
        // Cut off with a minority: no window, as for services (each side
        // would roll the nodes it sees).
        if self.seen.minority() {
            return false;
        }
        let slot = crate::system::SLOT;
        // Every node that qualifies is a slot of the window, including
        // those that say the job does not fit them: they count as down.
        // Dropping them let a version that fits no node stop the old copy
        // everywhere, max_parallel nodes at a time (found in review). A
        // node that never fits holds the update up, as an unplaceable slot
        // holds up a stop-first service update.
        let names = self.qualifying_nodes(spec, now.mono);
        // Each node's copy, looked up once (ready on `fp`, ready at all).
        let mut copies: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
        for (n, c) in self.seen.copies(&self.me, &spec.name, slot, now.mono) {
            let e = copies.entry(&**n).or_default();
            e.0 |= c.ready_on(Some(fp));
            e.1 |= c.ready_on(None);
        }
        if let Some(l) = self.local.get(&spec.name, slot) {
            copies.insert(&self.me, (l.ready_on(Some(fp)), l.ready_on(None)));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let of = |n: &str| copies.get(n).copied().unwrap_or_default();
        crate::system::window(&refs, spec.update.max_parallel, |n| of(n).0, |n| of(n).1)
            .contains(&&*self.me)
    }

    /// Places the empty slots of the jobs this node coordinates.
    fn coordinate(&mut self, now: Now) {
        let arcs = self.seen.view.members.arcs_of(&self.me);
        let mine: BTreeSet<String> = arcs
            .iter()
            .flat_map(|(lo, hi)| self.desired.live_in_arc(*lo, *hi))
            .map(str::to_string)
            .collect();
        // Jobs no longer ours: their state goes (the new coordinator starts
        // afresh; a placement of ours still in flight shows in gossip).
        for job in self.placing.jobs() {
            // A system job's entries are this node's own (why it does not
            // fit here), not a coordinator's.
            if !mine.contains(&job) && !self.is_system(&job) {
                self.placing.forget_job(&job);
            }
        }
        self.progress.retain(|job, _| mine.contains(job));
        for job in mine {
            if self.placing.rounds_len() >= self.config.rounds_in_flight_max {
                break;
            }
            self.coordinate_job(&job, now);
        }
    }

    fn coordinate_job(&mut self, name: &str, now: Now) {
        if self.placing.has_round(name) {
            return;
        }
        let Some(record) = self.desired.get(name).cloned() else {
            return;
        };
        let Some(spec) = record.spec.as_ref() else {
            return;
        };
        if spec.job_type == JobType::System {
            // Every node places its own copy (`system_jobs`); what this
            // node coordinated when the job was a service goes (its own
            // slot 0 entry is its system one).
            self.placing.forget_slots_from(name, 1);
            return;
        }
        if never::is_never(spec) {
            // Claims, not rounds: each slot's holder starts it.
            self.placing.forget_slots_from(name, spec.slots());
            self.claim_slots(&record, now);
            self.deployment_step(&record, now);
            return;
        }
        let fp = spec.task.fingerprint();
        // Slots scaled away are no longer this coordinator's business (a
        // cron job has none).
        self.placing.forget_slots_from(name, spec.slots());
        // Any change to the job's copies, here or anywhere, lets its
        // backing-off slots try again at once (found by the simulator, seed
        // 315: slots of a distinct-hosts job blocked while an update stopped
        // the old copies waited out their backoff after the nodes freed up).
        let stamp = self.seen.view.index.change_of(name).wrapping_add(
            self.local
                .of_job(name)
                .map(|l| l.id.run ^ u64::from(l.stopping) ^ ((l.state as u64) << 1))
                .fold(0u64, u64::wrapping_add),
        );
        self.placing.retry_if_changed(name, stamp, now.mono);
        let mut to_place = Vec::new();
        let mut window = Windows::default();
        for slot in 0..spec.slots() {
            if !self.slot_needs_placing(spec, fp, slot, now, &mut window) {
                // Placed (or finished): a placement in flight landed.
                self.placing.landed(name, slot);
                self.placing.settled(name, slot);
                continue;
            }
            // Copies of a member back from the dead wait for its re-check.
            let doubtful = self.seen.view.index.job(name).is_some_and(|c| {
                c.slot(slot)
                    .iter()
                    .any(|(n, c)| c.state.is_live() && self.seen.distrusted(n, now.mono))
            });
            if doubtful
                || self.placing.is_in_flight(name, slot)
                || self.placing.backing_off(name, slot, now.mono)
            {
                continue;
            }
            to_place.push(slot);
            if to_place.len() >= self.config.slots_per_round_max {
                break;
            }
        }
        // A side cut off with a minority places nothing of a `majority`
        // job (the majority's side re-places what it lost; what runs here
        // keeps running).
        if !to_place.is_empty() {
            if self.holds_back(spec) {
                // Said, without a backoff: the slots are placed as soon
                // as this side sees a majority again.
                let (alive, counted) = self.seen.alive_and_counted();
                let why = format!(
                    "held back: {} sees {alive} of the {counted} members it remembers alive, and the job's \
                     partition policy is `majority`: only a side that sees a majority starts it",
                    self.me
                );
                for slot in to_place {
                    self.placing.explain(name, slot, why.clone(), now.mono);
                }
            } else {
                self.begin_round(record.clone(), to_place, now);
            }
        }
        self.deployment_step(&record, now);
    }

    /// The coordinator's part in a deployment (see [`crate::deployment`]):
    /// once the version is ready everywhere, mark it successful; when it
    /// failed (a copy not ready within `healthy_deadline`, or no slot
    /// ready for `progress_deadline`), write the version most of its old
    /// copies run back if the job asks for `auto_revert` (not for a revert
    /// itself), else mark it failed, which stops the update where it is.
    /// Both records are the same whichever node writes them, and lose to
    /// any newer write (see [`JobRecord::revert_to`], [`JobRecord::mark`]).
    /// A new coordinator starts the progress clock afresh: a coordinator's
    /// death delays a `progress_deadline` failure by at most the deadline.
    fn deployment_step(&mut self, record: &Arc<JobRecord>, now: Now) {
        let name = record.name.as_str();
        if record.deployment.is_some() {
            self.progress.remove(name);
            return;
        }
        let Some(spec) = record.spec.as_ref() else {
            return;
        };
        if self.writes.len() >= self.config.writes_in_flight_max
            || self.writes.values().any(|w| {
                matches!(w.origin, Origin::Coordinator) && w.jobs.iter().any(|j| j.name == name)
            })
        {
            return;
        }
        let copies = self.copies_of(name, now.mono);
        let Some(d) = crate::deployment::of(record, copies.iter().map(|(_, c)| c)) else {
            return;
        };
        let p = self.progress.entry(name.to_string()).or_insert(Progress {
            seq: record.seq,
            ready: d.ready,
            since: now.mono,
        });
        if p.seq != record.seq
            || d.ready > p.ready
            || d.ready == d.replicas
            || d.old == 0
            || d.awaiting_promotion
            || self.seen.minority()
        {
            // Progress, a new version, or a wait that is not the update's
            // fault restarts the clock: a promotion, a minority, old copies
            // still stopping once every slot is ready, and a version with
            // nothing older to replace (a first version, a scale: no
            // update to fail; found in review).
            p.since = now.mono;
        }
        p.seq = record.seq;
        p.ready = d.ready;
        let deadline = spec.update.effective_progress_deadline();
        let outcome = if d.unhealthy > 0 {
            Outcome::FailedUnhealthy
        } else if d.done() {
            Outcome::Successful
        } else if !deadline.is_zero() && now.mono.saturating_duration_since(p.since) > deadline {
            Outcome::FailedNoProgress
        } else {
            return;
        };
        if outcome.failed() && spec.update.auto_revert && record.reverted_from.is_none() {
            if let Some(revert) = self.revert_of(record, &copies, outcome) {
                self.counters.reverts = self.counters.reverts.saturating_add(1);
                self.persist(vec![Arc::new(revert)], Vec::new(), Origin::Coordinator);
                return;
            }
        }
        self.counters.deployments_ended = self.counters.deployments_ended.saturating_add(1);
        let marked = Arc::new(record.mark(outcome));
        self.persist(vec![marked], Vec::new(), Origin::Coordinator);
    }

    /// The automatic revert of `record`: to the version most of its old
    /// copies run, if the record keeps it, else the one before.
    fn revert_of(
        &self,
        record: &JobRecord,
        copies: &[(String, Published)],
        why: Outcome,
    ) -> Option<JobRecord> {
        let fp = record.spec.as_ref()?.task.fingerprint();
        let mut old_versions: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, c) in copies
            .iter()
            .filter(|(_, c)| c.state.is_live() && c.task != fp)
        {
            *old_versions.entry(c.version).or_default() += 1;
        }
        let target = old_versions
            .iter()
            .filter(|(v, _)| record.history.iter().any(|e| e.seq == **v))
            .max_by_key(|(v, n)| (**n, **v))
            .map(|(v, _)| *v)
            .or_else(|| record.history.first().map(|e| e.seq));
        let target = target?;
        let spec = record
            .spec_of(target)
            .filter(|s| s.validate("").is_ok())
            .cloned()?;
        Some(record.revert_to(spec, target, why))
    }

    /// The live copies of `job` this node counts, with their holders: its
    /// own (once confirmed after a restart) and those live members
    /// publish.
    pub fn copies_of(&self, job: &str, now: Instant) -> Vec<(String, Published)> {
        let mut copies = Vec::new();
        if let Some(c) = self.seen.view.index.job(job) {
            for (_, node, copy) in c.iter() {
                if self.seen.counts(&self.me, node, now) {
                    copies.push((node.to_string(), copy.clone()));
                }
            }
        }
        for l in self.local.of_job(job).filter(|l| !l.unconfirmed) {
            copies.push((self.me.to_string(), l.published()));
        }
        copies
    }

    /// Whether a slot of a live job has no live copy of the current task
    /// anywhere this node can see, and is not finished.
    /// `window`: the job's update window, computed at the first slot that
    /// needs it and kept for the pass (computing it per slot made a pass
    /// quadratic in the replicas: found in review).
    fn slot_needs_placing(
        &self,
        spec: &JobSpec,
        fp: u64,
        slot: u32,
        now: Now,
        window: &mut Windows,
    ) -> bool {
        let name = spec.name.as_str();
        let mine = self.local.get(name, slot).map(|l| l.published());
        let others: Vec<(Arc<str>, crate::instance::Published)> = self
            .seen
            .copies(&self.me, name, slot, now.mono)
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let all = || mine.iter().chain(others.iter().map(|(_, c)| c));
        let fin = finished(spec, self.desired.is_completed(name, slot), all());
        if !needs_placing(spec, fp, slot, fin, all()) {
            // Its copies of the current task are all on draining nodes:
            // it moves start-first in the drain window.
            let staying = mine.iter().filter(|_| !self.leaving(&self.me)).chain(
                others
                    .iter()
                    .filter(|(n, _)| !self.leaving(n))
                    .map(|(_, c)| c),
            );
            return !fin
                && needs_placing(spec, fp, slot, fin, staying)
                && window
                    .drain
                    .get_or_insert_with(|| self.drain_window(spec, fp, now))
                    .contains(&slot);
        }
        // A slot whose old copy still runs moves by the rolling update, or
        // by the drain window when that copy is on a draining node (a
        // failed or paused update would leave it there until the
        // deadline, found in review).
        let beside_old = all().any(|c| c.state.is_live() && c.task != fp && !c.stopping);
        !beside_old
            || crate::reconcile::place_beside_old_copy(
                spec,
                window
                    .update
                    .get_or_insert_with(|| self.update_window(spec, fp, now))
                    .contains(&slot),
            )
            || window
                .drain
                .get_or_insert_with(|| self.drain_window(spec, fp, now))
                .contains(&slot)
    }

    /// The placement request of a slot: its spec's, avoiding the nodes
    /// that hold an older copy of the slot (a node holds one copy per
    /// slot, so a start-first update places the new one elsewhere).
    pub fn request_for(&self, spec: &JobSpec, slot: u32, now: Now) -> shoal_placement::SlotRequest {
        let mut req = spec.slot_request(slot);
        let fp = spec.task.fingerprint();
        let old = |c: &crate::instance::Published| c.state.is_live() && c.task != fp;
        if self
            .local
            .get(&spec.name, slot)
            .is_some_and(|l| old(&l.published()))
        {
            req.avoid.push(self.me.to_string());
        }
        req.avoid.extend(
            self.seen
                .copies(&self.me, &spec.name, slot, now.mono)
                .filter(|(_, c)| old(c))
                .map(|(n, _)| n.to_string()),
        );
        req
    }

    /// Whether a copy of `slot` running the task `fp` is ready (passing for
    /// the job's `min_healthy_time`) here or on a live node.
    fn slot_ready(&self, job: &str, slot: u32, fp: u64, now: Now) -> bool {
        self.slot_ready_with(job, slot, Some(fp), now)
    }

    /// Whether a ready copy of `slot` running the task `fp` (any task:
    /// `None`) is here or on a live node.
    fn slot_ready_with(&self, job: &str, slot: u32, fp: Option<u64>, now: Now) -> bool {
        self.local
            .get(job, slot)
            .is_some_and(|l| !l.unconfirmed && l.ready_on(fp))
            || self
                .seen
                .copies(&self.me, job, slot, now.mono)
                .any(|(_, c)| c.ready_on(fp))
    }

    /// Whether a start-first update's new copy of the slot finds no room
    /// beside its old one: no live copy of the current task `fp` anywhere,
    /// and the job's current coordinator (this node, or the live member
    /// the ring names) reports the slot unplaceable with the nodes that
    /// hold its old copy among the reasons. Anything else (a transient
    /// refusal, an unrelated rule, an old report of another node) keeps
    /// the old copy.
    fn slot_unplaceable(&self, job: &str, slot: u32, fp: u64, now: Now) -> bool {
        let current = |c: &crate::instance::Published| c.state.is_live() && c.task == fp;
        if self
            .local
            .get(job, slot)
            .is_some_and(|l| current(&l.published()))
            || self
                .seen
                .copies(&self.me, job, slot, now.mono)
                .any(|(_, c)| current(c))
        {
            return false;
        }
        let beside_old = |reason: &str| reason.contains(shoal_placement::HOLDS_OLD_COPY);
        let Some(coordinator) = self.seen.view.members.coordinator(job) else {
            return false;
        };
        if **coordinator == *self.me {
            return self
                .placing
                .backoff_of(job, slot)
                .is_some_and(|b| beside_old(&b.reason));
        }
        self.seen
            .view
            .index
            .unplaced(job)
            .and_then(|by_node| by_node.get(coordinator))
            .is_some_and(|us| us.iter().any(|u| u.holds(slot) && beside_old(&u.reason)))
    }

    /// The job's rolling-update window as this node sees it (see
    /// [`crate::update`]); none while this node is cut off with a minority
    /// (a partition pauses an update on the smaller side).
    fn update_window(&self, spec: &JobSpec, fp: u64, now: Now) -> Vec<u32> {
        if self.seen.minority() {
            return Vec::new();
        }
        let record = self.desired.get(&spec.name);
        if record
            .and_then(|r| r.deployment)
            .is_some_and(Outcome::failed)
        {
            // A failed deployment stops where it is.
            return Vec::new();
        }
        let ready = |s| self.slot_ready(&spec.name, s, fp, now);
        let canaries = spec.update.canary > 0 && !record.is_some_and(|r| r.promoted);
        match spec.update.order {
            crate::update::Order::StartFirst if canaries => {
                spec.update.canary_window(spec.replicas, ready)
            }
            crate::update::Order::StartFirst => {
                crate::update::window(spec.replicas, spec.update.max_parallel, ready)
            }
            crate::update::Order::StopFirst => {
                let (candidates, room) = if canaries {
                    (0..spec.update.canary.min(spec.replicas), spec.update.canary)
                } else {
                    (0..spec.replicas, spec.update.max_parallel)
                };
                crate::update::stop_first_window(spec.replicas, candidates, room, ready, |s| {
                    self.slot_ready_with(&spec.name, s, None, now)
                })
            }
        }
    }

    /// Where the job's live copies (and this node's placements in flight)
    /// are, per node.
    /// The copies of `job` per node as placement counts them (live ones,
    /// and placements in flight).
    pub fn placements(&self, job: &str, now: Instant) -> JobPlacements {
        self.placements_of(
            job,
            Now {
                mono: now,
                wall_ms: self.wall_ms,
            },
        )
    }

    fn placements_of(&self, job: &str, now: Now) -> JobPlacements {
        let mut p = JobPlacements::new();
        if let Some(copies) = self.seen.view.index.job(job) {
            for (_, n, c) in copies.iter() {
                if c.state.is_live() && self.seen.counts(&self.me, n, now.mono) {
                    *p.entry(n.to_string()).or_insert(0) += 1;
                }
            }
        }
        for l in self.local.live_of_job(job).filter(|l| !l.stopping) {
            let _ = l;
            *p.entry(self.me.to_string()).or_insert(0) += 1;
        }
        if let Some(f) = self.placing.in_flight(job) {
            for inf in f.values() {
                *p.entry(inf.winner.to_string()).or_insert(0) += 1;
            }
        }
        p
    }

    fn begin_round(&mut self, record: Arc<JobRecord>, slots: Vec<u32>, now: Now) {
        let Some(spec) = record.spec.as_ref() else {
            return;
        };
        self.counters.rounds += 1;
        let nodes = self.placement_nodes();
        let index = NodeIndex::new(&nodes);
        let placements = self.placements_of(&record.name, now);
        let mut bidders: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut placeable = Vec::new();
        for slot in slots {
            match candidates_with(
                &self.request_for(spec, slot, now),
                &nodes,
                &index,
                &placements,
                &self.config.placement,
            ) {
                Ok(c) => {
                    for cand in c {
                        if bidders.len() < self.config.bidders_per_round_max
                            && *cand.node != *self.me
                        {
                            bidders.insert(Arc::from(cand.node.as_str()));
                        }
                    }
                    placeable.push(slot);
                }
                Err(u) => {
                    self.counters.unplaceable += 1;
                    self.placing.failed(
                        &record.name,
                        slot,
                        u.to_string(),
                        now.mono,
                        (self.config.retry_min, self.config.retry_max),
                    );
                }
            }
        }
        if placeable.is_empty() {
            return;
        }
        let round = self.placing.begin(Round {
            job: record,
            slots: placeable,
            nodes,
            placements,
            awaiting: bidders.clone(),
            bids: BTreeMap::new(),
            deadline: now.mono + self.config.bid_timeout,
        });
        if bidders.is_empty() {
            self.finish_round(round, now);
            return;
        }
        for b in bidders {
            self.send(
                &b,
                Request::Bid,
                Some(Call::Bid {
                    round,
                    bidder: b.clone(),
                }),
                self.config.bid_timeout,
            );
        }
    }

    /// Every bid is in (or the deadline passed): assign the slots and tell
    /// the winners.
    fn finish_round(&mut self, round: u64, now: Now) {
        let Some(r) = self.placing.finish(round) else {
            return;
        };
        // The job changed meanwhile: the next pass places it afresh.
        if self
            .desired
            .get(&r.job.name)
            .is_none_or(|cur| cur.version != r.job.version)
        {
            return;
        }
        let Some(spec) = r.job.spec.as_ref() else {
            return;
        };
        // What changed while the bids were out: a slot that got a copy or
        // completed meanwhile is not placed again (found by the simulator,
        // seed 56: a batch slot that completed during the round ran twice).
        let fp = spec.task.fingerprint();
        let mut window = Windows::default();
        let slots: Vec<u32> = r
            .slots
            .iter()
            .copied()
            .filter(|s| {
                self.slot_needs_placing(spec, fp, *s, now, &mut window)
                    && !self.placing.is_in_flight(&r.job.name, *s)
            })
            .collect();
        if slots.is_empty() {
            return;
        }
        let mut nodes = r.nodes;
        for n in nodes.iter_mut() {
            if let Some(bid) = r.bids.get(n.id.as_str()) {
                n.used = bid.used;
                n.reserved = bid.reserved;
                n.ports_used = bid.ports_used.clone();
            }
            if *n.id == *self.me {
                *n = self.fresh_node();
            }
        }
        let index = NodeIndex::new(&nodes);
        let mut placements = self.placements_of(&r.job.name, now);
        let requests: Vec<_> = slots
            .iter()
            .map(|s| self.request_for(spec, *s, now))
            .collect();
        let results = assign(
            &requests,
            &mut nodes,
            &index,
            &mut placements,
            &self.config.placement,
        );
        let mut by_winner: BTreeMap<Arc<str>, Vec<u32>> = BTreeMap::new();
        for (slot, result) in slots.iter().zip(results) {
            match result {
                Ok(i) => {
                    by_winner
                        .entry(Arc::from(nodes[i].id.as_str()))
                        .or_default()
                        .push(*slot);
                }
                Err(u) => {
                    self.counters.unplaceable += 1;
                    self.placing.failed(
                        &r.job.name,
                        *slot,
                        u.to_string(),
                        now.mono,
                        (self.config.retry_min, self.config.retry_max),
                    );
                }
            }
        }
        let until = now.mono + self.config.placement_ttl;
        for (winner, slots) in by_winner {
            self.counters.placed += slots.len() as u64;
            if winner == self.me {
                let refused = self.start_slots(&r.job, &slots, now);
                for (slot, why) in refused {
                    self.counters.unplaceable += 1;
                    self.placing.failed(
                        &r.job.name,
                        slot,
                        format!("{winner} refused it: {why}"),
                        now.mono,
                        (self.config.retry_min, self.config.retry_max),
                    );
                }
                continue;
            }
            for s in &slots {
                self.placing.placed(&r.job.name, *s, winner.clone(), until);
            }
            self.send(
                &winner,
                Request::Start {
                    job: r.job.clone(),
                    slots: slots.clone(),
                    sent_ms: now.wall_ms,
                },
                Some(Call::Start {
                    job: r.job.name.clone(),
                    slots,
                    winner: winner.clone(),
                }),
                self.config.call_timeout,
            );
        }
        self.dirty = true;
    }

    fn publish(&mut self) {
        let (changes, load) = self.local.publication();
        for (key, value) in changes.into_iter().chain(self.placing.publication()) {
            self.out.push(Effect::Publish { key, value });
        }
        if let Some(load) = load {
            self.out.push(Effect::PublishLoad(load));
        }
    }

    // ---- anti-entropy ----

    fn anti_entropy(&mut self, now: Now) {
        // An exchange whose answer never came (the shell lost it, or a peer
        // is stuck) is given up after three call timeouts.
        if self.sync.exchange.as_ref().is_some_and(|e| {
            now.mono.saturating_duration_since(e.since) > self.config.call_timeout * 3
        }) {
            if let Some(e) = self.sync.exchange.take() {
                self.calls.remove(&e.call);
            }
        }
        if self.sync.exchange.is_some() {
            return;
        }
        let interval = if self.sync.caught_up {
            self.config.sync_interval
        } else {
            self.config.catch_up_retry
        };
        if self
            .sync
            .last
            .is_some_and(|t| now.mono.saturating_duration_since(t) < interval)
        {
            return;
        }
        let peers: Vec<(Arc<str>, SocketAddr)> = self
            .alive_peers()
            .into_iter()
            .filter(|(n, _)| {
                self.seen
                    .view
                    .members
                    .get(n)
                    .is_some_and(|m| m.has_record())
            })
            .collect();
        let Some((peer, addr)) = peers.choose(&mut self.rng).cloned() else {
            // Frozen, and nobody left to learn from: what it had is all
            // there is.
            if self.sync.was_caught_up && !self.sync.caught_up {
                self.sync.caught_up = true;
                self.dirty = true;
            }
            return;
        };
        self.sync.last = Some(now.mono);
        self.counters.syncs += 1;
        let (jobs, completions) = self.desired.fingerprints();
        self.sync_step(
            peer,
            addr,
            Step::Hash,
            Request::SyncHash {
                jobs,
                completions,
                clock: true,
            },
            now.mono,
        );
    }

    fn sync_step(
        &mut self,
        peer: Arc<str>,
        addr: SocketAddr,
        step: Step,
        request: Request,
        now: Instant,
    ) {
        let call = self.id();
        self.calls.insert(call, Call::Sync);
        self.sync.exchange = Some(Exchange {
            peer: peer.clone(),
            addr,
            step,
            call,
            since: now,
        });
        self.out.push(Effect::Send {
            to: peer,
            addr,
            request,
            call: Some(call),
            timeout: self.config.call_timeout,
        });
    }

    fn jobs_page(&mut self, peer: Arc<str>, addr: SocketAddr, after: Option<String>, now: Instant) {
        let (digest, until) = self
            .desired
            .digest_page(after.as_deref(), self.config.sync_digest_page);
        let step = Step::Jobs {
            after: after.clone(),
            until: until.clone(),
        };
        self.sync_step(
            peer,
            addr,
            step,
            Request::SyncJobs {
                after,
                until,
                digest,
            },
            now,
        );
    }

    fn completions_page(
        &mut self,
        peer: Arc<str>,
        addr: SocketAddr,
        after: Option<(String, u32)>,
        now: Instant,
    ) {
        let (digest, until) = self
            .desired
            .completions_page(after.as_ref(), self.config.sync_completions_page);
        let step = Step::Completions {
            after: after.clone(),
            until: until.clone(),
        };
        self.sync_step(
            peer,
            addr,
            step,
            Request::SyncCompletions {
                after,
                until,
                digest,
            },
            now,
        );
    }

    fn sync_reply(&mut self, call: CallId, result: Result<Response, String>, now: Now) {
        let Some(ex) = self.sync.exchange.take() else {
            return;
        };
        if ex.call != call {
            self.sync.exchange = Some(ex);
            return;
        }
        let Exchange {
            peer,
            addr,
            step,
            since,
            ..
        } = ex;
        if let (Step::Hash, Ok(Response::InSyncAt { wall_ms } | Response::DiffersAt { wall_ms })) =
            (&step, &result)
        {
            let rtt = now.mono.saturating_duration_since(since);
            self.offsets
                .record(peer.clone(), *wall_ms, now.wall_ms, rtt, now.mono);
        }
        match (step, result) {
            (Step::Hash, Ok(Response::InSync | Response::InSyncAt { .. })) => self.exchange_done(),
            (Step::Hash, Ok(Response::Differs | Response::DiffersAt { .. })) => {
                self.jobs_page(peer, addr, None, now.mono)
            }
            (Step::Jobs { after, until }, Ok(Response::SyncedJobs { newer, want, more })) => {
                self.counters.synced_items += newer.len() as u64;
                let last = newer.last().map(|r| r.name.clone());
                if self.take_records(newer, Origin::Sync) == Taken::Dropped {
                    // The exchange cannot complete: it ends without
                    // counting, and the next one starts over.
                    return;
                }
                // Send back what the peer has older.
                let back: Vec<Arc<JobRecord>> = want
                    .iter()
                    .filter_map(|n| self.desired.get(n).cloned())
                    .collect();
                for chunk in chunks_by_bytes(back, self.config.sync_records_max) {
                    self.out.push(Effect::Send {
                        to: peer.clone(),
                        addr,
                        request: Request::PutJobs(chunk),
                        call: None,
                        timeout: self.config.call_timeout,
                    });
                }
                match (more, last, until) {
                    // The peer had more newer records in this page than one
                    // answer carries: continue after the last one received.
                    (true, Some(last), _) => self.jobs_page(peer, addr, Some(last), now.mono),
                    (true, None, _) => {}
                    (false, _, Some(until)) => self.jobs_page(peer, addr, Some(until), now.mono),
                    (false, _, None) => self.completions_page(peer, addr, None, now.mono),
                }
                let _ = after;
            }
            (
                Step::Completions { until, .. },
                Ok(Response::SyncedCompletions { missing, more }),
            ) => {
                self.counters.synced_items += missing.len() as u64;
                let last = missing.last().map(|c| (c.job.clone(), c.slot));
                if self.take_completions(missing, Origin::Sync) == Taken::Dropped {
                    return;
                }
                match (more, last, until) {
                    (true, Some(last), _) => {
                        self.completions_page(peer, addr, Some(last), now.mono)
                    }
                    (true, None, _) => {}
                    (false, _, Some(until)) => {
                        self.completions_page(peer, addr, Some(until), now.mono)
                    }
                    (false, _, None) => self.exchange_done(),
                }
            }
            // A failure or an answer out of turn ends the exchange; the next
            // one goes to another random peer.
            _ => {}
        }
    }

    fn exchange_done(&mut self) {
        self.sync.exchange_done = true;
        self.sync.last_done_ms = Some(self.wall_ms);
        self.counters.syncs_done = self.counters.syncs_done.saturating_add(1);
        self.maybe_caught_up();
    }

    fn maybe_caught_up(&mut self) {
        // Only the exchange's own writes count: an unrelated write that is
        // slow (or lost by a shell bug) must not hold the node back forever.
        let syncing = self
            .writes
            .values()
            .any(|w| matches!(w.origin, Origin::Sync));
        if !self.sync.caught_up && self.sync.exchange_done && !syncing {
            self.sync.caught_up = true;
            self.sync.was_caught_up = true;
            self.dirty = true;
        }
    }

    // ---- logs ----

    #[allow(clippy::too_many_arguments)]
    fn logs(
        &mut self,
        token: ApiToken,
        job: String,
        slot: u32,
        node: Option<String>,
        stream: String,
        max_bytes: u64,
        now: Now,
    ) {
        let here = node.as_deref().is_none_or(|n| n == &*self.me);
        if let Some(l) = self.local.get(&job, slot).filter(|_| here) {
            self.out.push(Effect::ReadLogs {
                driver: l.driver.clone(),
                id: l.id.clone(),
                stream,
                max_bytes,
                chunk: None,
                to: LogsTo::Api(token),
            });
            return;
        }
        if node.is_none() && self.is_system(&job) {
            return self.answer(
                token,
                Err(ApiError::BadRequest(format!(
                    "`{job}` is a system job with a copy on every node: say whose logs with `--node NODE` (`?node=NODE`); `shoal status {job}` lists them"
                ))),
            );
        }
        // Prefer a running copy's holder, else any holder.
        let holder = self.seen.view.index.job(&job).and_then(|c| {
            c.slot(slot)
                .iter()
                .filter(|(n, _)| self.seen.view.members.is_live(n))
                .filter(|(n, _)| node.as_deref().is_none_or(|want| **n == *want))
                .max_by_key(|(_, c)| (c.state.is_live(), c.run))
                .map(|(n, _)| n.clone())
        });
        let addr = holder
            .as_deref()
            .and_then(|h| self.seen.view.members.get(h))
            .map(|m| m.record.address);
        let _ = now;
        match addr {
            Some(addr) => self.out.push(Effect::FetchLogs {
                addr,
                // The shell asks for the rest chunk by chunk.
                request: Request::Logs {
                    job,
                    slot,
                    stream,
                    max_bytes,
                    from: None,
                    chunked: true,
                },
                token,
                timeout: self.config.call_timeout,
            }),
            None => self.answer(
                token,
                Err(ApiError::NotFound(match &node {
                    Some(n) => format!("{n} holds no copy of slot {slot} of `{job}`"),
                    None => format!("no node holds slot {slot} of `{job}`"),
                })),
            ),
        }
    }
}

/// Records in chunks of at most `max` records and
/// [`crate::desired::ANSWER_BYTES_MAX`] encoded bytes (a record can be a
/// 1 MiB job file; a message is one frame of at most 4 MiB).
fn chunks_by_bytes(records: Vec<Arc<JobRecord>>, max: usize) -> Vec<Vec<Arc<JobRecord>>> {
    let mut out: Vec<Vec<Arc<JobRecord>>> = Vec::new();
    let mut bytes = 0usize;
    for r in records {
        let size = serde_json::to_vec(&*r).map(|b| b.len()).unwrap_or(0);
        let start_new = out.last().is_none_or(|c| {
            !c.is_empty()
                && (c.len() >= max.max(1) || bytes + size > crate::desired::ANSWER_BYTES_MAX)
        });
        if start_new {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        out.last_mut().expect("pushed above").push(r);
    }
    out
}

mod cron_jobs;
mod drain;
mod never;
pub use drain::{NodeChange, NodeDrainStatus};

#[cfg(test)]
mod tests;
