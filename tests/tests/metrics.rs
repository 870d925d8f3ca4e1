//! Metrics end to end, against the real binaries: what `GET /metrics`
//! counts and under which labels, both exposition formats, metrics turned
//! off, and a real Prometheus (the distribution's `prometheus` package,
//! installed by `make setup`) scraping a real Trellis with the example
//! scrape config in `deploy/prometheus/prometheus.yml`, queried over its
//! HTTP API. `promtool check metrics` checks the exposition.
//!
//! Nothing sleeps a fixed time: every wait polls with a bound
//! ([`eventually`]), so a slow machine only makes the tests slower.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use trellis_proto::admin::v1::{PatternActionRequest, PatternState};
use trellis_tests::{Proxy, eventually, http as web, kv};

const GET: &str = "trellis.data.v1.KeyValue/Get";
const PUT: &str = "trellis.data.v1.KeyValue/Put";
const KEY_ROUTE: &str = "/v1/namespaces/{namespace}/keys/{key}";

// --- the exposition, parsed -------------------------------------------------

/// One `/metrics` body: its samples, by name and labels.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("malformed sample line {l:?}")))
            .collect();
        Scrape { text, samples }
    }

    /// The value of the one sample named `name` whose labels are exactly
    /// `labels`; `None` when there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "{name}{labels:?} appears twice:\n{}",
            self.text
        );
        found.first().copied()
    }

    /// Like [`Scrape::value`], but 0 when absent.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

/// `name{k="v",…} value [timestamp]`, with escapes in label values.
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            let (start, c) = chars.next()?;
            if c == '}' {
                rest = &after[start + 1..];
                break;
            }
            if c == ',' {
                continue;
            }
            let eq = after[start..].find('=')? + start;
            let key = after[start..eq].to_string();
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

fn http_base(proxy: &Proxy) -> &str {
    proxy
        .http
        .as_deref()
        .expect("the test proxy serves HTTP (listen.http)")
}

async fn scrape(proxy: &Proxy) -> Scrape {
    let r = web::get(&format!("{}/metrics", http_base(proxy))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    Scrape::parse(r.text())
}

/// Scrapes until `done` holds, for at most `PATIENCE`; returns that scrape.
async fn scrape_until(proxy: &Proxy, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let done = &done;
    eventually(what, || async move {
        let s = scrape(proxy).await;
        done(&s).then_some(s)
    })
    .await
}

// --- /metrics ---------------------------------------------------------------

#[tokio::test]
async fn metrics_count_grpc_and_http_calls_under_their_labels() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let mut kv = proxy.kv().await;
    kv.put(kv::put("default", "k", b"v")).await.expect("put");
    kv.get(kv::get("default", "k")).await.expect("get");
    let r = web::get(&format!(
        "{}/v1/namespaces/default/keys/k",
        http_base(&proxy)
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let e = kv
        .get(kv::get("nobody-configured-this", "k"))
        .await
        .expect_err("an unknown namespace is refused");
    assert_eq!(e.code(), tonic::Code::NotFound);

    let call = |code: &'static str, method: &'static str| {
        [
            ("rpc_method", method),
            ("rpc_response_status_code", code),
            ("namespace", "default"),
            ("pattern", "mem"),
        ]
    };
    // A call is recorded when its response ends, which the client may see
    // first: poll.
    let s = scrape_until(&proxy, "the four calls in /metrics", |s| {
        s.count("rpc_server_call_duration_seconds_count", &call("OK", GET)) >= 2.0
            && s.count(
                "rpc_server_call_duration_seconds_count",
                &[
                    ("rpc_method", GET),
                    ("rpc_response_status_code", "NOT_FOUND"),
                    ("namespace", "_unknown"),
                    ("pattern", ""),
                ],
            ) >= 1.0
            && s.count(
                "http_server_request_duration_seconds_count",
                &[
                    ("http_request_method", "GET"),
                    ("http_route", KEY_ROUTE),
                    ("http_response_status_code", "200"),
                ],
            ) >= 1.0
    })
    .await;
    let text = &s.text;
    // gRPC Get + HTTP GET: the same data method, both sides of the proxy.
    assert_eq!(
        s.count("rpc_server_call_duration_seconds_count", &call("OK", GET)),
        2.0,
        "{text}"
    );
    assert_eq!(
        s.count("rpc_client_call_duration_seconds_count", &call("OK", GET)),
        2.0,
        "{text}"
    );
    assert_eq!(
        s.count("rpc_server_call_duration_seconds_count", &call("OK", PUT)),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.count(
            "rpc_server_call_duration_seconds_count",
            &[
                ("rpc_method", GET),
                ("rpc_response_status_code", "NOT_FOUND"),
                ("namespace", "_unknown"),
                ("pattern", ""),
            ],
        ),
        1.0,
        "an unknown namespace counts as _unknown: {text}"
    );
    assert!(
        !text.contains("nobody-configured-this"),
        "client input never becomes a label: {text}"
    );
    assert_eq!(
        s.count(
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "GET"),
                ("http_route", KEY_ROUTE),
                ("http_response_status_code", "200"),
            ],
        ),
        1.0,
        "{text}"
    );
    // Sub-millisecond buckets, and +Inf last.
    assert!(
        s.value(
            "rpc_server_call_duration_seconds_bucket",
            &[call("OK", GET).as_slice(), &[("le", "0.00025")]].concat(),
        )
        .is_some(),
        "{text}"
    );
    assert_eq!(
        s.value(
            "rpc_server_call_duration_seconds_bucket",
            &[call("OK", GET).as_slice(), &[("le", "+Inf")]].concat(),
        ),
        Some(2.0),
        "{text}"
    );

    // Supervision, and the proxy's own process.
    let mem = [("pattern", "mem")];
    assert_eq!(s.value("trellis_pattern_up", &mem), Some(1.0), "{text}");
    assert_eq!(
        s.value(
            "trellis_pattern_state",
            &[("pattern", "mem"), ("state", "SERVING")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        s.value(
            "trellis_pattern_state",
            &[("pattern", "mem"), ("state", "CRASHED")]
        ),
        Some(0.0),
        "{text}"
    );
    for reason in ["exit", "signal", "unhealthy", "memory", "operator"] {
        assert_eq!(
            s.value(
                "trellis_pattern_restarts_total",
                &[("pattern", "mem"), ("reason", reason)]
            ),
            Some(0.0),
            "{text}"
        );
    }
    assert_eq!(
        s.value("trellis_pattern_start_duration_seconds_count", &mem),
        Some(1.0),
        "{text}"
    );
    assert!(
        s.count("trellis_pattern_start_duration_seconds_sum", &mem) > 0.0,
        "{text}"
    );
    assert!(
        s.count("trellis_pattern_resident_memory_bytes", &mem) > 1e6,
        "{text}"
    );
    assert!(s.count("process_cpu_seconds_total", &[]) > 0.0, "{text}");
    assert!(
        s.count("process_resident_memory_bytes", &[]) > 1e6,
        "{text}"
    );
    assert!(
        s.count("process_virtual_memory_bytes", &[])
            >= s.count("process_resident_memory_bytes", &[]),
        "{text}"
    );
    assert!(s.count("process_open_fds", &[]) >= 3.0, "{text}");
    assert!(
        s.count("process_max_fds", &[]) >= s.count("process_open_fds", &[]),
        "{text}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let started = s.count("process_start_time_seconds", &[]);
    assert!(
        started > now - 3600.0 && started <= now + 1.0,
        "{started} vs {now}: {text}"
    );

    // /metrics counts itself under its own route.
    let s = scrape_until(&proxy, "/metrics counted", |s| {
        s.count(
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "GET"),
                ("http_route", "/metrics"),
                ("http_response_status_code", "200"),
            ],
        ) >= 1.0
    })
    .await;
    assert!(!s.text.contains("# EOF"), "{}", s.text);
}

#[tokio::test]
async fn openmetrics_is_served_when_asked_for() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let url = format!("{}/metrics", http_base(&proxy));

    let text = web::get(&url).await;
    let ct = text.headers["content-type"].to_str().expect("ASCII");
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        text.text()
            .contains("# TYPE trellis_pattern_restarts_total counter"),
        "{}",
        text.text()
    );

    // What Prometheus sends.
    let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                  version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let om = web::send(Method::GET, &url, &[("accept", accept)], "", false).await;
    assert_eq!(om.status, StatusCode::OK);
    let ct = om.headers["content-type"].to_str().expect("ASCII");
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    let body = om.text();
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(body.matches("# EOF").count(), 1, "{body}");
    // OpenMetrics names a counter's family without `_total`.
    assert!(
        body.contains("# TYPE trellis_pattern_restarts counter"),
        "{body}"
    );
    assert!(
        body.contains(r#"trellis_pattern_restarts_total{pattern="mem",reason="signal"} 0"#),
        "{body}"
    );

    let other = web::send(Method::POST, &url, &[], "", false).await;
    assert_eq!(
        other.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "{}",
        other.text()
    );
    assert_eq!(other.headers["allow"], "GET");
}

#[tokio::test]
async fn with_metrics_off_the_endpoint_is_404_and_says_how_to_turn_them_on() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .top("telemetry:\n  metrics: false")
        .start()
        .await;
    let r = web::get(&format!("{}/metrics", http_base(&proxy))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let doc = r.json();
    assert_eq!(doc["reason"], "METRICS_OFF", "{doc}");
    let detail = doc["detail"].as_str().expect("detail");
    assert!(detail.contains("telemetry.metrics: true"), "{detail}");

    // The data path does not care.
    let mut kv = proxy.kv().await;
    kv.put(kv::put("default", "k", b"v"))
        .await
        .expect("put with metrics off");
}

#[tokio::test]
async fn an_operator_restart_is_counted_with_its_reason_and_start_duration() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let first = proxy.pattern("mem").await.pid;
    proxy
        .admin()
        .await
        .restart_pattern(PatternActionRequest { name: "mem".into() })
        .await
        .expect("restart");
    proxy
        .wait_pattern("mem", "serving again after the restart", |p| {
            p.state() == PatternState::Serving && p.pid != first && p.pid != 0
        })
        .await;
    let s = scrape_until(&proxy, "the restart in /metrics", |s| {
        s.count(
            "trellis_pattern_start_duration_seconds_count",
            &[("pattern", "mem")],
        ) >= 2.0
    })
    .await;
    let text = &s.text;
    let restarts = |reason| {
        s.value(
            "trellis_pattern_restarts_total",
            &[("pattern", "mem"), ("reason", reason)],
        )
    };
    assert_eq!(restarts("operator"), Some(1.0), "{text}");
    for reason in ["exit", "signal", "unhealthy", "memory"] {
        assert_eq!(restarts(reason), Some(0.0), "{reason}: {text}");
    }
    assert_eq!(
        s.value(
            "trellis_pattern_start_duration_seconds_count",
            &[("pattern", "mem")]
        ),
        Some(2.0),
        "one start per process: {text}"
    );
    assert_eq!(
        s.value("trellis_pattern_up", &[("pattern", "mem")]),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn each_restart_is_counted_under_why_the_supervisor_restarted() {
    let proxy = Proxy::builder()
        .chaos("exits", &["a"], "exit_after: 200ms\nexit_code: 3")
        .chaos("crashes", &["b"], "exit_after: 200ms\nexit_signal: 9")
        .chaos("hangs", &["c"], "hang_after: 300ms")
        .with("health:\n  interval: 100ms\n  timeout: 100ms\n  failure_threshold: 2\nstop_grace: 100ms")
        .chaos("hog", &["d"], "grow_bytes_per_sec: 200000000")
        .with("limits:\n  memory: 64MiB\nhealth:\n  interval: 50ms\nstop_grace: 200ms")
        .spawn()
        .await;
    let restarts = |s: &Scrape, pattern: &str, reason: &str| {
        s.count(
            "trellis_pattern_restarts_total",
            &[("pattern", pattern), ("reason", reason)],
        )
    };
    let expected = [
        ("exits", "exit"),
        ("crashes", "signal"),
        ("hangs", "unhealthy"),
        ("hog", "memory"),
    ];
    let s = scrape_until(&proxy, "a restart of each pattern for its reason", |s| {
        expected.iter().all(|(p, r)| restarts(s, p, r) >= 1.0)
    })
    .await;
    let text = &s.text;
    for (pattern, _) in expected {
        // The supervisor's own kills (hung, over memory) are not `signal`,
        // and nobody operated anything.
        assert_eq!(restarts(&s, pattern, "operator"), 0.0, "{pattern}: {text}");
        if pattern != "crashes" {
            assert_eq!(restarts(&s, pattern, "signal"), 0.0, "{pattern}: {text}");
        }
    }
    assert_eq!(restarts(&s, "exits", "memory"), 0.0, "{text}");
    assert_eq!(restarts(&s, "crashes", "exit"), 0.0, "{text}");
    assert_eq!(restarts(&s, "hangs", "memory"), 0.0, "{text}");
    assert_eq!(restarts(&s, "hog", "exit"), 0.0, "{text}");
}

// --- a real Prometheus ------------------------------------------------------

const PROMETHEUS_HINT: &str = "run `make setup` (as root it installs the Debian/Ubuntu package \
     `prometheus`, which provides prometheus and promtool), or install that package yourself";

/// `name` on `PATH` or in the usual folders; panics with what to install.
fn find_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} was not found on PATH or in /usr/bin; {PROMETHEUS_HINT}"))
}

/// A private Prometheus: free port, data in a temporary folder. Killed
/// when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts one scraping `target` (`host:port`) every 200 ms with the
    /// deploy example's config, and waits until it is ready.
    async fn start(target: &str) -> Prometheus {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/prometheus.yml");
        let template = std::fs::read_to_string(&example)
            .unwrap_or_else(|e| panic!("reading {}: {e}", example.display()));
        let replace = |text: String, from: &str, to: &str| {
            assert_eq!(
                text.matches(from).count(),
                1,
                "{} should hold {from:?} exactly once (the test replaces it)",
                example.display()
            );
            text.replace(from, to)
        };
        let config = replace(template, "127.0.0.1:8981", target);
        let config = replace(config, "scrape_interval: 5s", "scrape_interval: 200ms");
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = trellis_tests::backends::free_port();
        let mut child = Command::new(find_tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting prometheus failed: {e}; {PROMETHEUS_HINT}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.lock().expect("log lock").push(line);
                }
            });
        }
        let mut prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let ready = format!("{}/-/ready", prometheus.url);
        let mut exited = None;
        eventually("prometheus ready (/-/ready)", || {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                exited = Some(status);
            }
            let ready = ready.clone();
            async move {
                if exited.is_some() {
                    return Some(());
                }
                try_get(&ready)
                    .await
                    .filter(|(s, _)| s.is_success())
                    .map(|_| ())
            }
        })
        .await;
        if let Some(status) = exited {
            panic!(
                "prometheus exited with {status}; its log:\n{}",
                prometheus.log_text()
            );
        }
        prometheus
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// An instant query: each result's labels and value (`None` when the
    /// query fails).
    async fn query(&self, promql: &str) -> Option<Vec<(BTreeMap<String, String>, f64)>> {
        let url = format!("{}/api/v1/query?query={}", self.url, encode(promql));
        let (status, body) = try_get(&url).await?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        assert!(
            status.is_success() && doc["status"] == "success",
            "query {promql:?} failed ({status}): {body}"
        );
        let results = doc["data"]["result"].as_array()?;
        results
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()?
                    .iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect::<Option<BTreeMap<_, _>>>()?;
                // Prometheus writes sample values as strings ("NaN", "+Inf").
                let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
                Some((labels, value))
            })
            .collect()
    }

    /// The single value of `promql` (`None` when empty or failing).
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let results = self.query(promql).await?;
        assert!(
            results.len() <= 1,
            "{promql:?} has several results: {results:?}"
        );
        results.first().map(|(_, v)| *v)
    }

    /// Waits until `promql` equals `want` exactly; fails at once if it goes
    /// past it (a count must move by exactly what the test did).
    async fn await_value(&self, promql: &str, want: f64) {
        let what = format!("prometheus: {promql} == {want}");
        eventually(&what, || async move {
            let v = self.scalar(promql).await.unwrap_or(0.0);
            assert!(v <= want, "{promql} went past {want}: {v}");
            (v == want).then_some(())
        })
        .await;
    }
}

/// GET `url`; `None` when nothing answers.
async fn try_get(url: &str) -> Option<(StatusCode, String)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client.get(url.parse().ok()?).await.ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes a query parameter value (everything but unreserved
/// characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `n` Gets over gRPC and `n` over HTTP, each answered OK.
async fn gets(proxy: &Proxy, n: usize) {
    let mut kv = proxy.kv().await;
    let url = format!("{}/v1/namespaces/default/keys/k", http_base(proxy));
    for _ in 0..n {
        kv.get(kv::get("default", "k")).await.expect("gRPC get");
        let r = web::get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
}

#[tokio::test]
async fn a_real_prometheus_sees_calls_latency_and_a_restart() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let target = http_base(&proxy)
        .strip_prefix("http://")
        .expect("http:// URL")
        .to_string();
    let prometheus = Prometheus::start(&target).await;
    let prom = &prometheus;
    eventually("prometheus scraped trellis", || async move {
        let up = prom.scalar(r#"up{job="trellis"}"#).await;
        (up == Some(1.0)).then_some(())
    })
    .await;

    // The call count moves by exactly the calls made. Two rounds, each
    // seen by Prometheus before the next, so the rate over the window is
    // not zero whenever the series first appeared.
    let calls = r#"sum(rpc_server_call_duration_seconds_count{rpc_method="trellis.data.v1.KeyValue/Get",namespace="default",pattern="mem"})"#;
    let before = prometheus.scalar(calls).await.unwrap_or(0.0);
    let mut kv = proxy.kv().await;
    kv.put(kv::put("default", "k", b"v")).await.expect("put");
    gets(&proxy, 5).await;
    prometheus.await_value(calls, before + 10.0).await;
    gets(&proxy, 5).await;
    prometheus.await_value(calls, before + 20.0).await;

    // A latency quantile is a number: the buckets end in +Inf and moved.
    let p50 = r#"histogram_quantile(0.5, sum by (le) (rate(rpc_server_call_duration_seconds_bucket{rpc_method="trellis.data.v1.KeyValue/Get"}[10m])))"#;
    let median = prometheus.scalar(p50).await;
    assert!(
        median.is_some_and(|m| m.is_finite() && m > 0.0 && m <= 10.0),
        "median Get latency from Prometheus: {median:?}; /metrics:\n{}",
        scrape(&proxy).await.text
    );

    // One crash: SIGKILL the pattern; the restart counter for `signal`
    // moves by exactly one, and no other reason moves.
    let restarts = r#"trellis_pattern_restarts_total{pattern="mem",reason="signal"}"#;
    let all_restarts = r#"sum(trellis_pattern_restarts_total{pattern="mem"})"#;
    let signal_before = prometheus
        .scalar(restarts)
        .await
        .expect("the restart series exists from the start");
    let all_before = prometheus
        .scalar(all_restarts)
        .await
        .expect("restart series");
    let pid = proxy.pattern("mem").await.pid;
    assert!(pid > 0);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL the pattern");
    proxy
        .wait_pattern("mem", "serving again after SIGKILL", |p| {
            p.state() == PatternState::Serving && p.pid != pid && p.pid != 0
        })
        .await;
    prometheus.await_value(restarts, signal_before + 1.0).await;
    prometheus.await_value(all_restarts, all_before + 1.0).await;
    prometheus
        .await_value(r#"trellis_pattern_up{pattern="mem"}"#, 1.0)
        .await;

    // promtool accepts the exposition (format and lint).
    let body = web::get(&format!("{}/metrics", http_base(&proxy)))
        .await
        .text();
    let mut promtool = Command::new(find_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting promtool failed: {e}; {PROMETHEUS_HINT}"));
    let mut stdin = promtool.stdin.take().expect("stdin piped");
    stdin
        .write_all(body.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let out = promtool.wait_with_output().await.expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- the exposition:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(prometheus);
}
