//! [`Placing`]: what this node does as the coordinator of jobs — placement
//! rounds waiting for bids, placements in flight until their copy shows in
//! gossip, and slots that could not be placed, backing off, with the
//! reason every node shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_placement::Node;

use crate::gossip::{self, BucketPublisher, KeyChange, Unplaced, UNPLACED_PREFIX};
use crate::records::JobRecord;

/// A placement waiting for its candidates' bids.
#[derive(Debug, Clone)]
pub struct Round {
    /// The job, as it was when the round began.
    pub job: Arc<JobRecord>,
    /// Slots to place, in order.
    pub slots: Vec<u32>,
    /// Every node as placement saw it when the round began.
    pub nodes: Vec<Node>,
    /// Where the job's live copies (and placements in flight) are.
    pub placements: shoal_placement::JobPlacements,
    /// Bidders not heard from yet.
    pub awaiting: BTreeSet<Arc<str>>,
    /// Fresh bids received.
    pub bids: BTreeMap<Arc<str>, Node>,
    /// When the round goes ahead with the bids it has.
    pub deadline: Instant,
}

/// A slot assigned and told to start, not yet seen in gossip.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Where it was placed.
    pub winner: Arc<str>,
    /// When it may be placed again if its copy never shows.
    pub until: Instant,
}

/// A slot that could not be placed: when to try again, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// Next attempt.
    pub next: Instant,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub reason: String,
}

/// The coordinator's state.
#[derive(Debug)]
pub struct Placing {
    next_round: u64,
    rounds: BTreeMap<u64, Round>,
    round_of_job: BTreeMap<String, u64>,
    in_flight: BTreeMap<String, BTreeMap<u32, InFlight>>,
    backoff: BTreeMap<String, BTreeMap<u32, Backoff>>,
    /// The state stamp of each job with backing-off slots as last seen
    /// (see [`Placing::retry_if_changed`]).
    stamps: BTreeMap<String, u64>,
    /// The `u/` keys as last published.
    published: BucketPublisher<Unplaced>,
}

impl Default for Placing {
    fn default() -> Self {
        Placing {
            next_round: 0,
            rounds: BTreeMap::new(),
            round_of_job: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            backoff: BTreeMap::new(),
            stamps: BTreeMap::new(),
            published: BucketPublisher::new(UNPLACED_PREFIX),
        }
    }
}

impl Placing {
    /// Whether a round for `job` waits for bids.
    pub fn has_round(&self, job: &str) -> bool {
        self.round_of_job.contains_key(job)
    }

    /// Rounds waiting for bids.
    pub fn rounds_len(&self) -> usize {
        self.rounds.len()
    }

    /// Starts a round; returns its id.
    pub fn begin(&mut self, round: Round) -> u64 {
        self.next_round += 1;
        let id = self.next_round;
        self.round_of_job.insert(round.job.name.clone(), id);
        self.rounds.insert(id, round);
        id
    }

    /// A round, mutable.
    pub fn round_mut(&mut self, id: u64) -> Option<&mut Round> {
        self.rounds.get_mut(&id)
    }

    /// Ends a round (all bids in, or its deadline passed).
    pub fn finish(&mut self, id: u64) -> Option<Round> {
        let r = self.rounds.remove(&id)?;
        self.round_of_job.remove(&r.job.name);
        Some(r)
    }

    /// Rounds whose deadline passed.
    pub fn overdue(&self, now: Instant) -> Vec<u64> {
        self.rounds
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Records a placement in flight.
    pub fn placed(&mut self, job: &str, slot: u32, winner: Arc<str>, until: Instant) {
        // The slot's backoff stays until a copy shows (`settled`): a
        // placement that is refused again waits longer each time (found by
        // the simulator, seed 30: a refused slot was retried every 0.6 s
        // for a minute because each attempt reset its backoff).
        self.in_flight
            .entry(job.to_string())
            .or_default()
            .insert(slot, InFlight { winner, until });
    }

    /// Placements of `job` in flight.
    pub fn in_flight(&self, job: &str) -> Option<&BTreeMap<u32, InFlight>> {
        self.in_flight.get(job)
    }

    /// Forgets a placement in flight (its copy showed, or it was refused).
    pub fn landed(&mut self, job: &str, slot: u32) {
        if let Some(m) = self.in_flight.get_mut(job) {
            m.remove(&slot);
            if m.is_empty() {
                self.in_flight.remove(job);
            }
        }
    }

    /// Whether a slot's placement is in flight.
    pub fn is_in_flight(&self, job: &str, slot: u32) -> bool {
        self.in_flight
            .get(job)
            .is_some_and(|m| m.contains_key(&slot))
    }

    /// A slot could not be placed: it waits `retry_min * 2^attempts`
    /// (capped) before the next attempt, and `reason` is published.
    pub fn failed(
        &mut self,
        job: &str,
        slot: u32,
        reason: String,
        now: Instant,
        (retry_min, retry_max): (Duration, Duration),
    ) {
        self.landed(job, slot);
        let entry = self
            .backoff
            .entry(job.to_string())
            .or_default()
            .entry(slot)
            .or_insert(Backoff {
                next: now,
                attempts: 0,
                reason: String::new(),
            });
        let wait = backoff_wait(entry.attempts, retry_min, retry_max);
        entry.attempts = entry.attempts.saturating_add(1);
        entry.next = now.checked_add(wait).unwrap_or(now);
        entry.reason = gossip::bounded(reason);
    }

    /// Says why a slot waits, with no backoff (it is tried as soon as the
    /// wait ends), once: the same reason again changes nothing.
    pub fn explain(&mut self, job: &str, slot: u32, reason: String, now: Instant) {
        if self
            .backoff_of(job, slot)
            .is_none_or(|b| b.reason != reason)
        {
            self.failed(job, slot, reason, now, (Duration::ZERO, Duration::ZERO));
        }
    }

    /// Whether a slot waits out a backoff now.
    pub fn backing_off(&self, job: &str, slot: u32, now: Instant) -> bool {
        self.backoff
            .get(job)
            .and_then(|m| m.get(&slot))
            .is_some_and(|b| b.next > now)
    }

    /// The backoff of a slot, if any.
    pub fn backoff_of(&self, job: &str, slot: u32) -> Option<&Backoff> {
        self.backoff.get(job).and_then(|m| m.get(&slot))
    }

    /// A slot got a live copy: it no longer backs off.
    pub fn settled(&mut self, job: &str, slot: u32) {
        if let Some(m) = self.backoff.get_mut(job) {
            m.remove(&slot);
            if m.is_empty() {
                self.backoff.remove(job);
            }
        }
    }

    /// Every backing-off slot may try again now (a node joined, or the job
    /// changed): attempts are kept, so a slot that still fails backs off
    /// as long as before.
    pub fn retry_now(&mut self, job: Option<&str>, now: Instant) {
        for (j, m) in self.backoff.iter_mut() {
            if job.is_none_or(|x| x == j) {
                for b in m.values_mut() {
                    b.next = b.next.min(now);
                }
            }
        }
    }

    /// The job's copies changed since the last look (a copy started,
    /// stopped or ended anywhere): what blocked its slots may be gone, so
    /// they try again now instead of waiting out their backoff (found by
    /// the simulator, seed 315: slots of a distinct-hosts job blocked while
    /// an update stopped the old copies waited the full 30 s backoff after
    /// the nodes had freed up).
    pub fn retry_if_changed(&mut self, job: &str, stamp: u64, now: Instant) {
        if !self.backoff.contains_key(job) {
            self.stamps.remove(job);
            return;
        }
        if self
            .stamps
            .insert(job.to_string(), stamp)
            .is_some_and(|old| old != stamp)
        {
            self.retry_now(Some(job), now);
        }
    }

    /// Forgets the placements in flight and backoffs of the job's slots at
    /// or above `replicas` (scaled away).
    pub fn forget_slots_from(&mut self, job: &str, replicas: u32) {
        if let Some(m) = self.in_flight.get_mut(job) {
            m.retain(|s, _| *s < replicas);
            if m.is_empty() {
                self.in_flight.remove(job);
            }
        }
        if let Some(m) = self.backoff.get_mut(job) {
            m.retain(|s, _| *s < replicas);
            if m.is_empty() {
                self.backoff.remove(job);
            }
        }
    }

    /// Forgets a job's coordination state (it is no longer this node's to
    /// coordinate, or it was stopped).
    pub fn forget_job(&mut self, job: &str) {
        self.in_flight.remove(job);
        self.backoff.remove(job);
        self.stamps.remove(job);
        if let Some(id) = self.round_of_job.remove(job) {
            self.rounds.remove(&id);
        }
    }

    /// Jobs with any coordination state.
    pub fn jobs(&self) -> BTreeSet<String> {
        self.in_flight
            .keys()
            .chain(self.backoff.keys())
            .chain(self.round_of_job.keys())
            .cloned()
            .collect()
    }

    /// Drops placements in flight whose time ran out.
    pub fn expire(&mut self, now: Instant) {
        for m in self.in_flight.values_mut() {
            m.retain(|_, f| f.until > now);
        }
        self.in_flight.retain(|_, m| !m.is_empty());
    }

    /// The `u/` key changes that publish the current unplaceable slots.
    pub fn publication(&mut self) -> Vec<KeyChange> {
        let mut entries: BTreeMap<String, Vec<Unplaced>> = BTreeMap::new();
        for (job, slots) in &self.backoff {
            let mut by_reason: BTreeMap<&str, (Vec<u32>, u32)> = BTreeMap::new();
            for (slot, b) in slots {
                let e = by_reason.entry(&b.reason).or_default();
                e.0.push(*slot);
                e.1 = e.1.max(b.attempts);
            }
            let list = by_reason
                .into_iter()
                .map(|(reason, (slots, attempts))| Unplaced {
                    reason: reason.to_string(),
                    slots: gossip::ranges(slots),
                    attempts,
                })
                .collect();
            entries.insert(job.clone(), list);
        }
        self.published.publish(entries)
    }
}

/// The wait after `attempts` failed attempts: `retry_min * 2^attempts`,
/// at most `retry_max`.
pub fn backoff_wait(attempts: u32, retry_min: Duration, retry_max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempts.min(16)).unwrap_or(u32::MAX);
    retry_min.saturating_mul(factor).min(retry_max)
}
