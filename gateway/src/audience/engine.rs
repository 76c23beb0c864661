//! The audience engine: a consumer of the resolved event log with its own redb file
//! (`audiences.redb`) and cursor, like a destination.
//!
//! For every resolved event it updates the profile's audience state (occurrences for
//! `did` clauses, a snapshot of the attributes and consent the conditions read),
//! evaluates the audiences, and appends every membership change to a change log in the
//! same commit as its cursor. A sweep every `gateway.audience_sweep` re-evaluates the
//! audiences that change with time alone. Outputs (destinations, devices) read the
//! change log from their own cursors.
//!
//! One writer at a time: event groups, sweep chunks and erasures each take the writer
//! lock, run their redb work on a blocking thread and commit durably before the lock
//! is released, so they never race and a crash never loses or repeats a change.
//!
//! Time is the gateway clock, but never earlier than the latest time already
//! evaluated at (kept in the file): a clock that steps back does not make members
//! flap out and in again.
//!
//! What it does not do: re-read profiles during a sweep. Attributes are as of the
//! profile's last event, so a windowed computed attribute that decays with time alone
//! is seen at the next event of the profile.
//!
//! - `model`: the state per profile and the decisions (pure).
//! - `db`: tables and the single write path.

mod db;
mod model;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{Durability, ReadableDatabase, ReadableTable};
use serde::Serialize;
use tokio::sync::{watch, Mutex as AsyncMutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{AudienceSize, Member, MembershipChange};
use crate::config::{DestinationKind, GatewayConfig};
use crate::profiles::{ProfileView, Profiles};
use crate::store::{RedbFile, Store, StoreError, R};
use db::{Marks, Writes, CHANGES, MEMBERS, SIZES, STATES};
use model::{AudState, Model};

/// File name of the audience store inside the data dir.
pub const AUDIENCES_FILE: &str = "audiences.redb";

/// Name under which the engine holds inbox entries ([`Store::set_done`]).
pub const STAGE_NAME: &str = "@audiences";

/// Most resolved events evaluated in one commit.
const GROUP_MAX: usize = 1000;
/// Most profiles evaluated (and written) per sweep commit.
const SWEEP_CHUNK: usize = 8192;
/// Most states looked at per sweep chunk, so the writer lock is released now and
/// then even when few profiles are due.
const SWEEP_SCAN: usize = 250_000;
/// Most change log entries deleted per commit.
const MAX_PRUNE: usize = 10_000;
/// How often an idle engine prunes the change log.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Retry delays after a storage error.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Page cache of `audiences.redb`: a share of `gateway.cache_size`.
const CACHE_SHARE: u64 = 4;

/// What one sweep did.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct SweepReport {
    pub profiles: u64,
    pub changes: u64,
    pub elapsed_ms: u64,
}

/// What the handle, the run loop and the blocking workers share.
#[derive(Debug)]
struct Inner {
    db: RedbFile,
    model: Model,
    /// The single writer's marks; held for each commit.
    writer: Arc<AsyncMutex<Marks>>,
    /// Newest committed change log seq.
    head: watch::Sender<u64>,
    /// Inbox cursor as committed (mirrors `Marks::cursor` for lock-free reads).
    cursor: AtomicU64,
    /// Latest time evaluated at (mirrors `Marks::now_high`).
    now_high: AtomicI64,
    /// Change log consumers and the seq each is done with; only these are kept.
    consumers: Mutex<BTreeMap<String, u64>>,
    /// The change log holds nothing at or below this.
    pruned: AtomicU64,
    /// Added to the gateway clock (tests move one engine's time on its own).
    clock_offset: AtomicI64,
    sweep_every: Duration,
}

impl Inner {
    /// The engine's time: the gateway clock, never before a time already evaluated at.
    fn now(&self) -> i64 {
        let clock =
            crate::clock::now_ms().saturating_add(self.clock_offset.load(Ordering::Relaxed));
        clock.max(self.now_high.load(Ordering::Relaxed))
    }

    /// Every change log seq all consumers are done with.
    fn prunable(&self) -> u64 {
        self.consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .min()
            .copied()
            .unwrap_or(0)
    }

    /// Opens a durable write transaction.
    fn begin(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate).st()?;
        Ok(txn)
    }

    /// After a commit: publishes the marks.
    fn committed(&self, marks: &Marks, pruned_through: Option<u64>) {
        self.cursor.store(marks.cursor, Ordering::Relaxed);
        self.now_high.fetch_max(marks.now_high, Ordering::Relaxed);
        if let Some(p) = pruned_through {
            self.pruned.fetch_max(p, Ordering::Relaxed);
        }
        let head = marks.next_change.saturating_sub(1);
        self.head.send_if_modified(|h| {
            let moved = *h != head;
            *h = head;
            moved
        });
    }

    /// Prunes the change log within `w` when consumers allow; returns the new
    /// pruned mark to publish after the commit.
    fn prune(&self, w: &mut Writes<'_>) -> Result<Option<u64>, StoreError> {
        let target = self.prunable().min(w.marks.next_change.saturating_sub(1));
        if target <= self.pruned.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = w.prune_changes(target, MAX_PRUNE)?;
        // Fewer than the bound: everything up to `target` is gone.
        Ok((n < MAX_PRUNE).then_some(target))
    }
}

/// Handle to the audience engine.
#[derive(Debug)]
pub struct Audiences {
    inner: Arc<Inner>,
}

impl Audiences {
    /// Opens (creating or recovering) `audiences.redb`; the audiences are compiled
    /// from `config` (already validated).
    pub fn open(path: &Path, config: &GatewayConfig) -> Result<Self, StoreError> {
        let model = Model::new(&config.audiences)
            .map_err(|e| StoreError::Storage(format!("audience definitions: {e}")))?;
        let cache =
            usize::try_from(config.gateway.cache_size.0 / CACHE_SHARE).unwrap_or(usize::MAX);
        let (db, marks) = db::open(path, cache)?;
        let pruned = {
            let r = db.begin_read().st()?;
            let changes = r.open_table(CHANGES).st()?;
            let first = changes.first().st()?.map(|(k, _)| k.value());
            first.map_or(marks.next_change, |k| k).saturating_sub(1)
        };
        // Every commit is durable, so a reopened file holds what `marks` say.
        let db = RedbFile::new(path, db, move |p| db::open(p, cache).map(|(db, _)| db));
        // Consumers that must see every change before it goes: the audience
        // destinations and the device side.
        let consumers = config
            .destinations
            .iter()
            .filter(|d| {
                matches!(
                    d.kind,
                    DestinationKind::AudienceWebhook
                        | DestinationKind::AudienceFile
                        | DestinationKind::AudiencePostgres
                )
            })
            .map(|d| d.name.clone())
            .chain(std::iter::once(super::devices::CONSUMER.to_owned()))
            .map(|name| (name, 0))
            .collect();
        Ok(Audiences {
            inner: Arc::new(Inner {
                db,
                model,
                head: watch::channel(marks.next_change.saturating_sub(1)).0,
                cursor: AtomicU64::new(marks.cursor),
                now_high: AtomicI64::new(marks.now_high),
                writer: Arc::new(AsyncMutex::new(marks)),
                consumers: Mutex::new(consumers),
                pruned: AtomicU64::new(pruned),
                clock_offset: AtomicI64::new(0),
                sweep_every: config.gateway.audience_sweep,
            }),
        })
    }

    /// Consumes the resolved log and sweeps on schedule until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<Store>,
        profiles: Arc<Profiles>,
        shutdown: CancellationToken,
    ) {
        let inner = &self.inner;
        if inner.model.is_empty() {
            // No audiences: nothing to evaluate per event, so the engine does not read
            // the log at all (it would be one more full reader of every event). One
            // sweep lets memberships of audiences since removed from the config leave.
            if let Err(e) = self.sweep_now().await {
                warn!(error = %e, "Audience sweep at start failed.");
            }
            store.set_done(STAGE_NAME, u64::MAX);
            shutdown.cancelled().await;
            return;
        }
        store.set_done(STAGE_NAME, inner.cursor.load(Ordering::Relaxed));
        // Profiles are read as of the events evaluated: only flushed ones (see
        // `profiles::stage`).
        let mut resolved = profiles.flushed();
        // The first sweep runs at once: time passed while the gateway was down, and
        // changed definitions need every profile evaluated again.
        let mut next_sweep = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let result = if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + inner.sweep_every;
                self.sweep_now().await.map(|r| {
                    if r.changes > 0 {
                        info!(
                            profiles = r.profiles,
                            changes = r.changes,
                            elapsed_ms = r.elapsed_ms,
                            "Audience sweep changed memberships."
                        );
                    }
                })
            } else if inner.cursor.load(Ordering::Relaxed) < *resolved.borrow_and_update() {
                self.step(&store, &profiles).await
            } else {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = resolved.changed() => {
                        if r.is_err() {
                            // The profile stage is gone: nothing more will resolve.
                            shutdown.cancelled().await;
                            break;
                        }
                        Ok(())
                    }
                    () = tokio::time::sleep_until(next_sweep.into()) => Ok(()),
                    () = tokio::time::sleep(PRUNE_EVERY) => {
                        if inner.prunable() > inner.pruned.load(Ordering::Relaxed) {
                            self.prune_now().await
                        } else {
                            Ok(())
                        }
                    }
                }
            };
            match result {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    error!(error = %e, retry_in = ?backoff, "Audience engine failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        debug!("Audience engine stopped.");
    }

    /// Runs `work` on a blocking thread holding the writer lock.
    async fn with_writer<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner, &mut OwnedMutexGuard<Marks>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let mut guard = Arc::clone(&self.inner.writer).lock_owned().await;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner, &mut guard))
            .await
            .map_err(|e| StoreError::Storage(format!("audience worker: {e}")))?
    }

    /// Evaluates one group of resolved events and commits it.
    async fn step(&self, store: &Arc<Store>, profiles: &Arc<Profiles>) -> Result<(), StoreError> {
        let (store, profiles) = (Arc::clone(store), Arc::clone(profiles));
        self.with_writer(move |inner, marks| process_group(inner, &store, &profiles, marks))
            .await
    }

    /// Prunes the change log in a commit of its own (nothing else to commit).
    async fn prune_now(&self) -> Result<(), StoreError> {
        self.with_writer(|inner, marks| {
            let txn = inner.begin()?;
            let mut w = Writes::new(&txn, (**marks).clone())?;
            let pruned = inner.prune(&mut w)?;
            let new = w.finish(&txn)?;
            txn.commit().st()?;
            **marks = new;
            inner.committed(marks, pruned);
            Ok(())
        })
        .await
    }

    /// Watches the newest committed position of the membership change log.
    pub fn changes_head(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    /// Up to `max` membership changes after log position `after`, in order.
    pub fn read_changes(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<MembershipChange>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let t = r.open_table(CHANGES).st()?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..).st()?.take(max) {
            let (k, v) = row.st()?;
            let change = postcard::from_bytes(v.value()).map_err(|e| {
                StoreError::Corrupt(format!("membership change {}: {e}", k.value()))
            })?;
            out.push(change);
        }
        Ok(out)
    }

    /// Records that consumer `name` (an audience destination, or
    /// [`super::devices::CONSUMER`]) no longer needs changes at or below `through`;
    /// the log is pruned below every registered consumer's mark.
    pub fn set_changes_done(&self, name: &str, through: u64) {
        let mut consumers = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match consumers.get_mut(name) {
            Some(done) => *done = through,
            // Unknown names hold nothing back: a consumer that stops calling must
            // not keep the log forever.
            None => debug!(
                consumer = name,
                "Change log progress from an unregistered consumer ignored."
            ),
        }
    }

    /// Members of `audience` with profile id above `after_profile`, at most `max`, in
    /// profile id order. `None`: no such audience.
    pub fn members(
        &self,
        audience: &str,
        after_profile: u64,
        max: usize,
    ) -> Result<Option<Vec<Member>>, StoreError> {
        if self.inner.model.audience(audience).is_none() {
            return Ok(None);
        }
        let r = self.inner.db.begin_read()?;
        let members = r.open_table(MEMBERS).st()?;
        let states = r.open_table(STATES).st()?;
        let mut out = Vec::new();
        if after_profile == u64::MAX {
            return Ok(Some(out));
        }
        let range = (audience, after_profile + 1)..=(audience, u64::MAX);
        for row in members.range(range).st()?.take(max) {
            let (k, v) = row.st()?;
            let profile_id = k.value().1;
            let identities = match states.get(profile_id).st()? {
                Some(s) => model::decode(profile_id, s.value())?.identities,
                None => Vec::new(),
            };
            out.push(Member {
                profile_id,
                entered_ms: v.value(),
                identities,
            });
        }
        Ok(Some(out))
    }

    /// Every configured audience with its current size, in config order.
    pub fn sizes(&self) -> Result<Vec<AudienceSize>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let sizes = r.open_table(SIZES).st()?;
        self.inner
            .model
            .audiences()
            .iter()
            .map(|a| {
                Ok(AudienceSize {
                    name: a.name().to_owned(),
                    description: a.description().map(str::to_owned),
                    members: sizes.get(a.name()).st()?.map_or(0, |v| v.value()),
                })
            })
            .collect()
    }

    /// The audiences profile `profile_id` is in now.
    pub fn audiences_of(&self, profile_id: u64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .load(profile_id)?
            .map(|s| s.audiences())
            .unwrap_or_default())
    }

    fn load(&self, profile_id: u64) -> Result<Option<AudState>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let states = r.open_table(STATES).st()?;
        let v = states.get(profile_id).st()?;
        v.map(|v| model::decode(profile_id, v.value())).transpose()
    }

    /// Why profile `profile_id` is or is not in `audience`: the condition tree with
    /// each clause's outcome. `Ok(None)`: no such audience.
    pub fn explain(
        &self,
        audience: &str,
        profile_id: u64,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(a) = self.inner.model.audience(audience) else {
            return Ok(None);
        };
        let state = self.load(profile_id)?.unwrap_or_default();
        let mut why = a.explain(&state, self.inner.now());
        if let Some(obj) = why.as_object_mut() {
            let since = state
                .member
                .iter()
                .find(|(n, _)| n == audience)
                .map(|(_, t)| *t);
            obj.insert("profile_id".into(), profile_id.into());
            obj.insert("member".into(), since.is_some().into());
            obj.insert("member_since_ms".into(), since.into());
        }
        Ok(Some(why))
    }

    /// Re-evaluates every profile against the audiences that change with time alone.
    pub async fn sweep(&self) -> Result<SweepReport, StoreError> {
        self.sweep_now().await
    }

    /// A sweep in chunks, each a commit under the writer lock (event groups go in
    /// between). Evaluates every profile when the definitions changed since the
    /// states were written, else only the profiles that are due.
    async fn sweep_now(&self) -> Result<SweepReport, StoreError> {
        let started = Instant::now();
        let mut report = SweepReport::default();
        let full = self.inner.writer.lock().await.fingerprint != self.inner.model.fingerprint();
        if !full && !self.inner.model.depends_on_time() {
            return Ok(report);
        }
        let mut after: Option<u64> = None;
        loop {
            let (next, profiles, changes) = self
                .with_writer(move |inner, marks| sweep_chunk(inner, marks, after, full))
                .await?;
            report.profiles += profiles;
            report.changes += changes;
            match next {
                Some(pid) => after = Some(pid),
                None => break,
            }
        }
        if full {
            self.with_writer(|inner, marks| {
                let txn = inner.begin()?;
                let mut new = (**marks).clone();
                new.fingerprint = inner.model.fingerprint();
                let w = Writes::new(&txn, new)?;
                let new = w.finish(&txn)?;
                txn.commit().st()?;
                **marks = new;
                Ok(())
            })
            .await?;
            info!(
                profiles = report.profiles,
                changes = report.changes,
                "Audience definitions changed: every profile evaluated again."
            );
        }
        report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// Erasure: the profile leaves every audience (changes logged, so outputs remove
    /// it) and its audience state is deleted.
    pub async fn erase(&self, profile_id: u64) -> Result<u64, StoreError> {
        self.with_writer(move |inner, marks| {
            let txn = inner.begin()?;
            let mut w = Writes::new(&txn, (**marks).clone())?;
            let Some(mut state) = w.load(profile_id)? else {
                return Ok(0);
            };
            let now = inner.now();
            let changes = Model::leave_all(&mut state);
            let n = changes.len() as u64;
            for c in changes {
                w.change(profile_id, &state, c, now)?;
            }
            w.delete(profile_id)?;
            w.marks.now_high = w.marks.now_high.max(now);
            let new = w.finish(&txn)?;
            txn.commit().st()?;
            **marks = new;
            inner.committed(marks, None);
            info!(profile = profile_id, left = n, "Audience state erased.");
            Ok(n)
        })
        .await
    }

    /// Creates audience states for profiles `1..=n`, for benchmarks that need a
    /// populated engine (1M profiles take seconds): each has one occurrence of track
    /// event `event` at `at_ms` for every `did` clause it matches, and customer id
    /// `seed-<p>` as [`Profiles::bulk_seed`] names them; memberships are evaluated at
    /// now. Call before [`Audiences::run`]: it writes beside the engine, not through
    /// it. Blocking.
    pub fn bulk_seed(&self, n: u64, event: &str, at_ms: i64) -> Result<(), StoreError> {
        const CHUNK: u64 = 50_000;
        let inner = &self.inner;
        let mut marks = inner
            .writer
            .try_lock()
            .map_err(|_| StoreError::Storage("bulk_seed: the engine is running".into()))?;
        let mut e = edge_agent::model::Event::new(
            edge_agent::model::EventKind::Track,
            edge_agent::model::Source::Segment,
            at_ms,
        );
        e.name = Some(event.into());
        let now = inner.now();
        let mut p = 1;
        while p <= n {
            let txn = inner.begin()?;
            let mut w = Writes::new(&txn, marks.clone())?;
            for pid in p..=n.min(p + CHUNK - 1) {
                let mut state = AudState {
                    identities: vec![("customer_id".into(), format!("seed-{pid}"))],
                    ..AudState::default()
                };
                inner.model.record(&mut state, &e, at_ms, now);
                let (changes, next_due) = inner.model.evaluate(&mut state, now);
                for c in changes {
                    w.change(pid, &state, c, now)?;
                }
                w.put(pid, &state, next_due)?;
            }
            w.marks.now_high = w.marks.now_high.max(now);
            // Evaluated with these definitions: no full sweep needed.
            w.marks.fingerprint = inner.model.fingerprint();
            let new = w.finish(&txn)?;
            txn.commit().st()?;
            *marks = new;
            inner.committed(&marks, None);
            p = p.saturating_add(CHUNK);
        }
        Ok(())
    }

    /// Moves this engine's time forward by `ms` (tests: one engine's clock without
    /// touching the process-wide one).
    #[cfg(test)]
    pub(crate) fn advance(&self, ms: i64) {
        self.inner.clock_offset.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Work on one profile during a group.
struct Work {
    view: ProfileView,
    state: AudState,
    /// States of profiles merged into this one that were also touched by the group.
    absorbed: Vec<(u64, AudState)>,
}

/// Reads, evaluates and commits one group of resolved events (blocking).
fn process_group(
    inner: &Inner,
    store: &Store,
    profiles: &Profiles,
    marks: &mut Marks,
) -> Result<(), StoreError> {
    let flushed = *profiles.flushed().borrow();
    let page = profiles.read_routed_until(store, marks.cursor, GROUP_MAX, flushed)?;
    if page.through <= marks.cursor {
        return Ok(());
    }
    let now = inner.now();
    let txn = inner.begin()?;
    let mut w = Writes::new(&txn, marks.clone())?;
    // Profiles in order of first event; each evaluated once after all its events.
    let mut order: Vec<u64> = Vec::new();
    let mut work: HashMap<u64, Work> = HashMap::new();
    let mut views: HashMap<u64, Option<u64>> = HashMap::new();
    for routed in &page.events {
        let resolved_id = routed.enrichment.profile_id;
        let survivor = match views.get(&resolved_id) {
            Some(s) => *s,
            None => {
                // Follows merges; `None`: erased since.
                let view = profiles.get(resolved_id)?;
                let s = view.as_ref().map(|v| v.id);
                views.insert(resolved_id, s);
                if let Some(view) = view {
                    match work.get_mut(&view.id) {
                        Some(entry) => entry.view = view,
                        None => {
                            let state = w.load(view.id)?.unwrap_or_default();
                            order.push(view.id);
                            work.insert(
                                view.id,
                                Work {
                                    view,
                                    state,
                                    absorbed: Vec::new(),
                                },
                            );
                        }
                    }
                }
                s
            }
        };
        let Some(entry) = survivor.and_then(|s| work.get_mut(&s)) else {
            continue;
        };
        let record = &routed.record;
        inner.model.record(
            &mut entry.state,
            &record.event,
            record.corrected_timestamp_ms,
            now,
        );
    }
    // A profile touched early in the group may have been merged into one touched
    // later (the profile stage runs ahead): fold it in memory.
    for sid in &order {
        let merged: Vec<u64> = match work.get(sid) {
            Some(entry) => entry.view.merged_from.clone(),
            None => continue,
        };
        for m in merged {
            if m == *sid {
                continue;
            }
            if let Some(loser) = work.remove(&m) {
                if let Some(entry) = work.get_mut(sid) {
                    entry.absorbed.push((m, loser.state));
                    entry.absorbed.extend(loser.absorbed);
                }
            }
        }
    }
    for sid in order {
        let Some(mut entry) = work.remove(&sid) else {
            continue;
        };
        for m in entry.view.merged_from.iter().copied().filter(|m| *m != sid) {
            if entry.absorbed.iter().any(|(id, _)| *id == m) {
                continue;
            }
            if let Some(loser) = w.load(m)? {
                entry.absorbed.push((m, loser));
            }
        }
        for (m, mut loser) in std::mem::take(&mut entry.absorbed) {
            inner.model.merge(&mut entry.state, &loser, now);
            for c in Model::leave_all(&mut loser) {
                w.change(m, &loser, c, now)?;
            }
            w.delete(m)?;
        }
        inner.model.refresh(&mut entry.state, &entry.view);
        let (changes, next_due) = inner.model.evaluate(&mut entry.state, now);
        for c in changes {
            w.change(sid, &entry.state, c, now)?;
        }
        w.put(sid, &entry.state, next_due)?;
    }
    w.marks.cursor = page.through;
    w.marks.now_high = w.marks.now_high.max(now);
    let pruned = inner.prune(&mut w)?;
    let new = w.finish(&txn)?;
    txn.commit().st()?;
    *marks = new;
    inner.committed(marks, pruned);
    store.set_done(STAGE_NAME, marks.cursor);
    Ok(())
}

/// One sweep chunk (blocking): profiles after `after` that are due (all with
/// `full`), evaluated at now and committed. Returns where to continue (`None`: done),
/// profiles evaluated and changes made.
fn sweep_chunk(
    inner: &Inner,
    marks: &mut Marks,
    after: Option<u64>,
    full: bool,
) -> Result<(Option<u64>, u64, u64), StoreError> {
    let now = inner.now();
    let start = after.map_or(0, |a| a.saturating_add(1));
    if after == Some(u64::MAX) {
        return Ok((None, 0, 0));
    }
    // Read what is due with a read transaction (cheap), then write it.
    let mut due: Vec<(u64, AudState)> = Vec::new();
    let mut last = None;
    let mut scanned = 0usize;
    {
        let r = inner.db.begin_read()?;
        let states = r.open_table(STATES).st()?;
        for row in states.range(start..).st()? {
            let (k, v) = row.st()?;
            let pid = k.value();
            last = Some(pid);
            scanned += 1;
            let bytes = v.value();
            if full || model::next_due(bytes) <= now {
                match model::decode(pid, bytes) {
                    Ok(s) => due.push((pid, s)),
                    // One bad record must not stop every sweep: it is left alone.
                    Err(e) => warn!(error = %e, "Skipping an audience state that does not decode."),
                }
            }
            if due.len() >= SWEEP_CHUNK || scanned >= SWEEP_SCAN {
                break;
            }
        }
    }
    let more = scanned >= SWEEP_SCAN || due.len() >= SWEEP_CHUNK;
    let next = if more { last } else { None };
    if due.is_empty() {
        return Ok((next, 0, 0));
    }
    let txn = inner.begin()?;
    let mut w = Writes::new(&txn, marks.clone())?;
    let evaluated = due.len() as u64;
    for (pid, mut state) in due {
        let (changes, next_due) = inner.model.evaluate(&mut state, now);
        for c in changes {
            w.change(pid, &state, c, now)?;
        }
        w.put(pid, &state, next_due)?;
    }
    let changed = w.appended;
    w.marks.now_high = w.marks.now_high.max(now);
    let pruned = inner.prune(&mut w)?;
    let new = w.finish(&txn)?;
    txn.commit().st()?;
    *marks = new;
    inner.committed(marks, pruned);
    Ok((next, evaluated, changed))
}
