//! A pattern's configuration: the `google.protobuf.Struct` the proxy sends in
//! `Initialize`, decoded into the pattern's own `Config` type.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;

/// Decodes `config` (absent: `{}`) into `C`. A mismatch is
/// `INVALID_ARGUMENT` naming the field path, e.g.
/// `config.max_keys: invalid type: string "x", expected usize`.
pub(crate) fn decode<C: DeserializeOwned>(config: Option<prost_types::Struct>) -> Result<C, Error> {
    let json = Value::Object(
        config
            .map(trellis_proto::json::from_struct)
            .unwrap_or_default(),
    );
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::value::Kind;

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
}
