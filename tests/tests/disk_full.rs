//! Disk full: the spool lives on a small tmpfs. When it fills, requests get 507 and
//! nothing unacknowledged is claimed; the agent keeps serving and recovers by itself
//! once space is back. Needs root (mount), as CI has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use edge_tests::http::{get, post};
use edge_tests::{basic, Agent, BASE_CONFIG};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root to mount a small tmpfs (run by tests/run-all, as CI does)"]
fn a_full_disk_answers_507_keeps_serving_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "mount tmpfs failed: this test needs root");
    let mount = Mount(dir.path().to_owned());
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
