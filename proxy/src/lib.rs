//! Trellis, the data-access proxy, as a library; `main.rs` is a thin shell.
//!
//! Layout (one module per noun; see docs/ARCHITECTURE.md):
//! - [`config`]: the YAML + environment configuration and its validation.
//! - [`supervisor`]: spawning, watching, restarting and stopping patterns.
//! - [`health`]: the proxy's `grpc.health.v1` reporter.
//! - [`liveness`]: the watchdog behind `trellis.liveness` (and systemd's
//!   `WATCHDOG=1`): a starved runtime or a stuck owner task turns it off.
//! - [`notify`]: the service manager's notification protocol (systemd
//!   `Type=notify`): READY, RELOADING, STOPPING, WATCHDOG, STATUS.
//! - [`front`]: the gRPC front door: one HTTP/2 listener, calls sent by
//!   `:path` to the data plane or to the proxy's own services.
//! - [`dataplane`]: every data call (KeyValue, PubSub) as one stack of
//!   layers: route by namespace, deadline, drain, forward at the HTTP/2 level.
//! - [`upstream`]: the HTTP/2 data connection to one pattern process.
//! - [`metadata`]: the header rules both front doors share (request id,
//!   what is never forwarded).
//! - [`metrics`]: the Prometheus registry behind `GET /metrics`.
//! - [`traces`]: OpenTelemetry spans of data calls, exported over OTLP.
//! - [`policy`]: traffic policies per namespace (plain configuration data).
//! - [`access`]: caller identities (bearer tokens, client certificates)
//!   and the roles `access:` grants them per namespace.
//! - [`admin`]: the admin API over the supervisor's handles.
//! - [`reflection`]: gRPC server reflection (v1 and v1alpha) of exactly the
//!   services served, errors answered in-stream.
//! - [`server`]: everything assembled on a listener, with shutdown.
//! - [`reload`]: the task that owns the supervisor and the doors once the
//!   proxy runs: reloads, blue/green restarts, operator commands.
//! - [`doors`]: the gRPC, HTTP and admin listeners, re-bound by a reload.
//! - [`tls`]: TLS on the doors (rustls), files re-read when they change.
//! - [`shutdown`]: the bounded shutdown waits a second signal cuts short.
//! - [`cli`]: the command line and its client subcommands.
//! - [`logging`]: tracing set-up.

// `ApiError` (error.rs) is large for a `Result` error, but it is built only on
// the failure path and moved once to the edge; boxing it everywhere would
// buy nothing measurable.
#![allow(clippy::result_large_err)]

pub mod access;
pub mod admin;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod doors;
pub mod error;
pub mod front;
pub mod gateway;
pub mod health;
pub mod liveness;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod reflection;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod supervisor;
pub mod tls;
pub mod traces;
pub mod upstream;
