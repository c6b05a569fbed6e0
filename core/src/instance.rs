//! Instances: what a driver runs, what a node publishes about its copies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::hlc::Version;
use crate::job::TaskSpec;

/// One run of one slot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceId {
    /// Job name.
    pub job: String,
    /// Slot index.
    pub slot: u32,
    /// Unique run id: the packed HLC of its start.
    pub run: u64,
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.job, self.slot, self.run)
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Identity.
    pub id: InstanceId,
    /// Version of the job it runs.
    pub job_version: Version,
    /// That version's number (`v7`; 0 when started by an earlier release).
    #[serde(default)]
    pub seq: u64,
    /// The task.
    pub task: TaskSpec,
    /// Variables added to the task's environment (SHOAL_JOB, SHOAL_SLOT,
    /// SHOAL_PORT_<NAME>, ...).
    pub env: BTreeMap<String, String>,
    /// The host port of each of the task's ports: the static ones as
    /// written, the dynamic ones (`0`) as the node chose them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
}

impl InstanceSpec {
    /// Each task port with its host port: as chosen where the node chose
    /// one, else as written (`0` only for a dynamic port never assigned).
    pub fn host_ports(&self) -> impl Iterator<Item = (String, u16)> + '_ {
        self.task
            .ports
            .iter()
            .map(|(name, port)| (name.clone(), self.ports.get(name).copied().unwrap_or(*port)))
    }

    /// The task as it runs: its ports as chosen, and `${SHOAL_...}` in its
    /// command, arguments and environment replaced from [`Self::env`].
    /// (`task` itself stays as submitted: its fingerprint tells whether
    /// the copy runs the job's current version.)
    pub fn resolved(&self) -> TaskSpec {
        use crate::ports::interpolate;
        let mut task = self.task.clone();
        task.ports = self.host_ports().collect();
        task.command = interpolate(&task.command, &self.env);
        for a in &mut task.args {
            *a = interpolate(a, &self.env);
        }
        for v in task.env.values_mut() {
            *v = interpolate(v, &self.env);
        }
        task
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
    /// Why the task could not be started at all (a missing program, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// An exit with a code.
    pub fn code(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            signal: None,
            error: None,
        }
    }
}

/// Where an instance is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Running.
    Running,
    /// Ended.
    Exited(ExitStatus),
    /// Its supervisor vanished without recording an exit (killed with the
    /// machine, say).
    Lost,
}

/// News from a driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEvent {
    /// An instance ended.
    Ended {
        /// Which.
        id: InstanceId,
        /// How.
        state: InstanceState,
    },
}

/// A slot copy's state as shown to users and published in gossip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Not placed yet.
    Pending,
    /// Placed, starting (or restarting after an exit).
    Starting,
    /// Running.
    Running,
    /// Ran to completion (batch).
    Completed,
    /// Gave up (batch slot out of retries).
    Failed,
}

impl SlotState {
    /// Its name as shown to users (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Pending => "pending",
            SlotState::Starting => "starting",
            SlotState::Running => "running",
            SlotState::Completed => "completed",
            SlotState::Failed => "failed",
        }
    }

    /// Counts as a live copy of its slot.
    pub fn is_live(self) -> bool {
        matches!(self, SlotState::Starting | SlotState::Running)
    }
}

fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

/// An instance as its node publishes it in gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Slot index.
    #[serde(rename = "s")]
    pub slot: u32,
    /// Run id (packed HLC of its start: older runs sort first).
    #[serde(rename = "r")]
    pub run: u64,
    /// State.
    #[serde(rename = "t")]
    pub state: SlotState,
    /// Fingerprint of the task it runs.
    #[serde(rename = "f")]
    pub task: u64,
    /// Restarts of the slot on this node so far.
    #[serde(rename = "n", default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Why the last start failed (cleared by a start that succeeds).
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Host ports it binds, by name (dynamic ones as chosen).
    #[serde(rename = "p", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Health: `passing`, `critical` or `unknown` (omitted).
    #[serde(rename = "h", default, skip_serializing_if = "is_unknown")]
    pub health: Health,
    /// Why a check is critical.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// The checks passing, as a bit mask (bit i: the task's check i): a
    /// service gated by some of them reads it (see [`crate::catalog`]).
    #[serde(rename = "g", default, skip_serializing_if = "is_zero_u8")]
    pub checks_passing: u8,
    /// The checks critical, as a bit mask.
    #[serde(rename = "b", default, skip_serializing_if = "is_zero_u8")]
    pub checks_critical: u8,
    /// Being stopped (its stop signal may wait for `shutdown_delay`): no
    /// longer serving, whatever its state.
    #[serde(rename = "x", default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// Passing its checks for its job's `min_healthy_time`: a rolling
    /// update may stop the slot's old copy.
    #[serde(rename = "k", default, skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    /// Never ready within its job's `healthy_deadline`: the update to its
    /// version failed.
    #[serde(rename = "d", default, skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    /// The number of the job version it runs (`v7`; 0: unknown).
    #[serde(rename = "v", default, skip_serializing_if = "is_zero_u64")]
    pub version: u64,
}

impl Published {
    /// Whether it serves, ready (passing for its version's
    /// `min_healthy_time`), running and not stopping, on the task `task`
    /// (any task: `None`).
    pub fn ready_on(&self, task: Option<u64>) -> bool {
        task.is_none_or(|t| self.task == t)
            && self.ready
            && self.state == SlotState::Running
            && !self.stopping
    }
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_unknown(h: &Health) -> bool {
    *h == Health::Unknown
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
