//! The stage loop: read a group, resolve it, publish it; read the next group while
//! the current one resolves.
//!
//! Reading (redb page reads and decoding every record) is about a third of the
//! stage's work and needs nothing from resolution but the group's end, so it runs on
//! a second blocking thread one group ahead. The read-ahead is thrown away whenever
//! it might be stale: after an erase (it may hold the erased user's records), after a
//! failed group (the stage starts again from the flushed cursor) and when it does not
//! start at the cursor.

use std::sync::{Arc, PoisonError};

use tokio::sync::mpsc::Receiver;
use tokio::task::{spawn_blocking, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{erase, load_cursor, EraseRequest, Resolver, BACKOFF_MAX, BACKOFF_MIN, GROUP_MAX};
use crate::clock::now_ms;
use crate::profiles::tail::ResolvedGroup;
use crate::profiles::{Routed, Shared, STAGE_NAME};
use crate::store::{InboxRecord, Store, StoreError};

/// Inbox seqs `(after, through]` read for resolution (erased records are absent).
struct Fetched {
    after: u64,
    through: u64,
    records: Vec<(u64, Arc<InboxRecord>)>,
}

/// Reads the group after `cursor`: at most [`GROUP_MAX`] records, all committed up to
/// `head` when fewer.
fn fetch(store: &Store, cursor: u64, head: u64) -> Result<Fetched, StoreError> {
    let records = store.read_inbox_shared(cursor, GROUP_MAX)?;
    // Fewer than a full group: everything committed up to `head` was read (records
    // erased meanwhile are simply absent), so the cursor may move to `head`.
    let through = match records.last() {
        Some((last, _)) if records.len() >= GROUP_MAX => *last,
        Some((last, _)) => (*last).max(head),
        None => head,
    };
    Ok(Fetched {
        after: cursor,
        through: through.max(cursor),
        records,
    })
}

/// Resolves and commits `group`, then hands it to the in-memory tail. On failure
/// nothing of it was committed and the resolver dropped what was pending: the stage
/// goes on from [`Resolver::flushed_through`].
fn resolve(resolver: &mut Resolver, store: &Store, group: Fetched) -> Result<u64, StoreError> {
    let caught_up = group.records.len() < GROUP_MAX;
    let enrichments = resolver.resolve_group(
        &group.records,
        group.through,
        store.min_done(),
        now_ms(),
        caught_up,
    )?;
    let through = group.through;
    let resolved = ResolvedGroup {
        after: group.after,
        through,
        events: group
            .records
            .into_iter()
            .zip(enrichments)
            .map(|((seq, record), enrichment)| {
                Arc::new(Routed {
                    seq,
                    record,
                    enrichment,
                })
            })
            .collect(),
    };
    let gone = resolver
        .shared
        .tail
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(resolved);
    if !gone.is_empty() {
        // Freed on another blocking thread, off the stage's serial path.
        drop(tokio::task::spawn_blocking(move || drop(gone)));
    }
    Ok(through)
}

/// The read of the next group, when one is in flight.
#[derive(Default)]
struct Ahead {
    reading: Option<JoinHandle<Result<Fetched, StoreError>>>,
}

impl Ahead {
    fn is_idle(&self) -> bool {
        self.reading.is_none()
    }

    /// Forgets what is being read (waits for it so no two reads overlap).
    async fn discard(&mut self) {
        if let Some(h) = self.reading.take() {
            let _ = h.await;
        }
    }
}

/// Publishes the resolved and flushed heads, never moving one back (after a failure
/// the stage resolves again what readers may already have had).
fn publish(shared: &Shared, resolved: u64, flushed: u64) {
    for (watch, value) in [(&shared.resolved, resolved), (&shared.flushed, flushed)] {
        watch.send_if_modified(|v| {
            let newer = value > *v;
            if newer {
                *v = value;
            }
            newer
        });
    }
}

/// The stage loop (see the module doc of `stage`).
pub async fn run(
    shared: Arc<Shared>,
    mut erases: Receiver<EraseRequest>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut cursor = loop {
        let sh = Arc::clone(&shared);
        match spawn_blocking(move || load_cursor(&sh)).await {
            Ok(Ok(c)) => break c,
            Ok(Err(e)) => warn!(error = %e, "Cannot read the profile cursor; retrying."),
            Err(e) => warn!(error = %e, "Cursor read task failed; retrying."),
        }
        if sleep_or_stop(&shutdown, &mut backoff).await {
            return;
        }
    };
    store.set_done(STAGE_NAME, cursor);
    publish(&shared, cursor, cursor);
    let mut head_rx = store.head();
    let mut resolver = Some(Resolver::new(Arc::clone(&shared), cursor, cursor));
    let mut durable = cursor;
    let mut ahead = Ahead::default();
    backoff = BACKOFF_MIN;
    loop {
        if shutdown.is_cancelled() {
            ahead.discard().await;
            return;
        }
        while let Ok(req) = erases.try_recv() {
            ahead.discard().await;
            handle_erase(&shared, &store, &mut resolver, req).await;
        }
        if resolver.as_ref().is_some_and(Resolver::is_stale) {
            // profiles.redb was reopened after an I/O failure and went back to its
            // last durable commit: what is in memory belongs to the old file.
            resolver = None;
        }
        if resolver.is_none() {
            // No state (the resolver task died, or the file was reopened): start
            // again from the file.
            ahead.discard().await;
            let sh = Arc::clone(&shared);
            match spawn_blocking(move || load_cursor(&sh)).await {
                Ok(Ok(c)) => {
                    cursor = c;
                    resolver = Some(Resolver::new(Arc::clone(&shared), c, durable));
                }
                Ok(Err(e)) => warn!(error = %e, "Cannot read the profile cursor; retrying."),
                Err(e) => warn!(error = %e, "Cursor read task failed; retrying."),
            }
            if resolver.is_none() && sleep_or_stop(&shutdown, &mut backoff).await {
                return;
            }
            continue;
        }
        let head = *head_rx.borrow_and_update();
        if head <= cursor && ahead.is_idle() {
            let mut flush_in = None;
            if durable < cursor {
                // Caught up: write what is pending and make it durable, so the inbox
                // can be pruned and profile readers see it — once a flush is due.
                let due = resolver.as_ref().map(Resolver::until_flush_due);
                if due.is_some_and(|d| d.is_zero()) {
                    if let Some(d) = checkpoint(&mut resolver).await {
                        durable = d;
                        backoff = BACKOFF_MIN;
                    } else {
                        // Try again later even if nothing else arrives.
                        flush_in = Some(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    store.set_done(STAGE_NAME, durable);
                    if let Some(r) = resolver.as_ref() {
                        publish(&shared, cursor, r.flushed_through);
                    }
                } else {
                    flush_in = due;
                }
            }
            let flush_timer = async {
                match flush_in {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = flush_timer => {}
                () = shared.flush_request.notified() => {}
                changed = head_rx.changed() => {
                    if changed.is_err() {
                        // The store is gone: nothing more will arrive.
                        shutdown.cancelled().await;
                        return;
                    }
                }
                Some(req) = erases.recv() => handle_erase(&shared, &store, &mut resolver, req).await,
            }
            continue;
        }
        let reading = ahead.reading.take().unwrap_or_else(|| {
            let st = Arc::clone(&store);
            spawn_blocking(move || fetch(&st, cursor, head))
        });
        let group = match reading.await {
            Ok(Ok(g)) if g.after == cursor => g,
            // Read ahead from a cursor that did not hold: read again.
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => {
                error!(error = %e, cursor, "Cannot read the inbox for profile resolution; retrying.");
                if sleep_or_stop(&shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                error!(error = %e, cursor, "Inbox read task failed; retrying.");
                continue;
            }
        };
        if group.through <= cursor {
            continue;
        }
        // Read the next group while this one resolves.
        let next_head = *head_rx.borrow();
        if next_head > group.through {
            let (st, after) = (Arc::clone(&store), group.through);
            ahead.reading = Some(spawn_blocking(move || fetch(&st, after, next_head)));
        }
        let Some(mut r) = resolver.take() else {
            continue;
        };
        let st = Arc::clone(&store);
        let joined = spawn_blocking(move || {
            let result = resolve(&mut r, &st, group);
            (r, result)
        })
        .await;
        let failure = match joined {
            Ok((r, Ok(through))) => {
                durable = r.durable_through;
                cursor = through;
                publish(&shared, cursor, r.flushed_through);
                resolver = Some(r);
                // Only what a crash cannot revert may be pruned from the inbox.
                store.set_done(STAGE_NAME, durable);
                backoff = BACKOFF_MIN;
                continue;
            }
            Ok((r, Err(e))) => {
                // Pending changes went with the failed group: resolve again from what
                // the file holds (a reopened file: from its cursor, at the loop's top).
                cursor = r.flushed_through;
                resolver = Some(r);
                e.to_string()
            }
            Err(e) => format!("resolver task failed: {e}"),
        };
        ahead.discard().await;
        error!(error = %failure, cursor, "Profile resolution failed; retrying from the last flushed cursor.");
        if sleep_or_stop(&shutdown, &mut backoff).await {
            return;
        }
    }
}

/// Waits `backoff` (doubling it for next time); true when shutting down instead.
async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut std::time::Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// Writes what is pending and makes it durable; the new durable cursor, or `None`
/// when that failed (retried later; nothing is lost meanwhile).
async fn checkpoint(resolver: &mut Option<Resolver>) -> Option<u64> {
    let mut r = resolver.take()?;
    let joined = spawn_blocking(move || {
        let result = r.checkpoint();
        (r, result)
    })
    .await;
    match joined {
        Ok((r, result)) => {
            let ok = match result {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "Profile checkpoint failed; retrying.");
                    false
                }
            };
            let durable = r.durable_through;
            *resolver = Some(r);
            ok.then_some(durable)
        }
        Err(e) => {
            warn!(error = %e, "Profile checkpoint task failed.");
            None
        }
    }
}

async fn handle_erase(
    shared: &Arc<Shared>,
    store: &Store,
    resolver: &mut Option<Resolver>,
    req: EraseRequest,
) {
    // Nothing of the user may be served from memory once the erase has begun.
    shared
        .tail
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    // The erase works on the file: write what is pending first.
    if resolver.is_some() && checkpoint(resolver).await.is_none() {
        let _ = req.reply.send(Err(StoreError::Storage(
            "cannot write pending profile changes before the erase; try again".into(),
        )));
        return;
    }
    if let Some(r) = resolver.as_ref() {
        publish(shared, 0, r.flushed_through);
    }
    let result = erase(shared, store, req.id_type, req.value).await;
    if let Some(r) = resolver.as_mut() {
        r.clear();
    }
    let _ = req.reply.send(result);
}
