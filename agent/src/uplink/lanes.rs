//! Per-lane sending state: what is in flight, when to send, what an ack settles.
//! Pure decisions fed with the current time; the driver does the I/O.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::UplinkMode;
use crate::model::Seq;
use crate::wire::Ack;

/// One batch sent and not yet settled.
#[derive(Debug, Clone)]
struct Flight {
    seqs: Vec<Seq>,
    sent: Instant,
}

/// What an ack settled for one lane.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    pub acked: Vec<Seq>,
    pub rejected: Vec<Seq>,
}

/// Sending state of one lane.
#[derive(Debug)]
pub struct LaneState {
    pub name: String,
    mode: UplinkMode,
    linger: Duration,
    interval: Duration,
    window: usize,
    /// Highest seq handed to the network; the next batch starts after it.
    next_after: Seq,
    in_flight: VecDeque<Flight>,
    last_send: Option<Instant>,
}

impl LaneState {
    pub fn new(
        name: String,
        mode: UplinkMode,
        linger: Duration,
        interval: Duration,
        window: usize,
    ) -> Self {
        LaneState {
            name,
            mode,
            linger,
            interval,
            window,
            next_after: Seq(0),
            in_flight: VecDeque::new(),
            last_send: None,
        }
    }

    /// Forgets what is in flight so everything unacked is read again from the spool
    /// (after a reconnect or an ack timeout). The gateway deduplicates.
    pub fn reset(&mut self) {
        self.in_flight.clear();
        self.next_after = Seq(0);
    }

    pub fn next_after(&self) -> Seq {
        self.next_after
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// Whether a batch of `ready` events (oldest accepted at `oldest`) should go now.
    pub fn should_send(&self, ready: usize, full: bool, oldest: Instant, now: Instant) -> bool {
        if ready == 0 || !self.has_room() {
            return false;
        }
        if full {
            return true;
        }
        match self.mode {
            UplinkMode::Stream => now.duration_since(oldest) >= self.linger,
            UplinkMode::Batch => self
                .last_send
                .is_none_or(|t| now.duration_since(t) >= self.interval),
        }
    }

    /// When the lane next wants a wake-up to re-check `should_send`.
    pub fn wait_hint(&self) -> Duration {
        match self.mode {
            UplinkMode::Stream => self.linger,
            UplinkMode::Batch => self.interval,
        }
    }

    pub fn on_sent(&mut self, seqs: Vec<Seq>, now: Instant) {
        if let Some(last) = seqs.last() {
            self.next_after = self.next_after.max(*last);
        }
        self.last_send = Some(now);
        self.in_flight.push_back(Flight { seqs, sent: now });
    }

    /// Settles in-flight seqs the ack covers; batches fully settled leave the window.
    pub fn on_ack(&mut self, ack: &Ack) -> Settled {
        let mut settled = Settled::default();
        for flight in &mut self.in_flight {
            flight.seqs.retain(|s| {
                if ack.rejection(*s).is_some() {
                    settled.rejected.push(*s);
                    false
                } else if ack.covers(*s) {
                    settled.acked.push(*s);
                    false
                } else {
                    true
                }
            });
        }
        self.in_flight.retain(|f| !f.seqs.is_empty());
        settled
    }

    /// Whether the oldest batch in flight waited longer than `timeout` for its ack.
    pub fn timed_out(&self, now: Instant, timeout: Duration) -> bool {
        self.in_flight
            .front()
            .is_some_and(|f| now.duration_since(f.sent) >= timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeviceId;
    use crate::wire::{RejectReason, Rejected, SeqRange};

    fn lane(mode: UplinkMode) -> LaneState {
        LaneState::new(
            "l".into(),
            mode,
            Duration::from_millis(5),
            Duration::from_secs(30),
            2,
        )
    }

    fn ack(acked: &[u64], rejected: &[u64]) -> Ack {
        Ack {
            device: DeviceId("d".into()),
            acked: SeqRange::compact(acked.iter().map(|s| Seq(*s))),
            rejected: rejected
                .iter()
                .map(|s| Rejected {
                    seq: Seq(*s),
                    reason: RejectReason::Invalid,
                })
                .collect(),
            gateway_time_ms: 0,
        }
    }

    #[test]
    fn streaming_waits_for_the_linger_unless_the_batch_is_full() {
        let l = lane(UplinkMode::Stream);
        let t0 = Instant::now();
        assert!(!l.should_send(3, false, t0, t0));
        assert!(l.should_send(3, true, t0, t0));
        assert!(l.should_send(3, false, t0, t0 + Duration::from_millis(5)));
    }

    #[test]
    fn the_window_bounds_batches_in_flight() {
        let mut l = lane(UplinkMode::Stream);
        let t0 = Instant::now();
        l.on_sent(vec![Seq(1)], t0);
        l.on_sent(vec![Seq(2)], t0);
        assert!(!l.should_send(1, true, t0, t0));
        l.on_ack(&ack(&[1], &[]));
        assert!(l.should_send(1, true, t0, t0));
    }

    #[test]
    fn an_ack_settles_acked_and_rejected_seqs_and_leaves_the_rest() {
        let mut l = lane(UplinkMode::Stream);
        l.on_sent(vec![Seq(1), Seq(3), Seq(5)], Instant::now());
        let s = l.on_ack(&ack(&[1], &[3]));
        assert_eq!(
            s,
            Settled {
                acked: vec![Seq(1)],
                rejected: vec![Seq(3)]
            }
        );
        assert_eq!(l.in_flight(), 1);
        l.on_ack(&ack(&[5], &[]));
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn an_unacked_batch_times_out_and_reset_rereads_from_the_start() {
        let mut l = lane(UplinkMode::Stream);
        let t0 = Instant::now();
        l.on_sent(vec![Seq(7)], t0);
        assert_eq!(l.next_after(), Seq(7));
        assert!(!l.timed_out(t0 + Duration::from_secs(1), Duration::from_secs(10)));
        assert!(l.timed_out(t0 + Duration::from_secs(10), Duration::from_secs(10)));
        l.reset();
        assert_eq!((l.next_after(), l.in_flight()), (Seq(0), 0));
    }

    #[test]
    fn batch_mode_sends_on_the_interval() {
        let mut l = lane(UplinkMode::Batch);
        let t0 = Instant::now();
        assert!(l.should_send(1, false, t0, t0), "first batch goes at once");
        l.on_sent(vec![Seq(1)], t0);
        l.on_ack(&ack(&[1], &[]));
        assert!(!l.should_send(1, false, t0, t0 + Duration::from_secs(1)));
        assert!(l.should_send(1, false, t0, t0 + Duration::from_secs(30)));
    }
}
