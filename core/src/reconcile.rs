//! The reconciler's rules: pure functions from what should run (a job's
//! record and completions), what runs (the copies live nodes publish) and
//! the membership to what one node must do. Every node applies them on
//! every pass; each acts only on its own share, so together they converge
//! without a leader.
//!
//! - A job's empty slots are placed by its coordinator (the owner of the
//!   job's point on the ring of live members, see
//!   [`crate::view::Members::coordinator`]). One coordinator per job, not
//!   per slot, so that the job's rules (distinct hosts, spread, ports, even
//!   counts per node) are applied by one node that sees all of its own
//!   choices.
//! - Two copies of one slot: the conflict rule keeps the older; the holder
//!   of the other stops it.
//! - A holder stops copies of stopped jobs, of slots beyond the replica
//!   count, of an outdated task, and of finished batch slots.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_placement::{conflict_order, RunningCopy};

use crate::instance::{Published, SlotState};
use crate::job::{JobSpec, JobType};
use crate::records::JobRecord;
use crate::update::Order;
use crate::view::{MemberView, Members};

/// Why a copy stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// A system job's copy on a node that no longer qualifies (its labels
    /// or the job's constraints changed, or a drain reached it).
    Ineligible,
    /// Its node drains: a ready copy of the slot runs elsewhere, or the
    /// drain's deadline passed.
    Drained,
    /// A `partition = "never"` job's slot that another node holds, or
    /// whose claim on this node was forgotten (`shoal node forget`).
    Unclaimed,
}

/// Whether a batch slot is finished: completed (recorded, or a copy says
/// so) or failed for good somewhere.
pub fn finished<'a>(
    spec: &JobSpec,
    completed: bool,
    copies: impl IntoIterator<Item = &'a Published>,
) -> bool {
    spec.job_type == JobType::Batch
        && (completed
            || copies
                .into_iter()
                .any(|c| matches!(c.state, SlotState::Completed | SlotState::Failed)))
}

/// Whether the old copy of `slot` may stop now, by the job's rolling
/// update (see [`crate::update`]): a batch slot's at once; a service
/// slot's once the slot is `ready` (a copy of the current task passes
/// elsewhere: the old one is surplus, also stop-first, where a partition
/// can leave one behind), and stop-first also once the slot is in the
/// `window`.
pub fn old_copy_may_stop(spec: &JobSpec, ready: bool, in_window: bool) -> bool {
    match (spec.job_type, spec.update.order) {
        (JobType::Batch, _) => true,
        (_, Order::StartFirst) => ready,
        (_, Order::StopFirst) => ready || in_window,
    }
}

/// Whether a slot that has a live old copy (and no live copy of the
/// current task) may be placed now: a batch slot at once; a service slot,
/// start-first, when it is in the `window`; stop-first, never (its old
/// copy stops first, and the slot is then placed as an empty one).
pub fn place_beside_old_copy(spec: &JobSpec, in_window: bool) -> bool {
    match (spec.job_type, spec.update.order) {
        (JobType::Batch, _) => true,
        (_, Order::StartFirst) => in_window,
        (_, Order::StopFirst) => false,
    }
}

/// What this node must do about its own live copy `mine` of a slot, given
/// the job's spec and task fingerprint (`None`: stopped or unknown), whether
/// the slot is finished, whether an outdated copy may stop now
/// ([`old_copy_may_stop`]), the other live copies of the slot on live
/// nodes: `(node, copy)`, and which nodes drain (`leaving`).
///
/// A service copy on a draining node gives way once a copy of the same
/// task elsewhere is ready, and never beats one elsewhere by the conflict
/// rule (the new copy its coordinator placed would stop instead, and the
/// slot would go on moving forever).
pub fn own_copy_stop<'a>(
    me: &str,
    job: Option<(&JobSpec, u64)>,
    finished: bool,
    old_may_stop: bool,
    mine: &Published,
    others: impl IntoIterator<Item = (&'a str, &'a Published)>,
    leaving: impl Fn(&str) -> bool,
) -> Option<StopReason> {
    let Some((spec, fp)) = job else {
        return Some(StopReason::JobStopped);
    };
    if mine.slot >= spec.slots() {
        return Some(StopReason::ScaledDown);
    }
    if mine.task != fp {
        return old_may_stop.then_some(StopReason::Outdated);
    }
    if finished {
        return Some(StopReason::Finished);
    }
    // Of the live copies of the current task, the older stays.
    let me_copy = RunningCopy {
        node: me.to_string(),
        started: mine.run,
    };
    // Only a service moves start-first: a batch copy on a draining node
    // runs on until the deadline, one copy per slot as anywhere.
    let leaving = |n: &str| spec.job_type == JobType::Service && leaving(n);
    let me_leaving = leaving(me);
    let same: Vec<(&str, &Published)> = others
        .into_iter()
        .filter(|(n, c)| *n != me && c.state.is_live() && c.task == fp)
        .collect();
    if me_leaving
        && same
            .iter()
            .any(|(n, c)| !leaving(n) && c.ready_on(Some(fp)))
    {
        return Some(StopReason::Drained);
    }
    let beaten = same
        .into_iter()
        .filter(|(n, _)| leaving(n) == me_leaving)
        .any(|(n, c)| {
            conflict_order(
                &RunningCopy {
                    node: n.to_string(),
                    started: c.run,
                },
                &me_copy,
            )
            .is_lt()
        });
    beaten.then_some(StopReason::Duplicate)
}

/// Whether a slot needs placing: below the replica count, not finished,
/// and no live copy of the current task anywhere.
pub fn needs_placing<'a>(
    spec: &JobSpec,
    fp: u64,
    slot: u32,
    finished: bool,
    copies: impl IntoIterator<Item = &'a Published>,
) -> bool {
    slot < spec.slots()
        && !finished
        && !copies
            .into_iter()
            .any(|c| c.state.is_live() && c.task == fp)
}

/// A copy seen on some node (for whole-cluster checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The node holding it.
    pub node: Arc<str>,
    /// Job name.
    pub job: Arc<str>,
    /// What the node published.
    pub copy: Published,
}

/// Everything one node looks at, as plain lists (tests and tools; the
/// scheduler applies the same rules to its indexed state).
pub struct Inputs<'a> {
    /// This node's name.
    pub me: &'a str,
    /// Every job record (tombstones included).
    pub jobs: &'a [JobRecord],
    /// Completed batch slots.
    pub completed: &'a BTreeSet<(String, u32)>,
    /// Copies on live nodes (this node's own included).
    pub observed: &'a [Observed],
    /// The live members (this node included).
    pub members: &'a [String],
    /// Slots whose placement this node has in flight.
    pub pending: &'a BTreeSet<(String, u32)>,
}

/// What this node must do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Actions {
    /// Slots to place (this node coordinates them).
    pub place: Vec<(String, u32)>,
    /// This node's copies to stop: (job, slot, run, why).
    pub stop: Vec<(String, u32, u64, StopReason)>,
}

/// Applies the rules for one node to a whole cluster given as lists.
pub fn reconcile(inp: &Inputs) -> Actions {
    let mut actions = Actions::default();
    let members = Members::new(inp.members.iter().map(|m| MemberView {
        name: Arc::from(m.as_str()),
        generation: 1,
        state: shoal_membership::NodeState::Alive,
        record: Arc::new(shoal_membership::NodeRecord::bare(
            m,
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        )),
    }));
    // System jobs are outside this model: each node decides for itself
    // (`Scheduler::system_jobs`), and their copies are all slot 0. A cron
    // job has no slots (its runs are batch jobs of their own).
    let system: BTreeSet<&str> = inp
        .jobs
        .iter()
        .filter(|r| {
            r.spec
                .as_ref()
                .is_some_and(|s| matches!(s.job_type, JobType::System | JobType::Cron))
        })
        .map(|r| r.name.as_str())
        .collect();
    let live_jobs: BTreeMap<&str, (&JobSpec, u64)> = inp
        .jobs
        .iter()
        .filter(|r| !system.contains(r.name.as_str()))
        .filter_map(|r| {
            r.spec
                .as_ref()
                .map(|s| (r.name.as_str(), (s, s.task.fingerprint())))
        })
        .collect();
    let mut by_slot: BTreeMap<(&str, u32), Vec<&Observed>> = BTreeMap::new();
    for o in inp.observed {
        by_slot.entry((&*o.job, o.copy.slot)).or_default().push(o);
    }
    let ready = |job: &str, slot: u32, fp: u64| {
        by_slot.get(&(job, slot)).is_some_and(|cs| {
            cs.iter().any(|o| {
                o.copy.task == fp
                    && o.copy.ready
                    && o.copy.state == SlotState::Running
                    && !o.copy.stopping
            })
        })
    };
    let windows: BTreeMap<&str, Vec<u32>> = live_jobs
        .iter()
        .map(|(name, (spec, fp))| {
            (
                *name,
                crate::update::window(spec.replicas, spec.update.max_parallel, |s| {
                    ready(name, s, *fp)
                }),
            )
        })
        .collect();
    let is_finished = |job: &str, slot: u32, spec: &JobSpec| {
        let copies = by_slot.get(&(job, slot)).map(Vec::as_slice).unwrap_or(&[]);
        finished(
            spec,
            inp.completed.contains(&(job.to_string(), slot)),
            copies.iter().map(|o| &o.copy),
        )
    };
    for o in inp
        .observed
        .iter()
        .filter(|o| &*o.node == inp.me && o.copy.state.is_live())
        .filter(|o| !system.contains(&*o.job))
    {
        let job = live_jobs.get(&*o.job).copied();
        let fin = job.is_some_and(|(spec, _)| is_finished(&o.job, o.copy.slot, spec));
        let others = by_slot
            .get(&(&*o.job, o.copy.slot))
            .into_iter()
            .flatten()
            .map(|x| (&*x.node, &x.copy));
        let may_stop = job.is_some_and(|(spec, fp)| {
            old_copy_may_stop(
                spec,
                ready(&o.job, o.copy.slot, fp),
                windows
                    .get(&*o.job)
                    .is_some_and(|w| w.contains(&o.copy.slot)),
            )
        });
        if let Some(r) = own_copy_stop(inp.me, job, fin, may_stop, &o.copy, others, |_| false) {
            actions
                .stop
                .push((o.job.to_string(), o.copy.slot, o.copy.run, r));
        }
    }
    for (name, (spec, fp)) in &live_jobs {
        if members.coordinator(name).map(|c| &**c) != Some(inp.me) {
            continue;
        }
        for slot in 0..spec.replicas {
            let copies = by_slot
                .get(&(*name, slot))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let key = (name.to_string(), slot);
            let beside_old = copies
                .iter()
                .any(|o| o.copy.state.is_live() && o.copy.task != *fp);
            let gate = !beside_old
                || place_beside_old_copy(
                    spec,
                    windows.get(name).is_some_and(|w| w.contains(&slot)),
                );
            if gate
                && needs_placing(
                    spec,
                    *fp,
                    slot,
                    is_finished(name, slot, spec),
                    copies.iter().map(|o| &o.copy),
                )
                && !inp.pending.contains(&key)
            {
                actions.place.push(key);
            }
        }
    }
    actions
        .stop
        .sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    actions
}

#[cfg(test)]
mod tests;
