//! Which inbox seqs are done, with batches completing out of order.
//!
//! Entries are kept in inbox order. A batch entry covers every seq after the entry
//! before it up to its `through` (filtered events between batches included); a
//! skipped stretch (filtered or erased events only) is done from the start. The
//! committed cursor moves only over a prefix of done entries, so a crash never
//! skips a batch that is still being delivered.

use std::collections::VecDeque;

/// Identifies a batch in the window.
pub type BatchId = u64;

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    batch: Option<BatchId>,
    through: u64,
    done: bool,
}

/// Batches between the committed cursor and the read position.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    entries: VecDeque<Entry>,
    next_id: BatchId,
    committed: u64,
}

impl Window {
    /// An empty window after the committed cursor `committed`.
    pub fn new(committed: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            next_id: 0,
            committed,
        }
    }

    /// The cursor that is safe to commit.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Adds a batch covering seqs up to `through`; returns its id.
    pub fn push_batch(&mut self, through: u64) -> BatchId {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back(Entry {
            batch: Some(id),
            through,
            done: false,
        });
        id
    }

    /// Adds a stretch up to `through` with nothing to deliver.
    pub fn push_skipped(&mut self, through: u64) {
        if through <= self.last_through() {
            return;
        }
        match self.entries.back_mut() {
            Some(last) if last.batch.is_none() => last.through = through,
            _ => self.entries.push_back(Entry {
                batch: None,
                through,
                done: true,
            }),
        }
    }

    /// Marks batch `id` done (delivered or dead-lettered).
    pub fn complete(&mut self, id: BatchId) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.batch == Some(id)) {
            e.done = true;
        }
    }

    /// Drops the done prefix; returns the new committed cursor if it moved.
    pub fn advance(&mut self) -> Option<u64> {
        let before = self.committed;
        while self.entries.front().is_some_and(|e| e.done) {
            if let Some(e) = self.entries.pop_front() {
                self.committed = self.committed.max(e.through);
            }
        }
        (self.committed != before).then_some(self.committed)
    }

    /// Batches not done yet.
    pub fn in_flight(&self) -> usize {
        self.entries.iter().filter(|e| !e.done).count()
    }

    /// Entries held (done ones wait here behind an unfinished batch).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn last_through(&self) -> u64 {
        self.entries.back().map_or(self.committed, |e| e.through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_moves_only_over_a_done_prefix() {
        let mut w = Window::new(10);
        let a = w.push_batch(20);
        let b = w.push_batch(30);
        let c = w.push_batch(40);
        assert_eq!(w.in_flight(), 3);
        w.complete(b);
        w.complete(c);
        assert_eq!(w.advance(), None);
        assert_eq!(w.committed(), 10);
        w.complete(a);
        assert_eq!(w.advance(), Some(40));
        assert!(w.is_empty());
    }

    #[test]
    fn skipped_stretches_merge_and_wait_behind_unfinished_batches() {
        let mut w = Window::new(0);
        let a = w.push_batch(5);
        w.push_skipped(8);
        w.push_skipped(9);
        w.push_skipped(9);
        assert_eq!(w.len(), 2);
        assert_eq!(w.in_flight(), 1);
        assert_eq!(w.advance(), None);
        w.complete(a);
        assert_eq!(w.advance(), Some(9));
    }

    #[test]
    fn a_skipped_stretch_alone_commits_at_once() {
        let mut w = Window::new(3);
        w.push_skipped(2);
        assert_eq!(w.advance(), None);
        w.push_skipped(7);
        assert_eq!(w.advance(), Some(7));
    }

    #[test]
    fn completing_an_unknown_batch_changes_nothing() {
        let mut w = Window::new(0);
        w.push_batch(1);
        w.complete(99);
        assert_eq!(w.advance(), None);
        assert_eq!(w.in_flight(), 1);
    }
}
