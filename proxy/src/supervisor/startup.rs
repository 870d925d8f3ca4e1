//! Bringing one pattern process up: handshake → connect (exponential
//! backoff) → Initialize → Start → the data connection → a first SERVING
//! health check, all within `startup_timeout`. It owns only the child's
//! stdout, so the owner task keeps waiting on the child and its commands
//! meanwhile, and cancels the start by dropping it.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::io::BufReader;
use tokio::process::ChildStdout;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tracing::{Instrument, debug, warn};
use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;
use trellis_proto::pattern::v1::{InitializeRequest, InitializeResponse, StartRequest};

use super::handshake::{self, Endpoint};
use super::output;
use super::probe::{Unhealthy, check};
use super::secret::{Control, Secret};
use crate::config::PatternConfig;
use crate::upstream::Upstream;

/// A process that answered its handshake, Initialize, Start and a first
/// SERVING health check.
#[derive(Clone)]
pub(super) struct Up {
    pub(super) endpoint: Endpoint,
    /// The control channel: Lifecycle and health, each call with the
    /// process's secret.
    pub(super) channel: Control,
    /// The data connection the data plane forwards calls on.
    pub(super) upstream: Upstream,
    pub(super) info: InitializeResponse,
}

/// Why bringing a process up failed, at which step.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    #[error("the child's stdout was not piped")]
    NoStdout,
    #[error("{0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("cannot connect to {endpoint}: {error}")]
    Connect {
        endpoint: Endpoint,
        error: tonic::transport::Error,
    },
    /// `INVALID_ARGUMENT` from Initialize: a restart cannot fix it.
    #[error(
        "the pattern rejected its configuration (the `config:` block of pattern {pattern:?}): \
         {message}"
    )]
    RejectedConfig { pattern: String, message: String },
    #[error("Initialize failed: {0}")]
    Initialize(tonic::Status),
    /// The pattern said it is stateful, and its entry asks for replicas:
    /// a restart cannot fix it.
    #[error(
        "{pattern:?} declares itself stateful (it keeps its data in its own process), so the \
         pattern's {replicas} replicas would each hold different data; set `replicas: 1` for it"
    )]
    Stateful { pattern: String, replicas: u32 },
    #[error("Start failed: {0}")]
    Start(tonic::Status),
    #[error("opening the data connection failed: {0}")]
    DataConnection(String),
    /// `startup_timeout` passed before a SERVING answer, and the pattern
    /// never answered its health check at all.
    #[error("not ready within startup_timeout")]
    Timeout,
}

/// How a start-up that did not fail ended.
pub(super) enum BroughtUp {
    Serving(Up),
    /// Up and answering, but NOT_SERVING when `startup_timeout` came: kept,
    /// not routable, until its health check passes.
    NotServing(Up),
}

impl StartError {
    /// Whether starting again may succeed: everything but a configuration
    /// the pattern rejected (fixing it takes an operator or a reload).
    pub(super) fn is_retryable(&self) -> bool {
        !matches!(
            self,
            StartError::RejectedConfig { .. } | StartError::Stateful { .. }
        )
    }
}

/// Handshake → connect → Initialize → Start → first SERVING, within
/// `startup_timeout`. Owns nothing but the child's stdout, so the owner can
/// keep waiting on the child and its commands while this runs (and drop it
/// to cancel the start).
pub(super) async fn bring_up(
    cfg: Arc<PatternConfig>,
    stdout: Option<ChildStdout>,
    secret: Secret,
) -> Result<BroughtUp, StartError> {
    let deadline = Instant::now() + cfg.startup_timeout;
    let steps = async {
        let stdout = stdout.ok_or(StartError::NoStdout)?;
        let mut reader = BufReader::new(stdout);
        let endpoint = handshake::read(&mut reader).await?;
        tokio::spawn(output::drain_stdout(reader).in_current_span());
        debug!(endpoint = %endpoint, "handshake received");

        let channel = secret.control(connect(&endpoint).await?);
        let mut lifecycle = LifecycleClient::new(channel.clone());
        let init = InitializeRequest {
            name: cfg.name.clone(),
            config: Some(trellis_proto::json::to_struct(&cfg.config)),
            protocol_version: trellis_proto::PATTERN_PROTOCOL_VERSION,
        };
        let info = match lifecycle.initialize(init).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                return Err(StartError::RejectedConfig {
                    pattern: cfg.name.clone(),
                    message: s.message().to_string(),
                });
            }
            Err(s) => return Err(StartError::Initialize(s)),
        };
        if info.stateful && cfg.replicas > 1 {
            return Err(StartError::Stateful {
                pattern: cfg.name.clone(),
                replicas: cfg.replicas,
            });
        }
        lifecycle
            .start(StartRequest {})
            .await
            .map_err(StartError::Start)?;
        let upstream = Upstream::connect(&cfg.name, endpoint.clone(), &info.interfaces, &secret)
            .await
            .map_err(|e| StartError::DataConnection(e.to_string()))?;
        Ok(Up {
            endpoint,
            channel,
            upstream,
            info,
        })
    };
    let up = tokio::time::timeout_at(deadline, steps)
        .await
        .map_err(|_| StartError::Timeout)??;

    // The first SERVING answer makes the pattern routable. Poll briskly: a
    // pattern built on the SDK is SERVING as soon as Start returns.
    let mut health = HealthClient::new(up.channel.clone());
    let pause = cfg.health.interval.min(Duration::from_millis(50));
    let mut answered_not_serving = false;
    let first_serving = tokio::time::timeout_at(deadline, async {
        loop {
            match check(&mut health, cfg.health.timeout).await {
                Ok(()) => return,
                Err(why) => {
                    if matches!(why, Unhealthy::NotServing(_)) {
                        answered_not_serving = true;
                    }
                    debug!(%why, "not serving yet");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    })
    .await;
    match first_serving {
        Ok(()) => Ok(BroughtUp::Serving(up)),
        Err(_) if answered_not_serving => Ok(BroughtUp::NotServing(up)),
        Err(_) => Err(StartError::Timeout),
    }
}

/// Connects with exponential backoff (100 ms doubling to 2 s, 8 attempts);
/// each failed attempt is logged with the delay before the next.
async fn connect(endpoint: &Endpoint) -> Result<Channel, StartError> {
    let attempt = || async { open_channel(endpoint).await };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_factor(2.0)
                .with_max_times(8),
        )
        .notify(|e: &tonic::transport::Error, delay: Duration| {
            warn!(endpoint = %endpoint, error = %e, delay_ms = delay.as_millis() as u64, "connect failed; retrying");
        })
        .await
        .map_err(|error| StartError::Connect {
            endpoint: endpoint.clone(),
            error,
        })
}

async fn open_channel(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect()
                .await
        }
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused by the connector.
            tonic::transport::Endpoint::from_static("http://pattern.invalid")
                .connect_with_connector(tower::service_fn(move |_: http_uri::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        }
    }
}

mod http_uri {
    pub use tonic::codegen::http::Uri;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rejected_configuration_is_not_worth_a_restart() {
        let rejected = StartError::RejectedConfig {
            pattern: "mem".into(),
            message: "config.x: must be a number".into(),
        };
        assert!(!rejected.is_retryable());
        assert!(
            rejected.to_string().contains("pattern \"mem\""),
            "{rejected}"
        );
        for e in [
            StartError::NoStdout,
            StartError::Initialize(tonic::Status::unavailable("backend down")),
            StartError::Start(tonic::Status::internal("boom")),
            StartError::DataConnection("refused".into()),
            StartError::Handshake(handshake::HandshakeError::Eof),
            StartError::Timeout,
        ] {
            assert!(e.is_retryable(), "{e}");
        }
    }
}
