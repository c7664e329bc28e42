//! eStargz: the footer, the `stargz.index.json` TOC, and a writer of eStargz layers.
//!
//! Owns the eStargz format as published by stargz-snapshotter: the 51-byte footer (an empty
//! gzip member whose FEXTRA subfield `SG` holds `%016x` of the TOC offset and `STARGZ`; the
//! legacy 47-byte footer holds the same 22 bytes as the whole extra field), the TOC member (a
//! gzip member holding a tar entry `stargz.index.json`), the JSON entry list and its meaning
//! (`chunk` entries continue the previous `reg`; a member starts at every chunk; entries
//! before `.prefetch.landmark` are prefetched first), and [`write()`], which turns a tar stream
//! into an eStargz blob (used for the project's own test images). The same JSON, with zstd
//! frames for chunks, is the TOC of stargz-snapshotter's zstd:chunked layers
//! (`parse_toc_as`, located and fetched by [`super::zstd_chunked`]). Reading a file's bytes is
//! [`super::TocLayerReader`]; it never fetches anything but the footer and the TOC, and never
//! touches placeholders.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{ChunkCodec, MAX_CHUNK_LEN, MAX_INNER_OFFSET, TocChunk, TocError, TocFormat, TocLayer};
use crate::blobcache::BlobCache;
use crate::index::{Compression, Entry, EntryKind};
use crate::registry::BlobStore;

/// Layer annotation holding the sha256 digest of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation holding the size of the uncompressed layer (written by [`write()`]'s
/// callers; informational here).
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Name of the TOC's tar entry.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Entry marking the end of the files to prefetch first.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Entry saying there is nothing to prefetch first.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Largest compressed TOC member read (bytes between the TOC offset and the footer).
pub const MAX_TOC_COMPRESSED: u64 = 64 << 20;
/// Largest TOC JSON accepted, uncompressed.
pub const MAX_TOC_JSON: u64 = 128 << 20;
/// Most TOC entries accepted.
pub const MAX_TOC_ENTRIES: usize = 1 << 21;
/// Chunk size of [`write()`] by default (stargz-snapshotter's default).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// One TOC entry as in `stargz.index.json` (field names as the format spells them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link_name: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group_name: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(rename = "NumLink", default, skip_serializing_if = "is_zero")]
    num_link: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    xattrs: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunk_digest: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    inner_offset: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The TOC document.
#[derive(Debug, Serialize, Deserialize)]
struct JToc {
    version: i64,
    #[serde(deserialize_with = "bounded_entries")]
    entries: Vec<JEntry>,
}

/// Deserialises the entry list, refusing more than [`MAX_TOC_ENTRIES`] as they come.
fn bounded_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<JEntry>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<JEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_TOC_ENTRIES} TOC entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(e) = seq.next_element()? {
                if out.len() == MAX_TOC_ENTRIES {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_TOC_ENTRIES} TOC entries"
                    )));
                }
                out.push(e);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

/// Where a footer says the TOC is: `(toc_offset, footer_len)`, or `None` when `tail` (the
/// last [`FOOTER_SIZE`] bytes of a blob, or fewer for a tiny blob) ends in no eStargz or
/// legacy stargz footer.
pub fn parse_footer(tail: &[u8]) -> Option<(u64, u64)> {
    if tail.len() as u64 >= FOOTER_SIZE {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        if let Some(extra) = empty_member_extra(f)
            && extra.len() == 26
            && &extra[..2] == b"SG"
            && u16::from_le_bytes([extra[2], extra[3]]) == 22
            && let Some(off) = offset_field(&extra[4..])
        {
            return Some((off, FOOTER_SIZE));
        }
    }
    if tail.len() as u64 >= LEGACY_FOOTER_SIZE {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if let Some(extra) = empty_member_extra(f)
            && let Some(off) = offset_field(&extra)
        {
            return Some((off, LEGACY_FOOTER_SIZE));
        }
    }
    None
}

/// `%016x` + `STARGZ` → the offset.
fn offset_field(f: &[u8]) -> Option<u64> {
    if f.len() != 22 || &f[16..] != b"STARGZ" {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&f[..16]).ok()?, 16).ok()
}

/// The FEXTRA field of `member` if it is exactly one gzip member with an empty payload.
fn empty_member_extra(member: &[u8]) -> Option<Vec<u8>> {
    if member.len() < 12 || member[..3] != [0x1f, 0x8b, 8] || member[3] & 4 == 0 {
        return None;
    }
    let mut dec = flate2::read::GzDecoder::new(member);
    let mut out = Vec::new();
    // An empty member: nothing comes out, and a malformed one errors.
    (&mut dec).take(1).read_to_end(&mut out).ok()?;
    if !out.is_empty() {
        return None;
    }
    dec.header()?.extra().map(<[u8]>::to_vec)
}

/// Reads the footer and the TOC of eStargz layer `layer` (`size` bytes) and turns it into a
/// [`TocLayer`]; `want_digest` (the annotation) must match the TOC's sha256 when given.
/// `tail` is the blob's last bytes when the caller already read them (a footer probe).
pub(super) async fn load(
    store: &BlobStore,
    cache: Option<&BlobCache>,
    layer: &oci_spec::image::Digest,
    size: u64,
    want_digest: Option<&str>,
    tail: Option<bytes::Bytes>,
) -> Result<TocLayer, TocError> {
    let lname = layer.to_string();
    let fetch_err = |what: &'static str| {
        let lname = lname.clone();
        move |source| TocError::Registry {
            layer: lname,
            what,
            source: Box::new(source),
        }
    };
    let tail = match tail {
        Some(t) => t,
        None => {
            let n = FOOTER_SIZE.min(size);
            crate::blobcache::read_range(cache, store, layer, size - n, n)
                .await
                .map_err(fetch_err("the eStargz footer"))?
        }
    };
    let (toc_offset, footer_len) = parse_footer(&tail).ok_or_else(|| TocError::Footer {
        layer: lname.clone(),
        reason: "no eStargz footer at the end of the blob".into(),
    })?;
    let toc_end = size - footer_len;
    if toc_offset >= toc_end {
        return Err(TocError::Footer {
            layer: lname.clone(),
            reason: format!("TOC offset {toc_offset} is not before the footer at {toc_end}"),
        });
    }
    let toc_len = toc_end - toc_offset;
    if toc_len > MAX_TOC_COMPRESSED {
        return Err(TocError::TooLarge {
            layer: lname.clone(),
            what: "compressed TOC",
            size: toc_len,
            limit: MAX_TOC_COMPRESSED,
        });
    }
    let member = crate::blobcache::read_range(cache, store, layer, toc_offset, toc_len)
        .await
        .map_err(fetch_err("the eStargz TOC"))?;
    let fetched = tail.len() as u64 + toc_len;
    let json = toc_json(&member).map_err(|reason| TocError::Corrupt {
        layer: lname.clone(),
        reason,
    })?;
    let found = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    if let Some(want) = want_digest
        && want != found
    {
        return Err(TocError::DigestMismatch {
            layer: lname,
            expected: want.to_string(),
            found,
        });
    }
    let mut toc = parse_toc(&json, &lname, size, toc_offset)?;
    toc.toc_digest = found;
    toc.toc_bytes_fetched = fetched;
    Ok(toc)
}

/// Inflates the TOC member and returns the content of its `stargz.index.json` tar entry.
pub(crate) fn toc_json(member: &[u8]) -> Result<Vec<u8>, String> {
    let dec = flate2::read::GzDecoder::new(member);
    // Header block (and a PAX header or two), then the JSON: bounded by the JSON limit.
    let mut tar = tar::Archive::new(dec.take(MAX_TOC_JSON + 64 * 1024));
    let mut entries = tar.entries().map_err(|e| format!("TOC tar: {e}"))?;
    let mut entry = entries
        .next()
        .ok_or("the TOC member holds no tar entry")?
        .map_err(|e| format!("TOC tar header: {e}"))?;
    let path = entry.path_bytes().into_owned();
    if path != TOC_TAR_NAME.as_bytes() {
        return Err(format!(
            "the TOC member's tar entry is {:?}, not {TOC_TAR_NAME}",
            String::from_utf8_lossy(&path)
        ));
    }
    let size = entry.size();
    if size > MAX_TOC_JSON {
        return Err(format!("TOC JSON of {size} bytes exceeds {MAX_TOC_JSON}"));
    }
    let mut json = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| format!("TOC JSON: {e}"))?;
    if json.len() as u64 != size {
        return Err(format!(
            "TOC JSON ends after {} of {size} bytes",
            json.len()
        ));
    }
    Ok(json)
}

/// The digest `sha256:HEX` names, `None` for anything else.
fn sha256_of(d: &Option<String>) -> Option<crate::digest::Sha256> {
    crate::digest::Sha256::from_hex(d.as_deref()?.strip_prefix("sha256:")?).ok()
}

impl JEntry {
    /// The chunk this entry describes (`compressed_end` is filled in once every member's
    /// start is known).
    fn chunk(&self) -> TocChunk {
        TocChunk {
            file_offset: self.chunk_offset,
            len: self.chunk_size,
            compressed_offset: self.offset,
            compressed_end: 0,
            inner_offset: self.inner_offset,
            sha256: sha256_of(&self.chunk_digest),
            zeros: false,
        }
    }
}

/// Parses TOC JSON of eStargz layer `layer` (blob of `blob_size` bytes, TOC member at
/// `toc_offset`).
pub(crate) fn parse_toc(
    json: &[u8],
    layer: &str,
    blob_size: u64,
    toc_offset: u64,
) -> Result<TocLayer, TocError> {
    parse_toc_as(json, layer, blob_size, toc_offset, ChunkCodec::GzipMember)
}

/// Parses eStargz TOC JSON whose chunks are stored as `codec`: gzip members (eStargz) or
/// zstd frames (stargz-snapshotter's zstd:chunked, [`TocFormat::EstargzZstd`], whose TOC
/// frame starts at `toc_offset`). The JSON's meaning is the same in both.
pub(crate) fn parse_toc_as(
    json: &[u8],
    layer: &str,
    blob_size: u64,
    toc_offset: u64,
    codec: ChunkCodec,
) -> Result<TocLayer, TocError> {
    let corrupt = |reason: String| TocError::Corrupt {
        layer: layer.to_string(),
        reason,
    };
    let doc: JToc = serde_json::from_slice(json).map_err(|e| corrupt(format!("TOC JSON: {e}")))?;
    if doc.version != 1 {
        return Err(corrupt(format!(
            "TOC version {} (only 1 is known)",
            doc.version
        )));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(doc.entries.len());
    let mut chunks: Vec<Vec<TocChunk>> = Vec::with_capacity(doc.entries.len());
    let mut landmark: Option<usize> = None;
    // The regular file that `chunk` entries continue (index into `entries`).
    let mut open_reg: Option<usize> = None;
    for (i, j) in doc.entries.into_iter().enumerate() {
        let path = crate::index::normalize_path(j.name.as_bytes(), i as u64)
            .map_err(|e| corrupt(format!("entry {i} ({:?}): {e}", j.name)))?;
        if j.kind == "chunk" {
            let Some(r) = open_reg.filter(|&r| *entries[r].path == *path) else {
                return Err(corrupt(format!(
                    "chunk entry {i} ({path}) does not follow its regular file"
                )));
            };
            chunks[r].push(j.chunk());
            continue;
        }
        open_reg = None;
        if j.kind == "reg" && (path == PREFETCH_LANDMARK || path == NO_PREFETCH_LANDMARK) {
            // Landmarks are markers, not image content (stargz-snapshotter hides them).
            if path == PREFETCH_LANDMARK && landmark.is_none() {
                landmark = Some(entries.len());
            }
            continue;
        }
        let kind = match j.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::File,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "fifo" => EntryKind::Fifo,
            "char" | "block" => {
                let (major, minor) = (
                    u32::try_from(j.dev_major).map_err(|_| {
                        corrupt(format!("entry {path}: device major {}", j.dev_major))
                    })?,
                    u32::try_from(j.dev_minor).map_err(|_| {
                        corrupt(format!("entry {path}: device minor {}", j.dev_minor))
                    })?,
                );
                if j.kind == "char" {
                    EntryKind::Char { major, minor }
                } else {
                    EntryKind::Block { major, minor }
                }
            }
            other => return Err(corrupt(format!("entry {path}: unknown type {other:?}"))),
        };
        let mut e = Entry::new(path.clone(), kind.clone(), (j.mode & 0o7777) as u32);
        e.uid =
            u32::try_from(j.uid).map_err(|_| corrupt(format!("entry {path}: uid {}", j.uid)))?;
        e.gid =
            u32::try_from(j.gid).map_err(|_| corrupt(format!("entry {path}: gid {}", j.gid)))?;
        if let Some(t) = &j.modtime {
            let (s, ns) = parse_rfc3339(t)
                .ok_or_else(|| corrupt(format!("entry {path}: modtime {t:?} is not RFC 3339")))?;
            e.mtime = s;
            e.mtime_nsec = ns;
        }
        if let Some(x) = &j.xattrs {
            let mut xattrs = Vec::with_capacity(x.len());
            for (k, v) in x {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|err| corrupt(format!("entry {path}: xattr {k}: {err}")))?;
                xattrs.push((k.clone(), bytes));
            }
            e.xattrs = xattrs.into();
        }
        match kind {
            EntryKind::Symlink => {
                e.link = Some(
                    j.link_name
                        .clone()
                        .ok_or_else(|| corrupt(format!("symlink {path} has no linkName")))?
                        .into(),
                );
            }
            EntryKind::Hardlink => {
                let target = j
                    .link_name
                    .as_deref()
                    .ok_or_else(|| corrupt(format!("hardlink {path} has no linkName")))?;
                e.link = Some(
                    crate::index::normalize_path(target.as_bytes(), i as u64)
                        .map_err(|err| corrupt(format!("hardlink {path}: {err}")))?
                        .into(),
                );
            }
            _ => {}
        }
        let mut file_chunks = Vec::new();
        if kind == EntryKind::File {
            e.size = j.size;
            e.sha256 = sha256_of(&j.digest);
            if j.size > 0 {
                file_chunks.push(j.chunk());
            }
            open_reg = Some(entries.len());
        }
        entries.push(e);
        chunks.push(file_chunks);
    }
    // Every member starts at a chunk's offset (or at the TOC): a chunk's member ends where
    // the next distinct one starts.
    let mut starts: Vec<u64> = chunks
        .iter()
        .flatten()
        .map(|c| c.compressed_offset)
        .collect();
    starts.push(toc_offset);
    starts.sort_unstable();
    starts.dedup();
    for (e, cs) in entries.iter().zip(chunks.iter_mut()) {
        let n = cs.len();
        let mut prev_start = 0;
        for k in 0..n {
            let end = if k + 1 < n {
                cs[k + 1].file_offset
            } else {
                e.size
            };
            let c = &mut cs[k];
            let want = if k == 0 { 0 } else { c.file_offset };
            if c.file_offset != want
                || end <= c.file_offset
                || (c.len != 0 && c.len != end - c.file_offset)
            {
                return Err(corrupt(format!(
                    "{}: chunk {k} at file offset {} (size {}) does not tile the file of {} bytes",
                    e.path, c.file_offset, c.len, e.size
                )));
            }
            c.len = end - c.file_offset;
            if c.len > MAX_CHUNK_LEN {
                return Err(TocError::TooLarge {
                    layer: layer.to_string(),
                    what: "chunk",
                    size: c.len,
                    limit: MAX_CHUNK_LEN,
                });
            }
            if c.inner_offset > MAX_INNER_OFFSET {
                return Err(TocError::TooLarge {
                    layer: layer.to_string(),
                    what: "chunk inner offset",
                    size: c.inner_offset,
                    limit: MAX_INNER_OFFSET,
                });
            }
            if k > 0 && c.compressed_offset < prev_start {
                return Err(corrupt(format!(
                    "{}: chunk {k} at blob offset {} lies before the chunk it follows",
                    e.path, c.compressed_offset
                )));
            }
            prev_start = c.compressed_offset;
            if c.compressed_offset >= toc_offset {
                return Err(corrupt(format!(
                    "{}: chunk {k} at blob offset {} is not before the TOC at {toc_offset}",
                    e.path, c.compressed_offset
                )));
            }
            let pos = starts.partition_point(|&s| s <= c.compressed_offset);
            c.compressed_end = starts[pos];
        }
        if n == 1 && cs[0].sha256.is_none() {
            cs[0].sha256 = e.sha256;
        }
    }
    let prefetch_first = match landmark {
        Some(l) => (0..l)
            .filter(|&i| entries[i].kind == EntryKind::File)
            .collect(),
        None => Vec::new(),
    };
    let (format, compression) = match codec {
        ChunkCodec::GzipMember => (TocFormat::Estargz, Compression::Gzip),
        ChunkCodec::ZstdFrame => (TocFormat::EstargzZstd, Compression::Zstd),
    };
    Ok(TocLayer {
        format,
        codec,
        index: super::entry_table(compression, layer, blob_size, entries),
        chunks,
        prefetch_first,
        toc_digest: String::new(),
        toc_bytes_fetched: 0,
    })
}

/// Parses an RFC 3339 time (`2006-01-02T15:04:05.999999999Z07:00`) to seconds and
/// nanoseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        (!part.is_empty() && part.bytes().all(|c| c.is_ascii_digit())).then(|| part.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nsec = 0u32;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        for (k, c) in b[start..i].iter().take(9).enumerate() {
            nsec += u32::from(c - b'0') * 10u32.pow(8 - k as u32);
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        b'+' | b'-' if i + 6 == b.len() && b[i + 3] == b':' => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if b[i] == b'-' { -o } else { o }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset, nsec))
}

/// How [`write()`] lays a layer out.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Largest uncompressed chunk of a file in one gzip member.
    pub chunk_size: u64,
    /// Files (paths as in the tar, normalised) to put first, followed by
    /// `.prefetch.landmark`; empty: a `.no.prefetch.landmark` leads the layer.
    pub prefetch: Vec<String>,
    /// gzip level (0-9).
    pub level: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            prefetch: Vec::new(),
            level: 6,
        }
    }
}

/// An eStargz layer blob as [`write()`] made it.
#[derive(Debug, Clone)]
pub struct Written {
    /// The blob (valid multi-member gzip of a valid tar).
    pub blob: Vec<u8>,
    /// `sha256:<hex>` of the TOC JSON: the value of [`TOC_DIGEST_ANNOTATION`].
    pub toc_digest: String,
    /// Offset of the TOC member in the blob.
    pub toc_offset: u64,
    /// `sha256:<hex>` of the uncompressed tar stream (the OCI diff id).
    pub diff_id: String,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
}

/// One member of the input tar, kept for re-emitting.
struct Item {
    header: tar::Header,
    path: String,
    link: Option<String>,
    xattrs: Vec<(String, Vec<u8>)>,
    data: Vec<u8>,
}

fn wio(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Rewrites the tar stream `tar` as an eStargz blob: every entry's header in the current
/// gzip member, every chunk of file data (at most `chunk_size` bytes) starting a new member,
/// the TOC (`stargz.index.json`, with `digest` and `chunkDigest` of everything) in a member
/// of its own, then the 51-byte footer. Files named in `prefetch` (with their parent
/// directories) come first, then `.prefetch.landmark`.
pub fn write(tar_stream: &[u8], opts: &WriteOptions) -> std::io::Result<Written> {
    let chunk_size = opts.chunk_size.max(1);
    // Read the input.
    let mut items = Vec::new();
    let mut ar = tar::Archive::new(tar_stream);
    for e in ar.entries()? {
        let mut e = e?;
        let path =
            crate::index::normalize_path(&e.path_bytes(), 0).map_err(|err| wio("tar path", err))?;
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut xattrs = Vec::new();
        if let Some(pax) = e.pax_extensions()? {
            for rec in pax {
                let rec = rec?;
                if let Some(name) = rec.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.push((name.to_string(), rec.value_bytes().to_vec()));
                }
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        items.push(Item {
            header: e.header().clone(),
            path,
            link,
            xattrs,
            data,
        });
    }
    // Order: prefetched files with their parents, the landmark, the rest.
    let landmark = |name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_mtime(0);
        Item {
            header: h,
            path: name.to_string(),
            link: None,
            xattrs: Vec::new(),
            data: vec![0xf],
        }
    };
    let mut ordered: Vec<Item> = Vec::with_capacity(items.len() + 1);
    if opts.prefetch.is_empty() {
        ordered.push(landmark(NO_PREFETCH_LANDMARK));
        ordered.append(&mut items);
    } else {
        let mut dirs = std::collections::HashSet::new();
        for p in &opts.prefetch {
            let mut cur = p.as_str();
            while let Some((parent, _)) = cur.rsplit_once('/') {
                dirs.insert(parent.to_string());
                cur = parent;
            }
        }
        let mut rest = Vec::new();
        let mut files: Vec<Option<Item>> = opts.prefetch.iter().map(|_| None).collect();
        for it in items {
            let is_dir = it.header.entry_type() == tar::EntryType::Directory;
            if is_dir && dirs.contains(&it.path) {
                ordered.push(it);
            } else if let Some(k) = opts
                .prefetch
                .iter()
                .position(|p| *p == it.path)
                .filter(|_| !is_dir)
            {
                files[k] = Some(it);
            } else {
                rest.push(it);
            }
        }
        ordered.extend(files.into_iter().flatten());
        ordered.push(landmark(PREFETCH_LANDMARK));
        ordered.extend(rest);
    }
    // The uncompressed stream, with where each file's data starts.
    let mut b = tar::Builder::new(Vec::new());
    let mut data_at: Vec<Option<u64>> = Vec::with_capacity(ordered.len());
    for it in &ordered {
        if !it.xattrs.is_empty() {
            let recs: Vec<(String, &[u8])> = it
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let mut h = it.header.clone();
        let kind = h.entry_type();
        match (&it.link, kind) {
            (Some(l), tar::EntryType::Symlink | tar::EntryType::Link) => {
                b.append_link(&mut h, &it.path, l)?;
                data_at.push(None);
            }
            _ => {
                let name = if kind == tar::EntryType::Directory {
                    format!("{}/", it.path)
                } else {
                    it.path.clone()
                };
                b.append_data(&mut h, name, &it.data[..])?;
                let len = b.get_ref().len() as u64;
                let regular = kind.is_file() && !it.data.is_empty();
                data_at.push(regular.then(|| len - (it.data.len() as u64).div_ceil(512) * 512));
            }
        }
    }
    let body = std::mem::take(b.get_mut());
    // Cut the stream where chunks start; each piece is one gzip member.
    let mut cuts: Vec<u64> = Vec::new();
    for (it, at) in ordered.iter().zip(&data_at) {
        if let Some(at) = at {
            let mut o = 0;
            while o < it.data.len() as u64 {
                cuts.push(at + o);
                o += chunk_size;
            }
        }
    }
    let mut blob = Vec::new();
    // Blob offset of the member that starts at each cut.
    let mut offsets = std::collections::HashMap::new();
    let mut start = 0u64;
    for &cut in &cuts {
        if cut > start {
            gzip_member(&mut blob, &body[start as usize..cut as usize], opts.level)?;
        }
        offsets.insert(cut, blob.len() as u64);
        start = cut;
    }
    if (body.len() as u64) > start {
        gzip_member(&mut blob, &body[start as usize..], opts.level)?;
    }
    // The TOC.
    let mut entries = Vec::new();
    for (it, at) in ordered.iter().zip(&data_at) {
        let h = &it.header;
        let kind = match h.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            _ => "reg",
        };
        let mut j = JEntry {
            name: it.path.clone(),
            kind: kind.to_string(),
            modtime: Some(crate::registry::rfc3339_secs(h.mtime().unwrap_or(0) as i64)),
            mode: u64::from(h.mode().unwrap_or(0)),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            link_name: it
                .link
                .clone()
                .filter(|_| matches!(kind, "symlink" | "hardlink")),
            dev_major: u64::from(h.device_major().ok().flatten().unwrap_or(0)),
            dev_minor: u64::from(h.device_minor().ok().flatten().unwrap_or(0)),
            xattrs: (!it.xattrs.is_empty()).then(|| {
                it.xattrs
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            base64::engine::general_purpose::STANDARD.encode(v),
                        )
                    })
                    .collect()
            }),
            ..JEntry::default()
        };
        if kind != "reg" {
            entries.push(j);
            continue;
        }
        j.size = it.data.len() as u64;
        j.digest = Some(format!("sha256:{}", hex::encode(Sha256::digest(&it.data))));
        let Some(at) = at else {
            entries.push(j);
            continue;
        };
        let mut o = 0u64;
        let size = it.data.len() as u64;
        while o < size {
            let len = chunk_size.min(size - o);
            let piece = &it.data[o as usize..(o + len) as usize];
            let mut c = if o == 0 {
                std::mem::take(&mut j)
            } else {
                JEntry {
                    name: it.path.clone(),
                    kind: "chunk".into(),
                    ..JEntry::default()
                }
            };
            c.offset = offsets[&(at + o)];
            c.chunk_offset = o;
            // The last chunk's size is implied (the rest of the file).
            c.chunk_size = if o + len < size { len } else { 0 };
            c.chunk_digest = Some(format!("sha256:{}", hex::encode(Sha256::digest(piece))));
            entries.push(c);
            o += len;
        }
    }
    let json = serde_json::to_vec_pretty(&JToc {
        version: 1,
        entries,
    })
    .map_err(|e| wio("TOC JSON", e))?;
    let toc_offset = blob.len() as u64;
    let mut tb = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(json.len() as u64);
    tb.append_data(&mut h, TOC_TAR_NAME, &json[..])?;
    let toc_tar = tb.into_inner()?;
    gzip_member(&mut blob, &toc_tar, opts.level)?;
    blob.extend_from_slice(&footer(toc_offset));
    let mut diff = Sha256::new();
    diff.update(&body);
    diff.update(&toc_tar);
    Ok(Written {
        blob,
        toc_digest: format!("sha256:{}", hex::encode(Sha256::digest(&json))),
        toc_offset,
        diff_id: format!("sha256:{}", hex::encode(diff.finalize())),
        uncompressed_size: body.len() as u64 + toc_tar.len() as u64,
    })
}

/// Appends `data` to `out` as one gzip member.
fn gzip_member(out: &mut Vec<u8>, data: &[u8], level: u32) -> std::io::Result<()> {
    let mut gz =
        flate2::write::GzEncoder::new(std::mem::take(out), flate2::Compression::new(level));
    gz.write_all(data)?;
    *out = gz.finish()?;
    Ok(())
}

/// The 51-byte footer pointing at the TOC member at `toc_offset`.
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let sub = format!("{toc_offset:016x}STARGZ");
    let mut extra = b"SG".to_vec();
    extra.extend_from_slice(&(sub.len() as u16).to_le_bytes());
    extra.extend_from_slice(sub.as_bytes());
    let mut out = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff];
    out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    out.extend_from_slice(&extra);
    // An empty stored final block, then CRC32 and ISIZE of nothing.
    out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    debug_assert_eq!(out.len() as u64, FOOTER_SIZE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tar() -> (Vec<u8>, Vec<u8>) {
        let big: Vec<u8> = (0..(9u32 << 20) + 123)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_data(&mut h, "etc/", &[][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o640);
        h.set_uid(7);
        h.set_mtime(1_700_000_001);
        h.set_size(5);
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v\0x"[..])])
            .unwrap();
        b.append_data(&mut h, "etc/small", &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(big.len() as u64);
        b.append_data(&mut h, "big", &big[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "etc/link", "../big").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "hard", "etc/small").unwrap();
        (b.into_inner().unwrap(), big)
    }

    #[test]
    fn footer_round_trips_and_legacy_is_accepted() {
        let f = footer(0x1234_5678);
        assert_eq!(f.len() as u64, FOOTER_SIZE);
        assert_eq!(parse_footer(&f), Some((0x1234_5678, FOOTER_SIZE)));
        // Legacy: the 22 bytes are the whole extra field.
        let mut legacy = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
        legacy.extend_from_slice(format!("{:016x}STARGZ", 99).as_bytes());
        legacy.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(legacy.len() as u64, LEGACY_FOOTER_SIZE);
        assert_eq!(parse_footer(&legacy), Some((99, LEGACY_FOOTER_SIZE)));
        let mut bad = f.clone();
        bad[20] = b'x';
        assert_eq!(parse_footer(&bad), None);
        assert_eq!(parse_footer(b"plain gzip tail"), None);
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.5Z"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some((1_700_000_000, 0))
        );
        assert_eq!(
            crate::registry::rfc3339_secs(1_700_000_000),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(parse_rfc3339("2023-13-14T22:13:20Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn written_layer_parses_back_and_every_chunk_reads() {
        let (raw, big) = sample_tar();
        let opts = WriteOptions {
            prefetch: vec!["etc/small".into()],
            ..WriteOptions::default()
        };
        let w = write(&raw, &opts).unwrap();
        // Valid gzip + tar for an eager reader: every member, the TOC entry last.
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(&w.blob[..]));
        for e in ar.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert_eq!(
            names,
            [
                "etc/",
                "etc/small",
                PREFETCH_LANDMARK,
                "big",
                "etc/link",
                "hard",
                TOC_TAR_NAME
            ]
        );
        let (off, flen) = parse_footer(&w.blob).unwrap();
        assert_eq!(off, w.toc_offset);
        let json = toc_json(&w.blob[off as usize..w.blob.len() - flen as usize]).unwrap();
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&json))),
            w.toc_digest
        );
        let toc = parse_toc(&json, "sha256:test", w.blob.len() as u64, off).unwrap();
        let paths: Vec<&str> = toc.index.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(paths, ["etc", "etc/small", "big", "etc/link", "hard"]);
        assert_eq!(toc.prefetch_first, vec![1]);
        let small = &toc.index.entries[1];
        assert_eq!(
            (small.mode, small.uid, small.mtime),
            (0o640, 7, 1_700_000_001)
        );
        assert_eq!(*small.xattrs, [("user.k".to_string(), b"v\0x".to_vec())]);
        assert_eq!(toc.index.entries[3].link.as_deref(), Some("../big"));
        assert_eq!(toc.index.entries[4].link.as_deref(), Some("etc/small"));
        // 9 MiB + 123 in 4 MiB chunks: 3 members, the last one ending where the next starts.
        let cs = &toc.chunks[2];
        assert_eq!(cs.len(), 3);
        assert_eq!(cs[2].len, (1 << 20) + 123);
        assert!(
            cs.windows(2)
                .all(|p| p[0].compressed_end == p[1].compressed_offset)
        );
        for (i, want) in [(1, &b"hello"[..]), (2, &big[..])] {
            let got = super::super::source::chunk_bytes_for_test(&toc, i, &w.blob);
            assert!(got == want, "entry {i}");
        }
        // A flipped byte in a chunk's member is caught (inflate or digest).
        let mut bad = w.blob.clone();
        let at = (cs[1].compressed_offset + cs[1].compressed_end) / 2;
        bad[at as usize] ^= 0x55;
        assert!(super::super::source::try_chunk_bytes_for_test(&toc, 2, &bad).is_err());
    }

    #[test]
    fn hostile_tocs_are_refused() {
        let toc = |entries: &str| format!(r#"{{"version":1,"entries":[{entries}]}}"#);
        // A chunk with no regular file before it.
        let j = toc(r#"{"name":"a","type":"chunk","offset":5,"chunkOffset":0}"#);
        assert!(parse_toc(j.as_bytes(), "l", 100, 50).is_err());
        // Chunks that do not tile the file.
        let j = toc(
            r#"{"name":"a","type":"reg","size":10,"offset":5,"chunkSize":4},{"name":"a","type":"chunk","offset":9,"chunkOffset":6}"#,
        );
        assert!(parse_toc(j.as_bytes(), "l", 100, 50).is_err());
        // Data past the TOC.
        let j = toc(r#"{"name":"a","type":"reg","size":10,"offset":60}"#);
        assert!(parse_toc(j.as_bytes(), "l", 100, 50).is_err());
        // Escaping paths.
        let j = toc(r#"{"name":"../x","type":"dir"}"#);
        assert!(parse_toc(j.as_bytes(), "l", 100, 50).is_err());
        // A chunk no fill could hold in memory.
        let j = toc(r#"{"name":"a","type":"reg","size":1099511627776,"offset":5}"#);
        assert!(matches!(
            parse_toc(j.as_bytes(), "l", 100, 50),
            Err(TocError::TooLarge { what: "chunk", .. })
        ));
        let j = toc(r#"{"name":"a","type":"reg","size":10,"offset":5}"#);
        assert_eq!(
            parse_toc(j.as_bytes(), "l", 100, 50).unwrap().chunks[0][0].compressed_end,
            50
        );
    }
}
