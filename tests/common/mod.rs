//! Helpers for integration tests: real `shoal agent` processes on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub const BIN: &str = env!("CARGO_BIN_EXE_shoal");

/// Upper bound for any wait in these tests; they normally take far less.
pub const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize, Clone)]
pub struct AgentInfo {
    pub name: String,
    pub quic: String,
    pub http: String,
    pub pid: u32,
    pub dns: Option<std::net::SocketAddr>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Node {
    pub name: String,
    pub state: String,
    pub address: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub capacity: serde_json::Value,
}

/// An agent of a test, started with the shared launcher; it writes its
/// log to `<dir>/stderr.log` and what it prints to `<dir>/stdout.log`.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub info: Option<AgentInfo>,
}

impl Agent {
    /// Starts an agent; `join` is a seed QUIC address, `token_file` its token.
    /// Tests use the `local-test` scheduler preset (short join grace and
    /// retries).
    pub fn start(
        root: &Path,
        name: &str,
        join: Option<&str>,
        token_file: Option<&Path>,
        extra: &[&str],
    ) -> Agent {
        Agent::start_env(root, name, join, token_file, extra, &[])
    }

    /// [`Agent::start`] with environment variables for the agent.
    pub fn start_env(
        root: &Path,
        name: &str,
        join: Option<&str>,
        token_file: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut launch = shoal::launch::Launch::new(BIN, name, &dir)
            .logs(&dir.join("stdout.log"), &dir.join("stderr.log"))
            .args(["--preset", "local-test"])
            .args(extra.iter().copied());
        for (k, v) in env {
            launch = launch.env(k, v);
        }
        if let Some(j) = join {
            launch = launch.args(["--join", j]);
        }
        if let Some(t) = token_file {
            launch = launch.args([std::ffi::OsStr::new("--token-file"), t.as_os_str()]);
        }
        let mut launched = launch.spawn().unwrap_or_else(|e| {
            panic!(
                "agent {name}: {e:#}: {}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            )
        });
        let info = AgentInfo {
            name: launched.info.name.clone(),
            quic: launched.info.quic.to_string(),
            http: launched.info.http.clone(),
            pid: launched.info.pid,
            dns: launched.info.dns,
        };
        Agent {
            name: name.to_string(),
            dir,
            child: launched.child.take(),
            info: Some(info),
        }
    }

    pub fn quic(&self) -> String {
        self.info.as_ref().unwrap().quic.clone()
    }

    pub fn http(&self) -> String {
        self.info.as_ref().unwrap().http.clone()
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("join-token")
    }

    /// The token its API accepts (it writes it to `<data-dir>/api-token`).
    pub fn api_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("api-token"))
            .expect("the agent wrote its API token")
            .trim()
            .to_string()
    }

    /// A request to its API, with the token.
    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.http()))
            .set("Authorization", &format!("Bearer {}", self.api_token()))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn signal(&mut self, sig: i32) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(child.id() as i32, sig) };
        }
    }

    /// Sends `sig` and reaps the process.
    pub fn stop(&mut self, sig: i32) -> std::process::ExitStatus {
        self.signal(sig);
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "agent {} did not exit",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's view through its HTTP API.
    pub fn nodes(&self) -> Option<Vec<Node>> {
        let resp = self
            .request("GET", "/v1/nodes")
            .timeout(Duration::from_secs(5))
            .call()
            .ok()?;
        resp.into_json().ok()
    }

    pub fn state_of(&self, name: &str) -> Option<String> {
        self.nodes()?
            .into_iter()
            .find(|n| n.name == name)
            .map(|n| n.state)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_instances(&self.dir);
    }
}

/// Kills every instance started under `dir` (they outlive their agent).
pub fn kill_instances(dir: &Path) {
    shoal::driver::exec::kill_instances_under(&dir.join("instances"));
}

/// `shoal <args>` against an agent; returns (success, stdout, stderr).
pub fn cli(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("SHOAL_ADDR", agent.http())
        // The CLI finds the agent's API token in its data dir.
        .env("SHOAL_DATA_DIR", &agent.dir)
        .env_remove("SHOAL_HTTP_TOKEN")
        .output()
        .expect("run shoal");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[derive(Debug, Deserialize, Clone)]
pub struct SlotView {
    pub slot: u32,
    pub node: Option<String>,
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub attempts: u32,
}

#[derive(Debug, Deserialize, Clone)]
pub struct JobStatus {
    pub name: String,
    pub version: String,
    pub hlc: String,
    pub replicas: u32,
    pub instances: Vec<SlotView>,
}

impl Agent {
    /// POSTs a body to its API; the JSON answer.
    pub fn post(&self, path: &str, body: &str) -> Result<serde_json::Value, String> {
        self.request("POST", path)
            .timeout(Duration::from_secs(30))
            .send_string(body)
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())
    }

    /// `GET /v1/jobs/{name}`.
    pub fn job(&self, name: &str) -> Option<JobStatus> {
        let resp = self
            .request("GET", &format!("/v1/jobs/{name}"))
            .timeout(Duration::from_secs(5))
            .call()
            .ok()?;
        resp.into_json().ok()
    }

    /// Restarts of slot `slot` of `name`, per this agent.
    pub fn restarts(&self, name: &str, slot: u32) -> u32 {
        self.job(name).map_or(0, |j| {
            j.instances
                .iter()
                .filter(|i| i.slot == slot)
                .map(|i| i.restarts)
                .max()
                .unwrap_or(0)
        })
    }

    /// Slots of `name` in `state` on nodes other than `not_on`, per this agent.
    pub fn count(&self, name: &str, state: &str, not_on: Option<&str>) -> usize {
        self.job(name).map_or(0, |j| {
            j.instances
                .iter()
                .filter(|i| {
                    i.slot < j.replicas
                        && i.state == state
                        && (not_on.is_none() || i.node.as_deref() != not_on)
                })
                .count()
        })
    }
}

/// Sends `req` (with `body`, if any): the status and the body, for
/// success and error statuses alike.
pub fn call(req: ureq::Request, body: Option<&str>) -> (u16, String) {
    let result = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

/// Writes a job file into `dir` and returns its path.
pub fn job_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) -> Duration {
    wait_until_within(DEADLINE, what, cond)
}

/// [`wait_until`] with its own deadline, for waits whose length is set by
/// a schedule rather than by the system's speed.
pub fn wait_until_within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if cond() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until every agent of `agents` sees all of them alive.
pub fn wait_all_alive(agents: &[Agent]) {
    let n = agents.len();
    wait_until(&format!("{n} alive"), || {
        agents.iter().all(|a| {
            a.nodes()
                .is_some_and(|ns| ns.iter().filter(|m| m.state == "alive").count() == n)
        })
    });
}

/// Waits until every agent of `agents` derives events (it caught up with
/// the cluster: what it learns before is history, not news).
pub fn wait_streaming(agents: &[&Agent]) {
    wait_until("every agent streams events", || {
        agents.iter().all(|a| {
            a.request("GET", "/v1/stats")
                .call()
                .ok()
                .and_then(|r| r.into_json::<serde_json::Value>().ok())
                .is_some_and(|v| v["events"]["streaming"] == true)
        })
    });
}

/// Starts `n` agents: the first bootstraps, the others join it.
pub fn cluster(root: &Path, n: usize) -> Vec<Agent> {
    cluster_with(root, n, |_| Vec::new())
}

/// [`cluster`] with extra arguments for agent `i` from `extra(i)`.
pub fn cluster_with(root: &Path, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Agent> {
    let args = |i: usize| extra(i);
    let a0 = args(0);
    let a0: Vec<&str> = a0.iter().map(String::as_str).collect();
    let first = Agent::start(root, "n0", None, None, &a0);
    let seed = first.quic();
    let token = first.token_file();
    let mut agents = vec![first];
    for i in 1..n {
        let ai = args(i);
        let ai: Vec<&str> = ai.iter().map(String::as_str).collect();
        agents.push(Agent::start(
            root,
            &format!("n{i}"),
            Some(&seed),
            Some(&token),
            &ai,
        ));
    }
    agents
}

/// A QUIC client endpoint on loopback presenting `creds` (call inside a
/// tokio runtime): for tests that talk to agents as a raw peer would.
pub fn quic_client(creds: &shoal_transport::tls::NodeCredentials) -> quinn::Endpoint {
    let tls = creds.client_config().unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep
}

/// Runs `shoal agent --name NAME` on loopback with its data dir at `dir`,
/// joining `seed` with `extra` flags, for an agent expected to exit: its
/// output.
pub fn agent_output(dir: &Path, name: &str, seed: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args([
            "agent",
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .args(["--join", seed])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

/// Every running agent sees `name` in `state`.
pub fn all_see(agents: &[Agent], name: &str, state: &str) -> bool {
    agents
        .iter()
        .filter(|a| a.child.is_some() && a.name != name)
        .all(|a| a.state_of(name).as_deref() == Some(state))
}

/// Processes of `job` really running (the `sleep` of each instance) whose
/// working directory is under `root` (this test's agents, not another
/// test's).
pub fn processes_of(root: &Path, job: &str) -> usize {
    let want = format!("SHOAL_JOB={job}");
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let pid = e.path();
            std::fs::read_to_string(pid.join("comm")).is_ok_and(|c| c.trim() == "sleep")
                && std::fs::read_link(pid.join("cwd")).is_ok_and(|cwd| cwd.starts_with(&root))
                && std::fs::read(pid.join("environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        })
        .count()
}

/// The processes of `job` once at least `n` have started. A slot shows
/// running as soon as its supervisor is spawned, and the task, the
/// supervisor's child, starts a moment later: a count taken right after a
/// slot shows running can miss it (CI, under load, did once). Callers
/// assert the count is exactly `n`.
pub fn processes_once_started(root: &Path, job: &str, n: usize) -> usize {
    wait_until(&format!("{n} processes of {job} to start"), || {
        processes_of(root, job) >= n
    });
    processes_of(root, job)
}

/// A directory every task user can read (what test servers serve),
/// removed however the test ends.
pub struct Site(PathBuf);

impl Site {
    pub fn new(tag: &str) -> Site {
        let dir = PathBuf::from(format!("/tmp/shoal-{tag}-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let perms = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(&dir, perms).unwrap();
        Site(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
