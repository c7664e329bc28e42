//! The OCI runtime hook: what a `createRuntime` (or the deprecated `prestart`) hook learns
//! about a container, and what it must ask the daemon for.
//!
//! Owns reading the hook's input (the OCI state JSON on stdin, the bundle's `config.json`),
//! finding the container's rootfs and the `org.fanfill.image` annotation, and recognising an
//! overlay rootfs from the mount table (its mount point, its `lowerdir=` list). It decides
//! nothing about images and never touches fanotify: the daemon serves, the hook only tells
//! it which tree a container is about to use, before the container's process runs. It must
//! be quick (it runs on every container start) and fail loudly: a container must never
//! start on a tree nobody serves.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The annotation naming the image a container's rootfs is prepared from.
pub const IMAGE_ANNOTATION: &str = "org.fanfill.image";

/// Errors of the hook's input side.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The state JSON on stdin did not parse.
    #[error("the OCI state on stdin is not valid JSON")]
    State(#[source] serde_json::Error),
    /// The bundle's config could not be read.
    #[error("reading {path}")]
    Config {
        /// The config path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bundle's config did not parse.
    #[error("{path} is not a valid OCI runtime config")]
    ConfigJson {
        /// The config path.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The config has no `root.path`.
    #[error("{path} has no root.path")]
    NoRoot {
        /// The config path.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
struct State {
    id: String,
    bundle: PathBuf,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct Config {
    root: Option<Root>,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct Root {
    path: PathBuf,
}

/// What the hook found out about the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The container id.
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The rootfs, absolute.
    pub rootfs: PathBuf,
    /// The `org.fanfill.image` annotation (state annotations first, then the config's).
    pub image: Option<String>,
    /// If the rootfs is an overlayfs mount: its lower directories, top first.
    pub overlay_lowerdirs: Option<Vec<PathBuf>>,
}

/// Reads the state JSON (`stdin` of the hook) and the bundle's config.
pub fn inspect(state_json: &[u8]) -> Result<Container, HookError> {
    let state: State = serde_json::from_slice(state_json).map_err(HookError::State)?;
    let path = state.bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| HookError::Config {
        path: path.clone(),
        source,
    })?;
    let config: Config =
        serde_json::from_slice(&bytes).map_err(|source| HookError::ConfigJson {
            path: path.clone(),
            source,
        })?;
    let root = config
        .root
        .ok_or(HookError::NoRoot { path: path.clone() })?;
    let rootfs = if root.path.is_absolute() {
        root.path
    } else {
        state.bundle.join(root.path)
    };
    let image = state
        .annotations
        .get(IMAGE_ANNOTATION)
        .or_else(|| config.annotations.get(IMAGE_ANNOTATION))
        .cloned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let overlay_lowerdirs = overlay_lowerdirs(&mountinfo, &rootfs);
    Ok(Container {
        id: state.id,
        bundle: state.bundle,
        rootfs,
        image,
        overlay_lowerdirs,
    })
}

/// Unescapes a mountinfo field (`\040` for space, `\011` tab, `\012` newline, `\134`).
pub(crate) fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok());
        if b[i] == b'\\'
            && let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a `lowerdir=` value on unescaped `:` (overlayfs escapes `:` and `\` with `\`).
fn split_lowerdir(v: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => out.push(PathBuf::from(std::mem::take(&mut cur))),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}

/// The super options of the overlayfs mounted at `mount_point`, from `/proc/self/mountinfo`
/// text (the last matching mount wins, as it is the visible one); `None` if that is no
/// overlayfs.
fn overlay_options<'m>(mountinfo: &'m str, mount_point: &Path) -> Option<&'m str> {
    let mut found = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mp = left.split(' ').nth(4).map(unescape_octal);
        if mp.as_deref().map(Path::new) != Some(mount_point) {
            continue;
        }
        let mut r = right.split(' ');
        found = (r.next() == Some("overlay")).then(|| r.nth(1).unwrap_or_default());
    }
    found
}

/// The lower directories of the overlayfs mounted at `mount_point`, from `/proc/self/mountinfo`
/// text (the last matching mount wins, as it is the visible one).
pub fn overlay_lowerdirs(mountinfo: &str, mount_point: &Path) -> Option<Vec<PathBuf>> {
    overlay_options(mountinfo, mount_point)?
        .split(',')
        .find_map(|o| o.strip_prefix("lowerdir="))
        .map(|v| split_lowerdir(&unescape_octal(v)))
}

/// The upper directory of the overlayfs mounted at `mount_point` (`None`: not an overlayfs,
/// or a read-only one without an upper directory), as [`overlay_lowerdirs`].
pub fn overlay_upperdir(mountinfo: &str, mount_point: &Path) -> Option<PathBuf> {
    overlay_options(mountinfo, mount_point)?
        .split(',')
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(|v| PathBuf::from(unescape_octal(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_overlay_lowerdirs_in_mountinfo() {
        let mi = "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n\
                  90 22 0:50 / /run/c\\040x/merged rw,relatime - overlay overlay rw,lowerdir=/l/2-abc:/l/1-def\\:x,upperdir=/u,workdir=/w\n";
        assert_eq!(
            overlay_lowerdirs(mi, Path::new("/run/c x/merged")),
            Some(vec![PathBuf::from("/l/2-abc"), PathBuf::from("/l/1-def:x")])
        );
        assert_eq!(overlay_lowerdirs(mi, Path::new("/")), None);
        assert_eq!(overlay_lowerdirs(mi, Path::new("/elsewhere")), None);
        assert_eq!(
            overlay_upperdir(mi, Path::new("/run/c x/merged")),
            Some(PathBuf::from("/u"))
        );
        assert_eq!(overlay_upperdir(mi, Path::new("/")), None);
        let read_only = "90 22 0:50 / /m rw - overlay overlay ro,lowerdir=/a:/b\n";
        assert_eq!(overlay_upperdir(read_only, Path::new("/m")), None);
    }

    #[test]
    fn reads_state_and_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            br#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"annotations":{"org.fanfill.image":"oci:/x:1"}}"#,
        )
        .unwrap();
        let state = format!(
            r#"{{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":42,"bundle":"{}"}}"#,
            dir.path().display()
        );
        let c = inspect(state.as_bytes()).unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.rootfs, dir.path().join("rootfs"));
        assert_eq!(c.image.as_deref(), Some("oci:/x:1"));
        assert!(matches!(inspect(b"{"), Err(HookError::State(_))));
    }
}

/// What the hook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rootfs is not a fanfill tree and the container asked for none: nothing to do.
    NotOurs,
    /// The rootfs (direct mode) is served by the daemon.
    Served(PathBuf),
    /// The daemon prepared the annotated image into the (empty) rootfs.
    Prepared(PathBuf),
    /// The daemon now holds opens of the overlay rootfs until their files are filled.
    OverlayWatched(PathBuf),
}

/// Errors of the hook run: each one fails the container start.
#[derive(Debug, thiserror::Error)]
pub enum HookRunError {
    /// The hook's input was unusable.
    #[error(transparent)]
    Input(#[from] HookError),
    /// The daemon did not answer or refused.
    #[error("container {id}: rootfs {rootfs} cannot be served lazily; refusing to start it")]
    Daemon {
        /// The container.
        id: String,
        /// Its rootfs.
        rootfs: PathBuf,
        /// The daemon's (or the connection's) error.
        #[source]
        source: crate::api::ApiError,
    },
}

/// Runs the hook for the container described by `state_json`, talking to the daemon at
/// `socket`. Any error must fail the container start: a container never runs on a tree
/// nobody serves (an unserved placeholder reads as zeros).
pub fn run(state_json: &[u8], socket: &Path) -> Result<Outcome, HookRunError> {
    use crate::api::{ApiError, Client, ErrorKind, LayoutMode, Request, Response};
    let c = inspect(state_json)?;
    let fail = |source: ApiError| HookRunError::Daemon {
        id: c.id.clone(),
        rootfs: c.rootfs.clone(),
        source,
    };
    let unknown = |e: &ApiError| {
        matches!(
            e,
            ApiError::Daemon {
                kind: ErrorKind::UnknownImage,
                ..
            }
        )
    };
    // A tree fanfill prepared carries its mark; an overlay's lowerdirs are checked too.
    let ours = c.image.is_some()
        || crate::image::tree_image(&c.rootfs).is_some()
        || c.overlay_lowerdirs
            .iter()
            .flatten()
            .any(|l| crate::image::tree_image(l).is_some());
    if !ours {
        return Ok(Outcome::NotOurs);
    }
    // From here on the container's files may be placeholders: no daemon, no start.
    let mut client = Client::connect(socket).map_err(fail)?;
    if c.overlay_lowerdirs.is_some() {
        return match client.call(&Request::WatchOverlay {
            merged: c.rootfs.clone(),
        }) {
            Ok(_) => Ok(Outcome::OverlayWatched(c.rootfs)),
            Err(e) => Err(fail(e)),
        };
    }
    match client.call(&Request::Status {
        dest: Some(c.rootfs.clone()),
    }) {
        Ok(Response::Status { images, .. }) if !images.is_empty() => Ok(Outcome::Served(c.rootfs)),
        Ok(_) => Err(fail(ApiError::Protocol("no status for the rootfs".into()))),
        Err(e) if unknown(&e) => match &c.image {
            // A fanfill tree the daemon does not serve (removed, or lost): its holes must
            // not be read.
            None => Err(fail(e)),
            Some(image) => client
                .call(&Request::Prepare {
                    image: image.clone(),
                    dest: c.rootfs.clone(),
                    mode: LayoutMode::Direct,
                    registry: Default::default(),
                    prefetch: true,
                })
                .map(|_| Outcome::Prepared(c.rootfs.clone()))
                .map_err(fail),
        },
        Err(e) => Err(fail(e)),
    }
}
