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

use edge_agent::model::{ConsentSnapshot, DeviceId, Event, EventKind, Map, Seq, Source};
use edge_agent::spool::Drops;
use edge_agent::wire::UplinkBatch;
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

const CONTEXT: &str = r#"{"app":{"name":"StreamBox","version":"4.2.0","build":"4200"},
"device":{"id":"tv-1","manufacturer":"Roku","model":"Ultra 4850","type":"tv"},
"os":{"name":"RokuOS","version":"12.5.0"},"locale":"en-GB",
"library":{"name":"analytics-kotlin","version":"1.16.0"}}"#;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Event `i` of user `u` (customer id matching the seed's naming when seeded).
fn event(i: u64, u: u64, seeded: bool, context: &Map) -> Event {
    let identify = i.is_multiple_of(20);
    let kind = if identify {
        EventKind::Identify
    } else {
        EventKind::Track
    };
    let mut e = Event::new(kind, Source::Segment, 1_790_000_000_000 + i as i64);
    e.id = edge_agent::model::EventId(u128::from(i) << 64 | 0x5eed);
    e.seq = Seq(i + 1);
    e.lane = "default".into();
    e.identities.device_id = DeviceId("bench-tv".into());
    let (customer, anonymous) = if seeded {
        (format!("seed-{u}"), format!("seed-anon-{u}"))
    } else {
        (format!("cust-{u:07}"), format!("anon-{u:07}"))
    };
    e.identities.user_id = Some(customer);
    e.identities.anonymous_id = Some(anonymous);
    e.context = context.clone();
    e.consent = ConsentSnapshot {
        granted: vec!["analytics".into()],
        ccpa_opt_out: false,
    };
    if identify {
        let traits = format!(
            r#"{{"email":"user-{u:07}@example.org","plan":"{}"}}"#,
            ["basic", "premium", "family"][(u % 3) as usize]
        );
        e.traits = serde_json::from_str(&traits).unwrap();
    } else {
        e.name = Some(
            if i.is_multiple_of(2) {
                "Product Viewed"
            } else {
                "Video Content Playing"
            }
            .into(),
        );
        let props = format!(
            r#"{{"product_id":"p-{}","sku":"SKU-{}","name":"Wireless Remote","price":{}.99,"position":{}}}"#,
            10_000 + i % 90_000,
            100_000 + i % 900_000,
            5 + i % 195,
            i % 2640
        );
        e.properties = serde_json::from_str(&props).unwrap();
    }
    e
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Stage warnings (storage errors) show up; RUST_LOG=debug for more.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let events = env("RESOLVE_EVENTS", 300_000);
    let users = env("RESOLVE_USERS", 10_000).max(1);
    let seed = env("RESOLVE_SEED", 0);
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
    let context: Map = serde_json::from_str(CONTEXT).unwrap();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let n = 1000.min(events - i);
        let batch = UplinkBatch {
            device: DeviceId("bench-tv".into()),
            lane: "default".into(),
            floor: Seq(i + 1),
            sent_at_ms: 1_790_000_000_000,
            drops: Drops::default(),
            events: (i..i + n)
                .map(|k| {
                    // A splitmix-style scramble: users in no particular order.
                    let draw = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
                    let u = draw % users;
                    let u = if seed > 0 {
                        1 + u * (seed / users).max(1)
                    } else {
                        u
                    };
                    event(k, u, seed > 0, &context)
                })
                .collect(),
        };
        store
            .receive(DeviceId("bench-tv".into()), batch, 1_790_000_000_000)
            .await
            .unwrap();
        i += n;
    }
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
