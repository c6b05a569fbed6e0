//! How a node publishes its instances in gossip: a bounded number of keys
//! per node, whatever the number of jobs.
//!
//! Every job hashes to one of [`BUCKETS`] buckets; a bucket's instances are
//! one gossip value (`i/<bucket>/0`), split into further parts
//! (`i/<bucket>/1`, …) only where it would exceed [`PART_BYTES`]. A change to
//! one job re-encodes (and makes every peer re-parse) its bucket alone, about
//! 1/64 of the node's instances, instead of every key the node holds; and the
//! number of keys a peer scans per change stays near 64 per node rather than
//! growing with the number of jobs.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::job::fnv1a;
use crate::reconcile::Published;

/// Buckets of instance keys per node.
pub const BUCKETS: u64 = 64;

/// Largest encoded part, bytes (one chitchat value must fit one gossip
/// message; membership refuses values over 48 KiB).
pub const PART_BYTES: usize = 32 * 1024;

/// Prefix of every instance key.
pub const PREFIX: &str = "i/";

/// The bucket of a job.
pub fn bucket_of(job: &str) -> u64 {
    fnv1a(job.as_bytes()) % BUCKETS
}

/// Encodes one bucket's instances (by job, each job's in slot order) as
/// parts of at most [`PART_BYTES`] each (a part holds at least one instance,
/// so a part is never empty). Returned as (key, value).
pub fn encode_bucket(
    bucket: u64,
    jobs: &BTreeMap<String, Vec<Published>>,
) -> Vec<(String, String)> {
    let mut parts: Vec<BTreeMap<&str, Vec<&Published>>> = Vec::new();
    let mut current: BTreeMap<&str, Vec<&Published>> = BTreeMap::new();
    let mut size = 2;
    for (job, copies) in jobs {
        // `"job":[` … `],` around the entries.
        let job_cost = job.len() + 6;
        for copy in copies {
            let entry = serde_json::to_string(copy).expect("encodes").len() + 1;
            let cost = |current: &BTreeMap<&str, Vec<&Published>>| {
                entry
                    + if current.contains_key(job.as_str()) {
                        0
                    } else {
                        job_cost
                    }
            };
            if size + cost(&current) > PART_BYTES && !current.is_empty() {
                parts.push(std::mem::take(&mut current));
                size = 2;
            }
            size += cost(&current);
            current.entry(job.as_str()).or_default().push(copy);
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            (
                format!("{PREFIX}{bucket}/{i}"),
                serde_json::to_string(&part).expect("encodes"),
            )
        })
        .collect()
}

/// Decodes one published part: (job, instance) pairs. A value that does not
/// parse (another release, corruption) yields nothing rather than an error:
/// the publisher's next change replaces it.
pub fn decode_part(value: &str) -> Vec<(Arc<str>, Published)> {
    let Ok(jobs) = serde_json::from_str::<BTreeMap<String, Vec<Published>>>(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (job, copies) in jobs {
        let job: Arc<str> = Arc::from(job);
        out.extend(copies.into_iter().map(|c| (job.clone(), c)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::SlotState;

    fn copies(n: u32) -> Vec<Published> {
        (0..n)
            .map(|slot| Published {
                slot,
                run: 1_000_000_000_000 + u64::from(slot),
                state: SlotState::Running,
                task: 0xdead_beef_dead_beef,
                restarts: 0,
                error: None,
            })
            .collect()
    }

    #[test]
    fn a_bucket_round_trips_through_its_parts() {
        let mut jobs = BTreeMap::new();
        jobs.insert("web".to_string(), copies(3));
        jobs.insert("batch".to_string(), copies(2));
        let parts = encode_bucket(7, &jobs);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0, "i/7/0");
        let back = decode_part(&parts[0].1);
        assert_eq!(back.len(), 5);
        assert!(back
            .iter()
            .filter(|(j, _)| &**j == "web")
            .map(|(_, c)| c)
            .eq(jobs["web"].iter()));
    }

    #[test]
    fn a_large_bucket_splits_into_parts_under_the_bound() {
        let mut jobs = BTreeMap::new();
        jobs.insert("big".to_string(), copies(5_000));
        jobs.insert("small".to_string(), copies(1));
        let parts = encode_bucket(3, &jobs);
        assert!(parts.len() > 1, "5,000 instances need several parts");
        let mut all = Vec::new();
        for (i, (key, value)) in parts.iter().enumerate() {
            assert_eq!(key, &format!("i/3/{i}"));
            assert!(
                value.len() <= PART_BYTES,
                "part {i} is {} bytes",
                value.len()
            );
            all.extend(decode_part(value));
        }
        assert_eq!(all.len(), 5_001);
        let big: Vec<_> = all
            .iter()
            .filter(|(j, _)| &**j == "big")
            .map(|(_, c)| c.clone())
            .collect();
        assert_eq!(big, jobs["big"]);
    }

    #[test]
    fn garbage_decodes_to_nothing() {
        assert!(decode_part("not json").is_empty());
        assert!(decode_part("[1,2]").is_empty());
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("web"), bucket_of("web"));
        let used: std::collections::BTreeSet<u64> =
            (0..1000).map(|i| bucket_of(&format!("job-{i}"))).collect();
        assert!(
            used.len() > 60,
            "1,000 jobs use {} of 64 buckets",
            used.len()
        );
    }
}
