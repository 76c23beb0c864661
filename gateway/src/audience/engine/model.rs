//! The engine's decisions, without I/O: what one profile's audience state is, how an
//! event, a merge and a profile refresh change it, and which memberships change when
//! it is evaluated at a time. The driver (`super`) loads and stores states and writes
//! the changes; everything here is fed `now` and returns what happened.
//!
//! A state is stored as `[version: u8 = 1][next_due: i64 LE][postcard AudState]`.
//! `next_due` is the first instant after the last evaluation at which time alone may
//! change a membership (`i64::MAX`: never): the sweep reads those 9 bytes and decodes
//! only the profiles that are due, which is what keeps a sweep over millions of
//! profiles within seconds.

use std::borrow::Cow;

use edge_agent::model::{Event, Value};
use serde::{Deserialize, Serialize};

use crate::audience::condition::{self, Audience, ConditionError, DidClause, DidId, DidState};
use crate::config::AudienceConfig;
use crate::profiles::ProfileView;
use crate::store::StoreError;

/// Encoding version of a stored [`AudState`].
const VERSION: u8 = 1;
/// Bytes before the postcard body.
pub(super) const HEADER: usize = 9;
/// `next_due` of a profile time can never move.
pub(super) const NEVER: i64 = i64::MAX;

/// What the engine keeps per profile. Invariants: (1) `did`, `attrs` and `member` are
/// sorted by their key and hold each key once; (2) `member` holds exactly the
/// audiences the `members` table lists for the profile.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub(super) struct AudState {
    /// Per distinct `did` clause (all audiences): recent occurrence times.
    pub did: Vec<(DidId, DidState)>,
    /// The attributes (profile and computed) the conditions read, as of the profile's
    /// last event.
    pub attrs: Vec<(String, Value)>,
    /// Consent purposes granted.
    pub granted: Vec<edge_agent::model::Str>,
    pub ccpa_opt_out: bool,
    /// The profile's identifiers and devices, for change records and member lists.
    pub identities: Vec<(String, String)>,
    pub devices: Vec<String>,
    /// Audience name → when the profile entered it (gateway ms).
    pub member: Vec<(String, i64)>,
}

impl condition::ProfileFacts for AudState {
    fn attribute(&self, name: &str) -> Option<Cow<'_, Value>> {
        let i = self
            .attrs
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        self.attrs.get(i).map(|(_, v)| Cow::Borrowed(v))
    }

    fn consent_granted(&self, purpose: &str) -> bool {
        self.granted.iter().any(|g| g == purpose)
    }

    fn ccpa_opt_out(&self) -> bool {
        self.ccpa_opt_out
    }

    fn did_state(&self, clause: &DidClause) -> Option<&DidState> {
        let id = clause.id();
        let i = self.did.binary_search_by(|(k, _)| k.cmp(&id)).ok()?;
        self.did.get(i).map(|(_, s)| s)
    }
}

impl AudState {
    /// Audience names the profile is in, in name order.
    pub fn audiences(&self) -> Vec<String> {
        self.member.iter().map(|(n, _)| n.clone()).collect()
    }

    fn did_mut(&mut self, id: DidId) -> &mut DidState {
        let i = match self.did.binary_search_by(|(k, _)| k.cmp(&id)) {
            Ok(i) => i,
            Err(i) => {
                self.did.insert(i, (id, DidState::default()));
                i
            }
        };
        &mut self.did[i].1
    }
}

/// Encodes a state with its `next_due`.
pub(super) fn encode(state: &AudState, next_due: i64) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(128);
    out.push(VERSION);
    out.extend_from_slice(&next_due.to_le_bytes());
    postcard::to_io(state, &mut out)
        .map_err(|e| StoreError::Storage(format!("encoding an audience state: {e}")))?;
    Ok(out)
}

/// `next_due` of a stored state without decoding it; a short or unknown record is
/// due now (decoding it then reports what is wrong).
pub(super) fn next_due(bytes: &[u8]) -> i64 {
    match bytes.get(..HEADER) {
        Some(h) if h[0] == VERSION => {
            let mut due = [0u8; 8];
            due.copy_from_slice(&h[1..]);
            i64::from_le_bytes(due)
        }
        _ => i64::MIN,
    }
}

/// Decodes a stored state of profile `pid`.
pub(super) fn decode(pid: u64, bytes: &[u8]) -> Result<AudState, StoreError> {
    let corrupt =
        |why: String| StoreError::Corrupt(format!("audience state of profile {pid}: {why}"));
    match bytes.first() {
        Some(&VERSION) => {}
        Some(v) => return Err(corrupt(format!("unknown version {v}"))),
        None => return Err(corrupt("empty record".into())),
    }
    let body = bytes
        .get(HEADER..)
        .ok_or_else(|| corrupt("truncated header".into()))?;
    postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))
}

/// One membership change decided by [`Model::evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Change {
    pub audience: String,
    pub entered: bool,
    /// Every audience the profile is in after this change.
    pub audiences_now: Vec<String>,
}

/// The compiled audiences and what the engine derives from them.
#[derive(Debug)]
pub(super) struct Model {
    audiences: Vec<Audience>,
    /// One entry per distinct `did` clause id, sorted by id: `(audience, clause)`
    /// positions of its first occurrence.
    clauses: Vec<(DidId, usize, usize)>,
    /// Every attribute any condition reads, sorted, each once.
    attributes: Vec<String>,
    /// Identity of the definitions: when it changes, every profile is evaluated again.
    fingerprint: u64,
}

impl Model {
    /// No audiences are configured.
    pub(super) fn is_empty(&self) -> bool {
        self.audiences.is_empty()
    }

    /// Compiles `configs` (in config order).
    pub fn new(configs: &[AudienceConfig]) -> Result<Model, ConditionError> {
        let audiences = configs
            .iter()
            .map(condition::compile)
            .collect::<Result<Vec<_>, _>>()?;
        let mut clauses: Vec<(DidId, usize, usize)> = Vec::new();
        let mut attributes: Vec<String> = Vec::new();
        for (a, audience) in audiences.iter().enumerate() {
            for (c, clause) in audience.did_clauses().iter().enumerate() {
                if !clauses.iter().any(|(id, _, _)| *id == clause.id()) {
                    clauses.push((clause.id(), a, c));
                }
            }
            attributes.extend(audience.attribute_names().iter().cloned());
        }
        clauses.sort_by_key(|(id, _, _)| *id);
        attributes.sort();
        attributes.dedup();
        let mut text = String::new();
        for c in configs {
            // Debug of the parsed tree: stable for the same definitions.
            text.push_str(&format!("{}\u{0}{:?}\u{0}", c.name, c.when));
        }
        Ok(Model {
            audiences,
            clauses,
            attributes,
            fingerprint: fnv1a(&text),
        })
    }

    pub fn audiences(&self) -> &[Audience] {
        &self.audiences
    }

    pub fn audience(&self, name: &str) -> Option<&Audience> {
        self.audiences.iter().find(|a| a.name() == name)
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Whether some membership can change with time alone (the sweep has work).
    pub fn depends_on_time(&self) -> bool {
        self.audiences.iter().any(Audience::depends_on_time)
    }

    fn clause(&self, a: usize, c: usize) -> Option<&DidClause> {
        self.audiences.get(a)?.did_clauses().get(c)
    }

    /// Records `event` (event time `at_ms`) as an occurrence of every `did` clause it
    /// matches; returns whether anything was recorded.
    pub fn record(&self, state: &mut AudState, event: &Event, at_ms: i64, now: i64) -> bool {
        let mut changed = false;
        for (id, a, c) in &self.clauses {
            let Some(clause) = self.clause(*a, *c) else {
                continue;
            };
            if clause.matches(event) {
                changed |= state.did_mut(*id).record(clause, at_ms, now);
            }
        }
        changed
    }

    /// Takes the attributes, consent, identities and devices of `view` (the profile
    /// as it is now).
    pub fn refresh(&self, state: &mut AudState, view: &ProfileView) {
        state.attrs.clear();
        for name in &self.attributes {
            // Computed attributes are declared on purpose: they win over a trait of
            // the same name.
            let value = view
                .computed
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .or_else(|| {
                    let attrs = &view.attributes;
                    attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v)
                })
                .cloned();
            if let Some(v) = value {
                state.attrs.push((name.clone(), v));
            }
        }
        state.granted.clone_from(&view.consent.granted);
        state.ccpa_opt_out = view.consent.ccpa_opt_out;
        state.identities = view
            .identities
            .iter()
            .map(|(t, v)| (t.to_string(), v.to_string()))
            .collect();
        state.devices.clone_from(&view.devices);
    }

    /// Folds the `did` occurrences of a merged profile's state into `state`.
    /// Memberships are not taken over: the survivor is evaluated on its own.
    pub fn merge(&self, state: &mut AudState, other: &AudState, now: i64) {
        for (id, theirs) in &other.did {
            let Ok(i) = self.clauses.binary_search_by(|(k, _, _)| k.cmp(id)) else {
                continue;
            };
            let (_, a, c) = self.clauses[i];
            if let Some(clause) = self.clause(a, c) {
                state.did_mut(*id).merge(clause, theirs, now);
            }
        }
    }

    /// Evaluates every audience at `now`: updates `state.member` and returns the
    /// changes in config order (then leaves of audiences no longer configured), with
    /// the state's new `next_due`. Drops occurrences that left their window for good
    /// and states of clauses no longer configured.
    pub fn evaluate(&self, state: &mut AudState, now: i64) -> (Vec<Change>, i64) {
        state.did.retain_mut(|(id, s)| {
            let Ok(i) = self.clauses.binary_search_by(|(k, _, _)| k.cmp(id)) else {
                return false;
            };
            let (_, a, c) = self.clauses[i];
            if let Some(clause) = self.clause(a, c) {
                s.prune(clause, now);
            }
            !s.is_empty()
        });
        let mut changes = Vec::new();
        let mut next_due = NEVER;
        for audience in &self.audiences {
            let name = audience.name();
            let is_in = audience.evaluate(&*state, now);
            let pos = state.member.binary_search_by(|(n, _)| n.as_str().cmp(name));
            match (is_in, pos) {
                (true, Err(i)) => {
                    state.member.insert(i, (name.to_owned(), now));
                    changes.push(change(state, name, true));
                }
                (false, Ok(i)) => {
                    state.member.remove(i);
                    changes.push(change(state, name, false));
                }
                _ => {}
            }
            if audience.depends_on_time() {
                if let Some(at) = audience.next_change_after(&*state, now) {
                    next_due = next_due.min(at);
                }
            }
        }
        let gone: Vec<String> = state
            .member
            .iter()
            .filter(|(n, _)| self.audience(n).is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            state.member.retain(|(n, _)| *n != name);
            changes.push(change(state, &name, false));
        }
        (changes, next_due)
    }

    /// Leaves every audience `state` is in (erasure, or a profile merged away).
    pub fn leave_all(state: &mut AudState) -> Vec<Change> {
        let mut changes = Vec::with_capacity(state.member.len());
        while let Some((name, _)) = state.member.pop() {
            changes.push(change(state, &name, false));
        }
        changes
    }
}

fn change(state: &AudState, audience: &str, entered: bool) -> Change {
    Change {
        audience: audience.to_owned(),
        entered,
        audiences_now: state.audiences(),
    }
}

/// FNV-1a, 64 bits: stable across builds, unlike `DefaultHasher`.
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{EventKind, Source};

    const H: i64 = 3_600_000;

    fn model(toml_text: &str) -> Model {
        let config: crate::config::GatewayConfig = toml::from_str(toml_text).unwrap();
        Model::new(&config.audiences).unwrap()
    }

    fn track(name: &str) -> Event {
        let mut e = Event::new(EventKind::Track, Source::Segment, 0);
        e.name = Some(name.into());
        e
    }

    const SENT_NOT_OPENED: &str = r#"
[[audiences]]
name = "sent_not_opened"
when = { all = [
  { did = "Push Sent", within = "7d", before = "1h" },
  { not = { did = "Push Opened", within = "7d" } },
] }

[[audiences]]
name = "plan_pro"
when = { attribute = "plan", op = "eq", value = "pro" }
"#;

    #[test]
    fn a_windowed_audience_is_entered_when_time_passes_and_left_on_a_later_event() {
        let m = model(SENT_NOT_OPENED);
        let t0 = 1_000 * H;
        let mut s = AudState::default();
        assert!(m.record(&mut s, &track("Push Sent"), t0, t0));
        let (changes, due) = m.evaluate(&mut s, t0);
        assert!(changes.is_empty());
        assert_eq!(due, t0 + H, "due when the send is an hour old");
        let (changes, _) = m.evaluate(&mut s, t0 + 2 * H);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].entered);
        assert_eq!(changes[0].audiences_now, vec!["sent_not_opened".to_owned()]);
        assert!(m.record(&mut s, &track("Push Opened"), t0 + 2 * H, t0 + 2 * H));
        let (changes, _) = m.evaluate(&mut s, t0 + 2 * H);
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].entered);
        assert!(changes[0].audiences_now.is_empty());
    }

    #[test]
    fn refresh_snapshots_only_the_attributes_conditions_read() {
        let m = model(SENT_NOT_OPENED);
        let mut s = AudState::default();
        let view = ProfileView {
            attributes: vec![
                ("plan".into(), Value::from("pro")),
                ("name".into(), Value::from("Ada")),
            ],
            identities: vec![("customer_id".into(), "ada".into())],
            ..ProfileView::default()
        };
        m.refresh(&mut s, &view);
        assert_eq!(s.attrs, vec![("plan".to_owned(), Value::from("pro"))]);
        let (changes, due) = m.evaluate(&mut s, 0);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].audience, "plan_pro");
        assert_eq!(due, NEVER);
    }

    #[test]
    fn states_round_trip_and_bad_bytes_are_errors_not_panics() {
        let m = model(SENT_NOT_OPENED);
        let mut s = AudState::default();
        m.record(&mut s, &track("Push Sent"), 5, 5);
        s.member.push(("plan_pro".into(), 7));
        let bytes = encode(&s, 42).unwrap();
        assert_eq!(next_due(&bytes), 42);
        assert_eq!(decode(1, &bytes).unwrap(), s);
        assert!(decode(1, &[]).is_err());
        assert!(decode(1, &[9, 0, 0]).is_err());
        assert!(decode(1, &bytes[..HEADER + 1]).is_err());
        assert_eq!(next_due(&[1, 2]), i64::MIN);
    }

    #[test]
    fn merge_folds_occurrences_and_unconfigured_audiences_are_left() {
        let m = model(SENT_NOT_OPENED);
        let mut a = AudState::default();
        let mut b = AudState::default();
        m.record(&mut b, &track("Push Sent"), 10, 10);
        m.merge(&mut a, &b, 10);
        assert_eq!(a.did, b.did);
        a.member.push(("retired".into(), 1));
        let (changes, _) = m.evaluate(&mut a, 10);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].audience, "retired");
        assert!(!changes[0].entered);
        assert!(a.member.is_empty());
    }
}
