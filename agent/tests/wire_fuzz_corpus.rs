//! Replays the fuzzers' corpus and crash artifacts on stable Rust, so every input the
//! fuzzers ever kept (`tests/fuzz/corpus/<target>/`) or that once crashed a decoder
//! (`tests/fuzz/artifacts/<target>/`) is checked by a plain `cargo test`.
//!
//! Each file goes to the decoder its directory names. Ok or Err are both fine; what
//! must hold is what the fuzz targets check (`tests/fuzz/src/lib.rs`): no panic, and
//! a message that decodes survives a re-encode unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use edge_agent::wire::{self, Compression, EncodeError, WireError, DEFAULT_MAX_FRAME};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz")
}

fn check<M: Debug>(
    data: &[u8],
    decode: fn(&[u8], usize) -> Result<M, WireError>,
    encode: fn(&M, Compression) -> Result<Vec<u8>, EncodeError>,
) -> bool {
    let Ok(msg) = decode(data, DEFAULT_MAX_FRAME) else {
        return false;
    };
    let plain = encode(&msg, Compression::None).unwrap();
    for compression in [Compression::None, Compression::Lz4] {
        let frame = encode(&msg, compression).unwrap();
        let again = decode(&frame, DEFAULT_MAX_FRAME + 16)
            .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
        assert_eq!(plain, encode(&again, Compression::None).unwrap());
    }
    true
}

/// Runs one input through the decoder of `target`; true when it decoded.
fn replay(target: &str, data: &[u8]) -> bool {
    match target {
        "decode_batch" => check(data, wire::decode_batch, wire::encode_batch),
        "decode_ack" => check(data, wire::decode_ack, wire::encode_ack),
        "decode_hello" => check(data, wire::decode_hello, wire::encode_hello),
        "decode_downlink" => check(data, wire::decode_downlink, wire::encode_downlink),
        other => panic!("no decoder for fuzz target directory `{other}`"),
    }
}

/// `(target, file)` for every file one level below `dir`'s subdirectories.
fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(targets) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for target in targets {
        let target = target.unwrap().path();
        if !target.is_dir() {
            continue;
        }
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        for file in std::fs::read_dir(&target).unwrap() {
            let file = file.unwrap().path();
            if file.is_file() {
                out.push((name.clone(), file));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_corpus_input_decodes_or_fails_cleanly() {
    let corpus = inputs(&fuzz_dir().join("corpus"));
    let mut decoded = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for (target, file) in &corpus {
        let ok = replay(target, &std::fs::read(file).unwrap());
        let entry = decoded.entry(target).or_default();
        entry.0 += 1;
        entry.1 += usize::from(ok);
    }
    println!("target: files (decoded)");
    for (target, (files, ok)) in &decoded {
        println!("{target}: {files} ({ok})");
    }
    for target in [
        "decode_batch",
        "decode_ack",
        "decode_hello",
        "decode_downlink",
    ] {
        let (files, ok) = decoded.get(target).copied().unwrap_or_default();
        assert!(files > 0, "corpus of {target} is empty");
        // The golden frames are seeds, so each corpus holds valid messages too.
        assert!(ok > 0, "no input of {target} decodes");
    }
}

#[test]
fn every_crash_artifact_now_fails_cleanly() {
    for (target, file) in inputs(&fuzz_dir().join("artifacts")) {
        replay(&target, &std::fs::read(&file).unwrap());
    }
}
