//! From a file range to bytes: which part of the blob to fetch ([`plan`]), how to inflate it
//! from its checkpoint and window ([`extract`]), both behind a range reader and the layer's
//! windows ([`read_file_range`]), and digest checks.

use std::future::Future;
use std::io;

use bytes::Bytes;

use super::gzip::inflate_span;
use super::windows::LayerWindows;
use super::{Compression, Entry, EntryKind, IndexError, LayerIndex};
use crate::digest::Sha256;

/// Extra compressed bytes fetched past the next checkpoint's byte: protects against a
/// decoder that wants to look a little ahead, and costs nothing measurable.
const SLACK: u64 = 64;

/// The part of a blob to fetch for one range, and where the wanted bytes sit in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Blob offset to fetch from.
    pub blob_offset: u64,
    /// Number of blob bytes to fetch (0 for an empty range).
    pub blob_len: u64,
    /// Index into [`LayerIndex::checkpoints`] to start inflating at (`None` for plain tar).
    pub checkpoint: Option<usize>,
    /// Offset of the first wanted byte in the uncompressed stream.
    pub uncompressed_offset: u64,
    /// Number of wanted bytes.
    pub len: u64,
}

impl Span {
    /// Uncompressed bytes inflated and thrown away before the wanted range starts.
    pub fn skip(&self, index: &LayerIndex) -> u64 {
        self.checkpoint
            .and_then(|i| index.checkpoints.get(i))
            .map_or(0, |c| {
                self.uncompressed_offset
                    .saturating_sub(c.uncompressed_offset)
            })
    }
}

/// Plan the fetch for `len` bytes at `offset` of regular file `entry` (an entry of `index`).
/// The range is clamped to the end of the file; an `offset` past the end is an error.
pub fn plan(index: &LayerIndex, entry: &Entry, offset: u64, len: u64) -> Result<Span, IndexError> {
    plan_back(index, entry, offset, len, 0)
}

/// [`plan`], but starting `back` checkpoints earlier than the nearest one (clamped to the
/// first). More is fetched and inflated; the result is the same bytes (the fuzz targets
/// check that every checkpoint resumes exactly).
pub fn plan_back(
    index: &LayerIndex,
    entry: &Entry,
    offset: u64,
    len: u64,
    back: usize,
) -> Result<Span, IndexError> {
    if entry.kind != EntryKind::File {
        return Err(IndexError::NotAFile {
            path: entry.path.to_string(),
        });
    }
    if offset > entry.size {
        return Err(IndexError::OutOfRange {
            offset,
            size: entry.size,
        });
    }
    let len = len.min(entry.size - offset);
    let start = entry
        .data_offset
        .checked_add(offset)
        .ok_or(IndexError::OutOfRange {
            offset,
            size: entry.size,
        })?;
    plan_uncompressed_back(index, start, len, back)
}

/// Plan the fetch for `len` bytes at `offset` of the uncompressed tar stream (clamped to its
/// end). For gzip and zstd the span runs from the last checkpoint at or before `offset` to
/// the first checkpoint or deflate block end at or after the range end (plus a few bytes),
/// or to the blob end.
pub fn plan_uncompressed(index: &LayerIndex, offset: u64, len: u64) -> Result<Span, IndexError> {
    plan_uncompressed_back(index, offset, len, 0)
}

fn plan_uncompressed_back(
    index: &LayerIndex,
    offset: u64,
    len: u64,
    back: usize,
) -> Result<Span, IndexError> {
    let size = index.uncompressed_size;
    if offset > size {
        return Err(IndexError::OutOfRange { offset, size });
    }
    let len = len.min(size - offset);
    if len == 0 {
        return Ok(Span {
            blob_offset: 0,
            blob_len: 0,
            checkpoint: None,
            uncompressed_offset: offset,
            len,
        });
    }
    if index.compression == Compression::None {
        return Ok(Span {
            blob_offset: offset,
            blob_len: len,
            checkpoint: None,
            uncompressed_offset: offset,
            len,
        });
    }
    let cps = &index.checkpoints;
    let i = cps.partition_point(|c| c.uncompressed_offset <= offset);
    if i == 0 {
        return Err(IndexError::CorruptIndex("no checkpoint at offset 0".into()));
    }
    let i = i.saturating_sub(back).max(1);
    let Some(start) = cps.get(i - 1) else {
        return Err(IndexError::CorruptIndex("no checkpoint at offset 0".into()));
    };
    let end_u = offset + len;
    let j = cps.partition_point(|c| c.uncompressed_offset < end_u);
    let at_checkpoint = cps
        .get(j)
        .map(|c| c.compressed_offset.saturating_add(1 + SLACK));
    let k = index
        .end_marks
        .partition_point(|b| b.uncompressed_offset < end_u);
    let at_block_end = index
        .end_marks
        .get(k)
        .map(|b| b.compressed_end.saturating_add(SLACK));
    let end = match (at_checkpoint, at_block_end) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(u64::MAX),
    }
    .min(index.compressed_size);
    let blob_offset = start.compressed_offset;
    Ok(Span {
        blob_offset,
        blob_len: end.saturating_sub(blob_offset),
        checkpoint: Some(i - 1),
        uncompressed_offset: offset,
        len,
    })
}

/// Collects `want` bytes after skipping `skip`; returns false once it has them.
struct Collector {
    skip: u64,
    want: usize,
    out: Vec<u8>,
}

impl Collector {
    fn push(&mut self, mut chunk: &[u8]) -> bool {
        if self.skip > 0 {
            let s = (self.skip.min(chunk.len() as u64)) as usize;
            chunk = &chunk[s..];
            self.skip -= s as u64;
        }
        let need = self.want - self.out.len();
        self.out.extend_from_slice(&chunk[..need.min(chunk.len())]);
        self.out.len() < self.want
    }
}

/// Inflate the fetched `span_bytes` (exactly the blob range `span` names) from the span's
/// checkpoint, whose window is `window` (empty when the checkpoint has none: see
/// [`LayerWindows::window`]), and return exactly the wanted bytes.
pub fn extract(
    index: &LayerIndex,
    span: &Span,
    window: &[u8],
    span_bytes: &[u8],
) -> Result<Vec<u8>, IndexError> {
    if span_bytes.len() as u64 != span.blob_len {
        return Err(IndexError::SpanMismatch {
            expected: span.blob_len,
            got: span_bytes.len() as u64,
        });
    }
    if span.len == 0 {
        return Ok(Vec::new());
    }
    let want = usize::try_from(span.len).map_err(|_| IndexError::OutOfRange {
        offset: span.len,
        size: usize::MAX as u64,
    })?;
    if index.compression == Compression::None || span.checkpoint.is_none() {
        if index.compression != Compression::None || span.len != span.blob_len {
            return Err(IndexError::CorruptIndex(
                "span does not fit the index".into(),
            ));
        }
        return Ok(span_bytes.to_vec());
    }
    let cp = span
        .checkpoint
        .and_then(|i| index.checkpoints.get(i))
        .ok_or_else(|| IndexError::CorruptIndex("span names a missing checkpoint".into()))?;
    if cp.compressed_offset < span.blob_offset
        || cp.compressed_offset - span.blob_offset > span.blob_len
        || cp.uncompressed_offset > span.uncompressed_offset
    {
        return Err(IndexError::CorruptIndex(
            "span does not fit the index".into(),
        ));
    }
    if window.len() != cp.window.map_or(0, |w| w.len as usize + w.header_len()) {
        return Err(IndexError::CorruptWindow {
            checkpoint: span.checkpoint.unwrap_or_default(),
            reason: "window length differs from the index",
        });
    }
    let mut c = Collector {
        skip: span.uncompressed_offset - cp.uncompressed_offset,
        want,
        // Never trust `want` for a large up-front allocation.
        out: Vec::with_capacity(want.min(16 << 20)),
    };
    match index.compression {
        Compression::Gzip => inflate_span(cp, window, span.blob_offset, span_bytes, |b| c.push(b))?,
        Compression::Zstd => {
            let start = (cp.compressed_offset - span.blob_offset) as usize;
            zstd_span(&span_bytes[start..], span.blob_offset + start as u64, |b| {
                c.push(b)
            })?
        }
        // Handled above.
        Compression::None => {}
    }
    if c.out.len() < want {
        return Err(IndexError::Truncated {
            what: "fetched span",
        });
    }
    Ok(c.out)
}

fn zstd_span(
    input: &[u8],
    base: u64,
    mut out: impl FnMut(&[u8]) -> bool,
) -> Result<(), IndexError> {
    use zstd::stream::raw::{Decoder, Operation};
    let mut dec = Decoder::new().map_err(|source| IndexError::Zstd {
        offset: base,
        source,
    })?;
    let mut buf = vec![0u8; 128 * 1024];
    let mut pos = 0usize;
    loop {
        let st = dec
            .run_on_buffers(&input[pos..], &mut buf)
            .map_err(|source| IndexError::Zstd {
                offset: base + pos as u64,
                source,
            })?;
        pos += st.bytes_read;
        if st.bytes_written > 0 && !out(&buf[..st.bytes_written]) {
            return Ok(());
        }
        if st.bytes_read == 0 && st.bytes_written == 0 {
            return Ok(());
        }
    }
}

/// Something that reads a byte range of a layer blob (a registry client, a local file).
pub trait RangeReader {
    /// Read exactly `len` bytes at `offset` of the blob.
    fn read_range(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<Bytes>> + Send;
}

impl<F, Fut> RangeReader for F
where
    F: Fn(u64, u64) -> Fut,
    Fut: Future<Output = io::Result<Bytes>> + Send,
{
    fn read_range(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<Bytes>> + Send {
        self(offset, len)
    }
}

/// [`plan`], fetch the span through `reader` and the checkpoint's window through `windows`
/// (concurrently), [`extract`]. The inflate (about a millisecond for a 1 MiB span) runs on
/// the calling task; callers on a busy runtime may prefer to run [`extract`] themselves on a
/// blocking thread.
pub async fn read_file_range<R: RangeReader + ?Sized>(
    index: &LayerIndex,
    entry: &Entry,
    offset: u64,
    len: u64,
    reader: &R,
    windows: &LayerWindows,
) -> Result<Vec<u8>, IndexError> {
    let span = plan(index, entry, offset, len)?;
    if span.len == 0 {
        return Ok(Vec::new());
    }
    let fetch = async {
        reader
            .read_range(span.blob_offset, span.blob_len)
            .await
            .map_err(|source| IndexError::Fetch {
                offset: span.blob_offset,
                len: span.blob_len,
                source,
            })
    };
    let window = async {
        match span.checkpoint {
            Some(cp) => windows.window(index, cp).await,
            None => Ok(std::sync::Arc::from(Vec::new())),
        }
    };
    let (bytes, window) = futures::future::try_join(fetch, window).await?;
    extract(index, &span, &window, &bytes)
}

/// Check `bytes` against chunk `chunk_idx` of `entry` (a file of at most one chunk has only
/// its whole-file digest, which is then the digest of chunk 0).
pub fn verify_chunk(entry: &Entry, chunk_idx: u64, bytes: &[u8]) -> Result<(), IndexError> {
    if entry.kind != EntryKind::File {
        return Err(IndexError::NotAFile {
            path: entry.path.to_string(),
        });
    }
    let mismatch = || IndexError::DigestMismatch {
        path: entry.path.to_string(),
        chunk: Some(chunk_idx),
    };
    let Some((_, len)) = entry.chunk_range(chunk_idx) else {
        return Err(IndexError::OutOfRange {
            offset: chunk_idx.saturating_mul(super::CHUNK_SIZE),
            size: entry.size,
        });
    };
    if bytes.len() as u64 != len {
        return Err(mismatch());
    }
    let expected = if entry.chunk_sha256.is_empty() {
        entry.sha256.as_ref()
    } else {
        usize::try_from(chunk_idx)
            .ok()
            .and_then(|i| entry.chunk_sha256.get(i))
    };
    match expected {
        Some(e) if *e == Sha256::of(bytes) => Ok(()),
        _ => Err(mismatch()),
    }
}

/// Check the whole content of `entry`.
pub fn verify_whole(entry: &Entry, bytes: &[u8]) -> Result<(), IndexError> {
    if entry.kind != EntryKind::File {
        return Err(IndexError::NotAFile {
            path: entry.path.to_string(),
        });
    }
    let ok =
        bytes.len() as u64 == entry.size && entry.sha256.is_some_and(|e| e == Sha256::of(bytes));
    if ok {
        Ok(())
    } else {
        Err(IndexError::DigestMismatch {
            path: entry.path.to_string(),
            chunk: None,
        })
    }
}
