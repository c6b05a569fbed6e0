//! Deployments: the rollout of one version of a service, read from the
//! copies every node sees, so that `shoal deployment status` answers the
//! same at every node without a deployment object anyone must own.
//!
//! A deployment runs until the job's coordinator sees it end and writes
//! the end into the job record ([`JobRecord::mark`]): `successful` once
//! every slot has a ready copy of the version and no copy of another
//! version is left, `failed` when a copy was not ready within
//! `healthy_deadline` or no slot became ready for `progress_deadline`.
//! A newer version cancels it (the next record keeps its outcome in the
//! history). The end is written, not derived, so it stays put: a copy that
//! crashes after a successful rollout does not turn it back into a
//! running one, and every node (one restarted from its disk included)
//! reads the same end.

use crate::instance::Published;
use crate::job::JobType;
use crate::records::{JobRecord, Outcome};

/// A version's rollout as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The version (`v7`).
    pub version: u64,
    /// How it ended, once the coordinator wrote it.
    pub outcome: Option<Outcome>,
    /// Slots.
    pub replicas: u32,
    /// Slots with a live copy of the version.
    pub placed: u32,
    /// Slots with a ready copy of the version.
    pub ready: u32,
    /// Live copies of other versions.
    pub old: u32,
    /// Copies of the version not ready within `healthy_deadline`.
    pub unhealthy: u32,
    /// Canary slots (`[update] canary`).
    pub canary: u32,
    /// Whether the canaries were promoted.
    pub promoted: bool,
    /// Every canary slot is ready and the update waits for `shoal
    /// deployment promote`.
    pub awaiting_promotion: bool,
}

impl Deployment {
    /// `running`, `successful`, `failed` or `cancelled`.
    pub fn state(&self) -> &'static str {
        self.outcome.map_or("running", Outcome::state)
    }

    /// Every slot ready on the version and nothing older left: what the
    /// coordinator marks successful.
    pub fn done(&self) -> bool {
        self.ready == self.replicas && self.old == 0
    }

    /// What a person reads about it.
    pub fn describe(&self, job: &str) -> String {
        if let Some(o) = self.outcome {
            return o.describe().to_string();
        }
        if self.awaiting_promotion {
            return format!(
                "{} of {} canaries ready; waiting for `shoal deployment promote {job}`",
                self.ready.min(self.canary),
                self.canary.min(self.replicas)
            );
        }
        if self.unhealthy > 0 {
            return format!(
                "{} copies not ready within healthy_deadline; failing",
                self.unhealthy
            );
        }
        format!(
            "{} of {} slots ready on v{}, {} older copies left",
            self.ready, self.replicas, self.version, self.old
        )
    }
}

/// The deployment of `record`'s version, from the live copies of its job
/// (any node's, this one's included); `None` for a batch or stopped job.
pub fn of<'a>(
    record: &JobRecord,
    copies: impl IntoIterator<Item = &'a Published>,
) -> Option<Deployment> {
    let spec = record.spec.as_ref()?;
    if spec.job_type != JobType::Service {
        return None;
    }
    let fp = spec.task.fingerprint();
    let slots = spec.replicas as usize;
    let mut placed = vec![false; slots];
    let mut ready = vec![false; slots];
    let (mut old, mut unhealthy) = (0u32, 0u32);
    for c in copies {
        if !c.state.is_live() {
            continue;
        }
        if c.task != fp {
            old = old.saturating_add(1);
            continue;
        }
        unhealthy = unhealthy.saturating_add(u32::from(c.failed));
        let Some(i) = usize::try_from(c.slot).ok().filter(|i| *i < slots) else {
            continue;
        };
        placed[i] |= !c.stopping;
        ready[i] |= c.ready_on(None);
    }
    let count = |v: &[bool]| v.iter().filter(|b| **b).count() as u32;
    let canary = spec.update.canary;
    let canaries = canary.min(spec.replicas) as usize;
    let awaiting_promotion = record.deployment.is_none()
        && canary > 0
        && !record.promoted
        && old > 0
        && ready[..canaries].iter().all(|r| *r);
    Some(Deployment {
        version: record.seq,
        outcome: record.deployment,
        replicas: spec.replicas,
        placed: count(&placed),
        ready: count(&ready),
        old,
        unhealthy,
        canary,
        promoted: record.promoted,
        awaiting_promotion,
    })
}

/// The versions before the current one with how their deployments ended,
/// newest first (services only).
pub fn past(record: &JobRecord) -> Vec<(u64, Outcome)> {
    record
        .history
        .iter()
        .filter_map(|e| e.outcome.map(|o| (e.seq, o)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{Hlc, Version};
    use crate::instance::SlotState;
    use crate::job::JobSpec;

    fn version(ms: u64, node: &str) -> Version {
        Version {
            hlc: Hlc {
                wall_ms: ms,
                logical: 0,
            },
            node: node.into(),
        }
    }

    fn spec(args: &str, canary: u32) -> JobSpec {
        JobSpec::parse(&format!(
            "name = \"web\"\ntype = \"service\"\nreplicas = 3\n[task]\ncommand = \"sleep\"\nargs = [\"{args}\"]\n\
             [update]\ncanary = {canary}\n"
        ))
        .unwrap()
    }

    fn copy(slot: u32, task: u64, ready: bool) -> Published {
        Published {
            slot,
            run: u64::from(slot) + 1,
            state: SlotState::Running,
            task,
            restarts: 0,
            error: None,
            ports: Default::default(),
            health: Default::default(),
            check: None,
            checks_passing: 0,
            checks_critical: 0,
            stopping: false,
            ready,
            failed: false,
            version: 0,
        }
    }

    #[test]
    fn a_rollout_counts_ready_slots_old_copies_and_waits_for_promotion() {
        let v1 = JobRecord::new("web", version(1, "n0"), Some(spec("1", 1)));
        let v2 = JobRecord::next(Some(&v1), "web", version(2, "n0"), Some(spec("2", 1)));
        let (old, new) = (
            v1.spec.as_ref().unwrap().task.fingerprint(),
            v2.spec.as_ref().unwrap().task.fingerprint(),
        );
        // The first version: no canaries (nothing older to compare with).
        let d = of(
            &v1,
            &[copy(0, old, true), copy(1, old, true), copy(2, old, false)],
        )
        .unwrap();
        assert_eq!(
            (d.ready, d.placed, d.old, d.awaiting_promotion, d.done()),
            (2, 3, 0, false, false)
        );
        // v2: the canary slot is ready, the others run v1.
        let copies = [copy(0, new, true), copy(1, old, true), copy(2, old, true)];
        let d = of(&v2, &copies).unwrap();
        assert_eq!((d.ready, d.old, d.awaiting_promotion), (1, 2, true));
        assert_eq!(d.state(), "running");
        assert!(d.describe("web").contains("shoal deployment promote web"));
        let promoted = v2.promote(version(3, "n1"));
        assert!(!of(&promoted, &copies).unwrap().awaiting_promotion);
        // Done: every slot ready on v2, no v1 copy left.
        let all = [copy(0, new, true), copy(1, new, true), copy(2, new, true)];
        assert!(of(&promoted, &all).unwrap().done());
        // A write that keeps the task (a scale) keeps the promotion; a new
        // task needs its own.
        let same = JobRecord::next(Some(&promoted), "web", version(3, "n2"), Some(spec("2", 1)));
        assert!(same.promoted);
        let other = JobRecord::next(Some(&promoted), "web", version(3, "n2"), Some(spec("5", 1)));
        assert!(!other.promoted);
        let ended = promoted.mark(Outcome::Successful);
        assert_eq!(of(&ended, &copies).unwrap().state(), "successful");
        // A newer version keeps the end; one cut short is cancelled.
        let v3 = JobRecord::next(Some(&ended), "web", version(4, "n0"), Some(spec("3", 1)));
        let v4 = JobRecord::next(Some(&v3), "web", version(5, "n0"), Some(spec("4", 1)));
        assert_eq!(
            past(&v4),
            vec![
                (3, Outcome::Cancelled),
                (2, Outcome::Successful),
                (1, Outcome::Cancelled)
            ]
        );
    }

    #[test]
    fn marks_beat_their_record_and_lose_to_any_later_write() {
        let r = JobRecord::new("web", version(10, "n1"), Some(spec("1", 0)));
        let ok = r.mark(Outcome::Successful);
        let failed = r.mark(Outcome::FailedNoProgress);
        assert!(ok.version > r.version && failed.version > r.version);
        // Two nodes that saw different ends agree on the winner.
        assert_ne!(ok.version, failed.version);
        assert_eq!(r.mark(Outcome::Successful), ok, "deterministic");
        // Any later write beats it: a later clock, or the same clock by a
        // node whose name sorts after the writer's.
        for later in [version(11, "a"), version(10, "n2"), version(10, "n1a")] {
            assert!(later > ok.version && later > failed.version, "{later:?}");
        }
        // A revert of a failed version records that it failed.
        let v2 = JobRecord::next(Some(&r), "web", version(12, "n1"), Some(spec("2", 0)));
        let reverted = v2.revert_to(spec("1", 0), 1, Outcome::FailedNoProgress);
        assert_eq!(past(&reverted)[0], (2, Outcome::FailedNoProgress));
    }
}
