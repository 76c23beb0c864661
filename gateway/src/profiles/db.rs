//! The tables of `profiles.redb` and their encodings.
//!
//! | table      | key                   | value                                  |
//! |------------|-----------------------|----------------------------------------|
//! | `ids`      | `"<type>\0<value>"`   | `u64` profile id                       |
//! | `profiles` | `u64` profile id      | postcard [`Profile`]                   |
//! | `merged`   | `u64` merged profile  | `u64` the profile it went into         |
//! | `enriched_groups` | `u64` last inbox seq of the row | postcard `[(seq, Enrichment)]`, seqs ascending |
//! | `meta`     | `cursor`, `next_profile` | `u64`                               |
//!
//! Invariants (kept by the stage, the only writer):
//! 1. `ids[k] = p` iff `k` is in `profiles[p].identities` (no link to a merged or
//!    erased profile).
//! 2. `cursor` commits with the profile updates and `enriched_groups` rows of every
//!    inbox seq at or below it, in one transaction: an event is counted exactly once.
//!
//! A resolved group's enrichments are a few rows of up to [`ROW_EVENTS`], not one
//! row per event: a B-tree insert per event was a tenth of the stage's work. Rows do not overlap (the stage
//! replaces any row from a failed attempt before writing the group again); readers
//! walk them in seq order ([`EnrichedReader`]). Files written before kept one row
//! per seq in a table `enriched`; [`open`] moves those into groups.
//! 3. `merged[l]` names a live profile or one merged further (followed at read).

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableHandle};

use super::profile::Profile;
use super::Enrichment;
use crate::store::{StoreError, R};

pub const IDS: TableDefinition<&str, u64> = TableDefinition::new("ids");
pub const PROFILES: TableDefinition<u64, &[u8]> = TableDefinition::new("profiles");
pub const MERGED: TableDefinition<u64, u64> = TableDefinition::new("merged");
pub const ENRICHED: TableDefinition<u64, &[u8]> = TableDefinition::new("enriched_groups");
/// The per-seq table of earlier versions (migrated by [`open`]).
const ENRICHED_PER_SEQ: TableDefinition<u64, &[u8]> = TableDefinition::new("enriched");
/// Most events in one `enriched_groups` row: a resolved group is written as a few
/// rows of some tens of KiB (a whole group's row is half a MiB, and redb holds such
/// a value in one page of that size, in its cache and in every commit touching it).
pub const ROW_EVENTS: usize = 256;
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Last inbox seq resolved.
pub const CURSOR: &str = "cursor";
/// Next profile id to hand out (ids start at 1; 0 means "no profile").
pub const NEXT_PROFILE: &str = "next_profile";

/// Longest chain of `merged` entries followed before giving up (chains are kept at
/// length one by re-pointing on merge; this only bounds a damaged file).
const MAX_MERGE_HOPS: usize = 64;

/// Opens (creating) the file and its tables.
pub fn open(path: &Path, cache_size: usize) -> Result<Database, StoreError> {
    prepare(
        Database::builder()
            .set_cache_size(cache_size)
            .create(path)
            .st()?,
    )
}

/// Creates the tables `db` lacks and migrates those of earlier versions.
pub fn prepare(db: Database) -> Result<Database, StoreError> {
    let txn = db.begin_write().st()?;
    {
        txn.open_table(IDS).st()?;
        txn.open_table(PROFILES).st()?;
        txn.open_table(MERGED).st()?;
        txn.open_table(ENRICHED).st()?;
        txn.open_table(META).st()?;
    }
    migrate_per_seq_enrichment(&txn)?;
    txn.commit().st()?;
    Ok(db)
}

/// Moves the rows of a per-seq `enriched` table (files of earlier versions) into
/// groups and deletes it.
fn migrate_per_seq_enrichment(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let exists = txn
        .list_tables()
        .st()?
        .any(|t| t.name() == ENRICHED_PER_SEQ.name());
    if !exists {
        return Ok(());
    }
    {
        let old = txn.open_table(ENRICHED_PER_SEQ).st()?;
        let mut groups = txn.open_table(ENRICHED).st()?;
        let mut group: Vec<(u64, Enrichment)> = Vec::with_capacity(ROW_EVENTS);
        let mut buf = Vec::new();
        let mut flush = |group: &mut Vec<(u64, Enrichment)>| {
            let rows: Vec<(u64, &Enrichment)> = group.iter().map(|(s, e)| (*s, e)).collect();
            let written = write_group(&mut groups, &rows, &mut buf);
            group.clear();
            written
        };
        for row in old.iter().st()? {
            let (k, v) = row.st()?;
            group.push((k.value(), decode_enrichment(k.value(), v.value())?));
            if group.len() == ROW_EVENTS {
                flush(&mut group)?;
            }
        }
        flush(&mut group)?;
    }
    txn.delete_table(ENRICHED_PER_SEQ).st()?;
    Ok(())
}

/// Writes `group` (seqs ascending) as one row keyed by its last seq; nothing when
/// empty.
pub fn write_group(
    table: &mut redb::Table<'_, u64, &'static [u8]>,
    group: &[(u64, &Enrichment)],
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let Some((last, _)) = group.last() else {
        return Ok(());
    };
    buf.clear();
    *buf = postcard::to_extend(group, std::mem::take(buf))
        .map_err(|e| StoreError::Storage(format!("encode enrichment: {e}")))?;
    table.insert(*last, buf.as_slice()).st()?;
    Ok(())
}

/// Decodes the row of the group ending at `last`.
pub fn decode_group(last: u64, bytes: &[u8]) -> Result<Vec<(u64, Enrichment)>, StoreError> {
    postcard::from_bytes(bytes)
        .map_err(|e| StoreError::Corrupt(format!("enriched group ending at {last}: {e}")))
}

/// Looks up enrichments by ascending seq, decoding each group row once.
pub struct EnrichedReader<'t> {
    rows: redb::Range<'t, u64, &'static [u8]>,
    /// What is left of the current group, seqs ascending.
    group: std::collections::VecDeque<(u64, Enrichment)>,
}

impl std::fmt::Debug for EnrichedReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrichedReader").finish_non_exhaustive()
    }
}

impl<'t> EnrichedReader<'t> {
    /// A reader of the seqs after `after`.
    pub fn new(
        table: &'t impl ReadableTable<u64, &'static [u8]>,
        after: u64,
    ) -> Result<Self, StoreError> {
        Ok(EnrichedReader {
            rows: table.range(after.saturating_add(1)..).st()?,
            group: std::collections::VecDeque::new(),
        })
    }

    /// The enrichment of `seq` (taken: each seq once, ascending); `None` when there is
    /// none (the event was erased).
    pub fn take(&mut self, seq: u64) -> Result<Option<Enrichment>, StoreError> {
        loop {
            while self.group.front().is_some_and(|(s, _)| *s < seq) {
                self.group.pop_front();
            }
            if let Some((s, _)) = self.group.front() {
                return Ok(if *s == seq {
                    self.group.pop_front().map(|(_, e)| e)
                } else {
                    None
                });
            }
            let Some(row) = self.rows.next() else {
                return Ok(None);
            };
            let (k, v) = row.st()?;
            self.group = decode_group(k.value(), v.value())?.into();
        }
    }
}

/// Writes the key of identifier `(ty, value)` into `buf`.
pub fn id_key(buf: &mut String, ty: &str, value: &str) {
    buf.clear();
    buf.push_str(ty);
    buf.push('\0');
    buf.push_str(value);
}

pub fn decode_profile(id: u64, bytes: &[u8]) -> Result<Profile, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("profile {id}: {e}")))
}

pub fn decode_enrichment(seq: u64, bytes: &[u8]) -> Result<Enrichment, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("enriched {seq}: {e}")))
}

pub fn meta_get(
    meta: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<u64, StoreError> {
    Ok(meta.get(key).st()?.map(|v| v.value()).unwrap_or(0))
}

/// The live profile `id` went into (itself when it was never merged).
pub fn follow_merges(merged: &impl ReadableTable<u64, u64>, id: u64) -> Result<u64, StoreError> {
    let mut at = id;
    for _ in 0..MAX_MERGE_HOPS {
        match merged.get(at).st()? {
            Some(next) => at = next.value(),
            None => return Ok(at),
        }
    }
    Err(StoreError::Corrupt(format!(
        "merged: chain from profile {id} longer than {MAX_MERGE_HOPS}"
    )))
}

/// Reads a profile.
pub fn load_profile(
    profiles: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<Profile>, StoreError> {
    match profiles.get(id).st()? {
        Some(v) => decode_profile(id, v.value()).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTableMetadata};

    fn enrichment(profile_id: u64) -> Enrichment {
        Enrichment {
            profile_id,
            identities: vec![("customer_id".into(), format!("c-{profile_id}").into())],
            ..Enrichment::default()
        }
    }

    #[test]
    fn a_per_seq_enriched_table_is_moved_into_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profiles.redb");
        // A file as earlier versions wrote it: one row per seq, with gaps (erased).
        let seqs: Vec<u64> = (1..=4500).filter(|s| s % 7 != 0).collect();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ENRICHED_PER_SEQ).unwrap();
                for seq in &seqs {
                    let bytes = postcard::to_allocvec(&enrichment(*seq)).unwrap();
                    t.insert(*seq, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let db = open(&path, 1 << 20).unwrap();
        let r = db.begin_read().unwrap();
        assert!(
            r.open_table(ENRICHED_PER_SEQ).is_err(),
            "the old table is gone"
        );
        let groups = r.open_table(ENRICHED).unwrap();
        let rows = seqs.len() as u64;
        assert_eq!(rows, 3858);
        assert_eq!(groups.len().unwrap(), 16, "{rows} events in rows of 256");
        let mut reader = EnrichedReader::new(&groups, 0).unwrap();
        for seq in 1..=4501 {
            let found = reader.take(seq).unwrap();
            let expected = seqs.binary_search(&seq).is_ok().then(|| enrichment(seq));
            assert_eq!(found, expected, "seq {seq}");
        }
        // A reader starting mid-group finds the rest.
        let mut reader = EnrichedReader::new(&groups, 3000).unwrap();
        assert_eq!(reader.take(3001).unwrap(), Some(enrichment(3001)));
        assert_eq!(reader.take(2999).unwrap(), None, "only ascending seqs");
    }
}
