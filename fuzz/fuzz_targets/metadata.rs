//! Fuzz target: superblock slots, external and internal metadata areas, recovery files.
//! The checks live in `twinbd::fuzzing::metadata`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinbd::fuzzing::metadata(data));
