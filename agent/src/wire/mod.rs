//! The wire protocol between agents and the gateway: message types, their framing,
//! optional compression and the MQTT topic names they travel on.
//!
//! Pure encode/decode: this module never touches a socket, a file or a clock, so the
//! agent's uplink, the gateway and the fuzz targets all share one implementation.
//! It must not grow I/O, retries or policy (which seqs to ack, when to resend):
//! those belong to the components that drive it.
//!
//! | direction        | topic (default)        | payload                      |
//! |------------------|------------------------|------------------------------|
//! | agent → gateway  | `edge/<device>/up`     | [`UplinkBatch`]              |
//! | agent → gateway  | `edge/<device>/hello`  | [`Hello`]                    |
//! | gateway → agent  | `edge/<device>/ack`    | [`Ack`]                      |
//! | gateway → agent  | `edge/<device>/down`   | [`Downlink`]                 |
//!
//! Every payload is one frame (see [`frame`] for the byte layout): a version byte, a
//! flags byte, and the postcard encoding of the message, optionally LZ4-compressed.
//! Decoders check the size before anything else, refuse unknown versions and flags,
//! and refuse trailing bytes. The layout of each message is drawn beside its type
//! ([`uplink`], [`ack`], [`downlink`]); `agent/tests/fixtures/wire/*.bin` freeze it.
//!
//! The drawings use postcard's (stable, 1.x) encoding of each Rust type:
//!
//! ```text
//! u8              1 byte, as is
//! u16..u64, u128  varint: LEB128, 7 bits per byte, least significant group first,
//!                 high bit set on every byte but the last (u64: 1-10 bytes,
//!                 u128: 1-19); e.g. 300 = ac 02
//! i64             zigzag ((n << 1) ^ (n >> 63): 0, -1, 1, -2 → 0, 1, 2, 3), then varint
//! f64             8 bytes, IEEE 754, little-endian
//! bool            1 byte, 00 or 01; any other value is malformed
//! String          varint byte length, then UTF-8 bytes
//! Option<T>       00 for None, 01 then T for Some
//! Vec<T>, map     varint element count, then the elements
//! struct, tuple   the fields in declaration order, nothing between them
//! enum            varint variant index (declaration order), then the variant's fields
//! newtype         as its inner value (Seq = varint u64, DeviceId = String)
//! ```
//!
//! Evolving the format: postcard has no field tags, so a message's fields can never be
//! reordered, removed or appended without a new [`frame::VERSION`]. The same holds for
//! every type embedded in a message ([`Event`](crate::model::Event),
//! [`Value`](crate::model::Value), [`Drops`](crate::spool::Drops)), which live outside
//! this module; the golden test fails when one of them changes shape.

pub mod ack;
pub mod downlink;
pub mod frame;
pub mod topics;
pub mod uplink;

pub use ack::{Ack, RejectReason, Rejected, SeqRange};
pub use downlink::{AudienceUpdate, Control, Downlink};
pub use frame::{
    decode_ack, decode_batch, decode_batch_with_bytes, decode_downlink, decode_hello, encode_ack,
    encode_batch, encode_downlink, encode_hello, BatchWithBytes, Compression, EncodeError,
    WireError, DEFAULT_MAX_FRAME, VERSION,
};
pub use topics::{DeviceTopics, TopicError, TopicKind, Topics};
pub use uplink::{Hello, UplinkBatch};
