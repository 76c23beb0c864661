//! Audience destinations: membership leaves the gateway.
//!
//! - [`stream`] (`audience_webhook`): the membership change log as batched add/remove
//!   calls to an HTTP API, from a durable cursor, with the webhook destination's
//!   client, retries and dead letters.
//! - [`snapshot`] (`audience_file`): a full snapshot file per audience every
//!   `schedule` (and once at start).
//! - [`table`] (`audience_postgres`): a PostgreSQL table kept equal to the live
//!   membership by applying the change log, resynced in full when it cannot be.
//! - [`calls`], [`member`]: the pure parts (batching and collapsing, what of a member
//!   leaves under the `identities` allowlist).
//!
//! Audience outputs never read the inbox: each one tells the store at start that it
//! holds no inbox entries back, and keeps its own cursor over the change log (in the
//! gateway store's cursor table, under the destination's name).

pub mod calls;
pub mod member;
pub mod snapshot;
pub mod stream;
pub mod table;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::error;

use crate::config::{DestinationConfig, DestinationKind};
use crate::dest::{DestContext, DestStats};
use crate::store::StoreError;

/// Changes read from the log at once.
pub(crate) const READ_PAGE: usize = 1000;
/// Pause after a failed store read or write before trying again.
pub(crate) const STORE_RETRY: Duration = Duration::from_millis(500);
/// Without a change-log watch (the engine stopped) drivers poll this often.
pub(crate) const POLL: Duration = Duration::from_secs(1);
/// Members read per page while snapshotting or resyncing.
pub(crate) const MEMBERS_PAGE: usize = 1000;

/// Starts the audience destination `config` on `tasks`.
pub fn spawn(
    config: DestinationConfig,
    ctx: DestContext,
    stats: Arc<DestStats>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Every destination is registered as an inbox consumer at open; this one reads
    // the change log instead and must not hold the inbox back.
    ctx.store.set_done(&config.name, u64::MAX);
    match config.kind {
        DestinationKind::AudienceWebhook => match stream::StreamOutput::new(config, ctx, stats) {
            Ok(out) => {
                tasks.spawn(out.run(shutdown));
            }
            Err((name, stats, e)) => {
                error!(destination = %name, error = %e, "Audience webhook cannot start.");
                stats.set_error(&e);
            }
        },
        DestinationKind::AudienceFile => {
            let out = snapshot::SnapshotOutput::new(config, ctx, stats);
            tasks.spawn(out.run(shutdown));
        }
        DestinationKind::AudiencePostgres => match table::TableOutput::new(config, ctx, stats) {
            Ok(out) => {
                tasks.spawn(out.run(shutdown));
            }
            Err((name, stats, e)) => {
                error!(destination = %name, error = %e, "Audience table cannot start.");
                stats.set_error(&e);
            }
        },
        DestinationKind::File | DestinationKind::Webhook | DestinationKind::Postgres => {
            error!(destination = %config.name, "Not an audience destination.");
        }
    }
}

/// An output's durable position in the change log. Field order is the stored encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Cursor {
    /// Every change up to this log position is delivered, dead-lettered or skipped.
    pub through: u64,
}

impl Cursor {
    /// The saved cursor of `name`; a missing or unreadable one starts at the log's
    /// beginning (an unreadable one is reported: it means a resend).
    pub(crate) fn load(ctx: &DestContext, name: &str) -> Result<Cursor, StoreError> {
        match ctx.store.load_cursor(name)? {
            None => Ok(Cursor::default()),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("cursor of `{name}`: {e}"))),
        }
    }

    /// Saves the cursor (holding no inbox entries), then lets the engine prune the
    /// change log up to it.
    pub(crate) async fn save(self, ctx: &DestContext, name: &str) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(&self)
            .map_err(|e| StoreError::Storage(format!("cursor of `{name}`: {e}")))?;
        ctx.store.save_cursor(name, bytes, u64::MAX).await?;
        ctx.audiences.set_changes_done(name, self.through);
        Ok(())
    }
}

/// Whether `audience` is sent by a destination listing `selected` (empty = all).
pub(crate) fn selected(selected: &[String], audience: &str) -> bool {
    selected.is_empty() || selected.iter().any(|a| a == audience)
}

/// Waits until the change log's head passes `after`, `shutdown`, or `POLL` without a
/// watch; `false` on shutdown.
pub(crate) async fn wait_for_changes(
    head: &mut tokio::sync::watch::Receiver<u64>,
    after: u64,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        gone = async { head.wait_for(|h| *h > after).await.is_err() } => {
            if gone {
                // The engine is gone; poll rather than spin.
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            true
        }
    }
}

/// Whether the change log no longer reaches `cursor`: `page` was read after `cursor`
/// and the log head was `head` before that read. The log is gap-free, so a first
/// change past `cursor + 1`, or nothing at all below a head past `cursor`, means the
/// changes in between were pruned.
pub(crate) fn log_lost(page: &[crate::audience::MembershipChange], head: u64, cursor: u64) -> bool {
    match page.first() {
        Some(c) => c.seq > cursor.saturating_add(1),
        None => head > cursor,
    }
}

/// Sleeps `d` unless shutdown comes first; `false` on shutdown.
pub(crate) async fn pause(d: Duration, shutdown: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_selection_sends_every_audience() {
        assert!(selected(&[], "a"));
        let only = vec!["a".to_owned()];
        assert!(selected(&only, "a"));
        assert!(!selected(&only, "b"));
    }

    #[test]
    fn a_gap_or_a_head_past_an_empty_read_means_the_log_was_pruned() {
        let change = |seq| crate::audience::MembershipChange {
            seq,
            audience: "a".into(),
            profile_id: 1,
            entered: true,
            at_ms: 0,
            identities: Vec::new(),
            devices: Vec::new(),
            audiences_now: Vec::new(),
        };
        assert!(!log_lost(&[change(5)], 5, 4));
        assert!(log_lost(&[change(6)], 6, 4));
        assert!(!log_lost(&[], 4, 4));
        assert!(log_lost(&[], 9, 4));
        // A fresh output on a log that starts at 1 replays it all.
        assert!(!log_lost(&[change(1)], 3, 0));
    }

    #[test]
    fn the_cursor_encoding_round_trips() {
        let c = Cursor { through: 42 };
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<Cursor>(&bytes).unwrap(), c);
    }
}
