//! The shoal node: agent, HTTP API, CLI — the IO around the scheduler core
//! (`shoal-core`), which makes every decision.
//!
//! # Layout
//! - `agent`: start-up and shutdown of an agent.
//! - `node`: the node's event loop: feeds the core, carries out its effects.
//! - `api`: the HTTP JSON API.
//! - `cli`: command-line parsing (`shoal agent` and the command list).
//! - `client`: the HTTP client of the client commands, table output.
//! - `commands`: the client commands: nodes, run, status, stop, scale, logs.
//! - `credentials`: join tokens and the cluster CA on disk.
//! - `demo`: `shoal demo`, a local cluster on loopback.
//! - `events`: the event stream, derived from successive states.
//! - `driver`: the `Driver` trait, the exec and hollow drivers, `shoal supervise`.
//! - `host`: machine facts (capacity, host name).
//! - `launch`: starting agent processes (demo, tests, benchmarks, chaos).
//! - `notify`: failure notifications to webhooks, each sent by one node.
//! - `store`: the node's durable copy of jobs and completions (redb).

pub mod agent;
pub mod api;
pub mod checks;
pub mod cli;
pub mod client;
pub mod commands;
pub mod credentials;
pub mod demo;
pub mod dns;
pub mod driver;
pub mod events;
pub mod host;
pub mod identity;
pub mod ingress;
pub mod launch;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod store;

pub use shoal_core::{gossip, hlc, instance, job, records, wire};
