//! Node-to-node calls of the scheduler ([`shoal_transport::Service::Rpc`]).
//! Bodies are JSON (job specs use optional fields, which a non-self-
//! describing format cannot carry); frames bound their size.

use serde::{Deserialize, Serialize};
use shoal_placement::Node;

use crate::hlc::Version;
use crate::store::{Completion, JobRecord};

/// A call.
#[derive(Debug, Clone, Serialize, Deserialize)]
// Calls live briefly between decode and handling; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Job writes to store (last writer wins).
    PutJobs(Vec<JobRecord>),
    /// Batch completions to record.
    PutCompletions(Vec<Completion>),
    /// Anti-entropy, first step: fingerprints of the caller's jobs and
    /// completions.
    SyncHash {
        /// Fingerprint of every (name, version).
        jobs: u64,
        /// Fingerprint of every completed (job, slot).
        completions: u64,
    },
    /// Anti-entropy, second step: the caller's whole digest.
    Sync {
        /// Every job name and version the caller holds.
        jobs: Vec<(String, Version)>,
        /// Every completed (job, slot) the caller holds.
        completions: Vec<(String, u32)>,
    },
    /// A coordinator asks a candidate for its fresh load.
    Bid,
    /// A coordinator tells the winner to start slots of a job.
    Start {
        /// The job (so the winner need not have it yet).
        job: JobRecord,
        /// Slot indices.
        slots: Vec<u32>,
    },
    /// The tail of an instance's output.
    Logs {
        /// Job.
        job: String,
        /// Slot.
        slot: u32,
        /// `stdout` or `stderr`.
        stream: String,
        /// At most this many bytes.
        max_bytes: u64,
    },
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// Anti-entropy: fingerprints match.
    InSync,
    /// Anti-entropy: send the whole digest.
    Differs,
    /// Anti-entropy result.
    Synced {
        /// Records newer than the caller's.
        newer: Vec<JobRecord>,
        /// Names whose record the caller has newer (send them back).
        want: Vec<String>,
        /// Completions the caller lacks.
        completions: Vec<Completion>,
    },
    /// A bid: the candidate as placement sees it, with its fresh load.
    Bid(Node),
    /// Start result: slots refused and why.
    Started {
        /// (slot, reason).
        refused: Vec<(u32, String)>,
    },
    /// Output bytes.
    Logs(Vec<u8>),
    /// The call failed.
    Error(String),
}

/// Fingerprint of a set of items (order-independent).
pub fn fingerprint<T: Serialize>(items: impl Iterator<Item = T>) -> u64 {
    items.fold(0u64, |acc, i| acc.wrapping_add(fingerprint_item(&i)))
}

/// One item's share of [`fingerprint`]: a set's fingerprint is the
/// wrapping sum of its items', so it can be kept up to date item by item
/// (subtract the old, add the new).
pub fn fingerprint_item<T: Serialize>(item: &T) -> u64 {
    crate::job::fnv1a(&serde_json::to_vec(item).expect("encodes"))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoder_survives_garbage(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
            let _ = serde_json::from_slice::<Response>(&bytes);
        }
    }

    #[test]
    fn a_fingerprint_kept_item_by_item_equals_the_whole_one() {
        let mut kept = fingerprint(std::iter::empty::<&str>());
        for item in ["a", "b", "c"] {
            kept = kept.wrapping_add(fingerprint_item(&item));
        }
        kept = kept.wrapping_sub(fingerprint_item(&"b"));
        assert_eq!(kept, fingerprint(["c", "a"].iter()));
    }

    #[test]
    fn fingerprint_ignores_order() {
        assert_eq!(
            fingerprint(["a", "b"].iter()),
            fingerprint(["b", "a"].iter())
        );
        assert_ne!(
            fingerprint(["a", "b"].iter()),
            fingerprint(["a", "c"].iter())
        );
    }
}
