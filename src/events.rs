//! The event stream (`GET /v1/events`): what changed in the cluster as
//! this node sees it, one JSON object per change.
//!
//! Events are derived, not logged by the code that makes the changes: a
//! task compares each snapshot of the scheduler's state (and each
//! membership view) with the one before and turns the differences into
//! events ([`diff`], pure). So every node streams the events of the whole
//! cluster — a job written elsewhere reaches it as a replicated record,
//! a copy started elsewhere as gossip, a node's death as its own failure
//! detector's verdict — with no second channel to keep consistent with the
//! state, and nothing added to the scheduler's loop. What it costs: a
//! change that comes and goes between two snapshots (100 ms apart at
//! most while anything changes) is not seen, except restarts, which are
//! counted; the stream says what the state became, as Kubernetes' watches
//! do.
//!
//! Each node keeps its last [`EVENTS_KEPT`] events in memory. A cursor
//! names one of them on one run of one agent; `?since=CURSOR` resumes
//! after it with no gap and no repeat while it is still kept, and starts
//! with a `lost` event (re-read the state then) when it is not.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::health::Health;
use shoal_core::instance::SlotState;
use shoal_core::records::JobRecord;
use shoal_membership::{MembershipView, NodeState};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::api::{InstanceView, JobStatus, Snapshot};

/// Events kept for resuming (about 300 bytes each).
pub const EVENTS_KEPT: usize = 16_384;
/// Event streams served at once by one agent.
pub const STREAMS_MAX: usize = 64;
/// Topics one stream may filter on.
pub const TOPICS_MAX: usize = 16;
/// A quiet stream sends a heartbeat this often (`{}` in NDJSON, a comment
/// in SSE), so that a proxy keeps it open and a gone client is noticed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Events written to a stream in one chunk, at most.
const BATCH_MAX: usize = 256;

/// One event as streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Where to resume after it (`?since=`).
    pub cursor: String,
    /// When this node saw it (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// What happened: `job.submitted`, `instance.started`, `node.dead`,
    /// ... (see [`diff`]), or `lost`.
    pub kind: String,
    /// The job it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The node it is about (an instance's holder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The slot it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The job version it is about (`v7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A copy's restarts so far (`instance.restarted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    /// What happened, for people.
    pub message: String,
}

/// An event before it has a cursor and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// See [`Event::kind`].
    pub kind: &'static str,
    /// See [`Event::job`].
    pub job: Option<String>,
    /// See [`Event::node`].
    pub node: Option<String>,
    /// See [`Event::slot`].
    pub slot: Option<u32>,
    /// See [`Event::version`].
    pub version: Option<String>,
    /// See [`Event::restarts`].
    pub restarts: Option<u32>,
    /// See [`Event::message`].
    pub message: String,
}

impl Change {
    fn job(kind: &'static str, job: &str, version: Option<String>, message: String) -> Self {
        Change {
            kind,
            job: Some(job.to_string()),
            node: None,
            slot: None,
            version,
            restarts: None,
            message,
        }
    }

    fn node(kind: &'static str, node: &str, message: String) -> Self {
        Change {
            kind,
            job: None,
            node: Some(node.to_string()),
            slot: None,
            version: None,
            restarts: None,
            message,
        }
    }

    fn instance(kind: &'static str, i: &InstanceView, message: String) -> Self {
        Change {
            kind,
            job: Some(i.job.clone()),
            node: Some(i.node.clone()),
            slot: Some(i.slot),
            version: i.version.clone(),
            restarts: None,
            message,
        }
    }
}

/// The changes from one state of the cluster to the next, as this node
/// sees it: job writes, deployments, instances and nodes.
pub fn diff(
    before: &Snapshot,
    before_view: &MembershipView,
    after: &Snapshot,
    after_view: &MembershipView,
) -> Vec<Change> {
    let mut out = Vec::new();
    if !std::ptr::eq(before, after) {
        jobs(before, after, &mut out);
        instances(before, after, after_view, &mut out);
        node_settings(before, after, &mut out);
    }
    members(before_view, after_view, &mut out);
    out
}

fn jobs(before: &Snapshot, after: &Snapshot, out: &mut Vec<Change>) {
    let old: HashMap<&str, &JobStatus> = before.jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    for job in &after.jobs {
        let name = job.name.as_str();
        let version = Some(job.version.clone());
        let prev = old.get(name);
        match (prev, after.records.get(name)) {
            (None, _) => out.push(Change::job(
                "job.submitted",
                name,
                version,
                format!(
                    "job {name} {} submitted ({} {})",
                    job.version,
                    job.replicas,
                    plural(job.replicas, "replica", "replicas")
                ),
            )),
            (Some(p), Some(record)) if p.hlc != job.hlc => {
                if let Some(c) = written(name, p, before.records.get(name), job, record) {
                    out.push(c);
                }
            }
            _ => {}
        }
        deployment(name, prev.and_then(|p| p.deployment.as_ref()), job, out);
    }
    let live: std::collections::HashSet<&str> =
        after.jobs.iter().map(|j| j.name.as_str()).collect();
    for job in &before.jobs {
        if !live.contains(job.name.as_str()) {
            out.push(Change::job(
                "job.stopped",
                &job.name,
                Some(job.version.clone()),
                format!("job {} stopped", job.name),
            ));
        }
    }
}

/// How a live job's record was rewritten: updated, scaled, reverted (by
/// hand or by a failed deployment) or promoted; `None` for a write that
/// only marks how a deployment ended (its own event says so).
fn written(
    name: &str,
    prev: &JobStatus,
    prev_record: Option<&Arc<JobRecord>>,
    job: &JobStatus,
    record: &JobRecord,
) -> Option<Change> {
    let version = Some(job.version.clone());
    let (Some(spec), Some(old)) = (record.spec.as_ref(), prev_record) else {
        return None;
    };
    if prev.version == job.version && old.spec == record.spec {
        // The same version, marked: promoted, or its deployment's end.
        return (record.promoted && !old.promoted).then(|| {
            Change::job(
                "deployment.promoted",
                name,
                version,
                format!("job {name} {}: canaries promoted", job.version),
            )
        });
    }
    if let Some(from) = record.reverted_from {
        return Some(Change::job(
            "deployment.reverted",
            name,
            version,
            format!(
                "job {name} reverted automatically: v{from} failed its deployment, {} runs the last good spec",
                job.version
            ),
        ));
    }
    let old_spec = old.spec.as_ref()?;
    let mut same = spec.clone();
    same.replicas = old_spec.replicas;
    if same == *old_spec && spec.replicas != old_spec.replicas {
        return Some(Change::job(
            "job.scaled",
            name,
            version,
            format!(
                "job {name} scaled from {} to {} ({})",
                old_spec.replicas, spec.replicas, job.version
            ),
        ));
    }
    if let Some(e) = old.history.iter().find(|e| e.spec == *spec) {
        return Some(Change::job(
            "job.reverted",
            name,
            version,
            format!(
                "job {name} reverted to the spec of v{} ({})",
                e.seq, job.version
            ),
        ));
    }
    Some(Change::job(
        "job.updated",
        name,
        version,
        format!(
            "job {name} updated from {} to {}",
            prev.version, job.version
        ),
    ))
}

fn deployment(
    name: &str,
    prev: Option<&crate::api::DeploymentView>,
    job: &JobStatus,
    out: &mut Vec<Change>,
) {
    let Some(d) = job.deployment.as_ref() else {
        return;
    };
    let version = Some(d.version.clone());
    let message = format!("job {name} {}: {}", d.version, d.description);
    let kind = match prev {
        Some(p) if p.version == d.version => {
            if p.state != d.state {
                match d.state.as_str() {
                    "successful" => "deployment.successful",
                    "failed" => "deployment.failed",
                    "cancelled" => "deployment.cancelled",
                    _ => "deployment.progress",
                }
            } else if (p.placed, p.ready, p.old, p.unhealthy, p.awaiting_promotion)
                != (d.placed, d.ready, d.old, d.unhealthy, d.awaiting_promotion)
            {
                "deployment.progress"
            } else {
                return;
            }
        }
        // A job's first version deploys nothing worth a second event
        // beside its submission unless it is an update.
        None if job.version == "v1" => return,
        _ if d.state == "running" => "deployment.started",
        _ => return,
    };
    out.push(Change::job(kind, name, version, message));
}

type InstanceKey<'a> = (&'a str, u32, &'a str, u64);

fn key(i: &InstanceView) -> InstanceKey<'_> {
    (i.job.as_str(), i.slot, i.node.as_str(), i.run)
}

fn instances(before: &Snapshot, after: &Snapshot, view: &MembershipView, out: &mut Vec<Change>) {
    let old: HashMap<InstanceKey, &InstanceView> =
        before.instances.iter().map(|i| (key(i), i)).collect();
    for i in &after.instances {
        let prev = old.get(&key(i)).copied();
        // Most copies did not change: compare before formatting anything.
        if prev.is_some_and(|p| (p.state, p.health, p.restarts) == (i.state, i.health, i.restarts))
        {
            continue;
        }
        let what = format!("{}[{}] on {}", i.job, i.slot, i.node);
        let (state, health, restarts) = match prev {
            Some(p) => (p.state, p.health, p.restarts),
            None => {
                out.push(Change::instance(
                    "instance.placed",
                    i,
                    format!("{what} placed ({})", i.version.as_deref().unwrap_or("?")),
                ));
                (SlotState::Starting, Health::Unknown, i.restarts)
            }
        };
        if i.restarts > restarts {
            let mut c = Change::instance(
                "instance.restarted",
                i,
                format!(
                    "{what} restarted ({} so far){}",
                    i.restarts,
                    because(i.error.as_deref())
                ),
            );
            c.restarts = Some(i.restarts);
            out.push(c);
        }
        if i.state != state {
            let change = match i.state {
                SlotState::Running => Some(("instance.started", format!("{what} started"))),
                SlotState::Completed => {
                    Some(("instance.exited", format!("{what} ran to completion")))
                }
                SlotState::Failed => Some((
                    "instance.failed",
                    format!("{what} failed for good{}", because(i.error.as_deref())),
                )),
                SlotState::Starting | SlotState::Pending => None,
            };
            if let Some((kind, message)) = change {
                out.push(Change::instance(kind, i, message));
            }
        }
        if i.health != health && i.health != Health::Unknown {
            let kind = match i.health {
                Health::Critical => "instance.critical",
                _ => "instance.passing",
            };
            let message = format!(
                "{what} is {}{}",
                i.health.as_str(),
                because(i.check.as_deref())
            );
            out.push(Change::instance(kind, i, message));
        }
    }
    let now: std::collections::HashSet<InstanceKey> = after.instances.iter().map(key).collect();
    let live: HashMap<&str, &JobStatus> = after.jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    for i in &before.instances {
        if now.contains(&key(i)) {
            continue;
        }
        let why = match (live.get(i.job.as_str()), view.get(&i.node)) {
            (None, _) => "the job was stopped".to_string(),
            (_, Some(m)) if m.state != NodeState::Alive => {
                format!("node {} is {}", i.node, m.state.as_str())
            }
            (_, None) => format!("node {} left the view", i.node),
            (Some(j), _) if i.slot >= j.replicas => format!("the job was scaled to {}", j.replicas),
            (Some(j), _) if i.version.as_deref() != Some(j.version.as_str()) => {
                format!("replaced by {}", j.version)
            }
            _ => "moved or restarted by the scheduler".to_string(),
        };
        out.push(Change::instance(
            "instance.stopped",
            i,
            format!("{}[{}] on {} stopped: {why}", i.job, i.slot, i.node),
        ));
    }
}

fn node_settings(before: &Snapshot, after: &Snapshot, out: &mut Vec<Change>) {
    for (node, (eligible, drain, _)) in &after.node_settings {
        let (was_eligible, was_drain) = match before.node_settings.get(node) {
            Some((e, d, _)) => (*e, d.as_ref()),
            None => (true, None),
        };
        match (was_drain, drain) {
            (None, Some(d)) if d.done => out.push(Change::node(
                "node.drained",
                node,
                format!("node {node} drained"),
            )),
            (None, Some(d)) => out.push(Change::node(
                "node.draining",
                node,
                format!(
                    "node {node} draining: {} to move, deadline {}",
                    d.left, d.deadline
                ),
            )),
            (Some(w), Some(d)) if !w.done && d.done => out.push(Change::node(
                "node.drained",
                node,
                format!("node {node} drained"),
            )),
            (Some(w), Some(d)) if w.left != d.left && !d.done => out.push(Change::node(
                "node.draining",
                node,
                format!("node {node} draining: {} left to move", d.left),
            )),
            _ => {}
        }
        if drain.is_none() && was_eligible != *eligible {
            let (kind, word) = if *eligible {
                ("node.eligible", "eligible")
            } else {
                ("node.ineligible", "ineligible")
            };
            out.push(Change::node(kind, node, format!("node {node} is {word}")));
        }
    }
    for node in before.node_settings.keys() {
        if !after.node_settings.contains_key(node) {
            out.push(Change::node(
                "node.eligible",
                node,
                format!("node {node} is eligible again"),
            ));
        }
    }
}

fn members(before: &MembershipView, after: &MembershipView, out: &mut Vec<Change>) {
    let old: HashMap<&str, NodeState> = before
        .members
        .iter()
        .map(|m| (m.record.name.as_str(), m.state))
        .collect();
    for m in &after.members {
        let name = m.record.name.as_str();
        let prev = old.get(name).copied();
        if prev == Some(m.state) {
            continue;
        }
        let (kind, message) = match (prev, m.state) {
            (None, NodeState::Alive) => ("node.joined", format!("node {name} joined")),
            (Some(NodeState::Suspect), NodeState::Alive) => {
                ("node.alive", format!("node {name} answers again"))
            }
            (_, NodeState::Alive) => ("node.joined", format!("node {name} is back")),
            (_, NodeState::Suspect) => ("node.suspect", format!("node {name} is suspect")),
            (_, NodeState::Dead) => ("node.dead", format!("node {name} is dead")),
            (_, NodeState::Left) => ("node.left", format!("node {name} left")),
        };
        out.push(Change::node(kind, name, message));
    }
    let now: std::collections::HashSet<&str> = after
        .members
        .iter()
        .map(|m| m.record.name.as_str())
        .collect();
    for m in &before.members {
        if !now.contains(m.record.name.as_str()) {
            out.push(Change::node(
                "node.forgotten",
                &m.record.name,
                format!("node {} forgotten", m.record.name),
            ));
        }
    }
}

fn plural(n: u32, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

fn because(why: Option<&str>) -> String {
    why.map(|w| format!(": {w}")).unwrap_or_default()
}

/// A stream's filter: `job:NAME`, `node:NAME`, `job:*` or `node:*`; an
/// event passes when it matches any (all pass when there are none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics(Vec<(bool, Option<String>)>);

impl Topics {
    /// Parses `?topic=` values (each may hold several, comma-separated).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Topics, String> {
        let mut out = Vec::new();
        for t in values.into_iter().flat_map(|v| v.split(',')) {
            let t = t.trim();
            if t.is_empty() {
                continue;
            }
            let (what, name) = t.split_once(':').ok_or_else(|| bad_topic(t))?;
            let is_job = match what {
                "job" => true,
                "node" => false,
                _ => return Err(bad_topic(t)),
            };
            let name = match name {
                "*" => None,
                n if is_job && shoal_core::job::valid_job_name(n) => Some(n.to_string()),
                n if !is_job && shoal_membership::record::valid_node_name(n) => Some(n.to_string()),
                _ => return Err(bad_topic(t)),
            };
            if out.len() == TOPICS_MAX {
                return Err(format!("at most {TOPICS_MAX} topics per stream"));
            }
            out.push((is_job, name));
        }
        Ok(Topics(out))
    }

    /// Whether `e` passes.
    pub fn pass(&self, e: &Event) -> bool {
        e.kind == "lost"
            || self.0.is_empty()
            || self.0.iter().any(|(is_job, name)| {
                let of = if *is_job { &e.job } else { &e.node };
                of.is_some() && (name.is_none() || name == of)
            })
    }
}

fn bad_topic(t: &str) -> String {
    format!(
        "topic `{}` is not one of job:NAME, node:NAME, job:* or node:*",
        shoal_core::gossip::bounded(t.to_string())
    )
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Every event kept.
    Oldest,
    /// Only events after this one.
    Now,
    /// After the event with this sequence number on this run of the agent.
    After(u64),
    /// After a cursor of another run of the agent (it restarted): what
    /// happened in between is lost.
    OtherRun,
}

/// The events this agent keeps, and who waits for more.
pub struct Events {
    run: u32,
    /// Set once the node has caught up and events are derived.
    streaming: std::sync::atomic::AtomicBool,
    kept: Mutex<Kept>,
    last: watch::Sender<u64>,
    streams: Arc<Semaphore>,
}

struct Kept {
    /// Events, oldest first; the last has sequence number `next - 1`.
    events: VecDeque<Arc<Event>>,
    next: u64,
    closed: bool,
}

/// What a reader gets.
#[derive(Debug, Default)]
pub struct Read {
    /// Events after the cursor, in order (a `lost` event first if some
    /// were dropped).
    pub events: Vec<Arc<Event>>,
    /// The cursor after them.
    pub next: u64,
    /// The agent is stopping: no more will come.
    pub closed: bool,
}

impl Events {
    /// An empty log, for one run of the agent.
    pub fn new() -> Arc<Events> {
        Arc::new(Events {
            run: rand::random::<u32>() | 1,
            streaming: Default::default(),
            kept: Mutex::new(Kept {
                events: VecDeque::new(),
                next: 1,
                closed: false,
            }),
            last: watch::channel(0).0,
            streams: Arc::new(Semaphore::new(STREAMS_MAX)),
        })
    }

    fn cursor(&self, seq: u64) -> String {
        format!("{:08x}-{seq}", self.run)
    }

    /// Appends the changes seen at `wall_ms`.
    pub fn push(&self, changes: Vec<Change>, wall_ms: u64) {
        if changes.is_empty() {
            return;
        }
        let time = rfc3339_millis(wall_ms);
        let last = {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            for c in changes {
                let seq = kept.next;
                kept.next = seq.saturating_add(1);
                kept.events.push_back(Arc::new(Event {
                    cursor: self.cursor(seq),
                    time: time.clone(),
                    kind: c.kind.to_string(),
                    job: c.job,
                    node: c.node,
                    slot: c.slot,
                    version: c.version,
                    restarts: c.restarts,
                    message: c.message,
                }));
                if kept.events.len() > EVENTS_KEPT {
                    kept.events.pop_front();
                }
            }
            kept.next - 1
        };
        self.last.send_replace(last);
    }

    /// Ends every stream (the agent is stopping).
    pub fn close(&self) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.last.send_modify(|_| {});
    }

    /// Reads `since=` (`now`, a cursor, or nothing for every event kept).
    pub fn since(&self, value: Option<&str>) -> Result<Since, String> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Since::Oldest);
        };
        if v == "now" {
            return Ok(Since::Now);
        }
        let parsed = v.split_once('-').and_then(|(run, seq)| {
            Some((u32::from_str_radix(run, 16).ok()?, seq.parse::<u64>().ok()?))
        });
        match parsed {
            Some((run, seq)) if run == self.run => Ok(Since::After(seq)),
            Some(_) => Ok(Since::OtherRun),
            None => Err(format!(
                "since `{}` is not a cursor (an event's `cursor`, like 1a2b3c4d-42) or `now`",
                shoal_core::gossip::bounded(v.to_string())
            )),
        }
    }

    /// The sequence number a stream starting at `since` has read up to,
    /// and whether it lost events before it begins.
    pub fn start(&self, since: Since) -> (u64, bool) {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = kept.next - kept.events.len() as u64;
        match since {
            Since::Oldest => (oldest.saturating_sub(1), false),
            Since::Now => (kept.next - 1, false),
            Since::After(seq) => (seq.min(kept.next - 1), false),
            Since::OtherRun => (oldest.saturating_sub(1), true),
        }
    }

    /// At most `max` events after sequence number `after`.
    pub fn read(&self, after: u64, max: usize) -> Read {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = kept.next - kept.events.len() as u64;
        let mut events = Vec::new();
        let mut from = after.saturating_add(1);
        if from < oldest {
            events.push(Arc::new(self.lost(oldest - 1, oldest - from)));
            from = oldest;
        }
        let skip = usize::try_from(from - oldest).unwrap_or(usize::MAX);
        events.extend(kept.events.iter().skip(skip).take(max).cloned());
        let real = events.iter().filter(|e| e.kind != "lost").count() as u64;
        // `from` is at least 1: sequence numbers start there.
        let next = from - 1 + real;
        Read {
            events,
            next,
            closed: kept.closed,
        }
    }

    fn lost(&self, seq: u64, count: u64) -> Event {
        Event {
            cursor: self.cursor(seq),
            time: rfc3339_millis(crate::node::now().wall_ms),
            kind: "lost".into(),
            job: None,
            node: None,
            slot: None,
            version: None,
            restarts: None,
            message: if count == 0 {
                "the agent restarted since this cursor: the events in between are lost; \
                 read the state again (GET /v1/jobs, /v1/nodes)"
                    .into()
            } else {
                format!(
                    "{count} events since this cursor are no longer kept (the agent keeps its \
                     last {EVENTS_KEPT}); read the state again (GET /v1/jobs, /v1/nodes)"
                )
            },
        }
    }

    /// Whether events are derived yet (the node caught up), and how many
    /// are kept: for `/v1/stats`.
    pub fn stats(&self) -> serde_json::Value {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "streaming": self.streaming.load(std::sync::atomic::Ordering::Relaxed),
            "kept": kept.events.len(),
            "last": kept.next - 1,
        })
    }

    /// Tells when events are added (or the log closes).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last.subscribe()
    }

    /// A place among the streams served at once, if one is free.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }
}

/// How a stream is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Ndjson,
    /// Server-Sent Events (`id:` is the cursor, `data:` the event).
    Sse,
}

/// A stream's body: the events after `since` that pass `topics`, then
/// (with `follow`) every new one as it comes, with heartbeats.
pub fn stream(
    events: Arc<Events>,
    since: Since,
    topics: Topics,
    format: Format,
    follow: bool,
    permit: OwnedSemaphorePermit,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, Infallible>> {
    let (at, lost_run) = events.start(since);
    let first = lost_run.then(|| Arc::new(events.lost(at, 0)));
    let rx = events.last.subscribe();
    let state = Reader {
        events,
        at,
        rx,
        first,
        wrote: tokio::time::Instant::now(),
        _permit: permit,
    };
    futures_util::stream::unfold(state, move |mut r| {
        let topics = topics.clone();
        async move {
            loop {
                r.rx.borrow_and_update();
                let read = r.events.read(r.at, BATCH_MAX);
                r.at = read.next;
                let mut out = String::new();
                for e in r.first.take().iter().chain(&read.events) {
                    if topics.pass(e) {
                        encode(e, format, &mut out);
                    }
                }
                if !out.is_empty() {
                    r.wrote = tokio::time::Instant::now();
                    return Some((Ok(bytes::Bytes::from(out)), r));
                }
                if !read.events.is_empty() {
                    continue;
                }
                if read.closed || !follow {
                    return None;
                }
                // A heartbeat when nothing was written for HEARTBEAT, events
                // filtered out or not (found in review: a filtered stream
                // of a busy cluster sent none, and its client timed out).
                match tokio::time::timeout_at(r.wrote + HEARTBEAT, r.rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return None,
                    Err(_) => {
                        let beat = match format {
                            Format::Ndjson => "{}\n",
                            Format::Sse => ": heartbeat\n\n",
                        };
                        r.wrote = tokio::time::Instant::now();
                        return Some((Ok(bytes::Bytes::from_static(beat.as_bytes())), r));
                    }
                }
            }
        }
    })
}

/// One stream's place in the log.
struct Reader {
    events: Arc<Events>,
    /// The last sequence number read.
    at: u64,
    rx: watch::Receiver<u64>,
    /// A `lost` event to send first.
    first: Option<Arc<Event>>,
    /// When it last wrote anything.
    wrote: tokio::time::Instant,
    /// Its place among the streams served at once.
    _permit: OwnedSemaphorePermit,
}

fn encode(e: &Event, format: Format, out: &mut String) {
    let json = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    match format {
        Format::Ndjson => {
            out.push_str(&json);
            out.push('\n');
        }
        Format::Sse => {
            out.push_str("id: ");
            out.push_str(&e.cursor);
            // No `event:` field: a browser's EventSource hands every
            // event to one `onmessage` (the kind is in the data).
            out.push_str("\ndata: ");
            out.push_str(&json);
            out.push_str("\n\n");
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_millis(ms: u64) -> String {
    const LAST_MS: u64 = 253_402_300_799_999;
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms.min(LAST_MS)))
        .to_string()
}

/// Turns the node's successive states into events until the node stops.
/// The first state compared is the first after the node caught up with
/// the cluster: what it learns while catching up is history, not news.
pub async fn run(
    events: Arc<Events>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut views: watch::Receiver<MembershipView>,
) {
    let mut base: Option<(Arc<Snapshot>, MembershipView)> = None;
    loop {
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { break },
            r = views.changed() => if r.is_err() { break },
        }
        let snap = snapshots.borrow_and_update().clone();
        let view = views.borrow_and_update().clone();
        match &base {
            None => {
                if snap.scheduler.get("caught_up") == Some(&serde_json::Value::Bool(true)) {
                    base = Some((snap, view));
                    events
                        .streaming
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Some((old, old_view)) => {
                let same = Arc::ptr_eq(old, &snap);
                let changes = diff(old, old_view, if same { old } else { &snap }, &view);
                events.push(changes, crate::node::now().wall_ms);
                base = Some((snap, view));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)] // `&[r.clone()]` reads better here
mod tests {
    use super::*;
    use shoal_core::hlc::{Hlc, Version};
    use shoal_core::job::JobSpec;

    fn spec(name: &str, replicas: u32, command: &str) -> JobSpec {
        JobSpec::parse(&format!(
            "name = \"{name}\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ncommand = \"{command}\"\n"
        ))
        .unwrap()
    }

    /// A snapshot holding `records`, with their instances
    /// (job, slot, node, run, state, health, restarts).
    fn snap(
        records: &[JobRecord],
        instances: &[(&str, u32, &str, u64, &str, &str, u32)],
    ) -> Snapshot {
        let mut s = Snapshot::default();
        for r in records {
            s.jobs.push(
                serde_json::from_value(serde_json::json!({
                    "name": r.name, "version": format!("v{}", r.seq),
                    "hlc": r.version.to_string(), "type": "service",
                    "replicas": r.spec.as_ref().unwrap().replicas, "stopped": false,
                    "instances": [],
                }))
                .unwrap(),
            );
            s.records.insert(r.name.clone(), Arc::new(r.clone()));
        }
        for (job, slot, node, run, state, health, restarts) in instances {
            s.instances.push(
                serde_json::from_value(serde_json::json!({
                    "job": job, "slot": slot, "node": node, "state": state, "run": run,
                    "restarts": restarts, "error": null, "health": health, "version": "v1",
                }))
                .unwrap(),
            );
        }
        s
    }

    fn record(name: &str, at: u64, seq: u64, spec: JobSpec) -> JobRecord {
        let mut r = JobRecord::new(
            name,
            Version {
                hlc: Hlc {
                    wall_ms: at,
                    logical: 0,
                },
                node: "n1".into(),
            },
            Some(spec),
        );
        r.seq = seq;
        r
    }

    /// The next version of `r` with `spec`, keeping `r` in its history.
    fn next(r: &JobRecord, spec: JobSpec) -> JobRecord {
        let mut n = record(&r.name, r.version.hlc.wall_ms + 1, r.seq + 1, spec);
        n.history.push(shoal_core::records::Earlier {
            seq: r.seq,
            version: r.version.clone(),
            spec: r.spec.clone().unwrap(),
            outcome: None,
        });
        n.history.extend(r.history.iter().cloned());
        n
    }

    fn view(members: &[(&str, NodeState)]) -> MembershipView {
        MembershipView {
            self_name: "n1".into(),
            members: members
                .iter()
                .map(|(name, state)| shoal_membership::Member {
                    record: shoal_membership::NodeRecord {
                        name: name.to_string(),
                        address: "127.0.0.1:4700".parse().unwrap(),
                        labels: Default::default(),
                        capacity: shoal_membership::Capacity {
                            cpu_millis: 1000,
                            memory_mib: 1024,
                        },
                        drivers: vec![],
                        version: "0".into(),
                        http: None,
                        notes: vec![],
                    },
                    generation: 1,
                    incarnation: 0,
                    state: *state,
                    load: Default::default(),
                    app: Default::default(),
                })
                .collect(),
        }
    }

    fn kinds(changes: &[Change]) -> Vec<&'static str> {
        changes.iter().map(|c| c.kind).collect()
    }

    #[test]
    fn job_writes_are_told_apart() {
        let v = view(&[("n1", NodeState::Alive)]);
        let empty = snap(&[], &[]);
        let v1 = record("web", 1, 1, spec("web", 2, "a"));
        let s1 = snap(&[v1.clone()], &[]);
        assert_eq!(kinds(&diff(&empty, &v, &s1, &v)), ["job.submitted"]);

        let v2 = next(&v1, spec("web", 5, "a"));
        let c = diff(&s1, &v, &snap(&[v2.clone()], &[]), &v);
        assert_eq!(kinds(&c), ["job.scaled"]);
        assert!(c[0].message.contains("from 2 to 5"), "{}", c[0].message);

        let v3 = next(&v2, spec("web", 5, "b"));
        assert_eq!(
            kinds(&diff(
                &snap(&[v2.clone()], &[]),
                &v,
                &snap(&[v3.clone()], &[]),
                &v
            )),
            ["job.updated"]
        );
        // The spec of an earlier version again: a revert.
        let v4 = next(&v3, spec("web", 5, "a"));
        assert_eq!(
            kinds(&diff(
                &snap(&[v3.clone()], &[]),
                &v,
                &snap(&[v4.clone()], &[]),
                &v
            )),
            ["job.reverted"]
        );
        // A mark of the same version (its deployment's end) is no write.
        let mut marked = v4.clone();
        marked.version.hlc.logical = 1;
        assert!(diff(&snap(&[v4.clone()], &[]), &v, &snap(&[marked], &[]), &v).is_empty());
        // Gone from the live jobs: stopped.
        let c = diff(&snap(&[v4], &[]), &v, &empty, &v);
        assert_eq!(kinds(&c), ["job.stopped"]);
        assert_eq!(c[0].job.as_deref(), Some("web"));
    }

    #[test]
    fn instances_say_what_became_of_them_and_why_they_stopped() {
        let v = view(&[("n1", NodeState::Alive), ("n2", NodeState::Alive)]);
        let r = record("web", 1, 1, spec("web", 2, "a"));
        let before = snap(&[r.clone()], &[]);
        let placed = snap(
            &[r.clone()],
            &[
                ("web", 0, "n1", 7, "starting", "unknown", 0),
                ("web", 1, "n2", 8, "running", "passing", 0),
            ],
        );
        let c = diff(&before, &v, &placed, &v);
        assert_eq!(
            kinds(&c),
            [
                "instance.placed",
                "instance.placed",
                "instance.started",
                "instance.passing"
            ]
        );
        assert_eq!((c[1].node.as_deref(), c[1].slot), (Some("n2"), Some(1)));
        let later = snap(
            &[r.clone()],
            &[
                ("web", 0, "n1", 7, "running", "critical", 2),
                ("web", 1, "n2", 8, "running", "passing", 0),
            ],
        );
        assert_eq!(
            kinds(&diff(&placed, &v, &later, &v)),
            [
                "instance.restarted",
                "instance.started",
                "instance.critical"
            ]
        );
        // n2 died: its copy is gone from the live instances, and why.
        let dead = view(&[("n1", NodeState::Alive), ("n2", NodeState::Dead)]);
        let after = snap(
            &[r.clone()],
            &[("web", 0, "n1", 7, "running", "critical", 2)],
        );
        let c = diff(&later, &v, &after, &dead);
        assert_eq!(kinds(&c), ["instance.stopped", "node.dead"]);
        assert!(
            c[0].message.ends_with("node n2 is dead"),
            "{}",
            c[0].message
        );
        // The job stopped: so did its copies.
        let c = diff(&after, &dead, &snap(&[], &[]), &dead);
        assert_eq!(kinds(&c), ["job.stopped", "instance.stopped"]);
        assert!(
            c[1].message.ends_with("the job was stopped"),
            "{}",
            c[1].message
        );
    }

    #[test]
    fn nodes_joining_and_dying_are_events() {
        let s = snap(&[], &[]);
        let one = view(&[("n1", NodeState::Alive)]);
        let two = view(&[("n1", NodeState::Alive), ("n2", NodeState::Alive)]);
        let suspect = view(&[("n1", NodeState::Alive), ("n2", NodeState::Suspect)]);
        assert_eq!(kinds(&diff(&s, &one, &s, &two)), ["node.joined"]);
        assert_eq!(kinds(&diff(&s, &two, &s, &suspect)), ["node.suspect"]);
        assert_eq!(kinds(&diff(&s, &suspect, &s, &two)), ["node.alive"]);
        assert!(diff(&s, &two, &s, &two).is_empty());
    }

    #[test]
    fn a_drain_seen_done_at_once_is_drained() {
        let v = view(&[("n1", NodeState::Alive)]);
        let drain = |done: bool, left: u32| -> crate::api::DrainView {
            serde_json::from_value(serde_json::json!({
                "since": "", "deadline": "", "deadline_in_s": 0, "keep_system": false,
                "left": left, "system_left": 0, "done": done, "reachable": true, "hlc": "",
            }))
            .unwrap()
        };
        let with = |d: Option<crate::api::DrainView>| {
            let mut s = snap(&[], &[]);
            s.node_settings.insert("n2".into(), (false, d, false));
            s
        };
        let none = snap(&[], &[]);
        // Done by the first snapshot that shows it (an empty node).
        assert_eq!(
            kinds(&diff(&none, &v, &with(Some(drain(true, 0))), &v)),
            ["node.drained"]
        );
        // Started, then done.
        let started = with(Some(drain(false, 2)));
        assert_eq!(kinds(&diff(&none, &v, &started, &v)), ["node.draining"]);
        assert_eq!(
            kinds(&diff(&started, &v, &with(Some(drain(true, 0))), &v)),
            ["node.drained"]
        );
    }

    fn change(i: u32) -> Change {
        Change::job("job.updated", "web", None, format!("change {i}"))
    }

    fn messages(r: &Read) -> Vec<String> {
        r.events.iter().map(|e| e.message.clone()).collect()
    }

    #[test]
    fn a_cursor_resumes_with_no_gap_and_no_repeat() {
        let log = Events::new();
        log.push((0..10).map(change).collect(), 0);
        let all = log.read(0, usize::MAX);
        assert_eq!(all.events.len(), 10);
        let cursor = &all.events[3].cursor;
        let Since::After(seq) = log.since(Some(cursor)).unwrap() else {
            panic!("a cursor of this run")
        };
        let (at, lost) = log.start(Since::After(seq));
        assert!(!lost);
        log.push((10..12).map(change).collect(), 0);
        let rest = log.read(at, usize::MAX);
        let want: Vec<String> = (4..12).map(|i| format!("change {i}")).collect();
        assert_eq!(messages(&rest), want);
        // Read in small batches, the same.
        let (mut at, mut got) = (at, Vec::new());
        loop {
            let r = log.read(at, 3);
            if r.events.is_empty() {
                break;
            }
            got.extend(messages(&r));
            at = r.next;
        }
        assert_eq!(got, want);
        // `now` starts after the last.
        let (now, _) = log.start(Since::Now);
        assert!(log.read(now, usize::MAX).events.is_empty());
    }

    #[test]
    fn a_cursor_older_than_the_buffer_or_this_run_says_what_was_lost() {
        let log = Events::new();
        log.push((0..(EVENTS_KEPT as u32 + 5)).map(change).collect(), 0);
        let r = log.read(2, 2);
        assert_eq!(r.events[0].kind, "lost");
        assert!(
            r.events[0].message.starts_with("3 events"),
            "{}",
            r.events[0].message
        );
        assert_eq!(r.events[1].message, "change 5");
        let other = format!("{:08x}-3", log.run ^ 2);
        assert_eq!(log.since(Some(&other)), Ok(Since::OtherRun));
        assert_eq!(log.start(Since::OtherRun), (5, true));
        assert!(log.since(Some("x")).is_err());
        assert!(log.since(Some("zz-1")).is_err());
        assert_eq!(log.since(None), Ok(Since::Oldest));
    }

    #[test]
    fn topics_filter_by_job_or_node() {
        let t = Topics::parse(["job:web,node:n3"]).unwrap();
        let mut e = Event {
            cursor: "0-1".into(),
            time: String::new(),
            kind: "instance.started".into(),
            job: Some("db".into()),
            node: Some("n3".into()),
            slot: Some(0),
            version: None,
            restarts: None,
            message: String::new(),
        };
        assert!(t.pass(&e));
        e.node = Some("n1".into());
        assert!(!t.pass(&e));
        e.job = Some("web".into());
        assert!(t.pass(&e));
        assert!(Topics::parse(["node:*"]).unwrap().pass(&e));
        e.node = None;
        assert!(!Topics::parse(["node:*"]).unwrap().pass(&e));
        assert!(Topics::default().pass(&e));
        for bad in ["web", "pod:web", "job:../x", "job:"] {
            assert!(Topics::parse([bad]).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=TOPICS_MAX).map(|i| format!("job:j{i}")).collect();
        assert!(Topics::parse(many.iter().map(String::as_str)).is_err());
    }

    proptest::proptest! {
        /// Whatever a client sends as `since` or `topic`, the parsers
        /// answer (no panic), and what they accept is bounded.
        #[test]
        fn any_query_is_answered(since in ".{0,64}", topics in proptest::collection::vec(".{0,40}", 0..24)) {
            let log = Events::new();
            if let Ok(s) = log.since(Some(&since)) {
                let (at, _) = log.start(s);
                let _ = log.read(at, 10);
            }
            if let Ok(t) = Topics::parse(topics.iter().map(String::as_str)) {
                proptest::prop_assert!(t.0.len() <= TOPICS_MAX);
            }
        }
    }
}
