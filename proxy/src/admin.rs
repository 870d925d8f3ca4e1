//! `trellis.admin.v1.Admin`: reports on and controls the supervised
//! patterns through their handles. It never touches a process itself.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};
use trellis_proto::admin::v1 as pb;
use trellis_proto::admin::v1::admin_server::Admin;

use crate::dataplane::DataPlane;
use crate::reload::{Operator, ReloadError, Reloader};
use crate::shutdown::CancellationToken;
use crate::supervisor::process::Exit;
use crate::supervisor::{CommandError, PatternHandle, Roster, State, Status as PatternStatus};

pub struct AdminService {
    reloader: Reloader,
    closing: CancellationToken,
    data: Option<DataPlane>,
    /// Set by `Drain`: the proxy starts its shutdown, as on SIGTERM.
    drain: Option<Arc<tokio::sync::Notify>>,
}

impl AdminService {
    /// Watch streams end when `closing` is cancelled (the doors close).
    pub fn new(reloader: Reloader, closing: CancellationToken) -> Self {
        AdminService {
            reloader,
            closing,
            data: None,
            drain: None,
        }
    }

    /// Reports the namespaces' circuit breakers with each pattern.
    pub fn with_data_plane(mut self, data: DataPlane) -> Self {
        self.data = Some(data);
        self
    }

    /// `Drain` notifies `drain`.
    pub fn with_drain(mut self, drain: Arc<tokio::sync::Notify>) -> Self {
        self.drain = Some(drain);
        self
    }

    /// A pattern as the API reports it, its circuits included.
    fn report(&self, handle: &PatternHandle) -> pb::Pattern {
        let mut p = to_proto(handle, &handle.status());
        if let Some(data) = &self.data {
            p.circuits = data
                .circuits()
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

    /// The process named `name`.
    fn find(&self, name: &str) -> Result<PatternHandle, Status> {
        let roster = self.reloader.roster().borrow().clone();
        if let Some(h) = roster.get(name) {
            return Ok(h.clone());
        }
        Err(not_found(name, &roster))
    }

    /// The processes `name` means: one process, or every replica of the
    /// pattern of that name.
    fn select(&self, name: &str) -> Result<Vec<PatternHandle>, Status> {
        let roster = self.reloader.roster().borrow().clone();
        let found = roster.select(name);
        if found.is_empty() {
            return Err(not_found(name, &roster));
        }
        Ok(found)
    }

    fn action(
        &self,
        name: &str,
        result: Result<String, CommandError>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        match result {
            // Reported from the roster now: a blue/green restart put a new
            // handle there.
            Ok(message) => {
                let replicas: Vec<pb::Pattern> =
                    self.select(name)?.iter().map(|h| self.report(h)).collect();
                Ok(Response::new(pb::PatternActionResponse {
                    message,
                    pattern: replicas.first().cloned(),
                    replicas,
                }))
            }
            Err(CommandError::NotFound(_)) => {
                Err(not_found(name, &self.reloader.roster().borrow().clone()))
            }
            Err(e @ CommandError::NotReplaced(_)) => Err(crate::error::ApiError::new(
                tonic::Code::Unavailable,
                "NOT_REPLACED",
                e.to_string(),
            )
            .meta("pattern", name)
            .into()),
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

fn not_found(name: &str, roster: &Roster) -> Status {
    let replicas = roster.replicas_of(name);
    let message = if replicas.is_empty() {
        let known: Vec<&str> = roster.patterns().iter().map(|p| p.name()).collect();
        format!(
            "no pattern is named {name:?}; known patterns: {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )
    } else {
        let names: Vec<&str> = replicas.iter().map(|p| p.name()).collect();
        format!(
            "pattern {name:?} runs {} replicas, each a process of its own: {}; ask for one \
             of them, or list them all",
            names.len(),
            names.join(", ")
        )
    };
    crate::error::ApiError::new(tonic::Code::NotFound, "PATTERN_NOT_FOUND", message)
        .meta("pattern", name)
        .into()
}

/// A refused reload as a status: INVALID_ARGUMENT with one field
/// violation per problem, or UNAVAILABLE when a new process did not serve.
fn reload_refused(e: &ReloadError) -> Status {
    match e {
        ReloadError::Invalid { problems, .. } => {
            let mut err = crate::error::ApiError::new(
                tonic::Code::InvalidArgument,
                "INVALID_CONFIG",
                e.to_string(),
            );
            for p in problems {
                err = err.violation(&p.field, &p.message);
            }
            err.into()
        }
        ReloadError::NotServing { pattern, .. } => {
            crate::error::ApiError::new(tonic::Code::Unavailable, "NOT_REPLACED", e.to_string())
                .meta("pattern", pattern)
                .into()
        }
        ReloadError::ShuttingDown => {
            crate::error::ApiError::new(tonic::Code::Unavailable, "SHUTTING_DOWN", e.to_string())
                .into()
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
        pattern: handle.pattern().to_string(),
        replica: handle.replica(),
        calls: handle.load().calls(),
        in_flight: handle.load().in_flight(),
        ejected: handle.load().ejected(s.pid),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::PatternEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_patterns(
        &self,
        _req: Request<pb::ListPatternsRequest>,
    ) -> Result<Response<pb::ListPatternsResponse>, Status> {
        let roster = self.reloader.roster().borrow().clone();
        let patterns = roster.patterns().iter().map(|h| self.report(h)).collect();
        Ok(Response::new(pb::ListPatternsResponse { patterns }))
    }

    async fn get_pattern(
        &self,
        req: Request<pb::GetPatternRequest>,
    ) -> Result<Response<pb::Pattern>, Status> {
        let h = self.find(&req.get_ref().name)?;
        Ok(Response::new(self.report(&h)))
    }

    async fn start_pattern(
        &self,
        req: Request<pb::PatternActionRequest>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        let name = &req.get_ref().name;
        self.select(name)?;
        self.action(name, self.reloader.operator(name, Operator::Start).await)
    }

    async fn stop_pattern(
        &self,
        req: Request<pb::PatternActionRequest>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        let name = &req.get_ref().name;
        self.select(name)?;
        self.action(name, self.reloader.operator(name, Operator::Stop).await)
    }

    async fn restart_pattern(
        &self,
        req: Request<pb::PatternActionRequest>,
    ) -> Result<Response<pb::PatternActionResponse>, Status> {
        let name = &req.get_ref().name;
        self.select(name)?;
        self.action(name, self.reloader.operator(name, Operator::Restart).await)
    }

    type WatchPatternsStream = EventStream;

    async fn watch_patterns(
        &self,
        req: Request<pb::WatchPatternsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let name = req.into_inner().name;
        let selected: Vec<PatternHandle> = if name.is_empty() {
            self.reloader.roster().borrow().patterns().to_vec()
        } else {
            self.select(&name)?
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
        let stop = self.closing.clone().cancelled_owned();
        let events = futures::stream::select_all(streams).take_until(stop);
        Ok(Response::new(Box::pin(events)))
    }

    async fn reload(
        &self,
        _req: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let applied = self
            .reloader
            .reload()
            .await
            .map_err(|e| reload_refused(&e))?;
        Ok(Response::new(pb::ReloadResponse {
            message: applied.to_string(),
            added: applied.added,
            removed: applied.removed,
            replaced: applied.replaced,
            unchanged: applied.unchanged,
            source: applied.source,
        }))
    }

    async fn drain(
        &self,
        _req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let Some(drain) = &self.drain else {
            return Err(Status::unimplemented(
                "this proxy cannot be drained over its API",
            ));
        };
        drain.notify_one();
        Ok(Response::new(pb::DrainResponse {
            message: "draining: readiness is off now; the doors close after drain_delay, then \
                      patterns stop"
                .into(),
        }))
    }
}
