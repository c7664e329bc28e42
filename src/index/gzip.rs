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
use crate::sys::zlib::{Flush, InflateStatus, RawInflater, WINDOW_SIZE};

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
    /// Consumed blob bytes just before `buf[0]` (for block headers that straddle a refill).
    trail: Vec<u8>,
    /// Unused bits the inflater held after its last call.
    last_unused: u32,
    /// The Huffman block being decoded, once its header is complete.
    block: Option<BlockHeader>,
    /// The last output bytes (at least 32 KiB + 258 once there is that much).
    hist: Vec<u8>,
    /// `out_total` at the start of the current member.
    member_start: u64,
}

/// Where the current deflate block's header sits: what a mid-block checkpoint must replay.
struct BlockHeader {
    start_bit: u64,
    end_bit: Option<u64>,
    stored: bool,
    bytes: Vec<u8>,
}

/// Output a mid-block checkpoint must reproduce at indexing time before it is kept.
const VERIFY_AHEAD: usize = 16 << 10;

/// Output compared at a time while a mid-block resume is verified.
const RESUME_PIECE: usize = 1 << 10;

/// Output history kept for mid-block windows.
const HIST_KEEP: usize = 64 << 10;

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
            cand_window: Vec::with_capacity(WINDOW_SIZE),
            pack: PackWriter::new(),
            checkpoints: Vec::new(),
            end_marks: Vec::new(),
            trail: Vec::new(),
            last_unused: 0,
            block: None,
            hist: Vec::with_capacity(2 * HIST_KEEP),
            member_start: 0,
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
            let keep = 1024usize;
            let take = self.start.min(keep);
            let drop = (self.trail.len() + take).saturating_sub(keep);
            self.trail.drain(..drop.min(self.trail.len()));
            self.trail
                .extend_from_slice(&self.buf[self.start - take..self.start]);
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

    /// Blob bytes `from..to` if they are still in the trail or the buffer.
    fn blob_bytes(&self, from: u64, to: u64) -> Option<Vec<u8>> {
        let buf_base = self.pos - self.start as u64;
        let trail_base = buf_base - self.trail.len() as u64;
        if from < trail_base || to > buf_base + self.end as u64 || from > to {
            return None;
        }
        let mut v = Vec::with_capacity((to - from) as usize);
        for off in from..to {
            v.push(if off < buf_base {
                self.trail[(off - trail_base) as usize]
            } else {
                self.buf[(off - buf_base) as usize]
            });
        }
        Some(v)
    }

    fn gzip_err(&self, reason: &'static str) -> io::Error {
        IndexError::Gzip {
            offset: self.pos,
            reason,
        }
        .into_io()
    }

    /// Records a checkpoint at `out` / `bit_pos` with `window` (empty at a member start)
    /// and, for a checkpoint inside a Huffman block, that block's header (bytes, bit shift
    /// in the first byte, length in bits).
    fn checkpoint(
        &mut self,
        out: u64,
        bit_pos: u64,
        window: &[u8],
        header: Option<(&[u8], u8, u16)>,
    ) -> io::Result<()> {
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
            Some(
                self.pack
                    .push(window, header)
                    .map_err(IndexError::into_io)?,
            )
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
        if self.mid_block_checkpoint()? {
            return Ok(());
        }
        if let Some((out, bit_pos)) = self.cand.take() {
            let window = std::mem::take(&mut self.cand_window);
            let r = self.checkpoint(out, bit_pos, &window, None);
            self.cand_window = window;
            r?;
        }
        Ok(())
    }

    /// A checkpoint right at the code being decoded, inside the current Huffman block: the
    /// reader replays the block header, then continues from the code. Returns whether one
    /// was recorded.
    fn mid_block_checkpoint(&mut self) -> io::Result<bool> {
        if self.state != State::Deflate {
            return Ok(false);
        }
        // Make zlib decode the next code without room to write it: afterwards its mark is
        // exact (right after a completed code it would still name that code's bits).
        let step = self
            .inflater
            .inflate(&self.buf[self.start..self.end], &mut [], Flush::Block)
            .map_err(|source| {
                IndexError::Deflate {
                    offset: self.pos,
                    source,
                }
                .into_io()
            })?;
        self.advance(step.consumed);
        self.after_step(&[], &step);
        if step.status == InflateStatus::StreamEnd {
            self.state = State::Trailer;
            return Ok(false);
        }
        let Some(BlockHeader {
            start_bit,
            end_bit: Some(end_bit),
            stored: false,
            bytes,
        }) = &self.block
        else {
            return Ok(false);
        };
        let Some((back, emitted)) = self.inflater.mark() else {
            return Ok(false);
        };
        let now_bit = self.pos * 8 - u64::from(self.last_unused);
        let (Some(x), Some(u)) = (
            now_bit.checked_sub(back),
            self.out_total.checked_sub(emitted),
        ) else {
            return Ok(false);
        };
        let wlen = (u - self.member_start).min(WINDOW_SIZE as u64) as usize;
        let hist_end = self.hist.len().checked_sub(emitted as usize);
        let (Some(hist_end), true) = (hist_end, x >= *end_bit && wlen > 0) else {
            return Ok(false);
        };
        let Some(hist_start) = hist_end.checked_sub(wlen) else {
            return Ok(false);
        };
        let Ok(bits) = u16::try_from(end_bit - start_bit) else {
            return Ok(false);
        };
        let (bytes, shift) = (bytes.clone(), (start_bit % 8) as u8);
        let window = self.hist[hist_start..hist_end].to_vec();
        // zlib-rs 0.6 leaves the distance code's bits out of the mark, so the mark can be a
        // few bits late: find the resume bit that reproduces the stream's own output (the
        // next VERIFY_AHEAD bytes, whatever they need: short checks let rare bad resumes
        // through). A checkpoint that cannot be verified is not recorded.
        let Ok(ahead) = self.inflater.try_clone() else {
            return Ok(false);
        };
        let Some(x) = self.verify_resume(ahead, x, u, &bytes, shift, bits, &window) else {
            return Ok(false);
        };
        self.checkpoint(u, x, &window, Some((&bytes, shift, bits)))?;
        Ok(self.last_cp == u)
    }

    /// The bit near `x` (the mark, or up to 15 bits before it, or 4 after) at which
    /// "block header + stream from there" inflates to what the stream itself produces from
    /// `u` on: the output held in `hist` plus up to [`VERIFY_AHEAD`] more from a copy of the
    /// inflater. Every candidate is tried, and the checkpoint is kept only when exactly one
    /// reproduces that output: where the data repeats (runs of zeros, padding), several
    /// resume bits inflate to the same [`VERIFY_AHEAD`] bytes, and any but the true one
    /// drifts later (libLLVM-14's checkpoint at 94,372,191 matched at seven bits and went
    /// wrong 113,521 bytes on from the first: `checkpoint_resume_is_exact_or_absent` in
    /// `tests/index.rs`). An ambiguous spot gets no checkpoint; the next file start may.
    #[allow(clippy::too_many_arguments)]
    fn verify_resume(
        &self,
        mut ahead: RawInflater,
        x: u64,
        u: u64,
        header: &[u8],
        shift: u8,
        bits: u16,
        window: &[u8],
    ) -> Option<u64> {
        let emitted = (self.out_total - u) as usize;
        let mut expected = self.hist[self.hist.len() - emitted..].to_vec();
        let mut more = vec![0u8; VERIFY_AHEAD];
        let mut input = &self.buf[self.start..self.end];
        let mut got = 0;
        while got < more.len() {
            let step = ahead.inflate(input, &mut more[got..], Flush::None).ok()?;
            input = &input[step.consumed..];
            got += step.produced;
            if step.status != InflateStatus::Ok || (step.consumed == 0 && step.produced == 0) {
                break;
            }
        }
        expected.extend_from_slice(&more[..got]);
        if expected.len() < 64 {
            return None;
        }
        let buf_end = self.pos - self.start as u64 + self.end as u64;
        let mut out = vec![0u8; expected.len()];
        let deltas = (0..=15i64).map(|d| -d).chain(1..=4);
        let mut found = None;
        for d in deltas {
            let Some(xd) = x.checked_add_signed(d) else {
                continue;
            };
            let Some(src) = self.blob_bytes(xd / 8, buf_end.min(xd / 8 + 2 * VERIFY_AHEAD as u64))
            else {
                continue;
            };
            let mut bw = BitWriter::default();
            bw.copy_bits(header, u64::from(shift), u64::from(bits));
            bw.copy_bits(&src, xd % 8, src.len() as u64 * 8);
            let spliced = bw.finish();
            let Ok(mut inf) = RawInflater::new_raw() else {
                return None;
            };
            if inf.set_dictionary(window).is_err() {
                return None;
            }
            // In pieces, so that a wrong resume (most of them) stops at its first wrong byte.
            let (mut at, mut n) = (0usize, 0usize);
            while n < out.len() {
                let end = (n + RESUME_PIECE).min(out.len());
                let Ok(step) = inf.inflate(&spliced[at..], &mut out[n..end], Flush::None) else {
                    break;
                };
                if out[n..n + step.produced] != expected[n..n + step.produced] {
                    break;
                }
                at += step.consumed;
                n += step.produced;
                if step.status != InflateStatus::Ok || (step.consumed == 0 && step.produced == 0) {
                    break;
                }
            }
            if n == out.len() {
                if found.is_some() {
                    // Two resume bits fit: the output cannot tell the true one.
                    return None;
                }
                found = Some(xd);
            }
        }
        found
    }

    /// A deflate block header starts at `start_bit`. Its type decides how the next inflate
    /// calls run: a Huffman block's header end is found with [`Flush::Trees`]; a stored
    /// block (or one whose type bits are not buffered yet) gets no mid-block checkpoints and
    /// plain [`Flush::Block`] (zlib-rs 0.6 loses its place if `Z_TREES` stops after a
    /// stored block header).
    fn start_block(&mut self, start_bit: u64) {
        let two = self.blob_bytes(start_bit / 8, start_bit / 8 + 2);
        let btype = two.map(|b| {
            let v = u16::from(b[0]) | (u16::from(b[1]) << 8);
            (v >> (start_bit % 8 + 1)) & 0b11
        });
        self.block = Some(match btype {
            // Fixed Huffman codes: the header is the 3 bits just read.
            Some(0b01) => BlockHeader {
                start_bit,
                end_bit: Some(start_bit + 3),
                stored: false,
                bytes: self
                    .blob_bytes(start_bit / 8, (start_bit + 3).div_ceil(8))
                    .unwrap_or_default(),
            },
            // Dynamic codes: Flush::Trees finds the end of the header.
            Some(0b10) => BlockHeader {
                start_bit,
                end_bit: None,
                stored: false,
                bytes: Vec::new(),
            },
            _ => BlockHeader {
                start_bit,
                end_bit: None,
                stored: true,
                bytes: Vec::new(),
            },
        });
    }

    /// How far the next inflate call may run.
    fn flush(&self) -> Flush {
        match &self.block {
            Some(b) if b.end_bit.is_none() && !b.stored => Flush::Trees,
            _ => Flush::Block,
        }
    }

    /// Bookkeeping after an inflate step: history, block header tracking.
    fn after_step(&mut self, produced: &[u8], step: &crate::sys::zlib::InflateStep) {
        self.last_unused = step.unused_bits();
        if !produced.is_empty() {
            self.hist.extend_from_slice(produced);
            if self.hist.len() > 2 * HIST_KEEP {
                self.hist.drain(..self.hist.len() - HIST_KEEP);
            }
        }
        let bit_pos = self.pos * 8 - u64::from(step.unused_bits());
        if step.at_block_boundary() && !step.last_block() {
            self.start_block(bit_pos);
        } else if step.at_header_end() {
            let pending = self
                .block
                .as_ref()
                .and_then(|b| (b.end_bit.is_none() && !b.stored).then_some(b.start_bit));
            if let Some(start_bit) = pending {
                let bytes = self.blob_bytes(start_bit / 8, bit_pos.div_ceil(8));
                self.block = bytes.map(|bytes| BlockHeader {
                    start_bit,
                    end_bit: Some(bit_pos),
                    stored: false,
                    bytes,
                });
            }
        }
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
            self.checkpoint(self.out_total, self.pos * 8, &[], None)?;
        } else if self.out_total > self.last_cp {
            // A member start is a candidate that needs no window.
            self.cand = Some((self.out_total, self.pos * 8));
            self.cand_window.clear();
        }
        self.member_start = self.out_total;
        self.start_block(self.pos * 8);
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
                    let flush = self.flush();
                    let step = self
                        .inflater
                        .inflate(&self.buf[self.start..self.end], out, flush)
                        .map_err(|source| {
                            IndexError::Deflate {
                                offset: self.pos,
                                source,
                            }
                            .into_io()
                        })?;
                    self.advance(step.consumed);
                    self.after_step(&out[..step.produced], &step);
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
                                    self.checkpoint(self.out_total, bit_pos, &window, None)?;
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

/// Appends bit ranges of byte slices (deflate bit order: least significant bit first).
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Appends `count` bits of `src` starting at bit `from` (fewer if `src` ends first).
    fn copy_bits(&mut self, src: &[u8], from: u64, count: u64) {
        let end = from.saturating_add(count).min(src.len() as u64 * 8);
        // `from` may lie past the end of `src` (a checkpoint at the span's last byte, a
        // header shorter than the index says): nothing to copy.
        let mut bit = from.min(end);
        self.out.reserve((end - bit).div_ceil(8) as usize);
        // Bulk: 32 bits at a time out of an unaligned 8-byte load (at most 7 bits of shift
        // leave 57 valid bits). The accumulator holds fewer than 8 bits between pieces, so
        // the piece fits beside them.
        while end.saturating_sub(bit) >= 32 && (bit / 8) as usize + 8 <= src.len() {
            let at = (bit / 8) as usize;
            let mut word = [0u8; 8];
            word.copy_from_slice(&src[at..at + 8]);
            let v = (u64::from_le_bytes(word) >> (bit % 8)) & 0xffff_ffff;
            self.acc |= v << self.n;
            self.n += 32;
            bit += 32;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        while bit < end {
            let byte = src[(bit / 8) as usize];
            let shift = (bit % 8) as u32;
            let take = (8 - shift).min((end - bit) as u32);
            let v = (u64::from(byte) >> shift) & ((1u64 << take) - 1);
            self.acc |= v << self.n;
            self.n += take;
            bit += u64::from(take);
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.out
    }

    /// Pads the bits held back to a whole byte and appends it.
    fn flush(&mut self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc = 0;
            self.n = 0;
        }
    }
}

/// Spliced bytes kept ahead of the inflater: the splice only lasts to the end of the block
/// the checkpoint is in, so the span is spliced a piece at a time, not whole (splicing all
/// of an 8 MiB read cost a tenth of the fill threads' CPU).
const SPLICE_AHEAD: usize = 16 << 10;

/// A Huffman block's header followed by the span's bits from a checkpoint's bit on,
/// produced as the inflater asks for it.
struct Splice {
    bits: BitWriter,
    /// Next span bit to copy.
    next: u64,
    /// Span bits end here.
    end: u64,
    /// Bytes of `bits.out` the inflater has consumed.
    at: usize,
}

impl Splice {
    /// Copies span bits until `SPLICE_AHEAD` unconsumed bytes are ready or the span ends
    /// (then the last partial byte is padded out).
    fn fill_ahead(&mut self, span: &[u8]) {
        while self.bits.out.len() - self.at < SPLICE_AHEAD && self.next < self.end {
            let take = (self.end - self.next).min(SPLICE_AHEAD as u64 * 8);
            self.bits.copy_bits(span, self.next, take);
            self.next += take;
            if self.next >= self.end {
                self.bits.flush();
            }
        }
    }

    fn input(&self) -> &[u8] {
        self.bits.out.get(self.at..).unwrap_or(&[])
    }

    fn exhausted(&self) -> bool {
        self.next >= self.end && self.at >= self.bits.out.len()
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
    // Inside a Huffman block: inflate "block header, then the stream from the checkpoint's
    // bit" (spliced bit by bit) to the end of that block, then go on with the span itself
    // (the splice shifts byte boundaries, which a later stored block depends on) from a
    // fresh inflater primed with the history so far.
    let header = cp.window.filter(|w| w.header_bits > 0);
    let hlen = header.map_or(0, |w| w.header_len());
    let start_bit = pos as u64 * 8 + u64::from(cp.bit_offset);
    let mut spliced: Option<Splice> = None;
    if let Some(w) = header {
        let hdr = window.get(..hlen).unwrap_or(&[]);
        let mut bits = BitWriter::default();
        bits.copy_bits(hdr, u64::from(w.header_shift), u64::from(w.header_bits));
        let end = span.len() as u64 * 8;
        spliced = Some(Splice {
            bits,
            next: start_bit.min(end),
            end,
            at: 0,
        });
    } else if cp.bit_offset > 0 {
        let Some(&b) = span.get(pos) else {
            return Ok(());
        };
        let bits = u32::from(cp.bit_offset);
        inflater.prime(8 - bits, u32::from(b) >> bits)?;
        pos += 1;
    }
    let dict = window.get(hlen..).unwrap_or(&[]);
    inflater.set_dictionary(dict)?;
    // History while spliced (window, then output), for the fresh inflater after the block.
    let mut hist: Vec<u8> = if spliced.is_some() {
        dict.to_vec()
    } else {
        Vec::new()
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(sp) = &mut spliced {
            sp.fill_ahead(span);
        }
        let (input, flush) = match &spliced {
            Some(sp) => (sp.input(), Flush::Block),
            None => (span.get(pos..).unwrap_or(&[]), Flush::None),
        };
        let step =
            inflater
                .inflate(input, &mut buf, flush)
                .map_err(|source| IndexError::Deflate {
                    offset: span_offset + pos as u64,
                    source,
                })?;
        let exhausted = match &mut spliced {
            Some(sp) => {
                sp.at += step.consumed;
                sp.exhausted()
            }
            None => {
                pos += step.consumed;
                pos >= span.len()
            }
        };
        if spliced.is_some() && step.produced > 0 {
            hist.extend_from_slice(&buf[..step.produced]);
            if hist.len() > 4 * WINDOW_SIZE {
                hist.drain(..hist.len() - WINDOW_SIZE);
            }
        }
        if step.produced > 0 && !out(&buf[..step.produced]) {
            return Ok(());
        }
        match step.status {
            InflateStatus::Ok => {
                if let (Some(sp), Some(w)) = (&spliced, header) {
                    if step.at_block_boundary() {
                        // Back to the span's own bits at the same point of the stream.
                        let s_bits =
                            (sp.at as u64 * 8).saturating_sub(u64::from(step.unused_bits()));
                        let orig = (start_bit + s_bits).saturating_sub(u64::from(w.header_bits));
                        spliced = None;
                        inflater = RawInflater::new_raw()?;
                        if step.last_block() {
                            // The member's deflate data ends here: trailer, next member.
                            pos = usize::try_from(orig.div_ceil(8))
                                .unwrap_or(usize::MAX)
                                .saturating_add(8);
                            match parse_header(span.get(pos..).unwrap_or(&[])) {
                                Ok(Some(n)) => pos += n,
                                Ok(None) => return Ok(()),
                                Err(reason) => return Err(err_at(pos, reason)),
                            }
                            continue;
                        }
                        pos = usize::try_from(orig / 8).unwrap_or(usize::MAX);
                        let r = (orig % 8) as u32;
                        if r > 0 {
                            let Some(&b) = span.get(pos) else {
                                return Ok(());
                            };
                            inflater.prime(8 - r, u32::from(b) >> r)?;
                            pos += 1;
                        }
                        inflater.set_dictionary(&hist)?;
                        hist = Vec::new();
                    }
                }
            }
            InflateStatus::NeedMore => {
                if exhausted {
                    return Ok(());
                }
                if step.consumed == 0 && step.produced == 0 {
                    return Err(err_at(pos, "inflate made no progress"));
                }
            }
            InflateStatus::StreamEnd => {
                if let (Some(Splice { at, .. }), Some(w)) = (spliced.take(), header) {
                    // Map the end of the deflate stream back to the span: spliced bit `b`
                    // is span bit `start_bit + b - header_bits`; the trailer starts at the
                    // next byte boundary of the span.
                    let end_bits = (at as u64 * 8).saturating_sub(u64::from(step.unused_bits()));
                    let span_bits = (start_bit + end_bits).saturating_sub(u64::from(w.header_bits));
                    let p0 = usize::try_from(span_bits.div_ceil(8)).unwrap_or(usize::MAX);
                    // The inflater may have dropped the stream's last partial byte of the
                    // spliced input, which is not the span's: the trailer starts at p0 or
                    // the byte before; the next member's header tells which.
                    let header_at = |p: usize| {
                        p.checked_add(8)
                            .and_then(|h| span.get(h..))
                            .is_some_and(|rest| matches!(parse_header(rest), Ok(Some(_))))
                    };
                    pos = match p0.checked_sub(1) {
                        Some(p) if header_at(p) => p,
                        _ => p0,
                    };
                }
                // Trailer, then the next member's header (if the span reaches it).
                pos = pos.saturating_add(8);
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

#[cfg(test)]
mod tests {
    use super::BitWriter;

    /// The bit-at-a-time definition of `copy_bits`.
    fn reference(pieces: &[(&[u8], u64, u64)]) -> Vec<u8> {
        let mut bits = Vec::new();
        for (src, from, count) in pieces {
            let end = from.saturating_add(*count).min(src.len() as u64 * 8);
            for b in *from..end {
                bits.push((src[(b / 8) as usize] >> (b % 8)) & 1);
            }
        }
        bits.chunks(8)
            .map(|c| c.iter().enumerate().fold(0u8, |a, (i, b)| a | (b << i)))
            .collect()
    }

    #[test]
    fn copy_bits_matches_the_bitwise_definition() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for head_bits in [0u64, 1, 3, 7, 8, 13] {
            // The last four start near, at and past the end of `data` (found by fuzzing: an
            // overflow when a checkpoint sits at the span's end).
            for from in [
                0u64,
                1,
                5,
                7,
                8,
                9,
                63,
                100,
                4096 * 8 - 3,
                4096 * 8,
                4096 * 8 + 3,
                4096 * 8 + 9,
            ] {
                for count in [0u64, 1, 31, 32, 33, 64, 1000, 40_000] {
                    let pieces: [(&[u8], u64, u64); 3] = [
                        (&data[..4], 3, head_bits),
                        (&data[..0], 5, head_bits),
                        (&data, from, count),
                    ];
                    let mut bw = BitWriter::default();
                    for (s, f, c) in pieces {
                        bw.copy_bits(s, f, c);
                    }
                    assert_eq!(
                        bw.finish(),
                        reference(&pieces),
                        "head {head_bits} from {from} count {count}"
                    );
                }
            }
        }
    }
}
