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
    #[serde(default)]
    pub seq: u64,
    /// Earlier versions with a spec, newest first: at most
    /// [`HISTORY_MAX`] - 1 (with this one, the job's last
    /// [`HISTORY_MAX`]), and at most [`HISTORY_BYTES_MAX`] of specs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Earlier>,
}

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
        }
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
        let mut history = Vec::with_capacity(HISTORY_MAX);
        if let Some(spec) = &c.spec {
            history.push(Earlier {
                seq: c.seq,
                version: c.version.clone(),
                spec: spec.clone(),
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
        if !crate::job::valid_name(&self.name) {
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
        let mut above = self.seq;
        for e in &self.history {
            if e.seq >= above || e.version >= self.version || e.spec.name != self.name {
                return Err(format!(
                    "record `{}` carries an earlier version out of order or of another job",
                    self.name
                ));
            }
            above = e.seq;
            e.spec.validate("").map_err(|e| e.to_string())?;
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
