use std::borrow::Cow;

use edge_agent::model::{Event, EventKind, Map, Source, Value};

use super::*;
use crate::config::AudienceConfig;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const T0: i64 = 1_700_000_000_000;

fn config(when: &str) -> AudienceConfig {
    toml::from_str(&format!("name = \"a\"\nwhen = {when}\n")).unwrap()
}

fn audience(when: &str) -> Audience {
    compile(&config(when)).unwrap()
}

fn error(name: &str, when: &str) -> String {
    let mut c = config(when);
    c.name = name.to_owned();
    compile(&c).unwrap_err().to_string()
}

/// A profile as the conditions see it.
#[derive(Default)]
struct Facts {
    attributes: Vec<(&'static str, Value)>,
    granted: Vec<&'static str>,
    ccpa: bool,
    did: Vec<(DidId, DidState)>,
}

impl ProfileFacts for Facts {
    fn attribute(&self, name: &str) -> Option<Cow<'_, Value>> {
        self.attributes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| Cow::Borrowed(v))
    }
    fn consent_granted(&self, purpose: &str) -> bool {
        self.granted.contains(&purpose)
    }
    fn ccpa_opt_out(&self) -> bool {
        self.ccpa
    }
    fn did_state(&self, clause: &DidClause) -> Option<&DidState> {
        self.did
            .iter()
            .find(|(id, _)| *id == clause.id())
            .map(|(_, s)| s)
    }
}

impl Facts {
    fn with(attributes: Vec<(&'static str, Value)>) -> Self {
        Facts {
            attributes,
            ..Facts::default()
        }
    }

    /// What the profile stage does with an event: record it in every clause it
    /// matches (once per distinct clause id).
    fn observe(&mut self, audience: &Audience, event: &Event, at: i64, now: i64) {
        let mut seen = Vec::new();
        for clause in audience.did_clauses() {
            if seen.contains(&clause.id()) || !clause.matches(event) {
                continue;
            }
            seen.push(clause.id());
            match self.did.iter_mut().find(|(id, _)| *id == clause.id()) {
                Some((_, state)) => {
                    state.record(clause, at, now);
                }
                None => {
                    let mut state = DidState::default();
                    state.record(clause, at, now);
                    self.did.push((clause.id(), state));
                }
            }
        }
    }
}

fn event(kind: EventKind, name: &str, properties: &[(&str, Value)]) -> Event {
    let mut e = Event::new(kind, Source::Segment, T0);
    e.name = Some(name.into());
    e.properties = properties
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect::<Map>();
    e
}

fn track(name: &str) -> Event {
    event(EventKind::Track, name, &[])
}

fn s(text: &str) -> Value {
    Value::String(text.into())
}

#[test]
fn attribute_ops_compare_numbers_strings_and_lists() {
    let facts = Facts::with(vec![
        ("plan", s("pro")),
        ("age", Value::Int(30)),
        ("score", Value::Float(2.5)),
        ("price", s("9.99")),
        ("vip", Value::Bool(true)),
        ("nothing", Value::Null),
        ("tags", Value::Array(vec![s("beta"), Value::Int(7)])),
    ]);
    for (when, expected) in [
        (r#"{ attribute = "plan", op = "eq", value = "pro" }"#, true),
        (
            r#"{ attribute = "plan", op = "eq", value = "free" }"#,
            false,
        ),
        (r#"{ attribute = "age", op = "eq", value = 30 }"#, true),
        (r#"{ attribute = "age", op = "eq", value = 30.0 }"#, true),
        (r#"{ attribute = "age", op = "eq", value = "30" }"#, false),
        (r#"{ attribute = "price", op = "eq", value = 9.99 }"#, true),
        (r#"{ attribute = "vip", op = "eq", value = true }"#, true),
        (r#"{ attribute = "vip", op = "eq", value = false }"#, false),
        (r#"{ attribute = "plan", op = "ne", value = "free" }"#, true),
        (r#"{ attribute = "plan", op = "ne", value = "pro" }"#, false),
        (
            r#"{ attribute = "missing", op = "ne", value = "pro" }"#,
            true,
        ),
        (
            r#"{ attribute = "missing", op = "eq", value = "pro" }"#,
            false,
        ),
        (r#"{ attribute = "age", op = "gt", value = 29 }"#, true),
        (r#"{ attribute = "age", op = "gt", value = 30 }"#, false),
        (r#"{ attribute = "age", op = "gte", value = 30 }"#, true),
        (r#"{ attribute = "age", op = "lt", value = 30 }"#, false),
        (r#"{ attribute = "age", op = "lte", value = 30 }"#, true),
        (r#"{ attribute = "score", op = "lt", value = 3 }"#, true),
        (r#"{ attribute = "price", op = "gte", value = 9.5 }"#, true),
        (r#"{ attribute = "plan", op = "gt", value = 1 }"#, false),
        (r#"{ attribute = "missing", op = "lt", value = 1 }"#, false),
        (r#"{ attribute = "plan", op = "exists" }"#, true),
        (r#"{ attribute = "nothing", op = "exists" }"#, false),
        (r#"{ attribute = "missing", op = "exists" }"#, false),
        (
            r#"{ attribute = "plan", op = "contains", value = "r" }"#,
            true,
        ),
        (
            r#"{ attribute = "plan", op = "contains", value = "x" }"#,
            false,
        ),
        (
            r#"{ attribute = "tags", op = "contains", value = "beta" }"#,
            true,
        ),
        (
            r#"{ attribute = "tags", op = "contains", value = 7 }"#,
            true,
        ),
        (
            r#"{ attribute = "tags", op = "contains", value = "bet" }"#,
            false,
        ),
        (
            r#"{ attribute = "age", op = "contains", value = 3 }"#,
            false,
        ),
        (
            r#"{ attribute = "plan", op = "in", value = ["free", "pro"] }"#,
            true,
        ),
        (
            r#"{ attribute = "plan", op = "in", value = ["free", "team"] }"#,
            false,
        ),
        (
            r#"{ attribute = "age", op = "in", value = [10, 30] }"#,
            true,
        ),
        (
            r#"{ attribute = "missing", op = "in", value = ["x"] }"#,
            false,
        ),
    ] {
        assert_eq!(audience(when).evaluate(&facts, T0), expected, "{when}");
    }
}

#[test]
fn consent_and_ccpa_clauses_read_the_profile_consent() {
    let mut facts = Facts {
        granted: vec!["advertising"],
        ..Facts::default()
    };
    let ads = audience(r#"{ consent = "advertising" }"#);
    let analytics = audience(r#"{ consent = "analytics" }"#);
    let opted_out = audience("{ ccpa_opt_out = true }");
    let opted_in = audience("{ ccpa_opt_out = false }");
    assert!(ads.evaluate(&facts, T0));
    assert!(!analytics.evaluate(&facts, T0));
    assert!(!opted_out.evaluate(&facts, T0));
    assert!(opted_in.evaluate(&facts, T0));
    facts.ccpa = true;
    assert!(opted_out.evaluate(&facts, T0));
    assert!(!opted_in.evaluate(&facts, T0));
}

#[test]
fn all_any_and_not_nest() {
    let when = r#"{ all = [
        { attribute = "plan", op = "eq", value = "pro" },
        { any = [ { consent = "email" }, { consent = "push" } ] },
        { not = { attribute = "country", op = "in", value = ["FR", "DE"] } },
    ] }"#;
    let a = audience(when);
    let mut facts = Facts::with(vec![("plan", s("pro")), ("country", s("US"))]);
    assert!(!a.evaluate(&facts, T0), "no consent yet");
    facts.granted = vec!["push"];
    assert!(a.evaluate(&facts, T0));
    facts.attributes[1].1 = s("FR");
    assert!(!a.evaluate(&facts, T0), "excluded country");
    facts.attributes[1].1 = s("US");
    facts.attributes[0].1 = s("free");
    assert!(!a.evaluate(&facts, T0), "wrong plan");
    assert_eq!(a.attribute_names(), ["plan", "country"]);
    assert!(!a.depends_on_time());
}

#[test]
fn did_matches_name_type_and_where_conditions() {
    let a = audience(
        r#"{ did = "Order Completed", type = "track", where = [
            { property = "total", op = "gte", value = 50 },
            { property = "coupon", op = "exists" },
        ] }"#,
    );
    let clause = &a.did_clauses()[0];
    let big = [("total", Value::Int(80)), ("coupon", s("SPRING"))];
    assert!(clause.matches(&event(EventKind::Track, "Order Completed", &big)));
    assert!(!clause.matches(&event(EventKind::Screen, "Order Completed", &big)));
    assert!(!clause.matches(&event(EventKind::Track, "Order Started", &big)));
    let small = [("total", Value::Int(20)), ("coupon", s("SPRING"))];
    assert!(!clause.matches(&event(EventKind::Track, "Order Completed", &small)));
    let no_coupon = [("total", Value::Int(80))];
    assert!(!clause.matches(&event(EventKind::Track, "Order Completed", &no_coupon)));
    let mut identify = Event::new(EventKind::Identify, Source::Segment, T0);
    identify.name = None;
    assert!(!clause.matches(&identify));
}

#[test]
fn did_needs_at_least_n_occurrences() {
    let a = audience(r#"{ did = "App Opened", at_least = 3 }"#);
    assert!(!a.depends_on_time());
    let mut facts = Facts::default();
    for i in 0..2 {
        facts.observe(&a, &track("App Opened"), T0 + i, T0 + i);
    }
    assert!(!a.evaluate(&facts, T0 + 10));
    facts.observe(&a, &track("App Opened"), T0 + 5, T0 + 5);
    assert!(a.evaluate(&facts, T0 + 10));
    // Without a window only `at_least` times are worth keeping.
    for i in 0..10 {
        facts.observe(&a, &track("App Opened"), T0 + 100 + i, T0 + 100 + i);
    }
    assert_eq!(facts.did[0].1.times(), [T0 + 107, T0 + 108, T0 + 109]);
    assert!(a.evaluate(&facts, T0 + 200));
}

#[test]
fn an_occurrence_leaves_the_window_after_within() {
    let a = audience(r#"{ did = "Purchase", within = "7d" }"#);
    assert!(a.depends_on_time());
    let mut facts = Facts::default();
    assert!(!a.evaluate(&facts, T0));
    facts.observe(&a, &track("Purchase"), T0, T0);
    assert!(a.evaluate(&facts, T0));
    assert!(a.evaluate(&facts, T0 + 7 * DAY - 1));
    assert_eq!(a.next_change_after(&facts, T0), Some(T0 + 7 * DAY));
    assert!(!a.evaluate(&facts, T0 + 7 * DAY));
    assert_eq!(a.next_change_after(&facts, T0 + 7 * DAY), None);
    // An event that arrives after its window closed is not kept.
    let mut late = Facts::default();
    late.observe(&a, &track("Purchase"), T0, T0 + 8 * DAY);
    assert!(late.did.iter().all(|(_, s)| s.is_empty()));
}

#[test]
fn sent_but_not_opened_fills_as_time_passes_and_empties_on_open() {
    let a = audience(
        r#"{ all = [
            { did = "Push Sent", within = "2d", before = "1h" },
            { not = { did = "Push Opened", within = "2d" } },
        ] }"#,
    );
    assert!(a.depends_on_time());
    let mut facts = Facts::default();
    facts.observe(&a, &track("Push Sent"), T0, T0);
    assert!(!a.evaluate(&facts, T0), "just sent: too young");
    assert_eq!(a.next_change_after(&facts, T0), Some(T0 + HOUR));
    assert!(!a.evaluate(&facts, T0 + HOUR - 1));
    assert!(a.evaluate(&facts, T0 + HOUR), "an hour without an open");
    facts.observe(&a, &track("Push Opened"), T0 + 2 * HOUR, T0 + 2 * HOUR);
    assert!(!a.evaluate(&facts, T0 + 2 * HOUR), "opened: leaves");
    // Once the open is older than the window, and so is the send, the user stays out.
    assert!(!a.evaluate(&facts, T0 + 3 * DAY));

    // Someone who opened before the hour passed never enters.
    let mut quick = Facts::default();
    quick.observe(&a, &track("Push Sent"), T0, T0);
    quick.observe(&a, &track("Push Opened"), T0 + MIN, T0 + MIN);
    assert!(!a.evaluate(&quick, T0 + HOUR));
    // The send leaves the window after two days.
    let mut idle = Facts::default();
    idle.observe(&a, &track("Push Sent"), T0, T0);
    assert!(a.evaluate(&idle, T0 + 2 * DAY - 1));
    assert!(!a.evaluate(&idle, T0 + 2 * DAY));
}

#[test]
fn with_before_younger_occurrences_are_kept_up_to_the_cap() {
    let a = audience(r#"{ did = "Push Sent", before = "1h" }"#);
    let clause = &a.did_clauses()[0];
    let mut state = DidState::default();
    for i in 0..100 {
        state.record(clause, T0 + i, T0 + i);
    }
    assert_eq!(state.times().len(), MAX_OCCURRENCES);
    assert_eq!(state.times()[0], T0 + 36, "the newest are kept");
    assert!(
        !state.record(clause, T0, T0 + 200),
        "older than a full state"
    );
    assert!(!clause.holds(Some(&state), T0 + 100));
    assert!(clause.holds(Some(&state), T0 + 36 + HOUR));
}

#[test]
fn a_time_ahead_of_now_counts_as_now() {
    let a = audience(r#"{ did = "Push Sent", within = "1d" }"#);
    let clause = &a.did_clauses()[0];
    let mut state = DidState::default();
    assert!(state.record(clause, T0 + DAY * 365, T0));
    assert_eq!(state.times(), [T0]);
    assert!(!clause.holds(Some(&state), T0 + DAY));
}

#[test]
fn merged_states_keep_the_newest_live_occurrences() {
    let a = audience(r#"{ did = "Push Sent", within = "1d", at_least = 2 }"#);
    let clause = &a.did_clauses()[0];
    let mut mine = DidState::default();
    mine.record(clause, T0, T0);
    let mut theirs = DidState::default();
    theirs.record(clause, T0 - 2 * DAY, T0 - 2 * DAY);
    theirs.record(clause, T0 + HOUR, T0 + HOUR);
    assert_eq!(theirs.times(), [T0 + HOUR], "the old one left the window");
    assert!(!clause.holds(Some(&mine), T0 + 2 * HOUR));
    mine.merge(clause, &theirs, T0 + 2 * HOUR);
    assert_eq!(mine.times(), [T0, T0 + HOUR]);
    assert!(clause.holds(Some(&mine), T0 + 2 * HOUR));
    // Merging more than the cap keeps the newest `at_least`.
    let mut more = DidState::default();
    more.record(clause, T0 + 3 * HOUR, T0 + 3 * HOUR);
    mine.merge(clause, &more, T0 + 3 * HOUR);
    assert_eq!(mine.times(), [T0 + HOUR, T0 + 3 * HOUR]);
    // ...and drops what left the window meanwhile.
    mine.merge(clause, &DidState::default(), T0 + DAY + 2 * HOUR);
    assert_eq!(mine.times(), [T0 + 3 * HOUR]);
    assert!(mine.prune(clause, T0 + 2 * DAY));
    assert!(mine.is_empty());
}

#[test]
fn did_state_round_trips_through_postcard() {
    let a = audience(r#"{ did = "Push Sent", before = "1h" }"#);
    let clause = &a.did_clauses()[0];
    let mut state = DidState::default();
    for t in [T0, T0 + 5, T0 - 3] {
        state.record(clause, t, T0 + 10);
    }
    let bytes = postcard::to_stdvec(&state).unwrap();
    let back: DidState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.times(), [T0 - 3, T0, T0 + 5]);
}

#[test]
fn did_ids_follow_the_clause_content_not_its_place() {
    let a = audience(
        r#"{ any = [ { did = "Push Sent", within = "2d" }, { did = "Push Sent", within = "2d" },
                    { did = "Push Sent", within = "3d" } ] }"#,
    );
    let b = audience(r#"{ not = { did = "Push Sent", within = "2d" } }"#);
    let [first, same, other] = a.did_clauses() else {
        panic!("three clauses")
    };
    assert_eq!([first.index(), same.index(), other.index()], [0, 1, 2]);
    assert_eq!(first.id(), same.id());
    assert_ne!(first.id(), other.id());
    assert_eq!(first.id(), b.did_clauses()[0].id());
    // Stored states are keyed by this: the format must not drift.
    assert_eq!(
        first.key(),
        r#"did="Push Sent"|type=null|at_least=1|within_ms=172800000|before_ms=0|where="#
    );
    assert_eq!(first.id(), DidId(super::did::fnv1a(first.key())));
    let w = audience(
        r#"{ did = "A|B", type = "track", where = [{ property = "c", op = "in", value = ["x", 2] }] }"#,
    );
    assert_eq!(
        w.did_clauses()[0].key(),
        r#"did="A|B"|type="track"|at_least=1|within_ms=null|before_ms=0|where="c" in ["x",2]"#
    );
}

#[test]
fn explain_shows_each_clause_with_what_was_observed() {
    let a = audience(
        r#"{ all = [
            { did = "Push Sent", within = "2d", before = "1h" },
            { not = { did = "Push Opened" } },
            { attribute = "plan", op = "eq", value = "pro" },
            { consent = "push" },
        ] }"#,
    );
    let mut facts = Facts::with(vec![("plan", s("free"))]);
    facts.observe(&a, &track("Push Sent"), T0, T0);
    let why = a.explain(&facts, T0 + 2 * HOUR);
    assert_eq!(why["result"], false);
    assert_eq!(why["when"]["all"], false);
    let clauses = &why["when"]["clauses"];
    assert_eq!(clauses[0]["did"], "Push Sent");
    assert_eq!(clauses[0]["count_in_window"], 1);
    assert_eq!(clauses[0]["needed"], 1);
    assert_eq!(clauses[0]["result"], true);
    assert_eq!(clauses[0]["window_until_ms"], T0 + HOUR);
    assert_eq!(clauses[1]["not"], true);
    assert_eq!(clauses[1]["clause"]["count_in_window"], 0);
    assert_eq!(clauses[2]["observed"], "free");
    assert_eq!(clauses[2]["value"], "pro");
    assert_eq!(clauses[2]["result"], false);
    assert_eq!(clauses[3]["granted"], false);
    assert_eq!(
        why["result"].as_bool(),
        Some(a.evaluate(&facts, T0 + 2 * HOUR))
    );
}

#[test]
fn every_error_names_the_audience_and_the_clause_path() {
    for (when, expected) in [
        (
            r#"{ all = [ { consent = "x" }, { did = "Push Sent", within = "7x" } ] }"#,
            "audience `lapsed`: when.all[1].did.within: `7x` is not a duration",
        ),
        (
            r#"{ any = [ { atribute = "plan", op = "eq", value = "pro" } ] }"#,
            "audience `lapsed`: when.any[0]: unknown clause `atribute` (expected all, any, not, attribute, consent, ccpa_opt_out, did)",
        ),
        (
            r#"{ not = { attribute = "plan", op = "equals", value = "pro" } }"#,
            "audience `lapsed`: when.not.attribute.op: unknown op `equals` (expected eq, ne, gt, gte, lt, lte, exists, contains, in)",
        ),
        (
            r#"{ attribute = "age", op = "gt", value = "ten" }"#,
            "audience `lapsed`: when.attribute.value: op `gt` compares numbers; found the string \"ten\"",
        ),
        (
            r#"{ attribute = "plan", op = "eq" }"#,
            "audience `lapsed`: when.attribute.value: op `eq` needs a string, number or boolean",
        ),
        (
            r#"{ attribute = "plan", op = "exists", value = 1 }"#,
            "audience `lapsed`: when.attribute.value: op `exists` takes no value",
        ),
        (
            r#"{ attribute = "plan", op = "in", value = [] }"#,
            "audience `lapsed`: when.attribute.value: op `in` needs a non-empty list",
        ),
        (
            r#"{ any = [] }"#,
            "audience `lapsed`: when.any: needs at least one clause",
        ),
        (
            r#"{ all = { consent = "x" } }"#,
            "audience `lapsed`: when.all: expected a list of clauses, found table",
        ),
        (
            r#"{ all = [ { did = "Push Sent", whithin = "2d" } ] }"#,
            "audience `lapsed`: when.all[0].did: unknown key `whithin` (expected did, type, at_least, within, before, where)",
        ),
        (
            r#"{ did = "Push Sent", at_least = 65 }"#,
            "audience `lapsed`: when.did.at_least: must be an integer from 1 to 64; found 65",
        ),
        (
            r#"{ did = "Push Sent", at_least = 0 }"#,
            "audience `lapsed`: when.did.at_least: must be an integer from 1 to 64",
        ),
        (
            r#"{ did = "Push Sent", within = "1h", before = "2h" }"#,
            "audience `lapsed`: when.did.before: must be shorter than `within`",
        ),
        (
            r#"{ did = "Push Sent", within = "0s" }"#,
            "audience `lapsed`: when.did.within: must be above zero",
        ),
        (
            r#"{ did = "" }"#,
            "audience `lapsed`: when.did.did: an event name cannot be empty",
        ),
        (
            r#"{ did = "Push Sent", where = [ { property = "c", op = "eq", value = "x" }, { property = "d", op = "eq", value = { a = 1 } } ] }"#,
            "audience `lapsed`: when.did.where[1].value: op `eq` compares with a string, number or boolean; found table",
        ),
        (
            r#"{ did = "Push Sent", where = [ { prop = "c", op = "eq", value = "x" } ] }"#,
            "audience `lapsed`: when.did.where[0]: unknown key `prop` (expected property, op, value)",
        ),
        (
            r#"{ consent = "ads", attribute = "plan" }"#,
            "audience `lapsed`: when: `attribute` and `consent` in one clause",
        ),
        (
            r#"{ ccpa_opt_out = "yes" }"#,
            "audience `lapsed`: when.ccpa_opt_out: expected true or false, found string",
        ),
        (
            r#"{ op = "eq", value = 1 }"#,
            "audience `lapsed`: when: the clause kind is missing",
        ),
        (
            r#""everyone""#,
            "audience `lapsed`: when: expected a clause",
        ),
        (
            r#"{ all = [ { any = [ { not = { consent = 1 } } ] } ] }"#,
            "audience `lapsed`: when.all[0].any[0].not.consent.consent: expected a consent purpose (a string), found integer",
        ),
    ] {
        let got = error("lapsed", when);
        assert!(got.starts_with(expected), "{when}\n got: {got}\nwant: {expected}");
    }
}

#[test]
fn nesting_is_bounded() {
    let mut when = r#"{ consent = "x" }"#.to_owned();
    for _ in 0..MAX_DEPTH {
        when = format!("{{ not = {when} }}");
    }
    assert!(compile(&config(&when)).is_ok());
    let deeper = format!("{{ not = {when} }}");
    assert!(error("a", &deeper).contains("nested deeper than 16 levels"));
}
