//! `fanfill::fuzzing::index_decode` under libFuzzer (see `docs/fuzzing.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanfill::fuzzing::index_decode(data));
