//! Where a (namespace, topic) lives in NATS: the subject
//! `{prefix}.{namespace}.{topic}`, with namespace and topic each escaped into
//! one subject token.
//!
//! The escaping keeps ASCII letters, digits and `-`, and writes every other
//! byte as `_` followed by two upper-case hex digits (`.` → `_2E`, `_` →
//! `_5F`, `~` → `_7E`). `_` only ever starts an escape, so the mapping is
//! one-to-one: two different namespaces (or topics) can never share a
//! subject, and no escaped token contains `.`, `*`, `>` or whitespace, so
//! nothing a caller sends can reach another namespace through NATS wildcards
//! or extra tokens. Queue group names are escaped the same way.

use std::fmt::Write;

/// Escapes `s` into one NATS subject token (see the module docs).
pub fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "_{b:02X}");
        }
    }
    out
}

/// The subject for `topic` in `namespace` under `prefix`.
pub fn subject(prefix: &str, namespace: &str, topic: &str) -> String {
    format!("{prefix}.{}.{}", token(namespace), token(topic))
}

/// What a subject prefix may be, as said in errors.
pub const PREFIX_RULE: &str = "one or more tokens of ASCII letters, digits, '-' and '_', \
     separated by '.', e.g. \"trellis\" or \"prod.trellis\"";

/// Checks a configured subject prefix against [`PREFIX_RULE`].
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn safe_characters_stay_and_the_rest_are_escaped() {
        assert_eq!(token("orders-v2"), "orders-v2");
        assert_eq!(token("orders.created"), "orders_2Ecreated");
        assert_eq!(token("a_b~c"), "a_5Fb_7Ec");
        assert_eq!(token("*>"), "_2A_3E");
        assert_eq!(token("a b"), "a_20b");
        assert_eq!(token("é"), "_C3_A9");
    }

    #[test]
    fn namespaces_and_topics_cannot_collide() {
        // Each pair would collide under a naive "{ns}.{topic}" join or a
        // naive '.' → '_' replacement.
        let pairs = [
            ("a.b", "c"),
            ("a", "b.c"),
            ("a_b", "c"),
            ("a", "b_c"),
            ("a_2Eb", "c"),
            ("a", "_2Eb.c"),
        ];
        let subjects: HashSet<String> = pairs
            .iter()
            .map(|(ns, t)| subject("trellis", ns, t))
            .collect();
        assert_eq!(subjects.len(), pairs.len(), "{subjects:?}");
        for s in &subjects {
            assert_eq!(
                s.split('.').count(),
                3,
                "{s}: exactly prefix, namespace, topic"
            );
            assert!(!s.contains(['*', '>', ' ']), "{s}");
        }
    }

    #[test]
    fn escaping_is_injective_over_many_strings() {
        let alphabet = ['a', '.', '_', '~', '-', '2', 'E', '5', 'F'];
        let mut seen = HashSet::new();
        let mut count = 0;
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let s: String = [a, b, c].iter().collect();
                    seen.insert(token(&s));
                    count += 1;
                }
            }
        }
        assert_eq!(seen.len(), count);
    }

    #[test]
    fn prefixes() {
        for ok in ["trellis", "prod.trellis", "a-b_c.d"] {
            assert!(valid_prefix(ok), "{ok}");
        }
        for bad in ["", ".", "a.", ".a", "a..b", "a*", "a.>", "a b"] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }
}
