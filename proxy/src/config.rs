//! Configuration: plain data, loaded in one place.
//!
//! A YAML file (or the embedded default, `deploy/examples/local.yaml`) is
//! merged with `TRELLIS_`-prefixed environment variables (`__` separates
//! nesting: `TRELLIS_LISTEN__GRPC=127.0.0.1:9000`), extracted into [`Config`]
//! with serde (unknown fields are rejected), then checked by [`Config::validate`]
//! which reports *every* problem at once, each naming the file, the field and
//! what is allowed. Nothing else in the proxy reads files or the environment
//! for configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Yaml};
use serde::Deserialize;

/// The embedded default configuration, used when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../deploy/examples/local.yaml");
/// How the embedded default is named in messages.
pub const EMBEDDED_NAME: &str = "<embedded default config (deploy/examples/local.yaml)>";

/// Top-level keys that `TRELLIS_*` environment variables may override. Other
/// `TRELLIS_*` variables (the CLI's `TRELLIS_ADDR`, the pattern protocol's
/// `TRELLIS_PATTERN_*`) are not configuration and are ignored here.
const ENV_ROOTS: &[&str] = &[
    "listen",
    "log",
    "request_timeout",
    "shutdown_grace",
    "drain_delay",
    "worker_threads",
    "http",
    "telemetry",
    "policies",
    "max_in_flight",
];

/// Largest name length, for patterns and namespaces.
pub const MAX_NAME_LEN: usize = 63;

/// The most `worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

/// `worker_threads` when the config leaves it out: half the cores, at least
/// one (one runs the current-thread scheduler). The proxy shares the
/// machine with its patterns, and a forwarded call costs the pattern at
/// least as much CPU as the proxy; measured with `make bench-peers` on 2
/// cores, one worker served 25–40 % more calls than two and added 35–50 µs
/// less (docs/configuration.md, "Choosing `worker_threads`").
pub fn default_worker_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// The most `http.limits.max_discard` accepted (1 GiB): reading more than
/// that only to throw it away is a misconfiguration, not a kindness.
pub const MAX_DISCARD: u64 = 1 << 30;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    /// TLS on every door (gRPC, HTTP, admin); absent: plaintext (fine on
    /// loopback, not beyond it).
    pub tls: Option<crate::tls::Settings>,
    pub log: Log,
    /// Upper bound on every forwarded data call (a client's own shorter
    /// deadline wins).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long the proxy waits for all patterns to stop on shutdown before
    /// it kills what is left.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGTERM/SIGINT, how long health `""` answers NOT_SERVING while
    /// calls are still served, before the doors close: the time a load
    /// balancer needs to take the proxy out of rotation.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Where Unix sockets of `transport: unix` patterns are created, each
    /// run in a private folder of its own inside it; default
    /// `$XDG_RUNTIME_DIR/trellis` or `/tmp/trellis-<uid>`.
    pub socket_dir: Option<PathBuf>,
    /// Threads that run the proxy: absent = half the cores, at least one
    /// ([`default_worker_threads`]); `1` = a single-threaded runtime. Like
    /// Envoy's `--concurrency` or linkerd2-proxy's `CORES`.
    pub worker_threads: Option<usize>,
    pub http: Http,
    /// Metrics, the per-call log and traces.
    pub telemetry: Telemetry,
    /// Named traffic policies for namespaces (see `policy.rs`).
    pub policies: BTreeMap<String, crate::policy::Policy>,
    /// Data calls in flight in the whole proxy beyond which new ones are
    /// refused at once (load shedding), whatever their namespace.
    pub max_in_flight: u32,
    pub patterns: Vec<PatternConfig>,
    pub namespaces: Vec<NamespaceConfig>,
    /// Who may call: bearer tokens (by SHA-256 or in a file) and
    /// certificate names (see `access.rs`).
    pub identities: Vec<crate::access::IdentityConfig>,
    /// Roles per identity and namespace; absent: nothing is checked.
    pub access: Option<Vec<crate::access::Grant>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Listen::default(),
            tls: None,
            log: Log::default(),
            request_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(15),
            drain_delay: Duration::from_secs(3),
            socket_dir: None,
            worker_threads: None,
            http: Http::default(),
            telemetry: Telemetry::default(),
            policies: BTreeMap::new(),
            max_in_flight: 10_000,
            patterns: Vec::new(),
            namespaces: Vec::new(),
            identities: Vec::new(),
            access: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// The gRPC front door: the data API and health.
    pub grpc: SocketAddr,
    /// The HTTP/JSON front door (the data API transcoded, health probes,
    /// `/metrics`); `null` turns it off.
    pub http: Option<SocketAddr>,
    /// The admin door: the admin API over gRPC and HTTP/JSON on one port,
    /// with reflection, health and `/metrics`; `null` turns it off (no
    /// admin API at all). Loopback by default: whoever reaches it can stop
    /// every pattern.
    pub admin: Option<SocketAddr>,
    /// For a single-port setup: the admin API on the data doors as well.
    /// Only with `access:` granting someone the `admin` role (an admin API
    /// anyone could call would let every client stop every pattern).
    pub admin_on_data_doors: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            grpc: SocketAddr::from(([127, 0, 0, 1], 8980)),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8981))),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 8982))),
            admin_on_data_doors: false,
        }
    }
}

/// The HTTP gateway's limits and header mapping.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    pub limits: HttpLimits,
    pub headers: HeaderMapping,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Largest request body (413 above it).
    pub max_body: bytesize::ByteSize,
    /// How much more of a too-large HTTP/1.1 body is read and thrown away
    /// before the 413, so a client that writes its whole body before reading
    /// gets the answer instead of a reset; beyond it the connection is just
    /// closed. `0`: never.
    pub max_discard: bytesize::ByteSize,
    /// Largest total size of the request headers (431 above it).
    pub max_header_bytes: bytesize::ByteSize,
    /// Longest request target, path and query (414 above it).
    pub max_uri_bytes: usize,
    /// Deepest JSON nesting in a body (400 above it).
    pub max_json_depth: usize,
    /// Time allowed to receive a request's headers, and again its body
    /// (slow-loris and stalled uploads get 408 or are closed).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body: bytesize::ByteSize::mib(4),
            max_discard: bytesize::ByteSize::mib(64),
            max_header_bytes: bytesize::ByteSize::kib(16),
            max_uri_bytes: 8192,
            max_json_depth: 32,
            read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Declarative header mapping between HTTP and gRPC metadata, on top of the
/// built-in rules (X-Request-ID, traceparent/tracestate, Authorization).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderMapping {
    /// Incoming HTTP header → gRPC metadata sent to the pattern.
    pub request: Vec<HeaderRule>,
    /// gRPC response metadata → HTTP response header.
    pub response: Vec<HeaderRule>,
    /// Request paths (exact) on which no mapping rule applies.
    pub skip_paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    pub from: String,
    pub to: String,
    /// Used when the header is absent.
    #[serde(default)]
    pub default: Option<String>,
    /// Removed from the front of the value, e.g. "Bearer ".
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Trim surrounding white space.
    #[serde(default)]
    pub trim: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text, coloured when stderr is a terminal.
    #[default]
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `trellis=debug,info`;
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// `telemetry:`: what the proxy tells operators about the calls it serves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Telemetry {
    /// Per-call metrics (`rpc_*_call_duration_seconds`, …) and `GET
    /// /metrics` on the HTTP port. Off: neither.
    pub metrics: bool,
    /// One structured line per data call.
    pub call_log: CallLog,
    /// OpenTelemetry traces, exported over OTLP/gRPC.
    pub traces: Traces,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            metrics: true,
            call_log: CallLog::default(),
            traces: Traces::default(),
        }
    }
}

/// The level of the per-call log line: calls that failed, and calls that
/// succeeded. The line is written only where `log.level` lets that level
/// through for the target `trellis::calls`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CallLog {
    pub errors: CallLogLevel,
    pub successes: CallLogLevel,
}

impl Default for CallLog {
    fn default() -> Self {
        CallLog {
            errors: CallLogLevel::Info,
            successes: CallLogLevel::Debug,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CallLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// `telemetry.traces:`. Off unless an endpoint is given here or in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_TRACES_SAMPLER_ARG` (with
/// `OTEL_TRACES_SAMPLER=traceidratio` or `parentbased_traceidratio`) and
/// `OTEL_SERVICE_NAME` fill in what the file leaves out.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Traces {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: Option<String>,
    /// The share of new traces recorded, 0.0 to 1.0; a call that arrives
    /// with a sampled `traceparent` is always recorded (parent-based).
    pub sampling_ratio: Option<f64>,
    /// `service.name` of the proxy's spans.
    pub service_name: Option<String>,
}

impl Traces {
    /// Fills what the file left out from the standard `OTEL_*` variables.
    pub fn with_env(mut self, env: &[(String, String)]) -> Self {
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if self.endpoint.is_none() {
            self.endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        }
        if self.sampling_ratio.is_none()
            && var("OTEL_TRACES_SAMPLER")
                .is_some_and(|s| s == "traceidratio" || s == "parentbased_traceidratio")
        {
            self.sampling_ratio = var("OTEL_TRACES_SAMPLER_ARG").and_then(|v| v.parse().ok());
        }
        if self.service_name.is_none() {
            self.service_name = var("OTEL_SERVICE_NAME");
        }
        self
    }

    /// The sampling ratio in effect (1.0 when unset).
    pub fn ratio(&self) -> f64 {
        self.sampling_ratio.unwrap_or(1.0)
    }

    /// The service name in effect.
    pub fn service(&self) -> &str {
        self.service_name.as_deref().unwrap_or("trellis")
    }

    /// The standard OpenTelemetry variables a pattern gets so that it
    /// exports its spans where the proxy does: none when traces are off.
    pub fn pattern_env(&self, pattern: &str) -> Vec<(String, String)> {
        let Some(endpoint) = &self.endpoint else {
            return Vec::new();
        };
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
            (
                "OTEL_TRACES_SAMPLER".into(),
                "parentbased_traceidratio".into(),
            ),
            ("OTEL_TRACES_SAMPLER_ARG".into(), self.ratio().to_string()),
            ("OTEL_SERVICE_NAME".into(), pattern.to_string()),
        ]
    }
}

/// One supervised pattern process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PatternConfig {
    pub name: String,
    /// The executable: a path (relative paths are resolved against the config
    /// file's folder) or a bare name looked up next to the config file, next
    /// to the `trellis` executable, then on `PATH`.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The pattern's own configuration, handed over in `Initialize`.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Handshake + connect + Initialize/Start + first SERVING must fit in it.
    #[serde(default = "defaults::startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Time a pattern gets after lifecycle Stop, and again after SIGTERM,
    /// before the next, harder step.
    #[serde(default = "defaults::stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// A start slower than this is logged as slow (it still counts as a
    /// start as long as it fits `startup_timeout`).
    #[serde(default = "defaults::slow_start", with = "humantime_serde")]
    pub slow_start_warning: Duration,
    /// How the proxy reaches the pattern: `unix` (default: a socket in the
    /// run's private folder under `socket_dir`) or `tcp` (loopback).
    #[serde(default)]
    pub transport: Transport,
    /// For tcp: `auto` (default: the pattern binds port 0, so no conflict can
    /// happen), a fixed port such as `9100`, or a range such as `"9100-9199"`
    /// (the first free port in it is used).
    #[serde(default)]
    pub port: PortSpec,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub limits: Limits,
    /// How many processes run this pattern: `NAME` alone when 1, else
    /// `NAME-0 … NAME-(N-1)`, each supervised on its own; every call goes
    /// to one of them (docs/configuration.md, "Replicas").
    #[serde(default = "defaults::replicas")]
    pub replicas: u32,
    /// The pattern keeps its data in its own process (as memstore does),
    /// so replicas would not share it: `replicas` above 1 is refused. A
    /// pattern can also say so itself, in `InitializeResponse.stateful`.
    #[serde(default)]
    pub stateful: bool,
    /// When a replica is left out of the balancing (with replicas > 1).
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
}

/// The most replicas a pattern may have.
pub const MAX_REPLICAS: u32 = 32;

/// Outlier ejection, as Envoy's outlier detection does it: a replica
/// whose calls fail `consecutive_failures` times in a row (the proxy
/// could not reach it, or it answered UNAVAILABLE) is left out of the
/// balancing for `base_ejection_time` × the times it was ejected (less one
/// for each `base_ejection_time` it stayed in since), at most
/// `max_ejection_time`; never more than `max_ejection_percent` of the
/// replicas at once.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl PatternConfig {
    /// The name of replica `index` (`None`: the pattern's only process).
    pub fn replica_name(&self, index: Option<u32>) -> String {
        match index {
            None => self.name.clone(),
            Some(i) => format!("{}-{i}", self.name),
        }
    }

    /// Its processes: `[None]` for one, `[Some(0) … Some(N-1)]` for more.
    pub fn replica_indices(&self) -> Vec<Option<u32>> {
        if self.replicas <= 1 {
            vec![None]
        } else {
            (0..self.replicas).map(Some).collect()
        }
    }

    /// Whether `other` runs the same processes: everything but the
    /// settings that change no process (`replicas`, `stateful`,
    /// `outlier_detection`) is equal. A reload keeps such a pattern's
    /// processes.
    pub fn same_process(&self, other: &PatternConfig) -> bool {
        let like_other = PatternConfig {
            replicas: other.replicas,
            stateful: other.stateful,
            outlier_detection: other.outlier_detection.clone(),
            ..self.clone()
        };
        like_other == *other
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Loopback TCP: any local process can connect, so the per-start
    /// secret is what keeps them out.
    Tcp,
    /// A Unix domain socket in this proxy run's folder under `socket_dir`
    /// (mode 0700: only the proxy's user can reach it).
    #[default]
    Unix,
}

/// Which TCP port a pattern binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortSpec {
    #[default]
    Auto,
    Fixed(u16),
    /// Inclusive range.
    Range(u16, u16),
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        const ALLOWED: &str =
            "allowed: auto, a port such as 9100, or a range such as \"9100-9199\"";
        let bad =
            |what: &str| serde::de::Error::custom(format!("{what:?} is not a port; {ALLOWED}"));
        let port = |n: i64| u16::try_from(n).ok().filter(|p| *p > 0);
        match Raw::deserialize(d)? {
            Raw::Num(n) => port(n)
                .map(PortSpec::Fixed)
                .ok_or_else(|| bad(&n.to_string())),
            Raw::Text(t) if t == "auto" => Ok(PortSpec::Auto),
            Raw::Text(t) => {
                let parse = |s: &str| s.trim().parse::<i64>().ok().and_then(port);
                match t.split_once('-') {
                    None => parse(&t).map(PortSpec::Fixed).ok_or_else(|| bad(&t)),
                    Some((a, b)) => match (parse(a), parse(b)) {
                        (Some(a), Some(b)) if a <= b => Ok(PortSpec::Range(a, b)),
                        _ => Err(bad(&t)),
                    },
                }
            }
        }
    }
}

/// Resource limits for one pattern process.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Resident memory (read from /proc at every health interval); above
    /// it the pattern is restarted with reason "memory limit exceeded".
    /// E.g. "256MiB".
    pub memory: Option<bytesize::ByteSize>,
    /// RLIMIT_NOFILE applied at spawn.
    pub open_files: Option<u64>,
    /// RLIMIT_AS applied at spawn, e.g. "4GiB".
    pub address_space: Option<bytesize::ByteSize>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed checks before a serving pattern is NOT_SERVING.
    pub failure_threshold: u32,
    /// Restart a pattern (by its restart policy) after `failure_threshold`
    /// checks in a row got *no answer* (timeout, connection refused): the
    /// process is hung. A pattern that answers NOT_SERVING (say, its database
    /// is down) is never restarted for it; its namespaces answer UNAVAILABLE
    /// until it recovers.
    pub restart_when_unresponsive: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            failure_threshold: 3,
            restart_when_unresponsive: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever the process exits, whatever its status.
    #[default]
    Always,
    /// Restart only after a non-zero exit or a signal.
    OnFailure,
    /// Never restart; the pattern stays down until an operator starts it.
    Never,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    pub policy: RestartPolicy,
    /// First delay before a restart.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between restarts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// The backoff returns to `initial_backoff` once the pattern has been
    /// serving this long.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
    /// Crash-loop breaker: more than `max_starts` starts within
    /// `start_window` and the pattern is FAILED…
    pub max_starts: u32,
    #[serde(with = "humantime_serde")]
    pub start_window: Duration,
    /// …until `cool_down` has passed (then it is started again, as
    /// Kubernetes' CrashLoopBackOff does at its cap) or an operator starts
    /// it; `null`: until an operator starts it.
    #[serde(with = "humantime_serde")]
    pub cool_down: Option<Duration>,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            policy: RestartPolicy::Always,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            reset_after: Duration::from_secs(60),
            max_starts: 5,
            start_window: Duration::from_secs(60),
            cool_down: Some(Duration::from_secs(300)),
        }
    }
}

mod defaults {
    use std::time::Duration;
    pub fn startup_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn stop_grace() -> Duration {
        Duration::from_secs(5)
    }
    pub fn slow_start() -> Duration {
        Duration::from_secs(2)
    }
    pub fn replicas() -> u32 {
        1
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    /// The name of the pattern that serves this namespace.
    pub pattern: String,
    /// The traffic policy (a name under `policies:`); absent: `default`.
    #[serde(default)]
    pub policy: Option<String>,
}

/// Where a configuration came from; named in every error.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl Source {
    /// The folder relative command paths are resolved against.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Source::File(p) => p.parent(),
            Source::Embedded => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str(EMBEDDED_NAME),
        }
    }
}

/// A configuration that could not be loaded: every problem found, each
/// naming the field and what is allowed.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted path with list indices, e.g. `patterns[0].name`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration in {} ({} problem{}):",
            self.source_name,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

/// What the proxy learns about its host when it reads its configuration:
/// where pattern commands are looked for and where sockets go. Read here,
/// once, like the rest of the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Host {
    /// The folder of the running `trellis` binary (bare commands are found
    /// beside it first).
    pub exe_dir: Option<PathBuf>,
    /// `PATH`, searched for bare commands after `exe_dir`.
    pub path: Option<std::ffi::OsString>,
    /// `XDG_RUNTIME_DIR`: the default `socket_dir` is `trellis` in it.
    pub runtime_dir: Option<PathBuf>,
}

impl Host {
    /// From `env` (the process environment, passed in) and the running
    /// binary's path.
    pub fn from_env<'a>(env: impl IntoIterator<Item = &'a (String, String)>) -> Host {
        let mut host = Host {
            exe_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf)),
            ..Host::default()
        };
        for (k, v) in env {
            match k.as_str() {
                "PATH" => host.path = Some(v.into()),
                "XDG_RUNTIME_DIR" if !v.is_empty() => host.runtime_dir = Some(v.into()),
                _ => {}
            }
        }
        host
    }

    /// `socket_dir` when the config sets none: `$XDG_RUNTIME_DIR/trellis`,
    /// or `/tmp/trellis-<uid>`.
    pub fn default_socket_dir(&self) -> PathBuf {
        match &self.runtime_dir {
            Some(d) => d.join("trellis"),
            None => std::env::temp_dir().join(format!("trellis-{}", nix::unistd::getuid())),
        }
    }
}

/// A loaded, validated configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub source: Source,
    /// The environment overrides it was read with (`TRELLIS_*`, `OTEL_*`),
    /// applied again by a reload.
    pub env: Vec<(String, String)>,
    pub host: Host,
}

impl Loaded {
    /// Reads the same source again, with the same overrides (a reload).
    pub fn reread(&self) -> Result<Loaded, ConfigError> {
        let path = match &self.source {
            Source::File(p) => Some(p.as_path()),
            Source::Embedded => None,
        };
        let mut again = load(path, self.env.clone())?;
        // The host does not change under a running proxy.
        again.host = self.host.clone();
        Ok(again)
    }
}

/// The settings a running proxy cannot change, each a `(field, old ==
/// new)` check; a reload that changes one is refused, naming it.
pub fn fixed_changes(old: &Config, new: &Config) -> Vec<Problem> {
    let restart = "cannot change while the proxy runs; restart the proxy to apply it, or put                    back the running value";
    // `tls`: the same files are read again on every reload; turning TLS
    // on or off, or other files, needs a restart.
    let checks: [(&str, bool); 8] = [
        ("log", old.log == new.log),
        ("tls", old.tls == new.tls),
        (
            "listen.admin_on_data_doors",
            old.listen.admin_on_data_doors == new.listen.admin_on_data_doors,
        ),
        ("socket_dir", old.socket_dir == new.socket_dir),
        ("worker_threads", old.worker_threads == new.worker_threads),
        ("http", old.http == new.http),
        ("telemetry", old.telemetry == new.telemetry),
        ("shutdown_grace", old.shutdown_grace == new.shutdown_grace),
    ];
    checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(field, _)| Problem {
            field: field.to_string(),
            message: restart.to_string(),
        })
        .collect()
}

/// Loads `path` (or the embedded default when `None`), applies `TRELLIS_*`
/// overrides from `env`, and validates. `env` is passed in so tests never
/// touch the process environment.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let (source, yaml) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                source_name: p.display().to_string(),
                problems: vec![Problem {
                    field: "(file)".into(),
                    message: format!(
                        "cannot read the file: {e}; pass an existing YAML file with --config, \
                         or omit --config to use the embedded default"
                    ),
                }],
            })?;
            (Source::File(p.to_path_buf()), text)
        }
        None => (Source::Embedded, EMBEDDED_DEFAULT.to_string()),
    };
    let all: Vec<(String, String)> = env.into_iter().collect();
    let host = Host::from_env(&all);
    let env: Vec<(String, String)> = all
        .into_iter()
        .filter(|(k, _)| k.starts_with("TRELLIS_") || k.starts_with("OTEL_"))
        .collect();
    let config = parse(&yaml, &source, env.clone())?;
    config.validate().map_err(|problems| ConfigError {
        source_name: source.to_string(),
        problems,
    })?;
    Ok(Loaded {
        config,
        source,
        env,
        host,
    })
}

/// Parses YAML text plus environment overrides into a [`Config`] without
/// semantic validation.
pub fn parse(
    yaml: &str,
    source: &Source,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let otel: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("OTEL_"))
        .cloned()
        .collect();
    let env_pairs: Vec<(String, String)> = env
        .into_iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("TRELLIS_")?.to_ascii_lowercase();
            let key = rest.replace("__", ".");
            let root = key.split('.').next().unwrap_or_default();
            ENV_ROOTS.contains(&root).then_some((key, v))
        })
        .collect();
    let env_keys: Vec<String> = env_pairs.iter().map(|(k, _)| k.clone()).collect();
    let mut figment = Figment::new().merge(Yaml::string(yaml));
    for (key, value) in &env_pairs {
        figment = figment.merge(Serialized::global(key, value_of(value)));
    }
    let mut config = figment.extract::<Config>().map_err(|e| ConfigError {
        source_name: source.to_string(),
        problems: e
            .into_iter()
            .map(|e| figment_problem(e, &env_keys))
            .collect(),
    })?;
    config.telemetry.traces = config.telemetry.traces.with_env(&otel);
    Ok(config)
}

/// Environment values are strings; let figment parse numbers and booleans
/// the way its own `Env` provider does.
fn value_of(s: &str) -> figment::value::Value {
    match s.parse::<figment::value::Value>() {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

fn figment_problem(e: figment::Error, env_keys: &[String]) -> Problem {
    let dotted = e.path.join(".");
    // `patterns.0.port` → `patterns[0].port`, as validation names fields.
    let mut field = String::new();
    for seg in &e.path {
        if seg.parse::<usize>().is_ok() {
            field.push_str(&format!("[{seg}]"));
        } else {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(seg);
        }
    }
    if field.is_empty() {
        field = "(top level)".to_string();
    }
    let mut message = e.kind.to_string();
    if let Some(k) = env_keys.iter().find(|k| **k == dotted) {
        let var = format!("TRELLIS_{}", k.to_ascii_uppercase().replace('.', "__"));
        message.push_str(&format!(" (set by the environment variable {var})"));
    }
    Problem { field, message }
}

/// Allowed characters in pattern and namespace names, as said in errors.
pub const NAME_RULE: &str =
    "1 to 63 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit";

/// [`NAME_RULE`] as a regular expression, for the OpenAPI document's
/// `namespace` and pattern `name` parameters; a test holds it to
/// [`valid_name`].
pub const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,62}$";

/// Checks a pattern or namespace name against [`NAME_RULE`]. Names end up in
/// log fields, health service names and URL paths, never in a shell.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// An identity's name: what a certificate's DNS or URI SAN or CN may be
/// (`app-c`, `spiffe://example.org/app`), and what a token names.
pub fn valid_identity(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:/@".contains(c))
}

/// What is wrong with `p`'s `replicas`, `stateful` and
/// `outlier_detection` (`all`: every pattern, for name clashes).
fn replica_problems(p: &PatternConfig, all: &[PatternConfig]) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let n = p.replicas;
    if !(1..=MAX_REPLICAS).contains(&n) {
        problems.push((
            "replicas",
            format!("{n} is out of range; allowed: 1 to {MAX_REPLICAS}"),
        ));
    }
    if n > 1 && p.stateful {
        problems.push((
            "replicas",
            format!(
                "pattern {:?} is stateful (it keeps its data in its own process), so {n} \
                 replicas would each hold different data; set `replicas: 1`, or use a pattern \
                 over a shared backend (redis, postgres)",
                p.name
            ),
        ));
    }
    if n > 1 && p.transport == Transport::Tcp {
        match p.port {
            PortSpec::Fixed(port) => problems.push((
                "port",
                format!(
                    "{port} is one port, and {n} replicas need one each; use `auto`, a range \
                     such as \"{port}-{}\", or the unix transport",
                    port.saturating_add(n as u16 - 1)
                ),
            )),
            PortSpec::Range(a, b) if u32::from(b - a) + 1 < n => problems.push((
                "port",
                format!(
                    "the range {a}-{b} has {} ports, and {n} replicas need one each; widen it \
                     or use `auto`",
                    b - a + 1
                ),
            )),
            _ => {}
        }
    }
    if n > 1 {
        for other in all.iter().filter(|o| o.name != p.name) {
            if let Some(i) = p
                .replica_indices()
                .into_iter()
                .find(|&i| p.replica_name(i) == other.name)
            {
                problems.push((
                    "name",
                    format!(
                        "replica {} of {:?} would have the name of pattern {:?}; rename one \
                         of them",
                        i.unwrap_or(0),
                        p.name,
                        other.name
                    ),
                ));
            }
        }
    }
    let o = &p.outlier_detection;
    if o.consecutive_failures == 0 {
        problems.push((
            "outlier_detection.consecutive_failures",
            "must be at least 1".into(),
        ));
    }
    if o.base_ejection_time.is_zero() || o.base_ejection_time > crate::policy::MAX_DURATION {
        problems.push((
            "outlier_detection.base_ejection_time",
            "must be greater than zero and at most 1h, e.g. \"30s\"".into(),
        ));
    }
    if o.max_ejection_time < o.base_ejection_time
        || o.max_ejection_time > crate::policy::MAX_DURATION
    {
        problems.push((
            "outlier_detection.max_ejection_time",
            "must be at least outlier_detection.base_ejection_time and at most 1h, e.g. \"300s\""
                .into(),
        ));
    }
    if o.max_ejection_percent > 50 {
        problems.push((
            "outlier_detection.max_ejection_percent",
            format!(
                "{} is out of range; allowed: 0 (never eject) to 50 (half the replicas)",
                o.max_ejection_percent
            ),
        ));
    }
    problems
}

impl Config {
    /// Semantic checks serde cannot express. Returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |field: String, message: String| problems.push(Problem { field, message });

        if self.listen.admin_on_data_doors {
            let has_admin = self
                .access
                .as_ref()
                .is_some_and(|grants| grants.iter().any(|g| g.roles.iter().any(|r| r == "admin")));
            if !has_admin {
                bad(
                    "listen.admin_on_data_doors".into(),
                    "needs an `access:` section granting some identity the `admin` role: \
                     without it, every client of the data doors could stop every pattern; \
                     add one, or leave the admin API on listen.admin"
                        .into(),
                );
            }
        }
        // Each door its own address (port 0 picks a free one each).
        let doors = [
            ("listen.grpc", Some(self.listen.grpc)),
            ("listen.http", self.listen.http),
            ("listen.admin", self.listen.admin),
        ];
        for (i, (field, addr)) in doors.iter().enumerate() {
            if let Some(a) = addr.filter(|a| a.port() != 0)
                && let Some((other, _)) = doors[..i].iter().find(|(_, b)| *b == Some(a))
            {
                bad(
                    field.to_string(),
                    format!("is {a}, the address of {other} too; give each door its own port"),
                );
            }
        }
        if self.drain_delay > crate::policy::MAX_DURATION {
            bad(
                "drain_delay".into(),
                "is out of range; allowed: 0s (no delay) to 1h, e.g. \"5s\"".into(),
            );
        }
        if self.request_timeout.is_zero() || self.request_timeout > crate::policy::MAX_DURATION {
            bad(
                "request_timeout".into(),
                "must be greater than zero and at most 1h, e.g. \"5s\"".into(),
            );
        }
        let traces = &self.telemetry.traces;
        if let Some(r) = traces.sampling_ratio
            && !(0.0..=1.0).contains(&r)
        {
            bad(
                "telemetry.traces.sampling_ratio".into(),
                format!("{r} is out of range; allowed: 0.0 (none) to 1.0 (every trace)"),
            );
        }
        let is_url = |e: &str| {
            (e.starts_with("http://") || e.starts_with("https://"))
                && e.parse::<http::Uri>().is_ok()
        };
        if traces.endpoint.as_deref().is_some_and(|e| !is_url(e)) {
            bad(
                "telemetry.traces.endpoint".into(),
                format!(
                    "{:?} is not a collector URL; allowed: http://host:port or https://host:port \
                     (OTLP/gRPC, usually port 4317)",
                    traces.endpoint.as_deref().unwrap_or_default()
                ),
            );
        }
        if let Some(n) = self.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            bad(
                "worker_threads".into(),
                format!(
                    "{n} is out of range; allowed: 1 to {MAX_WORKER_THREADS}, or leave it out \
                     for one thread per core"
                ),
            );
        }
        for (side, rules) in [
            ("request", &self.http.headers.request),
            ("response", &self.http.headers.response),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let at = |f: &str| format!("http.headers.{side}[{i}].{f}");
                for (f, name) in [("from", &r.from), ("to", &r.to)] {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        bad(at(f), format!("{name:?} is not a valid header name"));
                    } else if crate::metadata::is_hop_by_hop(name) {
                        bad(
                            at(f),
                            format!("{name} is a hop-by-hop header and is never forwarded"),
                        );
                    }
                }
            }
        }
        let limits = &self.http.limits;
        for (f, n) in [
            ("max_json_depth", limits.max_json_depth),
            ("max_connections", limits.max_connections),
        ] {
            if n == 0 {
                bad(format!("http.limits.{f}"), "must be at least 1".into());
            }
        }
        if limits.read_timeout.is_zero() {
            bad(
                "http.limits.read_timeout".into(),
                "must be greater than zero, e.g. \"10s\"".into(),
            );
        }
        if limits.max_discard.as_u64() > MAX_DISCARD {
            bad(
                "http.limits.max_discard".into(),
                format!(
                    "{} is too much to read only to throw away; allowed: 0 (never) to {}",
                    limits.max_discard,
                    bytesize::ByteSize(MAX_DISCARD)
                ),
            );
        }
        let mut seen = BTreeMap::new();
        for (i, p) in self.patterns.iter().enumerate() {
            let at = |f: &str| format!("patterns[{i}].{f}");
            if !valid_name(&p.name) {
                bad(
                    at("name"),
                    format!("{:?} is not a valid name; allowed: {NAME_RULE}", p.name),
                );
            } else if let Some(first) = seen.insert(p.name.as_str(), i) {
                bad(
                    at("name"),
                    format!(
                        "{:?} is already the name of patterns[{first}]; names must be unique",
                        p.name
                    ),
                );
            }
            if p.command.trim().is_empty() {
                bad(
                    at("command"),
                    "must name an executable, e.g. \"trellis-memstore\"".into(),
                );
            }
            if p.command.contains('\0') || p.args.iter().any(|a| a.contains('\0')) {
                bad(at("command"), "must not contain NUL bytes".into());
            }
            for k in p.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    bad(
                        at("env"),
                        format!("{k:?} is not a valid environment variable name"),
                    );
                } else if k.starts_with(trellis_proto::protocol::env::PREFIX) {
                    bad(
                        at("env"),
                        format!("{k} is reserved for the pattern protocol and set by the proxy"),
                    );
                } else if crate::notify::MANAGER_VARIABLES.contains(&k.as_str()) {
                    bad(
                        at("env"),
                        format!(
                            "{k} belongs to the service manager (systemd) and the proxy alone: \
                             a pattern must not notify on the proxy's behalf; remove it"
                        ),
                    );
                }
            }
            if !(p.config.is_object() || p.config.is_null()) {
                bad(
                    at("config"),
                    "must be a mapping (key: value pairs) or absent".into(),
                );
            }
            for (f, d) in [
                ("startup_timeout", p.startup_timeout),
                ("stop_grace", p.stop_grace),
                ("health.interval", p.health.interval),
                ("health.timeout", p.health.timeout),
                ("restart.initial_backoff", p.restart.initial_backoff),
                ("restart.max_backoff", p.restart.max_backoff),
                ("restart.start_window", p.restart.start_window),
            ] {
                if d.is_zero() {
                    bad(
                        at(f),
                        "must be greater than zero, e.g. \"1s\" or \"250ms\"".into(),
                    );
                }
            }
            if p.transport == Transport::Unix && p.port != PortSpec::Auto {
                bad(
                    at("port"),
                    "applies to transport tcp only; add `transport: tcp` to use a port, or \
                     remove it (the default transport is unix)"
                        .into(),
                );
            }
            if p.limits.open_files == Some(0) {
                bad(
                    at("limits.open_files"),
                    "must be at least 1 (or absent for no limit)".into(),
                );
            }
            if p.health.failure_threshold == 0 {
                bad(at("health.failure_threshold"), "must be at least 1".into());
            }
            if !(p.restart.multiplier >= 1.0 && p.restart.multiplier <= 100.0) {
                bad(
                    at("restart.multiplier"),
                    "must be between 1.0 and 100.0".into(),
                );
            }
            if p.restart.max_backoff < p.restart.initial_backoff {
                bad(
                    at("restart.max_backoff"),
                    "must be at least restart.initial_backoff".into(),
                );
            }
            if p.restart
                .cool_down
                .is_some_and(|d| d < Duration::from_secs(1))
            {
                bad(
                    at("restart.cool_down"),
                    "must be at least 1s; `null` keeps a FAILED pattern down until an operator starts it".into(),
                );
            }
            if p.restart.max_starts == 0 {
                bad(at("restart.max_starts"), "must be at least 1".into());
            }
            for (field, message) in replica_problems(p, &self.patterns) {
                bad(at(field), message);
            }
        }
        const METHODS: &[&str] = &["Get", "Put", "Delete", "List", "Publish", "Subscribe"];
        for (name, policy) in &self.policies {
            if !valid_name(name) {
                bad(
                    format!("policies.{name}"),
                    format!("{name:?} is not a valid policy name; allowed: {NAME_RULE}"),
                );
            }
            for (field, message) in crate::policy::validate(name, policy, METHODS) {
                bad(field, message);
            }
        }
        if self.max_in_flight == 0 {
            bad(
                "max_in_flight".into(),
                "must be at least 1; it bounds the data calls the whole proxy holds at once".into(),
            );
        }
        let mut seen_ns = BTreeMap::new();
        for (i, n) in self.namespaces.iter().enumerate() {
            let at = |f: &str| format!("namespaces[{i}].{f}");
            if let Some(policy) = &n.policy
                && policy != crate::policy::DEFAULT
                && !self.policies.contains_key(policy)
            {
                let known: Vec<&str> = self.policies.keys().map(String::as_str).collect();
                bad(
                    at("policy"),
                    format!(
                        "no policy is named {policy:?}; allowed: one of the names under `policies:` ({}), or `default`",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            if !valid_name(&n.name) {
                bad(
                    at("name"),
                    format!("{:?} is not a valid name; allowed: {NAME_RULE}", n.name),
                );
            } else if let Some(first) = seen_ns.insert(n.name.as_str(), i) {
                bad(
                    at("name"),
                    format!(
                        "{:?} is already the name of namespaces[{first}]; names must be unique",
                        n.name
                    ),
                );
            }
            if !self.patterns.iter().any(|p| p.name == n.pattern) {
                let known: Vec<&str> = self.patterns.iter().map(|p| p.name.as_str()).collect();
                bad(
                    at("pattern"),
                    format!(
                        "no pattern is named {:?}; allowed: one of the names under `patterns:` ({})",
                        n.pattern,
                        if known.is_empty() {
                            "none defined".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
        // Reads the token files: a file that cannot be read fails here, at
        // load and at reload, not on the first call.
        if let Err(more) = crate::access::Rules::of(self) {
            problems.extend(more);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Finds a pattern's executable: a command containing `/` is a path (relative
/// to the config file's folder); a bare name is looked for in the config
/// file's folder, next to the `trellis` executable, then on `PATH`. Returns
/// the places searched on failure, so the error can list them.
pub fn resolve_command(
    command: &str,
    config_dir: Option<&Path>,
    exe_dir: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, Vec<PathBuf>> {
    let cmd = Path::new(command);
    if command.contains('/') {
        let full = match (cmd.is_absolute(), config_dir) {
            (false, Some(dir)) => dir.join(cmd),
            _ => cmd.to_path_buf(),
        };
        return if full.is_file() {
            Ok(full)
        } else {
            Err(vec![full])
        };
    }
    let mut searched = Vec::new();
    let dirs = config_dir
        .into_iter()
        .map(Path::to_path_buf)
        .chain(exe_dir.map(Path::to_path_buf))
        .chain(
            path_var
                .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
                .unwrap_or_default(),
        );
    for dir in dirs {
        let candidate = dir.join(cmd);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    Err(searched)
}

#[cfg(test)]
mod worker_tests {
    #[test]
    fn the_default_leaves_half_the_cores_to_the_patterns() {
        assert_eq!(super::default_worker_threads(1), 1);
        assert_eq!(super::default_worker_threads(2), 1);
        assert_eq!(super::default_worker_threads(3), 1);
        assert_eq!(super::default_worker_threads(8), 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(yaml: &str) -> Config {
        parse(yaml, &Source::Embedded, Vec::new()).expect("parses")
    }

    fn problems(yaml: &str) -> Vec<Problem> {
        match parse(yaml, &Source::File("/etc/t.yaml".into()), Vec::new()) {
            Err(e) => e.problems,
            Ok(c) => c.validate().err().unwrap_or_default(),
        }
    }

    const MINIMAL: &str = "patterns:\n  - name: mem\n    command: trellis-memstore\nnamespaces:\n  - name: default\n    pattern: mem\n";

    #[test]
    fn replicas_are_validated_with_their_reasons() {
        let c = parse_ok(MINIMAL);
        assert_eq!(c.patterns[0].replicas, 1, "one process by default");
        assert_eq!(c.patterns[0].replica_indices(), [None]);
        let yaml = "patterns:
  - name: mem
    command: trellis-memstore
    stateful: true
    replicas: 3
  - name: kv
    command: trellis-redis
    replicas: 40
    outlier_detection: { consecutive_failures: 0, max_ejection_percent: 60 }
  - name: tcp
    command: trellis-redis
    transport: tcp
    port: 9100
    replicas: 2
  - name: tcp-1
    command: trellis-redis
namespaces: []
";
        let p = problems(yaml);
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "patterns[0].replicas",
                "patterns[1].replicas",
                "patterns[1].outlier_detection.consecutive_failures",
                "patterns[1].outlier_detection.max_ejection_percent",
                "patterns[2].port",
                "patterns[2].name",
            ],
            "{p:?}"
        );
        assert!(p[0].message.contains("stateful"), "{}", p[0].message);
        assert!(p[0].message.contains("replicas: 1"), "{}", p[0].message);
        assert!(p[1].message.contains("1 to 32"), "{}", p[1].message);
        assert!(p[4].message.contains("\"9100-9101\""), "{}", p[4].message);
        assert!(p[5].message.contains("\"tcp-1\""), "{}", p[5].message);

        let three =
            parse_ok(&MINIMAL.replace("command: trellis-memstore", "command: x\n    replicas: 3"));
        let names: Vec<String> = three.patterns[0]
            .replica_indices()
            .into_iter()
            .map(|i| three.patterns[0].replica_name(i))
            .collect();
        assert_eq!(names, ["mem-0", "mem-1", "mem-2"]);
        let mut other = three.patterns[0].clone();
        other.replicas = 5;
        other.outlier_detection.consecutive_failures = 2;
        assert!(
            other.same_process(&three.patterns[0]),
            "replicas change no process"
        );
        other.args.push("-v".into());
        assert!(!other.same_process(&three.patterns[0]));
    }

    #[test]
    fn identities_and_access_are_validated_with_the_rest() {
        let c = parse_ok(MINIMAL);
        assert!(c.access.is_none(), "no access section: nothing is checked");
        let yaml = format!(
            "{MINIMAL}identities:\n  - name: app-a\n    token_sha256: \"{}\"\naccess:\n  - identity: app-a\n    namespaces: [\"*\"]\n    roles: [read]\n  - identity: app-a\n    namespaces: [default]\n    roles: [rwx]\n  - identity: nobody\n    namespaces: [default]\n    roles: [read]\n",
            "ab".repeat(32)
        );
        let p = problems(&yaml);
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["access[1].roles[0]", "access[2].identity"],
            "{p:?}"
        );
        assert_eq!(
            p[0].message,
            "\"rwx\" is not a role; allowed: read, write, admin"
        );
        // Debug of the whole config shows no token hash.
        let ok = yaml.replace("[rwx]", "[write]").replace("nobody", "app-a");
        let c = parse_ok(&ok);
        c.validate().expect("valid");
        assert!(!format!("{c:?}").contains(&"ab".repeat(32)));
    }

    #[test]
    fn telemetry_defaults_env_fill_in_and_checks() {
        let c = parse_ok(MINIMAL);
        assert!(c.telemetry.metrics);
        assert_eq!(c.telemetry.call_log.errors, CallLogLevel::Info);
        assert_eq!(c.telemetry.call_log.successes, CallLogLevel::Debug);
        assert_eq!(
            c.telemetry.traces.endpoint, None,
            "traces are off by default"
        );
        let env = vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                "http://collector:4317".to_string(),
            ),
            (
                "OTEL_TRACES_SAMPLER".to_string(),
                "parentbased_traceidratio".to_string(),
            ),
            ("OTEL_TRACES_SAMPLER_ARG".to_string(), "0.25".to_string()),
        ];
        let c = parse(MINIMAL, &Source::Embedded, env.clone()).unwrap();
        assert_eq!(
            c.telemetry.traces.endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(c.telemetry.traces.ratio(), 0.25);
        assert_eq!(c.telemetry.traces.service(), "trellis");
        let file = format!("{MINIMAL}telemetry:\n  traces:\n    endpoint: http://file:4317\n");
        let c = parse(&file, &Source::Embedded, env).unwrap();
        assert_eq!(
            c.telemetry.traces.endpoint.as_deref(),
            Some("http://file:4317"),
            "the file wins"
        );
        let bad = problems(&format!(
            "{MINIMAL}telemetry:\n  traces:\n    endpoint: collector:4317\n    sampling_ratio: 2\n"
        ));
        let fields: Vec<&str> = bad.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"telemetry.traces.endpoint"), "{bad:?}");
        assert!(
            fields.contains(&"telemetry.traces.sampling_ratio"),
            "{bad:?}"
        );
    }

    #[test]
    fn embedded_default_is_valid_and_serves_default_namespace() {
        let c = parse_ok(EMBEDDED_DEFAULT);
        c.validate().expect("embedded default validates");
        assert_eq!(c.listen.grpc, "127.0.0.1:8980".parse().unwrap());
        assert!(c.namespaces.iter().any(|n| n.name == "default"));
    }

    #[test]
    fn defaults_fill_in_omitted_fields() {
        let c = parse_ok(MINIMAL);
        let p = &c.patterns[0];
        assert_eq!(p.startup_timeout, Duration::from_secs(10));
        assert_eq!(p.health, HealthConfig::default());
        assert_eq!(p.restart.policy, RestartPolicy::Always);
        assert_eq!(c.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_field_names_the_field_and_lists_allowed_ones() {
        let ps = problems("listen:\n  grcp: 127.0.0.1:1\n");
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(ps[0].message.contains("grcp"), "{ps:?}");
        assert!(
            ps[0].message.contains("grpc"),
            "should list the allowed field: {ps:?}"
        );
    }

    #[test]
    fn wrong_type_names_the_path() {
        let ps = problems("listen:\n  grpc: not-an-address\n");
        assert_eq!(ps[0].field, "listen.grpc", "{ps:?}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let ps = problems(&format!("{MINIMAL}request_timeout: soon\n"));
        assert_eq!(ps[0].field, "request_timeout", "{ps:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let yaml = "patterns:\n  - name: Bad Name\n    command: x\n  - name: ok\n    command: ''\n    health: {failure_threshold: 0}\n  - name: ok\n    command: y\nnamespaces:\n  - name: default\n    pattern: missing\n";
        let ps = problems(yaml);
        let fields: Vec<&str> = ps.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"patterns[0].name"), "{fields:?}");
        assert!(fields.contains(&"patterns[1].command"), "{fields:?}");
        assert!(
            fields.contains(&"patterns[1].health.failure_threshold"),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"patterns[2].name"),
            "duplicate: {fields:?}"
        );
        assert!(fields.contains(&"namespaces[0].pattern"), "{fields:?}");
        let ns = ps
            .iter()
            .find(|p| p.field == "namespaces[0].pattern")
            .unwrap();
        assert!(
            ns.message.contains("ok"),
            "lists the known patterns: {}",
            ns.message
        );
    }

    #[test]
    fn names_follow_the_documented_rule() {
        for good in ["a", "default", "kv-1", "a_b", "9lives"] {
            assert!(valid_name(good), "{good}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            "A",
            "-a",
            "_a",
            "a b",
            "a/b",
            "a;rm -rf",
            "é",
            long.as_str(),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// The published pattern and the check agree on every string.
        #[test]
        fn name_pattern_is_valid_name(s in "[a-z0-9_A-Z/ é-]{0,70}") {
            let re = regex::Regex::new(NAME_PATTERN).unwrap();
            proptest::prop_assert_eq!(re.is_match(&s), valid_name(&s), "{:?}", s);
        }
    }

    #[test]
    fn ports_are_auto_fixed_or_a_range() {
        let port = |v: &str| {
            parse(
                &format!(
                    "patterns:\n  - name: m\n    command: x\n    transport: tcp\n    port: {v}\n"
                ),
                &Source::Embedded,
                Vec::new(),
            )
            .map(|c| c.patterns[0].port)
        };
        assert_eq!(port("auto").unwrap(), PortSpec::Auto);
        assert_eq!(port("9100").unwrap(), PortSpec::Fixed(9100));
        assert_eq!(port("\"9100-9199\"").unwrap(), PortSpec::Range(9100, 9199));
        for bad in ["0", "70000", "\"9199-9100\"", "\"x\"", "\"1-\""] {
            let e = port(bad).unwrap_err();
            assert_eq!(e.problems[0].field, "patterns[0].port", "{bad}: {e}");
            assert!(e.problems[0].message.contains("allowed"), "{bad}: {e}");
        }
    }

    #[test]
    fn limits_parse_human_sizes() {
        let c = parse_ok(
            "patterns:\n  - name: m\n    command: x\n    limits: {memory: 256MiB, open_files: 64}\n",
        );
        assert_eq!(
            c.patterns[0].limits.memory.map(|b| b.as_u64()),
            Some(256 * 1024 * 1024)
        );
        assert_eq!(c.patterns[0].limits.open_files, Some(64));
    }

    #[test]
    fn http_limits_are_checked_field_by_field() {
        let c = parse_ok(MINIMAL);
        assert_eq!(c.http.limits.max_discard.as_u64(), 64 << 20);
        let ps = problems(
            "http:\n  limits: {max_json_depth: 0, max_connections: 0, read_timeout: 0s, max_discard: 2GiB}\n",
        );
        let fields: Vec<&str> = ps.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "http.limits.max_json_depth",
            "http.limits.max_connections",
            "http.limits.read_timeout",
            "http.limits.max_discard",
        ] {
            assert!(fields.contains(&f), "{f}: {ps:?}");
        }
        let discard = ps
            .iter()
            .find(|p| p.field == "http.limits.max_discard")
            .unwrap();
        assert!(discard.message.contains("allowed"), "{discard:?}");
        let ok = parse_ok("http:\n  limits: {max_discard: 0}\n");
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn reserved_env_is_rejected() {
        let ps = problems(
            "patterns:\n  - name: m\n    command: x\n    env: {TRELLIS_PATTERN_LISTEN: x}\n",
        );
        assert_eq!(ps[0].field, "patterns[0].env", "{ps:?}");
    }

    #[test]
    fn service_manager_env_is_rejected_for_a_pattern() {
        let ps = problems(
            "patterns:\n  - name: m\n    command: x\n    env: {NOTIFY_SOCKET: /run/x, WATCHDOG_USEC: '1'}\n",
        );
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert!(ps.iter().all(|p| p.field == "patterns[0].env"), "{ps:?}");
        assert!(ps[0].message.contains("service manager"), "{ps:?}");
    }

    #[test]
    fn environment_overrides_known_keys_and_ignores_others() {
        let env = vec![
            (
                "TRELLIS_LISTEN__GRPC".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            ("TRELLIS_REQUEST_TIMEOUT".to_string(), "2s".to_string()),
            ("TRELLIS_ADDR".to_string(), "http://x".to_string()),
            ("TRELLIS_PATTERN_NAME".to_string(), "x".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c = parse(MINIMAL, &Source::Embedded, env).expect("parses");
        assert_eq!(c.listen.grpc.port(), 9999);
        assert_eq!(c.request_timeout, Duration::from_secs(2));
    }

    #[test]
    fn worker_threads_is_optional_bounded_and_settable_from_the_environment() {
        assert_eq!(parse_ok(MINIMAL).worker_threads, None);
        assert_eq!(
            parse_ok(&format!("{MINIMAL}worker_threads: 1\n")).worker_threads,
            Some(1)
        );
        for bad in ["0", "1025"] {
            let ps = problems(&format!("{MINIMAL}worker_threads: {bad}\n"));
            assert_eq!(ps.len(), 1, "{ps:?}");
            assert_eq!(ps[0].field, "worker_threads");
            assert!(ps[0].message.contains("1 to 1024"), "{ps:?}");
        }
        let env = vec![("TRELLIS_WORKER_THREADS".to_string(), "2".to_string())];
        let c = parse(MINIMAL, &Source::Embedded, env).expect("parses");
        assert_eq!(c.worker_threads, Some(2));
    }

    #[test]
    fn bad_environment_override_says_where_it_came_from() {
        let env = vec![("TRELLIS_LISTEN__GRPC".to_string(), "nope".to_string())];
        let e = parse(MINIMAL, &Source::Embedded, env).unwrap_err();
        assert_eq!(e.problems[0].field, "listen.grpc");
        assert!(
            e.problems[0].message.contains("TRELLIS_LISTEN__GRPC"),
            "{}",
            e
        );
    }

    #[test]
    fn error_display_names_the_file() {
        let e = load(Some(Path::new("/nonexistent/trellis.yaml")), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/trellis.yaml"), "{e}");
    }

    #[test]
    fn commands_resolve_in_documented_order() {
        let cfg = tempfile::tempdir().unwrap();
        let exe = tempfile::tempdir().unwrap();
        std::fs::write(exe.path().join("pat"), "").unwrap();
        let found = resolve_command("pat", Some(cfg.path()), Some(exe.path()), None).unwrap();
        assert_eq!(found, exe.path().join("pat"));
        std::fs::write(cfg.path().join("pat"), "").unwrap();
        let found = resolve_command("pat", Some(cfg.path()), Some(exe.path()), None).unwrap();
        assert_eq!(
            found,
            cfg.path().join("pat"),
            "config dir wins over exe dir"
        );
        let searched =
            resolve_command("nope", Some(cfg.path()), Some(exe.path()), None).unwrap_err();
        assert_eq!(searched.len(), 2);
        let rel = resolve_command("./pat", Some(cfg.path()), None, None).unwrap();
        assert_eq!(rel, cfg.path().join("./pat"));
    }
}
