//! The newest resolved groups, kept in memory for readers that keep up.
//!
//! Every destination (and the audience engine) reads every resolved event. Read back
//! from redb, each of them decodes the inbox record and its enrichment row again — in
//! the fan-out benchmark that was a fifth of the gateway's CPU. The stage already holds
//! both decoded when it commits a group, so it hands the group here; a reader whose
//! cursor falls inside the tail takes shared pointers instead of decoding. Readers
//! further behind (after a restart, a slow destination) read redb as before: the tail
//! is only a cache of what is committed, never the source of truth.
//!
//! Bounded by events ([`TAIL_EVENTS`]). Emptied on an erase, so an erased user's
//! events are never served from memory after the erase started.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Routed, RoutedPage};

/// Most resolved events kept. Destinations at full speed trail the stage by a few
/// thousand events (fan-out benchmark: 4,000–8,000); a decoded event is about 2 KiB.
pub const TAIL_EVENTS: usize = 10_000;

/// Resolved inbox seqs `(after, through]`: `events` are those still in the inbox
/// (records erased before resolution are simply absent), in seq order.
#[derive(Debug)]
pub struct ResolvedGroup {
    pub after: u64,
    pub through: u64,
    pub events: Vec<Arc<Routed>>,
}

/// Consecutive resolved groups, oldest first.
#[derive(Debug, Default)]
pub struct Tail {
    groups: VecDeque<ResolvedGroup>,
    events: usize,
    capacity: usize,
}

impl Tail {
    pub fn new(capacity: usize) -> Self {
        Tail {
            capacity,
            ..Tail::default()
        }
    }

    /// Appends a committed group. A group that does not follow the newest one (the
    /// stage restarted from an older cursor) replaces everything kept. Returns the
    /// groups that left, for the caller to free where it costs the stage nothing
    /// (freeing thousands of cold decoded events is not cheap).
    #[must_use]
    pub fn push(&mut self, group: ResolvedGroup) -> Vec<ResolvedGroup> {
        let mut gone = Vec::new();
        if group.through <= group.after {
            return gone;
        }
        if self.groups.back().is_some_and(|g| g.through != group.after) {
            gone.extend(self.groups.drain(..));
            self.events = 0;
        }
        self.events += group.events.len();
        self.groups.push_back(group);
        while self.events > self.capacity && self.groups.len() > 1 {
            if let Some(old) = self.groups.pop_front() {
                self.events -= old.events.len();
                gone.push(old);
            }
        }
        gone
    }

    pub fn clear(&mut self) {
        self.groups.clear();
        self.events = 0;
    }

    /// Up to `max` events after seq `after` and at most `head`, when the tail covers
    /// `after`; `None` sends the reader to redb.
    pub fn read(&self, after: u64, max: usize, head: u64) -> Option<RoutedPage> {
        let first = self.groups.front()?;
        let last = self.groups.back()?;
        if after < first.after || after >= last.through || after >= head || max == 0 {
            return None;
        }
        let start = self.groups.partition_point(|g| g.through <= after);
        let mut page = RoutedPage {
            through: after,
            events: Vec::with_capacity(max.min(self.events)),
        };
        for group in self.groups.range(start..) {
            if group.after >= head {
                break;
            }
            let from = group.events.partition_point(|e| e.seq <= after);
            let to = group.events.partition_point(|e| e.seq <= head);
            let rest = group.events.get(from..to).unwrap_or_default();
            let room = max - page.events.len();
            if rest.len() > room {
                page.events.extend(rest.iter().take(room).cloned());
                page.through = page.events.last().map_or(page.through, |e| e.seq);
                return Some(page);
            }
            page.events.extend(rest.iter().cloned());
            page.through = group.through.min(head);
            if page.events.len() == max {
                break;
            }
        }
        Some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::Enrichment;
    use crate::store::InboxRecord;
    use edge_agent::model::{DeviceId, Event, EventKind, Source};

    fn group(after: u64, through: u64, seqs: &[u64]) -> ResolvedGroup {
        ResolvedGroup {
            after,
            through,
            events: seqs
                .iter()
                .map(|&seq| {
                    Arc::new(Routed {
                        seq,
                        record: std::sync::Arc::new(InboxRecord {
                            sender: DeviceId("tv-1".into()),
                            received_ms: 0,
                            corrected_timestamp_ms: 0,
                            event: Event::new(EventKind::Track, Source::Segment, 0),
                        }),
                        enrichment: Enrichment::default(),
                    })
                })
                .collect(),
        }
    }

    fn seqs(page: &RoutedPage) -> Vec<u64> {
        page.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_reader_inside_the_tail_gets_the_following_events_across_groups() {
        let mut t = Tail::new(100);
        let _ = t.push(group(0, 3, &[1, 2, 3]));
        // Seq 5 was erased before it was resolved; 7 is the head past the last record.
        let _ = t.push(group(3, 7, &[4, 6]));
        let p = t.read(0, 10, u64::MAX).expect("covered");
        assert_eq!((seqs(&p), p.through), (vec![1, 2, 3, 4, 6], 7));
        let p = t.read(2, 2, u64::MAX).expect("covered");
        assert_eq!((seqs(&p), p.through), (vec![3, 4], 4));
        let p = t.read(3, 2, u64::MAX).expect("covered");
        assert_eq!((seqs(&p), p.through), (vec![4, 6], 7));
        let p = t.read(6, 10, u64::MAX).expect("covered");
        assert_eq!((seqs(&p), p.through), (vec![], 7));
    }

    #[test]
    fn a_reader_capped_at_a_head_stops_there() {
        let mut t = Tail::new(100);
        let _ = t.push(group(0, 3, &[1, 2, 3]));
        let _ = t.push(group(3, 7, &[4, 6]));
        let p = t.read(0, 10, 3).expect("covered");
        assert_eq!((seqs(&p), p.through), (vec![1, 2, 3], 3));
        let p = t.read(0, 10, 5).expect("covered");
        assert_eq!((seqs(&p), p.through), (vec![1, 2, 3, 4], 5));
        assert!(t.read(3, 10, 3).is_none(), "nothing after the head");
    }

    #[test]
    fn readers_outside_the_tail_go_to_redb() {
        let mut t = Tail::new(100);
        assert!(t.read(0, 10, u64::MAX).is_none());
        let _ = t.push(group(10, 12, &[11, 12]));
        assert!(t.read(9, 10, u64::MAX).is_none(), "behind the oldest group");
        assert!(t.read(12, 10, u64::MAX).is_none(), "at the head");
        assert!(t.read(10, 0, u64::MAX).is_none());
    }

    #[test]
    fn the_oldest_groups_go_beyond_the_capacity_and_a_gap_empties_the_tail() {
        let mut t = Tail::new(4);
        let _ = t.push(group(0, 2, &[1, 2]));
        let _ = t.push(group(2, 4, &[3, 4]));
        let _ = t.push(group(4, 6, &[5, 6]));
        assert!(t.read(0, 10, u64::MAX).is_none());
        assert_eq!(
            seqs(&t.read(2, 10, u64::MAX).expect("kept")),
            vec![3, 4, 5, 6]
        );
        let _ = t.push(group(9, 10, &[10]));
        assert!(t.read(4, 10, u64::MAX).is_none());
        assert_eq!(seqs(&t.read(9, 10, u64::MAX).expect("kept")), vec![10]);
        t.clear();
        assert!(t.read(9, 10, u64::MAX).is_none());
    }
}
