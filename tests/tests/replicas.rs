//! Several replicas: two real proxies, each with its own pattern processes,
//! on ONE private Redis, ONE private PostgreSQL and ONE private nats-server,
//! as deploy/kubernetes/ runs them (docs/operations.md, "Scaling out").
//!
//! - State in a shared backend is shared: a write through one proxy is read
//!   through the other (redis, postgres); memstore keeps its data in its own
//!   process, so it is not.
//! - Pub/sub through NATS reaches subscribers on any replica; memstore's
//!   only on its own.
//! - A replica that dies (SIGKILL: no drain) takes its pattern processes
//!   with it and leaves the other serving, streams included.
//!
//! The two-proxy idempotency tests (shared records) are in
//! backends_redis.rs and backends_postgres.rs.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pattern_sdk::conformance::pubsub::Kit;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};
use trellis_tests::kv::{get, put};
use trellis_tests::nats::{NatsServer, nats_pattern};
use trellis_tests::{PATIENCE, Proxy, ProxyBuilder, eventually, process_gone};

/// A backend outage or a lost connection shows quickly; no call waits longer.
const REQUEST_TIMEOUT: &str = "request_timeout: 5s";

/// One replica's config: the namespaces of deploy/kubernetes/configmap.yaml
/// on the backends given, plus `scratch` on memstore (per replica).
fn replica(
    redis: Option<&RedisServer>,
    pg: Option<&PostgresServer>,
    nats: Option<&NatsServer>,
) -> ProxyBuilder {
    let mut b = Proxy::builder().top(REQUEST_TIMEOUT);
    if let Some(redis) = redis {
        b = b.pattern(redis_pattern("redis", &["sessions"], &redis.url(), ""));
    }
    if let Some(pg) = pg {
        b = b.pattern(postgres_pattern("postgres", &["accounts"], &pg.url(), ""));
    }
    if let Some(nats) = nats {
        b = b.pattern(nats_pattern("nats", &["events"], &nats.url()));
    }
    b.memstore("memstore", &["scratch"])
}

async fn pubsub(proxy: &Proxy) -> PubSubClient<tonic::transport::Channel> {
    PubSubClient::new(proxy.channel().await)
}

#[tokio::test]
async fn a_write_through_one_replica_is_read_through_the_other() {
    let (redis, pg) = tokio::join!(RedisServer::start(), PostgresServer::start());
    let (a, b) = tokio::join!(
        replica(Some(&redis), Some(&pg), None).start(),
        replica(Some(&redis), Some(&pg), None).start()
    );
    let (mut kv_a, mut kv_b) = (a.kv().await, b.kv().await);

    for ns in ["sessions", "accounts"] {
        kv_a.put(put(ns, "k", b"from A"))
            .await
            .unwrap_or_else(|e| panic!("Put {ns}/k through A: {e:?}"));
        let got = kv_b
            .get(get(ns, "k"))
            .await
            .unwrap_or_else(|e| panic!("Get {ns}/k through B: {e:?}"));
        assert_eq!(got.into_inner().value, b"from A", "{ns}: B reads A's write");

        kv_b.put(put(ns, "k", b"from B"))
            .await
            .unwrap_or_else(|e| panic!("Put {ns}/k through B: {e:?}"));
        let got = kv_a
            .get(get(ns, "k"))
            .await
            .unwrap_or_else(|e| panic!("Get {ns}/k through A: {e:?}"));
        assert_eq!(
            got.into_inner().value,
            b"from B",
            "{ns}: A reads B's overwrite"
        );
    }

    // memstore keeps its data in each replica's own process.
    kv_a.put(put("scratch", "k", b"only on A"))
        .await
        .expect("Put scratch/k through A");
    let err = kv_b
        .get(get("scratch", "k"))
        .await
        .expect_err("B's memstore has no scratch/k");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn a_message_published_through_one_replica_reaches_subscribers_on_both() {
    let nats = NatsServer::start().await;
    let (a, b) = tokio::join!(
        replica(None, None, Some(&nats)).start(),
        replica(None, None, Some(&nats)).start()
    );
    let kit_a = Kit::new(pubsub(&a).await, "events", "events").patience(PATIENCE);
    let kit_b = Kit::new(pubsub(&b).await, "events", "events").patience(PATIENCE);
    let topic = kit_a.topic("replicas");

    // Subscribe on B (and on A), then prove both live with probe messages
    // published through A: a probe reaching B's subscriber has crossed.
    let mut sub_b = kit_b.subscribe(&topic, None).await.unwrap();
    let mut sub_a = kit_a.subscribe(&topic, None).await.unwrap();
    kit_a
        .ready(&topic, &mut [&mut sub_b, &mut sub_a])
        .await
        .unwrap();

    kit_a.publish(&topic, b"from A").await.unwrap();
    assert_eq!(
        sub_b.next(PATIENCE).await.unwrap().payload,
        b"from A",
        "B's subscriber gets what was published through A"
    );
    assert_eq!(sub_a.next(PATIENCE).await.unwrap().payload, b"from A");
    kit_b.publish(&topic, b"from B").await.unwrap();
    assert_eq!(
        sub_a.next(PATIENCE).await.unwrap().payload,
        b"from B",
        "A's subscriber gets what was published through B"
    );
    assert_eq!(sub_b.next(PATIENCE).await.unwrap().payload, b"from B");

    // memstore's pub/sub stays inside each replica: a message published
    // through A never reaches B's subscriber, which gets B's own next.
    let local = kit_b.topic("local");
    let mut local_b = kit_b.subscribe_to("scratch", &local, None).await.unwrap();
    kit_b
        .ready_in("scratch", &local, &mut [&mut local_b])
        .await
        .unwrap();
    kit_a
        .publish_to("scratch", &local, b"from A", &[])
        .await
        .unwrap();
    kit_b
        .publish_to("scratch", &local, b"from B", &[])
        .await
        .unwrap();
    assert_eq!(
        local_b.next(PATIENCE).await.unwrap().payload,
        b"from B",
        "memstore: B's subscriber must not see A's message"
    );
}

#[tokio::test]
async fn killing_one_replica_leaves_the_other_serving() {
    let (redis, pg, nats) = tokio::join!(
        RedisServer::start(),
        PostgresServer::start(),
        NatsServer::start()
    );
    let (mut a, b) = tokio::join!(
        replica(Some(&redis), Some(&pg), Some(&nats)).start(),
        replica(Some(&redis), Some(&pg), Some(&nats)).start()
    );
    let a_patterns = a.children();
    assert_eq!(
        a_patterns.len(),
        4,
        "A runs its four patterns: {a_patterns:?}"
    );
    let b_pids: Vec<(String, u32)> = {
        let mut v = Vec::new();
        for name in ["redis", "postgres", "nats", "memstore"] {
            v.push((name.to_string(), b.pattern(name).await.pid));
        }
        v
    };

    // Writes acknowledged through A, and a live subscriber on B.
    let mut kv_a = a.kv().await;
    for ns in ["sessions", "accounts"] {
        kv_a.put(put(ns, "before", b"through A"))
            .await
            .unwrap_or_else(|e| panic!("Put {ns}/before through A: {e:?}"));
    }
    let kit_b = Kit::new(pubsub(&b).await, "events", "events").patience(PATIENCE);
    let topic = kit_b.topic("survivor");
    let mut sub_b = kit_b.subscribe(&topic, None).await.unwrap();
    kit_b.ready(&topic, &mut [&mut sub_b]).await.unwrap();

    // SIGKILL: no drain, no Lifecycle Stop; the patterns' death signal
    // (PR_SET_PDEATHSIG) is all that stops them.
    kill(Pid::from_raw(a.pid() as i32), Signal::SIGKILL).expect("SIGKILL proxy A");
    let status = tokio::time::timeout(PATIENCE, a.child.wait())
        .await
        .expect("A exits after SIGKILL")
        .expect("wait for A");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "A died of SIGKILL"
    );
    eventually("A's pattern processes are gone (no orphan)", || {
        let left: Vec<u32> = a_patterns
            .iter()
            .copied()
            .filter(|p| !process_gone(*p))
            .collect();
        async move { left.is_empty().then_some(()) }
    })
    .await;

    // B serves on: readiness, A's acknowledged writes, new writes, pub/sub,
    // the subscription opened before, and the same pattern processes.
    assert_eq!(b.health_of("").await, Some(ServingStatus::Serving));
    let mut kv_b = b.kv().await;
    for ns in ["sessions", "accounts"] {
        let got = kv_b
            .get(get(ns, "before"))
            .await
            .unwrap_or_else(|e| panic!("Get {ns}/before through B after A died: {e:?}"));
        assert_eq!(got.into_inner().value, b"through A", "{ns}");
        kv_b.put(put(ns, "after", b"through B"))
            .await
            .unwrap_or_else(|e| panic!("Put {ns}/after through B after A died: {e:?}"));
        let got = kv_b
            .get(get(ns, "after"))
            .await
            .unwrap_or_else(|e| panic!("Get {ns}/after through B: {e:?}"));
        assert_eq!(got.into_inner().value, b"through B", "{ns}");
    }
    kit_b.publish(&topic, b"after A died").await.unwrap();
    assert_eq!(
        sub_b.next(PATIENCE).await.unwrap().payload,
        b"after A died",
        "B's open subscription keeps delivering"
    );
    for (name, pid) in &b_pids {
        let p = b.pattern(name).await;
        assert_eq!(
            (p.pid, p.restarts),
            (*pid, 0),
            "B's {name} pattern was not disturbed"
        );
    }
}
