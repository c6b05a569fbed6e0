//! Drivers run instances: `exec` (processes, under `shoal supervise`) and
//! `docker` (containers through the Docker Engine API) and `hollow` (scale
//! benchmarks only: everything but the process), behind one [`Driver`] trait.

pub mod docker;
pub mod exec;
pub mod hollow;
pub mod supervise;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use supervise::ExitStatus;

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
    /// The task.
    pub task: TaskSpec,
    /// Variables added to the task's environment (SHOAL_JOB, SHOAL_SLOT, ...).
    pub env: BTreeMap<String, String>,
}

/// Where an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// Depth of a driver's event queue; a driver blocks its watchers (not the
/// agent) when the agent falls behind.
pub const DRIVER_EVENTS_LEN: usize = 4096;

/// Runs instances of one kind.
#[async_trait::async_trait]
pub trait Driver: Send + Sync + 'static {
    /// `exec`, `docker`, `hollow`.
    fn name(&self) -> &'static str;

    /// Starts an instance.
    async fn start(&self, spec: &InstanceSpec) -> Result<()>;

    /// Stops an instance: the stop signal, then a kill after `grace`.
    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<()>;

    /// Every instance the driver has on this node and its state, including
    /// those started before an agent restart (which it watches again).
    async fn recover(&self) -> Result<Vec<(InstanceSpec, InstanceState)>>;

    /// Forgets an ended instance (its files).
    async fn remove(&self, id: &InstanceId) -> Result<()>;

    /// The last `max_bytes` of an instance's output (`stdout` or `stderr`).
    async fn logs(&self, id: &InstanceId, stream: &str, max_bytes: u64) -> Result<Vec<u8>>;

    /// The event stream; can be taken once.
    fn events(&self) -> Option<mpsc::Receiver<DriverEvent>>;
}
