//! The gateway's answer to batches (`…/ack`): which seqs it has durably committed and
//! which it refuses for good.
//!
//! ```text
//! Ack
//! +-----------+-------------------------+--------------------------+-----------------+
//! | device    | acked                   | rejected                 | gateway_time_ms |
//! | String    | varint n, n × SeqRange  | varint n, n × Rejected   | zigzag i64      |
//! +-----------+-------------------------+--------------------------+-----------------+
//!               (1)                       (2)                        (3)
//!
//! SeqRange = first varint u64, last varint u64           (inclusive, first <= last)
//! Rejected = seq varint u64, reason varint tag:
//!            0 invalid | 1 device_mismatch | 2 too_large | 3 unauthorized
//!
//! e.g. Ack { "dev-1", [10..=12], [14: too_large], 1_700_000_000_900 } as a frame:
//!   01 00  05 64 65 76 2d 31  01 0a 0c  01 0e 02  88 ae ab fe f9 62
//! ```
//!
//! 1. Seqs the gateway holds durably, including duplicates it already had. The agent
//!    deletes them. `decode_ack` refuses a range with `first > last`. Ranges are
//!    built from the seqs actually received ([`SeqRange::compact`]), never from a
//!    batch's span, whose gaps belong to other lanes.
//! 2. Events the gateway will never accept. Final: the agent deletes and counts them
//!    instead of resending them.
//! 3. Gateway wall clock at send, ms since the epoch, for the agent's skew estimate.
//!
//! [`RejectReason`] variants are tagged by position: append only, and since an older
//! agent cannot decode a tag it does not know, a new reason ships to agents before any
//! gateway sends it.

use serde::{Deserialize, Serialize};

use crate::model::{DeviceId, Seq};

/// Inclusive range of seqs, `first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: Seq,
    pub last: Seq,
}

impl SeqRange {
    /// The range holding only `seq`.
    pub fn single(seq: Seq) -> Self {
        SeqRange {
            first: seq,
            last: seq,
        }
    }

    pub fn contains(&self, seq: Seq) -> bool {
        self.first <= seq && seq <= self.last
    }

    /// The fewest ranges covering exactly `seqs`, for seqs given in increasing order
    /// (duplicates allowed). Out-of-order input still yields ranges that cover exactly
    /// the given seqs, only less compactly.
    pub fn compact(seqs: impl IntoIterator<Item = Seq>) -> Vec<SeqRange> {
        let mut out: Vec<SeqRange> = Vec::new();
        for seq in seqs {
            match out.last_mut() {
                Some(r) if r.contains(seq) => {}
                Some(r) if r.last.0.checked_add(1) == Some(seq.0) => r.last = seq,
                _ => out.push(SeqRange::single(seq)),
            }
        }
        out
    }
}

/// Why the gateway refused an event for good. Variant order is the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The event fails the gateway's validation (missing fields, out-of-range values,
    /// not in the batch's lane...).
    Invalid,
    /// The batch names a device other than the identity it arrived under.
    DeviceMismatch,
    /// The event is over the gateway's size limit.
    TooLarge,
    /// The device may not send this event (revoked, or outside its permissions).
    Unauthorized,
}

impl RejectReason {
    /// Stable lowercase name for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Invalid => "invalid",
            RejectReason::DeviceMismatch => "device_mismatch",
            RejectReason::TooLarge => "too_large",
            RejectReason::Unauthorized => "unauthorized",
        }
    }
}

/// One event the gateway refuses, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rejected {
    pub seq: Seq,
    pub reason: RejectReason,
}

/// The gateway's answer on `…/ack`, sent after its durable commit. Field order is the
/// encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The device the ack is for.
    pub device: DeviceId,
    /// Seqs durably held by the gateway (new or duplicate): delete them.
    pub acked: Vec<SeqRange>,
    /// Seqs refused for good: delete and count them.
    pub rejected: Vec<Rejected>,
    /// Gateway wall clock at send, ms since the epoch.
    pub gateway_time_ms: i64,
}

impl Ack {
    /// Whether `seq` is in one of the acked ranges (rejections are not acks).
    pub fn covers(&self, seq: Seq) -> bool {
        self.acked.iter().any(|r| r.contains(seq))
    }

    /// Why `seq` was rejected, if it was.
    pub fn rejection(&self, seq: Seq) -> Option<RejectReason> {
        self.rejected
            .iter()
            .find(|r| r.seq == seq)
            .map(|r| r.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_ack, Compression};

    fn seqs(v: &[u64]) -> Vec<Seq> {
        v.iter().copied().map(Seq).collect()
    }

    fn range(first: u64, last: u64) -> SeqRange {
        SeqRange {
            first: Seq(first),
            last: Seq(last),
        }
    }

    #[test]
    fn compact_merges_consecutive_seqs() {
        assert_eq!(
            SeqRange::compact(seqs(&[1, 2, 3, 5, 7, 8])),
            vec![range(1, 3), range(5, 5), range(7, 8)]
        );
    }

    #[test]
    fn compact_of_nothing_is_nothing() {
        assert_eq!(SeqRange::compact(seqs(&[])), vec![]);
    }

    #[test]
    fn compact_ignores_duplicates() {
        assert_eq!(
            SeqRange::compact(seqs(&[4, 4, 5, 5, 5, 9])),
            vec![range(4, 5), range(9, 9)]
        );
    }

    #[test]
    fn compact_does_not_overflow_at_the_top_of_the_seq_space() {
        assert_eq!(
            SeqRange::compact(seqs(&[u64::MAX - 1, u64::MAX, u64::MAX])),
            vec![range(u64::MAX - 1, u64::MAX)]
        );
    }

    #[test]
    fn compact_of_unsorted_seqs_still_covers_exactly_them() {
        let input = seqs(&[5, 3, 4, 10, 6, 1]);
        let ranges = SeqRange::compact(input.clone());
        for s in 0..12 {
            assert_eq!(
                ranges.iter().any(|r| r.contains(Seq(s))),
                input.contains(&Seq(s)),
                "seq {s}"
            );
        }
    }

    #[test]
    fn covers_is_inclusive_at_both_ends_and_ignores_rejections() {
        let ack = Ack {
            device: DeviceId("d".into()),
            acked: vec![range(10, 12), range(20, 20)],
            rejected: vec![Rejected {
                seq: Seq(14),
                reason: RejectReason::Invalid,
            }],
            gateway_time_ms: 0,
        };
        let covered: Vec<u64> = (0..25).filter(|&s| ack.covers(Seq(s))).collect();
        assert_eq!(covered, vec![10, 11, 12, 20]);
        assert_eq!(ack.rejection(Seq(14)), Some(RejectReason::Invalid));
        assert_eq!(ack.rejection(Seq(10)), None);
    }

    #[test]
    fn ack_layout_matches_the_drawing() {
        let ack = Ack {
            device: DeviceId("dev-1".into()),
            acked: vec![range(10, 12)],
            rejected: vec![Rejected {
                seq: Seq(14),
                reason: RejectReason::TooLarge,
            }],
            gateway_time_ms: 1_700_000_000_900,
        };
        let mut expected = vec![1, 0, 5];
        expected.extend_from_slice(b"dev-1");
        expected.extend_from_slice(&[1, 10, 12, 1, 14, 2, 0x88, 0xae, 0xab, 0xfe, 0xf9, 0x62]);
        assert_eq!(encode_ack(&ack, Compression::None).unwrap(), expected);
    }

    #[test]
    fn reject_reason_names_match_their_serde_names() {
        for r in [
            RejectReason::Invalid,
            RejectReason::DeviceMismatch,
            RejectReason::TooLarge,
            RejectReason::Unauthorized,
        ] {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
    }
}
