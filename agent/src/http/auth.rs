//! HTTP Basic credentials as the two APIs use them.

use base64::Engine as _;
use hyper::header::{HeaderMap, AUTHORIZATION};

/// `(user, password)` from an `Authorization: Basic` header, if well formed.
pub fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':').unwrap_or((text.as_str(), ""));
    Some((user.to_owned(), pass.to_owned()))
}

/// Compares secrets without an early exit on the first differing byte.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn segment_style_key_without_password_decodes() {
        let mut h = HeaderMap::new();
        // "dev-write-key:" in base64
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic ZGV2LXdyaXRlLWtleTo="),
        );
        assert_eq!(basic(&h), Some(("dev-write-key".into(), String::new())));
    }

    #[test]
    fn garbage_header_is_no_credentials() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic(&h), None);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("a", "ab"));
    }
}
