//! Placeholder unpack: turns the entry tables of an image's layers into a real directory
//! tree whose regular files are sparse placeholders.
//!
//! Owns the on-disk layout of an unpacked image and everything about it: OCI whiteout and
//! opaque-directory semantics, flattening layers ([`Mode::Direct`]) or converting each layer
//! to overlayfs form ([`Mode::Overlay`]), creating every directory, symlink, hardlink, fifo
//! and device node with its true owner, mode, mtime and xattrs, and creating each regular
//! file with its true size but no data. It returns the list of [`Placeholder`]s the fill
//! engine has to watch.
//!
//! It never fetches or writes file data (a caller may, through [`UnpackHooks::write_data`]),
//! never touches fanotify, and never writes outside the destination directory.
//!
//! # How an unpack runs
//! 1. **Plan** (no syscalls): every path is validated (absolute paths, `..`, empty or `.`
//!    components and NUL bytes are refused), duplicates inside a layer collapse (last
//!    wins), whiteouts and opaque markers are applied to the lower layers, hardlinks are
//!    resolved to the entry owning their inode. A layer that places an entry beneath its own
//!    non-directory (`a -> /etc` then `a/passwd`) is refused; an entry beneath a *lower*
//!    layer's non-directory replaces it with a directory, as an overlay mount of the layers
//!    would show. Every error is found here, before the first write.
//! 2. **Materialise**: beneath the destination opened once (by the caller, [`unpack_at`],
//!    or here with `RESOLVE_NO_SYMLINKS`), one walk per tree in path order, parents first,
//!    through directory fds opened with `O_NOFOLLOW` one component at a time; existing
//!    inodes for hardlinks are found with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!    ...)` from the destination. A directory's owner, mode, xattrs and mtime are set when
//!    the walk leaves it, deepest first. Regular files: create, size (`ftruncate`),
//!    optional data, owner, mode (after the owner: chown clears setuid), xattrs (after the
//!    owner: chown clears `security.capability`), mtime.
//!
//! # Layouts
//! - [`Mode::Direct`]: the flattened image at `dest`; `dest` itself carries the image root's
//!   metadata.
//! - [`Mode::Overlay`]: `dest/layers/<N>-<first 12 characters of the digest's hex>/` per
//!   layer (N counts from 0, lowest layer first); whiteouts are 0:0 character devices and
//!   opaque directories carry `trusted.overlay.opaque=y`. [`Unpacked::lowerdirs`] lists the
//!   layer directories top first, as overlayfs's `lowerdir=` wants them. overlayfs ignores
//!   the opaque xattr on a layer's root, so a layer with `.wh..wh..opq` at its top hides
//!   the layers below it by leaving them out: they are neither created nor listed.
//!
//! # Writing data eagerly
//! The same code creates files with data: [`UnpackHooks::write_data`] gets each new file
//! open for writing before its metadata is set; an extractor that streams a tar reuses
//! [`open_dir_beneath`], [`create_file`] and [`finish_file`] directly.
//!
//! Hardlink targets resolve against the flattened view at their layer: the layer's own
//! entries and whatever the layers below still show after this layer's whiteouts. Hardlinks
//! across layers share the inode in both modes (overlay mode links into the lower layer's
//! directory; all layer directories live on one filesystem).
//!
//! A failed unpack leaves what it had created so far in `dest`; the caller removes it.
//! Nothing is written when the plan fails.
//!
//! Directories no layer describes (a parent a tar omitted) get mode 0755, owner 0:0 and
//! mtime 0, or in overlay mode the metadata the directory already has in the layers below,
//! so that both modes show the same tree. Of a layer's xattrs only those an unpacker may
//! apply are ([`xattr_allowed`]: `security.capability`, POSIX ACLs, `user.*` and
//! `trusted.*` but overlayfs control xattrs and fanfill's own marker); the rest are dropped
//! and counted in the log: a layer must not steer overlayfs, label files for the host's
//! security modules, or forge fanfill's tree marker.

pub(crate) mod plan;
mod write;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::index::Entry;

pub use write::{
    OWN_XATTR_PREFIXES, create_file, finish_file, open_dest, open_dir_beneath, xattr_allowed,
};

/// One layer of an image: its digest (for messages and the overlay layout) and its entry
/// table in tar order.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// Layer digest, `algorithm:hex`.
    pub digest: &'a str,
    /// The layer's entries, in tar order.
    pub entries: &'a [Entry],
}

impl<'a> Layer<'a> {
    /// A layer from its digest and entries.
    pub fn new(digest: &'a str, entries: &'a [Entry]) -> Self {
        Self { digest, entries }
    }
}

/// Which layout to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One flattened tree at the destination: the container's root directly.
    #[default]
    Direct,
    /// One tree per layer in overlayfs form, to be mounted as lower directories.
    Overlay,
}

/// How to unpack.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Layout to produce.
    pub mode: Mode,
    /// Create character and block devices. Off, or without the privilege to `mknod`, they are
    /// skipped (counted in [`UnpackStats::skipped`]). Fifos are always created.
    pub make_devices: bool,
    /// Leave placeholders sparse (`ftruncate`, no blocks). When false, their blocks are
    /// reserved with `fallocate` so that later fills cannot fail with ENOSPC.
    pub sparse: bool,
    /// Accept a destination that already has entries: existing directories on the way are
    /// reused (their metadata overwritten); any other existing object is an error.
    pub allow_nonempty: bool,
    /// Report progress every this many created objects (0: never).
    pub progress_every: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Direct,
            make_devices: false,
            sparse: true,
            allow_nonempty: false,
            progress_every: 4096,
        }
    }
}

/// A regular file created without its data: what the fill engine has to fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// Absolute path of the file (one of its names, when it has hardlinks); shared with the
    /// engine's registration and the daemon's record of the file (one copy per placeholder).
    pub path: Arc<Path>,
    /// Index of the layer whose entry describes the file (lowest layer 0).
    pub layer: usize,
    /// Index of that entry in its layer.
    pub entry: usize,
    /// File size in bytes.
    pub size: u64,
}

/// What an unpack created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Directories created (the destination root and layer roots included).
    pub dirs: u64,
    /// Regular-file inodes created (a file with hardlinks counts once).
    pub files: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Extra names given to existing inodes.
    pub hardlinks: u64,
    /// Fifos created.
    pub fifos: u64,
    /// Character and block devices created.
    pub devices: u64,
    /// Overlay whiteouts created.
    pub whiteouts: u64,
    /// Objects not created (devices when not allowed or not privileged).
    pub skipped: u64,
    /// Total size of the returned placeholders.
    pub bytes: u64,
}

/// The result of an unpack.
#[derive(Debug, Clone, Default)]
pub struct Unpacked {
    /// Regular files with a size above zero whose data was not written, one per inode. In
    /// overlay mode only files the merged view shows are listed.
    pub placeholders: Vec<Placeholder>,
    /// Overlay mode: the layer directories, top layer first (down to the highest layer with
    /// an opaque root). Empty in direct mode.
    pub lowerdirs: Vec<PathBuf>,
    /// Counts.
    pub stats: UnpackStats,
}

impl Unpacked {
    /// The `lowerdir=` value for an overlay mount of [`Unpacked::lowerdirs`]: the
    /// directories joined by `:`, with `\`, `:` and `,` escaped by a backslash.
    ///
    /// Without `upperdir=`, overlayfs refuses a single lower directory (EINVAL): add an
    /// empty one, or bind-mount the layer instead. `mount(2)` takes at most one page of
    /// options; for many layers use the new mount API's `lowerdir+` (Linux 6.8+).
    pub fn lowerdir_option(&self) -> String {
        let mut out = String::new();
        for (i, dir) in self.lowerdirs.iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            for c in dir.to_string_lossy().chars() {
                if matches!(c, '\\' | ':' | ',') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        out
    }
}

/// Progress of the materialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Objects handled so far.
    pub done: u64,
    /// Objects in the plan.
    pub total: u64,
}

/// What [`UnpackHooks::write_data`] did with a new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileData {
    /// Nothing written: the file is a placeholder.
    Placeholder,
    /// The complete data was written: the file is not a placeholder.
    Written,
}

/// Caller hooks into an unpack. Every method has a default that does nothing.
pub trait UnpackHooks {
    /// Called every [`UnpackOptions::progress_every`] objects and once at the end.
    fn progress(&mut self, _progress: Progress) {}

    /// Called for each new regular-file inode with the file open for writing, after it was
    /// sized and before its owner, mode, xattrs and mtime are set. An eager unpack writes
    /// the data here and returns [`FileData::Written`].
    fn write_data(
        &mut self,
        _layer: usize,
        _entry: usize,
        _meta: &Entry,
        _file: &mut File,
    ) -> io::Result<FileData> {
        Ok(FileData::Placeholder)
    }
}

/// Hooks that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl UnpackHooks for NoHooks {}

/// Told of each placeholder the moment it exists, on the thread that created it (several at
/// once: placeholders are created by more than one thread), with the file still open
/// through the descriptor it was created with and its metadata (one `statx` before its
/// owner, mode, xattrs and times were set: identity, type, size and birth time). A caller
/// registers the placeholder here, in the same pass that creates it: marking its inode
/// through this descriptor needs no second walk, path lookup or `statx`, and no one else can
/// have opened the file yet (its directory is still `0700`).
///
/// An error stops the unpack ([`Op::Register`]); what was created stays for the caller to
/// remove, as with any failed unpack.
pub trait PlaceholderSink: Sync {
    /// `p` was created from the entry `meta` (already on `p.path`), open as `file`.
    fn created(
        &self,
        p: &Placeholder,
        meta: &Entry,
        file: &File,
        stat: &std::fs::Metadata,
    ) -> io::Result<()>;
}

/// A sink that takes nothing: [`unpack`] and [`unpack_at`] create leaves on several threads
/// through it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSink;

impl PlaceholderSink for NoSink {
    fn created(
        &self,
        _: &Placeholder,
        _: &Entry,
        _: &File,
        _: &std::fs::Metadata,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// What went wrong, naming the layer and path at fault.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The destination could not be opened or inspected.
    #[error("destination {dest}")]
    Dest {
        /// The destination directory.
        dest: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The destination has entries and [`UnpackOptions::allow_nonempty`] is off.
    #[error("destination {dest} is not empty")]
    DestNotEmpty {
        /// The destination directory.
        dest: PathBuf,
    },
    /// An entry path is not a safe relative path, or the entry lacks what its kind needs.
    #[error("layer {layer}: entry {path:?}: {reason}")]
    BadPath {
        /// Layer digest.
        layer: String,
        /// Entry path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry lies beneath (or over) a non-directory of the same layer.
    #[error("layer {layer}: entry {path:?}: {parent:?} of the same layer is not a directory")]
    NotADirectory {
        /// Layer digest.
        layer: String,
        /// Entry path as given.
        path: String,
        /// The path that should be a directory.
        parent: String,
    },
    /// A hardlink target is invalid, missing, a directory, or reached through a symlink.
    #[error("layer {layer}: hardlink {path:?} -> {target:?}: {reason}")]
    HardlinkTarget {
        /// Layer digest.
        layer: String,
        /// Hardlink entry path.
        path: String,
        /// Its target as given.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A syscall failed while the tree was being created.
    #[error("layer {layer}: {path:?}: {op}")]
    Io {
        /// Digest of the layer whose entry was being created (or `-` for the layout).
        layer: String,
        /// Path relative to the destination.
        path: String,
        /// The operation that failed.
        op: Op,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// The underlying I/O error, if the failure was one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Dest { source, .. } | Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A filesystem operation of the materialisation, for [`UnpackError::Io`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creating the object.
    Create,
    /// Opening a directory on the walk.
    OpenDir,
    /// Linking a name to an existing inode.
    Link,
    /// Sizing or allocating a placeholder.
    Size,
    /// Writing data through [`UnpackHooks::write_data`].
    WriteData,
    /// Setting the owner.
    Chown,
    /// Setting the mode.
    Chmod,
    /// Setting the named xattr.
    Xattr(String),
    /// Setting the timestamps.
    Times,
    /// Handing the new placeholder to the [`PlaceholderSink`].
    Register,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create => f.write_str("create"),
            Op::OpenDir => f.write_str("open directory"),
            Op::Link => f.write_str("link"),
            Op::Size => f.write_str("size placeholder"),
            Op::WriteData => f.write_str("write data"),
            Op::Chown => f.write_str("chown"),
            Op::Chmod => f.write_str("chmod"),
            Op::Xattr(name) => write!(f, "set xattr {name}"),
            Op::Times => f.write_str("set times"),
            Op::Register => f.write_str("register placeholder"),
        }
    }
}

/// Unpacks `layers` (lowest first) into the empty directory `dest` as placeholders.
pub fn unpack(
    layers: &[Layer<'_>],
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<Unpacked, UnpackError> {
    unpack_into(layers, dest, opts, &NoSink)
}

/// [`unpack`] handing each placeholder to `sink` as soon as it exists ([`unpack_at_into`]).
pub fn unpack_into(
    layers: &[Layer<'_>],
    dest: &Path,
    opts: &UnpackOptions,
    sink: &dyn PlaceholderSink,
) -> Result<Unpacked, UnpackError> {
    let (fd, dest_abs) = open_dest_path(dest)?;
    unpack_at_into(layers, fd, &dest_abs, opts, sink)
}

/// [`unpack`] with caller hooks for progress and eager data.
pub fn unpack_with(
    layers: &[Layer<'_>],
    dest: &Path,
    opts: &UnpackOptions,
    hooks: &mut dyn UnpackHooks,
) -> Result<Unpacked, UnpackError> {
    let (fd, dest_abs) = open_dest_path(dest)?;
    unpack_at_with(layers, fd, &dest_abs, opts, hooks, None)
}

/// The destination directory `dest`, open ([`open_dest`]), with its canonical path.
fn open_dest_path(dest: &Path) -> Result<(std::os::fd::OwnedFd, std::path::PathBuf), UnpackError> {
    let dest_abs = dest.canonicalize().map_err(|source| UnpackError::Dest {
        dest: dest.to_owned(),
        source,
    })?;
    let fd = write::open_dest(&dest_abs)?;
    Ok((fd, dest_abs))
}

/// [`unpack`] into the directory open as `dest` (at `dest_abs`, which names the
/// placeholders in the result): nothing is created through a path, so whatever is done to
/// `dest_abs` meanwhile, the tree is built in this directory.
pub fn unpack_at(
    layers: &[Layer<'_>],
    dest: std::os::fd::OwnedFd,
    dest_abs: &Path,
    opts: &UnpackOptions,
) -> Result<Unpacked, UnpackError> {
    unpack_at_into(layers, dest, dest_abs, opts, &NoSink)
}

/// [`unpack_at`] handing each placeholder to `sink` as soon as it exists (to register it in
/// the same pass). The leaves of each tree are created by two threads.
pub fn unpack_at_into(
    layers: &[Layer<'_>],
    dest: std::os::fd::OwnedFd,
    dest_abs: &Path,
    opts: &UnpackOptions,
    sink: &dyn PlaceholderSink,
) -> Result<Unpacked, UnpackError> {
    unpack_at_with(layers, dest, dest_abs, opts, &mut NoHooks, Some(sink))
}

fn unpack_at_with(
    layers: &[Layer<'_>],
    dest: std::os::fd::OwnedFd,
    dest_abs: &Path,
    opts: &UnpackOptions,
    hooks: &mut dyn UnpackHooks,
    sink: Option<&dyn PlaceholderSink>,
) -> Result<Unpacked, UnpackError> {
    let dest_err = |source| UnpackError::Dest {
        dest: dest_abs.to_owned(),
        source,
    };
    if !opts.allow_nonempty
        && std::fs::read_dir(crate::sys::fdpass::proc_fd_path(&dest))
            .map_err(dest_err)?
            .next()
            .is_some()
    {
        return Err(UnpackError::DestNotEmpty {
            dest: dest_abs.to_owned(),
        });
    }
    let dest_abs = dest_abs.to_path_buf();
    let planning = std::time::Instant::now();
    let plan = plan::plan(layers, opts.mode == Mode::Overlay)?;
    tracing::info!(
        dest = %dest_abs.display(),
        layers = layers.len(),
        mode = ?opts.mode,
        objects = plan.merged.len(),
        plan_us = planning.elapsed().as_micros() as u64,
        "unpacking placeholders"
    );
    let out = write::materialise(layers, dest, &dest_abs, opts, hooks, sink, &plan)?;
    tracing::info!(
        dest = %dest_abs.display(),
        dirs = out.stats.dirs,
        files = out.stats.files,
        placeholders = out.placeholders.len(),
        bytes = out.stats.bytes,
        "unpacked placeholders"
    );
    Ok(out)
}

/// Directory name of layer `index` in overlay mode: `<index>-<first 12 hex characters>`.
pub fn layer_dir_name(index: usize, digest: &str) -> String {
    let hex = digest.rsplit(':').next().unwrap_or_default();
    let short: String = hex
        .chars()
        .take(12)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if short.is_empty() {
        index.to_string()
    } else {
        format!("{index}-{short}")
    }
}
