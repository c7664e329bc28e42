//! The daemon: one process serving every prepared image, with a local API, state that
//! survives restarts and a takeover that never lets a blocked reader see zeros.
//!
//! Owns the daemon's lifecycle and its images; it speaks the [`crate::api`] protocol on a
//! unix socket, keeps [`state`] in `STATE_DIR`, the in-flight [`journal`], and the
//! [`holder`] process. It must not restructure what it builds on: image resolution and
//! indexes come from [`crate::image`] (`open`, `load_indexes`), trees from
//! [`crate::unpack`] with each placeholder registered as it is created
//! ([`crate::image::Registration`], the library's prepare's one pass), fills from one shared
//! [`crate::fill::Engine`].
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
//! 5. deny (`EIO`) any stale number nothing is known about and release the reservation but
//!    for the predecessor's known in-flight events; open the gate, fill and answer those by
//!    number, release their numbers; serve the API.
//!
//! A graceful stop (SIGTERM, SIGINT) records progress, answers what it can and leaves the
//! group with the holder: readers that arrive meanwhile block until the successor is up.
//!
//! With `containerd_socket` set it also serves containerd's snapshots API once step 4 is
//! done ([`crate::snapshotter`], through the adapter in `containerd.rs`).

pub mod cache;
mod containerd;
pub mod holder;
pub mod journal;
pub mod metrics;
pub mod peer;
pub mod state;

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{debug, info, warn};

use crate::api::{
    DaemonStatus, ErrorKind, ImageStatus, LayoutMode, RegistrySettings, Request, Response,
};
use crate::fill::{
    ContentSource, Engine, EngineConfig, FileId, FileProgress, FillError, Placeholder, SourceError,
    Verify, error_chain,
};
use crate::image::{self, ImageError, PrepareOptions};
use crate::index::{Entry, LayerIndex};
use crate::overlay::OverlayWatcher;
use crate::registry::BlobStore;
use crate::sys::fanotify::{DenyErrno, EventId, Group, GroupClass, Response as FanResponse};
use crate::sys::fdpass::FdReservation;
use crate::unpack::{self, Layer, Mode, UnpackOptions};
use journal::{EventKind, Inflight, Journal};
use state::{FileRecord, ImageRecord, PrepareIntent, StateDir};

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
    /// The containerd snapshotter failed to start.
    #[error("containerd snapshotter")]
    Snapshotter(#[from] crate::snapshotter::SnapshotterError),
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

/// Longest a background layer stream waits for readers' misses being fetched once per
/// [`STREAM_YIELD_EVERY`] bytes: misses go first, and the stream still moves while they
/// never stop.
const STREAM_YIELD: Duration = Duration::from_millis(5);

/// Bytes one layer stream moves between two yields to readers' misses. Per piece instead
/// (a piece is a file or 4 MiB of one), a layer of small files paid the wait per file: 4,465
/// files at up to 5 ms each while a walk kept misses in flight (`examples/walk.rs`). Per
/// stream at 1 MiB rather than shared at 4 MiB: a sparse start 0.44 -> 0.41 s, a walk
/// 0.66 -> 0.57 s (same example, separate runs).
const STREAM_YIELD_EVERY: u64 = 1 << 20;

/// Longest the background layer streams of a newly prepared image wait for a container
/// starting on it to go quiet ([`Daemon::hold_streams`]). Bounds how much later completion
/// ends; a workload that misses without pause (a walk of the tree) gets the streams after it.
const STREAM_HOLD_MAX: Duration = Duration::from_secs(3);

/// Readers' silence after which a held stream starts: no miss and no open through a watched
/// overlay for this long.
const STREAM_QUIET: Duration = Duration::from_millis(300);

/// Longest held streams wait for a first reader: an image pulled with no container yet
/// completes from then on.
const STREAM_FIRST_WAIT: Duration = Duration::from_secs(1);

/// Readers' misses and overlay opens after which held streams start at once: a walk of the
/// tree, not a start (the large image's start holds 166 opens). Held through a walk, the
/// streams left it at on-demand speed: first read of the tree right after the start 278 ->
/// 21 MiB/s (slim), 804 -> 21 (python) in `bench --all`.
const STREAM_HOLD_WALK: u64 = 256;

/// Event numbers reserved above the highest one a predecessor journaled: one 64 KiB read
/// buffer holds at most ~1,365 pre-content events (48 bytes each with their range record).
const RESERVE_MARGIN: i32 = 2048;

/// Descriptors left free below the descriptor limit when reserving event numbers.
const RESERVE_HEADROOM: u64 = 1024;

/// The directories under which the daemon prepares images unless told otherwise
/// (`--allow-root`): where container runtimes and administrators keep root filesystems, and
/// scratch space. A destination must lie strictly below one of them.
pub const DEFAULT_ALLOWED_ROOTS: &[&str] = &[
    "/var/lib", "/var/tmp", "/srv", "/mnt", "/media", "/run", "/tmp", "/home",
];

/// Longest API request line the daemon reads; a longer one is answered with an error and
/// its connection dropped (memory per connection stays bounded).
pub const MAX_REQUEST_LINE: usize = 1 << 20;

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
    /// Bytes of a layer's stream a whole-file read of a small file also reads past the file,
    /// filling the files wholly inside ([`image::ImageSources::read_around`]); 0: off.
    pub read_around: u64,
    /// Fill an image's start set ahead, before the files of its access profile if any
    /// ([`PrepareOptions::start_set`]).
    pub start_set: bool,
    /// How often fill progress is recorded.
    pub persist_interval: Duration,
    /// Keep the group in an fd holder process (`exe holder`). Without it a crash lets
    /// blocked readers through to zeros.
    pub holder_exe: Option<PathBuf>,
    /// Test knob: every fetch waits this long first (a slow registry).
    pub fetch_delay: Duration,
    /// Serve Prometheus metrics on this address (off when `None`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Destinations must lie strictly below one of these directories (default
    /// [`DEFAULT_ALLOWED_ROOTS`]); never above the daemon's state dir, index dir or socket,
    /// inside the state dir only under `STATE_DIR/roots`, never inside the index dir.
    pub allowed_roots: Vec<PathBuf>,
    /// Serve containerd's snapshots API here ([`crate::snapshotter`]; off when `None`).
    pub containerd_socket: Option<PathBuf>,
    /// Registry settings for the images containerd has the snapshotter serve lazily.
    pub containerd_registry: RegistrySettings,
    /// Complete those images in the background too (as `Prepare`'s `prefetch`; default on).
    pub containerd_prefetch: bool,
    /// Members of this group (gid) may use the API for read-only requests (`Status`,
    /// `Ping`); everyone but root is refused otherwise. The socket is then 0660 with this
    /// group, and a socket directory the daemon creates 0750.
    pub status_group: Option<u32>,
    /// Which layer indexes file digests may come from, whatever a request asks (default
    /// [`image::IndexPolicy::Local`]: only indexes built here).
    pub index_policy: image::IndexPolicy,
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
            read_around: image::READ_AROUND,
            start_set: true,
            persist_interval: Duration::from_secs(1),
            holder_exe: std::env::current_exe().ok(),
            fetch_delay: Duration::ZERO,
            metrics_addr: None,
            allowed_roots: DEFAULT_ALLOWED_ROOTS.iter().map(PathBuf::from).collect(),
            containerd_socket: None,
            containerd_registry: RegistrySettings::default(),
            containerd_prefetch: true,
            status_group: None,
            index_policy: image::IndexPolicy::default(),
        }
    }
}

/// Fetch counters of one image.
#[derive(Debug, Default)]
struct ImageCounters {
    bytes_fetched: AtomicU64,
    errors: AtomicU64,
}

/// One layer's reader (the source [`image::ImageSources::file_source`] picks for every file
/// of the layer), counted for its image: one per layer of a served image, shared by the
/// layer's placeholders ([`CountedSources`]).
struct DaemonSource {
    inner: Arc<dyn ContentSource>,
    image: Arc<SourceCounting>,
}

/// The counted readers of one image's layers, by layer ([`Daemon::source`]).
struct CountedSources(Vec<Arc<dyn ContentSource>>);

/// What the sources of one image's files share: the image's store, counters and the test
/// delay.
struct SourceCounting {
    store: Arc<BlobStore>,
    counters: Arc<ImageCounters>,
    delay: Duration,
}

impl ContentSource for DaemonSource {
    fn read_at(
        &self,
        file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            let image = &self.image;
            if !image.delay.is_zero() {
                tokio::time::sleep(image.delay).await;
            }
            let res = self.inner.read_at(file, offset, len).await;
            // The image has its own store: its counter is the image's network traffic.
            image
                .counters
                .bytes_fetched
                .fetch_max(image.store.bytes_fetched(), Ordering::Relaxed);
            if res.is_err() {
                image.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            res
        }
        .boxed()
    }

    fn digest(&self, file: u32, piece: u64) -> Option<crate::digest::Sha256> {
        self.inner.digest(file, piece)
    }
}

/// A prepare under way, on record ([`PrepareIntent`]) until [`Preparing::done`]. Dropped
/// before that (any failure), it removes what was made in the destination.
struct Preparing<'a> {
    state: &'a StateDir,
    id: u64,
    intent: PrepareIntent,
    done: bool,
}

impl<'a> Preparing<'a> {
    fn begin(
        state: &'a StateDir,
        id: u64,
        dest: &Path,
        tree: &TreeDir,
    ) -> Result<Preparing<'a>, ApiFail> {
        let intent = PrepareIntent {
            dest: dest.to_path_buf(),
            key: tree.key,
        };
        state
            .begin_prepare(id, &intent)
            .map_err(ApiFail::internal)?;
        Ok(Preparing {
            state,
            id,
            intent,
            done: false,
        })
    }

    /// The image is recorded: what was made stays.
    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        if !self.done {
            abandon_prepare(&self.intent);
        }
        self.state.end_prepare(self.id);
    }
}

/// Files a prepare registered: unregistered on drop unless [`Registered::keep`] says the
/// image was recorded.
struct Registered<'a> {
    engine: &'a Engine,
    ids: Option<&'a [Option<FileId>]>,
}

impl Registered<'_> {
    /// The image is recorded: its files stay served.
    fn keep(mut self) {
        self.ids = None;
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        for id in self.ids.into_iter().flatten().flatten() {
            let _ = self.engine.unregister(*id);
        }
    }
}

/// Removes what an unfinished prepare made in its destination, if the directory there is
/// still the one it prepared into.
fn abandon_prepare(intent: &PrepareIntent) {
    if dir_is(&intent.dest, intent.key) {
        image::remove_tree_contents(&intent.dest);
    }
}

/// The source of a file whose image could not be reopened after a restart (registry
/// unreachable, the reference moved on, the index lost): every fill fails with the reason,
/// so readers get `EIO` rather than the placeholder's holes.
struct Unavailable(String);

impl ContentSource for Unavailable {
    fn read_at(
        &self,
        _file: u32,
        _offset: u64,
        _len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        let m = self.0.clone();
        async move { Err(SourceError::new(format!("image not reopened: {m}"))) }.boxed()
    }
}

/// One served image.
struct ImageRt {
    record: Mutex<ImageRecord>,
    /// One per file, at its position in `record.files` (the persisted part stays there).
    files: Vec<ServedFile>,
    /// Positions into `files` in prefetch order (TOC prefetch landmarks first).
    order: Vec<u32>,
    counters: Arc<ImageCounters>,
    prefetch: AtomicBool,
    prefetch_running: AtomicBool,
    removed: AtomicBool,
    error: Option<String>,
    rate: Mutex<(Instant, u64, f64)>,
    saved: Mutex<Option<ImageRecord>>,
    /// The destination directory, held open: finds the tree if it is moved, and tells
    /// whatever now sits at the recorded path from it. `None`: it was gone at start-up.
    tree: Option<TreeDir>,
    /// Set when a layer, read whole in the background, did not hash to its digest: every
    /// later read of the image gets `EIO` ([`Daemon::mark_bad`]).
    bad: Mutex<Option<String>>,
    /// Set once every file of a bad image answers `EIO` (forgotten by the engine, complete
    /// ones marked again): only then does status say the image is bad, so a client that
    /// sees the verdict never reads the image's bytes after it.
    bad_fenced: AtomicBool,
    /// The image's store and indexes, for streaming prefetch (`None`: it could not be
    /// reopened after a restart).
    opened: Option<Arc<Opened>>,
}

/// What the daemon keeps of one served file besides its [`FileRecord`] (the persisted
/// part, at the same position in [`ImageRecord::files`]): what the hot paths (prefetch,
/// status, persisting) read without locking the record, and the flags they set.
/// Whether `img` may be recorded now: a removed image's record must not come back, a bad
/// image's record (which says so) must stay, and one that failed to reopen has none.
fn recordable(img: &ImageRt) -> bool {
    !(img.removed.load(Ordering::SeqCst)
        || img.error.is_some()
        || img.bad.lock().unwrap().is_some())
}

/// Bytes of complete files one record ([`Daemon::persist_image`]) offers to the content
/// cache at most: spread over the records (one a second by default), a background
/// completion's copies trickle in at 32 MiB/s instead of competing with a container's start.
const CACHE_ADD_PER_RECORD: u64 = 32 << 20;

struct ServedFile {
    /// The engine's id of its placeholder, set once when the image is prepared or reopened,
    /// if `registered` ([`ServedFile::id`]).
    fid: FileId,
    /// Registered with the engine; not: filled from the content cache at prepare, a
    /// user-modified file, or an error. (Apart from `fid`, not an `Option` of it: eight
    /// bytes less per file served.)
    registered: bool,
    /// Its true size (the record's `size`, which never changes): what prefetch paces.
    size: u64,
    /// Offered to the content cache already: set by [`Daemon::persist_image`] (under
    /// `saved`) the first time the record says the file is complete.
    cached: AtomicBool,
    /// Found moved, deleted or replaced under the daemon: set by a prefetch fill that finds
    /// the placeholder gone; prefetch skips it from then on and status reports it.
    gone: AtomicBool,
}

impl ServedFile {
    /// The engine's id of its placeholder; `None`: not registered.
    fn id(&self) -> Option<FileId> {
        self.registered.then_some(self.fid)
    }

    /// The served files of `record`, `ids` giving each file's engine id in record order.
    fn list(record: &ImageRecord, ids: Vec<Option<FileId>>) -> Vec<ServedFile> {
        record
            .files
            .iter()
            .zip(ids)
            .map(|(f, id)| ServedFile {
                fid: id.unwrap_or(FileId::NONE),
                registered: id.is_some(),
                size: f.size,
                cached: AtomicBool::new(false),
                gone: AtomicBool::new(false),
            })
            .collect()
    }
}

/// Identity of a directory: device, inode and birth time.
type DirKey = (u64, u64, Option<std::time::SystemTime>);

/// Whether the directory at `path` (not following a final symlink) is the one `key` names.
fn dir_is(path: &Path, key: DirKey) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_dir() && (m.dev(), m.ino(), m.created().ok()) == key)
}

/// An image's destination directory, identified by its device, inode and birth time.
struct TreeDir {
    fd: std::fs::File,
    key: DirKey,
}

impl TreeDir {
    fn open(dest: &Path) -> std::io::Result<TreeDir> {
        let fd = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dest)?;
        TreeDir::from_dir(fd)
    }

    /// The directory open as `fd`.
    fn from_dir(fd: std::fs::File) -> std::io::Result<TreeDir> {
        let m = fd.metadata()?;
        Ok(TreeDir {
            fd,
            key: (m.dev(), m.ino(), m.created().ok()),
        })
    }

    /// Whether `path` (not followed if a symlink) is this directory.
    fn is_at(&self, path: &Path) -> bool {
        dir_is(path, self.key)
    }

    /// Where the directory is now: `recorded` if it is still there, wherever it was moved
    /// to, or `None` if it was deleted.
    fn location(&self, recorded: &Path) -> Option<PathBuf> {
        if self.is_at(recorded) {
            return Some(recorded.to_path_buf());
        }
        let now = std::fs::read_link(crate::sys::fdpass::proc_fd_path(&self.fd)).ok()?;
        self.is_at(&now).then_some(now)
    }
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
    /// The open watch of every overlay rootfs over an overlay-mode image (its group is kept
    /// by the fd holder too).
    overlays: OverlayWatcher,
    /// Watched overlays: (image id, merged dir, the overlay's device number).
    watches: Mutex<Vec<(u64, PathBuf, u64)>>,
    /// Destinations being prepared right now (claimed before anything is created).
    claims: Mutex<Vec<PathBuf>>,
    /// The daemon's own places, resolved: the state dir, the index dir, the socket. A
    /// destination is never one of them or above one; inside the state dir it must be under
    /// `STATE_DIR/roots`, inside the index dir nowhere.
    own: OwnPlaces,
}

/// See `Daemon::own`.
struct OwnPlaces {
    state: PathBuf,
    index: PathBuf,
    socket: PathBuf,
}

impl OwnPlaces {
    fn new(state: &Path, index: &Path, socket: &Path) -> OwnPlaces {
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        OwnPlaces {
            state: canon(state),
            index: canon(index),
            socket: socket
                .parent()
                .map(|d| canon(d).join(socket.file_name().unwrap_or_default()))
                .unwrap_or_else(|| socket.to_path_buf()),
        }
    }

    /// Why `p` may not be a destination, if it may not.
    fn conflict(&self, p: &Path) -> Option<String> {
        for own in [&self.state, &self.index, &self.socket] {
            if own.starts_with(p) {
                return Some(format!("it contains the daemon's own {}", own.display()));
            }
        }
        if p.starts_with(&self.index) {
            return Some(format!(
                "it is inside the index directory {}",
                self.index.display()
            ));
        }
        let roots = self.state.join("roots");
        if p.starts_with(&self.state) && !p.starts_with(&roots) {
            return Some(format!(
                "inside the state directory only {} holds image trees",
                roots.display()
            ));
        }
        None
    }
}

/// A claimed destination; released when the prepare ends, either way.
struct Claim<'a> {
    claims: &'a Mutex<Vec<PathBuf>>,
    dest: PathBuf,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims.lock().unwrap().retain(|d| *d != self.dest);
    }
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

/// `path` resolved: its deepest existing ancestor canonicalized (symlinks followed, to see
/// where they lead), the rest appended. `path` is absolute and has no `..`.
fn resolve_lexically(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path;
    while std::fs::symlink_metadata(existing).is_err() {
        existing = match existing.parent() {
            Some(p) => p,
            None => break,
        };
    }
    let canon = existing.canonicalize()?;
    Ok(match path.strip_prefix(existing) {
        Ok(rest) if !rest.as_os_str().is_empty() => canon.join(rest),
        _ => canon,
    })
}

/// Checks that nobody but root can rename, replace or remove `p` or any of its ancestors
/// while the daemon builds a tree there and later reaches its files by path: each is owned
/// by root and, unless sticky (`/tmp`), writable by nobody else.
fn check_ancestors(p: &Path) -> Result<(), ApiFail> {
    for a in p.ancestors() {
        let m = std::fs::symlink_metadata(a).map_err(|e| {
            ApiFail(
                ErrorKind::Internal,
                format!("checking {}: {e}", a.display()),
            )
        })?;
        let others_write = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if m.uid() != 0 || others_write {
            return Err(ApiFail(
                ErrorKind::BadRequest,
                format!(
                    "destination {}: {} is {} (a user could move or replace the tree while root writes into it); use a directory only root can change",
                    p.display(),
                    a.display(),
                    if m.uid() != 0 {
                        format!("owned by uid {}", m.uid())
                    } else {
                        "writable by group or others".to_string()
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// Whether an image entry would give a host user who reaches it more than the user has:
/// a setuid or setgid file, or one with file capabilities.
fn is_privileged(e: &crate::index::Entry) -> bool {
    (e.kind == crate::index::EntryKind::File && e.mode & 0o6000 != 0)
        || e.xattrs.iter().any(|(n, _)| n == "security.capability")
}

/// Checks that host users cannot reach a direct-mode tree at `dest` holding the privileged
/// file `privileged` (its setuid and capability binaries would be theirs to run): some
/// ancestor must be a root-owned directory others cannot enter (no search bit for others,
/// nor for a group but root's), as overlay mode's `layers/` is. The container's root is
/// the tree itself and sees no difference. `roots`: `STATE_DIR/roots`, such a place (named
/// in the error).
fn check_unexposed(dest: &Path, privileged: &str, roots: &Path) -> Result<(), ApiFail> {
    let guarded = dest.ancestors().skip(1).any(|a| {
        std::fs::symlink_metadata(a).is_ok_and(|m| {
            m.is_dir()
                && m.uid() == 0
                && m.mode() & 0o001 == 0
                && (m.mode() & 0o010 == 0 || m.gid() == 0)
        })
    });
    if guarded {
        return Ok(());
    }
    Err(ApiFail(
        ErrorKind::BadRequest,
        format!(
            "destination {}: every user of this host could enter the tree and run the image's setuid and capability binaries (/{privileged}); put it under a directory only root can enter (mode 0700; missing parents are created so), e.g. {}",
            dest.display(),
            roots.join(dest.file_name().unwrap_or_default()).display()
        ),
    ))
}

/// Checks a created destination, open as `dir`: empty, on ext4, xfs or btrfs.
fn check_dest_dir(dest: &Path, dir: &impl std::os::fd::AsFd) -> Result<(), ApiFail> {
    let fs = nix::sys::statfs::fstatfs(dir).map_err(|e| {
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
    let mut rd = std::fs::read_dir(crate::sys::fdpass::proc_fd_path(dir)).map_err(|e| {
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
    Ok(())
}

fn prepare_options(config: &DaemonConfig, r: &RegistrySettings) -> Result<PrepareOptions, ApiFail> {
    let mut o = PrepareOptions::from_settings(&config.index_dir, r)
        .map_err(|e| ApiFail(ErrorKind::BadRequest, e.to_string()))?;
    if r.signed_index_only && matches!(config.index_policy, image::IndexPolicy::Referrer) {
        return Err(ApiFail(
            ErrorKind::BadRequest,
            "the pull asks for a signed index artifact, but this daemon runs --index-policy referrer (artifacts taken unsigned): run it with --index-policy signed --index-key KEY".into(),
        ));
    }
    config.index_policy.apply(&mut o);
    o.start_set = config.start_set;
    Ok(o)
}

/// An image opened for serving: store, indexes by layer.
struct Opened {
    store: Arc<BlobStore>,
    manifest_digest: String,
    sources: image::ImageSources,
    /// The access profile to fill ahead ([`image::ImageIndexes::profile`]).
    profile: Option<image::AccessProfile>,
    /// Bytes received to have every layer's index (layers streamed whole to build one,
    /// artifact and TOC reads), before any placeholder existed.
    index_bytes: u64,
}

async fn open_image(reference: &str, opts: &PrepareOptions) -> Result<Opened, image::ImageError> {
    let (store, resolved) = image::open(reference, opts).await?;
    let manifest_digest = resolved.manifest_digest.to_string();
    let before = store.bytes_fetched();
    let ix = image::load_indexes(&store, resolved, reference, opts).await?;
    Ok(Opened {
        sources: ix.sources(&store),
        profile: ix.profile.clone(),
        // The configuration travels beside the indexes, but like the manifest it is the
        // image's, not an index's.
        index_bytes: (store.bytes_fetched() - before)
            .saturating_sub(ix.image.config_bytes.len() as u64),
        store,
        manifest_digest,
    })
}

impl Daemon {
    /// The counted readers of `opened`'s layers, which its files share ([`Daemon::source`]).
    fn counted_sources(&self, opened: &Opened, counters: &Arc<ImageCounters>) -> CountedSources {
        let image = Arc::new(SourceCounting {
            store: opened.store.clone(),
            counters: counters.clone(),
            delay: self.config.fetch_delay,
        });
        CountedSources(
            opened
                .sources
                .layer_sources()
                .map(|inner| {
                    Arc::new(DaemonSource {
                        inner,
                        image: image.clone(),
                    }) as Arc<dyn ContentSource>
                })
                .collect(),
        )
    }

    /// The source of entry `entry` of layer `layer`, its layer's reader counted for the
    /// image.
    fn source(
        opened: &Opened,
        layer: usize,
        entry: usize,
        counted: &CountedSources,
    ) -> Result<image::FileSource, ImageError> {
        let (file, verify) = opened.sources.file_key(layer, entry)?;
        // One counted reader per layer of the same sources: there when the layer is.
        let source = counted.0[layer].clone();
        Ok(image::FileSource {
            source,
            file,
            verify,
        })
    }

    /// The image served at `dest`: its recorded destination, or the directory it was moved
    /// to (the same directory by identity).
    fn find(&self, dest: &Path) -> Result<(u64, Arc<ImageRt>), ApiFail> {
        if !dest.is_absolute() {
            return Err(ApiFail(
                ErrorKind::BadRequest,
                format!("destination {} is not an absolute path", dest.display()),
            ));
        }
        let canon = dest.canonicalize().unwrap_or_else(|_| dest.to_path_buf());
        let images = self.images.lock().unwrap();
        images
            .iter()
            .find(|(_, i)| i.record.lock().unwrap().dest == canon)
            .or_else(|| {
                images
                    .iter()
                    .find(|(_, i)| i.tree.as_ref().is_some_and(|t| t.is_at(&canon)))
            })
            .map(|(id, i)| (*id, i.clone()))
            .ok_or_else(|| {
                ApiFail(
                    ErrorKind::UnknownImage,
                    format!("no image is served at {}", dest.display()),
                )
            })
    }

    /// Whether `p` (resolved) may be a destination: strictly below an allowed root, not in
    /// or above one of the daemon's own directories, not in or above a served tree.
    fn check_allowed(&self, p: &Path) -> Result<(), ApiFail> {
        let bad = |m: String| ApiFail(ErrorKind::BadRequest, m);
        let roots = &self.config.allowed_roots;
        if !roots.iter().any(|r| p.starts_with(r) && p != r) {
            let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(bad(format!(
                "destination {} is outside the allowed roots ({}; see `fanfill daemon --allow-root`)",
                p.display(),
                list.join(", ")
            )));
        }
        if let Some(why) = self.own.conflict(p) {
            return Err(bad(format!("destination {}: {why}", p.display())));
        }
        for img in self.images.lock().unwrap().values() {
            let d = img.record.lock().unwrap().dest.clone();
            if d == p {
                return Err(ApiFail(
                    ErrorKind::AlreadyServed,
                    format!("{} is already served", p.display()),
                ));
            }
            if p.starts_with(&d) || d.starts_with(p) {
                return Err(bad(format!(
                    "destination {} overlaps the served image tree {}",
                    p.display(),
                    d.display()
                )));
            }
        }
        Ok(())
    }

    /// Checks a requested destination before anything is created, claims it against
    /// concurrent prepares, creates it, and checks it again once resolved (empty, on ext4,
    /// xfs or btrfs; no ancestor a user but root could change), and opens it. Returns the
    /// resolved path, the claim and the open directory.
    fn claim_dest(
        &self,
        dest: &Path,
    ) -> Result<(PathBuf, Claim<'_>, std::os::fd::OwnedFd), ApiFail> {
        let bad = |m: String| ApiFail(ErrorKind::BadRequest, m);
        if !dest.is_absolute() {
            return Err(bad(format!(
                "destination {} is not an absolute path",
                dest.display()
            )));
        }
        if dest.components().any(|c| c == Component::ParentDir) {
            return Err(bad(format!("destination {} contains `..`", dest.display())));
        }
        let resolved = resolve_lexically(dest)
            .map_err(|e| bad(format!("resolving {}: {e}", dest.display())))?;
        let claim = {
            let mut claims = self.claims.lock().unwrap();
            self.check_allowed(&resolved)?;
            if let Some(c) = claims
                .iter()
                .find(|c| resolved.starts_with(c) || c.starts_with(&resolved))
            {
                return Err(ApiFail(
                    ErrorKind::AlreadyServed,
                    format!("{} is being prepared", c.display()),
                ));
            }
            claims.push(resolved.clone());
            Claim {
                claims: &self.claims,
                dest: resolved.clone(),
            }
        };
        // Directories created on the way are root's alone (0700).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&resolved)
            .map_err(|e| {
                ApiFail(
                    ErrorKind::Internal,
                    format!("creating {}: {e}", resolved.display()),
                )
            })?;
        // A symlink put in place meanwhile would lead elsewhere: the real path must be the
        // one checked.
        let canon = resolved.canonicalize().map_err(|e| {
            ApiFail(
                ErrorKind::Internal,
                format!("resolving {}: {e}", resolved.display()),
            )
        })?;
        if canon != resolved {
            return Err(bad(format!(
                "destination {} changed while it was checked (now {})",
                resolved.display(),
                canon.display()
            )));
        }
        check_ancestors(&canon)?;
        // Opened once, with no symlink anywhere on the way: the directory checked is the
        // one everything is built in, whatever happens to the path later.
        let dir = unpack::open_dest(&canon).map_err(|e| {
            ApiFail(
                ErrorKind::Internal,
                format!("opening {}: {}", canon.display(), error_chain(&e)),
            )
        })?;
        check_dest_dir(&canon, &dir)?;
        Ok((canon, claim, dir))
    }

    /// Prepares `image_ref` into `dest` and serves it. `known`, if given, gets the image's
    /// manifest digest and layer digests as soon as its indexes are in, before the
    /// placeholders are made (the containerd snapshotter commits its layers then).
    async fn prepare(
        self: &Arc<Self>,
        image_ref: String,
        dest: PathBuf,
        mode: LayoutMode,
        registry: RegistrySettings,
        prefetch: bool,
        known: Option<tokio::sync::oneshot::Sender<(String, Vec<String>)>>,
    ) -> Result<ImageStatus, ApiFail> {
        let (dest, _claim, dir) = self.claim_dest(&dest)?;
        let internal = |e: std::io::Error| {
            ApiFail(
                ErrorKind::Internal,
                format!("opening {}: {e}", dest.display()),
            )
        };
        let dir = std::fs::File::from(dir);
        let tree = TreeDir::from_dir(dir.try_clone().map_err(internal)?).map_err(internal)?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        // Until the image is recorded, a failure (or a successor, after a crash) removes
        // whatever was made here.
        let preparing = Preparing::begin(&self.state, id, &dest, &tree)?;
        let opts = prepare_options(&self.config, &registry)?;
        let started = Instant::now();
        let opened = open_image(&image_ref, &opts)
            .await
            .map_err(|e| ApiFail(ErrorKind::Image, error_chain(&e)))?;
        if mode == LayoutMode::Direct {
            let privileged = opened
                .sources
                .layers()
                .flat_map(|(_, ix)| ix.entries.iter())
                .find(|e| is_privileged(e))
                .map(|e| e.path.clone());
            if let Some(p) = privileged {
                check_unexposed(&dest, &p, &self.own.state.join("roots"))?;
            }
        }
        if let Some(known) = known {
            let layers = opened.sources.layers().map(|l| l.0.to_string()).collect();
            let _ = known.send((opened.manifest_digest.clone(), layers));
        }
        // The files a recorded run of this image read: fetched while the placeholders are
        // unpacked, written once they are registered, before the workload asks.
        let early_profile = opened
            .profile
            .as_ref()
            .filter(|_| opts.profile_prefetch > 0)
            .map(|p| {
                // Files the content cache holds are filled from it at registration.
                opened
                    .sources
                    .start_profile_except(&self.engine, p, opts.profile_prefetch, |e| {
                        e.sha256.is_some_and(|s| self.cache.contains(&s))
                    })
            });
        let unpack_mode = match mode {
            LayoutMode::Direct => Mode::Direct,
            LayoutMode::Overlay => Mode::Overlay,
        };
        let uopts = UnpackOptions {
            mode: unpack_mode,
            ..UnpackOptions::default()
        };
        let digests: Vec<String> = opened.sources.layers().map(|l| l.0.to_string()).collect();
        let ixs: Vec<Arc<LayerIndex>> = opened.sources.layers().map(|l| l.1.clone()).collect();
        let counters = Arc::new(ImageCounters::default());
        let opened = Arc::new(opened);
        let this = self.clone();
        let (opened2, counters2, d2, dest2, ref2) = (
            opened.clone(),
            counters.clone(),
            digests.clone(),
            dest.clone(),
            image_ref.clone(),
        );
        // Each placeholder is registered (in direct mode marked) through the descriptor it
        // was created with, as the unpack creates it: no second walk.
        let registered = tokio::task::spawn_blocking(move || {
            let (opened, counters, dest) = (opened2, counters2, dest2);
            let counted = this.counted_sources(&opened, &counters);
            let source = |layer, entry| Daemon::source(&opened, layer, entry, &counted);
            // From the content cache: filled before it is ever marked, nothing fetched.
            let prefill = |p: &unpack::Placeholder, meta: &Entry, file: &std::fs::File| {
                let Some(sha) = meta.sha256 else {
                    return false;
                };
                this.cache
                    .fill(&sha, file, &p.path, meta)
                    .inspect_err(|e| warn!(error = %error_chain(e), "content cache"))
                    .unwrap_or(false)
            };
            let registration = image::Registration {
                engine: &this.engine,
                mode: unpack_mode,
                reference: &ref2,
                dest: &dest,
                source: &source,
                prefill: Some(&prefill),
            };
            let (unpacked, ids) = registration.unpack(|sink| {
                let layers: Vec<Layer<'_>> = d2
                    .iter()
                    .zip(&ixs)
                    .map(|(d, ix)| Layer::new(d, &ix.entries))
                    .collect();
                unpack::unpack_at_into(&layers, dir.into(), &dest, &uopts, sink)
            })?;
            let lowerdir = (!unpacked.lowerdirs.is_empty()).then(|| unpacked.lowerdir_option());
            let files: Vec<FileRecord> = unpacked
                .placeholders
                .into_iter()
                .zip(&ids)
                .map(|(p, id)| FileRecord {
                    path: p.path,
                    layer: crate::index::position(p.layer),
                    entry: crate::index::position(p.entry),
                    size: p.size,
                    chunk: 0,
                    // Filled from the content cache, never registered.
                    complete: id.is_none(),
                    filled: Box::default(),
                })
                .collect();
            let files = Arc::new(files);
            let keys: Vec<(usize, usize)> = files.iter().map(FileRecord::key).collect();
            let order = opened.sources.prefetch_order(&keys);
            Ok::<_, ImageError>((files, ids, lowerdir, order))
        })
        .await
        .map_err(ApiFail::internal)?;
        let (files, ids, lowerdir, order) =
            registered.map_err(|e| ApiFail(ErrorKind::Internal, error_chain(&e)))?;
        // Unregisters what was registered unless the image gets recorded.
        let registered = Registered {
            engine: &self.engine,
            ids: Some(&ids),
        };
        if let Err(e) = image::mark_tree_dir(&tree.fd, &image_ref) {
            warn!(dest = %dest.display(), error = %e, "cannot mark the tree as fanfill's");
        }
        let record = ImageRecord {
            id,
            reference: image_ref.clone(),
            manifest_digest: opened.manifest_digest.clone(),
            layers: digests,
            dest: dest.clone(),
            mode,
            lowerdir,
            registry: RegistrySettings {
                creds: None,
                ..registry
            },
            prefetch,
            overlays: Vec::new(),
            bad: None,
            files,
        };
        let saving = Instant::now();
        self.state.save(&record).map_err(ApiFail::internal)?;
        debug!(
            files = record.files.len(),
            us = saving.elapsed().as_micros() as u64,
            "image recorded"
        );
        registered.keep();
        let files = ServedFile::list(&record, ids);
        preparing.done();
        let (placed, fids) = self.start_read_around(&opened, &record, &files);
        if let Some(early) = early_profile {
            let n = early.place(&placed, &fids);
            info!(reference = %image_ref, files = n, "access profile's files handed to their placeholders");
        }
        info!(
            reference = %image_ref,
            dest = %dest.display(),
            files = files.len(),
            ms = started.elapsed().as_millis() as u64,
            "image prepared"
        );
        // The unpack's plan, paths and buffers are freed by now; give their pages back.
        tokio::task::spawn_blocking(crate::sys::release_free_heap);
        // What the image cost before its first fill: status shows it from the start.
        counters
            .bytes_fetched
            .fetch_max(opened.index_bytes, Ordering::Relaxed);
        let rt = Arc::new(ImageRt {
            saved: Mutex::new(Some(record.clone())),
            opened: Some(opened),
            record: Mutex::new(record),
            files,
            order,
            counters,
            prefetch: AtomicBool::new(prefetch),
            prefetch_running: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            error: None,
            rate: Mutex::new((Instant::now(), 0, 0.0)),
            tree: Some(tree),
            bad: Mutex::new(None),
            bad_fenced: AtomicBool::new(false),
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
        let mk = |files: Vec<Option<FileId>>,
                  order: Vec<u32>,
                  record: ImageRecord,
                  error: Option<String>,
                  opened: Option<Arc<Opened>>| {
            let files = ServedFile::list(&record, files);
            if let Some(opened) = &opened {
                self.start_read_around(opened, &record, &files);
            }
            let tree = TreeDir::open(&record.dest)
                .inspect_err(
                    |e| warn!(dest = %record.dest.display(), error = %e, "image tree missing"),
                )
                .ok();
            Arc::new(ImageRt {
                tree,
                bad: Mutex::new(None),
                bad_fenced: AtomicBool::new(false),
                order,
                saved: Mutex::new(Some(record.clone())),
                opened,
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
        let opened = match prepare_options(&self.config, &record.registry) {
            Ok(opts) => open_image(&record.reference, &opts)
                .await
                .map_err(|e| error_chain(&e)),
            Err(ApiFail(_, m)) => Err(m),
        };
        let (opened, error) = match opened {
            Ok(o) if o.manifest_digest == record.manifest_digest => (Some(Arc::new(o)), None),
            Ok(o) => (
                None,
                Some(format!(
                    "{} now resolves to {}, not {}",
                    record.reference, o.manifest_digest, record.manifest_digest
                )),
            ),
            Err(m) => (None, Some(m)),
        };
        if let Some(m) = &error {
            warn!(reference = %record.reference, error = %m, "cannot reopen image; its unfilled files answer EIO");
        }
        let this = self.clone();
        let counters2 = counters.clone();
        let overlay = record.mode == LayoutMode::Overlay;
        let (opened2, error2) = (opened.clone(), error.clone());
        let files = tokio::task::spawn_blocking(move || {
            let counted = opened2
                .as_ref()
                .map(|o| this.counted_sources(o, &counters2));
            let mut ids = Vec::with_capacity(record.files.len());
            for f in record.files.iter() {
                if f.complete && f.chunk == 0 {
                    // Filled from the content cache at prepare: never marked.
                    ids.push(None);
                    continue;
                }
                // A file whose source cannot be had is still registered (marked, or held
                // by the overlay watch): its readers get EIO, never its holes.
                let found = match (&opened2, &counted, &error2) {
                    (Some(o), Some(c), _) => {
                        let (layer, entry) = f.key();
                        Daemon::source(o, layer, entry, c).map_err(|e| error_chain(&e))
                    }
                    (_, _, e) => Err(e.clone().unwrap_or_default()),
                };
                let s = found.unwrap_or_else(|m| image::FileSource {
                    source: Arc::new(Unavailable(m)),
                    file: 0,
                    verify: Verify::None,
                });
                let p = Placeholder {
                    path: f.path.clone(),
                    size: f.size,
                    source: s.source,
                    file: s.file,
                    verify: s.verify,
                };
                let n = if f.chunk > 0 {
                    f.size.div_ceil(f.chunk) as usize
                } else {
                    0
                };
                let r = this
                    .engine
                    .register_filled(p, f.chunk, &f.filled_flags(n))
                    .map_err(|e| {
                        if matches!(e, FillError::NotPlaceholder { .. }) {
                            // Changed by the user while unfilled (O_TRUNC raises no
                            // event): theirs now, never refused as unknown.
                            if let Err(e) = this.engine.release_path(&f.path) {
                                warn!(error = %error_chain(&e), "releasing a user-modified file");
                            }
                            return format!("{}; left to the user", error_chain(&e));
                        }
                        error_chain(&e)
                    })
                    .and_then(|id| {
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
            let order = match &opened2 {
                Some(o) => o.sources.prefetch_order(&record.file_keys()),
                None => (0..record.files.len())
                    .map(crate::index::position)
                    .collect(),
            };
            (ids, record, order)
        })
        .await;
        match files {
            Ok((ids, record, order)) => {
                info!(reference = %record.reference, dest = %record.dest.display(), files = ids.len(), "image re-served");
                let bad = record.bad.clone();
                let img = mk(ids, order, record, error, opened);
                if let Some(why) = bad {
                    self.mark_bad(&img, why);
                }
                img
            }
            Err(e) => panic!("re-registering task failed: {e}"),
        }
    }

    /// Whether every file of `img` is complete and nothing is wrong with it (not bad, not
    /// failed to reopen, no placeholder gone): an overlay over it needs no open watch.
    fn image_complete(&self, img: &ImageRt) -> bool {
        if img.error.is_some()
            || img.bad.lock().unwrap().is_some()
            || img.removed.load(Ordering::SeqCst)
        {
            return false;
        }
        let rec = img.record.lock().unwrap();
        rec.files.iter().zip(&img.files).all(|(f, served)| {
            !served.gone.load(Ordering::SeqCst)
                && match served.id() {
                    Some(id) => self.engine.is_complete(id),
                    None => f.complete,
                }
        })
    }

    /// Takes the open watch off every overlay over `img` once the image is complete: each
    /// lower file then holds all its data, and an open through the overlay must not pay a
    /// round trip to the daemon for the rest of the container's life (a watched overlay
    /// read its tree at a third of the speed of a plain one). The overlays stay on the
    /// image's record, so `unwatch_overlay` still forgets them; a successor daemon does not
    /// mark them again ([`Self::watch_overlay_of`] checks completeness first).
    fn release_complete_overlays(&self, id: u64, img: &ImageRt) {
        let devs: Vec<(u64, PathBuf)> = self
            .watches
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _, dev)| *i == id && self.overlays.is_watched(*dev))
            .map(|(_, m, dev)| (*dev, m.clone()))
            .collect();
        if devs.is_empty() || !self.image_complete(img) {
            return;
        }
        for (dev, merged) in devs {
            self.overlays.unwatch(dev);
            info!(merged = %merged.display(), "image complete: overlay open watch released");
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
        for (f, served) in rec.files.iter().zip(&img.files) {
            s.bytes_total += f.size;
            match served.id().and_then(|id| self.engine.progress(id)) {
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
        let gone: Vec<usize> = img
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.gone.load(Ordering::SeqCst))
            .map(|(i, _)| i)
            .collect();
        s.files_gone = gone.len() as u64;
        let tree_gone = img
            .tree
            .as_ref()
            .is_none_or(|t| t.location(&rec.dest).is_none());
        let bad = if img.bad_fenced.load(Ordering::SeqCst) {
            img.bad.lock().unwrap().clone()
        } else {
            None
        };
        s.state = match img.error.as_ref().or(bad.as_ref()) {
            Some(e) => format!("error: {e}"),
            None if tree_gone => format!(
                "error: the tree at {} was moved or deleted under the daemon",
                rec.dest.display()
            ),
            None if !gone.is_empty() => format!(
                "error: {} placeholders moved or deleted under the daemon (one: {})",
                gone.len(),
                rec.files[*gone.iter().min().unwrap_or(&0)].path.display()
            ),
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
        let (held, held_max) = self.overlays.held();
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
                overlays_watched: self.watches.lock().unwrap().len() as u64,
                overlay_opens_inflight: self.overlays.inflight(),
                overlay_opens: self.overlays.opens(),
                overlay_open_held_ms: held.as_millis() as u64,
                overlay_open_held_max_ms: held_max.as_millis() as u64,
                loader_ahead: self.overlays.loader_ahead(),
                delivered_waits: st.delivered,
            },
            images: images.iter().map(|i| self.image_status(i)).collect(),
        })
    }

    /// The Prometheus text exposition of the daemon's figures.
    fn metrics(&self) -> String {
        let images: Vec<Arc<ImageRt>> = self.images.lock().unwrap().values().cloned().collect();
        let statuses: Vec<ImageStatus> = images.iter().map(|i| self.image_status(i)).collect();
        let overlay = metrics::OverlayFigures {
            opens: self.overlays.opens(),
            inflight: self.overlays.inflight(),
            held: self.overlays.held_histogram(),
            loader_ahead: self.overlays.loader_ahead(),
        };
        metrics::render(
            &self.engine.stats(),
            &self.engine.latency_histogram(),
            self.engine.inflight_events(),
            &overlay,
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
        // The image whose layer trees the overlay stacks: exactly one, in overlay mode. Other
        // lowers may be ordinary directories (layers containerd unpacked itself), never
        // another image's placeholder trees (nobody would fill them).
        let mut found = Vec::new();
        for (id, img) in self.images.lock().unwrap().iter() {
            if img.removed.load(Ordering::SeqCst) {
                continue;
            }
            let rec = img.record.lock().unwrap();
            if lowers.iter().any(|l| l.starts_with(&rec.dest)) {
                found.push((*id, rec.dest.clone(), rec.mode));
            }
        }
        let (id, dest) = match found.as_slice() {
            [(id, dest, LayoutMode::Overlay)] => (*id, dest.clone()),
            [] => {
                return Err(ApiFail(
                    ErrorKind::UnknownImage,
                    format!(
                        "the overlay at {} does not stack layers of an image fanfill serves in overlay mode",
                        merged.display()
                    ),
                ));
            }
            _ => {
                let dests: Vec<String> = found.iter().map(|f| f.1.display().to_string()).collect();
                return Err(ApiFail(
                    ErrorKind::BadRequest,
                    format!(
                        "the overlay at {} stacks placeholder trees of {} (more than one image, or a direct-mode tree): one watch serves one overlay-mode image",
                        merged.display(),
                        dests.join(", ")
                    ),
                ));
            }
        };
        // The watch finds a lower file by the device and inode number the overlay reports,
        // which are the overlay's own and the lower file's only when every layer, the upper
        // one too, shares one filesystem (else overlayfs reports a device of its own per
        // layer, and every open would be refused as one on an unknown overlay).
        let dev_of = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        let image_dev = dev_of(&dest);
        let upper = crate::hook::overlay_upperdir(&mountinfo, merged);
        let layers = lowers
            .iter()
            .map(|l| ("lower", l))
            .chain(upper.iter().map(|u| ("upper", u)));
        for (what, dir) in layers {
            if image_dev.is_none() || dev_of(dir) != image_dev {
                return Err(ApiFail(
                    ErrorKind::BadRequest,
                    format!(
                        "the overlay at {}: {what} {} is not on the filesystem of the image's trees at {}",
                        merged.display(),
                        dir.display(),
                        dest.display()
                    ),
                ));
            }
        }
        let img = self.images.lock().unwrap().get(&id).cloned();
        let Some(img) = img else {
            return Err(ApiFail(
                ErrorKind::UnknownImage,
                format!("the image at {} is being removed", dest.display()),
            ));
        };
        self.watch_overlay_of(id, &img, merged, &dest)
            .map_err(ApiFail::internal)?;
        // On record before the answer: a successor re-learns every overlay it must watch.
        // Only the overlay list: progress (a syncfs of the trees, the content cache) waits
        // for the next periodic record, never holding up a container's start.
        self.persist_overlays(&img);
        Ok(Response::Ok)
    }

    /// Watches the overlay at `merged`, over `img`'s layer trees at `dest`, and notes it in
    /// the image's record (idempotent).
    fn watch_overlay_of(
        &self,
        id: u64,
        img: &ImageRt,
        merged: &Path,
        dest: &Path,
    ) -> Result<(), crate::overlay::OverlayError> {
        let lower_dev = std::fs::metadata(dest).map(|m| m.dev()).map_err(|source| {
            crate::overlay::OverlayError::Stat {
                path: dest.to_path_buf(),
                source,
            }
        })?;
        let complete = self.image_complete(img);
        let mut watches = self.watches.lock().unwrap();
        let dev = if complete {
            // Nothing left to fill: the overlay is recorded, never marked.
            self.overlays.device_of(merged)?
        } else {
            self.overlays.watch(merged, lower_dev)?
        };
        if !watches.iter().any(|(_, m, d)| m == merged && *d == dev) {
            watches.retain(|(_, m, _)| m != merged);
            watches.push((id, merged.to_path_buf(), dev));
        }
        let mut rec = img.record.lock().unwrap();
        if !rec.overlays.iter().any(|m| m == merged) {
            rec.overlays.push(merged.to_path_buf());
        }
        if complete {
            info!(merged = %merged.display(), image = %dest.display(), "overlay rootfs over a complete image: no open watch");
        } else {
            info!(merged = %merged.display(), image = %dest.display(), "overlay rootfs watched");
        }
        Ok(())
    }

    /// Stops holding opens of the overlay at `merged` (about to be unmounted) and takes it
    /// off its image's record, so that a successor does not watch it again.
    fn unwatch_overlay(&self, merged: &Path) {
        let mut images = Vec::new();
        self.watches.lock().unwrap().retain(|(id, m, dev)| {
            if m != merged {
                return true;
            }
            self.overlays.unwatch(*dev);
            images.push(*id);
            false
        });
        for id in images {
            let img = self.images.lock().unwrap().get(&id).cloned();
            if let Some(img) = img {
                img.record.lock().unwrap().overlays.retain(|m| m != merged);
                self.persist_overlays(&img);
            }
        }
    }

    /// Re-learns the overlays a predecessor watched for `img` (the group taken over still
    /// marks them; a new group is marked again). An overlay no longer mounted there, or no
    /// longer over this image's trees, is dropped from the record.
    fn rewatch_overlays(&self, id: u64, img: &ImageRt) {
        let (recorded, dest) = {
            let rec = img.record.lock().unwrap();
            (rec.overlays.clone(), rec.dest.clone())
        };
        if recorded.is_empty() {
            return;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for merged in recorded {
            let over_ours = crate::hook::overlay_lowerdirs(&mountinfo, &merged)
                .is_some_and(|lowers| lowers.iter().all(|l| l.starts_with(&dest)));
            let res = if over_ours {
                self.watch_overlay_of(id, img, &merged, &dest)
                    .map_err(|e| error_chain(&e))
            } else {
                Err("no longer mounted over this image's layers".to_string())
            };
            if let Err(e) = res {
                info!(merged = %merged.display(), reason = %e, "overlay watch dropped");
                img.record.lock().unwrap().overlays.retain(|m| *m != merged);
            }
        }
    }

    /// Stops serving an image and deletes its tree: where the tree is now (found by
    /// identity, so a tree moved away is still removed and whatever now sits at the old path
    /// is never touched). Its files are forgotten, not unmarked, before they are deleted: a
    /// process that still holds one open gets `EIO`, never zeros, and the kernel drops each
    /// mark with its inode. A tree that cannot be found keeps its files unmarked instead.
    fn remove(&self, dest: &Path) -> Result<Response, ApiFail> {
        let (id, img) = self.find(dest)?;
        // An overlay over its layers still mounted would go on reading them, holes and all,
        // once the watch is gone: the overlay goes first.
        let mounted: Vec<PathBuf> = self
            .watches
            .lock()
            .unwrap()
            .iter()
            .filter(|(img_id, merged, dev)| {
                *img_id == id && nix::sys::stat::stat(merged).is_ok_and(|st| st.st_dev == *dev)
            })
            .map(|(_, merged, _)| merged.clone())
            .collect();
        if let Some(merged) = mounted.first() {
            return Err(ApiFail(
                ErrorKind::InUse,
                format!(
                    "the layers of the image at {} are mounted as the overlay at {}: unmount it first",
                    dest.display(),
                    merged.display()
                ),
            ));
        }
        if img.removed.swap(true, Ordering::SeqCst) {
            return Err(ApiFail(
                ErrorKind::UnknownImage,
                format!("the image at {} is already being removed", dest.display()),
            ));
        }
        self.watches.lock().unwrap().retain(|(img_id, _, dev)| {
            if *img_id == id {
                self.overlays.unwatch(*dev);
            }
            *img_id != id
        });
        img.prefetch.store(false, Ordering::SeqCst);
        let recorded = img.record.lock().unwrap().dest.clone();
        let location = img.tree.as_ref().and_then(|t| t.location(&recorded));
        for fid in img.files.iter().filter_map(ServedFile::id) {
            if location.is_some() {
                self.engine.forget(fid);
            } else if let Err(e) = self.engine.unregister(fid) {
                debug!(error = %error_chain(&e), "unregistering a removed image's file");
            }
        }
        self.images.lock().unwrap().remove(&id);
        {
            // A save in progress finishes first; later ones see `removed`.
            let _saving = img.saved.lock().unwrap();
            self.state.remove(id).map_err(ApiFail::internal)?;
        }
        match &location {
            Some(at) if img.tree.as_ref().is_some_and(|t| t.is_at(at)) => {
                image::remove_tree_contents(at);
                info!(dest = %recorded.display(), at = %at.display(), "image removed");
            }
            _ => warn!(dest = %recorded.display(), "image removed; its tree was gone"),
        }
        self.drop_kept_layers(&img);
        Ok(Response::Removed { dest: recorded })
    }

    /// Deletes the layer blobs kept for `img` (a removed image) that no image still served
    /// has, as containerd's garbage collector drops a removed image's blobs.
    fn drop_kept_layers(&self, img: &ImageRt) {
        let Some(dir) = PrepareOptions::new(&self.config.index_dir).blob_cache else {
            return;
        };
        let cache = crate::blobcache::BlobCache::new(dir);
        let layers = img.record.lock().unwrap().layers.clone();
        let images: Vec<Arc<ImageRt>> = self.images.lock().unwrap().values().cloned().collect();
        let in_use: std::collections::HashSet<String> = images
            .iter()
            .flat_map(|i| i.record.lock().unwrap().layers.clone())
            .collect();
        for layer in layers.iter().filter(|l| !in_use.contains(*l)) {
            match cache.remove(layer) {
                Ok(true) => debug!(layer, "kept layer blob deleted"),
                Ok(false) => {}
                Err(e) => warn!(layer, error = %e, "deleting a kept layer blob"),
            }
        }
    }

    /// Background prefetch of one image, pausing while any reader's miss is being served
    /// (on-demand first): each layer streamed once into its placeholders
    /// ([`image::stream_fill_layer`]), then whatever is still missing filled file by file
    /// from the files' sources, `prefetch_parallel` at a time. A pass that leaves files
    /// unfilled (full disk, registry down) is retried with a growing pause (0.5 s to 30 s)
    /// while prefetch stays on; files moved or deleted under the daemon are not retried
    /// (status reports them).
    fn start_prefetch(self: &Arc<Self>, img: &Arc<ImageRt>) {
        if img.prefetch_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let (this, img) = (self.clone(), img.clone());
        std::thread::spawn(move || {
            this.stream_layers(&img);
            let mut pause = Duration::from_millis(500);
            loop {
                let failed = this.prefetch_pass(&img);
                if failed == 0 || this.prefetch_stopped(&img) {
                    break;
                }
                debug!(
                    failed,
                    pause_ms = pause.as_millis() as u64,
                    "prefetch pass left files unfilled; retrying"
                );
                let until = Instant::now() + pause;
                while Instant::now() < until && !this.prefetch_stopped(&img) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                pause = (pause * 2).min(Duration::from_secs(30));
            }
            img.prefetch_running.store(false, Ordering::SeqCst);
            info!(dest = %img.record.lock().unwrap().dest.display(), "prefetch finished");
        });
    }

    /// Whether background work on `img` should stop.
    fn prefetch_stopped(&self, img: &ImageRt) -> bool {
        !img.prefetch.load(Ordering::SeqCst)
            || img.removed.load(Ordering::SeqCst)
            || self.stopping.load(Ordering::SeqCst)
    }

    /// Streams every layer with incomplete files into its placeholders, those readers touched
    /// first ([`image::ImageSources::stream_fill`]). Every [`STREAM_YIELD_EVERY`] bytes each stream
    /// yields to readers' misses being fetched (not those waiting for the stream), for at most
    /// [`STREAM_YIELD`]: a workload that misses without
    /// pause (a walk of the tree) would otherwise starve the one stream that makes all of
    /// its later misses local.
    fn stream_layers(&self, img: &ImageRt) {
        let Some(opened) = &img.opened else { return };
        self.hold_streams(img);
        let files: Vec<(usize, usize, FileId)> = {
            let rec = img.record.lock().unwrap();
            rec.files
                .iter()
                .zip(&img.files)
                .filter_map(|(f, served)| {
                    let (layer, entry) = f.key();
                    Some((layer, entry, served.id()?))
                })
                .collect()
        };
        thread_local! {
            /// This stream's bytes since its last yield (each layer streams on a thread).
            static SINCE_YIELD: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX / 2) };
        }
        let (streamed, mismatched) =
            opened
                .sources
                .stream_fill_checked(&self.engine, &files, |len| {
                    let due = SINCE_YIELD.with(|c| {
                        let n = c.get().saturating_add(len);
                        c.set(if n >= STREAM_YIELD_EVERY { 0 } else { n });
                        n >= STREAM_YIELD_EVERY
                    });
                    let yielded = Instant::now();
                    // Misses being fetched, not those waiting for a stream.
                    while due
                        && (self.engine.inflight_events() + self.overlays.inflight())
                            .saturating_sub(self.engine.waiting_for_delivery())
                            > 0
                        && yielded.elapsed() < STREAM_YIELD
                        && !self.prefetch_stopped(img)
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if self.prefetch_stopped(img) {
                        return false;
                    }
                    self.pace_prefetch(len);
                    true
                });
        if streamed.files > 0 {
            // The image's own store: its counter is the image's network traffic.
            img.counters
                .bytes_fetched
                .fetch_max(opened.store.bytes_fetched(), Ordering::Relaxed);
        }
        if let Some((layer, actual)) = mismatched.first() {
            self.mark_bad(
                img,
                format!("layer {layer} does not match its digest (its bytes hash to {actual})"),
            );
        }
    }

    /// Turns on read-around for the registered files of `record` (`files` at the same
    /// positions; [`image::ImageSources::read_around`], `--read-around-kib`) and returns
    /// them as (layer, entry) beside their engine ids.
    fn start_read_around(
        &self,
        opened: &Opened,
        record: &ImageRecord,
        files: &[ServedFile],
    ) -> (Vec<(usize, usize)>, Vec<FileId>) {
        let (placed, ids): (Vec<(usize, usize)>, Vec<FileId>) = record
            .files
            .iter()
            .zip(files)
            .filter_map(|(f, served)| Some((f.key(), served.id()?)))
            .unzip();
        opened.sources.read_around(
            self.engine.supplier(),
            self.config.read_around,
            &placed,
            &ids,
        );
        (placed, ids)
    }

    /// Holds the background streams of an image while a container starting on it misses:
    /// until readers have been quiet for [`STREAM_QUIET`] (no pre-content event, no open
    /// through a watched overlay, on any image), or for [`STREAM_FIRST_WAIT`] when none came
    /// at all, and never past [`STREAM_HOLD_MAX`] nor [`STREAM_HOLD_WALK`] misses and opens
    /// (a walk of the tree, which the streams serve at link speed). A start is a chain of
    /// small misses, one after the other; streams running beside it take the link and both
    /// cores from every one of them (large image, shaped link, first output: 2.25 s with
    /// the streams from the pull on, 1.65 s with none; held so, 1.85 s against
    /// stargz-snapshotter's 2.22 in the same run; `bench peer`; python: 1.37-1.46 s when
    /// they start after 12 opens, 0.82-0.94 s held). Held before they start, the streams
    /// have no [`crate::fill::Delivery`] a reader could wait for in vain.
    fn hold_streams(&self, img: &ImageRt) {
        let began = Instant::now();
        let activity = || self.engine.events_seen() + self.overlays.opens();
        let first = activity();
        let (mut last, mut changed, mut seen) = (first, began, false);
        while began.elapsed() < STREAM_HOLD_MAX && !self.prefetch_stopped(img) {
            let now = activity();
            if now != last {
                (last, changed, seen) = (now, Instant::now(), true);
            }
            if (seen && changed.elapsed() >= STREAM_QUIET)
                || (!seen && began.elapsed() >= STREAM_FIRST_WAIT)
                || now.saturating_sub(first) >= STREAM_HOLD_WALK
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        debug!(
            ms = began.elapsed().as_millis() as u64,
            readers = last.saturating_sub(first),
            "background streams start"
        );
    }

    /// Fails the image closed: every later read of it gets `EIO`. Its files are forgotten by
    /// the engine with their marks kept (unknown files are denied), and in direct mode the
    /// complete ones are marked again; prefetch stops; status and the log say why.
    fn mark_bad(&self, img: &ImageRt, why: String) {
        let (dest, mode, paths) = {
            let rec = img.record.lock().unwrap();
            let paths: Vec<Arc<Path>> = rec.files.iter().map(|f| f.path.clone()).collect();
            (rec.dest.clone(), rec.mode, paths)
        };
        tracing::error!(dest = %dest.display(), reason = %why, "image marked bad: every read gets EIO");
        *img.bad.lock().unwrap() = Some(why.clone());
        {
            // On record, after any save in progress (which would not know it): a successor
            // serves the image bad too.
            let _saving = img.saved.lock().unwrap();
            let rec = {
                let mut rec = img.record.lock().unwrap();
                rec.bad = Some(why);
                rec.clone()
            };
            if !img.removed.load(Ordering::SeqCst)
                && let Err(e) = self.state.save(&rec)
            {
                warn!(error = %error_chain(&e), "recording that the image is bad");
            }
        }
        img.prefetch.store(false, Ordering::SeqCst);
        for (path, served) in paths.iter().zip(&img.files) {
            let Some(fid) = served.id() else { continue };
            self.engine.forget(fid);
            if mode != LayoutMode::Direct {
                continue;
            }
            // The registered inode only (a FIFO put there never blocks the open).
            let f = std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path);
            if let Ok(f) = f
                && f.metadata()
                    .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == (fid.dev(), fid.ino()))
                && let Err(e) = self.engine.group().mark_inode(
                    std::os::fd::AsFd::as_fd(&f),
                    crate::sys::fanotify::FAN_PRE_ACCESS,
                )
            {
                warn!(path = %path.display(), error = %e, "cannot mark a file of a bad image");
            }
        }
        img.bad_fenced.store(true, Ordering::SeqCst);
    }

    /// One pass filling the image's incomplete files one by one from their sources, in
    /// prefetch order, `prefetch_parallel` at a time; returns how many files failed (moved
    /// or deleted ones not counted: they are recorded in their [`ServedFile::gone`]).
    fn prefetch_pass(&self, img: &ImageRt) -> usize {
        let next = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..self.config.prefetch_parallel.max(1) {
                s.spawn(|| {
                    loop {
                        if self.prefetch_stopped(img) {
                            break;
                        }
                        while self.engine.inflight_events() > 0
                            && !self.stopping.load(Ordering::SeqCst)
                        {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&i) = img.order.get(k) else { break };
                        let Some(served) = img.files.get(i as usize) else {
                            break;
                        };
                        let Some(fid) = served.id() else { continue };
                        if self.engine.is_complete(fid) || served.gone.load(Ordering::SeqCst) {
                            continue;
                        }
                        self.pace_prefetch(served.size);
                        match self.engine.fill_file(fid) {
                            Ok(()) => {}
                            Err(e) if e.is_gone() => {
                                debug!(error = %error_chain(&e), "prefetch: placeholder gone");
                                served.gone.store(true, Ordering::SeqCst);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                debug!(error = %error_chain(&e), "prefetch of a file failed");
                            }
                        }
                    }
                });
            }
        });
        failed.into_inner()
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
        let images: Vec<(u64, Arc<ImageRt>)> = self
            .images
            .lock()
            .unwrap()
            .iter()
            .map(|(id, img)| (*id, img.clone()))
            .collect();
        for (id, img) in images {
            self.persist_image(&img);
            self.release_complete_overlays(id, &img);
        }
    }

    /// Records a change of `img`'s watched overlays alone: the last saved record with the
    /// overlay list replaced. No progress is taken from the engine, so no `syncfs` is
    /// needed (the saved progress was synced when it was saved) and nothing enters the
    /// content cache: cheap enough for the path of a container's start, where a full
    /// [`Self::persist_image`] would wait for every byte a background stream wrote.
    fn persist_overlays(&self, img: &ImageRt) {
        if !recordable(img) {
            return;
        }
        let mut saved = img.saved.lock().unwrap();
        let Some(prev) = saved.as_ref() else {
            // Never recorded yet: the full record it is.
            drop(saved);
            self.persist_image(img);
            return;
        };
        let mut next = prev.clone();
        next.overlays = img.record.lock().unwrap().overlays.clone();
        if !recordable(img) || next == *prev {
            return;
        }
        match self.state.save(&next) {
            Ok(()) => *saved = Some(next),
            Err(e) => warn!(error = %error_chain(&e), "recording watched overlays"),
        }
    }

    /// Records one image's progress (and watched overlays) if it changed since it was last
    /// recorded, then offers its complete files to the content cache.
    fn persist_image(&self, img: &ImageRt) {
        if !recordable(img) {
            return;
        }
        let mut snapshot = {
            let mut rec = img.record.lock().unwrap();
            rec.prefetch = img.prefetch.load(Ordering::Relaxed);
            // Only progress that changed copies the file list (shared with `saved`).
            let changed: Vec<(usize, FileProgress)> = rec
                .files
                .iter()
                .zip(&img.files)
                .enumerate()
                .filter_map(|(i, (f, served))| {
                    let p = served.id().and_then(|id| self.engine.progress(id))?;
                    f.differs(p.chunk, &p.filled, p.complete).then_some((i, p))
                })
                .collect();
            if !changed.is_empty() {
                let files = Arc::make_mut(&mut rec.files);
                for (i, p) in changed {
                    files[i].set_filled(p.chunk, &p.filled, p.complete);
                }
            }
            rec.clone()
        };
        let mut saved = img.saved.lock().unwrap();
        if !recordable(img) {
            // Removed meanwhile: its record must not come back; found bad meanwhile: the
            // record saying so must stay.
            return;
        }
        // The overlay list as of now: a `persist_overlays` that saved after the snapshot
        // above was taken must not be undone by this older copy.
        snapshot.overlays = img.record.lock().unwrap().overlays.clone();
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
        // Complete files enter the content cache (only if their bytes are the image's), at
        // most `CACHE_ADD_PER_RECORD` bytes a record: each one is copied and hashed, and an
        // image completing in the background (1 GiB for the large bench image) would
        // otherwise be copied in one burst beside the start of its containers. The rest
        // enter at the next records.
        let mut budget = CACHE_ADD_PER_RECORD;
        for (f, served) in snapshot.files.iter().zip(&img.files) {
            if served.cached.load(Ordering::SeqCst) || !f.complete {
                continue;
            }
            if budget == 0 {
                break;
            }
            budget = budget.saturating_sub(served.size.max(1));
            served.cached.store(true, Ordering::SeqCst);
            // Read only through the inode the engine registered (never a path that
            // now leads elsewhere); files filled from the cache are in it already.
            // The digest is the index's (records do not keep a copy of it per file).
            let (layer, entry) = f.key();
            if let Some(sha) = img
                .opened
                .as_ref()
                .and_then(|o| o.sources.entry(layer, entry))
                .and_then(|e| e.sha256)
                && let Some(fid) = served.id()
                && !self.cache.contains(&sha)
                && !img.removed.load(Ordering::SeqCst)
            {
                match self.cache.add(&sha, &f.path, (fid.dev(), fid.ino())) {
                    Ok(true) => debug!(path = %f.path.display(), "added to the content cache"),
                    Ok(false) => {
                        warn!(path = %f.path.display(), "not cached: its bytes are not the image's")
                    }
                    Err(e) => warn!(error = %error_chain(&e), "adding to the content cache"),
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
                    .prepare(image, dest, mode, registry, prefetch, None)
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

/// A group of `class` kept in the fd holder's `slot`: taken back from a running holder
/// (`true`: taken over, with its marks and blocked events), or new, with a duplicate handed
/// to the holder (started if need be). A holder that predates the slot keeps nothing: the
/// group then fails open when this daemon dies, which is logged.
fn held_group(
    config: &DaemonConfig,
    holder_sock: &Path,
    slot: holder::Slot,
    class: GroupClass,
) -> Result<(Group, bool), DaemonError> {
    if let Some(fd) = holder::take(holder_sock, slot).or_else(|e| match e {
        holder::HolderError::Protocol { .. } => Ok(None),
        e => Err(e),
    })? {
        return Ok((Group::from_owned_fd(fd)?, true));
    }
    let g = Group::new(class)?;
    if let Some(exe) = &config.holder_exe {
        if !holder::is_running(holder_sock) {
            holder::spawn(exe, holder_sock)?;
        }
        let dup = g.try_clone_fd().map_err(|source| DaemonError::Io {
            what: "duplicating the group fd".into(),
            source,
        })?;
        match holder::put(holder_sock, slot, std::os::fd::AsFd::as_fd(&dup)) {
            Ok(()) => {}
            Err(holder::HolderError::Protocol { answer, .. }) => tracing::error!(
                ?slot,
                ?answer,
                "the running fd holder cannot keep this group (an older version?): restart it"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    Ok((g, false))
}

/// Denies (`EIO`) every stale event carrying a reserved number nothing is known about, then
/// releases every reserved number but the known in-flight events' ones: new events get low
/// numbers again (events read while the whole range was held get numbers above it, and a
/// crash with those unanswered would make the next successor reserve still higher).
fn deny_unknown_stale(groups: &[&Group], inflight: &[Inflight], reservation: &mut FdReservation) {
    let known: Vec<i32> = inflight.iter().map(|i| i.id.raw()).collect();
    let mut stale = 0;
    for n in reservation.numbers() {
        if known.contains(&n) {
            continue;
        }
        // Only the group that holds an event with this number accepts the answer (and
        // only a pre-content group takes a chosen errno: the others get a plain deny).
        for group in groups {
            let id = EventId::from_raw(n);
            if group
                .respond_id(id, FanResponse::Deny(DenyErrno::Io))
                .or_else(|_| group.respond_id(id, FanResponse::DenyPlain))
                .is_ok()
            {
                stale += 1;
            }
        }
    }
    reservation.release_except(&known);
    info!(
        unrecorded_denied = stale,
        held = known.len(),
        "stale event numbers answered; reservation released but for known events"
    );
}

/// Fills and answers the events a predecessor read and never answered (their numbers are
/// still reserved), then releases the rest of the reservation.
fn answer_inherited(
    daemon: &Arc<Daemon>,
    journal: &Arc<Journal>,
    inflight: Vec<Inflight>,
    reservation: FdReservation,
) {
    let started = Instant::now();
    std::thread::scope(|s| {
        for ev in &inflight {
            s.spawn(move || {
                let fid = FileId::new(ev.dev, ev.ino);
                let group = match ev.kind {
                    EventKind::Range => daemon.engine.group(),
                    EventKind::OverlayOpen => daemon.overlays.group(),
                };
                // A content-class group takes no chosen errno (`crate::overlay`).
                let refuse = |errno| match ev.kind {
                    EventKind::Range => FanResponse::Deny(errno),
                    EventKind::OverlayOpen => FanResponse::DenyPlain,
                };
                let response = if daemon.engine.progress(fid).is_none() {
                    warn!(event = %ev.id, "inherited event on a file not served; refused");
                    refuse(DenyErrno::Io)
                } else {
                    let fill = match ev.kind {
                        EventKind::Range => daemon.engine.fill_range(fid, ev.offset, ev.count),
                        // An open through a watched overlay: the lower file, whole.
                        EventKind::OverlayOpen => daemon.engine.fill_file(fid),
                    };
                    match fill {
                        Ok(()) => FanResponse::Allow,
                        Err(e) => {
                            warn!(event = %ev.id, error = %error_chain(&e), "inherited event: fill failed");
                            refuse(e.errno())
                        }
                    }
                };
                match group.respond_id(ev.id, response) {
                    Ok(()) => {
                        daemon.inherited_answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => debug!(event = %ev.id, error = %e, "inherited event already gone"),
                }
                journal.clear(ev.id);
            });
        }
    });
    drop(reservation);
    journal.release_floor();
    info!(
        answered = daemon.inherited_answered.load(Ordering::Relaxed),
        ms = started.elapsed().as_millis() as u64,
        "predecessor's in-flight events answered"
    );
}

/// Reads one request line of at most [`MAX_REQUEST_LINE`] bytes (without its `\n`).
/// `Ok(None)`: the client closed the connection; `Err`: the line is too long (the rest is
/// not read).
async fn read_request_line(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<Option<()>> {
    use tokio::io::AsyncBufReadExt;
    line.clear();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(()) });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REQUEST_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request line longer than {MAX_REQUEST_LINE} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(Some(()));
        }
    }
}

async fn serve_conn(daemon: Arc<Daemon>, stream: tokio::net::UnixStream, access: peer::Access) {
    use tokio::io::AsyncWriteExt;
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = Vec::new();
    loop {
        let (resp, close) = match read_request_line(&mut r, &mut line).await {
            Ok(None) => break,
            Ok(Some(())) => match Request::from_line(&line) {
                Ok(req) if access == peer::Access::ReadOnly && !req.is_read_only() => (
                    Response::Error {
                        kind: ErrorKind::PermissionDenied,
                        message: "permission denied: only root may change what the daemon serves"
                            .into(),
                    },
                    false,
                ),
                Ok(req) => (daemon.handle(req).await, false),
                Err(e) => (Response::bad_request(&e), false),
            },
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                warn!(error = %e, "API client sent an oversized request; dropping it");
                (
                    Response::Error {
                        kind: ErrorKind::BadRequest,
                        message: format!("bad request: {e}; connection closed"),
                    },
                    true,
                )
            }
            Err(_) => break,
        };
        if w.write_all(resp.to_line().as_bytes()).await.is_err() || close {
            break;
        }
    }
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    // Before anything allocates: large temporaries mapped apart from what placeholders keep.
    if !crate::sys::fix_mmap_threshold() {
        debug!("allocator's mmap threshold left as it is");
    }
    // The TLS library's one-time setup, off the first pull's path.
    crate::registry::warm_up();
    // 1. What a predecessor left in flight; reserve the numbers it may still be using.
    let state = StateDir::open(&config.state_dir)?;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| DaemonError::Io { what, source }
    };
    // State, cache, journal and the holder's socket: root's alone.
    std::fs::set_permissions(state.root(), std::fs::Permissions::from_mode(0o700))
        .map_err(io("making the state directory private"))?;
    let nofile = match crate::sys::fdpass::raise_nofile_limit() {
        Ok(n) => {
            debug!(nofile = n, "descriptor limit");
            n
        }
        Err(e) => {
            warn!(error = %e, "cannot raise the descriptor limit");
            1024
        }
    };
    let (journal, hwm, inflight) =
        Journal::open(&state.root().join("inflight")).map_err(io("opening the journal"))?;
    // The journal learns an event's number just after read(2) returned it: a crash in that
    // window leaves numbers up to one read buffer of events above the recorded highest.
    let reservation = if hwm >= 3 {
        // Never so many that the daemon cannot start (its readers would wait forever):
        // leave room for its own descriptors and new events.
        let cap = i32::try_from(nofile.saturating_sub(RESERVE_HEADROOM)).unwrap_or(i32::MAX);
        let want = hwm.saturating_add(RESERVE_MARGIN);
        if want > cap {
            tracing::error!(
                want,
                cap,
                "the predecessor's event numbers exceed the descriptor limit; reserving up to it"
            );
        }
        FdReservation::reserve(3, want.min(cap)).map_err(io("reserving event numbers"))?
    } else {
        FdReservation::default()
    };
    let journal = Arc::new(journal);
    // 2. The groups: from the holder, or new (and a duplicate handed to it).
    let holder_sock = state.root().join("holder.sock");
    let (group, took_over) = held_group(
        &config,
        &holder_sock,
        holder::Slot::PreContent,
        GroupClass::PreContent,
    )?;
    let (overlay_group, overlays_taken) = held_group(
        &config,
        &holder_sock,
        holder::Slot::OverlayWatch,
        GroupClass::Content,
    )?;
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
    // Reads nothing until step 5: opens through watched overlays wait in the kernel.
    let overlays = OverlayWatcher::with_group(
        &engine,
        overlay_group,
        Some(journal.clone() as Arc<dyn crate::fill::EventJournal>),
    );
    let records = state.load()?;
    // Trees a predecessor was still making when it died: never served, never left with
    // readable holes.
    let unfinished = state.unfinished_prepares();
    for (id, intent) in &unfinished {
        if !records.iter().any(|r| r.id == *id) {
            warn!(dest = %intent.dest.display(), "an image was being prepared when the daemon stopped; removing its partial tree");
            abandon_prepare(intent);
        }
        state.end_prepare(*id);
    }
    let next_id = records
        .iter()
        .map(|r| r.id)
        .chain(unfinished.iter().map(|u| u.0))
        .max()
        .unwrap_or(0)
        + 1;
    let cache = cache::Cache::open(&state.root().join("cache"))?;
    let own = OwnPlaces::new(state.root(), &config.index_dir, &config.socket);
    let mut config = config;
    config.allowed_roots = config
        .allowed_roots
        .iter()
        .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
        .collect();
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
        overlays,
        watches: Mutex::new(Vec::new()),
        claims: Mutex::new(Vec::new()),
        own,
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
        daemon.rewatch_overlays(id, &img);
        daemon.images.lock().unwrap().insert(id, img);
    }
    info!(
        images = daemon.images.lock().unwrap().len(),
        overlays = daemon.watches.lock().unwrap().len(),
        overlay_group_taken_over = overlays_taken,
        ms = t.elapsed().as_millis() as u64,
        "recorded images re-registered"
    );
    // 5. Serve.
    let mut reservation = reservation;
    deny_unknown_stale(
        &[daemon.engine.group(), daemon.overlays.group()],
        &inflight,
        &mut reservation,
    );
    daemon.engine.open_gate();
    daemon.overlays.start();
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
        peer::create_socket_dir(dir, config.status_group)
            .map_err(io("creating the socket directory"))?;
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
        let mode = if config.status_group.is_some() {
            0o660
        } else {
            0o600
        };
        let l = peer::bind(&config.socket, mode, config.status_group).map_err(sock_err)?;
        l.set_nonblocking(true).map_err(sock_err)?;
        let _g = rt.enter();
        tokio::net::UnixListener::from_std(l).map_err(sock_err)?
    };
    if let Some(addr) = config.metrics_addr {
        let _g = rt.enter();
        let l = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(io("binding the metrics address"))?;
        let d = daemon.clone();
        rt.spawn(metrics::serve(l, Arc::new(move || d.metrics())));
        info!(%addr, "Prometheus metrics served");
    }
    if let Some(sock) = &config.containerd_socket {
        let _g = rt.enter();
        containerd::start(&daemon, sock)?;
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
                    Ok((s, _)) => match peer::peer(&s).map(|p| (p, peer::api_access(&p, d.config.status_group))) {
                        Ok((_, Some(access))) => { tokio::spawn(serve_conn(d.clone(), s, access)); }
                        Ok((p, None)) => warn!(uid = p.uid, pid = p.pid, "API connection refused: not root nor in the status group"),
                        Err(e) => warn!(error = %e, "API connection refused: no peer credentials"),
                    },
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
    // Opens not read yet wait in the kernel for the successor; those read are answered
    // here, or, past the deadline, by the successor from the journal.
    daemon.overlays.stop();
    // Events still in flight are journaled: the successor answers them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.engine.inflight_events() + daemon.overlays.inflight() > 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    // What those fills completed is on record too: the successor does not fetch it again.
    daemon.persist();
    Ok(())
}

/// Sends `req` to the daemon at `socket` (one connection per call).
pub fn call(socket: &Path, req: &Request) -> Result<Response, crate::api::ApiError> {
    crate::api::Client::connect(socket)?.call(req)
}
