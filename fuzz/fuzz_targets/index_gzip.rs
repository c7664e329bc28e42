//! `fanfill::fuzzing::index_gzip` under libFuzzer (see `docs/fuzzing.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanfill::fuzzing::index_gzip(data));
