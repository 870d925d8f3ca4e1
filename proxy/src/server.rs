//! The proxy assembled: supervisor, health reporter, data plane behind the
//! data doors (gRPC and HTTP/JSON), the admin API behind the admin door.
//! [`run`]
//! takes already-bound listeners and a shutdown future, so tests can run it
//! on port 0.

use std::future::Future;

use tokio::net::TcpListener;
use tracing::{info, warn};
use trellis_proto::admin::v1::admin_server::AdminServer;

use crate::admin::AdminService;
use crate::config::Loaded;
use std::sync::Arc;

use crate::dataplane::{DataPlane, Methods, Telemetry};
use crate::doors::{Doors, Services, Shown, Surface};
use crate::front::FrontDoor;
use crate::gateway::Api;
use crate::gateway::mixed::AdminDoor;
use crate::health;
use crate::liveness;
use crate::metrics::Metrics;
use crate::notify;
use crate::reload::Reloader;
use crate::shutdown::{CancellationToken, Grace};
use crate::supervisor::Supervisor;

/// The proxy's bound listeners.
pub struct Listeners {
    pub grpc: TcpListener,
    /// The HTTP/JSON gateway's; `None` turns the gateway off.
    pub http: Option<TcpListener>,
    /// The admin door's; `None` turns the admin API off.
    pub admin: Option<TcpListener>,
}

/// Serves until `shutdown` resolves, then drains the front doors (bounded
/// by `shutdown_grace`) and stops every pattern.
pub async fn run(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = loaded.config.clone();
    let supervisor = Supervisor::start(&loaded);
    let roster = supervisor.roster();
    let patterns = supervisor.current().patterns().to_vec();

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(health::Phase::Running);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let health_task = tokio::spawn(health::report(
        reporter.clone(),
        roster.clone(),
        phase_rx.clone(),
        started_tx,
    ));
    let watchdog = notify::watchdog_interval();
    if notify::enabled() {
        info!(watchdog = ?watchdog, "notifying the service manager (NOTIFY_SOCKET is set)");
    }
    // READY=1 once every pattern has finished starting (serving or not).
    let ready_task = tokio::spawn(ready_when_started(started_rx, roster.clone()));

    // Cancelled when the doors start to close.
    let closing = CancellationToken::new();
    // Turns true on a second signal: every remaining wait ends at once.
    let hurry = CancellationToken::new();
    let grace = Grace::new(config.shutdown_grace, hurry.clone());
    let methods = Methods::from_descriptors().map_err(anyhow::Error::msg)?;
    let namespaces: Vec<(String, String)> = config
        .namespaces
        .iter()
        .map(|n| (n.name.clone(), n.pattern.clone()))
        .collect();
    let metrics = config.telemetry.metrics.then(|| {
        Arc::new(Metrics::new(
            &namespaces,
            &methods.full_names(),
            Some(roster.clone()),
        ))
    });
    let tracing = crate::traces::init(&config.telemetry.traces).map_err(anyhow::Error::msg)?;
    let telemetry = Arc::new(Telemetry::new(
        metrics.clone(),
        tracing.as_ref().map(|t| t.tracer()),
        config.telemetry.call_log.clone(),
        crate::reload::labels(&config),
    ));
    // Validated with the configuration; read again here (token files).
    let rules = crate::access::Rules::of(&config).map_err(|problems| {
        anyhow::Error::msg(
            crate::config::ConfigError {
                source_name: loaded.source.to_string(),
                problems,
            }
            .to_string(),
        )
    })?;
    if rules.is_some() {
        info!("access control is on: data and admin calls need an identity with a role");
    }
    let access = crate::access::Access::new(rules);
    let data = DataPlane::from_config(
        methods,
        &config,
        &patterns,
        closing.clone(),
        telemetry,
        access.clone(),
    );
    let reloader = Reloader::start(supervisor, loaded.clone(), data.clone(), closing.clone());
    let liveness_task = tokio::spawn(liveness::run(
        {
            let (roster, reloader) = (roster.clone(), reloader.clone());
            move || liveness::owners(roster.borrow().patterns(), &reloader.config())
        },
        liveness::Settings::new(watchdog),
        phase_rx,
        reporter,
    ));
    let drain = Arc::new(tokio::sync::Notify::new());
    let admin = AdminServer::new(
        AdminService::new(reloader.clone(), closing.clone())
            .with_data_plane(data.clone())
            .with_drain(drain.clone()),
    );
    // The data doors serve data and health; the admin door the admin API,
    // reflection and health. Each pair (gRPC, HTTP) runs the same code: the
    // gateway calls its front door in-process.
    let mut data_services = tonic::service::RoutesBuilder::default();
    data_services.add_service(health_service.clone());
    // A single-port setup: the admin API on the data doors too, each call
    // checked for the admin role (validation makes `access:` grant one).
    let data_api = if config.listen.admin_on_data_doors {
        data_services.add_service(admin.clone());
        crate::reflection::add_to(&mut data_services)?;
        Api::All
    } else {
        Api::Data
    };
    let front = FrontDoor::new(data, data_services.routes());
    let mut admin_services = tonic::service::RoutesBuilder::default();
    admin_services
        .add_service(health_service)
        .add_service(admin);
    crate::reflection::add_to(&mut admin_services)?;
    let admin_front = FrontDoor::without_data(admin_services.routes(), access);

    // Built whether or not they listen: a reload may open their doors.
    let gateway = |api, front: &FrontDoor| {
        crate::gateway::Gateway::new(api, front.clone(), &config.http, metrics.clone())
            .map(Arc::new)
            .map_err(|e| anyhow::anyhow!("building the HTTP gateway failed: {e}"))
    };
    let services = Services {
        gateway: gateway(data_api, &front)?,
        admin: Arc::new(AdminDoor::new(
            admin_front.clone(),
            gateway(Api::Admin, &admin_front)?,
        )),
        front,
    };
    let mut open = vec![(Surface::Grpc, listeners.grpc)];
    open.extend(listeners.http.map(|l| (Surface::Http, l)));
    open.extend(listeners.admin.map(|l| (Surface::Admin, l)));
    // TLS on every door, when configured; its files are watched for a
    // rotation until the proxy stops.
    let tls = config
        .tls
        .as_ref()
        .map(crate::tls::Tls::load)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.source))?;
    let tls_watch = tls.clone().map(|t| tokio::spawn(t.watch()));
    let doors = Doors::open(services, tls.clone(), grace, open)?;
    let addrs = doors.addrs();
    info!(
        grpc = %Shown(addrs.get(Surface::Grpc)),
        http = %Shown(addrs.get(Surface::Http)),
        admin = %Shown(addrs.get(Surface::Admin)),
        config = %loaded.source,
        tls = tls.is_some(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "listening"
    );
    reloader.doors(doors).await;

    // SIGHUP reloads, until the proxy stops.
    let hangups = tokio::spawn(reload_on_hangup(reloader.clone()));
    tokio::select! {
        _ = shutdown => {}
        _ = drain.notified() => info!("drain requested over the admin API"),
    }
    hangups.abort();
    ready_task.abort();
    if let Some(t) = tls_watch {
        t.abort();
    }
    notify::stopping("stopping: draining calls, then stopping patterns");
    // Installed now, so a second signal is never missed.
    let again = signal();
    let hurry_for_delay = hurry.clone();
    let second = tokio::spawn(async move {
        again.await;
        info!("a second signal: skipping the remaining waits");
        hurry.cancel();
    });
    // Readiness off first, still serving, so load balancers stop sending
    // calls before the doors close; a second signal skips the wait.
    let _ = phase_tx.send(health::Phase::Draining);
    // A reload may have changed it.
    let drain_delay = reloader.config().drain_delay;
    info!(
        ?drain_delay,
        "shutting down: health \"\" is NOT_SERVING; calls are served until the drain delay ends"
    );
    Grace::new(drain_delay, hurry_for_delay)
        .bound(std::future::pending::<()>())
        .await;
    info!("closing the doors: draining requests, then stopping patterns");
    let _ = phase_tx.send(health::Phase::Closing);
    closing.cancel();
    // The doors close (GOAWAY; calls in flight finish within
    // shutdown_grace), then the patterns stop.
    reloader.shutdown().await;
    second.abort();
    let _ = health_task.await;
    let _ = liveness_task.await;
    if let Some(t) = tracing {
        // Flushing blocks on the collector: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    info!("stopped");
    Ok(())
}

/// Reloads the configuration on every SIGHUP (as nginx, HAProxy and
/// systemd's `ExecReload` expect); the outcome is logged by the reloader.
async fn reload_on_hangup(reloader: Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler: reload with `trellis reload`");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        info!(signal = "SIGHUP", "received: reloading the configuration");
        let _ = reloader.reload().await;
    }
}

/// Tells the service manager `READY=1` once `started` fires, with a status
/// line saying which patterns serve.
async fn ready_when_started(
    started: tokio::sync::oneshot::Receiver<()>,
    roster: tokio::sync::watch::Receiver<Arc<crate::supervisor::Roster>>,
) {
    if started.await.is_err() {
        return;
    }
    let patterns = roster.borrow().patterns().to_vec();
    let not_serving: Vec<String> = patterns
        .iter()
        .filter_map(|p| {
            let state = p.with_status(|s| s.state);
            (state != crate::supervisor::State::Serving).then(|| format!("{} {state}", p.name()))
        })
        .collect();
    let text = if not_serving.is_empty() {
        format!("serving; {} patterns serving", patterns.len())
    } else {
        format!("serving; not serving: {}", not_serving.join(", "))
    };
    info!(status = %text, "started");
    notify::ready(&text);
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
