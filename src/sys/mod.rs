//! Thin, safe wrappers over kernel and C ABIs. This is the only module tree of the crate
//! allowed to contain `unsafe`; every block carries a `// SAFETY:` comment, and nothing
//! outside it ever sees a raw file descriptor number.
#![allow(unsafe_code)]

pub mod fanotify;
pub mod fdpass;
pub mod zlib;
