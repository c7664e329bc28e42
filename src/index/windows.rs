//! Checkpoint windows, kept out of the index metadata and fetched when first needed.
//!
//! A gzip checkpoint in the middle of a member needs the 32 KiB of output that preceded it
//! (the deflate history). Stored inline, those windows made up nearly all of an index and
//! every pull had to move them before a single placeholder existed. Instead each window is
//! zstd-compressed on its own into a *windows pack* (`docs/index-format.md`), the metadata
//! records where each one sits ([`WindowRef`]), and a reader asks for a window only when a
//! range read starts at its checkpoint: from the registry as a range read of the pack blob,
//! from the local index store, or from memory right after indexing ([`WindowSource`]).
//! [`LayerWindows`] puts a bounded, shared, single-flight cache ([`WindowCache`]) in front.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;

use super::{IndexError, LayerIndex};
use crate::sys::zlib::WINDOW_SIZE;

/// First 8 bytes of every windows pack.
pub const PACK_MAGIC: [u8; 8] = *b"FFLWIN\r\n";
/// Length of the pack header (magic, version, flags, reserved).
pub const PACK_HEADER_LEN: u64 = 16;
/// Longest deflate block header accepted in front of a window (a dynamic header is at most
/// about 2,300 bits).
pub(crate) const MAX_HEADER_BITS: u16 = 4096;
const MAX_HEADER_BYTES: usize = MAX_HEADER_BITS as usize / 8 + 1;
/// zstd level for single windows. Measured on the host-file image of `examples/index_span.rs`
/// (942 windows): level 3 packs 14.6 MB, level 9 14.1 MB at no noticeable indexing cost,
/// level 19 13.9 MB at five times the indexing time.
const WINDOW_LEVEL: i32 = 9;

/// Where one checkpoint's window sits in the windows pack, and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRef {
    /// Offset of the window's zstd frame in the pack (the header is included in offsets).
    pub pack_offset: u64,
    /// Length of that frame.
    pub pack_len: u32,
    /// Length of the window itself (at most 32 KiB).
    pub len: u32,
    /// CRC-32 (gzip polynomial) of the frame's content (header bytes and window): catches a
    /// pack that does not belong to the metadata as well as damage.
    pub crc32: u32,
    /// For a checkpoint inside a Huffman-coded deflate block: the length in bits of that
    /// block's header, stored in the frame before the window (0: at a block boundary).
    pub header_bits: u16,
    /// Bit position of the header in its first stored byte (0-7).
    pub header_shift: u8,
}

impl WindowRef {
    /// Bytes of block header in front of the window in the frame's content.
    pub fn header_len(&self) -> usize {
        if self.header_bits == 0 {
            0
        } else {
            (usize::from(self.header_shift) + usize::from(self.header_bits)).div_ceil(8)
        }
    }
}

/// A whole windows pack in memory: what indexing produces and what is stored or pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPack(Bytes);

impl WindowPack {
    /// Wraps the bytes of a stored or fetched pack (checked when windows are read).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> WindowPack {
        WindowPack(bytes.into())
    }

    /// The encoded pack.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length of the encoded pack.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    /// Whether the pack holds no windows (only its header, or nothing).
    pub fn is_empty(&self) -> bool {
        self.len() <= PACK_HEADER_LEN
    }

    /// `sha256:<hex>` of the encoded pack.
    pub fn digest(&self) -> String {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&self.0)))
    }

    /// The window of checkpoint `checkpoint` of `index`, read from this pack (as stored: for a
    /// mid-block checkpoint the block header bytes come first; [`super::extract`] takes it
    /// as it is).
    pub fn window(&self, index: &LayerIndex, checkpoint: usize) -> Result<Vec<u8>, IndexError> {
        let Some(r) = window_ref(index, checkpoint)? else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(r.pack_offset).unwrap_or(usize::MAX);
        let frame = start
            .checked_add(r.pack_len as usize)
            .and_then(|end| self.0.get(start..end))
            .ok_or(IndexError::CorruptWindow {
                checkpoint,
                reason: "outside the pack",
            })?;
        decode_window(&r, checkpoint, frame)
    }
}

/// Builds a windows pack while indexing.
pub(crate) struct PackWriter {
    buf: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl PackWriter {
    pub(crate) fn new() -> PackWriter {
        let mut buf = Vec::with_capacity(1 << 16);
        buf.extend_from_slice(&PACK_MAGIC);
        buf.extend_from_slice(&super::FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&[0u8; 6]);
        PackWriter {
            buf,
            zstd: zstd::bulk::Compressor::new(WINDOW_LEVEL).ok(),
        }
    }

    /// Appends `window`, after the block `header` (bytes, bit shift, bits) of a mid-block
    /// checkpoint, and says where it went.
    pub(crate) fn push(
        &mut self,
        window: &[u8],
        header: Option<(&[u8], u8, u16)>,
    ) -> Result<WindowRef, IndexError> {
        let window = &window[window.len().saturating_sub(WINDOW_SIZE)..];
        let zstd = self
            .zstd
            .as_mut()
            .ok_or_else(|| IndexError::Io(io::Error::other("zstd compressor setup failed")))?;
        let (header_bits, header_shift) = header.map_or((0, 0), |(_, s, b)| (b, s));
        let mut content = Vec::with_capacity(window.len() + 512);
        if let Some((bytes, _, _)) = header {
            content.extend_from_slice(bytes);
        }
        content.extend_from_slice(window);
        let frame = zstd.compress(&content).map_err(IndexError::Io)?;
        let mut crc = flate2::Crc::new();
        crc.update(&content);
        let r = WindowRef {
            pack_offset: self.buf.len() as u64,
            pack_len: frame.len() as u32,
            len: window.len() as u32,
            crc32: crc.sum(),
            header_bits,
            header_shift,
        };
        if r.header_len() != content.len() - window.len() {
            return Err(IndexError::CorruptIndex("block header length".into()));
        }
        self.buf.extend_from_slice(&frame);
        Ok(r)
    }

    /// Drops every window from `pack_offset` on (checkpoints removed at the end of a pass).
    pub(crate) fn truncate(&mut self, pack_offset: u64) {
        let keep = (pack_offset as usize).max(PACK_HEADER_LEN as usize);
        self.buf.truncate(keep.min(self.buf.len()));
    }

    pub(crate) fn finish(self) -> WindowPack {
        WindowPack(Bytes::from(self.buf))
    }
}

fn window_ref(index: &LayerIndex, checkpoint: usize) -> Result<Option<WindowRef>, IndexError> {
    index
        .checkpoints
        .get(checkpoint)
        .map(|c| c.window)
        .ok_or_else(|| IndexError::CorruptIndex(format!("no checkpoint {checkpoint}")))
}

/// Inflates and checks one window frame (exactly the `pack_len` bytes the ref names).
pub(crate) fn decode_window(
    r: &WindowRef,
    checkpoint: usize,
    frame: &[u8],
) -> Result<Vec<u8>, IndexError> {
    let bad = |reason| IndexError::CorruptWindow { checkpoint, reason };
    if frame.len() != r.pack_len as usize {
        return Err(bad("frame length differs from the index"));
    }
    let window = zstd::bulk::decompress(frame, WINDOW_SIZE + MAX_HEADER_BYTES)
        .map_err(|_| bad("not a zstd frame"))?;
    let mut crc = flate2::Crc::new();
    crc.update(&window);
    if window.len() != r.len as usize + r.header_len() || crc.sum() != r.crc32 {
        return Err(bad("checksum mismatch"));
    }
    Ok(window)
}

/// Reads byte ranges of one layer's windows pack: the registry blob, the local store's
/// file, or memory.
pub trait WindowSource: Send + Sync + 'static {
    /// Exactly `len` bytes at `offset` of the pack.
    fn read_pack(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Bytes>>;
}

impl WindowSource for WindowPack {
    fn read_pack(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Bytes>> {
        let r = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?))
            .filter(|r| r.end <= self.0.len())
            .map(|r| self.0.slice(r))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the pack"));
        futures::future::ready(r).boxed()
    }
}

/// A layer without windows (plain tar, zstd, or gzip whose checkpoints are all at member
/// starts): asking it for bytes is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoWindows;

impl WindowSource for NoWindows {
    fn read_pack(&self, _offset: u64, _len: u64) -> BoxFuture<'_, io::Result<Bytes>> {
        futures::future::ready(Err(io::Error::new(
            io::ErrorKind::NotFound,
            "this layer has no windows pack",
        )))
        .boxed()
    }
}

type Slot = Arc<tokio::sync::OnceCell<Arc<[u8]>>>;

#[derive(Default)]
struct CacheState {
    /// (layer key, checkpoint) -> slot and the tick of its last use.
    map: HashMap<(u64, usize), (Slot, u64)>,
    tick: u64,
}

/// A bounded LRU of inflated windows shared by the layers of one image. Concurrent requests
/// for one window share one fetch; a failed fetch is not cached.
pub struct WindowCache {
    capacity: usize,
    state: Mutex<CacheState>,
}

impl std::fmt::Debug for WindowCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl WindowCache {
    /// A cache holding up to `capacity_bytes` of windows (at least one window).
    pub fn new(capacity_bytes: usize) -> WindowCache {
        WindowCache {
            capacity: (capacity_bytes / WINDOW_SIZE).max(1),
            state: Mutex::new(CacheState::default()),
        }
    }

    /// Windows held now (ready or being fetched).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is
        // a single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: (u64, usize)) -> Slot {
        let mut st = self.lock();
        st.tick += 1;
        let tick = st.tick;
        if let Some((slot, used)) = st.map.get_mut(&key) {
            *used = tick;
            return slot.clone();
        }
        while st.map.len() >= self.capacity {
            // Evict the least recently used window that is not being fetched.
            let victim = st
                .map
                .iter()
                .filter(|(_, (s, _))| s.initialized() || Arc::strong_count(s) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    st.map.remove(&k);
                }
                None => break,
            }
        }
        let slot = Slot::default();
        st.map.insert(key, (slot.clone(), tick));
        slot
    }
}

static LAYER_KEYS: AtomicU64 = AtomicU64::new(0);

/// The windows of one layer: a [`WindowSource`] behind a shared [`WindowCache`].
pub struct LayerWindows {
    source: Arc<dyn WindowSource>,
    cache: Arc<WindowCache>,
    key: u64,
    fetched: AtomicU64,
}

impl std::fmt::Debug for LayerWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerWindows")
            .field("key", &self.key)
            .field("fetched", &self.fetched)
            .finish_non_exhaustive()
    }
}

impl LayerWindows {
    /// Windows read through `source`, cached in `cache`.
    pub fn new(source: Arc<dyn WindowSource>, cache: Arc<WindowCache>) -> LayerWindows {
        LayerWindows {
            source,
            cache,
            key: LAYER_KEYS.fetch_add(1, Ordering::Relaxed),
            fetched: AtomicU64::new(0),
        }
    }

    /// Windows of an in-memory pack with a small private cache (tests, tools).
    pub fn in_memory(pack: WindowPack) -> LayerWindows {
        LayerWindows::new(Arc::new(pack), Arc::new(WindowCache::new(4 << 20)))
    }

    /// Pack bytes read through the source so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// The window of checkpoint `checkpoint` of `index` (empty when it needs none): from the
    /// cache, else one read of the source shared by every concurrent caller.
    pub async fn window(
        &self,
        index: &LayerIndex,
        checkpoint: usize,
    ) -> Result<Arc<[u8]>, IndexError> {
        let Some(r) = window_ref(index, checkpoint)? else {
            return Ok(Arc::from(Vec::new()));
        };
        let slot = self.cache.slot((self.key, checkpoint));
        let w = slot
            .get_or_try_init(|| async {
                let frame = self
                    .source
                    .read_pack(r.pack_offset, u64::from(r.pack_len))
                    .await
                    .map_err(|source| IndexError::WindowFetch { checkpoint, source })?;
                self.fetched
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                decode_window(&r, checkpoint, &frame).map(Arc::from)
            })
            .await?;
        Ok(w.clone())
    }
}

/// Most bytes of a windows pack one [`LayerWindows::preload`] request covers.
pub const PRELOAD_MAX: u64 = 2 << 20;
/// Longest stretch of frames nobody asked for that one preload request still reads through
/// rather than starting another.
pub const PRELOAD_GAP: u64 = 256 << 10;

/// Groups window refs (sorted by pack offset) into pack ranges: frames less than
/// [`PRELOAD_GAP`] apart share a range of at most [`PRELOAD_MAX`] bytes.
fn preload_groups(refs: &[(usize, WindowRef)]) -> Vec<&[(usize, WindowRef)]> {
    let mut groups = Vec::new();
    let mut first = 0;
    for i in 1..=refs.len() {
        let split = refs.get(i).is_none_or(|(_, r)| {
            let (_, start) = refs[first];
            let (_, prev) = refs[i - 1];
            let prev_end = prev.pack_offset + u64::from(prev.pack_len);
            r.pack_offset.saturating_sub(prev_end) > PRELOAD_GAP
                || r.pack_offset + u64::from(r.pack_len) - start.pack_offset > PRELOAD_MAX
        });
        if split {
            groups.push(&refs[first..i]);
            first = i;
        }
    }
    groups
}

impl LayerWindows {
    /// Fetches the windows of `checkpoints` of `index` ahead of the reads that will start
    /// there, a few at a time: nearby frames of the pack come in one range read
    /// ([`PRELOAD_MAX`], [`PRELOAD_GAP`]) instead of one request each. A reader asking for
    /// one of these windows while its range is on the way waits for it. Windows already
    /// cached are skipped; at most half the cache is preloaded. Returns how many windows
    /// were loaded; a failed range is logged and left to the readers, who fetch their own.
    pub async fn preload(&self, index: &LayerIndex, checkpoints: &[usize]) -> usize {
        let mut refs: Vec<(usize, WindowRef)> = checkpoints
            .iter()
            .filter_map(|&cp| Some((cp, window_ref(index, cp).ok()??)))
            .collect();
        refs.sort_by_key(|(cp, r)| (r.pack_offset, *cp));
        refs.dedup_by_key(|(cp, _)| *cp);
        refs.truncate(self.cache.capacity / 2);
        let loads = preload_groups(&refs).into_iter().map(|group| {
            let (_, first) = group[0];
            let (_, last) = group[group.len() - 1];
            let start = first.pack_offset;
            let len = last.pack_offset + u64::from(last.pack_len) - start;
            // The slots are taken on the first poll, before anything is awaited: a reader
            // asking later finds the window being fetched and waits for it.
            let slots: Vec<_> = group
                .iter()
                .map(|&(cp, r)| (cp, r, self.cache.slot((self.key, cp))))
                .collect();
            let range = self
                .source
                .read_pack(start, len)
                .map(|r| {
                    r.inspect(|b| {
                        self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                    })
                    .map_err(Arc::new)
                })
                .shared();
            let inits = slots.into_iter().map(move |(cp, r, slot)| {
                let range = range.clone();
                async move {
                    slot.get_or_try_init(|| async {
                        let bytes = range.await.map_err(|e| IndexError::WindowFetch {
                            checkpoint: cp,
                            source: io::Error::new(e.kind(), e.to_string()),
                        })?;
                        let at = (r.pack_offset - start) as usize;
                        let frame = bytes.get(at..at + r.pack_len as usize).ok_or(
                            IndexError::CorruptWindow {
                                checkpoint: cp,
                                reason: "outside the pack",
                            },
                        )?;
                        decode_window(&r, cp, frame).map(Arc::from)
                    })
                    .await
                    .map(|_| ())
                }
            });
            futures::future::join_all(inits)
        });
        let results = futures::future::join_all(loads).await;
        let mut loaded = 0;
        for r in results.into_iter().flatten() {
            match r {
                Ok(()) => loaded += 1,
                Err(e) => tracing::debug!(error = %e, "window preload failed; readers fetch it"),
            }
        }
        loaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip_and_damage() {
        let mut w = PackWriter::new();
        let a = w.push(b"first window", None).unwrap();
        let b = w.push(&vec![7u8; 40_000], None).unwrap();
        assert_eq!(a.pack_offset, PACK_HEADER_LEN);
        assert_eq!(b.pack_offset, a.pack_offset + u64::from(a.pack_len));
        assert_eq!(b.len as usize, WINDOW_SIZE, "only the last 32 KiB are kept");
        let pack = w.finish();
        assert_eq!(&pack.bytes()[..8], &PACK_MAGIC);
        let s = b.pack_offset as usize;
        let frame = &pack.bytes()[s..s + b.pack_len as usize];
        assert_eq!(decode_window(&b, 1, frame).unwrap(), vec![7u8; WINDOW_SIZE]);
        let mut wrong = b;
        wrong.crc32 ^= 1;
        assert!(matches!(
            decode_window(&wrong, 1, frame),
            Err(IndexError::CorruptWindow { .. })
        ));
        assert!(decode_window(&a, 0, frame).is_err());
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let c = WindowCache::new(2 * WINDOW_SIZE);
        let s1 = c.slot((0, 1));
        s1.set(Arc::from(vec![1u8])).unwrap();
        let s2 = c.slot((0, 2));
        s2.set(Arc::from(vec![2u8])).unwrap();
        drop((s1, s2));
        let _ = c.slot((0, 1)); // touch 1: 2 is now the oldest
        let _ = c.slot((0, 3));
        assert_eq!(c.len(), 2);
        assert!(c.lock().map.contains_key(&(0, 1)));
        assert!(!c.lock().map.contains_key(&(0, 2)));
    }

    /// A pack source that counts its reads.
    struct Counting(WindowPack, AtomicU64);

    impl WindowSource for Counting {
        fn read_pack(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Bytes>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.read_pack(offset, len)
        }
    }

    fn pack_of(n: usize) -> (WindowPack, Vec<WindowRef>) {
        let mut w = PackWriter::new();
        let refs = (0..n)
            .map(|i| {
                // Incompressible-ish windows: ~32 KiB frames, so gaps and caps are reached.
                let win: Vec<u8> = (0..WINDOW_SIZE)
                    .map(|j| ((i * 7919 + j * 104_729) % 251) as u8 ^ (j >> 3) as u8)
                    .collect();
                w.push(&win, None).unwrap()
            })
            .collect();
        (w.finish(), refs)
    }

    #[test]
    fn preload_groups_respect_gap_and_cap() {
        let (_, refs) = pack_of(200);
        let frame = u64::from(refs[0].pack_len);
        assert!(frame > 1000, "frames must not compress away: {frame}");
        let pick = |ids: &[usize]| ids.iter().map(|&i| (i, refs[i])).collect::<Vec<_>>();
        // Neighbours share a range; a stretch of more than PRELOAD_GAP starts another.
        let far = (PRELOAD_GAP / frame + 2) as usize;
        let chosen = pick(&[0, 1, 3, 3 + far]);
        let groups = preload_groups(&chosen);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[0].len(), 3);
        // A run of every frame is cut at PRELOAD_MAX.
        let all = pick(&(0..200).collect::<Vec<_>>());
        let groups = preload_groups(&all);
        assert!(groups.len() > 1);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 200);
        for g in &groups {
            let (_, a) = g[0];
            let (_, b) = g[g.len() - 1];
            assert!(b.pack_offset + u64::from(b.pack_len) - a.pack_offset <= PRELOAD_MAX);
        }
        assert!(preload_groups(&[]).is_empty());
    }

    #[test]
    fn preload_fetches_nearby_windows_in_one_read_and_readers_use_them() {
        use super::super::{Checkpoint, Compression, LayerIndex};
        let (pack, refs) = pack_of(40);
        let index = LayerIndex {
            compression: Compression::Gzip,
            blob_digest: String::new(),
            diff_id: None,
            compressed_size: 0,
            uncompressed_size: 0,
            span: 0,
            windows_digest: Some(pack.digest()),
            windows_size: pack.len(),
            entries: Vec::new(),
            checkpoints: refs
                .iter()
                .enumerate()
                .map(|(i, r)| Checkpoint {
                    compressed_offset: i as u64 * 1000,
                    uncompressed_offset: i as u64 * 10_000,
                    bit_offset: 0,
                    window: Some(*r),
                })
                .collect(),
            end_marks: Vec::new(),
        };
        let src = Arc::new(Counting(pack.clone(), AtomicU64::new(0)));
        let lw = LayerWindows::new(src.clone(), Arc::new(WindowCache::new(8 << 20)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let loaded = rt.block_on(lw.preload(&index, &[2, 5, 3, 3, 7]));
        assert_eq!(loaded, 4);
        assert_eq!(
            src.1.load(Ordering::Relaxed),
            1,
            "one range read for 4 nearby windows"
        );
        for cp in [2, 3, 5, 7] {
            let w = rt.block_on(lw.window(&index, cp)).unwrap();
            assert_eq!(
                &w[..],
                &pack.window(&index, cp).unwrap()[..],
                "checkpoint {cp}"
            );
        }
        assert_eq!(
            src.1.load(Ordering::Relaxed),
            1,
            "readers found them cached"
        );
        // A damaged pack: nothing is cached, and a reader's own fetch reports the damage.
        let mut bytes = pack.bytes().to_vec();
        let at = refs[9].pack_offset as usize + 10;
        bytes[at] ^= 0xff;
        let bad = Arc::new(Counting(WindowPack::from_bytes(bytes), AtomicU64::new(0)));
        let lw = LayerWindows::new(bad.clone(), Arc::new(WindowCache::new(8 << 20)));
        assert_eq!(rt.block_on(lw.preload(&index, &[8, 9])), 1);
        assert!(rt.block_on(lw.window(&index, 8)).is_ok());
        assert!(matches!(
            rt.block_on(lw.window(&index, 9)),
            Err(IndexError::CorruptWindow { .. })
        ));
        assert_eq!(
            bad.1.load(Ordering::Relaxed),
            2,
            "the damaged window was fetched again"
        );
    }
}
