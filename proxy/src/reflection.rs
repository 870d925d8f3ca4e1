//! gRPC server reflection on the front door, describing exactly what the
//! proxy serves. Three rules, each what standard clients (grpcurl, Python's
//! grpcio-reflection) expect of a real server:
//!
//! 1. `ListServices` lists exactly the services on the gRPC listener
//!    ([`SERVICES`]): health, the data and admin services, and the two
//!    reflection services themselves. Not `trellis.pattern.v1.Lifecycle`,
//!    which patterns serve, not the proxy; its file is not in the pool
//!    either, so `describe` does not find it here. tonic-reflection would by
//!    default list every service of every registered file (Lifecycle
//!    included) and leave out health, whose descriptors it was never given.
//! 2. Both protocol versions are served, `grpc.reflection.v1` and
//!    `grpc.reflection.v1alpha`; grpcio-reflection and older grpcurl speak
//!    only v1alpha. Each version can describe every listed service, the
//!    other version's included.
//! 3. A request that cannot be answered (an unknown symbol or file) gets an
//!    `error_response` in the stream (`error_code` 5 NOT_FOUND, a message
//!    naming the symbol) and the stream stays open for the next request.
//!    tonic-reflection 0.14.9 instead ends the whole stream with the status
//!    (`server/v1.rs`: it sends `Err(status)` and returns), so a client that
//!    probes one missing symbol loses its stream. No crate in use does it
//!    the standard way (tonic-reflection is the only reflection server for
//!    tonic), hence [`v1::InStreamErrors`] / [`v1alpha::InStreamErrors`]: a
//!    thin wrapper that hands each request to tonic-reflection's service
//!    in-process, one call per request, and turns a failed call into an
//!    `error_response`. Everything else (the symbol index, the descriptor
//!    bytes, the answers) stays tonic-reflection's.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;

use anyhow::{Context, anyhow};
use prost::Message;
use prost_types::FileDescriptorProto;
use tonic::service::RoutesBuilder;
use tonic_reflection::server::Builder;
use trellis_proto::admin::v1::admin_server;
use trellis_proto::data::v1::{key_value_server, pub_sub_server};

/// The services on the proxy's gRPC listener, in the order `ListServices`
/// gives them: the data plane's two, and the proxy's own that `server::run`
/// adds. Keep this list in step with what is served.
pub const SERVICES: &[&str] = &[
    tonic_health::pb::health_server::SERVICE_NAME,
    key_value_server::SERVICE_NAME,
    pub_sub_server::SERVICE_NAME,
    admin_server::SERVICE_NAME,
    tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
];

/// Adds the `grpc.reflection.v1` and `grpc.reflection.v1alpha` services.
pub fn add_to(routes: &mut RoutesBuilder) -> anyhow::Result<()> {
    let pool = served_files(
        &[
            trellis_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
        SERVICES,
    )?;
    let v1 = builder(&pool).build_v1()?;
    let v1alpha = builder(&pool).build_v1alpha()?;
    routes
        .add_service(v1::ServerReflectionServer::new(v1::InStreamErrors::new(v1)))
        .add_service(v1alpha::ServerReflectionServer::new(
            v1alpha::InStreamErrors::new(v1alpha),
        ));
    Ok(())
}

/// tonic-reflection configured with `pool` and listing only [`SERVICES`].
fn builder(pool: &[u8]) -> Builder<'_> {
    // Both reflection files are already in the pool; without this, each
    // version would add only its own.
    let builder = Builder::configure()
        .register_encoded_file_descriptor_set(pool)
        .include_reflection_service(false);
    SERVICES
        .iter()
        .fold(builder, |b, name| b.with_service_name(*name))
}

/// An encoded `FileDescriptorSet` read only as far as its files' bytes.
/// Decoding a `FileDescriptorProto` with prost and encoding it again drops
/// custom options such as `google.api.http`; these bytes are kept verbatim.
#[derive(Clone, PartialEq, Message)]
struct RawFiles {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

/// The files of `sets` that describe `services`: each file defining one of
/// them and everything it imports, transitively; encoded as one
/// `FileDescriptorSet` with every file's bytes unchanged. The first file of
/// a name wins, as in tonic-reflection. Fails when a service or an import
/// has no file.
fn served_files(sets: &[&[u8]], services: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut files: Vec<(FileDescriptorProto, Vec<u8>)> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for set in sets {
        for raw in RawFiles::decode(*set)
            .context("decoding a FileDescriptorSet")?
            .file
        {
            let fd = FileDescriptorProto::decode(raw.as_slice())
                .context("decoding a FileDescriptorProto")?;
            if !by_name.contains_key(fd.name()) {
                by_name.insert(fd.name().to_string(), files.len());
                files.push((fd, raw));
            }
        }
    }

    let mut todo = Vec::new();
    for service in services {
        let defining = files.iter().position(|(fd, _)| {
            fd.service
                .iter()
                .any(|s| qualified(fd.package(), s.name()) == *service)
        });
        todo.push(defining.ok_or_else(|| anyhow!("no descriptor defines service {service}"))?);
    }
    let mut kept = HashSet::new();
    while let Some(i) = todo.pop() {
        if kept.insert(i) {
            for dep in &files[i].0.dependency {
                let j = by_name.get(dep).ok_or_else(|| {
                    anyhow!(
                        "{} imports {dep}, which no descriptor set holds",
                        files[i].0.name()
                    )
                })?;
                todo.push(*j);
            }
        }
    }

    let file = files
        .into_iter()
        .enumerate()
        .filter(|(i, _)| kept.contains(i))
        .map(|(_, (_, raw))| raw)
        .collect();
    Ok(RawFiles { file }.encode_to_vec())
}

fn qualified(package: &str, name: &str) -> String {
    if package.is_empty() {
        name.to_string()
    } else {
        format!("{package}.{name}")
    }
}

/// tonic-reflection's service as the wrapper calls it: in-process, boxed so
/// the wrapper need not name tonic-reflection's unnameable service type.
type Inner = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// The wrapper, once per protocol version: the two versions' messages are
/// the same but generated as distinct types.
macro_rules! in_stream_errors {
    ($version:ident) => {
        /// The wrapper for this protocol version (see the module doc, rule 3).
        pub mod $version {
            use futures::StreamExt;
            use futures::stream::BoxStream;
            use tonic::{Request, Response, Status, Streaming};
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            pub use tonic_reflection::pb::$version::server_reflection_server::{
                ServerReflection, ServerReflectionServer,
            };
            use tonic_reflection::pb::$version::{
                ErrorResponse, ServerReflectionRequest, ServerReflectionResponse,
            };

            use super::Inner;

            /// tonic-reflection's service, with a failed request answered by
            /// an `error_response` instead of ending the stream.
            pub struct InStreamErrors {
                inner: ServerReflectionClient<Inner>,
            }

            impl InStreamErrors {
                pub fn new(
                    reflection: ServerReflectionServer<impl ServerReflection>,
                ) -> Self {
                    InStreamErrors {
                        inner: ServerReflectionClient::new(Inner::new(reflection)),
                    }
                }
            }

            #[tonic::async_trait]
            impl ServerReflection for InStreamErrors {
                type ServerReflectionInfoStream =
                    BoxStream<'static, Result<ServerReflectionResponse, Status>>;

                async fn server_reflection_info(
                    &self,
                    request: Request<Streaming<ServerReflectionRequest>>,
                ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                    let inner = self.inner.clone();
                    // One answer per request, in order; a broken request
                    // stream (the client's error) ends the response stream.
                    let answers = request.into_inner().then(move |request| {
                        let inner = inner.clone();
                        async move { Ok(answer(inner, request?).await) }
                    });
                    Ok(Response::new(answers.boxed()))
                }
            }

            /// tonic-reflection's answer to `request` alone, on a stream of
            /// its own, so that its failure ends only that stream.
            async fn answer(
                mut inner: ServerReflectionClient<Inner>,
                request: ServerReflectionRequest,
            ) -> ServerReflectionResponse {
                let answered = match inner
                    .server_reflection_info(futures::stream::iter([request.clone()]))
                    .await
                {
                    Ok(response) => response.into_inner().message().await,
                    Err(status) => Err(status),
                };
                let status = match answered {
                    Ok(Some(response)) => return response,
                    Ok(None) => Status::internal("the reflection service gave no answer"),
                    Err(status) => status,
                };
                ServerReflectionResponse {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: status.code().into(),
                        error_message: status.message().to_string(),
                    })),
                }
            }

            #[cfg(test)]
            mod tests {
                use prost::Message;
                use prost_types::FileDescriptorProto;
                use tokio::sync::mpsc;
                use tokio_stream::wrappers::ReceiverStream;
                use tonic::service::Routes;
                use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;

                use super::*;

                /// One reflection stream to the services [`super::super::add_to`]
                /// adds, called in-process through tonic's router.
                struct Session {
                    requests: mpsc::Sender<ServerReflectionRequest>,
                    responses: Streaming<ServerReflectionResponse>,
                }

                impl Session {
                    async fn open() -> Session {
                        let mut routes = tonic::service::RoutesBuilder::default();
                        crate::reflection::add_to(&mut routes).expect("reflection builds");
                        let mut client = ServerReflectionClient::<Routes>::new(routes.routes());
                        let (requests, rx) = mpsc::channel(1);
                        let responses = client
                            .server_reflection_info(ReceiverStream::new(rx))
                            .await
                            .expect("stream opens")
                            .into_inner();
                        Session {
                            requests,
                            responses,
                        }
                    }

                    /// Sends one request and awaits its answer.
                    async fn ask(&mut self, request: MessageRequest) -> MessageResponse {
                        self.requests
                            .send(ServerReflectionRequest {
                                host: String::new(),
                                message_request: Some(request),
                            })
                            .await
                            .expect("stream still takes requests");
                        let response = self
                            .responses
                            .message()
                            .await
                            .expect("no status ends the stream")
                            .expect("an answer, not the end of the stream");
                        response.message_response.expect("a message_response")
                    }

                    async fn services(&mut self) -> Vec<String> {
                        match self.ask(MessageRequest::ListServices(String::new())).await {
                            MessageResponse::ListServicesResponse(list) => {
                                list.service.into_iter().map(|s| s.name).collect()
                            }
                            other => panic!("{other:?}"),
                        }
                    }

                    async fn file_containing(&mut self, symbol: &str) -> MessageResponse {
                        self.ask(MessageRequest::FileContainingSymbol(symbol.into()))
                            .await
                    }
                }

                fn files(response: MessageResponse) -> Vec<FileDescriptorProto> {
                    let MessageResponse::FileDescriptorResponse(files) = response else {
                        panic!("{response:?}")
                    };
                    files
                        .file_descriptor_proto
                        .iter()
                        .map(|raw| FileDescriptorProto::decode(raw.as_slice()).unwrap())
                        .collect()
                }

                #[tokio::test]
                async fn lists_exactly_the_served_services() {
                    let mut s = Session::open().await;
                    assert_eq!(
                        s.services().await,
                        [
                            "grpc.health.v1.Health",
                            "trellis.data.v1.KeyValue",
                            "trellis.data.v1.PubSub",
                            "trellis.admin.v1.Admin",
                            "grpc.reflection.v1.ServerReflection",
                            "grpc.reflection.v1alpha.ServerReflection",
                        ]
                    );
                }

                #[tokio::test]
                async fn every_listed_service_is_described() {
                    let mut s = Session::open().await;
                    for service in s.services().await {
                        let files = files(s.file_containing(&service).await);
                        let (package, name) = service.rsplit_once('.').unwrap();
                        assert!(
                            files.iter().any(|f| f.package() == package
                                && f.service.iter().any(|svc| svc.name() == name)),
                            "{service}: {files:?}"
                        );
                    }
                }

                #[tokio::test]
                async fn descriptors_keep_their_http_options() {
                    let mut s = Session::open().await;
                    let MessageResponse::FileDescriptorResponse(served) =
                        s.file_containing("trellis.data.v1.KeyValue.Put").await
                    else {
                        panic!("no descriptor for KeyValue.Put")
                    };
                    let original = super::super::RawFiles::decode(trellis_proto::FILE_DESCRIPTOR_SET)
                        .unwrap()
                        .file
                        .into_iter()
                        .find(|raw| {
                            FileDescriptorProto::decode(raw.as_slice()).unwrap().name()
                                == "trellis/data/v1/keyvalue.proto"
                        })
                        .unwrap();
                    assert_eq!(served.file_descriptor_proto, [original]);
                }

                #[tokio::test]
                async fn an_unknown_symbol_is_answered_in_stream() {
                    let mut s = Session::open().await;
                    for symbol in ["no.such.Symbol", "trellis.pattern.v1.Lifecycle"] {
                        match s.file_containing(symbol).await {
                            MessageResponse::ErrorResponse(e) => {
                                assert_eq!(e.error_code, tonic::Code::NotFound as i32, "{e:?}");
                                assert!(e.error_message.contains(symbol), "{e:?}");
                            }
                            other => panic!("{symbol}: {other:?}"),
                        }
                        // The same stream answers the next request.
                        assert_eq!(s.services().await.len(), super::super::SERVICES.len());
                    }
                    let unknown = s
                        .ask(MessageRequest::FileByFilename("no/such.proto".into()))
                        .await;
                    assert!(
                        matches!(&unknown, MessageResponse::ErrorResponse(e)
                            if e.error_code == tonic::Code::NotFound as i32),
                        "{unknown:?}"
                    );
                    assert!(!files(s.file_containing("grpc.health.v1.Health").await).is_empty());
                }

                #[tokio::test]
                async fn the_error_response_echoes_the_request() {
                    let mut s = Session::open().await;
                    s.requests
                        .send(ServerReflectionRequest {
                            host: "h".into(),
                            message_request: Some(MessageRequest::FileContainingSymbol(
                                "no.such.Symbol".into(),
                            )),
                        })
                        .await
                        .unwrap();
                    let r = s.responses.message().await.unwrap().unwrap();
                    assert_eq!(r.valid_host, "h");
                    assert_eq!(
                        r.original_request.and_then(|o| o.message_request),
                        Some(MessageRequest::FileContainingSymbol("no.such.Symbol".into()))
                    );
                }
            }
        }
    };
}

in_stream_errors!(v1);
in_stream_errors!(v1alpha);

#[cfg(test)]
mod tests {
    use super::*;

    fn names(encoded: &[u8]) -> Vec<String> {
        RawFiles::decode(encoded)
            .unwrap()
            .file
            .iter()
            .map(|raw| {
                FileDescriptorProto::decode(raw.as_slice())
                    .unwrap()
                    .name()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_pool_holds_the_served_files_and_their_imports_only() {
        let pool = served_files(
            &[trellis_proto::FILE_DESCRIPTOR_SET],
            &["trellis.data.v1.KeyValue"],
        )
        .unwrap();
        let names = names(&pool);
        for want in [
            "trellis/data/v1/keyvalue.proto",
            "google/api/annotations.proto",
            "google/api/http.proto",
            "google/protobuf/descriptor.proto",
            "google/protobuf/duration.proto",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        for unwanted in [
            "trellis/pattern/v1/lifecycle.proto",
            "trellis/admin/v1/admin.proto",
            "google/protobuf/struct.proto",
        ] {
            assert!(
                !names.iter().any(|n| n == unwanted),
                "{unwanted}: {names:?}"
            );
        }
    }

    #[test]
    fn a_service_without_a_descriptor_is_an_error() {
        let err = served_files(&[trellis_proto::FILE_DESCRIPTOR_SET], &["no.Such"]).unwrap_err();
        assert!(err.to_string().contains("no.Such"), "{err}");
    }

    #[test]
    fn a_missing_import_is_an_error() {
        // keyvalue.proto alone, without the files it imports.
        let keyvalue = RawFiles::decode(trellis_proto::FILE_DESCRIPTOR_SET)
            .unwrap()
            .file
            .into_iter()
            .filter(|raw| {
                FileDescriptorProto::decode(raw.as_slice()).unwrap().name()
                    == "trellis/data/v1/keyvalue.proto"
            })
            .collect();
        let set = RawFiles { file: keyvalue }.encode_to_vec();
        let err = served_files(&[&set], &["trellis.data.v1.KeyValue"]).unwrap_err();
        assert!(err.to_string().contains("imports"), "{err}");
    }
}
