//! Profile stage benchmark: how fast identity resolution, profile updates and
//! enrichment rows go through a filled inbox, with nothing else competing for the CPU.
//!
//! ```text
//! cargo bench -p edge-gateway --bench resolve
//! RESOLVE_EVENTS=400000 RESOLVE_USERS=1000000 RESOLVE_SEED=1000000 cargo bench -p edge-gateway --bench resolve
//! ```
//!
//! Fills the inbox with `RESOLVE_EVENTS` (default 300,000) Segment-like events from
//! `RESOLVE_USERS` users (default 10,000; one event in 20 an identify carrying the
//! user's email), optionally over `RESOLVE_SEED` profiles created first, then starts
//! the stage with the fan-out benchmark's configuration (two computed attributes, two
//! destinations' allowlists) and times it until every event is resolved and its
//! profile changes are written. Users are spread evenly over the seeded profiles
//! (user `u` is seeded profile `u × seed / users`), so with a seed every event finds
//! an existing profile. The end-to-end number is `fanbench` (tests/src/bin); this one
//! isolates the serial stage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use edge_gateway::config::GatewayConfig;
use edge_gateway::profiles::Profiles;
use edge_gateway::store::Store;
use tokio_util::sync::CancellationToken;

// The gateway binary's allocator (gateway/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONFIG: &str = r#"
[[computed]]
name = "events_total"
kind = "count"

[[computed]]
name = "last_product"
kind = "last"
event = "Product Viewed"
property = "product_id"

[[destinations]]
name = "files"
kind = "file"
require_purposes = ["analytics"]
identities = ["customer_id", "anonymous_id", "email"]
attributes = ["email", "plan", "country", "events_total", "last_product"]
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Stage warnings (storage errors) show up; RUST_LOG=debug for more.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let events = common::env("RESOLVE_EVENTS", 300_000);
    let users = common::env("RESOLVE_USERS", 10_000).max(1);
    let seed = common::env("RESOLVE_SEED", 0);
    let config: GatewayConfig = toml::from_str(CONFIG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = usize::try_from(config.gateway.cache_size.0).unwrap();
    let names = [edge_gateway::profiles::STAGE_NAME.to_owned()];
    let store = Arc::new(Store::open(&dir.path().join("gateway.redb"), cache, &names).unwrap());
    let profiles = Arc::new(Profiles::open(&dir.path().join("profiles.redb"), &config).unwrap());
    if seed > 0 {
        let started = Instant::now();
        profiles.bulk_seed(seed).unwrap();
        println!("seeded {seed} profiles in {:.1?}", started.elapsed());
    }
    let started = Instant::now();
    common::fill_inbox(&store, events, users, seed).await;
    let head = *store.head().borrow();
    println!(
        "inbox filled with {events} events of {users} users in {:.1?} (head {head})",
        started.elapsed()
    );
    let shutdown = CancellationToken::new();
    // Resolved and written: the stage writes profile changes back (see its doc).
    let mut resolved = profiles.flushed();
    let started = Instant::now();
    let stage = tokio::spawn(Arc::clone(&profiles).run(Arc::clone(&store), shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(900), resolved.wait_for(|r| *r >= head))
        .await
        .expect("the stage resolves the inbox within 15 minutes")
        .unwrap();
    let took = started.elapsed();
    println!(
        "resolved {events} events in {took:.2?}: {:.0} events/s, {:.2} µs/event; profiles: {}",
        events as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / events as f64,
        profiles.count().unwrap()
    );
    shutdown.cancel();
    let _ = stage.await;
    store.close().await;
}
