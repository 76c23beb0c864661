//! Tables of `audiences.redb` and the one way memberships are written ([`Writes`]),
//! so a state, its `members` rows, the size counters and the change log can never
//! disagree.
//!
//! - `meta`: `cursor` (inbox seq processed), `next_change` (next change log seq),
//!   `fingerprint` (of the definitions the states were last evaluated with),
//!   `now_high` (latest time evaluated at: the engine's time never goes back).
//! - `states`: profile id → [`super::model`] encoding of its `AudState`.
//! - `members`: (audience, profile id) → entered ms.
//! - `sizes`: audience → members.
//! - `changes`: seq → postcard [`MembershipChange`].

use std::collections::HashMap;

use redb::{Database, ReadableTable, Table, TableDefinition, WriteTransaction};

use super::model::{encode, AudState, Change};
use crate::audience::MembershipChange;
use crate::store::{StoreError, R};

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const STATES: TableDefinition<u64, &[u8]> = TableDefinition::new("states");
pub(super) const MEMBERS: TableDefinition<(&str, u64), i64> = TableDefinition::new("members");
pub(super) const SIZES: TableDefinition<&str, u64> = TableDefinition::new("sizes");
pub(super) const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

pub(super) const CURSOR: &str = "cursor";
pub(super) const NEXT_CHANGE: &str = "next_change";
pub(super) const FINGERPRINT: &str = "fingerprint";
pub(super) const NOW_HIGH: &str = "now_high";

/// What the single writer carries between commits (mirrors `meta`).
#[derive(Debug, Clone, Default)]
pub(super) struct Marks {
    pub cursor: u64,
    /// Seq the next change gets (the log holds `1..next_change`).
    pub next_change: u64,
    pub fingerprint: u64,
    pub now_high: i64,
}

/// Opens the file and its tables; reads the marks.
pub(super) fn open(path: &std::path::Path, cache: usize) -> Result<(Database, Marks), StoreError> {
    let db = Database::builder()
        .set_cache_size(cache)
        .create(path)
        .st()?;
    let txn = db.begin_write().st()?;
    let marks = {
        txn.open_table(STATES).st()?;
        txn.open_table(MEMBERS).st()?;
        txn.open_table(SIZES).st()?;
        txn.open_table(CHANGES).st()?;
        let meta = txn.open_table(META).st()?;
        let get = |k: &str| -> Result<Option<u64>, StoreError> {
            Ok(meta.get(k).st()?.map(|v| v.value()))
        };
        Marks {
            cursor: get(CURSOR)?.unwrap_or(0),
            next_change: get(NEXT_CHANGE)?.unwrap_or(1).max(1),
            fingerprint: get(FINGERPRINT)?.unwrap_or(0),
            now_high: get(NOW_HIGH)?.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX)),
        }
    };
    txn.commit().st()?;
    Ok((db, marks))
}

/// The tables of one write transaction, with the change seq and size deltas.
pub(super) struct Writes<'t> {
    states: Table<'t, u64, &'static [u8]>,
    members: Table<'t, (&'static str, u64), i64>,
    changes: Table<'t, u64, &'static [u8]>,
    sizes: HashMap<String, i64>,
    pub marks: Marks,
    /// Changes appended in this transaction.
    pub appended: u64,
}

impl<'t> Writes<'t> {
    pub fn new(txn: &'t WriteTransaction, marks: Marks) -> Result<Self, StoreError> {
        Ok(Writes {
            states: txn.open_table(STATES).st()?,
            members: txn.open_table(MEMBERS).st()?,
            changes: txn.open_table(CHANGES).st()?,
            sizes: HashMap::new(),
            marks,
            appended: 0,
        })
    }

    /// The stored state of `pid`, if any.
    pub fn load(&self, pid: u64) -> Result<Option<AudState>, StoreError> {
        match self.states.get(pid).st()? {
            Some(v) => super::model::decode(pid, v.value()).map(Some),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, pid: u64, state: &AudState, next_due: i64) -> Result<(), StoreError> {
        let bytes = encode(state, next_due)?;
        self.states.insert(pid, bytes.as_slice()).st()?;
        Ok(())
    }

    pub fn delete(&mut self, pid: u64) -> Result<(), StoreError> {
        self.states.remove(pid).st()?;
        Ok(())
    }

    /// Applies `change` of profile `pid` (state `state`, as after the change) at `at_ms`:
    /// its `members` row, the size, and a change log entry.
    pub fn change(
        &mut self,
        pid: u64,
        state: &AudState,
        change: Change,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let key = (change.audience.as_str(), pid);
        let delta = if change.entered {
            self.members.insert(key, at_ms).st()?.is_none()
        } else {
            self.members.remove(key).st()?.is_some()
        };
        if delta {
            *self.sizes.entry(change.audience.clone()).or_default() +=
                if change.entered { 1 } else { -1 };
        }
        let seq = self.marks.next_change;
        let record = MembershipChange {
            seq,
            audience: change.audience,
            profile_id: pid,
            entered: change.entered,
            at_ms,
            identities: state.identities.clone(),
            devices: state.devices.clone(),
            audiences_now: change.audiences_now,
        };
        let bytes = postcard::to_stdvec(&record)
            .map_err(|e| StoreError::Storage(format!("encoding a membership change: {e}")))?;
        self.changes.insert(seq, bytes.as_slice()).st()?;
        self.marks.next_change = seq.saturating_add(1);
        self.appended += 1;
        Ok(())
    }

    /// Deletes change log entries at or below `through`, at most `max`; returns how
    /// many went.
    pub fn prune_changes(&mut self, through: u64, max: usize) -> Result<usize, StoreError> {
        let keys: Vec<u64> = self
            .changes
            .range(..=through)
            .st()?
            .take(max)
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .st()?;
        for k in &keys {
            self.changes.remove(*k).st()?;
        }
        Ok(keys.len())
    }

    /// Writes the size deltas and the marks; the caller commits.
    pub fn finish(self, txn: &WriteTransaction) -> Result<Marks, StoreError> {
        let Writes { sizes, marks, .. } = self;
        let mut table = txn.open_table(SIZES).st()?;
        for (name, delta) in sizes {
            let old = table.get(name.as_str()).st()?.map_or(0, |v| v.value());
            let new = if delta >= 0 {
                old.saturating_add(delta.unsigned_abs())
            } else {
                old.saturating_sub(delta.unsigned_abs())
            };
            table.insert(name.as_str(), new).st()?;
        }
        let mut meta = txn.open_table(META).st()?;
        meta.insert(CURSOR, marks.cursor).st()?;
        meta.insert(NEXT_CHANGE, marks.next_change).st()?;
        meta.insert(FINGERPRINT, marks.fingerprint).st()?;
        meta.insert(NOW_HIGH, u64::try_from(marks.now_high).unwrap_or(0))
            .st()?;
        Ok(marks)
    }
}
