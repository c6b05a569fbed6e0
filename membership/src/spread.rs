//! [`Spread`]: every node's versioned key-value state (its certificate,
//! record, load, incarnation and application keys), copied to every node at
//! a cost per node that does not grow with the cluster. A pure state
//! machine like [`crate::swim`]: time, randomness and the live peers are
//! passed in, messages to send are returned.
//!
//! Each run of a node (name, generation, address) owns its keys; each write
//! takes the run's next version, and a key holds only its newest write.
//! "Every key whose version is in (a, b]" is then a complete change set,
//! so one number per run says what a node holds (scuttlebutt's digest).
//!
//! Three paths move state, each paid only when it has something to say:
//!
//! - **Notes** (lazy push). A run's new version is announced in a note of
//!   about 40 bytes, sent to [`SpreadConfig::fanout`] random live peers each
//!   [`SpreadConfig::notes_interval`] while it has transmissions left:
//!   [`SpreadConfig::retransmit_mult`] times ⌈log10(N+1)⌉, memberlist's
//!   budget, enough for every node to hear it with high probability. A node
//!   that lacks what a note announces pulls it from the announcer (one
//!   request, the delta since its own version, so a missed note is repaired
//!   by the next), then announces it in turn. A change thus costs each node
//!   its size once, plus a few notes; an idle cluster sends no notes at all.
//! - **Pulls** answer notes: a node asks for the runs it is behind on, from
//!   the version it holds, and gets the deltas.
//! - **Sync** (anti-entropy). Each node sends one random peer its digest
//!   (one version per run, in pages of [`SpreadConfig::digest_max`]) every
//!   [`SpreadConfig::sync_per_node`] × the runs in a page (at least
//!   `sync_min`): a page grows with N and the interval with it, so its cost
//!   per node per second is flat. The peer answers with what the asker lacks and the list of
//!   runs it is itself behind on, which the asker pushes. This repairs what
//!   notes missed (a partition, a lost pull) and brings a joining node the
//!   whole state; while a sync brings anything new it runs every `sync_min`.
//!
//! Nothing here checks signatures: a reader must believe only values the
//! run signed (see [`crate::signed`]), as the membership task does (see
//! ARCHITECTURE.md, "State gossip whose cost per node is flat").

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Longest node name accepted in a message, bytes.
pub const NAME_LEN_MAX: usize = 255;
/// Longest key, bytes.
pub const KEY_LEN_MAX: usize = 256;
/// Longest value, bytes: the largest application value (48 KiB) signed.
pub const TEXT_LEN_MAX: usize = 64 * 1024;

/// Settings: the defaults suit a LAN.
#[derive(Debug, Clone)]
pub struct SpreadConfig {
    /// How often queued notes go out.
    pub notes_interval: Duration,
    /// Peers sent notes each round.
    pub fanout: usize,
    /// Transmissions of a note: this times ⌈log10(N+1)⌉.
    pub retransmit_mult: u32,
    /// Anti-entropy interval per known run.
    pub sync_per_node: Duration,
    /// Shortest anti-entropy interval (and the interval while catching up).
    pub sync_min: Duration,
    /// Longest anti-entropy interval.
    pub sync_max: Duration,
    /// A pull not answered in this time may be asked of another announcer.
    pub pull_timeout: Duration,
    /// Largest message built, bytes (below the transport's frame limit).
    pub message_bytes_max: usize,
    /// Most runs held; past it new runs are ignored.
    pub runs_max: usize,
    /// Most keys held per run; past it new keys of the run are ignored.
    pub keys_max: usize,
    /// Most runs per digest page, notes per message and runs per pull.
    pub digest_max: usize,
}

impl Default for SpreadConfig {
    fn default() -> Self {
        SpreadConfig {
            notes_interval: Duration::from_millis(100),
            fanout: 3,
            retransmit_mult: 4,
            sync_per_node: Duration::from_millis(50),
            sync_min: Duration::from_secs(1),
            sync_max: Duration::from_secs(3600),
            pull_timeout: Duration::from_secs(1),
            message_bytes_max: 1024 * 1024,
            runs_max: 16 * 1024,
            keys_max: 16 * 1024,
            digest_max: 4096,
        }
    }
}

/// One run of a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunId {
    /// Node name.
    pub name: Arc<str>,
    /// Generation (a new one per start).
    pub generation: u64,
    /// Address.
    pub addr: SocketAddr,
}

/// One key's newest write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Key.
    pub key: Arc<str>,
    /// The run's version at this write.
    pub version: u64,
    /// Value.
    pub text: Arc<str>,
}

/// The writes of `run` whose version is in (`from`, `to`]: all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Whose.
    pub run: RunId,
    /// Exclusive lower bound.
    pub from: u64,
    /// Inclusive upper bound.
    pub to: u64,
    /// The keys written in that range, at their newest write.
    pub entries: Vec<Entry>,
}

/// `run` is at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// Whose.
    pub run: RunId,
    /// Its version.
    pub version: u64,
}

/// Messages (postcard on the gossip service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// One-way: these runs reached these versions.
    Notes(Vec<Note>),
    /// Request: what I lack of these runs, from the version I hold.
    Pull(Vec<(RunId, u64)>),
    /// Request: my digest of the runs after `after`, up to and including
    /// `last` (`None`: to the end).
    Sync {
        /// Exclusive lower bound of the page.
        after: Option<RunId>,
        /// Inclusive upper bound of the page.
        last: Option<RunId>,
        /// The version held of each run in the page.
        digest: Vec<(RunId, u64)>,
    },
    /// One-way: what the sync answer said its sender lacks.
    Push(Vec<Delta>),
}

/// Answers to requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// To a pull.
    Deltas(Vec<Delta>),
    /// To a sync: what the asker lacks, and where the answerer is behind.
    Sync {
        /// What the asker lacks.
        deltas: Vec<Delta>,
        /// Runs of the page the answerer is behind on, at its version.
        behind: Vec<(RunId, u64)>,
    },
}

impl Msg {
    /// Whether every length and count is within bounds (checked on every
    /// message from a peer before anything else reads it).
    pub fn check(&self, config: &SpreadConfig) -> Result<(), &'static str> {
        match self {
            Msg::Notes(notes) => {
                bounded(notes.len(), config.digest_max)?;
                notes.iter().try_for_each(|n| check_run(&n.run))
            }
            Msg::Pull(wants) => {
                bounded(wants.len(), config.digest_max)?;
                wants.iter().try_for_each(|(r, _)| check_run(r))
            }
            Msg::Sync {
                after,
                last,
                digest,
            } => {
                bounded(digest.len(), config.digest_max)?;
                after.iter().chain(last).try_for_each(check_run)?;
                digest.iter().try_for_each(|(r, _)| check_run(r))
            }
            Msg::Push(deltas) => check_deltas(deltas, config),
        }
    }
}

impl Reply {
    /// Whether every length and count is within bounds.
    pub fn check(&self, config: &SpreadConfig) -> Result<(), &'static str> {
        match self {
            Reply::Deltas(deltas) => check_deltas(deltas, config),
            Reply::Sync { deltas, behind } => {
                bounded(behind.len(), config.digest_max)?;
                behind.iter().try_for_each(|(r, _)| check_run(r))?;
                check_deltas(deltas, config)
            }
        }
    }
}

fn bounded(n: usize, max: usize) -> Result<(), &'static str> {
    if n > max {
        return Err("too many items");
    }
    Ok(())
}

fn check_run(run: &RunId) -> Result<(), &'static str> {
    if run.name.is_empty() || run.name.len() > NAME_LEN_MAX {
        return Err("bad node name length");
    }
    Ok(())
}

fn check_deltas(deltas: &[Delta], config: &SpreadConfig) -> Result<(), &'static str> {
    bounded(deltas.len(), config.digest_max)?;
    for d in deltas {
        check_run(&d.run)?;
        bounded(d.entries.len(), config.keys_max)?;
        if d.to < d.from {
            return Err("delta ends before it starts");
        }
        // The write at a delta's last version is the newest of its key, so
        // an honest delta always carries it: a reader that checks it (the
        // membership task checks its signature and that its signed counter
        // is that version) knows the run's owner wrote that far.
        if d.to > d.from && !d.entries.iter().any(|e| e.version == d.to) {
            return Err("delta without the write at its last version");
        }
        for e in &d.entries {
            if e.key.len() > KEY_LEN_MAX || e.text.len() > TEXT_LEN_MAX {
                return Err("entry too long");
            }
            if e.version <= d.from || e.version > d.to {
                return Err("entry outside its delta's range");
            }
        }
    }
    Ok(())
}

/// Bytes an entry takes in a message, near enough to bound messages.
fn entry_bytes(key: &str, text: &str) -> usize {
    key.len() + text.len() + 24
}

fn run_bytes(run: &RunId) -> usize {
    run.name.len() + 40
}

/// A key's version and value.
type Written = (u64, Arc<str>);

/// What a node holds of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunState {
    /// Every write up to this version is held.
    pub max_version: u64,
    keys: BTreeMap<Arc<str>, Written>,
}

impl RunState {
    /// Each key with its version and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, &str)> {
        self.keys.iter().map(|(k, (v, t))| (&**k, *v, &**t))
    }

    /// One key's version and value.
    pub fn get(&self, key: &str) -> Option<(u64, &str)> {
        self.keys.get(key).map(|(v, t)| (*v, &**t))
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The writes after `from`, oldest first, within `budget` bytes (at
    /// least one write when any): `to` is where the writes taken end, so
    /// the delta stays complete however it is cut.
    fn delta(&self, run: &RunId, from: u64, budget: &mut usize) -> Option<Delta> {
        if self.max_version <= from {
            return None;
        }
        let mut newer: Vec<(&Arc<str>, &Written)> =
            self.keys.iter().filter(|(_, (v, _))| *v > from).collect();
        newer.sort_by_key(|(_, (v, _))| *v);
        let mut entries = Vec::new();
        let mut to = self.max_version;
        for (k, (v, t)) in newer {
            let bytes = entry_bytes(k, t);
            if bytes > *budget && !entries.is_empty() {
                to = entries.last().map_or(from, |e: &Entry| e.version);
                break;
            }
            *budget = budget.saturating_sub(bytes);
            entries.push(Entry {
                key: k.clone(),
                version: *v,
                text: t.clone(),
            });
        }
        Some(Delta {
            run: run.clone(),
            from,
            to,
            entries,
        })
    }
}

/// What applying a delta came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The run moved to a newer version.
    Advanced,
    /// Nothing new.
    Nothing,
    /// The delta starts past what is held (at this version).
    Gap(u64),
    /// Refused: an older generation, this node's own run, or a bound.
    Refused,
}

/// Work for the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send one-way.
    Send {
        /// To.
        to: SocketAddr,
        /// What.
        msg: Msg,
    },
    /// Send as a request; hand the reply to [`Spread::on_reply`].
    Request {
        /// To.
        to: SocketAddr,
        /// What.
        msg: Msg,
    },
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    version: u64,
    left: u32,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpreadStats {
    /// Deltas that moved a run forward.
    pub applied: u64,
    /// Deltas refused (bounds, older generations).
    pub refused: u64,
    /// Pulls sent.
    pub pulls: u64,
    /// Syncs sent.
    pub syncs: u64,
}

/// The state machine.
pub struct Spread {
    config: SpreadConfig,
    me: RunId,
    /// Every run held, this node's own included. A persistent map: cloning
    /// it (for a snapshot, or for many simulated nodes) shares structure.
    runs: imbl::OrdMap<RunId, Arc<RunState>>,
    /// Notes still to send, one per run.
    queue: BTreeMap<RunId, Queued>,
    /// Runs pulled and not yet answered: the version wanted, and until when.
    pulling: HashMap<RunId, (u64, Instant)>,
    rng: StdRng,
    next_notes: Instant,
    next_sync: Instant,
    /// The last run of the previous sync page (`None`: start over).
    cursor: Option<RunId>,
    /// Syncs run at `sync_min` while they bring anything new.
    catching_up: bool,
    stats: SpreadStats,
    /// Counts every change of what is held (see [`Spread::changes`]).
    changes: u64,
}

impl Spread {
    /// A node's state machine; its first sync goes out at the first tick.
    pub fn new(config: SpreadConfig, me: RunId, seed: u64, now: Instant) -> Spread {
        let mut runs = imbl::OrdMap::new();
        runs.insert(me.clone(), Arc::new(RunState::default()));
        Spread {
            config,
            me,
            runs,
            queue: BTreeMap::new(),
            pulling: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            next_notes: now,
            next_sync: now,
            cursor: None,
            catching_up: true,
            stats: SpreadStats::default(),
            changes: 0,
        }
    }

    /// Takes `runs` as what this node holds (its own run kept as it is), as
    /// after a long quiet period: for simulations that start converged.
    pub fn adopt(&mut self, mut runs: imbl::OrdMap<RunId, Arc<RunState>>) {
        if let Some(mine) = self.runs.get(&self.me) {
            runs.insert(self.me.clone(), mine.clone());
        }
        self.runs = runs;
        self.queue.clear();
        self.pulling.clear();
        self.catching_up = false;
        self.changes = self.changes.wrapping_add(1);
    }

    /// A counter that moves whenever what is held changes (a write, a run
    /// advanced, taken or forgotten): a reader that saw the same count
    /// has nothing new to read.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// This node's run.
    pub fn me(&self) -> &RunId {
        &self.me
    }

    /// Settings.
    pub fn config(&self) -> &SpreadConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> SpreadStats {
        self.stats
    }

    /// Every run held, this node's own included.
    pub fn runs(&self) -> impl Iterator<Item = (&RunId, &RunState)> {
        self.runs.iter().map(|(r, s)| (r, &**s))
    }

    /// One run.
    pub fn run(&self, run: &RunId) -> Option<&RunState> {
        self.runs.get(run).map(|s| &**s)
    }

    /// Runs held.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Never: this node's own run is always held.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Notes still queued.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Transmissions of each note at the current cluster size.
    pub fn retransmits(&self) -> u32 {
        let n = self.runs.len() as f64 + 1.0;
        self.config
            .retransmit_mult
            .saturating_mul(n.log10().ceil().max(1.0) as u32)
    }

    /// Anti-entropy interval at the current cluster size: proportional to
    /// the runs in one digest page, so that digest bytes per second stay
    /// the same whatever the size.
    pub fn sync_interval(&self) -> Duration {
        let n = self.runs.len().min(self.config.digest_max);
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.config
            .sync_per_node
            .saturating_mul(n)
            .clamp(self.config.sync_min, self.config.sync_max)
    }

    /// Writes `key` = `text` as this run's next version; returns it.
    pub fn set(&mut self, key: &str, text: &str) -> u64 {
        let state = Arc::make_mut(self.runs.entry(self.me.clone()).or_default());
        let version = state.max_version.saturating_add(1);
        state.max_version = version;
        state
            .keys
            .insert(Arc::from(key), (version, Arc::from(text)));
        let left = self.retransmits();
        self.queue.insert(self.me.clone(), Queued { version, left });
        self.changes = self.changes.wrapping_add(1);
        version
    }

    /// Forgets a run (its node is gone for good); a newer run of the name
    /// is still taken.
    pub fn forget(&mut self, run: &RunId) {
        if *run == self.me {
            return;
        }
        if self.runs.remove(run).is_some() {
            self.changes = self.changes.wrapping_add(1);
        }
        self.queue.remove(run);
        self.pulling.remove(run);
    }

    fn version_of(&self, run: &RunId) -> u64 {
        self.runs.get(run).map_or(0, |s| s.max_version)
    }

    /// A newer run of the same name is held: this one is history.
    fn below_floor(&self, run: &RunId) -> bool {
        let start = RunId {
            name: run.name.clone(),
            generation: run.generation.saturating_add(1),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        self.runs
            .range(start..)
            .next()
            .is_some_and(|(r, _)| r.name == run.name)
    }

    /// Applies one delta from a peer.
    pub fn apply(&mut self, delta: Delta) -> Applied {
        if delta.run == self.me || self.below_floor(&delta.run) {
            self.stats.refused += 1;
            return Applied::Refused;
        }
        let held = self.runs.get(&delta.run).map(|s| s.max_version);
        match held {
            None if delta.from > 0 => return Applied::Gap(0),
            None if self.runs.len() >= self.config.runs_max => {
                self.stats.refused += 1;
                return Applied::Refused;
            }
            Some(v) if delta.from > v => return Applied::Gap(v),
            Some(v) if delta.to <= v => return Applied::Nothing,
            _ => {}
        }
        if delta.to == 0 {
            return Applied::Nothing;
        }
        let keys_max = self.config.keys_max;
        let state = Arc::make_mut(self.runs.entry(delta.run.clone()).or_default());
        let before = state.max_version;
        for e in delta.entries {
            if e.version <= before {
                continue;
            }
            let room = state.keys.len() < keys_max;
            match state.keys.get_mut(&e.key) {
                Some(held) if held.0 < e.version => *held = (e.version, e.text),
                Some(_) => {}
                None if room => {
                    state.keys.insert(e.key, (e.version, e.text));
                }
                None => {}
            }
        }
        state.max_version = delta.to;
        if held.is_none() {
            self.new_run(&delta.run);
        }
        self.stats.applied += 1;
        self.changes = self.changes.wrapping_add(1);
        Applied::Advanced
    }

    /// A run newly held: older runs of its name are history.
    fn new_run(&mut self, run: &RunId) {
        let start = RunId {
            name: run.name.clone(),
            generation: 0,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let older: Vec<RunId> = self
            .runs
            .range(start..)
            .map(|(r, _)| r)
            .take_while(|r| r.name == run.name && r.generation < run.generation)
            .cloned()
            .collect();
        for r in older {
            self.forget(&r);
        }
    }

    fn queue_note(&mut self, run: &RunId) {
        let version = self.version_of(run);
        let left = self.retransmits();
        if self.queue.get(run).is_none_or(|q| q.version <= version) {
            self.queue.insert(run.clone(), Queued { version, left });
        }
    }

    /// Timers: notes and anti-entropy. `live` are the peers to talk to (the
    /// seeds when no peer is known); this node's own address is skipped.
    pub fn tick(&mut self, now: Instant, live: &[SocketAddr]) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.pulling.is_empty() {
            self.pulling.retain(|_, (_, until)| *until > now);
        }
        if now >= self.next_notes {
            self.next_notes = now + self.config.notes_interval;
            if !self.queue.is_empty() {
                let targets = self.pick(live, self.config.fanout);
                self.send_notes(targets, &mut actions);
            }
        }
        if now >= self.next_sync {
            let interval = if self.catching_up {
                self.config.sync_min
            } else {
                self.sync_interval()
            };
            // Jitter of ±10%, so that nodes do not sync in lockstep.
            let jitter = self.rng.random_range(0.9..1.1);
            self.next_sync = now + interval.mul_f64(jitter);
            if let Some(to) = self.pick(live, 1).pop() {
                let msg = self.sync_page();
                self.stats.syncs += 1;
                actions.push(Action::Request { to, msg });
            }
        }
        actions
    }

    /// Up to `k` distinct random peers of `live`, never this node.
    fn pick(&mut self, live: &[SocketAddr], k: usize) -> Vec<SocketAddr> {
        let n = live.len();
        let amount = (k + 1).min(n);
        let mut chosen: Vec<SocketAddr> = rand::seq::index::sample(&mut self.rng, n, amount)
            .into_iter()
            .map(|i| live[i])
            .filter(|a| *a != self.me.addr)
            .collect();
        chosen.truncate(k);
        chosen
    }

    fn send_notes(&mut self, targets: Vec<SocketAddr>, actions: &mut Vec<Action>) {
        // The notes with the most transmissions left first.
        let mut order: Vec<(RunId, u32)> = self
            .queue
            .iter()
            .map(|(r, q)| (r.clone(), q.left))
            .collect();
        order.sort_by_key(|q| std::cmp::Reverse(q.1));
        for to in targets {
            let mut notes = Vec::new();
            let mut bytes = 0usize;
            for (run, _) in &order {
                let Some(q) = self.queue.get_mut(run) else {
                    continue;
                };
                if q.left == 0 {
                    continue;
                }
                bytes += run_bytes(run);
                if notes.len() >= self.config.digest_max || bytes > self.config.message_bytes_max {
                    break;
                }
                q.left -= 1;
                notes.push(Note {
                    run: run.clone(),
                    version: q.version,
                });
            }
            if !notes.is_empty() {
                actions.push(Action::Send {
                    to,
                    msg: Msg::Notes(notes),
                });
            }
        }
        self.queue.retain(|_, q| q.left > 0);
    }

    fn sync_page(&mut self) -> Msg {
        let after = self.cursor.take();
        let mut digest = Vec::new();
        let mut range = match &after {
            Some(a) => self
                .runs
                .range::<_, RunId>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.runs.range::<_, RunId>(..),
        };
        let mut more = false;
        for (run, state) in range.by_ref() {
            if digest.len() >= self.config.digest_max {
                more = true;
                break;
            }
            digest.push((run.clone(), state.max_version));
        }
        let last = if more {
            digest.last().map(|(r, _)| r.clone())
        } else {
            None
        };
        self.cursor = last.clone();
        Msg::Sync {
            after,
            last,
            digest,
        }
    }

    /// A message from `from`: the answer if it was a request, and work.
    pub fn on_message(
        &mut self,
        from: SocketAddr,
        msg: Msg,
        now: Instant,
    ) -> (Option<Reply>, Vec<Action>) {
        if msg.check(&self.config).is_err() {
            self.stats.refused += 1;
            return (None, Vec::new());
        }
        match msg {
            Msg::Notes(notes) => (None, self.on_notes(from, notes, now)),
            Msg::Pull(wants) => (Some(Reply::Deltas(self.deltas_for(wants))), Vec::new()),
            Msg::Sync {
                after,
                last,
                digest,
            } => (Some(self.on_sync(after, last, digest)), Vec::new()),
            Msg::Push(deltas) => {
                for d in deltas {
                    self.apply(d);
                }
                (None, Vec::new())
            }
        }
    }

    /// What a peer holding each run at the given version lacks, within one
    /// message.
    fn deltas_for(&self, wants: Vec<(RunId, u64)>) -> Vec<Delta> {
        let mut budget = self.config.message_bytes_max;
        let mut deltas = Vec::new();
        for (run, have) in wants {
            if budget == 0 {
                break;
            }
            if let Some(d) = self
                .runs
                .get(&run)
                .and_then(|state| state.delta(&run, have, &mut budget))
            {
                deltas.push(d);
            }
        }
        deltas
    }

    fn on_notes(&mut self, from: SocketAddr, notes: Vec<Note>, now: Instant) -> Vec<Action> {
        let mut wants = Vec::new();
        for note in notes {
            if note.run == self.me || self.below_floor(&note.run) {
                continue;
            }
            let have = self.version_of(&note.run);
            if note.version <= have {
                continue;
            }
            if self
                .pulling
                .get(&note.run)
                .is_some_and(|(wanted, until)| *wanted >= note.version && *until > now)
            {
                continue;
            }
            if !self.runs.contains_key(&note.run) && self.runs.len() >= self.config.runs_max {
                continue;
            }
            self.pulling.insert(
                note.run.clone(),
                (note.version, now + self.config.pull_timeout),
            );
            wants.push((note.run, have));
        }
        if wants.is_empty() {
            return Vec::new();
        }
        self.stats.pulls += 1;
        vec![Action::Request {
            to: from,
            msg: Msg::Pull(wants),
        }]
    }

    fn on_sync(
        &mut self,
        after: Option<RunId>,
        last: Option<RunId>,
        digest: Vec<(RunId, u64)>,
    ) -> Reply {
        let theirs: HashMap<&RunId, u64> = digest.iter().map(|(r, v)| (r, *v)).collect();
        let lower = match &after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let upper = match &last {
            Some(l) => std::ops::Bound::Included(l),
            None => std::ops::Bound::Unbounded,
        };
        let mut budget = self.config.message_bytes_max;
        let mut deltas = Vec::new();
        for (run, state) in self.runs.range::<_, RunId>((lower, upper)) {
            if budget == 0 || deltas.len() >= self.config.digest_max {
                break;
            }
            let have = theirs.get(run).copied().unwrap_or(0);
            if let Some(d) = state.delta(run, have, &mut budget) {
                deltas.push(d);
            }
        }
        let behind = digest
            .iter()
            .filter(|(run, v)| {
                *run != self.me && !self.below_floor(run) && *v > self.version_of(run)
            })
            .map(|(run, _)| (run.clone(), self.version_of(run)))
            .collect();
        Reply::Sync { deltas, behind }
    }

    /// The answer to a request this node sent to `from`.
    pub fn on_reply(&mut self, from: SocketAddr, reply: Reply, _now: Instant) -> Vec<Action> {
        if reply.check(&self.config).is_err() {
            self.stats.refused += 1;
            return Vec::new();
        }
        match reply {
            Reply::Deltas(deltas) => {
                for d in deltas {
                    let run = d.run.clone();
                    if self.apply(d) == Applied::Advanced {
                        let v = self.version_of(&run);
                        if self
                            .pulling
                            .get(&run)
                            .is_some_and(|(wanted, _)| *wanted <= v)
                        {
                            self.pulling.remove(&run);
                        }
                        // Heard by note and now held: announce it in turn.
                        self.queue_note(&run);
                    }
                }
                Vec::new()
            }
            Reply::Sync { deltas, behind } => {
                let mut news = false;
                for d in deltas {
                    news |= self.apply(d) == Applied::Advanced;
                }
                // Fast again while syncs bring news; back to the slow pace
                // once a whole pass brought nothing.
                if news {
                    self.catching_up = true;
                } else if self.cursor.is_none() {
                    self.catching_up = false;
                }
                let push = self.deltas_for(behind);
                if push.is_empty() {
                    Vec::new()
                } else {
                    vec![Action::Send {
                        to: from,
                        msg: Msg::Push(push),
                    }]
                }
            }
        }
    }
}

pub mod sim;

#[cfg(test)]
#[path = "spread/tests.rs"]
mod tests;
