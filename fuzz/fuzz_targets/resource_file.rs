//! Fuzz target: the resource file parser.
//! The checks live in `twinbd::fuzzing::resource_file`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinbd::fuzzing::resource_file(data));
