//! The simulator's checker: shoal's invariants (../shared/PRODUCT.md) held
//! against the ground truth of what every simulated machine runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use shoal_core::hlc::Version;
use shoal_core::instance::InstanceSpec;
use shoal_core::job::{JobSpec, JobType};
use shoal_core::records::JobRecord;

/// A running instance, as the checker samples it.
#[derive(Debug, Clone)]
pub struct Running<'a> {
    /// Its node.
    pub node: usize,
    /// What it runs.
    pub spec: &'a InstanceSpec,
    /// The agent asked it to stop.
    pub stopping: bool,
}

/// The checker.
#[derive(Debug, Default)]
pub struct Checker {
    conflict_window: Duration,
    after_fault: Duration,
    verbose: bool,
    /// The violations, as they happened.
    pub violations: Vec<String>,
    /// The newest version the API accepted of each job, with its record.
    pub accepted: BTreeMap<String, Arc<JobRecord>>,
    /// Writes the API accepted.
    pub writes_accepted: u64,
    /// Writes it refused.
    pub writes_refused: u64,
    /// (start, end) of fault windows, end including the after-fault time;
    /// `true` for partitions.
    windows: Vec<(Duration, Duration, bool)>,
    open_fault: Option<(Duration, bool)>,
    /// When each batch slot's completion was first recorded (durable on
    /// a node: from then on the cluster can know it).
    completed_at: BTreeMap<(String, u32), Duration>,
    /// When each batch slot's run first exited with success (the holder
    /// may not have been able to tell anyone yet: its agent was down).
    exited_ok_at: BTreeMap<(String, u32), Duration>,
    /// Batch slots started again after a run had exited with success that
    /// no node had recorded yet (its holder's agent was down or cut off):
    /// the rerun could not be avoided without giving up on lost holders.
    pub batch_reruns_unreported: u64,
    /// Batch reruns outside partitions (violations) and inside.
    pub batch_reruns: u64,
    /// Batch reruns inside partition windows.
    pub batch_reruns_in_partitions: u64,
    /// Slot-seconds of duplicate service copies outside faults.
    pub duplicate_slot_seconds: f64,
    /// Slot-seconds of duplicates during faults.
    pub duplicate_slot_seconds_during_faults: f64,
    /// Longest duplicate episode outside faults.
    pub longest_duplicate_s: f64,
    dup_open: BTreeMap<(String, u32), Duration>,
    last_sample: Option<Duration>,
    /// The reconvergence time after each fault, seconds.
    pub reconverge_s: Vec<f64>,
    /// Spread placements beyond the skew outside faults.
    pub spread_violations: u64,
    /// Starts checked.
    pub starts: u64,
}

/// A completion recorded on a node reaches every node within this (the
/// push is immediate; anti-entropy repairs a missed push within a second
/// or two): a batch slot started later than this after its completion was
/// recorded anywhere is a rerun the cluster should have prevented.
pub const KNOWN_AFTER: Duration = Duration::from_secs(2);

fn said(v: &[String], prefix: &str) -> bool {
    v.iter().any(|x| x.starts_with(prefix))
}

impl Checker {
    /// A checker with these bounds.
    pub fn new(conflict_window: Duration, after_fault: Duration, verbose: bool) -> Checker {
        Checker {
            conflict_window,
            after_fault,
            verbose,
            ..Checker::default()
        }
    }

    /// Records a violation (once per distinct message prefix `key`).
    pub fn violate(&mut self, key: &str, message: String) {
        if said(&self.violations, key) {
            return;
        }
        if self.verbose {
            eprintln!("VIOLATION: {message}");
        }
        self.violations.push(message);
    }

    /// A fault begins.
    pub fn fault_began(&mut self, at: Duration, partition: bool) {
        self.open_fault = Some((at, partition));
        self.dup_open.clear();
    }

    /// The fault ended (healed).
    pub fn fault_ended(&mut self, at: Duration) {
        if let Some((start, partition)) = self.open_fault.take() {
            self.windows.push((start, at + self.after_fault, partition));
        }
    }

    fn in_fault(&self, at: Duration) -> bool {
        self.open_fault.is_some() || self.windows.iter().any(|(a, b, _)| at >= *a && at <= *b)
    }

    fn in_partition(&self, at: Duration) -> bool {
        self.open_fault.is_some_and(|(_, p)| p)
            || self
                .windows
                .iter()
                .any(|(a, b, p)| *p && at >= *a && at <= *b)
    }

    /// The API accepted a write.
    pub fn accepted(&mut self, record: Arc<JobRecord>) {
        self.writes_accepted += 1;
        let newer = self
            .accepted
            .get(&record.name)
            .is_none_or(|r| r.version < record.version);
        if newer {
            self.accepted.insert(record.name.clone(), record);
        }
    }

    /// An instance started on `node`: the rules a start must keep.
    #[allow(clippy::too_many_arguments)]
    pub fn started(
        &mut self,
        at: Duration,
        node: usize,
        node_name: &str,
        labels: &BTreeMap<String, String>,
        spec: &InstanceSpec,
        job: Option<&JobSpec>,
        running_here: &[Running],
    ) {
        self.starts += 1;
        let key = (spec.id.job.clone(), spec.id.slot);
        let is_batch = job.is_some_and(|j| j.job_type == JobType::Batch);
        let recorded = self.completed_at.get(&key).copied();
        // A run that exited with success which no node had recorded, or
        // recorded so recently that it could not have reached the node
        // that placed the slot (its holder's agent was down, or had just
        // restarted and knew no peer yet): the rerun was decided by nodes
        // that could not know.
        if is_batch
            && self.exited_ok_at.get(&key).is_some_and(|t| *t < at)
            && recorded.is_none_or(|r| at < r + KNOWN_AFTER)
        {
            self.batch_reruns_unreported += 1;
        }
        if let Some(done) = recorded.filter(|r| at >= *r + KNOWN_AFTER) {
            if is_batch {
                if self.in_partition(at) {
                    self.batch_reruns_in_partitions += 1;
                } else {
                    self.batch_reruns += 1;
                    let k = format!("batch rerun: {}.{}", key.0, key.1);
                    self.violate(
                        &k,
                        format!(
                            "{k} started again on {node_name} at {:.3}s after it completed at {:.3}s",
                            at.as_secs_f64(),
                            done.as_secs_f64()
                        ),
                    );
                }
            }
        }
        let Some(job) = job else { return };
        // Constraints: the node must satisfy the job's.
        let node_view = {
            let mut n = shoal_placement::Node::new(node_name.to_string(), 0, 0);
            n.labels = labels.clone();
            n
        };
        if let Some(c) = job
            .slot_request(spec.id.slot)
            .constraints
            .iter()
            .find(|c| !c.holds(&node_view))
        {
            let k = format!("constraint: {}", spec.id.job);
            self.violate(
                &k,
                format!(
                    "{k} slot {} started on {node_name}, which does not satisfy `{c}`",
                    spec.id.slot
                ),
            );
        }
        if job.distinct_hosts {
            let others = running_here
                .iter()
                .filter(|r| {
                    r.node == node
                        && r.spec.id.job == spec.id.job
                        && r.spec.id.slot != spec.id.slot
                        && !r.stopping
                })
                .count();
            if others > 0 {
                let k = format!("distinct_hosts: {}", spec.id.job);
                self.violate(
                    &k,
                    format!(
                        "{k}: slot {} started on {node_name}, which already runs {others} other slot(s) of it",
                        spec.id.slot
                    ),
                );
            }
        }
        let _ = node;
    }

    /// A start failed because a host port was taken: a placement broke the
    /// host-port rule.
    pub fn port_clash(&mut self, node_name: &str, spec: &InstanceSpec, why: &str) {
        let k = format!("host port: {}", spec.id.job);
        self.violate(
            &k,
            format!("{k} slot {} on {node_name}: {why}", spec.id.slot),
        );
    }

    /// A spread job's copy started where it raised the skew beyond the
    /// bound (counted outside faults only: concurrent coordinators with
    /// different views can do it).
    pub fn spread_exceeded(&mut self, at: Duration, message: String) {
        if !self.in_fault(at) {
            self.spread_violations += 1;
            self.violate("spread:", format!("spread: {message}"));
        }
    }

    /// The node that decided or runs a start already held the slot's
    /// completion: the rerun is a bug whatever the timing.
    pub fn rerun_known_locally(&mut self, node_name: &str, job: &str, slot: u32, role: &str) {
        self.batch_reruns += 1;
        let k = format!("batch rerun: {job}.{slot}");
        self.violate(
            &k,
            format!("{k}: {role} {node_name} held its completion and started it again"),
        );
    }

    /// A node recorded a batch slot's completion.
    pub fn completed(&mut self, at: Duration, job: &str, slot: u32) {
        self.completed_at
            .entry((job.to_string(), slot))
            .or_insert(at);
    }

    /// An instance exited with success.
    pub fn exited_ok(&mut self, at: Duration, job: &str, slot: u32) {
        self.exited_ok_at
            .entry((job.to_string(), slot))
            .or_insert(at);
    }

    /// Whether a batch slot ever completed.
    pub fn is_completed(&self, job: &str, slot: u32) -> bool {
        self.completed_at.contains_key(&(job.to_string(), slot))
    }

    /// One sample of what runs: duplicates of desired service slots.
    pub fn sample(&mut self, at: Duration, holders: &BTreeMap<(String, u32), Vec<usize>>) {
        let dt = self
            .last_sample
            .map(|t| at.saturating_sub(t))
            .unwrap_or_default()
            .min(Duration::from_secs(1))
            .as_secs_f64();
        self.last_sample = Some(at);
        let faulty = self.in_fault(at);
        let mut dup_now = BTreeSet::new();
        for ((job, slot), nodes) in holders {
            let Some(rec) = self.accepted.get(job) else {
                continue;
            };
            let Some(spec) = &rec.spec else { continue };
            if spec.job_type != JobType::Service || *slot >= spec.replicas || nodes.len() < 2 {
                continue;
            }
            dup_now.insert((job.clone(), *slot));
            if faulty {
                self.duplicate_slot_seconds_during_faults += dt;
            } else {
                self.duplicate_slot_seconds += dt;
            }
        }
        if !faulty {
            for key in &dup_now {
                let since = *self.dup_open.entry(key.clone()).or_insert(at);
                let len = at.saturating_sub(since);
                self.longest_duplicate_s = self.longest_duplicate_s.max(len.as_secs_f64());
                if len > self.conflict_window {
                    let k = format!("duplicate: {}.{}", key.0, key.1);
                    let window = self.conflict_window;
                    self.violate(
                        &k,
                        format!(
                            "{k} ran twice for {:.1}s outside faults (window {window:?}), until {:.3}s",
                            len.as_secs_f64(),
                            at.as_secs_f64()
                        ),
                    );
                }
            }
        }
        self.dup_open.retain(|k, _| dup_now.contains(k));
    }

    /// What is wrong with the cluster as it runs now, against the accepted
    /// desired state (empty: converged).
    /// `system`: per system job, the nodes that must run it (up, meeting
    /// its constraints, and not saying it does not fit them).
    pub fn mismatches(
        &self,
        running: &[Running],
        limit: usize,
        system: &BTreeMap<String, BTreeSet<usize>>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let mut by_slot: BTreeMap<(&str, u32), Vec<&Running>> = BTreeMap::new();
        for r in running {
            by_slot
                .entry((r.spec.id.job.as_str(), r.spec.id.slot))
                .or_default()
                .push(r);
        }
        for (name, rec) in &self.accepted {
            match &rec.spec {
                None => {
                    if by_slot.keys().any(|(j, _)| j == name) {
                        out.push(format!("{name}: stopped but still runs"));
                        if out.len() >= limit {
                            return out;
                        }
                    }
                }
                // A cron job has no slots; its runs are batch jobs whose
                // times `Sim::check_cron` checks.
                Some(spec) if spec.job_type == JobType::Cron => {}
                Some(spec) if spec.job_type == JobType::System => {
                    // Exactly one copy, of the current task, on every node
                    // that must run it, and none anywhere else.
                    let fp = spec.task.fingerprint();
                    let want = system.get(name).cloned().unwrap_or_default();
                    let mut per_node: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
                    for r in by_slot
                        .iter()
                        .filter(|((j, _), _)| j == name)
                        .flat_map(|(_, rs)| rs)
                    {
                        let e = per_node.entry(r.node).or_default();
                        e.0 += 1;
                        e.1 += usize::from(r.spec.task.fingerprint() == fp);
                    }
                    for n in &want {
                        let (all, current) = per_node.get(n).copied().unwrap_or_default();
                        if all != 1 || current != 1 {
                            out.push(format!(
                                "{name} (system) on n{n}: {all} running ({current} current), want 1"
                            ));
                        }
                    }
                    for n in per_node.keys().filter(|n| !want.contains(n)) {
                        out.push(format!(
                            "{name} (system) runs on n{n}, which does not qualify"
                        ));
                    }
                    if out.len() >= limit {
                        out.truncate(limit);
                        return out;
                    }
                }
                Some(spec) => {
                    let fp = spec.task.fingerprint();
                    for slot in 0..spec.replicas {
                        let on = by_slot
                            .get(&(name.as_str(), slot))
                            .map(Vec::as_slice)
                            .unwrap_or(&[]);
                        let current = on
                            .iter()
                            .filter(|r| r.spec.task.fingerprint() == fp)
                            .count();
                        match spec.job_type {
                            JobType::Batch => {
                                let done = self.is_completed(name, slot);
                                if (done && !on.is_empty()) || (!done && current != 1) {
                                    out.push(format!(
                                        "{name}.{slot}: batch, completed {done}, {} running",
                                        on.len()
                                    ));
                                    if out.len() >= limit {
                                        return out;
                                    }
                                }
                            }
                            _ => {
                                if current != 1 || on.len() != 1 {
                                    out.push(format!(
                                        "{name}.{slot}: {} running ({current} current), want 1",
                                        on.len()
                                    ));
                                    if out.len() >= limit {
                                        return out;
                                    }
                                }
                            }
                        }
                    }
                    let extra = by_slot
                        .iter()
                        .filter(|((j, s), _)| j == name && *s >= spec.replicas)
                        .count();
                    if extra > 0 {
                        out.push(format!(
                            "{name}: {extra} slot(s) beyond the replica count run"
                        ));
                    }
                }
            }
        }
        for (j, _) in by_slot.keys() {
            if !self.accepted.contains_key(*j) {
                out.push(format!("{j}: runs but was never accepted"));
            }
        }
        out
    }

    /// The version of `job` every node must hold at the end.
    pub fn expected_version(&self, job: &str) -> Option<&Version> {
        self.accepted.get(job).map(|r| &r.version)
    }
}
