//! Pattern replicas (`replicas: N`): several processes of one pattern
//! behind one proxy, each call balanced to one of them (least request,
//! two random choices), outliers ejected, restarts rolling
//! (docs/configuration.md, "Replicas"). Real binaries: the redis pattern
//! on a private redis-server, and trellis-chaos, whose replicas are made
//! slow or failing one by one through their knob files.
//!
//! (Several *proxies* sharing backends are tests/tests/replicas.rs.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1 as admin;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_tests::backends::{RedisServer, redis_pattern};
use trellis_tests::chaos::ChaosControl;
use trellis_tests::kv::{get, put};
use trellis_tests::{Proxy, eventually};

/// Every process of pattern `pattern`, as ListPatterns reports them, by name.
async fn replicas(proxy: &Proxy, pattern: &str) -> BTreeMap<String, admin::Pattern> {
    proxy
        .admin()
        .await
        .list_patterns(admin::ListPatternsRequest {})
        .await
        .expect("ListPatterns")
        .into_inner()
        .patterns
        .into_iter()
        .filter(|p| p.pattern == pattern)
        .map(|p| (p.name.clone(), p))
        .collect()
}

/// Each replica's calls so far.
async fn calls(proxy: &Proxy, pattern: &str) -> BTreeMap<String, u64> {
    replicas(proxy, pattern)
        .await
        .into_iter()
        .map(|(name, p)| (name, p.calls))
        .collect()
}

/// `after - before`, replica by replica.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
        .collect()
}

async fn wait_all_serving(proxy: &Proxy, names: &[&str]) {
    for name in names {
        proxy.wait_serving(name).await;
    }
}

/// Panics unless a replica answered (a Get of a key never set answers
/// NOT_FOUND: an answer all the same).
fn answered<T>(r: Result<T, tonic::Status>, what: &str) {
    if let Err(s) = r
        && s.code() != tonic::Code::NotFound
    {
        panic!("{what}: {s:?}");
    }
}

/// `total` Gets of `key` in `ns`, `width` at a time; every one must be answered.
async fn gets(proxy: &Proxy, ns: &str, key: &str, total: usize, width: usize) {
    let kv = proxy.kv().await;
    let per = total / width;
    let workers = (0..width).map(|_| {
        let mut kv = kv.clone();
        let (ns, key) = (ns.to_string(), key.to_string());
        tokio::spawn(async move {
            for _ in 0..per {
                answered(kv.get(get(&ns, &key)).await, "a Get through the replicas");
            }
        })
    });
    for w in futures::future::join_all(workers).await {
        w.expect("worker");
    }
}

/// What a steady load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed_gets: AtomicU64,
    failed_puts: AtomicU64,
    /// The first few failures, for the message.
    errors: std::sync::Mutex<Vec<String>>,
}

/// `width` workers, each writing its own keys and reading each back at
/// once (any replica must see what another wrote: the data is in Redis),
/// until `stop`. Returns every acknowledged write.
fn steady_load(
    kv: KeyValueClient<tonic::transport::Channel>,
    ns: &'static str,
    width: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<BTreeMap<String, Vec<u8>>> {
    tokio::spawn(async move {
        let workers = (0..width).map(|w| {
            let (mut kv, stop, tally) = (kv.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let mut acked = BTreeMap::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{w}/{n:06}");
                    let value = format!("value {w} {n}").into_bytes();
                    match kv.put(put(ns, &key, &value)).await {
                        Ok(_) => {
                            acked.insert(key.clone(), value.clone());
                        }
                        Err(s) => {
                            tally.failed_puts.fetch_add(1, Ordering::Relaxed);
                            tally
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("Put {key}: {s:?}"));
                            continue;
                        }
                    }
                    match kv.get(get(ns, &key)).await {
                        Ok(r) if r.get_ref().value == value => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("{key}: read {:?} after writing {value:?}", r.get_ref()),
                        Err(s) => {
                            tally.failed_gets.fetch_add(1, Ordering::Relaxed);
                            tally
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("Get {key}: {s:?}"));
                        }
                    }
                }
                acked
            })
        });
        let mut all = BTreeMap::new();
        for w in futures::future::join_all(workers).await {
            all.extend(w.expect("worker"));
        }
        all
    })
}

/// Waits until the load has made `more` successful rounds beyond now.
async fn rounds(tally: &Tally, more: u64) {
    let target = tally.ok.load(Ordering::Relaxed) + more;
    eventually("the load to go on", || async {
        (tally.ok.load(Ordering::Relaxed) >= target).then_some(())
    })
    .await;
}

/// Every acknowledged write reads back, through the proxy.
async fn read_back(proxy: &Proxy, ns: &str, acked: &BTreeMap<String, Vec<u8>>) {
    let mut kv = proxy.kv().await;
    for (key, value) in acked {
        let r = kv.get(get(ns, key)).await.expect("read back").into_inner();
        assert_eq!(&r.value, value, "{key}: an acknowledged write was lost");
    }
}

fn three_redis(redis: &RedisServer) -> trellis_tests::ProxyBuilder {
    Proxy::builder()
        .pattern(redis_pattern("redis", &["kv"], &redis.url(), ""))
        .with("replicas: 3")
}

#[tokio::test]
async fn a_killed_replica_fails_no_get_and_loses_no_acknowledged_write() {
    let redis = RedisServer::start().await;
    let proxy = three_redis(&redis).start().await;
    wait_all_serving(&proxy, &["redis-0", "redis-1", "redis-2", "redis"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = steady_load(proxy.kv().await, "kv", 8, stop.clone(), tally.clone());
    rounds(&tally, 200).await;

    let victim = proxy.pattern("redis-1").await;
    let calls_before = victim.calls;
    kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).expect("kill redis-1");
    // Restarted by its own owner, and taking calls again.
    let back = proxy
        .wait_pattern("redis-1", "redis-1 restarted", |p| {
            p.pid != 0 && p.pid != victim.pid && p.state == admin::PatternState::Serving as i32
        })
        .await;
    eventually("the restarted replica to take calls", || async {
        let now = proxy.pattern("redis-1").await;
        (now.pid == back.pid && now.calls > calls_before + 20).then_some(())
    })
    .await;
    rounds(&tally, 200).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.expect("load");

    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!(
        tally.failed_gets.load(Ordering::Relaxed),
        0,
        "a replica's crash failed Gets another replica could serve: {errors:?}"
    );
    assert!(!acked.is_empty());
    read_back(&proxy, "kv", &acked).await;
    // The crash is the supervisor's business, not an outlier: the new
    // process starts with a clean record.
    assert!(!proxy.pattern("redis-1").await.ejected);
    eprintln!(
        "{} rounds, {} acknowledged writes; {} Puts failed (not retried without an \
         idempotency key, and not acknowledged): {errors:?}",
        tally.ok.load(Ordering::Relaxed),
        acked.len(),
        tally.failed_puts.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn a_rolling_restart_under_load_fails_no_call_and_replaces_every_pid() {
    let redis = RedisServer::start().await;
    let proxy = three_redis(&redis).start().await;
    wait_all_serving(&proxy, &["redis-0", "redis-1", "redis-2"]).await;
    let before = replicas(&proxy, "redis").await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = steady_load(proxy.kv().await, "kv", 8, stop.clone(), tally.clone());
    rounds(&tally, 100).await;

    let r = proxy
        .admin()
        .await
        .restart_pattern(admin::PatternActionRequest {
            name: "redis".into(),
        })
        .await
        .expect("a rolling restart")
        .into_inner();
    rounds(&tally, 100).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.expect("load");

    assert!(r.message.contains("replica by replica"), "{}", r.message);
    assert_eq!(r.replicas.len(), 3, "{r:?}");
    let after = replicas(&proxy, "redis").await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["redis-0", "redis-1", "redis-2"]
    );
    for (name, p) in &after {
        let old = before[name].pid;
        assert!(
            p.pid != 0 && p.pid != old,
            "{name}: pid {old} was not replaced"
        );
        assert_eq!(p.state, admin::PatternState::Serving as i32, "{name}");
        assert!(
            r.message
                .contains(&format!("{name}: pid {old} → {}", p.pid)),
            "{}",
            r.message
        );
        assert!(
            trellis_tests::process_gone(old),
            "{name}'s old process {old} still runs"
        );
    }
    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!(
        tally.failed_gets.load(Ordering::Relaxed) + tally.failed_puts.load(Ordering::Relaxed),
        0,
        "a rolling restart failed calls: {errors:?}"
    );
    read_back(&proxy, "kv", &acked).await;

    // The CLI groups the replicas under their pattern.
    let out = std::process::Command::new(trellis_tests::bin("trellis"))
        .args(["patterns", "--admin-addr"])
        .arg(proxy.admin.as_deref().expect("an admin door"))
        .output()
        .expect("trellis patterns");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].starts_with("redis ") && lines[1].contains("3/3 SERVING"),
        "{table}"
    );
    for (i, line) in lines[2..5].iter().enumerate() {
        assert!(line.starts_with(&format!("  redis-{i} ")), "{table}");
    }
    // `trellis health` lists the pattern's own service before its replicas.
    let out = std::process::Command::new(trellis_tests::bin("trellis"))
        .args(["health", "--addr", &proxy.addr, "--admin-addr"])
        .arg(proxy.admin.as_deref().expect("an admin door"))
        .output()
        .expect("trellis health");
    let health = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{health}");
    let services: Vec<&str> = health
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        services,
        ["redis", "redis-0", "redis-1", "redis-2"],
        "{health}"
    );
}

#[tokio::test]
async fn calls_spread_evenly_and_a_slow_replica_gets_fewer() {
    let knobs = ChaosControl::new();
    let proxy = Proxy::builder()
        .chaos("chaos", &["kv"], &knobs.config())
        .with("replicas: 3")
        .start()
        .await;
    wait_all_serving(&proxy, &["chaos-0", "chaos-1", "chaos-2"]).await;

    let before = calls(&proxy, "chaos").await;
    gets(&proxy, "kv", "k", 3000, 8).await;
    let even = delta(&before, &calls(&proxy, "chaos").await);
    assert_eq!(even.values().sum::<u64>(), 3000, "{even:?}");
    for (name, n) in &even {
        let share = *n as f64 / 3000.0;
        assert!(
            (0.25..=0.42).contains(&share),
            "{name} took {:.1} % of the calls: {even:?}",
            share * 100.0
        );
    }
    // The same counts are on /metrics.
    let metrics = trellis_tests::http::get(&format!("{}/metrics", proxy.http.as_deref().unwrap()))
        .await
        .text();
    for (name, n) in calls(&proxy, "chaos").await {
        let line =
            format!("trellis_replica_calls_total{{pattern=\"chaos\",replica=\"{name}\"}} {n}");
        assert!(
            metrics.contains(&line),
            "{line} missing from /metrics:\n{metrics}"
        );
    }

    knobs.set_and_wait(&proxy, "chaos-1", "latency=50ms").await;
    let before = calls(&proxy, "chaos").await;
    gets(&proxy, "kv", "k", 3000, 8).await;
    let skewed = delta(&before, &calls(&proxy, "chaos").await);
    // Clearly fewer: less than half of what either fast one took. (A
    // share would depend on how fast the fast ones are on this machine.)
    let fastest_slowest = skewed["chaos-0"].min(skewed["chaos-2"]);
    assert!(
        skewed["chaos-1"] * 2 < fastest_slowest,
        "the slow replica took {} of 3,000 calls: {skewed:?}",
        skewed["chaos-1"]
    );
    eprintln!("even: {even:?}; with chaos-1 50 ms slower: {skewed:?}");
}

#[tokio::test]
async fn a_replica_answering_unavailable_is_ejected_and_readmitted() {
    let knobs = ChaosControl::new();
    let proxy = Proxy::builder()
        .chaos("chaos", &["kv"], &knobs.config())
        .with("replicas: 3")
        .with("outlier_detection: { consecutive_failures: 3, base_ejection_time: 5s }")
        .start()
        .await;
    wait_all_serving(&proxy, &["chaos-0", "chaos-1", "chaos-2"]).await;

    knobs.set_and_wait(&proxy, "chaos-2", "unavailable=1").await;
    // Each Get chaos-2 fails is retried on another replica: the caller
    // sees none of it.
    let mut kv = proxy.kv().await;
    let ejected = eventually("chaos-2 to be ejected", || {
        let (proxy, mut kv) = (&proxy, kv.clone());
        async move {
            answered(
                kv.get(get("kv", "k")).await,
                "a Get, retried on another replica",
            );
            let p = proxy.pattern("chaos-2").await;
            p.ejected.then_some(p)
        }
    })
    .await;
    assert!(
        proxy.log_text().contains("replica ejected"),
        "{}",
        proxy.log_text()
    );

    // While ejected it takes no call, and at most half the replicas are
    // ejected: chaos-1 failing as well stays in.
    knobs.set_and_wait(&proxy, "chaos-1", "unavailable=1").await;
    for _ in 0..60 {
        answered(
            kv.get(get("kv", "k")).await,
            "a Get while chaos-2 is ejected",
        );
    }
    let now = replicas(&proxy, "chaos").await;
    assert!(now["chaos-2"].ejected, "ejected for 5 s");
    assert_eq!(
        now["chaos-2"].calls, ejected.calls,
        "an ejected replica took calls"
    );
    assert!(
        !now["chaos-1"].ejected,
        "more than half the replicas ejected"
    );
    assert!(now["chaos-1"].calls > 0);

    // Recovered, it comes back when its time is up and serves again.
    knobs.set_and_wait(&proxy, "chaos-1", "").await;
    knobs.set_and_wait(&proxy, "chaos-2", "").await;
    eventually("chaos-2 to be re-admitted and take calls", || {
        let (proxy, mut kv) = (&proxy, kv.clone());
        async move {
            answered(kv.get(get("kv", "k")).await, "a Get");
            let p = proxy.pattern("chaos-2").await;
            (!p.ejected && p.calls > ejected.calls + 10).then_some(())
        }
    })
    .await;
    let metrics = trellis_tests::http::get(&format!("{}/metrics", proxy.http.as_deref().unwrap()))
        .await
        .text();
    assert!(
        metrics
            .contains("trellis_replica_ejections_total{pattern=\"chaos\",replica=\"chaos-2\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn replicas_follow_the_configuration_on_reload() {
    let proxy = Proxy::builder()
        .chaos("chaos", &["kv"], "")
        .with("replicas: 2")
        .start()
        .await;
    wait_all_serving(&proxy, &["chaos-0", "chaos-1"]).await;
    let health = proxy.health_of("chaos").await;
    assert_eq!(
        health,
        Some(ServingStatus::Serving),
        "the pattern's own service"
    );

    // The pattern's name means every replica: stop and start act on all.
    let mut admin_client = proxy.admin().await;
    let missing = admin_client
        .get_pattern(admin::GetPatternRequest {
            name: "chaos".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(
        missing.message().contains("chaos-0, chaos-1"),
        "{}",
        missing.message()
    );
    let stopped = admin_client
        .stop_pattern(admin::PatternActionRequest {
            name: "chaos".into(),
        })
        .await
        .expect("stop every replica")
        .into_inner();
    assert_eq!(stopped.replicas.len(), 2, "{stopped:?}");
    for p in &stopped.replicas {
        assert_eq!(p.state, admin::PatternState::Stopped as i32, "{p:?}");
    }
    let refused = proxy.kv().await.get(get("kv", "k")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused
            .message()
            .contains("none of whose 2 replicas is SERVING")
            && refused.message().contains("chaos-1 STOPPED"),
        "{}",
        refused.message()
    );
    eventually(
        "the pattern's health service to say NOT_SERVING",
        || async {
            (proxy.health_of("chaos").await == Some(ServingStatus::NotServing)).then_some(())
        },
    )
    .await;
    admin_client
        .start_pattern(admin::PatternActionRequest {
            name: "chaos".into(),
        })
        .await
        .expect("start every replica");
    wait_all_serving(&proxy, &["chaos-0", "chaos-1", "chaos"]).await;
    let first = replicas(&proxy, "chaos").await;

    // Scaling up starts the new replica and keeps the others.
    proxy.edit_config("replicas: 2", "replicas: 3");
    let r = proxy.reload().await.expect("reload");
    assert_eq!(r.added, ["chaos-2"], "{r:?}");
    assert_eq!(r.unchanged, ["chaos-0", "chaos-1"], "{r:?}");
    let scaled = replicas(&proxy, "chaos").await;
    for name in ["chaos-0", "chaos-1"] {
        assert_eq!(scaled[name].pid, first[name].pid, "{name} kept its process");
    }
    assert_eq!(scaled["chaos-2"].state, admin::PatternState::Serving as i32);

    // A changed entry replaces every replica, each new one serving first.
    proxy.edit_config(
        "replicas: 3",
        "replicas: 3\n    env: { CHAOS_GENERATION: \"2\" }",
    );
    let r = proxy.reload().await.expect("reload");
    assert_eq!(r.replaced, ["chaos-0", "chaos-1", "chaos-2"], "{r:?}");
    let replaced = replicas(&proxy, "chaos").await;
    for (name, p) in &replaced {
        assert_ne!(p.pid, scaled[name].pid, "{name}");
        assert_eq!(p.state, admin::PatternState::Serving as i32, "{name}");
    }

    // Down to one process: named after the pattern again.
    proxy.edit_config("replicas: 3", "replicas: 1");
    let r = proxy.reload().await.expect("reload");
    assert_eq!(r.added, ["chaos"], "{r:?}");
    assert_eq!(r.removed, ["chaos-0", "chaos-1", "chaos-2"], "{r:?}");
    proxy.wait_serving("chaos").await;
    answered(
        proxy.kv().await.get(get("kv", "k")).await,
        "served by the one process",
    );
    for (name, p) in &replaced {
        eventually(&format!("{name}'s process to be gone"), || async {
            trellis_tests::process_gone(p.pid).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn replicas_of_a_stateful_pattern_are_refused() {
    // Declared in the configuration: refused at load, naming why.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("trellis.yaml");
    std::fs::write(
        &config,
        format!(
            "patterns:\n  - name: mem\n    command: {:?}\n    stateful: true\n    replicas: 3\nnamespaces: []\n",
            trellis_tests::bin("trellis-memstore")
        ),
    )
    .unwrap();
    for args in [&["check-config"][..], &["--config"]] {
        let out = std::process::Command::new(trellis_tests::bin("trellis"))
            .args(args)
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("patterns[0].replicas")
                && err.contains("stateful")
                && err.contains("replicas: 1"),
            "{args:?}: {err}"
        );
    }

    // Declared by the pattern itself (memstore, in Initialize): each
    // replica fails at once with the reason, and is not restarted.
    let proxy = Proxy::builder()
        .memstore("mem", &["scratch"])
        .with("replicas: 2")
        .spawn()
        .await;
    for name in ["mem-0", "mem-1"] {
        let p = proxy
            .wait_pattern(name, "FAILED", |p| {
                p.state == admin::PatternState::Failed as i32
            })
            .await;
        assert!(
            p.last_error.contains("declares itself stateful")
                && p.last_error.contains("replicas: 1"),
            "{name}: {}",
            p.last_error
        );
        assert_eq!(p.restarts, 0, "{name}: a restart cannot fix it");
    }
}
