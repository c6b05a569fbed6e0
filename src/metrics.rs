//! `GET /metrics`: this agent's state in the Prometheus text format
//! (OpenMetrics 1.0, which Prometheus reads), through the Prometheus
//! project's Rust client.
//!
//! Everything is read from this node's own state at scrape time (the API
//! snapshot, the membership view, the transport's counters), so a scrape
//! costs a walk over what the node already holds and never asks a peer.
//! Two things are recorded as they happen: API requests by route and
//! status (a middleware), and the duration of each reconcile pass (a
//! histogram fed by the event loop).
//!
//! Names follow Prometheus conventions: the `shoal_` prefix, `_total` on
//! counters, base units in the name (`_seconds`, `_bytes`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use shoal_membership::MembershipView;
use tokio::sync::watch;

use crate::api::Snapshot;

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The route as declared (`/v1/jobs/{name}`), not the path asked for:
    /// the label's values stay few whatever clients send.
    pub route: String,
    /// The answer's status code.
    pub status: u16,
}

/// Most distinct (method, route, status) label sets kept: routes are
/// fixed, but a bound costs nothing.
pub const REQUEST_LABELS_MAX: usize = 512;

/// The agent's metrics: what is recorded as it happens, and the registry
/// that reads the rest at scrape time.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_labels: Mutex<usize>,
    passes: Histogram,
    notifications: Family<OutcomeLabels, Counter>,
    driver_errors: Family<DriverErrorLabels, Counter>,
    exits: Family<OutcomeLabels, Counter>,
}

/// Labels of a driver's failed operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverErrorLabels {
    /// `exec`, `docker`, `hollow`, or `none` (no such driver here).
    pub driver: String,
    /// `start` or `stop`.
    pub op: &'static str,
}

/// Drivers whose errors are counted by name (others count as `other`).
const DRIVERS_NAMED: [&str; 4] = ["exec", "docker", "hollow", "none"];

/// An `outcome` label: of a notification's delivery (see
/// `crate::notify`: `sent`, `failed` after every attempt, `dropped` with
/// too many pending, `retried`), or of an instance's end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// See above.
    pub outcome: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Metrics reading `local` at each scrape.
    pub fn new(local: Local) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("shoal");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests answered, by method, route and status",
            requests.clone(),
        );
        // 100 µs to ~6.5 s.
        let passes = Histogram::new(exponential_buckets(0.0001, 4.0, 9));
        registry.register_with_unit(
            "reconcile_pass_duration",
            "Time the scheduler's periodic reconcile passes took (the timer's; passes run by events are counted in shoal_reconcile_passes_total only)",
            Unit::Seconds,
            passes.clone(),
        );
        let notifications = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "notifications",
            "Webhook deliveries of failure notifications this node was the one to send, by outcome",
            notifications.clone(),
        );
        for outcome in ["sent", "failed", "dropped", "retried"] {
            let _ = notifications.get_or_create(&OutcomeLabels { outcome });
        }
        let driver_errors = Family::<DriverErrorLabels, Counter>::default();
        registry.register(
            "driver_errors",
            "Driver operations that failed on this node (an instance that would not start or stop), by driver and operation",
            driver_errors.clone(),
        );
        let exits = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "instance_exits",
            "Instances of this node that ended, by how: success (exit 0), failure (another code, or could not run), signal (killed, stops included) or lost (its supervisor vanished)",
            exits.clone(),
        );
        for outcome in ["success", "failure", "signal", "lost"] {
            let _ = exits.get_or_create(&OutcomeLabels { outcome });
        }
        registry.register_collector(Box::new(local));
        Arc::new(Metrics {
            exits,
            driver_errors,
            registry: Mutex::new(registry),
            requests,
            request_labels: Mutex::new(0),
            passes,
            notifications,
        })
    }

    /// Counts an API request.
    pub fn request(&self, method: &str, route: &str, status: u16) {
        let labels = RequestLabels {
            method: method.to_string(),
            route: route.to_string(),
            status,
        };
        // A new label set only while under the bound.
        {
            let mut n = self
                .request_labels
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.requests.get(&labels).is_none() {
                if *n >= REQUEST_LABELS_MAX {
                    return;
                }
                *n += 1;
            }
        }
        self.requests.get_or_create(&labels).inc();
    }

    /// Counts an instance's end.
    pub fn exit(&self, state: &shoal_core::instance::InstanceState) {
        use shoal_core::instance::InstanceState;
        let outcome = match state {
            InstanceState::Exited(s) if s.success() => "success",
            InstanceState::Exited(s) if s.signal.is_some() => "signal",
            InstanceState::Exited(_) => "failure",
            InstanceState::Lost => "lost",
            InstanceState::Running => return,
        };
        self.exits.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a driver operation that failed.
    pub fn driver_error(&self, driver: &str, op: &'static str) {
        let driver = if DRIVERS_NAMED.contains(&driver) {
            driver
        } else {
            "other"
        };
        self.driver_errors
            .get_or_create(&DriverErrorLabels {
                driver: driver.to_string(),
                op,
            })
            .inc();
    }

    /// Counts a notification delivery's outcome.
    pub fn notification(&self, outcome: &'static str) {
        self.notifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Records a reconcile pass's duration.
    pub fn pass(&self, took: Duration) {
        self.passes.observe(took.as_secs_f64());
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What a scrape reads of the node's state.
pub struct Local {
    /// This node's name.
    pub me: String,
    /// The API snapshot.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The membership view.
    pub view: watch::Receiver<MembershipView>,
    /// The transport's counters.
    pub transport: Arc<shoal_transport::TransportStats>,
    /// Failure detection's counters.
    pub swim: Arc<shoal_membership::SwimStats>,
    /// The store's file.
    pub store: PathBuf,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Local")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// A zero count for each of `keys`.
fn counts<'a>(keys: impl IntoIterator<Item = &'a str>) -> BTreeMap<&'a str, i64> {
    keys.into_iter().map(|k| (k, 0)).collect()
}

/// A gauge family: one value per label set.
fn gauge_family<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, i64)>,
) -> std::fmt::Result {
    let mut fam = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, n) in rows {
        ConstGauge::new(n).encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter family: one value per label set.
fn counter_family<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> std::fmt::Result {
    let mut fam = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, n) in rows {
        ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The scheduler's counters as `/v1/stats` names them: (key, metric,
/// help).
const SCHEDULER_COUNTERS: [(&str, &str, &str); 11] = [
    (
        "passes",
        "reconcile_passes",
        "Reconcile passes of the scheduler",
    ),
    (
        "rounds",
        "placement_rounds",
        "Placement rounds this node coordinated",
    ),
    ("slots_placed", "placements", "Slots this node placed"),
    (
        "placements_failed",
        "unplaceable",
        "Placements that found no node with room",
    ),
    (
        "instance_starts",
        "instance_starts",
        "Instances this node started",
    ),
    (
        "instance_stops",
        "instance_stops",
        "Instances this node stopped",
    ),
    (
        "anti_entropy_exchanges",
        "anti_entropy_rounds",
        "Anti-entropy exchanges begun with a peer",
    ),
    (
        "anti_entropy_exchanges_done",
        "anti_entropy_rounds_completed",
        "Anti-entropy exchanges completed",
    ),
    (
        "anti_entropy_items",
        "anti_entropy_records",
        "Job records received by anti-entropy",
    ),
    (
        "jobs_collected",
        "jobs_collected",
        "Stopped jobs forgotten after their retention",
    ),
    (
        "writes_refused_for_clock_skew",
        "writes_refused_clock_skew",
        "Writes refused because of clock skew",
    ),
];

impl Collector for Local {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Members by state (every state listed, 0 included).
        let mut members = counts(["alive", "suspect", "dead", "left"]);
        for m in &self.view.borrow().members {
            *members.entry(m.state.as_str()).or_insert(0) += 1;
        }
        gauge_family(
            &mut e,
            "members",
            "Members of the cluster this node knows, by state",
            members.into_iter().map(|(s, n)| (vec![("state", s)], n)),
        )?;
        let snap = self.snapshot.borrow().clone();
        // This node's instances, by job and state.
        let mut by: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        let mut restarts: BTreeMap<&str, i64> = BTreeMap::new();
        for i in snap.instances.iter().filter(|i| i.node == self.me) {
            *by.entry((i.job.as_str(), i.state.as_str())).or_insert(0) += 1;
            *restarts.entry(i.job.as_str()).or_insert(0) += i64::from(i.restarts);
        }
        gauge_family(
            &mut e,
            "instances",
            "Instances on this node, by job and state",
            by.into_iter()
                .map(|((job, state), n)| (vec![("job", job), ("state", state)], n)),
        )?;
        gauge_family(
            &mut e,
            "instance_restarts",
            "Restarts of the current copies on this node, by job",
            restarts.into_iter().map(|(job, n)| (vec![("job", job)], n)),
        )?;
        // Deployments by state, as this node sees the jobs.
        let mut deployments = counts(["running", "successful", "failed", "cancelled"]);
        for d in snap.jobs.iter().filter_map(|j| j.deployment.as_ref()) {
            *deployments.entry(d.state.as_str()).or_insert(0) += 1;
        }
        gauge_family(
            &mut e,
            "deployments",
            "Current deployments of the live jobs, by state",
            deployments
                .into_iter()
                .map(|(s, n)| (vec![("state", s)], n)),
        )?;
        gauge(
            &mut e,
            "jobs",
            "Job records this node holds (stopped ones included until collected)",
            None,
            snap.scheduler["jobs"].as_i64().unwrap_or(0),
        )?;
        for (key, name, help) in SCHEDULER_COUNTERS {
            counter(
                &mut e,
                name,
                help,
                snap.scheduler[key].as_u64().unwrap_or(0),
            )?;
        }
        use shoal_transport::TransportStats as S;
        let t = &self.transport;
        for (name, help, v) in [
            (
                "transport_frames_sent",
                "Frames sent to peers",
                S::get(&t.frames_sent),
            ),
            (
                "transport_frames_received",
                "Frames received from peers",
                S::get(&t.frames_received),
            ),
            (
                "transport_sent_bytes",
                "Frame bytes sent to peers",
                S::get(&t.bytes_sent),
            ),
            (
                "transport_received_bytes",
                "Frame bytes received from peers",
                S::get(&t.bytes_received),
            ),
            (
                "transport_frames_refused",
                "Frames refused (undecodable, oversized, unauthorised, queue full)",
                S::get(&t.frames_undecodable)
                    .saturating_add(S::get(&t.frames_oversized))
                    .saturating_add(S::get(&t.frames_refused))
                    .saturating_add(S::get(&t.frames_dropped_queue_full)),
            ),
            (
                "transport_sends_failed",
                "Sends to peers that failed",
                S::get(&t.sends_failed),
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        // One family per measure, each with a sent and a received value
        // per service (the test service is not a real one).
        type Pair = fn(&shoal_transport::ServiceStats) -> (u64, u64);
        let families: [(&str, &str, Pair); 2] = [
            (
                "transport_service_frames",
                "Frames sent to and received from peers, by service (gossip, probe, rpc, join)",
                |c| (S::get(&c.frames_sent), S::get(&c.frames_received)),
            ),
            (
                "transport_service_bytes",
                "Frame body bytes sent to and received from peers, by service (request answers in the totals only)",
                |c| (S::get(&c.bytes_sent), S::get(&c.bytes_received)),
            ),
        ];
        for (name, help, pair) in families {
            counter_family(
                &mut e,
                name,
                help,
                shoal_transport::SERVICES
                    .iter()
                    .zip(&t.by_service)
                    .filter(|(s, _)| **s != shoal_transport::Service::Test)
                    .flat_map(|(s, c)| {
                        let (sent, received) = pair(c);
                        [
                            (vec![("service", s.as_str()), ("direction", "sent")], sent),
                            (
                                vec![("service", s.as_str()), ("direction", "received")],
                                received,
                            ),
                        ]
                    }),
            )?;
        }
        let w = &self.swim;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, v) in [
            (
                "swim_probes",
                "SWIM probes sent (direct pings)",
                get(&w.probes),
            ),
            (
                "swim_indirect_probes",
                "SWIM indirect probes asked of relays",
                get(&w.indirect_probes),
            ),
            (
                "swim_probe_failures",
                "SWIM probes that got no ack in time",
                get(&w.probe_failures),
            ),
            (
                "swim_suspicions",
                "Members this node saw become suspect",
                get(&w.suspicions),
            ),
            (
                "swim_refutations",
                "Suspicions of this node it refuted",
                get(&w.refutations),
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        let store = std::fs::metadata(&self.store).map_or(0, |m| m.len());
        gauge(
            &mut e,
            "store",
            "Size of this node's store file",
            Some(&Unit::Bytes),
            i64::try_from(store).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "process_resident_memory",
            "Resident memory of the agent",
            Some(&Unit::Bytes),
            i64::try_from(crate::host::rss_kib().saturating_mul(1024)).unwrap_or(i64::MAX),
        )?;
        Ok(())
    }
}
