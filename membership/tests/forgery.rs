//! A member cannot speak for another: over real QUIC between real
//! membership tasks, a member holding a valid certificate of its own gossips
//! values in another node's name (in that node's own run, and as a new run
//! at its own address) and sends SWIM updates in its name; the honest nodes
//! keep believing only what the node itself signed and said.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use shoal_membership::signed::{self, Origin, CERT_KEY};
use shoal_membership::swim::{ProbeMsg, Update};
use shoal_membership::{Membership, MembershipConfig, MembershipView, NodeRecord, NodeState};
use shoal_transport::gossip::GossipTransport;
use shoal_transport::sign::Signer;
use shoal_transport::tls::{ClusterCa, NodeCredentials};
use shoal_transport::{take_inbox, QuicConfig, QuicTransport, Service, Transport};

const CLUSTER: &str = "forgery";

/// A record a view tells from the bare one it shows before reading any.
fn record(name: &str, addr: SocketAddr) -> NodeRecord {
    NodeRecord {
        version: "test".into(),
        ..NodeRecord::bare(name, addr)
    }
}

fn config(seeds: Vec<SocketAddr>) -> MembershipConfig {
    MembershipConfig {
        cluster_id: CLUSTER.into(),
        seeds,
        gossip_interval: Duration::from_millis(100),
        ..MembershipConfig::default()
    }
}

async fn member(
    creds: &NodeCredentials,
    name: &str,
    seeds: Vec<SocketAddr>,
) -> (QuicTransport, Membership) {
    member_with(creds, name, config(seeds)).await
}

async fn member_with(
    creds: &NodeCredentials,
    name: &str,
    config: MembershipConfig,
) -> (QuicTransport, Membership) {
    let (t, mut inbox) =
        QuicTransport::bind("127.0.0.1:0".parse().unwrap(), creds, QuicConfig::default())
            .await
            .unwrap();
    let m = Membership::start(
        t.clone(),
        &mut inbox,
        record(name, t.local_addr()),
        1,
        t.signer(),
        config,
    )
    .await
    .unwrap();
    (t, m)
}

/// A chitchat instance of the forger's, gossiping `values` as node `id`.
async fn forged_gossip(
    creds: &NodeCredentials,
    id: ChitchatId,
    values: Vec<(String, String)>,
    seed: SocketAddr,
) -> ChitchatHandle {
    let (t, mut inbox) =
        QuicTransport::bind("127.0.0.1:0".parse().unwrap(), creds, QuicConfig::default())
            .await
            .unwrap();
    let rx = take_inbox(&mut inbox, Service::Gossip).unwrap();
    let config = ChitchatConfig {
        chitchat_id: id,
        cluster_id: CLUSTER.into(),
        gossip_interval: Duration::from_millis(50),
        listen_addr: t.local_addr(),
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let gt = GossipTransport::new(t, rx);
    // chitchat keeps a clone of what it needs; the transport stays bound
    // as long as its endpoint lives in the spawned tasks.
    spawn_chitchat(config, values, &gt).await.unwrap()
}

async fn wait_for(
    view: &mut tokio::sync::watch::Receiver<MembershipView>,
    what: &str,
    ok: impl Fn(&MembershipView) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ok(&view.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}: {:?}",
            view.borrow().members
        );
        let _ = tokio::time::timeout(left, view.changed()).await;
    }
}

/// Waits until the forger's chitchat lists `name`: it has then had an
/// exchange with that node, whose last message carried the forged state.
async fn wait_exchanged(forger: &ChitchatHandle, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = forger
            .with_chitchat(|c| c.node_states().keys().any(|id| &*id.node_id == name))
            .await;
        if seen {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the forger never gossiped with {name}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_speak_for_another_in_gossip_or_swim() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let a_creds = ca.issue_node("a").unwrap();
    let (ta, ma) = member(&a_creds, "a", vec![]).await;
    let a_addr = ta.local_addr();
    let (tb, mb) = member(&ca.issue_node("b").unwrap(), "b", vec![a_addr]).await;
    let b_addr = tb.local_addr();
    let mut view_b = mb.view();
    wait_for(&mut view_b, "b to see a", |v| {
        v.get("a")
            .is_some_and(|m| m.state == NodeState::Alive && m.record.version == "test")
    })
    .await;

    // The forger: a member of its own ("m"), with a valid certificate.
    let m_creds = ca.issue_node("m").unwrap();
    let m_signer = Signer::new(&m_creds).unwrap();
    let forge = |origin: Origin<'_>, key: &str, seq: u64, value: &str| {
        let sig = m_signer.sign(&signed::message(origin, key, seq, Some(value)));
        (key.to_string(), signed::encode(seq, &sig, Some(value)))
    };
    // 1. In a's own run and address: a's certificate, "left", a huge
    //    incarnation and an instance key, at versions above a's.
    let a_run = Origin {
        name: "a",
        generation: 1,
        addr: a_addr,
    };
    let mut values = vec![(CERT_KEY.to_string(), signed::encode_cert(&a_creds.cert_der))];
    values.push(forge(a_run, "status", 1000, "left"));
    values.push(forge(a_run, "inc", 1001, "77"));
    values.push(forge(a_run, "app/i/0/0", 1002, "forged"));
    values.push(("app/plain".to_string(), "unsigned".to_string()));
    for i in 0..300 {
        values.push((format!("app/filler{i}"), "x".into()));
    }
    let f1 = forged_gossip(
        &m_creds,
        ChitchatId::new("a".to_string(), 1, a_addr),
        values,
        b_addr,
    )
    .await;
    // 2. A newer run of a at the forger's own address, with a's
    //    certificate and a record signed by the forger.
    let (tm, _inbox_m) = QuicTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &m_creds,
        QuicConfig::default(),
    )
    .await
    .unwrap();
    let m_addr = tm.local_addr();
    let new_run = Origin {
        name: "a",
        generation: 2,
        addr: m_addr,
    };
    let rec = serde_json::to_string(&record("a", m_addr)).unwrap();
    let values = vec![
        (CERT_KEY.to_string(), signed::encode_cert(&a_creds.cert_der)),
        forge(new_run, "record", 1, &rec),
        forge(new_run, "inc", 2, "0"),
    ];
    let f2 = forged_gossip(
        &m_creds,
        ChitchatId::new("a".to_string(), 2, m_addr),
        values,
        b_addr,
    )
    .await;
    // 3. SWIM updates in a's name, and a suspicion of a made-up run.
    let lies = ProbeMsg::Updates(vec![
        Update {
            name: "a".into(),
            generation: 1,
            addr: a_addr,
            incarnation: 5,
            state: NodeState::Left,
            by: "a".into(),
        },
        Update {
            name: "a".into(),
            generation: 1,
            addr: a_addr,
            incarnation: 6,
            state: NodeState::Alive,
            by: "a".into(),
        },
        Update {
            name: "a".into(),
            generation: 3,
            addr: m_addr,
            incarnation: 0,
            state: NodeState::Suspect,
            by: "m".into(),
        },
        Update {
            name: "a".into(),
            generation: 1,
            addr: a_addr,
            incarnation: 0,
            state: NodeState::Suspect,
            by: "c".into(),
        },
    ]);
    tm.request(
        b_addr,
        Service::Probe,
        postcard::to_stdvec(&lies).unwrap(),
        Duration::from_secs(5),
    )
    .await
    .expect("b answers the update request");

    wait_exchanged(&f1, "b").await;
    wait_exchanged(&f2, "b").await;
    // b reads gossip every 100 ms: give it ten reads, then check it
    // believed none of it, and at no point on the way.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        {
            let v = view_b.borrow_and_update();
            let a = v.get("a").expect("b still knows a");
            assert_eq!(
                a.state,
                NodeState::Alive,
                "a forged leave or suspicion was believed"
            );
            assert_eq!(a.generation, 1, "a forged run of a was believed");
            assert_eq!(a.record.address, a_addr);
            assert_eq!(a.incarnation, 0, "a forged incarnation was believed");
            assert!(
                a.app.is_empty(),
                "forged application keys were believed: {:?}",
                a.app.keys().collect::<Vec<_>>()
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), view_b.changed()).await;
    }
    // a itself is still heard: its own leave reaches b.
    ma.leave().await.unwrap();
    wait_for(&mut view_b, "b to see a leave", |v| {
        v.get("a").is_some_and(|m| m.state == NodeState::Left)
    })
    .await;
    drop((f1, f2));
}

/// A chitchat Syn message whose digest gives node `id` the heartbeat
/// `heartbeat`, as chitchat 0.11 serializes it (its digest type cannot be
/// built outside the crate).
fn syn_with_heartbeat(id: &ChitchatId, heartbeat: u64) -> Vec<u8> {
    use chitchat::Serializable;
    let mut buf = Vec::new();
    buf.extend(45_139u16.to_le_bytes()); // magic
    buf.push(0); // protocol version
    buf.push(0); // Syn
    1u16.serialize(&mut buf);
    id.serialize(&mut buf);
    heartbeat.serialize(&mut buf);
    0u64.serialize(&mut buf); // last gc version
    0u64.serialize(&mut buf); // max version
    CLUSTER.to_string().serialize(&mut buf);
    buf
}

/// chitchat's heartbeats are unsigned: a member that gossips another
/// node's heartbeat at the maximum made its real ones never count again,
/// so chitchat found the node dead, stopped relaying its state and deleted
/// it (the node's record and application keys vanished from views, and
/// its news stopped arriving). Heartbeats now follow SWIM's verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_freeze_another_by_forging_its_heartbeat() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let short = |seeds| {
        let mut c = config(seeds);
        // chitchat deletes a node it holds dead after this.
        c.swim.dead_retention = Duration::from_secs(2);
        c
    };
    let (ta, ma) = member_with(&ca.issue_node("a").unwrap(), "a", short(vec![])).await;
    let a_addr = ta.local_addr();
    let (tb, mb) = member_with(&ca.issue_node("b").unwrap(), "b", short(vec![a_addr])).await;
    let b_addr = tb.local_addr();
    let mut view_b = mb.view();
    wait_for(&mut view_b, "b to see a", |v| {
        v.get("a")
            .is_some_and(|m| m.state == NodeState::Alive && m.record.version == "test")
    })
    .await;

    let m_creds = ca.issue_node("m").unwrap();
    let (tm, _inbox_m) = QuicTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &m_creds,
        QuicConfig::default(),
    )
    .await
    .unwrap();
    let forged = syn_with_heartbeat(&ChitchatId::new("a".to_string(), 1, a_addr), u64::MAX);
    let forger = tokio::spawn(async move {
        loop {
            let _ = tm.send(b_addr, Service::Gossip, forged.clone()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Longer than chitchat takes to find a node dead (a few seconds at a
    // 100 ms gossip interval) plus its 2 s grace before deleting it.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        {
            let v = view_b.borrow_and_update();
            let a = v.get("a").expect("b still knows a");
            // A late ack on a loaded machine may make a suspect for a
            // moment; dead or forgotten it must not be.
            assert!(
                matches!(a.state, NodeState::Alive | NodeState::Suspect),
                "{:?}",
                a.state
            );
            assert_eq!(a.record.version, "test", "b forgot a's record");
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), view_b.changed()).await;
    }
    // a's news still arrives.
    ma.publish_app(std::sync::Arc::new(
        [("x".to_string(), "after".to_string())]
            .into_iter()
            .collect(),
    ));
    wait_for(&mut view_b, "a's new value at b", |v| {
        v.get("a")
            .is_some_and(|m| m.app.get("x").map(|x| &**x) == Some("after"))
    })
    .await;
    forger.abort();
}
