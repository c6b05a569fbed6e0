//! Gossip, modelled: what nodes publish (load and application keys) reaches
//! the nodes of the same network component in epochs, each node picking up
//! an epoch at most `gossip_lag_max` old. The index of published copies is
//! built once per component and epoch with the core's own
//! [`InstanceIndex`] and shared by every node of the component (an index
//! per node would not fit in one process at thousands of nodes).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use shoal_core::view::{InstanceIndex, Loads};
use shoal_membership::Load;

/// What one node publishes now.
#[derive(Debug, Clone, Default)]
pub struct Publication {
    /// Generation of the process that published it.
    pub generation: u64,
    /// Its load.
    pub load: Load,
    /// Its application keys.
    pub app: BTreeMap<String, Arc<str>>,
    /// Its SWIM incarnation (gossip carries refutations to nodes that
    /// missed them, and brings back nodes declared dead in a partition).
    pub incarnation: u64,
    /// It left the cluster.
    pub left: bool,
}

/// What gossip says of a node besides its application keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    /// Generation (0: never heard of).
    pub generation: u64,
    /// Load.
    pub load: Load,
    /// SWIM incarnation.
    pub incarnation: u64,
    /// Left.
    pub left: bool,
}

/// One epoch of one component's gossip.
#[derive(Debug, Clone)]
pub struct Epoch {
    /// Sequence number (per lineage, increasing).
    pub seq: u64,
    /// When it was committed.
    pub at: Duration,
    /// The index of published copies.
    pub index: Arc<InstanceIndex>,
    /// What gossip says of each node.
    pub peers: Arc<Vec<Peer>>,
    /// Each node's load, by name.
    pub loads: Arc<Loads>,
}

/// The gossip state a network component agrees on, epoch by epoch.
#[derive(Debug, Clone)]
pub struct Lineage {
    index: Arc<InstanceIndex>,
    peers: Arc<Vec<Peer>>,
    loads: Arc<Loads>,
    /// Generation of each node as indexed.
    indexed_gen: Vec<u64>,
    /// Recent epochs, oldest first (bounded by `EPOCHS_KEPT`).
    pub epochs: VecDeque<Epoch>,
    next_seq: u64,
}

/// Epochs kept per lineage: enough to serve the largest lag (800 ms of
/// 100 ms epochs) with room. Each epoch shares what did not change with the
/// next, but a storm of placements changes every job each epoch, and 64
/// epochs of a million copies took over 13 GB.
const EPOCHS_KEPT: usize = 12;

impl Lineage {
    fn new(n: usize) -> Lineage {
        Lineage {
            index: Arc::new(InstanceIndex::default()),
            peers: Arc::new(vec![Peer::default(); n]),
            loads: Arc::new(Loads::new()),
            indexed_gen: vec![0; n],
            epochs: VecDeque::new(),
            next_seq: 1,
        }
    }

    fn apply(&mut self, node: usize, name: &Arc<str>, p: &Publication) {
        let index = Arc::make_mut(&mut self.index);
        if self.indexed_gen[node] != p.generation {
            index.remove_node(name);
            self.indexed_gen[node] = p.generation;
        }
        index.apply_node(name, &p.app);
        if self.loads.get(name) != Some(&p.load) {
            Arc::make_mut(&mut self.loads).insert(name.clone(), p.load);
        }
        Arc::make_mut(&mut self.peers)[node] = Peer {
            generation: p.generation,
            load: p.load,
            incarnation: p.incarnation,
            left: p.left,
        };
    }

    fn commit(&mut self, at: Duration) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.epochs.push_back(Epoch {
            seq,
            at,
            index: self.index.clone(),
            peers: self.peers.clone(),
            loads: self.loads.clone(),
        });
        while self.epochs.len() > EPOCHS_KEPT {
            self.epochs.pop_front();
        }
    }

    /// The newest epoch committed at or before `at`, if any.
    pub fn at_or_before(&self, at: Duration) -> Option<&Epoch> {
        self.epochs.iter().rev().find(|e| e.at <= at)
    }

    /// The newest epoch.
    pub fn latest(&self) -> Option<&Epoch> {
        self.epochs.back()
    }
}

/// Gossip of the whole simulated cluster.
#[derive(Debug)]
pub struct Gossip {
    names: Vec<Arc<str>>,
    /// What each node publishes now.
    pub published: Vec<Publication>,
    /// Nodes whose publication changed since the last commit.
    dirty: BTreeSet<usize>,
    /// One lineage per network component.
    pub lineages: BTreeMap<u32, Lineage>,
    /// Bytes of application values published (a change's value counts
    /// once: that is what gossip carries to each peer).
    pub bytes_published: u64,
}

impl Gossip {
    /// Gossip among `names`, all in component 0.
    pub fn new(names: Vec<Arc<str>>) -> Gossip {
        let n = names.len();
        Gossip {
            published: vec![Publication::default(); n],
            names,
            dirty: BTreeSet::new(),
            lineages: BTreeMap::from([(0, Lineage::new(n))]),
            bytes_published: 0,
        }
    }

    /// A node's key changed.
    pub fn set_key(&mut self, node: usize, key: String, value: Option<String>) {
        let p = &mut self.published[node];
        match value {
            Some(v) => {
                self.bytes_published += (key.len() + v.len()) as u64;
                p.app.insert(key, Arc::from(v));
            }
            None => {
                p.app.remove(&key);
            }
        }
        self.dirty.insert(node);
    }

    /// A node's load changed.
    pub fn set_load(&mut self, node: usize, load: Load) {
        if self.published[node].load != load {
            self.published[node].load = load;
            self.dirty.insert(node);
        }
    }

    /// A node's SWIM incarnation or leave changed.
    pub fn set_liveness(&mut self, node: usize, incarnation: u64, left: bool) {
        let p = &mut self.published[node];
        if (p.incarnation, p.left) != (incarnation, left) {
            p.incarnation = incarnation;
            p.left = left;
            self.dirty.insert(node);
        }
    }

    /// A node started a new generation: it publishes nothing yet.
    pub fn restart(&mut self, node: usize, generation: u64) {
        self.published[node] = Publication {
            generation,
            ..Publication::default()
        };
        self.dirty.insert(node);
    }

    /// Commits the changes of the nodes in each component to that
    /// component's lineage, as one epoch.
    pub fn commit(&mut self, at: Duration, component_of: &[u32]) {
        let dirty = std::mem::take(&mut self.dirty);
        for node in dirty {
            let c = component_of[node];
            if let Some(l) = self.lineages.get_mut(&c) {
                l.apply(node, &self.names[node], &self.published[node]);
            }
        }
        for l in self.lineages.values_mut() {
            l.commit(at);
        }
    }

    /// The network split into `components` (node -> component): each new
    /// component starts from the lineage of the component its first node
    /// was in, keeping what it knew of everyone.
    pub fn split(&mut self, before: &[u32], after: &[u32]) {
        let mut lineages = BTreeMap::new();
        for (node, c) in after.iter().enumerate() {
            if lineages.contains_key(c) {
                continue;
            }
            let from = self
                .lineages
                .get(&before[node])
                .cloned()
                .unwrap_or_else(|| Lineage::new(self.names.len()));
            lineages.insert(*c, from);
        }
        self.lineages = lineages;
    }

    /// The network healed into one component: one lineage that has every
    /// node's latest publication.
    pub fn heal(&mut self, at: Duration) {
        let next_seq = self
            .lineages
            .values()
            .map(|l| l.next_seq)
            .max()
            .unwrap_or(1);
        let mut l = self
            .lineages
            .values()
            .next()
            .cloned()
            .unwrap_or_else(|| Lineage::new(self.names.len()));
        l.next_seq = next_seq;
        for node in 0..self.names.len() {
            l.apply(node, &self.names[node], &self.published[node]);
        }
        l.commit(at);
        self.lineages = BTreeMap::from([(0, l)]);
        self.dirty.clear();
    }
}
