//! The tree-building renderer that [`super::render`] replaced, kept for tests only:
//! the bytes written from borrowed parts must equal this tree serialized.

use edge_agent::ingest::format_timestamp;
use edge_agent::model::Map as AgentMap;
use serde_json::{json, Map, Value};

use super::{event_name, segment_type, Route};
use crate::profiles::Routed;

/// Identities that leave, `(type, value)`, in a stable order.
fn identities_out(route: &Route, routed: &Routed) -> Vec<(String, String)> {
    let e = &routed.record.event;
    let ids = &e.identities;
    let other = |t: &str| {
        ids.other
            .iter()
            .find(|(k, _)| k == t)
            .map(|(_, v)| v.as_str())
    };
    let mut own: Vec<(String, String)> = Vec::new();
    let placed = [
        (
            "customer_id",
            ids.user_id.as_deref().or_else(|| other("customer_id")),
        ),
        ("anonymous_id", ids.anonymous_id.as_deref()),
        ("group_id", ids.group_id.as_deref()),
        ("previous_id", ids.previous_id.as_deref()),
        ("device_id", Some(ids.device_id.0.as_str())),
        ("session_id", ids.session_id.as_deref()),
    ];
    let others = ids
        .other
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())));
    for (t, v) in placed.into_iter().chain(others) {
        add_identity(&mut own, t, v);
    }
    let Some(allow) = &route.identities else {
        return own;
    };
    // Under an allowlist `traits.email` counts as the email identity.
    add_identity(&mut own, "email", e.traits.get_str("email"));
    let mut out: Vec<(String, String)> = Vec::new();
    for t in allow {
        let value = own
            .iter()
            .find(|(k, _)| k == t)
            .map(|(_, v)| v.as_str())
            .or_else(|| {
                let ids = &routed.enrichment.identities;
                ids.iter().find(|(k, _)| k == t).map(|(_, v)| v.as_str())
            });
        add_identity(&mut out, t, value);
    }
    out
}

pub(super) fn build(route: &Route, routed: &Routed) -> Value {
    let record = &routed.record;
    let e = &record.event;
    let kind = segment_type(&e.kind);
    let mut out = Map::new();
    // The app's own messageId when it gave one (tools correlate and dedupe by it);
    // the event id (also the Idempotency-Key) otherwise.
    let message_id = e
        .message_id
        .as_deref()
        .map_or_else(|| e.id.to_string(), str::to_owned);
    out.insert("messageId".into(), json!(message_id));
    out.insert("type".into(), json!(kind));
    match (kind, event_name(&e.kind, e.name.as_deref())) {
        ("track", Some(n)) => drop(out.insert("event".into(), json!(n))),
        (_, Some(n)) => drop(out.insert("name".into(), json!(n))),
        _ => {}
    }

    let identities = identities_out(route, routed);
    let mut external = Vec::new();
    let (mut device_id, mut session_id) = (None, None);
    for (t, v) in &identities {
        match t.as_str() {
            "customer_id" => drop(out.insert("userId".into(), json!(v))),
            "anonymous_id" => drop(out.insert("anonymousId".into(), json!(v))),
            "group_id" => drop(out.insert("groupId".into(), json!(v))),
            "previous_id" => drop(out.insert("previousId".into(), json!(v))),
            "device_id" => device_id = Some(v.clone()),
            "session_id" => session_id = Some(v.clone()),
            _ => external.push(json!({ "type": t, "id": v })),
        }
    }

    let properties = cut(&e.properties, route.properties.as_deref());
    if !properties.is_empty() {
        out.insert("properties".into(), Value::Object(properties));
    }
    let traits = traits(route, routed);
    if !traits.is_empty() {
        out.insert("traits".into(), Value::Object(traits));
    }

    let mut context = if route.context {
        let mut c = to_json_map(&e.context);
        if route.identities.is_some() {
            strip_context_identifiers(&mut c);
        }
        c.remove("consent");
        c.remove("externalIds");
        c.remove("sessionId");
        c.insert(
            "consent".into(),
            json!({ "granted": e.consent.granted, "ccpaOptOut": e.consent.ccpa_opt_out }),
        );
        c
    } else {
        Map::new()
    };
    // Without an allowlist, identities living in context go only with the context.
    let placed_in_context = route.context || route.identities.is_some();
    if placed_in_context {
        if let Some(id) = device_id {
            let device = context.entry("device").or_insert_with(|| json!({}));
            if let Value::Object(d) = device {
                d.insert("id".into(), json!(id));
            }
        }
        if let Some(s) = session_id {
            context.insert("sessionId".into(), json!(s));
        }
        if !external.is_empty() {
            context.insert("externalIds".into(), Value::Array(external));
        }
    }
    if !context.is_empty() {
        out.insert("context".into(), Value::Object(context));
    }

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
    Value::Object(out)
}

/// The event's traits (cut to the allowlist) plus allowed profile attributes.
fn traits(route: &Route, routed: &Routed) -> Map<String, Value> {
    let e = &routed.record.event;
    let mut traits = cut(&e.traits, route.attributes.as_deref());
    // `traits.email` is the email identity: it obeys the identity allowlist.
    if !route.allows_identity("email") {
        traits.remove("email");
    }
    if let Some(allow) = &route.attributes {
        for (name, value) in &routed.enrichment.attributes {
            if allow.iter().any(|a| a == name) && !traits.contains_key(name.as_str()) {
                traits.insert(
                    name.to_string(),
                    serde_json::to_value(value).unwrap_or(Value::Null),
                );
            }
        }
    }
    traits
}

/// Adds `(id_type, value)` unless the value is empty or the type is there already.
fn add_identity(list: &mut Vec<(String, String)>, id_type: &str, value: Option<&str>) {
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        if !list.iter().any(|(t, _)| t == id_type) {
            list.push((id_type.to_owned(), v.to_owned()));
        }
    }
}

/// An agent map as JSON, cut to `allow` when given.
fn cut(map: &AgentMap, allow: Option<&[String]>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in map.iter() {
        if allow.is_none_or(|a| a.iter().any(|x| x == k)) {
            out.insert(k.to_owned(), serde_json::to_value(v).unwrap_or(Value::Null));
        }
    }
    out
}

fn to_json_map(map: &AgentMap) -> Map<String, Value> {
    cut(map, None)
}

/// Removes identifiers a Segment context may carry besides the ones we place.
fn strip_context_identifiers(context: &mut Map<String, Value>) {
    for key in ["traits", "ip", "userId", "anonymousId"] {
        context.remove(key);
    }
    if let Some(Value::Object(device)) = context.get_mut("device") {
        device.remove("id");
        device.remove("advertisingId");
        if device.is_empty() {
            context.remove("device");
        }
    }
}
