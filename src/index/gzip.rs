//! gzip framing around raw deflate: member headers and trailers, and the indexing decoder
//! that records zran checkpoints while it inflates.
//!
//! The deflate data of every member goes through one [`RawInflater`]; the gzip header and
//! trailer are parsed here, so the indexing pass and range extraction walk members the same
//! way and every checkpoint is a raw-deflate resume point (blob offset + bit offset + window).

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::trace;

use super::windows::{PackWriter, WindowPack};
use super::{Checkpoint, EndMark, IndexError};
use crate::sys::zlib::{Flush, InflateStatus, RawInflater};

/// Longest gzip member header accepted (FNAME/FCOMMENT/FEXTRA included).
pub(crate) const MAX_HEADER: usize = 64 * 1024;

const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;

/// Parse a gzip member header at the start of `buf`: `Ok(Some(len))` when complete,
/// `Ok(None)` when `buf` ends inside it, `Err` when it is not a (deflate) gzip header.
pub(crate) fn parse_header(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    if buf.first().is_some_and(|&b| b != 0x1f) || buf.get(1).is_some_and(|&b| b != 0x8b) {
        return Err("not a gzip member header");
    }
    if buf.len() < 10 {
        return Ok(None);
    }
    if buf[2] != 8 {
        return Err("gzip compression method is not deflate");
    }
    let flags = buf[3];
    if flags & 0xe0 != 0 {
        return Err("reserved gzip header flags set");
    }
    let mut pos = 10usize;
    if flags & FEXTRA != 0 {
        let Some(x) = buf.get(pos..pos + 2) else {
            return Ok(None);
        };
        pos += 2 + usize::from(u16::from_le_bytes([x[0], x[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let Some(rest) = buf.get(pos..) else {
                return Ok(None);
            };
            match rest.iter().position(|&b| b == 0) {
                Some(n) => pos += n + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        pos += 2;
    }
    if pos > buf.len() {
        Ok(None)
    } else {
        Ok(Some(pos))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// "Nothing signalled" in a [`FileHints`] slot.
pub(crate) const NO_FILE_START: u64 = u64::MAX;

/// What the tar walker tells the [`GzipIndexer`] it reads from: the stream offset where file
/// data (or a chunk of it) is about to start, or has just ended.
#[derive(Debug)]
pub(crate) struct FileHints {
    pub(crate) start: AtomicU64,
    pub(crate) end: AtomicU64,
}

impl Default for FileHints {
    fn default() -> Self {
        FileHints {
            start: AtomicU64::new(NO_FILE_START),
            end: AtomicU64::new(NO_FILE_START),
        }
    }
}

/// Inflates a whole gzip blob as a `Read`, verifying each member's CRC and length and
/// recording checkpoints (their windows go into a [`PackWriter`]).
///
/// Besides the regular checkpoint every `span` bytes, the tar walker reading from it can
/// signal through `file_start` that file data begins at the current output position; if the
/// last checkpoint is at least `file_span` back, the last deflate block boundary seen (which
/// is at or before the file start) becomes a checkpoint, so a read of that file inflates
/// from at most one deflate block before it.
pub(crate) struct GzipIndexer<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    /// Blob offset of `buf[start]`.
    pos: u64,
    out_total: u64,
    inflater: RawInflater,
    state: State,
    crc: flate2::Crc,
    members: u64,
    span: u64,
    boundary_span: u64,
    last_cp: u64,
    file_span: u64,
    hints: Arc<FileHints>,
    /// The last block boundary (uncompressed offset, bit position) after the last
    /// checkpoint, with its window in `cand_window`.
    cand: Option<(u64, u64)>,
    cand_window: Vec<u8>,
    pack: PackWriter,
    pub(crate) checkpoints: Vec<Checkpoint>,
    end_marks: Vec<EndMark>,
}

impl<R: Read> GzipIndexer<R> {
    pub(crate) fn new(
        inner: R,
        span: u64,
        boundary_span: u64,
        file_span: u64,
        hints: Arc<FileHints>,
    ) -> Result<Self, IndexError> {
        Ok(Self {
            inner,
            buf: vec![0u8; 256 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            pos: 0,
            out_total: 0,
            inflater: RawInflater::new_raw()?,
            state: State::Header,
            crc: flate2::Crc::new(),
            members: 0,
            span: span.max(1),
            boundary_span,
            last_cp: 0,
            file_span,
            hints,
            cand: None,
            cand_window: Vec::with_capacity(crate::sys::zlib::WINDOW_SIZE),
            pack: PackWriter::new(),
            checkpoints: Vec::new(),
            end_marks: Vec::new(),
        })
    }

    /// The checkpoints and their windows pack; `keep` checkpoints are kept (the rest, at the
    /// very end of the stream, are useless and dropped with their windows).
    pub(crate) fn finish(mut self, keep: usize) -> (Vec<Checkpoint>, Vec<EndMark>, WindowPack) {
        if let Some(w) = self
            .checkpoints
            .get(keep..)
            .and_then(|rest| rest.iter().find_map(|c| c.window))
        {
            self.pack.truncate(w.pack_offset);
        }
        self.checkpoints.truncate(keep);
        let (pos, out) = (self.pos, self.out_total);
        self.end_marks
            .retain(|b| b.compressed_end <= pos && b.uncompressed_offset <= out);
        (self.checkpoints, self.end_marks, self.pack.finish())
    }

    /// (blob bytes consumed, bytes produced) so far.
    pub(crate) fn position(&self) -> (u64, u64) {
        (self.pos, self.out_total)
    }

    /// Number of gzip members seen so far.
    pub(crate) fn members(&self) -> u64 {
        self.members
    }

    fn avail(&self) -> usize {
        self.end - self.start
    }

    fn advance(&mut self, n: usize) {
        self.start += n;
        self.pos += n as u64;
    }

    /// Read more blob bytes, keeping the unconsumed ones. Returns false at end of blob.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(true);
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn gzip_err(&self, reason: &'static str) -> io::Error {
        IndexError::Gzip {
            offset: self.pos,
            reason,
        }
        .into_io()
    }

    /// Records a checkpoint at `out` / `bit_pos` with `window` (empty at a member start).
    fn checkpoint(&mut self, out: u64, bit_pos: u64, window: &[u8]) -> io::Result<()> {
        if self
            .checkpoints
            .last()
            .is_some_and(|c| c.compressed_offset >= bit_pos / 8 || c.uncompressed_offset >= out)
        {
            // Same byte as the previous checkpoint: not worth one.
            return Ok(());
        }
        trace!(
            uncompressed = out,
            compressed_bits = bit_pos,
            window = window.len(),
            "gzip checkpoint"
        );
        let window = if window.is_empty() {
            None
        } else {
            Some(self.pack.push(window).map_err(IndexError::into_io)?)
        };
        self.checkpoints.push(Checkpoint {
            uncompressed_offset: out,
            compressed_offset: bit_pos / 8,
            bit_offset: (bit_pos % 8) as u8,
            window,
        });
        self.last_cp = out;
        self.cand = None;
        Ok(())
    }

    /// Records an end mark: all output so far came from the blob bytes before
    /// `compressed_end`.
    fn end_mark(&mut self, compressed_end: u64) {
        let m = EndMark {
            uncompressed_offset: self.out_total,
            compressed_end,
        };
        if self.end_marks.last().is_none_or(|b| {
            b.uncompressed_offset < m.uncompressed_offset && b.compressed_end < m.compressed_end
        }) {
            self.end_marks.push(m);
        }
    }

    /// Acts on what the tar walker signalled since the last read: file data ended here (an
    /// end mark) or starts here (checkpoint the last block boundary before it if the last
    /// checkpoint is far enough back).
    fn file_hints(&mut self) -> io::Result<()> {
        let end = self.hints.end.swap(NO_FILE_START, Ordering::Relaxed);
        if end == self.out_total && end > 0 {
            // Consumed input includes what zlib holds in its bit buffer: an upper bound.
            self.end_mark(self.pos);
        }
        let at = self.hints.start.swap(NO_FILE_START, Ordering::Relaxed);
        if at != self.out_total || self.file_span == 0 || at - self.last_cp < self.file_span {
            return Ok(());
        }
        if let Some((out, bit_pos)) = self.cand.take() {
            let window = std::mem::take(&mut self.cand_window);
            let r = self.checkpoint(out, bit_pos, &window);
            self.cand_window = window;
            r?;
        }
        Ok(())
    }

    fn read_header(&mut self) -> io::Result<()> {
        loop {
            match parse_header(&self.buf[self.start..self.end]) {
                Ok(Some(n)) => {
                    self.advance(n);
                    break;
                }
                Ok(None) => {
                    if self.avail() >= MAX_HEADER {
                        return Err(self.gzip_err("gzip member header too long"));
                    }
                    if !self.fill()? {
                        return Err(IndexError::Truncated {
                            what: "gzip member header",
                        }
                        .into_io());
                    }
                }
                Err(reason) => return Err(self.gzip_err(reason)),
            }
        }
        self.inflater.reset().map_err(|e| e.into_io())?;
        self.crc.reset();
        self.members += 1;
        if self.checkpoints.is_empty()
            || (self.out_total > self.last_cp
                && self.out_total - self.last_cp >= self.boundary_span)
        {
            self.checkpoint(self.out_total, self.pos * 8, &[])?;
        } else if self.out_total > self.last_cp {
            // A member start is a candidate that needs no window.
            self.cand = Some((self.out_total, self.pos * 8));
            self.cand_window.clear();
        }
        self.state = State::Deflate;
        Ok(())
    }

    fn read_trailer(&mut self) -> io::Result<()> {
        while self.avail() < 8 {
            if !self.fill()? {
                return Err(IndexError::Truncated {
                    what: "gzip member trailer",
                }
                .into_io());
            }
        }
        let t = &self.buf[self.start..self.start + 8];
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        if crc != self.crc.sum() {
            return Err(self.gzip_err("member CRC32 mismatch"));
        }
        if isize != self.crc.amount() {
            return Err(self.gzip_err("member length mismatch"));
        }
        self.advance(8);
        if self.avail() == 0 && !self.fill()? {
            self.state = State::Done;
        } else {
            self.state = State::Header;
        }
        Ok(())
    }
}

trait IntoIo {
    fn into_io(self) -> io::Error;
}

impl IntoIo for crate::sys::zlib::ZlibError {
    fn into_io(self) -> io::Error {
        IndexError::Zlib(self).into_io()
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.file_hints()?;
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Header => self.read_header()?,
                State::Trailer => self.read_trailer()?,
                State::Deflate => {
                    if self.avail() == 0 {
                        self.fill()?;
                    }
                    let step = self
                        .inflater
                        .inflate(&self.buf[self.start..self.end], out, Flush::Block)
                        .map_err(|source| {
                            IndexError::Deflate {
                                offset: self.pos,
                                source,
                            }
                            .into_io()
                        })?;
                    self.advance(step.consumed);
                    self.crc.update(&out[..step.produced]);
                    self.out_total += step.produced as u64;
                    match step.status {
                        InflateStatus::StreamEnd => self.state = State::Trailer,
                        InflateStatus::NeedMore => {
                            if self.avail() == 0 && self.eof {
                                return Err(IndexError::Truncated {
                                    what: "deflate stream",
                                }
                                .into_io());
                            }
                            if self.avail() > 0 && step.produced == 0 && step.consumed == 0 {
                                // Input and output room but no progress: cannot happen with a
                                // sane inflater; refuse to spin.
                                return Err(self.gzip_err("inflate made no progress"));
                            }
                        }
                        InflateStatus::Ok => {
                            if step.at_block_boundary() {
                                let bit_pos = self.pos * 8 - u64::from(step.unused_bits());
                                self.end_mark(bit_pos.div_ceil(8));
                            }
                            if step.at_block_boundary() && !step.last_block() {
                                let bit_pos = self.pos * 8 - u64::from(step.unused_bits());
                                if self.out_total - self.last_cp >= self.span {
                                    let window =
                                        self.inflater.dictionary().map_err(|e| e.into_io())?;
                                    self.checkpoint(self.out_total, bit_pos, &window)?;
                                } else if self.file_span > 0 && self.out_total > self.last_cp {
                                    self.inflater
                                        .dictionary_into(&mut self.cand_window)
                                        .map_err(|e| e.into_io())?;
                                    self.cand = Some((self.out_total, bit_pos));
                                }
                            }
                        }
                    }
                    if step.produced > 0 {
                        return Ok(step.produced);
                    }
                }
            }
        }
    }
}

/// Inflate gzip data from a checkpoint over an in-memory span, crossing member boundaries,
/// and hand out the uncompressed bytes to `out` until it returns `false` or the span ends.
/// Returns `Ok(())` also when the span ends early; the caller checks it got enough.
pub(crate) fn inflate_span(
    cp: &Checkpoint,
    window: &[u8],
    span_offset: u64,
    span: &[u8],
    mut out: impl FnMut(&[u8]) -> bool,
) -> Result<(), IndexError> {
    let mut inflater = RawInflater::new_raw()?;
    let mut pos = usize::try_from(cp.compressed_offset - span_offset)
        .map_err(|_| IndexError::CorruptIndex("checkpoint outside span".into()))?;
    let err_at = |pos: usize, reason| IndexError::Gzip {
        offset: span_offset + pos as u64,
        reason,
    };
    if cp.bit_offset > 0 {
        let Some(&b) = span.get(pos) else {
            return Ok(());
        };
        let bits = u32::from(cp.bit_offset);
        inflater.prime(8 - bits, u32::from(b) >> bits)?;
        pos += 1;
    }
    inflater.set_dictionary(window)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let input = span.get(pos..).unwrap_or(&[]);
        let step = inflater
            .inflate(input, &mut buf, Flush::None)
            .map_err(|source| IndexError::Deflate {
                offset: span_offset + pos as u64,
                source,
            })?;
        pos += step.consumed;
        if step.produced > 0 && !out(&buf[..step.produced]) {
            return Ok(());
        }
        match step.status {
            InflateStatus::Ok => {}
            InflateStatus::NeedMore => {
                if pos >= span.len() {
                    return Ok(());
                }
                if step.consumed == 0 && step.produced == 0 {
                    return Err(err_at(pos, "inflate made no progress"));
                }
            }
            InflateStatus::StreamEnd => {
                // Trailer, then the next member's header (if the span reaches it).
                pos += 8;
                let rest = span.get(pos..).unwrap_or(&[]);
                match parse_header(rest) {
                    Ok(Some(n)) => pos += n,
                    Ok(None) => return Ok(()),
                    Err(reason) => return Err(err_at(pos, reason)),
                }
                inflater.reset()?;
            }
        }
    }
}
