//! What every wire fuzz target checks: decoding arbitrary bytes never panics, and
//! whatever does decode survives a re-encode (plain and LZ4) unchanged.
//!
//! Messages are compared by their plain encodings, not with `==`: a float property
//! may be NaN, which is never equal to itself.

use std::fmt::Debug;

use edge_agent::wire::{self, Compression, EncodeError, WireError, DEFAULT_MAX_FRAME};

/// Feeds `data` to `decode`; on success re-encodes with `encode` and checks the round
/// trip. Panics (which the fuzzer reports) on any violation.
pub fn check<M: Debug>(
    data: &[u8],
    decode: fn(&[u8], usize) -> Result<M, WireError>,
    encode: fn(&M, Compression) -> Result<Vec<u8>, EncodeError>,
) {
    let Ok(msg) = decode(data, DEFAULT_MAX_FRAME) else {
        return;
    };
    let plain = encode(&msg, Compression::None).expect("a decoded message encodes");
    for compression in [Compression::None, Compression::Lz4] {
        let frame = encode(&msg, compression).expect("a decoded message encodes");
        // The body may be up to the limit and the header adds two bytes.
        let again = decode(&frame, DEFAULT_MAX_FRAME + 16)
            .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
        let again_plain = encode(&again, Compression::None).expect("encodes");
        assert_eq!(plain, again_plain, "round trip changed {msg:?}");
    }
}

pub fn check_batch(data: &[u8]) {
    check(data, wire::decode_batch, wire::encode_batch);
}

pub fn check_ack(data: &[u8]) {
    check(data, wire::decode_ack, wire::encode_ack);
}

pub fn check_hello(data: &[u8]) {
    check(data, wire::decode_hello, wire::encode_hello);
}

pub fn check_downlink(data: &[u8]) {
    check(data, wire::decode_downlink, wire::encode_downlink);
}
