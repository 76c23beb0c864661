//! JSON text written straight into a byte buffer, byte for byte as `serde_json`'s
//! compact serializer writes it (the contract receivers and tests see), without its
//! per-value trait dispatch: strings are scanned eight bytes at a time for what needs
//! escaping, numbers go through the formatters `serde_json` itself uses (`itoa`,
//! `zmij`), and timestamps are formatted without allocating.

use edge_agent::model::Value as AgentValue;

/// Writes `s` as a JSON string: quoted, with `"`, `\` and control characters
/// escaped as `serde_json` does (short escapes where JSON has one, else `\u00xx`).
pub(super) fn str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut clean_from = 0;
    let mut at = 0;
    while at < bytes.len() {
        // Most strings need no escape at all: skip eight clean bytes at a time.
        if let Some(chunk) = bytes
            .get(at..at + 8)
            .and_then(|c| <[u8; 8]>::try_from(c).ok())
        {
            if !needs_escape(u64::from_le_bytes(chunk)) {
                at += 8;
                continue;
            }
        }
        let b = bytes[at];
        if let Some(escape) = escape_of(b) {
            out.extend_from_slice(&bytes[clean_from..at]);
            escape.write(out, b);
            clean_from = at + 1;
        }
        at += 1;
    }
    out.extend_from_slice(&bytes[clean_from..]);
    out.push(b'"');
}

/// Whether any of the eight bytes of `word` is below 0x20, `"` or `\`. Exact as a
/// yes/no (the classic "has a zero byte" test, which only errs about *which* byte).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS != 0;
    below_space
        || has_zero(word ^ (ONES * u64::from(b'"')))
        || has_zero(word ^ (ONES * u64::from(b'\\')))
}

enum Escape {
    Short(u8),
    Unicode,
}

impl Escape {
    fn write(&self, out: &mut Vec<u8>, byte: u8) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        match self {
            Escape::Short(c) => out.extend_from_slice(&[b'\\', *c]),
            Escape::Unicode => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xF)],
            ]),
        }
    }
}

fn escape_of(b: u8) -> Option<Escape> {
    Some(match b {
        b'"' => Escape::Short(b'"'),
        b'\\' => Escape::Short(b'\\'),
        0x08 => Escape::Short(b'b'),
        0x09 => Escape::Short(b't'),
        0x0A => Escape::Short(b'n'),
        0x0C => Escape::Short(b'f'),
        0x0D => Escape::Short(b'r'),
        0x00..=0x1F => Escape::Unicode,
        _ => return None,
    })
}

/// Writes `"key":`.
pub(super) fn key(out: &mut Vec<u8>, k: &str) {
    str(out, k);
    out.push(b':');
}

pub(super) fn bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// Writes an agent value; objects in their (sorted) key order, at every depth.
pub(super) fn value(out: &mut Vec<u8>, v: &AgentValue) {
    match v {
        AgentValue::Null => out.extend_from_slice(b"null"),
        AgentValue::Bool(b) => bool(out, *b),
        AgentValue::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        AgentValue::UInt(u) => out.extend_from_slice(itoa::Buffer::new().format(*u).as_bytes()),
        // serde_json writes NaN and infinities as null.
        AgentValue::Float(f) if f.is_finite() => {
            out.extend_from_slice(zmij::Buffer::new().format_finite(*f).as_bytes());
        }
        AgentValue::Float(_) => out.extend_from_slice(b"null"),
        AgentValue::String(s) => str(out, s),
        AgentValue::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                value(out, item);
            }
            out.push(b']');
        }
        AgentValue::Object(map) => entries(out, map.iter()),
    }
}

/// Writes `{"k":v,..}` from entries already in key order.
pub(super) fn entries<'a>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = (&'a str, &'a AgentValue)>,
) {
    out.push(b'{');
    for (i, (k, v)) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        key(out, k);
        value(out, v);
    }
    out.push(b'}');
}

/// Milliseconds since the epoch from which a timestamp is formatted here: years
/// 1970 to 9999 (others, rare, go through [`edge_agent::ingest::format_timestamp`]).
const FAST_MS: std::ops::Range<i64> = 0..253_402_300_800_000;

/// Writes `ms` as the JSON string [`edge_agent::ingest::format_timestamp`] gives
/// (RFC 3339, UTC, fraction without trailing zeros), without allocating.
pub(super) fn timestamp(out: &mut Vec<u8>, ms: i64) {
    if !FAST_MS.contains(&ms) {
        return str(out, &edge_agent::ingest::format_timestamp(ms));
    }
    // In FAST_MS: non-negative and small, so none of this overflows.
    let ms = ms.unsigned_abs();
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    out.push(b'"');
    digits(out, year, 4);
    out.push(b'-');
    digits(out, month, 2);
    out.push(b'-');
    digits(out, day, 2);
    out.push(b'T');
    digits(out, day_secs / 3600, 2);
    out.push(b':');
    digits(out, day_secs / 60 % 60, 2);
    out.push(b':');
    digits(out, day_secs % 60, 2);
    if millis != 0 {
        // As many digits as the value needs: .05, not .050.
        out.push(b'.');
        if millis % 100 == 0 {
            digits(out, millis / 100, 1);
        } else if millis % 10 == 0 {
            digits(out, millis / 10, 2);
        } else {
            digits(out, millis, 3);
        }
    }
    out.extend_from_slice(b"Z\"");
}

/// Writes the last `width` decimal digits of `value`, zero-padded.
fn digits(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::Map as AgentMap;

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        let mut cases: Vec<String> = vec![
            String::new(),
            "plain ascii text that is longer than eight bytes".into(),
            "é ü 漢字 🎉 and \u{7f}".into(),
            "quote\" back\\slash".into(),
            "\"\"\"\"\"\"\"\"\"\\\\\\\\\\\\\\\\".into(),
        ];
        // Every byte below 0x80 at every position of a 17-byte string.
        for b in 0u8..0x80 {
            for at in 0..17 {
                let mut s = "abcdefghijklmnopq".to_string().into_bytes();
                s[at] = b;
                cases.push(String::from_utf8(s).unwrap());
            }
        }
        for s in &cases {
            assert_eq!(
                written(|o| str(o, s)),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn values_are_written_as_serde_json_writes_them() {
        let map: AgentMap = serde_json::from_str(
            r#"{"z":{"b":1,"a":[{"y":1,"x":2},[],{}]},"m":1.5,"n":null,"big":18446744073709551615,
               "neg":-3,"min":-9223372036854775808,"t":true,"f":false,"e":1e300,"tiny":5e-324,
               "s":"x\ny","i":0,"neg0":-0.0,"third":0.3333333333333333}"#,
        )
        .unwrap();
        let mut v = AgentValue::Object(map);
        if let AgentValue::Object(m) = &mut v {
            m.insert("nan", AgentValue::Float(f64::NAN));
            m.insert("inf", AgentValue::Float(f64::NEG_INFINITY));
        }
        let expected = serde_json::to_string(&v).unwrap();
        assert_eq!(written(|o| value(o, &v)), expected);
    }

    #[test]
    fn timestamps_equal_the_agents_format() {
        let mut cases = vec![
            0,
            1,
            10,
            100,
            999,
            1_700_000_000_000,
            1_700_000_000_050,
            951_782_400_000,   // 2000-02-29
            4_107_542_400_000, // 2100-03-01
            FAST_MS.end - 1,   // 9999-12-31T23:59:59.999
            FAST_MS.end,       // year 10000: the fallback
            -1,                // 1969: the fallback
            i64::MIN,
            i64::MAX,
        ];
        // A walk over four centuries in odd steps, hitting every month and leap day.
        let mut ms = 0i64;
        while ms < 12_700_000_000_000 {
            cases.push(ms);
            ms += 86_400_000 * 7 + 3_600_000 * 5 + 61_001;
        }
        for ms in cases {
            let expected =
                serde_json::to_string(&edge_agent::ingest::format_timestamp(ms)).unwrap();
            assert_eq!(written(|o| timestamp(o, ms)), expected, "{ms}");
        }
    }
}
