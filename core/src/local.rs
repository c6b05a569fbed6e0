//! [`LocalInstances`]: the copies this node holds, one per (job, slot), and
//! what it last published about them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use shoal_membership::Load;
use shoal_placement::{Node, Resources};

pub use crate::gossip::KeyChange;
use crate::gossip::{self, BucketPublisher, PREFIX};
use crate::health::{CheckSpec, Health, Tracker};
use crate::instance::{InstanceId, Published, SlotState};
use crate::records::JobRecord;

/// One copy this node holds.
#[derive(Debug, Clone)]
pub struct Local {
    /// The current run.
    pub id: InstanceId,
    /// Driver that runs it.
    pub driver: String,
    /// The job record it was started from (its spec is what runs).
    pub record: Arc<JobRecord>,
    /// Fingerprint of the task it runs.
    pub task: u64,
    /// State.
    pub state: SlotState,
    /// Restarts so far on this node.
    pub restarts: u32,
    /// When the next run starts, while it waits out a backoff.
    pub restart_at: Option<Instant>,
    /// Stop requested: it is not restarted and goes when its end is
    /// reported.
    pub stopping: bool,
    /// When the stop was last requested (it is requested again if the copy
    /// has not ended well after the stop grace).
    pub stop_sent: Option<Instant>,
    /// Running and passing its checks for its own version's
    /// `min_healthy_time`, whatever version is current (set by the pass):
    /// rolling updates move on once a copy of the current task is ready.
    pub ready: bool,
    /// When the slot was placed here (kept across restarts of the copy).
    pub placed_at: Instant,
    /// It was ready at least once.
    pub was_ready: bool,
    /// Never ready within its job's `healthy_deadline` of being placed:
    /// the update to its version failed (set by the pass).
    pub failed: bool,
    /// Stopped to be restarted (a check with `restart = true` turned
    /// critical): its end takes the restart policy's path; the stop is
    /// requested again if it does not come.
    pub restarting: bool,
    /// When the stop signal goes, while a stopping copy waits out its
    /// task's `shutdown_delay` (shown stopping meanwhile).
    pub stop_at: Option<Instant>,
    /// A start was issued and its result has not come back yet.
    pub start_in_flight: bool,
    /// Why the last start failed, until a start succeeds.
    pub error: Option<String>,
    /// Found running after an agent restart (or a long stall) and not yet
    /// checked against the cluster: if another node runs the slot by now,
    /// this copy is the stale one and goes.
    pub unconfirmed: bool,
    /// The host port of each of the task's ports (dynamic ones as chosen
    /// at the start; kept across restarts of the copy).
    pub ports: BTreeMap<String, u16>,
    /// The number of the job version it runs (`v7`).
    pub seq: u64,
    /// The health checks of the task it runs.
    pub checks: Vec<CheckSpec>,
    /// Its checks' streaks since the current run started (`None` until it
    /// runs).
    pub tracker: Option<Tracker>,
}

impl Local {
    /// Its health: that of its checks while it runs (passing without
    /// checks), else unknown.
    pub fn health(&self) -> Health {
        match (&self.tracker, self.state) {
            (Some(t), SlotState::Running) => t.health(),
            (None, SlotState::Running) if self.checks.is_empty() => Health::Passing,
            _ => Health::Unknown,
        }
    }

    /// [`Published::ready_on`] of this copy, without building it.
    pub fn ready_on(&self, task: Option<u64>) -> bool {
        task.is_none_or(|t| self.task == t)
            && self.ready
            && self.state == SlotState::Running
            && !self.stopping
    }

    /// This copy as published in gossip.
    pub fn published(&self) -> Published {
        Published {
            slot: self.id.slot,
            run: self.id.run,
            state: self.state,
            task: self.task,
            restarts: self.restarts,
            error: self.error.clone(),
            ports: self.ports.clone(),
            health: self.health(),
            stopping: self.stopping,
            ready: self.ready && !self.stopping,
            failed: self.failed,
            version: self.seq,
            check: match (&self.tracker, self.state) {
                (Some(t), SlotState::Running) => t.reason(&self.checks),
                _ => None,
            },
            checks_passing: self.tracker.as_ref().map_or(0, |t| t.masks().0),
            checks_critical: self.tracker.as_ref().map_or(0, |t| t.masks().1),
        }
    }

    /// Whether its process may still run: live, or being stopped (a
    /// stopping copy leaves the table when its end is reported).
    pub fn holds_resources(&self) -> bool {
        self.state.is_live() || self.stopping
    }

    /// How long it has between the stop signal and the kill: its task's
    /// `kill_timeout`, else `default` (the node's stop grace).
    pub fn stop_grace(&self, default: std::time::Duration) -> std::time::Duration {
        self.record
            .spec
            .as_ref()
            .and_then(|s| s.task.kill_timeout)
            .unwrap_or(default)
    }

    /// What it reserves on the node.
    pub fn resources(&self) -> Resources {
        self.record
            .spec
            .as_ref()
            .map(|s| Resources {
                cpu_millis: s.task.resources.cpu,
                memory_mib: s.task.resources.memory,
            })
            .unwrap_or_default()
    }

    /// Host ports it binds (a copy adopted from an earlier release has
    /// only its static ones, from the spec).
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.values().copied().chain(
            self.record
                .spec
                .iter()
                .flat_map(|s| s.task.ports.values().copied())
                .filter(|p| *p != 0),
        )
    }
}

/// The copies this node holds.
#[derive(Debug)]
pub struct LocalInstances {
    by_slot: BTreeMap<(String, u32), Local>,
    /// The instance keys as last published.
    published: BucketPublisher<Published>,
    published_load: Option<Load>,
    published_ports: Option<String>,
}

impl Default for LocalInstances {
    fn default() -> Self {
        LocalInstances {
            by_slot: BTreeMap::new(),
            published: BucketPublisher::new(PREFIX),
            published_load: None,
            published_ports: None,
        }
    }
}

impl LocalInstances {
    /// The copy of a slot.
    pub fn get(&self, job: &str, slot: u32) -> Option<&Local> {
        self.by_slot.get(&(job.to_string(), slot))
    }

    /// The copy of a slot, mutable.
    pub fn get_mut(&mut self, job: &str, slot: u32) -> Option<&mut Local> {
        self.by_slot.get_mut(&(job.to_string(), slot))
    }

    /// The copy of a slot if it is run `run`.
    pub fn get_run_mut(&mut self, id: &InstanceId) -> Option<&mut Local> {
        self.by_slot
            .get_mut(&(id.job.clone(), id.slot))
            .filter(|l| l.id == *id)
    }

    /// Adds or replaces a slot's copy.
    pub fn insert(&mut self, local: Local) {
        self.by_slot
            .insert((local.id.job.clone(), local.id.slot), local);
    }

    /// Forgets a slot's copy.
    pub fn remove(&mut self, job: &str, slot: u32) -> Option<Local> {
        self.by_slot.remove(&(job.to_string(), slot))
    }

    /// Every copy.
    pub fn iter(&self) -> impl Iterator<Item = &Local> {
        self.by_slot.values()
    }

    /// Every copy, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Local> {
        self.by_slot.values_mut()
    }

    /// Number of copies.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }

    /// Every copy of one job on this node.
    pub fn of_job<'a>(&'a self, job: &'a str) -> impl Iterator<Item = &'a Local> + 'a {
        self.by_slot
            .range((job.to_string(), 0)..=(job.to_string(), u32::MAX))
            .map(|(_, l)| l)
    }

    /// Live copies of one job on this node (distinct_hosts checks it).
    pub fn live_of_job<'a>(&'a self, job: &'a str) -> impl Iterator<Item = &'a Local> + 'a {
        self.by_slot
            .range((job.to_string(), 0)..=(job.to_string(), u32::MAX))
            .map(|(_, l)| l)
            .filter(|l| l.state.is_live())
    }

    /// This node as placement sees it: its capacity and labels from its
    /// record, its load and ports from its live copies (fresh, unlike the
    /// load gossip carries).
    pub fn fresh_node(
        &self,
        me: &str,
        record: Option<&shoal_membership::NodeRecord>,
        drivers: &BTreeSet<String>,
    ) -> Node {
        let mut node = Node::new(me.to_string(), 0, 0);
        if let Some(r) = record {
            node.capacity = Resources {
                cpu_millis: r.capacity.cpu_millis,
                memory_mib: r.capacity.memory_mib,
            };
            node.labels = r.labels.clone();
        }
        node.drivers = drivers.clone();
        // A copy being stopped holds its resources and host ports until
        // its process is gone (found by the simulator, seed 35: a new copy
        // started beside an outdated one still stopping could not bind
        // its port).
        for l in self.by_slot.values().filter(|l| l.holds_resources()) {
            node.used = node.used.plus(l.resources());
            node.ports_used.extend(l.ports());
        }
        node
    }

    /// The load to publish.
    pub fn load(&self) -> Load {
        let mut load = Load::default();
        for l in self.by_slot.values().filter(|l| l.holds_resources()) {
            let r = l.resources();
            load.cpu_millis = load.cpu_millis.saturating_add(r.cpu_millis);
            load.memory_mib = load.memory_mib.saturating_add(r.memory_mib);
            if l.state.is_live() {
                load.instances += 1;
            }
        }
        load
    }

    /// The gossip key changes that publish the current copies (those not
    /// held back as unconfirmed), re-encoding only buckets that changed,
    /// and the load if it changed.
    pub fn publication(&mut self) -> (Vec<KeyChange>, Option<Load>) {
        let mut entries: BTreeMap<String, Vec<Published>> = BTreeMap::new();
        for l in self.by_slot.values().filter(|l| !l.unconfirmed) {
            entries
                .entry(l.id.job.clone())
                .or_default()
                .push(l.published());
        }
        let mut out = self.published.publish(entries);
        let ports: std::collections::BTreeSet<u16> = self
            .by_slot
            .values()
            .filter(|l| l.holds_resources())
            .flat_map(|l| l.ports())
            .collect();
        let ports = (!ports.is_empty()).then(|| {
            serde_json::to_string(&ports.into_iter().collect::<Vec<_>>()).unwrap_or_default()
        });
        if ports != self.published_ports {
            self.published_ports = ports.clone();
            out.push((gossip::PORTS_KEY.to_string(), ports));
        }
        let load = self.load();
        let load_change = (self.published_load != Some(load)).then(|| {
            self.published_load = Some(load);
            load
        });
        (out, load_change)
    }
}
