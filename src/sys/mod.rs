//! Thin, safe wrappers over kernel and C ABIs. This is the only module tree of the crate
//! allowed to contain `unsafe`; every block carries a `// SAFETY:` comment, and nothing
//! outside it ever sees a raw file descriptor number.
#![allow(unsafe_code)]

pub mod fanotify;
pub mod fdpass;
pub mod zlib;

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Opens the file behind `fd` again, for writing, through its `/proc/self/fd` link: the same
/// inode whatever its path is now (renamed, or in a tree moved since), with a new open file
/// description of its own (its own access mode and notification mode).
pub fn reopen_for_write(fd: BorrowedFd<'_>) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
