//! The few facts of the gRPC wire the data plane reads without decoding
//! messages: the 5-byte message prefix, `grpc-timeout`, field 1 of a
//! request message, and statuses as headers or trailers.
//!
//! Written by hand: each is a few lines of a fixed format, and the crates
//! that parse them (tonic's codec, prost) do so only by decoding whole
//! messages into types, which is the cost forwarding exists to avoid.

use std::time::Duration;

use http::HeaderMap;
use tonic::Status;

/// Largest gRPC message the proxy accepts or passes on, either way (4 MiB,
/// gRPC's usual default).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Length of the prefix before every message: a compressed flag and a
/// big-endian u32 length.
pub const PREFIX_LEN: usize = 5;

/// The prefix of one message: (compressed, length).
pub fn prefix(bytes: &[u8]) -> Option<(bool, usize)> {
    let p: [u8; PREFIX_LEN] = bytes.get(..PREFIX_LEN)?.try_into().ok()?;
    let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
    Some((p[0] != 0, len))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.checked_mul(3600)?),
        b"M" => Duration::from_secs(n.checked_mul(60)?),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a `grpc-timeout` value in the finest unit that fits 8 digits,
/// rounding up so the pattern never gets less time than was meant.
pub fn format_grpc_timeout(d: Duration) -> String {
    let mut buf = [0u8; 9];
    let n = write_grpc_timeout(d, &mut buf);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// [`format_grpc_timeout`] as a header value, without the `String`.
pub fn grpc_timeout_value(d: Duration) -> http::HeaderValue {
    let mut buf = [0u8; 9];
    let n = write_grpc_timeout(d, &mut buf);
    http::HeaderValue::from_bytes(&buf[..n]).unwrap_or(http::HeaderValue::from_static("99999999H"))
}

fn write_grpc_timeout(d: Duration, buf: &mut [u8; 9]) -> usize {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let (mut n, unit) = [
        (b'n', 1u128),
        (b'u', 1_000),
        (b'm', 1_000_000),
        (b'S', 1_000_000_000),
        (b'M', 60_000_000_000),
    ]
    .into_iter()
    .map(|(unit, per)| (nanos.div_ceil(per), unit))
    .find(|(n, _)| *n <= MAX)
    .unwrap_or((nanos.div_ceil(3_600_000_000_000).min(MAX), b'H'));
    let mut digits = [0u8; 8];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = unit;
    len + 1
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("the message is not valid protobuf: {0}")]
    Malformed(&'static str),
    #[error("field 1 (namespace) is not valid UTF-8")]
    NotUtf8,
}

/// Field 1 of a protobuf message as a string: the namespace, by the data
/// contract's rule that every request message carries it there (checked
/// over the descriptors in `trellis-proto`). Every field is walked, not
/// just the first, because protobuf lets a scalar field repeat and the
/// last value wins: reading the first would route by a namespace other
/// than the one the pattern decodes. Absent means "" (proto3's default).
pub fn namespace(mut msg: &[u8]) -> Result<&str, ScanError> {
    let mut found: &[u8] = &[];
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err(ScanError::Malformed("field number 0"));
        }
        let skip = match wire {
            0 => {
                varint(&mut msg)?;
                0
            }
            1 => 8,
            2 => {
                let len = usize::try_from(varint(&mut msg)?)
                    .map_err(|_| ScanError::Malformed("length overflows"))?;
                if field == 1 {
                    found = msg
                        .get(..len)
                        .ok_or(ScanError::Malformed("a field runs past the end"))?;
                }
                len
            }
            5 => 4,
            _ => return Err(ScanError::Malformed("unsupported wire type")),
        };
        if field == 1 && wire != 2 {
            return Err(ScanError::Malformed("field 1 (namespace) is not a string"));
        }
        msg = msg
            .get(skip..)
            .ok_or(ScanError::Malformed("a field runs past the end"))?;
    }
    std::str::from_utf8(found).map_err(|_| ScanError::NotUtf8)
}

fn varint(buf: &mut &[u8]) -> Result<u64, ScanError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf
            .split_first()
            .ok_or(ScanError::Malformed("a varint runs past the end"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(ScanError::Malformed("a varint is longer than 10 bytes"))
}

/// Follows message boundaries in a response body as it streams past, to
/// hold patterns to [`MAX_MESSAGE_BYTES`] without buffering anything.
#[derive(Debug, Default)]
pub struct Frames {
    /// Prefix bytes seen of the next message.
    prefix: [u8; PREFIX_LEN],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl Frames {
    /// Feeds one chunk. `Err((offset, len))`: a message of `len` bytes,
    /// over the limit, starts at `offset` in this chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), (usize, usize)> {
        let mut offset = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                chunk = &chunk[n..];
                offset += n;
                continue;
            }
            let n = (PREFIX_LEN - self.have).min(chunk.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&chunk[..n]);
            self.have += n;
            chunk = &chunk[n..];
            offset += n;
            if self.have == PREFIX_LEN {
                self.have = 0;
                let (_, len) = prefix(&self.prefix).unwrap_or((false, 0));
                if len > MAX_MESSAGE_BYTES {
                    return Err((offset.saturating_sub(PREFIX_LEN), len));
                }
                self.remaining = len;
            }
        }
        Ok(())
    }
}

/// A status as the trailers that end a response.
pub fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only an unencodable details blob can fail; the code and message
        // alone still say what happened.
        map.clear();
        let _ = Status::new(status.code(), status.message()).add_header(&mut map);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use trellis_proto::data::v1::{GetRequest, SubscribeRequest};

    #[test]
    fn grpc_timeout_units() {
        let p = |s: &str| parse_grpc_timeout(s.as_bytes());
        assert_eq!(p("5S"), Some(Duration::from_secs(5)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "5", "5x", "123456789S", "-1S", "1.5S", "+5S"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeout_formats_round_trip_without_losing_time() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_micros(1500),
            Duration::from_millis(250),
            Duration::from_secs(5),
            Duration::from_secs(86_400 * 400),
        ] {
            let s = format_grpc_timeout(d);
            assert!(s.len() <= 9, "{s}");
            let back = parse_grpc_timeout(s.as_bytes()).unwrap();
            assert!(back >= d, "{d:?} → {s} → {back:?}");
        }
        assert_eq!(format_grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(5)), "5000000u");
    }

    #[test]
    fn namespace_is_field_one_of_any_request() {
        let get = GetRequest {
            namespace: "default".into(),
            key: "k".into(),
        }
        .encode_to_vec();
        assert_eq!(namespace(&get), Ok("default"));
        let sub = SubscribeRequest {
            namespace: "ns".into(),
            topic: "t".into(),
            queue_group: "g".into(),
        }
        .encode_to_vec();
        assert_eq!(namespace(&sub), Ok("ns"));
        assert_eq!(namespace(&[]), Ok(""), "absent is proto3's empty string");
    }

    #[test]
    fn the_last_namespace_wins_as_in_protobuf() {
        let mut msg = GetRequest {
            namespace: "first".into(),
            key: "k".into(),
        }
        .encode_to_vec();
        msg.extend(
            GetRequest {
                namespace: "last".into(),
                key: String::new(),
            }
            .encode_to_vec(),
        );
        assert_eq!(namespace(&msg), Ok("last"));
        assert_eq!(GetRequest::decode(&msg[..]).unwrap().namespace, "last");
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert!(matches!(
            namespace(&[0x0a, 5, b'a']),
            Err(ScanError::Malformed(_))
        ));
        assert!(
            matches!(namespace(&[0x08, 1]), Err(ScanError::Malformed(_))),
            "field 1 as varint"
        );
        assert!(
            matches!(namespace(&[0x0b]), Err(ScanError::Malformed(_))),
            "group"
        );
        assert_eq!(namespace(&[0x0a, 1, 0xff]), Err(ScanError::NotUtf8));
        assert!(matches!(
            namespace(&[0x80; 11]),
            Err(ScanError::Malformed(_))
        ));
    }

    #[test]
    fn frames_find_an_oversized_message_across_chunks() {
        let mut ok = Frames::default();
        let mut body = vec![0, 0, 0, 0, 3, b'a', b'b', b'c'];
        body.extend([0, 0, 0, 0, 1, b'x']);
        for chunk in body.chunks(2) {
            assert_eq!(ok.feed(chunk), Ok(()));
        }
        let mut big = Frames::default();
        let len = (MAX_MESSAGE_BYTES + 1) as u32;
        let mut body = vec![0, 0, 0, 0, 1, b'x'];
        body.push(0);
        body.extend(len.to_be_bytes());
        assert_eq!(big.feed(&body), Err((6, MAX_MESSAGE_BYTES + 1)));
        let mut split = Frames::default();
        assert_eq!(split.feed(&body[..8]), Ok(()));
        assert_eq!(split.feed(&body[8..]), Err((0, MAX_MESSAGE_BYTES + 1)));
    }

    proptest! {
        /// Whatever the bytes, the scan answers and never panics, and on
        /// valid messages it agrees with prost.
        #[test]
        fn scan_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ours = namespace(&bytes);
            if let (Ok(decoded), Ok(ns)) = (GetRequest::decode(&bytes[..]), ours) {
                prop_assert_eq!(ns, decoded.namespace);
            }
        }
    }
}
