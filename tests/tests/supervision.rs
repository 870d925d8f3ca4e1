//! Supervision against the real world (issue 3): each test runs the real
//! proxy with `trellis-chaos` or `trellis-memstore` and checks one behaviour.

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use tonic::Code;
use trellis_proto::admin::v1::{
    PatternActionRequest, PatternState, WatchPatternsRequest, exit_status,
};
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_tests::kv::{get, put};
use trellis_tests::{ChaosControl, PatternEntry, Proxy, bin, process_gone};

fn action(name: &str) -> PatternActionRequest {
    PatternActionRequest { name: name.into() }
}

fn failed(p: &trellis_proto::admin::v1::Pattern) -> bool {
    p.state() == PatternState::Failed
}

fn serving(p: &trellis_proto::admin::v1::Pattern) -> bool {
    p.state() == PatternState::Serving
}

// 1. Spawn failures -------------------------------------------------------

#[tokio::test]
async fn spawn_failure_missing_binary_fails_that_pattern_only() {
    let proxy = Proxy::builder()
        .memstore("good", &["default"])
        .pattern(PatternEntry::new(
            "ghost",
            "/nonexistent/trellis-ghost",
            &["ghostly"],
        ))
        .spawn()
        .await;
    let p = proxy.wait_pattern("ghost", "ghost FAILED", failed).await;
    assert!(
        p.last_error.contains("/nonexistent/trellis-ghost"),
        "{}",
        p.last_error
    );
    assert!(p.last_error.contains("not found"), "{}", p.last_error);
    assert_eq!(p.pid, 0);
    proxy.wait_serving("good").await;
    let mut kv = proxy.kv().await;
    kv.put(PutRequest {
        namespace: "default".into(),
        key: "k".into(),
        value: b"v".to_vec(),
        ttl: None,
    })
    .await
    .expect("the other pattern keeps serving");
    let err = kv
        .get(GetRequest {
            namespace: "ghostly".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("FAILED"), "{}", err.message());
}

#[tokio::test]
async fn spawn_failure_not_executable_names_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-exec");
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let proxy = Proxy::builder()
        .pattern(PatternEntry::new("noexec", file.clone(), &["x"]))
        .spawn()
        .await;
    let p = proxy.wait_pattern("noexec", "FAILED", failed).await;
    assert!(
        p.last_error.contains(file.to_str().unwrap()),
        "{}",
        p.last_error
    );
    assert!(
        p.last_error.contains("ermission denied"),
        "{}",
        p.last_error
    );
}

#[tokio::test]
async fn exit_before_handshake_is_a_failed_start_with_status_and_stderr() {
    let proxy = Proxy::builder()
        .chaos("early", &["x"], "")
        .with("env:\n  CHAOS_EXIT_BEFORE_HANDSHAKE: \"3\"\n  CHAOS_STDERR: cannot find my config")
        .with("restart:\n  initial_backoff: 1ms\n  max_backoff: 2ms\n  max_starts: 2")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("early", "FAILED after the breaker", failed)
        .await;
    assert!(p.last_error.contains("crash loop"), "{}", p.last_error);
    assert_eq!(
        p.last_exit.unwrap().status,
        Some(exit_status::Status::Code(3))
    );
    assert!(
        p.stderr_tail
            .iter()
            .any(|l| l.contains("cannot find my config")),
        "{:?}",
        p.stderr_tail
    );
    assert_eq!(p.restarts, 1, "two starts: the first and one restart");
}

#[tokio::test]
async fn a_bad_handshake_is_quoted_in_the_error() {
    let proxy = Proxy::builder()
        .chaos("chatty", &["x"], "")
        .with("env:\n  CHAOS_BAD_HANDSHAKE: \"1\"\nrestart:\n  policy: never")
        .spawn()
        .await;
    let p = proxy.wait_pattern("chatty", "FAILED", failed).await;
    assert!(
        p.last_error.contains("hello, I am not a handshake"),
        "{}",
        p.last_error
    );
}

#[tokio::test]
async fn a_rejected_config_fails_at_once_without_restarts() {
    let proxy = Proxy::builder()
        .chaos("picky", &["x"], "reject_config: true")
        .spawn()
        .await;
    let p = proxy.wait_pattern("picky", "FAILED", failed).await;
    assert!(
        p.last_error.contains("rejected its configuration"),
        "{}",
        p.last_error
    );
    assert!(
        p.last_error.contains("config.reject_config"),
        "{}",
        p.last_error
    );
    assert_eq!(p.restarts, 0);
}

// 2. Not running: answers without RPCs; stop is idempotent ------------------

#[tokio::test]
async fn a_pattern_that_never_started_reports_and_stops_idempotently() {
    let proxy = Proxy::builder()
        .memstore("good", &["default"])
        .pattern(PatternEntry::new("ghost", "/nonexistent/x", &[]))
        .spawn()
        .await;
    proxy.wait_pattern("ghost", "FAILED", failed).await;
    let mut admin = proxy.admin().await;
    for _ in 0..2 {
        let r = admin
            .stop_pattern(action("ghost"))
            .await
            .expect("stop succeeds")
            .into_inner();
        assert!(r.message.contains("already"), "{}", r.message);
    }
    let mut health = proxy.health().await;
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ghost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status(),
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
}

// 3. Crash detection is event driven ----------------------------------------

#[tokio::test]
async fn a_crash_is_noticed_from_the_exit_not_from_health_polling() {
    // Health is polled once an hour, so only the exit itself can tell.
    let proxy = Proxy::builder()
        .chaos("crashy", &["x"], "exit_after: 300ms\nexit_code: 7")
        .with("health:\n  interval: 1h\nrestart:\n  policy: never")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("crashy", "FAILED after its exit", failed)
        .await;
    let exit = p.last_exit.unwrap();
    assert_eq!(exit.status, Some(exit_status::Status::Code(7)));
    assert!(p.last_error.contains("exit code 7"), "{}", p.last_error);
    assert!(
        p.stderr_tail
            .iter()
            .any(|l| l.contains("exiting on purpose")),
        "{:?}",
        p.stderr_tail
    );
}

// 4. Restart policy and the crash-loop breaker --------------------------------

#[tokio::test]
async fn on_failure_does_not_restart_a_clean_exit() {
    let proxy = Proxy::builder()
        .chaos("clean", &["x"], "exit_after: 200ms\nexit_code: 0")
        .with("restart:\n  policy: on-failure\n  initial_backoff: 1ms")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("clean", "STOPPED after exit 0", |p| {
            p.state() == PatternState::Stopped && p.last_exit.is_some()
        })
        .await;
    assert_eq!(p.restarts, 0);
    assert_eq!(
        p.last_exit.unwrap().status,
        Some(exit_status::Status::Code(0))
    );
}

#[tokio::test]
async fn on_failure_restarts_a_failed_exit_and_counts_it() {
    let proxy = Proxy::builder()
        .chaos("flaky", &["x"], "exit_after: 200ms\nexit_code: 3")
        .with("restart:\n  policy: on-failure\n  initial_backoff: 1ms\n  max_backoff: 2ms\n  max_starts: 100")
        .spawn()
        .await;
    proxy
        .wait_pattern("flaky", "restarted twice", |p| p.restarts >= 2)
        .await;
}

#[tokio::test]
async fn the_crash_loop_breaker_fails_the_pattern_until_an_operator_starts_it() {
    let proxy = Proxy::builder()
        .chaos("loop", &["x"], "exit_after: 10ms\nexit_code: 1")
        .with("restart:\n  initial_backoff: 1ms\n  max_backoff: 2ms\n  max_starts: 3\n  start_window: 1h")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("loop", "FAILED by the breaker", failed)
        .await;
    assert!(
        p.last_error.contains("crash loop: 3 starts within 1h"),
        "{}",
        p.last_error
    );
    assert!(
        p.last_error.contains("trellis patterns start loop"),
        "says what to do: {}",
        p.last_error
    );
    assert_eq!(p.restarts, 2, "three starts: the first and two restarts");
    let r = proxy
        .admin()
        .await
        .start_pattern(action("loop"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.message.contains("starting"), "{}", r.message);
    proxy
        .wait_pattern("loop", "restarted by the operator", |p| p.restarts >= 3)
        .await;
}

// 5. Health threshold, recovery, and unresponsive patterns --------------------

#[tokio::test]
async fn not_serving_checks_move_the_pattern_to_not_serving_and_back_without_a_restart() {
    let proxy = Proxy::builder()
        .chaos("flap", &["x"], "health: flap\nflap_every: 1500ms")
        .with("health:\n  interval: 50ms\n  timeout: 1s\n  failure_threshold: 1")
        .spawn()
        .await;
    let first = proxy.wait_pattern("flap", "SERVING", serving).await;
    let down = proxy
        .wait_pattern("flap", "NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    assert!(
        down.last_error.contains("NOT_SERVING"),
        "{}",
        down.last_error
    );
    let up = proxy.wait_pattern("flap", "SERVING again", serving).await;
    assert_eq!(
        up.pid, first.pid,
        "answering NOT_SERVING is no reason to restart"
    );
    assert_eq!(up.restarts, 0);
}

#[tokio::test]
async fn a_health_change_is_seen_through_watch_without_waiting_for_a_poll() {
    // Polling once an hour: only the Health/Watch stream can report the flap.
    let proxy = Proxy::builder()
        .chaos("flap", &["x"], "health: flap\nflap_every: 1500ms")
        .with("health:\n  interval: 1h\n  failure_threshold: 1")
        .spawn()
        .await;
    proxy.wait_pattern("flap", "SERVING", serving).await;
    proxy
        .wait_pattern("flap", "NOT_SERVING via Watch", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    proxy
        .wait_pattern("flap", "SERVING again via Watch", serving)
        .await;
}

#[tokio::test]
async fn an_unresponsive_pattern_is_killed_and_restarted() {
    let proxy = Proxy::builder()
        .chaos("hang", &["x"], "hang_after: 300ms")
        .with("health:\n  interval: 100ms\n  timeout: 100ms\n  failure_threshold: 2\nstop_grace: 100ms\nrestart:\n  initial_backoff: 1ms")
        .spawn()
        .await;
    let first = proxy.wait_pattern("hang", "SERVING", serving).await;
    let p = proxy
        .wait_pattern("hang", "restarted after hanging", |p| p.restarts >= 1)
        .await;
    assert!(p.last_error.contains("unresponsive"), "{}", p.last_error);
    assert_eq!(
        p.last_exit.unwrap().status,
        Some(exit_status::Status::Signal(9)),
        "a stopped process only yields to SIGKILL"
    );
    assert!(process_gone(first.pid));
}

// 6. Slow start -----------------------------------------------------------------

#[tokio::test]
async fn a_start_past_the_startup_timeout_is_killed_and_counted_as_failed() {
    let proxy = Proxy::builder()
        .chaos("slow", &["x"], "")
        .with("env:\n  CHAOS_SLEEP_BEFORE_BIND: \"60000\"\nstartup_timeout: 300ms\nrestart:\n  policy: never")
        .spawn()
        .await;
    let p = proxy.wait_pattern("slow", "FAILED", failed).await;
    assert!(
        p.last_error.contains("startup_timeout (300ms)"),
        "{}",
        p.last_error
    );
    assert_eq!(
        p.last_exit.unwrap().status,
        Some(exit_status::Status::Signal(9))
    );
}

#[tokio::test]
async fn a_slow_but_successful_start_is_logged_as_slow() {
    let proxy = Proxy::builder()
        .chaos("sluggish", &["x"], "init_delay: 300ms")
        .with("slow_start_warning: 100ms")
        .start()
        .await;
    assert!(
        proxy.log_text().contains("slow start"),
        "{}",
        proxy.log_text()
    );
}

#[tokio::test]
async fn a_pattern_that_answers_not_serving_past_startup_is_kept_not_killed() {
    // Like a pattern whose database is down at boot: alive, answering, not
    // ready. It stays up (same pid, no restart), just not routable.
    let proxy = Proxy::builder()
        .chaos("waiting", &["x"], "health: not_serving")
        .with("startup_timeout: 500ms\nrestart:\n  max_starts: 1")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("waiting", "NOT_SERVING after start-up", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    assert!(p.pid > 0 && !process_gone(p.pid));
    assert!(p.last_error.contains("NOT_SERVING"), "{}", p.last_error);
    assert_eq!(p.restarts, 0);
    let err = proxy
        .kv()
        .await
        .get(GetRequest {
            namespace: "x".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

// 7. Ports ----------------------------------------------------------------------

#[tokio::test]
async fn a_taken_fixed_port_fails_naming_the_port_and_its_holder() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let proxy = Proxy::builder()
        .memstore("fixed", &["x"])
        .with("transport: tcp")
        .with(&format!("port: {port}"))
        .spawn()
        .await;
    let p = proxy.wait_pattern("fixed", "FAILED", failed).await;
    assert!(
        p.last_error
            .contains(&format!("port {port} is already in use")),
        "{}",
        p.last_error
    );
    // The holder is this test process.
    assert!(
        p.last_error
            .contains(&format!("process {}", std::process::id())),
        "{}",
        p.last_error
    );
    assert!(p.last_error.contains("port: auto"), "{}", p.last_error);
}

#[tokio::test]
async fn a_port_range_uses_the_next_free_port() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let proxy = Proxy::builder()
        .memstore("ranged", &["x"])
        .with("transport: tcp")
        .with(&format!("port: \"{port}-{}\"", port.saturating_add(20)))
        .start()
        .await;
    let p = proxy.pattern("ranged").await;
    let used: u16 = p.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        used > port && used <= port + 20,
        "{} not in the range past {port}",
        p.endpoint
    );
}

#[tokio::test]
async fn unix_socket_transport_serves_data() {
    // No `transport:`: a Unix socket is the default.
    let proxy = Proxy::builder()
        .memstore("sock", &["default"])
        .start()
        .await;
    let p = proxy.pattern("sock").await;
    assert!(p.endpoint.starts_with("unix:///"), "{}", p.endpoint);
    assert!(
        p.endpoint.contains(&format!("/trellis-{}-", proxy.pid())),
        "in the run's own folder: {}",
        p.endpoint
    );
    let mut kv = proxy.kv().await;
    kv.put(PutRequest {
        namespace: "default".into(),
        key: "k".into(),
        value: b"v".to_vec(),
        ttl: None,
    })
    .await
    .unwrap();
    let v = kv
        .get(GetRequest {
            namespace: "default".into(),
            key: "k".into(),
        })
        .await
        .unwrap();
    assert_eq!(v.into_inner().value, b"v");
}

// 8. Stopping escalates to SIGKILL ----------------------------------------------

#[tokio::test]
async fn a_pattern_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let proxy = Proxy::builder()
        .chaos("stubborn", &["x"], "ignore_sigterm: true")
        .with("stop_grace: 200ms")
        .start()
        .await;
    let pid = proxy.pattern("stubborn").await.pid;
    let r = proxy
        .admin()
        .await
        .stop_pattern(action("stubborn"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.message.contains("stopped"), "{}", r.message);
    let p = proxy.pattern("stubborn").await;
    assert_eq!(p.state(), PatternState::Stopped);
    assert_eq!(
        p.last_exit.unwrap().status,
        Some(exit_status::Status::Signal(9))
    );
    assert!(process_gone(pid), "no zombie: reaped");
    assert!(
        proxy.children().is_empty(),
        "no child left: {:?}",
        proxy.children()
    );
}

// 10. Concurrent operators -------------------------------------------------------

#[tokio::test]
async fn concurrent_start_stop_restart_never_duplicate_a_process() {
    let proxy = Proxy::builder()
        .memstore("busy", &["default"])
        .start()
        .await;
    let admin = proxy.admin().await;
    let calls = (0..30).map(|i| {
        let mut admin = admin.clone();
        async move {
            let r = match i % 3 {
                0 => admin.start_pattern(action("busy")).await,
                1 => admin.stop_pattern(action("busy")).await,
                _ => admin.restart_pattern(action("busy")).await,
            };
            match r {
                Ok(resp) => assert!(!resp.into_inner().message.is_empty()),
                Err(s) => {
                    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                    assert!(s.message().contains("already running"), "{}", s.message());
                }
            }
        }
    });
    // Never a duplicate: at most the serving process and, during a
    // blue/green restart, its replacement (the old one drains, then goes).
    let watcher = async {
        for _ in 0..200 {
            assert!(
                proxy.children().len() <= 2,
                "duplicate process: {:?}",
                proxy.children()
            );
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(futures::future::join_all(calls), watcher);
    // Whatever the interleaving, one more start leaves exactly one process.
    let mut admin = proxy.admin().await;
    let _ = admin.start_pattern(action("busy")).await;
    let p = proxy.wait_pattern("busy", "SERVING", serving).await;
    assert_eq!(proxy.children(), vec![p.pid]);
}

// 11. Limits ----------------------------------------------------------------------

#[tokio::test]
async fn a_pattern_over_its_memory_limit_is_restarted_with_that_reason() {
    let proxy = Proxy::builder()
        .chaos("hog", &["x"], "grow_bytes_per_sec: 200000000")
        .with("limits:\n  memory: 64MiB\nhealth:\n  interval: 50ms\nstop_grace: 200ms\nrestart:\n  initial_backoff: 1ms")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("hog", "restarted for memory", |p| p.restarts >= 1)
        .await;
    assert!(
        p.last_error.contains("memory limit exceeded"),
        "{}",
        p.last_error
    );
}

#[tokio::test]
async fn rlimits_are_applied_at_spawn() {
    let proxy = Proxy::builder()
        .memstore("limited", &["x"])
        .with("limits:\n  open_files: 123")
        .start()
        .await;
    let pid = proxy.pattern("limited").await.pid;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(line.split_whitespace().nth(3), Some("123"), "{line}");
}

// 13. Events ---------------------------------------------------------------------

#[tokio::test]
async fn watch_patterns_sends_every_state_change_with_its_reason() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .with("restart:\n  initial_backoff: 1ms")
        .start()
        .await;
    let mut events = proxy
        .admin()
        .await
        .watch_patterns(WatchPatternsRequest {
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    let pid = first.pattern.as_ref().unwrap().pid;
    assert_eq!(first.pattern.unwrap().state(), PatternState::Serving);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();

    let mut seen = Vec::new();
    let mut crash_reason = String::new();
    let collect = async {
        while let Some(ev) = events.next().await {
            let ev = ev.unwrap();
            let previous = ev.previous_state();
            let p = ev.pattern.unwrap();
            if p.state() == PatternState::Crashed {
                crash_reason = p.last_error.clone();
            }
            seen.push((previous, p.state()));
            if p.state() == PatternState::Serving {
                break;
            }
        }
    };
    tokio::time::timeout(trellis_tests::PATIENCE, collect)
        .await
        .expect("events arrive");
    assert_eq!(
        seen,
        vec![
            (PatternState::Serving, PatternState::Crashed),
            (PatternState::Crashed, PatternState::Starting),
            (PatternState::Starting, PatternState::Serving),
        ]
    );
    assert!(
        crash_reason.contains("signal 9 (SIGKILL)"),
        "{crash_reason}"
    );
}

#[tokio::test]
async fn the_cli_follows_state_changes() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .with("restart:\n  initial_backoff: 1ms")
        .start()
        .await;
    let mut watch = tokio::process::Command::new(bin("trellis"))
        .args(["patterns", "watch"])
        .env("TRELLIS_ADDR", &proxy.addr)
        .env("TRELLIS_ADMIN_ADDR", proxy.admin.as_deref().unwrap())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(watch.stdout.take().unwrap()));
    let first = lines.next_line().await.unwrap().unwrap();
    assert!(
        first.contains("mem") && first.contains("SERVING"),
        "{first}"
    );
    let pid = proxy.pattern("mem").await.pid;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let find = async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("SERVING → CRASHED") {
                return l;
            }
        }
        panic!("the watch ended without a CRASHED line");
    };
    let crashed = tokio::time::timeout(trellis_tests::PATIENCE, find)
        .await
        .expect("a CRASHED line");
    assert!(crashed.contains("SIGKILL"), "{crashed}");
}

/// The breaker heals: after `restart.cool_down` a FAILED pattern is started
/// again without an operator (and, still crashing, trips the breaker again).
#[tokio::test]
async fn a_pattern_failed_by_the_breaker_is_started_again_after_its_cool_down() {
    let proxy = Proxy::builder()
        .chaos("loop", &["x"], "exit_after: 10ms\nexit_code: 1")
        .with(
            "restart:\n  initial_backoff: 1ms\n  max_backoff: 2ms\n  max_starts: 2\n  start_window: 1h\n  cool_down: 1s",
        )
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("loop", "FAILED by the breaker", failed)
        .await;
    assert_eq!(p.restarts, 1, "two starts: the first and one restart");
    assert!(
        p.last_error.contains("started again in 1s"),
        "says when it heals: {}",
        p.last_error
    );
    // No operator: the cool-down starts it again (its two starts trip the
    // breaker once more, as it still crashes).
    let p = proxy
        .wait_pattern("loop", "started again after the cool-down", |p| {
            p.restarts >= 3
        })
        .await;
    assert!(p.restarts >= 3, "{p:?}");
}

// 14. Restarts and failures that tell the truth (issue 14, item 6) ---------------

/// The first crash of a healthy pattern is restarted at once: the schedule
/// logs a zero delay (checked from the log, not from wall-clock speed).
#[tokio::test]
async fn the_first_crash_of_a_healthy_pattern_restarts_without_delay() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let first = proxy.pattern("mem").await.pid;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let p = proxy
        .wait_pattern("mem", "SERVING with a new pid", |p| {
            serving(p) && p.pid != 0 && p.pid != first
        })
        .await;
    assert_eq!(p.restarts, 1);
    // The restart's log line (JSON) carries the delay the schedule chose.
    let log = proxy.log_text();
    let delays: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("restarting"))
        })
        .filter_map(|v| v["fields"]["delay_ms"].as_u64())
        .collect();
    assert_eq!(delays, [0], "one restart, without delay: {log}");
    // And it serves data again.
    let mut kv = proxy.kv().await;
    kv.put(trellis_tests::kv::put("default", "k", b"v"))
        .await
        .expect("served after the restart");
}

/// Operator restarts are not crashes: ten in a row (more than `max_starts`)
/// neither trip the breaker nor wait on backoff. A SERVING pattern is
/// replaced blue/green; each restart answers only once the new process
/// serves.
#[tokio::test]
async fn ten_operator_restarts_in_a_row_leave_the_pattern_serving() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .with("restart:\n  max_starts: 3\n  start_window: 1h")
        .start()
        .await;
    let mut admin = proxy.admin().await;
    for i in 0..10 {
        let before = proxy.pattern("mem").await.pid;
        let asked = std::time::Instant::now();
        let r = admin
            .restart_pattern(action("mem"))
            .await
            .unwrap_or_else(|s| panic!("restart {i}: {s:?}"))
            .into_inner();
        // Generous on purpose (the bar is 1 s on an idle machine):
        // what is checked is that no backoff or breaker is waited on, not
        // this machine's speed.
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "restart {i} took {:?}",
            asked.elapsed()
        );
        assert!(r.message.contains("blue/green"), "{}", r.message);
        let p = proxy
            .wait_pattern("mem", "SERVING after the restart", |p| {
                serving(p) && p.pid != before
            })
            .await;
        assert!(!failed(&p), "{}", p.last_error);
    }
    let p = proxy.pattern("mem").await;
    assert!(serving(&p), "{:?}: {}", p.state(), p.last_error);
    assert_eq!(p.restarts, 10);
}

/// The in-place path (a pattern that is not SERVING) is honest too: ten
/// operator restarts of a NOT_SERVING pattern do not trip a breaker of 3.
#[tokio::test]
async fn ten_in_place_operator_restarts_do_not_trip_the_breaker() {
    let proxy = Proxy::builder()
        .chaos("sick", &["x"], "health: not_serving")
        .with("startup_timeout: 200ms\nrestart:\n  max_starts: 3\n  start_window: 1h")
        .spawn()
        .await;
    proxy
        .wait_pattern("sick", "NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    let mut admin = proxy.admin().await;
    for i in 0..10 {
        let r = admin
            .restart_pattern(action("sick"))
            .await
            .unwrap_or_else(|s| panic!("restart {i}: {s:?}"))
            .into_inner();
        assert!(r.message.contains("restarting"), "{}", r.message);
    }
    let p = proxy
        .wait_pattern("sick", "NOT_SERVING after ten restarts", |p| {
            p.state() == PatternState::NotServing && p.restarts == 10
        })
        .await;
    assert!(!p.last_error.contains("crash loop"), "{}", p.last_error);
}

/// A pattern FAILED by the crash-loop breaker comes back when an operator
/// starts it, and again when one restarts it: the operator's action resets
/// the breaker and really starts the process.
#[tokio::test]
async fn a_failed_pattern_comes_back_on_start_and_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    let script = dir.path().join("memstore-unless-broken");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ -e '{}' ] && {{ echo broken on purpose >&2; exit 1; }}\nexec '{}' \"$@\"\n",
            broken.display(),
            bin("trellis-memstore").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&broken, "").unwrap();
    let proxy = Proxy::builder()
        .pattern(PatternEntry::new("flaky", script.clone(), &["default"]))
        .with("restart:\n  initial_backoff: 1ms\n  max_backoff: 2ms\n  max_starts: 2\n  start_window: 1h\n  cool_down: null")
        .spawn()
        .await;
    let p = proxy.wait_pattern("flaky", "FAILED", failed).await;
    assert!(p.last_error.contains("crash loop"), "{}", p.last_error);
    std::fs::remove_file(&broken).unwrap();
    let mut admin = proxy.admin().await;
    let r = admin
        .start_pattern(action("flaky"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.message.contains("starting"), "{}", r.message);
    proxy
        .wait_pattern("flaky", "SERVING after the operator's start", serving)
        .await;

    // Fail it again, then bring it back with `restart`.
    std::fs::write(&broken, "").unwrap();
    let pid = proxy.pattern("flaky").await.pid;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    proxy.wait_pattern("flaky", "FAILED again", failed).await;
    std::fs::remove_file(&broken).unwrap();
    admin.restart_pattern(action("flaky")).await.unwrap();
    proxy
        .wait_pattern("flaky", "SERVING after the operator's restart", serving)
        .await;
}

/// A stop that arrives while the pattern is still starting (no Lifecycle
/// connection yet) ends the process at once instead of waiting out
/// `stop_grace` (20 s here) for a Stop call that cannot be sent.
#[tokio::test]
async fn a_stop_while_starting_ends_the_process_at_once() {
    let proxy = Proxy::builder()
        .chaos("sleepy", &["x"], "")
        .with("env:\n  CHAOS_SLEEP_BEFORE_BIND: \"60000\"\nstartup_timeout: 1m\nstop_grace: 20s")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("sleepy", "STARTING with a pid", |p| {
            p.state() == PatternState::Starting && p.pid != 0
        })
        .await;
    let asked = std::time::Instant::now();
    let r = proxy
        .admin()
        .await
        .stop_pattern(action("sleepy"))
        .await
        .unwrap()
        .into_inner();
    // Anything well under stop_grace (20 s) shows the grace was not waited
    // out; 10 s leaves room for a loaded machine.
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "stop took {:?}",
        asked.elapsed()
    );
    assert!(r.message.contains("stopped"), "{}", r.message);
    assert_eq!(proxy.pattern("sleepy").await.state(), PatternState::Stopped);
    assert!(process_gone(p.pid), "pid {} still there", p.pid);
}

/// A restart during start-up also ends the starting process at once and
/// starts a new one.
#[tokio::test]
async fn a_restart_while_starting_replaces_the_process_at_once() {
    let proxy = Proxy::builder()
        .chaos("sleepy", &["x"], "init_delay: 30s")
        .with("startup_timeout: 1m\nstop_grace: 20s")
        .spawn()
        .await;
    let p = proxy
        .wait_pattern("sleepy", "STARTING with a pid", |p| {
            p.state() == PatternState::Starting && p.pid != 0
        })
        .await;
    let asked = std::time::Instant::now();
    let r = proxy
        .admin()
        .await
        .restart_pattern(action("sleepy"))
        .await
        .unwrap()
        .into_inner();
    // As above: "did not wait out the 20 s stop_grace", with room to spare.
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "restart took {:?}",
        asked.elapsed()
    );
    assert!(r.message.contains("restarting"), "{}", r.message);
    assert!(process_gone(p.pid), "pid {} still there", p.pid);
    proxy
        .wait_pattern("sleepy", "a new process starting", |q| {
            q.pid != 0 && q.pid != p.pid
        })
        .await;
}

/// A pattern FAILED by the breaker keeps the cause of its last failure:
/// `last_error` names the breaker and quotes the bad handshake line, and
/// `last_exit` is not the proxy's SIGKILL; `trellis patterns get` shows it.
#[tokio::test]
async fn a_failed_pattern_shows_the_cause_of_its_last_failure() {
    let proxy = Proxy::builder()
        .chaos("chatty", &["x"], "")
        .with("env:\n  CHAOS_BAD_HANDSHAKE: \"1\"\nrestart:\n  initial_backoff: 1ms\n  max_backoff: 2ms\n  max_starts: 2\n  start_window: 1h\n  cool_down: null")
        .spawn()
        .await;
    let p = proxy.wait_pattern("chatty", "FAILED", failed).await;
    assert!(
        p.last_error.contains("crash loop: 2 starts within 1h"),
        "{}",
        p.last_error
    );
    assert!(
        p.last_error.contains("hello, I am not a handshake"),
        "the cause is kept: {}",
        p.last_error
    );
    assert!(
        p.last_exit.as_ref().map(|e| e.status) != Some(Some(exit_status::Status::Signal(9))),
        "last_exit is not the proxy's SIGKILL: {:?}",
        p.last_exit
    );
    let out = std::process::Command::new(bin("trellis"))
        .args(["patterns", "get", "chatty"])
        .env("TRELLIS_ADDR", &proxy.addr)
        .env("TRELLIS_ADMIN_ADDR", proxy.admin.as_deref().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("crash loop") && text.contains("hello, I am not a handshake"),
        "{text}"
    );
}

// 8. Runtime knobs --------------------------------------------------------------

#[tokio::test]
async fn chaos_knobs_slow_and_fail_a_running_pattern_until_cleared() {
    let control = ChaosControl::new();
    let proxy = Proxy::builder()
        .chaos("knobbed", &["x"], &control.config())
        .start()
        .await;
    let mut kv = proxy.kv().await;

    control
        .set_and_wait(&proxy, "knobbed", "latency=200ms\nunavailable=1")
        .await;
    let began = std::time::Instant::now();
    let err = kv.get(get("x", "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("unavailable on purpose"), "{err:?}");
    assert!(began.elapsed() >= std::time::Duration::from_millis(200));

    control.set_and_wait(&proxy, "knobbed", "").await;
    kv.put(put("x", "k", b"v")).await.unwrap();
    assert_eq!(
        kv.get(get("x", "k")).await.unwrap().into_inner().value,
        b"v"
    );
}
