//! Events as Segment-spec JSON, the shape every destination speaks.

use edge_agent::ingest::format_timestamp;
use edge_agent::model::EventKind;
use serde_json::{json, Map, Value};

use crate::store::InboxRecord;

/// The Segment-spec JSON object for one received event.
pub fn to_segment(record: &InboxRecord) -> Value {
    let e = &record.event;
    let kind = match &e.kind {
        EventKind::Track
        | EventKind::Commerce
        | EventKind::SessionStart
        | EventKind::SessionEnd
        | EventKind::Other(_) => "track",
        other => other.as_str(),
    };
    let mut out = Map::new();
    out.insert(
        "messageId".into(),
        json!(e
            .message_id
            .as_deref()
            .map_or_else(|| e.id.to_string(), str::to_owned)),
    );
    out.insert("type".into(), json!(kind));
    if kind == "track" {
        let name = e.name.as_deref().unwrap_or(e.kind.as_str()).to_owned();
        out.insert("event".into(), json!(name));
    } else if let Some(name) = &e.name {
        out.insert("name".into(), json!(name));
    }
    let ids = &e.identities;
    if let Some(u) = &ids.user_id {
        out.insert("userId".into(), json!(u));
    }
    if let Some(a) = &ids.anonymous_id {
        out.insert("anonymousId".into(), json!(a));
    }
    if let Some(g) = &ids.group_id {
        out.insert("groupId".into(), json!(g));
    }
    if let Some(p) = &ids.previous_id {
        out.insert("previousId".into(), json!(p));
    }
    out.insert(
        "properties".into(),
        serde_json::to_value(&e.properties).unwrap_or(Value::Null),
    );
    if !e.traits.is_empty() {
        out.insert(
            "traits".into(),
            serde_json::to_value(&e.traits).unwrap_or(Value::Null),
        );
    }
    let mut context = match serde_json::to_value(&e.context) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let device = context.entry("device").or_insert_with(|| json!({}));
    if let Value::Object(d) = device {
        d.entry("id").or_insert_with(|| json!(ids.device_id.0));
    }
    if let Some(s) = &ids.session_id {
        context.insert("sessionId".into(), json!(s));
    }
    if !ids.other.is_empty() {
        let other: Map<String, Value> = ids
            .other
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        context.insert("externalIds".into(), Value::Object(other));
    }
    context.insert(
        "consent".into(),
        json!({ "granted": e.consent.granted, "ccpaOptOut": e.consent.ccpa_opt_out }),
    );
    out.insert("context".into(), Value::Object(context));
    out.insert(
        "timestamp".into(),
        json!(format_timestamp(record.corrected_timestamp_ms)),
    );
    out.insert(
        "originalTimestamp".into(),
        json!(format_timestamp(e.timestamp_ms)),
    );
    out.insert(
        "receivedAt".into(),
        json!(format_timestamp(record.received_ms)),
    );
    out.insert("_edge".into(), json!({ "eventId": e.id.to_string(), "seq": e.seq.0, "lane": e.lane, "sender": record.sender.0 }));
    Value::Object(out)
}
