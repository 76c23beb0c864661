//! The engine against a real [`Store`] and [`Profiles`]: events enter through
//! [`Store::ingest`] as a server-side source's do, the profile stage and the engine
//! run as in the gateway. Time is moved per engine ([`Audiences::advance`]), never
//! slept.

use std::sync::Arc;
use std::time::Duration;

use edge_agent::model::{now_ms, DeviceId, Event, EventKind, Source, Value};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::GatewayConfig;
use crate::profiles::PROFILES_FILE;

const HOUR: i64 = 3_600_000;

const CONFIG: &str = r#"
[gateway]
audience_sweep = "1h"

[[audiences]]
name = "installed"
when = { did = "Application Installed" }

[[audiences]]
name = "sent_not_opened"
when = { all = [
  { did = "Push Sent", within = "7d", before = "1h" },
  { not = { did = "Push Opened", within = "7d" } },
] }

[[audiences]]
name = "repeat_buyers"
when = { did = "Order", at_least = 2 }

[[audiences]]
name = "pro"
description = "on the pro plan"
when = { attribute = "plan", op = "eq", value = "pro" }
"#;

struct Env {
    dir: tempfile::TempDir,
    config: GatewayConfig,
    store: Arc<Store>,
    profiles: Arc<Profiles>,
    audiences: Arc<Audiences>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config: GatewayConfig = toml::from_str(CONFIG).unwrap();
        Env::open(dir, config)
    }

    fn open(dir: tempfile::TempDir, config: GatewayConfig) -> Env {
        let names = [
            crate::profiles::STAGE_NAME.to_owned(),
            STAGE_NAME.to_owned(),
        ];
        let store = Arc::new(Store::open(&dir.path().join("g.redb"), 1 << 24, &names).unwrap());
        let profiles = Arc::new(Profiles::open(&dir.path().join(PROFILES_FILE), &config).unwrap());
        let audiences =
            Arc::new(Audiences::open(&dir.path().join(AUDIENCES_FILE), &config).unwrap());
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(Arc::clone(&profiles).run(Arc::clone(&store), shutdown.clone())),
            tokio::spawn(Arc::clone(&audiences).run(
                Arc::clone(&store),
                Arc::clone(&profiles),
                shutdown.clone(),
            )),
        ];
        Env {
            dir,
            config,
            store,
            profiles,
            audiences,
            shutdown,
            tasks,
        }
    }

    async fn restart(self) -> Env {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.store.close().await;
        let Env {
            dir,
            config,
            store,
            profiles,
            audiences,
            ..
        } = self;
        // The files are locked while open.
        drop((store, profiles, audiences));
        Env::open(dir, config)
    }

    /// Stores `events` and waits until the engine has evaluated them.
    async fn send(&self, events: Vec<Event>) {
        let receipt = self
            .store
            .ingest(DeviceId("source:web".into()), events, now_ms())
            .await
            .unwrap();
        assert!(receipt.stored > 0);
        self.settle().await;
    }

    async fn settle(&self) {
        let head = *self.store.head().borrow();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.audiences.inner.cursor.load(Ordering::Relaxed) < head {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the engine evaluates within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pid(&self, user: &str) -> u64 {
        self.profiles
            .lookup("customer_id", user)
            .unwrap()
            .unwrap()
            .id
    }

    fn size(&self, audience: &str) -> u64 {
        self.audiences
            .sizes()
            .unwrap()
            .into_iter()
            .find(|s| s.name == audience)
            .unwrap()
            .members
    }

    fn members(&self, audience: &str) -> Vec<u64> {
        self.audiences
            .members(audience, 0, 1000)
            .unwrap()
            .unwrap()
            .iter()
            .map(|m| m.profile_id)
            .collect()
    }

    /// `(audience, profile, entered)` of the whole change log.
    fn log(&self) -> Vec<(String, u64, bool)> {
        let changes = self.audiences.read_changes(0, 10_000).unwrap();
        for (i, c) in changes.iter().enumerate() {
            assert_eq!(c.seq, i as u64 + 1, "gap-free seqs");
        }
        changes
            .into_iter()
            .map(|c| (c.audience, c.profile_id, c.entered))
            .collect()
    }
}

fn track(user: Option<&str>, anon: Option<&str>, name: &str) -> Event {
    let mut e = Event::new(EventKind::Track, Source::Segment, now_ms());
    e.name = Some(name.into());
    e.identities.user_id = user.map(Into::into);
    e.identities.anonymous_id = anon.map(Into::into);
    e
}

fn identify(user: &str, traits: &[(&str, &str)]) -> Event {
    let mut e = Event::new(EventKind::Identify, Source::Segment, now_ms());
    e.identities.user_id = Some(user.into());
    for (k, v) in traits {
        e.traits.insert(*k, Value::from(*v));
    }
    e
}

fn entered(audience: &str, pid: u64) -> (String, u64, bool) {
    (audience.to_owned(), pid, true)
}

fn left(audience: &str, pid: u64) -> (String, u64, bool) {
    (audience.to_owned(), pid, false)
}

#[tokio::test]
async fn a_did_audience_fills_as_events_arrive() {
    let env = Env::start();
    env.send(vec![track(Some("u1"), None, "Application Installed")])
        .await;
    assert_eq!(env.size("installed"), 1);
    env.send(vec![
        track(Some("u2"), None, "Application Installed"),
        track(Some("u3"), None, "Page Viewed"),
    ])
    .await;
    let (u1, u2) = (env.pid("u1"), env.pid("u2"));
    assert_eq!(env.size("installed"), 2);
    assert_eq!(env.members("installed"), vec![u1.min(u2), u1.max(u2)]);
    assert_eq!(
        env.log(),
        vec![entered("installed", u1), entered("installed", u2)]
    );
    let change = &env.audiences.read_changes(0, 1).unwrap()[0];
    assert!(change
        .identities
        .contains(&("customer_id".to_owned(), "u1".to_owned())));
    assert_eq!(change.devices, ["source:web"]);
    assert_eq!(change.audiences_now, ["installed"]);
    assert_eq!(*env.audiences.changes_head().borrow(), 2);
    assert_eq!(env.audiences.audiences_of(u1).unwrap(), ["installed"]);
    assert!(env.audiences.members("nope", 0, 10).unwrap().is_none());
    let members = env
        .audiences
        .members("installed", u1.min(u2), 10)
        .unwrap()
        .unwrap();
    assert_eq!(members.len(), 1, "paging starts after the given id");
}

#[tokio::test]
async fn attribute_audiences_follow_identify_calls() {
    let env = Env::start();
    env.send(vec![identify("ada", &[("plan", "pro")])]).await;
    let ada = env.pid("ada");
    assert_eq!(env.members("pro"), vec![ada]);
    env.send(vec![identify("ada", &[("plan", "free")])]).await;
    assert_eq!(env.members("pro"), Vec::<u64>::new());
    assert_eq!(env.log(), vec![entered("pro", ada), left("pro", ada)]);
    let sizes = env.audiences.sizes().unwrap();
    let names: Vec<&str> = sizes.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["installed", "sent_not_opened", "repeat_buyers", "pro"]
    );
    assert_eq!(sizes[3].description.as_deref(), Some("on the pro plan"));
}

#[tokio::test]
async fn a_before_window_fills_only_after_time_passes_and_a_sweep_runs() {
    let env = Env::start();
    env.send(vec![
        track(Some("a"), None, "Push Sent"),
        track(Some("b"), None, "Push Sent"),
        track(Some("b"), None, "Push Opened"),
    ])
    .await;
    let (a, b) = (env.pid("a"), env.pid("b"));
    let report = env.audiences.sweep().await.unwrap();
    assert_eq!(report.changes, 0, "nobody is in before the hour");
    assert_eq!(env.size("sent_not_opened"), 0);

    env.audiences.advance(2 * HOUR);
    let report = env.audiences.sweep().await.unwrap();
    assert_eq!(report.changes, 1);
    assert_eq!(env.members("sent_not_opened"), vec![a]);
    let why = env
        .audiences
        .explain("sent_not_opened", b)
        .unwrap()
        .unwrap();
    assert_eq!(why["result"], false);
    assert!(why.to_string().contains("Push Opened"), "{why}");
    let why = env
        .audiences
        .explain("sent_not_opened", a)
        .unwrap()
        .unwrap();
    assert_eq!(why["member"], true);

    // A later open takes `a` out at once.
    env.send(vec![track(Some("a"), None, "Push Opened")]).await;
    assert_eq!(env.size("sent_not_opened"), 0);
    assert_eq!(
        env.log(),
        vec![entered("sent_not_opened", a), left("sent_not_opened", a)]
    );
    assert_eq!(env.audiences.sweep().await.unwrap().changes, 0);
}

#[tokio::test]
async fn a_merge_folds_occurrences_and_the_merged_profile_leaves() {
    let env = Env::start();
    // One order while anonymous, one logged in elsewhere, then both linked.
    env.send(vec![
        track(None, Some("anon-p"), "Order"),
        track(None, Some("anon-p"), "Application Installed"),
    ])
    .await;
    env.send(vec![track(Some("ann"), Some("anon-l"), "Order")])
        .await;
    let phone = env
        .profiles
        .lookup("anonymous_id", "anon-p")
        .unwrap()
        .unwrap()
        .id;
    let laptop = env.pid("ann");
    assert_eq!(env.size("repeat_buyers"), 0);
    assert_eq!(env.members("installed"), vec![phone]);

    env.send(vec![track(Some("ann"), Some("anon-p"), "Page Viewed")])
        .await;
    let (survivor, loser) = (phone.min(laptop), phone.max(laptop));
    assert_eq!(env.pid("ann"), survivor);
    assert_eq!(
        env.members("repeat_buyers"),
        vec![survivor],
        "two orders now"
    );
    assert_eq!(env.members("installed"), vec![survivor]);
    assert!(env.audiences.audiences_of(loser).unwrap().is_empty());
    let log = env.log();
    if loser == phone {
        assert!(log.contains(&left("installed", phone)), "{log:?}");
        assert!(log.contains(&entered("installed", survivor)), "{log:?}");
    }
    assert_eq!(env.size("installed"), 1);
}

#[tokio::test]
async fn erase_makes_the_profile_leave_every_audience() {
    let env = Env::start();
    env.send(vec![
        identify("eve", &[("plan", "pro")]),
        track(Some("eve"), None, "Application Installed"),
    ])
    .await;
    let eve = env.pid("eve");
    assert_eq!(
        env.audiences.audiences_of(eve).unwrap(),
        ["installed", "pro"]
    );
    assert_eq!(env.audiences.erase(eve).await.unwrap(), 2);
    assert!(env.audiences.audiences_of(eve).unwrap().is_empty());
    assert_eq!(env.size("installed"), 0);
    assert_eq!(env.size("pro"), 0);
    let log = env.log();
    assert_eq!(log.len(), 4);
    assert!(log[2..].iter().all(|(_, p, e)| *p == eve && !e));
    let last = env.audiences.read_changes(3, 1).unwrap();
    assert!(last[0].audiences_now.is_empty());
    assert_eq!(env.audiences.erase(eve).await.unwrap(), 0, "nothing left");
}

#[tokio::test]
async fn a_restart_resumes_without_repeating_changes() {
    let env = Env::start();
    env.send(vec![
        track(Some("r1"), None, "Application Installed"),
        track(Some("r2"), None, "Push Sent"),
    ])
    .await;
    let before = env.log();
    assert_eq!(before.len(), 1);
    let env = env.restart().await;
    env.settle().await;
    assert_eq!(env.audiences.sweep().await.unwrap().changes, 0);
    assert_eq!(env.log(), before, "nothing evaluated twice");
    env.send(vec![track(Some("r3"), None, "Application Installed")])
        .await;
    let log = env.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1], entered("installed", env.pid("r3")));
    assert_eq!(env.size("installed"), 2);
}

#[tokio::test]
async fn the_change_log_is_pruned_only_below_every_consumer() {
    let env = Env::start();
    for u in ["p1", "p2", "p3"] {
        env.send(vec![track(Some(u), None, "Application Installed")])
            .await;
    }
    assert_eq!(env.log().len(), 3);
    env.audiences
        .set_changes_done(crate::audience::devices::CONSUMER, 2);
    env.audiences.set_changes_done("not-a-consumer", 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.audiences.read_changes(0, 10).unwrap().len() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "pruned within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.audiences.read_changes(0, 10).unwrap()[0].seq, 3);
}
