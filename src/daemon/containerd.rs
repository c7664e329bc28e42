//! The daemon's side of the containerd snapshotter ([`crate::snapshotter`]): the
//! [`Host`] it needs, on this daemon's one engine, image records and overlay watches.
//!
//! Owns only the adapter: a lazy image is an ordinary overlay-mode image of the daemon
//! (prepared, recorded, re-served after a restart and removed like one prepared through the
//! API), container rootfs watches go through [`Daemon::watch_overlay`]. It must not keep
//! state of its own.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::{ApiFail, Daemon, DaemonError};
use crate::api::LayoutMode;
use crate::snapshotter::{Host, ImageLayers, Snapshotter, grpc};

struct DaemonHost(Arc<Daemon>);

impl Host for DaemonHost {
    fn prepare_image<'a>(
        &'a self,
        reference: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ImageLayers, String>> {
        async move {
            let registry = self.0.config.containerd_registry.clone();
            let st = self
                .0
                .prepare(
                    reference.to_string(),
                    dest.to_path_buf(),
                    LayoutMode::Overlay,
                    registry,
                    self.0.config.containerd_prefetch,
                )
                .await
                .map_err(|ApiFail(_, m)| m)?;
            let img = self
                .0
                .images
                .lock()
                .unwrap()
                .get(&st.id)
                .cloned()
                .ok_or_else(|| format!("{reference} was removed while it was prepared"))?;
            let rec = img.record.lock().unwrap();
            Ok(rec
                .layers
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let dir = rec
                        .dest
                        .join("layers")
                        .join(crate::unpack::layer_dir_name(i, d));
                    (d.clone(), dir.is_dir().then_some(dir))
                })
                .collect())
        }
        .boxed()
    }

    fn serves(&self, dest: &Path) -> bool {
        self.0
            .find(dest)
            .is_ok_and(|(_, img)| img.error.is_none() && !img.removed.load(Ordering::SeqCst))
    }

    fn watch_overlay(&self, merged: &Path) -> Result<(), String> {
        self.0
            .watch_overlay(merged)
            .map(|_| ())
            .map_err(|ApiFail(_, m)| m)
    }

    fn unwatch_overlay(&self, merged: &Path) {
        self.0.unwatch_overlay(merged);
    }

    fn remove_image(&self, dest: &Path) -> Result<(), String> {
        self.0.remove(dest).map(|_| ()).map_err(|ApiFail(_, m)| m)
    }
}

/// Opens the snapshotter on the daemon's state dir and serves it on `socket` (on the
/// current runtime). Call once every recorded image is re-served.
pub(super) fn start(daemon: &Arc<Daemon>, socket: &Path) -> Result<(), DaemonError> {
    let sn = Snapshotter::open(daemon.state.root(), Arc::new(DaemonHost(daemon.clone())))?;
    grpc::serve(socket, sn)?;
    Ok(())
}
