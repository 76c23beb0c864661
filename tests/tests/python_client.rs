//! A real client no one here wrote: Segment's `segment-analytics-python` library,
//! pointed at the agent, sends identify/track/screen; every event lands in the spool
//! with its fields intact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use edge_tests::{Agent, BASE_CONFIG};

/// A Python with `segment-analytics-python`: `EDGE_TESTS_PYTHON`, else a venv made
/// (once) under the target dir.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("EDGE_TESTS_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "python3 -m venv failed (Debian: apt-get install python3-venv)"
        );
    }
    let has = Command::new(&py)
        .args(["-c", "import segment.analytics"])
        .status()
        .unwrap()
        .success();
    if !has {
        let ok = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "segment-analytics-python",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install segment-analytics-python failed");
    }
    py
}

const SCRIPT: &str = r#"
import sys
import segment.analytics as analytics
analytics.write_key = "test-key"
analytics.host = sys.argv[1]
analytics.sync_mode = True
errors = []
analytics.on_error = lambda e, batch: errors.append(str(e))
analytics.identify("py-user-1", {"email": "py@example.com", "plan": "premium", "age": 41})
analytics.track("py-user-1", "Video Played", {"title": "Harbour Lights", "seconds": 42, "hd": True, "tags": ["a", "b"]})
analytics.screen("py-user-1", "Settings", "Account", {"tab": "privacy"})
analytics.flush()
if errors:
    print("ERRORS", errors)
    sys.exit(1)
print("sent")
"#;

#[test]
#[ignore = "needs python3 and the segment-analytics-python package (tests/run-all installs them)"]
fn segment_python_library_events_arrive_intact() {
    let py = python();
    let mut agent = Agent::new(BASE_CONFIG, "");
    agent.start();
    let out = Command::new(&py)
        .args(["-c", SCRIPT, &format!("http://{}", agent.addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.stop_term().0);
    let events = agent.export();
    let of_kind = |k: &str| {
        events
            .iter()
            .find(|e| e["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}: {events:?}"))
    };

    let identify = of_kind("identify");
    assert_eq!(identify["identities"]["user_id"], "py-user-1");
    assert_eq!(identify["traits"]["plan"], "premium");
    assert_eq!(identify["traits"]["age"], 41);
    assert_eq!(identify["context"]["library"]["name"], "analytics-python");

    let track = of_kind("track");
    assert_eq!(track["name"], "Video Played");
    assert_eq!(track["properties"]["title"], "Harbour Lights");
    assert_eq!(track["properties"]["seconds"], 42);
    assert_eq!(track["properties"]["hd"], true);
    assert_eq!(track["properties"]["tags"], serde_json::json!(["a", "b"]));
    // The library's messageId (a UUID) became the event id.
    assert!(
        track["message_id"].is_null(),
        "UUID message ids are the event id"
    );

    let screen = of_kind("screen");
    assert_eq!(screen["name"], "Account");
    assert_eq!(screen["properties"]["tab"], "privacy");
    assert_eq!(screen["properties"]["category"], "Settings");
    assert_eq!(
        events.iter().filter(|e| e["source"] == "segment").count(),
        3
    );
}
