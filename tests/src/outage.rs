//! The backend-outage scenarios the Redis and PostgreSQL tests share: a
//! backend dies under a steady writer and comes back, or dies while another
//! namespace must keep serving. Each backend says how it dies and returns
//! through [`Backend`]; the assertions are the same for all of them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1::PatternState;
use trellis_proto::data::v1::{DeleteRequest, ListRequest};

use crate::backends::{PostgresServer, RedisServer};
use crate::kv::{get, put, spawn_writer};
use crate::{Proxy, eventually};

/// A private backend server a test can take down and bring back.
pub trait Backend {
    /// How messages name it, e.g. "Redis".
    const NAME: &'static str;
    /// Takes it down abruptly; returns once it is gone.
    fn take_down(&mut self) -> impl Future<Output = ()>;
    /// Starts it again on the same port and data; returns once it answers.
    fn bring_back(&mut self) -> impl Future<Output = ()>;
}

impl Backend for RedisServer {
    const NAME: &'static str = "Redis";
    async fn take_down(&mut self) {
        self.kill().await
    }
    async fn bring_back(&mut self) {
        self.restart().await
    }
}

impl Backend for PostgresServer {
    const NAME: &'static str = "PostgreSQL";
    async fn take_down(&mut self) {
        self.stop_immediate().await
    }
    async fn bring_back(&mut self) {
        self.restart().await
    }
}

/// What [`die_and_return`] measured; printed by the tests, never asserted
/// (times depend on the machine).
#[derive(Debug)]
pub struct Outage {
    /// From the backend's death to the proxy's health leaving SERVING.
    pub detected: Duration,
    /// How long four requests (Get, Put, Delete, List) took to be refused.
    pub refused_in: Duration,
    /// From the backend's return to the pattern SERVING again.
    pub serving_again: Duration,
    /// From the backend's return to the first successful Get.
    pub first_success: Duration,
    /// Writes acknowledged across the outage (every one read back).
    pub acked: usize,
    /// Writes refused during the outage.
    pub refused: usize,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NOT_SERVING seen {:?} after the backend died; 4 requests answered UNAVAILABLE in \
             {:?}; SERVING {:?} and first Get OK {:?} after it returned; {} writes \
             acknowledged, {} refused, 0 lost",
            self.detected,
            self.refused_in,
            self.serving_again,
            self.first_success,
            self.acked,
            self.refused
        )
    }
}

/// Namespace `ns`, served by `pattern` from `backend`, loses its backend
/// under a steady writer and gets it back. Asserts: the pattern (and the
/// proxy's `""`) leave SERVING; meanwhile every kind of request answers
/// UNAVAILABLE (not a hang) and no message contains any of `leaks`; after
/// the return the namespace serves again; every acknowledged write reads
/// back; the pattern rode it out in the same process, never restarted.
pub async fn die_and_return<B: Backend>(
    proxy: &Proxy,
    pattern: &str,
    ns: &'static str,
    backend: &mut B,
    leaks: &[&str],
) -> Outage {
    let name = B::NAME;
    let before = proxy.pattern(pattern).await;
    let mut kv = proxy.kv().await;
    kv.put(put(ns, "seed", b"planted before the outage"))
        .await
        .expect("put before the outage");

    // The writer keeps going across the outage, so writes acknowledged just
    // before it are among those checked afterwards.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(proxy, ns, Arc::clone(&stop));
    let probe = proxy.kv().await;
    eventually("the writer's 100th write", || {
        let mut probe = probe.clone();
        async move { probe.get(get(ns, "w/00000100")).await.ok().map(|_| ()) }
    })
    .await;

    backend.take_down().await;
    let died = Instant::now();
    eventually("the proxy to report the pattern NOT_SERVING", || async {
        (proxy.health_of(pattern).await != Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let detected = died.elapsed();
    let p = proxy
        .wait_pattern(pattern, "pattern NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    assert!(p.last_error.contains("NOT_SERVING"), "{}", p.last_error);
    assert_ne!(proxy.health_of("").await, Some(ServingStatus::Serving));

    // UNAVAILABLE, not a hang until the deadline (DEADLINE_EXCEEDED).
    let mut probe = probe.clone();
    let started = Instant::now();
    let answers = [
        probe.get(get(ns, "seed")).await.map(|_| ()),
        probe.put(put(ns, "during", b"x")).await.map(|_| ()),
        probe
            .delete(DeleteRequest {
                namespace: ns.into(),
                key: "seed".into(),
            })
            .await
            .map(|_| ()),
        probe
            .list(ListRequest {
                namespace: ns.into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ];
    let refused_in = started.elapsed();
    for a in &answers {
        let err = a
            .as_ref()
            .expect_err(&format!("no request succeeds while {name} is down"));
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        for leak in leaks {
            assert!(!err.message().contains(leak), "{leak:?} leaked: {err:?}");
        }
    }

    backend.bring_back().await;
    let returned = Instant::now();
    proxy.wait_serving(pattern).await;
    let serving_again = returned.elapsed();
    eventually("a Get to succeed again", || {
        let mut probe = probe.clone();
        async move { probe.get(get(ns, "seed")).await.ok().map(|_| ()) }
    })
    .await;
    let first_success = returned.elapsed();

    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = writer.await.expect("writer");
    let mut lost = Vec::new();
    for (key, value) in &acked {
        match kv.get(get(ns, key)).await {
            Ok(r) if r.get_ref().value == *value => {}
            other => lost.push((key.clone(), other.map(|r| r.into_inner().value))),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes were lost across the {name} outage: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        kv.get(get(ns, "seed"))
            .await
            .expect("seed")
            .into_inner()
            .value,
        b"planted before the outage"
    );
    let after = proxy.pattern(pattern).await;
    assert_eq!(after.pid, before.pid, "the pattern process was replaced");
    assert_eq!(after.restarts, before.restarts);

    Outage {
        detected,
        refused_in,
        serving_again,
        first_success,
        acked: acked.len(),
        refused,
    }
}

/// While `down_ns` (served by `down_pattern`) has lost its backend, namespace
/// `up_ns` keeps serving with no errors, and `down_ns` answers UNAVAILABLE
/// the whole time.
pub async fn others_keep_serving<B: Backend>(
    proxy: &Proxy,
    down_pattern: &str,
    down_ns: &str,
    backend: &mut B,
    up_pattern: &str,
    up_ns: &str,
) {
    let name = B::NAME;
    backend.take_down().await;
    proxy
        .wait_pattern(down_pattern, "pattern NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    let mut kv = proxy.kv().await;
    for i in 0..200 {
        let key = format!("k{i}");
        kv.put(put(up_ns, &key, key.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("put {i} to {up_ns:?} failed while {name} is down: {e:?}"));
        let got = kv.get(get(up_ns, &key)).await.unwrap_or_else(|e| {
            panic!("get {i} from {up_ns:?} failed while {name} is down: {e:?}")
        });
        assert_eq!(got.into_inner().value, key.as_bytes());
    }
    assert_eq!(
        proxy.health_of(up_pattern).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        kv.get(get(down_ns, "any")).await.unwrap_err().code(),
        Code::Unavailable
    );
    // Still down: the outage covered the whole loop.
    assert_ne!(
        proxy.health_of(down_pattern).await,
        Some(ServingStatus::Serving)
    );
}
