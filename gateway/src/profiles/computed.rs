//! Computed attributes (`[[computed]]`): their stored state, how one event updates it,
//! how two profiles' states merge, and the current value at a given time.
//!
//! Windowed attributes keep time buckets ([`BUCKETS_PER_WINDOW`] per window, keyed by
//! event time), so values expire as time passes without keeping every event: the
//! current value counts the buckets that overlap `(now - window, now]`, so an event
//! leaves the value at most one bucket width (window/24) late. Pure: the caller
//! passes `now`.

use edge_agent::model::{Event, Value};
use serde::{Deserialize, Serialize};

use crate::config::{ComputedConfig, ComputedKind};

/// Buckets a window is split into.
const BUCKETS_PER_WINDOW: i64 = 24;

/// One `[[computed]]` entry, ready to apply.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    kind: ComputedKind,
    event: Option<String>,
    event_type: Option<String>,
    property: Option<String>,
    /// `(window, bucket width)` in ms; `None` = all time (one bucket, start 0).
    window: Option<(i64, i64)>,
    max_values: usize,
}

/// A value stamped with the event time it came from, in its bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub bucket: i64,
    pub at_ms: i64,
    pub value: Value,
}

/// Stored state of one computed attribute. Variant order is the stored encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum State {
    /// `(bucket start, count)`.
    Count(Vec<(i64, u64)>),
    /// `(bucket start, sum)`.
    Sum(Vec<(i64, f64)>),
    /// The earliest value per bucket.
    First(Vec<Stamped>),
    /// The latest value per bucket.
    Last(Vec<Stamped>),
    /// `(distinct value, last seen ms)`.
    Unique(Vec<(Value, i64)>),
}

impl Spec {
    pub fn new(config: &ComputedConfig) -> Self {
        let window = config.window.map(|w| {
            let ms = i64::try_from(w.as_millis()).unwrap_or(i64::MAX).max(1);
            (ms, (ms / BUCKETS_PER_WINDOW).max(1))
        });
        Spec {
            name: config.name.clone(),
            kind: config.kind,
            event: config.event.clone(),
            event_type: config.event_type.clone(),
            property: config.property.clone(),
            window,
            max_values: config.max_values.max(1),
        }
    }

    /// An empty state of this attribute's kind.
    pub fn empty(&self) -> State {
        match self.kind {
            ComputedKind::Count => State::Count(Vec::new()),
            ComputedKind::Sum => State::Sum(Vec::new()),
            ComputedKind::First => State::First(Vec::new()),
            ComputedKind::Last => State::Last(Vec::new()),
            ComputedKind::Unique => State::Unique(Vec::new()),
        }
    }

    /// Whether `state` was made for this kind (a config change can change the kind
    /// under a kept name; such a state starts over).
    pub fn fits(&self, state: &State) -> bool {
        matches!(
            (self.kind, state),
            (ComputedKind::Count, State::Count(_))
                | (ComputedKind::Sum, State::Sum(_))
                | (ComputedKind::First, State::First(_))
                | (ComputedKind::Last, State::Last(_))
                | (ComputedKind::Unique, State::Unique(_))
        )
    }

    /// Whether `event` counts for this attribute at all.
    pub fn matches(&self, event: &Event) -> bool {
        if let Some(name) = &self.event {
            if event.name.as_deref() != Some(name.as_str()) {
                return false;
            }
        }
        if let Some(ty) = &self.event_type {
            if event.kind.as_str() != ty {
                return false;
            }
        }
        true
    }

    fn bucket(&self, at_ms: i64) -> i64 {
        match self.window {
            Some((_, width)) => at_ms.div_euclid(width) * width,
            None => 0,
        }
    }

    /// Whether a bucket still overlaps the window ending at `now`.
    fn live(&self, bucket: i64, now: i64) -> bool {
        match self.window {
            Some((window, width)) => bucket.saturating_add(width) > now.saturating_sub(window),
            None => true,
        }
    }

    fn seen_live(&self, at_ms: i64, now: i64) -> bool {
        match self.window {
            Some((window, _)) => at_ms > now.saturating_sub(window),
            None => true,
        }
    }

    /// Applies `event` (event time `at_ms`) to `state`; `now` expires old buckets.
    /// Returns whether anything changed.
    pub fn update(&self, state: &mut State, event: &Event, at_ms: i64, now: i64) -> bool {
        if !self.matches(event) {
            return false;
        }
        let bucket = self.bucket(at_ms);
        if !self.live(bucket, now) {
            return false;
        }
        // Properties first; identify and group calls carry their values as traits.
        let input = self
            .property
            .as_deref()
            .and_then(|p| event.properties.get(p).or_else(|| event.traits.get(p)));
        self.expire(state, now);
        match state {
            State::Count(buckets) => {
                add_to(buckets, bucket, 1u64, |a, b| a.saturating_add(b));
                true
            }
            State::Sum(buckets) => match input.and_then(number) {
                Some(n) => {
                    add_to(buckets, bucket, n, |a, b| a + b);
                    true
                }
                None => false,
            },
            State::First(stamps) => match input.filter(|v| **v != Value::Null) {
                Some(v) => keep(stamps, bucket, at_ms, v, |new, old| new < old),
                None => false,
            },
            State::Last(stamps) => match input.filter(|v| **v != Value::Null) {
                Some(v) => keep(stamps, bucket, at_ms, v, |new, old| new >= old),
                None => false,
            },
            State::Unique(values) => match input.filter(|v| **v != Value::Null) {
                Some(v) => {
                    self.add_unique(values, v.clone(), at_ms);
                    true
                }
                None => false,
            },
        }
    }

    fn expire(&self, state: &mut State, now: i64) {
        if self.window.is_none() {
            return;
        }
        match state {
            State::Count(b) => b.retain(|(start, _)| self.live(*start, now)),
            State::Sum(b) => b.retain(|(start, _)| self.live(*start, now)),
            State::First(s) | State::Last(s) => s.retain(|st| self.live(st.bucket, now)),
            State::Unique(v) => v.retain(|(_, seen)| self.seen_live(*seen, now)),
        }
    }

    /// Keeps `value` as seen at `at_ms`, within `max_values`: a full all-time list
    /// takes no more; a full windowed list gives up its least recently seen value if
    /// that is older.
    fn add_unique(&self, values: &mut Vec<(Value, i64)>, value: Value, at_ms: i64) {
        if let Some(slot) = values.iter_mut().find(|(v, _)| *v == value) {
            slot.1 = slot.1.max(at_ms);
            return;
        }
        if values.len() < self.max_values {
            values.push((value, at_ms));
            return;
        }
        if self.window.is_none() {
            return;
        }
        let oldest = values
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, seen))| *seen)
            .map(|(i, (_, seen))| (i, *seen));
        if let Some((i, _)) = oldest.filter(|(_, seen)| *seen < at_ms) {
            values[i] = (value, at_ms);
        }
    }

    /// Folds `other` (a merged profile's state) into `into`.
    pub fn merge(&self, into: &mut State, other: State, now: i64) {
        match (&mut *into, other) {
            (State::Count(a), State::Count(b)) => {
                for (start, n) in b {
                    add_to(a, start, n, |x, y| x.saturating_add(y));
                }
            }
            (State::Sum(a), State::Sum(b)) => {
                for (start, n) in b {
                    add_to(a, start, n, |x, y| x + y);
                }
            }
            (State::First(a), State::First(b)) => {
                for s in b {
                    keep(a, s.bucket, s.at_ms, &s.value, |new, old| new < old);
                }
            }
            (State::Last(a), State::Last(b)) => {
                for s in b {
                    keep(a, s.bucket, s.at_ms, &s.value, |new, old| new > old);
                }
            }
            (State::Unique(a), State::Unique(b)) => {
                for (v, seen) in b {
                    self.add_unique(a, v, seen);
                }
            }
            (into, other) => {
                // Kinds differ only after a config change; keep whichever fits.
                if !self.fits(into) && self.fits(&other) {
                    *into = other;
                }
            }
        }
        self.expire(into, now);
    }

    /// The value as of `now`. `None` state = no event counted yet.
    pub fn current(&self, state: Option<&State>, now: i64) -> Value {
        let state = state.filter(|s| self.fits(s));
        match (self.kind, state) {
            (ComputedKind::Count, Some(State::Count(b))) => {
                let n: u64 = b
                    .iter()
                    .filter(|(s, _)| self.live(*s, now))
                    .fold(0, |acc, (_, n)| acc.saturating_add(*n));
                Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
            }
            (ComputedKind::Count, _) => Value::Int(0),
            (ComputedKind::Sum, Some(State::Sum(b))) => Value::Float(
                b.iter()
                    .filter(|(s, _)| self.live(*s, now))
                    .map(|(_, n)| n)
                    .sum(),
            ),
            (ComputedKind::Sum, _) => Value::Float(0.0),
            (ComputedKind::First, Some(State::First(s))) => s
                .iter()
                .filter(|st| self.live(st.bucket, now))
                .min_by_key(|st| st.at_ms)
                .map_or(Value::Null, |st| st.value.clone()),
            (ComputedKind::Last, Some(State::Last(s))) => s
                .iter()
                .filter(|st| self.live(st.bucket, now))
                .max_by_key(|st| st.at_ms)
                .map_or(Value::Null, |st| st.value.clone()),
            (ComputedKind::Unique, Some(State::Unique(v))) => Value::Array(
                v.iter()
                    .filter(|(_, seen)| self.seen_live(*seen, now))
                    .map(|(v, _)| v.clone())
                    .collect(),
            ),
            (ComputedKind::Unique, _) => Value::Array(Vec::new()),
            (ComputedKind::First | ComputedKind::Last, _) => Value::Null,
        }
    }
}

fn add_to<T: Copy>(buckets: &mut Vec<(i64, T)>, start: i64, n: T, add: impl Fn(T, T) -> T) {
    match buckets.iter_mut().find(|(s, _)| *s == start) {
        Some(slot) => slot.1 = add(slot.1, n),
        None => buckets.push((start, n)),
    }
}

/// Keeps `value` in `bucket` if `wins(at_ms, kept_at)` or the bucket is empty.
fn keep(
    stamps: &mut Vec<Stamped>,
    bucket: i64,
    at_ms: i64,
    value: &Value,
    wins: impl Fn(i64, i64) -> bool,
) -> bool {
    match stamps.iter_mut().find(|s| s.bucket == bucket) {
        Some(slot) if wins(at_ms, slot.at_ms) => {
            slot.at_ms = at_ms;
            slot.value = value.clone();
            true
        }
        Some(_) => false,
        None => {
            stamps.push(Stamped {
                bucket,
                at_ms,
                value: value.clone(),
            });
            true
        }
    }
}

/// A property as a number: numbers, and strings that parse as one (`"9.99"`).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::UInt(u) => Some(*u as f64),
        Value::Float(f) if f.is_finite() => Some(*f),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{EventKind, Source};

    const DAY: i64 = 24 * 3600 * 1000;

    fn spec(toml_text: &str) -> Spec {
        let c: ComputedConfig = toml::from_str(toml_text).unwrap();
        Spec::new(&c)
    }

    fn order(revenue: f64, product: &str) -> Event {
        let mut e = Event::new(EventKind::Track, Source::Segment, 0);
        e.name = Some("Order".into());
        e.properties.insert("revenue", Value::Float(revenue));
        e.properties.insert("product", Value::from(product));
        e
    }

    #[test]
    fn windowed_count_forgets_events_as_time_passes() {
        let s = spec("name = 'orders_7d'\nkind = 'count'\nevent = 'Order'\nwindow = '7d'");
        let now = 100 * DAY;
        let mut st = s.empty();
        assert!(
            !s.update(&mut st, &order(1.0, "x"), now - 10 * DAY, now),
            "too old"
        );
        assert!(s.update(&mut st, &order(1.0, "x"), now - 6 * DAY, now));
        assert!(s.update(&mut st, &order(1.0, "x"), now - DAY, now));
        assert_eq!(s.current(Some(&st), now), Value::Int(2));
        assert_eq!(s.current(Some(&st), now + 2 * DAY), Value::Int(1));
        assert_eq!(s.current(Some(&st), now + 7 * DAY), Value::Int(0));
    }

    #[test]
    fn events_of_other_names_do_not_count() {
        let s = spec("name = 'orders'\nkind = 'count'\nevent = 'Order'");
        let mut st = s.empty();
        let mut other = order(1.0, "x");
        other.name = Some("Play".into());
        assert!(!s.update(&mut st, &other, 0, 0));
        assert_eq!(s.current(Some(&st), 0), Value::Int(0));
    }

    #[test]
    fn merged_states_add_counts_and_sums_and_keep_first_last_and_union() {
        let now = 50 * DAY;
        let specs = [
            spec("name = 'n'\nkind = 'count'"),
            spec("name = 's'\nkind = 'sum'\nproperty = 'revenue'"),
            spec("name = 'f'\nkind = 'first'\nproperty = 'product'"),
            spec("name = 'l'\nkind = 'last'\nproperty = 'product'"),
            spec("name = 'u'\nkind = 'unique'\nproperty = 'product'\nmax_values = 3"),
        ];
        let a_events = [(10.0, "x", 2 * DAY), (5.0, "y", 4 * DAY)];
        let b_events = [(7.0, "z", DAY), (1.0, "w", 3 * DAY)];
        for s in &specs {
            let mut a = s.empty();
            for (r, p, t) in a_events {
                s.update(&mut a, &order(r, p), t, now);
            }
            let mut b = s.empty();
            for (r, p, t) in b_events {
                s.update(&mut b, &order(r, p), t, now);
            }
            s.merge(&mut a, b, now);
            let got = s.current(Some(&a), now);
            let want = match s.name.as_str() {
                "n" => Value::Int(4),
                "s" => Value::Float(23.0),
                "f" => Value::from("z"),
                "l" => Value::from("y"),
                _ => Value::Array(vec!["x".into(), "y".into(), "z".into()]),
            };
            assert_eq!(got, want, "{}", s.name);
        }
    }
}
