//! An OpenAPI 3 document generated from the same route table and
//! descriptors as the transcoder, so it can never disagree with it.

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::routes::RouteTable;

pub fn document(table: &RouteTable) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for route in table.routes() {
        let input = route.method.input();
        let output = route.method.output();
        collect(&input, &mut schemas);
        collect(&output, &mut schemas);
        let path_fields: Vec<&str> = route.template.fields().collect();
        let mut params: Vec<Value> = path_fields
            .iter()
            .map(|f| json!({"name": f, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if route.body.is_none() {
            for f in input.fields() {
                if path_fields.contains(&f.name())
                    || matches!(f.kind(), Kind::Message(_)) && !is_scalar_wkt(&f)
                {
                    continue;
                }
                let mut schema = field_schema(&f);
                if f.is_list() {
                    schema = json!({"type": "array", "items": schema});
                }
                params.push(json!({"name": f.json_name(), "in": "query", "required": false, "schema": schema}));
            }
        }
        let mut op = json!({
            "operationId": route.method.full_name(),
            "summary": route.method.full_name(),
            "parameters": params,
            "responses": {
                "200": {"description": "OK", "content": {
                    (if route.method.is_server_streaming() { "application/x-ndjson" } else { "application/json" }):
                        {"schema": {"$ref": format!("#/components/schemas/{}", output.full_name())}}
                }},
                "default": {"description": "An error", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            }
        });
        if let Some(body) = &route.body {
            let schema = if body == "*" {
                json!({"$ref": format!("#/components/schemas/{}", input.full_name())})
            } else {
                input
                    .get_field_by_name(body)
                    .map(|f| field_schema(&f))
                    .unwrap_or(json!({}))
            };
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        let entry = paths
            .entry(route.template.openapi_path())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(route.http_method.as_str().to_ascii_lowercase(), op);
        }
    }
    schemas.insert(
        "Problem".into(),
        json!({"type": "object", "description": "RFC 9457 problem details", "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "instance": {"type": "string"}, "code": {"type": "string"},
            "reason": {"type": "string"}, "request_id": {"type": "string"}, "trace_id": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "detail": {"type": "string"}}}}
        }}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Trellis", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Generated from the google.api.http annotations of the Trellis protos."},
        "paths": paths,
        "components": {"schemas": schemas}
    })
}

fn is_scalar_wkt(f: &FieldDescriptor) -> bool {
    matches!(f.kind(), Kind::Message(m) if m.full_name().starts_with("google.protobuf."))
}

fn collect(m: &MessageDescriptor, schemas: &mut Map<String, Value>) {
    if schemas.contains_key(m.full_name()) || m.full_name().starts_with("google.protobuf.") {
        return;
    }
    schemas.insert(m.full_name().to_string(), Value::Null);
    let mut props = Map::new();
    for f in m.fields() {
        let mut schema = field_schema(&f);
        if f.is_list() {
            schema = json!({"type": "array", "items": schema});
        }
        props.insert(f.json_name().to_string(), schema);
        if let Kind::Message(inner) = f.kind() {
            collect(&inner, schemas);
        }
    }
    schemas.insert(
        m.full_name().to_string(),
        json!({"type": "object", "properties": props}),
    );
}

fn field_schema(f: &FieldDescriptor) -> Value {
    if f.is_map() {
        return json!({"type": "object", "additionalProperties": {"type": "string"}});
    }
    match f.kind() {
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_string()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Duration" => json!({"type": "string", "example": "30s"}),
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Struct" => json!({"type": "object"}),
            name => json!({"$ref": format!("#/components/schemas/{name}")}),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;

    #[test]
    fn documents_every_route_with_its_schemas() {
        let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).unwrap();
        let doc = document(&RouteTable::from_pool(&pool).unwrap());
        let kv = &doc["paths"]["/v1/namespaces/{namespace}/keys/{key}"];
        for m in ["get", "put", "delete"] {
            assert!(kv[m].is_object(), "{m} missing");
        }
        assert!(kv["put"]["requestBody"].is_object());
        let list_params = doc["paths"]["/v1/namespaces/{namespace}/keys"]["get"]["parameters"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = list_params
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(names, ["namespace", "prefix", "pageSize", "pageToken"]);
        assert!(
            doc["components"]["schemas"]["trellis.data.v1.PutRequest"]["properties"]["ttl"]
                .is_object()
        );
    }
}
