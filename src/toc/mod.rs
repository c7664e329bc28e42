//! Table-of-contents layers: eStargz and zstd:chunked images read lazily as they are.
//!
//! Owns the formats whose layers carry their own table of contents (TOC) and need no side
//! index: finding the TOC from the descriptor's annotations or the blob's footer, fetching
//! and verifying just it by range, turning it into the [`LayerIndex`] entry table the
//! unpacker takes (plus where each file's chunks sit in the blob, [`TocLayer::chunks`]), and
//! reading a file range back from the independently compressed chunks (`TocLayerReader`).
//! It never touches the placeholder tree or the fanotify group, and it does not build or
//! store checkpoint indexes: that is [`crate::index`].
//!
//! Formats are told apart by the layer's media type first (gzip: eStargz; zstd:
//! zstd:chunked, in containers/storage's TOC dialect or stargz-snapshotter's, which carries
//! eStargz's TOC JSON and annotation), then by its annotations, then by its footer
//! ([`detect`], [`load`]). A TOC that does not read is an error here; the caller
//! ([`crate::image`]) then streams the layer instead.
//!
//! Common shape of both formats: every regular file's content is split into chunks, each an
//! independent gzip member (eStargz) or zstd frame (zstd:chunked) starting at a known blob
//! offset, with a sha256 per chunk in the TOC. A range read fetches the members or frames
//! covering it with one range request, inflates each one whole, checks each chunk's digest
//! and slices the wanted bytes: nothing reaches the engine unverified.

use oci_spec::image::Descriptor;

use crate::blobcache::BlobCache;
use crate::index::{Compression, LayerIndex};
use crate::registry::{self, BlobStore};

pub mod estargz;
mod source;
pub mod zstd_chunked;

pub use source::{TocLayerReader, verify_for};

/// Largest chunk accepted (uncompressed), in either format: a fill inflates one chunk into
/// memory, so a TOC must not be able to make that unbounded.
pub const MAX_CHUNK_LEN: u64 = 256 << 20;

/// Furthest into its gzip member a chunk may start (eStargz `innerOffset`). Writers put
/// several small files in one member (`--estargz-min-chunk-size`), never megabytes of them;
/// a TOC saying more would make one read inflate that much before the chunk comes out (a
/// decompression bomb: a small member of zeros inflates a thousandfold).
pub const MAX_INNER_OFFSET: u64 = 64 << 20;

/// Errors while finding, fetching or reading a layer's table of contents.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    /// Reading the blob failed.
    #[error("layer {layer}: reading {what}")]
    Registry {
        /// The layer digest.
        layer: String,
        /// What was being read.
        what: &'static str,
        /// The registry error.
        #[source]
        source: Box<registry::Error>,
    },
    /// The footer is missing or points nowhere sensible.
    #[error("layer {layer}: bad TOC footer: {reason}")]
    Footer {
        /// The layer digest.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// The TOC does not parse or describes an impossible layout.
    #[error("layer {layer}: corrupt TOC: {reason}")]
    Corrupt {
        /// The layer digest.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// The TOC's digest is not the one the layer's annotation names.
    #[error("layer {layer}: TOC digest {found} does not match the annotation's {expected}")]
    DigestMismatch {
        /// The layer digest.
        layer: String,
        /// The digest the annotation names.
        expected: String,
        /// The digest of the TOC as fetched.
        found: String,
    },
    /// The TOC exceeds a size limit (a hostile or broken layer).
    #[error("layer {layer}: {what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The layer digest.
        layer: String,
        /// Which part.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A TOC annotation on the layer descriptor does not parse or does not fit the blob.
    #[error("layer {layer}: annotation {key}: {reason}")]
    Annotation {
        /// The layer digest.
        layer: String,
        /// The annotation key.
        key: &'static str,
        /// Its value, and what is wrong with it.
        reason: String,
    },
}

/// The TOC format a layer descriptor announces (no I/O), read in this order: the media
/// type's compression first (only gzip and zstd layers can carry a TOC), then the
/// annotations that fit that compression. `None` when it announces none (a footer may
/// still show one: [`load`] probes for it).
///
/// - gzip (OCI or Docker schema 2) with `containerd.io/snapshot/stargz/toc.digest`: eStargz;
/// - zstd with that same annotation: zstd:chunked as stargz-snapshotter writes it
///   ([`TocFormat::EstargzZstd`]: the eStargz TOC JSON in a zstd:chunked footer's frame);
/// - zstd with a `zstd-chunked.manifest-position` annotation: zstd:chunked as
///   containers/storage writes it;
/// - anything else, including a gzip layer with zstd:chunked annotations or a plain tar
///   with any of them: no TOC (such a layer is indexed by streaming it).
pub fn detect(desc: &Descriptor) -> Option<TocFormat> {
    let ann = desc.annotations().as_ref()?;
    let stargz = ann.contains_key(estargz::TOC_DIGEST_ANNOTATION);
    match Compression::from_media_type(desc.media_type().as_ref())? {
        Compression::Gzip => stargz.then_some(TocFormat::Estargz),
        Compression::Zstd if stargz => Some(TocFormat::EstargzZstd),
        Compression::Zstd => zstd_chunked::detect(desc).then_some(TocFormat::ZstdChunked),
        Compression::None => None,
    }
}

/// The TOC layer behind `desc`, or `None` when the layer has no TOC. With an annotation
/// (see [`detect`]) the TOC is fetched and verified against it; a gzip or zstd layer
/// without one costs one range read of its last [`estargz::FOOTER_SIZE`] (gzip) or
/// [`zstd_chunked::FOOTER_READ`] (zstd) bytes to look for a footer (such a TOC is used
/// unverified: nothing names its digest, and its chunk digests still
/// verify every byte read). Reads go to `cache` first when it holds the blob.
pub async fn load(
    store: &BlobStore,
    desc: &Descriptor,
    cache: Option<&BlobCache>,
) -> Result<Option<TocLayer>, TocError> {
    let layer = desc.digest();
    let ann = desc.annotations().as_ref();
    match detect(desc) {
        Some(TocFormat::Estargz) => {
            let want = ann.and_then(|a| a.get(estargz::TOC_DIGEST_ANNOTATION));
            estargz::load(
                store,
                cache,
                layer,
                desc.size(),
                want.map(String::as_str),
                None,
            )
            .await
            .map(Some)
        }
        Some(TocFormat::ZstdChunked | TocFormat::EstargzZstd) => {
            zstd_chunked::load(store, desc, cache).await
        }
        None => {
            let media = desc.media_type().to_string();
            match Compression::from_media_type(&media) {
                // A zstd layer may be zstd:chunked without the annotations: its footer tells.
                Some(Compression::Zstd) => return zstd_chunked::load(store, desc, cache).await,
                Some(Compression::Gzip) => {}
                _ => return Ok(None),
            }
            let size = desc.size();
            let n = estargz::FOOTER_SIZE.min(size);
            // The probe is opportunistic: a layer whose tail cannot be read is left to the
            // ordinary path, which reports what is wrong with it.
            let tail = match crate::blobcache::read_range(cache, store, layer, size - n, n).await {
                Ok(tail) => tail,
                Err(e) => {
                    tracing::debug!(layer = %layer, error = %crate::fill::error_chain(&e), "footer probe failed");
                    return Ok(None);
                }
            };
            if estargz::parse_footer(&tail).is_none() {
                return Ok(None);
            }
            estargz::load(store, cache, layer, size, None, Some(tail))
                .await
                .map(Some)
        }
    }
}

/// The entry table of a TOC layer as a [`LayerIndex`] (`layer` of `blob_size` bytes): no
/// checkpoints, windows or end marks, file bytes are located through [`TocLayer::chunks`].
pub(crate) fn entry_table(
    compression: Compression,
    layer: &str,
    blob_size: u64,
    entries: Vec<crate::index::Entry>,
) -> LayerIndex {
    LayerIndex {
        compression,
        blob_digest: layer.to_string(),
        diff_id: None,
        compressed_size: blob_size,
        uncompressed_size: 0,
        span: 0,
        windows_digest: None,
        windows_size: 0,
        entries,
        checkpoints: Vec::new(),
        end_marks: Vec::new(),
    }
}

/// Which TOC format a layer is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocFormat {
    /// eStargz (stargz-snapshotter): gzip members, `stargz.index.json`, 51-byte footer.
    Estargz,
    /// zstd:chunked (containers/storage): zstd frames, a zstd-compressed manifest in a
    /// skippable frame, located by manifest annotations or the footer.
    ZstdChunked,
    /// zstd:chunked as stargz-snapshotter writes it (`ctr-remote image convert
    /// --zstdchunked`, nerdctl): zstd frames and the zstd:chunked footer and annotations,
    /// but the TOC is eStargz's JSON (`stargz.index.json` format, no `endOffset`, landmark
    /// files), named by the eStargz `toc.digest` annotation.
    EstargzZstd,
}

impl TocFormat {
    /// One word for reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TocFormat::Estargz => "estargz",
            TocFormat::ZstdChunked => "zstd:chunked",
            TocFormat::EstargzZstd => "zstd:chunked (eStargz TOC)",
        }
    }
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
    /// sha256 of the chunk's uncompressed bytes (`chunkDigest`; for a single-chunk file the
    /// file's `digest` when no chunk digest is given). `None` only when the TOC carries
    /// neither.
    pub sha256: Option<crate::digest::Sha256>,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use oci_spec::image::{Descriptor, MediaType};

    use super::*;

    fn desc(media: &str, annotations: &[&str]) -> Descriptor {
        let mut d = Descriptor::new(
            MediaType::from(media),
            1000,
            format!("sha256:{}", "a".repeat(64))
                .parse::<oci_spec::image::Digest>()
                .unwrap(),
        );
        let ann: HashMap<String, String> = annotations
            .iter()
            .map(|k| (k.to_string(), "x".to_string()))
            .collect();
        d.set_annotations(Some(ann));
        d
    }

    #[test]
    fn detect_reads_the_media_type_before_the_annotations() {
        let stargz = estargz::TOC_DIGEST_ANNOTATION;
        let position = zstd_chunked::POSITION_ANNOTATIONS[1];
        let oci_gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
        let docker_gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        let oci_zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
        let cases: [(&str, &[&str], Option<TocFormat>); 9] = [
            (oci_gzip, &[stargz], Some(TocFormat::Estargz)),
            (docker_gzip, &[stargz], Some(TocFormat::Estargz)),
            // stargz-snapshotter's zstd:chunked carries both annotation families.
            (oci_zstd, &[stargz, position], Some(TocFormat::EstargzZstd)),
            (oci_zstd, &[stargz], Some(TocFormat::EstargzZstd)),
            (oci_zstd, &[position], Some(TocFormat::ZstdChunked)),
            // Annotations that do not fit the compression announce nothing.
            (oci_gzip, &[position], None),
            ("application/vnd.oci.image.layer.v1.tar", &[stargz], None),
            ("application/vnd.example.unknown", &[stargz, position], None),
            (oci_zstd, &[], None),
        ];
        for (media, ann, want) in cases {
            assert_eq!(detect(&desc(media, ann)), want, "{media} {ann:?}");
        }
    }
}
