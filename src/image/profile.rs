//! Filling an access profile ahead of the workload with few, large reads, started before
//! the placeholders exist.
//!
//! An access profile lists a few hundred files, most of them small and, within a layer,
//! often close to one another (a library's modules, a compiler's headers). Filled one file
//! at a time, each costs a range request, a checkpoint window and an inflate from that
//! checkpoint, and a registry that answers every range request by reading megabytes
//! (`docker-registry` buffers 4 MiB per request) spends more CPU than the workload. Here
//! the profile's files are grouped per layer by their place in the layer's stream: files
//! less than [`GAP_MAX`] apart, spanning at most [`SPAN_MAX`], become one
//! [`ProfileRead::Span`] (one range request, one window, one inflate); a larger file is
//! read in pieces of [`SPAN_MAX`]. Reads start as soon as the indexes are loaded, while the
//! placeholders are still being unpacked, and hand their bytes to the engine
//! ([`Engine::supplier`]) once [`ProfileFill::place`] names the placeholders; the engine
//! verifies them against the index's digests as for any fill. Files of TOC layers fill
//! through their own source. A read that fails (fetch, inflate, a digest) leaves its files
//! to their own sources: nothing is written unverified, and a reader never waits on this
//! path (it fills what it needs itself). This module plans and runs those reads; it owns no
//! file state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::Shared;
use oci_spec::image::Digest;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::{AccessProfile, ImageSources};
use crate::blobcache::BlobCache;
use crate::fill::{Engine, FileId, Filler, SourceError, Supplier, error_chain};
use crate::index::{CHUNK_SIZE, Entry, EntryKind, LayerIndex, LayerWindows};
use crate::registry::BlobStore;

/// Longest stretch of a layer's uncompressed stream one read covers: its inflated bytes
/// are held in memory until written. A multiple of the fill chunk, so that the pieces of a
/// larger file are whole chunks.
pub const SPAN_MAX: u64 = 8 * CHUNK_SIZE;

/// Longest stretch of a layer between two profile files that one read still covers instead
/// of starting another. Bytes in such gaps are fetched and inflated for nothing, so this
/// bounds the waste per gap (about 40 % of it compressed, for binaries and text); a new
/// request costs a round trip and, on `docker-registry`, a 4 MiB read.
pub const GAP_MAX: u64 = 512 << 10;

/// Most inflated bytes held at once by reads waiting for their placeholders or for their
/// writes: bounds the daemon's memory whatever the profile lists.
const HELD_MAX: u64 = 64 << 20;
/// Unit of [`HELD_MAX`] accounting.
const HELD_UNIT: u64 = 64 << 10;

/// Reads at once before the placeholders are registered.
const EARLY_READS: usize = 2;

/// Reads that fetch their own checkpoint window; the windows of the rest are preloaded
/// together ([`LayerWindows::preload`]).
const PRELOAD_AFTER: usize = 4;

/// A placeholder as the image's layers name it: (layer position, entry index).
pub type EntryKey = (usize, usize);

/// Part of a file's bytes inside a [`ProfileRead::Span`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanFile {
    /// Offset of these bytes in the layer's uncompressed stream.
    pub stream_offset: u64,
    /// Offset of these bytes in the file (a multiple of [`CHUNK_SIZE`]).
    pub file_offset: u64,
    /// Number of bytes.
    pub len: u64,
    /// The entries whose file these bytes belong to (more than one: hardlinks).
    pub keys: Vec<EntryKey>,
}

/// One unit of work of a profile fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileRead {
    /// Files (or pieces of one) of one layer read together: `[start, end)` of the layer's
    /// uncompressed stream.
    Span {
        /// Layer position, lowest first.
        layer: usize,
        /// First byte of the stream read.
        start: u64,
        /// End of the stream read.
        end: u64,
        /// What it holds, in stream order.
        files: Vec<SpanFile>,
    },
    /// A file filled by its own source (a TOC layer's file).
    Own(EntryKey),
}

impl ProfileRead {
    fn file_count(&self) -> usize {
        match self {
            ProfileRead::Span { files, .. } => files.iter().map(|f| f.keys.len()).sum(),
            ProfileRead::Own(_) => 1,
        }
    }
}

/// Placeholders by entry, sent once they are registered.
type Placed = Arc<HashMap<EntryKey, FileId>>;

/// A profile fill started before its placeholders exist ([`ImageSources::start_profile`]).
/// Dropped without [`ProfileFill::place`] (the prepare failed), every read stops without
/// writing anything.
#[derive(Debug)]
pub struct ProfileFill {
    tx: oneshot::Sender<Placed>,
    keys: Vec<EntryKey>,
}

impl ProfileFill {
    /// Hands over the registered placeholders (`placed`, beside their engine `ids`); the
    /// reads write into those that hold the profile's files. Returns how many do.
    pub fn place(self, placed: &[EntryKey], ids: &[FileId]) -> usize {
        let map: HashMap<EntryKey, FileId> =
            placed.iter().copied().zip(ids.iter().copied()).collect();
        let n = self.keys.iter().filter(|k| map.contains_key(k)).count();
        // Every read may have ended already (nothing to read): fine.
        let _ = self.tx.send(Arc::new(map));
        n
    }
}

impl ImageSources {
    /// The entries that will hold the files an access profile lists, in its order: for each
    /// path, the topmost layer's entry of that path when it is a regular file (or a hardlink
    /// to one). Paths the image does not have as files are skipped.
    pub fn profile_keys(&self, profile: &AccessProfile) -> Vec<EntryKey> {
        // One pass over every layer's entries (not a search per listed path: a profile may
        // list 100,000 paths): the last entry of each listed path, topmost layer winning.
        let wanted: HashSet<&str> = profile.files.iter().map(String::as_str).collect();
        let mut top: HashMap<&str, EntryKey> = HashMap::new();
        for (li, l) in self.layers.iter().enumerate() {
            for (ei, e) in l.index.entries.iter().enumerate() {
                if wanted.contains(&*e.path) {
                    top.insert(&*e.path, (li, ei));
                }
            }
        }
        let mut seen = HashSet::new();
        profile
            .files
            .iter()
            .filter_map(|path| top.get(path.as_str()).copied())
            .filter(|&(layer, entry)| {
                self.layers
                    .get(layer)
                    .and_then(|l| l.index.resolve(entry))
                    .is_some_and(|e| e.kind == EntryKind::File && e.size > 0)
            })
            .filter(|key| seen.insert(*key))
            .collect()
    }

    /// Plans the fill of `keys` (an access profile's files, in the order the workload first
    /// read them): per layer, files (and pieces of [`SPAN_MAX`] of larger ones) sorted by
    /// their place in the stream and cut into spans at gaps over [`GAP_MAX`] or at
    /// [`SPAN_MAX`]; then every read ordered by the earliest file it holds, so what the
    /// workload needs first is asked for first.
    pub fn plan_profile(&self, keys: &[EntryKey]) -> Vec<ProfileRead> {
        // (rank, read)
        let mut reads: Vec<(usize, ProfileRead)> = Vec::new();
        // Per layer: each file's pieces with the rank of their file.
        let mut per_layer: Vec<Vec<(usize, SpanFile)>> = vec![Vec::new(); self.layers.len()];
        for (rank, &(layer, entry)) in keys.iter().enumerate() {
            let Some(l) = self.layers.get(layer) else {
                continue;
            };
            let Some(e) = l.index.resolve(entry) else {
                continue;
            };
            if l.toc.is_some() {
                reads.push((rank, ProfileRead::Own((layer, entry))));
                continue;
            }
            let mut at = 0;
            while at < e.size {
                let len = SPAN_MAX.min(e.size - at);
                let Some(stream_offset) = e.data_offset.checked_add(at) else {
                    break;
                };
                per_layer[layer].push((
                    rank,
                    SpanFile {
                        stream_offset,
                        file_offset: at,
                        len,
                        keys: vec![(layer, entry)],
                    },
                ));
                at += len;
            }
        }
        for (layer, mut list) in per_layer.into_iter().enumerate() {
            list.sort_unstable_by_key(|(rank, f)| (f.stream_offset, *rank));
            let mut cur: Option<(usize, ProfileRead)> = None;
            for (rank, piece) in list {
                let end = piece.stream_offset.saturating_add(piece.len);
                if let Some((
                    r,
                    ProfileRead::Span {
                        start,
                        end: e,
                        files,
                        ..
                    },
                )) = &mut cur
                {
                    if let Some(last) = files
                        .last_mut()
                        .filter(|f| f.stream_offset == piece.stream_offset && f.len == piece.len)
                    {
                        // The same bytes under another entry (a hardlink).
                        last.keys.extend(piece.keys);
                        *r = (*r).min(rank);
                        continue;
                    }
                    if piece.stream_offset >= *e
                        && piece.stream_offset - *e <= GAP_MAX
                        && end - *start <= SPAN_MAX
                    {
                        files.push(piece);
                        *e = end;
                        *r = (*r).min(rank);
                        continue;
                    }
                }
                reads.extend(cur.take());
                cur = Some((
                    rank,
                    ProfileRead::Span {
                        layer,
                        start: piece.stream_offset,
                        end,
                        files: vec![piece],
                    },
                ));
            }
            reads.extend(cur);
        }
        reads.sort_by_key(|(rank, _)| *rank);
        reads.into_iter().map(|(_, r)| r).collect()
    }

    /// Starts filling the files `profile` lists on the engine's runtime and returns at once:
    /// reads ([`ImageSources::plan_profile`]) fetch and inflate now, `parallel` at a time in
    /// the profile's order, while the placeholders are being unpacked, and write once
    /// [`ProfileFill::place`] names the placeholders. Failures are logged; a file whose
    /// read failed is filled by its own source, and anything still missing fills on access
    /// as usual. The files do not count as accessed ([`Engine::accessed`]).
    pub fn start_profile(
        &self,
        engine: &Engine,
        profile: &AccessProfile,
        parallel: usize,
    ) -> ProfileFill {
        self.start_profile_except(engine, profile, parallel, |_| false)
    }

    /// [`ImageSources::start_profile`], leaving out the files for which `filled_elsewhere`
    /// says their bytes will come from somewhere else (a daemon's content cache): reading
    /// them from the registry would be wasted.
    pub fn start_profile_except(
        &self,
        engine: &Engine,
        profile: &AccessProfile,
        parallel: usize,
        filled_elsewhere: impl Fn(&Entry) -> bool,
    ) -> ProfileFill {
        let mut keys = self.profile_keys(profile);
        let listed = keys.len();
        keys.retain(|&(layer, entry)| {
            self.layers
                .get(layer)
                .and_then(|l| l.index.resolve(entry))
                .is_none_or(|e| !filled_elsewhere(e))
        });
        if keys.len() < listed {
            debug!(
                skipped = listed - keys.len(),
                "profile files whose bytes come from elsewhere are not read"
            );
        }
        let reads = self.plan_profile(&keys);
        let span_bytes: u64 = reads
            .iter()
            .map(|r| match r {
                ProfileRead::Span { start, end, .. } => end - start,
                ProfileRead::Own(_) => 0,
            })
            .sum();
        info!(
            listed = profile.files.len(),
            files = keys.len(),
            reads = reads.len(),
            span_bytes,
            "filling the access profile's files ahead of the workload"
        );
        let (tx, rx) = oneshot::channel();
        let ctx = Arc::new(ReadCtx {
            store: self.store.clone(),
            blob_cache: self.blob_cache.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.index.clone(), l.windows.clone()))
                .collect(),
            supply: engine.supplier(),
            fill: engine.prefetcher(),
            placed: rx.shared(),
            early: Arc::new(Semaphore::new(EARLY_READS)),
        });
        let handle = engine.handle();
        self.preload_windows(&handle, &reads);
        engine.handle().spawn(async move {
            let started = std::time::Instant::now();
            let fetching = Arc::new(Semaphore::new(parallel.max(1)));
            let held = Arc::new(Semaphore::new((HELD_MAX / HELD_UNIT) as usize));
            let files = reads.iter().map(ProfileRead::file_count).sum::<usize>();
            let mut tasks = Vec::with_capacity(reads.len());
            for read in reads {
                // Permits are taken here, one read after the other, so that reads start in
                // the profile's order; each is given back as soon as the read is past it.
                let units = match &read {
                    ProfileRead::Span { start, end, .. } => (end - start)
                        .div_ceil(HELD_UNIT)
                        .clamp(1, HELD_MAX / HELD_UNIT)
                        as u32,
                    ProfileRead::Own(_) => 0,
                };
                let (Ok(held), Ok(fetch)) = (
                    held.clone().acquire_many_owned(units).await,
                    fetching.clone().acquire_owned().await,
                ) else {
                    break;
                };
                let ctx = ctx.clone();
                tasks.push(handle.spawn(async move { ctx.run(read, fetch, held).await }));
            }
            let mut failed = 0;
            for t in tasks {
                failed += t.await.unwrap_or(1);
            }
            info!(
                files,
                failed,
                ms = started.elapsed().as_millis() as u64,
                "access profile filled"
            );
        });
        ProfileFill { tx, keys }
    }

    /// Starts fetching, per layer and a few range reads at once, the checkpoint windows of
    /// the reads after the first [`PRELOAD_AFTER`]: one request per window each would cost
    /// as many requests as the reads themselves. The first reads fetch their own windows
    /// so that none waits behind a larger request.
    fn preload_windows(&self, handle: &tokio::runtime::Handle, reads: &[ProfileRead]) {
        let mut per_layer: HashMap<usize, Vec<usize>> = HashMap::new();
        for read in reads.iter().skip(PRELOAD_AFTER) {
            let ProfileRead::Span {
                layer, start, end, ..
            } = read
            else {
                continue;
            };
            let Some(l) = self.layers.get(*layer) else {
                continue;
            };
            if let Ok(crate::index::Span {
                checkpoint: Some(cp),
                ..
            }) = crate::index::plan_uncompressed(&l.index, *start, end - start)
            {
                per_layer.entry(*layer).or_default().push(cp);
            }
        }
        for (layer, cps) in per_layer {
            let l = &self.layers[layer];
            let (index, windows) = (l.index.clone(), l.windows.clone());
            handle.spawn(async move {
                let loaded = windows.preload(&index, &cps).await;
                debug!(layer, wanted = cps.len(), loaded, "windows preloaded");
            });
        }
    }
}

type Permit = tokio::sync::OwnedSemaphorePermit;

/// What a profile read needs, shared by the reads of one fill.
struct ReadCtx {
    store: Arc<BlobStore>,
    blob_cache: Option<BlobCache>,
    layers: Vec<(Digest, Arc<LayerIndex>, Arc<LayerWindows>)>,
    supply: Supplier,
    fill: Filler,
    placed: Shared<oneshot::Receiver<Placed>>,
    early: Arc<Semaphore>,
}

impl ReadCtx {
    /// Runs one read: `fetch` is given back once its bytes are in memory, `held` once they
    /// are written. Returns the number of files left unfilled.
    async fn run(&self, read: ProfileRead, fetch: Permit, held: Permit) -> usize {
        let (layer, start, end, files) = match read {
            ProfileRead::Own(key) => {
                let Ok(placed) = self.placed.clone().await else {
                    return 1;
                };
                let failed = match placed.get(&key) {
                    Some(id) => usize::from((self.fill)(*id).await.is_err()),
                    None => 0,
                };
                drop(fetch);
                return failed;
            }
            ProfileRead::Span {
                layer,
                start,
                end,
                files,
            } => (layer, start, end, files),
        };
        let t = std::time::Instant::now();
        // While the placeholders are being unpacked, fewer reads at once: unpacking is on
        // the way to the container's start too.
        let early = match self.placed.peek() {
            None => self.early.clone().acquire_owned().await.ok(),
            Some(_) => None,
        };
        let data = self.read_span(layer, start, end).await;
        drop(early);
        drop(fetch);
        debug!(
            layer,
            start,
            len = end - start,
            files = files.len(),
            ms = t.elapsed().as_millis() as u64,
            ok = data.is_ok(),
            "coalesced profile read"
        );
        let Ok(placed) = self.placed.clone().await else {
            // The prepare failed: no placeholders to write.
            return files.len();
        };
        let mut failed = 0;
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %error_chain(&e), files = files.len(), "coalesced profile read failed; its files fill from their own sources");
                drop(held);
                for id in files
                    .iter()
                    .flat_map(|f| &f.keys)
                    .filter_map(|k| placed.get(k))
                {
                    failed += usize::from((self.fill)(*id).await.is_err());
                }
                return failed;
            }
        };
        let mut refused = Vec::new();
        for f in files {
            let at = (f.stream_offset - start) as usize;
            let piece = data.slice(at..at + f.len as usize);
            for id in f.keys.iter().filter_map(|k| placed.get(k)) {
                if let Err(e) = (self.supply)(*id, f.file_offset, piece.clone()).await {
                    warn!(error = %error_chain(&e), "a profile file's bytes were not taken; it fills from its own source");
                    refused.push(*id);
                }
            }
        }
        drop(data);
        drop(held);
        for id in refused {
            failed += usize::from((self.fill)(id).await.is_err());
        }
        failed
    }

    /// `[start, end)` of layer `layer`'s uncompressed stream: one range read, one window,
    /// one inflate (on a blocking thread).
    async fn read_span(&self, layer: usize, start: u64, end: u64) -> Result<Bytes, SourceError> {
        let (digest, index, windows) = self
            .layers
            .get(layer)
            .ok_or_else(|| SourceError::new(format!("no layer {layer}")))?;
        let what = || format!("bytes {start}..{end} of the stream of layer {digest}");
        let span = crate::index::plan_uncompressed(index, start, end - start)
            .map_err(|e| SourceError::with_source(what(), e))?;
        if span.len != end - start {
            return Err(SourceError::new(format!(
                "{}: past the layer's end",
                what()
            )));
        }
        let data = super::sources::fetch_span(
            &self.store,
            self.blob_cache.as_ref(),
            digest,
            index,
            windows,
            span,
            what,
        )
        .await?;
        Ok(Bytes::from(data))
    }
}
