//! Webhook destinations against real HTTP servers, through the real `edge-gateway`
//! binary: events enter by the gateway's server-side ingest (`/v1/batch`,
//! `/v2/events`), are resolved into profiles, routed, minimized and POSTed to a
//! scripted server standing in for the tool (tests/src/webhook_server.rs).
//!
//! Time is compressed through config (millisecond retry delays), never by sleeping:
//! every wait is a condition with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../src/webhook_server.rs"]
mod webhook_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_agent::model::EventId;
use edge_tests::admin::{call, SOURCES, TV_KEY, TV_SECRET, WEB_KEY};
use edge_tests::http::post;
use edge_tests::{basic, wait_until, Gateway};
use serde_json::{json, Value};
use webhook_server::{Reply, WebhookServer};

const DELIVERY: Duration = Duration::from_secs(60);

/// A webhook destination with compressed retry timing; `extra` adds or overrides keys.
fn webhook(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\nretry_initial = \"10ms\"\nretry_max = \"100ms\"\nlinger = \"20ms\"\n{extra}\n"
    )
}

/// A started gateway with the harness sources and `destinations`.
fn gateway(destinations: &str) -> Gateway {
    let mut gw = Gateway::new(&[], &format!("{SOURCES}\n{destinations}"));
    gw.start();
    gw
}

/// A UUID event id, distinct per test (`test`) and event (`n`).
fn id(test: u32, n: u64) -> String {
    format!("{test:08x}-0000-4000-8000-{n:012x}")
}

fn track(id: &str, user: &str, event: &str, categories: Value) -> Value {
    json!({
        "type": "track",
        "messageId": id,
        "userId": user,
        "anonymousId": format!("anon-{user}"),
        "event": event,
        "properties": { "asset": "ep-1", "position": 12 },
        "context": {
            "device": { "id": "roku-1", "advertisingId": "ad-77" },
            "ip": "10.1.2.3",
            "consent": { "categoryPreferences": categories },
        },
    })
}

fn send_segment(gw: &Gateway, events: Vec<Value>) {
    let body = json!({ "writeKey": WEB_KEY, "batch": events });
    let r = post(gw.http, "/v1/batch", "", body.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The status of destination `name` from `GET /v1/destinations`.
fn status(gw: &Gateway, name: &str) -> Value {
    let r = call(gw.http, "GET", "/v1/destinations", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .and_then(|all| all.iter().find(|d| d["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no destination {name} in {}", r.body))
}

fn dead_letters(gw: &Gateway, name: &str) -> Vec<Value> {
    let path = format!("/v1/destinations/{name}/dead-letters");
    let r = call(gw.http, "GET", &path, None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().cloned().unwrap_or_default()
}

/// `Idempotency-Key` of every request the server accepted, with how often.
fn accepted_keys(server: &WebhookServer) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    for r in server.accepted() {
        let key = r.header("idempotency-key").unwrap_or_default().to_owned();
        *keys.entry(key).or_insert(0) += 1;
    }
    keys
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn a_long_storm_of_503s_then_recovery_delivers_everything_once() {
    const EVENTS: u64 = 60;
    const FAILURES: usize = 300;
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let server = WebhookServer::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) < FAILURES {
            Reply::status(503).body("upstream down")
        } else {
            Reply::ok()
        }
    });
    let gw = gateway(&webhook(
        "hook",
        &server.url("/in"),
        "concurrency = 4\nbearer_token = \"s3cret\"",
    ));
    let ids: Vec<String> = (0..EVENTS).map(|n| id(0xa, n)).collect();
    send_segment(
        &gw,
        ids.iter()
            .map(|i| track(i, "u1", "Play", json!({ "analytics": true })))
            .collect(),
    );
    let delivered = wait_until(DELIVERY, || accepted_keys(&server).len() == ids.len());
    let keys = accepted_keys(&server);
    assert!(
        delivered,
        "{} of {EVENTS} delivered after {} requests; status {}",
        keys.len(),
        server.requests().len(),
        status(&gw, "hook")
    );
    assert!(server.requests().len() > FAILURES, "the storm was not seen");
    let expected: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(keys.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    for r in server.accepted() {
        let body = r.json();
        assert_eq!(
            key_of(&body["messageId"]),
            r.header("idempotency-key").unwrap()
        );
        assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/in"));
    }
    assert!(wait_until(DELIVERY, || u(&status(&gw, "hook")["backlog"]) == 0));
    let s = status(&gw, "hook");
    assert_eq!(u(&s["delivered"]), EVENTS, "{s}");
    assert!(u(&s["retries"]) >= FAILURES as u64, "{s}");
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("503"),
        "{s}"
    );
}

#[test]
fn retry_after_from_a_429_is_honoured_over_the_backoff() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let server = WebhookServer::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::status(429).retry_after("1")
        } else {
            Reply::ok()
        }
    });
    // retry_max (100ms) is far below the 1 s the server asks for.
    let gw = gateway(&webhook("hook", &server.url("/in"), ""));
    let key = id(0xb, 1);
    send_segment(
        &gw,
        vec![track(&key, "u1", "Play", json!({ "analytics": true }))],
    );
    assert!(wait_until(DELIVERY, || !server.accepted().is_empty()));
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].status, 429);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );
    assert_eq!(requests[1].header("idempotency-key"), Some(key.as_str()));
}

#[test]
fn timeouts_are_retried_and_a_batch_is_delivered_once_the_server_answers() {
    const EVENTS: u64 = 25;
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let server = WebhookServer::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) < 3 {
            // Held back far beyond the destination's timeout.
            Reply::status(503).delay(Duration::from_secs(2))
        } else {
            Reply::ok()
        }
    });
    let gw = gateway(&webhook(
        "hook",
        &server.url("/batch"),
        "format = \"batch\"\nbatch_size = 10\ntimeout = \"300ms\"\nconcurrency = 1",
    ));
    let ids: Vec<String> = (0..EVENTS).map(|n| id(0xc, n)).collect();
    send_segment(
        &gw,
        ids.iter()
            .map(|i| track(i, "u1", "Play", json!({ "analytics": true })))
            .collect(),
    );
    let message_ids = || {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in server.accepted() {
            let body = r.json();
            assert!(body["sentAt"].is_string(), "{body}");
            let batch = body["batch"].as_array().cloned().unwrap_or_default();
            assert!(!batch.is_empty() && batch.len() <= 10, "{body}");
            assert_eq!(
                r.header("idempotency-key"),
                Some(key_of(&batch[0]["messageId"]).as_str())
            );
            for e in batch {
                *seen
                    .entry(e["messageId"].as_str().unwrap().to_owned())
                    .or_insert(0) += 1;
            }
        }
        seen
    };
    assert!(
        wait_until(DELIVERY, || message_ids().len() == ids.len()),
        "{:?}; status {}",
        message_ids(),
        status(&gw, "hook")
    );
    let seen = message_ids();
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    let timed_out = server
        .requests()
        .iter()
        .filter(|r| !r.delay.is_zero())
        .count();
    assert_eq!(timed_out, 3);
    let s = status(&gw, "hook");
    assert!(u(&s["retries"]) >= 3, "{s}");
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("no answer"),
        "{s}"
    );
}

#[test]
fn a_refused_event_goes_to_the_dead_letters_and_is_replayed_after_a_config_fix() {
    // The tool refuses requests without its API version header.
    let server = WebhookServer::start(|r| {
        if r.header("x-api-version") == Some("2") {
            Reply::ok()
        } else {
            Reply::status(400).body("{\"error\":\"unsupported X-Api-Version\"}")
        }
    });
    let url = server.url("/in");
    let mut gw = gateway(&webhook(
        "hook",
        &url,
        "[destinations.headers]\nX-Api-Version = \"1\"",
    ));
    let ids: Vec<String> = (0..3).map(|n| id(0xd, n)).collect();
    send_segment(
        &gw,
        ids.iter()
            .map(|i| track(i, "u1", "Play", json!({ "analytics": true })))
            .collect(),
    );
    assert!(
        wait_until(DELIVERY, || dead_letters(&gw, "hook").len() == ids.len()),
        "{:?}",
        dead_letters(&gw, "hook")
    );
    let letters = dead_letters(&gw, "hook");
    let refused: BTreeSet<String> = letters
        .iter()
        .map(|l| l["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(refused, ids.iter().cloned().collect());
    for l in &letters {
        assert!(l["reason"].as_str().unwrap().contains("HTTP 400"), "{l}");
        assert!(
            l["reason"].as_str().unwrap().contains("X-Api-Version"),
            "{l}"
        );
        assert_eq!(
            key_of(&l["body"]["messageId"]),
            l["event_id"].as_str().unwrap()
        );
    }
    // Refused, not stuck: the destination moves on, and a refusal is not retried.
    let moved_on = || {
        let s = status(&gw, "hook");
        (u(&s["dead_letters"]), u(&s["backlog"])) == (3, 0)
    };
    assert!(wait_until(DELIVERY, moved_on), "{}", status(&gw, "hook"));
    assert_eq!(server.requests().len(), 3);
    assert!(server.accepted().is_empty());

    // The fix: the right header, and a restart.
    let (ok, log) = gw.stop_term();
    assert!(ok, "{log}");
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        text.replace("X-Api-Version = \"1\"", "X-Api-Version = \"2\""),
    )
    .unwrap();
    gw.start();
    assert_eq!(
        dead_letters(&gw, "hook").len(),
        3,
        "dead letters survive a restart"
    );
    let r = call(gw.http, "POST", "/v1/destinations/hook/replay", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["replayed"], 3);
    assert!(wait_until(DELIVERY, || accepted_keys(&server).len() == 3));
    let keys = accepted_keys(&server);
    assert_eq!(
        keys.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(keys.values().all(|n| *n == 1), "{keys:?}");
    assert!(wait_until(DELIVERY, || dead_letters(&gw, "hook").is_empty()));
    assert_eq!(u(&status(&gw, "hook")["dead_letters"]), 0);
    let r = call(gw.http, "POST", "/v1/destinations/nope/replay", None).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn a_destination_allowed_customer_id_and_ltv_receives_exactly_those() {
    let server = WebhookServer::start(|_| Reply::ok());
    let gw = gateway(&webhook(
        "crm",
        &server.url("/crm"),
        "identities = [\"customer_id\"]\nattributes = [\"ltv\"]\nproperties = []\ncontext = false",
    ));
    let (identify_id, play_id) = (id(0xe, 1), id(0xe, 2));
    let identify = json!({
        "type": "identify",
        "messageId": identify_id,
        "userId": "cust-1",
        "anonymousId": "anon-1",
        "traits": { "email": "ada@example.com", "ltv": 120, "plan": "family", "name": "Ada" },
        "context": { "device": { "id": "roku-1" }, "ip": "10.1.2.3", "traits": { "phone": "+4415550" } },
    });
    send_segment(&gw, vec![identify]);
    // The track comes later, so its profile already holds the identify's traits.
    assert!(wait_until(DELIVERY, || server.accepted().len() == 1));
    send_segment(
        &gw,
        vec![track(
            &play_id,
            "cust-1",
            "Play",
            json!({ "analytics": true }),
        )],
    );
    assert!(wait_until(DELIVERY, || server.accepted().len() == 2));
    let requests = server.accepted();
    for r in &requests {
        let text = r.text();
        for leak in [
            "ada@",
            "anon-",
            "roku-1",
            "ad-77",
            "10.1.2.3",
            "family",
            "Ada",
            "+4415550",
            "ep-1",
            "_edge",
            "consent",
            "analytics",
        ] {
            assert!(!text.contains(leak), "`{leak}` left: {text}");
        }
        // Exactly these bytes, with the gateway's timestamps filled in.
        let body = r.json();
        let (kind, name) = if body["type"] == "identify" {
            ("identify", None)
        } else {
            ("track", Some("Play"))
        };
        let key = body["messageId"].as_str().unwrap();
        assert_eq!(
            r.header("idempotency-key"),
            Some(key_of(&body["messageId"]).as_str())
        );
        let event = name
            .map(|n| format!("\"event\":\"{n}\","))
            .unwrap_or_default();
        let expected = format!(
            "{{{event}\"messageId\":\"{key}\",\"originalTimestamp\":{},\"receivedAt\":{},\"timestamp\":{},\"traits\":{{\"ltv\":120}},\"type\":\"{kind}\",\"userId\":\"cust-1\"}}",
            body["originalTimestamp"], body["receivedAt"], body["timestamp"]
        );
        assert_eq!(text, expected);
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{text}");
    }
    let keys: BTreeSet<&str> = requests
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    assert_eq!(
        keys,
        [identify_id.as_str(), play_id.as_str()]
            .into_iter()
            .collect()
    );
}

#[test]
fn consent_keeps_denied_advertising_and_ccpa_opt_outs_away() {
    let ads = WebhookServer::start(|_| Reply::ok());
    let sale = WebhookServer::start(|_| Reply::ok());
    let gw = gateway(&format!(
        "{}{}",
        webhook(
            "ads",
            &ads.url("/ads"),
            "require_purposes = [\"advertising\"]"
        ),
        webhook("resale", &sale.url("/sale"), "sale = true"),
    ));
    // Segment users: one granted advertising, one denied it.
    let granted = id(0xf, 1);
    let denied = id(0xf, 2);
    send_segment(
        &gw,
        vec![
            track(
                &granted,
                "yes-ads",
                "Play",
                json!({ "analytics": true, "advertising": true }),
            ),
            track(
                &denied,
                "no-ads",
                "Play",
                json!({ "analytics": true, "advertising": false }),
            ),
        ],
    );
    // mParticle users: both grant advertising; one opted out of sale (CCPA).
    let mparticle = |customer: &str, message: &str, opted_out: bool| {
        json!({
            "user_identities": { "customer_id": customer },
            "consent_state": {
                "gdpr": { "advertising": { "consented": true, "timestamp_unixtime_ms": 1_700_000_000_000u64 } },
                "ccpa": { "data_sale_opt_out": { "consented": opted_out, "timestamp_unixtime_ms": 1_700_000_000_000u64 } }
            },
            "events": [{ "event_type": "custom_event", "data": { "event_name": "Play", "custom_event_type": "media", "source_message_id": message } }]
        })
    };
    for (customer, message, opted_out) in [
        ("ccpa-out", "mp-out-1", true),
        ("ccpa-in", "mp-in-1", false),
    ] {
        let body = mparticle(customer, message, opted_out).to_string();
        let r = post(
            gw.http,
            "/v2/events",
            &basic(TV_KEY, TV_SECRET),
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
    }
    // Every event was looked at by both destinations (delivered or filtered).
    let settled = |name: &str| {
        let s = status(&gw, name);
        u(&s["delivered"]) + u(&s["filtered"]) == 4 && u(&s["backlog"]) == 0
    };
    assert!(
        wait_until(DELIVERY, || settled("ads") && settled("resale")),
        "{} {}",
        status(&gw, "ads"),
        status(&gw, "resale")
    );
    let users = |server: &WebhookServer| -> BTreeSet<String> {
        server
            .accepted()
            .iter()
            .map(|r| r.json()["userId"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_eq!(
        users(&ads),
        ["yes-ads", "ccpa-out", "ccpa-in"].map(String::from).into()
    );
    assert_eq!(
        users(&sale),
        ["yes-ads", "no-ads", "ccpa-in"].map(String::from).into()
    );
    assert_eq!(u(&status(&gw, "ads")["filtered"]), 1);
    assert_eq!(u(&status(&gw, "resale")["filtered"]), 1);
    assert_eq!(ads.accepted().len(), 3);
    assert_eq!(sale.accepted().len(), 3);
}

#[test]
fn batch_mode_delivers_what_accumulated_once_per_schedule() {
    let server = WebhookServer::start(|_| Reply::ok());
    let started = std::time::Instant::now();
    let gw = gateway(&webhook(
        "nightly",
        &server.url("/bulk"),
        "mode = \"batch\"\nschedule = \"3s\"\nformat = \"batch\"\nbatch_size = 500",
    ));
    let ids: Vec<String> = (0..40).map(|n| id(0x10, n)).collect();
    send_segment(
        &gw,
        ids.iter()
            .map(|i| track(i, "u1", "Play", json!({ "analytics": true })))
            .collect(),
    );
    assert!(wait_until(DELIVERY, || !server.accepted().is_empty()));
    let requests = server.requests();
    // The first run comes one schedule after the start, with everything in one request.
    assert!(
        requests[0].at - started >= Duration::from_millis(2900),
        "ran after {:?}",
        requests[0].at - started
    );
    assert_eq!(requests.len(), 1, "{requests:?}");
    let sent: BTreeSet<String> = requests[0].json()["batch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, ids.iter().cloned().collect());
}

#[test]
fn the_rate_limit_spaces_requests() {
    let server = WebhookServer::start(|_| Reply::ok());
    let gw = gateway(&webhook(
        "slow",
        &server.url("/in"),
        "rate_limit = 5\nconcurrency = 4",
    ));
    let ids: Vec<String> = (0..8).map(|n| id(0x11, n)).collect();
    send_segment(
        &gw,
        ids.iter()
            .map(|i| track(i, "u1", "Play", json!({ "analytics": true })))
            .collect(),
    );
    assert!(wait_until(DELIVERY, || server.accepted().len() == ids.len()));
    let requests = server.requests();
    assert_eq!(requests.len(), ids.len());
    // 5 a second with a burst of one: 8 requests span at least 7/5 s.
    let span = requests[ids.len() - 1].at - requests[0].at;
    assert!(
        span >= Duration::from_millis(1300),
        "8 requests in {span:?}"
    );
}

/// The Idempotency-Key (event id) the gateway derives from an app's `messageId`.
fn key_of(message_id: &Value) -> String {
    EventId::from_message_id(message_id.as_str().unwrap_or_default()).to_string()
}
