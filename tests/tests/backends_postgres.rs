//! trellis-postgres against a real, private PostgreSQL that dies (immediate
//! shutdown, then a restart on the same port and data directory) or runs out
//! of pool connections. Measured times are printed (run with --nocapture),
//! not asserted: they depend on the machine.

use tonic::Code;
use trellis_proto::admin::v1::PatternState;
use trellis_tests::backends::{PostgresServer, postgres_pattern};
use trellis_tests::kv::{get, put};
use trellis_tests::outage::{die_and_return, others_keep_serving};
use trellis_tests::{Proxy, eventually};

const REQUEST_TIMEOUT: &str = "request_timeout: 5s";
const PG_CONFIG: &str =
    "connect_timeout: 500ms\nstatement_timeout: 2s\npool:\n  max_size: 4\n  acquire_timeout: 500ms";
const FAST_HEALTH: &str = "health:\n  interval: 250ms";

/// An immediate shutdown (no checkpoint) under a steady writer, then a
/// restart on the same data directory: crash recovery replays the WAL, so
/// every acknowledged (committed) write is there. The pool recovers inside
/// the same pattern process.
#[tokio::test]
async fn postgres_stopped_and_restarted_serves_again_without_losing_acknowledged_writes() {
    let mut pg = PostgresServer::start().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(postgres_pattern("db", &["db"], &pg.url(), PG_CONFIG))
        .with(FAST_HEALTH)
        .start()
        .await;
    let outage = die_and_return(&proxy, "db", "db", &mut pg, &["127.0.0.1", "SELECT"]).await;
    println!("postgres outage: {outage}");
}

#[tokio::test]
async fn memstore_keeps_serving_while_postgres_is_down() {
    let mut pg = PostgresServer::start().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(postgres_pattern("db", &["db"], &pg.url(), PG_CONFIG))
        .with(FAST_HEALTH)
        .memstore("mem", &["local"])
        .start()
        .await;
    others_keep_serving(&proxy, "db", "db", &mut pg, "mem", "local").await;
}

/// Two pooled connections, both held by Gets blocked behind a table lock
/// taken from another session: three more concurrent Gets wait
/// `acquire_timeout` and get RESOURCE_EXHAUSTED saying what is full and what
/// to change. Once the lock goes, the held Gets finish and the pool serves
/// everything again.
#[tokio::test]
async fn postgres_pool_exhaustion_is_resource_exhausted_and_recovers() {
    let pg = PostgresServer::start().await;
    let proxy = Proxy::builder()
        .top("request_timeout: 60s")
        .pattern(postgres_pattern(
            "db",
            &["db"],
            &pg.url(),
            // No purge during the test: it would take a connection too.
            "statement_timeout: 60s\npurge_interval: 1h\npool:\n  max_size: 2\n  acquire_timeout: 200ms",
        ))
        .start()
        .await;
    let mut kv = proxy.kv().await;
    kv.put(put("db", "k", b"v")).await.expect("put");

    let mut locker = pg.connect().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE trellis_kv IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the table");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5 {
        let mut kv = kv.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = kv.get(get("db", "k")).await;
            let _ = tx.send((i, r.map(|r| r.into_inner().value)));
        });
    }
    drop(tx);

    // The three that find no connection answer while the lock is held.
    let mut exhausted = Vec::new();
    while exhausted.len() < 3 {
        let (i, r) = tokio::time::timeout(trellis_tests::PATIENCE, rx.recv())
            .await
            .expect("three Gets answer while the table is locked")
            .expect("a result");
        match r {
            Err(s) if s.code() == Code::ResourceExhausted => exhausted.push(s),
            other => panic!(
                "Get {i} answered {other:?} while both connections were held; the pattern's \
                 stderr:\n{}",
                proxy.pattern("db").await.stderr_tail.join("\n")
            ),
        }
    }
    for s in &exhausted {
        let m = s.message();
        assert!(m.contains("all 2 connections are in use"), "{m}");
        assert!(m.contains("waiting"), "{m}");
        assert!(m.contains("pool.max_size"), "{m}");
        assert!(m.contains("pool.acquire_timeout"), "{m}");
        assert!(!m.contains("SELECT"), "{m}");
    }

    lock.rollback().await.expect("release the lock");
    let mut held = Vec::new();
    while let Some((i, r)) = rx.recv().await {
        match r {
            Ok(v) => held.push(v),
            Err(s) => panic!(
                "held Get {i} failed after the lock was released: {s:?}; the pattern's \
                 stderr:\n{}",
                proxy.pattern("db").await.stderr_tail.join("\n")
            ),
        }
    }
    assert_eq!(held, vec![b"v".to_vec(), b"v".to_vec()]);

    // Recovered: a burst as large as before all succeeds now.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let mut kv = kv.clone();
        burst.spawn(async move { kv.get(get("db", "k")).await.map(|r| r.into_inner().value) });
    }
    while let Some(r) = burst.join_next().await {
        assert_eq!(r.expect("task").expect("Get after recovery"), b"v");
    }
    assert_eq!(
        proxy.pattern("db").await.state(),
        PatternState::Serving,
        "a busy pool is load, not an outage"
    );
}

#[tokio::test]
async fn postgres_down_at_boot_starts_not_serving_then_creates_the_table_and_serves() {
    let mut pg = PostgresServer::start().await;
    pg.stop_immediate().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(postgres_pattern("db", &["db"], &pg.url(), PG_CONFIG))
        .with("startup_timeout: 1s\nhealth:\n  interval: 250ms")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("db", "NOT_SERVING after start-up", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    let mut kv = proxy.kv().await;
    let err = kv.get(get("db", "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    pg.restart().await;
    proxy.wait_serving("db").await;
    kv.put(put("db", "k", b"v"))
        .await
        .expect("put once PostgreSQL is up");
    assert_eq!(
        kv.get(get("db", "k")).await.unwrap().into_inner().value,
        b"v"
    );
    let after = proxy.pattern("db").await;
    assert_eq!(after.pid, p.pid, "the pattern process was replaced");
    assert_eq!(after.restarts, 0);
}

use trellis_tests::kv::{idempotent_replayed, with_idempotency_key};

/// The idempotency record lives in PostgreSQL with the data, not in a
/// pattern process: two proxies, each with its own trellis-postgres on the
/// same database, share it. A keyed Put through A, then the same keyed Put
/// through B, is a replay that does not write again: a value written
/// without a key in between survives.
#[tokio::test]
async fn a_keyed_put_through_one_proxy_is_replayed_through_another_on_the_same_database() {
    let pg = PostgresServer::start().await;
    let start = || {
        Proxy::builder()
            .top(REQUEST_TIMEOUT)
            .pattern(postgres_pattern("db", &["db"], &pg.url(), PG_CONFIG))
            .start()
    };
    let a = start().await;
    let b = start().await;
    let (mut kv_a, mut kv_b) = (a.kv().await, b.kv().await);

    let first = kv_a
        .put(with_idempotency_key(put("db", "k", b"first"), "order-1"))
        .await
        .expect("the keyed Put through A");
    assert!(!idempotent_replayed(&first), "the first keyed Put runs");

    kv_b.put(put("db", "k", b"between"))
        .await
        .expect("a Put without a key through B");

    let again = kv_b
        .put(with_idempotency_key(put("db", "k", b"first"), "order-1"))
        .await
        .expect("the same keyed Put through B");
    assert!(
        idempotent_replayed(&again),
        "B replays the record A's pattern committed"
    );
    for kv in [&mut kv_a, &mut kv_b] {
        assert_eq!(
            kv.get(get("db", "k")).await.unwrap().into_inner().value,
            b"between",
            "the replay did not write again"
        );
    }
}

/// Expired idempotency records are purged from the database, as expired
/// rows are.
#[tokio::test]
async fn expired_idempotency_records_are_purged() {
    let pg = PostgresServer::start().await;
    let proxy = Proxy::builder()
        .top("request_timeout: 5s\npolicies:\n  default:\n    idempotency: { retention: 1s }")
        .pattern(postgres_pattern(
            "db",
            &["db"],
            &pg.url(),
            "purge_interval: 100ms",
        ))
        .start()
        .await;
    let mut kv = proxy.kv().await;
    kv.put(with_idempotency_key(put("db", "k", b"v"), "once"))
        .await
        .expect("the keyed Put");
    let db = pg.connect().await;
    let records = || async {
        let row = db
            .query_one("SELECT count(*) FROM trellis_kv_idempotency", &[])
            .await
            .expect("count the records");
        row.get::<_, i64>(0)
    };
    assert_eq!(records().await, 1, "the keyed Put left its record");
    trellis_tests::eventually("the expired record purged", || async {
        (records().await == 0).then_some(())
    })
    .await;
    // Purged means forgotten: the key runs again.
    let again = kv
        .put(with_idempotency_key(put("db", "k", b"v"), "once"))
        .await
        .expect("the keyed Put after the retention");
    assert!(!idempotent_replayed(&again));
}

/// A crash in the middle of keyed writes leaves each key either free (the
/// write did not happen: a retry runs it) or complete (a retry replays it),
/// never claimed forever: the claim, the row and the answer commit in one
/// transaction, so a SIGKILLed pattern — or PostgreSQL stopped at once —
/// rolls every unfinished one back. Writers keep claiming new keys while
/// the crash happens; afterwards every key any of them sent is retried:
/// the retry succeeds, the value is there, and the next retry is a replay.
#[tokio::test]
async fn keyed_writes_cut_off_by_a_crash_are_never_claimed_forever() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const WRITERS: usize = 16;
    let mut pg = PostgresServer::start().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(postgres_pattern("db", &["db"], &pg.url(), PG_CONFIG))
        .with(FAST_HEALTH)
        .start()
        .await;
    let key = |crash: &str, w: usize, n: usize| format!("crash/{crash}/{w}/{n}");
    let write = |k: &str| with_idempotency_key(put("db", k, k.as_bytes()), k);
    for crash in ["pattern", "postgres"] {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let channel = proxy.channel().await;
        // Each writer sends keys n = 0, 1, … (each until acknowledged or
        // the crash is over) and says how many it sent.
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let mut kv =
                    trellis_proto::data::v1::key_value_client::KeyValueClient::new(channel.clone());
                let (stop, acked) = (stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if kv.put(write(&key(crash, w, n))).await.is_ok() {
                            acked.fetch_add(1, Ordering::Relaxed);
                            n += 1;
                        }
                    }
                    n + 1
                })
            })
            .collect();
        // Crash while claims are in flight: after some writes landed.
        eventually("writes to land before the crash", || async {
            (acked.load(Ordering::Relaxed) >= 2 * WRITERS).then_some(())
        })
        .await;
        match crash {
            "pattern" => {
                let pid = proxy.pattern("db").await.pid;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("SIGKILL the pattern");
            }
            _ => {
                pg.stop_immediate().await;
                pg.restart().await;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut sent = Vec::new();
        for w in writers {
            sent.push(w.await.expect("writer task"));
        }
        proxy.wait_serving("db").await;
        let mut kv = proxy.kv().await;
        for (w, count) in sent.into_iter().enumerate() {
            for n in 0..count {
                let k = key(crash, w, n);
                eventually(&format!("{k}'s retry after the {crash} crash"), || {
                    let mut kv = kv.clone();
                    let req = write(&k);
                    async move { kv.put(req).await.ok() }
                })
                .await;
                let again = kv.put(write(&k)).await.expect("a retry");
                assert!(idempotent_replayed(&again), "{k} after the {crash} crash");
                let v = kv.get(get("db", &k)).await.unwrap().into_inner().value;
                assert_eq!(v, k.as_bytes());
            }
        }
    }
}
