//! The on-disk encoding of a [`LayerIndex`] (specified in `docs/index-format.md`).
//!
//! A 16-byte header (magic, version, flags, body length) and one zstd frame holding the
//! body: fixed little-endian integers and LEB128 varints, digests as raw 32 bytes. The
//! checkpoint windows are not in it: each checkpoint names its window's place in the
//! separate windows pack ([`super::windows`]). Decoding never trusts a length: every count is
//! checked against the bytes left before anything is allocated, every field against the
//! invariants extraction relies on.

use std::io::Read;

use super::windows::{PACK_HEADER_LEN, WindowRef};
use super::{
    CHUNK_SIZE, Checkpoint, Compression, EndMark, Entry, EntryKind, IndexError, LayerIndex,
};
use crate::digest::Sha256;
use crate::sys::zlib::WINDOW_SIZE;

/// First 8 bytes of every stored index.
pub const FORMAT_MAGIC: [u8; 8] = *b"FFLIDX\r\n";
/// The format version this build writes (and the only one it reads). Version 1 kept the
/// windows inline; version 2 keeps them in a separate windows pack.
pub const FORMAT_VERSION: u16 = 2;
/// Largest decompressed body accepted (1 GiB): a bound for hostile input, far above any
/// real layer (about 130 bytes per entry, about 12 per checkpoint).
const MAX_BODY: u64 = 1 << 30;
/// Largest zstd frame accepted for one window (a 32 KiB window never needs more than a few
/// bytes over 32 KiB).
const MAX_WINDOW_FRAME: u64 = 64 << 10;
const HEADER_LEN: usize = 16;

fn corrupt(what: impl Into<String>) -> IndexError {
    IndexError::CorruptIndex(what.into())
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn var(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn ivar(&mut self, v: i64) {
        self.var(((v << 1) ^ (v >> 63)) as u64);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.var(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    /// A digest: tag 0 absent, 1 raw sha256. (Tag 2, a free-form string, was written by
    /// earlier versions for text that was not 64 hex digits; no producer makes one now.)
    fn digest(&mut self, d: Option<&Sha256>) {
        match d {
            None => self.u8(0),
            Some(d) => {
                self.u8(1);
                self.0.extend_from_slice(&d.0);
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        if n > self.left() {
            return Err(corrupt("body ends early"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, IndexError> {
        Ok(self.take(1)?[0])
    }
    fn var(&mut self) -> Result<u64, IndexError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(corrupt("varint overflows 64 bits"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(corrupt("overlong varint"));
                }
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }
    fn u32(&mut self, what: &str) -> Result<u32, IndexError> {
        u32::try_from(self.var()?).map_err(|_| corrupt(format!("{what} out of range")))
    }
    fn ivar(&mut self) -> Result<i64, IndexError> {
        let v = self.var()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    /// A count of items that each take at least `min_size` bytes: bounded by what is left.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, IndexError> {
        let n = self.var()?;
        if n > (self.left() / min_size.max(1)) as u64 {
            return Err(corrupt(format!("{what} count exceeds the data")));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], IndexError> {
        let n = self.var()?;
        if n > self.left() as u64 {
            return Err(corrupt("byte string exceeds the data"));
        }
        self.take(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, IndexError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }
    fn digest(&mut self) -> Result<Option<Sha256>, IndexError> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let mut d = [0u8; 32];
                d.copy_from_slice(self.take(32)?);
                Ok(Some(Sha256(d)))
            }
            // A free-form digest no bytes can be checked against: refused here rather than
            // carried to a fill that would refuse every read.
            2 => Err(corrupt("a digest that is not a sha256")),
            _ => Err(corrupt("bad digest tag")),
        }
    }
}

fn encode_entry(w: &mut Writer, e: &Entry) {
    w.bytes(e.path.as_bytes());
    match e.kind {
        EntryKind::File => w.u8(0),
        EntryKind::Dir => w.u8(1),
        EntryKind::Symlink => w.u8(2),
        EntryKind::Hardlink => w.u8(3),
        EntryKind::Fifo => w.u8(4),
        EntryKind::Char { major, minor } => {
            w.u8(5);
            w.var(major.into());
            w.var(minor.into());
        }
        EntryKind::Block { major, minor } => {
            w.u8(6);
            w.var(major.into());
            w.var(minor.into());
        }
    }
    w.var(e.mode.into());
    w.var(e.uid.into());
    w.var(e.gid.into());
    w.ivar(e.mtime);
    w.var(e.mtime_nsec.into());
    w.var(e.xattrs.len() as u64);
    for (k, v) in &e.xattrs {
        w.bytes(k.as_bytes());
        w.bytes(v);
    }
    match &e.link {
        None => w.u8(0),
        Some(l) => {
            w.u8(1);
            w.bytes(l.as_bytes());
        }
    }
    w.var(e.size);
    w.var(e.data_offset);
    w.digest(e.sha256.as_ref());
    w.var(e.chunk_sha256.len() as u64);
    for c in &e.chunk_sha256 {
        w.digest(Some(c));
    }
}

fn decode_entry(r: &mut Reader<'_>, uncompressed_size: u64) -> Result<Entry, IndexError> {
    let path = r.string("path")?;
    let kind = match r.u8()? {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        3 => EntryKind::Hardlink,
        4 => EntryKind::Fifo,
        5 => EntryKind::Char {
            major: r.u32("major")?,
            minor: r.u32("minor")?,
        },
        6 => EntryKind::Block {
            major: r.u32("major")?,
            minor: r.u32("minor")?,
        },
        _ => return Err(corrupt("bad entry kind")),
    };
    let mode = r.u32("mode")?;
    if mode > 0o7777 {
        return Err(corrupt("mode out of range"));
    }
    let uid = r.u32("uid")?;
    let gid = r.u32("gid")?;
    let mtime = r.ivar()?;
    let mtime_nsec = r.u32("mtime_nsec")?;
    if mtime_nsec >= 1_000_000_000 {
        return Err(corrupt("mtime_nsec out of range"));
    }
    let nx = r.count(2, "xattr")?;
    let mut xattrs = Vec::with_capacity(nx);
    for _ in 0..nx {
        let k = r.string("xattr name")?;
        let v = r.bytes()?.to_vec();
        xattrs.push((k, v));
    }
    let link = match r.u8()? {
        0 => None,
        1 => Some(r.string("link")?),
        _ => return Err(corrupt("bad link tag")),
    };
    let size = r.var()?;
    let data_offset = r.var()?;
    if data_offset
        .checked_add(size)
        .is_none_or(|end| end > uncompressed_size)
    {
        return Err(corrupt("entry data beyond the end of the stream"));
    }
    let sha256 = r.digest()?;
    let nc = r.count(1, "chunk digest")?;
    let mut chunk_sha256 = Vec::with_capacity(nc);
    for _ in 0..nc {
        chunk_sha256.push(r.digest()?.ok_or_else(|| corrupt("missing chunk digest"))?);
    }
    let expected_chunks = if size > CHUNK_SIZE {
        size.div_ceil(CHUNK_SIZE)
    } else {
        0
    };
    if kind == EntryKind::File && nc as u64 != expected_chunks {
        return Err(corrupt("chunk digest count does not match the size"));
    }
    if kind != EntryKind::File && (size != 0 || nc != 0) {
        return Err(corrupt("non-file entry with data"));
    }
    Ok(Entry {
        path: path.into(),
        kind,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        xattrs: xattrs.into(),
        link: link.map(Into::into),
        size,
        data_offset,
        sha256,
        chunk_sha256: chunk_sha256.into(),
    })
}

impl LayerIndex {
    /// Serialise into the stored format (`docs/index-format.md`).
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        // zstd into a Vec cannot fail short of allocation failure, which aborts anyway; fall
        // back to an empty frame-less output that decode rejects rather than panicking.
        let packed = zstd::bulk::Compressor::new(3)
            .and_then(|mut c| {
                c.include_checksum(true)?;
                c.include_contentsize(true)?;
                c.compress(&body)
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + packed.len());
        out.extend_from_slice(&FORMAT_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&packed);
        out
    }

    /// The uncompressed body of the stored format (what the zstd frame holds).
    pub(crate) fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(
            self.entries.len() * 128 + self.checkpoints.len() * 16 + 128,
        ));
        w.u8(match self.compression {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        });
        w.bytes(self.blob_digest.as_bytes());
        match &self.diff_id {
            None => w.u8(0),
            Some(d) => {
                w.u8(1);
                w.bytes(d.as_bytes());
            }
        }
        w.var(self.compressed_size);
        w.var(self.uncompressed_size);
        w.var(self.span);
        match &self.windows_digest {
            None => w.u8(0),
            Some(d) => {
                let d = d.strip_prefix("sha256:").unwrap_or(d);
                match Sha256::from_hex(d) {
                    Ok(d) => w.digest(Some(&d)),
                    // Never made by the builder; written so that reading it fails.
                    Err(_) => {
                        w.u8(2);
                        w.bytes(d.as_bytes());
                    }
                }
                w.var(self.windows_size);
            }
        }
        w.var(self.entries.len() as u64);
        for e in &self.entries {
            encode_entry(&mut w, e);
        }
        w.var(self.checkpoints.len() as u64);
        let (mut prev_u, mut prev_c, mut pack_end) = (0, 0, PACK_HEADER_LEN);
        for c in &self.checkpoints {
            w.var(c.uncompressed_offset.wrapping_sub(prev_u));
            w.var(c.compressed_offset.wrapping_sub(prev_c));
            (prev_u, prev_c) = (c.uncompressed_offset, c.compressed_offset);
            w.u8(c.bit_offset);
            match &c.window {
                None => w.var(0),
                Some(r) => {
                    w.var(r.len.into());
                    w.var(r.pack_offset.wrapping_sub(pack_end));
                    w.var(r.pack_len.into());
                    w.0.extend_from_slice(&r.crc32.to_le_bytes());
                    w.var(r.header_bits.into());
                    if r.header_bits > 0 {
                        w.u8(r.header_shift);
                    }
                    pack_end = r.pack_offset.wrapping_add(r.pack_len.into());
                }
            }
        }
        w.var(self.end_marks.len() as u64);
        let (mut prev_u, mut prev_c) = (0u64, 0u64);
        for b in &self.end_marks {
            w.var(b.uncompressed_offset.wrapping_sub(prev_u));
            w.var(b.compressed_end.wrapping_sub(prev_c));
            (prev_u, prev_c) = (b.uncompressed_offset, b.compressed_end);
        }
        w.0
    }

    /// Parse a stored index. Never panics; allocations are bounded by the decompressed body,
    /// which is capped at 1 GiB and checked against the header; the result satisfies every invariant [`super::plan`] and
    /// [`super::extract`] rely on.
    pub fn decode(data: &[u8]) -> Result<LayerIndex, IndexError> {
        if data.len() < HEADER_LEN || data[..8] != FORMAT_MAGIC {
            return Err(IndexError::BadMagic);
        }
        let version = u16::from_le_bytes([data[8], data[9]]);
        if version != FORMAT_VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let flags = u16::from_le_bytes([data[10], data[11]]);
        if flags != 0 {
            return Err(corrupt("unknown flags"));
        }
        let body_len = u64::from(u32::from_le_bytes([data[12], data[13], data[14], data[15]]));
        if body_len > MAX_BODY {
            return Err(corrupt("body too large"));
        }
        let mut body = Vec::new();
        let mut dec = zstd::stream::read::Decoder::with_buffer(&data[HEADER_LEN..])
            .map_err(|e| corrupt(format!("zstd: {e}")))?
            .single_frame()
            .take(body_len + 1);
        dec.read_to_end(&mut body)
            .map_err(|e| corrupt(format!("zstd: {e}")))?;
        if body.len() as u64 != body_len {
            return Err(corrupt("body length mismatch"));
        }
        Self::decode_body(&body)
    }

    /// Parse the uncompressed body of the stored format (see [`LayerIndex::decode`]).
    pub(crate) fn decode_body(body: &[u8]) -> Result<LayerIndex, IndexError> {
        let mut r = Reader { buf: body, pos: 0 };
        let compression = match r.u8()? {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Zstd,
            _ => return Err(corrupt("bad compression")),
        };
        let blob_digest = r.string("blob digest")?;
        let diff_id = match r.u8()? {
            0 => None,
            1 => Some(r.string("diff id")?),
            _ => return Err(corrupt("bad diff id tag")),
        };
        let compressed_size = r.var()?;
        let uncompressed_size = r.var()?;
        let span = r.var()?;
        let (windows_digest, windows_size) = match r.digest()? {
            None => (None, 0),
            Some(d) => {
                let size = r.var()?;
                if size < PACK_HEADER_LEN {
                    return Err(corrupt("windows pack too small"));
                }
                (Some(format!("sha256:{d}")), size)
            }
        };
        let ne = r.count(16, "entry")?;
        let mut entries = Vec::with_capacity(ne);
        for _ in 0..ne {
            entries.push(decode_entry(&mut r, uncompressed_size)?);
        }
        let nc = r.count(4, "checkpoint")?;
        let mut checkpoints: Vec<Checkpoint> = Vec::with_capacity(nc);
        let mut pack_end = PACK_HEADER_LEN;
        for _ in 0..nc {
            let (du, dc) = (r.var()?, r.var()?);
            let (pu, pc) = checkpoints
                .last()
                .map_or((0, 0), |p| (p.uncompressed_offset, p.compressed_offset));
            let (Some(uncompressed_offset), Some(compressed_offset)) =
                (pu.checked_add(du), pc.checked_add(dc))
            else {
                return Err(corrupt("checkpoint offset overflows"));
            };
            let bit_offset = r.u8()?;
            let window_len = r.var()?;
            let window = if window_len == 0 {
                None
            } else {
                let gap = r.var()?;
                let pack_len = r.var()?;
                let crc32 = u32::from_le_bytes(
                    r.take(4)?
                        .try_into()
                        .map_err(|_| corrupt("body ends early"))?,
                );
                let header_bits = r.var()?;
                let header_shift = if header_bits > 0 { r.u8()? } else { 0 };
                if header_bits > u64::from(super::windows::MAX_HEADER_BITS) || header_shift > 7 {
                    return Err(corrupt("bad block header in a checkpoint"));
                }
                let pack_offset = pack_end
                    .checked_add(gap)
                    .ok_or_else(|| corrupt("window offset overflows"))?;
                pack_end = pack_offset
                    .checked_add(pack_len)
                    .filter(|&end| end <= windows_size)
                    .ok_or_else(|| corrupt("window beyond the windows pack"))?;
                if window_len > WINDOW_SIZE as u64 || pack_len == 0 || pack_len > MAX_WINDOW_FRAME {
                    return Err(corrupt("bad checkpoint window"));
                }
                Some(WindowRef {
                    pack_offset,
                    pack_len: pack_len as u32,
                    len: window_len as u32,
                    crc32,
                    header_bits: header_bits as u16,
                    header_shift,
                })
            };
            if bit_offset > 7 {
                return Err(corrupt("bad checkpoint"));
            }
            if compression != Compression::Gzip && (bit_offset != 0 || window.is_some()) {
                return Err(corrupt("window on a non-gzip checkpoint"));
            }
            let ordered = match checkpoints.last() {
                None => uncompressed_offset == 0,
                Some(_) => du > 0 && dc > 0,
            };
            if !ordered
                || compressed_offset >= compressed_size.max(1)
                || uncompressed_offset > uncompressed_size
            {
                return Err(corrupt("checkpoints out of order or out of range"));
            }
            checkpoints.push(Checkpoint {
                uncompressed_offset,
                compressed_offset,
                bit_offset,
                window,
            });
        }
        let nb = r.count(2, "end mark")?;
        let mut end_marks: Vec<EndMark> = Vec::with_capacity(nb);
        for _ in 0..nb {
            let (du, dc) = (r.var()?, r.var()?);
            let (pu, pc) = end_marks
                .last()
                .map_or((0, 0), |p| (p.uncompressed_offset, p.compressed_end));
            let (Some(u), Some(c)) = (pu.checked_add(du), pc.checked_add(dc)) else {
                return Err(corrupt("end mark overflows"));
            };
            if du == 0 || dc == 0 || u > uncompressed_size || c > compressed_size {
                return Err(corrupt("end marks out of order or out of range"));
            }
            end_marks.push(EndMark {
                uncompressed_offset: u,
                compressed_end: c,
            });
        }
        if compression != Compression::Gzip && !end_marks.is_empty() {
            return Err(corrupt("end marks on a non-gzip layer"));
        }
        if r.left() != 0 {
            return Err(corrupt("trailing bytes in body"));
        }
        match compression {
            Compression::None if !checkpoints.is_empty() => {
                return Err(corrupt("checkpoints on a plain tar layer"));
            }
            Compression::None if compressed_size != uncompressed_size => {
                return Err(corrupt("plain tar sizes differ"));
            }
            Compression::Gzip | Compression::Zstd if checkpoints.is_empty() => {
                return Err(corrupt("compressed layer without checkpoints"));
            }
            _ => {}
        }
        Ok(LayerIndex {
            compression,
            blob_digest,
            diff_id,
            compressed_size,
            uncompressed_size,
            span,
            windows_digest,
            windows_size,
            entries,
            checkpoints,
            end_marks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut w = Writer(Vec::new());
            w.var(v);
            w.ivar(v as i64);
            let mut r = Reader { buf: &w.0, pos: 0 };
            assert_eq!(r.var().unwrap(), v);
            assert_eq!(r.ivar().unwrap(), v as i64);
        }
        let mut r = Reader {
            buf: &[0xff; 11],
            pos: 0,
        };
        assert!(r.var().is_err());
        let mut r = Reader {
            buf: &[0x80, 0x00],
            pos: 0,
        };
        assert!(r.var().is_err());
    }

    #[test]
    fn digests_are_raw_sha256_and_free_form_ones_are_refused() {
        let d = Sha256::of(b"x");
        let mut w = Writer(Vec::new());
        w.digest(None);
        w.digest(Some(&d));
        let mut r = Reader { buf: &w.0, pos: 0 };
        assert_eq!(r.digest().unwrap(), None);
        assert_eq!(r.digest().unwrap(), Some(d));
        // Tag 2, a free-form string (reserved by earlier versions, never written).
        let mut w = Writer(Vec::new());
        w.u8(2);
        w.bytes(b"md5:0123");
        let mut r = Reader { buf: &w.0, pos: 0 };
        assert!(matches!(r.digest(), Err(IndexError::CorruptIndex(_))));
    }

    #[test]
    fn rejects_garbage_headers() {
        assert!(matches!(LayerIndex::decode(b""), Err(IndexError::BadMagic)));
        let mut h = FORMAT_MAGIC.to_vec();
        h.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            LayerIndex::decode(&h),
            Err(IndexError::UnsupportedVersion(1))
        ));
        h[8] = 2;
        assert!(matches!(
            LayerIndex::decode(&h),
            Err(IndexError::CorruptIndex(_))
        ));
    }
}
