//! `trellis-chaos`: a misbehaving pattern for the supervision tests. Built on
//! the SDK like any pattern, with a tiny in-memory map so the data path
//! works, plus named misbehaviours. Not shipped.
//!
//! Before the handshake (environment, since nothing has been said yet):
//! - `CHAOS_STDERR=text`            write this line to stderr first
//! - `CHAOS_EXIT_BEFORE_HANDSHAKE=N` exit with code N without a handshake
//! - `CHAOS_BAD_HANDSHAKE=1`        write a line that is not a handshake
//! - `CHAOS_SLEEP_BEFORE_BIND=ms`   sleep before binding
//!
//! After Initialize (its `config:` block):
//! - `exit_after: 100ms` with `exit_code: 3` or `exit_signal: 9`
//! - `hang_after: 100ms`            SIGSTOP itself (no answers; only SIGKILL works)
//! - `health: not_serving | flap`, `flap_every: 300ms`
//! - `ignore_sigterm: true`         SIGTERM ignored and Stop hangs (blocks its thread)
//! - `grow_bytes_per_sec: 50000000` allocate and touch memory steadily
//! - `init_delay: 2s`               Initialize takes this long
//! - `reject_config: true`          Initialize fails with INVALID_ARGUMENT
//! - `daemon_child: true`           starts `sleep` in a process group of its
//!   own (a daemon that left the pattern's group), its only child
//! - `list_order: reversed`         List pages in *descending* key order (a
//!   broken pattern for the conformance command); otherwise List is correct:
//!   ascending, by prefix, paged with tokens `after:<last key>`
//! - `control_dir: /path`           runtime knobs, per process: the file
//!   `/path/<name>` (`<name>` as Initialize gave it: `chaos`, or `chaos-1`
//!   for a replica) is read at init and again on each SIGUSR1 (no polling:
//!   `ChaosControl::set_and_wait` writes it and signals); a missing or
//!   empty file means no misbehaviour. Its `key=value` lines:
//!   - `latency=30ms`   every data call (Get, Put, Delete, List) sleeps
//!     this long before answering;
//!   - `unavailable=1`  every data call answers UNAVAILABLE (after the
//!     latency, if any).
//!
//!   A bad line is warned about on stderr and ignored. Each change is
//!   announced on stderr as `chaos: knobs now [latency=30ms] on chaos-1`,
//!   which the proxy re-emits in its log; `trellis_tests::ChaosControl`
//!   writes the files and `trellis_tests::chaos::applied_line` makes that
//!   line.
//!
//! Not stateful (`Pattern::STATEFUL` is false) although its map is in
//! memory: the replica tests run several processes of it on purpose.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pattern_sdk::{Error, Health, InitContext, KeyValue, ListPage, ListQuery, Pattern};

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    #[serde(with = "humantime_serde")]
    exit_after: Option<Duration>,
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    #[serde(with = "humantime_serde")]
    hang_after: Option<Duration>,
    health: Option<String>,
    #[serde(with = "humantime_serde")]
    flap_every: Option<Duration>,
    ignore_sigterm: bool,
    grow_bytes_per_sec: u64,
    #[serde(with = "humantime_serde")]
    init_delay: Option<Duration>,
    reject_config: bool,
    daemon_child: bool,
    list_order: Option<String>,
    control_dir: Option<PathBuf>,
}

struct Chaos {
    map: Mutex<BTreeMap<(String, String), Bytes>>,
    health: Option<String>,
    flap_every: Duration,
    ignore_sigterm: bool,
    started: std::time::Instant,
    flapped: AtomicBool,
    list_reversed: bool,
    /// The runtime knobs every data call obeys (see [`live`]).
    knobs: Arc<live::Knobs>,
    /// The task that polls the knob file, if `control_dir` is set.
    poller: Option<tokio::task::AbortHandle>,
}

impl Pattern for Chaos {
    type Config = Config;
    const NAME: &'static str = "chaos";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    async fn init(c: Config, ctx: InitContext) -> Result<Self, Error> {
        if c.reject_config {
            return Err(Error::invalid_argument(
                "config.reject_config",
                "rejected on purpose",
            ));
        }
        let list_reversed = match c.list_order.as_deref() {
            None | Some("ascending") => false,
            Some("reversed") => true,
            Some(other) => {
                return Err(Error::invalid_argument(
                    "config.list_order",
                    format!("{other:?} is neither \"ascending\" nor \"reversed\""),
                ));
            }
        };
        if let Some(dir) = &c.control_dir
            && !dir.is_dir()
        {
            return Err(Error::invalid_argument(
                "config.control_dir",
                format!(
                    "{} is not a folder; create it first (ChaosControl::new does) or drop \
                     control_dir",
                    dir.display()
                ),
            ));
        }
        if let Some(d) = c.init_delay {
            tokio::time::sleep(d).await;
        }
        let knobs = Arc::new(live::Knobs::default());
        let poller = match c.control_dir {
            Some(dir) => Some(live::watch(&knobs, dir.join(ctx.name()), ctx.name()).await?),
            None => None,
        };
        if let Some(after) = c.exit_after {
            let (code, signal) = (c.exit_code, c.exit_signal);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                eprintln!("chaos: exiting on purpose");
                if let Some(sig) = signal.and_then(|s| nix::sys::signal::Signal::try_from(s).ok()) {
                    let _ = nix::sys::signal::raise(sig);
                }
                std::process::exit(code.unwrap_or(1));
            });
        }
        if let Some(after) = c.hang_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                eprintln!("chaos: hanging (SIGSTOP)");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            });
        }
        if c.ignore_sigterm {
            // After the SDK installed its handler: the kernel now drops SIGTERM.
            // SAFETY: setting a signal disposition to SIG_IGN is always sound.
            unsafe {
                let _ = nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::SigHandler::SigIgn,
                );
            }
        }
        if c.daemon_child {
            use std::os::unix::process::CommandExt;
            std::process::Command::new("sleep")
                .arg("100000")
                .process_group(0)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| Error::internal(format!("cannot start the daemon child: {e}")))?;
        }
        if c.grow_bytes_per_sec > 0 {
            let per_tick = (c.grow_bytes_per_sec / 20) as usize;
            std::thread::spawn(move || {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; per_tick]);
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        Ok(Chaos {
            map: Mutex::default(),
            health: c.health,
            flap_every: c.flap_every.unwrap_or(Duration::from_millis(300)),
            ignore_sigterm: c.ignore_sigterm,
            started: std::time::Instant::now(),
            flapped: AtomicBool::new(false),
            list_reversed,
            knobs,
            poller,
        })
    }

    async fn health(&self) -> Health {
        match self.health.as_deref() {
            Some("not_serving") => Health::NotServing("chaos: not serving on purpose".into()),
            Some("flap") => {
                let phase = self.started.elapsed().as_millis() / self.flap_every.as_millis().max(1);
                if phase % 2 == 1 {
                    self.flapped.store(true, Ordering::Relaxed);
                    Health::NotServing("chaos: flapping".into())
                } else {
                    Health::Serving
                }
            }
            _ => Health::Serving,
        }
    }

    async fn stop(&self) {
        if let Some(poller) = &self.poller {
            poller.abort();
        }
        if self.ignore_sigterm {
            // A shutdown path that hangs for real: block this thread so not
            // even the SDK's own grace timer in this task can fire.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

impl KeyValue for Chaos {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Bytes>, Error> {
        tracing::info!(key, "chaos get");
        self.knobs.obey().await?;
        let map = self.map.lock().map_err(Error::internal)?;
        Ok(map.get(&(ns.into(), key.into())).cloned())
    }
    async fn put(
        &self,
        ns: &str,
        key: &str,
        value: Bytes,
        _ttl: Option<Duration>,
    ) -> Result<(), Error> {
        self.knobs.obey().await?;
        self.map
            .lock()
            .map_err(Error::internal)?
            .insert((ns.into(), key.into()), value);
        Ok(())
    }
    async fn delete(&self, ns: &str, key: &str) -> Result<bool, Error> {
        self.knobs.obey().await?;
        Ok(self
            .map
            .lock()
            .map_err(Error::internal)?
            .remove(&(ns.into(), key.into()))
            .is_some())
    }
    async fn list(&self, ns: &str, q: ListQuery) -> Result<ListPage, Error> {
        self.knobs.obey().await?;
        let after = match q.page_token.as_deref() {
            None => None,
            Some(token) => Some(
                token
                    .strip_prefix("after:")
                    .ok_or_else(|| {
                        Error::invalid_argument("page_token", "not a token this pattern made")
                    })?
                    .to_owned(),
            ),
        };
        let map = self.map.lock().map_err(Error::internal)?;
        let mut matching: Vec<(String, Bytes)> = map
            .iter()
            .filter(|((n, k), _)| n == ns && k.starts_with(&q.prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        if self.list_reversed {
            matching.reverse();
        }
        // The entries after the cursor, in the order listed.
        let skip = match &after {
            None => 0,
            Some(after) => matching
                .iter()
                .position(|(k, _)| {
                    if self.list_reversed {
                        k < after
                    } else {
                        k > after
                    }
                })
                .unwrap_or(matching.len()),
        };
        Ok(ListPage::fill(
            matching.into_iter().skip(skip),
            q.page_size,
            |last| format!("after:{last}"),
        ))
    }
}

/// The `control_dir` knobs: read from the file at init and on SIGUSR1,
/// obeyed by every data call. Atomics, so a data call never waits for the
/// reader and no lock is held across the latency's sleep.
mod live {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use pattern_sdk::Error;
    use trellis_tests::chaos::{self, applied_line};

    #[derive(Default)]
    pub struct Knobs {
        latency_nanos: AtomicU64,
        unavailable: AtomicBool,
    }

    impl Knobs {
        /// What a data call does first: sleep the latency, then fail if
        /// unavailable.
        pub async fn obey(&self) -> Result<(), Error> {
            let nanos = self.latency_nanos.load(Ordering::Relaxed);
            if nanos > 0 {
                tokio::time::sleep(Duration::from_nanos(nanos)).await;
            }
            if self.unavailable.load(Ordering::Relaxed) {
                return Err(Error::unavailable("chaos: unavailable on purpose"));
            }
            Ok(())
        }

        fn set(&self, k: &chaos::Knobs) {
            let nanos = u64::try_from(k.latency.as_nanos()).unwrap_or(u64::MAX);
            self.latency_nanos.store(nanos, Ordering::Relaxed);
            self.unavailable.store(k.unavailable, Ordering::Relaxed);
        }
    }

    /// Applies `file` now (so the first data call already obeys it), then
    /// re-reads it in a task on each SIGUSR1, applying and announcing each
    /// change. The handler is installed here, during Initialize, so no
    /// SIGUSR1 sent once the process serves meets the default disposition
    /// (which would end it). Returns the task's handle.
    pub async fn watch(
        knobs: &Arc<Knobs>,
        file: PathBuf,
        name: &str,
    ) -> Result<tokio::task::AbortHandle, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut reread = signal(SignalKind::user_defined1())
            .map_err(|e| Error::internal(format!("cannot handle SIGUSR1: {e}")))?;
        let mut seen = String::new();
        let mut last_error = None;
        apply(knobs, &file, name, &mut seen, &mut last_error).await;
        let (knobs, name) = (Arc::clone(knobs), name.to_string());
        Ok(tokio::spawn(async move {
            while reread.recv().await.is_some() {
                apply(&knobs, &file, &name, &mut seen, &mut last_error).await;
            }
        })
        .abort_handle())
    }

    /// Reads `file` and, if its knobs differ from `seen`, applies them and
    /// says so. A missing file is no knobs; another read error is reported
    /// once and leaves the knobs as they were.
    async fn apply(
        knobs: &Knobs,
        file: &std::path::Path,
        name: &str,
        seen: &mut String,
        last_error: &mut Option<String>,
    ) {
        let text = match tokio::fs::read_to_string(file).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                let e = format!("chaos: cannot read knobs from {}: {e}", file.display());
                if last_error.as_ref() != Some(&e) {
                    eprintln!("{e}");
                    *last_error = Some(e);
                }
                return;
            }
        };
        *last_error = None;
        let now = chaos::normalize(&text);
        if now == *seen {
            return;
        }
        let (parsed, warnings) = chaos::Knobs::parse(&text);
        for w in warnings {
            eprintln!("chaos: {w}");
        }
        knobs.set(&parsed);
        eprintln!("{}", applied_line(name, &text));
        *seen = now;
    }
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if let Ok(text) = std::env::var("CHAOS_STDERR") {
        eprintln!("{text}");
    }
    if let Some(code) = std::env::var("CHAOS_EXIT_BEFORE_HANDSHAKE")
        .ok()
        .and_then(|c| c.parse().ok())
    {
        std::process::exit(code);
    }
    if std::env::var_os("CHAOS_BAD_HANDSHAKE").is_some() {
        println!("hello, I am not a handshake");
        std::future::pending::<()>().await;
    }
    if let Some(d) = env_ms("CHAOS_SLEEP_BEFORE_BIND") {
        tokio::time::sleep(d).await;
    }
    pattern_sdk::Server::<Chaos>::new().key_value().run().await
}
