//! The bi-directional round trip, with real processes: two `edge-agent`s (phones)
//! and one `edge-gateway` over MQTT/mTLS, HTTP servers in the test standing for a
//! push tool and a retargeting tool.
//!
//! 1. New app users (an `Application Installed` event on their phone) form the audience
//!    `new_app_users`, which streams to the push tool as adds.
//! 2. The push tool posts `Push Sent` for all of them and `Push Opened` for some
//!    through its feed; the feed's events reach other destinations, never the push
//!    tool's own event endpoint.
//! 3. The gateway's clock is moved forward (not slept) past the one-hour window; the
//!    sweep fills `sent_not_opened` with exactly the users who did not open, and the
//!    retargeting tool receives them as adds.
//! 4. The phones of those users answer `GET /v1/audiences` with it — also once the
//!    gateway is gone.
//! 5. A user who opens later leaves the audience everywhere: a remove at the
//!    retargeting tool, and their phone no longer lists it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../src/webhook_server.rs"]
#[allow(dead_code)]
mod webhook_server;

use std::collections::BTreeSet;
use std::time::Duration;

use edge_tests::http::{get, post, request};
use edge_tests::{basic, wait_until, Agent, Gateway};
use serde_json::{json, Value};
use webhook_server::{Reply, WebhookServer};

const PHONE_A: &str = "phone-a";
const PHONE_B: &str = "phone-b";
const FEED_TOKEN: &str = "push-feed-token-1";
const PROMPT: Duration = Duration::from_secs(30);

/// Users and their phones: a1, a2 on phone A; b1, b2 on phone B.
const USERS: [(&str, &str); 4] = [
    ("a1", PHONE_A),
    ("a2", PHONE_A),
    ("b1", PHONE_B),
    ("b2", PHONE_B),
];

fn config(push: &WebhookServer, push_events: &WebhookServer, retarget: &WebhookServer) -> String {
    format!(
        r#"
[gateway]
test_clock = true
audience_sweep = "200ms"

[[feeds]]
name = "push"
token = "{FEED_TOKEN}"
destinations = ["push-events"]

[[audiences]]
name = "new_app_users"
when = {{ did = "Application Installed", within = "7d" }}

[[audiences]]
name = "sent_not_opened"
description = "sent a push at least an hour ago and did not open one since"
when = {{ all = [
  {{ did = "Push Sent", within = "7d", before = "1h" }},
  {{ not = {{ did = "Push Opened", within = "7d" }} }},
] }}

[[destinations]]
name = "push-audiences"
kind = "audience_webhook"
url = "{}"
audiences = ["new_app_users"]
retry_initial = "50ms"
retry_max = "200ms"

[[destinations]]
name = "push-events"
kind = "webhook"
url = "{}"
format = "batch"
linger = "20ms"
retry_initial = "50ms"
retry_max = "200ms"

[[destinations]]
name = "retarget"
kind = "audience_webhook"
url = "{}"
audiences = ["sent_not_opened"]
retry_initial = "50ms"
retry_max = "200ms"
"#,
        push.url("/audiences"),
        push_events.url("/events"),
        retarget.url("/audiences"),
    )
}

/// `(audience, userId)` pairs added and removed over every accepted audience call, in
/// order, folded into the current state per pair.
fn audience_state(server: &WebhookServer) -> BTreeSet<(String, String)> {
    let mut members = BTreeSet::new();
    for r in server.accepted() {
        let body = r.json();
        let audience = body["audience"].as_str().unwrap_or_default().to_owned();
        for m in body["add"].as_array().into_iter().flatten() {
            if let Some(u) = m["userId"].as_str() {
                members.insert((audience.clone(), u.to_owned()));
            }
        }
        for m in body["remove"].as_array().into_iter().flatten() {
            if let Some(u) = m["userId"].as_str() {
                members.remove(&(audience.clone(), u.to_owned()));
            }
        }
    }
    members
}

fn pairs(audience: &str, users: &[&str]) -> BTreeSet<(String, String)> {
    users
        .iter()
        .map(|u| (audience.to_owned(), (*u).to_owned()))
        .collect()
}

fn install(agent: &Agent, user: &str) {
    let body = json!({"batch": [
        {"type": "identify", "userId": user, "messageId": format!("id-{user}"),
         "traits": {"email": format!("{user}@example.org")}},
        {"type": "track", "event": "Application Installed", "userId": user,
         "messageId": format!("inst-{user}"), "properties": {"version": "1.0"}},
    ]});
    let r = post(
        agent.addr,
        "/v1/batch",
        &basic("test-key", ""),
        &serde_json::to_vec(&body).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The push tool posts `event` for `users` through its feed.
fn feed(gw: &Gateway, event: &str, users: &[&str]) {
    let batch: Vec<Value> = users
        .iter()
        .map(|u| {
            json!({"type": "track", "event": event, "userId": u,
                   "messageId": format!("{event}-{u}"), "properties": {"campaign": "spring"}})
        })
        .collect();
    let auth = format!("Bearer {FEED_TOKEN}");
    let r = request(
        gw.http,
        "POST",
        "/v1/feeds/push",
        &[("Authorization", auth.as_str())],
        &serde_json::to_vec(&json!({ "batch": batch })).unwrap(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Members (customer ids) of `audience` per the admin API.
fn members(gw: &Gateway, audience: &str) -> BTreeSet<String> {
    let r = get(gw.http, &format!("/v1/audiences/{audience}/members")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let list = body
        .as_array()
        .cloned()
        .or_else(|| body["members"].as_array().cloned())
        .unwrap_or_default();
    list.iter()
        .filter_map(|m| {
            m["identities"].as_array().and_then(|ids| {
                ids.iter()
                    .find(|i| i[0] == "customer_id")
                    .and_then(|i| i[1].as_str().map(str::to_owned))
            })
        })
        .collect()
}

/// What `agent` answers for `user` (`GET /v1/audiences?userId=`).
fn on_device(agent: &Agent, user: &str) -> BTreeSet<String> {
    let r = get(agent.addr, &format!("/v1/audiences?userId={user}")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn audiences_round_trip_through_tools_feeds_and_devices() {
    let push = WebhookServer::start(|_| Reply::ok());
    let push_events = WebhookServer::start(|_| Reply::ok());
    let retarget = WebhookServer::start(|_| Reply::ok());
    let mut gw = Gateway::new(&[PHONE_A, PHONE_B], &config(&push, &push_events, &retarget));
    gw.start();
    let mut phone_a = Agent::new(&gw.agent_config(PHONE_A, ""), "");
    phone_a.start();
    let mut phone_b = Agent::new(&gw.agent_config(PHONE_B, ""), "");
    phone_b.start();
    let agent_of = |device: &str| {
        if device == PHONE_A {
            &phone_a
        } else {
            &phone_b
        }
    };

    // 1. New app users reach the push tool.
    for (user, device) in USERS {
        install(agent_of(device), user);
    }
    let everyone = ["a1", "a2", "b1", "b2"];
    assert!(
        wait_until(PROMPT, || audience_state(&push)
            == pairs("new_app_users", &everyone)),
        "push tool got {:?}",
        audience_state(&push)
    );
    assert_eq!(members(&gw, "new_app_users"), set(&everyone));

    // 2. The push tool reports sends for everyone and opens for a1 and b1.
    feed(&gw, "Push Sent", &everyone);
    feed(&gw, "Push Opened", &["a1", "b1"]);
    // The app's own events reach the tool's event endpoint; the feed's never do.
    assert!(wait_until(PROMPT, || push_events
        .accepted()
        .iter()
        .any(|r| { r.text().contains("Application Installed") })));
    // Nobody enters before the hour has passed.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(members(&gw, "sent_not_opened"), BTreeSet::new());

    // 3. An hour and a bit later (the clock is moved, not slept).
    let r = request(gw.http, "POST", "/v1/clock?advance=65m", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let unopened = set(&["a2", "b2"]);
    assert!(
        wait_until(PROMPT, || members(&gw, "sent_not_opened") == unopened),
        "sent_not_opened = {:?}",
        members(&gw, "sent_not_opened")
    );
    assert!(
        wait_until(PROMPT, || audience_state(&retarget)
            == pairs("sent_not_opened", &["a2", "b2"])),
        "retargeting tool got {:?}",
        audience_state(&retarget)
    );
    let why = get(gw.http, "/v1/audiences/sent_not_opened/why/customer_id/a1").unwrap();
    assert_eq!(why.status, 200, "{}", why.body);
    assert!(why.body.contains("Push Opened"), "{}", why.body);

    // 4. The phones answer, also offline.
    let both = set(&["new_app_users", "sent_not_opened"]);
    let only_new = set(&["new_app_users"]);
    assert!(
        wait_until(PROMPT, || on_device(&phone_a, "a2") == both
            && on_device(&phone_b, "b2") == both),
        "a2 on phone A: {:?}, b2 on phone B: {:?}",
        on_device(&phone_a, "a2"),
        on_device(&phone_b, "b2")
    );
    assert_eq!(on_device(&phone_a, "a1"), only_new);
    assert_eq!(on_device(&phone_b, "b1"), only_new);
    gw.stop_kill();
    assert_eq!(on_device(&phone_a, "a2"), both, "offline answer");
    assert_eq!(on_device(&phone_b, "b1"), only_new, "offline answer");

    // 5. b2 opens later: leaves everywhere.
    gw.start();
    // The test clock lives in the process: move the new one past the window again.
    let r = request(gw.http, "POST", "/v1/clock?advance=65m", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    feed(&gw, "Push Opened", &["b2"]);
    assert!(
        wait_until(PROMPT, || members(&gw, "sent_not_opened") == set(&["a2"])),
        "sent_not_opened = {:?}",
        members(&gw, "sent_not_opened")
    );
    assert!(
        wait_until(PROMPT, || audience_state(&retarget)
            == pairs("sent_not_opened", &["a2"])),
        "retargeting tool got {:?}",
        audience_state(&retarget)
    );
    assert!(
        wait_until(PROMPT, || on_device(&phone_b, "b2") == only_new),
        "b2 on phone B: {:?}",
        on_device(&phone_b, "b2")
    );
    assert_eq!(on_device(&phone_a, "a2"), both);
    let feed_events: usize = push_events
        .accepted()
        .iter()
        .filter(|r| r.text().contains("Push Sent") || r.text().contains("Push Opened"))
        .count();
    assert_eq!(feed_events, 0, "feed events went back to the push tool");
}
