//! Image preparation: from an image reference to a served placeholder tree.
//!
//! Owns the sequence that makes an image lazy: resolve the reference to one manifest, get
//! one [`LayerIndex`] per layer (the local index store first, then the index artifact in the
//! registry, else one streaming pass over the layer), unpack the placeholders (direct or
//! overlay), and register every placeholder with the fill engine together with a
//! [`LayerFileSource`] that fetches a file range as an HTTP range read of the compressed span
//! and inflates it, and the index's digests so that every filled byte is verified. It also
//! builds and pushes the index artifact (`fanfill index --push`).
//!
//! Layers that carry their own table of contents (eStargz, zstd:chunked: [`crate::toc`])
//! need no index: their TOC is fetched by range and verified, and their files are served by
//! a [`TocFileSource`]; [`ImageSources::file_source`] is the one place that picks a file's
//! source and the digests the engine checks.
//!
//! Every layer pulls: a layer whose TOC cannot be read (an unknown or broken TOC, an
//! unexpected footer) or whose media type announces no TOC is streamed once, indexed as it
//! passes and kept in the blob cache, and its files are served from there; a warning names
//! the layer and the reason. A pull fails only when the image itself cannot be had: its
//! manifest or config, a layer's bytes (unreachable, or not hashing to the digest the
//! manifest names), or a layer that is not a tar stream.
//!
//! Only index *metadata* travels before the placeholders are ready. The checkpoint windows
//! stay where they are (the artifact's windows blob in the registry, the `.win` file of the
//! local index store) and a [`LayerFileSource`] reads the one window a fill needs, once, by
//! a range read, through a cache shared by the image's layers ([`WINDOW_CACHE_BYTES`]). It never speaks HTTP
//! itself ([`crate::registry`]), parses tar or gzip ([`crate::index`]), creates files
//! ([`crate::unpack`]) or touches fanotify ([`crate::fill`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use oci_spec::image::Digest;
use tracing::{debug, info, warn};

use crate::blobcache::{BlobCache, Tee};
use crate::fill::{
    ContentSource, Delivery, Engine, FileId, FillError, Placeholder, SourceError, Verify,
};
use crate::index::{
    CHUNK_SIZE, Entry, IndexError, IndexOptions, IndexStore, LayerIndex, LayerWindows, WindowCache,
    WindowSource,
};
use crate::reference::Reference;
use crate::registry::{self, BlobStore, Platform};
use crate::toc::{self, TocFileSource, TocLayer};
use crate::unpack::{self, Layer, Mode, UnpackError, UnpackOptions, Unpacked};

mod profile;
pub use profile::{EntryKey, GAP_MAX, ProfileFill, ProfileRead, SPAN_MAX, SpanFile};

/// `artifactType` of the layer-index artifact a `fanfill index --push` attaches to an image
/// manifest as a referrer.
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.fanfill.index.v2";
/// Media type of one layer's encoded index metadata inside that artifact (see
/// `docs/index-format.md`). `prepare` downloads these blobs whole.
pub const INDEX_LAYER_MEDIA_TYPE: &str = "application/vnd.fanfill.layer-index.v2";
/// Media type of one layer's windows pack inside that artifact. Never downloaded whole: a
/// fill reads the one window it needs by a range read.
pub const INDEX_WINDOWS_MEDIA_TYPE: &str = "application/vnd.fanfill.layer-index.windows.v2";
/// Media type of the access profile an index artifact may carry (`fanfill index --push
/// --profile`): the files a recorded run of the image's workload read, in the order it first
/// read them ([`AccessProfile`]). `prepare` fills them in the background at once.
pub const ACCESS_PROFILE_MEDIA_TYPE: &str = "application/vnd.fanfill.access-profile.v1+json";
/// Memory for checkpoint windows shared by the layers of one prepared image (256 windows).
pub const WINDOW_CACHE_BYTES: usize = 8 << 20;

/// Errors while preparing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference did not parse.
    #[error("bad image reference")]
    Reference(#[from] crate::reference::Error),
    /// The registry or layout failed.
    #[error("image {reference}")]
    Registry {
        /// The image.
        reference: String,
        /// The registry error.
        #[source]
        source: Box<registry::Error>,
    },
    /// A layer could not be indexed or its index could not be read.
    #[error("layer {layer} of {reference}")]
    Index {
        /// The image.
        reference: String,
        /// The layer digest.
        layer: String,
        /// The index error.
        #[source]
        source: IndexError,
    },
    /// An index does not describe the layer it was filed under.
    #[error("index for layer {layer} describes blob {found}")]
    IndexMismatch {
        /// The layer digest.
        layer: String,
        /// The blob digest recorded in the index.
        found: String,
    },
    /// Unpacking placeholders failed.
    #[error("unpacking {reference} into {dest}")]
    Unpack {
        /// The image.
        reference: String,
        /// The destination.
        dest: PathBuf,
        /// The unpack error.
        #[source]
        source: Box<UnpackError>,
    },
    /// Registering placeholders with the fill engine failed.
    #[error("serving placeholders of {reference}")]
    Fill {
        /// The image.
        reference: String,
        /// The engine error.
        #[source]
        source: FillError,
    },
    /// A layer's bytes, read whole by its background completion, do not hash to its
    /// digest: the registry (or the local copy) serves another blob than the manifest names.
    #[error("layer {layer}: its bytes hash to {actual}, not to the layer's digest")]
    LayerDigest {
        /// The layer digest.
        layer: String,
        /// The sha256 its bytes have.
        actual: String,
    },
    /// Streaming a layer into its placeholders failed (prefetch).
    #[error("streaming layer {layer} into its placeholders")]
    Stream {
        /// The layer digest.
        layer: String,
        /// What failed: the blob read or its decompression.
        #[source]
        source: io::Error,
    },
    /// An internal task failed.
    #[error("background task failed: {0}")]
    Task(String),
}

/// The files a workload read, in the order it first read them, by their paths in the image
/// (as the layer indexes name them). Recorded from a served tree ([`Prepared::access_profile`],
/// `fanfill pull --record-profile`), published in the index artifact, and filled ahead of
/// the workload by the next `prepare` ([`PrepareOptions::profile_prefetch`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessProfile {
    /// Format version (1).
    pub version: u32,
    /// Image paths, first access first.
    pub files: Vec<String>,
}

impl AccessProfile {
    /// Most paths a profile may list (a hostile artifact cannot make `prepare` spend more).
    pub const MAX_FILES: usize = 100_000;

    /// Parses a profile, refusing unknown versions and oversized lists.
    pub fn from_json(bytes: &[u8]) -> Result<AccessProfile, String> {
        let p: AccessProfile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if p.version != 1 {
            return Err(format!(
                "access profile version {} (this build reads 1)",
                p.version
            ));
        }
        if p.files.len() > Self::MAX_FILES {
            return Err(format!(
                "access profile lists {} files (at most {})",
                p.files.len(),
                Self::MAX_FILES
            ));
        }
        Ok(p)
    }
}

/// Where a layer's index came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexOrigin {
    /// The local index store (an earlier pull or `fanfill index`).
    Local,
    /// The index artifact in the registry (nothing but the index travelled).
    Artifact,
    /// Built now by streaming the whole layer once.
    Built,
    /// The layer's own table of contents (eStargz, zstd:chunked): no index needed, only the
    /// TOC travelled.
    Toc,
}

impl IndexOrigin {
    /// One word for reports: `local`, `artifact`, `built`, `toc`.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexOrigin::Local => "local",
            IndexOrigin::Artifact => "artifact",
            IndexOrigin::Built => "built",
            IndexOrigin::Toc => "toc",
        }
    }
}

/// How to prepare an image.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Direct (one flattened tree) or overlay (one tree per layer).
    pub mode: Mode,
    /// Registry access: TLS, credentials, mirrors, retries.
    pub registry: registry::Options,
    /// Platform to pick from a multi-arch index (default: this host).
    pub platform: Option<Platform>,
    /// Where layer indexes are kept, by layer digest.
    pub index_dir: PathBuf,
    /// Look for the index artifact in the registry before streaming layers.
    pub use_artifact: bool,
    /// Keep layers that have to be streamed whole (no index yet) here, so their fills are
    /// local reads instead of second downloads (`None`: do not keep them).
    pub blob_cache: Option<PathBuf>,
    /// Reads of the artifact's access profile in flight at once ([`ImageSources::start_profile`]:
    /// coalesced range reads started as soon as the indexes are in, written once the
    /// placeholders exist); 0: ignore profiles. Default 8.
    pub profile_prefetch: usize,
}

/// Which layer indexes a prepare takes file digests and metadata from (`--index-policy`).
/// An eStargz or zstd:chunked TOC whose digest the manifest names is bound to the image
/// under every policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexPolicy {
    /// Only indexes built on this node from the layer stream, which is verified against the
    /// layer digest the manifest names: an image pulled by digest keeps its integrity. The
    /// first prepare of a layer streams it whole. The default.
    #[default]
    Local,
    /// Also the newest index artifact among the image's referrers, trusted on sight: anyone
    /// with push rights to the repository can attach one, and nothing binds it to the
    /// image. Only for repositories whose every writer is trusted.
    Referrer,
}

impl IndexPolicy {
    /// `opts` restricted to this policy (a referrer artifact is looked for only under
    /// [`IndexPolicy::Referrer`], and then only if the options ask for it).
    pub fn apply(self, opts: &mut PrepareOptions) {
        if self == IndexPolicy::Local {
            opts.use_artifact = false;
        }
    }
}

impl std::str::FromStr for IndexPolicy {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<IndexPolicy, SettingsError> {
        match s {
            "local" => Ok(IndexPolicy::Local),
            "referrer" => Ok(IndexPolicy::Referrer),
            other => Err(SettingsError {
                what: "--index-policy",
                message: format!("{other:?} is not one of: local, referrer"),
            }),
        }
    }
}

/// Registry settings that do not parse (`creds`, `platform`).
#[derive(Debug, thiserror::Error)]
#[error("bad {what}: {message}")]
pub struct SettingsError {
    /// Which setting.
    pub what: &'static str,
    /// Why.
    pub message: String,
}

impl PrepareOptions {
    /// Options from the registry settings of a request (or the CLI's flags).
    pub fn from_settings(
        index_dir: impl Into<PathBuf>,
        r: &crate::api::RegistrySettings,
    ) -> Result<PrepareOptions, SettingsError> {
        let bad = |what, e: &dyn std::fmt::Display| SettingsError {
            what,
            message: e.to_string(),
        };
        let mut o = PrepareOptions::new(index_dir);
        o.registry.insecure = r.insecure;
        o.registry.creds = r
            .creds
            .as_deref()
            .map(str::parse::<registry::Credentials>)
            .transpose()
            .map_err(|e| bad("--creds", &e))?;
        o.registry.authfile = r.authfile.clone();
        o.registry.cert_dir = r.cert_dir.clone();
        o.registry.hosts_dir = r.hosts_dir.clone();
        o.registry.mirrors = r
            .mirrors
            .iter()
            .map(|m| registry::Mirror {
                location: m.clone(),
                insecure: r.insecure,
            })
            .collect();
        o.platform = r
            .platform
            .as_deref()
            .map(str::parse::<Platform>)
            .transpose()
            .map_err(|e| bad("--platform", &e))?;
        o.use_artifact = !r.no_index_artifact;
        Ok(o)
    }

    /// Defaults: direct mode, the host platform, indexes under `index_dir`.
    /// Streamed layers are kept in `blobs` beside `index_dir`.
    pub fn new(index_dir: impl Into<PathBuf>) -> PrepareOptions {
        let index_dir: PathBuf = index_dir.into();
        PrepareOptions {
            mode: Mode::Direct,
            registry: registry::Options::default(),
            platform: None,
            blob_cache: Some(index_dir.with_file_name("blobs")),
            index_dir,
            use_artifact: true,
            profile_prefetch: 8,
        }
    }
}

/// An image whose placeholders are ready and served.
#[derive(Debug)]
pub struct Prepared {
    /// The reference as given.
    pub reference: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// The placeholder tree (direct) or the directory of layer trees (overlay).
    pub dest: PathBuf,
    /// What the unpack created; in overlay mode also the lower directories.
    pub unpacked: Unpacked,
    /// The engine's ids of the registered placeholders.
    pub files: Vec<FileId>,
    /// The same ids in prefetch order: the files TOC layers name to prefetch first (eStargz
    /// `.prefetch.landmark`), then the rest (see [`Engine::fill_files`]).
    pub prefetch_order: Vec<FileId>,
    /// Where each layer's index came from, lowest layer first.
    pub index_origins: Vec<IndexOrigin>,
    /// Bytes received from the registry or layout before the placeholders were ready.
    pub bytes_before_ready: u64,
    /// Sum of the compressed layer sizes.
    pub image_size: u64,
    /// The store the placeholders fill from (its counters keep running).
    pub store: Arc<BlobStore>,
    /// The sources of the image's files, by layer (for [`Prepared::prefetch`] and
    /// [`Prepared::access_profile`]).
    pub sources: ImageSources,
    /// Files of the artifact's access profile being filled ahead of the workload (0: no
    /// profile, or [`PrepareOptions::profile_prefetch`] is 0).
    pub profile_files: usize,
}

/// The indexes of an image's layers, with where each came from.
pub struct ImageIndexes {
    /// The resolved image.
    pub image: registry::ResolvedImage,
    /// One index per layer, lowest first.
    pub layers: Vec<(Digest, Arc<LayerIndex>, IndexOrigin)>,
    /// Where each layer's checkpoint windows are read from, lowest first.
    pub windows: Vec<Arc<dyn WindowSource>>,
    /// Where layers that travelled whole are kept (read before the registry).
    pub blob_cache: Option<BlobCache>,
    /// The access profile to fill ahead: the index artifact's, when it was read and carries
    /// one, else the files TOC layers name to prefetch first (an optimized eStargz's
    /// prioritized files).
    pub profile: Option<AccessProfile>,
    /// Per layer, lowest first: its table of contents when it is a TOC layer
    /// ([`IndexOrigin::Toc`]; `layers` then holds the TOC's entry table).
    pub tocs: Vec<Option<Arc<TocLayer>>>,
}

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
                .map(|(((digest, index, _), w), toc)| LayerSources {
                    digest: digest.clone(),
                    index: index.clone(),
                    toc: toc.clone(),
                    windows: Arc::new(LayerWindows::new(w.clone(), cache.clone())),
                })
                .collect(),
        }
    }
}

struct LayerSources {
    digest: Digest,
    index: Arc<LayerIndex>,
    toc: Option<Arc<TocLayer>>,
    windows: Arc<LayerWindows>,
}

/// Everything that builds the content source of any file of a prepared image: the store,
/// per layer its index or TOC and checkpoint windows, the blob cache. The one place that
/// picks [`LayerFileSource`] or [`TocFileSource`] and the matching [`Verify`].
pub struct ImageSources {
    store: Arc<BlobStore>,
    blob_cache: Option<BlobCache>,
    layers: Vec<LayerSources>,
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

    /// The entry `entry` of layer `layer`, hardlinks resolved to their file.
    pub fn entry(&self, layer: usize, entry: usize) -> Option<&Entry> {
        self.layers.get(layer)?.index.resolve(entry)
    }

    /// The content source and verification of regular-file entry `entry` of layer `layer`.
    // Returned once per file at registration: the size of the error does not matter here.
    #[allow(clippy::result_large_err)]
    pub fn file_source(
        &self,
        layer: usize,
        entry: usize,
    ) -> Result<(Arc<dyn ContentSource>, Verify), ImageError> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| ImageError::Task(format!("no layer {layer}")))?;
        let missing = || ImageError::Task(format!("no entry {entry} in layer {}", l.digest));
        if let Some(toc) = &l.toc {
            let target = resolve_pos(&toc.index, entry).ok_or_else(missing)?;
            let verify = toc::verify_for(toc, target);
            let source = TocFileSource::new(
                self.store.clone(),
                self.blob_cache.clone(),
                l.digest.clone(),
                toc.clone(),
                target,
            );
            return Ok((Arc::new(source), verify));
        }
        let e = l.index.resolve(entry).cloned().ok_or_else(missing)?;
        let verify = verify_for(&e);
        let source = LayerFileSource::new(
            self.store.clone(),
            l.digest.clone(),
            l.index.clone(),
            l.windows.clone(),
            e,
        )
        .with_blob_cache(self.blob_cache.clone());
        Ok((Arc::new(source), verify))
    }

    /// Streams every layer that has a tar stream (TOC layers have none) into its
    /// placeholders with [`stream_fill_layer`], [`STREAM_PARALLEL`] layers at a time, lowest
    /// first. `files` are the placeholders as (layer, entry, engine id). A layer whose stream
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
    /// misses to wait for (`examples/walk.rs`).
    pub fn stream_fill_checked(
        &self,
        engine: &Engine,
        files: &[(usize, usize, FileId)],
        before_piece: impl Fn(u64) -> bool + Sync,
    ) -> (StreamFill, Vec<(String, String)>) {
        let total = std::sync::Mutex::new(StreamFill::default());
        let mismatched = std::sync::Mutex::new(Vec::new());
        let stopped = AtomicBool::new(false);
        let next = AtomicUsize::new(0);
        let streamed: Vec<usize> = (0..self.layers.len())
            .filter(|&li| self.layers[li].toc.is_none())
            .collect();
        let one = |li: usize| {
            let l = &self.layers[li];
            let mine: Vec<(usize, FileId)> = files
                .iter()
                .filter(|f| f.0 == li)
                .map(|f| (f.1, f.2))
                .collect();
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
            for _ in 0..STREAM_PARALLEL.min(streamed.len()) {
                s.spawn(|| {
                    while !stopped.load(Ordering::SeqCst) {
                        let Some(&li) = streamed.get(next.fetch_add(1, Ordering::SeqCst)) else {
                            break;
                        };
                        one(li);
                    }
                });
            }
        });
        let mut mismatched = mismatched.into_inner().unwrap();
        mismatched.sort();
        (total.into_inner().unwrap(), mismatched)
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
    /// then every other one in the order given. Returns positions into `files`.
    pub fn prefetch_order(&self, files: &[(usize, usize)]) -> Vec<usize> {
        let mut first = Vec::new();
        let mut pos: std::collections::HashMap<(usize, usize), usize> =
            files.iter().enumerate().map(|(i, f)| (*f, i)).collect();
        for layer in 0..self.layers.len() {
            for &e in self.prefetch_first(layer) {
                if let Some(i) = pos.remove(&(layer, e)) {
                    first.push(i);
                }
            }
        }
        let mut taken = vec![false; files.len()];
        for &i in &first {
            taken[i] = true;
        }
        first.extend((0..files.len()).filter(|&i| !taken[i]));
        first
    }
}

/// Position of the entry a hardlink at `idx` resolves to (`idx` itself for other kinds).
fn resolve_pos(index: &LayerIndex, idx: usize) -> Option<usize> {
    let target = index.resolve(idx)?;
    // `resolve` returns a reference into `entries`: find its position by address.
    index.entries.iter().position(|e| std::ptr::eq(e, target))
}

/// A windows pack in the registry (or layout), read a window at a time by range reads.
struct RemoteWindows {
    store: Arc<BlobStore>,
    digest: Digest,
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

type Found = (Arc<LayerIndex>, Arc<dyn WindowSource>, IndexOrigin);

fn reg_err(reference: &str) -> impl Fn(registry::Error) -> ImageError + '_ {
    move |source| ImageError::Registry {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}

/// Opens the store of `reference` and resolves it to one image manifest.
pub async fn open(
    reference: &str,
    opts: &PrepareOptions,
) -> Result<(Arc<BlobStore>, registry::ResolvedImage), ImageError> {
    let parsed: Reference = reference.parse()?;
    let store = BlobStore::open(&parsed, &opts.registry)
        .await
        .map_err(reg_err(reference))?;
    let image = store
        .resolve(opts.platform.as_ref())
        .await
        .map_err(reg_err(reference))?;
    Ok((Arc::new(store), image))
}

/// Gets an index for every layer of the image: local store, artifact, or one streaming pass
/// (the result is saved locally).
pub async fn load_indexes(
    store: &Arc<BlobStore>,
    image: registry::ResolvedImage,
    reference: &str,
    opts: &PrepareOptions,
) -> Result<ImageIndexes, ImageError> {
    let local = IndexStore::new(&opts.index_dir);
    let idx_err = |layer: &Digest| {
        let (reference, layer) = (reference.to_string(), layer.to_string());
        move |source| ImageError::Index {
            reference,
            layer,
            source,
        }
    };
    let blob_cache = opts.blob_cache.as_ref().map(BlobCache::new);
    let mut found: Vec<Option<Found>> = Vec::new();
    let mut profile = None;
    let mut tocs: Vec<Option<Arc<TocLayer>>> = Vec::new();
    let toc_found = |t: TocLayer| -> (Option<Found>, Option<Arc<TocLayer>>) {
        info!(layer = %t.index.blob_digest, format = ?t.format, entries = t.index.entries.len(), toc_bytes = t.toc_bytes_fetched, "layer read through its table of contents");
        let ix: Arc<LayerIndex> = Arc::new(t.index.clone());
        let windows: Arc<dyn WindowSource> = Arc::new(crate::index::NoWindows);
        (Some((ix, windows, IndexOrigin::Toc)), Some(Arc::new(t)))
    };
    // Per layer: whether its TOC (announced or found by a footer probe) was tried already.
    let mut toc_tried = Vec::new();
    for desc in image.manifest.layers() {
        let digest = desc.digest().to_string();
        // An index built by streaming the layer (an earlier pull that could not read it
        // lazily) comes first: it is local, and its TOC would fail again.
        let hit = match local.load(&digest).map_err(idx_err(desc.digest()))? {
            Some(ix) => {
                let windows = local.open_windows(&ix).map_err(idx_err(desc.digest()))?;
                Some((Arc::new(ix), windows, IndexOrigin::Local))
            }
            None => None,
        };
        // A layer that announces its TOC needs nothing else, if the TOC reads.
        let announced = toc::detect(desc).filter(|_| hit.is_none());
        toc_tried.push(announced.is_some());
        if let Some(format) = announced {
            match toc::load(store, desc, blob_cache.as_ref()).await {
                Ok(Some(t)) => {
                    let (f, t) = toc_found(t);
                    found.push(f);
                    tocs.push(t);
                    continue;
                }
                Ok(None) => warn!(
                    layer = %digest,
                    media_type = %desc.media_type(),
                    format = format.as_str(),
                    reason = "the layer announces a TOC but has none",
                    "cannot read the layer lazily; it will be streamed once and served from the blob cache"
                ),
                Err(e) => warn!(
                    layer = %digest,
                    media_type = %desc.media_type(),
                    format = format.as_str(),
                    reason = %crate::fill::error_chain(&e),
                    "cannot read the layer lazily; it will be streamed once and served from the blob cache"
                ),
            }
        }
        tocs.push(None);
        found.push(hit);
    }
    if opts.use_artifact && found.iter().any(Option::is_none) {
        match artifact_indexes(store, &image.manifest_digest).await {
            Ok((mut list, p)) => {
                profile = p;
                // Artifact metadata is not stored locally: it is small, and its windows stay
                // in the registry (the local store keeps only complete pairs).
                for (slot, desc) in found.iter_mut().zip(image.manifest.layers()) {
                    if slot.is_some() {
                        continue;
                    }
                    let want = desc.digest().to_string();
                    if let Some(pos) = list.iter().position(|(ix, _)| ix.blob_digest == want) {
                        let (ix, windows) = list.swap_remove(pos);
                        *slot = Some((Arc::new(ix), windows, IndexOrigin::Artifact));
                    }
                }
            }
            Err(e) => debug!(error = %crate::fill::error_chain(&e), "no usable index artifact"),
        }
    }
    // An index that cannot serve ranges cheaply (a zstd layer written as one frame, or
    // frames far apart: every fill would inflate from a frame start it has to fetch again) is
    // worth less than the layer itself: stream the layer once into the blob cache instead.
    if let Some(cache) = &blob_cache {
        for (slot, desc) in found.iter_mut().zip(image.manifest.layers()) {
            let Some((ix, _, origin)) = slot.as_ref().filter(|f| f.2 != IndexOrigin::Toc) else {
                continue;
            };
            let gap = random_access_gap(ix);
            if gap > RANDOM_ACCESS_GAP_MAX && !cache.contains(desc.digest().as_ref()) {
                warn!(
                    layer = %desc.digest(),
                    media_type = %desc.media_type(),
                    index = origin.as_str(),
                    gap,
                    reason = "its random-access points lie too far apart",
                    "cannot read the layer lazily; it will be streamed once and served from the blob cache"
                );
                *slot = None;
            }
        }
    }
    // No index anywhere: a gzip layer may still be eStargz without the annotation (its
    // footer tells, for one small range read).
    for (((slot, toc_slot), desc), tried) in found
        .iter_mut()
        .zip(tocs.iter_mut())
        .zip(image.manifest.layers())
        .zip(&toc_tried)
    {
        if slot.is_some() || *tried {
            continue;
        }
        match toc::load(store, desc, blob_cache.as_ref()).await {
            Ok(Some(t)) => (*slot, *toc_slot) = toc_found(t),
            Ok(None) => {}
            Err(e) => warn!(
                layer = %desc.digest(),
                media_type = %desc.media_type(),
                reason = %crate::fill::error_chain(&e),
                "cannot read the layer lazily (its footer names a TOC that does not read); it will be streamed once and served from the blob cache"
            ),
        }
    }
    let mut layers = Vec::new();
    let mut windows = Vec::new();
    for (slot, desc) in found.into_iter().zip(image.manifest.layers()) {
        let digest = desc.digest().clone();
        let (ix, win, origin) = match slot {
            Some(hit) => hit,
            None => {
                info!(layer = %digest, size = desc.size(), "no index for layer: streaming it once");
                let stream = store
                    .open_stream(&digest)
                    .await
                    .map_err(reg_err(reference))?;
                let reader = stream.into_blocking_reader();
                let iopts = IndexOptions {
                    media_type: Some(desc.media_type().to_string()),
                    ..IndexOptions::default()
                };
                // The layer travels whole anyway: keep it, so fills read it locally.
                let mut reader = match &opts.blob_cache {
                    Some(dir) => BlobCache::new(dir).tee(digest.as_ref(), reader),
                    None => Tee::passthrough(reader),
                };
                let (built, pack) = tokio::task::spawn_blocking(move || {
                    let built = LayerIndex::build(&mut reader, &iopts)?;
                    if let Err(e) = reader.finish() {
                        warn!(error = %e, "keeping the streamed layer failed");
                    }
                    Ok::<_, IndexError>(built)
                })
                .await
                .map_err(|e| ImageError::Task(e.to_string()))?
                .map_err(idx_err(&digest))?;
                local.save(&built, &pack).map_err(idx_err(&digest))?;
                let win = local.open_windows(&built).map_err(idx_err(&digest))?;
                (Arc::new(built), win, IndexOrigin::Built)
            }
        };
        if ix.blob_digest != digest.to_string() {
            return Err(ImageError::IndexMismatch {
                layer: digest.to_string(),
                found: ix.blob_digest.clone(),
            });
        }
        layers.push((digest, ix, origin));
        windows.push(win);
    }
    // Without a recorded profile, the files an optimized eStargz lists before its
    // `.prefetch.landmark` (`ctr-remote image optimize`: what its workload read) are one.
    let profile = profile.or_else(|| landmark_profile(&tocs));
    Ok(ImageIndexes {
        image,
        layers,
        windows,
        blob_cache,
        tocs,
        profile,
    })
}

/// The files the TOC layers name to prefetch first (eStargz entries before
/// `.prefetch.landmark`, lowest layer first, in TOC order) as an access profile, filled
/// ahead of the workload like a recorded one; `None` when no layer names any.
fn landmark_profile(tocs: &[Option<Arc<TocLayer>>]) -> Option<AccessProfile> {
    let mut seen = std::collections::HashSet::new();
    let files: Vec<String> = tocs
        .iter()
        .flatten()
        .flat_map(|t| {
            t.prefetch_first
                .iter()
                .filter_map(|&e| t.index.entries.get(e).map(|e| e.path.clone()))
        })
        .filter(|p| seen.insert(p.clone()))
        .take(AccessProfile::MAX_FILES)
        .collect();
    if files.is_empty() {
        return None;
    }
    info!(
        files = files.len(),
        "the layers' prioritized files (before the eStargz landmark) are filled ahead as a profile"
    );
    Some(AccessProfile { version: 1, files })
}

/// Largest distance, in compressed bytes, between a layer's random-access points
/// ([`random_access_gap`]) for it to be read by ranges: farther apart, a fill would fetch
/// and inflate up to this much from the point before it, again for every fill.
pub const RANDOM_ACCESS_GAP_MAX: u64 = 8 << 20;

/// The largest compressed distance between consecutive checkpoints of `ix` (and from the
/// last one to the blob's end); 0 for an uncompressed layer, which needs none.
pub fn random_access_gap(ix: &LayerIndex) -> u64 {
    if ix.compression == crate::index::Compression::None {
        return 0;
    }
    let mut points: Vec<u64> = ix.checkpoints.iter().map(|c| c.compressed_offset).collect();
    points.push(ix.compressed_size);
    let first = points.first().copied().unwrap_or(0);
    points
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0)
        .max(first)
}

/// The layer indexes of the image's index artifact, each with its windows pack blob as a
/// window source, and its access profile if it has one. Downloads the metadata blobs only.
async fn artifact_indexes(
    store: &Arc<BlobStore>,
    subject: &Digest,
) -> Result<
    (
        Vec<(LayerIndex, Arc<dyn WindowSource>)>,
        Option<AccessProfile>,
    ),
    ImageError,
> {
    let Some(referrer) = store
        .find_referrer(subject, INDEX_ARTIFACT_TYPE)
        .await
        .map_err(reg_err("index artifact"))?
    else {
        return Ok((Vec::new(), None));
    };
    let blobs = referrer.manifest.layers();
    // The metadata blobs (layer indexes, the first access profile), fetched concurrently:
    // one round trip each, and every one is needed before the placeholders.
    let profile_blob = blobs
        .iter()
        .position(|b| b.media_type().to_string() == ACCESS_PROFILE_MEDIA_TYPE);
    let fetches: Vec<BoxFuture<'_, Option<Result<Bytes, registry::Error>>>> = blobs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let wanted =
                Some(i) == profile_blob || b.media_type().to_string() == INDEX_LAYER_MEDIA_TYPE;
            let digest = b.digest().clone();
            async move {
                match wanted {
                    true => Some(store.fetch_blob(&digest).await),
                    false => None,
                }
            }
            .boxed()
        })
        .collect();
    let mut fetched: Vec<_> = {
        use futures::stream::{self, StreamExt};
        stream::iter(fetches).buffered(8).collect().await
    };
    let mut out = Vec::new();
    let mut profile = None;
    for (i, blob) in blobs.iter().enumerate() {
        let media_type = blob.media_type().to_string();
        if Some(i) == profile_blob
            && let Some(got) = fetched[i].take()
        {
            let parsed = got
                .map_err(|e| e.to_string())
                .and_then(|bytes| AccessProfile::from_json(&bytes));
            match parsed {
                Ok(p) => profile = Some(p),
                Err(e) => {
                    warn!(blob = %blob.digest(), error = %e, "ignoring the artifact's access profile")
                }
            }
            continue;
        }
        if media_type != INDEX_LAYER_MEDIA_TYPE {
            continue;
        }
        let Some(bytes) = fetched[i].take() else {
            continue;
        };
        let bytes = bytes.map_err(reg_err("index artifact"))?;
        let ix = match LayerIndex::decode(&bytes) {
            Ok(ix) => ix,
            Err(e) => {
                warn!(blob = %blob.digest(), error = %e, "skipping undecodable index blob");
                continue;
            }
        };
        let windows: Arc<dyn WindowSource> = match &ix.windows_digest {
            None => Arc::new(crate::index::NoWindows),
            Some(want) => {
                let pack = blobs.iter().find(|b| {
                    b.digest().to_string() == *want
                        && b.size() == ix.windows_size
                        && b.media_type().to_string() == INDEX_WINDOWS_MEDIA_TYPE
                });
                let Some(pack) = pack else {
                    warn!(blob = %blob.digest(), windows = %want, "index artifact lacks the windows pack of a layer index; skipping it");
                    continue;
                };
                Arc::new(RemoteWindows {
                    store: store.clone(),
                    digest: pack.digest().clone(),
                })
            }
        };
        out.push((ix, windows));
    }
    Ok((out, profile))
}

/// Prepares `reference` into `dest` (which must be empty) and registers every placeholder
/// with `engine`. Returns as soon as the placeholders are ready and served.
pub async fn prepare(
    engine: &Engine,
    reference: &str,
    dest: &Path,
    opts: &PrepareOptions,
) -> Result<Prepared, ImageError> {
    let (store, image) = open(reference, opts).await?;
    let manifest_digest = image.manifest_digest.to_string();
    let image_size = image.manifest.layers().iter().map(|l| l.size()).sum();
    let indexes = load_indexes(&store, image, reference, opts).await?;
    let sources = indexes.sources(&store);
    // The profile's files are fetched and inflated while the placeholders are unpacked.
    let early_profile = indexes
        .profile
        .as_ref()
        .filter(|_| opts.profile_prefetch > 0)
        .map(|p| sources.start_profile(engine, p, opts.profile_prefetch));
    let digests: Vec<String> = indexes.layers.iter().map(|l| l.0.to_string()).collect();
    let ixs: Vec<Arc<LayerIndex>> = indexes.layers.iter().map(|l| l.1.clone()).collect();
    let uopts = UnpackOptions {
        mode: opts.mode,
        ..UnpackOptions::default()
    };
    let (dest_buf, ixs2, digests2) = (dest.to_path_buf(), ixs.clone(), digests.clone());
    let unpacked = tokio::task::spawn_blocking(move || {
        let layers: Vec<Layer<'_>> = digests2
            .iter()
            .zip(&ixs2)
            .map(|(d, ix)| Layer::new(d, &ix.entries))
            .collect();
        unpack::unpack(&layers, &dest_buf, &uopts)
    })
    .await
    .map_err(|e| ImageError::Task(e.to_string()))?
    .map_err(|source| {
        // A refused destination (not empty, missing) was not ours to clean.
        if !matches!(
            source,
            UnpackError::DestNotEmpty { .. } | UnpackError::Dest { .. }
        ) {
            remove_tree_contents(dest);
        }
        ImageError::Unpack {
            reference: reference.to_string(),
            dest: dest.to_path_buf(),
            source: Box::new(source),
        }
    })?;
    if let Err(e) = mark_tree(dest, reference) {
        warn!(dest = %dest.display(), error = %e, "cannot mark the tree as fanfill's");
    }
    // Thousands of syscalls: off this runtime thread when the runtime has others.
    let registered = blocking_here(|| {
        let t = std::time::Instant::now();
        let r = register_all(engine, &sources, &unpacked, reference, opts.mode);
        debug!(
            ms = t.elapsed().as_millis() as u64,
            "placeholders registered"
        );
        r
    });
    let files = match registered {
        Ok(files) => files,
        Err(e) => {
            // Leave nothing behind: the tree was ours (dest had to be empty).
            remove_tree_contents(dest);
            return Err(e);
        }
    };
    let keys: Vec<(usize, usize)> = unpacked
        .placeholders
        .iter()
        .map(|p| (p.layer, p.entry))
        .collect();
    let profile_files = early_profile.map_or(0, |p| p.place(&keys, &files));
    let prefetch_order = sources
        .prefetch_order(&keys)
        .into_iter()
        .map(|i| files[i])
        .collect();
    let bytes_before_ready = store.bytes_fetched();
    info!(
        reference,
        dest = %dest.display(),
        files = files.len(),
        bytes_before_ready,
        image_size,
        "placeholders ready"
    );
    Ok(Prepared {
        reference: reference.to_string(),
        manifest_digest,
        dest: dest.to_path_buf(),
        unpacked,
        files,
        prefetch_order,
        index_origins: indexes.layers.iter().map(|l| l.2).collect(),
        bytes_before_ready,
        image_size,
        store,
        sources,
        profile_files,
    })
}

impl Prepared {
    /// The files readers of this tree have touched so far, first access first, as an access
    /// profile to publish with the index artifact ([`index_image_with_profile`]).
    pub fn access_profile(&self, engine: &Engine) -> AccessProfile {
        let by_id: std::collections::HashMap<FileId, &str> = self
            .unpacked
            .placeholders
            .iter()
            .zip(&self.files)
            .filter_map(|(p, id)| {
                let (_, index) = self.sources.layers().nth(p.layer)?;
                Some((*id, index.entries.get(p.entry)?.path.as_str()))
            })
            .collect();
        AccessProfile {
            version: 1,
            files: engine
                .accessed(&self.files)
                .iter()
                .filter_map(|id| by_id.get(id).map(|p| p.to_string()))
                .collect(),
        }
    }
}

/// Runs blocking `f` on this thread, first handing this runtime thread's other tasks to
/// another one when the runtime has several ([`tokio::task::block_in_place`]).
fn blocking_here<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Registers one unpacked placeholder with the engine, its bytes coming from `source`. In
/// overlay mode it carries no pre-content mark: overlay reads of a marked lower file fail
/// with EPERM, so the overlay open watch fills it whole instead.
pub fn register_placeholder(
    engine: &Engine,
    p: &unpack::Placeholder,
    source: Arc<dyn ContentSource>,
    verify: Verify,
    mode: Mode,
) -> Result<FileId, crate::fill::FillError> {
    let placeholder = Placeholder {
        path: p.path.clone(),
        size: p.size,
        source,
        verify,
    };
    match mode {
        Mode::Direct => engine.register(placeholder),
        Mode::Overlay => engine.register_unmarked(placeholder),
    }
}

/// Threads registering placeholders: each registration is a handful of syscalls (open,
/// statx, getxattr, the mark, close), so two threads halve the wait on a 2-core machine.
const REGISTER_THREADS: usize = 2;

/// Registers every placeholder of an unpacked image, [`REGISTER_THREADS`] at a time; on
/// failure unregisters the ones done. Blocks: call it off the async runtime.
// Returned once per prepare: the size of the error does not matter here.
#[allow(clippy::result_large_err)]
fn register_all(
    engine: &Engine,
    sources: &ImageSources,
    unpacked: &Unpacked,
    reference: &str,
    mode: Mode,
) -> Result<Vec<FileId>, ImageError> {
    let register = |p: &unpack::Placeholder| -> Result<FileId, ImageError> {
        let (source, verify) = sources.file_source(p.layer, p.entry)?;
        register_placeholder(engine, p, source, verify, mode).map_err(|source| ImageError::Fill {
            reference: reference.to_string(),
            source,
        })
    };
    let all = &unpacked.placeholders;
    let per = all.len().div_ceil(REGISTER_THREADS).max(1);
    let parts: Vec<(Vec<FileId>, Option<ImageError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = all
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    let mut done = Vec::with_capacity(part.len());
                    for p in part {
                        match register(p) {
                            Ok(id) => done.push(id),
                            Err(e) => return (done, Some(e)),
                        }
                    }
                    (done, None)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        Vec::new(),
                        Some(ImageError::Task("registering panicked".into())),
                    )
                })
            })
            .collect()
    });
    let mut files = Vec::with_capacity(all.len());
    let mut failed = None;
    for (done, err) in parts {
        files.extend(done);
        failed = failed.or(err);
    }
    match failed {
        None => Ok(files),
        Some(e) => {
            for id in files {
                let _ = engine.unregister(id);
            }
            Err(e)
        }
    }
}

/// Extended attribute set on a prepared tree's top directory, naming the image: lets the
/// OCI hook recognise a fanfill tree (and fail closed) even when the daemon is down.
pub const TREE_XATTR: &str = "trusted.fanfill.image";

/// Marks `dest` as a tree prepared from `reference` (see [`TREE_XATTR`]).
pub fn mark_tree(dest: &Path, reference: &str) -> std::io::Result<()> {
    xattr::set(dest, TREE_XATTR, reference.as_bytes())
}

/// [`mark_tree`] on the tree's directory open as `dir`.
pub fn mark_tree_dir(dir: &std::fs::File, reference: &str) -> std::io::Result<()> {
    use xattr::FileExt as _;
    dir.set_xattr(TREE_XATTR, reference.as_bytes())
}

/// The image a prepared tree came from, if `path` or one of its two parents is one.
pub fn tree_image(path: &Path) -> Option<String> {
    path.ancestors()
        .take(3)
        .find_map(|p| xattr::get(p, TREE_XATTR).ok().flatten())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Removes everything inside `dir` (not `dir` itself), best effort.
pub fn remove_tree_contents(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let r = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                _ => std::fs::remove_file(&p),
            };
            if let Err(err) = r {
                warn!(path = %p.display(), error = %err, "cleaning up after a failed prepare");
            }
        }
    }
}

/// What the engine checks a file's bytes against: per-chunk digests for large files, the
/// whole-file digest for the rest.
pub fn verify_for(entry: &Entry) -> Verify {
    if !entry.chunk_sha256.is_empty() {
        Verify::Chunks {
            chunk: CHUNK_SIZE,
            sha256: entry.chunk_sha256.clone(),
        }
    } else if let Some(d) = &entry.sha256 {
        Verify::Whole(d.clone())
    } else {
        Verify::None
    }
}

/// Builds (or loads) the indexes of every layer and, with `push`, attaches them to the image
/// manifest in the registry as one artifact. Returns the indexes and the artifact digest.
pub async fn index_image(
    reference: &str,
    opts: &PrepareOptions,
    push: bool,
) -> Result<(ImageIndexes, Option<Digest>), ImageError> {
    index_image_with_profile(reference, opts, push, None).await
}

/// [`index_image`], with an access profile added to the pushed artifact.
pub async fn index_image_with_profile(
    reference: &str,
    opts: &PrepareOptions,
    push: bool,
    profile: Option<&AccessProfile>,
) -> Result<(ImageIndexes, Option<Digest>), ImageError> {
    let (store, image) = open(reference, opts).await?;
    let subject = image.manifest_digest.clone();
    let mut no_artifact = opts.clone();
    no_artifact.use_artifact = false;
    let indexes = load_indexes(&store, image, reference, &no_artifact).await?;
    if !push {
        return Ok((indexes, None));
    }
    // Every index is in the local store now (loaded from it, or built and saved).
    let local = IndexStore::new(&opts.index_dir);
    let mut blobs = Vec::new();
    for (digest, ix, origin) in &indexes.layers {
        if *origin == IndexOrigin::Toc {
            // Read through its own TOC: nothing to attach.
            continue;
        }
        blobs.push((INDEX_LAYER_MEDIA_TYPE.to_string(), Bytes::from(ix.encode())));
        let pack = local.load_windows(ix).map_err(|source| ImageError::Index {
            reference: reference.to_string(),
            layer: digest.to_string(),
            source,
        })?;
        if let Some(pack) = pack {
            blobs.push((INDEX_WINDOWS_MEDIA_TYPE.to_string(), pack.bytes().clone()));
        }
    }
    if blobs.is_empty() {
        info!(
            reference,
            "every layer carries its own TOC: no index artifact to push"
        );
        return Ok((indexes, None));
    }
    if let Some(p) = profile {
        let json = serde_json::to_vec(p).map_err(|e| ImageError::Task(e.to_string()))?;
        blobs.push((ACCESS_PROFILE_MEDIA_TYPE.to_string(), Bytes::from(json)));
    }
    let digest = store
        .push_artifact(&subject, INDEX_ARTIFACT_TYPE, blobs)
        .await
        .map_err(reg_err(reference))?;
    info!(reference, artifact = %digest, "index artifact pushed");
    Ok((indexes, Some(digest)))
}

/// Fills a placeholder from its layer: a range read of the compressed span that holds the
/// wanted bytes (from the nearest checkpoint) and, concurrently, of that checkpoint's window
/// (unless cached), inflated and sliced. The engine verifies the result against the index's
/// digests before writing it.
pub struct LayerFileSource {
    local: Option<BlobCache>,
    store: Arc<BlobStore>,
    layer: Digest,
    index: Arc<LayerIndex>,
    windows: Arc<LayerWindows>,
    entry: Entry,
}

impl LayerFileSource {
    /// The source of regular-file `entry` of layer `layer` (described by `index`, its
    /// checkpoint windows read through `windows`), fetching from `store`.
    pub fn new(
        store: Arc<BlobStore>,
        layer: Digest,
        index: Arc<LayerIndex>,
        windows: Arc<LayerWindows>,
        entry: Entry,
    ) -> LayerFileSource {
        LayerFileSource {
            local: None,
            store,
            layer,
            index,
            windows,
            entry,
        }
    }

    /// Reads the layer from `cache` when it holds it (a layer that streamed whole).
    pub fn with_blob_cache(mut self, cache: Option<BlobCache>) -> LayerFileSource {
        self.local = cache;
        self
    }
}

/// The bytes `span` of `layer` names: its compressed range (from the blob cache, else the
/// store) and its checkpoint's window fetched concurrently, then inflated on a blocking
/// thread. `what` names the read in errors. Shared by file sources and the access-profile
/// fill.
async fn fetch_span(
    store: &Arc<BlobStore>,
    blob_cache: Option<&BlobCache>,
    layer: &Digest,
    index: &Arc<LayerIndex>,
    windows: &LayerWindows,
    span: crate::index::Span,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, SourceError> {
    let fetch = async {
        crate::blobcache::read_range(blob_cache, store, layer, span.blob_offset, span.blob_len)
            .await
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
    };
    let (bytes, window) = futures::future::try_join(fetch, window).await?;
    let index = index.clone();
    tokio::task::spawn_blocking(move || crate::index::extract(&index, &span, &window, &bytes))
        .await
        .map_err(|e| SourceError::with_source(what(), e))?
        .map_err(|e| SourceError::with_source(what(), e))
}

impl ContentSource for LayerFileSource {
    /// Inflates `[offset, offset + len)` of the file from the nearest checkpoint before it
    /// (every checkpoint resumes exactly: `src/index/gzip.rs`; the engine verifies the bytes
    /// against the index's digests all the same).
    fn read_at(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            let what = || format!("{} in layer {}", self.entry.path, self.layer);
            let span = crate::index::plan(&self.index, &self.entry, offset, len)
                .map_err(|e| SourceError::with_source(what(), e))?;
            fetch_span(
                &self.store,
                self.local.as_ref(),
                &self.layer,
                &self.index,
                &self.windows,
                span,
                what,
            )
            .await
        }
        .boxed()
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

/// Layers of one image streamed at once by [`ImageSources::stream_fill`]: enough that the
/// layers of a typical image all have a [`Delivery`] running from the start, few enough
/// that two cores are not split many ways (each stream is one GET and one inflate).
pub const STREAM_PARALLEL: usize = 4;

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
            .or_insert((e.path.as_str(), e.size, Vec::new()));
        if slot.0 != e.path {
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
    let delivery = DeliveryGuard(Delivery::start());
    for (offset, (_, size, ids)) in &want {
        for id in ids {
            engine.expect(*id, &delivery.0, offset + size);
        }
    }
    let digest = layer.to_string();
    let raw: Box<dyn Read> = match blob_cache.filter(|c| c.contains(&digest)) {
        Some(cache) => {
            let path = cache.path(&digest).unwrap_or_default();
            Box::new(std::fs::File::open(&path).map_err(err)?)
        }
        None => {
            let handle = engine.handle();
            let _runtime = handle.enter();
            let stream = handle
                .block_on(store.open_stream(layer))
                .map_err(|e| err(io::Error::other(e)))?;
            Box::new(stream.into_blocking_reader())
        }
    };
    // The whole layer's sha256, computed as it passes (see the end).
    let hashed = Arc::new(std::sync::Mutex::new((sha2::Sha256::default(), 0u64)));
    let raw = Hashing {
        inner: raw,
        state: hashed.clone(),
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
        delivery.0.advance(stats.bytes_read);
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
            delivery.0.advance(stats.bytes_read);
        }
    }
    // Background completion: the rest of the layer, so that its sha256 is known whole.
    let actual = match io::copy(&mut tar, &mut io::sink()) {
        Ok(_) => {
            let (h, n) = &*hashed.lock().unwrap();
            // A decoder that stopped before the blob's end hashed a prefix: no verdict.
            (*n == index.compressed_size || index.compressed_size == 0).then(|| {
                use sha2::Digest as _;
                format!("sha256:{}", hex::encode(h.clone().finalize()))
            })
        }
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

/// Ends its delivery when dropped: waiters fetch what the stream did not bring.
struct DeliveryGuard(Arc<Delivery>);

impl Drop for DeliveryGuard {
    fn drop(&mut self) {
        self.0.end();
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
