//! `fanfill::fuzzing::unpack_plan` under libFuzzer (see `docs/fuzzing.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanfill::fuzzing::unpack_plan(data));
