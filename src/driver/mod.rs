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

    /// Up to `chunk` bytes of an instance's output from offset `from`
    /// (`None`: the start of the last `tail` bytes), for a fetch that
    /// another node makes in chunks. Offsets stay valid while the output
    /// grows. This default reads the tail again on every call, so a log
    /// written to between two chunks can show a seam; `exec` reads its
    /// files by offset.
    async fn log_range(
        &self,
        id: &InstanceId,
        stream: &str,
        tail: u64,
        from: Option<u64>,
        chunk: u64,
    ) -> Result<LogRange> {
        let bytes = self.logs(id, stream, tail).await?;
        Ok(LogRange::of(&bytes, from.unwrap_or(0), chunk))
    }

    /// Runs `command` (program and arguments) beside a running instance,
    /// as its task would run it (same user, environment and work dir; in
    /// its container for docker), for an exec health check: `Ok` on exit
    /// 0, else why not (the exit and the start of its output). Killed when
    /// `timeout` runs out.
    async fn exec_check(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let _ = (id, command, timeout);
        Err(format!("the {} driver runs no exec checks", self.name()))
    }

    /// The event stream; can be taken once.
    fn events(&self) -> Option<mpsc::Receiver<DriverEvent>>;
}

/// Why an exec check failed: its exit code and the start of its output
/// (bounded, on one line).
pub fn check_failure(code: Option<i32>, output: &[u8]) -> String {
    let text = String::from_utf8_lossy(&output[..output.len().min(200)]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let exit = match code {
        Some(c) => format!("exit {c}"),
        None => "killed by a signal".to_string(),
    };
    if text.is_empty() {
        exit
    } else {
        format!("{exit}: {text}")
    }
}

/// The reason a check that overran its `timeout` failed.
pub fn check_timed_out(timeout: Duration) -> String {
    format!("timed out after {}", humantime::format_duration(timeout))
}

/// Part of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRange {
    /// Offset of the first byte.
    pub start: u64,
    /// The output's length when read.
    pub end: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl LogRange {
    /// At most `chunk` bytes of `all` from `from` (clamped to its end).
    pub fn of(all: &[u8], from: u64, chunk: u64) -> LogRange {
        let end = all.len() as u64;
        let start = from.min(end);
        let stop = start.saturating_add(chunk).min(end);
        LogRange {
            start,
            end,
            bytes: all[start as usize..stop as usize].to_vec(),
        }
    }
}
