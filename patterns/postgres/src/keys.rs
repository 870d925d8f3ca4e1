//! Key ranges for `List` and the opaque page token.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pattern_sdk::Error;

/// The smallest string greater than every string that starts with
/// `prefix`, in byte (code point) order, or `None` when no such string
/// exists (empty prefix, or only U+10FFFF). With the prefix itself as the
/// lower bound, `prefix <= key < successor` is exactly "key starts with
/// prefix", and it uses the primary-key index.
pub fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000; // skip the surrogates, which are not chars
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

pub fn encode_token(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(key)
}

/// The key a page token stands for; anything this pattern did not issue
/// is `INVALID_ARGUMENT`.
pub fn decode_token(token: &str) -> Result<String, Error> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|key| !key.contains('\0'))
        .ok_or_else(|| {
            Error::invalid_argument(
                "page_token",
                "is not a token this pattern issued; pass the next_page_token of the previous \
                 List response unchanged, or leave it empty for the first page",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_is_the_tight_upper_bound() {
        assert_eq!(successor("ab").as_deref(), Some("ac"));
        assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(successor("é").as_deref(), Some("ê"));
        assert_eq!(successor(""), None);
        assert_eq!(successor("\u{10FFFF}"), None);
    }

    #[test]
    fn range_is_exactly_the_prefix() {
        // In byte order, every extension of the prefix is inside
        // [prefix, successor) and these neighbours are outside.
        let prefix = "p%_";
        let succ = successor(prefix).unwrap();
        for inside in ["p%_", "p%_a", "p%_\u{10FFFF}", "p%_~~~"] {
            assert!(inside >= prefix && inside < succ.as_str(), "{inside}");
        }
        for outside in ["p%", "p%^", "p%`", "p%`a", "P%_", "p&"] {
            assert!(!(outside >= prefix && outside < succ.as_str()), "{outside}");
        }
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = encode_token("a/é");
        assert_eq!(decode_token(&t).unwrap(), "a/é");
        assert!(decode_token("***").is_err());
        assert!(decode_token(&URL_SAFE_NO_PAD.encode(b"a\0b")).is_err());
    }
}
