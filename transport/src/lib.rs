//! shoal's node-to-node transport.
//!
//! One QUIC endpoint per node (one UDP port) carries all traffic between
//! nodes: gossip, failure-detector probes, and request/response calls. Every
//! connection is mutual TLS against the cluster CA. Each message travels on its
//! own QUIC stream as one postcard-encoded [`Frame`] whose size is bounded; a
//! frame that is too large or does not decode is dropped and counted.
//!
//! # Layout
//! - [`tls`]: cluster CA, join tokens, node certificates, rustls configs.
//! - [`quic`]: [`QuicTransport`], the real transport over quinn.
//! - [`mem`]: [`MemTransport`], an in-memory transport with link cuts, for
//!   tests and simulation; it passes the same test suite as QUIC.
//! - this file: the [`Transport`] trait, [`Service`], [`Incoming`], errors,
//!   counters.
#![deny(missing_docs)]

pub mod join;
pub mod mem;
pub mod quic;
pub mod sign;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use mem::{MemNetwork, MemTransport};
pub use quic::{QuicConfig, QuicTransport};

/// Which subsystem a frame is for. Each has its own bounded inbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Service {
    /// State gossip (`shoal_membership::spread`): notes, pulls, syncs.
    Gossip,
    /// Failure detector: probes, indirect probes, membership updates.
    Probe,
    /// Node-to-node calls of the agent (bids, log fetches, ...).
    Rpc,
    /// Reserved for tests.
    Test,
    /// A node without credentials asks for them with a join token: the
    /// only service a connection without a client certificate reaches.
    Join,
}

/// Every service, for setting up one queue each.
pub const SERVICES: [Service; 5] = [
    Service::Gossip,
    Service::Probe,
    Service::Rpc,
    Service::Test,
    Service::Join,
];

/// What travels on one QUIC stream: a service tag and an opaque body that
/// the service encodes itself (postcard throughout shoal).
#[derive(Debug, Serialize, Deserialize)]
pub struct Frame {
    /// The service the body is for.
    pub service: Service,
    /// The service's message.
    pub body: Vec<u8>,
}

/// Largest frame accepted or sent, in bytes. Gossip messages are at most
/// 1 MiB (`spread`'s bound); node-to-node calls (log chunks, job snapshots) stay below
/// this too, and it bounds what a peer can make us buffer per stream.
pub const FRAME_LEN_MAX: usize = 4 * 1024 * 1024;

/// Depth of each service's inbound queue; when full, new frames are dropped
/// and counted (the senders retry or gossip again).
pub const INBOUND_QUEUE_LEN: usize = 1024;

/// A frame received from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// The peer's address (its QUIC endpoint).
    pub from: SocketAddr,
    /// The node name in the peer's certificate: the only node it may speak
    /// for. `None` on a join connection (no certificate yet) and on a
    /// [`MemTransport`] attached without a name.
    pub peer: Option<Arc<str>>,
    /// The frame's body.
    pub body: Vec<u8>,
    /// Present when the peer awaits a response (a request).
    pub reply: Option<Responder>,
}

/// Answers one request. Dropping it without answering makes the requester
/// see [`TransportError::Closed`] (or its timeout).
#[derive(Debug)]
pub struct Responder(oneshot::Sender<Vec<u8>>);

impl Responder {
    /// Sends the response body.
    pub fn respond(self, body: Vec<u8>) {
        let _ = self.0.send(body);
    }

    /// A responder and the receiver its answer arrives on.
    pub fn channel() -> (Responder, oneshot::Receiver<Vec<u8>>) {
        let (tx, rx) = oneshot::channel();
        (Responder(tx), rx)
    }
}

/// The inbound queues of one node, one per [`Service`].
pub type Inbox = Vec<(Service, mpsc::Receiver<Incoming>)>;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Credentials could not be created or loaded.
    #[error("cluster credentials: {0}")]
    Credentials(String),
    /// A join token did not decode.
    #[error("invalid join token: {0}")]
    BadToken(String),
    /// The endpoint could not bind its UDP port.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// No connection could be made to the peer (unreachable, or refused the
    /// handshake, e.g. because it belongs to another cluster).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// The peer did not answer in time.
    #[error("peer {0} did not answer in time")]
    Timeout(SocketAddr),
    /// The frame exceeds [`FRAME_LEN_MAX`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream or connection closed before the exchange completed.
    #[error("connection to {addr} closed: {reason}")]
    Closed {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Too many sends are already in flight; the message was dropped.
    #[error("send queue full, message dropped")]
    Overloaded,
}

/// Counters of one transport, for metrics and tests.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Frames sent (one-way and requests).
    pub frames_sent: AtomicU64,
    /// Frames received and delivered to a service queue.
    pub frames_received: AtomicU64,
    /// Bytes of frame bodies sent.
    pub bytes_sent: AtomicU64,
    /// Bytes of frame bodies received.
    pub bytes_received: AtomicU64,
    /// Inbound frames dropped because they did not decode.
    pub frames_undecodable: AtomicU64,
    /// Inbound frames dropped because they exceeded [`FRAME_LEN_MAX`].
    pub frames_oversized: AtomicU64,
    /// Inbound frames dropped because the service queue was full.
    pub frames_dropped_queue_full: AtomicU64,
    /// Outbound messages dropped (overload, unreachable peer).
    pub sends_failed: AtomicU64,
    /// Handshakes refused (peer without valid cluster credentials).
    pub handshakes_refused: AtomicU64,
    /// Cached connections dropped because a request on them timed out with
    /// nothing heard from the peer (gone, or restarted on its address).
    pub connections_dropped_unresponsive: AtomicU64,
    /// Frames dropped because their connection may not reach their service
    /// (anything but a join on a join connection).
    pub frames_refused: AtomicU64,
    /// The frames and bytes above, by service (in [`SERVICES`] order;
    /// request answers are counted in the totals only).
    pub by_service: [ServiceStats; SERVICES.len()],
}

/// One service's traffic.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Frames sent.
    pub frames_sent: AtomicU64,
    /// Frames received.
    pub frames_received: AtomicU64,
    /// Bytes of frame bodies sent.
    pub bytes_sent: AtomicU64,
    /// Bytes of frame bodies received.
    pub bytes_received: AtomicU64,
}

impl Service {
    /// Its name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Gossip => "gossip",
            Service::Probe => "probe",
            Service::Rpc => "rpc",
            Service::Test => "test",
            Service::Join => "join",
        }
    }

    fn index(self) -> usize {
        SERVICES.iter().position(|s| *s == self).unwrap_or(0)
    }
}

impl TransportStats {
    /// Counts a frame of `len` body bytes sent to `service`.
    pub(crate) fn sent(&self, service: Service, len: u64) {
        Self::add(&self.frames_sent, 1);
        Self::add(&self.bytes_sent, len);
        let s = &self.by_service[service.index()];
        Self::add(&s.frames_sent, 1);
        Self::add(&s.bytes_sent, len);
    }

    /// Counts a frame of `len` body bytes received for `service`.
    pub(crate) fn received(&self, service: Service, len: u64) {
        Self::add(&self.frames_received, 1);
        Self::add(&self.bytes_received, len);
        let s = &self.by_service[service.index()];
        Self::add(&s.frames_received, 1);
        Self::add(&s.bytes_received, len);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A node's way to reach its peers. Implemented by [`QuicTransport`] and by
/// [`MemTransport`]; one test suite runs against both.
#[async_trait::async_trait]
pub trait Transport: Clone + Send + Sync + 'static {
    /// The address peers reach this node at.
    fn local_addr(&self) -> SocketAddr;

    /// Sends a one-way frame. Returns once it is handed to the network (or
    /// failed); delivery is best effort.
    async fn send(
        &self,
        to: SocketAddr,
        service: Service,
        body: Vec<u8>,
    ) -> Result<(), TransportError>;

    /// Sends a request and waits up to `timeout` for the response.
    async fn request(
        &self,
        to: SocketAddr,
        service: Service,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.request_answered(to, service, body, timeout)
            .await
            .map(|(response, _)| response)
    }

    /// [`Transport::request`], saying who answered: the node name in the
    /// answering peer's certificate (`None` from a peer that presented
    /// none). An answer speaks for that node only, whatever the address
    /// it came from (SWIM takes a direct ack as the target's own word
    /// only when it is).
    async fn request_answered(
        &self,
        to: SocketAddr,
        service: Service,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Option<Arc<str>>), TransportError>;

    /// Counters.
    fn stats(&self) -> Arc<TransportStats>;

    /// Stops accepting and closes every connection.
    fn close(&self);
}

/// Encodes a frame, refusing one over [`FRAME_LEN_MAX`].
pub fn encode_frame(service: Service, body: Vec<u8>) -> Result<Vec<u8>, TransportError> {
    let frame = Frame { service, body };
    let bytes = postcard::to_stdvec(&frame).expect("in-memory encoding cannot fail");
    if bytes.len() > FRAME_LEN_MAX {
        return Err(TransportError::TooLarge {
            len: bytes.len(),
            max: FRAME_LEN_MAX,
        });
    }
    Ok(bytes)
}

/// Decodes a frame from untrusted bytes. Never panics; the caller bounds the
/// input length to [`FRAME_LEN_MAX`] before calling.
pub fn decode_frame(bytes: &[u8]) -> Option<Frame> {
    if bytes.len() > FRAME_LEN_MAX {
        return None;
    }
    postcard::from_bytes(bytes).ok()
}

/// Fans inbound frames out to per-service bounded queues.
#[derive(Clone)]
pub(crate) struct Dispatch {
    queues: Arc<Vec<(Service, mpsc::Sender<Incoming>)>>,
    stats: Arc<TransportStats>,
}

impl Dispatch {
    pub(crate) fn new(stats: Arc<TransportStats>) -> (Dispatch, Inbox) {
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        for service in SERVICES {
            let (tx, rx) = mpsc::channel(INBOUND_QUEUE_LEN);
            txs.push((service, tx));
            rxs.push((service, rx));
        }
        (
            Dispatch {
                queues: Arc::new(txs),
                stats,
            },
            rxs,
        )
    }

    /// Delivers a raw frame; returns false if it was dropped. A frame on a
    /// join connection (`joining`: the peer has no certificate yet)
    /// reaches [`Service::Join`] only.
    pub(crate) fn deliver_raw(
        &self,
        from: SocketAddr,
        peer: Option<&Arc<str>>,
        joining: bool,
        bytes: &[u8],
        reply: Option<Responder>,
    ) -> bool {
        match decode_frame(bytes) {
            Some(frame) if !joining || frame.service == Service::Join => {
                self.deliver(from, peer.cloned(), frame, reply)
            }
            Some(frame) => {
                TransportStats::add(&self.stats.frames_refused, 1);
                tracing::debug!(%from, service = ?frame.service, "dropped a frame for a service this connection may not reach");
                false
            }
            None => {
                TransportStats::add(&self.stats.frames_undecodable, 1);
                tracing::debug!(%from, len = bytes.len(), "dropped undecodable frame");
                false
            }
        }
    }

    pub(crate) fn deliver(
        &self,
        from: SocketAddr,
        peer: Option<Arc<str>>,
        frame: Frame,
        reply: Option<Responder>,
    ) -> bool {
        let Some((_, tx)) = self.queues.iter().find(|(s, _)| *s == frame.service) else {
            return false;
        };
        let len = frame.body.len() as u64;
        let service = frame.service;
        match tx.try_send(Incoming {
            from,
            peer,
            body: frame.body,
            reply,
        }) {
            Ok(()) => {
                self.stats.received(service, len);
                true
            }
            Err(_) => {
                TransportStats::add(&self.stats.frames_dropped_queue_full, 1);
                false
            }
        }
    }
}

/// Takes one service's queue out of an inbox.
pub fn take_inbox(inbox: &mut Inbox, service: Service) -> Option<mpsc::Receiver<Incoming>> {
    let pos = inbox.iter().position(|(s, _)| *s == service)?;
    Some(inbox.swap_remove(pos).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_decoder_survives_garbage() {
        for len in 0..64usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let _ = decode_frame(&bytes);
        }
        let ok = encode_frame(Service::Rpc, vec![1, 2, 3]).unwrap();
        let frame = decode_frame(&ok).unwrap();
        assert_eq!(frame.service, Service::Rpc);
        assert_eq!(frame.body, vec![1, 2, 3]);
        assert!(matches!(
            encode_frame(Service::Rpc, vec![0; FRAME_LEN_MAX]),
            Err(TransportError::TooLarge { .. })
        ));
    }
}
