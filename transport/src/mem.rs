//! [`MemTransport`]: an in-memory network for tests and simulation. Links can
//! be cut one way or both to script partitions; frames go through the same
//! encoding, size limit and bounded queues as on QUIC.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    encode_frame, Dispatch, Inbox, Responder, Service, Transport, TransportError, TransportStats,
};

#[derive(Default)]
struct Net {
    /// Each attached node and the name its frames carry.
    nodes: HashMap<SocketAddr, (Dispatch, Option<Arc<str>>)>,
    cut: HashSet<(SocketAddr, SocketAddr)>,
}

/// A simulated network that [`MemTransport`]s attach to.
#[derive(Clone, Default)]
pub struct MemNetwork {
    net: Arc<Mutex<Net>>,
}

impl MemNetwork {
    /// A new empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches a node at `addr`; its frames arrive without a name
    /// ([`crate::Incoming::peer`] is `None`).
    pub fn bind(&self, addr: SocketAddr) -> Result<(MemTransport, Inbox), TransportError> {
        self.attach(addr, None)
    }

    /// Attaches a node at `addr` whose frames arrive with `name` as
    /// [`crate::Incoming::peer`], as a certificate names a QUIC peer.
    pub fn bind_named(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> Result<(MemTransport, Inbox), TransportError> {
        self.attach(addr, Some(Arc::from(name)))
    }

    fn attach(
        &self,
        addr: SocketAddr,
        name: Option<Arc<str>>,
    ) -> Result<(MemTransport, Inbox), TransportError> {
        let stats = Arc::new(TransportStats::default());
        let (dispatch, inbox) = Dispatch::new(stats.clone());
        let mut net = self.net.lock().expect("lock poisoned");
        if net.nodes.contains_key(&addr) {
            return Err(TransportError::Bind {
                addr,
                reason: "address in use".into(),
            });
        }
        net.nodes.insert(addr, (dispatch, name.clone()));
        Ok((
            MemTransport {
                network: self.clone(),
                addr,
                name,
                stats,
            },
            inbox,
        ))
    }

    /// Drops every frame from `from` to `to` until [`MemNetwork::heal`].
    pub fn cut(&self, from: SocketAddr, to: SocketAddr) {
        self.net
            .lock()
            .expect("lock poisoned")
            .cut
            .insert((from, to));
    }

    /// Restores every cut link.
    pub fn heal(&self) {
        self.net.lock().expect("lock poisoned").cut.clear();
    }

    fn route(&self, from: SocketAddr, to: SocketAddr) -> Option<(Dispatch, Option<Arc<str>>)> {
        let net = self.net.lock().expect("lock poisoned");
        if net.cut.contains(&(from, to)) {
            return None;
        }
        net.nodes.get(&to).cloned()
    }
}

/// One node's attachment to a [`MemNetwork`].
#[derive(Clone)]
pub struct MemTransport {
    network: MemNetwork,
    addr: SocketAddr,
    name: Option<Arc<str>>,
    stats: Arc<TransportStats>,
}

#[async_trait::async_trait]
impl Transport for MemTransport {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn send(
        &self,
        to: SocketAddr,
        service: Service,
        body: Vec<u8>,
    ) -> Result<(), TransportError> {
        let len = body.len() as u64;
        let frame = encode_frame(service, body)?;
        self.stats.sent(service, len);
        // Like UDP: a frame to nowhere vanishes silently.
        if let Some((dispatch, _)) = self.network.route(self.addr, to) {
            dispatch.deliver_raw(self.addr, self.name.as_ref(), false, &frame, None);
        }
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
        let Some((dispatch, answerer)) = self.network.route(self.addr, to) else {
            tokio::time::sleep(timeout).await;
            return Err(TransportError::Timeout(to));
        };
        let (responder, rx) = Responder::channel();
        if !dispatch.deliver_raw(
            self.addr,
            self.name.as_ref(),
            false,
            &frame,
            Some(responder),
        ) {
            return Err(TransportError::Closed {
                addr: to,
                reason: "peer queue full".into(),
            });
        }
        self.stats.sent(service, len);
        let resp = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(_)) => {
                return Err(TransportError::Closed {
                    addr: to,
                    reason: "no response".into(),
                })
            }
            Err(_) => return Err(TransportError::Timeout(to)),
        };
        // The reverse path can be cut too.
        if self.network.route(to, self.addr).is_none() {
            return Err(TransportError::Timeout(to));
        }
        Ok((resp, answerer))
    }

    fn stats(&self) -> Arc<TransportStats> {
        self.stats.clone()
    }

    fn close(&self) {
        self.network
            .net
            .lock()
            .expect("lock poisoned")
            .nodes
            .remove(&self.addr);
    }
}
