//! An OpenAPI 3 document generated from the same route table and
//! descriptors as the transcoder, so it can never disagree with it; the
//! constraints on request fields come from `trellis_proto::rules`, the rules
//! pattern-sdk enforces, and from what the gateway itself refuses (unknown
//! fields, `.`/`..` path segments, NUL bytes, names the configuration could
//! not hold). Schemathesis holds the server to this document in
//! `tests/tests/schemathesis.rs`.

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::routes::{Route, RouteTable};

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
            .map(|f| {
                json!({"name": f, "in": "path", "required": true,
                       "schema": path_schema(route, &input, f)})
            })
            .collect();
        if route.body.is_none() {
            for f in input.fields() {
                if path_fields.contains(&f.name())
                    || matches!(f.kind(), Kind::Message(_)) && !is_scalar_wkt(&f)
                {
                    continue;
                }
                let schema = constrained(&input, &f);
                params.push(json!({"name": f.json_name(), "in": "query", "required": false, "schema": schema}));
            }
        }
        let mut op = json!({
            "operationId": route.method.full_name(),
            "summary": route.method.full_name(),
            "parameters": params,
            "responses": responses(route, &output),
        });
        if is_write(route) {
            // Not a header parameter: its grammar (a structured-field string
            // or a bare token, trimmed) has no exact JSON Schema, and an
            // inexact one would be a promise the server does not keep.
            op["description"] = json!(
                "An `Idempotency-Key` header (1 to 255 printable ASCII characters, as a \
                 structured-field string or a bare token) makes a retry of this write safe: the \
                 same key with the same request gets the first answer again, with \
                 `Idempotent-Replayed: true`. See docs/idempotency.md."
            );
        }
        if let Some(body) = &route.body {
            let schema = if body == "*" {
                object_schema(&input, &path_fields, true)
            } else {
                input
                    .get_field_by_name(body)
                    .map(|f| constrained(&input, &f))
                    .unwrap_or(json!({}))
            };
            // No body (or only whitespace) is an empty message, as in
            // grpc-gateway: every proto3 field is optional.
            op["requestBody"] =
                json!({"required": false, "content": {"application/json": {"schema": schema}}});
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
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "errors": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "detail": {"type": "string"}}}}
        }, "required": ["type", "title", "status", "detail", "code", "reason"]}),
    );
    json!({
        // 3.1: its schemas are JSON Schema 2020-12, which has
        // `propertyNames` and `null` (3.0 has neither).
        "openapi": "3.1.0",
        "info": {"title": "Trellis", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Generated from the google.api.http annotations of the Trellis \
                                 protos. Errors are RFC 9457 problem+json; docs/http-gateway.md \
                                 gives the gRPC code → HTTP status rule."},
        "paths": paths,
        // Declared, not required: credentials are needed only when the
        // proxy's configuration has `access:` (then every data and admin
        // operation answers 401 without them); a document-wide `security`
        // would claim they always are.
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "`Authorization: Bearer <token>` (or a client certificate over mutual \
                            TLS), needed when the proxy's configuration has `access:`; see \
                            docs/security.md."}}}
    })
}

/// Every answer an operation can give. The statuses follow
/// `problem::status_for`: which of them apply depends on what the
/// operation does (reads a body, goes to a pattern, writes).
fn responses(route: &Route, output: &MessageDescriptor) -> Value {
    let data = is_data(route);
    let write = is_write(route);
    let request_id = json!({"X-Request-Id": {"schema": {"type": "string"},
        "description": "The request's id (the caller's, or one made up); in the logs too."}});
    let retry_after = json!({"Retry-After": {"schema": {"type": "integer", "minimum": 1},
        "description": "Seconds to wait before trying again."}, "X-Request-Id": request_id["X-Request-Id"]});
    let problem = |description: &str, retry: bool| {
        json!({"description": description,
               "headers": if retry { retry_after.clone() } else { request_id.clone() },
               "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    };
    let content_type = if route.method.is_server_streaming() {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    let mut ok = json!({"description": "OK", "headers": request_id,
        "content": {content_type: {"schema": {"$ref": format!("#/components/schemas/{}", output.full_name())}}}});
    if route.method.full_name() == "trellis.data.v1.KeyValue.List" {
        // The stateful phase of an API tester (and a reader) learns where
        // page tokens come from.
        ok["links"] = json!({"nextPage": {"operationId": route.method.full_name(),
            "parameters": {"namespace": "$request.path.namespace",
                           "pageToken": "$response.body#/nextPageToken"}}});
    }
    let mut r = Map::new();
    r.insert("200".into(), ok);
    let mut unauthorized = problem(
        "With `access:` configured: no credentials, a malformed `Authorization`, or a token the \
         proxy does not know (CREDENTIALS_MISSING, MALFORMED_AUTHORIZATION, TOKEN_UNKNOWN).",
        false,
    );
    unauthorized["headers"]["WWW-Authenticate"] = json!({"schema": {"type": "string"},
        "description": "`Bearer realm=\"trellis\"`."});
    r.insert("401".into(), unauthorized);
    let mut add = |status: &str, description: &str, retry: bool| {
        r.insert(status.into(), problem(description, retry));
    };
    add(
        "400",
        "The request breaks a rule (a field, a query parameter, the body, the path); `errors` names each field.",
        false,
    );
    add(
        "403",
        if data {
            "The caller's identity lacks the role this call needs on the namespace (ROLE_MISSING), \
             or the pattern refused the call (PERMISSION_DENIED)."
        } else {
            "The caller's identity lacks the admin role (ROLE_MISSING)."
        },
        false,
    );
    add("404", "No such namespace, key, pattern or route.", false);
    if route.body.is_some() {
        add(
            "408",
            "The body did not arrive within `http.limits.read_timeout`.",
            false,
        );
    }
    if data || route.method.name() == "StartPattern" {
        add(
            "409",
            "A conflict with the current state: the pattern is already running (ALREADY_RUNNING), \
             the first call with this Idempotency-Key is still running (IDEMPOTENCY_KEY_IN_USE), \
             or the pattern reports ABORTED or ALREADY_EXISTS.",
            false,
        );
    }
    if route.body.is_some() {
        add(
            "413",
            "The body is larger than `http.limits.max_body`.",
            false,
        );
        add("415", "The body is not `application/json`.", false);
    }
    add(
        "414",
        "The URI is longer than `http.limits.max_uri_bytes`.",
        false,
    );
    if write {
        add(
            "422",
            "The Idempotency-Key was used before with a different request (IDEMPOTENCY_KEY_REUSED).",
            false,
        );
    }
    if data {
        add(
            "429",
            "A rate or concurrency limit of the namespace's policy (RATE_LIMITED, CONCURRENCY_LIMIT), \
             or the pattern is out of a resource.",
            true,
        );
    }
    add(
        "431",
        "The request headers are larger than `http.limits.max_header_bytes`.",
        false,
    );
    add("500", "A fault in the proxy or the pattern.", false);
    if data {
        add(
            "501",
            "The namespace's pattern does not implement this interface.",
            false,
        );
    }
    add(
        "503",
        "The pattern is down or starting, its circuit is open, the proxy is overloaded or shutting \
         down; try again after Retry-After.",
        true,
    );
    if data {
        add(
            "504",
            "The deadline (Grpc-Timeout, or the policy's timeout) passed.",
            false,
        );
    }
    r.insert(
        "default".into(),
        problem(
            "Another error a pattern reported, by the same status rule.",
            false,
        ),
    );
    Value::Object(r)
}

/// A call the data plane forwards to a pattern.
fn is_data(route: &Route) -> bool {
    crate::dataplane::DATA_SERVICES.contains(&route.method.parent_service().full_name())
}

/// The data calls that take an `Idempotency-Key`.
fn is_write(route: &Route) -> bool {
    is_data(route) && trellis_proto::idempotency::WRITES.contains(&route.method.name())
}

/// A path parameter: the field's own rules, plus what a path segment
/// cannot carry here (`.`/`..` segments, NUL), plus, for the names the
/// configuration gives (namespaces, patterns), the configuration's rule:
/// any other name answers 404 at best, so a schema-valid request names one
/// the proxy could hold.
fn path_schema(route: &Route, input: &MessageDescriptor, field: &str) -> Value {
    let mut schema = match input.get_field_by_name(field) {
        Some(f) => constrained(input, &f),
        None => json!({"type": "string"}),
    };
    let config_name = (field == "namespace" && input.package_name() == "trellis.data.v1")
        || (field == "name" && input.package_name() == "trellis.admin.v1");
    if let Value::Object(m) = &mut schema {
        if config_name {
            m.insert("pattern".into(), json!(crate::config::NAME_PATTERN));
            m.insert("description".into(), json!(crate::config::NAME_RULE));
            return schema;
        }
        if !m.contains_key("pattern") {
            m.insert("pattern".into(), json!("^[^\\u0000]*$"));
        }
        let dots = if route.template.is_multi_segment(field) {
            json!({"pattern": "(^|/)\\.\\.?(/|$)"})
        } else {
            json!({"enum": [".", ".."]})
        };
        m.insert("not".into(), dots);
    }
    schema
}

/// `message` as an object schema without the fields in `except` (a body
/// whose other fields come from the path). Unknown fields are refused, so
/// `additionalProperties: false`. In a `request`, every field may be `null`
/// (the proto3 JSON mapping reads it as the field's default); answers never
/// hold one.
fn object_schema(message: &MessageDescriptor, except: &[&str], request: bool) -> Value {
    let mut props = Map::new();
    for f in message.fields() {
        if !except.contains(&f.name()) {
            let schema = constrained(message, &f);
            let schema = if request { or_null(schema) } else { schema };
            props.insert(f.json_name().to_string(), schema);
        }
    }
    json!({"type": "object", "properties": props, "additionalProperties": false})
}

/// `schema`, or `null`.
fn or_null(mut schema: Value) -> Value {
    match schema.get("type").cloned() {
        Some(Value::String(t)) => {
            schema["type"] = json!([t, "null"]);
            schema
        }
        _ => json!({"anyOf": [schema, {"type": "null"}]}),
    }
}

/// The field's type schema with its rules merged in.
fn constrained(message: &MessageDescriptor, f: &FieldDescriptor) -> Value {
    let mut schema = field_schema(f);
    if f.is_list() {
        schema = json!({"type": "array", "items": schema});
    }
    if let (Value::Object(m), Some(Value::Object(rules))) = (
        &mut schema,
        trellis_proto::rules::schema(message.full_name(), f.name()),
    ) {
        m.extend(rules);
    }
    schema
}

fn is_scalar_wkt(f: &FieldDescriptor) -> bool {
    matches!(f.kind(), Kind::Message(m) if m.full_name().starts_with("google.protobuf."))
}

fn collect(m: &MessageDescriptor, schemas: &mut Map<String, Value>) {
    if schemas.contains_key(m.full_name()) || m.full_name().starts_with("google.protobuf.") {
        return;
    }
    schemas.insert(m.full_name().to_string(), Value::Null);
    for f in m.fields() {
        if let Kind::Message(inner) = f.kind()
            && !f.is_map()
        {
            collect(&inner, schemas);
        }
    }
    schemas.insert(m.full_name().to_string(), object_schema(m, &[], false));
}

fn field_schema(f: &FieldDescriptor) -> Value {
    if f.is_map() {
        return json!({"type": "object", "additionalProperties": {"type": "string"}});
    }
    match f.kind() {
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        // The JSON mapping writes 64-bit integers as strings.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"})
        }
        Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "uint64", "pattern": "^[0-9]+$"})
        }
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_string()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Duration" => {
                json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$", "example": "30s"})
            }
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

    fn doc() -> Value {
        let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).unwrap();
        document(&RouteTable::from_pool(&pool).unwrap())
    }

    #[test]
    fn documents_every_route_with_its_schemas() {
        let doc = doc();
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

    #[test]
    fn request_constraints_come_from_the_rules() {
        let doc = doc();
        let put = &doc["paths"]["/v1/namespaces/{namespace}/keys/{key}"]["put"];
        let body = &put["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["additionalProperties"], false);
        let props: Vec<&String> = body["properties"].as_object().unwrap().keys().collect();
        assert_eq!(props, ["ttl", "value"], "path fields are not body fields");
        assert_eq!(
            body["properties"]["ttl"]["pattern"],
            trellis_proto::rules::ttl_pattern()
        );
        let key = &put["parameters"][1]["schema"];
        assert_eq!(key["maxLength"], trellis_proto::rules::MAX_KEY_BYTES);
        assert_eq!(key["not"]["pattern"], "(^|/)\\.\\.?(/|$)");
        let ns = &put["parameters"][0]["schema"];
        assert_eq!(ns["pattern"], crate::config::NAME_PATTERN);
        let page_size = &doc["paths"]["/v1/namespaces/{namespace}/keys"]["get"]["parameters"][2];
        assert_eq!(page_size["schema"]["minimum"], 0);
        assert_eq!(page_size["schema"]["maximum"], i32::MAX);
        let topic = &doc["paths"]["/v1/namespaces/{namespace}/topics/{topic}:publish"]["post"]["parameters"]
            [1]["schema"];
        assert_eq!(topic["not"]["enum"], json!([".", ".."]));
    }

    #[test]
    fn every_operation_lists_its_error_statuses() {
        let doc = doc();
        let statuses = |path: &str, method: &str| -> Vec<String> {
            doc["paths"][path][method]["responses"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let put = statuses("/v1/namespaces/{namespace}/keys/{key}", "put");
        for s in [
            "200", "400", "404", "408", "409", "413", "415", "422", "429", "503", "504",
        ] {
            assert!(put.contains(&s.to_string()), "Put lacks {s}: {put:?}");
        }
        let start = statuses("/v1/patterns/{name}:start", "post");
        assert!(start.contains(&"409".to_string()), "{start:?}");
        for op in [&put, &start] {
            for s in ["401", "403"] {
                assert!(op.contains(&s.to_string()), "lacks {s}: {op:?}");
            }
        }
        assert!(!start.contains(&"413".to_string()), "no body: {start:?}");
        let get = statuses("/v1/namespaces/{namespace}/keys/{key}", "get");
        assert!(!get.contains(&"422".to_string()), "{get:?}");
    }
}
