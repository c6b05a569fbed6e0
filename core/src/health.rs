//! Health checks: what a job file asks for (`[[task.check]]`), and the
//! pure state machine that turns a copy's check results into its health.
//!
//! The node holding a copy runs its checks (the shell does the IO and
//! reports each result with [`crate::Scheduler::handle_check`]); the health
//! travels with the copy in gossip, so every node knows which copies serve.
//! A copy's health is `passing` when each of its checks passed `successes`
//! times in a row, `critical` when one failed `failures` times in a row
//! (failures within `grace` of the start are not counted), `unknown`
//! before either. A running copy whose task has no checks is `passing`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Most checks per task.
pub const CHECKS_MAX: usize = 8;
/// Shortest `interval`.
pub const INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Longest `interval`, `timeout` and `grace`.
pub const CHECK_DURATION_MAX: Duration = Duration::from_secs(3600);
/// Largest `failures` and `successes`.
pub const STREAK_MAX: u32 = 100;
/// Longest HTTP `path`.
pub const PATH_LEN_MAX: usize = 1024;
/// Longest failure reason kept (and published) for a check, bytes.
pub const OUTPUT_LEN_MAX: usize = 256;

/// How a check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// An HTTP GET of `path` on the port: passes on 2xx or 3xx.
    Http,
    /// A TCP connect to the port.
    Tcp,
    /// `command` run beside the task (inside the container for docker):
    /// passes on exit 0.
    Exec,
}

/// One `[[task.check]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// A name to show (default: the type and port, `http:web`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `http`, `tcp` or `exec`.
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// The task port probed (a name of `task.ports`; http and tcp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// The HTTP path (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The program an exec check runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Time between two probes (default 10 s).
    #[serde(default = "default_interval", with = "crate::job::humantime_serde_str")]
    pub interval: Duration,
    /// A probe not answered in this long fails (at most the interval;
    /// default 2 s, or the interval if shorter).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::job::humantime_serde_opt"
    )]
    pub timeout: Option<Duration>,
    /// Failures this long after the copy started are not counted (default
    /// 1 s): the time a task needs to start serving.
    #[serde(default = "default_grace", with = "crate::job::humantime_serde_str")]
    pub grace: Duration,
    /// Failures in a row before the check is critical (default 3).
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// Successes in a row before the check is passing (default 1).
    #[serde(default = "default_successes")]
    pub successes: u32,
    /// Restart the copy when the check becomes critical (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_grace() -> Duration {
    Duration::from_secs(1)
}
fn default_failures() -> u32 {
    3
}
fn default_successes() -> u32 {
    1
}

impl CheckSpec {
    /// The timeout: as written, else 2 s or the interval if shorter.
    pub fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| Duration::from_secs(2).min(self.interval))
    }

    /// The name shown: as written, else the type and the port
    /// (`http:web`), or `exec:<command>`.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match self.kind {
            CheckKind::Http => format!("http:{}", self.port.as_deref().unwrap_or("?")),
            CheckKind::Tcp => format!("tcp:{}", self.port.as_deref().unwrap_or("?")),
            CheckKind::Exec => {
                let cmd = self.command.as_deref().unwrap_or("?");
                let base = cmd.rsplit('/').next().unwrap_or(cmd);
                format!("exec:{base}")
            }
        }
    }

    /// The problem with this check of a task with these port names, if
    /// any: (field under `task.check.N`, message).
    pub fn problem<'a>(
        &self,
        mut ports: impl Iterator<Item = &'a String>,
    ) -> Option<(&'static str, String)> {
        if let Some(n) = &self.name {
            if !crate::job::valid_name(n) {
                return Some((
                    "name",
                    format!("`{n}` must be 1 to 63 lower-case letters, digits or '-'"),
                ));
            }
        }
        match self.kind {
            CheckKind::Http | CheckKind::Tcp => {
                let Some(port) = &self.port else {
                    return Some((
                        "port",
                        "an http or tcp check needs `port`, the name of a task port".into(),
                    ));
                };
                if !ports.any(|p| p == port) {
                    return Some((
                        "port",
                        format!("`{port}` names no port of task.ports; add `{port} = 0` there"),
                    ));
                }
                if self.command.is_some() || !self.args.is_empty() {
                    return Some(("command", "only an exec check runs a command".into()));
                }
            }
            CheckKind::Exec => {
                if self.command.as_deref().is_none_or(str::is_empty) {
                    return Some(("command", "an exec check needs a command to run".into()));
                }
                if self.port.is_some() {
                    return Some(("port", "an exec check probes no port".into()));
                }
                if self.args.len() > crate::job::LIST_LEN_MAX {
                    return Some(("args", format!("at most {} args", crate::job::LIST_LEN_MAX)));
                }
            }
        }
        if let Some(path) = &self.path {
            if self.kind != CheckKind::Http {
                return Some(("path", "only an http check takes a path".into()));
            }
            if !path.starts_with('/')
                || path.len() > PATH_LEN_MAX
                || path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Some((
                    "path",
                    format!(
                        "`{path}` must start with '/', hold no spaces and be at most {PATH_LEN_MAX} bytes"
                    ),
                ));
            }
        }
        if self.interval < INTERVAL_MIN || self.interval > CHECK_DURATION_MAX {
            return Some((
                "interval",
                format!(
                    "must be between {}ms and {}s",
                    INTERVAL_MIN.as_millis(),
                    CHECK_DURATION_MAX.as_secs()
                ),
            ));
        }
        if self.timeout().is_zero() || self.timeout() > self.interval {
            return Some((
                "timeout",
                "must be positive and at most the interval".to_string(),
            ));
        }
        if self.grace > CHECK_DURATION_MAX {
            return Some((
                "grace",
                format!("at most {}s", CHECK_DURATION_MAX.as_secs()),
            ));
        }
        for (field, n) in [("failures", self.failures), ("successes", self.successes)] {
            if n == 0 || n > STREAK_MAX {
                return Some((
                    if field == "failures" {
                        "failures"
                    } else {
                        "successes"
                    },
                    format!("must be between 1 and {STREAK_MAX}, not {n}"),
                ));
            }
        }
        None
    }
}

/// One check of one copy as the shell runs it: resolved to an address
/// and a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Its index in the task's checks (reported back with the result).
    pub index: usize,
    /// Its name, for logs.
    pub name: String,
    /// How it probes.
    pub kind: CheckKind,
    /// Where (http and tcp): the node's address and the copy's host port.
    pub addr: Option<std::net::SocketAddr>,
    /// The HTTP path.
    pub path: String,
    /// The program and its arguments (exec), with `${SHOAL_...}` replaced.
    pub command: Vec<String>,
    /// Time between probes.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
}

/// A copy's health.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not known yet: starting, or its checks have not settled.
    #[default]
    Unknown,
    /// Every check passes (or the task has none and it runs).
    Passing,
    /// A check failed `failures` times in a row.
    Critical,
}

impl Health {
    /// `passing`, `critical` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Passing => "passing",
            Health::Critical => "critical",
        }
    }
}

/// `text` on one line without control characters (a check's output is
/// the task's: it must not drive the terminal of whoever reads `status`).
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One check's streaks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Streak {
    status: Health,
    successes: u32,
    failures: u32,
    /// Why it last failed.
    output: Option<String>,
}

/// The health of one running copy: its checks' streaks since it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    started: Instant,
    checks: Vec<Streak>,
    /// Since when the copy has been passing without a break.
    passing_since: Option<Instant>,
}

/// What a result changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The copy's health before.
    pub before: Health,
    /// And after.
    pub after: Health,
    /// The check became critical and asks for a restart.
    pub restart: bool,
}

impl Tracker {
    /// A copy of a task with `checks` that started at `started`.
    pub fn new(checks: usize, started: Instant) -> Tracker {
        Tracker {
            started,
            checks: vec![Streak::default(); checks],
            passing_since: (checks == 0).then_some(started),
        }
    }

    /// Whether the copy has passed without a break for `min` by `now`.
    pub fn passing_for(&self, min: Duration, now: Instant) -> bool {
        self.passing_since
            .is_some_and(|t| now.saturating_duration_since(t) >= min)
    }

    /// The copy's health: critical if a check is, passing if every check
    /// is (and a task without checks), else unknown.
    pub fn health(&self) -> Health {
        if self.checks.iter().any(|c| c.status == Health::Critical) {
            Health::Critical
        } else if self.checks.iter().all(|c| c.status == Health::Passing) {
            Health::Passing
        } else {
            Health::Unknown
        }
    }

    /// Each check's status as two bit masks (bit i: check i): those
    /// passing, and those critical. What a service gated by some of the
    /// checks reads (see [`crate::catalog`]).
    pub fn masks(&self) -> (u8, u8) {
        let mut passing = 0u8;
        let mut critical = 0u8;
        for (i, c) in self.checks.iter().enumerate().take(CHECKS_MAX) {
            match c.status {
                Health::Passing => passing |= 1 << i,
                Health::Critical => critical |= 1 << i,
                Health::Unknown => {}
            }
        }
        (passing, critical)
    }

    /// Why a critical check fails: `name: output` of the first critical
    /// check, bounded.
    pub fn reason(&self, specs: &[CheckSpec]) -> Option<String> {
        self.checks
            .iter()
            .zip(specs)
            .find(|(c, _)| c.status == Health::Critical)
            .map(|(c, s)| {
                crate::gossip::bounded_to(
                    format!(
                        "check {}: {}",
                        s.display_name(),
                        c.output.as_deref().unwrap_or("failed")
                    ),
                    OUTPUT_LEN_MAX,
                )
            })
    }

    /// Takes the result of check `index` (as specified by `spec`) at
    /// `now`: `Ok` passed, `Err(why)` failed. Out-of-range indexes are
    /// ignored.
    pub fn record(
        &mut self,
        index: usize,
        spec: &CheckSpec,
        result: Result<(), String>,
        now: Instant,
    ) -> Change {
        let before = self.health();
        let in_grace = now.saturating_duration_since(self.started) < spec.grace;
        let mut restart = false;
        if let Some(c) = self.checks.get_mut(index) {
            match result {
                Ok(()) => {
                    c.failures = 0;
                    c.successes = c.successes.saturating_add(1);
                    if c.successes >= spec.successes {
                        c.status = Health::Passing;
                        c.output = None;
                    }
                }
                Err(why) if !in_grace => {
                    c.successes = 0;
                    c.failures = c.failures.saturating_add(1);
                    c.output = Some(crate::gossip::bounded_to(printable(&why), OUTPUT_LEN_MAX));
                    if c.failures >= spec.failures {
                        restart = spec.restart && c.status != Health::Critical;
                        c.status = Health::Critical;
                    }
                }
                Err(_) => {
                    // Within the grace: neither counted nor a success.
                    c.successes = 0;
                }
            }
        }
        let after = self.health();
        if after != Health::Passing {
            self.passing_since = None;
        } else if self.passing_since.is_none() {
            self.passing_since = Some(now);
        }
        Change {
            before,
            after,
            restart,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The origin of a test's time (an `Instant` only comes from the clock).
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    fn spec(failures: u32, successes: u32, grace_ms: u64, restart: bool) -> CheckSpec {
        CheckSpec {
            name: None,
            kind: CheckKind::Tcp,
            port: Some("web".into()),
            path: None,
            command: None,
            args: Vec::new(),
            interval: Duration::from_secs(1),
            timeout: Some(Duration::from_millis(500)),
            grace: Duration::from_millis(grace_ms),
            failures,
            successes,
            restart,
        }
    }

    #[test]
    fn streaks_decide_passing_and_critical() {
        let t0 = origin();
        let s = spec(2, 2, 0, false);
        let mut t = Tracker::new(1, t0);
        assert_eq!(t.health(), Health::Unknown);
        assert_eq!(t.record(0, &s, Ok(()), t0).after, Health::Unknown);
        assert_eq!(t.record(0, &s, Ok(()), t0).after, Health::Passing);
        // One failure is not enough; a success in between resets it.
        assert_eq!(
            t.record(0, &s, Err("refused".into()), t0).after,
            Health::Passing
        );
        t.record(0, &s, Ok(()), t0);
        assert_eq!(
            t.record(0, &s, Err("refused".into()), t0).after,
            Health::Passing
        );
        let c = t.record(0, &s, Err("refused".into()), t0);
        assert_eq!(
            (c.before, c.after, c.restart),
            (Health::Passing, Health::Critical, false)
        );
        assert_eq!(
            t.reason(std::slice::from_ref(&s)).as_deref(),
            Some("check tcp:web: refused")
        );
        // Back to passing takes `successes` in a row.
        assert_eq!(t.record(0, &s, Ok(()), t0).after, Health::Critical);
        assert_eq!(t.record(0, &s, Ok(()), t0).after, Health::Passing);
        assert_eq!(t.reason(&[s]), None);
    }

    #[test]
    fn failures_in_the_grace_do_not_count() {
        let t0 = origin();
        let s = spec(1, 1, 5_000, true);
        let mut t = Tracker::new(1, t0);
        let c = t.record(0, &s, Err("down".into()), t0 + Duration::from_secs(4));
        assert_eq!((c.after, c.restart), (Health::Unknown, false));
        let c = t.record(0, &s, Err("down".into()), t0 + Duration::from_secs(5));
        assert_eq!((c.after, c.restart), (Health::Critical, true));
        // Still critical: no second restart asked for.
        let c = t.record(0, &s, Err("down".into()), t0 + Duration::from_secs(6));
        assert!(!c.restart);
    }

    #[test]
    fn the_worst_check_decides_and_no_checks_is_passing() {
        let t0 = origin();
        assert_eq!(Tracker::new(0, t0).health(), Health::Passing);
        let s = spec(1, 1, 0, false);
        let mut t = Tracker::new(2, t0);
        t.record(0, &s, Ok(()), t0);
        assert_eq!(t.health(), Health::Unknown);
        t.record(1, &s, Err("x".into()), t0);
        assert_eq!(t.health(), Health::Critical);
        // An index beyond the checks changes nothing.
        let c = t.record(7, &s, Ok(()), t0);
        assert_eq!(c.before, c.after);
    }
}
