//! Failure-detection benchmark: shoal against HashiCorp Serf, same run,
//! same layout.
//!
//! 1. Detection: N agents on 127.0.0.1; SIGKILL one; time until every
//!    survivor marks it dead (from the agents' own transition logs for shoal,
//!    from `member-failed` event handlers for Serf). Repeated `--trials`
//!    times (the victim is restarted between trials).
//! 2. False deaths: N hosts in network namespaces on a private bridge, each
//!    running a shoal agent and a Serf agent, with packet loss on every
//!    host's interface for `--loss-seconds`; every death reported is false.
//!    (Loss is injected with nftables `numgen random` on each host's egress:
//!    the kernels this runs on lack the netem qdisc.)
//!
//! Usage: cargo build --release && cargo run -p chaos --release --bin fd-bench -- [--help]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chaos::netns::Hosts;
use chaos::procs::{latest_states, now_ms, shoal_bin, transitions, wait_for, Proc};
use chaos::stats::percentile;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Failure detection: shoal vs Serf (detection time, false deaths under loss)")]
struct Args {
    /// Nodes per cluster.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Kill trials per system.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Duration of the packet-loss phase (0 skips it).
    #[arg(long, default_value_t = 300)]
    loss_seconds: u64,
    /// Packet loss on every link during that phase, percent.
    #[arg(long, default_value_t = 20)]
    loss_percent: u32,
    /// Skip Serf (if it is not installed).
    #[arg(long)]
    no_serf: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

const WAIT: Duration = Duration::from_secs(60);

/// Starts a shoal agent (optionally in a network namespace) with the
/// shared launcher and waits until it serves.
fn shoal_agent(
    dir: &Path,
    name: &str,
    listen: &str,
    join: Option<&str>,
    token: Option<&Path>,
    netns: Option<String>,
) -> Result<(Proc, String)> {
    let log = log_of(dir, name);
    let mut launch = shoal::launch::Launch::new(shoal_bin(), name, dir.join(name))
        .listen(listen, "127.0.0.1:0")
        .logs(&log, &log);
    if let Some(ns) = netns {
        launch = launch.wrapper(["ip".to_string(), "netns".into(), "exec".into(), ns]);
    }
    if let Some(j) = join {
        launch = launch.args(["--join", j]);
    }
    if let Some(t) = token {
        launch = launch.args([std::ffi::OsStr::new("--token-file"), t.as_os_str()]);
    }
    let mut launched = launch.spawn()?;
    let child = launched.child.take().context("the agent exited")?;
    Ok((
        Proc::adopt(name, child, &log),
        launched.info.quic.to_string(),
    ))
}

fn log_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// Every survivor's log says `victim` is `state` (generation at least `min_gen`), at or after `since_ms`.
fn shoal_all_report(
    dir: &Path,
    names: &[String],
    victim: &str,
    state: &str,
    since_ms: u64,
) -> Option<u64> {
    let mut latest = 0;
    for n in names.iter().filter(|n| *n != victim) {
        let log = std::fs::read_to_string(log_of(dir, n)).unwrap_or_default();
        let t = transitions(&log)
            .into_iter()
            .rev()
            .find(|t| t.node == victim)?;
        if t.state != state || t.at_ms < since_ms {
            return None;
        }
        latest = latest.max(t.at_ms);
    }
    Some(latest)
}

fn shoal_detection(args: &Args) -> Result<Vec<f64>> {
    let bin = shoal_bin();
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first (or set SHOAL_BIN)",
            bin.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let names: Vec<String> = (0..args.nodes).map(|i| format!("n{i}")).collect();
    let mut procs: Vec<Proc> = Vec::new();
    let (first, seed) = shoal_agent(dir, "n0", "127.0.0.1:0", None, None, None)?;
    procs.push(first);
    let token = dir.join("n0").join("join-token");
    for name in &names[1..] {
        procs.push(shoal_agent(dir, name, "127.0.0.1:0", Some(&seed), Some(&token), None)?.0);
    }
    wait_for("shoal cluster to converge", WAIT, || {
        names.iter().all(|n| {
            let s = latest_states(&log_of(dir, n));
            s.len() == names.len() && s.values().all(|v| v == "alive")
        })
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let mut samples = Vec::new();
    for trial in 0..args.trials {
        let v = 1 + trial % (args.nodes - 1);
        let victim = names[v].clone();
        let t_kill = now_ms();
        procs[v].stop(libc::SIGKILL);
        let mut detected = 0;
        wait_for(
            &format!("shoal survivors to mark {victim} dead"),
            WAIT,
            || match shoal_all_report(dir, &names, &victim, "dead", t_kill) {
                Some(at) => {
                    detected = at;
                    true
                }
                None => false,
            },
        )?;
        let secs = (detected.saturating_sub(t_kill)) as f64 / 1000.0;
        println!(
            "  shoal trial {:2}: {victim} dead everywhere after {secs:.3} s",
            trial + 1
        );
        samples.push(secs);
        let t_restart = now_ms();
        procs[v] = shoal_agent(dir, &victim, "127.0.0.1:0", Some(&seed), None, None)?.0;
        wait_for(&format!("{victim} alive again"), WAIT, || {
            shoal_all_report(dir, &names, &victim, "alive", t_restart).is_some()
        })?;
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(samples)
}

fn serf_handler(dir: &Path) -> Result<PathBuf> {
    let events = dir.join("serf-events.log");
    let script = dir.join("serf-handler.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nnow=$(date +%s%3N)\nwhile read -r line; do echo \"$now $SERF_SELF_NAME $SERF_EVENT $line\" >> {}; done\n",
            events.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// (time ms, observer, event, member) from the handler log.
fn serf_events(dir: &Path) -> Vec<(u64, String, String, String)> {
    let s = std::fs::read_to_string(dir.join("serf-events.log")).unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.into(),
                it.next()?.into(),
                it.next()?.into(),
            ))
        })
        .collect()
}

fn serf_observers(dir: &Path, event: &str, member: &str, since: u64) -> (BTreeSet<String>, u64) {
    let mut who = BTreeSet::new();
    let mut latest = 0;
    for (t, obs, ev, m) in serf_events(dir) {
        if ev == event && m == member && t >= since && obs != member {
            who.insert(obs);
            latest = latest.max(t);
        }
    }
    (who, latest)
}

fn serf_agent(handler: &Path, name: &str, bind: &str, rpc: &str, join: Option<&str>) -> Command {
    let mut cmd = Command::new("serf");
    cmd.args([
        "agent",
        &format!("-node={name}"),
        &format!("-bind={bind}"),
        &format!("-rpc-addr={rpc}"),
        "-log-level=warn",
    ])
    .arg(format!(
        "-event-handler=member-join,member-failed={}",
        handler.display()
    ));
    if let Some(j) = join {
        cmd.arg(format!("-retry-join={j}"))
            .arg("-retry-interval=1s");
    }
    cmd
}

fn serf_detection(args: &Args) -> Result<Vec<f64>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let handler = serf_handler(dir)?;
    let names: Vec<String> = (0..args.nodes).map(|i| format!("s{i}")).collect();
    let bind = |i: usize| format!("127.0.0.1:{}", 27000 + i);
    let rpc = |i: usize| format!("127.0.0.1:{}", 27500 + i);
    let mut procs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let join = (i > 0).then(|| bind(0));
        procs.push(Proc::spawn(
            name,
            serf_agent(&handler, name, &bind(i), &rpc(i), join.as_deref()),
            &log_of(dir, name),
        )?);
        if i == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    wait_for("serf cluster to converge", WAIT, || {
        names
            .iter()
            .all(|m| serf_observers(dir, "member-join", m, 0).0.len() >= args.nodes - 1)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let mut samples = Vec::new();
    for trial in 0..args.trials {
        let v = 1 + trial % (args.nodes - 1);
        let victim = names[v].clone();
        let t_kill = now_ms();
        procs[v].stop(libc::SIGKILL);
        let mut latest = 0;
        wait_for(
            &format!("serf survivors to mark {victim} failed"),
            WAIT,
            || {
                let (who, at) = serf_observers(dir, "member-failed", &victim, t_kill);
                latest = at;
                who.len() >= args.nodes - 1
            },
        )?;
        let secs = latest.saturating_sub(t_kill) as f64 / 1000.0;
        println!(
            "  serf  trial {:2}: {victim} failed everywhere after {secs:.3} s",
            trial + 1
        );
        samples.push(secs);
        let t_restart = now_ms();
        procs[v] = Proc::spawn(
            &victim,
            serf_agent(&handler, &victim, &bind(v), &rpc(v), Some(&bind(0))),
            &log_of(dir, &victim),
        )?;
        wait_for(&format!("serf {victim} rejoined"), WAIT, || {
            serf_observers(dir, "member-join", &victim, t_restart)
                .0
                .len()
                >= args.nodes - 1
        })?;
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(samples)
}

struct LossResult {
    shoal_false_deaths: usize,
    shoal_suspicions: usize,
    serf_false_deaths: Option<usize>,
    dropped: u64,
}

fn loss_phase(args: &Args) -> Result<LossResult> {
    let hosts = Hosts::create("shfd", args.nodes, [10, 213, 0])?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let handler = serf_handler(dir)?;
    let names: Vec<String> = (0..args.nodes).map(|i| format!("n{i}")).collect();
    let quic = |i: usize| format!("{}:4700", hosts.addr(i));
    let mut procs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let token = dir.join("n0").join("join-token");
        let (join, tok) = if i == 0 {
            (None, None)
        } else {
            (Some(quic(0)), Some(token.as_path()))
        };
        procs.push(shoal_agent(dir, name, &quic(i), join.as_deref(), tok, Some(hosts.ns(i)))?.0);
        if !args.no_serf {
            let mut cmd = hosts.command(i, "serf");
            let serf = serf_agent(
                &handler,
                &format!("s{i}"),
                &format!("{}:7946", hosts.addr(i)),
                "127.0.0.1:7373",
                (i > 0)
                    .then(|| format!("{}:7946", hosts.addr(0)))
                    .as_deref(),
            );
            cmd.args(serf.get_args());
            procs.push(Proc::spawn(
                &format!("s{i}"),
                cmd,
                &log_of(dir, &format!("s{i}")),
            )?);
        }
    }
    wait_for("shoal (netns) to converge", WAIT, || {
        names.iter().all(|n| {
            let s = latest_states(&log_of(dir, n));
            s.len() == names.len() && s.values().all(|v| v == "alive")
        })
    })?;
    if !args.no_serf {
        wait_for("serf (netns) to converge", WAIT, || {
            (0..args.nodes).all(|i| {
                serf_observers(dir, "member-join", &format!("s{i}"), 0)
                    .0
                    .len()
                    >= args.nodes - 1
            })
        })?;
    }
    let loss = format!("{}%", args.loss_percent);
    for i in 0..args.nodes {
        hosts.loss(i, args.loss_percent)?;
    }
    let t_start = now_ms();
    println!(
        "  {} nodes, {loss} loss on every link, for {} s ...",
        args.nodes, args.loss_seconds
    );
    let mut elapsed = 0;
    while elapsed < args.loss_seconds {
        let step = 30.min(args.loss_seconds - elapsed);
        std::thread::sleep(Duration::from_secs(step));
        elapsed += step;
        for p in procs.iter_mut() {
            if !p.running() {
                bail!(
                    "{} exited during the loss phase (see {})",
                    p.name,
                    p.log.display()
                );
            }
        }
        let (deaths, suspicions) = count_shoal(dir, &names, t_start);
        println!("    {elapsed:4} s: shoal false deaths {deaths}, suspicions {suspicions}");
    }
    let dropped: u64 = (0..args.nodes).map(|i| hosts.dropped(i)).sum();
    println!("  packets dropped by the loss rules: {dropped}");
    for i in 0..args.nodes {
        hosts.clear_loss(i);
    }
    let (shoal_false_deaths, shoal_suspicions) = count_shoal(dir, &names, t_start);
    let serf_false_deaths = (!args.no_serf).then(|| {
        serf_events(dir)
            .into_iter()
            .filter(|(t, _, ev, _)| *t >= t_start && ev == "member-failed")
            .count()
    });
    drop(procs);
    drop(hosts);
    Ok(LossResult {
        shoal_false_deaths,
        shoal_suspicions,
        serf_false_deaths,
        dropped,
    })
}

fn count_shoal(dir: &Path, names: &[String], since: u64) -> (usize, usize) {
    let mut deaths = 0;
    let mut suspicions = 0;
    for n in names {
        let log = std::fs::read_to_string(log_of(dir, n)).unwrap_or_default();
        for t in transitions(&log).into_iter().filter(|t| t.at_ms >= since) {
            match t.state.as_str() {
                "dead" => deaths += 1,
                "suspect" => suspicions += 1,
                _ => {}
            }
        }
    }
    (deaths, suspicions)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    println!(
        "failure detection, {} nodes on 127.0.0.1, {} SIGKILL trials each",
        args.nodes, args.trials
    );
    let shoal = shoal_detection(&args)?;
    let serf = if args.no_serf {
        Vec::new()
    } else {
        serf_detection(&args)?
    };
    let row = |name: &str, s: &[f64]| {
        println!(
            "{name:<28} p50 {:6.3} s   p99 {:6.3} s   min {:6.3} s   max {:6.3} s",
            percentile(s, 50.0),
            percentile(s, 99.0),
            percentile(s, 0.0),
            percentile(s, 100.0)
        )
    };
    let serf_version = Command::new("serf").arg("version").output().ok().map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    });
    let loss = if args.loss_seconds > 0 {
        Some(loss_phase(&args)?)
    } else {
        None
    };
    println!();
    println!(
        "kill -9 -> marked dead by every survivor ({} nodes, {} trials)",
        args.nodes, args.trials
    );
    row("shoal", &shoal);
    if !serf.is_empty() {
        row(
            &format!("serf ({})", serf_version.clone().unwrap_or_default()),
            &serf,
        );
        println!(
            "ratio serf/shoal p50: {:.1}x",
            percentile(&serf, 50.0) / percentile(&shoal, 50.0)
        );
    }
    if let Some(l) = &loss {
        println!(
            "{}% loss on every link for {} s: shoal false deaths {} (suspicions {}), serf false deaths {}",
            args.loss_percent,
            args.loss_seconds,
            l.shoal_false_deaths,
            l.shoal_suspicions,
            l.serf_false_deaths.map(|n| n.to_string()).unwrap_or("-".into())
        );
    }
    if let Some(out) = &args.out {
        let mut m: HashMap<&str, serde_json::Value> = HashMap::new();
        m.insert("nodes", args.nodes.into());
        m.insert("trials", args.trials.into());
        m.insert("shoal_detection_s", serde_json::json!({"p50": percentile(&shoal, 50.0), "p99": percentile(&shoal, 99.0), "samples": shoal}));
        m.insert("serf_detection_s", serde_json::json!({"p50": percentile(&serf, 50.0), "p99": percentile(&serf, 99.0), "samples": serf, "version": serf_version}));
        if let Some(l) = &loss {
            m.insert("loss", serde_json::json!({"percent": args.loss_percent, "seconds": args.loss_seconds, "shoal_false_deaths": l.shoal_false_deaths, "shoal_suspicions": l.shoal_suspicions, "serf_false_deaths": l.serf_false_deaths, "packets_dropped": l.dropped}));
        }
        std::fs::write(out, serde_json::to_string_pretty(&m)?)?;
    }
    Ok(())
}
