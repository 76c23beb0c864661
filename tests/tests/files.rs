//! The file destination with real processes: gzip output decodes to every acked event
//! exactly once across gateway SIGKILLs (a torn gzip member never survives recovery),
//! and a destination's filters and minimization shape what its files hold.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_tests::http::post;
use edge_tests::{basic, wait_until, Gateway};
use flate2::read::MultiGzDecoder;

const SOURCE_KEY: &str = "file-source-key";
const SOURCE: &str = "[[sources]]\nname = \"srv\"\nwrite_key = \"file-source-key\"\n";

/// Destinations send the app's own `messageId` (the event id is the idempotency key).
fn event_id(message_id: &str) -> String {
    message_id.to_owned()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Decodes a gzip file. `Err` when it is not a complete stream of complete members
/// (a file being written may end mid-member until its commit).
fn gunzip(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    MultiGzDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// `messageId`s (event ids) of every line in `dir`'s gzip files; `Err` if one does
/// not decode.
fn gz_message_ids(dir: &Path) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    for f in files(dir) {
        let name = f.to_string_lossy().into_owned();
        assert!(
            name.ends_with(".ndjson.gz") || name.ends_with(".ndjson.gz.open"),
            "unexpected file {name}"
        );
        for line in gunzip(&f)?.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{name}: {line:?}: {e}"))?;
            ids.push(v["messageId"].as_str().unwrap().to_owned());
        }
    }
    Ok(ids)
}

fn batch(prefix: &str, n: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let events: Vec<_> = ids
        .iter()
        .map(|id| {
            serde_json::json!({"type": "track", "event": "Clicked", "userId": "u1", "messageId": id,
            "properties": {"id": id, "padding": "x".repeat(200)}})
        })
        .collect();
    (
        ids,
        serde_json::to_vec(&serde_json::json!({ "batch": events })).unwrap(),
    )
}

#[test]
fn gzip_files_hold_every_acked_event_exactly_once_across_sigkills() {
    let mut gw = Gateway::new(
        &[],
        &format!(
            "{SOURCE}[[destinations]]\nname = \"gz\"\nkind = \"file\"\ndir = \"gz\"\ngzip = true\n\
             batch_size = 50\nmax_file_size = \"16KiB\"\nmax_file_age = \"1h\"\n"
        ),
    );
    let dir = gw.data_dir.join("gz");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for round in 0..3 {
        gw.start();
        let stop = Arc::new(AtomicBool::new(false));
        let loader = {
            let (acked, stop, addr) = (Arc::clone(&acked), Arc::clone(&stop), gw.http);
            std::thread::spawn(move || {
                let auth = basic(SOURCE_KEY, "");
                let mut r = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (ids, body) = batch(&format!("gz-{round}-{r}"), 100);
                    r += 1;
                    match post(addr, "/v1/batch", &auth, &body) {
                        Ok(resp) if resp.status == 200 => acked.lock().unwrap().extend(ids),
                        Ok(resp) => panic!("status {}: {}", resp.status, resp.body),
                        // Killed mid-request: not acked; stored or not, never twice.
                        Err(_) => break,
                    }
                }
            })
        };
        let before = acked.lock().unwrap().len();
        let progressing = wait_until(Duration::from_secs(30), || {
            acked.lock().unwrap().len() >= before + 2000
                && gz_message_ids(&dir).map(|ids| ids.len()).unwrap_or(0) > before
        });
        assert!(
            progressing,
            "round {round}: no progress: {}",
            gw.stop_kill()
        );
        gw.stop_kill();
        stop.store(true, Ordering::Relaxed);
        loader.join().unwrap();
    }
    gw.start();
    let acked = acked.lock().unwrap().clone();
    let all_in = wait_until(Duration::from_secs(60), || {
        gz_message_ids(&dir).map(|ids| ids.len()).unwrap_or(0) >= acked.len()
    });
    let (clean, log) = gw.stop_term();
    assert!(clean, "gateway did not stop cleanly: {log}");
    let ids = gz_message_ids(&dir).unwrap();
    assert!(
        all_in,
        "only {} of {} acked events in the gzip files",
        ids.len(),
        acked.len()
    );
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dupes.is_empty(), "written twice: {dupes:?}");
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !seen.contains_key(event_id(id).as_str()))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "acked but not written: {missing:?}");
    let closed = files(&dir)
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".ndjson.gz"))
        .count();
    assert!(
        closed >= 2,
        "16KiB files should have rotated: {closed} closed"
    );
    eprintln!(
        "{} acked, {} written ({} unacked but stored), {closed} closed files",
        acked.len(),
        ids.len(),
        ids.len() - acked.len()
    );
}

#[test]
fn a_file_destination_gets_only_the_events_and_fields_it_allows() {
    let mut gw = Gateway::new(
        &[],
        &format!(
            "{SOURCE}[[destinations]]\nname = \"narrow\"\nkind = \"file\"\ndir = \"narrow\"\n\
             event_types = [\"track\"]\nexclude_event_names = [\"Secret\"]\nproperties = [\"sku\"]\n\
             context = false\nmax_file_age = \"1h\"\n"
        ),
    );
    gw.start();
    let events = serde_json::json!({"batch": [
        {"type": "track", "event": "Bought", "userId": "u1", "messageId": "keep",
         "properties": {"sku": "A-1", "card": "4111-1111"}},
        {"type": "track", "event": "Secret", "userId": "u1", "messageId": "excluded",
         "properties": {"sku": "B-2"}},
        {"type": "identify", "userId": "u1", "messageId": "wrong-type", "traits": {"plan": "pro"}},
        {"type": "track", "event": "Bought", "userId": "u2", "messageId": "keep-2",
         "properties": {"sku": "C-3"}}
    ]});
    let resp = post(
        gw.http,
        "/v1/batch",
        &basic(SOURCE_KEY, ""),
        &serde_json::to_vec(&events).unwrap(),
    )
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    // The unfiltered `events` destination gets all four: they were resolved and routed.
    assert!(wait_until(Duration::from_secs(20), || gw.delivered_count() >= 4));
    let dir = gw.data_dir.join("narrow");
    let read = || -> Vec<serde_json::Value> {
        files(&dir)
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect()
    };
    assert!(wait_until(Duration::from_secs(20), || read().len() >= 2));
    let (clean, log) = gw.stop_term();
    assert!(clean, "{log}");
    let lines = read();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [event_id("keep"), event_id("keep-2")], "{lines:?}");
    assert_eq!(lines[0]["properties"], serde_json::json!({"sku": "A-1"}));
    assert!(lines[0].get("context").is_none(), "{}", lines[0]);
}

#[test]
fn batch_mode_writes_one_closed_file_per_scheduled_run() {
    let mut gw = Gateway::new(
        &[],
        &format!(
            "{SOURCE}[[destinations]]\nname = \"nightly\"\nkind = \"file\"\ndir = \"nightly\"\n\
             mode = \"batch\"\nschedule = \"300ms\"\nbatch_size = 40\ngzip = true\nmax_file_age = \"1h\"\n"
        ),
    );
    gw.start();
    let dir = gw.data_dir.join("nightly");
    let auth = basic(SOURCE_KEY, "");
    let mut expected = Vec::new();
    for run in 0..2 {
        let (ids, body) = batch(&format!("nightly-{run}"), 100);
        let resp = post(gw.http, "/v1/batch", &auth, &body).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        expected.extend(ids.iter().map(|id| event_id(id)));
        // Each run's events end up in closed files only: nothing stays `.open`.
        let closed_with_all = wait_until(Duration::from_secs(20), || {
            let names: Vec<String> = files(&dir)
                .iter()
                .map(|f| f.to_string_lossy().into_owned())
                .collect();
            names.iter().all(|n| n.ends_with(".ndjson.gz"))
                && gz_message_ids(&dir).is_ok_and(|got| got.len() == expected.len())
        });
        assert!(closed_with_all, "run {run}: files {:?}", files(&dir));
    }
    let (clean, log) = gw.stop_term();
    assert!(clean, "{log}");
    assert_eq!(gz_message_ids(&dir).unwrap(), expected);
    assert!(
        files(&dir).len() >= 2,
        "one file per run: {:?}",
        files(&dir)
    );
}
