//! A member cannot speak for another: over real QUIC between real
//! membership tasks, a member holding a valid certificate of its own gossips
//! values in another node's name (in that node's own run, and as a new run
//! at its own address) and sends SWIM updates in its name; the honest nodes
//! keep believing only what the node itself signed and said, and its
//! incarnation moves by one refutation per forged message at most.

mod common;
use common::{member_with, record, wait_for};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use shoal_membership::signed::{self, Origin, CERT_KEY};
use shoal_membership::spread::{Delta, Entry, Msg, RunId};
use shoal_membership::swim::{ProbeMsg, Update, View};
use shoal_membership::{Membership, MembershipConfig, NodeState};
use shoal_transport::sign::Signer;
use shoal_transport::tls::{ClusterCa, NodeCredentials};
use shoal_transport::{QuicConfig, QuicTransport, Service, Transport};

const CLUSTER: &str = "forgery";

fn config(seeds: Vec<SocketAddr>) -> MembershipConfig {
    MembershipConfig {
        cluster_id: CLUSTER.into(),
        seeds,
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

/// The forger pushes `values` as the whole state of run `run` (versions
/// 1000 and up, above anything the real run wrote) to `to`, as a sync's
/// push would, from its own endpoint `t`.
async fn forged_gossip(
    t: &QuicTransport,
    run: RunId,
    values: Vec<(String, String)>,
    to: SocketAddr,
) {
    let entries: Vec<Entry> = values
        .into_iter()
        .enumerate()
        .map(|(i, (key, text))| Entry {
            key: Arc::from(key.as_str()),
            version: 1000 + i as u64,
            text: Arc::from(text.as_str()),
        })
        .collect();
    let to_version = entries.last().map_or(0, |e| e.version);
    let msg = Msg::Push(vec![Delta {
        run,
        from: 0,
        to: to_version,
        entries,
    }]);
    t.send(to, Service::Gossip, postcard::to_stdvec(&msg).unwrap())
        .await
        .expect("sent");
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
    // a's certificate as it publishes it: signed by a, at version 1.
    let a_signer = Signer::new(&a_creds).unwrap();
    let a_cert = |origin: Origin<'_>, seq: u64| {
        let cert = signed::encode_cert(&a_creds.cert_der);
        let sig = a_signer.sign(&signed::message(origin, CERT_KEY, seq, Some(&cert)));
        (CERT_KEY.to_string(), signed::encode(seq, &sig, Some(&cert)))
    };
    let mut values = vec![a_cert(a_run, 1)];
    values.push(forge(a_run, "status", 1000, "left"));
    values.push(forge(a_run, "inc", 1001, "77"));
    values.push(forge(a_run, "app/i/0/0", 1002, "forged"));
    values.push(("app/plain".to_string(), "unsigned".to_string()));
    for i in 0..300 {
        values.push((format!("app/filler{i}"), "x".into()));
    }
    let (tm, _inbox_m) = QuicTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &m_creds,
        QuicConfig::default(),
    )
    .await
    .unwrap();
    let m_addr = tm.local_addr();
    let a1 = RunId {
        name: Arc::from("a"),
        generation: 1,
        addr: a_addr,
    };
    forged_gossip(&tm, a1, values, b_addr).await;
    // 2. A newer run of a at the forger's own address, with a's
    //    certificate and a record signed by the forger.
    let new_run = Origin {
        name: "a",
        generation: 2,
        addr: m_addr,
    };
    let rec = serde_json::to_string(&record("a", m_addr)).unwrap();
    let values = vec![
        a_cert(a_run, 1),
        forge(new_run, "record", 1, &rec),
        forge(new_run, "inc", 2, "0"),
    ];
    let a2 = RunId {
        name: Arc::from("a"),
        generation: 2,
        addr: m_addr,
    };
    forged_gossip(&tm, a2, values, b_addr).await;
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

    // b reads gossip every 100 ms: give it ten reads, and check it
    // believed none of it, at no point on the way.
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
    // 4. Versions of a's run that a never wrote: far above a's, with no
    //    write at the last one, or with one the forger signed. Before #11's
    //    fix b took them and then never took a's real later writes.
    for (to, top) in [
        (u64::MAX / 2, None),
        (5000, Some(forge(a_run, "app/late", 5000, "forged"))),
    ] {
        let entries = top
            .into_iter()
            .map(|(key, text)| Entry {
                key: Arc::from(key.as_str()),
                version: to,
                text: Arc::from(text.as_str()),
            })
            .collect();
        let a1 = RunId {
            name: Arc::from("a"),
            generation: 1,
            addr: a_addr,
        };
        let msg = Msg::Push(vec![Delta {
            run: a1,
            from: 0,
            to,
            entries,
        }]);
        tm.send(b_addr, Service::Gossip, postcard::to_stdvec(&msg).unwrap())
            .await
            .expect("sent");
    }
    // a writes again: b takes it.
    ma.publish_app(Arc::new(
        [("late".to_string(), "real".to_string())]
            .into_iter()
            .collect(),
    ));
    wait_for(
        &mut view_b,
        "b to take a's write after the forged versions",
        |v| {
            v.get("a")
                .and_then(|m| m.app.get("late"))
                .is_some_and(|v| &**v == "real")
        },
    )
    .await;

    // 5. a's incarnation pushed towards the cap (#11's last probe): a
    //    suspicion near it to b, whose confirmation ping used to put it to
    //    a (which refuted above it); a ladder of suspicions at 0, 1, ...
    //    to a itself; a ping telling a it is suspect near the cap.
    let near_cap = (1u64 << 32) - 2;
    let suspect = |incarnation| Update {
        name: "a".into(),
        generation: 1,
        addr: a_addr,
        incarnation,
        state: NodeState::Suspect,
        by: "m".into(),
    };
    let ping = ProbeMsg::Ping {
        from: ("m".into(), 1, m_addr),
        target: "a".into(),
        view_of_you: Some(View {
            state: NodeState::Suspect,
            generation: 1,
            incarnation: near_cap,
        }),
    };
    for (to, msg) in [
        (b_addr, ProbeMsg::Updates(vec![suspect(near_cap)])),
        (a_addr, ProbeMsg::Updates((0..8).map(suspect).collect())),
        (a_addr, ping),
    ] {
        let body = postcard::to_stdvec(&msg).unwrap();
        tm.request(to, Service::Probe, body, Duration::from_secs(5))
            .await
            .expect("answered");
    }
    // a refutes the one suspicion at its own incarnation, once: b sees
    // it alive at 1, and nothing moves it further.
    wait_for(&mut view_b, "b to see a refute, alive", |v| {
        v.get("a")
            .is_some_and(|m| m.state == NodeState::Alive && m.incarnation >= 1)
    })
    .await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        {
            let v = view_b.borrow_and_update();
            let a = v.get("a").expect("b still knows a");
            assert!(
                a.incarnation <= 2,
                "a pushed to incarnation {} by three forged messages",
                a.incarnation
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
}
