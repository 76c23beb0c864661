//! Ingest pacing: under sustained overload the receive path waits, a little, for the
//! pipeline behind it instead of running ever further ahead of it.
//!
//! The profile stage and the destinations read what the receive path just stored
//! from memory (the inbox tail, the resolved tail); a reader that falls further
//! behind than those hold reads redb and decodes instead, which costs more CPU than
//! anything else it does. When devices send faster than the site can deliver, the
//! slowest reader stays behind for good and the whole site runs in that slower,
//! colder regime. Pacing keeps it in the fast one: before committing a frame, the
//! receive path waits while the slowest *keeping-up* reader is more than `pace_lag`
//! events behind the inbox head, at most `pace_max_wait` per frame. Meanwhile the
//! frame is not acknowledged, so the agent keeps the events in its spool and sends
//! no more than its window: nothing is refused or lost, the backlog just stays on
//! the devices, where it is durable anyway.
//!
//! Who counts: the profile stage, and streaming destinations without a rate limit
//! (one with a rate limit lags by design). A reader whose position has not moved for
//! [`STALLED`] while behind — a destination that is down and retrying, a stage that
//! failed — stops counting until it moves again, so a dead destination never slows
//! ingest by more than one stall. A device sending a frame a second never notices:
//! the wait is per frame and bounded.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// A reader not moving for this long while behind stops holding ingest back.
pub const STALLED: Duration = Duration::from_secs(1);
/// How often a waiting frame looks again.
const POLL: Duration = Duration::from_millis(2);

/// Where one reader is: the last inbox seq it has finished with.
pub type Position = Box<dyn Fn() -> u64 + Send + Sync>;

/// Holds frames back while the pipeline catches up (see the module doc).
pub struct Pacer {
    lag: u64,
    max_wait: Duration,
    head: watch::Receiver<u64>,
    readers: Vec<Position>,
    /// Per reader: the position last seen and when it last changed.
    seen: Mutex<Vec<(u64, Instant)>>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("lag", &self.lag)
            .field("max_wait", &self.max_wait)
            .field("readers", &self.readers.len())
            .finish_non_exhaustive()
    }
}

impl Pacer {
    /// Paces against `readers` of the inbox whose head is `head`; `lag` 0 turns
    /// pacing off.
    pub fn new(
        lag: u64,
        max_wait: Duration,
        head: watch::Receiver<u64>,
        readers: Vec<Position>,
    ) -> Self {
        let now = Instant::now();
        let seen = readers.iter().map(|r| (r(), now)).collect();
        Pacer {
            lag,
            max_wait,
            head,
            readers,
            seen: Mutex::new(seen),
        }
    }

    /// A pacer that never waits.
    pub fn off(head: watch::Receiver<u64>) -> Self {
        Self::new(0, Duration::ZERO, head, Vec::new())
    }

    /// Waits until the slowest keeping-up reader is within `lag` of the head, or
    /// `max_wait` has passed; returns how long it waited.
    pub async fn pace(&self) -> Duration {
        if self.lag == 0 || self.readers.is_empty() {
            return Duration::ZERO;
        }
        let started = Instant::now();
        loop {
            let now = Instant::now();
            let waited = now.duration_since(started);
            if waited >= self.max_wait || self.behind(now) <= self.lag {
                return waited;
            }
            tokio::time::sleep(POLL.min(self.max_wait - waited)).await;
        }
    }

    /// Events between the head and the slowest reader that counts at `now`.
    fn behind(&self, now: Instant) -> u64 {
        let head = *self.head.borrow();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut slowest = head;
        for (reader, (last, moved)) in self.readers.iter().zip(seen.iter_mut()) {
            let at = reader();
            if at != *last {
                (*last, *moved) = (at, now);
            }
            let keeping_up = now.duration_since(*moved) < STALLED;
            if keeping_up || head.saturating_sub(at) <= self.lag {
                slowest = slowest.min(at);
            }
        }
        head.saturating_sub(slowest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn reader(at: &Arc<AtomicU64>) -> Position {
        let at = Arc::clone(at);
        Box::new(move || at.load(Ordering::Relaxed))
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_waits_for_a_reader_that_is_behind_and_moving() {
        let (head_tx, head) = watch::channel(10_000);
        let slow = Arc::new(AtomicU64::new(0));
        let pacer = Pacer::new(1_000, Duration::from_millis(50), head, vec![reader(&slow)]);
        // Behind by 10,000 and (as far as the pacer knows) just seen: the whole wait.
        assert_eq!(pacer.pace().await, Duration::from_millis(50));
        // Catching up within the wait ends it early.
        let mover = Arc::clone(&slow);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            mover.store(9_500, Ordering::Relaxed);
        });
        let waited = pacer.pace().await;
        assert!(waited >= Duration::from_millis(10) && waited < Duration::from_millis(20));
        // Within the lag: no wait at all.
        head_tx.send(10_400).unwrap();
        assert_eq!(pacer.pace().await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_reader_stops_holding_frames_back() {
        let (_head_tx, head) = watch::channel(50_000);
        let stuck = Arc::new(AtomicU64::new(100));
        let pacer = Pacer::new(1_000, Duration::from_millis(50), head, vec![reader(&stuck)]);
        assert_eq!(pacer.pace().await, Duration::from_millis(50));
        tokio::time::sleep(STALLED).await;
        assert_eq!(pacer.pace().await, Duration::ZERO, "not moved for a stall");
        // It counts again once it moves.
        stuck.store(200, Ordering::Relaxed);
        assert_eq!(pacer.pace().await, Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn the_slowest_reader_that_counts_decides() {
        let (_head_tx, head) = watch::channel(20_000);
        let fast = Arc::new(AtomicU64::new(19_500));
        let slow = Arc::new(AtomicU64::new(15_000));
        let pacer = Pacer::new(
            1_000,
            Duration::from_millis(20),
            head,
            vec![reader(&fast), reader(&slow)],
        );
        assert_eq!(pacer.pace().await, Duration::from_millis(20));
        slow.store(19_200, Ordering::Relaxed);
        assert_eq!(pacer.pace().await, Duration::ZERO);
        let off = Pacer::off(watch::channel(1_000_000).1);
        assert_eq!(off.pace().await, Duration::ZERO);
    }
}
