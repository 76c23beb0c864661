//! Disk full: the agent's spool, or the gateway's data dir, lives on a small tmpfs.
//! When it fills, requests get 507 and nothing unacknowledged is claimed; the process
//! keeps serving and recovers by itself once space is back. Needs root (mount), as CI
//! has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use edge_tests::http::{get, post};
use edge_tests::{basic, wait_until, Agent, Gateway, BASE_CONFIG};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` on `dir` (unmounted on drop).
fn mount_tmpfs(dir: &Path, size: &str) -> Mount {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "mount tmpfs failed: this test needs root");
    Mount(dir.to_owned())
}

#[test]
#[ignore = "needs root to mount a small tmpfs (run by tests/run-all, as CI does)"]
fn a_full_disk_answers_507_keeps_serving_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mount = mount_tmpfs(dir.path(), "6m");
    let mut agent = Agent::in_dir(dir, BASE_CONFIG, "");
    agent.start();
    let auth = basic("test-key", "");

    // Leave little room, then write until the disk is full.
    let filler = mount.0.join("filler");
    let free = fs_free(&mount.0);
    std::fs::write(
        &filler,
        vec![0u8; (free.saturating_sub(512 * 1024)) as usize],
    )
    .unwrap();
    let mut acked = Vec::new();
    let mut got_507 = None;
    for i in 0..5_000 {
        let batch: Vec<_> = (0..20)
            .map(|j| serde_json::json!({"type":"track","event":"Fill","userId":"u","messageId":format!("m-{i}-{j}"),"properties":{"pad":"x".repeat(400)}}))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "batch": batch })).unwrap();
        let r = post(agent.addr, "/v1/batch", &auth, &body).unwrap();
        match r.status {
            200 => acked.extend((0..20).map(|j| format!("m-{i}-{j}"))),
            507 => {
                got_507 = Some(r);
                break;
            }
            503 => continue,
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    let r = got_507.expect("the disk never filled");
    assert!(r.body.contains("disk full"), "{}", r.body);
    // Still serving reads while full.
    assert_eq!(get(agent.addr, "/v1/status").unwrap().status, 200);

    // Free space: writes succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let body = br#"{"event":"After","userId":"u","messageId":"after-1"}"#;
    let mut recovered = false;
    for _ in 0..50 {
        let r = post(agent.addr, "/v1/track", &auth, body).unwrap();
        if r.status == 200 {
            recovered = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(recovered, "agent did not recover after space came back");
    assert!(agent.stop_term().0);
    let exported = agent.export();
    for id in &acked {
        assert!(
            exported.iter().any(|e| e["message_id"] == id.as_str()),
            "acked {id} lost"
        );
    }
    assert!(exported.iter().any(|e| e["message_id"] == "after-1"));
    let check = agent.cli(&["check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

const WEB_KEY: &str = "web-key";
const GATEWAY_EXTRA: &str = "[[sources]]\nname = \"web\"\nwrite_key = \"web-key\"\n\n\
    [[computed]]\nname = \"fills\"\nkind = \"count\"\nevent = \"Fill\"\n";
const USERS: usize = 5;

/// One batch of 20 `Fill` events over [`USERS`] users.
fn fill_batch(prefix: &str) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..20).map(|j| format!("{prefix}-{j}")).collect();
    let events: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(j, id)| serde_json::json!({"type": "track", "event": "Fill", "userId": format!("user-{}", j % USERS),
            "messageId": id, "properties": {"pad": "x".repeat(400)}}))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "batch": events })).unwrap();
    (ids, body)
}

/// The gateway's inbox, profiles, destination cursors and files all fill one disk:
/// ingest answers 507 (or 503 while a file is reopened), the process keeps running,
/// and once space is back every redb file is reopened without a restart. Then every
/// acked event reaches the file destination exactly once, and each profile counts
/// each delivered event once (the profile stage, put back to its last durable
/// state by the reopen, resolves those events again without counting them twice).
#[test]
#[ignore = "needs root to mount a small tmpfs (run by tests/run-all, as CI does)"]
fn a_full_disk_on_the_gateway_answers_507_and_everything_resumes_once_space_is_back() {
    let mut gw = Gateway::new(&[], GATEWAY_EXTRA);
    std::fs::create_dir_all(&gw.data_dir).unwrap();
    let mount = mount_tmpfs(&gw.data_dir, "48m");
    gw.start();
    let auth = basic(WEB_KEY, "");

    let filler = mount.0.join("filler");
    let free = fs_free(&mount.0);
    std::fs::write(&filler, vec![0u8; (free.saturating_sub(2 << 20)) as usize]).unwrap();
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..5_000 {
        let (ids, body) = fill_batch(&format!("m-{i}"));
        let r = post(gw.http, "/v1/batch", &auth, &body).unwrap();
        match r.status {
            200 => acked.extend(ids),
            507 | 503 => {
                refused = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    let r = refused.expect("the disk never filled");
    assert!(
        r.body.contains("disk full") || r.body.contains("unavailable"),
        "{}",
        r.body
    );
    // Keep writing while full for a while, so every file meets the full disk (what
    // a failed commit had allocated is free again: some batches may fit).
    let mut refusals = 1;
    let full_until = std::time::Instant::now() + Duration::from_secs(2);
    let mut i = 0;
    while std::time::Instant::now() < full_until {
        let (ids, body) = fill_batch(&format!("full-{i}"));
        i += 1;
        let r = post(gw.http, "/v1/batch", &auth, &body).unwrap();
        match r.status {
            200 => acked.extend(ids),
            507 | 503 => refusals += 1,
            other => panic!("unexpected {other}: {}", r.body),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{refusals} batches refused while the disk was full");
    assert_eq!(get(gw.http, "/health").unwrap().status, 200);

    std::fs::remove_file(&filler).unwrap();
    let mut after = None;
    let recovered = wait_until(Duration::from_secs(30), || {
        let (ids, body) = fill_batch("after");
        let ok = post(gw.http, "/v1/batch", &auth, &body).is_ok_and(|r| r.status == 200);
        if ok {
            after = Some(ids);
        }
        ok
    });
    assert!(
        recovered,
        "no ingest after space came back: {}",
        gw.stop_kill()
    );
    acked.extend(after.unwrap_or_default());

    let delivered_all = wait_until(Duration::from_secs(60), || {
        gw.delivered_count() >= acked.len()
    });
    let delivered = gw.delivered();
    assert!(
        delivered_all,
        "{} of {} acked events delivered: {}",
        delivered.len(),
        acked.len(),
        gw.stop_kill()
    );
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    let mut per_user: HashMap<&str, u64> = HashMap::new();
    for line in &delivered {
        *per_id
            .entry(line["messageId"].as_str().unwrap())
            .or_default() += 1;
        *per_user
            .entry(line["userId"].as_str().unwrap())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| !per_id.contains_key(id.as_str()))
        .take(5)
        .collect();
    assert!(lost.is_empty(), "acked but not delivered: {lost:?}");
    for (user, n) in &per_user {
        let counted = wait_until(Duration::from_secs(20), || {
            let r = get(gw.http, &format!("/v1/profiles/customer_id/{user}")).unwrap();
            r.status == 200 && fills(&r.json()) == Some(*n)
        });
        let r = get(gw.http, &format!("/v1/profiles/customer_id/{user}")).unwrap();
        assert!(counted, "{user}: {n} delivered, profile {}", r.body);
    }
    let (clean, log) = gw.stop_term();
    assert!(clean, "gateway did not stop cleanly: {log}");
    eprintln!(
        "{} acked, {} delivered over {} users",
        acked.len(),
        delivered.len(),
        per_user.len()
    );
}

/// The `fills` computed count of a profile view.
fn fills(profile: &serde_json::Value) -> Option<u64> {
    profile["computed"]
        .as_array()?
        .iter()
        .find(|kv| kv[0] == "fills")
        .and_then(|kv| kv[1].as_u64())
}

fn fs_free(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .arg("-B1")
        .arg("--output=avail")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}
