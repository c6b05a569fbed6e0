//! One transport test suite, run against the QUIC transport and the in-memory
//! transport; then the QUIC-only security and robustness cases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_transport::tls::{ClusterCa, NodeCredentials, CLUSTER_SERVER_NAME};
use shoal_transport::{
    take_inbox, Inbox, MemNetwork, QuicConfig, QuicTransport, Service, Transport, TransportError,
    TransportStats, FRAME_LEN_MAX,
};

const DEADLINE: Duration = Duration::from_secs(10);

/// Makes `n` transports that can reach each other.
#[async_trait::async_trait]
trait Factory {
    type T: Transport;
    async fn make(&self, n: usize) -> Vec<(Self::T, Inbox)>;
}

struct Quic(ClusterCa);
#[async_trait::async_trait]
impl Factory for Quic {
    type T = QuicTransport;
    async fn make(&self, n: usize) -> Vec<(QuicTransport, Inbox)> {
        let mut out = Vec::new();
        for i in 0..n {
            let creds = self.0.issue_node(&format!("n{i}")).unwrap();
            out.push(
                QuicTransport::bind(
                    "127.0.0.1:0".parse().unwrap(),
                    &creds,
                    QuicConfig::default(),
                )
                .await
                .unwrap(),
            );
        }
        out
    }
}

struct Mem(MemNetwork);
#[async_trait::async_trait]
impl Factory for Mem {
    type T = shoal_transport::MemTransport;
    async fn make(&self, n: usize) -> Vec<(Self::T, Inbox)> {
        use std::sync::atomic::{AtomicU16, Ordering};
        static PORT: AtomicU16 = AtomicU16::new(1000);
        (0..n)
            .map(|i| {
                let port = PORT.fetch_add(1, Ordering::Relaxed);
                self.0
                    .bind_named(SocketAddr::from(([10, 0, 0, 1], port)), &format!("n{i}"))
                    .unwrap()
            })
            .collect()
    }
}

/// Answers every Test request with the body reversed.
fn spawn_echo(inbox: &mut Inbox) {
    let mut rx = take_inbox(inbox, Service::Test).unwrap();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let Some(reply) = msg.reply {
                let mut body = msg.body;
                body.reverse();
                reply.respond(body);
            }
        }
    });
}

async fn request_gets_response<F: Factory>(f: &F) {
    let mut nodes = f.make(2).await;
    spawn_echo(&mut nodes[1].1);
    let b = nodes[1].0.local_addr();
    let resp = nodes[0]
        .0
        .request(b, Service::Test, vec![1, 2, 3], DEADLINE)
        .await
        .unwrap();
    assert_eq!(resp, vec![3, 2, 1]);
    // Many concurrent requests share one connection.
    let a = nodes[0].0.clone();
    let mut handles = Vec::new();
    for i in 0..50u8 {
        let a = a.clone();
        handles.push(tokio::spawn(async move {
            a.request(b, Service::Test, vec![i, 0], DEADLINE).await
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap().unwrap(), vec![0, i as u8]);
    }
    // The answer names who gave it: the node its certificate names (SWIM
    // believes a direct ack's incarnation only from the target itself).
    let (resp, answerer) = nodes[0]
        .0
        .request_answered(b, Service::Test, vec![4, 5], DEADLINE)
        .await
        .unwrap();
    assert_eq!(resp, vec![5, 4]);
    assert_eq!(answerer.as_deref(), Some("n1"));
}

async fn one_way_arrives_with_sender_address<F: Factory>(f: &F) {
    let mut nodes = f.make(2).await;
    let mut rx = take_inbox(&mut nodes[1].1, Service::Probe).unwrap();
    let a = nodes[0].0.local_addr();
    nodes[0]
        .0
        .send(nodes[1].0.local_addr(), Service::Probe, b"hello".to_vec())
        .await
        .unwrap();
    let msg = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.body, b"hello");
    assert_eq!(msg.from, a);
    assert_eq!(
        msg.peer.as_deref(),
        Some("n0"),
        "the name in the sender's certificate"
    );
    assert!(msg.reply.is_none());
    // The other way, over the connection n0 opened: n0 learnt n1's name
    // from the certificate n1 presented as the server.
    let mut back = take_inbox(&mut nodes[0].1, Service::Probe).unwrap();
    nodes[1]
        .0
        .send(a, Service::Probe, b"hi".to_vec())
        .await
        .unwrap();
    let msg = tokio::time::timeout(DEADLINE, back.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.peer.as_deref(), Some("n1"));
    // Frames for one service never land in another's queue.
    let mut other = take_inbox(&mut nodes[1].1, Service::Rpc).unwrap();
    assert!(other.try_recv().is_err());
}

async fn oversized_frame_is_refused<F: Factory>(f: &F) {
    let nodes = f.make(2).await;
    let b = nodes[1].0.local_addr();
    let err = nodes[0]
        .0
        .send(b, Service::Test, vec![0; FRAME_LEN_MAX])
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    let err = nodes[0]
        .0
        .request(b, Service::Test, vec![0; FRAME_LEN_MAX], DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
}

async fn unanswered_request_fails_within_timeout<F: Factory>(f: &F) {
    let mut nodes = f.make(2).await;
    // Node 1 takes requests but never answers: the responder is dropped.
    let mut rx = take_inbox(&mut nodes[1].1, Service::Test).unwrap();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            drop(msg);
        }
    });
    let started = Instant::now();
    let r = nodes[0]
        .0
        .request(
            nodes[1].0.local_addr(),
            Service::Test,
            vec![1],
            Duration::from_millis(500),
        )
        .await;
    assert!(r.is_err());
    assert!(started.elapsed() < DEADLINE);
    // A closed peer: requests fail, they do not hang.
    let gone = nodes[1].0.local_addr();
    nodes[1].0.close();
    let started = Instant::now();
    let r = nodes[0]
        .0
        .request(gone, Service::Test, vec![1], Duration::from_millis(500))
        .await;
    assert!(r.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}

macro_rules! suite {
    ($modname:ident, $factory:expr) => {
        mod $modname {
            use super::*;
            #[tokio::test]
            async fn request_gets_response() {
                super::request_gets_response(&$factory).await
            }
            #[tokio::test]
            async fn one_way_arrives_with_sender_address() {
                super::one_way_arrives_with_sender_address(&$factory).await
            }
            #[tokio::test]
            async fn oversized_frame_is_refused() {
                super::oversized_frame_is_refused(&$factory).await
            }
            #[tokio::test]
            async fn unanswered_request_fails_within_timeout() {
                super::unanswered_request_fails_within_timeout(&$factory).await
            }
        }
    };
}

suite!(quic, Quic(ClusterCa::generate("suite").unwrap()));
suite!(mem, Mem(MemNetwork::new()));

// ---- QUIC only: credentials, garbage, oversized frames on the wire ----

async fn raw_client(creds: Option<&NodeCredentials>, trust: &NodeCredentials) -> quinn::Endpoint {
    let tls = match creds {
        Some(c) => c.client_config().unwrap(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls::pki_types::CertificateDer::from(
                    trust.ca_cert_der.clone(),
                ))
                .unwrap();
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            c.alpn_protocols = vec![shoal_transport::tls::ALPN.to_vec()];
            c
        }
    };
    client_endpoint(tls)
}

/// A client endpoint on loopback with `tls` as its default config.
fn client_endpoint(tls: rustls::ClientConfig) -> quinn::Endpoint {
    use quinn::crypto::rustls::QuicClientConfig;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep
}

/// One request to the test service over a new connection from `ep`
/// (within the deadline): the answer, or why there was none.
async fn ask_test(ep: &quinn::Endpoint, to: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let outcome = async {
        let conn = ep.connect(to, CLUSTER_SERVER_NAME)?.await?;
        let (mut s, mut r) = conn.open_bi().await?;
        s.write_all(&shoal_transport::encode_frame(Service::Test, vec![1])?)
            .await?;
        s.finish()?;
        Ok::<_, anyhow::Error>(r.read_to_end(1024).await?)
    };
    tokio::time::timeout(DEADLINE, outcome).await.unwrap()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn other_cluster_is_refused_both_ways() {
    let ours = Quic(ClusterCa::generate("ours").unwrap());
    let theirs = Quic(ClusterCa::generate("theirs").unwrap());
    let mut a = ours.make(1).await;
    let mut x = theirs.make(1).await;
    spawn_echo(&mut a[0].1);
    spawn_echo(&mut x[0].1);
    let (a, x) = (&a[0].0, &x[0].0);
    let r = x
        .request(
            a.local_addr(),
            Service::Test,
            vec![1],
            Duration::from_secs(2),
        )
        .await;
    assert!(r.is_err(), "a stranger's request was answered");
    let r = a
        .request(
            x.local_addr(),
            Service::Test,
            vec![1],
            Duration::from_secs(2),
        )
        .await;
    assert!(r.is_err(), "we accepted a stranger as server");
    let (sa, sx) = (a.stats(), x.stats());
    wait_for("refusals to be counted", || {
        TransportStats::get(&sa.handshakes_refused) >= 1
            && TransportStats::get(&sx.handshakes_refused) >= 1
    })
    .await;
    assert_eq!(TransportStats::get(&sa.frames_received), 0);
}

#[tokio::test]
async fn peer_without_certificate_is_refused() {
    let ca = ClusterCa::generate("c").unwrap();
    let f = Quic(ca.clone());
    let mut n = f.make(1).await;
    spawn_echo(&mut n[0].1);
    let node = &n[0].0;
    let trust = ca.issue_node("x").unwrap();
    let ep = raw_client(None, &trust).await;
    // TLS 1.3 lets the client finish before the server checks its (absent)
    // certificate, so the refusal shows on the first stream.
    let r = ask_test(&ep, node.local_addr()).await;
    assert!(r.is_err(), "a peer without a certificate got an answer");
    let stats = node.stats();
    wait_for("refusal to be counted", || {
        TransportStats::get(&stats.handshakes_refused) >= 1
    })
    .await;
    assert_eq!(TransportStats::get(&stats.frames_received), 0);
}

#[tokio::test]
async fn a_join_connection_reaches_the_join_service_and_nothing_else() {
    let ca = ClusterCa::generate("c").unwrap();
    let f = Quic(ca.clone());
    let mut n = f.make(1).await;
    spawn_echo(&mut n[0].1);
    let mut joins = take_inbox(&mut n[0].1, Service::Join).unwrap();
    let node = n[0].0.clone();
    tokio::spawn(async move {
        while let Some(msg) = joins.recv().await {
            assert!(msg.peer.is_none(), "a joining node has no name yet");
            let mut body = b"welcome ".to_vec();
            body.extend_from_slice(&msg.body);
            msg.reply.unwrap().respond(body);
        }
    });
    let token = ca
        .join_token(Duration::from_secs(60), std::time::SystemTime::now())
        .unwrap();
    let answer =
        shoal_transport::quic::join_call(node.local_addr(), &token, b"n9".to_vec(), DEADLINE)
            .await
            .unwrap();
    assert_eq!(answer, b"welcome n9");

    // The same kind of connection asking any other service is refused.
    let ep = client_endpoint(token.client_config().unwrap());
    let r = ask_test(&ep, node.local_addr()).await;
    assert!(
        r.is_err(),
        "a join connection reached the test service: {r:?}"
    );
    let stats = node.stats();
    wait_for("the refusal to be counted", || {
        TransportStats::get(&stats.frames_refused) >= 1
    })
    .await;

    // A token of another cluster's CA does not trust this node.
    let other = ClusterCa::generate("c")
        .unwrap()
        .join_token(Duration::from_secs(60), std::time::SystemTime::now())
        .unwrap();
    let r =
        shoal_transport::quic::join_call(node.local_addr(), &other, b"n9".to_vec(), DEADLINE).await;
    assert!(r.is_err(), "joined a node its token's CA did not certify");
}

#[tokio::test]
async fn garbage_and_oversized_frames_do_not_stall_the_node() {
    let ca = ClusterCa::generate("c").unwrap();
    let f = Quic(ca.clone());
    let mut n = f.make(2).await;
    spawn_echo(&mut n[0].1);
    let node = n[0].0.clone();
    let addr = node.local_addr();

    // Raw UDP garbage at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for len in [0usize, 1, 7, 40, 1200, 1500, 9000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = udp.send_to(&bytes, addr);
    }

    // A credentialed peer sending an oversized frame and undecodable frames.
    let creds = ca.issue_node("raw").unwrap();
    let ep = raw_client(Some(&creds), &creds).await;
    let conn = ep
        .connect(addr, CLUSTER_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let mut s = conn.open_uni().await.unwrap();
    let big = vec![7u8; FRAME_LEN_MAX + 4096];
    let _ = s.write_all(&big).await;
    let _ = s.finish();
    for junk in [vec![0xffu8; 3], vec![9u8; 100], vec![]] {
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&junk).await.unwrap();
        s.finish().unwrap();
    }
    let stats = node.stats();
    wait_for("oversized frame counted", || {
        TransportStats::get(&stats.frames_oversized) >= 1
    })
    .await;
    wait_for("undecodable frames counted", || {
        TransportStats::get(&stats.frames_undecodable) >= 3
    })
    .await;

    // Still serving.
    let resp = n[1]
        .0
        .request(addr, Service::Test, vec![5, 6], DEADLINE)
        .await
        .unwrap();
    assert_eq!(resp, vec![6, 5]);
}

/// A UDP relay in front of a node: what is sent to `front` goes to the
/// current target, and the current target's answers come back (a former
/// target is as good as gone: a crashed process sends nothing); `open`
/// false drops both ways.
struct Relay {
    front: SocketAddr,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    open: Arc<std::sync::atomic::AtomicBool>,
}

async fn relay(target: SocketAddr) -> Relay {
    use std::sync::atomic::{AtomicBool, Ordering};
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let target = Arc::new(std::sync::Mutex::new(target));
    let open = Arc::new(AtomicBool::new(true));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    {
        let (front, back, target, open, client) = (
            front.clone(),
            back.clone(),
            target.clone(),
            open.clone(),
            client.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if open.load(Ordering::Relaxed) {
                    let to = *target.lock().unwrap();
                    let _ = back.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    {
        let (front, back, open, target) =
            (front.clone(), back.clone(), open.clone(), target.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = back.recv_from(&mut buf).await {
                let to = *client.lock().unwrap();
                let current = from == *target.lock().unwrap();
                if let (Some(to), true, true) = (to, current, open.load(Ordering::Relaxed)) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    Relay {
        front: front.local_addr().unwrap(),
        target,
        open,
    }
}

/// No keep-alives and a long idle timeout (the default, so that idle
/// connections cost nothing): a request that hears nothing from the peer
/// drops the cached connection, so a peer gone silent or restarted on its
/// address is dialled afresh at the next message, not after the idle
/// timeout.
#[tokio::test]
async fn a_silent_peer_or_one_restarted_on_its_address_gets_a_fresh_connection() {
    use std::sync::atomic::Ordering;
    let f = Quic(ClusterCa::generate("relay").unwrap());
    let mut n = f.make(3).await;
    spawn_echo(&mut n[1].1);
    spawn_echo(&mut n[2].1);
    let r = relay(n[1].0.local_addr()).await;
    let a = &n[0].0;
    let ask = |timeout| a.request(r.front, Service::Test, vec![1, 2], timeout);
    assert_eq!(ask(DEADLINE).await.unwrap(), vec![2, 1]);
    let dropped = || TransportStats::get(&a.stats().connections_dropped_unresponsive);

    // Silent: the request times out, the connection is dropped; once the
    // path is back, a new connection answers.
    r.open.store(false, Ordering::Relaxed);
    assert!(matches!(
        ask(Duration::from_millis(300)).await,
        Err(TransportError::Timeout(_))
    ));
    assert_eq!(dropped(), 1);
    r.open.store(true, Ordering::Relaxed);
    assert_eq!(ask(DEADLINE).await.unwrap(), vec![2, 1]);

    // "Restarted": the same address now leads to another process, which
    // knows nothing of the old connection. One request fails, the next
    // one dials it.
    *r.target.lock().unwrap() = n[2].0.local_addr();
    assert!(matches!(
        ask(Duration::from_millis(300)).await,
        Err(TransportError::Timeout(_))
    ));
    assert_eq!(dropped(), 2);
    assert_eq!(ask(DEADLINE).await.unwrap(), vec![2, 1]);
}
