//! Each pattern's own metrics in the proxy's `GET /metrics`, against the
//! real binaries: the proxy asks every live pattern (`Lifecycle/Metrics`)
//! at scrape time and adds `pattern="<name>"` to every sample; a pattern
//! without metrics contributes nothing, one that does not answer is left
//! out (and counted) without holding up the scrape.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pattern_sdk::conformance::pubsub::Kit;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_tests::backends::{RedisServer, find_binary, redis_pattern};
use trellis_tests::kv::{get, put};
use trellis_tests::{Proxy, eventually, http as web};

const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0";

/// `GET /metrics`, in OpenMetrics when `openmetrics`.
async fn scrape(proxy: &Proxy, openmetrics: bool) -> String {
    let url = format!(
        "{}/metrics",
        proxy.http.as_deref().expect("the test proxy serves HTTP")
    );
    let headers: &[(&str, &str)] = if openmetrics {
        &[("accept", OPENMETRICS)]
    } else {
        &[]
    };
    let r = web::send(Method::GET, &url, headers, "", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.text()
}

/// The value of the sample `name` whose labels are exactly `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| v)
        .collect();
    assert!(found.len() <= 1, "{name}{labels:?} twice in:\n{text}");
    found.first().copied()
}

/// `name{k="v",…} value`; label values here never hold `"`, `,` or `}`.
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, rest) = line.rsplit_once(' ')?;
    let v = rest.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, labels.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect::<Option<_>>()?;
    Some((name.to_string(), labels, v))
}

fn declared(text: &str, line: &str) -> usize {
    text.lines().filter(|l| *l == line).count()
}

/// Lines of the patterns' own families (`pattern_*`) for pattern `name`.
fn own_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let label = format!("pattern=\"{name}\"");
    text.lines()
        .filter(|l| l.starts_with("pattern_") && l.contains(&label))
        .collect()
}

async fn promtool_accepts(text: &str) {
    let mut promtool = Command::new(find_binary("promtool", &[]))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut stdin = promtool.stdin.take().expect("stdin piped");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = promtool.wait_with_output().await.expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n--- exposition:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn redis_backend_figures_are_in_the_proxy_scrape_with_a_pattern_label() {
    let redis = RedisServer::start_in_memory().await;
    let proxy = Proxy::builder()
        .pattern(redis_pattern("cache", &["cache"], &redis.url(), ""))
        .memstore("mem", &["default"])
        .start()
        .await;
    let mut kv = proxy.kv().await;
    kv.put(put("cache", "k", b"v")).await.expect("put");
    kv.get(get("cache", "k")).await.expect("get");
    let missing = kv.get(get("cache", "nope")).await.expect_err("missing");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let text = scrape(&proxy, false).await;
    let op = |operation: &str| {
        value(
            &text,
            "pattern_backend_operation_duration_seconds_count",
            &[
                ("operation", operation),
                ("outcome", "ok"),
                ("pattern", "cache"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(op("PUT"), 1.0, "{text}");
    assert_eq!(op("GET"), 2.0, "a missing key is an ok GET: {text}");
    let bucket = value(
        &text,
        "pattern_backend_operation_duration_seconds_bucket",
        &[
            ("operation", "GET"),
            ("outcome", "ok"),
            ("le", "+Inf"),
            ("pattern", "cache"),
        ],
    );
    assert_eq!(bucket, Some(2.0), "{text}");
    // The one multiplexed connection, as a pool of one.
    let pool = |name: &str, labels: &[(&str, &str)]| {
        let mut all = labels.to_vec();
        all.push(("pattern", "cache"));
        value(&text, name, &all)
    };
    assert_eq!(
        pool("pattern_pool_max_connections", &[]),
        Some(1.0),
        "{text}"
    );
    let idle = pool("pattern_pool_connections", &[("state", "idle")]);
    let in_use = pool("pattern_pool_connections", &[("state", "in_use")]);
    assert_eq!(idle.zip(in_use).map(|(a, b)| a + b), Some(1.0), "{text}");
    assert_eq!(pool("pattern_pool_waits_total", &[]), Some(0.0), "{text}");
    // Both patterns send the in-flight gauge: declared once, a sample each.
    assert_eq!(
        declared(&text, "# TYPE pattern_backend_operations_in_flight gauge"),
        1,
        "{text}"
    );
    for p in ["cache", "mem"] {
        let v = value(
            &text,
            "pattern_backend_operations_in_flight",
            &[("pattern", p)],
        );
        assert_eq!(v, Some(0.0), "{p}: {text}");
        let errors = value(
            &text,
            "trellis_pattern_scrape_errors_total",
            &[("pattern", p)],
        );
        assert_eq!(errors, Some(0.0), "{p}: {text}");
    }
    // memstore has no backend and no pool, but it serves PubSub.
    assert!(
        !own_lines(&text, "mem")
            .iter()
            .any(|l| l.starts_with("pattern_pool")),
        "{text}"
    );
    assert_eq!(
        value(&text, "pattern_subscriptions", &[("pattern", "mem")]),
        Some(0.0),
        "{text}"
    );
    promtool_accepts(&text).await;

    // OpenMetrics: the same families, `# EOF` once and last.
    let om = scrape(&proxy, true).await;
    assert!(om.ends_with("\n# EOF\n"), "{om}");
    assert_eq!(om.matches("# EOF").count(), 1, "{om}");
    assert_eq!(
        declared(&om, "# TYPE pattern_pool_waits counter"),
        1,
        "{om}"
    );
    assert!(
        om.contains("\npattern_pool_waits_total{pattern=\"cache\"} 0\n"),
        "{om}"
    );
    drop(redis);
}

#[tokio::test]
async fn memstore_counts_its_open_subscriptions() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let subscriptions = async |proxy: &Proxy| {
        let text = scrape(proxy, false).await;
        value(&text, "pattern_subscriptions", &[("pattern", "mem")])
    };
    assert_eq!(subscriptions(&proxy).await, Some(0.0));

    let kit = Kit::new(
        PubSubClient::new(proxy.channel().await),
        "default",
        "default",
    );
    let mut sub = kit.subscribe("metrics", None).await.expect("subscribe");
    kit.ready("metrics", &mut [&mut sub]).await.expect("ready");
    assert_eq!(subscriptions(&proxy).await, Some(1.0));

    drop(sub);
    eventually("the subscription counted as closed", || async {
        (subscriptions(&proxy).await == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pattern_without_metrics_or_without_an_answer_leaves_the_scrape_whole() {
    let proxy = Proxy::builder()
        .echo("echo", &["e"], "")
        .memstore("mem", &["default"])
        // A stopped process stays (NOT_SERVING), not restarted, for the test.
        .with("health:\n  restart_when_unresponsive: false")
        .start()
        .await;
    let text = scrape(&proxy, false).await;
    // echo answers UNIMPLEMENTED: nothing of its own, and no error.
    assert!(own_lines(&text, "echo").is_empty(), "{text}");
    let errors = |text: &str, p: &str| {
        value(
            text,
            "trellis_pattern_scrape_errors_total",
            &[("pattern", p)],
        )
    };
    assert_eq!(errors(&text, "echo"), Some(0.0), "{text}");
    assert!(!own_lines(&text, "mem").is_empty(), "{text}");

    // A pattern that does not answer is left out after 1 s, and counted.
    let pid = proxy.pattern("mem").await.pid;
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP memstore");
    // The stop lands asynchronously: wait until every thread is stopped
    // (`T` in /proc), so the scrape below cannot be answered.
    let threads = format!("/proc/{pid}/task");
    eventually("memstore to be stopped", || {
        let threads = threads.clone();
        async move {
            let all = std::fs::read_dir(&threads).ok()?.all(|t| {
                t.ok()
                    .and_then(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                    .and_then(|stat| {
                        let state = stat.rsplit_once(") ")?.1.chars().next()?;
                        Some(state == 'T' || state == 't')
                    })
                    .unwrap_or(true)
            });
            all.then_some(())
        }
    })
    .await;
    let started = Instant::now();
    let text = scrape(&proxy, false).await;
    let took = started.elapsed();
    kill(pid, Signal::SIGCONT).expect("SIGCONT memstore");
    assert!(took < Duration::from_secs(5), "the scrape took {took:?}");
    assert!(own_lines(&text, "mem").is_empty(), "{text}");
    assert_eq!(errors(&text, "mem"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, "trellis_pattern_up", &[("pattern", "echo")]),
        Some(1.0),
        "the proxy's own metrics are all there: {text}"
    );
    promtool_accepts(&text).await;

    // Answering again, it is back in the next scrape.
    eventually("memstore's metrics back in the scrape", || async {
        let text = scrape(&proxy, false).await;
        (!own_lines(&text, "mem").is_empty()).then_some(())
    })
    .await;
}
