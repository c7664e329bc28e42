//! fanfill command-line entry point (stub).

fn main() {}
