//! Audiences through the real `edge-gateway` binary: events from a server-side source
//! fill audiences; the admin API and the CLI show sizes, members and why; the test
//! clock and an on-demand sweep let a one-hour window pass without sleeping; an erase
//! takes the profile out of every audience; memberships survive a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use edge_tests::admin::{SOURCES, WEB_KEY};
use edge_tests::http::{get, post, request};
use edge_tests::{basic, wait_until, Gateway};
use serde_json::{json, Value};

const PROMPT: Duration = Duration::from_secs(20);

const AUDIENCES: &str = r#"
[gateway]
test_clock = true
audience_sweep = "1h"

[[audiences]]
name = "installed"
description = "installed the app"
when = { did = "Application Installed" }

[[audiences]]
name = "sent_not_opened"
when = { all = [
  { did = "Push Sent", within = "7d", before = "1h" },
  { not = { did = "Push Opened", within = "7d" } },
] }

[[audiences]]
name = "pro"
when = { attribute = "plan", op = "eq", value = "pro" }
"#;

fn gateway() -> Gateway {
    Gateway::new(&[], &format!("{SOURCES}\n{AUDIENCES}"))
}

fn ingest(gw: &Gateway, batch: Vec<Value>) {
    let body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
    let r = post(gw.http, "/v1/batch", &basic(WEB_KEY, ""), &body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

fn track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event,
           "messageId": format!("{event}-{user}")})
}

/// Audience name → size, per `GET /v1/audiences`.
fn sizes(gw: &Gateway) -> BTreeMap<String, u64> {
    let r = get(gw.http, "/v1/audiences").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_owned(),
                a["members"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
}

/// Customer ids of the members of `audience`.
fn members(gw: &Gateway, audience: &str) -> Vec<String> {
    let r = get(gw.http, &format!("/v1/audiences/{audience}/members")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut ids: Vec<String> = r.json()["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            m["identities"].as_array().and_then(|ids| {
                ids.iter()
                    .find(|i| i[0] == "customer_id")
                    .and_then(|i| i[1].as_str().map(str::to_owned))
            })
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn audiences_fill_from_events_and_time_and_show_in_the_api_and_cli() {
    let mut gw = gateway();
    gw.start();
    ingest(
        &gw,
        vec![
            track("u1", "Application Installed"),
            track("u2", "Application Installed"),
            json!({"type": "identify", "userId": "u1", "messageId": "id-u1",
                   "traits": {"plan": "pro"}}),
            track("u1", "Push Sent"),
            track("u2", "Push Sent"),
            track("u2", "Push Opened"),
        ],
    );
    let want = expect(&[("installed", 2), ("pro", 1), ("sent_not_opened", 0)]);
    assert!(
        wait_until(PROMPT, || sizes(&gw) == want),
        "sizes {:?}",
        sizes(&gw)
    );
    assert_eq!(members(&gw, "installed"), ["u1", "u2"]);
    assert_eq!(members(&gw, "pro"), ["u1"]);

    // Nobody is in before the hour; an hour and a bit later (moved, not slept), u1
    // is: u2 opened.
    let r = request(gw.http, "POST", "/v1/audiences/sweep", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(members(&gw, "sent_not_opened"), Vec::<String>::new());
    let r = request(gw.http, "POST", "/v1/clock?advance=2h", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(gw.http, "POST", "/v1/audiences/sweep", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changes"], 1, "{}", r.body);
    assert_eq!(members(&gw, "sent_not_opened"), ["u1"]);

    // Why u2 is not in it: the `not` over the open failed.
    let why = get(gw.http, "/v1/audiences/sent_not_opened/why/customer_id/u2").unwrap();
    assert_eq!(why.status, 200, "{}", why.body);
    let why = why.json();
    assert_eq!(why["result"], false);
    assert_eq!(why["member"], false);
    assert!(why.to_string().contains("Push Opened"), "{why}");
    let why = get(gw.http, "/v1/audiences/sent_not_opened/why/customer_id/u1").unwrap();
    assert_eq!(why.json()["result"], true, "{}", why.body);
    assert_eq!(
        get(gw.http, "/v1/audiences/nope/members").unwrap().status,
        404
    );
    assert_eq!(
        get(gw.http, "/v1/audiences/pro/why/customer_id/nobody")
            .unwrap()
            .status,
        404
    );

    // The CLI shows the same.
    let url = format!("http://{}", gw.http);
    let out = gw.cli(&["audiences", "--url", &url]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
    };
    assert_eq!(row("installed").as_deref(), Some("2"), "{text}");
    assert_eq!(row("sent_not_opened").as_deref(), Some("1"), "{text}");
    assert!(text.contains("installed the app"), "{text}");
    let out = gw.cli(&["members", "pro", "--url", &url]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"u1\""));
    let out = gw.cli(&["why", "sent_not_opened", "customer_id", "u2", "--url", &url]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Push Opened"));

    // Memberships are durable.
    let (clean, log) = gw.stop_term();
    assert!(clean, "{log}");
    gw.start();
    let want = expect(&[("installed", 2), ("pro", 1), ("sent_not_opened", 1)]);
    assert_eq!(sizes(&gw), want);

    // Erasing u1 takes it out of all three.
    let r = request(gw.http, "DELETE", "/v1/profiles/customer_id/u1", &[], &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["audiences_left"], 3, "{}", r.body);
    let want = expect(&[("installed", 1), ("pro", 0), ("sent_not_opened", 0)]);
    assert_eq!(sizes(&gw), want);
    assert_eq!(members(&gw, "installed"), ["u2"]);
}
