//! Registering an image's placeholders: the `prepare` sequence from a reference to a served
//! tree.
//!
//! Owns [`prepare`] (indexes loaded, the access profile's reads started, the placeholders
//! unpacked and registered with the engine in one pass, each marked through the descriptor
//! it was created with, the tree marked, the prefetch order set), registering placeholders
//! ([`register_placeholder`]; `RegisterSink` during the unpack, undoing the done ones when
//! one fails), the tree's mark
//! ([`TREE_XATTR`], [`mark_tree`], [`tree_image`]), removing what a failed prepare left, and
//! the access profile read back from a served tree ([`Prepared::access_profile`]). It takes
//! each file's source as [`ImageSources`] gives it: it never fetches, inflates or verifies
//! bytes (the engine does, from the sources) and never streams layers ([`super::stream`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::{
    AccessProfile, ImageError, ImageSources, PrepareOptions, PrepareTimings, Prepared,
    load_indexes, open,
};
use crate::fill::{ContentSource, Engine, FileId, Placeholder, Verify};
use crate::index::{Entry, LayerIndex};
use crate::unpack::{self, Layer, Mode, UnpackError, UnpackOptions};

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
    let sink = RegisterSink {
        engine,
        sources: &sources,
        mode: opts.mode,
        reference,
        ids: std::sync::Mutex::new(HashMap::new()),
        failed: std::sync::Mutex::new(None),
    };
    let unpacked = blocking_here(|| {
        let layers: Vec<Layer<'_>> = digests
            .iter()
            .zip(&ixs)
            .map(|(d, ix)| Layer::new(d, &ix.entries))
            .collect();
        unpack::unpack_into(&layers, dest, &uopts, &sink)
    });
    let ids = sink.ids.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed = sink.failed.into_inner().unwrap_or_else(|e| e.into_inner());
    let undo = |ids: HashMap<(usize, usize), FileId>| {
        for id in ids.into_values() {
            let _ = engine.unregister(id);
        }
    };
    let unpacked = match unpacked {
        Ok(u) => u,
        Err(source) => {
            undo(ids);
            // A refused destination (not empty, missing) was not ours to clean.
            if !matches!(
                source,
                UnpackError::DestNotEmpty { .. } | UnpackError::Dest { .. }
            ) {
                remove_tree_contents(dest);
            }
            if let Some(e) = failed {
                return Err(e);
            }
            return Err(ImageError::Unpack {
                reference: reference.to_string(),
                dest: dest.to_path_buf(),
                source: Box::new(source),
            });
        }
    };
    let unpack_done = started.elapsed();
    if let Err(e) = mark_tree(dest, reference) {
        warn!(dest = %dest.display(), error = %e, "cannot mark the tree as fanfill's");
    }
    let files: Vec<FileId> = match unpacked
        .placeholders
        .iter()
        .map(|p| ids.get(&(p.layer, p.entry)).copied())
        .collect::<Option<Vec<_>>>()
    {
        Some(files) => files,
        None => {
            undo(ids);
            remove_tree_contents(dest);
            return Err(ImageError::Task(
                "a placeholder was created but not registered".into(),
            ));
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

/// Registers each placeholder with the engine as the unpack creates it
/// ([`unpack::PlaceholderSink`]): its content source, and in direct mode its inode mark
/// through the descriptor it was created with. Records the first failure for [`prepare`].
struct RegisterSink<'a> {
    engine: &'a Engine,
    sources: &'a ImageSources,
    mode: Mode,
    reference: &'a str,
    /// The registered files by (layer, entry).
    ids: std::sync::Mutex<HashMap<(usize, usize), FileId>>,
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
        let (source, verify) = self
            .sources
            .file_source(p.layer, p.entry)
            .map_err(|e| self.fail(e))?;
        let placeholder = Placeholder {
            path: p.path.clone(),
            size: p.size,
            source,
            verify,
        };
        let capability = meta
            .xattrs
            .iter()
            .any(|(n, _)| n == crate::fill::CAPABILITY_XATTR);
        let id = self
            .engine
            .register_open(
                file,
                stat,
                placeholder,
                capability,
                self.mode == Mode::Direct,
            )
            .map_err(|source| {
                self.fail(ImageError::Fill {
                    reference: self.reference.to_string(),
                    source,
                })
            })?;
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
