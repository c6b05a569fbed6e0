//! The node's shell: the one event loop (the only `tokio::select!` of the
//! node) that feeds the scheduler core its inputs with the time, and
//! carries out the effects it returns — off the loop, each kind with a
//! named bound, so that a slow Docker Engine, disk or peer never stalls it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use shoal_core::scheduler::{ApiAnswer, ApiError, ApiRequest, Effect, LogsTo, Now};
use shoal_core::wire::{Request, Response, LOG_CHUNK_MAX};
use shoal_core::{Scheduler, ViewBuilder};
use shoal_membership::{AppValues, Membership, MembershipView};
use shoal_transport::{Incoming, QuicTransport, Responder, Service, Transport};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::api::Snapshot;
use crate::driver::{Driver, DriverEvent, InstanceId, LogRange};
use crate::store::WriteJob;

/// Driver operations (start, stop, remove) running at once.
pub const DRIVER_OPS_MAX: usize = 64;
/// Node-to-node calls in flight at once; beyond it a call fails at once
/// (a push is dropped: anti-entropy repairs it).
pub const RPC_IN_FLIGHT_MAX: usize = 1024;
/// API commands waiting for their answer (a write waits for the disk).
pub const API_PENDING_MAX: usize = 1024;
/// Log reads and fetches in flight at once.
pub const LOG_READS_MAX: usize = 16;

/// Id of the store writes the core does not await (deletes of collected
/// jobs, the remembered membership): no write of the core's (whose ids
/// count up from 1) has it.
const FORGET_WRITE: u64 = u64::MAX;

/// Most output one log fetch returns (the API's `max_bytes` bound).
pub const LOG_FETCH_MAX: u64 = 1024 * 1024;
/// The API's snapshot is rebuilt at most this often (it copies every job
/// and instance), and waits `PACE` times its own cost.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);
const PACE: u32 = 5;

/// What the API answers a command with.
#[derive(Debug)]
pub enum ApiReply {
    /// The write is durable here and on its way everywhere.
    Written(Arc<shoal_core::records::JobRecord>),
    /// The spec was the job's current one: nothing written.
    Unchanged(Arc<shoal_core::records::JobRecord>),
    /// Output bytes.
    Logs(Vec<u8>),
    /// Failed.
    Failed(ApiError),
}

/// Commands from the HTTP API to the event loop.
pub enum ApiCommand {
    /// A command for the scheduler.
    Do(ApiRequest, oneshot::Sender<ApiReply>),
    /// One job's status, read from the live state (read-after-write).
    Job(
        String,
        oneshot::Sender<Option<shoal_core::status::JobStatus>>,
    ),
    /// A dry run of a submission (`shoal plan`): the plan, or why the file
    /// is not valid.
    Plan(
        String,
        oneshot::Sender<Result<shoal_core::plan::Plan, String>>,
    ),
}

/// What the loop needs besides the scheduler.
pub struct Io {
    /// The node's QUIC transport.
    pub transport: QuicTransport,
    /// Membership: views in, published values out.
    pub membership: Arc<Membership>,
    /// Drivers by name.
    pub drivers: BTreeMap<String, Arc<dyn Driver>>,
    /// The store's writer.
    pub store: std::sync::mpsc::SyncSender<WriteJob>,
    /// Results of the store's writes.
    pub persisted: mpsc::Receiver<(u64, Result<(), String>)>,
    /// Peers' requests.
    pub rpc: mpsc::Receiver<Incoming>,
    /// Name checks of the joins this node answers (`Request::Claim`s made
    /// for the joining node).
    pub claims: mpsc::Receiver<Incoming>,
    /// Driver events (instances ending).
    pub driver_events: mpsc::Receiver<DriverEvent>,
    /// API commands.
    pub api: mpsc::Receiver<ApiCommand>,
    /// Where the API's snapshot goes.
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    /// What the store's last write said (published with the node's other
    /// problems).
    pub store_health: crate::store::StoreHealth,
    /// The agent's other parts' problems (published too).
    pub problems: crate::api::Problems,
    /// Where reconcile passes are timed.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The gossip key under which a node publishes its problems (a JSON list
/// of at most [`PROBLEMS_MAX`] strings of at most `REASON_LEN_MAX` bytes).
pub const HEALTH_KEY: &str = "health";
/// Problems published, at most.
pub const PROBLEMS_MAX: usize = 4;

/// Decodes a peer's published problems; garbage yields none, and each is
/// bounded.
pub fn decode_problems(value: &str) -> Vec<String> {
    if value.len() > PROBLEMS_MAX * (shoal_core::gossip::REASON_LEN_MAX + 8) {
        return Vec::new();
    }
    serde_json::from_str::<Vec<String>>(value)
        .unwrap_or_default()
        .into_iter()
        .take(PROBLEMS_MAX)
        .map(shoal_core::gossip::bounded)
        .collect()
}

/// The time now, as the core takes it.
pub fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// Inputs the loop feeds back to the core at once, because carrying out an
/// effect failed before anything left (never dropped: a lost result would
/// leave the core waiting forever).
enum Immediate {
    Persisted(u64, Result<(), String>),
    Reply(u64, Result<Response, String>),
    Started(InstanceId, Result<(), String>),
}

/// How long a peer's request waits for its answer before it is dropped
/// (callers give up after their call timeout, 3 s).
const RESPONDER_TTL: Duration = Duration::from_secs(10);

/// Peers' requests waiting for an answer, at most (beyond it the oldest
/// are dropped, which closes their streams).
const RESPONDERS_MAX: usize = 4096;

/// Results of work the loop handed to tasks.
enum Done {
    Reply(u64, Result<Response, String>),
    Started(InstanceId, Result<(), String>),
}

struct Shell {
    me: String,
    io_transport: QuicTransport,
    membership: Arc<Membership>,
    drivers: BTreeMap<String, Arc<dyn Driver>>,
    store: std::sync::mpsc::SyncSender<WriteJob>,
    done_tx: mpsc::Sender<Done>,
    driver_ops: Arc<Semaphore>,
    rpc_slots: Arc<Semaphore>,
    log_reads: Arc<Semaphore>,
    /// Responders of the peers' requests being handled.
    /// Responders of peers' requests not answered yet, with when they came:
    /// most are answered within the batch, a push once its write is durable
    /// (found in review: clearing them after each batch lost every push's
    /// answer, so no API write ever saw its second copy confirmed).
    responders: BTreeMap<u64, (Responder, Instant)>,
    /// API commands waiting for their answer.
    api_pending: BTreeMap<u64, oneshot::Sender<ApiReply>>,
    next_token: u64,
    /// The application keys as published.
    app: BTreeMap<String, String>,
    app_dirty: bool,
    /// Inputs the loop feeds back at once (a write the store could not
    /// queue).
    immediate: Vec<Immediate>,
    /// The health checks of the copies that have them.
    checks: crate::checks::Watcher,
    /// Where driver errors are counted.
    metrics: Arc<crate::metrics::Metrics>,
}

/// Hands a peer's request to the core, or answers it at once when it does
/// not decode or claims a name other than the peer's.
fn peer_request(shell: &mut Shell, core: &mut Scheduler, msg: Incoming) -> Vec<Effect> {
    let Some(reply) = msg.reply else {
        return Vec::new();
    };
    match Request::decode(&msg.body) {
        // A peer may claim only the name its certificate carries (no node
        // can push another out of the cluster's views by claiming its
        // name).
        Ok(Request::Claim { name, .. }) if msg.peer.as_deref().is_some_and(|p| p != name) => {
            let peer = msg.peer.as_deref().unwrap_or_default();
            warn!(%peer, claimed = %name, "refused a name claim for another node's name");
            reply.respond(
                Response::Error(format!(
                    "the node `{peer}` may claim only its own name, not `{name}`"
                ))
                .encode(),
            );
            Vec::new()
        }
        Ok(req) => {
            let token = shell.token();
            shell.responders.insert(token, (reply, Instant::now()));
            core.handle_request(token, req, now())
        }
        Err(e) => {
            reply.respond(Response::Error(e).encode());
            Vec::new()
        }
    }
}

impl Shell {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn execute(&mut self, effects: Vec<Effect>) {
        for e in effects {
            self.effect(e);
        }
        // A request the core has not answered within the call timeout will
        // not be (its caller gave up): drop it, and bound the rest.
        let now = Instant::now();
        self.responders
            .retain(|_, (_, since)| now.duration_since(*since) < RESPONDER_TTL);
        while self.responders.len() > RESPONDERS_MAX {
            self.responders.pop_first();
        }
        if self.app_dirty {
            self.app_dirty = false;
            let values: AppValues = Arc::new(self.app.clone());
            self.membership.publish_app(values);
        }
    }

    fn effect(&mut self, e: Effect) {
        match e {
            Effect::StartInstance { driver, spec } => {
                let Some(d) = self.drivers.get(&driver).cloned() else {
                    self.metrics.driver_error("none", "start");
                    self.immediate.push(Immediate::Started(
                        spec.id.clone(),
                        Err(format!("no `{driver}` driver on this node")),
                    ));
                    return;
                };
                let permits = self.driver_ops.clone();
                let tx = self.done_tx.clone();
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let r = d.start(&spec).await.map_err(|e| format!("{e:#}"));
                    if let Err(e) = &r {
                        warn!(instance = %spec.id, error = %e, "start failed");
                        metrics.driver_error(&driver, "start");
                    }
                    let _ = tx.send(Done::Started(spec.id.clone(), r)).await;
                });
            }
            Effect::StopInstance { driver, id, grace } => {
                if let Some(d) = self.drivers.get(&driver).cloned() {
                    info!(instance = %id, "stopping");
                    let permits = self.driver_ops.clone();
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        let _permit = permits.acquire_owned().await;
                        if let Err(e) = d.stop(&id, grace).await {
                            warn!(instance = %id, error = %e, "stop failed");
                            metrics.driver_error(&driver, "stop");
                        }
                    });
                }
            }
            Effect::Discard { driver, id, grace } => {
                self.checks.unwatch(&id);
                if let Some(d) = self.drivers.get(&driver).cloned() {
                    let permits = self.driver_ops.clone();
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        let _permit = permits.acquire_owned().await;
                        if let Err(e) = d.stop(&id, grace).await {
                            warn!(instance = %id, error = %e, "stop failed");
                            metrics.driver_error(&driver, "stop");
                        }
                        let _ = d.remove(&id).await;
                    });
                }
            }
            Effect::WatchChecks { driver, id, probes } => {
                if let Some(d) = self.drivers.get(&driver).cloned() {
                    self.checks.watch(d, id, probes);
                }
            }
            Effect::UnwatchChecks { id } => self.checks.unwatch(&id),
            Effect::RemoveInstance { driver, id } => {
                self.checks.unwatch(&id);
                if let Some(d) = self.drivers.get(&driver).cloned() {
                    let permits = self.driver_ops.clone();
                    tokio::spawn(async move {
                        let _permit = permits.acquire_owned().await;
                        if let Err(e) = d.remove(&id).await {
                            debug!(instance = %id, error = %e, "remove failed");
                        }
                    });
                }
            }
            Effect::Send {
                to: _,
                addr,
                request,
                call,
                timeout,
            } => {
                let Ok(permit) = self.rpc_slots.clone().try_acquire_owned() else {
                    if let Some(call) = call {
                        self.immediate.push(Immediate::Reply(
                            call,
                            Err(format!("more than {RPC_IN_FLIGHT_MAX} calls in flight")),
                        ));
                    }
                    return;
                };
                let t = self.io_transport.clone();
                let tx = self.done_tx.clone();
                let body = request.encode();
                tokio::spawn(async move {
                    let _permit = permit;
                    let r = if timeout.is_zero() {
                        Err("no address for the peer".to_string())
                    } else {
                        match t.request(addr, Service::Rpc, body, timeout).await {
                            Ok(bytes) => Response::decode(&bytes),
                            Err(e) => Err(e.to_string()),
                        }
                    };
                    if let Some(call) = call {
                        let _ = tx.send(Done::Reply(call, r)).await;
                    }
                });
            }
            Effect::Reply { token, response } => {
                if let Response::Error(e) = &response {
                    if e.starts_with(shoal_core::wire::NAME_TAKEN) {
                        warn!("refused a node joining under a live member's name: {e}");
                    }
                }
                if let Some((r, _)) = self.responders.remove(&token) {
                    r.respond(response.encode());
                }
            }
            Effect::Persist {
                write,
                jobs,
                completions,
            } => {
                let job = WriteJob {
                    id: write,
                    jobs,
                    completions,
                    forget: Vec::new(),
                    members: None,
                };
                if let Err(e) = self.store.try_send(job) {
                    let why = match e {
                        std::sync::mpsc::TrySendError::Full(_) => "the store's queue is full",
                        std::sync::mpsc::TrySendError::Disconnected(_) => "the store stopped",
                    };
                    self.immediate
                        .push(Immediate::Persisted(write, Err(why.to_string())));
                }
            }
            Effect::Forget { jobs } => {
                // Not reported to the core (its id matches no write): a
                // failed delete leaves tombstones collected after the next
                // start.
                let job = WriteJob {
                    id: FORGET_WRITE,
                    jobs: Vec::new(),
                    completions: Vec::new(),
                    forget: jobs,
                    members: None,
                };
                if self.store.try_send(job).is_err() {
                    debug!("the store's queue is full; collected jobs stay on disk for now");
                }
            }
            Effect::Remember { members } => {
                // Not reported either (the id matches no write): the core
                // writes it again at its next change.
                let job = WriteJob {
                    id: FORGET_WRITE,
                    jobs: Vec::new(),
                    completions: Vec::new(),
                    forget: Vec::new(),
                    members: Some(members),
                };
                if self.store.try_send(job).is_err() {
                    warn!("the store's queue is full; the remembered membership was not saved");
                }
            }
            Effect::Publish { key, value } => {
                match value {
                    Some(v) => self.app.insert(key, v),
                    None => self.app.remove(&key),
                };
                self.app_dirty = true;
            }
            Effect::PublishLoad(load) => self.membership.publish_load(load),
            Effect::Answer { token, answer } => {
                if let Some(tx) = self.api_pending.remove(&token) {
                    let _ = tx.send(match answer {
                        ApiAnswer::Written(r) => ApiReply::Written(r),
                        ApiAnswer::Unchanged(r) => ApiReply::Unchanged(r),
                        ApiAnswer::Failed(e) => ApiReply::Failed(e),
                    });
                }
            }
            Effect::ReadLogs {
                driver,
                id,
                stream,
                max_bytes,
                chunk,
                to,
            } => {
                let d = self.drivers.get(&driver).cloned();
                let reply: Either = match to {
                    LogsTo::Api(token) => match self.api_pending.remove(&token) {
                        Some(tx) => Either::Api(tx),
                        None => return,
                    },
                    LogsTo::Peer(token) => match self.responders.remove(&token) {
                        Some((r, _)) => Either::Peer(r),
                        None => return,
                    },
                };
                let Ok(permit) = self.log_reads.clone().try_acquire_owned() else {
                    reply.fail(format!(
                        "more than {LOG_READS_MAX} log reads at once; try again"
                    ));
                    return;
                };
                // The API's bound, applied to peers' requests too.
                let max_bytes = max_bytes.min(LOG_FETCH_MAX);
                tokio::spawn(async move {
                    let _permit = permit;
                    let Some(d) = d else {
                        reply.fail("driver unavailable".to_string());
                        return;
                    };
                    match chunk {
                        Some(from) => match d
                            .log_range(&id, &stream, max_bytes, from, LOG_CHUNK_MAX)
                            .await
                        {
                            Ok(r) => reply.chunk(r),
                            Err(e) => reply.fail(e.to_string()),
                        },
                        None => match d.logs(&id, &stream, max_bytes).await {
                            Ok(bytes) => reply.bytes(bytes),
                            Err(e) => reply.fail(e.to_string()),
                        },
                    }
                });
            }
            Effect::FetchLogs {
                addr,
                request,
                token,
                timeout,
            } => {
                let Some(tx) = self.api_pending.remove(&token) else {
                    return;
                };
                let Ok(permit) = self.log_reads.clone().try_acquire_owned() else {
                    let _ = tx.send(ApiReply::Failed(ApiError::Unavailable(format!(
                        "more than {LOG_READS_MAX} log reads at once; try again"
                    ))));
                    return;
                };
                let t = self.io_transport.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tx.send(fetch_logs(&t, addr, request, timeout).await);
                });
            }
        }
    }
}

/// Fetches an instance's output from its holder, a chunk of at most
/// `LOG_CHUNK_MAX` bytes per call (one answer of a 1 MiB fetch would not
/// fit a frame), each call bounded by `timeout`; at most
/// `LOG_FETCH_MAX / LOG_CHUNK_MAX + 1` calls.
async fn fetch_logs(
    t: &impl Transport,
    addr: SocketAddr,
    request: Request,
    timeout: Duration,
) -> ApiReply {
    let Request::Logs {
        job,
        slot,
        stream,
        max_bytes,
        ..
    } = request
    else {
        return ApiReply::Failed(ApiError::Unavailable("not a log request".into()));
    };
    let want = max_bytes.min(LOG_FETCH_MAX);
    let mut out: Vec<u8> = Vec::new();
    let mut from = None;
    let calls_max = LOG_FETCH_MAX / LOG_CHUNK_MAX + 1;
    for _ in 0..calls_max {
        let req = Request::Logs {
            job: job.clone(),
            slot,
            stream: stream.clone(),
            max_bytes: want,
            from,
            chunked: true,
        };
        let answer = match t.request(addr, Service::Rpc, req.encode(), timeout).await {
            Ok(bytes) => Response::decode(&bytes),
            Err(e) => {
                return ApiReply::Failed(ApiError::Unavailable(format!(
                    "cannot reach the holder: {e}"
                )))
            }
        };
        match answer {
            Ok(Response::LogChunk { start, end, bytes }) => {
                // The first answer fixes where the fetch starts; later
                // ones must continue it.
                if from.is_some_and(|f| f != start) || bytes.len() as u64 > LOG_CHUNK_MAX {
                    return ApiReply::Failed(ApiError::Unavailable(
                        "the holder's log changed during the fetch; fetch again".into(),
                    ));
                }
                let got = bytes.len() as u64;
                out.extend(bytes);
                let next = start.saturating_add(got);
                // Done: the tail asked for, the log's end, or no progress.
                if out.len() as u64 >= want || next >= end || got == 0 {
                    let keep = out.len().min(want as usize);
                    out.truncate(keep);
                    return ApiReply::Logs(out);
                }
                from = Some(next);
            }
            // A holder of an earlier release answers in one piece.
            Ok(Response::Logs(b)) if from.is_none() => return ApiReply::Logs(b),
            Ok(Response::Error(e)) => return ApiReply::Failed(ApiError::NotFound(e)),
            _ => {
                return ApiReply::Failed(ApiError::Unavailable(
                    "unexpected answer from the holder".into(),
                ))
            }
        }
    }
    ApiReply::Logs(out)
}

/// Where a log read's bytes go.
enum Either {
    Api(oneshot::Sender<ApiReply>),
    Peer(Responder),
}

impl Either {
    fn bytes(self, b: Vec<u8>) {
        match self {
            Either::Api(tx) => {
                let _ = tx.send(ApiReply::Logs(b));
            }
            Either::Peer(r) => r.respond(Response::Logs(b).encode()),
        }
    }

    fn chunk(self, r: LogRange) {
        match self {
            Either::Api(tx) => {
                let _ = tx.send(ApiReply::Logs(r.bytes));
            }
            Either::Peer(p) => p.respond(
                Response::LogChunk {
                    start: r.start,
                    end: r.end,
                    bytes: r.bytes,
                }
                .encode(),
            ),
        }
    }

    fn fail(self, e: String) {
        match self {
            Either::Api(tx) => {
                let _ = tx.send(ApiReply::Failed(ApiError::BadRequest(e)));
            }
            Either::Peer(r) => r.respond(Response::Error(e).encode()),
        }
    }
}

/// Runs the node's event loop until `shutdown` completes, then stops every
/// local instance (bounded by the stop grace).
/// `first` are effects the core returned before the loop (from recovering
/// the drivers' instances).
pub async fn run(
    mut core: Scheduler,
    io: Io,
    first: Vec<Effect>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Io {
        transport,
        membership,
        drivers,
        store,
        mut persisted,
        mut rpc,
        mut claims,
        mut driver_events,
        mut api,
        snapshot,
        store_health,
        problems,
        metrics,
    } = io;
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(RPC_IN_FLIGHT_MAX + DRIVER_OPS_MAX * 4);
    let (checks, mut check_results) = crate::checks::Watcher::new();
    let mut shell = Shell {
        me: core.me().to_string(),
        io_transport: transport.clone(),
        membership: membership.clone(),
        drivers,
        store,
        done_tx,
        driver_ops: Arc::new(Semaphore::new(DRIVER_OPS_MAX)),
        rpc_slots: Arc::new(Semaphore::new(RPC_IN_FLIGHT_MAX)),
        log_reads: Arc::new(Semaphore::new(LOG_READS_MAX)),
        responders: BTreeMap::new(),
        api_pending: BTreeMap::new(),
        next_token: 0,
        app: BTreeMap::new(),
        app_dirty: false,
        immediate: Vec::new(),
        checks,
        metrics: metrics.clone(),
    };
    // Found by the chaos suite (seed 42): a batch success recovered at
    // start-up was persisted by an effect the start-up code dropped, so the
    // write never completed and the node never counted as caught up.
    shell.execute(first);
    let mut builder = ViewBuilder::default();
    let mut view = membership.view();
    let first: MembershipView = view.borrow_and_update().clone();
    let effects = core.handle_view(builder.build(&shell.me, &first), now());
    shell.execute(effects);
    let mut tick = tokio::time::interval(core.config().tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_snapshot = Instant::now() - SNAPSHOT_INTERVAL;
    let mut snapshot_cost = Duration::ZERO;
    let mut snapshot_dirty = true;
    let mut caught_up = core.caught_up();
    if !caught_up {
        info!("catching up with a peer before placing or starting anything");
    }
    tokio::pin!(shutdown);
    loop {
        let effects = tokio::select! {
            _ = &mut shutdown => break,
            changed = view.changed() => {
                if changed.is_err() {
                    anyhow::bail!("membership task stopped unexpectedly");
                }
                let v = view.borrow_and_update().clone();
                // The catalog follows the view even when the scheduler
                // has nothing to do about a change (DNS, the mesh).
                snapshot_dirty = true;
                let cv = builder.build(&shell.me, &v);
                core.handle_view(cv, now())
            }
            Some(ev) = driver_events.recv() => {
                let shoal_core::instance::DriverEvent::Ended { state, .. } = &ev;
                metrics.exit(state);
                core.handle_driver(ev, now())
            }
            Some(c) = check_results.recv() => core.handle_check(c.id, c.index, c.result, now()),
            Some(msg) = rpc.recv() => peer_request(&mut shell, &mut core, msg),
            Some(msg) = claims.recv() => peer_request(&mut shell, &mut core, msg),
            Some(done) = done_rx.recv() => match done {
                Done::Reply(call, r) => core.handle_reply(call, r, now()),
                Done::Started(id, r) => core.handle_started(id, r, now()),
            },
            Some((write, r)) = persisted.recv() => {
                if let Err(e) = &r {
                    warn!(error = %e, "a write could not be stored");
                }
                core.handle_persisted(write, r, now())
            }
            Some(cmd) = api.recv() => match cmd {
                ApiCommand::Do(req, tx) => {
                    if shell.api_pending.len() >= API_PENDING_MAX {
                        let _ = tx.send(ApiReply::Failed(ApiError::Unavailable(
                            "too many API commands are waiting; try again shortly".into(),
                        )));
                        continue;
                    }
                    let token = shell.token();
                    shell.api_pending.insert(token, tx);
                    core.handle_api(token, req, now())
                }
                ApiCommand::Job(name, tx) => {
                    let status = shoal_core::status::job_status(&core, &name, Instant::now());
                    let _ = tx.send(status);
                    continue;
                }
                ApiCommand::Plan(text, tx) => {
                    let plan = shoal_core::job::JobSpec::parse(&text)
                        .map(|spec| shoal_core::plan::plan(&core, &spec, Instant::now()))
                        .map_err(|e| e.to_string());
                    let _ = tx.send(plan);
                    continue;
                }
            },
            _ = tick.tick() => {
                let started = Instant::now();
                let passes = core.counters().passes;
                let effects = core.handle_timer(now());
                if core.counters().passes != passes {
                    core.set_pass_cost(started.elapsed());
                    metrics.pass(started.elapsed());
                }
                effects
            }
        };
        if !effects.is_empty() {
            snapshot_dirty = true;
        }
        if core.caught_up() && !caught_up {
            caught_up = true;
            info!("caught up with the cluster's state: placing and starting from now on");
        }
        shell.execute(effects);
        while !shell.immediate.is_empty() {
            for i in std::mem::take(&mut shell.immediate) {
                let effects = match i {
                    Immediate::Persisted(write, r) => core.handle_persisted(write, r, now()),
                    Immediate::Reply(call, r) => core.handle_reply(call, r, now()),
                    Immediate::Started(id, r) => core.handle_started(id, r, now()),
                };
                shell.execute(effects);
            }
        }
        let gap = SNAPSHOT_INTERVAL.max(snapshot_cost * PACE);
        if snapshot_dirty && last_snapshot.elapsed() >= gap {
            let started = Instant::now();
            last_snapshot = started;
            snapshot_dirty = false;
            let mut snap = Snapshot::of(&mut core, started);
            {
                // The catalog's index moves with each change (watches).
                let prev = snapshot.borrow();
                snap.catalog_index = if Arc::ptr_eq(&prev.catalog, &snap.catalog) {
                    prev.catalog_index.clone()
                } else {
                    Arc::new(prev.catalog_index.step(&prev.catalog, &snap.catalog))
                };
            }
            let snap = Arc::new(snap);
            // The node's problems go to every node, for `shoal nodes`.
            let problems: Vec<String> = crate::api::problems(&snap, &store_health, &problems)
                .into_iter()
                .take(PROBLEMS_MAX)
                .map(shoal_core::gossip::bounded)
                .collect();
            let value = (!problems.is_empty())
                .then(|| serde_json::to_string(&problems).unwrap_or_default());
            if shell.app.get(HEALTH_KEY) != value.as_ref() {
                shell.execute(vec![Effect::Publish {
                    key: HEALTH_KEY.to_string(),
                    value,
                }]);
            }
            snapshot.send_replace(snap);
            snapshot_cost = started.elapsed();
        }
    }
    info!("shutting down: stopping local instances and leaving the cluster");
    membership.leave().await?;
    stop_all(&core.shutdown(), &shell.drivers).await;
    Ok(())
}

/// Carries out the stops of a shutdown and waits for them (each bounded by
/// its grace).
async fn stop_all(effects: &[Effect], drivers: &BTreeMap<String, Arc<dyn Driver>>) {
    let mut tasks = Vec::new();
    for e in effects {
        if let Effect::Discard { driver, id, grace } = e {
            if let Some(d) = drivers.get(driver).cloned() {
                let (id, grace) = (id.clone(), *grace);
                tasks.push(tokio::spawn(async move {
                    let _ = d.stop(&id, grace).await;
                    let _ = d.remove(&id).await;
                }));
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}
