//! Framing: the version/flags header, size limits and compression around every message.
//!
//! ```text
//!  byte 0     byte 1     byte 2 ...                                        end
//! +----------+----------+-------------------------------------------------+
//! | version  |  flags   | body                                            |
//! +----------+----------+-------------------------------------------------+
//!
//! version  u8   = 1 (VERSION). (1)
//! flags    u8   bit 0 (0x01) COMPRESSED; bits 1-7 reserved, must be 0. (2)
//! body     flags = 0x00: postcard(message), ending exactly at the frame's end (4)
//!          flags = 0x01: +----------------+-------------------------------+
//!                        | raw_len u32 LE | LZ4 block of postcard(message) |
//!                        +----------------+-------------------------------+
//!                        raw_len = length of postcard(message) (3); the block
//!                        inflates to postcard(message) (4)
//! ```
//!
//! Invariants a decoder enforces, in this order:
//! 0. `frame.len() <= max_bytes`, checked before any byte is read.
//! 1. `version == VERSION`; any other value is [`WireError::UnsupportedVersion`].
//! 2. No reserved flag bit is set; otherwise [`WireError::UnknownFlags`].
//! 3. `raw_len <= max_bytes`, checked before the output buffer is allocated, and the
//!    block must inflate to exactly `raw_len` bytes: a decompression bomb costs at most
//!    `max_bytes` of memory and fails cleanly.
//! 4. The message's postcard encoding uses every body byte; leftovers are
//!    [`WireError::TrailingBytes`], so two frames can never share one payload.
//!
//! The frame carries no length of its own: MQTT delimits the payload. The flags byte
//! exists so that compression (and later, other codecs) is chosen per frame by the
//! sender without a version bump; receivers must know every flag they accept.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ack::Ack;
use super::downlink::Downlink;
use super::uplink::{Hello, UplinkBatch};

/// The frame version written by this code and the only one it reads.
pub const VERSION: u8 = 1;

/// Flag bit: the body is `[raw_len u32 LE][LZ4 block]`.
const FLAG_COMPRESSED: u8 = 0x01;
/// Every flag bit this version knows.
const KNOWN_FLAGS: u8 = FLAG_COMPRESSED;
/// Version byte + flags byte.
const HEADER_LEN: usize = 2;
/// Bytes of the `raw_len` prefix of a compressed body.
const RAW_LEN_LEN: usize = 4;

/// A sensible `max_bytes` for decoders that have no configured limit: 1 MiB, for the
/// frame and for its decompressed body alike.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// How an encoder should treat the body. In config files: `"none"` or `"lz4"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Send the postcard body as is.
    #[default]
    None,
    /// LZ4 block compression, used only when it makes the frame smaller: tiny messages
    /// (acks, hellos) go uncompressed even when this is asked for.
    Lz4,
}

/// Why a frame could not be decoded. Nothing a peer sends can make a decoder panic;
/// every bad input ends up as one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame, or the body a compressed frame declares, is over the caller's limit.
    /// Checked before decoding or decompressing anything.
    #[error("frame of {size} bytes is over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    /// The payload has no bytes at all (e.g. an MQTT message that clears a retained
    /// topic).
    #[error("empty frame")]
    Empty,
    /// The frame ends before its header, the length of its compressed body, or the
    /// message inside it is complete: some bytes are missing.
    #[error("frame is truncated")]
    Truncated,
    /// The version byte is not one this code reads (a newer peer, or not a frame).
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// The flags byte sets bits this version does not know.
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    /// The body is complete but is not a valid encoding of the expected message
    /// (bad enum tag, invalid UTF-8, a value nested too deep, an inverted range...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message ended this many bytes before the frame did.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The compressed body is not a valid LZ4 block, or does not inflate to exactly the
    /// length it declares.
    #[error("cannot decompress the body: {0}")]
    Decompress(String),
}

/// Why a message could not be encoded. postcard only fails on types that serialize
/// sequences of unknown length or report custom errors, which no wire message does;
/// this exists so that a future type breaking that rule is an error, not a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// postcard refused a value of the message.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Encodes an uplink batch (topic `…/up`).
pub fn encode_batch(batch: &UplinkBatch, compression: Compression) -> Result<Vec<u8>, EncodeError> {
    encode(batch, compression)
}

/// Decodes an uplink batch; `max_bytes` bounds the frame and its decompressed body.
pub fn decode_batch(frame: &[u8], max_bytes: usize) -> Result<UplinkBatch, WireError> {
    decode(frame, max_bytes)
}

/// A batch decoded with each event's bytes as the agent encoded them.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchWithBytes {
    pub batch: UplinkBatch,
    /// The message body (decompressed) the events were decoded from.
    pub body: Vec<u8>,
    /// Per event of `batch.events`, in order, where its postcard encoding lies in
    /// `body`: a receiver storing events as postcard keeps these bytes instead of
    /// encoding the event again.
    pub spans: Vec<std::ops::Range<usize>>,
}

/// The fields of [`UplinkBatch`] before `events`, in its encoding order.
#[derive(Deserialize)]
struct BatchHead {
    device: crate::model::DeviceId,
    lane: String,
    floor: crate::model::Seq,
    sent_at_ms: i64,
    drops: crate::spool::Drops,
}

/// [`decode_batch`], keeping where each event's bytes are (see [`BatchWithBytes`]).
/// Accepts and refuses exactly the frames [`decode_batch`] does.
pub fn decode_batch_with_bytes(
    frame: &[u8],
    max_bytes: usize,
) -> Result<BatchWithBytes, WireError> {
    let body = match frame_body(frame, max_bytes)? {
        Body::Plain(body) => body.to_vec(),
        Body::Inflated(raw) => raw,
    };
    let (head, mut rest) = take::<BatchHead>(&body)?;
    let (count, after) = take::<u64>(rest)?;
    rest = after;
    // Every event takes at least one byte: a count above what is left is a lie, and
    // must not size an allocation.
    let count = usize::try_from(count)
        .ok()
        .filter(|c| *c <= rest.len())
        .ok_or(WireError::Truncated)?;
    let mut events = Vec::with_capacity(count);
    let mut spans = Vec::with_capacity(count);
    for _ in 0..count {
        let start = body.len() - rest.len();
        let (event, after) = take::<crate::model::Event>(rest)?;
        rest = after;
        events.push(event);
        spans.push(start..body.len() - rest.len());
    }
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    let batch = UplinkBatch {
        device: head.device,
        lane: head.lane,
        floor: head.floor,
        sent_at_ms: head.sent_at_ms,
        drops: head.drops,
        events,
    };
    Ok(BatchWithBytes { batch, body, spans })
}

/// Encodes an ack (topic `…/ack`).
pub fn encode_ack(ack: &Ack, compression: Compression) -> Result<Vec<u8>, EncodeError> {
    encode(ack, compression)
}

/// Decodes an ack; also refuses ranges whose `first` is above their `last`.
pub fn decode_ack(frame: &[u8], max_bytes: usize) -> Result<Ack, WireError> {
    let ack: Ack = decode(frame, max_bytes)?;
    if let Some(bad) = ack.acked.iter().find(|r| r.first > r.last) {
        return Err(WireError::Malformed(format!(
            "ack range {}..={} is inverted",
            bad.first.0, bad.last.0
        )));
    }
    Ok(ack)
}

/// Encodes a hello (topic `…/hello`).
pub fn encode_hello(hello: &Hello, compression: Compression) -> Result<Vec<u8>, EncodeError> {
    encode(hello, compression)
}

/// Decodes a hello.
pub fn decode_hello(frame: &[u8], max_bytes: usize) -> Result<Hello, WireError> {
    decode(frame, max_bytes)
}

/// Encodes a downlink message (topic `…/down`).
pub fn encode_downlink(msg: &Downlink, compression: Compression) -> Result<Vec<u8>, EncodeError> {
    encode(msg, compression)
}

/// Decodes a downlink message.
pub fn decode_downlink(frame: &[u8], max_bytes: usize) -> Result<Downlink, WireError> {
    decode(frame, max_bytes)
}

fn encode<M: Serialize>(msg: &M, compression: Compression) -> Result<Vec<u8>, EncodeError> {
    let plain = postcard::to_extend(msg, vec![VERSION, 0])
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if compression == Compression::None {
        return Ok(plain);
    }
    let raw = &plain[HEADER_LEN..];
    let Ok(raw_len) = u32::try_from(raw.len()) else {
        // Not representable in the prefix; a frame this size is refused by any sane
        // receiver anyway, and the plain frame is still correct.
        return Ok(plain);
    };
    let block = lz4_flex::block::compress(raw);
    if HEADER_LEN + RAW_LEN_LEN + block.len() >= plain.len() {
        return Ok(plain);
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + RAW_LEN_LEN + block.len());
    frame.extend_from_slice(&[VERSION, FLAG_COMPRESSED]);
    frame.extend_from_slice(&raw_len.to_le_bytes());
    frame.extend_from_slice(&block);
    Ok(frame)
}

fn decode<M: DeserializeOwned>(frame: &[u8], max_bytes: usize) -> Result<M, WireError> {
    match frame_body(frame, max_bytes)? {
        Body::Plain(body) => from_body(body),
        Body::Inflated(raw) => from_body(&raw),
    }
}

/// A frame's message body: as sent, or inflated.
enum Body<'a> {
    Plain(&'a [u8]),
    Inflated(Vec<u8>),
}

/// Checks a frame's size, version and flags and returns its message body.
fn frame_body(frame: &[u8], max_bytes: usize) -> Result<Body<'_>, WireError> {
    if frame.len() > max_bytes {
        return Err(WireError::TooLarge {
            size: frame.len(),
            limit: max_bytes,
        });
    }
    let (&version, rest) = frame.split_first().ok_or(WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let (&flags, body) = rest.split_first().ok_or(WireError::Truncated)?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    if flags & FLAG_COMPRESSED == 0 {
        return Ok(Body::Plain(body));
    }
    decompress(body, max_bytes).map(Body::Inflated)
}

fn decompress(body: &[u8], max_bytes: usize) -> Result<Vec<u8>, WireError> {
    let Some((prefix, block)) = body.split_first_chunk::<RAW_LEN_LEN>() else {
        return Err(WireError::Truncated);
    };
    // A length that does not even fit usize is over any limit.
    let raw_len = usize::try_from(u32::from_le_bytes(*prefix)).unwrap_or(usize::MAX);
    if raw_len > max_bytes {
        return Err(WireError::TooLarge {
            size: raw_len,
            limit: max_bytes,
        });
    }
    let mut raw = vec![0u8; raw_len];
    let written = lz4_flex::block::decompress_into(block, &mut raw)
        .map_err(|e| WireError::Decompress(e.to_string()))?;
    if written != raw_len {
        return Err(WireError::Decompress(format!(
            "inflated to {written} bytes, {raw_len} declared"
        )));
    }
    Ok(raw)
}

fn from_body<M: DeserializeOwned>(body: &[u8]) -> Result<M, WireError> {
    match take::<M>(body)? {
        (msg, []) => Ok(msg),
        (_, rest) => Err(WireError::TrailingBytes(rest.len())),
    }
}

/// One value from the front of `bytes`, and what follows it.
fn take<M: DeserializeOwned>(bytes: &[u8]) -> Result<(M, &[u8]), WireError> {
    match postcard::take_from_bytes::<M>(bytes) {
        Ok(taken) => Ok(taken),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(WireError::Truncated),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceId, Event, EventId, EventKind, Map, Seq, Source, Value};
    use crate::spool::Drops;
    use crate::wire::{AudienceUpdate, Control, RejectReason, Rejected, SeqRange};

    fn event(seq: u64) -> Event {
        let mut e = Event::new(EventKind::Track, Source::Segment, 1_700_000_000_000);
        e.id = EventId(u128::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
        e.seq = Seq(seq);
        e.name = Some("Video Content Playing".into());
        e.lane = "default".into();
        e.identities.device_id = DeviceId("dev-1".into());
        e.identities.user_id = Some("cust-1001".into());
        let mut app = Map::new();
        app.insert("name", "StreamBox".into());
        app.insert("version", "4.2.0".into());
        e.context.insert("app", Value::Object(app));
        e.properties.insert("position", Value::Int(seq as i64 * 10));
        e
    }

    fn batch(events: usize) -> UplinkBatch {
        UplinkBatch {
            device: DeviceId("dev-1".into()),
            lane: "default".into(),
            floor: Seq(1),
            sent_at_ms: 1_700_000_000_500,
            drops: Drops {
                lane_full: 3,
                ..Drops::default()
            },
            events: (0..events as u64).map(|i| event(10 + 2 * i)).collect(),
        }
    }

    #[test]
    fn a_batch_with_its_bytes_is_the_batch_and_each_span_is_its_event() {
        let b = batch(40);
        for compression in [Compression::None, Compression::Lz4] {
            let frame = encode_batch(&b, compression).unwrap();
            let got = decode_batch_with_bytes(&frame, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(got.batch, b);
            assert_eq!(got.spans.len(), b.events.len());
            for (span, event) in got.spans.iter().zip(&b.events) {
                let bytes = &got.body[span.clone()];
                assert_eq!(bytes, postcard::to_stdvec(event).unwrap().as_slice());
            }
        }
    }

    #[test]
    fn a_batch_with_its_bytes_refuses_what_decode_batch_refuses() {
        let frame = encode_batch(&batch(5), Compression::None).unwrap();
        // Every truncation, a trailing byte, a wrong version, a lying event count.
        let mut bad: Vec<Vec<u8>> = (0..frame.len()).map(|n| frame[..n].to_vec()).collect();
        bad.push([frame.as_slice(), &[0]].concat());
        let mut version = frame.clone();
        version[0] = 9;
        bad.push(version);
        let mut flipped = frame.clone();
        for at in (HEADER_LEN..frame.len()).step_by(7) {
            flipped[at] ^= 0xff;
            bad.push(flipped.clone());
        }
        for f in &bad {
            let plain = decode_batch(f, DEFAULT_MAX_FRAME);
            let spans = decode_batch_with_bytes(f, DEFAULT_MAX_FRAME);
            match (plain, spans) {
                (Ok(a), Ok(b)) => assert_eq!(a, b.batch),
                (Err(a), Err(b)) => assert_eq!(a, b, "frame {f:02x?}"),
                (a, b) => panic!("disagree on {f:02x?}: {a:?} vs {b:?}"),
            }
        }
    }

    fn ack() -> Ack {
        Ack {
            device: DeviceId("dev-1".into()),
            acked: vec![SeqRange {
                first: Seq(10),
                last: Seq(12),
            }],
            rejected: vec![Rejected {
                seq: Seq(14),
                reason: RejectReason::TooLarge,
            }],
            gateway_time_ms: 1_700_000_000_900,
        }
    }

    fn hello() -> Hello {
        Hello {
            device: DeviceId("dev-1".into()),
            agent_version: "0.1.0".into(),
            audiences_version: 7,
            config_version: 2,
            sent_at_ms: 1_700_000_000_000,
        }
    }

    fn downlinks() -> Vec<Downlink> {
        vec![
            Downlink::HelloReply {
                gateway_time_ms: 1_700_000_000_001,
                audiences_version: 9,
            },
            Downlink::Control(Control::PurgeUser {
                user_id: "cust-1001".into(),
            }),
            Downlink::Control(Control::SetConsent {
                subject: "cust-1001".into(),
                purposes: vec![("analytics".into(), true), ("advertising".into(), false)],
                ccpa_opt_out: Some(true),
                at_ms: 1_700_000_000_002,
            }),
            Downlink::Audiences(AudienceUpdate {
                version: 9,
                user_id: "cust-1001".into(),
                audiences: vec!["churn-risk".into(), "family-plan".into()],
            }),
        ]
    }

    /// A frame with the given flags around an arbitrary body.
    fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![VERSION, flags];
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn every_message_round_trips_with_and_without_compression() {
        for c in [Compression::None, Compression::Lz4] {
            for n in [0, 1, 50] {
                let b = batch(n);
                let f = encode_batch(&b, c).unwrap();
                assert_eq!(decode_batch(&f, DEFAULT_MAX_FRAME).unwrap(), b);
            }
            let f = encode_ack(&ack(), c).unwrap();
            assert_eq!(decode_ack(&f, DEFAULT_MAX_FRAME).unwrap(), ack());
            let f = encode_hello(&hello(), c).unwrap();
            assert_eq!(decode_hello(&f, DEFAULT_MAX_FRAME).unwrap(), hello());
            for d in downlinks() {
                let f = encode_downlink(&d, c).unwrap();
                assert_eq!(decode_downlink(&f, DEFAULT_MAX_FRAME).unwrap(), d);
            }
        }
    }

    #[test]
    fn frame_starts_with_version_then_flags() {
        let b = batch(50);
        let plain = encode_batch(&b, Compression::None).unwrap();
        assert_eq!(&plain[..2], &[1, 0]);
        let packed = encode_batch(&b, Compression::Lz4).unwrap();
        assert_eq!(&packed[..2], &[1, 1]);
        assert!(
            packed.len() < plain.len() / 3,
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        let raw_len = u32::from_le_bytes(packed[2..6].try_into().unwrap());
        assert_eq!(raw_len as usize, plain.len() - 2);
    }

    #[test]
    fn compression_reads_from_config_in_lowercase() {
        #[derive(serde::Deserialize)]
        struct C {
            compression: Compression,
        }
        let c: C = toml::from_str("compression = \"lz4\"").unwrap();
        assert_eq!(c.compression, Compression::Lz4);
        let c: C = toml::from_str("compression = \"none\"").unwrap();
        assert_eq!(c.compression, Compression::None);
        assert!(toml::from_str::<C>("compression = \"zstd\"").is_err());
    }

    #[test]
    fn compression_is_skipped_when_it_does_not_pay() {
        let f = encode_hello(&hello(), Compression::Lz4).unwrap();
        assert_eq!(f, encode_hello(&hello(), Compression::None).unwrap());
        assert_eq!(f[1], 0);
    }

    #[test]
    fn empty_payload_is_empty_not_truncated() {
        assert_eq!(decode_batch(&[], 100), Err(WireError::Empty));
    }

    #[test]
    fn header_without_flags_is_truncated() {
        assert_eq!(decode_hello(&[VERSION], 100), Err(WireError::Truncated));
    }

    /// Decodes with the decoder for the frame's own message type.
    type Decoder = fn(&[u8]) -> Option<WireError>;

    fn own_decoders() -> Vec<(Vec<u8>, Decoder)> {
        let mut frames: Vec<(Vec<u8>, Decoder)> = vec![
            (encode_batch(&batch(3), Compression::None).unwrap(), |f| {
                decode_batch(f, DEFAULT_MAX_FRAME).err()
            }),
            (encode_ack(&ack(), Compression::None).unwrap(), |f| {
                decode_ack(f, DEFAULT_MAX_FRAME).err()
            }),
            (encode_hello(&hello(), Compression::None).unwrap(), |f| {
                decode_hello(f, DEFAULT_MAX_FRAME).err()
            }),
        ];
        for d in downlinks() {
            frames.push((encode_downlink(&d, Compression::None).unwrap(), |f| {
                decode_downlink(f, DEFAULT_MAX_FRAME).err()
            }));
        }
        frames
    }

    #[test]
    fn every_prefix_of_a_plain_frame_is_empty_or_truncated() {
        for (frame, decode) in own_decoders() {
            assert_eq!(decode(&frame), None);
            assert_eq!(decode(&[]), Some(WireError::Empty));
            for len in 1..frame.len() {
                assert_eq!(
                    decode(&frame[..len]),
                    Some(WireError::Truncated),
                    "len {len}"
                );
            }
        }
    }

    #[test]
    fn every_prefix_of_a_compressed_frame_fails_cleanly() {
        let frame = encode_batch(&batch(20), Compression::Lz4).unwrap();
        assert_eq!(frame[1], FLAG_COMPRESSED);
        for len in 1..frame.len() {
            let cut = &frame[..len];
            let err = decode_batch(cut, DEFAULT_MAX_FRAME).unwrap_err();
            if len < HEADER_LEN + RAW_LEN_LEN {
                assert_eq!(err, WireError::Truncated, "len {len}");
            } else {
                assert!(matches!(err, WireError::Decompress(_)), "len {len}: {err}");
            }
            // Other decoders see the same bytes on the wrong topic: no panic either.
            let _ = decode_ack(cut, DEFAULT_MAX_FRAME);
            let _ = decode_hello(cut, DEFAULT_MAX_FRAME);
            let _ = decode_downlink(cut, DEFAULT_MAX_FRAME);
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_it_is_read() {
        let f = encode_batch(&batch(5), Compression::None).unwrap();
        assert_eq!(
            decode_batch(&f, f.len() - 1),
            Err(WireError::TooLarge {
                size: f.len(),
                limit: f.len() - 1
            })
        );
        // Even a frame whose header is garbage reports the size first.
        assert_eq!(
            decode_batch(&[0xff; 10], 9),
            Err(WireError::TooLarge { size: 10, limit: 9 })
        );
        assert!(decode_batch(&f, f.len()).is_ok());
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut f = encode_hello(&hello(), Compression::None).unwrap();
        for v in [0u8, 2, 0x7b, 0xff] {
            f[0] = v;
            assert_eq!(
                decode_hello(&f, DEFAULT_MAX_FRAME),
                Err(WireError::UnsupportedVersion(v))
            );
        }
    }

    #[test]
    fn unknown_flags_are_refused() {
        let mut f = encode_hello(&hello(), Compression::None).unwrap();
        for flags in [0x02u8, 0x03, 0x80, 0xff] {
            f[1] = flags;
            assert_eq!(
                decode_hello(&f, DEFAULT_MAX_FRAME),
                Err(WireError::UnknownFlags(flags))
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused_in_plain_and_compressed_bodies() {
        let mut f = encode_hello(&hello(), Compression::None).unwrap();
        f.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            decode_hello(&f, DEFAULT_MAX_FRAME),
            Err(WireError::TrailingBytes(3))
        );

        let mut raw = postcard::to_stdvec(&batch(20)).unwrap();
        raw.push(7);
        let mut body = (raw.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&lz4_flex::block::compress(&raw));
        assert_eq!(
            decode_batch(&frame(FLAG_COMPRESSED, &body), DEFAULT_MAX_FRAME),
            Err(WireError::TrailingBytes(1))
        );
    }

    #[test]
    fn bad_enum_tag_is_malformed() {
        // Downlink variant 3 does not exist.
        let f = frame(0, &[3, 0]);
        assert!(matches!(
            decode_downlink(&f, DEFAULT_MAX_FRAME),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        // Hello.device = a 2-byte string that is not UTF-8.
        let f = frame(0, &[2, 0xc3, 0x28, 0, 0, 0, 0, 0]);
        assert!(matches!(
            decode_hello(&f, DEFAULT_MAX_FRAME),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn inverted_ack_range_is_malformed() {
        let mut a = ack();
        a.acked[0] = SeqRange {
            first: Seq(5),
            last: Seq(4),
        };
        let f = encode_ack(&a, Compression::None).unwrap();
        assert!(matches!(
            decode_ack(&f, DEFAULT_MAX_FRAME),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn deeply_nested_property_is_malformed_not_a_stack_overflow() {
        let mut b = batch(1);
        let mut v = Value::Null;
        for _ in 0..crate::model::MAX_DEPTH + 5 {
            v = Value::Array(vec![v]);
        }
        b.events[0].properties.insert("deep", v);
        let f = encode_batch(&b, Compression::Lz4).unwrap();
        assert!(matches!(
            decode_batch(&f, DEFAULT_MAX_FRAME),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate() {
        // A batch claiming u64::MAX events in a 30-byte frame.
        let mut body = vec![1, b'd', 1, b'l', 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&[0xff; 9]);
        body.push(0x01);
        assert!(decode_batch(&frame(0, &body), DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn decompression_bomb_is_refused_by_its_declared_length() {
        let mut body = u32::MAX.to_le_bytes().to_vec();
        body.extend_from_slice(&[0x1f, 0, 1, 0]);
        assert_eq!(
            decode_batch(&frame(FLAG_COMPRESSED, &body), DEFAULT_MAX_FRAME),
            Err(WireError::TooLarge {
                size: u32::MAX as usize,
                limit: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn decompression_bomb_that_understates_its_length_fails_cleanly() {
        // 8 MiB of zeros compresses to a few KiB; the prefix claims only 1 KiB.
        let zeros = vec![0u8; 8 << 20];
        let block = lz4_flex::block::compress(&zeros);
        let mut body = 1024u32.to_le_bytes().to_vec();
        body.extend_from_slice(&block);
        let f = frame(FLAG_COMPRESSED, &body);
        assert!(f.len() < DEFAULT_MAX_FRAME);
        assert!(matches!(
            decode_batch(&f, DEFAULT_MAX_FRAME),
            Err(WireError::Decompress(_))
        ));
    }

    #[test]
    fn block_that_inflates_short_of_its_declared_length_is_refused() {
        let raw = postcard::to_stdvec(&hello()).unwrap();
        let mut body = (raw.len() as u32 + 5).to_le_bytes().to_vec();
        body.extend_from_slice(&lz4_flex::block::compress(&raw));
        assert!(matches!(
            decode_hello(&frame(FLAG_COMPRESSED, &body), DEFAULT_MAX_FRAME),
            Err(WireError::Decompress(_))
        ));
    }

    #[test]
    fn compressed_body_shorter_than_its_length_prefix_is_truncated() {
        for body in [&[][..], &[1], &[1, 0, 0]] {
            assert_eq!(
                decode_batch(&frame(FLAG_COMPRESSED, body), DEFAULT_MAX_FRAME),
                Err(WireError::Truncated)
            );
        }
    }

    #[test]
    fn garbage_lz4_block_is_a_decompress_error() {
        let mut body = 100u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0xf0, 0xff, 0xff, 0xff, 0x01, 0x02]);
        assert!(matches!(
            decode_batch(&frame(FLAG_COMPRESSED, &body), DEFAULT_MAX_FRAME),
            Err(WireError::Decompress(_))
        ));
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000 {
            let len = round % 64;
            let mut g = Vec::with_capacity(len + 2);
            g.push(VERSION);
            g.push((round % 3 == 0) as u8);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                g.push(x as u8);
            }
            let _ = decode_batch(&g, DEFAULT_MAX_FRAME);
            let _ = decode_ack(&g, DEFAULT_MAX_FRAME);
            let _ = decode_hello(&g, DEFAULT_MAX_FRAME);
            let _ = decode_downlink(&g, DEFAULT_MAX_FRAME);
        }
    }
}
