//! The routing mesh: a service's `ingress_port`, open on every agent
//! (`--ingress`, on by default, at the advertise address or
//! `--ingress-addr`), forwards each TCP connection to a passing instance.
//!
//! - **Which instance**: the passing instances on this node if there are
//!   any (no extra hop), else all of them; of those, two picked at random
//!   and the one with fewer connections open through this agent (the
//!   "power of two choices": nearly as even as least-connections over all,
//!   without every agent herding onto the same least-loaded instance).
//! - **Fresh**: the instances are read from the catalog at each
//!   connection. A copy being stopped leaves every catalog before its stop
//!   signal (`shutdown_delay`, 2 s by default for a job with a service),
//!   and a dead node's copies leave as soon as the node is declared dead.
//! - **A refused connection is tried elsewhere**: an instance that just
//!   died (its node not yet declared dead) refuses or times out; the
//!   connection goes to another instance, at most [`ATTEMPTS_MAX`] in all,
//!   each bounded by [`CONNECT_TIMEOUT`]. Bytes already forwarded cannot
//!   be replayed: a connection cut mid-way stays cut.
//! - **Bounded**: at most [`CONNECTIONS_MAX`] forwarded connections at once,
//!   [`CONNECTIONS_PER_SOURCE_MAX`] from one client address (one more is
//!   closed at once), and [`LISTENERS_MAX`] ports; TCP keepalive on both
//!   sides frees the slot of a connection whose peer vanished.
//!
//! The listeners follow the catalog: a port opens when a job declaring it
//! is written and closes when no live job declares it (connections open
//! through it run on). A port that cannot be bound (another program holds
//! it) is a problem of the node (`/v1/health`, `shoal nodes`) and is tried
//! again every [`REBIND_INTERVAL`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use shoal_core::catalog::{ingress_ports, Instance};
use shoal_core::health::Health;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::{Problems, Snapshot};

/// Most connections forwarded at once by one agent.
pub const CONNECTIONS_MAX: usize = 4_096;
/// Most of them from one client address (one client cannot take them all).
pub const CONNECTIONS_PER_SOURCE_MAX: usize = 512;
/// TCP keepalive on both sides of a forwarded connection: idle time before
/// the first probe, and between probes (the kernel gives up after 9): a
/// peer that vanished (its machine died) frees its slot within ~2 min.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// Most ingress ports one agent listens on.
pub const LISTENERS_MAX: usize = 256;
/// Instances tried for one connection.
pub const ATTEMPTS_MAX: usize = 3;
/// Longest wait for an instance to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a port that could not be bound is tried again.
pub const REBIND_INTERVAL: Duration = Duration::from_secs(5);

/// Picks the instance for a connection among `passing` (not yet tried):
/// those on `me` if any, else all; two at random (`rng`), the one with
/// fewer `open` connections.
pub fn choose<'a>(
    passing: &[&'a Instance],
    me: &str,
    open: &HashMap<SocketAddr, usize>,
    rng: &mut impl Rng,
) -> Option<&'a Instance> {
    let local: Vec<&Instance> = passing.iter().copied().filter(|i| i.node == me).collect();
    let pool: &[&Instance] = if local.is_empty() { passing } else { &local };
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let load = |i: &Instance| {
                open.get(&SocketAddr::new(i.address, i.port))
                    .copied()
                    .unwrap_or(0)
            };
            Some(if load(pool[b]) < load(pool[a]) {
                pool[b]
            } else {
                pool[a]
            })
        }
    }
}

/// Connections open per key (an instance's address, a client's), and a
/// guard that holds one until dropped.
type Tally<K> = Arc<Mutex<HashMap<K, usize>>>;

/// One connection counted in a [`Tally`] until dropped.
struct Held<K: std::hash::Hash + Eq + Copy> {
    tally: Tally<K>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Copy> Held<K> {
    /// Counts one more for `key`, unless it already has `max`.
    fn take(tally: &Tally<K>, key: K, max: usize) -> Option<Held<K>> {
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held {
            tally: tally.clone(),
            key,
        })
    }
}

impl<K: std::hash::Hash + Eq + Copy> Drop for Held<K> {
    fn drop(&mut self) {
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.key);
            }
        }
    }
}

/// What each listener needs.
#[derive(Clone)]
struct Shared {
    me: Arc<str>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Connections open to each instance through this agent.
    open: Tally<SocketAddr>,
    slots: Arc<Semaphore>,
    /// Connections open from each client address.
    sources: Tally<IpAddr>,
}

/// Turns TCP keepalive on (best effort).
fn keepalive(s: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

/// Forwards one accepted connection of `service`.
async fn forward(shared: Shared, service: String, mut client: TcpStream) {
    let mut tried: Vec<SocketAddr> = Vec::new();
    for _ in 0..ATTEMPTS_MAX {
        let target = {
            let snap = shared.snapshot.borrow();
            let Some(svc) = snap.catalog.get(&service) else {
                return;
            };
            let passing: Vec<&Instance> = svc
                .instances
                .iter()
                .filter(|i| i.health == Health::Passing)
                .filter(|i| !tried.contains(&SocketAddr::new(i.address, i.port)))
                .collect();
            let open = shared.open.lock().unwrap_or_else(|p| p.into_inner());
            choose(&passing, &shared.me, &open, &mut rand::rng())
                .map(|i| SocketAddr::new(i.address, i.port))
        };
        let Some(to) = target else {
            debug!(%service, "no passing instance to forward to");
            return;
        };
        tried.push(to);
        // Counted as open from the attempt on (no cap: the choice
        // spreads them).
        let counted = Held::take(&shared.open, to, usize::MAX);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                keepalive(&upstream);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                drop(counted);
                return;
            }
            Ok(Err(e)) => debug!(%service, %to, error = %e, "instance refused; trying another"),
            Err(_) => debug!(%service, %to, "instance did not answer in time; trying another"),
        }
    }
}

/// Accepts connections on one port for `service`.
async fn accept(listener: TcpListener, service: String, shared: Shared) {
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                warn!(error = %e, "ingress accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            debug!(%service, "ingress connection cap reached; closing a new connection");
            continue;
        };
        let Some(source) = Held::take(&shared.sources, from.ip(), CONNECTIONS_PER_SOURCE_MAX)
        else {
            debug!(%service, client = %from.ip(), "a client's ingress connection cap reached");
            continue;
        };
        let _ = conn.set_nodelay(true);
        keepalive(&conn);
        let (shared, service) = (shared.clone(), service.clone());
        tokio::spawn(async move {
            forward(shared, service, conn).await;
            drop(source);
            drop(permit);
        });
    }
}

/// The key of this module's entries in the node's problems.
fn problem_key(port: u16) -> String {
    format!("ingress:{port}")
}

/// Keeps one listener per ingress port of the catalog at `addr`, for as
/// long as the process runs.
pub async fn run(
    addr: IpAddr,
    me: String,
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
    problems: Problems,
) {
    let shared = Shared {
        me: Arc::from(me.as_str()),
        snapshot: snapshot.clone(),
        open: Arc::default(),
        slots: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
        sources: Arc::default(),
    };
    let mut listening: BTreeMap<u16, (String, JoinHandle<()>)> = BTreeMap::new();
    let mut last_wanted: BTreeMap<u16, String> = BTreeMap::new();
    let mut retry_due = false;
    let mut retry = tokio::time::interval(REBIND_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wanted: BTreeMap<u16, String> = {
            let snap = snapshot.borrow_and_update();
            let all = ingress_ports(&snap.catalog);
            let mut p = problems.lock().unwrap_or_else(|p| p.into_inner());
            if all.len() > LISTENERS_MAX {
                p.insert(
                    "ingress".into(),
                    format!(
                        "{} ingress ports are declared; this node listens on the first {LISTENERS_MAX} only",
                        all.len()
                    ),
                );
            } else {
                p.remove("ingress");
            }
            all.into_iter().take(LISTENERS_MAX).collect()
        };
        // Close what is no longer wanted (or now reaches another service).
        listening.retain(|port, (service, task)| {
            let keep = wanted.get(port) == Some(service);
            if !keep {
                task.abort();
                info!(port, %service, "ingress port closed");
            }
            keep
        });
        {
            let mut p = problems.lock().unwrap_or_else(|p| p.into_inner());
            // A port no longer wanted has no problem (a bound one's was
            // cleared when it bound).
            p.retain(|k, _| {
                !k.starts_with("ingress:") || wanted.keys().any(|port| *k == problem_key(*port))
            });
        }
        let changed = wanted != last_wanted;
        last_wanted = wanted.clone();
        for (port, service) in &wanted {
            // A port that failed is tried again on the retry tick, not at
            // every snapshot.
            let failed = problems
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&problem_key(*port));
            if listening.contains_key(port) || (failed && !changed && !retry_due) {
                continue;
            }
            match bind(SocketAddr::new(addr, *port)) {
                Ok(listener) => {
                    info!(port, %service, %addr, "ingress port open");
                    problems
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&problem_key(*port));
                    let task = tokio::spawn(accept(listener, service.clone(), shared.clone()));
                    listening.insert(*port, (service.clone(), task));
                }
                Err(e) => {
                    let why = format!(
                        "ingress port {port} of service `{service}` cannot be opened at {addr}: {e} \
                         (another program holds it?); tried again every {}s",
                        REBIND_INTERVAL.as_secs()
                    );
                    let mut p = problems.lock().unwrap_or_else(|p| p.into_inner());
                    if p.get(&problem_key(*port)) != Some(&why) {
                        warn!("{why}");
                    }
                    p.insert(problem_key(*port), why);
                }
            }
        }
        retry_due = false;
        tokio::select! {
            changed = snapshot.changed() => if changed.is_err() { break },
            _ = retry.tick() => retry_due = true,
        }
    }
    for (_, (_, task)) in listening {
        task.abort();
    }
}

/// A listener at `addr` with SO_REUSEADDR (a port closed and opened again
/// does not wait out TIME_WAIT).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn inst(node: &str, port: u16) -> Instance {
        Instance {
            job: "web".into(),
            slot: 0,
            node: node.into(),
            address: "127.0.0.1".parse().unwrap(),
            port,
            tags: vec![],
            health: Health::Passing,
            version: 1,
        }
    }

    #[test]
    fn the_same_node_is_preferred() {
        let (a, b, c) = (inst("n1", 1), inst("n2", 2), inst("n3", 3));
        let all = [&a, &b, &c];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let got = choose(&all, "n2", &HashMap::new(), &mut rng).unwrap();
            assert_eq!(got.node, "n2");
        }
        assert!(choose(&[], "n2", &HashMap::new(), &mut rng).is_none());
    }

    #[test]
    fn of_two_picks_the_less_loaded_wins() {
        let (a, b) = (inst("n1", 1), inst("n2", 2));
        let mut open = HashMap::new();
        open.insert(SocketAddr::new(a.address, 1), 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..100 {
            let got = choose(&[&a, &b], "n9", &open, &mut rng).unwrap();
            assert_eq!(got.port, 2, "two of two: always the one with fewer");
        }
        // With three, the most loaded is never chosen (it loses both ways).
        let c = inst("n3", 3);
        open.insert(SocketAddr::new(c.address, 3), 1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(choose(&[&a, &b, &c], "n9", &open, &mut rng).unwrap().port);
        }
        assert_eq!(seen, [2, 3].into_iter().collect());
    }
}
