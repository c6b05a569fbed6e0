//! shoal's fault-injection tools: process and network-namespace helpers
//! shared by the benchmarks and the chaos suite. The simulator is its own
//! package, `shoal-sim` (in `chaos/sim`), built on the pure crates only.
//!
//! # Layout
//! - [`procs`] — start, signal and reap agents; read what they log.
//! - [`netns`] — network namespaces on a private bridge, with packet loss, removed on drop.
//! - [`delay`] — packet delay with jitter between them, by a userspace relay.
//! - [`stats`] — percentiles.

pub mod delay;
pub mod netns;
pub mod procs;
pub mod stats;
