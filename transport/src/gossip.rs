//! chitchat over any [`Transport`]: chitchat's scuttlebutt messages travel as
//! [`Service::Gossip`] frames instead of raw UDP datagrams, so they are
//! encrypted and authenticated like everything else between nodes.
//!
//! chitchat's heartbeats are unsigned and relayed: any member could put
//! another node's heartbeat at `u64::MAX` in its digests, after which the
//! node's real heartbeats never count again, chitchat's failure detector
//! declares it dead, stops relaying its state and finally deletes it (found
//! in review). With a [`Liveness`] the adapter replaces every heartbeat in
//! an incoming digest by its own: a counter that rises with each message
//! for a run the membership layer holds alive (or does not know yet), and
//! a constant for a run it holds dead, left or superseded. chitchat's
//! liveness then follows SWIM's signed, first-hand verdicts, and no peer's
//! word about heartbeats counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use chitchat::transport::Socket;
use chitchat::{ChitchatId, ChitchatMessage, Deserializable, Serializable};
use tokio::sync::{mpsc, Mutex};

use crate::{Incoming, Service, Transport, TransportStats};

/// What the membership layer believes of each node's runs, shared with the
/// gossip adapter: per node name, the newest run it knows and whether that
/// run is live (alive or suspect). Runs it does not know are treated as
/// live, so that their state can be gossiped and verified.
#[derive(Clone, Default)]
pub struct Liveness {
    runs: Arc<RwLock<HashMap<String, (u64, bool)>>>,
}

impl Liveness {
    /// Replaces the known runs: name -> (generation, live).
    pub fn set(&self, runs: HashMap<String, (u64, bool)>) {
        *self.runs.write().unwrap_or_else(|p| p.into_inner()) = runs;
    }

    /// Whether the run `generation` of `name` is over: a newer run is
    /// known, or this one is dead or left.
    pub fn is_over(&self, name: &str, generation: u64) -> bool {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner());
        runs.get(name)
            .is_some_and(|&(g, live)| generation < g || (generation == g && !live))
    }
}

/// The heartbeat the adapter gives a run that is over: it never rises, so
/// chitchat finds the run dead and deletes it after its grace period.
const HEARTBEAT_OVER: u64 = 1;

/// Offset of the digest in a Syn or SynAck message: magic (2 bytes),
/// protocol version (1), message type (1).
const DIGEST_AT: usize = 4;

/// Rewrites, in place, every heartbeat of the digest of a chitchat Syn or
/// SynAck message to `heartbeat(id)`. Other messages are left as they are.
/// `false` when the message is not one chitchat could decode (the caller
/// drops it).
pub fn rewrite_heartbeats(buf: &mut [u8], mut heartbeat: impl FnMut(&ChitchatId) -> u64) -> bool {
    // Syn = 0, SynAck = 1 carry a digest first; Ack = 2 and BadCluster = 3
    // carry no heartbeat.
    match buf.get(DIGEST_AT - 1) {
        Some(0 | 1) => {}
        Some(_) => return true,
        None => return false,
    }
    let total = buf.len();
    let mut rest: &[u8] = &buf[DIGEST_AT..];
    let Ok(count) = u16::deserialize(&mut rest) else {
        return false;
    };
    let mut at = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let Ok(id) = ChitchatId::deserialize(&mut rest) else {
            return false;
        };
        // heartbeat, last_gc_version, max_version: three u64.
        if rest.len() < 24 {
            return false;
        }
        at.push((total - rest.len(), heartbeat(&id)));
        rest = &rest[24..];
    }
    for (offset, value) in at {
        buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }
    true
}

/// A chitchat [`chitchat::transport::Transport`] whose socket is a
/// [`Transport`] plus its gossip inbound queue. It can be opened once.
pub struct GossipTransport<T: Transport> {
    transport: T,
    inbound: Mutex<Option<mpsc::Receiver<Incoming>>>,
    liveness: Option<Liveness>,
}

impl<T: Transport> GossipTransport<T> {
    /// Wraps a transport and the receiver of its [`Service::Gossip`] queue;
    /// heartbeats pass as peers send them.
    pub fn new(transport: T, inbound: mpsc::Receiver<Incoming>) -> Self {
        GossipTransport {
            transport,
            inbound: Mutex::new(Some(inbound)),
            liveness: None,
        }
    }

    /// Like [`GossipTransport::new`], with heartbeats replaced by ones that
    /// follow `liveness` (see the module documentation).
    pub fn with_liveness(
        transport: T,
        inbound: mpsc::Receiver<Incoming>,
        liveness: Liveness,
    ) -> Self {
        GossipTransport {
            liveness: Some(liveness),
            ..GossipTransport::new(transport, inbound)
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
            liveness: self.liveness.clone(),
            // Above HEARTBEAT_OVER, so that a live run's first heartbeat
            // already counts as a rise.
            beat: HEARTBEAT_OVER + 1,
        }))
    }
}

struct GossipSocket<T: Transport> {
    transport: T,
    inbound: mpsc::Receiver<Incoming>,
    liveness: Option<Liveness>,
    /// The heartbeat given to live runs: one more per message received.
    beat: u64,
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
            let mut body = incoming.body;
            if let Some(liveness) = &self.liveness {
                self.beat = self.beat.saturating_add(1);
                let beat = self.beat;
                if !rewrite_heartbeats(&mut body, |id| {
                    if liveness.is_over(&id.node_id, id.generation_id) {
                        HEARTBEAT_OVER
                    } else {
                        beat
                    }
                }) {
                    TransportStats::add(&self.transport.stats().frames_undecodable, 1);
                    continue;
                }
            }
            let mut buf = body.as_slice();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A Syn message whose digest lists `nodes` (name, generation,
    /// heartbeat), as chitchat 0.11 serializes it.
    fn syn(nodes: &[(&str, u64, u64)]) -> Vec<u8> {
        let mut buf = Vec::new();
        buf.extend(45_139u16.to_le_bytes());
        buf.push(0); // protocol version
        buf.push(0); // Syn
        (nodes.len() as u16).serialize(&mut buf);
        for &(name, generation, heartbeat) in nodes {
            ChitchatId::new(name, generation, "127.0.0.1:1".parse().unwrap()).serialize(&mut buf);
            heartbeat.serialize(&mut buf);
            0u64.serialize(&mut buf); // last gc version
            7u64.serialize(&mut buf); // max version
        }
        "cluster".to_string().serialize(&mut buf);
        buf
    }

    fn heartbeats(buf: &[u8]) -> String {
        let msg = ChitchatMessage::deserialize(&mut &buf[..]).expect("decodes");
        let text = format!("{msg:?}");
        text.match_indices("Heartbeat(")
            .map(|(i, _)| {
                let rest = &text[i + "Heartbeat(".len()..];
                rest[..rest.find(')').unwrap()].to_string()
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn every_heartbeat_of_a_digest_is_replaced() {
        let mut buf = syn(&[("a", 1, u64::MAX), ("b", 2, 5)]);
        assert_eq!(heartbeats(&buf), format!("{},5", u64::MAX));
        assert!(rewrite_heartbeats(&mut buf, |id| id.generation_id * 10));
        assert_eq!(heartbeats(&buf), "10,20");
    }

    #[test]
    fn a_run_that_is_over_gets_a_heartbeat_that_never_rises() {
        let liveness = Liveness::default();
        liveness.set(HashMap::from([
            ("a".to_string(), (2, true)),
            ("b".to_string(), (3, false)),
        ]));
        // a's run 2 lives, its run 1 is superseded; b's run 3 is dead; c is
        // unknown (live until known otherwise).
        assert!(!liveness.is_over("a", 2));
        assert!(liveness.is_over("a", 1));
        assert!(liveness.is_over("b", 3));
        assert!(!liveness.is_over("b", 4));
        assert!(!liveness.is_over("c", 1));
    }

    #[test]
    fn truncated_digests_are_refused_and_other_messages_pass() {
        let buf = syn(&[("a", 1, 9)]);
        for cut in 0..buf.len() - "cluster".len() - 2 {
            let mut part = buf[..cut].to_vec();
            if cut >= DIGEST_AT {
                assert!(!rewrite_heartbeats(&mut part, |_| 0), "cut at {cut}");
            }
        }
        // An Ack (type 2) carries no digest: untouched.
        let mut ack = vec![0x53, 0xb0, 0, 2, 1, 2, 3];
        let before = ack.clone();
        assert!(rewrite_heartbeats(&mut ack, |_| 0));
        assert_eq!(ack, before);
    }
}
