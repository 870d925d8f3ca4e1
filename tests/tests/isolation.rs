//! Patterns answer only their proxy (docs/pattern-protocol.md, "Who may
//! call a pattern"): by default a pattern's Unix socket lives in a folder
//! only the proxy's user can enter, made fresh by each proxy run and
//! removed when it stops; over `transport: tcp`, a call without the
//! per-start secret is refused with UNAUTHENTICATED, and the secret shows
//! in no log line and on no command line.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_proto::protocol::{SECRET_HEADER, env};
use trellis_tests::{Proxy, children_of, eventually};

fn put(key: &str, value: &[u8]) -> PutRequest {
    PutRequest {
        namespace: "default".into(),
        key: key.into(),
        value: value.to_vec(),
        ttl: None,
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        namespace: "default".into(),
        key: key.into(),
    }
}

/// A socket folder others may pass through (0755), so that only the
/// run's own folder can be what keeps them out.
fn open_base() -> tempfile::TempDir {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    base
}

async fn with_socket_dir(base: &Path) -> Proxy {
    Proxy::builder()
        .top(&format!("socket_dir: {:?}", base.display().to_string()))
        .memstore("mem", &["default"])
        .start()
        .await
}

fn socket_of(endpoint: &str) -> PathBuf {
    PathBuf::from(
        endpoint
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("not a unix endpoint: {endpoint}")),
    )
}

/// Connects to the Unix socket at `path` from Python, as `user` when
/// given (via `runuser`); the error text when it cannot.
fn connect_as(user: Option<&str>, path: &Path) -> Result<(), String> {
    let script = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])";
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    let out = cmd
        .args(["-c", script])
        .arg(path)
        .output()
        .expect("run python3 (and runuser)");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn the_default_socket_is_in_a_private_folder_removed_when_the_proxy_stops() {
    let base = open_base();
    let mut proxy = with_socket_dir(base.path()).await;
    let p = proxy.pattern("mem").await;
    let socket = socket_of(&p.endpoint);
    let folder = socket.parent().unwrap().to_path_buf();
    assert_eq!(folder.parent(), Some(base.path()), "{}", p.endpoint);
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let meta = std::fs::metadata(&folder).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "{}",
        folder.display()
    );
    assert_eq!(
        meta.uid(),
        nix::unistd::geteuid().as_raw(),
        "owned by the proxy's user"
    );

    // The proxy's user reaches it; another user cannot even get to it.
    connect_as(None, &socket).expect("the proxy's user connects");
    if nix::unistd::geteuid().is_root() {
        // The socket itself open to all: only the folder can keep others out.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = connect_as(Some("nobody"), &socket).expect_err("nobody must not connect");
        assert!(err.contains("PermissionError"), "{err}");
    } else {
        println!("not root: the connection as another user is not tried");
    }

    // Data calls go through as ever.
    let mut kv = proxy.kv().await;
    kv.put(put("k", b"v")).await.unwrap();
    assert_eq!(kv.get(get("k")).await.unwrap().into_inner().value, b"v");

    assert_eq!(proxy.terminate().await, Some(0), "{}", proxy.log_text());
    assert!(!folder.exists(), "{} outlived the proxy", folder.display());
}

#[tokio::test]
async fn a_sigkilled_proxys_folder_does_not_block_the_next_proxy_and_is_removed() {
    let base = open_base();
    let mut first = with_socket_dir(base.path()).await;
    let left = socket_of(&first.pattern("mem").await.endpoint)
        .parent()
        .unwrap()
        .to_path_buf();
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    assert!(left.exists(), "a SIGKILLed proxy cannot clean up");

    let second = with_socket_dir(base.path()).await;
    let mut kv = second.kv().await;
    kv.put(put("k", b"v")).await.unwrap();
    let now = socket_of(&second.pattern("mem").await.endpoint);
    assert_ne!(now.parent(), Some(left.as_path()));
    assert!(!left.exists(), "the gone proxy's folder was not removed");
}

#[tokio::test]
async fn over_tcp_a_call_without_the_pattern_secret_is_refused() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .with("transport: tcp")
        .start()
        .await;
    let p = proxy.pattern("mem").await;
    let addr = p
        .endpoint
        .strip_prefix("tcp://")
        .unwrap_or_else(|| panic!("not tcp: {}", p.endpoint));
    let direct = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Around the proxy: refused, data calls and health checks alike, with
    // no secret or a wrong one.
    let mut kv = KeyValueClient::new(direct.clone());
    let err = kv.get(get("k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut wrong = tonic::Request::new(put("k", b"x"));
    wrong
        .metadata_mut()
        .insert(SECRET_HEADER, "0".repeat(64).parse().unwrap());
    let err = kv.put(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut health = HealthClient::new(direct);
    let err = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Through the proxy: served.
    let mut via_proxy = proxy.kv().await;
    via_proxy.put(put("k", b"v")).await.unwrap();
    assert_eq!(
        via_proxy.get(get("k")).await.unwrap().into_inner().value,
        b"v"
    );

    // The secret the process was started with (its initial environment,
    // readable by its own user and root only) …
    let environ = std::fs::read(format!("/proc/{}/environ", p.pid)).unwrap();
    let secret = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{}=", env::SECRET)))
        .expect("the pattern was given a secret")
        .to_string();
    assert_eq!(secret.len(), 64, "32 random bytes, in hex");
    // … opens the door …
    let mut right = tonic::Request::new(get("k"));
    right
        .metadata_mut()
        .insert(SECRET_HEADER, secret.parse().unwrap());
    assert_eq!(kv.get(right).await.unwrap().into_inner().value, b"v");
    // … and shows nowhere else: not on its command line, not in the
    // proxy's log, not in the admin API.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&secret));
    assert!(!proxy.log_text().contains(&secret), "the proxy logged it");
    assert!(!format!("{p:?}").contains(&secret));
}

#[tokio::test]
async fn a_pattern_does_not_hand_its_secret_to_the_processes_it_starts() {
    let proxy = Proxy::builder()
        .chaos("daemon", &["d"], "daemon_child: true")
        .start()
        .await;
    let pattern = proxy.pattern("daemon").await.pid;
    let daemon = eventually("the daemon child to run", || async {
        children_of(pattern).first().copied()
    })
    .await;
    let has_secret = |pid: u32| {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        environ
            .split(|b| *b == 0)
            .any(|kv| kv.starts_with(format!("{}=", env::SECRET).as_bytes()))
    };
    assert!(has_secret(pattern), "the pattern was given one");
    assert!(!has_secret(daemon), "its child inherited the secret");
}
