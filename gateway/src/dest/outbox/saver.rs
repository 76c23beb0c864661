//! Commits a destination's cursor off its delivery path.
//!
//! A cursor save is a durable commit in the gateway store: waiting for one after
//! every finished batch stalled reading and rendering for an fsync, and a few hundred
//! of them a second cost the store's writer too. The driver instead hands the newest
//! state to this task, which commits it at most once per [`SAVE_EVERY`]. The sink is
//! idempotent by event id, so a crash replays at most that much more than it would
//! have; nothing is lost, since the state only ever covers finished batches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::dest::{DestContext, DestStats};

/// Longest time a finished batch waits for its cursor commit.
pub const SAVE_EVERY: Duration = Duration::from_millis(100);
/// Pause before retrying a failed save.
const RETRY: Duration = Duration::from_millis(500);

/// The handle the driver keeps: it publishes states and, at shutdown, waits for the
/// last one to be committed.
#[derive(Debug)]
pub struct Saver<T> {
    tx: watch::Sender<T>,
    task: JoinHandle<()>,
}

impl<T> Saver<T>
where
    T: Serialize + Copy + PartialEq + Send + Sync + CursorThrough + 'static,
{
    /// Starts the saving task for destination `name`; `saved` is the state already
    /// in the store.
    pub fn start(name: String, ctx: DestContext, stats: Arc<DestStats>, saved: T) -> Self {
        let (tx, rx) = watch::channel(saved);
        let task = tokio::spawn(save_loop(name, ctx, stats, rx, saved));
        Self { tx, task }
    }

    /// Asks for `state` to be committed (soon; a newer state replaces it).
    pub fn save(&self, state: T) {
        self.tx.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    /// Commits the last state asked for, then ends the task.
    pub async fn finish(self) {
        let Self { tx, task } = self;
        drop(tx);
        if let Err(e) = task.await {
            error!(error = %e, "The cursor saver failed; the last progress may be sent again after a restart.");
        }
    }
}

/// The inbox seq a saved state covers (what the store may forget up to).
pub trait CursorThrough {
    fn through(&self) -> u64;
}

async fn save_loop<T>(
    name: String,
    ctx: DestContext,
    stats: Arc<DestStats>,
    mut rx: watch::Receiver<T>,
    mut saved: T,
) where
    T: Serialize + Copy + PartialEq + CursorThrough,
{
    // `changed` reports a state published before the sender went away, then the close.
    while rx.changed().await.is_ok() {
        loop {
            let state = *rx.borrow_and_update();
            if state == saved || save(&name, &ctx, &stats, &state).await {
                saved = state;
                break;
            }
            // Shutting down with a store that refuses: the restart sends again.
            if rx.has_changed().is_err() {
                return;
            }
            tokio::time::sleep(RETRY).await;
        }
        tokio::time::sleep(SAVE_EVERY).await;
    }
}

/// One durable save; `false` when it failed (logged and shown in the status).
async fn save<T: Serialize + CursorThrough>(
    name: &str,
    ctx: &DestContext,
    stats: &DestStats,
    state: &T,
) -> bool {
    let bytes = match postcard::to_stdvec(state) {
        Ok(b) => b,
        Err(e) => {
            error!(destination = %name, error = %e, "Cannot encode the destination cursor.");
            return true;
        }
    };
    match ctx.store.save_cursor(name, bytes, state.through()).await {
        Ok(()) => {
            stats.cursor.store(state.through(), Ordering::Relaxed);
            true
        }
        Err(e) => {
            warn!(destination = %name, error = %e, "Cannot save the destination cursor; retrying.");
            stats.set_error(&e.to_string());
            false
        }
    }
}
