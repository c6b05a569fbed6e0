//! The cluster foundation with real agent processes on 127.0.0.1.

mod common;

use common::*;

#[test]
fn five_agents_converge_detect_death_leave_and_rejoin() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = cluster(root.path(), 5);

    wait_until("every agent sees 5 alive nodes", || {
        agents.iter().all(|a| {
            a.nodes()
                .is_some_and(|ns| ns.len() == 5 && ns.iter().all(|n| n.state == "alive"))
        })
    });

    // SIGKILL: every survivor reports it dead.
    agents[4].stop(libc::SIGKILL);
    wait_until("survivors report n4 dead", || {
        all_see(&agents, "n4", "dead")
    });

    // SIGTERM: graceful leave, reported left (not dead).
    let status = agents[3].stop(libc::SIGTERM);
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    wait_until("survivors report n3 left", || {
        all_see(&agents, "n3", "left")
    });
    assert!(agents[3].stderr().contains("left the cluster"));

    // Restart with the same name and data dir: no token flag needed, alive again.
    let seed = agents[0].quic();
    agents[3] = Agent::start(root.path(), "n3", Some(&seed), None, &[]);
    wait_until("n3 alive again everywhere", || {
        all_see(&agents, "n3", "alive")
    });
    // and it sees the others (n4 still dead)
    wait_until("restarted n3 sees the cluster", || {
        agents[3].state_of("n0").as_deref() == Some("alive")
            && agents[3].state_of("n4").as_deref() == Some("dead")
    });
}

#[test]
fn strangers_are_refused_and_appear_in_no_view() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_until("2 alive", || {
        all_see(&agents, "n0", "alive") && all_see(&agents, "n1", "alive")
    });

    // A node of another cluster, pointed at ours. It holds that cluster's
    // CA (as a member restarted with its data dir does) and no token.
    let other = tempfile::tempdir().unwrap();
    let foreign_seed = Agent::start(other.path(), "foreign-seed", None, None, &[]);
    let seed = agents[0].quic();
    std::fs::create_dir_all(root.path().join("intruder")).unwrap();
    std::fs::copy(
        foreign_seed.dir.join("cluster-ca"),
        root.path().join("intruder").join("cluster-ca"),
    )
    .unwrap();
    let intruder = Agent::start(root.path(), "intruder", Some(&seed), None, &[]);
    wait_until("both sides log the refusal", || {
        agents[0].stderr().contains("refused connection")
            && intruder.stderr().contains("certificate")
    });
    // Give gossip several rounds to (wrongly) spread it, then check no view has it.
    std::thread::sleep(std::time::Duration::from_secs(2));
    for a in &agents {
        let names: Vec<String> = a.nodes().unwrap().into_iter().map(|n| n.name).collect();
        assert!(
            !names.contains(&"intruder".to_string()),
            "{} lists the intruder: {names:?}",
            a.name
        );
    }
    let seen_by_intruder: Vec<String> = intruder
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(seen_by_intruder, vec!["intruder".to_string()]);
}

#[test]
fn a_token_of_another_cluster_admits_nowhere_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let ours = Agent::start(root.path(), "n0", None, None, &[]);
    let other = tempfile::tempdir().unwrap();
    let theirs = Agent::start(other.path(), "t0", None, None, &[]);
    let token_file = theirs.token_file();
    let out = agent_output(
        &root.path().join("x"),
        "x",
        &ours.quic(),
        &["--token-file", token_file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another cluster"), "{err}");
    assert!(!root.path().join("x").join("cluster-ca").exists());
    let names: Vec<String> = ours.nodes().unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, vec!["n0".to_string()]);
}

#[test]
fn join_without_token_exits_with_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let out = agent_output(root.path(), "x", "127.0.0.1:9", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token") && err.contains("--token-file"),
        "{err}"
    );
}

#[test]
fn garbage_and_oversized_frames_do_not_crash_or_stall_an_agent() {
    use shoal_transport::tls::{ClusterCa, CLUSTER_SERVER_NAME};
    use shoal_transport::{encode_frame, Service, FRAME_LEN_MAX};

    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 3);
    wait_all_alive(&agents);
    let target: std::net::SocketAddr = agents[0].quic().parse().unwrap();

    // Raw UDP garbage.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let len = (i as usize * 97) % 1500;
        let bytes: Vec<u8> = (0..len)
            .map(|j| (j as u32 ^ i).wrapping_mul(2654435761) as u8)
            .collect();
        udp.send_to(&bytes, target).unwrap();
    }

    // Through a credentialed connection: an oversized frame and frames that
    // decode as no valid gossip or probe message.
    let ca = ClusterCa::decode(&std::fs::read_to_string(agents[0].dir.join("cluster-ca")).unwrap())
        .unwrap();
    let creds = ca.issue_node("fuzzer").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = quic_client(&creds);
        let conn = ep
            .connect(target, CLUSTER_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let mut s = conn.open_uni().await.unwrap();
        let _ = s.write_all(&vec![1u8; FRAME_LEN_MAX + 10]).await;
        let _ = s.finish();
        for service in [Service::Gossip, Service::Probe, Service::Rpc] {
            for junk in [vec![], vec![0xff; 7], vec![0x00; 300]] {
                let frame = encode_frame(service, junk).unwrap();
                if let Ok(mut s) = conn.open_uni().await {
                    let _ = s.write_all(&frame).await;
                    let _ = s.finish();
                }
                if let Ok((mut s, mut r)) = conn.open_bi().await {
                    let frame = encode_frame(service, vec![0xee; 13]).unwrap();
                    let _ = s.write_all(&frame).await;
                    let _ = s.finish();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        r.read_to_end(1024),
                    )
                    .await;
                }
            }
        }
    });

    // Still serving, still a member, still sees the others.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let nodes = agents[0].nodes().expect("agent still answers its API");
    assert_eq!(
        nodes.iter().filter(|n| n.state == "alive").count(),
        3,
        "{nodes:?}"
    );
    assert!(all_see(&agents, "n0", "alive"));
    assert!(!nodes.iter().any(|n| n.name == "fuzzer"));
}

/// A second machine given a live member's name is refused with a clear
/// error on both sides, and the real node keeps its place (the #11 probe:
/// an agent started with an existing node's name replaced the real node in
/// every view, and its slots ran twice).
#[test]
fn a_second_machine_with_a_live_members_name_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let agents = cluster(root.path(), 2);
    wait_until("2 alive", || {
        all_see(&agents, "n0", "alive") && all_see(&agents, "n1", "alive")
    });
    let real = agents[0]
        .nodes()
        .unwrap()
        .into_iter()
        .find(|n| n.name == "n1")
        .unwrap()
        .address;
    // Another machine: another loopback address.
    let dir = root.path().join("impostor");
    let mut impostor = std::process::Command::new(BIN)
        .args(["agent", "--name", "n1", "--preset", "local-test"])
        .args(["--listen", "127.0.0.7:0", "--http", "127.0.0.7:0"])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--join", &agents[0].quic()])
        .arg("--token-file")
        .arg(agents[0].token_file())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until("the impostor exits", || {
        status = impostor.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut impostor.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    assert!(
        err.contains("belongs to the live node") && err.contains("--name"),
        "{err}"
    );
    wait_until("the seed logs the refusal", || {
        agents[0]
            .stderr()
            .contains("refused a node joining under a live member's name")
    });
    for a in &agents {
        let n1 = a
            .nodes()
            .unwrap()
            .into_iter()
            .find(|n| n.name == "n1")
            .unwrap();
        assert_eq!(
            (n1.state.as_str(), n1.address.as_str()),
            ("alive", real.as_str())
        );
    }
}

/// Certificates expire, and a running node renews its own: once its first
/// certificate has expired it still admits a new peer (before, every
/// certificate was valid from 1975 to 4096).
#[test]
fn a_running_node_renews_its_certificate_before_it_expires() {
    let root = tempfile::tempdir().unwrap();
    let n0 = Agent::start(root.path(), "n0", None, None, &["--cert-lifetime", "3s"]);
    // Renewed after 2 s and 4 s: the first certificate (3 s) has expired.
    wait_until("n0 renews its certificate twice", || {
        n0.stderr()
            .matches("renewed this node's certificate")
            .count()
            >= 2
    });
    let n1 = Agent::start(
        root.path(),
        "n1",
        Some(&n0.quic()),
        Some(&n0.token_file()),
        &[],
    );
    let agents = [n0, n1];
    wait_until("n0 and n1 see each other alive", || {
        all_see(&agents, "n0", "alive") && all_see(&agents, "n1", "alive")
    });
}
