//! Overlay rootfs: whole-file fill when a container opens a file through overlayfs.
//!
//! Owns the open-time watch on an overlay mount whose lower directories are placeholder
//! trees. Range fills cannot serve an overlay rootfs (a lower file under a pre-content watch
//! reads as EPERM through overlay, and mmap/exec through overlay raise no pre-content event:
//! `docs/kernel.md`), so the lower placeholders are registered *unmarked*
//! ([`Engine::register_unmarked`]) and a content-class group with
//! `FAN_OPEN_PERM|FAN_OPEN_EXEC_PERM` on the overlay's superblock holds every open until the
//! lower file is completely filled, then allows it. Exec, mmap and copy-up (a write open
//! copies the lower file up) therefore all see the full original file. The overlay file
//! reports the lower inode's number when all layers share one filesystem, which is how an
//! event finds its placeholder. It never unpacks, fetches or writes file data itself (the
//! engine does), and never marks anything but the overlay mount it is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info, warn};

use crate::fill::{Engine, FileId, Filler, error_chain};
use crate::sys::fanotify::{
    AsyncGroup, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, FanotifyError, Group, GroupClass, Response,
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

/// A running open watch on one overlay mount. Dropping it stops the watch (opens are no
/// longer held: drop it only after the container is gone).
pub struct OverlayWatch {
    task: tokio::task::JoinHandle<()>,
    opens: Arc<AtomicU64>,
    merged: PathBuf,
}

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

impl OverlayWatch {
    /// Starts holding opens of `merged` (an overlay mount) until the lower file, a
    /// placeholder on the filesystem whose device number is `lower_dev`, is filled.
    pub fn start(
        engine: &Engine,
        merged: &Path,
        lower_dev: u64,
    ) -> Result<OverlayWatch, OverlayError> {
        let fs = nix::sys::statfs::statfs(merged).map_err(|e| OverlayError::Stat {
            path: merged.to_path_buf(),
            source: e.into(),
        })?;
        let magic = fs.filesystem_type().0 as i64;
        if magic != OVERLAYFS_SUPER_MAGIC {
            return Err(OverlayError::NotOverlay {
                path: merged.to_path_buf(),
                fstype: format!("{magic:#x}"),
            });
        }
        let group = Arc::new(Group::new(GroupClass::Content)?);
        group.mark_filesystem(merged, FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM)?;
        let handle = engine.handle();
        let agroup = {
            let _g = handle.enter();
            AsyncGroup::new(group.clone()).map_err(|e| OverlayError::Stat {
                path: merged.to_path_buf(),
                source: e,
            })?
        };
        let opens = Arc::new(AtomicU64::new(0));
        let task = handle.spawn(watch_loop(
            engine.filler(),
            agroup,
            group,
            lower_dev,
            opens.clone(),
        ));
        info!(merged = %merged.display(), "overlay open watch started");
        Ok(OverlayWatch {
            task,
            opens,
            merged: merged.to_path_buf(),
        })
    }

    /// Opens held and answered so far.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }
}

impl Drop for OverlayWatch {
    fn drop(&mut self) {
        self.task.abort();
        debug!(merged = %self.merged.display(), "overlay open watch stopped");
    }
}

async fn watch_loop(
    fill: Filler,
    agroup: AsyncGroup,
    group: Arc<Group>,
    lower_dev: u64,
    opens: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut events = Vec::new();
    loop {
        if let Err(e) = agroup.read_events(&mut buf, &mut events).await {
            warn!(error = %e, "reading overlay open events");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        for event in events.drain(..) {
            if !event.needs_response() {
                continue;
            }
            // Directories, devices, empty files and files that are not ours pass at once.
            let target = event
                .file()
                .and_then(|fd| nix::sys::stat::fstat(fd).ok())
                .filter(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFREG && st.st_size > 0);
            let Some(st) = target else {
                answer(&group, event, Response::Allow);
                continue;
            };
            opens.fetch_add(1, Ordering::Relaxed);
            let fut = fill(FileId::new(lower_dev, st.st_ino));
            let group = group.clone();
            tokio::spawn(async move {
                let response = match fut.await {
                    Ok(()) => Response::Allow,
                    Err(e) => {
                        warn!(ino = st.st_ino, error = %error_chain(&*e), "overlay open: fill failed; denying");
                        Response::Deny(e.errno())
                    }
                };
                answer(&group, event, response);
            });
        }
    }
}

fn answer(group: &Group, event: crate::sys::fanotify::Event, response: Response) {
    if let Err(e) = group.respond(event, response) {
        warn!(error = %e, "answering overlay open");
    }
}
