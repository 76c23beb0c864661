//! Query strings of GET endpoints: `application/x-www-form-urlencoded` pairs,
//! percent-decoded, `+` read as a space (as form encoders write it; a literal `+`
//! arrives as `%2B`).

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A `%` not followed by two hex digits.
    #[error("query parameter `{0}`: bad percent-encoding")]
    Escape(String),
    /// The decoded bytes are not UTF-8.
    #[error("query parameter `{0}`: not UTF-8 once decoded")]
    Utf8(String),
    /// A parameter the endpoint reads appears twice.
    #[error("query parameter `{0}` given more than once")]
    Repeated(String),
}

/// Decodes `query` (without the `?`) into `(name, value)` pairs in order. A pair
/// without `=` has an empty value; empty pairs (`a=1&&b=2`) are skipped.
pub fn parse(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name).map_err(|e| e.named(name))?;
        let value = decode(value).map_err(|e| e.named(&name))?;
        out.push((name, value));
    }
    Ok(out)
}

/// The value of `name`, `None` when absent; an error when it is given twice (which
/// one a client meant cannot be told).
pub fn single<'a>(
    pairs: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, QueryError> {
    let mut found = pairs
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str());
    let first = found.next();
    if found.next().is_some() {
        return Err(QueryError::Repeated(name.to_owned()));
    }
    Ok(first)
}

enum DecodeError {
    Escape,
    Utf8,
}

impl DecodeError {
    fn named(self, name: &str) -> QueryError {
        match self {
            DecodeError::Escape => QueryError::Escape(name.to_owned()),
            DecodeError::Utf8 => QueryError::Utf8(name.to_owned()),
        }
    }
}

fn decode(text: &str) -> Result<String, DecodeError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| hex(*b));
                let lo = bytes.get(i + 2).and_then(|b| hex(*b));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(DecodeError::Escape);
                };
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| DecodeError::Utf8)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        parse(q).unwrap()
    }

    #[test]
    fn values_are_percent_decoded_and_plus_is_a_space() {
        assert_eq!(
            pairs("userId=a%2Bb%40x.com&name=J+Doe&k=%C3%A9"),
            [
                ("userId".to_owned(), "a+b@x.com".to_owned()),
                ("name".to_owned(), "J Doe".to_owned()),
                ("k".to_owned(), "é".to_owned()),
            ]
        );
    }

    #[test]
    fn pairs_without_value_are_empty_and_empty_pairs_are_skipped() {
        assert_eq!(
            pairs("a&&b="),
            [
                ("a".to_owned(), String::new()),
                ("b".to_owned(), String::new())
            ]
        );
        assert!(pairs("").is_empty());
    }

    #[test]
    fn broken_escapes_and_non_utf8_are_refused_with_the_parameter_name() {
        assert_eq!(parse("userId=%4"), Err(QueryError::Escape("userId".into())));
        assert_eq!(
            parse("userId=%zz"),
            Err(QueryError::Escape("userId".into()))
        );
        assert_eq!(parse("userId=%ff"), Err(QueryError::Utf8("userId".into())));
    }

    #[test]
    fn a_repeated_parameter_is_an_error_only_when_read() {
        let p = pairs("userId=a&userId=b&x=1");
        assert_eq!(
            single(&p, "userId"),
            Err(QueryError::Repeated("userId".into()))
        );
        assert_eq!(single(&p, "x"), Ok(Some("1")));
        assert_eq!(single(&p, "y"), Ok(None));
    }
}
