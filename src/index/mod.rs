//! Layer index: random access into ordinary (gzip, zstd, plain tar) layers.
//!
//! Owns the entry table of a layer (one [`Entry`] per tar member, in order) and the
//! random-access checkpoints into its compressed stream, the versioned on-disk format they
//! are stored in, and the code that turns a file range into a compressed span to fetch and
//! the bytes inflated from it. It never touches the placeholder tree or the network: bytes
//! come in through a caller-supplied range reader.
//!
//! The flow:
//! 1. [`LayerIndex::build`] (or [`LayerIndex::build_with_sink`], which also hands every file's
//!    bytes to an [`IndexSink`] as they stream by) reads the blob once: it hashes the
//!    compressed bytes (blob digest), inflates them while recording [`Checkpoint`]s, (on
//!    request) hashes the uncompressed stream (diff id) and walks the tar headers into [`Entry`]s with
//!    per-file and per-[`CHUNK_SIZE`] sha256s.
//! 2. The pass returns the metadata ([`LayerIndex`]) and the windows pack ([`WindowPack`]):
//!    the checkpoint windows, kept apart because only the few a workload touches are ever
//!    needed. [`LayerIndex::encode`] / [`LayerIndex::decode`] store the metadata
//!    (`docs/index-format.md`); [`IndexStore`] keeps both per layer digest; [`LayerWindows`]
//!    reads single windows on demand from a [`WindowSource`] through a [`WindowCache`].
//! 3. [`plan`] maps a file range to a compressed [`Span`] of the blob, [`extract`] inflates
//!    the fetched span (given its checkpoint's window) into exactly the wanted bytes,
//!    [`read_file_range`] does all of it with a [`RangeReader`] and [`LayerWindows`];
//!    [`verify_chunk`] / [`verify_whole`] check the result.
//!
//! Checkpoints by compression:
//! - gzip: zran style, one at the start of the first member, then one at the first deflate
//!   block boundary after every [`IndexOptions::span`] bytes of output (with the 32 KiB window
//!   and the bit offset), one right at each file's data (and each [`CHUNK_SIZE`] piece of
//!   it) when the last checkpoint is [`IndexOptions::file_span`] back (inside a deflate
//!   block, with that block's header to replay), and one at a member start after
//!   [`IndexOptions::boundary_span`] bytes (no window needed). [`EndMark`]s at block boundaries and file ends let a read stop right after its
//!   range. Multi-member (concatenated) gzip is supported.
//! - zstd: frame starts only (zstd has no resumable state inside a frame). A single-frame
//!   layer therefore has one checkpoint and every range read inflates from the start.
//! - plain tar: none; a file range maps directly to the same blob range.
//!
//! ```
//! use fanfill::index::{IndexOptions, LayerIndex, extract, plan};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A one-file gzip layer.
//! let data = b"hello, layer ".repeat(1000);
//! let mut tar = tar::Builder::new(Vec::new());
//! let mut h = tar::Header::new_gnu();
//! h.set_size(data.len() as u64);
//! h.set_mode(0o644);
//! tar.append_data(&mut h, "etc/greeting", &data[..])?;
//! let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
//! std::io::Write::write_all(&mut gz, &tar.into_inner()?)?;
//! let blob = gz.finish()?;
//!
//! let (index, windows) = LayerIndex::build(&blob[..], &IndexOptions::default())?;
//! let entry = &index.entries[index.find("etc/greeting").unwrap()];
//! // Which compressed bytes hold file bytes 7..12, then inflate just those.
//! let span = plan(&index, entry, 7, 5)?;
//! let fetched = &blob[span.blob_offset as usize..(span.blob_offset + span.blob_len) as usize];
//! // The checkpoint's window (empty here: the checkpoint is at the start of the member).
//! let window = windows.window(&index, span.checkpoint.unwrap())?;
//! assert_eq!(extract(&index, &span, &window, fetched)?, b"layer");
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

use crate::digest::Sha256;

mod build;
mod error;
mod extract;
mod format;
mod gzip;
mod store;
mod windows;

pub(crate) use build::normalize_path;
pub use build::{IndexOptions, IndexSink, NoSink};
pub use error::IndexError;
pub use extract::{
    RangeReader, Span, extract, plan, plan_back, plan_uncompressed, read_file_range, verify_chunk,
    verify_whole,
};
pub use format::{FORMAT_MAGIC, FORMAT_VERSION};
pub use store::{IndexStore, StoredWindows};
pub use windows::{
    LayerWindows, NoWindows, PACK_HEADER_LEN, PACK_MAGIC, WindowCache, WindowPack, WindowRef,
    WindowSource,
};

/// What kind of filesystem object a tar entry describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file; its data sits at [`Entry::data_offset`] in the uncompressed stream.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to [`Entry::link`].
    Symlink,
    /// A hard link to the earlier entry whose path is [`Entry::link`].
    Hardlink,
    /// A named pipe.
    Fifo,
    /// A character device (`major`, `minor`).
    Char {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A block device (`major`, `minor`).
    Block {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// One member of a layer's tar stream, with everything a placeholder needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the layer root, normalised: no leading `/` or `./`, no `..`, no
    /// trailing `/`. Whiteouts keep their `.wh.` names here; the unpacker interprets them.
    /// The layer root itself (a `./` member) has the empty path.
    pub path: Box<str>,
    /// Object kind.
    pub kind: EntryKind,
    /// Permission bits and setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanoseconds part (PAX `mtime` may carry it; otherwise 0).
    pub mtime_nsec: u32,
    /// Extended attributes (`SCHILY.xattr.*` PAX records), name -> value, sorted by name.
    pub xattrs: Box<[(String, Vec<u8>)]>,
    /// Link target for symlinks and hardlinks. Symlink targets are kept verbatim; hardlink
    /// targets are normalised like [`Entry::path`].
    pub link: Option<Box<str>>,
    /// Size of the file data in bytes (0 for everything but regular files).
    pub size: u64,
    /// Offset of the file data in the uncompressed tar stream.
    pub data_offset: u64,
    /// sha256 of the whole file content (regular files only).
    pub sha256: Option<Sha256>,
    /// sha256 of each [`CHUNK_SIZE`] piece of the content, for files larger than one chunk.
    pub chunk_sha256: Box<[Sha256]>,
}

/// Granularity of per-chunk digests in the index, and the fill granularity of large files.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// A position among layers, entries or the files of an image as `u32`, how records and
/// long-lived tables keep it: an index in memory never holds 2^32 entries (that would take
/// a terabyte).
pub fn position(n: usize) -> u32 {
    u32::try_from(n).expect("fewer than 2^32 layers, entries and files")
}

impl Entry {
    /// An entry of `kind` at `path` with `mode`, owned by 0:0, at time 0, with no data,
    /// link or xattrs (builders fill in the rest).
    pub fn new(path: impl Into<Box<str>>, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Box::default(),
            link: None,
            size: 0,
            data_offset: 0,
            sha256: None,
            chunk_sha256: Box::default(),
        }
    }

    /// Number of [`CHUNK_SIZE`] pieces of a regular file (0 for an empty file or a non-file).
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    /// File range `(offset, len)` of chunk `idx`, or `None` past the end.
    pub fn chunk_range(&self, idx: u64) -> Option<(u64, u64)> {
        let start = idx.checked_mul(CHUNK_SIZE)?;
        if start >= self.size {
            return None;
        }
        Some((start, (self.size - start).min(CHUNK_SIZE)))
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip, one or more concatenated members.
    Gzip,
    /// zstd, one or more frames.
    Zstd,
}

impl Compression {
    /// Recognise a compressed blob by its first bytes (gzip `1f 8b`, zstd `28 b5 2f fd` or a
    /// zstd skippable frame); `None` when neither magic matches (plain tar, or garbage).
    pub fn from_magic(prefix: &[u8]) -> Option<Self> {
        match prefix {
            [0x1f, 0x8b, ..] => Some(Self::Gzip),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Self::Zstd),
            [b0, 0x2a, 0x4d, 0x18, ..] if b0 & 0xf0 == 0x50 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The compression an OCI or Docker layer media type announces, if it is a layer type
    /// this crate knows.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        let base = media_type.split(';').next().unwrap_or("").trim();
        match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A point in the compressed stream where inflating can start afresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the uncompressed (tar) stream of the first byte produced from here.
    pub uncompressed_offset: u64,
    /// Offset in the blob of the byte holding the first bit of compressed data.
    pub compressed_offset: u64,
    /// gzip only: how many low bits of the byte at `compressed_offset` belong to the
    /// previous deflate block (0-7); inflating resumes at that bit.
    pub bit_offset: u8,
    /// gzip only: where the up to 32 KiB of uncompressed data preceding this point in the
    /// same member (the deflate history) sits in the layer's windows pack; `None` at a member
    /// or frame start. Fetch it with [`LayerWindows::window`] or [`WindowPack::window`].
    pub window: Option<WindowRef>,
}

/// A point where inflating the blob up to (not including) byte `compressed_end` is known to
/// yield every uncompressed byte before `uncompressed_offset`: recorded at deflate block
/// boundaries and where file data (or a [`CHUNK_SIZE`] piece of it) ends. Cheap end points
/// for range reads: a checkpoint is a start point and costs a window, an end mark a few
/// bytes of metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndMark {
    /// Uncompressed offset of the boundary.
    pub uncompressed_offset: u64,
    /// Blob offset just past the byte holding the boundary's last bit.
    pub compressed_end: u64,
}

/// Everything needed to read any file range of one layer blob without unpacking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerIndex {
    /// How the blob is compressed.
    pub compression: Compression,
    /// `sha256:<hex>` of the compressed blob as it streamed by (compare with the descriptor).
    pub blob_digest: String,
    /// `sha256:<hex>` of the uncompressed tar stream (the OCI diff id), if it was computed
    /// (see [`IndexOptions::diff_id`]).
    pub diff_id: Option<String>,
    /// Size of the blob in bytes.
    pub compressed_size: u64,
    /// Size of the uncompressed tar stream in bytes.
    pub uncompressed_size: u64,
    /// The gzip checkpoint spacing the index was built with.
    pub span: u64,
    /// `sha256:<hex>` of the layer's windows pack, `None` when no checkpoint has a window.
    pub windows_digest: Option<String>,
    /// Size of the windows pack in bytes (0 when there is none).
    pub windows_size: u64,
    /// One entry per tar member, in stream order.
    pub entries: Vec<Entry>,
    /// Random-access points, sorted by both offsets; the first is at uncompressed offset 0
    /// (empty for plain tar).
    pub checkpoints: Vec<Checkpoint>,
    /// gzip only: end points for [`plan`], strictly increasing in both offsets.
    pub end_marks: Vec<EndMark>,
}

impl LayerIndex {
    /// Index of the last entry with this path (later members override earlier ones).
    pub fn find(&self, path: &str) -> Option<usize> {
        self.entries.iter().rposition(|e| *e.path == *path)
    }

    /// Follow a hardlink to the regular file entry it names (the last one before it with
    /// that path); returns the entry itself when it is not a hardlink.
    pub fn resolve(&self, idx: usize) -> Option<&Entry> {
        self.entries.get(self.resolve_index(idx)?)
    }

    /// Position in `entries` of the entry [`LayerIndex::resolve`] returns.
    pub fn resolve_index(&self, idx: usize) -> Option<usize> {
        let mut pos = idx;
        let mut cur = self.entries.get(idx)?;
        // Hardlink chains point backwards, so this terminates after at most `idx` steps.
        while cur.kind == EntryKind::Hardlink {
            let target = cur.link.as_deref()?;
            pos = self.entries[..pos]
                .iter()
                .rposition(|e| *e.path == *target)?;
            cur = &self.entries[pos];
        }
        Some(pos)
    }
}
