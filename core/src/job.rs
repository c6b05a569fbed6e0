//! Job files: the TOML a user submits, parsed, validated and turned into
//! the placement requests of its slots.
//!
//! Every error names the field and the line, and unknown fields are
//! rejected (a typo must not silently drop a setting).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_placement::{Affinity, Constraint, Op, Resources, SlotRequest, Spread};

/// Largest job file accepted, bytes.
pub const JOB_FILE_LEN_MAX: usize = 1024 * 1024;
/// Longest job name.
pub const NAME_LEN_MAX: usize = 63;
/// Most replicas of one job.
pub const REPLICAS_MAX: u32 = 100_000;
/// Most CPU one instance may reserve, millicores (a thousand cores).
pub const CPU_MILLIS_MAX: u64 = 1_000_000;
/// Most memory one instance may reserve, MiB (64 TiB).
pub const MEMORY_MIB_MAX: u64 = 64 * 1024 * 1024;
/// Most args, env entries, ports, constraints or affinities.
pub const LIST_LEN_MAX: usize = 256;

/// Kinds of job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// `replicas` long-running instances, restarted when they exit.
    Service,
    /// `replicas` instances run to completion; a completed slot never runs again.
    Batch,
    /// One instance on every node that meets the job's constraints and
    /// fits it; no `replicas`.
    System,
    /// A batch run on a schedule (`[cron]`): each scheduled time starts
    /// one child batch job, `NAME@<unix-seconds>`.
    Cron,
}

/// What a side of a partition does about copies it cannot see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionPolicy {
    /// Every side re-places the copies it lost (most available; a slot may
    /// run on both sides until the partition heals).
    Replace,
    /// Only a side that sees a majority of the members re-places or
    /// starts copies; a minority keeps what runs and starts nothing new
    /// (no batch slot run twice, no cron time fired twice).
    Majority,
    /// Lost copies are not replaced until their node comes back or is
    /// forgotten (`shoal node forget`): a slot never runs twice.
    Never,
}

/// A job as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique job name: lower-case letters, digits and '-'.
    pub name: String,
    /// `service` or `batch`.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Number of slots.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// What each slot runs.
    pub task: TaskSpec,
    /// Hard label rules on nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<ConstraintSpec>,
    /// Soft label preferences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinities: Vec<AffinitySpec>,
    /// Put each replica on a different node.
    #[serde(default)]
    pub distinct_hosts: bool,
    /// Spread replicas evenly over the values of a node label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadSpec>,
    /// What to do when an instance exits or fails.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How a new version replaces the running copies (services).
    #[serde(default, skip_serializing_if = "crate::update::UpdateSpec::is_default")]
    pub update: crate::update::UpdateSpec,
    /// When a cron job runs (`[cron]`; cron jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<crate::cron::CronSpec>,
    /// What a side of a network partition does (`replace`, `majority` or
    /// `never`). Today only cron jobs take one: `majority` (the default)
    /// fires a time only on a side that sees a majority, `replace` on every
    /// side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionPolicy>,
    /// The cron job a run (`NAME@<unix-seconds>`) belongs to; set by
    /// shoal, never in a job file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// What the job serves (`[[service]]`): named ports other jobs and
    /// clients find in the catalog, by DNS and through the routing mesh
    /// (see [`crate::catalog`]).
    #[serde(default, rename = "service", skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<crate::catalog::ServiceSpec>,
    /// Services the job's copies use: each copy gets
    /// `SHOAL_SERVICE_<NAME>=host:port` of a passing instance when it
    /// starts (one on its own node first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
    /// Webhooks told (a JSON POST) when a slot of the job fails for good,
    /// restarts past the agents' threshold, or its deployment fails or is
    /// reverted; beside the agents' `--notify-webhook`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
}

/// Webhooks one job may name.
pub const NOTIFY_MAX: usize = 4;
/// Longest webhook URL.
pub const NOTIFY_URL_LEN_MAX: usize = 512;

/// Why `url` cannot be a webhook: it must be an `http://` or `https://`
/// URL with a host, at most [`NOTIFY_URL_LEN_MAX`] bytes of printable
/// ASCII.
pub fn webhook_problem(url: &str) -> Option<String> {
    if url.len() > NOTIFY_URL_LEN_MAX {
        return Some(format!(
            "a webhook URL is at most {NOTIFY_URL_LEN_MAX} bytes"
        ));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(
            "a webhook URL is printable ASCII with no spaces (percent-encode the rest)".into(),
        );
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        None => Some(format!("`{url}` is not an http:// or https:// URL")),
        Some(r)
            if r.split(['/', '?', '#'])
                .next()
                .is_none_or(|h| h.is_empty() || h.starts_with(':')) =>
        {
            Some(format!("`{url}` names no host"))
        }
        Some(_) => None,
    }
}

fn default_replicas() -> u32 {
    1
}

/// The task of every slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// `exec` (a process) or `docker` (a container).
    #[serde(default = "default_driver")]
    pub driver: String,
    /// Program to run (exec), or the container command (docker).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Resources each instance reserves.
    #[serde(default)]
    pub resources: ResourceSpec,
    /// Named host ports (name -> port number) the instance binds; `0` asks
    /// the node for a free one from its `--port-range`. The instance finds
    /// each in `SHOAL_PORT_<NAME>` (and `ip:port` in `SHOAL_ADDR_<NAME>`),
    /// and `command`, `args` and `env` values may say `${SHOAL_PORT_<NAME>}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Container image (docker driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Container port of each named port (docker driver): `http = 80` maps
    /// the slot's host port `ports.http` to port 80 inside the container.
    /// A named port without one maps to the same number inside.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub container_ports: BTreeMap<String, u16>,
    /// When to pull the image (docker driver): `missing` (default),
    /// `always` or `never`.
    #[serde(default, skip_serializing_if = "is_default_pull")]
    pub pull: PullPolicy,
    /// The user an exec task runs as (a name on the node, or `root`)
    /// [default: the node's `--task-user`, `nobody` where the agent runs
    /// as root].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The signal that asks an instance to stop (`SIGTERM` when absent;
    /// one of [`KILL_SIGNALS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_signal: Option<String>,
    /// How long a stopping instance has after that signal before it is
    /// killed (the node's default, 5 s, when absent; at most
    /// [`KILL_TIMEOUT_MAX`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde_opt"
    )]
    pub kill_timeout: Option<Duration>,
    /// How long a copy being stopped is shown stopping (out of every
    /// node's list of serving copies) before its stop signal, so traffic
    /// can leave it first (none when absent; at most [`KILL_TIMEOUT_MAX`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde_opt"
    )]
    pub shutdown_delay: Option<Duration>,
    /// Health checks (`[[task.check]]`), run by the node holding a copy.
    #[serde(default, rename = "check", skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::health::CheckSpec>,
}

/// Signals a task may be asked to stop with.
pub const KILL_SIGNALS: [&str; 7] = [
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH",
];

/// Longest `kill_timeout`: a stopping copy holds its slot's resources and
/// ports until it is gone.
pub const KILL_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// Whether `user` is a plausible user name (1 to 32 of lower-case letters,
/// digits, '_', '.' or '-', starting with a letter or '_').
pub fn valid_user(user: &str) -> bool {
    (1..=32).contains(&user.len())
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
}

/// When to pull a task's image (docker driver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only if the image is not present (the default).
    #[default]
    Missing,
    /// Pull before every start.
    Always,
    /// Never pull: a missing image fails the slot.
    Never,
}

fn is_default_pull(p: &PullPolicy) -> bool {
    *p == PullPolicy::default()
}

fn default_driver() -> String {
    "exec".into()
}

/// Resources of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// CPU in millicores.
    #[serde(default = "default_cpu")]
    pub cpu: u64,
    /// Memory in MiB.
    #[serde(default = "default_memory")]
    pub memory: u64,
}

fn default_cpu() -> u64 {
    100
}
fn default_memory() -> u64 {
    64
}

impl Default for ResourceSpec {
    fn default() -> Self {
        ResourceSpec {
            cpu: default_cpu(),
            memory: default_memory(),
        }
    }
}

/// A label rule: `{ label = "zone", op = "in", values = ["a", "b"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintSpec {
    /// Node label key.
    pub label: String,
    /// `=`, `!=`, `in`, `not in` or `exists`.
    #[serde(default = "default_op")]
    pub op: String,
    /// The value, for `=` and `!=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The values, for `in` and `not in`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

fn default_op() -> String {
    "=".into()
}

/// A soft preference: a label rule and a weight from -100 to 100.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinitySpec {
    /// Node label key.
    pub label: String,
    /// As for constraints.
    #[serde(default = "default_op")]
    pub op: String,
    /// As for constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// As for constraints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Positive attracts, negative repels.
    pub weight: i32,
}

/// Spread over a label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpreadSpec {
    /// Node label key, e.g. `zone`.
    pub label: String,
    /// Largest allowed difference in replicas between two label values.
    #[serde(default = "default_skew")]
    pub max_skew: u32,
}

fn default_skew() -> u32 {
    1
}

/// Restarts with exponential backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts of one slot on one node before it is failed there (a
    /// service slot failed on a node is placed elsewhere; a batch slot's
    /// retries).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First backoff, e.g. "1s".
    #[serde(default = "default_delay", with = "humantime_serde_str")]
    pub delay: Duration,
    /// Backoff ceiling, e.g. "30s".
    #[serde(default = "default_max_delay", with = "humantime_serde_str")]
    pub max_delay: Duration,
}

fn default_attempts() -> u32 {
    5
}
/// The longest restart backoff a job may ask for.
pub const RESTART_DELAY_MAX: Duration = Duration::from_secs(24 * 3600);

fn default_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_max_delay() -> Duration {
    Duration::from_secs(30)
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            attempts: default_attempts(),
            delay: default_delay(),
            max_delay: default_max_delay(),
        }
    }
}

impl RestartPolicy {
    /// Backoff before restart number `n` (0-based): `delay * 2^n`, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        self.delay.saturating_mul(factor).min(self.max_delay)
    }
}

pub(crate) mod humantime_serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration like \"500ms\" or \"30s\": {e}"
            ))
        })
    }
}

pub(crate) mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::humantime_serde_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::humantime_serde_str::deserialize(d).map(Some)
    }
}

/// A problem with a job file: what, where, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct JobError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted field path, when known (e.g. `task.resources.cpu`).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

fn line_at(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The dotted path of the innermost key whose value is written at byte
/// `at` (`task.resources.cpu`, `constraints.0.op`), if any.
fn path_at(text: &str, at: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn walk(value: &DeValue<'_>, at: usize, path: &mut Vec<String>) {
        match value {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    let span = v.span();
                    if span.start <= at && at < span.end.max(span.start + 1) {
                        path.push(k.get_ref().to_string());
                        walk(v.get_ref(), at, path);
                        return;
                    }
                }
            }
            DeValue::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let span = v.span();
                    if span.start <= at && at < span.end.max(span.start + 1) {
                        if matches!(v.get_ref(), DeValue::Table(_)) {
                            path.push(i.to_string());
                        }
                        walk(v.get_ref(), at, path);
                        return;
                    }
                }
            }
            _ => {}
        }
    }
    let doc = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    walk(&DeValue::Table(doc.get_ref().clone()), at, &mut path);
    (!path.is_empty()).then(|| path.join("."))
}

/// serde's "invalid type: string \"three\", expected u32" in words a user
/// of a job file knows: "expected an integer, found the string \"three\"".
fn plain_type_error(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_string();
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected.trim() {
        "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" | "usize" => "an integer",
        "a sequence" => "an array",
        "a map" => "a table",
        "a boolean" => "true or false",
        other => other,
    };
    let found = if let Some(s) = found.strip_prefix("string ") {
        format!("the string {s}")
    } else if let Some(i) = found.strip_prefix("integer ") {
        format!("the integer {}", i.trim_matches('`'))
    } else if let Some(b) = found.strip_prefix("boolean ") {
        format!("the boolean {}", b.trim_matches('`'))
    } else if let Some(f) = found.strip_prefix("floating point ") {
        format!("the number {}", f.trim_matches('`'))
    } else {
        match found {
            "sequence" => "an array".to_string(),
            "map" => "a table".to_string(),
            other => other.to_string(),
        }
    };
    format!("expected {expected}, found {found}")
}

/// The line where the value of `path` is written, if it is.
fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut span = None;
    for (i, key) in path.iter().enumerate() {
        let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *key)?;
        span = Some(value.span());
        if i + 1 < path.len() {
            match value.get_ref() {
                DeValue::Table(t) => table = t,
                _ => return None,
            }
        }
    }
    span.map(|s| line_at(text, s.start))
}

fn invalid(text: &str, path: &str, message: impl Into<String>) -> JobError {
    let parts: Vec<&str> = path.split('.').collect();
    // Fall back to the enclosing table when the field itself is absent.
    let line = (1..=parts.len())
        .rev()
        .find_map(|n| line_of(text, &parts[..n]));
    JobError {
        line,
        field: Some(path.to_string()),
        message: format!("{path}: {}", message.into()),
    }
}

/// Whether `s` names a job: a name a user may give, or a cron job's run
/// (`NAME@<unix-seconds>`).
pub fn valid_job_name(s: &str) -> bool {
    valid_name(s) || crate::cron::parse_child(s).is_some_and(|(p, _)| valid_name(p))
}

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= NAME_LEN_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn to_op(
    text: &str,
    path: &str,
    op: &str,
    value: &Option<String>,
    values: &[String],
) -> Result<Op, JobError> {
    let need_value = |v: &Option<String>| {
        v.clone()
            .ok_or_else(|| invalid(text, path, format!("op \"{op}\" needs `value = \"...\"`")))
    };
    let need_values = || {
        if values.is_empty() {
            Err(invalid(
                text,
                path,
                format!("op \"{op}\" needs `values = [\"...\"]`"),
            ))
        } else {
            Ok(values.to_vec())
        }
    };
    Ok(match op {
        "=" | "==" => Op::Eq(need_value(value)?),
        "!=" => Op::Ne(need_value(value)?),
        "in" => Op::In(need_values()?),
        "not in" | "not_in" => Op::NotIn(need_values()?),
        "exists" => Op::Exists,
        other => {
            return Err(invalid(
                text,
                path,
                format!(
                "unknown op \"{other}\"; use one of \"=\", \"!=\", \"in\", \"not in\", \"exists\""
            ),
            ))
        }
    })
}

impl JobSpec {
    /// How many slots the job itself has: its replicas, but none for a
    /// cron job (its `replicas` are each run's, and its runs are batch
    /// jobs of their own).
    pub fn slots(&self) -> u32 {
        if self.job_type == JobType::Cron {
            0
        } else {
            self.replicas
        }
    }

    /// The job's partition policy: its own, else its type's default.
    pub fn partition_policy(&self) -> PartitionPolicy {
        self.partition.unwrap_or(match self.job_type {
            JobType::Service | JobType::System => PartitionPolicy::Replace,
            JobType::Batch | JobType::Cron => PartitionPolicy::Majority,
        })
    }

    /// Parses and validates a job file.
    pub fn parse(text: &str) -> Result<JobSpec, JobError> {
        if text.len() > JOB_FILE_LEN_MAX {
            return Err(JobError {
                line: None,
                field: None,
                message: format!(
                    "job file is {} bytes; the limit is {JOB_FILE_LEN_MAX}",
                    text.len()
                ),
            });
        }
        let mut spec: JobSpec = toml::from_str(text).map_err(|e| {
            let field = e.span().and_then(|s| path_at(text, s.start));
            let message = plain_type_error(e.message().trim());
            JobError {
                line: e.span().map(|s| line_at(text, s.start)),
                message: match &field {
                    Some(f) if !message.contains(f.as_str()) => format!("{f}: {message}"),
                    _ => message,
                },
                field,
            }
        })?;
        if spec.partition == Some(PartitionPolicy::Never)
            && spec.update.order == crate::update::Order::StartFirst
        {
            // A `never` job updates stop-first (a start-first update runs
            // two copies of a slot at once); said outright, start-first is
            // refused rather than changed.
            let explicit = toml::from_str::<toml::Value>(text).is_ok_and(|v| {
                v.get("update")
                    .and_then(|u| u.get("order"))
                    .is_some_and(|o| o.as_str() == Some("start-first"))
            });
            if explicit {
                return Err(invalid(
                    text,
                    "update.order",
                    "a job with `partition = \"never\"` never runs two copies of a slot, so it updates `stop-first`: remove `order` or set it to \"stop-first\"",
                ));
            }
            spec.update.order = crate::update::Order::StopFirst;
        }
        spec.validate(text)?;
        Ok(spec)
    }

    /// Checks the limits and consistency rules; `text` locates errors.
    pub fn validate(&self, text: &str) -> Result<(), JobError> {
        if let Some(parent) = &self.parent {
            // A cron job's run: named after its parent and time, a batch job.
            let ok = valid_name(parent)
                && self.job_type == JobType::Batch
                && crate::cron::parse_child(&self.name).is_some_and(|(p, _)| p == parent);
            if !ok {
                return Err(invalid(
                    text,
                    "parent",
                    "only shoal sets `parent`, on the runs of a cron job: remove it",
                ));
            }
        } else if !valid_name(&self.name) {
            return Err(invalid(text, "name", format!("`{}` must be 1 to {NAME_LEN_MAX} lower-case letters, digits or '-', not starting with '-'", self.name)));
        }
        match self.job_type {
            JobType::Service | JobType::Batch => {}
            JobType::System => {
                if self.replicas != 1 {
                    return Err(invalid(
                        text,
                        "replicas",
                        "a system job runs one instance on every node that meets its constraints and fits it: remove `replicas` (use constraints to pick the nodes)",
                    ));
                }
                if self.spread.is_some() {
                    return Err(invalid(
                        text,
                        "spread",
                        "a system job runs on every node that qualifies: it has nothing to spread",
                    ));
                }
                if self.update.canary > 0 {
                    return Err(invalid(
                        text,
                        "update.canary",
                        "a system job's update rolls node by node; canaries are for services",
                    ));
                }
            }
            JobType::Cron => match &self.cron {
                None => {
                    return Err(invalid(
                        text,
                        "type",
                        "a cron job needs a [cron] table with its schedule, e.g. `[cron]` then `schedule = \"*/5 * * * *\"`",
                    ))
                }
                Some(c) => {
                    if let Err((field, why)) = c.validate() {
                        return Err(invalid(text, &field, why));
                    }
                    if self.update.canary > 0 {
                        return Err(invalid(
                            text,
                            "update.canary",
                            "a cron job's runs are batch jobs: they have no canaries",
                        ));
                    }
                }
            },
        }
        match (self.partition, self.job_type) {
            (None, _) | (Some(PartitionPolicy::Replace | PartitionPolicy::Majority), JobType::Cron) => {}
            (Some(_), JobType::Cron) => {
                return Err(invalid(
                    text,
                    "partition",
                    "a cron job takes `majority` (the default: only a side that sees a majority fires a time) or `replace` (every side fires)",
                ))
            }
            (Some(PartitionPolicy::Replace | PartitionPolicy::Majority), _) => {}
            (Some(PartitionPolicy::Never), JobType::System) => {
                return Err(invalid(
                    text,
                    "partition",
                    "a system job runs one copy on every node, each node its own: `never` is for services and batch jobs; use `replace` (the default) or `majority`",
                ))
            }
            (Some(PartitionPolicy::Never), _) => {
                if self.update.order != crate::update::Order::StopFirst {
                    return Err(invalid(
                        text,
                        "update.order",
                        "a job with `partition = \"never\"` never runs two copies of a slot, so it updates `stop-first`",
                    ));
                }
                if self.update.canary > 0 {
                    return Err(invalid(
                        text,
                        "update.canary",
                        "a job with `partition = \"never\"` updates stop-first, slot by slot: it takes no canaries",
                    ));
                }
            }
        }
        if self.cron.is_some() && self.job_type != JobType::Cron {
            return Err(invalid(
                text,
                "cron",
                "only `type = \"cron\"` jobs take a [cron] table",
            ));
        }
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            return Err(invalid(
                text,
                "replicas",
                format!(
                    "must be between 1 and {REPLICAS_MAX}, not {}",
                    self.replicas
                ),
            ));
        }
        let t = &self.task;
        match t.driver.as_str() {
            "exec" => {
                if t.command.is_empty() {
                    return Err(invalid(
                        text,
                        "task.command",
                        "the exec driver needs a command to run",
                    ));
                }
                if t.image.is_some() {
                    return Err(invalid(
                        text,
                        "task.image",
                        "only the docker driver takes an image",
                    ));
                }
                if !t.container_ports.is_empty() {
                    return Err(invalid(
                        text,
                        "task.container_ports",
                        "only the docker driver takes container ports",
                    ));
                }
                if let Some(u) = t.user.as_deref().filter(|u| !valid_user(u)) {
                    return Err(invalid(
                        text,
                        "task.user",
                        format!("`{u}` is not a user name (1 to 32 lower-case letters, digits, '_', '.' or '-')"),
                    ));
                }
            }
            "docker" => {
                if t.user.is_some() {
                    return Err(invalid(
                        text,
                        "task.user",
                        "the docker driver runs the image's user; set it in the image",
                    ));
                }
                if t.image.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(
                        text,
                        "task.image",
                        "the docker driver needs an image",
                    ));
                }
                if let Some(name) = t.container_ports.keys().find(|n| !t.ports.contains_key(*n)) {
                    return Err(invalid(
                        text,
                        &format!("task.container_ports.{name}"),
                        format!("names no port of task.ports; add `{name} = <host port>` there"),
                    ));
                }
                if let Some((name, _)) = t.container_ports.iter().find(|(_, p)| **p == 0) {
                    return Err(invalid(
                        text,
                        &format!("task.container_ports.{name}"),
                        "port 0 is not a container port",
                    ));
                }
            }
            "hollow" => {}
            other => {
                return Err(invalid(
                    text,
                    "task.driver",
                    format!("unknown driver \"{other}\"; use \"exec\" or \"docker\""),
                ))
            }
        }
        if t.args.len() > LIST_LEN_MAX || t.env.len() > LIST_LEN_MAX || t.ports.len() > LIST_LEN_MAX
        {
            return Err(invalid(
                text,
                "task",
                format!("at most {LIST_LEN_MAX} args, env entries and ports"),
            ));
        }
        if t.resources.cpu == 0 || t.resources.memory == 0 {
            return Err(invalid(
                text,
                "task.resources",
                "cpu (millicores) and memory (MiB) must be at least 1",
            ));
        }
        if t.resources.cpu > CPU_MILLIS_MAX || t.resources.memory > MEMORY_MIB_MAX {
            return Err(invalid(
                text,
                "task.resources",
                format!(
                    "at most {CPU_MILLIS_MAX} millicores and {MEMORY_MIB_MAX} MiB per instance"
                ),
            ));
        }
        // `0` asks the node for a free port from its range.
        let mut vars_of_ports = std::collections::BTreeMap::new();
        for name in t.ports.keys() {
            if !crate::ports::valid_port_name(name) {
                return Err(invalid(
                    text,
                    &format!("task.ports.{name}"),
                    format!(
                        "`{name}` cannot name a port: use 1 to {} letters, digits, '_' or '-', starting with a letter",
                        crate::ports::PORT_NAME_LEN_MAX
                    ),
                ));
            }
            let var = crate::ports::port_var(name);
            if let Some(other) = vars_of_ports.insert(var.clone(), name) {
                return Err(invalid(
                    text,
                    &format!("task.ports.{name}"),
                    format!("`{name}` and `{other}` would both be ${var}: rename one"),
                ));
            }
        }
        let known = crate::ports::known_vars(t.ports.keys());
        let fields = std::iter::once(("task.command".to_string(), &t.command))
            .chain(t.args.iter().map(|a| ("task.args".to_string(), a)))
            .chain(t.env.iter().map(|(k, v)| (format!("task.env.{k}"), v)))
            .chain(t.checks.iter().enumerate().flat_map(|(i, c)| {
                c.command
                    .iter()
                    .chain(&c.args)
                    .map(move |a| (format!("task.check.{i}.command"), a))
            }));
        for (field, value) in fields {
            if let Some(r) = crate::ports::references(value)
                .into_iter()
                .find(|r| !known.contains(*r))
            {
                let hint = if r.starts_with("SHOAL_PORT_") || r.starts_with("SHOAL_ADDR_") {
                    "it names no port of task.ports"
                } else {
                    "known: SHOAL_JOB, SHOAL_SLOT, SHOAL_NODE, SHOAL_PORT_<NAME> and SHOAL_ADDR_<NAME> of task.ports"
                };
                return Err(invalid(
                    text,
                    &field,
                    format!("unknown variable ${{{r}}}: {hint}"),
                ));
            }
        }
        if self.constraints.len() > LIST_LEN_MAX || self.affinities.len() > LIST_LEN_MAX {
            return Err(invalid(
                text,
                "constraints",
                format!("at most {LIST_LEN_MAX} constraints and affinities"),
            ));
        }
        self.placement_rules(text)?;
        if let Some(s) = &self.spread {
            if s.max_skew == 0 {
                return Err(invalid(text, "spread.max_skew", "must be at least 1"));
            }
        }
        if let Some(sig) = t.kill_signal.as_deref() {
            if !KILL_SIGNALS.contains(&sig) {
                return Err(invalid(
                    text,
                    "task.kill_signal",
                    format!(
                        "`{sig}` is not a stop signal; use one of {}",
                        KILL_SIGNALS.join(", ")
                    ),
                ));
            }
        }
        if t.kill_timeout.is_some_and(|d| d > KILL_TIMEOUT_MAX) {
            return Err(invalid(
                text,
                "task.kill_timeout",
                format!("at most {}s", KILL_TIMEOUT_MAX.as_secs()),
            ));
        }
        if t.shutdown_delay.is_some_and(|d| d > KILL_TIMEOUT_MAX) {
            return Err(invalid(
                text,
                "task.shutdown_delay",
                format!("at most {}s", KILL_TIMEOUT_MAX.as_secs()),
            ));
        }
        if t.checks.len() > crate::health::CHECKS_MAX {
            return Err(invalid(
                text,
                "task.check",
                format!("at most {} checks", crate::health::CHECKS_MAX),
            ));
        }
        let mut check_names = std::collections::BTreeSet::new();
        for (i, c) in t.checks.iter().enumerate() {
            if let Some((field, message)) = c.problem(t.ports.keys()) {
                return Err(invalid(text, &format!("task.check.{i}.{field}"), message));
            }
            if c.kind == crate::health::CheckKind::Exec && t.driver == "hollow" {
                return Err(invalid(
                    text,
                    &format!("task.check.{i}.type"),
                    "the hollow driver runs no commands",
                ));
            }
            if !check_names.insert(c.display_name()) {
                return Err(invalid(
                    text,
                    &format!("task.check.{i}.name"),
                    format!(
                        "two checks are called `{}`: give one a `name`",
                        c.display_name()
                    ),
                ));
            }
        }
        self.check_services(text)?;
        if self.notify.len() > NOTIFY_MAX {
            return Err(invalid(
                text,
                "notify",
                format!("at most {NOTIFY_MAX} webhooks"),
            ));
        }
        if let Some(p) = self.notify.iter().find_map(|u| webhook_problem(u)) {
            return Err(invalid(text, "notify", p));
        }
        if let Some((field, message)) = self.update.problem() {
            return Err(invalid(text, &format!("update.{field}"), message));
        }
        if self.restart.delay.is_zero() || self.restart.max_delay < self.restart.delay {
            return Err(invalid(
                text,
                "restart",
                "delay must be positive and max_delay at least delay",
            ));
        }
        if self.restart.max_delay > RESTART_DELAY_MAX {
            // A job file with `delay = "500000000000years"` once overflowed
            // every agent's clock arithmetic; a bound keeps every sum of
            // an instant and a backoff far from the limits.
            return Err(invalid(
                text,
                "restart",
                format!(
                    "delay and max_delay must be at most {}s (one day)",
                    RESTART_DELAY_MAX.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// `[[service]]` and `uses`.
    fn check_services(&self, text: &str) -> Result<(), JobError> {
        use crate::catalog::{valid_service_name, SERVICES_MAX, USES_MAX};
        if !self.services.is_empty() && !matches!(self.job_type, JobType::Service | JobType::System)
        {
            return Err(invalid(
                text,
                "service",
                "only service and system jobs serve: a batch or cron job's copies end",
            ));
        }
        if self.services.len() > SERVICES_MAX {
            return Err(invalid(
                text,
                "service",
                format!("at most {SERVICES_MAX} services per job"),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            if let Some((field, message)) = svc.problem(&self.task) {
                return Err(invalid(text, &format!("service.{i}.{field}"), message));
            }
            if let Some(p) = svc.ingress_port.filter(|p| {
                self.services[..i]
                    .iter()
                    .any(|o| o.ingress_port == Some(*p))
            }) {
                return Err(invalid(
                    text,
                    &format!("service.{i}.ingress_port"),
                    format!("ingress port {p} is declared twice: give each service its own"),
                ));
            }
            if !names.insert(svc.name.as_str()) {
                return Err(invalid(
                    text,
                    &format!("service.{i}.name"),
                    format!("the job declares `{}` twice", svc.name),
                ));
            }
        }
        if self.uses.len() > USES_MAX {
            return Err(invalid(
                text,
                "uses",
                format!("at most {USES_MAX} services"),
            ));
        }
        let mut used = std::collections::BTreeSet::new();
        for u in &self.uses {
            if !valid_service_name(u) {
                return Err(invalid(
                    text,
                    "uses",
                    format!(
                        "`{}` is not a service name (lower-case letters, digits and '-')",
                        u.escape_debug()
                    ),
                ));
            }
            if !used.insert(u.as_str()) {
                return Err(invalid(text, "uses", format!("`{u}` is listed twice")));
            }
        }
        Ok(())
    }

    fn placement_rules(&self, text: &str) -> Result<(Vec<Constraint>, Vec<Affinity>), JobError> {
        let mut constraints = Vec::new();
        for c in &self.constraints {
            let op = to_op(text, "constraints", &c.op, &c.value, &c.values)?;
            constraints.push(Constraint {
                label: c.label.clone(),
                op,
            });
        }
        let mut affinities = Vec::new();
        for a in &self.affinities {
            if !(-100..=100).contains(&a.weight) {
                return Err(invalid(
                    text,
                    "affinities",
                    format!("weight {} is outside -100..=100", a.weight),
                ));
            }
            let op = to_op(text, "affinities", &a.op, &a.value, &a.values)?;
            affinities.push(Affinity {
                constraint: Constraint {
                    label: a.label.clone(),
                    op,
                },
                weight: a.weight,
            });
        }
        Ok((constraints, affinities))
    }

    /// The placement request of slot `slot`.
    pub fn slot_request(&self, slot: u32) -> SlotRequest {
        let (constraints, affinities) = self.placement_rules("").unwrap_or_default();
        SlotRequest {
            job: self.name.clone(),
            slot,
            resources: Resources {
                cpu_millis: self.task.resources.cpu,
                memory_mib: self.task.resources.memory,
            },
            driver: self.task.driver.clone(),
            constraints,
            // Dynamic ports (0) are the holder's to choose, from its range.
            ports: self
                .task
                .ports
                .values()
                .copied()
                .filter(|p| *p != 0)
                .collect(),
            distinct_hosts: self.distinct_hosts,
            spread: self.spread.as_ref().map(|s| Spread {
                label: s.label.clone(),
                max_skew: s.max_skew,
            }),
            affinities,
            avoid: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn webhooks_are_http_urls_with_a_host_and_bounded() {
        for ok in [
            "http://127.0.0.1:9/x",
            "https://hooks.example.com/services/T0/B0?x=1",
        ] {
            assert_eq!(webhook_problem(ok), None, "{ok}");
        }
        for bad in [
            "ftp://x",
            "http://",
            "https:///path",
            "http://a b",
            "http://:80/",
            "x",
        ] {
            assert!(webhook_problem(bad).is_some(), "{bad}");
        }
        assert!(webhook_problem(&format!("http://a/{}", "x".repeat(NOTIFY_URL_LEN_MAX))).is_some());
        let job = |notify: &str| {
            JobSpec::parse(&format!(
                "name = \"a\"\ntype = \"batch\"\nnotify = [{notify}]\n[task]\ncommand = \"true\"\n"
            ))
        };
        assert!(job("\"http://h/1\"").is_ok());
        assert!(job("\"mailto:x@y\"").is_err());
        assert!(job(&["\"http://h/\""; NOTIFY_MAX + 1].join(",")).is_err());
    }

    use super::*;
    use crate::health::CheckKind;

    const MINIMAL: &str = r#"name = "web"
type = "service"
replicas = 5

[task]
driver = "exec"
command = "sleep"
args = ["100000"]

[task.resources]
cpu = 100
memory = 32
"#;

    #[test]
    fn the_minimal_file_is_accepted_as_it_is() {
        let j = JobSpec::parse(MINIMAL).unwrap();
        assert_eq!(j.name, "web");
        assert_eq!(j.job_type, JobType::Service);
        assert_eq!(j.replicas, 5);
        assert_eq!(j.task.command, "sleep");
        assert_eq!(j.task.args, vec!["100000"]);
        assert_eq!(
            j.task.resources,
            ResourceSpec {
                cpu: 100,
                memory: 32
            }
        );
        let r = j.slot_request(3);
        assert_eq!(
            (r.slot, r.resources.cpu_millis, r.resources.memory_mib),
            (3, 100, 32)
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_line() {
        let text = MINIMAL.replace(
            "command = \"sleep\"",
            "command = \"sleep\"\ncomand = \"typo\"",
        );
        let e = JobSpec::parse(&text).unwrap_err();
        assert_eq!(e.line, Some(8), "{e}");
        assert!(e.message.contains("comand"), "{e}");
    }

    #[test]
    fn validation_errors_name_field_and_line() {
        let e = JobSpec::parse(&MINIMAL.replace("replicas = 5", "replicas = 0")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(3), Some("replicas")),
            "{e}"
        );
        let e = JobSpec::parse(&MINIMAL.replace("cpu = 100", "cpu = 0")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.resources"));
        assert_eq!(e.line, Some(10), "{e}");
        let e =
            JobSpec::parse(&MINIMAL.replace("name = \"web\"", "name = \"Web App\"")).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("name")), "{e}");
        let e =
            JobSpec::parse(&MINIMAL.replace("driver = \"exec\"", "driver = \"qemu\"")).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().starts_with("line 6: task.driver"), "{e}");
        let e = JobSpec::parse(&MINIMAL.replace("type = \"service\"", "type = \"daemon\""))
            .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e =
            JobSpec::parse(&MINIMAL.replace("type = \"service\"", "type = \"cron\"")).unwrap_err();
        assert!(e.message.contains("needs a [cron] table"), "{e}");
        let e =
            JobSpec::parse(&format!("{MINIMAL}\n[cron]\nschedule = \"* * * * *\"\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cron"), "{e}");
        let cron = format!(
            "{}\n[cron]\nschedule = \"*/15 * * * *\"\nstarting_deadline = \"2h\"\n",
            MINIMAL.replace("type = \"service\"", "type = \"cron\"")
        );
        let e = JobSpec::parse(&cron).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cron.starting_deadline"), "{e}");
        let j = JobSpec::parse(&cron.replace("2h", "5m")).expect("a cron job");
        assert_eq!(j.partition_policy(), PartitionPolicy::Majority);
        let e = JobSpec::parse(&format!(
            "partition = \"never\"\n{}",
            cron.replace("2h", "5m")
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("partition"), "{e}");
        let j = JobSpec::parse(&format!("partition = \"majority\"\n{MINIMAL}")).unwrap();
        assert_eq!(j.partition_policy(), PartitionPolicy::Majority);
        // `never` updates stop-first, without canaries, and is no system
        // job's.
        let j = JobSpec::parse(&format!("partition = \"never\"\n{MINIMAL}")).unwrap();
        assert_eq!(j.partition_policy(), PartitionPolicy::Never);
        assert_eq!(j.update.order, crate::update::Order::StopFirst);
        j.validate("").expect("its stop-first order stays valid");
        let e = JobSpec::parse(&format!(
            "partition = \"never\"\n{MINIMAL}\n[update]\norder = \"start-first\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("update.order"), "{e}");
        let e = JobSpec::parse(&format!(
            "partition = \"never\"\n{MINIMAL}\n[update]\ncanary = 1\n"
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("update.canary"), "{e}");
        let mut start_first = j.clone();
        start_first.update.order = crate::update::Order::StartFirst;
        assert!(
            start_first.validate("").is_err(),
            "a peer's never job must be stop-first"
        );
        let e = JobSpec::parse(&format!(
            "partition = \"never\"\n{}",
            MINIMAL
                .replace("type = \"service\"", "type = \"system\"")
                .replace("replicas = 5\n", "")
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("partition"), "{e}");
        // Only shoal names a job after a cron job's time.
        let e = JobSpec::parse(&MINIMAL.replace("name = \"web\"", "name = \"web@1700000000\""))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"), "{e}");
        // A system job has no replicas, nothing to spread and no canaries.
        let system = MINIMAL.replace("type = \"service\"", "type = \"system\"");
        let e = JobSpec::parse(&system).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("replicas"), "{e}");
        let system = system.replace("replicas = 5\n", "");
        let j = JobSpec::parse(&system).expect("a system job without replicas");
        assert_eq!((j.job_type, j.replicas), (JobType::System, 1));
        let e = JobSpec::parse(&format!("{system}\n[update]\ncanary = 1\n")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("update.canary"), "{e}");
        let e =
            JobSpec::parse("name = \"x\"\ntype = \"batch\"\n[task]\ncommand = [1]\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        let e = JobSpec::parse("not toml at all {").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn dynamic_ports_and_shoal_variables_are_checked() {
        let with = |ports: &str, args: &str| {
            MINIMAL
                .replace("args = [\"100000\"]", &format!("args = {args}"))
                .replace(
                    "[task.resources]",
                    &format!("ports = {ports}\n\n[task.resources]"),
                )
        };
        let j = JobSpec::parse(&with(
            "{ http = 0, admin = 9000 }",
            "[\"-p\", \"${SHOAL_PORT_HTTP}\", \"${SHOAL_ADDR_ADMIN}\", \"${HOME}\", \"${SHOAL_SLOT}\"]",
        ))
        .unwrap();
        assert_eq!(j.task.ports["http"], 0);
        // Only static ports take part in placement.
        assert_eq!(j.slot_request(0).ports, vec![9000]);

        let e = JobSpec::parse(&with("{ http = 0 }", "[\"${SHOAL_PORT_HTPP}\"]")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.args"), "{e}");
        assert!(
            e.message.contains("SHOAL_PORT_HTPP") && e.message.contains("names no port"),
            "{e}"
        );
        let e = JobSpec::parse(&with("{ http = 0 }", "[\"${SHOAL_SLOTT}\"]")).unwrap_err();
        assert!(e.message.contains("known: SHOAL_JOB"), "{e}");
        let e = JobSpec::parse(&with("{ \"2http\" = 0 }", "[]")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.ports.2http"), "{e}");
        let e = JobSpec::parse(&with("{ web-ui = 0, web_ui = 0 }", "[]")).unwrap_err();
        assert!(e.message.contains("SHOAL_PORT_WEB_UI"), "{e}");
        let env = MINIMAL.replace(
            "[task.resources]",
            "env = { URL = \"http://${SHOAL_ADDR_X}/\" }\n\n[task.resources]",
        );
        let e = JobSpec::parse(&env).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.env.URL"), "{e}");
    }

    #[test]
    fn health_checks_parse_and_are_checked() {
        let base = MINIMAL.replace(
            "args = [\"100000\"]",
            "args = [\"100000\"]\nports = { web = 0 }",
        );
        let with = |checks: &str| format!("{base}\n{checks}");
        let j = JobSpec::parse(&with(
            "[[task.check]]\ntype = \"http\"\nport = \"web\"\npath = \"/health\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nrestart = true\n\n\
             [[task.check]]\ntype = \"exec\"\ncommand = \"test\"\nargs = [\"-n\", \"${SHOAL_PORT_WEB}\"]\n",
        ))
        .unwrap();
        assert_eq!(j.task.checks.len(), 2);
        let c = &j.task.checks[0];
        assert_eq!(
            (c.kind, c.port.as_deref(), c.path.as_deref()),
            (CheckKind::Http, Some("web"), Some("/health"))
        );
        assert_eq!(
            (c.interval, c.timeout, c.failures, c.successes, c.restart),
            (
                Duration::from_secs(1),
                Some(Duration::from_millis(500)),
                3,
                1,
                true
            )
        );
        assert_eq!(j.task.checks[1].display_name(), "exec:test");
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(back, j);
        for (check, field) in [
            ("type = \"http\"\nport = \"api\"", "task.check.0.port"),
            ("type = \"tcp\"", "task.check.0.port"),
            ("type = \"exec\"", "task.check.0.command"),
            (
                "type = \"tcp\"\nport = \"web\"\npath = \"/\"",
                "task.check.0.path",
            ),
            (
                "type = \"http\"\nport = \"web\"\npath = \"no slash\"",
                "task.check.0.path",
            ),
            (
                "type = \"tcp\"\nport = \"web\"\ninterval = \"1s\"\ntimeout = \"2s\"",
                "task.check.0.timeout",
            ),
            (
                "type = \"tcp\"\nport = \"web\"\ninterval = \"1ms\"",
                "task.check.0.interval",
            ),
            (
                "type = \"tcp\"\nport = \"web\"\nfailures = 0",
                "task.check.0.failures",
            ),
            (
                "type = \"exec\"\ncommand = \"x\"\nargs = [\"${SHOAL_PORT_NOPE}\"]",
                "task.check.0.command",
            ),
        ] {
            let e = JobSpec::parse(&with(&format!("[[task.check]]\n{check}\n"))).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{check}: {e}");
        }
        let e = JobSpec::parse(&with("[[task.check]]\ntype = \"bogus\"\n")).unwrap_err();
        assert!(e.message.contains("http"), "{e}");
        let two = "[[task.check]]\ntype = \"tcp\"\nport = \"web\"\n";
        let e = JobSpec::parse(&with(&format!("{two}{two}"))).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.check.1.name"), "{e}");
        // A task without checks fingerprints as before checks existed.
        assert!(
            !serde_json::to_string(&JobSpec::parse(MINIMAL).unwrap().task)
                .unwrap()
                .contains("check")
        );
    }

    #[test]
    fn update_settings_parse_and_are_checked() {
        let with = |u: &str| format!("{MINIMAL}\n[update]\n{u}\n");
        let j = JobSpec::parse(&with(
            "max_parallel = 3\norder = \"stop-first\"\nmin_healthy_time = \"10s\"",
        ))
        .unwrap();
        assert_eq!(j.update.max_parallel, 3);
        assert_eq!(j.update.order, crate::update::Order::StopFirst);
        assert_eq!(j.update.min_healthy_time, Duration::from_secs(10));
        assert_eq!(JobSpec::parse(MINIMAL).unwrap().update, Default::default());
        let e = JobSpec::parse(&with("max_parallel = 0")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("update.max_parallel"), "{e}");
        let e = JobSpec::parse(&with("order = \"sideways\"")).unwrap_err();
        assert!(e.message.contains("start-first"), "{e}");
        let e = JobSpec::parse(&with("min_healthy_time = \"2h\"")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("update.min_healthy_time"), "{e}");
        // Settings of the update are not the task's: changing them
        // replaces no copy.
        let a = JobSpec::parse(&with("max_parallel = 2")).unwrap();
        assert_eq!(
            a.task.fingerprint(),
            JobSpec::parse(MINIMAL).unwrap().task.fingerprint()
        );
    }

    #[test]
    fn kill_signal_and_timeout_are_checked() {
        let with = |extra: &str| {
            MINIMAL.replace("[task.resources]", &format!("{extra}\n\n[task.resources]"))
        };
        let j = JobSpec::parse(&with("kill_signal = \"SIGINT\"\nkill_timeout = \"30s\"")).unwrap();
        assert_eq!(j.task.kill_signal.as_deref(), Some("SIGINT"));
        assert_eq!(j.task.kill_timeout, Some(Duration::from_secs(30)));
        // Round trip (what peers store and send).
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(back, j);
        let e = JobSpec::parse(&with("kill_signal = \"SIGKILL\"")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.kill_signal"), "{e}");
        let e = JobSpec::parse(&with("kill_timeout = \"2h\"")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("task.kill_timeout"), "{e}");
        let e = JobSpec::parse(&with("kill_timeout = \"soon\"")).unwrap_err();
        assert!(e.message.contains("not a duration"), "{e}");
        // Absent: the node's default.
        assert_eq!(JobSpec::parse(MINIMAL).unwrap().task.kill_timeout, None);
    }

    #[test]
    fn constraints_affinities_spread_and_restart_parse() {
        let text = format!(
            "{MINIMAL}\ndistinct_hosts = true\n[[constraints]]\nlabel = \"zone\"\nop = \"in\"\nvalues = [\"a\", \"b\"]\n\n[[affinities]]\nlabel = \"ssd\"\nop = \"exists\"\nweight = 50\n\n[spread]\nlabel = \"zone\"\n\n[restart]\nattempts = 3\ndelay = \"500ms\"\nmax_delay = \"10s\"\n"
        );
        // distinct_hosts after a table header belongs to that table: move it up
        let text = text.replace("\ndistinct_hosts = true\n", "\n").replacen(
            "replicas = 5",
            "replicas = 5\ndistinct_hosts = true",
            1,
        );
        let j = JobSpec::parse(&text).unwrap();
        let r = j.slot_request(0);
        assert!(r.distinct_hosts);
        assert_eq!(r.constraints[0].op, Op::In(vec!["a".into(), "b".into()]));
        assert_eq!(r.affinities[0].weight, 50);
        assert_eq!(r.spread.unwrap().max_skew, 1);
        assert_eq!(j.restart.delay, Duration::from_millis(500));
        assert_eq!(j.restart.backoff(0), Duration::from_millis(500));
        assert_eq!(j.restart.backoff(3), Duration::from_secs(4));
        assert_eq!(j.restart.backoff(30), Duration::from_secs(10));
        let bad = text.replace("op = \"in\"", "op = \"like\"");
        let e = JobSpec::parse(&bad).unwrap_err();
        assert!(e.message.contains("unknown op"), "{e}");
        let bad = text.replace("delay = \"500ms\"", "delay = \"soon\"");
        assert!(JobSpec::parse(&bad)
            .unwrap_err()
            .message
            .contains("not a duration"));
        let huge = text
            .replace("delay = \"500ms\"", "delay = \"500000000000years\"")
            .replace("max_delay = \"10s\"", "max_delay = \"500000000000years\"");
        let e = JobSpec::parse(&huge).unwrap_err();
        assert!(e.message.contains("at most 86400s"), "{e}");
    }

    #[test]
    fn spec_roundtrips_through_json_and_toml() {
        let j = JobSpec::parse(MINIMAL).unwrap();
        let json = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), j);
        let toml_text = toml::to_string(&j).unwrap();
        assert_eq!(JobSpec::parse(&toml_text).unwrap(), j);
    }
}

#[cfg(test)]
mod example_tests {
    // Reading the repository's examples is the point of this test.
    #[allow(clippy::disallowed_methods)]
    #[test]
    fn every_example_job_file_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                super::JobSpec::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3);
    }
}

impl TaskSpec {
    /// A stable fingerprint of the task (FNV-1a over its JSON): instances
    /// running another fingerprint run an outdated task.
    pub fn fingerprint(&self) -> u64 {
        fnv1a(&serde_json::to_vec(self).expect("a task encodes"))
    }
}

/// FNV-1a: a small stable hash (the same on every node and release).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
