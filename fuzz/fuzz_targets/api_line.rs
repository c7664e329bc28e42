//! `fanfill::fuzzing::api_line` under libFuzzer (see `docs/fuzzing.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanfill::fuzzing::api_line(data));
