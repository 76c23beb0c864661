//! Audience destinations against the real `edge-gateway`: users identified through a
//! server-side source enter and leave the audience `pro` (`plan = "pro"`), and
//!
//! - an `audience_webhook` (an HTTP server in the test stands for the audience API)
//!   gets them as batched adds and removes, once each, through a 503 and a refusal
//!   (dead letter, replay);
//! - `audience_file` snapshots (CSV and NDJSON) and the `audience_postgres` table (a
//!   private PostgreSQL server) match the live membership of the admin API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../src/webhook_server.rs"]
#[allow(dead_code)]
mod webhook_server;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_tests::admin::{call, SOURCES, WEB_KEY};
use edge_tests::http::{get, post};
use edge_tests::postgres::Postgres;
use edge_tests::{wait_until, Gateway};
use serde_json::{json, Value};
use webhook_server::{Reply, WebhookServer};

const PROMPT: Duration = Duration::from_secs(30);

const AUDIENCE: &str = r#"
[[audiences]]
name = "pro"
when = { attribute = "plan", op = "eq", value = "pro" }

[[audiences]]
name = "everyone"
when = { attribute = "plan", op = "exists" }
"#;

fn gateway(destinations: &str) -> Gateway {
    Gateway::new(&[], &format!("{SOURCES}\n{AUDIENCE}\n{destinations}"))
}

/// Identifies `user` with `plan` (and an email and an anonymous id) through the
/// server-side source.
fn identify(gw: &Gateway, user: &str, plan: &str) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let body = json!({"writeKey": WEB_KEY, "batch": [
        {"type": "identify", "userId": user, "anonymousId": format!("anon-{user}"),
         "messageId": format!("identify-{user}-{n}"),
         "traits": {"plan": plan, "email": format!("{user}@example.org")}}
    ]});
    let r = post(gw.http, "/v1/batch", "", body.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Customer ids of `audience`'s members per the admin API.
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

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Members of `audience` after every accepted call, in order.
fn api_state(server: &WebhookServer, audience: &str) -> BTreeSet<String> {
    let mut members = BTreeSet::new();
    for r in server.accepted() {
        let body = r.json();
        if body["audience"] != audience {
            continue;
        }
        for m in body["add"].as_array().into_iter().flatten() {
            members.insert(m["userId"].as_str().unwrap_or_default().to_owned());
        }
        for m in body["remove"].as_array().into_iter().flatten() {
            members.remove(m["userId"].as_str().unwrap_or_default());
        }
    }
    members
}

/// How often each user was added to `audience` by an accepted call.
fn adds(server: &WebhookServer, audience: &str) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for r in server.accepted() {
        let body = r.json();
        if body["audience"] == audience {
            for m in body["add"].as_array().into_iter().flatten() {
                *n.entry(m["userId"].as_str().unwrap_or_default().to_owned())
                    .or_insert(0) += 1;
            }
        }
    }
    n
}

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

fn webhook(name: &str, server: &WebhookServer, extra: &str) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nkind = \"audience_webhook\"\nurl = \"{}\"\n\
         retry_initial = \"50ms\"\nretry_max = \"200ms\"\n{extra}\n",
        server.url("/audiences")
    )
}

#[test]
fn members_stream_to_an_audience_api_as_adds_and_removes_once_through_a_503() {
    // The first call is answered 503; every later one is taken.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let api = WebhookServer::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::status(503).retry_after("0")
        } else {
            Reply::ok()
        }
    });
    let mut gw = gateway(&webhook("api", &api, "audiences = [\"pro\"]"));
    gw.start();

    for user in ["u1", "u2", "u3"] {
        identify(&gw, user, "pro");
    }
    identify(&gw, "u4", "free");
    let pro = set(&["u1", "u2", "u3"]);
    assert!(
        wait_until(PROMPT, || members(&gw, "pro") == pro),
        "members: {:?}",
        members(&gw, "pro")
    );
    assert!(
        wait_until(PROMPT, || api_state(&api, "pro") == pro),
        "audience API has {:?}",
        api_state(&api, "pro")
    );

    // The refused first call came again with the same key, and was taken once.
    let requests = api.requests();
    assert_eq!(requests[0].status, 503);
    let key = requests[0].header("idempotency-key").unwrap().to_owned();
    assert_eq!(requests[1].header("idempotency-key"), Some(key.as_str()));
    assert_eq!(requests[1].json()["add"], requests[0].json()["add"]);
    assert!(
        adds(&api, "pro").values().all(|n| *n == 1),
        "{:?}",
        adds(&api, "pro")
    );
    // Only the selected audience, and only allowed identities, leave.
    for r in api.accepted() {
        let body = r.json();
        assert_eq!(body["audience"], "pro", "{body}");
        assert!(body["sentAt"].is_string(), "{body}");
        for m in body["add"].as_array().unwrap() {
            let user = m["userId"].as_str().unwrap();
            assert_eq!(m["email"], format!("{user}@example.org"), "{body}");
            assert!(m["profileId"].is_u64(), "{body}");
            assert!(m.get("anonymousId").is_none(), "{body}");
        }
    }

    // u2 downgrades: a remove; u4 upgrades: an add.
    identify(&gw, "u2", "free");
    identify(&gw, "u4", "pro");
    let now = set(&["u1", "u3", "u4"]);
    assert!(
        wait_until(PROMPT, || api_state(&api, "pro") == now),
        "audience API has {:?}",
        api_state(&api, "pro")
    );
    assert_eq!(members(&gw, "pro"), now);
    let removed: Vec<Value> = api
        .accepted()
        .iter()
        .flat_map(|r| r.json()["remove"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0]["userId"], "u2");
    assert_eq!(removed[0]["email"], "u2@example.org");

    let s = status(&gw, "api");
    assert!(s["retries"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["delivered"].as_u64().unwrap(), 5, "{s}");
    assert_eq!(s["dead_letters"], 0, "{s}");

    // A restart sends nothing again: the cursor is durable.
    let before = api.accepted().len();
    gw.stop_term();
    gw.start();
    identify(&gw, "u5", "pro");
    assert!(wait_until(PROMPT, || api_state(&api, "pro").contains("u5")));
    assert_eq!(adds(&api, "pro").values().sum::<usize>(), 5);
    assert_eq!(api.accepted().len(), before + 1);
}

#[test]
fn a_refused_call_is_dead_lettered_and_replayed() {
    let refuse = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&refuse);
    let api = WebhookServer::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(400).body("unknown audience")
        } else {
            Reply::ok()
        }
    });
    let mut gw = gateway(&webhook("api", &api, ""));
    gw.start();
    identify(&gw, "u1", "pro");
    assert!(
        wait_until(PROMPT, || dead_letters(&gw, "api").len() == 2),
        "dead letters: {:?}",
        dead_letters(&gw, "api")
    );
    let letters = dead_letters(&gw, "api");
    let audiences: BTreeSet<String> = letters
        .iter()
        .map(|l| l["body"]["audience"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(audiences, set(&["everyone", "pro"]));
    assert!(
        letters[0]["reason"].as_str().unwrap().contains("400"),
        "{letters:?}"
    );
    // The refusal did not stop the stream.
    identify(&gw, "u2", "pro");
    assert!(wait_until(PROMPT, || dead_letters(&gw, "api").len() == 4));

    refuse.store(false, Ordering::SeqCst);
    let r = call(gw.http, "POST", "/v1/destinations/api/replay", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(wait_until(PROMPT, || dead_letters(&gw, "api").is_empty()));
    assert_eq!(api_state(&api, "pro"), set(&["u1", "u2"]));
    assert_eq!(api_state(&api, "everyone"), set(&["u1", "u2"]));
}

/// The newest complete snapshot of `audience` in `dir` with extension `ext`.
fn newest(dir: &Path, audience: &str, ext: &str) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("{audience}-2")) && name.ends_with(&format!(".{ext}"))
        })
        .collect();
    files.sort();
    files.pop()
}

/// Customer ids in the newest CSV snapshot (the header checked).
fn csv_members(dir: &Path, audience: &str) -> Option<BTreeSet<String>> {
    let text = std::fs::read_to_string(newest(dir, audience, "csv")?).ok()?;
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("profile_id,customer_id,email,entered_at")
    );
    Some(
        lines
            .map(|l| {
                let cells: Vec<&str> = l.split(',').collect();
                assert_eq!(cells.len(), 4, "{l}");
                assert_eq!(cells[2], format!("{}@example.org", cells[1]), "{l}");
                cells[1].to_owned()
            })
            .collect(),
    )
}

fn ndjson_members(dir: &Path, audience: &str) -> Option<BTreeSet<String>> {
    let text = std::fs::read_to_string(newest(dir, audience, "ndjson")?).ok()?;
    Some(
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                assert!(
                    v["profile_id"].is_u64() && v["entered_at"].is_string(),
                    "{l}"
                );
                v["customer_id"].as_str().unwrap().to_owned()
            })
            .collect(),
    )
}

#[test]
fn snapshot_files_match_the_live_membership() {
    let mut gw = gateway(
        "[[destinations]]\nname = \"snap\"\nkind = \"audience_file\"\ndir = \"snapshots\"\n\
         schedule = \"200ms\"\naudiences = [\"pro\"]\n\
         [[destinations]]\nname = \"snapjson\"\nkind = \"audience_file\"\ndir = \"snapjson\"\n\
         schedule = \"200ms\"\nsnapshot_format = \"ndjson\"\n",
    );
    gw.start();
    let csv_dir = gw.data_dir.join("snapshots");
    let json_dir = gw.data_dir.join("snapjson");
    for user in ["u1", "u2", "u3"] {
        identify(&gw, user, "pro");
    }
    identify(&gw, "u4", "free");
    let pro = set(&["u1", "u2", "u3"]);
    assert!(wait_until(PROMPT, || members(&gw, "pro") == pro));
    assert!(
        wait_until(PROMPT, || csv_members(&csv_dir, "pro") == Some(pro.clone())),
        "csv: {:?}",
        csv_members(&csv_dir, "pro")
    );
    assert!(wait_until(PROMPT, || ndjson_members(&json_dir, "pro")
        == Some(pro.clone())));
    let all = set(&["u1", "u2", "u3", "u4"]);
    assert!(wait_until(PROMPT, || ndjson_members(&json_dir, "everyone")
        == Some(all.clone())));
    // Only the selected audience; no temp files under a snapshot name.
    assert!(newest(&csv_dir, "everyone", "csv").is_none());

    identify(&gw, "u2", "free");
    let now = set(&["u1", "u3"]);
    assert!(wait_until(PROMPT, || members(&gw, "pro") == now));
    assert!(
        wait_until(PROMPT, || csv_members(&csv_dir, "pro") == Some(now.clone())),
        "csv: {:?}",
        csv_members(&csv_dir, "pro")
    );
    // Older snapshots are kept.
    let count = std::fs::read_dir(&csv_dir).unwrap().count();
    assert!(count >= 2, "{count} files");
}

/// `(audience, customer_id, email)` rows of the membership table.
fn table(pg: &Postgres) -> BTreeSet<(String, String, String)> {
    let mut client = pg.client();
    client
        .query(
            "SELECT audience, customer_id, email FROM edge_audience_members",
            &[],
        )
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        })
        .unwrap_or_default()
}

fn rows(audience: &str, users: &BTreeSet<String>) -> BTreeSet<(String, String, String)> {
    users
        .iter()
        .map(|u| (audience.to_owned(), u.clone(), format!("{u}@example.org")))
        .collect()
}

#[test]
#[ignore = "needs PostgreSQL (initdb, pg_ctl); tests/run-all installs it"]
fn the_postgres_table_matches_the_live_membership_and_is_rebuilt_when_emptied() {
    let pg = Postgres::start();
    let mut gw = gateway(&format!(
        "[[destinations]]\nname = \"pgaud\"\nkind = \"audience_postgres\"\nconnection = \"{}\"\n\
         retry_initial = \"50ms\"\nretry_max = \"500ms\"\naudiences = [\"pro\"]\n",
        pg.connection()
    ));
    gw.start();
    for user in ["u1", "u2", "u3"] {
        identify(&gw, user, "pro");
    }
    identify(&gw, "u4", "free");
    let pro = set(&["u1", "u2", "u3"]);
    assert!(wait_until(PROMPT, || members(&gw, "pro") == pro));
    assert!(
        wait_until(PROMPT, || table(&pg) == rows("pro", &pro)),
        "table: {:?}",
        table(&pg)
    );

    identify(&gw, "u2", "free");
    identify(&gw, "u4", "pro");
    let now = set(&["u1", "u3", "u4"]);
    assert!(wait_until(PROMPT, || members(&gw, "pro") == now));
    assert!(
        wait_until(PROMPT, || table(&pg) == rows("pro", &now)),
        "table: {:?}",
        table(&pg)
    );

    // Emptied behind its back while the gateway is down: rebuilt at start.
    gw.stop_term();
    pg.client()
        .batch_execute("DELETE FROM edge_audience_members")
        .unwrap();
    gw.start();
    assert!(
        wait_until(PROMPT, || table(&pg) == rows("pro", &now)),
        "table: {:?}",
        table(&pg)
    );
    identify(&gw, "u1", "free");
    let after = set(&["u3", "u4"]);
    assert!(
        wait_until(PROMPT, || table(&pg) == rows("pro", &after)),
        "table: {:?}",
        table(&pg)
    );
}

/// A destination added to a running gateway starts from a log pruned long ago (the
/// devices side has read it): it gets every current member as adds, then changes.
#[test]
fn an_audience_api_added_later_gets_every_current_member() {
    let mut gw = gateway("");
    gw.start();
    for user in ["u1", "u2"] {
        identify(&gw, user, "pro");
    }
    identify(&gw, "u3", "free");
    assert!(wait_until(PROMPT, || members(&gw, "pro") == set(&["u1", "u2"])));
    // More changes, so the log is pruned past what the devices side has read.
    identify(&gw, "u1", "free");
    identify(&gw, "u1", "pro");
    assert!(wait_until(PROMPT, || members(&gw, "pro") == set(&["u1", "u2"])));
    gw.stop_term();

    let api = WebhookServer::start(|_| Reply::ok());
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        format!("{text}\n{}", webhook("late", &api, "audiences = [\"pro\"]")),
    )
    .unwrap();
    gw.start();
    assert!(
        wait_until(PROMPT, || api_state(&api, "pro") == set(&["u1", "u2"])),
        "audience API has {:?}",
        api_state(&api, "pro")
    );
    identify(&gw, "u2", "free");
    assert!(wait_until(PROMPT, || api_state(&api, "pro") == set(&["u1"])));
}
