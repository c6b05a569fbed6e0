//! `shoal demo`: a local cluster of real agent processes on loopback, to see
//! shoal work on one machine.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::api::{JobStatus, NodeInfo};
use crate::client::{Client, ClientArgs};
use crate::launch::{Launch, Launched};
use shoal_core::instance::SlotState;

/// Bound on every wait of the demo.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Agents to start (at least 3).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    pub exit_after: Option<u64>,
    /// Where the agents keep their state and logs [default: a new temporary directory].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// A demo agent: stopped gracefully (SIGTERM, then a kill) when dropped,
/// so that the demo leaves nothing behind however it ends.
struct DemoAgent(Launched);

impl std::ops::Deref for DemoAgent {
    type Target = Launched;
    fn deref(&self) -> &Launched {
        &self.0
    }
}

impl std::ops::DerefMut for DemoAgent {
    fn deref_mut(&mut self) -> &mut Launched {
        &mut self.0
    }
}

impl Drop for DemoAgent {
    fn drop(&mut self) {
        self.0.terminate(Duration::from_secs(3));
        // Anything the agent left (it was killed, or stopped too slowly).
        crate::driver::exec::kill_instances_under(&self.0.dir.join("instances"));
    }
}

fn start(root: &Path, name: &str, seed: Option<&str>) -> Result<DemoAgent> {
    let log = root.join(format!("{name}.log"));
    let mut launch = Launch::new(std::env::current_exe()?, name, root.join(name)).logs(&log, &log);
    if let Some(seed) = seed {
        launch = launch.join(&[seed.to_string()], &root.join("n1").join("join-token"));
    }
    interrupted()?;
    Ok(DemoAgent(launch.spawn()?))
}

fn client_args(a: &DemoAgent) -> ClientArgs {
    ClientArgs {
        addr: a.info.http.clone(),
        http_token: None,
        data_dir: a.dir.clone(),
    }
}

fn client(a: &DemoAgent) -> Client {
    Client::new(&client_args(a))
}

fn wait_view(
    observer: &DemoAgent,
    what: &str,
    mut cond: impl FnMut(&[NodeInfo]) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(nodes) = client(observer).get::<Vec<NodeInfo>>("/v1/nodes") {
            if cond(&nodes) {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > WAIT {
            bail!("timed out waiting until {what}");
        }
        interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

const DEMO_SERVICE: &str = "name = \"web\"\ntype = \"service\"\nreplicas = 6\n[task]\ncommand = \"sleep\"\nargs = [\"100000\"]\n[task.resources]\ncpu = 100\nmemory = 32\n";
const DEMO_BATCH: &str = "name = \"crunch\"\ntype = \"batch\"\nreplicas = 3\n[task]\ncommand = \"sh\"\nargs = [\"-c\", \"echo crunching slot $SHOAL_SLOT on $SHOAL_NODE\"]\n";

fn count(s: &JobStatus, state: SlotState) -> usize {
    s.instances
        .iter()
        .filter(|i| i.slot < s.replicas && i.state == state)
        .count()
}

fn wait_job(
    observer: &DemoAgent,
    job: &str,
    mut cond: impl FnMut(&JobStatus) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(s) = client(observer).get::<JobStatus>(&format!("/v1/jobs/{job}")) {
            if cond(&s) {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > WAIT {
            bail!("timed out waiting for job {job}");
        }
        interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn show_job(observer: &DemoAgent, job: &str) -> Result<()> {
    crate::commands::status(crate::commands::StatusArgs {
        client: ClientArgs {
            addr: observer.info.http.clone(),
            http_token: None,
            data_dir: observer.dir.clone(),
        },
        job: Some(job.to_string()),
        json: false,
    })
}

fn show(observer: &DemoAgent) -> Result<()> {
    crate::commands::nodes(crate::commands::NodesArgs {
        client: ClientArgs {
            addr: observer.info.http.clone(),
            http_token: None,
            data_dir: observer.dir.clone(),
        },
        json: false,
    })
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    // Ctrl-C or SIGTERM at any point stops the demo: its agents (stopped
    // gracefully) and its directory go as `run` returns.
    catch_signals();
    let tmp;
    let root = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    println!(
        "Starting {} shoal agents on 127.0.0.1 (state and logs in {}) ...",
        args.nodes,
        root.display()
    );
    let mut agents = vec![start(&root, "n1", None)?];
    let seed = agents[0].info.quic.to_string();
    for i in 2..=args.nodes {
        agents.push(start(&root, &format!("n{i}"), Some(&seed))?);
    }
    let n = args.nodes;
    let took = wait_view(&agents[0], "every node is alive", |ns| {
        ns.len() == n && ns.iter().all(|x| x.state == "alive")
    })?;
    println!(
        "\nThe cluster formed in {:.1} s (mutual-TLS QUIC, gossip membership):\n",
        took.as_secs_f64()
    );
    show(&agents[0])?;
    if let Some(token) = client_args(&agents[0]).token() {
        println!(
            "\nThe cluster's web page (any node serves it): {}",
            crate::api::ui_url(&agents[0].info.http, &token)
        );
    }

    // A service and a batch job, submitted at the first node.
    let api = client(&agents[0]);
    for (name, text) in [("web", DEMO_SERVICE), ("crunch", DEMO_BATCH)] {
        api.call("POST", "/v1/jobs", Some(text))
            .with_context(|| format!("submitting {name}"))?;
    }
    println!("\nSubmitted a service (web, 6 replicas of `sleep`) and a batch job (crunch, 3 slots) at n1.");
    let took = wait_job(&agents[0], "web", |s| count(s, SlotState::Running) == 6)?;
    wait_job(&agents[0], "crunch", |s| {
        count(s, SlotState::Completed) == 3
    })?;
    println!(
        "All 6 web slots running after {:.2} s, and crunch completed:\n",
        took.as_secs_f64()
    );
    show_job(&agents[0], "web")?;

    // Pull the plug on a node holding web slots: its agent and its processes.
    let status: JobStatus = client(&agents[0]).get("/v1/jobs/web")?;
    let name = status
        .instances
        .iter()
        .filter_map(|i| i.node.clone())
        .find(|n| n != &agents[0].name)
        .context("no web slot on another node")?;
    let victim = agents
        .iter()
        .position(|a| a.name == name)
        .expect("a demo node");
    let lost = status
        .instances
        .iter()
        .filter(|i| i.node.as_deref() == Some(name.as_str()))
        .count();
    println!("\nkill -9 {name} and every process it started ({lost} web slots) ...");
    agents[victim].stop(libc::SIGKILL);
    crate::driver::exec::kill_instances_under(&root.join(&name).join("instances"));
    let killed_at = Instant::now();
    let dead = wait_view(&agents[0], "the killed node is dead", |ns| {
        ns.iter().any(|x| x.name == name && x.state == "dead")
    })?;
    wait_job(&agents[0], "web", |s| {
        s.instances
            .iter()
            .filter(|i| i.state == SlotState::Running && i.node.as_deref() != Some(name.as_str()))
            .count()
            == 6
    })?;
    println!(
        "{name} declared dead after {:.2} s; its {lost} slots run elsewhere after {:.2} s:\n",
        dead.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );
    show_job(&agents[0], "web")?;
    println!();
    show(&agents[0])?;

    println!("\nRestarting {name} with the same data dir ...");
    agents[victim] = start(&root, &name, Some(&seed))?;
    wait_view(&agents[0], "the restarted node is alive", |ns| {
        ns.iter().any(|x| x.name == name && x.state == "alive")
    })?;
    println!("{name} is alive again.\n");
    show(&agents[0])?;

    println!("\nTry next (in another terminal; `shoal` is target/release/shoal):");
    println!("  export SHOAL_ADDR={}", agents[0].info.http);
    println!(
        "  export SHOAL_DATA_DIR={}   # the CLI reads the API token there",
        agents[0].dir.display()
    );
    println!("  shoal nodes");
    println!("  shoal status web");
    println!("  shoal scale web 9");
    println!("  shoal logs crunch --slot 1");
    println!("  shoal run examples/web.toml   # another version of web");
    println!("  shoal stop web");
    let until = args.exit_after.map(|secs| {
        println!("\nStopping in {secs} s.");
        Instant::now() + Duration::from_secs(secs)
    });
    if until.is_none() {
        println!("\nThe cluster keeps running until Ctrl-C (or SIGTERM).");
    }
    while until.is_none_or(|u| Instant::now() < u) && !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("Stopping the agents (graceful leave) ...");
    drop(agents);
    Ok(())
}

/// Set by SIGINT or SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Fails once a stop signal arrived, so the demo unwinds and cleans up.
fn interrupted() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted; the demo's agents and directory are removed");
    }
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(TempDir(dir))
}
