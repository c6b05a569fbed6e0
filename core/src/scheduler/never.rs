//! `partition = "never"`: a slot that must never run twice.
//!
//! Every slot of such a job has a holder, named by a claim record in the
//! replicated desired state (see [`crate::records::Claim`]), and only the
//! holder runs it:
//! - the job's coordinator claims a slot that has no holder for the node
//!   placement ranks first (no bids: two coordinators that both claim a
//!   slot, views agreeing, name the same node), or for the node already
//!   running a copy (a job that became `never`);
//! - the holder starts its slot once it has known the claim for
//!   `claim_settle` (two claims written at once meet within that time,
//!   and the older one loses), more than half of the members hold the
//!   claim (asked with `HoldsClaim`: a claim that reached only one side
//!   of a partition is not acted on, and the side that could place the
//!   slot again, a majority, holds it), and it sees no copy of the slot
//!   anywhere;
//! - a node whose copy's slot another node holds stops it;
//! - a claim is given up (a tombstone) only by its holder, once its copy
//!   is gone, or by `shoal node forget`; a holder that is down or cut off
//!   keeps its slot, so no side of a partition places it again;
//! - placing and starting needs more than half of the members alive (of
//!   two halves exactly, neither side acts).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_placement::{assign, NodeIndex};

use super::{Now, Scheduler};
use crate::hlc::Version;
use crate::job::{JobSpec, JobType, PartitionPolicy};
use crate::records::{claim_record_name, JobRecord};
use crate::wire::Request;

/// How often the holder of an unconfirmed claim asks the peers that have
/// not said they hold it.
const CLAIM_ASK_INTERVAL: Duration = Duration::from_millis(500);

/// A claim naming this node, as this node follows it.
#[derive(Debug, Clone)]
pub(super) struct HeldClaim {
    /// The claim's version (a new one, naming this node again, is asked
    /// about afresh).
    version: Version,
    /// When this node first knew a claim naming it on the slot.
    since: Instant,
    /// The peers that said they hold this version.
    acks: BTreeSet<Arc<str>>,
    /// When it last asked.
    asked_at: Option<Instant>,
    /// Starts refused here in a row (room, a port), and when to try
    /// again: kept here, as the job's coordinator, if another node,
    /// drops this node's placing state for the job.
    refusals: u32,
    retry_at: Option<Instant>,
}

/// Starts refused in a row after which the holder gives the slot up for
/// the coordinator to place elsewhere (room or a port that stays taken:
/// a claim reserves nothing, so another job may have filled the node
/// while the claim settled).
const REFUSALS_MAX: u32 = 5;

/// Whether a job keeps its slots with their holders (`partition =
/// "never"`).
pub(super) fn is_never(spec: &JobSpec) -> bool {
    spec.partition_policy() == PartitionPolicy::Never
}

impl Scheduler {
    /// Whether a claim record of `name` is being written by this node.
    fn claim_in_flight(&self, name: &str) -> bool {
        self.writes
            .values()
            .any(|w| w.jobs.iter().any(|j| j.name == name))
    }

    /// Writes claim records (no API token: replicated like a coordinator's
    /// mark).
    fn write_claims(&mut self, claims: Vec<(String, u32, Option<String>)>, now: Now) {
        if claims.is_empty() || self.writes.len() >= self.config.writes_in_flight_max {
            return;
        }
        let records = claims
            .into_iter()
            .map(|(job, slot, holder)| {
                let version = self.next_version(now);
                Arc::new(JobRecord::claim_on(&job, slot, version, holder.as_deref()))
            })
            .collect();
        self.counters.claims_written = self.counters.claims_written.saturating_add(1);
        self.persist(records, Vec::new(), super::Origin::Coordinator);
    }

    /// The coordinator's part in a `never` job: claims its slots that have
    /// no holder (see the module's doc).
    pub(super) fn claim_slots(&mut self, record: &Arc<JobRecord>, now: Now) {
        let Some(spec) = record.spec.as_ref() else {
            return;
        };
        let name = record.name.as_str();
        if self.holds_back(spec) {
            return;
        }
        let mut adopt = Vec::new();
        let mut to_place = Vec::new();
        for slot in 0..spec.slots() {
            if adopt.len() + to_place.len() >= self.config.slots_per_round_max {
                break;
            }
            if spec.job_type == JobType::Batch && self.desired.is_completed(name, slot) {
                continue;
            }
            if let Some(holder) = self.desired.holder(name, slot) {
                if holder != &*self.me && !self.seen.view.members.is_live(holder) {
                    let why = format!(
                        "its holder {holder} is down or cut off, and the job's partition policy \
                         is `never`: it waits for {holder} to return or for `shoal node forget {holder}`"
                    );
                    self.placing.explain(name, slot, why, now.mono);
                } else {
                    // Its holder's business now (a reason from before the
                    // claim no longer holds).
                    self.placing.settled(name, slot);
                }
                continue;
            }
            let claim = claim_record_name(name, slot);
            if self.claim_in_flight(&claim) || self.placing.backing_off(name, slot, now.mono) {
                continue;
            }
            let copies = self.slot_copies(name, slot, now);
            let live: Vec<_> = copies.iter().filter(|(_, c)| c.state.is_live()).collect();
            // A copy that runs is adopted (the job became `never`, or its
            // holder was forgotten and came back), the best one (current
            // task, ready, then by name).
            let fp = spec.task.fingerprint();
            if let Some((n, _)) = live
                .iter()
                .filter(|(_, c)| !c.stopping)
                .max_by_key(|(n, c)| (c.task == fp, c.ready, std::cmp::Reverse(n.clone())))
            {
                adopt.push((name.to_string(), slot, Some(n.to_string())));
                continue;
            }
            // A copy still stops (its holder gave the slot up): it goes
            // first.
            if !live.is_empty() {
                continue;
            }
            to_place.push(slot);
        }
        if !to_place.is_empty() {
            let mut nodes = self.placement_nodes();
            let index = NodeIndex::new(&nodes);
            let mut placements = self.placements_of(name, now);
            // A slot claimed and not started yet counts where it is held.
            let held: Vec<(u32, String)> = self
                .desired
                .claims_of(name)
                .filter_map(|(slot, _, _)| {
                    Some((slot, self.desired.holder(name, slot)?.to_string()))
                })
                .collect();
            for (slot, holder) in held {
                if !self
                    .slot_copies(name, slot, now)
                    .iter()
                    .any(|(n, c)| **n == *holder && c.state.is_live())
                {
                    *placements.entry(holder).or_insert(0) += 1;
                }
            }
            let requests: Vec<_> = to_place
                .iter()
                .map(|s| self.request_for(spec, *s, now))
                .collect();
            let results = assign(
                &requests,
                &mut nodes,
                &index,
                &mut placements,
                &self.config.placement,
            );
            for (slot, result) in to_place.iter().zip(results) {
                match result {
                    Ok(i) => adopt.push((name.to_string(), *slot, Some(nodes[i].id.clone()))),
                    Err(u) => {
                        self.counters.unplaceable += 1;
                        self.placing.failed(
                            name,
                            *slot,
                            u.to_string(),
                            now.mono,
                            (self.config.retry_min, self.config.retry_max),
                        );
                    }
                }
            }
        }
        self.write_claims(adopt, now);
    }

    /// The holder's part: starts the slots this node holds once their
    /// claims have settled and no copy runs elsewhere, and gives up those
    /// it cannot or must no longer run once its copy is gone.
    pub(super) fn held_slots(&mut self, now: Now) {
        let mine: Vec<(String, u32, crate::hlc::Version)> = self
            .desired
            .claims()
            .filter(|(_, _, n, v)| *n == &*self.me && !self.desired.forgotten_since(n, v))
            .map(|(j, s, _, v)| (j.to_string(), s, v.clone()))
            .collect();
        // When each claim was first known (a claim named again keeps its
        // time: the holder did not change).
        self.claims_seen
            .retain(|k, _| mine.iter().any(|(j, s, _)| k.0 == *j && k.1 == *s));
        let mut release = Vec::new();
        for (job, slot, version) in mine {
            let held = self
                .claims_seen
                .entry((job.clone(), slot))
                .or_insert_with(|| HeldClaim {
                    version: version.clone(),
                    since: now.mono,
                    acks: BTreeSet::new(),
                    asked_at: None,
                    refusals: 0,
                    retry_at: None,
                });
            if held.version != version {
                held.version = version.clone();
                held.acks.clear();
                held.asked_at = None;
                held.refusals = 0;
                held.retry_at = None;
            }
            let retry_at = held.retry_at;
            let seen_at = held.since;
            let local_live = self
                .local
                .get(&job, slot)
                .is_some_and(|l| l.state.is_live() || l.stopping || l.restart_at.is_some());
            let record = self.desired.get(&job).cloned();
            if record.is_none() {
                // The claim came before the job's record (its push was
                // lost): anti-entropy brings it. A collected job's claim
                // was given up when its stop came.
                continue;
            }
            let spec = record.as_ref().and_then(|r| r.spec.as_ref());
            let in_flight = self.claim_in_flight(&claim_record_name(&job, slot));
            if spec.is_some_and(|s| !is_never(s)) {
                // The job left `never`: its copies are any job's now.
                if !in_flight {
                    release.push((job, slot, None));
                }
                continue;
            }
            let keep = spec.is_some_and(|s| slot < s.slots());
            if !keep || !self.eligible(&self.me) {
                // The job stopped or scaled down, or this node drains or
                // is ineligible: the slot is given up once the copy is
                // gone (`own_copies` stops it, but for an ineligible
                // node's, which runs on).
                if !local_live && !in_flight {
                    release.push((job, slot, None));
                }
                continue;
            }
            let (Some(record), Some(spec)) = (record.as_ref(), spec) else {
                continue;
            };
            if local_live
                || (spec.job_type == JobType::Batch
                    && (self.desired.is_completed(&job, slot)
                        || self
                            .local
                            .get(&job, slot)
                            .is_some_and(|l| l.state == crate::instance::SlotState::Failed)))
                || self.holds_back(spec)
                || retry_at.is_some_and(|t| t > now.mono)
                || now.mono.saturating_duration_since(seen_at) < self.config.claim_settle
            {
                continue;
            }
            // More than half of the members must hold the claim.
            if !self.claim_confirmed(&job, slot, now) {
                continue;
            }
            // Another copy of the slot still runs (or stops): it goes
            // first.
            if self
                .seen
                .copies(&self.me, &job, slot, now.mono)
                .any(|(_, c)| c.state.is_live())
            {
                continue;
            }
            // What no retry mends gives the slot up, for the coordinator
            // to place elsewhere: a driver or constraint this node lacks.
            let fresh = self.fresh_node();
            if !self.drivers.contains(&spec.task.driver)
                || !spec
                    .slot_request(slot)
                    .constraints
                    .iter()
                    .all(|c| c.holds(&fresh))
            {
                if !self.claim_in_flight(&claim_record_name(&job, slot)) {
                    release.push((job, slot, None));
                }
                continue;
            }
            let refused = self.start_slots(record, &[slot], now);
            let Some((_, why)) = refused.into_iter().next() else {
                if let Some(h) = self.claims_seen.get_mut(&(job.clone(), slot)) {
                    h.refusals = 0;
                    h.retry_at = None;
                }
                continue;
            };
            // Room or a port: this node keeps the slot and tries again
            // with a backoff, then gives it up (no copy runs here, so the
            // slot may go elsewhere).
            self.counters.unplaceable += 1;
            let (min, max) = (self.config.retry_min, self.config.retry_max);
            let Some(h) = self.claims_seen.get_mut(&(job.clone(), slot)) else {
                continue;
            };
            h.refusals = h.refusals.saturating_add(1);
            h.retry_at = now
                .mono
                .checked_add(crate::placing::backoff_wait(h.refusals, min, max));
            let give_up = h.refusals >= REFUSALS_MAX;
            self.placing.failed(
                &job,
                slot,
                format!("{} holds it and cannot start it: {why}", self.me),
                now.mono,
                (min, max),
            );
            if give_up && !self.claim_in_flight(&claim_record_name(&job, slot)) {
                release.push((job, slot, None));
            }
        }
        self.write_claims(release, now);
    }

    /// Whether more than half of the members hold this node's claim on
    /// the slot (this node and the peers that said so); asks the others
    /// again every [`CLAIM_ASK_INTERVAL`] until they do.
    fn claim_confirmed(&mut self, job: &str, slot: u32, now: Now) -> bool {
        let (_, counted) = self.seen.alive_and_counted();
        let Some(held) = self.claims_seen.get_mut(&(job.to_string(), slot)) else {
            return false;
        };
        // Only remembered members still live (one that left or died since
        // no longer counts, nor does its answer).
        let seen = &self.seen;
        held.acks
            .retain(|p| seen.remembers(p) && seen.view.members.is_live(p));
        if (held.acks.len() + 1) * 2 > counted {
            return true;
        }
        if held
            .asked_at
            .is_some_and(|t| now.mono.saturating_duration_since(t) < CLAIM_ASK_INTERVAL)
        {
            return false;
        }
        held.asked_at = Some(now.mono);
        let version = held.version.clone();
        let asked: Vec<Arc<str>> = self
            .seen
            .view
            .members
            .iter()
            .filter(|m| m.is_live() && *m.name != *self.me && !held.acks.contains(&m.name))
            .map(|m| m.name.clone())
            .collect();
        let name = claim_record_name(job, slot);
        for peer in asked {
            self.send(
                &peer,
                Request::HoldsClaim {
                    name: name.clone(),
                    version: version.clone(),
                },
                Some(super::Call::ClaimCheck {
                    job: job.to_string(),
                    slot,
                    version: version.clone(),
                    peer: peer.clone(),
                }),
                self.config.call_timeout,
            );
        }
        false
    }

    /// A peer said it holds this node's claim at `version`.
    pub(super) fn claim_acked(&mut self, job: &str, slot: u32, version: &Version, peer: Arc<str>) {
        if let Some(held) = self.claims_seen.get_mut(&(job.to_string(), slot)) {
            if held.version == *version {
                held.acks.insert(peer);
                self.dirty = true;
            }
        }
    }

    /// Whether this node's copy of slot `slot` of a `never` job must stop:
    /// another node holds the slot, or this node's claim was forgotten
    /// (a slot never claimed keeps its copies until its coordinator
    /// adopts one).
    pub(super) fn claim_lost(&self, job: &str, slot: u32) -> bool {
        self.desired.claim(job, slot).is_some() && self.desired.holder(job, slot) != Some(&*self.me)
    }
}
