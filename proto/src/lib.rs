//! Generated code for the Trellis contracts. Everything generated lives behind
//! this crate; the other crates name types as `trellis_proto::data::v1::…`.

pub mod data {
    pub mod v1 {
        tonic::include_proto!("trellis.data.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("trellis.admin.v1");
    }
}

pub mod pattern {
    pub mod v1 {
        tonic::include_proto!("trellis.pattern.v1");
    }
}

pub mod idempotency;
pub mod json;
pub mod protocol;
pub mod rules;

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

/// The encoded `FileDescriptorSet` of every Trellis proto and its imports,
/// custom options (`google.api.http`) included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trellis_descriptor.bin"));

/// The pattern protocol version this build speaks; see docs/pattern-protocol.md.
pub const PATTERN_PROTOCOL_VERSION: u32 = 1;

/// Fully qualified name of the key-value data service.
pub const KEY_VALUE_SERVICE: &str = "trellis.data.v1.KeyValue";

/// Fully qualified name of the publish/subscribe data service.
pub const PUB_SUB_SERVICE: &str = "trellis.data.v1.PubSub";

/// The canonical upper-snake name of a gRPC status code (`DEADLINE_EXCEEDED`),
/// as metrics, spans and errors spell it on both sides of the protocol.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_decodes_and_names_every_service() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("embedded descriptor set decodes");
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_string();
                f.service.iter().map(move |s| format!("{pkg}.{}", s.name()))
            })
            .collect();
        for want in [
            "trellis.data.v1.KeyValue",
            "trellis.data.v1.PubSub",
            "trellis.admin.v1.Admin",
            "trellis.pattern.v1.Lifecycle",
        ] {
            assert!(
                services.iter().any(|s| s == want),
                "{want} missing from {services:?}"
            );
        }
    }

    /// The data contract's rule the proxy forwards by (docs/pattern-protocol.md):
    /// every request message of a data service carries the namespace as
    /// field 1, a string, and every data method takes exactly one request
    /// message. The proxy reads field 1 of the raw bytes to route a call
    /// without decoding it; a message that broke the rule would be routed
    /// by the wrong field.
    #[test]
    fn every_data_request_carries_namespace_as_field_1() {
        use prost_types::field_descriptor_proto::Type;
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let messages: std::collections::HashMap<String, &prost_types::DescriptorProto> = set
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_string();
                f.message_type
                    .iter()
                    .map(move |m| (format!(".{pkg}.{}", m.name()), m))
            })
            .collect();
        let mut checked = 0;
        for file in &set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                if ![super::KEY_VALUE_SERVICE, super::PUB_SUB_SERVICE].contains(&full.as_str()) {
                    continue;
                }
                for method in &service.method {
                    let at = format!("{full}/{}", method.name());
                    assert!(
                        !method.client_streaming(),
                        "{at}: a data method takes one request message"
                    );
                    let input = messages
                        .get(method.input_type())
                        .unwrap_or_else(|| panic!("{at}: input {} not found", method.input_type()));
                    let field = input
                        .field
                        .iter()
                        .find(|f| f.number() == 1)
                        .unwrap_or_else(|| panic!("{at}: {} has no field 1", input.name()));
                    assert_eq!(
                        field.name(),
                        "namespace",
                        "{at}: field 1 of {}",
                        input.name()
                    );
                    assert_eq!(
                        field.r#type(),
                        Type::String,
                        "{at}: field 1 of {}",
                        input.name()
                    );
                    assert!(
                        field.label() != prost_types::field_descriptor_proto::Label::Repeated,
                        "{at}: namespace is one string"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 6, "every KeyValue and PubSub method was checked");
    }
}
