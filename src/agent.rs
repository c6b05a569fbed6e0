//! The agent: one per machine. It owns the node's event loop.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shoal_membership::{Capacity, Membership, MembershipConfig, NodeRecord};
use shoal_transport::{take_inbox, QuicConfig, QuicTransport, Service, Transport};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::api::Snapshot;
use crate::driver::docker::DockerDriver;
use crate::driver::exec::ExecDriver;
use crate::driver::hollow::HollowDriver;
use crate::driver::Driver;
use crate::store::Store;
use shoal_core::{Recovered, Scheduler, SchedulerConfig};

use crate::api::{self, ApiState};
use crate::credentials::{self, Origin};
use crate::host;
use crate::identity;

/// Everything the agent is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Failure notifications (`--notify-webhook`, `--notify-restarts`).
    pub notify: crate::notify::Config,
    /// Unique node name.
    pub name: String,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Address peers use; derived from `listen` when not given.
    pub advertise: Option<SocketAddr>,
    /// Seeds to join through; empty bootstraps a new cluster (or rejoins
    /// with the data dir's token).
    pub join: Vec<SocketAddr>,
    /// Join token, if given.
    pub token: Option<String>,
    /// HTTP API listen address.
    pub http: SocketAddr,
    /// Where DNS is served.
    pub dns: Dns,
    /// The routing mesh on.
    pub ingress: bool,
    /// The address its ports listen on [default: the advertise address's
    /// IP].
    pub ingress_addr: Option<IpAddr>,
    /// Token the HTTP API requires.
    pub http_token: Option<String>,
    /// Bounds on the API's connections.
    pub http_limits: crate::api::HttpLimits,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// CPU capacity override, millicores.
    pub cpu_millis: Option<u64>,
    /// Memory capacity override, MiB.
    pub memory_mib: Option<u64>,
    /// Membership tuning.
    pub membership: MembershipConfig,
    /// Offer the `hollow` driver (scale benchmarks only).
    pub hollow: bool,
    /// The user exec tasks run as unless their job names one (`None`: the
    /// agent's).
    pub task_user: Option<String>,
    /// Move the state database aside and refill it from the cluster.
    pub recover_from_peers: bool,
    /// Delete the store's job records stamped too far ahead of the clock.
    pub drop_future_records: bool,
    /// Scheduler timings and bounds.
    pub scheduler: SchedulerConfig,
    /// How long this node's certificates are valid (it renews them after
    /// two thirds).
    pub cert_lifetime: std::time::Duration,
    /// How long the join tokens this node writes to its data dir are valid.
    pub join_token_ttl: std::time::Duration,
}

/// What a running agent writes to `<data-dir>/agent.json` once it serves, so
/// that scripts and tests can find ports chosen by the OS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Node name.
    pub name: String,
    /// QUIC address peers use.
    pub quic: SocketAddr,
    /// HTTP API URL.
    pub http: String,
    /// Generation of this run.
    pub generation: u64,
    /// Process id.
    pub pid: u32,
    /// Where it answers DNS, if it does.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
    /// Where the routing mesh's ports listen, if it is on.
    #[serde(default)]
    pub ingress: Option<IpAddr>,
}

/// Where an agent serves DNS (`--dns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dns {
    /// The default address: if it cannot be bound the agent runs on
    /// without DNS and reports it.
    Default(SocketAddr),
    /// An address the operator gave: the agent fails to start without it.
    At(SocketAddr),
    /// Off.
    Off,
}

/// Next generation: the wall clock in ms, but always above the last run's.
fn next_generation(data_dir: &std::path::Path) -> Result<u64> {
    let path = data_dir.join("generation");
    let last: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let generation = now.max(last + 1);
    std::fs::write(&path, generation.to_string())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(generation)
}

/// The local address used to reach `peer` (no packet is sent).
fn route_to(peer: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().ok()?
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// The address peers reach this node at, listening on `bound`: the one
/// given, else `bound` unless it is unspecified, else the local address
/// that routes to the first seed (or loopback) with `bound`'s port.
fn advertise_addr(config: &AgentConfig, bound: SocketAddr) -> SocketAddr {
    match config.advertise {
        Some(a) => a,
        None if !bound.ip().is_unspecified() => bound,
        None => {
            let ip = config
                .join
                .first()
                .and_then(|s| route_to(*s))
                .unwrap_or(Ipv4Addr::LOCALHOST.into());
            SocketAddr::new(ip, bound.port())
        }
    }
}

/// Runs an agent until `shutdown` completes, then leaves the cluster
/// gracefully.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    // Only the agent's user reads its state: jobs' env secrets, the join
    // token, the API token, instance logs. Files it creates from here on
    // are private too (umask 077, set by `shoal agent` at start).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| {
                format!(
                    "cannot make {} private (mode 0700)",
                    config.data_dir.display()
                )
            })?;
    }
    let http_token = credentials::api_token(&config.data_dir, config.http_token.as_deref())?;
    let start = credentials::load_or_bootstrap(
        &config.data_dir,
        config.token.as_deref(),
        !config.join.is_empty(),
    )?;
    let (ca, origin, joined_in_touch) = match start {
        credentials::Start::Member(ca, origin) => (ca, origin, None),
        credentials::Start::Join(token, fallback) => {
            // The port may still be unknown (0): only the IP decides
            // whether the name is free.
            let address = advertise_addr(&config, config.listen);
            match identity::join(&config.join, &token, &config.name, address).await {
                Ok((ca, in_touch)) => {
                    credentials::save_ca(&config.data_dir, &ca)?;
                    info!(cluster = %ca.cluster_id, "admitted to the cluster with a join token");
                    (ca, Origin::Joined, Some(in_touch))
                }
                Err(e) => match fallback {
                    Some(ca) => {
                        warn!(error = %format!("{e:#}"), "the join token did not admit this node; running with the CA in its data dir");
                        (ca, Origin::DataDir, None)
                    }
                    None => return Err(e),
                },
            }
        }
    };
    let (identity, creds) = identity::Identity::new(
        &config.data_dir,
        &config.name,
        config.cert_lifetime,
        config.join_token_ttl,
        ca.clone(),
    )?;
    let token = identity.write_token_file()?;

    let (transport, mut inbox) =
        QuicTransport::bind(config.listen, &creds, QuicConfig::default()).await?;
    let advertise = advertise_addr(&config, transport.local_addr());
    // A node a member just admitted had its name checked then.
    let seed_in_touch = match joined_in_touch {
        Some(in_touch) => in_touch,
        None => claim_name(&transport, &config.join, &config.name, advertise).await?,
    };
    tokio::spawn(identity::maintain(identity.clone(), transport.clone()));
    let generation = next_generation(&config.data_dir)?;

    let http_listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http))?;
    let http_addr = http_listener.local_addr()?;
    // DNS's sockets too, before the node joins: an address given with
    // --dns that cannot be had stops the agent before it is a member.
    let problems = crate::api::Problems::default();
    let dns_sockets = match config.dns {
        Dns::Off => None,
        Dns::At(addr) => Some(crate::dns::bind(addr).await?),
        Dns::Default(addr) => match crate::dns::bind(addr).await {
            Ok(sockets) => Some(sockets),
            Err(e) => {
                let why = format!(
                    "dns: {e:#}; this node answers no DNS (give --dns another address, or --dns off)"
                );
                warn!("{why}");
                problems
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert("dns".into(), why);
                None
            }
        },
    };

    let store_path = config.data_dir.join("state.redb");
    if config.recover_from_peers && config.join.is_empty() {
        anyhow::bail!(
            "--recover-from-peers refills the store from the cluster: give --join SEED too"
        );
    }
    out_of_touch_check(&config, &store_path, seed_in_touch);
    let opened = match Store::open_at_start(&store_path) {
        Ok(opened) => opened,
        // Only a store that cannot be used is moved aside: the flag left in
        // a unit file must not throw away a healthy one at every restart
        // (found in review).
        Err(e) if config.recover_from_peers => {
            let to = Store::move_aside(&store_path, "corrupt")?;
            warn!(error = %format!("{e:#}"), moved_to = %to.display(),
                "state database moved aside; refilling it from the cluster");
            Store::open_at_start(&store_path)?
        }
        Err(e) => return Err(e),
    };
    let crate::store::Opened {
        store,
        jobs: stored_jobs,
        completions: stored_completions,
        members: remembered,
    } = opened;
    let stored_jobs = if config.drop_future_records {
        drop_future_records(&store, stored_jobs, config.scheduler.max_clock_offset_ms())?
    } else {
        stored_jobs
    };
    {
        // A store an earlier version created world-readable.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            config.data_dir.join("state.redb"),
            std::fs::Permissions::from_mode(0o600),
        );
    }
    let mut drivers: std::collections::BTreeMap<String, std::sync::Arc<dyn Driver>> =
        Default::default();
    let exe =
        std::env::current_exe().context("cannot find the shoal binary for `shoal supervise`")?;
    drivers.insert(
        "exec".into(),
        std::sync::Arc::new(
            ExecDriver::new(config.data_dir.join("instances"), exe)?
                .with_task_user(config.task_user.clone()),
        ),
    );
    if config.hollow {
        drivers.insert(
            "hollow".into(),
            std::sync::Arc::new(HollowDriver::default()),
        );
    }
    let mut notes = Vec::new();
    match DockerDriver::detect(&ca.cluster_id, &config.name).await {
        Ok((driver, engine)) => {
            info!(engine = %engine.version, api = %engine.api, "docker driver available");
            notes.push(format!(
                "docker: Engine {} (API {})",
                engine.version, engine.api
            ));
            drivers.insert("docker".into(), std::sync::Arc::new(driver));
        }
        Err(e) => {
            info!(reason = %format!("{e:#}"), "docker driver unavailable");
            notes.push(format!("docker driver unavailable: {e:#}"));
        }
    }
    if !host::cgroup_limits_writable() {
        notes.push(
            "no writable cgroup (v2, or v1 memory and cpu): CPU and memory limits of exec \
             instances are not enforced"
                .to_string(),
        );
    }

    let record = NodeRecord {
        name: config.name.clone(),
        address: advertise,
        labels: config.labels.clone(),
        capacity: Capacity {
            cpu_millis: config.cpu_millis.unwrap_or_else(host::cpu_millis),
            memory_mib: config.memory_mib.unwrap_or_else(host::memory_mib),
        },
        drivers: drivers.keys().cloned().collect(),
        version: env!("CARGO_PKG_VERSION").into(),
        http: Some(format!("http://{http_addr}")),
        notes,
    };
    let membership_config = MembershipConfig {
        cluster_id: ca.cluster_id.clone(),
        seeds: config.join.clone(),
        ..config.membership.clone()
    };
    let membership = std::sync::Arc::new(
        Membership::start(
            transport.clone(),
            &mut inbox,
            record,
            generation,
            transport.signer(),
            membership_config,
        )
        .await?,
    );
    let rpc_rx = take_inbox(&mut inbox, Service::Rpc).expect("rpc queue");
    // Joins are answered beside the loop; their name checks join the RPC
    // queue of the loop through a second, local queue.
    let (claims_tx, claims_rx) = mpsc::channel(shoal_transport::INBOUND_QUEUE_LEN);
    let join_rx = take_inbox(&mut inbox, Service::Join).expect("join queue");
    tokio::spawn(identity::serve_joins(
        identity.clone(),
        transport.clone(),
        join_rx,
        claims_tx,
    ));
    // Services nobody serves: closing their queues makes the transport
    // refuse such frames at once instead of parking them.
    drop(inbox);

    let (driver_tx, driver_rx) = mpsc::channel(crate::driver::DRIVER_EVENTS_LEN);
    for d in drivers.values() {
        if let Some(mut rx) = d.events() {
            let tx = driver_tx.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    if tx.send(ev).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    let seed = generation ^ shoal_core::job::fnv1a(config.name.as_bytes());
    let mut core = Scheduler::new(
        config.scheduler.clone(),
        &config.name,
        drivers.keys().cloned().collect(),
        seed,
        stored_jobs,
        stored_completions,
        remembered,
        !config.join.is_empty(),
        crate::node::now(),
    );
    let mut recovered = Vec::new();
    for (name, driver) in &drivers {
        for (spec, state) in driver.recover().await? {
            recovered.push(Recovered {
                driver: name.clone(),
                spec,
                state,
            });
        }
    }
    // What recovery decided (stop copies of jobs that are gone, record a
    // batch success that ended while the agent was down) is carried out by
    // the loop like any other effect.
    let recovered = core.handle_recovered(recovered, crate::node::now());

    let (snapshot_tx, snapshot_rx) = watch::channel(std::sync::Arc::new(Snapshot::default()));
    let (api_tx, api_rx) = mpsc::channel(256);
    let (persisted_tx, persisted_rx) = mpsc::channel(crate::store::WRITES_QUEUED_MAX);
    let store_health = crate::store::StoreHealth::default();
    let store_tx = crate::store::spawn_writer(store, store_health.clone(), persisted_tx);
    let dns = dns_sockets.map(|sockets| {
        let bound = sockets.bound;
        crate::dns::serve(sockets, snapshot_rx.clone(), membership.view());
        bound
    });
    let ingress = config
        .ingress
        .then(|| config.ingress_addr.unwrap_or(advertise.ip()));
    if let Some(at) = ingress {
        tokio::spawn(crate::ingress::run(
            at,
            config.name.clone(),
            snapshot_rx.clone(),
            problems.clone(),
        ));
    }
    let metrics = crate::metrics::Metrics::new(crate::metrics::Local {
        me: config.name.clone(),
        snapshot: snapshot_rx.clone(),
        view: membership.view(),
        transport: transport.stats(),
        swim: membership.stats(),
        store: store_path.clone(),
    });
    let events = crate::events::Events::new();
    tokio::spawn(crate::events::run(
        events.clone(),
        snapshot_rx.clone(),
        membership.view(),
    ));
    tokio::spawn(crate::notify::run(
        config.notify.clone(),
        events.clone(),
        snapshot_rx.clone(),
        membership.view(),
        metrics.clone(),
    ));
    let state = ApiState {
        events: events.clone(),
        identity: identity.clone(),
        transport: transport.clone(),
        store_health: store_health.clone(),
        problems: problems.clone(),
        metrics: metrics.clone(),
        view: membership.view(),
        token: Arc::from(http_token.as_str()),
        snapshot: snapshot_rx.clone(),
        commands: api_tx,
        transport_stats: transport.stats(),
    };
    tokio::spawn(mark_in_touch(
        config.data_dir.join(IN_TOUCH_FILE),
        snapshot_rx,
    ));
    let app = api::router(state);
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_limits = config.http_limits;
    let http_task = tokio::spawn(async move {
        api::serve(http_listener, app, http_limits, async {
            let _ = http_stop_rx.await;
        })
        .await
    });

    let info = AgentInfo {
        name: config.name.clone(),
        quic: advertise,
        http: format!("http://{http_addr}"),
        generation,
        pid: std::process::id(),
        dns,
        ingress,
    };
    credentials::write_private(
        &config.data_dir.join("agent.json"),
        &serde_json::to_string_pretty(&info)?,
    )?;
    info!(name = %config.name, quic = %advertise, http = %info.http, generation, "agent started");
    // As Jupyter does: the URL that opens the page logged in (whoever
    // reads this log may read the token file too).
    info!("web page: {}", api::ui_url(&info.http, &http_token));
    if origin == Origin::Bootstrapped {
        let token_path = config.data_dir.join(credentials::TOKEN_FILE);
        let token_path = token_path.canonicalize().unwrap_or(token_path);
        // Not println!: a stdout that cannot be written (a full disk under
        // its file) must not panic the agent.
        let _ = writeln!(
            std::io::stdout(),
            "Bootstrapped a new shoal cluster ({}).\n\
             A join token is in {} (keep it secret: it admits nodes until it expires, in {}; \
             this node keeps a current one there, and `shoal token create` makes another).\n\
             On each other machine run:\n  \
             shoal agent --join {advertise} --token-file <copy of {}>\n\
             or, with the token inline:\n  \
             shoal agent --join {advertise} --token {}",
            ca.cluster_id,
            token_path.display(),
            humantime::format_duration(config.join_token_ttl),
            token_path.display(),
            token.encode()
        );
    }

    let io = crate::node::Io {
        transport: transport.clone(),
        membership: membership.clone(),
        drivers,
        store: store_tx,
        store_health,
        persisted: persisted_rx,
        rpc: rpc_rx,
        claims: claims_rx,
        driver_events: driver_rx,
        api: api_rx,
        snapshot: snapshot_tx,
        problems,
        metrics,
    };
    crate::node::run(core, io, recovered, shutdown).await?;
    events.close();
    let _ = http_stop_tx.send(());
    let _ = http_task.await;
    transport.close();
    Ok(())
}

/// `<data-dir>/in-touch`: when this node last completed an anti-entropy
/// exchange with a peer (ms since the epoch), written at most every
/// [`IN_TOUCH_INTERVAL`].
pub const IN_TOUCH_FILE: &str = "in-touch";
/// How often `in-touch` is brought up to date.
pub const IN_TOUCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps `path` at the time of the last anti-entropy exchange this node
/// completed.
async fn mark_in_touch(path: PathBuf, snapshot: watch::Receiver<Arc<Snapshot>>) {
    let mut seen = 0u64;
    let mut every = tokio::time::interval(IN_TOUCH_INTERVAL);
    loop {
        every.tick().await;
        if snapshot.has_changed().is_err() {
            return;
        }
        let exchanges = snapshot.borrow().scheduler["anti_entropy_exchanges_done"]
            .as_u64()
            .unwrap_or(0);
        if exchanges > seen {
            seen = exchanges;
            let path = path.clone();
            let _ = tokio::task::spawn_blocking(move || {
                credentials::write_private(&path, &crate::node::now().wall_ms.to_string())
            })
            .await;
        }
    }
}

/// A node that was out of touch with its cluster for longer than
/// `job_gc_after` may hold jobs that were stopped and then forgotten by
/// every other node meanwhile: anti-entropy would hand them back and start
/// them again. Such a node's store is moved aside and refilled from the
/// cluster, but only when a seed answered that it has itself been in touch
/// (`seed_in_touch`): after the whole cluster was down for a weekend, no
/// node is, and every node keeps its store (found in review: each moved
/// its store aside and the cluster came back without a job).
fn out_of_touch_check(config: &AgentConfig, store_path: &std::path::Path, seed_in_touch: bool) {
    let Ok(text) = std::fs::read_to_string(config.data_dir.join(IN_TOUCH_FILE)) else {
        return;
    };
    let Ok(at) = text.trim().parse::<u64>() else {
        return;
    };
    let away = crate::node::now().wall_ms.saturating_sub(at);
    let limit = config.scheduler.job_gc_after_ms();
    if away <= limit || !store_path.exists() {
        return;
    }
    let away_h = format!("{:.1} h", away as f64 / 3_600_000.0);
    if !seed_in_touch {
        warn!(away = %away_h, "this node was out of touch with its cluster for longer than --job-gc-after, and no seed it reached has been in touch since: it keeps its store (jobs stopped and forgotten meanwhile may start again)");
        return;
    }
    match Store::move_aside(store_path, "stale") {
        Ok(to) => {
            let _ = std::fs::remove_file(config.data_dir.join(IN_TOUCH_FILE));
            warn!(away = %away_h, moved_to = %to.display(), "this node was out of touch with its cluster for longer than --job-gc-after: its store may hold jobs stopped and forgotten since, so it was moved aside and is refilled from the cluster")
        }
        Err(e) => warn!(error = %format!("{e:#}"), "cannot move the stale store aside"),
    }
}

/// How long a joining node waits for each seed's answer to its claim.
const CLAIM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Asks the seeds, before joining, whether this node's name is free: an
/// agent given the name of a live member at another address (by mistake:
/// names default to the host name) would replace it in every view and run
/// its work a second time. The first seed that answers decides; a seed that
/// cannot be reached, or runs a release without the check, lets it pass.
/// Returns whether the seed that answered has been in touch with its
/// cluster within `--job-gc-after` (see [`out_of_touch_check`]).
async fn claim_name(
    transport: &QuicTransport,
    seeds: &[SocketAddr],
    name: &str,
    address: SocketAddr,
) -> Result<bool> {
    use shoal_core::wire::{Request, Response, NAME_TAKEN};
    let body = Request::Claim {
        name: name.to_string(),
        address,
    }
    .encode();
    for seed in seeds {
        let Ok(bytes) = transport
            .request(*seed, Service::Rpc, body.clone(), CLAIM_TIMEOUT)
            .await
        else {
            continue;
        };
        match Response::decode(&bytes) {
            Ok(Response::Claimed { in_touch }) => return Ok(in_touch),
            Ok(Response::Error(e)) if e.starts_with(NAME_TAKEN) => {
                anyhow::bail!(
                    "cannot join through {seed}: {}",
                    e.trim_start_matches(NAME_TAKEN).trim()
                )
            }
            _ => return Ok(false),
        }
    }
    Ok(false)
}

/// Deletes from `store` the job records stamped more than `bound_ms` ahead
/// of this node's clock, and returns the others (`--drop-future-records`).
fn drop_future_records(
    store: &Store,
    jobs: Vec<shoal_core::records::JobRecord>,
    bound_ms: u64,
) -> Result<Vec<shoal_core::records::JobRecord>> {
    let now = crate::node::now().wall_ms;
    let (future, kept): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .partition(|r| r.version.hlc.ahead_of(now, bound_ms).is_err());
    if future.is_empty() {
        info!("--drop-future-records: no record is ahead of this node's clock");
        return Ok(kept);
    }
    let gone: Vec<(String, Option<shoal_core::hlc::Version>)> = future
        .iter()
        .map(|r| (r.name.clone(), Some(r.version.clone())))
        .collect();
    store
        .forget(&gone)
        .context("--drop-future-records: cannot delete the records")?;
    for r in &future {
        warn!(job = %r.name, version = %r.version, "--drop-future-records: deleted a job record stamped ahead of this node's clock; submit the job again if it should run");
    }
    Ok(kept)
}
