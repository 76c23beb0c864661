//! The durable spool: events wait here, in redb, until the gateway acknowledges them.
//!
//! One writer thread owns all writes ([`writer`]); callers queue commands on a
//! bounded channel and await the commit. Reads (status, export, uplink) use short
//! read transactions on any thread. Dropping a [`Spool`] without [`Spool::close`]
//! is a crash as far as the file is concerned: nothing acknowledged is lost.

mod audiences;
mod stats;
mod store;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use redb::ReadableTable;
use tokio::sync::{mpsc, oneshot};

pub use stats::{Drops, Erasures, LaneLevel, SpoolStats};
pub use store::Recovered;

use crate::audiences::{
    check, Applied, AudienceApplyError, AudienceLimits, AudienceRecord, AudienceSummary,
};
use crate::config::{LaneConfig, SpoolConfig};
use crate::consent::{ConsentChange, ConsentPolicy};
use crate::enrich::DeviceState;
use crate::model::{DeviceId, Event, Seq};
use crate::wire::AudienceUpdate;
use store::Store;
use writer::Command;

/// Commands that may wait for the writer. Beyond this, callers wait to enqueue.
pub const WRITE_QUEUE_DEPTH: usize = 1024;

/// Why a spool operation failed. Cloneable: one failed commit answers many waiters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpoolError {
    /// A `reject` lane has no room for the request's events (HTTP 429).
    #[error("lane `{lane}` is full (budget {max_bytes} bytes)")]
    LaneFull { lane: String, max_bytes: u64 },
    /// The filesystem is out of space; nothing was committed (HTTP 507).
    #[error("disk full: {0}")]
    DiskFull(String),
    /// Any other I/O or redb failure; nothing was committed.
    #[error("storage error: {0}")]
    Storage(String),
    /// The file is closed for a reopen after a failure; retry shortly.
    #[error("spool unavailable: {0}")]
    Unavailable(String),
    /// The spool was closed (shutdown).
    #[error("the spool is closed")]
    Closed,
    /// An event names a lane that is not configured.
    #[error("unknown lane `{0}`")]
    UnknownLane(String),
    /// A stored record does not decode.
    #[error("corrupt spool record: {0}")]
    Corrupt(String),
}

impl SpoolError {
    /// Errors that concern one request only; the rest of its group still commits.
    fn is_request_level(&self) -> bool {
        matches!(
            self,
            SpoolError::LaneFull { .. } | SpoolError::UnknownLane(_)
        )
    }

    fn from_redb(e: redb::Error) -> Self {
        let io = match &e {
            redb::Error::Io(io) => Some(io),
            redb::Error::DatabaseAlreadyOpen => {
                return SpoolError::Unavailable(
                    "the spool file is in use by another process (is the agent running?)".into(),
                )
            }
            _ => None,
        };
        if let Some(io) = io {
            if io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::FileTooLarge
                || io.kind() == std::io::ErrorKind::QuotaExceeded
            {
                return SpoolError::DiskFull(io.to_string());
            }
        }
        SpoolError::Storage(e.to_string())
    }
}

/// `.spool()` turns any redb error into a [`SpoolError`].
pub(crate) trait RedbResultExt<T> {
    fn spool(self) -> Result<T, SpoolError>;
}

impl<T, E: Into<redb::Error>> RedbResultExt<T> for Result<T, E> {
    fn spool(self) -> Result<T, SpoolError> {
        self.map_err(|e| SpoolError::from_redb(e.into()))
    }
}

/// Everything one request wants committed, atomically.
#[derive(Debug, Default)]
pub struct AppendRequest {
    /// Events to queue, each with its `lane` set.
    pub events: Vec<Event>,
    /// Consent changes to persist (and purge for).
    pub consent: Vec<ConsentChange>,
    /// Device states to persist.
    pub devices: Vec<(DeviceId, DeviceState)>,
    /// Events refused for consent, to count.
    pub denied: u64,
}

/// One event encoded off the writer thread, with `Seq(0)` at `seq_at` (one byte).
#[derive(Debug)]
pub(crate) struct Encoded {
    pub lane: String,
    pub device: String,
    pub bytes: Vec<u8>,
    pub seq_at: usize,
}

/// An [`AppendRequest`] with its events encoded by the caller's thread.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub encoded: Vec<Encoded>,
    pub invalid: u64,
    pub consent: Vec<ConsentChange>,
    pub devices: Vec<(DeviceId, DeviceState)>,
    pub denied: u64,
}

fn prepare(req: AppendRequest) -> Prepared {
    let mut encoded = Vec::with_capacity(req.events.len());
    let mut invalid = 0;
    for mut event in req.events {
        event.seq = Seq(0);
        let seq_at = postcard::to_stdvec(&event.id).map(|v| v.len()).unwrap_or(0);
        match postcard::to_stdvec(&event) {
            Ok(bytes) => encoded.push(Encoded {
                lane: std::mem::take(&mut event.lane).into(),
                device: std::mem::take(&mut event.identities.device_id.0),
                bytes,
                seq_at,
            }),
            Err(_) => invalid += 1,
        }
    }
    Prepared {
        encoded,
        invalid,
        consent: req.consent,
        devices: req.devices,
        denied: req.denied,
    }
}

/// What an append did.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendOutcome {
    /// Seq of the first stored event; the rest follow consecutively.
    pub first_seq: Seq,
    pub count: usize,
    /// Older events dropped from `drop_oldest` lanes to make room.
    pub dropped_oldest: u64,
}

/// What erasing a user removed from the spool file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPurge {
    /// Queued events removed.
    pub events: u64,
    /// Whether the user had audience membership stored.
    pub audiences: bool,
}

/// Level of one lane, for status.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneStatus {
    pub name: String,
    pub level: LaneLevel,
    pub max_bytes: u64,
    /// Agent receive time of the oldest queued event.
    pub oldest_received_ms: Option<i64>,
}

pub(crate) struct Shared {
    store: Store,
    lanes: Vec<LaneConfig>,
    policy: ConsentPolicy,
    compact_after: u64,
    stats: Mutex<SpoolStats>,
    /// Written by the writer only, after the commit that holds it.
    erasures: Mutex<Erasures>,
    /// Written by the writer only, after the commit that holds it.
    audiences: Mutex<AudienceSummary>,
    audience_limits: AudienceLimits,
    /// `next_seq` after the last commit: the uplink waits on it for new events.
    committed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lane(&self, name: &str) -> Option<&LaneConfig> {
        self.lanes.iter().find(|l| l.name == name)
    }
}

/// Handle to the spool. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Spool {
    /// Opens (creating or recovering) the spool file at `path`.
    pub fn open(
        path: &Path,
        config: &SpoolConfig,
        policy: ConsentPolicy,
        configured_device_id: &str,
    ) -> Result<(Spool, Recovered), SpoolError> {
        let cache = usize::try_from(config.cache_size.0).unwrap_or(usize::MAX);
        let lanes: Vec<String> = config.lanes.iter().map(|l| l.name.clone()).collect();
        let store = Store::open(path, cache, lanes)?;
        let recovered = store.recover(configured_device_id)?;
        let stats = store.load_stats()?;
        let erasures = store.load_erasures()?;
        let audience_summary = store.with_db(audiences::load_summary)?;
        let shared = Arc::new(Shared {
            store,
            lanes: config.lanes.clone(),
            policy,
            compact_after: config.compact_after.0,
            committed: tokio::sync::watch::channel(stats.next_seq).0,
            stats: Mutex::new(stats.clone()),
            erasures: Mutex::new(erasures),
            audiences: Mutex::new(audience_summary),
            audience_limits: AudienceLimits::default(),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer::run(writer_shared, rx, stats))
            .map_err(|e| SpoolError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Spool {
                shared,
                tx,
                writer: Mutex::new(Some(writer)),
            },
            recovered,
        ))
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Command,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Commits `req` durably; returns once it is on disk.
    pub async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, SpoolError> {
        let req = prepare(req);
        self.call(|reply| Command::Append(req, reply)).await
    }

    /// Like [`Spool::append`], but only enqueues; the receiver yields the result.
    /// Lets a caller fix its place in the commit order before waiting.
    pub async fn enqueue_append(
        &self,
        req: AppendRequest,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome, SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        let req = prepare(req);
        self.tx
            .send(Command::Append(req, reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        Ok(rx)
    }

    /// Removes delivered events; returns how many were still there.
    pub async fn remove(&self, lane: &str, seqs: Vec<Seq>) -> Result<usize, SpoolError> {
        let lane = lane.to_owned();
        self.call(|reply| Command::Remove {
            lane,
            seqs,
            invalid: false,
            reply,
        })
        .await
    }

    /// Removes events the gateway refused for good, counting them as `invalid` drops.
    pub async fn remove_rejected(&self, lane: &str, seqs: Vec<Seq>) -> Result<usize, SpoolError> {
        let lane = lane.to_owned();
        self.call(|reply| Command::Remove {
            lane,
            seqs,
            invalid: true,
            reply,
        })
        .await
    }

    /// Erases `user_id`'s data in one commit: every queued event whose user id or
    /// anonymous id is `user_id`, its consent record and its audience membership;
    /// `devices` are device states to persist in the same commit (the intake's, with
    /// the user forgotten). Doing it again removes nothing more.
    pub async fn purge_user(
        &self,
        user_id: &str,
        devices: Vec<(DeviceId, DeviceState)>,
    ) -> Result<UserPurge, SpoolError> {
        let user_id = user_id.to_owned();
        self.call(|reply| Command::PurgeUser {
            user_id,
            devices,
            reply,
        })
        .await
    }

    /// Like [`Spool::purge_user`], but only enqueues (see [`Spool::enqueue_append`]).
    pub async fn enqueue_purge_user(
        &self,
        user_id: &str,
        devices: Vec<(DeviceId, DeviceState)>,
    ) -> Result<oneshot::Receiver<Result<UserPurge, SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::PurgeUser {
                user_id: user_id.to_owned(),
                devices,
                reply,
            })
            .await
            .map_err(|_| SpoolError::Closed)?;
        Ok(rx)
    }

    /// Replaces `update.user_id`'s audience membership in one durable commit, unless
    /// the file holds that version or a newer one for the user (then nothing changes:
    /// the gateway resends). Past the user cap the least recently updated users are
    /// forgotten in the same commit. An update over the caps is refused before
    /// anything is written. Returns once it is on disk. This is what the uplink does
    /// with every [`Downlink::Audiences`](crate::wire::Downlink::Audiences).
    pub async fn apply_audiences(
        &self,
        update: AudienceUpdate,
        now_ms: i64,
    ) -> Result<Applied, AudienceApplyError> {
        let update = check(update, &self.shared.audience_limits)?;
        self.call(|reply| Command::Audiences {
            update,
            now_ms,
            reply,
        })
        .await
        .map_err(AudienceApplyError::Storage)
    }

    /// The audience membership held for `user_id` (a user or anonymous id), `None`
    /// when there is none. Reads the file; needs no connection.
    pub fn audiences(&self, user_id: &str) -> Result<Option<AudienceRecord>, SpoolError> {
        self.shared.store.with_db(|db| audiences::get(db, user_id))
    }

    /// Users with membership and the newest applied version, as of the last commit.
    pub fn audience_summary(&self) -> AudienceSummary {
        *self
            .shared
            .audiences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What purge requests erased, as of the last commit.
    pub fn erasures(&self) -> Erasures {
        *self
            .shared
            .erasures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Lowest queued seq of `lane` (everything below was delivered or dropped).
    pub fn first_seq(&self, lane: &str) -> Result<Option<Seq>, SpoolError> {
        self.shared.store.first_seq(lane)
    }

    /// Watches `next_seq` as of the last commit: it changes when events are added.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    /// Configured lane names, in config order.
    pub fn lane_names(&self) -> Vec<String> {
        self.shared.lanes.iter().map(|l| l.name.clone()).collect()
    }

    /// Drops events past their lane's TTL; returns how many.
    pub async fn sweep(&self, now_ms: i64) -> Result<u64, SpoolError> {
        self.call(|reply| Command::Sweep { now_ms, reply }).await
    }

    /// Up to `max` queued events of `lane` after `after`, oldest first.
    pub fn read(&self, lane: &str, after: Seq, max: usize) -> Result<Vec<Event>, SpoolError> {
        self.shared.store.read(lane, after, max)
    }

    /// Counters as of the last commit.
    pub fn stats(&self) -> SpoolStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Per-lane levels with the age of their oldest event.
    pub fn lanes(&self) -> Vec<LaneStatus> {
        let stats = self.stats();
        self.shared
            .lanes
            .iter()
            .map(|l| LaneStatus {
                name: l.name.clone(),
                level: stats.lanes.get(&l.name).copied().unwrap_or_default(),
                max_bytes: l.max_bytes.0,
                oldest_received_ms: self.shared.store.oldest_received(&l.name).ok().flatten(),
            })
            .collect()
    }

    /// Events accepted per device (for fleet status), at most `max` devices.
    pub fn device_counts(&self, max: usize) -> Result<Vec<(String, u64)>, SpoolError> {
        self.shared.store.device_counts(max)
    }

    /// Whether the file is open (false briefly after a failed commit).
    pub fn is_healthy(&self) -> bool {
        self.shared.store.is_open()
    }

    /// Calls `f` with every queued event, lane by lane, each lane in seq order.
    pub fn for_each_event(
        &self,
        mut f: impl FnMut(&Event) -> Result<(), SpoolError>,
    ) -> Result<u64, SpoolError> {
        let mut n = 0;
        for lane in &self.shared.lanes {
            let mut after = Seq(0);
            loop {
                let page = self.read(&lane.name, after, 1024)?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for e in &page {
                    f(e)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Checks the file (redb's own integrity check) and the invariants of the
    /// layout: every event decodes, sits in its lane under its own seq, and the
    /// counters match the tables. Returns a description of the first problem found.
    pub fn check(&self) -> Result<Vec<String>, SpoolError> {
        let mut problems = Vec::new();
        let intact = self.shared.store.with_db_mut(|db| {
            db.check_integrity()
                .map_err(|e| SpoolError::Storage(e.to_string()))
        })?;
        if !intact {
            problems.push("redb integrity check failed (the file was repaired)".to_owned());
        }
        let stats = self.stats();
        for lane in &self.shared.lanes {
            let (mut events, mut bytes) = (0u64, 0u64);
            let name = store::lane_table(&lane.name);
            self.shared.store.with_db(|db| {
                let txn = redb::ReadableDatabase::begin_read(db).spool()?;
                let table = txn.open_table(store::lane_def(&name)).spool()?;
                for row in table.iter().spool()? {
                    let (k, v) = row.spool()?;
                    match store::decode_event(k.value(), v.value()) {
                        Ok(e) if e.seq.0 != k.value() => problems.push(format!(
                            "lane `{}`: event stored under seq {} says seq {}",
                            lane.name,
                            k.value(),
                            e.seq.0
                        )),
                        Ok(e) if e.lane != lane.name => problems.push(format!(
                            "lane `{}`: event seq {} belongs to lane `{}`",
                            lane.name,
                            k.value(),
                            e.lane
                        )),
                        Ok(_) if k.value() >= stats.next_seq => problems.push(format!(
                            "lane `{}`: seq {} is not below next_seq {}",
                            lane.name,
                            k.value(),
                            stats.next_seq
                        )),
                        Ok(_) => {}
                        Err(e) => problems.push(e.to_string()),
                    }
                    events += 1;
                    bytes += v.value().len() as u64;
                }
                Ok(())
            })?;
            let level = stats.lanes.get(&lane.name).copied().unwrap_or_default();
            if level.events != events || level.bytes != bytes {
                problems.push(format!(
                    "lane `{}`: counters say {} events / {} bytes, table holds {events} / {bytes}",
                    lane.name, level.events, level.bytes
                ));
            }
        }
        Ok(problems)
    }

    /// Finishes queued writes and stops the writer. Later calls fail with `Closed`.
    pub async fn close(&self) {
        // If the queue is closed already, the writer is gone too.
        let _ = self.tx.send(Command::Stop).await;
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

impl Drop for Spool {
    /// Lets the writer finish what it was given and release the file, so the same
    /// path can be opened again right away (tests reopen after simulated crashes).
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}
