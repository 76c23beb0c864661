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
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use edge_agent::model::EventId;
use tracing::{error, info};

use crate::config::{DeliveryMode, DestinationConfig, DestinationKind};

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

/// One event on its way out as the JSON text that leaves: what the outbox driver
/// hands its sink. Rendered once ([`route::Route::render_into`]); a sink that only
/// forwards the text (webhook) never parses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// Inbox seq.
    pub seq: u64,
    /// Idempotency key.
    pub event_id: EventId,
    pub profile_id: u64,
    /// The minimized Segment-spec JSON object, as text.
    pub json: Box<str>,
}

impl Rendered {
    /// The same event as a [`Delivery`], for sinks that look inside the body.
    pub fn to_delivery(&self) -> Result<Delivery, serde_json::Error> {
        Ok(Delivery {
            seq: self.seq,
            event_id: self.event_id,
            profile_id: self.profile_id,
            body: serde_json::from_str(&self.json)?,
        })
    }
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

    /// [`Sink::send`] for events rendered as text, what the outbox driver calls. By
    /// default each body is parsed into a [`Delivery`]; a sink that sends the text
    /// as it is overrides this.
    fn send_rendered(&self, batch: &[Rendered]) -> impl Future<Output = SendOutcome> + Send {
        let parsed: Result<Vec<Delivery>, _> = batch.iter().map(Rendered::to_delivery).collect();
        async move {
            match parsed {
                Ok(deliveries) => self.send(&deliveries).await,
                // Our own renderer wrote it; should it not parse, the destination
                // could not take it either.
                Err(e) => SendOutcome::Reject {
                    reason: format!("rendered event is not JSON: {e}"),
                },
            }
        }
    }

    /// Most events one [`Sink::send`] may carry, below the destination's
    /// `batch_size` (a webhook in `single` format takes one). `None`: `batch_size`.
    fn max_batch(&self) -> Option<usize> {
        None
    }
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
    ctx: DestContext,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: &'static str,
    stats: Arc<DestStats>,
    /// Ingest waits for it when it falls behind (see [`crate::pacing`]).
    paces: bool,
}

impl Registry {
    /// The read positions of the destinations ingest is paced on: streaming
    /// event destinations without a rate limit.
    pub fn pace_positions(&self) -> Vec<crate::pacing::Position> {
        self.entries
            .iter()
            .filter(|e| e.paces)
            .map(|e| {
                let stats = Arc::clone(&e.stats);
                let position: crate::pacing::Position = Box::new(move || {
                    let read = stats.read.load(std::sync::atomic::Ordering::Relaxed);
                    read.max(stats.cursor.load(std::sync::atomic::Ordering::Relaxed))
                });
                position
            })
            .collect()
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Status of every destination, in config order.
    pub fn status(&self) -> Vec<DestinationStatus> {
        let resolved = *self.ctx.profiles.resolved().borrow();
        let changes = *self.ctx.audiences.changes_head().borrow();
        let now = edge_agent::model::now_ms();
        self.entries
            .iter()
            .map(|e| {
                let cursor = e.stats.cursor.load(Ordering::Relaxed);
                // Audience outputs follow the membership change log, not the inbox:
                // their backlog is changes not yet sent (no age: changes carry none
                // worth a read here).
                if e.kind.starts_with("audience_") {
                    return DestinationStatus {
                        name: e.name.clone(),
                        kind: e.kind.to_owned(),
                        backlog: changes.saturating_sub(cursor),
                        delivered: e.stats.delivered.load(Ordering::Relaxed),
                        retries: e.stats.retries.load(Ordering::Relaxed),
                        dead_letters: outbox::dead_letters::count(&self.ctx.store, &e.name)
                            .unwrap_or(0),
                        last_error: e
                            .stats
                            .last_error
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone(),
                        ..DestinationStatus::default()
                    };
                }
                // Inbox seqs are dense, so the distance is the count; events erased
                // meanwhile are counted until the destination passes them.
                let backlog = resolved.saturating_sub(cursor);
                let oldest_age_ms = if backlog == 0 {
                    0
                } else {
                    self.ctx
                        .store
                        .read_inbox(cursor, 1)
                        .ok()
                        .and_then(|r| r.first().map(|(_, rec)| rec.received_ms))
                        .map_or(0, |at| u64::try_from(now - at).unwrap_or(0))
                };
                DestinationStatus {
                    name: e.name.clone(),
                    kind: e.kind.to_owned(),
                    backlog,
                    oldest_age_ms,
                    delivered: e.stats.delivered.load(Ordering::Relaxed),
                    filtered: e.stats.filtered.load(Ordering::Relaxed),
                    retries: e.stats.retries.load(Ordering::Relaxed),
                    dead_letters: outbox::dead_letters::count(&self.ctx.store, &e.name)
                        .unwrap_or(0),
                    last_error: e
                        .stats
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                }
            })
            .collect()
    }

    /// Up to `limit` dead letters of `name` after id `after`; `None`: no such destination.
    pub fn dead_letters(
        &self,
        name: &str,
        after: u64,
        limit: usize,
    ) -> Option<Result<Vec<DeadLetter>, crate::store::StoreError>> {
        let entry = self.entry(name)?;
        Some(outbox::dead_letters::list(
            &self.ctx.store,
            &entry.name,
            after,
            limit,
        ))
    }

    /// Re-renders `name`'s dead letters with the current config and sends them again
    /// (ahead of new events); returns how many were queued. `None`: no such destination.
    /// The destination's task does the sending; this returns once it is asked to.
    pub async fn replay(&self, name: &str) -> Option<Result<u64, crate::store::StoreError>> {
        let entry = self.entry(name)?;
        Some(
            outbox::dead_letters::count(&self.ctx.store, &entry.name).inspect(|n| {
                if *n > 0 {
                    entry.stats.replay.notify_one();
                }
            }),
        )
    }
}

impl Registry {
    /// GDPR erasure: removes the erased profile's dead letters from every
    /// destination (its queued events go with the inbox); returns how many.
    pub async fn erase(
        &self,
        erased: &crate::profiles::Erased,
    ) -> Result<u64, crate::store::StoreError> {
        outbox::dead_letters::erase(
            &self.ctx.store,
            erased.profile_id,
            erased
                .identities
                .iter()
                .map(|(t, v)| (t.to_string(), v.to_string()))
                .collect(),
        )
        .await
    }
}

/// What destinations need from the rest of the gateway.
#[derive(Debug, Clone)]
pub struct DestContext {
    pub store: std::sync::Arc<crate::store::Store>,
    pub profiles: std::sync::Arc<crate::profiles::Profiles>,
    pub data_dir: std::path::PathBuf,
    pub audiences: std::sync::Arc<crate::audience::engine::Audiences>,
}

/// Starts every configured destination on `tasks`. A destination that cannot start
/// (a config its sink refuses) is logged and shown in its status; the others run.
pub fn spawn_all(
    config: &[DestinationConfig],
    ctx: &DestContext,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Arc<Registry> {
    let mut entries = Vec::with_capacity(config.len());
    for d in config {
        let stats = Arc::new(DestStats::default());
        let kind = match d.kind {
            DestinationKind::File => "file",
            DestinationKind::Webhook => "webhook",
            DestinationKind::Postgres => "postgres",
            DestinationKind::AudienceWebhook => "audience_webhook",
            DestinationKind::AudienceFile => "audience_file",
            DestinationKind::AudiencePostgres => "audience_postgres",
        };
        let event_kind = matches!(
            d.kind,
            DestinationKind::File | DestinationKind::Webhook | DestinationKind::Postgres
        );
        entries.push(Entry {
            name: d.name.clone(),
            kind,
            stats: Arc::clone(&stats),
            paces: event_kind && d.mode == DeliveryMode::Stream && d.rate_limit == 0,
        });
        let (d, ctx, token) = (d.clone(), ctx.clone(), shutdown.clone());
        match d.kind {
            DestinationKind::File => {
                let name = d.name.clone();
                let dest = file::FileDestination::new(d, ctx, Arc::clone(&stats));
                tasks.spawn(async move {
                    if let Err(e) = dest.run(token).await {
                        error!(destination = %name, error = %e, "Destination stopped.");
                        stats.set_error(&e.to_string());
                    }
                });
            }
            DestinationKind::Webhook => match webhook::WebhookSink::new(&d) {
                Ok(sink) => {
                    info!(destination = %d.name, "Webhook destination started.");
                    tasks.spawn(outbox::run_sink(d, sink, ctx, stats, token));
                }
                Err(e) => {
                    error!(destination = %d.name, error = %e, "Webhook destination cannot start.");
                    stats.set_error(&e.to_string());
                }
            },
            DestinationKind::Postgres => {
                tasks.spawn(async move {
                    if let Some(sink) = connect_postgres(&d, &stats, &token).await {
                        outbox::run_sink(d, sink, ctx, stats, token).await;
                    }
                });
            }
            DestinationKind::AudienceWebhook
            | DestinationKind::AudienceFile
            | DestinationKind::AudiencePostgres => {
                crate::audience::outputs::spawn(d, ctx, stats, tasks, token);
            }
        }
    }
    Arc::new(Registry {
        ctx: ctx.clone(),
        entries,
    })
}

/// Connects a PostgreSQL sink, retrying with backoff; `None` on shutdown.
async fn connect_postgres(
    d: &DestinationConfig,
    stats: &DestStats,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<postgres::PostgresSink> {
    let backoff = outbox::retry::Backoff {
        initial: d.retry_initial,
        max: d.retry_max,
    };
    let mut failures = 0;
    loop {
        match postgres::PostgresSink::connect(d).await {
            Ok(sink) => return Some(sink),
            Err(e) => {
                failures += 1;
                error!(destination = %d.name, error = %e, failures, "PostgreSQL destination cannot start; retrying.");
                stats.set_error(&e);
                let delay = backoff.delay(failures, outbox::retry::random_unit(), None);
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Counters one destination task updates and [`Registry::status`] reads.
#[derive(Debug, Default)]
pub struct DestStats {
    /// Inbox seq the destination's committed cursor is at.
    pub cursor: std::sync::atomic::AtomicU64,
    /// Inbox seq it has read resolved events up to: ahead of `cursor` by what is
    /// being rendered, written or sent. Ingest pacing looks at this one: what decides
    /// whether its reads come from memory is how far they are behind.
    pub read: std::sync::atomic::AtomicU64,
    pub delivered: std::sync::atomic::AtomicU64,
    pub filtered: std::sync::atomic::AtomicU64,
    pub retries: std::sync::atomic::AtomicU64,
    pub dead_lettered: std::sync::atomic::AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    /// Signalled by [`Registry::replay`]; the destination's task replays its dead
    /// letters when it next looks (the permit is kept until then).
    pub replay: tokio::sync::Notify,
}

impl DestStats {
    /// Records the latest failure for the status.
    pub fn set_error(&self, error: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error.to_owned());
    }
}
