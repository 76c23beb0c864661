//! Agent → gateway over real MQTT with mutual TLS, both as real processes: every
//! event an app got a 2xx for arrives in the file destination exactly once, across
//! gateway crashes and agent offline periods.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_tests::http::post;
use edge_tests::{basic, wait_until, Agent, Gateway};
use rand::Rng;

const DEVICE: &str = "dev-1";

fn site(uplink_extra: &str) -> (Gateway, Agent) {
    let mut gw = Gateway::new(&[DEVICE], "");
    gw.start();
    let mut agent = Agent::new(&gw.agent_config(DEVICE, uplink_extra), "");
    agent.start();
    (gw, agent)
}

fn batch_body(prefix: &str, n: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let batch: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            serde_json::json!({"type":"track","event":"Video Played","userId":format!("u{}", i % 50),"messageId":id,
                "properties":{"id":id,"position":i,"title":"The Long Road","hd":true}})
        })
        .collect();
    (
        ids,
        serde_json::to_vec(&serde_json::json!({ "batch": batch })).unwrap(),
    )
}

/// Asserts every id in `acked` was delivered exactly once and nothing twice.
fn assert_exactly_once(gw: &Gateway, acked: &[String]) {
    let delivered = gw.delivered();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in &delivered {
        *seen
            .entry(line["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dupes.is_empty(), "duplicates delivered: {dupes:?}");
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acked but not delivered ({} of {}): {missing:?}",
        acked.iter().filter(|id| !seen.contains_key(*id)).count(),
        acked.len()
    );
}

fn wait_drained(agent: &Agent, gw: &Gateway, expected: usize, within: Duration) {
    let ok = wait_until(within, || gw.delivered_count() >= expected);
    let status = agent.status();
    assert!(
        ok,
        "only {} of {expected} delivered; agent status: {status}",
        gw.delivered_count()
    );
}

#[test]
fn hundred_thousand_events_arrive_exactly_once_with_fields_intact() {
    let (gw, agent) = site("");
    let auth = basic("test-key", "");
    let mut acked = Vec::new();
    for r in 0..1000 {
        let (ids, body) = batch_body(&format!("e2e-{r}"), 100);
        let resp = post(agent.addr, "/v1/batch", &auth, &body).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        acked.extend(ids);
    }
    wait_drained(&agent, &gw, acked.len(), Duration::from_secs(120));
    assert_exactly_once(&gw, &acked);
    let delivered = gw.delivered();
    let one = delivered
        .iter()
        .find(|l| l["messageId"] == "e2e-7-42")
        .unwrap();
    assert_eq!(one["event"], "Video Played");
    assert_eq!(one["type"], "track");
    assert_eq!(one["userId"], "u42");
    assert_eq!(one["properties"]["position"], 42);
    assert_eq!(one["properties"]["hd"], true);
    assert_eq!(one["context"]["device"]["id"], DEVICE);
    let status = agent.status();
    assert_eq!(status["totals"]["queued"], 0, "{status}");
    assert_eq!(status["uplink"]["connected"], true);
    let device = edge_tests::http::get(gw.http, &format!("/v1/devices/{DEVICE}"))
        .unwrap()
        .json();
    assert_eq!(device["events"], 100_000);
    assert_eq!(device["lanes"][0]["lane"], "default");
    assert_eq!(device["lanes"][0]["high_water"], 100_000, "{device}");
}

#[test]
fn gateway_killed_ten_times_under_load_loses_and_duplicates_nothing() {
    let (mut gw, agent) = site("");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (acked, stop, addr) = (Arc::clone(&acked), Arc::clone(&stop), agent.addr);
        std::thread::spawn(move || {
            let auth = basic("test-key", "");
            let mut r = 0;
            while !stop.load(Ordering::Relaxed) {
                let (ids, body) = batch_body(&format!("kill-{r}"), 50);
                r += 1;
                let resp = post(addr, "/v1/batch", &auth, &body).unwrap();
                assert_eq!(resp.status, 200, "{}", resp.body);
                acked.lock().unwrap().extend(ids);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut rng = rand::rng();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..800)));
        gw.stop_kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        gw.start();
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let addr = agent.addr;
    let drained = wait_until(Duration::from_secs(90), || {
        edge_tests::http::get(addr, "/v1/status")
            .map(|r| r.json()["totals"]["queued"] == 0)
            .unwrap_or(false)
    });
    assert!(drained, "agent never drained: {}", agent.status());
    wait_drained(&agent, &gw, acked.len(), Duration::from_secs(60));
    assert_exactly_once(&gw, &acked);
}

#[test]
fn events_queued_while_the_gateway_is_away_arrive_once_it_is_back() {
    let (mut gw, mut agent) = site("");
    let auth = basic("test-key", "");
    let (first, body) = batch_body("online", 100);
    assert_eq!(
        post(agent.addr, "/v1/batch", &auth, &body).unwrap().status,
        200
    );
    wait_drained(&agent, &gw, 100, Duration::from_secs(30));
    assert!(gw.stop_term().0);
    let mut acked = first;
    for r in 0..20 {
        let (ids, body) = batch_body(&format!("offline-{r}"), 100);
        assert_eq!(
            post(agent.addr, "/v1/batch", &auth, &body).unwrap().status,
            200
        );
        acked.extend(ids);
    }
    let status = agent.status();
    assert_eq!(status["uplink"]["connected"], false);
    assert_eq!(status["totals"]["queued"], 2000, "{status}");
    // The agent itself goes down with its backlog and comes back before the gateway.
    agent.stop_kill();
    agent.start();
    assert_eq!(agent.status()["totals"]["queued"], 2000);
    gw.start();
    wait_drained(&agent, &gw, acked.len(), Duration::from_secs(60));
    assert_exactly_once(&gw, &acked);
}
