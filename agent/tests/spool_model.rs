//! Model-based test of the spool: random appends, drains, reads, TTL sweeps, crashes
//! and reopens run against a real [`Spool`] and against a plain in-memory model (one
//! `VecDeque` per lane). After every step the spool must hold exactly what the model
//! holds, its counters must agree, and `Spool::check` must find nothing.
//! (After redb's `fuzz/fuzz_targets/fuzz_redb.rs` and vector's disk_v2 model tests.)
//!
//! Three ways to lose the spool handle are exercised:
//! - a drop without `close()` (the crash the spool documents; the writer is joined);
//! - a "kill": the file's bytes are copied while the database is still open and the
//!   copy is opened, as a killed process would leave it (redb must repair it);
//! - a graceful `close()`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use edge_agent::config::{AgentConfig, SpoolConfig};
use edge_agent::consent::ConsentPolicy;
use edge_agent::model::{DeviceId, Event, EventKind, Seq, Source, Value};
use edge_agent::spool::{AppendOutcome, AppendRequest, Spool, SpoolError};
use proptest::prelude::*;

const DEVICE: &str = "dev-1";

/// Agent time when a test starts; the test's clock only moves forward from here.
const START_MS: i64 = 1_700_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum WhenFull {
    Reject,
    DropOldest,
}

#[derive(Debug)]
struct LaneSpec {
    name: &'static str,
    max_bytes: u64,
    when_full: WhenFull,
    ttl_ms: Option<i64>,
}

/// Small budgets, so that full lanes (both policies) are common.
const LANES: [LaneSpec; 4] = [
    LaneSpec {
        name: "small",
        max_bytes: 4096,
        when_full: WhenFull::Reject,
        ttl_ms: None,
    },
    LaneSpec {
        name: "ring",
        max_bytes: 4096,
        when_full: WhenFull::DropOldest,
        ttl_ms: None,
    },
    LaneSpec {
        name: "ttl",
        max_bytes: 8192,
        when_full: WhenFull::Reject,
        ttl_ms: Some(10_000),
    },
    LaneSpec {
        name: "big",
        max_bytes: 65536,
        when_full: WhenFull::Reject,
        ttl_ms: None,
    },
];

/// The config under test; `compact_after` is small so drains trigger compaction.
fn config_text() -> String {
    let mut text = String::from(
        "[agent]\ndevice_id = \"dev-1\"\n\n[spool]\ncache_size = \"1MiB\"\ncompact_after = \"8KiB\"\ndefault_lane = \"big\"\n",
    );
    for lane in &LANES {
        let when_full = match lane.when_full {
            WhenFull::Reject => "reject",
            WhenFull::DropOldest => "drop_oldest",
        };
        text.push_str(&format!(
            "\n[[spool.lanes]]\nname = \"{}\"\nmax_bytes = {}\nwhen_full = \"{when_full}\"\n",
            lane.name, lane.max_bytes
        ));
        if let Some(ttl) = lane.ttl_ms {
            text.push_str(&format!("ttl = \"{ttl}ms\"\n"));
        }
    }
    text
}

fn spool_config() -> (SpoolConfig, ConsentPolicy) {
    let config = AgentConfig::parse(&config_text(), Path::new("test.toml")).unwrap();
    let policy = ConsentPolicy::new(config.consent.clone());
    (config.spool, policy)
}

fn lane_index(name: &str) -> usize {
    LANES.iter().position(|l| l.name == name).unwrap()
}

/// A small `track` event carrying a unique marker and `pad` bytes of filler.
fn make_event(lane: &str, marker: u64, pad: usize, now_ms: i64) -> Event {
    let mut e = Event::new(EventKind::Track, Source::Local, now_ms);
    e.lane = lane.into();
    e.name = Some(format!("event-{marker}").into());
    e.identities.device_id = DeviceId(DEVICE.to_owned());
    e.properties
        .insert("marker", Value::String(format!("m-{marker}").into()));
    if pad > 0 {
        e.properties
            .insert("pad", Value::String("x".repeat(pad).into()));
    }
    e
}

/// Bytes the spool stores for `event`: its postcard encoding, the lane budget unit.
fn stored_size(event: &Event) -> u64 {
    postcard::to_stdvec(event).unwrap().len() as u64
}

/// One queued event in the model: what the spool must give back, and its size.
#[derive(Debug, Clone)]
struct Stored {
    event: Event,
    size: u64,
}

/// What the spool should hold: per lane, its events oldest first.
#[derive(Debug)]
struct Model {
    lanes: Vec<VecDeque<Stored>>,
    /// Highest seq ever acknowledged (also for events since removed or dropped).
    max_seq: u64,
    accepted: u64,
    dropped_lane_full: u64,
    ttl_expired: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            lanes: LANES.iter().map(|_| VecDeque::new()).collect(),
            max_seq: 0,
            accepted: 0,
            dropped_lane_full: 0,
            ttl_expired: 0,
        }
    }

    fn bytes(&self, lane: usize) -> u64 {
        self.lanes[lane].iter().map(|s| s.size).sum()
    }

    /// Applies an append of `events` (seqs already assigned). On success returns how
    /// many old events `drop_oldest` lanes lost; when some lane has no room, returns
    /// the names of the lanes that could be blamed and leaves the model unchanged.
    fn append(&mut self, events: &[Event]) -> Result<u64, Vec<&'static str>> {
        let mut need: BTreeMap<usize, u64> = BTreeMap::new();
        for e in events {
            *need.entry(lane_index(&e.lane)).or_default() += stored_size(e);
        }
        let full: Vec<&'static str> = need
            .iter()
            .filter(|&(&lane, &bytes)| {
                let spec = &LANES[lane];
                bytes > spec.max_bytes
                    || (spec.when_full == WhenFull::Reject
                        && self.bytes(lane) + bytes > spec.max_bytes)
            })
            .map(|(&lane, _)| LANES[lane].name)
            .collect();
        if !full.is_empty() {
            return Err(full);
        }
        let mut dropped = 0;
        for (&lane, &bytes) in &need {
            let spec = &LANES[lane];
            if spec.when_full == WhenFull::DropOldest {
                while self.bytes(lane) + bytes > spec.max_bytes {
                    self.lanes[lane].pop_front().unwrap();
                    dropped += 1;
                }
            }
        }
        for e in events {
            let size = stored_size(e);
            self.lanes[lane_index(&e.lane)].push_back(Stored {
                event: e.clone(),
                size,
            });
            self.max_seq = self.max_seq.max(e.seq.0);
        }
        self.accepted += events.len() as u64;
        self.dropped_lane_full += dropped;
        Ok(dropped)
    }

    /// Drops events past their lane's TTL at `now_ms`; returns how many.
    fn sweep(&mut self, now_ms: i64) -> u64 {
        let mut expired = 0;
        for (lane, spec) in LANES.iter().enumerate() {
            let Some(ttl) = spec.ttl_ms else { continue };
            // Receive times never go backwards here, so the expired events are a prefix.
            while let Some(front) = self.lanes[lane].front() {
                if front.event.received_ms + ttl > now_ms {
                    break;
                }
                self.lanes[lane].pop_front();
                expired += 1;
            }
        }
        self.ttl_expired += expired;
        expired
    }
}

#[derive(Debug, Clone)]
struct EventSpec {
    lane: usize,
    pad: usize,
}

/// What happens to the handle right after a burst was enqueued.
#[derive(Debug, Clone, Copy)]
enum Then {
    Await,
    Crash,
    Close,
}

#[derive(Debug, Clone)]
enum Op {
    /// Append 1..20 events after the clock moved on by `advance_ms`; with
    /// `unknown_lane`, one of them names a lane that does not exist.
    Submit {
        events: Vec<EventSpec>,
        advance_ms: i64,
        unknown_lane: bool,
    },
    /// Enqueue several appends before awaiting any (the writer may commit them in one
    /// group), then, before awaiting the answers, maybe drop or close the handle: the
    /// writer finishes what it was given, and every answer must still arrive.
    Burst {
        requests: Vec<Vec<EventSpec>>,
        then: Then,
    },
    /// Read up to `max` events of a lane and remove them (as the uplink does after an
    /// ack); `foreign` adds the seq of an event queued in another lane, which must stay.
    Drain {
        lane: usize,
        max: usize,
        foreign: bool,
    },
    /// Read a page starting after the `skip`-th queued event.
    Peek {
        lane: usize,
        skip: usize,
        max: usize,
    },
    /// Let `advance_ms` pass, then sweep expired events. With `to_expiry`, move the
    /// clock instead to the instant the oldest event of a TTL lane expires.
    Sweep { advance_ms: i64, to_expiry: bool },
    /// Drop the handle without `close()` and reopen the file.
    Crash,
    /// Copy the file while it is open, drop the handle, and open the copy.
    Kill,
    /// `close()`, then reopen.
    Close,
}

fn events_strategy() -> impl Strategy<Value = Vec<EventSpec>> {
    (
        0..LANES.len(),
        prop::collection::vec(
            (
                prop::option::weighted(0.15, 0..LANES.len()),
                // Now and then an event big enough to overflow a lane on its own.
                prop_oneof![30 => 0usize..160, 1 => 1_000usize..3_000],
            ),
            1..20,
        ),
    )
        .prop_map(|(lane, events)| {
            events
                .into_iter()
                .map(|(other, pad)| EventSpec {
                    lane: other.unwrap_or(lane),
                    pad,
                })
                .collect()
        })
}

/// A clock advance of up to `max` half-seconds. Coarse steps make events land exactly
/// on their TTL now and then, so the boundary is exercised.
fn clock_steps(max: i64) -> impl Strategy<Value = i64> {
    (0..=max).prop_map(|n| n * 500)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (events_strategy(), clock_steps(6), prop::bool::weighted(0.05)).prop_map(
            |(events, advance_ms, unknown_lane)| Op::Submit {
                events,
                advance_ms,
                unknown_lane,
            }
        ),
        2 => (
            prop::collection::vec(events_strategy(), 2..6),
            prop_oneof![4 => Just(Then::Await), 1 => Just(Then::Crash), 1 => Just(Then::Close)],
        )
            .prop_map(|(requests, then)| Op::Burst { requests, then }),
        5 => (0..LANES.len(), 1usize..40, prop::bool::weighted(0.3))
            .prop_map(|(lane, max, foreign)| Op::Drain { lane, max, foreign }),
        1 => (0..LANES.len(), 0usize..40, 1usize..10)
            .prop_map(|(lane, skip, max)| Op::Peek { lane, skip, max }),
        2 => (clock_steps(40), any::<bool>())
            .prop_map(|(advance_ms, to_expiry)| Op::Sweep { advance_ms, to_expiry }),
        1 => Just(Op::Crash),
        1 => Just(Op::Kill),
        1 => Just(Op::Close),
    ]
}

/// A real spool, its model, and the test's clock.
struct Harness {
    dir: tempfile::TempDir,
    path: PathBuf,
    files: u32,
    config: SpoolConfig,
    policy: ConsentPolicy,
    spool: Option<Spool>,
    model: Model,
    now_ms: i64,
    next_marker: u64,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool-0.redb");
        let (config, policy) = spool_config();
        let mut h = Harness {
            dir,
            path,
            files: 0,
            config,
            policy,
            spool: None,
            model: Model::new(),
            now_ms: START_MS,
            next_marker: 0,
        };
        h.open();
        h
    }

    fn open(&mut self) {
        assert!(self.spool.is_none());
        let (spool, recovered) =
            Spool::open(&self.path, &self.config, self.policy.clone(), DEVICE).unwrap();
        assert_eq!(recovered.device_id.0, DEVICE);
        self.spool = Some(spool);
    }

    fn spool(&self) -> &Spool {
        self.spool.as_ref().unwrap()
    }

    fn build_events(&mut self, specs: &[EventSpec]) -> Vec<Event> {
        specs
            .iter()
            .map(|s| {
                self.next_marker += 1;
                make_event(LANES[s.lane].name, self.next_marker, s.pad, self.now_ms)
            })
            .collect()
    }

    /// The seq the spool will assign next; it must not reuse one.
    fn next_seq(&self) -> u64 {
        let next = self.spool().stats().next_seq;
        assert!(
            next > self.model.max_seq,
            "next_seq {next} would reuse seq {}",
            self.model.max_seq
        );
        next
    }

    /// The events as the spool should store them if it accepts them with `next`.
    fn with_seqs(events: &[Event], next: u64) -> Vec<Event> {
        let mut expected = events.to_vec();
        for (i, e) in expected.iter_mut().enumerate() {
            e.seq = Seq(next + i as u64);
        }
        expected
    }

    fn check_append(&mut self, expected: &[Event], result: Result<AppendOutcome, SpoolError>) {
        match (result, self.model.append(expected)) {
            (Ok(outcome), Ok(dropped)) => {
                assert_eq!(outcome.first_seq, expected[0].seq);
                assert_eq!(outcome.count, expected.len());
                assert_eq!(outcome.dropped_oldest, dropped);
            }
            (Err(SpoolError::LaneFull { lane, max_bytes }), Err(full)) => {
                assert!(
                    full.contains(&lane.as_str()),
                    "{lane} blamed, expected one of {full:?}"
                );
                assert_eq!(max_bytes, LANES[lane_index(&lane)].max_bytes);
            }
            (result, model) => {
                panic!("spool answered {result:?}, the model expected {model:?}")
            }
        }
    }

    async fn submit(&mut self, specs: &[EventSpec], unknown_lane: bool) {
        let mut events = self.build_events(specs);
        if unknown_lane {
            let last = events.len() - 1;
            events[last].lane = "nope".into();
            let result = self
                .spool()
                .append(AppendRequest {
                    events,
                    ..AppendRequest::default()
                })
                .await;
            assert_eq!(result, Err(SpoolError::UnknownLane("nope".to_owned())));
            return;
        }
        let expected = Self::with_seqs(&events, self.next_seq());
        let result = self
            .spool()
            .append(AppendRequest {
                events,
                ..AppendRequest::default()
            })
            .await;
        self.check_append(&expected, result);
    }

    async fn burst(&mut self, requests: &[Vec<EventSpec>], then: Then) {
        let mut next = self.next_seq();
        let mut answers = Vec::new();
        for specs in requests {
            let events = self.build_events(specs);
            let answer = self
                .spool()
                .enqueue_append(AppendRequest {
                    events: events.clone(),
                    ..AppendRequest::default()
                })
                .await
                .unwrap();
            answers.push((events, answer));
        }
        match then {
            Then::Await => {}
            Then::Crash => drop(self.spool.take()),
            Then::Close => {
                let spool = self.spool.take().unwrap();
                spool.close().await;
                drop(spool);
            }
        }
        for (events, answer) in answers {
            let result = answer.await.expect("every enqueued append is answered");
            let expected = Self::with_seqs(&events, next);
            if result.is_ok() {
                next += events.len() as u64;
            }
            self.check_append(&expected, result);
        }
        if self.spool.is_none() {
            self.open();
        }
    }

    async fn drain(&mut self, lane: usize, max: usize, foreign: bool) {
        let name = LANES[lane].name;
        let page = self.spool().read(name, Seq(0), max).unwrap();
        let expected: Vec<Event> = self.model.lanes[lane]
            .iter()
            .take(max)
            .map(|s| s.event.clone())
            .collect();
        assert_eq!(page, expected, "first {max} events of lane {name}");
        let mut seqs: Vec<Seq> = page.iter().map(|e| e.seq).collect();
        if foreign {
            let other = (0..LANES.len())
                .filter(|&l| l != lane)
                .find_map(|l| self.model.lanes[l].back());
            if let Some(other) = other {
                seqs.push(other.event.seq);
            }
        }
        let removed = self.spool().remove(name, seqs).await.unwrap();
        assert_eq!(removed, page.len());
        self.model.lanes[lane].drain(..page.len());
    }

    fn peek(&self, lane: usize, skip: usize, max: usize) {
        let name = LANES[lane].name;
        let queued = &self.model.lanes[lane];
        let after = queued.get(skip).map_or(Seq(u64::MAX), |s| s.event.seq);
        let page = self.spool().read(name, after, max).unwrap();
        let expected: Vec<Event> = queued
            .iter()
            .skip(skip + 1)
            .take(max)
            .map(|s| s.event.clone())
            .collect();
        assert_eq!(page, expected, "lane {name}: {max} events after {after:?}");
    }

    async fn sweep(&mut self, advance_ms: i64, to_expiry: bool) {
        let expiry = LANES
            .iter()
            .zip(&self.model.lanes)
            .find_map(|(spec, queued)| Some(queued.front()?.event.received_ms + spec.ttl_ms?));
        match expiry {
            Some(at) if to_expiry => self.now_ms = self.now_ms.max(at),
            _ => self.now_ms += advance_ms,
        }
        let expired = self.spool().sweep(self.now_ms).await.unwrap();
        assert_eq!(expired, self.model.sweep(self.now_ms));
    }

    fn crash(&mut self) {
        drop(self.spool.take());
        self.open();
    }

    async fn kill(&mut self) {
        // An empty remove goes through the writer, so when it is answered the writer
        // is idle (no compaction running) and the copy is a state a kill could leave.
        self.spool()
            .remove(LANES[0].name, Vec::new())
            .await
            .unwrap();
        self.files += 1;
        let copy = self.dir.path().join(format!("spool-{}.redb", self.files));
        std::fs::copy(&self.path, &copy).unwrap();
        drop(self.spool.take());
        self.path = copy;
        self.open();
    }

    async fn close(&mut self) {
        let spool = self.spool.take().unwrap();
        spool.close().await;
        let late = spool
            .append(AppendRequest {
                events: vec![make_event(LANES[3].name, 0, 0, self.now_ms)],
                ..AppendRequest::default()
            })
            .await;
        assert_eq!(late, Err(SpoolError::Closed));
        drop(spool);
        self.open();
    }

    async fn apply(&mut self, op: &Op) {
        match op {
            Op::Submit {
                events,
                advance_ms,
                unknown_lane,
            } => {
                self.now_ms += advance_ms;
                self.submit(events, *unknown_lane).await;
            }
            Op::Burst { requests, then } => self.burst(requests, *then).await,
            Op::Drain { lane, max, foreign } => self.drain(*lane, *max, *foreign).await,
            Op::Peek { lane, skip, max } => self.peek(*lane, *skip, *max),
            Op::Sweep {
                advance_ms,
                to_expiry,
            } => self.sweep(*advance_ms, *to_expiry).await,
            Op::Crash => self.crash(),
            Op::Kill => self.kill().await,
            Op::Close => self.close().await,
        }
    }

    /// The spool holds exactly the model's events and its counters agree.
    fn verify(&self) {
        let spool = self.spool();
        assert_eq!(spool.check().unwrap(), Vec::<String>::new());
        let stats = spool.stats();
        for (lane, spec) in LANES.iter().enumerate() {
            let stored = spool.read(spec.name, Seq(0), usize::MAX).unwrap();
            let expected: Vec<Event> = self.model.lanes[lane]
                .iter()
                .map(|s| s.event.clone())
                .collect();
            assert_eq!(stored, expected, "lane {}", spec.name);
            assert!(
                stored.windows(2).all(|w| w[0].seq < w[1].seq),
                "lane {}: seqs not increasing",
                spec.name
            );
            let level = stats.lanes.get(spec.name).copied().unwrap_or_default();
            assert_eq!(
                level.events,
                expected.len() as u64,
                "lane {} events",
                spec.name
            );
            assert_eq!(
                level.bytes,
                self.model.bytes(lane),
                "lane {} bytes",
                spec.name
            );
        }
        for status in spool.lanes() {
            let lane = lane_index(&status.name);
            let oldest = self.model.lanes[lane].front().map(|s| s.event.received_ms);
            assert_eq!(status.oldest_received_ms, oldest, "lane {}", status.name);
        }
        assert!(stats.next_seq > self.model.max_seq);
        assert_eq!(stats.accepted, self.model.accepted);
        assert_eq!(stats.drops.lane_full, self.model.dropped_lane_full);
        assert_eq!(stats.drops.ttl_expired, self.model.ttl_expired);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn spool_matches_model_across_crashes_and_drains(
        ops in prop::collection::vec(op_strategy(), 1..40)
    ) {
        runtime().block_on(async {
            let mut h = Harness::new();
            h.verify();
            for op in &ops {
                h.apply(op).await;
                h.verify();
            }
            h.crash();
            h.verify();
        });
    }
}

#[test]
fn acked_events_survive_drop_without_close() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let (config, policy) = spool_config();
        let open = || {
            Spool::open(&path, &config, policy.clone(), DEVICE)
                .unwrap()
                .0
        };

        let spool = open();
        let events: Vec<Event> = (0..5).map(|i| make_event("big", i, 10, START_MS)).collect();
        let outcome = spool
            .append(AppendRequest {
                events: events.clone(),
                ..AppendRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(outcome.count, 5);
        let removed = spool.remove("big", vec![outcome.first_seq]).await.unwrap();
        assert_eq!(removed, 1);
        drop(spool);

        let spool = open();
        let stored = spool.read("big", Seq(0), usize::MAX).unwrap();
        let expected: Vec<Event> = events
            .into_iter()
            .enumerate()
            .skip(1)
            .map(|(i, mut e)| {
                e.seq = Seq(outcome.first_seq.0 + i as u64);
                e
            })
            .collect();
        assert_eq!(stored, expected);
        assert_eq!(spool.stats().lanes["big"].events, 4);
        assert_eq!(spool.check().unwrap(), Vec::<String>::new());

        let next = spool
            .append(AppendRequest {
                events: vec![make_event("big", 99, 0, START_MS)],
                ..AppendRequest::default()
            })
            .await
            .unwrap();
        assert!(
            next.first_seq > expected.last().unwrap().seq,
            "a seq was reused"
        );
    });
}

/// An undecodable record at the front of a TTL lane can never be delivered; the sweep
/// removes it (counted as `invalid`) instead of failing forever, and the spool keeps
/// working.
#[test]
fn undecodable_record_is_swept_out_and_counted() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let (config, policy) = spool_config();
        drop(Spool::open(&path, &config, policy.clone(), DEVICE).unwrap());
        {
            // A truncated record at the front of the TTL lane (layout: store.rs).
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let lane: redb::TableDefinition<u64, &[u8]> =
                    redb::TableDefinition::new("lane:ttl");
                let mut table = txn.open_table(lane).unwrap();
                table.insert(1u64, &[0xff_u8, 0xff, 0xff][..]).unwrap();
            }
            txn.commit().unwrap();
        }

        let (spool, _) = Spool::open(&path, &config, policy, DEVICE).unwrap();
        let swept = spool.sweep(START_MS + 60_000).await;
        assert_eq!(swept, Ok(1), "sweep answered {swept:?}");
        assert_eq!(spool.stats().drops.invalid, 1);
        let outcome = spool
            .append(AppendRequest {
                events: vec![make_event("big", 1, 0, START_MS)],
                ..AppendRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(outcome.count, 1);
    });
}
