//! `did` clauses: which events count as an occurrence, the per-profile state they
//! need (recent occurrence times), and whether enough occurrences fall in the window.
//!
//! An occurrence at `t` counts at `now` when `now - within < t <= now - before`
//! (`within` absent: no lower bound; `before` absent: 0). So an occurrence enters the
//! window at `t + before` and leaves it at `t + within`: time alone moves a profile in
//! and out, which is why such audiences are swept on a schedule.
//!
//! State is bounded: at most [`MAX_OCCURRENCES`] times, the newest, and none that
//! already left the window. Without `before`, the newest `at_least` are all that can
//! ever matter (older ones leave the window first), so only those are kept. With
//! `before`, younger occurrences that have not entered yet take room too; a profile
//! with more than [`MAX_OCCURRENCES`] occurrences younger than `before` sees its
//! older ones late, once younger ones age in. Pure: the caller passes `now`.

use edge_agent::model::Event;
use serde::{Deserialize, Serialize};

use super::predicate::Test;

/// Most occurrence times one [`DidState`] keeps; also the largest `at_least`.
pub const MAX_OCCURRENCES: usize = 64;

/// Stable identity of a `did` clause's content (event, type, where, window,
/// `at_least`), independent of the audience and the clause's position: a
/// [`DidState`] stored under it stays valid across restarts and config reorders, and
/// two audiences with the same clause can share one state. FNV-1a of
/// [`DidClause::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DidId(pub u64);

/// One property condition of a `where` list.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PropertyTest {
    pub(super) property: Box<str>,
    pub(super) test: Test,
}

/// A compiled `{ did = .. }` clause.
#[derive(Debug, Clone, PartialEq)]
pub struct DidClause {
    /// Position among the audience's `did` clauses (tree order).
    pub(super) index: usize,
    pub(super) id: DidId,
    pub(super) key: String,
    pub(super) event: Box<str>,
    pub(super) kind: Option<Box<str>>,
    pub(super) at_least: u32,
    pub(super) within_ms: Option<i64>,
    pub(super) before_ms: i64,
    pub(super) filters: Vec<PropertyTest>,
}

/// Recent occurrence times (ms since the epoch, ascending) of one `did` clause for one
/// profile. Stored with the profile (postcard: a length and varints).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DidState {
    times: Vec<i64>,
}

impl DidClause {
    /// Position among [`super::Audience::did_clauses`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// Stable content id: key the profile's state by this.
    pub fn id(&self) -> DidId {
        self.id
    }

    /// The canonical text [`DidClause::id`] hashes (JSON; for logs and explanations).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The event name counted.
    pub fn event(&self) -> &str {
        &self.event
    }

    pub fn at_least(&self) -> u32 {
        self.at_least
    }

    /// Whether `event` is an occurrence: its name, its type (when given), and every
    /// `where` condition on its properties (then traits, for identify calls).
    pub fn matches(&self, event: &Event) -> bool {
        if event.name.as_deref() != Some(&*self.event) {
            return false;
        }
        if let Some(kind) = &self.kind {
            if event.kind.as_str() != &**kind {
                return false;
            }
        }
        self.filters.iter().all(|f| {
            let value = event
                .properties
                .get(&f.property)
                .or_else(|| event.traits.get(&f.property));
            f.test.holds(value)
        })
    }

    /// Whether an occurrence at `t` counts at `now`.
    fn in_window(&self, t: i64, now: i64) -> bool {
        let young_enough = self.within_ms.is_none_or(|w| t > now.saturating_sub(w));
        young_enough && t <= now.saturating_sub(self.before_ms)
    }

    /// Occurrences of `state` in the window at `now`.
    pub fn count_in_window(&self, state: Option<&DidState>, now: i64) -> u32 {
        let Some(state) = state else { return 0 };
        let n = state
            .times
            .iter()
            .filter(|t| self.in_window(**t, now))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether at least `at_least` occurrences are in the window at `now`.
    pub fn holds(&self, state: Option<&DidState>, now: i64) -> bool {
        let Some(state) = state else { return false };
        let mut n = 0;
        for t in &state.times {
            if self.in_window(*t, now) {
                n += 1;
                if n >= self.at_least {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the window moves with time (a `within` or a `before`).
    pub fn depends_on_time(&self) -> bool {
        self.within_ms.is_some() || self.before_ms > 0
    }

    /// The first instant after `now` at which an occurrence of `state` enters or
    /// leaves the window.
    pub fn next_change_after(&self, state: Option<&DidState>, now: i64) -> Option<i64> {
        let state = state?;
        let mut next: Option<i64> = None;
        for t in &state.times {
            let enters = t.saturating_add(self.before_ms);
            let leaves = self.within_ms.map(|w| t.saturating_add(w));
            for at in std::iter::once(enters).chain(leaves) {
                if at > now && next.is_none_or(|n| at < n) {
                    next = Some(at);
                }
            }
        }
        next
    }

    /// Times worth keeping: see the module doc.
    fn keep(&self) -> usize {
        if self.before_ms > 0 {
            MAX_OCCURRENCES
        } else {
            usize::try_from(self.at_least).map_or(MAX_OCCURRENCES, |n| n.min(MAX_OCCURRENCES))
        }
    }

    /// Whether an occurrence at `t` has left the window for good at `now`.
    fn expired(&self, t: i64, now: i64) -> bool {
        self.within_ms.is_some_and(|w| t <= now.saturating_sub(w))
    }
}

impl DidState {
    /// Records an occurrence at event time `at_ms`. A time later than `now_ms` (a
    /// device clock ahead) counts as `now_ms`. Returns whether the state changed.
    pub fn record(&mut self, clause: &DidClause, at_ms: i64, now_ms: i64) -> bool {
        let at = at_ms.min(now_ms);
        if clause.expired(at, now_ms) {
            return false;
        }
        self.sort();
        if self.times.len() >= clause.keep() && self.times.first().is_some_and(|t| at < *t) {
            // Older than every kept time of a full state: it would be dropped at once.
            return false;
        }
        let at_pos = self.times.partition_point(|t| *t <= at);
        self.times.insert(at_pos, at);
        self.trim(clause, now_ms);
        true
    }

    /// Folds the state of a merged profile into this one (same clause).
    pub fn merge(&mut self, clause: &DidClause, other: &DidState, now_ms: i64) {
        self.times.extend_from_slice(&other.times);
        self.times.sort_unstable();
        self.trim(clause, now_ms);
    }

    /// Drops what has left the window for good; returns whether anything went.
    pub fn prune(&mut self, clause: &DidClause, now_ms: i64) -> bool {
        let before = self.times.len();
        self.sort();
        self.trim(clause, now_ms);
        self.times.len() != before
    }

    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Kept occurrence times, ascending.
    pub fn times(&self) -> &[i64] {
        &self.times
    }

    /// A state read back from storage is sorted unless the file was tampered with;
    /// sorting keeps the bounds right either way.
    fn sort(&mut self) {
        if !self.times.is_sorted() {
            self.times.sort_unstable();
        }
    }

    /// Expects `times` sorted.
    fn trim(&mut self, clause: &DidClause, now: i64) {
        let gone = self.times.partition_point(|t| clause.expired(*t, now));
        let over = (self.times.len() - gone).saturating_sub(clause.keep());
        self.times.drain(..gone + over);
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `DefaultHasher`).
pub(super) fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
