//! Identity rules without I/O: which identifiers an event carries, and what resolving
//! them means — which profile the event belongs to, which profiles merge, which
//! identifiers get linked.
//!
//! Must not touch storage: the stage looks identifiers up and feeds the answers in.

use std::borrow::Cow;
use std::collections::HashSet;

use edge_agent::model::{Event, EventKind};

use crate::config::IdentityConfig;

pub const CUSTOMER_ID: &str = "customer_id";
pub const ANONYMOUS_ID: &str = "anonymous_id";
pub const EMAIL: &str = "email";
pub const DEVICE_ID: &str = "device_id";

/// One identifier of an event, normalized and past the blocklist.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident<'a> {
    pub ty: &'a str,
    pub value: Cow<'a, str>,
    /// Its type is unique (a profile holds at most one value of it).
    pub unique: bool,
    /// Only looked up, never linked: an alias's `previous_id` tried as a customer id
    /// (we do not know which type it was).
    pub lookup_only: bool,
}

/// `[identity]` made ready for per-event use.
#[derive(Debug, Clone)]
pub struct Rules {
    link: Vec<String>,
    unique: Vec<String>,
    /// Trimmed, lowercased.
    blocklist: HashSet<String>,
    pub max_identities: usize,
}

impl Rules {
    pub fn new(config: &IdentityConfig) -> Self {
        Rules {
            link: config.link.clone(),
            unique: config.unique.clone(),
            blocklist: config
                .blocklist
                .iter()
                .map(|v| v.trim().to_lowercase())
                .collect(),
            max_identities: config.max_identities.max(1),
        }
    }

    pub fn unique_types(&self) -> &[String] {
        &self.unique
    }

    pub fn is_unique(&self, ty: &str) -> bool {
        self.unique.iter().any(|u| u == ty)
    }

    fn links(&self, ty: &str) -> bool {
        self.link.iter().any(|l| l == ty)
    }

    /// The stored form of `value` for type `ty`, or `None` when it identifies nobody.
    /// Values are trimmed; emails are lowercased (one mailbox, one identifier).
    pub fn normalize<'v>(&self, ty: &str, value: &'v str) -> Option<Cow<'v, str>> {
        let trimmed = value.trim();
        let blocked = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) || !trimmed.is_ascii() {
            self.blocklist.contains(&trimmed.to_lowercase())
        } else {
            self.blocklist.contains(trimmed)
        };
        if blocked || trimmed.is_empty() {
            return None;
        }
        if ty == EMAIL && trimmed.chars().any(char::is_uppercase) {
            return Some(Cow::Owned(trimmed.to_lowercase()));
        }
        Some(Cow::Borrowed(trimmed))
    }

    /// The linkable identifiers of `event`, in priority order (customer id first), into
    /// `out` (cleared first). At most one value per unique type: the first wins.
    pub fn identifiers<'a>(&self, event: &'a Event, out: &mut Vec<Ident<'a>>) {
        out.clear();
        let ids = &event.identities;
        if let Some(v) = &ids.user_id {
            self.push(out, CUSTOMER_ID, v, false);
        }
        for (name, v) in &ids.other {
            if name == CUSTOMER_ID {
                self.push(out, CUSTOMER_ID, v, false);
            }
        }
        if let Some(v) = &ids.anonymous_id {
            self.push(out, ANONYMOUS_ID, v, false);
        }
        if let Some(v) = event.traits.get_str(EMAIL) {
            self.push(out, EMAIL, v, false);
        }
        for (name, v) in &ids.other {
            if name == EMAIL {
                self.push(out, EMAIL, v, false);
            }
        }
        if !ids.device_id.0.is_empty() {
            self.push(out, DEVICE_ID, &ids.device_id.0, false);
        }
        for (name, v) in &ids.other {
            if name != CUSTOMER_ID && name != EMAIL {
                self.push(out, name, v, false);
            }
        }
        // Segment alias: `previousId` is the same person as `userId`. It was an
        // anonymous id or an earlier user id; as an anonymous id it is also linked so
        // later anonymous events find the profile.
        if event.kind == EventKind::Alias {
            if let Some(prev) = &ids.previous_id {
                self.push(out, ANONYMOUS_ID, prev, false);
                self.push(out, CUSTOMER_ID, prev, true);
            }
        }
    }

    fn push<'a>(&self, out: &mut Vec<Ident<'a>>, ty: &'a str, raw: &'a str, lookup_only: bool) {
        if !self.links(ty) {
            return;
        }
        let Some(value) = self.normalize(ty, raw) else {
            return;
        };
        let unique = self.is_unique(ty);
        let dup = out.iter().any(|i| {
            i.ty == ty && (i.value == value || (unique && !lookup_only && !i.lookup_only))
        });
        if !dup {
            out.push(Ident {
                ty,
                value,
                unique,
                lookup_only,
            });
        }
    }
}

/// Where an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// No usable identifier: the event gets no profile.
    Nobody,
    /// A new profile holding the linked identifiers.
    New,
    /// This existing profile (after the merges of [`Plan::merge`]).
    Existing(u64),
}

/// What resolving one event decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: Target,
    /// Profiles merged into the target (the survivor, the lowest id of the group).
    pub merge: Vec<u64>,
    /// Indexes of identifiers to link to the target (not yet linked anywhere).
    pub link: Vec<usize>,
}

/// Resolves one event. `found[i]` is the profile identifier `idents[i]` maps to;
/// `held(p, t)` the value of unique type `t` profile `p` holds.
///
/// 1. A profile found through a (linkable) unique identifier anchors the event.
/// 2. Otherwise the event's own unique values anchor it.
/// 3. Every other profile found joins (is merged) only if it holds no different
///    value of a unique type than the group so far; else it stays apart, and its
///    identifiers stay with it.
/// 4. Unlinked identifiers are linked to the target, a unique one only if the target
///    holds no other value of its type.
pub fn plan<'x>(
    idents: &'x [Ident<'_>],
    found: &[Option<u64>],
    unique_types: &'x [String],
    held: impl Fn(u64, &str) -> Option<&'x str>,
) -> Plan {
    let found_at = |i: usize| found.get(i).copied().flatten();
    let mut order: Vec<u64> = Vec::with_capacity(found.len());
    for (i, id) in idents.iter().enumerate() {
        if let Some(p) = found_at(i).filter(|_| id.unique && !id.lookup_only) {
            if !order.contains(&p) {
                order.push(p);
            }
        }
    }
    let anchored = !order.is_empty();
    for i in 0..idents.len() {
        if let Some(p) = found_at(i) {
            if !order.contains(&p) {
                order.push(p);
            }
        }
    }

    // The unique values the group holds so far: (type, value).
    let mut acc: Vec<(&'x str, &'x str)> = Vec::with_capacity(unique_types.len());
    let take_uniques = |acc: &mut Vec<(&'x str, &'x str)>, p: u64| {
        for t in unique_types {
            if let Some(v) = held(p, t) {
                if !has_type(acc, t) {
                    acc.push((t.as_str(), v));
                }
            }
        }
    };
    let mut group: Vec<u64> = Vec::with_capacity(order.len());
    if let Some(&anchor) = order.first().filter(|_| anchored) {
        group.push(anchor);
        take_uniques(&mut acc, anchor);
    }
    for (i, id) in idents.iter().enumerate() {
        if id.unique && !id.lookup_only && found_at(i).is_none() && !has_type(&acc, id.ty) {
            acc.push((id.ty, &id.value));
        }
    }
    for &p in order.iter().skip(usize::from(anchored)) {
        let compatible = unique_types
            .iter()
            .all(|t| match (held(p, t), value_of(&acc, t)) {
                (Some(v), Some(a)) => v == a,
                _ => true,
            });
        if compatible {
            group.push(p);
            take_uniques(&mut acc, p);
        }
    }

    let link: Vec<usize> = idents
        .iter()
        .enumerate()
        .filter(|(i, id)| {
            found_at(*i).is_none()
                && !id.lookup_only
                && (!id.unique || value_of(&acc, id.ty) == Some(&*id.value))
        })
        .map(|(i, _)| i)
        .collect();

    let Some(&survivor) = group.iter().min() else {
        let target = if link.is_empty() {
            Target::Nobody
        } else {
            Target::New
        };
        return Plan {
            target,
            merge: Vec::new(),
            link,
        };
    };
    Plan {
        target: Target::Existing(survivor),
        merge: group.into_iter().filter(|p| *p != survivor).collect(),
        link,
    }
}

fn has_type(acc: &[(&str, &str)], ty: &str) -> bool {
    acc.iter().any(|(t, _)| *t == ty)
}

fn value_of<'v>(acc: &[(&str, &'v str)], ty: &str) -> Option<&'v str> {
    acc.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

/// Canonical type names for lookups typed by people (`userId`, `user_id`, `anonymousId`).
pub fn canonical_type(ty: &str) -> &str {
    match ty {
        "user_id" | "userId" | "customerId" => CUSTOMER_ID,
        "anonymousId" => ANONYMOUS_ID,
        "deviceId" => DEVICE_ID,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{Source, Value};

    fn rules() -> Rules {
        Rules::new(&IdentityConfig::default())
    }

    fn event(user: Option<&str>, anon: Option<&str>) -> Event {
        let mut e = Event::new(EventKind::Track, Source::Segment, 0);
        e.identities.user_id = user.map(Into::into);
        e.identities.anonymous_id = anon.map(Into::into);
        e
    }

    fn plan_for(
        rules: &Rules,
        e: &Event,
        found: &[Option<u64>],
        held: &[(u64, &'static str, &'static str)],
    ) -> Plan {
        let mut ids = Vec::new();
        rules.identifiers(e, &mut ids);
        plan(&ids, found, rules.unique_types(), |p, t| {
            held.iter()
                .find(|(hp, ht, _)| *hp == p && *ht == t)
                .map(|(_, _, v)| *v)
        })
    }

    #[test]
    fn blocklisted_values_are_no_identifiers_whatever_their_case_or_spacing() {
        let r = rules();
        let mut e = event(Some("0"), Some(" NULL "));
        e.traits.insert("email", Value::from("Test@Example.com"));
        let mut ids = Vec::new();
        r.identifiers(&e, &mut ids);
        assert!(ids.is_empty(), "{ids:?}");
    }

    #[test]
    fn emails_are_lowercased_and_mparticle_identities_keep_their_names() {
        let r = rules();
        let mut e = event(None, None);
        e.identities
            .other
            .push(("email".into(), " Ann@Example.org ".into()));
        e.identities
            .other
            .push(("mobile_number".into(), "+100".into()));
        e.identities.other.push(("customer_id".into(), "c9".into()));
        let mut ids = Vec::new();
        r.identifiers(&e, &mut ids);
        let got: Vec<(&str, &str)> = ids.iter().map(|i| (i.ty, &*i.value)).collect();
        assert_eq!(
            got,
            [
                ("customer_id", "c9"),
                ("email", "ann@example.org"),
                ("mobile_number", "+100")
            ]
        );
    }

    #[test]
    fn device_id_links_only_when_configured() {
        let mut e = event(None, None);
        e.identities.device_id = edge_agent::model::DeviceId("tv-1".into());
        let mut ids = Vec::new();
        rules().identifiers(&e, &mut ids);
        assert!(ids.is_empty());
        let mut config = IdentityConfig::default();
        config.link.push(DEVICE_ID.into());
        Rules::new(&config).identifiers(&e, &mut ids);
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn a_second_customer_on_a_shared_anonymous_id_gets_a_new_profile() {
        // anonymous id A is held by profile 1, which holds customer u1.
        let r = rules();
        let p = plan_for(
            &r,
            &event(Some("u2"), Some("A")),
            &[None, Some(1)],
            &[(1, "customer_id", "u1")],
        );
        assert_eq!(p.target, Target::New);
        assert_eq!(p.link, [0], "only the customer id is linked; A stays");
        assert!(p.merge.is_empty());
    }

    #[test]
    fn a_known_customer_id_anchors_the_event_even_if_its_anonymous_id_is_elsewhere() {
        let r = rules();
        let p = plan_for(
            &r,
            &event(Some("u2"), Some("A")),
            &[Some(2), Some(1)],
            &[(1, "customer_id", "u1"), (2, "customer_id", "u2")],
        );
        assert_eq!(p.target, Target::Existing(2));
        assert!(p.merge.is_empty() && p.link.is_empty());
    }

    #[test]
    fn compatible_profiles_merge_into_the_lowest_id() {
        let r = rules();
        let p = plan_for(
            &r,
            &event(Some("u1"), Some("A")),
            &[Some(7), Some(3)],
            &[(7, "customer_id", "u1")],
        );
        assert_eq!(p.target, Target::Existing(3));
        assert_eq!(p.merge, [7]);
    }

    #[test]
    fn alias_merges_the_previous_anonymous_profile_into_the_users() {
        let r = rules();
        let mut e = event(Some("u1"), None);
        e.kind = EventKind::Alias;
        e.identities.previous_id = Some("anon-9".into());
        // customer u1 → 5; previous as anonymous id → 4; previous as customer id → none.
        let p = plan_for(
            &r,
            &e,
            &[Some(5), Some(4), None],
            &[(5, "customer_id", "u1")],
        );
        assert_eq!(p.target, Target::Existing(4));
        assert_eq!(p.merge, [5]);
        assert!(
            p.link.is_empty(),
            "a lookup-only identifier is never linked"
        );
    }

    #[test]
    fn no_identifiers_means_no_profile() {
        let r = rules();
        let p = plan_for(&r, &event(None, Some("undefined")), &[], &[]);
        assert_eq!(p.target, Target::Nobody);
    }
}
