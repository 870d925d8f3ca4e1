//! A pattern's configuration: the `google.protobuf.Struct` the proxy sends in
//! `Initialize`, decoded into the pattern's own `Config` type.

use prost_types::value::Kind;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

use crate::Error;

/// Decodes `config` (absent: `{}`) into `C`. A mismatch is
/// `INVALID_ARGUMENT` naming the field path, e.g.
/// `config.max_keys: invalid type: string "x", expected usize`.
pub(crate) fn decode<C: DeserializeOwned>(config: Option<prost_types::Struct>) -> Result<C, Error> {
    let json = Value::Object(config.map(struct_to_json).unwrap_or_default());
    serde_path_to_error::deserialize(json).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." {
            "config".to_string()
        } else {
            format!("config.{path}")
        };
        Error::invalid_argument(field, err.into_inner().to_string())
    })
}

/// Converts a protobuf `Struct` to a JSON object.
pub(crate) fn struct_to_json(s: prost_types::Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => number_to_json(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
    }
}

/// `Struct` numbers are all `f64`; whole ones become JSON integers so they
/// deserialize into integer fields (`max_keys: 10` arrives as `10.0`).
fn number_to_json(n: f64) -> Value {
    // Below 2^63 every whole f64 converts to i64/u64 exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if n.fract() == 0.0 && n.abs() < LIMIT {
        let i = n as i64;
        return if i >= 0 {
            Value::Number(Number::from(i as u64))
        } else {
            Value::Number(Number::from(i))
        };
    }
    // NaN and infinities have no JSON form.
    Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Config {
        max_keys: u64,
        ratio: f64,
        name: String,
        tags: Vec<String>,
        nested: Nested,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        depth: i32,
    }

    impl Default for Config {
        fn default() -> Self {
            Self {
                max_keys: 7,
                ratio: 0.5,
                name: "x".into(),
                tags: vec![],
                nested: Nested::default(),
            }
        }
    }

    fn val(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    fn config(fields: Vec<(&str, Kind)>) -> Option<prost_types::Struct> {
        let fields: BTreeMap<String, prost_types::Value> = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), val(v)))
            .collect();
        Some(prost_types::Struct { fields })
    }

    fn message(err: Error) -> String {
        match err {
            Error::InvalidArgument(v) => v[0].to_string(),
            other => panic!("want InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn absent_config_is_the_default() {
        assert_eq!(decode::<Config>(None).unwrap(), Config::default());
    }

    #[test]
    fn values_of_every_kind_convert() {
        let c: Config = decode(config(vec![
            ("max_keys", Kind::NumberValue(10.0)),
            ("ratio", Kind::NumberValue(0.25)),
            ("name", Kind::StringValue("mem".into())),
            (
                "tags",
                Kind::ListValue(prost_types::ListValue {
                    values: vec![val(Kind::StringValue("a".into()))],
                }),
            ),
            (
                "nested",
                Kind::StructValue(
                    config(vec![("depth", Kind::NumberValue(-3.0))]).unwrap_or_default(),
                ),
            ),
        ]))
        .unwrap();
        assert_eq!(
            c,
            Config {
                max_keys: 10,
                ratio: 0.25,
                name: "mem".into(),
                tags: vec!["a".into()],
                nested: Nested { depth: -3 },
            }
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = decode::<Config>(config(vec![("max_keys", Kind::StringValue("x".into()))]))
            .unwrap_err();
        assert_eq!(
            message(err),
            "config.max_keys: invalid type: string \"x\", expected u64"
        );
    }

    #[test]
    fn nested_field_path_is_named() {
        let err = decode::<Config>(config(vec![(
            "nested",
            Kind::StructValue(config(vec![("depth", Kind::BoolValue(true))]).unwrap_or_default()),
        )]))
        .unwrap_err();
        assert!(message(err).starts_with("config.nested.depth: invalid type: boolean"));
    }

    #[test]
    fn fractional_number_for_an_integer_field_is_rejected() {
        let err = decode::<Config>(config(vec![("max_keys", Kind::NumberValue(1.5))])).unwrap_err();
        assert!(message(err).starts_with("config.max_keys: invalid type: floating point"));
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = decode::<Config>(config(vec![("max_kyes", Kind::NumberValue(1.0))])).unwrap_err();
        let msg = message(err);
        assert!(msg.contains("unknown field `max_kyes`"), "{msg}");
        assert!(msg.contains("max_keys"), "{msg}");
    }

    #[test]
    fn odd_numbers_do_not_panic() {
        for n in [f64::NAN, f64::INFINITY, -0.0, 1e300, -1e300] {
            let _ = number_to_json(n);
        }
        assert_eq!(number_to_json(f64::NAN), Value::Null);
        assert_eq!(number_to_json(-2.0), Value::from(-2));
    }
}
