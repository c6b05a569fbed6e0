//! The client commands that work with jobs: run, status, stop, scale, logs.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use std::path::PathBuf;

use clap::Args;

use crate::api::{Accepted, JobStatus, NodeInfo, ScaleRequest, VersionView};
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
    /// Write only if the job is still at this version (e.g. `v7`; `0`: only
    /// if no live job has the name): refused with exit 1 if it moved on.
    #[arg(long, value_name = "VERSION")]
    pub check_version: Option<String>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job file.
    pub file: PathBuf,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// List a job's kept versions (its last 10), newest first.
    History(JobHistoryArgs),
    /// Write an earlier version's spec as the job's next version.
    Revert(JobRevertArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum DeploymentCommand {
    /// Show the rollout of a job's current version (running, successful,
    /// failed or cancelled; its ready slots, old copies and canaries) and
    /// how earlier versions' rollouts ended.
    Status(DeploymentStatusArgs),
    /// Let an update waiting on its canaries (`[update] canary`) go on to
    /// the other slots; refused until every canary is ready.
    Promote(DeploymentPromoteArgs),
}

#[derive(Debug, Args)]
pub struct DeploymentStatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeploymentPromoteArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
}

#[derive(Debug, Args)]
pub struct JobHistoryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
    /// Print JSON (with each version's spec).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobRevertArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job name.
    pub job: String,
    /// The version to go back to, as `shoal job history` shows it (`v6`).
    pub version: String,
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
    /// The node whose copy: a system job runs one on every node (all slot
    /// 0); `shoal status JOB` lists them.
    #[arg(long)]
    pub node: Option<String>,
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
    let rows: Vec<[String; 9]> = nodes
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
                eligibility(n),
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
            "ELIGIBILITY",
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
    // The asked node's side: what it may start.
    if let Ok(h) = Client::new(&args.client).get::<serde_json::Value>("/v1/health") {
        let m = &h["members"];
        let (alive, remembered) = (m["alive"].as_u64(), m["remembered"].as_u64());
        let side = m["side"].as_str().unwrap_or("");
        if let (Some(alive), Some(remembered), "half" | "minority") = (alive, remembered, side) {
            println!(
                "note: {} sees {alive} of the {remembered} members it remembers alive ({side}): \
                 it starts nothing new of jobs whose partition policy is {}; `shoal node forget \
                 NODE` stops counting a dead node that will not return",
                h["name"].as_str().unwrap_or("this node"),
                if side == "minority" {
                    "majority or never"
                } else {
                    "never"
                }
            );
        }
    }
    Ok(())
}

/// A node's eligibility as `shoal nodes` shows it: `eligible`,
/// `ineligible`, `draining (3 left, 52m to deadline)` or `drained`.
fn eligibility(n: &NodeInfo) -> String {
    if n.forgotten && n.state != "alive" {
        return "forgotten".into();
    }
    match &n.drain {
        Some(d) if d.done => "drained".into(),
        Some(d) if !d.reachable => "draining (not reachable)".into(),
        Some(d) => format!(
            "draining ({} left, {})",
            d.left,
            if d.deadline_in_s == 0 {
                "deadline passed".to_string()
            } else {
                format!(
                    "{} to deadline",
                    humantime::format_duration(std::time::Duration::from_secs(d.deadline_in_s))
                )
            }
        ),
        None if n.eligible => "eligible".into(),
        None => "ineligible".into(),
    }
}

/// `shoal node ...`.
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Move a node's work elsewhere and keep new work off it: its service
    /// copies move start-first (each job's `max_parallel` at a time, the
    /// new copy ready before the old one stops), its batch copies may
    /// finish until the deadline, then what is left stops and runs
    /// elsewhere; its system copies stop last. Follows progress until the
    /// node is empty (Ctrl-C leaves the drain going). The node stays
    /// ineligible afterwards: `shoal node eligible NODE` ends the drain.
    Drain(NodeDrainArgs),
    /// Let a node take new work again (and end its drain).
    Eligible(NodeArgs),
    /// Keep new work off a node; what runs there stays.
    Ineligible(NodeArgs),
    /// Declare a dead node gone for good: the slots of `partition =
    /// "never"` jobs it held are placed elsewhere (they wait for their
    /// node otherwise), and if it ever comes back it stops its copies of
    /// them. Nodes also stop counting it when they decide whether they
    /// see a majority (`partition = "majority"` and `"never"` jobs start
    /// only there). Refused while the node is alive. Make sure its work is
    /// really gone (the machine powered off, or its processes killed): a
    /// node that is only cut off, or whose agent died while its tasks
    /// run, would run those slots a second time.
    Forget(NodeArgs),
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The node's name (`shoal nodes` lists them).
    pub node: String,
}

#[derive(Debug, Args)]
pub struct NodeDrainArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The node's name (`shoal nodes` lists them).
    pub node: String,
    /// How long batch copies may run on and service copies may wait for
    /// room elsewhere before what is left on the node stops (at most a
    /// week).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub deadline: std::time::Duration,
    /// Stop everything on the node now (no start-first move).
    #[arg(long)]
    pub force: bool,
    /// Leave the node's system jobs running.
    #[arg(long)]
    pub keep_system: bool,
    /// Return once the drain is written, without following it.
    #[arg(long)]
    pub detach: bool,
}

/// `shoal node ...`.
pub fn node(cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Eligible(args) => set_eligibility(&args, true),
        NodeCommand::Ineligible(args) => set_eligibility(&args, false),
        NodeCommand::Drain(args) => drain(args),
        NodeCommand::Forget(args) => forget(&args),
    }
}

fn node_segment(node: &str) -> Result<&str> {
    if !shoal_membership::record::valid_node_name(node) {
        bail!("`{node}` is not a node name; `shoal nodes` lists them");
    }
    Ok(node)
}

fn forget(args: &NodeArgs) -> Result<()> {
    Client::new(&args.client)
        .call(
            "POST",
            &format!("/v1/nodes/{}/forget", node_segment(&args.node)?),
            None,
        )?
        .into_json::<Accepted>()?;
    println!(
        "{} is forgotten: the slots of `partition = \"never\"` jobs it held are placed elsewhere",
        args.node
    );
    Ok(())
}

fn set_eligibility(args: &NodeArgs, eligible: bool) -> Result<()> {
    let body = serde_json::json!({ "eligible": eligible }).to_string();
    let accepted: Accepted = Client::new(&args.client)
        .call(
            "POST",
            &format!("/v1/nodes/{}/eligibility", node_segment(&args.node)?),
            Some(&body),
        )?
        .into_json()?;
    let what = if eligible {
        "eligible: it takes new work"
    } else {
        "ineligible: it takes no new work; what runs there stays"
    };
    if accepted.unchanged {
        println!("{} was already {what}", args.node);
    } else {
        println!("{} is {what}", args.node);
    }
    Ok(())
}

fn drain(args: NodeDrainArgs) -> Result<()> {
    let client = Client::new(&args.client);
    let body = serde_json::json!({
        "deadline": humantime::format_duration(args.deadline).to_string(),
        "force": args.force,
        "keep_system": args.keep_system,
    })
    .to_string();
    let node = node_segment(&args.node)?;
    // Progress: the node's events (its copies stopping, the drain done),
    // watched from before the write; the node's state is re-read on each.
    let events = (!args.detach)
        .then(|| watch_events(&client, &format!("node:{node}")))
        .flatten();
    let bar = indicatif::ProgressBar::hidden();
    let accepted: Accepted = client
        .call("POST", &format!("/v1/nodes/{node}/drain"), Some(&body))?
        .into_json()?;
    println!(
        "draining {node}: it takes no new work{}",
        if args.force {
            "; everything on it stops now"
        } else {
            ""
        }
    );
    if args.detach {
        println!("`shoal nodes` shows its progress; `shoal node eligible {node}` ends the drain");
        return Ok(());
    }
    let mut last = None;
    let asked = std::time::Instant::now();
    let mut seen = false;
    loop {
        let n: NodeInfo = client.get(&format!("/v1/nodes/{node}"))?;
        // The agent's view shows the write within a moment (until then it
        // may show no drain, or an earlier one).
        let ours = n.drain.as_ref().filter(|d| d.hlc == accepted.hlc);
        let Some(d) = ours else {
            if !seen && asked.elapsed() < std::time::Duration::from_secs(10) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            bail!("the drain of {node} was ended or changed (`shoal node eligible`, or a newer write)");
        };
        seen = true;
        if !d.reachable {
            if last != Some((usize::MAX, 0)) {
                println!("{node} is not reachable from this agent: its progress is unknown");
                last = Some((usize::MAX, 0));
            }
            next_event(events.as_ref(), &bar, Duration::from_secs(1));
            continue;
        }
        let now = (d.left, d.system_left);
        if last != Some(now) {
            if d.done {
                println!(
                    "{node} is drained{}; it stays ineligible until `shoal node eligible {node}`",
                    if d.keep_system {
                        " (its system jobs run on)"
                    } else {
                        ""
                    }
                );
                return Ok(());
            }
            println!(
                "{node}: {} copies left{}, {}",
                d.left,
                if d.system_left > 0 {
                    format!(" ({} of system jobs, which stop last)", d.system_left)
                } else {
                    String::new()
                },
                if d.deadline_in_s == 0 {
                    "deadline passed: what is left is stopping".to_string()
                } else {
                    format!(
                        "{} to the deadline",
                        humantime::format_duration(std::time::Duration::from_secs(d.deadline_in_s))
                    )
                }
            );
            last = Some(now);
        }
        next_event(events.as_ref(), &bar, Duration::from_secs(1));
    }
}

fn path_segment(name: &str) -> Result<&str> {
    if !shoal_core::job::valid_job_name(name) {
        bail!("`{name}` is not a job name (lower-case letters, digits and '-'; a cron job's run is NAME@<unix-seconds>)");
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

/// How long nodes must keep saying a system job cannot run on them before
/// `shoal run` believes it (gossip brings a node's word on a new version
/// within about a second).
const UNFIT_SETTLE: Duration = Duration::from_secs(3);

/// A system job's row of a node that says the job cannot run there (a
/// pending row with placement attempts; a copy being stopped is pending
/// too, with none).
fn unfit(i: &crate::api::SlotView) -> bool {
    i.state == SlotState::Pending && i.attempts > 0
}

/// Whether a job reached its version: every slot done (batch), or running
/// that version, ready (passing for `min_healthy_time`) and alone, the
/// old copy gone (service).
fn settled(s: &JobStatus) -> bool {
    if s.job_type == "system" {
        // Every node that qualifies runs the version, ready and passing,
        // or says why it cannot.
        let (unfit, placed): (Vec<_>, Vec<_>) = s.instances.iter().partition(|i| unfit(i));
        return placed.len() + unfit.len() >= s.replicas as usize
            && placed
                .iter()
                .all(|i| passes(s, i) && i.ready && i.copies <= 1);
    }
    let (_, completed, failed, total) = progress(s);
    let extra = s.instances.iter().any(|i| i.slot >= s.replicas);
    !extra
        && if s.job_type == "batch" {
            completed + failed == total
        } else {
            passing(s) == total && s.instances.iter().all(|i| i.ready && i.copies <= 1)
        }
}

/// Slots running the job's version and passing.
fn passing(s: &JobStatus) -> usize {
    s.instances
        .iter()
        .filter(|i| i.slot < s.replicas && passes(s, i))
        .count()
}

/// Whether a row runs the job's version and passes.
fn passes(s: &JobStatus, i: &crate::api::SlotView) -> bool {
    i.state == SlotState::Running
        && i.health == shoal_core::health::Health::Passing
        && i.version.as_deref() == Some(s.version.as_str())
}

/// `shoal run`.
pub fn run(args: RunArgs) -> Result<()> {
    let text = read_job_file(&args.file)?;
    let client = Client::new(&args.client);
    // Progress comes from the job's events, watched from before the write
    // so that none is missed; the status is re-read on each (and once a
    // second besides, in case one was not seen).
    let events = match (&args.detach, shoal_core::job::JobSpec::parse(&text)) {
        (false, Ok(spec)) => watch_events(&client, &format!("job:{}", spec.name)),
        _ => None,
    };
    let path = match &args.check_version {
        None => "/v1/jobs".to_string(),
        Some(v) => {
            let Some(n) = crate::api::parse_version(v) else {
                bail!("--check-version takes a version like `v7` (or `0`: no live job), not `{v}`");
            };
            format!("/v1/jobs?check_version={n}")
        }
    };
    let accepted: Accepted = client
        .call("POST", &path, Some(&text))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
        .into_json()?;
    if accepted.unchanged {
        println!(
            "job {} unchanged: {} already has this spec (nothing written)",
            accepted.name, accepted.version
        );
    } else {
        println!(
            "accepted job {} version {}",
            accepted.name, accepted.version
        );
    }
    if args.detach {
        return Ok(());
    }
    let cron = shoal_core::job::JobSpec::parse(&text)
        .ok()
        .and_then(|s| s.cron.map(|c| (s.name, c)));
    if let Some((name, c)) = cron {
        // A cron job has nothing to wait for: its runs come on schedule.
        let status: JobStatus =
            client.get(&format!("/v1/jobs/{}?spec=true", path_segment(&name)?))?;
        match status.next.first() {
            Some(next) => println!(
                "{name}: schedule `{}`{}; next run {next} (`shoal cron next {name}` lists more, `shoal cron force {name}` runs it now)",
                c.schedule,
                if c.time_zone == "UTC" { String::new() } else { format!(" in {}", c.time_zone) }
            ),
            None => println!("{name}: disabled (enabled = false); `shoal cron force {name}` runs it now"),
        }
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
    let mut unfit_since: Option<Instant> = None;
    let path = format!("/v1/jobs/{}", path_segment(&accepted.name)?);
    loop {
        let status: JobStatus = client.get(&path)?;
        let (running, completed, failed, total) = progress(&status);
        bar.set_length(total as u64);
        bar.set_position((running + completed + failed) as u64);
        bar.set_message(if status.job_type == "batch" {
            format!("{}: {completed} completed, {failed} failed", status.name)
        } else {
            format!(
                "{}: {running} running, {} passing",
                status.name,
                passing(&status)
            )
        });
        // A newer write replaced this one: not this write, nor its
        // coordinator's mark (its clock, then `!`), nor its promotion (two
        // writes at once on two nodes can share a number, so the number
        // alone does not say; found in review).
        let ours = status.hlc == accepted.hlc
            || status
                .hlc
                .strip_prefix(accepted.hlc.as_str())
                .is_some_and(|rest| rest.starts_with('!'))
            || (status.version == accepted.version
                && status.deployment.as_ref().is_some_and(|d| d.promoted));
        if !ours {
            bar.finish_and_clear();
            bail!(
                "{}: a newer write ({}) replaced this one; `shoal job history {}` lists the versions",
                status.name,
                status.version,
                status.name
            );
        }
        if let Some(d) = status
            .deployment
            .as_ref()
            .filter(|d| d.awaiting_promotion || d.state == "failed")
        {
            bar.finish_and_clear();
            if d.state == "failed" {
                bail!(
                    "{} {}: the update failed ({}); `shoal deployment status {}` shows where it stopped. \
                     The same spec again changes nothing: run a fixed one, or go back with \
                     `shoal job revert {} VERSION` (`shoal job history {}` lists them)",
                    status.name,
                    status.version,
                    d.description.trim_start_matches("failed: "),
                    status.name,
                    status.name,
                    status.name
                );
            }
            println!("{} {}: {}", status.name, status.version, d.description);
            return Ok(());
        }
        let done = settled(&status);
        if !done {
            unfit_since = None;
        }
        if done {
            last_events(events.as_ref(), &bar, Duration::from_millis(300));
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
            } else if status.job_type == "system" {
                let unfit: Vec<String> = status
                    .instances
                    .iter()
                    .filter(|i| unfit(i))
                    .filter_map(|i| i.reason.clone())
                    .collect();
                // A node's word that it cannot run the job may be about an
                // earlier version until gossip brings its new one: believed
                // once it has held for a while.
                if !unfit.is_empty()
                    && unfit_since.get_or_insert_with(Instant::now).elapsed() < UNFIT_SETTLE
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                println!(
                    "{}: {} running on {} node(s) and passing ({secs:.1} s)",
                    status.name,
                    status.version,
                    passing(&status)
                );
                if !unfit.is_empty() {
                    bail!(
                        "{} of {total} node(s) that meet its constraints cannot run it:\n{}",
                        unfit.len(),
                        unfit.join("\n")
                    );
                }
            } else {
                println!(
                    "{}: all {total} slots running {} and passing ({secs:.1} s)",
                    status.name, status.version
                );
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
        next_event(events.as_ref(), &bar, Duration::from_secs(1));
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
                    let state = if j.job_type == "cron" {
                        match j.next.first() {
                            Some(n) => format!("next {n}"),
                            None => "disabled".to_string(),
                        }
                    } else if j.job_type == "batch" {
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
            if s.job_type == "cron" {
                print_cron(&s);
                return Ok(());
            }
            let system = s.job_type == "system";
            if let Some(p) = &s.parent {
                println!("a run of cron job {p}");
            }
            println!(
                "{} ({}), version {}, {}{}",
                s.name,
                s.job_type,
                s.version,
                if system {
                    format!("one per node: {} node(s) meet its constraints", s.replicas)
                } else {
                    format!("{} replicas", s.replicas)
                },
                if s.stopped { ", stopped" } else { "" }
            );
            if let Some(d) = &s.deployment {
                println!("deployment {}: {} ({})", d.version, d.state, d.description);
            }
            let rows: Vec<[String; 8]> = s
                .instances
                .iter()
                .map(|i| {
                    [
                        if system {
                            "-".to_string()
                        } else {
                            i.slot.to_string()
                        },
                        i.node.clone().unwrap_or_else(|| "-".into()),
                        serde_json::to_value(i.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        if i.node.is_some() {
                            i.health.as_str().to_string()
                        } else {
                            "-".to_string()
                        },
                        i.version.clone().unwrap_or_else(|| "-".into()),
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
                        shoal_core::health::printable(&match (&i.check, &i.reason, i.attempts) {
                            (Some(c), _, _) => c.clone(),
                            (None, Some(r), 0) => r.clone(),
                            (None, Some(r), n) => format!("{r} (tried {n} times; backing off)"),
                            (None, None, _) => String::new(),
                        }),
                    ]
                })
                .collect();
            print_table(
                &[
                    "SLOT", "NODE", "STATE", "HEALTH", "VERSION", "RESTARTS", "PORTS", "REASON",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

fn print_cron(s: &JobStatus) {
    println!(
        "{} (cron), version {}, {} replica(s) per run{}",
        s.name,
        s.version,
        s.replicas,
        if s.stopped { ", stopped" } else { "" }
    );
    if let Some(schedule) = &s.schedule {
        println!("schedule {schedule}");
    }
    match s.next.first() {
        Some(n) => println!("next run {n}"),
        None if !s.stopped => {
            println!("disabled: no run is scheduled (`shoal cron force` runs it now)")
        }
        None => {}
    }
    if s.runs.is_empty() {
        println!("no runs yet");
        return;
    }
    let rows: Vec<[String; 3]> = s
        .runs
        .iter()
        .rev()
        .map(|r| {
            [
                r.job.clone(),
                r.time.clone(),
                serde_json::to_value(r.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["RUN", "SCHEDULED", "OUTCOME"], &rows);
}

/// `shoal cron ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CronCommand {
    /// Print a cron job's next scheduled times (in UTC and in its time zone).
    Next(CronNextArgs),
    /// Start a run of a cron job now, whatever its schedule (also while
    /// it is disabled); prints the run's name (NAME@<unix-seconds>).
    Force(DeploymentPromoteArgs),
}

#[derive(Debug, Args)]
pub struct CronNextArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The cron job's name.
    pub job: String,
    /// How many times to print.
    #[arg(short = 'n', long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
}

/// `shoal cron ...`.
pub fn cron(cmd: CronCommand) -> Result<()> {
    match cmd {
        CronCommand::Next(args) => {
            let s: JobStatus = Client::new(&args.client)
                .get(&format!("/v1/jobs/{}?spec=true", path_segment(&args.job)?))?;
            let Some(spec) = s.spec.as_ref().filter(|_| !s.stopped) else {
                bail!("job `{}` is stopped", args.job);
            };
            let Some(c) = spec.cron.as_ref() else {
                bail!(
                    "`{}` is a {} job, not a cron job: it has no schedule",
                    args.job,
                    s.job_type
                );
            };
            if !c.enabled {
                println!(
                    "{} is disabled (enabled = false): no run is scheduled",
                    args.job
                );
                return Ok(());
            }
            let schedule = shoal_core::cron::Schedule::new(&c.schedule, &c.time_zone)
                .map_err(|(_, why)| anyhow::anyhow!(why))?;
            for t in crate::api::next_runs(spec, args.count as usize) {
                if c.time_zone == "UTC" {
                    println!("{}", crate::api::rfc3339(t));
                } else {
                    println!("{}  ({})", crate::api::rfc3339(t), schedule.show(t));
                }
            }
        }
        CronCommand::Force(args) => {
            let accepted: Accepted = Client::new(&args.client)
                .call(
                    "POST",
                    &format!("/v1/jobs/{}/cron/force", path_segment(&args.job)?),
                    None,
                )?
                .into_json()?;
            println!(
                "started {}: `shoal status {}` follows it",
                accepted.name, accepted.name
            );
        }
    }
    Ok(())
}

/// `shoal job ...`.
pub fn job(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::History(args) => {
            let versions: Vec<VersionView> = Client::new(&args.client)
                .get(&format!("/v1/jobs/{}/versions", path_segment(&args.job)?))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
                return Ok(());
            }
            if versions.is_empty() {
                println!("{}: stopped, and no earlier version is kept", args.job);
                return Ok(());
            }
            let rows: Vec<[String; 5]> = versions
                .iter()
                .enumerate()
                .map(|(n, v)| {
                    let changed = match versions.get(n + 1) {
                        None => "(first kept)".to_string(),
                        Some(older) => spec_diff(&older.spec, &v.spec),
                    };
                    [
                        v.version.clone(),
                        if v.current { "current" } else { "" }.to_string(),
                        v.hlc.clone(),
                        v.spec.replicas.to_string(),
                        changed,
                    ]
                })
                .collect();
            print_table(
                &[
                    "VERSION",
                    "",
                    "WRITTEN",
                    "REPLICAS",
                    "CHANGED FROM THE VERSION BEFORE",
                ],
                &rows,
            );
        }
        JobCommand::Revert(args) => {
            let Some(n) = crate::api::parse_version(&args.version) else {
                bail!(
                    "`{}` is not a version; `shoal job history {}` lists them (v1, v2, ...)",
                    args.version,
                    args.job
                );
            };
            let body = serde_json::json!({ "version": n }).to_string();
            let accepted: Accepted = Client::new(&args.client)
                .call(
                    "POST",
                    &format!("/v1/jobs/{}/revert", path_segment(&args.job)?),
                    Some(&body),
                )?
                .into_json()?;
            if accepted.unchanged {
                println!(
                    "job {} unchanged: it already runs the spec of v{n} ({})",
                    accepted.name, accepted.version
                );
            } else {
                println!(
                    "reverted job {} to the spec of v{n} as {}",
                    accepted.name, accepted.version
                );
            }
        }
    }
    Ok(())
}

/// `shoal deployment ...`.
pub fn deployment(cmd: DeploymentCommand) -> Result<()> {
    match cmd {
        DeploymentCommand::Status(args) => {
            let d: crate::api::Deployments = Client::new(&args.client)
                .get(&format!("/v1/jobs/{}/deployment", path_segment(&args.job)?))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(());
            }
            match &d.current {
                None => println!("{}: no deployment (a batch or stopped job)", d.job),
                Some(c) => {
                    println!("{} {}: {}", d.job, c.version, c.state);
                    println!("  {}", c.description);
                    println!(
                        "  slots {}, placed {}, ready {}, older copies {}{}",
                        c.replicas,
                        c.placed,
                        c.ready,
                        c.old,
                        if c.canary > 0 {
                            format!(
                                ", canaries {} ({})",
                                c.canary,
                                if c.promoted {
                                    "promoted"
                                } else {
                                    "not promoted"
                                }
                            )
                        } else {
                            String::new()
                        }
                    );
                }
            }
            if !d.past.is_empty() {
                let rows: Vec<[String; 3]> = d
                    .past
                    .iter()
                    .map(|p| [p.version.clone(), p.state.clone(), p.description.clone()])
                    .collect();
                println!();
                print_table(&["VERSION", "STATE", "HOW IT ENDED"], &rows);
            }
        }
        DeploymentCommand::Promote(args) => {
            let accepted: Accepted = Client::new(&args.client)
                .call(
                    "POST",
                    &format!("/v1/jobs/{}/promote", path_segment(&args.job)?),
                    None,
                )?
                .into_json()?;
            if accepted.unchanged {
                println!("{} {}: already promoted", accepted.name, accepted.version);
            } else {
                println!(
                    "promoted {} {}: its update goes on past the canaries",
                    accepted.name, accepted.version
                );
            }
        }
    }
    Ok(())
}

/// The fields that differ between two specs, e.g. `replicas, task.args`.
fn spec_diff(old: &shoal_core::job::JobSpec, new: &shoal_core::job::JobSpec) -> String {
    let fields = shoal_core::plan::spec_diff(old, new);
    if fields.is_empty() {
        "nothing".to_string()
    } else {
        fields.join(", ")
    }
}

/// `shoal plan`: exit 0 when nothing would change, 1 when something would,
/// 255 on an error.
pub fn plan(args: PlanArgs) -> i32 {
    match plan_inner(&args) {
        Ok(changes) => i32::from(changes),
        Err(e) => {
            eprintln!("error: {e:#}");
            255
        }
    }
}

fn plan_inner(args: &PlanArgs) -> Result<bool> {
    use shoal_core::plan::{Action, Plan};
    let text = read_job_file(&args.file)?;
    let plan: Plan = Client::new(&args.client)
        .call("POST", "/v1/plan", Some(&text))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
        .into_json()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(plan.changes_anything());
    }
    match (plan.current, plan.unchanged) {
        (_, true) => println!(
            "job {}: no change (v{} has this spec)",
            plan.job,
            plan.current.unwrap_or(0)
        ),
        (None, _) => println!("job {}: new job", plan.job),
        (Some(v), _) => println!(
            "job {}: changes v{v} in {}",
            plan.job,
            if plan.changes.is_empty() {
                "nothing".to_string()
            } else {
                plan.changes.join(", ")
            }
        ),
    }
    let count = |a: Action| plan.slots.iter().filter(|s| s.action == a).count();
    println!(
        "slots: {} start, {} replace, {} stop, {} keep, {} done",
        count(Action::Start),
        count(Action::Replace),
        count(Action::Stop),
        count(Action::Keep),
        count(Action::Done)
    );
    let rows: Vec<[String; 5]> = plan
        .slots
        .iter()
        .filter(|s| !matches!(s.action, Action::Keep | Action::Done))
        .map(|s| {
            let action = serde_json::to_value(s.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let candidates = s
                .candidates
                .iter()
                .map(|c| match &c.rejected {
                    None => format!("{} {:.2}", c.node, c.score),
                    Some(r) => format!("{} ({r})", c.node),
                })
                .collect::<Vec<_>>()
                .join("; ");
            [
                s.slot.to_string(),
                action,
                s.node.clone().unwrap_or_else(|| "-".into()),
                match (&s.to, &s.unplaceable) {
                    (Some(n), _) => n.clone(),
                    (None, Some(why)) => format!("unplaceable: {why}"),
                    (None, None) => "-".into(),
                },
                candidates,
            ]
        })
        .collect();
    if !rows.is_empty() {
        print_table(
            &["SLOT", "ACTION", "NOW ON", "TO", "CANDIDATES (SCORE)"],
            &rows,
        );
    }
    Ok(plan.changes_anything())
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
    let mut path = format!(
        "/v1/jobs/{}/logs?slot={}&stream={stream}&max_bytes={}",
        path_segment(&args.job)?,
        args.slot,
        args.max_bytes
    );
    if let Some(n) = &args.node {
        path.push_str(&format!("&node={}", path_segment(n)?));
    }
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

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen (Ctrl-C stops).
    #[arg(long, short)]
    pub follow: bool,
    /// Only events about a job or a node: `job:web`, `node:n3`, `job:*`,
    /// `node:*`. Repeat it for several.
    #[arg(long)]
    pub topic: Vec<String>,
    /// Start after this event (its `cursor`, from --json), or `now` for
    /// new events only [default: every event the agent keeps].
    #[arg(long)]
    pub since: Option<String>,
    /// Print each event as a JSON object on its own line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The query of `/v1/events` for these topics, from `since`.
fn events_path(topics: &[String], since: Option<&str>, follow: bool) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for t in topics {
        q.append_pair("topic", t);
    }
    if let Some(s) = since {
        q.append_pair("since", s);
    }
    if !follow {
        q.append_pair("follow", "false");
    }
    format!("/v1/events?{}", q.finish())
}

/// One event as `shoal events` prints it.
fn event_line(e: &crate::events::Event) -> String {
    let time = e.time.get(11..23).unwrap_or(&e.time);
    format!("{time}  {:<22} {}", e.kind, e.message)
}

/// `shoal ui`.
pub fn ui(args: ClientArgs) -> Result<()> {
    let client = Client::new(&args);
    // Asked first, so that a wrong address or token is said here rather
    // than by the browser.
    let health: serde_json::Value = client.get("/v1/health")?;
    let base = client.base();
    match args.token() {
        Some(token) => println!("{}", crate::api::ui_url(base, &token)),
        None => println!("{base}/"),
    }
    eprintln!(
        "the web page of {} (any node of the cluster serves the same page)",
        health["name"].as_str().unwrap_or("the agent")
    );
    Ok(())
}

/// `shoal events`.
pub fn events(args: EventsArgs) -> Result<()> {
    let client = Client::new(&args.client);
    let mut since = args.since.clone();
    let mut retries = 0;
    loop {
        let reader = client.stream(&events_path(&args.topic, since.as_deref(), args.follow))?;
        let mut broke = None;
        for line in std::io::BufRead::lines(reader) {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            };
            // Heartbeats (`{}`) are not events.
            let Ok(e) = serde_json::from_str::<crate::events::Event>(&line) else {
                continue;
            };
            retries = 0;
            if args.json {
                println!("{line}");
            } else {
                println!("{}", event_line(&e));
            }
            std::io::stdout().flush()?;
            since = Some(e.cursor);
        }
        let Some(e) = broke else {
            return Ok(());
        };
        if !args.follow {
            bail!("the event stream broke ({e}); run it again to read the rest");
        }
        // The agent went away mid-stream: resume after the last event
        // shown, a few times (a restarted agent says what was lost).
        retries += 1;
        if retries > 5 {
            bail!("the event stream broke ({e}) and could not be resumed");
        }
        eprintln!("the event stream broke ({e}); resuming");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Events about `topic` from now on, read by a thread and handed over as
/// they come; `None` when the agent streams no events.
fn watch_events(
    client: &Client,
    topic: &str,
) -> Option<std::sync::mpsc::Receiver<crate::events::Event>> {
    let reader = client
        .stream(&events_path(&[topic.to_string()], Some("now"), true))
        .ok()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(reader) {
            let Ok(line) = line else { return };
            if let Ok(e) = serde_json::from_str::<crate::events::Event>(&line) {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    Some(rx)
}

/// Waits for the next event (printed above the progress bar) or, at
/// most, `poll`: what the caller re-reads the state on.
fn next_event(
    events: Option<&std::sync::mpsc::Receiver<crate::events::Event>>,
    bar: &indicatif::ProgressBar,
    poll: Duration,
) {
    let Some(rx) = events else {
        std::thread::sleep(poll.min(Duration::from_millis(100)));
        return;
    };
    let show = |e: crate::events::Event| show_event(bar, &e);
    match rx.recv_timeout(poll) {
        Ok(e) => {
            show(e);
            // What came with it, without waiting.
            while let Ok(e) = rx.try_recv() {
                show(e);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        // The stream ended (the agent closed it, or a read timed out):
        // poll as without one (found in review: an ended stream made the
        // caller ask the agent in a tight loop).
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::thread::sleep(poll.min(Duration::from_millis(100)))
        }
    }
}

/// Prints the events that still come within `quiet` of each other (those
/// of the last change the caller saw in the state), for 2 s at most.
fn last_events(
    events: Option<&std::sync::mpsc::Receiver<crate::events::Event>>,
    bar: &indicatif::ProgressBar,
    quiet: Duration,
) {
    let Some(rx) = events else { return };
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(e) = rx.recv_timeout(quiet.min(until.saturating_duration_since(Instant::now()))) {
        show_event(bar, &e);
    }
}

/// Prints a progress event on stderr, above the progress bar when one is
/// drawn.
fn show_event(bar: &indicatif::ProgressBar, e: &crate::events::Event) {
    if bar.is_hidden() {
        eprintln!("{}", event_line(e));
    } else {
        bar.println(event_line(e));
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

/// `shoal service ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// List the services the jobs declare (`[[service]]`), with their
    /// instances and how many pass.
    List(ServiceListArgs),
    /// Show where a service's instances run now (passing ones; `--all`
    /// shows every one with its health).
    Show(ServiceShowArgs),
}

#[derive(Debug, Args)]
pub struct ServiceListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON (as `GET /v1/services` answers).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServiceShowArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service's name (`shoal service list` lists them).
    pub name: String,
    /// Every instance, not only those passing their checks.
    #[arg(long)]
    pub all: bool,
    /// List the instances on this node first.
    #[arg(long)]
    pub near: Option<String>,
    /// Print JSON (as `GET /v1/services/NAME` answers).
    #[arg(long)]
    pub json: bool,
}

/// `shoal service ...`.
pub fn service(cmd: ServiceCommand) -> Result<()> {
    match cmd {
        ServiceCommand::List(args) => {
            let list: crate::api::ServiceList = Client::new(&args.client).get("/v1/services")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.services.is_empty() {
                println!("no job declares a service (add a [[service]] table to a job file)");
                return Ok(());
            }
            let rows: Vec<[String; 5]> = list
                .services
                .iter()
                .map(|s| {
                    [
                        s.name.clone(),
                        format!("{}/{}", s.passing, s.instances),
                        if s.jobs.is_empty() {
                            "-".into()
                        } else {
                            s.jobs.join(",")
                        },
                        shoal_core::catalog::service_dns_name(&s.name),
                        s.ingress_port
                            .map_or_else(|| "-".into(), |p| format!(":{p} on every node")),
                    ]
                })
                .collect();
            print_table(&["SERVICE", "PASSING", "JOBS", "DNS", "INGRESS"], &rows);
        }
        ServiceCommand::Show(args) => {
            if !shoal_core::catalog::valid_service_name(&args.name) {
                bail!(
                    "`{}` is not a service name; `shoal service list` lists them",
                    args.name
                );
            }
            let mut path = format!("/v1/services/{}?passing={}", args.name, !args.all);
            if let Some(n) = &args.near {
                path.push_str(&format!("&near={}", node_segment(n)?));
            }
            let svc: crate::api::ServiceView = Client::new(&args.client).get(&path)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&svc)?);
                return Ok(());
            }
            println!(
                "{} ({})",
                svc.name,
                shoal_core::catalog::service_dns_name(&svc.name)
            );
            if svc.instances.is_empty() {
                println!("no {}instance", if args.all { "" } else { "passing " });
                return Ok(());
            }
            let rows: Vec<[String; 6]> = svc
                .instances
                .iter()
                .map(|i| {
                    [
                        std::net::SocketAddr::new(i.address, i.port).to_string(),
                        i.node.clone(),
                        format!("{}/{}", i.job, i.slot),
                        i.health.as_str().to_string(),
                        format!("v{}", i.version),
                        if i.tags.is_empty() {
                            "-".into()
                        } else {
                            i.tags.join(",")
                        },
                    ]
                })
                .collect();
            print_table(
                &["ADDRESS", "NODE", "JOB/SLOT", "HEALTH", "VERSION", "TAGS"],
                &rows,
            );
        }
    }
    Ok(())
}
