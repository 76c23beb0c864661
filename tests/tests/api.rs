//! The local HTTP API of a real agent process: every documented status code, real
//! fixtures in, exported events out, and hostile input that must not stop service.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edge_tests::http::{self, post, request};
use edge_tests::{basic, fixture, Agent, BASE_CONFIG};

fn key() -> String {
    basic("test-key", "")
}

fn running(extra: &str) -> Agent {
    let mut a = Agent::new(extra, "");
    a.start();
    a
}

#[test]
fn segment_fixture_batch_is_stored_with_fields_intact() {
    let mut agent = running(BASE_CONFIG);
    let r = post(
        agent.addr,
        "/v1/batch",
        &key(),
        fixture("segment-batch.json").as_bytes(),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["success"].as_bool()),
        (200, Some(true)),
        "{}",
        r.body
    );
    let r = post(
        agent.addr,
        "/v1/alias",
        &key(),
        fixture("segment-alias.json").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(agent.stop_term().0);

    let events = agent.export();
    let find = |id: &str| {
        events
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    let play = find("1c6b8d2f-7b50-4b2f-8b1d-4a2c3e5f6071");
    assert_eq!(play["kind"], "track");
    assert_eq!(play["name"], "Video Content Playing");
    assert_eq!(play["properties"]["position"], 312);
    assert_eq!(play["properties"]["livestream"], false);
    assert_eq!(play["identities"]["user_id"], "cust-1001");
    assert_eq!(play["identities"]["anonymous_id"], "anon-7f3c");
    assert_eq!(play["context"]["library"]["name"], "analytics-kotlin");
    assert_eq!(play["context"]["integrations"]["Mixpanel"], false);
    let identify = find("0b5a7c1e-6a4f-4a1e-9a0c-3f1b2d4e5f60");
    assert_eq!(identify["traits"]["plan"], "family");
    let group = find("4f9eb052-ae83-4e52-be40-7d5f618293a4");
    assert_eq!(group["identities"]["group_id"], "household-17");
    let alias = find("6b10d274-c0a5-4074-9062-9f7183a4abc6");
    assert_eq!(alias["identities"]["previous_id"], "anon-91aa");
    // 6 in the batch + alias; seqs unique and increasing per lane.
    assert_eq!(
        events.iter().filter(|e| e["source"] == "segment").count(),
        7
    );
}

#[test]
fn mparticle_events_and_bulkevents_are_accepted_with_202() {
    let mut agent = running(BASE_CONFIG);
    let auth = basic("mp-key", "mp-secret");
    let batch = fixture("mparticle-batch.json");
    let r = post(agent.addr, "/v2/events", &auth, batch.as_bytes()).unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    // A bulk of two batches whose message ids differ from the first request.
    let second = batch.replace("mp-msg-", "mp-bulk-a-");
    let third = batch.replace("mp-msg-", "mp-bulk-b-");
    let r = post(
        agent.addr,
        "/v2/bulkevents",
        &auth,
        format!("[{second},{third}]").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let r = post(
        agent.addr,
        "/v2/events",
        &basic("mp-key", "wrong"),
        batch.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 401);
    assert!(agent.stop_term().0);

    let events = agent.export();
    let mp: Vec<_> = events
        .iter()
        .filter(|e| e["source"] == "mparticle")
        .collect();
    assert_eq!(mp.len(), 15);
    let play = mp
        .iter()
        .find(|e| e["message_id"] == "mp-msg-0003")
        .unwrap();
    assert_eq!(play["name"], "Video Played");
    assert_eq!(play["properties"]["asset_id"], "mv-19");
    assert_eq!(play["identities"]["user_id"], "cust-2002");
    assert_eq!(play["traits"]["tier"], "gold");
    assert_eq!(play["context"]["device"]["device_model"], "Express 3960");
    assert_eq!(play["timestamp_ms"], 1_795_773_520_000_i64);
    let purchase = mp
        .iter()
        .find(|e| e["message_id"] == "mp-msg-0004")
        .unwrap();
    assert_eq!(
        purchase["properties"]["product_action"]["transaction_id"],
        "t-9001"
    );
}

#[test]
fn every_error_status_names_the_problem_and_service_continues() {
    let config = format!(
        "{BASE_CONFIG}\n[spool]\ndefault_lane = \"small\"\n[[spool.lanes]]\nname = \"small\"\nmax_bytes = \"4KiB\"\nwhen_full = \"reject\"\n"
    );
    let agent = running(&config);
    let a = agent.addr;
    let cases: Vec<(&str, u16, http::Response)> = vec![
        (
            "no key",
            401,
            post(a, "/v1/track", "", br#"{"event":"x","userId":"u"}"#).unwrap(),
        ),
        (
            "wrong key",
            401,
            post(
                a,
                "/v1/track",
                &basic("nope", ""),
                br#"{"event":"x","userId":"u"}"#,
            )
            .unwrap(),
        ),
        (
            "body key wrong",
            401,
            post(
                a,
                "/v1/track",
                "",
                br#"{"event":"x","userId":"u","writeKey":"nope"}"#,
            )
            .unwrap(),
        ),
        (
            "malformed json",
            400,
            post(a, "/v1/track", &key(), b"{\"event\":").unwrap(),
        ),
        (
            "invalid utf-8",
            400,
            post(
                a,
                "/v1/track",
                &key(),
                b"{\"event\":\"\xff\xfe\",\"userId\":\"u\"}",
            )
            .unwrap(),
        ),
        (
            "missing event name",
            400,
            post(a, "/v1/track", &key(), br#"{"userId":"u"}"#).unwrap(),
        ),
        (
            "bad timestamp",
            400,
            post(
                a,
                "/v1/track",
                &key(),
                br#"{"event":"x","timestamp":"soon"}"#,
            )
            .unwrap(),
        ),
        (
            "deep json",
            400,
            post(a, "/v1/track", &key(), deep_json(10_000).as_bytes()).unwrap(),
        ),
        (
            "event over 32KB",
            413,
            post(a, "/v1/track", &key(), big_event(40 * 1024).as_bytes()).unwrap(),
        ),
        (
            "batch over 500KB",
            413,
            post(a, "/v1/batch", &key(), &vec![b' '; 600 * 1024]).unwrap(),
        ),
        (
            "mparticle over 256KB",
            413,
            post(
                a,
                "/v2/events",
                &basic("mp-key", "mp-secret"),
                &vec![b' '; 300 * 1024],
            )
            .unwrap(),
        ),
        (
            "unknown path",
            404,
            post(a, "/v1/nope", &key(), b"{}").unwrap(),
        ),
        (
            "wrong method",
            405,
            request(a, "DELETE", "/v1/status", &[], b"").unwrap(),
        ),
    ];
    for (what, want, r) in &cases {
        assert_eq!(r.status, *want, "{what}: {}", r.body);
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            !message.is_empty(),
            "{what}: error body names no problem: {}",
            r.body
        );
    }
    assert!(
        cases[7].2.body.contains("nested") || cases[7].2.body.contains("recursion"),
        "{}",
        cases[7].2.body
    );
    assert!(cases[3].2.body.contains("body"), "{}", cases[3].2.body);

    // Fill the 4 KiB reject lane: eventually 429 with Retry-After, nothing acked lost.
    let mut acked = 0;
    let mut full = None;
    for i in 0..200 {
        let body = format!(
            r#"{{"event":"fill","userId":"u","properties":{{"pad":"{}","i":{i}}}}}"#,
            "p".repeat(200)
        );
        let r = post(a, "/v1/track", &key(), body.as_bytes()).unwrap();
        match r.status {
            200 => acked += 1,
            429 => {
                full = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    let full = full.expect("lane never filled");
    assert!(
        full.header("retry-after").is_some(),
        "429 without Retry-After"
    );
    assert!(full.body.contains("small"), "{}", full.body);
    let status = agent.status();
    assert_eq!(status["totals"]["accepted"], acked);
    assert_eq!(status["lanes"][0]["events"], acked);
    // Still serving.
    assert_eq!(http::get(a, "/metrics").unwrap().status, 200);
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off_without_blocking_others() {
    let mut agent = Agent::new(
        BASE_CONFIG,
        "header_timeout = \"500ms\"\nbody_timeout = \"500ms\"",
    );
    agent.start();
    let mut slow = TcpStream::connect(agent.addr).unwrap();
    slow.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Others are served meanwhile.
    let body = br#"{"event":"x","userId":"u"}"#;
    let t = Instant::now();
    assert_eq!(
        post(agent.addr, "/v1/track", &key(), body).unwrap().status,
        200
    );
    assert!(t.elapsed() < Duration::from_millis(400));
    // The stalled one is closed by the server after the timeout.
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let started = Instant::now();
    let _ = std::io::Read::read_to_end(&mut slow, &mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stalled client was never cut off"
    );

    // A body that stalls gets 408.
    let mut stall = TcpStream::connect(agent.addr).unwrap();
    stall
        .write_all(format!("POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 100\r\n\r\n{{\"ev", key()).as_bytes())
        .unwrap();
    stall
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = http::read_response(&mut stall).unwrap();
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(
        post(agent.addr, "/v1/track", &key(), body).unwrap().status,
        200
    );
    assert!(agent.stop_term().0);
}

#[test]
fn status_and_metrics_report_lanes_totals_and_drops() {
    let agent = running(BASE_CONFIG);
    for i in 0..3 {
        let body = format!(r#"{{"event":"e{i}","userId":"u"}}"#);
        assert_eq!(
            post(agent.addr, "/v1/track", &key(), body.as_bytes())
                .unwrap()
                .status,
            200
        );
    }
    let s = agent.status();
    assert_eq!(s["totals"]["accepted"], 3);
    assert_eq!(s["lanes"][0]["name"], "default");
    assert_eq!(s["lanes"][0]["events"], 3);
    assert!(s["lanes"][0]["oldest_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["device_id"].as_str().unwrap().len() >= 8);
    let cli = agent.cli(&["status"]);
    let from_cli: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(from_cli["totals"]["accepted"], 3);
    let m = http::get(agent.addr, "/metrics").unwrap();
    assert!(
        m.body.contains("edge_agent_events_accepted_total 3"),
        "{}",
        m.body
    );
    assert!(m
        .body
        .contains("edge_agent_events_dropped_total{reason=\"consent_denied\"} 0"));
}

#[test]
fn cli_send_reaches_a_running_agent_and_queues_directly_when_stopped() {
    let mut agent = running(BASE_CONFIG);
    let out = agent.cli(&[
        "send", "track", "Play", "--user", "u1", "--prop", "title=x", "--prop", "n=3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.stop_term().0);
    let out = agent.cli(&["send", "screen", "Home", "--user", "u1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = agent.export();
    let play = events.iter().find(|e| e["name"] == "Play").unwrap();
    assert_eq!(play["properties"]["title"], "x");
    assert_eq!(play["properties"]["n"], 3);
    assert!(events
        .iter()
        .any(|e| e["name"] == "Home" && e["kind"] == "screen"));
    let check = agent.cli(&["check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn device_id_and_user_are_remembered_across_restarts() {
    let mut agent = running(BASE_CONFIG);
    let first = agent.status()["device_id"].as_str().unwrap().to_owned();
    assert_eq!(
        post(
            agent.addr,
            "/v1/identify",
            &key(),
            br#"{"userId":"u-77","traits":{"a":1}}"#
        )
        .unwrap()
        .status,
        200
    );
    assert!(agent.stop_term().0);
    agent.start();
    assert_eq!(agent.status()["device_id"], first.as_str());
    assert_eq!(
        post(agent.addr, "/v1/track", &key(), br#"{"event":"later"}"#)
            .unwrap()
            .status,
        200
    );
    assert!(agent.stop_term().0);
    let events = agent.export();
    let later = events.iter().find(|e| e["name"] == "later").unwrap();
    assert_eq!(later["identities"]["user_id"], "u-77");
    assert_eq!(later["identities"]["device_id"], first.as_str());
}

#[test]
fn fleet_mode_keeps_each_devices_identity_and_counts_per_device() {
    let mut agent = running(&format!("[agent]\nfleet = true\n{BASE_CONFIG}"));
    for (device, n) in [("tv-1", 2), ("tv-2", 3)] {
        for i in 0..n {
            let body = format!(
                r#"{{"event":"e{i}","userId":"u","context":{{"device":{{"id":"{device}"}}}}}}"#
            );
            assert_eq!(
                post(agent.addr, "/v1/track", &key(), body.as_bytes())
                    .unwrap()
                    .status,
                200
            );
        }
    }
    let s = agent.status();
    let devices = s["devices"].as_array().unwrap();
    let count = |id: &str| {
        devices
            .iter()
            .find(|d| d["device_id"] == id)
            .map(|d| d["accepted"].clone())
    };
    assert_eq!(count("tv-1"), Some(2.into()));
    assert_eq!(count("tv-2"), Some(3.into()));
    assert!(agent.stop_term().0);
    assert!(agent
        .export()
        .iter()
        .all(|e| e["identities"]["device_id"] == "tv-1" || e["identities"]["device_id"] == "tv-2"));
}

fn deep_json(depth: usize) -> String {
    format!(
        r#"{{"event":"x","properties":{{"a":{}{}}}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

fn big_event(size: usize) -> String {
    format!(
        r#"{{"event":"x","userId":"u","properties":{{"pad":"{}"}}}}"#,
        "x".repeat(size)
    )
}

#[test]
fn requests_arriving_during_shutdown_get_503_and_acked_ones_are_kept() {
    let mut agent = Agent::new(BASE_CONFIG, "");
    agent.start();
    let body = br#"{"event":"before","userId":"u","messageId":"before-1"}"#;
    assert_eq!(
        post(agent.addr, "/v1/track", &key(), body).unwrap().status,
        200
    );
    // A request whose headers are still arriving when shutdown begins.
    let mut late = TcpStream::connect(agent.addr).unwrap();
    late.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    edge_tests::signal(agent.pid(), "TERM");
    std::thread::sleep(Duration::from_millis(200));
    let rest = format!(
        "Authorization: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        key(),
        body.len(),
        String::from_utf8_lossy(body)
    );
    late.write_all(rest.as_bytes()).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = http::read_response(&mut late).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    let (clean, log) = agent.stop_term();
    assert!(clean, "{log}");
    let events = agent.export();
    assert!(events.iter().any(|e| e["message_id"] == "before-1"));
}
