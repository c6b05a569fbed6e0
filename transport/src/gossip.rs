//! chitchat over any [`Transport`]: chitchat's scuttlebutt messages travel as
//! [`Service::Gossip`] frames instead of raw UDP datagrams, so they are
//! encrypted and authenticated like everything else between nodes.

use std::net::SocketAddr;

use chitchat::transport::Socket;
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::{mpsc, Mutex};

use crate::{Incoming, Service, Transport, TransportStats};

/// A chitchat [`chitchat::transport::Transport`] whose socket is a
/// [`Transport`] plus its gossip inbound queue. It can be opened once.
pub struct GossipTransport<T: Transport> {
    transport: T,
    inbound: Mutex<Option<mpsc::Receiver<Incoming>>>,
}

impl<T: Transport> GossipTransport<T> {
    /// Wraps a transport and the receiver of its [`Service::Gossip`] queue.
    pub fn new(transport: T, inbound: mpsc::Receiver<Incoming>) -> Self {
        GossipTransport {
            transport,
            inbound: Mutex::new(Some(inbound)),
        }
    }
}

#[async_trait::async_trait]
impl<T: Transport> chitchat::transport::Transport for GossipTransport<T> {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        // The endpoint is already bound; chitchat's listen address is ours.
        let inbound = self
            .inbound
            .lock()
            .await
            .take()
            .ok_or_else(|| anyhow::anyhow!("gossip transport opened twice"))?;
        Ok(Box::new(GossipSocket {
            transport: self.transport.clone(),
            inbound,
        }))
    }
}

struct GossipSocket<T: Transport> {
    transport: T,
    inbound: mpsc::Receiver<Incoming>,
}

#[async_trait::async_trait]
impl<T: Transport> Socket for GossipSocket<T> {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        let buf = message.serialize_to_vec();
        // A failed send is a lost gossip message; chitchat gossips again next
        // round, so only a broken transport would be worth an error here.
        let _ = self.transport.send(to, Service::Gossip, buf).await;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let incoming = self
                .inbound
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("gossip transport closed"))?;
            let mut buf = incoming.body.as_slice();
            match ChitchatMessage::deserialize(&mut buf) {
                Ok(message) => return Ok((incoming.from, message)),
                Err(e) => {
                    TransportStats::add(&self.transport.stats().frames_undecodable, 1);
                    tracing::debug!(from = %incoming.from, error = %e, "dropped undecodable gossip message");
                }
            }
        }
    }
}
