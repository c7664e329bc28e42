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

/// Allocations at or above this size get their own mapping ([`fix_mmap_threshold`]).
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] (its default, but fixed): left dynamic,
/// glibc raises the threshold to the size of every mapped block freed (up to 32 MiB), so
/// after a prepare's first large temporary (a planner's table, a hash map's resize) is freed,
/// the later ones come from the heap, between the small allocations that outlive the
/// prepare (one engine entry and one path per placeholder), and the pages they leave free
/// only in part cannot be given back. Fixed, large temporaries are mapped and unmapped
/// whole: 857 against 993 bytes of RSS per placeholder held (`examples/placeholder_bench
/// --daemon --memory`, 200,000 files). Process-wide; the daemon calls it first thing.
/// Returns whether the allocator took it; a no-op on other C libraries.
pub fn fix_mmap_threshold() -> bool {
    #[cfg(target_env = "gnu")]
    {
        let size = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator (under its own lock); any
        // thread may call it at any time.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, size) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
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
