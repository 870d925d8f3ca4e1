//! Health probing of a running pattern process: one `Check` (start-up's
//! first SERVING, and the periodic probe that catches a hung process) and
//! the poller that reports to the owner task from a `Health/Watch` stream
//! and a `Check` every interval at once.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::secret::Control;

/// Why a health check did not pass.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Unhealthy {
    /// The pattern answered, but not SERVING (e.g. its backend is down).
    NotServing(String),
    /// No answer: timeout, refused connection, transport error.
    NoAnswer(String),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::NotServing(w) | Unhealthy::NoAnswer(w) => f.write_str(w),
        }
    }
}

pub(super) async fn check(
    client: &mut HealthClient<Control>,
    limit: Duration,
) -> Result<(), Unhealthy> {
    let req = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(limit, client.check(req)).await {
        Err(_) => Err(Unhealthy::NoAnswer(format!(
            "no answer within {}",
            humantime::format_duration(limit)
        ))),
        Ok(Err(status)) => Err(Unhealthy::NoAnswer(format!(
            "{}: {}",
            status.code(),
            status.message()
        ))),
        Ok(Ok(resp)) => serving_status(resp.into_inner().status()),
    }
}

fn serving_status(s: ServingStatus) -> Result<(), Unhealthy> {
    match s {
        ServingStatus::Serving => Ok(()),
        other => Err(Unhealthy::NotServing(format!(
            "health status is {}",
            other.as_str_name()
        ))),
    }
}

/// Reports health to the owner two ways at once: a `Health/Watch` stream, so
/// a change is seen the moment the pattern reports it, and a `Check` every
/// `interval`, which also catches a hung process (a watch stream just goes
/// quiet). A pattern without `Watch` (UNIMPLEMENTED) gets polling alone.
pub(super) async fn poll_health(
    channel: Control,
    interval: Duration,
    limit: Duration,
    results: mpsc::Sender<Result<(), Unhealthy>>,
) {
    let watch = {
        let results = results.clone();
        let mut client = HealthClient::new(channel.clone());
        async move {
            loop {
                let req = HealthCheckRequest {
                    service: String::new(),
                };
                match client.watch(req).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while let Ok(Some(msg)) = stream.message().await {
                            if results.send(serving_status(msg.status())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(s) if s.code() == tonic::Code::Unimplemented => return,
                    Err(_) => {}
                }
                // The stream broke; the periodic check reports the cause.
                tokio::time::sleep(interval).await;
            }
        }
    };
    let poll = async move {
        let mut client = HealthClient::new(channel);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; bring_up just checked
        loop {
            ticker.tick().await;
            let r = check(&mut client, limit).await;
            if results.send(r).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(watch, poll);
}
