//! The replicated desired state's records: job versions (last writer wins,
//! stops as tombstones) and batch completions.

use serde::{Deserialize, Serialize};

use crate::hlc::Version;
use crate::job::JobSpec;

/// One job's replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job name.
    pub name: String,
    /// Version of this write.
    pub version: Version,
    /// The spec, or `None` once the job is stopped (a tombstone, kept so
    /// that an older write arriving late cannot resurrect it).
    pub spec: Option<JobSpec>,
    /// The job's version as people see it (`v7`): one more than the
    /// record it replaced on the writing node. Two writes at once on two
    /// nodes may get the same number; `version` decides between them.
    #[serde(default = "first_seq")]
    pub seq: u64,
    /// Earlier versions with a spec, newest first: at most
    /// [`HISTORY_MAX`] - 1 (with this one, the job's last
    /// [`HISTORY_MAX`]), and at most [`HISTORY_BYTES_MAX`] of specs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Earlier>,
    /// Written by an automatic revert of this version number (never
    /// reverted itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_from: Option<u64>,
    /// `shoal deployment promote`: this version's canaries were accepted
    /// and its update goes on past them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub promoted: bool,
    /// How this version's deployment ended, once it has (written by the
    /// job's coordinator, see [`JobRecord::mark`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Outcome>,
    /// An operator's word on a node (`shoal node drain|ineligible`), in a
    /// record named [`node_record_name`] with no spec: a node setting is
    /// replicated like a job write (last writer wins, anti-entropy, the
    /// disk), so every node agrees on it. `None` there: the node is back
    /// to eligible, a tombstone collected like a stopped job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeSetting>,
    /// Which node holds a slot of a `partition = "never"` job, in a record
    /// named [`claim_record_name`] with no spec (see [`Claim`]). `None`
    /// there: the slot is free, a tombstone collected like a stopped
    /// job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

/// The node that holds a slot of a `partition = "never"` job: only it may
/// run the slot. Written by the job's coordinator when the slot has no
/// holder, given up (a tombstone) only by the holder once its copy is
/// gone, or by `shoal node forget`. A lost holder's slot therefore waits
/// for the holder to return or be forgotten, however the cluster is cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The holder.
    pub node: String,
}

/// Prefix of the records that hold slot claims (':' is in no job name).
pub const CLAIM_RECORD_PREFIX: &str = "claim:";

/// The record name of the claim on slot `slot` of `job`.
pub fn claim_record_name(job: &str, slot: u32) -> String {
    format!("{CLAIM_RECORD_PREFIX}{job}:{slot}")
}

/// The job and slot a claim record is about, if `name` is one.
pub fn claim_of_record(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix(CLAIM_RECORD_PREFIX)?;
    let (job, slot) = rest.rsplit_once(':')?;
    // One spelling per slot: no sign, no leading zero.
    if slot.is_empty()
        || (slot.len() > 1 && slot.starts_with('0'))
        || !slot.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((job, slot.parse().ok()?))
}

/// What an operator set on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSetting {
    /// Whether the node may take new work (a draining node may not).
    pub eligible: bool,
    /// Its drain, while one is asked for (it stays until the node is
    /// made eligible again, as Nomad's does: a drained node takes
    /// nothing new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    /// `shoal node forget`: the version of the forget. The node's claims
    /// older than it hold nothing (their slots are placed elsewhere, and
    /// the node stops its copies if it comes back); kept, so that a
    /// claim written before the forget and heard of after it cannot
    /// revive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<Version>,
}

impl NodeSetting {
    /// Whether the setting says nothing (eligible, no drain, never
    /// forgotten): its record is a tombstone.
    pub fn is_default(&self) -> bool {
        self.eligible && self.drain.is_none() && self.forgotten.is_none()
    }
}

/// A drain: the node's service copies move elsewhere start-first, its
/// batch copies may finish until the deadline, then what is left stops;
/// its system copies stop last (unless kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// When it was asked (ms since the epoch, the writer's clock).
    pub since_ms: u64,
    /// When what is left on the node stops (ms since the epoch; equal to
    /// `since_ms` for `--force`).
    pub deadline_ms: u64,
    /// Its system jobs' copies keep running (`--keep-system`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_system: bool,
}

/// Longest drain deadline (a week: beyond it, a node is better made
/// ineligible).
pub const DRAIN_DEADLINE_MAX: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// How far a drain's start may be from its record's clock, ms (the
/// writer's wall clock and its hybrid clock differ by at most the clock
/// offset the cluster tolerates, far below this).
pub const DRAIN_CLOCK_SLACK_MS: u64 = 3_600_000;

/// Prefix of the records that hold node settings (':' is in no job name).
pub const NODE_RECORD_PREFIX: &str = "node:";

/// The record name of node `node`'s setting.
pub fn node_record_name(node: &str) -> String {
    format!("{NODE_RECORD_PREFIX}{node}")
}

/// The node a node-setting record is about, if `name` is one.
pub fn node_of_record(name: &str) -> Option<&str> {
    name.strip_prefix(NODE_RECORD_PREFIX)
}

/// How a deployment (the rollout of one version of a service) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every slot ran the version, ready, with no older copy left.
    Successful,
    /// A copy of the version was not ready within `healthy_deadline`.
    FailedUnhealthy,
    /// No slot became ready for `progress_deadline`.
    FailedNoProgress,
    /// A newer version was written before it ended.
    Cancelled,
}

impl Outcome {
    /// What a person reads.
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Successful => "successful",
            Outcome::FailedUnhealthy => "failed: a copy was not ready within healthy_deadline",
            Outcome::FailedNoProgress => "failed: no slot became ready within progress_deadline",
            Outcome::Cancelled => "cancelled by a newer version",
        }
    }

    /// Its state as the API names it: successful, failed or cancelled.
    pub fn state(self) -> &'static str {
        match self {
            Outcome::Successful => "successful",
            Outcome::FailedUnhealthy | Outcome::FailedNoProgress => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// Whether the deployment failed.
    pub fn failed(self) -> bool {
        matches!(self, Outcome::FailedUnhealthy | Outcome::FailedNoProgress)
    }

    fn tag(self) -> &'static str {
        match self {
            Outcome::Successful => "successful",
            Outcome::FailedUnhealthy => "failed-unhealthy",
            Outcome::FailedNoProgress => "failed-no-progress",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Records written before versions were numbered count as the first.
fn first_seq() -> u64 {
    1
}

/// Highest version number (far beyond any real job's writes; a record
/// from a peer above it is refused).
pub const SEQ_MAX: u64 = 1 << 48;

/// Versions of a job kept (the current one included).
pub const HISTORY_MAX: usize = 10;

/// Most bytes of earlier specs (JSON) one record carries: the oldest go
/// first beyond it.
pub const HISTORY_BYTES_MAX: usize = 512 * 1024;

/// An earlier version of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Earlier {
    /// Its number (`v6`).
    pub seq: u64,
    /// Its version.
    pub version: Version,
    /// Its spec.
    pub spec: JobSpec,
    /// How its deployment ended (services; `None` for batch jobs and
    /// records written before deployments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl JobRecord {
    /// A record without a past (the first version, and tests).
    pub fn new(name: impl Into<String>, version: Version, spec: Option<JobSpec>) -> JobRecord {
        JobRecord {
            name: name.into(),
            version,
            spec,
            seq: 1,
            history: Vec::new(),
            reverted_from: None,
            promoted: false,
            deployment: None,
            node: None,
            claim: None,
        }
    }

    /// The record of the claim on slot `slot` of `job` at `version`
    /// (`None`: the slot is free).
    pub fn claim_on(job: &str, slot: u32, version: Version, holder: Option<&str>) -> JobRecord {
        let mut r = JobRecord::new(claim_record_name(job, slot), version, None);
        r.claim = holder.map(|n| Claim {
            node: n.to_string(),
        });
        r
    }

    /// The record of node `node`'s setting at `version` (`None`: back to
    /// the default, eligible).
    pub fn node_setting(
        current: Option<&JobRecord>,
        node: &str,
        version: Version,
        setting: Option<NodeSetting>,
    ) -> JobRecord {
        let mut r = JobRecord::new(node_record_name(node), version, None);
        r.seq = current.map_or(1, |c| c.seq.saturating_add(1));
        r.node = setting;
        r
    }

    /// Whether the record is a tombstone that may be collected (a
    /// stopped job, a node back to its default).
    pub fn is_tombstone(&self) -> bool {
        self.spec.is_none() && self.node.is_none() && self.claim.is_none()
    }

    /// This record with its deployment ended as `outcome`, written by the
    /// job's coordinator. Deterministic, like a revert: every node that
    /// sees the same end writes the same record, at this record's clock
    /// with its writer's name followed by `!` and the outcome (so two
    /// nodes that saw different ends still agree on which one wins, and
    /// any later write, a user's included, beats it).
    pub fn mark(&self, outcome: Outcome) -> JobRecord {
        let mut r = self.clone();
        r.version = Version {
            hlc: self.version.hlc,
            node: format!("{}!{}", self.version.node, outcome.tag()),
        };
        r.deployment = Some(outcome);
        r
    }

    /// This record with its canaries promoted, at `version` (a user's
    /// write: it beats the coordinator's marks).
    pub fn promote(&self, version: Version) -> JobRecord {
        let mut r = self.clone();
        r.version = version;
        r.promoted = true;
        r
    }

    /// The automatic revert of this (failed) version to `spec`: the next
    /// number, and a version that beats this one and nothing newer: this
    /// one's clock, and its writer's name followed by `!revert` ('!' sorts
    /// before every character of a node name, so a write at this very
    /// clock by any node that beats this one beats the revert too).
    /// Deterministic: every node that decides to revert writes the same
    /// record.
    pub fn revert_to(&self, spec: JobSpec, target: u64, why: Outcome) -> JobRecord {
        // What the record holds is in its version: two coordinators that
        // decided differently (why it failed, which version to go back
        // to) write two versions, and one wins everywhere (found in
        // review: one version with two contents never converges).
        let version = Version {
            hlc: self.version.hlc,
            node: format!("{}!revert-{}-v{target}", self.version.node, why.tag()),
        };
        let mut r = JobRecord::next(Some(self), self.name.clone(), version, Some(spec));
        r.reverted_from = Some(self.seq);
        // The version reverted to needs no promotion: its canaries are
        // for versions people write.
        r.promoted = true;
        if let Some(e) = r.history.first_mut().filter(|e| e.seq == self.seq) {
            e.outcome = Some(why);
        }
        r
    }

    /// The record that replaces `current` (if any) with `spec` at
    /// `version`: the next number, and `current` (when it had a spec)
    /// first in the history.
    pub fn next(
        current: Option<&JobRecord>,
        name: impl Into<String>,
        version: Version,
        spec: Option<JobSpec>,
    ) -> JobRecord {
        let mut r = JobRecord::new(name, version, spec);
        let Some(c) = current else { return r };
        r.seq = c.seq.saturating_add(1);
        // A write that keeps the task (a scale) keeps the promotion: its
        // copies are the promoted version's (found in review: a scale
        // mid-rollout waited for a promotion nobody would give).
        r.promoted = c.promoted
            && c.spec.as_ref().map(|s| s.task.fingerprint())
                == r.spec.as_ref().map(|s| s.task.fingerprint());
        let mut history = Vec::with_capacity(HISTORY_MAX);
        if let Some(spec) = &c.spec {
            let service = spec.job_type == crate::job::JobType::Service;
            history.push(Earlier {
                seq: c.seq,
                version: c.version.clone(),
                spec: spec.clone(),
                outcome: service.then(|| c.deployment.unwrap_or(Outcome::Cancelled)),
            });
        }
        history.extend(c.history.iter().cloned());
        history.truncate(HISTORY_MAX - 1);
        let mut bytes = 0usize;
        let keep = history
            .iter()
            .take_while(|e| {
                bytes = bytes.saturating_add(serde_json::to_vec(&e.spec).map_or(0, |b| b.len()));
                bytes <= HISTORY_BYTES_MAX
            })
            .count();
        history.truncate(keep);
        r.history = history;
        r
    }

    /// The spec of version `seq` (the current one or one in the history).
    pub fn spec_of(&self, seq: u64) -> Option<&JobSpec> {
        if seq == self.seq {
            return self.spec.as_ref();
        }
        self.history.iter().find(|e| e.seq == seq).map(|e| &e.spec)
    }

    /// Whether the job is live (not stopped).
    pub fn is_live(&self) -> bool {
        self.spec.is_some()
    }

    /// Checks a record that came from a peer (or the disk) as the API
    /// checks a submission: a name the API would accept, a spec that
    /// validates and is named like its record.
    pub fn validate(&self) -> Result<(), String> {
        if let Some((job, slot)) = claim_of_record(&self.name) {
            if !crate::job::valid_job_name(job) || slot >= crate::job::REPLICAS_MAX {
                return Err(format!("invalid job or slot in claim `{}`", self.name));
            }
            if self.spec.is_some()
                || self.node.is_some()
                || !self.history.is_empty()
                || self.seq > SEQ_MAX
            {
                return Err(format!(
                    "claim `{}` holds a job or a node setting",
                    self.name
                ));
            }
            if let Some(c) = &self.claim {
                if !shoal_membership::record::valid_node_name(&c.node) {
                    return Err(format!("claim `{}` names an invalid node", self.name));
                }
            }
            return Ok(());
        }
        if self.claim.is_some() {
            return Err(format!("record `{}` holds a claim", self.name));
        }
        if let Some(node) = node_of_record(&self.name) {
            if !shoal_membership::record::valid_node_name(node) {
                return Err(format!("invalid node name in record `{}`", self.name));
            }
            if self.spec.is_some() || !self.history.is_empty() || self.seq > SEQ_MAX {
                return Err(format!("node record `{}` holds a job", self.name));
            }
            if let Some((setting, d)) = self
                .node
                .as_ref()
                .and_then(|n| n.drain.as_ref().map(|d| (n, d)))
            {
                if setting.eligible {
                    return Err(format!(
                        "node record `{}` drains an eligible node",
                        self.name
                    ));
                }
                let span = d.deadline_ms.checked_sub(d.since_ms);
                if span.is_none_or(|s| s > DRAIN_DEADLINE_MAX.as_millis() as u64) {
                    return Err(format!(
                        "node record `{}` has a drain deadline out of bounds",
                        self.name
                    ));
                }
                // The drain was asked when the record was written (a
                // deadline years ahead would never come).
                if d.since_ms.abs_diff(self.version.hlc.wall_ms) > DRAIN_CLOCK_SLACK_MS {
                    return Err(format!(
                        "node record `{}` has a drain asked at another time than it was written",
                        self.name
                    ));
                }
            }
            return Ok(());
        }
        if self.node.is_some() {
            return Err(format!("job record `{}` holds a node setting", self.name));
        }
        if !crate::job::valid_job_name(&self.name) {
            return Err(format!("invalid job name `{}`", self.name));
        }
        if let Some(spec) = &self.spec {
            if spec.name != self.name {
                return Err(format!(
                    "record `{}` holds a spec named `{}`",
                    self.name, spec.name
                ));
            }
            spec.validate("").map_err(|e| e.to_string())?;
        }
        if self.history.len() >= HISTORY_MAX {
            return Err(format!(
                "record `{}` carries {} earlier versions; at most {}",
                self.name,
                self.history.len(),
                HISTORY_MAX - 1
            ));
        }
        if self.seq > SEQ_MAX {
            return Err(format!(
                "record `{}` is at version {}, beyond {SEQ_MAX}",
                self.name, self.seq
            ));
        }
        // The earlier specs are checked when reverted to (a rule tightened
        // by a later release must not drop a live job).
        let mut above = self.seq;
        let mut bytes = 0usize;
        for e in &self.history {
            if e.seq >= above || e.version >= self.version || e.spec.name != self.name {
                return Err(format!(
                    "record `{}` carries an earlier version out of order or of another job",
                    self.name
                ));
            }
            above = e.seq;
            bytes = bytes.saturating_add(serde_json::to_vec(&e.spec).map_or(0, |b| b.len()));
        }
        if bytes > HISTORY_BYTES_MAX {
            return Err(format!(
                "record `{}` carries {bytes} bytes of earlier versions; at most {HISTORY_BYTES_MAX}",
                self.name
            ));
        }
        Ok(())
    }
}

/// A batch slot that ran to completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// Job name.
    pub job: String,
    /// Slot index.
    pub slot: u32,
    /// Version of the job the slot completed under.
    pub job_version: Version,
    /// Node that ran it.
    pub node: String,
    /// Exit code.
    pub exit_code: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn version(ms: u64) -> Version {
        Version {
            hlc: Hlc {
                wall_ms: ms,
                logical: 0,
            },
            node: "n0".into(),
        }
    }

    fn spec(replicas: u32) -> JobSpec {
        JobSpec::parse(&format!(
            "name = \"web\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ncommand = \"sleep\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn history_keeps_the_last_versions_newest_first_and_validates() {
        let mut r = JobRecord::new("web", version(1), Some(spec(1)));
        for i in 2..=15u64 {
            r = JobRecord::next(Some(&r), "web", version(i), Some(spec(i as u32)));
            r.validate().unwrap();
        }
        assert_eq!(r.seq, 15);
        assert_eq!(r.history.len(), HISTORY_MAX - 1);
        assert_eq!(r.history[0].seq, 14);
        assert_eq!(r.spec_of(6).unwrap().replicas, 6);
        assert!(r.spec_of(5).is_none(), "older than the last 10");
        // A stop keeps the history (a stopped job can be reverted).
        let stopped = JobRecord::next(Some(&r), "web", version(16), None);
        assert_eq!((stopped.seq, stopped.history[0].seq), (16, 15));
        stopped.validate().unwrap();
        // From a peer: out of order, beyond the bound, or too many.
        let mut bad = r.clone();
        bad.history.swap(0, 1);
        assert!(bad.validate().is_err());
        let mut bad = r.clone();
        bad.seq = SEQ_MAX + 1;
        assert!(bad.validate().is_err());
        let mut bad = r.clone();
        bad.history.push(Earlier {
            seq: 0,
            version: version(0),
            spec: spec(1),
            outcome: None,
        });
        assert!(bad.validate().is_err());
        // A record of an earlier release (no seq) counts as the first.
        let old: JobRecord = serde_json::from_str(
            &serde_json::to_string(&JobRecord::new("web", version(1), Some(spec(1))))
                .unwrap()
                .replace(",\"seq\":1", ""),
        )
        .unwrap();
        assert_eq!(old.seq, 1);
    }

    #[test]
    fn a_revert_beats_the_failed_version_and_nothing_newer() {
        let good = JobRecord::new("web", version(10), Some(spec(1)));
        let failed = JobRecord::next(Some(&good), "web", version(20), Some(spec(2)));
        let revert = failed.revert_to(spec(1), 1, Outcome::FailedUnhealthy);
        revert.validate().unwrap();
        assert!(revert.promoted, "a revert waits for no promotion");
        // Two coordinators that decided differently write two versions.
        assert_ne!(
            revert.version,
            failed
                .revert_to(spec(1), 1, Outcome::FailedNoProgress)
                .version
        );
        assert_eq!((revert.seq, revert.reverted_from), (3, Some(2)));
        assert_eq!(revert.spec_of(3).unwrap().replicas, 1);
        assert!(revert.version > failed.version);
        // The same whichever node writes it.
        assert_eq!(
            revert,
            failed.revert_to(spec(1), 1, Outcome::FailedUnhealthy)
        );
        // Any write that beats the failed one beats the revert: a later
        // clock, or the same clock by a node that sorts after its writer.
        let later = Version {
            hlc: Hlc {
                wall_ms: 20,
                logical: 1,
            },
            node: "a".into(),
        };
        assert!(later > revert.version);
        for node in ["n0-b", "n00", "n0.x", "n1", "z"] {
            let v = Version {
                hlc: failed.version.hlc,
                node: node.into(),
            };
            assert!(v > failed.version, "{node}");
            assert!(v > revert.version, "{node} loses to the revert");
        }
    }

    #[test]
    fn node_records_are_checked_and_kept_until_the_node_is_eligible_again() {
        let drain = |since_ms, deadline_ms| NodeSetting {
            eligible: false,
            forgotten: None,
            drain: Some(Drain {
                since_ms,
                deadline_ms,
                keep_system: false,
            }),
        };
        let r = JobRecord::node_setting(None, "n1", version(5), Some(drain(5, 3_600_005)));
        assert_eq!(r.name, "node:n1");
        assert_eq!(node_of_record(&r.name), Some("n1"));
        r.validate().unwrap();
        // A setting is not a tombstone: it outlives the collection horizon.
        assert!(!r.is_tombstone());
        let cleared = JobRecord::node_setting(Some(&r), "n1", version(6), None);
        assert!(cleared.is_tombstone() && cleared.seq == 2);
        cleared.validate().unwrap();
        // From a peer: a bad node name, a job in a node record, a node
        // setting in a job record, a deadline before the drain or beyond
        // the bound are refused.
        let mut bad = r.clone();
        bad.name = "node:../x".into();
        assert!(bad.validate().is_err());
        let mut bad = r.clone();
        bad.spec = Some(spec(1));
        assert!(bad.validate().is_err());
        let mut bad = JobRecord::new("web", version(1), Some(spec(1)));
        bad.node = r.node.clone();
        assert!(bad.validate().is_err());
        let mut bad = r.clone();
        bad.node.as_mut().unwrap().eligible = true;
        assert!(bad.validate().is_err(), "an eligible node draining");
        let far = 5 + 2 * DRAIN_CLOCK_SLACK_MS;
        for (since, deadline) in [
            (10, 5),
            (0, DRAIN_DEADLINE_MAX.as_millis() as u64 + 1),
            (far, far + 1),
        ] {
            let bad = JobRecord::node_setting(None, "n1", version(5), Some(drain(since, deadline)));
            assert!(bad.validate().is_err(), "{since} {deadline}");
        }
        // The desired state indexes the setting and forgets it when cleared.
        let mut d = crate::desired::DesiredState::default();
        d.apply(std::sync::Arc::new(r.clone()));
        assert_eq!(d.node_setting("n1"), r.node.as_ref());
        assert!(d.tombstones_before(u64::MAX, 10).is_empty());
        d.apply(std::sync::Arc::new(cleared));
        assert_eq!(d.node_setting("n1"), None);
        assert_eq!(d.tombstones_before(u64::MAX, 10).len(), 1);
    }

    #[test]
    fn claims_name_one_slot_hold_no_job_and_lose_to_a_later_forget() {
        use crate::hlc::{Hlc, Version};
        let v = |wall_ms| Version {
            hlc: Hlc {
                wall_ms,
                logical: 0,
            },
            node: "n0".into(),
        };
        assert_eq!(claim_of_record("claim:web:3"), Some(("web", 3)));
        for bad in [
            "claim:web:03",
            "claim:web:",
            "claim:web:-1",
            "claim:web",
            "web:3",
        ] {
            assert_eq!(claim_of_record(bad), None, "{bad}");
        }
        let c = JobRecord::claim_on("web", 3, v(10), Some("n1"));
        assert_eq!(c.name, claim_record_name("web", 3));
        c.validate().expect("a claim");
        assert!(!c.is_tombstone());
        let released = JobRecord::claim_on("web", 3, v(11), None);
        released.validate().expect("a release");
        assert!(released.is_tombstone());
        let mut bad = c.clone();
        bad.claim = Some(Claim {
            node: "not a node!".into(),
        });
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.node = Some(NodeSetting {
            eligible: false,
            drain: None,
            forgotten: None,
        });
        assert!(bad.validate().is_err());
        let mut job = JobRecord::new("web", v(1), None);
        job.claim = c.claim.clone();
        assert!(job.validate().is_err(), "a job record holds no claim");
        assert!(
            JobRecord::claim_on("web", crate::job::REPLICAS_MAX, v(1), Some("n1"))
                .validate()
                .is_err()
        );

        // The claim holds until its holder is forgotten after it; a
        // release frees the slot.
        let mut d = crate::desired::DesiredState::default();
        d.apply(std::sync::Arc::new(c.clone()));
        assert_eq!(d.holder("web", 3), Some("n1"));
        let forget = |at| {
            JobRecord::node_setting(
                None,
                "n1",
                v(at),
                Some(NodeSetting {
                    eligible: true,
                    drain: None,
                    forgotten: Some(v(at)),
                }),
            )
        };
        d.apply(std::sync::Arc::new(forget(5)));
        assert_eq!(d.holder("web", 3), Some("n1"), "forgotten before the claim");
        d.apply(std::sync::Arc::new(forget(20)));
        assert_eq!(d.holder("web", 3), None);
        assert_eq!(d.claim("web", 3).map(|(n, _)| n), Some("n1"));
        d.apply(std::sync::Arc::new(JobRecord::claim_on(
            "web",
            3,
            v(21),
            None,
        )));
        assert_eq!(d.claim("web", 3), None);
        assert_eq!(d.claims().count(), 0);
    }
}
