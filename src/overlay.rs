//! Overlay rootfs: whole-file fill when a container opens a file through overlayfs.
//!
//! Owns the open-time watch on overlay mounts whose lower directories are placeholder trees.
//! Range fills cannot serve an overlay rootfs (a lower file under a pre-content watch reads
//! as EPERM through overlay, and mmap/exec through overlay raise no pre-content event:
//! `docs/kernel.md`), so the lower placeholders are registered *unmarked*
//! ([`Engine::register_unmarked`]) and one content-class group with
//! `FAN_OPEN_PERM|FAN_OPEN_EXEC_PERM` marks on the superblocks of the watched overlays holds
//! every open until the lower file is completely filled, then allows it. Exec, mmap and
//! copy-up (a write open copies the lower file up) therefore all see the full original file.
//! The overlay file reports the lower inode's number when all layers share one filesystem;
//! its device number says which watched overlay (and so which lower filesystem) it is on.
//!
//! The group is one fd for every overlay, so a daemon can hand it to its fd holder like the
//! pre-content group: while the group lives, an open that nobody answers stays blocked in
//! the kernel (a dead daemon never lets an opener read holes), and a successor takes the
//! group back, re-learns its overlays ([`OverlayWatcher::watch`] is idempotent), and answers
//! the opens its predecessor read, by number, from the journal ([`EventJournal::begin_open`]).
//! Events are not read before [`OverlayWatcher::start`]: they wait in the kernel until the
//! files are registered.
//!
//! A refused open fails with `EPERM`, not `EIO`: the kernel takes a chosen errno
//! (`FAN_DENY_ERRNO`) only from pre-content groups and refuses the answer from this class,
//! which would leave the opener blocked; a plain `FAN_DENY` is what remains. It never
//! unpacks, fetches or writes file data itself (the engine does, on its runtime: only an
//! open that needs no fill is answered on the watcher's own thread), and never marks
//! anything but the overlay mounts it is given.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::stat::fstat;
use tracing::{debug, info, warn};

use crate::fill::{
    CompleteOpener, Engine, EventJournal, FileId, Filler, LatencyHistogram, error_chain,
};
use crate::sys::fanotify::{
    Event, EventReader, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, FanotifyError, Group, GroupClass,
    Response,
};

/// Errors of the overlay watch.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The mount point could not be inspected.
    #[error("inspecting {path}")]
    Stat {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path is not an overlay mount.
    #[error("{path} is not an overlayfs mount (found {fstype})")]
    NotOverlay {
        /// The path.
        path: PathBuf,
        /// What filesystem it is on.
        fstype: String,
    },
    /// The fanotify group or mark failed.
    #[error(transparent)]
    Fanotify(#[from] FanotifyError),
}

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// The events of the watched overlays' superblocks.
const OPEN_MASK: u64 = FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM;

/// How long the event thread waits for events before it looks at `stopping` again.
const EVENT_WAIT_MS: u16 = 50;

/// One watched overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// Its mount point when it was watched.
    pub merged: PathBuf,
    /// Device number of the filesystem its lower placeholders are on.
    pub lower_dev: u64,
}

struct Inner {
    group: Arc<Group>,
    filler: Filler,
    /// Fills ahead of the loader ([`loader_ahead`]): not counted as accessed.
    prefetcher: Filler,
    opener: CompleteOpener,
    /// Lower files whose ELF dependencies were looked at (each once), and those filled
    /// ahead (each started once).
    parsed: Mutex<(HashSet<FileId>, HashSet<FileId>)>,
    /// Files the loader-aware read-ahead asked to fill.
    loader_ahead: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// The engine's [`crate::fill::EngineConfig::event_spin`].
    event_spin: Duration,
    journal: Option<Arc<dyn EventJournal>>,
    /// Watched overlays by the device number of their superblock.
    watched: RwLock<HashMap<u64, Watched>>,
    opens: AtomicU64,
    inflight: AtomicU64,
    /// Microseconds opens were held, summed over every answered open, and the longest.
    held_us: AtomicU64,
    held_max_us: AtomicU64,
    /// How long each answered open was held.
    held_times: LatencyHistogram,
    stopping: AtomicBool,
}

/// The open watch of every overlay rootfs one engine serves: one content-class group, one
/// event thread. Dropping it stops reading events; the group closes with its last fd (opens
/// are then no longer held: keep a duplicate, [`OverlayWatcher::group`], in an fd holder, or
/// drop it only after the containers are gone).
pub struct OverlayWatcher {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl OverlayWatcher {
    /// A watcher on a new group, serving `engine`'s placeholders.
    pub fn create(engine: &Engine) -> Result<OverlayWatcher, OverlayError> {
        Ok(OverlayWatcher::with_group(
            engine,
            Group::new(GroupClass::Content)?,
            None,
        ))
    }

    /// A running watcher of one overlay (a new group): what a process that serves one
    /// container without a daemon uses.
    pub fn start_on(
        engine: &Engine,
        merged: &Path,
        lower_dev: u64,
    ) -> Result<OverlayWatcher, OverlayError> {
        let w = OverlayWatcher::create(engine)?;
        w.watch(merged, lower_dev)?;
        w.start();
        Ok(w)
    }

    /// A watcher on `group` (a content-class group, new or taken over from a predecessor
    /// with its marks), recording the opens it reads and has not answered yet in `journal`.
    /// Reads nothing before [`OverlayWatcher::start`].
    pub fn with_group(
        engine: &Engine,
        group: Group,
        journal: Option<Arc<dyn EventJournal>>,
    ) -> OverlayWatcher {
        OverlayWatcher {
            inner: Arc::new(Inner {
                group: Arc::new(group),
                filler: engine.filler(),
                prefetcher: engine.prefetcher(),
                opener: engine.complete_opener(),
                parsed: Mutex::new((HashSet::new(), HashSet::new())),
                loader_ahead: AtomicU64::new(0),
                runtime: engine.handle(),
                event_spin: engine.event_spin(),
                journal,
                watched: RwLock::new(HashMap::new()),
                opens: AtomicU64::new(0),
                held_us: AtomicU64::new(0),
                held_max_us: AtomicU64::new(0),
                held_times: LatencyHistogram::default(),
                inflight: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
            }),
            thread: Mutex::new(None),
        }
    }

    /// The group (to hand a duplicate of it to an fd holder, or to answer a predecessor's
    /// events by number).
    pub fn group(&self) -> &Group {
        &self.inner.group
    }

    /// Starts holding opens of `merged` (an overlay mount) until the lower file, a
    /// placeholder on the filesystem whose device number is `lower_dev`, is filled. Watching
    /// an overlay again (after a takeover, say) is harmless. Returns the overlay's device
    /// number.
    pub fn watch(&self, merged: &Path, lower_dev: u64) -> Result<u64, OverlayError> {
        let dev = self.device_of(merged)?;
        // Known before the mark exists: an open between the two finds its overlay.
        self.inner.watched.write().unwrap().insert(
            dev,
            Watched {
                merged: merged.to_path_buf(),
                lower_dev,
            },
        );
        if let Err(e) = self.inner.group.mark_filesystem(merged, OPEN_MASK) {
            self.inner.watched.write().unwrap().remove(&dev);
            return Err(e.into());
        }
        info!(merged = %merged.display(), dev, "overlay open watch on");
        Ok(dev)
    }

    /// The device number of the overlay mounted at `merged` (an error if it is not one).
    pub fn device_of(&self, merged: &Path) -> Result<u64, OverlayError> {
        let stat_err = |source: std::io::Error| OverlayError::Stat {
            path: merged.to_path_buf(),
            source,
        };
        let fs = nix::sys::statfs::statfs(merged).map_err(|e| stat_err(e.into()))?;
        let magic = fs.filesystem_type().0 as i64;
        if magic != OVERLAYFS_SUPER_MAGIC {
            return Err(OverlayError::NotOverlay {
                path: merged.to_path_buf(),
                fstype: format!("{magic:#x}"),
            });
        }
        Ok(nix::sys::stat::stat(merged)
            .map_err(|e| stat_err(e.into()))?
            .st_dev)
    }

    /// Whether the overlay whose device number is `dev` is watched now.
    pub fn is_watched(&self, dev: u64) -> bool {
        self.inner.watched.read().unwrap().contains_key(&dev)
    }

    /// Stops holding opens of the overlay whose device number is `dev` (its mark is removed
    /// if it is still mounted where it was watched; an unmounted overlay took its mark with
    /// it).
    pub fn unwatch(&self, dev: u64) {
        let Some(w) = self.inner.watched.write().unwrap().remove(&dev) else {
            return;
        };
        let still_there = nix::sys::stat::stat(&w.merged).is_ok_and(|st| st.st_dev == dev);
        if still_there && let Err(e) = self.inner.group.unmark_filesystem(&w.merged, OPEN_MASK) {
            debug!(merged = %w.merged.display(), error = %e, "removing an overlay watch");
        }
        info!(merged = %w.merged.display(), "overlay open watch off");
    }

    /// The overlays watched now.
    pub fn watched(&self) -> Vec<(u64, Watched)> {
        let w = self.inner.watched.read().unwrap();
        w.iter().map(|(d, w)| (*d, w.clone())).collect()
    }

    /// Starts reading and answering open events (on a thread of its own). Call it once the
    /// lower placeholders are registered with the engine and the overlays are watched.
    pub fn start(&self) {
        let mut t = self.thread.lock().unwrap();
        if t.is_none() {
            let inner = self.inner.clone();
            *t = Some(
                std::thread::Builder::new()
                    .name("fanfill-overlay".into())
                    .spawn(move || event_thread(inner))
                    .expect("spawning the overlay event thread"),
            );
        }
    }

    /// Opens held and answered so far.
    pub fn opens(&self) -> u64 {
        self.inner.opens.load(Ordering::Relaxed)
    }

    /// Opens read and not answered yet.
    pub fn inflight(&self) -> u64 {
        self.inner.inflight.load(Ordering::SeqCst)
    }

    /// Files the loader-aware read-ahead asked to fill (each once; those complete already
    /// cost nothing): interpreters and libraries named by ELF files opened through the
    /// watched overlays.
    pub fn loader_ahead(&self) -> u64 {
        self.inner.loader_ahead.load(Ordering::Relaxed)
    }

    /// How long answered opens were held, summed, and the longest one: from the event read
    /// to its answer (the fill of the lower file, and the answer itself).
    pub fn held(&self) -> (Duration, Duration) {
        (
            Duration::from_micros(self.inner.held_us.load(Ordering::Relaxed)),
            Duration::from_micros(self.inner.held_max_us.load(Ordering::Relaxed)),
        )
    }

    /// How long answered opens were held, per log2 bucket of microseconds
    /// ([`LatencyHistogram`]), for a metrics histogram.
    pub fn held_histogram(&self) -> Vec<u64> {
        self.inner.held_times.buckets()
    }
}

impl OverlayWatcher {
    /// Stops reading events (those not read yet wait in the kernel for whoever serves the
    /// group next); opens already read are still answered.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        debug!("overlay open watch stopped");
    }
}

impl Drop for OverlayWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn event_thread(inner: Arc<Inner>) {
    // Opens of files that need no fill are answered right here (`serve_here_or_spawn`);
    // the rest go to the engine's runtime.
    let _runtime = inner.runtime.enter();
    crate::fill::become_event_thread();
    let mut reader = EventReader::new(inner.event_spin);
    let mut events = Vec::new();
    while !inner.stopping.load(Ordering::SeqCst) {
        if let Err(e) = reader.next(&inner.group, &mut events, EVENT_WAIT_MS) {
            warn!(error = %e, "reading overlay open events");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut at_once = false;
        for event in events.drain(..) {
            at_once |= dispatch(&inner, event);
        }
        reader.answered_at_once(at_once);
    }
}

/// Serves one open; returns whether it was answered here and now.
fn dispatch(inner: &Arc<Inner>, event: Event) -> bool {
    if !event.needs_response() {
        return false;
    }
    if let Some(j) = &inner.journal {
        j.seen(event.id());
    }
    // Directories, devices and empty files pass at once.
    let target = event
        .file()
        .and_then(|fd| nix::sys::stat::fstat(fd).ok())
        .filter(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFREG && st.st_size > 0);
    let Some(st) = target else {
        answer(inner, event, Response::Allow, false);
        return true;
    };
    let lower_dev = inner
        .watched
        .read()
        .unwrap()
        .get(&st.st_dev)
        .map(|w| w.lower_dev);
    let Some(lower_dev) = lower_dev else {
        // Marked by this group, yet no overlay of ours: a watch a predecessor added and
        // nobody re-learned. Its lower files may be holes: refuse rather than guess.
        warn!(
            dev = st.st_dev,
            ino = st.st_ino,
            "open on an overlay this daemon does not know; refused (EPERM)"
        );
        answer(inner, event, Response::DenyPlain, false);
        return true;
    };
    let lower = FileId::new(lower_dev, st.st_ino);
    if let Some(j) = &inner.journal {
        j.begin_open(event.id(), lower);
    }
    inner.opens.fetch_add(1, Ordering::Relaxed);
    inner.inflight.fetch_add(1, Ordering::SeqCst);
    let began = Instant::now();
    let fut = (inner.filler)(lower);
    let inner2 = inner.clone();
    let task = async move {
        let filled = match fut.await {
            Ok(()) => true,
            Err(e) => {
                warn!(ino = st.st_ino, error = %error_chain(&*e), "overlay open: fill failed; refused (EPERM)");
                false
            }
        };
        let response = if filled {
            Response::Allow
        } else {
            Response::DenyPlain
        };
        answer(&inner2, event, response, true);
        // After the answer: the opener goes on while the read-ahead is handed out.
        if filled {
            loader_ahead(&inner2, lower, st.st_dev, 0);
        }
        let took = began.elapsed();
        inner2.held_times.record(took);
        let held = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        inner2.held_us.fetch_add(held, Ordering::Relaxed);
        inner2.held_max_us.fetch_max(held, Ordering::Relaxed);
        inner2.inflight.fetch_sub(1, Ordering::SeqCst);
        debug!(ino = st.st_ino, us = held, "overlay open answered");
    };
    crate::fill::serve_here_or_spawn(&inner.runtime, Box::pin(task))
}

/// Deepest chain of libraries [`loader_ahead`] follows from an opened file.
const LOADER_DEPTH: u32 = 8;
/// Files [`loader_ahead`] remembers having looked at before it starts over.
const LOADER_PARSED_MAX: usize = 100_000;

/// Loader-aware read-ahead (`crate::loader`): `file`, a complete lower file just opened
/// through the overlay `ovl_dev`, is read for the interpreter and libraries the dynamic
/// loader will open next; those found in the overlay are filled at once, side by side, and
/// looked at in turn once filled (`libssl` names `libcrypto`), instead of each being filled
/// only when the loader opens it, one after the other. Runs on the blocking pool, spawned
/// right after the open is answered; a file is looked at once.
fn loader_ahead(inner: &Arc<Inner>, file: FileId, ovl_dev: u64, depth: u32) {
    {
        let mut parsed = inner.parsed.lock().unwrap();
        if depth > LOADER_DEPTH || inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        if parsed.0.len() + parsed.1.len() >= LOADER_PARSED_MAX {
            parsed.0.clear();
            parsed.1.clear();
        }
        if !parsed.0.insert(file) {
            return;
        }
    }
    let inner = inner.clone();
    let runtime = inner.runtime.clone();
    runtime.spawn_blocking(move || {
        let Some(deps) = (inner.opener)(file).and_then(|f| crate::loader::Deps::read(&f)) else {
            return;
        };
        let Some(w) = inner.watched.read().unwrap().get(&ovl_dev).cloned() else {
            return;
        };
        // The overlay's root, as watched (`O_PATH`: no open event), for the loader's lookups.
        let Ok(root) = nix::fcntl::open(
            &w.merged,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) else {
            return;
        };
        if fstat(root.as_fd()).map(|st| st.st_dev) != Ok(ovl_dev) {
            return;
        }
        let found = crate::loader::resolve(root.as_fd(), &deps.candidates());
        for f in found.into_iter().filter(|f| f.dev == ovl_dev) {
            let id = FileId::new(w.lower_dev, f.ino);
            let new = {
                let mut parsed = inner.parsed.lock().unwrap();
                !parsed.0.contains(&id) && parsed.1.insert(id)
            };
            if !new {
                continue;
            }
            inner.loader_ahead.fetch_add(1, Ordering::Relaxed);
            let fill = (inner.prefetcher)(id);
            let inner2 = inner.clone();
            inner.runtime.spawn(async move {
                match fill.await {
                    Ok(()) => loader_ahead(&inner2, id, ovl_dev, depth + 1),
                    Err(e) => {
                        let error = error_chain(&*e);
                        debug!(ino = f.ino, %error, "loader read-ahead fill failed");
                    }
                }
            });
        }
        debug!(ino = file.ino(), interp = ?deps.interp, needed = ?deps.needed, "loader read-ahead");
    });
}

fn answer(inner: &Inner, event: Event, response: Response, journaled: bool) {
    let id = event.id();
    if let Err(e) = inner.group.respond(event, response) {
        warn!(error = %e, "answering overlay open");
    }
    if journaled && let Some(j) = &inner.journal {
        j.end(id);
    }
}
