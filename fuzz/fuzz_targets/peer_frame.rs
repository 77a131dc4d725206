//! Fuzz target: peer frames: codec round trip, the frame reader over loopback TCP, the handshake.
//! The checks live in `twinbd::fuzzing::peer_frame`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinbd::fuzzing::peer_frame(data));
