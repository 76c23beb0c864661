//! What the gateway benchmarks share: the fan-out benchmark's events, written into a
//! real inbox.

#![allow(dead_code)]

use edge_agent::model::{ConsentSnapshot, DeviceId, Event, EventKind, Map, Seq, Source};
use edge_agent::spool::Drops;
use edge_agent::wire::UplinkBatch;
use edge_gateway::store::Store;

const CONTEXT: &str = r#"{"app":{"name":"StreamBox","version":"4.2.0","build":"4200"},
"device":{"id":"tv-1","manufacturer":"Roku","model":"Ultra 4850","type":"tv"},
"os":{"name":"RokuOS","version":"12.5.0"},"locale":"en-GB",
"library":{"name":"analytics-kotlin","version":"1.16.0"}}"#;

pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Event `i` of user `u` (customer id matching the seed's naming when seeded).
pub fn event(i: u64, u: u64, seeded: bool, context: &Map) -> Event {
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
    e.identities.user_id = Some(customer.into());
    e.identities.anonymous_id = Some(anonymous.into());
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

/// Writes `events` events of `users` users into `store`'s inbox, 1,000 per batch, in
/// no particular user order; with `seed` profiles, user `u` is seeded profile
/// `u × seed / users`.
pub async fn fill_inbox(store: &Store, events: u64, users: u64, seed: u64) {
    let context: Map = serde_json::from_str(CONTEXT).unwrap();
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
}
