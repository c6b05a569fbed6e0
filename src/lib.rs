//! The shoal node: agent, HTTP API, CLI.
//!
//! # Layout
//! - `agent`: start-up, the node's event loop, shutdown.
//! - `api`: the HTTP JSON API.
//! - `cli`: command-line parsing and the client commands.
//! - `commands`: run, status, stop, scale, logs.
//! - `credentials`: join tokens and the cluster CA on disk.
//! - `demo`: `shoal demo`, a local cluster on loopback.
//! - `driver`: the `Driver` trait, the exec and hollow drivers, `shoal supervise`.
//! - `gossip_keys`: how a node's instances are laid out in gossip keys.
//! - `hlc`: hybrid logical clocks and versions.
//! - `host`: machine facts (capacity, host name).
//! - `job`: job files: parsing, validation, slot requests.
//! - `reconcile`: the pure reconciler.
//! - `rpc`: node-to-node calls of the scheduler.
//! - `scheduler`: the node's scheduler (store, instances, placements).
//! - `store`: the node's durable copy of jobs and completions (redb).

pub mod agent;
pub mod api;
pub mod cli;
pub mod commands;
pub mod credentials;
pub mod demo;
pub mod driver;
pub mod gossip_keys;
pub mod hlc;
pub mod host;
pub mod job;
pub mod reconcile;
pub mod rpc;
pub mod scheduler;
pub mod store;
