//! The one streaming pass that turns a layer blob into a [`LayerIndex`].
//!
//! Pipeline: blob → sha256/count (blob digest, compressed size) → decoder (gzip with zran
//! checkpoints, zstd with frame checkpoints, or pass-through) → sha256/count (diff id,
//! uncompressed size) → tar walker (entries, file digests, [`IndexSink`]).
//!
//! The tar walker is our own loop over 512-byte blocks (header fields are decoded with the
//! `tar` crate's `Header`): it owns the stream position, so `data_offset` is exact, a PAX
//! `size` can never desynchronise it, and PAX / GNU long-name payloads are size-checked
//! before they are read.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::gzip::{FileHints, GzipIndexer};
use super::windows::WindowPack;
use super::{
    CHUNK_SIZE, Checkpoint, Compression, EndMark, Entry, EntryKind, IndexError, LayerIndex,
};

/// Tuning and limits of [`LayerIndex::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexOptions {
    /// Distance in uncompressed bytes between gzip checkpoints that carry a window (each
    /// costs up to 32 KiB, before compression, in the windows pack). Default 1 MiB: see
    /// [`IndexOptions::file_span`] for the measurement behind both defaults.
    pub span: u64,
    /// A gzip checkpoint is also placed right at the start of a file's data, and of every
    /// [`CHUNK_SIZE`] piece of a larger one (the units the fill engine reads), when the last
    /// checkpoint is at least this far back (0: never). Inside a Huffman-coded deflate block
    /// such a checkpoint records the block's header (replayed before resuming, see
    /// `docs/index-format.md`); in a stored block it falls back to the block's start.
    /// Default 16 KiB.
    ///
    /// Measured with `cargo run --example index_span` on a 3-layer image of host files
    /// (Python standard library, `/usr/share/doc`, `/usr/include`: 60.5 MiB of gzip, 151 MiB
    /// of tar, 8,046 files), fetching a seeded random 5% of the files (402) the way the fill
    /// engine does (whole small files, 1 MiB chunks of larger ones, each window once);
    /// "fetched" includes the metadata; per small file is the mean for files < 64 KiB; the
    /// sampled files' own compressed bytes are 4.2 MiB (6.9%):
    ///
    /// | span | file_span | checkpoints | metadata | windows pack | fetched for 5% of files | per small file | index time (debug build) |
    /// |---|---|---|---|---|---|---|---|
    /// | 4 MiB | off | 39 | 431 KiB (0.70%) | 0.5 MiB | 307.8 MiB (509%) | 761 KiB | 0.6 s |
    /// | 1 MiB | off | 144 | 432 KiB (0.70%) | 1.9 MiB | 90.3 MiB (149%) | 216 KiB | 0.7 s |
    /// | 512 KiB | off | 276 | 434 KiB (0.70%) | 3.7 MiB | 55.9 MiB (92%) | 127 KiB | 0.7 s |
    /// | 256 KiB | off | 506 | 437 KiB (0.70%) | 7.0 MiB | 31.0 MiB (51%) | 67 KiB | 0.8 s |
    /// | 1 MiB | 4 KiB | 5,361 | 505 KiB (0.82%) | 56.2 MiB | 10.1 MiB (16.8%) | 14 KiB | 31.1 s |
    /// | 1 MiB | 8 KiB | 3,945 | 486 KiB (0.79%) | 42.4 MiB | 10.2 MiB (16.8%) | 14 KiB | 22.9 s |
    /// | **1 MiB** | **16 KiB** | 2,714 | 470 KiB (0.76%) | 29.7 MiB | 10.4 MiB (17.3%) | 15 KiB | 15.6 s |
    /// | 1 MiB | 32 KiB | 1,807 | 457 KiB (0.74%) | 20.6 MiB | 11.0 MiB (18.1%) | 16 KiB | 9.4 s |
    /// | 1 MiB | 64 KiB | 1,134 | 447 KiB (0.72%) | 13.6 MiB | 12.2 MiB (20.2%) | 19 KiB | 6.6 s |
    /// | 1 MiB | 128 KiB | 699 | 441 KiB (0.71%) | 8.9 MiB | 16.0 MiB (26.4%) | 29 KiB | 4.0 s |
    /// | 1 MiB | 256 KiB | 410 | 436 KiB (0.70%) | 5.3 MiB | 23.6 MiB (39.1%) | 48 KiB | 2.7 s |
    /// | 4 MiB | 64 KiB | 1,134 | 447 KiB (0.72%) | 13.6 MiB | 12.2 MiB (20.2%) | 19 KiB | 6.0 s |
    /// | 256 KiB | 64 KiB | 1,282 | 449 KiB (0.72%) | 15.7 MiB | 12.2 MiB (20.2%) | 19 KiB | 5.9 s |
    ///
    /// Index time is for all three layers, dominated by checking each checkpoint inside a
    /// deflate block against the next 16 KiB of output.
    ///
    /// File-start checkpoints are what matters (the span only bounds reads inside large
    /// files). Below 16 KiB the pack keeps growing (it stays in the registry and only the
    /// windows a read starts at are fetched) and indexing slows, while the fetch barely
    /// falls: at 16 KiB the 10.4 MiB are 4.2 MiB of file data, about 4.2 MiB of windows, the
    /// metadata, and what lies between a checkpoint and the file start.
    pub file_span: u64,
    /// Smallest distance between checkpoints at gzip member or zstd frame starts (these carry
    /// no window; 0 records every boundary). Default 64 KiB.
    pub boundary_span: u64,
    /// Largest PAX extended header or GNU long name/link accepted. Default 1 MiB.
    pub max_header_bytes: u64,
    /// The layer's media type, if known: a hint checked against the blob's magic bytes.
    pub media_type: Option<String>,
    /// Also hash the uncompressed stream into [`LayerIndex::diff_id`] (one more sha256 pass
    /// over the uncompressed bytes, about 15% of the indexing time). The blob digest already
    /// authenticates the content, so this only serves a cross-check with the image config.
    /// Default false; for plain tar the diff id equals the blob digest and is always set.
    pub diff_id: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            span: 1 << 20,
            file_span: 16 << 10,
            boundary_span: 64 << 10,
            max_header_bytes: 1 << 20,
            media_type: None,
            diff_id: false,
        }
    }
}

/// Receives the layer's content while it is being indexed ("no index yet: unpack eagerly
/// while indexing"). All methods default to doing nothing; an error stops the pass with
/// [`IndexError::Sink`].
///
/// For each tar member, in order: [`IndexSink::entry`] once with the metadata (everything but
/// `sha256`/`chunk_sha256`, which are not known yet), then for regular files
/// [`IndexSink::data`] with consecutive pieces of the content (`offset` is the position in
/// the file; pieces are at most 256 KiB and never empty), then [`IndexSink::entry_done`]
/// with the finished entry. `idx` is the entry's position in [`LayerIndex::entries`].
///
/// Nothing handed to a sink is verified yet: the blob digest is only known when the pass
/// ends, so a sink that writes files must treat them as provisional until
/// [`LayerIndex::build_with_sink`] returned `Ok` and [`LayerIndex::blob_digest`] matched the
/// layer descriptor.
pub trait IndexSink {
    /// A member's header was read.
    fn entry(&mut self, idx: usize, entry: &Entry) -> io::Result<()> {
        let _ = (idx, entry);
        Ok(())
    }

    /// A piece of a regular file's content.
    fn data(&mut self, idx: usize, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let _ = (idx, offset, bytes);
        Ok(())
    }

    /// The member is complete; `entry` has its digests.
    fn entry_done(&mut self, idx: usize, entry: &Entry) -> io::Result<()> {
        let _ = (idx, entry);
        Ok(())
    }
}

/// An [`IndexSink`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSink;

impl IndexSink for NoSink {}

/// sha256 and byte count of everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Option<Sha256>,
    count: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R, hash: bool) -> Self {
        Self {
            inner,
            hasher: hash.then(Sha256::new),
            count: 0,
        }
    }

    fn finish(self) -> (R, Option<String>, u64) {
        let digest = self
            .hasher
            .map(|h| format!("sha256:{}", hex::encode(h.finalize())));
        (self.inner, digest, self.count)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// Decodes a zstd blob frame by frame, recording a checkpoint at frame starts.
struct ZstdIndexer<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    pos: u64,
    out_total: u64,
    dec: zstd::stream::raw::Decoder<'static>,
    in_frame: bool,
    frames: u64,
    boundary_span: u64,
    last_cp: u64,
    checkpoints: Vec<Checkpoint>,
}

impl<R: Read> ZstdIndexer<R> {
    fn new(inner: R, boundary_span: u64) -> Result<Self, IndexError> {
        Ok(Self {
            inner,
            buf: vec![0u8; 256 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            pos: 0,
            out_total: 0,
            dec: zstd::stream::raw::Decoder::new()
                .map_err(|source| IndexError::Zstd { offset: 0, source })?,
            in_frame: false,
            frames: 0,
            boundary_span,
            last_cp: 0,
            checkpoints: vec![Checkpoint {
                uncompressed_offset: 0,
                compressed_offset: 0,
                bit_offset: 0,
                window: None,
            }],
        })
    }
}

impl<R: Read> Read for ZstdIndexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use zstd::stream::raw::Operation;
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.start == self.end && !self.eof {
                self.start = 0;
                self.end = 0;
                loop {
                    match self.inner.read(&mut self.buf) {
                        Ok(0) => self.eof = true,
                        Ok(n) => self.end = n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    break;
                }
            }
            if self.start == self.end && self.eof && !self.in_frame {
                return Ok(0);
            }
            let status = self
                .dec
                .run_on_buffers(&self.buf[self.start..self.end], out)
                .map_err(|source| {
                    IndexError::Zstd {
                        offset: self.pos,
                        source,
                    }
                    .into_io()
                })?;
            self.start += status.bytes_read;
            self.pos += status.bytes_read as u64;
            self.out_total += status.bytes_written as u64;
            if status.bytes_read > 0 {
                self.in_frame = true;
            }
            if status.remaining == 0 && self.in_frame {
                self.in_frame = false;
                self.frames += 1;
                if self.out_total > self.last_cp
                    && self.out_total - self.last_cp >= self.boundary_span
                {
                    self.checkpoints.push(Checkpoint {
                        uncompressed_offset: self.out_total,
                        compressed_offset: self.pos,
                        bit_offset: 0,
                        window: None,
                    });
                    self.last_cp = self.out_total;
                }
            }
            if status.bytes_written > 0 {
                return Ok(status.bytes_written);
            }
            if status.bytes_read == 0 && self.start == self.end && self.eof {
                return Err(IndexError::Truncated { what: "zstd frame" }.into_io());
            }
            if status.bytes_read == 0 && status.remaining != 0 && self.start < self.end {
                return Err(IndexError::Zstd {
                    offset: self.pos,
                    source: io::Error::other("decoder made no progress"),
                }
                .into_io());
            }
        }
    }
}

enum Decoder<R: Read> {
    Plain(R),
    Gzip(Box<GzipIndexer<R>>),
    Zstd(ZstdIndexer<R>),
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

impl<R: Read> Decoder<R> {
    /// The checkpoints that lie inside the blob and the stream (the first always: one at
    /// the very end is useless) and the windows pack. Call at the end of the blob.
    fn finish(self) -> (Vec<Checkpoint>, Vec<EndMark>, WindowPack) {
        let (compressed_size, uncompressed_size) = match &self {
            Decoder::Plain(_) => (0, 0),
            Decoder::Gzip(g) => g.position(),
            Decoder::Zstd(z) => (z.pos, z.out_total),
        };
        let keep = |cps: &[Checkpoint]| {
            1 + cps
                .iter()
                .skip(1)
                .take_while(|c| {
                    c.compressed_offset < compressed_size
                        && c.uncompressed_offset < uncompressed_size
                })
                .count()
        };
        let no_pack = || super::windows::PackWriter::new().finish();
        match self {
            Decoder::Plain(_) => (Vec::new(), Vec::new(), no_pack()),
            Decoder::Gzip(g) => {
                debug!(
                    members = g.members(),
                    checkpoints = g.checkpoints.len(),
                    "gzip indexed"
                );
                let n = keep(&g.checkpoints).min(g.checkpoints.len());
                g.finish(n)
            }
            Decoder::Zstd(z) => {
                debug!(
                    frames = z.frames,
                    checkpoints = z.checkpoints.len(),
                    "zstd indexed"
                );
                if z.frames <= 1 {
                    debug!("single-frame zstd layer: every range read inflates from the start");
                }
                let mut cps = z.checkpoints;
                cps.truncate(keep(&cps));
                (cps, Vec::new(), no_pack())
            }
        }
    }
}

/// Read until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, IndexError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(IndexError::from_io(e)),
        }
    }
    Ok(n)
}

impl LayerIndex {
    /// Index a layer blob in one streaming pass (see [`LayerIndex::build_with_sink`]).
    pub fn build<R: Read>(
        blob: R,
        opts: &IndexOptions,
    ) -> Result<(LayerIndex, WindowPack), IndexError> {
        Self::build_with_sink(blob, opts, &mut NoSink)
    }

    /// Index a layer blob in one streaming pass, handing every member and its content to
    /// `sink` as they stream by. Returns the index (the metadata) and the windows pack of its
    /// gzip checkpoints (`docs/index-format.md`); [`LayerIndex::windows_digest`] names it.
    ///
    /// The compression is recognised by the blob's magic bytes; [`IndexOptions::media_type`]
    /// is only a cross-check (a compressed media type on a blob without the magic is an
    /// error; a disagreeing magic wins, with a warning). The blob is read to its end, so the
    /// returned [`LayerIndex::blob_digest`] covers all of it: the caller must compare it with
    /// the layer descriptor before trusting the index.
    pub fn build_with_sink<R: Read>(
        blob: R,
        opts: &IndexOptions,
        sink: &mut dyn IndexSink,
    ) -> Result<(LayerIndex, WindowPack), IndexError> {
        let mut blob = Hashing::new(blob, true);
        let mut prefix = [0u8; 4];
        let n = read_full(&mut blob, &mut prefix)?;
        if n == 0 {
            return Err(IndexError::EmptyBlob);
        }
        let magic = Compression::from_magic(&prefix[..n]);
        let hint = opts
            .media_type
            .as_deref()
            .and_then(Compression::from_media_type);
        let compression = match (magic, hint) {
            (Some(m), Some(h)) if m != h => {
                warn!(media_type = ?opts.media_type, detected = ?m, "layer media type disagrees with magic bytes; using magic");
                m
            }
            (Some(m), _) => m,
            (None, Some(Compression::Gzip | Compression::Zstd)) => {
                return Err(IndexError::CompressionMismatch {
                    media_type: opts.media_type.clone().unwrap_or_default(),
                });
            }
            (None, _) => Compression::None,
        };
        let input = (&prefix[..n]).chain(&mut blob);
        let hints = Arc::new(FileHints::default());
        let decoder = match compression {
            Compression::None => Decoder::Plain(input),
            Compression::Gzip => Decoder::Gzip(Box::new(GzipIndexer::new(
                input,
                opts.span,
                opts.boundary_span,
                opts.file_span,
                hints.clone(),
            )?)),
            Compression::Zstd => Decoder::Zstd(ZstdIndexer::new(input, opts.boundary_span)?),
        };
        let plain = compression == Compression::None;
        let mut tar_in = Hashing::new(decoder, opts.diff_id && !plain);
        let entries = walk(&mut tar_in, opts, sink, &|at, start| {
            let slot = if start { &hints.start } else { &hints.end };
            slot.store(at, Ordering::Relaxed)
        })?;
        // Whatever follows the end-of-archive marker (zero padding) still belongs to the blob
        // (and the diff id).
        io::copy(&mut tar_in, &mut io::sink()).map_err(IndexError::from_io)?;
        let (decoder, diff_id, uncompressed_size) = tar_in.finish();
        let (checkpoints, end_marks, pack) = decoder.finish();
        let (_, blob_digest, compressed_size) = blob.finish();
        let blob_digest = blob_digest.unwrap_or_default();
        let diff_id = if plain {
            Some(blob_digest.clone())
        } else {
            diff_id
        };
        let has_windows = checkpoints.iter().any(|c| c.window.is_some());
        debug!(
            %blob_digest,
            windows = pack.len(),
            entries = entries.len(),
            checkpoints = checkpoints.len(),
            compressed_size,
            uncompressed_size,
            "layer indexed"
        );
        let index = LayerIndex {
            compression,
            blob_digest,
            diff_id,
            compressed_size,
            uncompressed_size,
            span: opts.span,
            windows_digest: has_windows.then(|| pack.digest()),
            windows_size: if has_windows { pack.len() } else { 0 },
            entries,
            checkpoints,
            end_marks,
        };
        Ok((index, pack))
    }
}

/// GNU long name/link payloads are NUL-terminated.
fn strip_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Normalise a member path: drop leading `/`, `.` components and empty components; refuse
/// `..`, NUL and non-UTF-8.
pub(crate) fn normalize_path(raw: &[u8], offset: u64) -> Result<String, IndexError> {
    let unsafe_path = || IndexError::UnsafePath {
        path: lossy(raw),
        offset,
    };
    let s = std::str::from_utf8(raw).map_err(|_| IndexError::Unsupported {
        path: lossy(raw),
        offset,
        what: "path is not UTF-8".into(),
    })?;
    if s.contains('\0') {
        return Err(unsafe_path());
    }
    let mut out = String::with_capacity(s.len());
    for comp in s.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(unsafe_path()),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

/// Parse a PAX `mtime` (`[-]seconds[.fraction]`) into seconds and nanoseconds.
pub(crate) fn parse_pax_time(v: &str) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((secs.checked_neg()?, 0))
    } else {
        Some((secs.checked_neg()?.checked_sub(1)?, 1_000_000_000 - nsec))
    }
}

/// A numeric header field that is all NULs or spaces reads as 0 (as in Go's archive/tar);
/// otherwise the `tar` crate's octal / base-256 parse decides.
fn lenient<T: Default>(raw: &[u8], parsed: io::Result<T>) -> io::Result<T> {
    if raw.iter().all(|&b| b == 0 || b == b' ') {
        Ok(T::default())
    } else {
        parsed
    }
}

fn header_checksum_ok(block: &[u8; 512], stored: u32) -> bool {
    let mut unsigned: u32 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i64::from(b as i8);
    }
    unsigned == stored || signed == i64::from(stored)
}

/// Pending extension headers that describe the next real member.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// The PAX records the index uses.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<(i64, u32)>,
    xattrs: std::collections::BTreeMap<String, Vec<u8>>,
    sparse: bool,
}

fn parse_pax(data: &[u8], offset: u64) -> Result<Pax, IndexError> {
    let bad = |reason: String| IndexError::TarHeader { offset, reason };
    let mut pax = Pax::default();
    for rec in tar::PaxExtensions::new(data) {
        let rec = rec.map_err(|e| bad(format!("malformed PAX record: {e}")))?;
        let key = rec.key().map_err(|_| bad("PAX key is not UTF-8".into()))?;
        let value = rec.value_bytes();
        let num = |what: &str| -> Result<u64, IndexError> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| bad(format!("bad PAX {what}")))
        };
        match key {
            "path" => pax.path = Some(value.to_vec()),
            "linkpath" => pax.linkpath = Some(value.to_vec()),
            "size" => pax.size = Some(num("size")?),
            "uid" => {
                pax.uid =
                    Some(u32::try_from(num("uid")?).map_err(|_| bad("PAX uid too large".into()))?)
            }
            "gid" => {
                pax.gid =
                    Some(u32::try_from(num("gid")?).map_err(|_| bad("PAX gid too large".into()))?)
            }
            "mtime" => {
                let v = std::str::from_utf8(value).ok().and_then(parse_pax_time);
                pax.mtime = Some(v.ok_or_else(|| bad("bad PAX mtime".into()))?);
            }
            k if k.starts_with("GNU.sparse.") => pax.sparse = true,
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    if name.is_empty() {
                        return Err(bad("empty xattr name".into()));
                    }
                    pax.xattrs.insert(name.to_owned(), value.to_vec());
                }
            }
        }
    }
    Ok(pax)
}

struct Walker<'a, R: ?Sized> {
    r: &'a mut R,
    pos: u64,
    buf: Vec<u8>,
}

impl<R: Read + ?Sized> Walker<'_, R> {
    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), IndexError> {
        if read_full(self.r, buf)? < buf.len() {
            return Err(IndexError::Truncated { what });
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> Result<(), IndexError> {
        while n > 0 {
            let want = n.min(self.buf.len() as u64) as usize;
            let got = read_full(self.r, &mut self.buf[..want])?;
            if got < want {
                return Err(IndexError::Truncated {
                    what: "tar member data",
                });
            }
            self.pos += got as u64;
            n -= got as u64;
        }
        Ok(())
    }

    fn skip_padding(&mut self, size: u64) -> Result<(), IndexError> {
        self.skip((512 - size % 512) % 512)
    }
}

/// Walks the tar stream; `file_data(offset, true)` is told the stream offset where each
/// non-empty regular file's data, and each [`CHUNK_SIZE`] piece of it, begins, before that
/// data is read; `file_data(offset, false)` where each piece ends, right after.
fn walk<R: Read + ?Sized>(
    r: &mut R,
    opts: &IndexOptions,
    sink: &mut dyn IndexSink,
    file_data: &dyn Fn(u64, bool),
) -> Result<Vec<Entry>, IndexError> {
    let mut w = Walker {
        r,
        pos: 0,
        buf: vec![0u8; 256 * 1024],
    };
    let mut entries: Vec<Entry> = Vec::new();
    let mut pending = Pending::default();
    let mut block = [0u8; 512];
    loop {
        let header_pos = w.pos;
        let n = read_full(w.r, &mut block)?;
        if n == 0 {
            // No end-of-archive marker: accepted (as Go's archive/tar does).
            if !pending.is_empty() {
                return Err(IndexError::Truncated {
                    what: "tar stream (extension header without member)",
                });
            }
            break;
        }
        if n < 512 {
            return Err(IndexError::Truncated { what: "tar header" });
        }
        w.pos += 512;
        if block.iter().all(|&b| b == 0) {
            if !pending.is_empty() {
                return Err(IndexError::TarHeader {
                    offset: header_pos,
                    reason: "extension header not followed by a member".into(),
                });
            }
            break;
        }
        let bad = |reason: String| IndexError::TarHeader {
            offset: header_pos,
            reason,
        };
        let header = tar::Header::from_byte_slice(&block);
        let stored = header
            .cksum()
            .map_err(|e| bad(format!("checksum field: {e}")))?;
        if !header_checksum_ok(&block, stored) {
            return Err(bad("checksum mismatch".into()));
        }
        let type_byte = header.entry_type().as_byte();
        let old = header.as_old();
        let header_size =
            lenient(&old.size, header.entry_size()).map_err(|e| bad(format!("size field: {e}")))?;

        // Extension headers: bounded, read whole, applied to the next member.
        let ext_kind = match type_byte {
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link"),
            b'x' => Some("PAX"),
            b'g' => Some("PAX global"),
            _ => None,
        };
        if let Some(kind) = ext_kind {
            if header_size > opts.max_header_bytes {
                return Err(IndexError::HeaderTooLarge {
                    kind,
                    offset: header_pos,
                    size: header_size,
                    limit: opts.max_header_bytes,
                });
            }
            let mut data = vec![0u8; header_size as usize];
            w.read_exact(&mut data, "tar extension header")?;
            w.skip_padding(header_size)?;
            let slot = match type_byte {
                b'L' => &mut pending.long_name,
                b'K' => &mut pending.long_link,
                b'x' => &mut pending.pax,
                _ => {
                    debug!(offset = header_pos, "ignoring PAX global header");
                    continue;
                }
            };
            if slot.is_some() {
                return Err(bad(format!("two {kind} headers for one member")));
            }
            *slot = Some(if type_byte == b'x' {
                data
            } else {
                strip_nuls(data)
            });
            continue;
        }

        let ext = std::mem::take(&mut pending);
        let pax = match ext.pax {
            Some(p) => parse_pax(&p, header_pos)?,
            None => Pax::default(),
        };
        let raw_path: Vec<u8> = match (pax.path, ext.long_name) {
            (Some(p), _) => p,
            (None, Some(l)) => l,
            (None, None) => header.path_bytes().into_owned(),
        };
        let raw_link: Option<Vec<u8>> = match (pax.linkpath, ext.long_link) {
            (Some(p), _) => Some(p),
            (None, Some(l)) => Some(l),
            (None, None) => header.link_name_bytes().map(|c| c.into_owned()),
        };
        let unsupported = |what: String| IndexError::Unsupported {
            path: lossy(&raw_path),
            offset: header_pos,
            what,
        };
        if pax.sparse || type_byte == b'S' {
            return Err(unsupported("GNU sparse file".into()));
        }
        let size = pax.size.unwrap_or(header_size);
        let path = normalize_path(&raw_path, header_pos)?;
        let ends_with_slash = raw_path.last() == Some(&b'/');
        let dev = |h: &tar::Header| -> Result<(u32, u32), IndexError> {
            let major = h
                .device_major()
                .map_err(|e| bad(format!("device major: {e}")))?;
            let minor = h
                .device_minor()
                .map_err(|e| bad(format!("device minor: {e}")))?;
            Ok((major.unwrap_or(0), minor.unwrap_or(0)))
        };
        let kind = match type_byte {
            b'0' | b'\0' | b'7' if ends_with_slash => EntryKind::Dir,
            b'0' | b'\0' | b'7' => EntryKind::File,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => {
                let (major, minor) = dev(header)?;
                EntryKind::Char { major, minor }
            }
            b'4' => {
                let (major, minor) = dev(header)?;
                EntryKind::Block { major, minor }
            }
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            other => return Err(unsupported(format!("tar entry type {:?}", other as char))),
        };
        if path.is_empty() && kind != EntryKind::Dir {
            return Err(IndexError::UnsafePath {
                path: lossy(&raw_path),
                offset: header_pos,
            });
        }
        let link = match kind {
            EntryKind::Hardlink => {
                let l = raw_link.unwrap_or_default();
                let n = normalize_path(&l, header_pos)?;
                if n.is_empty() {
                    return Err(IndexError::UnsafePath {
                        path: lossy(&l),
                        offset: header_pos,
                    });
                }
                Some(n)
            }
            EntryKind::Symlink => {
                let l = raw_link.unwrap_or_default();
                Some(
                    String::from_utf8(l)
                        .map_err(|_| unsupported("symlink target is not UTF-8".into()))?,
                )
            }
            _ => None,
        };
        let uid = match pax.uid {
            Some(u) => u,
            None => {
                let u = lenient(&old.uid, header.uid()).map_err(|e| bad(format!("uid: {e}")))?;
                u32::try_from(u).map_err(|_| bad("uid too large".into()))?
            }
        };
        let gid = match pax.gid {
            Some(g) => g,
            None => {
                let g = lenient(&old.gid, header.gid()).map_err(|e| bad(format!("gid: {e}")))?;
                u32::try_from(g).map_err(|_| bad("gid too large".into()))?
            }
        };
        let (mtime, mtime_nsec) = match pax.mtime {
            Some(t) => t,
            None => {
                let t =
                    lenient(&old.mtime, header.mtime()).map_err(|e| bad(format!("mtime: {e}")))?;
                (
                    i64::try_from(t).map_err(|_| bad("mtime too large".into()))?,
                    0,
                )
            }
        };
        let mode =
            lenient(&old.mode, header.mode()).map_err(|e| bad(format!("mode: {e}")))? & 0o7777;
        let is_file = kind == EntryKind::File;
        let mut chunk_sha256 = Vec::new();
        let mut entry = Entry {
            path: path.into(),
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs: pax.xattrs.into_iter().collect(),
            link: link.map(Into::into),
            size: if is_file { size } else { 0 },
            data_offset: w.pos,
            sha256: None,
            chunk_sha256: Box::default(),
        };
        let idx = entries.len();
        sink.entry(idx, &entry)
            .map_err(|source| IndexError::Sink { idx, source })?;
        if is_file {
            let mut whole = Sha256::new();
            let mut chunk = Sha256::new();
            let mut chunk_fill = 0u64;
            let chunked = size > CHUNK_SIZE;
            let mut off = 0u64;
            while off < size {
                // Fills read whole small files and CHUNK_SIZE pieces of large ones: each
                // such start is a good checkpoint. (The buffer divides CHUNK_SIZE, so
                // reads land on every chunk start.)
                if off % CHUNK_SIZE == 0 {
                    if off > 0 {
                        file_data(w.pos, false);
                    }
                    file_data(w.pos, true);
                }
                let want = (size - off).min(w.buf.len() as u64) as usize;
                let got = read_full(w.r, &mut w.buf[..want])?;
                if got == 0 {
                    return Err(IndexError::Truncated {
                        what: "tar member data",
                    });
                }
                let data = &w.buf[..got];
                whole.update(data);
                if chunked {
                    let mut rest = data;
                    while !rest.is_empty() {
                        let take = ((CHUNK_SIZE - chunk_fill) as usize).min(rest.len());
                        chunk.update(&rest[..take]);
                        chunk_fill += take as u64;
                        rest = &rest[take..];
                        if chunk_fill == CHUNK_SIZE {
                            chunk_sha256.push(crate::digest::Sha256(chunk.finalize_reset().into()));
                            chunk_fill = 0;
                        }
                    }
                }
                sink.data(idx, off, data)
                    .map_err(|source| IndexError::Sink { idx, source })?;
                off += got as u64;
                w.pos += got as u64;
            }
            if size > 0 {
                file_data(w.pos, false);
            }
            if chunked && chunk_fill > 0 {
                chunk_sha256.push(crate::digest::Sha256(chunk.finalize().into()));
            }
            entry.chunk_sha256 = chunk_sha256.into();
            entry.sha256 = Some(crate::digest::Sha256(whole.finalize().into()));
        } else {
            w.skip(size)?;
        }
        w.skip_padding(size)?;
        sink.entry_done(idx, &entry)
            .map_err(|source| IndexError::Sink { idx, source })?;
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_paths() {
        assert_eq!(normalize_path(b"./a//b/./c/", 0).unwrap(), "a/b/c");
        assert_eq!(normalize_path(b"/etc/passwd", 0).unwrap(), "etc/passwd");
        assert_eq!(normalize_path(b"./", 0).unwrap(), "");
        assert!(matches!(
            normalize_path(b"a/../../b", 0),
            Err(IndexError::UnsafePath { .. })
        ));
        assert!(matches!(
            normalize_path(b"..", 0),
            Err(IndexError::UnsafePath { .. })
        ));
        assert!(matches!(
            normalize_path(b"a\xffb", 0),
            Err(IndexError::Unsupported { .. })
        ));
    }

    #[test]
    fn parses_pax_times() {
        assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_pax_time("1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time("1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time("-3"), Some((-3, 0)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.x"), None);
        assert_eq!(parse_pax_time(""), None);
    }

    #[test]
    fn compression_detection() {
        assert_eq!(
            Compression::from_magic(&[0x1f, 0x8b, 8, 0]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_magic(&[0x28, 0xb5, 0x2f, 0xfd]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_magic(&[0x50, 0x2a, 0x4d, 0x18]),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_magic(b"etc/"), None);
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
    }

    #[test]
    fn media_type_mismatch_is_an_error() {
        let opts = IndexOptions {
            media_type: Some("application/vnd.oci.image.layer.v1.tar+gzip".into()),
            ..IndexOptions::default()
        };
        let tar = vec![0u8; 1024];
        assert!(matches!(
            LayerIndex::build(&tar[..], &opts),
            Err(IndexError::CompressionMismatch { .. })
        ));
        assert!(matches!(
            LayerIndex::build(&[][..], &IndexOptions::default()),
            Err(IndexError::EmptyBlob)
        ));
    }
}
