//! fanotify pre-content ABI (stub, being written).
