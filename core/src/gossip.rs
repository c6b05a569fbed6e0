//! What a node publishes in gossip besides its record and load: its
//! instances (`i/…`) and, as the coordinator of jobs, why slots of them
//! cannot be placed (`u/…`). Both use a bounded number of keys per node,
//! whatever the number of jobs.
//!
//! Every job hashes to one of [`BUCKETS`] buckets; a bucket's entries are
//! one gossip value (`i/<bucket>/0`), split into further parts
//! (`i/<bucket>/1`, …) only where it would exceed [`PART_BYTES`]. A change to
//! one job re-encodes (and makes every peer re-parse) its bucket alone, about
//! 1/64 of the node's entries, instead of every key the node holds; and the
//! number of keys a peer scans per change stays near 64 per node rather than
//! growing with the number of jobs.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::instance::Published;
use crate::job::fnv1a;

/// Buckets of keys per node and family.
pub const BUCKETS: u64 = 64;

/// Largest encoded part, bytes (one gossiped value must fit one gossip
/// message; membership refuses values over 48 KiB).
pub const PART_BYTES: usize = 32 * 1024;

/// Prefix of every instance key.
pub const PREFIX: &str = "i/";

/// Prefix of every key of unplaceable slots.
pub const UNPLACED_PREFIX: &str = "u/";

/// Key of the host ports a node's copies bind (a JSON array): placement
/// reads them to avoid a node whose port is taken before it asks.
pub const PORTS_KEY: &str = "ports";

/// Most host ports read from one node's published list.
pub const PORTS_MAX: usize = 65_536;

/// Longest reason published for an unplaceable slot, bytes.
pub const REASON_LEN_MAX: usize = 512;

/// `text` cut to [`REASON_LEN_MAX`] bytes (at a character boundary): what
/// travels in gossip about one slot stays small whatever a driver said.
pub fn bounded(text: String) -> String {
    bounded_to(text, REASON_LEN_MAX)
}

/// `text` cut to `max` bytes (at a character boundary).
pub fn bounded_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The bucket of a job.
pub fn bucket_of(job: &str) -> u64 {
    fnv1a(job.as_bytes()) % BUCKETS
}

/// Slots of one job that its coordinator cannot place, with the reason,
/// as inclusive ranges of slot numbers (a job's pending slots are usually
/// a few runs, so this stays small however many replicas it has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// Why (the placement's explanation, or the winner's refusal).
    #[serde(rename = "w")]
    pub reason: String,
    /// Slots, as inclusive ranges.
    #[serde(rename = "s")]
    pub slots: Vec<(u32, u32)>,
    /// Attempts so far (the most of these slots): a slot tried again and
    /// again shows it, and that it backs off.
    #[serde(rename = "a", default)]
    pub attempts: u32,
}

impl Unplaced {
    /// Whether `slot` is one of these.
    pub fn holds(&self, slot: u32) -> bool {
        self.slots.iter().any(|(a, b)| *a <= slot && slot <= *b)
    }
}

/// Sorted slot numbers as inclusive ranges.
pub fn ranges(slots: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for s in slots {
        match out.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(s) => *end = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// Encodes one bucket's entries (by job, each job's in order) as parts of
/// at most [`PART_BYTES`] each under `prefix` (a part holds at least one
/// entry, so a part is never empty). Returned as (key, value).
pub fn encode_bucket<T: Serialize>(
    prefix: &str,
    bucket: u64,
    jobs: &BTreeMap<String, Vec<T>>,
) -> Vec<(String, String)> {
    let mut parts: Vec<BTreeMap<&str, Vec<&T>>> = Vec::new();
    let mut current: BTreeMap<&str, Vec<&T>> = BTreeMap::new();
    let mut size = 2;
    for (job, entries) in jobs {
        // `"job":[` … `],` around the entries.
        let job_cost = job.len() + 6;
        for entry in entries {
            let entry_len = serde_json::to_string(entry).map(|s| s.len()).unwrap_or(0) + 1;
            let cost = |current: &BTreeMap<&str, Vec<&T>>| {
                entry_len
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
            current.entry(job.as_str()).or_default().push(entry);
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
        .into_iter()
        .enumerate()
        .filter_map(|(i, part)| {
            Some((
                format!("{prefix}{bucket}/{i}"),
                serde_json::to_string(&part).ok()?,
            ))
        })
        .collect()
}

/// Decodes one published part: (job, entry) pairs. A value that does not
/// parse (another release, corruption) yields nothing rather than an error:
/// the publisher's next change replaces it.
pub fn decode_part<T: DeserializeOwned>(value: &str) -> Vec<(Arc<str>, T)> {
    if value.len() > PART_BYTES * 2 {
        return Vec::new();
    }
    let Ok(jobs) = serde_json::from_str::<BTreeMap<String, Vec<T>>>(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (job, entries) in jobs {
        if !crate::job::valid_job_name(&job) {
            continue;
        }
        let job: Arc<str> = Arc::from(job);
        out.extend(entries.into_iter().map(|c| (job.clone(), c)));
    }
    out
}

/// Decodes a node's published host ports; garbage yields none.
pub fn decode_ports(value: &str) -> std::collections::BTreeSet<u16> {
    if value.len() > PORTS_MAX * 6 {
        return Default::default();
    }
    serde_json::from_str::<Vec<u16>>(value)
        .map(|v| v.into_iter().take(PORTS_MAX).collect())
        .unwrap_or_default()
}

/// The bucket a key of `prefix` belongs to (`i/17/2` -> 17).
pub fn bucket_of_key(prefix: &str, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    rest.split('/')
        .next()?
        .parse()
        .ok()
        .filter(|b| *b < BUCKETS)
}

/// Instances of a bucket, for publication.
pub type InstanceBucket = BTreeMap<String, Vec<Published>>;

/// A gossip key change to publish: the key, and its value or `None` to
/// delete it.
pub type KeyChange = (String, Option<String>);

/// One family of bucketed keys as a node publishes it (`i/` for its
/// instances, `u/` for the unplaceable slots it coordinates): what each
/// bucket held when last published, and the keys that carried it, so that a
/// new publication re-encodes only the buckets that changed.
#[derive(Debug)]
pub struct BucketPublisher<T> {
    prefix: &'static str,
    buckets: BTreeMap<u64, BTreeMap<String, Vec<T>>>,
    keys: BTreeMap<String, String>,
}

impl<T: Serialize + PartialEq> BucketPublisher<T> {
    /// A publisher of the keys under `prefix`.
    pub fn new(prefix: &'static str) -> BucketPublisher<T> {
        BucketPublisher {
            prefix,
            buckets: BTreeMap::new(),
            keys: BTreeMap::new(),
        }
    }

    /// The key changes that publish `entries` (job -> entries, every job):
    /// buckets whose entries changed are encoded again, a bucket that
    /// emptied loses its keys.
    pub fn publish(&mut self, entries: BTreeMap<String, Vec<T>>) -> Vec<KeyChange> {
        let mut buckets: BTreeMap<u64, BTreeMap<String, Vec<T>>> = BTreeMap::new();
        for (job, e) in entries {
            buckets.entry(bucket_of(&job)).or_default().insert(job, e);
        }
        let changed: std::collections::BTreeSet<u64> = buckets
            .iter()
            .filter(|(b, jobs)| self.buckets.get(b) != Some(jobs))
            .map(|(b, _)| *b)
            .chain(
                self.buckets
                    .keys()
                    .filter(|b| !buckets.contains_key(b))
                    .copied(),
            )
            .collect();
        let mut out = Vec::new();
        for bucket in changed {
            let parts = buckets
                .get(&bucket)
                .map(|jobs| encode_bucket(self.prefix, bucket, jobs))
                .unwrap_or_default();
            out.extend(diff_keys(
                &mut self.keys,
                &format!("{}{bucket}/", self.prefix),
                parts,
            ));
        }
        self.buckets = buckets;
        out
    }
}

/// The key changes that make the keys under `prefix` in `published` equal
/// `parts` (stale parts deleted, changed ones set); `published` follows.
fn diff_keys(
    published: &mut BTreeMap<String, String>,
    prefix: &str,
    parts: Vec<(String, String)>,
) -> Vec<KeyChange> {
    let mut out = Vec::new();
    let stale: Vec<String> = published
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, _)| k.clone())
        .filter(|k| !parts.iter().any(|(p, _)| p == k))
        .collect();
    for k in stale {
        published.remove(&k);
        out.push((k, None));
    }
    for (k, v) in parts {
        if published.get(&k) != Some(&v) {
            published.insert(k.clone(), v.clone());
            out.push((k, Some(v)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::SlotState;

    fn copies(n: u32) -> Vec<Published> {
        (0..n)
            .map(|slot| Published {
                health: Default::default(),
                check: None,
                checks_passing: 0,
                checks_critical: 0,
                stopping: false,
                ready: false,
                failed: false,
                version: 0,
                slot,
                run: 1_000_000_000_000 + u64::from(slot),
                state: SlotState::Running,
                task: 0xdead_beef_dead_beef,
                restarts: 0,
                error: None,
                ports: Default::default(),
            })
            .collect()
    }

    #[test]
    fn a_bucket_round_trips_through_its_parts() {
        let mut jobs = BTreeMap::new();
        jobs.insert("web".to_string(), copies(3));
        jobs.insert("batch".to_string(), copies(2));
        let parts = encode_bucket(PREFIX, 7, &jobs);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0, "i/7/0");
        assert_eq!(bucket_of_key(PREFIX, &parts[0].0), Some(7));
        let back: Vec<(Arc<str>, Published)> = decode_part(&parts[0].1);
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
        let parts = encode_bucket(PREFIX, 3, &jobs);
        assert!(parts.len() > 1, "5,000 instances need several parts");
        let mut all = Vec::new();
        for (i, (key, value)) in parts.iter().enumerate() {
            assert_eq!(key, &format!("i/3/{i}"));
            assert!(
                value.len() <= PART_BYTES,
                "part {i} is {} bytes",
                value.len()
            );
            all.extend(decode_part::<Published>(value));
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
        assert!(decode_part::<Published>("not json").is_empty());
        assert!(decode_part::<Published>("[1,2]").is_empty());
        assert!(decode_part::<Published>(r#"{"../../x":[]}"#).is_empty());
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

    #[test]
    fn slot_ranges_are_compact_and_exact() {
        let r = ranges([0, 1, 2, 5, 7, 8]);
        assert_eq!(r, vec![(0, 2), (5, 5), (7, 8)]);
        let u = Unplaced {
            reason: "x".into(),
            slots: r,
            attempts: 1,
        };
        assert!(u.holds(1) && u.holds(5) && u.holds(8));
        assert!(!u.holds(3) && !u.holds(6) && !u.holds(9));
        assert_eq!(
            ranges([u32::MAX - 1, u32::MAX]),
            vec![(u32::MAX - 1, u32::MAX)]
        );
    }
}
