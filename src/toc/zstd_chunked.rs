//! zstd:chunked layers (containers/storage): locating, fetching, verifying and parsing the TOC.
//!
//! Owns the zstd:chunked side of [`super`]: where the TOC ("manifest") sits in the blob (the
//! layer descriptor's `manifest-position` annotation, or the footer skippable frame at the
//! blob's end), fetching exactly those bytes with one range read, checking them against the
//! `manifest-checksum` annotation, decompressing them within a size bound, and turning the
//! JSON into a [`TocLayer`]: one [`Entry`] per TOC entry (paths normalised like the index
//! module's, whiteouts kept as `.wh.` names) and each regular file's chunks (its own entry
//! plus the `chunk` entries after it; each chunk is one zstd frame). It never reads file
//! content (that is `TocLayerReader`), never touches placeholders and never stores anything.
//!
//! Both generations of the format are read: annotations `io.github.containers.zstd-chunked.*`
//! (current) and `io.containers.zstd-chunked.*` (containers/image before 5.2x, what Debian's
//! skopeo 1.9 writes); footers of 64 bytes (manifest + tar-split positions, magic
//! `GNUlInUx`) and of 40 bytes (manifest position only, magic `GnUlInUx`). A chunk entry
//! carries no `endOffset`: a chunk's frame ends where the next chunk's starts, and the last
//! one at its file's `endOffset`.
//!
//! Two TOC dialects are read ([`parse_with`]): containers/storage's (above) and
//! stargz-snapshotter's (`ctr-remote image convert --zstdchunked`): the same frames, footer
//! and position annotations around eStargz's TOC JSON, named by eStargz's `toc.digest`
//! annotation, which [`super::estargz`] parses with zstd frames as chunks.
//!
//! Trust: the TOC is verified against the checksum annotation; without one (TOC found through
//! the footer) it is accepted with a warning, and its chunk digests then protect only against
//! corruption in transit, not against a dishonest registry. Every chunk of a multi-chunk file
//! must carry a `chunkDigest` and every non-empty file a `digest`, so nothing reaches the fill
//! engine unverified.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use base64::Engine as _;
use oci_spec::image::Descriptor;
use serde::Deserialize;
use sha2::Digest as _;

use super::{ChunkCodec, TocChunk, TocError, TocFormat, TocLayer};
use crate::blobcache::BlobCache;
use crate::index::{Compression, Entry, EntryKind, normalize_path};
use crate::registry::BlobStore;

/// Annotation keys naming the sha256 of the compressed TOC, current spelling first.
pub const CHECKSUM_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
/// Annotation keys naming the TOC position `offset:length:uncompressed length:type`.
pub const POSITION_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
/// The only TOC type there is (`ManifestTypeCRFS`).
const MANIFEST_TYPE_CRFS: u64 = 1;
/// Largest TOC accepted, compressed or not (256 MiB; a real TOC is a few hundred bytes per
/// file, so this is about 600,000 files).
pub const MAX_TOC_BYTES: u64 = 256 << 20;
/// Bytes read from the blob's end to find a footer: the larger (64-byte) footer with its
/// 8-byte skippable frame header.
pub const FOOTER_READ: u64 = 72;
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const FOOTER_MAGICS: [&[u8; 8]; 2] = [b"GNUlInUx", b"GnUlInUx"];
/// Bytes of the skippable frame header before the TOC (magic + length).
const SKIPPABLE_HEADER: u64 = 8;

/// Where a layer's TOC sits, from the annotations or the footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocPosition {
    /// Blob offset of the compressed TOC (inside its skippable frame).
    pub offset: u64,
    /// Length of the compressed TOC.
    pub len: u64,
    /// Length of the TOC JSON once decompressed.
    pub uncompressed_len: u64,
    /// `sha256:<hex>` the compressed TOC must hash to (`None` when found through the footer).
    pub checksum: Option<String>,
}

impl TocPosition {
    /// The position the descriptor's annotations give, `Ok(None)` when it has none (not an
    /// annotated zstd:chunked layer). Checks it against the blob size and the size limit.
    pub fn from_annotations(
        layer: &str,
        blob_size: u64,
        annotations: &HashMap<String, String>,
    ) -> Result<Option<TocPosition>, TocError> {
        let Some((key, value)) = POSITION_ANNOTATIONS
            .iter()
            .find_map(|k| annotations.get(*k).map(|v| (*k, v)))
        else {
            return Ok(None);
        };
        let bad = |reason: &str| TocError::Annotation {
            layer: layer.to_owned(),
            key,
            reason: format!("{value:?}: {reason}"),
        };
        let fields: Vec<u64> = value
            .split(':')
            .map(|f| f.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("not four decimal integers"))?;
        let [offset, len, uncompressed_len, kind] = fields[..] else {
            return Err(bad("not four decimal integers"));
        };
        if kind != MANIFEST_TYPE_CRFS {
            return Err(bad("unknown manifest type (only 1, CRFS, exists)"));
        }
        let checksum = match CHECKSUM_ANNOTATIONS
            .iter()
            .find_map(|k| annotations.get(*k).map(|v| (*k, v)))
        {
            None => None,
            Some((ckey, cval)) => Some(
                parse_sha256(cval)
                    .map(|h| format!("sha256:{h}"))
                    .ok_or_else(|| TocError::Annotation {
                        layer: layer.to_owned(),
                        key: ckey,
                        reason: format!("{cval:?}: not a sha256 digest"),
                    })?,
            ),
        };
        let pos = TocPosition {
            offset,
            len,
            uncompressed_len,
            checksum,
        };
        pos.check(layer, blob_size).map_err(|e| match e {
            TocError::Footer { reason, .. } => bad(&reason),
            other => other,
        })?;
        Ok(Some(pos))
    }

    /// The position a footer gives: `tail` is the last up to [`FOOTER_READ`] bytes of a blob
    /// of `blob_size` bytes. `Ok(None)` when the tail holds no zstd:chunked footer.
    pub fn from_footer(
        layer: &str,
        blob_size: u64,
        tail: &[u8],
    ) -> Result<Option<TocPosition>, TocError> {
        let le = |b: &[u8], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        // Newest first: a 64-byte payload (manifest, type, tar-split), then the 40-byte one.
        for payload_len in [64usize, 40] {
            let frame_len = payload_len + SKIPPABLE_HEADER as usize;
            if tail.len() < frame_len {
                continue;
            }
            let frame = &tail[tail.len() - frame_len..];
            let declared = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let payload = &frame[8..];
            let magic = &payload[payload_len - 8..];
            if frame[..4] != SKIPPABLE_MAGIC
                || declared as usize != payload_len
                || !FOOTER_MAGICS.iter().any(|m| &m[..] == magic)
            {
                continue;
            }
            if le(payload, 3) != MANIFEST_TYPE_CRFS {
                return Err(TocError::Footer {
                    layer: layer.to_owned(),
                    reason: format!("unknown manifest type {}", le(payload, 3)),
                });
            }
            let pos = TocPosition {
                offset: le(payload, 0),
                len: le(payload, 1),
                uncompressed_len: le(payload, 2),
                checksum: None,
            };
            pos.check(layer, blob_size)?;
            return Ok(Some(pos));
        }
        Ok(None)
    }

    /// The TOC lies inside the blob after its skippable frame header, is not empty and is
    /// within the size limit.
    fn check(&self, layer: &str, blob_size: u64) -> Result<(), TocError> {
        for (what, len) in [
            ("compressed", self.len),
            ("uncompressed", self.uncompressed_len),
        ] {
            if len > MAX_TOC_BYTES {
                return Err(TocError::TooLarge {
                    layer: layer.to_owned(),
                    what,
                    size: len,
                    limit: MAX_TOC_BYTES,
                });
            }
        }
        let bad = |reason: String| TocError::Footer {
            layer: layer.to_owned(),
            reason,
        };
        if self.len == 0 || self.uncompressed_len == 0 {
            return Err(bad("empty TOC".into()));
        }
        if self.offset < SKIPPABLE_HEADER
            || self
                .offset
                .checked_add(self.len)
                .is_none_or(|end| end > blob_size)
        {
            return Err(bad(format!(
                "TOC at {}+{} lies outside the blob ({blob_size} bytes)",
                self.offset, self.len
            )));
        }
        Ok(())
    }
}

/// The digest `sha256:<64 hex>` (or bare hex) names; `None` for anything else.
fn parse_sha256(s: &str) -> Option<crate::digest::Sha256> {
    crate::digest::Sha256::from_hex(s.strip_prefix("sha256:").unwrap_or(s)).ok()
}

/// Whether the descriptor announces a zstd:chunked layer (a `manifest-position`
/// annotation, either spelling).
pub fn detect(desc: &Descriptor) -> bool {
    desc.annotations()
        .as_ref()
        .is_some_and(|a| POSITION_ANNOTATIONS.iter().any(|k| a.contains_key(*k)))
}

/// Reads a zstd:chunked layer's TOC: the position from the descriptor's annotations, or (for
/// a zstd layer without them) from the footer with one range read of the blob's last
/// [`FOOTER_READ`] bytes; then the TOC with one range read, verified and parsed. `Ok(None)`
/// when the layer is not zstd:chunked. Reads go to `cache` first when it holds the blob.
pub(super) async fn load(
    store: &BlobStore,
    desc: &Descriptor,
    cache: Option<&BlobCache>,
) -> Result<Option<TocLayer>, TocError> {
    let digest = desc.digest();
    let layer = digest.to_string();
    let blob_size = desc.size();
    let fetch = |offset: u64, len: u64, what: &'static str| {
        let layer = layer.clone();
        async move {
            crate::blobcache::read_range(cache, store, digest, offset, len)
                .await
                .map_err(|source| TocError::Registry {
                    layer,
                    what,
                    source: Box::new(source),
                })
        }
    };
    let empty = HashMap::new();
    let annotations = desc.annotations().as_ref().unwrap_or(&empty);
    let mut fetched = 0u64;
    let position = match TocPosition::from_annotations(&layer, blob_size, annotations)? {
        Some(p) => p,
        None => {
            let zstd_layer =
                Compression::from_media_type(desc.media_type().as_ref()) == Some(Compression::Zstd);
            if !zstd_layer || blob_size < FOOTER_READ {
                return Ok(None);
            }
            let tail = fetch(
                blob_size - FOOTER_READ,
                FOOTER_READ,
                "the last bytes (footer probe)",
            )
            .await?;
            fetched += FOOTER_READ;
            match TocPosition::from_footer(&layer, blob_size, &tail)? {
                Some(p) => {
                    tracing::warn!(
                        layer = %layer,
                        "zstd:chunked layer without a manifest-checksum annotation: its TOC is unverified"
                    );
                    p
                }
                None => return Ok(None),
            }
        }
    };
    let compressed = fetch(position.offset, position.len, "the zstd:chunked TOC").await?;
    fetched += position.len;
    let stargz = annotations
        .get(super::estargz::TOC_DIGEST_ANNOTATION)
        .map(String::as_str);
    let mut toc = parse_with(&layer, blob_size, &position, &compressed, stargz)?;
    toc.toc_bytes_fetched = fetched;
    Ok(Some(toc))
}

/// Verifies the compressed TOC of a layer against `position` (length, checksum),
/// decompresses it within [`MAX_TOC_BYTES`] and parses it. `toc_bytes_fetched` is set to the
/// TOC's length (the caller adds any footer read).
pub fn parse(
    layer: &str,
    blob_size: u64,
    position: &TocPosition,
    compressed: &[u8],
) -> Result<TocLayer, TocError> {
    parse_with(layer, blob_size, position, compressed, None)
}

/// [`parse`], reading the TOC in either JSON dialect: containers/storage's (regular files
/// and chunks carry `endOffset`) or stargz-snapshotter's eStargz JSON
/// ([`TocFormat::EstargzZstd`]). The eStargz dialect is taken when `stargz_digest` (the
/// layer's `containerd.io/snapshot/stargz/toc.digest` annotation) is given, and then the
/// decompressed JSON must hash to it; without the annotation, when no entry carries an
/// `endOffset` while some regular file has content ([`is_estargz_json`]).
pub fn parse_with(
    layer: &str,
    blob_size: u64,
    position: &TocPosition,
    compressed: &[u8],
    stargz_digest: Option<&str>,
) -> Result<TocLayer, TocError> {
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(compressed)));
    if let Some(expected) = &position.checksum
        && *expected != digest
    {
        return Err(TocError::DigestMismatch {
            layer: layer.to_owned(),
            expected: expected.clone(),
            found: digest,
        });
    }
    let decompress_err = |reason: String| TocError::Corrupt {
        layer: layer.to_owned(),
        reason: format!("zstd:chunked TOC does not decompress: {reason}"),
    };
    if compressed.len() as u64 != position.len {
        return Err(decompress_err(format!(
            "{} bytes fetched, {} expected",
            compressed.len(),
            position.len
        )));
    }
    let limit = position.uncompressed_len.min(MAX_TOC_BYTES);
    let mut json = Vec::new();
    zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| decompress_err(e.to_string()))?
        .take(limit + 1)
        .read_to_end(&mut json)
        .map_err(|e| decompress_err(e.to_string()))?;
    if json.len() as u64 != position.uncompressed_len {
        return Err(decompress_err(format!(
            "{} bytes announced, {}{} found",
            position.uncompressed_len,
            if json.len() as u64 > limit {
                "more than "
            } else {
                ""
            },
            json.len().min(limit as usize)
        )));
    }
    if stargz_digest.is_some() || is_estargz_json(&json) {
        let found = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&json)));
        if let Some(want) = stargz_digest
            && want != found
        {
            return Err(TocError::DigestMismatch {
                layer: layer.to_owned(),
                expected: want.to_owned(),
                found,
            });
        }
        // The chunk frames end, at the latest, where the TOC's skippable frame starts.
        let toc_frame = position.offset - SKIPPABLE_HEADER;
        let mut toc = super::estargz::parse_toc_as(
            &json,
            layer,
            blob_size,
            toc_frame,
            ChunkCodec::ZstdFrame,
        )?;
        toc.toc_digest = digest;
        toc.toc_bytes_fetched = position.len;
        return Ok(toc);
    }
    let raw: RawToc = serde_json::from_slice(&json).map_err(|e| TocError::Corrupt {
        layer: layer.to_owned(),
        reason: format!("zstd:chunked TOC JSON: {e}"),
    })?;
    drop(json);
    if raw.version != 1 {
        return Err(TocError::Corrupt {
            layer: layer.to_owned(),
            reason: format!("zstd:chunked TOC version {} (only 1 is known)", raw.version),
        });
    }
    let (entries, chunks) = convert(layer, blob_size, raw.entries)?;
    Ok(TocLayer {
        format: TocFormat::ZstdChunked,
        codec: ChunkCodec::ZstdFrame,
        index: super::entry_table(Compression::Zstd, layer, blob_size, entries),
        chunks,
        prefetch_first: Vec::new(),
        toc_digest: digest,
        toc_bytes_fetched: position.len,
    })
}

/// Whether TOC JSON is in stargz-snapshotter's dialect: no entry names an `endOffset`,
/// while at least one regular file has content (containers/storage gives every such file
/// one). JSON that does not parse is not.
pub fn is_estargz_json(json: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Sniff {
        #[serde(default)]
        entries: Vec<SniffEntry>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct SniffEntry {
        #[serde(rename = "type", default)]
        kind: String,
        #[serde(default)]
        size: i64,
        #[serde(default)]
        end_offset: Option<i64>,
    }
    let Ok(doc) = serde_json::from_slice::<Sniff>(json) else {
        return false;
    };
    doc.entries.iter().all(|e| e.end_offset.is_none())
        && doc.entries.iter().any(|e| e.kind == "reg" && e.size > 0)
}

/// The TOC JSON (containers/storage `minimal.TOC`); unknown fields are ignored.
#[derive(Deserialize)]
struct RawToc {
    version: i64,
    #[serde(default)]
    entries: Vec<RawEntry>,
}

/// One TOC entry (containers/storage `minimal.FileMetadata`, CRFS-compatible names).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    uid: i64,
    #[serde(default)]
    gid: i64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default)]
    dev_major: i64,
    #[serde(default)]
    dev_minor: i64,
    #[serde(default)]
    xattrs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    end_offset: i64,
    #[serde(default)]
    chunk_size: i64,
    #[serde(default)]
    chunk_offset: i64,
    #[serde(default)]
    chunk_digest: Option<String>,
    #[serde(default)]
    chunk_type: Option<String>,
}

/// A regular file whose chunk entries are still being collected.
struct OpenFile {
    entry: usize,
    name: String,
    end_offset: u64,
    /// Per chunk: the chunk and the `endOffset` its own entry gave (0 when none).
    chunks: Vec<(TocChunk, u64)>,
}

/// TOC entries to the entry table and per-file chunks, checking every offset and length.
fn convert(
    layer: &str,
    blob_size: u64,
    raw: Vec<RawEntry>,
) -> Result<(Vec<Entry>, Vec<Vec<TocChunk>>), TocError> {
    let mut entries: Vec<Entry> = Vec::with_capacity(raw.len());
    let mut chunks: Vec<Vec<TocChunk>> = Vec::with_capacity(raw.len());
    let mut open: Option<OpenFile> = None;
    for (idx, r) in raw.into_iter().enumerate() {
        let bad = |reason: String| TocError::Corrupt {
            layer: layer.to_owned(),
            reason: format!("entry {idx} ({:?}): {reason}", r.name),
        };
        let nonneg =
            |v: i64, what: &str| u64::try_from(v).map_err(|_| bad(format!("negative {what} {v}")));
        if r.kind == "chunk" {
            let Some(file) = open.as_mut() else {
                return Err(bad("chunk entry without a regular file before it".into()));
            };
            if r.name != file.name {
                return Err(bad(format!("chunk of {:?} after {:?}", r.name, file.name)));
            }
            let chunk = chunk_of(&r, nonneg(r.chunk_offset, "chunkOffset")?, &bad)?;
            let end = nonneg(r.end_offset, "endOffset")?;
            file.chunks.push((chunk, end));
            continue;
        }
        if let Some(file) = open.take() {
            chunks[file.entry] = close_file(layer, blob_size, &entries[file.entry], &file)?;
        }
        let path = normalize_path(r.name.as_bytes(), 0)
            .map_err(|_| bad("path escapes the layer root or is not usable".into()))?;
        let kind = match r.kind.as_str() {
            "reg" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "fifo" => EntryKind::Fifo,
            "char" | "block" => {
                let dev = |v: i64, what: &str| {
                    u32::try_from(v).map_err(|_| bad(format!("{what} {v} out of range")))
                };
                let (major, minor) = (dev(r.dev_major, "devMajor")?, dev(r.dev_minor, "devMinor")?);
                if r.kind == "char" {
                    EntryKind::Char { major, minor }
                } else {
                    EntryKind::Block { major, minor }
                }
            }
            other => return Err(bad(format!("unknown entry type {other:?}"))),
        };
        if path.is_empty() && kind != EntryKind::Dir {
            return Err(bad("the layer root is not a directory".into()));
        }
        let mut entry = Entry::new(
            path,
            kind.clone(),
            (nonneg(r.mode, "mode")? & 0o7777) as u32,
        );
        let id = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| bad(format!("{what} {v} out of range")))
        };
        entry.uid = id(r.uid, "uid")?;
        entry.gid = id(r.gid, "gid")?;
        if let Some(t) = r.modtime.as_deref() {
            (entry.mtime, entry.mtime_nsec) = super::estargz::parse_rfc3339(t)
                .ok_or_else(|| bad(format!("modtime {t:?} is not RFC 3339")))?;
        }
        if let Some(x) = &r.xattrs {
            let mut xattrs = Vec::with_capacity(x.len());
            for (k, v) in x {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|_| bad(format!("xattr {k:?} is not base64")))?;
                xattrs.push((k.clone(), value));
            }
            entry.xattrs = xattrs.into();
        }
        match kind {
            EntryKind::Symlink => {
                if r.link_name.is_empty() {
                    return Err(bad("symlink without a target".into()));
                }
                entry.link = Some(r.link_name.as_str().into());
            }
            EntryKind::Hardlink => {
                let target = normalize_path(r.link_name.as_bytes(), 0)
                    .ok()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad(format!("unusable hardlink target {:?}", r.link_name)))?;
                entry.link = Some(target.into());
            }
            _ => {}
        }
        let pos = entries.len();
        if kind == EntryKind::File {
            entry.size = nonneg(r.size, "size")?;
            if entry.size > 0 {
                let digest = r
                    .digest
                    .as_deref()
                    .ok_or_else(|| bad("non-empty file without a digest".into()))?;
                entry.sha256 = Some(
                    parse_sha256(digest).ok_or_else(|| bad(format!("bad digest {digest:?}")))?,
                );
                let end_offset = nonneg(r.end_offset, "endOffset")?;
                let mut first = if r.chunk_size > 0 {
                    chunk_of(&r, 0, &bad)?
                } else {
                    // One chunk: the whole file in one frame, verified by the file digest.
                    TocChunk {
                        file_offset: 0,
                        len: entry.size,
                        compressed_offset: nonneg(r.offset, "offset")?,
                        compressed_end: 0,
                        inner_offset: 0,
                        sha256: entry.sha256,
                        zeros: false,
                    }
                };
                first.file_offset = 0;
                open = Some(OpenFile {
                    entry: pos,
                    name: r.name.clone(),
                    end_offset,
                    chunks: vec![(first, 0)],
                });
            }
        } else if r.size != 0 {
            return Err(bad(format!("{} entry with size {}", r.kind, r.size)));
        }
        entries.push(entry);
        chunks.push(Vec::new());
    }
    if let Some(file) = open.take() {
        chunks[file.entry] = close_file(layer, blob_size, &entries[file.entry], &file)?;
    }
    Ok((entries, chunks))
}

/// A chunk from an entry's `chunk*` fields (`offset`, `chunkSize`, `chunkDigest`,
/// `chunkType`); `compressed_end` is filled in by [`close_file`].
fn chunk_of(
    r: &RawEntry,
    file_offset: u64,
    bad: &dyn Fn(String) -> TocError,
) -> Result<TocChunk, TocError> {
    let len = u64::try_from(r.chunk_size)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| bad(format!("chunkSize {} is not positive", r.chunk_size)))?;
    let compressed_offset =
        u64::try_from(r.offset).map_err(|_| bad(format!("negative offset {}", r.offset)))?;
    let zeros = match r.chunk_type.as_deref() {
        None | Some("") => false,
        Some("zeros") => true,
        Some(other) => return Err(bad(format!("unknown chunkType {other:?}"))),
    };
    let sha256 = match r.chunk_digest.as_deref() {
        Some(d) => Some(parse_sha256(d).ok_or_else(|| bad(format!("bad chunkDigest {d:?}")))?),
        None if zeros => None,
        None => return Err(bad("chunk without a chunkDigest".into())),
    };
    Ok(TocChunk {
        file_offset,
        len,
        compressed_offset,
        compressed_end: 0,
        inner_offset: 0,
        sha256,
        zeros,
    })
}

/// Worst-case size of a zstd frame holding `len` bytes (`ZSTD_COMPRESSBOUND` plus the frame
/// header and checksum): a chunk spanning more compressed bytes than this is not one frame of
/// its content.
fn frame_bound(len: u64) -> u64 {
    let small = if len < (128 << 10) {
        ((128 << 10) - len) >> 11
    } else {
        0
    };
    len.saturating_add(len >> 8)
        .saturating_add(small)
        .saturating_add(32)
}

/// Finishes a file: each chunk's frame ends where the next chunk's starts (or where its own
/// entry says), the last at the file's `endOffset`; the chunks must tile `0..size` and every
/// frame must lie inside the blob and be no larger than its content can compress to.
fn close_file(
    layer: &str,
    blob_size: u64,
    entry: &Entry,
    file: &OpenFile,
) -> Result<Vec<TocChunk>, TocError> {
    let bad = |reason: String| TocError::Corrupt {
        layer: layer.to_owned(),
        reason: format!("entry {} ({:?}): {reason}", file.entry, file.name),
    };
    let n = file.chunks.len();
    // Where the first frame after chunk `i` starts (the file's end when there is none).
    let next_frame = |i: usize| {
        file.chunks[i + 1..]
            .iter()
            .map(|(c, _)| c.compressed_offset)
            .find(|&o| o != 0)
            .unwrap_or(file.end_offset)
    };
    let mut out = Vec::with_capacity(n);
    let mut expect_offset = 0u64;
    for i in 0..n {
        let (mut chunk, own_end) = file.chunks[i].clone();
        if chunk.file_offset != expect_offset {
            return Err(bad(format!(
                "chunk {i} starts at file offset {}, expected {expect_offset}",
                chunk.file_offset
            )));
        }
        if chunk.len > super::MAX_CHUNK_LEN {
            return Err(TocError::TooLarge {
                layer: layer.to_owned(),
                what: "zstd:chunked chunk",
                size: chunk.len,
                limit: super::MAX_CHUNK_LEN,
            });
        }
        expect_offset = chunk
            .file_offset
            .checked_add(chunk.len)
            .filter(|&e| e <= entry.size)
            .ok_or_else(|| {
                bad(format!(
                    "chunk {i} runs past the file's {} bytes",
                    entry.size
                ))
            })?;
        if chunk.zeros && chunk.compressed_offset == 0 {
            // No frame in the blob: an empty span where the previous frame ended.
            let at = out
                .last()
                .map(|c: &TocChunk| c.compressed_end)
                .unwrap_or_else(|| next_frame(i));
            (chunk.compressed_offset, chunk.compressed_end) = (at, at);
            out.push(chunk);
            continue;
        }
        chunk.compressed_end = if own_end > 0 { own_end } else { next_frame(i) };
        let span = chunk.compressed_end.checked_sub(chunk.compressed_offset);
        if chunk.compressed_offset == 0
            || chunk.compressed_end > blob_size
            || span.is_none_or(|s| s == 0 || s > frame_bound(chunk.len))
        {
            return Err(bad(format!(
                "chunk {i}: frame {}..{} is not a frame of {} bytes inside the blob ({blob_size} bytes)",
                chunk.compressed_offset, chunk.compressed_end, chunk.len
            )));
        }
        out.push(chunk);
    }
    if expect_offset != entry.size {
        return Err(bad(format!(
            "chunks cover {expect_offset} of the file's {} bytes",
            entry.size
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estargz_json_is_told_from_containers_storage_json() {
        let stargz = br#"{"version":1,"entries":[{"name":"a","type":"reg","size":3,"offset":0,"digest":"sha256:00"}]}"#;
        let storage = br#"{"version":1,"entries":[{"name":"a","type":"reg","size":3,"offset":0,"endOffset":9}]}"#;
        let no_content = br#"{"version":1,"entries":[{"name":"d","type":"dir"}]}"#;
        assert!(is_estargz_json(stargz));
        assert!(!is_estargz_json(storage));
        assert!(!is_estargz_json(no_content));
        assert!(!is_estargz_json(b"not json"));
    }

    /// stargz-snapshotter's zstd:chunked: an eStargz TOC compressed in the skippable frame
    /// the annotations point at, chunk frames ending where the next one (or the TOC frame)
    /// starts, the JSON checked against the `toc.digest` annotation.
    #[test]
    fn estargz_toc_in_a_zstd_frame_parses_with_its_digest() {
        let json = br#"{"version":1,"entries":[
            {"name":".no.prefetch.landmark","type":"reg","size":1,"offset":0,"digest":"sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8"},
            {"name":"bin/","type":"dir","mode":493},
            {"name":"bin/a","type":"reg","size":5,"offset":100,"digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
            {"name":"bin/b","type":"reg","size":4,"offset":200,"digest":"sha256:04f8996da763b7a969b1028ee3007569eaf3a635486ddab211d512c85b9df8fb"}
        ]}"#;
        let compressed = zstd::encode_all(&json[..], 3).unwrap();
        let pos = TocPosition {
            offset: 308,
            len: compressed.len() as u64,
            uncompressed_len: json.len() as u64,
            checksum: Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&compressed))
            )),
        };
        let blob_size = 308 + compressed.len() as u64 + 48;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&json[..])));
        let toc = parse_with("l", blob_size, &pos, &compressed, Some(&digest)).unwrap();
        assert_eq!(toc.format, TocFormat::EstargzZstd);
        assert_eq!(toc.codec, ChunkCodec::ZstdFrame);
        assert_eq!(toc.index.compression, Compression::Zstd);
        let paths: Vec<&str> = toc.index.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(paths, ["bin", "bin/a", "bin/b"], "landmarks hidden");
        assert_eq!(toc.chunks[1][0].compressed_end, 200);
        assert_eq!(
            toc.chunks[2][0].compressed_end, 300,
            "the TOC frame's start"
        );
        // Without the annotation, the JSON dialect still tells.
        let unannotated = parse_with("l", blob_size, &pos, &compressed, None).unwrap();
        assert_eq!(unannotated.format, TocFormat::EstargzZstd);
        // A JSON that is not the annotation's is refused.
        let wrong = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            parse_with("l", blob_size, &pos, &compressed, Some(&wrong)),
            Err(TocError::DigestMismatch { .. })
        ));
    }
    use std::io;

    /// A layer skopeo 1.9.3 wrote (`tests/fixtures/make_zstd_chunked.py`, then `skopeo copy
    /// --dest-compress-format zstd:chunked`): old annotation names, 40-byte footer.
    const BLOB: &[u8] = include_bytes!("../../tests/fixtures/zstd-chunked-skopeo19.blob");
    const DESCRIPTOR: &str = include_str!("../../tests/fixtures/zstd-chunked-skopeo19.json");

    fn descriptor() -> Descriptor {
        serde_json::from_str(DESCRIPTOR).unwrap()
    }

    /// The fixture's TOC, found as [`load`] finds it: from the annotations (`footer: false`)
    /// or from the blob's last [`FOOTER_READ`] bytes.
    fn fixture_toc(footer: bool) -> TocLayer {
        let d = descriptor();
        let size = BLOB.len() as u64;
        let pos = if footer {
            let tail = &BLOB[BLOB.len() - FOOTER_READ as usize..];
            TocPosition::from_footer("l", size, tail).unwrap().unwrap()
        } else {
            TocPosition::from_annotations("l", size, d.annotations().as_ref().unwrap())
                .unwrap()
                .unwrap()
        };
        let toc = &BLOB[pos.offset as usize..(pos.offset + pos.len) as usize];
        parse(d.digest().as_ref(), size, &pos, toc).unwrap()
    }

    /// Every file of the layer as an eager reader sees it: the blob is plain zstd + tar.
    fn eager_files() -> HashMap<String, Vec<u8>> {
        let tar_bytes = zstd::decode_all(BLOB).unwrap();
        let mut out = HashMap::new();
        let mut ar = tar::Archive::new(&tar_bytes[..]);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.header().entry_type() == tar::EntryType::Regular {
                let path = normalize_path(&e.path_bytes(), 0).unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                out.insert(path, data);
            }
        }
        out
    }

    #[test]
    fn reads_a_real_layer_from_its_annotations() {
        assert!(detect(&descriptor()));
        let toc = fixture_toc(false);
        // Only the TOC is read: 1091 bytes at 39558, as the annotation says.
        assert_eq!(toc.toc_bytes_fetched, 1091);
        assert_eq!(
            toc.toc_digest,
            "sha256:9f4d953ae12d935ea5aeb912eb86dfd4c038ec39caf5c28237d3402562f2c815"
        );
        assert_eq!(toc.format, TocFormat::ZstdChunked);
        assert_eq!(toc.codec, ChunkCodec::ZstdFrame);
        let ix = &toc.index;
        assert_eq!(ix.compressed_size, BLOB.len() as u64);
        let paths: Vec<&str> = ix.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(
            paths,
            [
                "",
                "etc",
                "etc/hello",
                "etc/empty",
                "etc/link",
                "etc/hard",
                "bin/words",
                "bin/holes",
                "dev/null",
                "run/fifo",
                "gone/.wh.old"
            ]
        );
        let hello = &ix.entries[2];
        assert_eq!(
            (hello.uid, hello.gid, hello.mode, hello.size),
            (1000, 1001, 0o644, 20)
        );
        assert_eq!(hello.mtime, 1_700_000_000);
        assert_eq!(
            *hello.xattrs,
            [
                ("user.bin".to_owned(), vec![1, 0, 0x7f]),
                ("user.note".to_owned(), b"fixture".to_vec())
            ]
        );
        assert_eq!(ix.entries[4].link.as_deref(), Some("hello"));
        assert_eq!(ix.entries[5].kind, EntryKind::Hardlink);
        assert_eq!(ix.entries[5].link.as_deref(), Some("etc/hello"));
        assert_eq!(ix.entries[8].kind, EntryKind::Char { major: 1, minor: 3 });
        assert_eq!(ix.entries[9].kind, EntryKind::Fifo);
        assert!(toc.chunks[3].is_empty(), "empty file has no chunks");
        assert_eq!(
            toc.chunks[6].len(),
            7,
            "bin/words is split by the rolling checksum"
        );
        let holes = &toc.chunks[7];
        assert_eq!(
            holes.iter().map(|c| c.zeros).collect::<Vec<_>>(),
            [false, true, false]
        );

        // Every chunk is one zstd frame whose content hashes to the chunk digest, and the
        // chunks put together are the file an eager reader gets.
        let eager = eager_files();
        for (entry, chunks) in ix.entries.iter().zip(&toc.chunks) {
            if entry.kind != EntryKind::File {
                assert!(chunks.is_empty());
                continue;
            }
            let mut file = Vec::new();
            for c in chunks {
                assert_eq!(c.file_offset, file.len() as u64);
                let frame = &BLOB[c.compressed_offset as usize..c.compressed_end as usize];
                let data = zstd::bulk::decompress(frame, c.len as usize).unwrap();
                assert_eq!(data.len() as u64, c.len);
                if c.zeros {
                    assert!(data.iter().all(|&b| b == 0));
                }
                assert_eq!(
                    Some(crate::digest::Sha256::of(&data)),
                    c.sha256,
                    "{} chunk at {}",
                    entry.path,
                    c.file_offset
                );
                file.extend_from_slice(&data);
            }
            assert_eq!(file, eager[&*entry.path], "{}", entry.path);
            if !file.is_empty() {
                assert_eq!(entry.sha256, Some(crate::digest::Sha256::of(&file)));
            }
        }
    }

    #[test]
    fn finds_the_toc_through_the_old_40_byte_footer() {
        let (by_footer, by_annotations) = (fixture_toc(true), fixture_toc(false));
        assert_eq!(by_footer.toc_digest, by_annotations.toc_digest);
        assert_eq!(by_footer.index.entries, by_annotations.index.entries);
        assert_eq!(by_footer.chunks, by_annotations.chunks);
        let mut d = descriptor();
        d.set_annotations(None);
        assert!(!detect(&d));
    }

    #[test]
    fn reads_the_current_64_byte_footer() {
        let mut payload = Vec::new();
        for v in [1000u64, 200, 900, 1, 1208, 50, 400] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        payload.extend_from_slice(b"GNUlInUx");
        let mut tail = vec![0x50, 0x2a, 0x4d, 0x18];
        tail.extend_from_slice(&64u32.to_le_bytes());
        tail.extend_from_slice(&payload);
        let pos = TocPosition::from_footer("l", 1330, &tail).unwrap().unwrap();
        assert_eq!(
            (pos.offset, pos.len, pos.uncompressed_len),
            (1000, 200, 900)
        );
        assert_eq!(pos.checksum, None);
        // Pointing past the blob, or of another type, is an error, not a guess.
        assert!(matches!(
            TocPosition::from_footer("l", 1100, &tail),
            Err(TocError::Footer { .. })
        ));
        tail[8 + 24] = 2;
        assert!(TocPosition::from_footer("l", 1330, &tail).is_err());
        // Not a footer at all.
        assert_eq!(
            TocPosition::from_footer("l", 1330, &[0u8; 72]).unwrap(),
            None
        );
        assert_eq!(TocPosition::from_footer("l", 1330, &[]).unwrap(), None);
    }

    fn annotations(position: &str, checksum: Option<&str>) -> HashMap<String, String> {
        let mut a = HashMap::new();
        a.insert(POSITION_ANNOTATIONS[0].to_owned(), position.to_owned());
        if let Some(c) = checksum {
            a.insert(CHECKSUM_ANNOTATIONS[0].to_owned(), c.to_owned());
        }
        a
    }

    #[test]
    fn rejects_bad_annotations() {
        let sum = format!("sha256:{}", "ab".repeat(32));
        let ok =
            TocPosition::from_annotations("l", 5000, &annotations("100:200:300:1", Some(&sum)));
        assert_eq!(ok.unwrap().unwrap().checksum.as_deref(), Some(sum.as_str()));
        for (pos, sum) in [
            ("100:200:300", Some(sum.as_str())),
            ("100:200:300:2", Some(&sum)),
            ("a:b:c:d", Some(&sum)),
            ("-1:200:300:1", Some(&sum)),
            ("4900:200:300:1", Some(&sum)),
            ("18446744073709551615:2:300:1", Some(&sum)),
            ("100:0:300:1", Some(&sum)),
            ("100:200:300:1", Some("md5:1234")),
        ] {
            let e = TocPosition::from_annotations("sha256:abc", 5000, &annotations(pos, sum))
                .expect_err(pos);
            let msg = e.to_string();
            assert!(
                msg.contains("sha256:abc") && msg.contains("annotation"),
                "{msg}"
            );
        }
        let huge = format!("100:200:{}:1", MAX_TOC_BYTES + 1);
        assert!(matches!(
            TocPosition::from_annotations("l", 5000, &annotations(&huge, None)),
            Err(TocError::TooLarge { .. })
        ));
        assert_eq!(
            TocPosition::from_annotations("l", 5000, &HashMap::new()).unwrap(),
            None
        );
    }

    /// Parses `json` as the TOC of a 1 MiB blob, annotated with its true checksum.
    fn parse_json(json: &str) -> Result<TocLayer, TocError> {
        let compressed = zstd::encode_all(json.as_bytes(), 3).unwrap();
        let position = TocPosition {
            offset: 1 << 19,
            len: compressed.len() as u64,
            uncompressed_len: json.len() as u64,
            checksum: Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&compressed))
            )),
        };
        parse("sha256:layer", 1 << 20, &position, &compressed)
    }

    fn reg(extra: &str) -> String {
        let d = "ab".repeat(32);
        format!(
            r#"{{"type":"reg","name":"f","size":100,"digest":"sha256:{d}","offset":100,"endOffset":200{extra}}}"#
        )
    }

    #[test]
    fn parses_a_minimal_toc() {
        let toc = parse_json(&format!(r#"{{"version":1,"entries":[{}]}}"#, reg(""))).unwrap();
        assert_eq!(toc.chunks[0].len(), 1);
        let c = &toc.chunks[0][0];
        assert_eq!(
            (c.file_offset, c.len, c.compressed_offset, c.compressed_end),
            (0, 100, 100, 200)
        );
        assert_eq!(c.sha256, Some(crate::digest::Sha256([0xab; 32])));
    }

    #[test]
    fn rejects_malformed_tocs_with_clear_errors() {
        let d = "cd".repeat(32);
        let chunk = |off: u64, co: u64, size: u64| {
            format!(
                r#"{{"type":"chunk","name":"f","offset":{off},"chunkOffset":{co},"chunkSize":{size},"chunkDigest":"sha256:{d}"}}"#
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "TOC JSON"),
            (r#"{"version":2,"entries":[]}"#.into(), "version 2"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg("").replace(r#""size":100"#, r#""size":300000000"#)), "zstd:chunked chunk of 300000000 bytes exceeds the limit"),
            (r#"{"version":1,"entries":[{"type":"weird","name":"x"}]}"#.into(), "unknown entry type"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, chunk(100, 0, 10)), "without a regular file"),
            (r#"{"version":1,"entries":[{"type":"dir","name":"../etc"}]}"#.into(), "escapes"),
            (r#"{"version":1,"entries":[{"type":"reg","name":"x","size":-5}]}"#.into(), "negative size"),
            (r#"{"version":1,"entries":[{"type":"reg","name":"x","size":5,"offset":10,"endOffset":30}]}"#.into(), "without a digest"),
            (r#"{"version":1,"entries":[{"type":"symlink","name":"x"}]}"#.into(), "without a target"),
            (r#"{"version":1,"entries":[{"type":"hardlink","name":"x","linkName":"/"}]}"#.into(), "hardlink target"),
            (r#"{"version":1,"entries":[{"type":"dir","name":"x","modtime":"yesterday"}]}"#.into(), "RFC 3339"),
            (r#"{"version":1,"entries":[{"type":"dir","name":"x","xattrs":{"user.a":"!!"}}]}"#.into(), "not base64"),
            (r#"{"version":1,"entries":[{"type":"dir","name":"x","uid":-1}]}"#.into(), "uid"),
            (r#"{"version":1,"entries":[{"type":"char","name":"x","devMajor":5000000000}]}"#.into(), "devMajor"),
            (r#"{"version":1,"entries":[{"type":"symlink","name":".","linkName":"x"}]}"#.into(), "root"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg(r#","offset":0"#).replace(r#""offset":100,"#, "")), "not a frame"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg("").replace("200}", "2000000}")), "inside the blob"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg("").replace("200}", "900}")), "not a frame of 100 bytes"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg("").replace("200}", "50}")), "not a frame"),
            (format!(r#"{{"version":1,"entries":[{},{}]}}"#, reg(&format!(r#","chunkSize":40,"chunkDigest":"sha256:{d}""#)), chunk(150, 50, 60)), "starts at file offset 50, expected 40"),
            (format!(r#"{{"version":1,"entries":[{},{}]}}"#, reg(&format!(r#","chunkSize":40,"chunkDigest":"sha256:{d}""#)), chunk(150, 40, 70)), "runs past"),
            (format!(r#"{{"version":1,"entries":[{},{}]}}"#, reg(&format!(r#","chunkSize":40,"chunkDigest":"sha256:{d}""#)), chunk(150, 40, 50)), "cover 90 of the file's 100"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg(r#","chunkSize":40,"chunkDigest":"sha256:zz""#)), "bad chunkDigest"),
            (format!(r#"{{"version":1,"entries":[{}]}}"#, reg(r#","chunkSize":100,"chunkType":"ones""#)), "unknown chunkType"),
            (format!(r#"{{"version":1,"entries":[{},{}]}}"#, reg(&format!(r#","chunkSize":40,"chunkDigest":"sha256:{d}""#)), chunk(150, 40, 60).replace(r#""name":"f""#, r#""name":"g""#)), r#"chunk of "g" after "f""#),
        ];
        for (json, want) in cases {
            let err = parse_json(&json).expect_err(&json);
            let msg = format!("{err}: {}", err_chain(&err));
            assert!(msg.contains(want), "{json}\n  gave: {msg}\n  want: {want}");
            assert!(msg.contains("sha256:layer"), "{msg}");
        }
    }

    fn err_chain(e: &dyn std::error::Error) -> String {
        let mut out = String::new();
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }

    #[test]
    fn refuses_a_checksum_mismatch_and_a_toc_bomb() {
        let pos = TocPosition::from_annotations(
            "sha256:layer",
            BLOB.len() as u64,
            descriptor().annotations().as_ref().unwrap(),
        )
        .unwrap()
        .unwrap();
        let toc = &BLOB[pos.offset as usize..(pos.offset + pos.len) as usize];
        assert!(parse("sha256:layer", BLOB.len() as u64, &pos, toc).is_ok());
        let mut bad = pos.clone();
        bad.checksum = Some(format!("sha256:{}", "00".repeat(32)));
        let err = parse("sha256:layer", BLOB.len() as u64, &bad, toc).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("does not match")
                && msg.contains(&"00".repeat(32))
                && msg.contains("9f4d953a"),
            "{msg}"
        );
        // 256 MiB of JSON whitespace compresses to a few KiB; announced as 100 bytes it is
        // cut off at 101 bytes, never inflated whole.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let block = vec![b' '; 1 << 20];
        for _ in 0..256 {
            io::Write::write_all(&mut enc, &block).unwrap();
        }
        let bomb = enc.finish().unwrap();
        let pos = TocPosition {
            offset: 8,
            len: bomb.len() as u64,
            uncompressed_len: 100,
            checksum: None,
        };
        let err = parse("sha256:layer", 1 << 30, &pos, &bomb).unwrap_err();
        assert!(
            err.to_string()
                .contains("100 bytes announced, more than 100 found"),
            "{err}"
        );
        // Garbage instead of a zstd frame.
        let pos = TocPosition {
            offset: 8,
            len: 4,
            uncompressed_len: 10,
            checksum: None,
        };
        assert!(matches!(
            parse("sha256:layer", 100, &pos, b"junk"),
            Err(TocError::Corrupt { .. })
        ));
    }
}
