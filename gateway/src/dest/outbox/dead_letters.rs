//! The dead-letter table: events a destination refused for good (4xx other than
//! 408/429), kept in the gateway store until replayed.
//!
//! | table          | key                         | value                      |
//! |----------------|-----------------------------|----------------------------|
//! | `dead_letters` | (destination, id: `u64`)    | postcard [`StoredLetter`]  |
//!
//! Ids grow per destination in order of arrival. The whole routed record (event and
//! enrichment) is kept, not only the refused body, so a replay after a config fix
//! renders it again with the fixed config.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, TableError};
use serde::{Deserialize, Serialize};

use crate::dest::DeadLetter;
use crate::profiles::{Enrichment, Routed};
use crate::store::{InboxRecord, Store, StoreError, R};

const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");

/// One dead letter as stored. Field order is the stored encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLetter {
    pub at_ms: i64,
    pub reason: String,
    /// The refused body (JSON text), as shown by the admin API.
    pub body: String,
    /// Inbox seq of the event.
    pub seq: u64,
    pub record: InboxRecord,
    pub enrichment: Enrichment,
}

impl StoredLetter {
    pub fn new(routed: &Routed, body: &serde_json::Value, reason: &str, at_ms: i64) -> Self {
        Self::with_json(routed, &body.to_string(), reason, at_ms)
    }

    /// A dead letter whose refused body is already JSON text.
    pub fn with_json(routed: &Routed, body: &str, reason: &str, at_ms: i64) -> Self {
        Self {
            at_ms,
            reason: reason.to_owned(),
            body: body.to_owned(),
            seq: routed.seq,
            record: InboxRecord::clone(&routed.record),
            enrichment: routed.enrichment.clone(),
        }
    }

    /// The routed record, to render again.
    pub fn routed(&self) -> Routed {
        Routed {
            seq: self.seq,
            record: std::sync::Arc::new(self.record.clone()),
            enrichment: self.enrichment.clone(),
        }
    }

    fn view(&self, id: u64) -> DeadLetter {
        DeadLetter {
            id,
            event_id: self.record.event.id.to_string(),
            at_ms: self.at_ms,
            reason: self.reason.clone(),
            body: serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null),
        }
    }
}

fn encode(letter: &StoredLetter) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(letter).map_err(|e| StoreError::Storage(format!("dead letter: {e}")))
}

fn decode(dest: &str, id: u64, bytes: &[u8]) -> Result<StoredLetter, StoreError> {
    postcard::from_bytes(bytes)
        .map_err(|e| StoreError::Corrupt(format!("dead letter {dest}/{id}: {e}")))
}

/// Appends `letters` to `dest`'s dead letters in one commit; returns their ids.
pub async fn add(
    store: &Store,
    dest: &str,
    letters: Vec<StoredLetter>,
) -> Result<Vec<u64>, StoreError> {
    let dest = dest.to_owned();
    let encoded = letters.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    store
        .apply(move |txn| {
            let mut t = txn.open_table(DEAD_LETTERS).st()?;
            let last = t
                .range((dest.as_str(), 0)..=(dest.as_str(), u64::MAX))
                .st()?
                .next_back()
                .transpose()
                .st()?
                .map_or(0, |(k, _)| k.value().1);
            let mut ids = Vec::with_capacity(encoded.len());
            for (i, bytes) in encoded.iter().enumerate() {
                let id = last + 1 + i as u64;
                t.insert((dest.as_str(), id), bytes.as_slice()).st()?;
                ids.push(id);
            }
            Ok(ids)
        })
        .await
}

/// Replaces dead letter `id` (a replay refused again: new reason and body).
pub async fn update(
    store: &Store,
    dest: &str,
    id: u64,
    letter: StoredLetter,
) -> Result<(), StoreError> {
    let dest = dest.to_owned();
    let bytes = encode(&letter)?;
    store
        .apply(move |txn| {
            txn.open_table(DEAD_LETTERS)
                .st()?
                .insert((dest.as_str(), id), bytes.as_slice())
                .st()?;
            Ok(())
        })
        .await
}

/// Deletes dead letters `ids` of `dest` in one commit.
pub async fn remove(store: &Store, dest: &str, ids: Vec<u64>) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let dest = dest.to_owned();
    store
        .apply(move |txn| {
            let mut t = txn.open_table(DEAD_LETTERS).st()?;
            for id in ids {
                t.remove((dest.as_str(), id)).st()?;
            }
            Ok(())
        })
        .await
}

/// GDPR erasure: deletes every dead letter (of any destination) whose event was
/// resolved to `profile_id` or carries one of `identities`; returns how many.
pub async fn erase(
    store: &Store,
    profile_id: u64,
    identities: Vec<(String, String)>,
) -> Result<u64, StoreError> {
    store
        .apply(move |txn| {
            let mut t = txn.open_table(DEAD_LETTERS).st()?;
            let mut doomed: Vec<(String, u64)> = Vec::new();
            for row in t.iter().st()? {
                let (k, v) = row.st()?;
                let (dest, id) = k.value();
                // An undecodable letter cannot be matched; it stays for an operator.
                let Ok(letter) = postcard::from_bytes::<StoredLetter>(v.value()) else {
                    continue;
                };
                let e = &letter.enrichment;
                let ids = &letter.record.event.identities;
                let own = [ids.user_id.as_deref(), ids.anonymous_id.as_deref()];
                let held = |(t, v): &(String, String)| {
                    e.identities.iter().any(|(et, ev)| et == t && ev == v)
                        || own.contains(&Some(v.as_str()))
                };
                if e.profile_id == profile_id || identities.iter().any(held) {
                    doomed.push((dest.to_owned(), id));
                }
            }
            for (dest, id) in &doomed {
                t.remove((dest.as_str(), *id)).st()?;
            }
            Ok(doomed.len() as u64)
        })
        .await
}

/// Up to `limit` stored dead letters of `dest` with ids above `after`, in id order.
pub fn load(
    store: &Store,
    dest: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<(u64, StoredLetter)>, StoreError> {
    store.read(|r| {
        let t = match r.open_table(DEAD_LETTERS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e).st(),
        };
        let mut out = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok(out);
        };
        for row in t.range((dest, from)..=(dest, u64::MAX)).st()?.take(limit) {
            let (k, v) = row.st()?;
            let id = k.value().1;
            out.push((id, decode(dest, id, v.value())?));
        }
        Ok(out)
    })
}

/// The admin view of [`load`].
pub fn list(
    store: &Store,
    dest: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    Ok(load(store, dest, after, limit)?
        .into_iter()
        .map(|(id, l)| l.view(id))
        .collect())
}

/// How many dead letters `dest` has.
pub fn count(store: &Store, dest: &str) -> Result<u64, StoreError> {
    store.read(|r| {
        let t = match r.open_table(DEAD_LETTERS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e).st(),
        };
        // Fast path for the usual case: no dead letters at all.
        if t.is_empty().st()? {
            return Ok(0);
        }
        let mut n = 0;
        for row in t.range((dest, 0)..=(dest, u64::MAX)).st()? {
            row.st()?;
            n += 1;
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use edge_agent::model::{DeviceId, Event, EventKind, Source};

    use super::*;

    fn routed(seq: u64) -> Routed {
        let mut event = Event::new(EventKind::Track, Source::Segment, 1);
        event.id = edge_agent::model::EventId(u128::from(seq));
        Routed {
            seq,
            record: std::sync::Arc::new(InboxRecord {
                sender: DeviceId("d".into()),
                received_ms: 1,
                corrected_timestamp_ms: 1,
                event,
            }),
            enrichment: Enrichment::default(),
        }
    }

    fn letter(seq: u64, reason: &str) -> StoredLetter {
        StoredLetter::new(&routed(seq), &serde_json::json!({ "seq": seq }), reason, 5)
    }

    #[tokio::test]
    async fn letters_are_kept_per_destination_in_order_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20, &[]).unwrap();
        assert_eq!(count(&store, "a").unwrap(), 0);
        assert!(list(&store, "a", 0, 10).unwrap().is_empty());
        let ids = add(&store, "a", vec![letter(1, "400"), letter(2, "400")])
            .await
            .unwrap();
        assert_eq!(ids, [1, 2]);
        assert_eq!(add(&store, "ab", vec![letter(3, "x")]).await.unwrap(), [1]);
        assert_eq!(add(&store, "a", vec![letter(4, "y")]).await.unwrap(), [3]);
        assert_eq!(count(&store, "a").unwrap(), 3);
        assert_eq!(count(&store, "ab").unwrap(), 1);
        let page = list(&store, "a", 1, 10).unwrap();
        assert_eq!(page.iter().map(|l| l.id).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(page[0].body, serde_json::json!({ "seq": 2 }));
        assert_eq!(page[1].reason, "y");
        update(&store, "a", 2, letter(2, "again")).await.unwrap();
        remove(&store, "a", vec![1, 3]).await.unwrap();
        let left = load(&store, "a", 0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].0, left[0].1.reason.as_str()), (2, "again"));
        assert_eq!(left[0].1.routed(), routed(2));
        assert!(load(&store, "a", u64::MAX, 10).unwrap().is_empty());
        store.close().await;
    }

    #[tokio::test]
    async fn erasure_removes_a_profiles_letters_in_every_destination() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20, &[]).unwrap();
        let of = |seq: u64, profile: u64, user: &str| {
            let mut r = routed(seq);
            r.enrichment.profile_id = profile;
            std::sync::Arc::make_mut(&mut r.record)
                .event
                .identities
                .user_id = Some(user.into());
            StoredLetter::new(&r, &serde_json::json!({}), "400", 5)
        };
        add(&store, "a", vec![of(1, 7, "ada"), of(2, 8, "bob")])
            .await
            .unwrap();
        add(&store, "b", vec![of(3, 9, "ada"), of(4, 8, "bob")])
            .await
            .unwrap();
        let ids = vec![("customer_id".to_owned(), "ada".to_owned())];
        assert_eq!(erase(&store, 7, ids).await.unwrap(), 2);
        let left = |d: &str| -> Vec<u64> {
            load(&store, d, 0, 10)
                .unwrap()
                .iter()
                .map(|(_, l)| l.seq)
                .collect()
        };
        assert_eq!((left("a"), left("b")), (vec![2], vec![4]));
        store.close().await;
    }
}
