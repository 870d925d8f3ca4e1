//! `deploy/systemd/`: the unit passes `systemd-analyze verify`, its stop
//! timeout covers the waits of the config it ships with, and the real
//! proxy speaks the notification protocol as `Type=notify` expects:
//! READY=1 only once the patterns have started, WATCHDOG=1 repeatedly,
//! RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM before it
//! exits, in that order; and no pattern child can notify on its behalf
//! (none inherits NOTIFY_SOCKET).

use std::path::{Path, PathBuf};
use std::time::Duration;

use humantime_serde::re::humantime;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1::PatternState;
use trellis_tests::sd_notify::{Message, NotifySocket};
use trellis_tests::{PATIENCE, Proxy, bin};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of the first `key=` line of a unit file.
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::trim)
}

/// The duration of the top-level `key:` of the example config (or of the
/// largest such key anywhere, for per-pattern keys).
fn yaml_durations(yaml: &str, key: &str) -> Vec<Duration> {
    yaml.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(key)?.strip_prefix(':')?;
            let value = rest.split('#').next()?.trim();
            Some(humantime::parse_duration(value).unwrap_or_else(|e| panic!("{key}: {value}: {e}")))
        })
        .collect()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file());
    let Some(analyze) = analyze else {
        println!("SKIPPED: systemd-analyze is not installed here, so the unit cannot be verified");
        return;
    };
    // The unit names the installed paths; point them at this build so the
    // only thing verify can complain about is the unit itself.
    let unit = read("trellis.service");
    let config = deploy_dir().join("trellis.yaml");
    let local = unit
        .replace(
            "/usr/local/bin/trellis",
            &bin("trellis").display().to_string(),
        )
        .replace("/etc/trellis/trellis.yaml", &config.display().to_string());
    assert_ne!(
        local, unit,
        "the unit's ExecStart names /usr/local/bin/trellis"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("trellis.service");
    std::fs::write(&copy, local).unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warned:\n{said}"
    );
}

#[test]
fn the_unit_is_a_notify_service_whose_stop_timeout_covers_the_configs_waits() {
    let unit = read("trellis.service");
    assert_eq!(unit_value(&unit, "Type"), Some("notify"));
    assert_eq!(unit_value(&unit, "NotifyAccess"), Some("main"));
    assert_eq!(unit_value(&unit, "KillMode"), Some("mixed"));
    assert!(unit_value(&unit, "WatchdogSec").is_some());
    assert_eq!(
        unit_value(&unit, "ExecReload"),
        Some("/bin/kill -HUP $MAINPID")
    );
    let timeout = humantime::parse_duration(unit_value(&unit, "TimeoutStopSec").unwrap()).unwrap();

    let yaml = read("trellis.yaml");
    let one = |key: &str| {
        let found = yaml_durations(&yaml, key);
        assert_eq!(found.len(), 1, "trellis.yaml sets {key} once: {found:?}");
        found[0]
    };
    let stop_grace = yaml_durations(&yaml, "stop_grace")
        .into_iter()
        .max()
        .expect("trellis.yaml sets each pattern's stop_grace");
    // A pattern's stop: Lifecycle Stop, SIGTERM and SIGKILL, each after up
    // to stop_grace.
    let waits = one("drain_delay") + one("shutdown_grace") + 3 * stop_grace;
    assert!(
        timeout > waits,
        "TimeoutStopSec {timeout:?} must exceed drain_delay + shutdown_grace + 3 x stop_grace = {waits:?}"
    );
    // The config the unit runs is valid, and its pattern binaries resolve.
    let out = std::process::Command::new(bin("trellis"))
        .arg("check-config")
        .arg(deploy_dir().join("trellis.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The environment of process `pid`, one `KEY=value` per entry.
fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    raw.split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect()
}

#[tokio::test]
async fn the_proxy_speaks_the_notify_protocol_in_order() {
    let sock = NotifySocket::bind();
    let mut proxy = Proxy::builder()
        // A long drain delay: after STOPPING=1 the proxy is certainly
        // still running; a second SIGTERM ends the wait.
        .top("drain_delay: 60s")
        .memstore("mem", &["m"])
        // Takes a second to start, so READY=1 has something to wait for.
        .chaos("slow", &["s"], "init_delay: 1s")
        .env("NOTIFY_SOCKET", &sock.path())
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .await;

    // Up to READY=1: nothing else but watchdog pings and status lines.
    let mut before_ready = 0;
    let ready = loop {
        let m = sock.next().await;
        if m.has("READY=1") {
            break m;
        }
        assert!(
            m.0.iter()
                .all(|l| l == "WATCHDOG=1" || l.starts_with("STATUS=")),
            "before READY=1: {m:?}"
        );
        before_ready += 1;
    };
    // When READY=1 is sent, every pattern serves and so does `""`.
    for name in ["mem", "slow"] {
        let p = proxy.pattern(name).await;
        assert_eq!(p.state(), PatternState::Serving, "{name} at READY=1: {p:?}");
    }
    assert_eq!(proxy.health_of("").await, Some(ServingStatus::Serving));
    let status = ready.value("STATUS").expect("a STATUS line with READY=1");
    assert!(status.contains("serving"), "{status}");
    println!("{before_ready} messages before READY=1; status {status:?}");

    // WATCHDOG=1 again and again (every 100 ms: half of WATCHDOG_USEC).
    let mut pings = 0;
    while pings < 3 {
        let m = sock.next().await;
        assert!(!m.has("READY=1"), "READY=1 twice");
        assert!(!m.has("STOPPING=1"), "STOPPING=1 before any signal");
        if m.has("WATCHDOG=1") {
            pings += 1;
        }
    }

    // No pattern child can notify: none has the service manager's
    // variables, which the proxy itself has.
    let own = environ(proxy.pid());
    assert!(
        own.iter().any(|e| e.starts_with("NOTIFY_SOCKET=")),
        "the proxy's own environment has NOTIFY_SOCKET: the check below means something"
    );
    let children = proxy.children();
    assert_eq!(children.len(), 2, "one child per pattern: {children:?}");
    for pid in children {
        let leaked: Vec<String> = environ(pid)
            .into_iter()
            .filter(|e| e.starts_with("NOTIFY_SOCKET=") || e.starts_with("WATCHDOG_"))
            .collect();
        assert!(leaked.is_empty(), "pattern pid {pid} inherited {leaked:?}");
    }

    // SIGHUP (systemd's ExecReload): RELOADING=1 with MONOTONIC_USEC,
    // then READY=1 once the reload is done.
    let pid = nix::unistd::Pid::from_raw(proxy.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = loop {
        let m = sock.next().await;
        assert!(!m.has("READY=1"), "READY=1 before RELOADING=1: {m:?}");
        if m.has("RELOADING=1") {
            break m;
        }
    };
    assert!(reloading.value("MONOTONIC_USEC").is_some(), "{reloading:?}");
    let reloaded = loop {
        let m = sock.next().await;
        if m.has("READY=1") {
            break m;
        }
    };
    let status = reloaded.value("STATUS").unwrap_or_default();
    assert!(status.contains("reloaded"), "{status}");

    // SIGTERM: STOPPING=1 at once, while the proxy still runs.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopping = loop {
        let m = sock.next().await;
        assert!(!m.has("READY=1"), "READY=1 after the signal: {m:?}");
        if m.has("STOPPING=1") {
            break m;
        }
    };
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited before it said STOPPING=1"
    );
    assert!(stopping.value("STATUS").is_some(), "{stopping:?}");

    // A second signal skips the drain delay; the proxy exits 0, and says
    // nothing more that would contradict STOPPING=1.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait())
        .await
        .expect("the proxy exits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", proxy.log_text());
    let after: Vec<Message> = sock.drain();
    assert!(
        after
            .iter()
            .all(|m| !m.has("READY=1") && !m.has("STOPPING=1")),
        "after STOPPING=1: {after:?}"
    );
}
