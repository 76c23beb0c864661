//! The gateway's clock: wall time plus an offset that only moves forward, and only
//! when `gateway.test_clock` allows it (`POST /v1/clock`): tests let time windows pass
//! without sleeping. Everything that dates events or evaluates time windows at the
//! gateway reads this clock.

use std::sync::atomic::{AtomicI64, Ordering};

static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Gateway time, ms since the epoch.
pub fn now_ms() -> i64 {
    edge_agent::model::now_ms().saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

/// Moves the clock forward by `ms` (negative values are ignored); returns the offset.
pub fn advance(ms: i64) -> i64 {
    let ms = ms.max(0);
    OFFSET_MS
        .fetch_add(ms, Ordering::Relaxed)
        .saturating_add(ms)
}

/// The current offset from wall time.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_only_moves_forward() {
        let before = now_ms();
        let offset = advance(3_600_000);
        assert!(offset >= 3_600_000);
        assert_eq!(advance(-5), offset);
        assert!(now_ms() >= before + 3_600_000);
    }
}
