//! The data methods the plane forwards, read from the contracts'
//! descriptors: `:path` → service, method and whether the response streams.

use std::collections::HashMap;
use std::sync::Arc;

use prost_reflect::DescriptorPool;
use trellis_proto::{KEY_VALUE_SERVICE, PUB_SUB_SERVICE};

/// The data services, by full name; their calls go through the data plane.
pub const DATA_SERVICES: &[&str] = &[KEY_VALUE_SERVICE, PUB_SUB_SERVICE];

#[derive(Debug)]
pub struct DataMethod {
    /// `trellis.data.v1.KeyValue`: the interface a pattern must implement.
    pub service: &'static str,
    /// `Get`.
    pub name: String,
    /// `trellis.data.v1.KeyValue/Get`: the `rpc.method` of metrics and spans.
    pub full_name: String,
    /// A stream of responses (`Subscribe`): only its opening is bounded by
    /// the deadline.
    pub server_streaming: bool,
}

impl DataMethod {
    /// Whether the method changes data (`Put`, `Delete`, `Publish`): the
    /// ones an idempotency key applies to.
    pub fn writes(&self) -> bool {
        trellis_proto::idempotency::WRITES.contains(&self.name.as_str())
    }
}

pub struct Methods {
    by_path: HashMap<String, Arc<DataMethod>>,
}

impl Methods {
    /// Every method of the data services in the embedded descriptor set.
    /// Fails if one takes a stream of requests: the plane forwards exactly
    /// one request message per call.
    pub fn from_descriptors() -> Result<Methods, String> {
        let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| format!("the embedded descriptor set does not decode: {e}"))?;
        let mut by_path = HashMap::new();
        for service in DATA_SERVICES {
            let descriptor = pool
                .get_service_by_name(service)
                .ok_or_else(|| format!("the descriptor set has no service {service}"))?;
            for m in descriptor.methods() {
                if m.is_client_streaming() {
                    return Err(format!(
                        "{service}/{} takes a stream of requests, which the data plane does not \
                         forward",
                        m.name()
                    ));
                }
                by_path.insert(
                    format!("/{service}/{}", m.name()),
                    Arc::new(DataMethod {
                        service,
                        name: m.name().to_string(),
                        full_name: format!("{service}/{}", m.name()),
                        server_streaming: m.is_server_streaming(),
                    }),
                );
            }
        }
        Ok(Methods { by_path })
    }

    pub fn get(&self, path: &str) -> Option<Arc<DataMethod>> {
        self.by_path.get(path).cloned()
    }

    /// Every method's full name (`trellis.data.v1.KeyValue/Get`), sorted.
    pub fn full_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_path.values().map(|m| m.full_name.clone()).collect();
        names.sort_unstable();
        names
    }

    /// Every method's path, sorted.
    pub fn paths(&self) -> Vec<&str> {
        let mut paths: Vec<&str> = self.by_path.keys().map(String::as_str).collect();
        paths.sort_unstable();
        paths
    }
}

/// Whether `path` (`/package.Service/Method`) belongs to a data service.
pub fn is_data_path(path: &str) -> bool {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(s, _)| s);
    service.is_some_and(|s| DATA_SERVICES.contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_method_is_known_with_its_shape() {
        let m = Methods::from_descriptors().unwrap();
        let get = m.get("/trellis.data.v1.KeyValue/Get").unwrap();
        assert_eq!(get.service, KEY_VALUE_SERVICE);
        assert!(!get.server_streaming);
        let sub = m.get("/trellis.data.v1.PubSub/Subscribe").unwrap();
        assert!(sub.server_streaming);
        assert_eq!(m.paths().len(), 6, "{:?}", m.paths());
        assert!(m.get("/trellis.data.v1.KeyValue/Nope").is_none());
    }

    #[test]
    fn data_paths_are_told_apart_from_the_rest() {
        assert!(is_data_path("/trellis.data.v1.KeyValue/Get"));
        assert!(is_data_path("/trellis.data.v1.PubSub/Whatever"));
        assert!(!is_data_path("/trellis.admin.v1.Admin/ListPatterns"));
        assert!(!is_data_path("/grpc.health.v1.Health/Check"));
        assert!(!is_data_path("/trellis.data.v1.KeyValue"));
        assert!(!is_data_path(""));
    }
}
