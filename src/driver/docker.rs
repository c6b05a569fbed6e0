//! The `docker` driver: each instance is a container, run through the
//! Docker Engine API (bollard) on the local socket.
//!
//! The agent owns restarts: containers are created without a Docker restart
//! policy, and their exits are reported like a process exit. Every container
//! carries labels naming its cluster, node, job, slot, run and job version,
//! and the whole [`InstanceSpec`] (so an agent that restarts finds its
//! containers again from the Engine alone). Several agents may share one
//! Engine (tests run three on one machine): each only ever lists, adopts or
//! removes containers labelled with its own cluster and node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Driver, DriverEvent, InstanceId, InstanceSpec, InstanceState, DRIVER_EVENTS_LEN};
use crate::driver::ExitStatus;

/// Label keys.
pub const LABEL_CLUSTER: &str = "shoal.cluster";
/// Node that started the container.
pub const LABEL_NODE: &str = "shoal.node";
/// Job name.
pub const LABEL_JOB: &str = "shoal.job";
/// Slot index.
pub const LABEL_SLOT: &str = "shoal.slot";
/// Run id.
pub const LABEL_RUN: &str = "shoal.run";
/// Job version (`hlc.node`).
pub const LABEL_VERSION: &str = "shoal.version";
/// The instance spec as JSON, read back after an agent restart.
const LABEL_SPEC: &str = "shoal.spec";

/// How long detection waits for the Engine at start.
const DETECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest time an image pull may take before the slot fails.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Log lines fetched to cut the last `max_bytes` from.
const LOG_TAIL_LINES: &str = "10000";

pub use shoal_core::job::PullPolicy;

/// The docker driver.
pub struct DockerDriver {
    docker: Docker,
    cluster: String,
    node: String,
    events_tx: mpsc::Sender<DriverEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<DriverEvent>>>,
}

/// What the Engine said at detection.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Engine version.
    pub version: String,
    /// API version in use (negotiated down to the Engine's).
    pub api: String,
}

/// A container name, unique per cluster, node and run (several clusters
/// and nodes may share an Engine); Docker allows `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn container_name(cluster: &str, node: &str, id: &InstanceId) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let cluster: String = cluster.chars().take(8).collect();
    format!(
        "shoal-{}-{}-{}-{}-{}",
        clean(&cluster),
        clean(node),
        clean(&id.job),
        id.slot,
        id.run
    )
}

/// `cpu` millicores as Docker's NanoCPUs; `memory` MiB as bytes.
fn container_limits(cpu_millis: u64, memory_mib: u64) -> (i64, i64) {
    (
        (cpu_millis as i64).saturating_mul(1_000_000),
        (memory_mib as i64).saturating_mul(1024 * 1024),
    )
}

/// The Engine API body for an instance.
pub fn create_body(cluster: &str, node: &str, spec: &InstanceSpec) -> ContainerCreateBody {
    let task = &spec.resolved();
    let labels = HashMap::from([
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
        (LABEL_NODE.to_string(), node.to_string()),
        (LABEL_JOB.to_string(), spec.id.job.clone()),
        (LABEL_SLOT.to_string(), spec.id.slot.to_string()),
        (LABEL_RUN.to_string(), spec.id.run.to_string()),
        (
            LABEL_VERSION.to_string(),
            format!("{}.{}", spec.job_version.hlc, spec.job_version.node),
        ),
        (
            LABEL_SPEC.to_string(),
            serde_json::to_string(spec).expect("a spec encodes"),
        ),
    ]);
    let env: Vec<String> = task
        .env
        .iter()
        .chain(spec.env.iter())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for (name, host) in &task.ports {
        let inside = task.container_ports.get(name).copied().unwrap_or(*host);
        let key = format!("{inside}/tcp");
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_default()
            .get_or_insert_default()
            .push(PortBinding {
                host_ip: None,
                host_port: Some(host.to_string()),
            });
    }
    let (nano_cpus, memory) = container_limits(task.resources.cpu, task.resources.memory);
    let cmd: Vec<String> = if task.command.is_empty() {
        Vec::new()
    } else {
        std::iter::once(task.command.clone())
            .chain(task.args.iter().cloned())
            .collect()
    };
    ContainerCreateBody {
        image: task.image.clone(),
        cmd: (!cmd.is_empty()).then_some(cmd),
        env: Some(env),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        // The Engine sends it on stop (the image's, else SIGTERM, without).
        stop_signal: task.kill_signal.clone(),
        host_config: Some(HostConfig {
            nano_cpus: Some(nano_cpus),
            memory: Some(memory),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            // The agent restarts by the job's policy; Docker must not.
            restart_policy: None,
            auto_remove: Some(false),
            // An init reaps zombies and forwards the stop signal to
            // commands like `sleep` that do not handle it themselves.
            init: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerDriver {
    /// Connects to the local Engine (`DOCKER_HOST` or the default socket)
    /// and checks that it answers. `Err` says why the driver is unavailable.
    pub async fn detect(cluster: &str, node: &str) -> Result<(DockerDriver, EngineInfo)> {
        let docker =
            Docker::connect_with_local_defaults().context("cannot connect to the Docker Engine")?;
        let docker = tokio::time::timeout(DETECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| anyhow!("the Docker Engine did not answer within {DETECT_TIMEOUT:?}"))?
            .context("the Docker Engine does not answer")?;
        let version = tokio::time::timeout(DETECT_TIMEOUT, docker.version())
            .await
            .map_err(|_| anyhow!("the Docker Engine did not answer within {DETECT_TIMEOUT:?}"))?
            .context("the Docker Engine does not answer")?;
        let info = EngineInfo {
            version: version.version.unwrap_or_else(|| "unknown".into()),
            api: docker.client_version().to_string(),
        };
        let (events_tx, events_rx) = mpsc::channel(DRIVER_EVENTS_LEN);
        Ok((
            DockerDriver {
                docker,
                cluster: cluster.to_string(),
                node: node.to_string(),
                events_tx,
                events_rx: Mutex::new(Some(events_rx)),
            },
            info,
        ))
    }

    fn name_of(&self, id: &InstanceId) -> String {
        container_name(&self.cluster, &self.node, id)
    }

    /// Makes sure the image is present, pulling it by policy.
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<()> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(e).context("cannot inspect the image"),
        };
        let pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::Missing => !present,
            PullPolicy::Never => false,
        };
        if !pull {
            if present {
                return Ok(());
            }
            bail!("image `{image}` is not present on this node and the pull policy is `never`");
        }
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let pulled = tokio::time::timeout(PULL_TIMEOUT, async {
            let mut stream = self.docker.create_image(Some(options), None, None);
            while let Some(step) = stream.next().await {
                step?;
            }
            Ok::<(), DockerError>(())
        })
        .await;
        match pulled {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if present => {
                warn!(image, error = %e, "pull failed; using the local image");
                Ok(())
            }
            Ok(Err(e)) => Err(anyhow!(
                "image `{image}` is not present on this node and cannot be pulled: {e}"
            )),
            Err(_) if present => Ok(()),
            Err(_) => Err(anyhow!(
                "image `{image}` is not present on this node and pulling it took over {PULL_TIMEOUT:?}"
            )),
        }
    }

    /// Removes a container, running or not.
    async fn force_remove(&self, name: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        self.docker.remove_container(name, Some(options)).await
    }

    /// Reports the container's exit once it stops.
    fn watch(&self, id: InstanceId, name: String) {
        let docker = self.docker.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let options = WaitContainerOptionsBuilder::default()
                .condition("not-running")
                .build();
            let mut waits = docker.wait_container(&name, Some(options));
            // The stream ends when the container stops (an error carries a
            // non-zero code); the state is read back from the Engine below.
            while let Some(r) = waits.next().await {
                if let Err(e) = r {
                    debug!(container = %name, error = %e, "wait ended");
                }
            }
            let state = exit_state(&docker, &name).await;
            let _ = tx.send(DriverEvent::Ended { id, state }).await;
        });
    }
}

/// How a stopped container ended, as the Engine records it.
async fn exit_state(docker: &Docker, name: &str) -> InstanceState {
    match docker.inspect_container(name, None).await {
        Ok(c) => {
            let s = c.state.unwrap_or_default();
            if s.running == Some(true) {
                // The wait was cut (Engine restart?): report it lost so the
                // scheduler decides, rather than claim an exit code.
                return InstanceState::Lost;
            }
            let code = s.exit_code.unwrap_or(-1);
            InstanceState::Exited(if s.oom_killed == Some(true) {
                ExitStatus {
                    code: None,
                    signal: Some(libc::SIGKILL),
                    error: Some("the container ran out of memory (OOM-killed)".into()),
                }
            } else {
                ExitStatus::code(code as i32)
            })
        }
        Err(_) => InstanceState::Lost,
    }
}

#[async_trait::async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<()> {
        let image = spec
            .task
            .image
            .as_deref()
            .context("the docker driver needs an image")?;
        self.ensure_image(image, spec.task.pull).await?;
        let name = self.name_of(&spec.id);
        let body = create_body(&self.cluster, &self.node, spec);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        match self
            .docker
            .create_container(Some(options), body.clone())
            .await
        {
            Ok(_) => {}
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                // Left over from an attempt cut short: start afresh.
                let _ = self.force_remove(&name).await;
                let options = CreateContainerOptionsBuilder::default().name(&name).build();
                self.docker
                    .create_container(Some(options), body)
                    .await
                    .context("cannot create the container")?;
            }
            Err(e) => return Err(e).context("cannot create the container"),
        }
        if let Err(e) = self.docker.start_container(&name, None).await {
            let _ = self.force_remove(&name).await;
            return Err(e).context("cannot start the container");
        }
        debug!(container = %name, "started");
        self.watch(spec.id.clone(), name);
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<()> {
        let name = self.name_of(id);
        // The Engine sends the container's stop signal (the task's
        // kill_signal, else the image's, else SIGTERM), waits `t`
        // seconds, then kills.
        let t = grace.as_secs().clamp(1, 600) as i32;
        let options = StopContainerOptionsBuilder::default().t(t).build();
        match self.docker.stop_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 304: already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(e).context("cannot stop the container"),
        }
    }

    async fn recover(&self) -> Result<Vec<(InstanceSpec, InstanceState)>> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_CLUSTER}={}", self.cluster),
                format!("{LABEL_NODE}={}", self.node),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .context("cannot list containers")?;
        let mut out = Vec::new();
        for c in containers {
            let labels = c.labels.unwrap_or_default();
            let name = c
                .names
                .and_then(|n| n.first().cloned())
                .map(|n| n.trim_start_matches('/').to_string())
                .or(c.id)
                .unwrap_or_default();
            let Some(spec) = labels
                .get(LABEL_SPEC)
                .and_then(|s| serde_json::from_str::<InstanceSpec>(s).ok())
            else {
                warn!(container = %name, "a shoal container without a readable spec: removing it");
                let _ = self.force_remove(&name).await;
                continue;
            };
            let running = matches!(
                c.state,
                Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
            );
            let state = if running {
                self.watch(spec.id.clone(), name.clone());
                InstanceState::Running
            } else {
                exit_state(&self.docker, &name).await
            };
            info!(container = %name, ?state, "found a container from before the restart");
            out.push((spec, state));
        }
        Ok(out)
    }

    async fn remove(&self, id: &InstanceId) -> Result<()> {
        match self.force_remove(&self.name_of(id)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e).context("cannot remove the container"),
        }
    }

    async fn logs(&self, id: &InstanceId, stream: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let name = self.name_of(id);
        let (stdout, stderr) = match stream {
            "stdout" => (true, false),
            "stderr" => (false, true),
            other => bail!("unknown stream `{other}`: use stdout or stderr"),
        };
        let options = LogsOptionsBuilder::default()
            .stdout(stdout)
            .stderr(stderr)
            .tail(LOG_TAIL_LINES)
            .build();
        let mut logs = self.docker.logs(&name, Some(options));
        let max = max_bytes as usize;
        let mut out: Vec<u8> = Vec::new();
        while let Some(chunk) = logs.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) if is_not_found(&e) => bail!("no container for {id} on this node"),
                Err(e) => return Err(e).context("cannot read the container's logs"),
            };
            out.extend_from_slice(&chunk.into_bytes());
            if out.len() > 2 * max.max(4096) {
                out.drain(..out.len() - max);
            }
        }
        if out.len() > max {
            out.drain(..out.len() - max);
        }
        Ok(out)
    }

    async fn exec_check(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let name = self.name_of(id);
        let exec = self
            .docker
            .create_exec(
                &name,
                CreateExecOptions {
                    cmd: Some(command.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("cannot run the check in the container: {e}"))?;
        let run = async {
            let mut output = Vec::new();
            if let StartExecResults::Attached {
                output: mut stream, ..
            } = self
                .docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| format!("cannot start the check in the container: {e}"))?
            {
                // Read it all (the exec ends when its output does), keep
                // the start.
                while let Some(Ok(chunk)) = stream.next().await {
                    if output.len() < 200 {
                        output.extend_from_slice(&chunk.into_bytes());
                    }
                }
            }
            let inspect = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| format!("cannot read the check's exit: {e}"))?;
            match inspect.exit_code {
                Some(0) => Ok(()),
                code => Err(super::check_failure(code.map(|c| c as i32), &output)),
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => {
                // Docker's API cannot stop an exec; its process is on this
                // host (its pid as the host sees it), so the agent kills it
                // rather than let overrunning checks pile up. What it
                // started itself is left to the container. On a loaded
                // host the exec may only start after the timeout (CI saw 5
                // piled up when the agent looked once, too early), so it
                // looks again for a bounded while.
                tokio::spawn(kill_exec(self.docker.clone(), exec.id.clone()));
                Err(super::check_timed_out(timeout))
            }
        }
    }

    fn events(&self) -> Option<mpsc::Receiver<DriverEvent>> {
        self.events_rx.lock().expect("lock").take()
    }
}

/// Looks at an overrun exec check every 50 ms for at most
/// [`EXEC_KILL_WATCH`] and kills its process once it runs (or gives up once
/// it ended, or never started).
async fn kill_exec(docker: Docker, exec: String) {
    let tries = EXEC_KILL_WATCH.as_millis() / 50;
    for _ in 0..tries {
        match docker.inspect_exec(&exec).await {
            // Running, with its pid known (it shows running before the
            // pid is set).
            Ok(i) if i.running == Some(true) && i.pid.is_some_and(|p| p > 1) => {
                if let Some(pid) = i.pid {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                return;
            }
            Ok(i) if i.running != Some(true) && i.exit_code.is_some() => return,
            Err(_) => return,
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long an overrun exec check is watched for its process to kill.
const EXEC_KILL_WATCH: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use shoal_core::hlc::{Hlc, Version};
    use shoal_core::job::TaskSpec;

    fn spec() -> InstanceSpec {
        let task: TaskSpec = toml::from_str(
            r#"
            driver = "docker"
            image = "shoal-test/busybox:1"
            command = "sleep"
            args = ["100"]
            env = { A = "1" }
            ports = { http = 8080, raw = 9000 }
            container_ports = { http = 80 }
            resources = { cpu = 250, memory = 64 }
            "#,
        )
        .expect("task parses");
        InstanceSpec {
            id: InstanceId {
                job: "web".into(),
                slot: 2,
                run: 77,
            },
            job_version: Version {
                hlc: Hlc {
                    wall_ms: 5,
                    logical: 1,
                },
                node: "n1".into(),
            },
            seq: 3,
            task,
            env: BTreeMap::from([("SHOAL_SLOT".into(), "2".into())]),
            ports: BTreeMap::new(),
        }
    }

    #[test]
    fn the_body_carries_labels_limits_ports_and_the_command() {
        let s = spec();
        let body = create_body("c1", "node/1", &s);
        let labels = body.labels.clone().unwrap_or_default();
        assert_eq!(labels[LABEL_CLUSTER], "c1");
        assert_eq!(labels[LABEL_NODE], "node/1");
        assert_eq!(labels[LABEL_JOB], "web");
        assert_eq!(labels[LABEL_SLOT], "2");
        assert_eq!(labels[LABEL_RUN], "77");
        assert_eq!(
            labels[LABEL_VERSION],
            format!(
                "{}.n1",
                Hlc {
                    wall_ms: 5,
                    logical: 1
                }
            )
        );
        let back: InstanceSpec = serde_json::from_str(&labels[LABEL_SPEC]).expect("spec label");
        assert_eq!(back, s);
        assert_eq!(
            body.cmd.as_deref(),
            Some(&["sleep".to_string(), "100".to_string()][..])
        );
        let env = body.env.clone().unwrap_or_default();
        assert!(env.contains(&"A=1".to_string()) && env.contains(&"SHOAL_SLOT=2".to_string()));
        let host = body.host_config.clone().expect("host config");
        assert_eq!(host.nano_cpus, Some(250_000_000));
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert!(host.restart_policy.is_none(), "the agent owns restarts");
        let ports = host.port_bindings.expect("ports");
        let http = ports["80/tcp"].clone().expect("binding");
        assert_eq!(http[0].host_port.as_deref(), Some("8080"));
        let raw = ports["9000/tcp"].clone().expect("binding");
        assert_eq!(raw[0].host_port.as_deref(), Some("9000"));
    }

    #[test]
    fn container_names_are_valid_and_distinct_per_node() {
        let id = spec().id;
        let a = container_name("c1", "node/1", &id);
        let b = container_name("c1", "node-2", &id);
        let c = container_name("c2", "node/1", &id);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
    }
}
