//! The `hollow` driver, for scale benchmarks only (like Kubernetes'
//! kubemark hollow nodes): it does everything but start a process. Never
//! the default; a node offers it only when started with `--hollow`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc;

use super::{Driver, DriverEvent, InstanceId, InstanceSpec, InstanceState, DRIVER_EVENTS_LEN};

/// The hollow driver: instances are entries in a table.
pub struct HollowDriver {
    running: Mutex<HashMap<InstanceId, InstanceSpec>>,
    events_tx: mpsc::Sender<DriverEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<DriverEvent>>>,
}

impl Default for HollowDriver {
    fn default() -> Self {
        let (events_tx, events_rx) = mpsc::channel(DRIVER_EVENTS_LEN);
        HollowDriver {
            running: Mutex::new(HashMap::new()),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
        }
    }
}

#[async_trait::async_trait]
impl Driver for HollowDriver {
    fn name(&self) -> &'static str {
        "hollow"
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<()> {
        self.running
            .lock()
            .expect("lock")
            .insert(spec.id.clone(), spec.clone());
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, _grace: Duration) -> Result<()> {
        if self.running.lock().expect("lock").remove(id).is_some() {
            let status = super::ExitStatus {
                code: None,
                signal: Some(libc::SIGTERM),
                error: None,
            };
            let _ = self.events_tx.try_send(DriverEvent::Ended {
                id: id.clone(),
                state: InstanceState::Exited(status),
            });
        }
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<(InstanceSpec, InstanceState)>> {
        // Nothing survives an agent restart: there were no processes.
        Ok(Vec::new())
    }

    async fn remove(&self, id: &InstanceId) -> Result<()> {
        self.running.lock().expect("lock").remove(id);
        Ok(())
    }

    async fn logs(&self, _id: &InstanceId, _stream: &str, _max_bytes: u64) -> Result<Vec<u8>> {
        Ok(b"(hollow instance: no output)\n".to_vec())
    }

    fn events(&self) -> Option<mpsc::Receiver<DriverEvent>> {
        self.events_rx.lock().expect("lock").take()
    }
}
