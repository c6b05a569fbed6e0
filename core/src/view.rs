//! The cluster as a node sees it: members (from the failure detector and
//! gossip) and the instances and unplaceable slots they publish, indexed by
//! job. Plain data, built incrementally from what gossip changed.
//!
//! The index is separate from the scheduler's state on purpose: it is a
//! pure function of the gossip values, so the agent builds one per node
//! while the simulator builds one per network component and shares it
//! among every node that sees the same values (thousands of nodes would not
//! fit in one process with an index each).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_membership::{Load, MembershipView, NodeRecord, NodeState};
use shoal_placement::hrw::{node_hash, pair_hash};

use crate::gossip::{self, Unplaced, PREFIX, UNPLACED_PREFIX};
use crate::instance::Published;

/// Points of each member on the coordinators' ring. More points even out
/// how many jobs each member coordinates (with one point the largest share
/// is about ln N times the mean; with 4 about twice).
pub const RING_POINTS: u64 = 4;

/// One member as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Name.
    pub name: Arc<str>,
    /// Start-up generation.
    pub generation: u64,
    /// Liveness.
    pub state: NodeState,
    /// What it publishes about itself (a minimal record until gossip
    /// brings the real one: `version` is then empty).
    pub record: Arc<NodeRecord>,
}

impl MemberView {
    /// Alive or suspect: its copies count, and it holds its place on the
    /// coordinators' ring (a suspicion is not yet a death).
    pub fn is_live(&self) -> bool {
        matches!(self.state, NodeState::Alive | NodeState::Suspect)
    }

    /// Whether its record has arrived (a node known only from a probe has
    /// no capacity yet and cannot be a placement candidate).
    pub fn has_record(&self) -> bool {
        !self.record.version.is_empty()
    }
}

/// The members a node sees, with the coordinators' ring of live members.
#[derive(Debug, Clone, Default)]
pub struct Members {
    by_name: BTreeMap<Arc<str>, MemberView>,
    /// (point, member) for every live member, sorted.
    ring: Vec<(u64, Arc<str>)>,
    /// Positions of each live member's points in `ring`.
    positions: BTreeMap<Arc<str>, Vec<usize>>,
    /// Members alive, and members that have not left.
    alive: usize,
    counted: usize,
}

/// The ring position of a job: its coordinator is the owner of the first
/// member point at or after it.
pub fn job_point(job: &str) -> u64 {
    node_hash(job)
}

fn member_points(name: &str) -> impl Iterator<Item = u64> {
    let h = node_hash(name);
    (0..RING_POINTS).map(move |v| pair_hash(h, v))
}

impl Members {
    /// Members from a list (any order; a name listed twice keeps the last).
    pub fn new(members: impl IntoIterator<Item = MemberView>) -> Members {
        let by_name: BTreeMap<Arc<str>, MemberView> =
            members.into_iter().map(|m| (m.name.clone(), m)).collect();
        let mut ring: Vec<(u64, Arc<str>)> = by_name
            .values()
            .filter(|m| m.is_live())
            .flat_map(|m| member_points(&m.name).map(|p| (p, m.name.clone())))
            .collect();
        ring.sort();
        let mut positions: BTreeMap<Arc<str>, Vec<usize>> = BTreeMap::new();
        for (i, (_, n)) in ring.iter().enumerate() {
            positions.entry(n.clone()).or_default().push(i);
        }
        let counted = by_name
            .values()
            .filter(|m| m.state != NodeState::Left)
            .count();
        // Suspects count as alive: a wave of suspicions (a slow moment)
        // must not flip every node into a minority and back, re-checking
        // every copy on the way (found in review).
        let alive = by_name.values().filter(|m| m.is_live()).count();
        Members {
            by_name,
            ring,
            positions,
            alive,
            counted,
        }
    }

    /// A member by name.
    pub fn get(&self, name: &str) -> Option<&MemberView> {
        self.by_name.get(name)
    }

    /// Every member, by name.
    pub fn iter(&self) -> impl Iterator<Item = &MemberView> {
        self.by_name.values()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether `name` is alive or suspect.
    pub fn is_live(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(MemberView::is_live)
    }

    /// The member that coordinates `job`: the owner of the first ring point
    /// at or after the job's (consistent hashing over the live members, so
    /// a member that dies hands over only its own jobs, and a member that
    /// joins takes over only the jobs it now wins). A function of
    /// membership alone: nodes agree on it while their views agree.
    pub fn coordinator(&self, job: &str) -> Option<&Arc<str>> {
        self.coordinator_at(job_point(job))
    }

    fn coordinator_at(&self, point: u64) -> Option<&Arc<str>> {
        if self.ring.is_empty() {
            return None;
        }
        let i = self.ring.partition_point(|(p, _)| *p < point);
        Some(&self.ring[i % self.ring.len()].1)
    }

    /// The ring ranges `name` coordinates, as inclusive (lo, hi) point
    /// ranges (a wrapped range is split in two). A job whose point falls in
    /// one of them is coordinated by `name`.
    pub fn arcs_of(&self, name: &str) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let n = self.ring.len();
        for &i in self.positions.get(name).into_iter().flatten() {
            let point = &self.ring[i].0;
            if n == 1 {
                return vec![(0, u64::MAX)];
            }
            let prev = self.ring[(i + n - 1) % n].0;
            // Points in (prev, point].
            if i == 0 {
                out.push((0, *point));
                if prev < u64::MAX {
                    out.push((prev + 1, u64::MAX));
                }
            } else if prev < *point {
                out.push((prev + 1, *point));
            }
        }
        out
    }

    /// Live (alive or suspect) members, and all members that have not left.
    pub fn alive_and_counted(&self) -> (usize, usize) {
        (self.alive, self.counted)
    }
}

/// The copies of one job's slots that nodes publish, by slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobCopies {
    by_slot: BTreeMap<u32, Vec<(Arc<str>, Published)>>,
}

impl JobCopies {
    /// Copies of one slot (from every publishing node, live or not).
    pub fn slot(&self, slot: u32) -> &[(Arc<str>, Published)] {
        self.by_slot.get(&slot).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every (slot, node, copy).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Arc<str>, &Published)> {
        self.by_slot
            .iter()
            .flat_map(|(s, v)| v.iter().map(move |(n, c)| (*s, n, c)))
    }

    /// Whether no node publishes a copy.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }

    fn remove(&mut self, node: &str, slot: u32) {
        if let Some(v) = self.by_slot.get_mut(&slot) {
            v.retain(|(n, _)| &**n != node);
            if v.is_empty() {
                self.by_slot.remove(&slot);
            }
        }
    }

    fn insert(&mut self, node: &Arc<str>, copy: Published) {
        let v = self.by_slot.entry(copy.slot).or_default();
        v.retain(|(n, _)| n != node);
        v.push((node.clone(), copy));
    }
}

/// What one node publishes, parsed, by bucket.
#[derive(Debug, Clone, Default)]
struct NodeKeys {
    /// The raw values last seen (compared by pointer first: unchanged
    /// values are shared between views).
    raw: BTreeMap<String, Arc<str>>,
    instances: BTreeMap<u64, Vec<(Arc<str>, Published)>>,
    unplaced: BTreeMap<u64, Vec<(Arc<str>, Unplaced)>>,
}

/// Every node's published instances and unplaceable slots, by job.
#[derive(Debug, Clone, Default)]
pub struct InstanceIndex {
    nodes: BTreeMap<Arc<str>, NodeKeys>,
    /// Host ports each node's copies bind.
    ports: BTreeMap<Arc<str>, Arc<BTreeSet<u16>>>,
    jobs: BTreeMap<Arc<str>, Arc<JobCopies>>,
    unplaced: BTreeMap<Arc<str>, BTreeMap<Arc<str>, Vec<Unplaced>>>,
    /// Bumped on every change of a job's copies, per job: a consumer can
    /// tell whether a job changed since it last looked.
    changes: BTreeMap<Arc<str>, u64>,
    change_counter: u64,
}

fn merged<T: Clone>(parts: &BTreeMap<u64, Vec<(Arc<str>, T)>>, bucket: u64) -> &[(Arc<str>, T)] {
    parts.get(&bucket).map(Vec::as_slice).unwrap_or(&[])
}

impl InstanceIndex {
    /// The copies of `job`.
    pub fn job(&self, job: &str) -> Option<&Arc<JobCopies>> {
        self.jobs.get(job)
    }

    /// Every job that has copies.
    pub fn jobs(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<JobCopies>)> {
        self.jobs.iter()
    }

    /// What coordinators say about the unplaceable slots of `job`, by
    /// coordinator.
    pub fn unplaced(&self, job: &str) -> Option<&BTreeMap<Arc<str>, Vec<Unplaced>>> {
        self.unplaced.get(job)
    }

    /// The change stamp of `job`'s copies (0: never changed).
    pub fn change_of(&self, job: &str) -> u64 {
        self.changes.get(job).copied().unwrap_or(0)
    }

    /// Host ports `node`'s copies bind, as it last published them.
    pub fn ports(&self, node: &str) -> Option<&Arc<BTreeSet<u16>>> {
        self.ports.get(node)
    }

    /// Nodes whose published values are indexed.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<str>> {
        self.nodes.keys()
    }

    fn touch(&mut self, job: &Arc<str>) {
        self.change_counter += 1;
        self.changes.insert(job.clone(), self.change_counter);
    }

    /// Takes in what `node` publishes now (its application keys; those
    /// under [`PREFIX`] and [`UNPLACED_PREFIX`] are read). Only buckets
    /// whose raw value changed are parsed again.
    pub fn apply_node(&mut self, node: &Arc<str>, app: &BTreeMap<String, Arc<str>>) {
        let old = self.nodes.remove(node).unwrap_or_default();
        let mut keys = NodeKeys {
            raw: BTreeMap::new(),
            instances: BTreeMap::new(),
            unplaced: BTreeMap::new(),
        };
        // Which buckets changed (a key added, removed or different).
        let mut changed_i: BTreeSet<u64> = BTreeSet::new();
        let mut changed_u: BTreeSet<u64> = BTreeSet::new();
        match app.get(gossip::PORTS_KEY) {
            Some(v) => {
                let unchanged = old
                    .raw
                    .get(gossip::PORTS_KEY)
                    .is_some_and(|o| Arc::ptr_eq(o, v) || o == v);
                if !unchanged || !self.ports.contains_key(node) {
                    self.ports
                        .insert(node.clone(), Arc::new(gossip::decode_ports(v)));
                }
                keys.raw.insert(gossip::PORTS_KEY.to_string(), v.clone());
            }
            None => {
                self.ports.remove(node);
            }
        }
        let relevant = |k: &str| k.starts_with(PREFIX) || k.starts_with(UNPLACED_PREFIX);
        for (k, v) in app.iter().filter(|(k, _)| relevant(k)) {
            let same = old.raw.get(k).is_some_and(|o| Arc::ptr_eq(o, v) || o == v);
            if !same {
                if let Some(b) = gossip::bucket_of_key(PREFIX, k) {
                    changed_i.insert(b);
                }
                if let Some(b) = gossip::bucket_of_key(UNPLACED_PREFIX, k) {
                    changed_u.insert(b);
                }
            }
            keys.raw.insert(k.clone(), v.clone());
        }
        for k in old.raw.keys().filter(|k| !keys.raw.contains_key(*k)) {
            if let Some(b) = gossip::bucket_of_key(PREFIX, k) {
                changed_i.insert(b);
            }
            if let Some(b) = gossip::bucket_of_key(UNPLACED_PREFIX, k) {
                changed_u.insert(b);
            }
        }
        // Unchanged buckets keep their parsed entries.
        for (b, v) in &old.instances {
            if !changed_i.contains(b) {
                keys.instances.insert(*b, v.clone());
            }
        }
        for (b, v) in &old.unplaced {
            if !changed_u.contains(b) {
                keys.unplaced.insert(*b, v.clone());
            }
        }
        for b in &changed_i {
            let prefix = format!("{PREFIX}{b}/");
            let mut entries: Vec<(Arc<str>, Published)> = Vec::new();
            for (_, v) in keys
                .raw
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
            {
                entries.extend(gossip::decode_part::<Published>(v));
            }
            if !entries.is_empty() {
                keys.instances.insert(*b, entries);
            }
        }
        for b in &changed_u {
            let prefix = format!("{UNPLACED_PREFIX}{b}/");
            let mut entries: Vec<(Arc<str>, Unplaced)> = Vec::new();
            for (_, v) in keys
                .raw
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
            {
                entries.extend(gossip::decode_part::<Unplaced>(v));
            }
            if !entries.is_empty() {
                keys.unplaced.insert(*b, entries);
            }
        }
        for b in changed_i {
            self.replace_instances(node, merged(&old.instances, b), merged(&keys.instances, b));
        }
        for b in changed_u {
            self.replace_unplaced(node, merged(&old.unplaced, b), merged(&keys.unplaced, b));
        }
        if !keys.raw.is_empty() {
            self.nodes.insert(node.clone(), keys);
        }
    }

    /// Forgets everything `node` published (it was forgotten by the
    /// membership, or restarted as a new generation).
    pub fn remove_node(&mut self, node: &str) {
        self.ports.remove(node);
        if let Some(old) = self.nodes.remove(node) {
            let node: Arc<str> = Arc::from(node);
            for entries in old.instances.values() {
                self.replace_instances(&node, entries, &[]);
            }
            for entries in old.unplaced.values() {
                self.replace_unplaced(&node, entries, &[]);
            }
        }
    }

    fn replace_instances(
        &mut self,
        node: &Arc<str>,
        old: &[(Arc<str>, Published)],
        new: &[(Arc<str>, Published)],
    ) {
        let mut touched: BTreeSet<Arc<str>> = BTreeSet::new();
        for (job, copy) in old {
            if let Some(copies) = self.jobs.get_mut(job) {
                Arc::make_mut(copies).remove(node, copy.slot);
                touched.insert(job.clone());
            }
        }
        for (job, copy) in new {
            let copies = self.jobs.entry(job.clone()).or_default();
            Arc::make_mut(copies).insert(node, copy.clone());
            touched.insert(job.clone());
        }
        for job in touched {
            if self.jobs.get(&job).is_some_and(|c| c.is_empty()) {
                self.jobs.remove(&job);
            }
            self.touch(&job);
        }
    }

    fn replace_unplaced(
        &mut self,
        node: &Arc<str>,
        old: &[(Arc<str>, Unplaced)],
        new: &[(Arc<str>, Unplaced)],
    ) {
        for (job, _) in old {
            if let Some(by_node) = self.unplaced.get_mut(job) {
                by_node.remove(node);
                if by_node.is_empty() {
                    self.unplaced.remove(job);
                }
            }
        }
        for (job, u) in new {
            self.unplaced
                .entry(job.clone())
                .or_default()
                .entry(node.clone())
                .or_default()
                .push(u.clone());
        }
    }
}

/// Every member's last published load, by name.
pub type Loads = BTreeMap<Arc<str>, Load>;

/// Everything a node's scheduler sees of the cluster. Its parts change at
/// different rates (liveness rarely, loads and copies often), so each is
/// shared on its own: a part that did not change is the same `Arc` as in
/// the last view, and the scheduler skips the work it would cause.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The members and the coordinators' ring.
    pub members: Arc<Members>,
    /// Their loads.
    pub loads: Arc<Loads>,
    /// What they publish.
    pub index: Arc<InstanceIndex>,
}

/// Builds [`ClusterView`]s from the membership task's views, reusing what
/// did not change (the agent's side; the simulator builds its own).
#[derive(Debug, Default)]
pub struct ViewBuilder {
    index: Arc<InstanceIndex>,
    members: Arc<Members>,
    loads: Arc<Loads>,
    /// Each member's (generation, app map) as last indexed.
    seen: BTreeMap<String, (u64, shoal_membership::record::AppState)>,
}

impl ViewBuilder {
    /// The view of `view`, as seen by `me` (whose own published values are
    /// not indexed: a node knows its own copies first hand).
    pub fn build(&mut self, me: &str, view: &MembershipView) -> ClusterView {
        let index = Arc::make_mut(&mut self.index);
        let mut present: BTreeSet<&str> = BTreeSet::new();
        for m in &view.members {
            let name = m.record.name.as_str();
            if name == me {
                continue;
            }
            present.insert(name);
            let unchanged = self
                .seen
                .get(name)
                .is_some_and(|(g, app)| *g == m.generation && Arc::ptr_eq(app, &m.app));
            if unchanged {
                continue;
            }
            if self.seen.get(name).is_some_and(|(g, _)| *g != m.generation) {
                index.remove_node(name);
            }
            let node: Arc<str> = Arc::from(name);
            index.apply_node(&node, &m.app);
            self.seen
                .insert(name.to_string(), (m.generation, m.app.clone()));
        }
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|n| !present.contains(n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            index.remove_node(&n);
            self.seen.remove(&n);
        }
        // Members (and their ring) are rebuilt only when liveness or a
        // record changed; loads change far more often.
        let same_members = self.members.len() == view.members.len()
            && view.members.iter().all(|m| {
                self.members.get(&m.record.name).is_some_and(|old| {
                    old.generation == m.generation
                        && old.state == m.state
                        && *old.record == m.record
                })
            });
        if !same_members {
            self.members = Arc::new(Members::new(view.members.iter().map(|m| {
                MemberView {
                    name: Arc::from(m.record.name.as_str()),
                    generation: m.generation,
                    state: m.state,
                    record: self
                        .members
                        .get(&m.record.name)
                        .filter(|old| *old.record == m.record)
                        .map(|old| old.record.clone())
                        .unwrap_or_else(|| Arc::new(m.record.clone())),
                }
            })));
        }
        let same_loads = self.loads.len() == view.members.len()
            && view
                .members
                .iter()
                .all(|m| self.loads.get(m.record.name.as_str()) == Some(&m.load));
        if !same_loads {
            self.loads = Arc::new(
                view.members
                    .iter()
                    .map(|m| (Arc::from(m.record.name.as_str()), m.load))
                    .collect(),
            );
        }
        ClusterView {
            members: self.members.clone(),
            loads: self.loads.clone(),
            index: self.index.clone(),
        }
    }
}

/// A member for tests: `name` in `state`, with a minimal record.
#[cfg(test)]
pub(crate) fn test_member(name: &str, state: NodeState) -> MemberView {
    MemberView {
        name: Arc::from(name),
        generation: 1,
        state,
        record: Arc::new(NodeRecord {
            name: name.into(),
            address: "127.0.0.1:1".parse().unwrap(),
            labels: Default::default(),
            capacity: Default::default(),
            drivers: vec!["exec".into()],
            version: "t".into(),
            http: None,
            notes: Vec::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::SlotState;

    fn member(name: &str, state: NodeState) -> MemberView {
        test_member(name, state)
    }

    #[test]
    fn every_job_has_one_coordinator_and_it_owns_the_arc() {
        let names: Vec<String> = (0..7).map(|i| format!("n{i}")).collect();
        let members = Members::new(names.iter().map(|n| member(n, NodeState::Alive)));
        for j in 0..500 {
            let job = format!("job-{j}");
            let c = members.coordinator(&job).unwrap().to_string();
            let p = job_point(&job);
            let owners: Vec<&String> = names
                .iter()
                .filter(|n| {
                    members
                        .arcs_of(n)
                        .iter()
                        .any(|(lo, hi)| *lo <= p && p <= *hi)
                })
                .collect();
            assert_eq!(owners, vec![&c], "{job}");
        }
    }

    #[test]
    fn a_dead_member_hands_over_only_its_own_jobs() {
        let alive = Members::new((0..5).map(|i| member(&format!("n{i}"), NodeState::Alive)));
        let one_dead = Members::new((0..5).map(|i| {
            member(
                &format!("n{i}"),
                if i == 2 {
                    NodeState::Dead
                } else {
                    NodeState::Suspect
                },
            )
        }));
        for j in 0..500 {
            let job = format!("job-{j}");
            let before = alive.coordinator(&job).unwrap();
            let after = one_dead.coordinator(&job).unwrap();
            if &**before != "n2" {
                assert_eq!(before, after, "{job} moved although its coordinator lives");
            } else {
                assert_ne!(&**after, "n2");
            }
        }
    }

    fn app(entries: &[(&str, &str)]) -> BTreeMap<String, Arc<str>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), Arc::from(*v)))
            .collect()
    }

    fn bucket_value(job: &str, slots: &[u32]) -> (String, String) {
        let mut jobs = BTreeMap::new();
        jobs.insert(
            job.to_string(),
            slots
                .iter()
                .map(|s| Published {
                    health: Default::default(),
                    check: None,
                    checks_passing: 0,
                    checks_critical: 0,
                    stopping: false,
                    ready: false,
                    failed: false,
                    version: 0,
                    slot: *s,
                    run: 1,
                    state: SlotState::Running,
                    task: 7,
                    restarts: 0,
                    error: None,
                    ports: Default::default(),
                })
                .collect::<Vec<_>>(),
        );
        gossip::encode_bucket(PREFIX, gossip::bucket_of(job), &jobs)
            .pop()
            .unwrap()
    }

    #[test]
    fn the_index_follows_changes_and_removals() {
        let mut index = InstanceIndex::default();
        let a: Arc<str> = Arc::from("a");
        let (k, v) = bucket_value("web", &[0, 1]);
        index.apply_node(&a, &app(&[(&k, &v)]));
        assert_eq!(index.job("web").unwrap().slot(1).len(), 1);
        let stamp = index.change_of("web");
        // Same value again: nothing changes.
        index.apply_node(&a, &app(&[(&k, &v)]));
        assert_eq!(index.change_of("web"), stamp);
        let (k2, v2) = bucket_value("web", &[0]);
        assert_eq!(k, k2);
        index.apply_node(&a, &app(&[(&k2, &v2)]));
        assert!(index.job("web").unwrap().slot(1).is_empty());
        assert!(index.change_of("web") > stamp);
        index.remove_node("a");
        assert!(index.job("web").is_none());
    }
}
