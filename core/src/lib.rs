//! shoal's scheduler core: every scheduling decision of a node as a pure
//! state machine, in the spirit of `quinn-proto` and of this repository's
//! `membership/src/swim.rs`.
//!
//! [`Scheduler`] takes each input with the time — a membership view, a
//! peer's request or a reply, an API command, a driver's news, a durable
//! write, a timer — and returns [`Effect`]s: start or stop an instance,
//! send a message, persist records, publish gossip values, answer the API.
//! It reads no clock, draws from no thread RNG and does no IO (the crate
//! depends on no runtime, and `clippy.toml` forbids clocks and global
//! randomness), so the agent's shell and the simulator run the very same
//! decisions, and a simulated run replays from its seed.
//!
//! # Layout
//! - [`scheduler`]: the state machine, its inputs and effects.
//! - [`config`]: [`SchedulerConfig`], every timing and bound, with reasons.
//! - [`desired`]: the desired state: job records and completions.
//! - [`seen`]: the cluster as seen (view, members in doubt, minority).
//! - [`local`]: this node's copies and their publication.
//! - [`placing`]: what this node coordinates: rounds, placements in flight,
//!   backoff of unplaceable slots.
//! - [`sync`]: anti-entropy state (catch-up before acting).
//! - [`reconcile`]: the reconciler's rules as pure functions.
//! - [`update`]: rolling updates: `[update]` and who moves which slot when.
//! - [`view`]: members, the coordinators' ring, the index of published copies.
//! - [`status`]: what the API shows.
//! - [`job`]: job files: parsing, validation, slot requests.
//! - [`records`], [`instance`], [`hlc`]: the data: job records and
//!   completions, instances, hybrid logical clocks.
//! - [`health`]: health checks and the health of a copy.
//! - [`plan`]: `shoal plan`, a dry run of a submission.
//! - [`ports`]: dynamic host ports and the `${SHOAL_...}` variables.
//! - [`gossip`]: how copies and unplaceable slots are laid out in gossip keys.
//! - [`wire`]: node-to-node requests and responses.
#![deny(missing_docs)]

pub mod catalog;
pub mod config;
pub mod cron;
pub mod deployment;
pub mod desired;
pub mod gossip;
pub mod health;
pub mod hlc;
pub mod instance;
pub mod job;
pub mod local;
pub mod placing;
pub mod plan;
pub mod ports;
pub mod reconcile;
pub mod records;
pub mod scheduler;
pub mod seen;
pub mod skew;
pub mod status;
pub mod sync;
pub mod system;
pub mod update;
pub mod view;
pub mod wire;

pub use config::SchedulerConfig;
pub use scheduler::{
    ApiAnswer, ApiError, ApiRequest, ApiToken, CallId, Effect, LogsTo, Now, Recovered, ReplyToken,
    Scheduler, WriteId,
};
pub use view::{ClusterView, ViewBuilder};
