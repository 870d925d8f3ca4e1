//! Write a Trellis pattern in a few lines: implement [`Pattern`] and a data
//! trait ([`KeyValue`], [`PubSub`]) with plain Rust types, and the SDK does the rest of
//! the pattern protocol (docs/pattern-protocol.md): flags and `TRELLIS_*`
//! environment, logging to stderr, binding, the handshake line, the
//! `Lifecycle` and `grpc.health.v1.Health` services, input validation,
//! error → status mapping, and graceful shutdown on `Stop`, SIGTERM and
//! SIGINT.
//!
//! A complete pattern:
//!
//! ```no_run
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use pattern_sdk::{Error, InitContext, KeyValue, ListPage, ListQuery, Pattern};
//!
//! #[derive(serde::Deserialize, Default)]
//! #[serde(default, deny_unknown_fields)]
//! struct Config {
//!     greeting: String,
//! }
//!
//! struct Tiny {
//!     map: Mutex<HashMap<(String, String), Bytes>>,
//! }
//!
//! impl Pattern for Tiny {
//!     type Config = Config;
//!     const NAME: &'static str = "tiny";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     // The map lives in this process, so replicas would not share it.
//!     const STATEFUL: bool = true;
//!
//!     async fn init(config: Config, ctx: InitContext) -> Result<Self, Error> {
//!         tracing::info!(name = ctx.name(), greeting = config.greeting, "hello");
//!         Ok(Tiny { map: Mutex::default() })
//!     }
//! }
//!
//! impl KeyValue for Tiny {
//!     async fn get(&self, ns: &str, key: &str) -> Result<Option<Bytes>, Error> {
//!         let map = self.map.lock().map_err(Error::internal)?;
//!         Ok(map.get(&(ns.into(), key.into())).cloned())
//!     }
//!     async fn put(&self, ns: &str, key: &str, value: Bytes, _ttl: Option<Duration>) -> Result<(), Error> {
//!         let mut map = self.map.lock().map_err(Error::internal)?;
//!         map.insert((ns.into(), key.into()), value);
//!         Ok(())
//!     }
//!     async fn delete(&self, ns: &str, key: &str) -> Result<bool, Error> {
//!         let mut map = self.map.lock().map_err(Error::internal)?;
//!         Ok(map.remove(&(ns.into(), key.into())).is_some())
//!     }
//!     async fn list(&self, _ns: &str, _query: ListQuery) -> Result<ListPage, Error> {
//!         Err(Error::failed_precondition("tiny cannot list; use memstore"))
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     pattern_sdk::Server::<Tiny>::new().key_value().run().await
//! }
//! ```
//!
//! Layout, one module per noun:
//! - `pattern`: the [`Pattern`], [`KeyValue`] and [`PubSub`] traits and their
//!   plain types.
//! - `error`: [`Error`] and its mapping to `tonic::Status`.
//! - [`validate`]: the request checks and limits every pattern gets.
//! - `config`: `google.protobuf.Struct` → the pattern's `Config`.
//! - `lifecycle`: the `Lifecycle` service and the slot holding the pattern.
//! - `kv`: the `KeyValue` gRPC service, delegating to the trait.
//! - `pubsub`: the `PubSub` gRPC service: publish, and subscription streams
//!   that end when the client goes away or the pattern stops.
//! - `health`: what `grpc.health.v1.Health` answers, and the poller.
//! - `listen`, `handshake`: binding the listen address; the stdout line.
//! - `options`, `logging`: flags and environment; stderr logging.
//! - [`observe`]: backend operation metrics and spans, pool figures,
//!   subscriptions; served to the proxy by `Lifecycle/Metrics`.
//! - `shutdown`, `server`: the shutdown request; [`Server`], which runs it all.

mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod handshake;
mod health;
pub mod idempotency;
mod kv;
mod lifecycle;
mod listen;
mod logging;
pub mod observe;
mod options;
mod pattern;
mod pubsub;
mod server;
mod shutdown;
mod traces;
pub mod validate;

#[cfg(test)]
mod testing;

pub use error::{Error, FieldViolation};
pub use handshake::{Endpoint, format_handshake};
pub use listen::{BindError, ListenAddr, ListenAddrError, Listener, SocketFile};
pub use options::{LogFormat, Options};
pub use pattern::{
    Health, InitContext, KeyValue, ListPage, ListQuery, Message, MessageStream, Pattern, PubSub,
};
pub use server::{Server, ServerError};
