//! Command-line interface: `shoal agent` and the client commands that talk
//! to an agent's HTTP API.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::agent::AgentConfig;
use crate::commands::{JobArgs, LogsArgs, NodesArgs, RunArgs, ScaleArgs, StatusArgs, ValidateArgs};

/// Default HTTP API address of the local agent.
pub const DEFAULT_HTTP: &str = "127.0.0.1:4701";
/// Where an agent answers DNS unless told otherwise (`--dns`).
pub const DEFAULT_DNS: &str = "127.0.0.1:8600";
/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4700";

/// Most labels a node may carry (they travel in every node record).
const LABELS_MAX: usize = shoal_membership::record::LABELS_MAX;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "A masterless, peer-to-peer workload scheduler",
    long_about = "A masterless, peer-to-peer workload scheduler.\n\n\
        Run `shoal agent` on every machine; the first one bootstraps a cluster and prints the \
        command that joins the others. Client commands (`shoal nodes`, ...) talk to an agent's \
        HTTP API: --addr, else SHOAL_ADDR, else http://127.0.0.1:4701."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent on this machine (bootstraps a cluster, or joins one with --join).
    Agent(Box<AgentArgs>),
    /// List the cluster's nodes as the agent sees them.
    Nodes(NodesArgs),
    /// Submit a job file (or a new version of it) and wait until it runs.
    Run(RunArgs),
    /// Show what submitting a job file would do, writing nothing: the fields
    /// that change, the slots that would start, be replaced or stop, and
    /// where they would go (exit 0: no change, 1: changes, 255: error).
    Plan(crate::commands::PlanArgs),
    /// Check a job file here, without an agent (exit 0 if valid, 1 if not).
    Validate(ValidateArgs),
    /// Show the jobs, or one job's slots.
    Status(StatusArgs),
    /// Stop a job (its instances stop on every node).
    Stop(JobArgs),
    /// Change a job's replica count.
    Scale(ScaleArgs),
    /// Print a slot's output, fetched from whichever node runs it.
    Logs(LogsArgs),
    /// What happens in the cluster, as the agent sees it: jobs written,
    /// instances placed, started, failing or stopped (and why), nodes
    /// joining, dying or draining, deployments' progress. Prints the
    /// events the agent keeps, then (with --follow) new ones as they come.
    Events(crate::commands::EventsArgs),
    /// Print the URL of the agent's web page (the cluster, its jobs and
    /// its events, live), with the token that logs a browser in.
    Ui(crate::client::ClientArgs),
    /// A job's versions: `shoal job history JOB`, `shoal job revert JOB v6`.
    #[command(subcommand)]
    Job(crate::commands::JobCommand),
    /// A job's rollouts: `shoal deployment status JOB`, `shoal deployment promote JOB`.
    #[command(subcommand)]
    Deployment(crate::commands::DeploymentCommand),
    /// Cron jobs: `shoal cron next JOB` prints its next times, `shoal cron force JOB` runs it now.
    #[command(subcommand)]
    Cron(crate::commands::CronCommand),
    /// Services and where their instances run: `shoal service list`,
    /// `shoal service show NAME`.
    #[command(subcommand)]
    Service(crate::commands::ServiceCommand),
    /// Maintenance: `shoal node drain NODE` moves its work elsewhere,
    /// `shoal node ineligible NODE` keeps new work off it, `shoal node
    /// eligible NODE` lets it take work again.
    #[command(subcommand)]
    Node(crate::commands::NodeCommand),
    /// Join tokens: `shoal token create` makes one that admits nodes until it expires.
    #[command(subcommand)]
    Token(crate::commands::TokenCommand),
    /// The cluster CA: `shoal ca rotate` replaces it without downtime.
    #[command(subcommand)]
    Ca(crate::commands::CaCommand),
    /// Start a local cluster of agents on loopback, kill one, watch it be detected.
    Demo(crate::demo::DemoArgs),
    /// (internal) Run one exec instance; started by the agent.
    #[command(hide = true)]
    Supervise(SuperviseArgs),
}

#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The instance directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// CPU limit, millicores (needs a writable cgroup v2).
    #[arg(long, requires = "memory_mib")]
    pub cpu_millis: Option<u64>,
    /// Memory limit, MiB (needs a writable cgroup v2).
    #[arg(long, requires = "cpu_millis")]
    pub memory_mib: Option<u64>,
    /// Run the task as this uid (with --gid).
    #[arg(long, requires = "gid")]
    pub uid: Option<u32>,
    /// Run the task with this gid (with --uid).
    #[arg(long, requires = "uid")]
    pub gid: Option<u32>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Unique name of this node [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for the node's state (join token, generation, workloads).
    #[arg(long, default_value = "/var/lib/shoal")]
    pub data_dir: PathBuf,
    /// UDP address for node-to-node traffic (QUIC; one port carries everything).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address other nodes reach this one at [default: the listen address, or the
    /// address that routes to the first seed when listening on 0.0.0.0].
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Join the cluster through this node's QUIC address (host:port); repeatable.
    /// Without it the node bootstraps a new cluster, or rejoins with the token in its data dir.
    #[arg(long)]
    pub join: Vec<String>,
    /// The cluster's join token (printed by the first node, in its <data-dir>/join-token).
    #[arg(
        long,
        conflicts_with = "token_file",
        env = "SHOAL_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Read the join token from this file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Address of the HTTP API. It requires a token wherever it listens.
    #[arg(long, default_value = DEFAULT_HTTP)]
    pub http: SocketAddr,
    /// Where this node answers DNS for the service catalog, over UDP and
    /// TCP: NAME.service.shoal (A, AAAA, SRV of passing instances),
    /// TAG.NAME.service.shoal, NODE.node.shoal; `off` turns it off
    /// [default: 127.0.0.1:8600, and if another program holds that port
    /// the agent runs on without DNS and says so in `shoal nodes`].
    #[arg(long, value_name = "ADDR|off")]
    pub dns: Option<String>,
    /// The routing mesh: listen on every service's `ingress_port` and
    /// forward each connection to a passing instance (`--ingress false`
    /// turns it off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub ingress: bool,
    /// Address the routing mesh's ports listen on [default: the advertise
    /// address's IP].
    #[arg(long, value_name = "IP")]
    pub ingress_addr: Option<std::net::IpAddr>,
    /// Token that HTTP API clients must present (Authorization: Bearer), at
    /// least 16 characters [default: a random one, kept across restarts].
    /// Written to <data-dir>/api-token (mode 0600), where `shoal` commands
    /// run by a user who can read it find it.
    #[arg(long, env = "SHOAL_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Most HTTP API connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub http_connections_max: u32,
    /// An API connection that has not sent a whole request head this long
    /// after it opened or after its previous request is closed (slow or
    /// idle clients cannot hold the connections).
    #[arg(long, default_value = "10s", value_parser = parse_header_timeout)]
    pub http_header_timeout: std::time::Duration,
    /// A label of this node, key=value; repeatable (e.g. --label zone=a).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// CPU capacity offered, in millicores [default: 1000 per core].
    #[arg(long)]
    pub cpu: Option<u64>,
    /// Memory capacity offered, in MiB [default: the machine's memory].
    #[arg(long)]
    pub memory: Option<u64>,
    /// Also offer the `hollow` driver (instances that start no process; for
    /// scale benchmarks only).
    #[arg(long, hide = true)]
    pub hollow: bool,
    /// Move this node's state database aside (to state.redb.corrupt-<ms>)
    /// and refill it from the cluster: for a store that is corrupt. Needs
    /// --join.
    #[arg(long)]
    pub recover_from_peers: bool,
    /// Delete, at start, the job records in this node's store stamped
    /// further ahead of its clock than --max-clock-offset (left by an
    /// earlier release, or by a clock that ran far ahead): each blocks every
    /// write to its job until the clock catches up, which may be never.
    /// Peers refuse such records, so restarting every node that holds one
    /// with this flag clears it from the cluster.
    #[arg(long)]
    pub drop_future_records: bool,
    /// The user exec tasks run as unless their job sets `user`; `root` runs
    /// them as the agent's user [default: nobody when the agent runs as
    /// root, else the agent's user].
    #[arg(long)]
    pub task_user: Option<String>,
    /// Webhook told (a JSON POST, with a Slack-compatible `text`) when a
    /// slot fails for good, a copy restarts --notify-restarts times, a
    /// deployment fails or is reverted, or a node dies. One node of the
    /// cluster sends each: give every agent the same URL. A job's
    /// `notify = ["URL"]` adds its own for what is about it.
    #[arg(long, env = "SHOAL_NOTIFY_WEBHOOK")]
    pub notify_webhook: Option<String>,
    /// Restarts of one copy at which it is notified (once; 0: never).
    #[arg(long, default_value_t = crate::notify::RESTARTS_DEFAULT)]
    pub notify_restarts: u32,
    /// Largest clock offset tolerated between nodes: a peer's write stamped
    /// further ahead of this node's clock is refused, and a node whose clock
    /// is this far off most peers' refuses writes until its time sync is
    /// fixed. Keep the nodes' clocks synchronised (chrony, ntpd).
    #[arg(long, default_value = "500ms", value_parser = parse_offset)]
    pub max_clock_offset: std::time::Duration,
    /// How long a stopped job stays (in `shoal status`, and as the
    /// tombstone that keeps a late write of it from starting it again)
    /// before every node forgets it. A node away from the cluster for
    /// longer than this should rejoin with an empty data dir.
    #[arg(long, default_value = "24h", value_parser = parse_gc_after)]
    pub job_gc_after: std::time::Duration,
    /// Host ports this node picks dynamic ports from (a task's
    /// `ports = { http = 0 }`), inclusive: LOW-HIGH. Keep it clear of
    /// ports other software binds and of the kernel's ephemeral range
    /// (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default).
    #[arg(long, default_value = "20000-32000", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// How long the join token this node keeps in <data-dir>/join-token is
    /// valid; the node writes a new one when half of that has passed.
    /// `shoal token create --ttl` makes tokens of other lifetimes.
    #[arg(long, default_value = "24h", value_parser = parse_token_ttl)]
    pub join_token_ttl: std::time::Duration,
    /// How long this node's TLS certificates are valid; it issues itself a
    /// new one after two thirds (for tests: short lifetimes).
    #[arg(long, hide = true, default_value = "30d", value_parser = parse_cert_lifetime)]
    pub cert_lifetime: std::time::Duration,
    /// Scheduler timings: `lan` (the default) or `local-test` (short join
    /// grace and retries, for tests on one machine).
    #[arg(long, hide = true, default_value = "lan", value_parser = ["lan", "local-test"])]
    pub preset: String,
}

fn parse_offset(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 500ms, 2s)"))?;
    if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("`{s}`: use between 10ms and 1h"));
    }
    Ok(d)
}

fn parse_cert_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 30d)"))?;
    if d < std::time::Duration::from_secs(3) || d > std::time::Duration::from_secs(3650 * 86_400) {
        return Err(format!("`{s}`: use between 3s and 3650d"));
    }
    Ok(d)
}

/// A join token's validity: 1 s to 365 days.
pub fn parse_token_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 1h, 24h, 7d)"))?;
    if d < std::time::Duration::from_secs(1) || d > shoal_transport::tls::JOIN_TOKEN_TTL_MAX {
        return Err(format!("`{s}`: use between 1s and 365d"));
    }
    Ok(d)
}

fn parse_gc_after(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 24h, 7d)"))?;
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(365 * 86_400) {
        return Err(format!("`{s}`: use between 1s and 365d"));
    }
    Ok(d)
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}`: write LOW-HIGH, e.g. 20000-32000"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("`{s}`: `{p}` is not a port (1-65535)"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo == 0 || lo > hi {
        return Err(format!("`{s}`: LOW must be at least 1 and at most HIGH"));
    }
    Ok((lo, hi))
}

fn parse_header_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 10s)"))?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(600) {
        return Err(format!("`{s}`: use between 100ms and 10m"));
    }
    Ok(d)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` must be key=value"))?;
    // The same rule peers' records are held to.
    shoal_membership::record::check_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

fn resolve(seed: &str) -> Result<SocketAddr> {
    seed.to_socket_addrs()
        .with_context(|| format!("--join {seed}: not a host:port address"))?
        .next()
        .with_context(|| format!("--join {seed}: resolves to no address"))
}

impl AgentArgs {
    /// Validates the flags into an agent configuration.
    pub fn into_config(self) -> Result<AgentConfig> {
        if self.labels.len() > LABELS_MAX {
            bail!("at most {LABELS_MAX} labels per node");
        }
        let labels: BTreeMap<String, String> = self.labels.into_iter().collect();
        let join = self
            .join
            .iter()
            .map(|s| resolve(s))
            .collect::<Result<Vec<_>>>()?;
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(crate::credentials::read_token_file(path)?),
            (None, None) => None,
        };
        let name = self.name.unwrap_or_else(crate::host::hostname);
        if !shoal_membership::record::valid_node_name(&name) {
            bail!("--name `{name}`: use 1 to 128 letters, digits, '.', '_' or '-'");
        }
        let max = shoal_membership::record::CAPACITY_MAX;
        if self.cpu.is_some_and(|c| c > max.cpu_millis)
            || self.memory.is_some_and(|m| m > max.memory_mib)
        {
            bail!(
                "--cpu is at most {} (millicores) and --memory at most {} (MiB)",
                max.cpu_millis,
                max.memory_mib
            );
        }
        if let Some(p) = self
            .notify_webhook
            .as_deref()
            .and_then(shoal_core::job::webhook_problem)
        {
            bail!("--notify-webhook: {p}");
        }
        Ok(AgentConfig {
            notify: crate::notify::Config {
                me: name.clone(),
                webhook: self.notify_webhook.filter(|u| !u.is_empty()),
                restarts: self.notify_restarts,
            },
            name,
            data_dir: self.data_dir,
            listen: self.listen,
            advertise: self.advertise,
            join,
            token,
            http: self.http,
            dns: match self.dns.as_deref() {
                None => {
                    crate::agent::Dns::Default(DEFAULT_DNS.parse().expect("default DNS address"))
                }
                Some("off") => crate::agent::Dns::Off,
                Some(a) => crate::agent::Dns::At(a.parse().map_err(|e| {
                    anyhow::anyhow!("--dns {a}: {e} (use IP:PORT, e.g. 127.0.0.1:8600, or off)")
                })?),
            },
            ingress: self.ingress,
            ingress_addr: self.ingress_addr,
            http_token: self.http_token.filter(|t| !t.is_empty()),
            http_limits: crate::api::HttpLimits {
                connections_max: self.http_connections_max as usize,
                header_timeout: self.http_header_timeout,
            },
            labels,
            cpu_millis: self.cpu,
            memory_mib: self.memory,
            membership: Default::default(),
            hollow: self.hollow,
            recover_from_peers: self.recover_from_peers,
            drop_future_records: self.drop_future_records,
            task_user: match self.task_user {
                Some(u) if u == "root" => None,
                Some(u) => {
                    if crate::driver::exec::lookup_user(&u).is_none() {
                        bail!("--task-user {u}: no such user on this machine");
                    }
                    Some(u)
                }
                None => crate::driver::exec::default_task_user(),
            },
            cert_lifetime: self.cert_lifetime,
            join_token_ttl: self.join_token_ttl,
            scheduler: shoal_core::SchedulerConfig {
                max_clock_offset: self.max_clock_offset,
                job_gc_after: self.job_gc_after,
                port_range: self.port_range,
                ..match self.preset.as_str() {
                    "local-test" => shoal_core::SchedulerConfig::local_test(),
                    _ => shoal_core::SchedulerConfig::lan(),
                }
            },
        })
    }
}

/// A small blocking client of the agent API.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_validated() {
        assert_eq!(parse_label("zone=a").unwrap(), ("zone".into(), "a".into()));
        assert_eq!(parse_label("k=").unwrap(), ("k".into(), "".into()));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
        assert!(parse_label("bad key=v").is_err());
    }

    #[test]
    fn port_ranges_are_validated() {
        assert_eq!(parse_port_range("20000-32000").unwrap(), (20_000, 32_000));
        assert_eq!(parse_port_range("80-80").unwrap(), (80, 80));
        for bad in ["", "20000", "0-10", "10-9", "1-65536", "a-b"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
