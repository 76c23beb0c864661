//! The PostgreSQL destination against a real, private PostgreSQL server: rows match
//! the events sent, exactly once, across a gateway SIGKILL in the middle of delivering
//! a backlog; profile snapshots are written beside them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use edge_agent::model::EventId;
use edge_tests::http::post;
use edge_tests::postgres::Postgres;
use edge_tests::{basic, wait_until, Agent, Gateway};

const DEVICE: &str = "pg-dev";
const SOURCE_KEY: &str = "pg-source-key";

/// Gateway config: a server-side source and a `postgres` destination `pg`.
fn config(pg: &Postgres, destination_extra: &str) -> String {
    format!(
        "[[sources]]\nname = \"srv\"\nwrite_key = \"{SOURCE_KEY}\"\n\
         [[destinations]]\nname = \"pg\"\nkind = \"postgres\"\nconnection = \"{}\"\n\
         profile_snapshots = true\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n{destination_extra}\n",
        pg.connection()
    )
}

fn track_batch(prefix: &str, from: usize, n: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (from..from + n).map(|i| format!("{prefix}-{i}")).collect();
    let batch: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| {
            let i = from + k;
            serde_json::json!({"type": "track", "event": "Video Played", "userId": format!("u{}", i % 50),
                "messageId": id, "timestamp": "2024-05-01T10:00:00.000Z",
                "properties": {"position": i, "title": "The Long Road", "hd": true}})
        })
        .collect();
    (
        ids,
        serde_json::to_vec(&serde_json::json!({ "batch": batch })).unwrap(),
    )
}

fn count(pg: &Postgres) -> i64 {
    pg.scalar("SELECT count(*) FROM edge_events").unwrap_or(0)
}

/// The event id the gateway derives from an app's `messageId` (the rows' key).
fn event_id(message_id: &str) -> String {
    EventId::from_message_id(message_id).to_string()
}

/// Every message in `expected` is a row exactly once, keyed by its event id, and there
/// is nothing else.
fn assert_rows_exactly_once(pg: &Postgres, expected: &[String]) {
    let mut client = pg.client();
    let rows = client
        .query(
            "SELECT event_id::text, body->>'messageId' FROM edge_events",
            &[],
        )
        .unwrap();
    let mut seen: HashSet<String> = HashSet::new();
    for row in &rows {
        let (id, body_id): (String, Option<String>) = (row.get(0), row.get(1));
        let body_key = body_id.as_deref().map(event_id);
        assert_eq!(body_key.as_deref(), Some(id.as_str()), "body of {id}");
        assert!(seen.insert(id.clone()), "event {id} stored twice");
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|m| !seen.contains(&event_id(m)))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events have no row, e.g. {missing:?}",
        expected
            .iter()
            .filter(|m| !seen.contains(&event_id(m)))
            .count(),
        expected.len(),
    );
    assert_eq!(rows.len(), expected.len(), "rows for events never sent");
}

#[test]
#[ignore = "needs PostgreSQL (initdb, pg_ctl); tests/run-all installs it"]
fn agent_events_become_rows_exactly_once_with_their_fields_and_profiles() {
    let pg = Postgres::start();
    let mut gw = Gateway::new(&[DEVICE], &config(&pg, "batch_size = 200"));
    gw.start();
    let mut agent = Agent::new(&gw.agent_config(DEVICE, ""), "");
    agent.start();
    let auth = basic("test-key", "");
    let mut sent = Vec::new();
    for r in 0..10 {
        let (ids, body) = track_batch("pg-e2e", r * 100, 100);
        let resp = post(agent.addr, "/v1/batch", &auth, &body).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        sent.extend(ids);
    }
    let identify = serde_json::json!({"userId": "u7", "messageId": "pg-identify-u7",
        "traits": {"plan": "pro", "email": "u7@example.org"}});
    let resp = post(
        agent.addr,
        "/v1/identify",
        &auth,
        &serde_json::to_vec(&identify).unwrap(),
    )
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    sent.push("pg-identify-u7".into());

    let expected = i64::try_from(sent.len()).unwrap();
    let done = wait_until(Duration::from_secs(60), || count(&pg) >= expected);
    assert!(
        done,
        "only {} of {expected} rows; agent: {}; gateway log: {}",
        count(&pg),
        agent.status(),
        gw.stop_kill()
    );
    assert_rows_exactly_once(&pg, &sent);

    let mut client = pg.client();
    let row = client
        .query_one(
            "SELECT \"type\", event, user_id, (properties->>'position')::int, properties->'hd',
                    abs(extract(epoch FROM \"timestamp\" - '2024-05-01T10:00:00Z')) < 60, received_at IS NOT NULL,
                    body->>'messageId', profile_id
             FROM edge_events WHERE event_id = $1::text::uuid",
            &[&event_id("pg-e2e-742")],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("track"));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("Video Played")
    );
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("u42"));
    assert_eq!(row.get::<_, Option<i32>>(3), Some(742));
    assert_eq!(
        row.get::<_, Option<serde_json::Value>>(4),
        Some(serde_json::json!(true))
    );
    // The agent corrects device time for its clock skew: close to what was sent.
    assert_eq!(
        row.get::<_, Option<bool>>(5),
        Some(true),
        "timestamp column"
    );
    assert_eq!(
        row.get::<_, Option<bool>>(6),
        Some(true),
        "received_at column"
    );
    // The body keeps the app's own messageId; the row's key is the event id.
    assert_eq!(
        row.get::<_, Option<String>>(7).as_deref(),
        Some("pg-e2e-742")
    );
    assert!(row.get::<_, Option<i64>>(8).is_some(), "profile_id filled");

    // Profile snapshots: every profile an event resolved to has its row, and the
    // identify's traits reached u7's.
    let orphans = pg
        .scalar(
            "SELECT count(DISTINCT e.profile_id) FROM edge_events e
             LEFT JOIN edge_profiles p USING (profile_id)
             WHERE e.profile_id IS NOT NULL AND p.profile_id IS NULL",
        )
        .unwrap();
    assert_eq!(orphans, 0, "events whose profile has no snapshot row");
    let profiles = pg.scalar("SELECT count(*) FROM edge_profiles").unwrap();
    assert!(
        (50..=51).contains(&profiles),
        "50 users (u0..u49) should be 50 profiles, got {profiles}"
    );
    let u7 = client
        .query_one(
            "SELECT p.traits->>'plan', p.identities->>'customer_id' FROM edge_profiles p
             JOIN edge_events e USING (profile_id) WHERE e.event_id = $1::text::uuid",
            &[&event_id("pg-identify-u7")],
        )
        .unwrap();
    assert_eq!(u7.get::<_, Option<String>>(0).as_deref(), Some("pro"));
    assert_eq!(u7.get::<_, Option<String>>(1).as_deref(), Some("u7"));
}

#[test]
#[ignore = "needs PostgreSQL (initdb, pg_ctl); tests/run-all installs it"]
fn gateway_killed_while_delivering_a_backlog_still_writes_every_event_once() {
    const N: usize = 20_000;
    const PER_REQUEST: usize = 500;
    let pg = Postgres::start();
    // 500-event batches, at most 5 a second: the backlog takes about eight seconds to
    // deliver, so the kill lands with batches in flight.
    let mut gw = Gateway::new(
        &[DEVICE],
        &config(&pg, "batch_size = 500\nrate_limit = 5\nconcurrency = 4"),
    );
    gw.start();
    // The source keeps posting through the kill: a request that failed is sent again
    // until acked (the gateway drops the copies of one it had committed).
    let loader = {
        let addr = gw.http;
        std::thread::spawn(move || {
            let auth = basic(SOURCE_KEY, "");
            let mut sent = Vec::new();
            for r in 0..N / PER_REQUEST {
                let (ids, body) = track_batch("pg-kill", r * PER_REQUEST, PER_REQUEST);
                let acked = wait_until(
                    Duration::from_secs(60),
                    || matches!(post(addr, "/v1/batch", &auth, &body), Ok(resp) if resp.status == 200),
                );
                assert!(acked, "batch {r} never acked");
                sent.extend(ids);
            }
            sent
        })
    };
    let started = wait_until(Duration::from_secs(60), || count(&pg) >= 2500);
    assert!(started, "no row arrived: {}", gw.stop_kill());
    gw.stop_kill();
    let at_kill = count(&pg);
    let total = i64::try_from(N).unwrap();
    assert!(
        at_kill < total,
        "the whole backlog was delivered before the kill ({at_kill} rows): slow the destination down"
    );
    gw.start();
    let sent = loader.join().unwrap();
    let done = wait_until(Duration::from_secs(120), || count(&pg) >= total);
    assert!(
        done,
        "only {} of {N} rows after the restart ({at_kill} at the kill)",
        count(&pg)
    );
    // Let anything still in flight land before asserting nothing is doubled.
    let (clean, log) = gw.stop_term();
    assert!(clean, "gateway did not stop cleanly: {log}");
    assert_eq!(
        pg.scalar("SELECT count(DISTINCT event_id) FROM edge_events"),
        Some(total)
    );
    assert_rows_exactly_once(&pg, &sent);
    eprintln!("{at_kill} of {N} rows were in at the kill; all {N} exactly once after restart");
}

#[test]
#[ignore = "needs PostgreSQL (initdb, pg_ctl); tests/run-all installs it"]
fn events_sent_before_the_database_exists_arrive_once_it_is_up() {
    // The gateway starts while the analytical store is unreachable: it must not refuse
    // to start, and must create the tables and deliver once the server is there.
    let port = edge_tests::free_port();
    let connection = format!("host=127.0.0.1 port={port} user=edge dbname=edge connect_timeout=1");
    let mut gw = Gateway::new(
        &[DEVICE],
        &format!(
            "[[sources]]\nname = \"srv\"\nwrite_key = \"{SOURCE_KEY}\"\n\
             [[destinations]]\nname = \"pg\"\nkind = \"postgres\"\nconnection = \"{connection}\"\n\
             timeout = \"2s\"\nretry_initial = \"50ms\"\nretry_max = \"300ms\"\n"
        ),
    );
    gw.start();
    let (ids, body) = track_batch("pg-late", 0, 300);
    let resp = post(gw.http, "/v1/batch", &basic(SOURCE_KEY, ""), &body).unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let pg = Postgres::start_on(port);
    let done = wait_until(Duration::from_secs(60), || count(&pg) >= 300);
    assert!(done, "only {} of 300 rows: {}", count(&pg), gw.stop_kill());
    assert_rows_exactly_once(&pg, &ids);
}
