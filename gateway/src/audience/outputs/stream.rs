//! `audience_webhook`: the membership change log as add/remove calls to an HTTP
//! audience API (`POST url`, body [`Call::body`], `Idempotency-Key` [`Call::idempotency_key`]).
//!
//! The driver reads a page of changes after its durable cursor, plans the calls
//! ([`super::calls::plan`]), sends them, and saves the cursor past the page once every
//! call is delivered or dead-lettered. After a crash the unfinished page is sent again;
//! add/remove calls set state, so a repeat is harmless (and carries the same key while
//! the page is the same).
//!
//! When the log no longer reaches the cursor (a destination added to a running
//! gateway after the log was pruned, or one away for long), every current member of
//! the selected audiences is sent as adds and the cursor jumps to the head: what was
//! missed is gone, the members are not (members who left meanwhile get no remove).
//!
//! Calls go one at a time (the `concurrency = 1` semantics whatever `concurrency`
//! says): calls of one audience must arrive in order, and a membership stream is small
//! next to the event stream. `rate_limit` paces them. Answers are read by the webhook
//! destination's client ([`crate::dest::webhook`]): 408/429/5xx/timeouts are retried
//! with backoff and jitter (a `Retry-After` wins), other 4xx put the call into the
//! dead-letter table (body: the refused call). A replay sends stored calls again as
//! they were, ahead of new changes.
//!
//! Must not: read the inbox, or move the cursor over a call that is neither delivered
//! nor dead-lettered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use edge_agent::model::{DeviceId, Event, EventId, EventKind, Source};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::calls::{plan, Call};
use super::member::Allowlist;
use super::{log_lost, pause, selected, wait_for_changes, Cursor, READ_PAGE, STORE_RETRY};
use crate::config::{DestinationConfig, WebhookFormat};
use crate::dest::outbox::dead_letters::{self, StoredLetter};
use crate::dest::outbox::retry::{random_unit, Backoff, TokenBucket};
use crate::dest::webhook::WebhookSink;
use crate::dest::{Delivery, DestContext, DestStats, SendOutcome, Sink};
use crate::profiles::{Enrichment, Routed};
use crate::store::InboxRecord;

/// Dead letters replayed per page.
const REPLAY_PAGE: usize = 100;
/// Longest `reason` kept from a refusal.
const MAX_REASON: usize = 512;

/// How sending one call ended.
#[derive(Debug, PartialEq)]
enum Finished {
    Delivered,
    Rejected(String),
    /// Shutdown came first.
    Abandoned,
}

/// A running `audience_webhook` destination.
#[derive(Debug)]
pub struct StreamOutput {
    name: String,
    config: DestinationConfig,
    ctx: DestContext,
    stats: Arc<DestStats>,
    sink: WebhookSink,
    allow: Allowlist,
    backoff: Backoff,
    bucket: Option<TokenBucket>,
}

impl StreamOutput {
    /// Builds the HTTP client; on a config it cannot use, the name, the stats and why.
    pub fn new(
        config: DestinationConfig,
        ctx: DestContext,
        stats: Arc<DestStats>,
    ) -> Result<Self, (String, Arc<DestStats>, String)> {
        // One call is one request whose body is the call itself: the webhook client's
        // `single` format sends a delivery's body as it is, keyed by its event id.
        let mut http = config.clone();
        http.format = WebhookFormat::Single;
        let sink = match WebhookSink::new(&http) {
            Ok(s) => s,
            Err(e) => return Err((config.name.clone(), stats, e.to_string())),
        };
        Ok(StreamOutput {
            name: config.name.clone(),
            allow: Allowlist::new(config.identities.as_deref()),
            backoff: Backoff {
                initial: config.retry_initial,
                max: config.retry_max,
            },
            bucket: (config.rate_limit > 0)
                .then(|| TokenBucket::new(config.rate_limit, Instant::now())),
            config,
            ctx,
            stats,
            sink,
        })
    }

    /// Delivers the change log until `shutdown`. Store and destination failures are
    /// logged, shown in the status and retried.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut cursor = loop {
            match Cursor::load(&self.ctx, &self.name) {
                Ok(c) => break c,
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot read the audience cursor; retrying.");
                    self.stats.set_error(&e.to_string());
                    if !pause(STORE_RETRY, &shutdown).await {
                        return;
                    }
                }
            }
        };
        self.stats.cursor.store(cursor.through, Ordering::Relaxed);
        self.ctx
            .audiences
            .set_changes_done(&self.name, cursor.through);
        let mut head = self.ctx.audiences.changes_head();
        info!(destination = %self.name, cursor = cursor.through, "Audience webhook started.");
        let stats = Arc::clone(&self.stats);
        loop {
            // The head first: a change committed after it is not taken for a gap.
            let published = *head.borrow();
            let changes = match self.ctx.audiences.read_changes(cursor.through, READ_PAGE) {
                Ok(c) => c,
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot read membership changes; retrying.");
                    self.stats.set_error(&e.to_string());
                    if !pause(STORE_RETRY, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            if log_lost(&changes, published, cursor.through) {
                // Pruned past our cursor (a destination added to a running gateway,
                // or away for long): what we missed is gone, the members are not.
                warn!(destination = %self.name, cursor = cursor.through, "Membership changes were pruned past the cursor; sending every member.");
                if !self.full_sync(&mut cursor, &shutdown).await {
                    return;
                }
                continue;
            }
            let Some(last) = changes.last().map(|c| c.seq) else {
                tokio::select! {
                    () = stats.replay.notified() => {
                        if !self.replay(&shutdown).await {
                            return;
                        }
                    }
                    more = wait_for_changes(&mut head, cursor.through, &shutdown) => {
                        if !more {
                            return;
                        }
                    }
                }
                continue;
            };
            let keep = |a: &str| selected(&self.config.audiences, a);
            for call in plan(&changes, keep, self.config.batch_size) {
                let key = call.idempotency_key(&self.name);
                if !self.deliver_or_dead_letter(&call, key, &shutdown).await {
                    return;
                }
            }
            cursor.through = last;
            if !self.save(cursor, &shutdown).await {
                return;
            }
        }
    }

    /// Sends `call`, dead-lettering it if refused; `false` on shutdown.
    async fn deliver_or_dead_letter(
        &mut self,
        call: &Call,
        key: EventId,
        shutdown: &CancellationToken,
    ) -> bool {
        match self.deliver(call, key, shutdown).await {
            Finished::Delivered => true,
            Finished::Rejected(reason) => self.dead_letter(call, key, &reason, shutdown).await,
            Finished::Abandoned => false,
        }
    }

    /// Saves the cursor, retrying store failures; `false` on shutdown.
    async fn save(&self, cursor: Cursor, shutdown: &CancellationToken) -> bool {
        loop {
            match cursor.save(&self.ctx, &self.name).await {
                Ok(()) => {
                    self.stats.cursor.store(cursor.through, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot save the audience cursor; retrying.");
                    self.stats.set_error(&e.to_string());
                    if !pause(STORE_RETRY, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sends every current member of the selected audiences as adds (calls of up to
    /// `batch_size`), then moves the cursor to the log head read before the members:
    /// changes made meanwhile are sent again on top (harmless). Members the receiver
    /// holds that left while the log was lost get no remove. `false` on shutdown.
    async fn full_sync(&mut self, cursor: &mut Cursor, shutdown: &CancellationToken) -> bool {
        let head = *self.ctx.audiences.changes_head().borrow();
        let audiences = loop {
            match self.ctx.audiences.sizes() {
                Ok(a) => break a,
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot list audiences; retrying.");
                    self.stats.set_error(&e.to_string());
                    if !pause(STORE_RETRY, shutdown).await {
                        return false;
                    }
                }
            }
        };
        let page_size = self.config.batch_size.max(1);
        let chosen: Vec<String> = audiences
            .into_iter()
            .map(|a| a.name)
            .filter(|a| selected(&self.config.audiences, a))
            .collect();
        for audience in chosen {
            let mut after = 0;
            loop {
                let page = match self.ctx.audiences.members(&audience, after, page_size) {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => {
                        error!(destination = %self.name, error = %e, "Cannot list members; retrying.");
                        self.stats.set_error(&e.to_string());
                        if !pause(STORE_RETRY, shutdown).await {
                            return false;
                        }
                        continue;
                    }
                };
                let Some(last) = page.last().map(|m| m.profile_id) else {
                    break;
                };
                let call = Call {
                    audience: audience.clone(),
                    first_seq: head,
                    last_seq: head,
                    add: page
                        .iter()
                        .map(|m| (m.profile_id, m.identities.clone()))
                        .collect(),
                    remove: Vec::new(),
                };
                let key = EventId::from_message_id(&format!(
                    "audience-sync/{}/{audience}/{head}/{after}",
                    self.name
                ));
                if !self.deliver_or_dead_letter(&call, key, shutdown).await {
                    return false;
                }
                after = last;
                if page.len() < page_size {
                    break;
                }
            }
        }
        cursor.through = head;
        self.save(*cursor, shutdown).await
    }

    /// Sends one call until it is delivered or refused.
    async fn deliver(
        &mut self,
        call: &Call,
        key: EventId,
        shutdown: &CancellationToken,
    ) -> Finished {
        if call.is_empty() {
            return Finished::Delivered;
        }
        let delivery = Delivery {
            seq: call.last_seq,
            event_id: key,
            profile_id: call.add.first().or(call.remove.first()).map_or(0, |m| m.0),
            body: call.body(&self.allow, crate::clock::now_ms()),
        };
        let finished = self.send(&delivery, shutdown).await;
        if finished == Finished::Delivered {
            self.stats
                .delivered
                .fetch_add(call.len() as u64, Ordering::Relaxed);
        }
        finished
    }

    /// Sends `delivery` with retries, backoff and pacing.
    async fn send(&mut self, delivery: &Delivery, shutdown: &CancellationToken) -> Finished {
        let mut failures = 0u32;
        loop {
            if !self.pace(shutdown).await {
                return Finished::Abandoned;
            }
            match self.sink.send(std::slice::from_ref(delivery)).await {
                SendOutcome::Delivered => {
                    if failures > 0 {
                        info!(destination = %self.name, failures, "Audience API accepted a call again.");
                    }
                    return Finished::Delivered;
                }
                SendOutcome::Reject { reason } => return Finished::Rejected(reason),
                SendOutcome::Retry { after, reason } => {
                    failures = failures.saturating_add(1);
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_error(&reason);
                    let delay = self.backoff.delay(failures, random_unit(), after);
                    if failures == 1 || failures.is_power_of_two() {
                        warn!(destination = %self.name, failures, delay = ?delay, reason = %reason, "Audience API failed a call; retrying.");
                    } else {
                        debug!(destination = %self.name, failures, delay = ?delay, reason = %reason, "Retrying an audience call.");
                    }
                    if !pause(delay, shutdown).await {
                        return Finished::Abandoned;
                    }
                }
            }
        }
    }

    /// Waits for a rate-limit token; `false` when shutdown came first.
    async fn pace(&mut self, shutdown: &CancellationToken) -> bool {
        if shutdown.is_cancelled() {
            return false;
        }
        let Some(bucket) = self.bucket.as_mut() else {
            return true;
        };
        while let Some(wait) = bucket.take(Instant::now()) {
            if !pause(wait, shutdown).await {
                return false;
            }
        }
        true
    }

    /// Stores a refused call in the dead-letter table; `false` on shutdown.
    async fn dead_letter(
        &self,
        call: &Call,
        key: EventId,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let reason: String = reason.chars().take(MAX_REASON).collect();
        error!(destination = %self.name, audience = %call.audience, first = call.first_seq, last = call.last_seq, reason = %reason, "Audience API refused a call; dead-lettered.");
        self.stats.set_error(&reason);
        let now = crate::clock::now_ms();
        let letter = StoredLetter::new(
            &letter_record(&self.name, call, key),
            &call.body(&self.allow, now),
            &reason,
            now,
        );
        loop {
            match dead_letters::add(&self.ctx.store, &self.name, vec![letter.clone()]).await {
                Ok(_) => {
                    self.stats
                        .dead_lettered
                        .fetch_add(call.len() as u64, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot store a dead letter; retrying.");
                    if !pause(STORE_RETRY, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sends every stored dead letter again, as it was; delivered ones leave the
    /// table, refused ones stay with the new reason. `false` on shutdown.
    async fn replay(&mut self, shutdown: &CancellationToken) -> bool {
        let mut after = 0;
        loop {
            let page = match dead_letters::load(&self.ctx.store, &self.name, after, REPLAY_PAGE) {
                Ok(p) => p,
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot read dead letters to replay.");
                    self.stats.set_error(&e.to_string());
                    return true;
                }
            };
            if page.is_empty() {
                return true;
            }
            for (id, letter) in page {
                after = id;
                let body = serde_json::from_str(&letter.body).unwrap_or(serde_json::Value::Null);
                let delivery = Delivery {
                    seq: letter.seq,
                    event_id: letter.record.event.id,
                    profile_id: letter.enrichment.profile_id,
                    body,
                };
                let stored = match self.send(&delivery, shutdown).await {
                    Finished::Abandoned => return false,
                    Finished::Delivered => {
                        dead_letters::remove(&self.ctx.store, &self.name, vec![id]).await
                    }
                    Finished::Rejected(reason) => {
                        let mut again = letter.clone();
                        again.reason = reason.chars().take(MAX_REASON).collect();
                        again.at_ms = crate::clock::now_ms();
                        dead_letters::update(&self.ctx.store, &self.name, id, again).await
                    }
                };
                if let Err(e) = stored {
                    error!(destination = %self.name, error = %e, "Cannot record a replayed dead letter.");
                    self.stats.set_error(&e.to_string());
                }
            }
        }
    }
}

/// The dead-letter table keeps routed events; a refused call is stored as a synthetic
/// one (sender `audience:<destination>`, id the call's idempotency key) whose
/// enrichment lists every member's identities, so a GDPR erase of any member removes
/// the letter.
fn letter_record(destination: &str, call: &Call, key: EventId) -> Routed {
    let now = crate::clock::now_ms();
    let mut event = Event::new(EventKind::Track, Source::Local, now);
    event.id = key;
    event.name = Some(format!("Audience {}", call.audience).into());
    let members = call.add.iter().chain(call.remove.iter());
    let identities = members
        .clone()
        .flat_map(|(_, ids)| ids.iter().map(|(t, v)| (t.into(), v.into())))
        .collect();
    Routed {
        seq: call.last_seq,
        record: Arc::new(InboxRecord {
            sender: DeviceId(format!("audience:{destination}")),
            received_ms: now,
            corrected_timestamp_ms: now,
            event,
        }),
        enrichment: Enrichment {
            profile_id: members.map(|m| m.0).next().unwrap_or(0),
            identities,
            ..Enrichment::default()
        },
    }
}
