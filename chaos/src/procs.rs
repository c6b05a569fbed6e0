//! Processes under test and what they log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A child process that is killed when dropped.
pub struct Proc {
    /// Name for messages.
    pub name: String,
    /// Where its stderr goes.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.into(),
            log: log.into(),
            child: Some(child),
        })
    }

    /// Wraps a process started elsewhere (by the shared launcher).
    pub fn adopt(name: &str, child: Child, log: &Path) -> Proc {
        Proc {
            name: name.into(),
            log: log.into(),
            child: Some(child),
        }
    }

    /// Process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// Sends `sig` and reaps the process.
    pub fn stop(&mut self, sig: i32) {
        self.signal(sig);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A membership transition a shoal agent logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The member.
    pub node: String,
    /// Its generation.
    pub generation: u64,
    /// New state.
    pub state: String,
    /// When, ms since the epoch.
    pub at_ms: u64,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    Some(
        rest.split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"'),
    )
}

/// Parses the `member state` lines of a shoal agent's log.
pub fn transitions(log: &str) -> Vec<Transition> {
    log.lines()
        .filter(|l| l.contains("member state"))
        .filter_map(|l| {
            Some(Transition {
                node: field(l, "node")?.to_string(),
                generation: field(l, "generation")?.parse().ok()?,
                state: field(l, "state")?.to_string(),
                at_ms: field(l, "at_unix_ms")?.parse().ok()?,
            })
        })
        .collect()
}

/// The latest state of each node in a shoal agent's log.
pub fn latest_states(log_path: &Path) -> HashMap<String, String> {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let mut states = HashMap::new();
    for t in transitions(&log) {
        states.insert(t.node, t.state);
    }
    states
}

/// Polls `cond` every 10 ms until it holds; fails after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running shoal agent of a benchmark or chaos run.
pub struct Agent {
    /// Node name.
    pub name: String,
    /// Its data dir.
    pub dir: PathBuf,
    /// The process.
    pub proc: Proc,
    /// Its QUIC address.
    pub quic: String,
    /// Its HTTP API URL.
    pub http: String,
    /// The token its API requires.
    pub http_token: String,
    /// Its pid.
    pub pid: u32,
}

impl Agent {
    /// Starts `shoal agent` with its data dir under `root`, listening on
    /// 127.0.0.1 ports the OS picks; waits until it serves.
    pub fn start(root: &Path, name: &str, seed: Option<&str>, extra: &[&str]) -> Result<Agent> {
        let dir = root.join(name);
        let log = root.join(format!("{name}.log"));
        let mut launch = shoal::launch::Launch::new(shoal_bin(), name, &dir)
            .logs(&log, &log)
            .args(extra.iter().copied());
        if let Some(seed) = seed {
            launch = launch.join(&[seed.to_string()], &root.join("n0").join("join-token"));
        }
        let mut launched = launch.spawn()?;
        let http_token = launched.api_token()?;
        let child = launched.child.take().context("the agent exited")?;
        Ok(Agent {
            name: name.into(),
            dir,
            pid: child.id(),
            proc: Proc::adopt(name, child, &log),
            quic: launched.info.quic.to_string(),
            http: launched.info.http.clone(),
            http_token,
        })
    }

    /// GET a JSON resource of its API.
    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        ureq::get(&format!("{}{path}", self.http))
            .set("Authorization", &format!("Bearer {}", self.http_token))
            .timeout(Duration::from_secs(10))
            .call()
            .ok()?
            .into_json()
            .ok()
    }

    /// POST a body to its API.
    pub fn post(&self, path: &str, body: &str) -> Result<serde_json::Value> {
        Ok(ureq::post(&format!("{}{path}", self.http))
            .set("Authorization", &format!("Bearer {}", self.http_token))
            .timeout(Duration::from_secs(30))
            .send_string(body)?
            .into_json()?)
    }

    /// Kills the agent and every instance it started, like a machine
    /// losing power.
    pub fn crash(&mut self) {
        self.proc.stop(libc::SIGKILL);
        shoal::driver::exec::kill_instances_under(&self.dir);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.crash();
    }
}

/// Starts `n` agents on loopback: `n0` bootstraps, the others join it.
pub fn start_cluster(root: &Path, n: usize, extra: &[&str]) -> Result<Vec<Agent>> {
    let first = Agent::start(root, "n0", None, extra)?;
    let seed = first.quic.clone();
    let mut agents = vec![first];
    for i in 1..n {
        agents.push(Agent::start(root, &format!("n{i}"), Some(&seed), extra)?);
    }
    Ok(agents)
}

/// Starts `n` agents sharing 127.0.0.1, agent `i` with the host ports
/// `base + i * width` onward (`width` of them, so that copies on two agents
/// never pick one port), and waits until each sees all alive.
pub fn start_ranged_cluster(
    root: &Path,
    n: usize,
    base: usize,
    width: usize,
) -> Result<Vec<Agent>> {
    let range = |i: usize| format!("{}-{}", base + i * width, base + (i + 1) * width - 1);
    let first = Agent::start(root, "n0", None, &["--port-range", &range(0)])?;
    let seed = first.quic.clone();
    let mut agents = vec![first];
    for i in 1..n {
        agents.push(Agent::start(
            root,
            &format!("n{i}"),
            Some(&seed),
            &["--port-range", &range(i)],
        )?);
    }
    wait_all_alive(&agents, Duration::from_secs(300))?;
    Ok(agents)
}

/// Waits until every agent of `agents` sees all of them alive.
pub fn wait_all_alive(agents: &[Agent], limit: Duration) -> Result<Duration> {
    let n = agents.len();
    wait_for("the agents to see each other alive", limit, || {
        agents.iter().all(|a| {
            a.get("/v1/nodes").and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().filter(|m| m["state"] == "alive").count())
            }) == Some(n)
        })
    })
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 0, utime 11, stime 12 (clock ticks).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (tick(11) + tick(12)) / hz.max(1.0)
}

/// A directory under `root` that busybox httpd serves to tasks (`ok` in
/// it answers the benchmarks' checks), readable by the tasks' user.
pub fn served_site(root: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let site = root.join("site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("ok"), "ok\n")?;
    std::fs::set_permissions(&site, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
    Ok(site.display().to_string())
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    shoal::host::rss_kib_of(&pid.to_string())
}

/// The `shoal` binary: `$SHOAL_BIN`, else the workspace's release build.
pub fn shoal_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/shoal")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_transition_lines() {
        let log = "2026-11-21T20:11:36Z  INFO shoal_membership::node: member state node=n3 generation=17 state=dead at_unix_ms=1234\nother\n";
        let t = super::transitions(log);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].node, "n3");
        assert_eq!(t[0].state, "dead");
        assert_eq!(t[0].at_ms, 1234);
        assert_eq!(t[0].generation, 17);
    }
}
