//! [`Membership`]: the task that runs chitchat gossip and the SWIM detector
//! over a node's transport and publishes a [`MembershipView`].
//!
//! chitchat carries each node's record, load and incarnation (eventually
//! consistent, anti-entropy); SWIM decides liveness. chitchat's own phi
//! detector only steers whom chitchat gossips with. The chitchat handle
//! (an `Arc<Mutex<..>>`) never leaves this task: callers talk to it by
//! [`Command`]s and read the view from a `watch` channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use shoal_transport::gossip::GossipTransport;
use shoal_transport::{take_inbox, Inbox, Incoming, Service, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::record::{AppState, Load, Member, MembershipView, NodeRecord, NodeState};
use crate::swim::{Action, ProbeMsg, ProbeOutcome, ProbeReply, Swim, SwimConfig};

const KEY_RECORD: &str = "record";
const KEY_LOAD: &str = "load";
const KEY_INCARNATION: &str = "inc";
const KEY_STATUS: &str = "status";
/// Prefix of application keys in gossip.
const APP_PREFIX: &str = "app/";

/// Longest application value, bytes: chitchat sends a key-value pair whole,
/// so it must fit in one gossip message (64 KiB) with room to spare.
pub const APP_VALUE_LEN_MAX: usize = 48 * 1024;

/// Longest record or load value decoded from gossip, bytes.
const GOSSIP_VALUE_LEN_MAX: usize = 16 * 1024;

/// Depth of the queues between the task and its probe workers and callers.
const QUEUE_LEN: usize = 4096;

/// Settings of the membership task.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Failure detector settings.
    pub swim: SwimConfig,
    /// chitchat gossip period. Records and load change rarely and liveness
    /// does not depend on it, so it can be slower than chitchat's own
    /// failure detector would want; every digest lists every node, so this
    /// interval sets gossip bandwidth.
    pub gossip_interval: Duration,
    /// Cluster id; chitchat drops gossip from other ids.
    pub cluster_id: String,
    /// Seed addresses to join through.
    pub seeds: Vec<SocketAddr>,
    /// How often the view is refreshed from gossip state.
    pub sync_interval: Duration,
    /// Granularity of the detector's timers.
    pub tick_interval: Duration,
    /// How long a graceful leave waits for peers to acknowledge.
    pub leave_timeout: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            swim: SwimConfig::lan(),
            gossip_interval: Duration::from_millis(500),
            cluster_id: "shoal".into(),
            seeds: Vec::new(),
            sync_interval: Duration::from_millis(100),
            // Well below the smallest SWIM timeout (150 ms).
            tick_interval: Duration::from_millis(10),
            leave_timeout: Duration::from_millis(500),
        }
    }
}

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Gossip could not start.
    #[error("gossip failed to start: {0}")]
    Gossip(String),
    /// The membership task has stopped.
    #[error("membership task stopped")]
    Stopped,
}

enum Command {
    Leave(oneshot::Sender<()>),
}

/// The application keys a node publishes (without the `app/` prefix).
pub type AppValues = Arc<std::collections::BTreeMap<String, String>>;

/// Handle to a running membership task.
pub struct Membership {
    cmd: mpsc::Sender<Command>,
    view: watch::Receiver<MembershipView>,
    /// The latest load and application keys to publish: a watch, so that
    /// the caller never waits for the membership task (it takes the
    /// newest value whenever it gets to it).
    load: watch::Sender<Load>,
    app: watch::Sender<AppValues>,
}

impl Membership {
    /// Starts gossip and failure detection for this node on `transport`,
    /// taking the gossip and probe queues out of `inbox`.
    pub async fn start<T: Transport>(
        transport: T,
        inbox: &mut Inbox,
        record: NodeRecord,
        generation: u64,
        config: MembershipConfig,
    ) -> Result<Membership, MembershipError> {
        let gossip_rx = take_inbox(inbox, Service::Gossip)
            .ok_or_else(|| MembershipError::Gossip("gossip queue already taken".into()))?;
        let probe_rx = take_inbox(inbox, Service::Probe)
            .ok_or_else(|| MembershipError::Gossip("probe queue already taken".into()))?;
        let addr = record.address;
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(record.name.clone(), generation, addr),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: transport.local_addr(),
            seed_nodes: config.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                // Only steers gossip targets; prior equal to the gossip
                // interval so that a new peer is not presumed dead for seconds.
                initial_interval: config.gossip_interval,
                dead_node_grace_period: config.swim.dead_retention,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let record_json = serde_json::to_string(&record).expect("record encodes");
        let initial = vec![
            (KEY_RECORD.to_string(), record_json),
            (
                KEY_LOAD.to_string(),
                serde_json::to_string(&Load::default()).expect("encodes"),
            ),
            (KEY_INCARNATION.to_string(), "0".to_string()),
        ];
        let gossip_transport = GossipTransport::new(transport.clone(), gossip_rx);
        let chitchat = spawn_chitchat(chitchat_config, initial, &gossip_transport)
            .await
            .map_err(|e| MembershipError::Gossip(e.to_string()))?;
        let seed = generation
            ^ record
                .name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let swim = Swim::new(config.swim.clone(), &record.name, generation, addr, seed);
        let (view_tx, view) = watch::channel(MembershipView::default());
        let (cmd, cmd_rx) = mpsc::channel(64);
        let (load_tx, load_rx) = watch::channel(Load::default());
        let (app_tx, app_rx) = watch::channel(AppValues::default());
        let (results_tx, results_rx) = mpsc::channel(QUEUE_LEN);
        let actor = Actor {
            transport,
            swim,
            chitchat,
            record,
            generation,
            load: Load::default(),
            app: Default::default(),
            app_published: Default::default(),
            left: false,
            published_incarnation: 0,
            peers: HashMap::new(),
            logged: HashMap::new(),
            view_tx,
            results_tx,
            config,
        };
        tokio::spawn(actor.run(probe_rx, results_rx, cmd_rx, load_rx, app_rx));
        Ok(Membership {
            cmd,
            view,
            load: load_tx,
            app: app_tx,
        })
    }

    /// The live view; `changed()` fires when it changes.
    pub fn view(&self) -> watch::Receiver<MembershipView> {
        self.view.clone()
    }

    /// Publishes this node's load (never waits: the task takes the newest).
    pub fn publish_load(&self, load: Load) {
        self.load.send_if_modified(|l| {
            let changed = *l != load;
            *l = load;
            changed
        });
    }

    /// Publishes this node's application keys, the whole set (keys absent
    /// from it are deleted), gossiped with its record and visible in every
    /// view as [`crate::Member::app`]. Never waits: the task takes the
    /// newest set and publishes what changed. Values over
    /// [`APP_VALUE_LEN_MAX`] are not published.
    pub fn publish_app(&self, app: AppValues) {
        self.app.send_replace(app);
    }

    /// Leaves the cluster: tells every peer directly (waiting at most the
    /// configured leave timeout for their acknowledgements), marks the node
    /// `left` in gossip, and stops answering probes.
    pub async fn leave(&self) -> Result<(), MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Leave(tx))
            .await
            .map_err(|_| MembershipError::Stopped)?;
        rx.await.map_err(|_| MembershipError::Stopped)
    }
}

struct Peer {
    generation: u64,
    /// chitchat's max version of the node when last read: unchanged means
    /// nothing to read again.
    seen_version: u64,
    record: Option<(u64, NodeRecord)>,
    load: Load,
    app: AppState,
    /// chitchat version of each application value in `app`.
    app_versions: std::collections::BTreeMap<String, u64>,
}

struct Actor<T: Transport> {
    transport: T,
    swim: Swim,
    chitchat: ChitchatHandle,
    record: NodeRecord,
    generation: u64,
    load: Load,
    app: AppState,
    /// The application keys as set in chitchat.
    app_published: std::collections::BTreeMap<String, String>,
    left: bool,
    published_incarnation: u64,
    peers: HashMap<String, Peer>,
    /// Last logged (generation, state) of each member, to log transitions.
    logged: HashMap<String, (u64, NodeState)>,
    view_tx: watch::Sender<MembershipView>,
    results_tx: mpsc::Sender<(u64, ProbeOutcome)>,
    config: MembershipConfig,
}

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    if s.len() > GOSSIP_VALUE_LEN_MAX {
        return None;
    }
    serde_json::from_str(s).ok()
}

impl<T: Transport> Actor<T> {
    async fn run(
        mut self,
        mut probe_rx: mpsc::Receiver<Incoming>,
        mut results_rx: mpsc::Receiver<(u64, ProbeOutcome)>,
        mut cmd_rx: mpsc::Receiver<Command>,
        mut load_rx: watch::Receiver<Load>,
        mut app_rx: watch::Receiver<AppValues>,
    ) {
        let mut tick = tokio::time::interval(self.config.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sync = tokio::time::interval(self.config.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.sync_from_gossip().await;
        loop {
            tokio::select! {
                t = tick.tick() => {
                    let now = Instant::now();
                    // How late this tick fired: our own starvation.
                    self.swim.note_lag(now.saturating_duration_since(t.into_std()), now);
                    let actions = self.swim.tick(now);
                    self.execute(actions);
                    self.publish_incarnation().await;
                    self.publish_view();
                }
                _ = sync.tick() => {
                    self.sync_from_gossip().await;
                    self.publish_view();
                }
                Some(msg) = probe_rx.recv() => {
                    self.on_probe_message(msg);
                    self.publish_view();
                }
                Some((probe, outcome)) = results_rx.recv() => {
                    let actions = self.swim.probe_outcome(probe, outcome, Instant::now());
                    self.execute(actions);
                    self.publish_view();
                }
                Ok(()) = load_rx.changed() => {
                    let load = *load_rx.borrow_and_update();
                    self.load = load;
                    let json = serde_json::to_string(&load).unwrap_or_default();
                    self.chitchat.with_chitchat(|c| c.self_node_state().set(KEY_LOAD, &json)).await;
                    self.publish_view();
                }
                Ok(()) = app_rx.changed() => {
                    let wanted = app_rx.borrow_and_update().clone();
                    self.set_app(&wanted).await;
                    self.publish_view();
                }
                cmd = cmd_rx.recv() => match cmd {
                    Some(Command::Leave(done)) => {
                        self.leave().await;
                        self.publish_view();
                        let _ = done.send(());
                    }
                    None => break,
                },
            }
        }
        let _ = self.chitchat.shutdown().await;
    }

    /// Makes chitchat's application keys equal `wanted`: deletes the keys
    /// it lacks, sets those that differ.
    async fn set_app(&mut self, wanted: &std::collections::BTreeMap<String, String>) {
        let stale: Vec<String> = self
            .app_published
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        let changed: Vec<(String, String)> = wanted
            .iter()
            .filter(|(k, v)| v.len() <= APP_VALUE_LEN_MAX && self.app_published.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if stale.is_empty() && changed.is_empty() {
            return;
        }
        self.chitchat
            .with_chitchat(|c| {
                let state = c.self_node_state();
                for k in &stale {
                    state.delete(&format!("{APP_PREFIX}{k}"));
                }
                for (k, v) in &changed {
                    state.set(format!("{APP_PREFIX}{k}"), v);
                }
            })
            .await;
        let app = Arc::make_mut(&mut self.app);
        for k in stale {
            app.remove(&k);
            self.app_published.remove(&k);
        }
        for (k, v) in changed {
            app.insert(k.clone(), Arc::from(v.as_str()));
            self.app_published.insert(k, v);
        }
    }

    async fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        self.chitchat
            .with_chitchat(|c| c.self_node_state().set(KEY_STATUS, "left"))
            .await;
        let (to, update) = self.swim.leave();
        let body = postcard::to_stdvec(&ProbeMsg::Updates(vec![update])).expect("encodes");
        let mut tasks = Vec::new();
        for addr in to {
            let t = self.transport.clone();
            let body = body.clone();
            let timeout = self.config.leave_timeout;
            tasks.push(tokio::spawn(async move {
                t.request(addr, Service::Probe, body, timeout).await
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        info!("left the cluster");
    }

    async fn publish_incarnation(&mut self) {
        let inc = self.swim.incarnation();
        if inc != self.published_incarnation {
            self.published_incarnation = inc;
            self.chitchat
                .with_chitchat(|c| c.self_node_state().set(KEY_INCARNATION, inc))
                .await;
            warn!(incarnation = inc, "refuted a suspicion of this node");
        }
    }

    fn execute(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
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
                    let t = self.transport.clone();
                    let results = self.results_tx.clone();
                    let body = postcard::to_stdvec(&msg).expect("encodes");
                    tokio::spawn(async move {
                        let outcome = match t.request(addr, Service::Probe, body, timeout).await {
                            Ok(bytes) => match postcard::from_bytes::<ProbeReply>(&bytes) {
                                Ok(ProbeReply::Ack {
                                    generation,
                                    incarnation,
                                }) => ProbeOutcome::Ack {
                                    generation,
                                    incarnation,
                                },
                                _ => ProbeOutcome::Failed,
                            },
                            Err(_) => ProbeOutcome::Failed,
                        };
                        // A lost outcome expires in the detector as a failure.
                        let _ = results.try_send((probe, outcome));
                    });
                }
                Action::Broadcast { to, updates } => {
                    let body = postcard::to_stdvec(&ProbeMsg::Updates(updates)).expect("encodes");
                    for addr in to {
                        let t = self.transport.clone();
                        let body = body.clone();
                        tokio::spawn(async move { t.send(addr, Service::Probe, body).await });
                    }
                }
            }
        }
    }

    fn on_probe_message(&mut self, msg: Incoming) {
        let Ok(probe_msg) = postcard::from_bytes::<ProbeMsg>(&msg.body) else {
            warn!(from = %msg.from, "dropped undecodable probe message");
            return;
        };
        let now = Instant::now();
        match probe_msg {
            ProbeMsg::Ping {
                from,
                target,
                view_of_you,
            } => {
                // A ping speaks for its sender (the detector learns the
                // sender is alive, at that address and generation): only
                // the node its certificate names may send it.
                if msg.peer.as_deref().is_some_and(|p| p != from.0) {
                    warn!(from = %msg.from, peer = ?msg.peer, claimed = %from.0, "dropped a ping sent in another node's name");
                    return;
                }
                let (reply, actions) = if self.left {
                    (ProbeReply::Nack, Vec::new())
                } else {
                    self.swim.on_ping(from, &target, view_of_you, now)
                };
                if let Some(r) = msg.reply {
                    r.respond(postcard::to_stdvec(&reply).expect("encodes"));
                }
                self.execute(actions);
            }
            ProbeMsg::PingReq { target, addr } => {
                let Some(reply) = msg.reply else { return };
                let t = self.transport.clone();
                let ping = ProbeMsg::Ping {
                    from: (
                        self.record.name.clone(),
                        self.generation,
                        self.record.address,
                    ),
                    target,
                    view_of_you: None,
                };
                let body = postcard::to_stdvec(&ping).expect("encodes");
                let timeout = self.config.swim.probe_timeout;
                tokio::spawn(async move {
                    let answer = match t.request(addr, Service::Probe, body, timeout).await {
                        Ok(bytes) => match postcard::from_bytes::<ProbeReply>(&bytes) {
                            Ok(ack @ ProbeReply::Ack { .. }) => ack,
                            _ => ProbeReply::Nack,
                        },
                        Err(_) => ProbeReply::Nack,
                    };
                    reply.respond(postcard::to_stdvec(&answer).expect("encodes"));
                });
            }
            ProbeMsg::Updates(updates) => {
                let actions = if self.left {
                    Vec::new()
                } else {
                    self.swim.on_updates(updates, now)
                };
                if let Some(r) = msg.reply {
                    r.respond(postcard::to_stdvec(&ProbeReply::Ok).expect("encodes"));
                }
                self.execute(actions);
            }
        }
    }

    async fn sync_from_gossip(&mut self) {
        /// What changed on one node since the last read.
        struct Seen {
            generation: u64,
            max_version: u64,
            addr: SocketAddr,
            incarnation: u64,
            left: bool,
            record: Option<(u64, String)>,
            load: Option<String>,
            /// Application keys with their versions; the value only where
            /// the version differs from the one already held.
            app: Vec<(String, u64, Option<Arc<str>>)>,
            /// Nothing but liveness fields are read: the node is unchanged.
            unchanged: bool,
        }
        let me = self.record.name.clone();
        let peers = &self.peers;
        let mut latest: HashMap<String, Seen> = HashMap::new();
        self.chitchat
            .with_chitchat(|c| {
                for (id, state) in c.node_states() {
                    if *id.node_id == *me {
                        continue;
                    }
                    if latest
                        .get(&*id.node_id)
                        .is_some_and(|s| s.generation >= id.generation_id)
                    {
                        continue;
                    }
                    let old = peers
                        .get(&*id.node_id)
                        .filter(|p| p.generation == id.generation_id);
                    let unchanged = old.is_some_and(|p| p.seen_version == state.max_version());
                    let app = if unchanged {
                        Vec::new()
                    } else {
                        state
                            .iter_prefix(APP_PREFIX)
                            .filter(|(_, v)| v.value.len() <= APP_VALUE_LEN_MAX)
                            .map(|(k, v)| {
                                let short = &k[APP_PREFIX.len()..];
                                let same =
                                    old.and_then(|p| p.app_versions.get(short)) == Some(&v.version);
                                let value = (!same).then(|| Arc::from(v.value.as_str()));
                                (short.to_string(), v.version, value)
                            })
                            .collect()
                    };
                    latest.insert(
                        id.node_id.to_string(),
                        Seen {
                            generation: id.generation_id,
                            max_version: state.max_version(),
                            addr: id.gossip_advertise_addr,
                            incarnation: state
                                .get(KEY_INCARNATION)
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0),
                            left: state.get(KEY_STATUS) == Some("left"),
                            record: state
                                .get_versioned(KEY_RECORD)
                                .filter(|_| !unchanged)
                                .map(|v| (v.version, v.value.clone())),
                            load: state
                                .get(KEY_LOAD)
                                .filter(|_| !unchanged)
                                .map(str::to_string),
                            app,
                            unchanged,
                        },
                    );
                }
            })
            .await;
        let now = Instant::now();
        for (name, seen) in latest {
            self.swim.observe(
                &name,
                seen.generation,
                seen.addr,
                seen.incarnation,
                seen.left,
                now,
            );
            if seen.unchanged {
                continue;
            }
            let fresh = || Peer {
                generation: seen.generation,
                seen_version: 0,
                record: None,
                load: Load::default(),
                app: Default::default(),
                app_versions: Default::default(),
            };
            let peer_name = name.clone();
            let peer = self.peers.entry(name).or_insert_with(fresh);
            if seen.generation > peer.generation {
                *peer = fresh();
            }
            if seen.generation == peer.generation {
                peer.seen_version = seen.max_version;
                if let Some((version, json)) = seen.record {
                    if peer.record.as_ref().is_none_or(|(v, _)| *v != version) {
                        match decode::<NodeRecord>(&json).map(|r| (r.validate(), r)) {
                            // A record must be valid and name its publisher.
                            Some((Ok(()), rec)) if rec.name == *peer_name => {
                                peer.record = Some((version, rec));
                            }
                            Some((Err(why), _)) => {
                                debug!(peer = %peer_name, %why, "invalid node record ignored");
                            }
                            _ => debug!(peer = %peer_name, "undecodable node record ignored"),
                        }
                    }
                }
                if let Some(load) = seen
                    .load
                    .as_deref()
                    .and_then(decode::<Load>)
                    .filter(Load::is_plausible)
                {
                    peer.load = load;
                }
                let changed = seen.app.len() != peer.app_versions.len()
                    || seen.app.iter().any(|(_, _, v)| v.is_some());
                if changed {
                    let mut app = std::collections::BTreeMap::new();
                    let mut versions = std::collections::BTreeMap::new();
                    for (key, version, value) in seen.app {
                        let value = match value {
                            Some(v) => v,
                            None => match peer.app.get(&key) {
                                Some(v) => v.clone(),
                                None => continue,
                            },
                        };
                        versions.insert(key.clone(), version);
                        app.insert(key, value);
                    }
                    peer.app = Arc::new(app);
                    peer.app_versions = versions;
                }
            }
        }
    }

    fn publish_view(&mut self) {
        let mut members = vec![Member {
            record: self.record.clone(),
            generation: self.generation,
            incarnation: self.swim.incarnation(),
            state: if self.left {
                NodeState::Left
            } else {
                NodeState::Alive
            },
            load: self.load,
            app: self.app.clone(),
        }];
        for m in self.swim.members() {
            let peer = self
                .peers
                .get(&m.name)
                .filter(|p| p.generation == m.generation);
            let record = peer
                .and_then(|p| p.record.as_ref().map(|(_, r)| r.clone()))
                .unwrap_or_else(|| NodeRecord {
                    name: m.name.clone(),
                    address: m.addr,
                    labels: Default::default(),
                    capacity: Default::default(),
                    drivers: Vec::new(),
                    version: String::new(),
                    http: None,
                    notes: Vec::new(),
                });
            members.push(Member {
                record,
                generation: m.generation,
                incarnation: m.incarnation,
                state: m.state,
                load: peer.map(|p| p.load).unwrap_or_default(),
                app: peer.map(|p| p.app.clone()).unwrap_or_default(),
            });
        }
        members.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        for m in &members {
            let now = (m.generation, m.state);
            if self.logged.get(&m.record.name) != Some(&now) {
                self.logged.insert(m.record.name.clone(), now);
                // at_unix_ms lets benchmarks time transitions from logs.
                let at_unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                info!(node = %m.record.name, generation = m.generation, state = %m.state.as_str(), at_unix_ms, "member state");
            }
        }
        self.logged
            .retain(|name, _| members.iter().any(|m| &m.record.name == name));
        let self_name = self.record.name.clone();
        self.view_tx.send_if_modified(|v| {
            if v.members == members && v.self_name == self_name {
                return false;
            }
            v.members = members;
            v.self_name = self_name;
            true
        });
    }
}
