//! A SWIM-style failure detector as a pure state machine (no IO, no clock, no
//! global RNG): the host feeds it time, messages and probe outcomes and
//! carries out the [`Action`]s it returns.
//!
//! Beyond SWIM (Das et al. 2002) it takes two ideas of Lifeguard (HashiCorp
//! 2018) and one of its own:
//! - a suspicion's timeout shrinks as independent confirmations arrive
//!   (`max - (max - min) * ln(C + 1) / ln(K + 1)`), so a real death is declared
//!   quickly while a lone false suspicion gets the whole `suspicion_max` to be
//!   refuted;
//! - a member hearing a suspicion probes the suspect itself at once
//!   (confirmation probe) instead of waiting for its turn in the probe order;
//! - membership changes are not piggybacked on later probes but sent straight
//!   to every member (changes are rare, so this costs nothing in steady
//!   state, and it removes the O(log N) rounds of dissemination delay).
//!
//! Probes run over QUIC streams, whose retransmissions absorb packet loss
//! within the probe timeout; indirect probes through `indirect_probes` peers
//! cover a broken link between two nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::record::NodeState;

/// Timing and fan-out of the failure detector.
#[derive(Debug, Clone)]
pub struct SwimConfig {
    /// A probe of the next member starts this often. Detection time is
    /// dominated by how soon some node probes the dead one; with N nodes each
    /// probing one peer per interval, the first probe of any given node comes
    /// after about `probe_interval` on average whatever N is. Cost per node is
    /// one small request per interval, flat in N.
    pub probe_interval: Duration,
    /// Wait for a direct probe's answer. Loopback/LAN round trips are below a
    /// millisecond; QUIC retransmits a lost packet after about 30 ms, so 120 ms
    /// absorbs two or three losses in a row; the indirect probes and the
    /// suspicion period absorb the rest.
    pub probe_timeout: Duration,
    /// Wait for indirect probes (two hops each way).
    pub indirect_timeout: Duration,
    /// Peers asked to probe on our behalf after a failed direct probe.
    pub indirect_probes: usize,
    /// Suspicion timeout once `confirmations_expected` peers confirmed.
    pub suspicion_min: Duration,
    /// Suspicion timeout with no confirmation: the time a falsely suspected
    /// node has to refute.
    pub suspicion_max: Duration,
    /// Confirmations (K) after which the timeout reaches `suspicion_min`.
    pub confirmations_expected: usize,
    /// A dead (not left) member is probed again this often, so that nodes
    /// declared dead during a partition find each other after it heals.
    pub dead_probe_interval: Duration,
    /// Dead and left members are forgotten after this long.
    pub dead_retention: Duration,
    /// Most members tracked; beyond it new ones are ignored.
    pub members_max: usize,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self::lan()
    }
}

impl SwimConfig {
    /// Defaults for a LAN or a single machine: sub-second detection.
    pub fn lan() -> Self {
        SwimConfig {
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(120),
            indirect_timeout: Duration::from_millis(200),
            indirect_probes: 3,
            suspicion_min: Duration::from_millis(200),
            suspicion_max: Duration::from_secs(3),
            confirmations_expected: 3,
            dead_probe_interval: Duration::from_secs(1),
            dead_retention: Duration::from_secs(15 * 60),
            members_max: 10_000,
        }
    }
}

/// The rank of `member` as a confirmer of a suspicion of `suspect`:
/// FNV-1a over both names (stable across builds and platforms, so every
/// node ranks alike; no adversary chooses node names to game it).
fn confirm_rank(suspect: &str, member: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in suspect
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(member.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A membership change, sent to every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Node name.
    pub name: String,
    /// Node generation.
    pub generation: u64,
    /// Node address.
    pub addr: SocketAddr,
    /// Incarnation the update is about.
    pub incarnation: u64,
    /// New state.
    pub state: NodeState,
    /// Who says so (distinct sayers of a suspicion are its confirmations).
    pub by: String,
}

/// Messages of the probe protocol (postcard on [`shoal_transport::Service::Probe`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeMsg {
    /// Are you alive? Answered with [`ProbeReply::Ack`].
    Ping {
        /// Prober's name, generation and address.
        from: (String, u64, SocketAddr),
        /// Target name, so a different node on the address says Nack.
        target: String,
        /// How the prober sees the target: lets a node that others think
        /// suspect or dead refute at once.
        view_of_you: Option<View>,
    },
    /// Probe `target` for me and say whether it answered.
    PingReq {
        /// Target name.
        target: String,
        /// Target address.
        addr: SocketAddr,
    },
    /// Membership changes. Sent as a request when the sender wants to know
    /// they arrived (graceful leave).
    Updates(Vec<Update>),
}

/// How a prober sees its target, sent in a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The state the prober holds.
    pub state: NodeState,
    /// The run it holds that state of: a restarted target is asked about
    /// its previous run, which it does not refute (the ack's newer
    /// generation tells the prober).
    pub generation: u64,
    /// The incarnation it holds.
    pub incarnation: u64,
}

/// Answers to [`ProbeMsg`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeReply {
    /// Alive: the answering node's generation and incarnation.
    Ack {
        /// Generation.
        generation: u64,
        /// Incarnation.
        incarnation: u64,
    },
    /// The target did not answer (to a `PingReq`), or is not who was asked for.
    Nack,
    /// Updates received.
    Ok,
}

/// What a probe request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The target answered (directly or through a relay) with this
    /// generation and incarnation (a relay reports the target's own).
    Ack {
        /// Generation.
        generation: u64,
        /// Incarnation.
        incarnation: u64,
    },
    /// No answer in time, or a Nack.
    Failed,
}

/// Work for the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `ProbeMsg::Ping` to `addr` and report the outcome for `probe`.
    Ping {
        /// Probe id to report with.
        probe: u64,
        /// Where.
        addr: SocketAddr,
        /// The message.
        msg: ProbeMsg,
        /// How long to wait.
        timeout: Duration,
    },
    /// Send `ProbeMsg::PingReq` to `via` and report the outcome for `probe`.
    PingReq {
        /// Probe id to report with.
        probe: u64,
        /// The relay.
        via: SocketAddr,
        /// The message.
        msg: ProbeMsg,
        /// How long to wait.
        timeout: Duration,
    },
    /// Send these updates to each address (one-way).
    Broadcast {
        /// Recipients.
        to: Vec<SocketAddr>,
        /// Updates.
        updates: Vec<Update>,
    },
}

#[derive(Debug, Clone)]
struct Suspicion {
    since: Instant,
    /// Who suspects it: at most `confirmations_expected + 1` names.
    confirmers: BTreeSet<String>,
    /// This node suspected it itself (first, or as a confirmer).
    mine: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    generation: u64,
    addr: SocketAddr,
    incarnation: u64,
    state: NodeState,
    suspicion: Option<Suspicion>,
    changed_at: Instant,
}

impl Entry {
    /// Moves to `state` at `incarnation`, dropping any suspicion.
    fn set(&mut self, state: NodeState, incarnation: u64, now: Instant) {
        self.incarnation = incarnation;
        self.state = state;
        self.suspicion = None;
        self.changed_at = now;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Our turn-based direct probe.
    Direct,
    /// Direct failed; indirect probes plus a direct retry outstanding.
    Indirect { outstanding: usize },
    /// Someone else suspects the target; we check ourselves.
    Confirm,
    /// Probing a dead member to find out whether it is back.
    Revive,
}

#[derive(Debug, Clone)]
struct Probe {
    target: String,
    generation: u64,
    phase: Phase,
    deadline: Instant,
}

/// One node's failure detector.
pub struct Swim {
    config: SwimConfig,
    me: String,
    generation: u64,
    addr: SocketAddr,
    incarnation: u64,
    left: bool,
    members: BTreeMap<String, Entry>,
    order: Vec<String>,
    order_pos: usize,
    next_probe_at: Option<Instant>,
    next_dead_probe_at: Option<Instant>,
    probes: BTreeMap<u64, Probe>,
    next_probe_id: u64,
    rng: StdRng,
    /// Local health (Lifeguard's "local health awareness"): 0 when this
    /// node keeps its own timing, up to [`HEALTH_MAX`] when it runs late
    /// (CPU starvation, a paused process). Every timeout is stretched by
    /// `1 + health`, so a starved node neither suspects healthy peers on
    /// its own late timers nor confirms others' suspicions too eagerly.
    health: u32,
    health_decay_at: Option<Instant>,
    /// Bumped on every change of a member's state, incarnation or
    /// generation: a host rebuilds its view only when it moved.
    changes: u64,
    /// Members seen becoming suspect (see [`Swim::suspicions`]).
    suspicions: u64,
    /// Members that were suspected (some may have moved on since): the
    /// timer looks at these, not at every member.
    suspects: BTreeSet<String>,
    /// Next sweep of long-gone members.
    next_retention_at: Option<Instant>,
    /// Updates refused as impossible (an incarnation of
    /// [`INCARNATION_MAX`] or more).
    refused: u64,
}

/// Incarnations at or above this are refused. A node raises its own by
/// one per refutation, and only of a suspicion at the incarnation it
/// holds, so no honest history gets near it, and a member forging
/// suspicions moves it by one per message: 2^48 of them is nine years at a
/// million a second. Refusing claims from here on keeps every refutation
/// below it, so none can overflow.
pub const INCARNATION_MAX: u64 = 1 << 48;

/// Largest local-health score: timeouts stretch at most 9-fold.
pub const HEALTH_MAX: u32 = 8;

/// A member as the detector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Name.
    pub name: String,
    /// Generation.
    pub generation: u64,
    /// Address.
    pub addr: SocketAddr,
    /// Incarnation.
    pub incarnation: u64,
    /// State.
    pub state: NodeState,
}

impl Swim {
    /// A detector for node `me`; `seed` drives its probe order (derive it
    /// from the node name and generation so runs can be replayed).
    pub fn new(config: SwimConfig, me: &str, generation: u64, addr: SocketAddr, seed: u64) -> Swim {
        Swim {
            config,
            me: me.to_string(),
            generation,
            addr,
            incarnation: 0,
            left: false,
            members: BTreeMap::new(),
            order: Vec::new(),
            order_pos: 0,
            next_probe_at: None,
            next_dead_probe_at: None,
            probes: BTreeMap::new(),
            next_probe_id: 0,
            rng: StdRng::seed_from_u64(seed),
            health: 0,
            health_decay_at: None,
            changes: 0,
            suspicions: 0,
            suspects: BTreeSet::new(),
            next_retention_at: None,
            refused: 0,
        }
    }

    /// Updates refused as impossible so far (see [`INCARNATION_MAX`]).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// A counter that moves whenever any member's state, incarnation or
    /// generation changes.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Members this node has seen become suspect (its own suspicions and
    /// those it heard of), since it started.
    pub fn suspicions(&self) -> u64 {
        self.suspicions
    }

    fn scaled(&self, d: Duration) -> Duration {
        d * (1 + self.health)
    }

    /// Current local-health score (0 = healthy).
    pub fn health(&self) -> u32 {
        self.health
    }

    /// Reports how late this node's own timer fired. Lateness beyond a
    /// quarter of the probe timeout means the node is starved: its health
    /// score rises; a second without such lateness lowers it by one.
    pub fn note_lag(&mut self, lag: Duration, now: Instant) {
        if lag > self.config.probe_timeout / 4 {
            self.health = (self.health + 1).min(HEALTH_MAX);
            self.health_decay_at = Some(now + Duration::from_secs(1));
        } else if self.health > 0 && self.health_decay_at.is_some_and(|t| now >= t) {
            self.health -= 1;
            self.health_decay_at = Some(now + Duration::from_secs(1));
        }
    }

    /// This node's current incarnation (published so that gossip carries
    /// refutations to nodes that missed them).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Every member other than this node.
    pub fn members(&self) -> impl Iterator<Item = MemberStatus> + '_ {
        self.members.iter().map(|(name, e)| MemberStatus {
            name: name.clone(),
            generation: e.generation,
            addr: e.addr,
            incarnation: e.incarnation,
            state: e.state,
        })
    }

    /// State of one member.
    pub fn state_of(&self, name: &str) -> Option<NodeState> {
        self.members.get(name).map(|e| e.state)
    }

    /// Whether this node checks a fresh suspicion of `suspect` itself.
    ///
    /// Confirmations beyond `confirmations_expected` (K) do not shorten the
    /// suspicion, yet every node confirming and broadcasting its
    /// confirmation to every node costs N^2 messages per death (250,000 at
    /// 500 nodes, found by the simulator). The confirmers are the K + 2
    /// live members (the suspecter excluded) that rank highest by a hash of
    /// (suspect, member): every node computes the same set from its own
    /// view, with two spares for a confirmer that is itself down or cut
    /// off. A node whose view differs slightly may confirm needlessly or
    /// not at all; the suspicion then runs nearer `suspicion_max`, which is
    /// safe (a slower verdict, never a false one).
    fn is_confirmer(&self, suspect: &str, by: &str) -> bool {
        let want = self.config.confirmations_expected.saturating_add(2);
        let mine = confirm_rank(suspect, &self.me);
        let higher = self
            .members
            .iter()
            .filter(|(n, e)| {
                n.as_str() != suspect
                    && n.as_str() != by
                    && matches!(e.state, NodeState::Alive | NodeState::Suspect)
            })
            .filter(|(n, _)| confirm_rank(suspect, n) > mine)
            .take(want)
            .count();
        higher < want
    }

    fn live_addrs(&self, also: Option<&str>) -> Vec<SocketAddr> {
        self.members
            .iter()
            .filter(|(n, e)| {
                matches!(e.state, NodeState::Alive | NodeState::Suspect) || Some(n.as_str()) == also
            })
            .map(|(_, e)| e.addr)
            .collect()
    }

    fn my_update(&self, state: NodeState) -> Update {
        Update {
            name: self.me.clone(),
            generation: self.generation,
            addr: self.addr,
            incarnation: self.incarnation,
            state,
            by: self.me.clone(),
        }
    }

    fn update_for(&self, name: &str, state: NodeState) -> Option<Update> {
        let e = self.members.get(name)?;
        Some(Update {
            name: name.to_string(),
            generation: e.generation,
            addr: e.addr,
            incarnation: e.incarnation,
            state,
            by: self.me.clone(),
        })
    }

    fn insert(
        &mut self,
        name: &str,
        generation: u64,
        addr: SocketAddr,
        incarnation: u64,
        state: NodeState,
        now: Instant,
    ) -> bool {
        if !self.members.contains_key(name) {
            if self.members.len() >= self.config.members_max {
                return false;
            }
            // A newcomer goes to a random place in the current probe order.
            let pos = if self.order.is_empty() {
                0
            } else {
                rand::Rng::random_range(&mut self.rng, 0..=self.order.len())
            };
            self.order.insert(pos, name.to_string());
        }
        self.changes += 1;
        self.members.insert(
            name.to_string(),
            Entry {
                generation,
                addr,
                incarnation,
                state,
                suspicion: None,
                changed_at: now,
            },
        );
        true
    }

    /// A member seen in gossip: its generation, address, published
    /// incarnation and whether it says it left.
    pub fn observe(
        &mut self,
        name: &str,
        generation: u64,
        addr: SocketAddr,
        incarnation: u64,
        left: bool,
        now: Instant,
    ) {
        if name == self.me {
            return;
        }
        if incarnation >= INCARNATION_MAX {
            self.refused += 1;
            return;
        }
        let state = if left {
            NodeState::Left
        } else {
            NodeState::Alive
        };
        match self.members.get_mut(name) {
            None => {
                self.insert(name, generation, addr, incarnation, state, now);
            }
            Some(e) if generation > e.generation => {
                self.insert(name, generation, addr, incarnation, state, now);
            }
            Some(e) if generation == e.generation => {
                if left && e.state != NodeState::Left {
                    e.set(NodeState::Left, e.incarnation, now);
                    self.changes += 1;
                } else if incarnation > e.incarnation && e.state != NodeState::Left {
                    // The node refuted a suspicion and gossip brought the news.
                    e.set(NodeState::Alive, incarnation, now);
                    self.changes += 1;
                }
            }
            Some(_) => {}
        }
    }

    fn new_probe(&mut self, target: &str, generation: u64, phase: Phase, deadline: Instant) -> u64 {
        let id = self.next_probe_id;
        self.next_probe_id += 1;
        self.probes.insert(
            id,
            Probe {
                target: target.to_string(),
                generation,
                phase,
                deadline,
            },
        );
        id
    }

    fn ping_action(
        &mut self,
        name: &str,
        phase: Phase,
        timeout: Duration,
        now: Instant,
    ) -> Option<Action> {
        let e = self.members.get(name)?.clone();
        let probe = self.new_probe(name, e.generation, phase, now + timeout);
        Some(Action::Ping {
            probe,
            addr: e.addr,
            msg: ProbeMsg::Ping {
                from: (self.me.clone(), self.generation, self.addr),
                target: name.to_string(),
                view_of_you: Some(View {
                    state: e.state,
                    generation: e.generation,
                    incarnation: e.incarnation,
                }),
            },
            timeout,
        })
    }

    fn next_target(&mut self) -> Option<String> {
        for _ in 0..=self.order.len() {
            if self.order_pos >= self.order.len() {
                self.order.retain(|n| self.members.contains_key(n));
                self.order.shuffle(&mut self.rng);
                self.order_pos = 0;
                if self.order.is_empty() {
                    return None;
                }
            }
            let name = self.order[self.order_pos].clone();
            self.order_pos += 1;
            if let Some(e) = self.members.get(&name) {
                if matches!(e.state, NodeState::Alive | NodeState::Suspect) {
                    return Some(name);
                }
            }
        }
        None
    }

    fn suspicion_timeout(&self, confirmations: usize) -> Duration {
        let others = self
            .members
            .values()
            .filter(|e| matches!(e.state, NodeState::Alive | NodeState::Suspect))
            .count()
            .saturating_sub(1);
        let k = self.config.confirmations_expected.min(others);
        if k == 0 {
            return self.scaled(self.config.suspicion_min);
        }
        let c = confirmations.min(k) as f64;
        let (min, max) = (
            self.scaled(self.config.suspicion_min).as_secs_f64(),
            self.scaled(self.config.suspicion_max).as_secs_f64(),
        );
        let t = max - (max - min) * (c + 1.0).ln() / (k as f64 + 1.0).ln();
        Duration::from_secs_f64(t.max(min))
    }

    /// Advances time: starts due probes, expires suspicions and stale probes.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.left {
            return actions;
        }
        // Probes whose outcome never came back count as failed.
        let grace = self.scaled(self.config.indirect_timeout);
        let expired: Vec<u64> = self
            .probes
            .iter()
            .filter(|(_, p)| now > p.deadline + grace)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            actions.extend(self.probe_outcome(id, ProbeOutcome::Failed, now));
        }

        if self.next_probe_at.is_none_or(|t| now >= t) {
            self.next_probe_at = Some(now + self.config.probe_interval);
            if let Some(target) = self.next_target() {
                let timeout = self.scaled(self.config.probe_timeout);
                actions.extend(self.ping_action(&target, Phase::Direct, timeout, now));
            }
        }

        if self.next_dead_probe_at.is_none_or(|t| now >= t) {
            self.next_dead_probe_at = Some(now + self.config.dead_probe_interval);
            let dead: Vec<String> = self
                .members
                .iter()
                .filter(|(_, e)| e.state == NodeState::Dead)
                .map(|(n, _)| n.clone())
                .collect();
            if let Some(name) = dead.choose(&mut self.rng).cloned() {
                let timeout = self.scaled(self.config.probe_timeout);
                actions.extend(self.ping_action(&name, Phase::Revive, timeout, now));
            }
        }

        // Suspicions that ran out (only suspected members are looked at:
        // a timer that walked every member would cost O(N) each tick).
        let mut dead = Vec::new();
        let members = &self.members;
        self.suspects.retain(|n| {
            members
                .get(n)
                .is_some_and(|e| e.state == NodeState::Suspect)
        });
        for name in &self.suspects {
            if let Some(Entry {
                suspicion: Some(s), ..
            }) = self.members.get(name)
            {
                let timeout = self.suspicion_timeout(s.confirmers.len().saturating_sub(1));
                if now.duration_since(s.since) >= timeout {
                    dead.push((name.clone(), s.mine));
                }
            }
        }
        for (name, mine) in dead {
            if let Some(e) = self.members.get_mut(&name) {
                e.set(NodeState::Dead, e.incarnation, now);
                self.changes += 1;
            }
            // Every node that heard the suspicion reaches this verdict on
            // its own timer; only those that suspected it themselves (the
            // first suspecter and the few confirmers) tell everyone, for
            // the nodes that missed the suspicion. All N telling all N
            // would cost N^2 messages per death.
            if !mine {
                continue;
            }
            if let Some(u) = self.update_for(&name, NodeState::Dead) {
                actions.push(Action::Broadcast {
                    to: self.live_addrs(None),
                    updates: vec![u],
                });
            }
        }

        // Forget long-gone members (once a second is plenty for a
        // retention of minutes).
        if self.next_retention_at.is_some_and(|t| now < t) {
            return actions;
        }
        self.next_retention_at = Some(now + Duration::from_secs(1));
        let retention = self.config.dead_retention;
        let before = self.members.len();
        self.members.retain(|_, e| {
            !(matches!(e.state, NodeState::Dead | NodeState::Left)
                && now.duration_since(e.changed_at) > retention)
        });
        if self.members.len() != before {
            self.changes += 1;
        }
        actions
    }

    fn suspect(&mut self, name: &str, by: &str, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(e) = self.members.get_mut(name) else {
            return actions;
        };
        match e.state {
            NodeState::Alive => {
                e.state = NodeState::Suspect;
                e.changed_at = now;
                self.changes += 1;
                self.suspicions = self.suspicions.saturating_add(1);
                self.suspects.insert(name.to_string());
                e.suspicion = Some(Suspicion {
                    since: now,
                    confirmers: BTreeSet::from([by.to_string()]),
                    mine: by == self.me,
                });
            }
            NodeState::Suspect => {
                // Confirmations beyond K no longer shorten the timeout:
                // keep at most K + 1 names (the first suspecter and K
                // others), so a suspicion costs the same whatever N.
                let keep = self.config.confirmations_expected.saturating_add(1);
                if let Some(s) = e.suspicion.as_mut() {
                    s.mine |= by == self.me;
                    if s.confirmers.len() < keep && !s.confirmers.contains(by) {
                        s.confirmers.insert(by.to_string());
                    }
                }
            }
            NodeState::Dead | NodeState::Left => return actions,
        }
        if by == self.me {
            if let Some(u) = self.update_for(name, NodeState::Suspect) {
                // The suspect gets it too, so that it can refute.
                actions.push(Action::Broadcast {
                    to: self.live_addrs(Some(name)),
                    updates: vec![u],
                });
            }
        }
        actions
    }

    /// Refutes a suspicion at our own incarnation (the only kind refuted:
    /// see `on_update` and `on_ping`) by raising it by one and telling
    /// every member. Not from INCARNATION_MAX - 1 on: peers refuse the cap,
    /// so such a refutation would not be taken anyway.
    fn refute(&mut self) -> Vec<Action> {
        if self.incarnation >= INCARNATION_MAX - 1 {
            return Vec::new();
        }
        // Being suspected is a sign of our own slowness too.
        self.health = (self.health + 1).min(HEALTH_MAX);
        self.incarnation += 1;
        vec![Action::Broadcast {
            to: self.live_addrs(None),
            updates: vec![self.my_update(NodeState::Alive)],
        }]
    }

    /// Reports how a probe went.
    pub fn probe_outcome(
        &mut self,
        probe: u64,
        outcome: ProbeOutcome,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(p) = self.probes.get(&probe).cloned() else {
            return actions;
        };
        let current = self.members.get(&p.target).map(|e| e.generation);
        if current != Some(p.generation) {
            self.probes.remove(&probe);
            return actions;
        }
        // No honest node reaches the cap (see `on_update`): whoever answers
        // on a member's address with it is not to be believed, so its ack
        // counts as no answer.
        let outcome = match outcome {
            ProbeOutcome::Ack { incarnation, .. } if incarnation >= INCARNATION_MAX => {
                self.refused += 1;
                ProbeOutcome::Failed
            }
            outcome => outcome,
        };
        if let ProbeOutcome::Ack {
            generation,
            incarnation,
        } = outcome
        {
            if generation > p.generation {
                // A restarted node answers on the old one's address.
                self.probes.remove(&probe);
                let addr = self.members[&p.target].addr;
                self.insert(
                    &p.target,
                    generation,
                    addr,
                    incarnation,
                    NodeState::Alive,
                    now,
                );
                return actions;
            }
        }
        let ok = matches!(outcome, ProbeOutcome::Ack { .. });
        match p.phase {
            Phase::Direct if ok => {
                self.probes.remove(&probe);
                self.acked(&p.target, outcome, now);
            }
            Phase::Direct => {
                // Ask k others, and try once more ourselves.
                let relays: Vec<SocketAddr> = {
                    let mut candidates: Vec<SocketAddr> = self
                        .members
                        .iter()
                        .filter(|(n, e)| *n != &p.target && e.state == NodeState::Alive)
                        .map(|(_, e)| e.addr)
                        .collect();
                    candidates.shuffle(&mut self.rng);
                    candidates.truncate(self.config.indirect_probes);
                    candidates
                };
                let timeout = self.scaled(self.config.indirect_timeout);
                let e = &self.members[&p.target];
                let target_addr = e.addr;
                let state = e.state;
                let inc = e.incarnation;
                let entry = self.probes.get_mut(&probe).expect("present");
                entry.phase = Phase::Indirect {
                    outstanding: relays.len() + 1,
                };
                entry.deadline = now + timeout;
                for via in relays {
                    actions.push(Action::PingReq {
                        probe,
                        via,
                        msg: ProbeMsg::PingReq {
                            target: p.target.clone(),
                            addr: target_addr,
                        },
                        timeout,
                    });
                }
                actions.push(Action::Ping {
                    probe,
                    addr: target_addr,
                    msg: ProbeMsg::Ping {
                        from: (self.me.clone(), self.generation, self.addr),
                        target: p.target.clone(),
                        view_of_you: Some(View {
                            state,
                            generation: p.generation,
                            incarnation: inc,
                        }),
                    },
                    timeout,
                });
            }
            Phase::Indirect { outstanding } => {
                if ok {
                    self.probes.remove(&probe);
                    self.acked(&p.target, outcome, now);
                } else if outstanding <= 1 {
                    self.probes.remove(&probe);
                    let me = self.me.clone();
                    actions.extend(self.suspect(&p.target, &me, now));
                } else if let Some(entry) = self.probes.get_mut(&probe) {
                    entry.phase = Phase::Indirect {
                        outstanding: outstanding - 1,
                    };
                }
            }
            Phase::Confirm => {
                self.probes.remove(&probe);
                if ok {
                    self.acked(&p.target, outcome, now);
                } else {
                    let me = self.me.clone();
                    actions.extend(self.suspect(&p.target, &me, now));
                }
            }
            Phase::Revive => {
                // An answer from a dead member: the ping told it how we see
                // it, so it refuted, and its ack carries the higher
                // incarnation. Take it back here at once: its refutation's
                // broadcast goes only to the members it holds alive, so
                // after a partition in which each side held the other dead
                // nothing else would carry it across (found by chaos seed
                // 42 once state gossip stopped running with dead members;
                // `a_partition_both_sides_hold_dead_heals_by_swim_alone`,
                // seed 0). The rest of this side hears it from the member's
                // signed state, which gossip now carries again.
                self.probes.remove(&probe);
                if matches!(outcome, ProbeOutcome::Ack { generation, .. } if generation == p.generation)
                {
                    self.acked(&p.target, outcome, now);
                }
            }
        }
        actions
    }

    fn acked(&mut self, name: &str, outcome: ProbeOutcome, now: Instant) {
        let ProbeOutcome::Ack { incarnation, .. } = outcome else {
            return;
        };
        if let Some(e) = self.members.get_mut(name) {
            if incarnation > e.incarnation && e.state != NodeState::Left {
                e.set(NodeState::Alive, incarnation, now);
                self.changes += 1;
            }
        }
    }

    /// A ping arrived; returns the reply and any actions (a refutation).
    pub fn on_ping(
        &mut self,
        from: (String, u64, SocketAddr),
        target: &str,
        view_of_you: Option<View>,
        now: Instant,
    ) -> (ProbeReply, Vec<Action>) {
        if target != self.me || self.left {
            return (ProbeReply::Nack, Vec::new());
        }
        let (name, generation, addr) = from;
        self.observe(&name, generation, addr, 0, false, now);
        let mut actions = Vec::new();
        if let Some(view) = view_of_you {
            // Refuted only when it is of this run, at the incarnation we
            // hold: an honest prober never holds more (only our own word
            // raises it anywhere, see `on_update`), a view at less is
            // answered by the ack's incarnation, and a view of a previous
            // run by the ack's generation (the prober takes the new run
            // in `probe_outcome`). Refuting above our own let one member
            // push our incarnation to the cap in one message (the last
            // #11 probe; `a_member_pushes_another_nodes_incarnation_by_one_
            // per_message_at_most`, seed 1000).
            if matches!(view.state, NodeState::Suspect | NodeState::Dead)
                && view.generation == self.generation
                && view.incarnation == self.incarnation
            {
                actions = self.refute();
            }
        }
        // A member we hold dead is probing us: probe it back, telling it
        // so, and it refutes (its higher incarnation brings it back here).
        // Without this a node cut off alone revived the others one per
        // dead-probe interval (found by the simulator, seed 128: 22 s to
        // see a 30-node majority again, and a duplicate as long).
        let dead_sender = self
            .members
            .get(&name)
            .is_some_and(|e| e.state == NodeState::Dead && e.generation == generation);
        let probing_it = self.probes.values().any(|p| p.target == name);
        if dead_sender && !probing_it {
            let timeout = self.scaled(self.config.probe_timeout);
            actions.extend(self.ping_action(&name, Phase::Revive, timeout, now));
        }
        (
            ProbeReply::Ack {
                generation: self.generation,
                incarnation: self.incarnation,
            },
            actions,
        )
    }

    /// Membership changes arrived.
    pub fn on_updates(&mut self, updates: Vec<Update>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut suspected = false;
        for u in updates {
            actions.extend(self.on_update(u, &mut suspected, now));
        }
        // One refutation per message, of a suspicion at the incarnation
        // held when it arrived (found in review: a batch of suspicions at
        // k, k + 1, ... made the node refute once per entry, each
        // refutation a broadcast to every member).
        if suspected {
            actions.extend(self.refute());
        }
        actions
    }

    /// Takes one update; a suspicion of this node sets `suspected`
    /// instead of refuting (see `on_updates`).
    fn on_update(&mut self, u: Update, suspected: &mut bool, now: Instant) -> Vec<Action> {
        // No node refutes four billion suspicions: a peer that says so is
        // broken or hostile, and believing it would pin a member at an
        // incarnation its owner could never refute. A suspicion must leave
        // room for the refutation above it (found in review: one at
        // INCARNATION_MAX - 1 was believed, and its refutation refused).
        let cap = match u.state {
            NodeState::Suspect | NodeState::Dead => INCARNATION_MAX - 1,
            NodeState::Alive | NodeState::Left => INCARNATION_MAX,
        };
        if u.incarnation >= cap {
            self.refused += 1;
            return Vec::new();
        }
        if u.name == self.me {
            // Only this node raises its incarnation: a claim about us above
            // the one we hold is made up (a refutation of it would jump
            // our incarnation to wherever the claim says).
            if u.generation == self.generation
                && matches!(u.state, NodeState::Suspect | NodeState::Dead)
                && u.incarnation == self.incarnation
                && !self.left
            {
                *suspected = true;
            }
            return Vec::new();
        }
        let known = self
            .members
            .get(&u.name)
            .map(|e| (e.generation, e.incarnation, e.state));
        match known {
            Some((g, _, _)) if u.generation < g => return Vec::new(),
            // Unknown, or a newer generation (a restart): a fresh entry.
            Some((g, _, _)) if u.generation == g => {}
            // Only a node itself says it is alive or left (the runtime
            // drops such updates from anyone else), so only those bring a
            // node or a new run of it into view: a suspicion of a run
            // nobody knows would let any member put a made-up address in
            // every view.
            _ if matches!(u.state, NodeState::Suspect | NodeState::Dead) => return Vec::new(),
            _ => {
                self.insert(
                    &u.name,
                    u.generation,
                    u.addr,
                    u.incarnation,
                    NodeState::Alive,
                    now,
                );
            }
        }
        let e = self.members.get_mut(&u.name).expect("inserted above");
        match u.state {
            NodeState::Alive => {
                if u.incarnation > e.incarnation && e.state != NodeState::Left {
                    e.set(NodeState::Alive, u.incarnation, now);
                    self.changes += 1;
                }
                Vec::new()
            }
            // A verdict is a third party's word: it may say the member is
            // suspect or dead at the incarnation held here, not raise it
            // (only the member's own word does: its updates, direct acks
            // and signed gossip). One at a higher incarnation is taken at
            // the one held: honestly, the sayer heard of a refutation this
            // node missed, and the member's next word raises the held one
            // past it; a forged one moves nothing (it used to become this
            // node's view, which its probes then put to the member as a
            // suspicion to refute above).
            NodeState::Suspect => {
                if matches!(e.state, NodeState::Left | NodeState::Dead)
                    || u.incarnation < e.incarnation
                {
                    return Vec::new();
                }
                let fresh = e.state == NodeState::Alive;
                let mut actions = self.suspect(&u.name, &u.by, now);
                if fresh && self.is_confirmer(&u.name, &u.by) {
                    // Check for ourselves right away; a failure is our
                    // independent confirmation. Only a few nodes do (see
                    // `is_confirmer`), so a death costs O(N) messages,
                    // not every node's confirmation to every node.
                    let timeout = self.scaled(self.config.probe_timeout);
                    actions.extend(self.ping_action(&u.name, Phase::Confirm, timeout, now));
                }
                actions
            }
            NodeState::Dead => {
                if !matches!(e.state, NodeState::Left | NodeState::Dead)
                    && u.incarnation >= e.incarnation
                {
                    e.set(NodeState::Dead, e.incarnation, now);
                    self.changes += 1;
                }
                Vec::new()
            }
            NodeState::Left => {
                if e.state != NodeState::Left {
                    e.set(NodeState::Left, e.incarnation, now);
                    self.changes += 1;
                }
                Vec::new()
            }
        }
    }

    /// Leaves gracefully: returns the update to deliver to every member
    /// and their addresses; from now on the node answers no probe.
    pub fn leave(&mut self) -> (Vec<SocketAddr>, Update) {
        let to = self.live_addrs(None);
        self.left = true;
        (to, self.my_update(NodeState::Left))
    }
}

#[cfg(test)]
mod tests;
