//! Request bodies of the supported APIs → normalized [`Event`]s.
//!
//! Parsers only translate and validate; they do not touch state, consent or the
//! spool. Limits on sizes are checked here, before any event is built.

pub mod mparticle;
pub mod segment;

use crate::consent::ConsentUpdate;
use crate::model::Event;

/// One parsed event plus what the request said about its surroundings.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    /// Consent the request stated for the event's subject, if any.
    pub consent: Option<ConsentUpdate>,
    /// The device the request names as the event's origin (used in fleet mode).
    pub device_hint: Option<String>,
}

/// Why a request body was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IngestError {
    /// The body is not valid JSON of the expected shape, or a field is invalid.
    #[error("{0}")]
    Malformed(String),
    /// The body or one event in it is over the configured limit.
    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: u64,
    },
}

impl IngestError {
    fn json(context: &str, e: &serde_json::Error) -> Self {
        IngestError::Malformed(format!("{context}: {e}"))
    }
}

/// Parses an RFC 3339 timestamp into ms since the epoch.
pub fn parse_timestamp(field: impl std::fmt::Display, text: &str) -> Result<i64, IngestError> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| IngestError::Malformed(format!("{field}: `{text}` is not RFC 3339 ({e})")))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| IngestError::Malformed(format!("{field}: `{text}` is out of range")))
}

/// Formats ms since the epoch as RFC 3339 (UTC, ms precision).
pub fn format_timestamp(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_with_offsets_parse_to_utc_ms() {
        assert_eq!(
            parse_timestamp("t", "2026-11-27T10:00:00.250Z").unwrap(),
            parse_timestamp("t", "2026-11-27T11:00:00.250+01:00").unwrap()
        );
        assert_eq!(parse_timestamp("t", "1970-01-01T00:00:01Z").unwrap(), 1000);
    }

    #[test]
    fn bad_timestamp_names_the_field() {
        let e = parse_timestamp("batch[2].timestamp", "yesterday").unwrap_err();
        assert!(e.to_string().contains("batch[2].timestamp"));
    }
}
