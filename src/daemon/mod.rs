//! The daemon: one process serving every prepared image, with a local API, state that
//! survives restarts and a takeover that never lets a blocked reader see zeros.
//!
//! Owns the daemon's lifecycle and its images; it speaks the [`crate::api`] protocol on a
//! unix socket, keeps [`state`] in `STATE_DIR`, the in-flight [`journal`], and the
//! [`holder`] process. It must not restructure what it builds on: image resolution and
//! indexes come from [`crate::image`] (`open`, `load_indexes`), trees from
//! [`crate::unpack`], fills from one shared [`crate::fill::Engine`].
//!
//! Start-up, in this order (nothing is served before step 5):
//! 1. read the journal a predecessor left (its unanswered events and highest event number)
//!    and reserve every fd number up to it (plus one read buffer of events), so no new event
//!    can share a number with a stale one (the kernel answers the first event with a
//!    matching number);
//! 2. take the group back from the fd holder (`SCM_RIGHTS`), or create one and hand the
//!    holder a duplicate;
//! 3. start the engine *gated*: reader events are journaled and held, the engine's own
//!    writes allowed;
//! 4. reopen every recorded image and register every file with its recorded progress
//!    (unfilled files are marked; marks taken over are simply re-added);
//! 5. open the gate, fill and answer the predecessor's in-flight events by number, deny
//!    (`EIO`) any stale number nothing is known about, release the reservation; serve the API.
//!
//! A graceful stop (SIGTERM, SIGINT) records progress, answers what it can and leaves the
//! group with the holder: readers that arrive meanwhile block until the successor is up.

pub mod cache;
pub mod holder;
pub mod journal;
pub mod metrics;
pub mod state;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use oci_spec::image::Digest;
use tracing::{debug, info, warn};

use crate::api::{
    DaemonStatus, ErrorKind, ImageStatus, LayoutMode, RegistrySettings, Request, Response,
};
use crate::fill::{
    ContentSource, Engine, EngineConfig, FileId, FillError, Placeholder, SourceError, Verify,
    error_chain,
};
use crate::image::{self, PrepareOptions};
use crate::index::{LayerIndex, LayerWindows, WindowCache};
use crate::overlay::OverlayWatch;
use crate::registry::BlobStore;
use crate::sys::fanotify::{DenyErrno, EventId, Group, GroupClass, Response as FanResponse};
use crate::sys::fdpass::FdReservation;
use crate::unpack::{self, Layer, Mode, UnpackOptions};
use journal::{Inflight, Journal};
use state::{FileRecord, ImageRecord, StateDir};

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The content cache failed.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// The fd holder failed.
    #[error(transparent)]
    Holder(#[from] holder::HolderError),
    /// The fill engine failed.
    #[error("fill engine")]
    Fill(#[from] FillError),
    /// The fanotify group failed.
    #[error("fanotify group")]
    Fanotify(#[from] crate::sys::fanotify::FanotifyError),
    /// The API socket failed.
    #[error("API socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Some other I/O failed.
    #[error("{what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Event numbers reserved above the highest one a predecessor journaled: one 64 KiB read
/// buffer holds at most ~1,365 pre-content events (48 bytes each with their range record).
const RESERVE_MARGIN: i32 = 2048;

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The API socket.
    pub socket: PathBuf,
    /// Where state, journal and the holder's socket live.
    pub state_dir: PathBuf,
    /// Where layer indexes are kept.
    pub index_dir: PathBuf,
    /// Fill engine tuning.
    pub engine: EngineConfig,
    /// Files filled at once by background prefetch (per image).
    pub prefetch_parallel: usize,
    /// Upper bound on the bytes per second background prefetch fills, all images together
    /// (0: unlimited). On-demand misses are never limited.
    pub prefetch_rate: u64,
    /// How often fill progress is recorded.
    pub persist_interval: Duration,
    /// Keep the group in an fd holder process (`exe holder`). Without it a crash lets
    /// blocked readers through to zeros.
    pub holder_exe: Option<PathBuf>,
    /// Test knob: every fetch waits this long first (a slow registry).
    pub fetch_delay: Duration,
    /// Serve Prometheus metrics on this address (off when `None`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl DaemonConfig {
    /// Defaults: `/run/fanfill/fanfill.sock`, `/var/lib/fanfill`, holder = this program.
    pub fn new(socket: PathBuf, state_dir: PathBuf) -> DaemonConfig {
        DaemonConfig {
            socket,
            index_dir: state_dir.join("indexes"),
            state_dir,
            engine: EngineConfig::default(),
            prefetch_parallel: 2,
            prefetch_rate: 0,
            persist_interval: Duration::from_secs(1),
            holder_exe: std::env::current_exe().ok(),
            fetch_delay: Duration::ZERO,
            metrics_addr: None,
        }
    }
}

/// Fetch counters of one image.
#[derive(Debug, Default)]
struct ImageCounters {
    bytes_fetched: AtomicU64,
    errors: AtomicU64,
}

/// A file's bytes from its layer ([`crate::image::LayerFileSource`]), plus per-image
/// counters and the test delay.
struct DaemonSource {
    inner: image::LayerFileSource,
    store: Arc<BlobStore>,
    counters: Arc<ImageCounters>,
    delay: Duration,
}

impl ContentSource for DaemonSource {
    fn read_at(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let res = self.inner.read_at(offset, len).await;
            // The image has its own store: its counter is the image's network traffic.
            self.counters
                .bytes_fetched
                .fetch_max(self.store.bytes_fetched(), Ordering::Relaxed);
            if res.is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            res
        }
        .boxed()
    }
}

/// One served image.
struct ImageRt {
    record: Mutex<ImageRecord>,
    /// Parallel to `record.files`; `None`: not registered (user-modified file, or error).
    files: Vec<Option<FileId>>,
    counters: Arc<ImageCounters>,
    prefetch: AtomicBool,
    prefetch_running: AtomicBool,
    removed: AtomicBool,
    error: Option<String>,
    rate: Mutex<(Instant, u64, f64)>,
    saved: Mutex<Option<ImageRecord>>,
    /// Files already offered to the content cache.
    cached: Mutex<Vec<bool>>,
}

/// The running daemon (shared by the API tasks and its threads).
struct Daemon {
    config: DaemonConfig,
    engine: Engine,
    state: StateDir,
    cache: cache::Cache,
    images: Mutex<BTreeMap<u64, Arc<ImageRt>>>,
    next_id: AtomicU64,
    took_over: bool,
    inherited_answered: AtomicU64,
    /// Prefetch pacing: when the next prefetch may start (see `prefetch_rate`).
    prefetch_next: Mutex<Instant>,
    stopping: AtomicBool,
    /// Open watches on overlay rootfs mounts: (image id, merged dir, watch).
    watches: Mutex<Vec<(u64, PathBuf, OverlayWatch)>>,
}

/// An API error: its kind and message.
struct ApiFail(ErrorKind, String);

impl ApiFail {
    fn internal(e: impl std::error::Error) -> ApiFail {
        ApiFail(ErrorKind::Internal, error_chain(&e))
    }
}

fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x6573_5546 => "fuse".into(),
        0x2FC1_2FC1 => "zfs".into(),
        m => format!("filesystem magic {m:#x}"),
    }
}

/// Checks a destination: created if missing, empty, on ext4, xfs or btrfs.
fn check_dest(dest: &Path) -> Result<PathBuf, ApiFail> {
    std::fs::create_dir_all(dest).map_err(|e| {
        ApiFail(
            ErrorKind::Internal,
            format!("creating {}: {e}", dest.display()),
        )
    })?;
    let dest = dest.canonicalize().map_err(|e| {
        ApiFail(
            ErrorKind::Internal,
            format!("resolving {}: {e}", dest.display()),
        )
    })?;
    let fs = nix::sys::statfs::statfs(&dest).map_err(|e| {
        ApiFail(
            ErrorKind::Internal,
            format!("statfs {}: {e}", dest.display()),
        )
    })?;
    let magic = fs.filesystem_type().0 as i64;
    if !matches!(magic, 0xEF53 | 0x5846_5342 | 0x9123_683E) {
        return Err(ApiFail(
            ErrorKind::UnsupportedFilesystem,
            format!(
                "{} is on {}: placeholders need ext4, xfs or btrfs (fanotify pre-content marks)",
                dest.display(),
                fs_name(magic)
            ),
        ));
    }
    let mut rd = std::fs::read_dir(&dest).map_err(|e| {
        ApiFail(
            ErrorKind::Internal,
            format!("reading {}: {e}", dest.display()),
        )
    })?;
    if rd.next().is_some() {
        return Err(ApiFail(
            ErrorKind::DestNotEmpty,
            format!("{} is not empty", dest.display()),
        ));
    }
    Ok(dest)
}

fn prepare_options(index_dir: &Path, r: &RegistrySettings) -> Result<PrepareOptions, ApiFail> {
    PrepareOptions::from_settings(index_dir, r)
        .map_err(|e| ApiFail(ErrorKind::BadRequest, e.to_string()))
}

/// An image opened for serving: store, indexes by layer.
struct Opened {
    store: Arc<BlobStore>,
    manifest_digest: String,
    layers: Vec<(Digest, Arc<LayerIndex>)>,
    windows: Vec<Arc<LayerWindows>>,
    blob_cache: Option<crate::blobcache::BlobCache>,
}

async fn open_image(reference: &str, opts: &PrepareOptions) -> Result<Opened, image::ImageError> {
    let (store, resolved) = image::open(reference, opts).await?;
    let manifest_digest = resolved.manifest_digest.to_string();
    let ix = image::load_indexes(&store, resolved, reference, opts).await?;
    let cache = Arc::new(WindowCache::new(image::WINDOW_CACHE_BYTES));
    let windows = ix
        .windows
        .iter()
        .map(|w| Arc::new(LayerWindows::new(w.clone(), cache.clone())))
        .collect();
    Ok(Opened {
        store,
        manifest_digest,
        blob_cache: ix.blob_cache.clone(),
        layers: ix.layers.into_iter().map(|(d, i, _)| (d, i)).collect(),
        windows,
    })
}

impl Daemon {
    fn source(
        &self,
        opened: &Opened,
        layer: usize,
        entry: usize,
        counters: &Arc<ImageCounters>,
    ) -> Result<(Arc<DaemonSource>, Verify), String> {
        let (digest, index) = opened
            .layers
            .get(layer)
            .ok_or_else(|| format!("no layer {layer}"))?;
        let e = index
            .resolve(entry)
            .cloned()
            .ok_or_else(|| format!("no entry {entry} in layer {digest}"))?;
        let verify = image::verify_for(&e);
        let inner = image::LayerFileSource::new(
            opened.store.clone(),
            digest.clone(),
            index.clone(),
            opened.windows[layer].clone(),
            e,
        )
        .with_blob_cache(opened.blob_cache.clone());
        Ok((
            Arc::new(DaemonSource {
                inner,
                store: opened.store.clone(),
                counters: counters.clone(),
                delay: self.config.fetch_delay,
            }),
            verify,
        ))
    }

    fn find(&self, dest: &Path) -> Result<(u64, Arc<ImageRt>), ApiFail> {
        let canon = dest.canonicalize().unwrap_or_else(|_| dest.to_path_buf());
        self.images
            .lock()
            .unwrap()
            .iter()
            .find(|(_, i)| i.record.lock().unwrap().dest == canon)
            .map(|(id, i)| (*id, i.clone()))
            .ok_or_else(|| {
                ApiFail(
                    ErrorKind::UnknownImage,
                    format!("no image is served at {}", dest.display()),
                )
            })
    }

    async fn prepare(
        self: &Arc<Self>,
        image_ref: String,
        dest: PathBuf,
        mode: LayoutMode,
        registry: RegistrySettings,
        prefetch: bool,
    ) -> Result<ImageStatus, ApiFail> {
        let dest = check_dest(&dest)?;
        if self.find(&dest).is_ok() {
            return Err(ApiFail(
                ErrorKind::AlreadyServed,
                format!("{} is already served", dest.display()),
            ));
        }
        let opts = prepare_options(&self.config.index_dir, &registry)?;
        let started = Instant::now();
        let opened = open_image(&image_ref, &opts)
            .await
            .map_err(|e| ApiFail(ErrorKind::Image, error_chain(&e)))?;
        let uopts = UnpackOptions {
            mode: match mode {
                LayoutMode::Direct => Mode::Direct,
                LayoutMode::Overlay => Mode::Overlay,
            },
            ..UnpackOptions::default()
        };
        let digests: Vec<String> = opened.layers.iter().map(|l| l.0.to_string()).collect();
        let ixs: Vec<Arc<LayerIndex>> = opened.layers.iter().map(|l| l.1.clone()).collect();
        let (d2, dest2) = (digests.clone(), dest.clone());
        let unpacked = tokio::task::spawn_blocking(move || {
            let layers: Vec<Layer<'_>> = d2
                .iter()
                .zip(&ixs)
                .map(|(d, ix)| Layer::new(d, &ix.entries))
                .collect();
            unpack::unpack(&layers, &dest2, &uopts)
        })
        .await
        .map_err(ApiFail::internal)?
        .map_err(|e| {
            ApiFail(
                ErrorKind::Internal,
                format!("unpacking {image_ref}: {}", error_chain(&e)),
            )
        })?;
        if let Err(e) = image::mark_tree(&dest, &image_ref) {
            warn!(dest = %dest.display(), error = %e, "cannot mark the tree as fanfill's");
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let counters = Arc::new(ImageCounters::default());
        let mut record = ImageRecord {
            id,
            reference: image_ref.clone(),
            manifest_digest: opened.manifest_digest.clone(),
            layers: digests,
            dest: dest.clone(),
            mode,
            lowerdir: (!unpacked.lowerdirs.is_empty()).then(|| unpacked.lowerdir_option()),
            registry: RegistrySettings {
                creds: None,
                ..registry
            },
            prefetch,
            files: Vec::with_capacity(unpacked.placeholders.len()),
        };
        let this = self.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            for p in &unpacked.placeholders {
                let sha = opened.layers[p.layer]
                    .1
                    .resolve(p.entry)
                    .and_then(|e| e.sha256.clone());
                let mut rec = FileRecord {
                    path: p.path.clone(),
                    layer: p.layer,
                    entry: p.entry,
                    size: p.size,
                    chunk: 0,
                    complete: false,
                    filled: String::new(),
                    sha256: sha.clone(),
                };
                // From the content cache: filled before it is ever marked, nothing fetched.
                if let Some(sha) = &sha {
                    match this.cache.fill(sha, &p.path, p.size) {
                        Ok(true) => {
                            rec.complete = true;
                            record.files.push(rec);
                            ids.push(None);
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => warn!(error = %error_chain(&e), "content cache"),
                    }
                }
                let r = this
                    .source(&opened, p.layer, p.entry, &counters)
                    .map_err(|m| ApiFail(ErrorKind::Internal, m))
                    .and_then(|(source, verify)| {
                        let placeholder = Placeholder {
                            path: p.path.clone(),
                            size: p.size,
                            source,
                            verify,
                        };
                        // Overlay lowers carry no pre-content mark (overlay reads of a marked
                        // lower file fail with EPERM): the overlay watch fills them on open.
                        match mode {
                            LayoutMode::Direct => this.engine.register(placeholder),
                            LayoutMode::Overlay => this.engine.register_unmarked(placeholder),
                        }
                        .map_err(ApiFail::internal)
                    });
                match r {
                    Ok(fid) => ids.push(Some(fid)),
                    Err(e) => {
                        for fid in ids.into_iter().flatten() {
                            let _ = this.engine.unregister(fid);
                        }
                        return Err(e);
                    }
                }
                record.files.push(rec);
            }
            Ok((ids, record, counters))
        })
        .await
        .map_err(ApiFail::internal)?;
        let (ids, record, counters) = match res {
            Ok(v) => v,
            Err(e) => {
                image::remove_tree_contents(&dest);
                return Err(e);
            }
        };
        self.state.save(&record).map_err(ApiFail::internal)?;
        info!(
            reference = %image_ref,
            dest = %dest.display(),
            files = ids.len(),
            ms = started.elapsed().as_millis() as u64,
            "image prepared"
        );
        let rt = Arc::new(ImageRt {
            saved: Mutex::new(Some(record.clone())),
            cached: Mutex::new(Vec::new()),
            record: Mutex::new(record),
            files: ids,
            counters,
            prefetch: AtomicBool::new(prefetch),
            prefetch_running: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            error: None,
            rate: Mutex::new((Instant::now(), 0, 0.0)),
        });
        self.images.lock().unwrap().insert(id, rt.clone());
        if prefetch {
            self.start_prefetch(&rt);
        }
        Ok(self.image_status(&rt))
    }

    /// Reopens a recorded image after a restart and registers its files with their recorded
    /// progress.
    async fn reopen(self: &Arc<Self>, record: ImageRecord) -> Arc<ImageRt> {
        let counters = Arc::new(ImageCounters::default());
        let mk = |files: Vec<Option<FileId>>, record: ImageRecord, error: Option<String>| {
            Arc::new(ImageRt {
                saved: Mutex::new(Some(record.clone())),
                cached: Mutex::new(Vec::new()),
                prefetch: AtomicBool::new(record.prefetch),
                record: Mutex::new(record),
                files,
                counters: counters.clone(),
                prefetch_running: AtomicBool::new(false),
                removed: AtomicBool::new(false),
                error,
                rate: Mutex::new((Instant::now(), 0, 0.0)),
            })
        };
        let opened = match prepare_options(&self.config.index_dir, &record.registry) {
            Ok(opts) => open_image(&record.reference, &opts)
                .await
                .map_err(|e| error_chain(&e)),
            Err(ApiFail(_, m)) => Err(m),
        };
        let opened = match opened {
            Ok(o) if o.manifest_digest == record.manifest_digest => o,
            Ok(o) => {
                let m = format!(
                    "{} now resolves to {}, not {}",
                    record.reference, o.manifest_digest, record.manifest_digest
                );
                warn!(error = %m, "cannot reopen image");
                let n = record.files.len();
                return mk(vec![None; n], record, Some(m));
            }
            Err(m) => {
                warn!(reference = %record.reference, error = %m, "cannot reopen image");
                let n = record.files.len();
                return mk(vec![None; n], record, Some(m));
            }
        };
        let this = self.clone();
        let counters2 = counters.clone();
        let overlay = record.mode == LayoutMode::Overlay;
        let files = tokio::task::spawn_blocking(move || {
            let mut ids = Vec::with_capacity(record.files.len());
            for f in &record.files {
                if f.complete && f.chunk == 0 {
                    // Filled from the content cache at prepare: never marked.
                    ids.push(None);
                    continue;
                }
                let r = this
                    .source(&opened, f.layer, f.entry, &counters2)
                    .map_err(|m| m.to_string())
                    .and_then(|(source, verify)| {
                        let p = Placeholder {
                            path: f.path.clone(),
                            size: f.size,
                            source,
                            verify,
                        };
                        let n = if f.chunk > 0 {
                            f.size.div_ceil(f.chunk) as usize
                        } else {
                            0
                        };
                        let id = this
                            .engine
                            .register_filled(p, f.chunk, &f.filled_flags(n))
                            .map_err(|e| error_chain(&e))?;
                        if overlay {
                            this.engine.unmark(id).map_err(|e| error_chain(&e))?;
                        }
                        Ok(id)
                    });
                match r {
                    Ok(id) => ids.push(Some(id)),
                    Err(e) => {
                        warn!(path = %f.path.display(), error = %e, "not re-serving file");
                        ids.push(None);
                    }
                }
            }
            (ids, record)
        })
        .await;
        match files {
            Ok((ids, record)) => {
                info!(reference = %record.reference, dest = %record.dest.display(), files = ids.len(), "image re-served");
                mk(ids, record, None)
            }
            Err(e) => panic!("re-registering task failed: {e}"),
        }
    }

    fn image_status(&self, img: &ImageRt) -> ImageStatus {
        let rec = img.record.lock().unwrap();
        let mut s = ImageStatus {
            id: rec.id,
            reference: rec.reference.clone(),
            manifest_digest: rec.manifest_digest.clone(),
            dest: rec.dest.clone(),
            mode: rec.mode,
            lowerdir: rec.lowerdir.clone(),
            files: rec.files.len() as u64,
            prefetch: img.prefetch.load(Ordering::Relaxed),
            bytes_fetched: img.counters.bytes_fetched.load(Ordering::Relaxed),
            errors: img.counters.errors.load(Ordering::Relaxed),
            ..ImageStatus::default()
        };
        for (f, id) in rec.files.iter().zip(&img.files) {
            s.bytes_total += f.size;
            match id.and_then(|id| self.engine.progress(id)) {
                Some(p) => {
                    s.bytes_filled += p.bytes_filled.min(p.size);
                    if p.complete {
                        s.files_complete += 1;
                    }
                }
                None if f.complete => {
                    s.bytes_filled += f.size;
                    s.files_complete += 1;
                }
                None => {}
            }
        }
        {
            let mut r = img.rate.lock().unwrap();
            let dt = r.0.elapsed().as_secs_f64();
            if dt >= 0.5 {
                r.2 = (s.bytes_fetched - r.1) as f64 / dt;
                *r = (Instant::now(), s.bytes_fetched, r.2);
            }
            s.fetch_rate = r.2;
        }
        s.state = match &img.error {
            Some(e) => format!("error: {e}"),
            None if s.files_complete == s.files => "complete".into(),
            None => "serving".into(),
        };
        s
    }

    fn status(&self, dest: Option<&Path>) -> Result<Response, ApiFail> {
        let images: Vec<Arc<ImageRt>> = match dest {
            Some(d) => vec![self.find(d)?.1],
            None => self.images.lock().unwrap().values().cloned().collect(),
        };
        let st = self.engine.stats();
        Ok(Response::Status {
            daemon: DaemonStatus {
                pid: std::process::id(),
                took_over: self.took_over,
                inherited_answered: self.inherited_answered.load(Ordering::Relaxed),
                inflight_events: self.engine.inflight_events(),
                events: st.events,
                errors: st.errors,
                latency_p50_us: st.latency_p50_us,
                latency_p99_us: st.latency_p99_us,
            },
            images: images.iter().map(|i| self.image_status(i)).collect(),
        })
    }

    /// The Prometheus text exposition of the daemon's figures.
    fn metrics(&self) -> String {
        let images: Vec<Arc<ImageRt>> = self.images.lock().unwrap().values().cloned().collect();
        let statuses: Vec<ImageStatus> = images.iter().map(|i| self.image_status(i)).collect();
        metrics::render(
            &self.engine.stats(),
            &self.engine.latency_histogram(),
            self.engine.inflight_events(),
            &statuses,
        )
    }

    /// Starts holding opens through the overlay at `merged` until their lower placeholder
    /// is filled; the overlay must stack layers of an image served in overlay mode.
    fn watch_overlay(&self, merged: &Path) -> Result<Response, ApiFail> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(ApiFail::internal)?;
        let lowers = crate::hook::overlay_lowerdirs(&mountinfo, merged).ok_or_else(|| {
            ApiFail(
                ErrorKind::BadRequest,
                format!("{} is not an overlayfs mount", merged.display()),
            )
        })?;
        let found = self.images.lock().unwrap().iter().find_map(|(id, img)| {
            let rec = img.record.lock().unwrap();
            let ours = rec.mode == LayoutMode::Overlay
                && !img.removed.load(Ordering::SeqCst)
                && lowers.iter().all(|l| l.starts_with(&rec.dest));
            ours.then(|| (*id, rec.dest.clone()))
        });
        let Some((id, dest)) = found else {
            return Err(ApiFail(
                ErrorKind::UnknownImage,
                format!(
                    "the overlay at {} does not stack layers of an image fanfill serves in overlay mode",
                    merged.display()
                ),
            ));
        };
        let mut watches = self.watches.lock().unwrap();
        if watches.iter().any(|(_, m, _)| m == merged) {
            return Ok(Response::Ok);
        }
        let dev = std::fs::metadata(&dest)
            .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
            .map_err(ApiFail::internal)?;
        let watch = OverlayWatch::start(&self.engine, merged, dev).map_err(ApiFail::internal)?;
        info!(merged = %merged.display(), image = %dest.display(), "overlay rootfs watched");
        watches.push((id, merged.to_path_buf(), watch));
        Ok(Response::Ok)
    }

    fn remove(&self, dest: &Path) -> Result<Response, ApiFail> {
        let (id, img) = self.find(dest)?;
        self.watches
            .lock()
            .unwrap()
            .retain(|(img_id, _, _)| *img_id != id);
        img.removed.store(true, Ordering::SeqCst);
        img.prefetch.store(false, Ordering::SeqCst);
        for fid in img.files.iter().flatten() {
            if let Err(e) = self.engine.unregister(*fid) {
                warn!(error = %error_chain(&e), "unregistering a removed image's file");
            }
        }
        self.images.lock().unwrap().remove(&id);
        {
            // A save in progress finishes first; later ones see `removed`.
            let _saving = img.saved.lock().unwrap();
            self.state.remove(id).map_err(ApiFail::internal)?;
        }
        let dest = img.record.lock().unwrap().dest.clone();
        image::remove_tree_contents(&dest);
        info!(dest = %dest.display(), "image removed");
        Ok(Response::Removed { dest })
    }

    /// Background prefetch of one image: its files in layer order, `prefetch_parallel` at a
    /// time, pausing while any reader's miss is being served (on-demand first).
    fn start_prefetch(self: &Arc<Self>, img: &Arc<ImageRt>) {
        if img.prefetch_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let next = Arc::new(AtomicUsize::new(0));
        let workers = Arc::new(AtomicUsize::new(self.config.prefetch_parallel.max(1)));
        for _ in 0..self.config.prefetch_parallel.max(1) {
            let (this, img, next, workers) =
                (self.clone(), img.clone(), next.clone(), workers.clone());
            std::thread::spawn(move || {
                loop {
                    if !img.prefetch.load(Ordering::SeqCst)
                        || img.removed.load(Ordering::SeqCst)
                        || this.stopping.load(Ordering::SeqCst)
                    {
                        break;
                    }
                    while this.engine.inflight_events() > 0 && !this.stopping.load(Ordering::SeqCst)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(fid) = img.files.get(i) else { break };
                    let Some(fid) = fid else { continue };
                    if this.engine.is_complete(*fid) {
                        continue;
                    }
                    this.pace_prefetch(img.record.lock().unwrap().files[i].size);
                    if let Err(e) = this.engine.fill_file(*fid) {
                        debug!(error = %error_chain(&e), "prefetch of a file failed");
                    }
                }
                if workers.fetch_sub(1, Ordering::SeqCst) == 1 {
                    img.prefetch_running.store(false, Ordering::SeqCst);
                    info!(dest = %img.record.lock().unwrap().dest.display(), "prefetch finished");
                }
            });
        }
    }

    /// Waits until `bytes` more of prefetch fit the configured rate.
    fn pace_prefetch(&self, bytes: u64) {
        let rate = self.config.prefetch_rate;
        if rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.prefetch_next.lock().unwrap();
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start - now
        };
        std::thread::sleep(wait);
    }

    /// Records progress of every image that changed since it was last recorded.
    fn persist(&self) {
        let images: Vec<Arc<ImageRt>> = self.images.lock().unwrap().values().cloned().collect();
        for img in images {
            if img.removed.load(Ordering::SeqCst) || img.error.is_some() {
                continue;
            }
            let snapshot = {
                let mut rec = img.record.lock().unwrap();
                rec.prefetch = img.prefetch.load(Ordering::Relaxed);
                for (f, id) in rec.files.iter_mut().zip(&img.files) {
                    if let Some(p) = id.and_then(|id| self.engine.progress(id)) {
                        f.set_filled(p.chunk, &p.filled, p.complete);
                    }
                }
                rec.clone()
            };
            let mut saved = img.saved.lock().unwrap();
            if img.removed.load(Ordering::SeqCst) {
                // Removed meanwhile: its record must not come back.
                continue;
            }
            if saved.as_ref() != Some(&snapshot) {
                // Filled bytes reach the disk before the record that says they are there.
                if let Ok(d) = std::fs::File::open(&snapshot.dest) {
                    let _ = nix::unistd::syncfs(&d);
                }
                match self.state.save(&snapshot) {
                    Ok(()) => *saved = Some(snapshot.clone()),
                    Err(e) => warn!(error = %error_chain(&e), "recording progress"),
                }
            }
            // Complete files enter the content cache (only if their bytes are the image's).
            let mut cached = img.cached.lock().unwrap();
            cached.resize(snapshot.files.len(), false);
            for (i, f) in snapshot.files.iter().enumerate() {
                if cached[i] || !f.complete {
                    continue;
                }
                cached[i] = true;
                if let Some(sha) = &f.sha256
                    && !self.cache.contains(sha)
                    && !img.removed.load(Ordering::SeqCst)
                {
                    match self.cache.add(sha, &f.path) {
                        Ok(true) => debug!(path = %f.path.display(), "added to the content cache"),
                        Ok(false) => {
                            warn!(path = %f.path.display(), "not cached: its bytes are not the image's")
                        }
                        Err(e) => warn!(error = %error_chain(&e), "adding to the content cache"),
                    }
                }
            }
        }
    }

    fn handle(self: &Arc<Self>, req: Request) -> BoxFuture<'_, Response> {
        async move {
            let r = match req {
                Request::Ping => Ok(Response::Ok),
                Request::WatchOverlay { merged } => self.watch_overlay(&merged),
                Request::Prepare {
                    image,
                    dest,
                    mode,
                    registry,
                    prefetch,
                } => self
                    .prepare(image, dest, mode, registry, prefetch)
                    .await
                    .map(Response::Prepared),
                Request::Status { dest } => self.status(dest.as_deref()),
                Request::Remove { dest } => {
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || this.remove(&dest))
                        .await
                        .unwrap_or_else(|e| Err(ApiFail::internal(e)))
                }
                Request::Prefetch { dest, enable } => self.find(&dest).map(|(_, img)| {
                    img.prefetch.store(enable, Ordering::SeqCst);
                    if enable {
                        self.start_prefetch(&img);
                    }
                    Response::Ok
                }),
            };
            r.unwrap_or_else(|ApiFail(kind, message)| Response::Error { kind, message })
        }
        .boxed()
    }
}

/// Fills and answers the events a predecessor read and never answered; then denies (`EIO`)
/// any other event still carrying a reserved number; then releases the reservation.
fn answer_inherited(
    daemon: &Arc<Daemon>,
    journal: &Arc<Journal>,
    inflight: Vec<Inflight>,
    reservation: FdReservation,
) {
    let known: Vec<i32> = inflight.iter().map(|i| i.id.raw()).collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        for ev in &inflight {
            s.spawn(move || {
                let fid = FileId::new(ev.dev, ev.ino);
                let response = if daemon.engine.progress(fid).is_none() {
                    warn!(event = %ev.id, "inherited event on a file not served; EIO");
                    FanResponse::Deny(DenyErrno::Io)
                } else {
                    match daemon.engine.fill_range(fid, ev.offset, ev.count) {
                        Ok(()) => FanResponse::Allow,
                        Err(e) => {
                            warn!(event = %ev.id, error = %error_chain(&e), "inherited event: fill failed");
                            FanResponse::Deny(e.errno())
                        }
                    }
                };
                match daemon.engine.group().respond_id(ev.id, response) {
                    Ok(()) => {
                        daemon.inherited_answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => debug!(event = %ev.id, error = %e, "inherited event already gone"),
                }
                journal.clear(ev.id);
            });
        }
    });
    let mut stale = 0;
    for n in reservation.numbers() {
        if known.contains(&n) {
            continue;
        }
        if daemon
            .engine
            .group()
            .respond_id(EventId::from_raw(n), FanResponse::Deny(DenyErrno::Io))
            .is_ok()
        {
            stale += 1;
        }
    }
    drop(reservation);
    info!(
        answered = daemon.inherited_answered.load(Ordering::Relaxed),
        unrecorded_denied = stale,
        ms = started.elapsed().as_millis() as u64,
        "predecessor's in-flight events answered"
    );
}

async fn serve_conn(daemon: Arc<Daemon>, stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (r, mut w) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = match Request::from_line(&line) {
            Ok(req) => daemon.handle(req).await,
            Err(e) => Response::bad_request(&e),
        };
        if w.write_all(resp.to_line().as_bytes()).await.is_err() {
            break;
        }
    }
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    // 1. What a predecessor left in flight; reserve the numbers it may still be using.
    let state = StateDir::open(&config.state_dir)?;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| DaemonError::Io { what, source }
    };
    match crate::sys::fdpass::raise_nofile_limit() {
        Ok(n) => debug!(nofile = n, "descriptor limit"),
        Err(e) => warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let (journal, hwm, inflight) =
        Journal::open(&state.root().join("inflight")).map_err(io("opening the journal"))?;
    // The journal learns an event's number just after read(2) returned it: a crash in that
    // window leaves numbers up to one read buffer of events above the recorded highest.
    let reservation = if hwm >= 3 {
        FdReservation::reserve(3, hwm.saturating_add(RESERVE_MARGIN))
            .map_err(io("reserving event numbers"))?
    } else {
        FdReservation::default()
    };
    let journal = Arc::new(journal);
    // 2. The group: from the holder, or new.
    let holder_sock = state.root().join("holder.sock");
    let (group, took_over) = match holder::take(&holder_sock)? {
        Some(fd) => (Group::from_owned_fd(fd)?, true),
        None => {
            let g = Group::new(GroupClass::PreContent)?;
            if let Some(exe) = &config.holder_exe {
                if !holder::is_running(&holder_sock) {
                    holder::spawn(exe, &holder_sock)?;
                }
                let dup = g.try_clone_fd().map_err(io("duplicating the group fd"))?;
                holder::put(&holder_sock, std::os::fd::AsFd::as_fd(&dup))?;
            }
            (g, false)
        }
    };
    let inflight = if took_over {
        inflight
    } else {
        // The old group is gone and its readers with it: nothing to answer.
        for i in &inflight {
            journal.clear(i.id);
        }
        Vec::new()
    };
    info!(
        took_over,
        inherited = inflight.len(),
        hwm,
        "fanotify group ready"
    );
    // 3. Gated engine.
    let engine = Engine::with_group_journaled(
        Arc::new(group),
        config.engine.clone(),
        Some(journal.clone() as Arc<dyn crate::fill::EventJournal>),
        true,
    )?;
    engine.set_deny_unknown(true);
    let records = state.load()?;
    let next_id = records.iter().map(|r| r.id).max().unwrap_or(0) + 1;
    let cache = cache::Cache::open(&state.root().join("cache"))?;
    let daemon = Arc::new(Daemon {
        config: config.clone(),
        engine,
        cache,
        state,
        images: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(next_id),
        took_over,
        inherited_answered: AtomicU64::new(0),
        prefetch_next: Mutex::new(Instant::now()),
        stopping: AtomicBool::new(false),
        watches: Mutex::new(Vec::new()),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fanfill-api")
        .enable_all()
        .build()
        .map_err(io("starting the API runtime"))?;
    // 4. Every recorded image, every file registered (marked) before anything is served.
    let t = Instant::now();
    for rec in records {
        let id = rec.id;
        let img = rt.block_on(daemon.reopen(rec));
        daemon.images.lock().unwrap().insert(id, img);
    }
    info!(
        images = daemon.images.lock().unwrap().len(),
        ms = t.elapsed().as_millis() as u64,
        "recorded images re-registered"
    );
    // 5. Serve.
    daemon.engine.open_gate();
    {
        let (d, j) = (daemon.clone(), journal.clone());
        std::thread::spawn(move || answer_inherited(&d, &j, inflight, reservation));
    }
    for img in daemon.images.lock().unwrap().values() {
        if img.prefetch.load(Ordering::SeqCst) && img.error.is_none() {
            daemon.start_prefetch(img);
        }
    }
    {
        let d = daemon.clone();
        std::thread::spawn(move || {
            while !d.stopping.load(Ordering::SeqCst) {
                std::thread::sleep(d.config.persist_interval);
                d.persist();
            }
        });
    }
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the socket directory"))?;
    }
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(DaemonError::Socket {
            path: config.socket.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon answers there",
            ),
        });
    }
    let _ = std::fs::remove_file(&config.socket);
    let sock_err = |source| DaemonError::Socket {
        path: config.socket.clone(),
        source,
    };
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(&config.socket).map_err(sock_err)?
    };
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(sock_err)?;
    if let Some(addr) = config.metrics_addr {
        let _g = rt.enter();
        let l = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(io("binding the metrics address"))?;
        let d = daemon.clone();
        rt.spawn(metrics::serve(l, Arc::new(move || d.metrics())));
        info!(%addr, "Prometheus metrics served");
    }
    info!(socket = %config.socket.display(), "fanfill daemon serving");
    let d = daemon.clone();
    rt.block_on(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        loop {
            tokio::select! {
                c = listener.accept() => match c {
                    Ok((s, _)) => { tokio::spawn(serve_conn(d.clone(), s)); }
                    Err(e) => warn!(error = %e, "accepting an API connection"),
                },
                _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => break,
                _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => break,
            }
        }
    });
    info!("stopping: recording progress; the fd holder keeps the group for the successor");
    daemon.stopping.store(true, Ordering::SeqCst);
    daemon.persist();
    let _ = std::fs::remove_file(&config.socket);
    rt.shutdown_timeout(Duration::from_secs(1));
    // Events still in flight are journaled: the successor answers them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.engine.inflight_events() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sends `req` to the daemon at `socket` (one connection per call).
pub fn call(socket: &Path, req: &Request) -> Result<Response, crate::api::ApiError> {
    crate::api::Client::connect(socket)?.call(req)
}
