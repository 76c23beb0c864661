//! Rendering benchmark: what turning resolved events into the JSON a destination
//! receives costs, per destination, with nothing else competing for the CPU.
//!
//! ```text
//! cargo bench -p edge-gateway --bench render
//! RENDER_EVENTS=100000 RENDER_ROUNDS=10 cargo bench -p edge-gateway --bench render
//! ```
//!
//! Fills an inbox with `RENDER_EVENTS` (default 50,000) of the fan-out benchmark's
//! events from 10,000 users, resolves them with the profile stage, reads the resolved
//! events back (as a destination does), then renders all of them `RENDER_ROUNDS`
//! times (default 10) through each of the fan-out benchmark's two destinations (the
//! file's and the webhook's allowlists) and prints µs per event and bytes per event.
//! The end-to-end number is `fanbench` (tests/src/bin).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_gateway::config::GatewayConfig;
use edge_gateway::dest::route::Route;
use edge_gateway::profiles::{Profiles, Routed};
use edge_gateway::store::Store;
use tokio_util::sync::CancellationToken;

// The gateway binary's allocator (gateway/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fanbench's destinations (tests/src/bin/fanbench.rs), with its computed attributes.
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

[[destinations]]
name = "hook"
kind = "webhook"
url = "http://127.0.0.1:9/v1/batch"
require_purposes = ["analytics"]
identities = ["customer_id", "email"]
attributes = ["plan", "events_total"]
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = common::env("RENDER_EVENTS", 50_000);
    let rounds = common::env("RENDER_ROUNDS", 10).max(1);
    let config: GatewayConfig = toml::from_str(CONFIG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = usize::try_from(config.gateway.cache_size.0).unwrap();
    let names = [edge_gateway::profiles::STAGE_NAME.to_owned()];
    let store = Arc::new(Store::open(&dir.path().join("gateway.redb"), cache, &names).unwrap());
    let profiles = Arc::new(Profiles::open(&dir.path().join("profiles.redb"), &config).unwrap());
    common::fill_inbox(&store, events, 10_000, 0).await;
    let head = *store.head().borrow();
    let shutdown = CancellationToken::new();
    let mut flushed = profiles.flushed();
    let stage = tokio::spawn(Arc::clone(&profiles).run(Arc::clone(&store), shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(600), flushed.wait_for(|r| *r >= head))
        .await
        .expect("the stage resolves the inbox within 10 minutes")
        .unwrap();
    shutdown.cancel();
    let _ = stage.await;

    let mut resolved: Vec<Arc<Routed>> = Vec::new();
    let mut after = 0;
    while after < head {
        let page = profiles.read_routed(&store, after, 1000).unwrap();
        after = page.through;
        resolved.extend(page.events);
    }
    println!("{} resolved events of 10,000 users", resolved.len());
    for dest in &config.destinations {
        let route = Route::new(dest);
        let mut out = Vec::with_capacity(8 << 20);
        let (mut rendered, mut bytes) = (0u64, 0u64);
        let started = Instant::now();
        for _ in 0..rounds {
            for routed in &resolved {
                out.clear();
                if route.render_into(routed, &mut out) {
                    rendered += 1;
                    bytes += out.len() as u64;
                }
            }
        }
        let took = started.elapsed();
        let looked = rounds * resolved.len() as u64;
        println!(
            "{:<6} {:>9} events rendered in {took:.2?}: {:.2} µs/event, {:.0} events/s, {} bytes/event",
            dest.name,
            rendered,
            took.as_secs_f64() * 1e6 / looked as f64,
            looked as f64 / took.as_secs_f64(),
            bytes / rendered.max(1)
        );
    }
    store.close().await;
}
