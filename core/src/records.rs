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
}

impl JobRecord {
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
