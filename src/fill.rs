//! The fill engine: placeholders that fill on access.
//!
//! Owns the lifecycle of every registered placeholder: it marks the file's inode for
//! `FAN_PRE_ACCESS`, turns each event into the aligned chunks it needs, fetches each missing
//! chunk once from the file's [`ContentSource`] (concurrent readers of a chunk share one
//! fetch), verifies the bytes, writes them through a notification-free writable fd, restores
//! the file's mtime, and answers the kernel: allow only when every byte of the range is there,
//! otherwise `FAN_DENY_ERRNO` with an errno chosen in exactly one place ([`FillError::errno`]).
//! When the last chunk of a file is in, its mark is removed and reads no longer involve the
//! daemon. It does not know about images, registries or layer formats: bytes come from the
//! source, expected digests from the caller's [`Verify`] or, with [`Verify::Source`], from
//! the source.
//!
//! The kernel ↔ engine flow:
//! 1. a reader touches a missing range and blocks in the kernel;
//! 2. the event thread reads the event and polls its handler once: a miss whose bytes are at
//!    hand is filled and answered right there; a handler that has to wait goes on to the
//!    engine's runtime. Events raised by the engine's own threads (writes through an fd that
//!    notifies, when no notification-free one could be had) are allowed at once, so the
//!    engine never waits on itself;
//! 3. the handler fills the chunks and answers. Many handlers run in parallel on at least two
//!    worker threads.
//!
//! User writes are never overwritten: a write raises an event for its range first, which is
//! filled before the write proceeds; a size below the registered size (truncate,
//! `open(O_TRUNC)`, which raises no event) lowers a per-file limit past which nothing is ever
//! filled again.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use nix::errno::Errno;
use nix::sys::stat::FileStat;
use nix::sys::time::TimeSpec;
use tracing::{debug, info, warn};

use crate::digest::Sha256;
use crate::sys::fanotify::{
    DenyErrno, Event, EventId, EventRange, EventReader, FAN_PRE_ACCESS, FanotifyError, Group,
    GroupClass, Response, WriteOpener, current_tid,
};

/// An error a [`ContentSource`] reports. The engine turns every one into `EIO` for the reader.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SourceError {
    /// A source error with a message naming what failed (registry, digest, path).
    pub fn new(message: impl Into<String>) -> SourceError {
        SourceError {
            message: message.into(),
            source: None,
        }
    }

    /// A source error wrapping a lower-level cause.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> SourceError {
        SourceError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Where placeholders' bytes come from: a registry range reader, a local file, a test
/// generator. One source may serve many files, told apart by the key each placeholder was
/// registered with ([`Placeholder::file`]): a layer's reader serves every file of the layer,
/// and the engine keeps no per-file source object. `read_at` must return exactly `len` bytes
/// of the file's true content starting at `offset` (the engine never asks past the file's
/// size), or an error.
pub trait ContentSource: Send + Sync + 'static {
    /// Reads `len` bytes of the content of file `file` at `offset`.
    fn read_at(
        &self,
        file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>>;

    /// The sha256 of piece `piece` of file `file`, for a placeholder registered with
    /// [`Verify::Source`] (the pieces are the placeholder's fill granularity). `None`: the
    /// source has none, and the fill fails (the reader gets `EIO`). The default has none: a
    /// source that wraps another must forward this too.
    fn digest(&self, file: u32, piece: u64) -> Option<Sha256> {
        let _ = (file, piece);
        None
    }
}

/// A content source that reads an ordinary local file (not a placeholder itself).
#[derive(Debug)]
pub struct LocalFileSource {
    file: Arc<File>,
}

impl LocalFileSource {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> std::io::Result<LocalFileSource> {
        Ok(LocalFileSource {
            file: Arc::new(File::open(path)?),
        })
    }
}

impl ContentSource for LocalFileSource {
    /// Reads the one file it was opened on, whatever `file` says.
    fn read_at(
        &self,
        _file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        let file = self.file.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| SourceError::with_source("reading local source file", e))?;
                Ok(buf)
            })
            .await
            .map_err(|e| SourceError::with_source("local read task", e))?
        }
        .boxed()
    }
}

/// What the engine checks fetched bytes against before writing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Nothing beyond the length (the source verifies).
    None,
    /// sha256 of the whole file: the file is always filled whole.
    Whole(Sha256),
    /// sha256 of each `chunk`-sized piece: the file is filled at that granularity.
    Chunks {
        /// Piece size in bytes.
        chunk: u64,
        /// One digest per piece, the last one covering the tail.
        sha256: Vec<Sha256>,
    },
    /// The source's digest of each piece ([`ContentSource::digest`]): pieces of `chunk`
    /// bytes (at least 4096, the engine's smallest fill; smaller is refused), or the whole
    /// file as one piece (`None`: filled whole). What a source that
    /// already holds the digests (a layer's index) registers with, so the engine keeps no
    /// copy of them.
    Source {
        /// Piece size in bytes; `None`: the whole file.
        chunk: Option<u64>,
    },
}

/// A sparse regular file to serve: its path, true size, source and expected digests.
pub struct Placeholder {
    /// The placeholder's path (it must exist, be a regular file of `size` bytes, and not be
    /// open by anyone yet: an fd opened before the mark never raises events).
    pub path: Arc<Path>,
    /// The file's true size.
    pub size: u64,
    /// Where its bytes come from (often shared by many placeholders).
    pub source: Arc<dyn ContentSource>,
    /// The file's key in `source`: passed back with every read ([`ContentSource::read_at`]).
    pub file: u32,
    /// How to check them.
    pub verify: Verify,
}

/// Engine tuning.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Fill granularity for files without chunk digests: each event expands to the aligned
    /// chunks it touches. Default 256 KiB, from `examples/chunk_size.rs` (1 Gbit/s, 2 ms RTT,
    /// shared link): sequential 64 MiB read 598 ms at 256 KiB vs 641 ms at 1 MiB and 640 ms
    /// at 64 KiB; 200 random 4 KiB reads 831 ms and 34.5 MiB fetched vs 1057 ms and 61 MiB at
    /// 1 MiB. Files with chunk digests fill at their digest granularity instead.
    pub chunk_size: u64,
    /// Files up to this size are filled whole on first access. Default 256 KiB.
    pub whole_file_max: u64,
    /// Worker threads serving events (at least 2: one thread can deadlock on itself).
    pub workers: usize,
    /// Upper bound on one chunk fetch; past it the reader gets `EIO`.
    pub fetch_timeout: Duration,
    /// A reader missing a file that a running [`Delivery`] (a layer stream) is expected to
    /// bring within four fetch times (the moving average of this engine's source reads),
    /// and at most within this time, waits for it instead of fetching the file itself: a
    /// walk just behind the stream then reads at the stream's speed instead of competing
    /// with it file by file, while a sparse reader ahead of it still fetches. A delivery
    /// that has not arrived within twice the wait is given up for that file (it is
    /// fetched). Zero: never wait. Default 1 s (`examples/walk.rs`, README "Benchmarks").
    pub delivery_wait: Duration,
    /// After a batch of events answered at once (bytes at hand), the event thread keeps
    /// reading for this long before it sleeps, so that a reader's next miss (which comes
    /// within microseconds) is served without the cost of waking a halted CPU: about 30 µs
    /// per event on a VM ([`EventReader`]). At most this much CPU per batch, none while
    /// idle or while every reader waits on a fetch. Zero: never spin. Default 50 µs
    /// (`examples/fill_bench`).
    pub event_spin: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_size: 256 << 10,
            whole_file_max: 256 << 10,
            workers: 4,
            fetch_timeout: Duration::from_secs(60),
            delivery_wait: Duration::from_secs(1),
            event_spin: Duration::from_micros(50),
        }
    }
}

/// Errors of the fill engine.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The content source failed.
    #[error("fetching {len} bytes at {offset} of {path} failed")]
    Source {
        /// The placeholder.
        path: PathBuf,
        /// First byte asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The source's error.
        #[source]
        source: SourceError,
    },
    /// The source returned a different number of bytes than asked.
    #[error("source returned {got} bytes instead of {len} at {offset} of {path}")]
    ShortRead {
        /// The placeholder.
        path: PathBuf,
        /// First byte asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length returned.
        got: u64,
    },
    /// Fetched bytes did not match the expected digest.
    #[error(
        "digest mismatch in {path} at {offset}: expected sha256:{expected}, got sha256:{actual}"
    )]
    Verify {
        /// The placeholder.
        path: PathBuf,
        /// First byte of the verified piece.
        offset: u64,
        /// Expected digest.
        expected: String,
        /// Digest of what arrived.
        actual: String,
    },
    /// The fetch took longer than [`EngineConfig::fetch_timeout`].
    #[error("fetching {len} bytes at {offset} of {path} timed out after {secs}s")]
    Timeout {
        /// The placeholder.
        path: PathBuf,
        /// First byte asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The timeout.
        secs: u64,
    },
    /// Writing the fetched bytes into the placeholder failed (ENOSPC, EDQUOT, EIO...).
    #[error("writing {len} bytes at {offset} of {path} failed")]
    Write {
        /// The placeholder.
        path: PathBuf,
        /// First byte written.
        offset: u64,
        /// Length written.
        len: u64,
        /// The filesystem's error.
        #[source]
        source: std::io::Error,
    },
    /// The placeholder's path no longer leads to the registered file: it was moved,
    /// deleted or replaced under the engine. Nothing is written there.
    #[error("placeholder {path} was moved, deleted or replaced")]
    Gone {
        /// The placeholder's registered path.
        path: PathBuf,
    },
    /// A placeholder could not be registered.
    #[error("cannot register placeholder {path}")]
    Register {
        /// The placeholder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A placeholder is not what the caller described.
    #[error("placeholder {path} is not a regular file of {expected} bytes (found {found})")]
    NotPlaceholder {
        /// The placeholder.
        path: PathBuf,
        /// Expected size.
        expected: u64,
        /// What was found.
        found: String,
    },
    /// The fanotify layer failed.
    #[error(transparent)]
    Fanotify(#[from] FanotifyError),
    /// The engine's runtime could not start.
    #[error("starting the fill engine's runtime failed")]
    Runtime(#[source] std::io::Error),
}

impl FillError {
    /// The errno a blocked reader sees when a fill fails. This is the only place that
    /// chooses it, and only among the errnos the kernel accepts in `FAN_DENY_ERRNO`:
    /// - `ENOSPC` / `EDQUOT` when writing the fetched bytes into the placeholder failed
    ///   because the destination filesystem is full or over quota, on purpose: the reader
    ///   (a container's process) sees the same errno a write of its own would get, and the
    ///   same read succeeds once space is freed (nothing was recorded as filled);
    /// - `EIO` for everything else (fetch, verification, timeout, a placeholder moved or
    ///   deleted), so a reader never mistakes missing data for data.
    pub fn errno(&self) -> DenyErrno {
        match self {
            FillError::Write { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => DenyErrno::NoSpc,
                Some(libc::EDQUOT) => DenyErrno::DQuot,
                _ => DenyErrno::Io,
            },
            _ => DenyErrno::Io,
        }
    }
}

impl FillError {
    /// Whether the placeholder is no longer at its registered path ([`FillError::Gone`]).
    pub fn is_gone(&self) -> bool {
        matches!(self, FillError::Gone { .. })
    }
}

type FillResult = Result<(), Arc<FillError>>;

/// Fills up to this size are written on the worker thread itself; larger ones go to the
/// blocking pool so a slow disk cannot stall event handling.
const INLINE_WRITE_MAX: u64 = 64 << 10;

/// The file capability xattr, which every write strips.
pub(crate) const CAPABILITY_XATTR: &str = "security.capability";

/// Longest run of consecutive missing chunks fetched with one source read.
const MAX_RUN_BYTES: u64 = 8 << 20;
type SharedFill = Shared<BoxFuture<'static, FillResult>>;

/// A registered placeholder and its fill state. One per placeholder the engine serves, so
/// kept small: what a file needs only while the engine works on it sits behind one pointer
/// ([`FileState::busy`]), fill flags are bits held inline for up to 64 chunks
/// ([`ChunkFlags`]), the source is shared and digests a source holds are not copied
/// ([`Verify::Source`]). 152 bytes (`placeholder_entry_stays_small`).
struct FileEntry {
    path: Arc<Path>,
    /// Device and inode of the registered file: a path that leads elsewhere is never
    /// written or unmarked.
    key: (u64, u64),
    /// Its birth time ([`birth_stamp`]): an inode number can be reused by a file created
    /// after the placeholder was deleted, the birth time tells them apart.
    born: u64,
    size: u64,
    /// Fill granularity of this file ([`FileEntry::chunk`]): 0 for the whole file.
    piece: u32,
    source: Arc<dyn ContentSource>,
    /// The file's key in `source`.
    file: u32,
    /// Position of the first reader access among all files (see [`Engine::accessed`]),
    /// saturating; [`NOT_ACCESSED`] until then.
    first_access: AtomicU32,
    /// Its bytes are checked against the source's digests ([`Verify::Source`]).
    source_digests: bool,
    /// Digests the caller gave ([`Verify::Whole`], [`Verify::Chunks`]), boxed: a placeholder
    /// whose source holds its digests, or that has none, pays one null pointer for them.
    given: Option<Box<Verify>>,
    state: Mutex<FileState>,
    /// `security.capability` of the placeholder: the kernel strips it on every write, so
    /// each fill puts it back (a filled `ping` must keep `cap_net_raw`).
    capability: Option<Box<Capability>>,
}

/// A file capability to restore after each write: rare, so a placeholder without one pays
/// a null pointer for it.
struct Capability(Box<[u8]>);

/// A birth time as one number, for [`FileEntry::born`]: nanoseconds since the epoch plus
/// one; 0 when the filesystem does not report it, `u64::MAX` for a time before the epoch
/// (no placeholder is born then, so such a file is never taken for one).
fn birth_stamp(born: std::io::Result<std::time::SystemTime>) -> u64 {
    match born {
        Err(_) => 0,
        Ok(t) => t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(u64::MAX, |d| {
                u64::try_from(d.as_nanos()).map_or(u64::MAX - 1, |n| n.saturating_add(1))
            }),
    }
}

/// [`FileEntry::first_access`] of a file no reader has touched.
const NOT_ACCESSED: u32 = u32::MAX;

impl FileEntry {
    /// Notes a reader's access (the first one counts).
    fn touched(&self, inner: &Inner) {
        if self.first_access.load(Ordering::Relaxed) == NOT_ACCESSED {
            let seq = inner.access_seq.fetch_add(1, Ordering::Relaxed);
            // Past 2^32 - 1 first accesses, later ones tie (their order is lost).
            let seq = u32::try_from(seq)
                .unwrap_or(NOT_ACCESSED - 1)
                .min(NOT_ACCESSED - 1);
            let _ = self.first_access.compare_exchange(
                NOT_ACCESSED,
                seq,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Position of the first reader access, if any.
    fn accessed_at(&self) -> Option<u32> {
        let seq = self.first_access.load(Ordering::Relaxed);
        (seq != NOT_ACCESSED).then_some(seq)
    }
}

/// One flag per chunk of a file: filled. Up to 64 chunks (every file filled whole, and
/// chunked files up to 64 chunks) the bits are held inline, no allocation; the type is two
/// words either way.
#[derive(Debug, Clone)]
enum ChunkFlags {
    Inline { bits: u64, len: u8 },
    Heap(Box<HeapFlags>),
}

/// [`ChunkFlags`] past 64 chunks.
#[derive(Debug, Clone)]
struct HeapFlags {
    bits: Box<[u64]>,
    len: usize,
}

impl ChunkFlags {
    /// `len` flags, all clear.
    fn new(len: usize) -> ChunkFlags {
        if len <= 64 {
            ChunkFlags::Inline {
                bits: 0,
                len: len as u8,
            }
        } else {
            ChunkFlags::Heap(Box::new(HeapFlags {
                bits: vec![0; len.div_ceil(64)].into_boxed_slice(),
                len,
            }))
        }
    }

    fn len(&self) -> usize {
        match self {
            ChunkFlags::Inline { len, .. } => usize::from(*len),
            ChunkFlags::Heap(h) => h.len,
        }
    }

    fn get(&self, i: usize) -> bool {
        debug_assert!(i < self.len());
        match self {
            ChunkFlags::Inline { bits, .. } => bits >> i & 1 == 1,
            ChunkFlags::Heap(h) => h.bits[i / 64] >> (i % 64) & 1 == 1,
        }
    }

    fn set(&mut self, i: usize) {
        assert!(i < self.len(), "chunk {i} of {}", self.len());
        match self {
            ChunkFlags::Inline { bits, .. } => *bits |= 1 << i,
            ChunkFlags::Heap(h) => h.bits[i / 64] |= 1 << (i % 64),
        }
    }

    /// Whether the first `n` flags are all set.
    fn all_below(&self, n: usize) -> bool {
        (0..n).all(|i| self.get(i))
    }

    fn to_vec(&self) -> Vec<bool> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// What a file needs only while the engine works on it: its fills in flight, its cached
/// writable fd, the delivery expected to bring it. Allocated while one of them is there (a
/// placeholder nothing is happening to costs one null pointer).
#[derive(Default)]
struct Busy(Option<Box<BusyState>>);

#[derive(Default)]
struct BusyState {
    /// Fills in flight by chunk.
    inflight: BTreeMap<u64, SharedFill>,
    /// See [`Busy::writer`].
    writer: Option<Arc<File>>,
    /// See [`Busy::expected`].
    expected: Option<(Arc<Delivery>, u64)>,
}

impl Busy {
    /// The fill in flight of chunk `i`.
    fn fill(&self, i: u64) -> Option<&SharedFill> {
        self.0.as_ref()?.inflight.get(&i)
    }

    fn filling(&self, i: u64) -> bool {
        self.fill(i).is_some()
    }

    fn start_fill(&mut self, i: u64, fill: SharedFill) {
        self.0.get_or_insert_default().inflight.insert(i, fill);
    }

    fn end_fill(&mut self, i: u64) {
        if let Some(b) = &mut self.0 {
            b.inflight.remove(&i);
        }
        self.tidy();
    }

    /// A notification-free writable fd kept open between fills while the file is marked
    /// (counted in [`FileState::writers`] as one more writer), so a fill needs no new open:
    /// closed when the file completes (before its mark goes), is unmarked or forgotten, or
    /// makes room for another file's ([`WRITER_CACHE_MAX`]).
    fn writer(&self) -> Option<&Arc<File>> {
        self.0.as_ref()?.writer.as_ref()
    }

    fn set_writer(&mut self, file: Arc<File>) {
        self.0.get_or_insert_default().writer = Some(file);
    }

    fn take_writer(&mut self) -> Option<Arc<File>> {
        let file = self.0.as_mut()?.writer.take();
        self.tidy();
        file
    }

    /// The delivery bringing this file, and the position in it by which the whole file has
    /// passed ([`Engine::expect`]).
    fn expected(&self) -> Option<&(Arc<Delivery>, u64)> {
        self.0.as_ref()?.expected.as_ref()
    }

    fn set_expected(&mut self, expected: Option<(Arc<Delivery>, u64)>) {
        match expected {
            Some(e) => self.0.get_or_insert_default().expected = Some(e),
            None => {
                if let Some(b) = &mut self.0 {
                    b.expected = None;
                }
                self.tidy();
            }
        }
    }

    /// Frees the state once nothing is left in it.
    fn tidy(&mut self) {
        if self
            .0
            .as_ref()
            .is_some_and(|b| b.inflight.is_empty() && b.writer.is_none() && b.expected.is_none())
        {
            self.0 = None;
        }
    }
}

struct FileState {
    /// Nothing at or past this offset is ever filled: the smallest size the file has been
    /// seen with (truncate, `O_TRUNC`, or the registered size).
    limit: u64,
    filled: ChunkFlags,
    missing: u32,
    /// The engine's own writable opens of the file in use ([`WriterHold`], and the cached
    /// [`Busy::writer`]). A complete file keeps its mark until this is zero: `execve` of an unmarked file denies writers, and
    /// fails with ETXTBSY while one is open, whereas a file opened under a pre-content watch
    /// is exempt. (Event fds are read-only for the same reason: the kernel opens one for
    /// every queued event when it is read, which can be after the mark went.)
    writers: u32,
    busy: Busy,
    complete: bool,
    /// Complete, with the mark left for the last [`WriterHold`] to remove.
    unmark_pending: bool,
    /// Carries the engine's pre-content mark (registered marked, not complete, not
    /// unmarked): only then may a writable fd stay open between fills.
    marked: bool,
}

/// The registered files by device and inode: a set of the entries keyed by their own
/// [`FileEntry::key`], one pointer a slot (a map from the key would store it twice).
#[derive(Default)]
struct Files(HashSet<ByKey>);

/// A [`FileEntry`] hashed and compared by its key.
struct ByKey(Arc<FileEntry>);

impl std::borrow::Borrow<(u64, u64)> for ByKey {
    fn borrow(&self) -> &(u64, u64) {
        &self.0.key
    }
}

impl std::hash::Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.key.hash(h);
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &ByKey) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

impl Files {
    fn get(&self, key: &(u64, u64)) -> Option<&Arc<FileEntry>> {
        self.0.get(key).map(|e| &e.0)
    }

    /// Adds `entry`, replacing the one with its key.
    fn insert(&mut self, entry: Arc<FileEntry>) {
        self.0.replace(ByKey(entry));
    }

    fn remove(&mut self, key: &(u64, u64)) -> Option<Arc<FileEntry>> {
        self.0.take(key).map(|e| e.0)
    }

    fn values(&self) -> impl Iterator<Item = &Arc<FileEntry>> {
        self.0.iter().map(|e| &e.0)
    }
}

/// Files that keep a writable fd open between fills ([`Busy::writer`]) at most.
const WRITER_CACHE_MAX: usize = 64;

/// One writable open of a registered file by the engine, counted in
/// [`FileState::writers`]; dropped after the file is closed. The last one of a complete
/// file removes its mark.
struct WriterHold {
    inner: Arc<Inner>,
    entry: Arc<FileEntry>,
}

impl WriterHold {
    fn new(inner: &Arc<Inner>, entry: &Arc<FileEntry>) -> WriterHold {
        entry.state.lock().unwrap().writers += 1;
        WriterHold {
            inner: inner.clone(),
            entry: entry.clone(),
        }
    }
}

impl Drop for WriterHold {
    fn drop(&mut self) {
        release_writer(&self.inner, &self.entry, true);
    }
}

/// Takes one writer off the count (`counted`; its fd is closed already) and removes the mark
/// of a complete file when that was the last one.
fn release_writer(inner: &Inner, entry: &FileEntry, counted: bool) {
    let unmark = {
        let mut st = entry.state.lock().unwrap();
        if counted {
            st.writers -= 1;
        }
        st.writers == 0 && std::mem::take(&mut st.unmark_pending)
    };
    if unmark {
        remove_mark(inner, entry);
    }
}

/// Closes the file's cached writable fd ([`Busy::writer`]), if any, and stops caching
/// one unless `keep_marked` (eviction: the file stays marked).
fn drop_cached_writer(inner: &Inner, entry: &FileEntry, keep_marked: bool) {
    let cached = {
        let mut st = entry.state.lock().unwrap();
        if !keep_marked {
            st.marked = false;
        }
        st.busy.take_writer()
    };
    if let Some(file) = cached {
        // In-flight fills sharing it hold counts of their own.
        drop(file);
        release_writer(inner, entry, true);
    }
}

impl FileEntry {
    /// Fill granularity in bytes.
    fn chunk(&self) -> u64 {
        match self.piece {
            0 => self.size.max(1),
            n => u64::from(n),
        }
    }

    fn chunk_range(&self, idx: u64) -> (u64, u64) {
        let chunk = self.chunk();
        let start = idx * chunk;
        (start, (start + chunk).min(self.size))
    }

    /// Bytes of the chunks filled (a truncated file's count includes the part of its
    /// chunks past the cut).
    fn bytes_filled(&self, st: &FileState) -> u64 {
        let n = st.filled.len();
        if n == 0 {
            return 0;
        }
        let filled = (n - st.missing as usize) as u64;
        let short_tail = self.chunk() * n as u64 - self.size;
        filled * self.chunk() - if st.filled.get(n - 1) { short_tail } else { 0 }
    }
}

/// Counters and a latency histogram, all lock-free.
#[derive(Default)]
struct Counters {
    events: AtomicU64,
    self_events: AtomicU64,
    quiet_writes: AtomicU64,
    fills: AtomicU64,
    bytes_fetched: AtomicU64,
    errors: AtomicU64,
    completed: AtomicU64,
    /// Fills that waited for a delivery that then passed their file.
    delivered: AtomicU64,
    /// Event service times.
    latency: LatencyHistogram,
}

/// Times in log2 buckets of microseconds (bucket `i` holds `[2^i, 2^(i+1))` µs), lock-free:
/// what a metrics histogram and the status percentiles are made from.
#[derive(Default)]
pub struct LatencyHistogram([AtomicU64; 32]);

impl LatencyHistogram {
    /// Counts one time.
    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let bucket = (63 - us.leading_zeros() as usize).min(31);
        self.0[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The count per bucket so far.
    pub fn buckets(&self) -> Vec<u64> {
        self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

/// A snapshot of the engine's progress and health.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Placeholders registered.
    pub files: u64,
    /// Placeholders completely filled (mark removed).
    pub files_complete: u64,
    /// Sum of registered sizes.
    pub bytes_total: u64,
    /// Bytes of the chunks filled in placeholders (restored progress included; a truncated
    /// file's count includes the part of its chunks past the cut).
    pub bytes_filled: u64,
    /// Bytes fetched from sources.
    pub bytes_fetched: u64,
    /// Pre-content events served for readers.
    pub events: u64,
    /// Events raised by the engine's own writes (allowed at once): writes through an fd
    /// that notifies, when no notification-free one could be had ([`WriteOpener`]).
    pub self_events: u64,
    /// Fills written through a notification-free fd (no event raised).
    pub quiet_writes: u64,
    /// Chunk fills performed (fetches).
    pub fills: u64,
    /// Fills or events that ended in an error answer.
    pub errors: u64,
    /// Fills that waited for a running [`Delivery`] (a layer stream) that then passed their
    /// file (whatever it did not bring, a refused piece, is still fetched).
    pub delivered: u64,
    /// Median event service time, microseconds (bucket upper bound).
    pub latency_p50_us: u64,
    /// 99th percentile event service time, microseconds (bucket upper bound).
    pub latency_p99_us: u64,
}

struct Inner {
    group: Arc<Group>,
    /// Makes the writable fds fills write through, raising no events (`None`: the kernel
    /// refused the group; writes then raise events the event thread allows at once).
    writer: Option<WriteOpener>,
    config: EngineConfig,
    /// Counts first reader accesses (orders [`Engine::accessed`]).
    access_seq: AtomicU64,
    files: RwLock<Files>,
    /// Thread ids of the engine's own runtime threads.
    own_tids: RwLock<HashSet<i32>>,
    counters: Counters,
    inflight_events: AtomicU64,
    /// Fills waiting for a [`Delivery`] rather than fetching (see
    /// [`Engine::waiting_for_delivery`]).
    waiting_delivery: AtomicU64,
    /// Moving average of a source read's time, microseconds (0: none yet): a reader waits
    /// for a delivery only when it is expected sooner than a few fetches would take.
    fetch_us: AtomicU64,
    /// Tells the event thread to stop reading.
    stopping: AtomicBool,
    /// The runtime events are served on (set once it is built).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    /// Records events read but not yet answered (for a successor after a crash).
    journal: Option<Arc<dyn EventJournal>>,
    /// While `Some`, events for readers are held here unanswered (start-up: the files are
    /// not registered yet); [`Engine::open_gate`] dispatches them.
    gate: Mutex<Option<Vec<Event>>>,
    /// Answer `EIO` for events on files the engine does not know (instead of allowing).
    deny_unknown: AtomicBool,
    /// Files that got a cached writable fd, oldest first ([`Busy::writer`]).
    cached_writers: Mutex<std::collections::VecDeque<std::sync::Weak<FileEntry>>>,
}

/// Where the engine records the events it has read but not yet answered, so that a
/// successor that takes the group over after a crash can fill and answer them by
/// [`EventId`]. `begin` runs on the event thread before the event is handled, `end` after
/// its answer was written.
pub trait EventJournal: Send + Sync + 'static {
    /// An event for `file` (the event's fd) and `range` was read and will be answered.
    fn begin(&self, id: EventId, file: std::os::fd::BorrowedFd<'_>, range: Option<EventRange>);
    /// An open of an overlay file whose lower placeholder is `lower` was read and will be
    /// answered once that file is filled whole (the overlay open watch, [`crate::overlay`]).
    fn begin_open(&self, id: EventId, lower: FileId);
    /// The event was answered.
    fn end(&self, id: EventId);
    /// Any event needing an answer was read (the engine's own ones included, which are not
    /// begun/ended): lets the journal track the highest event number in use.
    fn seen(&self, _id: EventId) {}
}

/// Per-file fill progress, for persisting it (see [`Engine::progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProgress {
    /// Fill granularity of the file.
    pub chunk: u64,
    /// One flag per chunk: filled.
    pub filled: Vec<bool>,
    /// Complete (every chunk below the limit is in; mark removed).
    pub complete: bool,
    /// Bytes of the chunks filled (restored progress included; a truncated file's count
    /// includes the part of its chunks past the cut).
    pub bytes_filled: u64,
    /// The registered size.
    pub size: u64,
}

/// The fill engine: a pre-content fanotify group, its placeholders, and the runtime serving
/// their events. Dropping it stops serving: blocked readers are answered first (filled or
/// `EIO`), then the group is closed.
pub struct Engine {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Identifies a registered placeholder (its device and inode numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// Device and inode 0: a filler for a slot that holds no registered file (kept beside a
    /// flag saying so, never looked up).
    pub const NONE: FileId = FileId { dev: 0, ino: 0 };

    /// The device number.
    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// The inode number.
    pub fn ino(&self) -> u64 {
        self.ino
    }
}

fn stat_key(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

impl Engine {
    /// Creates the group and starts serving. Fails with a typed error on kernels without
    /// pre-content events.
    pub fn start(config: EngineConfig) -> Result<Engine, FillError> {
        let group = Arc::new(Group::new(GroupClass::PreContent)?);
        Engine::with_group(group, config)
    }

    /// Serves an existing group (for example one taken over from a predecessor).
    pub fn with_group(group: Arc<Group>, config: EngineConfig) -> Result<Engine, FillError> {
        Engine::with_group_journaled(group, config, None, false)
    }

    /// Serves an existing group, recording in-flight events in `journal`. With `gated`,
    /// events of readers are held unanswered until [`Engine::open_gate`] (the engine's own
    /// writes are still allowed at once): a successor registers every file first, so no
    /// event finds an unknown file.
    pub fn with_group_journaled(
        group: Arc<Group>,
        mut config: EngineConfig,
        journal: Option<Arc<dyn EventJournal>>,
        gated: bool,
    ) -> Result<Engine, FillError> {
        config.workers = config.workers.max(2);
        config.chunk_size = config.chunk_size.max(4096);
        let writer = WriteOpener::new()
            .inspect_err(|e| warn!(error = %e, "no notification-free writer; fills raise events"))
            .ok();
        let inner = Arc::new(Inner {
            group,
            writer,
            config: config.clone(),
            files: RwLock::new(Files::default()),
            own_tids: RwLock::new(HashSet::new()),
            counters: Counters::default(),
            inflight_events: AtomicU64::new(0),
            waiting_delivery: AtomicU64::new(0),
            fetch_us: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            runtime: std::sync::OnceLock::new(),
            journal,
            gate: Mutex::new(gated.then(Vec::new)),
            deny_unknown: AtomicBool::new(false),
            access_seq: AtomicU64::new(0),
            cached_writers: Mutex::new(std::collections::VecDeque::new()),
        });
        let (start_inner, stop_inner) = (inner.clone(), inner.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .thread_name("fanfill-fill")
            .enable_all()
            .on_thread_start(move || {
                start_inner.own_tids.write().unwrap().insert(current_tid());
            })
            .on_thread_stop(move || {
                stop_inner.own_tids.write().unwrap().remove(&current_tid());
            })
            .build()
            .map_err(FillError::Runtime)?;
        let _ = inner.runtime.set(runtime.handle().clone());
        let reader = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("fanfill-events".into())
                .spawn(move || event_thread(inner))
                .map_err(FillError::Runtime)?
        };
        info!(
            workers = config.workers,
            chunk = config.chunk_size,
            "fill engine started"
        );
        Ok(Engine {
            inner,
            runtime: Some(runtime),
            reader: Some(reader),
        })
    }

    /// The group, for handing a duplicate of its fd to a holder process.
    pub fn group(&self) -> &Group {
        &self.inner.group
    }

    /// A handle to the engine's runtime (to run sources' futures or prefetch on it).
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.as_ref().expect("running").handle().clone()
    }

    /// How long an event thread keeps reading after serving events
    /// ([`EngineConfig::event_spin`]); other event threads serving this engine's files
    /// (the overlay watcher's) do the same.
    pub fn event_spin(&self) -> Duration {
        self.inner.config.event_spin
    }

    /// Registers a placeholder: checks it, marks its inode, and serves it from now on.
    /// Zero-length files need no mark and are reported complete at once.
    pub fn register(&self, p: Placeholder) -> Result<FileId, FillError> {
        self.register_as(p, true)
    }

    /// [`Engine::register`], with the pre-content mark placed or not.
    fn register_as(&self, p: Placeholder, mark: bool) -> Result<FileId, FillError> {
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&p.path)
            .map_err(|source| FillError::Register {
                path: p.path.to_path_buf(),
                source,
            })?;
        // One statx for the type, size, identity and birth time.
        let meta = file.metadata().map_err(|source| FillError::Register {
            path: p.path.to_path_buf(),
            source,
        })?;
        self.register_open(&file, &meta, p, true, mark)
    }

    /// Registers a placeholder its creator still has open as `file`, `meta` being its
    /// metadata (type, size, device, inode, birth time: taken after it was sized), in the
    /// pass that creates it ([`crate::unpack::PlaceholderSink`]): no path lookup, no second
    /// `statx`, and the mark goes on through `file`. `capability`: the file may carry a
    /// `security.capability` to keep (read back through `file`). `mark`: place the
    /// pre-content mark ([`Engine::register`]) or not ([`Engine::register_unmarked`]).
    pub fn register_open(
        &self,
        file: &File,
        meta: &std::fs::Metadata,
        p: Placeholder,
        read_capability: bool,
        mark: bool,
    ) -> Result<FileId, FillError> {
        let is_reg = meta.file_type().is_file();
        if !is_reg || meta.len() != p.size {
            return Err(FillError::NotPlaceholder {
                path: p.path.to_path_buf(),
                expected: p.size,
                found: if is_reg {
                    format!("{} bytes", meta.len())
                } else {
                    "not a regular file".into()
                },
            });
        }
        let key = {
            use std::os::unix::fs::MetadataExt as _;
            (meta.dev(), meta.ino())
        };
        let id = FileId {
            dev: key.0,
            ino: key.1,
        };
        let chunk = match &p.verify {
            Verify::Whole(_) | Verify::Source { chunk: None } => p.size.max(1),
            Verify::Chunks { chunk, .. } | Verify::Source { chunk: Some(chunk) } => {
                (*chunk).max(4096)
            }
            Verify::None if p.size <= self.inner.config.whole_file_max => p.size.max(1),
            Verify::None => self.inner.config.chunk_size,
        };
        let nchunks = p.size.div_ceil(chunk) as usize;
        // Not a placeholder the user changed (`NotPlaceholder`): a granularity the engine
        // cannot fill at.
        let unfillable = |why: String| FillError::Register {
            path: p.path.to_path_buf(),
            source: std::io::Error::other(why),
        };
        if let Verify::Source { chunk: Some(c) } = p.verify
            && c < 4096
        {
            return Err(unfillable(format!(
                "digests of {c}-byte pieces: the engine fills 4096 bytes at least"
            )));
        }
        // Granularities past 4 GiB (a chunk that large of a larger file) are not kept.
        let piece = match u32::try_from(chunk) {
            _ if chunk >= p.size.max(1) => 0,
            Ok(n) => n,
            Err(_) => {
                return Err(unfillable(format!(
                    "chunks of {chunk} bytes: larger than the engine fills"
                )));
            }
        };
        let capability = if read_capability {
            use xattr::FileExt as _;
            file.get_xattr(CAPABILITY_XATTR).ok().flatten()
        } else {
            None
        };
        let missing = u32::try_from(nchunks).map_err(|_| {
            unfillable(format!(
                "{nchunks} chunks of {chunk} bytes: more than the engine tracks"
            ))
        })?;
        let born = birth_stamp(meta.created());
        let entry = Arc::new(FileEntry {
            path: p.path,
            key,
            born,
            size: p.size,
            piece,
            source: p.source,
            file: p.file,
            first_access: AtomicU32::new(NOT_ACCESSED),
            source_digests: matches!(p.verify, Verify::Source { .. }),
            given: match p.verify {
                Verify::None | Verify::Source { .. } => None,
                v => Some(Box::new(v)),
            },
            state: Mutex::new(FileState {
                limit: p.size,
                filled: ChunkFlags::new(nchunks),
                missing,
                busy: Busy::default(),
                complete: nchunks == 0,
                writers: 0,
                unmark_pending: false,
                marked: mark,
            }),
            capability: capability.map(|c| Box::new(Capability(c.into_boxed_slice()))),
        });
        if nchunks > 0 {
            // Record before marking, so the first event finds the entry.
            self.inner.files.write().unwrap().insert(entry.clone());
            if mark {
                if let Err(e) = self.inner.group.mark_inode(file.as_fd(), FAN_PRE_ACCESS) {
                    self.inner.files.write().unwrap().remove(&key);
                    return Err(e.into());
                }
            }
            debug!(path = %entry.path.display(), size = entry.size, chunk, mark, "placeholder registered");
        } else {
            self.inner.files.write().unwrap().insert(entry);
            self.inner
                .counters
                .completed
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(id)
    }

    /// Stops serving a placeholder: removes its mark and forgets it (for example when a
    /// prepare fails half-way and its tree is removed). Fills in flight finish first.
    pub fn unregister(&self, id: FileId) -> Result<(), FillError> {
        let Some(entry) = self.inner.files.write().unwrap().remove(&(id.dev, id.ino)) else {
            return Ok(());
        };
        drop_cached_writer(&self.inner, &entry, false);
        if entry.state.lock().unwrap().complete {
            return Ok(());
        }
        unmark_entry(&self.inner, &entry)
    }

    /// Stops serving a placeholder that is about to be deleted, keeping its mark: a reader
    /// that still has it open is answered `EIO` (with [`Engine::set_deny_unknown`]) instead
    /// of reading zeros, and the kernel drops the mark with the inode. Fills in flight
    /// finish first.
    pub fn forget(&self, id: FileId) {
        let entry = self.inner.files.write().unwrap().remove(&(id.dev, id.ino));
        if let Some(entry) = entry {
            // Nothing of ours keeps the inode (and its blocks) alive.
            drop_cached_writer(&self.inner, &entry, false);
        }
    }

    /// Whether a registered file is completely filled (or was cut short by the user).
    pub fn is_complete(&self, id: FileId) -> bool {
        self.entry(id)
            .map(|e| e.state.lock().unwrap().complete)
            .unwrap_or(false)
    }

    /// The registered file, opened read-only at its registered path, when it is complete
    /// and that path still names its inode (a file the user replaced since is not ours to
    /// read); `None` otherwise. A complete file carries no mark of the engine's, so reading
    /// it raises no event.
    pub fn open_complete(&self, id: FileId) -> Option<File> {
        open_complete(&self.inner, id)
    }

    /// [`Engine::open_complete`] as a function usable after `self` is borrowed elsewhere
    /// (like [`Engine::filler`]).
    pub fn complete_opener(&self) -> CompleteOpener {
        let inner = self.inner.clone();
        Arc::new(move |id| open_complete(&inner, id))
    }

    fn entry(&self, id: FileId) -> Option<Arc<FileEntry>> {
        self.inner
            .files
            .read()
            .unwrap()
            .get(&(id.dev, id.ino))
            .cloned()
    }
}

/// See [`Engine::open_complete`].
fn open_complete(inner: &Inner, id: FileId) -> Option<File> {
    let entry = inner
        .files
        .read()
        .unwrap()
        .get(&(id.dev, id.ino))
        .cloned()?;
    if !entry.state.lock().unwrap().complete {
        return None;
    }
    // The registered inode only (device, inode and birth time), never a swapped path.
    open_checked(&entry, false).ok()
}

impl Engine {
    /// Fills the whole file now (prefetch) and removes its mark. Runs on the engine's
    /// runtime; waits for the result.
    pub fn fill_file(&self, id: FileId) -> Result<(), FillError> {
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let inner = self.inner.clone();
        self.run_on_runtime(async move { prefetch_entry(&inner, &entry).await })
    }

    /// Fills every registered file, `parallel` at a time, until the image is complete.
    pub fn fill_all(&self, parallel: usize) -> Result<(), FillError> {
        let entries: Vec<_> = self.inner.files.read().unwrap().values().cloned().collect();
        self.fill_entries(entries, parallel)
    }

    /// Fills the registered files among `ids` in that order (at most `parallel` at once;
    /// a file starts only after every earlier one has started), then removes their marks.
    pub fn fill_files(&self, ids: &[FileId], parallel: usize) -> Result<(), FillError> {
        let entries: Vec<_> = ids.iter().filter_map(|id| self.entry(*id)).collect();
        self.fill_entries(entries, parallel)
    }

    /// The files among `ids` that readers have touched (a pre-content event, or an open
    /// served through [`Engine::filler`]), in the order of their first access: what a
    /// workload needed, to record as an access profile.
    pub fn accessed(&self, ids: &[FileId]) -> Vec<FileId> {
        let mut seen: Vec<(u32, FileId)> = ids
            .iter()
            .filter_map(|id| Some((self.entry(*id)?.accessed_at()?, *id)))
            .collect();
        seen.sort_unstable_by_key(|(order, _)| *order);
        seen.dedup_by_key(|(_, id)| *id);
        seen.into_iter().map(|(_, id)| id).collect()
    }

    fn fill_entries(&self, entries: Vec<Arc<FileEntry>>, parallel: usize) -> Result<(), FillError> {
        let inner = self.inner.clone();
        self.run_on_runtime(async move {
            use futures::stream::{self, TryStreamExt};
            stream::iter(entries.into_iter().map(Ok))
                .try_for_each_concurrent(parallel.max(1), |e| {
                    let inner = inner.clone();
                    async move { prefetch_entry(&inner, &e).await }
                })
                .await
        })
    }

    /// Runs a fill on one of the engine's own threads and waits for it: writes a fill makes
    /// through a path raise events, which the engine allows at once only for its own
    /// threads (a write on the caller's thread would wait for the engine, which waits for
    /// the write).
    fn run_on_runtime(
        &self,
        fut: impl std::future::Future<Output = FillResult> + Send + 'static,
    ) -> Result<(), FillError> {
        let handle = self.handle();
        match handle.block_on(handle.spawn(fut)) {
            Ok(r) => r.map_err(unwrap_arc),
            Err(e) => Err(FillError::Register {
                path: PathBuf::new(),
                source: std::io::Error::other(format!("fill task: {e}")),
            }),
        }
    }

    /// Dispatches the events held since a gated start and serves every later one at once.
    pub fn open_gate(&self) {
        let held = self.inner.gate.lock().unwrap().take().unwrap_or_default();
        let _guard = self.handle().enter();
        for event in held {
            dispatch_now(&self.inner, event);
        }
    }

    /// With `deny`, an event on a file the engine does not know is answered `EIO` instead of
    /// allowed (a daemon that took over a group with marks of files it could not re-serve).
    pub fn set_deny_unknown(&self, deny: bool) {
        self.inner.deny_unknown.store(deny, Ordering::SeqCst);
    }

    /// Readers' pre-content events so far (every miss and every read of a range being
    /// filled), cheap to poll.
    pub fn events_seen(&self) -> u64 {
        self.inner.counters.events.load(Ordering::Relaxed)
    }

    /// Events of readers being served right now (read, not yet answered).
    pub fn inflight_events(&self) -> u64 {
        self.inner.inflight_events.load(Ordering::SeqCst)
    }

    /// Fills waiting for a [`Delivery`] right now, readers' or the engine's own
    /// ([`Engine::fill_file`]). A delivery that yields to readers' misses subtracts these:
    /// yielding to a reader that waits for the delivery would stall both.
    pub fn waiting_for_delivery(&self) -> u64 {
        self.inner.waiting_delivery.load(Ordering::SeqCst)
    }

    /// Ties a registered file to `delivery`: the whole file will have been offered once the
    /// delivery's position reaches `by`. A reader missing a chunk of the file while the
    /// delivery is expected to get there soon (four fetch times, at most
    /// [`EngineConfig::delivery_wait`]) waits for it rather than fetching; otherwise, or once the delivery has ended or is late, the file
    /// is fetched from its source as usual. A file tied to an earlier delivery is tied to
    /// this one instead.
    pub fn expect(&self, id: FileId, delivery: &Arc<Delivery>, by: u64) {
        if let Some(entry) = self.entry(id) {
            let expected = Some((delivery.clone(), by));
            entry.state.lock().unwrap().busy.set_expected(expected);
        }
    }

    /// Lets go of `delivery` for the files in `ids` still expecting it (once it has ended:
    /// a stream that stopped before their bytes came). Each file's hold on it (and the
    /// working state kept for it) goes now, not when a reader next touches the file.
    pub fn delivery_ended(&self, ids: &[FileId], delivery: &Arc<Delivery>) {
        // Called from a guard's drop, maybe while unwinding: what a panic poisoned is left
        // as it is (a second panic here would abort).
        let entries: Vec<Arc<FileEntry>> = match self.inner.files.read() {
            Ok(files) => ids
                .iter()
                .filter_map(|id| files.get(&(id.dev, id.ino)).cloned())
                .collect(),
            Err(_) => return,
        };
        for entry in entries {
            let Ok(mut st) = entry.state.lock() else {
                continue;
            };
            if st
                .busy
                .expected()
                .is_some_and(|(d, _)| Arc::ptr_eq(d, delivery))
            {
                st.busy.set_expected(None);
            }
        }
    }

    /// Registers a placeholder whose chunks `filled` (at granularity `chunk`) are known to be
    /// present already (progress recorded before a restart). A file whose recorded chunks
    /// cover it is complete at once and keeps no mark. Progress recorded at another
    /// granularity is ignored (the file is filled again).
    pub fn register_filled(
        &self,
        p: Placeholder,
        chunk: u64,
        filled: &[bool],
    ) -> Result<FileId, FillError> {
        let id = self.register(p)?;
        let Some(entry) = self.entry(id) else {
            return Ok(id);
        };
        if entry.chunk() != chunk || filled.len() != entry.state.lock().unwrap().filled.len() {
            return Ok(id);
        }
        {
            let mut st = entry.state.lock().unwrap();
            for (i, f) in filled.iter().enumerate() {
                if *f && !st.filled.get(i) {
                    st.filled.set(i);
                    st.missing -= 1;
                }
            }
        }
        maybe_complete(&self.inner, &entry);
        Ok(id)
    }

    /// The fill progress of a registered file.
    pub fn progress(&self, id: FileId) -> Option<FileProgress> {
        let entry = self.entry(id)?;
        let st = entry.state.lock().unwrap();
        Some(FileProgress {
            chunk: entry.chunk(),
            filled: st.filled.to_vec(),
            complete: st.complete,
            bytes_filled: entry.bytes_filled(&st),
            size: entry.size,
        })
    }

    /// Fills `[offset, offset + count)` of a registered file (`count == 0`: the whole file),
    /// writing through the file's path (the engine allows its own writes). For answering a
    /// predecessor's in-flight events after a takeover. Waits for the result.
    pub fn fill_range(&self, id: FileId, offset: u64, count: u64) -> Result<(), FillError> {
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let end = if count == 0 {
            u64::MAX
        } else {
            offset.saturating_add(count)
        };
        let start = if count == 0 { 0 } else { offset };
        let inner = self.inner.clone();
        self.run_on_runtime(async move {
            let size = current_size(&entry)?;
            ensure_range(&inner, &entry, start, end, size, None).await
        })
    }

    /// Offers bytes of a registered file that arrived by other means than its source (a
    /// prefetch streaming a whole layer, see [`crate::image::stream_fill_layer`]): every
    /// chunk lying wholly inside `[offset, offset + data.len())` (the last chunk may end at
    /// the file's end) that is neither filled nor being fetched is verified and written
    /// exactly as if it had been fetched, and readers waiting for such a chunk wait for this
    /// write instead of fetching it. The file completes (mark removed) with its last chunk.
    /// Chunks already filled or in flight, chunks the bytes do not wholly cover and chunks
    /// past a truncation are left alone. Returns the bytes written. Blocks until they are:
    /// call it from a plain thread, not from a runtime.
    pub fn supply(&self, id: FileId, offset: u64, data: &[u8]) -> Result<u64, FillError> {
        let Some(entry) = self.entry(id) else {
            return Ok(0);
        };
        let Some((runs, taken)) = supply_runs(&self.inner, &entry, offset, data)? else {
            return Ok(0);
        };
        let inner = self.inner.clone();
        self.run_on_runtime(async move { finish_supply(&inner, &entry, runs).await })?;
        Ok(taken)
    }

    /// [`Engine::supply`] as a function making futures, usable from any task (a coalesced
    /// read that fills several files from one fetch): same verification and bookkeeping,
    /// without blocking a thread.
    pub fn supplier(&self) -> Supplier {
        let inner = self.inner.clone();
        Arc::new(move |id: FileId, offset: u64, data: bytes::Bytes| {
            let inner = inner.clone();
            async move {
                let entry = inner.files.read().unwrap().get(&(id.dev, id.ino)).cloned();
                let Some(entry) = entry else {
                    return Ok(0);
                };
                let Some((runs, taken)) = supply_runs(&inner, &entry, offset, &data)? else {
                    return Ok(0);
                };
                finish_supply(&inner, &entry, runs)
                    .await
                    .map_err(unwrap_arc)?;
                Ok(taken)
            }
            .boxed()
        })
    }

    /// Event service times so far: count per log2 bucket of microseconds (bucket `i` holds
    /// times in `[2^i, 2^(i+1))` µs), for a metrics histogram.
    pub fn latency_histogram(&self) -> Vec<u64> {
        self.inner.counters.latency.buckets()
    }

    /// A snapshot of progress counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        // Each file's state is locked outside the table's lock: a registration waiting to
        // write the table holds up every event's lookup until the readers are done.
        let entries: Vec<Arc<FileEntry>> =
            self.inner.files.read().unwrap().values().cloned().collect();
        let files = entries.len();
        let (mut bytes_total, mut bytes_filled) = (0, 0);
        for e in &entries {
            bytes_total += e.size;
            bytes_filled += e.bytes_filled(&e.state.lock().unwrap());
        }
        let buckets = c.latency.buckets();
        Stats {
            files: files as u64,
            files_complete: c.completed.load(Ordering::Relaxed),
            bytes_total,
            bytes_filled,
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            self_events: c.self_events.load(Ordering::Relaxed),
            quiet_writes: c.quiet_writes.load(Ordering::Relaxed),
            fills: c.fills.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            latency_p50_us: percentile(&buckets, 0.50),
            latency_p99_us: percentile(&buckets, 0.99),
        }
    }

    /// Stops serving: waits (bounded) for events being handled to be answered, then closes
    /// the group. Readers that block after this point are let through by the kernel (it
    /// fails open): hand the group to a holder first if placeholders stay exposed.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.inner.stopping.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            // It looks at `stopping` at least every EVENT_WAIT_MS.
            let _ = reader.join();
        }
        let deadline = Instant::now() + self.inner.config.fetch_timeout + Duration::from_secs(1);
        while self.inner.inflight_events.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
        info!("fill engine stopped");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The error of a shared fill, for one of its waiters: the kind that decides the reader's
/// errno (write errors keep their OS error, a moved file stays [`FillError::Gone`]).
fn unwrap_arc(e: Arc<FillError>) -> FillError {
    Arc::try_unwrap(e).unwrap_or_else(|e| match &*e {
        FillError::Gone { path } => FillError::Gone { path: path.clone() },
        FillError::Write {
            path,
            offset,
            len,
            source,
        } => FillError::Write {
            path: path.clone(),
            offset: *offset,
            len: *len,
            source: match source.raw_os_error() {
                Some(n) => std::io::Error::from_raw_os_error(n),
                None => std::io::Error::other(source.to_string()),
            },
        },
        e => FillError::Register {
            path: PathBuf::new(),
            source: std::io::Error::other(error_chain(e)),
        },
    })
}

fn percentile(buckets: &[u64], q: f64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = ((total as f64) * q).ceil() as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= want {
            return 1u64 << i;
        }
    }
    1u64 << (buckets.len() - 1)
}

/// How long the event thread waits for events before it looks at `stopping` again.
const EVENT_WAIT_MS: u16 = 50;

/// Reads the group's events on a thread of its own, not a runtime task: the engine's own
/// writes block until their event is answered, and this thread answers those at once
/// whatever the runtime's workers are doing (a worker blocked in such a write can never
/// hold up the reader). Readers' events are served here when their bytes are at hand and
/// go to the runtime otherwise ([`serve_here_or_spawn`]).
fn event_thread(inner: Arc<Inner>) {
    become_event_thread();
    // Handlers polled here (see `dispatch_now`) may start timers and blocking tasks.
    let _runtime = inner
        .runtime
        .get()
        .expect("set before the event thread starts")
        .enter();
    let mut reader = EventReader::new(inner.config.event_spin);
    let mut events = Vec::new();
    while !inner.stopping.load(Ordering::SeqCst) {
        if let Err(e) = reader.next(&inner.group, &mut events, EVENT_WAIT_MS) {
            warn!(error = %e, "reading fanotify events");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut at_once = false;
        for event in events.drain(..) {
            at_once |= dispatch(&inner, event);
        }
        reader.answered_at_once(at_once);
    }
}

/// Serves one event; returns whether it was answered here and now (not handed to the
/// runtime or held at the gate).
fn dispatch(inner: &Arc<Inner>, event: Event) -> bool {
    if event.is_overflow() {
        // Cannot happen with FAN_UNLIMITED_QUEUE; if it does, readers were let through.
        warn!("fanotify queue overflow: some reads were not intercepted");
        return false;
    }
    if !event.needs_response() {
        return false;
    }
    if let Some(j) = &inner.journal {
        j.seen(event.id());
    }
    if inner.own_tids.read().unwrap().contains(&event.pid()) {
        // The engine's own write (prefetch through a regular fd): the data is being put
        // there by us, so there is nothing to wait for.
        inner.counters.self_events.fetch_add(1, Ordering::Relaxed);
        let id = event.id();
        if let Err(e) = inner.group.respond(event, Response::Allow) {
            warn!(event = %id, error = %e, "answering fanotify event");
        }
        return true;
    }
    if let Some(j) = &inner.journal
        && let Some(fd) = event.file()
    {
        j.begin(event.id(), fd, event.range());
    }
    {
        let mut gate = inner.gate.lock().unwrap();
        if let Some(held) = gate.as_mut() {
            held.push(event);
            return false;
        }
    }
    dispatch_now(inner, event)
}

thread_local! {
    /// Set on an event thread (the engine's, the overlay watcher's), which polls handlers
    /// once before handing them to the runtime ([`serve_here_or_spawn`]).
    static ON_EVENT_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn on_event_thread() -> bool {
    ON_EVENT_THREAD.with(|c| c.get())
}

/// Makes the calling thread an event thread: [`serve_here_or_spawn`] polls handlers here
/// once, and work that must not hold up an event thread leaves it ([`LeaveEventThread`]).
/// The thread must have entered the engine's runtime.
pub(crate) fn become_event_thread() {
    ON_EVENT_THREAD.with(|c| c.set(true));
}

/// On an event thread ([`become_event_thread`]), polls `task` once right here: a handler
/// whose answer needs nothing it has to wait for (bytes at hand, a file already complete)
/// is done without a hop to the runtime, which on a VM costs tens of microseconds (waking a
/// worker on a halted CPU). A task that has to wait, or reaches work that must not run on
/// an event thread, goes to `runtime` as it stands, where it is polled again at once (the
/// first poll had no waker to call). Returns whether the task finished here.
pub(crate) fn serve_here_or_spawn(
    runtime: &tokio::runtime::Handle,
    mut task: BoxFuture<'static, ()>,
) -> bool {
    if on_event_thread() {
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        if task.as_mut().poll(&mut cx).is_ready() {
            return true;
        }
    }
    runtime.spawn(task);
    false
}

/// A future that, polled on an event thread, is pending once (and wakes itself), and is
/// ready anywhere else: a handler awaits it before work that must not run on an event
/// thread (a write through an fd that raises events, which only the engine's event thread
/// answers; hashing or writing a large run; a whole-file fill's source reads), so the
/// event thread's single poll stops there and the rest runs on the runtime.
struct LeaveEventThread(bool);

impl std::future::Future for LeaveEventThread {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if !self.0 && on_event_thread() {
            self.0 = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(())
    }
}

/// See [`LeaveEventThread`].
fn off_event_thread() -> LeaveEventThread {
    LeaveEventThread(false)
}

/// Serves one reader's event (journal already written): on the event thread, a miss whose
/// bytes are at hand (a source that answers at once) is filled and answered without a hop
/// to the runtime ([`serve_here_or_spawn`]). Returns whether it was answered here.
fn dispatch_now(inner: &Arc<Inner>, event: Event) -> bool {
    inner.counters.events.fetch_add(1, Ordering::Relaxed);
    inner.inflight_events.fetch_add(1, Ordering::SeqCst);
    let started = Instant::now();
    let task_inner = inner.clone();
    let task = async move {
        let result = serve_event(&task_inner, &event).await;
        answer(&task_inner, event, result, started);
    }
    .boxed();
    serve_here_or_spawn(
        inner.runtime.get().expect("set before events are read"),
        task,
    )
}

/// Answers a reader's event with the result of its fill and accounts for it.
fn answer(inner: &Inner, event: Event, result: FillResult, started: Instant) {
    let response = match result {
        Ok(()) => Response::Allow,
        Err(e) => {
            inner.counters.errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %error_chain(&*e), pid = event.pid(), "fill failed; denying access");
            Response::Deny(e.errno())
        }
    };
    respond(inner, event, response);
    inner.counters.latency.record(started.elapsed());
    inner.inflight_events.fetch_sub(1, Ordering::SeqCst);
}

fn respond(inner: &Inner, event: Event, response: Response) {
    let id = event.id();
    let journaled = event.needs_response();
    if let Err(e) = inner.group.respond(event, response) {
        warn!(event = %id, error = %e, "answering fanotify event");
    }
    if journaled && let Some(j) = &inner.journal {
        j.end(id);
    }
}

/// Formats an error with its whole source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Fills what `event` asks for.
async fn serve_event(inner: &Arc<Inner>, event: &Event) -> FillResult {
    let Some(fd) = event.file() else {
        return Ok(());
    };
    let st = match nix::sys::stat::fstat(fd) {
        Ok(st) => st,
        Err(e) => {
            return Err(Arc::new(FillError::Register {
                path: PathBuf::from("<event fd>"),
                source: e.into(),
            }));
        }
    };
    let entry = inner.files.read().unwrap().get(&stat_key(&st)).cloned();
    let Some(entry) = entry else {
        if inner.deny_unknown.load(Ordering::SeqCst) {
            return Err(Arc::new(FillError::Register {
                path: PathBuf::from("<event fd>"),
                source: std::io::Error::other("marked file unknown to this engine"),
            }));
        }
        // Not ours (or no longer: completed and forgotten). Nothing to fill.
        return Ok(());
    };
    entry.touched(inner);
    let (start, end) = match event.range() {
        Some(r) if r.count > 0 => (r.offset, r.offset.saturating_add(r.count)),
        // No range record, or count 0 (FICLONE, growing truncate): the whole file.
        _ => (0, u64::MAX),
    };
    // The event's fd (read-only), to open the file for writing from: reaches the file even
    // where its path no longer does (a tree renamed under the daemon).
    let via = event.share_file();
    ensure_range(inner, &entry, start, end, st.st_size as u64, via).await
}

/// Makes `[start, end)` (clipped to the file) present, fetching missing chunks once. A
/// range with chunks nobody is fetching, in a file a near [`Delivery`] brings, first waits
/// for the delivery (once: a late delivery is given up for this file).
async fn ensure_range(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    start: u64,
    end: u64,
    current_size: u64,
    via: Option<Arc<OwnedFd>>,
) -> FillResult {
    if let Some((delivery, by)) = near_delivery(inner, entry, start, end) {
        let limit = inner.config.delivery_wait * 2;
        inner.waiting_delivery.fetch_add(1, Ordering::SeqCst);
        let arrived = await_delivery(&delivery, by, limit).await;
        inner.waiting_delivery.fetch_sub(1, Ordering::SeqCst);
        if arrived {
            inner.counters.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            // Late or ended: this file is fetched from now on.
            let mut st = entry.state.lock().unwrap();
            if st
                .busy
                .expected()
                .is_some_and(|(d, _)| Arc::ptr_eq(d, &delivery))
            {
                st.busy.set_expected(None);
            }
            debug!(path = %entry.path.display(), "delivery did not arrive in time; fetching");
        }
    }
    plan_and_fill(inner, entry, start, end, current_size, via).await
}

/// The delivery to wait for before filling `[start, end)` of `entry`, and the position to
/// wait for: only when some chunk of the range is neither filled nor being filled and the
/// delivery is expected there within four fetch times (at most
/// [`EngineConfig::delivery_wait`]).
fn near_delivery(
    inner: &Inner,
    entry: &FileEntry,
    start: u64,
    end: u64,
) -> Option<(Arc<Delivery>, u64)> {
    if inner.config.delivery_wait.is_zero() {
        return None;
    }
    // Worth waiting only for what arrives sooner than a few fetches of its own would take
    // (a walk just behind or at the stream); a sparse reader ahead of it fetches.
    let fetch = match inner.fetch_us.load(Ordering::Relaxed) {
        0 => DELIVERY_FETCH_GUESS,
        us => Duration::from_micros(us),
    };
    let wait = inner
        .config
        .delivery_wait
        .min(fetch * DELIVERY_FETCHES_WORTH);
    let (delivery, by) = entry.state.lock().unwrap().busy.expected().cloned()?;
    let eta = delivery.eta(by);
    if eta.is_none_or(|eta| eta > wait) {
        debug!(path = %entry.path.display(), ?eta, "delivery not near; fetching");
        return None;
    }
    let st = entry.state.lock().unwrap();
    let end = end.min(st.limit).min(entry.size);
    if st.complete || start >= end {
        return None;
    }
    let (first, last) = (start / entry.chunk(), (end - 1) / entry.chunk());
    let open = (first..=last).any(|i| !st.filled.get(i as usize) && !st.busy.filling(i));
    if open {
        debug!(path = %entry.path.display(), ?eta, "waiting for the delivery");
    }
    open.then_some((delivery, by))
}

/// [`ensure_range`] without the delivery wait.
async fn plan_and_fill(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    start: u64,
    end: u64,
    current_size: u64,
    via: Option<Arc<OwnedFd>>,
) -> FillResult {
    let waits: Vec<SharedFill> = {
        let mut st = entry.state.lock().unwrap();
        if current_size < st.limit {
            // Truncated (perhaps by open(O_TRUNC), which raises no event): never fill past
            // this point again, whatever the file grows back to.
            debug!(path = %entry.path.display(), size = current_size, "placeholder truncated by user");
            st.limit = current_size;
        }
        let end = end.min(st.limit).min(entry.size);
        if st.complete {
            return Ok(());
        }
        if start >= end {
            drop(st);
            // Nothing to fetch, but a lowered limit may have made the file complete.
            maybe_complete(inner, entry);
            return Ok(());
        }
        let (first, last) = (start / entry.chunk(), (end - 1) / entry.chunk());
        let max_run = (MAX_RUN_BYTES / entry.chunk()).max(1);
        let mut waits = Vec::new();
        let mut idx = first;
        while idx <= last {
            if st.filled.get(idx as usize) {
                idx += 1;
                continue;
            }
            if let Some(f) = st.busy.fill(idx) {
                waits.push(f.clone());
                idx += 1;
                continue;
            }
            // A run of consecutive missing chunks is fetched with one source read (one
            // range request, one inflate from one checkpoint) and verified chunk by chunk.
            let mut count = 1;
            while count < max_run
                && idx + count <= last
                && !st.filled.get((idx + count) as usize)
                && !st.busy.filling(idx + count)
            {
                count += 1;
            }
            let fut = fill_run(inner.clone(), entry.clone(), idx, count, via.clone(), None)
                .boxed()
                .shared();
            for i in idx..idx + count {
                st.busy.start_fill(i, fut.clone());
            }
            waits.push(fut);
            idx += count;
        }
        waits
    };
    let mut result = Ok(());
    for r in futures::future::join_all(waits).await {
        if r.is_err() && result.is_ok() {
            result = r;
        }
    }
    result?;
    maybe_complete(inner, entry);
    Ok(())
}

/// Fetches, verifies and writes `count` consecutive chunks from `first`; records them. Each
/// chunk is in at most one run at a time.
async fn fill_run(
    inner: Arc<Inner>,
    entry: Arc<FileEntry>,
    first: u64,
    count: u64,
    via: Option<Arc<OwnedFd>>,
    supplied: Option<Vec<u8>>,
) -> FillResult {
    let res = match supplied {
        Some(data) => store_run(&inner, &entry, first, count, data, via).await,
        None => fill_run_inner(&inner, &entry, first, count, via).await,
    };
    let mut st = entry.state.lock().unwrap();
    for idx in first..first + count {
        st.busy.end_fill(idx);
        if res.is_ok() && !st.filled.get(idx as usize) {
            st.filled.set(idx as usize);
            st.missing -= 1;
        }
    }
    res.map_err(Arc::new)
}

async fn fill_run_inner(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    first: u64,
    count: u64,
    via: Option<Arc<OwnedFd>>,
) -> Result<(), FillError> {
    let offset = entry.chunk_range(first).0;
    let len = entry.chunk_range(first + count - 1).1 - offset;
    let data = fetch_run(inner, entry, offset, len).await?;
    store_run(inner, entry, first, count, data, via).await
}

/// Reads `[offset, offset + len)` of the file from its source, within the fetch timeout.
async fn fetch_run(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, FillError> {
    let timeout = inner.config.fetch_timeout;
    let started = Instant::now();
    let read = entry.source.read_at(entry.file, offset, len);
    let data = match tokio::time::timeout(timeout, read).await {
        Err(_) => {
            return Err(FillError::Timeout {
                path: entry.path.to_path_buf(),
                offset,
                len,
                secs: timeout.as_secs(),
            });
        }
        Ok(Err(source)) => {
            return Err(FillError::Source {
                path: entry.path.to_path_buf(),
                offset,
                len,
                source,
            });
        }
        Ok(Ok(d)) => d,
    };
    let us = started.elapsed().as_micros().max(1) as u64;
    let _ = inner
        .fetch_us
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
            Some(if avg == 0 { us } else { (avg * 7 + us) / 8 })
        });
    inner.counters.fills.fetch_add(1, Ordering::Relaxed);
    inner
        .counters
        .bytes_fetched
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    // Its length is checked with the digests, in `store_run`.
    Ok(data)
}

/// Checks that `data` is exactly the bytes of chunks `first..first + count`, verifies it
/// chunk by chunk and writes what lies below the file's limit.
async fn store_run(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    first: u64,
    count: u64,
    data: Vec<u8>,
    via: Option<Arc<OwnedFd>>,
) -> Result<(), FillError> {
    let offset = entry.chunk_range(first).0;
    let len = entry.chunk_range(first + count - 1).1 - offset;
    if data.len() as u64 != len {
        return Err(FillError::ShortRead {
            path: entry.path.to_path_buf(),
            offset,
            len,
            got: data.len() as u64,
        });
    }
    if len > INLINE_WRITE_MAX {
        // Hashing and writing this much would hold up the event thread's other events.
        off_event_thread().await;
    }
    for idx in first..first + count {
        let (a, b) = entry.chunk_range(idx);
        verify(
            entry,
            idx,
            a,
            &data[(a - offset) as usize..(b - offset) as usize],
        )?;
    }
    // Never write past the limit: those bytes belong to the user now.
    let limit = entry.state.lock().unwrap().limit;
    let keep = limit.saturating_sub(offset).min(len) as usize;
    if keep == 0 {
        return Ok(());
    }
    let write_off = offset;
    let writer = open_writer(inner, entry, via.as_deref(), offset, keep as u64)?;
    if !writer.quiet {
        // Its write raises an event, which only the event thread answers.
        off_event_thread().await;
    }
    let written = if keep as u64 <= INLINE_WRITE_MAX {
        // A page-cache write this small costs less than a hop to the blocking pool.
        write_chunk(inner, entry, writer, &data[..keep], write_off)?
    } else {
        let (i2, e2) = (inner.clone(), entry.clone());
        tokio::task::spawn_blocking(move || write_chunk(&i2, &e2, writer, &data[..keep], write_off))
            .await
            .map_err(|e| FillError::Write {
                path: entry.path.to_path_buf(),
                offset,
                len: keep as u64,
                source: std::io::Error::other(e),
            })??
    };
    debug!(path = %entry.path.display(), offset, len = written, "chunk filled");
    Ok(())
}

fn verify(entry: &FileEntry, idx: u64, offset: u64, data: &[u8]) -> Result<(), FillError> {
    let fail = |expected: String, actual: Sha256| FillError::Verify {
        path: entry.path.to_path_buf(),
        offset,
        expected,
        actual: actual.to_hex(),
    };
    let missing = || fail("<missing chunk digest>".into(), Sha256::of(data));
    let from_source;
    let expected = match entry.given.as_deref() {
        _ if entry.source_digests => {
            from_source = entry.source.digest(entry.file, idx).ok_or_else(missing)?;
            &from_source
        }
        None | Some(Verify::None | Verify::Source { .. }) => return Ok(()),
        Some(Verify::Whole(d)) => d,
        Some(Verify::Chunks { sha256, .. }) => sha256.get(idx as usize).ok_or_else(missing)?,
    };
    let actual = Sha256::of(data);
    if actual != *expected {
        return Err(fail(expected.to_hex(), actual));
    }
    Ok(())
}

/// A writable open of a registered file by the engine, counted as a writer until it is
/// closed ([`WriterHold`]).
struct Writer {
    /// Declared before the hold: closed first (unless the file's cache shares it, which
    /// counts itself), so the count outlives the open file.
    file: Arc<File>,
    /// Writes through it raise no events ([`WriteOpener`]).
    quiet: bool,
    _hold: WriterHold,
}

/// Opens the file for writing: its cached writable fd ([`Busy::writer`]), or a new
/// open from the reader's event fd (`via`; event fds are read-only, see
/// [`FileState::writers`]), or else from the registered path, only if it still leads to
/// the registered file. Preferably a notification-free fd from the [`WriteOpener`]: its
/// writes raise no events; one made for a marked file is kept for the next fills. Failing
/// that, a plain writable open (a reopen of `via`, or the path), whose writes raise events
/// from an engine thread that the event thread allows at once.
fn open_writer(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    via: Option<&OwnedFd>,
    offset: u64,
    len: u64,
) -> Result<Writer, FillError> {
    let werr = |source: std::io::Error| FillError::Write {
        path: entry.path.to_path_buf(),
        offset,
        len,
        source,
    };
    let hold = WriterHold::new(inner, entry);
    let cached = entry.state.lock().unwrap().busy.writer().cloned();
    if let Some(file) = cached {
        return Ok(Writer {
            file,
            quiet: true,
            _hold: hold,
        });
    }
    if let Some(opener) = &inner.writer {
        let checked;
        let base = match via {
            Some(fd) => fd.as_fd(),
            None => {
                checked = open_checked(entry, false)?;
                checked.as_fd()
            }
        };
        match opener.open(base) {
            Ok(file) => {
                let file = Arc::new(file);
                cache_writer(inner, entry, &file);
                return Ok(Writer {
                    file,
                    quiet: true,
                    _hold: hold,
                });
            }
            Err(e) => {
                debug!(path = %entry.path.display(), error = %e, "no notification-free writer; writing through a plain open")
            }
        }
    }
    let file = match via {
        Some(fd) => crate::sys::reopen_for_write(fd.as_fd()).map_err(werr)?,
        None => open_checked(entry, true)?,
    };
    Ok(Writer {
        file: Arc::new(file),
        quiet: false,
        _hold: hold,
    })
}

/// Keeps `file` as the file's writable fd between fills, if the file is marked and has
/// none; closes the oldest other file's beyond [`WRITER_CACHE_MAX`].
fn cache_writer(inner: &Inner, entry: &Arc<FileEntry>, file: &Arc<File>) {
    {
        let mut st = entry.state.lock().unwrap();
        if !st.marked || st.complete || st.busy.writer().is_some() {
            return;
        }
        st.busy.set_writer(file.clone());
        st.writers += 1;
    }
    let evict = {
        let mut lru = inner.cached_writers.lock().unwrap();
        lru.push_back(Arc::downgrade(entry));
        if lru.len() > WRITER_CACHE_MAX {
            lru.pop_front()
        } else {
            None
        }
    };
    if let Some(old) = evict.and_then(|w| w.upgrade()) {
        drop_cached_writer(inner, &old, true);
    }
}

/// Writes `data` at `offset` through `writer` (closed on return) and puts the mtime back (a
/// write bumps it; the image's metadata must stay true); returns the bytes written. The
/// file's size is checked just before writing: a file cut short since the fill started
/// (`open(O_TRUNC)` raises no event) lowers the limit, and nothing at or past it is written.
fn write_chunk(
    inner: &Inner,
    entry: &FileEntry,
    writer: Writer,
    data: &[u8],
    offset: u64,
) -> Result<u64, FillError> {
    let werr = |source: std::io::Error| FillError::Write {
        path: entry.path.to_path_buf(),
        offset,
        len: data.len() as u64,
        source,
    };
    let file = &writer.file;
    let before = nix::sys::stat::fstat(file.as_fd()).map_err(|e| werr(e.into()))?;
    let keep = {
        let mut st = entry.state.lock().unwrap();
        let size = before.st_size as u64;
        if size < st.limit {
            debug!(path = %entry.path.display(), size, "placeholder cut short by the user during a fill");
            st.limit = size;
        }
        st.limit.saturating_sub(offset).min(data.len() as u64) as usize
    };
    if keep == 0 {
        return Ok(0);
    }
    file.write_all_at(&data[..keep], offset).map_err(werr)?;
    if let Some(cap) = &entry.capability {
        use xattr::FileExt as _;
        file.set_xattr(CAPABILITY_XATTR, &cap.0).map_err(werr)?;
    }
    restore_mtime(file.as_fd(), &before).map_err(|e| werr(e.into()))?;
    if writer.quiet {
        inner.counters.quiet_writes.fetch_add(1, Ordering::Relaxed);
    }
    Ok(keep as u64)
}

/// Opens the placeholder at its registered path, if that path still leads to the registered
/// file (same device, inode and birth time; no symlink at the last component): otherwise
/// [`FillError::Gone`]. Read-only opens are non-blocking (a FIFO put there never hangs us).
fn open_checked(entry: &FileEntry, write: bool) -> Result<File, FillError> {
    let gone = || FillError::Gone {
        path: entry.path.to_path_buf(),
    };
    let file = File::options()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&entry.path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENXIO) => gone(),
            _ => FillError::Register {
                path: entry.path.to_path_buf(),
                source: e,
            },
        })?;
    let m = file.metadata().map_err(|source| FillError::Register {
        path: entry.path.to_path_buf(),
        source,
    })?;
    if (m.dev(), m.ino()) != entry.key || birth_stamp(m.created()) != entry.born {
        return Err(gone());
    }
    Ok(file)
}

/// The placeholder's size now (through its registered path, checked).
fn current_size(entry: &FileEntry) -> Result<u64, Arc<FillError>> {
    let f = open_checked(entry, false).map_err(Arc::new)?;
    f.metadata().map(|m| m.len()).map_err(|source| {
        Arc::new(FillError::Register {
            path: entry.path.to_path_buf(),
            source,
        })
    })
}

fn restore_mtime(fd: std::os::fd::BorrowedFd<'_>, st: &FileStat) -> Result<(), Errno> {
    let omit = TimeSpec::UTIME_OMIT;
    let mtime = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    nix::sys::stat::futimens(fd, &omit, &mtime)
}

/// If every chunk below the limit is in, removes the file's mark: from now on reads never
/// reach the daemon. While one of the engine's own writable opens of the file is still
/// open, the last one to close removes it instead ([`FileState::writers`]).
fn maybe_complete(inner: &Inner, entry: &FileEntry) {
    let cached = {
        let mut st = entry.state.lock().unwrap();
        if st.complete {
            return;
        }
        let needed = st.limit.min(entry.size).div_ceil(entry.chunk()) as usize;
        let done = if needed == st.filled.len() {
            st.missing == 0
        } else {
            st.filled.all_below(needed)
        };
        if !done {
            return;
        }
        st.complete = true;
        st.marked = false;
        inner.counters.completed.fetch_add(1, Ordering::Relaxed);
        // The mark goes with the last writer (at once when there is none).
        st.unmark_pending = true;
        // Nothing is waited for any more: the delivery's hold on the file goes too.
        st.busy.set_expected(None);
        let cached = st.busy.take_writer();
        if st.writers > u32::from(cached.is_some()) {
            debug!(path = %entry.path.display(), writers = st.writers, "complete; mark goes when the engine's writable fds close");
        }
        cached
    };
    let counted = cached.is_some();
    // Closed before the count drops.
    drop(cached);
    release_writer(inner, entry, counted);
}

/// Removes the mark of a complete file, through a read-only open of its registered path
/// (not a writer: see [`FileState::writers`]).
fn remove_mark(inner: &Inner, entry: &FileEntry) {
    let file = match open_checked(entry, false) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %entry.path.display(), error = %e, "cannot open completed file to remove its mark");
            return;
        }
    };
    match inner.group.unmark_inode(file.as_fd(), FAN_PRE_ACCESS) {
        Ok(()) => debug!(path = %entry.path.display(), "complete; mark removed"),
        // ENOENT: no mark (for instance a hardlink of an inode already done).
        Err(FanotifyError::Mark {
            errno: Errno::ENOENT,
            ..
        }) => {}
        Err(e) => warn!(error = %e, "removing mark of completed file"),
    }
}

async fn prefetch_entry(inner: &Arc<Inner>, entry: &Arc<FileEntry>) -> FillResult {
    if entry.state.lock().unwrap().complete {
        return Ok(());
    }
    // A whole-file fill starts its source reads (a blob cache's reads, copies, window
    // decodes) before its first wait: not on an event thread, whose other events would
    // wait behind it. A complete file is answered there at once (above).
    off_event_thread().await;
    // Its writes raise no event (a notification-free fd), or one the event thread allows at once.
    let size = current_size(entry)?;
    ensure_range(inner, entry, 0, u64::MAX, size, None).await
}

/// Whole-file fills on demand, for callers that learn of an access some other way than a
/// pre-content event (the overlay open watch: lower files read through overlayfs must not
/// carry a pre-content mark, see `docs/kernel.md`).
impl Engine {
    /// Registers a placeholder that carries no pre-content mark: nothing intercepts its
    /// reads, so the caller must fill it (for example [`Engine::filler`] on open)
    /// before anyone reads it.
    pub fn register_unmarked(&self, p: Placeholder) -> Result<FileId, FillError> {
        self.register_as(p, false)
    }

    /// Removes the pre-content mark of a registered file but keeps it registered (overlay
    /// lowers, see [`Engine::register_unmarked`]).
    pub fn unmark(&self, id: FileId) -> Result<(), FillError> {
        match self.entry(id) {
            Some(entry) if !entry.state.lock().unwrap().complete => {
                // Unmarked, the file no longer has the pre-content exemption from exec's
                // denial of writers: no writable fd of ours may stay open.
                drop_cached_writer(&self.inner, &entry, false);
                unmark_entry(&self.inner, &entry)
            }
            _ => Ok(()),
        }
    }

    /// Removes whatever pre-content mark the file now at `path` carries, without it being
    /// registered: a placeholder the user replaced or cut short while no engine served it
    /// (`open(O_TRUNC)` raises no event) is the user's file now, and must read and write
    /// natively rather than be refused as unknown. A path that is gone or not a regular
    /// file: nothing to do.
    pub fn release_path(&self, path: &Path) -> Result<(), FillError> {
        let file = match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => {
                return Ok(());
            }
            Err(source) => {
                return Err(FillError::Register {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Ok(());
        }
        match self.inner.group.unmark_inode(file.as_fd(), FAN_PRE_ACCESS) {
            Ok(())
            | Err(FanotifyError::Mark {
                errno: Errno::ENOENT,
                ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A function that makes, for a file id, a future filling the whole file (if it is
    /// registered and not complete), usable from any runtime and after `self` is borrowed
    /// elsewhere. Concurrent calls and pre-content events share fetches.
    pub fn filler(&self) -> Filler {
        self.make_filler(true)
    }

    /// [`Engine::filler`] for filling ahead of readers (prefetch): the files it fills do not
    /// count as accessed ([`Engine::accessed`]).
    pub fn prefetcher(&self) -> Filler {
        self.make_filler(false)
    }

    fn make_filler(&self, touch: bool) -> Filler {
        let inner = self.inner.clone();
        Arc::new(move |id: FileId| {
            let inner = inner.clone();
            async move {
                let entry = inner.files.read().unwrap().get(&(id.dev, id.ino)).cloned();
                match entry {
                    Some(entry) => {
                        if touch {
                            entry.touched(&inner);
                        }
                        prefetch_entry(&inner, &entry).await
                    }
                    None => Ok(()),
                }
            }
            .boxed()
        })
    }
}

/// Removes the pre-content mark of a registered file (no mark: fine; a path that leads
/// elsewhere now: [`FillError::Gone`], nothing unmarked).
fn unmark_entry(inner: &Inner, entry: &FileEntry) -> Result<(), FillError> {
    let file = open_checked(entry, false)?;
    match inner.group.unmark_inode(file.as_fd(), FAN_PRE_ACCESS) {
        Ok(())
        | Err(FanotifyError::Mark {
            errno: Errno::ENOENT,
            ..
        }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The runs of [`Engine::supply`]: claims every usable chunk of `data` (wholly covered,
/// below the limit, neither filled nor in flight) as in flight and returns the runs writing
/// them with the bytes they take, or `None` when there is nothing to take.
fn supply_runs(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    offset: u64,
    data: &[u8],
) -> Result<Option<(Vec<SharedFill>, u64)>, FillError> {
    let current = current_size(entry).map_err(unwrap_arc)?;
    let data_end = offset.saturating_add(data.len() as u64).min(entry.size);
    let mut st = entry.state.lock().unwrap();
    if current < st.limit {
        st.limit = current;
    }
    if st.complete {
        return Ok(None);
    }
    let limit = st.limit;
    let usable = |st: &FileState, i: u64| {
        let (a, b) = entry.chunk_range(i);
        b <= data_end && a < limit && !st.filled.get(i as usize) && !st.busy.filling(i)
    };
    let nchunks = entry.size.div_ceil(entry.chunk());
    let (mut runs, mut taken) = (Vec::new(), 0);
    let mut idx = offset.div_ceil(entry.chunk());
    while idx < nchunks && entry.chunk_range(idx).1 <= data_end {
        if !usable(&st, idx) {
            idx += 1;
            continue;
        }
        let mut count = 1;
        while idx + count < nchunks && usable(&st, idx + count) {
            count += 1;
        }
        let (a, b) = (
            entry.chunk_range(idx).0,
            entry.chunk_range(idx + count - 1).1,
        );
        let bytes = data[(a - offset) as usize..(b - offset) as usize].to_vec();
        let fut = fill_run(inner.clone(), entry.clone(), idx, count, None, Some(bytes))
            .boxed()
            .shared();
        for i in idx..idx + count {
            st.busy.start_fill(i, fut.clone());
        }
        runs.push(fut);
        taken += b.min(limit) - a;
        idx += count;
    }
    Ok((!runs.is_empty()).then_some((runs, taken)))
}

/// Waits for the runs [`supply_runs`] started; completes the file if they were its last.
async fn finish_supply(
    inner: &Arc<Inner>,
    entry: &Arc<FileEntry>,
    runs: Vec<SharedFill>,
) -> FillResult {
    let mut result = Ok(());
    for r in futures::future::join_all(runs).await {
        if r.is_err() && result.is_ok() {
            result = r;
        }
    }
    maybe_complete(inner, entry);
    result
}

/// Bytes per second a [`Delivery`] is assumed to move before it has run long enough to be
/// measured.
const DELIVERY_ASSUMED_RATE: f64 = (32 << 20) as f64;

/// A reader waits for a [`Delivery`] expected within this many fetch times (the moving
/// average of its source reads), at most [`EngineConfig::delivery_wait`].
const DELIVERY_FETCHES_WORTH: u32 = 4;

/// The fetch time assumed before any fetch was timed.
const DELIVERY_FETCH_GUESS: Duration = Duration::from_millis(10);

/// How long a [`Delivery`] runs before its own rate replaces the assumed one.
const DELIVERY_RATE_AFTER: Duration = Duration::from_millis(200);

/// A sequential source of whole files that is running now (a layer streamed into its
/// placeholders): a position that only grows, in the delivery's own units (uncompressed
/// layer bytes), and the rate it grows at. Files are tied to it with [`Engine::expect`];
/// readers missing one of them wait for it when it is near ([`EngineConfig::delivery_wait`]).
/// Whoever drives it must call [`Delivery::end`] however it stops (`image.rs` ends it from a
/// drop guard): that releases every waiter to fetch what did not come. A delivery never
/// ended only delays its waiters, by twice the wait at most.
pub struct Delivery {
    started: Instant,
    position: tokio::sync::watch::Sender<u64>,
    ended: AtomicBool,
}

impl Delivery {
    /// A delivery starting now at position 0.
    pub fn start() -> Arc<Delivery> {
        Arc::new(Delivery {
            started: Instant::now(),
            position: tokio::sync::watch::Sender::new(0),
            ended: AtomicBool::new(false),
        })
    }

    /// Everything before `position` has been offered ([`Engine::supply`]): wakes the readers
    /// waiting for it.
    pub fn advance(&self, position: u64) {
        self.position.send_if_modified(|p| {
            let moved = position > *p;
            *p = (*p).max(position);
            moved
        });
    }

    /// Nothing more comes: every waiter fetches what it still misses.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.position.send_replace(u64::MAX);
    }

    /// Whether it has ended.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// The expected time until `position` is reached, or `None` once the delivery ended.
    fn eta(&self, position: u64) -> Option<Duration> {
        if self.is_ended() {
            return None;
        }
        let now = *self.position.borrow();
        if now >= position {
            return Some(Duration::ZERO);
        }
        let elapsed = self.started.elapsed();
        let rate = if elapsed < DELIVERY_RATE_AFTER {
            DELIVERY_ASSUMED_RATE
        } else {
            now as f64 / elapsed.as_secs_f64()
        };
        if rate <= 0.0 {
            return Some(Duration::MAX);
        }
        Some(Duration::from_secs_f64(
            ((position - now) as f64 / rate).min(1e6),
        ))
    }
}

/// Waits (at most `limit`) until `delivery` has passed `position`; whether it did.
async fn await_delivery(delivery: &Delivery, position: u64, limit: Duration) -> bool {
    let mut rx = delivery.position.subscribe();
    let reached = tokio::time::timeout(limit, rx.wait_for(|p| *p >= position)).await;
    matches!(reached, Ok(Ok(_))) && !delivery.is_ended()
}

/// See [`Engine::supplier`]: `(file, offset, bytes)` to a future giving the bytes written.
pub type Supplier = Arc<
    dyn Fn(FileId, u64, bytes::Bytes) -> BoxFuture<'static, Result<u64, FillError>> + Send + Sync,
>;

/// See [`Engine::filler`].
pub type Filler =
    Arc<dyn Fn(FileId) -> BoxFuture<'static, Result<(), Arc<FillError>>> + Send + Sync>;

/// Opens a complete registered file for reading ([`Engine::complete_opener`]).
pub type CompleteOpener = Arc<dyn Fn(FileId) -> Option<File> + Send + Sync>;

impl FileId {
    /// The id of the registered file with this device and inode number.
    pub fn new(dev: u64, ino: u64) -> FileId {
        FileId { dev, ino }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_flags_hold_bits_inline_up_to_64_and_on_the_heap_past_it() {
        for len in [0usize, 1, 63, 64, 65, 200] {
            let mut f = ChunkFlags::new(len);
            assert_eq!(f.len(), len);
            assert_eq!(matches!(f, ChunkFlags::Inline { .. }), len <= 64, "{len}");
            assert!(f.to_vec().iter().all(|b| !b));
            let picks: Vec<usize> = (0..len).filter(|i| i % 3 == 0 || i + 1 == len).collect();
            for &i in &picks {
                f.set(i);
            }
            for i in 0..len {
                assert_eq!(f.get(i), picks.contains(&i), "{len}: flag {i}");
            }
            assert!(f.all_below(0));
            if len > 2 {
                // Flag 0 is set, flag 1 is not.
                assert!(f.all_below(1));
                assert!(!f.all_below(2), "{len}");
            }
            for i in 0..len {
                f.set(i);
            }
            assert!(f.all_below(len));
            assert_eq!(f.to_vec(), vec![true; len]);
        }
    }

    #[test]
    fn birth_stamps_tell_times_apart_and_none_from_any() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |ns: u64| birth_stamp(Ok(UNIX_EPOCH + Duration::from_nanos(ns)));
        assert_eq!(birth_stamp(Err(std::io::ErrorKind::Unsupported.into())), 0);
        assert_eq!(at(0), 1);
        assert_ne!(at(1_700_000_000_000_000_000), at(1_700_000_000_000_000_001));
        assert_eq!(
            birth_stamp(Ok(UNIX_EPOCH - Duration::from_secs(1))),
            u64::MAX
        );
    }

    /// Whether the engine keeps working state (fills, a writer, an expected delivery) for
    /// the file.
    fn holds_busy_state(engine: &Engine, id: FileId) -> bool {
        engine
            .entry(id)
            .unwrap()
            .state
            .lock()
            .unwrap()
            .busy
            .0
            .is_some()
    }

    #[test]
    fn a_file_completed_while_a_delivery_was_expected_keeps_nothing_of_it() {
        // Inode marks on temp files only; the fill reads a local file, nothing blocks.
        let dir = tempfile::tempdir().unwrap();
        let (path, src) = (dir.path().join("f"), dir.path().join("src"));
        let data = vec![7u8; 10_000];
        std::fs::write(&src, &data).unwrap();
        File::create(&path)
            .unwrap()
            .set_len(data.len() as u64)
            .unwrap();
        let engine = Engine::start(EngineConfig::default()).unwrap();
        let id = engine
            .register(Placeholder {
                path: path.into(),
                size: data.len() as u64,
                source: Arc::new(LocalFileSource::open(&src).unwrap()),
                file: 0,
                verify: Verify::Whole(Sha256::of(&data)),
            })
            .unwrap();
        let busy = || holds_busy_state(&engine, id);
        let delivery = Delivery::start();
        // Far down the stream: the fill fetches rather than waits, and completes the file
        // while the delivery is still expected.
        engine.expect(id, &delivery, 1 << 50);
        assert!(
            busy(),
            "an expected delivery is held while the file is missing"
        );
        engine.fill_file(id).unwrap();
        assert!(engine.is_complete(id));
        assert!(
            !busy(),
            "complete: the delivery, fills and writer are let go"
        );
    }

    #[test]
    fn a_delivery_that_ends_short_is_let_go_by_the_files_it_did_not_bring() {
        // Inode marks on temp files only; nothing is read.
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, vec![7u8; 10_000]).unwrap();
        let engine = Engine::start(EngineConfig::default()).unwrap();
        let ids: Vec<FileId> = (0..2)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                File::create(&path).unwrap().set_len(10_000).unwrap();
                engine
                    .register(Placeholder {
                        path: path.into(),
                        size: 10_000,
                        source: Arc::new(LocalFileSource::open(&src).unwrap()),
                        file: 0,
                        verify: Verify::None,
                    })
                    .unwrap()
            })
            .collect();
        let busy = |id| holds_busy_state(&engine, id);
        let (stream, other) = (Delivery::start(), Delivery::start());
        engine.expect(ids[0], &stream, 10_000);
        engine.expect(ids[1], &other, 10_000);
        stream.end();
        engine.delivery_ended(&ids, &stream);
        assert!(!busy(ids[0]), "the ended delivery is let go");
        assert!(busy(ids[1]), "another delivery still expected is kept");
    }

    #[test]
    fn placeholder_entry_stays_small() {
        // The engine holds one of these per placeholder, in an `Arc` (two counts): at most
        // 168 bytes asked of malloc, a 176-byte chunk (17 MiB per 100,000 placeholders).
        assert!(
            std::mem::size_of::<FileEntry>() <= 152,
            "{}",
            std::mem::size_of::<FileEntry>()
        );
        let mut busy = Busy::default();
        assert!(busy.0.is_none());
        // What a fill sets goes with it.
        busy.start_fill(3, futures::future::ready(Ok(())).boxed().shared());
        assert!(busy.filling(3) && !busy.filling(2));
        busy.set_expected(None);
        assert!(busy.0.is_some());
        busy.end_fill(3);
        assert!(busy.0.is_none(), "nothing left: freed");
    }
}
