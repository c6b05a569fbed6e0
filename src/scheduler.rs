//! The node's scheduler: owns the desired state on this node (store), its
//! instances (through the drivers) and the placements it coordinates. The
//! agent's event loop feeds it view changes, driver events, calls from
//! peers and from the API, and timer ticks; it runs the pure reconciler and
//! carries out what comes back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::seq::IndexedRandom;
use serde::Serialize;
use shoal_membership::{Load, Membership, MembershipView, NodeState};
use shoal_placement::{
    candidates_with, cost, JobPlacements, Node, NodeIndex, PlacementConfig, Resources,
};
use shoal_transport::{Incoming, QuicTransport, Service, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::driver::{Driver, DriverEvent, InstanceId, InstanceSpec, InstanceState};
use crate::gossip_keys;
use crate::hlc::{wall_ms, Clock, Version};
use crate::job::{JobSpec, JobType};
use crate::reconcile::{reconcile, Inputs, Observed, Published, SlotState, StopReason};
use crate::rpc::{fingerprint, fingerprint_item, Request, Response};
use crate::store::{Completion, JobRecord, Store};

/// How long a placement this node coordinates stays "in flight" (no new
/// attempt) unless its instance shows up in gossip first.
const PENDING_TTL: Duration = Duration::from_secs(5);
/// How long an unplaceable slot waits before the next attempt.
const RETRY_UNPLACEABLE: Duration = Duration::from_secs(2);
/// Wait for a candidate's bid.
const BID_TIMEOUT: Duration = Duration::from_millis(500);
/// Wait for a winner to accept a start, and for pushes of writes.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A node that joined through seeds coordinates no placement for this long
/// after start: until gossip has brought it the whole membership, its view
/// would make it coordinator of slots others coordinate.
pub const JOIN_GRACE: Duration = Duration::from_secs(2);
/// A gap between ticks longer than this means the process was stopped
/// (above the failure detector's worst-case time to declare a node dead).
const STALL: Duration = Duration::from_secs(3);
/// Reconcile at most this often, however often things change: during a
/// large submission views and instances change every few milliseconds, and
/// each pass looks at every slot.
const RECONCILE_MIN: Duration = Duration::from_millis(100);
/// The API's snapshot is rebuilt at most this often (it copies every job
/// and instance).
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);
/// A whole-state pass (reconcile, API snapshot) waits this many times its
/// own last duration before the next one.
const PACE: u32 = 5;
/// Reconcile at least this often even if nothing changed.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// Anti-entropy with one random peer this often.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Job records per anti-entropy answer or push (each answer is one frame,
/// bounded at 4 MiB; a job record is well under 4 KiB). A peer far behind
/// catches up over several rounds, back to back.
const SYNC_RECORDS_MAX: usize = 500;
/// Completions per anti-entropy answer.
const SYNC_COMPLETIONS_MAX: usize = 10_000;
/// Grace between the stop signal and the kill.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A failed API call: HTTP status and message.
#[derive(Debug, Clone)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
}

/// Commands from the HTTP API.
pub enum ApiCommand {
    /// Submit (or update) a job from its file.
    Submit(String, oneshot::Sender<Result<JobRecord, ApiFailure>>),
    /// Stop a job.
    Stop(String, oneshot::Sender<Result<JobRecord, ApiFailure>>),
    /// Change a job's replica count.
    Scale(String, u32, oneshot::Sender<Result<JobRecord, ApiFailure>>),
    /// One job's current state.
    Job(String, oneshot::Sender<Option<Snapshot>>),
    /// The tail of a slot's output, from whichever node holds it.
    Logs {
        /// Job.
        job: String,
        /// Slot.
        slot: u32,
        /// `stdout` or `stderr`.
        stream: String,
        /// At most this many bytes.
        max_bytes: u64,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<u8>, ApiFailure>>,
    },
}

/// An instance as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceView {
    /// Job.
    pub job: String,
    /// Slot.
    pub slot: u32,
    /// Holder node.
    pub node: String,
    /// State.
    pub state: SlotState,
    /// Run id.
    pub run: u64,
    /// Restarts on its node so far.
    pub restarts: u32,
    /// Why its last start failed, if it did.
    pub error: Option<String>,
}

impl InstanceView {
    fn of(o: Observed) -> InstanceView {
        InstanceView {
            job: o.job.to_string(),
            slot: o.copy.slot,
            node: o.node.to_string(),
            state: o.copy.state,
            run: o.copy.run,
            restarts: o.copy.restarts,
            error: o.copy.error,
        }
    }
}

/// What the API reads: the scheduler's state after its last change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every job record, tombstones included.
    pub jobs: Vec<JobRecord>,
    /// Instances on live nodes.
    pub instances: Vec<InstanceView>,
    /// Completed batch slots.
    pub completed: BTreeSet<(String, u32)>,
    /// Why slots this node coordinates could not be placed.
    pub unplaceable: BTreeMap<(String, u32), String>,
}

/// Results of work the scheduler handed to tasks.
pub enum Internal {
    /// A placement round ended.
    Placed {
        /// Slots this node must start itself.
        local: Vec<(JobRecord, Vec<u32>)>,
        /// Slots that found no node, and why.
        unplaceable: Vec<((String, u32), String)>,
        /// Slots whose winner refused or did not answer.
        retry: Vec<(String, u32)>,
    },
    /// A driver start finished.
    Started(InstanceId, Result<(), String>),
    /// Anti-entropy brought records and completions from a peer.
    Synced(Vec<JobRecord>, Vec<Completion>),
}

struct Local {
    id: InstanceId,
    driver: String,
    spec: JobSpec,
    job_version: Version,
    task: u64,
    state: SlotState,
    restarts: u32,
    restart_at: Option<Instant>,
    /// Stop requested by the reconciler: do not restart.
    stopping: bool,
    /// Why the last start failed, until a start succeeds.
    error: Option<String>,
    /// Found running after an agent restart (or a long stall) and not yet
    /// checked against the cluster: if another node runs the slot by now,
    /// this copy is the stale one and goes (see `Scheduler::confirm_adopted`).
    unconfirmed: bool,
}

impl Local {
    /// This instance as published in gossip.
    fn published(&self) -> Published {
        Published {
            slot: self.id.slot,
            run: self.id.run,
            state: self.state,
            task: self.task,
            restarts: self.restarts,
            error: self.error.clone(),
        }
    }
}

/// One gossip key of instances another node publishes, parsed once.
#[derive(Clone)]
struct RemoteKey {
    value: Arc<str>,
    node: Arc<str>,
    copies: Arc<Vec<(Arc<str>, Published)>>,
}

/// The scheduler of one node.
pub struct Scheduler {
    me: String,
    store: Arc<Store>,
    clock: Clock,
    transport: QuicTransport,
    membership: Arc<Membership>,
    drivers: BTreeMap<String, Arc<dyn Driver>>,
    placement: PlacementConfig,
    view: MembershipView,
    jobs: Vec<JobRecord>,
    /// Position of each job in `jobs` (records are never removed: a stop
    /// is a tombstone).
    job_pos: HashMap<String, usize>,
    /// Fingerprints of `jobs` (name, version) and `completed`, kept up to
    /// date as they change (anti-entropy compares them every round).
    jobs_fp: u64,
    completed_fp: u64,
    completed: BTreeSet<(String, u32)>,
    local: BTreeMap<(String, u32), Local>,
    pending: BTreeMap<(String, u32), Instant>,
    unplaceable: BTreeMap<(String, u32), String>,
    published: BTreeMap<String, String>,
    /// What each bucket of instance keys last published held.
    published_buckets: BTreeMap<u64, BTreeMap<String, Vec<Published>>>,
    published_load: Option<Load>,
    dirty: bool,
    last_reconcile: Instant,
    /// When the last tick ran: a long gap means this process was stopped
    /// (SIGSTOP, a frozen VM), long enough for others to replace its work.
    last_tick: Instant,
    /// Fewer than half of the members were alive in the last view.
    minority: bool,
    /// Each member's (generation, state) in the last view.
    member_states: HashMap<String, (u64, NodeState)>,
    /// Members back from the dead whose published instances are held in
    /// doubt until then (see `on_view`).
    distrust: HashMap<String, Instant>,
    /// How long the last reconcile (with publication) and snapshot took.
    reconcile_cost: Duration,
    snapshot_cost: Duration,
    /// Task fingerprint of each live job (computed once per record).
    task_fps: HashMap<String, u64>,
    last_sync: Instant,
    internal_tx: mpsc::Sender<Internal>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    /// No coordination before this instant (see [`JOIN_GRACE`]).
    coordinate_after: Instant,
    /// Instances other nodes publish: (node, key) -> (raw value, parsed).
    remote: BTreeMap<(String, String), RemoteKey>,
    /// The API snapshot is out of date.
    snapshot_dirty: bool,
    last_snapshot: Instant,
}

fn api_err(status: u16, message: impl Into<String>) -> ApiFailure {
    ApiFailure {
        status,
        message: message.into(),
    }
}

fn encode(r: &Response) -> Vec<u8> {
    serde_json::to_vec(r).expect("responses encode")
}

impl Scheduler {
    /// A scheduler for node `me`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: String,
        store: Arc<Store>,
        transport: QuicTransport,
        membership: Arc<Membership>,
        drivers: BTreeMap<String, Arc<dyn Driver>>,
        internal_tx: mpsc::Sender<Internal>,
        snapshot_tx: watch::Sender<Arc<Snapshot>>,
    ) -> Scheduler {
        Scheduler {
            me,
            store,
            clock: Clock::default(),
            transport,
            membership,
            drivers,
            placement: PlacementConfig::default(),
            view: MembershipView::default(),
            jobs: Vec::new(),
            job_pos: HashMap::new(),
            jobs_fp: fingerprint(std::iter::empty::<()>()),
            completed_fp: fingerprint(std::iter::empty::<()>()),
            completed: BTreeSet::new(),
            local: BTreeMap::new(),
            pending: BTreeMap::new(),
            unplaceable: BTreeMap::new(),
            published: BTreeMap::new(),
            published_buckets: BTreeMap::new(),
            published_load: None,
            dirty: true,
            last_reconcile: Instant::now(),
            last_tick: Instant::now(),
            minority: false,
            member_states: HashMap::new(),
            distrust: HashMap::new(),
            reconcile_cost: Duration::ZERO,
            snapshot_cost: Duration::ZERO,
            task_fps: HashMap::new(),
            last_sync: Instant::now(),
            internal_tx,
            snapshot_tx,
            coordinate_after: Instant::now(),
            remote: BTreeMap::new(),
            snapshot_dirty: true,
            last_snapshot: Instant::now() - SNAPSHOT_INTERVAL,
        }
    }

    /// Holds coordination back for [`JOIN_GRACE`] (for a node that joined
    /// through seeds).
    pub fn joining(&mut self) {
        self.coordinate_after = Instant::now() + JOIN_GRACE;
    }

    /// Loads the stored state and adopts the instances the drivers still
    /// have from before a restart.
    pub async fn recover(&mut self) -> Result<()> {
        self.jobs = self.store.jobs()?;
        self.job_pos = self
            .jobs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        self.jobs_fp = fingerprint(self.jobs.iter().map(|r| (&r.name, &r.version)));
        self.task_fps = self
            .jobs
            .iter()
            .filter_map(|r| Some((r.name.clone(), r.spec.as_ref()?.task.fingerprint())))
            .collect();
        for r in &self.jobs {
            self.clock.observe(r.version.hlc);
        }
        self.completed = self
            .store
            .completions()?
            .into_iter()
            .map(|c| (c.job, c.slot))
            .collect();
        self.completed_fp = fingerprint(self.completed.iter());
        let drivers: Vec<Arc<dyn Driver>> = self.drivers.values().cloned().collect();
        for driver in drivers {
            for (spec, state) in driver.recover().await? {
                let job = self.job(&spec.id.job).and_then(|r| r.spec.clone());
                let Some(job_spec) = job else {
                    // Its job is gone: make sure it is too.
                    let _ = driver.stop(&spec.id, STOP_GRACE).await;
                    let _ = driver.remove(&spec.id).await;
                    continue;
                };
                let key = (spec.id.job.clone(), spec.id.slot);
                if self.local.contains_key(&key) {
                    // Two runs of one slot on this node: keep the first.
                    let _ = driver.stop(&spec.id, STOP_GRACE).await;
                    let _ = driver.remove(&spec.id).await;
                    continue;
                }
                info!(instance = %spec.id, ?state, "adopted an instance from before the restart");
                self.local.insert(
                    key.clone(),
                    Local {
                        id: spec.id.clone(),
                        driver: driver.name().to_string(),
                        task: spec.task.fingerprint(),
                        spec: job_spec,
                        job_version: spec.job_version.clone(),
                        state: SlotState::Running,
                        restarts: 0,
                        restart_at: None,
                        stopping: false,
                        error: None,
                        unconfirmed: state == InstanceState::Running,
                    },
                );
                if state != InstanceState::Running {
                    // It ended while the agent was down. A batch success
                    // still counts; anything else is forgotten rather than
                    // restarted: its slot may run elsewhere by now, and the
                    // reconciler places it again if not.
                    let success = matches!(state, InstanceState::Exited(s) if s.success());
                    let batch = self
                        .local
                        .get(&key)
                        .is_some_and(|l| l.spec.job_type == JobType::Batch);
                    if success && batch {
                        self.on_ended(spec.id, state).await;
                    } else {
                        self.local.remove(&key);
                        let _ = driver.remove(&spec.id).await;
                    }
                }
            }
        }
        self.publish_snapshot();
        Ok(())
    }

    /// A new membership view.
    pub fn on_view(&mut self, view: MembershipView) {
        // Cut off with a minority (fewer than half of the members alive),
        // this node was most likely declared dead by the rest, who re-placed
        // its slots. When the majority is back, its copies are re-checked
        // against theirs like after a restart, so that the cluster's
        // replacements stay and this side's copies go (the conflict rule
        // alone would keep the older copy, this side's).
        let counted = view
            .members
            .iter()
            .filter(|m| m.state != NodeState::Left)
            .count();
        let alive = view
            .members
            .iter()
            .filter(|m| m.state == NodeState::Alive)
            .count();
        let minority = alive * 2 < counted;
        if self.minority && !minority {
            info!(
                alive,
                members = counted,
                "rejoined the majority; re-checking this node's instances against the cluster"
            );
            self.recheck_local();
        }
        self.minority = minority;
        // A member back from the dead (it refuted with the same generation)
        // still gossips the instances it held before: until it has had the
        // join grace to re-check them, they neither count nor get replaced.
        let now = Instant::now();
        for m in view.members.iter().filter(|m| m.record.name != self.me) {
            let was = self
                .member_states
                .insert(m.record.name.clone(), (m.generation, m.state));
            if let Some((generation, NodeState::Dead)) = was {
                if generation == m.generation
                    && matches!(m.state, NodeState::Alive | NodeState::Suspect)
                {
                    info!(node = %m.record.name, "back from the dead; its instances wait for its re-check");
                    self.distrust
                        .insert(m.record.name.clone(), now + JOIN_GRACE);
                }
            }
        }
        self.distrust.retain(|_, until| *until > now);
        // Parse the instances others publish only when their value changed.
        let mut remote: BTreeMap<(String, String), RemoteKey> = BTreeMap::new();
        for m in &view.members {
            if m.record.name == self.me {
                continue;
            }
            let prefix = gossip_keys::PREFIX;
            for (key, value) in m
                .app
                .range::<str, _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
            {
                let k = (m.record.name.clone(), key.clone());
                let entry = match self.remote.get(&k) {
                    // Arc<str> equality compares pointers first.
                    Some(old) if old.value == *value => old.clone(),
                    _ => RemoteKey {
                        value: value.clone(),
                        node: Arc::from(m.record.name.as_str()),
                        copies: Arc::new(gossip_keys::decode_part(value)),
                    },
                };
                remote.insert(k, entry);
            }
        }
        self.remote = remote;
        self.view = view;
        self.dirty = true;
    }

    fn alive_peers(&self) -> Vec<(String, SocketAddr)> {
        self.view
            .members
            .iter()
            .filter(|m| m.record.name != self.me && m.state == NodeState::Alive)
            .map(|m| (m.record.name.clone(), m.record.address))
            .collect()
    }

    fn addr_of(&self, node: &str) -> Option<SocketAddr> {
        self.view.get(node).map(|m| m.record.address)
    }

    fn next_version(&mut self) -> Version {
        Version {
            hlc: self.clock.tick(wall_ms()),
            node: self.me.clone(),
        }
    }

    /// Stores job records; returns the ones that were new.
    fn apply_jobs(&mut self, records: &[JobRecord]) -> Vec<JobRecord> {
        for r in records {
            self.clock.observe(r.version.hlc);
        }
        match self.store.apply_all(records) {
            Ok(stored) => {
                if !stored.is_empty() {
                    for r in &stored {
                        let item = fingerprint_item(&(&r.name, &r.version));
                        match self.job_pos.get(&r.name) {
                            Some(&i) => {
                                let old = &self.jobs[i];
                                self.jobs_fp = self
                                    .jobs_fp
                                    .wrapping_sub(fingerprint_item(&(&old.name, &old.version)));
                                self.jobs[i] = r.clone();
                            }
                            None => {
                                self.job_pos.insert(r.name.clone(), self.jobs.len());
                                self.jobs.push(r.clone());
                            }
                        }
                        self.jobs_fp = self.jobs_fp.wrapping_add(item);
                        match &r.spec {
                            Some(s) => self.task_fps.insert(r.name.clone(), s.task.fingerprint()),
                            None => self.task_fps.remove(&r.name),
                        };
                    }
                    self.dirty = true;
                }
                stored
            }
            Err(e) => {
                warn!(error = %e, "cannot store job records");
                Vec::new()
            }
        }
    }

    fn push_to_all(&self, req: Request) {
        let body = serde_json::to_vec(&req).expect("requests encode");
        for (_, addr) in self.alive_peers() {
            let t = self.transport.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let _ = t.request(addr, Service::Rpc, body, CALL_TIMEOUT).await;
            });
        }
    }

    /// An API command.
    pub fn on_api(&mut self, cmd: ApiCommand) {
        match cmd {
            ApiCommand::Submit(text, reply) => {
                let result = match JobSpec::parse(&text) {
                    Err(e) => Err(api_err(400, e.to_string())),
                    Ok(spec) => Ok(self.write(spec.name.clone(), Some(spec))),
                };
                self.answer(reply, result);
            }
            ApiCommand::Stop(name, reply) => {
                let result = match self.job(&name).filter(|j| j.spec.is_some()) {
                    None => Err(api_err(404, format!("no job named `{name}` is running"))),
                    Some(_) => Ok(self.write(name, None)),
                };
                self.answer(reply, result);
            }
            ApiCommand::Scale(name, replicas, reply) => {
                let current = self.job(&name).and_then(|j| j.spec.clone());
                let result = match current {
                    None => Err(api_err(404, format!("no job named `{name}` is running"))),
                    Some(_) if replicas == 0 || replicas > crate::job::REPLICAS_MAX => Err(api_err(
                        400,
                        format!("replicas must be between 1 and {} (use `shoal stop` to stop a job)", crate::job::REPLICAS_MAX),
                    )),
                    Some(mut spec) => {
                        spec.replicas = replicas;
                        Ok(self.write(name, Some(spec)))
                    }
                };
                self.answer(reply, result);
            }
            ApiCommand::Logs {
                job,
                slot,
                stream,
                max_bytes,
                reply,
            } => self.logs(job, slot, stream, max_bytes, reply),
            ApiCommand::Job(name, reply) => {
                let _ = reply.send(self.job_snapshot(&name));
            }
        }
    }

    fn answer(
        &mut self,
        reply: oneshot::Sender<Result<JobRecord, ApiFailure>>,
        result: Result<JobRecord, ApiFailure>,
    ) {
        self.publish_snapshot();
        let _ = reply.send(result);
    }

    /// One job's state as the API shows it, from the live state (so a
    /// client reading right after its write sees it): a snapshot holding
    /// just that job.
    fn job_snapshot(&self, name: &str) -> Option<Snapshot> {
        let record = self.job(name)?.clone();
        let instances = self
            .observed()
            .into_iter()
            .filter(|o| &*o.job == name)
            .map(InstanceView::of)
            .collect();
        Some(Snapshot {
            jobs: vec![record],
            instances,
            completed: self
                .completed
                .iter()
                .filter(|(j, _)| j == name)
                .cloned()
                .collect(),
            unplaceable: self
                .unplaceable
                .iter()
                .filter(|((j, _), _)| j == name)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    fn logs(
        &self,
        job: String,
        slot: u32,
        stream: String,
        max_bytes: u64,
        reply: oneshot::Sender<Result<Vec<u8>, ApiFailure>>,
    ) {
        if let Some(l) = self.local.get(&(job.clone(), slot)) {
            let driver = self.drivers.get(&l.driver).cloned();
            let id = l.id.clone();
            tokio::spawn(async move {
                let r = match driver {
                    Some(d) => d
                        .logs(&id, &stream, max_bytes)
                        .await
                        .map_err(|e| api_err(400, e.to_string())),
                    None => Err(api_err(500, "driver unavailable")),
                };
                let _ = reply.send(r);
            });
            return;
        }
        // Prefer a running copy's holder, else any holder.
        let observed = self.observed();
        let holder = observed
            .iter()
            .filter(|o| *o.job == *job && o.copy.slot == slot)
            .max_by_key(|o| (o.copy.state.is_live(), o.copy.run))
            .map(|o| o.node.to_string());
        let Some(addr) = holder.as_deref().and_then(|h| self.addr_of(h)) else {
            let _ = reply.send(Err(api_err(
                404,
                format!("no node holds slot {slot} of `{job}`"),
            )));
            return;
        };
        let t = self.transport.clone();
        let body = serde_json::to_vec(&Request::Logs {
            job,
            slot,
            stream,
            max_bytes,
        })
        .expect("encodes");
        tokio::spawn(async move {
            let r = match t.request(addr, Service::Rpc, body, CALL_TIMEOUT).await {
                Ok(bytes) => match serde_json::from_slice::<Response>(&bytes) {
                    Ok(Response::Logs(b)) => Ok(b),
                    Ok(Response::Error(e)) => Err(api_err(404, e)),
                    _ => Err(api_err(502, "unexpected answer from the holder")),
                },
                Err(e) => Err(api_err(502, format!("cannot reach the holder: {e}"))),
            };
            let _ = reply.send(r);
        });
    }

    /// Graceful leave: stops every local instance (its slots move to other
    /// nodes), waiting at most the stop grace.
    pub async fn shutdown(&mut self) {
        let mut stops = Vec::new();
        for l in self.local.values() {
            if let Some(d) = self.drivers.get(&l.driver).cloned() {
                let id = l.id.clone();
                stops.push(tokio::spawn(async move {
                    let _ = d.stop(&id, STOP_GRACE).await;
                    let _ = d.remove(&id).await;
                }));
            }
        }
        for s in stops {
            let _ = s.await;
        }
        self.local.clear();
    }

    /// Writes a new version of a job (or its tombstone) and pushes it.
    fn write(&mut self, name: String, spec: Option<JobSpec>) -> JobRecord {
        let record = JobRecord {
            name,
            version: self.next_version(),
            spec,
        };
        self.apply_jobs(std::slice::from_ref(&record));
        self.push_to_all(Request::PutJobs(vec![record.clone()]));
        info!(job = %record.name, version = %record.version, stopped = record.spec.is_none(), "job written");
        record
    }

    /// A call from a peer.
    pub fn on_rpc(&mut self, msg: Incoming) {
        let from = msg.from;
        let Some(reply) = msg.reply else { return };
        let req: Request = match serde_json::from_slice(&msg.body) {
            Ok(r) => r,
            Err(e) => {
                reply.respond(encode(&Response::Error(format!(
                    "undecodable request: {e}"
                ))));
                return;
            }
        };
        let resp = match req {
            Request::PutJobs(records) => {
                self.apply_jobs(&records);
                Response::Ok
            }
            Request::PutCompletions(cs) => {
                for c in cs {
                    self.record_completion(c);
                }
                Response::Ok
            }
            Request::SyncHash { jobs, completions } => {
                if jobs == self.jobs_fingerprint() && completions == self.completions_fingerprint()
                {
                    Response::InSync
                } else {
                    Response::Differs
                }
            }
            Request::Sync { jobs, completions } => {
                let theirs: HashMap<String, Version> = jobs.into_iter().collect();
                let newer: Vec<JobRecord> = self
                    .jobs
                    .iter()
                    .filter(|r| theirs.get(&r.name).is_none_or(|v| *v < r.version))
                    .take(SYNC_RECORDS_MAX)
                    .cloned()
                    .collect();
                let want: Vec<String> = theirs
                    .iter()
                    .filter(|(n, v)| self.job(n).is_none_or(|r| r.version < **v))
                    .map(|(n, _)| n.clone())
                    .collect();
                let theirs_done: BTreeSet<(String, u32)> = completions.into_iter().collect();
                let missing: Vec<Completion> = self
                    .store
                    .completions()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| !theirs_done.contains(&(c.job.clone(), c.slot)))
                    .take(SYNC_COMPLETIONS_MAX)
                    .collect();
                Response::Synced {
                    newer,
                    want,
                    completions: missing,
                }
            }
            Request::Bid => Response::Bid(self.fresh_node()),
            Request::Start { job, slots } => {
                info!(job = %job.name, ?slots, %from, "start requested");
                self.apply_jobs(std::slice::from_ref(&job));
                Response::Started {
                    refused: self.start_slots(&job, &slots),
                }
            }
            Request::Logs {
                job,
                slot,
                stream,
                max_bytes,
            } => match self.local.get(&(job.clone(), slot)) {
                None => Response::Error(format!(
                    "{} holds no instance of {job} slot {slot}",
                    self.me
                )),
                Some(l) => {
                    let driver = self.drivers.get(&l.driver).cloned();
                    let id = l.id.clone();
                    tokio::spawn(async move {
                        let resp = match driver {
                            Some(d) => match d.logs(&id, &stream, max_bytes).await {
                                Ok(b) => Response::Logs(b),
                                Err(e) => Response::Error(e.to_string()),
                            },
                            None => Response::Error("driver unavailable".into()),
                        };
                        reply.respond(encode(&resp));
                    });
                    return;
                }
            },
        };
        reply.respond(encode(&resp));
    }

    fn jobs_fingerprint(&self) -> u64 {
        self.jobs_fp
    }

    fn completions_fingerprint(&self) -> u64 {
        self.completed_fp
    }

    /// Whether `node` came back from the dead less than the join grace ago
    /// (its published instances are held in doubt).
    fn distrusted(&self, node: &str, now: Instant) -> bool {
        self.distrust.get(node).is_some_and(|until| *until > now)
    }

    /// A job record by name.
    fn job(&self, name: &str) -> Option<&JobRecord> {
        self.job_pos.get(name).map(|&i| &self.jobs[i])
    }

    /// This node as placement sees it, with its own fresh load.
    fn fresh_node(&self) -> Node {
        let me = self.view.get(&self.me);
        let mut node = Node::new(self.me.clone(), 0, 0);
        if let Some(m) = me {
            node.capacity = Resources {
                cpu_millis: m.record.capacity.cpu_millis,
                memory_mib: m.record.capacity.memory_mib,
            };
            node.labels = m.record.labels.clone();
        }
        node.drivers = self.drivers.keys().cloned().collect();
        for l in self.local.values().filter(|l| l.state.is_live()) {
            node.used = node.used.plus(Resources {
                cpu_millis: l.spec.task.resources.cpu,
                memory_mib: l.spec.task.resources.memory,
            });
            node.ports_used.extend(l.spec.task.ports.values().copied());
        }
        node
    }

    /// Starts slots this node won; returns the ones it refused.
    fn start_slots(&mut self, job: &JobRecord, slots: &[u32]) -> Vec<(u32, String)> {
        let mut refused = Vec::new();
        let current = self.job(&job.name).cloned();
        let Some(spec) = current.and_then(|r| r.spec) else {
            return slots
                .iter()
                .map(|s| (*s, "job is stopped".to_string()))
                .collect();
        };
        let Some(driver) = self.drivers.get(&spec.task.driver).cloned() else {
            return slots
                .iter()
                .map(|s| (*s, format!("no {} driver here", spec.task.driver)))
                .collect();
        };
        // This node's load, raised by each slot it takes below.
        let mut fresh = self.fresh_node();
        for &slot in slots {
            let key = (job.name.clone(), slot);
            if slot >= spec.replicas {
                refused.push((slot, "beyond the replica count".into()));
                continue;
            }
            if self
                .local
                .get(&key)
                .is_some_and(|l| l.state.is_live() || l.state == SlotState::Completed)
            {
                continue; // already here
            }
            if spec.job_type == JobType::Batch && self.completed.contains(&key) {
                refused.push((slot, "already completed".into()));
                continue;
            }
            let req = spec.slot_request(slot);
            if cost(&fresh, &req) == u64::MAX
                || req.ports.iter().any(|p| fresh.ports_used.contains(p))
            {
                refused.push((slot, "no longer fits".into()));
                continue;
            }
            fresh.used = fresh.used.plus(req.resources);
            fresh.ports_used.extend(req.ports.iter().copied());
            let id = InstanceId {
                job: job.name.clone(),
                slot,
                run: self.clock.tick(wall_ms()).packed(),
            };
            self.local.insert(
                key,
                Local {
                    id: id.clone(),
                    driver: driver.name().to_string(),
                    task: spec.task.fingerprint(),
                    spec: spec.clone(),
                    job_version: job.version.clone(),
                    state: SlotState::Starting,
                    restarts: 0,
                    restart_at: None,
                    stopping: false,
                    error: None,
                    unconfirmed: false,
                },
            );
            self.launch(id, driver.clone(), &spec, job.version.clone());
        }
        self.dirty = true;
        refused
    }

    fn launch(
        &self,
        id: InstanceId,
        driver: Arc<dyn Driver>,
        spec: &JobSpec,
        job_version: Version,
    ) {
        let env = BTreeMap::from([
            ("SHOAL_JOB".to_string(), id.job.clone()),
            ("SHOAL_SLOT".to_string(), id.slot.to_string()),
            ("SHOAL_NODE".to_string(), self.me.clone()),
        ]);
        let ispec = InstanceSpec {
            id: id.clone(),
            job_version,
            task: spec.task.clone(),
            env,
        };
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let r = driver.start(&ispec).await.map_err(|e| format!("{e:#}"));
            let _ = tx.send(Internal::Started(id, r)).await;
        });
    }

    /// Work handed to tasks came back.
    pub async fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Placed {
                local,
                unplaceable,
                retry,
            } => {
                for (job, slots) in local {
                    let refused = self.start_slots(&job, &slots);
                    for (slot, why) in refused {
                        debug!(job = %job.name, slot, why, "could not start locally");
                        self.pending
                            .insert((job.name.clone(), slot), Instant::now() + RETRY_UNPLACEABLE);
                    }
                }
                for (key, why) in unplaceable {
                    self.pending
                        .insert(key.clone(), Instant::now() + RETRY_UNPLACEABLE);
                    self.unplaceable.insert(key, why);
                }
                for key in retry {
                    self.pending.remove(&key);
                }
                self.dirty = true;
            }
            Internal::Synced(records, completions) => {
                if records.len() >= SYNC_RECORDS_MAX || completions.len() >= SYNC_COMPLETIONS_MAX {
                    // More to fetch: sync again on the next tick.
                    self.last_sync = Instant::now() - SYNC_INTERVAL;
                }
                self.apply_jobs(&records);
                for c in completions {
                    self.record_completion(c);
                }
            }
            Internal::Started(id, result) => {
                let key = (id.job.clone(), id.slot);
                if let Some(l) = self.local.get_mut(&key).filter(|l| l.id == id) {
                    match result {
                        Ok(()) => {
                            l.error = None;
                            if l.stopping {
                                // Stopped while it was starting: that stop
                                // found nothing to signal yet (found by the
                                // chaos suite as an orphan process), so stop
                                // it now that it runs.
                                if let Some(driver) = self.drivers.get(&l.driver).cloned() {
                                    spawn_stop(driver, l.id.clone());
                                }
                            } else if l.state == SlotState::Starting {
                                l.state = SlotState::Running;
                            }
                        }
                        Err(e) => {
                            warn!(instance = %id, error = %e, "start failed");
                            l.error = Some(format!("start failed: {e}"));
                            self.on_ended(
                                id,
                                InstanceState::Exited(crate::driver::ExitStatus {
                                    code: Some(127),
                                    signal: None,
                                }),
                            )
                            .await;
                        }
                    }
                }
                self.dirty = true;
            }
        }
        self.publish_snapshot();
    }

    fn record_completion(&mut self, c: Completion) {
        let key = (c.job.clone(), c.slot);
        if self.completed.contains(&key) {
            return;
        }
        if let Err(e) = self.store.complete(&c) {
            warn!(error = %e, "cannot record a completion");
            return;
        }
        self.completed_fp = self.completed_fp.wrapping_add(fingerprint_item(&key));
        self.completed.insert(key);
        self.dirty = true;
    }

    /// A driver says an instance ended.
    pub async fn on_driver_event(&mut self, ev: DriverEvent) {
        let DriverEvent::Ended { id, state } = ev;
        self.on_ended(id, state).await;
        self.publish_snapshot();
    }

    async fn on_ended(&mut self, id: InstanceId, state: InstanceState) {
        let key = (id.job.clone(), id.slot);
        let Some(l) = self.local.get_mut(&key).filter(|l| l.id == id) else {
            return;
        };
        self.dirty = true;
        let driver = self.drivers.get(&l.driver).cloned();
        if l.stopping {
            self.local.remove(&key);
            if let Some(d) = driver {
                let _ = d.remove(&id).await;
            }
            return;
        }
        let success = matches!(state, InstanceState::Exited(s) if s.success());
        match l.spec.job_type {
            JobType::Batch if success => {
                l.state = SlotState::Completed;
                let c = Completion {
                    job: id.job.clone(),
                    slot: id.slot,
                    job_version: l.job_version.clone(),
                    node: self.me.clone(),
                    exit_code: 0,
                };
                info!(instance = %id, "batch slot completed");
                self.record_completion(c.clone());
                self.push_to_all(Request::PutCompletions(vec![c]));
            }
            JobType::Batch if l.restarts >= l.spec.restart.attempts => {
                warn!(instance = %id, ?state, "batch slot failed for good");
                l.state = SlotState::Failed;
            }
            _ => {
                // Restart in place after a backoff; the slot stays ours
                // (still a live copy) so nobody else places it meanwhile.
                let delay = l.spec.restart.backoff(l.restarts);
                l.restarts += 1;
                l.state = SlotState::Starting;
                l.restart_at = Some(Instant::now() + delay);
                info!(instance = %id, ?state, restart_in = ?delay, "instance ended; restarting");
            }
        }
    }

    /// Periodic work: restarts, placements, stops, publication, sync.
    pub async fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_tick) > STALL {
            // We were frozen: peers have probably declared us dead and
            // re-placed our slots. Hold our copies back until gossip shows
            // whether they did (as after a restart).
            warn!(stalled_for = ?now.duration_since(self.last_tick), "this node was stalled; re-checking its instances against the cluster");
            self.recheck_local();
        }
        self.last_tick = now;
        // Due restarts: a new run of the same slot.
        let due: Vec<(String, u32)> = self
            .local
            .iter()
            .filter(|(_, l)| l.restart_at.is_some_and(|t| t <= now) && !l.stopping)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let run = self.clock.tick(wall_ms()).packed();
            let Some(l) = self.local.get_mut(&key) else {
                continue;
            };
            let Some(driver) = self.drivers.get(&l.driver).cloned() else {
                continue;
            };
            if let Some(d) = self.drivers.get(&l.driver) {
                let _ = d.remove(&l.id).await;
            }
            l.id = InstanceId {
                job: key.0.clone(),
                slot: key.1,
                run,
            };
            l.restart_at = None;
            let (id, spec, version) = (l.id.clone(), l.spec.clone(), l.job_version.clone());
            self.launch(id, driver, &spec, version);
            self.dirty = true;
        }
        self.pending.retain(|_, deadline| *deadline > now);
        let since = now.duration_since(self.last_reconcile);
        // Whole-state passes are paced by their own cost: the next waits
        // PACE times as long as the last took (at least the minimum), so
        // with many jobs they cost a bounded share of a core instead of
        // crowding out the work they serve.
        let reconcile_gap = RECONCILE_MIN.max(self.reconcile_cost * PACE);
        if (self.dirty && since >= reconcile_gap) || since >= RECONCILE_INTERVAL.max(reconcile_gap)
        {
            self.dirty = false;
            self.last_reconcile = now;
            self.reconcile_now().await;
            self.publish().await;
            self.publish_snapshot();
            self.reconcile_cost = now.elapsed();
        }
        let snapshot_gap = SNAPSHOT_INTERVAL.max(self.snapshot_cost * PACE);
        if self.snapshot_dirty && now.duration_since(self.last_snapshot) >= snapshot_gap {
            let started = Instant::now();
            self.last_snapshot = started;
            self.build_snapshot();
            self.snapshot_cost = started.elapsed();
        }
        if now.duration_since(self.last_sync) >= SYNC_INTERVAL {
            self.last_sync = now;
            self.anti_entropy();
        }
    }

    /// Alive nodes whose record has arrived (a node known only from a
    /// probe has no capacity yet and cannot be a candidate).
    fn live_nodes_for_placement(&self) -> Vec<Node> {
        self.view
            .members
            .iter()
            .filter(|m| {
                m.state == NodeState::Alive
                    && (m.record.name == self.me || !m.record.version.is_empty())
            })
            .map(|m| {
                if m.record.name == self.me {
                    return self.fresh_node();
                }
                let mut n = Node::new(
                    m.record.name.clone(),
                    m.record.capacity.cpu_millis,
                    m.record.capacity.memory_mib,
                );
                n.used = Resources {
                    cpu_millis: m.load.cpu_millis,
                    memory_mib: m.load.memory_mib,
                };
                n.labels = m.record.labels.clone();
                n.drivers = m.record.drivers.iter().cloned().collect();
                n
            })
            .collect()
    }

    /// Instances on live (alive or suspect) nodes; this node's own from its table.
    fn observed(&self) -> Vec<Observed> {
        let mut out = Vec::new();
        let live: BTreeSet<&str> = self
            .view
            .members
            .iter()
            .filter(|m| matches!(m.state, NodeState::Alive | NodeState::Suspect))
            .map(|m| m.record.name.as_str())
            .collect();
        let now = Instant::now();
        for ((node, _), r) in &self.remote {
            if !live.contains(node.as_str()) || self.distrusted(node, now) {
                continue;
            }
            out.extend(r.copies.iter().map(|(job, copy)| Observed {
                node: r.node.clone(),
                job: job.clone(),
                copy: copy.clone(),
            }));
        }
        let me: Arc<str> = Arc::from(self.me.as_str());
        out.extend(
            self.local
                .iter()
                .filter(|(_, l)| !l.unconfirmed)
                .map(|((job, _), l)| Observed {
                    node: me.clone(),
                    job: Arc::from(job.as_str()),
                    copy: l.published(),
                }),
        );
        out
    }

    async fn reconcile_now(&mut self) {
        if self.view.members.is_empty() {
            return;
        }
        let observed = self.observed();
        // A placement that shows up in gossip is done: forget it, so that a
        // later loss of the copy is replaced at once.
        let placed: BTreeSet<(&str, u32)> = observed
            .iter()
            .filter(|o| o.copy.state.is_live())
            .map(|o| (&*o.job, o.copy.slot))
            .collect();
        self.pending
            .retain(|(j, s), _| !placed.contains(&(j.as_str(), *s)));
        let members: Vec<String> = if Instant::now() < self.coordinate_after {
            Vec::new()
        } else {
            self.view
                .members
                .iter()
                .filter(|m| m.state == NodeState::Alive)
                .map(|m| m.record.name.clone())
                .collect()
        };
        if Instant::now() >= self.coordinate_after {
            self.confirm_adopted(&observed);
        }
        let mut pending: BTreeSet<(String, u32)> = self.pending.keys().cloned().collect();
        // Slots a member back from the dead held wait for its re-check.
        let now = Instant::now();
        for ((node, _), r) in &self.remote {
            if self.distrusted(node, now) {
                pending.extend(r.copies.iter().map(|(job, c)| (job.to_string(), c.slot)));
            }
        }
        let actions = reconcile(&Inputs {
            me: &self.me,
            jobs: &self.jobs,
            completed: &self.completed,
            observed: &observed,
            members: &members,
            pending: &pending,
            task_fingerprints: Some(&self.task_fps),
        });
        for (job, slot, run, reason) in actions.stop {
            self.stop_local(&job, slot, run, reason);
        }
        // Forget finished local entries of stopped jobs.
        let live_jobs: BTreeSet<&str> = self
            .jobs
            .iter()
            .filter(|r| r.spec.is_some())
            .map(|r| r.name.as_str())
            .collect();
        let gone: Vec<(String, u32)> = self
            .local
            .iter()
            // Not those being stopped: they go when their end is reported
            // (removing one now would forget its process before the stop
            // reached it — found by the chaos suite).
            .filter(|((j, _), l)| {
                !live_jobs.contains(j.as_str()) && !l.state.is_live() && !l.stopping
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(l) = self.local.remove(&key) {
                if let Some(d) = self.drivers.get(&l.driver) {
                    let _ = d.remove(&l.id).await;
                }
            }
        }
        if actions.place.is_empty() {
            return;
        }
        for key in &actions.place {
            self.pending
                .insert(key.clone(), Instant::now() + PENDING_TTL);
            self.unplaceable.remove(key);
        }
        let nodes = self.live_nodes_for_placement();
        self.spawn_placement(actions.place, nodes, &observed);
    }

    /// Holds this node's live copies back from gossip and from its own
    /// reconciler, and coordinates nothing, for [`JOIN_GRACE`]; then
    /// [`Self::confirm_adopted`] keeps those the cluster did not replace.
    fn recheck_local(&mut self) {
        for l in self.local.values_mut().filter(|l| l.state.is_live()) {
            l.unconfirmed = true;
        }
        self.coordinate_after = Instant::now() + JOIN_GRACE;
    }

    /// Settles the copies found after a restart or a stall, once gossip has
    /// had [`JOIN_GRACE`] to show the cluster's state: a copy whose slot
    /// another node runs now is stopped; the others are ours again.
    fn confirm_adopted(&mut self, observed: &[Observed]) {
        let unconfirmed: Vec<((String, u32), u64)> = self
            .local
            .iter()
            .filter(|(_, l)| l.unconfirmed)
            .map(|(k, l)| (k.clone(), l.id.run))
            .collect();
        if unconfirmed.is_empty() {
            return;
        }
        let live_elsewhere: BTreeSet<(&str, u32)> = observed
            .iter()
            .filter(|o| *o.node != *self.me && o.copy.state.is_live())
            .map(|o| (&*o.job, o.copy.slot))
            .collect();
        for ((job, slot), run) in unconfirmed {
            let elsewhere = live_elsewhere.contains(&(job.as_str(), slot));
            if let Some(l) = self.local.get_mut(&(job.clone(), slot)) {
                l.unconfirmed = false;
            }
            if elsewhere {
                self.stop_local(&job, slot, run, StopReason::Superseded);
            } else {
                info!(job = %job, slot, "adopted instance confirmed");
            }
        }
    }

    fn stop_local(&mut self, job: &str, slot: u32, run: u64, reason: StopReason) {
        let Some(l) = self
            .local
            .get_mut(&(job.to_string(), slot))
            .filter(|l| l.id.run == run)
        else {
            return;
        };
        if l.stopping {
            return;
        }
        info!(instance = %l.id, ?reason, "stopping");
        l.stopping = true;
        l.state = SlotState::Pending;
        self.dirty = true;
        let restart_pending = l.restart_at.take().is_some();
        let Some(driver) = self.drivers.get(&l.driver).cloned() else {
            return;
        };
        let id = l.id.clone();
        if restart_pending {
            // Nothing runs (it was waiting to restart): forget it now.
            self.local.remove(&(job.to_string(), slot));
            tokio::spawn(async move {
                let _ = driver.remove(&id).await;
            });
            return;
        }
        spawn_stop(driver, id);
    }

    fn spawn_placement(&self, slots: Vec<(String, u32)>, nodes: Vec<Node>, observed: &[Observed]) {
        let mut by_job: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (j, s) in slots {
            by_job.entry(j).or_default().push(s);
        }
        // Live copies per node of each job being placed, in one pass.
        let mut placements_of: HashMap<&str, JobPlacements> = HashMap::new();
        for o in observed.iter().filter(|o| o.copy.state.is_live()) {
            if by_job.contains_key(&*o.job) {
                *placements_of
                    .entry(&o.job)
                    .or_default()
                    .entry(o.node.to_string())
                    .or_default() += 1;
            }
        }
        let mut work: Vec<(JobRecord, Vec<u32>, JobPlacements)> = Vec::new();
        for (name, slots) in &by_job {
            let Some(record) = self.job(name).cloned() else {
                continue;
            };
            let placements = placements_of.remove(name.as_str()).unwrap_or_default();
            work.push((record, slots.clone(), placements));
        }
        let addrs: HashMap<String, SocketAddr> = nodes
            .iter()
            .filter_map(|n| self.addr_of(&n.id).map(|a| (n.id.clone(), a)))
            .collect();
        let me = self.me.clone();
        let my_bid = self.fresh_node();
        let transport = self.transport.clone();
        let config = self.placement.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = place_round(me, my_bid, nodes, addrs, work, config, transport).await;
            let _ = tx.send(result).await;
        });
    }

    /// Publishes this node's instances and load in gossip.
    async fn publish(&mut self) {
        let mut buckets: BTreeMap<u64, BTreeMap<String, Vec<Published>>> = BTreeMap::new();
        for ((job, _), l) in self.local.iter().filter(|(_, l)| !l.unconfirmed) {
            buckets
                .entry(gossip_keys::bucket_of(job))
                .or_default()
                .entry(job.clone())
                .or_default()
                .push(l.published());
        }
        // Re-encode only the buckets whose instances changed; a bucket
        // that emptied publishes no part.
        let changed: BTreeSet<u64> = buckets
            .iter()
            .filter(|(b, jobs)| self.published_buckets.get(b) != Some(jobs))
            .map(|(b, _)| *b)
            .chain(
                self.published_buckets
                    .keys()
                    .filter(|b| !buckets.contains_key(b))
                    .copied(),
            )
            .collect();
        for bucket in changed {
            let parts = buckets
                .get(&bucket)
                .map(|jobs| gossip_keys::encode_bucket(bucket, jobs))
                .unwrap_or_default();
            let prefix = format!("{}{bucket}/", gossip_keys::PREFIX);
            let stale: Vec<String> = self
                .published
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .filter(|k| !parts.iter().any(|(p, _)| p == k))
                .collect();
            for k in stale {
                let _ = self.membership.set_app(&k, None).await;
                self.published.remove(&k);
            }
            for (k, v) in parts {
                if self.published.get(&k) != Some(&v) {
                    if let Err(e) = self.membership.set_app(&k, Some(v.clone())).await {
                        warn!(error = %e, "cannot publish instances");
                    }
                    self.published.insert(k, v);
                }
            }
        }
        self.published_buckets = buckets;
        let fresh = self.fresh_node();
        let load = Load {
            cpu_millis: fresh.used.cpu_millis,
            memory_mib: fresh.used.memory_mib,
            instances: self.local.values().filter(|l| l.state.is_live()).count() as u64,
        };
        if self.published_load != Some(load) {
            self.published_load = Some(load);
            let _ = self.membership.set_load(load).await;
        }
    }

    fn anti_entropy(&self) {
        let peers = self.alive_peers();
        let Some((_, addr)) = peers.choose(&mut rand::rng()).cloned() else {
            return;
        };
        let hash = Request::SyncHash {
            jobs: self.jobs_fingerprint(),
            completions: self.completions_fingerprint(),
        };
        // The digest is built only if the fingerprints differ, from the
        // API snapshot (shared, at most a tick old).
        let snap = self.snapshot_tx.borrow().clone();
        let t = self.transport.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let call = |req: &Request| {
                let t = t.clone();
                let body = serde_json::to_vec(req).expect("encodes");
                async move {
                    let bytes = t
                        .request(addr, Service::Rpc, body, CALL_TIMEOUT)
                        .await
                        .ok()?;
                    serde_json::from_slice::<Response>(&bytes).ok()
                }
            };
            if !matches!(call(&hash).await, Some(Response::Differs)) {
                return;
            }
            let full = Request::Sync {
                jobs: snap
                    .jobs
                    .iter()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect(),
                completions: snap.completed.iter().cloned().collect(),
            };
            let Some(Response::Synced {
                newer,
                want,
                completions,
            }) = call(&full).await
            else {
                return;
            };
            if !newer.is_empty() || !completions.is_empty() {
                let _ = tx.send(Internal::Synced(newer, completions)).await;
            }
            let want: std::collections::HashSet<String> = want.into_iter().collect();
            let back: Vec<JobRecord> = snap
                .jobs
                .iter()
                .filter(|r| want.contains(&r.name))
                .cloned()
                .collect();
            for chunk in back.chunks(SYNC_RECORDS_MAX) {
                let _ = call(&Request::PutJobs(chunk.to_vec())).await;
            }
        });
    }

    /// Marks the API snapshot out of date; [`Scheduler::tick`] rebuilds it
    /// at most once per tick.
    fn publish_snapshot(&mut self) {
        self.snapshot_dirty = true;
    }

    fn build_snapshot(&mut self) {
        self.snapshot_dirty = false;
        let mut instances: Vec<InstanceView> =
            self.observed().into_iter().map(InstanceView::of).collect();
        instances.sort_by(|a, b| (&a.job, a.slot, &a.node).cmp(&(&b.job, b.slot, &b.node)));
        let snap = Snapshot {
            jobs: self.jobs.clone(),
            instances,
            completed: self.completed.clone(),
            unplaceable: self.unplaceable.clone(),
        };
        self.snapshot_tx.send_replace(Arc::new(snap));
    }
}

/// Stops an instance in the background (the stop signal, then a kill after
/// [`STOP_GRACE`]); its end arrives as a driver event.
fn spawn_stop(driver: Arc<dyn Driver>, id: InstanceId) {
    tokio::spawn(async move {
        if let Err(e) = driver.stop(&id, STOP_GRACE).await {
            warn!(instance = %id, error = %e, "stop failed");
        }
    });
}

/// One placement round, coordinated by this node: the candidates of each
/// slot bid with their fresh load (one round trip, in parallel), the
/// winners are chosen slot by slot (each assignment raising the winner's
/// load for the next), and each winner is told to start its slots.
async fn place_round(
    me: String,
    my_bid: Node,
    nodes: Vec<Node>,
    addrs: HashMap<String, SocketAddr>,
    work: Vec<(JobRecord, Vec<u32>, JobPlacements)>,
    config: PlacementConfig,
    transport: QuicTransport,
) -> Internal {
    let index = NodeIndex::new(&nodes);
    let mut unplaceable = Vec::new();
    let mut retry = Vec::new();
    let mut slot_candidates: Vec<(usize, u32, Vec<String>)> = Vec::new();
    let mut bidders: BTreeSet<String> = BTreeSet::new();
    for (wi, (record, slots, placements)) in work.iter().enumerate() {
        let Some(spec) = &record.spec else { continue };
        for &slot in slots {
            match candidates_with(
                &spec.slot_request(slot),
                &nodes,
                &index,
                placements,
                &config,
            ) {
                Ok(c) => {
                    let names: Vec<String> = c.into_iter().map(|c| c.node).collect();
                    bidders.extend(names.iter().cloned());
                    slot_candidates.push((wi, slot, names));
                }
                Err(e) => unplaceable.push(((record.name.clone(), slot), e.to_string())),
            }
        }
    }
    // Fresh bids, in parallel.
    let mut fresh: HashMap<String, Node> = HashMap::new();
    fresh.insert(me.clone(), my_bid);
    let mut calls = Vec::new();
    for b in bidders.iter().filter(|b| **b != me) {
        let Some(addr) = addrs.get(b).copied() else {
            continue;
        };
        let t = transport.clone();
        let b = b.clone();
        calls.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&Request::Bid).expect("encodes");
            let resp = t
                .request(addr, Service::Rpc, body, BID_TIMEOUT)
                .await
                .ok()?;
            match serde_json::from_slice::<Response>(&resp).ok()? {
                Response::Bid(node) if node.id == b => Some(node),
                _ => None,
            }
        }));
    }
    for c in calls {
        if let Ok(Some(node)) = c.await {
            fresh.insert(node.id.clone(), node);
        }
    }
    // Winners, slot by slot.
    let mut assigned: BTreeMap<(String, usize), Vec<u32>> = BTreeMap::new();
    let mut placements: Vec<JobPlacements> = work.iter().map(|w| w.2.clone()).collect();
    for (wi, slot, cands) in slot_candidates {
        let spec = work[wi].0.spec.as_ref().expect("checked");
        let req = spec.slot_request(slot);
        let best = cands
            .iter()
            .enumerate()
            .filter_map(|(rank, c)| {
                let node = fresh.get(c)?;
                if req.distinct_hosts && placements[wi].get(c).is_some_and(|n| *n > 0) {
                    return None;
                }
                let bid = cost(node, &req);
                (bid != u64::MAX).then_some((bid, rank, c.clone()))
            })
            .min();
        match best {
            Some((_, _, winner)) => {
                if let Some(n) = fresh.get_mut(&winner) {
                    n.used = n.used.plus(req.resources);
                    n.ports_used.extend(req.ports.iter().copied());
                }
                *placements[wi].entry(winner.clone()).or_default() += 1;
                assigned.entry((winner, wi)).or_default().push(slot);
            }
            None => retry.push((work[wi].0.name.clone(), slot)),
        }
    }
    // Tell the winners.
    let mut local = Vec::new();
    let mut starts = Vec::new();
    for ((winner, wi), slots) in assigned {
        let record = work[wi].0.clone();
        info!(job = %record.name, ?slots, %winner, "placed");
        if winner == me {
            local.push((record, slots));
            continue;
        }
        let Some(addr) = addrs.get(&winner).copied() else {
            retry.extend(slots.iter().map(|s| (record.name.clone(), *s)));
            continue;
        };
        let t = transport.clone();
        starts.push(tokio::spawn(async move {
            let name = record.name.clone();
            let body = serde_json::to_vec(&Request::Start {
                job: record,
                slots: slots.clone(),
            })
            .expect("encodes");
            let refused: Vec<u32> = match t.request(addr, Service::Rpc, body, CALL_TIMEOUT).await {
                Ok(bytes) => match serde_json::from_slice::<Response>(&bytes) {
                    Ok(Response::Started { refused }) => {
                        refused.into_iter().map(|(s, _)| s).collect()
                    }
                    _ => slots,
                },
                Err(_) => slots,
            };
            refused
                .into_iter()
                .map(|s| (name.clone(), s))
                .collect::<Vec<_>>()
        }));
    }
    for s in starts {
        if let Ok(refused) = s.await {
            retry.extend(refused);
        }
    }
    Internal::Placed {
        local,
        unplaceable,
        retry,
    }
}
