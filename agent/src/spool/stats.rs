//! Counters and levels kept with the spool, persisted in the same commit as the
//! events they describe so they never disagree with the file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Events the agent dropped on purpose, by reason. Reported upstream; never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Drops {
    /// Refused before the spool write: a required purpose was not granted.
    pub consent_denied: u64,
    /// Removed from the spool because the user revoked a purpose they needed.
    pub consent_purged: u64,
    /// Removed to make room in a full `drop_oldest` lane.
    pub lane_full: u64,
    /// Removed after outliving their lane's TTL.
    pub ttl_expired: u64,
    /// Could not be stored (failed to encode).
    pub invalid: u64,
}

impl Drops {
    /// `(reason, count)` pairs, in a stable order, for status and metrics.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("consent_denied", self.consent_denied),
            ("consent_purged", self.consent_purged),
            ("lane_full", self.lane_full),
            ("ttl_expired", self.ttl_expired),
            ("invalid", self.invalid),
        ]
    }

    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

/// What data subject requests erased here (`Control::PurgeUser` from the gateway).
/// Kept apart from [`Drops`]: those travel in every uplink batch, and the gateway
/// asked for these itself. Field order is part of the stored encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Erasures {
    /// Purge requests carried out (a request the gateway sends again counts again).
    pub purges: u64,
    /// Queued events removed by them.
    pub events: u64,
}

/// Level of one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LaneLevel {
    pub events: u64,
    pub bytes: u64,
}

/// Everything the spool counts. Field order is part of the stored encoding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpoolStats {
    /// Next sequence number to assign.
    pub next_seq: u64,
    pub accepted: u64,
    pub drops: Drops,
    pub lanes: BTreeMap<String, LaneLevel>,
    /// Bytes removed since the file was last compacted.
    pub removed_since_compact: u64,
}

impl SpoolStats {
    pub fn lane_mut(&mut self, lane: &str) -> &mut LaneLevel {
        self.lanes.entry(lane.to_owned()).or_default()
    }

    pub fn queued_bytes(&self) -> u64 {
        self.lanes.values().map(|l| l.bytes).sum()
    }
}
