//! What an agent publishes: event batches (`…/up`) and its hello on connect (`…/hello`).
//!
//! ```text
//! UplinkBatch                                  (frame body, see wire::frame)
//! +-----------+---------+------------+--------------+---------+----------------------+
//! | device    | lane    | floor      | sent_at_ms   | drops   | events               |
//! | String    | String  | varint u64 | zigzag i64   | 5×u64   | varint n, n × Event  |
//! +-----------+---------+------------+--------------+---------+----------------------+
//!   (1)         (2)       (3)                         (4)       (5)
//!
//! drops = consent_denied, consent_purged, lane_full, ttl_expired, invalid,
//!         each a varint u64 (field order of spool::Drops).
//!
//! Event (field order of model::Event; the spool stores the same encoding)
//!   id            varint u128 (EventId)     message_id   Option<String>
//!   seq           varint u64                identities   Identities, below
//!   kind          varint tag, below         properties   Map
//!   name          Option<String>            traits       Map
//!   timestamp_ms  zigzag i64                context      Map
//!   received_ms   zigzag i64                consent      granted: varint n × String,
//!                                                        ccpa_opt_out: bool
//!   lane          String                    source       varint tag: 0 segment,
//!                                                        1 mparticle, 2 local, 3 agent
//!   kind tags: 0 track, 1 identify, 2 page, 3 screen, 4 group, 5 alias, 6 consent,
//!              7 session_start, 8 session_end, 9 commerce, 10 other + String
//!   Identities: device_id String; user_id, anonymous_id, session_id, group_id,
//!               previous_id: Option<String> each; other: varint n × (String, String)
//!
//! Map   = varint n, n × (key String, Value), in insertion order
//! Value = varint tag + payload:
//!   0 null | 1 bool (1 byte) | 2 int (zigzag i64) | 3 uint (varint u64)
//!   4 float (f64, 8 bytes LE) | 5 string | 6 array (varint n × Value) | 7 object (Map)
//!   nested at most model::MAX_DEPTH deep (deeper is malformed)
//! ```
//!
//! The numbered rules are the sender's promises. The decoder checks structure only;
//! the gateway checks these and rejects offending events (see `wire::ack`), because
//! failing the whole frame would make the agent resend it forever.
//!
//! 1. `device` is the agent's MQTT identity (in fleet mode each event also names the
//!    device it came from in `identities.device_id`). The gateway rejects a batch
//!    whose `device` is not the identity it arrived under.
//! 2. Every event of a batch belongs to `lane`.
//! 3. `floor` (a `Seq`): every seq of `lane` below it was acked or dropped by the
//!    agent and will never be sent again. It never decreases across batches of a
//!    lane, and every event of the batch is at or above it; the gateway's
//!    exactly-once admission rests on both.
//! 4. `drops` are the agent's cumulative loss counters at send time (not a delta):
//!    resending a batch cannot double-count them.
//! 5. Events are in increasing `seq` order, but seqs are not contiguous: the lanes
//!    share one sequence, so other lanes' events fall in the gaps.
//!
//! ```text
//! Hello
//! +-----------+---------------+-------------------+----------------+------------+
//! | device    | agent_version | audiences_version | config_version | sent_at_ms |
//! | String    | String        | varint u64        | varint u64     | zigzag i64 |
//! +-----------+---------------+-------------------+----------------+------------+
//!
//! e.g. Hello { "dev-1", "0.1.0", 7, 2, 1_700_000_000_000 } as a whole frame:
//!   01 00                      version 1, flags 0
//!   05 64 65 76 2d 31          "dev-1"
//!   05 30 2e 31 2e 30          "0.1.0"
//!   07                         audiences_version 7
//!   02                         config_version 2
//!   80 a0 ab fe f9 62          sent_at_ms: zigzag 3_400_000_000_000 as a varint
//! ```

use serde::{Deserialize, Serialize};

use crate::model::{DeviceId, Event, Seq};
use crate::spool::Drops;

/// Events of one lane, sent together on `…/up`. Field order is the encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkBatch {
    /// The sending agent (its MQTT identity).
    pub device: DeviceId,
    /// The spool lane all `events` come from.
    pub lane: String,
    /// Every seq of this lane below `floor` was acknowledged or dropped by the agent
    /// and will never be sent again; the gateway's exactly-once admission rests on it.
    pub floor: Seq,
    /// Agent wall clock when this attempt was sent, ms since the epoch; a resend has a
    /// new value, which lets the gateway estimate the agent's clock skew.
    pub sent_at_ms: i64,
    /// Cumulative drop counters of the agent at send time.
    pub drops: Drops,
    /// In increasing `seq` order, with gaps.
    pub events: Vec<Event>,
}

impl UplinkBatch {
    /// The lowest and highest seq in the batch, `None` when it has no events.
    ///
    /// This is a span, not a set: seqs between them may belong to other lanes or
    /// batches. Ack what was received ([`SeqRange::compact`](super::SeqRange::compact)
    /// over the events' seqs), never this span.
    pub fn seq_range(&self) -> Option<(Seq, Seq)> {
        let mut seqs = self.events.iter().map(|e| e.seq);
        let first = seqs.next()?;
        Some(seqs.fold((first, first), |(lo, hi), s| (lo.min(s), hi.max(s))))
    }
}

/// Sent by the agent on `…/hello` after every connect, with the versions of what it
/// holds, so the gateway can answer with what changed (no retained messages needed).
/// Field order is the encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sending agent (its MQTT identity).
    pub device: DeviceId,
    /// The agent's crate version, e.g. `0.1.0`.
    pub agent_version: String,
    /// Version of the newest audience update the agent has applied; 0 for none.
    pub audiences_version: u64,
    /// Version of the configuration the agent runs; 0 when it is not versioned.
    pub config_version: u64,
    /// Agent wall clock at send, ms since the epoch.
    pub sent_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventKind, Source};
    use crate::wire::{decode_hello, encode_hello, Compression, SeqRange, DEFAULT_MAX_FRAME};

    fn batch_with_seqs(seqs: &[u64]) -> UplinkBatch {
        UplinkBatch {
            device: DeviceId("dev-1".into()),
            lane: "default".into(),
            floor: Seq(1),
            sent_at_ms: 0,
            drops: Drops::default(),
            events: seqs
                .iter()
                .map(|&s| {
                    let mut e = Event::new(EventKind::Track, Source::Local, 0);
                    e.seq = Seq(s);
                    e
                })
                .collect(),
        }
    }

    #[test]
    fn seq_range_spans_first_to_last_event_across_gaps() {
        let b = batch_with_seqs(&[4, 7, 8, 20]);
        assert_eq!(b.seq_range(), Some((Seq(4), Seq(20))));
    }

    #[test]
    fn seq_range_of_an_empty_batch_is_none() {
        assert_eq!(batch_with_seqs(&[]).seq_range(), None);
    }

    #[test]
    fn seq_range_does_not_trust_the_order() {
        assert_eq!(
            batch_with_seqs(&[9, 3, 5]).seq_range(),
            Some((Seq(3), Seq(9)))
        );
    }

    #[test]
    fn acking_the_received_seqs_leaves_the_gaps_unacked() {
        let b = batch_with_seqs(&[4, 5, 7, 20]);
        let acked = SeqRange::compact(b.events.iter().map(|e| e.seq));
        assert_eq!(acked.len(), 3);
        assert!(!acked.iter().any(|r| r.contains(Seq(6))));
    }

    #[test]
    fn hello_layout_matches_the_drawing() {
        let hello = Hello {
            device: DeviceId("dev-1".into()),
            agent_version: "0.1.0".into(),
            audiences_version: 7,
            config_version: 2,
            sent_at_ms: 1_700_000_000_000,
        };
        let f = encode_hello(&hello, Compression::None).unwrap();
        let mut expected = vec![1, 0, 5];
        expected.extend_from_slice(b"dev-1");
        expected.push(5);
        expected.extend_from_slice(b"0.1.0");
        expected.extend_from_slice(&[7, 2, 0x80, 0xa0, 0xab, 0xfe, 0xf9, 0x62]);
        assert_eq!(f, expected);
        assert_eq!(decode_hello(&f, DEFAULT_MAX_FRAME).unwrap(), hello);
    }
}
