//! gRPC server reflection on the real proxy's admin door, in both
//! protocol versions: it lists exactly the services served, describes them,
//! and answers an unknown symbol in-stream without ending the stream.

/// The same checks for each protocol version (their messages are distinct
/// generated types).
macro_rules! reflection_tests {
    ($version:ident) => {
        mod $version {
            use tokio::sync::mpsc;
            use tokio_stream::wrappers::ReceiverStream;
            use tonic::Streaming;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, ServerReflectionResponse,
            };
            use trellis_tests::{PATIENCE, Proxy};

            /// What `ListServices` must answer, in this order.
            const SERVED: &[&str] = &[
                "grpc.health.v1.Health",
                "trellis.data.v1.KeyValue",
                "trellis.data.v1.PubSub",
                "trellis.admin.v1.Admin",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ];

            /// One open reflection stream; each request is sent only after
            /// the previous one was answered.
            struct Session {
                requests: mpsc::Sender<ServerReflectionRequest>,
                responses: Streaming<ServerReflectionResponse>,
            }

            impl Session {
                async fn open(proxy: &Proxy) -> Session {
                    let mut client = ServerReflectionClient::new(proxy.admin_channel().await);
                    let (requests, rx) = mpsc::channel(1);
                    let responses = client
                        .server_reflection_info(ReceiverStream::new(rx))
                        .await
                        .expect("reflection stream opens")
                        .into_inner();
                    Session {
                        requests,
                        responses,
                    }
                }

                async fn ask(&mut self, request: MessageRequest) -> MessageResponse {
                    self.requests
                        .send(ServerReflectionRequest {
                            host: String::new(),
                            message_request: Some(request.clone()),
                        })
                        .await
                        .expect("the stream still takes requests");
                    let response = tokio::time::timeout(PATIENCE, self.responses.message())
                        .await
                        .unwrap_or_else(|_| panic!("no answer to {request:?}"))
                        .unwrap_or_else(|status| {
                            panic!("{request:?} ended the stream with {status:?}")
                        })
                        .unwrap_or_else(|| panic!("the stream ended at {request:?}"));
                    assert_eq!(
                        response
                            .original_request
                            .and_then(|r| r.message_request)
                            .as_ref(),
                        Some(&request)
                    );
                    response
                        .message_response
                        .unwrap_or_else(|| panic!("no message_response to {request:?}"))
                }

                async fn services(&mut self) -> Vec<String> {
                    match self.ask(MessageRequest::ListServices(String::new())).await {
                        MessageResponse::ListServicesResponse(list) => {
                            list.service.into_iter().map(|s| s.name).collect()
                        }
                        other => panic!("ListServices answered {other:?}"),
                    }
                }
            }

            #[tokio::test]
            async fn lists_describes_and_answers_unknown_symbols_in_stream() {
                let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
                let mut s = Session::open(&proxy).await;

                assert_eq!(s.services().await, SERVED);

                match s
                    .ask(MessageRequest::FileContainingSymbol(
                        "trellis.data.v1.KeyValue".into(),
                    ))
                    .await
                {
                    // Decoded in the proxy's unit tests; here the file is
                    // recognised by its name (field 1, encoded first).
                    MessageResponse::FileDescriptorResponse(files) => assert!(
                        files.file_descriptor_proto.iter().any(|f| {
                            let name = b"trellis/data/v1/keyvalue.proto";
                            f.windows(name.len()).any(|w| w == name)
                        }),
                        "no keyvalue.proto among {} files",
                        files.file_descriptor_proto.len()
                    ),
                    other => panic!("file_containing_symbol answered {other:?}"),
                }

                for missing in ["no.such.Symbol", "trellis.pattern.v1.Lifecycle"] {
                    match s
                        .ask(MessageRequest::FileContainingSymbol(missing.into()))
                        .await
                    {
                        MessageResponse::ErrorResponse(e) => {
                            assert_eq!(e.error_code, tonic::Code::NotFound as i32, "{e:?}");
                            assert!(e.error_message.contains(missing), "{e:?}");
                        }
                        other => panic!("{missing} answered {other:?}"),
                    }
                    // The same stream still answers.
                    assert_eq!(s.services().await, SERVED);
                }
            }
        }
    };
}

reflection_tests!(v1);
reflection_tests!(v1alpha);
