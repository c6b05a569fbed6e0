//! The workload model (what the API accepted) and the checker (what really
//! runs, sampled from /proc and the agents' APIs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use rand::Rng;
use serde_json::json;

use crate::cluster::Cluster;

/// How often the checker samples.
const SAMPLE: Duration = Duration::from_millis(250);
/// A duplicate outside faults must end within this (failure detection,
/// gossip, the join grace and the stop grace together stay well inside it).
const CONFLICT_WINDOW: Duration = Duration::from_secs(10);
/// After a fault ends, duplicates still count as the fault's for this long
/// (the returning node re-checks its copies within the join grace).
const AFTER_FAULT: Duration = Duration::from_secs(10);

/// A duplicate episode still going: since when, on which nodes.
type OpenEpisode = (Instant, Vec<String>);

/// Two copies of one slot outside faults, from first to last sample.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Episode {
    /// `job.slot`.
    pub slot: String,
    /// Nodes that ran a copy.
    pub holders: Vec<String>,
    /// Seconds into the run.
    pub start_s: f64,
    /// Length, seconds.
    pub length_s: f64,
    /// Seconds since the last fault healed, if one had.
    pub after_fault_s: Option<f64>,
}

/// Read-only view of the command line for the report.
pub trait ArgsView {
    /// Agents.
    fn nodes(&self) -> usize;
    /// Seconds of faults.
    fn duration(&self) -> u64;
}

#[derive(Debug, Clone)]
struct JobModel {
    batch: bool,
    replicas: u32,
    stopped: bool,
    /// The version the API returned for the last write (None: the write's
    /// outcome is unknown, e.g. it timed out).
    version: Option<String>,
}

/// What the API accepted.
#[derive(Default)]
pub struct Model {
    jobs: BTreeMap<String, JobModel>,
}

fn pick(cluster: &Cluster, rng: &mut impl Rng) -> Option<usize> {
    let up = cluster.up();
    (!up.is_empty()).then(|| up[rng.random_range(0..up.len())])
}

impl Model {
    fn write(
        &mut self,
        cluster: &Cluster,
        checker: &mut Checker,
        node: usize,
        (method, path, body): (&str, &str, &str),
        name: &str,
        change: JobModel,
    ) {
        match cluster.send(node, method, path, body) {
            Ok(v) => {
                let mut m = change;
                m.version = v["hlc"].as_str().map(str::to_string);
                self.jobs.insert(name.to_string(), m);
                checker.writes += 1;
            }
            Err(e) => {
                // Refused (4xx) writes change nothing; a transport error
                // leaves the outcome unknown.
                if let Some(ureq::Error::Status(_, _)) = e.downcast_ref::<ureq::Error>() {
                    checker.refused += 1;
                } else {
                    let mut m = change;
                    m.version = None;
                    self.jobs.insert(name.to_string(), m);
                    checker.unknown_writes += 1;
                }
            }
        }
    }

    /// Submits a service of 1–4 replicas at a random up node.
    pub fn submit_service(
        &mut self,
        cluster: &mut Cluster,
        checker: &mut Checker,
        rng: &mut impl Rng,
        name: &str,
    ) {
        let Some(node) = pick(cluster, rng) else {
            return;
        };
        let replicas = rng.random_range(1..=4);
        let text = format!(
            "name = \"{name}\"\ntype = \"service\"\nreplicas = {replicas}\n[task]\ncommand = \"sleep\"\nargs = [\"100000\"]\n[task.resources]\ncpu = 10\nmemory = 8\n"
        );
        let m = JobModel {
            batch: false,
            replicas,
            stopped: false,
            version: None,
        };
        self.write(cluster, checker, node, ("POST", "/v1/jobs", &text), name, m);
    }

    /// Submits a batch job of 3 slots; each run appends a line to `runs`.
    pub fn submit_batch(
        &mut self,
        cluster: &mut Cluster,
        checker: &mut Checker,
        name: &str,
        runs: &Path,
    ) {
        let mut rng = rand::rng();
        let Some(node) = pick(cluster, &mut rng) else {
            return;
        };
        let text = format!(
            "name = \"{name}\"\ntype = \"batch\"\nreplicas = 3\n[task]\ncommand = \"sh\"\nargs = [\"-c\", \"echo $SHOAL_JOB $SHOAL_SLOT $SHOAL_NODE $(date +%s%N) >> {}; sleep 2\"]\nuser = \"root\"\n[task.resources]\ncpu = 10\nmemory = 8\n",
            runs.display()
        );
        let m = JobModel {
            batch: true,
            replicas: 3,
            stopped: false,
            version: None,
        };
        self.write(cluster, checker, node, ("POST", "/v1/jobs", &text), name, m);
    }

    fn live_services(&self) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|(_, j)| !j.batch && !j.stopped)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Scales a random live service to 1–5 replicas.
    pub fn scale_random(
        &mut self,
        cluster: &mut Cluster,
        checker: &mut Checker,
        rng: &mut impl Rng,
    ) {
        let live = self.live_services();
        let (Some(node), false) = (pick(cluster, rng), live.is_empty()) else {
            return;
        };
        let name = live[rng.random_range(0..live.len())].clone();
        let replicas = rng.random_range(1..=5);
        let mut m = self.jobs[&name].clone();
        m.replicas = replicas;
        let body = json!({ "replicas": replicas }).to_string();
        self.write(
            cluster,
            checker,
            node,
            ("POST", &format!("/v1/jobs/{name}/scale"), &body),
            &name,
            m,
        );
    }

    /// Stops a random live service (keeping at least two).
    pub fn stop_random(
        &mut self,
        cluster: &mut Cluster,
        checker: &mut Checker,
        rng: &mut impl Rng,
    ) {
        let live = self.live_services();
        if live.len() <= 2 {
            return;
        }
        let Some(node) = pick(cluster, rng) else {
            return;
        };
        let name = live[rng.random_range(0..live.len())].clone();
        let mut m = self.jobs[&name].clone();
        m.stopped = true;
        self.write(
            cluster,
            checker,
            node,
            ("DELETE", &format!("/v1/jobs/{name}"), ""),
            &name,
            m,
        );
    }
}

/// Instances really running under `root` (this run's data dirs, not
/// another cluster's on the machine): (job, slot) -> holders' node names.
fn running_processes(root: &Path) -> BTreeMap<(String, u32), Vec<String>> {
    let mut out: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // One process per instance: the `sleep` (a batch slot's `sh` has a
        // `sleep` child too).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "sleep" {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        if !std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(root)) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let mut job = None;
        let mut slot = None;
        let mut node = None;
        for var in env.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some(v) = var.strip_prefix("SHOAL_JOB=") {
                job = Some(v.to_string());
            } else if let Some(v) = var.strip_prefix("SHOAL_SLOT=") {
                slot = v.parse().ok();
            } else if let Some(v) = var.strip_prefix("SHOAL_NODE=") {
                node = Some(v.to_string());
            }
        }
        if let (Some(j), Some(s), Some(n)) = (job, slot, node) {
            out.entry((j, s)).or_default().push(n);
        }
    }
    out
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The checker.
pub struct Checker {
    /// The run's directory: instances run under it.
    root: PathBuf,
    runs: PathBuf,
    bound: Duration,
    in_fault: bool,
    fault_ended_at: Option<Instant>,
    /// (start, end) of partition windows in Unix ns (end includes
    /// AFTER_FAULT): a batch slot may run again only inside one.
    windows: Vec<(u128, u128)>,
    fault_started_ns: u128,
    /// The current fault splits the network.
    partition: bool,
    dup_outside_s: f64,
    dup_during_faults_s: f64,
    /// Open duplicate episodes outside faults: slot -> since.
    dup_open: BTreeMap<(String, u32), OpenEpisode>,
    /// When the run began and the last fault ended (to explain episodes).
    began: Instant,
    last_fault_end: Option<Instant>,
    /// Duplicate episodes outside faults.
    pub episodes: Vec<Episode>,
    longest_dup_outside_s: f64,
    /// First time each batch slot was seen completed (Unix ns).
    completed_at: BTreeMap<(String, u32), u128>,
    max_reconverge_s: f64,
    reconverges: Vec<(String, f64)>,
    violations: Vec<String>,
    jobs_lost: u64,
    batch_reruns: u64,
    batch_reruns_in_partitions: u64,
    /// Writes the API accepted, refused, and whose outcome is unknown.
    pub writes: u64,
    /// Refused writes.
    pub refused: u64,
    /// Writes whose outcome is unknown.
    pub unknown_writes: u64,
    last_sample: Instant,
}

impl Checker {
    /// A checker of the run in `root` (batch runs are appended to
    /// `root/runs.log`); `bound` is the liveness bound.
    pub fn new(root: PathBuf, bound: Duration) -> Checker {
        Checker {
            runs: root.join("runs.log"),
            root,
            bound,
            in_fault: false,
            fault_ended_at: None,
            windows: Vec::new(),
            fault_started_ns: 0,
            partition: false,
            dup_outside_s: 0.0,
            dup_during_faults_s: 0.0,
            dup_open: BTreeMap::new(),
            began: Instant::now(),
            last_fault_end: None,
            episodes: Vec::new(),
            longest_dup_outside_s: 0.0,
            completed_at: BTreeMap::new(),
            max_reconverge_s: 0.0,
            reconverges: Vec::new(),
            violations: Vec::new(),
            jobs_lost: 0,
            batch_reruns: 0,
            batch_reruns_in_partitions: 0,
            writes: 0,
            refused: 0,
            unknown_writes: 0,
            last_sample: Instant::now(),
        }
    }

    /// Where batch runs are logged.
    pub fn runs_path(&self) -> &Path {
        &self.runs
    }

    /// Records a violation (and says it at once, for long runs).
    fn violate(&mut self, v: String) {
        eprintln!("VIOLATION: {v}");
        self.violations.push(v);
    }

    /// Violations so far.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// A fault starts now.
    pub fn fault_began(&mut self, partition: bool) {
        self.partition = partition;
        self.in_fault = true;
        // The previous fault's end no longer matters: without this, a fault
        // that began more than AFTER_FAULT after the previous one healed
        // counted as over the moment that time passed (its duplicates were
        // counted as outside faults: the 1,704 slot-seconds of the earlier
        // strict 15-minute run were mostly these).
        self.fault_ended_at = None;
        self.fault_started_ns = unix_ns();
        // Episodes open now belong to the fault from here on.
        self.dup_open.clear();
    }

    /// The fault was healed.
    pub fn fault_ended(&mut self, cluster: &mut Cluster, model: &Model) {
        self.fault_ended_at = Some(Instant::now());
        self.last_fault_end = Some(Instant::now());
        if self.partition {
            self.windows
                .push((self.fault_started_ns, unix_ns() + AFTER_FAULT.as_nanos()));
        }
        self.sample(cluster, model);
    }

    fn faulty(&mut self) -> bool {
        if self.in_fault
            && self
                .fault_ended_at
                .is_some_and(|t| t.elapsed() > AFTER_FAULT)
        {
            self.in_fault = false;
            self.fault_ended_at = None;
        }
        self.in_fault
    }

    /// One sample: duplicates of desired service slots, batch completions.
    fn sample(
        &mut self,
        cluster: &mut Cluster,
        model: &Model,
    ) -> BTreeMap<(String, u32), Vec<String>> {
        let dt = self.last_sample.elapsed().as_secs_f64().min(1.0);
        self.last_sample = Instant::now();
        let procs = running_processes(&self.root);
        let faulty = self.faulty();
        let mut dup_now = BTreeSet::new();
        for ((job, slot), holders) in &procs {
            let Some(m) = model.jobs.get(job) else {
                continue;
            };
            if m.batch || m.stopped || *slot >= m.replicas || holders.len() < 2 {
                continue;
            }
            dup_now.insert((job.clone(), *slot));
            if faulty {
                self.dup_during_faults_s += dt;
            } else {
                self.dup_outside_s += dt;
            }
        }
        if !faulty {
            for key in &dup_now {
                let holders = procs.get(key).cloned().unwrap_or_default();
                let since = self
                    .dup_open
                    .entry(key.clone())
                    .or_insert_with(|| (Instant::now(), holders))
                    .0;
                let len = since.elapsed();
                self.longest_dup_outside_s = self.longest_dup_outside_s.max(len.as_secs_f64());
                if len > CONFLICT_WINDOW {
                    let v = format!(
                        "{}.{} ran twice for {:.1} s outside faults (window {:?})",
                        key.0,
                        key.1,
                        len.as_secs_f64(),
                        CONFLICT_WINDOW
                    );
                    // One violation per slot, not one per sample.
                    let said = format!("{}.{} ran twice", key.0, key.1);
                    if !self.violations.iter().any(|x| x.starts_with(&said)) {
                        self.violate(v);
                    }
                }
            }
        }
        let closed: Vec<((String, u32), OpenEpisode)> = self
            .dup_open
            .iter()
            .filter(|(k, _)| !dup_now.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((job, slot), (since, holders)) in closed {
            let start = since.duration_since(self.began).as_secs_f64();
            let len = since.elapsed().as_secs_f64();
            let after_fault = self
                .last_fault_end
                .map(|e| since.saturating_duration_since(e).as_secs_f64());
            println!(
                "  duplicate {job}.{slot} on {holders:?} for {len:.2} s from {start:.1} s (last fault ended {:.1} s before)",
                after_fault.unwrap_or(f64::NAN)
            );
            self.episodes.push(Episode {
                slot: format!("{job}.{slot}"),
                holders,
                start_s: start,
                length_s: len,
                after_fault_s: after_fault,
            });
        }
        self.dup_open.retain(|k, _| dup_now.contains(k));
        // Batch completions, from any up node's API.
        let up = cluster.up();
        for (name, m) in model.jobs.iter().filter(|(_, m)| m.batch && !m.stopped) {
            if (0..m.replicas).all(|s| self.completed_at.contains_key(&(name.clone(), s))) {
                continue;
            }
            let Some(&node) = up.first() else { break };
            if let Some(v) = cluster.get(node, &format!("/v1/jobs/{name}")) {
                for i in v["instances"].as_array().into_iter().flatten() {
                    if i["state"] == "completed" {
                        if let Some(s) = i["slot"].as_u64() {
                            self.completed_at
                                .entry((name.clone(), s as u32))
                                .or_insert_with(unix_ns);
                        }
                    }
                }
            }
        }
        procs
    }

    /// Samples for `hold` (while a fault lasts).
    pub fn watch_for(&mut self, cluster: &mut Cluster, model: &Model, hold: Duration) {
        let end = Instant::now() + hold;
        while Instant::now() < end && !crate::interrupted() {
            self.sample(cluster, model);
            std::thread::sleep(SAMPLE);
        }
    }

    /// Service slots not running exactly as desired (one copy of each
    /// slot below the replica count, none above or of a stopped job).
    fn mismatches(model: &Model, procs: &BTreeMap<(String, u32), Vec<String>>) -> Vec<String> {
        let mut out = Vec::new();
        for (name, m) in model.jobs.iter().filter(|(_, m)| !m.batch) {
            let want = if m.stopped { 0 } else { m.replicas };
            for slot in 0..want.max(8) {
                let on = procs
                    .get(&(name.clone(), slot))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                let expected = usize::from(slot < want);
                if on.len() != expected {
                    out.push(format!(
                        "{name}.{slot}: {} running (on {on:?}), want {expected}",
                        on.len()
                    ));
                }
            }
        }
        out
    }

    /// Waits until every desired service slot runs exactly once (and
    /// nothing undesired runs); records how long it took.
    pub fn converge(&mut self, cluster: &mut Cluster, model: &Model, after: &str) -> Result<()> {
        let started = Instant::now();
        loop {
            let procs = self.sample(cluster, model);
            if Self::mismatches(model, &procs).is_empty() {
                let took = started.elapsed().as_secs_f64();
                self.max_reconverge_s = self.max_reconverge_s.max(took);
                self.reconverges.push((after.to_string(), took));
                return Ok(());
            }
            if crate::interrupted() {
                anyhow::bail!("interrupted");
            }
            if started.elapsed() > self.bound {
                // What each agent's scheduler says of itself, to explain it.
                for i in cluster.up() {
                    if let Some(v) = cluster.get(i, "/v1/stats") {
                        eprintln!("  n{i} scheduler: {}", v["scheduler"]);
                    }
                }
                let wrong = Self::mismatches(model, &procs);
                self.violate(format!(
                    "liveness: not reconverged {:?} after {after}: {}",
                    self.bound,
                    wrong.join(", ")
                ));
                self.max_reconverge_s = self.max_reconverge_s.max(started.elapsed().as_secs_f64());
                return Ok(());
            }
            std::thread::sleep(SAMPLE);
        }
    }

    /// At the end: every accepted job on every node with its latest
    /// version (or a coordinator's mark of it); completed batch slots
    /// never ran again.
    pub fn final_checks(&mut self, cluster: &mut Cluster, model: &Model) -> Result<()> {
        self.converge(cluster, model, "the end")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut missing: Vec<String>;
        loop {
            missing = Vec::new();
            for i in 0..cluster.nodes.len() {
                for (name, m) in &model.jobs {
                    let Some(want) = &m.version else { continue };
                    let got = cluster
                        .get(i, &format!("/v1/jobs/{name}"))
                        .and_then(|v| v["hlc"].as_str().map(str::to_string));
                    // The accepted write, or its coordinator's mark of
                    // its deployment's end (its clock and writer, then
                    // `!` and the outcome: not a lost write).
                    let held = got.as_deref().is_some_and(|g| {
                        g == want.as_str()
                            || g.strip_prefix(want.as_str())
                                .is_some_and(|rest| rest.starts_with('!'))
                    });
                    if !held {
                        missing.push(format!("n{i} has {name} at {got:?}, accepted {want}"));
                    }
                }
            }
            if missing.is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let lost: BTreeSet<&str> = missing
            .iter()
            .filter_map(|m| m.split_whitespace().nth(2))
            .collect();
        self.jobs_lost = lost.len() as u64;
        for m in missing.iter().take(10) {
            self.violate(format!("job lost or stale: {m}"));
        }
        // Batch reruns: a run that started after its slot was seen completed.
        let runs = std::fs::read_to_string(&self.runs).unwrap_or_default();
        for line in runs.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(job), Some(slot), Some(at)) = (
                f.first(),
                f.get(1).and_then(|s| s.parse::<u32>().ok()),
                f.get(3).and_then(|s| s.parse::<u128>().ok()),
            ) else {
                continue;
            };
            if let Some(done) = self.completed_at.get(&(job.to_string(), slot)) {
                if at > *done {
                    if self.windows.iter().any(|(a, b)| at >= *a && at <= *b) {
                        self.batch_reruns_in_partitions += 1;
                    } else {
                        self.batch_reruns += 1;
                        self.violate(format!(
                            "batch rerun: {job}.{slot} started again on {} after it completed",
                            f.get(2).unwrap_or(&"?")
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The JSON report.
    pub fn report(
        &self,
        seed: u64,
        args: &impl ArgsView,
        faults: &BTreeMap<&'static str, u64>,
    ) -> serde_json::Value {
        json!({
            "seed": seed,
            "nodes": args.nodes(),
            "duration_s": args.duration(),
            "faults": faults,
            "faults_total": faults.values().sum::<u64>(),
            "reconverge_bound_s": self.bound.as_secs(),
            "max_reconverge_s": (self.max_reconverge_s * 1000.0).round() / 1000.0,
            "reconverge_s": self.reconverges.iter().map(|(f, s)| json!({"after": f, "s": (s * 1000.0).round() / 1000.0})).collect::<Vec<_>>(),
            "duplicate_slot_seconds": (self.dup_outside_s * 100.0).round() / 100.0,
            "duplicate_slot_seconds_during_faults": (self.dup_during_faults_s * 100.0).round() / 100.0,
            "longest_duplicate_outside_faults_s": (self.longest_dup_outside_s * 100.0).round() / 100.0,
            "duplicate_episodes_outside_faults": self.episodes,
            "conflict_window_s": CONFLICT_WINDOW.as_secs(),
            "jobs_lost": self.jobs_lost,
            "batch_reruns": self.batch_reruns,
            "batch_reruns_during_partitions": self.batch_reruns_in_partitions,
            "writes_accepted": self.writes,
            "writes_refused": self.refused,
            "writes_unknown": self.unknown_writes,
            "violations": self.violations,
        })
    }
}
