//! What the API shows, read from a [`Scheduler`]: each job's slots with
//! their holder, state and — for a slot that waits — the reason its
//! coordinator published, the same at every node.

use std::sync::Arc;
use std::time::Instant;

use crate::instance::{Published, SlotState};
use crate::records::JobRecord;
use crate::scheduler::Scheduler;

/// One slot of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// Slot index.
    pub slot: u32,
    /// Holder node, if placed.
    pub node: Option<String>,
    /// State.
    pub state: SlotState,
    /// Why it is pending, failed or stopping, if known.
    pub reason: Option<String>,
    /// Restarts of the holder's copy.
    pub restarts: u32,
    /// Placement attempts of a pending slot so far.
    pub attempts: u32,
    /// Host ports of the holder's copy, by name.
    pub ports: std::collections::BTreeMap<String, u16>,
    /// The holder's copy's health.
    pub health: crate::health::Health,
    /// Why its check is critical.
    pub check: Option<String>,
    /// The number of the job version it runs (0: none or unknown).
    pub version: u64,
    /// Ready: passing for the job's `min_healthy_time`.
    pub ready: bool,
    /// Live copies of the slot (two while a rolling update replaces it).
    pub copies: u32,
}

impl SlotStatus {
    /// A slot (or a system job's node) shown by the copy `c` on `node`,
    /// in `state`, with `reason` (`copies` is counted later).
    fn of_copy(node: &str, c: &Published, state: SlotState, reason: Option<String>) -> Self {
        SlotStatus {
            slot: c.slot,
            node: Some(node.to_string()),
            state,
            reason,
            restarts: c.restarts,
            attempts: 0,
            ports: c.ports.clone(),
            health: c.health,
            check: c.check.clone(),
            version: c.version,
            ready: c.ready,
            copies: 0,
        }
    }

    /// A slot with no copy shown: `state`, on `node` (a system job's), and
    /// why with the attempts so far.
    fn without_copy(
        slot: u32,
        node: Option<String>,
        state: SlotState,
        reason: Option<String>,
        attempts: u32,
    ) -> Self {
        SlotStatus {
            slot,
            node,
            state,
            reason,
            restarts: 0,
            attempts,
            ports: Default::default(),
            health: Default::default(),
            check: None,
            version: 0,
            ready: false,
            copies: 0,
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// Its record.
    pub record: Arc<JobRecord>,
    /// Every slot below the replica count, then copies beyond it that are
    /// still stopping.
    pub slots: Vec<SlotStatus>,
    /// The current version's deployment (services).
    pub deployment: Option<crate::deployment::Deployment>,
    /// A system job's nodes: the alive ones that qualify for it.
    pub nodes: Option<u32>,
    /// A cron job's runs, oldest first (the kept ones: `history` finished
    /// and those running).
    pub runs: Vec<crate::cron::Run>,
}

/// One copy on some node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    /// Job.
    pub job: String,
    /// Holder.
    pub node: String,
    /// What it publishes.
    pub copy: Published,
}

/// Every copy on a live node (this node's own first hand), by job.
pub fn instances(s: &Scheduler, now: Instant) -> Vec<InstanceRow> {
    let mut out = Vec::new();
    for (job, copies) in s.seen().view.index.jobs() {
        for (_, node, c) in copies.iter() {
            if s.seen().counts(s.me(), node, now) {
                out.push(InstanceRow {
                    job: job.to_string(),
                    node: node.to_string(),
                    copy: c.clone(),
                });
            }
        }
    }
    for l in s.local().iter().filter(|l| !l.unconfirmed) {
        out.push(InstanceRow {
            job: l.id.job.clone(),
            node: s.me().to_string(),
            copy: l.published(),
        });
    }
    out.sort_by(|a, b| (&a.job, a.copy.slot, &a.node).cmp(&(&b.job, b.copy.slot, &b.node)));
    out
}

/// One job's status.
pub fn job_status(s: &Scheduler, name: &str, now: Instant) -> Option<JobStatus> {
    // A node's setting and a slot's claim share the records' map; they
    // are no job.
    if crate::records::node_of_record(name).is_some()
        || crate::records::claim_of_record(name).is_some()
    {
        return None;
    }
    let record = s.desired().get(name)?.clone();
    Some(status_of(s, record, &s.copies_of(name, now), now))
}

/// Every live job's status.
pub fn job_statuses(s: &Scheduler, now: Instant) -> Vec<JobStatus> {
    let mut by_job: std::collections::BTreeMap<String, Vec<(String, Published)>> =
        Default::default();
    for row in instances(s, now) {
        by_job
            .entry(row.job)
            .or_default()
            .push((row.node, row.copy));
    }
    s.desired()
        .records()
        .filter(|r| r.is_live())
        .map(|r| {
            let copies = by_job.remove(&r.name).unwrap_or_default();
            status_of(s, r.clone(), &copies, now)
        })
        .collect()
}

fn reason_for(s: &Scheduler, job: &str, slot: u32) -> Option<(String, u32)> {
    if let Some(b) = s.placing().backoff_of(job, slot) {
        return Some((b.reason.clone(), b.attempts));
    }
    let by_node = s.seen().view.index.unplaced(job)?;
    // The current coordinator's word first, then anyone's.
    let coordinator = s.seen().view.members.coordinator(job).cloned();
    let pick = |n: &str| {
        by_node
            .get(n)
            .and_then(|v| v.iter().find(|u| u.holds(slot)))
            .map(|u| (u.reason.clone(), u.attempts))
    };
    coordinator.as_deref().and_then(pick).or_else(|| {
        by_node
            .values()
            .flatten()
            .find(|u| u.holds(slot))
            .map(|u| (u.reason.clone(), u.attempts))
    })
}

/// A system job's status: a row per node that runs a copy (the serving
/// one first, as for a slot), then one per node that says the job does
/// not fit it, with why. Every row is slot 0.
fn system_status_of(
    s: &Scheduler,
    record: Arc<JobRecord>,
    copies: &[(String, Published)],
    now: Instant,
) -> JobStatus {
    let slot = crate::system::SLOT;
    let mut by_node: std::collections::BTreeMap<&str, &Published> = Default::default();
    for (n, c) in copies.iter().filter(|(_, c)| c.slot == slot) {
        let better = |o: &Published| {
            (c.state.is_live() && !c.stopping, c.run) > (o.state.is_live() && !o.stopping, o.run)
        };
        if by_node.get(n.as_str()).is_none_or(|o| better(o)) {
            by_node.insert(n, c);
        }
    }
    let mut slots: Vec<SlotStatus> = by_node
        .iter()
        .map(|(n, c)| {
            let state = if c.error.is_some() && c.state == SlotState::Starting {
                SlotState::Failed
            } else {
                c.state
            };
            let reason = if c.stopping {
                Some("stopping".into())
            } else {
                c.error.clone()
            };
            SlotStatus {
                copies: u32::from(c.state.is_live() && !c.stopping),
                ..SlotStatus::of_copy(n, c, state, reason)
            }
        })
        .collect();
    let mut unfit: std::collections::BTreeMap<String, (String, u32)> = Default::default();
    if let Some(b) = s.placing().backoff_of(&record.name, slot) {
        unfit.insert(s.me().to_string(), (b.reason.clone(), b.attempts));
    }
    // Only live nodes that qualify (a dead node's report stays in the
    // index until the membership forgets it; found in review).
    let qualifying = record
        .spec
        .as_ref()
        .map(|sp| s.qualifying_nodes(sp, now))
        .unwrap_or_default();
    if let Some(by) = s.seen().view.index.unplaced(&record.name) {
        for (n, us) in by {
            if !qualifying.iter().any(|q| **q == **n) {
                continue;
            }
            if let Some(u) = us.iter().find(|u| u.holds(slot)) {
                unfit
                    .entry(n.to_string())
                    .or_insert((u.reason.clone(), u.attempts));
            }
        }
    }
    for (n, (reason, attempts)) in unfit {
        if by_node.contains_key(n.as_str()) {
            continue;
        }
        slots.push(SlotStatus::without_copy(
            slot,
            Some(n),
            SlotState::Pending,
            Some(reason),
            attempts,
        ));
    }
    let nodes = record
        .spec
        .as_ref()
        .map(|_| u32::try_from(qualifying.len()).unwrap_or(u32::MAX));
    JobStatus {
        record,
        slots,
        deployment: None,
        nodes,
        runs: Vec::new(),
    }
}

fn status_of(
    s: &Scheduler,
    record: Arc<JobRecord>,
    copies: &[(String, Published)],
    now: Instant,
) -> JobStatus {
    if record
        .spec
        .as_ref()
        .is_some_and(|sp| sp.job_type == crate::job::JobType::Cron)
    {
        let runs = s
            .runs_of(&record.name, now)
            .into_iter()
            .filter(|r| r.state != crate::cron::RunState::Stopped)
            .collect();
        return JobStatus {
            record,
            slots: Vec::new(),
            deployment: None,
            nodes: None,
            runs,
        };
    }
    if record
        .spec
        .as_ref()
        .is_some_and(|sp| sp.job_type == crate::job::JobType::System)
    {
        return system_status_of(s, record, copies, now);
    }
    let replicas = record.spec.as_ref().map(|sp| sp.replicas).unwrap_or(0);
    let mut slots = Vec::new();
    for slot in 0..replicas {
        let best = copies
            .iter()
            .filter(|(_, c)| c.slot == slot)
            // During a rolling update a slot has two copies: the one that
            // serves is shown (then the newer).
            .max_by_key(|(_, c)| {
                (
                    c.state.is_live() && !c.stopping,
                    c.state == SlotState::Running,
                    c.health == crate::health::Health::Passing,
                    c.run,
                )
            });
        let done = s.desired().is_completed(&record.name, slot);
        slots.push(match best {
            // A copy whose last start failed shows as failed, with why,
            // while its holder waits to retry.
            Some((n, c)) if c.error.is_some() && c.state == SlotState::Starting => {
                SlotStatus::of_copy(n, c, SlotState::Failed, c.error.clone())
            }
            Some((n, c)) if !(done && c.state.is_live()) && c.state != SlotState::Pending => {
                SlotStatus::of_copy(n, c, c.state, c.error.clone())
            }
            _ if done => SlotStatus::without_copy(slot, None, SlotState::Completed, None, 0),
            _ => {
                let (reason, attempts) = reason_for(s, &record.name, slot)
                    .map(|(r, a)| (Some(r), a))
                    .unwrap_or((None, 0));
                // A `never` job's slot waits for its holder.
                let holder = s.desired().holder(&record.name, slot).map(str::to_string);
                let reason = reason.or_else(|| {
                    holder
                        .as_ref()
                        .map(|h| format!("held by {h}, which starts it"))
                });
                SlotStatus::without_copy(slot, holder, SlotState::Pending, reason, attempts)
            }
        });
    }
    for (n, c) in copies
        .iter()
        .filter(|(_, c)| c.slot >= replicas && c.state.is_live())
    {
        slots.push(SlotStatus::of_copy(n, c, c.state, Some("stopping".into())));
    }
    for st in &mut slots {
        st.copies = copies
            .iter()
            .filter(|(_, c)| c.slot == st.slot && c.state.is_live() && !c.stopping)
            .count() as u32;
    }
    let deployment = crate::deployment::of(&record, copies.iter().map(|(_, c)| c));
    JobStatus {
        record,
        slots,
        deployment,
        nodes: None,
        runs: Vec::new(),
    }
}
