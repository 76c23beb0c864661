//! Identity resolution and profiles: the stage after the inbox.
//!
//! Its own redb file (`profiles.redb`) with its own writer, so resolving never waits
//! on the receive path's commits. The stage reads the inbox in order after its cursor,
//! resolves each event's identifiers to a profile (merging when an event links two,
//! never across different values of a unique type), updates attributes, computed
//! attributes and consent, and writes per inbox seq the [`Enrichment`] destinations
//! attach — all with its cursor in one commit.
//!
//! Destinations read [`Profiles::read_routed`]: inbox records up to the resolved head,
//! each with its enrichment. Erased profiles' events are gone from both. Readers that
//! keep up get them from memory (`tail`), decoded once by the stage.
//!
//! - `identity`: which identifiers an event carries, and the resolution rules (pure).
//! - `profile`: the stored profile, one event's effect on it, merging two (pure).
//! - `computed`: computed attribute state, windows as time buckets (pure).
//! - `stage`: the resolver task (the only writer), erase, bulk seeding.
//! - `db`: tables and encodings of `profiles.redb`.
//! - `tail`: the newest resolved groups in memory, for readers that keep up.

mod computed;
mod db;
mod identity;
mod profile;
mod stage;
mod tail;

pub use tail::TAIL_EVENTS;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::clock::now_ms;
use edge_agent::model::{DeviceId, Str, Value};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::config::GatewayConfig;
use crate::store::{InboxRecord, RedbFile, Store, StoreError, R};

use computed::Spec;
use identity::{canonical_type, Rules};
use stage::EraseRequest;

/// File name of the profile store inside the data dir.
pub const PROFILES_FILE: &str = "profiles.redb";

/// Name under which the profile stage holds inbox entries ([`Store::set_done`]).
pub const STAGE_NAME: &str = "@profiles";

/// A profile's consent as last stated by its user.
#[derive(Debug, Clone, PartialEq, Default, Serialize, serde::Deserialize)]
pub struct ProfileConsent {
    /// Purposes granted (declared names).
    pub granted: Vec<Str>,
    /// Purposes explicitly denied.
    pub denied: Vec<Str>,
    pub ccpa_opt_out: bool,
    /// When this state was stated (event time), ms since the epoch; 0 = never.
    pub updated_ms: i64,
}

/// What the profile stage decided for one event, as of the moment it was resolved.
#[derive(Debug, Clone, PartialEq, Default, Serialize, serde::Deserialize)]
pub struct Enrichment {
    pub profile_id: u64,
    /// The profile's identifiers `(type, value)` (all types; destinations cut them to
    /// their allowlist).
    pub identities: Vec<(Str, Str)>,
    /// Profile attributes and computed attributes named by some destination's
    /// `attributes` allowlist (only those: nothing else is kept per event).
    pub attributes: Vec<(Str, Value)>,
    pub consent: ProfileConsent,
}

/// An inbox record ready for destinations.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// Inbox seq.
    pub seq: u64,
    /// Shared with the inbox's in-memory tail and other readers.
    pub record: Arc<InboxRecord>,
    pub enrichment: Enrichment,
}

/// A page of [`Routed`] records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutedPage {
    /// Every inbox seq up to here was looked at (events erased meanwhile are skipped):
    /// the cursor to save once `events` are delivered.
    pub through: u64,
    /// Shared with the stage's in-memory tail and other readers.
    pub events: Vec<Arc<Routed>>,
}

/// A profile as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ProfileView {
    pub id: u64,
    pub identities: Vec<(Str, Str)>,
    pub attributes: Vec<(Str, Value)>,
    pub computed: Vec<(String, Value)>,
    pub consent: ProfileConsent,
    /// Devices (agent ids) the profile's events came from.
    pub devices: Vec<String>,
    /// Profiles merged into this one.
    pub merged_from: Vec<u64>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub events: u64,
}

/// What an erase removed, for the caller to propagate.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Erased {
    pub profile_id: u64,
    pub identities: Vec<(Str, Str)>,
    /// Devices that held the user: each gets a `PurgeUser` per entry of `user_ids`.
    pub devices: Vec<DeviceId>,
    /// The user's customer ids and anonymous ids, as agents know them.
    pub user_ids: Vec<String>,
    /// Queued events (inbox, not yet delivered) removed.
    pub queued_removed: u64,
}

/// Erase requests that may wait for the stage.
const ERASE_QUEUE: usize = 16;

/// What the handle and the stage share.
#[derive(Debug)]
struct Shared {
    db: RedbFile,
    rules: Rules,
    specs: Vec<Spec>,
    /// Union of the destinations' `attributes` allowlists, sorted: what an
    /// [`Enrichment`] keeps.
    allow: Vec<String>,
    /// Highest inbox seq resolved and committed.
    resolved: watch::Sender<u64>,
    /// Highest inbox seq whose profile changes are in the file (see `stage`).
    flushed: watch::Sender<u64>,
    /// Highest inbox seq a reader waits to see flushed ([`Profiles::settle_reads`]).
    flush_wanted: AtomicU64,
    /// Wakes an idle stage for `flush_wanted`.
    flush_request: Notify,
    /// The newest resolved groups (see `tail`).
    tail: Mutex<tail::Tail>,
}

/// Handle to the profile store and its stage.
#[derive(Debug)]
pub struct Profiles {
    shared: Arc<Shared>,
    erase_tx: mpsc::Sender<EraseRequest>,
    /// Taken by [`Profiles::run`].
    erase_rx: Mutex<Option<mpsc::Receiver<EraseRequest>>>,
}

impl Profiles {
    /// Opens (creating or recovering) `profiles.redb` at `path`.
    pub fn open(path: &Path, config: &GatewayConfig) -> Result<Self, StoreError> {
        // Half the page cache budget (the inbox store and audiences.redb a quarter
        // each): profile writes touch pages all over the file, while the inbox store
        // mostly appends and is read from memory. Pages beyond it are read through the
        // OS page cache, which RSS does not count.
        let cache = usize::try_from(config.gateway.cache_size.0 / 2).unwrap_or(usize::MAX);
        let db = db::open(path, cache)?;
        Self::open_file(RedbFile::new(path, db, move |p| db::open(p, cache)), config)
    }

    /// [`Profiles::open`] on a file already open (tests put it on a disk of their own).
    fn open_file(db: RedbFile, config: &GatewayConfig) -> Result<Self, StoreError> {
        let cursor = {
            let r = db.begin_read()?;
            let meta = r.open_table(db::META).st()?;
            db::meta_get(&meta, db::CURSOR)?
        };
        let mut allow: Vec<String> = config
            .destinations
            .iter()
            .filter_map(|d| d.attributes.as_ref())
            .flatten()
            .cloned()
            .collect();
        allow.sort();
        allow.dedup();
        let (erase_tx, erase_rx) = mpsc::channel(ERASE_QUEUE);
        Ok(Profiles {
            shared: Arc::new(Shared {
                db,
                rules: Rules::new(&config.identity),
                specs: config.computed.iter().map(Spec::new).collect(),
                allow,
                resolved: watch::channel(cursor).0,
                flushed: watch::channel(cursor).0,
                flush_wanted: AtomicU64::new(0),
                flush_request: Notify::new(),
                tail: Mutex::new(tail::Tail::new(tail::TAIL_EVENTS)),
            }),
            erase_tx,
            erase_rx: Mutex::new(Some(erase_rx)),
        })
    }

    /// Resolves inbox records until `shutdown`.
    pub async fn run(self: Arc<Self>, store: Arc<Store>, shutdown: CancellationToken) {
        let taken = self
            .erase_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(erases) = taken else {
            error!("The profile stage was started twice; the second start does nothing.");
            return;
        };
        stage::run(Arc::clone(&self.shared), erases, store, shutdown).await;
    }

    /// Watches the highest inbox seq resolved (and committed).
    pub fn resolved(&self) -> watch::Receiver<u64> {
        self.shared.resolved.subscribe()
    }

    /// Watches the highest inbox seq whose profile changes are readable: profiles
    /// ([`Profiles::get`], [`Profiles::lookup`]) reflect every event up to it.
    pub fn flushed(&self) -> watch::Receiver<u64> {
        self.shared.flushed.subscribe()
    }

    /// Waits until profiles ([`Profiles::get`], [`Profiles::lookup`]) reflect every
    /// event resolved so far, at most `timeout`; false when that passed. Changes are
    /// flushed in bulk (every [`stage::FLUSH_EVERY`] when the stage has caught up);
    /// a reader waiting here gets a flush right away.
    pub async fn settle_reads(&self, timeout: std::time::Duration) -> bool {
        let target = *self.shared.resolved.borrow();
        let mut flushed = self.shared.flushed.subscribe();
        if *flushed.borrow_and_update() >= target {
            return true;
        }
        self.shared.flush_wanted.fetch_max(target, Ordering::AcqRel);
        self.shared.flush_request.notify_one();
        tokio::time::timeout(timeout, flushed.wait_for(|f| *f >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Up to `max` resolved records after inbox seq `after`, with their enrichment.
    pub fn read_routed(
        &self,
        store: &Store,
        after: u64,
        max: usize,
    ) -> Result<RoutedPage, StoreError> {
        let head = *self.shared.resolved.borrow();
        self.read_routed_until(store, after, max, head)
    }

    /// [`Profiles::read_routed`] up to inbox seq `until` at most (a reader that must
    /// not run ahead of [`Profiles::flushed`]).
    pub fn read_routed_until(
        &self,
        store: &Store,
        after: u64,
        max: usize,
        until: u64,
    ) -> Result<RoutedPage, StoreError> {
        let head = until.min(*self.shared.resolved.borrow());
        if after >= head || max == 0 {
            return Ok(RoutedPage {
                through: after,
                events: Vec::new(),
            });
        }
        let cached = self
            .shared
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(after, max, head);
        if let Some(page) = cached {
            return Ok(page);
        }
        let records = store.read_inbox(after, max)?;
        let read_all = records.len() < max || records.last().is_some_and(|(s, _)| *s > head);
        let r = self.shared.db.begin_read()?;
        let table = r.open_table(db::ENRICHED).st()?;
        let mut enriched = db::EnrichedReader::new(&table, after)?;
        let mut page = RoutedPage {
            through: after,
            events: Vec::with_capacity(records.len()),
        };
        for (seq, record) in records {
            if seq > head {
                break;
            }
            page.through = seq;
            // No row: the event was erased after it was resolved.
            if let Some(enrichment) = enriched.take(seq)? {
                page.events.push(Arc::new(Routed {
                    seq,
                    record: Arc::new(record),
                    enrichment,
                }));
            }
        }
        if read_all {
            // Every record up to `head` was in this read: the rest were erased.
            page.through = head;
        }
        Ok(page)
    }

    /// The profile holding identifier `(id_type, value)`, if any.
    pub fn lookup(&self, id_type: &str, value: &str) -> Result<Option<ProfileView>, StoreError> {
        let ty = canonical_type(id_type);
        let Some(value) = self.shared.rules.normalize(ty, value) else {
            return Ok(None);
        };
        let mut key = String::new();
        db::id_key(&mut key, ty, &value);
        let r = self.shared.db.begin_read()?;
        let ids = r.open_table(db::IDS).st()?;
        let Some(pid) = ids.get(key.as_str()).st()?.map(|v| v.value()) else {
            return Ok(None);
        };
        let profiles = r.open_table(db::PROFILES).st()?;
        Ok(db::load_profile(&profiles, pid)?.map(|p| p.view(&self.shared.specs, now_ms())))
    }

    /// A profile by id (following merges to the survivor).
    pub fn get(&self, profile_id: u64) -> Result<Option<ProfileView>, StoreError> {
        let r = self.shared.db.begin_read()?;
        let merged = r.open_table(db::MERGED).st()?;
        let id = db::follow_merges(&merged, profile_id)?;
        let profiles = r.open_table(db::PROFILES).st()?;
        Ok(db::load_profile(&profiles, id)?.map(|p| p.view(&self.shared.specs, now_ms())))
    }

    /// Profiles stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        stage::count(&self.shared)
    }

    /// GDPR erasure of the profile holding `(id_type, value)`: the profile, its
    /// identity links, and its queued inbox events are deleted. Serialized with the
    /// stage, so no event of the user is being resolved meanwhile. Needs the stage
    /// running ([`Profiles::run`]); the stage uses the store it was started with.
    pub async fn erase(
        &self,
        _store: &Store,
        id_type: &str,
        value: &str,
    ) -> Result<Option<Erased>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.erase_tx
            .send(EraseRequest {
                id_type: id_type.to_owned(),
                value: value.to_owned(),
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Creates `n` profiles in large transactions, for benchmarks that need a
    /// populated store (1M profiles take seconds). Profile `p` holds customer id
    /// `seed-<p>` and anonymous id `seed-anon-<p>`. Call before [`Profiles::run`]:
    /// it writes beside the stage, not through it. Blocking.
    pub fn bulk_seed(&self, n: u64) -> Result<(), StoreError> {
        stage::bulk_seed(&self.shared, n)
    }
}
