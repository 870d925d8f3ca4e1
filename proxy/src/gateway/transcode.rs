//! HTTP/JSON ↔ protobuf for one route, following google/api/http.proto: path
//! bindings, query parameters for the remaining fields (nested with dots,
//! repeated by repetition), `body: "*"` / `body: "field"` / no body, and
//! `response_body`. The proto3 JSON mapping itself (lowerCamelCase, both
//! spellings accepted, bytes as base64, Duration/Timestamp as strings, 64-bit
//! integers as strings, enums by name) is prost-reflect's.
//!
//! Every input is gathered into one JSON object (body, then query, then
//! path, later winning) and decoded once with unknown fields denied, so
//! there is one code path for all of them and one kind of error.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions,
};
use serde_json::{Map, Value};
use tonic::Code;

use super::routes::Route;
use crate::error::ApiError;

/// Well-known types whose JSON form is a string or scalar, settable from a
/// path or query parameter.
const SCALAR_WKT: &[&str] = &[
    "google.protobuf.Duration",
    "google.protobuf.Timestamp",
    "google.protobuf.FieldMask",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.BoolValue",
];

/// Deepest JSON nesting the parser will even look at.
pub fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Builds the request message for `route` from the path bindings, the raw
/// query string and the body bytes.
pub fn request(
    route: &Route,
    bindings: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
    max_depth: usize,
) -> Result<DynamicMessage, ApiError> {
    let input = route.method.input();
    let mut root = Map::new();

    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    match (&route.body, has_body) {
        (None, true) => {
            return Err(ApiError::http(
                400,
                Code::InvalidArgument,
                "BODY_NOT_ALLOWED",
                format!(
                    "{} {} takes no request body; pass fields as query parameters",
                    route.http_method, route.template.source
                ),
            ));
        }
        (Some(field), true) => {
            let depth = json_depth(body);
            if depth > max_depth {
                return Err(ApiError::http(
                    400,
                    Code::InvalidArgument,
                    "JSON_TOO_DEEP",
                    format!(
                        "the JSON body nests {depth} levels deep; at most {max_depth} are allowed"
                    ),
                ));
            }
            let parsed: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::http(
                    400,
                    Code::InvalidArgument,
                    "INVALID_JSON",
                    format!(
                        "the request body is not valid JSON: {e} (line {}, column {}); send a JSON object",
                        e.line(),
                        e.column()
                    ),
                )
            })?;
            if field == "*" {
                match parsed {
                    Value::Object(m) => {
                        // A field the path sets is not a body field: said, not
                        // silently overwritten (and so the OpenAPI body schema,
                        // which leaves it out, is exact).
                        let from_path: Vec<&str> = route.template.fields().collect();
                        if let Some(name) = m.keys().find(|k| {
                            from_path.iter().any(|p| {
                                input.get_field_by_name(p).is_some_and(|f| {
                                    f.name() == k.as_str() || f.json_name() == k.as_str()
                                })
                            })
                        }) {
                            return Err(ApiError::invalid_argument(
                                name,
                                format!(
                                    "is taken from the path ({}); remove it from the body",
                                    route.template.source
                                ),
                            ));
                        }
                        root = m
                    }
                    _ => {
                        return Err(ApiError::invalid_argument(
                            "(body)",
                            "the body must be a JSON object whose keys are the request's fields",
                        ));
                    }
                }
            } else {
                root.insert(field.clone(), parsed);
            }
        }
        _ => {}
    }

    if let Some(q) = query.filter(|q| !q.is_empty()) {
        let mut params: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            params.push((k.into_owned(), v.into_owned()));
        }
        let mut errors = ApiError::new(Code::InvalidArgument, "INVALID_QUERY", "");
        for (name, value) in params {
            if route.body.as_deref() == Some("*") {
                errors = errors.violation(
                    name.clone(),
                    "query parameters are not accepted here: every field goes in the JSON body",
                );
                continue;
            }
            match resolve(&input, &name) {
                Ok(path) => {
                    let Some(leaf) = path.last() else { continue };
                    match scalar(leaf, &value) {
                        Ok(v) => insert(&mut root, &path, v, leaf.is_list()),
                        Err(why) => errors = errors.violation(name.clone(), why),
                    }
                }
                Err(why) => errors = errors.violation(name.clone(), why),
            }
        }
        if !errors.violations.is_empty() {
            errors.message = summarize("invalid query parameters", &errors.violations);
            return Err(errors);
        }
    }

    for (field_path, value) in bindings {
        let path = resolve(&input, field_path)
            .map_err(|why| ApiError::invalid_argument(field_path, why))?;
        let Some(leaf) = path.last() else { continue };
        let v = scalar(leaf, value).map_err(|why| ApiError::invalid_argument(field_path, why))?;
        insert(&mut root, &path, v, false);
    }

    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let root = Value::Object(root);
    DynamicMessage::deserialize_with_options(input.clone(), &root, &options).map_err(|e| {
        let text = e.to_string();
        if let Some(field) = unknown_field(&text) {
            return ApiError::new(
                Code::InvalidArgument,
                "UNKNOWN_FIELD",
                format!("unknown field {field:?} in the request; {text}"),
            )
            .violation(field, "no such field in ".to_string() + input.full_name());
        }
        let err = ApiError::new(
            Code::InvalidArgument,
            "INVALID_FIELD_VALUE",
            format!("the request does not fit {}: {text}", input.full_name()),
        );
        // prost-reflect's error does not say where: decode the fields one
        // by one to name the first that does not fit, with its format.
        let culprit = root.as_object().and_then(|fields| {
            fields.iter().find(|(name, value)| {
                let one = Value::Object(Map::from_iter([((*name).clone(), (*value).clone())]));
                DynamicMessage::deserialize_with_options(input.clone(), one, &options).is_err()
            })
        });
        match culprit.and_then(|(name, _)| {
            Some((
                name,
                input
                    .get_field_by_json_name(name)
                    .or_else(|| input.get_field_by_name(name))?,
            ))
        }) {
            Some((name, field)) => {
                let detail = format!("{text}; {}", expected(&field));
                ApiError {
                    message: format!("{name}: {detail}"),
                    ..err
                }
                .violation(name.clone(), detail)
            }
            None => err,
        }
    })
}

/// What a field's JSON value must look like, for an error message.
fn expected(field: &FieldDescriptor) -> String {
    let one = match field.kind() {
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Duration" => {
                "a duration: a string of seconds ending in `s`, such as \"30s\" or \"1.5s\""
            }
            "google.protobuf.Timestamp" => {
                "an RFC 3339 timestamp string, such as \"2026-01-02T03:04:05Z\""
            }
            _ => "a JSON object",
        },
        Kind::Bytes => "a base64 string",
        Kind::String => "a string",
        Kind::Bool => "true or false",
        Kind::Enum(_) => "one of the enum's names, as a string",
        Kind::Float | Kind::Double => "a number",
        _ => "an integer (a number, or a string of digits)",
    };
    if field.is_map() {
        "expected an object".into()
    } else if field.is_list() {
        format!("expected a list, each {one}")
    } else {
        format!("expected {one}")
    }
}

fn summarize(what: &str, violations: &[(String, String)]) -> String {
    let parts: Vec<String> = violations
        .iter()
        .map(|(f, d)| format!("{f}: {d}"))
        .collect();
    format!("{what}: {}", parts.join("; "))
}

/// The field name in prost-reflect's (or serde's) unknown-field error.
fn unknown_field(text: &str) -> Option<String> {
    if let Some(rest) = text.strip_prefix("unrecognized field name '") {
        return Some(rest.split('\'').next()?.to_string());
    }
    let rest = text.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// Resolves a dotted field path (proto or JSON names) to descriptors.
fn resolve(msg: &MessageDescriptor, path: &str) -> Result<Vec<FieldDescriptor>, String> {
    let mut out = Vec::new();
    let mut current = msg.clone();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))
            .ok_or_else(|| {
                let known: Vec<String> = current
                    .fields()
                    .map(|f| f.json_name().to_string())
                    .collect();
                format!(
                    "no such field in {}; known fields: {}",
                    current.full_name(),
                    known.join(", ")
                )
            })?;
        let last = i + 1 == parts.len();
        match field.kind() {
            Kind::Message(m) if !last => {
                if field.is_list() || field.is_map() {
                    return Err("repeated and map fields cannot be nested into".to_string());
                }
                current = m;
            }
            Kind::Message(m) if !SCALAR_WKT.contains(&m.full_name()) => {
                return Err(format!(
                    "is a {} message; set its fields with dots, e.g. {part}.field",
                    m.full_name()
                ));
            }
            _ if !last => return Err(format!("{part} is not a message; it has no fields")),
            _ => {}
        }
        if field.is_map() {
            return Err("map fields cannot be set from the URL".to_string());
        }
        out.push(field);
    }
    Ok(out)
}

/// A text value from the URL as the JSON the field's type takes.
fn scalar(field: &FieldDescriptor, raw: &str) -> Result<Value, String> {
    match field.kind() {
        Kind::Bool => match raw {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(format!("{raw:?} is not a boolean; use true or false")),
        },
        Kind::String | Kind::Bytes | Kind::Enum(_) | Kind::Message(_) => {
            Ok(Value::String(raw.to_string()))
        }
        Kind::Int32
        | Kind::Sint32
        | Kind::Sfixed32
        | Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64 => raw
            .parse::<i64>()
            .map(|_| Value::String(raw.to_string()))
            .map_err(|_| format!("{raw:?} is not an integer")),
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => raw
            .parse::<u64>()
            .map(|_| Value::String(raw.to_string()))
            .map_err(|_| format!("{raw:?} is not a non-negative integer")),
        // Proto3 JSON takes numbers as strings too, "NaN" and "Infinity" included.
        Kind::Float | Kind::Double => match raw {
            "NaN" | "Infinity" | "-Infinity" => Ok(Value::String(raw.to_string())),
            _ => raw
                .parse::<f64>()
                .map(|_| Value::String(raw.to_string()))
                .map_err(|_| format!("{raw:?} is not a number")),
        },
    }
}

fn insert(root: &mut Map<String, Value>, path: &[FieldDescriptor], value: Value, repeated: bool) {
    let mut node = root;
    for f in &path[..path.len() - 1] {
        let entry = node
            .entry(f.name().to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else { return };
        node = next;
    }
    let Some(leaf) = path.last() else { return };
    // Both spellings may have arrived; keep one key per field.
    node.remove(leaf.json_name());
    if repeated {
        match node
            .entry(leaf.name().to_string())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(items) => items.push(value),
            other => *other = Value::Array(vec![value]),
        }
    } else {
        node.insert(leaf.name().to_string(), value);
    }
}

/// The response as JSON: lowerCamelCase names, every field present (also
/// defaults, as grpc-gateway does), 64-bit integers as strings.
pub fn response(route: &Route, msg: &DynamicMessage) -> Vec<u8> {
    let options = SerializeOptions::new().skip_default_fields(false);
    let selected = route
        .response_body
        .as_deref()
        .and_then(|f| match msg.get_field_by_name(f) {
            Some(v) => v.as_message().cloned(),
            None => None,
        });
    let target = selected.as_ref().unwrap_or(msg);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    if let Err(e) = target.serialize_with_options(&mut ser, &options) {
        tracing::error!(error = %e, "serializing a response to JSON failed");
        return b"{}".to_vec();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::{Lookup, RouteTable};
    use http::Method;
    use prost_reflect::DescriptorPool;

    fn table() -> RouteTable {
        let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::from_pool(&pool).unwrap()
    }

    fn build(
        method: Method,
        path: &str,
        query: Option<&str>,
        body: &str,
    ) -> Result<DynamicMessage, ApiError> {
        let t = table();
        let Lookup::Found(route, bindings) = t.find(&method, path) else {
            panic!("no route for {method} {path}");
        };
        request(route, &bindings, query, body.as_bytes(), 32)
    }

    fn json(m: &DynamicMessage) -> Value {
        let mut out = Vec::new();
        m.serialize_with_options(
            &mut serde_json::Serializer::new(&mut out),
            &SerializeOptions::new(),
        )
        .unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn put_takes_path_and_body_with_duration_and_base64() {
        let m = build(
            Method::PUT,
            "/v1/namespaces/default/keys/a%2Fb",
            None,
            r#"{"value":"aGk=","ttl":"30s"}"#,
        )
        .unwrap();
        assert_eq!(
            json(&m),
            serde_json::json!({"namespace":"default","key":"a/b","value":"aGk=","ttl":"30s"})
        );
    }

    #[test]
    fn a_value_that_does_not_fit_names_its_field_and_format() {
        for (body, field, hint) in [
            (r#"{"value":"aGk=","ttl":"30"}"#, "ttl", "\"30s\""),
            (r#"{"value":"!!","ttl":"30s"}"#, "value", "base64"),
            (r#"{"ttl":7}"#, "ttl", "duration"),
        ] {
            let e = build(Method::PUT, "/v1/namespaces/default/keys/k", None, body).unwrap_err();
            assert_eq!(e.reason, "INVALID_FIELD_VALUE", "{body}");
            let (f, detail) = &e.violations[0];
            assert_eq!(f, field, "{body}");
            assert!(detail.contains(hint), "{body}: {detail}");
            assert!(e.message.starts_with(field), "{}", e.message);
        }
    }

    #[test]
    fn a_path_field_in_the_body_is_refused_by_name() {
        for body in [r#"{"key":"other","value":""}"#, r#"{"namespace":"x"}"#] {
            let e = build(Method::PUT, "/v1/namespaces/default/keys/k", None, body).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument);
            let (field, detail) = &e.violations[0];
            assert!(body.contains(field.as_str()), "{field}");
            assert!(detail.contains("taken from the path"), "{detail}");
        }
    }

    #[test]
    fn query_maps_onto_remaining_fields_in_both_spellings() {
        for q in [
            "prefix=user%2F&pageSize=10&pageToken=abc",
            "prefix=user/&page_size=10&page_token=abc",
        ] {
            let m = build(Method::GET, "/v1/namespaces/default/keys", Some(q), "").unwrap();
            assert_eq!(
                json(&m),
                serde_json::json!({"namespace":"default","prefix":"user/","pageSize":10,"pageToken":"abc"}),
                "{q}"
            );
        }
    }

    #[test]
    fn every_bad_query_parameter_is_reported_at_once() {
        let e = build(
            Method::GET,
            "/v1/namespaces/default/keys",
            Some("nope=1&alsoNope=2"),
            "",
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        let fields: Vec<&str> = e.violations.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["nope", "alsoNope"]);
        assert!(
            e.violations[0].1.contains("pageSize"),
            "lists known fields: {:?}",
            e.violations
        );
    }

    #[test]
    fn a_bad_number_in_the_query_names_the_field() {
        let e = build(
            Method::GET,
            "/v1/namespaces/default/keys",
            Some("pageSize=ten"),
            "",
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(
            e.message.contains("ten") || e.message.contains("page"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_json_field_is_named() {
        let e = build(
            Method::PUT,
            "/v1/namespaces/d/keys/k",
            None,
            r#"{"vaule":"aGk="}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason, "UNKNOWN_FIELD", "{}", e.message);
        assert_eq!(e.violations[0].0, "vaule");
    }

    #[test]
    fn malformed_json_points_at_the_position() {
        let e = build(
            Method::PUT,
            "/v1/namespaces/d/keys/k",
            None,
            "{\n  \"value\": ,\n}",
        )
        .unwrap_err();
        assert_eq!(e.reason, "INVALID_JSON");
        assert!(e.message.contains("line 2"), "{}", e.message);
    }

    #[test]
    fn too_deep_json_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let e = build(Method::PUT, "/v1/namespaces/d/keys/k", None, &deep).unwrap_err();
        assert_eq!(e.reason, "JSON_TOO_DEEP");
        assert_eq!(
            json_depth(br#"{"a":"[[[[","b":[{}]}"#),
            3,
            "brackets in strings do not count"
        );
    }

    #[test]
    fn a_body_where_none_is_taken_is_refused() {
        let e = build(Method::GET, "/v1/namespaces/d/keys/k", None, r#"{"x":1}"#).unwrap_err();
        assert_eq!(e.reason, "BODY_NOT_ALLOWED");
    }

    #[test]
    fn query_on_a_body_star_method_is_refused() {
        let e = build(
            Method::PUT,
            "/v1/namespaces/d/keys/k",
            Some("value=x"),
            "{}",
        )
        .unwrap_err();
        assert_eq!(e.violations[0].0, "value");
    }

    #[test]
    fn response_emits_defaults_in_lower_camel_case() {
        let t = table();
        let Lookup::Found(route, _) = t.find(&Method::GET, "/v1/namespaces/d/keys") else {
            panic!()
        };
        let msg = DynamicMessage::new(route.method.output());
        let v: Value = serde_json::from_slice(&response(route, &msg)).unwrap();
        assert_eq!(v, serde_json::json!({"entries": [], "nextPageToken": ""}));
    }
}
