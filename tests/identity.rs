//! Cluster identity: join tokens that expire and carry no key, joins
//! answered by any member, and peers that speak only for the name in their
//! certificate.

mod common;

use common::*;
use shoal_transport::tls::{Admission, ClusterCa, CLUSTER_SERVER_NAME};

/// `shoal token create` against an agent, with its API token.
fn create_token(agent: &Agent, ttl: &str) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["token", "create", "--ttl", ttl, "--addr", &agent.http()])
        .env("SHOAL_HTTP_TOKEN", agent.api_token())
        .output()
        .unwrap()
}

#[test]
fn any_member_admits_with_a_token_that_carries_no_key_until_it_expires() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_until("2 alive", || {
        all_see(&agents, "n0", "alive") && all_see(&agents, "n1", "alive")
    });
    // The token files hold join tokens, not the CA.
    let ca = ClusterCa::decode(&std::fs::read_to_string(agents[0].dir.join("cluster-ca")).unwrap())
        .unwrap();
    for a in &agents {
        let text = std::fs::read_to_string(a.token_file()).unwrap();
        assert!(
            matches!(Admission::parse(&text).unwrap(), Admission::Token(_)),
            "{}'s join-token holds the CA",
            a.name
        );
    }
    // n1, itself admitted by n0, makes a token and admits n2.
    let out = create_token(&agents[1], "10m");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let t = match Admission::parse(&token).unwrap() {
        Admission::Token(t) => t,
        Admission::Ca(_) => panic!("shoal token create printed the CA"),
    };
    ca.check_token(&t, std::time::SystemTime::now()).unwrap();
    let file = root.path().join("n2-token");
    std::fs::write(&file, &token).unwrap();
    let n2 = Agent::start(root.path(), "n2", Some(&agents[1].quic()), Some(&file), &[]);
    let all: Vec<&Agent> = agents.iter().chain(std::iter::once(&n2)).collect();
    wait_until("n2 alive everywhere", || {
        all.iter().all(|a| {
            a.nodes()
                .is_some_and(|ns| ns.iter().any(|n| n.name == "n2" && n.state == "alive"))
        })
    });
    assert!(n2
        .stderr()
        .contains("admitted to the cluster with a join token"));
    assert_eq!(
        std::fs::read_to_string(n2.dir.join("cluster-ca"))
            .unwrap()
            .trim(),
        ca.encode(),
        "the member handed over the cluster's CA"
    );

    // A token whose time is up admits nobody.
    let out = create_token(&agents[0], "1s");
    assert!(out.status.success());
    let short = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let expires = match Admission::parse(&short).unwrap() {
        Admission::Token(t) => t.expires_s,
        Admission::Ca(_) => unreachable!(),
    };
    wait_until("the short token expires", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            >= expires
    });
    let out = agent_output(
        &root.path().join("late"),
        "late",
        &agents[0].quic(),
        &["--token", &short],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("expired") && err.contains("shoal token create"),
        "{err}"
    );

    // Bad asks get a JSON error.
    let out = create_token(&agents[0], "400d");
    assert!(!out.status.success());
}

#[test]
fn a_peer_speaks_only_for_the_name_in_its_certificate() {
    use shoal_core::wire::{Request, Response};
    use shoal_membership::swim::ProbeMsg;
    use shoal_transport::{encode_frame, Service};

    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_until("2 alive", || {
        all_see(&agents, "n0", "alive") && all_see(&agents, "n1", "alive")
    });
    let target: std::net::SocketAddr = agents[0].quic().parse().unwrap();
    let n1: std::net::SocketAddr = agents[1].quic().parse().unwrap();
    // A member's credentials, for the name "mallory".
    let ca = ClusterCa::decode(&std::fs::read_to_string(agents[0].dir.join("cluster-ca")).unwrap())
        .unwrap();
    let creds = ca.issue_node("mallory").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (claim, ping) = rt.block_on(async {
        let ep = quic_client(&creds);
        let conn = ep
            .connect(target, CLUSTER_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let call = |service, body: Vec<u8>| {
            let conn = conn.clone();
            async move {
                let (mut s, mut r) = conn.open_bi().await.unwrap();
                s.write_all(&encode_frame(service, body).unwrap())
                    .await
                    .unwrap();
                s.finish().unwrap();
                tokio::time::timeout(std::time::Duration::from_secs(5), r.read_to_end(1 << 20))
                    .await
                    .unwrap()
            }
        };
        // Claim n1's name from another address.
        let claim = call(
            Service::Rpc,
            Request::Claim {
                name: "n1".into(),
                address: "127.0.0.9:4700".parse().unwrap(),
            }
            .encode(),
        )
        .await
        .map(|b| Response::decode(&b));
        // Ping in n1's name.
        let ping = call(
            Service::Probe,
            postcard::to_stdvec(&ProbeMsg::Ping {
                from: ("n1".into(), 1, n1),
                target: "n0".into(),
                view_of_you: None,
            })
            .unwrap(),
        )
        .await;
        (claim, ping)
    });
    match claim {
        Ok(Ok(Response::Error(e))) => assert!(e.contains("only its own name"), "{e}"),
        other => panic!("a claim of another node's name was answered {other:?}"),
    }
    assert!(ping.is_err(), "a ping in another node's name was answered");
    assert!(agents[0]
        .stderr()
        .contains("dropped a ping sent in another node's name"));
}

/// Whether a client holding `creds` is served by the agent at `addr`: a
/// bid request answered.
fn served(
    rt: &tokio::runtime::Runtime,
    creds: &shoal_transport::tls::NodeCredentials,
    addr: std::net::SocketAddr,
) -> bool {
    use shoal_core::wire::{Request, Response};
    use shoal_transport::{encode_frame, Service};
    rt.block_on(async {
        let ep = quic_client(creds);
        let exchange = async {
            let conn = ep.connect(addr, CLUSTER_SERVER_NAME).ok()?.await.ok()?;
            let (mut s, mut r) = conn.open_bi().await.ok()?;
            s.write_all(&encode_frame(Service::Rpc, Request::Bid.encode()).ok()?)
                .await
                .ok()?;
            s.finish().ok()?;
            let bytes = r.read_to_end(1 << 20).await.ok()?;
            matches!(Response::decode(&bytes), Ok(Response::Bid(_))).then_some(())
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
            .await
            .ok()
            .flatten()
            .is_some()
    })
}

#[test]
fn the_ca_rotates_without_downtime() {
    const SVC: &str = r#"name = "svc"
type = "service"
replicas = 3

[task]
driver = "exec"
command = "sleep"
args = ["100000"]

[task.resources]
cpu = 100
memory = 32
"#;
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 3);
    wait_until("3 alive", || {
        ["n0", "n1", "n2"]
            .iter()
            .all(|n| all_see(&agents, n, "alive"))
    });
    let file = job_file(root.path(), "svc", SVC);
    let (ok, out, err) = cli(
        &agents[0],
        &["run", file.to_str().unwrap(), "--timeout", "60"],
    );
    assert!(ok, "{out}{err}");
    let placed = |a: &Agent| -> Vec<(u32, Option<String>, String, u32)> {
        let mut v: Vec<_> = a
            .job("svc")
            .unwrap()
            .instances
            .into_iter()
            .map(|i| (i.slot, i.node, i.state, i.restarts))
            .collect();
        v.sort();
        v
    };
    wait_until("every member sees the 3 copies running", || {
        agents.iter().all(|a| {
            a.job("svc")
                .is_some_and(|j| j.instances.iter().filter(|i| i.state == "running").count() == 3)
        })
    });
    let before = placed(&agents[0]);
    assert!(agents.iter().all(|a| placed(a) == before));
    let old_ca =
        ClusterCa::decode(&std::fs::read_to_string(agents[0].dir.join("cluster-ca")).unwrap())
            .unwrap();
    let old_token = std::fs::read_to_string(agents[0].token_file()).unwrap();
    let old_creds = old_ca.issue_node("old").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addrs: Vec<std::net::SocketAddr> =
        agents.iter().map(|a| a.quic().parse().unwrap()).collect();
    assert!(addrs.iter().all(|a| served(&rt, &old_creds, *a)));

    let (ok, out, err) = cli(&agents[1], &["ca", "rotate"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("on 3 members"), "{out}");

    // One new CA everywhere, of the same cluster.
    let cas: Vec<ClusterCa> = agents
        .iter()
        .map(|a| {
            ClusterCa::decode(&std::fs::read_to_string(a.dir.join("cluster-ca")).unwrap()).unwrap()
        })
        .collect();
    assert!(
        cas.iter().all(|c| *c == cas[0]),
        "the members disagree on the CA"
    );
    assert_ne!(cas[0], old_ca);
    assert_eq!(cas[0].cluster_id, old_ca.cluster_id);
    // Every member serves a holder of the new CA's certificates, none a
    // holder of the old one's.
    let new_creds = cas[0].issue_node("new").unwrap();
    for (a, addr) in agents.iter().zip(&addrs) {
        assert!(
            served(&rt, &new_creds, *addr),
            "{} refuses the new CA",
            a.name
        );
        assert!(
            !served(&rt, &old_creds, *addr),
            "{} still trusts the old CA",
            a.name
        );
    }
    // Without downtime: the same copies still run where they ran, nobody
    // was declared dead, and the members still see each other.
    // (A copy that restarted or moved would show restarts or another node
    // for good.)
    wait_until("every member still sees the same copies", || {
        agents.iter().all(|a| placed(a) == before)
    });
    for a in &agents {
        assert!(
            !a.stderr().contains("state=dead"),
            "{} saw a death:\n{}",
            a.name,
            a.stderr()
        );
    }
    wait_until("all still alive everywhere after new connections", || {
        ["n0", "n1", "n2"]
            .iter()
            .all(|n| all_see(&agents, n, "alive"))
    });
    assert_eq!(processes_of(root.path(), "svc"), 3);

    // Tokens made before admit nobody; the new token file does.
    let out = agent_output(
        &root.path().join("late"),
        "late",
        &agents[0].quic(),
        &["--token", old_token.trim()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rotated"));
    let n3 = Agent::start(
        root.path(),
        "n3",
        Some(&agents[2].quic()),
        Some(&agents[2].token_file()),
        &[],
    );
    wait_until("n3 alive everywhere", || {
        agents.iter().chain(std::iter::once(&n3)).all(|a| {
            a.nodes()
                .is_some_and(|ns| ns.iter().any(|n| n.name == "n3" && n.state == "alive"))
        })
    });
}
