//! Node-to-node calls of the scheduler ([`Request`], [`Response`]). Bodies
//! are JSON (job specs use optional fields, which a non-self-describing
//! format cannot carry); the transport bounds a frame at 4 MiB, and every
//! list here is bounded well below that by the constants of
//! [`crate::config::SchedulerConfig`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_placement::Node;

use crate::hlc::Version;
use crate::records::{Completion, JobRecord};

/// Longest request or response decoded, bytes (the transport's frame
/// bound; a larger body is refused before parsing).
pub const BODY_LEN_MAX: usize = 4 * 1024 * 1024;

/// A call.
#[derive(Debug, Clone, Serialize, Deserialize)]
// Calls live briefly between decode and handling; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Job writes to store (last writer wins).
    PutJobs(Vec<Arc<JobRecord>>),
    /// Batch completions to record.
    PutCompletions(Vec<Completion>),
    /// Anti-entropy, first step: fingerprints of the caller's jobs and
    /// completions.
    SyncHash {
        /// Fingerprint of every (name, version).
        jobs: u64,
        /// Fingerprint of every completed (job, slot).
        completions: u64,
        /// Answer with `InSyncAt`/`DiffersAt`, which carry the answering
        /// node's clock (absent in a call from an older release, which
        /// knows only `InSync`/`Differs`; an older node ignores it).
        #[serde(default)]
        clock: bool,
    },
    /// Anti-entropy: one page of the caller's job digest, the names in
    /// `(after, until]` in order (`until` = `None`: to the end).
    SyncJobs {
        /// Exclusive lower bound of the page.
        after: Option<String>,
        /// Inclusive upper bound (the page's last name), or the end.
        until: Option<String>,
        /// Every name and version the caller holds in the range.
        digest: Vec<(String, Version)>,
    },
    /// Anti-entropy: one page of the caller's completions, the slots in
    /// `(after, until]` in order.
    SyncCompletions {
        /// Exclusive lower bound of the page.
        after: Option<(String, u32)>,
        /// Inclusive upper bound, or the end.
        until: Option<(String, u32)>,
        /// Every completed slot the caller holds in the range.
        digest: Vec<(String, u32)>,
    },
    /// A coordinator asks a candidate for its fresh load.
    Bid,
    /// A coordinator tells the winner to start slots of a job.
    Start {
        /// The job (so the winner need not have it yet).
        job: Arc<JobRecord>,
        /// Slot indices.
        slots: Vec<u32>,
        /// The coordinator's wall clock when it sent this (ms since the
        /// epoch): a start that arrives too late is refused, because by
        /// then the coordinator may have placed the slot elsewhere.
        #[serde(default)]
        sent_ms: u64,
    },
    /// A node about to join asks whether its name is free: it is not while
    /// a live member of that name has another IP address (two machines
    /// given one name, by mistake: names default to the host name).
    Claim {
        /// The joining node's name.
        name: String,
        /// The address it advertises.
        address: std::net::SocketAddr,
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
        /// Where to start in the holder's log, in the offsets of its
        /// `LogChunk` answers (`None`: the start of the last `max_bytes`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<u64>,
        /// Answer with one [`Response::LogChunk`] of at most
        /// [`LOG_CHUNK_MAX`] bytes; the caller asks again for the rest.
        /// Unset by nodes of earlier releases, which take one `Logs`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chunked: bool,
    },
    /// The holder of a `partition = "never"` slot asks whether the peer
    /// holds its claim (the claim record `name` at `version`, durable):
    /// it starts the slot only once more than half of the members do.
    HoldsClaim {
        /// The claim record's name.
        name: String,
        /// Its version.
        version: Version,
    },
}

/// Largest log chunk one answer carries. JSON spends at most four bytes
/// per byte (`255,`), so a chunk's answer stays near 1 MiB, far below the
/// 4 MiB frame limit, however large the fetch.
pub const LOG_CHUNK_MAX: u64 = 256 * 1024;

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// Anti-entropy: fingerprints match.
    InSync,
    /// Anti-entropy: send the digest pages.
    Differs,
    /// `InSync`, with the answering node's wall clock (ms since the epoch):
    /// the caller measures its offset on the round trip. Sent only to a
    /// caller that asked (`SyncHash::clock`), so releases mix.
    InSyncAt {
        /// The answering node's wall clock.
        wall_ms: u64,
    },
    /// `Differs`, with the answering node's wall clock.
    DiffersAt {
        /// The answering node's wall clock.
        wall_ms: u64,
    },
    /// Anti-entropy: the answer to one page of the job digest.
    SyncedJobs {
        /// Records in the page's range newer than the caller's (at most a
        /// page of them; `more` says whether the range holds more).
        newer: Vec<Arc<JobRecord>>,
        /// Names in the range whose record the caller has newer (it sends
        /// them back).
        want: Vec<String>,
        /// The range holds more newer records than this answer carries:
        /// ask for the same page again.
        more: bool,
    },
    /// Anti-entropy: the completions in the page's range the caller lacks.
    SyncedCompletions {
        /// At most a page of them.
        missing: Vec<Completion>,
        /// The range holds more: ask for the same page again.
        more: bool,
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
    /// Part of an instance's output: `bytes` from offset `start` of a log
    /// of `end` bytes (offsets stay valid while the log grows).
    LogChunk {
        /// Offset of the first byte.
        start: u64,
        /// The log's length when read.
        end: u64,
        /// At most [`LOG_CHUNK_MAX`] bytes.
        bytes: Vec<u8>,
    },
    /// The answer to a [`Request::Claim`] whose name is free.
    Claimed {
        /// The answering node completed an anti-entropy exchange within
        /// `job_gc_after`: a node away for longer refills its store from
        /// the cluster instead of handing back jobs the others have
        /// collected since.
        in_touch: bool,
    },
    /// The answer to [`Request::HoldsClaim`].
    HoldsClaim {
        /// The peer's record of that name is at that version.
        holds: bool,
    },
    /// The call failed.
    Error(String),
}

impl Request {
    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes from the wire; a body over [`BODY_LEN_MAX`] or that does
    /// not parse is refused.
    pub fn decode(body: &[u8]) -> Result<Request, String> {
        if body.len() > BODY_LEN_MAX {
            return Err(format!("request of {} bytes refused", body.len()));
        }
        serde_json::from_slice(body).map_err(|e| format!("undecodable request: {e}"))
    }
}

impl Response {
    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes from the wire.
    pub fn decode(body: &[u8]) -> Result<Response, String> {
        if body.len() > BODY_LEN_MAX {
            return Err(format!("response of {} bytes refused", body.len()));
        }
        serde_json::from_slice(body).map_err(|e| format!("undecodable response: {e}"))
    }
}

/// How the error answer to a [`Request::Claim`] begins when the name is
/// taken.
pub const NAME_TAKEN: &str = "name taken:";

/// How an error answer to a push begins when the receiver refused a record
/// for a version too far ahead of its clock (the writer then knows its
/// write will lose, and says so to its client).
pub const CLOCK_REFUSAL: &str = "refused for its clock:";

/// Fingerprint of a set of items (order-independent).
pub fn fingerprint<T: Serialize>(items: impl Iterator<Item = T>) -> u64 {
    items.fold(0u64, |acc, i| acc.wrapping_add(fingerprint_item(&i)))
}

/// One item's share of [`fingerprint`]: a set's fingerprint is the
/// wrapping sum of its items', so it can be kept up to date item by item
/// (subtract the old, add the new).
pub fn fingerprint_item<T: Serialize>(item: &T) -> u64 {
    crate::job::fnv1a(&serde_json::to_vec(item).unwrap_or_default())
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
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }
    }

    /// Releases mix: a caller from before clock offsets sends no `clock`
    /// and gets the plain answers it knows; its plain answers decode here.
    #[test]
    fn anti_entropy_answers_stay_readable_across_releases() {
        let old_call = br#"{"SyncHash":{"jobs":1,"completions":2}}"#;
        assert!(matches!(
            Request::decode(old_call),
            Ok(Request::SyncHash { clock: false, .. })
        ));
        assert!(matches!(
            Response::decode(br#""InSync""#),
            Ok(Response::InSync)
        ));
        assert!(matches!(
            Response::decode(br#""Differs""#),
            Ok(Response::Differs)
        ));
        let new_call = Request::SyncHash {
            jobs: 1,
            completions: 2,
            clock: true,
        }
        .encode();
        // An older node ignores the field it does not know.
        let as_old: serde_json::Value = serde_json::from_slice(&new_call).unwrap();
        assert_eq!(as_old["SyncHash"]["jobs"], 1);
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
