//! Services and the catalog: where each service's instances run now.
//!
//! A job names what it serves in `[[service]]` tables ([`ServiceSpec`]): a
//! name, a task port, tags, and which of the task's checks gate it. The
//! catalog is derived on every node from what it already has, the job
//! specs (replicated records) and the copies every node publishes in
//! gossip (with their ports, health and whether they are stopping): no
//! second replication, and no staler than failure detection. An instance
//! is in the catalog while its copy runs on a live (alive or suspect)
//! node and is not being stopped; it is passing while the checks that
//! gate it pass. So a copy being stopped leaves every catalog before its
//! stop signal (its `shutdown_delay` later), and a dead node's copies
//! leave as soon as the node is declared dead.
//!
//! [`build`] is a pure function of the desired state and a view: every
//! node with the same records and view computes the same catalog.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::desired::DesiredState;
use crate::health::Health;
use crate::instance::{Published, SlotState};
use crate::job::{JobSpec, TaskSpec};
use crate::view::ClusterView;

/// Most `[[service]]` tables per job.
pub const SERVICES_MAX: usize = 8;
/// Most tags per service.
pub const TAGS_MAX: usize = 16;
/// Longest tag, bytes.
pub const TAG_LEN_MAX: usize = 64;
/// Longest service name (one DNS label).
pub const SERVICE_NAME_LEN_MAX: usize = 63;
/// Most services a job `uses`.
pub const USES_MAX: usize = 16;
/// The `shutdown_delay` of a job that declares a service and sets none:
/// a copy being stopped leaves every node's catalog (and so DNS and the
/// routing mesh) before its stop signal. Two seconds cover gossip's spread
/// to every node with room to spare (`shutdown_delay = "0s"` opts out).
pub const SERVICE_SHUTDOWN_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// One `[[service]]` of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The service's name: a DNS label (lower-case letters, digits and
    /// '-'). Several jobs may serve one name; their instances are pooled.
    pub name: String,
    /// The task port it is reached on (a name of `task.ports`).
    pub port: String,
    /// Free-form tags, shown with each instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The task's checks (by name, as `shoal status` shows them) that
    /// gate the service: an instance passes while these pass. Default:
    /// all of the task's checks; `[]`: none (running is enough).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<String>>,
    /// A port every agent with the routing mesh on listens on and
    /// forwards to a passing instance (see `src/ingress.rs`): the same
    /// port on every node, so a client reaches the service at any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_port: Option<u16>,
}

/// Whether `name` is a valid service name: one DNS label of lower-case
/// letters, digits and '-', neither starting nor ending with '-'.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= SERVICE_NAME_LEN_MAX
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The environment variable holding `host:port` of a service a job uses:
/// `SHOAL_SERVICE_<NAME>` (upper-case, '-' as '_').
pub fn service_var(name: &str) -> String {
    format!(
        "SHOAL_SERVICE_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

/// The DNS name of a service.
pub fn service_dns_name(name: &str) -> String {
    format!("{name}.service.shoal")
}

impl ServiceSpec {
    /// What is wrong with it for `task`: (field under the service, why).
    pub fn problem(&self, task: &TaskSpec) -> Option<(String, String)> {
        if !valid_service_name(&self.name) {
            return Some((
                "name".into(),
                format!(
                    "`{}` must be 1 to {SERVICE_NAME_LEN_MAX} lower-case letters, digits or '-', \
                     not starting or ending with '-' (it is a DNS label: NAME.service.shoal)",
                    self.name.escape_debug()
                ),
            ));
        }
        if !task.ports.contains_key(&self.port) {
            let known: Vec<&str> = task.ports.keys().map(String::as_str).collect();
            return Some((
                "port".into(),
                if known.is_empty() {
                    format!(
                        "names no port of task.ports: add one, e.g. `[task.ports]` then `{} = 0`",
                        self.port.escape_debug()
                    )
                } else {
                    format!("names no port of task.ports (known: {})", known.join(", "))
                },
            ));
        }
        if self.tags.len() > TAGS_MAX {
            return Some(("tags".into(), format!("at most {TAGS_MAX} tags")));
        }
        if let Some(t) = self
            .tags
            .iter()
            .find(|t| t.is_empty() || t.len() > TAG_LEN_MAX || t.chars().any(char::is_control))
        {
            return Some((
                "tags".into(),
                format!(
                    "`{}`: a tag is 1 to {TAG_LEN_MAX} bytes without control characters",
                    t.escape_debug()
                ),
            ));
        }
        if self.ingress_port == Some(0) {
            return Some((
                "ingress_port".into(),
                "must be a port from 1 to 65535 (the same on every node; not 0)".into(),
            ));
        }
        if let Some(checks) = &self.checks {
            let names: Vec<String> = task.checks.iter().map(|c| c.display_name()).collect();
            if let Some(c) = checks.iter().find(|c| !names.contains(c)) {
                return Some((
                    "checks".into(),
                    if names.is_empty() {
                        format!("`{}`: the task has no checks", c.escape_debug())
                    } else {
                        format!(
                            "`{}` names no check of the task (its checks: {})",
                            c.escape_debug(),
                            names.join(", ")
                        )
                    },
                ));
            }
        }
        None
    }

    /// The task's checks that gate the service, as a bit mask (bit i:
    /// check i).
    pub fn gate(&self, task: &TaskSpec) -> u8 {
        let mut mask = 0u8;
        for (i, c) in task
            .checks
            .iter()
            .enumerate()
            .take(crate::health::CHECKS_MAX)
        {
            let gates = match &self.checks {
                None => true,
                Some(names) => names.contains(&c.display_name()),
            };
            if gates {
                mask |= 1 << i;
            }
        }
        mask
    }
}

/// The health of a copy for a service gated by the checks in `gate`.
pub fn gated_health(copy: &Published, gate: u8) -> Health {
    if gate == 0 {
        return Health::Passing;
    }
    if copy.checks_passing == 0 && copy.checks_critical == 0 && copy.health != Health::Unknown {
        // Published without masks (an earlier release): its overall health.
        return copy.health;
    }
    if copy.checks_critical & gate != 0 {
        Health::Critical
    } else if copy.checks_passing & gate == gate {
        Health::Passing
    } else {
        Health::Unknown
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The job whose copy it is.
    pub job: String,
    /// Its slot.
    pub slot: u32,
    /// The node running it.
    pub node: String,
    /// The node's address.
    pub address: IpAddr,
    /// The host port of the service's task port.
    pub port: u16,
    /// The service's tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Health as the service's gating checks say.
    pub health: Health,
    /// The job version the copy runs (`v7`; 0: unknown).
    pub version: u64,
}

/// One service in the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Its instances, sorted by (job, slot, node).
    pub instances: Vec<Instance>,
    /// The routing mesh's port for it, if a job declaring it asks for one
    /// (the first such job by name; the API refuses a second that differs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_port: Option<u16>,
}

impl Service {
    /// Its passing instances.
    pub fn passing(&self) -> impl Iterator<Item = &Instance> {
        self.instances
            .iter()
            .filter(|i| i.health == Health::Passing)
    }
}

/// Every service, by name.
pub type Catalog = BTreeMap<String, Service>;

/// The catalog as `desired` and `view` say: every service any live job
/// declares (a service of a job with no instance running is listed,
/// empty), and an instance per running copy, on a live node, not being
/// stopped, whose port is published.
///
/// `me` is this node and `own` its copies as it publishes them (by job):
/// the view's index holds the other nodes' copies, and this node's own
/// state is fresher than its gossip.
pub fn build(
    desired: &DesiredState,
    view: &ClusterView,
    me: &str,
    own: &[(String, Published)],
) -> Catalog {
    let mut catalog = Catalog::new();
    let others = view.index.jobs().flat_map(|(job, copies)| {
        copies
            .iter()
            .filter(|(_, node, _)| &***node != me)
            .map(move |(_, node, copy)| (&**job, &**node, copy))
    });
    let mine = own.iter().map(|(job, c)| (job.as_str(), me, c));
    for (job, node, copy) in others.chain(mine) {
        if copy.state != SlotState::Running || copy.stopping {
            continue;
        }
        let Some(record) = desired.get(job) else {
            continue;
        };
        let Some(spec) = record.spec.as_ref().filter(|s| !s.services.is_empty()) else {
            continue;
        };
        let Some(member) = view.members.get(node).filter(|m| m.is_live()) else {
            continue;
        };
        // A copy of an earlier version (a rolling update under way) is
        // read through the spec it runs: its port names and checks are
        // that version's (unknown version: the current spec's).
        let ran = record.spec_of(copy.version).unwrap_or(spec);
        for current in &spec.services {
            let Some(svc) = ran.services.iter().find(|s| s.name == current.name) else {
                continue;
            };
            let Some(&port) = copy.ports.get(&svc.port).filter(|p| **p != 0) else {
                continue;
            };
            catalog
                .entry(svc.name.clone())
                .or_default()
                .instances
                .push(Instance {
                    job: job.to_string(),
                    slot: copy.slot,
                    node: node.to_string(),
                    address: member.record.address.ip(),
                    port,
                    tags: svc.tags.clone(),
                    health: gated_health(copy, svc.gate(&ran.task)),
                    version: copy.version,
                });
        }
    }
    for spec in desired.records().filter_map(|r| r.spec.as_ref()) {
        add_declared(&mut catalog, spec);
    }
    for svc in catalog.values_mut() {
        svc.instances
            .sort_by(|a, b| (&a.job, a.slot, &a.node).cmp(&(&b.job, b.slot, &b.node)));
    }
    catalog
}

/// Lists `spec`'s services (empty if none runs).
fn add_declared(catalog: &mut Catalog, spec: &JobSpec) {
    for svc in &spec.services {
        let entry = catalog.entry(svc.name.clone()).or_default();
        if entry.ingress_port.is_none() {
            entry.ingress_port = svc.ingress_port;
        }
    }
}

/// The routing mesh's listeners: each ingress port and the service it
/// reaches. Two services asking for one port (the API refuses it, but two
/// nodes may accept them at once) resolve the same way on every node: the
/// first by name keeps it.
pub fn ingress_ports(catalog: &Catalog) -> BTreeMap<u16, String> {
    let mut ports = BTreeMap::new();
    for (name, svc) in catalog {
        if let Some(p) = svc.ingress_port {
            ports.entry(p).or_insert_with(|| name.clone());
        }
    }
    ports
}

/// Most ingress ports in the cluster (each is a listener on every node).
pub const INGRESS_PORTS_MAX: usize = 256;

/// Why `spec` cannot take the ingress ports it asks for beside the other
/// live jobs of `desired`: a port another service holds, a service another
/// job reaches on a different port, a port some job's task binds itself
/// (the mesh listens on every node's address), or one inside the range
/// this node gives dynamic ports from (`dynamic`).
pub fn ingress_conflict(
    desired: &DesiredState,
    dynamic: (u16, u16),
    spec: &JobSpec,
) -> Option<String> {
    let others: Vec<&JobSpec> = desired
        .records()
        .filter_map(|r| r.spec.as_ref())
        .filter(|o| o.name != spec.name)
        .collect();
    let static_ports =
        |s: &JobSpec| -> Vec<u16> { s.task.ports.values().copied().filter(|p| *p != 0).collect() };
    // The ingress ports the others hold: a static port of this job must
    // not be one of them either.
    let held: Vec<(u16, &str, &str)> = others
        .iter()
        .flat_map(|o| {
            o.services.iter().filter_map(move |s| {
                s.ingress_port
                    .map(|p| (p, s.name.as_str(), o.name.as_str()))
            })
        })
        .collect();
    for p in static_ports(spec) {
        if let Some((_, svc, job)) = held.iter().find(|(h, _, _)| *h == p) {
            return Some(format!(
                "host port {p} is the ingress port of service `{svc}` (job `{job}`) on every node; choose another port"
            ));
        }
    }
    let mut ports: std::collections::BTreeSet<u16> = held.iter().map(|h| h.0).collect();
    for svc in &spec.services {
        let Some(port) = svc.ingress_port else {
            continue;
        };
        ports.insert(port);
        if (dynamic.0..=dynamic.1).contains(&port) {
            return Some(format!(
                "ingress port {port} is in the range nodes give dynamic ports from ({}-{}); choose one outside it",
                dynamic.0, dynamic.1
            ));
        }
        if let Some(o) = std::iter::once(spec)
            .chain(others.iter().copied())
            .find(|o| static_ports(o).contains(&port))
        {
            return Some(format!(
                "ingress port {port} is a host port of job `{}`'s task; choose another port",
                o.name
            ));
        }
        for other in &others {
            for o in &other.services {
                if o.name == svc.name
                    && o.ingress_port.is_some()
                    && o.ingress_port != svc.ingress_port
                {
                    return Some(format!(
                        "service `{}` already has ingress port {} (job `{}`); use the same port or none",
                        svc.name,
                        o.ingress_port.unwrap_or(0),
                        other.name
                    ));
                }
                if o.name != svc.name && o.ingress_port == Some(port) {
                    return Some(format!(
                        "ingress port {port} is taken by service `{}` (job `{}`); choose another port",
                        o.name, other.name
                    ));
                }
            }
        }
    }
    if ports.len() > INGRESS_PORTS_MAX {
        return Some(format!(
            "the cluster has {INGRESS_PORTS_MAX} ingress ports already (each listens on every node); free one first"
        ));
    }
    None
}

/// A service's instances for a client: passing ones only unless
/// `all`, those on `near` first, then the rest, each group in the order
/// `shuffle` puts it (a random permutation; identity in tests).
pub fn select<'a>(
    svc: &'a Service,
    all: bool,
    near: Option<&str>,
    shuffle: impl Fn(&mut Vec<&'a Instance>),
) -> Vec<&'a Instance> {
    let chosen = svc
        .instances
        .iter()
        .filter(|i| all || i.health == Health::Passing);
    let (mut here, mut there): (Vec<&Instance>, Vec<&Instance>) =
        chosen.partition(|i| near.is_some_and(|n| i.node == n));
    shuffle(&mut here);
    shuffle(&mut there);
    here.extend(there);
    here
}

/// The `host:port` a job's copy on `me` is given for a service it uses:
/// a passing instance, one on `me` first, else the first by `pick` (an
/// index below the count, random in the agent).
pub fn address_for(svc: &Service, me: &str, pick: impl FnOnce(usize) -> usize) -> Option<String> {
    let passing: Vec<&Instance> = svc.passing().collect();
    let chosen = passing.iter().find(|i| i.node == me).copied().or_else(|| {
        (!passing.is_empty()).then(|| passing[pick(passing.len()).min(passing.len() - 1)])
    })?;
    Some(std::net::SocketAddr::new(chosen.address, chosen.port).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(ports: &[&str], checks: &[&str]) -> TaskSpec {
        let mut text =
            String::from("name = \"x\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\n");
        if !ports.is_empty() {
            text.push_str("[task.ports]\n");
            for p in ports {
                text.push_str(&format!("{p} = 0\n"));
            }
        }
        for c in checks {
            text.push_str(&format!(
                "[[task.check]]\nname = \"{c}\"\ntype = \"exec\"\ncommand = \"true\"\n"
            ));
        }
        JobSpec::parse(&text).unwrap().task
    }

    fn svc(name: &str, port: &str, checks: Option<&[&str]>) -> ServiceSpec {
        ServiceSpec {
            ingress_port: None,
            name: name.into(),
            port: port.into(),
            tags: Vec::new(),
            checks: checks.map(|c| c.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn names_ports_tags_and_checks_are_checked() {
        let t = task(&["http"], &["ready", "live"]);
        assert_eq!(svc("web", "http", None).problem(&t), None);
        for bad in ["", "-web", "web-", "Web", "w_b", &"a".repeat(64)] {
            assert_eq!(
                svc(bad, "http", None).problem(&t).map(|p| p.0).as_deref(),
                Some("name"),
                "{bad}"
            );
        }
        let p = svc("web", "grpc", None).problem(&t).unwrap();
        assert!(p.0 == "port" && p.1.contains("known: http"), "{p:?}");
        let p = svc("web", "http", Some(&["nope"])).problem(&t).unwrap();
        assert!(p.0 == "checks" && p.1.contains("ready, live"), "{p:?}");
        let mut s = svc("web", "http", None);
        s.tags = vec!["a\nb".into()];
        assert_eq!(s.problem(&t).unwrap().0, "tags");
        s.tags = vec!["x".into(); TAGS_MAX + 1];
        assert_eq!(s.problem(&t).unwrap().0, "tags");
    }

    /// A live job record serving `services` as (name, ingress port).
    fn serving(job: &str, services: &[(&str, Option<u16>)]) -> JobSpec {
        let mut text = format!(
            "name = \"{job}\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nports = {{ http = 0 }}\n"
        );
        for (name, port) in services {
            text.push_str(&format!(
                "[[service]]\nname = \"{name}\"\nport = \"http\"\n"
            ));
            if let Some(p) = port {
                text.push_str(&format!("ingress_port = {p}\n"));
            }
        }
        JobSpec::parse(&text).unwrap()
    }

    fn desired_of(specs: &[JobSpec]) -> DesiredState {
        let mut d = DesiredState::default();
        for (i, spec) in specs.iter().enumerate() {
            d.apply(std::sync::Arc::new(crate::records::JobRecord::new(
                spec.name.clone(),
                crate::hlc::Version {
                    hlc: crate::hlc::Hlc {
                        wall_ms: 1 + i as u64,
                        logical: 0,
                    },
                    node: "n".into(),
                },
                Some(spec.clone()),
            )));
        }
        d
    }

    const DYN: (u16, u16) = (20_000, 32_000);

    #[test]
    fn ingress_ports_are_validated_and_resolved_the_same_everywhere() {
        let t = task(&["http"], &[]);
        let mut s = svc("web", "http", None);
        s.ingress_port = Some(0);
        assert_eq!(s.problem(&t).unwrap().0, "ingress_port");
        // One job may not give two services one port.
        let twice =
            "name = \"x\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nports = { http = 0 }\n\
            [[service]]\nname = \"a\"\nport = \"http\"\ningress_port = 9000\n\
            [[service]]\nname = \"b\"\nport = \"http\"\ningress_port = 9000\n";
        let e = JobSpec::parse(twice).unwrap_err().to_string();
        assert!(e.contains("declared twice"), "{e}");

        let d = desired_of(&[
            serving("site", &[("web", Some(9000)), ("admin", None)]),
            serving("api", &[("api", Some(9001))]),
        ]);
        let catalog = build(&d, &ClusterView::default(), "n1", &[]);
        let ports = ingress_ports(&catalog);
        assert_eq!(
            ports.into_iter().collect::<Vec<_>>(),
            vec![(9000, "web".to_string()), (9001, "api".to_string())]
        );
        // A second service on a taken port, or a service on a second
        // port, is refused; the same service on the same port, or a job
        // replacing itself, is not.
        let why = ingress_conflict(&d, DYN, &serving("other", &[("web2", Some(9000))])).unwrap();
        assert!(why.contains("taken by service `web`"), "{why}");
        let why = ingress_conflict(&d, DYN, &serving("other", &[("web", Some(9002))])).unwrap();
        assert!(why.contains("already has ingress port 9000"), "{why}");
        assert_eq!(
            ingress_conflict(&d, DYN, &serving("other", &[("web", Some(9000))])),
            None
        );
        assert_eq!(
            ingress_conflict(&d, DYN, &serving("site", &[("web", Some(9005))])),
            None
        );
        assert_eq!(
            ingress_conflict(&d, DYN, &serving("other", &[("web", None)])),
            None
        );
        // Two nodes accepted two services on one port at once: every node
        // gives it to the first by name.
        let raced = desired_of(&[
            serving("b-job", &[("zeta", Some(9000))]),
            serving("a-job", &[("alpha", Some(9000))]),
        ]);
        let catalog = build(&raced, &ClusterView::default(), "n1", &[]);
        assert_eq!(
            ingress_ports(&catalog).get(&9000).map(String::as_str),
            Some("alpha")
        );
    }

    #[test]
    fn a_copy_of_an_earlier_version_is_read_through_its_spec() {
        use crate::hlc::{Hlc, Version};
        use crate::records::{Earlier, JobRecord};
        // v1 serves `web` on port `http`; v2 renamed the port `main`.
        let text = |port: &str| {
            format!(
                "name = \"site\"\ntype = \"service\"\n[task]\ncommand = \"sleep\"\nports = {{ {port} = 0 }}\n\
                 [[service]]\nname = \"web\"\nport = \"{port}\"\n"
            )
        };
        let (v1, v2) = (
            JobSpec::parse(&text("http")).unwrap(),
            JobSpec::parse(&text("main")).unwrap(),
        );
        let version = |ms| Version {
            hlc: Hlc {
                wall_ms: ms,
                logical: 0,
            },
            node: "n".into(),
        };
        let mut record = JobRecord::new("site", version(2), Some(v2));
        record.seq = 2;
        record.history.push(Earlier {
            seq: 1,
            version: version(1),
            spec: v1,
            outcome: None,
        });
        let mut d = DesiredState::default();
        d.apply(std::sync::Arc::new(record));
        let view = ClusterView {
            members: std::sync::Arc::new(crate::view::Members::new([crate::view::test_member(
                "n1",
                shoal_membership::NodeState::Alive,
            )])),
            ..ClusterView::default()
        };
        let copy = |slot: u32, version: u64, port: &str, host: u16| Published {
            slot,
            run: u64::from(slot) + 1,
            state: SlotState::Running,
            task: 1,
            restarts: 0,
            error: None,
            ports: [(port.to_string(), host)].into_iter().collect(),
            health: Health::Passing,
            check: None,
            checks_passing: 0,
            checks_critical: 0,
            stopping: false,
            ready: true,
            failed: false,
            version,
        };
        let own = [
            ("site".to_string(), copy(0, 1, "http", 20_001)),
            ("site".to_string(), copy(1, 2, "main", 20_002)),
        ];
        let catalog = build(&d, &view, "n1", &own);
        let ports: Vec<u16> = catalog["web"].instances.iter().map(|i| i.port).collect();
        assert_eq!(
            ports,
            vec![20_001, 20_002],
            "the old copy stays listed mid-update"
        );
    }

    #[test]
    fn the_gating_checks_decide_health() {
        let t = task(&["http"], &["ready", "live"]);
        let all = svc("web", "http", None).gate(&t);
        let live = svc("web", "http", Some(&["live"])).gate(&t);
        let none = svc("web", "http", Some(&[])).gate(&t);
        assert_eq!((all, live, none), (0b11, 0b10, 0));
        let mut copy = Published {
            slot: 0,
            run: 1,
            state: SlotState::Running,
            task: 1,
            restarts: 0,
            error: None,
            ports: BTreeMap::new(),
            health: Health::Critical,
            check: None,
            checks_passing: 0b10,
            checks_critical: 0b01,
            stopping: false,
            ready: false,
            failed: false,
            version: 1,
        };
        assert_eq!(gated_health(&copy, all), Health::Critical);
        assert_eq!(gated_health(&copy, live), Health::Passing);
        assert_eq!(gated_health(&copy, none), Health::Passing);
        copy.checks_critical = 0;
        assert_eq!(
            gated_health(&copy, all),
            Health::Unknown,
            "ready not yet passing"
        );
        // An earlier release's copy (no masks): its overall health.
        copy.checks_passing = 0;
        copy.health = Health::Passing;
        assert_eq!(gated_health(&copy, live), Health::Passing);
    }

    #[test]
    fn near_instances_come_first_and_only_passing_ones_by_default() {
        let inst = |node: &str, slot, health| Instance {
            job: "web".into(),
            slot,
            node: node.into(),
            address: IpAddr::from([127, 0, 0, 1]),
            port: 8000 + slot as u16,
            tags: Vec::new(),
            health,
            version: 1,
        };
        let s = Service {
            instances: vec![
                inst("a", 0, Health::Passing),
                inst("b", 1, Health::Passing),
                inst("b", 2, Health::Critical),
                inst("c", 3, Health::Passing),
            ],
            ingress_port: None,
        };
        let slots = |v: Vec<&Instance>| v.iter().map(|i| i.slot).collect::<Vec<_>>();
        assert_eq!(slots(select(&s, false, None, |_| {})), [0, 1, 3]);
        assert_eq!(slots(select(&s, false, Some("c"), |_| {})), [3, 0, 1]);
        assert_eq!(slots(select(&s, true, Some("b"), |_| {})), [1, 2, 0, 3]);
        assert_eq!(
            address_for(&s, "b", |_| 0).as_deref(),
            Some("127.0.0.1:8001")
        );
        assert_eq!(
            address_for(&s, "z", |n| n - 1).as_deref(),
            Some("127.0.0.1:8003")
        );
        assert_eq!(service_var("my-db"), "SHOAL_SERVICE_MY_DB");
    }
}
