//! The one writer: a dedicated thread that applies queued commands in groups, each
//! group in one redb transaction committed with `Durability::Immediate` (group
//! commit), then answers every waiter. Nothing is answered before its commit.
//!
//! A failed commit answers the whole group with the error, reopens the file and
//! reloads the counters from it, so the agent recovers instead of wedging.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use redb::{Durability, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::stats::SpoolStats;
use super::store::{
    decode_event, lane_def, lane_table, CONSENT, DEVICES, DEVICE_COUNTS, ERASURES_KEY, META,
    STATS_KEY,
};
use super::{audiences, AppendOutcome, Prepared, RedbResultExt, Shared, SpoolError, UserPurge};
use crate::audiences::{Applied, CheckedUpdate};
use crate::config::WhenFull;
use crate::enrich::DeviceState;
use crate::model::{DeviceId, Seq};

/// Most commands folded into one transaction.
pub(crate) const MAX_GROUP: usize = 128;

/// Most expired events removed by one sweep, to keep each transaction short.
const MAX_SWEEP: usize = 10_000;

pub(crate) enum Command {
    Append(Prepared, oneshot::Sender<Result<AppendOutcome, SpoolError>>),
    Remove {
        lane: String,
        seqs: Vec<Seq>,
        /// Count the removed events as `invalid` drops (refused by the gateway).
        invalid: bool,
        reply: oneshot::Sender<Result<usize, SpoolError>>,
    },
    Sweep {
        now_ms: i64,
        reply: oneshot::Sender<Result<u64, SpoolError>>,
    },
    /// Erase a user's queued events and consent (see [`super::Spool::purge_user`]).
    PurgeUser {
        user_id: String,
        devices: Vec<(DeviceId, DeviceState)>,
        reply: oneshot::Sender<Result<UserPurge, SpoolError>>,
    },
    /// Replace a user's audience membership (see [`super::Spool::apply_audiences`]).
    Audiences {
        update: CheckedUpdate,
        now_ms: i64,
        reply: oneshot::Sender<Result<Applied, SpoolError>>,
    },
    /// Finish what is queued before this, then exit.
    Stop,
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome, SpoolError>>,
        Result<AppendOutcome, SpoolError>,
    ),
    Remove(oneshot::Sender<Result<usize, SpoolError>>, usize),
    Sweep(oneshot::Sender<Result<u64, SpoolError>>, u64),
    Purge(oneshot::Sender<Result<UserPurge, SpoolError>>, UserPurge),
    Audiences(oneshot::Sender<Result<Applied, SpoolError>>, Applied),
}

impl Reply {
    fn send(self) {
        // A waiter that went away (client disconnected) needs no answer.
        match self {
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Remove(tx, n) => drop(tx.send(Ok(n))),
            Reply::Sweep(tx, n) => drop(tx.send(Ok(n))),
            Reply::Purge(tx, n) => drop(tx.send(Ok(n))),
            Reply::Audiences(tx, a) => drop(tx.send(Ok(a))),
        }
    }

    fn fail(self, e: &SpoolError) {
        match self {
            Reply::Append(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Remove(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Sweep(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Purge(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Audiences(tx, _) => drop(tx.send(Err(e.clone()))),
        }
    }
}

pub(crate) fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Command>, mut stats: SpoolStats) {
    loop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(cmd) => group.push(cmd),
                Err(_) => break,
            }
        }
        let stop_at = group.iter().position(|c| matches!(c, Command::Stop));
        if let Some(at) = stop_at {
            // Anything queued after Stop is refused; its senders see `Closed`.
            group.truncate(at);
        }
        if !group.is_empty() {
            commit_group(&shared, &mut stats, group);
        }
        if stop_at.is_some() {
            rx.close();
            break;
        }
    }
}

fn commit_group(shared: &Shared, stats: &mut SpoolStats, group: Vec<Command>) {
    let mut tentative = stats.clone();
    let mut erasures = *shared
        .erasures
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let erasures_before = erasures;
    let mut audience_summary = *shared
        .audiences
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let audience_summary_before = audience_summary;
    let mut replies = Vec::with_capacity(group.len());
    let mut pending = group.into_iter();
    let result = shared.store.with_db(|db| {
        let mut txn = db.begin_write().spool()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| SpoolError::Storage(e.to_string()))?;
        for cmd in pending.by_ref() {
            match cmd {
                Command::Append(req, tx) => match append(shared, &txn, &mut tentative, req) {
                    Ok(outcome) => replies.push(Reply::Append(tx, Ok(outcome))),
                    Err(e) if e.is_request_level() => replies.push(Reply::Append(tx, Err(e))),
                    Err(e) => {
                        replies.push(Reply::Append(tx, Err(e.clone())));
                        return Err(e);
                    }
                },
                // The failing command's own waiter gets the error too, not `Closed`.
                Command::Remove {
                    lane,
                    seqs,
                    invalid,
                    reply,
                } => match remove(shared, &txn, &mut tentative, &lane, &seqs) {
                    Ok(n) => {
                        if invalid {
                            tentative.drops.invalid += n as u64;
                        }
                        replies.push(Reply::Remove(reply, n));
                    }
                    Err(e) if e.is_request_level() => drop(reply.send(Err(e))),
                    Err(e) => {
                        drop(reply.send(Err(e.clone())));
                        return Err(e);
                    }
                },
                Command::Sweep { now_ms, reply } => {
                    match sweep(shared, &txn, &mut tentative, now_ms) {
                        Ok(n) => replies.push(Reply::Sweep(reply, n)),
                        Err(e) => {
                            drop(reply.send(Err(e.clone())));
                            return Err(e);
                        }
                    }
                }
                Command::PurgeUser {
                    user_id,
                    devices,
                    reply,
                } => match purge_user(
                    shared,
                    &txn,
                    &mut tentative,
                    &mut audience_summary,
                    &user_id,
                    &devices,
                ) {
                    Ok(purged) => {
                        erasures.purges += 1;
                        erasures.events += purged.events;
                        replies.push(Reply::Purge(reply, purged));
                    }
                    Err(e) => {
                        drop(reply.send(Err(e.clone())));
                        return Err(e);
                    }
                },
                Command::Audiences {
                    update,
                    now_ms,
                    reply,
                } => match audiences::apply(
                    &txn,
                    &mut audience_summary,
                    &update,
                    &shared.audience_limits,
                    now_ms,
                ) {
                    Ok(applied) => replies.push(Reply::Audiences(reply, applied)),
                    Err(e) => {
                        drop(reply.send(Err(e.clone())));
                        return Err(e);
                    }
                },
                Command::Stop => {}
            }
        }
        if audience_summary != audience_summary_before {
            audiences::save_summary(&txn, &audience_summary)?;
        }
        if erasures != erasures_before {
            let encoded =
                postcard::to_stdvec(&erasures).map_err(|e| SpoolError::Storage(e.to_string()))?;
            txn.open_table(META)
                .spool()?
                .insert(ERASURES_KEY, encoded.as_slice())
                .spool()?;
        }
        let encoded =
            postcard::to_stdvec(&tentative).map_err(|e| SpoolError::Storage(e.to_string()))?;
        txn.open_table(META)
            .spool()?
            .insert(STATS_KEY, encoded.as_slice())
            .spool()?;
        txn.commit().spool()
    });
    match result {
        Ok(()) => {
            *stats = tentative;
            *shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = stats.clone();
            *shared
                .erasures
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = erasures;
            *shared
                .audiences
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = audience_summary;
            shared.committed.send_replace(stats.next_seq);
            for r in replies {
                r.send();
            }
            maybe_compact(shared, stats);
        }
        Err(e) => {
            error!(error = %e, "Spool commit failed; nothing in this group was acknowledged.");
            for r in replies {
                r.fail(&e);
            }
            // Commands not reached before the failure get the same answer.
            for cmd in pending {
                fail_command(cmd, &e);
            }
            recover(shared, stats);
        }
    }
}

fn fail_command(cmd: Command, e: &SpoolError) {
    match cmd {
        Command::Append(_, tx) => drop(tx.send(Err(e.clone()))),
        Command::Remove { reply, .. } => drop(reply.send(Err(e.clone()))),
        Command::Sweep { reply, .. } => drop(reply.send(Err(e.clone()))),
        Command::PurgeUser { reply, .. } => drop(reply.send(Err(e.clone()))),
        Command::Audiences { reply, .. } => drop(reply.send(Err(e.clone()))),
        Command::Stop => {}
    }
}

fn recover(shared: &Shared, stats: &mut SpoolStats) {
    match shared
        .store
        .reopen()
        .and_then(|()| shared.store.load_stats())
    {
        Ok(fresh) => {
            *stats = fresh;
            *shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = stats.clone();
            info!("Spool file reopened after a failed commit.");
        }
        // The next command tries again; until then requests get `Unavailable`.
        Err(e) => error!(error = %e, "Spool file could not be reopened."),
    }
}

fn maybe_compact(shared: &Shared, stats: &mut SpoolStats) {
    // Compact once a large drain is over, not in the middle of it: compaction stops
    // every read and write, and pages freed meanwhile are reused, so the file does not
    // grow while a backlog is still queued.
    if stats.removed_since_compact < shared.compact_after
        || stats.queued_bytes() > shared.compact_after
    {
        return;
    }
    stats.removed_since_compact = 0;
    match shared
        .store
        .with_db_mut(|db| db.compact().map_err(|e| SpoolError::Storage(e.to_string())))
    {
        Ok(_) => {
            *shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = stats.clone();
            info!(path = %shared.store.path().display(), "Spool file compacted after a large drain.")
        }
        Err(e) => warn!(error = %e, "Spool compaction failed; will retry after the next drain."),
    }
}

fn append(
    shared: &Shared,
    txn: &WriteTransaction,
    stats: &mut SpoolStats,
    req: Prepared,
) -> Result<AppendOutcome, SpoolError> {
    // Consent changes are the user's decision: kept even if the events are refused.
    for change in &req.consent {
        let state =
            postcard::to_stdvec(&change.state).map_err(|e| SpoolError::Storage(e.to_string()))?;
        txn.open_table(CONSENT)
            .spool()?
            .insert(change.subject.as_str(), state.as_slice())
            .spool()?;
        if !change.revoked.is_empty() {
            purge(shared, txn, stats, &change.subject, &change.revoked)?;
        }
    }
    stats.drops.consent_denied += req.denied;
    for (device, state) in &req.devices {
        let bytes = postcard::to_stdvec(state).map_err(|e| SpoolError::Storage(e.to_string()))?;
        txn.open_table(DEVICES)
            .spool()?
            .insert(device.0.as_str(), bytes.as_slice())
            .spool()?;
    }

    let mut seq = stats.next_seq;
    let mut encoded = req.encoded;
    let invalid = req.invalid;
    let mut need: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seqs = Vec::with_capacity(encoded.len());
    for e in &mut encoded {
        set_seq(&mut e.bytes, e.seq_at, seq);
        seqs.push(seq);
        seq += 1;
    }
    for e in &encoded {
        let Some(lane) = shared.lane(&e.lane) else {
            return Err(SpoolError::UnknownLane(e.lane.clone()));
        };
        *need.entry(lane.name.as_str()).or_default() += e.bytes.len() as u64;
    }
    for (lane_name, &bytes) in &need {
        let Some(lane) = shared.lane(lane_name) else {
            continue;
        };
        let level = stats.lanes.get(*lane_name).copied().unwrap_or_default();
        let over = level.bytes + bytes > lane.max_bytes.0;
        if bytes > lane.max_bytes.0 || (over && lane.when_full == WhenFull::Reject) {
            return Err(SpoolError::LaneFull {
                lane: lane.name.clone(),
                max_bytes: lane.max_bytes.0,
            });
        }
    }
    let mut dropped_oldest = 0;
    for (lane_name, &bytes) in &need {
        let Some(lane) = shared.lane(lane_name) else {
            continue;
        };
        if lane.when_full == WhenFull::DropOldest {
            dropped_oldest += make_room(txn, stats, lane_name, lane.max_bytes.0 - bytes)?;
        }
    }
    stats.drops.lane_full += dropped_oldest;
    stats.drops.invalid += invalid;

    let mut per_device: BTreeMap<&str, u64> = BTreeMap::new();
    let first_seq = Seq(stats.next_seq);
    let count = encoded.len();
    for lane_name in need.keys() {
        // One table handle per lane and request: opening a table is not free.
        let name = lane_table(lane_name);
        let mut table = txn.open_table(lane_def(&name)).spool()?;
        let (mut n, mut b) = (0u64, 0u64);
        for (e, s) in encoded.iter().zip(&seqs) {
            if e.lane != *lane_name {
                continue;
            }
            table.insert(*s, e.bytes.as_slice()).spool()?;
            n += 1;
            b += e.bytes.len() as u64;
            *per_device.entry(e.device.as_str()).or_default() += 1;
        }
        let level = stats.lane_mut(lane_name);
        level.events += n;
        level.bytes += b;
    }
    let mut counts = txn.open_table(DEVICE_COUNTS).spool()?;
    for (device, n) in per_device {
        let before = counts.get(device).spool()?.map(|v| v.value()).unwrap_or(0);
        counts.insert(device, before + n).spool()?;
    }
    stats.next_seq = seq;
    stats.accepted += count as u64;
    Ok(AppendOutcome {
        first_seq,
        count,
        dropped_oldest,
    })
}

/// Drops the oldest events of `lane` until at most `target` bytes are queued.
fn make_room(
    txn: &WriteTransaction,
    stats: &mut SpoolStats,
    lane: &str,
    target: u64,
) -> Result<u64, SpoolError> {
    let name = lane_table(lane);
    let mut table = txn.open_table(lane_def(&name)).spool()?;
    let mut dropped = 0;
    while stats.lane_mut(lane).bytes > target {
        let Some((_, v)) = table.pop_first().spool()? else {
            break;
        };
        let level = stats.lane_mut(lane);
        level.events = level.events.saturating_sub(1);
        level.bytes = level.bytes.saturating_sub(v.value().len() as u64);
        stats.removed_since_compact += v.value().len() as u64;
        dropped += 1;
    }
    Ok(dropped)
}

fn remove(
    shared: &Shared,
    txn: &WriteTransaction,
    stats: &mut SpoolStats,
    lane: &str,
    seqs: &[Seq],
) -> Result<usize, SpoolError> {
    if shared.lane(lane).is_none() {
        return Err(SpoolError::UnknownLane(lane.to_owned()));
    }
    let name = lane_table(lane);
    let mut table = txn.open_table(lane_def(&name)).spool()?;
    let mut removed = 0;
    for seq in seqs {
        if let Some(v) = table.remove(seq.0).spool()? {
            let len = v.value().len() as u64;
            let level = stats.lane_mut(lane);
            level.events = level.events.saturating_sub(1);
            level.bytes = level.bytes.saturating_sub(len);
            stats.removed_since_compact += len;
            removed += 1;
        }
    }
    Ok(removed)
}

fn purge(
    shared: &Shared,
    txn: &WriteTransaction,
    stats: &mut SpoolStats,
    subject: &str,
    revoked: &[String],
) -> Result<(), SpoolError> {
    for lane in &shared.lanes {
        let name = lane_table(&lane.name);
        let mut table = txn.open_table(lane_def(&name)).spool()?;
        let mut doomed = Vec::new();
        for row in table.iter().spool()? {
            let (k, v) = row.spool()?;
            let event = decode_event(k.value(), v.value())?;
            if event.belongs_to(subject) && shared.policy.needs_any(&event, revoked) {
                doomed.push(k.value());
            }
        }
        for seq in doomed {
            if let Some(v) = table.remove(seq).spool()? {
                let len = v.value().len() as u64;
                let level = stats.lane_mut(&lane.name);
                level.events = level.events.saturating_sub(1);
                level.bytes = level.bytes.saturating_sub(len);
                stats.removed_since_compact += len;
                stats.drops.consent_purged += 1;
            }
        }
    }
    Ok(())
}

/// Removes every queued event of `user_id` (its user id, or the anonymous id of its
/// logged-out events), its consent record and its audience membership; persists
/// `devices`.
fn purge_user(
    shared: &Shared,
    txn: &WriteTransaction,
    stats: &mut SpoolStats,
    audience_summary: &mut crate::audiences::AudienceSummary,
    user_id: &str,
    devices: &[(DeviceId, DeviceState)],
) -> Result<UserPurge, SpoolError> {
    let mut erased = 0;
    for lane in &shared.lanes {
        let name = lane_table(&lane.name);
        let mut table = txn.open_table(lane_def(&name)).spool()?;
        let mut doomed = Vec::new();
        for row in table.iter().spool()? {
            let (k, v) = row.spool()?;
            // A record that does not decode cannot be told apart; it stays for the
            // sweep, which drops it as invalid.
            let Ok(event) = decode_event(k.value(), v.value()) else {
                continue;
            };
            // An anonymous id matches only logged-out events: on a shared TV the
            // other members' events carry the same anonymous id with their own user id.
            let ids = &event.identities;
            let theirs = match ids.user_id.as_deref() {
                Some(u) => u == user_id,
                None => ids.anonymous_id.as_deref() == Some(user_id),
            };
            if theirs {
                doomed.push(k.value());
            }
        }
        for seq in doomed {
            if let Some(v) = table.remove(seq).spool()? {
                let len = v.value().len() as u64;
                let level = stats.lane_mut(&lane.name);
                level.events = level.events.saturating_sub(1);
                level.bytes = level.bytes.saturating_sub(len);
                stats.removed_since_compact += len;
                erased += 1;
            }
        }
    }
    txn.open_table(CONSENT).spool()?.remove(user_id).spool()?;
    let audiences = audiences::remove(txn, audience_summary, user_id)?;
    let mut table = txn.open_table(DEVICES).spool()?;
    for (device, state) in devices {
        let bytes = postcard::to_stdvec(state).map_err(|e| SpoolError::Storage(e.to_string()))?;
        table.insert(device.0.as_str(), bytes.as_slice()).spool()?;
    }
    Ok(UserPurge {
        events: erased,
        audiences,
    })
}

fn sweep(
    shared: &Shared,
    txn: &WriteTransaction,
    stats: &mut SpoolStats,
    now_ms: i64,
) -> Result<u64, SpoolError> {
    let mut expired = 0;
    for lane in &shared.lanes {
        let Some(ttl) = lane.ttl else { continue };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let name = lane_table(&lane.name);
        let mut table = txn.open_table(lane_def(&name)).spool()?;
        while expired < MAX_SWEEP as u64 {
            let Some((k, v)) = table.first().spool()? else {
                break;
            };
            // A record that no longer decodes can never be delivered; leaving it at the
            // front would fail every later sweep, so it goes too, counted as invalid.
            let corrupt = match decode_event(k.value(), v.value()) {
                Ok(event) if event.received_ms.saturating_add(ttl_ms) > now_ms => break,
                Ok(_) => false,
                Err(e) => {
                    error!(lane = %lane.name, error = %e, "Dropping an undecodable spool record.");
                    true
                }
            };
            let len = v.value().len() as u64;
            let seq = k.value();
            drop((k, v));
            table.remove(seq).spool()?;
            let level = stats.lane_mut(&lane.name);
            level.events = level.events.saturating_sub(1);
            level.bytes = level.bytes.saturating_sub(len);
            stats.removed_since_compact += len;
            if corrupt {
                stats.drops.invalid += 1;
            } else {
                stats.drops.ttl_expired += 1;
            }
            expired += 1;
        }
    }
    Ok(expired)
}

/// Replaces the one-byte `Seq(0)` placeholder at `at` in a postcard-encoded event with
/// the varint of `seq`.
///
/// Events are encoded on the callers' threads (the writer is the one serial stage, so
/// it must not spend time encoding), but seqs are only known here. The placeholder is
/// the `seq` field, right after `id` (see `Event`'s field order, which is part of the
/// stored format); postcard writes `0u64` as the single byte `0x00`.
fn set_seq(bytes: &mut Vec<u8>, at: usize, seq: u64) {
    let mut varint = [0u8; 10];
    let mut n = 0;
    let mut v = seq;
    loop {
        let low = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            varint[n] = low;
            n += 1;
            break;
        }
        varint[n] = low | 0x80;
        n += 1;
    }
    bytes.splice(at..at + 1, varint[..n].iter().copied());
}

#[cfg(test)]
mod tests {
    use super::set_seq;
    use crate::model::{Event, EventKind, Seq, Source};

    #[test]
    fn splicing_the_seq_equals_encoding_with_it() {
        for seq in [1, 127, 128, 300, 1 << 40, u64::MAX] {
            let mut e = Event::new(EventKind::Track, Source::Local, 42);
            e.name = Some("n".into());
            let at = postcard::to_stdvec(&e.id).unwrap().len();
            let mut bytes = postcard::to_stdvec(&e).unwrap();
            set_seq(&mut bytes, at, seq);
            e.seq = Seq(seq);
            assert_eq!(bytes, postcard::to_stdvec(&e).unwrap(), "seq {seq}");
        }
    }
}
