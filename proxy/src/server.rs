//! The proxy assembled: supervisor, health reporter, data plane and admin
//! API on one gRPC listener. [`run`] takes an already-bound listener and a
//! shutdown future, so tests can run it on port 0.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};
use trellis_proto::admin::v1::admin_server::AdminServer;
use trellis_proto::data::v1::key_value_server::KeyValueServer;

use crate::admin::AdminService;
use crate::config::Loaded;
use crate::dataplane::{KeyValueProxy, Router};
use crate::health;
use crate::pubsub::PubSubProxy;
use crate::supervisor::Supervisor;

/// Largest gRPC message the proxy accepts or sends (4 MiB, tonic's default
/// made explicit).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Serves until `shutdown` resolves, then drains the front door (bounded by
/// `shutdown_grace`) and stops every pattern.
/// The proxy's bound listeners.
pub struct Listeners {
    pub grpc: TcpListener,
    /// The HTTP/JSON gateway's; `None` turns the gateway off.
    pub http: Option<TcpListener>,
}

pub async fn run(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = loaded.config;
    let supervisor = Supervisor::start(&config, &loaded.source);
    let patterns = supervisor.handles().to_vec();

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let health_task = tokio::spawn(health::report(reporter, patterns.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let kv = KeyValueServer::new(KeyValueProxy::new(
        Router::new(&patterns),
        config.request_timeout,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let pubsub = PubSubProxy::server(
        Router::new(&patterns),
        config.request_timeout,
        stop_rx.clone(),
    );
    let admin = AdminServer::new(AdminService::new(patterns, stop_rx.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(trellis_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // One set of services behind both front doors: the gRPC listener serves
    // it, and the HTTP gateway calls it in-process.
    let mut services = tonic::service::RoutesBuilder::default();
    services
        .add_service(health_service)
        .add_service(kv)
        .add_service(pubsub)
        .add_service(admin)
        .add_service(reflection);
    let services = services.routes();

    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = match &listeners.http {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let http_task = match listeners.http {
        Some(listener) => {
            let gateway = crate::gateway::Gateway::new(services.clone(), &config.http)
                .map_err(|e| anyhow::anyhow!("building the HTTP gateway failed: {e}"))?;
            Some(tokio::spawn(crate::gateway::serve(
                std::sync::Arc::new(gateway),
                listener,
                stop_rx.clone(),
                config.shutdown_grace,
            )))
        }
        None => None,
    };
    info!(
        grpc = %grpc_addr,
        http = %http_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        config = %loaded.source,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "listening"
    );
    let mut drained = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_routes(services)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            async move {
                let _ = drained.wait_for(|down| *down).await;
            },
        );
    let server = tokio::spawn(server);

    shutdown.await;
    info!("shutting down: draining requests, then stopping patterns");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(config.shutdown_grace, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "gRPC server task failed"),
        Err(_) => warn!("requests still in flight after shutdown_grace; closing anyway"),
    }
    if let Some(t) = http_task {
        let _ = t.await;
    }
    supervisor.shutdown().await;
    health_task.abort();
    info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a SIGTERM that arrives
/// right after the proxy logged `listening` must stop it gracefully, not
/// kill it with the default disposition. Call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the proxy can still be stopped by
            // SIGKILL; patterns die with it through their parent-death signal.
            warn!("cannot install signal handlers");
            return futures::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "received"),
            _ = int.recv() => info!(signal = "SIGINT", "received"),
        }
    }
}
