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
use crate::snapshotter::{Host, ImageLayers, PreparingImage, Snapshotter, grpc, layer_tree};

struct DaemonHost(Arc<Daemon>);

impl Host for DaemonHost {
    fn prepare_image<'a>(
        &'a self,
        reference: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<PreparingImage, String>> {
        async move {
            let (known, layers_known) = tokio::sync::oneshot::channel();
            let (daemon, reference, into) =
                (self.0.clone(), reference.to_string(), dest.to_path_buf());
            // Runs to its end whatever becomes of the caller: a prepare cut short would
            // leave the trees half made.
            let prepare = tokio::spawn(async move {
                let registry = daemon.config.containerd_registry.clone();
                let st = daemon
                    .prepare(
                        reference.clone(),
                        into,
                        LayoutMode::Overlay,
                        registry,
                        daemon.config.containerd_prefetch,
                        Some(known),
                    )
                    .await
                    .map_err(|ApiFail(_, m)| m)?;
                made_layers(&daemon, st.id, &reference)
            });
            let ended = |e: tokio::task::JoinError| format!("the prepare stopped: {e}");
            match layers_known.await {
                Ok((manifest_digest, layers)) => Ok(PreparingImage {
                    manifest_digest,
                    layers,
                    ready: async move { prepare.await.map_err(ended)? }.boxed(),
                }),
                // Failed before its layers were known.
                Err(_) => Err(match prepare.await {
                    Ok(Err(e)) => e,
                    Ok(Ok(_)) => "the prepare ended without naming its layers".to_string(),
                    Err(e) => ended(e),
                }),
            }
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

/// The layers of the image `id` as its prepare made them: a layer hidden by an opaque
/// layer above has no tree.
fn made_layers(daemon: &Daemon, id: u64, reference: &str) -> Result<ImageLayers, String> {
    let img = daemon
        .images
        .lock()
        .unwrap()
        .get(&id)
        .cloned()
        .ok_or_else(|| format!("{reference} was removed while it was prepared"))?;
    let rec = img.record.lock().unwrap();
    Ok(rec
        .layers
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let dir = layer_tree(&rec.dest, i, d);
            (d.clone(), dir.is_dir().then_some(dir))
        })
        .collect())
}

/// Opens the snapshotter on the daemon's state dir and serves it on `socket` (on the
/// current runtime). Call once every recorded image is re-served.
pub(super) fn start(daemon: &Arc<Daemon>, socket: &Path) -> Result<(), DaemonError> {
    let sn = Snapshotter::open(daemon.state.root(), Arc::new(DaemonHost(daemon.clone())))?;
    grpc::serve(socket, sn)?;
    Ok(())
}
