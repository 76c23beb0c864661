//! The delivery driver shared by every [`Sink`] (webhook, postgres): it reads routed
//! inbox records after its durable cursor, renders them with the destination's
//! [`Route`], batches them, sends batches with bounded concurrency and a rate
//! limit, retries what the destination asks to retry, dead-letters what it refuses,
//! and commits the cursor over what is finished.
//!
//! The inbox plus the cursor is the outbox: nothing is copied before delivery, and
//! the cursor moves only over a contiguous prefix of finished batches
//! ([`window::Window`]), so after a crash every event the destination had not
//! accepted is sent again. Delivery is at least once; sinks make it idempotent by
//! event id. A down destination is retried forever; its backlog shows in the status.
//!
//! Decisions live in pure parts ([`retry`], [`window`]); this file owns the
//! sleeping, the tasks and the store calls.
//!
//! Modes: `stream` sends a batch when `batch_size` events are there or when the
//! oldest waiting event has waited `linger`; `batch` sends everything resolved every
//! `schedule` (the first run one schedule after the destination first started; the
//! next run time is part of the cursor, so a restart does not reset the clock).
//!
//! Replay ([`crate::dest::Registry::replay`]) renders the stored dead letters again
//! with the current config (a replay follows a config fix) and sends them ahead of
//! new events; each one delivered (or now filtered out) leaves the table, each one
//! refused again stays with the new reason.

pub mod dead_letters;
pub mod retry;
pub mod saver;
pub mod window;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::dead_letters::StoredLetter;
use self::retry::{random_unit, Backoff, TokenBucket};
use self::saver::{CursorThrough, Saver};
use self::window::{BatchId, Window};
use super::route::Route;
use super::{DestContext, DestStats, Rendered, SendOutcome, Sink};
use crate::config::{DeliveryMode, DestinationConfig};
use crate::profiles::Routed;
use crate::store::StoreError;

/// Pause after a failed store read or write before trying again.
const STORE_RETRY: Duration = Duration::from_millis(500);
/// How long in-flight sends may finish after shutdown before they are abandoned
/// (their events are sent again after the restart).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Window entries per concurrent batch: done batches wait behind an unfinished one,
/// and this bounds how far reading runs ahead of it.
const WINDOW_PER_BATCH: usize = 4;
/// Without a `resolved` watch (the profile stage stopped) the driver polls this often.
const POLL: Duration = Duration::from_secs(1);
/// Longest `reason` kept from a refusal.
const MAX_REASON: usize = 512;

/// The driver's durable state. Field order is the stored encoding.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct CursorState {
    /// Every inbox seq up to here is delivered, dead-lettered or filtered.
    through: u64,
    /// Batch mode: when the next run starts (ms since the epoch); 0 = not planned.
    next_run_ms: i64,
}

impl CursorThrough for CursorState {
    fn through(&self) -> u64 {
        self.through
    }
}

/// One batch on its way. Only the rendered text is kept: a refusal reads the
/// records again for the dead letters (the inbox keeps them until the cursor
/// passes), so the much larger records are dropped as soon as they are rendered.
struct Batch {
    id: BatchId,
    events: Arc<[Rendered]>,
}

/// How a batch's sending ended.
enum Finished {
    Delivered,
    Rejected(String),
    /// Shutdown came first; the batch stays undone.
    Abandoned,
}

/// What batch tasks share: the sink and the pacing.
struct Sender<S> {
    name: String,
    sink: S,
    backoff: Backoff,
    bucket: Option<Mutex<TokenBucket>>,
    stats: Arc<DestStats>,
}

impl<S: Sink> Sender<S> {
    /// Waits for a rate-limit token; `false` when shutdown came first.
    async fn pace(&self, shutdown: &CancellationToken) -> bool {
        let Some(bucket) = &self.bucket else {
            return true;
        };
        loop {
            let wait = bucket
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(Instant::now());
            let Some(wait) = wait else {
                return true;
            };
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends `batch` until the destination accepts or refuses it.
    async fn send(&self, batch: &[Rendered], shutdown: &CancellationToken) -> Finished {
        let mut failures = 0u32;
        loop {
            if shutdown.is_cancelled() || !self.pace(shutdown).await {
                return Finished::Abandoned;
            }
            match self.sink.send_rendered(batch).await {
                SendOutcome::Delivered => {
                    if failures > 0 {
                        info!(destination = %self.name, failures, "Destination accepted a batch again.");
                    }
                    self.stats
                        .delivered
                        .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    return Finished::Delivered;
                }
                SendOutcome::Reject { reason } => return Finished::Rejected(reason),
                SendOutcome::Retry { after, reason } => {
                    failures = failures.saturating_add(1);
                    self.stats
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.stats.set_error(&reason);
                    let delay = self.backoff.delay(failures, random_unit(), after);
                    if failures == 1 || failures.is_power_of_two() {
                        warn!(destination = %self.name, failures, delay = ?delay, reason = %reason, "Destination failed a batch; retrying.");
                    } else {
                        debug!(destination = %self.name, failures, delay = ?delay, reason = %reason, "Retrying a batch.");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Finished::Abandoned,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Delivers to `sink` until `shutdown`. Never returns early: store and destination
/// failures are logged, shown in `stats`, and retried.
pub async fn run_sink<S: Sink>(
    config: DestinationConfig,
    sink: S,
    ctx: DestContext,
    stats: Arc<DestStats>,
    shutdown: CancellationToken,
) {
    let batch_size = sink
        .max_batch()
        .map_or(config.batch_size, |m| m.clamp(1, config.batch_size.max(1)));
    let bucket = (config.rate_limit > 0)
        .then(|| Mutex::new(TokenBucket::new(config.rate_limit, Instant::now())));
    let sender = Arc::new(Sender {
        name: config.name.clone(),
        sink,
        backoff: Backoff {
            initial: config.retry_initial,
            max: config.retry_max,
        },
        bucket,
        stats: Arc::clone(&stats),
    });
    let Some(state) = load_state(&config.name, &ctx, &shutdown).await else {
        return;
    };
    stats
        .cursor
        .store(state.through, std::sync::atomic::Ordering::Relaxed);
    let saver = Saver::start(config.name.clone(), ctx.clone(), Arc::clone(&stats), state);
    let mut driver = Driver {
        route: Route::new(&config),
        saver: Some(saver),
        scratch: Vec::new(),
        batch_size: batch_size.max(1),
        window: Window::new(state.through),
        read_pos: state.through,
        state,
        pending: Vec::new(),
        pending_since: None,
        tasks: JoinSet::new(),
        batches: Vec::new(),
        sender,
        ctx,
        stats,
        config,
    };
    driver.run(shutdown).await;
}

/// The saved state, retrying store errors; `None` on shutdown.
async fn load_state(
    name: &str,
    ctx: &DestContext,
    shutdown: &CancellationToken,
) -> Option<CursorState> {
    loop {
        match ctx.store.load_cursor(name) {
            Ok(None) => return Some(CursorState::default()),
            Ok(Some(bytes)) => match postcard::from_bytes(&bytes) {
                Ok(s) => return Some(s),
                Err(e) => {
                    // Starting over re-sends what the inbox still holds: duplicates
                    // the destination drops by event id, never a loss.
                    error!(destination = %name, error = %e, "Destination cursor does not decode; starting from the oldest inbox event.");
                    return Some(CursorState::default());
                }
            },
            Err(e) => {
                warn!(destination = %name, error = %e, "Cannot load the destination cursor; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(STORE_RETRY) => {}
                }
            }
        }
    }
}

struct Driver<S> {
    config: DestinationConfig,
    route: Route,
    batch_size: usize,
    sender: Arc<Sender<S>>,
    ctx: DestContext,
    stats: Arc<DestStats>,
    state: CursorState,
    window: Window,
    /// Every seq up to here is in a batch, pending, or skipped.
    read_pos: u64,
    /// Rendered events waiting for a full batch (or the linger, or the run's end).
    pending: Vec<Rendered>,
    /// Commits `state` in the background; `None` once shut down.
    saver: Option<Saver<CursorState>>,
    /// Reused render buffer.
    scratch: Vec<u8>,
    pending_since: Option<Instant>,
    tasks: JoinSet<(BatchId, Finished)>,
    /// Batches in `tasks`, kept here for dead-lettering.
    batches: Vec<Batch>,
}

/// What the driver waits for next.
enum Wake {
    Shutdown,
    Finished(BatchId, Finished),
    NewEvents,
    Linger,
    RunDue,
    Replay,
}

impl<S: Sink> Driver<S> {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn max_window(&self) -> usize {
        self.config.concurrency.max(1) * WINDOW_PER_BATCH
    }

    fn has_room(&self) -> bool {
        self.window.in_flight() < self.config.concurrency.max(1)
            && self.window.len() < self.max_window()
    }

    fn batch_mode(&self) -> bool {
        self.config.mode == DeliveryMode::Batch
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let mut resolved = self.ctx.profiles.resolved();
        let mut watching = true;
        if self.batch_mode() && self.state.next_run_ms == 0 {
            self.state.next_run_ms = edge_agent::model::now_ms() + millis(self.config.schedule);
            self.save();
        }
        // Batch mode: the inbox seq the current run delivers up to; `None` between runs.
        let mut run_target: Option<u64> = None;
        loop {
            let open = !self.batch_mode() || run_target.is_some();
            let mut caught_up = false;
            let mut read_failed = false;
            // Fill the window: read, render, dispatch full batches.
            // A scheduled run delivers what was resolved when it started.
            let read_limit = run_target.unwrap_or(u64::MAX);
            while open && self.has_room() {
                if self.pending.len() >= self.batch_size {
                    self.dispatch(&shutdown);
                    continue;
                }
                if self.read_pos >= read_limit {
                    caught_up = true;
                    break;
                }
                // Seen before reading: a resolve after this read wakes the wait below.
                resolved.mark_unchanged();
                match self.read_more() {
                    Ok(true) => {}
                    Ok(false) => {
                        caught_up = true;
                        break;
                    }
                    Err(e) => {
                        warn!(destination = %self.name(), error = %e, "Cannot read routed events; retrying.");
                        self.stats.set_error(&e.to_string());
                        read_failed = true;
                        break;
                    }
                }
            }
            if let Some(target) = run_target {
                if caught_up || self.read_pos >= target {
                    if !self.pending.is_empty() && self.has_room() {
                        self.dispatch(&shutdown);
                        continue;
                    }
                    if self.pending.is_empty() && self.window.is_empty() {
                        run_target = None;
                        let schedule = millis(self.config.schedule);
                        let now = edge_agent::model::now_ms();
                        self.state.next_run_ms = (self.state.next_run_ms + schedule).max(now);
                        info!(destination = %self.name(), through = self.state.through, "Scheduled delivery finished.");
                        self.save();
                    }
                }
            }
            if self.advance().await {
                continue;
            }
            let linger_at = (!self.batch_mode() && self.has_room())
                .then_some(self.pending_since)
                .flatten()
                .map(|since| since + self.config.linger);
            let run_at = (self.batch_mode() && run_target.is_none()).then(|| {
                let wait = self.state.next_run_ms - edge_agent::model::now_ms();
                Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0))
            });
            let streaming = !self.batch_mode();
            let wait_events = streaming && caught_up && watching;
            let wait_retry = read_failed || (streaming && caught_up && !watching);
            let wake = tokio::select! {
                () = shutdown.cancelled() => Wake::Shutdown,
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => match joined {
                    Ok((id, finished)) => Wake::Finished(id, finished),
                    // A task panicked or was aborted: its batch stays undone, and
                    // the events go again after a restart; nothing is marked done.
                    Err(e) => {
                        error!(destination = %self.name(), error = %e, "A delivery task failed; its events will be sent again after a restart.");
                        continue;
                    }
                },
                changed = resolved.changed(), if wait_events => {
                    if changed.is_err() {
                        watching = false;
                    }
                    Wake::NewEvents
                }
                () = sleep_until(linger_at), if linger_at.is_some() => Wake::Linger,
                () = sleep_until(run_at), if run_at.is_some() => Wake::RunDue,
                () = tokio::time::sleep(if read_failed { STORE_RETRY } else { POLL }), if wait_retry => Wake::NewEvents,
                () = self.stats.replay.notified() => Wake::Replay,
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Finished(id, finished) => self.finish(id, finished, &shutdown).await,
                Wake::NewEvents => {}
                Wake::Linger => self.dispatch(&shutdown),
                Wake::RunDue => {
                    let target = *resolved.borrow_and_update();
                    info!(destination = %self.name(), through = target, "Scheduled delivery starts.");
                    run_target = Some(target);
                }
                Wake::Replay => self.replay(&shutdown).await,
            }
        }
        self.drain().await;
    }

    /// Reads and renders up to a batch's worth; `Ok(false)` when nothing new.
    fn read_more(&mut self) -> Result<bool, StoreError> {
        let want = self.batch_size - self.pending.len();
        let page = self
            .ctx
            .profiles
            .read_routed(&self.ctx.store, self.read_pos, want)?;
        if page.through <= self.read_pos && page.events.is_empty() {
            return Ok(false);
        }
        for routed in page.events {
            match self.render(&routed) {
                Some(event) => {
                    self.pending.push(event);
                    self.pending_since.get_or_insert_with(Instant::now);
                }
                None => {
                    self.stats
                        .filtered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        self.read_pos = self.read_pos.max(page.through);
        self.stats
            .read
            .store(self.read_pos, std::sync::atomic::Ordering::Relaxed);
        if self.pending.is_empty() {
            self.window.push_skipped(self.read_pos);
        }
        Ok(true)
    }

    /// Sends the pending events (up to a batch) as one batch task.
    fn dispatch(&mut self, shutdown: &CancellationToken) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.pending.len().min(self.batch_size);
        let events: Arc<[Rendered]> = self.pending.drain(..n).collect();
        // The batch also covers the filtered events read after it, unless more
        // pending events follow.
        let through = match self.pending.first() {
            Some(next) => next.seq.saturating_sub(1),
            None => self.read_pos,
        };
        self.pending_since = if self.pending.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        let id = self.window.push_batch(through);
        let sender = Arc::clone(&self.sender);
        let token = shutdown.clone();
        let to_send = Arc::clone(&events);
        self.tasks
            .spawn(async move { (id, sender.send(&to_send, &token).await) });
        self.batches.push(Batch { id, events });
    }

    /// Books a finished batch: dead letters for a refusal, then the window.
    async fn finish(&mut self, id: BatchId, finished: Finished, shutdown: &CancellationToken) {
        let Some(at) = self.batches.iter().position(|b| b.id == id) else {
            return;
        };
        let batch = self.batches.swap_remove(at);
        match finished {
            Finished::Abandoned => return,
            Finished::Delivered => {}
            Finished::Rejected(reason) => {
                let reason = truncate(&reason);
                warn!(destination = %self.name(), events = batch.events.len(), reason = %reason, "Destination refused a batch; moving it to the dead letters.");
                self.stats.set_error(&reason);
                if !self
                    .store_dead_letters(&batch.events, &reason, shutdown)
                    .await
                {
                    return;
                }
                self.stats.dead_lettered.fetch_add(
                    batch.events.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        self.window.complete(id);
    }

    /// Writes the refused `events` as dead letters, with the records they were
    /// rendered from, retrying store failures; `false` on shutdown (the batch stays
    /// undone and is sent again after the restart).
    async fn store_dead_letters(
        &self,
        events: &[Rendered],
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        loop {
            let now = edge_agent::model::now_ms();
            let letters = self.routed_for(events).map(|found| {
                found
                    .iter()
                    .map(|(r, e)| StoredLetter::with_json(r, &e.json, reason, now))
                    .collect::<Vec<_>>()
            });
            let added = match letters {
                Ok(letters) => dead_letters::add(&self.ctx.store, self.name(), letters).await,
                Err(e) => Err(e),
            };
            match added {
                Ok(_) => return true,
                Err(e) => {
                    error!(destination = %self.name(), error = %e, "Cannot store dead letters; retrying.");
                    self.stats.set_error(&e.to_string());
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(STORE_RETRY) => {}
                    }
                }
            }
        }
    }

    /// The routed records `events` (in inbox order) were rendered from, read again
    /// from the inbox, each with its event. An event erased meanwhile is absent (its
    /// dead letter with it).
    fn routed_for<'a>(
        &self,
        events: &'a [Rendered],
    ) -> Result<Vec<(Arc<Routed>, &'a Rendered)>, StoreError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::with_capacity(events.len());
        let mut after = first.seq.saturating_sub(1);
        while after < last.seq {
            let want = usize::try_from(last.seq - after).unwrap_or(usize::MAX);
            let page = self.ctx.profiles.read_routed(
                &self.ctx.store,
                after,
                want.min(self.batch_size.max(64)),
            )?;
            if page.through <= after {
                break;
            }
            after = page.through;
            for routed in page.events {
                if let Ok(at) = events.binary_search_by_key(&routed.seq, |e| e.seq) {
                    found.push((routed, &events[at]));
                }
            }
        }
        Ok(found)
    }

    /// What this destination sends for `routed`; `None` when its route keeps the
    /// event out.
    fn render(&mut self, routed: &Routed) -> Option<Rendered> {
        self.scratch.clear();
        if !self.route.render_into(routed, &mut self.scratch) {
            return None;
        }
        // Always UTF-8 (see `render_into`); checked rather than assumed, and an event
        // that somehow is not is logged with its seq and skipped, not sent mangled.
        match std::str::from_utf8(&self.scratch) {
            Ok(json) => Some(Rendered {
                seq: routed.seq,
                event_id: routed.record.event.id,
                profile_id: routed.enrichment.profile_id,
                json: json.into(),
            }),
            Err(e) => {
                let e = e.to_string();
                error!(destination = %self.name(), seq = routed.seq, error = %e, "Cannot render an event; skipping it.");
                self.stats.set_error(&e);
                None
            }
        }
    }

    /// Moves the cursor over the window's done prefix if it grew; `true` if it did.
    /// The commit happens in the background ([`saver`]).
    async fn advance(&mut self) -> bool {
        let Some(through) = self.window.advance() else {
            return false;
        };
        self.state.through = through;
        self.save();
        true
    }

    /// Asks the saver to commit the current state.
    fn save(&self) {
        if let Some(saver) = &self.saver {
            saver.save(self.state);
        }
    }

    /// Sends the dead letters that exist now, rendered with the current config.
    async fn replay(&mut self, shutdown: &CancellationToken) {
        let name = self.name().to_owned();
        info!(destination = %name, "Replaying dead letters.");
        let (mut after, mut delivered, mut refused) = (0u64, 0u64, 0u64);
        loop {
            let chunk = match dead_letters::load(&self.ctx.store, &name, after, self.batch_size) {
                Ok(c) => c,
                Err(e) => {
                    error!(destination = %name, error = %e, "Cannot read dead letters; replay stopped.");
                    self.stats.set_error(&e.to_string());
                    return;
                }
            };
            let Some((last, _)) = chunk.last() else {
                break;
            };
            after = *last;
            let mut gone = Vec::new();
            let mut send: Vec<(u64, Rendered, StoredLetter)> = Vec::new();
            for (id, letter) in chunk {
                match self.render(&letter.routed()) {
                    Some(event) => send.push((id, event, letter)),
                    None => gone.push(id),
                }
            }
            let batch: Vec<Rendered> = send.iter().map(|(_, d, _)| d.clone()).collect();
            let outcome = if batch.is_empty() {
                Finished::Delivered
            } else {
                self.sender.send(&batch, shutdown).await
            };
            match outcome {
                Finished::Abandoned => return,
                Finished::Delivered => {
                    delivered += batch.len() as u64;
                    gone.extend(send.iter().map(|(id, _, _)| *id));
                }
                Finished::Rejected(reason) => {
                    let reason = truncate(&reason);
                    refused += batch.len() as u64;
                    let now = edge_agent::model::now_ms();
                    for (id, d, letter) in send {
                        let again =
                            StoredLetter::with_json(&letter.routed(), &d.json, &reason, now);
                        if let Err(e) =
                            dead_letters::update(&self.ctx.store, &name, id, again).await
                        {
                            warn!(destination = %name, error = %e, "Cannot update a dead letter.");
                        }
                    }
                }
            }
            if let Err(e) = dead_letters::remove(&self.ctx.store, &name, gone).await {
                error!(destination = %name, error = %e, "Cannot remove replayed dead letters; they may be sent again.");
            }
        }
        info!(destination = %name, delivered, refused, "Dead-letter replay finished.");
    }

    /// After shutdown: lets in-flight sends finish briefly, then commits what is done.
    async fn drain(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let token = CancellationToken::new();
        token.cancel();
        while !self.tasks.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.tasks.join_next()).await {
                Ok(Some(Ok((id, finished)))) => self.finish(id, finished, &token).await,
                Ok(Some(Err(_))) => {}
                Ok(None) => break,
                Err(_) => {
                    warn!(destination = %self.name(), batches = self.tasks.len(), "Shutdown: abandoning batches still being sent; they go again after the restart.");
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        self.advance().await;
        if let Some(saver) = self.saver.take() {
            saver.finish().await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn truncate(reason: &str) -> String {
    if reason.len() <= MAX_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}
