//! The bytes that leave: a destination's minimized Segment-spec JSON, written
//! straight from the borrowed record.
//!
//! The output is byte for byte what serializing a `serde_json::Value` tree of the same
//! content gives (objects with their keys sorted bytewise, a repeated key's last value
//! kept, compact): that is the contract receivers and tests see. Building that tree per
//! event cost a `String` per key and a clone per value; here every key and value is
//! borrowed, only the `properties` and `traits` entry lists are allocated, and the
//! text is written by [`super::json`] rather than through serde's traits.
//!
//! Which fields go is [`super::Route`]'s rules, applied in [`super::Route::body`];
//! this module orders and writes them. The exception is `context`: the event's
//! entries are merged with the identities placed there while writing ([`Context`]
//! holds those rules), because building the object first cost an entry list, a sort
//! and a device object per event and destination.

use edge_agent::model::{Map as AgentMap, Value as AgentValue};

use super::json;

/// The entries of an agent map that `keep` passes, in the map's (key) order: an agent
/// map is kept sorted with one entry per key, as a JSON object is written here.
pub(super) fn agent_entries(
    map: &AgentMap,
    mut keep: impl FnMut(&str) -> bool,
) -> Vec<(&str, &AgentValue)> {
    map.iter().filter(|(k, _)| keep(k)).collect()
}

/// `context`: the event's own (sorted) entries merged, in key order, with what is
/// placed there, written in one pass without building the object.
pub(super) struct Context<'a> {
    /// The event's context, when it goes (`context = true`).
    pub event: Option<&'a AgentMap>,
    /// Under an identity allowlist: the identifiers a Segment context may carry are
    /// removed (`traits`, `ip`, `userId`, `anonymousId`, `device.id`,
    /// `device.advertisingId`) and a device left empty goes.
    pub strip: bool,
    /// The event's consent summary `(granted, ccpaOptOut)`, with the event's context.
    pub consent: Option<(&'a [edge_agent::model::Str], bool)>,
    /// `device.id` (in the event's device object, or a new one).
    pub device_id: Option<&'a str>,
    pub session_id: Option<&'a str>,
    /// `externalIds: [{"id", "type"}]`, `(type, id)`.
    pub external: Vec<(&'a str, &'a str)>,
}

/// Keys placed in `context`, in key order.
const PLACED: [&str; 4] = ["consent", "device", "externalIds", "sessionId"];

impl Context<'_> {
    pub(super) fn is_empty(&self) -> bool {
        self.event.is_none()
            && self.consent.is_none()
            && self.device_id.is_none()
            && self.session_id.is_none()
            && self.external.is_empty()
    }

    /// Whether the event's context entry `k` goes: the keys placed here never come
    /// from the event (except `device`, merged), nor identifiers under an allowlist.
    fn keeps(&self, k: &str) -> bool {
        !(matches!(k, "consent" | "externalIds" | "sessionId")
            || (self.strip && matches!(k, "traits" | "ip" | "userId" | "anonymousId")))
    }

    pub(super) fn write(&self, out: &mut Vec<u8>) {
        let event_device = self.event.and_then(|c| c.get("device"));
        let mut o = Fields::new(out);
        let mut placed = PLACED.iter().peekable();
        for (k, v) in self.event.iter().flat_map(|c| c.iter()) {
            if !self.keeps(k) {
                continue;
            }
            while let Some(p) = placed.next_if(|p| **p < k) {
                self.write_placed(&mut o, p, event_device.is_some());
            }
            match v {
                AgentValue::Object(device) if k == "device" => self.write_device(&mut o, device),
                _ => json::value(o.field(k), v),
            }
        }
        for p in placed {
            self.write_placed(&mut o, p, event_device.is_some());
        }
        o.end();
    }

    /// Writes placed key `k` if it has a value; `device` only when the event has none
    /// (else it was merged into the event's, or the event's is not an object and
    /// stays as it is).
    fn write_placed(&self, o: &mut Fields<'_>, k: &str, event_has_device: bool) {
        match k {
            "consent" => {
                if let Some((granted, ccpa)) = self.consent {
                    let out = o.field(k);
                    out.extend_from_slice(b"{\"ccpaOptOut\":");
                    json::bool(out, ccpa);
                    out.extend_from_slice(b",\"granted\":[");
                    for (i, purpose) in granted.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        json::str(out, purpose);
                    }
                    out.extend_from_slice(b"]}");
                }
            }
            "device" => {
                if let Some(id) = self.device_id.filter(|_| !event_has_device) {
                    let out = o.field(k);
                    out.extend_from_slice(b"{\"id\":");
                    json::str(out, id);
                    out.push(b'}');
                }
            }
            "externalIds" => {
                if !self.external.is_empty() {
                    let out = o.field(k);
                    out.push(b'[');
                    for (i, (kind, id)) in self.external.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(b"{\"id\":");
                        json::str(out, id);
                        out.extend_from_slice(b",\"type\":");
                        json::str(out, kind);
                        out.push(b'}');
                    }
                    out.push(b']');
                }
            }
            _ => o.opt_str(k, self.session_id),
        }
    }

    /// The event's device object: its `id` replaced by the one placed (or removed
    /// under an allowlist, with `advertisingId`); left out when stripping empties it.
    fn write_device(&self, o: &mut Fields<'_>, device: &AgentMap) {
        let drop_id = self.strip || self.device_id.is_some();
        let dropped = |k: &str| (drop_id && k == "id") || (self.strip && k == "advertisingId");
        let kept = |k: &str| !dropped(k);
        if self.strip && self.device_id.is_none() && !device.iter().any(|(k, _)| kept(k)) {
            return;
        }
        let mut d = Fields::new(o.field("device"));
        let mut id = self.device_id;
        for (k, v) in device.iter().filter(|(k, _)| kept(k)) {
            if let Some(placed) = id.filter(|_| "id" < k) {
                json::str(d.field("id"), placed);
                id = None;
            }
            json::value(d.field(k), v);
        }
        if let Some(placed) = id {
            json::str(d.field("id"), placed);
        }
        d.end();
    }
}

/// The top-level object. Written in key order; absent fields are not written.
pub(super) struct Body<'a> {
    pub anonymous_id: Option<&'a str>,
    pub context: Option<Context<'a>>,
    pub event: Option<&'a str>,
    pub group_id: Option<&'a str>,
    pub message_id: MessageId<'a>,
    pub name: Option<&'a str>,
    /// Milliseconds since the epoch, written as RFC 3339 text.
    pub original_timestamp: i64,
    pub previous_id: Option<&'a str>,
    pub properties: Option<Vec<(&'a str, &'a AgentValue)>>,
    pub received_at: i64,
    pub timestamp: i64,
    pub traits: Option<Vec<(&'a str, &'a AgentValue)>>,
    pub kind: &'a str,
    pub user_id: Option<&'a str>,
}

impl Body<'_> {
    /// Appends the body's JSON text to `out`.
    pub(super) fn write(&self, out: &mut Vec<u8>) {
        let mut o = Fields::new(out);
        o.opt_str("anonymousId", self.anonymous_id);
        if let Some(c) = &self.context {
            c.write(o.field("context"));
        }
        o.opt_str("event", self.event);
        o.opt_str("groupId", self.group_id);
        let out = o.field("messageId");
        match &self.message_id {
            MessageId::App(id) => json::str(out, id),
            MessageId::Event(id) => {
                let mut text = uuid::Uuid::encode_buffer();
                json::str(
                    out,
                    uuid::Uuid::from_u128(id.0)
                        .hyphenated()
                        .encode_lower(&mut text),
                );
            }
        }
        o.opt_str("name", self.name);
        json::timestamp(o.field("originalTimestamp"), self.original_timestamp);
        o.opt_str("previousId", self.previous_id);
        if let Some(p) = &self.properties {
            json::entries(o.field("properties"), p.iter().copied());
        }
        json::timestamp(o.field("receivedAt"), self.received_at);
        json::timestamp(o.field("timestamp"), self.timestamp);
        if let Some(t) = &self.traits {
            json::entries(o.field("traits"), t.iter().copied());
        }
        json::str(o.field("type"), self.kind);
        o.opt_str("userId", self.user_id);
        o.end();
    }
}

/// Writes an object's fields one by one, in the order given (the caller's key order).
pub(super) struct Fields<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Fields<'o> {
    fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Fields { out, first: true }
    }

    /// Writes `"k":` (after a comma unless first); the value goes into the result.
    fn field(&mut self, k: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        json::key(self.out, k);
        self.out
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            json::str(self.field(k), v);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// The app's messageId, or the event id written as text.
pub(super) enum MessageId<'a> {
    App(&'a str),
    Event(edge_agent::model::EventId),
}
