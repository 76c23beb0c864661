//! mParticle Events API bodies (`/v2/events`: one batch; `/v2/bulkevents`: an array).
//!
//! Batch-level data applies to every event of the batch: `user_identities` become
//! identities, `user_attributes` traits, `device_info` / `application_info` context,
//! `consent_state` a consent update.

use serde::Deserialize;

use super::{Incoming, IngestError};
use crate::consent::ConsentUpdate;
use crate::model::{Event, EventKind, Map, Source, Value};

#[derive(Debug, Deserialize)]
struct Batch {
    #[serde(default)]
    events: Vec<MpEvent>,
    user_identities: Option<Map>,
    user_attributes: Option<Map>,
    device_info: Option<Map>,
    application_info: Option<Map>,
    consent_state: Option<ConsentState>,
    mp_deviceid: Option<String>,
    environment: Option<String>,
    source_request_id: Option<String>,
    timestamp_unixtime_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct MpEvent {
    event_type: String,
    #[serde(default)]
    data: Map,
}

#[derive(Debug, Deserialize)]
struct ConsentState {
    #[serde(default)]
    gdpr: std::collections::BTreeMap<String, Purpose>,
    #[serde(default)]
    ccpa: std::collections::BTreeMap<String, Purpose>,
}

#[derive(Debug, Deserialize)]
struct Purpose {
    consented: bool,
    timestamp_unixtime_ms: Option<i64>,
}

/// `device_info` fields that identify a device, most specific first.
const DEVICE_ID_FIELDS: [&str; 5] = [
    "device_application_stamp",
    "android_uuid",
    "ios_idfv",
    "roku_publisher_id",
    "fire_advertising_id",
];

/// Parses `/v2/events` (`bulk = false`) or `/v2/bulkevents` (`bulk = true`).
pub fn parse(
    body: &[u8],
    bulk: bool,
    max_request: u64,
    now_ms: i64,
) -> Result<Vec<Incoming>, IngestError> {
    if body.len() as u64 > max_request {
        return Err(IngestError::TooLarge {
            what: "request body",
            size: body.len(),
            limit: max_request,
        });
    }
    let batches: Vec<Batch> = if bulk {
        serde_json::from_slice(body).map_err(|e| IngestError::json("bulk body", &e))?
    } else {
        vec![serde_json::from_slice(body).map_err(|e| IngestError::json("batch body", &e))?]
    };
    let mut out = Vec::new();
    for (b, batch) in batches.into_iter().enumerate() {
        let at = if bulk {
            format!("[{b}]")
        } else {
            String::new()
        };
        convert_batch(batch, &at, now_ms, &mut out)?;
    }
    if out.is_empty() {
        return Err(IngestError::Malformed(
            "events: no events in the request".into(),
        ));
    }
    Ok(out)
}

fn convert_batch(
    batch: Batch,
    at: &str,
    now_ms: i64,
    out: &mut Vec<Incoming>,
) -> Result<(), IngestError> {
    let mut context = Map::new();
    if let Some(app) = batch.application_info {
        context.insert("app", Value::Object(app));
    }
    let device_hint = batch.mp_deviceid.clone().or_else(|| {
        let info = batch.device_info.as_ref()?;
        DEVICE_ID_FIELDS
            .iter()
            .find_map(|f| info.get_str(f).map(str::to_owned))
    });
    if let Some(device) = batch.device_info {
        context.insert("device", Value::Object(device));
    }
    let mut mp = Map::new();
    if let Some(env) = batch.environment {
        mp.insert("environment", Value::String(env.into()));
    }
    if let Some(id) = batch.source_request_id {
        mp.insert("source_request_id", Value::String(id.into()));
    }
    if let Some(id) = &batch.mp_deviceid {
        mp.insert("mp_deviceid", Value::String(id.into()));
    }
    if !mp.is_empty() {
        context.insert("mparticle", Value::Object(mp));
    }
    let mut identities = Vec::new();
    let mut user_id = None;
    for (kind, value) in batch.user_identities.iter().flat_map(Map::iter) {
        let value = match value {
            Value::String(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        if kind == "customer_id" {
            user_id = Some(value.clone());
        }
        identities.push((kind.to_owned(), value));
    }
    let consent = batch.consent_state.map(|state| {
        let mut at_ms = 0;
        let mut purposes = Vec::new();
        for (name, p) in &state.gdpr {
            at_ms = at_ms.max(p.timestamp_unixtime_ms.unwrap_or(0));
            purposes.push((name.clone(), p.consented));
        }
        // mParticle: `data_sale_opt_out.consented == true` means the user opted OUT.
        let ccpa_opt_out = state.ccpa.get("data_sale_opt_out").map(|p| {
            at_ms = at_ms.max(p.timestamp_unixtime_ms.unwrap_or(0));
            p.consented
        });
        ConsentUpdate {
            purposes,
            ccpa_opt_out,
            at_ms: if at_ms == 0 { now_ms } else { at_ms },
        }
    });
    let traits = batch.user_attributes.unwrap_or_default();
    for (i, mp_event) in batch.events.into_iter().enumerate() {
        let here = format!("{at}events[{i}]");
        let mut e = convert_event(mp_event, &here, now_ms)?;
        if e.timestamp_ms == now_ms {
            if let Some(ts) = batch.timestamp_unixtime_ms {
                e.timestamp_ms = ts;
            }
        }
        e.identities.user_id = user_id.as_deref().map(Into::into);
        e.identities.other = identities
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect();
        e.traits = traits.clone();
        e.context = context.clone();
        out.push(Incoming {
            event: e,
            consent: consent.clone(),
            device_hint: device_hint.clone(),
        });
    }
    Ok(())
}

fn convert_event(mp: MpEvent, at: &str, now_ms: i64) -> Result<Event, IngestError> {
    let MpEvent {
        event_type,
        mut data,
    } = mp;
    let kind = match event_type.as_str() {
        "custom_event" => EventKind::Track,
        "screen_view" => EventKind::Screen,
        "session_start" => EventKind::SessionStart,
        "session_end" => EventKind::SessionEnd,
        "commerce_event" => EventKind::Commerce,
        "" => return Err(IngestError::Malformed(format!("{at}.event_type: empty"))),
        other => EventKind::Other(other.to_owned()),
    };
    let mut e = Event::new(kind.clone(), Source::Mparticle, now_ms);
    match data.remove("source_message_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 256 => e.set_message_id(&id),
        Some(Value::String(_)) => {
            return Err(IngestError::Malformed(format!(
                "{at}.data.source_message_id: must be 1-256 characters"
            )))
        }
        _ => {}
    }
    match data.remove("timestamp_unixtime_ms") {
        Some(Value::Int(ms)) => e.timestamp_ms = ms,
        Some(Value::Null) | None => {}
        Some(_) => {
            return Err(IngestError::Malformed(format!(
                "{at}.data.timestamp_unixtime_ms: must be an integer"
            )))
        }
    }
    let name_field = match kind {
        EventKind::Track => "event_name",
        EventKind::Screen => "screen_name",
        _ => "event_name",
    };
    e.name = match data.remove(name_field) {
        Some(Value::String(n)) => Some(n),
        _ => None,
    };
    if kind == EventKind::Track && e.name.is_none() {
        return Err(IngestError::Malformed(format!(
            "{at}.data.event_name: missing"
        )));
    }
    if let Some(Value::String(session)) = data.remove("session_uuid") {
        e.identities.session_id = Some(session);
    }
    let mut properties = match data.remove("custom_attributes") {
        Some(Value::Object(attrs)) => attrs,
        _ => Map::new(),
    };
    // Everything else in `data` (product_action, currency_code, custom_event_type...)
    // is kept as properties so nothing the app sent is lost.
    for (k, v) in data.iter() {
        if properties.get(k).is_none() {
            properties.insert(k, v.clone());
        }
    }
    e.properties = properties;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/mparticle-batch.json");

    #[test]
    fn fixture_batch_maps_every_event() {
        let events = parse(FIXTURE, false, 256 * 1024, 0).unwrap();
        let kinds: Vec<_> = events.iter().map(|i| i.event.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "session_start",
                "screen",
                "track",
                "commerce",
                "session_end"
            ]
        );
        let play = &events[2].event;
        assert_eq!(play.name.as_deref(), Some("Video Played"));
        assert_eq!(play.properties.get_str("title"), Some("Harbour Lights"));
        assert_eq!(play.properties.get_str("custom_event_type"), Some("media"));
        assert_eq!(play.identities.user_id.as_deref(), Some("cust-2002"));
        assert_eq!(play.timestamp_ms, 1_795_773_520_000);
        assert_eq!(play.message_id.as_deref(), Some("mp-msg-0003"));
        assert_eq!(
            events[2].device_hint.as_deref(),
            Some("a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d")
        );
        let consent = events[0].consent.as_ref().unwrap();
        assert_eq!(consent.ccpa_opt_out, Some(true));
        assert!(consent
            .purposes
            .contains(&("advertising".to_owned(), false)));
        assert!(events[3].event.properties.get("product_action").is_some());
    }

    #[test]
    fn bulk_takes_an_array_of_batches() {
        let body = format!(
            "[{},{}]",
            String::from_utf8_lossy(FIXTURE),
            String::from_utf8_lossy(FIXTURE)
        );
        assert_eq!(parse(body.as_bytes(), true, 1 << 20, 0).unwrap().len(), 10);
    }

    #[test]
    fn over_limit_request_is_too_large() {
        let err = parse(FIXTURE, false, 100, 0).unwrap_err();
        assert!(matches!(err, IngestError::TooLarge { .. }));
    }

    #[test]
    fn batch_without_events_is_malformed() {
        assert!(matches!(
            parse(b"{}", false, 1024, 0),
            Err(IngestError::Malformed(_))
        ));
    }
}
