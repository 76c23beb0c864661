//! Crash safety: SIGKILL the agent under steady load at random moments; every event
//! that got a 2xx must be in the spool exactly once afterwards, and `check` passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_tests::http::post;
use edge_tests::{basic, Agent, BASE_CONFIG};
use rand::Rng;

const KILLS: usize = 20;
const WRITERS: usize = 3;
const EVENTS_PER_REQUEST: usize = 10;

#[test]
fn acked_events_survive_twenty_sigkills_exactly_once() {
    let mut agent = Agent::new(BASE_CONFIG, "");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut rng = rand::rng();
    let mut total_acked = 0;
    for round in 0..KILLS {
        agent.start();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (stop, acked, addr) = (Arc::clone(&stop), Arc::clone(&acked), agent.addr);
                std::thread::spawn(move || {
                    let auth = basic("test-key", "");
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let ids: Vec<String> = (0..EVENTS_PER_REQUEST)
                            .map(|i| format!("r{round}-w{w}-n{n}-i{i}"))
                            .collect();
                        n += 1;
                        let batch: Vec<_> = ids
                            .iter()
                            .map(|id| serde_json::json!({"type":"track","event":"Load","userId":"u","messageId":id,"properties":{"k":id}}))
                            .collect();
                        let body = serde_json::to_vec(&serde_json::json!({ "batch": batch })).unwrap();
                        match post(addr, "/v1/batch", &auth, &body) {
                            Ok(r) if r.status == 200 => acked.lock().unwrap().extend(ids),
                            Ok(r) => panic!("unexpected status {}: {}", r.status, r.body),
                            // The agent died mid-request: not acked, may or may not be stored.
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        agent.stop_kill();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }

        let exported = agent.export();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for e in &exported {
            *seen
                .entry(e["message_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        let acked = acked.lock().unwrap();
        for id in acked.iter() {
            assert_eq!(
                seen.get(id).copied(),
                Some(1),
                "round {round}: acked event {id} stored {:?} times",
                seen.get(id)
            );
        }
        assert!(
            seen.values().all(|n| *n == 1),
            "round {round}: duplicate events in the spool"
        );
        let check = agent.cli(&["check"]);
        assert!(
            check.status.success(),
            "round {round}: check failed: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        total_acked = acked.len();
    }
    assert!(
        total_acked > KILLS * EVENTS_PER_REQUEST,
        "too little load to mean anything: {total_acked}"
    );
    eprintln!("{KILLS} kills, {total_acked} acked events, all present exactly once");
}

#[test]
fn sigterm_under_load_exits_cleanly_and_keeps_every_acked_event() {
    let mut agent = Agent::new(BASE_CONFIG, "");
    agent.start();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, addr) = (Arc::clone(&acked), agent.addr);
            std::thread::spawn(move || {
                let auth = basic("test-key", "");
                for n in 0..100_000 {
                    let id = format!("term-w{w}-n{n}");
                    let body = serde_json::to_vec(
                        &serde_json::json!({"event":"Load","userId":"u","messageId":id}),
                    )
                    .unwrap();
                    match post(addr, "/v1/track", &auth, &body) {
                        Ok(r) if r.status == 200 => acked.lock().unwrap().push(id),
                        Ok(r) if r.status == 503 => break,
                        Ok(r) => panic!("unexpected status {}: {}", r.status, r.body),
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    let addr = agent.addr;
    assert!(edge_tests::wait_until(Duration::from_secs(10), || {
        edge_tests::http::get(addr, "/v1/status")
            .map(|r| r.json()["totals"]["accepted"].as_u64().unwrap_or(0) > 200)
            .unwrap_or(false)
    }));
    let (clean, log) = agent.stop_term();
    assert!(clean, "agent did not exit cleanly: {log}");
    for w in writers {
        w.join().unwrap();
    }
    let exported = agent.export();
    let acked = acked.lock().unwrap();
    for id in acked.iter() {
        assert_eq!(
            exported
                .iter()
                .filter(|e| e["message_id"] == id.as_str())
                .count(),
            1,
            "{id}"
        );
    }
}
