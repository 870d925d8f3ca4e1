//! `CallBody`: a data call's response body. Either empty (a trailers-only
//! response the proxy made: the status is in the headers), or the
//! pattern's HTTP/2 response body passed through frame by frame — its
//! messages and trailers unchanged — with what the layers above asked for:
//!
//! - a deadline (`Deadline`, unary calls): when it fires the pattern's
//!   stream is reset and the call ends DEADLINE_EXCEEDED;
//! - an end signal (`Drain`, streams): the call ends UNAVAILABLE;
//! - the 4 MiB limit on every message the pattern sends;
//! - a stream that breaks, or ends without a status, ends with a status
//!   naming the pattern instead of leaving the client to guess.
//!
//! Dropping the body (the client went away) drops the pattern's stream,
//! which h2 resets with CANCEL: cancellation reaches the pattern.
//!
//! Layers that must know how a call ended (metrics, the call log, spans)
//! register an [`OnEnd`]: it runs once with the call's final status code,
//! read from the pattern's trailers (or trailers-only headers), from the
//! status the proxy ended the body with, or CANCELLED when the client went
//! away first.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::{Code, Status};

use super::errors;
use super::wire::{self, Frames};
use crate::error::ApiError;
use crate::upstream::Upstream;

type EndSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs once when a call ends, with its final status code.
pub type OnEnd = Box<dyn FnOnce(Code) + Send>;

#[derive(Default)]
pub struct CallBody {
    /// `None`: nothing (more) to read from the pattern.
    upstream: Option<Passing>,
    /// Data to send before `ending` (the part of a chunk before an
    /// oversized message).
    held: Option<Bytes>,
    /// Trailers that end the body once `held` is out.
    ending: Option<HeaderMap>,
    on_end: Option<OnEnd>,
    /// The status of a trailers-only answer, known from its headers.
    status_in_headers: Option<Code>,
}

struct Passing {
    recv: h2::RecvStream,
    reading_trailers: bool,
    frames: Frames,
    upstream: Upstream,
    namespace: Arc<str>,
    streaming: bool,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
    end_signal: Option<EndSignal>,
}

impl CallBody {
    /// The pattern's response body; `status_in_headers` is the status of a
    /// trailers-only answer.
    pub(super) fn upstream(
        recv: h2::RecvStream,
        status_in_headers: Option<Code>,
        upstream: Upstream,
        namespace: Arc<str>,
        streaming: bool,
    ) -> Self {
        CallBody {
            upstream: Some(Passing {
                recv,
                reading_trailers: false,
                frames: Frames::default(),
                upstream,
                namespace,
                streaming,
                deadline: None,
                end_signal: None,
            }),
            held: None,
            ending: None,
            on_end: None,
            status_in_headers,
        }
    }

    /// An empty body ending a trailers-only response with `code`.
    pub(super) fn ended(code: Code) -> Self {
        let mut body = CallBody::default();
        body.status_in_headers = Some(code);
        body
    }

    /// Runs `f` with the final status code when the call ends (after the
    /// ones registered before it).
    pub fn on_end(&mut self, f: OnEnd) {
        self.on_end = Some(match self.on_end.take() {
            None => f,
            Some(first) => Box::new(move |code| {
                first(code);
                f(code);
            }),
        });
    }

    /// The status of a trailers-only answer (the pattern's, or one the
    /// proxy made): the call failed before any message.
    pub fn trailers_only(&self) -> Option<Code> {
        self.status_in_headers
    }

    fn finish(&mut self, code: Code) {
        if let Some(f) = self.on_end.take() {
            f(code);
        }
    }

    /// Ends the call DEADLINE_EXCEEDED when `sleep` fires (`budget` is the
    /// deadline's length, for the message).
    pub(super) fn bound_by(&mut self, sleep: Pin<Box<Sleep>>, budget: Duration) {
        if let Some(p) = &mut self.upstream {
            p.deadline = Some((sleep, budget));
        }
    }

    /// Ends the call UNAVAILABLE (`PROXY_SHUTTING_DOWN`) when `signal` resolves.
    pub(super) fn end_when(&mut self, signal: EndSignal) {
        if let Some(p) = &mut self.upstream {
            p.end_signal = Some(signal);
        }
    }

    /// Stops reading from the pattern (its stream is reset) and ends the
    /// body with `error`'s status.
    fn end_with(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.upstream = None;
        self.finish(error.code);
        Poll::Ready(Some(Ok(Frame::trailers(wire::trailers(
            &error.to_status(),
        )))))
    }

    /// Passes the pattern's trailers on, noting their status.
    fn pass_trailers(&mut self, trailers: HeaderMap) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.upstream = None;
        self.finish(status_of(&trailers).unwrap_or(Code::Unknown));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// The status code in a header block, if it carries one.
pub(super) fn status_of(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

impl Drop for CallBody {
    fn drop(&mut self) {
        // Not ended by a status: a trailers-only answer sent without polling
        // the body, or a client that went away first.
        let code = self.status_in_headers.unwrap_or(Code::Cancelled);
        self.finish(code);
    }
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(data) = this.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = this.ending.take() {
            this.finish(status_of(&trailers).unwrap_or(Code::Unknown));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let Some(p) = this.upstream.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some((sleep, budget)) = &mut p.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            let e = errors::timed_out(&p.namespace, p.upstream.pattern(), p.streaming, *budget);
            return this.end_with(e);
        }
        if let Some(signal) = &mut p.end_signal
            && signal.as_mut().poll(cx).is_ready()
        {
            return this.end_with(errors::shutting_down());
        }
        if !p.reading_trailers {
            match p.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // The bytes are ours now: let the pattern send more.
                    let _ = p.recv.flow_control().release_capacity(data.len());
                    return match p.frames.feed(&data) {
                        Ok(()) => Poll::Ready(Some(Ok(Frame::data(data)))),
                        Err((at, len)) => {
                            let e =
                                errors::response_too_large(&p.namespace, p.upstream.pattern(), len);
                            if at == 0 {
                                return this.end_with(e);
                            }
                            this.upstream = None;
                            this.ending = Some(wire::trailers(&e.to_status()));
                            Poll::Ready(Some(Ok(Frame::data(data.slice(..at)))))
                        }
                    };
                }
                Poll::Ready(Some(Err(e))) => {
                    let e =
                        errors::stream_failed(&p.namespace, p.upstream.pattern(), p.streaming, &e);
                    return this.end_with(e);
                }
                Poll::Ready(None) => p.reading_trailers = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match p.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => this.pass_trailers(trailers),
            Poll::Ready(Ok(None)) if this.status_in_headers.is_some() => {
                this.upstream = None;
                let code = this.status_in_headers.unwrap_or(Code::Unknown);
                this.finish(code);
                Poll::Ready(None)
            }
            Poll::Ready(Ok(None)) => {
                let e =
                    errors::ended_without_status(&p.namespace, p.upstream.pattern(), p.streaming);
                this.end_with(e)
            }
            Poll::Ready(Err(e)) => {
                let e = errors::stream_failed(&p.namespace, p.upstream.pattern(), p.streaming, &e);
                this.end_with(e)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none()
            && self.ending.is_none()
            && self
                .upstream
                .as_ref()
                .is_none_or(|p| self.status_in_headers.is_some() && p.recv.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
