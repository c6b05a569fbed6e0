//! Anti-entropy state: at most one exchange with one peer at a time, in
//! steps (fingerprints, then the job digest page by page, then the
//! completions page by page), and whether this node has caught up with a
//! peer since it started.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Where an exchange is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fingerprints sent.
    Hash,
    /// A page of the job digest sent: the names in `(after, until]`.
    Jobs {
        /// Exclusive lower bound.
        after: Option<String>,
        /// Inclusive upper bound, or the end.
        until: Option<String>,
    },
    /// A page of the completions digest sent.
    Completions {
        /// Exclusive lower bound.
        after: Option<(String, u32)>,
        /// Inclusive upper bound, or the end.
        until: Option<(String, u32)>,
    },
}

/// One exchange with a peer.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The peer.
    pub peer: Arc<str>,
    /// Its address.
    pub addr: SocketAddr,
    /// The step whose answer is awaited.
    pub step: Step,
    /// The call awaiting that answer.
    pub call: u64,
    /// When that call was made.
    pub since: std::time::Instant,
}

/// The anti-entropy state of a node.
#[derive(Debug)]
pub struct AntiEntropy {
    /// The exchange in flight (one at a time: a node far behind catches up
    /// page by page from one peer instead of asking everyone at once).
    pub exchange: Option<Exchange>,
    /// When the last exchange began.
    pub last: Option<Instant>,
    /// Whether a whole exchange with a peer has completed since start
    /// (and its records reached the disk). Until then the node places and
    /// starts nothing: a node whose data dir was wiped would otherwise
    /// rerun batch slots whose completion it has not heard of.
    pub caught_up: bool,
    /// An exchange completed; `caught_up` follows once the writes it
    /// caused are durable.
    pub exchange_done: bool,
    /// When (this node's wall clock, ms) an exchange last completed.
    pub last_done_ms: Option<u64>,
    /// It was caught up once (a freeze took it back): its state is worth
    /// serving to others, and with no peer left to ask it is caught up
    /// again at once.
    pub was_caught_up: bool,
}

impl AntiEntropy {
    /// A node that starts caught up (it bootstrapped the cluster, so there
    /// is nobody to catch up with) or not (it joined through seeds).
    pub fn new(caught_up: bool) -> AntiEntropy {
        AntiEntropy {
            exchange: None,
            last: None,
            caught_up,
            exchange_done: caught_up,
            last_done_ms: None,
            was_caught_up: caught_up,
        }
    }
}
