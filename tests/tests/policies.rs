//! Traffic policies through the real proxy and the real `trellis-echo`
//! pattern, whose faults (`flaky:`, `down:`, `pushback:`, `m:` with `Put
//! mode`, `sleep:`) play a pattern that fails, recovers or hangs, and which
//! counts every call it sees (`Get attempts:<id>`): retries, the budget,
//! the circuit breaker, the concurrency and rate limits, load shedding, and
//! the deadline's cancellation reaching the pattern.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::{Method, StatusCode};
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt;
use trellis_proto::admin::v1::ListPatternsRequest;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_tests::h2raw;
use trellis_tests::http as web;
use trellis_tests::{Proxy, eventually};

fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

fn put(ns: &str, key: &str, value: &str) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        ttl: None,
    }
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// How many calls the echo pattern saw for fault `id`.
async fn attempts(proxy: &Proxy, ns: &str, id: &str) -> u64 {
    let v = proxy
        .kv()
        .await
        .get(get(ns, &format!("attempts:{id}")))
        .await
        .expect("Get attempts")
        .into_inner()
        .value;
    String::from_utf8(v).unwrap().parse().unwrap()
}

/// One counter or gauge from `/metrics`, exactly as rendered (0 if absent).
async fn metric(proxy: &Proxy, sample: &str) -> f64 {
    let base = proxy.http.as_deref().expect("an HTTP listener");
    let text = web::get(&format!("{base}/metrics")).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The policies of these tests: no retries, no breaker, unless a test
/// turns them on.
const QUIET: &str = "retries: { max_attempts: 1 }\ncircuit_breaker: { enabled: false }";

fn policies(named: &[(&str, &str)]) -> String {
    let mut y = String::from("policies:\n");
    for (name, body) in named {
        y.push_str(&format!("  {name}:\n"));
        for l in body.lines() {
            y.push_str(&format!("    {l}\n"));
        }
    }
    y
}

#[tokio::test]
async fn a_deadline_shorter_than_the_pattern_ends_the_call_and_cancels_it_at_the_pattern() {
    let proxy = Proxy::builder().echo("echo", &["e"], "").start().await;
    let kv = proxy.kv().await;
    // The client's deadline, sent raw: no client-side timer races the proxy.
    let started = Instant::now();
    let r = h2raw::call(
        proxy.addr.trim_start_matches("http://"),
        "/trellis.data.v1.KeyValue/Get",
        &[("grpc-timeout", "200m")],
        h2raw::frame(&get("e", "sleep:2000")),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        r.status_field("grpc-status").unwrap(),
        "4",
        "DEADLINE_EXCEEDED: {r:?}"
    );
    assert!(
        took < Duration::from_millis(400),
        "answered after {took:?}, not within 2 × the 200 ms deadline"
    );
    // The pattern saw its call cancelled, long before its 2 s sleep ended.
    eventually("the pattern to see the call cancelled", || async {
        let n = kv
            .clone()
            .get(get("e", "cancelled"))
            .await
            .ok()?
            .into_inner()
            .value;
        (n == b"1").then_some(())
    })
    .await;
    // The same over HTTP: 504.
    let base = proxy.http.as_deref().unwrap();
    let r = web::send(
        Method::GET,
        &format!("{base}/v1/namespaces/e/keys/sleep:2000"),
        &[("grpc-timeout", "200m")],
        "",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(r.json()["reason"], "PATTERN_TIMEOUT", "{}", r.text());
}

#[tokio::test]
async fn a_get_that_fails_once_is_retried_once_and_a_write_only_with_an_idempotency_key() {
    let proxy = Proxy::builder()
        .top(&policies(&[(
            "default",
            "retries: { max_attempts: 3, initial_backoff: 5ms }\ncircuit_breaker: { enabled: false }",
        )]))
        .echo("echo", &["e"], "")
        .start()
        .await;
    let mut kv = proxy.kv().await;
    kv.get(get("e", "flaky:g"))
        .await
        .expect("retried into success");
    assert_eq!(attempts(&proxy, "e", "g").await, 2, "exactly one retry");

    // A write without a key is not repeated.
    let err = kv.put(put("e", "flaky:p", "v")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(attempts(&proxy, "e", "p").await, 1, "not retried");

    // With an idempotency key it is.
    let mut req = Request::new(put("e", "flaky:k", "v"));
    req.metadata_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    kv.put(req).await.expect("retried into success");
    assert_eq!(attempts(&proxy, "e", "k").await, 2);

    // A pattern that says "do not retry" (negative pushback) is obeyed…
    let err = kv.get(get("e", "pushback:-1:n")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(attempts(&proxy, "e", "n").await, 1);
    // …and so is one that says "not before 300 ms".
    let started = Instant::now();
    kv.get(get("e", "pushback:300:w")).await.expect("retried");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "retried after {:?}, before the pattern's pushback",
        started.elapsed()
    );
    assert_eq!(attempts(&proxy, "e", "w").await, 2);

    // A retry that could not end before the deadline is not made.
    let mut req = Request::new(get("e", "pushback:5000:d"));
    req.set_timeout(Duration::from_secs(1));
    let err = kv.get(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(attempts(&proxy, "e", "d").await, 1);
    assert_eq!(
        metric(&proxy, "trellis_retries_total{namespace=\"e\"}").await,
        3.0
    );
}

#[tokio::test]
async fn retries_against_a_pattern_that_always_fails_stay_within_the_budget() {
    // Without the budget, 100 calls × 5 attempts = 500. With it (no floor:
    // min_per_second 0), retries may add 10 % of the calls made: 10.
    const CALLS: u64 = 100;
    let proxy = Proxy::builder()
        .top(&policies(&[(
            "default",
            "retries: { max_attempts: 5, initial_backoff: 1ms, max_backoff: 2ms, \
             budget: { ratio: 0.1, min_per_second: 0, window: 10s } }\n\
             circuit_breaker: { enabled: false }",
        )]))
        .echo("echo", &["e"], "")
        .start()
        .await;
    let mut kv = proxy.kv().await;
    for _ in 0..CALLS {
        let err = kv.get(get("e", "down:b")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    let seen = attempts(&proxy, "e", "b").await;
    assert!(
        seen > CALLS && seen <= CALLS + CALLS / 10,
        "{seen} attempts for {CALLS} calls; the budget allows {CALLS} + at most {}",
        CALLS / 10
    );
    let retries = metric(&proxy, "trellis_retries_total{namespace=\"e\"}").await;
    assert_eq!(retries as u64, seen - CALLS);
    let exhausted = metric(
        &proxy,
        "trellis_retry_budget_exhausted_total{namespace=\"e\"}",
    )
    .await;
    assert!(exhausted > 0.0, "the budget refused retries");
}

#[tokio::test]
async fn the_circuit_opens_on_a_failing_pattern_fails_fast_and_closes_when_it_recovers() {
    let proxy = Proxy::builder()
        .top(&policies(&[(
            "default",
            "retries: { max_attempts: 1 }\n\
             circuit_breaker: { consecutive_failures: 3, open_for: 300ms, probes: 2 }",
        )]))
        .echo("echo", &["e", "ctl"], "")
        .echo("other", &["o"], "")
        .start()
        .await;
    let mut kv = proxy.kv().await;
    kv.get(get("e", "m:c")).await.expect("healthy at first");
    kv.put(put("ctl", "mode", "fail")).await.expect("mode fail");

    // A steady caller: exactly three failures from the pattern, then the
    // circuit is open and calls fail at once without reaching it.
    for i in 0..3 {
        let err = kv.get(get("e", "m:c")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("mode fail"),
            "failure {i} comes from the pattern: {err:?}"
        );
    }
    let seen = attempts(&proxy, "ctl", "c").await;
    let mut fastest = Duration::MAX;
    for _ in 0..20 {
        let started = Instant::now();
        let err = kv.get(get("e", "m:c")).await.unwrap_err();
        fastest = fastest.min(started.elapsed());
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert_eq!(reason(&err), "CIRCUIT_OPEN", "{err:?}");
        let delay = retry_delay(&err).expect("CIRCUIT_OPEN carries RetryInfo");
        assert!(delay <= Duration::from_millis(300), "{delay:?}");
        if delay < Duration::from_millis(100) {
            break; // about to half-open
        }
    }
    println!("fastest refusal with the circuit open: {fastest:?}");
    assert_eq!(
        attempts(&proxy, "ctl", "c").await,
        seen,
        "no call reached the pattern while the circuit was open"
    );
    // Another namespace on another pattern is untouched.
    kv.get(get("o", "m:o")).await.expect("namespace o serves");

    let echo = proxy.pattern("echo").await;
    let circuit = echo
        .circuits
        .iter()
        .find(|c| c.namespace == "e")
        .expect("e's circuit in the admin API");
    assert_eq!(circuit.trips, 1, "{circuit:?}");
    assert_eq!(
        metric(&proxy, "trellis_circuit_trips_total{namespace=\"e\"}").await,
        1.0
    );
    assert!(
        metric(
            &proxy,
            "trellis_policy_refusals_total{namespace=\"e\",reason=\"CIRCUIT_OPEN\"}"
        )
        .await
            >= 1.0
    );

    // The pattern recovers: the probes succeed and the circuit closes.
    kv.put(put("ctl", "mode", "ok")).await.expect("mode ok");
    eventually("the circuit to close", || async {
        let mut kv = proxy.kv().await;
        kv.get(get("e", "m:c")).await.ok()?;
        let echo = proxy.pattern("echo").await;
        echo.circuits
            .iter()
            .any(|c| c.namespace == "e" && c.state == "closed")
            .then_some(())
    })
    .await;
    for _ in 0..5 {
        kv.get(get("e", "m:c")).await.expect("closed: calls pass");
    }
    assert_eq!(
        metric(
            &proxy,
            "trellis_circuit_state{namespace=\"e\",state=\"closed\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_concurrency_limit_refuses_the_excess_at_once_and_never_the_proxys_own_calls() {
    let proxy = Proxy::builder()
        .top("request_timeout: 10s")
        .top(&policies(&[(
            "default",
            &format!("{QUIET}\nconcurrency: {{ max_in_flight: 4 }}"),
        )]))
        .echo("echo", &["e"], "")
        .start()
        .await;
    let channel = proxy.channel().await;
    let mut calls: FuturesUnordered<_> = (0..20)
        .map(|_| {
            let mut kv = KeyValueClient::new(channel.clone());
            async move { kv.get(get("e", "sleep:4000")).await }
        })
        .collect();
    // Sixteen are refused at once: they all come back before any of the
    // four slow calls that hold the slots.
    for _ in 0..16 {
        let e = calls.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert_eq!(reason(&e), "CONCURRENCY_LIMIT", "{e:?}");
        assert!(retry_delay(&e).is_some(), "RetryInfo on {e:?}");
    }
    // While four calls hold every slot, the proxy's own services answer.
    let started = Instant::now();
    proxy
        .health()
        .await
        .check(HealthCheckRequest { service: "".into() })
        .await
        .expect("health answers");
    proxy
        .admin()
        .await
        .list_patterns(ListPatternsRequest {})
        .await
        .expect("admin answers");
    println!(
        "Health/Check + ListPatterns with the namespace full: {:?}",
        started.elapsed()
    );
    // HTTP: 429 with Retry-After.
    let base = proxy.http.as_deref().unwrap();
    let r = web::get(&format!("{base}/v1/namespaces/e/keys/x")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.json()["reason"], "CONCURRENCY_LIMIT", "{}", r.text());
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    // The four slow calls were let through, and finish.
    for _ in 0..4 {
        calls
            .next()
            .await
            .unwrap()
            .expect("a call within the limit");
    }
    assert_eq!(
        metric(
            &proxy,
            "trellis_policy_refusals_total{namespace=\"e\",reason=\"CONCURRENCY_LIMIT\"}"
        )
        .await,
        17.0
    );
    kv_get_ok(&proxy).await;
}

/// A call to `e` succeeds (a slot, a token or a place is free again).
async fn kv_get_ok(proxy: &Proxy) {
    proxy
        .kv()
        .await
        .get(get("e", "x"))
        .await
        .expect("room again");
}

#[tokio::test]
async fn a_rate_limit_per_caller_gives_each_caller_its_own_bucket() {
    let proxy = Proxy::builder()
        .top(&policies(&[(
            "default",
            &format!("{QUIET}\nrate_limit: {{ per_second: 1, burst: 3, per_caller: true }}"),
        )]))
        .echo("echo", &["e"], "")
        .start()
        .await;
    let mut kv = proxy.kv().await;
    let as_caller = |who: &str| {
        let mut req = Request::new(get("e", "x"));
        req.metadata_mut()
            .insert("x-client-id", who.parse().unwrap());
        req
    };
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.push(kv.get(as_caller("a")).await);
    }
    assert!(outcomes[..3].iter().all(Result::is_ok), "{outcomes:?}");
    for r in &outcomes[3..] {
        let e = r.as_ref().unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert_eq!(reason(e), "RATE_LIMITED", "{e:?}");
        let delay = retry_delay(e).expect("RetryInfo");
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(1),
            "{delay:?}"
        );
    }
    // Another caller has a full bucket of its own.
    for _ in 0..3 {
        kv.get(as_caller("b"))
            .await
            .expect("caller b is not limited by a");
    }
    // Over HTTP: 429 with Retry-After (whole seconds).
    let base = proxy.http.as_deref().unwrap();
    let url = format!("{base}/v1/namespaces/e/keys/x");
    for _ in 0..3 {
        let r = web::send(Method::GET, &url, &[("x-client-id", "c")], "", false).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = web::send(Method::GET, &url, &[("x-client-id", "c")], "", false).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.json()["reason"], "RATE_LIMITED");
    assert_eq!(r.headers["retry-after"], "1");
}

#[tokio::test]
async fn a_saturated_proxy_sheds_new_calls_instead_of_queueing_them() {
    let proxy = Proxy::builder()
        .top("max_in_flight: 2\n")
        .echo("echo", &["e"], "")
        .start()
        .await;
    let channel = proxy.channel().await;
    // A slow call can lose its slot to a probe below and be shed itself;
    // it then tries again, so both end up in flight together.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut kv = KeyValueClient::new(channel.clone());
            tokio::spawn(async move {
                loop {
                    match kv.get(get("e", "sleep:3000")).await {
                        // Refused at once; the probe holding the slot ends
                        // within a call's time, so ask again.
                        Err(e) if reason(&e) == "PROXY_OVERLOADED" => {
                            tokio::task::yield_now().await
                        }
                        outcome => return outcome,
                    }
                }
            })
        })
        .collect();
    let kv = proxy.kv().await;
    let err = eventually("a call to be shed", || async {
        kv.clone().get(get("e", "x")).await.err()
    })
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "PROXY_OVERLOADED", "{err:?}");
    assert!(retry_delay(&err).is_some());
    // Health is never shed.
    proxy
        .health()
        .await
        .check(HealthCheckRequest { service: "".into() })
        .await
        .expect("health answers while the data path is full");
    for s in slow {
        s.await.unwrap().expect("the slow calls finish");
    }
    kv_get_ok(&proxy).await;
}
