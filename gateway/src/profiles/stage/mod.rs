//! The profile stage: the only writer of `profiles.redb`.
//!
//! It reads the inbox after its cursor in groups, resolves a whole group in one
//! transaction together with the new cursor (so a crash at any moment neither loses
//! nor double-counts an event), then publishes the resolved head.
//!
//! Profile changes are written back, not through: every group commits its events'
//! `enriched` rows, but the changed profiles, identifier links and merges — with the
//! cursor they correspond to — stay in memory ([`Pending`], pinned in the cache) until
//! a flush: when [`CHECKPOINT_EVERY`] has passed, when the stage has caught up with
//! the inbox and [`FLUSH_EVERY`] has passed, when a reader waits for the changes
//! ([`super::Profiles::settle_reads`]), before an erase, or when
//! [`MAX_PENDING_PROFILES`] profiles wait. A profile
//! touched by many groups is thus written once per flush, not once per group (with
//! active users spread over a million stored profiles, each write is a random page).
//! The file always holds a consistent state: profiles, links and cursor of the last
//! flush, plus `enriched` rows beyond it, which resolving those records again rewrites
//! identically.
//!
//! Durability is checkpointed: a flush is `Durability::Immediate` when the last durable
//! commit is older than [`CHECKPOINT_EVERY`], every other commit `Durability::None`. A
//! crash reverts the file to the last durable commit, cursor included, and the stage
//! resolves those inbox records again — the same way, because resolution is a function
//! of the records in order and the reverted state (profile ids come from the reverted
//! counter). A failed commit does the same without a crash: memory is dropped and the
//! stage starts again from the flushed cursor. The inbox keeps the records: the stage
//! reports only its *durable* cursor to the store as done. This is what keeps random
//! access over millions of profiles fast: one fsync of the touched pages per second
//! instead of per group. Erase requests are handled between groups, so no event of the user is being
//! resolved meanwhile. Redb work runs on blocking threads, never on the runtime; the
//! loop (`pipeline`) reads the next group while the current one resolves.
//!
//! Hot profiles and identifier links are cached between groups ([`Cache`]), bounded
//! (entries with pending changes are never evicted); the cache holds what is committed
//! plus the pending changes, and is dropped when a commit fails. Readers of profiles
//! (admin lookups, the audience engine) see the flushed state; the audience engine
//! reads events only up to the flushed cursor ([`super::Profiles::flushed`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use edge_agent::model::DeviceId;
use redb::{Durability, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use tokio::sync::oneshot;
use tracing::info;

mod pipeline;

pub use pipeline::run;

use super::db::{self, id_key, CURSOR, ENRICHED, IDS, MERGED, META, NEXT_PROFILE, PROFILES};
use super::identity::{self, canonical_type, Ident, Target, ANONYMOUS_ID, CUSTOMER_ID};
use super::profile::Profile;
use super::{Enrichment, Erased, Shared};
use crate::store::{InboxRecord, Store, StoreError, INBOX, R};

/// Most inbox records resolved in one commit.
pub const GROUP_MAX: usize = 2000;
/// Most `enriched_groups` rows pruned by one commit.
const MAX_PRUNE_GROUPS: usize = 512;
/// Cached profiles kept between groups, pending ones included. Decoded, one takes
/// about 2 KiB (measured: 100,000 of them held some 175 MiB of RSS more than 20,000);
/// it holds the active users of a busy site (the benchmark's 10,000), and over many
/// more users a cache of any affordable size hits rarely anyway; profiles read again
/// come from redb's page cache.
const MAX_CACHED_PROFILES: usize = 16_000;
/// Cached identifier lookups (hits and misses) kept between groups: the identifiers
/// of the active users (three or so each) with room for the pending links
/// ([`MAX_PENDING_IDS`], never evicted). About 100 bytes each.
const MAX_CACHED_IDS: usize = 100_000;
/// Changed profiles that make the stage flush (pinned in the cache meanwhile, so
/// fewer than [`MAX_CACHED_PROFILES`]).
pub const MAX_PENDING_PROFILES: usize = 12_000;
/// Changed identifier links that make the stage flush.
const MAX_PENDING_IDS: usize = 65_536;
/// Retry delays after a storage error.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An erase waiting for the stage.
#[derive(Debug)]
pub struct EraseRequest {
    pub id_type: String,
    pub value: String,
    pub reply: oneshot::Sender<Result<Option<Erased>, StoreError>>,
}

/// Profiles and links as committed (plus, during a group, its uncommitted changes).
#[derive(Debug, Default)]
struct Cache {
    /// `ids` key → profile; `None` = known not linked.
    ids: HashMap<String, Option<u64>>,
    profiles: HashMap<u64, Profile>,
    /// Scratch for building keys.
    key: String,
}

/// What the groups since the last flush changed, written by the next flush (each
/// touched profile once).
#[derive(Debug, Default)]
struct Pending {
    /// The next new profile's id; 0 until read from `meta`.
    next_profile: u64,
    dirty_profiles: HashSet<u64>,
    dirty_ids: HashSet<String>,
    /// Profiles merged away: their rows go.
    removed: Vec<u64>,
    /// `(merged profile, survivor)`.
    merged: Vec<(u64, u64)>,
    /// The inbox seq these changes go up to: the cursor a flush writes.
    through: u64,
}

impl Pending {
    fn new(through: u64) -> Self {
        Pending {
            through,
            ..Pending::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.dirty_profiles.is_empty()
            && self.dirty_ids.is_empty()
            && self.removed.is_empty()
            && self.merged.is_empty()
    }

    /// After a flush: nothing pending (the id counter stays known).
    fn flushed(&mut self) {
        *self = Pending {
            next_profile: self.next_profile,
            through: self.through,
            ..Pending::default()
        };
    }
}

struct Tables<'t> {
    ids: Table<'t, &'static str, u64>,
    profiles: Table<'t, u64, &'static [u8]>,
    merged: Table<'t, u64, u64>,
    enriched: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            ids: txn.open_table(IDS).st()?,
            profiles: txn.open_table(PROFILES).st()?,
            merged: txn.open_table(MERGED).st()?,
            enriched: txn.open_table(ENRICHED).st()?,
            meta: txn.open_table(META).st()?,
        })
    }
}

/// Longest time resolved groups stay non-durable (see the module doc).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Least time between flushes made because the stage caught up with the inbox. A
/// flush writes every profile changed since the last one, each to its own page when
/// active users are spread over millions of profiles: flushing at every catch-up
/// (many times a second under load) wrote the same profiles over and over. A reader
/// that needs the changes ([`super::Profiles::settle_reads`]) gets a flush at once.
/// As long as a checkpoint's interval, so under load the two coincide (measured
/// with 10,000 active users over 1M profiles: 500 ms gave 4 % less, flushing at
/// every catch-up 12 % less).
pub const FLUSH_EVERY: Duration = CHECKPOINT_EVERY;

/// Resolves groups of inbox records into `profiles.redb`.
#[derive(Debug)]
pub struct Resolver {
    shared: Arc<Shared>,
    cache: Cache,
    /// Changes not yet in the file (see the module doc).
    pending: Pending,
    /// When the last durable commit happened.
    last_durable: std::time::Instant,
    /// When the last flush happened.
    last_flush: std::time::Instant,
    /// The cursor as of the last durable commit: what a crash would revert to.
    pub durable_through: u64,
    /// The cursor in the file: profiles and links there include everything up to it.
    pub flushed_through: u64,
    /// The file's [`RedbFile::generation`] this state was built on.
    generation: u64,
}

impl Resolver {
    /// A resolver over a file whose cursor is `flushed`, durable up to `durable`.
    pub fn new(shared: Arc<Shared>, flushed: u64, durable: u64) -> Self {
        Resolver {
            cache: Cache::default(),
            pending: Pending::new(flushed),
            last_durable: std::time::Instant::now(),
            last_flush: std::time::Instant::now(),
            durable_through: durable.min(flushed),
            flushed_through: flushed,
            generation: shared.db.generation(),
            shared,
        }
    }

    /// How long until a flush is due: [`FLUSH_EVERY`] after the last, or now when a
    /// reader waits for changes not flushed yet.
    pub fn until_flush_due(&self) -> Duration {
        if self.reader_waits() {
            return Duration::ZERO;
        }
        FLUSH_EVERY.saturating_sub(self.last_flush.elapsed())
    }

    /// A reader waits for changes beyond the flushed cursor.
    fn reader_waits(&self) -> bool {
        self.shared
            .flush_wanted
            .load(std::sync::atomic::Ordering::Acquire)
            > self.flushed_through
    }

    /// True once `profiles.redb` was reopened after an I/O failure: the file went
    /// back to its last durable commit, so this state (cursors, pending changes,
    /// cache) no longer matches it. Start a new resolver from the file's cursor.
    pub fn is_stale(&self) -> bool {
        self.shared.db.generation() != self.generation
    }

    /// A write transaction on the file this state was built on.
    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let txn = self.shared.db.begin_write()?;
        if self.is_stale() {
            return Err(StoreError::Storage(
                "profiles.redb was reopened after an I/O failure; resolving again from its cursor"
                    .into(),
            ));
        }
        Ok(txn)
    }

    /// Writes what is pending and makes every commit so far durable. On failure
    /// nothing changed, in memory or in the file: call again later.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        if self.durable_through >= self.pending.through && self.pending.is_empty() {
            return Ok(());
        }
        let mut txn = self.begin_write()?;
        set_durability(&mut txn, true)?;
        {
            let mut t = Tables::open(&txn)?;
            self.write_pending(&mut t, &mut Vec::new())?;
        }
        txn.commit().st()?;
        self.after_flush(true);
        Ok(())
    }

    /// Forgets everything cached and pending (after a failed commit or an erase): the
    /// caller resolves again from [`Resolver::flushed_through`].
    pub fn clear(&mut self) {
        self.cache.ids.clear();
        self.cache.profiles.clear();
        self.pending = Pending::new(self.flushed_through);
    }

    /// Resolves `records` (inbox seqs after the last group, up to `through`) and
    /// commits their enrichment; flushes when due: when a checkpoint is, when too
    /// much is pending, when a reader waits, or when `caught_up` (the group ends at
    /// the inbox head) and [`FLUSH_EVERY`] has passed; prunes `enriched` rows at or below `prune_through`. `now`
    /// dates windowed computed attributes. Returns each record's enrichment, in order.
    /// On failure everything pending is dropped (see [`Resolver::clear`]).
    pub fn resolve_group(
        &mut self,
        records: &[(u64, Arc<InboxRecord>)],
        through: u64,
        prune_through: u64,
        now: i64,
        caught_up: bool,
    ) -> Result<Vec<Enrichment>, StoreError> {
        let result = self.try_resolve_group(records, through, prune_through, now, caught_up);
        if result.is_err() {
            self.clear();
        } else {
            let pending = &self.pending;
            evict(&mut self.cache.ids, MAX_CACHED_IDS, |k| {
                !pending.dirty_ids.contains(k)
            });
            evict(&mut self.cache.profiles, MAX_CACHED_PROFILES, |k| {
                !pending.dirty_profiles.contains(k)
            });
        }
        result
    }

    fn try_resolve_group(
        &mut self,
        records: &[(u64, Arc<InboxRecord>)],
        through: u64,
        prune_through: u64,
        now: i64,
        caught_up: bool,
    ) -> Result<Vec<Enrichment>, StoreError> {
        let durable = self.last_durable.elapsed() >= CHECKPOINT_EVERY;
        let mut enrichments = Vec::with_capacity(records.len());
        let mut txn = self.begin_write()?;
        set_durability(&mut txn, durable)?;
        let flush;
        {
            let mut t = Tables::open(&txn)?;
            if self.pending.next_profile == 0 {
                self.pending.next_profile = db::meta_get(&t.meta, NEXT_PROFILE)?.max(1);
            }
            for (_, record) in records {
                enrichments.push(self.resolve_one(&t, record, now)?);
            }
            let mut buf = Vec::new();
            write_enriched(&mut t.enriched, records, &enrichments, &mut buf)?;
            self.pending.through = through;
            flush = durable
                || (caught_up && self.until_flush_due().is_zero())
                || self.reader_waits()
                || self.pending.dirty_profiles.len() >= MAX_PENDING_PROFILES
                || self.pending.dirty_ids.len() >= MAX_PENDING_IDS;
            if flush {
                self.write_pending(&mut t, &mut buf)?;
            }
            prune_enriched(&mut t.enriched, prune_through)?;
        }
        txn.commit().st()?;
        if flush {
            self.after_flush(durable);
        }
        Ok(enrichments)
    }

    /// Bookkeeping once a commit holding [`Resolver::write_pending`] succeeded.
    fn after_flush(&mut self, durable: bool) {
        self.last_flush = std::time::Instant::now();
        self.flushed_through = self.pending.through;
        self.pending.flushed();
        if durable {
            self.last_durable = std::time::Instant::now();
            self.durable_through = self.flushed_through;
        }
    }

    fn resolve_one(
        &mut self,
        t: &Tables<'_>,
        record: &InboxRecord,
        now: i64,
    ) -> Result<Enrichment, StoreError> {
        let Resolver {
            shared,
            cache,
            pending: g,
            ..
        } = self;
        let rules = &shared.rules;
        let mut idents: Vec<Ident<'_>> = Vec::with_capacity(6);
        rules.identifiers(&record.event, &mut idents);
        if idents.is_empty() {
            return Ok(Enrichment::default());
        }
        let mut found: Vec<Option<u64>> = Vec::with_capacity(idents.len());
        for id in &idents {
            // An identifier a profile found so far holds is linked to that profile
            // (invariant 1 of `db`, kept by the cache too): no lookup. Most events
            // carry identifiers of one profile, so this saves all lookups but one.
            let held = found.iter().flatten().copied().find(|p| {
                cache
                    .profiles
                    .get(p)
                    .is_some_and(|pr| pr.has_identity(id.ty, &id.value))
            });
            if held.is_some() {
                found.push(held);
                continue;
            }
            let mut p = cache.lookup(t, id.ty, &id.value)?;
            // A link to a missing profile (a damaged file) counts as no link; the
            // identifier is linked afresh below, which repairs it.
            if let Some(pid) = p {
                if !cache.load(t, pid)? {
                    p = None;
                }
            }
            found.push(p);
        }
        let plan = identity::plan(&idents, &found, rules.unique_types(), |p, ty| {
            cache.profiles.get(&p).and_then(|pr| pr.value_of(ty))
        });
        let target = match plan.target {
            Target::Nobody => return Ok(Enrichment::default()),
            Target::New => {
                let id = g.next_profile;
                g.next_profile = id.saturating_add(1);
                cache
                    .profiles
                    .insert(id, Profile::new(id, record.received_ms));
                id
            }
            Target::Existing(id) => id,
        };
        for loser in plan.merge {
            cache.merge(shared, g, target, loser, now);
        }
        for i in plan.link {
            let Some(id) = idents.get(i) else { continue };
            let Some(p) = cache.profiles.get_mut(&target) else {
                continue;
            };
            let full = p.identities.len() >= rules.max_identities;
            let taken = id.unique && p.value_of(id.ty).is_some();
            if full || taken || p.has_identity(id.ty, &id.value) {
                continue;
            }
            p.identities.push((id.ty.into(), id.value.as_ref().into()));
            cache.set_link(g, id.ty, &id.value, Some(target));
        }
        let Some(profile) = cache.profiles.get_mut(&target) else {
            return Err(StoreError::Corrupt(format!(
                "profile {target} vanished while resolving"
            )));
        };
        profile.apply_event(record, &shared.specs, now);
        g.dirty_profiles.insert(target);
        Ok(profile.enrichment(&shared.allow, &shared.specs, now))
    }

    /// Writes the pending changes and their cursor (not yet committed).
    fn write_pending(&self, t: &mut Tables<'_>, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let g = &self.pending;
        // In key order: consecutive inserts walk neighbouring B-tree pages (hot in
        // the cache, often the same leaf) instead of jumping across the whole file.
        let mut profiles: Vec<u64> = g.dirty_profiles.iter().copied().collect();
        profiles.sort_unstable();
        for id in &profiles {
            if let Some(p) = self.cache.profiles.get(id) {
                buf.clear();
                *buf = postcard::to_extend(p, std::mem::take(buf))
                    .map_err(|e| StoreError::Storage(format!("encode profile {id}: {e}")))?;
                t.profiles.insert(*id, buf.as_slice()).st()?;
            }
        }
        for id in &g.removed {
            t.profiles.remove(*id).st()?;
        }
        let mut keys: Vec<&String> = g.dirty_ids.iter().collect();
        keys.sort_unstable();
        for key in keys {
            match self.cache.ids.get(key) {
                Some(Some(p)) => {
                    t.ids.insert(key.as_str(), *p).st()?;
                }
                Some(None) => {
                    t.ids.remove(key.as_str()).st()?;
                }
                None => {}
            }
        }
        for (loser, survivor) in &g.merged {
            t.merged.insert(*loser, *survivor).st()?;
        }
        if g.next_profile > 0 {
            t.meta.insert(NEXT_PROFILE, g.next_profile).st()?;
        }
        t.meta.insert(CURSOR, g.through).st()?;
        Ok(())
    }
}

impl Cache {
    fn lookup(&mut self, t: &Tables<'_>, ty: &str, value: &str) -> Result<Option<u64>, StoreError> {
        id_key(&mut self.key, ty, value);
        if let Some(v) = self.ids.get(self.key.as_str()) {
            return Ok(*v);
        }
        let v = t.ids.get(self.key.as_str()).st()?.map(|g| g.value());
        self.ids.insert(self.key.clone(), v);
        Ok(v)
    }

    /// Makes sure profile `id` is cached; false when it does not exist.
    fn load(&mut self, t: &Tables<'_>, id: u64) -> Result<bool, StoreError> {
        if self.profiles.contains_key(&id) {
            return Ok(true);
        }
        match db::load_profile(&t.profiles, id)? {
            Some(p) => {
                self.profiles.insert(id, p);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn set_link(&mut self, g: &mut Pending, ty: &str, value: &str, to: Option<u64>) {
        id_key(&mut self.key, ty, value);
        self.ids.insert(self.key.clone(), to);
        g.dirty_ids.insert(self.key.clone());
    }

    /// Merges `loser` into `survivor` (both cached): links re-pointed, the loser's
    /// row removed, `merged` entries kept one hop long.
    fn merge(&mut self, shared: &Shared, g: &mut Pending, survivor: u64, loser: u64, now: i64) {
        if survivor == loser || !self.profiles.contains_key(&survivor) {
            return;
        }
        let Some(lost) = self.profiles.remove(&loser) else {
            return;
        };
        for (ty, value) in &lost.identities {
            self.set_link(g, ty, value, Some(survivor));
        }
        g.merged.push((loser, survivor));
        for earlier in &lost.merged_from {
            g.merged.push((*earlier, survivor));
        }
        g.removed.push(loser);
        g.dirty_profiles.remove(&loser);
        let dropped = match self.profiles.get_mut(&survivor) {
            Some(p) => p.merge(lost, &shared.specs, shared.rules.max_identities, now),
            None => Vec::new(),
        };
        for (ty, value) in dropped {
            self.set_link(g, &ty, &value, None);
        }
        g.dirty_profiles.insert(survivor);
    }
}

/// Brings `map` back to three quarters of `cap` once it is above it, dropping
/// arbitrary entries that `evictable` allows (in effect random: cheaper than tracking
/// recency, and a hot entry dropped is simply read again).
fn evict<K, V>(map: &mut HashMap<K, V>, cap: usize, evictable: impl Fn(&K) -> bool) {
    if map.len() <= cap {
        return;
    }
    let mut excess = map.len() - cap / 4 * 3;
    map.retain(|k, _| {
        if excess == 0 || !evictable(k) {
            return true;
        }
        excess -= 1;
        false
    });
}

fn set_durability(txn: &mut WriteTransaction, durable: bool) -> Result<(), StoreError> {
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(|e| StoreError::Storage(format!("profiles: durability: {e}")))
}

/// Replaces whatever `enriched_groups` holds from the group's first seq on (rows of
/// an attempt that failed after committing them: resolving again rewrites them, and
/// rows must not overlap) with the group's rows.
fn write_enriched(
    t: &mut Table<'_, u64, &'static [u8]>,
    records: &[(u64, Arc<InboxRecord>)],
    enrichments: &[Enrichment],
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let Some((first, _)) = records.first() else {
        return Ok(());
    };
    t.retain_in(*first.., |_, _| false).st()?;
    let rows: Vec<(u64, &Enrichment)> = records
        .iter()
        .zip(enrichments)
        .map(|((seq, _), e)| (*seq, e))
        .collect();
    for chunk in rows.chunks(db::ROW_EVENTS) {
        db::write_group(t, chunk, buf)?;
    }
    Ok(())
}

/// Deletes the group rows wholly at or below `through`, a bounded number per commit.
fn prune_enriched(t: &mut Table<'_, u64, &'static [u8]>, through: u64) -> Result<(), StoreError> {
    let mut left = MAX_PRUNE_GROUPS;
    t.retain_in(..=through, |_, _| {
        let keep = left == 0;
        left = left.saturating_sub(1);
        keep
    })
    .st()
}

/// Removes `seqs` (ascending) from the group rows holding them.
fn remove_enriched(t: &mut Table<'_, u64, &'static [u8]>, seqs: &[u64]) -> Result<(), StoreError> {
    let mut buf = Vec::new();
    let mut at = 0;
    while let Some(&seq) = seqs.get(at) {
        let (key, mut group) = {
            let Some(row) = t.range(seq..).st()?.next() else {
                break;
            };
            let (k, v) = row.st()?;
            (k.value(), db::decode_group(k.value(), v.value())?)
        };
        // Every seq up to this row's key is in this row or in none.
        let end = at + seqs[at..].partition_point(|s| *s <= key);
        let gone = &seqs[at..end];
        group.retain(|(s, _)| gone.binary_search(s).is_err());
        t.remove(key).st()?;
        let rows: Vec<(u64, &Enrichment)> = group.iter().map(|(s, e)| (*s, e)).collect();
        db::write_group(t, &rows, &mut buf)?;
        at = end;
    }
    Ok(())
}

/// What an erase found before anything is deleted.
#[derive(Debug)]
struct EraseTarget {
    profile: Profile,
    /// Inbox seqs resolved to the profile (or one merged into it) and still enriched.
    seqs: Vec<u64>,
    /// `ids` keys of its identifiers.
    keys: HashSet<String>,
}

fn find_erase(
    shared: &Shared,
    id_type: &str,
    value: &str,
) -> Result<Option<EraseTarget>, StoreError> {
    let ty = canonical_type(id_type);
    let Some(value) = shared.rules.normalize(ty, value) else {
        return Ok(None);
    };
    let mut key = String::new();
    id_key(&mut key, ty, &value);
    let r = shared.db.begin_read()?;
    let ids = r.open_table(IDS).st()?;
    let Some(pid) = ids.get(key.as_str()).st()?.map(|v| v.value()) else {
        return Ok(None);
    };
    let profiles = r.open_table(PROFILES).st()?;
    let Some(profile) = db::load_profile(&profiles, pid)? else {
        return Ok(None);
    };
    let enriched = r.open_table(ENRICHED).st()?;
    let mut seqs = Vec::new();
    for row in enriched.iter().st()? {
        let (k, v) = row.st()?;
        for (seq, e) in db::decode_group(k.value(), v.value())? {
            if e.profile_id != 0
                && (e.profile_id == pid || profile.merged_from.contains(&e.profile_id))
            {
                seqs.push(seq);
            }
        }
    }
    let keys = profile
        .identities
        .iter()
        .map(|(t, v)| {
            let mut k = String::new();
            id_key(&mut k, t, v);
            k
        })
        .collect();
    Ok(Some(EraseTarget {
        profile,
        seqs,
        keys,
    }))
}

/// Deletes from the inbox every record in `seqs` or carrying one of `keys`; returns
/// the seqs removed. Runs inside the store's writer (one scan of the inbox).
fn erase_inbox(
    shared: Arc<Shared>,
    seqs: Vec<u64>,
    keys: HashSet<String>,
) -> impl FnOnce(&WriteTransaction) -> Result<Vec<u64>, StoreError> + Send + 'static {
    move |txn| {
        let mut inbox = txn.open_table(INBOX).st()?;
        let mut removed = Vec::new();
        let mut key = String::new();
        inbox
            .retain(|seq, bytes| {
                let listed = seqs.binary_search(&seq).is_ok();
                let carries = !listed
                    && postcard::from_bytes::<InboxRecord>(bytes).is_ok_and(|rec| {
                        let mut idents = Vec::new();
                        shared.rules.identifiers(&rec.event, &mut idents);
                        idents.iter().any(|i| {
                            id_key(&mut key, i.ty, &i.value);
                            keys.contains(&key)
                        })
                    });
                if listed || carries {
                    removed.push(seq);
                    false
                } else {
                    true
                }
            })
            .st()?;
        Ok(removed)
    }
}

/// Deletes the profile, its links, the merges into it and its `enriched` rows.
fn erase_profile(shared: &Shared, target: &EraseTarget, removed: &[u64]) -> Result<(), StoreError> {
    let pid = target.profile.id;
    let mut txn = shared.db.begin_write()?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::Storage(format!("profiles: durability: {e}")))?;
    {
        let mut t = Tables::open(&txn)?;
        for key in &target.keys {
            t.ids.remove(key.as_str()).st()?;
        }
        t.profiles.remove(pid).st()?;
        t.merged
            .retain(|loser, survivor| {
                survivor != pid && !target.profile.merged_from.contains(&loser)
            })
            .st()?;
        let mut seqs: Vec<u64> = target.seqs.iter().chain(removed).copied().collect();
        seqs.sort_unstable();
        seqs.dedup();
        remove_enriched(&mut t.enriched, &seqs)?;
    }
    txn.commit().st()
}

/// Runs an erase; the caller clears the resolver's cache afterwards.
async fn erase(
    shared: &Arc<Shared>,
    store: &Store,
    id_type: String,
    value: String,
) -> Result<Option<Erased>, StoreError> {
    let sh = Arc::clone(shared);
    let found = tokio::task::spawn_blocking(move || find_erase(&sh, &id_type, &value))
        .await
        .map_err(|e| StoreError::Storage(format!("erase: {e}")))??;
    let Some(mut target) = found else {
        return Ok(None);
    };
    target.seqs.sort_unstable();
    let removed = store
        .apply(erase_inbox(
            Arc::clone(shared),
            target.seqs.clone(),
            target.keys.clone(),
        ))
        .await?;
    let sh = Arc::clone(shared);
    let (target, removed) = tokio::task::spawn_blocking(move || {
        erase_profile(&sh, &target, &removed).map(|()| (target, removed))
    })
    .await
    .map_err(|e| StoreError::Storage(format!("erase: {e}")))??;
    let profile = target.profile;
    let user_ids = profile
        .identities
        .iter()
        .filter(|(t, _)| t == CUSTOMER_ID || t == ANONYMOUS_ID)
        .map(|(_, v)| v.to_string())
        .collect();
    info!(
        profile = profile.id,
        queued = removed.len(),
        "Profile erased."
    );
    Ok(Some(Erased {
        profile_id: profile.id,
        identities: profile.identities,
        devices: profile.devices.into_iter().map(DeviceId).collect(),
        user_ids,
        queued_removed: removed.len() as u64,
    }))
}

fn load_cursor(shared: &Shared) -> Result<u64, StoreError> {
    let r = shared.db.begin_read()?;
    let meta = r.open_table(META).st()?;
    db::meta_get(&meta, CURSOR)
}

/// Creates `n` profiles (customer id `seed-<p>`, anonymous id `seed-anon-<p>`) in
/// large transactions, for benchmarks that need a populated store. Not while the
/// stage runs: it writes next to it.
pub fn bulk_seed(shared: &Shared, n: u64) -> Result<(), StoreError> {
    const CHUNK: u64 = 50_000;
    let mut done = 0;
    let mut key = String::new();
    let mut buf = Vec::new();
    while done < n {
        let txn = shared.db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            let mut next = db::meta_get(&t.meta, NEXT_PROFILE)?.max(1);
            let now = now_ms();
            for _ in 0..CHUNK.min(n - done) {
                let id = next;
                next += 1;
                let mut p = Profile::new(id, now);
                p.identities = vec![
                    (CUSTOMER_ID.into(), format!("seed-{id}").into()),
                    (ANONYMOUS_ID.into(), format!("seed-anon-{id}").into()),
                ];
                for (ty, v) in &p.identities {
                    id_key(&mut key, ty, v);
                    t.ids.insert(key.as_str(), id).st()?;
                }
                buf.clear();
                buf = postcard::to_extend(&p, std::mem::take(&mut buf))
                    .map_err(|e| StoreError::Storage(format!("encode profile: {e}")))?;
                t.profiles.insert(id, buf.as_slice()).st()?;
                done += 1;
            }
            t.meta.insert(NEXT_PROFILE, next).st()?;
        }
        txn.commit().st()?;
    }
    Ok(())
}

/// Profiles stored.
pub fn count(shared: &Shared) -> Result<u64, StoreError> {
    let r = shared.db.begin_read()?;
    r.open_table(PROFILES).st()?.len().st()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overfull_cache_is_cut_to_three_quarters_and_a_full_one_is_kept() {
        let mut m: HashMap<u64, ()> = (0..1000).map(|i| (i, ())).collect();
        evict(&mut m, 1000, |_| true);
        assert_eq!(m.len(), 1000);
        m.insert(1000, ());
        evict(&mut m, 1000, |_| true);
        assert_eq!(m.len(), 750);
    }

    #[test]
    fn entries_with_pending_changes_are_never_evicted() {
        let mut m: HashMap<u64, ()> = (0..1001).map(|i| (i, ())).collect();
        evict(&mut m, 1000, |k| *k >= 900);
        assert_eq!(m.len(), 900, "only the 101 evictable entries could go");
        assert!((0..900).all(|k| m.contains_key(&k)));
    }

    mod enriched_rows {
        use super::*;
        use crate::profiles::db::{EnrichedReader, ENRICHED};
        use edge_agent::model::{Event, EventKind, Source};
        use redb::{Database, ReadableDatabase};

        fn records(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, Arc<InboxRecord>)> {
            seqs.into_iter()
                .map(|seq| {
                    let event = Event::new(EventKind::Track, Source::Segment, 1);
                    let record = InboxRecord {
                        sender: DeviceId("d".into()),
                        received_ms: 1,
                        corrected_timestamp_ms: 1,
                        event,
                    };
                    (seq, Arc::new(record))
                })
                .collect()
        }

        /// Enrichment `seq` was given by attempt `attempt`.
        fn enrichments(recs: &[(u64, Arc<InboxRecord>)], attempt: u64) -> Vec<Enrichment> {
            recs.iter()
                .map(|(seq, _)| Enrichment {
                    profile_id: seq * 10 + attempt,
                    ..Enrichment::default()
                })
                .collect()
        }

        fn write(db: &Database, f: impl FnOnce(&mut Table<'_, u64, &'static [u8]>)) {
            let txn = db.begin_write().unwrap();
            f(&mut txn.open_table(ENRICHED).unwrap());
            txn.commit().unwrap();
        }

        /// `(seq, profile id)` of every enrichment, by a reader from the start.
        fn all(db: &Database) -> Vec<(u64, u64)> {
            let r = db.begin_read().unwrap();
            let t = r.open_table(ENRICHED).unwrap();
            let mut reader = EnrichedReader::new(&t, 0).unwrap();
            (1..=100)
                .filter_map(|seq| reader.take(seq).unwrap().map(|e| (seq, e.profile_id)))
                .collect()
        }

        fn group(db: &Database, seqs: std::ops::RangeInclusive<u64>, attempt: u64) {
            let recs = records(seqs);
            let e = enrichments(&recs, attempt);
            write(db, |t| {
                write_enriched(t, &recs, &e, &mut Vec::new()).unwrap()
            });
        }

        #[test]
        fn resolving_again_with_other_group_bounds_replaces_the_failed_attempts_rows() {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join("p.redb")).unwrap();
            group(&db, 1..=10, 1);
            group(&db, 11..=20, 1);
            group(&db, 21..=30, 1);
            // The stage failed after 11..=30 and starts again from 10, grouping anew.
            group(&db, 11..=25, 2);
            let expected: Vec<(u64, u64)> = (1..=10)
                .map(|s| (s, s * 10 + 1))
                .chain((11..=25).map(|s| (s, s * 10 + 2)))
                .collect();
            assert_eq!(all(&db), expected, "nothing of the failed attempt is left");
        }

        #[test]
        fn removed_seqs_leave_their_groups_and_pruning_drops_whole_groups() {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join("p.redb")).unwrap();
            group(&db, 1..=10, 0);
            group(&db, 11..=20, 0);
            group(&db, 21..=30, 0);
            write(&db, |t| {
                remove_enriched(
                    t,
                    &[3, 10, 11, 12, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 99],
                )
                .unwrap()
            });
            let left: Vec<u64> = all(&db).into_iter().map(|(s, _)| s).collect();
            let expected: Vec<u64> = [1, 2, 4, 5, 6, 7, 8, 9]
                .into_iter()
                .chain(13..=20)
                .collect();
            assert_eq!(left, expected);
            // Through 15: only the row ending at 9 is wholly below it.
            write(&db, |t| prune_enriched(t, 15).unwrap());
            let left: Vec<u64> = all(&db).into_iter().map(|(s, _)| s).collect();
            assert_eq!(left, (13..=20).collect::<Vec<u64>>());
        }
    }
}
