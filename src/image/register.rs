//! Registering an image's placeholders: the `prepare` sequence from a reference to a served
//! tree.
//!
//! Owns [`prepare`] (indexes loaded, the access profile's reads started, the placeholders
//! unpacked and registered with the engine in one pass, each marked through the descriptor
//! it was created with, the tree marked, the prefetch order set), registering placeholders
//! as an unpack creates them ([`Registration`], which the daemon's prepare uses too; undoing
//! the done ones when one fails), the tree's mark
//! ([`TREE_XATTR`], [`mark_tree`], [`tree_image`]), removing what a failed prepare left, and
//! the access profile read back from a served tree ([`Prepared::access_profile`]). It takes
//! each file's source as [`ImageSources`] gives it: it never fetches, inflates or verifies
//! bytes (the engine does, from the sources) and never streams layers ([`super::stream`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::{
    AccessProfile, FileSource, ImageError, PrepareOptions, PrepareTimings, Prepared, load_indexes,
    open,
};
use crate::fill::{Engine, FileId, Placeholder};
use crate::index::{Entry, LayerIndex};
use crate::unpack::{self, Layer, Mode, UnpackError, UnpackOptions, Unpacked};

/// Prepares `reference` into `dest` (which must be empty) and registers every placeholder
/// with `engine`. Returns as soon as the placeholders are ready and served.
pub async fn prepare(
    engine: &Engine,
    reference: &str,
    dest: &Path,
    opts: &PrepareOptions,
) -> Result<Prepared, ImageError> {
    let started = std::time::Instant::now();
    let (store, image) = open(reference, opts).await?;
    let manifest_digest = image.manifest_digest.to_string();
    let image_size = image.manifest.layers().iter().map(|l| l.size()).sum();
    let indexes = load_indexes(&store, image, reference, opts).await?;
    // What the prepare waited for; the files filled ahead below travel beside the unpack,
    // as many bytes as the unpack's pace lets them, and are not counted here.
    let bytes_before_ready = store.bytes_fetched();
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
    let indexes_done = started.elapsed();
    // Placeholders are registered (and marked) by the unpack itself, as each is created.
    let source = |layer, entry| sources.file_source(layer, entry);
    let registration = Registration {
        engine,
        mode: opts.mode,
        reference,
        dest,
        source: &source,
        prefill: None,
    };
    let registered = blocking_here(|| {
        registration.unpack(|sink| {
            let layers: Vec<Layer<'_>> = digests
                .iter()
                .zip(&ixs)
                .map(|(d, ix)| Layer::new(d, &ix.entries))
                .collect();
            unpack::unpack_into(&layers, dest, &uopts, sink)
        })
    });
    let (unpacked, ids) = match registered {
        Ok(r) => r,
        Err(e) => {
            // A refused destination (not empty, missing) was not ours to clean.
            if !matches!(&e, ImageError::Unpack { source, .. } if matches!(
                **source,
                UnpackError::DestNotEmpty { .. } | UnpackError::Dest { .. }
            )) {
                remove_tree_contents(dest);
            }
            return Err(e);
        }
    };
    let unpack_done = started.elapsed();
    if let Err(e) = mark_tree(dest, reference) {
        warn!(dest = %dest.display(), error = %e, "cannot mark the tree as fanfill's");
    }
    // Nothing is filled before it is registered here (no `prefill`).
    let files: Vec<FileId> = ids.into_iter().flatten().collect();
    let keys: Vec<(usize, usize)> = unpacked
        .placeholders
        .iter()
        .map(|p| (p.layer, p.entry))
        .collect();
    sources.read_around(engine.supplier(), opts.read_around, &keys, &files);
    let profile_files = early_profile.map_or(0, |p| p.place(&keys, &files));
    let prefetch_order = sources
        .prefetch_order(&keys)
        .into_iter()
        .map(|i| files[i as usize])
        .collect();
    let total = started.elapsed();
    let timings = PrepareTimings {
        indexes: indexes_done,
        unpack: unpack_done - indexes_done,
        register: total - unpack_done,
        total,
    };
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
        timings,
    })
}

impl Prepared {
    /// The files readers of this tree have touched so far, first access first, as an access
    /// profile to publish with the index artifact
    /// ([`index_image_with_profile`](super::index_image_with_profile)).
    pub fn access_profile(&self, engine: &Engine) -> AccessProfile {
        let by_id: std::collections::HashMap<FileId, &str> = self
            .unpacked
            .placeholders
            .iter()
            .zip(&self.files)
            .filter_map(|(p, id)| {
                let (_, index) = self.sources.layers().nth(p.layer)?;
                Some((*id, &*index.entries.get(p.entry)?.path))
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

/// Where a placeholder's bytes come from and how they are checked, by (layer, entry).
pub type SourceFn<'a> = dyn Fn(usize, usize) -> Result<FileSource, ImageError> + Sync + 'a;

/// Fills a placeholder whole before it is registered, through the descriptor it was created
/// with (the daemon's content cache); `true`: filled, it is not registered.
pub type PrefillFn<'a> = dyn Fn(&unpack::Placeholder, &Entry, &std::fs::File) -> bool + Sync + 'a;

/// How an unpack registers its placeholders with the engine as it creates them
/// ([`Registration::unpack`]): each gets its content source and, in direct mode, its inode
/// mark through the descriptor it was created with. In overlay mode a placeholder carries no
/// pre-content mark: overlay reads of a marked lower file fail with EPERM, so the overlay
/// open watch fills it whole instead.
pub struct Registration<'a> {
    /// The engine serving the placeholders.
    pub engine: &'a Engine,
    /// Direct (marked) or overlay (unmarked) placeholders.
    pub mode: Mode,
    /// The image, for messages.
    pub reference: &'a str,
    /// The destination, for messages.
    pub dest: &'a Path,
    /// Each placeholder's source.
    pub source: &'a SourceFn<'a>,
    /// Files filled before they are registered, if any.
    pub prefill: Option<&'a PrefillFn<'a>>,
}

impl Registration<'_> {
    /// Runs `unpack` with a sink registering every placeholder as it is created, in one
    /// pass. Returns what was unpacked and, in the order of its placeholders, each one's
    /// engine id (`None`: filled by `prefill`, not registered). On failure every registered
    /// file is unregistered again; what the unpack created stays for the caller to remove.
    pub fn unpack(
        &self,
        unpack: impl FnOnce(&dyn unpack::PlaceholderSink) -> Result<Unpacked, UnpackError>,
    ) -> Result<(Unpacked, Vec<Option<FileId>>), ImageError> {
        let sink = RegisterSink {
            r: self,
            ids: std::sync::Mutex::new(HashMap::new()),
            failed: std::sync::Mutex::new(None),
        };
        let unpacked = unpack(&sink);
        let mut ids = sink.ids.into_inner().unwrap_or_else(|e| e.into_inner());
        let failed = sink.failed.into_inner().unwrap_or_else(|e| e.into_inner());
        let undo = |ids: HashMap<(usize, usize), Option<FileId>>| {
            for id in ids.into_values().flatten() {
                let _ = self.engine.unregister(id);
            }
        };
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(source) => {
                undo(ids);
                return Err(failed.unwrap_or_else(|| ImageError::Unpack {
                    reference: self.reference.to_string(),
                    dest: self.dest.to_path_buf(),
                    source: Box::new(source),
                }));
            }
        };
        let files: Option<Vec<Option<FileId>>> = unpacked
            .placeholders
            .iter()
            .map(|p| ids.remove(&(p.layer, p.entry)))
            .collect();
        match files {
            Some(files) => Ok((unpacked, files)),
            None => {
                undo(ids);
                Err(ImageError::Task(
                    "a placeholder was created but not registered".into(),
                ))
            }
        }
    }
}

/// The sink of [`Registration::unpack`]. Records the first failure.
struct RegisterSink<'a> {
    r: &'a Registration<'a>,
    /// The registered files by (layer, entry); `None`: prefilled.
    ids: std::sync::Mutex<HashMap<(usize, usize), Option<FileId>>>,
    failed: std::sync::Mutex<Option<ImageError>>,
}

impl RegisterSink<'_> {
    fn fail(&self, e: ImageError) -> std::io::Error {
        let msg = crate::fill::error_chain(&e);
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert(e);
        std::io::Error::other(msg)
    }
}

impl unpack::PlaceholderSink for RegisterSink<'_> {
    fn created(
        &self,
        p: &unpack::Placeholder,
        meta: &Entry,
        file: &std::fs::File,
        stat: &std::fs::Metadata,
    ) -> std::io::Result<()> {
        let r = self.r;
        let id = if r.prefill.is_some_and(|f| f(p, meta, file)) {
            None
        } else {
            let s = (r.source)(p.layer, p.entry).map_err(|e| self.fail(e))?;
            let placeholder = Placeholder {
                path: p.path.clone(),
                size: p.size,
                source: s.source,
                file: s.file,
                verify: s.verify,
            };
            let capability = meta
                .xattrs
                .iter()
                .any(|(n, _)| n == crate::fill::CAPABILITY_XATTR);
            let id = r
                .engine
                .register_open(file, stat, placeholder, capability, r.mode == Mode::Direct)
                .map_err(|source| {
                    self.fail(ImageError::Fill {
                        reference: r.reference.to_string(),
                        source,
                    })
                })?;
            Some(id)
        };
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((p.layer, p.entry), id);
        Ok(())
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
