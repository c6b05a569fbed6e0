//! The HTTP JSON API every agent serves.
//!
//! It listens on loopback unless told otherwise and requires a bearer
//! token on every request, wherever it listens: on a shared machine any
//! local user can reach loopback, and the API runs commands as the agent's
//! user. The agent makes the token unless given one (`--http-token`) and
//! writes it to `<data-dir>/api-token` (0600), where the CLI of a user who
//! may read it finds it.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal_membership::{Capacity, Load, MembershipView};
use tokio::sync::{mpsc, oneshot, watch};

use shoal_core::health::Health;
use shoal_core::instance::SlotState;
use shoal_core::scheduler::{ApiError as CoreError, ApiRequest, NodeChange};
use shoal_core::status;

use crate::node::{ApiCommand, ApiReply};

/// What the API handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// The node's membership view.
    pub view: watch::Receiver<MembershipView>,
    /// Bearer token required on every request.
    pub token: Arc<str>,
    /// The scheduler's state.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Commands to the scheduler.
    pub commands: mpsc::Sender<ApiCommand>,
    /// Counters of the node-to-node transport.
    pub transport_stats: Arc<shoal_transport::TransportStats>,
    /// What the store's last write said.
    pub store_health: crate::store::StoreHealth,
    /// Other parts' problems (DNS, ingress ports).
    pub problems: Problems,
    /// `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `/v1/events`.
    pub events: Arc<crate::events::Events>,
    /// This node's credentials (join tokens, CA rotation).
    pub identity: Arc<crate::identity::Identity>,
    /// The node-to-node transport (CA rotation talks to every member).
    pub transport: shoal_transport::QuicTransport,
}

/// Replaces the cluster CA (`shoal ca rotate`): answers when the rotation
/// is done or stopped, with who missed which step.
async fn rotate_ca(State(state): State<ApiState>) -> Response {
    let members: Vec<(String, std::net::SocketAddr)> = {
        let view = state.view.borrow();
        view.members
            .iter()
            .filter(|m| m.record.name != view.self_name)
            .filter(|m| {
                matches!(
                    m.state,
                    shoal_membership::NodeState::Alive | shoal_membership::NodeState::Suspect
                )
            })
            .map(|m| (m.record.name.clone(), m.record.address))
            .collect()
    };
    // Its own task: a client that goes away must not stop it between steps.
    let (identity, transport) = (state.identity.clone(), state.transport.clone());
    let run =
        tokio::spawn(async move { crate::identity::rotate(&identity, &transport, members).await });
    match run.await.unwrap_or_else(|e| Err(anyhow::anyhow!("{e}"))) {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot rotate the CA: {e:#}"),
        ),
    }
}

/// The answer to `POST /v1/join-token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenMade {
    /// The token (`shoal2-...`).
    pub token: String,
    /// When it stops admitting nodes (seconds since the Unix epoch).
    pub expires_unix_s: u64,
}

/// The body of `POST /v1/join-token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenAsk {
    /// Validity, e.g. "24h" (default 24h).
    #[serde(default)]
    ttl: Option<String>,
}

/// Makes a join token.
async fn join_token(State(state): State<ApiState>, body: axum::body::Bytes) -> Response {
    let ask: JoinTokenAsk = if body.is_empty() {
        JoinTokenAsk { ttl: None }
    } else {
        match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be JSON like {{\"ttl\": \"24h\"}}: {e}"),
                )
            }
        }
    };
    let ttl = match ask.ttl.as_deref() {
        None => shoal_transport::tls::JOIN_TOKEN_TTL,
        Some(t) => match crate::cli::parse_token_ttl(t) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("ttl {e}")),
        },
    };
    match state.identity.join_token(ttl) {
        Ok(t) => Json(JoinTokenMade {
            token: t.encode(),
            expires_unix_s: t.expires_s,
        })
        .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot make a join token: {e:#}"),
        ),
    }
}

/// This node's problems, each with what to do: what `/v1/health` answers
/// and the node publishes for `shoal nodes` on every node.
pub fn problems(
    snapshot: &Snapshot,
    store: &crate::store::StoreHealth,
    others: &Problems,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = store.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        out.push(format!("store: {e}"));
    }
    if let Some(skew) = &snapshot.clock_skew {
        out.push(format!("clock: {skew}"));
    }
    out.extend(
        others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned(),
    );
    out
}

/// Problems of the agent's other parts (DNS, the routing mesh), by what
/// has them: shown in `/v1/health` and `shoal nodes` beside the store's
/// and the clock's.
pub type Problems = Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>;

/// Longest job file accepted in a request body.
const BODY_LEN_MAX: usize = crate::job::JOB_FILE_LEN_MAX;

/// One slot in `/v1/jobs/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlotView {
    /// Slot index.
    pub slot: u32,
    /// Holder node, if placed.
    pub node: Option<String>,
    /// `pending`, `starting`, `running`, `completed` or `failed`.
    pub state: SlotState,
    /// Why it is pending or failed, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Restarts of the current holder's copy.
    #[serde(default)]
    pub restarts: u32,
    /// Placement attempts of a pending slot so far (it backs off between
    /// them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Host ports of the holder's copy, by name (dynamic ones as chosen).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ports: std::collections::BTreeMap<String, u16>,
    /// The copy's health: `passing`, `critical` or `unknown`.
    #[serde(default)]
    pub health: Health,
    /// Why a check is critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// The job version the copy runs (`v7`), when placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The copy passed its checks for the job's `min_healthy_time`.
    #[serde(default)]
    pub ready: bool,
    /// Live copies of the slot (two while a rolling update replaces it).
    #[serde(default)]
    pub copies: u32,
}

/// `v7`, or `None` for 0 (no copy, or started by an earlier release).
pub fn short_version(seq: u64) -> Option<String> {
    (seq != 0).then(|| format!("v{seq}"))
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A job as `/v1/jobs/{name}` and `shoal status JOB --json` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    /// Name.
    pub name: String,
    /// Version as people see it (`v7`).
    pub version: String,
    /// The version's clock (`<hlc>@<node>`): the write's identity.
    pub hlc: String,
    /// `service`, `batch` or `system`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Desired replicas (0 once stopped; for a system job, the alive
    /// nodes that meet its constraints).
    pub replicas: u32,
    /// Whether the job was stopped.
    pub stopped: bool,
    /// Every slot, and copies beyond the replica count still stopping.
    pub instances: Vec<SlotView>,
    /// The current version's deployment (services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentView>,
    /// The spec as submitted (`?spec=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<shoal_core::job::JobSpec>,
    /// A cron job's run: the cron job it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A cron job's schedule, in its time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// A cron job's next scheduled times (RFC 3339, UTC); empty while it
    /// is disabled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next: Vec<String>,
    /// A cron job's kept runs, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunView>,
}

/// A run of a cron job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunView {
    /// The run's job name (`NAME@<unix-seconds>`).
    pub job: String,
    /// Its scheduled time (RFC 3339, UTC).
    pub time: String,
    /// `running`, `succeeded` or `failed`.
    pub state: shoal_core::cron::RunState,
}

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339(unix_s: i64) -> String {
    // Clamped to what RFC 3339 can write (years 1970 to 9999): a time
    // from a peer's record is not trusted to be sane.
    const LAST: u64 = 253_402_300_799;
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(unix_s).unwrap_or(0).min(LAST)),
    )
    .to_string()
}

/// Milliseconds since the epoch as RFC 3339 UTC (to the second).
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339(i64::try_from(ms / 1000).unwrap_or(i64::MAX))
}

/// The next `n` times of a cron job's spec after now (none while it is
/// disabled or not a cron job).
pub fn next_runs(spec: &shoal_core::job::JobSpec, n: usize) -> Vec<i64> {
    let Some(c) = spec.cron.as_ref().filter(|c| c.enabled) else {
        return Vec::new();
    };
    let Ok(schedule) = shoal_core::cron::Schedule::new(&c.schedule, &c.time_zone) else {
        return Vec::new();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    schedule.upcoming(now, n)
}

/// A submitted job's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    /// Name.
    pub name: String,
    /// The version written (`v7`).
    pub version: String,
    /// Its clock (`<hlc>@<node>`): the write's identity.
    pub hlc: String,
    /// The spec was the running one: nothing was written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// Body of `POST /v1/jobs/{name}/scale`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRequest {
    /// New replica count.
    pub replicas: u32,
}

/// An instance as `/v1/instances` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Host ports it binds, by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ports: std::collections::BTreeMap<String, u16>,
    /// Its health: `passing`, `critical` or `unknown`.
    #[serde(default)]
    pub health: Health,
    /// Why a check is critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// The job version it runs (`v7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl From<&status::InstanceRow> for InstanceView {
    fn from(r: &status::InstanceRow) -> Self {
        InstanceView {
            job: r.job.clone(),
            slot: r.copy.slot,
            node: r.node.clone(),
            state: r.copy.state,
            run: r.copy.run,
            restarts: r.copy.restarts,
            error: r.copy.error.clone(),
            ports: r.copy.ports.clone(),
            health: r.copy.health,
            check: r.copy.check.clone(),
            version: short_version(r.copy.version),
        }
    }
}

impl From<&status::JobStatus> for JobStatus {
    fn from(s: &status::JobStatus) -> Self {
        let record = &s.record;
        let job_type = record
            .spec
            .as_ref()
            .and_then(|s| serde_json::to_value(s.job_type).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "stopped".into());
        JobStatus {
            name: record.name.clone(),
            version: format!("v{}", record.seq),
            hlc: record.version.to_string(),
            job_type,
            replicas: s
                .nodes
                .or(record.spec.as_ref().map(|s| s.replicas))
                .unwrap_or(0),
            stopped: record.spec.is_none(),
            instances: s
                .slots
                .iter()
                .map(|v| SlotView {
                    slot: v.slot,
                    node: v.node.clone(),
                    state: v.state,
                    reason: v.reason.clone(),
                    restarts: v.restarts,
                    attempts: v.attempts,
                    ports: v.ports.clone(),
                    health: v.health,
                    check: v.check.clone(),
                    version: short_version(v.version),
                    ready: v.ready,
                    copies: v.copies,
                })
                .collect(),
            deployment: s.deployment.as_ref().map(|d| DeploymentView::of(record, d)),
            spec: None,
            parent: record.spec.as_ref().and_then(|s| s.parent.clone()),
            schedule: record.spec.as_ref().and_then(|s| {
                s.cron.as_ref().map(|c| {
                    if c.time_zone == "UTC" {
                        c.schedule.clone()
                    } else {
                        format!("{} ({})", c.schedule, c.time_zone)
                    }
                })
            }),
            next: record
                .spec
                .as_ref()
                .map(|s| next_runs(s, 3).into_iter().map(rfc3339).collect())
                .unwrap_or_default(),
            runs: s
                .runs
                .iter()
                .map(|r| RunView {
                    job: r.job.clone(),
                    time: rfc3339(r.time),
                    state: r.state,
                })
                .collect(),
        }
    }
}

/// A version's deployment, as `/v1/jobs/{name}/deployment` and `shoal
/// deployment status --json` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeploymentView {
    /// The version (`v7`).
    pub version: String,
    /// `running`, `successful`, `failed` or `cancelled`.
    pub state: String,
    /// What is going on, or how it ended.
    pub description: String,
    /// Slots.
    pub replicas: u32,
    /// Slots with a live copy of the version.
    pub placed: u32,
    /// Slots whose copy of the version is ready.
    pub ready: u32,
    /// Live copies of other versions.
    pub old: u32,
    /// Copies of the version not ready within `healthy_deadline`.
    pub unhealthy: u32,
    /// Canary slots.
    pub canary: u32,
    /// Whether the canaries were promoted.
    pub promoted: bool,
    /// The update waits for `shoal deployment promote`.
    pub awaiting_promotion: bool,
}

impl DeploymentView {
    fn of(record: &shoal_core::records::JobRecord, d: &shoal_core::deployment::Deployment) -> Self {
        DeploymentView {
            version: format!("v{}", d.version),
            state: d.state().into(),
            description: d.describe(&record.name),
            replicas: d.replicas,
            placed: d.placed,
            ready: d.ready,
            old: d.old,
            unhealthy: d.unhealthy,
            canary: d.canary,
            promoted: d.promoted,
            awaiting_promotion: d.awaiting_promotion,
        }
    }
}

/// An earlier version's deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PastDeployment {
    /// The version (`v6`).
    pub version: String,
    /// `successful`, `failed` or `cancelled`.
    pub state: String,
    /// How it ended.
    pub description: String,
}

/// `/v1/jobs/{name}/deployment`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Deployments {
    /// Job.
    pub job: String,
    /// The current version's deployment (none for a batch or stopped job).
    pub current: Option<DeploymentView>,
    /// Earlier versions', newest first.
    pub past: Vec<PastDeployment>,
}

async fn job_deployment(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    match job_status(&state, &name).await {
        Ok(s) => Json(Deployments {
            job: name,
            current: s
                .deployment
                .as_ref()
                .map(|d| DeploymentView::of(&s.record, d)),
            past: shoal_core::deployment::past(&s.record)
                .into_iter()
                .map(|(seq, o)| PastDeployment {
                    version: format!("v{seq}"),
                    state: o.state().into(),
                    description: o.describe().into(),
                })
                .collect(),
        })
        .into_response(),
        Err(resp) => resp,
    }
}

async fn promote_job(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    written(ask(&state, ApiRequest::Promote { name }).await)
}

async fn force_cron(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    written(ask(&state, ApiRequest::CronForce { name }).await)
}

/// What the list endpoints read: the scheduler's state after its last
/// change, rebuilt by the event loop at a paced rate.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every live job.
    pub jobs: Vec<JobStatus>,
    /// Every live job's record (shared with the core's, not copied): what
    /// the event stream compares to say how a job was written.
    pub records: std::collections::BTreeMap<String, Arc<shoal_core::records::JobRecord>>,
    /// Every instance on a live node.
    pub instances: Vec<InstanceView>,
    /// The scheduler's own state, for `/v1/stats`.
    pub scheduler: serde_json::Value,
    /// Each measured peer's clock minus this node's, ms.
    pub clock_offsets: std::collections::BTreeMap<String, i64>,
    /// Set when this node's clock is off most of its peers' beyond
    /// `max_clock_offset` (it refuses writes then): what and how much.
    pub clock_skew: Option<String>,
    /// What operators set on nodes: eligibility, and the drain with its
    /// progress.
    pub node_settings: std::collections::BTreeMap<String, (bool, Option<DrainView>, bool)>,
    /// Members this node sees alive (itself included) of the members it
    /// remembers (see `shoal_core::seen`): whether it is on a majority
    /// side.
    pub members: (usize, usize),
    /// The service catalog (see `shoal_core::catalog`).
    pub catalog: std::sync::Arc<shoal_core::catalog::Catalog>,
    /// Per service, the catalog index at which it last changed (watches
    /// wait for it to move; see [`CatalogIndex`]).
    pub catalog_index: std::sync::Arc<CatalogIndex>,
}

/// Per-service change counters of one agent's catalog: a watch
/// (`?index=N`) returns once its service's index differs from N. An
/// index means something only to the agent that gave it (as Consul's
/// `X-Consul-Index`); one that went backwards (the agent restarted) also
/// returns at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogIndex {
    /// The last index given (every change of any service takes the next).
    pub last: u64,
    /// Each service's index.
    pub of: std::collections::BTreeMap<String, u64>,
}

impl CatalogIndex {
    /// The index after `now` replaced `before`: each changed, new or
    /// removed service takes the next index (one for the whole step).
    pub fn step(
        &self,
        before: &shoal_core::catalog::Catalog,
        now: &shoal_core::catalog::Catalog,
    ) -> CatalogIndex {
        let next = self.last.saturating_add(1);
        let mut out = CatalogIndex {
            last: self.last,
            of: std::collections::BTreeMap::new(),
        };
        for (name, svc) in now {
            let idx = match (before.get(name), self.of.get(name)) {
                (Some(old), Some(i)) if old == svc => *i,
                _ => next,
            };
            out.of.insert(name.clone(), idx);
        }
        let removed = before.keys().any(|n| !now.contains_key(n));
        if removed || out.of.values().any(|i| *i == next) {
            out.last = next;
        }
        out
    }
}

impl Snapshot {
    /// The snapshot of a scheduler's state.
    pub fn of(core: &mut shoal_core::Scheduler, now: std::time::Instant) -> Snapshot {
        let statuses = status::job_statuses(core, now);
        Snapshot {
            jobs: statuses.iter().map(JobStatus::from).collect(),
            records: statuses
                .iter()
                .map(|s| (s.record.name.clone(), s.record.clone()))
                .collect(),
            instances: status::instances(core, now)
                .iter()
                .map(InstanceView::from)
                .collect(),
            clock_offsets: core
                .clock_offsets()
                .iter()
                .map(|(p, o)| (p.to_string(), o.ms))
                .collect(),
            node_settings: {
                let wall_ms = crate::node::now().wall_ms;
                core.node_statuses(now)
                    .into_iter()
                    .map(|n| {
                        let drain = n.drain.as_ref().map(|d| DrainView {
                            since: rfc3339_ms(d.since_ms),
                            deadline: rfc3339_ms(d.deadline_ms),
                            deadline_in_s: d.deadline_ms.saturating_sub(wall_ms) / 1000,
                            keep_system: d.keep_system,
                            left: n.left,
                            system_left: n.system_left,
                            done: n.drained(),
                            reachable: n.reachable,
                            hlc: n.version.to_string(),
                        });
                        (n.node, (n.eligible, drain, n.forgotten))
                    })
                    .collect()
            },
            members: core.seen().alive_and_counted(),
            catalog: core.catalog(),
            catalog_index: Default::default(),
            clock_skew: core.clock_skew(now).map(|s| {
                format!(
                    "{s}, beyond max_clock_offset ({} ms); writes are refused here until \
                     its time sync is fixed",
                    core.config().max_clock_offset_ms()
                )
            }),
            scheduler: {
                let c = core.counters();
                serde_json::json!({
                    "caught_up": core.caught_up(),
                    "jobs": core.desired().len(),
                    "local_instances": core.local().len(),
                    "placement_rounds_in_flight": core.placing().rounds_len(),
                    "writes_in_flight": core.writes_in_flight(),
                    "anti_entropy_exchange": core.exchange_peer(),
                    "passes": c.passes,
                    "rounds": c.rounds,
                    "slots_placed": c.placed,
                    "placements_failed": c.unplaceable,
                    "instance_starts": c.starts,
                    "instance_stops": c.stops,
                    "anti_entropy_exchanges": c.syncs,
                    "anti_entropy_items": c.synced_items,
                    "stalls": c.stalls,
                    "records_from_the_future": c.future_records,
                    "jobs_collected": c.jobs_collected,
                    "name_claims_refused": c.name_claims_refused,
                    "anti_entropy_exchanges_done": c.syncs_done,
                    "in_touch": core.in_touch(crate::node::now().wall_ms),
                    "writes_refused_for_clock_skew": c.skew_refusals,
                })
            },
        }
    }
}

fn failure(e: CoreError) -> Response {
    match e {
        CoreError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
        CoreError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
        CoreError::Storage(m) => error(StatusCode::INSUFFICIENT_STORAGE, m),
        CoreError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        CoreError::Conflict(m) => error(StatusCode::CONFLICT, m),
    }
}

async fn ask(state: &ApiState, req: ApiRequest) -> Result<ApiReply, Response> {
    let (tx, rx) = oneshot::channel();
    if state.commands.send(ApiCommand::Do(req, tx)).await.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ));
    }
    // The core answers every command (a write within the replication and
    // catch-up bounds, seconds); the bound is for a node whose store or loop
    // is stuck, so that a client is told instead of waiting forever.
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(ApiReply::Failed(e))) => Err(failure(e)),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent did not answer within {ANSWER_TIMEOUT:?}; see its log"),
        )),
    }
}

/// How long the API waits for the scheduler's answer to a command.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn written(r: Result<ApiReply, Response>) -> Response {
    match r {
        Ok(ApiReply::Written(r)) => Json(Accepted {
            name: r.name.clone(),
            version: format!("v{}", r.seq),
            hlc: r.version.to_string(),
            unchanged: false,
        })
        .into_response(),
        Ok(ApiReply::Unchanged(r)) => Json(Accepted {
            name: r.name.clone(),
            version: format!("v{}", r.seq),
            hlc: r.version.to_string(),
            unchanged: true,
        })
        .into_response(),
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer"),
        Err(resp) => resp,
    }
}

/// Query of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
pub struct SubmitQuery {
    /// Write only if the job is at this version (`v7` or `7`; `0`: only
    /// if no live job has the name).
    #[serde(default)]
    pub check_version: Option<String>,
}

/// `v7` or `7` as 7.
pub fn parse_version(text: &str) -> Option<u64> {
    text.strip_prefix('v').unwrap_or(text).parse().ok()
}

async fn submit(
    State(state): State<ApiState>,
    Query(q): Query<SubmitQuery>,
    body: String,
) -> Response {
    if body.len() > BODY_LEN_MAX {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("job files are limited to {BODY_LEN_MAX} bytes"),
        );
    }
    let check_version = match q.check_version.as_deref().map(parse_version) {
        None => None,
        Some(Some(v)) => Some(v),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "check_version must be a version like `v7` (or `0`: no live job)",
            )
        }
    };
    written(
        ask(
            &state,
            ApiRequest::Submit {
                text: body,
                check_version,
            },
        )
        .await,
    )
}

/// Body of `POST /v1/jobs/{name}/revert`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevertRequest {
    /// The version to go back to (`v6` or `6`).
    pub version: serde_json::Value,
}

async fn revert_job(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: String,
) -> Response {
    let version = serde_json::from_str::<RevertRequest>(&body)
        .ok()
        .and_then(|r| match r.version {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => parse_version(&s),
            _ => None,
        });
    let Some(version) = version else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"version\": \"v6\"}: the version to go back to (`shoal job history` lists them)",
        );
    };
    written(ask(&state, ApiRequest::Revert { name, version }).await)
}

/// One version in `/v1/jobs/{name}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionView {
    /// `v7`.
    pub version: String,
    /// Its clock (`<hlc>@<node>`).
    pub hlc: String,
    /// The job's current version (for a stopped job, none is).
    pub current: bool,
    /// Its spec as submitted.
    pub spec: shoal_core::job::JobSpec,
}

/// A job's kept versions, newest first.
pub fn versions_of(r: &shoal_core::records::JobRecord) -> Vec<VersionView> {
    let current = r.spec.iter().map(|spec| VersionView {
        version: format!("v{}", r.seq),
        hlc: r.version.to_string(),
        current: true,
        spec: spec.clone(),
    });
    current
        .chain(r.history.iter().map(|e| VersionView {
            version: format!("v{}", e.seq),
            hlc: e.version.to_string(),
            current: false,
            spec: e.spec.clone(),
        }))
        .collect()
}

async fn job_versions(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    match job_status(&state, &name).await {
        Ok(s) => Json(versions_of(&s.record)).into_response(),
        Err(resp) => resp,
    }
}

async fn plan(State(state): State<ApiState>, body: String) -> Response {
    if body.len() > BODY_LEN_MAX {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("job files are limited to {BODY_LEN_MAX} bytes"),
        );
    }
    let (tx, rx) = oneshot::channel();
    if state
        .commands
        .send(ApiCommand::Plan(body, tx))
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        );
    }
    match rx.await {
        Ok(Ok(plan)) => Json(plan).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ),
    }
}

/// Query of `GET /v1/jobs/{name}`.
#[derive(Debug, Deserialize)]
pub struct JobQuery {
    /// Include the submitted spec.
    #[serde(default)]
    pub spec: bool,
}

async fn list_jobs(State(state): State<ApiState>) -> Json<Vec<JobStatus>> {
    Json(state.snapshot.borrow().jobs.clone())
}

/// One job's status, read from the live state (read-after-write).
async fn job_status(state: &ApiState, name: &str) -> Result<status::JobStatus, Response> {
    let (tx, rx) = oneshot::channel();
    if state
        .commands
        .send(ApiCommand::Job(name.to_string(), tx))
        .await
        .is_err()
    {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ));
    }
    match rx.await {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            format!("no job named `{name}`; `shoal status` lists the jobs"),
        )),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )),
    }
}

async fn get_job(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<JobQuery>,
) -> Response {
    match job_status(&state, &name).await {
        Ok(s) => {
            let mut view = JobStatus::from(&s);
            if q.spec {
                view.spec = s.record.spec.clone();
            }
            Json(view).into_response()
        }
        Err(resp) => resp,
    }
}

async fn stop_job(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    written(ask(&state, ApiRequest::Stop { name }).await)
}

async fn scale_job(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: String,
) -> Response {
    let req: ScaleRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"replicas\": N}}: {e}"),
            )
        }
    };
    written(
        ask(
            &state,
            ApiRequest::Scale {
                name,
                replicas: req.replicas,
            },
        )
        .await,
    )
}

async fn instances(State(state): State<ApiState>) -> Response {
    Json(state.snapshot.borrow().instances.clone()).into_response()
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    /// Slot (default 0).
    #[serde(default)]
    pub slot: u32,
    /// The node whose copy (a system job's copies are all slot 0).
    #[serde(default)]
    pub node: Option<String>,
    /// `stdout` (default) or `stderr`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Bytes from the end (default 64 KiB, at most 1 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_stream() -> String {
    "stdout".into()
}
fn default_max_bytes() -> u64 {
    64 * 1024
}

async fn logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let max_bytes = q.max_bytes.min(crate::node::LOG_FETCH_MAX);
    let req = ApiRequest::Logs {
        job: name,
        slot: q.slot,
        node: q.node,
        stream: q.stream,
        max_bytes,
    };
    match ask(&state, req).await {
        Ok(ApiReply::Logs(bytes)) => bytes.into_response(),
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer"),
        Err(resp) => resp,
    }
}

/// What `/v1/services` and `/v1/services/{name}` take.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceQuery {
    /// Passing instances only (the default), or all with `false`.
    #[serde(default = "yes")]
    pub passing: bool,
    /// Instances on this node first.
    #[serde(default)]
    pub near: Option<String>,
    /// A watch: answer once the index differs from this one (or `wait`
    /// passed).
    #[serde(default)]
    pub index: Option<u64>,
    /// How long a watch waits at most (default 60s, at most 5m).
    #[serde(default)]
    pub wait: Option<String>,
}

/// Longest a catalog watch waits.
pub const WATCH_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(300);
/// A catalog watch's wait when none is given.
pub const WATCH_WAIT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(60);

/// One service as `/v1/services/{name}` and `shoal service show --json`
/// show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceView {
    /// Its name.
    pub name: String,
    /// The catalog index it was last changed at (watch with `?index=`).
    pub index: u64,
    /// Its instances: passing ones only unless `?passing=false`, those on
    /// `?near=NODE` first, then shuffled.
    pub instances: Vec<shoal_core::catalog::Instance>,
}

/// One line of `/v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceSummary {
    /// Its name.
    pub name: String,
    /// The catalog index it was last changed at.
    pub index: u64,
    /// Instances listed (any health).
    pub instances: usize,
    /// Those passing.
    pub passing: usize,
    /// The jobs serving it.
    pub jobs: Vec<String>,
    /// The routing mesh's port for it on every node, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_port: Option<u16>,
}

/// `/v1/services` as a whole (the list and the catalog's index).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceList {
    /// The catalog's index (watch with `?index=`).
    pub index: u64,
    /// Every service.
    pub services: Vec<ServiceSummary>,
}

/// The wait of a watch, or why `wait` is not one (a 400).
fn watch_wait(q: &ServiceQuery) -> Result<std::time::Duration, String> {
    match &q.wait {
        None => Ok(WATCH_WAIT_DEFAULT),
        Some(w) => match humantime::parse_duration(w) {
            Ok(d) => Ok(d.min(WATCH_WAIT_MAX)),
            Err(e) => Err(format!(
                "wait: `{w}` is not a duration ({e}); e.g. `wait=30s`, at most 5m"
            )),
        },
    }
}

/// Waits (a watch) until `index_of(snapshot)` differs from `index`, or
/// `wait` passed; returns the snapshot to answer from.
async fn watch(
    state: &ApiState,
    index: Option<u64>,
    wait: std::time::Duration,
    index_of: impl Fn(&Snapshot) -> u64,
) -> std::sync::Arc<Snapshot> {
    let mut rx = state.snapshot.clone();
    let Some(index) = index else {
        return rx.borrow_and_update().clone();
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let snap = rx.borrow_and_update().clone();
        if index_of(&snap) != index {
            return snap;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return rx.borrow().clone(),
        }
    }
}

async fn list_services(
    State(state): State<ApiState>,
    q: Result<Query<ServiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let wait = match watch_wait(&q) {
        Ok(w) => w,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let snap = watch(&state, q.index, wait, |s| s.catalog_index.last).await;
    let services = snap
        .catalog
        .iter()
        .map(|(name, svc)| {
            let mut jobs: Vec<String> = svc.instances.iter().map(|i| i.job.clone()).collect();
            jobs.dedup();
            ServiceSummary {
                name: name.clone(),
                index: snap.catalog_index.of.get(name).copied().unwrap_or(0),
                instances: svc.instances.len(),
                passing: svc.passing().count(),
                jobs,
                ingress_port: svc.ingress_port,
            }
        })
        .collect();
    let mut resp = Json(ServiceList {
        index: snap.catalog_index.last,
        services,
    })
    .into_response();
    index_header(&mut resp, snap.catalog_index.last);
    resp
}

fn index_header(resp: &mut Response, index: u64) {
    if let Ok(v) = header::HeaderValue::from_str(&index.to_string()) {
        resp.headers_mut().insert("x-shoal-index", v);
    }
}

async fn get_service(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<ServiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if !shoal_core::catalog::valid_service_name(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "`{}` is not a service name (lower-case letters, digits and '-')",
                name.escape_debug()
            ),
        );
    }
    let wait = match watch_wait(&q) {
        Ok(w) => w,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let snap = watch(&state, q.index, wait, |s| {
        s.catalog_index.of.get(&name).copied().unwrap_or(0)
    })
    .await;
    let Some(svc) = snap.catalog.get(&name) else {
        if q.index.is_some() {
            // A watch on a service not (or no longer) declared: empty.
            let mut resp = Json(ServiceView {
                name,
                index: 0,
                instances: Vec::new(),
            })
            .into_response();
            index_header(&mut resp, 0);
            return resp;
        }
        return error(
            StatusCode::NOT_FOUND,
            format!("no job declares a service `{name}`; `shoal service list` lists them"),
        );
    };
    let instances = shoal_core::catalog::select(svc, !q.passing, q.near.as_deref(), |v| {
        use rand::seq::SliceRandom;
        v.shuffle(&mut rand::rng());
    })
    .into_iter()
    .cloned()
    .collect();
    let index = snap.catalog_index.of.get(&name).copied().unwrap_or(0);
    let mut resp = Json(ServiceView {
        name,
        index,
        instances,
    })
    .into_response();
    index_header(&mut resp, index);
    resp
}

/// One node as `/v1/nodes` and `shoal nodes --json` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// QUIC address.
    pub address: String,
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Capacity,
    /// Current load.
    pub load: Load,
    /// Available drivers.
    pub drivers: Vec<String>,
    /// shoal version.
    pub version: String,
    /// Start-up generation.
    pub generation: u64,
    /// What the node cannot enforce.
    pub notes: Vec<String>,
    /// This member's clock minus the answering node's, ms, as last
    /// measured on an anti-entropy round trip (0 for the answering node
    /// itself; absent when not measured yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
    /// What the node reports wrong with itself (its store, its clock), each
    /// with what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Whether it takes new work (`shoal node ineligible` and a drain
    /// make it not).
    #[serde(default = "yes")]
    pub eligible: bool,
    /// Its drain and how far it got, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainView>,
    /// An operator forgot it (`shoal node forget`): the slots of
    /// `partition = "never"` jobs it held run elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forgotten: bool,
}

fn yes() -> bool {
    true
}

/// A node's drain as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainView {
    /// When it was asked (RFC 3339, UTC).
    pub since: String,
    /// When what is left stops (RFC 3339, UTC).
    pub deadline: String,
    /// Seconds until the deadline (0 once passed).
    pub deadline_in_s: u64,
    /// Its system copies keep running.
    pub keep_system: bool,
    /// Copies the drain still has to move or stop (system copies
    /// included unless kept).
    pub left: usize,
    /// Of those, system copies (they stop last).
    pub system_left: usize,
    /// Nothing the drain stops is left on it.
    pub done: bool,
    /// Whether the answering node sees the drained one (alive, trusted):
    /// else `left` is not known and `done` is false.
    pub reachable: bool,
    /// The version of the write that asked for the drain.
    pub hlc: String,
}

/// Body of `POST /v1/nodes/NAME/drain` (every field optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// How long batch copies may finish and service copies may wait for
    /// room elsewhere before what is left stops (`"1h"`, the default).
    #[serde(default)]
    pub deadline: Option<String>,
    /// Stop everything at once (a deadline of now).
    #[serde(default)]
    pub force: bool,
    /// Leave the node's system copies running.
    #[serde(default)]
    pub keep_system: bool,
}

/// Body of `POST /v1/nodes/NAME/eligibility`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EligibilityRequest {
    /// Whether the node takes new work (`true` also ends a drain).
    pub eligible: bool,
}

/// The default drain deadline.
pub const DRAIN_DEADLINE_DEFAULT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Error body of every failed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

/// The view as the API shows it.
pub fn nodes_of(view: &MembershipView) -> Vec<NodeInfo> {
    view.members
        .iter()
        .map(|m| NodeInfo {
            name: m.record.name.clone(),
            address: m.record.address.to_string(),
            state: m.state.as_str().to_string(),
            labels: m.record.labels.clone(),
            capacity: m.record.capacity,
            load: m.load,
            drivers: m.record.drivers.clone(),
            version: m.record.version.clone(),
            generation: m.generation,
            notes: m.record.notes.clone(),
            clock_offset_ms: None,
            problems: m
                .app
                .get(crate::node::HEALTH_KEY)
                .map(|v| crate::node::decode_problems(v))
                .unwrap_or_default(),
            eligible: true,
            drain: None,
            forgotten: false,
        })
        .collect()
}

/// `nodes` with what operators set on them (from a snapshot).
fn with_settings(nodes: &mut [NodeInfo], snapshot: &Snapshot) {
    for n in nodes {
        if let Some((eligible, drain, forgotten)) = snapshot.node_settings.get(&n.name) {
            n.eligible = *eligible;
            n.drain = drain.clone();
            n.forgotten = *forgotten;
        }
    }
}

async fn node_drain(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    body: String,
) -> Response {
    let req: DrainRequest = if body.trim().is_empty() {
        DrainRequest::default()
    } else {
        match serde_json::from_str(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected {{\"deadline\": \"1h\", \"force\": false, \"keep_system\": false}} (each optional): {e}"
                    ),
                )
            }
        }
    };
    let deadline = match (&req.deadline, req.force) {
        (_, true) => std::time::Duration::ZERO,
        (None, false) => DRAIN_DEADLINE_DEFAULT,
        (Some(d), false) => match humantime::parse_duration(d) {
            Ok(d) => d,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("deadline `{d}`: {e}; write it as `30m`, `1h` or `2h30m`"),
                )
            }
        },
    };
    node_change(
        &state,
        node,
        NodeChange::Drain {
            deadline,
            keep_system: req.keep_system,
        },
    )
    .await
}

async fn node_eligibility(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    body: String,
) -> Response {
    let req: EligibilityRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"eligible\": true|false}}: {e}"),
            )
        }
    };
    let change = if req.eligible {
        NodeChange::Eligible
    } else {
        NodeChange::Ineligible
    };
    node_change(&state, node, change).await
}

/// `POST /v1/nodes/NAME/forget`: the node is gone for good.
async fn node_forget(State(state): State<ApiState>, Path(node): Path<String>) -> Response {
    node_change(&state, node, NodeChange::Forget).await
}

async fn node_change(state: &ApiState, node: String, change: NodeChange) -> Response {
    if !shoal_membership::record::valid_node_name(&node) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{node}` is not a node name; `shoal nodes` lists them"),
        );
    }
    written(ask(state, ApiRequest::Node { node, change }).await)
}

async fn get_node(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let mut nodes = nodes_of(&state.view.borrow());
    let snapshot = state.snapshot.borrow().clone();
    with_settings(&mut nodes, &snapshot);
    match nodes.into_iter().find(|n| n.name == name) {
        Some(n) => Json(n).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no node named `{name}` is a member; `shoal nodes` lists them"),
        ),
    }
}

async fn nodes(State(state): State<ApiState>) -> Json<Vec<NodeInfo>> {
    let mut nodes = nodes_of(&state.view.borrow());
    let me = state.view.borrow().self_name.clone();
    let snapshot = state.snapshot.borrow().clone();
    with_settings(&mut nodes, &snapshot);
    for n in &mut nodes {
        n.clock_offset_ms = if n.name == me {
            Some(0)
        } else {
            snapshot.clock_offsets.get(&n.name).copied()
        };
    }
    Json(nodes)
}

async fn stats(State(state): State<ApiState>) -> Json<serde_json::Value> {
    use shoal_transport::TransportStats as S;
    let t = &state.transport_stats;
    Json(serde_json::json!({
        "transport": {
            "frames_sent": S::get(&t.frames_sent),
            "frames_received": S::get(&t.frames_received),
            "bytes_sent": S::get(&t.bytes_sent),
            "bytes_received": S::get(&t.bytes_received),
            "frames_undecodable": S::get(&t.frames_undecodable),
            "frames_oversized": S::get(&t.frames_oversized),
            "frames_dropped_queue_full": S::get(&t.frames_dropped_queue_full),
            "sends_failed": S::get(&t.sends_failed),
            "handshakes_refused": S::get(&t.handshakes_refused),
            "connections_dropped_unresponsive": S::get(&t.connections_dropped_unresponsive),
            "frames_refused": S::get(&t.frames_refused),
        },
        "rss_kib": crate::host::rss_kib(),
        "scheduler": state.snapshot.borrow().scheduler.clone(),
        "events": state.events.stats(),
    }))
}

/// `ok` (200), or `degraded` (503) with each problem and what to do.
/// Which side of a partition `alive` of `remembered` members is:
/// `majority`, `half` or `minority` (`none` before the first view).
pub fn side(alive: usize, remembered: usize) -> &'static str {
    if remembered == 0 {
        "none"
    } else if alive * 2 > remembered {
        "majority"
    } else if alive * 2 == remembered {
        "half"
    } else {
        "minority"
    }
}

async fn health(State(state): State<ApiState>) -> Response {
    let name = state.view.borrow().self_name.clone();
    let (problems, (alive, remembered)) = {
        let snapshot = state.snapshot.borrow();
        (
            problems(&snapshot, &state.store_health, &state.problems),
            snapshot.members,
        )
    };
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "name": name,
        "problems": problems,
        "members": {
            "alive": alive,
            "remembered": remembered,
            "side": side(alive, remembered),
        },
    });
    (status, Json(body)).into_response()
}

async fn auth(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The page's reads carry the token as a cookie: only reads (GET), so
    // that another page in the browser cannot make it write anything (a
    // cross-site form can POST with the cookie; it cannot set a header).
    let reads = req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD;
    let by_cookie =
        reads && cookie_tokens(req.headers()).any(|t| token_matches(Some(&t), &state.token));
    if matches!(req.uri().path(), "/" | "/ui") && reads {
        // `/?token=TOKEN` (the URL the agent, `shoal ui` and `shoal demo`
        // print) logs the browser in, and drops the token from the URL.
        let query_token = req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        if let Some(t) = query_token {
            if token_matches(Some(&t), &state.token) {
                // Percent-encoded: a token given by --http-token may hold
                // characters a cookie value may not.
                let value: String = form_urlencoded::byte_serialize(t.as_bytes()).collect();
                let cookie = format!(
                    "{}={value}; Path=/; HttpOnly; SameSite=Strict",
                    cookie_name(req.headers())
                );
                return (
                    StatusCode::SEE_OTHER,
                    [
                        (header::LOCATION, "/".to_string()),
                        (header::SET_COOKIE, cookie),
                    ],
                )
                    .into_response();
            }
        }
        if !by_cookie && !token_matches(given, &state.token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                UI_LOGIN,
            )
                .into_response();
        }
    }
    if !by_cookie && !token_matches(given, &state.token) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "this agent's API requires its token: set SHOAL_HTTP_TOKEN or pass --http-token, \
             or run the command as a user who can read the agent's <data-dir>/api-token \
             (SHOAL_DATA_DIR or --data-dir names the data dir; /var/lib/shoal by default)",
        );
        // A client without the token keeps no connection: one that sent a
        // request every few seconds would otherwise hold its connection
        // slot for ever (found in review).
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return resp;
    }
    next.run(req).await
}

/// `shoal_token*` cookies looked at per request, at most.
const COOKIES_MAX: usize = 32;

/// The page's cookie: one per port, as browsers share cookies between the
/// ports of one host (two agents on one machine keep their own).
fn cookie_name(headers: &axum::http::HeaderMap) -> String {
    let port = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u16>().ok());
    match port {
        Some(p) => format!("shoal_token_{p}"),
        None => "shoal_token".to_string(),
    }
}

/// The values of the request's `shoal_token*` cookies (at most
/// [`COOKIES_MAX`] of them, whatever else the browser sends), decoded.
fn cookie_tokens(headers: &axum::http::HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(k, _)| k.starts_with("shoal_token"))
        .take(COOKIES_MAX)
        .map(|(_, v)| {
            form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
}

/// The URL that opens the page at the API `http` (`http://ADDR`) and
/// logs the browser in.
pub fn ui_url(http: &str, token: &str) -> String {
    let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    format!("{}/?token={token}", http.trim_end_matches('/'))
}

/// The page (`GET /`): one file, its script and style inline, embedded in
/// the binary (nothing is fetched from elsewhere).
const UI_PAGE: &str = include_str!("ui/index.html");

/// What `/` answers a browser without the token.
const UI_LOGIN: &str = "<!doctype html><meta charset=utf-8><title>shoal</title>\
<body style=\"font:15px system-ui;margin:3em\"><h1>shoal</h1>\
<p>This agent's page needs its API token. Open the URL that <code>shoal ui</code> \
prints on a machine of the cluster (it ends in <code>/?token=...</code>), or the one \
the agent logged when it started.</p>";

async fn ui_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        UI_PAGE,
    )
        .into_response()
}

/// Whether the bearer token `given` is `token`, in time that does not depend
/// on where they differ (no guessing it byte by byte from response times).
fn token_matches(given: Option<&str>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())))
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see `shoal --help` for the API the CLI uses",
    )
}

/// Bounds on the API's connections, so that clients without a token
/// cannot lock everyone out: at most `connections_max` open at once (more
/// wait in the kernel's accept queue), and a connection that has not sent
/// a whole request head within `header_timeout` (a slow or idle client,
/// keep-alive included) is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once.
    pub connections_max: usize,
    /// Time to send a request's head.
    pub header_timeout: std::time::Duration,
}

/// How long a graceful shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `app` on `listener` within `limits` until `shutdown` completes,
/// then lets requests in progress finish (at most [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections_max.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait, do not spin.
                    tracing::warn!(error = %e, "the API cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}", get(get_node))
        .route("/v1/nodes/{name}/drain", post(node_drain))
        .route("/v1/nodes/{name}/eligibility", post(node_eligibility))
        .route("/v1/nodes/{name}/forget", post(node_forget))
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{name}", get(get_job).delete(stop_job))
        .route("/v1/jobs/{name}/scale", post(scale_job))
        .route("/v1/jobs/{name}/revert", post(revert_job))
        .route("/v1/jobs/{name}/promote", post(promote_job))
        .route("/v1/jobs/{name}/cron/force", post(force_cron))
        .route("/v1/jobs/{name}/deployment", get(job_deployment))
        .route("/v1/plan", post(plan))
        .route("/v1/jobs/{name}/versions", get(job_versions))
        .route("/v1/jobs/{name}/logs", get(logs))
        .route("/v1/instances", get(instances))
        .route("/v1/health", get(health))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics_text))
        .route("/v1/events", get(events))
        .route("/", get(ui_page))
        .route("/ui", get(|| async { axum::response::Redirect::to("/") }))
        .route("/v1/join-token", post(join_token))
        .route("/v1/ca/rotate", post(rotate_ca))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .with_state(state)
}

/// `GET /v1/events`: the event stream (see `crate::events`). Query:
/// `since` (a cursor, or `now`; a `Last-Event-ID` header is read as one),
/// `topic` (repeated or comma-separated), `format=sse` (or an
/// `Accept: text/event-stream` header), `follow=false` to end at the
/// last event kept.
async fn events(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    use crate::events::{Format, Topics};
    let query = query.unwrap_or_default();
    if query.len() > 4096 {
        return error(StatusCode::BAD_REQUEST, "the query is over 4096 bytes");
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let one = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    for (k, _) in &pairs {
        if !["since", "topic", "format", "follow"].contains(&k.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown parameter `{}`; /v1/events takes since, topic, format and follow",
                    shoal_core::gossip::bounded(k.clone())
                ),
            );
        }
    }
    let last_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    // A browser's EventSource resumes by sending the last event's id: it
    // wins over the `since` of the URL it reconnects to (found in review:
    // the page's `since=now` skipped what happened while it reconnected).
    let since = match state.events.since(last_id.or(one("since"))) {
        Ok(s) => s,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let topics = match Topics::parse(
        pairs
            .iter()
            .filter(|(k, _)| k == "topic")
            .map(|(_, v)| v.as_str()),
    ) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let format = match one("format") {
        Some("sse") => Format::Sse,
        Some("ndjson") => Format::Ndjson,
        None if wants_sse => Format::Sse,
        None => Format::Ndjson,
        Some(f) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "format `{}` is not ndjson or sse",
                    shoal_core::gossip::bounded(f.to_string())
                ),
            )
        }
    };
    let follow = match one("follow") {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => return error(StatusCode::BAD_REQUEST, "follow is true or false"),
    };
    let Some(permit) = state.events.admit() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this agent serves {} event streams at once; close one or ask another agent",
                crate::events::STREAMS_MAX
            ),
        );
    };
    let body = axum::body::Body::from_stream(crate::events::stream(
        state.events.clone(),
        since,
        topics,
        format,
        follow,
        permit,
    ));
    let content_type = match format {
        Format::Sse => "text/event-stream",
        Format::Ndjson => "application/x-ndjson",
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /metrics`: the Prometheus exposition (see `crate::metrics`).
async fn metrics_text(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Counts each request by method, route (as declared) and status.
async fn count_request(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    state
        .metrics
        .request(&method, &route, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(
            Some("a-long-enough-token"),
            "a-long-enough-token"
        ));
        assert!(!token_matches(
            Some("a-long-enough-tokeX"),
            "a-long-enough-token"
        ));
        assert!(!token_matches(Some("a-long-enough"), "a-long-enough-token"));
        assert!(!token_matches(None, "a-long-enough-token"));
    }
}
