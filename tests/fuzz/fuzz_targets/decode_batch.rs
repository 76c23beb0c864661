//! `wire::decode_batch` on arbitrary bytes: no panic, and a clean round trip for
//! whatever decodes.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| edge_fuzz::check_batch(data));
