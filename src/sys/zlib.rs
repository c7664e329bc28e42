//! Raw-deflate random access over `libz-rs-sys`: the two zlib calls `flate2` does not expose.
//!
//! zran-style gzip checkpoints need `inflatePrime` (resume in the middle of a byte),
//! `inflateSetDictionary` (hand the 32 KiB window back to a fresh raw inflater),
//! `inflateGetDictionary` (take the window at a checkpoint) and `inflate(Z_BLOCK)` with the
//! `data_type` bits that say "stopped at a deflate block boundary"; for checkpoints inside a
//! deflate block also `inflate(Z_TREES)` (stop after a block header), `inflateMark` (where
//! the current code began) and `inflateCopy` (look ahead on a copy). [`RawInflater`] owns one
//! boxed `z_stream` and offers exactly those operations through a safe API; no pointer into a
//! caller buffer outlives a call.

use std::fmt;

use libz_rs_sys as z;

/// Size of the deflate history window: the most a back-reference can reach.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// A zlib call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zlib {call} failed with code {code}{}", msg.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct ZlibError {
    /// The zlib function that failed.
    pub call: &'static str,
    /// The zlib return code (`Z_DATA_ERROR` = -3, ...).
    pub code: i32,
    /// zlib's own message, if it set one.
    pub msg: Option<String>,
}

/// How far one [`RawInflater::inflate`] call may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Run until input or output runs out (`Z_NO_FLUSH`).
    None,
    /// Additionally stop at every deflate block boundary (`Z_BLOCK`).
    Block,
    /// Like [`Flush::Block`], and also right after each block header (`Z_TREES`).
    Trees,
}

/// Outcome of one [`RawInflater::inflate`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateStatus {
    /// Progress was made; call again.
    Ok,
    /// The end of the deflate stream (the final block) was reached.
    StreamEnd,
    /// No progress was possible: more input (or output room) is needed.
    NeedMore,
}

/// What one [`RawInflater::inflate`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateStep {
    /// Input bytes consumed (some of the last one's bits may be unused: see
    /// [`InflateStep::unused_bits`]).
    pub consumed: usize,
    /// Output bytes written.
    pub produced: usize,
    /// Whether the stream ended or more is needed.
    pub status: InflateStatus,
    /// zlib's `data_type` after the call: unused bit count, "last block" (64), "at a block
    /// boundary" (128).
    pub data_type: i32,
}

impl InflateStep {
    /// The inflater stopped right after a block (or before the first one).
    pub fn at_block_boundary(&self) -> bool {
        self.data_type & 128 != 0
    }

    /// The block just finished was the final block of the stream.
    pub fn last_block(&self) -> bool {
        self.data_type & 64 != 0
    }

    /// The inflater stopped right after a block header, before the block's data
    /// ([`Flush::Trees`]).
    pub fn at_header_end(&self) -> bool {
        self.data_type & 256 != 0
    }

    /// Bits of the consumed input that the inflater holds but has not used yet. zlib keeps
    /// fewer than 8; zlib-rs may keep more, so callers must not assume `< 8`.
    pub fn unused_bits(&self) -> u32 {
        // Bits 0..=5 hold the count; the flags start at 64.
        (self.data_type & 63) as u32
    }
}

/// A raw-deflate (no zlib/gzip wrapper) inflater that can be resumed at any bit position.
pub struct RawInflater {
    /// Boxed because zlib keeps a pointer from its internal state back to the stream: the
    /// `z_stream` must never move after `inflateInit2_`.
    strm: Box<z::z_stream>,
}

// SAFETY: the z_stream and the state it points to are owned exclusively by this value (no
// thread-local or shared data in zlib-rs); the in/out pointers are reset to null after every
// call, so moving the owner to another thread cannot leave a dangling borrow behind.
unsafe impl Send for RawInflater {}

impl fmt::Debug for RawInflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawInflater")
            .field("total_in", &self.strm.total_in)
            .field("total_out", &self.strm.total_out)
            .finish()
    }
}

impl RawInflater {
    /// A fresh raw inflater (`windowBits = -15`).
    pub fn new_raw() -> Result<Self, ZlibError> {
        // `Default` installs the Rust allocator (feature `rust-allocator`).
        let mut strm = Box::new(z::z_stream::default());
        let stream_size = i32::try_from(std::mem::size_of::<z::z_stream>()).unwrap_or(i32::MAX);
        // SAFETY: `strm` points to a valid, default-initialised z_stream with allocator fields
        // set; the version string is the library's own NUL-terminated constant.
        let rc = unsafe { z::inflateInit2_(&mut *strm, -15, z::zlibVersion(), stream_size) };
        if rc != z::Z_OK {
            // No state was allocated and no RawInflater exists, so Drop (inflateEnd) never
            // runs on this stream; the box is simply freed.
            return Err(ZlibError {
                call: "inflateInit2",
                code: rc,
                msg: None,
            });
        }
        Ok(Self { strm })
    }

    fn err(&self, call: &'static str, code: i32) -> ZlibError {
        let msg = if self.strm.msg.is_null() {
            None
        } else {
            // SAFETY: zlib-rs only ever stores pointers to static NUL-terminated strings in
            // `msg`, and it is non-null here.
            let c = unsafe { std::ffi::CStr::from_ptr(self.strm.msg) };
            Some(c.to_string_lossy().into_owned())
        };
        ZlibError { call, code, msg }
    }

    /// Forget everything (window, bits, position): ready for a new raw deflate stream.
    pub fn reset(&mut self) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by `inflateInit2_` in `new_raw`.
        let rc = unsafe { z::inflateReset(&mut *self.strm) };
        if rc != z::Z_OK {
            return Err(self.err("inflateReset", rc));
        }
        Ok(())
    }

    /// Insert the `bits` (at most 16) low bits of `value` in front of the next input byte:
    /// used to resume at a bit offset in the middle of a byte. Call before the first
    /// [`RawInflater::inflate`] after [`RawInflater::new_raw`] or [`RawInflater::reset`].
    pub fn prime(&mut self, bits: u32, value: u32) -> Result<(), ZlibError> {
        if bits > 16 {
            return Err(ZlibError {
                call: "inflatePrime",
                code: z::Z_STREAM_ERROR,
                msg: None,
            });
        }
        let bits = bits as i32;
        let value = (value & 0xffff) as i32;
        // SAFETY: initialised stream; `bits` is checked to be in 0..=16.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, bits, value) };
        if rc != z::Z_OK {
            return Err(self.err("inflatePrime", rc));
        }
        Ok(())
    }

    /// Preload the history window (the output that preceded the resume point). At most the
    /// last [`WINDOW_SIZE`] bytes matter.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), ZlibError> {
        let dict = &dict[dict.len().saturating_sub(WINDOW_SIZE)..];
        if dict.is_empty() {
            return Ok(());
        }
        // `dict.len()` is at most WINDOW_SIZE, so it fits a u32.
        let len = dict.len() as u32;
        // SAFETY: initialised raw stream; `dict` is a valid slice of `len` bytes that zlib
        // copies into its own window before returning.
        let rc = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        if rc != z::Z_OK {
            return Err(self.err("inflateSetDictionary", rc));
        }
        Ok(())
    }

    /// A copy of the current history window (up to [`WINDOW_SIZE`] bytes, fewer near the
    /// start of a stream).
    pub fn dictionary(&self) -> Result<Vec<u8>, ZlibError> {
        let mut buf = Vec::with_capacity(WINDOW_SIZE);
        self.dictionary_into(&mut buf)?;
        Ok(buf)
    }

    /// Like [`RawInflater::dictionary`], into `buf` (cleared first; its allocation is reused).
    pub fn dictionary_into(&self, buf: &mut Vec<u8>) -> Result<(), ZlibError> {
        buf.clear();
        buf.resize(WINDOW_SIZE, 0);
        let mut len: u32 = 0;
        // SAFETY: initialised stream; `buf` has WINDOW_SIZE writable bytes, which zlib
        // documents as always enough; `len` is a valid out-pointer.
        let rc = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        if rc != z::Z_OK {
            buf.clear();
            return Err(self.err("inflateGetDictionary", rc));
        }
        buf.truncate((len as usize).min(WINDOW_SIZE));
        Ok(())
    }

    /// An independent copy of this inflater's whole state (`inflateCopy`): to look ahead
    /// without disturbing it.
    pub fn try_clone(&mut self) -> Result<RawInflater, ZlibError> {
        let mut strm = Box::new(z::z_stream::default());
        let mut dummy = [0u8; 1];
        // inflateCopy refuses a stream without an output pointer; it only reads the state.
        self.strm.next_out = dummy.as_mut_ptr();
        self.strm.avail_out = 0;
        // SAFETY: `self.strm` is an initialised stream whose next_out points to a live
        // 1-byte buffer for the call (avail_out 0; nothing is written); `strm` is a fresh,
        // default z_stream that inflateCopy initialises as a deep copy (own state and
        // window). On failure nothing was allocated in it and it is just freed.
        let rc = unsafe { z::inflateCopy(&mut *strm, &*self.strm) };
        self.strm.next_out = std::ptr::null_mut();
        strm.next_out = std::ptr::null_mut();
        strm.avail_out = 0;
        if rc != z::Z_OK {
            return Err(ZlibError {
                call: "inflateCopy",
                code: rc,
                msg: None,
            });
        }
        Ok(RawInflater { strm })
    }

    /// Where the code being decoded started (`inflateMark`): `Some((bits_back, emitted))`
    /// when inside a Huffman-coded block: the current literal or length/distance code began
    /// `bits_back` bits before the current input position and `emitted` bytes of its output
    /// were already produced. `None` outside a block or in a stored block.
    pub fn mark(&mut self) -> Option<(u64, u64)> {
        let mut dummy = [0u8; 1];
        // inflateMark refuses a stream without an output pointer; it only reads the state.
        self.strm.next_out = dummy.as_mut_ptr();
        self.strm.avail_out = 0;
        // SAFETY: initialised stream; next_out points to a live 1-byte buffer for the call
        // (avail_out 0, and inflateMark writes nothing); next_in is null with avail_in 0.
        let m = unsafe { z::inflateMark(&*self.strm) };
        self.strm.next_out = std::ptr::null_mut();
        let back = m >> 16;
        let len = (m & 0xffff) as u64;
        if m == std::os::raw::c_long::MIN || back < 0 {
            return None;
        }
        Some((back as u64, len))
    }

    /// Inflate from `input` into `output`. Returns how much of each was used and whether the
    /// stream ended. A `Z_DATA_ERROR` (corrupt data) is an error; "no progress possible" is
    /// [`InflateStatus::NeedMore`].
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: Flush,
    ) -> Result<InflateStep, ZlibError> {
        let input = &input[..input.len().min(u32::MAX as usize)];
        let out_len = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = input.len() as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        let flush = match flush {
            Flush::None => z::Z_NO_FLUSH,
            Flush::Block => z::Z_BLOCK,
            Flush::Trees => z::Z_TREES,
        };
        // SAFETY: initialised stream; next_in/avail_in describe the live `input` slice and
        // next_out/avail_out the live `output` slice for the duration of this call only.
        let rc = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = input.len() - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let status = match rc {
            z::Z_OK => InflateStatus::Ok,
            z::Z_STREAM_END => InflateStatus::StreamEnd,
            z::Z_BUF_ERROR => InflateStatus::NeedMore,
            // Z_NEED_DICT cannot happen for raw streams; treat it like any other failure.
            _ => return Err(self.err("inflate", rc)),
        };
        Ok(InflateStep {
            consumed,
            produced,
            status,
            data_type: self.strm.data_type,
        })
    }
}

impl Drop for RawInflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised in `new_raw` (a failed init never builds a
        // RawInflater) and is ended exactly once, here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn inflates_whole_stream() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 977) as u8)
            .collect();
        let comp = deflate_raw(&data);
        let mut inf = RawInflater::new_raw().unwrap();
        let mut out = vec![0u8; data.len() + 10];
        let mut cin = 0;
        let mut cout = 0;
        loop {
            let step = inf
                .inflate(&comp[cin..], &mut out[cout..], Flush::Block)
                .unwrap();
            cin += step.consumed;
            cout += step.produced;
            if step.status == InflateStatus::StreamEnd {
                break;
            }
            assert_ne!(step.status, InflateStatus::NeedMore);
        }
        assert_eq!(cin, comp.len());
        assert_eq!(&out[..cout], &data[..]);
    }

    #[test]
    fn dictionary_round_trip_and_errors() {
        let mut inf = RawInflater::new_raw().unwrap();
        inf.set_dictionary(b"hello world").unwrap();
        assert_eq!(inf.dictionary().unwrap(), b"hello world");
        assert!(inf.prime(17, 0).is_err());
        inf.reset().unwrap();
        assert!(inf.dictionary().unwrap().is_empty());
        let mut out = [0u8; 16];
        let e = inf
            .inflate(&[0xff, 0xff, 0xff], &mut out, Flush::None)
            .unwrap_err();
        assert_eq!(e.code, z::Z_DATA_ERROR);
    }
}
