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
use std::time::{Duration, Instant};

use chitchat::transport::Socket;
use chitchat::{ChitchatId, ChitchatMessage, Deserializable, Serializable};
use tokio::sync::{mpsc, Mutex};

use crate::{Incoming, Service, Transport, TransportStats};

/// A run of a node as the membership layer knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The run's generation.
    pub generation: u64,
    /// Its gossip address.
    pub addr: SocketAddr,
    /// Alive or suspect (not dead, left, or forgotten).
    pub live: bool,
}

/// What the membership layer believes of one chitchat node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The run held, alive or suspect.
    Live,
    /// A run that is over: dead, left, forgotten, superseded by a newer
    /// run, or the held run at another address.
    Over,
    /// A run not known yet (a newer run, or a new node): live for
    /// [`UNKNOWN_GRACE`] after it is first seen, the time to verify it.
    Unknown,
}

/// The verdict on run `generation` at `addr` of node `name`.
pub fn verdict(
    runs: &HashMap<String, Run>,
    name: &str,
    generation: u64,
    addr: SocketAddr,
) -> Verdict {
    runs.get(name)
        .map_or(Verdict::Unknown, |r| r.verdict(generation, addr))
}

impl Run {
    /// The verdict on run `generation` at `addr` of this run's node.
    pub fn verdict(&self, generation: u64, addr: SocketAddr) -> Verdict {
        if generation > self.generation {
            Verdict::Unknown
        } else if generation == self.generation && addr == self.addr && self.live {
            Verdict::Live
        } else {
            Verdict::Over
        }
    }
}

/// What the membership layer believes of each node's runs, shared with the
/// gossip adapter: per node name, the newest run it knows (this node's own
/// included). Swapped whole, so a reader holds one consistent snapshot.
#[derive(Clone, Default)]
pub struct Liveness {
    runs: Arc<RwLock<Arc<HashMap<String, Run>>>>,
}

impl Liveness {
    /// Replaces the known runs.
    pub fn set(&self, runs: Arc<HashMap<String, Run>>) {
        *self.runs.write().unwrap_or_else(|p| p.into_inner()) = runs;
    }

    /// The known runs now.
    pub fn snapshot(&self) -> Arc<HashMap<String, Run>> {
        self.runs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How long a run the membership layer does not know is given rising
/// heartbeats: a real node's state verifies within a sync interval or two,
/// so what is still unknown after this is a state nobody can verify (a
/// forgery, or a certificate not trusted), and chitchat may let it die.
pub const UNKNOWN_GRACE: Duration = Duration::from_secs(30);

/// Most unknown runs tracked (see [`UNKNOWN_GRACE`]); past it, an unknown
/// run not tracked is treated as over.
const UNKNOWN_MAX: usize = 4096;

/// How long an unknown run stays tracked (and so, once past its grace,
/// over): longer than chitchat keeps a dead node's state.
const UNKNOWN_KEPT: Duration = Duration::from_secs(2 * 3600);

/// Unknown runs by first sighting (see [`UNKNOWN_GRACE`]).
#[derive(Default)]
struct Unknown {
    first_seen: HashMap<ChitchatId, Instant>,
}

impl Unknown {
    /// Whether an unknown run is still within its grace at `now`.
    fn in_grace(&mut self, id: &ChitchatId, now: Instant) -> bool {
        if let Some(seen) = self.first_seen.get(id) {
            return now.saturating_duration_since(*seen) < UNKNOWN_GRACE;
        }
        if self.first_seen.len() >= UNKNOWN_MAX {
            self.first_seen
                .retain(|_, seen| now.saturating_duration_since(*seen) < UNKNOWN_KEPT);
            if self.first_seen.len() >= UNKNOWN_MAX {
                return false;
            }
        }
        self.first_seen.insert(id.clone(), now);
        true
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
    // Each entry takes at least 41 bytes: no reservation beyond what the
    // message could hold.
    let mut at = Vec::with_capacity((count as usize).min(rest.len() / 41));
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
            unknown: Unknown::default(),
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
    unknown: Unknown,
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
                let runs = liveness.snapshot();
                let unknown = &mut self.unknown;
                let now = Instant::now();
                if !rewrite_heartbeats(&mut body, |id| {
                    let live = match verdict(
                        &runs,
                        &id.node_id,
                        id.generation_id,
                        id.gossip_advertise_addr,
                    ) {
                        Verdict::Live => true,
                        Verdict::Over => false,
                        Verdict::Unknown => unknown.in_grace(id, now),
                    };
                    if live {
                        beat
                    } else {
                        HEARTBEAT_OVER
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
    fn runs_are_live_over_or_unknown() {
        let at: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let runs = HashMap::from([
            (
                "a".to_string(),
                Run {
                    generation: 2,
                    addr: at,
                    live: true,
                },
            ),
            (
                "b".to_string(),
                Run {
                    generation: 3,
                    addr: at,
                    live: false,
                },
            ),
        ]);
        assert_eq!(verdict(&runs, "a", 2, at), Verdict::Live);
        assert_eq!(verdict(&runs, "a", 2, other), Verdict::Over);
        assert_eq!(verdict(&runs, "a", 1, at), Verdict::Over);
        assert_eq!(verdict(&runs, "a", 3, at), Verdict::Unknown);
        assert_eq!(verdict(&runs, "b", 3, at), Verdict::Over);
        assert_eq!(verdict(&runs, "b", 4, at), Verdict::Unknown);
        assert_eq!(verdict(&runs, "c", 1, at), Verdict::Unknown);
    }

    #[test]
    fn an_unknown_run_is_live_only_for_its_grace() {
        let mut unknown = Unknown::default();
        let id = ChitchatId::new("x", 1, "127.0.0.1:1".parse().unwrap());
        let t0 = Instant::now();
        assert!(unknown.in_grace(&id, t0));
        assert!(unknown.in_grace(&id, t0 + UNKNOWN_GRACE / 2));
        assert!(!unknown.in_grace(&id, t0 + UNKNOWN_GRACE));
        // Past the bound, a new unknown run is not tracked: over.
        for i in 0..UNKNOWN_MAX {
            let other = ChitchatId::new(format!("n{i}"), 1, "127.0.0.1:1".parse().unwrap());
            unknown.in_grace(&other, t0);
        }
        let late = ChitchatId::new("late", 1, "127.0.0.1:1".parse().unwrap());
        assert!(!unknown.in_grace(&late, t0));
        assert!(unknown.first_seen.len() <= UNKNOWN_MAX);
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
