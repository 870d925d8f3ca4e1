//! The real `trellis-memstore` binary, driven the way the proxy drives it:
//! handshake line on stdout, Lifecycle, health, data, then Stop or SIGTERM.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use prost_types::value::Kind;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, ListRequest, PutRequest};
use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;
use trellis_proto::pattern::v1::{InitializeRequest, StartRequest, StopRequest};

struct Pattern {
    /// Killed on drop (`kill_on_drop`), so a failed test leaves no pattern.
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// Drained by a task, as the proxy does, so the child never blocks on it.
    stderr: Option<JoinHandle<String>>,
    channel: Channel,
}

impl Pattern {
    /// Spawns the binary as the proxy would and reads its handshake line.
    async fn spawn() -> Pattern {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-memstore"))
            .env("TRELLIS_PATTERN_PROTOCOL", "1")
            .env("TRELLIS_PATTERN_NAME", "cache")
            .env("TRELLIS_PATTERN_LISTEN", "127.0.0.1:0")
            .env("TRELLIS_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn trellis-memstore");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).await.expect("read handshake");
        let fields: Vec<&str> = line.trim_end().split('|').collect();
        assert_eq!(fields.len(), 5, "handshake: {line:?}");
        assert_eq!(&fields[..3], ["TRELLIS", "1", "tcp"], "handshake: {line:?}");
        assert_eq!(fields[4], "grpc", "handshake: {line:?}");
        let channel = Channel::from_shared(format!("http://{}", fields[3]))
            .expect("valid uri")
            .connect()
            .await
            .expect("connect to the pattern");
        Pattern {
            child,
            _stdout: stdout,
            stderr: Some(stderr),
            channel,
        }
    }

    fn lifecycle(&self) -> LifecycleClient<Channel> {
        LifecycleClient::new(self.channel.clone())
    }

    fn kv(&self) -> KeyValueClient<Channel> {
        KeyValueClient::new(self.channel.clone())
    }

    async fn health(&self) -> ServingStatus {
        let resp = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check");
        resp.into_inner().status()
    }

    async fn initialize(&self, config: &[(&str, Kind)]) -> Result<(), tonic::Status> {
        let fields = config
            .iter()
            .map(|(k, v)| {
                let value = prost_types::Value {
                    kind: Some(v.clone()),
                };
                (k.to_string(), value)
            })
            .collect();
        let req = InitializeRequest {
            name: "cache".into(),
            config: Some(prost_types::Struct { fields }),
            protocol_version: 1,
        };
        let resp = self.lifecycle().initialize(req).await?.into_inner();
        assert_eq!(resp.name, "memstore");
        assert_eq!(
            resp.interfaces,
            ["trellis.data.v1.KeyValue", "trellis.data.v1.PubSub"]
        );
        // Its data is in this process: the proxy must not replicate it.
        assert!(resp.stateful, "memstore says it is stateful");
        Ok(())
    }

    /// Waits for the exit (at most `within`), and returns it with stderr.
    /// Waits asynchronously: the client must keep answering the pattern's
    /// HTTP/2 GOAWAY ping for the drain to finish early.
    async fn wait(&mut self, within: Duration) -> (ExitStatus, String) {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for the pattern"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!("pattern did not exit within {within:?}");
            }
        };
        let stderr = match self.stderr.take() {
            Some(drain) => drain.await.unwrap_or_default(),
            None => String::new(),
        };
        (status, stderr)
    }
}

#[tokio::test]
async fn serves_after_start_and_stops_on_request() {
    let mut p = Pattern::spawn().await;
    assert_eq!(p.health().await, ServingStatus::NotServing);

    let put = PutRequest {
        namespace: "ns".into(),
        key: "greeting".into(),
        value: b"hello".to_vec(),
        ttl: None,
    };
    let err = p.kv().put(put.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    p.initialize(&[("max_keys", Kind::NumberValue(10.0))])
        .await
        .unwrap();
    p.lifecycle().start(StartRequest {}).await.unwrap();
    assert_eq!(p.health().await, ServingStatus::Serving);

    p.kv().put(put).await.unwrap();
    let got = p
        .kv()
        .get(GetRequest {
            namespace: "ns".into(),
            key: "greeting".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().value, b"hello");
    let list = p
        .kv()
        .list(ListRequest {
            namespace: "ns".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);

    let bad = p
        .kv()
        .get(GetRequest {
            namespace: String::new(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let grace = prost_types::Duration {
        seconds: 2,
        nanos: 0,
    };
    p.lifecycle()
        .stop(StopRequest { grace: Some(grace) })
        .await
        .unwrap();
    let (status, stderr) = p.wait(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    for line in stderr.lines() {
        assert!(line.starts_with('{'), "not a JSON log line: {line}");
    }
    assert!(stderr.contains("Lifecycle/Stop"), "{stderr}");
}

#[tokio::test]
async fn bad_config_is_invalid_argument_naming_the_field() {
    let mut p = Pattern::spawn().await;
    let err = p
        .initialize(&[("max_keys", Kind::StringValue("lots".into()))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("config.max_keys: invalid type: string \"lots\""),
        "{}",
        err.message()
    );
    terminate(&p);
    let (status, _) = p.wait(Duration::from_secs(1)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut p = Pattern::spawn().await;
    p.initialize(&[]).await.unwrap();
    p.lifecycle().start(StartRequest {}).await.unwrap();
    terminate(&p);
    let (status, stderr) = p.wait(Duration::from_secs(1)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}

fn terminate(p: &Pattern) {
    let pid = p.child.id().expect("the pattern is running");
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill(2) with a valid signal number has no memory effects.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill({pid}, SIGTERM)");
}
