//! Credentials: HTTP Basic for the ingest endpoints (source write keys, mParticle
//! `key:secret`), a Bearer token or a loopback peer for the admin API.

use std::net::IpAddr;

use hyper::header::{HeaderMap, AUTHORIZATION};

use super::reply::ApiError;
use crate::config::SourceConfig;

/// `(user, password)` from an `Authorization: Basic` header, if well formed.
pub fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let text = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (user, pass) = text.split_once(':').unwrap_or((text.as_str(), ""));
    Some((user.to_owned(), pass.to_owned()))
}

/// Standard base64 with padding optional; `None` on any other character. Basic
/// credentials are the only base64 the gateway reads, so no dependency for it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= sextet(*c)? << (18 - 6 * i);
        }
        let [_, a, b, c] = acc.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..chunk.len() - 1]);
    }
    Some(out)
}

/// Compares secrets without an early exit on the first differing byte.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The source whose Segment write key is `key`.
pub fn segment_source<'a>(
    sources: &'a [SourceConfig],
    key: Option<&str>,
) -> Result<&'a SourceConfig, ApiError> {
    if sources.is_empty() {
        return Err(ApiError::unauthorized(
            "server-side ingest is off: no `[[sources]]` are configured",
        ));
    }
    let Some(key) = key else {
        return Err(ApiError::unauthorized(
            "write key missing: send it as the Basic auth user or as `writeKey` in the body",
        ));
    };
    sources
        .iter()
        .find(|s| same_secret(&s.write_key, key))
        .ok_or_else(|| ApiError::unauthorized("write key is not valid"))
}

/// The source whose mParticle `key:secret` pair the request carries.
pub fn mparticle_source<'a>(
    sources: &'a [SourceConfig],
    headers: &HeaderMap,
) -> Result<&'a SourceConfig, ApiError> {
    let refused =
        || ApiError::unauthorized("mParticle API key and secret (HTTP Basic) are missing or wrong");
    let (key, secret) = basic(headers).ok_or_else(refused)?;
    sources
        .iter()
        .find(|s| {
            s.secret
                .as_deref()
                .is_some_and(|sec| same_secret(&s.write_key, &key) && same_secret(sec, &secret))
        })
        .ok_or_else(refused)
}

/// Admin calls: the configured Bearer token, or with none configured, a loopback peer.
pub fn admin(token: Option<&str>, headers: &HeaderMap, peer: IpAddr) -> Result<(), ApiError> {
    let bearer = |e: ApiError| ApiError {
        challenge: "Bearer realm=\"edge-gateway\"",
        ..e
    };
    match token {
        None if peer.is_loopback() => Ok(()),
        None => Err(ApiError::new(
            hyper::StatusCode::FORBIDDEN,
            "forbidden",
            "the admin API answers loopback only while `http.admin_token` is not set",
        )),
        Some(expected) => {
            let given = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim());
            match given {
                Some(t) if same_secret(expected, t) => Ok(()),
                Some(_) => Err(bearer(ApiError::unauthorized("admin token is not valid"))),
                None => Err(bearer(ApiError::unauthorized(
                    "admin token missing: send `Authorization: Bearer <http.admin_token>`",
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(auth: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static(auth));
        h
    }

    #[test]
    fn basic_credentials_decode_with_and_without_padding() {
        // "dev-write-key:" and "key:secret"
        assert_eq!(
            basic(&headers("Basic ZGV2LXdyaXRlLWtleTo=")),
            Some(("dev-write-key".into(), String::new()))
        );
        assert_eq!(
            basic(&headers("basic a2V5OnNlY3JldA")),
            Some(("key".into(), "secret".into()))
        );
        assert_eq!(basic(&headers("Basic !!!")), None);
        assert_eq!(basic(&headers("Bearer a2V5OnNlY3JldA")), None);
    }

    #[test]
    fn admin_needs_the_token_when_one_is_set_and_loopback_otherwise() {
        let local: IpAddr = [127, 0, 0, 1].into();
        let remote: IpAddr = [10, 0, 0, 7].into();
        assert!(admin(None, &HeaderMap::new(), local).is_ok());
        assert_eq!(
            admin(None, &HeaderMap::new(), remote).unwrap_err().status,
            403
        );
        assert_eq!(
            admin(Some("t0k"), &HeaderMap::new(), local)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            admin(Some("t0k"), &headers("Bearer nope"), local)
                .unwrap_err()
                .status,
            401
        );
        assert!(admin(Some("t0k"), &headers("Bearer t0k"), remote).is_ok());
    }

    #[test]
    fn mparticle_needs_a_source_with_a_secret() {
        let sources = vec![
            SourceConfig {
                name: "web".into(),
                write_key: "key".into(),
                secret: None,
            },
            SourceConfig {
                name: "tv".into(),
                write_key: "key".into(),
                secret: Some("secret".into()),
            },
        ];
        let found = mparticle_source(&sources, &headers("Basic a2V5OnNlY3JldA==")).unwrap();
        assert_eq!(found.name, "tv");
        assert!(mparticle_source(&sources[..1], &headers("Basic a2V5OnNlY3JldA==")).is_err());
        assert!(segment_source(&[], Some("key")).is_err());
        assert_eq!(segment_source(&sources, Some("key")).unwrap().name, "web");
    }
}
