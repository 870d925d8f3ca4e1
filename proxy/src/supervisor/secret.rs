//! The secret of one pattern process: 32 random bytes made fresh for each
//! start, handed to the process in `TRELLIS_PATTERN_SECRET` (its
//! environment only: never argv, never a log line, never the admin API)
//! and sent back on every call the proxy makes to it in the
//! `trellis-pattern-secret` header, so a process that can reach the
//! pattern's socket or port but is not this proxy gets UNAUTHENTICATED
//! (docs/pattern-protocol.md, "Who may call a pattern").
//!
//! Every call carries it, whatever the transport: on a Unix socket the
//! private directory already keeps other users out, and the secret keeps
//! out the proxy's own user's other processes as well, with one rule for
//! patterns to follow instead of two.

use std::fmt;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use trellis_proto::protocol::SECRET_HEADER;

/// The control channel to a pattern process (Lifecycle, health, metrics):
/// every request on it carries the process's secret.
pub type Control = InterceptedService<Channel, SendSecret>;

/// One start's secret. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Secret {
    hex: String,
}

impl Secret {
    /// A new secret: 32 bytes from the operating system's generator (via
    /// `rand`'s thread-local CSPRNG, seeded from `getrandom`), as 64 hex
    /// digits.
    pub fn generate() -> Secret {
        use std::fmt::Write;
        let bytes: [u8; 32] = rand::random();
        let mut hex = String::with_capacity(64);
        for b in bytes {
            let _ = write!(hex, "{b:02x}");
        }
        Secret { hex }
    }

    /// The value for the pattern's `TRELLIS_PATTERN_SECRET`.
    pub fn env_value(&self) -> &str {
        &self.hex
    }

    /// The header value for the data connection, marked sensitive (HPACK
    /// never indexes it; `Debug` prints `Sensitive`).
    pub fn header(&self) -> http::HeaderValue {
        let mut v = http::HeaderValue::from_str(&self.hex)
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }

    /// `channel` with this secret added to every request.
    pub fn control(&self, channel: Channel) -> Control {
        let mut value: AsciiMetadataValue = MetadataValue::try_from(self.hex.as_str())
            .unwrap_or_else(|_| MetadataValue::from_static(""));
        value.set_sensitive(true);
        InterceptedService::new(channel, SendSecret { value })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Adds the secret's header to a request (a tonic interceptor).
#[derive(Clone)]
pub struct SendSecret {
    value: AsciiMetadataValue,
}

impl fmt::Debug for SendSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendSecret(<redacted>)")
    }
}

impl Interceptor for SendSecret {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(SECRET_HEADER, self.value.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_secret_is_new_and_never_shown() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_eq!(a.env_value().len(), 64);
        assert!(a.env_value().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.env_value(), b.env_value());
        assert!(!format!("{a:?}").contains(a.env_value()));
        assert!(a.header().is_sensitive());
        assert!(!format!("{:?}", a.header()).contains(a.env_value()));
    }
}
