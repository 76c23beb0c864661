//! Turning a page of the membership change log into audience API calls. Pure.
//!
//! Changes are grouped per audience, in log order, into calls of at most `batch_size`
//! distinct profiles. Within one call a profile appears once, in its last state: an
//! add then a remove of the same profile is a remove (and a remove then an add is an
//! add), so a call says where each member stands after it, and calls of one audience
//! must be sent in order. Calls of different audiences are independent.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::member::Allowlist;
use crate::audience::MembershipChange;

/// One add/remove call for one audience.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub audience: String,
    /// Lowest and highest change-log positions the call covers.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Profiles that are members after the call: `(profile id, identities)`.
    pub add: Vec<(u64, Vec<(String, String)>)>,
    /// Profiles that are not.
    pub remove: Vec<(u64, Vec<(String, String)>)>,
}

impl Call {
    /// Profiles in the call.
    pub fn len(&self) -> usize {
        self.add.len() + self.remove.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The request body: `{"audience", "add": [..], "remove": [..], "sentAt"}`.
    pub fn body(&self, allow: &Allowlist, sent_at_ms: i64) -> Value {
        let members = |list: &[(u64, Vec<(String, String)>)]| {
            list.iter()
                .map(|(p, ids)| allow.api_member(*p, ids))
                .collect::<Vec<_>>()
        };
        json!({
            "audience": self.audience,
            "add": members(&self.add),
            "remove": members(&self.remove),
            "sentAt": edge_agent::ingest::format_timestamp(sent_at_ms),
        })
    }

    /// The `Idempotency-Key`: a hash of the destination and the positions covered, so
    /// the same call sent again after a crash carries the same key.
    pub fn idempotency_key(&self, destination: &str) -> edge_agent::model::EventId {
        edge_agent::model::EventId::from_message_id(&format!(
            "audience-call/{destination}/{}/{}-{}",
            self.audience, self.first_seq, self.last_seq
        ))
    }
}

/// A call being filled.
struct Open<'a> {
    first_seq: u64,
    last_seq: u64,
    /// Last change per profile, in order of each profile's first change.
    latest: Vec<&'a MembershipChange>,
    index: HashMap<u64, usize>,
}

impl<'a> Open<'a> {
    fn new(first: &'a MembershipChange) -> Self {
        Open {
            first_seq: first.seq,
            last_seq: first.seq,
            latest: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn close(self, audience: &str) -> Call {
        let mut call = Call {
            audience: audience.to_owned(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            add: Vec::new(),
            remove: Vec::new(),
        };
        for c in self.latest {
            let entry = (c.profile_id, c.identities.clone());
            if c.entered {
                call.add.push(entry);
            } else {
                call.remove.push(entry);
            }
        }
        call
    }
}

/// The calls for `changes` (in log order), keeping only audiences `keep` accepts;
/// calls are grouped per audience (in order of each audience's first change) and,
/// within an audience, in log order.
pub fn plan(
    changes: &[MembershipChange],
    keep: impl Fn(&str) -> bool,
    batch_size: usize,
) -> Vec<Call> {
    let batch_size = batch_size.max(1);
    // Per audience: the closed calls and the open one, in order of first appearance.
    let mut audiences: Vec<(&str, Vec<Call>, Option<Open<'_>>)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    for change in changes {
        let audience = change.audience.as_str();
        if !keep(audience) {
            continue;
        }
        let i = *slot.entry(audience).or_insert_with(|| {
            audiences.push((audience, Vec::new(), None));
            audiences.len() - 1
        });
        let Some((_, closed, open)) = audiences.get_mut(i) else {
            continue;
        };
        let full = open.as_ref().is_some_and(|o| {
            o.latest.len() >= batch_size && !o.index.contains_key(&change.profile_id)
        });
        if full {
            if let Some(o) = open.take() {
                closed.push(o.close(audience));
            }
        }
        let o = open.get_or_insert_with(|| Open::new(change));
        o.first_seq = o.first_seq.min(change.seq);
        o.last_seq = o.last_seq.max(change.seq);
        match o.index.get(&change.profile_id) {
            Some(&at) => {
                if let Some(entry) = o.latest.get_mut(at) {
                    *entry = change;
                }
            }
            None => {
                o.index.insert(change.profile_id, o.latest.len());
                o.latest.push(change);
            }
        }
    }
    let mut calls = Vec::new();
    for (audience, closed, open) in audiences {
        calls.extend(closed);
        if let Some(o) = open {
            calls.push(o.close(audience));
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, audience: &str, profile: u64, entered: bool) -> MembershipChange {
        MembershipChange {
            seq,
            audience: audience.into(),
            profile_id: profile,
            entered,
            at_ms: 1_000,
            identities: vec![("customer_id".into(), format!("u{profile}"))],
            devices: Vec::new(),
            audiences_now: Vec::new(),
        }
    }

    fn profiles(list: &[(u64, Vec<(String, String)>)]) -> Vec<u64> {
        list.iter().map(|(p, _)| *p).collect()
    }

    #[test]
    fn changes_are_grouped_per_audience_in_log_order() {
        let changes = [
            change(1, "a", 1, true),
            change(2, "b", 1, true),
            change(3, "a", 2, true),
            change(4, "a", 3, false),
        ];
        let calls = plan(&changes, |_| true, 100);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].audience, "a");
        assert_eq!((calls[0].first_seq, calls[0].last_seq), (1, 4));
        assert_eq!(profiles(&calls[0].add), [1, 2]);
        assert_eq!(profiles(&calls[0].remove), [3]);
        assert_eq!(calls[1].audience, "b");
        assert_eq!((calls[1].first_seq, calls[1].last_seq), (2, 2));
    }

    #[test]
    fn an_add_then_a_remove_in_one_call_collapses_to_the_remove() {
        let changes = [
            change(1, "a", 1, true),
            change(2, "a", 2, true),
            change(3, "a", 1, false),
            change(4, "a", 2, false),
            change(5, "a", 2, true),
        ];
        let calls = plan(&changes, |_| true, 100);
        assert_eq!(calls.len(), 1);
        assert_eq!(profiles(&calls[0].add), [2]);
        assert_eq!(profiles(&calls[0].remove), [1]);
        assert_eq!((calls[0].first_seq, calls[0].last_seq), (1, 5));
    }

    #[test]
    fn a_call_holds_at_most_batch_size_profiles_and_repeats_do_not_count() {
        let changes = [
            change(1, "a", 1, true),
            change(2, "a", 2, true),
            change(3, "a", 1, false),
            change(4, "a", 3, true),
            change(5, "a", 4, true),
            change(6, "a", 3, false),
        ];
        let calls = plan(&changes, |_| true, 2);
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].first_seq, calls[0].last_seq), (1, 3));
        assert_eq!(profiles(&calls[0].add), [2]);
        assert_eq!(profiles(&calls[0].remove), [1]);
        assert_eq!((calls[1].first_seq, calls[1].last_seq), (4, 6));
        assert_eq!(profiles(&calls[1].add), [4]);
        assert_eq!(profiles(&calls[1].remove), [3]);
        assert!(calls.iter().all(|c| c.len() <= 2));
    }

    #[test]
    fn unselected_audiences_make_no_calls() {
        let changes = [change(1, "a", 1, true), change(2, "b", 2, true)];
        let calls = plan(&changes, |a| a == "b", 10);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].audience, "b");
        assert!(plan(&[], |_| true, 10).is_empty());
    }

    #[test]
    fn the_body_carries_allowed_identities_and_the_key_is_stable() {
        let calls = plan(
            &[change(1, "a", 1, true), change(2, "a", 2, false)],
            |_| true,
            10,
        );
        let body = calls[0].body(&Allowlist::new(None), 0);
        assert_eq!(
            body,
            json!({"audience": "a", "add": [{"profileId": 1, "userId": "u1"}],
                   "remove": [{"profileId": 2, "userId": "u2"}],
                   "sentAt": "1970-01-01T00:00:00Z"})
        );
        assert_eq!(
            calls[0].idempotency_key("d"),
            calls[0].clone().idempotency_key("d")
        );
        assert_ne!(calls[0].idempotency_key("d"), calls[0].idempotency_key("e"));
    }
}
