//! Registering an image's placeholders: the `prepare` sequence from a reference to a served
//! tree.
//!
//! Owns [`prepare`] (indexes loaded, the access profile's reads started, the placeholders
//! unpacked, the tree marked, every placeholder registered with the engine, the prefetch
//! order set), registering placeholders ([`register_placeholder`]; [`register_all`] two
//! threads at a time, undoing the done ones when one fails), the tree's mark
//! ([`TREE_XATTR`], [`mark_tree`], [`tree_image`]), removing what a failed prepare left, and
//! the access profile read back from a served tree ([`Prepared::access_profile`]). It takes
//! each file's source as [`ImageSources`] gives it: it never fetches, inflates or verifies
//! bytes (the engine does, from the sources) and never streams layers ([`super::stream`]).

use std::path::Path;
use std::sync::Arc;

use tracing::{debug, info, warn};

use super::{
    AccessProfile, ImageError, ImageSources, PrepareOptions, Prepared, load_indexes, open,
};
use crate::fill::{ContentSource, Engine, FileId, Placeholder, Verify};
use crate::index::LayerIndex;
use crate::unpack::{self, Layer, Mode, UnpackError, UnpackOptions, Unpacked};

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
