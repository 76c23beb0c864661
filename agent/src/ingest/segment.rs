//! Segment HTTP Tracking API bodies (`/v1/track|identify|page|screen|group|alias|batch`).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{parse_timestamp, Incoming, IngestError};
use crate::consent::ConsentUpdate;
use crate::model::{Event, EventKind, Map, Source, Value};

/// The Segment call types accepted on `/v1/{type}` and inside a batch.
pub const CALLS: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// A parsed request: its events and the write key found in the body, if any.
#[derive(Debug)]
pub struct SegmentRequest {
    pub events: Vec<Incoming>,
    pub write_key: Option<String>,
}

/// Ids may arrive as JSON numbers from some libraries; they are kept as strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Int(i64),
}

impl Id {
    fn into_string(self) -> String {
        match self {
            Id::Text(s) => s,
            Id::Int(i) => i.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Message {
    #[serde(rename = "type")]
    kind: Option<String>,
    message_id: Option<Id>,
    user_id: Option<Id>,
    anonymous_id: Option<Id>,
    group_id: Option<Id>,
    previous_id: Option<Id>,
    event: Option<String>,
    name: Option<String>,
    category: Option<String>,
    properties: Option<Map>,
    traits: Option<Map>,
    context: Option<Map>,
    integrations: Option<Map>,
    timestamp: Option<String>,
    original_timestamp: Option<String>,
    write_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    context: Option<Map>,
    integrations: Option<Map>,
    write_key: Option<String>,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_event: u64,
    pub max_batch: u64,
}

/// Parses the body of `/v1/{call}` (one event) or `/v1/batch`.
pub fn parse(
    call: &str,
    body: &[u8],
    limits: Limits,
    now_ms: i64,
) -> Result<SegmentRequest, IngestError> {
    check_size("request body", body.len(), limits.max_batch)?;
    if call == "batch" {
        let batch: Batch<'_> =
            serde_json::from_slice(body).map_err(|e| IngestError::json("batch body", &e))?;
        if batch.batch.is_empty() {
            return Err(IngestError::Malformed("batch: is empty".into()));
        }
        let mut events = Vec::with_capacity(batch.batch.len());
        for (i, raw) in batch.batch.iter().enumerate() {
            let at = Where::Batch(i);
            check_size("an event", raw.get().len(), limits.max_event)?;
            let msg: Message = serde_json::from_str(raw.get())
                .map_err(|e| IngestError::json(&at.to_string(), &e))?;
            let kind = msg.kind.clone().ok_or_else(|| {
                IngestError::Malformed(format!("{at}.type: missing (one of {})", CALLS.join(", ")))
            })?;
            let mut incoming = convert(&kind, msg, at, now_ms)?;
            if let Some(ctx) = &batch.context {
                incoming.event.context.merge_defaults(ctx);
            }
            if let Some(integrations) = &batch.integrations {
                if incoming.event.context.get("integrations").is_none() {
                    incoming
                        .event
                        .context
                        .insert("integrations", Value::Object(integrations.clone()));
                }
            }
            events.push(incoming);
        }
        return Ok(SegmentRequest {
            events,
            write_key: batch.write_key,
        });
    }
    if !CALLS.contains(&call) {
        return Err(IngestError::Malformed(format!("unknown call `{call}`")));
    }
    check_size("the event", body.len(), limits.max_event)?;
    let msg: Message = serde_json::from_slice(body).map_err(|e| IngestError::json("body", &e))?;
    let write_key = msg.write_key.clone();
    let incoming = convert(call, msg, Where::Body, now_ms)?;
    Ok(SegmentRequest {
        events: vec![incoming],
        write_key,
    })
}

fn check_size(what: &'static str, size: usize, limit: u64) -> Result<(), IngestError> {
    if size as u64 > limit {
        return Err(IngestError::TooLarge { what, size, limit });
    }
    Ok(())
}

/// Where in the request an event sits, for error messages; formatted only on error.
#[derive(Debug, Clone, Copy)]
enum Where {
    Body,
    Batch(usize),
}

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Where::Body => f.write_str("body"),
            Where::Batch(i) => write!(f, "batch[{i}]"),
        }
    }
}

fn convert(call: &str, msg: Message, at: Where, now_ms: i64) -> Result<Incoming, IngestError> {
    let missing = |field: &str| IngestError::Malformed(format!("{at}.{field}: missing"));
    let kind = match call {
        "track" => EventKind::Track,
        "identify" => EventKind::Identify,
        "page" => EventKind::Page,
        "screen" => EventKind::Screen,
        "group" => EventKind::Group,
        "alias" => EventKind::Alias,
        other => {
            return Err(IngestError::Malformed(format!(
                "{at}.type: `{other}` is not one of {}",
                CALLS.join(", ")
            )))
        }
    };
    let mut e = Event::new(kind.clone(), Source::Segment, now_ms);
    if let Some(id) = msg.message_id {
        let id = id.into_string();
        if id.is_empty() || id.len() > 256 {
            return Err(IngestError::Malformed(format!(
                "{at}.messageId: must be 1-256 characters"
            )));
        }
        e.set_message_id(&id);
    }
    e.name = match kind {
        EventKind::Track => {
            let name = msg
                .event
                .filter(|n| !n.is_empty())
                .ok_or_else(|| missing("event"))?;
            Some(name.into())
        }
        EventKind::Page | EventKind::Screen => msg.name.map(Into::into),
        _ => None,
    };
    let ids = &mut e.identities;
    ids.user_id = msg
        .user_id
        .map(Id::into_string)
        .filter(|s| !s.is_empty())
        .map(Into::into);
    ids.anonymous_id = msg
        .anonymous_id
        .map(Id::into_string)
        .filter(|s| !s.is_empty())
        .map(Into::into);
    ids.group_id = msg.group_id.map(|id| id.into_string().into());
    ids.previous_id = msg.previous_id.map(|id| id.into_string().into());
    if kind == EventKind::Group && ids.group_id.is_none() {
        return Err(missing("groupId"));
    }
    if kind == EventKind::Alias {
        if ids.previous_id.is_none() {
            return Err(missing("previousId"));
        }
        if ids.user_id.is_none() {
            return Err(missing("userId"));
        }
    }
    if let Some(ts) = msg.timestamp.or(msg.original_timestamp) {
        e.timestamp_ms = parse_timestamp(format_args!("{at}.timestamp"), &ts)?;
    }
    e.properties = msg.properties.unwrap_or_default();
    if let Some(category) = msg.category {
        e.properties
            .insert("category", Value::String(category.into()));
    }
    e.traits = msg.traits.unwrap_or_default();
    e.context = msg.context.unwrap_or_default();
    if let Some(integrations) = msg.integrations {
        e.context
            .insert("integrations", Value::Object(integrations));
    }
    let consent = e
        .context
        .get_object("consent")
        .and_then(|c| c.get_object("categoryPreferences"))
        .map(|prefs| ConsentUpdate {
            purposes: prefs
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::Bool(b) => Some((k.to_owned(), *b)),
                    _ => None,
                })
                .collect(),
            ccpa_opt_out: None,
            at_ms: e.timestamp_ms,
        });
    let device_hint = e
        .context
        .get_object("device")
        .and_then(|d| d.get_str("id"))
        .map(str::to_owned);
    Ok(Incoming {
        event: e,
        consent,
        device_hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_event: 32 * 1024,
        max_batch: 500 * 1024,
    };

    #[test]
    fn fixture_batch_parses_every_call_type() {
        let body = include_bytes!("../../../tests/fixtures/segment-batch.json");
        let req = parse("batch", body, LIMITS, 0).unwrap();
        assert_eq!(req.write_key.as_deref(), Some("dev-write-key"));
        let kinds: Vec<_> = req.events.iter().map(|i| i.event.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["identify", "track", "screen", "page", "group", "track"]
        );
        let identify = &req.events[0];
        assert_eq!(
            identify.event.traits.get_str("email"),
            Some("ada@example.com")
        );
        assert_eq!(identify.device_hint.as_deref(), Some("roku-4a7f9c2e"));
        let consent = identify.consent.as_ref().unwrap();
        assert!(consent
            .purposes
            .contains(&("advertising".to_owned(), false)));
        // Batch-level context reaches every event.
        let screen = &req.events[2].event;
        assert_eq!(
            screen
                .context
                .get_object("library")
                .and_then(|l| l.get_str("name")),
            Some("analytics-kotlin")
        );
        assert_eq!(screen.name.as_deref(), Some("Home"));
    }

    #[test]
    fn track_without_event_name_is_malformed() {
        let err = parse("track", br#"{"userId":"u"}"#, LIMITS, 0).unwrap_err();
        assert_eq!(err, IngestError::Malformed("body.event: missing".into()));
    }

    #[test]
    fn oversized_event_inside_a_batch_is_too_large() {
        let big = "x".repeat(40 * 1024);
        let body = format!(r#"{{"batch":[{{"type":"track","event":"{big}"}}]}}"#);
        let err = parse("batch", body.as_bytes(), LIMITS, 0).unwrap_err();
        assert!(matches!(
            err,
            IngestError::TooLarge {
                what: "an event",
                ..
            }
        ));
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        let err = parse("track", b"{\"event\":\"\xff\xfe\"}", LIMITS, 0).unwrap_err();
        assert!(matches!(err, IngestError::Malformed(_)));
    }

    #[test]
    fn alias_fixture_keeps_previous_id() {
        let body = include_bytes!("../../../tests/fixtures/segment-alias.json");
        let req = parse("alias", body, LIMITS, 0).unwrap();
        let ids = &req.events[0].event.identities;
        assert_eq!(ids.previous_id.as_deref(), Some("anon-91aa"));
        assert_eq!(ids.user_id.as_deref(), Some("cust-1002"));
    }
}
