//! Clock offsets to peers, measured on anti-entropy round trips, and the
//! verdict whether this node's own clock is the one that is off.
//!
//! Each anti-entropy exchange begins with a call whose answer carries the
//! peer's wall clock. With `rtt` the round trip and `local` this node's
//! wall clock when the answer came, the peer's clock read `remote` about
//! `rtt / 2` earlier, so its offset is `remote - (local - rtt / 2)`, known
//! to within `rtt / 2` (as NTP estimates it). A peer counts as off by more
//! than the bound only when even the most favourable reading of that
//! window is.
//!
//! One peer that disagrees says little (it may be the skewed one); when at
//! least [`SKEW_PEERS_MIN`] peers measured recently, and more than half of
//! them, are off in the same direction, this node is the odd one out: it
//! says so and refuses writes until its clock is fixed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A measurement older than this no longer counts towards the verdict.
pub const OFFSET_FRESH_FOR: Duration = Duration::from_secs(120);

/// Peers that must agree before a node calls its own clock skewed.
pub const SKEW_PEERS_MIN: usize = 2;

/// Peers whose offset is kept, at most (one entry per member; members
/// beyond this are not measured).
pub const OFFSETS_MAX: usize = 100_000;

/// One peer's clock offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// The peer's clock minus this node's, ms (positive: the peer is
    /// ahead).
    pub ms: i64,
    /// Round trip of the measurement, ms (the estimate is good to half).
    pub rtt_ms: u64,
    /// When it was measured.
    pub at: Instant,
}

impl Offset {
    /// How far the peer is off beyond `bound_ms` for certain, with its
    /// sign (0 when within the bound or the window allows it).
    fn beyond(&self, bound_ms: u64) -> i64 {
        if self.ms.unsigned_abs() > bound_ms.saturating_add(self.rtt_ms / 2) {
            self.ms
        } else {
            0
        }
    }
}

/// This node's clock is off most of its peers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skewed {
    /// Median offset of the disagreeing peers, ms: positive when the peers
    /// are ahead (this node is behind).
    pub peers_ahead_ms: i64,
    /// Peers that disagree.
    pub disagreeing: usize,
    /// Peers measured recently.
    pub measured: usize,
}

impl std::fmt::Display for Skewed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (by, way) = if self.peers_ahead_ms > 0 {
            (self.peers_ahead_ms.unsigned_abs(), "behind")
        } else {
            (self.peers_ahead_ms.unsigned_abs(), "ahead of")
        };
        write!(
            f,
            "this node's clock is about {by} ms {way} {} of its {} peers measured",
            self.disagreeing, self.measured
        )
    }
}

/// Offsets to peers.
#[derive(Debug, Default)]
pub struct Offsets {
    by_peer: BTreeMap<Arc<str>, Offset>,
}

impl Offsets {
    /// Records a measurement: the peer's wall clock `remote_ms` came back
    /// `rtt` after the call was sent, when this node's wall clock read
    /// `local_ms`.
    pub fn record(
        &mut self,
        peer: Arc<str>,
        remote_ms: u64,
        local_ms: u64,
        rtt: Duration,
        at: Instant,
    ) {
        if remote_ms == 0 {
            // A peer that does not report its clock.
            return;
        }
        if self.by_peer.len() >= OFFSETS_MAX && !self.by_peer.contains_key(&peer) {
            return;
        }
        let rtt_ms = u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX);
        let mid = local_ms.saturating_sub(rtt_ms / 2);
        let ms = if remote_ms >= mid {
            i64::try_from(remote_ms - mid).unwrap_or(i64::MAX)
        } else {
            i64::try_from(mid - remote_ms).map_or(i64::MIN, |d| -d)
        };
        self.by_peer.insert(peer, Offset { ms, rtt_ms, at });
    }

    /// A peer's last measured offset.
    pub fn get(&self, peer: &str) -> Option<&Offset> {
        self.by_peer.get(peer)
    }

    /// Every measured peer.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Offset)> {
        self.by_peer.iter()
    }

    /// Whether this node's clock is off by more than `bound_ms` from most
    /// of the peers measured within [`OFFSET_FRESH_FOR`] of `now`.
    pub fn verdict(&self, bound_ms: u64, now: Instant) -> Option<Skewed> {
        let fresh: Vec<&Offset> = self
            .by_peer
            .values()
            .filter(|o| now.saturating_duration_since(o.at) <= OFFSET_FRESH_FOR)
            .collect();
        let beyond: Vec<i64> = fresh.iter().map(|o| o.beyond(bound_ms)).collect();
        let ahead: Vec<i64> = beyond.iter().copied().filter(|b| *b > 0).collect();
        let behind: Vec<i64> = beyond.iter().copied().filter(|b| *b < 0).collect();
        let mut side = if ahead.len() >= behind.len() {
            ahead
        } else {
            behind
        };
        if side.len() < SKEW_PEERS_MIN || side.len() * 2 <= fresh.len() {
            return None;
        }
        side.sort_unstable();
        Some(Skewed {
            peers_ahead_ms: side[side.len() / 2],
            disagreeing: side.len(),
            measured: fresh.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The origin of a test's virtual time.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    fn at(offsets: &mut Offsets, peer: &str, remote: u64, local: u64, rtt_ms: u64, now: Instant) {
        offsets.record(
            Arc::from(peer),
            remote,
            local,
            Duration::from_millis(rtt_ms),
            now,
        );
    }

    #[test]
    fn an_offset_is_measured_from_the_middle_of_the_round_trip() {
        let now = origin();
        let mut o = Offsets::default();
        // Sent at 1000, answered at 1010; the peer read 2005 at ~1005.
        at(&mut o, "a", 2005, 1010, 10, now);
        assert_eq!(o.get("a").unwrap().ms, 1000);
        at(&mut o, "b", 5, 1010, 10, now);
        assert_eq!(o.get("b").unwrap().ms, -1000);
        at(&mut o, "c", u64::MAX, 0, 0, now);
        assert_eq!(o.get("c").unwrap().ms, i64::MAX);
    }

    #[test]
    fn a_node_is_skewed_only_when_most_peers_disagree_the_same_way() {
        let now = origin();
        let mut o = Offsets::default();
        // One peer 1 h ahead: it may be the skewed one.
        at(&mut o, "a", 3_600_000 + 1_000, 1_000, 0, now);
        assert_eq!(o.verdict(500, now), None);
        // Two of three peers 1 h ahead: this node is behind.
        at(&mut o, "b", 3_600_000 + 1_000, 1_000, 0, now);
        at(&mut o, "c", 1_000, 1_000, 0, now);
        let v = o.verdict(500, now).expect("skewed");
        assert_eq!(v.peers_ahead_ms, 3_600_000);
        assert_eq!((v.disagreeing, v.measured), (2, 3));
        assert!(v.to_string().contains("behind"), "{v}");
        // Two agree, two disagree: no majority.
        at(&mut o, "d", 1_000, 1_000, 0, now);
        assert_eq!(o.verdict(500, now), None);
        // Stale measurements do not count.
        let later = now + OFFSET_FRESH_FOR + Duration::from_secs(1);
        at(&mut o, "c", 1_000, 1_000, 0, later);
        assert_eq!(o.verdict(500, later), None);
    }

    #[test]
    fn a_slow_round_trip_widens_the_window() {
        let now = origin();
        let mut o = Offsets::default();
        // 700 ms apparent offset, but a 600 ms round trip: could be 400.
        at(&mut o, "a", 1_000 + 700, 1_000 + 300, 600, now);
        at(&mut o, "b", 1_000 + 700, 1_000 + 300, 600, now);
        assert_eq!(o.get("a").unwrap().ms, 700);
        assert_eq!(o.verdict(500, now), None);
        at(&mut o, "a", 1_000 + 700, 1_000, 0, now);
        at(&mut o, "b", 1_000 + 700, 1_000, 0, now);
        assert!(o.verdict(500, now).is_some());
    }
}
