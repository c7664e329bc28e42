//! The `fanfill` command line: a thin adapter over the library.
fn main() {}
