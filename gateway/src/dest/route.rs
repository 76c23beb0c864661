//! Per-destination decisions, pure: does this event go there, and exactly which bytes.
//!
//! No I/O and no clock: everything comes from the [`Routed`] record (the event, its
//! consent snapshot, and the profile stage's [`crate::profiles::Enrichment`]).
//!
//! # Filters
//! `event_types` match the Segment type (agent kinds such as commerce and session
//! events are `track`) or the agent's own kind name; `event_names` and
//! `exclude_event_names` match the track event name or the page/screen name (a track
//! without a name uses its kind name, e.g. `session_start`). An event without a name
//! never matches a non-empty `event_names`.
//!
//! # Consent
//! Every `require_purposes` purpose must be granted in the event's own snapshot, and
//! not withdrawn by a profile consent stated after the event. A `sale` destination
//! gets nothing from a user whose snapshot or later profile consent says CCPA opt-out.
//!
//! # Minimization: nothing else leaves
//! Always sent: `messageId` (the app's, else the event id; the event id is the
//! `Idempotency-Key`), `type`,
//! `event` (track) or `name` (page/screen), `timestamp`, `originalTimestamp`,
//! `receivedAt`. The gateway's internals (`_edge`: sender, lane, seq) never leave.
//!
//! With an `identities` allowlist, an identity type appears only when listed, taken
//! from the event or else from the profile:
//!
//! | type           | placed at                                  |
//! |----------------|--------------------------------------------|
//! | `customer_id`  | `userId`                                   |
//! | `anonymous_id` | `anonymousId`                              |
//! | `group_id`     | `groupId`                                  |
//! | `previous_id`  | `previousId`                               |
//! | `device_id`    | `context.device.id`                        |
//! | `session_id`   | `context.sessionId`                        |
//! | anything else  | `context.externalIds: [{"type", "id"}]`    |
//!
//! and identifiers elsewhere in the event are removed: `traits.email` unless `email`
//! is listed, `context.traits`, `context.ip`, `context.device.id` and
//! `context.device.advertisingId` unless `device_id` is listed. Without the
//! allowlist the event's own identities go out as they came (the same places), and
//! nothing is attached from the profile.
//!
//! With an `attributes` allowlist, `traits` is the event's own traits cut to the list
//! plus the profile's attributes of those names (the event's own value wins).
//! `properties` cuts properties. `context = false` drops the event's context and the
//! consent summary; only identities the allowlist names as living in `context`
//! (device id, session id, external ids) remain there.

mod json;
#[cfg(test)]
mod reference;
mod render;

use edge_agent::model::{EventKind, Str, Value as AgentValue};
use serde_json::Value;

use self::render::{agent_entries, Body, Context, MessageId};
use crate::config::DestinationConfig;
use crate::profiles::Routed;

/// A destination's filters, consent requirements and minimization, compiled once.
#[derive(Debug, Clone)]
pub struct Route {
    event_types: Vec<String>,
    event_names: Vec<String>,
    exclude_event_names: Vec<String>,
    require_purposes: Vec<String>,
    sale: bool,
    identities: Option<Vec<String>>,
    attributes: Option<Vec<String>>,
    properties: Option<Vec<String>>,
    context: bool,
    /// Senders never sent here: the feeds of the tool this destination is.
    exclude_senders: Vec<String>,
}

/// The Segment call type of an agent event kind.
pub fn segment_type(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::Identify => "identify",
        EventKind::Page => "page",
        EventKind::Screen => "screen",
        EventKind::Group => "group",
        EventKind::Alias => "alias",
        EventKind::Track
        | EventKind::Consent
        | EventKind::SessionStart
        | EventKind::SessionEnd
        | EventKind::Commerce
        | EventKind::Other(_) => "track",
    }
}

/// The name filters look at: track event name (or kind name), page/screen name.
fn event_name<'a>(kind: &'a EventKind, name: Option<&'a str>) -> Option<&'a str> {
    match (segment_type(kind), name) {
        (_, Some(n)) => Some(n),
        ("track", None) => Some(kind.as_str()),
        _ => None,
    }
}

impl Route {
    pub fn new(config: &DestinationConfig) -> Self {
        Self {
            event_types: config.event_types.clone(),
            event_names: config.event_names.clone(),
            exclude_event_names: config.exclude_event_names.clone(),
            require_purposes: config.require_purposes.clone(),
            sale: config.sale,
            identities: config.identities.clone(),
            attributes: config.attributes.clone(),
            properties: config.properties.clone(),
            context: config.context,
            exclude_senders: config.exclude_senders.clone(),
        }
    }

    /// The Segment-spec JSON this destination receives for `routed`, or `None` when
    /// filters or consent keep it out. A tree for callers that look inside (tests, the
    /// admin API); delivery writes bytes with [`Route::render_into`].
    pub fn render(&self, routed: &Routed) -> Option<Value> {
        let mut out = Vec::new();
        if !self.render_into(routed, &mut out) {
            return None;
        }
        // Our own output: it parses.
        serde_json::from_slice(&out).ok()
    }

    /// Appends the JSON text this destination receives for `routed` to `out`;
    /// `false`, with nothing written, when filters or consent keep it out. Always
    /// valid UTF-8 JSON: every key and value written is a `&str` or a number.
    pub fn render_into(&self, routed: &Routed, out: &mut Vec<u8>) -> bool {
        if !self.passes_filters(routed) || !self.consent_allows(routed) {
            return false;
        }
        self.body(routed).write(out);
        true
    }

    fn passes_filters(&self, routed: &Routed) -> bool {
        // A feed's events never go back to the tool they came from.
        if self.exclude_senders.contains(&routed.record.sender.0) {
            return false;
        }
        let e = &routed.record.event;
        let kind = segment_type(&e.kind);
        if !self.event_types.is_empty()
            && !self
                .event_types
                .iter()
                .any(|t| t == kind || t == e.kind.as_str())
        {
            return false;
        }
        let name = event_name(&e.kind, e.name.as_deref());
        if !self.event_names.is_empty()
            && !name.is_some_and(|n| self.event_names.iter().any(|x| x == n))
        {
            return false;
        }
        !name.is_some_and(|n| self.exclude_event_names.iter().any(|x| x == n))
    }

    fn consent_allows(&self, routed: &Routed) -> bool {
        let snapshot = &routed.record.event.consent;
        let profile = &routed.enrichment.consent;
        // The profile's consent speaks for this event only if stated after it: an
        // older grant cannot widen what the user allowed when the event happened,
        // and an older denial was already in the event's snapshot.
        let later = profile.updated_ms > routed.record.corrected_timestamp_ms;
        let has = |list: &[Str], p: &str| list.iter().any(|g| g.eq_ignore_ascii_case(p));
        for purpose in &self.require_purposes {
            if !has(&snapshot.granted, purpose) {
                return false;
            }
            if later && (!has(&profile.granted, purpose) || has(&profile.denied, purpose)) {
                return false;
            }
        }
        !(self.sale && (snapshot.ccpa_opt_out || (later && profile.ccpa_opt_out)))
    }

    fn allows_identity(&self, id_type: &str) -> bool {
        self.identities
            .as_ref()
            .is_none_or(|list| list.iter().any(|t| t == id_type))
    }

    /// Identities that leave, `(type, value)`, in a stable order.
    fn identities_out<'a>(&'a self, routed: &'a Routed) -> Vec<(&'a str, &'a str)> {
        let e = &routed.record.event;
        let ids = &e.identities;
        let other = |t: &str| {
            ids.other
                .iter()
                .find(|(k, _)| k == t)
                .map(|(_, v)| v.as_str())
        };
        let mut own: Vec<(&str, &str)> = Vec::with_capacity(8);
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
        let Some(allow) = &self.identities else {
            return own;
        };
        // Under an allowlist `traits.email` counts as the email identity.
        add_identity(&mut own, "email", e.traits.get_str("email"));
        let mut out: Vec<(&str, &str)> = Vec::with_capacity(allow.len());
        for t in allow {
            let value = own
                .iter()
                .find(|(k, _)| k == t)
                .map(|(_, v)| *v)
                .or_else(|| {
                    routed
                        .enrichment
                        .identities
                        .iter()
                        .find(|(k, _)| k == t)
                        .map(|(_, v)| v.as_str())
                });
            add_identity(&mut out, t, value);
        }
        out
    }

    /// What leaves for `routed`, borrowed from it, ready to serialize.
    fn body<'a>(&'a self, routed: &'a Routed) -> Body<'a> {
        let record = &routed.record;
        let e = &record.event;
        let kind = segment_type(&e.kind);
        let (event, name) = match (kind, event_name(&e.kind, e.name.as_deref())) {
            ("track", Some(n)) => (Some(n), None),
            (_, Some(n)) => (None, Some(n)),
            _ => (None, None),
        };
        // The app's own messageId when it gave one (tools correlate and dedupe by it);
        // the event id (also the Idempotency-Key) otherwise.
        let message_id = match &e.message_id {
            Some(id) => MessageId::App(id),
            None => MessageId::Event(e.id),
        };
        let mut body = Body {
            anonymous_id: None,
            context: None,
            event,
            group_id: None,
            message_id,
            name,
            original_timestamp: e.timestamp_ms,
            previous_id: None,
            properties: None,
            received_at: record.received_ms,
            timestamp: record.corrected_timestamp_ms,
            traits: None,
            kind,
            user_id: None,
        };
        let mut external = Vec::new();
        let (mut device_id, mut session_id) = (None, None);
        for (t, v) in self.identities_out(routed) {
            match t {
                "customer_id" => body.user_id = Some(v),
                "anonymous_id" => body.anonymous_id = Some(v),
                "group_id" => body.group_id = Some(v),
                "previous_id" => body.previous_id = Some(v),
                "device_id" => device_id = Some(v),
                "session_id" => session_id = Some(v),
                _ => external.push((t, v)),
            }
        }
        let allowed = self.properties.as_deref();
        let properties = agent_entries(&e.properties, |k| listed(allowed, k));
        body.properties = (!properties.is_empty()).then_some(properties);
        let traits = self.traits(routed);
        body.traits = (!traits.is_empty()).then_some(traits);
        body.context = self.context_out(routed, device_id, session_id, external);
        body
    }

    /// The event's traits (cut to the allowlist) plus allowed profile attributes.
    fn traits<'a>(&'a self, routed: &'a Routed) -> Vec<(&'a str, &'a AgentValue)> {
        let e = &routed.record.event;
        let allowed = self.attributes.as_deref();
        // `traits.email` is the email identity: it obeys the identity allowlist.
        let email = self.allows_identity("email");
        let mut traits =
            agent_entries(&e.traits, |k| listed(allowed, k) && (email || k != "email"));
        if let Some(allow) = allowed {
            let own = traits.len();
            for (name, value) in &routed.enrichment.attributes {
                // The event's own value wins, then the profile's first.
                if allow.iter().any(|a| a == name) && !traits.iter().any(|(k, _)| k == name) {
                    traits.push((name, value));
                }
            }
            if traits.len() > own {
                traits.sort_by(|a, b| a.0.cmp(b.0));
            }
        }
        traits
    }

    /// `context`: the event's (unless `context = false`), stripped of identifiers under
    /// an identity allowlist, with the consent summary and the identities placed there.
    fn context_out<'a>(
        &'a self,
        routed: &'a Routed,
        device_id: Option<&'a str>,
        session_id: Option<&'a str>,
        external: Vec<(&'a str, &'a str)>,
    ) -> Option<Context<'a>> {
        let e = &routed.record.event;
        let strip = self.identities.is_some();
        // Without an allowlist, identities living in context go only with the context.
        let placed = self.context || strip;
        let context = Context {
            event: self.context.then_some(&e.context),
            strip,
            consent: self
                .context
                .then_some((e.consent.granted.as_slice(), e.consent.ccpa_opt_out)),
            device_id: device_id.filter(|_| placed),
            session_id: session_id.filter(|_| placed),
            external: if placed { external } else { Vec::new() },
        };
        (!context.is_empty()).then_some(context)
    }
}

/// Whether `key` passes an optional allowlist.
fn listed(allow: Option<&[String]>, key: &str) -> bool {
    allow.is_none_or(|a| a.iter().any(|x| x == key))
}

/// Adds `(id_type, value)` unless the value is empty or the type is there already.
fn add_identity<'a>(list: &mut Vec<(&'a str, &'a str)>, id_type: &'a str, value: Option<&'a str>) {
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        if !list.iter().any(|(t, _)| *t == id_type) {
            list.push((id_type, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use edge_agent::model::{
        DeviceId, Event, EventKind, Map as AgentMap, Source, Value as AgentValue,
    };
    use serde_json::json;

    use super::*;
    use crate::profiles::{Enrichment, ProfileConsent};
    use crate::store::InboxRecord;

    const T: i64 = 1_700_000_000_000;

    fn config(extra: &str) -> DestinationConfig {
        let text = format!(
            "[[destinations]]\nname = \"d\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\n{extra}\n"
        );
        crate::config::GatewayConfig::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .destinations
            .remove(0)
    }

    fn route(extra: &str) -> Route {
        Route::new(&config(extra))
    }

    #[test]
    fn a_feeds_events_never_go_back_to_its_tool() {
        let mut c = config("");
        c.exclude_senders = vec!["feed:push".into()];
        let tool = Route::new(&c);
        let mut from_feed = purchase();
        std::sync::Arc::make_mut(&mut from_feed.record).sender = DeviceId("feed:push".into());
        assert!(tool.render(&from_feed).is_none());
        assert!(
            tool.render(&purchase()).is_some(),
            "the app's own events still go"
        );
        assert!(
            route("").render(&from_feed).is_some(),
            "other destinations get it"
        );
    }

    fn map(json: &str) -> AgentMap {
        serde_json::from_str(json).unwrap()
    }

    /// A purchase by customer `c-1` with every kind of identifier on board.
    fn purchase() -> Routed {
        let mut e = Event::new(EventKind::Track, Source::Segment, T);
        e.id = edge_agent::model::EventId(0x1c6b_8d2f_7b50_4b2f_8b1d_4a2c_3e5f_6071);
        e.name = Some("Purchase".into());
        e.identities.device_id = DeviceId("roku-1".into());
        e.identities.user_id = Some("c-1".into());
        e.identities.anonymous_id = Some("anon-1".into());
        e.identities.session_id = Some("s-1".into());
        e.identities.other = vec![("mobile_number".into(), "+1555".into())];
        e.properties = map(r#"{"revenue":12.5,"sku":"A1","coupon":"X"}"#);
        e.traits = map(r#"{"email":"ada@example.com","plan":"gold","ltv":7}"#);
        e.context = map(
            r#"{"ip":"10.0.0.7","library":{"name":"analytics-kotlin"},"device":{"id":"roku-1","advertisingId":"ad-9","model":"R1"},"traits":{"email":"ada@example.com"}}"#,
        );
        e.consent.granted = vec!["analytics".into(), "advertising".into()];
        Routed {
            seq: 7,
            record: std::sync::Arc::new(InboxRecord {
                sender: DeviceId("roku-1".into()),
                received_ms: T + 50,
                corrected_timestamp_ms: T,
                event: e,
            }),
            enrichment: Enrichment {
                profile_id: 3,
                identities: vec![
                    ("customer_id".into(), "c-1".into()),
                    ("email".into(), "ada@example.com".into()),
                    ("anonymous_id".into(), "anon-0".into()),
                ],
                attributes: vec![
                    ("ltv".into(), AgentValue::Float(120.5)),
                    ("first_seen".into(), AgentValue::String("x".into())),
                ],
                consent: ProfileConsent::default(),
            },
        }
    }

    fn with(f: impl FnOnce(&mut Routed)) -> Routed {
        let mut r = purchase();
        f(&mut r);
        r
    }

    #[test]
    fn a_destination_allowed_customer_id_and_ltv_gets_exactly_those() {
        let r = route("identities = [\"customer_id\"]\nattributes = [\"ltv\"]\nproperties = []\ncontext = false");
        let routed = purchase();
        let body = serde_json::to_string(&r.render(&routed).unwrap()).unwrap();
        let id = routed.record.event.id;
        assert_eq!(
            body,
            format!(
                r#"{{"event":"Purchase","messageId":"{id}","originalTimestamp":"2023-11-14T22:13:20Z","receivedAt":"2023-11-14T22:13:20.05Z","timestamp":"2023-11-14T22:13:20Z","traits":{{"ltv":7}},"type":"track","userId":"c-1"}}"#
            )
        );
        for leak in [
            "ada@", "anon-", "roku-1", "ad-9", "10.0.0.7", "gold", "+1555", "s-1", "_edge",
        ] {
            assert!(!body.contains(leak), "{leak} leaked: {body}");
        }
    }

    #[test]
    fn an_attribute_missing_from_the_event_is_attached_from_the_profile() {
        let r = route("identities = [\"customer_id\"]\nattributes = [\"ltv\"]\ncontext = false");
        let routed =
            with(|r| std::sync::Arc::make_mut(&mut r.record).event.traits = AgentMap::new());
        let body = r.render(&routed).unwrap();
        assert_eq!(body["traits"], json!({ "ltv": 120.5 }));
    }

    #[test]
    fn identities_missing_from_the_event_come_from_the_profile() {
        let r = route("identities = [\"customer_id\", \"email\"]\ncontext = false");
        let routed = with(|r| {
            std::sync::Arc::make_mut(&mut r.record)
                .event
                .identities
                .user_id = None;
            std::sync::Arc::make_mut(&mut r.record).event.traits = AgentMap::new();
        });
        let body = r.render(&routed).unwrap();
        assert_eq!(body["userId"], "c-1");
        assert_eq!(
            body["context"]["externalIds"],
            json!([{ "type": "email", "id": "ada@example.com" }])
        );
        assert!(body.get("anonymousId").is_none());
    }

    #[test]
    fn an_identity_allowlist_strips_identifiers_from_context_and_traits() {
        let r = route("identities = [\"anonymous_id\"]");
        let body = r.render(&purchase()).unwrap();
        assert_eq!(body["anonymousId"], "anon-1");
        assert!(body.get("userId").is_none());
        let ctx = &body["context"];
        assert_eq!(ctx["device"], json!({ "model": "R1" }));
        assert!(ctx.get("ip").is_none() && ctx.get("traits").is_none());
        assert!(ctx.get("sessionId").is_none() && ctx.get("externalIds").is_none());
        assert_eq!(ctx["library"]["name"], "analytics-kotlin");
        assert_eq!(body["traits"], json!({ "plan": "gold", "ltv": 7 }));
    }

    #[test]
    fn device_id_is_sent_only_when_allowed() {
        let r = route(
            "identities = [\"device_id\", \"session_id\", \"mobile_number\"]\ncontext = false",
        );
        let body = r.render(&purchase()).unwrap();
        assert_eq!(
            body["context"],
            json!({
                "device": { "id": "roku-1" },
                "sessionId": "s-1",
                "externalIds": [{ "type": "mobile_number", "id": "+1555" }],
            })
        );
    }

    #[test]
    fn without_allowlists_the_event_goes_as_it_came_and_nothing_is_attached() {
        let body = route("").render(&purchase()).unwrap();
        assert_eq!(body["userId"], "c-1");
        assert_eq!(body["anonymousId"], "anon-1");
        assert_eq!(
            body["traits"],
            json!({ "email": "ada@example.com", "plan": "gold", "ltv": 7 })
        );
        assert_eq!(body["properties"]["coupon"], "X");
        assert_eq!(body["context"]["device"]["id"], "roku-1");
        assert_eq!(body["context"]["sessionId"], "s-1");
        assert_eq!(
            body["context"]["consent"],
            json!({ "granted": ["analytics", "advertising"], "ccpaOptOut": false })
        );
        assert!(body.get("_edge").is_none());
        assert_eq!(body["messageId"], "1c6b8d2f-7b50-4b2f-8b1d-4a2c3e5f6071");
    }

    #[test]
    fn context_false_drops_context_and_consent() {
        let body = route("context = false").render(&purchase()).unwrap();
        assert!(body.get("context").is_none(), "{body}");
        assert_eq!(body["userId"], "c-1");
    }

    #[test]
    fn a_properties_allowlist_cuts_properties() {
        let body = route("properties = [\"revenue\", \"missing\"]")
            .render(&purchase())
            .unwrap();
        assert_eq!(body["properties"], json!({ "revenue": 12.5 }));
    }

    #[test]
    fn event_types_filter_with_agent_kinds_counting_as_track() {
        let r = route("event_types = [\"track\"]");
        assert!(r.render(&purchase()).is_some());
        let commerce =
            with(|r| std::sync::Arc::make_mut(&mut r.record).event.kind = EventKind::Commerce);
        assert!(r.render(&commerce).is_some());
        let identify = with(|r| {
            std::sync::Arc::make_mut(&mut r.record).event.kind = EventKind::Identify;
            std::sync::Arc::make_mut(&mut r.record).event.name = None;
        });
        assert!(r.render(&identify).is_none());
        assert!(route("event_types = [\"identify\"]")
            .render(&identify)
            .is_some());
        let body = route("").render(&commerce).unwrap();
        assert_eq!(body["type"], "track");
    }

    #[test]
    fn event_names_and_exclusions_filter_by_name() {
        assert!(route("event_names = [\"Purchase\"]")
            .render(&purchase())
            .is_some());
        assert!(route("event_names = [\"Play\"]")
            .render(&purchase())
            .is_none());
        assert!(route("exclude_event_names = [\"Purchase\"]")
            .render(&purchase())
            .is_none());
        let identify = with(|r| {
            std::sync::Arc::make_mut(&mut r.record).event.kind = EventKind::Identify;
            std::sync::Arc::make_mut(&mut r.record).event.name = None;
        });
        assert!(route("event_names = [\"Purchase\"]")
            .render(&identify)
            .is_none());
        let session = with(|r| {
            std::sync::Arc::make_mut(&mut r.record).event.kind = EventKind::SessionStart;
            std::sync::Arc::make_mut(&mut r.record).event.name = None;
        });
        assert!(route("event_names = [\"session_start\"]")
            .render(&session)
            .is_some());
    }

    #[test]
    fn a_required_purpose_must_be_in_the_events_snapshot() {
        let r = route("require_purposes = [\"advertising\"]");
        assert!(r.render(&purchase()).is_some());
        let denied = with(|r| {
            std::sync::Arc::make_mut(&mut r.record)
                .event
                .consent
                .granted = vec!["analytics".into()]
        });
        assert!(r.render(&denied).is_none());
    }

    #[test]
    fn a_later_profile_consent_withdraws_a_purpose() {
        let r = route("require_purposes = [\"advertising\"]");
        let later = with(|r| {
            r.enrichment.consent = ProfileConsent {
                granted: vec!["analytics".into()],
                denied: vec!["advertising".into()],
                ccpa_opt_out: false,
                updated_ms: T + 1,
            }
        });
        assert!(r.render(&later).is_none());
        // Stated before the event: the event's own snapshot governs.
        let earlier = with(|r| {
            r.enrichment.consent = ProfileConsent {
                granted: vec![],
                denied: vec!["advertising".into()],
                ccpa_opt_out: true,
                updated_ms: T - 1,
            }
        });
        assert!(r.render(&earlier).is_some());
        // A later grant cannot add what the event's snapshot lacked.
        let widened = with(|r| {
            std::sync::Arc::make_mut(&mut r.record)
                .event
                .consent
                .granted = vec![];
            r.enrichment.consent.granted = vec!["advertising".into()];
            r.enrichment.consent.updated_ms = T + 1;
        });
        assert!(r.render(&widened).is_none());
    }

    /// Events that stress the writer: unsorted and repeated keys at every depth,
    /// escapes, odd numbers, a device that is not an object, profile attributes
    /// shadowed by the event's own.
    fn awkward() -> Vec<Routed> {
        let mut out = vec![purchase()];
        out.push(with(|r| {
            let e = &mut std::sync::Arc::make_mut(&mut r.record).event;
            e.message_id = Some("app-\"1\"\n\u{1}é".into());
            e.properties = map(
                r#"{"z":{"b":1,"a":[{"y":1,"x":2},[]]},"m":1.5,"n":null,"big":18446744073709551615,"neg":-3,"Z":true,"a":"x","a":"y"}"#,
            );
            e.properties.insert("nan", AgentValue::Float(f64::NAN));
            e.traits = map(r#"{"plan":"p","email":"e@x","email":"f@x","ltv":1e300}"#);
            e.context = map(
                r#"{"device":"tv","userId":"u","consent":{"x":1},"sessionId":"old","externalIds":[1],"b":{"d":1,"c":2},"a":[{"k":2,"j":1}]}"#,
            );
        }));
        out.push(with(|r| {
            let e = &mut std::sync::Arc::make_mut(&mut r.record).event;
            e.kind = EventKind::Identify;
            e.name = None;
            e.traits = AgentMap::new();
            e.properties = AgentMap::new();
            e.context = map(r#"{"device":{"id":"only"}}"#);
            e.identities.user_id = None;
            e.identities.other = vec![
                ("customer_id".into(), "c-9".into()),
                ("email".into(), "".into()),
                ("zz".into(), "z".into()),
            ];
            r.enrichment.attributes = vec![
                ("email".into(), AgentValue::String("p@x".into())),
                ("ltv".into(), AgentValue::Int(1)),
                ("ltv".into(), AgentValue::Int(2)),
            ];
        }));
        out.push(with(|r| {
            let e = &mut std::sync::Arc::make_mut(&mut r.record).event;
            e.kind = EventKind::Page;
            e.name = Some("Home".into());
            e.context = AgentMap::new();
            e.identities.session_id = None;
            e.identities.group_id = Some("g".into());
            e.identities.previous_id = Some("p".into());
        }));
        out.push(with(|r| {
            let e = &mut std::sync::Arc::make_mut(&mut r.record).event;
            e.kind = EventKind::SessionStart;
            e.name = None;
            e.context = map(
                r#"{"device":{"advertisingId":"ad","id":"x","zeta":{"b":[1,{"d":1,"c":2}],"a":0}}}"#,
            );
        }));
        // No device id: an empty device object, and keys around every placed one.
        out.push(with(|r| {
            let e = &mut std::sync::Arc::make_mut(&mut r.record).event;
            e.identities.device_id = DeviceId(String::new());
            e.identities.session_id = None;
            e.context = map(
                r#"{"a":1,"consent":0,"d":2,"device":{},"e":3,"f":4,"s":5,"z":6,"ip":"1.2.3.4"}"#,
            );
        }));
        out
    }

    #[test]
    fn the_written_bytes_equal_the_serialized_tree() {
        let routes = [
            "",
            "context = false",
            "identities = [\"customer_id\"]\nattributes = [\"ltv\"]\nproperties = []\ncontext = false",
            "identities = [\"anonymous_id\"]",
            "identities = [\"device_id\", \"session_id\", \"mobile_number\"]\ncontext = false",
            "identities = [\"device_id\", \"email\", \"customer_id\", \"zz\", \"group_id\", \"previous_id\"]",
            "identities = [\"customer_id\"]\nattributes = [\"email\", \"ltv\", \"first_seen\", \"plan\"]",
            "attributes = [\"email\", \"ltv\"]",
            "properties = [\"revenue\", \"z\", \"a\", \"nan\"]",
            "identities = []\nattributes = []",
            "identities = [\"device_id\"]",
        ];
        let mut checked = 0;
        for text in routes {
            let r = route(text);
            for routed in awkward() {
                let mut bytes = b"[".to_vec();
                assert!(r.render_into(&routed, &mut bytes), "{text}");
                let expected = serde_json::to_string(&reference::build(&r, &routed)).unwrap();
                assert_eq!(
                    std::str::from_utf8(&bytes[1..]).unwrap(),
                    expected,
                    "route `{text}`"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, routes.len() * awkward().len());
        // Kept out: nothing is written.
        let mut bytes = Vec::new();
        assert!(!route("event_names = [\"x\"]").render_into(&purchase(), &mut bytes));
        assert!(bytes.is_empty());
    }

    #[test]
    fn a_sale_destination_gets_nothing_from_ccpa_opt_outs() {
        let sale = route("sale = true");
        let not_sale = route("");
        let opted = with(|r| {
            std::sync::Arc::make_mut(&mut r.record)
                .event
                .consent
                .ccpa_opt_out = true
        });
        assert!(sale.render(&opted).is_none());
        assert!(not_sale.render(&opted).is_some());
        let later = with(|r| {
            r.enrichment.consent.ccpa_opt_out = true;
            r.enrichment.consent.updated_ms = T + 1;
        });
        assert!(sale.render(&later).is_none());
        assert!(sale.render(&purchase()).is_some());
    }
}
