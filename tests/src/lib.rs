//! A small builder language for end-to-end tests: start the real `trellis`
//! binary with real pattern binaries on port 0, then talk to it over gRPC.
//!
//! ```text
//! let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
//! proxy.kv().put(...).await?;
//! ```
//!
//! Binaries are found in the cargo target directory next to the test
//! executable; `make test` builds them first (`cargo build --workspace`).

pub mod backends;
pub mod chaos;
pub mod h2raw;
pub mod http;
pub mod kv;
pub mod nats;
pub mod otlp;
pub mod outage;
pub mod pki;
pub mod sd_notify;
pub mod soak;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use trellis_proto::admin::v1 as admin;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::data::v1::key_value_client::KeyValueClient;

pub use chaos::ChaosControl;

/// Upper bound for anything a test waits on. Generous: it only matters when
/// something is broken, and the machine may be slow or busy.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The cargo target directory holding the built binaries.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.to_path_buf()
}

/// Path of a workspace binary, with a clear message when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace`, which `make test` does)",
        p.display()
    );
    p
}

/// Runs `f` until it returns `Some`, yielding between tries, for at most
/// [`PATIENCE`]. Panics with `what` when it never does.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Live (not zombie) processes whose parent is `parent`, from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces and parens).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (state, ppid) = (
            fields.first().copied(),
            fields.get(1).and_then(|p| p.parse::<u32>().ok()),
        );
        if ppid == Some(parent) && state != Some("Z") {
            kids.push(pid);
        }
    }
    kids
}

/// CPU time `pid` has used so far (user + system), in seconds; 0 when it
/// is gone. For benchmarks.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (field(11) + field(12)) as f64 / hz
}

/// Is the process gone (or a zombie nobody will ever run again)?
pub fn process_gone(pid: u32) -> bool {
    let raw = nix::unistd::Pid::from_raw(pid as i32);
    if nix::sys::signal::kill(raw, None).is_err() {
        return true;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3, after the parenthesised command name, is the state.
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with('Z') || rest.trim_start().starts_with('X'))
        .unwrap_or(true)
}

/// One pattern entry in the proxy's config.
#[derive(Clone, Debug)]
pub struct PatternEntry {
    pub name: String,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub namespaces: Vec<String>,
    /// Extra YAML lines for the entry, indented under it (e.g. `restart:`).
    pub extra: String,
    pub config: String,
}

impl PatternEntry {
    /// An entry running `command` for `namespaces`, with no args or config.
    pub fn new(name: &str, command: impl Into<PathBuf>, namespaces: &[&str]) -> Self {
        PatternEntry {
            name: name.into(),
            command: command.into(),
            args: vec![],
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            extra: String::new(),
            config: String::new(),
        }
    }
}

#[derive(Default)]
pub struct ProxyBuilder {
    patterns: Vec<PatternEntry>,
    top: String,
    log_level: Option<String>,
    env: Vec<(String, String)>,
    /// Namespace → the traffic policy it names.
    policies: Vec<(String, String)>,
}

impl ProxyBuilder {
    /// A memstore pattern serving `namespaces`.
    pub fn memstore(self, name: &str, namespaces: &[&str]) -> Self {
        self.pattern(PatternEntry::new(name, bin("trellis-memstore"), namespaces))
    }

    /// A `trellis-chaos` pattern (see its source for the misbehaviours)
    /// serving `namespaces`, configured by `config` (YAML for its `config:`).
    pub fn chaos(self, name: &str, namespaces: &[&str], config: &str) -> Self {
        self.pattern(PatternEntry {
            config: config.into(),
            ..PatternEntry::new(name, bin("trellis-chaos"), namespaces)
        })
    }

    /// A `trellis-echo` pattern (a pattern on the raw protocol that shows
    /// what reached it; see its source) serving `namespaces`, configured by
    /// `config` (YAML for its `config:`).
    pub fn echo(self, name: &str, namespaces: &[&str], config: &str) -> Self {
        self.pattern(PatternEntry {
            config: config.into(),
            ..PatternEntry::new(name, bin("trellis-echo"), namespaces)
        })
    }

    pub fn pattern(mut self, p: PatternEntry) -> Self {
        self.patterns.push(p);
        self
    }

    /// Extra YAML for the last pattern entry, e.g. "restart:\n  policy: never".
    pub fn with(mut self, yaml: &str) -> Self {
        if let Some(p) = self.patterns.last_mut() {
            p.extra.push_str(yaml);
            p.extra.push('\n');
        }
        self
    }

    /// The proxy's log level (tests default to `debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.into());
        self
    }

    /// Namespace `ns` uses the policy named `policy` (define it with `top`).
    pub fn policy(mut self, ns: &str, policy: &str) -> Self {
        self.policies.push((ns.into(), policy.into()));
        self
    }

    /// Extra top-level YAML, e.g. "request_timeout: 2s".
    pub fn top(mut self, yaml: &str) -> Self {
        self.top.push_str(yaml);
        self.top.push('\n');
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = format!(
            // The harness reads the `listening` line, so keep the server at info.
            "listen:\n  grpc: 127.0.0.1:0\n  http: 127.0.0.1:0\n  admin: 127.0.0.1:0\nlog:\n  level: \"{},trellis::server=info\"\n",
            self.log_level.as_deref().unwrap_or("debug")
        );
        // Tests stop proxies often: no drain delay unless a test sets one.
        if !self.top.contains("drain_delay:") {
            y.push_str("drain_delay: 0s\n");
        }
        y.push_str(&self.top);
        y.push_str("patterns:\n");
        for p in &self.patterns {
            y.push_str(&format!(
                "  - name: {}\n    command: {:?}\n",
                p.name, p.command
            ));
            if !p.args.is_empty() {
                y.push_str(&format!("    args: {:?}\n", p.args));
            }
            if !p.config.is_empty() {
                y.push_str("    config:\n");
                for l in p.config.lines() {
                    y.push_str(&format!("      {l}\n"));
                }
            }
            for l in p.extra.lines() {
                y.push_str(&format!("    {l}\n"));
            }
        }
        y.push_str("namespaces:\n");
        for p in &self.patterns {
            for ns in &p.namespaces {
                y.push_str(&format!("  - name: {ns}\n    pattern: {}\n", p.name));
                if let Some((_, policy)) = self.policies.iter().find(|(n, _)| n == ns) {
                    y.push_str(&format!("    policy: {policy}\n"));
                }
            }
        }
        y
    }

    /// An environment variable for the proxy (and so its patterns).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the proxy and waits until it listens (not until patterns serve).
    pub async fn spawn(self) -> Proxy {
        Proxy::spawn_with(&self.yaml(), &self.env).await
    }

    /// Starts the proxy and waits until health `""` is SERVING.
    pub async fn start(self) -> Proxy {
        let proxy = self.spawn().await;
        proxy.wait_serving("").await;
        proxy
    }
}

/// A running `trellis` process. Killed (SIGKILL) when dropped.
pub struct Proxy {
    pub child: Child,
    pub addr: String,
    /// The HTTP gateway's base URL, e.g. `http://127.0.0.1:40001`.
    pub http: Option<String>,
    /// The admin door's base URL (gRPC and HTTP/JSON), e.g.
    /// `http://127.0.0.1:40002`; `None` when `listen.admin` is off.
    pub admin: Option<String>,
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Reads the proxy's stderr into `logs`; ends at its end.
    log_reader: Option<tokio::task::JoinHandle<()>>,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::default()
    }

    pub async fn spawn_yaml(yaml: &str) -> Proxy {
        Proxy::spawn_with(yaml, &[]).await
    }

    /// [`Proxy::spawn_yaml`] with extra environment variables.
    pub async fn spawn_with(yaml: &str, env: &[(String, String)]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("trellis.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        let mut child = Command::new(bin("trellis"))
            .arg("--config")
            .arg(&config_path)
            .arg("--log-format")
            .arg("json")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn trellis");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let sink = logs.clone();
        let log_reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(tx) = addr_tx.take() {
                    match listening_addr(&line) {
                        Some(a) => {
                            let _ = tx.send(a);
                        }
                        None => addr_tx = Some(tx),
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (addr, http, admin) = match tokio::time::timeout(PATIENCE, addr_rx).await {
            Ok(Ok(a)) => a,
            _ => panic!(
                "trellis never logged its listening address; its log:\n{}",
                logs.lock().unwrap().join("\n")
            ),
        };
        Proxy {
            child,
            addr: format!("http://{addr}"),
            http: http.map(|h| format!("http://{h}")),
            admin: admin.map(|a| format!("http://{a}")),
            log_reader: Some(log_reader),
            logs,
            config_path,
            _dir: dir,
        }
    }

    /// Live processes whose parent is this proxy.
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("proxy running")
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.addr.clone())
            .expect("uri")
            .connect()
            .await
            .expect("connect to proxy")
    }

    pub async fn kv(&self) -> KeyValueClient<Channel> {
        KeyValueClient::new(self.channel().await)
    }

    /// A channel to the admin door (Admin, reflection, health).
    pub async fn admin_channel(&self) -> Channel {
        let addr = self
            .admin
            .clone()
            .expect("this proxy has no admin door (listen.admin is off)");
        tonic::transport::Endpoint::from_shared(addr)
            .expect("uri")
            .connect()
            .await
            .expect("connect to the admin door")
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.admin_channel().await)
    }

    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// Waits (with the health Watch stream, not polling) until `service` is SERVING.
    pub async fn wait_serving(&self, service: &str) {
        let mut health = self.health().await;
        let mut stream = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let wait = async {
            while let Some(r) = stream.message().await.expect("watch stream") {
                if r.status() == ServingStatus::Serving {
                    return;
                }
            }
            panic!("health watch for {service:?} ended");
        };
        if tokio::time::timeout(PATIENCE, wait).await.is_err() {
            panic!(
                "{service:?} never became SERVING; proxy log:\n{}",
                self.log_text()
            );
        }
    }

    /// The proxy's health for `service` right now (`None` when the check fails).
    pub async fn health_of(&self, service: &str) -> Option<ServingStatus> {
        self.health()
            .await
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status())
    }

    pub async fn pattern(&self, name: &str) -> admin::Pattern {
        self.admin()
            .await
            .get_pattern(admin::GetPatternRequest { name: name.into() })
            .await
            .expect("GetPattern")
            .into_inner()
    }

    /// Waits until the pattern satisfies `pred` (checking GetPattern every
    /// few milliseconds, for at most [`PATIENCE`]) and returns that snapshot.
    pub async fn wait_pattern(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&admin::Pattern) -> bool,
    ) -> admin::Pattern {
        let admin = self.admin().await;
        eventually(what, || {
            let mut admin = admin.clone();
            let name = name.to_string();
            let pred = &pred;
            async move {
                let p = admin
                    .get_pattern(admin::GetPatternRequest { name })
                    .await
                    .ok()?
                    .into_inner();
                pred(&p).then_some(p)
            }
        })
        .await
    }

    /// Admin `Reload`: the proxy reads its configuration file again.
    pub async fn reload(&self) -> Result<admin::ReloadResponse, tonic::Status> {
        self.admin()
            .await
            .reload(admin::ReloadRequest {})
            .await
            .map(|r| r.into_inner())
    }

    /// Replaces `from` (which must be there) with `to` in the running
    /// proxy's configuration file; [`Proxy::reload`] applies it.
    pub fn edit_config(&self, from: &str, to: &str) {
        let yaml = std::fs::read_to_string(&self.config_path).expect("read the config");
        assert!(
            yaml.contains(from),
            "{from:?} is not in the config:\n{yaml}"
        );
        std::fs::write(&self.config_path, yaml.replacen(from, to, 1)).expect("write the config");
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits for the proxy to exit; returns its exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("proxy exits after SIGTERM")
            .expect("wait");
        // Every line it wrote is in `logs` before this returns.
        if let Some(reader) = self.log_reader.take() {
            let _ = tokio::time::timeout(PATIENCE, reader).await;
        }
        status.code()
    }
}

/// The gRPC, HTTP and admin addresses of the proxy's `listening` log line.
fn listening_addr(line: &str) -> Option<(String, Option<String>, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    let door = |name: &str| {
        fields
            .get(name)
            .and_then(|h| h.as_str())
            .filter(|h| *h != "off")
            .map(str::to_string)
    };
    Some((
        fields.get("grpc")?.as_str()?.to_string(),
        door("http"),
        door("admin"),
    ))
}

pub fn state(p: &admin::Pattern) -> admin::PatternState {
    p.state()
}

/// `examples/python-kv/trellis-python-kv`, after checking that Python has
/// the packages the example needs (`make setup` installs them).
pub fn python_example() -> PathBuf {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools, grpc_health"])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{python} lacks grpcio, grpcio-tools or grpcio-health-checking ({}): run `make \
             setup` (scripts/setup-backends.sh installs them with pip)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run {python} ({e}): install Python 3, then run `make setup`"),
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-kv/trellis-python-kv");
    assert!(path.is_file(), "{} is missing", path.display());
    path
}
