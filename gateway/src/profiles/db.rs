//! The tables of `profiles.redb` and their encodings.
//!
//! | table      | key                   | value                                  |
//! |------------|-----------------------|----------------------------------------|
//! | `ids`      | `"<type>\0<value>"`   | `u64` profile id                       |
//! | `profiles` | `u64` profile id      | postcard [`Profile`]                   |
//! | `merged`   | `u64` merged profile  | `u64` the profile it went into         |
//! | `enriched` | `u64` inbox seq       | postcard [`Enrichment`]                |
//! | `meta`     | `cursor`, `next_profile` | `u64`                               |
//!
//! Invariants (kept by the stage, the only writer):
//! 1. `ids[k] = p` iff `k` is in `profiles[p].identities` (no link to a merged or
//!    erased profile).
//! 2. `cursor` commits with the profile updates and `enriched` rows of every inbox
//!    seq at or below it, in one transaction: an event is counted exactly once.
//! 3. `merged[l]` names a live profile or one merged further (followed at read).

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use super::profile::Profile;
use super::Enrichment;
use crate::store::{StoreError, R};

pub const IDS: TableDefinition<&str, u64> = TableDefinition::new("ids");
pub const PROFILES: TableDefinition<u64, &[u8]> = TableDefinition::new("profiles");
pub const MERGED: TableDefinition<u64, u64> = TableDefinition::new("merged");
pub const ENRICHED: TableDefinition<u64, &[u8]> = TableDefinition::new("enriched");
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
    let db = Database::builder()
        .set_cache_size(cache_size)
        .create(path)
        .st()?;
    let txn = db.begin_write().st()?;
    {
        txn.open_table(IDS).st()?;
        txn.open_table(PROFILES).st()?;
        txn.open_table(MERGED).st()?;
        txn.open_table(ENRICHED).st()?;
        txn.open_table(META).st()?;
    }
    txn.commit().st()?;
    Ok(db)
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
