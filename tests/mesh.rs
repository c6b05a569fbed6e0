//! DNS and the routing mesh on real agents and real processes: a
//! 3-replica HTTP service (busybox httpd on dynamic ports) on 5 agents,
//! each agent's ingress on its own loopback address (127.0.0.N, the same
//! port everywhere, as on separate machines).
//!
//! - Every agent's ingress port reaches the service, and DNS answers
//!   exactly the passing instances (A, SRV with node targets, the node's
//!   own name); other names get NXDOMAIN or REFUSED.
//! - A client loop through one agent's ingress while a node holding an
//!   instance is killed (agent and processes, as a machine dies): no
//!   request fails once the node is declared dead, and DNS drops it.
//! - A rolling update through the ingress port: zero failed requests.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};

/// Asks `server` for `name` `kind` over UDP: (code, answers as text,
/// additionals as text).
fn dig(
    server: SocketAddr,
    name: &str,
    kind: RecordType,
) -> (ResponseCode, Vec<String>, Vec<String>) {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no DNS answer from {server} to {name} {kind} within 2 s: {e}"));
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    let show = |rs: &[hickory_server::proto::rr::Record]| {
        let mut v: Vec<String> = rs
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::SRV(s) => format!("{}:{}", s.target, s.port),
                other => format!("{other:?}"),
            })
            .collect();
        v.sort();
        v
    };
    (
        m.metadata.response_code,
        show(&m.answers),
        show(&m.additionals),
    )
}

/// (node, port) of each passing `web` instance `agent` lists.
fn web_instances(agent: &Agent) -> Vec<(String, u64, u64)> {
    let (_, body) = call(agent.request("GET", "/v1/services/web"), None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out: Vec<(String, u64, u64)> = v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["node"].as_str().unwrap_or_default().to_string(),
                i["port"].as_u64().unwrap_or_default(),
                i["version"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

/// One GET of `/version` through `addr` on a fresh connection: the body,
/// or why not.
fn get(addr: SocketAddr) -> Result<String, String> {
    get_path(addr, "/version")
}

/// One GET of `path` through `addr` on a fresh connection.
fn get_path(addr: SocketAddr, path: &str) -> Result<String, String> {
    ureq::get(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(3))
        .call()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|e| e.to_string())
}

/// Each request's start time and result.
type Log = Vec<(Instant, Result<String, String>)>;

/// A client loop through `addr` until stopped.
struct Client {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Client {
    /// `threads` loops of GETs of `path` through `addr`.
    fn start(addr: SocketAddr, path: &'static str, threads: usize) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (s, l) = (stop.clone(), log.clone());
                std::thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let r = get_path(addr, path);
                        l.lock().unwrap().push((at, r));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Client { stop, log, threads }
    }

    fn finish(mut self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let mut log = std::mem::take(&mut *self.log.lock().unwrap());
        log.sort_by_key(|(at, _)| *at);
        log
    }
}

/// Freezes every instance started under `dir` (SIGSTOP to each
/// supervisor's process group): a machine that hangs rather than refuses,
/// so connections to its instances are accepted by the kernel and then
/// never answered.
fn freeze_instances(dir: &std::path::Path) {
    shoal::driver::exec::signal_instances_under(&dir.join("instances"), libc::SIGSTOP);
}

/// A port free on the test's loopback addresses (the mesh's port).
fn free_port(ips: &[String]) -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind(format!("{}:0", ips[0])).unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind(format!("{ip}:{port}")).is_ok())
        {
            return port;
        }
    }
    panic!("no free port on {ips:?}");
}

/// 5 agents, n0 an edge node (no instances), each agent's ingress on
/// `127.0.0.<base+i>`; a site directory per version.
struct Mesh {
    agents: Vec<Agent>,
    ips: Vec<String>,
    port: u16,
    site: Site,
    root: tempfile::TempDir,
}

impl Mesh {
    fn start(base: u8) -> Mesh {
        let root = tempfile::tempdir().unwrap();
        let ips: Vec<String> = (0..5).map(|i| format!("127.0.0.{}", base + i)).collect();
        let port = free_port(&ips);
        let agents = cluster_with(root.path(), 5, |i| {
            vec![
                "--ingress-addr".into(),
                ips[i].clone(),
                "--label".into(),
                format!("role={}", if i == 0 { "edge" } else { "web" }),
                // Agents on one machine share its ports: each picks
                // dynamic ports from its own range.
                "--port-range".into(),
                {
                    let lo = 24_000 + u32::from(base) * 100 + i as u32 * 20;
                    format!("{lo}-{}", lo + 19)
                },
            ]
        });
        wait_all_alive(&agents);
        let site = Site::new("mesh");
        std::fs::set_permissions(
            site.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        for v in ["v1", "v2"] {
            let d = site.path().join(v);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("version"), format!("{v}\n")).unwrap();
            // A slow answer (0.3 s): a request in flight when its
            // instance gets the stop signal fails.
            let cgi = d.join("cgi-bin");
            std::fs::create_dir_all(&cgi).unwrap();
            std::fs::write(
                cgi.join("slow"),
                format!(
                    "#!/bin/busybox sh\n/bin/busybox sleep 0.3\necho 'Content-Type: text/plain'\necho\necho {v}\n"
                ),
            )
            .unwrap();
            // Which node answered (the mesh prefers the node's own).
            std::fs::write(
                cgi.join("node"),
                "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\necho $SHOAL_NODE\n",
            )
            .unwrap();
            for p in [&cgi, &cgi.join("slow"), &cgi.join("node")] {
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap();
            }
            std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        Mesh {
            agents,
            ips,
            port,
            site,
            root,
        }
    }

    fn job(&self, version: &str) -> String {
        let dir = self.site.path().join(version).display().to_string();
        format!(
            r#"name = "site"
type = "service"
replicas = 3
distinct_hosts = true

[[constraints]]
label = "role"
op = "="
value = "web"

[task]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{SHOAL_ADDR_HTTP}}", "-h", "{dir}"]
ports = {{ http = 0 }}

[task.resources]
cpu = 10
memory = 8

[[task.check]]
name = "up"
type = "http"
port = "http"
path = "/version"
interval = "500ms"
timeout = "500ms"
grace = "0s"
failures = 3

[[service]]
name = "web"
port = "http"
ingress_port = {}
"#,
            self.port
        )
    }

    fn run(&self, version: &str) {
        let t = Instant::now();
        let f = job_file(
            self.root.path(),
            &format!("site-{version}"),
            &self.job(version),
        );
        let (ok, out, err) = cli(&self.agents[0], &["run", f.to_str().unwrap()]);
        if !ok {
            let (_, status, _) = cli(&self.agents[0], &["status", "site"]);
            let (_, job) = call(self.agents[0].request("GET", "/v1/jobs/site"), None);
            let (_, dep) = call(
                self.agents[0].request("GET", "/v1/jobs/site/deployment"),
                None,
            );
            let (_, stats) = call(self.agents[0].request("GET", "/v1/stats"), None);
            eprintln!("{job}\n{dep}\n{stats}");
            for a in &self.agents {
                let (_, inst) = call(a.request("GET", "/v1/instances"), None);
                eprintln!("INSTANCES {}: {inst}", a.name);
            }
            let logs: Vec<String> = self
                .agents
                .iter()
                .map(|a| {
                    let e = a.stderr();
                    let lines: Vec<&str> =
                        e.lines().filter(|l| !l.contains("member state")).collect();
                    format!(
                        "--- {}\n{}",
                        a.name,
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    )
                })
                .collect();
            panic!("{out}{err}\n{status}\n{}", logs.join("\n"));
        }
        eprintln!("run {version}: {:?}", t.elapsed());
    }

    fn ingress(&self, i: usize) -> SocketAddr {
        format!("{}:{}", self.ips[i], self.port).parse().unwrap()
    }

    fn dns(&self, i: usize) -> SocketAddr {
        self.agents[i]
            .info
            .as_ref()
            .unwrap()
            .dns
            .expect("the agent serves DNS")
    }
}

#[test]
fn the_mesh_and_dns_follow_the_instances_while_a_node_dies() {
    let mut mesh = Mesh::start(10);
    mesh.run("v1");
    wait_until("every node lists 3 passing web instances", || {
        mesh.agents.iter().all(|a| web_instances(a).len() == 3)
    });
    // Every agent's ingress reaches the service, n0's with no instance of
    // its own.
    for i in 0..5 {
        let to = mesh.ingress(i);
        wait_until(&format!("ingress {to} answers"), || {
            get(to).as_deref() == Ok("v1\n")
        });
    }
    // An agent holding an instance sends its connections to it; n0,
    // holding none, spreads them over the three.
    let holders: Vec<String> = web_instances(&mesh.agents[0])
        .into_iter()
        .map(|i| i.0)
        .collect();
    for h in &holders {
        let i: usize = h[1..].parse().unwrap();
        for _ in 0..10 {
            assert_eq!(
                get_path(mesh.ingress(i), "/cgi-bin/node").as_deref(),
                Ok(format!("{h}\n").as_str()),
                "through {h}'s own ingress"
            );
        }
    }
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..60 {
        answered.insert(get_path(mesh.ingress(0), "/cgi-bin/node").unwrap());
    }
    assert_eq!(
        answered.len(),
        3,
        "n0 spreads over every instance: {answered:?}"
    );
    // A second service may not take the port.
    let other = mesh
        .job("v1")
        .replace("name = \"site\"", "name = \"other\"")
        .replace("name = \"web\"", "name = \"web2\"");
    let f = job_file(mesh.root.path(), "other", &other);
    let (ok, out, err) = cli(&mesh.agents[1], &["run", f.to_str().unwrap()]);
    assert!(
        !ok && format!("{out}{err}").contains("is taken by service `web`"),
        "{out}{err}"
    );

    // DNS answers exactly the passing instances, at every agent.
    let listed = web_instances(&mesh.agents[0]);
    let mut srv: Vec<String> = listed
        .iter()
        .map(|(node, port, _)| format!("{node}.node.shoal.:{port}"))
        .collect();
    srv.sort();
    for i in 0..5 {
        let (code, answers, extra) = dig(mesh.dns(i), "web.service.shoal.", RecordType::SRV);
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(answers, srv, "SRV at n{i}");
        assert_eq!(
            extra,
            vec!["127.0.0.1"; 3],
            "the targets' addresses at n{i}"
        );
        let (code, answers, _) = dig(mesh.dns(i), "web.service.shoal.", RecordType::A);
        assert_eq!(
            (code, answers),
            (ResponseCode::NoError, vec!["127.0.0.1".to_string()])
        );
    }
    let (code, answers, _) = dig(mesh.dns(2), "n3.node.shoal.", RecordType::A);
    assert_eq!(
        (code, answers),
        (ResponseCode::NoError, vec!["127.0.0.1".to_string()])
    );
    for (name, want) in [
        ("nope.service.shoal.", ResponseCode::NXDomain),
        ("nosuch.node.shoal.", ResponseCode::NXDomain),
        ("example.com.", ResponseCode::Refused),
    ] {
        assert_eq!(dig(mesh.dns(1), name, RecordType::A).0, want, "{name}");
    }

    // A node holding an instance dies as a hung machine does: its agent
    // is gone and its instance, frozen, accepts connections (the kernel
    // does) and never answers, so the mesh cannot notice it by itself:
    // only the catalog keeps connections away from it. Clients loop
    // through n0's ingress meanwhile.
    let (victim, _, _) = listed[0].clone();
    let vi: usize = victim[1..].parse().unwrap();
    let client = Client::start(mesh.ingress(0), "/version", 3);
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    mesh.agents[vi].stop(libc::SIGKILL);
    freeze_instances(&mesh.agents[vi].dir);
    let dead = {
        wait_until(&format!("n0 declares {victim} dead"), || {
            mesh.agents[0].state_of(&victim).as_deref() == Some("dead")
        });
        Instant::now()
    };
    // DNS at a live node drops the dead node's instance.
    let survivors: Vec<String> = srv
        .iter()
        .filter(|s| !s.starts_with(&format!("{victim}.")))
        .cloned()
        .collect();
    let dns_dropped = {
        wait_until("DNS drops the dead node's instance", || {
            let (code, answers, _) = dig(mesh.dns(0), "web.service.shoal.", RecordType::SRV);
            // The survivors stay listed (the re-placed slot may be back
            // already); the dead node's instance is gone.
            code == ResponseCode::NoError
                && survivors.iter().all(|s| answers.contains(s))
                && !answers.iter().any(|a| a.starts_with(&format!("{victim}.")))
        });
        Instant::now()
    };
    // The slot is re-placed; keep the client going a while after.
    wait_until("3 passing web instances again", || {
        web_instances(&mesh.agents[0]).len() == 3
    });
    std::thread::sleep(Duration::from_secs(1));
    let log = client.finish();
    // The catalog follows the view at the agent's next snapshot (100 ms
    // apart when idle); a second is the allowance for a loaded machine.
    let settled = dead + Duration::from_secs(1);
    let after: Vec<_> = log.iter().filter(|(at, _)| *at >= settled).collect();
    let failed_after: Vec<_> = after.iter().filter(|(_, r)| r.is_err()).collect();
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    let last_failure = failed
        .last()
        .map(|(at, _)| at.saturating_duration_since(killed_at));
    eprintln!(
        "{} requests, {} failed (the last started {last_failure:?} after the kill; {} after {victim} was declared dead + 1 s); declared dead {:?} after the kill, DNS dropped it {:?} after",
        log.len(),
        failed.len(),
        failed_after.len(),
        dead - killed_at,
        dns_dropped - killed_at
    );
    assert!(
        !failed.is_empty(),
        "a request to the hung instance before its node was declared dead fails (else the test proves nothing)"
    );
    assert!(after.len() > 10, "the client kept going: {}", after.len());
    assert!(
        failed_after.is_empty(),
        "requests failed after the node was declared dead: {:?}",
        failed_after.iter().map(|(_, r)| r).collect::<Vec<_>>()
    );
    assert!(log
        .iter()
        .all(|(_, r)| r.as_deref().map_or(true, |b| b == "v1\n")));
}

#[test]
fn a_rolling_update_through_the_mesh_fails_no_request() {
    let mesh = Mesh::start(20);
    mesh.run("v1");
    wait_until("3 passing web instances", || {
        web_instances(&mesh.agents[0]).len() == 3
    });
    let to = mesh.ingress(0);
    wait_until("the ingress answers", || get(to).as_deref() == Ok("v1\n"));
    // Slow requests (0.3 s) from 3 clients: without the shutdown delay a
    // stopping instance would be signalled with requests in flight.
    let client = Client::start(to, "/cgi-bin/slow", 3);
    std::thread::sleep(Duration::from_millis(300));
    mesh.run("v2");
    wait_until("3 passing instances of the new version everywhere", || {
        mesh.agents.iter().all(|a| {
            let w = web_instances(a);
            w.len() == 3 && w.iter().all(|(_, _, v)| *v == 2)
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let log = client.finish();
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    let v1 = log
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("v1\n"))
        .count();
    let v2 = log
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("v2\n"))
        .count();
    eprintln!(
        "{} requests through the update: {v1} v1, {v2} v2, {} failed",
        log.len(),
        failed.len()
    );
    assert!(
        v1 > 0 && v2 > 0,
        "the client saw both versions: {v1} v1, {v2} v2"
    );
    assert!(
        failed.is_empty(),
        "requests failed during the rolling update: {:?}",
        failed.iter().map(|(_, r)| r).collect::<Vec<_>>()
    );
}
