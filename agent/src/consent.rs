//! Consent: the purposes a user granted, and whether an event may be kept.
//!
//! Pure decisions, no I/O. The intake keeps a [`ConsentBook`] in memory; the spool
//! persists each subject's state in the same commit as the events it governs, and
//! purges queued events when a purpose is revoked.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::config::{ConsentConfig, UnknownConsent};
use crate::model::{ConsentSnapshot, Event, EventKind, Map, Value};

/// Consent as a request stated it (Segment `categoryPreferences`, mParticle
/// `consent_state`, or `PUT /v1/consent`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentUpdate {
    /// Purpose name as sent (any case or alias) → granted.
    pub purposes: Vec<(String, bool)>,
    /// CCPA: `Some(true)` = opted out of sale.
    pub ccpa_opt_out: Option<bool>,
    /// When the user made this choice (ms since the epoch); older updates lose.
    pub at_ms: i64,
}

/// What one subject (user, else anonymous id, else device) answered so far.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SubjectConsent {
    /// Declared purpose name → granted.
    pub purposes: Vec<(String, bool)>,
    pub ccpa_opt_out: bool,
    pub updated_ms: i64,
}

impl SubjectConsent {
    fn answer(&self, purpose: &str) -> Option<bool> {
        self.purposes
            .iter()
            .find(|(p, _)| p == purpose)
            .map(|(_, g)| *g)
    }
}

/// A change to a subject's consent, to persist and forward.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentChange {
    pub subject: String,
    pub state: SubjectConsent,
    /// Purposes granted before and denied now: queued events needing them are purged.
    pub revoked: Vec<String>,
}

/// Why an event may not be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub purpose: String,
}

/// The configured purposes and rules.
#[derive(Debug, Clone)]
pub struct ConsentPolicy {
    config: ConsentConfig,
}

impl ConsentPolicy {
    pub fn new(config: ConsentConfig) -> Self {
        Self { config }
    }

    /// The declared name of a purpose given by name or alias, in any case.
    fn canonical(&self, name: &str) -> Option<&str> {
        self.config
            .purposes
            .iter()
            .find(|p| {
                p.name.eq_ignore_ascii_case(name)
                    || p.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
            .map(|p| p.name.as_str())
    }

    /// Purposes an event of this kind and name needs.
    pub fn required(&self, kind: &EventKind, name: Option<&str>) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if *kind == EventKind::Consent {
            // Consent changes must always travel: they are how revocation propagates.
            return out;
        }
        for rule in &self.config.rules {
            let type_ok = rule.types.is_empty() || rule.types.iter().any(|t| t == kind.as_str());
            let name_ok =
                rule.names.is_empty() || name.is_some_and(|n| rule.names.iter().any(|r| r == n));
            if type_ok && name_ok {
                for p in &rule.purposes {
                    if !out.contains(&p.as_str()) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    /// Whether `purpose` is granted for a subject with `state`.
    pub fn is_granted(&self, state: Option<&SubjectConsent>, purpose: &str) -> bool {
        let sale = self
            .config
            .purposes
            .iter()
            .any(|p| p.name == purpose && p.sale);
        if sale && state.is_some_and(|s| s.ccpa_opt_out) {
            return false;
        }
        match state.and_then(|s| s.answer(purpose)) {
            Some(granted) => granted,
            None => self.config.unknown == UnknownConsent::Grant,
        }
    }

    /// Decides whether `event` may be kept under `state`.
    pub fn check(&self, state: Option<&SubjectConsent>, event: &Event) -> Result<(), Denied> {
        for purpose in self.required(&event.kind, event.name.as_deref()) {
            if !self.is_granted(state, purpose) {
                return Err(Denied {
                    purpose: purpose.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Whether a queued event must go when `revoked` purposes were withdrawn.
    pub fn needs_any(&self, event: &Event, revoked: &[String]) -> bool {
        self.required(&event.kind, event.name.as_deref())
            .iter()
            .any(|p| revoked.iter().any(|r| r == p))
    }

    /// The consent recorded on each kept event.
    pub fn snapshot(&self, state: Option<&SubjectConsent>) -> ConsentSnapshot {
        ConsentSnapshot {
            granted: self
                .config
                .purposes
                .iter()
                .filter(|p| self.is_granted(state, &p.name))
                .map(|p| p.name.as_str().into())
                .collect(),
            ccpa_opt_out: state.is_some_and(|s| s.ccpa_opt_out),
        }
    }
}

/// Every subject's consent, in memory; loaded from and persisted to the spool.
#[derive(Debug)]
pub struct ConsentBook {
    policy: ConsentPolicy,
    subjects: HashMap<String, SubjectConsent>,
}

impl ConsentBook {
    pub fn new(policy: ConsentPolicy, subjects: HashMap<String, SubjectConsent>) -> Self {
        Self { policy, subjects }
    }

    pub fn policy(&self) -> &ConsentPolicy {
        &self.policy
    }

    pub fn get(&self, subject: &str) -> Option<&SubjectConsent> {
        self.subjects.get(subject)
    }

    /// Forgets what `subject` answered (its data was erased upstream); true when there
    /// was something to forget. Its next events meet the configured default again.
    pub fn forget(&mut self, subject: &str) -> bool {
        self.subjects.remove(subject).is_some()
    }

    /// Applies an update for `subject`; returns the change when anything changed.
    /// Updates older than what is known are ignored (offline events arrive late).
    pub fn apply(&mut self, subject: &str, update: &ConsentUpdate) -> Option<ConsentChange> {
        let before = self.subjects.get(subject).cloned();
        if before.as_ref().is_some_and(|b| update.at_ms < b.updated_ms) {
            return None;
        }
        let mut after = before.clone().unwrap_or_default();
        for (name, granted) in &update.purposes {
            let Some(purpose) = self.policy.canonical(name) else {
                continue;
            };
            match after.purposes.iter_mut().find(|(p, _)| p == purpose) {
                Some(slot) => slot.1 = *granted,
                None => after.purposes.push((purpose.to_owned(), *granted)),
            }
        }
        if let Some(opt_out) = update.ccpa_opt_out {
            after.ccpa_opt_out = opt_out;
        }
        let same_answers = before
            .as_ref()
            .is_some_and(|b| b.purposes == after.purposes && b.ccpa_opt_out == after.ccpa_opt_out);
        if same_answers {
            return None;
        }
        after.updated_ms = update.at_ms;
        let revoked = self
            .policy
            .config
            .purposes
            .iter()
            .filter(|p| {
                self.policy.is_granted(before.as_ref(), &p.name)
                    && !self.policy.is_granted(Some(&after), &p.name)
            })
            .map(|p| p.name.clone())
            .collect();
        self.subjects.insert(subject.to_owned(), after.clone());
        Some(ConsentChange {
            subject: subject.to_owned(),
            state: after,
            revoked,
        })
    }
}

/// The properties of the `consent` event that carries a change upstream.
pub fn change_properties(change: &ConsentChange) -> Map {
    let mut purposes = Map::new();
    for (p, granted) in &change.state.purposes {
        purposes.insert(p.clone(), Value::Bool(*granted));
    }
    let mut props = Map::new();
    props.insert("purposes", Value::Object(purposes));
    props.insert("ccpa_opt_out", Value::Bool(change.state.ccpa_opt_out));
    props.insert(
        "revoked",
        Value::Array(
            change
                .revoked
                .iter()
                .map(|r| Value::from(r.as_str()))
                .collect(),
        ),
    );
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::model::Source;
    use std::path::Path;

    fn policy(unknown: &str) -> ConsentPolicy {
        let text = format!(
            r#"
            [consent]
            unknown = "{unknown}"
            purposes = [{{ name = "analytics", aliases = ["C0002"] }}, {{ name = "advertising", sale = true }}]
            [[consent.rules]]
            types = ["track", "screen"]
            purposes = ["analytics"]
            [[consent.rules]]
            names = ["Order Completed"]
            purposes = ["advertising"]
            "#
        );
        ConsentPolicy::new(AgentConfig::parse(&text, Path::new("t")).unwrap().consent)
    }

    fn track(name: &str) -> Event {
        let mut e = Event::new(EventKind::Track, Source::Segment, 0);
        e.name = Some(name.into());
        e
    }

    fn update(purposes: &[(&str, bool)], at_ms: i64) -> ConsentUpdate {
        ConsentUpdate {
            purposes: purposes.iter().map(|(p, g)| (p.to_string(), *g)).collect(),
            ccpa_opt_out: None,
            at_ms,
        }
    }

    #[test]
    fn rules_union_their_purposes() {
        let p = policy("grant");
        assert_eq!(
            p.required(&EventKind::Track, Some("Order Completed")),
            ["analytics", "advertising"]
        );
        assert!(p.required(&EventKind::Identify, None).is_empty());
    }

    #[test]
    fn unknown_consent_follows_the_configured_default() {
        assert!(policy("grant").check(None, &track("Play")).is_ok());
        assert_eq!(
            policy("deny").check(None, &track("Play")),
            Err(Denied {
                purpose: "analytics".into()
            })
        );
    }

    #[test]
    fn aliases_and_case_map_to_declared_purposes() {
        let mut book = ConsentBook::new(policy("deny"), HashMap::new());
        book.apply("u", &update(&[("c0002", true)], 1)).unwrap();
        assert!(book.policy().check(book.get("u"), &track("Play")).is_ok());
    }

    #[test]
    fn revoking_reports_the_withdrawn_purpose() {
        let mut book = ConsentBook::new(policy("deny"), HashMap::new());
        book.apply("u", &update(&[("Analytics", true)], 1));
        let change = book
            .apply("u", &update(&[("analytics", false)], 2))
            .unwrap();
        assert_eq!(change.revoked, ["analytics"]);
        assert!(book.policy().check(book.get("u"), &track("Play")).is_err());
    }

    #[test]
    fn stale_or_identical_updates_change_nothing() {
        let mut book = ConsentBook::new(policy("grant"), HashMap::new());
        assert!(book
            .apply("u", &update(&[("analytics", false)], 10))
            .is_some());
        assert!(book
            .apply("u", &update(&[("analytics", true)], 5))
            .is_none());
        assert!(book
            .apply("u", &update(&[("analytics", false)], 20))
            .is_none());
    }

    #[test]
    fn a_forgotten_subject_meets_the_default_again() {
        let mut book = ConsentBook::new(policy("grant"), HashMap::new());
        book.apply("u", &update(&[("analytics", false)], 10));
        assert!(book.policy().check(book.get("u"), &track("Play")).is_err());
        assert!(book.forget("u"));
        assert!(!book.forget("u"));
        assert!(book.policy().check(book.get("u"), &track("Play")).is_ok());
    }

    #[test]
    fn ccpa_opt_out_denies_sale_purposes_only() {
        let mut book = ConsentBook::new(policy("grant"), HashMap::new());
        let change = book
            .apply(
                "u",
                &ConsentUpdate {
                    purposes: vec![],
                    ccpa_opt_out: Some(true),
                    at_ms: 1,
                },
            )
            .unwrap();
        assert_eq!(change.revoked, ["advertising"]);
        assert!(book.policy().check(book.get("u"), &track("Play")).is_ok());
        assert!(book
            .policy()
            .check(book.get("u"), &track("Order Completed"))
            .is_err());
    }
}
