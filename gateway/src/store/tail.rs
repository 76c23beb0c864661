//! The newest committed inbox records, decoded, for the profile stage.
//!
//! The writer has every record in hand when it encodes it for the inbox; keeping it
//! (behind an `Arc`) after the commit saves the profile stage decoding it back, which
//! was most of the stage's read cost. The stage keeps up with the receive path in
//! normal operation, so what it reads next is almost always here; when it is behind
//! (after a restart, under overload) it reads redb. Only committed records enter, and
//! any write outside the receive path (an erase removing records) empties the tail,
//! so it never holds what the inbox does not.

use std::collections::VecDeque;
use std::sync::Arc;

use super::InboxRecord;

/// Most records kept. Above the endpoint's default `pace_lag` (10,000) plus a group
/// or two, so a stage the pacing keeps within that lag always reads here: when it
/// could lag past the tail, reading records back from redb took 7 % of the gateway's
/// CPU at 100k events/s. Records are shared with the resolved tail, so
/// the memory held overlaps; this and [`crate::profiles::TAIL_EVENTS`] together
/// are what keeps the gateway under 512 MiB with a million profiles.
pub const INBOX_TAIL_EVENTS: usize = 16_384;

/// Consecutive inbox records, oldest first.
#[derive(Debug, Default)]
pub struct InboxTail {
    records: VecDeque<(u64, Arc<InboxRecord>)>,
    capacity: usize,
}

impl InboxTail {
    pub fn new(capacity: usize) -> Self {
        InboxTail {
            records: VecDeque::new(),
            capacity,
        }
    }

    /// Appends records just committed, in seq order, when they fit and follow the
    /// newest kept one. Otherwise they are not kept: the tail goes on holding the
    /// records its reader needs next, and takes new ones again once the reader has
    /// released everything (so records are freed by the reader that used them, hot,
    /// not by the writer long after, cold: that cost more than decoding).
    pub fn extend(&mut self, fresh: Vec<(u64, Arc<InboxRecord>)>) {
        let Some(first) = fresh.first().map(|(seq, _)| *seq) else {
            return;
        };
        let follows = self
            .records
            .back()
            .is_none_or(|(last, _)| last.checked_add(1) == Some(first));
        if follows && self.records.len() + fresh.len() <= self.capacity {
            self.records.extend(fresh);
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }

    /// Forgets records up to `through`: their reader (the profile stage, the only
    /// one) is past them, and memory is better spent on those it has not read.
    pub fn release(&mut self, through: u64) {
        while self.records.front().is_some_and(|(seq, _)| *seq <= through) {
            self.records.pop_front();
        }
    }

    /// Up to `max` records after seq `after` when the tail holds the one right after
    /// it; `None` sends the reader to redb.
    pub fn read(&self, after: u64, max: usize) -> Option<Vec<(u64, Arc<InboxRecord>)>> {
        let (first, _) = self.records.front()?;
        let (last, _) = self.records.back()?;
        if after < first.saturating_sub(1) || after >= *last {
            return None;
        }
        let skip = usize::try_from(after.saturating_add(1).saturating_sub(*first)).ok()?;
        Some(
            self.records
                .iter()
                .skip(skip)
                .take(max)
                .map(|(seq, r)| (*seq, Arc::clone(r)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{DeviceId, Event, EventKind, Source};

    fn records(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, Arc<InboxRecord>)> {
        seqs.map(|seq| {
            let record = InboxRecord {
                sender: DeviceId("tv-1".into()),
                received_ms: 0,
                corrected_timestamp_ms: 0,
                event: Event::new(EventKind::Track, Source::Segment, 0),
            };
            (seq, Arc::new(record))
        })
        .collect()
    }

    fn seqs(v: &[(u64, Arc<InboxRecord>)]) -> Vec<u64> {
        v.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn a_reader_right_behind_gets_the_next_records() {
        let mut t = InboxTail::new(100);
        assert!(t.read(0, 10).is_none());
        t.extend(records(5..=7));
        t.extend(records(8..=9));
        assert_eq!(seqs(&t.read(4, 10).expect("covered")), [5, 6, 7, 8, 9]);
        assert_eq!(seqs(&t.read(6, 2).expect("covered")), [7, 8]);
        assert!(t.read(3, 10).is_none(), "seq 4 is not kept");
        assert!(t.read(9, 10).is_none(), "nothing after the newest");
    }

    #[test]
    fn records_that_do_not_fit_or_follow_are_not_kept_until_the_reader_released_all() {
        let mut t = InboxTail::new(3);
        t.extend(records(1..=2));
        t.extend(records(3..=4));
        assert_eq!(
            seqs(&t.read(0, 10).expect("covered")),
            [1, 2],
            "3..=4 did not fit"
        );
        t.extend(records(5..=5));
        assert_eq!(
            seqs(&t.read(0, 10).expect("covered")),
            [1, 2],
            "5 does not follow 2"
        );
        t.release(2);
        t.extend(records(6..=6));
        assert_eq!(
            seqs(&t.read(5, 10).expect("covered")),
            [6],
            "empty: takes new ones"
        );
        t.clear();
        assert!(t.read(5, 10).is_none());
    }

    #[test]
    fn released_records_are_gone_and_the_rest_still_served() {
        let mut t = InboxTail::new(100);
        t.extend(records(1..=5));
        t.release(3);
        assert!(t.read(2, 10).is_none());
        assert_eq!(seqs(&t.read(3, 10).expect("covered")), [4, 5]);
        t.release(9);
        assert!(t.read(5, 10).is_none());
        t.extend(records(6..=6));
        assert_eq!(seqs(&t.read(5, 10).expect("covered")), [6]);
    }
}
