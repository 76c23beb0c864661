//! The gateway's admin API and CLI against the real binary: profile lookup by any
//! identifier and erase, destination status and dead letters, the admin token, and
//! the CLI's answers when the gateway is up and when it is not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use edge_tests::admin::{call, gateway, WEB_KEY};
use edge_tests::http::{get, post};
use edge_tests::{basic, wait_until, Gateway};

const RESOLVED: Duration = Duration::from_secs(30);

/// Identifies `cust-1001` / `ada@example.com` through the server-side Segment API.
fn identify_ada(gw: &Gateway) {
    let body = br#"{"type":"identify","messageId":"id-ada-1","userId":"cust-1001","anonymousId":"anon-7f3c","traits":{"email":"ada@example.com","plan":"family"}}"#;
    let r = post(gw.http, "/v1/identify", &basic(WEB_KEY, ""), body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

fn has_identity(profile: &serde_json::Value, kind: &str, value: &str) -> bool {
    profile["identities"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|i| i[0] == kind && i[1] == value))
}

#[test]
fn profiles_are_found_by_customer_id_and_email_and_erased() {
    let mut gw = gateway("");
    gw.start();
    identify_ada(&gw);
    let by_customer = "/v1/profiles/customer_id/cust-1001";
    assert!(
        wait_until(RESOLVED, || get(gw.http, by_customer)
            .is_ok_and(|r| r.status == 200)),
        "the identify was never resolved into a profile"
    );
    let profile = get(gw.http, by_customer).unwrap().json();
    assert!(
        has_identity(&profile, "email", "ada@example.com"),
        "{profile}"
    );
    let by_email = get(gw.http, "/v1/profiles/email/ada%40example.com").unwrap();
    assert_eq!(by_email.status, 200, "{}", by_email.body);
    assert_eq!(
        by_email.json()["id"],
        profile["id"],
        "one profile, two identifiers"
    );

    let unknown = get(gw.http, "/v1/profiles/email/nobody%40example.com").unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "not_found");
    assert!(unknown.json()["message"]
        .as_str()
        .unwrap()
        .contains("nobody@example.com"));

    let count = get(gw.http, "/v1/profiles").unwrap().json();
    assert_eq!(count["count"], 1);
    let metrics = get(gw.http, "/metrics").unwrap().body;
    assert!(metrics.contains("edge_gateway_profiles 1"), "{metrics}");

    // The CLI shows the same profile.
    let out = gw.cli(&["profile", "show", "email", "ada@example.com"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], profile["id"]);
    let out = gw.cli(&["profile", "show", "email", "nobody@example.com"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("404"), "{err}");

    // Erase: the profile is gone by every identifier.
    let erased = call(gw.http, "DELETE", by_customer, None).unwrap();
    assert_eq!(erased.status, 200, "{}", erased.body);
    assert_eq!(erased.json()["erased"], profile["id"]);
    assert_eq!(erased.json()["dead_letters_removed"], 0, "{}", erased.body);
    assert_eq!(get(gw.http, by_customer).unwrap().status, 404);
    assert_eq!(
        get(gw.http, "/v1/profiles/email/ada%40example.com")
            .unwrap()
            .status,
        404
    );
    let again = call(gw.http, "DELETE", by_customer, None).unwrap();
    assert_eq!(again.status, 404, "nothing left to erase");
    let out = gw.cli(&["profile", "erase", "customer_id", "cust-1001"]);
    assert!(!out.status.success());
}

#[test]
fn destinations_status_and_dead_letters() {
    let mut gw = gateway("");
    gw.start();
    let r = get(gw.http, "/v1/destinations").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    let events = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "events")
        .unwrap_or_else(|| panic!("no `events` in {list}"));
    assert_eq!(events["kind"], "file");

    let r = get(gw.http, "/v1/destinations/events/dead-letters?limit=5").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json().is_array());
    let r = get(gw.http, "/v1/destinations/nope/dead-letters").unwrap();
    assert_eq!(r.status, 404);
    let r = get(gw.http, "/v1/destinations/events/dead-letters?limit=many").unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("limit"), "{}", r.body);
    let r = call(gw.http, "POST", "/v1/destinations/nope/replay", None).unwrap();
    assert_eq!(r.status, 404);

    let metrics = get(gw.http, "/metrics").unwrap().body;
    assert!(
        metrics.contains("edge_gateway_destination_backlog{destination=\"events\",kind=\"file\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("edge_gateway_destination_dead_letters{destination=\"events\""));

    let out = gw.cli(&["destinations"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("events ") && l.contains("file")),
        "{table}"
    );
    let out = gw.cli(&["dead-letters", "nope", "--limit", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no destination `nope`"));
}

#[test]
fn the_admin_token_is_required_when_configured() {
    let token = "s3cret-admin";
    let mut gw = gateway(&format!("admin_token = \"{token}\""));
    gw.start();
    for path in [
        "/v1/destinations",
        "/v1/profiles/email/a%40b.c",
        "/v1/devices/source:web",
    ] {
        let none = call(gw.http, "GET", path, None).unwrap();
        assert_eq!(none.status, 401, "{path}: {}", none.body);
        assert!(none
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")));
        let wrong = call(gw.http, "GET", path, Some("nope")).unwrap();
        assert_eq!(wrong.status, 401, "{path}");
    }
    let r = call(
        gw.http,
        "DELETE",
        "/v1/profiles/email/a%40b.c",
        Some("nope"),
    )
    .unwrap();
    assert_eq!(r.status, 401);
    let ok = call(gw.http, "GET", "/v1/destinations", Some(token)).unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Health, metrics and ingest do not take the admin token.
    assert_eq!(get(gw.http, "/health").unwrap().status, 200);
    assert_eq!(get(gw.http, "/metrics").unwrap().status, 200);
    identify_ada(&gw);

    // The CLI takes the token from the config, and `--token` overrides it.
    let out = gw.cli(&["destinations"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw.cli(&["destinations", "--token", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn the_cli_fails_clearly_when_the_gateway_is_down() {
    let gw = gateway("");
    for args in [
        &["profile", "show", "customer_id", "cust-1001"][..],
        &["destinations"][..],
        &["replay", "events"][..],
    ] {
        let out = gw.cli(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot reach the gateway") && err.contains(&gw.http.to_string()),
            "{args:?}: {err}"
        );
    }
    let out = gw.cli(&["destinations", "--url", "ftp://x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only http://"));
}
