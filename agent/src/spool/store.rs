//! The redb file: table layout, opening/reopening, and read-only queries.
//!
//! Layout (one redb file, `spool.redb` in the data dir):
//!
//! | table            | key                | value                                   |
//! |------------------|--------------------|-----------------------------------------|
//! | `lane:<name>`    | `u64` seq          | postcard [`Event`]                      |
//! | `meta`           | `"stats"`          | postcard [`SpoolStats`]                 |
//! | `meta`           | `"device_id"`      | UTF-8 device id                         |
//! | `meta`           | `"erasures"`       | postcard [`Erasures`]                   |
//! | `consent`        | subject            | postcard [`SubjectConsent`]             |
//! | `devices`        | device id          | postcard [`DeviceState`]                |
//! | `device_counts`  | device id          | `u64` events accepted from that device  |
//! | `audiences`      | user id            | postcard [`AudienceRecord`]             |
//! | `audience_order` | `u64` order        | user id (least recently updated first)  |
//! | `meta`           | `"audiences"`      | postcard [`AudienceSummary`]            |
//!
//! Invariants, kept by the writer committing them in one transaction:
//! 1. `stats.lanes[l]` equals the count and summed value lengths of `lane:<l>`.
//! 2. Every seq in any lane is `< stats.next_seq`; seqs are never reused.
//! 3. The audience tables keep the invariants listed in [`super::audiences`].
//!
//! [`AudienceRecord`]: crate::audiences::AudienceRecord
//! [`AudienceSummary`]: crate::audiences::AudienceSummary
//!
//! Only the writer thread writes; everything here reads or swaps the handle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::stats::{Erasures, SpoolStats};
use super::{RedbResultExt, SpoolError};
use crate::consent::SubjectConsent;
use crate::enrich::DeviceState;
use crate::model::{DeviceId, Event, Seq};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const CONSENT: TableDefinition<&str, &[u8]> = TableDefinition::new("consent");
pub(crate) const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
pub(crate) const DEVICE_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("device_counts");

pub(crate) const STATS_KEY: &str = "stats";
pub(crate) const ERASURES_KEY: &str = "erasures";
const DEVICE_ID_KEY: &str = "device_id";

/// Name of the redb table holding one lane.
pub(crate) fn lane_table(lane: &str) -> String {
    format!("lane:{lane}")
}

pub(crate) fn lane_def(table: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(table)
}

/// What the spool file holds besides the queued events, loaded at open.
#[derive(Debug, Default)]
pub struct Recovered {
    pub device_id: DeviceId,
    pub consent: HashMap<String, SubjectConsent>,
    pub devices: HashMap<DeviceId, DeviceState>,
}

/// The open database, swappable so a failed commit can be followed by a reopen.
#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    cache_size: usize,
    lanes: Vec<String>,
    db: RwLock<Option<Database>>,
}

impl Store {
    pub(crate) fn open(
        path: &Path,
        cache_size: usize,
        lanes: Vec<String>,
    ) -> Result<Self, SpoolError> {
        let store = Store {
            path: path.to_owned(),
            cache_size,
            lanes,
            db: RwLock::new(None),
        };
        let db = store.open_db()?;
        *store.db.write().unwrap_or_else(PoisonError::into_inner) = Some(db);
        Ok(store)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn open_db(&self) -> Result<Database, SpoolError> {
        let db = Database::builder()
            .set_cache_size(self.cache_size)
            .create(&self.path)
            .spool()?;
        // Create every table up front so readers never meet a missing one.
        let txn = db.begin_write().spool()?;
        {
            txn.open_table(META).spool()?;
            txn.open_table(CONSENT).spool()?;
            txn.open_table(DEVICES).spool()?;
            txn.open_table(DEVICE_COUNTS).spool()?;
            txn.open_table(super::audiences::AUDIENCES).spool()?;
            txn.open_table(super::audiences::AUDIENCE_ORDER).spool()?;
            for lane in &self.lanes {
                let name = lane_table(lane);
                txn.open_table(lane_def(&name)).spool()?;
            }
        }
        txn.commit().spool()?;
        Ok(db)
    }

    /// Runs `f` with the database, or fails if it is closed for a reopen.
    pub(crate) fn with_db<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, SpoolError>,
    ) -> Result<R, SpoolError> {
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(SpoolError::Unavailable(
                "the spool file is being reopened".into(),
            )),
        }
    }

    /// Runs `f` with exclusive access (compaction, integrity check).
    pub(crate) fn with_db_mut<R>(
        &self,
        f: impl FnOnce(&mut Database) -> Result<R, SpoolError>,
    ) -> Result<R, SpoolError> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(db) => f(db),
            None => Err(SpoolError::Unavailable(
                "the spool file is being reopened".into(),
            )),
        }
    }

    /// Closes and reopens the file: after a failed commit redb may refuse further
    /// writes until it has recovered from the file.
    pub(crate) fn reopen(&self) -> Result<(), SpoolError> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        drop(guard.take());
        *guard = Some(self.open_db()?);
        Ok(())
    }

    pub(crate) fn is_open(&self) -> bool {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    pub(crate) fn load_stats(&self) -> Result<SpoolStats, SpoolError> {
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let meta = txn.open_table(META).spool()?;
            let stats = match meta.get(STATS_KEY).spool()? {
                Some(v) => postcard::from_bytes(v.value())
                    .map_err(|e| SpoolError::Corrupt(format!("spool stats: {e}")))?,
                None => SpoolStats {
                    next_seq: 1,
                    ..SpoolStats::default()
                },
            };
            Ok(stats)
        })
    }

    pub(crate) fn load_erasures(&self) -> Result<Erasures, SpoolError> {
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let meta = txn.open_table(META).spool()?;
            let erasures = match meta.get(ERASURES_KEY).spool()? {
                Some(v) => postcard::from_bytes(v.value())
                    .map_err(|e| SpoolError::Corrupt(format!("spool erasures: {e}")))?,
                None => Erasures::default(),
            };
            Ok(erasures)
        })
    }

    /// Reads the persisted device id, consent and device states; stores `configured`
    /// (or a new random id when there is none yet) as this agent's device id.
    pub(crate) fn recover(&self, configured: &str) -> Result<Recovered, SpoolError> {
        let stored = self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let meta = txn.open_table(META).spool()?;
            let id = meta
                .get(DEVICE_ID_KEY)
                .spool()?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            Ok(id)
        })?;
        let device_id = if !configured.is_empty() {
            configured.to_owned()
        } else if let Some(id) = stored.clone() {
            id
        } else {
            uuid::Uuid::new_v4().to_string()
        };
        if stored.as_deref() != Some(device_id.as_str()) {
            self.with_db(|db| {
                let txn = db.begin_write().spool()?;
                {
                    let mut meta = txn.open_table(META).spool()?;
                    meta.insert(DEVICE_ID_KEY, device_id.as_bytes()).spool()?;
                }
                txn.commit().spool()
            })?;
        }
        let mut recovered = Recovered {
            device_id: DeviceId(device_id),
            ..Recovered::default()
        };
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let consent = txn.open_table(CONSENT).spool()?;
            for row in consent.iter().spool()? {
                let (k, v) = row.spool()?;
                let state = postcard::from_bytes(v.value())
                    .map_err(|e| SpoolError::Corrupt(format!("consent of `{}`: {e}", k.value())))?;
                recovered.consent.insert(k.value().to_owned(), state);
            }
            let devices = txn.open_table(DEVICES).spool()?;
            for row in devices.iter().spool()? {
                let (k, v) = row.spool()?;
                let state = postcard::from_bytes(v.value())
                    .map_err(|e| SpoolError::Corrupt(format!("device `{}`: {e}", k.value())))?;
                recovered
                    .devices
                    .insert(DeviceId(k.value().to_owned()), state);
            }
            Ok(())
        })?;
        Ok(recovered)
    }

    /// Up to `max` events of `lane` with seq greater than `after`, in seq order.
    pub(crate) fn read(
        &self,
        lane: &str,
        after: Seq,
        max: usize,
    ) -> Result<Vec<Event>, SpoolError> {
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let name = lane_table(lane);
            let table = txn
                .open_table(lane_def(&name))
                .map_err(|_| SpoolError::UnknownLane(lane.to_owned()))?;
            let mut out = Vec::new();
            let start = after.0.saturating_add(1);
            for row in table.range(start..).spool()?.take(max) {
                let (k, v) = row.spool()?;
                out.push(decode_event(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    /// Device time of the oldest queued event of `lane`, by agent receive time.
    pub(crate) fn oldest_received(&self, lane: &str) -> Result<Option<i64>, SpoolError> {
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let name = lane_table(lane);
            let table = txn
                .open_table(lane_def(&name))
                .map_err(|_| SpoolError::UnknownLane(lane.to_owned()))?;
            let oldest = match table.first().spool()? {
                Some((k, v)) => Some(decode_event(k.value(), v.value())?.received_ms),
                None => None,
            };
            Ok(oldest)
        })
    }

    /// Lowest queued seq of `lane`.
    pub(crate) fn first_seq(&self, lane: &str) -> Result<Option<Seq>, SpoolError> {
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let name = lane_table(lane);
            let table = txn
                .open_table(lane_def(&name))
                .map_err(|_| SpoolError::UnknownLane(lane.to_owned()))?;
            let first = table.first().spool()?.map(|(k, _)| Seq(k.value()));
            Ok(first)
        })
    }

    /// Events accepted per device (fleet status), at most `max` devices.
    pub(crate) fn device_counts(&self, max: usize) -> Result<Vec<(String, u64)>, SpoolError> {
        self.with_db(|db| {
            let txn = db.begin_read().spool()?;
            let table = txn.open_table(DEVICE_COUNTS).spool()?;
            let mut out = Vec::new();
            for row in table.iter().spool()?.take(max) {
                let (k, v) = row.spool()?;
                out.push((k.value().to_owned(), v.value()));
            }
            Ok(out)
        })
    }
}

pub(crate) fn decode_event(seq: u64, bytes: &[u8]) -> Result<Event, SpoolError> {
    postcard::from_bytes(bytes).map_err(|e| SpoolError::Corrupt(format!("event seq {seq}: {e}")))
}
