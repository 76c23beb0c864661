//! Consent end to end: denied events never reach the redb file, revocation purges
//! queued events, both are counted, and consent survives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use edge_tests::http::{post, request};
use edge_tests::{basic, Agent, BASE_CONFIG};

fn config() -> String {
    format!(
        r#"{BASE_CONFIG}
[consent]
unknown = "deny"
purposes = [{{ name = "analytics" }}, {{ name = "advertising", sale = true }}]
[[consent.rules]]
types = ["track"]
purposes = ["analytics"]
[[consent.rules]]
names = ["Ad Clicked"]
purposes = ["advertising"]
"#
    )
}

fn key() -> String {
    basic("test-key", "")
}

fn set_consent(agent: &Agent, body: &str) -> serde_json::Value {
    let auth = key();
    let r = request(
        agent.addr,
        "PUT",
        "/v1/consent",
        &[("Authorization", auth.as_str())],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn denied_events_never_reach_the_spool_file() {
    let canary = "CANARY-5f0c1e9a-never-on-disk";
    let mut agent = Agent::new(&config(), "");
    agent.start();
    let body = format!(r#"{{"event":"Play","userId":"u1","properties":{{"secret":"{canary}"}}}}"#);
    let r = post(agent.addr, "/v1/track", &key(), body.as_bytes()).unwrap();
    // Segment semantics: the request is fine, the event is dropped by policy.
    assert_eq!(r.status, 200, "{}", r.body);
    // An event the user did consent to, from the Segment context, is kept.
    let granted = r#"{"event":"Play","userId":"u2","properties":{"ok":true},"context":{"consent":{"categoryPreferences":{"Analytics":true}}}}"#;
    assert_eq!(
        post(agent.addr, "/v1/track", &key(), granted.as_bytes())
            .unwrap()
            .status,
        200
    );
    let status = agent.status();
    assert_eq!(status["totals"]["dropped"]["consent_denied"], 1);
    assert!(agent.stop_term().0);

    let bytes = std::fs::read(agent.spool_file()).unwrap();
    assert!(
        !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
        "canary found in the spool file"
    );
    let events = agent.export();
    assert!(events
        .iter()
        .any(|e| e["identities"]["user_id"] == "u2" && e["kind"] == "track"));
    assert!(!events
        .iter()
        .any(|e| e["identities"]["user_id"] == "u1" && e["kind"] == "track"));
    // The consent change itself travels as an event.
    assert!(events
        .iter()
        .any(|e| e["kind"] == "consent" && e["identities"]["user_id"] == "u2"));
}

#[test]
fn revoking_a_purpose_purges_queued_events_and_is_remembered() {
    let mut agent = Agent::new(&config(), "");
    agent.start();
    set_consent(
        &agent,
        r#"{"userId":"u1","purposes":{"analytics":true,"advertising":true}}"#,
    );
    set_consent(&agent, r#"{"userId":"u9","purposes":{"analytics":true}}"#);
    for i in 0..5 {
        let body = format!(r#"{{"event":"Play","userId":"u1","properties":{{"i":{i}}}}}"#);
        assert_eq!(
            post(agent.addr, "/v1/track", &key(), body.as_bytes())
                .unwrap()
                .status,
            200
        );
    }
    let other = r#"{"event":"Play","userId":"u9"}"#;
    assert_eq!(
        post(agent.addr, "/v1/track", &key(), other.as_bytes())
            .unwrap()
            .status,
        200
    );
    // The user withdraws analytics consent.
    let changed = set_consent(&agent, r#"{"userId":"u1","purposes":{"analytics":false}}"#);
    assert_eq!(changed["changed"], true);
    let status = agent.status();
    assert_eq!(status["totals"]["dropped"]["consent_purged"], 5);
    assert!(agent.stop_term().0);

    let events = agent.export();
    let tracks = |user: &str| {
        events
            .iter()
            .filter(|e| e["kind"] == "track" && e["identities"]["user_id"] == user)
            .count()
    };
    assert_eq!(tracks("u1"), 0, "revoked user's events still queued");
    assert_eq!(tracks("u9"), 1, "another user's events were purged");

    // After a restart the revocation still holds.
    agent.start();
    assert_eq!(
        post(
            agent.addr,
            "/v1/track",
            &key(),
            br#"{"event":"Play","userId":"u1"}"#
        )
        .unwrap()
        .status,
        200
    );
    let status = agent.status();
    assert_eq!(status["totals"]["dropped"]["consent_denied"], 1);
    assert_eq!(status["totals"]["dropped"]["consent_purged"], 5);
}

#[test]
fn mparticle_ccpa_opt_out_drops_sale_events_only() {
    let mut agent = Agent::new(&config(), "");
    agent.start();
    let body = r#"{"user_identities":{"customer_id":"c1"},
        "consent_state":{"gdpr":{"analytics":{"consented":true,"timestamp_unixtime_ms":1}},
                         "ccpa":{"data_sale_opt_out":{"consented":true,"timestamp_unixtime_ms":1}}},
        "events":[{"event_type":"custom_event","data":{"event_name":"Play"}},
                  {"event_type":"custom_event","data":{"event_name":"Ad Clicked"}}]}"#;
    let r = post(
        agent.addr,
        "/v2/events",
        &basic("mp-key", "mp-secret"),
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(agent.status()["totals"]["dropped"]["consent_denied"], 1);
    assert!(agent.stop_term().0);
    let names: Vec<_> = agent
        .export()
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        names.contains(&"Play".to_owned()) && !names.contains(&"Ad Clicked".to_owned()),
        "{names:?}"
    );
}
