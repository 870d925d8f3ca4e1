//! The service manager's notification protocol (`sd_notify(3)`), through
//! the `sd-notify` crate: `READY=1` once every pattern has finished
//! starting, `RELOADING=1` and `READY=1` around a reload, `STOPPING=1` the
//! moment a stop begins, `WATCHDOG=1` from the liveness loop
//! ([`crate::liveness`]), and a human `STATUS=` line. Every function is a
//! no-op when `NOTIFY_SOCKET` is unset (not started by systemd with
//! `Type=notify`), and a failed send is logged, never fatal.
//!
//! **Where the environment is read.** Trellis's configuration is read in
//! one place (`config.rs`), but `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
//! `WATCHDOG_PID` are not configuration: they are the service manager's
//! side of this protocol, set for this one process, and `sd-notify` reads
//! `NOTIFY_SOCKET` itself on every send. So they are read here and only
//! here ([`enabled`], [`watchdog_interval`]). They are not unset (that is
//! unsound once threads run); instead pattern children never inherit them:
//! `supervisor::process::spawn` removes every name in [`MANAGER_VARIABLES`]
//! from a child's environment, so a pattern cannot send `READY=1` or
//! `WATCHDOG=1` on the proxy's behalf (the unit's `NotifyAccess=main`
//! guards the same thing from systemd's side).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// The service manager's variables, never passed on to a pattern process.
pub const MANAGER_VARIABLES: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    // Socket activation's: the fds they name are the proxy's, not a child's.
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Set by [`stopping`]: after it, [`ready`] says nothing, so the service
/// manager never sees `READY=1` after `STOPPING=1`.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Serializes "check [`STOPPING`], then send" against [`stopping`]. Held
/// only around one datagram send, never across an await.
static ORDER: Mutex<()> = Mutex::new(());
/// Set by the first [`ready`]: a reload before start-up finished says
/// nothing (the start-up's own `READY=1` is still to come).
static READY: AtomicBool = AtomicBool::new(false);
/// A failing watchdog ping is logged once, not on every tick.
static WATCHDOG_WARNED: AtomicBool = AtomicBool::new(false);

/// Was the proxy started by a service manager that listens for
/// notifications (`NOTIFY_SOCKET` set)?
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as
/// `sd_watchdog_enabled(3)` advises, when the service manager asked for a
/// watchdog for this process (`WATCHDOG_PID` unset or this pid, the
/// `sd-notify` crate's rule) and listens (`NOTIFY_SOCKET` set); else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled()
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| (timeout / 2).max(Duration::from_millis(1)))
}

/// `READY=1`: start-up (or a reload) is complete. Ignored once
/// [`stopping`] has been sent.
pub fn ready(status_text: &str) {
    let _order = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    if STOPPING.load(Ordering::SeqCst) {
        return;
    }
    READY.store(true, Ordering::SeqCst);
    send(
        &[NotifyState::Ready, NotifyState::Status(status_text)],
        "READY=1",
    );
}

/// `READY=1` after a reload (applied or refused), once start-up has said
/// it; nothing before.
pub fn reloaded(status_text: &str) {
    if READY.load(Ordering::SeqCst) {
        ready(status_text);
    }
}

/// `RELOADING=1` with `MONOTONIC_USEC` (systemd ≥ 253 requires both for
/// `Type=notify-reload`); follow it with [`reloaded`] when the reload is done,
/// whether it was applied or refused.
pub fn reloading() {
    let _order = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    if STOPPING.load(Ordering::SeqCst) || !READY.load(Ordering::SeqCst) {
        return;
    }
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(
            &[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading the configuration"),
            ],
            "RELOADING=1",
        ),
        Err(e) => warn!(
            error = %e,
            "cannot read CLOCK_MONOTONIC for the service manager's RELOADING=1; not sent"
        ),
    }
}

/// `STOPPING=1`: the proxy has begun to stop (sent when the shutdown
/// signal arrives, before the drain delay).
pub fn stopping(status_text: &str) {
    let _order = ORDER.lock().unwrap_or_else(|e| e.into_inner());
    STOPPING.store(true, Ordering::SeqCst);
    send(
        &[NotifyState::Stopping, NotifyState::Status(status_text)],
        "STOPPING=1",
    );
}

/// `WATCHDOG=1`: the proxy's own loops run (sent by the liveness loop only
/// while liveness is SERVING).
pub fn watchdog() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog])
        && !WATCHDOG_WARNED.swap(true, Ordering::Relaxed)
    {
        warn!(
            error = %e,
            "cannot send WATCHDOG=1 to the service manager (NOTIFY_SOCKET); it will consider \
             the proxy hung. Said once; check that NOTIFY_SOCKET names systemd's socket"
        );
    }
}

/// `STATUS=<text>`: one human line for `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)], "STATUS");
}

fn send(states: &[NotifyState<'_>], what: &str) {
    if !enabled() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(notification = what, "told the service manager"),
        Err(e) => warn!(
            error = %e,
            notification = what,
            "cannot notify the service manager through NOTIFY_SOCKET; check that it names \
             systemd's notification socket (the unit needs Type=notify)"
        ),
    }
}
