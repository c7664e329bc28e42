//! `fanfill::fuzzing::checkpoint_inflate` under libFuzzer (see `docs/fuzzing.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanfill::fuzzing::checkpoint_inflate(data));
