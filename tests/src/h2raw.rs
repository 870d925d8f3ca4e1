//! One gRPC call over a bare HTTP/2 connection, with everything the client
//! receives kept as bytes: response headers, body, trailers. For tests that
//! compare what arrives through the proxy with what the pattern sent.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request};

/// What one call received.
#[derive(Debug)]
pub struct Exchange {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Exchange {
    /// A header from the trailers, or from the headers of a trailers-only
    /// response.
    pub fn status_field(&self, name: &str) -> Option<&HeaderValue> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .or_else(|| self.headers.get(name))
    }

    /// The headers and trailers that are the pattern's own: everything but
    /// what a hop may legitimately set (`date`, `content-length`).
    pub fn pattern_fields(&self) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .chain(self.trailers.iter().flat_map(|t| t.iter()))
            .filter(|(k, _)| !matches!(k.as_str(), "date" | "content-length"))
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        all.sort();
        all
    }
}

/// A message with its gRPC 5-byte prefix.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

/// Calls `path` on `addr` (`host:port`) with `body` as the request body and
/// `metadata` as extra headers, and reads the whole answer.
pub async fn call(addr: &str, path: &str, metadata: &[(&str, &str)], body: Bytes) -> Exchange {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.expect("h2 ready");
    let mut req = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    for (k, v) in metadata {
        req.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let (response, mut send) = client.send_request(req, false).expect("send_request");
    send.send_data(body, true).expect("send_data");
    let response = response.await.expect("response headers");
    let (parts, mut recv) = response.into_parts();
    let mut body = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("response body");
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.expect("trailers");
    Exchange {
        headers: parts.headers,
        body: body.freeze(),
        trailers,
    }
}
