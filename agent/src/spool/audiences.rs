//! Audience membership in the spool file: one record per user, an eviction order,
//! and the device-wide summary in `meta` (layout in [`super::store`]).
//!
//! Writes run inside the writer's transaction, so an update is durable, and counted
//! in the summary, in the same commit or not at all. Reads are short read
//! transactions and need no gateway: this is what `GET /v1/audiences` answers from.
//!
//! Invariants, kept by committing all three together:
//! 1. `summary.users` equals the number of rows of `audiences`.
//! 2. Every record's `order` is a key of `audience_order` naming that user, and is
//!    below `summary.next_order`. (`audience_order` may hold stale keys only if a
//!    record was found corrupt; eviction skips them.)
//! 3. `summary.version` is at least every record's version.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tracing::warn;

use super::store::META;
use super::{RedbResultExt, SpoolError};
use crate::audiences::{Applied, AudienceLimits, AudienceRecord, AudienceSummary, CheckedUpdate};

/// User id → postcard [`AudienceRecord`].
pub(crate) const AUDIENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("audiences");
/// [`AudienceRecord::order`] → user id: the least recently updated user first.
pub(crate) const AUDIENCE_ORDER: TableDefinition<u64, &str> =
    TableDefinition::new("audience_order");
/// Key in `meta` of the postcard [`AudienceSummary`].
pub(crate) const SUMMARY_KEY: &str = "audiences";

fn decode(user: &str, bytes: &[u8]) -> Result<AudienceRecord, SpoolError> {
    postcard::from_bytes(bytes)
        .map_err(|e| SpoolError::Corrupt(format!("audiences of `{user}`: {e}")))
}

/// Replaces `update.user_id`'s membership unless the device holds the same or a newer
/// version for that user; evicts the least recently updated users past
/// `limits.max_users`. Updates `summary`; the caller persists it with
/// [`save_summary`] in the same transaction.
pub(crate) fn apply(
    txn: &WriteTransaction,
    summary: &mut AudienceSummary,
    update: &CheckedUpdate,
    limits: &AudienceLimits,
    now_ms: i64,
) -> Result<Applied, SpoolError> {
    let mut records = txn.open_table(AUDIENCES).spool()?;
    let mut order = txn.open_table(AUDIENCE_ORDER).spool()?;
    let user = update.user_id.as_str();
    let held = records.get(user).spool()?.map(|v| decode(user, v.value()));
    match &held {
        Some(Ok(old)) if old.version >= update.version => {
            return Ok(Applied::Stale { held: old.version })
        }
        Some(Ok(old)) => {
            order.remove(old.order).spool()?;
        }
        // A record that does not decode is replaced; its order key (unknown) stays
        // behind as a stale entry that eviction skips.
        Some(Err(e)) => warn!(error = %e, "Replacing an undecodable audience record."),
        None => summary.users += 1,
    }
    let record = AudienceRecord {
        version: update.version,
        audiences: update.audiences.clone(),
        updated_ms: now_ms,
        order: summary.next_order,
    };
    let bytes = postcard::to_stdvec(&record).map_err(|e| SpoolError::Storage(e.to_string()))?;
    records.insert(user, bytes.as_slice()).spool()?;
    order.insert(record.order, user).spool()?;
    summary.next_order += 1;
    summary.version = summary.version.max(update.version);

    let mut evicted = 0;
    // At least one user is always kept: the one just updated has the highest order.
    while summary.users > limits.max_users.max(1) as u64 {
        let Some((k, v)) = order.pop_first().spool()? else {
            break;
        };
        let (at, victim) = (k.value(), v.value().to_owned());
        drop((k, v));
        let current = match records.get(victim.as_str()).spool()? {
            None => continue,
            Some(r) => decode(&victim, r.value()).map(|r| r.order),
        };
        // A key left behind by a corrupt record does not name the user's current one.
        if matches!(current, Ok(o) if o != at) {
            continue;
        }
        records.remove(victim.as_str()).spool()?;
        summary.users = summary.users.saturating_sub(1);
        evicted += 1;
    }
    Ok(Applied::Replaced { evicted })
}

/// Deletes `user`'s membership (erasure); true when there was a record.
pub(crate) fn remove(
    txn: &WriteTransaction,
    summary: &mut AudienceSummary,
    user: &str,
) -> Result<bool, SpoolError> {
    let mut records = txn.open_table(AUDIENCES).spool()?;
    let Some(v) = records.remove(user).spool()? else {
        return Ok(false);
    };
    let old = decode(user, v.value());
    drop(v);
    if let Ok(old) = old {
        txn.open_table(AUDIENCE_ORDER)
            .spool()?
            .remove(old.order)
            .spool()?;
    }
    summary.users = summary.users.saturating_sub(1);
    Ok(true)
}

pub(crate) fn save_summary(
    txn: &WriteTransaction,
    summary: &AudienceSummary,
) -> Result<(), SpoolError> {
    let bytes = postcard::to_stdvec(summary).map_err(|e| SpoolError::Storage(e.to_string()))?;
    txn.open_table(META)
        .spool()?
        .insert(SUMMARY_KEY, bytes.as_slice())
        .spool()?;
    Ok(())
}

pub(crate) fn load_summary(db: &Database) -> Result<AudienceSummary, SpoolError> {
    let txn = db.begin_read().spool()?;
    let meta = txn.open_table(META).spool()?;
    let summary = match meta.get(SUMMARY_KEY).spool()? {
        Some(v) => postcard::from_bytes(v.value())
            .map_err(|e| SpoolError::Corrupt(format!("audience summary: {e}")))?,
        None => AudienceSummary::default(),
    };
    Ok(summary)
}

/// `user`'s membership, `None` when the device holds none.
pub(crate) fn get(db: &Database, user: &str) -> Result<Option<AudienceRecord>, SpoolError> {
    let txn = db.begin_read().spool()?;
    let records = txn.open_table(AUDIENCES).spool()?;
    let record = match records.get(user).spool()? {
        Some(v) => Some(decode(user, v.value())?),
        None => None,
    };
    Ok(record)
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;
    use crate::audiences::check;
    use crate::wire::AudienceUpdate;

    fn db(dir: &std::path::Path) -> Database {
        let db = Database::create(dir.join("a.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap();
        txn.open_table(AUDIENCES).unwrap();
        txn.open_table(AUDIENCE_ORDER).unwrap();
        txn.commit().unwrap();
        db
    }

    fn checked(version: u64, user: &str, audiences: &[&str]) -> CheckedUpdate {
        check(
            AudienceUpdate {
                version,
                user_id: user.into(),
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            },
            &AudienceLimits::default(),
        )
        .unwrap()
    }

    /// Applies in one commit, as the writer does; returns the outcome.
    fn commit_apply(db: &Database, u: &CheckedUpdate, limits: &AudienceLimits) -> Applied {
        let txn = db.begin_write().unwrap();
        let mut summary = load_summary(db).unwrap();
        let applied = apply(&txn, &mut summary, u, limits, 1_000).unwrap();
        save_summary(&txn, &summary).unwrap();
        txn.commit().unwrap();
        applied
    }

    fn users(db: &Database) -> Vec<String> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(AUDIENCES).unwrap();
        t.iter()
            .unwrap()
            .map(|r| r.unwrap().0.value().to_owned())
            .collect()
    }

    #[test]
    fn a_newer_version_replaces_the_set_and_older_or_equal_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let limits = AudienceLimits::default();
        assert_eq!(
            commit_apply(&db, &checked(2, "u1", &["a", "b"]), &limits),
            Applied::Replaced { evicted: 0 }
        );
        assert_eq!(
            commit_apply(&db, &checked(2, "u1", &["zzz"]), &limits),
            Applied::Stale { held: 2 },
            "the same version again (a resend) changes nothing"
        );
        assert_eq!(
            commit_apply(&db, &checked(1, "u1", &[]), &limits),
            Applied::Stale { held: 2 }
        );
        assert_eq!(get(&db, "u1").unwrap().unwrap().audiences, ["a", "b"]);
        assert_eq!(
            commit_apply(&db, &checked(5, "u1", &["c"]), &limits),
            Applied::Replaced { evicted: 0 }
        );
        let r = get(&db, "u1").unwrap().unwrap();
        assert_eq!(
            (r.version, r.audiences.as_slice()),
            (5, &["c".to_owned()][..])
        );
        let s = load_summary(&db).unwrap();
        assert_eq!((s.users, s.version), (1, 5));
        assert_eq!(get(&db, "nobody").unwrap(), None);
    }

    #[test]
    fn the_device_version_is_the_newest_applied_across_users() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let limits = AudienceLimits::default();
        commit_apply(&db, &checked(7, "u1", &["a"]), &limits);
        commit_apply(&db, &checked(3, "u2", &["a"]), &limits);
        let s = load_summary(&db).unwrap();
        assert_eq!((s.users, s.version), (2, 7));
    }

    #[test]
    fn past_the_user_cap_the_least_recently_updated_user_goes() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let limits = AudienceLimits {
            max_users: 3,
            ..AudienceLimits::default()
        };
        for (v, u) in [(1, "u1"), (2, "u2"), (3, "u3")] {
            commit_apply(&db, &checked(v, u, &["a"]), &limits);
        }
        // u1 is updated again: u2 is now the least recently updated.
        commit_apply(&db, &checked(4, "u1", &["b"]), &limits);
        assert_eq!(
            commit_apply(&db, &checked(5, "u4", &["a"]), &limits),
            Applied::Replaced { evicted: 1 }
        );
        assert_eq!(users(&db), ["u1", "u3", "u4"]);
        assert_eq!(
            commit_apply(&db, &checked(6, "u5", &["a"]), &limits),
            Applied::Replaced { evicted: 1 }
        );
        assert_eq!(users(&db), ["u1", "u4", "u5"]);
        let s = load_summary(&db).unwrap();
        assert_eq!((s.users, s.version), (3, 6));
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(AUDIENCE_ORDER).unwrap().len().unwrap(), 3);
    }

    #[test]
    fn removing_a_user_forgets_it_but_keeps_the_device_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let limits = AudienceLimits::default();
        commit_apply(&db, &checked(4, "u1", &["a"]), &limits);
        commit_apply(&db, &checked(5, "u2", &["a"]), &limits);
        let txn = db.begin_write().unwrap();
        let mut s = load_summary(&db).unwrap();
        assert!(remove(&txn, &mut s, "u2").unwrap());
        assert!(
            !remove(&txn, &mut s, "u2").unwrap(),
            "a second purge finds nothing"
        );
        save_summary(&txn, &s).unwrap();
        txn.commit().unwrap();
        assert_eq!(get(&db, "u2").unwrap(), None);
        let s = load_summary(&db).unwrap();
        assert_eq!((s.users, s.version), (1, 5));
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(AUDIENCE_ORDER).unwrap().len().unwrap(), 1);
    }

    #[test]
    fn a_corrupt_record_is_replaced_and_its_stale_order_key_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let limits = AudienceLimits {
            max_users: 2,
            ..AudienceLimits::default()
        };
        commit_apply(&db, &checked(1, "u1", &["a"]), &limits);
        commit_apply(&db, &checked(2, "u2", &["a"]), &limits);
        let txn = db.begin_write().unwrap();
        txn.open_table(AUDIENCES)
            .unwrap()
            .insert("u1", [0xffu8, 0xff, 0xff].as_slice())
            .unwrap();
        txn.commit().unwrap();
        assert!(matches!(get(&db, "u1"), Err(SpoolError::Corrupt(_))));
        // u1 replaced (order key 0 stays behind); then u3 pushes the cap: the stale
        // key 0 must not evict the new u1, u2 goes instead.
        commit_apply(&db, &checked(3, "u1", &["b"]), &limits);
        assert_eq!(
            commit_apply(&db, &checked(4, "u3", &["a"]), &limits),
            Applied::Replaced { evicted: 1 }
        );
        assert_eq!(users(&db), ["u1", "u3"]);
        assert_eq!(get(&db, "u1").unwrap().unwrap().audiences, ["b"]);
    }
}
