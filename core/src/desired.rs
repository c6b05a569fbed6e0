//! [`DesiredState`]: this node's copy of every job record and batch
//! completion, with the fingerprints anti-entropy compares and the index
//! the coordinators' ring reads. It holds only what is durable on this
//! node's disk: records are applied after the store has them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::hlc::Version;
use crate::job::JobSpec;
use crate::records::{Completion, JobRecord};
use crate::view::job_point;
use crate::wire::{fingerprint, fingerprint_item};

/// Largest anti-entropy answer, bytes: half a 4 MiB frame, with room for
/// the encoding's overhead.
pub const ANSWER_BYTES_MAX: usize = 2 * 1024 * 1024;

/// A batch slot: (job, slot).
pub type SlotKey = (String, u32);

/// Every job record and completion this node holds.
#[derive(Debug, Clone)]
pub struct DesiredState {
    jobs: BTreeMap<String, Arc<JobRecord>>,
    /// Live jobs by ring point (the coordinators' ring maps arcs of points
    /// to members, so a member finds the jobs it coordinates by range).
    by_point: BTreeSet<(u64, String)>,
    /// Task fingerprint of each live job (computed once per record).
    task_fps: BTreeMap<String, u64>,
    /// Live cron jobs, and live runs of cron jobs (what every timer tick
    /// looks at, kept here so that it scans no other record).
    cron_jobs: BTreeSet<String>,
    cron_runs: BTreeSet<String>,
    /// Node settings (`shoal node drain|ineligible`) by node name.
    nodes: BTreeMap<String, crate::records::NodeSetting>,
    /// Slot claims of `partition = "never"` jobs: job, then slot, to the
    /// holder and the claim's version.
    claims: BTreeMap<String, BTreeMap<u32, (String, Version)>>,
    /// Fingerprint of every (name, version), kept item by item.
    jobs_fp: u64,
    /// Completions by job, then slot (nested so that lookups borrow the
    /// job name instead of allocating a key).
    completions: BTreeMap<String, BTreeMap<u32, Completion>>,
    completed_fp: u64,
}

impl Default for DesiredState {
    fn default() -> Self {
        DesiredState {
            jobs: BTreeMap::new(),
            by_point: BTreeSet::new(),
            task_fps: BTreeMap::new(),
            cron_jobs: BTreeSet::new(),
            cron_runs: BTreeSet::new(),
            nodes: BTreeMap::new(),
            claims: BTreeMap::new(),
            jobs_fp: fingerprint(std::iter::empty::<()>()),
            completions: BTreeMap::new(),
            completed_fp: fingerprint(std::iter::empty::<()>()),
        }
    }
}

impl DesiredState {
    /// The state held on disk: records and completions.
    pub fn from_stored(
        jobs: impl IntoIterator<Item = JobRecord>,
        completions: impl IntoIterator<Item = Completion>,
    ) -> DesiredState {
        let mut d = DesiredState::default();
        for r in jobs {
            d.apply(Arc::new(r));
        }
        for c in completions {
            d.complete(c);
        }
        d
    }

    /// Takes a record if it is newer than the one held (last writer wins);
    /// returns whether it was taken.
    pub fn apply(&mut self, record: Arc<JobRecord>) -> bool {
        if let Some(old) = self.jobs.get(&record.name) {
            if old.version >= record.version {
                return false;
            }
            self.jobs_fp = self
                .jobs_fp
                .wrapping_sub(fingerprint_item(&(&old.name, &old.version)));
            self.by_point
                .remove(&(job_point(&old.name), old.name.clone()));
        }
        self.jobs_fp = self
            .jobs_fp
            .wrapping_add(fingerprint_item(&(&record.name, &record.version)));
        self.cron_jobs.remove(&record.name);
        self.cron_runs.remove(&record.name);
        if let Some(node) = crate::records::node_of_record(&record.name) {
            match &record.node {
                Some(setting) => self.nodes.insert(node.to_string(), setting.clone()),
                None => self.nodes.remove(node),
            };
        }
        if let Some((job, slot)) = crate::records::claim_of_record(&record.name) {
            match &record.claim {
                Some(c) => {
                    self.claims
                        .entry(job.to_string())
                        .or_default()
                        .insert(slot, (c.node.clone(), record.version.clone()));
                }
                None => {
                    if let Some(slots) = self.claims.get_mut(job) {
                        slots.remove(&slot);
                        if slots.is_empty() {
                            self.claims.remove(job);
                        }
                    }
                }
            }
        }
        match &record.spec {
            Some(s) => {
                if s.job_type == crate::job::JobType::Cron {
                    self.cron_jobs.insert(record.name.clone());
                } else if s.parent.is_some() {
                    self.cron_runs.insert(record.name.clone());
                }
                self.task_fps
                    .insert(record.name.clone(), s.task.fingerprint());
                self.by_point
                    .insert((job_point(&record.name), record.name.clone()));
            }
            None => {
                self.task_fps.remove(&record.name);
            }
        }
        self.jobs.insert(record.name.clone(), record);
        true
    }

    /// Whether `record` would be taken (it is newer than the one held).
    pub fn is_newer(&self, record: &JobRecord) -> bool {
        self.jobs
            .get(&record.name)
            .is_none_or(|old| old.version < record.version)
    }

    /// Tombstones (stopped jobs' records) whose version is older than
    /// `horizon_ms`, at most `max` of them.
    pub fn tombstones_before(&self, horizon_ms: u64, max: usize) -> Vec<(String, Version)> {
        self.jobs
            .values()
            .filter(|r| r.is_tombstone() && r.version.hlc.wall_ms < horizon_ms)
            .take(max)
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    }

    /// Jobs with completions but no record whose completions are all of a
    /// version older than `horizon_ms` (left by a collected job), at most
    /// `max`.
    pub fn orphan_completions_before(&self, horizon_ms: u64, max: usize) -> Vec<String> {
        self.completions
            .iter()
            .filter(|(job, slots)| {
                !self.jobs.contains_key(*job)
                    && slots
                        .values()
                        .all(|c| c.job_version.hlc.wall_ms < horizon_ms)
            })
            .take(max)
            .map(|(job, _)| job.clone())
            .collect()
    }

    /// Forgets a job: its record if it is still the tombstone of `version`
    /// (a newer write keeps it), and its completions. Returns whether the
    /// record went.
    pub fn forget(&mut self, name: &str, version: Option<&Version>) -> bool {
        let gone = match (self.jobs.get(name), version) {
            (Some(r), Some(v)) if r.is_tombstone() && r.version == *v => {
                self.jobs_fp = self
                    .jobs_fp
                    .wrapping_sub(fingerprint_item(&(&r.name, &r.version)));
                self.jobs.remove(name);
                true
            }
            _ => false,
        };
        if gone || !self.jobs.contains_key(name) {
            if let Some(slots) = self.completions.remove(name) {
                for slot in slots.keys() {
                    self.completed_fp = self
                        .completed_fp
                        .wrapping_sub(fingerprint_item(&(name.to_string(), *slot)));
                }
            }
        }
        gone
    }

    /// Records a completion; returns whether it was new.
    pub fn complete(&mut self, c: Completion) -> bool {
        let key = (c.job.clone(), c.slot);
        let slots = self.completions.entry(c.job.clone()).or_default();
        if slots.contains_key(&c.slot) {
            return false;
        }
        self.completed_fp = self.completed_fp.wrapping_add(fingerprint_item(&key));
        slots.insert(c.slot, c);
        true
    }

    /// A job's record (tombstones included).
    pub fn get(&self, name: &str) -> Option<&Arc<JobRecord>> {
        self.jobs.get(name)
    }

    /// A live job's spec.
    pub fn spec(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.get(name).and_then(|r| r.spec.as_ref())
    }

    /// A live job's task fingerprint.
    pub fn task_fp(&self, name: &str) -> Option<u64> {
        self.task_fps.get(name).copied()
    }

    /// Whether a batch slot completed.
    pub fn is_completed(&self, job: &str, slot: u32) -> bool {
        self.completions
            .get(job)
            .is_some_and(|s| s.contains_key(&slot))
    }

    /// Completed slots of one job.
    pub fn completed_of<'a>(&'a self, job: &str) -> impl Iterator<Item = u32> + 'a {
        self.completions
            .get(job)
            .into_iter()
            .flat_map(|s| s.keys().copied())
    }

    /// Live cron jobs, by name.
    pub fn cron_jobs(&self) -> &BTreeSet<String> {
        &self.cron_jobs
    }

    /// Live runs of cron jobs, by name.
    pub fn cron_runs(&self) -> &BTreeSet<String> {
        &self.cron_runs
    }

    /// The runs of cron job `parent` (records named `parent@<t>`,
    /// tombstones included), oldest first.
    pub fn children_of(&self, parent: &str) -> Vec<(i64, &Arc<JobRecord>)> {
        // '@' is followed by digits only, all below 'A'.
        let lo = format!("{parent}@");
        let hi = format!("{parent}A");
        let mut v: Vec<(i64, &Arc<JobRecord>)> = self
            .jobs
            .range(lo..hi)
            .filter_map(|(n, r)| {
                let (p, t) = crate::cron::parse_child(n)?;
                (p == parent).then_some((t, r))
            })
            .collect();
        v.sort_by_key(|(t, _)| *t);
        v
    }

    /// What an operator set on node `node` (`None`: eligible, no drain).
    pub fn node_setting(&self, node: &str) -> Option<&crate::records::NodeSetting> {
        self.nodes.get(node)
    }

    /// The holder of slot `slot` of `job` (a `partition = "never"` job)
    /// and its claim's version, if a claim names one, forgotten or not.
    pub fn claim(&self, job: &str, slot: u32) -> Option<(&str, &Version)> {
        self.claims
            .get(job)
            .and_then(|s| s.get(&slot))
            .map(|(n, v)| (n.as_str(), v))
    }

    /// The holder of slot `slot` of `job`, if its claim holds: the
    /// holder was not forgotten after the claim was written.
    pub fn holder(&self, job: &str, slot: u32) -> Option<&str> {
        self.claim(job, slot)
            .filter(|(n, v)| !self.forgotten_since(n, v))
            .map(|(n, _)| n)
    }

    /// Whether `node` was forgotten (`shoal node forget`) after `version`.
    pub fn forgotten_since(&self, node: &str, version: &Version) -> bool {
        self.nodes
            .get(node)
            .and_then(|s| s.forgotten.as_ref())
            .is_some_and(|f| f > version)
    }

    /// Every claim: job, slot, holder, version.
    pub fn claims(&self) -> impl Iterator<Item = (&str, u32, &str, &Version)> {
        self.claims.iter().flat_map(|(job, slots)| {
            slots
                .iter()
                .map(move |(slot, (n, v))| (job.as_str(), *slot, n.as_str(), v))
        })
    }

    /// The claims of one job: slot, holder, version.
    pub fn claims_of(&self, job: &str) -> impl Iterator<Item = (u32, &str, &Version)> {
        self.claims
            .get(job)
            .into_iter()
            .flat_map(|s| s.iter().map(|(slot, (n, v))| (*slot, n.as_str(), v)))
    }

    /// Every node setting, by node name.
    pub fn node_settings(&self) -> &BTreeMap<String, crate::records::NodeSetting> {
        &self.nodes
    }

    /// Every record, by name.
    pub fn records(&self) -> impl Iterator<Item = &Arc<JobRecord>> {
        self.jobs.values()
    }

    /// Number of records (tombstones included).
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Every completion.
    pub fn completions(&self) -> impl Iterator<Item = &Completion> {
        self.completions.values().flat_map(|s| s.values())
    }

    /// Completions from `(after, ..)` in (job, slot) order.
    fn completions_after<'a>(
        &'a self,
        after: Option<&'a (String, u32)>,
    ) -> impl Iterator<Item = &'a Completion> + 'a {
        let lo = match after {
            Some((j, _)) => std::ops::Bound::Included(j.as_str()),
            None => std::ops::Bound::Unbounded,
        };
        self.completions
            .range::<str, _>((lo, std::ops::Bound::Unbounded))
            .flat_map(|(_, s)| s.values())
            .filter(move |c| after.is_none_or(|(j, s)| (c.job.as_str(), c.slot) > (j.as_str(), *s)))
    }

    /// Live jobs whose ring point falls in `[lo, hi]`.
    pub fn live_in_arc(&self, lo: u64, hi: u64) -> impl Iterator<Item = &str> {
        self.by_point
            .range((lo, String::new())..)
            .take_while(move |(p, _)| *p <= hi)
            .map(|(_, n)| n.as_str())
    }

    /// Fingerprints of (jobs, completions), compared by anti-entropy.
    pub fn fingerprints(&self) -> (u64, u64) {
        (self.jobs_fp, self.completed_fp)
    }

    /// One page of the job digest: up to `max` names after `after`, with
    /// the page's upper bound (`None` when it reaches the end).
    pub fn digest_page(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<(String, Version)>, Option<String>) {
        let iter: Box<dyn Iterator<Item = (&String, &Arc<JobRecord>)>> = match after {
            Some(a) => Box::new(
                self.jobs
                    .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(self.jobs.iter()),
        };
        let mut page = Vec::new();
        let mut iter = iter.peekable();
        while page.len() < max {
            match iter.next() {
                Some((n, r)) => page.push((n.clone(), r.version.clone())),
                None => return (page, None),
            }
        }
        let until = if iter.peek().is_some() {
            page.last().map(|(n, _)| n.clone())
        } else {
            None
        };
        (page, until)
    }

    /// Answers a peer's digest page over `(after, until]`: the records this
    /// node has newer (at most `max`, and whether there were more) and the
    /// names the peer has newer.
    pub fn compare_page(
        &self,
        after: Option<&str>,
        until: Option<&str>,
        digest: &[(String, Version)],
        max: usize,
    ) -> (Vec<Arc<JobRecord>>, Vec<String>, bool) {
        if let (Some(a), Some(u)) = (after, until) {
            if a >= u {
                // An empty or inverted range (a peer's garbage): nothing.
                return (Vec::new(), Vec::new(), false);
            }
        }
        let theirs: BTreeMap<&str, &Version> =
            digest.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let lo = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let hi = match until {
            Some(u) => std::ops::Bound::Included(u),
            None => std::ops::Bound::Unbounded,
        };
        let mut newer = Vec::new();
        let mut more = false;
        let mut bytes = 0usize;
        for (name, r) in self.jobs.range::<str, _>((lo, hi)) {
            if theirs.get(name.as_str()).is_none_or(|v| **v < r.version) {
                // Bounded by count and by bytes: a record can be a 1 MiB job
                // file, and the answer is one frame of at most 4 MiB.
                let size = serde_json::to_vec(&**r).map(|b| b.len()).unwrap_or(0);
                if newer.len() >= max || (!newer.is_empty() && bytes + size > ANSWER_BYTES_MAX) {
                    more = true;
                    break;
                }
                bytes += size;
                newer.push(r.clone());
            }
        }
        let want = theirs
            .iter()
            .filter(|(n, v)| self.jobs.get(**n).is_none_or(|r| r.version < ***v))
            .map(|(n, _)| n.to_string())
            .collect();
        (newer, want, more)
    }

    /// One page of the completions digest.
    pub fn completions_page(
        &self,
        after: Option<&(String, u32)>,
        max: usize,
    ) -> (Vec<SlotKey>, Option<SlotKey>) {
        let mut iter = self
            .completions_after(after)
            .map(|c| (c.job.clone(), c.slot))
            .peekable();
        let mut page = Vec::new();
        while page.len() < max {
            match iter.next() {
                Some(k) => page.push(k),
                None => return (page, None),
            }
        }
        let until = if iter.peek().is_some() {
            page.last().cloned()
        } else {
            None
        };
        (page, until)
    }

    /// Completions in `(after, until]` the peer's digest lacks (at most
    /// `max`, and whether there were more).
    pub fn missing_completions(
        &self,
        after: Option<&(String, u32)>,
        until: Option<&(String, u32)>,
        digest: &[(String, u32)],
        max: usize,
    ) -> (Vec<Completion>, bool) {
        if let (Some(a), Some(u)) = (after, until) {
            if a >= u {
                return (Vec::new(), false);
            }
        }
        let theirs: BTreeSet<(&str, u32)> = digest.iter().map(|(j, s)| (j.as_str(), *s)).collect();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for c in self.completions_after(after) {
            let k = (c.job.as_str(), c.slot);
            if until.is_some_and(|(j, s)| k > (j.as_str(), *s)) {
                break;
            }
            if !theirs.contains(&k) {
                // A completion is at most ~400 bytes encoded (names of 63
                // and 128 characters): bounded by bytes too.
                let size = c.job.len() + c.node.len() + c.job_version.node.len() + 120;
                if out.len() >= max || bytes + size > ANSWER_BYTES_MAX {
                    return (out, true);
                }
                bytes += size;
                out.push(c.clone());
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn rec(name: &str, ms: u64, live: bool) -> Arc<JobRecord> {
        let spec = live.then(|| {
            JobSpec::parse(&format!(
                "name = \"{name}\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\n"
            ))
            .unwrap()
        });
        Arc::new(JobRecord {
            name: name.into(),
            version: Version {
                hlc: Hlc {
                    wall_ms: ms,
                    logical: 0,
                },
                node: "n".into(),
            },
            spec,
            seq: 1,
            history: Vec::new(),
            reverted_from: None,
            promoted: false,
            deployment: None,
            node: None,
            claim: None,
        })
    }

    #[test]
    fn last_writer_wins_and_fingerprints_follow() {
        let mut a = DesiredState::default();
        let mut b = DesiredState::default();
        assert!(a.apply(rec("web", 2, true)));
        assert!(!a.apply(rec("web", 1, true)), "an older write loses");
        assert!(a.apply(rec("web", 3, false)), "a stop is newer");
        b.apply(rec("web", 3, false));
        assert_eq!(a.fingerprints(), b.fingerprints());
        assert!(a.spec("web").is_none());
        assert_eq!(a.live_in_arc(0, u64::MAX).count(), 0);
    }

    #[test]
    fn paged_digests_cover_everything_once() {
        let mut a = DesiredState::default();
        for i in 0..25 {
            a.apply(rec(&format!("j{i:02}"), 1, true));
        }
        let mut b = DesiredState::default();
        for i in (0..25).step_by(2) {
            b.apply(rec(&format!("j{i:02}"), 2, true));
        }
        // b pages its digest to a; a answers each page.
        let mut after: Option<String> = None;
        let mut got = Vec::new();
        let mut wanted = Vec::new();
        loop {
            let (digest, until) = b.digest_page(after.as_deref(), 4);
            let (newer, want, more) =
                a.compare_page(after.as_deref(), until.as_deref(), &digest, 100);
            assert!(!more);
            got.extend(newer.iter().map(|r| r.name.clone()));
            wanted.extend(want);
            match until {
                Some(u) => after = Some(u),
                None => break,
            }
        }
        let odd: Vec<String> = (1..25).step_by(2).map(|i| format!("j{i:02}")).collect();
        let even: Vec<String> = (0..25).step_by(2).map(|i| format!("j{i:02}")).collect();
        assert_eq!(got, odd, "a sends what b lacks");
        assert_eq!(wanted, even, "a wants what b has newer");
    }
}
