//! Running a pattern: options, logging, bind, handshake, serve, drain, exit.

use std::future::Future;
use std::io;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, timeout_at};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use trellis_proto::data::v1::key_value_server::KeyValueServer;
use trellis_proto::data::v1::pub_sub_server::PubSubServer;
use trellis_proto::pattern::v1::lifecycle_server::LifecycleServer;
use trellis_proto::{KEY_VALUE_SERVICE, PUB_SUB_SERVICE};

use crate::health::{self, HealthPublisher};
use crate::kv::KeyValueService;
use crate::lifecycle::{DEFAULT_GRACE, LifecycleService, Slot};
use crate::listen::BindError;
use crate::observe::Metrics;
use crate::pubsub::PubSubService;
use crate::shutdown::Shutdown;
use crate::{KeyValue, Listener, Options, Pattern, PubSub, handshake, logging};

/// Serves pattern `P`. Register its data interfaces, then [`Server::run`]:
///
/// ```no_run
/// # use pattern_sdk::{Pattern, KeyValue};
/// # async fn main_body<P: KeyValue>() -> std::process::ExitCode {
/// pattern_sdk::Server::<P>::new().key_value().run().await
/// # }
/// ```
pub struct Server<P> {
    interfaces: Vec<Interface<P>>,
    name: Option<String>,
    /// When set, every call must carry it in `trellis-pattern-secret`.
    secret: Option<Arc<str>>,
}

/// A data service: its gRPC name and how to add it to the router.
struct Interface<P> {
    name: &'static str,
    add: fn(&mut RoutesBuilder, Arc<Slot<P>>, Shutdown, &Arc<Metrics>),
}

/// Why a pattern process could not start or keep serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot write the handshake line to stdout: {0}; stdout must stay open for the proxy")]
    Handshake(#[source] io::Error),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

impl<P: Pattern> Default for Server<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: KeyValue> Server<P> {
    /// Serves `trellis.data.v1.KeyValue` from `P`'s [`KeyValue`] impl.
    pub fn key_value(self) -> Self {
        self.interface(KEY_VALUE_SERVICE, |routes, slot, _, _| {
            routes.add_service(KeyValueServer::new(KeyValueService::new(slot)));
        })
    }
}

impl<P: PubSub> Server<P> {
    /// Serves `trellis.data.v1.PubSub` from `P`'s [`PubSub`] impl.
    pub fn pub_sub(self) -> Self {
        self.interface(PUB_SUB_SERVICE, |routes, slot, shutdown, metrics| {
            routes.add_service(PubSubServer::new(PubSubService::new(
                slot,
                shutdown,
                Arc::clone(metrics),
            )));
        })
    }
}

impl<P: Pattern> Server<P> {
    pub fn new() -> Self {
        Self {
            interfaces: Vec::new(),
            name: None,
            secret: None,
        }
    }

    /// Refuses every call (lifecycle, health and data alike) whose
    /// `trellis-pattern-secret` metadata is not `secret`, with
    /// UNAUTHENTICATED. [`Server::run`] sets it from
    /// `TRELLIS_PATTERN_SECRET`; this is for tests and custom mains that
    /// call [`Server::serve`].
    pub fn require_secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into().into());
        self
    }

    fn interface(
        mut self,
        name: &'static str,
        add: fn(&mut RoutesBuilder, Arc<Slot<P>>, Shutdown, &Arc<Metrics>),
    ) -> Self {
        if !self.interfaces.iter().any(|i| i.name == name) {
            self.interfaces.push(Interface { name, add });
        }
        self
    }

    /// The whole life of a pattern process: reads [`Options`] from the
    /// command line and `TRELLIS_*` environment, logs to stderr, binds,
    /// writes the handshake line, serves until `Lifecycle/Stop`, SIGTERM or
    /// SIGINT, drains, and stops the pattern. Returns the exit code for
    /// `main`: success after a clean shutdown, failure (with the reason on
    /// stderr) otherwise.
    pub async fn run(mut self) -> ExitCode {
        // Taken first, before any other thread of this process can be
        // reading the environment or starting a child.
        if let Some(secret) = take_secret() {
            self = self.require_secret(secret);
        }
        let options = Options::from_env(P::NAME, P::VERSION);
        logging::init(options.log_format);
        let code = match self.run_with(options).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        };
        // The last spans go out before the process does (blocking: off the
        // runtime's threads, which the exporter's channel needs).
        let _ = tokio::task::spawn_blocking(crate::traces::shutdown).await;
        code
    }

    async fn run_with(mut self, options: Options) -> Result<(), ServerError> {
        if let Some(theirs) = options.protocol.as_deref()
            && theirs != trellis_proto::PATTERN_PROTOCOL_VERSION.to_string()
        {
            tracing::warn!(
                proxy = theirs,
                pattern = trellis_proto::PATTERN_PROTOCOL_VERSION,
                "the proxy speaks another pattern protocol version; it will likely reject this pattern"
            );
        }
        // Installed before the handshake, so a signal right after it still
        // drains cleanly.
        let signals = termination_signals().map_err(ServerError::Signals)?;
        let listener = Listener::bind(&options.listen).await?;
        let endpoint = listener.endpoint().map_err(ServerError::Handshake)?;
        handshake::write_handshake(&mut io::stdout().lock(), &endpoint)
            .map_err(ServerError::Handshake)?;
        let name = options.name.unwrap_or_else(|| P::NAME.to_string());
        tracing::info!(pattern = %name, %endpoint, version = P::VERSION, "listening");
        self.name = Some(name);
        self.serve(listener, signals).await
    }

    /// Serves on an already-bound listener until `Lifecycle/Stop` or until
    /// `shutdown` resolves (which drains for 5 s), then stops the pattern.
    /// Writes no handshake: [`Server::run`] does that. For tests and custom
    /// mains.
    pub async fn serve(
        self,
        listener: Listener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let names: Vec<&'static str> = self.interfaces.iter().map(|i| i.name).collect();
        if names.is_empty() {
            tracing::warn!("no data interface registered; call e.g. .key_value() on the Server");
        }
        let slot = Arc::new(Slot::<P>::new());
        let stop = Shutdown::new();
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Arc::new(HealthPublisher::new(reporter, &names).await);
        let metrics = Arc::new(Metrics::new());
        let lifecycle = LifecycleService::new(
            Arc::clone(&slot),
            Arc::clone(&health),
            stop.clone(),
            names,
            self.name.unwrap_or_else(|| P::NAME.to_string()),
            Arc::clone(&metrics),
        );

        let mut routes = RoutesBuilder::default();
        routes
            .add_service(LifecycleServer::new(lifecycle))
            .add_service(health_service);
        for interface in &self.interfaces {
            (interface.add)(&mut routes, Arc::clone(&slot), stop.clone(), &metrics);
        }
        let router = tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(CheckSecret(
                self.secret.clone(),
            )))
            .add_routes(routes.routes());

        let on_shutdown = tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.request(DEFAULT_GRACE, "shutdown signal");
            }
        });
        let poller = tokio::spawn(health::poll(
            Arc::clone(&slot),
            Arc::clone(&health),
            stop.clone(),
        ));

        let stop_accepting = {
            let stop = stop.clone();
            async move {
                stop.requested().await;
            }
        };
        let result = match listener {
            Listener::Tcp(l) => {
                let server = router.serve_with_incoming_shutdown(
                    TcpIncoming::from(l).with_nodelay(Some(true)),
                    stop_accepting,
                );
                until_stopped(server, &stop, &slot, &health).await
            }
            Listener::Unix(l, _socket_file) => {
                let server =
                    router.serve_with_incoming_shutdown(UnixListenerStream::new(l), stop_accepting);
                until_stopped(server, &stop, &slot, &health).await
            }
        };
        on_shutdown.abort();
        poller.abort();
        result
    }
}

/// Runs `server` until shutdown is requested, then drains: health goes
/// `NOT_SERVING`, new data calls get `UNAVAILABLE`, in-flight calls get until
/// the grace period ends, and then the pattern's `stop` runs (also bounded
/// by the grace period).
async fn until_stopped<P: Pattern>(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    stop: &Shutdown,
    slot: &Slot<P>,
    health: &HealthPublisher,
) -> Result<(), ServerError> {
    tokio::pin!(server);
    let (grace, ended_early) = tokio::select! {
        result = &mut server => (DEFAULT_GRACE, Some(result)),
        grace = stop.requested() => (grace, None),
    };
    let deadline = Instant::now() + grace;
    health.close().await;
    let pattern = slot.begin_stop();
    let served = match ended_early {
        Some(result) => result,
        None => timeout_at(deadline, &mut server).await.unwrap_or_else(|_| {
            tracing::warn!(
                ?grace,
                "in-flight calls did not finish within the grace period; closing their connections"
            );
            Ok(())
        }),
    };
    if let Some(pattern) = pattern
        && timeout_at(deadline, pattern.stop()).await.is_err()
    {
        tracing::warn!(
            ?grace,
            "the pattern's stop hook did not finish within the grace period"
        );
    }
    served.map_err(ServerError::Serve)
}

/// `TRELLIS_PATTERN_SECRET`, removed from this process's environment so
/// that no child the pattern starts inherits it.
fn take_secret() -> Option<String> {
    let var = trellis_proto::protocol::env::SECRET;
    let secret = std::env::var(var).ok().filter(|s| !s.is_empty());
    if std::env::var_os(var).is_some() {
        // SAFETY: `remove_var` is unsound only while another thread reads
        // or writes the environment outside std's lock (C code calling
        // `getenv`). `run` calls this first thing: the runtime's worker
        // threads are idle (nothing has been spawned on them yet), and no
        // other code of this process has run.
        unsafe { std::env::remove_var(var) };
    }
    secret
}

/// Refuses a call without the expected secret (when one is expected),
/// comparing in constant time (`trellis_proto::protocol::secret_matches`).
#[derive(Clone)]
struct CheckSecret(Option<Arc<str>>);

impl tonic::service::Interceptor for CheckSecret {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(expected) = &self.0 else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get(trellis_proto::protocol::SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if trellis_proto::protocol::secret_matches(presented, expected.as_bytes()) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "this pattern answers only the proxy that started it: the call lacks the \
                 trellis-pattern-secret the proxy was given",
            ))
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
fn termination_signals() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received signal");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ListenAddr;
    use crate::testing::TestPattern;
    use tonic::transport::Channel;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use trellis_proto::pattern::v1::MetricsRequest;
    use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;
    use trellis_proto::protocol::SECRET_HEADER;

    fn with_secret<T>(msg: T, secret: &str) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert(SECRET_HEADER, secret.parse().unwrap());
        req
    }

    #[tokio::test]
    async fn a_call_without_the_secret_is_refused_health_included() {
        let listener = Listener::bind(&ListenAddr::default()).await.unwrap();
        let Ok(crate::Endpoint::Tcp(addr)) = listener.endpoint() else {
            panic!("a tcp listener");
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::<TestPattern>::new()
                .key_value()
                .require_secret("s3cret")
                .serve(listener, async move {
                    let _ = stop_rx.await;
                }),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let check = || HealthCheckRequest {
            service: String::new(),
        };
        for presented in [None, Some("wrong!"), Some("s3cre")] {
            let req = match presented {
                None => tonic::Request::new(check()),
                Some(s) => with_secret(check(), s),
            };
            let err = health.check(req).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{presented:?}");
        }
        let mut lifecycle = LifecycleClient::new(channel);
        let err = lifecycle.metrics(MetricsRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // With it, the same calls are answered.
        health.check(with_secret(check(), "s3cret")).await.unwrap();
        lifecycle
            .metrics(with_secret(MetricsRequest {}, "s3cret"))
            .await
            .unwrap();
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}
