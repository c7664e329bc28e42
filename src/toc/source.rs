//! Reading a TOC layer's file ranges: the chunks covering a range, fetched by one range read,
//! inflated member by member (or frame by frame), each checked against its digest.
//!
//! Owns [`TocLayerReader`] (the [`ContentSource`] of every regular file of a TOC layer,
//! keyed by entry) and [`verify_for`] (what the engine checks a file's bytes against, chosen
//! so that the engine's fill granularity equals the chunks when it can). It never parses a TOC (see
//! [`super::estargz`]) and never touches placeholders.

use std::io::Read;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use oci_spec::image::Digest;

use super::{ChunkCodec, MAX_INNER_OFFSET, TocChunk, TocLayer};
use crate::blobcache::BlobCache;
use crate::fill::{ContentSource, SourceError, Verify};
use crate::registry::BlobStore;

/// The bytes of every regular file of one TOC layer, keyed by the file's entry in
/// `toc.index.entries` (hardlinks resolved): the store, the blob cache, the layer's digest
/// and its TOC.
pub struct TocLayerReader {
    store: Arc<BlobStore>,
    local: Option<BlobCache>,
    layer: Digest,
    toc: Arc<TocLayer>,
}

impl TocLayerReader {
    /// The reader of TOC layer `layer`, reading `local` first when it holds the blob, else
    /// `store`.
    pub fn new(
        store: Arc<BlobStore>,
        local: Option<BlobCache>,
        layer: Digest,
        toc: Arc<TocLayer>,
    ) -> Arc<TocLayerReader> {
        Arc::new(TocLayerReader {
            store,
            local,
            layer,
            toc,
        })
    }

    /// The layer's TOC.
    pub fn toc(&self) -> &TocLayer {
        &self.toc
    }
}

impl TocLayerReader {
    /// Names entry `entry` in errors.
    fn what(&self, entry: usize) -> String {
        let path = self.toc.index.entries.get(entry).map_or("?", |e| &*e.path);
        format!("{path} in layer {}", self.layer)
    }
}

/// What the engine checks a TOC file's bytes against: the chunk digests when the chunks are
/// uniform (every chunk but the last of one size, the last no longer, that size at least the
/// engine's smallest fill of 4 KiB: the engine then fills chunk by chunk, each member fetched
/// once), the file digest for a file of one chunk, else nothing (the source checks every
/// chunk itself; zstd:chunked's content-defined chunks always land here).
pub fn verify_for(toc: &TocLayer, entry: usize) -> Verify {
    let Some(chunks) = toc.chunks.get(entry) else {
        return Verify::None;
    };
    match chunks.as_slice() {
        [] | [_] if whole_digest(toc, entry).is_some() => Verify::Source { chunk: None },
        [] | [_] => Verify::None,
        [first, ..] => {
            let size = first.len;
            let uniform = size >= 4096
                && chunks.iter().enumerate().all(|(i, c)| {
                    c.file_offset == i as u64 * size
                        && (c.len == size || (i + 1 == chunks.len() && c.len <= size))
                        && c.sha256.is_some()
                });
            if uniform {
                Verify::Source { chunk: Some(size) }
            } else {
                Verify::None
            }
        }
    }
}

/// The digest of a file of at most one chunk: its chunk's, else the file's.
fn whole_digest(toc: &TocLayer, entry: usize) -> Option<crate::digest::Sha256> {
    let file_sha = toc.index.entries.get(entry).and_then(|e| e.sha256);
    match toc.chunks.get(entry).map_or(&[][..], Vec::as_slice) {
        [] => file_sha,
        [one] => one.sha256.or(file_sha),
        _ => None,
    }
}

/// Inflates one gzip member or zstd frame, returning its first `want` bytes (fewer when it
/// is shorter).
fn inflate(codec: ChunkCodec, data: &[u8], want: u64) -> std::io::Result<Vec<u8>> {
    // The length comes from the TOC: preallocate no more than a sane chunk.
    let mut out = Vec::with_capacity(want.min(16 << 20) as usize);
    match codec {
        ChunkCodec::GzipMember => {
            flate2::read::GzDecoder::new(data)
                .take(want)
                .read_to_end(&mut out)?;
        }
        ChunkCodec::ZstdFrame => {
            zstd::stream::read::Decoder::with_buffer(data)?
                .single_frame()
                .take(want)
                .read_to_end(&mut out)?;
        }
    }
    Ok(out)
}

/// Inflates the chunks `cs` from `fetched` (the blob from offset `base`) and returns their
/// bytes concatenated, every chunk checked against its digest. Each member is inflated no
/// further than the end of the last chunk of it the read needs (`innerOffset` plus length,
/// the offset at most [`MAX_INNER_OFFSET`]): what the TOC says it yields, never more.
fn chunk_bytes(
    codec: ChunkCodec,
    cs: &[TocChunk],
    base: u64,
    fetched: &[u8],
    what: &str,
) -> Result<Vec<u8>, SourceError> {
    let mut out = Vec::new();
    // Chunks sharing a member (eStargz `innerOffset`) reuse one inflate.
    let mut member: Option<(u64, Vec<u8>)> = None;
    for c in cs {
        let at = || format!("{what}: chunk at file offset {}", c.file_offset);
        if c.zeros {
            out.resize(out.len() + c.len as usize, 0);
            continue;
        }
        let need = match c.inner_offset.checked_add(c.len) {
            Some(n) if c.inner_offset <= MAX_INNER_OFFSET => n,
            _ => {
                return Err(SourceError::new(format!(
                    "{}: the TOC puts it {} bytes into its member (at most {MAX_INNER_OFFSET})",
                    at(),
                    c.inner_offset
                )));
            }
        };
        let reuse = matches!(&member, Some((off, buf)) if *off == c.compressed_offset && buf.len() as u64 >= need);
        if !reuse {
            let lo = (c.compressed_offset - base) as usize;
            let hi = (c.compressed_end - base) as usize;
            // Inflate as far as every chunk of this member that this read needs.
            let need_all = cs
                .iter()
                .filter(|o| o.compressed_offset == c.compressed_offset && !o.zeros)
                .filter(|o| o.inner_offset <= MAX_INNER_OFFSET)
                .filter_map(|o| o.inner_offset.checked_add(o.len))
                .max()
                .unwrap_or(need)
                .max(need);
            let bytes = inflate(codec, &fetched[lo..hi], need_all).map_err(|e| {
                SourceError::with_source(
                    format!(
                        "{}: inflating blob bytes {}..{}",
                        at(),
                        c.compressed_offset,
                        c.compressed_end
                    ),
                    e,
                )
            })?;
            member = Some((c.compressed_offset, bytes));
        }
        let buf = &member.as_ref().expect("member inflated").1;
        let Some(piece) = buf.get(c.inner_offset as usize..need as usize) else {
            return Err(SourceError::new(format!(
                "{}: the member at blob offset {} holds {} bytes, not {need}",
                at(),
                c.compressed_offset,
                buf.len()
            )));
        };
        if let Some(want) = &c.sha256 {
            let got = crate::digest::Sha256::of(piece);
            if got != *want {
                return Err(SourceError::new(format!(
                    "{}: sha256 {got} does not match the TOC's {want}",
                    at()
                )));
            }
        }
        out.extend_from_slice(piece);
    }
    Ok(out)
}

impl ContentSource for TocLayerReader {
    fn read_at(
        &self,
        file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            let entry = file as usize;
            let what = self.what(entry);
            let chunks = self.toc.chunks.get(entry).map_or(&[][..], Vec::as_slice);
            let end = offset + len;
            let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
            let last = chunks.partition_point(|c| c.file_offset < end);
            let cs = &chunks[first..last.max(first)];
            if len == 0 {
                return Ok(Vec::new());
            }
            let covered = cs.first().map(|c| c.file_offset);
            let covered_end = cs.last().map(|c| c.file_offset + c.len);
            if covered > Some(offset) || covered.is_none() || covered_end < Some(end) {
                return Err(SourceError::new(format!(
                    "{what}: bytes {offset}..{end} are not covered by the TOC's chunks"
                )));
            }
            let data: Vec<&TocChunk> = cs.iter().filter(|c| !c.zeros).collect();
            let (base, fetched) = match (data.first(), data.last()) {
                (Some(a), Some(b)) => {
                    let (lo, hi) = (a.compressed_offset, b.compressed_end);
                    let bytes = crate::blobcache::read_range(
                        self.local.as_ref(),
                        &self.store,
                        &self.layer,
                        lo,
                        hi.saturating_sub(lo),
                    )
                    .await
                    .map_err(|e| SourceError::with_source(what.clone(), e))?;
                    (lo, bytes)
                }
                _ => (0, bytes::Bytes::new()),
            };
            let (codec, cs, skip) = (self.toc.codec, cs.to_vec(), offset - covered.unwrap_or(0));
            let all =
                tokio::task::spawn_blocking(move || chunk_bytes(codec, &cs, base, &fetched, &what))
                    .await
                    .map_err(|e| SourceError::with_source(self.what(entry), e))??;
            Ok(all[skip as usize..(skip + len) as usize].to_vec())
        }
        .boxed()
    }

    fn digest(&self, file: u32, piece: u64) -> Option<crate::digest::Sha256> {
        piece_digest(&self.toc, file as usize, piece)
    }
}

/// The TOC's digest of piece `piece` of entry `entry`, as [`verify_for`] pieces it.
fn piece_digest(toc: &TocLayer, entry: usize, piece: u64) -> Option<crate::digest::Sha256> {
    match toc.chunks.get(entry).map_or(&[][..], Vec::as_slice) {
        [] | [_] => (piece == 0).then(|| whole_digest(toc, entry)).flatten(),
        chunks => chunks.get(usize::try_from(piece).ok()?)?.sha256,
    }
}

#[cfg(test)]
pub(super) fn try_chunk_bytes_for_test(
    toc: &TocLayer,
    entry: usize,
    blob: &[u8],
) -> Result<Vec<u8>, SourceError> {
    chunk_bytes(toc.codec, &toc.chunks[entry], 0, blob, "test")
}

#[cfg(test)]
pub(super) fn chunk_bytes_for_test(toc: &TocLayer, entry: usize, blob: &[u8]) -> Vec<u8> {
    try_chunk_bytes_for_test(toc, entry, blob).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Compression, Entry, EntryKind, LayerIndex};

    /// A TOC layer with one regular file cut into chunks of these lengths.
    fn layer(lens: &[u64]) -> TocLayer {
        let mut entry = Entry::new("f", EntryKind::File, 0o644);
        entry.size = lens.iter().sum();
        entry.sha256 = Some(crate::digest::Sha256([0xaa; 32]));
        let mut at = 0;
        let chunks = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let c = TocChunk {
                    file_offset: at,
                    len,
                    compressed_offset: 100 + at,
                    compressed_end: 100 + at + len,
                    inner_offset: 0,
                    // A digest of its own per chunk.
                    sha256: Some(crate::digest::Sha256([0xb0 + i as u8; 32])),
                    zeros: false,
                };
                at += len;
                c
            })
            .collect();
        TocLayer {
            format: super::super::TocFormat::ZstdChunked,
            codec: ChunkCodec::ZstdFrame,
            index: LayerIndex {
                compression: Compression::Zstd,
                blob_digest: String::new(),
                diff_id: None,
                compressed_size: 0,
                uncompressed_size: 0,
                span: 0,
                windows_digest: None,
                windows_size: 0,
                entries: vec![entry],
                checkpoints: Vec::new(),
                end_marks: Vec::new(),
            },
            chunks: vec![chunks],
            prefetch_first: Vec::new(),
            toc_digest: String::new(),
            toc_bytes_fetched: 0,
        }
    }

    /// A crafted TOC and blob: a 1 MiB gzip member of 256 MiB of zeros, and a chunk the TOC
    /// says starts 200 MiB into it. Refused before anything is inflated.
    #[test]
    fn a_chunk_deep_in_a_bomb_member_is_refused_uninflated() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            gz.write_all(&zeros).unwrap();
        }
        let blob = gz.finish().unwrap();
        assert!(blob.len() < 1 << 20);
        let mut toc = layer(&[4096]);
        toc.codec = ChunkCodec::GzipMember;
        toc.chunks[0][0] = TocChunk {
            file_offset: 0,
            len: 4096,
            compressed_offset: 0,
            compressed_end: blob.len() as u64,
            inner_offset: 200 << 20,
            sha256: None,
            zeros: false,
        };
        let t = std::time::Instant::now();
        let r = try_chunk_bytes_for_test(&toc, 0, &blob);
        let took = t.elapsed();
        assert!(
            matches!(&r, Err(e) if e.to_string().contains("into its member")),
            "a chunk 200 MiB into a bomb member was inflated ({} bytes, {took:?})",
            r.map(|v| v.len()).unwrap_or_default()
        );
        assert!(took < std::time::Duration::from_millis(100), "{took:?}");
        // An offset that overflows is refused too, never wrapped.
        toc.chunks[0][0].inner_offset = u64::MAX - 10;
        assert!(try_chunk_bytes_for_test(&toc, 0, &blob).is_err());
    }

    /// The same crafted chunk in TOC JSON: refused when the TOC is read, before any fill.
    #[test]
    fn an_estargz_toc_with_a_deep_inner_offset_is_refused() {
        let deep = 200u64 << 20;
        let j = format!(
            r#"{{"version":1,"entries":[{{"name":"a","type":"reg","size":4096,"offset":5,"innerOffset":{deep}}}]}}"#
        );
        let r = super::super::estargz::parse_toc(j.as_bytes(), "l", 1 << 30, 1 << 29);
        assert!(
            matches!(
                r,
                Err(super::super::TocError::TooLarge {
                    what: "chunk inner offset",
                    ..
                })
            ),
            "a TOC putting a chunk {deep} bytes into its member was accepted: {r:?}"
        );
        let j = j.replace(&deep.to_string(), "4096");
        let toc = super::super::estargz::parse_toc(j.as_bytes(), "l", 1 << 30, 1 << 29).unwrap();
        assert_eq!(toc.chunks[0][0].inner_offset, 4096);
    }

    #[test]
    fn chunk_digests_go_to_the_engine_only_for_uniform_chunks() {
        let mib = 1 << 20;
        let uniform = layer(&[4 * mib, 4 * mib, 100]);
        assert_eq!(
            verify_for(&uniform, 0),
            Verify::Source {
                chunk: Some(4 * mib)
            }
        );
        for piece in 0..3 {
            let want = uniform.chunks[0][piece].sha256;
            assert!(want.is_some());
            assert_eq!(piece_digest(&uniform, 0, piece as u64), want);
        }
        assert_eq!(piece_digest(&uniform, 0, 3), None);
        let one = layer(&[5000]);
        assert_eq!(verify_for(&one, 0), Verify::Source { chunk: None });
        assert!(piece_digest(&one, 0, 0).is_some());
        assert_eq!(piece_digest(&one, 0, 1), None);
        // Content-defined chunks (zstd:chunked), a last chunk longer than the others (seen
        // in a skopeo layer: 1109 + 1897 bytes), chunks below the engine's 4 KiB fill:
        // the source checks each chunk itself.
        for lens in [
            &[14081, 51052, 71269][..],
            &[1109, 1897],
            &[1000, 1000, 500],
        ] {
            assert!(
                matches!(verify_for(&layer(lens), 0), Verify::None),
                "{lens:?}"
            );
        }
    }
}
