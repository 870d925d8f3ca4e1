//! Private Redis and PostgreSQL servers for tests: each on a free loopback
//! port, with its data in a temporary directory, started and stopped (or
//! killed and restarted on the same port, keeping its data) by the test.
//! Either can serve TLS only, with certificates from [`crate::pki::Pki`]
//! ([`RedisServer::start_tls`], [`PostgresServer::start_tls`]).
//! Nothing here touches a server the machine itself runs.
//!
//! The server binaries are found the way `scripts/setup-backends.sh` finds
//! them (`PATH`, `/usr/sbin`, `/usr/lib/postgresql/*/bin`,
//! `pg_config --bindir`). A missing one fails the test with what to
//! install: tests never skip a backend silently.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::PATIENCE;

/// What to do when a server binary is missing.
const INSTALL_HINT: &str = "run `make setup` (as root it installs them with apt-get), or install \
     the Debian/Ubuntu packages `redis-server nats-server postgresql` yourself";

/// Finds `name` on `PATH` or in `extra` directories; panics with what to
/// install when it is nowhere.
pub fn find_binary(name: &str, extra: &[PathBuf]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(
        ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.extend_from_slice(extra);
    for dir in &dirs {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!(
        "{name} was not found (looked on PATH and in {}); {INSTALL_HINT}",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// PostgreSQL's server binaries (`initdb`, `postgres`) live outside `PATH`
/// on Debian: `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        && out.status.success()
    {
        dirs.push(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    dirs.extend(versions.into_iter().rev().map(|(_, p)| p));
    dirs
}

/// A loopback port nobody listens on right now, chosen *below* the
/// kernel's ephemeral range (`ip_local_port_range`): a server restarted on
/// the same port must not find it taken meanwhile by an outgoing connection
/// or by another process binding port 0.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.max(10_001));
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + (seed.wrapping_add(n.wrapping_mul(104_729)) % (high - low));
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port found between {low} and {high}");
}

/// Keeps the last lines a server printed, for failure messages.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn drain(&self, child: &mut Child) {
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = self.0.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut v = sink.lock().unwrap_or_else(|p| p.into_inner());
                    if v.len() > 200 {
                        v.remove(0);
                    }
                    v.push(line);
                }
            });
        }
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

/// Sends `signal` to `child` and waits (bounded) for it to exit.
async fn signal_and_reap(child: &mut Child, signal: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
    match tokio::time::timeout(PATIENCE, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            let _ = child.kill().await;
        }
    }
}

// Redis --------------------------------------------------------------------

/// A private `redis-server` with `appendonly yes` and `appendfsync always`:
/// every acknowledged write is on disk before the reply, so a SIGKILL loses
/// none of them.
pub struct RedisServer {
    port: u16,
    /// `appendonly yes` + `appendfsync always`, or no persistence at all.
    durable: bool,
    dir: tempfile::TempDir,
    child: Option<Child>,
    output: Output,
    binary: PathBuf,
    /// TLS only (`--port 0`), and a password, from a config file.
    secure: Option<RedisTls>,
}

/// What a TLS-only Redis uses: its certificate, the CA it checks client
/// certificates with, whether it demands one, and an AUTH password (in its
/// config file, never on its command line).
#[derive(Clone)]
pub struct RedisTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    /// `--tls-auth-clients yes`: mutual TLS.
    pub auth_clients: bool,
    pub requirepass: Option<String>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        Self::start_with(true).await
    }

    /// One without persistence (for benchmarks: no fsync per write).
    pub async fn start_in_memory() -> RedisServer {
        Self::start_with(false).await
    }

    /// One that speaks TLS only (on [`RedisServer::port`]; `--port 0`),
    /// without persistence; returns once it is ready to accept connections.
    pub async fn start_tls(tls: RedisTls) -> RedisServer {
        Self::start_secure(false, Some(tls)).await
    }

    async fn start_with(durable: bool) -> RedisServer {
        Self::start_secure(durable, None).await
    }

    async fn start_secure(durable: bool, secure: Option<RedisTls>) -> RedisServer {
        let binary = find_binary("redis-server", &[]);
        let dir = tempfile::tempdir().expect("tempdir for redis");
        let mut server = RedisServer {
            port: free_port(),
            durable,
            dir,
            child: None,
            output: Output::default(),
            binary,
            secure,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let mut cmd = Command::new(&self.binary);
        if let Some(tls) = &self.secure {
            // A config file first (the password stays off the command
            // line), then the TLS options.
            let conf = self.dir.path().join("redis.conf");
            let pass = tls
                .requirepass
                .as_ref()
                .map(|p| format!("requirepass \"{p}\"\n"))
                .unwrap_or_default();
            std::fs::write(&conf, pass).expect("write redis.conf");
            cmd.arg(&conf)
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert_file)
                .arg("--tls-key-file")
                .arg(&tls.key_file)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca_file)
                .args([
                    "--tls-auth-clients",
                    if tls.auth_clients { "yes" } else { "no" },
                ]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        let mut child = cmd
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(if self.durable {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .args(["--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(["--loglevel", "notice"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server");
        self.output.drain(&mut child);
        self.child = Some(child);
        let port = self.port;
        let tls = self.secure.is_some();
        let output = self.output.clone();
        let ready = tokio::time::timeout(PATIENCE, async {
            loop {
                // A TLS-only Redis cannot be PINGed in plain text: its
                // log says when it is ready.
                let up = if tls {
                    output.text().contains("Ready to accept connections")
                } else {
                    redis_ping(port).await
                };
                if up {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            ready.is_ok(),
            "redis-server on port {port} never answered PING; its output:\n{}",
            self.output.text()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` for a TLS one.
    pub fn url(&self) -> String {
        let scheme = if self.secure.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_reap(&mut child, Signal::SIGKILL).await;
        }
    }

    /// Starts it again on the same port with the same data directory (the
    /// append-only file is replayed); returns once it answers PING.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    pub fn output(&self) -> String {
        self.output.text()
    }
}

/// Does a Redis on `port` answer `PING` with `+PONG` (not `-LOADING`)?
pub async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<bool, std::io::Error>(buf[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(true))
    )
}

// PostgreSQL -----------------------------------------------------------------

/// A private PostgreSQL cluster (initdb into a temporary directory, trust
/// authentication, superuser `postgres`, database `postgres`) on a free
/// loopback port. Running as root, it runs as the `postgres` system user,
/// because the server refuses to run as root.
pub struct PostgresServer {
    port: u16,
    /// Holds `data/` and the unix socket directory `run/`.
    dir: tempfile::TempDir,
    child: Option<Child>,
    output: Output,
    postgres: PathBuf,
    /// `(uid, gid)` to run as, when running as root.
    user: Option<(u32, u32)>,
    /// Extra `-c name=value` server settings.
    settings: Vec<String>,
}

impl PostgresServer {
    /// initdb, then start, then wait until `SELECT 1` answers.
    pub async fn start() -> PostgresServer {
        Self::start_with(&[]).await
    }

    /// [`PostgresServer::start`] with extra server settings, e.g.
    /// `("synchronous_commit", "off")`.
    pub async fn start_with(settings: &[(&str, &str)]) -> PostgresServer {
        Self::start_inner(settings, None).await
    }

    /// One with TLS on (`ssl=on`, the server certificate and key of `pki`
    /// in its data directory, the key 0600 and the server's own) where the
    /// user [`TLS_USER`] may log in over TLS only, with a password
    /// (scram-sha-256); everyone else as before (trust, TLS or not).
    /// Create the user with [`PostgresServer::create_tls_user`].
    pub async fn start_tls(pki: &crate::pki::Pki) -> PostgresServer {
        Self::start_inner(&[("ssl", "on")], Some(pki)).await
    }

    /// Creates [`TLS_USER`] with `password` and its own database of the
    /// same name (so it may create tables there).
    pub async fn create_tls_user(&self, password: &str) {
        let client = self.connect().await;
        // Two statements: CREATE DATABASE cannot run in the implicit
        // transaction of a multi-statement query.
        for sql in [
            format!("CREATE ROLE {TLS_USER} LOGIN PASSWORD '{password}'"),
            format!("CREATE DATABASE {TLS_USER} OWNER {TLS_USER}"),
        ] {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("create the TLS user: {e:?}"));
        }
    }

    async fn start_inner(
        settings: &[(&str, &str)],
        tls: Option<&crate::pki::Pki>,
    ) -> PostgresServer {
        let dirs = postgres_bin_dirs();
        let initdb = find_binary("initdb", &dirs);
        let postgres = find_binary("postgres", &dirs);
        let user = if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .unwrap_or_else(|| {
                    panic!(
                        "running as root, the tests start PostgreSQL as the `postgres` \
                         user, which does not exist; install the `postgresql` package \
                         (it creates the user) or run the tests as another user"
                    )
                });
            Some((pg.uid.as_raw(), pg.gid.as_raw()))
        } else {
            None
        };
        let dir = tempfile::tempdir().expect("tempdir for postgres");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("create socket dir");
        if let Some((uid, gid)) = user {
            for p in [dir.path(), run.as_path()] {
                nix::unistd::chown(
                    p,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .expect("chown the postgres temp dir");
            }
        }
        let data = dir.path().join("data");
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .args(["--no-sync", "--no-instructions"])
            .current_dir(dir.path())
            .stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let out = tokio::time::timeout(PATIENCE, cmd.output())
            .await
            .expect("initdb finishes")
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(pki) = tls {
            install_tls(&data, pki, user);
        }
        let mut server = PostgresServer {
            port: free_port(),
            dir,
            child: None,
            output: Output::default(),
            postgres,
            user,
            settings: settings.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let mut cmd = Command::new(&self.postgres);
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().join("run").display()
            ))
            .args(["-c", "max_connections=50", "-c", "fsync=on"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("spawn postgres");
        self.output.drain(&mut child);
        self.child = Some(child);
        let url = self.url();
        let started = Instant::now();
        loop {
            if pg_ready(&url).await {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "postgres exited at start ({status}); its output:\n{}",
                    self.output.text()
                );
            }
            assert!(
                started.elapsed() < PATIENCE,
                "postgres on port {} never answered SELECT 1; its output:\n{}",
                self.port,
                self.output.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Immediate shutdown (what `pg_ctl stop -m immediate` sends: SIGQUIT
    /// to the postmaster): no checkpoint, clients cut off at once, crash
    /// recovery on the next start. Waits until it has exited.
    pub async fn stop_immediate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_reap(&mut child, Signal::SIGQUIT).await;
        }
    }

    /// Starts it again on the same port and data directory; returns once
    /// it answers `SELECT 1`.
    pub async fn restart(&mut self) {
        self.stop_immediate().await;
        self.launch().await;
    }

    /// A fresh client session (its connection task runs in the background).
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the test postgres: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    pub fn output(&self) -> String {
        self.output.text()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGQUIT, so the postmaster takes its backends down with it
        // (a SIGKILL would leave them to notice on their own).
        if let Some(mut child) = self.child.take()
            && let Some(pid) = child.id()
        {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The user a [`PostgresServer::start_tls`] server lets in over TLS only.
pub const TLS_USER: &str = "app";

/// Puts `pki`'s server certificate and key where PostgreSQL looks by
/// default (`server.crt`, `server.key` in the data directory), owned by
/// the server's user with the key 0600 (PostgreSQL refuses a key others
/// can read), and makes [`TLS_USER`] log in over TLS only.
fn install_tls(data: &Path, pki: &crate::pki::Pki, user: Option<(u32, u32)>) {
    for (from, to, mode) in [
        (pki.server_cert(), "server.crt", 0o644),
        (pki.server_key(), "server.key", 0o600),
    ] {
        let to = data.join(to);
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
            .expect("chmod the server's TLS file");
        if let Some((uid, gid)) = user {
            nix::unistd::chown(
                &to,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .expect("chown the server's TLS file");
        }
    }
    let hba = data.join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "hostnossl all {TLS_USER} 127.0.0.1/32 reject\n\
             hostssl all {TLS_USER} 127.0.0.1/32 scram-sha-256\n{rest}"
        ),
    )
    .expect("write pg_hba.conf");
}

/// Does the server at `url` answer `SELECT 1`?
pub async fn pg_ready(url: &str) -> bool {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        let r = client.simple_query("SELECT 1").await;
        drop(client);
        let _ = task.await;
        r.map(|_| ())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(()))
    )
}

// Pattern entries ------------------------------------------------------------

/// A `trellis-redis` entry serving `namespaces` from the Redis at `url`.
/// `config` is extra YAML for its `config:` block (e.g. `key_prefix: x:`).
pub fn redis_pattern(
    name: &str,
    namespaces: &[&str],
    url: &str,
    config: &str,
) -> crate::PatternEntry {
    crate::PatternEntry {
        name: name.into(),
        command: crate::bin("trellis-redis"),
        args: vec![],
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        extra: String::new(),
        config: format!("url: {url:?}\n{config}"),
    }
}

/// A `trellis-postgres` entry serving `namespaces` from the database at
/// `url`. `config` is extra YAML for its `config:` block.
pub fn postgres_pattern(
    name: &str,
    namespaces: &[&str],
    url: &str,
    config: &str,
) -> crate::PatternEntry {
    crate::PatternEntry {
        name: name.into(),
        command: crate::bin("trellis-postgres"),
        args: vec![],
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        extra: String::new(),
        config: format!("url: {url:?}\n{config}"),
    }
}
