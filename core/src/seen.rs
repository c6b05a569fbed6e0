//! [`Seen`]: the cluster as this node sees it — the latest view, the
//! members held in doubt after coming back from the dead, the remembered
//! membership, and whether this node is cut off with a minority of it.
//!
//! # The remembered membership
//!
//! A side of a partition counts the members it sees alive against the
//! members it remembers, not against its view: the view forgets a dead
//! member after a while (the membership drops it after 15 minutes), and a
//! node restarted without seeds sees only itself. Counting the view, a
//! minority cut off long enough, or one node restarted alone, would
//! count itself a majority and start what a majority side may also start.
//!
//! The remembered membership is every member this node has seen live,
//! and every member its view shows dead, each with when it was last seen
//! live, kept on disk ([`crate::Effect::Remember`], written at each change
//! and every minute) so that a restart keeps it. A member counts as alive
//! while the view shows it alive or suspect; one the view shows as left
//! (a graceful shutdown) is not counted while the view says so, but stays
//! remembered: a node restarted later does not know it left, and a
//! cluster shut down node by node must not come back as several
//! majorities. The set shrinks two ways only:
//! - a member forgotten by an operator (`shoal node forget`) after this
//!   node last saw it live goes (a node that came back after its forget is
//!   a member again);
//! - a member down (dead, left or gone from the view) for `remember_dead`
//!   goes, but only on a side that sees a majority of the counted members
//!   alive: a minority never shrinks what it counts against, so it never
//!   talks itself into a majority.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_membership::NodeState;
use shoal_placement::{Node, Resources};

use crate::hlc::Version;
use crate::instance::Published;
use crate::view::ClusterView;

/// Most members remembered (a bound on what a disk or the views can make
/// this node keep; far above any cluster shoal targets).
pub const REMEMBERED_MAX: usize = 100_000;

/// What a new view changed that the scheduler must act on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewNews {
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
    /// The remembered membership (see the module's documentation), this
    /// node included: each member with when it was last seen live (ms
    /// since the epoch; 0: never).
    remembered: BTreeMap<Arc<str>, u64>,
    /// Since when each remembered member has been seen down (dead, left,
    /// or gone from the view).
    down_since: BTreeMap<Arc<str>, Instant>,
    /// Counted members seen alive (this node included), and all counted
    /// members (the remembered ones but those the view shows left).
    alive: usize,
    counted: usize,
    /// The remembered membership changed since it was last taken with
    /// [`Seen::take_remembered`].
    remembered_changed: bool,
}

/// What the remembered membership needs from the rest of the node.
pub struct Remember<'a> {
    /// This node's name.
    pub me: &'a str,
    /// A member down this long is no longer counted (by a side that sees
    /// a majority).
    pub dead_after: Duration,
    /// The version of the latest `shoal node forget` of a node, if any.
    pub forgotten: &'a dyn Fn(&str) -> Option<Version>,
    /// The wall clock now, ms since the epoch.
    pub wall_ms: u64,
}

impl Seen {
    /// Takes a new view (the remembered membership and the minority flags
    /// follow with [`Seen::recount`]).
    pub fn update(
        &mut self,
        me: &str,
        view: ClusterView,
        grace: Duration,
        now: Instant,
    ) -> ViewNews {
        let mut news = ViewNews::default();
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

    /// Restores the remembered membership a disk held: names with when
    /// they were last seen live (names that are not valid node names are
    /// dropped; at most [`REMEMBERED_MAX`]).
    pub fn restore_remembered(&mut self, members: impl IntoIterator<Item = (String, u64)>) {
        for (n, at) in members
            .into_iter()
            .filter(|(n, _)| shoal_membership::record::valid_node_name(n))
            .take(REMEMBERED_MAX)
        {
            self.remembered.insert(Arc::from(n), at);
        }
    }

    /// Brings the remembered membership and the minority and majority
    /// flags up to date with the view and the forgets (see the module's
    /// documentation). Returns whether this node was cut off with a
    /// minority and sees a majority again.
    ///
    /// Cut off with a minority (fewer than half of the counted members
    /// alive), this node was most likely declared dead by the rest, who
    /// replaced its copies. When the majority is back, its copies are
    /// re-checked against theirs like after a restart, so that the
    /// cluster's replacements stay and this side's go (the conflict rule
    /// alone would keep the older copy, this side's).
    pub fn recount(&mut self, remember: &Remember<'_>, now: Instant) -> bool {
        let me = remember.me;
        let wall = remember.wall_ms;
        let mut changed = false;
        match self.remembered.get_mut(me) {
            Some(at) => *at = (*at).max(wall),
            None => {
                self.remembered.insert(Arc::from(me), wall);
                changed = true;
            }
        }
        let room = |r: &BTreeMap<Arc<str>, u64>| r.len() < REMEMBERED_MAX;
        for m in self.view.members.iter() {
            if &*m.name == me {
                continue;
            }
            if m.is_live() {
                self.down_since.remove(&m.name);
                if let Some(at) = self.remembered.get_mut(&m.name) {
                    *at = (*at).max(wall);
                } else if room(&self.remembered) {
                    self.remembered.insert(m.name.clone(), wall);
                    changed = true;
                }
            } else if m.state == NodeState::Dead
                && !self.remembered.contains_key(&m.name)
                && room(&self.remembered)
            {
                // A member dead when this node first heard of it (it
                // joined a side cut off from it) counts against this side
                // as much as one it saw die. One that left is not taken
                // in: it left before this node knew it.
                self.remembered.insert(m.name.clone(), 0);
                changed = true;
            }
        }
        let members = &self.view.members;
        let live = |n: &str| n == me || members.is_live(n);
        let left = |n: &str| n != me && members.get(n).is_some_and(|m| m.state == NodeState::Left);
        let mut forgotten = Vec::new();
        for (n, last_live) in &self.remembered {
            if live(n) {
                continue;
            }
            self.down_since.entry(n.clone()).or_insert(now);
            // A forget written after this node last saw the member live
            // (a forget is refused while the member is alive where it is
            // written): one that came back after it is a member again.
            if (remember.forgotten)(n).is_some_and(|v| v.hlc.wall_ms > *last_live) {
                forgotten.push(n.clone());
            }
        }
        for n in forgotten {
            changed |= self.remembered.remove(&n).is_some();
        }
        let count = |r: &BTreeMap<Arc<str>, u64>| {
            let counted = r.keys().filter(|n| !left(n)).count();
            let alive = r.keys().filter(|n| live(n)).count();
            (alive, counted)
        };
        let (mut alive, mut counted) = count(&self.remembered);
        if alive * 2 > counted {
            // Only a side that sees a majority lets the long gone go.
            let before = self.remembered.len();
            let down_since = &self.down_since;
            self.remembered.retain(|n, _| {
                live(n)
                    || down_since.get(n).is_none_or(|since| {
                        now.saturating_duration_since(*since) < remember.dead_after
                    })
            });
            if self.remembered.len() != before {
                changed = true;
                (alive, counted) = count(&self.remembered);
            }
        }
        let remembered = &self.remembered;
        self.down_since.retain(|n, _| remembered.contains_key(n));
        self.remembered_changed |= changed;
        self.alive = alive;
        self.counted = counted;
        let minority = alive * 2 < counted;
        let rejoined = self.minority && !minority;
        self.minority = minority;
        self.majority = alive * 2 > counted;
        rejoined
    }

    /// The remembered membership, with when each member was last seen
    /// live, if it changed since last taken or `always` (to be made
    /// durable).
    pub fn take_remembered(&mut self, always: bool) -> Option<Vec<(String, u64)>> {
        if !std::mem::take(&mut self.remembered_changed) && !always {
            return None;
        }
        Some(
            self.remembered
                .iter()
                .map(|(n, at)| (n.to_string(), *at))
                .collect(),
        )
    }

    /// Whether `name` is remembered.
    pub fn remembers(&self, name: &str) -> bool {
        self.remembered.contains_key(name)
    }

    /// Counted members seen alive (suspects count as alive; this node
    /// included), and all counted members (remembered, not shown left):
    /// what the minority and majority flags compare.
    pub fn alive_and_counted(&self) -> (usize, usize) {
        (self.alive, self.counted)
    }

    /// Whether this node sees itself cut off with a minority of the
    /// remembered members.
    pub fn minority(&self) -> bool {
        self.minority
    }

    /// Whether this node sees more than half of the remembered members
    /// alive.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::view::Members;

    fn view(members: &[(&str, NodeState)]) -> ClusterView {
        ClusterView {
            members: Arc::new(Members::new(
                members.iter().map(|(n, s)| crate::view::test_member(n, *s)),
            )),
            ..ClusterView::default()
        }
    }

    /// A base instant for the tests (the core itself never reads the
    /// clock).
    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::now()
    }

    const DEAD_AFTER: Duration = Duration::from_secs(900);

    /// A view at `t` (wall clock `wall` ms) with the forgets given as
    /// (node, wall ms of the forget).
    fn update_at(
        seen: &mut Seen,
        v: ClusterView,
        forgotten: &[(&str, u64)],
        t: Instant,
        wall: u64,
    ) -> bool {
        let f = |n: &str| {
            forgotten
                .iter()
                .find(|(m, _)| *m == n)
                .map(|(m, ms)| Version {
                    hlc: Hlc {
                        wall_ms: *ms,
                        logical: 0,
                    },
                    node: (*m).into(),
                })
        };
        let r = Remember {
            me: "a",
            dead_after: DEAD_AFTER,
            forgotten: &f,
            wall_ms: wall,
        };
        seen.update("a", v, Duration::from_secs(2), t);
        seen.recount(&r, t)
    }

    fn update(seen: &mut Seen, v: ClusterView, forgotten: &[(&str, u64)], t: Instant) -> bool {
        update_at(seen, v, forgotten, t, 1_000)
    }

    use NodeState::{Alive, Dead, Left};

    fn names(seen: &Seen) -> Vec<&str> {
        seen.remembered.keys().map(|n| &**n).collect()
    }

    fn restored(from: &mut Seen) -> Seen {
        let mut again = Seen::default();
        again.restore_remembered(from.take_remembered(true).unwrap());
        again
    }

    #[test]
    fn a_node_restarted_alone_counts_the_members_it_remembers() {
        let t = base();
        let mut seen = Seen::default();
        seen.restore_remembered(["a", "b", "c", "../x", ""].map(|n| (n.to_string(), 5)));
        update(&mut seen, view(&[("a", Alive)]), &[], t);
        assert_eq!(names(&seen), ["a", "b", "c"], "invalid names dropped");
        assert!(seen.minority(), "1 of 3 remembered is a minority");
        assert!(!seen.strict_majority());
        // Its peers come back: a majority again, and it says so.
        let rejoined = update(&mut seen, view(&[("a", Alive), ("b", Alive)]), &[], t);
        assert!(rejoined && seen.strict_majority() && !seen.minority());
    }

    #[test]
    fn only_a_majority_side_lets_the_long_dead_go() {
        let t = base();
        let five = [
            ("a", Alive),
            ("b", Alive),
            ("c", Alive),
            ("d", Alive),
            ("e", Alive),
        ];
        // The majority side: a, b, c see d and e dead.
        let mut major = Seen::default();
        update(&mut major, view(&five), &[], t);
        assert_eq!(major.take_remembered(false).unwrap().len(), 5);
        assert_eq!(major.take_remembered(false), None, "taken once per change");
        let split = [
            ("a", Alive),
            ("b", Alive),
            ("c", Alive),
            ("d", Dead),
            ("e", Dead),
        ];
        update(&mut major, view(&split), &[], t);
        update(
            &mut major,
            view(&split),
            &[],
            t + DEAD_AFTER - Duration::from_secs(1),
        );
        assert_eq!(
            major.alive_and_counted(),
            (3, 5),
            "not before remember_dead"
        );
        // The membership dropped them from the view meanwhile: gone from
        // the view is down too.
        let dropped = [("a", Alive), ("b", Alive), ("c", Alive)];
        update(&mut major, view(&dropped), &[], t + DEAD_AFTER);
        assert_eq!(names(&major), ["a", "b", "c"]);
        assert!(major.take_remembered(false).is_some());
        // The minority side (a, with b..e dead) never shrinks: it stays a
        // minority however long the partition lasts, even once its view
        // forgot the others.
        let mut minor = Seen::default();
        update(&mut minor, view(&five), &[], t);
        update(&mut minor, view(&[("a", Alive)]), &[], t);
        update(&mut minor, view(&[("a", Alive)]), &[], t + DEAD_AFTER * 10);
        assert_eq!(minor.alive_and_counted(), (1, 5));
        assert!(minor.minority());
    }

    #[test]
    fn a_member_that_left_is_not_counted_while_it_shows_left_but_stays_remembered() {
        // A cluster shut down node by node: c left first, then b; a, the
        // last, saw both leave. Restarted alone, a does not know they
        // left: it must not count itself whole.
        let t = base();
        let mut a = Seen::default();
        update(
            &mut a,
            view(&[("a", Alive), ("b", Alive), ("c", Alive)]),
            &[],
            t,
        );
        update(
            &mut a,
            view(&[("a", Alive), ("b", Left), ("c", Left)]),
            &[],
            t,
        );
        assert_eq!(
            a.alive_and_counted(),
            (1, 1),
            "left members are not counted"
        );
        assert!(a.strict_majority());
        assert_eq!(names(&a), ["a", "b", "c"], "but remembered");
        let mut again = restored(&mut a);
        update(&mut again, view(&[("a", Alive)]), &[], t);
        assert_eq!(again.alive_and_counted(), (1, 3));
        assert!(again.minority());
    }

    #[test]
    fn a_member_first_heard_of_dead_counts() {
        // A node joining a side cut off from b, c and d hears of them
        // dead (a, this node, with e, the peer it joined through).
        let t = base();
        let mut x = Seen::default();
        update(
            &mut x,
            view(&[
                ("a", Alive),
                ("b", Dead),
                ("c", Dead),
                ("d", Dead),
                ("e", Alive),
            ]),
            &[],
            t,
        );
        assert_eq!(x.alive_and_counted(), (2, 5), "two alive, three dead");
        assert!(x.minority());
        // One that left before it came is not taken in.
        let mut y = Seen::default();
        update(&mut y, view(&[("a", Alive), ("b", Left)]), &[], t);
        assert_eq!(names(&y), ["a"]);
    }

    #[test]
    fn a_forget_drops_a_member_last_seen_live_before_it() {
        let t = base();
        let mut seen = Seen::default();
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Alive), ("c", Alive)]),
            &[],
            t,
            100,
        );
        // c leaves (not counted), b dies: 1 of 2.
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Dead), ("c", Left)]),
            &[],
            t,
            200,
        );
        assert_eq!(seen.alive_and_counted(), (1, 2));
        assert!(!seen.minority() && !seen.strict_majority(), "half exactly");
        // The operator forgets b (at 300, after a last saw it, at 100).
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Dead), ("c", Left)]),
            &[("b", 300)],
            t,
            300,
        );
        assert_eq!(names(&seen), ["a", "c"]);
        assert!(seen.strict_majority());
        // b returns (seen live at 400): a member again, and the old
        // forget does not drop it when it dies again, nor after a restart.
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Alive), ("c", Left)]),
            &[("b", 300)],
            t,
            400,
        );
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Dead), ("c", Left)]),
            &[("b", 300)],
            t,
            500,
        );
        assert_eq!(seen.alive_and_counted(), (1, 2));
        let mut again = restored(&mut seen);
        update_at(&mut again, view(&[("a", Alive)]), &[("b", 300)], t, 600);
        assert_eq!(names(&again), ["a", "b", "c"]);
        // A later forget does.
        update_at(&mut again, view(&[("a", Alive)]), &[("b", 700)], t, 700);
        assert_eq!(names(&again), ["a", "c"]);
    }

    #[test]
    fn a_forget_of_a_member_seen_live_since_does_not_drop_it() {
        // Written where b was down, heard here where b is live.
        let t = base();
        let mut seen = Seen::default();
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Alive)]),
            &[("b", 10)],
            t,
            20,
        );
        update_at(
            &mut seen,
            view(&[("a", Alive), ("b", Dead)]),
            &[("b", 10)],
            t,
            30,
        );
        assert_eq!(seen.alive_and_counted(), (1, 2));
    }
}
