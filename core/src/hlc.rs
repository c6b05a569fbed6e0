//! Hybrid logical clocks: versions that order every write in the cluster,
//! close to wall-clock time but never going backwards, whatever the clocks
//! of the nodes say (Kulkarni et al., 2014).

use serde::{Deserialize, Serialize};

/// A hybrid logical timestamp: wall-clock milliseconds and a counter that
/// breaks ties within one millisecond.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest seen).
    pub wall_ms: u64,
    /// Counter within `wall_ms`.
    pub logical: u32,
}

impl Hlc {
    /// Packs into one ordered u64 (44 bits of ms, good until year 2527; 20
    /// bits of counter), for compact start times. Saturates instead of
    /// overflowing: a timestamp beyond 2527 packs as the largest value.
    pub fn packed(self) -> u64 {
        const MS_MAX: u64 = (1 << 44) - 1;
        if self.wall_ms > MS_MAX {
            return u64::MAX;
        }
        (self.wall_ms << 20) | u64::from(self.logical.min((1 << 20) - 1))
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// A node's hybrid logical clock.
#[derive(Debug, Default)]
pub struct Clock {
    last: Hlc,
}

/// A peer's timestamp further ahead of this node's wall clock than
/// `max_clock_offset`: refused, so that one fast (or forged) clock cannot
/// drag every node's versions into the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooFarAhead {
    /// How far ahead of this node's wall clock, ms.
    pub ahead_ms: u64,
}

impl std::fmt::Display for TooFarAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its timestamp is {} ms ahead of this node's clock",
            self.ahead_ms
        )
    }
}

impl Hlc {
    /// Whether this timestamp is more than `max_offset_ms` ahead of the
    /// wall clock `wall_ms`.
    pub fn ahead_of(self, wall_ms: u64, max_offset_ms: u64) -> Result<(), TooFarAhead> {
        let ahead_ms = self.wall_ms.saturating_sub(wall_ms);
        if ahead_ms > max_offset_ms {
            Err(TooFarAhead { ahead_ms })
        } else {
            Ok(())
        }
    }
}

impl Clock {
    /// A timestamp for a local event at wall time `wall_ms`: after every
    /// timestamp this clock gave or observed. When the counter of one
    /// millisecond runs out, the next millisecond is borrowed, so two
    /// timestamps are never equal (the wall time saturates at `u64::MAX`,
    /// which bounded observation keeps out of reach).
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        self.last = if wall_ms > self.last.wall_ms {
            Hlc {
                wall_ms,
                logical: 0,
            }
        } else {
            match self.last.logical.checked_add(1) {
                Some(logical) => Hlc {
                    wall_ms: self.last.wall_ms,
                    logical,
                },
                None => Hlc {
                    wall_ms: self.last.wall_ms.saturating_add(1),
                    logical: 0,
                },
            }
        };
        self.last
    }

    /// Takes in a timestamp seen from a peer, so that the next local one
    /// orders after it, unless it is more than `max_offset_ms` ahead of
    /// this node's wall clock `wall_ms`: then it is refused and the clock
    /// does not move.
    pub fn observe(
        &mut self,
        remote: Hlc,
        wall_ms: u64,
        max_offset_ms: u64,
    ) -> Result<(), TooFarAhead> {
        remote.ahead_of(wall_ms, max_offset_ms)?;
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }

    /// The latest timestamp given or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

/// The version of a replicated write: ordered by time, ties by the writing
/// node, so the last writer wins identically everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// When.
    pub hlc: Hlc,
    /// Who (node name).
    pub node: String,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.hlc, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_orders_after_observed() {
        let mut c = Clock::default();
        let a = c.tick(1000);
        let b = c.tick(900); // wall clock stepped back
        assert!(b > a);
        c.observe(
            Hlc {
                wall_ms: 5000,
                logical: 7,
            },
            4900,
            500,
        )
        .unwrap();
        let d = c.tick(1001);
        assert!(
            d > Hlc {
                wall_ms: 5000,
                logical: 7
            }
        );
        let e = c.tick(6000);
        assert_eq!(
            e,
            Hlc {
                wall_ms: 6000,
                logical: 0
            }
        );
        assert!(
            Hlc {
                wall_ms: 2,
                logical: 0
            }
            .packed()
                > Hlc {
                    wall_ms: 1,
                    logical: 9
                }
                .packed()
        );
    }

    #[test]
    fn a_timestamp_beyond_the_offset_bound_is_refused_and_moves_nothing() {
        let mut c = Clock::default();
        let t = c.tick(1_000);
        let far = Hlc {
            wall_ms: u64::MAX,
            logical: u32::MAX,
        };
        assert_eq!(
            c.observe(far, 1_000, 500),
            Err(TooFarAhead {
                ahead_ms: u64::MAX - 1_000
            })
        );
        assert_eq!(c.last(), t, "a refused timestamp leaves the clock alone");
        let near = Hlc {
            wall_ms: 1_500,
            logical: 3,
        };
        assert_eq!(c.observe(near, 1_000, 500), Ok(()));
        assert!(c.tick(1_000) > near);
    }

    #[test]
    fn timestamps_stay_distinct_when_a_millisecond_runs_out() {
        let mut c = Clock::default();
        c.observe(
            Hlc {
                wall_ms: 7,
                logical: u32::MAX - 1,
            },
            7,
            0,
        )
        .unwrap();
        let a = c.tick(7);
        let b = c.tick(7);
        let d = c.tick(7);
        assert!(a < b && b < d, "{a} {b} {d}");
        assert_eq!(b.wall_ms, 8);
    }

    #[test]
    fn versions_tie_break_by_node() {
        let h = Hlc {
            wall_ms: 1,
            logical: 0,
        };
        let a = Version {
            hlc: h,
            node: "a".into(),
        };
        let b = Version {
            hlc: h,
            node: "b".into(),
        };
        assert!(b > a);
        let later = Version {
            hlc: Hlc {
                wall_ms: 2,
                logical: 0,
            },
            node: "a".into(),
        };
        assert!(later > b);
    }
}
