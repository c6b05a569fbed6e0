//! DNS on every agent (`--dns`, default `127.0.0.1:8600`): the catalog
//! as names, so any program can find a service without shoal-specific
//! code.
//!
//! - `NAME.service.shoal`: A (AAAA) records of the service's passing
//!   instances' addresses, SRV records with their ports and node names
//!   (`_NAME._tcp.service.shoal` too, as RFC 2782 spells it), and
//!   `TAG.NAME.service.shoal` for the instances with a tag.
//! - `NODE.node.shoal`: A (AAAA) of a live node.
//!
//! Answers are shuffled, with TTL 0 (the catalog moves within a second of
//! a death; a cache would keep a dead instance), at most
//! [`ANSWERS_MAX`] records (a UDP answer past the client's buffer is
//! truncated with TC set, and TCP carries the rest). A name under
//! `.shoal` that names nothing is NXDOMAIN; any other name is REFUSED
//! (this is no recursive resolver): nothing waits for an answer that will
//! not come. Queries are rate-limited per source address and in all
//! ([`RATE_PER_SOURCE`], [`RATE_MAX`]); one over the limit gets no answer
//! (answering would make the agent a reflector, and costs the same as
//! answering it properly), so the client retries after its timeout.
//!
//! The server is hickory's (the Rust DNS project: wire format, UDP and
//! TCP listeners, truncation); shoal answers through its
//! [`RequestHandler`] from the agent's catalog snapshot and membership
//! view, read without waiting on the scheduler's loop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use rand::seq::SliceRandom;
use shoal_core::catalog::Catalog;
use shoal_core::health::Health;
use shoal_membership::{MembershipView, NodeState};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::Snapshot;

/// The zone shoal answers for.
pub const ZONE: &str = "shoal";
/// Most records in one answer section.
pub const ANSWERS_MAX: usize = 16;
/// Queries per second one source address may make (burst as large).
pub const RATE_PER_SOURCE: u32 = 2_000;
/// Queries per second all sources together may make (burst as large).
pub const RATE_MAX: u32 = 20_000;
/// Source addresses whose rates are tracked; when more ask, the oldest
/// half is forgotten.
pub const SOURCES_MAX: usize = 4_096;
/// Largest UDP answer offered to a client that advertises a larger
/// buffer (EDNS): the size DNS flag day 2020 settled on.
pub const UDP_PAYLOAD_MAX: u16 = 1_232;
/// A TCP connection that sends no query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(5);

/// A token bucket: `rate` a second, at most `rate` saved.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: u32, at: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate),
            at,
        }
    }

    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + gained).min(f64::from(rate));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Query-rate limits: per source address and in all.
#[derive(Debug)]
pub struct Limiter {
    per_source: u32,
    all: u32,
    total: Bucket,
    sources: HashMap<IpAddr, Bucket>,
}

impl Limiter {
    /// Limits of `per_source` and `all` queries a second.
    pub fn new(per_source: u32, all: u32, now: Instant) -> Limiter {
        Limiter {
            per_source,
            all,
            total: Bucket::full(all, now),
            sources: HashMap::new(),
        }
    }

    /// Whether a query from `src` at `now` may be answered.
    pub fn allow(&mut self, src: IpAddr, now: Instant) -> bool {
        if !self.sources.contains_key(&src) && self.sources.len() >= SOURCES_MAX {
            // Forget the sources heard from longest ago (a full bucket
            // again for them: a limit on memory, not a ban).
            let mut ats: Vec<Instant> = self.sources.values().map(|b| b.at).collect();
            ats.sort_unstable();
            let cut = ats[ats.len() / 2];
            self.sources.retain(|_, b| b.at > cut);
        }
        let per_source = self.per_source;
        let bucket = self
            .sources
            .entry(src)
            .or_insert_with(|| Bucket::full(per_source, now));
        bucket.take(per_source, now) && self.total.take(self.all, now)
    }
}

/// What a query asks for, once its name is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A service's instances, those with `tag` only if given.
    Service { name: String, tag: Option<String> },
    /// A node's address.
    Node(String),
    /// A name under the zone that names nothing shoal knows how to
    /// answer.
    Unknown,
    /// The zone itself or one of its branches (`service.shoal`): it exists
    /// (names are below it) but holds no records.
    Branch,
    /// A name outside the zone.
    Outside,
}

/// Reads a query name (any case, with or without the final dot).
pub fn parse(name: &str) -> Asked {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let Some(rest) = name.strip_suffix(ZONE) else {
        return Asked::Outside;
    };
    if !rest.is_empty() && !rest.ends_with('.') {
        return Asked::Outside;
    }
    let rest = rest.trim_end_matches('.');
    if matches!(rest, "" | "node" | "service" | "_tcp.service") {
        return Asked::Branch;
    }
    if let Some(node) = rest.strip_suffix(".node") {
        return if node.is_empty() {
            Asked::Unknown
        } else {
            Asked::Node(node.to_string())
        };
    }
    let Some(svc) = rest.strip_suffix(".service") else {
        return Asked::Unknown;
    };
    let labels: Vec<&str> = svc.split('.').collect();
    let (name, tag) = match labels.as_slice() {
        [name] => (*name, None),
        [srv, "_tcp"] if srv.starts_with('_') => (&srv[1..], None),
        [tag, name] => (*name, Some(tag.to_string())),
        _ => return Asked::Unknown,
    };
    if !shoal_core::catalog::valid_service_name(name) {
        return Asked::Unknown;
    }
    Asked::Service {
        name: name.to_string(),
        tag,
    }
}

/// One answer: records of the answer and additional sections, or a code.
#[derive(Debug, Default)]
pub struct Answer {
    /// Answer section.
    pub answers: Vec<Record>,
    /// Additional section (the A records of SRV targets).
    pub additionals: Vec<Record>,
    /// NOERROR, NXDOMAIN or REFUSED.
    pub code: ResponseCode,
}

fn address_record(name: &Name, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), 0, rdata)
}

fn wants_address(kind: RecordType, ip: &IpAddr) -> bool {
    match kind {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    }
}

/// Whether an instance has `tag` (DNS names are read in lower case).
fn has_tag(i: &shoal_core::catalog::Instance, tag: &str) -> bool {
    i.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))
}

/// The name a node's SRV targets and A records carry.
fn node_name(node: &str) -> Option<Name> {
    Name::from_ascii(format!("{node}.node.{ZONE}.")).ok()
}

/// Answers `kind` for `qname` from `catalog` and `view`, shuffling with
/// `shuffle`.
pub fn answer(
    qname: &Name,
    kind: RecordType,
    catalog: &Catalog,
    view: &MembershipView,
    shuffle: &mut dyn FnMut(&mut Vec<Record>),
) -> Answer {
    let mut out = Answer::default();
    match parse(&qname.to_ascii()) {
        Asked::Outside => out.code = ResponseCode::Refused,
        Asked::Unknown => out.code = ResponseCode::NXDomain,
        Asked::Branch => {}
        Asked::Node(node) => {
            let member = view.members.iter().find(|m| {
                m.record.name.eq_ignore_ascii_case(&node)
                    && matches!(m.state, NodeState::Alive | NodeState::Suspect)
            });
            match member {
                None => out.code = ResponseCode::NXDomain,
                Some(m) => {
                    let ip = m.record.address.ip();
                    if wants_address(kind, &ip) {
                        out.answers.push(address_record(qname, ip));
                    }
                }
            }
        }
        Asked::Service { name, tag } => {
            let Some(svc) = catalog.get(&name) else {
                out.code = ResponseCode::NXDomain;
                return out;
            };
            let passing: Vec<_> = svc
                .instances
                .iter()
                .filter(|i| i.health == Health::Passing)
                .filter(|i| tag.as_ref().is_none_or(|t| has_tag(i, t)))
                .collect();
            // A tag no instance has names nothing.
            if tag
                .as_ref()
                .is_some_and(|t| !svc.instances.iter().any(|i| has_tag(i, t)))
            {
                out.code = ResponseCode::NXDomain;
                return out;
            }
            match kind {
                RecordType::SRV => {
                    let mut glue = Vec::new();
                    for i in &passing {
                        let Some(target) = node_name(&i.node) else {
                            continue;
                        };
                        out.answers.push(Record::from_rdata(
                            qname.clone(),
                            0,
                            RData::SRV(SRV::new(1, 1, i.port, target.clone())),
                        ));
                        glue.push((target, i.address));
                    }
                    shuffle(&mut out.answers);
                    out.answers.truncate(ANSWERS_MAX);
                    // The address of each target kept, once.
                    for r in &out.answers {
                        if let RData::SRV(srv) = &r.data {
                            let kept = out.additionals.iter().any(|a| a.name == srv.target);
                            if let Some((t, ip)) = glue.iter().find(|(t, _)| *t == srv.target) {
                                if !kept {
                                    out.additionals.push(address_record(t, *ip));
                                }
                            }
                        }
                    }
                    return out;
                }
                _ => {
                    let mut ips: Vec<IpAddr> = passing
                        .iter()
                        .map(|i| i.address)
                        .filter(|ip| wants_address(kind, ip))
                        .collect();
                    ips.sort_unstable();
                    ips.dedup();
                    out.answers = ips
                        .into_iter()
                        .map(|ip| address_record(qname, ip))
                        .collect();
                }
            }
            shuffle(&mut out.answers);
            out.answers.truncate(ANSWERS_MAX);
        }
    }
    out
}

/// hickory's request handler: answers from the agent's state.
pub struct Handler {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    view: watch::Receiver<MembershipView>,
    limiter: Mutex<Limiter>,
}

impl Handler {
    /// A handler reading `snapshot` (the catalog) and `view` (nodes).
    pub fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        view: watch::Receiver<MembershipView>,
    ) -> Handler {
        Handler {
            snapshot,
            view,
            limiter: Mutex::new(Limiter::new(RATE_PER_SOURCE, RATE_MAX, Instant::now())),
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(request.src().ip(), Instant::now());
        if !allowed {
            // No answer (see the module's notes); what is logged says so.
            return unsent(request, ResponseCode::Refused);
        }
        let mut edns = None;
        if let Some(asked) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(asked.max_payload().clamp(512, UDP_PAYLOAD_MAX));
            edns = Some(e);
        }
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let info = (request.metadata.message_type == MessageType::Query
            && request.metadata.op_code == OpCode::Query)
            .then(|| request.request_info());
        let code = match info {
            None => ResponseCode::NotImp,
            Some(Err(_)) => ResponseCode::FormErr,
            Some(Ok(info)) => {
                let qname: Name = info.query.name().into();
                let kind = info.query.query_type();
                let catalog = self.snapshot.borrow().catalog.clone();
                let a = answer(&qname, kind, &catalog, &self.view.borrow(), &mut |v| {
                    v.shuffle(&mut rand::rng())
                });
                let mut m = reply(request, a.code);
                m.authoritative = a.code != ResponseCode::Refused;
                let resp = builder.build(m, a.answers.iter(), [], [], a.additionals.iter());
                return send(&mut response, resp, request).await;
            }
        };
        let resp = builder.build_no_records(reply(request, code));
        send(&mut response, resp, request).await
    }
}

/// The header of an answer to `request` with `code`.
fn reply(request: &Request, code: ResponseCode) -> Metadata {
    let mut m = Metadata::response_from_request(&request.metadata);
    m.response_code = code;
    m
}

/// What the server logs of an answer that was not sent.
fn unsent(request: &Request, code: ResponseCode) -> ResponseInfo {
    ResponseInfo::from(hickory_server::proto::op::Header {
        metadata: reply(request, code),
        counts: Default::default(),
    })
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    resp: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match response.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "could not send a DNS answer");
            unsent(request, ResponseCode::ServFail)
        }
    }
}

/// The sockets DNS is served on (bound at start, before the node joins,
/// so that an address that cannot be had stops the agent before it is a
/// member).
pub struct Sockets {
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    /// Where they are bound.
    pub bound: SocketAddr,
}

/// Binds UDP and TCP at `addr` (with port 0: one port free for both).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<Sockets> {
    use anyhow::Context;
    // With port 0, UDP picks a port that TCP may not have free: pick again
    // (a bounded number of times).
    let tries = if addr.port() == 0 { 20 } else { 1 };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("--dns {addr}: cannot bind UDP"))?;
        let bound = udp.local_addr()?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => return Ok(Sockets { udp, tcp, bound }),
            Err(e) if attempt >= tries => {
                return Err(e).with_context(|| format!("--dns {bound}: cannot bind TCP"));
            }
            Err(_) => continue,
        }
    }
}

/// Serves DNS on `sockets` until the process ends.
pub fn serve(
    sockets: Sockets,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    view: watch::Receiver<MembershipView>,
) {
    let mut server = hickory_server::Server::new(Handler::new(snapshot, view));
    server.register_socket(sockets.udp);
    server.register_listener(sockets.tcp, TCP_IDLE, 4);
    info!(bound = %sockets.bound, "serving DNS for the catalog (NAME.service.shoal, NODE.node.shoal)");
    tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            warn!(error = %e, "the DNS server stopped");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read() {
        let svc = |n: &str, t: Option<&str>| Asked::Service {
            name: n.into(),
            tag: t.map(Into::into),
        };
        assert_eq!(parse("web.service.shoal."), svc("web", None));
        assert_eq!(parse("WEB.Service.SHOAL"), svc("web", None));
        assert_eq!(parse("_web._tcp.service.shoal."), svc("web", None));
        assert_eq!(parse("v2.web.service.shoal"), svc("web", Some("v2")));
        assert_eq!(parse("n1.node.shoal."), Asked::Node("n1".into()));
        assert_eq!(parse("a.b.node.shoal"), Asked::Node("a.b".into()));
        assert_eq!(parse("shoal."), Asked::Branch);
        assert_eq!(parse("service.shoal."), Asked::Branch);
        assert_eq!(parse("node.shoal"), Asked::Branch);
        assert_eq!(parse("x.y.z.service.shoal"), Asked::Unknown);
        assert_eq!(parse("-bad.service.shoal"), Asked::Unknown);
        assert_eq!(parse(".node.shoal"), Asked::Unknown);
        assert_eq!(parse("example.com."), Asked::Outside);
        assert_eq!(parse("notshoal."), Asked::Outside);
        assert_eq!(parse("."), Asked::Outside);
    }

    #[test]
    fn services_answer_their_passing_instances() {
        use shoal_core::catalog::{Instance, Service};
        let inst = |node: &str, port: u16, tags: &[&str], health: Health| Instance {
            job: "site".into(),
            slot: u32::from(port),
            node: node.into(),
            address: "10.0.0.1".parse().unwrap(),
            port,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            health,
            version: 1,
        };
        let mut catalog = Catalog::new();
        catalog.insert(
            "web".into(),
            Service {
                instances: vec![
                    inst("n1", 1, &["v1"], Health::Passing),
                    inst("n2", 2, &["v2"], Health::Passing),
                    inst("n3", 3, &["v2"], Health::Critical),
                ],
                ingress_port: None,
            },
        );
        let view = MembershipView {
            self_name: "n1".into(),
            members: Vec::new(),
        };
        let ask = |name: &str, kind: RecordType| {
            let a = answer(
                &Name::from_ascii(name).unwrap(),
                kind,
                &catalog,
                &view,
                &mut |_| {},
            );
            let shown: Vec<String> = a
                .answers
                .iter()
                .map(|r| match &r.data {
                    RData::SRV(s) => format!("{}:{}", s.target, s.port),
                    RData::A(a) => a.0.to_string(),
                    o => format!("{o:?}"),
                })
                .collect();
            (a.code, shown)
        };
        let ok = ResponseCode::NoError;
        assert_eq!(
            ask("web.service.shoal.", RecordType::SRV),
            (
                ok,
                vec!["n1.node.shoal.:1".into(), "n2.node.shoal.:2".into()]
            )
        );
        // One address for the instances it holds (A records are a set).
        assert_eq!(
            ask("web.service.shoal.", RecordType::A),
            (ok, vec!["10.0.0.1".into()])
        );
        assert_eq!(ask("web.service.shoal.", RecordType::AAAA), (ok, vec![]));
        assert_eq!(
            ask("v2.web.service.shoal.", RecordType::SRV),
            (ok, vec!["n2.node.shoal.:2".into()])
        );
        assert_eq!(
            ask("v9.web.service.shoal.", RecordType::SRV).0,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask("db.service.shoal.", RecordType::A).0,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask("n1.node.shoal.", RecordType::A).0,
            ResponseCode::NXDomain
        );
        assert_eq!(ask("example.org.", RecordType::A).0, ResponseCode::Refused);
    }

    #[test]
    fn the_rate_is_limited_per_source_and_in_all() {
        let t0 = Instant::now();
        let mut l = Limiter::new(3, 5, t0);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t0)));
        assert!(!l.allow(a, t0), "a fourth query from one source at once");
        assert!(l.allow(b, t0) && l.allow(b, t0));
        assert!(!l.allow(b, t0), "the total of 5 is spent");
        // A second later both refill.
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.allow(a, t1));
    }

    #[test]
    fn tracked_sources_are_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::new(1, u32::MAX, t0);
        for i in 0..(SOURCES_MAX as u32 * 3) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(i));
            l.allow(ip, t0 + Duration::from_micros(u64::from(i)));
            assert!(l.sources.len() <= SOURCES_MAX);
        }
    }
}
