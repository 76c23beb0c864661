//! Destinations. Every kind reads the same log — inbox records resolved by the
//! profile stage ([`crate::profiles::Profiles::read_routed`]) — from its own durable
//! cursor: the inbox plus the cursor is each destination's outbox.
//!
//! - [`route`]: pure per-destination decisions: filters, consent, minimization, and
//!   the Segment-spec JSON that leaves.
//! - [`outbox`]: the delivery driver shared by webhook and postgres: batching and
//!   schedule, bounded concurrency, rate limit, retries with backoff and
//!   `Retry-After`, dead letters and replay, cursor commits.
//! - [`webhook`], [`postgres`]: [`Sink`]s; [`file`]: NDJSON files, exactly once.

pub mod file;
pub mod outbox;
pub mod postgres;
pub mod route;
pub mod segment_json;
pub mod webhook;

use std::future::Future;
use std::time::Duration;

use edge_agent::model::EventId;

/// One event on its way out.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Inbox seq.
    pub seq: u64,
    /// Idempotency key.
    pub event_id: EventId,
    pub profile_id: u64,
    /// The minimized Segment-spec JSON object ([`route::render`]).
    pub body: serde_json::Value,
}

/// What became of one send.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Stored by the destination.
    Delivered,
    /// Try the same batch again later: 408, 429, 5xx, timeout, connection failure.
    /// `after` is the destination's `Retry-After`, if it gave one.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The destination refused the batch for good (other 4xx): dead letters.
    Reject { reason: String },
}

/// A destination that takes batches of rendered events.
pub trait Sink: Send + Sync + 'static {
    /// Delivers `batch` (1..=`batch_size` events, in inbox order). Must be idempotent
    /// by `event_id`: after a crash the same batch may be sent again.
    fn send(&self, batch: &[Delivery]) -> impl Future<Output = SendOutcome> + Send;
}

/// Live state of one destination, for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct DestinationStatus {
    pub name: String,
    pub kind: String,
    /// Resolved events not yet delivered (or filtered) by this destination.
    pub backlog: u64,
    /// Age of the oldest of them, ms; 0 when none.
    pub oldest_age_ms: u64,
    pub delivered: u64,
    pub filtered: u64,
    /// Sends retried since start.
    pub retries: u64,
    /// Events in the dead-letter table now.
    pub dead_letters: u64,
    pub last_error: Option<String>,
}

/// One dead-lettered event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// Dead-letter id (order of arrival).
    pub id: u64,
    pub event_id: String,
    pub at_ms: i64,
    pub reason: String,
    /// The body that was refused.
    pub body: serde_json::Value,
}

/// Every running destination, for the admin API.
#[derive(Debug)]
pub struct Registry {
    _private: (),
}

impl Registry {
    /// Status of every destination, in config order.
    pub fn status(&self) -> Vec<DestinationStatus> {
        todo!("registry: status")
    }

    /// Up to `limit` dead letters of `name` after id `after`; `None`: no such destination.
    pub fn dead_letters(
        &self,
        _name: &str,
        _after: u64,
        _limit: usize,
    ) -> Option<Result<Vec<DeadLetter>, crate::store::StoreError>> {
        todo!("registry: dead_letters")
    }

    /// Re-renders `name`'s dead letters with the current config and sends them again
    /// (ahead of new events); returns how many were queued. `None`: no such destination.
    pub async fn replay(&self, _name: &str) -> Option<Result<u64, crate::store::StoreError>> {
        todo!("registry: replay")
    }
}

/// What destinations need from the rest of the gateway.
#[derive(Debug, Clone)]
pub struct DestContext {
    pub store: std::sync::Arc<crate::store::Store>,
    pub profiles: std::sync::Arc<crate::profiles::Profiles>,
    pub data_dir: std::path::PathBuf,
}

/// Starts every configured destination on `tasks`.
pub fn spawn_all(
    _config: &[crate::config::DestinationConfig],
    _ctx: &DestContext,
    _tasks: &tokio_util::task::TaskTracker,
    _shutdown: &tokio_util::sync::CancellationToken,
) -> std::sync::Arc<Registry> {
    todo!("dest: spawn_all")
}

/// Counters one destination task updates and [`Registry::status`] reads.
#[derive(Debug, Default)]
pub struct DestStats {
    /// Inbox seq the destination's committed cursor is at.
    pub cursor: std::sync::atomic::AtomicU64,
    pub delivered: std::sync::atomic::AtomicU64,
    pub filtered: std::sync::atomic::AtomicU64,
    pub retries: std::sync::atomic::AtomicU64,
    pub dead_lettered: std::sync::atomic::AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
}
