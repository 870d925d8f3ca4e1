//! The `trellis` command line: `serve` (the default) runs the proxy;
//! `check-config` validates a file; `kv`, `pubsub`, `patterns` and `health`
//! are gRPC clients of a running proxy.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use tonic::transport::Channel;
use trellis_proto::admin::v1 as admin;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::data::v1 as data;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;

use crate::config::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "trellis", version, about = "The Trellis data-access proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// How the client subcommands reach a running proxy; accepted before
    /// or after any subcommand.
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// YAML config file; without it the embedded default
    /// (deploy/examples/local.yaml) is used.
    #[arg(long, short, env = "TRELLIS_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format, overriding the config's `log.format`.
    #[arg(long, value_enum, global = true)]
    pub log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Auto,
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Auto => LogFormat::Auto,
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no command is given).
    Serve,
    /// Validate a config file and exit: 0 if valid, 2 with every problem if not.
    CheckConfig {
        /// The file to check; the embedded default when omitted.
        file: Option<PathBuf>,
    },
    /// Read and write keys through a running proxy.
    Kv {
        #[command(subcommand)]
        op: KvOp,
    },
    /// Publish to and subscribe on topics through a running proxy.
    Pubsub {
        #[command(subcommand)]
        op: PubsubOp,
    },
    /// Show or control the supervised patterns (a table when no action is given).
    Patterns {
        #[command(subcommand)]
        op: Option<PatternsOp>,
    },
    /// Make a running proxy read its configuration file again and apply
    /// it (as SIGHUP does): 0 when applied, 2 with every problem when
    /// refused (nothing changed then), 1 when the proxy could not be asked.
    Reload,
    /// Make a running proxy drain and stop (as SIGTERM does).
    Drain,
    /// gRPC health of the proxy ("") and of each pattern.
    Health {
        /// One service to check; all when omitted.
        service: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The proxy's data address, gRPC (`kv`, `pubsub`, `health`).
    #[arg(
        long,
        env = "TRELLIS_ADDR",
        default_value = "http://127.0.0.1:8980",
        global = true
    )]
    pub addr: String,
    /// The proxy's admin address, `listen.admin` (`patterns`, `reload`,
    /// `drain`, and the pattern list of `health`).
    #[arg(
        long,
        env = "TRELLIS_ADMIN_ADDR",
        default_value = "http://127.0.0.1:8982",
        global = true
    )]
    pub admin_addr: String,
    /// Give up after this long (client subcommands).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum KvOp {
    /// Print the value of KEY.
    Get { namespace: String, key: String },
    /// Store VALUE under KEY.
    Put {
        namespace: String,
        key: String,
        value: String,
        /// Expire the key after this long, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Remove KEY (succeeds when it is already gone).
    Delete { namespace: String, key: String },
    /// Print KEY<TAB>VALUE for every key with the prefix, following all pages.
    List {
        namespace: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
}

#[derive(Debug, Subcommand)]
pub enum PubsubOp {
    /// Publish PAYLOAD to TOPIC; prints the message id.
    Publish {
        namespace: String,
        topic: String,
        payload: String,
        /// An attribute, KEY=VALUE (repeatable).
        #[arg(long = "attr", value_parser = parse_attribute)]
        attributes: Vec<(String, String)>,
    },
    /// Print each message's payload, one per line, as it arrives (until
    /// interrupted, or --count messages). --timeout bounds only the connect.
    Subscribe {
        namespace: String,
        topic: String,
        /// Share the topic's messages with the other subscribers of this group.
        #[arg(long)]
        queue_group: Option<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
}

fn parse_attribute(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Debug, Subcommand)]
pub enum PatternsOp {
    /// The table of patterns (the default).
    List,
    /// Everything known about one pattern, including its stderr tail.
    Get { name: String },
    /// Start a stopped or failed pattern.
    Start { name: String },
    /// Stop a pattern and keep it down.
    Stop { name: String },
    /// Replace a pattern's process: a SERVING one blue/green (the new
    /// process serves before the old one stops taking calls). memstore
    /// keeps its data in its process: its restart starts empty.
    Restart { name: String },
    /// Print every state change as it happens, until interrupted.
    Watch { name: Option<String> },
}

/// Which of the proxy's doors a command talks to.
#[derive(Clone, Copy)]
enum Door {
    Data,
    Admin,
}

/// A channel to `door`; `stream`: no timeout on calls (a stream lives on;
/// `--timeout` then bounds only the connect).
async fn connect(c: &ClientArgs, door: Door, stream: bool) -> anyhow::Result<Channel> {
    let (addr, flag, env, example) = match door {
        Door::Data => (&c.addr, "--addr", "TRELLIS_ADDR", "http://127.0.0.1:8980"),
        Door::Admin => (
            &c.admin_addr,
            "--admin-addr",
            "TRELLIS_ADMIN_ADDR",
            "http://127.0.0.1:8982",
        ),
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
        .map_err(|e| {
            anyhow::anyhow!("{flag} {addr:?} is not a valid URI ({e}); use e.g. {example}")
        })?
        .connect_timeout(c.timeout);
    if !stream {
        endpoint = endpoint.timeout(c.timeout);
    }
    endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the proxy at {addr} ({e}); is `trellis` running? Pass {flag} or set {env}"
        )
    })
}

async fn channel(c: &ClientArgs) -> anyhow::Result<Channel> {
    connect(c, Door::Data, false).await
}

async fn admin_channel(c: &ClientArgs) -> anyhow::Result<Channel> {
    connect(c, Door::Admin, false).await
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub async fn kv(client: ClientArgs, op: KvOp) -> anyhow::Result<()> {
    let mut kv = KeyValueClient::new(channel(&client).await?);
    let mut out = std::io::stdout().lock();
    match op {
        KvOp::Get { namespace, key } => {
            let r = kv
                .get(data::GetRequest { namespace, key })
                .await
                .map_err(status_err)?;
            out.write_all(&r.into_inner().value)?;
            writeln!(out)?;
        }
        KvOp::Put {
            namespace,
            key,
            value,
            ttl,
        } => {
            let ttl = ttl.and_then(|d| prost_types::Duration::try_from(d).ok());
            kv.put(data::PutRequest {
                namespace,
                key,
                value: value.into_bytes(),
                ttl,
            })
            .await
            .map_err(status_err)?;
            writeln!(out, "OK")?;
        }
        KvOp::Delete { namespace, key } => {
            let r = kv
                .delete(data::DeleteRequest { namespace, key })
                .await
                .map_err(status_err)?;
            writeln!(
                out,
                "{}",
                if r.into_inner().deleted {
                    "deleted"
                } else {
                    "not found (nothing to delete)"
                }
            )?;
        }
        KvOp::List {
            namespace,
            prefix,
            page_size,
        } => {
            let mut page_token = String::new();
            loop {
                let r = kv
                    .list(data::ListRequest {
                        namespace: namespace.clone(),
                        prefix: prefix.clone(),
                        page_size,
                        page_token,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                for e in r.entries {
                    writeln!(out, "{}\t{}", e.key, String::from_utf8_lossy(&e.value))?;
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
        }
    }
    Ok(())
}

pub async fn pubsub(client: ClientArgs, op: PubsubOp) -> anyhow::Result<()> {
    match op {
        PubsubOp::Publish {
            namespace,
            topic,
            payload,
            attributes,
        } => {
            let mut ps = PubSubClient::new(channel(&client).await?);
            let r = ps
                .publish(data::PublishRequest {
                    namespace,
                    topic,
                    payload: payload.into_bytes(),
                    attributes: attributes.into_iter().collect(),
                })
                .await
                .map_err(status_err)?;
            println!("{}", r.into_inner().message_id);
        }
        PubsubOp::Subscribe {
            namespace,
            topic,
            queue_group,
            count,
        } => {
            let ch = connect(&client, Door::Data, true).await?;
            let mut messages = PubSubClient::new(ch)
                .subscribe(data::SubscribeRequest {
                    namespace,
                    topic,
                    queue_group: queue_group.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                let Some(m) = messages.message().await.map_err(status_err)? else {
                    break;
                };
                let mut out = std::io::stdout().lock();
                out.write_all(&m.payload)?;
                writeln!(out)?;
                out.flush()?;
                seen += 1;
            }
        }
    }
    Ok(())
}

pub async fn patterns(client: ClientArgs, op: Option<PatternsOp>) -> anyhow::Result<()> {
    let mut admin = AdminClient::new(admin_channel(&client).await?);
    let action = |name: String| admin::PatternActionRequest { name };
    match op.unwrap_or(PatternsOp::List) {
        PatternsOp::List => {
            let r = admin
                .list_patterns(admin::ListPatternsRequest {})
                .await
                .map_err(status_err)?;
            print!("{}", table(&r.into_inner().patterns, SystemTime::now()));
        }
        PatternsOp::Get { name } => {
            let p = admin
                .get_pattern(admin::GetPatternRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            print!("{}", describe(&p, SystemTime::now()));
        }
        PatternsOp::Start { name } => {
            let r = admin
                .start_pattern(action(name))
                .await
                .map_err(status_err)?;
            println!("{}", r.into_inner().message);
        }
        PatternsOp::Stop { name } => {
            let r = admin.stop_pattern(action(name)).await.map_err(status_err)?;
            println!("{}", r.into_inner().message);
        }
        PatternsOp::Restart { name } => {
            let r = admin
                .restart_pattern(action(name))
                .await
                .map_err(status_err)?;
            println!("{}", r.into_inner().message);
        }
        PatternsOp::Watch { name } => {
            let mut admin = AdminClient::new(connect(&client, Door::Admin, true).await?);
            let mut events = admin
                .watch_patterns(admin::WatchPatternsRequest {
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(ev) = events.message().await.map_err(status_err)? {
                let Some(p) = ev.pattern else { continue };
                let why = if p.last_error.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", p.last_error)
                };
                println!(
                    "{}  {} → {}{}",
                    p.name,
                    state_name(ev.previous_state),
                    state_name(p.state),
                    why
                );
            }
        }
    }
    Ok(())
}

/// How `trellis reload` ended.
pub enum Reloaded {
    Applied,
    /// The proxy refused the configuration; it keeps the one it had.
    Refused,
}

pub async fn reload(client: ClientArgs) -> anyhow::Result<Reloaded> {
    let mut admin = AdminClient::new(admin_channel(&client).await?);
    match admin.reload(admin::ReloadRequest {}).await {
        Ok(r) => {
            println!("{}", r.into_inner().message);
            Ok(Reloaded::Applied)
        }
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            eprintln!("{}", s.message());
            Ok(Reloaded::Refused)
        }
        Err(s) => Err(status_err(s)),
    }
}

pub async fn drain(client: ClientArgs) -> anyhow::Result<()> {
    let mut admin = AdminClient::new(admin_channel(&client).await?);
    let r = admin
        .drain(admin::DrainRequest {})
        .await
        .map_err(status_err)?;
    println!("{}", r.into_inner().message);
    Ok(())
}

pub async fn health(client: ClientArgs, service: Option<String>) -> anyhow::Result<bool> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let ch = channel(&client).await?;
    let services = match service {
        Some(s) => vec![s],
        None => {
            let mut admin = AdminClient::new(admin_channel(&client).await?);
            let r = admin
                .list_patterns(admin::ListPatternsRequest {})
                .await
                .map_err(status_err)?;
            // "", then each process; a pattern with replicas has its own
            // service too, listed before its first replica.
            let mut services = vec![String::new()];
            for p in r.into_inner().patterns {
                if p.replica.is_some() && !services.contains(&p.pattern) {
                    services.push(p.pattern);
                }
                services.push(p.name);
            }
            services
        }
    };
    let mut health = HealthClient::new(ch);
    let mut all_serving = true;
    println!("{:<24} STATUS", "SERVICE");
    for s in services {
        let status = match health
            .check(HealthCheckRequest { service: s.clone() })
            .await
        {
            Ok(r) => r.into_inner().status().as_str_name().to_string(),
            Err(e) => format!("{} ({})", e.code(), e.message()),
        };
        all_serving &= status == "SERVING";
        let label = if s.is_empty() {
            "\"\" (proxy)".to_string()
        } else {
            s
        };
        println!("{label:<24} {status}");
    }
    Ok(all_serving)
}

fn state_name(s: i32) -> &'static str {
    admin::PatternState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("PATTERN_STATE_"))
        .unwrap_or("?")
}

fn uptime(p: &admin::Pattern, now: SystemTime) -> String {
    p.start_time
        .and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| now.duration_since(t).ok())
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
        .unwrap_or_else(|| "-".into())
}

/// The `trellis patterns` table: one row per process; a pattern with
/// replicas has a row of its own (how many serve) with its replicas
/// indented under it.
pub fn table(patterns: &[admin::Pattern], now: SystemTime) -> String {
    // The endpoint last: a Unix socket's path is long.
    let mut s = format!(
        "{:<16} {:<12} {:>8} {:>8}  {:<8} {:>8} {}\n",
        "NAME", "STATE", "PID", "RESTARTS", "UPTIME", "CALLS", "ENDPOINT"
    );
    let row = |s: &mut String, name: String, p: &admin::Pattern| {
        let state = if p.ejected {
            format!("{} (ejected)", state_name(p.state))
        } else {
            state_name(p.state).to_string()
        };
        s.push_str(&format!(
            "{:<16} {:<12} {:>8} {:>8}  {:<8} {:>8} {}\n",
            name,
            state,
            if p.pid == 0 {
                "-".to_string()
            } else {
                p.pid.to_string()
            },
            p.restarts,
            uptime(p, now),
            p.calls,
            if p.endpoint.is_empty() {
                "-"
            } else {
                &p.endpoint
            },
        ));
    };
    let mut shown: Vec<&str> = Vec::new();
    for p in patterns {
        if p.replica.is_none() {
            row(&mut s, p.name.clone(), p);
            continue;
        }
        if shown.contains(&p.pattern.as_str()) {
            continue;
        }
        shown.push(&p.pattern);
        let replicas: Vec<&admin::Pattern> =
            patterns.iter().filter(|r| r.pattern == p.pattern).collect();
        let serving = replicas
            .iter()
            .filter(|r| r.state == admin::PatternState::Serving as i32 && !r.ejected)
            .count();
        s.push_str(&format!(
            "{:<16} {}/{} SERVING\n",
            p.pattern,
            serving,
            replicas.len()
        ));
        for r in replicas {
            row(&mut s, format!("  {}", r.name), r);
        }
    }
    s
}

fn describe(p: &admin::Pattern, now: SystemTime) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<12} {v}\n"));
    line("name", p.name.clone());
    if let Some(i) = p.replica {
        line("replica", format!("{i} of pattern {}", p.pattern));
    }
    line(
        "state",
        format!(
            "{}{}",
            state_name(p.state),
            if p.ejected { " (ejected)" } else { "" }
        ),
    );
    line(
        "pid",
        if p.pid == 0 {
            "-".into()
        } else {
            p.pid.to_string()
        },
    );
    line("endpoint", p.endpoint.clone());
    line("uptime", uptime(p, now));
    line("restarts", p.restarts.to_string());
    line("calls", format!("{} ({} in flight)", p.calls, p.in_flight));
    line("namespaces", p.namespaces.join(", "));
    line("version", p.version.clone());
    line("interfaces", p.interfaces.join(", "));
    line(
        "last exit",
        p.last_exit
            .as_ref()
            .map(|e| e.description.clone())
            .unwrap_or_else(|| "-".into()),
    );
    line(
        "last error",
        if p.last_error.is_empty() {
            "-".into()
        } else {
            p.last_error.clone()
        },
    );
    for c in &p.circuits {
        let opens_in = c
            .opens_in
            .and_then(|d| std::time::Duration::try_from(d).ok())
            .map(|d| {
                format!(
                    ", probes in {}",
                    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
                )
            })
            .unwrap_or_default();
        line(
            "circuit",
            format!(
                "{}: {} ({} trips, {} failures in a row{opens_in})",
                c.namespace, c.state, c.trips, c.consecutive_failures
            ),
        );
    }
    s.push_str("stderr tail:\n");
    for l in &p.stderr_tail {
        s.push_str(&format!("  {l}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_is_accepted_before_or_after_any_subcommand() {
        for argv in [
            &["trellis", "--addr", "http://h:1", "patterns", "get", "mem"][..],
            &["trellis", "patterns", "--addr", "http://h:1", "get", "mem"],
            &["trellis", "patterns", "get", "mem", "--addr", "http://h:1"],
            &["trellis", "kv", "get", "ns", "k", "--addr", "http://h:1"],
            &["trellis", "reload", "--addr", "http://h:1"],
            &[
                "trellis",
                "health",
                "mem",
                "--addr",
                "http://h:1",
                "--timeout",
                "2s",
            ],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(cli.client.addr, "http://h:1", "{argv:?}");
            assert_eq!(cli.client.admin_addr, "http://127.0.0.1:8982", "{argv:?}");
        }
        for argv in [
            &["trellis", "--admin-addr", "http://a:2", "patterns"][..],
            &["trellis", "reload", "--admin-addr", "http://a:2"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(cli.client.admin_addr, "http://a:2", "{argv:?}");
        }
        let cli = Cli::try_parse_from(["trellis", "health", "--timeout", "2s"]).unwrap();
        assert_eq!(cli.client.timeout, Duration::from_secs(2));
    }

    #[test]
    fn table_shows_every_column() {
        let now = SystemTime::now();
        let p = admin::Pattern {
            name: "memstore".into(),
            state: admin::PatternState::Serving as i32,
            pid: 42,
            endpoint: "tcp://127.0.0.1:5".into(),
            restarts: 2,
            start_time: Some(prost_types::Timestamp::from(now - Duration::from_secs(61))),
            ..Default::default()
        };
        let t = table(std::slice::from_ref(&p), now);
        let row = t.lines().nth(1).unwrap();
        for want in [
            "memstore",
            "SERVING",
            "42",
            "tcp://127.0.0.1:5",
            "2",
            "1m 1s",
        ] {
            assert!(row.contains(want), "{want} missing from {row:?}");
        }
    }

    #[test]
    fn replicas_are_grouped_under_their_pattern() {
        let now = SystemTime::now();
        let replica = |i: u32, state: admin::PatternState, ejected: bool| admin::Pattern {
            name: format!("redis-{i}"),
            pattern: "redis".into(),
            replica: Some(i),
            state: state as i32,
            pid: 100 + i,
            calls: 7,
            ejected,
            ..Default::default()
        };
        let mem = admin::Pattern {
            name: "memstore".into(),
            pattern: "memstore".into(),
            state: admin::PatternState::Serving as i32,
            ..Default::default()
        };
        let t = table(
            &[
                replica(0, admin::PatternState::Serving, false),
                mem,
                replica(1, admin::PatternState::Crashed, false),
                replica(2, admin::PatternState::Serving, true),
            ],
            now,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1].starts_with("redis ") && lines[1].contains("1/3 SERVING"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("  redis-0 ") && lines[2].contains("SERVING"),
            "{t}"
        );
        assert!(
            lines[3].starts_with("  redis-1 ") && lines[3].contains("CRASHED"),
            "{t}"
        );
        assert!(lines[4].contains("SERVING (ejected)"), "{t}");
        assert!(lines[5].starts_with("memstore "), "{t}");
        assert_eq!(lines.len(), 6, "{t}");
    }
}
