//! A simulated machine's disk and processes: what outlives the agent
//! (instances outlive an agent crash; the store outlives everything but a
//! wipe).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_core::instance::{ExitStatus, InstanceId, InstanceSpec, InstanceState};
use shoal_core::records::{Completion, JobRecord};

/// The node's durable store.
#[derive(Debug, Default, Clone)]
pub struct SimStore {
    /// Job records by name (the store keeps the newer per job), shared
    /// with every other node's store: a deep copy per node would hold a
    /// million job records at 1,000 jobs on 1,000 nodes.
    pub jobs: BTreeMap<String, Arc<JobRecord>>,
    /// Completions.
    pub completions: BTreeMap<(String, u32), Completion>,
    /// The remembered membership.
    pub members: Vec<(String, u64)>,
}

impl SimStore {
    /// Commits a write as the real store does (newer record per job, first
    /// completion per slot).
    pub fn write(&mut self, jobs: &[Arc<JobRecord>], completions: &[Completion]) {
        for r in jobs {
            if self
                .jobs
                .get(&r.name)
                .is_none_or(|old| old.version < r.version)
            {
                self.jobs.insert(r.name.clone(), r.clone());
            }
        }
        for c in completions {
            self.completions
                .entry((c.job.clone(), c.slot))
                .or_insert_with(|| c.clone());
        }
    }

    /// Deletes collected jobs as the real store does: the record if it is
    /// still at that version, and the job's completions.
    pub fn forget(&mut self, jobs: &[(String, Option<shoal_core::hlc::Version>)]) {
        for (name, version) in jobs {
            if version.is_some() && self.jobs.get(name).map(|r| &r.version) == version.as_ref() {
                self.jobs.remove(name);
            }
            if !self.jobs.contains_key(name) {
                self.completions.retain(|(job, _), _| job != name);
            }
        }
    }
}

/// What a simulated task does, from its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Runs until stopped (`sleep`, anything unknown).
    Forever,
    /// Exits 0 after this long (`sim-batch <duration>`).
    Succeed(Duration),
    /// Exits 1 after this long (`sim-fail <duration>`).
    Fail(Duration),
    /// Cannot be started at all (`sim-nostart`).
    NoStart,
}

/// How a task behaves.
pub fn behaviour(spec: &InstanceSpec) -> Behaviour {
    let arg = || {
        spec.task
            .args
            .first()
            .and_then(|a| humantime::parse_duration(a).ok())
            .unwrap_or(Duration::from_millis(100))
    };
    match spec.task.command.as_str() {
        "sim-batch" => Behaviour::Succeed(arg()),
        "sim-fail" => Behaviour::Fail(arg()),
        "sim-nostart" => Behaviour::NoStart,
        _ => Behaviour::Forever,
    }
}

/// What a health check of a running instance finds: it fails where the
/// task's environment says `SIM_HEALTH = "fail"` (a version that starts
/// but never serves), and for the first K checks with `slow=K` (a version
/// that takes long to serve).
pub fn health(inst: &mut SimInstance) -> Result<(), String> {
    inst.checks = inst.checks.saturating_add(1);
    match inst.spec.task.env.get("SIM_HEALTH").map(String::as_str) {
        Some("fail") => Err("HTTP 503".into()),
        Some(s) => match s.strip_prefix("slow=").and_then(|k| k.parse::<u32>().ok()) {
            Some(k) if inst.checks <= k => Err("HTTP 503 (warming up)".into()),
            _ => Ok(()),
        },
        None => Ok(()),
    }
}

/// One instance on the machine.
#[derive(Debug, Clone)]
pub struct SimInstance {
    /// What it runs.
    pub spec: InstanceSpec,
    /// The driver that runs it.
    pub driver: String,
    /// `None` while running.
    pub ended: Option<InstanceState>,
    /// The agent asked it to stop.
    pub stopping: bool,
    /// Health checks run on it so far.
    pub checks: u32,
}

/// The machine's processes.
#[derive(Debug, Default, Clone)]
pub struct SimDriver {
    /// Every instance the agent started and has not removed.
    pub instances: BTreeMap<InstanceId, SimInstance>,
}

impl SimDriver {
    /// Running instances.
    pub fn running(&self) -> impl Iterator<Item = &SimInstance> {
        self.instances.values().filter(|i| i.ended.is_none())
    }

    /// Starts an instance: fails as a real start would (a program that
    /// cannot run, a host port already bound by a running instance).
    pub fn start(&mut self, driver: &str, spec: &InstanceSpec) -> Result<(), String> {
        if behaviour(spec) == Behaviour::NoStart {
            return Err(format!(
                "cannot start `{}`: No such file or directory",
                spec.task.command
            ));
        }
        // The ports as the node chose them (dynamic ones are 0 in the job).
        if spec.host_ports().any(|(_, p)| p == 0) {
            return Err("port 0: a dynamic port reached the driver unassigned".into());
        }
        for (_, p) in spec.host_ports() {
            if self
                .running()
                .any(|i| i.spec.host_ports().any(|(_, q)| q == p))
            {
                return Err(format!("port {p} is already bound on this machine"));
            }
        }
        self.instances.insert(
            spec.id.clone(),
            SimInstance {
                spec: spec.clone(),
                driver: driver.to_string(),
                ended: None,
                stopping: false,
                checks: 0,
            },
        );
        Ok(())
    }

    /// Ends an instance; returns whether it was running.
    pub fn end(&mut self, id: &InstanceId, state: InstanceState) -> bool {
        match self.instances.get_mut(id) {
            Some(i) if i.ended.is_none() => {
                i.ended = Some(state);
                true
            }
            _ => false,
        }
    }

    /// The exit of a stop signal.
    pub fn stopped() -> InstanceState {
        InstanceState::Exited(ExitStatus {
            code: None,
            signal: Some(15),
            error: None,
        })
    }
}
