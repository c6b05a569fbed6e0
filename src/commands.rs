//! The client commands that work with jobs: run, status, stop, scale, logs.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use std::path::PathBuf;

use clap::Args;

use crate::api::{Accepted, JobStatus, NodeInfo, ScaleRequest};
use crate::client::{print_table, Client, ClientArgs};
use shoal_core::instance::SlotState;
use shoal_core::job::JOB_FILE_LEN_MAX;

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

/// `shoal nodes`.
pub fn nodes(args: NodesArgs) -> Result<()> {
    let nodes: Vec<NodeInfo> = Client::new(&args.client).get("/v1/nodes")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    let rows: Vec<[String; 8]> = nodes
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
                match n.clock_offset_ms {
                    Some(ms) => format!("{ms:+}ms"),
                    None => "-".into(),
                },
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
            "CLOCK",
        ],
        &rows,
    );
    for n in &nodes {
        for p in &n.problems {
            println!("problem: {}: {p}", n.name);
        }
    }
    for n in nodes.iter().filter(|n| !n.notes.is_empty()) {
        println!("note: {}: {}", n.name, n.notes.join("; "));
    }
    Ok(())
}

fn path_segment(name: &str) -> Result<&str> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("`{name}` is not a job name (lower-case letters, digits and '-')");
    }
    Ok(name)
}

/// Counts of a job's slots by state: (running, completed, failed, total).
fn progress(s: &JobStatus) -> (usize, usize, usize, usize) {
    let count = |st: SlotState| {
        s.instances
            .iter()
            .filter(|i| i.slot < s.replicas && i.state == st)
            .count()
    };
    (
        count(SlotState::Running),
        count(SlotState::Completed),
        count(SlotState::Failed),
        s.replicas as usize,
    )
}

fn settled(s: &JobStatus) -> bool {
    let (running, completed, failed, total) = progress(s);
    let extra = s.instances.iter().any(|i| i.slot >= s.replicas);
    !extra
        && if s.job_type == "batch" {
            completed + failed == total
        } else {
            running == total
        }
}

/// `shoal run`.
pub fn run(args: RunArgs) -> Result<()> {
    let text = read_job_file(&args.file)?;
    let client = Client::new(&args.client);
    let accepted: Accepted = client
        .call("POST", "/v1/jobs", Some(&text))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
        .into_json()?;
    println!(
        "accepted job {} version {}",
        accepted.name, accepted.version
    );
    if args.detach {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let path = format!("/v1/jobs/{}", path_segment(&accepted.name)?);
    loop {
        let status: JobStatus = client.get(&path)?;
        let (running, completed, failed, total) = progress(&status);
        bar.set_length(total as u64);
        bar.set_position((running + completed + failed) as u64);
        bar.set_message(if status.job_type == "batch" {
            format!("{}: {completed} completed, {failed} failed", status.name)
        } else {
            format!("{}: {running} running", status.name)
        });
        if settled(&status) && status.version == accepted.version {
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            if status.job_type == "batch" {
                println!(
                    "{}: {completed} of {total} slots completed, {failed} failed ({secs:.1} s)",
                    status.name
                );
                if failed > 0 {
                    bail!(
                        "{failed} slot(s) of {} failed; see `shoal logs {} --slot N --stderr`",
                        status.name,
                        status.name
                    );
                }
            } else {
                println!("{}: all {total} slots running ({secs:.1} s)", status.name);
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            bar.finish_and_clear();
            let reasons: Vec<String> = status
                .instances
                .iter()
                .filter(|i| i.state == SlotState::Pending)
                .filter_map(|i| i.reason.as_ref().map(|r| format!("slot {}: {r}", i.slot)))
                .take(5)
                .collect();
            bail!(
                "{}: {running} of {total} running after {} s{}\n(the job stays submitted; `shoal status {}` shows its slots)",
                status.name,
                args.timeout,
                if reasons.is_empty() { String::new() } else { format!("\n{}", reasons.join("\n")) },
                status.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `shoal status`.
pub fn status(args: StatusArgs) -> Result<()> {
    let client = Client::new(&args.client);
    match &args.job {
        None => {
            let jobs: Vec<JobStatus> = client.get("/v1/jobs")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(());
            }
            let rows: Vec<[String; 5]> = jobs
                .iter()
                .map(|j| {
                    let (running, completed, failed, total) = progress(j);
                    let state = if j.job_type == "batch" {
                        format!("{completed}/{total} completed, {failed} failed")
                    } else {
                        format!("{running}/{total} running")
                    };
                    [
                        j.name.clone(),
                        j.job_type.clone(),
                        j.replicas.to_string(),
                        state,
                        j.version.clone(),
                    ]
                })
                .collect();
            print_table(&["NAME", "TYPE", "REPLICAS", "STATUS", "VERSION"], &rows);
        }
        Some(job) => {
            let s: JobStatus = client.get(&format!("/v1/jobs/{}", path_segment(job)?))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!(
                "{} ({}), version {}, {} replicas{}",
                s.name,
                s.job_type,
                s.version,
                s.replicas,
                if s.stopped { ", stopped" } else { "" }
            );
            let rows: Vec<[String; 6]> = s
                .instances
                .iter()
                .map(|i| {
                    [
                        i.slot.to_string(),
                        i.node.clone().unwrap_or_else(|| "-".into()),
                        serde_json::to_value(i.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        i.restarts.to_string(),
                        if i.ports.is_empty() {
                            "-".to_string()
                        } else {
                            i.ports
                                .iter()
                                .map(|(n, p)| format!("{n}={p}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        },
                        match (&i.reason, i.attempts) {
                            (Some(r), 0) => r.clone(),
                            (Some(r), n) => format!("{r} (tried {n} times; backing off)"),
                            (None, _) => String::new(),
                        },
                    ]
                })
                .collect();
            print_table(
                &["SLOT", "NODE", "STATE", "RESTARTS", "PORTS", "REASON"],
                &rows,
            );
        }
    }
    Ok(())
}

/// `shoal stop`.
pub fn stop(args: JobArgs) -> Result<()> {
    let accepted: Accepted = Client::new(&args.client)
        .call(
            "DELETE",
            &format!("/v1/jobs/{}", path_segment(&args.job)?),
            None,
        )?
        .into_json()?;
    println!(
        "stopped job {} (version {})",
        accepted.name, accepted.version
    );
    Ok(())
}

/// `shoal scale`.
pub fn scale(args: ScaleArgs) -> Result<()> {
    let body = serde_json::to_string(&ScaleRequest {
        replicas: args.replicas,
    })?;
    let accepted: Accepted = Client::new(&args.client)
        .call(
            "POST",
            &format!("/v1/jobs/{}/scale", path_segment(&args.job)?),
            Some(&body),
        )?
        .into_json()?;
    println!(
        "scaled job {} to {} replicas (version {})",
        accepted.name, args.replicas, accepted.version
    );
    Ok(())
}

/// `shoal logs`.
pub fn logs(args: LogsArgs) -> Result<()> {
    let client = Client::new(&args.client);
    let stream = if args.stderr { "stderr" } else { "stdout" };
    let path = format!(
        "/v1/jobs/{}/logs?slot={}&stream={stream}&max_bytes={}",
        path_segment(&args.job)?,
        args.slot,
        args.max_bytes
    );
    let fetch = || -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut client.call("GET", &path, None)?.into_reader(),
            &mut bytes,
        )?;
        Ok(bytes)
    };
    let mut shown = fetch()?;
    std::io::stdout().write_all(&shown)?;
    std::io::stdout().flush()?;
    if !args.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(now) = fetch() else { continue };
        // Print what follows the part already shown (the tail window slides).
        let new = match (0..=shown.len()).find(|&k| now.starts_with(&shown[k..])) {
            Some(k) => &now[shown.len() - k..],
            None => &now[..],
        };
        std::io::stdout().write_all(new)?;
        std::io::stdout().flush()?;
        shown = now;
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a join token: a new node given it (`shoal agent --join SEED
    /// --token TOKEN`) is admitted by any member until the token expires.
    /// It carries no key; `shoal ca rotate` invalidates every token made
    /// before.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// How long the token admits nodes (e.g. 30m, 24h, 7d; at most 365d).
    #[arg(long, default_value = "24h", value_parser = crate::cli::parse_token_ttl)]
    pub ttl: std::time::Duration,
    /// Print JSON (the token and its expiry) instead of the token alone.
    #[arg(long)]
    pub json: bool,
}

pub fn token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create(args) => {
            let body = serde_json::json!({
                "ttl": humantime::format_duration(args.ttl).to_string()
            })
            .to_string();
            let resp = Client::new(&args.client).call("POST", "/v1/join-token", Some(&body))?;
            let made: crate::api::JoinTokenMade = resp
                .into_json()
                .context("the agent sent an unreadable answer")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&made)?);
            } else {
                println!("{}", made.token);
            }
            Ok(())
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Replace the cluster CA without downtime: every member trusts the
    /// new CA, then presents certificates of it, then stops trusting the
    /// old one. Join tokens made before stop working. A member that is down
    /// meanwhile rejoins with a new token (`shoal token create`); one that
    /// cannot be reached stops the rotation where it is (nothing is cut
    /// off) and the command says who: run it again once it is back.
    Rotate(CaRotateArgs),
}

#[derive(Debug, Args)]
pub struct CaRotateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn ca(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Rotate(args) => {
            let resp = Client::new(&args.client).call("POST", "/v1/ca/rotate", Some(""))?;
            let report: crate::identity::RotationReport = resp
                .into_json()
                .context("the agent sent an unreadable answer")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            if report.outcome == "done" {
                if !args.json {
                    println!(
                        "Rotated the cluster CA on {} members ({}). Join tokens made before no \
                         longer admit; make new ones with `shoal token create`.",
                        report.members.len(),
                        report.members.join(", ")
                    );
                }
                return Ok(());
            }
            let missed: Vec<String> = report
                .missed
                .iter()
                .map(|(n, why)| format!("  {n}: {why}"))
                .collect();
            bail!(
                "the rotation stopped after step `{}`: these members did not take the next one:\n{}\n\
                 Nothing is cut off (the old CA is still trusted). Run `shoal ca rotate` again once \
                 they are reachable, or once they are gone.",
                report.reached,
                missed.join("\n")
            )
        }
    }
}

/// A job file's text, refused before reading when over the size limit.
fn read_job_file(path: &std::path::Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > JOB_FILE_LEN_MAX as u64 {
        bail!(
            "{} is larger than the {JOB_FILE_LEN_MAX}-byte limit of job files",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `shoal validate FILE`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The job file (TOML; see examples/).
    pub file: PathBuf,
    /// Print the job as the agent would store it (JSON), or the error as
    /// `{"error": ..., "line": ..., "field": ...}`.
    #[arg(long)]
    pub json: bool,
}

/// `shoal validate`: checks a job file here, with the same code the agent
/// runs, without an agent. Exit 0 when it is valid, 1 when it is not.
pub fn validate(args: ValidateArgs) -> Result<()> {
    let text = read_job_file(&args.file)?;
    match crate::job::JobSpec::parse(&text) {
        Ok(spec) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&spec)?);
            } else {
                let kind = serde_json::to_value(spec.job_type)?;
                println!(
                    "{}: job {} ({}, {} replicas) is valid",
                    args.file.display(),
                    spec.name,
                    kind.as_str().unwrap_or("?"),
                    spec.replicas
                );
            }
            Ok(())
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"error": e.message, "line": e.line, "field": e.field})
                );
            } else {
                eprintln!("{}: {e}", args.file.display());
            }
            std::process::exit(1);
        }
    }
}
