//! [`QuicTransport`]: one quinn endpoint per node, mutual TLS, one stream per
//! frame.
//!
//! Connections are cached per peer address and shared by both directions: a
//! node answers streams on connections it opened as well as on those it
//! accepted. A new inbound connection from an address replaces the cached one,
//! so a peer that restarted on the same address is reachable at once instead
//! of after the old connection's idle timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::sign::Signer;
use crate::tls::{peer_name, JoinToken, NodeCredentials, CLUSTER_SERVER_NAME, JOIN_ALPN};
use crate::{
    encode_frame, Dispatch, Inbox, Responder, Service, Transport, TransportError, TransportStats,
    FRAME_LEN_MAX,
};

/// Settings of the QUIC transport.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// Longest wait for a handshake. Loopback and LAN handshakes take a few
    /// milliseconds; a second leaves room for lost packets (QUIC's first
    /// retransmission comes after 333 ms) without stalling a caller long.
    pub connect_timeout: Duration,
    /// A connection with no packet for this long is closed. Long, so that
    /// the traffic nodes exchange anyway (SWIM probes every member in turn:
    /// with a 100 ms interval, each pair at least every N × 100 ms each
    /// way) keeps connections open without keep-alives up to about 600
    /// nodes; beyond that an idle pair pays a handshake per probe instead.
    /// A peer that restarted on the same address is found sooner: a
    /// request that times out with nothing at all heard from the peer
    /// drops the cached connection (see [`QuicTransport`]'s `request`).
    pub idle_timeout: Duration,
    /// Keep-alive period, or none. None by default: a keep-alive on every
    /// connection costs each node (ping and ack, both ways) per peer per
    /// interval, which grows with the cluster (measured: wire bytes per
    /// idle node 3.0 KB/s at 10 agents, 6.0 at 50, with 1 s keep-alives
    /// against a flat gossip payload).
    pub keep_alive_interval: Option<Duration>,
    /// One-way sends in flight at once; beyond it sends are dropped and
    /// counted (gossip and probes are periodic and tolerate loss).
    pub sends_in_flight_max: usize,
    /// Handshakes in progress at once; beyond it new connections are refused.
    pub handshakes_in_flight_max: usize,
    /// Concurrent streams a peer may open on one connection (each direction).
    pub streams_per_connection_max: u32,
    /// How long a request handler may take before the stream is reset.
    pub serve_timeout: Duration,
    /// Peers with a cached connection at most; beyond it new outbound
    /// connections are refused.
    pub peers_max: usize,
    /// Join connections (from nodes without credentials) served at once;
    /// beyond it new ones are closed. Each carries one exchange.
    pub joins_in_flight_max: usize,
    /// How long a join connection may stay open.
    pub join_timeout: Duration,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            keep_alive_interval: None,
            sends_in_flight_max: 4096,
            handshakes_in_flight_max: 256,
            streams_per_connection_max: 256,
            serve_timeout: Duration::from_secs(30),
            peers_max: 16 * 1024,
            joins_in_flight_max: 16,
            join_timeout: Duration::from_secs(10),
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// Bytes a peer may have in flight on one connection, all streams
/// together: a few of the largest frames.
const CONNECTION_WINDOW: usize = 4 * FRAME_LEN_MAX;

/// Largest frame read on a join connection (a join request is a token, a
/// name and an address).
pub const JOIN_FRAME_LEN_MAX: usize = 64 * 1024;

struct Inner {
    endpoint: quinn::Endpoint,
    /// The client side of new connections (replaced with the node's
    /// credentials, see [`QuicTransport::set_credentials`]).
    client: Mutex<quinn::ClientConfig>,
    transport_config: Arc<quinn::TransportConfig>,
    local_addr: SocketAddr,
    conns: Mutex<HashMap<SocketAddr, Slot>>,
    dispatch: Dispatch,
    stats: Arc<TransportStats>,
    send_permits: Arc<Semaphore>,
    handshake_permits: Arc<Semaphore>,
    join_permits: Arc<Semaphore>,
    /// Signs what this node publishes in gossip, with the key of the
    /// credentials the endpoint presents (replaced with them).
    signer: Signer,
    config: QuicConfig,
}

/// The QUIC transport of one node. Cheap to clone.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

fn transport_config(config: &QuicConfig) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        config
            .idle_timeout
            .try_into()
            .map_err(|e| TransportError::Credentials(format!("idle timeout: {e}")))?,
    ));
    t.keep_alive_interval(config.keep_alive_interval);
    // Flow control bounds what a peer can make us buffer: quinn's default
    // connection window is unlimited (found in review: an unauthenticated
    // join connection could park gigabytes in streams never read).
    t.stream_receive_window(quinn::VarInt::from_u32((FRAME_LEN_MAX + 64 * 1024) as u32));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW as u32));
    t.max_concurrent_bidi_streams(config.streams_per_connection_max.into());
    t.max_concurrent_uni_streams(config.streams_per_connection_max.into());
    // Nodes exchange no unreliable datagrams.
    t.datagram_receive_buffer_size(None);
    Ok(t)
}

/// The server and client sides of a node's connections with `creds`.
fn endpoint_configs(
    creds: &NodeCredentials,
    tc: &Arc<quinn::TransportConfig>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto = QuicServerConfig::try_from(creds.server_config()?)
        .map_err(|e| TransportError::Credentials(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(tc.clone());
    let client_crypto = QuicClientConfig::try_from(creds.client_config()?)
        .map_err(|e| TransportError::Credentials(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(tc.clone());
    Ok((server, client))
}

impl QuicTransport {
    /// Binds the node's UDP port and starts accepting connections from peers
    /// holding certificates of the same cluster CA. Returns the transport and
    /// the inbound queues, one per service.
    pub async fn bind(
        addr: SocketAddr,
        creds: &NodeCredentials,
        config: QuicConfig,
    ) -> Result<(QuicTransport, Inbox), TransportError> {
        let tc = Arc::new(transport_config(&config)?);
        let (server, client) = endpoint_configs(creds, &tc)?;
        let signer = Signer::new(creds)?;
        // Connections are made with `connect_with` and the current client
        // config: the endpoint needs no default one.
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|e| TransportError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let local_addr = endpoint.local_addr().map_err(|e| TransportError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let stats = Arc::new(TransportStats::default());
        let (dispatch, inbox) = Dispatch::new(stats.clone());
        let inner = Arc::new(Inner {
            endpoint,
            client: Mutex::new(client),
            transport_config: tc,
            local_addr,
            conns: Mutex::new(HashMap::new()),
            dispatch,
            stats,
            send_permits: Arc::new(Semaphore::new(config.sends_in_flight_max)),
            handshake_permits: Arc::new(Semaphore::new(config.handshakes_in_flight_max)),
            join_permits: Arc::new(Semaphore::new(config.joins_in_flight_max)),
            signer,
            config,
        });
        tokio::spawn(accept_loop(inner.clone()));
        Ok((QuicTransport { inner }, inbox))
    }

    /// Replaces this node's certificate (renewed before it expires): new
    /// connections, in and out, present the new one; open connections keep
    /// theirs until they close.
    pub fn set_credentials(&self, creds: &NodeCredentials) -> Result<(), TransportError> {
        let (server, client) = endpoint_configs(creds, &self.inner.transport_config)?;
        self.inner.signer.update(creds)?;
        self.inner.endpoint.set_server_config(Some(server));
        *self.inner.client.lock().expect("lock poisoned") = client;
        Ok(())
    }

    /// Signs with this node's key and checks peers' certificates, kept
    /// current by [`QuicTransport::set_credentials`].
    pub fn signer(&self) -> Signer {
        self.inner.signer.clone()
    }

    async fn connection(&self, to: SocketAddr) -> Result<quinn::Connection, TransportError> {
        let inner = &self.inner;
        let slot = {
            let mut conns = inner.conns.lock().expect("lock poisoned");
            if !conns.contains_key(&to) && conns.len() >= inner.config.peers_max {
                return Err(TransportError::Connect {
                    addr: to,
                    reason: format!("more than {} peers", inner.config.peers_max),
                });
            }
            conns.entry(to).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let client = inner.client.lock().expect("lock poisoned").clone();
        let connecting = inner
            .endpoint
            .connect_with(client, to, CLUSTER_SERVER_NAME)
            .map_err(|e| TransportError::Connect {
                addr: to,
                reason: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(inner.config.connect_timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                drop(guard);
                forget_slot(inner, to, &slot);
                if is_refusal(&e) {
                    TransportStats::add(&inner.stats.handshakes_refused, 1);
                    warn!(peer = %to, error = %e, "peer refused our handshake or presented a certificate not signed by this cluster's CA");
                }
                return Err(TransportError::Connect {
                    addr: to,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                drop(guard);
                forget_slot(inner, to, &slot);
                return Err(TransportError::Timeout(to));
            }
        };
        let Some(peer) = cert_name(&conn) else {
            drop(guard);
            forget_slot(inner, to, &slot);
            conn.close(0u32.into(), b"certificate names no node");
            TransportStats::add(&inner.stats.handshakes_refused, 1);
            return Err(TransportError::Connect {
                addr: to,
                reason: "its certificate names no node".into(),
            });
        };
        *guard = Some(conn.clone());
        tokio::spawn(serve_connection(
            inner.clone(),
            conn.clone(),
            slot.clone(),
            peer,
        ));
        Ok(conn)
    }

    async fn request_inner(
        &self,
        to: SocketAddr,
        frame: Vec<u8>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Option<Arc<str>>), TransportError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let cached = self.cached(to);
        let conn = tokio::time::timeout_at(deadline, self.connection(to))
            .await
            .map_err(|_| TransportError::Timeout(to))??;
        // Only a connection that was there before this request is judged
        // by it: a fresh one may not have had the time for an ack.
        let judged = cached.is_some_and(|id| id == conn.stable_id());
        // Frames, not datagrams: a process that took over the peer's
        // address answers the old connection's packets with stateless
        // resets, which arrive but carry no frame we can decrypt.
        let heard = |c: &quinn::Connection| {
            let f = c.stats().frame_rx;
            f.acks.saturating_add(f.stream)
        };
        let before = heard(&conn);
        match tokio::time::timeout_at(deadline, exchange(&conn, to, &frame)).await {
            Ok(result) => result.map(|response| (response, cert_name(&conn))),
            Err(_) => {
                // Not one frame from the peer, not even an ack, for the
                // whole request: the connection is likely to a process
                // that is gone (a peer restarted on the same address
                // drops our packets, and with no keep-alives the idle
                // timeout is long). Drop it, so the next message dials
                // afresh; a live but slow peer costs one handshake.
                if judged && heard(&conn) == before {
                    self.drop_connection(to, &conn);
                }
                Err(TransportError::Timeout(to))
            }
        }
    }

    /// The id of the open connection cached for `to`, if any (`None` too
    /// when a dial holds its slot).
    fn cached(&self, to: SocketAddr) -> Option<usize> {
        let slot = self
            .inner
            .conns
            .lock()
            .expect("lock poisoned")
            .get(&to)
            .cloned()?;
        let guard = slot.try_lock().ok()?;
        guard
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .map(quinn::Connection::stable_id)
    }

    /// Forgets the cached connection to `to` if it is `conn`, so that the
    /// next message dials afresh. Not closed: other requests on it may be
    /// waiting for answers that are still coming (a slow RPC); if the peer
    /// is gone it idles out.
    fn drop_connection(&self, to: SocketAddr, conn: &quinn::Connection) {
        let inner = &self.inner;
        let slot = inner.conns.lock().expect("lock poisoned").get(&to).cloned();
        if let Some(slot) = slot {
            // Held by a dial in progress: leave it to that dial.
            if let Ok(mut guard) = slot.try_lock() {
                if guard
                    .as_ref()
                    .is_some_and(|c| c.stable_id() == conn.stable_id())
                {
                    *guard = None;
                    drop(guard);
                    forget_slot(inner, to, &slot);
                    TransportStats::add(&inner.stats.connections_dropped_unresponsive, 1);
                }
            }
        }
    }

    async fn send_inner(&self, to: SocketAddr, frame: Vec<u8>) -> Result<(), TransportError> {
        let conn = self.connection(to).await?;
        let closed = |e: &dyn std::fmt::Display| TransportError::Closed {
            addr: to,
            reason: e.to_string(),
        };
        let mut send = conn.open_uni().await.map_err(|e| closed(&e))?;
        send.write_all(&frame).await.map_err(|e| closed(&e))?;
        send.finish().map_err(|e| closed(&e))?;
        Ok(())
    }
}

/// One request on its own stream of `conn`: sends `frame`, reads the
/// answer (at most [`FRAME_LEN_MAX`]).
async fn exchange(
    conn: &quinn::Connection,
    to: SocketAddr,
    frame: &[u8],
) -> Result<Vec<u8>, TransportError> {
    let closed = |e: &dyn std::fmt::Display| TransportError::Closed {
        addr: to,
        reason: e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(&e))?;
    send.write_all(frame).await.map_err(|e| closed(&e))?;
    send.finish().map_err(|e| closed(&e))?;
    recv.read_to_end(FRAME_LEN_MAX)
        .await
        .map_err(|e| closed(&e))
}

fn forget_slot(inner: &Inner, to: SocketAddr, slot: &Slot) {
    let mut conns = inner.conns.lock().expect("lock poisoned");
    if conns.get(&to).is_some_and(|s| Arc::ptr_eq(s, slot)) {
        conns.remove(&to);
    }
}

/// The node name in the certificate a connection's peer presented.
fn cert_name(conn: &quinn::Connection) -> Option<Arc<str>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    peer_name(certs.first()?).map(Arc::from)
}

/// Whether a connection was made to join (ALPN [`JOIN_ALPN`]).
fn is_join(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == JOIN_ALPN)
}

/// Sends one join request to `seed` without node credentials, trusting the
/// seed only if the token's CA certified it, and returns its answer. A
/// throwaway client endpoint makes the call: the node binds its own once
/// it has credentials.
pub async fn join_call(
    seed: SocketAddr,
    token: &JoinToken,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    let frame = encode_frame(Service::Join, body)?;
    let crypto = QuicClientConfig::try_from(token.client_config()?)
        .map_err(|e| TransportError::Credentials(e.to_string()))?;
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    let bind: SocketAddr = if seed.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| TransportError::Bind {
        addr: bind,
        reason: e.to_string(),
    })?;
    let call = async {
        let refused = |e: &dyn std::fmt::Display| TransportError::Connect {
            addr: seed,
            reason: e.to_string(),
        };
        let conn = endpoint
            .connect_with(client, seed, CLUSTER_SERVER_NAME)
            .map_err(|e| refused(&e))?
            .await
            .map_err(|e| refused(&e))?;
        let resp = exchange(&conn, seed, &frame).await;
        conn.close(0u32.into(), b"joined");
        resp
    };
    let r = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| TransportError::Timeout(seed))?;
    endpoint.close(0u32.into(), b"done");
    r
}

fn is_refusal(e: &quinn::ConnectionError) -> bool {
    match e {
        // A TLS alert from the peer, or our own verifier rejecting its
        // certificate, ends the handshake with a transport error.
        quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_) => {
            true
        }
        _ => false,
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let Ok(permit) = inner.handshake_permits.clone().try_acquire_owned() else {
            warn!(peer = %incoming.remote_address(), "too many handshakes in progress; refusing connection");
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    TransportStats::add(&inner.stats.handshakes_refused, 1);
                    warn!(peer = %remote, error = %e, "refused connection: the peer did not present a certificate signed by this cluster's CA (wrong or missing join token?)");
                    return;
                }
            };
            drop(permit);
            if is_join(&conn) {
                serve_join(inner, conn).await;
                return;
            }
            let Some(peer) = cert_name(&conn) else {
                // TLS 1.3 lets a client finish its handshake before the
                // server has checked its (absent) certificate: the
                // refusal comes now, before any stream is read.
                TransportStats::add(&inner.stats.handshakes_refused, 1);
                warn!(peer = %remote, "refused connection: the peer presented no certificate signed by this cluster's CA (wrong or missing join token?)");
                conn.close(0u32.into(), b"a certificate of this cluster is required");
                return;
            };
            let slot = {
                let mut conns = inner.conns.lock().expect("lock poisoned");
                conns.entry(remote).or_default().clone()
            };
            {
                let mut guard = slot.lock().await;
                // The newest connection from an address wins: the peer may
                // have restarted, leaving the old one to time out.
                if let Some(old) = guard.replace(conn.clone()) {
                    if old.stable_id() != conn.stable_id() {
                        debug!(peer = %remote, "replacing cached connection with a new inbound one");
                    }
                }
            }
            serve_connection(inner, conn, slot, peer).await;
        });
    }
}

/// Serves a join connection: one request to [`Service::Join`], within the
/// join timeout, then the connection closes.
async fn serve_join(inner: Arc<Inner>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Ok(_permit) = inner.join_permits.clone().try_acquire_owned() else {
        warn!(peer = %remote, "too many joins in progress; refusing one");
        conn.close(0u32.into(), b"busy");
        return;
    };
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let bytes = recv.read_to_end(JOIN_FRAME_LEN_MAX).await.ok()?;
        let (responder, rx) = Responder::channel();
        if !inner
            .dispatch
            .deliver_raw(remote, None, true, &bytes, Some(responder))
        {
            let _ = send.reset(0u32.into());
            return None;
        }
        let resp = rx.await.ok()?;
        if resp.len() > FRAME_LEN_MAX {
            let _ = send.reset(0u32.into());
            return None;
        }
        send.write_all(&resp).await.ok()?;
        send.finish().ok()?;
        // Let the answer reach the joining node before closing.
        let _ = tokio::time::timeout(inner.config.join_timeout, conn.closed()).await;
        Some(())
    };
    if tokio::time::timeout(inner.config.join_timeout, exchange)
        .await
        .is_err()
    {
        debug!(peer = %remote, "join connection timed out");
    }
    conn.close(0u32.into(), b"done");
}

async fn serve_connection(inner: Arc<Inner>, conn: quinn::Connection, slot: Slot, peer: Arc<str>) {
    let remote = conn.remote_address();
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(mut recv) => {
                    let inner = inner.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        match recv.read_to_end(FRAME_LEN_MAX).await {
                            Ok(bytes) => { inner.dispatch.deliver_raw(remote, Some(&peer), false, &bytes, None); }
                            Err(quinn::ReadToEndError::TooLong) => {
                                TransportStats::add(&inner.stats.frames_oversized, 1);
                                warn!(peer = %remote, "dropped oversized frame");
                                let _ = recv.stop(0u32.into());
                            }
                            Err(e) => debug!(peer = %remote, error = %e, "stream failed"),
                        }
                    });
                }
                Err(_) => break,
            },
            bi = conn.accept_bi() => match bi {
                Ok((mut send, mut recv)) => {
                    let inner = inner.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        let bytes = match recv.read_to_end(FRAME_LEN_MAX).await {
                            Ok(bytes) => bytes,
                            Err(quinn::ReadToEndError::TooLong) => {
                                TransportStats::add(&inner.stats.frames_oversized, 1);
                                warn!(peer = %remote, "dropped oversized request");
                                let _ = recv.stop(0u32.into());
                                let _ = send.reset(0u32.into());
                                return;
                            }
                            Err(e) => { debug!(peer = %remote, error = %e, "stream failed"); return; }
                        };
                        let (responder, rx) = Responder::channel();
                        if !inner.dispatch.deliver_raw(remote, Some(&peer), false, &bytes, Some(responder)) {
                            let _ = send.reset(0u32.into());
                            return;
                        }
                        match tokio::time::timeout(inner.config.serve_timeout, rx).await {
                            Ok(Ok(resp)) => {
                                if resp.len() > FRAME_LEN_MAX {
                                    let _ = send.reset(0u32.into());
                                    return;
                                }
                                TransportStats::add(&inner.stats.bytes_sent, resp.len() as u64);
                                if send.write_all(&resp).await.is_ok() {
                                    let _ = send.finish();
                                }
                            }
                            _ => { let _ = send.reset(0u32.into()); }
                        }
                    });
                }
                Err(_) => break,
            },
        }
    }
    // Forget the connection if it is still the cached one.
    let mut guard = slot.lock().await;
    if guard
        .as_ref()
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        *guard = None;
    }
}

#[async_trait::async_trait]
impl Transport for QuicTransport {
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    async fn send(
        &self,
        to: SocketAddr,
        service: Service,
        body: Vec<u8>,
    ) -> Result<(), TransportError> {
        let len = body.len() as u64;
        let frame = encode_frame(service, body)?;
        let Ok(permit) = self.inner.send_permits.clone().try_acquire_owned() else {
            TransportStats::add(&self.inner.stats.sends_failed, 1);
            return Err(TransportError::Overloaded);
        };
        let this = self.clone();
        // Sending may need a handshake; never hold the caller (the gossip
        // loop) hostage to a slow or dead peer.
        tokio::spawn(async move {
            let timeout = this.inner.config.connect_timeout * 2;
            match tokio::time::timeout(timeout, this.send_inner(to, frame)).await {
                Ok(Ok(())) => this.inner.stats.sent(service, len),
                Ok(Err(e)) => {
                    TransportStats::add(&this.inner.stats.sends_failed, 1);
                    debug!(peer = %to, error = %e, "send failed");
                }
                Err(_) => TransportStats::add(&this.inner.stats.sends_failed, 1),
            }
            drop(permit);
        });
        Ok(())
    }

    async fn request_answered(
        &self,
        to: SocketAddr,
        service: Service,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Option<Arc<str>>), TransportError> {
        let len = body.len() as u64;
        let frame = encode_frame(service, body)?;
        let result = self.request_inner(to, frame, timeout).await;
        if result.is_ok() {
            self.inner.stats.sent(service, len);
        }
        result
    }

    fn stats(&self) -> Arc<TransportStats> {
        self.inner.stats.clone()
    }

    fn close(&self) {
        self.inner.endpoint.close(0u32.into(), b"shutdown");
    }
}
