//! The bytes that leave: a destination's minimized Segment-spec JSON, written
//! straight from the borrowed record.
//!
//! The output is byte for byte what serializing a `serde_json::Value` tree of the same
//! content gives (objects with their keys sorted bytewise, a repeated key's last value
//! kept, compact): that is the contract receivers and tests see. Building that tree per
//! event cost a `String` per key and a clone per value; here every key and value is
//! borrowed and only the small per-object entry lists are allocated.
//!
//! It must not decide anything: which fields go is [`super::Route`]'s rules, applied
//! in [`super::Route::body`]; this module only orders and writes them.

use edge_agent::model::{Map as AgentMap, Value as AgentValue};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

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

impl Serialize for Node<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Agent(v) => Sorted(v).serialize(s),
            Node::Str(v) => s.serialize_str(v),
            Node::Object(o) => o.serialize(s),
            Node::Consent { granted, ccpa } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("ccpaOptOut", ccpa)?;
                m.serialize_entry("granted", granted)?;
                m.end()
            }
            Node::External(ids) => {
                let mut seq = s.serialize_seq(Some(ids.len()))?;
                for (t, id) in ids {
                    seq.serialize_element(&IdPair { id, kind: t })?;
                }
                seq.end()
            }
        }
    }
}

impl Serialize for Obj<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// One external id; fields in key order.
#[derive(Serialize)]
struct IdPair<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

/// An agent value with its objects' keys sorted, at every depth.
pub(super) struct Sorted<'a>(pub(super) &'a AgentValue);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            AgentValue::Object(m) => {
                let mut out = s.serialize_map(Some(m.len()))?;
                for (k, v) in m.iter() {
                    out.serialize_entry(k, &Sorted(v))?;
                }
                out.end()
            }
            AgentValue::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(&Sorted(v))?;
                }
                seq.end()
            }
            scalar => scalar.serialize(s),
        }
    }
}

/// Entries from [`agent_entries`] as an object.
pub(super) struct SortedMap<'a, 'b>(pub(super) &'b [(&'a str, &'a AgentValue)]);

impl Serialize for SortedMap<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, &Sorted(v))?;
        }
        m.end()
    }
}

/// The top-level object. Fields are in key order; absent ones are not written.
#[derive(Serialize)]
pub(super) struct Body<'a> {
    #[serde(rename = "anonymousId", skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Obj<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'a str>,
    #[serde(rename = "groupId", skip_serializing_if = "Option::is_none")]
    pub group_id: Option<&'a str>,
    #[serde(rename = "messageId")]
    pub message_id: MessageId<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(rename = "originalTimestamp")]
    pub original_timestamp: String,
    #[serde(rename = "previousId", skip_serializing_if = "Option::is_none")]
    pub previous_id: Option<&'a str>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "sorted_entries"
    )]
    pub properties: Option<Vec<(&'a str, &'a AgentValue)>>,
    #[serde(rename = "receivedAt")]
    pub received_at: String,
    pub timestamp: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "sorted_entries"
    )]
    pub traits: Option<Vec<(&'a str, &'a AgentValue)>>,
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
}

/// The app's messageId, or the event id written as text.
pub(super) enum MessageId<'a> {
    App(&'a str),
    Event(edge_agent::model::EventId),
}

impl Serialize for MessageId<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MessageId::App(id) => s.serialize_str(id),
            MessageId::Event(id) => s.collect_str(id),
        }
    }
}

// `serialize_with` hands the field by reference.
#[allow(clippy::ref_option)]
fn sorted_entries<S: Serializer>(
    entries: &Option<Vec<(&str, &AgentValue)>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match entries {
        Some(e) => SortedMap(e).serialize(s),
        None => s.serialize_none(),
    }
}
