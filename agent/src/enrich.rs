//! Enrichment: what the agent knows about a device and its user, added to events.
//!
//! Remembers per device the anonymous id, the last user id and the current session,
//! so later calls (and restarts: the spool persists [`DeviceState`]) carry them. Pure
//! state machine fed with the current time; no I/O.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{valid_device_id, EnrichConfig};
use crate::ingest::Incoming;
use crate::model::{DeviceId, Map, Value};

/// Most devices remembered at once (fleet mode); the least recently seen is forgotten.
pub const MAX_DEVICES: usize = 10_000;

/// What the agent remembers about one device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceState {
    pub anonymous_id: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub last_seen_ms: i64,
}

/// Adds device, user, session and context data to incoming events.
#[derive(Debug)]
pub struct Enricher {
    own_device: DeviceId,
    fleet: bool,
    session_timeout_ms: i64,
    hash_keys: Vec<String>,
    context: Map,
    devices: HashMap<DeviceId, DeviceState>,
    dirty: Vec<DeviceId>,
}

impl Enricher {
    pub fn new(
        own_device: DeviceId,
        fleet: bool,
        config: &EnrichConfig,
        devices: HashMap<DeviceId, DeviceState>,
    ) -> Self {
        Self {
            own_device,
            fleet,
            session_timeout_ms: duration_ms(config.session_timeout),
            hash_keys: config.hash_pii.clone(),
            context: config.context.clone(),
            devices,
            dirty: Vec::new(),
        }
    }

    pub fn own_device(&self) -> &DeviceId {
        &self.own_device
    }

    /// What is remembered about `device` (in fleet mode; otherwise, or for `None`,
    /// about this agent's own device).
    pub fn state_of(&self, device: Option<&str>) -> Option<&DeviceState> {
        match device {
            Some(d) if self.fleet => self.devices.get(&DeviceId(d.to_owned())),
            _ => self.devices.get(&self.own_device),
        }
    }

    /// Fills in identities, session and context on `incoming.event`.
    pub fn enrich(&mut self, incoming: &mut Incoming, now_ms: i64) {
        let device = match &incoming.device_hint {
            Some(hint) if self.fleet && valid_device_id(hint) => DeviceId(hint.clone()),
            _ => self.own_device.clone(),
        };
        self.make_room(&device);
        let state = self.devices.entry(device.clone()).or_default();
        let e = &mut incoming.event;
        e.identities.device_id = device.clone();

        match &e.identities.anonymous_id {
            Some(anon) => state.anonymous_id = Some(anon.to_string()),
            None => {
                let anon = state
                    .anonymous_id
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
                e.identities.anonymous_id = Some(anon.as_str().into());
            }
        }
        match &e.identities.user_id {
            Some(user) => state.user_id = Some(user.to_string()),
            None => e.identities.user_id = state.user_id.as_deref().map(Into::into),
        }
        if e.identities.session_id.is_none() {
            let expired = now_ms.saturating_sub(state.last_seen_ms) > self.session_timeout_ms;
            if expired || state.session_id.is_none() {
                state.session_id = Some(now_ms.to_string());
            }
            e.identities.session_id = state.session_id.as_deref().map(Into::into);
        }
        state.last_seen_ms = now_ms;
        if !self.dirty.contains(&device) {
            self.dirty.push(device);
        }

        e.context.merge_defaults(&self.context);
        for key in &self.hash_keys {
            hash_in(&mut e.traits, key);
            if let Some(Value::Object(traits)) = e.context.get_mut("traits") {
                hash_in(traits, key);
            }
            for (kind, value) in &mut e.identities.other {
                if kind == key {
                    *value = sha256_hex(value).into();
                }
            }
        }
    }

    /// Forgets `id` wherever a device remembers it as its user or anonymous id (its
    /// data was erased upstream): that device starts over with no user, a new
    /// anonymous id and a new session, so its next events do not carry the erased
    /// identity. Returns how many devices changed; they are persisted with the next
    /// [`Enricher::take_dirty`].
    pub fn forget_user(&mut self, id: &str) -> usize {
        let mut changed = 0;
        for (device, state) in &mut self.devices {
            if state.user_id.as_deref() == Some(id) || state.anonymous_id.as_deref() == Some(id) {
                *state = DeviceState {
                    last_seen_ms: state.last_seen_ms,
                    ..DeviceState::default()
                };
                if !self.dirty.contains(device) {
                    self.dirty.push(device.clone());
                }
                changed += 1;
            }
        }
        changed
    }

    /// Device states changed since the last call, to persist with the next commit.
    pub fn take_dirty(&mut self) -> Vec<(DeviceId, DeviceState)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|d| self.devices.get(&d).cloned().map(|s| (d, s)))
            .collect()
    }

    fn make_room(&mut self, incoming: &DeviceId) {
        if self.devices.len() < MAX_DEVICES || self.devices.contains_key(incoming) {
            return;
        }
        let oldest = self
            .devices
            .iter()
            .filter(|(d, _)| **d != self.own_device)
            .min_by_key(|(_, s)| s.last_seen_ms)
            .map(|(d, _)| d.clone());
        if let Some(d) = oldest {
            self.devices.remove(&d);
        }
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn hash_in(map: &mut Map, key: &str) {
    if let Some(Value::String(s)) = map.get_mut(key) {
        *s = sha256_hex(s).into();
    }
}

/// SHA-256 of the trimmed, lower-cased value, as hex (how ad platforms match hashes).
/// A value that already is a SHA-256 hex digest is kept, so hashing is idempotent.
pub fn sha256_hex(value: &str) -> String {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return value.to_owned();
    }
    let digest = Sha256::digest(value.trim().to_lowercase().as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, EventKind, Source};

    fn enricher(fleet: bool) -> Enricher {
        let config = EnrichConfig {
            session_timeout: Duration::from_secs(60),
            hash_pii: vec!["email".into()],
            context: [("app".to_owned(), Value::from("tv"))]
                .into_iter()
                .collect(),
        };
        Enricher::new(DeviceId("me".into()), fleet, &config, HashMap::new())
    }

    fn incoming(user: Option<&str>, hint: Option<&str>) -> Incoming {
        let mut event = Event::new(EventKind::Track, Source::Segment, 0);
        event.identities.user_id = user.map(Into::into);
        Incoming {
            event,
            consent: None,
            device_hint: hint.map(str::to_owned),
        }
    }

    #[test]
    fn user_and_anonymous_id_carry_over_to_later_events() {
        let mut en = enricher(false);
        let mut first = incoming(Some("u1"), None);
        en.enrich(&mut first, 0);
        let mut later = incoming(None, None);
        en.enrich(&mut later, 1000);
        assert_eq!(later.event.identities.user_id.as_deref(), Some("u1"));
        assert_eq!(
            later.event.identities.anonymous_id,
            first.event.identities.anonymous_id
        );
        assert_eq!(later.event.context.get_str("app"), Some("tv"));
    }

    #[test]
    fn a_forgotten_user_is_not_carried_over_and_gets_a_new_anonymous_id() {
        let mut en = enricher(false);
        let mut first = incoming(Some("u1"), None);
        en.enrich(&mut first, 0);
        en.take_dirty();
        assert_eq!(en.forget_user("someone-else"), 0);
        assert_eq!(en.forget_user("u1"), 1);
        let dirty = en.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].1.user_id, None);
        let mut later = incoming(None, None);
        en.enrich(&mut later, 1000);
        assert_eq!(later.event.identities.user_id, None);
        assert!(later.event.identities.anonymous_id.is_some());
        assert_ne!(
            later.event.identities.anonymous_id,
            first.event.identities.anonymous_id
        );
    }

    #[test]
    fn session_rolls_over_after_inactivity() {
        let mut en = enricher(false);
        let mut a = incoming(None, None);
        en.enrich(&mut a, 0);
        let mut b = incoming(None, None);
        en.enrich(&mut b, 59_000);
        let mut c = incoming(None, None);
        en.enrich(&mut c, 59_000 + 61_000);
        assert_eq!(a.event.identities.session_id, b.event.identities.session_id);
        assert_ne!(b.event.identities.session_id, c.event.identities.session_id);
    }

    #[test]
    fn fleet_mode_keeps_the_event_device_and_single_mode_stamps_its_own() {
        let mut fleet = enricher(true);
        let mut e = incoming(None, Some("tv-7"));
        fleet.enrich(&mut e, 0);
        assert_eq!(e.event.identities.device_id.0, "tv-7");
        let mut single = enricher(false);
        let mut e = incoming(None, Some("tv-7"));
        single.enrich(&mut e, 0);
        assert_eq!(e.event.identities.device_id.0, "me");
    }

    #[test]
    fn configured_pii_is_hashed_once() {
        let mut en = enricher(false);
        let mut e = incoming(None, None);
        e.event
            .traits
            .insert("email", Value::from(" Ada@Example.com"));
        en.enrich(&mut e, 0);
        let hashed = e.event.traits.get_str("email").unwrap().to_owned();
        assert_eq!(hashed, sha256_hex("ada@example.com"));
        assert_eq!(sha256_hex(&hashed), hashed);
    }
}
