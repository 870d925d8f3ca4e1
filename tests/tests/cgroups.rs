//! Each pattern process in a cgroup of its own: a daemon a pattern started
//! in a process group of its own (out of reach of the group kill) dies
//! when the pattern is stopped, and one left by a SIGKILLed proxy is
//! killed by the next proxy that starts. Needs a writable cgroup v2
//! hierarchy (this machine's unified hierarchy, or systemd's
//! `Delegate=yes`); where the proxy says it has none, the test says so
//! and checks that it said it.

use trellis_proto::admin::v1::PatternActionRequest;
use trellis_tests::{Proxy, ProxyBuilder, children_of, eventually, process_gone};

const NO_CGROUPS: &str = "patterns run without a cgroup of their own";

fn daemon_starter() -> ProxyBuilder {
    Proxy::builder().chaos("daemon", &["d"], "daemon_child: true")
}

/// The pattern's pid and its daemon child's.
async fn pattern_and_daemon(proxy: &Proxy) -> (u32, u32) {
    let pattern = proxy.pattern("daemon").await.pid;
    let daemon = eventually("the daemon child to run", || async {
        children_of(pattern).first().copied()
    })
    .await;
    (pattern, daemon)
}

/// Whether the proxy runs its patterns in cgroups; if not, the log must
/// say so (once).
fn has_cgroups(proxy: &Proxy) -> bool {
    let log = proxy.log_text();
    if log.contains(NO_CGROUPS) {
        assert_eq!(log.matches(NO_CGROUPS).count(), 1, "said once: {log}");
        println!("skipped: this machine gives the proxy no cgroup v2 to use");
        return false;
    }
    assert!(
        log.contains("each pattern runs in a cgroup of its own"),
        "{log}"
    );
    true
}

#[tokio::test]
async fn stopping_a_pattern_kills_the_daemon_it_started() {
    let proxy = daemon_starter().start().await;
    if !has_cgroups(&proxy) {
        return;
    }
    let (pattern, daemon) = pattern_and_daemon(&proxy).await;
    let cgroup = std::fs::read_to_string(format!("/proc/{daemon}/cgroup")).unwrap();
    assert!(
        cgroup.contains("/trellis-") && cgroup.contains("/daemon-"),
        "the daemon is in the pattern's cgroup: {cgroup}"
    );
    proxy
        .admin()
        .await
        .stop_pattern(PatternActionRequest {
            name: "daemon".into(),
        })
        .await
        .expect("stop");
    eventually("the pattern and its daemon to be gone", || async {
        (process_gone(pattern) && process_gone(daemon)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_new_proxy_kills_what_a_sigkilled_proxy_left_running() {
    let mut first = daemon_starter().start().await;
    if !has_cgroups(&first) {
        return;
    }
    let (pattern, daemon) = pattern_and_daemon(&first).await;
    first.child.kill().await.expect("SIGKILL the proxy");
    // The parent-death signal ends the pattern; its daemon lives on.
    eventually("the pattern to die with its proxy", || async {
        process_gone(pattern).then_some(())
    })
    .await;
    assert!(
        !process_gone(daemon),
        "the daemon outlived its pattern (what cgroups are for)"
    );

    let second = Proxy::builder().memstore("mem", &["m"]).start().await;
    assert!(has_cgroups(&second));
    eventually("the next proxy to kill the daemon", || async {
        process_gone(daemon).then_some(())
    })
    .await;
}
