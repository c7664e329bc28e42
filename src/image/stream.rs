//! Whole-layer streaming: completing a prepared image from one sequential read per layer.
//!
//! Owns [`stream_fill_layer`] (one layer's blob, from the blob cache or one streaming GET,
//! inflated once and offered piece by piece to the engine with [`Engine::supply`], while a
//! [`Delivery`] tells readers' misses what is about to arrive; the blob's sha256 checked once
//! it has passed whole), [`ImageSources::stream_fill`] ([`stream_parallel`] layers at a time, those readers touched first)
//! and [`Prepared::prefetch`]. It decides nothing about a file's bytes: the engine verifies
//! every piece against the index's digests and skips what readers filled, and a piece or a
//! layer that fails is left to the files' own sources ([`super::sources`]). It never
//! registers placeholders ([`super::register`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::image::Digest;
use tracing::{debug, info, warn};

use super::{ImageError, ImageSources, Prepared};
use crate::blobcache::BlobCache;
use crate::fill::{Delivery, Engine, FileId};
use crate::index::LayerIndex;
use crate::registry::{self, BlobStore};

impl ImageSources {
    /// Streams every layer that has a tar stream (TOC layers have none) into its
    /// placeholders with [`stream_fill_layer`], [`stream_parallel`] layers at a time, those
    /// readers touched first. `files` are the placeholders as (layer, entry, engine id). A layer whose stream
    /// fails is logged and left to its files' sources; `before_piece` returning `false`
    /// stops everything. Returns the totals.
    pub fn stream_fill(
        &self,
        engine: &Engine,
        files: &[(usize, usize, FileId)],
        before_piece: impl Fn(u64) -> bool + Sync,
    ) -> StreamFill {
        self.stream_fill_checked(engine, files, before_piece).0
    }

    /// [`ImageSources::stream_fill`], also returning every layer whose stream, read whole,
    /// did not hash to its digest: (layer digest, the sha256 its bytes have).
    ///
    /// Layers stream side by side rather than one after another: a reader's misses can fall
    /// in any layer (a walk in path order reads the top layer's `/usr/include` before the
    /// bottom layer's `/usr/lib`), and only a layer being streamed has a [`Delivery`] for its
    /// misses to wait for (`examples/walk.rs`). At most [`stream_parallel`] at once; each
    /// free stream takes the layer whose files readers have touched most so far (the lowest
    /// among equals): the layers a workload reads are made local first.
    pub fn stream_fill_checked(
        &self,
        engine: &Engine,
        files: &[(usize, usize, FileId)],
        before_piece: impl Fn(u64) -> bool + Sync,
    ) -> (StreamFill, Vec<(String, String)>) {
        let total = std::sync::Mutex::new(StreamFill::default());
        let mismatched = std::sync::Mutex::new(Vec::new());
        let stopped = AtomicBool::new(false);
        // The layers left to stream, lowest first, with their placeholders as (entry, id).
        let left: Vec<(usize, Vec<(usize, FileId)>)> = (0..self.layers.len())
            .filter(|&li| self.layers[li].toc.is_none())
            .map(|li| {
                let mine = files
                    .iter()
                    .filter(|f| f.0 == li)
                    .map(|f| (f.1, f.2))
                    .collect();
                (li, mine)
            })
            .collect();
        let parallel = stream_parallel().min(left.len());
        let left = std::sync::Mutex::new(left);
        let next = || {
            let mut left = left.lock().unwrap();
            let (k, touched) = left
                .iter()
                .enumerate()
                .map(|(k, (_, mine))| {
                    let ids: Vec<FileId> = mine.iter().map(|f| f.1).collect();
                    (k, engine.accessed(&ids).len())
                })
                .max_by_key(|&(k, touched)| (touched, std::cmp::Reverse(k)))?;
            let (li, mine) = left.remove(k);
            debug!(layer = %self.layers[li].digest, touched, "streaming a layer");
            Some((li, mine))
        };
        let one = |li: usize, mine: Vec<(usize, FileId)>| {
            let l = &self.layers[li];
            let res = stream_fill_layer(
                engine,
                &self.store,
                self.blob_cache.as_ref(),
                &l.digest,
                &l.index,
                &mine,
                |len| {
                    let go = !stopped.load(Ordering::SeqCst) && before_piece(len);
                    if !go {
                        stopped.store(true, Ordering::SeqCst);
                    }
                    go
                },
            );
            match res {
                Ok(s) => {
                    if s.files > 0 {
                        info!(layer = %l.digest, files = s.files, bytes_written = s.bytes_written, "layer streamed into placeholders");
                    }
                    let mut t = total.lock().unwrap();
                    t.bytes_read += s.bytes_read;
                    t.bytes_written += s.bytes_written;
                    t.files += s.files;
                }
                Err(ImageError::LayerDigest { layer, actual }) => {
                    tracing::error!(%layer, %actual, "layer bytes do not hash to the layer's digest");
                    mismatched.lock().unwrap().push((layer, actual));
                }
                Err(e) => {
                    warn!(error = %crate::fill::error_chain(&e), "streaming a layer failed; its files fill by ranges")
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..parallel {
                s.spawn(|| {
                    while !stopped.load(Ordering::SeqCst) {
                        let Some((li, mine)) = next() else {
                            break;
                        };
                        one(li, mine);
                    }
                });
            }
        });
        let mut mismatched = mismatched.into_inner().unwrap();
        mismatched.sort();
        (total.into_inner().unwrap(), mismatched)
    }
}

/// What [`stream_fill_layer`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamFill {
    /// Uncompressed layer bytes read from the stream.
    pub bytes_read: u64,
    /// Bytes written into placeholders.
    pub bytes_written: u64,
    /// Placeholders offered bytes.
    pub files: u64,
}

/// Most layers of one image streamed at once by [`ImageSources::stream_fill`]: enough that
/// the layers of a typical image all have a [`Delivery`] running from the start on a large
/// machine (see [`stream_parallel`]).
pub const STREAM_PARALLEL: usize = 4;

/// Layers of one image streamed at once: [`STREAM_PARALLEL`], but no more than the machine
/// has CPUs. Each stream is one GET and one inflate that, while it runs, keeps a core busy;
/// more streams than cores split them many ways beside a container's start (a 1 GiB,
/// 8-layer image on two cores: four streams at once, #15).
pub fn stream_parallel() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    STREAM_PARALLEL.min(cpus).max(1)
}

/// Bytes read from a layer stream and offered to the engine at a time (rounded to a file's
/// fill chunk): large enough for few writes, small enough that readers never wait long
/// behind one.
const STREAM_PIECE: u64 = 4 << 20;

/// Fills placeholders of one layer from a single sequential read of the whole blob (the
/// local blob cache, else one streaming GET), inflated once, the way an eager pull reads it:
/// for completing an image in the background, far cheaper than a range read and an inflate
/// from a checkpoint per piece. `files` are the layer's placeholders as (entry index in
/// `index`, engine id); each piece is handed to [`Engine::supply`], which verifies it against
/// the index's digests and skips what readers already filled or are fetching, so on-demand
/// fills and this stream never write the same chunk twice. `before_piece(len)` runs before
/// each piece of file data (pacing, pausing for readers); returning `false` stops early.
/// Blocks: call it from a plain thread, not from a runtime. A piece whose verification
/// fails is logged and left to the file's own source. Once the last wanted file has passed
/// the rest of the blob is read too (background completion): a blob that does not hash to
/// `layer` is [`ImageError::LayerDigest`], whatever index described it.
pub fn stream_fill_layer(
    engine: &Engine,
    store: &Arc<BlobStore>,
    blob_cache: Option<&BlobCache>,
    layer: &Digest,
    index: &LayerIndex,
    files: &[(usize, FileId)],
    mut before_piece: impl FnMut(u64) -> bool,
) -> Result<StreamFill, ImageError> {
    use std::collections::BTreeMap;
    use std::io::Read;
    let err = |source: io::Error| ImageError::Stream {
        layer: layer.to_string(),
        source,
    };
    // Data offset -> (path, size, placeholders): hardlinked placeholders share one entry's
    // bytes.
    let mut want: BTreeMap<u64, (&str, u64, Vec<FileId>)> = BTreeMap::new();
    for &(entry, id) in files {
        let Some(e) = index.resolve(entry) else {
            continue;
        };
        if e.kind != crate::index::EntryKind::File || e.size == 0 || engine.is_complete(id) {
            continue;
        }
        let slot = want
            .entry(e.data_offset)
            .or_insert((&*e.path, e.size, Vec::new()));
        if *slot.0 != *e.path {
            // Two files' data at one offset: not a tar stream's layout (a table-of-contents
            // layer locates data by chunk, not by stream offset). Nothing to stream.
            debug!(layer = %layer, "layer data is not laid out as one stream; not streaming it");
            return Ok(StreamFill::default());
        }
        slot.2.push(id);
    }
    let mut stats = StreamFill::default();
    if want.is_empty() {
        return Ok(stats);
    }
    // Readers missing a file just ahead of the stream wait for it instead of fetching it
    // (a walk of the tree follows the stream); ended however this function returns.
    let mut delivery = DeliveryGuard {
        delivery: Delivery::start(),
        engine,
        expected: Vec::new(),
    };
    for (offset, (_, size, ids)) in &want {
        for id in ids {
            engine.expect(*id, &delivery.delivery, offset + size);
            delivery.expected.push(*id);
        }
    }
    let digest = layer.to_string();
    // The reader of the whole blob, and whether it checks the digest itself at its end (a
    // registry or layout stream read directly: a mismatch is its read error, see the end).
    let (raw, verifies): (Box<dyn Read>, bool) = match blob_cache.filter(|c| c.contains(&digest)) {
        Some(cache) => {
            let path = cache.path(&digest).unwrap_or_default();
            (Box::new(std::fs::File::open(&path).map_err(err)?), false)
        }
        None => {
            let handle = engine.handle();
            let _runtime = handle.enter();
            // From a registry that ignores `Range:`, the layer travels whole: one copy, kept,
            // that misses (each answered with the whole blob) and a second stream of it
            // follow too. A registry that serves ranges answers misses with their ranges:
            // nothing to keep, the stream is read once and dropped.
            let cache = blob_cache.filter(|_| matches!(**store, BlobStore::Remote(_)));
            match cache.and_then(|c| c.copying(&digest)) {
                Some(copy) => (Box::new(copy.reader()), false),
                None => {
                    let (stream, ranges) = handle
                        .block_on(store.open_stream_ranges(layer))
                        .map_err(|e| err(io::Error::other(e)))?;
                    if ranges {
                        debug!(layer = %layer, "the registry serves ranges; not keeping the layer");
                    }
                    match cache.filter(|_| !ranges) {
                        Some(cache) => match cache.copy(Box::new(stream)) {
                            Ok(copy) => (Box::new(copy.reader()), false),
                            // Kept meanwhile (a copy a miss started ended).
                            Err((e, _)) if e.kind() == io::ErrorKind::AlreadyExists => {
                                let path = cache.path(&digest).unwrap_or_default();
                                (Box::new(std::fs::File::open(&path).map_err(err)?), false)
                            }
                            Err((e, stream)) => {
                                warn!(layer = %layer, error = %e, "blob cache unavailable; not keeping the layer");
                                (Box::new(stream.into_blocking_reader()), true)
                            }
                        },
                        None => (Box::new(stream.into_blocking_reader()), true),
                    }
                }
            }
        }
    };
    // The whole layer's sha256, computed as it passes (see the end), unless the stream
    // checks it itself: hashed once either way.
    let hashed =
        (!verifies).then(|| Arc::new(std::sync::Mutex::new((sha2::Sha256::default(), 0u64))));
    let raw: Box<dyn Read> = match &hashed {
        Some(state) => Box::new(Hashing {
            inner: raw,
            state: state.clone(),
        }),
        None => raw,
    };
    let raw = io::BufReader::with_capacity(1 << 20, raw);
    let mut tar: Box<dyn Read> = match index.compression {
        crate::index::Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        crate::index::Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(err)?)
        }
        crate::index::Compression::None => Box::new(raw),
    };
    let mut buf = Vec::new();
    for (offset, (_, size, ids)) in want {
        if offset < stats.bytes_read {
            continue; // Overlapping data in a hostile index: leave it to the source.
        }
        let skip = offset - stats.bytes_read;
        let skipped = io::copy(&mut (&mut tar).take(skip), &mut io::sink()).map_err(err)?;
        stats.bytes_read += skipped;
        delivery.delivery.advance(stats.bytes_read);
        if skipped != skip {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "layer ends at {} before file data at {offset}",
                    stats.bytes_read
                ),
            )));
        }
        let chunk = engine.progress(ids[0]).map_or(1, |p| p.chunk.max(1));
        let piece = (STREAM_PIECE / chunk).max(1) * chunk;
        stats.files += ids.len() as u64;
        let mut at = 0;
        while at < size {
            let len = piece.min(size - at);
            buf.resize(len as usize, 0);
            tar.read_exact(&mut buf).map_err(err)?;
            stats.bytes_read += len;
            if ids.iter().any(|id| !engine.is_complete(*id)) {
                if !before_piece(len) {
                    return Ok(stats);
                }
                for id in &ids {
                    match engine.supply(*id, at, &buf) {
                        Ok(n) => stats.bytes_written += n,
                        Err(e) => warn!(
                            layer = %layer,
                            offset = at,
                            error = %crate::fill::error_chain(&e),
                            "a streamed piece was not taken; the file's source will fill it"
                        ),
                    }
                }
            }
            at += len;
            delivery.delivery.advance(stats.bytes_read);
        }
    }
    // Background completion: the rest of the layer, so that its sha256 is known whole.
    let actual = match io::copy(&mut tar, &mut io::sink()) {
        // A verifying stream that reached its end matched (else its read failed); one that
        // was not read to its end has no verdict.
        Ok(_) => hashed.and_then(|hashed| {
            let (h, n) = &*hashed.lock().unwrap();
            // A decoder that stopped before the blob's end hashed a prefix: no verdict.
            (*n == index.compressed_size || index.compressed_size == 0).then(|| {
                use sha2::Digest as _;
                format!("sha256:{}", hex::encode(h.clone().finalize()))
            })
        }),
        Err(e) => match e
            .get_ref()
            .and_then(|i| i.downcast_ref::<registry::Error>())
        {
            Some(registry::Error::DigestMismatch { actual, .. }) => Some(actual.clone()),
            _ => {
                // Every wanted file was offered already: no verdict, nothing lost.
                debug!(layer = %layer, error = %e, "the rest of the layer did not read; its digest is not checked");
                None
            }
        },
    };
    let digest = layer.to_string();
    if let Some(actual) = actual
        && digest.starts_with("sha256:")
        && actual != digest
    {
        return Err(ImageError::LayerDigest {
            layer: digest,
            actual,
        });
    }
    debug!(layer = %layer, read = stats.bytes_read, written = stats.bytes_written, "layer streamed into placeholders");
    Ok(stats)
}

/// Ends its delivery when dropped: waiters fetch what the stream did not bring, and the
/// files it did not bring stop expecting it ([`Engine::delivery_ended`]).
struct DeliveryGuard<'a> {
    delivery: Arc<Delivery>,
    engine: &'a Engine,
    expected: Vec<FileId>,
}

impl Drop for DeliveryGuard<'_> {
    fn drop(&mut self) {
        self.delivery.end();
        self.engine.delivery_ended(&self.expected, &self.delivery);
    }
}

/// A reader that hashes what passes through it and counts it.
struct Hashing<R> {
    inner: R,
    state: Arc<std::sync::Mutex<(sha2::Sha256, u64)>>,
}

impl<R: io::Read> io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        let mut st = self.state.lock().unwrap();
        st.0.update(&buf[..n]);
        st.1 += n as u64;
        Ok(n)
    }
}

impl Prepared {
    /// Completes the image in the background's way, from the calling (plain) thread: each
    /// layer with a tar stream streamed once into its placeholders ([`stream_fill_layer`]),
    /// then whatever is still missing (TOC layers' files, a stream that failed, chunks a
    /// reader had in flight) filled from the files' own sources in
    /// [`Prepared::prefetch_order`], `parallel` at a time. Returns the streamed totals.
    pub fn prefetch(&self, engine: &Engine, parallel: usize) -> Result<StreamFill, ImageError> {
        let files: Vec<(usize, usize, FileId)> = self
            .unpacked
            .placeholders
            .iter()
            .zip(&self.files)
            .map(|(p, id)| (p.layer, p.entry, *id))
            .collect();
        let total = self.sources.stream_fill(engine, &files, |_| true);
        engine
            .fill_files(&self.prefetch_order, parallel)
            .map_err(|source| ImageError::Fill {
                reference: self.reference.clone(),
                source,
            })?;
        Ok(total)
    }
}
