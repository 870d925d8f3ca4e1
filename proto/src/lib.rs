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

pub mod json;

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
}
