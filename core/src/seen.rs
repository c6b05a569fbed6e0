//! [`Seen`]: the cluster as this node sees it — the latest view, the
//! members held in doubt after coming back from the dead, and whether this
//! node is cut off with a minority.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_membership::NodeState;
use shoal_placement::{Node, Resources};

use crate::instance::Published;
use crate::view::ClusterView;

/// What a new view changed that the scheduler must act on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewNews {
    /// This node was cut off with a minority and sees a majority again:
    /// its copies must be re-checked against the cluster's.
    pub rejoined_majority: bool,
    /// Members that came back from the dead (same generation).
    pub returned: Vec<Arc<str>>,
    /// The set of live members changed (coordination moves).
    pub members_changed: bool,
    /// A member joined or came back (slots backing off may fit now).
    pub member_added: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Default)]
pub struct Seen {
    /// The latest view.
    pub view: ClusterView,
    /// Fewer than half of the members were alive in the last view.
    minority: bool,
    /// More than half of the members were alive in the last view (what
    /// a `partition = "never"` job needs to place or start: of two
    /// halves exactly, neither acts).
    majority: bool,
    /// Members back from the dead whose published copies are held in
    /// doubt until then: neither counted nor replaced.
    distrust: BTreeMap<Arc<str>, Instant>,
}

impl Seen {
    /// Takes a new view.
    pub fn update(
        &mut self,
        me: &str,
        view: ClusterView,
        grace: Duration,
        now: Instant,
    ) -> ViewNews {
        let mut news = ViewNews::default();
        // Cut off with a minority (fewer than half of the members alive),
        // this node was most likely declared dead by the rest, who replaced
        // its copies. When the majority is back, its copies are re-checked
        // against theirs like after a restart, so that the cluster's
        // replacements stay and this side's go (the conflict rule alone
        // would keep the older copy, this side's).
        let (alive, counted) = view.members.alive_and_counted();
        let minority = alive * 2 < counted;
        news.rejoined_majority = self.minority && !minority;
        self.minority = minority;
        self.majority = alive * 2 > counted;
        // The old members against the new, in one walk over both (sorted
        // by name): no map of its own, since the last view holds the old
        // states (a map per node was N² memory in the simulator).
        let (old_members, new_members) = (self.view.members.clone(), view.members.clone());
        let mut old = old_members.iter().filter(|m| &*m.name != me).peekable();
        let mut new = new_members.iter().filter(|m| &*m.name != me).peekable();
        loop {
            let (o, n) = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(o), Some(n)) if o.name == n.name => (old.next(), new.next()),
                (Some(o), Some(n)) if o.name < n.name => (old.next(), None),
                (Some(_), Some(_)) | (None, Some(_)) => (None, new.next()),
                (Some(_), None) => (old.next(), None),
            };
            match (o, n) {
                (Some(o), Some(n)) => {
                    if o.state == NodeState::Dead && o.generation == n.generation && n.is_live() {
                        // Back from the dead with the same generation: it
                        // still publishes the copies it held before; until
                        // it has had the grace to re-check them, they wait.
                        self.distrust.insert(n.name.clone(), now + grace);
                        news.returned.push(n.name.clone());
                    }
                    let same_gen = o.generation == n.generation;
                    if o.is_live() != n.is_live() || (!same_gen && (o.is_live() || n.is_live())) {
                        news.members_changed = true;
                    }
                    if n.is_live() && (!o.is_live() || !same_gen) {
                        news.member_added = true;
                    }
                }
                (None, Some(n)) if n.is_live() => {
                    news.members_changed = true;
                    news.member_added = true;
                }
                (Some(o), None) if o.is_live() => news.members_changed = true,
                _ => {}
            }
        }
        self.distrust.retain(|_, until| *until > now);
        self.view = view;
        news
    }

    /// Whether this node sees itself cut off with a minority.
    pub fn minority(&self) -> bool {
        self.minority
    }

    /// Whether this node sees more than half of the members alive.
    pub fn strict_majority(&self) -> bool {
        self.majority
    }

    /// Whether `node`'s published copies are held in doubt now.
    pub fn distrusted(&self, node: &str, now: Instant) -> bool {
        self.distrust.get(node).is_some_and(|until| *until > now)
    }

    /// Whether any member is held in doubt now.
    pub fn any_distrusted(&self, now: Instant) -> bool {
        self.distrust.values().any(|until| *until > now)
    }

    /// Copies of one slot published by other live, trusted nodes.
    pub fn copies<'a>(
        &'a self,
        me: &'a str,
        job: &str,
        slot: u32,
        now: Instant,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Published)> + 'a {
        self.view
            .index
            .job(job)
            .into_iter()
            .flat_map(move |c| c.slot(slot).iter())
            .filter(move |(n, _)| self.counts(me, n, now))
            .map(|(n, c)| (n, c))
    }

    /// Whether copies published by `node` count: another node, live, not
    /// held in doubt.
    pub fn counts(&self, me: &str, node: &str, now: Instant) -> bool {
        node != me && self.view.members.is_live(node) && !self.distrusted(node, now)
    }

    /// Alive members whose record has arrived, as placement sees them
    /// (load from gossip; this node's own entry is replaced by the caller
    /// with its fresh load).
    pub fn placement_nodes(&self) -> Vec<Node> {
        self.view
            .members
            .iter()
            .filter(|m| m.state == NodeState::Alive && m.has_record())
            .map(|m| {
                let mut n = Node::new(
                    m.name.to_string(),
                    m.record.capacity.cpu_millis,
                    m.record.capacity.memory_mib,
                );
                let load = self.view.loads.get(&m.name).copied().unwrap_or_default();
                n.used = Resources {
                    cpu_millis: load.cpu_millis,
                    memory_mib: load.memory_mib,
                };
                n.labels = m.record.labels.clone();
                n.drivers = m.record.drivers.iter().cloned().collect();
                if let Some(p) = self.view.index.ports(&m.name) {
                    n.ports_used = (**p).clone();
                }
                n
            })
            .collect()
    }
}
