//! The profile stage against a real [`Store`]: events enter through
//! [`Store::receive`] as an agent's batches do, the stage runs as in the gateway.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edge_agent::model::{now_ms, DeviceId, Event, EventKind, Seq, Source, Value};
use edge_agent::spool::Drops;
use edge_agent::wire::UplinkBatch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::GatewayConfig;

const DAY: i64 = 24 * 3600 * 1000;

struct Env {
    dir: tempfile::TempDir,
    config: GatewayConfig,
    store: Arc<Store>,
    profiles: Arc<Profiles>,
    shutdown: CancellationToken,
    stage: tokio::task::JoinHandle<()>,
    /// Next agent seq per device.
    seqs: HashMap<String, u64>,
}

const CONFIG: &str = r#"
[[destinations]]
name = "d1"
kind = "file"
dir = "out"
attributes = ["plan", "orders", "revenue"]

[[computed]]
name = "orders"
kind = "count"
event = "Order"

[[computed]]
name = "revenue"
kind = "sum"
event = "Order"
property = "revenue"

[[computed]]
name = "first_product"
kind = "first"
property = "product"

[[computed]]
name = "last_product"
kind = "last"
property = "product"

[[computed]]
name = "products"
kind = "unique"
property = "product"

[[computed]]
name = "orders_7d"
kind = "count"
event = "Order"
window = "7d"
"#;

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config: GatewayConfig = toml::from_str(CONFIG).unwrap();
        Env::open(dir, config, HashMap::new())
    }

    fn open(dir: tempfile::TempDir, config: GatewayConfig, seqs: HashMap<String, u64>) -> Env {
        let profiles = Profiles::open(&dir.path().join(PROFILES_FILE), &config).unwrap();
        Env::with_profiles(dir, config, seqs, profiles)
    }

    /// The gateway's store in `dir` and the profile stage over `profiles`.
    fn with_profiles(
        dir: tempfile::TempDir,
        config: GatewayConfig,
        seqs: HashMap<String, u64>,
        profiles: Profiles,
    ) -> Env {
        // "d1" never reports progress: the inbox keeps everything, as with a
        // destination that is behind.
        let names = [STAGE_NAME.to_owned(), "d1".to_owned()];
        let store = Arc::new(Store::open(&dir.path().join("g.redb"), 1 << 24, &names).unwrap());
        let profiles = Arc::new(profiles);
        let shutdown = CancellationToken::new();
        let stage = tokio::spawn(Arc::clone(&profiles).run(Arc::clone(&store), shutdown.clone()));
        Env {
            dir,
            config,
            store,
            profiles,
            shutdown,
            stage,
            seqs,
        }
    }

    /// Stops everything and opens it again from disk.
    async fn restart(self) -> Env {
        self.shutdown.cancel();
        self.stage.await.unwrap();
        self.store.close().await;
        let Env {
            dir,
            config,
            store,
            profiles,
            seqs,
            ..
        } = self;
        drop(profiles);
        drop(store);
        Env::open(dir, config, seqs)
    }

    /// Stores `events` as one batch of `device` and waits until they are resolved.
    async fn send(&mut self, device: &str, events: Vec<Event>) {
        self.store_batch(device, events).await;
        self.settle().await;
    }

    /// Stores `events` as one batch of `device`.
    async fn store_batch(&mut self, device: &str, events: Vec<Event>) {
        let next = self.seqs.entry(device.to_owned()).or_insert(1);
        let first = *next;
        let events: Vec<Event> = events
            .into_iter()
            .map(|mut e| {
                e.seq = Seq(*next);
                e.lane = "default".into();
                *next += 1;
                e
            })
            .collect();
        let now = now_ms();
        let batch = UplinkBatch {
            device: DeviceId(device.into()),
            lane: "default".into(),
            floor: Seq(first),
            sent_at_ms: now,
            drops: Drops::default(),
            events,
        };
        let receipt = self
            .store
            .receive(DeviceId(device.into()), batch, now)
            .await
            .unwrap();
        assert!(receipt.rejected.is_empty());
    }

    async fn settle(&self) {
        let head = *self.store.head().borrow();
        let mut resolved = self.profiles.resolved();
        tokio::time::timeout(Duration::from_secs(10), resolved.wait_for(|r| *r >= head))
            .await
            .expect("the stage resolves within 10 s")
            .unwrap();
        assert!(
            self.profiles.settle_reads(Duration::from_secs(10)).await,
            "profiles readable within 10 s"
        );
    }

    fn lookup(&self, ty: &str, value: &str) -> Option<ProfileView> {
        self.profiles.lookup(ty, value).unwrap()
    }

    fn routed(&self) -> RoutedPage {
        self.profiles.read_routed(&self.store, 0, 10_000).unwrap()
    }
}

fn ev(kind: EventKind, user: Option<&str>, anon: Option<&str>) -> Event {
    let mut e = Event::new(kind, Source::Segment, now_ms());
    e.identities.user_id = user.map(Into::into);
    e.identities.anonymous_id = anon.map(Into::into);
    e
}

fn identify(user: Option<&str>, anon: Option<&str>, traits: &[(&str, &str)]) -> Event {
    let mut e = ev(EventKind::Identify, user, anon);
    for (k, v) in traits {
        e.traits.insert(*k, Value::from(*v));
    }
    e
}

fn order(user: Option<&str>, anon: Option<&str>, revenue: f64, product: &str, at: i64) -> Event {
    let mut e = ev(EventKind::Track, user, anon);
    e.name = Some("Order".into());
    e.timestamp_ms = at;
    e.properties.insert("revenue", Value::Float(revenue));
    e.properties.insert("product", Value::from(product));
    e
}

fn computed(view: &ProfileView, name: &str) -> Value {
    view.computed
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_family_tv_keeps_its_logged_in_users_apart() {
    let mut env = Env::start().await;
    env.send("tv", vec![identify(Some("mom"), Some("tv-anon"), &[])])
        .await;
    env.send("tv", vec![identify(Some("kid"), Some("tv-anon"), &[])])
        .await;
    env.send("tv", vec![ev(EventKind::Screen, None, Some("tv-anon"))])
        .await;
    env.send(
        "tv",
        vec![ev(EventKind::Track, Some("kid"), Some("tv-anon"))],
    )
    .await;

    let mom = env.lookup("customer_id", "mom").unwrap();
    let kid = env.lookup("user_id", "kid").unwrap();
    assert_ne!(mom.id, kid.id);
    assert_eq!(env.profiles.count().unwrap(), 2);
    assert_eq!(
        mom.events, 2,
        "the anonymous screen view went to the first holder"
    );
    assert_eq!(kid.events, 2);
    assert!(kid.merged_from.is_empty() && mom.merged_from.is_empty());
    assert_eq!(
        env.lookup("anonymous_id", "tv-anon").unwrap().id,
        mom.id,
        "an identifier maps to one profile"
    );
    let ids: Vec<u64> = env
        .routed()
        .events
        .iter()
        .map(|r| r.enrichment.profile_id)
        .collect();
    assert_eq!(ids, [mom.id, kid.id, mom.id, kid.id]);
}

#[tokio::test]
async fn logging_in_after_anonymous_browsing_merges_and_keeps_earlier_attributes() {
    let mut env = Env::start().await;
    // Anonymous on the phone; logged in on the laptop.
    env.send(
        "phone",
        vec![identify(None, Some("anon-p"), &[("plan", "free")])],
    )
    .await;
    env.send(
        "laptop",
        vec![identify(Some("ann"), Some("anon-l"), &[("name", "Ann")])],
    )
    .await;
    assert_eq!(env.profiles.count().unwrap(), 2);
    let phone_id = env.lookup("anonymous_id", "anon-p").unwrap().id;
    let laptop_id = env.lookup("customer_id", "ann").unwrap().id;

    // Ann logs in on the phone.
    env.send(
        "phone",
        vec![ev(EventKind::Track, Some("ann"), Some("anon-p"))],
    )
    .await;
    assert_eq!(env.profiles.count().unwrap(), 1);
    let ann = env.lookup("customer_id", "ann").unwrap();
    assert_eq!(ann.id, phone_id.min(laptop_id), "the lowest id survives");
    assert_eq!(ann.merged_from, [phone_id.max(laptop_id)]);
    for (ty, v) in [("anonymous_id", "anon-p"), ("anonymous_id", "anon-l")] {
        assert_eq!(env.lookup(ty, v).unwrap().id, ann.id, "{v} re-pointed");
    }
    let attr = |name: &str| {
        ann.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attr("plan"), Some(Value::from("free")));
    assert_eq!(attr("name"), Some(Value::from("Ann")));
    assert_eq!(ann.events, 3);
    let mut devices = ann.devices.clone();
    devices.sort();
    assert_eq!(devices, ["laptop", "phone"]);
    // The merged-away id still finds Ann.
    let via_loser = env.profiles.get(phone_id.max(laptop_id)).unwrap().unwrap();
    assert_eq!(via_loser.id, ann.id);

    // The last event is enriched with the allowlisted attributes only.
    let page = env.routed();
    let last = &page.events.last().unwrap().enrichment;
    assert_eq!(last.profile_id, ann.id);
    let names: Vec<&str> = last.attributes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["orders", "plan", "revenue"],
        "`name` is not allowlisted"
    );
    assert!(last
        .identities
        .contains(&("customer_id".into(), "ann".into())));
}

#[tokio::test]
async fn blocklisted_values_link_nothing() {
    let mut env = Env::start().await;
    let mut e = ev(EventKind::Track, Some("0"), Some("null"));
    e.traits.insert("email", Value::from("test@example.com"));
    let mut e2 = ev(EventKind::Track, Some(" NULL "), None);
    e2.identities
        .other
        .push(("email".into(), "TEST@example.com".into()));
    env.send("tv", vec![e, e2]).await;
    assert_eq!(env.profiles.count().unwrap(), 0);
    assert!(env.lookup("customer_id", "0").is_none());
    let page = env.routed();
    assert_eq!(page.events.len(), 2, "events without a profile still flow");
    for r in &page.events {
        assert_eq!(r.enrichment, Enrichment::default());
    }
}

#[tokio::test]
async fn a_merge_moves_computed_attributes() {
    let mut env = Env::start().await;
    let base = now_ms() - 5 * DAY;
    env.send(
        "phone",
        vec![
            order(None, Some("a"), 10.0, "x", base + 2 * DAY),
            order(None, Some("a"), 5.0, "y", base + 4 * DAY),
        ],
    )
    .await;
    env.send(
        "web",
        vec![
            order(Some("u"), None, 7.0, "z", base + DAY),
            order(Some("u"), None, 1.0, "x", base + 3 * DAY),
        ],
    )
    .await;
    env.send("phone", vec![ev(EventKind::Identify, Some("u"), Some("a"))])
        .await;
    let u = env.lookup("anonymous_id", "a").unwrap();
    assert_eq!(env.profiles.count().unwrap(), 1);
    assert_eq!(computed(&u, "orders"), Value::Int(4));
    assert_eq!(computed(&u, "orders_7d"), Value::Int(4));
    assert_eq!(computed(&u, "revenue"), Value::Float(23.0));
    assert_eq!(computed(&u, "first_product"), Value::from("z"));
    assert_eq!(computed(&u, "last_product"), Value::from("y"));
    let Value::Array(mut products) = computed(&u, "products") else {
        panic!("unique is a list");
    };
    products.sort_by_key(|v| v.as_str().map(String::from));
    assert_eq!(
        products,
        [Value::from("x"), Value::from("y"), Value::from("z")]
    );
}

#[tokio::test]
async fn a_windowed_count_leaves_out_events_older_than_the_window() {
    let mut env = Env::start().await;
    let now = now_ms();
    env.send(
        "tv",
        vec![
            order(Some("u"), None, 1.0, "x", now - 10 * DAY),
            order(Some("u"), None, 1.0, "x", now - 3 * DAY),
            order(Some("u"), None, 1.0, "x", now - 1000),
        ],
    )
    .await;
    let u = env.lookup("customer_id", "u").unwrap();
    assert_eq!(computed(&u, "orders"), Value::Int(3));
    assert_eq!(computed(&u, "orders_7d"), Value::Int(2));
}

#[tokio::test]
async fn erase_removes_the_profile_its_links_and_its_queued_events() {
    let mut env = Env::start().await;
    env.send(
        "tv",
        vec![
            identify(Some("mom"), Some("m-anon"), &[("plan", "pro")]),
            ev(EventKind::Track, Some("kid"), Some("k-anon")),
            ev(EventKind::Track, None, Some("m-anon")),
        ],
    )
    .await;
    let mom = env.lookup("customer_id", "mom").unwrap();

    let erased = env
        .profiles
        .erase(&env.store, "customer_id", "mom")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(erased.profile_id, mom.id);
    assert_eq!(erased.queued_removed, 2);
    assert_eq!(erased.devices, [DeviceId("tv".into())]);
    let mut users = erased.user_ids.clone();
    users.sort();
    assert_eq!(users, ["m-anon", "mom"]);

    assert!(env.lookup("customer_id", "mom").is_none());
    assert!(env.lookup("anonymous_id", "m-anon").is_none());
    assert!(env.profiles.get(mom.id).unwrap().is_none());
    assert_eq!(env.profiles.count().unwrap(), 1);
    assert_eq!(env.store.inbox_len().unwrap(), 1);
    let page = env.routed();
    assert_eq!(page.events.len(), 1);
    assert_eq!(
        page.events[0].record.event.identities.user_id.as_deref(),
        Some("kid")
    );
    assert_eq!(
        page.through,
        *env.store.head().borrow(),
        "erased seqs are passed over"
    );

    assert!(env
        .profiles
        .erase(&env.store, "customer_id", "mom")
        .await
        .unwrap()
        .is_none());
    // A new event from mom starts a new profile.
    env.send("tv", vec![ev(EventKind::Track, Some("mom"), None)])
        .await;
    let again = env.lookup("customer_id", "mom").unwrap();
    assert_ne!(again.id, mom.id);
    assert_eq!(again.events, 1);
}

#[tokio::test]
async fn a_restart_resumes_from_the_cursor_without_counting_twice() {
    let mut env = Env::start().await;
    env.send(
        "tv",
        vec![
            order(Some("u"), None, 2.0, "x", now_ms()),
            order(Some("u"), Some("a"), 3.0, "y", now_ms()),
        ],
    )
    .await;
    let before = env.lookup("customer_id", "u").unwrap();
    let resolved = *env.profiles.resolved().borrow();

    let mut env = env.restart().await;
    assert_eq!(
        *env.profiles.resolved().borrow(),
        resolved,
        "cursor reloaded"
    );
    env.settle().await;
    let same = env.lookup("customer_id", "u").unwrap();
    assert_eq!(same, before, "nothing resolved twice");

    env.send("tv", vec![order(None, Some("a"), 5.0, "z", now_ms())])
        .await;
    let after = env.lookup("customer_id", "u").unwrap();
    assert_eq!(after.id, before.id);
    assert_eq!(after.events, 3);
    assert_eq!(computed(&after, "orders"), Value::Int(3));
    assert_eq!(computed(&after, "revenue"), Value::Float(10.0));
    assert_eq!(env.routed().events.len(), 3);
    assert_eq!(env.profiles.count().unwrap(), 1);
}

#[tokio::test]
async fn bulk_seeded_profiles_are_found_and_new_ones_follow_them() {
    let dir = tempfile::tempdir().unwrap();
    let config: GatewayConfig = toml::from_str(CONFIG).unwrap();
    {
        let p = Profiles::open(&dir.path().join(PROFILES_FILE), &config).unwrap();
        p.bulk_seed(1000).unwrap();
    }
    let mut env = Env::open(dir, config, HashMap::new());
    assert_eq!(env.profiles.count().unwrap(), 1000);
    env.send(
        "tv",
        vec![ev(EventKind::Track, Some("seed-500"), Some("new-anon"))],
    )
    .await;
    env.send("tv", vec![ev(EventKind::Track, Some("someone"), None)])
        .await;
    assert_eq!(env.lookup("anonymous_id", "new-anon").unwrap().id, 500);
    assert_eq!(env.lookup("customer_id", "someone").unwrap().id, 1001);
}

/// `profiles.redb` on a disk that fills: resolution stops while it is full; once
/// space is back the file is reopened (back at its last durable commit) and the stage
/// resolves again from there, counting every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_resolution_until_space_is_back_and_nothing_counts_twice() {
    use crate::store::test_disk::{Backend, Disk};
    use std::sync::atomic::Ordering;

    let disk = Arc::new(Disk::default());
    let open = {
        let disk = Arc::clone(&disk);
        move |_: &std::path::Path| {
            db::prepare(
                redb::Database::builder()
                    .create_with_backend(Backend(Arc::clone(&disk)))
                    .st()?,
            )
        }
    };
    let path = std::path::Path::new("profiles.redb");
    let file = RedbFile::new(path, open(path).unwrap(), open);
    let config: GatewayConfig = toml::from_str(CONFIG).unwrap();
    let profiles = Profiles::open_file(file, &config).unwrap();
    let mut env = Env::with_profiles(
        tempfile::tempdir().unwrap(),
        config,
        HashMap::new(),
        profiles,
    );
    for _ in 0..3 {
        env.send("tv", vec![order(Some("u"), None, 1.0, "x", now_ms())])
            .await;
    }

    disk.full.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        env.store_batch("tv", vec![order(Some("u"), None, 2.0, "y", now_ms())])
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At least one checkpoint is due meanwhile (they come every second).
    tokio::time::sleep(stage::CHECKPOINT_EVERY + Duration::from_millis(500)).await;
    let head = *env.store.head().borrow();
    let flushed = *env.profiles.flushed().borrow();
    assert!(
        flushed < head,
        "nothing reached the full disk ({flushed} of {head})"
    );

    disk.full.store(false, Ordering::SeqCst);
    let mut flushed = env.profiles.flushed();
    tokio::time::timeout(Duration::from_secs(10), flushed.wait_for(|f| *f >= head))
        .await
        .expect("resolution resumes once space is back")
        .unwrap();
    assert!(
        env.profiles.shared.db.generation() >= 1,
        "the file was reopened"
    );
    let u = env.lookup("customer_id", "u").unwrap();
    assert_eq!(u.events, 8);
    assert_eq!(computed(&u, "orders"), Value::Int(8));
    assert_eq!(computed(&u, "revenue"), Value::Float(13.0));
    assert_eq!(env.routed().events.len(), 8);
}
