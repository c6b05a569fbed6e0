//! Drivers run instances: `exec` (processes, under `shoal supervise`) and
//! `docker` (containers through the Docker Engine API) and `hollow` (scale
//! benchmarks only: everything but the process), behind one [`Driver`] trait.

pub mod contain;
pub mod docker;
pub mod exec;
pub mod hollow;
pub mod supervise;

use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc;

pub use shoal_core::instance::{DriverEvent, ExitStatus, InstanceId, InstanceSpec, InstanceState};

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
