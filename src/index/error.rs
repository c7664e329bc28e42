//! The one error type of the layer index.

use std::io;
use std::path::PathBuf;

use crate::sys::zlib::ZlibError;

/// Everything that can go wrong while indexing a layer, storing an index or reading a range.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading the blob (or writing through a sink) failed.
    #[error("I/O error")]
    Io(#[from] io::Error),
    /// The blob has no bytes at all.
    #[error("layer blob is empty")]
    EmptyBlob,
    /// The media type announces a compression the blob's magic bytes do not show.
    #[error(
        "media type {media_type:?} announces a compressed layer but the blob has no such magic"
    )]
    CompressionMismatch {
        /// The media type given as a hint.
        media_type: String,
    },
    /// The gzip framing (header, trailer, CRC, length) is wrong.
    #[error("corrupt gzip stream at blob offset {offset}: {reason}")]
    Gzip {
        /// Blob offset where the problem was seen.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// zlib rejected the deflate data.
    #[error("corrupt deflate data at blob offset {offset}")]
    Deflate {
        /// Blob offset of the input being inflated.
        offset: u64,
        /// zlib's complaint.
        #[source]
        source: ZlibError,
    },
    /// zlib could not be set up (out of memory, bad parameters).
    #[error("zlib setup failed")]
    Zlib(#[from] ZlibError),
    /// The zstd decoder rejected the data.
    #[error("corrupt zstd stream at blob offset {offset}")]
    Zstd {
        /// Blob offset of the input being decoded.
        offset: u64,
        /// The decoder's complaint.
        #[source]
        source: io::Error,
    },
    /// The compressed stream ended in the middle of a member, frame or tar entry.
    #[error("{what} ends early")]
    Truncated {
        /// Which stream ended.
        what: &'static str,
    },
    /// A tar header is malformed (bad checksum, unparsable number, bad PAX record).
    #[error("corrupt tar header at offset {offset}: {reason}")]
    TarHeader {
        /// Offset of the header in the uncompressed stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A PAX or GNU long-name header exceeds the configured limit.
    #[error("{kind} header at offset {offset} is {size} bytes, over the limit of {limit}")]
    HeaderTooLarge {
        /// `pax`, `gnu long name`, ...
        kind: &'static str,
        /// Offset of the header in the uncompressed stream.
        offset: u64,
        /// Its declared size.
        size: u64,
        /// [`super::IndexOptions::max_header_bytes`].
        limit: u64,
    },
    /// A member path (or hardlink target) escapes the layer root or is otherwise unusable.
    #[error("unsafe path {path:?} at offset {offset}")]
    UnsafePath {
        /// The path as found (lossily decoded).
        path: String,
        /// Offset of the member's header in the uncompressed stream.
        offset: u64,
    },
    /// A member uses a tar feature the index cannot represent.
    #[error("unsupported tar member {path:?} at offset {offset}: {what}")]
    Unsupported {
        /// The member path (lossily decoded).
        path: String,
        /// Offset of the member's header in the uncompressed stream.
        offset: u64,
        /// The feature.
        what: String,
    },
    /// The [`super::IndexSink`] failed; indexing stopped.
    #[error("sink failed on entry {idx}")]
    Sink {
        /// Entry being delivered.
        idx: usize,
        /// The sink's error.
        #[source]
        source: io::Error,
    },
    /// The bytes are not a stored index (wrong magic).
    #[error("not a fanfill layer index")]
    BadMagic,
    /// A stored index of a format version this build does not read.
    #[error(
        "unsupported layer index format version {0} (this build reads version {v}; an index is a cache: rebuild it)",
        v = super::FORMAT_VERSION
    )]
    UnsupportedVersion(u16),
    /// A stored index is damaged or inconsistent.
    #[error("corrupt layer index: {0}")]
    CorruptIndex(String),
    /// A checkpoint window read from a windows pack is not the one the index describes.
    #[error("window of checkpoint {checkpoint}: {reason}")]
    CorruptWindow {
        /// The checkpoint.
        checkpoint: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Reading a checkpoint window from its source failed.
    #[error("fetching the window of checkpoint {checkpoint}")]
    WindowFetch {
        /// The checkpoint.
        checkpoint: usize,
        /// The source's error.
        #[source]
        source: io::Error,
    },
    /// A range was asked of an entry that has no data.
    #[error("entry {path:?} is not a regular file")]
    NotAFile {
        /// The entry path.
        path: String,
    },
    /// A range starts beyond the end of the file or stream.
    #[error("range at {offset} is beyond the end ({size} bytes)")]
    OutOfRange {
        /// Start of the requested range.
        offset: u64,
        /// Size of the file or stream.
        size: u64,
    },
    /// The bytes handed to [`super::extract`] are not the span the plan asked for.
    #[error("span is {got} bytes, plan asked for {expected}")]
    SpanMismatch {
        /// Length the plan asked for.
        expected: u64,
        /// Length handed in.
        got: u64,
    },
    /// A digest did not match the index.
    #[error("sha256 mismatch for {path:?}{}", chunk.map(|c| format!(" chunk {c}")).unwrap_or_default())]
    DigestMismatch {
        /// The entry path.
        path: String,
        /// The chunk, for a chunk check.
        chunk: Option<u64>,
    },
    /// The range reader failed.
    #[error("fetching blob range {offset}+{len}")]
    Fetch {
        /// Blob offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// A layer digest is not of the form `sha256:<64 hex>` (or `sha512:<128 hex>`).
    #[error("invalid layer digest {0:?}")]
    InvalidDigest(String),
    /// Reading or writing the index store failed.
    #[error("index store file {path}")]
    Store {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl IndexError {
    /// Pull an `IndexError` back out of an `io::Error` that carries one (the decoders run
    /// behind `std::io::Read` and can only return `io::Error`).
    pub(crate) fn from_io(e: io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<IndexError>()) {
            return IndexError::Io(e);
        }
        match e.into_inner().map(|inner| inner.downcast::<IndexError>()) {
            Some(Ok(ie)) => *ie,
            // Not reachable: the inner error was just checked to be an IndexError.
            Some(Err(other)) => IndexError::Io(io::Error::other(other)),
            None => IndexError::Io(io::Error::other("lost inner error")),
        }
    }

    /// Wrap into an `io::Error` so it can travel through `std::io::Read`.
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            IndexError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}
