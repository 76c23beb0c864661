//! The bytes that leave: a destination's minimized Segment-spec JSON, written
//! straight from the borrowed record.
//!
//! The output is byte for byte what serializing a `serde_json::Value` tree of the same
//! content gives (objects with their keys sorted bytewise, a repeated key's last value
//! kept, compact): that is the contract receivers and tests see. Building that tree per
//! event cost a `String` per key and a clone per value; here every key and value is
//! borrowed, only the small per-object entry lists are allocated, and the text is
//! written by [`super::json`] rather than through serde's traits.
//!
//! It must not decide anything: which fields go is [`super::Route`]'s rules, applied
//! in [`super::Route::body`]; this module only orders and writes them.

use edge_agent::model::{Map as AgentMap, Value as AgentValue};

use super::json;

/// An object's entries, sorted by key when serialized (see [`Obj::sorted`]).
pub(super) type Entries<'a> = Vec<(&'a str, Node<'a>)>;

/// One JSON value of the output.
pub(super) enum Node<'a> {
    /// An agent value as is (its objects sorted on the way out).
    Agent(&'a AgentValue),
    Str(&'a str),
    /// An object built here; keys are unique (see [`set`]).
    Object(Obj<'a>),
    /// The event's consent summary: `{"ccpaOptOut": .., "granted": [..]}`.
    Consent {
        granted: &'a [edge_agent::model::Str],
        ccpa: bool,
    },
    /// `context.externalIds`: `[{"id": .., "type": ..}]`.
    External(Vec<(&'a str, &'a str)>),
}

/// An object whose entries are kept sorted by key.
pub(super) struct Obj<'a>(Entries<'a>);

impl<'a> Obj<'a> {
    /// Sorts `entries` by key; keys must be unique.
    pub(super) fn sorted(mut entries: Entries<'a>) -> Self {
        entries.sort_by(|a, b| a.0.cmp(b.0));
        Obj(entries)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key`, keeping the order.
    pub(super) fn set(&mut self, key: &'a str, node: Node<'a>) {
        match self.0.binary_search_by(|(k, _)| (*k).cmp(key)) {
            Ok(at) => self.0[at].1 = node,
            Err(at) => self.0.insert(at, (key, node)),
        }
    }
}

/// Sets `key` in unsorted `entries`, replacing an existing value in place.
pub(super) fn set<'a>(entries: &mut Entries<'a>, key: &'a str, node: Node<'a>) {
    match entries.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = node,
        None => entries.push((key, node)),
    }
}

/// The entries of an agent map that `keep` passes, in the map's (key) order: an agent
/// map is kept sorted with one entry per key, as a JSON object is written here.
pub(super) fn agent_entries(
    map: &AgentMap,
    mut keep: impl FnMut(&str) -> bool,
) -> Vec<(&str, &AgentValue)> {
    map.iter().filter(|(k, _)| keep(k)).collect()
}

impl Node<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Node::Agent(v) => json::value(out, v),
            Node::Str(v) => json::str(out, v),
            Node::Object(o) => o.write(out),
            Node::Consent { granted, ccpa } => {
                out.extend_from_slice(b"{\"ccpaOptOut\":");
                json::bool(out, *ccpa);
                out.extend_from_slice(b",\"granted\":[");
                for (i, purpose) in granted.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    json::str(out, purpose);
                }
                out.extend_from_slice(b"]}");
            }
            Node::External(ids) => {
                out.push(b'[');
                for (i, (kind, id)) in ids.iter().enumerate() {
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
    }
}

impl Obj<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::key(out, k);
            v.write(out);
        }
        out.push(b'}');
    }
}

/// The top-level object. Written in key order; absent fields are not written.
pub(super) struct Body<'a> {
    pub anonymous_id: Option<&'a str>,
    pub context: Option<Obj<'a>>,
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
struct Fields<'o> {
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
