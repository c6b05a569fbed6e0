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

impl Clock {
    /// A timestamp for a local event at wall time `wall_ms`.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        self.last = if wall_ms > self.last.wall_ms {
            Hlc {
                wall_ms,
                logical: 0,
            }
        } else {
            Hlc {
                wall_ms: self.last.wall_ms,
                logical: self.last.logical.saturating_add(1),
            }
        };
        self.last
    }

    /// Takes in a timestamp seen from a peer, so that the next local one
    /// orders after it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
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
        c.observe(Hlc {
            wall_ms: 5000,
            logical: 7,
        });
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
