//! A run of a node (one start of its agent: its generation and gossip
//! address) as SWIM holds it, and the verdict on a run gossip names: the
//! membership task forgets the gossiped state of runs that are over and
//! refuses to believe them again.

use std::collections::HashMap;
use std::net::SocketAddr;

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

/// What the membership layer believes of one run gossip names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The run held, alive or suspect.
    Live,
    /// A run that is over: dead, left, forgotten, superseded by a newer
    /// run, or the held run at another address.
    Over,
    /// A run not known yet (a newer run, or a new node).
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
