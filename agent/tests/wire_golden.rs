//! Golden frames: the wire layout, frozen.
//!
//! Each file under `tests/fixtures/wire/` is the frame of one fixed message below. The
//! test decodes every file and compares it with the message, then encodes the message
//! and compares the bytes with the file. A failure means the byte layout changed: an
//! old peer can no longer read what this code writes, or the other way round. That
//! needs a new frame version (and the old fixtures kept under their version), not a
//! regenerated file.
//!
//! The messages are written out field by field, struct literals and all, so that
//! adding a field to `Event`, `Drops` or a message breaks this file's build first.
//!
//! Regenerate after an intended change (new version, new fixture):
//! `UPDATE_GOLDEN=1 cargo test -p edge-agent --test wire_golden`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use edge_agent::model::{
    ConsentSnapshot, DeviceId, Event, EventId, EventKind, Identities, Map, Seq, Source, Value,
};
use edge_agent::spool::Drops;
use edge_agent::wire::{
    self, Ack, AudienceUpdate, Compression, Control, Downlink, Hello, RejectReason, Rejected,
    SeqRange, UplinkBatch, DEFAULT_MAX_FRAME,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wire")
        .join(name)
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// Writes `encoded` when regenerating; otherwise returns the stored file after
/// checking it equals `encoded`.
fn golden(name: &str, encoded: &[u8]) -> Vec<u8> {
    let path = fixture(name);
    if updating() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, encoded).unwrap();
    }
    let stored = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(
        stored == encoded,
        "{name}: encoding changed\n stored:  {}\n encoded: {}",
        hex(&stored),
        hex(encoded)
    );
    stored
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn map(entries: Vec<(&str, Value)>) -> Map {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn device() -> DeviceId {
    DeviceId("roku-4a7f9c2e".into())
}

/// A track event using every kind of value.
fn track_event() -> Event {
    Event {
        id: EventId(0x1c6b_8d2f_7b50_4b2f_8b1d_4a2c_3e5f_6071),
        seq: Seq(41),
        kind: EventKind::Track,
        name: Some("Video Content Playing".into()),
        timestamp_ms: 1_795_773_552_250,
        received_ms: 1_795_773_552_301,
        message_id: None,
        identities: Identities {
            device_id: device(),
            user_id: Some("cust-1001".into()),
            anonymous_id: Some("anon-7f3c".into()),
            session_id: Some("s-88".into()),
            group_id: None,
            previous_id: None,
            other: vec![("email_sha256".into(), "9f86d081".into())],
        },
        properties: map(vec![
            ("asset_id", Value::String("ep-4411".into())),
            ("position", Value::Int(312)),
            ("offset", Value::Int(-7)),
            ("big", Value::UInt(u64::MAX)),
            ("ratio", Value::Float(0.5)),
            ("livestream", Value::Bool(false)),
            ("rating", Value::Null),
            (
                "tags",
                Value::Array(vec![Value::String("drama".into()), Value::Int(1)]),
            ),
        ]),
        traits: Map::new(),
        context: map(vec![
            (
                "app",
                Value::Object(map(vec![
                    ("name", Value::String("StreamBox".into())),
                    ("version", Value::String("4.2.0".into())),
                ])),
            ),
            ("locale", Value::String("en-GB".into())),
        ]),
        consent: ConsentSnapshot {
            granted: vec!["analytics".into()],
            ccpa_opt_out: false,
        },
        lane: "default".into(),
        source: Source::Segment,
    }
}

/// An mParticle event of a kind the model keeps verbatim, with a non-UUID message id.
fn other_event() -> Event {
    Event {
        id: EventId(0x0b5a_7c1e_6a4f_4a1e_9a0c_3f1b_2d4e_5f60),
        seq: Seq(44),
        kind: EventKind::Other("media".into()),
        name: None,
        timestamp_ms: -1,
        received_ms: 1_795_773_560_000,
        message_id: Some("mp-msg-0001".into()),
        identities: Identities {
            device_id: device(),
            user_id: None,
            anonymous_id: None,
            session_id: None,
            group_id: Some("household-17".into()),
            previous_id: Some("anon-91aa".into()),
            other: vec![],
        },
        properties: Map::new(),
        traits: map(vec![("plan", Value::String("family".into()))]),
        context: Map::new(),
        consent: ConsentSnapshot {
            granted: vec![],
            ccpa_opt_out: true,
        },
        lane: "default".into(),
        source: Source::Mparticle,
    }
}

fn batch() -> UplinkBatch {
    UplinkBatch {
        device: device(),
        lane: "default".into(),
        floor: Seq(41),
        sent_at_ms: 1_795_773_600_000,
        drops: Drops {
            consent_denied: 1,
            consent_purged: 2,
            lane_full: 300,
            ttl_expired: 0,
            invalid: 5,
        },
        events: vec![track_event(), other_event()],
    }
}

/// Big enough for LZ4 to pay: the same events, repeated with new ids and seqs.
fn big_batch() -> UplinkBatch {
    let mut b = batch();
    b.events = (0..12u64)
        .map(|i| {
            let mut e = if i % 3 == 2 {
                other_event()
            } else {
                track_event()
            };
            e.id = EventId(e.id.0 ^ u128::from(i));
            e.seq = Seq(100 + 2 * i);
            e
        })
        .collect();
    b
}

fn ack() -> Ack {
    Ack {
        device: device(),
        acked: vec![
            SeqRange {
                first: Seq(41),
                last: Seq(41),
            },
            SeqRange {
                first: Seq(44),
                last: Seq(300),
            },
        ],
        rejected: vec![
            Rejected {
                seq: Seq(42),
                reason: RejectReason::Invalid,
            },
            Rejected {
                seq: Seq(43),
                reason: RejectReason::DeviceMismatch,
            },
            Rejected {
                seq: Seq(301),
                reason: RejectReason::TooLarge,
            },
            Rejected {
                seq: Seq(302),
                reason: RejectReason::Unauthorized,
            },
        ],
        gateway_time_ms: 1_795_773_600_123,
    }
}

fn hello() -> Hello {
    Hello {
        device: device(),
        agent_version: "0.1.0".into(),
        audiences_version: 17,
        config_version: 3,
        sent_at_ms: 1_795_773_600_000,
    }
}

fn downlinks() -> Vec<(&'static str, Downlink)> {
    vec![
        (
            "downlink_hello_reply_v1.bin",
            Downlink::HelloReply {
                gateway_time_ms: 1_795_773_600_050,
                audiences_version: 18,
            },
        ),
        (
            "downlink_purge_user_v1.bin",
            Downlink::Control(Control::PurgeUser {
                user_id: "cust-1001".into(),
            }),
        ),
        (
            "downlink_set_consent_v1.bin",
            Downlink::Control(Control::SetConsent {
                subject: "cust-1001".into(),
                purposes: vec![("analytics".into(), true), ("advertising".into(), false)],
                ccpa_opt_out: Some(true),
                at_ms: 1_795_773_590_000,
            }),
        ),
        (
            "downlink_audiences_v1.bin",
            Downlink::Audiences(AudienceUpdate {
                version: 18,
                user_id: "cust-1001".into(),
                audiences: vec!["churn-risk".into(), "family-plan".into()],
            }),
        ),
    ]
}

#[test]
fn batch_frame_is_frozen() {
    let b = batch();
    let stored = golden(
        "batch_v1.bin",
        &wire::encode_batch(&b, Compression::None).unwrap(),
    );
    assert_eq!(wire::decode_batch(&stored, DEFAULT_MAX_FRAME).unwrap(), b);
}

/// Agents before maps were kept sorted wrote their entries in the app's order; the
/// layout is the same, and such a frame decodes to the same (sorted) event.
#[test]
fn a_frame_with_unsorted_maps_decodes_to_the_same_batch() {
    let stored = std::fs::read(fixture("batch_v1_unsorted_maps.bin")).unwrap();
    let sorted = wire::encode_batch(&batch(), Compression::None).unwrap();
    assert_ne!(stored, sorted, "the fixture's maps are out of order");
    assert_eq!(stored.len(), sorted.len());
    assert_eq!(
        wire::decode_batch(&stored, DEFAULT_MAX_FRAME).unwrap(),
        batch()
    );
}

/// LZ4 compressors may pick different matches across versions while every decoder
/// still reads the result, so the compressed bytes are not frozen: the header, the
/// declared length and what the block inflates to are.
#[test]
fn compressed_batch_frame_still_decodes_to_the_frozen_body() {
    let b = big_batch();
    let path = fixture("batch_lz4_v1.bin");
    if updating() {
        std::fs::write(&path, wire::encode_batch(&b, Compression::Lz4).unwrap()).unwrap();
    }
    let stored = std::fs::read(&path).unwrap();
    assert_eq!(&stored[..2], &[1, 1], "version 1, compressed");
    assert_eq!(wire::decode_batch(&stored, DEFAULT_MAX_FRAME).unwrap(), b);

    let plain = wire::encode_batch(&b, Compression::None).unwrap();
    let raw_len = u32::from_le_bytes(stored[2..6].try_into().unwrap());
    assert_eq!(raw_len as usize, plain.len() - 2);
    let raw = lz4_flex::block::decompress(&stored[6..], raw_len as usize).unwrap();
    assert_eq!(raw, plain[2..]);
    assert!(
        stored.len() * 2 < plain.len(),
        "compression should pay here"
    );
}

#[test]
fn ack_frame_is_frozen() {
    let a = ack();
    let stored = golden(
        "ack_v1.bin",
        &wire::encode_ack(&a, Compression::None).unwrap(),
    );
    assert_eq!(wire::decode_ack(&stored, DEFAULT_MAX_FRAME).unwrap(), a);
}

#[test]
fn hello_frame_is_frozen() {
    let h = hello();
    let stored = golden(
        "hello_v1.bin",
        &wire::encode_hello(&h, Compression::None).unwrap(),
    );
    assert_eq!(wire::decode_hello(&stored, DEFAULT_MAX_FRAME).unwrap(), h);
}

#[test]
fn downlink_frames_are_frozen() {
    for (name, msg) in downlinks() {
        let stored = golden(
            name,
            &wire::encode_downlink(&msg, Compression::None).unwrap(),
        );
        assert_eq!(
            wire::decode_downlink(&stored, DEFAULT_MAX_FRAME).unwrap(),
            msg,
            "{name}"
        );
    }
}
