//! The content sources of a prepared image's files: where a file's bytes come from and what
//! the engine checks them against.
//!
//! Owns [`ImageSources`] (per layer its index or TOC and checkpoint windows, with the store
//! and the blob cache; built by [`ImageIndexes::sources`]), the one place that picks a file's
//! [`FileSource`]: its layer's reader (an indexed layer's, or a [`TocLayerReader`]), its key
//! there and its [`Verify`] ([`ImageSources::file_source`], [`verify_for`]); the indexed
//! layer's reader and [`fetch_span`] (a range read of the compressed span and of its
//! checkpoint's window, inflated); read-around ([`ImageSources::read_around`]:
//! a whole-file read of a small file also reads the files after it in the stream and hands
//! them to the engine's supplier, which verifies and writes them); windows packs read by
//! range from the registry ([`RemoteWindows`]); and the prefetch order TOC layers ask for.
//! It reads bytes and never writes them: it never registers placeholders or touches the
//! engine's files ([`super::register`]), never streams a whole layer ([`super::stream`])
//! and never decides where an index comes from ([`super::indexes`]).

use std::io;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use oci_spec::image::Digest;
use tracing::debug;

use super::{ImageError, ImageIndexes, WINDOW_CACHE_BYTES};
use crate::blobcache::BlobCache;
use crate::fill::{ContentSource, FileId, SourceError, Supplier, Verify};
use crate::index::{
    CHUNK_SIZE, Entry, EntryKind, LayerIndex, LayerWindows, WindowCache, WindowSource,
};
use crate::registry::BlobStore;
use crate::toc::{self, TocLayer, TocLayerReader};

impl ImageIndexes {
    /// The sources of the image's files, fetching from `store`; checkpoint windows are
    /// cached per image ([`WINDOW_CACHE_BYTES`]).
    pub fn sources(&self, store: &Arc<BlobStore>) -> ImageSources {
        let cache = Arc::new(WindowCache::new(WINDOW_CACHE_BYTES));
        ImageSources {
            store: store.clone(),
            blob_cache: self.blob_cache.clone(),
            layers: self
                .layers
                .iter()
                .zip(&self.windows)
                .zip(&self.tocs)
                .map(|(((digest, index, _), w), toc)| {
                    let windows = Arc::new(LayerWindows::new(w.clone(), cache.clone()));
                    let reader = match toc {
                        Some(toc) => LayerReader::Toc(TocLayerReader::new(
                            store.clone(),
                            self.blob_cache.clone(),
                            digest.clone(),
                            toc.clone(),
                        )),
                        None => LayerReader::Index(Arc::new(IndexLayerReader {
                            store: store.clone(),
                            local: self.blob_cache.clone(),
                            layer: digest.clone(),
                            index: index.clone(),
                            windows: windows.clone(),
                            around: OnceLock::new(),
                        })),
                    };
                    LayerSources {
                        digest: digest.clone(),
                        index: index.clone(),
                        toc: toc.clone(),
                        windows,
                        reader,
                    }
                })
                .collect(),
        }
    }
}

pub(super) struct LayerSources {
    pub(super) digest: Digest,
    pub(super) index: Arc<LayerIndex>,
    pub(super) toc: Option<Arc<TocLayer>>,
    pub(super) windows: Arc<LayerWindows>,
    /// The layer's reader: the source of every file of the layer, keyed by entry.
    reader: LayerReader,
}

impl LayerSources {
    /// The layer's reader, for the engine.
    fn source(&self) -> Arc<dyn ContentSource> {
        match &self.reader {
            LayerReader::Toc(r) => r.clone(),
            LayerReader::Index(r) => r.clone(),
        }
    }
}

/// The reader of a layer's files.
enum LayerReader {
    Index(Arc<IndexLayerReader>),
    Toc(Arc<TocLayerReader>),
}

/// Everything that builds the content source of any file of a prepared image: the store,
/// per layer its index or TOC and checkpoint windows, the blob cache. The one place that
/// picks a file's [`FileSource`].
pub struct ImageSources {
    pub(super) store: Arc<BlobStore>,
    pub(super) blob_cache: Option<BlobCache>,
    pub(super) layers: Vec<LayerSources>,
}

impl std::fmt::Debug for ImageSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSources")
            .field(
                "layers",
                &self.layers.iter().map(|l| &l.digest).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl ImageSources {
    /// Each layer's digest and entry table (a TOC layer's from its TOC), lowest first.
    pub fn layers(&self) -> impl Iterator<Item = (&Digest, &Arc<LayerIndex>)> {
        self.layers.iter().map(|l| (&l.digest, &l.index))
    }

    /// Each layer's reader, lowest first: the source of every file of the layer
    /// ([`FileSource::source`]).
    pub fn layer_sources(&self) -> impl Iterator<Item = Arc<dyn ContentSource>> + '_ {
        self.layers.iter().map(LayerSources::source)
    }

    /// The entry `entry` of layer `layer`, hardlinks resolved to their file.
    pub fn entry(&self, layer: usize, entry: usize) -> Option<&Entry> {
        self.layers.get(layer)?.index.resolve(entry)
    }

    /// The content source, key and verification of regular-file entry `entry` of layer
    /// `layer`.
    // Returned once per file at registration: the size of the error does not matter here.
    #[allow(clippy::result_large_err)]
    pub fn file_source(&self, layer: usize, entry: usize) -> Result<FileSource, ImageError> {
        let (file, verify) = self.file_key(layer, entry)?;
        Ok(FileSource {
            source: self.layers[layer].source(),
            file,
            verify,
        })
    }

    /// The key in its layer's reader ([`ImageSources::layer_sources`]) and the verification
    /// of regular-file entry `entry` of layer `layer` (hardlinks resolved): for a caller that
    /// wraps the layers' readers.
    #[allow(clippy::result_large_err)]
    pub fn file_key(&self, layer: usize, entry: usize) -> Result<(u32, Verify), ImageError> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| ImageError::Task(format!("no layer {layer}")))?;
        let missing = || ImageError::Task(format!("no entry {entry} in layer {}", l.digest));
        let target = l.index.resolve_index(entry).ok_or_else(missing)?;
        let verify = match &l.reader {
            LayerReader::Toc(reader) => toc::verify_for(reader.toc(), target),
            LayerReader::Index(_) => verify_for(&l.index.entries[target]),
        };
        Ok((crate::index::position(target), verify))
    }

    /// Turns on read-around: from now on a whole-file read of a small file of an indexed
    /// layer (a container opening it through overlay, a reader reading it whole) also reads
    /// the next `reach` bytes (default [`READ_AROUND`]; 0: off) of the layer's stream in the
    /// same request and inflate, and hands every file wholly inside them that is among
    /// `placed` (as (layer, entry), beside their engine `ids`) to `supply`, which verifies
    /// each against its digest as for any fill. Files opened together mostly sit together
    /// in a layer (a package's modules, a library's headers), so one round trip fills what
    /// would otherwise be the next misses. The file's own bytes do not wait for its
    /// neighbours'. Once per image: later calls change nothing.
    pub fn read_around(
        &self,
        supply: Supplier,
        reach: u64,
        placed: &[(usize, usize)],
        ids: &[FileId],
    ) {
        if reach == 0 {
            return;
        }
        let mut per_layer: Vec<Vec<(u32, FileId)>> = vec![Vec::new(); self.layers.len()];
        for (&(layer, entry), &id) in placed.iter().zip(ids) {
            if let (Some(list), Ok(entry)) = (per_layer.get_mut(layer), u32::try_from(entry)) {
                list.push((entry, id));
            }
        }
        for (l, mut ids) in self.layers.iter().zip(per_layer) {
            if let LayerReader::Index(reader) = &l.reader {
                ids.sort_unstable_by_key(|x| x.0);
                // One device for the layer's placeholders (one unpack made them): a file
                // elsewhere is left to its own reads.
                let dev = ids.first().map_or(0, |x| x.1.dev());
                let all = ids.len();
                ids.retain(|x| x.1.dev() == dev);
                if ids.len() < all {
                    debug!(
                        layer = %l.digest,
                        left_out = all - ids.len(),
                        "read-around leaves out placeholders on another device"
                    );
                }
                // Kept for the image's life: exact sizes, 12 bytes a file.
                let _ = reader.around.set(Around {
                    supply: supply.clone(),
                    reach,
                    dev,
                    entries: ids.iter().map(|x| x.0).collect(),
                    inos: ids.iter().map(|x| x.1.ino()).collect(),
                });
            }
        }
    }

    /// Per layer, the entries its TOC names to prefetch first (empty for other layers).
    pub fn prefetch_first(&self, layer: usize) -> &[usize] {
        self.layers
            .get(layer)
            .and_then(|l| l.toc.as_deref())
            .map_or(&[], |t| t.prefetch_first.as_slice())
    }

    /// `files` (pairs of layer and entry, as placeholders list them) reordered for prefetch:
    /// the files each TOC layer names to prefetch first (lowest layer first, in TOC order),
    /// then every other one in the order given. Returns positions into `files` (as `u32`:
    /// the daemon keeps the order for the image's life; an index in memory never holds
    /// 2^32 entries).
    pub fn prefetch_order(&self, files: &[(usize, usize)]) -> Vec<u32> {
        // Kept for the image's life: sized once.
        let mut first = Vec::with_capacity(files.len());
        let mut pos: std::collections::HashMap<(usize, usize), u32> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (*f, crate::index::position(i)))
            .collect();
        for layer in 0..self.layers.len() {
            for &e in self.prefetch_first(layer) {
                if let Some(i) = pos.remove(&(layer, e)) {
                    first.push(i);
                }
            }
        }
        let mut taken = vec![false; files.len()];
        for &i in &first {
            taken[i as usize] = true;
        }
        first.extend(
            (0..files.len())
                .filter(|&i| !taken[i])
                .map(crate::index::position),
        );
        first
    }
}

/// A windows pack in the registry (or layout), read a window at a time by range reads.
pub(super) struct RemoteWindows {
    pub(super) store: Arc<BlobStore>,
    pub(super) digest: Digest,
}

impl WindowSource for RemoteWindows {
    fn read_pack(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Bytes>> {
        async move {
            self.store
                .read_range(&self.digest, offset, len)
                .await
                .map_err(io::Error::other)
        }
        .boxed()
    }
}

/// What the engine checks an indexed file's bytes against: the index's per-chunk digests
/// for large files, its whole-file digest for the rest, both read from the index when a fill
/// is checked ([`ContentSource::digest`]), never copied.
pub fn verify_for(entry: &Entry) -> Verify {
    if !entry.chunk_sha256.is_empty() {
        Verify::Source {
            chunk: Some(CHUNK_SIZE),
        }
    } else if entry.sha256.is_some() {
        Verify::Source { chunk: None }
    } else {
        Verify::None
    }
}

/// One file's source as [`ImageSources::file_source`] picks it: its layer's reader (shared
/// by every file of the layer), the file's key there (its entry, hardlinks resolved) and how
/// the engine checks its bytes. What a [`crate::fill::Placeholder`] takes.
pub struct FileSource {
    /// The layer's reader.
    pub source: Arc<dyn ContentSource>,
    /// The file's key in it ([`crate::fill::Placeholder::file`]).
    pub file: u32,
    /// How its bytes are checked.
    pub verify: Verify,
}

/// The source of every file of one indexed layer, keyed by entry: a range read of the
/// compressed span that holds the wanted bytes (from the nearest checkpoint) and,
/// concurrently, of that checkpoint's window (unless cached), inflated and sliced. The engine
/// verifies the result against the index's digests ([`verify_for`]) before writing it. Holds
/// the store, the blob cache (read first when it holds the layer), the layer's digest, index
/// and checkpoint windows.
struct IndexLayerReader {
    store: Arc<BlobStore>,
    local: Option<BlobCache>,
    layer: Digest,
    index: Arc<LayerIndex>,
    windows: Arc<LayerWindows>,
    /// Where the neighbours of a whole-file read go ([`ImageSources::read_around`]); unset:
    /// each read fetches its own file only.
    around: OnceLock<Around>,
}

/// The placeholders of one layer that a read-around may fill, and the engine's way in.
struct Around {
    supply: Supplier,
    /// Bytes read past the file.
    reach: u64,
    /// The device of the placeholders.
    dev: u64,
    /// Their entries, sorted, and beside each its placeholder's inode.
    entries: Box<[u32]>,
    inos: Box<[u64]>,
}

/// Uncompressed bytes of the layer's stream a whole-file read of a small file also reads
/// past the file's end ([`ImageSources::read_around`]).
pub const READ_AROUND: u64 = 256 << 10;

/// Largest file whose whole-file read reads around it.
const READ_AROUND_FILE_MAX: u64 = 256 << 10;

/// The bytes `span` of `layer` names: its compressed range (from the blob cache, else the
/// store) and its checkpoint's window fetched concurrently, then inflated on a blocking
/// thread. `what` names the read in errors. Shared by file sources and the access-profile
/// fill.
pub(super) async fn fetch_span(
    store: &Arc<BlobStore>,
    blob_cache: Option<&BlobCache>,
    layer: &Digest,
    index: &Arc<LayerIndex>,
    windows: &LayerWindows,
    span: crate::index::Span,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, SourceError> {
    if let Some(parts) = pipeline_parts(index, &span) {
        return fetch_span_pipelined(store, blob_cache, layer, index, windows, span, parts, what)
            .await;
    }
    let began = std::time::Instant::now();
    // Each part's time is kept for the debug line below; either failing ends the read.
    let fetch = async {
        crate::blobcache::read_range(blob_cache, store, layer, span.blob_offset, span.blob_len)
            .await
            .map(|bytes| (bytes, began.elapsed()))
            .map_err(|e| SourceError::with_source(what(), e))
    };
    let window = async {
        match span.checkpoint {
            Some(cp) => windows
                .window(index, cp)
                .await
                .map_err(|e| SourceError::with_source(what(), e)),
            None => Ok(Arc::from(Vec::new())),
        }
        .map(|window| (window, began.elapsed()))
    };
    let ((bytes, fetched), (window, windowed)) = futures::future::try_join(fetch, window).await?;
    let (blob_len, out_len) = (span.blob_len, span.len);
    let index = index.clone();
    let data =
        tokio::task::spawn_blocking(move || crate::index::extract(&index, &span, &window, &bytes))
            .await
            .map_err(|e| SourceError::with_source(what(), e))?
            .map_err(|e| SourceError::with_source(what(), e))?;
    // Where a miss's time goes (the range, its checkpoint's window, the inflate).
    debug!(
        what = %what(),
        blob_len,
        out_len,
        range_us = fetched.as_micros() as u64,
        window_us = windowed.as_micros() as u64,
        total_us = began.elapsed().as_micros() as u64,
        "span read"
    );
    Ok(data)
}

/// Spans that inflate to at least twice this are read pipelined ([`fetch_span_pipelined`]),
/// in parts of about this much output each.
const PIPELINE_PART: u64 = 1 << 20;
/// Most parts one pipelined span read is cut into.
const PIPELINE_PARTS_MAX: usize = 16;

/// Span reads of this process that were inflated pipelined ([`pipelined_reads`]).
static PIPELINED_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many span reads this process inflated pipelined, in parts behind the range read
/// (the large ones: spans of at least twice `PIPELINE_PART`, 1 MiB): what
/// `tests/pipelined.rs` checks; the debug log has each such read.
pub fn pipelined_reads() -> u64 {
    PIPELINED_READS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `span` cut at checkpoints into parts of at least [`PIPELINE_PART`] output (the last may
/// be down to half that), each a span of its own inside `span`'s blob range: `None` when it
/// is too small to cut, is not compressed, or has no checkpoint in the right places.
fn pipeline_parts(
    index: &LayerIndex,
    span: &crate::index::Span,
) -> Option<Vec<crate::index::Span>> {
    if span.len < 2 * PIPELINE_PART || span.checkpoint.is_none() {
        return None;
    }
    let (start, end) = (
        span.uncompressed_offset,
        span.uncompressed_offset + span.len,
    );
    let first = index
        .checkpoints
        .partition_point(|c| c.uncompressed_offset <= start);
    let mut cuts = vec![start];
    for c in &index.checkpoints[first..] {
        let at = c.uncompressed_offset;
        if at >= end || cuts.len() == PIPELINE_PARTS_MAX {
            break;
        }
        if at - cuts[cuts.len() - 1] >= PIPELINE_PART && end - at >= PIPELINE_PART / 2 {
            cuts.push(at);
        }
    }
    if cuts.len() < 2 {
        return None;
    }
    cuts.push(end);
    let blob_end = span.blob_offset + span.blob_len;
    let mut parts = Vec::with_capacity(cuts.len() - 1);
    for w in cuts.windows(2) {
        let part = crate::index::plan_uncompressed(index, w[0], w[1] - w[0]).ok()?;
        let inside = part.blob_offset >= span.blob_offset
            && part.blob_offset + part.blob_len <= blob_end
            && part.len == w[1] - w[0]
            && part.checkpoint.is_some();
        // Each part must be whole once the bytes up to its end arrived, in stream order.
        let ordered = parts.last().is_none_or(|p: &crate::index::Span| {
            p.blob_offset + p.blob_len <= part.blob_offset + part.blob_len
        });
        if !inside || !ordered {
            return None;
        }
        parts.push(part);
    }
    Some(parts)
}

/// A large span read as [`fetch_span`] does, with the inflate pipelined behind the range
/// read: `parts` ([`pipeline_parts`]) start inflating, each from its own checkpoint, as soon
/// as the bytes up to their end arrived (and the parts' windows, fetched together in one
/// request beside the range), on the blocking pool (both cores), while the rest of the
/// range is still on its way. A miss on a large file (the python image's
/// interpreter: 2.8 MB of gzip, 6.8 MB of output) then waits for its range and the inflate
/// of its last part, not for the range and then the whole inflate.
#[allow(clippy::too_many_arguments)]
async fn fetch_span_pipelined(
    store: &Arc<BlobStore>,
    blob_cache: Option<&BlobCache>,
    layer: &Digest,
    index: &Arc<LayerIndex>,
    windows: &LayerWindows,
    span: crate::index::Span,
    parts: Vec<crate::index::Span>,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, SourceError> {
    let began = std::time::Instant::now();
    let what = &what;
    let part_end =
        |p: &crate::index::Span| (p.blob_offset + p.blob_len - span.blob_offset) as usize;
    // The next part to hand to the inflate.
    let next = std::sync::Mutex::new(0usize);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Vec<u8>)>();
    // Hands out every part whose bytes `prefix` (the range's first bytes) holds whole; a
    // retried read shows shorter prefixes again, which release nothing new.
    let release = |prefix: &[u8]| {
        let mut next = next.lock().unwrap();
        while let Some(p) = parts.get(*next)
            && part_end(p) <= prefix.len()
        {
            let from = (p.blob_offset - span.blob_offset) as usize;
            let _ = tx.send((*next, prefix[from..part_end(p)].to_vec()));
            *next += 1;
        }
        *next
    };
    let fetch = async {
        let bytes = crate::blobcache::read_range_seen(
            blob_cache,
            store,
            layer,
            span.blob_offset,
            span.blob_len,
            Some(&|prefix: &[u8]| {
                release(prefix);
            }),
        )
        .await
        .map_err(|e| SourceError::with_source(what(), e))?;
        let fetched = began.elapsed();
        // Read locally, or answered otherwise than by the range: the parts not yet released.
        // One never released would leave the inflate waiting for it.
        if release(&bytes) < parts.len() {
            return Err(SourceError::new(format!(
                "{}: a pipelined read got {} bytes of {}",
                what(),
                bytes.len(),
                span.blob_len
            )));
        }
        Ok::<_, SourceError>(fetched)
    };
    let inflate = async {
        // The parts' windows are neighbours in the pack: one request for them all (a
        // request each would open connections beside the range's, each in slow start).
        let checkpoints: Vec<usize> = parts.iter().filter_map(|p| p.checkpoint).collect();
        windows.preload(index, &checkpoints).await;
        let windows = futures::future::try_join_all(parts.iter().map(|p| async move {
            windows
                .window(
                    index,
                    p.checkpoint.expect("pipelined parts start at checkpoints"),
                )
                .await
                .map_err(|e| SourceError::with_source(what(), e))
        }))
        .await?;
        let windowed = began.elapsed();
        let mut tasks = Vec::with_capacity(parts.len());
        for _ in 0..parts.len() {
            let Some((k, bytes)) = rx.recv().await else {
                break;
            };
            let (index, part, window) = (index.clone(), parts[k].clone(), windows[k].clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                crate::index::extract(&index, &part, &window, &bytes)
            }));
        }
        let mut data = Vec::with_capacity(usize::try_from(span.len).unwrap_or(0));
        for task in tasks {
            let out = task
                .await
                .map_err(|e| SourceError::with_source(what(), e))?
                .map_err(|e| SourceError::with_source(what(), e))?;
            data.extend_from_slice(&out);
        }
        Ok::<_, SourceError>((data, windowed))
    };
    let (fetched, (data, windowed)) = futures::future::try_join(fetch, inflate).await?;
    if data.len() as u64 != span.len {
        return Err(SourceError::new(format!(
            "{}: a pipelined read inflated {} bytes of {}",
            what(),
            data.len(),
            span.len
        )));
    }
    PIPELINED_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    debug!(
        what = %what(),
        blob_len = span.blob_len,
        out_len = span.len,
        parts = parts.len(),
        range_us = fetched.as_micros() as u64,
        window_us = windowed.as_micros() as u64,
        total_us = began.elapsed().as_micros() as u64,
        "span read"
    );
    Ok(data)
}

impl IndexLayerReader {
    /// The whole of entry `at` (`entry`), read with the next `around.reach` bytes of the
    /// stream; the files wholly inside those go to `around` on a task of their own.
    async fn read_around(
        &self,
        at: usize,
        entry: &Entry,
        around: &Around,
        what: impl Fn() -> String,
    ) -> Result<Vec<u8>, SourceError> {
        let start = entry.data_offset;
        let end = start
            .saturating_add(entry.size)
            .saturating_add(around.reach)
            .min(self.index.uncompressed_size)
            .max(start.saturating_add(entry.size));
        let span = crate::index::plan_uncompressed(&self.index, start, end - start)
            .map_err(|e| SourceError::with_source(what(), e))?;
        let data = Bytes::from(
            fetch_span(
                &self.store,
                self.local.as_ref(),
                &self.layer,
                &self.index,
                &self.windows,
                span,
                &what,
            )
            .await?,
        );
        let size = usize::try_from(entry.size).unwrap_or(usize::MAX);
        if data.len() < size {
            return Err(SourceError::new(format!("{}: short read", what())));
        }
        let mut neighbours = Vec::new();
        for (k, e) in self.index.entries.iter().enumerate().skip(at + 1) {
            if e.data_offset >= start.saturating_add(data.len() as u64) {
                break;
            }
            if e.kind != EntryKind::File || e.size == 0 {
                continue;
            }
            let (a, b) = (e.data_offset - start, e.data_offset - start + e.size);
            if b > data.len() as u64 {
                break;
            }
            let Ok(key) = u32::try_from(k) else { break };
            if let Ok(i) = around.entries.binary_search(&key) {
                let id = FileId::new(around.dev, around.inos[i]);
                neighbours.push((id, data.slice(a as usize..b as usize)));
            }
        }
        if !neighbours.is_empty() {
            let supply = around.supply.clone();
            tokio::spawn(async move {
                for (id, bytes) in neighbours {
                    // A neighbour that refuses (rewritten by its user, a digest mismatch)
                    // fills from its own source when read.
                    let _ = supply(id, 0, bytes).await;
                }
            });
        }
        Ok(data[..size].to_vec())
    }
}

impl ContentSource for IndexLayerReader {
    /// Inflates `[offset, offset + len)` of entry `file`'s data from the nearest checkpoint
    /// before it (every checkpoint resumes exactly: `src/index/gzip.rs`; the engine verifies
    /// the bytes against the index's digests all the same).
    fn read_at(
        &self,
        file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            let l = self;
            let at = file as usize;
            let entry =
                l.index.entries.get(at).ok_or_else(|| {
                    SourceError::new(format!("no entry {file} in layer {}", l.layer))
                })?;
            let what = || format!("{} in layer {}", entry.path, l.layer);
            if offset == 0
                && len >= entry.size
                && entry.size <= READ_AROUND_FILE_MAX
                && let Some(around) = l.around.get()
            {
                return l.read_around(at, entry, around, what).await;
            }
            let span = crate::index::plan(&l.index, entry, offset, len)
                .map_err(|e| SourceError::with_source(what(), e))?;
            fetch_span(
                &l.store,
                l.local.as_ref(),
                &l.layer,
                &l.index,
                &l.windows,
                span,
                what,
            )
            .await
        }
        .boxed()
    }

    /// The index's digest of piece `piece` of entry `file`, as [`verify_for`] pieces it.
    fn digest(&self, file: u32, piece: u64) -> Option<crate::digest::Sha256> {
        let entry = self.index.entries.get(file as usize)?;
        if entry.chunk_sha256.is_empty() {
            (piece == 0).then_some(entry.sha256).flatten()
        } else {
            entry
                .chunk_sha256
                .get(usize::try_from(piece).ok()?)
                .copied()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{IndexOptions, plan_uncompressed};

    /// A gzip layer with one file of `len` bytes of compressible text, indexed.
    fn indexed(len: usize) -> (LayerIndex, Vec<u8>) {
        let mut data = Vec::with_capacity(len + 32);
        let mut i = 0u64;
        while data.len() < len {
            data.extend_from_slice(
                format!("line {i} of {}\n", i.wrapping_mul(2654435761) % 977).as_bytes(),
            );
            i += 1;
        }
        data.truncate(len);
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(len as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "f", &data[..]).unwrap();
        let raw = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let blob = gz.finish().unwrap();
        let (index, _) = LayerIndex::build(&blob[..], &IndexOptions::default()).unwrap();
        (index, blob)
    }

    #[test]
    fn pipeline_parts_tile_the_span_inside_its_blob_range() {
        let (index, _) = indexed(7 << 20);
        let entry = index.entries.iter().find(|e| &*e.path == "f").unwrap();
        let span = plan_uncompressed(&index, entry.data_offset, entry.size).unwrap();
        let parts = pipeline_parts(&index, &span).expect("a 7 MiB span is cut");
        assert!(
            parts.len() >= 4 && parts.len() <= PIPELINE_PARTS_MAX,
            "{}",
            parts.len()
        );
        let mut at = span.uncompressed_offset;
        for p in &parts {
            assert_eq!(p.uncompressed_offset, at, "parts are contiguous");
            assert!(p.len >= PIPELINE_PART / 2);
            assert!(p.blob_offset >= span.blob_offset);
            assert!(p.blob_offset + p.blob_len <= span.blob_offset + span.blob_len);
            at += p.len;
        }
        assert_eq!(
            at,
            span.uncompressed_offset + span.len,
            "parts cover the span"
        );
        // Too small to cut.
        let small = plan_uncompressed(&index, entry.data_offset, PIPELINE_PART).unwrap();
        assert!(pipeline_parts(&index, &small).is_none());
    }
}
