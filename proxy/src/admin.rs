//! `trellis.admin.v1.Admin`: reports on and controls the supervised
//! patterns through their handles. It never touches a process itself.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};
use trellis_proto::admin::v1 as pb;
use trellis_proto::admin::v1::admin_server::Admin;

use crate::dataplane::Circuits;
use crate::supervisor::process::Exit;
use crate::supervisor::{CommandError, PatternHandle, State, Status as PatternStatus};

pub struct AdminService {
    patterns: Vec<PatternHandle>,
    by_name: HashMap<String, usize>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    circuits: Option<Arc<Circuits>>,
}

impl AdminService {
    /// `shutdown` turns true when the proxy is stopping; watch streams end then.
    pub fn new(patterns: Vec<PatternHandle>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        let by_name = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name().to_string(), i))
            .collect();
        AdminService {
            patterns,
            by_name,
            shutdown,
            circuits: None,
        }
    }

    /// Reports the namespaces' circuit breakers with each pattern.
    pub fn with_circuits(mut self, circuits: Arc<Circuits>) -> Self {
        self.circuits = Some(circuits);
        self
    }

    /// A pattern as the API reports it, its circuits included.
    fn report(&self, handle: &PatternHandle) -> pb::Pattern {
        let mut p = to_proto(handle, &handle.status());
        if let Some(c) = &self.circuits {
            p.circuits = c
                .views(handle.namespaces().iter().map(String::as_str))
                .into_iter()
                .map(|v| pb::Circuit {
                    namespace: v.namespace,
                    state: v.state.to_string(),
                    trips: v.trips,
                    consecutive_failures: v.consecutive_failures,
                    opens_in: v
                        .opens_in
                        .and_then(|d| prost_types::Duration::try_from(d).ok()),
                })
                .collect();
        }
        p
    }

    fn find(&self, name: &str) -> Result<&PatternHandle, Status> {
        self.by_name
            .get(name)
            .map(|&i| &self.patterns[i])
            .ok_or_else(|| {
                let known: Vec<&str> = self.patterns.iter().map(|p| p.name()).collect();
                crate::error::ApiError::new(
                    tonic::Code::NotFound,
                    "PATTERN_NOT_FOUND",
                    format!(
                        "no pattern is named {name:?}; known patterns: {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
                .meta("pattern", name)
                .into()
            })
    }

    fn action(
        &self,
        handle: &PatternHandle,
        result: Result<String, CommandError>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        match result {
            Ok(message) => Ok(Response::new(pb::PatternActionResponse {
                message,
                pattern: Some(self.report(handle)),
            })),
            Err(e @ CommandError::AlreadyRunning(_)) => Err(crate::error::ApiError::new(
                tonic::Code::FailedPrecondition,
                "ALREADY_RUNNING",
                e.to_string(),
            )
            .into()),
            Err(e @ CommandError::ShuttingDown) => Err(crate::error::ApiError::new(
                tonic::Code::Unavailable,
                "SHUTTING_DOWN",
                e.to_string(),
            )
            .into()),
        }
    }
}

pub fn state_to_proto(state: State) -> pb::PatternState {
    match state {
        State::Starting => pb::PatternState::Starting,
        State::Serving => pb::PatternState::Serving,
        State::NotServing => pb::PatternState::NotServing,
        State::Crashed => pb::PatternState::Crashed,
        State::Stopping => pb::PatternState::Stopping,
        State::Stopped => pb::PatternState::Stopped,
        State::Failed => pb::PatternState::Failed,
    }
}

pub fn to_proto(handle: &PatternHandle, s: &PatternStatus) -> pb::Pattern {
    pb::Pattern {
        name: handle.name().to_string(),
        state: state_to_proto(s.state) as i32,
        pid: s.pid.unwrap_or(0),
        endpoint: s
            .endpoint
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default(),
        restarts: s.restarts,
        last_exit: s.last_exit.map(|e| pb::ExitStatus {
            status: Some(match e {
                Exit::Code(c) => pb::exit_status::Status::Code(c),
                Exit::Signal(s) => pb::exit_status::Status::Signal(s),
            }),
            description: e.to_string(),
        }),
        last_error: s.last_error.clone().unwrap_or_default(),
        start_time: s.started_at.map(prost_types::Timestamp::from),
        namespaces: handle.namespaces().to_vec(),
        version: s.version.clone(),
        interfaces: s.interfaces.clone(),
        stderr_tail: handle.stderr_tail(),
        circuits: Vec::new(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::PatternEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_patterns(
        &self,
        _req: Request<pb::ListPatternsRequest>,
    ) -> Result<Response<pb::ListPatternsResponse>, Status> {
        let patterns = self.patterns.iter().map(|h| self.report(h)).collect();
        Ok(Response::new(pb::ListPatternsResponse { patterns }))
    }

    async fn get_pattern(
        &self,
        req: Request<pb::GetPatternRequest>,
    ) -> Result<Response<pb::Pattern>, Status> {
        let h = self.find(&req.get_ref().name)?;
        Ok(Response::new(self.report(h)))
    }

    async fn start_pattern(
        &self,
        req: Request<pb::PatternActionRequest>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        let h = self.find(&req.get_ref().name)?;
        self.action(h, h.start().await)
    }

    async fn stop_pattern(
        &self,
        req: Request<pb::PatternActionRequest>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        let h = self.find(&req.get_ref().name)?;
        self.action(h, h.stop().await)
    }

    async fn restart_pattern(
        &self,
        req: Request<pb::PatternActionRequest>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        let h = self.find(&req.get_ref().name)?;
        self.action(h, h.restart().await)
    }

    type WatchPatternsStream = EventStream;

    async fn watch_patterns(
        &self,
        req: Request<pb::WatchPatternsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let name = req.into_inner().name;
        let selected: Vec<PatternHandle> = if name.is_empty() {
            self.patterns.clone()
        } else {
            vec![self.find(&name)?.clone()]
        };
        let streams = selected.into_iter().map(|h| {
            // Subscribe before taking the snapshot, so no change falls between.
            let events = BroadcastStream::new(h.events());
            let first = pb::PatternEvent {
                time: Some(prost_types::Timestamp::from(SystemTime::now())),
                previous_state: pb::PatternState::Unspecified as i32,
                pattern: Some(to_proto(&h, &h.status())),
            };
            let changes = events.filter_map(move |e| {
                let event = match e {
                    Ok(e) => Some(Ok(pb::PatternEvent {
                        time: Some(prost_types::Timestamp::from(e.time)),
                        previous_state: state_to_proto(e.previous) as i32,
                        pattern: Some(to_proto(&h, &e.status)),
                    })),
                    Err(BroadcastStreamRecvError::Lagged(n)) => {
                        tracing::warn!(
                            pattern = h.name(),
                            missed = n,
                            "a WatchPatterns client fell behind"
                        );
                        None
                    }
                };
                futures::future::ready(event)
            });
            futures::stream::once(futures::future::ready(Ok(first))).chain(changes)
        });
        let mut shutdown = self.shutdown.clone();
        let stop = async move {
            let _ = shutdown.wait_for(|down| *down).await;
        };
        let events = futures::stream::select_all(streams).take_until(stop);
        Ok(Response::new(Box::pin(events)))
    }
}
