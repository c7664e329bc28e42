//! Thin, safe wrappers over kernel and C ABIs (and the C library's allocator). This is the
//! only module tree of the crate allowed to contain `unsafe`; every block carries a
//! `// SAFETY:` comment, and nothing outside it ever sees a raw file descriptor number.
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

/// Gives the heap's free pages back to the kernel (glibc's `malloc_trim(0)`, every arena):
/// a prepare frees most of what it allocated (the unpack's plan and paths), but glibc keeps
/// freed memory of its per-thread arenas mapped, so without this a daemon's RSS stays at its
/// high-water mark. Returns whether anything was released. A no-op on other C libraries.
pub fn release_free_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists; it takes the arena
        // locks itself and is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}
