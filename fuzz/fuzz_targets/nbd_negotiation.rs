//! Fuzz target: a whole NBD session (negotiation, then transmission) fed as the client's bytes.
//! The checks live in `twinbd::fuzzing::nbd_negotiation`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinbd::fuzzing::nbd_negotiation(data));
