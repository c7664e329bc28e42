//! containerd proxy snapshotter: containerd's snapshots API served by the daemon, so that
//! `ctr`, nerdctl and the CRI plugin start containers on lazily filled layers with no
//! per-container setup.
//!
//! Owns the snapshots (metadata in [`store`], files under `STATE_DIR/snapshots/snapshots/ID/`
//! laid out as containerd's overlay snapshotter lays them out: `fs` is the snapshot's tree
//! or upper directory, `work` overlayfs's work directory), the mounts handed to containerd,
//! and the choice between a remote and an ordinary snapshot. It must not touch placeholders,
//! fills, fanotify or the daemon's image records: those go through [`Host`], which the
//! daemon implements (`src/daemon/containerd.rs`) on its one engine and state. The gRPC glue
//! is [`grpc`].
//!
//! # Why the daemon serves it (`fanfill daemon --containerd-socket PATH`)
//! A remote snapshot is an image the daemon serves; a container's rootfs needs the
//! daemon's overlay watch on it. A separate `fanfill snapshotter` process would have to
//! drive both through the daemon's API and keep a second state that can disagree with the
//! daemon's after a crash; served by the daemon, a snapshot and the image it points into
//! are created, restored and removed by one process with one engine.
//!
//! # Remote snapshots (the protocol containerd's clients speak)
//! containerd unpacks an image by calling `Prepare(key, parent)` per layer with the target
//! label `containerd.io/snapshot.ref` (the layer's chain ID) and the labels its client set:
//! `containerd.io/snapshot/remote/stargz.{reference,digest}` (`ctr-remote image rpull`,
//! nerdctl) or `containerd.io/snapshot/cri.{image-ref,layer-digest}` (CRI). If both the image
//! reference and the layer digest are there, the snapshotter asks the daemon to prepare the
//! whole image once, in overlay mode (one placeholder tree per layer, registered unmarked:
//! filled whole when a container opens a file), records a committed snapshot whose files are
//! that layer's tree and whose labels carry the target, and answers `AlreadyExists`;
//! containerd then finds the committed snapshot by its label and parent and never downloads
//! the layer. The layers are committed as soon as the daemon has the image's manifest and
//! layer indexes, while it still makes the trees: containerd's other layers and the
//! container's setup run meanwhile, and a snapshot stacked on them (a container's rootfs)
//! waits for the trees before it is mounted ([`Snapshotter::wait_ready`]). Any failure up
//! to the commit falls back to an ordinary active snapshot that containerd fills by
//! applying the diff: a pull never fails because laziness failed. Trees that cannot be made
//! after it (a full disk) fail the container's `Prepare` with the cause, and the next one
//! prepares them again.
//!
//! # Container rootfs
//! An active or view snapshot whose parents include a remote layer is mounted by the
//! snapshotter itself: overlayfs at `snapshots/ID/merged` with the parents' trees as
//! lowerdirs (the remote ones taken from one image, so one watch covers them) and
//! `fs`/`work` as upper and work directories; the daemon's overlay watch is started on it
//! (opens wait until the lower file is filled), and containerd gets a bind mount of the
//! merged directory. Nothing of the placeholder trees is ever visible unwatched. An ordinary
//! parent whose labels name a layer that image has (a shared base layer containerd unpacked
//! earlier) is stacked as the image's tree of that layer; any other ordinary parent (a
//! layer containerd applied itself, a base image pulled the ordinary way) is stacked as its
//! own directory: its files are real, and the watch lets their opens through. The daemon
//! refuses a rootfs whose lowers hold placeholder trees of more than one image, or lie on
//! more than one filesystem (the watch finds a lower file by the inode number the overlay
//! reports). Other snapshots get the mounts containerd's overlay snapshotter would return.
//!
//! # Restarts and removal
//! The metadata is rewritten atomically on every change. The daemon keeps the watches of
//! the overlays it was asked to watch across its restarts (fd holder, records); at start the
//! snapshotter asks again for every overlay it mounted (a no-op for one still watched) and
//! remounts one that is gone (a reboot). A lazy image whose trees the daemon was making when
//! it stopped is removed by its successor (an unfinished prepare) and prepared again, from
//! the manifest recorded at the pull, when a container is next stacked on it. `Remove`
//! unmounts, stops the watch, deletes the snapshot's directory, and once no snapshot points
//! into a lazy image any more asks the daemon to remove that image (its placeholder tree
//! with it).

pub mod grpc;
pub mod store;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use containerd_client::types::Mount;
use futures::future::BoxFuture;
use tracing::{debug, info, warn};

use store::{Kind, LazyImage, Record, RemoteLayer, Store};

/// The target label containerd sets on a layer's `Prepare`: the layer's chain ID.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Image reference, as `ctr-remote image rpull` and nerdctl set it.
pub const LABEL_STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Layer digest, as `ctr-remote image rpull` and nerdctl set it.
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Image reference, as containerd's CRI plugin sets it.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Layer digest, as containerd's CRI plugin sets it.
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// Errors of the snapshotter, each mapped to the gRPC code containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    /// No such snapshot.
    #[error("{0} not found")]
    NotFound(String),
    /// The name is taken (or, for a remote layer, the target exists).
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The snapshot is in the wrong state (children, kind).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The metadata file could not be read or written.
    #[error("snapshot metadata {path}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot's files or mounts failed.
    #[error("{what}")]
    Io {
        /// What was done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused (a lazy image, an overlay watch).
    #[error("{0}")]
    Host(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotterError {
    let what = what.into();
    move |source| SnapshotterError::Io { what, source }
}

/// An image's layers, lowest first: digest and layer tree (`None` if an opaque layer above
/// hides it, so it was not created).
pub type ImageLayers = Vec<(String, Option<PathBuf>)>;

/// An image whose placeholder trees the daemon is making ([`Host::prepare_image`]).
pub struct PreparingImage {
    /// The manifest the daemon resolved the reference to (`sha256:HEX`).
    pub manifest_digest: String,
    /// Its layers' digests, lowest first: the daemon makes each one's tree at
    /// [`layer_tree`] (but a layer an opaque layer above hides: see `ready`).
    pub layers: Vec<String>,
    /// Resolves once every tree is made and the image is served, to its layers as made.
    pub ready: BoxFuture<'static, Result<ImageLayers, String>>,
}

/// What the snapshotter needs from the daemon serving it.
pub trait Host: Send + Sync + 'static {
    /// Starts preparing `reference` in overlay mode into the new (or empty) directory
    /// `dest`, to serve it (placeholders unmarked, filled whole through an overlay watch);
    /// answers as soon as the image's manifest and layer indexes are in, the trees still
    /// being made ([`PreparingImage::ready`]).
    fn prepare_image<'a>(
        &'a self,
        reference: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<PreparingImage, String>>;
    /// Whether the daemon still serves the image at `dest`.
    fn serves(&self, dest: &Path) -> bool;
    /// Holds opens through the overlay mounted at `merged` until their lower file is filled.
    fn watch_overlay(&self, merged: &Path) -> Result<(), String>;
    /// Stops the watch on `merged` (after it was unmounted).
    fn unwatch_overlay(&self, merged: &Path);
    /// Stops serving the image at `dest` and deletes its tree.
    fn remove_image(&self, dest: &Path) -> Result<(), String>;
}

/// The image reference and layer digest a remote snapshot needs, from `Prepare`'s labels.
pub fn remote_layer(labels: &BTreeMap<String, String>) -> Option<(&str, &str)> {
    let pair = |r: &str, d: &str| Some((labels.get(r)?.as_str(), labels.get(d)?.as_str()));
    pair(LABEL_STARGZ_REFERENCE, LABEL_STARGZ_DIGEST)
        .or_else(|| pair(LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST))
        .filter(|(r, d)| !r.is_empty() && d.starts_with("sha256:"))
}

/// The layer digest a snapshot's labels name (the labels of its `Prepare` and `Commit`).
fn layer_digest(labels: &BTreeMap<String, String>) -> Option<&str> {
    [LABEL_STARGZ_DIGEST, LABEL_CRI_LAYER_DIGEST]
        .iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|d| d.starts_with("sha256:"))
}

/// The snapshotter.
pub struct Snapshotter {
    /// `STATE_DIR/snapshots`.
    root: PathBuf,
    /// Where lazy images are prepared (`STATE_DIR/roots/containerd`).
    images_root: PathBuf,
    host: Arc<dyn Host>,
    store: Mutex<Store>,
    /// One remote prepare at a time: the first layer of an image prepares it, the next ones
    /// find it.
    remote: tokio::sync::Mutex<()>,
    /// References whose lazy prepare failed lately, and when: their other layers fall back
    /// at once instead of failing the same way one by one.
    failed: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Lazy images whose trees the daemon is still making, by destination, each with the
    /// number of its prepare: what a container's `Prepare` over them waits for.
    making: Mutex<std::collections::HashMap<PathBuf, (u64, Making)>>,
    /// Numbers the prepares of [`Snapshotter::making`].
    prepares: std::sync::atomic::AtomicU64,
}

/// The end of the making of an image's trees: every waiter gets the same outcome.
type Making = futures::future::Shared<BoxFuture<'static, Result<(), String>>>;

/// How long a failed lazy prepare makes the image's other layers fall back at once.
const FAILED_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Disk usage of a tree: (bytes, inodes), hardlinks counted once; `apparent` counts file
/// sizes (a placeholder's logical size) instead of allocated blocks.
fn usage_of(dir: &Path, apparent: bool) -> (u64, u64) {
    measure_usage(dir, apparent).unwrap_or((0, 0))
}

/// [`usage_of`], `None` when `dir` itself cannot be read (gone, or out of descriptors): a
/// figure not worth keeping.
fn measure_usage(dir: &Path, apparent: bool) -> Option<(u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    // The tree's own directory must open; one below it that cannot is skipped.
    let mut root = true;
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(_) if root => return None,
            Err(_) => continue,
        };
        root = false;
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            bytes += if apparent { m.len() } else { m.blocks() * 512 };
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Some((bytes, inodes))
}

/// The placeholder tree of layer `n` (`digest`, counted from the lowest) of the lazy image
/// at `dest`: where the daemon's overlay-mode prepare makes it.
pub fn layer_tree(dest: &Path, n: usize, digest: &str) -> PathBuf {
    dest.join("layers")
        .join(crate::unpack::layer_dir_name(n, digest))
}

/// Whether the lazy image directory `dest` holds nothing (or is gone): what the daemon
/// leaves of trees it could not make, or that a successor removed after a crash.
fn tree_gone(dest: &Path) -> bool {
    std::fs::read_dir(dest).map_or(true, |mut rd| rd.next().is_none())
}

/// Whether `path` is a mount point (from `/proc/self/mountinfo`).
fn is_mount_point(path: &Path) -> bool {
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mi.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(crate::hook::unescape_octal)
            .as_deref()
            == Some(&*path.to_string_lossy())
    })
}

fn bind(source: &Path, readonly: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.to_string_lossy().into_owned(),
        target: String::new(),
        options: vec![if readonly { "ro" } else { "rw" }.into(), "rbind".into()],
    }
}

fn joined(dirs: &[PathBuf]) -> Result<String, SnapshotterError> {
    let mut s = String::new();
    for (i, d) in dirs.iter().enumerate() {
        let d = d.to_string_lossy();
        if d.contains([':', ',']) {
            return Err(SnapshotterError::Internal(format!(
                "layer directory {d} cannot be an overlay lowerdir"
            )));
        }
        if i > 0 {
            s.push(':');
        }
        s.push_str(&d);
    }
    Ok(s)
}

impl Snapshotter {
    /// Opens the snapshotter whose state lives in `state_dir/snapshots`, lazy images under
    /// `state_dir/roots/containerd`, and re-arms the overlays it mounted.
    pub fn open(
        state_dir: &Path,
        host: Arc<dyn Host>,
    ) -> Result<Arc<Snapshotter>, SnapshotterError> {
        let root = state_dir.join("snapshots");
        let images_root = state_dir.join("roots").join("containerd");
        for d in [root.join("snapshots"), images_root.clone()] {
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let store = Store::open(&root.join("metadata.json"))?;
        let sn = Arc::new(Snapshotter {
            root,
            images_root,
            host,
            store: Mutex::new(store),
            remote: tokio::sync::Mutex::new(()),
            failed: Mutex::new(std::collections::HashMap::new()),
            making: Mutex::new(std::collections::HashMap::new()),
            prepares: std::sync::atomic::AtomicU64::new(0),
        });
        sn.restore();
        Ok(sn)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// Asks for the watch on every overlay this snapshotter mounted (the daemon kept it
    /// across a restart; a no-op then), remounting any that is gone, and reports lazy images
    /// the daemon no longer serves.
    fn restore(&self) {
        // Nothing is served yet: no remote prepare can be under way.
        self.sweep_orphan_images();
        let store = self.store.lock().unwrap();
        for img in store.images() {
            if !self.host.serves(&img.dest) {
                warn!(reference = %img.reference, dest = %img.dest.display(), "a lazy image of the snapshotter is not served (prepared again for the next container on it if its trees are gone)");
            }
        }
        for (key, rec) in store.all().filter(|(_, r)| r.own_mount) {
            let merged = self.dir(rec.id).join("merged");
            let r = if is_mount_point(&merged) {
                self.host
                    .watch_overlay(&merged)
                    .map_err(SnapshotterError::Host)
            } else {
                self.mount_own(&store, rec).map(|_| ())
            };
            match r {
                Ok(()) => info!(key, merged = %merged.display(), "container rootfs watched again"),
                Err(e) => {
                    warn!(key, error = %crate::fill::error_chain(&e), "cannot re-arm a container rootfs")
                }
            }
        }
    }

    fn save(&self, store: &Store) -> Result<(), SnapshotterError> {
        store.save()
    }

    /// `Prepare`: a remote snapshot if the labels name a layer that can be served lazily
    /// (answered `AlreadyExists`), else an active snapshot (once the lazy images under it
    /// are made: [`Snapshotter::wait_ready`]).
    pub async fn prepare(
        self: &Arc<Self>,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        if let (Some(target), Some((reference, digest))) =
            (labels.get(LABEL_SNAPSHOT_REF), remote_layer(&labels))
        {
            {
                let store = self.store.lock().unwrap();
                if store.find_remote(target, parent).is_some() {
                    return Err(SnapshotterError::AlreadyExists(format!(
                        "target snapshot {target}"
                    )));
                }
                if store.get(key).is_ok() {
                    return Err(SnapshotterError::AlreadyExists(format!("snapshot {key}")));
                }
            }
            match self
                .prepare_remote(parent, &labels, target, reference, digest)
                .await
            {
                Ok(()) => {
                    return Err(SnapshotterError::AlreadyExists(format!(
                        "target snapshot {target}"
                    )));
                }
                Err(e) => warn!(
                    reference,
                    layer = digest,
                    error = %crate::fill::error_chain(&e),
                    "layer not served lazily; containerd unpacks it"
                ),
            }
        }
        self.wait_ready(parent).await?;
        self.create(Kind::Active, key, parent, labels)
    }

    /// Records the committed remote snapshot for `target`: the layer `digest` of
    /// `reference`, prepared (the whole image, once) by the daemon. Committed as soon as the
    /// daemon knows the image's layers, while it still makes their trees: containerd goes
    /// on with the next layers and the container's setup meanwhile, and only a snapshot
    /// stacked on these waits for the trees ([`Snapshotter::wait_ready`]).
    async fn prepare_remote(
        self: &Arc<Self>,
        parent: &str,
        labels: &BTreeMap<String, String>,
        target: &str,
        reference: &str,
        digest: &str,
    ) -> Result<(), SnapshotterError> {
        let _one = self.remote.lock().await;
        if !parent.is_empty() {
            let store = self.store.lock().unwrap();
            if store.get(parent)?.kind != Kind::Committed {
                return Err(SnapshotterError::InvalidArgument(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
        let served = {
            let store = self.store.lock().unwrap();
            store
                .images()
                .iter()
                .filter(|i| {
                    // Served, being made, or to be made again for the first container on
                    // it (its trees could not be made, and are gone): its layers are
                    // committed into it all the same, so a pull does not fail or not
                    // depending on when the trees failed.
                    i.reference == reference
                        && (self.host.serves(&i.dest)
                            || self.making_of(&i.dest).is_some()
                            || tree_gone(&i.dest))
                })
                .find_map(|i| {
                    let (n, (_, dir)) = i
                        .layers
                        .iter()
                        .enumerate()
                        .find(|(_, (d, _))| d == digest)?;
                    // A layer an opaque layer above hides has no tree: its snapshot names
                    // the one it would have, and a rootfs on it leaves it out.
                    let dir = dir
                        .clone()
                        .unwrap_or_else(|| layer_tree(&i.dest, n, digest));
                    Some((i.dest.clone(), dir))
                })
        };
        let (image, dir) = match served {
            Some(found) => found,
            None => {
                let dest = {
                    let mut store = self.store.lock().unwrap();
                    let n = store.next_image_number();
                    self.save(&store)?;
                    self.images_root.join(n.to_string())
                };
                if let Some(at) = self.failed.lock().unwrap().get(reference)
                    && at.elapsed() < FAILED_FOR
                {
                    return Err(SnapshotterError::Host(format!(
                        "{reference} could not be prepared {} s ago",
                        at.elapsed().as_secs()
                    )));
                }
                let (manifest_digest, layers) =
                    match self.start_image(reference, reference, &dest).await {
                        Ok(l) => l,
                        Err(e) => {
                            // The daemon leaves the directory it created, empty.
                            let _ = std::fs::remove_dir(&dest);
                            self.failed
                                .lock()
                                .unwrap()
                                .insert(reference.to_string(), std::time::Instant::now());
                            return Err(e);
                        }
                    };
                self.failed.lock().unwrap().remove(reference);
                info!(reference, dest = %dest.display(), layers = layers.len(), "lazy image for containerd: layers committed while the daemon makes their trees");
                let dir = layers
                    .iter()
                    .find(|(d, _)| d == digest)
                    .and_then(|(_, dir)| dir.clone());
                // Saved with the layer's snapshot below: one metadata write instead of two.
                let mut store = self.store.lock().unwrap();
                store.add_image(LazyImage {
                    reference: reference.to_string(),
                    dest: dest.clone(),
                    layers,
                    manifest_digest: Some(manifest_digest),
                });
                match dir {
                    Some(dir) => (dest, dir),
                    None => {
                        drop(store);
                        self.release_image(&dest);
                        return Err(SnapshotterError::Internal(format!(
                            "{reference} has no layer tree for {digest}"
                        )));
                    }
                }
            }
        };
        let mut store = self.store.lock().unwrap();
        let name = format!("fanfill-remote/{}/{target}", store.next_image_number());
        // No usage yet: measured when first asked ([`Snapshotter::usage`]), since a walk of
        // the layer's tree here would hold up containerd's next layer (python image: 3-6 ms
        // a layer, 18 ms of its pull).
        store.insert_remote(
            &name,
            parent,
            labels.clone(),
            RemoteLayer {
                image,
                digest: digest.to_string(),
                dir,
            },
        )?;
        self.save(&store)?;
        debug!(name, target, parent, "remote snapshot committed");
        Ok(())
    }

    /// Has the daemon start making the trees of `pinned` (the image recorded as
    /// `reference`) at `dest`; returns the manifest digest and the layers once the daemon
    /// knows them, and follows the rest in the background: the layers as made are recorded
    /// then, and until then [`Snapshotter::wait_ready`] waits for them.
    async fn start_image(
        self: &Arc<Self>,
        reference: &str,
        pinned: &str,
        dest: &Path,
    ) -> Result<(String, ImageLayers), SnapshotterError> {
        let prep = self
            .host
            .prepare_image(pinned, dest)
            .await
            .map_err(SnapshotterError::Host)?;
        let n = self
            .prepares
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let layers = prep
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let tree = layer_tree(dest, i, &d);
                (d, Some(tree))
            })
            .collect();
        let (this, reference, at) = (self.clone(), reference.to_string(), dest.to_path_buf());
        let ready = prep.ready;
        // Held until the entry is in: the task removes it when done, never before.
        let mut making = self.making.lock().unwrap();
        let made = tokio::spawn(async move {
            let made = ready.await;
            this.image_made(&reference, &at, n, made)
        });
        let outcome: BoxFuture<'static, Result<(), String>> = Box::pin(async move {
            made.await
                .unwrap_or_else(|e| Err(format!("making the trees stopped: {e}")))
        });
        making.insert(dest.to_path_buf(), (n, futures::FutureExt::shared(outcome)));
        Ok((prep.manifest_digest, layers))
    }

    /// The daemon is done making the trees of the image at `dest` (prepare number `n`):
    /// records its layers as made, or the failure.
    fn image_made(
        &self,
        reference: &str,
        dest: &Path,
        n: u64,
        made: Result<ImageLayers, String>,
    ) -> Result<(), String> {
        let outcome = match made {
            Ok(layers) => {
                let mut store = self.store.lock().unwrap();
                store.set_image_layers(dest, layers);
                if let Err(e) = self.save(&store) {
                    warn!(dest = %dest.display(), error = %crate::fill::error_chain(&e), "recording a lazy image's layers as made");
                }
                info!(reference, dest = %dest.display(), "lazy image's trees made");
                Ok(())
            }
            Err(e) => {
                // Not a reason for the image's other layers to fall back (`failed`): they
                // are committed into it, and its next container prepares it again.
                warn!(reference, dest = %dest.display(), error = %e, "lazy image's trees could not be made: containers on it fail until it is prepared again");
                Err(e)
            }
        };
        let mut making = self.making.lock().unwrap();
        if making.get(dest).is_some_and(|(m, _)| *m == n) {
            making.remove(dest);
        }
        outcome
    }

    /// The making of the trees of the image at `dest`, if under way.
    fn making_of(&self, dest: &Path) -> Option<Making> {
        self.making
            .lock()
            .unwrap()
            .get(dest)
            .map(|(_, m)| m.clone())
    }

    /// Waits until the daemon has made, and serves, the trees of every lazy image that
    /// `parent` and its ancestors point into: a snapshot stacked on them is mounted over
    /// finished trees only. An image whose trees are gone (they could not be made, or the
    /// daemon stopped while making them and its successor removed what was made) is
    /// prepared again first, from the manifest it was pulled as; its failure is this call's.
    pub async fn wait_ready(self: &Arc<Self>, parent: &str) -> Result<(), SnapshotterError> {
        let images: Vec<LazyImage> = {
            let store = self.store.lock().unwrap();
            // An unknown parent is reported by the snapshot's creation.
            let (Ok(first), Ok(rest)) = (store.get(parent), store.ancestors(parent)) else {
                return Ok(());
            };
            let mut dests: Vec<&Path> = Vec::new();
            for r in std::iter::once(first).chain(rest.into_iter().map(|(_, r)| r)) {
                if let Some(l) = &r.remote
                    && !dests.contains(&l.image.as_path())
                {
                    dests.push(&l.image);
                }
            }
            store
                .images()
                .iter()
                .filter(|i| dests.contains(&i.dest.as_path()))
                .cloned()
                .collect()
        };
        for img in images {
            self.await_making(&img).await?;
            // Not served with a tree there is left to the overlay watch to refuse: a tree the
            // daemon could not reopen after a restart still serves what it holds.
            if !self.host.serves(&img.dest) && tree_gone(&img.dest) {
                self.prepare_again(&img).await?;
                self.await_making(&img).await?;
            }
        }
        Ok(())
    }

    /// Waits for the making of `img`'s trees, if under way; its failure as an error naming
    /// the image.
    async fn await_making(&self, img: &LazyImage) -> Result<(), SnapshotterError> {
        let Some(making) = self.making_of(&img.dest) else {
            return Ok(());
        };
        making.await.map_err(|e| {
            SnapshotterError::Host(format!(
                "the placeholders of {} (at {}) could not be made: {e}",
                img.reference,
                img.dest.display()
            ))
        })
    }

    /// Waits while the daemon makes the trees of the image the remote layer `key` points
    /// into (whatever the outcome), so that the layer's usage is measured on a finished tree.
    pub async fn wait_made(&self, key: &str) {
        let image = {
            let store = self.store.lock().unwrap();
            store
                .get(key)
                .ok()
                .and_then(|r| r.remote.as_ref())
                .map(|l| l.image.clone())
        };
        if let Some(making) = image.and_then(|i| self.making_of(&i)) {
            let _ = making.await;
        }
    }

    /// Prepares the lazy image `img` again into its (empty) directory, pinned to its
    /// recorded manifest, unless another caller already does or did.
    async fn prepare_again(self: &Arc<Self>, img: &LazyImage) -> Result<(), SnapshotterError> {
        let _one = self.remote.lock().await;
        if self.making_of(&img.dest).is_some() || self.host.serves(&img.dest) {
            return Ok(());
        }
        let Some(manifest) = &img.manifest_digest else {
            return Err(SnapshotterError::Host(format!(
                "{} (at {}) is not served and its manifest was not recorded: remove the image and pull it again",
                img.reference,
                img.dest.display()
            )));
        };
        let name = img
            .reference
            .split_once('@')
            .map_or(&*img.reference, |(n, _)| n);
        let pinned = format!("{name}@{manifest}");
        info!(reference = %img.reference, manifest, dest = %img.dest.display(), "lazy image not served: preparing it again");
        self.start_image(&img.reference, &pinned, &img.dest).await?;
        Ok(())
    }

    /// `View`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        let mut store = self.store.lock().unwrap();
        let rec = store.create(kind, key, parent, labels)?;
        let dir = self.dir(rec.id);
        let made = std::fs::create_dir_all(dir.join("fs"))
            .and_then(|_| std::fs::create_dir_all(dir.join("work")))
            .map_err(io_err(format!("creating {}", dir.display())));
        let mounts = made.and_then(|_| {
            if self.over_remote(&store, &rec)? {
                let m = self.mount_own(&store, &rec)?;
                store.set_own_mount(key, true)?;
                Ok(m)
            } else {
                self.plain_mounts(&store, &rec)
            }
        });
        let mounts = mounts.and_then(|m| self.save(&store).map(|_| m));
        if let Err(e) = &mounts {
            let _ = store.remove(key);
            drop(store);
            self.discard_files(rec.id, true);
            debug!(key, error = %e, "snapshot not created");
        }
        mounts
    }

    /// Whether any ancestor of `rec` is a remote layer.
    fn over_remote(&self, store: &Store, rec: &Record) -> Result<bool, SnapshotterError> {
        Ok(self
            .parent_chain(store, rec)?
            .iter()
            .any(|(_, r)| r.remote.is_some()))
    }

    fn parent_chain<'s>(
        &self,
        store: &'s Store,
        rec: &Record,
    ) -> Result<Vec<(&'s String, &'s Record)>, SnapshotterError> {
        if rec.parent.is_empty() {
            return Ok(Vec::new());
        }
        let mut chain = vec![(
            store
                .all()
                .find(|(n, _)| **n == rec.parent)
                .map(|(n, _)| n)
                .ok_or_else(|| SnapshotterError::NotFound(format!("parent {}", rec.parent)))?,
            store.get(&rec.parent)?,
        )];
        chain.extend(store.ancestors(&rec.parent)?);
        Ok(chain)
    }

    /// The parents' trees, nearest first; remote layers taken from the image of the nearest
    /// remote layer where it has them (one image: one overlay watch covers them all).
    fn lowerdirs(&self, store: &Store, rec: &Record) -> Result<Vec<PathBuf>, SnapshotterError> {
        let chain = self.parent_chain(store, rec)?;
        let top_image = chain
            .iter()
            .find_map(|(_, r)| r.remote.as_ref())
            .and_then(|l| store.images().iter().find(|i| i.dest == l.image));
        // `Some(None)`: the image has the layer but no tree for it (an opaque layer above
        // hides it).
        let in_top_image = |digest: &str| {
            top_image
                .and_then(|i| i.layers.iter().find(|(d, _)| d == digest))
                .map(|(_, dir)| dir.clone())
        };
        Ok(chain
            .iter()
            .filter_map(|(_, r)| match &r.remote {
                Some(l) => in_top_image(&l.digest).unwrap_or_else(|| Some(l.dir.clone())),
                // An ordinary snapshot of a layer the lazy image also has (a base layer
                // containerd unpacked before): the same files, as the image's tree, so one
                // watch covers every lower.
                None => Some(
                    layer_digest(&r.labels)
                        .and_then(|d| in_top_image(d).flatten())
                        .unwrap_or_else(|| self.dir(r.id).join("fs")),
                ),
            })
            .collect())
    }

    /// The mounts containerd's overlay snapshotter returns for `rec`.
    fn plain_mounts(&self, store: &Store, rec: &Record) -> Result<Vec<Mount>, SnapshotterError> {
        let dir = self.dir(rec.id);
        let lowers = self.lowerdirs(store, rec)?;
        let view = rec.kind == Kind::View;
        Ok(vec![match (view, lowers.len()) {
            (_, 0) => bind(&dir.join("fs"), view),
            (true, 1) => bind(&lowers[0], true),
            (true, _) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![format!("lowerdir={}", joined(&lowers)?)],
            },
            (false, _) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    format!("workdir={}", dir.join("work").display()),
                    format!("upperdir={}", dir.join("fs").display()),
                    format!("lowerdir={}", joined(&lowers)?),
                ],
            },
        }])
    }

    /// Mounts the overlay of `rec` at `snapshots/ID/merged` (unless mounted), has the
    /// daemon watch it, and returns a bind mount of it.
    fn mount_own(&self, store: &Store, rec: &Record) -> Result<Vec<Mount>, SnapshotterError> {
        let dir = self.dir(rec.id);
        let merged = dir.join("merged");
        if !is_mount_point(&merged) {
            std::fs::create_dir_all(&merged)
                .map_err(io_err(format!("creating {}", merged.display())))?;
            let lowers = self.lowerdirs(store, rec)?;
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                joined(&lowers)?,
                dir.join("fs").display(),
                dir.join("work").display()
            );
            nix::mount::mount(
                Some("overlay"),
                &merged,
                Some("overlay"),
                nix::mount::MsFlags::empty(),
                Some(opts.as_str()),
            )
            .map_err(|e| SnapshotterError::Io {
                what: format!("mounting the overlay at {}", merged.display()),
                source: e.into(),
            })?;
        }
        if let Err(e) = self.host.watch_overlay(&merged) {
            let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
            return Err(SnapshotterError::Host(e));
        }
        debug!(merged = %merged.display(), "container rootfs mounted and watched");
        Ok(vec![bind(&merged, rec.kind == Kind::View)])
    }

    /// `Mounts`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotterError> {
        let store = self.store.lock().unwrap();
        let rec = store.get(key)?;
        match rec.kind {
            Kind::Committed => Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key} is committed: it has no mounts"
            ))),
            _ if rec.own_mount => Ok(vec![bind(
                &self.dir(rec.id).join("merged"),
                rec.kind == Kind::View,
            )]),
            _ => self.plain_mounts(&store, rec),
        }
    }

    /// `Commit`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotterError> {
        let mut store = self.store.lock().unwrap();
        let rec = store.get(key)?.clone();
        if rec.own_mount {
            // A layer containerd applied over lazy layers (one that could not be served
            // lazily itself): its changes are in `fs`, the overlay's upper directory; the
            // overlay and its watch go.
            let merged = self.dir(rec.id).join("merged");
            if is_mount_point(&merged) {
                nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                    SnapshotterError::Io {
                        what: format!("unmounting {}", merged.display()),
                        source: e.into(),
                    }
                })?;
            }
            self.host.unwatch_overlay(&merged);
            store.set_own_mount(key, false)?;
        }
        let usage = usage_of(&self.dir(rec.id).join("fs"), false);
        store.commit(name, key, labels, usage)?;
        self.save(&store)
    }

    /// `Remove`: the record, then its mount, watch and files; the lazy image once no
    /// snapshot points into it.
    pub fn remove(self: &Arc<Self>, key: &str) -> Result<(), SnapshotterError> {
        let rec = {
            let mut store = self.store.lock().unwrap();
            let rec = store.remove(key)?;
            self.save(&store)?;
            rec
        };
        self.discard_files(rec.id, rec.own_mount);
        if let Some(l) = &rec.remote
            && !self.store.lock().unwrap().image_in_use(&l.image)
        {
            self.release_image(&l.image);
        }
        info!(key, "snapshot removed");
        Ok(())
    }

    /// Unmounts (and unwatches) `snapshots/ID/merged` and deletes `snapshots/ID`, unless
    /// something is still mounted there.
    fn discard_files(&self, id: u64, own_mount: bool) {
        let dir = self.dir(id);
        let merged = dir.join("merged");
        if own_mount || is_mount_point(&merged) {
            if is_mount_point(&merged)
                && let Err(e) = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH)
            {
                warn!(merged = %merged.display(), error = %e, "unmounting a container rootfs");
            }
            self.host.unwatch_overlay(&merged);
        }
        if is_mount_point(&merged) {
            warn!(dir = %dir.display(), "still mounted; left for Cleanup");
            return;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(dir = %dir.display(), error = %e, "deleting a snapshot's files"),
        }
    }

    /// Has the daemon remove the lazy image at `dest` and forgets it; one whose trees are
    /// still being made goes once they are, if no snapshot points into it by then.
    fn release_image(self: &Arc<Self>, dest: &Path) {
        if let Some(making) = self.making_of(dest) {
            let (this, dest) = (self.clone(), dest.to_path_buf());
            info!(dest = %dest.display(), "lazy image removed once its trees are made");
            tokio::spawn(async move {
                let _ = making.await;
                let _ = tokio::task::spawn_blocking(move || {
                    if !this.store.lock().unwrap().image_in_use(&dest) {
                        this.release_image(&dest);
                    }
                })
                .await;
            });
            return;
        }
        if self.host.serves(dest)
            && let Err(e) = self.host.remove_image(dest)
        {
            warn!(dest = %dest.display(), error = %e, "removing a lazy image");
            return;
        }
        // The daemon empties the tree; the directory itself is the snapshotter's.
        match std::fs::remove_dir(dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dest = %dest.display(), error = %e, "deleting a lazy image's directory")
            }
        }
        let mut store = self.store.lock().unwrap();
        store.remove_image(dest);
        if let Err(e) = self.save(&store) {
            warn!(error = %crate::fill::error_chain(&e), "recording a removed lazy image");
        }
        info!(dest = %dest.display(), "lazy image removed");
    }

    /// `Stat`.
    pub fn stat(&self, key: &str) -> Result<Record, SnapshotterError> {
        Ok(self.store.lock().unwrap().get(key)?.clone())
    }

    /// `Update` (labels only).
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record, SnapshotterError> {
        let mut store = self.store.lock().unwrap();
        let rec = store.update_labels(key, labels, paths)?;
        self.save(&store)?;
        Ok(rec)
    }

    /// `List` (containerd's `Walk`): the snapshots passing `filters`.
    pub fn list(&self, filters: &[String]) -> Vec<(String, Record)> {
        self.store
            .lock()
            .unwrap()
            .all()
            .filter(|(n, r)| store::matches(filters, n, r))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// `Usage`: recorded at commit; measured for an active snapshot; for a remote layer, its
    /// files' logical sizes, measured on the first ask and kept (they do not change as the
    /// files fill; recorded with the next save).
    pub fn usage(&self, key: &str) -> Result<(u64, u64), SnapshotterError> {
        let (id, usage, remote) = {
            let store = self.store.lock().unwrap();
            let rec = store.get(key)?;
            (rec.id, rec.usage, rec.remote.clone())
        };
        if let Some(u) = usage {
            return Ok(u);
        }
        let remote = match remote {
            // Not measured (nor kept) while the tree is being made (the gRPC service waits
            // for it first: [`Snapshotter::wait_made`]).
            Some(r) if self.making_of(&r.image).is_some() => return Ok((0, 0)),
            r => r.map(|r| r.dir),
        };
        Ok(match remote {
            Some(dir) => match measure_usage(&dir, true) {
                Some(u) => {
                    self.store.lock().unwrap().set_usage(key, u);
                    u
                }
                None => (0, 0),
            },
            None => usage_of(&self.dir(id).join("fs"), false),
        })
    }

    /// Removes what sits under `roots/containerd` but is no recorded lazy image (a crash
    /// between the daemon's prepare and the record): the daemon's image if it serves one
    /// there, and the directory. No remote prepare may run meanwhile.
    fn sweep_orphan_images(&self) {
        let known: Vec<PathBuf> = {
            let store = self.store.lock().unwrap();
            store.images().iter().map(|i| i.dest.clone()).collect()
        };
        let Ok(rd) = std::fs::read_dir(&self.images_root) else {
            return;
        };
        for e in rd.flatten() {
            let dest = e.path();
            if known.contains(&dest) {
                continue;
            }
            info!(dest = %dest.display(), "cleanup: lazy image directory no snapshot records");
            if self.host.serves(&dest)
                && let Err(e) = self.host.remove_image(&dest)
            {
                warn!(dest = %dest.display(), error = %e, "removing an orphaned lazy image");
                continue;
            }
            if let Err(e) = std::fs::remove_dir(&dest) {
                warn!(dest = %dest.display(), error = %e, "deleting an orphaned lazy image directory");
            }
        }
    }

    /// `Cleanup`: deletes snapshot directories no snapshot owns, lazy images no snapshot
    /// points into, and lazy image directories nothing records.
    pub fn cleanup(self: &Arc<Self>) -> Result<(), SnapshotterError> {
        // No remote prepare between the daemon's prepare and its record (called on a
        // blocking thread).
        let _one = self.remote.blocking_lock();
        self.sweep_orphan_images();
        let (ids, unused): (Vec<u64>, Vec<PathBuf>) = {
            let store = self.store.lock().unwrap();
            (
                store.all().map(|(_, r)| r.id).collect(),
                store
                    .images()
                    .iter()
                    .filter(|i| !store.image_in_use(&i.dest))
                    .map(|i| i.dest.clone())
                    .collect(),
            )
        };
        let dirs = self.root.join("snapshots");
        let rd = std::fs::read_dir(&dirs).map_err(io_err(format!("reading {}", dirs.display())))?;
        for e in rd.flatten() {
            let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id
                && !ids.contains(&id)
            {
                info!(dir = %e.path().display(), "cleanup: orphaned snapshot directory");
                self.discard_files(id, false);
            }
        }
        for dest in unused {
            self.release_image(&dest);
        }
        Ok(())
    }
}
