//! The normalized event model shared by ingest, spool and (later) the wire protocol.
//! Pure data: no I/O here.

mod event;
mod value;

pub use event::{ConsentSnapshot, DeviceId, Event, EventId, EventKind, Identities, Seq, Source};
pub use value::{Map, Str, Value, MAX_DEPTH};

/// Milliseconds since the Unix epoch, wall clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
