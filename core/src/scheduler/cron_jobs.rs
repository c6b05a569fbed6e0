//! The scheduler's part in cron jobs (see [`crate::cron`]): each tick,
//! every node moves each cron job's clock, and the node ranked to fire a
//! due time writes its run, with what `concurrency` and `history` remove.

use std::sync::Arc;
use std::time::Instant;

use shoal_membership::NodeState;

use super::{ApiError, ApiToken, Now, Origin, Scheduler};
use crate::cron::{self, CronClock, RunState};
use crate::job::{JobType, PartitionPolicy};
use crate::records::JobRecord;

impl Scheduler {
    /// How a run is going, as this node sees it.
    pub fn run_state(&self, child: &JobRecord, now: Instant) -> RunState {
        let Some(spec) = child.spec.as_ref() else {
            return RunState::Stopped;
        };
        let copies = self.copies_of(&child.name, now);
        let mut failed = false;
        for slot in 0..spec.replicas {
            if self.desired.is_completed(&child.name, slot) {
                continue;
            }
            let of_slot = || copies.iter().filter(|(_, c)| c.slot == slot);
            if of_slot().any(|(_, c)| c.state == crate::instance::SlotState::Failed)
                && !of_slot().any(|(_, c)| c.state.is_live())
            {
                failed = true;
                continue;
            }
            return RunState::Running;
        }
        if failed {
            RunState::Failed
        } else {
            RunState::Succeeded
        }
    }

    /// Recent runs of cron job `name`, oldest first.
    pub fn runs_of(&self, name: &str, now: Instant) -> Vec<cron::Run> {
        self.desired
            .children_of(name)
            .into_iter()
            .map(|(t, r)| cron::Run {
                job: r.name.clone(),
                time: t,
                state: self.run_state(r, now),
            })
            .collect()
    }

    /// Whether a write of this node's holding `name` is on its way to the
    /// disk.
    fn writing(&self, name: &str) -> bool {
        self.writes
            .values()
            .any(|w| w.jobs.iter().any(|j| j.name == name))
    }

    /// Moves every cron job's clock and fires what is due here.
    pub(super) fn cron_step(&mut self, now: Now) {
        if !self.sync.caught_up || self.seen.view.members.is_empty() {
            return;
        }
        // Clocks of cron jobs no longer live go.
        let jobs = self.desired.cron_jobs();
        self.cron_clocks.retain(|n, _| jobs.contains(n));
        let jobs: Vec<String> = jobs.iter().cloned().collect();
        for name in &jobs {
            self.cron_job(name, now);
        }
        // Runs of a cron job that is gone (stopped, or no longer a cron
        // job) go, running or not: a node that fired a time just before it
        // heard of the stop wrote a run the stop did not list (found in
        // review). Their coordinator removes them, at the clock of the
        // cron job's last record: the tombstone is the same whoever writes
        // it.
        // A parent not held at all is not known yet (a run may arrive
        // first): only a stopped one, or one no longer cron, counts.
        let orphans: Vec<(String, crate::hlc::Hlc)> = self
            .desired
            .cron_runs()
            .iter()
            .filter_map(|run| {
                let parent = self.desired.get(cron::parse_child(run)?.0)?;
                let cron = parent.spec.as_ref().map(|s| s.job_type) == Some(JobType::Cron);
                (!cron).then(|| (run.clone(), parent.version.hlc))
            })
            .collect();
        for (child, at) in orphans {
            if self.writes.len() >= self.config.writes_in_flight_max {
                break;
            }
            if self.seen.view.members.coordinator(&child).map(|c| &**c) != Some(&*self.me)
                || self.writing(&child)
            {
                continue;
            }
            let Some(r) = self.desired.get(&child) else {
                continue;
            };
            let gone = Arc::new(cron::child_tombstone(r, at, "orphan"));
            self.persist(vec![gone], Vec::new(), Origin::Coordinator);
        }
    }

    fn cron_job(&mut self, name: &str, now: Now) {
        let Some(record) = self.desired.get(name).filter(|r| r.is_live()).cloned() else {
            self.cron_clocks.remove(name);
            return;
        };
        let Some(spec) = record.spec.as_ref() else {
            return;
        };
        let Some(cs) = spec.cron.as_ref().filter(|c| c.enabled) else {
            self.cron_clocks.remove(name);
            return;
        };
        let stale = self
            .cron_clocks
            .get(name)
            .is_none_or(|c| c.version != record.version);
        if stale {
            match CronClock::new(cs, record.version.clone()) {
                Some(c) => {
                    self.cron_clocks.insert(name.to_string(), c);
                }
                None => return,
            }
        }
        let Some(clock) = self.cron_clocks.get_mut(name) else {
            return;
        };
        clock.advance(now.wall_ms);
        let Some(t) = clock.pending else { return };
        let child = cron::child_name(name, t);
        if self.desired.get(&child).is_some() {
            // Written (by this node or another): done with this time.
            clock.pending = None;
            return;
        }
        let t_ms = u64::try_from(t).unwrap_or(0).saturating_mul(1000);
        // Never later than `job_gc_after` allows: a run's tombstone must
        // outlive every node that might still fire its time.
        let deadline_ms = u64::try_from(cs.starting_deadline.as_millis())
            .unwrap_or(u64::MAX)
            .min(self.config.job_gc_after_ms() / 2);
        if now.wall_ms > t_ms.saturating_add(deadline_ms) {
            clock.pending = None;
            self.counters.cron_skipped = self.counters.cron_skipped.saturating_add(1);
            return;
        }
        // A side cut off with a minority fires nothing (unless the job says
        // `partition = "replace"`): the majority side fires it, once.
        if self.seen.minority() && spec.partition_policy() != PartitionPolicy::Replace {
            return;
        }
        let alive = self
            .seen
            .view
            .members
            .iter()
            .filter(|m| m.state == NodeState::Alive || m.name == self.me)
            .map(|m| &*m.name);
        let Some(rank) = cron::fire_rank(name, t, &self.me, alive) else {
            return;
        };
        let fallback_ms = u64::try_from(cron::FALLBACK.as_millis()).unwrap_or(1000);
        let due_ms = t_ms.saturating_add(fallback_ms.saturating_mul(rank as u64));
        if now.wall_ms < due_ms
            || self.writing(&child)
            || self.writes.len() >= self.config.writes_in_flight_max
        {
            return;
        }
        let (running, finished) = self.runs_by_state(name, now);
        let skip = match cs.concurrency {
            cron::Concurrency::Forbid => !running.is_empty(),
            cron::Concurrency::Allow => running.len() >= cron::RUNNING_MAX,
            cron::Concurrency::Replace => false,
        };
        if skip {
            if let Some(c) = self.cron_clocks.get_mut(name) {
                c.pending = None;
            }
            self.counters.cron_skipped = self.counters.cron_skipped.saturating_add(1);
            return;
        }
        let Some(run) = cron::child_record(&record, t) else {
            return;
        };
        let mut records = vec![Arc::new(run)];
        if cs.concurrency == cron::Concurrency::Replace {
            records.extend(
                running
                    .iter()
                    .map(|r| Arc::new(cron::child_tombstone(r, cron::clock_of(t), "replaced"))),
            );
        }
        records.extend(beyond_history(&finished, cs.history, t));
        self.counters.cron_fired = self.counters.cron_fired.saturating_add(1);
        self.persist(records, Vec::new(), Origin::Coordinator);
    }

    /// `shoal cron force`: a run of cron job `name` now, whatever its
    /// schedule (and even while disabled).
    pub(super) fn cron_force(&mut self, token: ApiToken, name: String, now: Now) {
        let Some(record) = self.desired.get(&name).filter(|r| r.is_live()).cloned() else {
            return self.answer(
                token,
                Err(ApiError::NotFound(format!(
                    "no job named `{name}` is running"
                ))),
            );
        };
        if record.spec.as_ref().map(|s| s.job_type) != Some(JobType::Cron) {
            return self.answer(
                token,
                Err(ApiError::BadRequest(format!(
                    "`{name}` is not a cron job; `shoal cron force` starts a run of a cron job"
                ))),
            );
        }
        // This second, or the next free one (a scheduled run, or another
        // forced one, may have taken it: times are at least
        // `INTERVAL_MIN` apart, so one of the next few is free).
        let now_s = i64::try_from(now.wall_ms / 1000).unwrap_or(i64::MAX);
        let free = (0..3)
            .map(|d| now_s.saturating_add(d))
            .map(|t| (t, cron::child_name(&name, t)))
            .find(|(_, c)| self.desired.get(c).is_none() && !self.writing(c));
        let Some((t, child)) = free else {
            return self.answer(
                token,
                Err(ApiError::Conflict(format!(
                    "runs of `{name}` were started in each of the last seconds; try again in a few seconds"
                ))),
            );
        };
        let Some(spec) = record.spec.as_ref() else {
            return;
        };
        let child_spec = cron::child_spec(spec, t);
        self.write(token, child, Some(child_spec), now);
        // Forced runs keep to `history` too (found in review: while the
        // job is disabled nothing else would remove them).
        let history = spec.cron.as_ref().map_or(0, |c| c.history);
        let (_, finished) = self.runs_by_state(&name, now);
        let gone: Vec<Arc<JobRecord>> = beyond_history(&finished, history, t).collect();
        if !gone.is_empty() && self.writes.len() < self.config.writes_in_flight_max {
            self.persist(gone, Vec::new(), Origin::Coordinator);
        }
    }

    /// The live runs of cron job `name`: (running, finished), oldest
    /// first.
    fn runs_by_state(&self, name: &str, now: Now) -> (Vec<Arc<JobRecord>>, Vec<Arc<JobRecord>>) {
        self.desired
            .children_of(name)
            .into_iter()
            .filter(|(_, r)| r.is_live())
            .map(|(_, r)| r.clone())
            .partition(|r| self.run_state(r, now.mono) == RunState::Running)
    }

    /// Tombstones of `name`'s running runs, at `version` (a stop of a cron
    /// job stops its runs with it).
    pub(super) fn runs_stopped_with(
        &self,
        name: &str,
        version: &crate::hlc::Version,
    ) -> Vec<Arc<JobRecord>> {
        self.desired
            .children_of(name)
            .into_iter()
            .filter(|(_, r)| r.is_live())
            .map(|(_, r)| Arc::new(JobRecord::new(r.name.clone(), version.clone(), None)))
            .collect()
    }
}

/// Tombstones of the oldest `finished` runs beyond the `history` kept, at
/// the clock of time `t` (the one being fired).
fn beyond_history(
    finished: &[Arc<JobRecord>],
    history: u32,
    t: i64,
) -> impl Iterator<Item = Arc<JobRecord>> + '_ {
    let extra = finished.len().saturating_sub(history as usize);
    finished[..extra]
        .iter()
        .map(move |r| Arc::new(cron::child_tombstone(r, cron::clock_of(t), "history")))
}
