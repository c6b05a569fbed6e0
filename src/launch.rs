//! Starting `shoal agent` processes and waiting until they serve: the one
//! launcher that `shoal demo`, the integration tests, the benchmarks and the
//! chaos suite share.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::agent::AgentInfo;

/// How long an agent may take to start serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped agent may take to exit before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// An agent to start.
#[derive(Debug, Clone)]
pub struct Launch {
    bin: PathBuf,
    name: String,
    data_dir: PathBuf,
    listen: String,
    http: String,
    join: Vec<String>,
    token_file: Option<PathBuf>,
    args: Vec<OsString>,
    wrapper: Vec<OsString>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Launch {
    /// `bin agent --name NAME --data-dir DATA_DIR`, listening on loopback
    /// ports the OS picks.
    pub fn new(bin: impl Into<PathBuf>, name: &str, data_dir: impl Into<PathBuf>) -> Launch {
        Launch {
            bin: bin.into(),
            name: name.to_string(),
            data_dir: data_dir.into(),
            listen: "127.0.0.1:0".into(),
            http: "127.0.0.1:0".into(),
            join: Vec::new(),
            token_file: None,
            args: Vec::new(),
            wrapper: Vec::new(),
            stdout: None,
            stderr: None,
            env: vec![("RUST_LOG".into(), "info".into())],
        }
    }

    /// The QUIC and HTTP listen addresses.
    pub fn listen(mut self, quic: &str, http: &str) -> Launch {
        self.listen = quic.to_string();
        self.http = http.to_string();
        self
    }

    /// Joins through `seeds` with the token in `token_file`.
    pub fn join(mut self, seeds: &[String], token_file: &Path) -> Launch {
        self.join = seeds.to_vec();
        self.token_file = Some(token_file.to_path_buf());
        self
    }

    /// Further `shoal agent` arguments.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs the agent under this command (e.g. `ip netns exec NS`).
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Appends the agent's stdout and stderr to these files (both may be
    /// the same file); by default they go to `<data-dir>/agent.log`.
    pub fn logs(mut self, stdout: &Path, stderr: &Path) -> Launch {
        self.stdout = Some(stdout.to_path_buf());
        self.stderr = Some(stderr.to_path_buf());
        self
    }

    /// An environment variable of the agent.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the agent and waits until it serves (its `agent.json` is
    /// written), failing if it exits first or takes over [`START_TIMEOUT`].
    pub fn spawn(&self) -> Result<Launched> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        let info_path = self.data_dir.join("agent.json");
        let _ = std::fs::remove_file(&info_path);
        let default_log = self.data_dir.join("agent.log");
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))
        };
        let stdout = open(self.stdout.as_deref().unwrap_or(&default_log))?;
        let stderr = open(self.stderr.as_deref().unwrap_or(&default_log))?;
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args([
            "agent",
            "--name",
            &self.name,
            "--listen",
            &self.listen,
            "--http",
            &self.http,
        ])
        .arg("--data-dir")
        .arg(&self.data_dir)
        .args(&self.args)
        // Agents launched side by side on one machine (tests, the demo)
        // cannot share the default DNS port: each takes a free one (in
        // its agent.json) unless told otherwise.
        .args(
            if self
                .args
                .iter()
                .any(|a| a == "--dns" || a.to_str().is_some_and(|a| a.starts_with("--dns=")))
            {
                &[][..]
            } else {
                &["--dns", "127.0.0.1:0"][..]
            },
        )
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
        for seed in &self.join {
            cmd.args(["--join", seed]);
        }
        if let Some(t) = &self.token_file {
            cmd.arg("--token-file").arg(t);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start agent {}", self.name))?;
        let started = Instant::now();
        let info = loop {
            if let Some(info) = std::fs::read_to_string(&info_path)
                .ok()
                .and_then(|s| serde_json::from_str::<AgentInfo>(&s).ok())
            {
                break info;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "agent {} exited ({status}); see {}",
                    self.name,
                    self.stderr.as_deref().unwrap_or(&default_log).display()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent {} did not start within {START_TIMEOUT:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Launched {
            name: self.name.clone(),
            dir: self.data_dir.clone(),
            child: Some(child),
            info,
        })
    }
}

/// A started agent. Dropping it kills the agent (not its instances, which
/// outlive an agent by design; see [`crate::driver::exec::kill_instances_under`]).
#[derive(Debug)]
pub struct Launched {
    /// Node name.
    pub name: String,
    /// Its data dir.
    pub dir: PathBuf,
    /// The process, until it is stopped.
    pub child: Option<Child>,
    /// What it wrote once serving (addresses, pid, generation).
    pub info: AgentInfo,
}

impl Launched {
    /// The token its API accepts (from `<data-dir>/api-token`).
    pub fn api_token(&self) -> Result<String> {
        let path = self.dir.join(crate::credentials::API_TOKEN_FILE);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_string())
    }

    /// Whether the process has not been stopped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends a signal (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Sends `sig` and waits for the process to exit (killing it after
    /// [`STOP_TIMEOUT`]); `None` if it was not running.
    pub fn stop(&mut self, sig: i32) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, sig) };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A graceful stop (SIGTERM: the agent leaves the cluster and stops its
    /// instances), a kill if it takes over `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
