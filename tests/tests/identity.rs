//! Identity resolution end to end: real `edge-agent`s on a shared TV and a phone send
//! through a real `edge-gateway` over MQTT/mTLS (plus the gateway's server-side
//! Segment API for a web backend), and the profiles are read back from the admin API.
//!
//! - a family TV with two logged-in customers keeps two profiles, although the agent
//!   gives both the TV's one anonymous id;
//! - anonymous browsing on a phone, then a login: one profile, and what was computed
//!   before the login (orders, revenue) counts;
//! - a login that links a phone's anonymous profile to a customer already known from
//!   the web merges them: attributes and computed attributes move to the survivor;
//! - blocklisted values (`0`, `null`, `test@example.com`) link nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use edge_tests::admin::WEB_KEY;
use edge_tests::http::{get, post};
use edge_tests::{basic, wait_until, Agent, Gateway};
use serde_json::{json, Value};

const TV: &str = "tv-1";
const PHONE: &str = "phone-1";
const PROMPT: Duration = Duration::from_secs(30);

/// Web source plus the computed attributes the scenarios look at.
const EXTRA: &str = "[[sources]]\nname = \"web\"\nwrite_key = \"dev-write-key\"\n\n[[computed]]\nname = \"orders\"\nkind = \"count\"\nevent = \"Order Completed\"\n\n[[computed]]\nname = \"ltv\"\nkind = \"sum\"\nevent = \"Order Completed\"\nproperty = \"revenue\"\n\n[[computed]]\nname = \"first_plan\"\nkind = \"first\"\nevent_type = \"identify\"\nproperty = \"plan\"\n";

fn site() -> (Gateway, Agent, Agent) {
    let mut gw = Gateway::new(&[TV, PHONE], EXTRA);
    gw.start();
    let mut tv = Agent::new(&gw.agent_config(TV, ""), "");
    tv.start();
    let mut phone = Agent::new(&gw.agent_config(PHONE, ""), "");
    phone.start();
    (gw, tv, phone)
}

fn send(agent: &Agent, events: &[Value]) {
    let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
    let r = post(agent.addr, "/v1/batch", &basic("test-key", ""), &body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

fn send_web(gw: &Gateway, events: &[Value]) {
    let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
    let r = post(gw.http, "/v1/batch", &basic(WEB_KEY, ""), &body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The profile holding `(kind, value)`, or `None` (404).
fn profile(gw: &Gateway, kind: &str, value: &str) -> Option<Value> {
    let value = value.replace('@', "%40");
    let r = get(gw.http, &format!("/v1/profiles/{kind}/{value}")).unwrap();
    match r.status {
        200 => Some(r.json()),
        404 => None,
        s => panic!("profile lookup answered {s}: {}", r.body),
    }
}

/// Waits until the file destination has `n` events with a `tag` property: everything
/// sent so far was resolved (destinations read only resolved events).
fn wait_delivered(gw: &Gateway, n: usize) {
    let tagged = || {
        gw.delivered()
            .iter()
            .filter(|l| l["properties"]["tag"].is_string() || l["traits"]["tag"].is_string())
            .count()
    };
    assert!(
        wait_until(PROMPT, || tagged() >= n),
        "delivered {} of {n} tagged events",
        tagged()
    );
}

/// `section` (`attributes` or `computed`) entry `name` of a profile view.
fn field<'a>(p: &'a Value, section: &str, name: &str) -> Option<&'a Value> {
    p[section]
        .as_array()?
        .iter()
        .find(|kv| kv[0] == name)
        .map(|kv| &kv[1])
}

fn has_identity(p: &Value, kind: &str, value: &str) -> bool {
    p["identities"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|i| i[0] == kind && i[1] == value))
}

fn order(user: Option<&str>, anon: &str, tag: &str, revenue: f64) -> Value {
    let mut e = json!({"type": "track", "event": "Order Completed", "anonymousId": anon,
        "messageId": tag, "properties": {"revenue": revenue, "tag": tag}});
    if let Some(u) = user {
        e["userId"] = json!(u);
    }
    e
}

fn identify(user: &str, anon: &str, tag: &str, traits: Value) -> Value {
    let mut traits = traits;
    traits["tag"] = json!(tag);
    json!({"type": "identify", "userId": user, "anonymousId": anon, "messageId": tag,
        "traits": traits})
}

#[test]
fn identity_scenarios_over_real_agents() {
    let (gw, tv, phone) = site();

    // The family TV: one anonymous id (the agent's), two customers.
    send(
        &tv,
        &[
            identify(
                "mom",
                "tv-anon",
                "tv-1",
                json!({"email": "mom@family.tv", "plan": "family"}),
            ),
            order(Some("mom"), "tv-anon", "tv-2", 20.0),
            identify("dad", "tv-anon", "tv-3", json!({"email": "dad@family.tv"})),
            order(Some("dad"), "tv-anon", "tv-4", 5.0),
            // Logged out: belongs to whoever holds the TV's anonymous id, merges nothing.
            json!({"type": "track", "event": "Browse", "anonymousId": "tv-anon",
                "messageId": "tv-5", "properties": {"tag": "tv-5"}}),
        ],
    );
    wait_delivered(&gw, 5);
    let mom = profile(&gw, "customer_id", "mom").expect("mom has a profile");
    let dad = profile(&gw, "customer_id", "dad").expect("dad has a profile");
    assert_ne!(
        mom["id"], dad["id"],
        "the TV melted two customers: {mom} {dad}"
    );
    assert!(has_identity(&mom, "email", "mom@family.tv"), "{mom}");
    assert!(!has_identity(&dad, "email", "mom@family.tv"), "{dad}");
    assert!(!has_identity(&mom, "customer_id", "dad"), "{mom}");
    assert_eq!(field(&mom, "computed", "orders"), Some(&json!(1)), "{mom}");
    assert_eq!(field(&dad, "computed", "orders"), Some(&json!(1)), "{dad}");
    assert_eq!(
        profile(&gw, "email", "dad@family.tv").map(|p| p["id"].clone()),
        Some(dad["id"].clone())
    );

    // A phone browses anonymously, orders twice, then logs in as zoe.
    send(
        &phone,
        &[
            order(None, "ph-anon", "ph-1", 10.0),
            order(None, "ph-anon", "ph-2", 12.5),
        ],
    );
    wait_delivered(&gw, 7);
    let anonymous = profile(&gw, "anonymous_id", "ph-anon").expect("anonymous profile");
    assert_eq!(field(&anonymous, "computed", "orders"), Some(&json!(2)));
    send(
        &phone,
        &[identify(
            "zoe",
            "ph-anon",
            "ph-3",
            json!({"email": "zoe@example.org"}),
        )],
    );
    wait_delivered(&gw, 8);
    let zoe = profile(&gw, "customer_id", "zoe").expect("zoe has a profile");
    assert_eq!(
        zoe["id"], anonymous["id"],
        "login stitched the anonymous profile"
    );
    assert!(has_identity(&zoe, "anonymous_id", "ph-anon"), "{zoe}");
    assert_eq!(field(&zoe, "computed", "orders"), Some(&json!(2)), "{zoe}");
    assert_eq!(field(&zoe, "computed", "ltv"), Some(&json!(22.5)), "{zoe}");

    // Known from the web as customer "lea" (with a plan), and as an anonymous visitor
    // with an order; her login on the phone links both: one profile.
    send_web(
        &gw,
        &[
            identify(
                "lea",
                "web-anon",
                "web-1",
                json!({"plan": "pro", "city": "Lyon"}),
            ),
            order(Some("lea"), "web-anon", "web-2", 100.0),
        ],
    );
    // Anonymous on the web (the phone's agent would fill in zoe, its remembered user).
    send_web(
        &gw,
        &[
            order(None, "ph-anon-2", "ph-4", 1.0),
            json!({"type": "identify", "anonymousId": "ph-anon-2", "messageId": "ph-5",
                "traits": {"tag": "ph-5", "city": "Paris", "newsletter": true}}),
        ],
    );
    wait_delivered(&gw, 12);
    let web = profile(&gw, "customer_id", "lea").unwrap();
    let anon2 = profile(&gw, "anonymous_id", "ph-anon-2").unwrap();
    assert_ne!(web["id"], anon2["id"]);
    send(&phone, &[identify("lea", "ph-anon-2", "ph-6", json!({}))]);
    wait_delivered(&gw, 13);
    let lea = profile(&gw, "customer_id", "lea").unwrap();
    assert_eq!(
        profile(&gw, "anonymous_id", "ph-anon-2").map(|p| p["id"].clone()),
        Some(lea["id"].clone()),
        "both identifiers lead to the merged profile"
    );
    let survivor = web["id"]
        .as_u64()
        .unwrap()
        .min(anon2["id"].as_u64().unwrap());
    assert_eq!(lea["id"], survivor, "the lower id survives: {lea}");
    assert!(
        lea["merged_from"].as_array().is_some_and(|m| !m.is_empty()),
        "the merge is recorded: {lea}"
    );
    assert_eq!(field(&lea, "computed", "orders"), Some(&json!(2)), "{lea}");
    assert_eq!(field(&lea, "computed", "ltv"), Some(&json!(101.0)), "{lea}");
    assert_eq!(
        field(&lea, "computed", "first_plan"),
        Some(&json!("pro")),
        "{lea}"
    );
    assert_eq!(
        field(&lea, "attributes", "plan"),
        Some(&json!("pro")),
        "{lea}"
    );
    assert_eq!(
        field(&lea, "attributes", "newsletter"),
        Some(&json!(true)),
        "{lea}"
    );
    // The newer value wins: Paris was stated after Lyon.
    assert_eq!(
        field(&lea, "attributes", "city"),
        Some(&json!("Paris")),
        "{lea}"
    );

    // Junk identifiers link nothing.
    let before = get(gw.http, "/v1/profiles").unwrap().json()["count"].clone();
    send_web(
        &gw,
        &[
            json!({"type": "identify", "userId": "0", "anonymousId": "null", "messageId": "junk-1",
                "traits": {"email": "test@example.com", "tag": "junk-1"}}),
            json!({"type": "track", "event": "Order Completed", "userId": "null",
                "anonymousId": "0", "messageId": "junk-2", "properties": {"tag": "junk-2"}}),
        ],
    );
    wait_delivered(&gw, 15);
    assert_eq!(profile(&gw, "customer_id", "0"), None);
    assert_eq!(profile(&gw, "customer_id", "null"), None);
    assert_eq!(profile(&gw, "anonymous_id", "0"), None);
    assert_eq!(profile(&gw, "email", "test@example.com"), None);
    assert_eq!(
        get(gw.http, "/v1/profiles").unwrap().json()["count"],
        before,
        "junk made a profile"
    );
}

/// Computed attributes count every event exactly once across gateway SIGKILLs: the
/// profile stage commits most groups without fsync and checkpoints once a second, so
/// a kill reverts it to its last checkpoint and it resolves the same inbox records
/// again from there.
#[test]
fn computed_counts_stay_exact_across_gateway_kills() {
    const USERS: usize = 20;
    const ROUNDS: usize = 30;
    const PER_ROUND: usize = 50;
    let mut gw = Gateway::new(&[], EXTRA);
    gw.start();
    let mut kills = 0;
    for round in 0..ROUNDS {
        let events: Vec<Value> = (0..PER_ROUND)
            .map(|i| {
                let user = format!("k-{}", (round * PER_ROUND + i) % USERS);
                let tag = format!("kill-{round}-{i}");
                order(Some(&user), &format!("anon-{user}"), &tag, 1.0)
            })
            .collect();
        let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
        // Retried until stored: the same messageIds are stored once.
        let stored = wait_until(PROMPT, || {
            post(gw.http, "/v1/batch", &basic(WEB_KEY, ""), &body).is_ok_and(|r| r.status == 200)
        });
        assert!(stored, "round {round} never stored");
        if round % 6 == 5 {
            gw.stop_kill();
            kills += 1;
            gw.start();
        }
    }
    assert_eq!(kills, ROUNDS / 6);
    wait_delivered(&gw, ROUNDS * PER_ROUND);
    let per_user = ROUNDS * PER_ROUND / USERS;
    for u in 0..USERS {
        let p = profile(&gw, "customer_id", &format!("k-{u}")).expect("profile");
        assert_eq!(
            field(&p, "computed", "orders"),
            Some(&json!(per_user)),
            "k-{u}: {p}"
        );
        assert_eq!(p["events"], json!(per_user), "k-{u}: {p}");
    }
}

/// Inbox records the profile stage resolves in one group (`GROUP_MAX` of the gateway's
/// private `profiles::stage`). More than this behind, it reads full groups and keeps
/// their profile changes in memory until its next flush.
const STAGE_GROUP: usize = 2_000;

/// Events counted in the flushed profile of customer `user` (0 without a profile).
fn events_of(gw: &Gateway, user: &str) -> usize {
    profile(gw, "customer_id", user).map_or(0, |p| p["events"].as_u64().unwrap() as usize)
}

/// Computed attributes count every event exactly once across gateway SIGKILLs that land
/// while the profile stage is behind the inbox. Behind, it resolves full groups and
/// keeps the changed profiles, links and cursor in memory, flushing about once a
/// second: a kill drops those changes (and the enrichment rows past the last durable
/// commit), and the stage resolves the records again from its last durable flush.
#[test]
fn computed_counts_stay_exact_when_killed_with_profile_changes_pending() {
    const USERS: usize = 50;
    const ROUNDS: usize = 5;
    const BATCHES: usize = 10;
    const BATCH: usize = 2_000;
    /// Threads posting a round's batches: the ingest path overlaps their requests.
    const POSTERS: usize = 4;
    const SESSIONS: usize = 100;
    /// The harness config keeps the gateway's default `[http] max_body`.
    const MAX_BODY: usize = 512 << 10;
    let mut gw = Gateway::new(&[], EXTRA);
    gw.start();
    let mut posted = [0usize; USERS];
    let mut unflushed = Vec::new();
    let mut last_flushed = 0;
    for round in 0..ROUNDS {
        // A customer's orders come from SESSIONS anonymous ids (web sessions), which
        // the stage links to the profile up to `max_identities` (100), and every
        // resolved event's enrichment row carries the profile's identities. Resolving
        // such an event costs the stage more than storing it costs ingest, so these
        // posts outrun the stage (with one anonymous id per customer, a 2-core machine
        // resolves as fast as it stores and the stage never falls behind).
        let bodies: Vec<Vec<u8>> = (0..BATCHES)
            .map(|b| {
                let events: Vec<Value> = (0..BATCH)
                    .map(|i| {
                        let n = b * BATCH + i;
                        let u = n % USERS;
                        posted[u] += 1;
                        let anon = format!("s-{u}-{}", n / USERS % SESSIONS);
                        let tag = format!("wb-{round}-{b}-{i}");
                        order(Some(&format!("wb-{u}")), &anon, &tag, 1.0)
                    })
                    .collect();
                let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
                assert!(body.len() < MAX_BODY, "batch body of {} bytes", body.len());
                body
            })
            .collect();
        let http = gw.http;
        std::thread::scope(|s| {
            for first in 0..POSTERS {
                let bodies = &bodies;
                s.spawn(move || {
                    for (b, body) in bodies.iter().enumerate().skip(first).step_by(POSTERS) {
                        // Retried until stored: the same messageIds are stored once.
                        let stored = wait_until(PROMPT, || {
                            post(http, "/v1/batch", &basic(WEB_KEY, ""), body)
                                .is_ok_and(|r| r.status == 200)
                        });
                        assert!(stored, "round {round} batch {b} never stored");
                    }
                });
            }
        });
        // What the kill hits. Profile lookups read the stage's last flush; a probe
        // customer gets one in USERS of every batch. First wait until the restarted
        // stage has flushed past what the last kill saw, so this kill reverts it to a
        // flush of this run, not to one the previous kill already tested. Then its
        // posted but unflushed events, times USERS, are the inbox records the stage
        // will resolve again or for the first time: more than two groups' worth means
        // it was working through full groups, changes pending in memory.
        let mut flushed = 0;
        let progressed = wait_until(PROMPT, || {
            flushed = events_of(&gw, "wb-0");
            flushed > last_flushed
        });
        assert!(progressed, "round {round}: no flush after the restart");
        last_flushed = flushed;
        unflushed.push(posted[0].saturating_sub(flushed) * USERS);
        gw.stop_kill();
        gw.start();
    }
    let behind = unflushed.iter().filter(|n| **n > 2 * STAGE_GROUP).count();
    assert!(
        behind >= ROUNDS - 1,
        "the stage was not behind at most kills; records unflushed at each: {unflushed:?}"
    );
    let total = ROUNDS * BATCHES * BATCH;
    // Counting lines is cheap, parsing them all is not: wait on the count first. The
    // last kill left the stage the longest backlog to work through.
    assert!(
        wait_until(Duration::from_secs(120), || gw.delivered_count() >= total),
        "delivered {} of {total} lines",
        gw.delivered_count()
    );
    wait_delivered(&gw, total);
    // The file destination writes each event once across crashes, too.
    let mut tags: Vec<String> = gw
        .delivered()
        .iter()
        .filter_map(|l| l["properties"]["tag"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(tags.len(), total, "delivered lines");
    tags.sort_unstable();
    tags.dedup();
    assert_eq!(tags.len(), total, "distinct events delivered");
    for (u, n) in posted.iter().enumerate() {
        let p = profile(&gw, "customer_id", &format!("wb-{u}")).expect("profile");
        assert_eq!(
            field(&p, "computed", "orders"),
            Some(&json!(n)),
            "wb-{u}: {p}"
        );
        assert_eq!(p["events"], json!(n), "wb-{u}: {p}");
    }
    eprintln!("records unflushed at each kill: {unflushed:?}");
}
