//! Node eligibility and drain (`shoal node drain|eligible|ineligible`).
//!
//! The operator's word is a record in the replicated desired state (see
//! [`crate::records::NodeSetting`]), so every node reads the same flag and
//! decides alike, with no coordinator of the drain:
//! - placement skips a node that is draining or ineligible, and such a
//!   node refuses a start (a coordinator with an older view);
//! - a service slot whose copies of the current task are all on draining
//!   nodes moves start-first: its coordinator places a new copy elsewhere,
//!   at most the job's `max_parallel` slots at a time (the drain window),
//!   and the draining node stops its copy once the new one is ready, so
//!   the job never has fewer ready copies than before;
//! - batch copies on a draining node run on until the deadline;
//! - at the deadline the draining node stops what is left (the slots are
//!   then placed elsewhere as after any stop); `--force` is a deadline of
//!   now;
//! - system copies stop last, once nothing else is left on the node (or
//!   at the deadline), unless the drain keeps them (`--keep-system`).

use std::sync::Arc;
use std::time::Duration;

use super::{ApiError, ApiToken, Now, Scheduler};
use crate::instance::Published;
use crate::job::{JobSpec, JobType};
use crate::records::{Drain, JobRecord, NodeSetting};

/// What a node's setting and copies say of its drain, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDrainStatus {
    /// Node name.
    pub node: String,
    /// Whether it takes new work.
    pub eligible: bool,
    /// Its drain, if one was asked for.
    pub drain: Option<Drain>,
    /// Copies still on it that the drain stops (system copies included
    /// unless the drain keeps them).
    pub left: usize,
    /// Of those, system copies (they stop last).
    pub system_left: usize,
    /// Whether this node counts the node's copies (alive, not held in
    /// doubt): else `left` is not known.
    pub reachable: bool,
    /// Whether an operator forgot it (`shoal node forget`).
    pub forgotten: bool,
    /// The setting record's version (the write that asked for it).
    pub version: crate::hlc::Version,
}

impl NodeDrainStatus {
    /// Whether a drain is asked for and nothing it stops is left.
    pub fn drained(&self) -> bool {
        self.drain.is_some() && self.reachable && self.left == 0
    }
}

impl Scheduler {
    /// Whether `node` takes new work (no operator made it ineligible or
    /// drains it).
    pub fn eligible(&self, node: &str) -> bool {
        self.desired
            .node_setting(node)
            .is_none_or(|s| s.eligible && s.drain.is_none())
    }

    /// The drain asked of `node`, if any.
    pub fn drain_of(&self, node: &str) -> Option<&Drain> {
        self.desired
            .node_setting(node)
            .and_then(|s| s.drain.as_ref())
    }

    /// Whether `node` is draining: its service copies move elsewhere.
    pub(super) fn leaving(&self, node: &str) -> bool {
        self.drain_of(node).is_some()
    }

    /// Whether `node`'s drain deadline has passed (by this node's clock).
    pub(super) fn drain_overdue(&self, node: &str, wall_ms: u64) -> bool {
        self.drain_of(node)
            .is_some_and(|d| wall_ms >= d.deadline_ms)
    }

    /// Whether a drain stops `node`'s system copies: it drains without
    /// `keep_system` and (for a copy that runs; a new one never starts)
    /// nothing else is left on it or its deadline passed.
    pub(super) fn drain_stops_system(&self, node: &str, starting: bool, now: Now) -> bool {
        let Some(d) = self.drain_of(node) else {
            return false;
        };
        if d.keep_system {
            return false;
        }
        starting
            || now.wall_ms >= d.deadline_ms
            || self
                .copies_on(node, now)
                .is_some_and(|(other, _)| other == 0)
    }

    /// The copies on `node` as this node sees them, live or still
    /// stopping (a copy in its stop grace still runs): (copies of
    /// services, batch jobs and cron runs; copies of system jobs). `None`
    /// when this node does not count `node`'s copies (it is not alive, or
    /// held in doubt after coming back).
    fn copies_on(&self, node: &str, now: Now) -> Option<(usize, usize)> {
        let kind = |job: &str| self.desired.spec(job).map(|s| s.job_type);
        let mut counts = (0, 0);
        let mut add = |job: &str, c: &Published| {
            if !c.state.is_live() && !c.stopping {
                return;
            }
            match kind(job) {
                Some(JobType::System) => counts.1 += 1,
                Some(_) => counts.0 += 1,
                None => {}
            }
        };
        if node == &*self.me {
            for l in self.local.iter() {
                add(&l.id.job, &l.published());
            }
        } else if self.seen.counts(&self.me, node, now.mono) {
            for (job, copies) in self.seen.view.index.jobs() {
                for (_, n, c) in copies.iter() {
                    if **n == *node {
                        add(job, c);
                    }
                }
            }
        } else {
            return None;
        }
        Some(counts)
    }

    /// Every node an operator set something on, with its drain's progress
    /// as this node sees it.
    pub fn node_statuses(&self, now: std::time::Instant) -> Vec<NodeDrainStatus> {
        let now = Now {
            mono: now,
            wall_ms: self.wall_ms,
        };
        self.desired
            .node_settings()
            .iter()
            .map(|(node, s)| {
                let counts = self.copies_on(node, now);
                let (other, system) = counts.unwrap_or_default();
                let keep = s.drain.as_ref().is_some_and(|d| d.keep_system);
                NodeDrainStatus {
                    node: node.clone(),
                    eligible: s.eligible,
                    drain: s.drain.clone(),
                    left: other + if keep { 0 } else { system },
                    system_left: if keep { 0 } else { system },
                    reachable: counts.is_some(),
                    forgotten: s.forgotten.is_some(),
                    version: self
                        .desired
                        .get(&crate::records::node_record_name(node))
                        .map(|r| r.version.clone())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The placement view of the alive nodes: from gossip, this node's
    /// own fresh, each marked with whether it takes new work.
    pub fn placement_nodes(&self) -> Vec<shoal_placement::Node> {
        let mut nodes = self.seen.placement_nodes();
        let fresh = self.fresh_node();
        match nodes.iter_mut().find(|n| *n.id == *self.me) {
            Some(n) => *n = fresh,
            None => nodes.push(fresh),
        }
        for n in &mut nodes {
            n.eligible = self.eligible(&n.id);
        }
        nodes
    }

    /// The slots of a service with a copy on a draining node and no ready
    /// copy of the current task elsewhere:
    /// the first `max_parallel` of them in slot order move now (their
    /// coordinator places a copy elsewhere beside the draining one). A
    /// slot leaves the window once its new copy is ready, so at most
    /// `max_parallel` slots are on their way at once. None while this
    /// node is cut off with a minority (as an update's window).
    pub(super) fn drain_window(&self, spec: &JobSpec, fp: u64, now: Now) -> Vec<u32> {
        if spec.job_type != JobType::Service
            || self.seen.minority()
            || self
                .desired
                .node_settings()
                .values()
                .all(|s| s.drain.is_none())
        {
            return Vec::new();
        }
        let mut window = Vec::new();
        for slot in 0..spec.replicas {
            if window.len() >= spec.update.max_parallel as usize {
                break;
            }
            let copies = self.slot_copies(&spec.name, slot, now);
            // A copy of any version: an older one (an update that failed,
            // or waits for its canaries' promotion) moves too, as the
            // current version (its slot is then ready, and the old copy
            // stops by the update's rules).
            let live = |c: &Published| c.state.is_live() && !c.stopping;
            let on_leaving = copies.iter().any(|(n, c)| live(c) && self.leaving(n));
            let ready_elsewhere = copies
                .iter()
                .any(|(n, c)| c.ready_on(Some(fp)) && !self.leaving(n));
            if on_leaving && !ready_elsewhere {
                window.push(slot);
            }
        }
        window
    }

    /// Every copy of a slot this node counts (its own, and live trusted
    /// nodes'), with its node.
    pub(super) fn slot_copies(&self, job: &str, slot: u32, now: Now) -> Vec<(Arc<str>, Published)> {
        let mut v: Vec<(Arc<str>, Published)> = self
            .seen
            .copies(&self.me, job, slot, now.mono)
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        if let Some(l) = self.local.get(job, slot).filter(|l| !l.unconfirmed) {
            v.push((self.me.clone(), l.published()));
        }
        v
    }

    /// `shoal node drain|eligible|ineligible`: writes node `node`'s
    /// setting (`None`: eligible again, the drain over).
    pub(super) fn set_node(&mut self, token: ApiToken, node: String, change: NodeChange, now: Now) {
        // A dead node the membership dropped (15 minutes on) is still
        // known by the claims it holds and by the remembered membership:
        // forgetting it is how they move, and how a side stops counting it.
        let known = self.seen.view.members.get(&node).is_some()
            || self.seen.remembers(&node)
            || self.desired.node_setting(&node).is_some()
            || self.desired.claims().any(|(_, _, n, _)| n == node)
            || node == *self.me;
        if !known {
            return self.answer(
                token,
                Err(ApiError::NotFound(format!(
                    "no node named `{node}` is a member; `shoal nodes` lists them"
                ))),
            );
        }
        let current = self.desired.node_setting(&node).cloned();
        // A forget stays through later settings (a claim written before
        // it and heard of after it must not revive).
        let forgotten = current.as_ref().and_then(|c| c.forgotten.clone());
        let setting = match change {
            NodeChange::Forget => {
                if node == *self.me {
                    return self.answer(
                        token,
                        Err(ApiError::BadRequest(format!(
                            "`{node}` is the node you asked; ask another node to forget it"
                        ))),
                    );
                }
                if self.seen.view.members.is_live(&node) {
                    return self.answer(
                        token,
                        Err(ApiError::Conflict(format!(
                            "node `{node}` is alive as {} sees it: forget is for a node that is gone for good \
                             (its `never` slots would run twice). To move its work, `shoal node drain {node}`",
                            self.me
                        ))),
                    );
                }
                // The version is the write's own (set in `write_with`).
                Some(NodeSetting {
                    eligible: current.as_ref().is_none_or(|c| c.eligible),
                    drain: current.as_ref().and_then(|c| c.drain.clone()),
                    forgotten: Some(crate::hlc::Version::default()),
                })
            }
            NodeChange::Eligible => forgotten.clone().map(|f| NodeSetting {
                eligible: true,
                drain: None,
                forgotten: Some(f),
            }),
            NodeChange::Ineligible => Some(NodeSetting {
                eligible: false,
                drain: current.and_then(|c| c.drain),
                forgotten: forgotten.clone(),
            }),
            NodeChange::Drain {
                deadline,
                keep_system,
            } => {
                if deadline > crate::records::DRAIN_DEADLINE_MAX {
                    return self.answer(
                        token,
                        Err(ApiError::BadRequest(format!(
                            "a drain deadline is at most {}; make the node ineligible to keep work off it longer",
                            humantime::format_duration(crate::records::DRAIN_DEADLINE_MAX)
                        ))),
                    );
                }
                let deadline_ms = now
                    .wall_ms
                    .saturating_add(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
                Some(NodeSetting {
                    eligible: false,
                    drain: Some(Drain {
                        since_ms: now.wall_ms,
                        deadline_ms,
                        keep_system,
                    }),
                    forgotten,
                })
            }
        };
        let name = crate::records::node_record_name(&node);
        // A drain asked again restarts its clock; the others are the same
        // write twice.
        if !matches!(change, NodeChange::Drain { .. } | NodeChange::Forget)
            && self.desired.node_setting(&node) == setting.as_ref()
        {
            // Nothing to write (a node never set is eligible already).
            let r = self.desired.get(&name).cloned().unwrap_or_else(|| {
                Arc::new(JobRecord::node_setting(
                    None,
                    &node,
                    crate::hlc::Version::default(),
                    None,
                ))
            });
            self.out.push(super::Effect::Answer {
                token,
                answer: super::ApiAnswer::Unchanged(r),
            });
            return;
        }
        self.write_with(token, name, now, |current, version| {
            let mut setting = setting;
            if let Some(f) = setting.as_mut().and_then(|s| s.forgotten.as_mut()) {
                if matches!(change, NodeChange::Forget) {
                    *f = version.clone();
                }
            }
            JobRecord::node_setting(current, &node, version, setting)
        });
    }
}

/// A change to a node's setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    /// Gone for good (`shoal node forget`): the slots of `partition =
    /// "never"` jobs it held are placed elsewhere, and it stops its copies
    /// of them if it comes back. Refused while the node is alive.
    Forget,
    /// Takes new work again; any drain ends.
    Eligible,
    /// Takes no new work; what runs there stays.
    Ineligible,
    /// Moves its work elsewhere, stopping what is left after `deadline`
    /// (zero: at once, `--force`).
    Drain {
        /// How long batch copies may run on and service copies may wait
        /// for room elsewhere.
        deadline: Duration,
        /// Its system jobs' copies keep running.
        keep_system: bool,
    },
}
