//! Sweep benchmark: one scheduled sweep over N profiles (default 1,000,000) and 10
//! audiences whose `did` clauses wait for time to pass (issue target: ≤ 10 s).
//!
//! ```text
//! cargo bench -p edge-gateway --bench sweep
//! SWEEP_PROFILES=200000 SWEEP_ENTERING=10 cargo bench -p edge-gateway --bench sweep
//! ```
//!
//! Seeds the audience store directly (`Audiences::bulk_seed`: every profile did `Push
//! Sent` now), moves the gateway clock two hours forward, and times the sweeps: with
//! nothing due, then with every profile entering `SWEEP_ENTERING` (default 1) of the
//! 10 audiences (the others wait a day), then right after.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use edge_agent::model::now_ms;
use edge_gateway::audience::engine::{Audiences, AUDIENCES_FILE};
use edge_gateway::config::GatewayConfig;

const HOUR: i64 = 3_600_000;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: u64 = std::env::var("SWEEP_PROFILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // How many of the 10 audiences every profile enters at the timed sweep (the
    // others wait for a day): 1 is a busy sweep, 10 the worst case.
    let entering: u64 = std::env::var("SWEEP_ENTERING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut text = String::from("[gateway]\naudience_sweep = \"1h\"\ncache_size = \"512MiB\"\n");
    for i in 0..10 {
        let before = if i < entering { 60 + i } else { 1440 + i };
        text.push_str(&format!(
            "[[audiences]]\nname = \"a{i}\"\nwhen = {{ all = [ {{ did = \"Push Sent\", within = \"7d\", before = \"{before}m\" }}, {{ not = {{ did = \"Push Opened\", within = \"7d\" }} }} ] }}\n"
        ));
    }
    let config: GatewayConfig = toml::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audiences = Audiences::open(&dir.path().join(AUDIENCES_FILE), &config).unwrap();
    let started = std::time::Instant::now();
    audiences.bulk_seed(n, "Push Sent", now_ms()).unwrap();
    println!("seeded {n} profiles in {:?}", started.elapsed());
    let quiet = audiences.sweep().await.unwrap();
    println!("sweep with nothing due: {quiet:?}");
    edge_gateway::clock::advance(2 * HOUR);
    let report = audiences.sweep().await.unwrap();
    println!("sweep after 2h (every profile enters {entering} of 10 audiences): {report:?}");
    assert_eq!(report.changes, n * entering);
    let again = audiences.sweep().await.unwrap();
    println!("sweep right after: {again:?}");
}
