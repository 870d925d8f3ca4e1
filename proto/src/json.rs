//! JSON ↔ `google.protobuf.Struct`, the form a pattern's `config:` block
//! travels in (`Initialize.config`). The proxy and the conformance kit send
//! it; the SDK reads it. prost-types has no serde support and pbjson-types
//! would replace every well-known type in the generated code for two small
//! functions, so they are written here, once.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::{Map, Number};

/// A JSON value as a `Struct`: an object's fields; anything else (`null`,
/// a scalar, an array) has no fields and gives an empty `Struct`.
pub fn to_struct(v: &serde_json::Value) -> Struct {
    match v {
        serde_json::Value::Object(o) => object_to_struct(o),
        _ => Struct::default(),
    }
}

fn object_to_struct(o: &Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        // Every serde_json number has an f64 form (possibly rounded).
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(object_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

/// A `Struct` as a JSON object. Whole numbers become JSON integers, so
/// `max_keys: 10` (sent as `10.0`; `Struct` numbers are all f64)
/// deserializes into an integer field.
pub fn from_struct(s: Struct) -> Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, from_value(v)))
        .collect()
}

fn from_value(v: Value) -> serde_json::Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => number(n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(from_value).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(from_struct(s)),
    }
}

fn number(n: f64) -> serde_json::Value {
    // Below 2^63 every whole f64 converts to i64/u64 exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if n.fract() == 0.0 && n.abs() < LIMIT {
        let i = n as i64;
        return if i >= 0 {
            serde_json::Value::Number(Number::from(i as u64))
        } else {
            serde_json::Value::Number(Number::from(i))
        };
    }
    // NaN and infinities have no JSON form.
    Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_whole_numbers_stay_integers() {
        let v = serde_json::json!({
            "max_keys": 10, "neg": -3, "ratio": 0.5, "name": "x", "on": true,
            "l": [1, "a", null], "nested": {"d": null}
        });
        let s = to_struct(&v);
        assert_eq!(s.fields.len(), 7);
        assert_eq!(s.fields["max_keys"].kind, Some(Kind::NumberValue(10.0)));
        assert_eq!(serde_json::Value::Object(from_struct(s)), v);
    }

    #[test]
    fn non_objects_are_an_empty_struct_and_non_finite_numbers_null() {
        assert_eq!(to_struct(&serde_json::Value::Null), Struct::default());
        assert_eq!(to_struct(&serde_json::json!([1])), Struct::default());
        assert_eq!(number(f64::NAN), serde_json::Value::Null);
        assert_eq!(number(f64::INFINITY), serde_json::Value::Null);
        assert_eq!(number(1e300), serde_json::json!(1e300));
    }
}
