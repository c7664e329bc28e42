//! Layer index: random access into ordinary (gzip, zstd, plain tar) layers.
//!
//! Owns the entry table of a layer (one [`Entry`] per tar member, in order) and the
//! random-access checkpoints into its compressed stream, the versioned on-disk format they
//! are stored in, and the code that turns a file range into a compressed span to fetch and
//! the bytes inflated from it. It never touches the placeholder tree or the network: bytes
//! come in through a caller-supplied range reader.

use serde::{Deserialize, Serialize};

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
    pub path: String,
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
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Link target for symlinks and hardlinks.
    pub link: Option<String>,
    /// Size of the file data in bytes (0 for everything but regular files).
    pub size: u64,
    /// Offset of the file data in the uncompressed tar stream.
    pub data_offset: u64,
    /// sha256 of the whole file content, lowercase hex (regular files only).
    pub sha256: Option<String>,
    /// sha256 of each [`CHUNK_SIZE`] piece of the content, for files larger than one chunk.
    pub chunk_sha256: Vec<String>,
}

/// Granularity of per-chunk digests in the index, and the fill granularity of large files.
pub const CHUNK_SIZE: u64 = 1 << 20;
