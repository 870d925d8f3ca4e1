//! `trellis.pattern.v1.Lifecycle`, and the [`Slot`] that holds the pattern:
//! the pattern is created by `Initialize`, after the server is already
//! answering, so every service reaches it through the slot.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tonic::{Request, Response, Status};
use trellis_proto::PATTERN_PROTOCOL_VERSION;
use trellis_proto::pattern::v1::lifecycle_server::Lifecycle;
use trellis_proto::pattern::v1::{
    InitializeRequest, InitializeResponse, MetricsRequest, MetricsResponse, StartRequest,
    StartResponse, StopRequest, StopResponse,
};

use crate::health::{self, HealthPublisher};
use crate::observe::Metrics;
use crate::shutdown::Shutdown;
use crate::{Error, InitContext, Pattern, config};

/// How long to drain when `Stop` names no grace period (and on a signal).
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// The longest grace period honoured; longer ones are cut to this.
pub(crate) const MAX_GRACE: Duration = Duration::from_secs(3600);

/// Where the pattern is in its life.
enum Phase<P> {
    /// Waiting for `Initialize`.
    Waiting,
    /// `Initialize` is running the pattern's `init`.
    Initializing,
    Initialized(Arc<P>),
    Started(Arc<P>),
    /// Shutdown began; the pattern (if any) was handed to the server to stop.
    Stopping,
}

/// The shared home of the pattern instance.
pub(crate) struct Slot<P> {
    phase: Mutex<Phase<P>>,
    /// The name the proxy gave in `Initialize`, for messages.
    name: std::sync::OnceLock<String>,
}

impl<P: Pattern> Slot<P> {
    pub(crate) fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Waiting),
            name: std::sync::OnceLock::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase<P>> {
        // The lock is only held for plain assignments, so a poisoned lock
        // still holds a consistent phase.
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims the right to initialize. The guard puts the slot back to
    /// waiting if it is dropped unfinished (init failed or the call was
    /// cancelled), so `Initialize` can be retried.
    fn begin_initialize(&self) -> Result<Initializing<'_, P>, Error> {
        let mut phase = self.phase();
        match *phase {
            Phase::Waiting => {
                *phase = Phase::Initializing;
                Ok(Initializing { slot: self })
            }
            Phase::Initializing => Err(Error::failed_precondition(
                "Initialize is already in progress; call it once per process",
            )),
            Phase::Initialized(_) | Phase::Started(_) => Err(Error::failed_precondition(
                "Initialize was already called and succeeded; a pattern is initialized once \
                 per process, so restart the pattern to apply a new configuration",
            )),
            Phase::Stopping => Err(self.stopping()),
        }
    }

    /// Marks the pattern started and returns it. Idempotent.
    fn start(&self) -> Result<Arc<P>, Error> {
        let mut phase = self.phase();
        match &*phase {
            Phase::Initialized(p) | Phase::Started(p) => {
                let p = Arc::clone(p);
                *phase = Phase::Started(Arc::clone(&p));
                Ok(p)
            }
            Phase::Waiting | Phase::Initializing => Err(Error::failed_precondition(
                "Start called before Initialize succeeded; call Initialize first",
            )),
            Phase::Stopping => Err(self.stopping()),
        }
    }

    /// The pattern, for a data call: `UNAVAILABLE` unless started.
    pub(crate) fn running(&self) -> Result<Arc<P>, Error> {
        match &*self.phase() {
            Phase::Started(p) => Ok(Arc::clone(p)),
            Phase::Stopping => Err(self.stopping()),
            _ => Err(Error::unavailable(
                "pattern not started yet: it serves data once the proxy has called \
                 Lifecycle Initialize and Start; retry shortly",
            )),
        }
    }

    /// The pattern, if started (for the health poller).
    pub(crate) fn started(&self) -> Option<Arc<P>> {
        self.running().ok()
    }

    /// Puts a ready pattern in place, as Initialize + Start would.
    #[cfg(test)]
    pub(crate) fn install_started(&self, pattern: P) {
        *self.phase() = Phase::Started(Arc::new(pattern));
    }

    /// Data calls that arrive while the pattern stops: UNAVAILABLE, naming
    /// it, so a client behind the proxy knows which pattern refused.
    fn stopping(&self) -> Error {
        match self.name.get() {
            Some(name) => Error::unavailable(format!(
                "pattern {name:?} is shutting down; retry once it has been restarted"
            )),
            None => {
                Error::unavailable("pattern is shutting down; retry once it has been restarted")
            }
        }
    }

    /// Enters `Stopping` and hands over the pattern, if one was created.
    pub(crate) fn begin_stop(&self) -> Option<Arc<P>> {
        match std::mem::replace(&mut *self.phase(), Phase::Stopping) {
            Phase::Initialized(p) | Phase::Started(p) => Some(p),
            _ => None,
        }
    }
}

/// Proof that this caller is initializing; see [`Slot::begin_initialize`].
struct Initializing<'a, P: Pattern> {
    slot: &'a Slot<P>,
}

impl<P: Pattern> Initializing<'_, P> {
    /// Stores the pattern. If shutdown began meanwhile, gives it back so
    /// the caller can stop it.
    fn finish(self, pattern: P) -> Result<(), P> {
        let mut phase = self.slot.phase();
        if matches!(*phase, Phase::Initializing) {
            *phase = Phase::Initialized(Arc::new(pattern));
            Ok(())
        } else {
            Err(pattern)
        }
    }
}

impl<P: Pattern> Drop for Initializing<'_, P> {
    fn drop(&mut self) {
        let mut phase = self.slot.phase();
        if matches!(*phase, Phase::Initializing) {
            *phase = Phase::Waiting;
        }
    }
}

/// The `Lifecycle` service for pattern `P`.
pub(crate) struct LifecycleService<P> {
    slot: Arc<Slot<P>>,
    health: Arc<HealthPublisher>,
    shutdown: Shutdown,
    /// The data services registered, for `InitializeResponse.interfaces`.
    interfaces: Vec<&'static str>,
    /// The name from `--name`, used when `Initialize` names none.
    name: String,
    /// What `Metrics` answers; handed to the pattern through its
    /// `InitContext`.
    metrics: Arc<Metrics>,
}

impl<P: Pattern> LifecycleService<P> {
    pub(crate) fn new(
        slot: Arc<Slot<P>>,
        health: Arc<HealthPublisher>,
        shutdown: Shutdown,
        interfaces: Vec<&'static str>,
        name: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            slot,
            health,
            shutdown,
            interfaces,
            name,
            metrics,
        }
    }

    async fn initialize(&self, req: InitializeRequest) -> Result<InitializeResponse, Error> {
        if req.protocol_version != PATTERN_PROTOCOL_VERSION {
            return Err(Error::failed_precondition(format!(
                "the proxy speaks pattern protocol version {}, this pattern speaks version \
                 {PATTERN_PROTOCOL_VERSION}; run a proxy and a pattern built for the same \
                 protocol version",
                req.protocol_version
            )));
        }
        let guard = self.slot.begin_initialize()?;
        let config = config::decode::<P::Config>(req.config)?;
        let name = if req.name.is_empty() {
            self.name.clone()
        } else {
            req.name
        };
        let _ = self.slot.name.set(name.clone());
        tracing::info!(pattern = %name, implementation = P::NAME, version = P::VERSION, "initializing");
        let ctx = InitContext::with_metrics(name, Arc::clone(&self.metrics));
        let pattern = P::init(config, ctx).await?;
        if let Err(pattern) = guard.finish(pattern) {
            pattern.stop().await;
            return Err(self.slot.stopping());
        }
        tracing::info!("initialized");
        Ok(InitializeResponse {
            name: P::NAME.to_string(),
            version: P::VERSION.to_string(),
            interfaces: self.interfaces.iter().map(|s| s.to_string()).collect(),
            stateful: P::STATEFUL,
        })
    }

    async fn start(&self) -> Result<StartResponse, Error> {
        let pattern = self.slot.start()?;
        tracing::info!("started");
        self.health.publish(health::check(&*pattern).await).await;
        Ok(StartResponse {})
    }

    fn stop(&self, req: StopRequest) -> StopResponse {
        let grace = req.grace.map_or(DEFAULT_GRACE, grace_period);
        self.shutdown.request(grace, "Lifecycle/Stop");
        StopResponse {}
    }
}

/// A `Stop` grace period: negative counts as zero, and it is capped at
/// [`MAX_GRACE`].
fn grace_period(grace: prost_types::Duration) -> Duration {
    let grace = grace.normalized();
    if grace.seconds < 0 || grace.nanos < 0 {
        return Duration::ZERO;
    }
    Duration::try_from(grace).map_or(MAX_GRACE, |g| g.min(MAX_GRACE))
}

/// Logs a failed lifecycle call (the proxy only sees the status) and converts it.
fn reply<T>(rpc: &str, result: Result<T, Error>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|err| {
        if !matches!(err, Error::Internal(_)) {
            tracing::warn!(rpc, error = %err, "lifecycle call failed");
        }
        Status::from(err)
    })
}

#[tonic::async_trait]
impl<P: Pattern> Lifecycle for LifecycleService<P> {
    async fn initialize(
        &self,
        request: Request<InitializeRequest>,
    ) -> Result<Response<InitializeResponse>, Status> {
        reply("Initialize", self.initialize(request.into_inner()).await)
    }

    async fn start(
        &self,
        _request: Request<StartRequest>,
    ) -> Result<Response<StartResponse>, Status> {
        reply("Start", self.start().await)
    }

    async fn stop(&self, request: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        Ok(Response::new(self.stop(request.into_inner())))
    }

    /// Answered in every phase, so a scrape never fails because of where
    /// the pattern is in its life.
    async fn metrics(
        &self,
        _request: Request<MetricsRequest>,
    ) -> Result<Response<MetricsResponse>, Status> {
        Ok(Response::new(MetricsResponse {
            text: self.metrics.encode(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_health::server::HealthReporter;

    use super::*;
    use crate::testing::{TestPattern, initialize_request};

    async fn service() -> (
        LifecycleService<TestPattern>,
        Arc<Slot<TestPattern>>,
        Shutdown,
    ) {
        service_of().await
    }

    async fn service_of<P: Pattern>() -> (LifecycleService<P>, Arc<Slot<P>>, Shutdown) {
        let slot = Arc::new(Slot::new());
        let health = Arc::new(
            HealthPublisher::new(HealthReporter::new(), &[trellis_proto::KEY_VALUE_SERVICE]).await,
        );
        let shutdown = Shutdown::new();
        let svc = LifecycleService::new(
            Arc::clone(&slot),
            health,
            shutdown.clone(),
            vec![trellis_proto::KEY_VALUE_SERVICE],
            "from-flag".into(),
            Arc::new(Metrics::new()),
        );
        (svc, slot, shutdown)
    }

    async fn initialize<P: Pattern>(
        svc: &LifecycleService<P>,
        req: InitializeRequest,
    ) -> Result<InitializeResponse, Status> {
        Lifecycle::initialize(svc, Request::new(req))
            .await
            .map(Response::into_inner)
    }

    async fn start(svc: &LifecycleService<TestPattern>) -> Result<StartResponse, Status> {
        Lifecycle::start(svc, Request::new(StartRequest {}))
            .await
            .map(Response::into_inner)
    }

    #[tokio::test]
    async fn initialize_answers_what_the_pattern_is() {
        let (svc, _, _) = service().await;
        let resp = initialize(&svc, initialize_request(&[])).await.unwrap();
        assert_eq!(resp.name, "test-pattern");
        assert_eq!(resp.version, "9.9.9");
        assert_eq!(resp.interfaces, ["trellis.data.v1.KeyValue"]);
        assert!(!resp.stateful, "STATEFUL defaults to false");
    }

    /// A pattern whose data lives in its own process.
    struct InMemory;

    impl Pattern for InMemory {
        type Config = serde::de::IgnoredAny;
        const NAME: &'static str = "in-memory";
        const VERSION: &'static str = "1.0.0";
        const STATEFUL: bool = true;

        async fn init(_: Self::Config, _: InitContext) -> Result<Self, Error> {
            Ok(InMemory)
        }
    }

    #[tokio::test]
    async fn initialize_says_a_pattern_is_stateful() {
        let (svc, _, _) = service_of::<InMemory>().await;
        let resp = initialize(&svc, initialize_request(&[])).await.unwrap();
        assert_eq!(resp.name, "in-memory");
        assert!(resp.stateful);
    }

    #[tokio::test]
    async fn initialize_passes_the_configured_name() {
        let (svc, slot, _) = service().await;
        initialize(&svc, initialize_request(&[])).await.unwrap();
        start(&svc).await.unwrap();
        assert_eq!(slot.running().unwrap().name, "cache");

        // An empty name falls back to --name.
        let (svc, slot, _) = service().await;
        let mut req = initialize_request(&[]);
        req.name.clear();
        initialize(&svc, req).await.unwrap();
        start(&svc).await.unwrap();
        assert_eq!(slot.running().unwrap().name, "from-flag");
    }

    #[tokio::test]
    async fn initialize_twice_is_a_failed_precondition() {
        let (svc, _, _) = service().await;
        initialize(&svc, initialize_request(&[])).await.unwrap();
        let err = initialize(&svc, initialize_request(&[])).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains("already called"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn wrong_protocol_version_names_both_versions() {
        let (svc, _, _) = service().await;
        let mut req = initialize_request(&[]);
        req.protocol_version = 2;
        let err = initialize(&svc, req).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("version 2"), "{}", err.message());
        assert!(err.message().contains("version 1"), "{}", err.message());
    }

    #[tokio::test]
    async fn bad_config_is_invalid_argument_naming_the_field_and_can_be_retried() {
        let (svc, _, _) = service().await;
        let req = initialize_request(&[(
            "limit",
            prost_types::value::Kind::StringValue("lots".into()),
        )]);
        let err = initialize(&svc, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "config.limit: invalid type: string \"lots\", expected u64"
        );
        // Nothing was created, so a corrected Initialize is accepted.
        initialize(&svc, initialize_request(&[])).await.unwrap();
    }

    #[tokio::test]
    async fn init_errors_reach_the_proxy() {
        let (svc, _, _) = service().await;
        let req = initialize_request(&[("limit", prost_types::value::Kind::NumberValue(0.0))]);
        let err = initialize(&svc, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("config.limit: "),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn a_cancelled_initialize_can_be_retried() {
        let (svc, _, _) = service().await;
        let req = initialize_request(&[("hang", prost_types::value::Kind::BoolValue(true))]);
        let call = initialize(&svc, req);
        // Poll it once (it blocks in init), then drop it, as tonic does when
        // the client goes away.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call)
                .await
                .is_err()
        );
        initialize(&svc, initialize_request(&[])).await.unwrap();
    }

    #[tokio::test]
    async fn start_before_initialize_is_a_failed_precondition() {
        let (svc, _, _) = service().await;
        let err = start(&svc).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn start_makes_the_pattern_available_and_is_idempotent() {
        let (svc, slot, _) = service().await;
        assert_eq!(
            slot.running().err().map(|e| e.code()),
            Some(Code::Unavailable)
        );
        initialize(&svc, initialize_request(&[])).await.unwrap();
        assert_eq!(
            slot.running().err().map(|e| e.code()),
            Some(Code::Unavailable)
        );
        start(&svc).await.unwrap();
        start(&svc).await.unwrap();
        assert!(slot.running().is_ok());
    }

    #[tokio::test]
    async fn stop_requests_shutdown_with_its_grace() {
        let (svc, slot, shutdown) = service().await;
        initialize(&svc, initialize_request(&[])).await.unwrap();
        start(&svc).await.unwrap();
        let req = StopRequest {
            grace: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
        };
        Lifecycle::stop(&svc, Request::new(req)).await.unwrap();
        assert_eq!(shutdown.requested().await, Duration::from_secs(2));

        // The server then takes the pattern out; data calls see UNAVAILABLE.
        assert!(slot.begin_stop().is_some());
        let err = slot.running().err().unwrap();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.to_string().contains("shutting down"));
        let err = initialize(&svc, initialize_request(&[])).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn metrics_answer_in_every_phase_with_what_the_pattern_recorded() {
        let (svc, _, _) = service().await;
        let metrics = async |svc: &LifecycleService<TestPattern>| {
            Lifecycle::metrics(svc, Request::new(MetricsRequest {}))
                .await
                .map(|r| r.into_inner().text)
        };
        let before = metrics(&svc).await.unwrap();
        assert!(
            before.contains("pattern_backend_operations_in_flight 0\n"),
            "{before}"
        );
        assert!(!before.contains("operation=\"INIT\""), "{before}");
        // The test pattern's init records one operation through its
        // InitContext: the handle it got is the one served.
        initialize(&svc, initialize_request(&[])).await.unwrap();
        let after = metrics(&svc).await.unwrap();
        assert!(
            after.contains(
                r#"pattern_backend_operation_duration_seconds_count{operation="INIT",outcome="ok"} 1"#
            ),
            "{after}"
        );
    }

    #[test]
    fn grace_periods_are_sane() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(grace_period(d(3, 0)), Duration::from_secs(3));
        assert_eq!(grace_period(d(-3, 0)), Duration::ZERO);
        assert_eq!(grace_period(d(i64::MIN, -1)), Duration::ZERO);
        assert_eq!(grace_period(d(i64::MAX, 999_999_999)), MAX_GRACE);
    }
}
