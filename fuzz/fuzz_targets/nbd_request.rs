//! Fuzz target: the NBD codec: client flags, options, request headers and their judgement.
//! The checks live in `twinbd::fuzzing::nbd_request`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinbd::fuzzing::nbd_request(data));
