//! Server-side ingest on the gateway's HTTP API: Segment and mParticle requests from
//! sources without an agent, against the real `edge-gateway` binary, checked where
//! they end up (the file destination) and in how requests are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use edge_tests::admin::{gateway, TV_KEY, TV_SECRET, WEB_KEY};
use edge_tests::http::{post, request};
use edge_tests::{basic, fixture, wait_until, Gateway};

const DELIVERY: Duration = Duration::from_secs(30);

/// `messageId`s of every delivered line.
fn delivered_ids(gw: &Gateway) -> Vec<String> {
    gw.delivered()
        .iter()
        .map(|l| l["messageId"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Destinations send the app's own `messageId`.
fn event_id(message_id: &str) -> String {
    message_id.to_owned()
}

/// Delivered `messageId`s of a fixture's events.
fn fixture_ids(name: &str, pointer: &str, field: &str) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(&fixture(name)).unwrap();
    v.pointer(pointer)
        .and_then(|b| b.as_array())
        .unwrap()
        .iter()
        .map(|e| event_id(e.pointer(field).and_then(|m| m.as_str()).unwrap()))
        .collect()
}

#[test]
fn segment_and_mparticle_fixtures_reach_the_file_destination() {
    let mut gw = gateway("");
    gw.start();
    let r = post(
        gw.http,
        "/v1/batch",
        "",
        fixture("segment-batch.json").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!({"success": true}));
    let r = post(
        gw.http,
        "/v2/events",
        &basic(TV_KEY, TV_SECRET),
        fixture("mparticle-batch.json").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);

    assert!(
        wait_until(DELIVERY, || gw.delivered_count() >= 11),
        "delivered: {:?}",
        delivered_ids(&gw)
    );
    let got: Vec<String> = delivered_ids(&gw);
    assert_eq!(got.len(), 11, "{got:?}");
    let mut want = fixture_ids("segment-batch.json", "/batch", "/messageId");
    want.extend(fixture_ids(
        "mparticle-batch.json",
        "/events",
        "/data/source_message_id",
    ));
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), want);

    let lines = gw.delivered();
    let identify = lines
        .iter()
        .find(|l| l["type"] == "identify")
        .expect("the identify call");
    assert_eq!(identify["userId"], "cust-1001");
    assert_eq!(identify["traits"]["email"], "ada@example.com");
    // The request's consent travels on the event: granted purposes only.
    assert_eq!(
        identify["context"]["consent"],
        serde_json::json!({"granted": ["analytics", "personalization"], "ccpaOptOut": false}),
        "{identify}"
    );
    let played = lines
        .iter()
        .find(|l| l["event"] == "Video Played")
        .expect("the mParticle custom event");
    assert_eq!(played["userId"], "cust-2002");
    // mParticle: `data_sale_opt_out` consented means the user opted out.
    assert_eq!(
        played["context"]["consent"],
        serde_json::json!({"granted": ["analytics"], "ccpaOptOut": true}),
        "{played}"
    );

    // Each source's events are counted under its own sender.
    let web = edge_tests::http::get(gw.http, "/v1/devices/source:web").unwrap();
    assert_eq!(web.status, 200, "{}", web.body);
    assert_eq!(web.json()["events"], 6);
    let tv = edge_tests::http::get(gw.http, "/v1/devices/source:tv").unwrap();
    assert_eq!(tv.json()["events"], 5);
    let (clean, log) = gw.stop_term();
    assert!(clean, "{log}");
}

#[test]
fn a_retried_batch_is_stored_once() {
    let mut gw = gateway("");
    gw.start();
    let batch = fixture("segment-batch.json");
    for attempt in 0..3 {
        let r = post(gw.http, "/v1/batch", &basic(WEB_KEY, ""), batch.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "attempt {attempt}: {}", r.body);
    }
    // A later event behind the retries: once it is out, so is everything before it.
    let sentinel = r#"{"userId":"cust-1001","event":"Sentinel","messageId":"sentinel-1"}"#;
    let r = post(
        gw.http,
        "/v1/track",
        &basic(WEB_KEY, ""),
        sentinel.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let sentinel_id = event_id("sentinel-1");
    assert!(wait_until(DELIVERY, || delivered_ids(&gw).contains(&sentinel_id)));
    let ids = delivered_ids(&gw);
    assert_eq!(ids.len(), 7, "each event once, then the sentinel: {ids:?}");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 7);

    let web = edge_tests::http::get(gw.http, "/v1/devices/source:web").unwrap();
    assert_eq!(web.json()["events"], 7);
    assert_eq!(web.json()["duplicates"], 12);
    let metrics = edge_tests::http::get(gw.http, "/metrics").unwrap().body;
    assert!(
        metrics.contains("edge_gateway_source_events_duplicate_total 12"),
        "{metrics}"
    );
}

#[test]
fn wrong_or_missing_credentials_are_401() {
    let mut gw = gateway("");
    gw.start();
    let track = br#"{"userId":"u1","event":"Play"}"#;
    let r = post(gw.http, "/v1/track", &basic("nope", ""), track).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "unauthorized");
    assert!(r.header("www-authenticate").is_some());

    // No header: the key must be in the body, and valid.
    let r = request(gw.http, "POST", "/v1/track", &[], track).unwrap();
    assert_eq!(r.status, 401);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("write key missing"));
    let body = br#"{"userId":"u1","event":"Play","writeKey":"wrong"}"#;
    let r = request(gw.http, "POST", "/v1/track", &[], body).unwrap();
    assert_eq!(r.status, 401);
    let body = br#"{"userId":"u1","event":"Play","writeKey":"dev-write-key"}"#;
    let r = request(gw.http, "POST", "/v1/track", &[], body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // An empty Basic user is no key: the body's key counts.
    let r = post(gw.http, "/v1/track", &basic("", ""), body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // mParticle needs the key *and* the secret of a source that has one.
    let mp = fixture("mparticle-batch.json");
    let r = post(
        gw.http,
        "/v2/events",
        &basic(TV_KEY, "wrong"),
        mp.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post(gw.http, "/v2/events", &basic(WEB_KEY, ""), mp.as_bytes()).unwrap();
    assert_eq!(r.status, 401, "a Segment-only source cannot post mParticle");

    let web = edge_tests::http::get(gw.http, "/v1/devices/source:web").unwrap();
    assert_eq!(
        web.json()["events"],
        2,
        "only the two accepted requests were stored"
    );
    assert_eq!(
        edge_tests::http::get(gw.http, "/v1/devices/source:tv")
            .unwrap()
            .status,
        404
    );
}

#[test]
fn oversized_and_malformed_requests_are_refused_with_the_reason() {
    let mut gw = gateway("max_body = \"4KiB\"");
    gw.start();
    let auth = basic(WEB_KEY, "");
    let big = format!(
        r#"{{"userId":"u1","event":"Play","properties":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    );
    let r = post(gw.http, "/v1/track", &auth, big.as_bytes()).unwrap();
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"], "too_large");
    let r = post(
        gw.http,
        "/v2/bulkevents",
        &basic(TV_KEY, TV_SECRET),
        big.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 413, "{}", r.body);

    let r = post(gw.http, "/v1/track", &auth, br#"{"userId":"u1"}"#).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["message"], "body.event: missing");
    let bad_time = br#"{"batch":[{"type":"track","event":"A","timestamp":"yesterday"}]}"#;
    let r = post(gw.http, "/v1/batch", &auth, bad_time).unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("batch[0].timestamp"),
        "{}",
        r.body
    );
    let r = post(gw.http, "/v1/batch", &auth, b"not json").unwrap();
    assert_eq!(r.status, 400);
    let r = post(
        gw.http,
        "/v2/events",
        &basic(TV_KEY, TV_SECRET),
        br#"{"events":[]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("no events"), "{}", r.body);

    let r = post(gw.http, "/v1/nope", &auth, b"{}").unwrap();
    assert_eq!(r.status, 404);
    let r = request(gw.http, "GET", "/v1/track", &[], b"").unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(
        edge_tests::http::get(gw.http, "/v1/devices/source:web")
            .unwrap()
            .status,
        404,
        "nothing was stored"
    );
}
