//! The reconciler: a pure function from what should run (jobs), what runs
//! (instances published by live nodes) and the membership to what this
//! node must do. Every node runs it on every change and on a timer; each
//! acts only on its own share, so together they converge without a leader.
//!
//! - A slot with no copy is placed by its coordinator (the slot's
//!   rendezvous favourite among live nodes, see
//!   [`shoal_placement::coordinator_with`]), which gathers bids.
//! - Two copies of one slot: the conflict rule keeps the older; the holder
//!   of the other stops it.
//! - A holder stops copies of stopped jobs, of slots beyond the replica
//!   count and of an outdated task.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_placement::hrw::node_hash;
use shoal_placement::{conflict_order, coordinator, RunningCopy};

use crate::job::{JobSpec, JobType};
use crate::store::JobRecord;

/// A slot copy's state as shown to users and published in gossip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Not placed yet.
    Pending,
    /// Placed, starting (or restarting after an exit).
    Starting,
    /// Running.
    Running,
    /// Ran to completion (batch).
    Completed,
    /// Gave up (batch slot out of retries).
    Failed,
}

impl SlotState {
    /// Counts as a live copy of its slot.
    pub fn is_live(self) -> bool {
        matches!(self, SlotState::Starting | SlotState::Running)
    }
}

/// An instance as its node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Slot index.
    #[serde(rename = "s")]
    pub slot: u32,
    /// Run id (packed HLC of its start: older runs sort first).
    #[serde(rename = "r")]
    pub run: u64,
    /// State.
    #[serde(rename = "t")]
    pub state: SlotState,
    /// Fingerprint of the task it runs.
    #[serde(rename = "f")]
    pub task: u64,
    /// Restarts of the slot on this node so far.
    #[serde(rename = "n", default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Why the last start failed (cleared by a start that succeeds).
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An instance seen on some node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The node holding it.
    pub node: std::sync::Arc<str>,
    /// Job name.
    pub job: std::sync::Arc<str>,
    /// What the node published.
    pub copy: Published,
}

/// Everything the reconciler looks at.
pub struct Inputs<'a> {
    /// This node's name.
    pub me: &'a str,
    /// Every job record (tombstones included).
    pub jobs: &'a [JobRecord],
    /// Completed batch slots.
    pub completed: &'a BTreeSet<(String, u32)>,
    /// Instances on live nodes (this node's own from its local table).
    pub observed: &'a [Observed],
    /// Names of the alive members (this node included): who coordinates a
    /// slot depends on these alone, so every node agrees while membership
    /// agrees, whatever else it knows of the others yet.
    pub members: &'a [String],
    /// Slots whose placement this node has in flight.
    pub pending: &'a BTreeSet<(String, u32)>,
    /// Task fingerprints of the live jobs, if the caller keeps them (else
    /// computed here).
    pub task_fingerprints: Option<&'a std::collections::HashMap<String, u64>>,
}

/// Why a copy stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The job was stopped.
    JobStopped,
    /// The slot is beyond the replica count.
    ScaledDown,
    /// The task changed.
    Outdated,
    /// Another copy of the slot wins the conflict rule.
    Duplicate,
    /// The batch slot already completed (or failed for good).
    Finished,
    /// Found again after an agent restart or a stall while another node
    /// runs the slot by now: the cluster moved on without this copy.
    Superseded,
}

/// What this node must do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Actions {
    /// Slots to place (this node coordinates them).
    pub place: Vec<(String, u32)>,
    /// This node's copies to stop: (job, slot, run, why).
    pub stop: Vec<(String, u32, u64, StopReason)>,
}

/// Computes this node's actions.
pub fn reconcile(inp: &Inputs) -> Actions {
    let mut actions = Actions::default();
    let live_jobs: BTreeMap<&str, &JobSpec> = inp
        .jobs
        .iter()
        .filter_map(|r| r.spec.as_ref().map(|s| (r.name.as_str(), s)))
        .collect();
    let fingerprints: BTreeMap<&str, u64> = live_jobs
        .iter()
        .map(|(n, s)| {
            let cached = inp.task_fingerprints.and_then(|f| f.get(*n).copied());
            (*n, cached.unwrap_or_else(|| s.task.fingerprint()))
        })
        .collect();
    let mut by_slot: BTreeMap<(&str, u32), Vec<&Observed>> = BTreeMap::new();
    for o in inp.observed {
        by_slot.entry((&*o.job, o.copy.slot)).or_default().push(o);
    }

    // Copies this node holds that must go.
    for o in inp
        .observed
        .iter()
        .filter(|o| &*o.node == inp.me && o.copy.state.is_live())
    {
        let reason = match live_jobs.get(&*o.job) {
            None => Some(StopReason::JobStopped),
            Some(spec) if o.copy.slot >= spec.replicas => Some(StopReason::ScaledDown),
            Some(_) if fingerprints.get(&*o.job) != Some(&o.copy.task) => {
                Some(StopReason::Outdated)
            }
            Some(_) => None,
        };
        if let Some(r) = reason {
            actions
                .stop
                .push((o.job.to_string(), o.copy.slot, o.copy.run, r));
        }
    }

    let member_hashes: Vec<(u64, &str)> = inp
        .members
        .iter()
        .map(|m| (node_hash(m), m.as_str()))
        .collect();
    for (name, spec) in &live_jobs {
        let fp = fingerprints[name];
        for slot in 0..spec.replicas {
            let key = (name.to_string(), slot);
            let copies = by_slot
                .get(&(*name, slot))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let finished = spec.job_type == JobType::Batch
                && (inp.completed.contains(&key)
                    || copies
                        .iter()
                        .any(|o| matches!(o.copy.state, SlotState::Completed | SlotState::Failed)));
            if finished {
                // A finished batch slot never runs again.
                for o in copies
                    .iter()
                    .filter(|o| &*o.node == inp.me && o.copy.state.is_live())
                {
                    actions
                        .stop
                        .push((name.to_string(), slot, o.copy.run, StopReason::Finished));
                }
                continue;
            }
            let live: Vec<&&Observed> = copies
                .iter()
                .filter(|o| o.copy.state.is_live() && o.copy.task == fp)
                .collect();
            if live.len() >= 2 {
                let keep = live
                    .iter()
                    .map(|o| RunningCopy {
                        node: o.node.to_string(),
                        started: o.copy.run,
                    })
                    .min_by(conflict_order)
                    .expect("two or more");
                for o in &live {
                    if &*o.node == inp.me && !(*o.node == *keep.node && o.copy.run == keep.started)
                    {
                        actions.stop.push((
                            name.to_string(),
                            slot,
                            o.copy.run,
                            StopReason::Duplicate,
                        ));
                    }
                }
            }
            if live.is_empty()
                && !inp.pending.contains(&key)
                && coordinator(name, slot, &member_hashes) == Some(inp.me)
            {
                actions.place.push(key);
            }
        }
    }
    actions
        .stop
        .sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    actions
        .stop
        .dedup_by(|a, b| (&a.0, a.1, a.2) == (&b.0, b.1, b.2));
    actions
}

#[cfg(test)]
mod tests;
