//! Fill engine (stub, being written).
