//! Command-line interface: `shoal agent` and the client commands that talk
//! to an agent's HTTP API.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::agent::AgentConfig;
use crate::api::{ApiError, NodeInfo};

/// Default HTTP API address of the local agent.
pub const DEFAULT_HTTP: &str = "127.0.0.1:4701";
/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4700";

/// Most labels a node may carry (they travel in every node record).
const LABELS_MAX: usize = 64;
/// Longest label key or value.
const LABEL_LEN_MAX: usize = 256;

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
    /// Show the jobs, or one job's slots.
    Status(StatusArgs),
    /// Stop a job (its instances stop on every node).
    Stop(JobArgs),
    /// Change a job's replica count.
    Scale(ScaleArgs),
    /// Print a slot's output, fetched from whichever node runs it.
    Logs(LogsArgs),
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
    /// Address of the HTTP API. On anything but loopback it requires --http-token.
    #[arg(long, default_value = DEFAULT_HTTP)]
    pub http: SocketAddr,
    /// Token that HTTP API clients must present (Authorization: Bearer).
    #[arg(long, env = "SHOAL_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
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
}

#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// URL of the agent to ask.
    #[arg(long, env = "SHOAL_ADDR", default_value = "http://127.0.0.1:4701")]
    pub addr: String,
    /// Token the agent's API requires, if any.
    #[arg(long, env = "SHOAL_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job file (TOML; see examples/).
    pub file: PathBuf,
    /// Return once the job is accepted, without waiting for it to run.
    #[arg(long)]
    pub detach: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// A job name; without it, every job.
    pub job: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
    /// The new replica count.
    pub replicas: u32,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
    /// The slot.
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
    /// Show stderr instead of stdout.
    #[arg(long)]
    pub stderr: bool,
    /// Keep printing new output until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// Print at most this many bytes from the end.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_bytes: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` must be key=value"))?;
    if k.is_empty() || k.len() > LABEL_LEN_MAX || v.len() > LABEL_LEN_MAX {
        return Err(format!("label `{s}`: key must be 1 to {LABEL_LEN_MAX} characters, value at most {LABEL_LEN_MAX}"));
    }
    if !k
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
    {
        return Err(format!(
            "label key `{k}` may only hold letters, digits and . _ - /"
        ));
    }
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
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            bail!("--name `{name}`: use 1 to 128 letters, digits, '.', '_' or '-'");
        }
        Ok(AgentConfig {
            name,
            data_dir: self.data_dir,
            listen: self.listen,
            advertise: self.advertise,
            join,
            token,
            http: self.http,
            http_token: self.http_token.filter(|t| !t.is_empty()),
            labels,
            cpu_millis: self.cpu,
            memory_mib: self.memory,
            membership: Default::default(),
            hollow: self.hollow,
        })
    }
}

/// A small blocking client of the agent API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `args.addr`.
    pub fn new(args: &ClientArgs) -> Client {
        let base = args.addr.trim_end_matches('/').to_string();
        let base = if base.contains("://") {
            base
        } else {
            format!("http://{base}")
        };
        Client {
            base,
            token: args.http_token.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
        }
    }

    /// GET a JSON resource.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.call("GET", path, None)?;
        resp.into_json()
            .with_context(|| format!("the agent at {} sent an unreadable answer", self.base))
    }

    /// Sends a request with an optional body; the error says what failed.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<ureq::Response> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        match result {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(code, resp)) => {
                let msg = resp.into_json::<ApiError>().map(|e| e.error).unwrap_or_default();
                if (400..500).contains(&code) && !msg.is_empty() {
                    bail!("{msg}")
                }
                bail!("the agent at {} answered {code}: {msg}", self.base)
            }
            Err(e) => bail!(
                "cannot reach the shoal agent at {}: {e}\nIs `shoal agent` running there? Point to another with --addr or SHOAL_ADDR.",
                self.base
            ),
        }
    }
}

/// `shoal nodes`.
pub fn nodes(args: NodesArgs) -> Result<()> {
    let nodes: Vec<NodeInfo> = Client::new(&args.client).get("/v1/nodes")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|n| {
            let labels = n
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            [
                n.name.clone(),
                n.address.clone(),
                n.state.clone(),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels
                },
                format!("{}m/{}Mi", n.capacity.cpu_millis, n.capacity.memory_mib),
                format!("{}m/{}Mi", n.load.cpu_millis, n.load.memory_mib),
                n.load.instances.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "ADDRESS",
            "STATE",
            "LABELS",
            "CAPACITY",
            "RESERVED",
            "INSTANCES",
        ],
        &rows,
    );
    for n in nodes.iter().filter(|n| !n.notes.is_empty()) {
        println!("note: {}: {}", n.name, n.notes.join("; "));
    }
    Ok(())
}

pub(crate) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

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
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
