//! Table-of-contents layers: eStargz and zstd:chunked images read lazily as they are.
//!
//! Owns the formats whose layers carry their own table of contents (TOC) and need no side
//! index: finding the TOC from the descriptor's annotations or the blob's footer, fetching
//! and verifying just it by range, turning it into the [`LayerIndex`] entry table the
//! unpacker takes (plus where each file's chunks sit in the blob, [`TocLayer::chunks`]), and
//! reading a file range back from the independently compressed chunks (`TocFileSource`).
//! It never touches the placeholder tree or the fanotify group, and it does not build or
//! store checkpoint indexes: that is [`crate::index`].
//!
//! Common shape of both formats: every regular file's content is split into chunks, each an
//! independent gzip member (eStargz) or zstd frame (zstd:chunked) starting at a known blob
//! offset, with a sha256 per chunk in the TOC. A range read fetches the members or frames
//! covering it with one range request, inflates each one whole, checks each chunk's digest
//! and slices the wanted bytes: nothing reaches the engine unverified.

use crate::index::LayerIndex;

/// Which TOC format a layer is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocFormat {
    /// eStargz (stargz-snapshotter): gzip members, `stargz.index.json`, 51-byte footer.
    Estargz,
    /// zstd:chunked (containers/storage): zstd frames, a zstd-compressed manifest in a
    /// skippable frame, located by manifest annotations or the footer.
    ZstdChunked,
}

/// How each chunk's bytes are stored in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkCodec {
    /// An independent gzip member (header, deflate stream, trailer).
    GzipMember,
    /// An independent zstd frame.
    ZstdFrame,
}

/// Where one piece of a regular file's content sits in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocChunk {
    /// Offset of the chunk's first byte in the file (`chunkOffset`).
    pub file_offset: u64,
    /// Uncompressed length of the chunk in bytes (`chunkSize`, or the file's remainder).
    pub len: u64,
    /// Blob offset where the chunk's gzip member or zstd frame starts (`offset`).
    pub compressed_offset: u64,
    /// Blob offset just past the end of that member or frame (exclusive). For eStargz this is
    /// the next member's start (or the TOC's offset for the last one); for zstd:chunked the
    /// TOC's `endOffset`.
    pub compressed_end: u64,
    /// Offset of the chunk's first byte in the member's or frame's uncompressed output
    /// (eStargz `innerOffset`; 0 when absent).
    pub inner_offset: u64,
    /// sha256 of the chunk's uncompressed bytes, lowercase hex without the `sha256:` prefix
    /// (`chunkDigest`; for a single-chunk file the file's `digest` when no chunk digest is
    /// given). `None` only when the TOC carries neither.
    pub sha256: Option<String>,
    /// zstd:chunked `chunkType: "zeros"`: the chunk is all zero bytes and has no data in the
    /// blob.
    pub zeros: bool,
}

/// A TOC layer, ready to unpack and to serve.
#[derive(Debug, Clone)]
pub struct TocLayer {
    /// The format it was read as.
    pub format: TocFormat,
    /// How chunk bytes are stored.
    pub codec: ChunkCodec,
    /// Entry table for the unpacker, in TOC order. `compression`, `blob_digest` and
    /// `compressed_size` describe the blob; regular files carry `size` and `sha256` (the
    /// file digest, hex); `data_offset`, `chunk_sha256`, `checkpoints` and `end_marks` are
    /// unused (empty or 0): file bytes are located through [`TocLayer::chunks`].
    pub index: LayerIndex,
    /// Parallel to `index.entries`: each regular file's chunks in file order, covering
    /// `0..size` without gaps or overlaps; empty for every other kind and for empty files.
    pub chunks: Vec<Vec<TocChunk>>,
    /// Entry indexes to prefetch first, in order (eStargz: regular files before the
    /// `.prefetch.landmark` entry); empty when the layer names none.
    pub prefetch_first: Vec<usize>,
    /// `sha256:<hex>` of the TOC as it was verified.
    pub toc_digest: String,
    /// Bytes fetched from the blob to read the TOC (footer included).
    pub toc_bytes_fetched: u64,
}
