//! `shoal plan`: what a job file would change, computed by the pure code a
//! node runs (the same spec comparison, reconcile rules and placement),
//! without writing anything.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shoal_placement::{assign, explain, NodeIndex};

use crate::job::{JobSpec, JobType};
use crate::scheduler::Scheduler;

/// Nodes listed per placed slot (best-ranked first).
pub const CANDIDATES_SHOWN: usize = 5;

/// What would happen to one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Its copy already runs the new task: untouched.
    Keep,
    /// Its copy runs an older task: replaced by a copy of the new one.
    Replace,
    /// No copy yet: placed.
    Start,
    /// Beyond the new replica count: stopped.
    Stop,
    /// A batch slot that already ran: not run again.
    Done,
}

/// A node considered for a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Node.
    pub node: String,
    /// Rendezvous score (higher is preferred).
    pub score: f64,
    /// Why it cannot take the slot, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// One slot's fate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotPlan {
    /// Slot index.
    pub slot: u32,
    /// What happens.
    pub action: Action,
    /// Where its copy runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where it would go (start, replace), by the placement as it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Why no node can take it (start, replace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaceable: Option<String>,
    /// The best-ranked nodes with their scores (start, replace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
}

/// A dry run of a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Job name.
    pub job: String,
    /// The live version it would replace (`None`: a new job, or stopped).
    pub current: Option<u64>,
    /// The fields that differ from the live version (`task.args`, ...).
    pub changes: Vec<String>,
    /// Nothing would change: the spec is the live one.
    pub unchanged: bool,
    /// Every slot of the new spec, then those beyond it that would stop.
    pub slots: Vec<SlotPlan>,
}

impl Plan {
    /// Whether a submission would change anything.
    pub fn changes_anything(&self) -> bool {
        !self.unchanged
    }
}

/// The fields of two specs that differ, two levels deep (`replicas`,
/// `task.args`).
pub fn spec_diff(old: &JobSpec, new: &JobSpec) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    diff_fields("", &a, &b, 2, &mut out);
    out
}

fn diff_fields(
    prefix: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    depth: usize,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) if depth > 0 => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                if va != vb {
                    diff_fields(&format!("{prefix}{k}."), va, vb, depth - 1, out);
                }
            }
        }
        _ if a != b => out.push(prefix.trim_end_matches('.').to_string()),
        _ => {}
    }
}

/// A system job's plan: a row per node (every one slot 0): the nodes
/// that qualify keep, replace or start their copy, and those that run one
/// but no longer qualify stop it. Whether it fits a node is for the node
/// to say when it starts.
fn system_plan(s: &Scheduler, spec: &JobSpec, fp: u64, now: Instant) -> Vec<SlotPlan> {
    let mut running: BTreeMap<String, u64> = BTreeMap::new();
    for row in crate::status::instances(s, now) {
        if row.job == spec.name && row.copy.state.is_live() && !row.copy.stopping {
            running.insert(row.node, row.copy.task);
        }
    }
    let qualifying = s.qualifying_nodes(spec, now);
    let row = |node: &str, action| SlotPlan {
        slot: crate::system::SLOT,
        action,
        node: (action != Action::Start).then(|| node.to_string()),
        to: matches!(action, Action::Start | Action::Replace).then(|| node.to_string()),
        unplaceable: None,
        candidates: Vec::new(),
    };
    let mut out: Vec<SlotPlan> = qualifying
        .iter()
        .map(|n| {
            row(
                n,
                match running.get(n) {
                    Some(t) if *t == fp => Action::Keep,
                    Some(_) => Action::Replace,
                    None => Action::Start,
                },
            )
        })
        .collect();
    out.extend(
        running
            .keys()
            .filter(|n| !qualifying.contains(n))
            .map(|n| row(n, Action::Stop)),
    );
    out
}

/// What submitting `spec` at node `s` would do, as `s` sees the cluster.
pub fn plan(s: &Scheduler, spec: &JobSpec, now: Instant) -> Plan {
    let current = s.desired().get(&spec.name).filter(|r| r.is_live());
    let old = current.and_then(|r| r.spec.as_ref());
    let changes = old.map(|o| spec_diff(o, spec)).unwrap_or_default();
    let unchanged = old == Some(spec);
    let fp = spec.task.fingerprint();
    if spec.job_type == JobType::System {
        return Plan {
            job: spec.name.clone(),
            current: current.map(|r| r.seq),
            changes,
            unchanged,
            slots: system_plan(s, spec, fp, now),
        };
    }
    // The live copies of each slot, by node (this node's own first hand).
    let mut copies: BTreeMap<u32, Vec<(String, u64)>> = BTreeMap::new();
    for row in crate::status::instances(s, now) {
        if row.job == spec.name && row.copy.state.is_live() && !row.copy.stopping {
            copies
                .entry(row.copy.slot)
                .or_default()
                .push((row.node, row.copy.task));
        }
    }
    let mut slots = Vec::new();
    let mut to_place = Vec::new();
    // A cron job has no slots of its own: each time starts a run.
    for slot in 0..spec.slots() {
        let here = copies.get(&slot).map(Vec::as_slice).unwrap_or(&[]);
        let done = spec.job_type == JobType::Batch && s.desired().is_completed(&spec.name, slot);
        let (action, node) = if done {
            (Action::Done, None)
        } else if let Some((n, _)) = here.iter().find(|(_, f)| *f == fp) {
            (Action::Keep, Some(n.clone()))
        } else if let Some((n, _)) = here.first() {
            (Action::Replace, Some(n.clone()))
        } else {
            (Action::Start, None)
        };
        if matches!(action, Action::Replace | Action::Start) {
            to_place.push(slots.len());
        }
        slots.push(SlotPlan {
            slot,
            action,
            node,
            to: None,
            unplaceable: None,
            candidates: Vec::new(),
        });
    }
    for (slot, here) in copies.range(spec.slots()..) {
        for (n, _) in here {
            slots.push(SlotPlan {
                slot: *slot,
                action: Action::Stop,
                node: Some(n.clone()),
                to: None,
                unplaceable: None,
                candidates: Vec::new(),
            });
        }
    }
    // The placement as it stands: the slots in order, each seeing those
    // assigned before it (as a coordinator's round does).
    let nodes = s.placement_nodes();
    let placements = s.placements(&spec.name, now);
    let requests: Vec<_> = to_place
        .iter()
        .map(|i| {
            s.request_for(
                spec,
                slots[*i].slot,
                crate::scheduler::Now {
                    mono: now,
                    wall_ms: 0,
                },
            )
        })
        .collect();
    let explained: Vec<_> = requests
        .iter()
        .map(|r| explain(r, &nodes, &placements, &s.config().placement))
        .collect();
    let index = NodeIndex::new(&nodes);
    let mut assigned_nodes = nodes.clone();
    let mut assigned_placements = placements.clone();
    let winners = assign(
        &requests,
        &mut assigned_nodes,
        &index,
        &mut assigned_placements,
        &s.config().placement,
    );
    for ((i, won), e) in to_place.iter().zip(winners).zip(explained) {
        let p = &mut slots[*i];
        match won {
            Ok(w) => p.to = Some(nodes[w].id.to_string()),
            Err(u) => p.unplaceable = Some(u.to_string()),
        }
        p.candidates = e
            .nodes
            .into_iter()
            .take(CANDIDATES_SHOWN)
            .map(|n| Candidate {
                node: n.node,
                score: n.score,
                rejected: n.rejected,
            })
            .collect();
    }
    Plan {
        job: spec.name.clone(),
        current: current.map(|r| r.seq),
        changes,
        unchanged,
        slots,
    }
}
