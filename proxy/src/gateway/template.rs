//! `google.api.http` path templates: parsing and matching.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! Decoding decisions (documented in docs/http-gateway.md):
//! - every path segment is percent-decoded once, so `%2F` inside a
//!   `{key=**}` variable is a `/` in the key — `a%2Fb` and `a/b` name the
//!   same key (Google's `fully_decode_reserved_expansion: true` reading);
//!   `%252F` decodes once, to the three characters `%2F`;
//! - a `.` or `..` segment (literal or encoded) is refused: proxies and
//!   clients normalize them away, so such keys are not addressable over HTTP;
//! - a NUL byte or invalid UTF-8 after decoding is refused, naming the field.

use percent_encoding::percent_decode_str;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    Literal(String),
    /// `*`: exactly one segment.
    Star,
    /// `**`: zero or more segments; only last.
    DoubleStar,
}

/// A variable bound to the elements `start..end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    pub field_path: String,
    start: usize,
    end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub source: String,
    elems: Vec<Elem>,
    vars: Vec<Var>,
    pub verb: Option<String>,
}

/// Why a path did not match, when it *almost* did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// A variable's value is unusable; names the field.
    BadValue { field: String, problem: String },
    /// A `.`/`..` segment.
    DotSegment,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        let rest = source
            .strip_prefix('/')
            .ok_or_else(|| format!("template {source:?} must start with '/'"))?;
        // The verb is a ':' after the last '/', outside braces.
        let (path, verb) = split_verb(rest);
        let mut elems = Vec::new();
        let mut vars = Vec::new();
        let mut chars = path;
        while !chars.is_empty() {
            if let Some(after) = chars.strip_prefix('{') {
                let close = after
                    .find('}')
                    .ok_or_else(|| format!("template {source:?}: unclosed '{{'"))?;
                let inner = &after[..close];
                let (field, sub) = match inner.split_once('=') {
                    Some((f, s)) => (f, s),
                    None => (inner, "*"),
                };
                let start = elems.len();
                for s in sub.split('/') {
                    elems.push(parse_segment(s, source)?);
                }
                vars.push(Var {
                    field_path: field.to_string(),
                    start,
                    end: elems.len(),
                });
                chars = &after[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                elems.push(parse_segment(&chars[..end], source)?);
                chars = &chars[end..];
            }
            if let Some(r) = chars.strip_prefix('/') {
                chars = r;
            }
        }
        if let Some(pos) = elems.iter().position(|e| *e == Elem::DoubleStar)
            && pos != elems.len() - 1
        {
            return Err(format!(
                "template {source:?}: '**' must be the last segment"
            ));
        }
        Ok(Template {
            source: source.to_string(),
            elems,
            vars,
            verb: verb.map(str::to_string),
        })
    }

    /// Literal segments count, for choosing the most specific match.
    pub fn specificity(&self) -> (bool, usize, bool) {
        let literals = self
            .elems
            .iter()
            .filter(|e| matches!(e, Elem::Literal(_)))
            .count();
        let open = self.elems.contains(&Elem::DoubleStar);
        (self.verb.is_some(), literals, !open)
    }

    /// Matches a raw request path (no query). `Ok(None)`: not this
    /// template. `Ok(Some(bindings))`: field path → decoded value.
    pub fn matches(&self, raw_path: &str) -> Result<Option<Vec<(String, String)>>, PathError> {
        let Some(rest) = raw_path.strip_prefix('/') else {
            return Ok(None);
        };
        let rest = match &self.verb {
            Some(v) => match rest
                .strip_suffix(v.as_str())
                .and_then(|r| r.strip_suffix(':'))
            {
                Some(r) => r,
                None => return Ok(None),
            },
            None => rest,
        };
        let segs: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        // Which request segments each element covers.
        let mut spans = Vec::with_capacity(self.elems.len());
        let mut i = 0;
        for e in &self.elems {
            match e {
                Elem::Literal(l) => {
                    if segs.get(i).map(|s| decode_lossy(s)) != Some(l.clone()) {
                        return Ok(None);
                    }
                    spans.push((i, i + 1));
                    i += 1;
                }
                Elem::Star => {
                    if i >= segs.len() {
                        return Ok(None);
                    }
                    spans.push((i, i + 1));
                    i += 1;
                }
                Elem::DoubleStar => {
                    // A variable's `**` binds at least one segment: a
                    // value is never empty (`PUT …/keys` is not a Put of
                    // the key "").
                    let at = spans.len();
                    if i >= segs.len() && self.vars.iter().any(|v| v.start <= at && at < v.end) {
                        return Ok(None);
                    }
                    spans.push((i, segs.len()));
                    i = segs.len();
                }
            }
        }
        if i != segs.len() {
            return Ok(None);
        }
        for s in &segs {
            let d = decode_lossy(s);
            if d == "." || d == ".." {
                return Err(PathError::DotSegment);
            }
        }
        let mut bindings = Vec::new();
        for v in &self.vars {
            let (from, to) = if v.start == v.end {
                (0, 0)
            } else {
                (spans[v.start].0, spans[v.end - 1].1)
            };
            let mut bytes = Vec::new();
            for (n, s) in segs[from..to].iter().enumerate() {
                if n > 0 {
                    bytes.push(b'/');
                }
                bytes.extend(percent_decode_str(s));
            }
            let bad = |problem: &str| PathError::BadValue {
                field: v.field_path.clone(),
                problem: problem.to_string(),
            };
            if bytes.contains(&0) {
                return Err(bad("contains a NUL byte (%00), which no key may hold"));
            }
            let value = String::from_utf8(bytes)
                .map_err(|_| bad("is not valid UTF-8 once percent-decoded"))?;
            bindings.push((v.field_path.clone(), value));
        }
        Ok(Some(bindings))
    }

    /// Does the variable for `field_path` span more than one segment
    /// (`{key=**}`, `{name=projects/*}`)?
    pub fn is_multi_segment(&self, field_path: &str) -> bool {
        self.vars.iter().any(|v| {
            v.field_path == field_path
                && (v.end - v.start > 1 || self.elems.get(v.start) == Some(&Elem::DoubleStar))
        })
    }

    /// The field paths bound by the path.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|v| v.field_path.as_str())
    }

    /// The template in OpenAPI form: `/v1/namespaces/{namespace}/keys/{key}`.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.elems.len() {
            out.push('/');
            if let Some(v) = self.vars.iter().find(|v| v.start == i) {
                out.push_str(&format!("{{{}}}", v.field_path));
                i = v.end.max(i + 1);
                continue;
            }
            match &self.elems[i] {
                Elem::Literal(l) => out.push_str(l),
                Elem::Star => out.push('*'),
                Elem::DoubleStar => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(v) = &self.verb {
            out.push(':');
            out.push_str(v);
        }
        out
    }
}

fn split_verb(path: &str) -> (&str, Option<&str>) {
    let mut depth = 0;
    let mut last_colon = None;
    for (i, c) in path.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '/' if depth == 0 => last_colon = None,
            ':' if depth == 0 => last_colon = Some(i),
            _ => {}
        }
    }
    match last_colon {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

fn parse_segment(s: &str, source: &str) -> Result<Elem, String> {
    match s {
        "*" => Ok(Elem::Star),
        "**" => Ok(Elem::DoubleStar),
        "" => Err(format!("template {source:?}: empty segment")),
        l => Ok(Elem::Literal(l.to_string())),
    }
}

fn decode_lossy(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template::parse(s).unwrap()
    }

    fn bind(tpl: &str, path: &str) -> Option<Vec<(String, String)>> {
        t(tpl).matches(path).unwrap()
    }

    fn pairs(v: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn single_and_multi_segment_variables() {
        let kv = "/v1/namespaces/{namespace}/keys/{key=**}";
        assert_eq!(
            bind(kv, "/v1/namespaces/default/keys/a"),
            pairs(&[("namespace", "default"), ("key", "a")])
        );
        assert_eq!(
            bind(kv, "/v1/namespaces/default/keys/a/b/c"),
            pairs(&[("namespace", "default"), ("key", "a/b/c")])
        );
        assert_eq!(
            bind(kv, "/v1/namespaces/default/keys/a%2Fb"),
            pairs(&[("namespace", "default"), ("key", "a/b")])
        );
        assert_eq!(
            bind(kv, "/v1/namespaces/default/keys/a%252Fb"),
            pairs(&[("namespace", "default"), ("key", "a%2Fb")])
        );
        assert_eq!(
            bind(kv, "/v1/namespaces/default/keys/caf%C3%A9"),
            pairs(&[("namespace", "default"), ("key", "café")])
        );
        assert_eq!(bind(kv, "/v1/namespaces/default/other/a"), None);
        assert_eq!(bind(kv, "/v1/namespaces/default"), None);
        // A variable's `**` binds at least one segment; a bare `**` may
        // match none.
        assert_eq!(bind(kv, "/v1/namespaces/default/keys"), None);
        assert_eq!(bind("/v1/files/**", "/v1/files"), Some(vec![]));
    }

    #[test]
    fn nested_field_paths_and_sub_templates() {
        assert_eq!(
            bind(
                "/v1/{name=projects/*/items/*}/x",
                "/v1/projects/p1/items/i2/x"
            ),
            pairs(&[("name", "projects/p1/items/i2")])
        );
        assert_eq!(bind("/v1/{a.b.c}", "/v1/z"), pairs(&[("a.b.c", "z")]));
        assert_eq!(bind("/v1/{name=projects/*}", "/v1/other/p1"), None);
    }

    #[test]
    fn verbs() {
        let publish = "/v1/namespaces/{namespace}/topics/{topic}:publish";
        assert_eq!(
            bind(publish, "/v1/namespaces/n/topics/t:publish"),
            pairs(&[("namespace", "n"), ("topic", "t")])
        );
        assert_eq!(bind(publish, "/v1/namespaces/n/topics/t"), None);
        assert_eq!(
            bind("/v1/patterns:watch", "/v1/patterns:watch"),
            Some(vec![])
        );
        assert_eq!(
            t("/v1/patterns/{name}:start").verb.as_deref(),
            Some("start")
        );
    }

    #[test]
    fn refuses_dot_segments_nul_and_bad_utf8() {
        let kv = t("/v1/namespaces/{namespace}/keys/{key=**}");
        assert_eq!(
            kv.matches("/v1/namespaces/d/keys/a/../b"),
            Err(PathError::DotSegment)
        );
        assert_eq!(
            kv.matches("/v1/namespaces/d/keys/%2E%2E"),
            Err(PathError::DotSegment)
        );
        assert!(
            matches!(kv.matches("/v1/namespaces/d/keys/a%00b"), Err(PathError::BadValue { field, .. }) if field == "key")
        );
        assert!(
            matches!(kv.matches("/v1/namespaces/d/keys/%FF"), Err(PathError::BadValue { field, .. }) if field == "key")
        );
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["v1/x", "/v1/{x", "/v1/**/x", "/v1//x"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn openapi_form() {
        assert_eq!(
            t("/v1/namespaces/{namespace}/keys/{key=**}").openapi_path(),
            "/v1/namespaces/{namespace}/keys/{key}"
        );
        assert_eq!(
            t("/v1/patterns/{name}:start").openapi_path(),
            "/v1/patterns/{name}:start"
        );
    }
}
