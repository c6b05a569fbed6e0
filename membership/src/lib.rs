//! shoal's cluster membership.
//!
//! Every node publishes a [`NodeRecord`] (name, address, labels, capacity,
//! drivers, version) and its [`Load`] through [`spread`], state gossip whose
//! cost per node does not grow with the cluster, over the node's QUIC
//! endpoint. Liveness comes from a SWIM-style
//! detector ([`swim`]) with direct and indirect probes over QUIC, suspicion
//! with Lifeguard-style confirmations, and direct dissemination of changes.
//! Other crates see a plain-data [`MembershipView`].
//!
//! # Layout
//! - [`record`]: node records, load, states, the view.
//! - [`run`]: a node's run as SWIM holds it, and the verdict on a run
//!   gossip names.
//! - [`signed`]: the signed form of every value a node publishes, so that
//!   a relay can pass a node's values on but not forge them.
//! - [`spread`]: the state gossip, a pure state machine.
//! - [`swim`]: the failure detector, a pure state machine.
//! - [`node`]: [`Membership`], the task that wires spread, SWIM and the
//!   transport together and publishes the view (feature `runtime`, on by
//!   default; without it the crate is pure: records, spread and SWIM).
#![deny(missing_docs)]

#[cfg(feature = "runtime")]
pub mod node;
pub mod record;
pub mod run;
pub mod signed;
pub mod spread;
pub mod swim;

#[cfg(feature = "runtime")]
pub use node::{AppValues, Membership, MembershipConfig, MembershipError, SwimStats};
pub use record::{Capacity, Load, Member, MembershipView, NodeRecord, NodeState};
pub use swim::SwimConfig;
