//! The stage loop: read a group, resolve it, publish it; read the next group while
//! the current one resolves.
//!
//! Reading (redb page reads and decoding every record) is about a third of the
//! stage's work and needs nothing from resolution but the group's end, so it runs on
//! a second blocking thread one group ahead. The read-ahead is thrown away whenever
//! it might be stale: after an erase (it may hold the erased user's records) and when
//! it does not start at the cursor.

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
    records: Vec<(u64, InboxRecord)>,
}

/// Reads the group after `cursor`: at most [`GROUP_MAX`] records, all committed up to
/// `head` when fewer.
fn fetch(store: &Store, cursor: u64, head: u64) -> Result<Fetched, StoreError> {
    let records = store.read_inbox(cursor, GROUP_MAX)?;
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
/// nothing was committed and the group comes back for a retry.
fn resolve(
    resolver: &mut Resolver,
    store: &Store,
    group: Fetched,
) -> Result<u64, (StoreError, Fetched)> {
    let enrichments =
        match resolver.resolve_group(&group.records, group.through, store.min_done(), now_ms()) {
            Ok(e) => e,
            Err(e) => return Err((e, group)),
        };
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
    resolver
        .shared
        .tail
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(resolved);
    Ok(through)
}

/// The read-ahead and a group waiting for a retry.
#[derive(Default)]
struct Ahead {
    reading: Option<JoinHandle<Result<Fetched, StoreError>>>,
    retry: Option<Fetched>,
}

impl Ahead {
    fn is_idle(&self) -> bool {
        self.reading.is_none() && self.retry.is_none()
    }

    /// Forgets everything read (waits for a read in flight so no two overlap).
    async fn discard(&mut self) {
        if let Some(h) = self.reading.take() {
            let _ = h.await;
        }
        self.retry = None;
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
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    };
    store.set_done(STAGE_NAME, cursor);
    shared.resolved.send_replace(cursor);
    let mut head_rx = store.head();
    let mut resolver = Some(Resolver::new(Arc::clone(&shared), cursor));
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
        let head = *head_rx.borrow_and_update();
        if head <= cursor && ahead.is_idle() {
            if durable < cursor {
                // Caught up: make what was resolved durable so the inbox can be pruned.
                durable = checkpoint(&mut resolver, cursor).await.unwrap_or(durable);
                store.set_done(STAGE_NAME, durable);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
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
        let group = match ahead.retry.take() {
            Some(g) => Ok(g),
            None => {
                let reading = ahead.reading.take().unwrap_or_else(|| {
                    let st = Arc::clone(&store);
                    spawn_blocking(move || fetch(&st, cursor, head))
                });
                match reading.await {
                    Ok(result) => result,
                    Err(e) => Err(StoreError::Storage(format!("inbox read task failed: {e}"))),
                }
            }
        };
        let group = match group {
            Ok(g) if g.after == cursor => g,
            // Read ahead from a cursor that did not hold: read again.
            Ok(_) => continue,
            Err(e) => {
                error!(error = %e, cursor, "Cannot read the inbox for profile resolution; retrying.");
                if sleep_or_stop(&shutdown, &mut backoff).await {
                    return;
                }
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
        let mut r = resolver
            .take()
            .unwrap_or_else(|| Resolver::new(Arc::clone(&shared), durable));
        let st = Arc::clone(&store);
        let joined = spawn_blocking(move || {
            let result = resolve(&mut r, &st, group);
            (r, result)
        })
        .await;
        let failure = match joined {
            Ok((r, Ok(through))) => {
                durable = r.durable_through;
                resolver = Some(r);
                cursor = through;
                shared.resolved.send_replace(cursor);
                // Only what a crash cannot revert may be pruned from the inbox.
                store.set_done(STAGE_NAME, durable);
                backoff = BACKOFF_MIN;
                continue;
            }
            Ok((r, Err((e, group)))) => {
                resolver = Some(r);
                ahead.retry = Some(group);
                e.to_string()
            }
            Err(e) => format!("resolver task failed: {e}"),
        };
        error!(error = %failure, cursor, "Profile resolution failed; retrying (nothing of this group was committed).");
        if sleep_or_stop(&shutdown, &mut backoff).await {
            ahead.discard().await;
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

/// Makes everything through `cursor` durable; the new durable cursor, or `None` when
/// that failed (retried after the next group).
async fn checkpoint(resolver: &mut Option<Resolver>, cursor: u64) -> Option<u64> {
    let mut r = resolver.take()?;
    let joined = spawn_blocking(move || {
        let result = r.checkpoint(cursor);
        (r, result)
    })
    .await;
    match joined {
        Ok((r, result)) => {
            if let Err(e) = result {
                warn!(error = %e, "Profile checkpoint failed; retrying with the next group.");
            }
            let durable = r.durable_through;
            *resolver = Some(r);
            Some(durable)
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
    let result = erase(shared, store, req.id_type, req.value).await;
    if let Some(r) = resolver.as_mut() {
        r.clear();
    }
    let _ = req.reply.send(result);
}
