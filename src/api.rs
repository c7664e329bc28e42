//! The daemon's local API: typed requests and responses shared by `fanfill daemon` and its
//! clients (the CLI, tests, other programs), and a blocking client.
//!
//! Owns the wire protocol and nothing else: it never touches images, files or fanotify.
//!
//! # Protocol
//! A unix stream socket (default `/run/fanfill/fanfill.sock`, `FANFILL_SOCKET`), mode 0600
//! (root only; 0660 with `fanfill daemon --status-group GROUP`). The daemon checks every
//! connection's peer (`SO_PEERCRED`): root may send everything, a member of the status group
//! only `Status` and `Ping` (anything else gets a `PermissionDenied` error), anyone else is
//! disconnected unanswered. A client writes one [`Request`] as a single line of JSON terminated by `\n`;
//! the daemon answers with one [`Response`] as a single line of JSON and keeps the
//! connection open for the next request. Requests on one connection are served in order.
//! Unknown fields are ignored, so an older client keeps working against a newer daemon.
//!
//! ```text
//! > {"Status":{"dest":null}}
//! < {"Status":[{"id":1,"reference":"oci:/img:1","dest":"/srv/a", ... }]}
//! > {"Remove":{"dest":"/srv/a"}}
//! < {"Removed":{"dest":"/srv/a"}}
//! ```
//!
//! An error is a response too: [`Response::Error`] with an [`ErrorKind`] a client can act
//! on and the daemon's message (with its cause chain). A line that does not parse gets a
//! `BadRequest` error and the connection stays usable; a line longer than 1 MiB gets a
//! `BadRequest` error and the connection is closed.
//!
//! ```no_run
//! use fanfill::api::{Client, LayoutMode, RegistrySettings, Request, Response};
//!
//! let mut c = Client::connect(std::path::Path::new(fanfill::api::DEFAULT_SOCKET))?;
//! let ready = c.call(&Request::Prepare {
//!     image: "oci:/srv/images/app:1".into(),
//!     dest: "/srv/app-root".into(),
//!     mode: LayoutMode::Direct,
//!     registry: RegistrySettings::default(),
//!     prefetch: true,
//! })?;
//! if let Response::Prepared(s) = ready {
//!     println!("{} placeholders in {}", s.files, s.dest.display());
//! }
//! # Ok::<(), fanfill::api::ApiError>(())
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/fanfill/fanfill.sock";

/// How an image is laid out in its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LayoutMode {
    /// One flattened tree: the container's root directly (range fills).
    #[default]
    Direct,
    /// One tree per layer, to mount as overlay lower directories. The daemon serves the
    /// lower placeholders with range fills (marked), which overlayfs cannot pass through (a
    /// read of a marked lower through overlay is `EPERM`, never zeros): mount the overlay
    /// once the image is complete (prefetch), or read the layer trees directly.
    Overlay,
}

/// Registry access settings of a prepare request (what `fanfill pull`'s registry flags say).
/// Everything but `creds` is kept in the daemon's state to reopen the image after a
/// restart; credentials are never written to disk (use an auth file for images that must
/// survive restarts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySettings {
    /// Allow plain HTTP / skip TLS verification.
    #[serde(default)]
    pub insecure: bool,
    /// `USER[:PASS]`.
    #[serde(default)]
    pub creds: Option<String>,
    /// The one auth file to read.
    #[serde(default)]
    pub authfile: Option<PathBuf>,
    /// `OS/ARCH[/VARIANT]`.
    #[serde(default)]
    pub platform: Option<String>,
    /// Mirrors, tried in order before the origin.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Do not look for a pushed index artifact.
    #[serde(default)]
    pub no_index_artifact: bool,
    /// Take a pushed index artifact only if it is signed with the daemon's `--index-key`
    /// (`pull --index-policy signed`): a daemon whose own policy would take one unsigned
    /// refuses the request instead.
    #[serde(default)]
    pub signed_index_only: bool,
    /// Trust the CA certificates (`*.crt`) and use the client certificate in this directory
    /// (skopeo's `--cert-dir`); default: `certs.d/HOST:PORT` lookup.
    #[serde(default)]
    pub cert_dir: Option<PathBuf>,
    /// containerd's registry host directory: each registry's `hosts.toml` there adds its
    /// mirrors (after `mirrors`), gives each host its CA files, client certificate and
    /// headers, and may make the origin plain HTTP.
    #[serde(default)]
    pub hosts_dir: Option<PathBuf>,
}

/// Serde default of fields that are on unless said otherwise.
fn yes() -> bool {
    true
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Prepare `image` into the empty directory `dest` and serve it. Answered with
    /// [`Response::Prepared`] as soon as the placeholders are ready.
    Prepare {
        /// The image reference (`docker://…`, `HOST/REPO:TAG`, `oci:DIR[:TAG]`).
        image: String,
        /// An empty directory on ext4, xfs or btrfs (created if missing).
        dest: PathBuf,
        /// Layout.
        #[serde(default)]
        mode: LayoutMode,
        /// Registry settings.
        #[serde(default)]
        registry: RegistrySettings,
        /// Fill the rest of the image in the background (default: yes).
        #[serde(default = "yes")]
        prefetch: bool,
    },
    /// Status of every image, or of the one in `dest`.
    Status {
        /// Only this image.
        #[serde(default)]
        dest: Option<PathBuf>,
    },
    /// Stop serving the image in `dest` and delete its tree.
    Remove {
        /// The image's destination.
        dest: PathBuf,
    },
    /// Turn background prefetch of the image in `dest` on or off.
    Prefetch {
        /// The image's destination.
        dest: PathBuf,
        /// On or off.
        enable: bool,
    },
    /// Hold opens through the overlay mounted at `merged` (a container's rootfs whose
    /// lowerdirs are layers of an image prepared in overlay mode) until each opened file is
    /// filled. The OCI hook sends it before the container's process runs.
    WatchOverlay {
        /// The overlay mount point.
        merged: PathBuf,
    },
    /// Liveness check.
    Ping,
}

impl Request {
    /// Whether the request changes nothing (what a member of the daemon's status group may
    /// send).
    pub fn is_read_only(&self) -> bool {
        matches!(self, Request::Status { .. } | Request::Ping)
    }
}

/// What went wrong, for a client to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// No image is served at that destination.
    UnknownImage,
    /// The image reference is unknown to the registry or layout, or unreachable.
    Image,
    /// The destination is not empty.
    DestNotEmpty,
    /// The destination's filesystem cannot carry pre-content marks.
    UnsupportedFilesystem,
    /// A destination is already served.
    AlreadyServed,
    /// The request did not parse.
    BadRequest,
    /// The image is in use: its layers are mounted as an overlay that is still there.
    InUse,
    /// Anything else.
    Internal,
    /// The client may not make this request (only root may change what is served;
    /// members of the daemon's status group may only ask for status).
    PermissionDenied,
}

/// One image's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageStatus {
    /// Daemon-local id.
    pub id: u64,
    /// The reference as given.
    pub reference: String,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Destination.
    pub dest: PathBuf,
    /// Layout.
    pub mode: LayoutMode,
    /// Overlay mode: the `lowerdir=` option value.
    #[serde(default)]
    pub lowerdir: Option<String>,
    /// Placeholders (regular files with data).
    pub files: u64,
    /// Of those, complete (mark removed).
    pub files_complete: u64,
    /// Sum of file sizes.
    pub bytes_total: u64,
    /// Bytes present.
    pub bytes_filled: u64,
    /// Bytes fetched from the registry or layout for this image since the daemon started.
    pub bytes_fetched: u64,
    /// Fetch rate over the last status interval, bytes per second.
    pub fetch_rate: f64,
    /// Fetch errors since the daemon started.
    pub errors: u64,
    /// Background prefetch on.
    pub prefetch: bool,
    /// Placeholders found moved, deleted or replaced under the daemon (never written).
    #[serde(default)]
    pub files_gone: u64,
    /// `serving`, `complete`, or `error: …` (could not be reopened after a restart; the
    /// tree or some of its placeholders were moved or deleted under the daemon).
    pub state: String,
}

/// Daemon-wide figures, returned with every status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Process id.
    pub pid: u32,
    /// The group was taken over from a predecessor (restart without losing blocked readers).
    pub took_over: bool,
    /// Predecessor's in-flight events answered after the takeover.
    pub inherited_answered: u64,
    /// Reader events being served now.
    pub inflight_events: u64,
    /// Misses served since start.
    pub events: u64,
    /// Fill errors since start.
    pub errors: u64,
    /// Median / p99 event service time, microseconds.
    pub latency_p50_us: u64,
    /// 99th percentile.
    pub latency_p99_us: u64,
    /// Overlay rootfs mounts whose opens are held until their files are filled.
    #[serde(default)]
    pub overlays_watched: u64,
    /// Opens through watched overlays being served now.
    #[serde(default)]
    pub overlay_opens_inflight: u64,
    /// Opens through watched overlays served since start.
    #[serde(default)]
    pub overlay_opens: u64,
    /// Milliseconds those opens were held (read to answer), summed.
    #[serde(default)]
    pub overlay_open_held_ms: u64,
    /// The longest one, milliseconds.
    #[serde(default)]
    pub overlay_open_held_max_ms: u64,
    /// Files read ahead for the dynamic loader: interpreters and libraries named by ELF
    /// files opened through watched overlays (`crate::loader`), each asked for once.
    #[serde(default)]
    pub loader_ahead: u64,
    /// Misses that waited for a running layer stream and got their bytes from it (instead
    /// of a fetch of their own).
    #[serde(default)]
    pub delivered_waits: u64,
}

/// A response from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The placeholders are ready.
    Prepared(ImageStatus),
    /// Status of the images asked for.
    Status {
        /// The daemon.
        daemon: DaemonStatus,
        /// The images.
        images: Vec<ImageStatus>,
    },
    /// The image was removed.
    Removed {
        /// Its destination.
        dest: PathBuf,
    },
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// The daemon's message, with its cause chain.
        message: String,
    },
}

impl Request {
    /// Parses one protocol line (without its `\n`): what the daemon does with each line it
    /// reads.
    pub fn from_line(line: &[u8]) -> Result<Request, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// The request as one protocol line, `\n` included.
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        let mut line = serde_json::to_string(self)?;
        line.push('\n');
        Ok(line)
    }
}

impl Response {
    /// Parses one protocol line (without its `\n`): what a client does with the answer.
    pub fn from_line(line: &[u8]) -> Result<Response, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// The answer to a line that did not parse as a [`Request`].
    pub fn bad_request(e: &serde_json::Error) -> Response {
        Response::Error {
            kind: ErrorKind::BadRequest,
            message: format!("bad request: {e}"),
        }
    }

    /// The response as one protocol line, `\n` included. Never fails: a response that
    /// cannot be serialised (none can today) becomes an [`ErrorKind::Internal`] error line.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::to_string(&Response::Error {
                kind: ErrorKind::Internal,
                message: format!("serialising the response: {e}"),
            })
            .unwrap_or_else(|_| r#"{"Error":{"kind":"Internal","message":""}}"#.to_owned())
        });
        line.push('\n');
        line
    }
}

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nobody listens on the socket.
    #[error(
        "fanfill daemon unreachable at {socket} (is `fanfill daemon` running? set --socket or FANFILL_SOCKET)"
    )]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("talking to the fanfill daemon at {socket}")]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon's answer did not parse, or it closed the connection.
    #[error("bad answer from the fanfill daemon: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("{message}")]
    Daemon {
        /// What kind of failure.
        kind: ErrorKind,
        /// The daemon's message.
        message: String,
    },
}

/// A blocking client: one connection, requests in order.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the daemon's socket.
    pub fn connect(socket: &Path) -> Result<Client, ApiError> {
        let stream = UnixStream::connect(socket).map_err(|source| ApiError::Unreachable {
            socket: socket.to_path_buf(),
            source,
        })?;
        Ok(Client {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
        })
    }

    /// Sends a request and waits for its response. A [`Response::Error`] is returned as
    /// [`ApiError::Daemon`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ApiError> {
        let io = |source| ApiError::Io {
            socket: self.socket.clone(),
            source,
        };
        let line = req
            .to_line()
            .map_err(|e| ApiError::Protocol(e.to_string()))?;
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(io)?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|source| ApiError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ApiError::Protocol("connection closed".into()));
        }
        let answer = answer.strip_suffix('\n').unwrap_or(&answer);
        match Response::from_line(answer.as_bytes())
            .map_err(|e| ApiError::Protocol(e.to_string()))?
        {
            Response::Error { kind, message } => Err(ApiError::Daemon { kind, message }),
            r => Ok(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line() {
        let r = Request::Prepare {
            image: "oci:/x:1".into(),
            dest: "/d".into(),
            mode: LayoutMode::Overlay,
            registry: RegistrySettings::default(),
            prefetch: true,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let minimal: Request =
            serde_json::from_str(r#"{"Prepare":{"image":"a","dest":"/b"}}"#).unwrap();
        assert!(matches!(
            minimal,
            Request::Prepare {
                mode: LayoutMode::Direct,
                ..
            }
        ));
    }

    #[test]
    fn bad_request_answer_is_one_json_line() {
        // The message quotes the input; it must still be valid JSON on one line.
        let e = Request::from_line(b"{\"Remove\":{\"dest\":\"a\"b\n\"}}").unwrap_err();
        let line = Response::bad_request(&e).to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        assert!(matches!(
            Response::from_line(line.trim_end().as_bytes()).unwrap(),
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ));
        let req = Request::Remove { dest: "/d".into() };
        let line = req.to_line().unwrap();
        assert_eq!(Request::from_line(line.trim_end().as_bytes()).unwrap(), req);
    }
}
