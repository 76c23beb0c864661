//! Exactly-once admission per (device, lane), with no time window.
//!
//! Each uplink batch carries the lane's *floor*: every seq of that lane below it was
//! acknowledged or dropped by the agent, so it will never be sent again. An event is
//! new iff its seq is at or above the highest floor seen and not among the seqs
//! already stored above that floor. The set only holds what is in flight (sent but
//! not yet known by the agent to be acknowledged), so it stays small, and it is kept
//! in the same transaction as the inbox write.
//!
//! Why this is exact: the agent's floor only rises, and it resends only unacked
//! events, which are all at or above its current floor. An event below a floor the
//! gateway saw was therefore acknowledged before, which needs the gateway to have
//! stored it.

use serde::{Deserialize, Serialize};

/// Admission state of one (device, lane). Field order is the stored encoding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LaneDedup {
    /// Highest floor reported by the agent.
    pub floor: u64,
    /// Seqs at or above `floor` already stored, ascending.
    pub received: Vec<u64>,
}

impl LaneDedup {
    /// Takes a floor from a batch; lower (older) floors change nothing.
    pub fn raise_floor(&mut self, floor: u64) {
        if floor > self.floor {
            self.floor = floor;
            let keep_from = self.received.partition_point(|s| *s < floor);
            self.received.drain(..keep_from);
        }
    }

    /// Whether `seq` is new; records it if so.
    pub fn admit(&mut self, seq: u64) -> bool {
        if seq < self.floor {
            return false;
        }
        match self.received.binary_search(&seq) {
            Ok(_) => false,
            Err(at) => {
                self.received.insert(at, seq);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_batch_is_all_duplicates() {
        let mut d = LaneDedup::default();
        d.raise_floor(1);
        assert!([1, 3, 5].iter().all(|s| d.admit(*s)));
        assert!([1, 3, 5].iter().all(|s| !d.admit(*s)));
    }

    #[test]
    fn out_of_order_batches_are_each_admitted_once() {
        let mut d = LaneDedup::default();
        d.raise_floor(10);
        assert!(d.admit(20) && d.admit(21));
        // An older batch, delivered late by another path, still counts.
        assert!(d.admit(12) && d.admit(13));
        assert!(!d.admit(12));
    }

    #[test]
    fn a_higher_floor_forgets_what_the_agent_will_never_resend() {
        let mut d = LaneDedup::default();
        d.raise_floor(1);
        for s in 1..=5 {
            d.admit(s);
        }
        d.raise_floor(4);
        assert_eq!(d.received, vec![4, 5]);
        assert!(!d.admit(2), "below the floor: acknowledged before");
        d.raise_floor(2);
        assert_eq!(d.floor, 4, "floors never go down");
    }
}
