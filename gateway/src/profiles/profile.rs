//! The stored profile: what one event does to it, how two profiles merge, and what
//! is shown of it (admin view, per-event enrichment). Pure: no storage here.

use edge_agent::model::{EventKind, Str, Value};
use serde::{Deserialize, Serialize};

use super::computed::{Spec, State};
use super::{Enrichment, ProfileConsent, ProfileView};
use crate::store::InboxRecord;

/// Devices kept per profile (the most recent).
pub const MAX_DEVICES: usize = 32;
/// Attributes kept per profile; traits with further new names are not kept, so one
/// app sending ever-new trait names cannot grow a profile without bound.
pub const MAX_ATTRIBUTES: usize = 256;

/// One attribute with the event time that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    pub name: Str,
    pub value: Value,
    pub updated_ms: i64,
}

/// A profile as stored (postcard; field order is the encoding).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Profile {
    pub id: u64,
    /// Identifiers `(type, value)` linked to this profile. Invariants:
    /// 1. the `ids` table maps each of them to this profile, and nothing else to it;
    /// 2. at most one value per unique type.
    pub identities: Vec<(Str, Str)>,
    pub attributes: Vec<Attribute>,
    /// Per computed attribute name, its state.
    pub computed: Vec<(String, State)>,
    pub consent: ProfileConsent,
    /// Sender devices (agent ids), oldest first.
    pub devices: Vec<String>,
    /// Every profile merged into this one, transitively.
    pub merged_from: Vec<u64>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub events: u64,
}

impl Profile {
    pub fn new(id: u64, now_ms: i64) -> Self {
        Profile {
            id,
            created_ms: now_ms,
            updated_ms: now_ms,
            ..Profile::default()
        }
    }

    /// The value of (unique) type `ty` this profile holds, if any.
    pub fn value_of(&self, ty: &str) -> Option<&str> {
        self.identities
            .iter()
            .find(|(t, _)| t == ty)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_identity(&self, ty: &str, value: &str) -> bool {
        self.identities.iter().any(|(t, v)| t == ty && v == value)
    }

    /// Counts one resolved event: devices, traits, consent, computed attributes.
    pub fn apply_event(&mut self, record: &InboxRecord, specs: &[Spec], now: i64) {
        let event = &record.event;
        let at_ms = record.corrected_timestamp_ms;
        self.events = self.events.saturating_add(1);
        self.updated_ms = self.updated_ms.max(record.received_ms);
        self.add_device(&record.sender.0);
        for (name, value) in event.traits.iter() {
            self.set_attribute(name, value, at_ms);
        }
        let consent = &event.consent;
        let states_consent =
            event.kind == EventKind::Consent || !consent.granted.is_empty() || consent.ccpa_opt_out;
        if states_consent && at_ms >= self.consent.updated_ms {
            self.state_consent(consent, at_ms);
        }
        for spec in specs {
            if !spec.matches(event) {
                continue;
            }
            let state = self.state_mut(spec);
            spec.update(state, event, at_ms, now);
        }
    }

    /// The user's consent as an event stated it at `at_ms` (not older than ours): a
    /// purpose granted before and not now is denied.
    fn state_consent(&mut self, stated: &edge_agent::model::ConsentSnapshot, at_ms: i64) {
        if self.consent.granted == stated.granted
            && self.consent.ccpa_opt_out == stated.ccpa_opt_out
        {
            // The same consent again (most events carry the user's unchanged
            // snapshot): what was denied stays denied; only the date moves.
            self.consent.updated_ms = at_ms;
            return;
        }
        let mut denied: Vec<Str> = self
            .consent
            .granted
            .iter()
            .chain(&self.consent.denied)
            .filter(|p| !stated.granted.contains(p))
            .cloned()
            .collect();
        denied.sort();
        denied.dedup();
        self.consent = ProfileConsent {
            granted: stated.granted.clone(),
            denied,
            ccpa_opt_out: stated.ccpa_opt_out,
            updated_ms: at_ms,
        };
    }

    fn state_mut(&mut self, spec: &Spec) -> &mut State {
        let at = match self.computed.iter().position(|(n, _)| *n == spec.name) {
            Some(at) => {
                if !spec.fits(&self.computed[at].1) {
                    self.computed[at].1 = spec.empty();
                }
                at
            }
            None => {
                self.computed.push((spec.name.clone(), spec.empty()));
                self.computed.len() - 1
            }
        };
        &mut self.computed[at].1
    }

    fn set_attribute(&mut self, name: &str, value: &Value, at_ms: i64) {
        if let Some(a) = self.attributes.iter_mut().find(|a| a.name == name) {
            if at_ms >= a.updated_ms {
                a.value = value.clone();
                a.updated_ms = at_ms;
            }
        } else if self.attributes.len() < MAX_ATTRIBUTES {
            self.attributes.push(Attribute {
                name: name.into(),
                value: value.clone(),
                updated_ms: at_ms,
            });
        }
    }

    fn add_device(&mut self, device: &str) {
        if device.is_empty() {
            return;
        }
        if let Some(at) = self.devices.iter().position(|d| d == device) {
            // Most recent last, so the cap drops the device not seen for longest.
            if at + 1 != self.devices.len() {
                let d = self.devices.remove(at);
                self.devices.push(d);
            }
            return;
        }
        if self.devices.len() >= MAX_DEVICES {
            self.devices.remove(0);
        }
        self.devices.push(device.to_owned());
    }

    /// Folds `other` into `self` (the survivor). Returns the identifiers of `other`
    /// that did not fit under `max_identities`: the caller unlinks them.
    pub fn merge(
        &mut self,
        other: Profile,
        specs: &[Spec],
        max_identities: usize,
        now: i64,
    ) -> Vec<(Str, Str)> {
        let mut dropped = Vec::new();
        for (t, v) in other.identities {
            if self.has_identity(&t, &v) {
                continue;
            }
            if self.identities.len() < max_identities {
                self.identities.push((t, v));
            } else {
                dropped.push((t, v));
            }
        }
        for a in other.attributes {
            self.set_attribute(&a.name, &a.value, a.updated_ms);
        }
        for (name, state) in other.computed {
            let Some(spec) = specs.iter().find(|s| s.name == name) else {
                continue;
            };
            if !spec.fits(&state) {
                continue;
            }
            let mine = self.state_mut(spec);
            spec.merge(mine, state, now);
        }
        if other.consent.updated_ms > self.consent.updated_ms {
            self.consent = other.consent;
        }
        for d in other.devices {
            if !self.devices.contains(&d) {
                if self.devices.len() >= MAX_DEVICES {
                    self.devices.remove(0);
                }
                self.devices.push(d);
            }
        }
        for id in std::iter::once(other.id).chain(other.merged_from) {
            if !self.merged_from.contains(&id) {
                self.merged_from.push(id);
            }
        }
        self.created_ms = self.created_ms.min(other.created_ms);
        self.updated_ms = self.updated_ms.max(other.updated_ms);
        self.events = self.events.saturating_add(other.events);
        dropped
    }

    fn computed_value(&self, spec: &Spec, now: i64) -> Value {
        let state = self
            .computed
            .iter()
            .find(|(n, _)| *n == spec.name)
            .map(|(_, s)| s);
        spec.current(state, now)
    }

    /// What destinations get with an event of this profile: identities, the
    /// attributes named in `allow` (computed ones as of `now`), consent.
    pub fn enrichment(&self, allow: &[String], specs: &[Spec], now: i64) -> Enrichment {
        let mut attributes = Vec::new();
        for name in allow {
            if let Some(spec) = specs.iter().find(|s| s.name == *name) {
                attributes.push((name.as_str().into(), self.computed_value(spec, now)));
            } else if let Some(a) = self.attributes.iter().find(|a| a.name == *name) {
                attributes.push((name.as_str().into(), a.value.clone()));
            }
        }
        Enrichment {
            profile_id: self.id,
            identities: self.identities.clone(),
            attributes,
            consent: self.consent.clone(),
        }
    }

    pub fn view(&self, specs: &[Spec], now: i64) -> ProfileView {
        ProfileView {
            id: self.id,
            identities: self.identities.clone(),
            attributes: self
                .attributes
                .iter()
                .map(|a| (a.name.clone(), a.value.clone()))
                .collect(),
            computed: specs
                .iter()
                .map(|s| (s.name.clone(), self.computed_value(s, now)))
                .collect(),
            consent: self.consent.clone(),
            devices: self.devices.clone(),
            merged_from: self.merged_from.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            events: self.events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{ConsentSnapshot, DeviceId, Event, Source};

    fn stating(granted: &[&str], ccpa: bool, at: i64) -> InboxRecord {
        let mut event = Event::new(EventKind::Track, Source::Segment, at);
        event.consent = ConsentSnapshot {
            granted: granted.iter().map(|p| (*p).into()).collect(),
            ccpa_opt_out: ccpa,
        };
        InboxRecord {
            sender: DeviceId("d".into()),
            received_ms: at,
            corrected_timestamp_ms: at,
            event,
        }
    }

    fn names(list: &[Str]) -> Vec<&str> {
        list.iter().map(Str::as_str).collect()
    }

    fn consent(p: &Profile) -> (Vec<&str>, Vec<&str>, bool, i64) {
        let c = &p.consent;
        (
            names(&c.granted),
            names(&c.denied),
            c.ccpa_opt_out,
            c.updated_ms,
        )
    }

    #[test]
    fn consent_follows_what_events_state_and_a_withdrawn_purpose_stays_denied() {
        let mut p = Profile::new(1, 0);
        p.apply_event(&stating(&["analytics", "ads"], false, 10), &[], 10);
        assert_eq!(consent(&p), (vec!["analytics", "ads"], vec![], false, 10));
        // Restated unchanged: only the date moves.
        p.apply_event(&stating(&["analytics", "ads"], false, 20), &[], 20);
        assert_eq!(consent(&p), (vec!["analytics", "ads"], vec![], false, 20));
        p.apply_event(&stating(&["analytics"], false, 30), &[], 30);
        assert_eq!(consent(&p), (vec!["analytics"], vec!["ads"], false, 30));
        p.apply_event(&stating(&["analytics"], false, 40), &[], 40);
        assert_eq!(consent(&p), (vec!["analytics"], vec!["ads"], false, 40));
        // Same purposes, a CCPA opt-out: a change.
        p.apply_event(&stating(&["analytics"], true, 50), &[], 50);
        assert_eq!(consent(&p), (vec!["analytics"], vec!["ads"], true, 50));
        // An older statement changes nothing.
        p.apply_event(&stating(&["ads"], false, 45), &[], 45);
        assert_eq!(consent(&p), (vec!["analytics"], vec!["ads"], true, 50));
        p.apply_event(&stating(&["ads"], false, 60), &[], 60);
        assert_eq!(consent(&p), (vec!["ads"], vec!["analytics"], false, 60));
    }
}
