//! [`Membership`]: the task that runs state gossip ([`crate::spread`]) and
//! the SWIM detector over a node's transport and publishes a
//! [`MembershipView`].
//!
//! Gossip carries each node's signed record, load, incarnation and
//! application keys; SWIM decides liveness and whom gossip talks to. The
//! state never leaves this task: callers talk to it by [`Command`]s and
//! read the view from a `watch` channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::run::{Run, Verdict};
use shoal_transport::sign::{PublicKey, Signer, CERT_LEN_MAX};
use shoal_transport::{take_inbox, Inbox, Incoming, Service, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::record::{AppState, Load, Member, MembershipView, NodeRecord, NodeState};
use crate::signed::{self, Origin, CERT_KEY};
use crate::spread::{self, RunId, Spread, SpreadConfig};
use crate::swim::{Action, ProbeMsg, ProbeOutcome, ProbeReply, Swim, SwimConfig};

const KEY_RECORD: &str = "record";
const KEY_LOAD: &str = "load";
const KEY_INCARNATION: &str = "inc";
const KEY_STATUS: &str = "status";
/// Prefix of application keys in gossip.
const APP_PREFIX: &str = "app/";

/// Longest application value, bytes: gossip sends a key-value pair whole,
/// so it must fit in one gossip message (64 KiB) with room to spare.
pub const APP_VALUE_LEN_MAX: usize = 48 * 1024;

/// Longest record or load value decoded from gossip, bytes.
const GOSSIP_VALUE_LEN_MAX: usize = 16 * 1024;

/// Most keys read from one node's gossip state: the core publishes a
/// bounded number (see `shoal_core::gossip`), far below this.
const PEER_KEYS_MAX: usize = 16 * 1024;

/// Most node states remembered as failing verification (at their gossip
/// version, so as not to check them again every sync until they change).
const REJECTED_MAX: usize = 1024;

/// Depth of the queues between the task and its probe workers and callers.
const QUEUE_LEN: usize = 4096;

/// Most certificate checks remembered (see `Actor::certs`).
const CERTS_MAX: usize = 1024;

/// Longest a certificate check is remembered.
const CERTS_TTL: Duration = Duration::from_secs(60);

/// Gossip is read, and the view published, at least this often even when
/// no change counter moved (time alone forgets runs past their retention).
const REREAD_AT_LEAST: Duration = Duration::from_secs(1);

/// Most node names whose runs are remembered (see `Actor::runs`); past it,
/// the finished runs are forgotten first.
const RUNS_MAX: usize = 64 * 1024;

/// How long a finished run is remembered (longer than gossip keeps a
/// dead node's state, SWIM's dead retention by default).
const RUNS_KEPT: Duration = Duration::from_secs(3600);

/// Most keys of a peer remembered as failing verification (see
/// `Peer::refused`); emptied when full.
const REFUSED_KEYS_MAX: usize = 1024;

/// Settings of the membership task.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Failure detector settings.
    pub swim: SwimConfig,
    /// State gossip settings (see [`crate::spread`]).
    pub spread: SpreadConfig,
    /// Cluster id (the cluster's CA is what keeps clusters apart).
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
            spread: SpreadConfig::default(),
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

/// Failure detection's counters since the agent started (for metrics).
#[derive(Debug, Default)]
pub struct SwimStats {
    /// Direct probes sent (pings).
    pub probes: AtomicU64,
    /// Indirect probes asked of relays (ping-reqs).
    pub indirect_probes: AtomicU64,
    /// Probes that got no ack in time.
    pub probe_failures: AtomicU64,
    /// Members this node saw become suspect.
    pub suspicions: AtomicU64,
    /// Times this node refuted a suspicion of itself.
    pub refutations: AtomicU64,
}

/// Handle to a running membership task.
pub struct Membership {
    cmd: mpsc::Sender<Command>,
    view: watch::Receiver<MembershipView>,
    /// The latest load and application keys to publish: a watch, so that
    /// the caller never waits for the membership task (it takes the
    /// newest value whenever it gets to it).
    load: watch::Sender<Load>,
    app: watch::Sender<AppValues>,
    stats: Arc<SwimStats>,
}

impl Membership {
    /// Starts gossip and failure detection for this node on `transport`,
    /// taking the gossip and probe queues out of `inbox`.
    pub async fn start<T: Transport>(
        transport: T,
        inbox: &mut Inbox,
        record: NodeRecord,
        generation: u64,
        signer: Signer,
        config: MembershipConfig,
    ) -> Result<Membership, MembershipError> {
        let gossip_rx = take_inbox(inbox, Service::Gossip)
            .ok_or_else(|| MembershipError::Gossip("gossip queue already taken".into()))?;
        let probe_rx = take_inbox(inbox, Service::Probe)
            .ok_or_else(|| MembershipError::Gossip("probe queue already taken".into()))?;
        let addr = record.address;
        let record_json = serde_json::to_string(&record).expect("record encodes");
        let origin = Origin {
            name: &record.name,
            generation,
            addr,
        };
        // Every write is signed with its counter, the certificate too, and
        // takes the next spread version: counter and version are equal, so
        // a reader can check how far the node wrote (see `believable`).
        let mut seq = 1u64;
        // The epoch first: a renewal between the two is then published
        // again at the first tick.
        let signer_epoch = signer.epoch();
        let cert = signed::encode_cert(&signer.certificate());
        let mut initial = vec![(
            CERT_KEY.to_string(),
            sign_value(&signer, origin, CERT_KEY, seq, Some(&cert)),
        )];
        for (key, value) in [
            (KEY_RECORD, record_json),
            (
                KEY_LOAD,
                serde_json::to_string(&Load::default()).expect("encodes"),
            ),
            (KEY_INCARNATION, "0".to_string()),
        ] {
            seq += 1;
            initial.push((
                key.to_string(),
                sign_value(&signer, origin, key, seq, Some(&value)),
            ));
        }
        let seed = generation
            ^ record
                .name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let swim = Swim::new(config.swim.clone(), &record.name, generation, addr, seed);
        let me = RunId {
            name: Arc::from(record.name.as_str()),
            generation,
            addr,
        };
        let mut spread = Spread::new(config.spread.clone(), me, seed, Instant::now());
        for (key, text) in &initial {
            spread.set(key, text);
        }
        debug_assert_eq!(spread.run(spread.me()).map(|s| s.max_version), Some(seq));
        let (replies_tx, replies_rx) = mpsc::channel(QUEUE_LEN);
        let (view_tx, view) = watch::channel(MembershipView::default());
        let (cmd, cmd_rx) = mpsc::channel(64);
        let (load_tx, load_rx) = watch::channel(Load::default());
        let (app_tx, app_rx) = watch::channel(AppValues::default());
        let (results_tx, results_rx) = mpsc::channel(QUEUE_LEN);
        let stats = Arc::new(SwimStats::default());
        let actor = Actor {
            stats: stats.clone(),
            transport,
            swim,
            spread,
            replies_tx,
            record,
            generation,
            signer,
            signer_epoch,
            seq,
            rejected: HashMap::new(),
            certs: HashMap::new(),
            certs_since: Instant::now(),
            runs: HashMap::new(),
            runs_at: None,
            gossip_read_at: None,
            view_dirty: true,
            view_at: None,
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
        tokio::spawn(actor.run(Inboxes {
            probe: probe_rx,
            gossip: gossip_rx,
            results: results_rx,
            replies: replies_rx,
            cmd: cmd_rx,
            load: load_rx,
            app: app_rx,
        }));
        Ok(Membership {
            cmd,
            view,
            load: load_tx,
            app: app_tx,
            stats,
        })
    }

    /// Failure detection's counters.
    pub fn stats(&self) -> Arc<SwimStats> {
        self.stats.clone()
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

/// What this node believes of a peer's run: only values that the peer
/// signed (see [`crate::signed`]).
struct Peer {
    generation: u64,
    addr: SocketAddr,
    /// the gossiped max version of the node when last read: unchanged means
    /// nothing to read again.
    seen_version: u64,
    /// The key of the peer's certificate, once one was checked.
    key: Option<PublicKey>,
    /// Per key read: the gossip version last read (so a value is checked
    /// once) and the highest write counter accepted (so no relay rolls it
    /// back).
    versions: std::collections::BTreeMap<String, (u64, u64)>,
    /// The peer's record, once a signed one was read: a peer without one
    /// is not believed to exist.
    record: Option<NodeRecord>,
    incarnation: u64,
    left: bool,
    load: Load,
    app: AppState,
    /// Keys whose value failed verification, at the gossip version
    /// checked (not checked again until it changes). Kept apart from
    /// `versions` so that they do not count toward [`PEER_KEYS_MAX`]; at
    /// most [`REFUSED_KEYS_MAX`].
    refused: HashMap<String, u64>,
}

impl Peer {
    fn refuse(&mut self, key: String, version: u64) {
        if self.refused.len() >= REFUSED_KEYS_MAX {
            self.refused.clear();
        }
        self.refused.insert(key, version);
    }

    fn new(generation: u64, addr: SocketAddr) -> Peer {
        Peer {
            generation,
            addr,
            seen_version: 0,
            key: None,
            versions: Default::default(),
            record: None,
            incarnation: 0,
            left: false,
            load: Load::default(),
            app: Default::default(),
            refused: HashMap::new(),
        }
    }
}

/// The published text of `key` = `value` (`None`: absent) as this node's
/// `seq`th write.
fn sign_value(
    signer: &Signer,
    origin: Origin<'_>,
    key: &str,
    seq: u64,
    value: Option<&str>,
) -> String {
    let sig = signer.sign(&signed::message(origin, key, seq, value));
    signed::encode(seq, &sig, value)
}

/// Whether a gossip key is one this layer reads.
fn read_key(key: &str) -> bool {
    matches!(
        key,
        CERT_KEY | KEY_RECORD | KEY_LOAD | KEY_INCARNATION | KEY_STATUS
    ) || key.starts_with(APP_PREFIX)
}

/// What the membership task reads from.
struct Inboxes {
    probe: mpsc::Receiver<Incoming>,
    gossip: mpsc::Receiver<Incoming>,
    results: mpsc::Receiver<(u64, ProbeOutcome)>,
    replies: mpsc::Receiver<(SocketAddr, spread::Reply)>,
    cmd: mpsc::Receiver<Command>,
    load: watch::Receiver<Load>,
    app: watch::Receiver<AppValues>,
}

struct Actor<T: Transport> {
    transport: T,
    swim: Swim,
    /// Every node's signed values, as gossiped (unverified: see `peers`).
    spread: Spread,
    /// Answers to the state gossip's requests.
    replies_tx: mpsc::Sender<(SocketAddr, spread::Reply)>,
    record: NodeRecord,
    generation: u64,
    /// Signs every value this node publishes.
    signer: Signer,
    /// The signer's epoch when its certificate was last published.
    signer_epoch: u64,
    /// This node's writes so far (the counter in each signed value).
    seq: u64,
    /// Node states that failed verification, at the gossip version
    /// checked: (name, generation, address) -> max version.
    rejected: HashMap<(String, u64, SocketAddr), u64>,
    /// Certificates checked, by (name, published text): the key, or why
    /// not. A forged node state usually carries a replayed certificate;
    /// checking it again for every forged run would cost a chain
    /// verification each (about 75 us). At most [`CERTS_MAX`]; emptied
    /// when the trusted CAs change.
    certs: CertCache,
    /// When `certs` was last emptied: at least every [`CERTS_TTL`], so that
    /// a certificate that expired stops verifying.
    certs_since: Instant,
    /// Per node name (this node's included): the newest run known, and
    /// since when it is not live. Names SWIM forgot stay, not live, for
    /// [`RUNS_KEPT`], so that a replay of a finished run is not believed
    /// again. At most [`RUNS_MAX`].
    runs: HashMap<String, (Run, Option<Instant>)>,
    /// SWIM's change counter when `runs` was last set.
    runs_at: Option<u64>,
    /// What gossip was last read at (spread's and SWIM's change counters,
    /// the signer's epoch) and when: reading it again with none of them
    /// moved finds nothing new, so it is skipped for up to
    /// [`REREAD_AT_LEAST`] (profiled at 50 idle agents: reading and
    /// publishing the view ten or more times a second for nothing was most
    /// of an idle agent's CPU, and grew with N).
    gossip_read_at: Option<((u64, u64, u64), Instant)>,
    /// The view must be published again: something it shows changed.
    view_dirty: bool,
    /// SWIM's change counter and this node's incarnation at the last
    /// published view, and when.
    view_at: Option<((u64, u64), Instant)>,
    load: Load,
    app: AppState,
    /// The application keys as published in gossip.
    app_published: std::collections::BTreeMap<String, String>,
    left: bool,
    published_incarnation: u64,
    peers: HashMap<String, Peer>,
    /// Last logged (generation, state) of each member, to log transitions.
    logged: HashMap<String, (u64, NodeState)>,
    view_tx: watch::Sender<MembershipView>,
    results_tx: mpsc::Sender<(u64, ProbeOutcome)>,
    stats: Arc<SwimStats>,
    config: MembershipConfig,
}

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    if s.len() > GOSSIP_VALUE_LEN_MAX {
        return None;
    }
    serde_json::from_str(s).ok()
}

/// Certificate checks remembered: (name, published text) -> key or why not.
type CertCache = HashMap<(String, String), Result<PublicKey, String>>;

/// The key of the certificate `text` (published under [`CERT_KEY`] at
/// `version` by the run `origin`): it must chain to a trusted CA, name the
/// node, and sign itself at that version. Chain checks are remembered in
/// `certs`.
fn certificate_key(
    signer: &Signer,
    certs: &mut CertCache,
    origin: Origin<'_>,
    version: u64,
    text: &str,
) -> Result<PublicKey, String> {
    let s = signed::parse(text).ok_or("unsigned certificate")?;
    if s.seq != version {
        return Err("certificate signed for another version".into());
    }
    let b64 = s.payload.ok_or("no certificate")?;
    let cache_key = (origin.name.to_string(), b64.to_string());
    let checked = match certs.get(&cache_key) {
        Some(known) => known.clone(),
        None => {
            let checked = signed::parse_cert(b64, CERT_LEN_MAX)
                .ok_or_else(|| "undecodable certificate".to_string())
                .and_then(|der| signer.check_certificate(origin.name, &der));
            if certs.len() >= CERTS_MAX {
                certs.clear();
            }
            certs.insert(cache_key, checked.clone());
            checked
        }
    };
    let key = checked?;
    if !key.verify(
        &signed::message(origin, CERT_KEY, s.seq, Some(b64)),
        &s.signature,
    ) {
        return Err("certificate entry not signed by its own key".into());
    }
    Ok(key)
}

/// Reads the changed `values` of `peer` (named `name`): its certificate
/// first, then each value its key signed with a write counter above the
/// one held. Anything else is ignored and counted in the log.
fn read_values(
    signer: &Signer,
    certs: &mut CertCache,
    name: &str,
    peer: &mut Peer,
    mut values: Vec<(String, u64, String)>,
    max_version: u64,
) {
    let origin = Origin {
        name,
        generation: peer.generation,
        addr: peer.addr,
    };
    if let Some(at) = values.iter().position(|(k, _, _)| k == CERT_KEY) {
        let (_, version, text) = values.swap_remove(at);
        let seq = signed::parse(&text).map_or(0, |s| s.seq);
        peer.versions.insert(CERT_KEY.to_string(), (version, seq));
        match certificate_key(signer, certs, origin, version, &text) {
            // A renewed or re-issued certificate has the same key; a node
            // gets a new key only with a new run (generation). Another key
            // within a run is a relay replaying a certificate of an earlier
            // run (still valid: found in review), which would make every
            // later value of the node fail to verify.
            Ok(key) if peer.key.as_ref().is_some_and(|held| *held != key) => {
                debug!(peer = %name, "certificate with another key within a run refused");
            }
            Ok(key) => peer.key = Some(key),
            Err(why) => debug!(peer = %name, %why, "certificate in gossip refused"),
        }
    }
    let Some(key) = peer.key.clone() else {
        // Nothing can be checked yet: read it all again once a
        // certificate is.
        return;
    };
    peer.seen_version = max_version;
    let mut refused = 0u32;
    for (k, version, text) in values {
        let held = peer.versions.get(&k).copied();
        let held_seq = held.map_or(0, |(_, seq)| seq);
        // A value's signed counter is its version: one moved to another
        // version is a relay's doing.
        let Some(s) = signed::parse(&text).filter(|s| s.seq == version) else {
            peer.refuse(k, version);
            refused += 1;
            continue;
        };
        if s.seq <= held_seq {
            // A relay replaying an older write (or the same one again):
            // not read again at this version. A key not held has no older
            // write (counters start at 1): junk.
            if held.is_some() {
                peer.versions.insert(k, (version, held_seq));
            } else {
                peer.refuse(k, version);
                refused += 1;
            }
            continue;
        }
        if !key.verify(&signed::message(origin, &k, s.seq, s.payload), &s.signature) {
            peer.refuse(k, version);
            refused += 1;
            continue;
        }
        // Only keys the node signed count toward its bound: junk a relay
        // adds under the node's name cannot crowd out its real keys.
        if held.is_none() && peer.versions.len() >= PEER_KEYS_MAX {
            refused += 1;
            continue;
        }
        peer.refused.remove(&k);
        peer.versions.insert(k.clone(), (version, s.seq));
        match k.as_str() {
            KEY_RECORD => match s.payload.and_then(decode::<NodeRecord>) {
                // A record must be valid and name its publisher.
                Some(rec) if rec.validate().is_ok() && rec.name == name => peer.record = Some(rec),
                _ => debug!(peer = %name, "invalid node record ignored"),
            },
            KEY_LOAD => {
                if let Some(load) = s
                    .payload
                    .and_then(decode::<Load>)
                    .filter(Load::is_plausible)
                {
                    peer.load = load;
                }
            }
            KEY_INCARNATION => {
                if let Some(inc) = s.payload.and_then(|p| p.parse().ok()) {
                    peer.incarnation = inc;
                }
            }
            KEY_STATUS => peer.left = s.payload == Some("left"),
            _ => {
                let short = &k[APP_PREFIX.len()..];
                let app = Arc::make_mut(&mut peer.app);
                match s.payload {
                    Some(v) if v.len() <= APP_VALUE_LEN_MAX => {
                        app.insert(short.to_string(), Arc::from(v));
                    }
                    _ => {
                        app.remove(short);
                    }
                }
            }
        }
    }
    if refused > 0 {
        debug!(peer = %name, refused, "gossip values without a valid signature ignored");
    }
}

impl<T: Transport> Actor<T> {
    async fn run(mut self, inboxes: Inboxes) {
        let Inboxes {
            probe: mut probe_rx,
            gossip: mut gossip_rx,
            results: mut results_rx,
            replies: mut replies_rx,
            cmd: mut cmd_rx,
            load: mut load_rx,
            app: mut app_rx,
        } = inboxes;
        let mut tick = tokio::time::interval(self.config.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sync = tokio::time::interval(self.config.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.sync_from_gossip();
        loop {
            tokio::select! {
                t = tick.tick() => {
                    let now = Instant::now();
                    // How late this tick fired: our own starvation.
                    self.swim.note_lag(now.saturating_duration_since(t.into_std()), now);
                    let actions = self.swim.tick(now);
                    self.execute(actions);
                    self.publish_incarnation();
                    self.publish_certificate();
                    self.spread_tick(now);
                    self.publish_view();
                }
                _ = sync.tick() => {
                    self.sync_from_gossip();
                    self.publish_view();
                }
                Some(msg) = gossip_rx.recv() => {
                    self.on_gossip_message(msg);
                }
                Some((from, mut reply)) = replies_rx.recv() => {
                    if reply.check(self.spread.config()).is_ok() {
                        match &mut reply {
                            spread::Reply::Deltas(deltas) | spread::Reply::Sync { deltas, .. } => {
                                deltas.retain(|d| self.believable(d));
                            }
                        }
                    }
                    let actions = self.spread.on_reply(from, reply, Instant::now());
                    self.execute_spread(actions);
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
                    self.set_signed(vec![(KEY_LOAD.to_string(), Some(json))]);
                    self.publish_view();
                }
                Ok(()) = app_rx.changed() => {
                    let wanted = app_rx.borrow_and_update().clone();
                    self.set_app(&wanted);
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
    }

    /// The state gossip's timers: its peers are the members SWIM holds
    /// alive or suspect (the seeds while there are none).
    fn spread_tick(&mut self, now: Instant) {
        let mut live: Vec<SocketAddr> = self
            .swim
            .members()
            .filter(|m| matches!(m.state, NodeState::Alive | NodeState::Suspect))
            .map(|m| m.addr)
            .collect();
        if live.is_empty() {
            live = self.config.seeds.clone();
        }
        let actions = self.spread.tick(now, &live);
        self.execute_spread(actions);
    }

    fn execute_spread(&self, actions: Vec<spread::Action>) {
        for action in actions {
            match action {
                spread::Action::Send { to, msg } => {
                    let Ok(body) = postcard::to_stdvec(&msg) else {
                        continue;
                    };
                    let t = self.transport.clone();
                    tokio::spawn(async move { t.send(to, Service::Gossip, body).await });
                }
                spread::Action::Request { to, msg } => {
                    let Ok(body) = postcard::to_stdvec(&msg) else {
                        continue;
                    };
                    let t = self.transport.clone();
                    let replies = self.replies_tx.clone();
                    let timeout = self.spread.config().pull_timeout;
                    tokio::spawn(async move {
                        if let Ok(bytes) = t.request(to, Service::Gossip, body, timeout).await {
                            if let Ok(reply) = postcard::from_bytes::<spread::Reply>(&bytes) {
                                // Full queue: the answer is dropped; notes
                                // and anti-entropy ask again.
                                let _ = replies.try_send((to, reply));
                            }
                        }
                    });
                }
            }
        }
    }

    fn on_gossip_message(&mut self, msg: Incoming) {
        let Ok(mut m) = postcard::from_bytes::<spread::Msg>(&msg.body) else {
            debug!(from = %msg.from, "dropped undecodable gossip message");
            return;
        };
        if m.check(self.spread.config()).is_ok() {
            if let spread::Msg::Push(deltas) = &mut m {
                deltas.retain(|d| self.believable(d));
            }
        }
        let (reply, actions) = self.spread.on_message(msg.from, m, Instant::now());
        if let (Some(r), Some(reply)) = (msg.reply, reply) {
            if let Ok(body) = postcard::to_stdvec(&reply) {
                r.respond(body);
            }
        }
        self.execute_spread(actions);
    }

    /// Whether the run's owner wrote what delta `d` brings: every entry
    /// newer than what is held must be signed by the run's key with its
    /// version as its counter, and the write at the delta's last version
    /// must be there (every honest delta carries it: see spread's checks).
    /// Without this a member could announce versions of another node's
    /// state that the node never wrote, or fill its run with junk, and
    /// every node it reached would then never take the node's real later
    /// writes (#11). Costs one signature check per new entry, about 70 us.
    fn believable(&mut self, d: &spread::Delta) -> bool {
        let held = self.spread.run(&d.run).map_or(0, |s| s.max_version);
        if d.to <= d.from || d.to <= held {
            // Brings nothing: the store ignores it.
            return true;
        }
        if !d.entries.iter().any(|e| e.version == d.to) {
            return false;
        }
        let origin = Origin {
            name: &d.run.name,
            generation: d.run.generation,
            addr: d.run.addr,
        };
        // The run's key: the believed one, else from the certificate in
        // this delta, else from the one held.
        let believed = self
            .peers
            .get(&*d.run.name)
            .filter(|p| p.generation == d.run.generation && p.addr == d.run.addr)
            .and_then(|p| p.key.clone());
        let key = match believed {
            Some(key) => key,
            None => {
                let cert = d
                    .entries
                    .iter()
                    .find(|e| &*e.key == CERT_KEY)
                    .map(|e| (e.version, e.text.to_string()))
                    .or_else(|| {
                        self.spread
                            .run(&d.run)
                            .and_then(|s| s.get(CERT_KEY))
                            .map(|(v, t)| (v, t.to_string()))
                    });
                let Some((version, text)) = cert else {
                    return false;
                };
                match certificate_key(&self.signer, &mut self.certs, origin, version, &text) {
                    Ok(key) => key,
                    Err(_) => return false,
                }
            }
        };
        for e in d.entries.iter().filter(|e| e.version > held) {
            let ok = if &*e.key == CERT_KEY {
                // A renewed certificate keeps the run's key.
                certificate_key(&self.signer, &mut self.certs, origin, e.version, &e.text)
                    .is_ok_and(|k| k == key)
            } else {
                signed::parse(&e.text).is_some_and(|s| {
                    s.seq == e.version
                        && key.verify(
                            &signed::message(origin, &e.key, s.seq, s.payload),
                            &s.signature,
                        )
                })
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Makes the published application keys equal `wanted`: deletes the keys
    /// it lacks, sets those that differ.
    fn set_app(&mut self, wanted: &std::collections::BTreeMap<String, String>) {
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
        // A key is never deleted: it is written as signed-absent (see
        // `crate::signed`), so that a relay cannot bring it back.
        let writes = stale
            .iter()
            .map(|k| (format!("{APP_PREFIX}{k}"), None))
            .chain(
                changed
                    .iter()
                    .map(|(k, v)| (format!("{APP_PREFIX}{k}"), Some(v.clone()))),
            )
            .collect();
        self.set_signed(writes);
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

    /// Publishes `writes` (key, value or `None` for absent), each signed
    /// as this node's next write.
    fn set_signed(&mut self, writes: Vec<(String, Option<String>)>) {
        self.view_dirty = true;
        let origin = Origin {
            name: &self.record.name,
            generation: self.generation,
            addr: self.record.address,
        };
        for (key, value) in writes {
            // One write per value change: a u64 does not run out.
            self.seq = self.seq.saturating_add(1);
            let text = sign_value(&self.signer, origin, &key, self.seq, value.as_deref());
            let version = self.spread.set(&key, &text);
            debug_assert_eq!(version, self.seq, "signed counter and spread version apart");
        }
    }

    /// Publishes this node's certificate again when it was renewed or
    /// re-issued by a CA rotation (same key: what it signed stays valid).
    fn publish_certificate(&mut self) {
        let epoch = self.signer.epoch();
        if epoch == self.signer_epoch {
            return;
        }
        self.signer_epoch = epoch;
        // The trusted CAs may have changed: what failed may verify now,
        // and what verified may not.
        self.rejected.clear();
        self.certs.clear();
        let cert = signed::encode_cert(&self.signer.certificate());
        // Every other value again after it, so that the certificate stays
        // the run's oldest write: a delta cut by size (oldest writes first)
        // for a node that does not hold the run then still carries it, and
        // the node can check the rest (found in review: after a renewal a
        // node whose state exceeds one message was unreadable to every node
        // that joined later). Once per renewal, a few weeks apart.
        let again: Vec<(String, Option<String>)> = self
            .spread
            .run(self.spread.me())
            .map(|state| {
                state
                    .iter()
                    .filter(|(k, _, _)| *k != CERT_KEY)
                    .filter_map(|(k, _, text)| {
                        let s = signed::parse(text)?;
                        Some((k.to_string(), s.payload.map(str::to_string)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.set_signed(vec![(CERT_KEY.to_string(), Some(cert))]);
        self.set_signed(again);
    }

    async fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        self.set_signed(vec![(KEY_STATUS.to_string(), Some("left".to_string()))]);
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

    fn publish_incarnation(&mut self) {
        let inc = self.swim.incarnation();
        if inc != self.published_incarnation {
            self.published_incarnation = inc;
            self.set_signed(vec![(KEY_INCARNATION.to_string(), Some(inc.to_string()))]);
            self.stats.refutations.fetch_add(1, Ordering::Relaxed);
            warn!(incarnation = inc, "refuted a suspicion of this node");
        }
    }

    fn execute(&self, actions: Vec<Action>) {
        for action in actions {
            let relayed = matches!(action, Action::PingReq { .. });
            match &action {
                Action::Ping { .. } => self.stats.probes.fetch_add(1, Ordering::Relaxed),
                Action::PingReq { .. } => {
                    self.stats.indirect_probes.fetch_add(1, Ordering::Relaxed)
                }
                Action::Broadcast { .. } => 0,
            };
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
                    let stats = self.stats.clone();
                    // A direct ack is the target's own word (its incarnation
                    // is believed) only from the node its certificate names.
                    let target = match &msg {
                        ProbeMsg::Ping { target, .. } => Some(target.clone()),
                        _ => None,
                    };
                    let body = postcard::to_stdvec(&msg).expect("encodes");
                    tokio::spawn(async move {
                        let answer = t
                            .request_answered(addr, Service::Probe, body, timeout)
                            .await;
                        let outcome = match answer {
                            Ok((_, answerer))
                                if !relayed && answerer.as_deref() != target.as_deref() =>
                            {
                                ProbeOutcome::Failed
                            }
                            Ok((bytes, _)) => match postcard::from_bytes::<ProbeReply>(&bytes) {
                                // Through a relay, an ack says only that the
                                // target answered: the generation and
                                // incarnation in it are the relay's word, not
                                // the target's (found in review: a relay could
                                // move a node to a made-up run, or raise its
                                // incarnation as if it had refuted).
                                Ok(ProbeReply::Ack { .. }) if relayed => ProbeOutcome::Ack {
                                    generation: 0,
                                    incarnation: 0,
                                },
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
                        if matches!(outcome, ProbeOutcome::Failed) {
                            stats.probe_failures.fetch_add(1, Ordering::Relaxed);
                        }
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
                if msg.peer.as_deref() != Some(from.0.as_str()) {
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
            ProbeMsg::Updates(mut updates) => {
                // A sender speaks for itself: it may say another node is
                // suspect or dead (SWIM's verdicts, refuted by that node),
                // always in its own name (`by`: distinct names count as
                // confirmations), and only a node itself may say it is
                // alive or has left.
                {
                    // No name (a transport that authenticates nobody): no
                    // update is taken.
                    let peer = msg.peer.as_deref().unwrap_or("");
                    let before = updates.len();
                    updates.retain(|u| {
                        u.by == peer
                            && (matches!(u.state, NodeState::Suspect | NodeState::Dead)
                                || u.name == peer)
                    });
                    if updates.len() != before {
                        warn!(from = %msg.from, %peer, dropped = before - updates.len(), "dropped membership updates sent in another node's name");
                    }
                }
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

    fn sync_from_gossip(&mut self) {
        /// What changed in one gossiped run since the last read.
        struct Seen {
            name: String,
            generation: u64,
            addr: SocketAddr,
            max_version: u64,
            /// Keys whose gossip version differs from the one last read:
            /// (key, version, text).
            values: Vec<(String, u64, String)>,
            /// The state is the one held and did not change.
            unchanged: bool,
        }
        if self.certs_since.elapsed() > CERTS_TTL {
            self.certs.clear();
            self.certs_since = Instant::now();
        }
        let read_at = (
            self.spread.changes(),
            self.swim.changes(),
            self.signer.epoch(),
        );
        if self
            .gossip_read_at
            .is_some_and(|(key, at)| key == read_at && at.elapsed() < REREAD_AT_LEAST)
        {
            return;
        }
        self.view_dirty = true;
        let me = self.record.name.clone();
        let peers = &self.peers;
        let rejected = &self.rejected;
        let runs = &self.runs;
        let mut all: Vec<Seen> = Vec::new();
        {
            {
                for (id, state) in self.spread.runs() {
                    let name = &*id.name;
                    if *name == *me {
                        continue;
                    }
                    let addr = id.addr;
                    let held = peers.get(name);
                    // An older run than the one believed is history, and
                    // the believed run at another address is not what the
                    // node signed: neither is read (nor copied) again.
                    if held.is_some_and(|p| {
                        id.generation < p.generation
                            || (id.generation == p.generation && addr != p.addr)
                    }) {
                        continue;
                    }
                    let held = held.filter(|p| p.generation == id.generation && p.addr == addr);
                    if held.is_none()
                        && rejected.get(&(name.to_string(), id.generation, addr))
                            == Some(&state.max_version)
                    {
                        continue;
                    }
                    // A run that is over (a newer one known, or dead, left
                    // or forgotten) is not brought back by a relay
                    // replaying its state.
                    if held.is_none()
                        && runs
                            .get(name)
                            .is_some_and(|(r, _)| r.verdict(id.generation, addr) == Verdict::Over)
                    {
                        continue;
                    }
                    let unchanged = held.is_some_and(|p| p.seen_version == state.max_version);
                    let values = if unchanged {
                        Vec::new()
                    } else {
                        state
                            .iter()
                            .filter(|(k, version, _)| {
                                read_key(k)
                                    && held.is_none_or(|p| {
                                        p.versions.get(*k).map(|(ver, _)| *ver) != Some(*version)
                                            && p.refused.get(*k) != Some(version)
                                    })
                            })
                            .take(PEER_KEYS_MAX)
                            .map(|(k, version, text)| (k.to_string(), version, text.to_string()))
                            .collect()
                    };
                    all.push(Seen {
                        name: name.to_string(),
                        generation: id.generation,
                        addr,
                        max_version: state.max_version,
                        values,
                        unchanged,
                    });
                }
            }
        }
        // Older runs first, so that a node's newest verified run wins.
        all.sort_by_key(|s| s.generation);
        let mut present = std::collections::HashSet::new();
        for seen in all {
            let held = self.peers.get(&seen.name);
            let same = held.is_some_and(|p| p.generation == seen.generation && p.addr == seen.addr);
            if same {
                let peer = self.peers.get_mut(&seen.name).expect("held");
                if !seen.unchanged {
                    read_values(
                        &self.signer,
                        &mut self.certs,
                        &seen.name,
                        peer,
                        seen.values,
                        seen.max_version,
                    );
                }
                present.insert(seen.name);
                continue;
            }
            // Another address for the run believed, or an older run: not
            // what the node signed.
            if held.is_some_and(|p| seen.generation <= p.generation) {
                continue;
            }
            // A new node or a new run of one: believed once its certificate
            // and its record verify.
            let mut peer = Peer::new(seen.generation, seen.addr);
            read_values(
                &self.signer,
                &mut self.certs,
                &seen.name,
                &mut peer,
                seen.values,
                seen.max_version,
            );
            if peer.record.is_some() {
                self.rejected
                    .remove(&(seen.name.clone(), seen.generation, seen.addr));
                present.insert(seen.name.clone());
                self.peers.insert(seen.name, peer);
            } else {
                if self.rejected.len() >= REJECTED_MAX {
                    self.rejected.clear();
                }
                self.rejected
                    .insert((seen.name, seen.generation, seen.addr), seen.max_version);
            }
        }
        // A node gossip no longer holds is forgotten (SWIM keeps its
        // verdict for its retention period).
        self.peers.retain(|name, _| present.contains(name));
        self.forget_runs();
        let now = Instant::now();
        for (name, peer) in &self.peers {
            self.swim.observe(
                name,
                peer.generation,
                peer.addr,
                peer.incarnation,
                peer.left,
                now,
            );
        }
        let read_at = (
            self.spread.changes(),
            self.swim.changes(),
            self.signer.epoch(),
        );
        self.gossip_read_at = Some((read_at, now));
    }

    /// Keeps `runs` (SWIM's verdict on each node's runs) up to date.
    fn share_liveness(&mut self) {
        // SWIM counts every change of a member, removals included.
        let at = self.swim.changes();
        self.stats
            .suspicions
            .store(self.swim.suspicions(), Ordering::Relaxed);
        if self.runs_at == Some(at) {
            return;
        }
        self.runs_at = Some(at);
        let now = Instant::now();
        let mut held: HashMap<String, Run> = self
            .swim
            .members()
            .map(|m| {
                let run = Run {
                    generation: m.generation,
                    addr: m.addr,
                    live: matches!(m.state, NodeState::Alive | NodeState::Suspect),
                };
                (m.name, run)
            })
            .collect();
        // This node's own run: its earlier runs are over.
        held.insert(
            self.record.name.clone(),
            Run {
                generation: self.generation,
                addr: self.record.address,
                live: true,
            },
        );
        for (name, (run, over_since)) in self.runs.iter_mut() {
            match held.remove(name) {
                // SWIM moves forward only; an older run it holds again is
                // not taken over the newer one remembered.
                Some(h) if h.generation >= run.generation => {
                    *over_since = if h.live {
                        None
                    } else {
                        over_since.or(Some(now))
                    };
                    *run = h;
                }
                Some(_) => {}
                None => {
                    run.live = false;
                    *over_since = over_since.or(Some(now));
                }
            }
        }
        for (name, run) in held {
            let over_since = (!run.live).then_some(now);
            self.runs.insert(name, (run, over_since));
        }
        self.runs.retain(|_, (_, over_since)| {
            over_since.is_none_or(|t| now.saturating_duration_since(t) < RUNS_KEPT)
        });
        if self.runs.len() > RUNS_MAX {
            self.runs.retain(|_, (run, _)| run.live);
        }
    }

    /// Forgets the gossiped state of runs that are over: superseded at
    /// once, dead or left after SWIM's retention (the same time SWIM keeps
    /// their verdict).
    fn forget_runs(&mut self) {
        let now = Instant::now();
        let retention = self.config.swim.dead_retention;
        let over: Vec<RunId> = self
            .spread
            .runs()
            .map(|(r, _)| r)
            .filter(|r| {
                self.runs.get(&*r.name).is_some_and(|(run, since)| {
                    run.verdict(r.generation, r.addr) == Verdict::Over
                        && (run.generation != r.generation
                            || run.addr != r.addr
                            || since.is_some_and(|t| now.saturating_duration_since(t) >= retention))
                })
            })
            .cloned()
            .collect();
        for r in over {
            self.spread.forget(&r);
        }
    }

    fn publish_view(&mut self) {
        let at = (self.swim.changes(), self.swim.incarnation());
        if !self.view_dirty
            && self
                .view_at
                .is_some_and(|(seen, when)| seen == at && when.elapsed() < REREAD_AT_LEAST)
        {
            return;
        }
        self.view_dirty = false;
        self.view_at = Some((at, Instant::now()));
        self.share_liveness();
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
                .and_then(|p| p.record.clone())
                .unwrap_or_else(|| NodeRecord::bare(&m.name, m.addr));
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_transport::tls::ClusterCa;

    fn record(name: &str, addr: SocketAddr) -> NodeRecord {
        NodeRecord {
            version: "t".into(),
            ..NodeRecord::bare(name, addr)
        }
    }

    fn signer(ca: &ClusterCa, name: &str) -> Signer {
        Signer::new(&ca.issue_node(name).unwrap()).unwrap()
    }

    /// `signer`'s certificate as `origin` publishes it under `cert`, at
    /// `version` (signed, with `version` as its counter).
    fn cert_value(signer: &Signer, origin: Origin<'_>, version: u64) -> (String, u64, String) {
        let cert = signed::encode_cert(&signer.certificate());
        (
            CERT_KEY.to_string(),
            version,
            sign_value(signer, origin, CERT_KEY, version, Some(&cert)),
        )
    }

    /// The published texts of `writes` by `signer` for `origin`, numbered
    /// from `seq`, with spread versions from `version`.
    fn published(
        signer: &Signer,
        origin: Origin<'_>,
        seq: u64,
        version: u64,
        writes: &[(&str, Option<&str>)],
    ) -> Vec<(String, u64, String)> {
        writes
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let n = i as u64;
                (
                    k.to_string(),
                    version + n,
                    sign_value(signer, origin, k, seq + n, *v),
                )
            })
            .collect()
    }

    #[test]
    fn only_values_the_node_signed_for_this_run_and_address_are_read() {
        let ca = ClusterCa::generate("c1").unwrap();
        let a = signer(&ca, "a");
        let m = signer(&ca, "m");
        let reader = signer(&ca, "r");
        let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let origin = Origin {
            name: "a",
            generation: 1,
            addr,
        };
        let rec = serde_json::to_string(&record("a", addr)).unwrap();
        let cert = cert_value(&a, origin, 1);

        // The node's own values, with its certificate: all read.
        let mut peer = Peer::new(1, addr);
        let mut values = vec![cert.clone()];
        values.extend(published(
            &a,
            origin,
            2,
            2,
            &[
                (KEY_RECORD, Some(&rec)),
                (KEY_INCARNATION, Some("3")),
                ("app/x", Some("one")),
                ("app/y", Some("two")),
            ],
        ));
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, values, 5);
        assert!(peer.record.is_some());
        assert_eq!(peer.incarnation, 3);
        assert_eq!(peer.app.get("x").map(|v| &**v), Some("one"));
        assert_eq!(peer.seen_version, 5);

        // A newer write replaces; a signed absence removes; a replay of
        // an older write (at a higher spread version) changes nothing.
        let newer = published(
            &a,
            origin,
            10,
            10,
            &[("app/x", Some("uno")), ("app/y", None)],
        );
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, newer, 11);
        assert_eq!(peer.app.get("x").map(|v| &**v), Some("uno"));
        assert_eq!(peer.app.get("y"), None);
        let replay = published(&a, origin, 3, 50, &[("app/x", Some("one"))]);
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, replay, 50);
        assert_eq!(peer.app.get("x").map(|v| &**v), Some("uno"));

        // Forgeries: another member's key; a's key for another run, another
        // address or another key; an unsigned value; a's own later write
        // moved to another version.
        let forged = [
            published(&m, origin, 60, 60, &[(KEY_STATUS, Some("left"))]),
            published(
                &a,
                Origin {
                    generation: 2,
                    ..origin
                },
                60,
                60,
                &[(KEY_STATUS, Some("left"))],
            ),
            published(
                &a,
                Origin {
                    addr: "127.0.0.9:7001".parse().unwrap(),
                    ..origin
                },
                60,
                60,
                &[(KEY_STATUS, Some("left"))],
            ),
            published(&a, origin, 60, 60, &[(KEY_LOAD, Some("left"))])
                .into_iter()
                .map(|(_, v, t)| (KEY_STATUS.to_string(), v, t))
                .collect(),
            vec![(KEY_STATUS.to_string(), 60, "left".to_string())],
            vec![(KEY_INCARNATION.to_string(), 61, "1.AAAA.=99".to_string())],
            published(&a, origin, 60, 61, &[(KEY_STATUS, Some("left"))]),
        ];
        for values in forged {
            read_values(&reader, &mut CertCache::new(), "a", &mut peer, values, 61);
            assert!(!peer.left);
            assert_eq!(peer.incarnation, 3);
        }
        // Junk under a key the node never wrote is remembered as refused
        // (not read again at that version) and does not count towards the
        // node's keys.
        let keys = peer.versions.len();
        let junk = published(&m, origin, 62, 62, &[("app/junk", Some("x"))]);
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, junk, 62);
        assert_eq!(peer.versions.len(), keys);
        assert_eq!(peer.refused.get("app/junk"), Some(&62));
        // Counter 0 under a key not held: no earlier write to replay.
        let zero = vec![("app/zero".to_string(), 63, "0.AAAA.=x".to_string())];
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, zero, 63);
        assert_eq!(peer.versions.len(), keys);
        assert_eq!(peer.refused.get("app/zero"), Some(&63));
        assert!(!peer.app.contains_key("junk"));
        // The node's own word is still taken after all that.
        read_values(
            &reader,
            &mut CertCache::new(),
            "a",
            &mut peer,
            published(&a, origin, 70, 70, &[(KEY_STATUS, Some("left"))]),
            70,
        );
        assert!(peer.left);
    }

    #[test]
    fn a_replayed_certificate_of_an_earlier_run_does_not_replace_the_key() {
        let ca = ClusterCa::generate("c1").unwrap();
        let reader = signer(&ca, "r");
        let earlier = signer(&ca, "a");
        let a = signer(&ca, "a");
        let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let origin = Origin {
            name: "a",
            generation: 2,
            addr,
        };
        let rec = serde_json::to_string(&record("a", addr)).unwrap();
        let mut peer = Peer::new(2, addr);
        let mut values = vec![cert_value(&a, origin, 1)];
        values.extend(published(&a, origin, 2, 2, &[(KEY_RECORD, Some(&rec))]));
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, values, 2);
        assert!(peer.record.is_some());
        // A relay puts the (still valid) certificate of a's earlier run,
        // another key, at a higher version: a's own later writes still count.
        let replay = vec![cert_value(&earlier, origin, 10)];
        read_values(&reader, &mut CertCache::new(), "a", &mut peer, replay, 10);
        read_values(
            &reader,
            &mut CertCache::new(),
            "a",
            &mut peer,
            published(&a, origin, 11, 11, &[(KEY_INCARNATION, Some("4"))]),
            11,
        );
        assert_eq!(peer.incarnation, 4);
    }

    #[test]
    fn a_certificate_of_another_name_or_cluster_makes_nothing_readable() {
        let ca = ClusterCa::generate("c1").unwrap();
        let reader = signer(&ca, "r");
        let m = signer(&ca, "m");
        let other =
            Signer::new(&ClusterCa::generate("c2").unwrap().issue_node("a").unwrap()).unwrap();
        let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let origin = Origin {
            name: "a",
            generation: 1,
            addr,
        };
        let rec = serde_json::to_string(&record("a", addr)).unwrap();
        for signer in [&m, &other] {
            let mut peer = Peer::new(1, addr);
            let mut values = vec![cert_value(signer, origin, 1)];
            values.extend(published(signer, origin, 2, 2, &[(KEY_RECORD, Some(&rec))]));
            read_values(&reader, &mut CertCache::new(), "a", &mut peer, values, 2);
            assert!(peer.key.is_none());
            assert!(peer.record.is_none());
            // Left to be read again once a valid certificate comes.
            assert_eq!(peer.seen_version, 0);
        }
    }
}
