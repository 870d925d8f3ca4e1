//! Trellis, the data-access proxy, as a library; `main.rs` is a thin shell.
//!
//! Layout (one module per noun; see docs/ARCHITECTURE.md):
//! - [`config`]: the YAML + environment configuration and its validation.
//! - [`supervisor`]: spawning, watching, restarting and stopping patterns.
//! - [`health`]: the proxy's `grpc.health.v1` reporter.
//! - [`dataplane`]: namespace routing and forwarding of data calls.
//! - [`pubsub`]: forwarding of `PubSub` calls, subscriptions as streams.
//! - [`admin`]: the admin API over the supervisor's handles.
//! - [`server`]: everything assembled on a listener, with shutdown.
//! - [`cli`]: the command line and its client subcommands.
//! - [`logging`]: tracing set-up.

// `ApiError` (error.rs) is large for a `Result` error, but it is built only on
// the failure path and moved once to the edge; boxing it everywhere would
// buy nothing measurable.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod gateway;
pub mod health;
pub mod logging;
pub mod pubsub;
pub mod server;
pub mod supervisor;
