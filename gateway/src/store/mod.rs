//! The gateway's durable state (redb): the inbox of received events, per-lane
//! admission state, per-device records, and destination cursors.
//!
//! One writer thread applies commands in groups, one `Durability::Immediate` commit
//! per group; nothing is answered before its commit. Reads use short read
//! transactions. This is the single-site backend; the interface (commands and
//! reads) is what a PostgreSQL backend will implement for fleets.
//!
//! | table          | key                    | value                          |
//! |----------------|------------------------|--------------------------------|
//! | `inbox`        | `u64` inbox seq        | postcard [`InboxRecord`]       |
//! | `dedup`        | `"<device>\0<lane>"`   | postcard [`LaneDedup`]         |
//! | `devices`      | device id              | postcard [`DeviceRecord`]      |
//! | `cursors`      | destination name       | postcard bytes of its state    |
//! | `meta`         | `"next_inbox"`         | `u64`                          |
//! | `source_dedup` | `u128` event id        | `i64` received ms              |
//! | `source_age`   | `(i64 ms, u128 id)`    | `()`: `source_dedup` by age    |
//!
//! Server-side sources ([`Store::ingest`]) have no lanes or seqs: their retries are
//! recognised by event id (derived from the sender's message id) for
//! [`SOURCE_DEDUP_WINDOW`].

mod dedup;
mod redb_file;
mod tail;

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use edge_agent::model::{DeviceId, Event, Seq};
use edge_agent::spool::Drops;
use edge_agent::wire::{RejectReason, Rejected, UplinkBatch};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::error;

pub use dedup::LaneDedup;
#[cfg(test)]
pub(crate) use redb_file::test_disk;
pub use redb_file::RedbFile;

pub(crate) const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const CURSORS: TableDefinition<&str, &[u8]> = TableDefinition::new("cursors");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_INBOX: &str = "next_inbox";
const SOURCE_DEDUP: TableDefinition<u128, i64> = TableDefinition::new("source_dedup");
const SOURCE_AGE: TableDefinition<(i64, u128), ()> = TableDefinition::new("source_age");

/// How long a server-side event id is remembered: a retry within it is a duplicate.
pub const SOURCE_DEDUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Most expired server-side dedup marks removed by one ingest.
const MAX_SOURCE_PRUNE: usize = 1_000;

/// Commands that may wait for the writer.
pub const STORE_QUEUE_DEPTH: usize = 1024;
/// Most commands folded into one commit.
const MAX_GROUP: usize = 256;
/// Most inbox entries pruned by one commit.
const MAX_PRUNE: u64 = 10_000;

/// Why a store operation failed. Cloneable: one failed commit answers many waiters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The filesystem is full; nothing was committed.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// Any other I/O or redb failure; nothing was committed.
    #[error("storage error: {0}")]
    Storage(String),
    /// The file is being reopened after an I/O failure; nothing was done, try again.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// The store was closed (shutdown).
    #[error("the store is closed")]
    Closed,
    /// A stored record does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn redb(e: impl Into<redb::Error>) -> Self {
        let e: redb::Error = e.into();
        if let redb::Error::Io(io) = &e {
            if io.kind() == std::io::ErrorKind::StorageFull {
                return StoreError::DiskFull(io.to_string());
            }
        }
        StoreError::Storage(e.to_string())
    }
}

/// `.st()`: a redb result as a [`StoreError`] (disk full recognised).
pub(crate) trait R<T> {
    fn st(self) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> R<T> for Result<T, E> {
    fn st(self) -> Result<T, StoreError> {
        self.map_err(StoreError::redb)
    }
}

/// One received event as kept in the inbox. Field order is the stored encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxRecord {
    /// The agent that sent it (its certificate identity).
    pub sender: DeviceId,
    /// Gateway time at receipt.
    pub received_ms: i64,
    /// Device time corrected for the agent's clock skew:
    /// `received - (sent_at - timestamp)`.
    pub corrected_timestamp_ms: i64,
    pub event: Event,
}

/// What the gateway knows about one device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub last_seen_ms: i64,
    /// Events stored (new).
    pub events: u64,
    /// Events received again and ignored.
    pub duplicates: u64,
    /// Events refused (invalid).
    pub rejected: u64,
    /// Frames refused before decoding reached the store (bad frame, wrong device).
    pub frames_rejected: u64,
    /// The agent's own loss counters, as last reported.
    pub drops: Drops,
    /// Gateway receive time minus the agent's `sent_at` in its last batch.
    pub clock_skew_ms: i64,
    /// Per lane: the highest seq stored (high-water mark) and the agent's floor.
    pub lanes: Vec<LaneMark>,
}

/// Progress of one lane of one device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LaneMark {
    pub lane: String,
    /// Highest seq stored from this lane.
    pub high_water: u64,
    /// The agent's floor: every lower seq was acknowledged or dropped.
    pub floor: u64,
}

/// Outcome of receiving one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// Every seq now durable at the gateway (new and duplicates).
    pub acked: Vec<Seq>,
    pub rejected: Vec<Rejected>,
    pub stored: usize,
    pub duplicates: usize,
    /// For each newly stored event: when its agent accepted it, in gateway time
    /// (`event.received_ms` plus the batch's clock skew, which includes the one-way
    /// transit). Feeds the end-to-end latency histogram.
    pub accepted_ms: Vec<i64>,
}

/// Outcome of [`Store::ingest`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IngestReceipt {
    /// Events newly stored.
    pub stored: usize,
    /// Events whose id was already stored within [`SOURCE_DEDUP_WINDOW`].
    pub duplicates: usize,
}

enum Command {
    /// Events from a server-side source, deduplicated by event id.
    Ingest {
        sender: DeviceId,
        events: Vec<Event>,
        received_ms: i64,
        reply: oneshot::Sender<Result<IngestReceipt, StoreError>>,
    },
    Receive {
        sender: DeviceId,
        batch: UplinkBatch,
        /// The events' bytes as the agent encoded them, when the caller has them:
        /// (message body, one span per event).
        sent: Option<(Vec<u8>, Vec<std::ops::Range<usize>>)>,
        received_ms: i64,
        reply: oneshot::Sender<Result<Receipt, StoreError>>,
    },
    FrameRejected {
        device: DeviceId,
    },
    SaveCursor {
        name: String,
        state: Vec<u8>,
        /// Inbox entries at or below this are no longer needed by this destination.
        done_through: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A write by another module ([`Store::apply`]) in the next group commit.
    Apply {
        write: ApplyFn,
        reply: oneshot::Sender<Result<Box<dyn Any + Send>, StoreError>>,
    },
    Stop,
}

type ApplyFn = Box<dyn FnOnce(&WriteTransaction) -> Result<Box<dyn Any + Send>, StoreError> + Send>;

struct Shared {
    db: RedbFile,
    /// Inbox seq of the newest committed record, for destinations to wait on.
    head: watch::Sender<u64>,
    /// Per destination: inbox seqs it no longer needs.
    done: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The newest committed records, decoded (see `tail`).
    tail: Mutex<tail::InboxTail>,
}

/// Handle to the store.
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating or recovering) the store at `path`.
    pub fn open(
        path: &Path,
        cache_size: usize,
        destinations: &[String],
    ) -> Result<Store, StoreError> {
        let db = open_file(path, cache_size)?;
        let head = {
            let r = db.begin_read().st()?;
            let meta = r.open_table(META).st()?;
            meta.get(NEXT_INBOX)
                .st()?
                .map(|v| v.value())
                .unwrap_or(1)
                .saturating_sub(1)
        };
        let db = RedbFile::new(path, db, move |p| open_file(p, cache_size));
        let done = destinations.iter().map(|d| (d.clone(), 0)).collect();
        let shared = Arc::new(Shared {
            db,
            head: watch::channel(head).0,
            done: Mutex::new(done),
            tail: Mutex::new(tail::InboxTail::new(tail::INBOX_TAIL_EVENTS)),
        });
        let (tx, rx) = mpsc::channel(STORE_QUEUE_DEPTH);
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(writer_shared, rx))
            .map_err(|e| StoreError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Store {
            shared,
            tx,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Stores a batch's new events and its admission state in one commit; returns
    /// what to acknowledge. The caller has verified the sender owns the batch.
    pub async fn receive(
        &self,
        sender: DeviceId,
        batch: UplinkBatch,
        received_ms: i64,
    ) -> Result<Receipt, StoreError> {
        self.receive_command(sender, batch, None, received_ms).await
    }

    /// [`Store::receive`] of a batch decoded with its events' bytes: those bytes are
    /// stored as they came instead of encoding each event again.
    pub async fn receive_with_bytes(
        &self,
        sender: DeviceId,
        decoded: edge_agent::wire::BatchWithBytes,
        received_ms: i64,
    ) -> Result<Receipt, StoreError> {
        let sent = Some((decoded.body, decoded.spans));
        self.receive_command(sender, decoded.batch, sent, received_ms)
            .await
    }

    async fn receive_command(
        &self,
        sender: DeviceId,
        batch: UplinkBatch,
        sent: Option<(Vec<u8>, Vec<std::ops::Range<usize>>)>,
        received_ms: i64,
    ) -> Result<Receipt, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Receive {
                sender,
                batch,
                sent,
                received_ms,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores events of a server-side source (`sender` = `source:<name>`) in one
    /// commit, skipping ids stored within [`SOURCE_DEDUP_WINDOW`]; returns after
    /// the commit. Each stored event's `seq` becomes its inbox seq.
    pub async fn ingest(
        &self,
        sender: DeviceId,
        events: Vec<Event>,
        received_ms: i64,
    ) -> Result<IngestReceipt, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ingest {
                sender,
                events,
                received_ms,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Counts a refused frame for `device` (best effort, not awaited).
    pub fn frame_rejected(&self, device: DeviceId) {
        let _ = self.tx.try_send(Command::FrameRejected { device });
    }

    /// Saves a destination's state; inbox entries up to `done_through` may be pruned
    /// once every destination is past them.
    pub async fn save_cursor(
        &self,
        name: &str,
        state: Vec<u8>,
        done_through: u64,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SaveCursor {
                name: name.to_owned(),
                state,
                done_through,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `write` inside the next group commit and returns its result once that
    /// commit is durable. For modules keeping their own tables in this store
    /// (dead letters, downlink queues): they open them through the transaction.
    /// An error from `write` fails the whole group, so return one only when nothing
    /// should be committed.
    pub async fn apply<T: Send + 'static>(
        &self,
        write: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let write: ApplyFn =
            Box::new(move |txn| write(txn).map(|v| Box::new(v) as Box<dyn Any + Send>));
        self.tx
            .send(Command::Apply { write, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        let any = rx.await.map_err(|_| StoreError::Closed)??;
        any.downcast::<T>()
            .map(|b| *b)
            .map_err(|_| StoreError::Storage("apply: result type mismatch".into()))
    }

    /// Runs `read` on a fresh read transaction (a consistent snapshot).
    pub fn read<T>(
        &self,
        read: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = self.shared.db.begin_read()?;
        read(&r)
    }

    /// Records that `name` (a destination or the profile stage) no longer needs inbox
    /// entries at or below `through`, without writing anything: for consumers that
    /// keep their cursor elsewhere.
    pub fn set_done(&self, name: &str, through: u64) {
        self.shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), through);
    }

    /// The lowest inbox seq any consumer still needs, minus one.
    pub fn min_done(&self) -> u64 {
        self.shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .min()
            .copied()
            .unwrap_or(0)
    }

    /// A destination's saved state.
    pub fn load_cursor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.shared.db.begin_read()?;
        let t = r.open_table(CURSORS).st()?;
        let v = t.get(name).st()?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Up to `max` inbox records after `after`, in order.
    pub fn read_inbox(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        let r = self.shared.db.begin_read()?;
        let t = r.open_table(INBOX).st()?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..).st()?.take(max) {
            let (k, v) = row.st()?;
            let rec = postcard::from_bytes(v.value())
                .map_err(|e| StoreError::Corrupt(format!("inbox {}: {e}", k.value())))?;
            out.push((k.value(), rec));
        }
        Ok(out)
    }

    /// [`Store::read_inbox`] for the profile stage, which reads the inbox in order:
    /// records still in memory since their commit come from there, shared, without
    /// decoding; records up to `after` leave memory.
    pub fn read_inbox_shared(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, Arc<InboxRecord>)>, StoreError> {
        let mut records = {
            let mut tail = self
                .shared
                .tail
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            tail.release(after);
            tail.read(after, max).unwrap_or_default()
        };
        // The tail may end before the inbox does (it skips records while full): a
        // short read must still mean "nothing more committed", as from redb.
        if records.len() < max {
            let from = records.last().map_or(after, |(seq, _)| *seq);
            let more = self.read_inbox(from, max - records.len())?;
            records.extend(more.into_iter().map(|(seq, r)| (seq, Arc::new(r))));
        }
        Ok(records)
    }

    /// Watches the newest committed inbox seq.
    pub fn head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    /// One device's record.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let r = self.shared.db.begin_read()?;
        let t = r.open_table(DEVICES).st()?;
        let v = match t.get(id).st()? {
            Some(v) => Some(
                postcard::from_bytes(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("device {id}: {e}")))?,
            ),
            None => None,
        };
        Ok(v)
    }

    /// All device records (for metrics), at most `max`.
    pub fn devices(&self, max: usize) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        let r = self.shared.db.begin_read()?;
        let t = r.open_table(DEVICES).st()?;
        let mut out = Vec::new();
        for row in t.iter().st()?.take(max) {
            let (k, v) = row.st()?;
            if let Ok(rec) = postcard::from_bytes(v.value()) {
                out.push((k.value().to_owned(), rec));
            }
        }
        Ok(out)
    }

    /// Events waiting in the inbox.
    pub fn inbox_len(&self) -> Result<u64, StoreError> {
        let r = self.shared.db.begin_read()?;
        r.open_table(INBOX).st()?.len().st()
    }

    /// Finishes queued writes and stops the writer.
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Stop).await;
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Opens (creating) the file and its tables.
fn open_file(path: &Path, cache_size: usize) -> Result<Database, StoreError> {
    let db = Database::builder()
        .set_cache_size(cache_size)
        .create(path)
        .st()?;
    let txn = db.begin_write().st()?;
    {
        txn.open_table(INBOX).st()?;
        txn.open_table(DEDUP).st()?;
        txn.open_table(DEVICES).st()?;
        txn.open_table(CURSORS).st()?;
        txn.open_table(META).st()?;
        txn.open_table(SOURCE_DEDUP).st()?;
        txn.open_table(SOURCE_AGE).st()?;
    }
    txn.commit().st()?;
    Ok(db)
}

fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Command>) {
    loop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let stop = group.iter().position(|c| matches!(c, Command::Stop));
        if let Some(at) = stop {
            group.truncate(at);
        }
        if !group.is_empty() {
            commit_group(&shared, group);
        }
        if stop.is_some() {
            rx.close();
            break;
        }
    }
}

enum Reply {
    Ingested(
        oneshot::Sender<Result<IngestReceipt, StoreError>>,
        IngestReceipt,
    ),
    Receive(oneshot::Sender<Result<Receipt, StoreError>>, Receipt),
    Saved(oneshot::Sender<Result<(), StoreError>>),
    Applied(
        oneshot::Sender<Result<Box<dyn Any + Send>, StoreError>>,
        Box<dyn Any + Send>,
    ),
}

fn commit_group(shared: &Shared, group: Vec<Command>) {
    let mut replies = Vec::with_capacity(group.len());
    let mut waiting: Vec<Command> = Vec::new();
    let mut head = 0;
    // Records stored by this group, for the tail once committed.
    let mut fresh = Vec::new();
    // A write from outside the receive path may have removed inbox records.
    let mut foreign_write = false;
    let result = (|| -> Result<(), StoreError> {
        let mut txn = shared.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        let mut next = txn
            .open_table(META)
            .st()?
            .get(NEXT_INBOX)
            .st()?
            .map(|v| v.value())
            .unwrap_or(1);
        let mut group = group.into_iter();
        while let Some(cmd) = group.next() {
            match cmd {
                Command::Ingest {
                    sender,
                    events,
                    received_ms,
                    reply,
                } => match ingest(&txn, &mut next, &sender, events, received_ms, &mut fresh) {
                    Ok(r) => replies.push(Reply::Ingested(reply, r)),
                    Err(e) => {
                        let _ = reply.send(Err(e.clone()));
                        waiting.extend(group);
                        return Err(e);
                    }
                },
                Command::Receive {
                    sender,
                    batch,
                    sent,
                    received_ms,
                    reply,
                } => match receive(
                    &txn,
                    &mut next,
                    &sender,
                    batch,
                    sent,
                    received_ms,
                    &mut fresh,
                ) {
                    Ok(r) => replies.push(Reply::Receive(reply, r)),
                    Err(e) => {
                        let _ = reply.send(Err(e.clone()));
                        waiting.extend(group);
                        return Err(e);
                    }
                },
                Command::FrameRejected { device } => {
                    let mut rec = load_device(&txn, &device.0)?;
                    rec.frames_rejected += 1;
                    save_device(&txn, &device.0, &rec)?;
                }
                Command::SaveCursor {
                    name,
                    state,
                    done_through,
                    reply,
                } => {
                    txn.open_table(CURSORS)
                        .st()?
                        .insert(name.as_str(), state.as_slice())
                        .st()?;
                    shared
                        .done
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(name, done_through);
                    replies.push(Reply::Saved(reply));
                }
                Command::Apply { write, reply } => {
                    foreign_write = true;
                    match write(&txn) {
                        Ok(v) => replies.push(Reply::Applied(reply, v)),
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            waiting.extend(group);
                            return Err(e);
                        }
                    }
                }
                Command::Stop => {}
            }
        }
        prune_inbox(shared, &txn)?;
        txn.open_table(META).st()?.insert(NEXT_INBOX, next).st()?;
        head = next - 1;
        txn.commit().st()
    })();
    match result {
        Ok(()) => {
            {
                let mut tail = shared.tail.lock().unwrap_or_else(PoisonError::into_inner);
                if foreign_write {
                    tail.clear();
                }
                tail.extend(fresh);
            }
            shared.head.send_replace(head);
            for r in replies {
                match r {
                    Reply::Ingested(tx, receipt) => drop(tx.send(Ok(receipt))),
                    Reply::Receive(tx, receipt) => drop(tx.send(Ok(receipt))),
                    Reply::Saved(tx) => drop(tx.send(Ok(()))),
                    Reply::Applied(tx, v) => drop(tx.send(Ok(v))),
                }
            }
        }
        Err(e) => {
            error!(error = %e, "Store commit failed; nothing in this group was acknowledged.");
            for r in replies {
                match r {
                    Reply::Ingested(tx, _) => drop(tx.send(Err(e.clone()))),
                    Reply::Receive(tx, _) => drop(tx.send(Err(e.clone()))),
                    Reply::Saved(tx) => drop(tx.send(Err(e.clone()))),
                    Reply::Applied(tx, _) => drop(tx.send(Err(e.clone()))),
                }
            }
            for cmd in waiting {
                match cmd {
                    Command::Ingest { reply, .. } => drop(reply.send(Err(e.clone()))),
                    Command::Receive { reply, .. } => drop(reply.send(Err(e.clone()))),
                    Command::SaveCursor { reply, .. } => drop(reply.send(Err(e.clone()))),
                    Command::Apply { reply, .. } => drop(reply.send(Err(e.clone()))),
                    Command::FrameRejected { .. } | Command::Stop => {}
                }
            }
        }
    }
}

/// An inbox record's stored bytes. With `event_bytes` (the event as the agent encoded
/// it) only the fields before the event are encoded: postcard writes a struct as its
/// fields one after the other, so this is the record's encoding without encoding the
/// event again.
fn encode_record(record: &InboxRecord, event_bytes: Option<&[u8]>) -> Result<Vec<u8>, StoreError> {
    let encoded = match event_bytes {
        None => postcard::to_stdvec(record),
        Some(event) => {
            let head = (
                &record.sender,
                record.received_ms,
                record.corrected_timestamp_ms,
            );
            postcard::to_extend(&head, Vec::with_capacity(64 + event.len())).map(|mut out| {
                out.extend_from_slice(event);
                out
            })
        }
    };
    encoded.map_err(|e| StoreError::Storage(e.to_string()))
}

fn receive(
    txn: &WriteTransaction,
    next: &mut u64,
    sender: &DeviceId,
    batch: UplinkBatch,
    sent: Option<(Vec<u8>, Vec<std::ops::Range<usize>>)>,
    received_ms: i64,
    fresh: &mut Vec<(u64, Arc<InboxRecord>)>,
) -> Result<Receipt, StoreError> {
    let key = format!("{}\0{}", sender.0, batch.lane);
    let mut dedup: LaneDedup = {
        let t = txn.open_table(DEDUP).st()?;
        let v = t.get(key.as_str()).st()?;
        match v {
            Some(v) => postcard::from_bytes(v.value())
                .map_err(|e| StoreError::Corrupt(format!("dedup {key}: {e}")))?,
            None => LaneDedup::default(),
        }
    };
    dedup.raise_floor(batch.floor.0);
    let skew = received_ms.saturating_sub(batch.sent_at_ms);
    let mut receipt = Receipt {
        acked: Vec::new(),
        rejected: Vec::new(),
        stored: 0,
        duplicates: 0,
        accepted_ms: Vec::new(),
    };
    {
        let mut inbox = txn.open_table(INBOX).st()?;
        for (i, event) in batch.events.into_iter().enumerate() {
            // The event's bytes as sent, when the caller kept them.
            let as_sent = sent.as_ref().and_then(|(body, spans)| {
                let span = spans.get(i)?;
                body.get(span.clone())
            });
            let seq = event.seq;
            if seq.0 == 0 || event.lane != batch.lane {
                receipt.rejected.push(Rejected {
                    seq,
                    reason: RejectReason::Invalid,
                });
                continue;
            }
            if dedup.admit(seq.0) {
                receipt
                    .accepted_ms
                    .push(event.received_ms.saturating_add(skew));
                let record = InboxRecord {
                    sender: sender.clone(),
                    received_ms,
                    corrected_timestamp_ms: event.timestamp_ms.saturating_add(skew),
                    event,
                };
                let bytes = encode_record(&record, as_sent)?;
                inbox.insert(*next, bytes.as_slice()).st()?;
                fresh.push((*next, Arc::new(record)));
                *next += 1;
                receipt.stored += 1;
            } else {
                receipt.duplicates += 1;
            }
            receipt.acked.push(seq);
        }
    }
    let bytes = postcard::to_stdvec(&dedup).map_err(|e| StoreError::Storage(e.to_string()))?;
    txn.open_table(DEDUP)
        .st()?
        .insert(key.as_str(), bytes.as_slice())
        .st()?;
    let mut rec = load_device(txn, &sender.0)?;
    rec.last_seen_ms = received_ms;
    rec.events += receipt.stored as u64;
    rec.duplicates += receipt.duplicates as u64;
    rec.rejected += receipt.rejected.len() as u64;
    rec.drops = batch.drops;
    rec.clock_skew_ms = skew;
    let high = dedup.received.last().copied().unwrap_or(0);
    match rec.lanes.iter_mut().find(|l| l.lane == batch.lane) {
        Some(mark) => {
            mark.high_water = mark.high_water.max(high);
            mark.floor = dedup.floor;
        }
        None => rec.lanes.push(LaneMark {
            lane: batch.lane.clone(),
            high_water: high,
            floor: dedup.floor,
        }),
    }
    save_device(txn, &sender.0, &rec)?;
    Ok(receipt)
}

fn ingest(
    txn: &WriteTransaction,
    next: &mut u64,
    sender: &DeviceId,
    events: Vec<Event>,
    received_ms: i64,
    fresh: &mut Vec<(u64, Arc<InboxRecord>)>,
) -> Result<IngestReceipt, StoreError> {
    let mut receipt = IngestReceipt::default();
    {
        let mut inbox = txn.open_table(INBOX).st()?;
        let mut seen = txn.open_table(SOURCE_DEDUP).st()?;
        let mut age = txn.open_table(SOURCE_AGE).st()?;
        prune_source_dedup(
            &mut seen,
            &mut age,
            received_ms.saturating_sub(SOURCE_DEDUP_WINDOW.as_millis() as i64),
        )?;
        for mut event in events {
            let id = event.id.0;
            if seen.get(id).st()?.is_some() {
                receipt.duplicates += 1;
                continue;
            }
            seen.insert(id, received_ms).st()?;
            age.insert((received_ms, id), ()).st()?;
            event.seq = Seq(*next);
            let record = InboxRecord {
                sender: sender.clone(),
                received_ms,
                // A server-side sender's clock is taken as is: there is no batch
                // `sent_at` to measure its skew against.
                corrected_timestamp_ms: event.timestamp_ms,
                event,
            };
            let bytes =
                postcard::to_stdvec(&record).map_err(|e| StoreError::Storage(e.to_string()))?;
            inbox.insert(*next, bytes.as_slice()).st()?;
            fresh.push((*next, Arc::new(record)));
            *next += 1;
            receipt.stored += 1;
        }
    }
    let mut rec = load_device(txn, &sender.0)?;
    rec.last_seen_ms = received_ms;
    rec.events += receipt.stored as u64;
    rec.duplicates += receipt.duplicates as u64;
    save_device(txn, &sender.0, &rec)?;
    Ok(receipt)
}

/// Forgets server-side event ids received before `before`, oldest first, at most
/// [`MAX_SOURCE_PRUNE`] so one ingest never makes a long transaction.
fn prune_source_dedup(
    seen: &mut redb::Table<'_, u128, i64>,
    age: &mut redb::Table<'_, (i64, u128), ()>,
    before: i64,
) -> Result<(), StoreError> {
    let mut expired = Vec::new();
    for row in age.range(..(before, 0u128)).st()?.take(MAX_SOURCE_PRUNE) {
        let (k, _) = row.st()?;
        expired.push(k.value());
    }
    for (at, id) in expired {
        age.remove((at, id)).st()?;
        // Only if it still records this receipt (ids are unique, but be exact).
        if seen.get(id).st()?.map(|v| v.value()) == Some(at) {
            seen.remove(id).st()?;
        }
    }
    Ok(())
}

fn load_device(txn: &WriteTransaction, id: &str) -> Result<DeviceRecord, StoreError> {
    let t = txn.open_table(DEVICES).st()?;
    let v = t.get(id).st()?;
    Ok(match v {
        Some(v) => postcard::from_bytes(v.value()).unwrap_or_default(),
        None => DeviceRecord::default(),
    })
}

fn save_device(txn: &WriteTransaction, id: &str, rec: &DeviceRecord) -> Result<(), StoreError> {
    let bytes = postcard::to_stdvec(rec).map_err(|e| StoreError::Storage(e.to_string()))?;
    txn.open_table(DEVICES)
        .st()?
        .insert(id, bytes.as_slice())
        .st()?;
    Ok(())
}

/// Removes inbox entries every destination is done with.
fn prune_inbox(shared: &Shared, txn: &WriteTransaction) -> Result<(), StoreError> {
    let done = shared.done.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(min) = done.values().min().copied() else {
        return Ok(());
    };
    drop(done);
    let mut inbox = txn.open_table(INBOX).st()?;
    let first = inbox.first().st()?.map(|(k, _)| k.value());
    let Some(first) = first.filter(|k| *k <= min) else {
        return Ok(());
    };
    // Bounded per commit so one prune never makes a long transaction. One range
    // pass: cheaper than a lookup and a removal per entry.
    let last = min.min(first.saturating_add(MAX_PRUNE - 1));
    inbox.retain_in(first..=last, |_, _| false).st()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{EventKind, Source};

    fn batch(first: u64, n: u64) -> UplinkBatch {
        let events = (first..first + n)
            .map(|s| {
                let mut e = Event::new(EventKind::Track, Source::Local, 1_700_000_000_000);
                e.seq = Seq(s);
                e.lane = "default".into();
                e
            })
            .collect();
        UplinkBatch {
            device: DeviceId("d1".into()),
            lane: "default".into(),
            floor: Seq(first),
            sent_at_ms: 1_700_000_000_000,
            drops: Drops::default(),
            events,
        }
    }

    #[test]
    fn a_record_stored_with_the_agents_event_bytes_is_the_record_encoded_whole() {
        let mut event = Event::new(EventKind::Track, Source::Segment, 1_700_000_000_000);
        event.name = Some("Played".into());
        event
            .properties
            .insert("position", edge_agent::model::Value::Int(42));
        let record = InboxRecord {
            sender: DeviceId("tv-1".into()),
            received_ms: 1_700_000_000_123,
            corrected_timestamp_ms: -5,
            event,
        };
        let whole = postcard::to_stdvec(&record).unwrap();
        let event_bytes = postcard::to_stdvec(&record.event).unwrap();
        let joined = encode_record(&record, Some(&event_bytes)).unwrap();
        assert_eq!(joined, whole);
        assert_eq!(encode_record(&record, None).unwrap(), whole);
    }

    /// Regression: the decoded tail stops taking records while full; the records
    /// after it must still be read (a short read means "caught up" to the stage).
    #[tokio::test]
    async fn a_reader_in_order_gets_every_record_past_a_full_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("g.redb"), 1 << 20, &["a".into()]).unwrap();
        let total = tail::INBOX_TAIL_EVENTS as u64 * 2 + 500;
        let device = DeviceId("d1".into());
        let mut first = 1;
        while first <= total {
            let n = 1000.min(total - first + 1);
            store
                .receive(device.clone(), batch(first, n), 1_700_000_000_000)
                .await
                .unwrap();
            first += n;
        }
        let (mut after, mut seen) = (0, Vec::new());
        loop {
            let read = store.read_inbox_shared(after, 5000).unwrap();
            seen.extend(read.iter().map(|(seq, _)| *seq));
            match read.last() {
                Some((last, _)) => after = *last,
                None => break,
            }
            if read.len() < 5000 {
                break;
            }
        }
        assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn server_side_retries_are_stored_once_and_forgotten_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("g.redb"), 1 << 20, &["a".into()]).unwrap();
        let source = DeviceId("source:web".into());
        let events = |ids: &[&str]| {
            ids.iter()
                .map(|id| {
                    let mut e = Event::new(EventKind::Track, Source::Segment, 1_000);
                    e.set_message_id(id);
                    e
                })
                .collect::<Vec<_>>()
        };
        let t0 = 1_700_000_000_000;
        let first = store
            .ingest(source.clone(), events(&["m1", "m2", "m1"]), t0)
            .await
            .unwrap();
        assert_eq!(
            (first.stored, first.duplicates),
            (2, 1),
            "a repeat inside one request too"
        );
        let retry = store
            .ingest(source.clone(), events(&["m1", "m2", "m3"]), t0 + 5)
            .await
            .unwrap();
        assert_eq!((retry.stored, retry.duplicates), (1, 2));
        let stored = store.read_inbox(0, 10).unwrap();
        assert_eq!(stored.len(), 3);
        assert_eq!(
            stored[2].1.event.seq,
            Seq(stored[2].0),
            "seq is the inbox seq"
        );
        assert_eq!(stored[0].1.sender, source);
        let rec = store.device("source:web").unwrap().unwrap();
        assert_eq!((rec.events, rec.duplicates), (3, 3));
        let later = t0 + SOURCE_DEDUP_WINDOW.as_millis() as i64 + 10;
        let after = store.ingest(source, events(&["m1"]), later).await.unwrap();
        assert_eq!(
            (after.stored, after.duplicates),
            (1, 0),
            "the window has passed"
        );
        let marks = store
            .read(|r| r.open_table(SOURCE_DEDUP).st()?.len().st())
            .unwrap();
        assert_eq!(marks, 1, "expired marks are pruned");
        store.close().await;
    }

    #[tokio::test]
    async fn entries_every_destination_is_done_with_are_pruned_at_most_ten_thousand_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("g.redb"),
            1 << 20,
            &["a".into(), "b".into()],
        )
        .unwrap();
        let receipt = store
            .receive(DeviceId("d1".into()), batch(1, 12_000), 1_700_000_000_005)
            .await
            .unwrap();
        assert_eq!(receipt.stored, 12_000);
        assert_eq!(receipt.accepted_ms.len(), 12_000);
        assert_eq!(receipt.accepted_ms[0], 1_700_000_000_005, "skew applied");
        store.save_cursor("a", vec![], 12_000).await.unwrap();
        assert_eq!(store.inbox_len().unwrap(), 12_000, "`b` still needs them");
        store.save_cursor("b", vec![], 11_000).await.unwrap();
        // That commit pruned up to 10,000 entries; the next one goes on to 11,000.
        assert_eq!(store.inbox_len().unwrap(), 2_000);
        store.save_cursor("b", vec![], 11_000).await.unwrap();
        assert_eq!(store.inbox_len().unwrap(), 1_000);
        let rest = store.read_inbox(0, 10).unwrap();
        assert_eq!(rest.first().map(|r| r.0), Some(11_001));
        store.close().await;
    }
}
