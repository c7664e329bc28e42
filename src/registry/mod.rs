//! Image and blob access: a remote registry or an OCI image layout directory.
//!
//! Owns everything between an image [`Reference`] and bytes: resolving a tag to an image
//! manifest for one platform (OCI and Docker schema2 manifests and lists), reading byte
//! ranges of blobs, streaming and verifying whole blobs, registry auth (anonymous, Basic,
//! Bearer with a token cache), TLS trust (private CAs and client certificates from
//! `--cert-dir` or `certs.d` directories, as podman finds them, and the per-host `ca`,
//! `client` and header settings of containerd's `hosts.toml`), mirrors with fallback,
//! retries with bounded exponential backoff, referrers (the layer-index artifact), and
//! counters of what was fetched. It never interprets layer contents, writes placeholders or
//! talks to the kernel.
//!
//! Two backends behind one enum, [`BlobStore`]: [`RemoteStore`] (the distribution HTTP API)
//! and [`LayoutStore`] (an `oci:` directory, read with `pread`).
//!
//! The remote backend speaks HTTP with `reqwest` directly rather than through `oci-client`:
//! the fill path needs control that `oci-client` does not give — every response body counted
//! in [`Stats`], a dropped connection or a truncated body retried (resuming a stream at its
//! offset), a `200` answer to a `Range:` request sliced instead of trusted, several mirrors
//! tried before the origin, `auth.json` credentials, and the referrers-tag fallback. The
//! protocol subset needed for that is small (GET/HEAD manifests and blobs, monolithic blob
//! upload, manifest PUT, the token exchange).
//!
//! Integrity: every whole-blob read ([`BlobStore::fetch_blob`], [`BlobStream`], manifests
//! fetched by digest) is checked against its digest; a range read cannot be, and is checked
//! by its length only (the caller verifies content against its own index).
//!
//! Failure policy: transient failures (no connection, broken or short body, HTTP 5xx and
//! 429) are retried per [`RetryPolicy`]; anything else is returned at once, among them a
//! server certificate that does not verify ([`Error::Certificate`]; a secure endpoint never
//! falls back to plain HTTP). A mirror that
//! fails moves the read on to the next mirror and finally to the origin, and a mirror that
//! failed transiently is skipped for 30 s. A read never returns fewer bytes than asked.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fanfill::reference::Reference;
//! use fanfill::registry::{BlobStore, Options};
//!
//! let reference: Reference = "docker://127.0.0.1:5000/library/debian:bookworm".parse()?;
//! let store = BlobStore::open(&reference, &Options { insecure: true, ..Options::default() }).await?;
//! let image = store.resolve(None).await?; // the host platform
//! let layer = image.manifest.layers()[0].digest();
//! let head = store.read_range(layer, 0, 4096).await?; // exactly 4096 bytes, or an error
//! assert_eq!(head.len(), 4096);
//! # Ok(())
//! # }
//! ```

mod auth;
pub mod hosts;
mod layout;
mod remote;
mod tls;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oci_spec::image::{
    Descriptor, Digest, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest,
};
use sha2::Digest as _;

pub use auth::{Challenge, Credentials, auth_files, lookup as lookup_credentials, parse_challenge};
pub use layout::LayoutStore;
pub use remote::{RemoteStore, referrers_tag};
pub use tls::{cert_roots, find_cert_dir, set_up as set_up_tls, warm_up};

use crate::reference::Reference;

/// OCI image manifest media type.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema2 manifest media type.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker v2 manifest list media type.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI empty JSON descriptor media type (the config of an artifact manifest).
pub const MEDIA_OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// Largest manifest or index we accept (the distribution registry's limit is 4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// Errors from resolving images and reading blobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `hosts.toml` could not be read.
    #[error(transparent)]
    Hosts(#[from] hosts::HostsError),
    /// A request could not be sent or got no answer (connection refused, reset, timeout).
    #[error("{method} {url}: no response")]
    Connect {
        /// HTTP method.
        method: String,
        /// The URL requested.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The body of a response broke off.
    #[error("{url}: response body broke off")]
    Body {
        /// The URL requested.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A body ended before the bytes asked for.
    #[error("{what}: short read, {got} of {want} bytes")]
    ShortRead {
        /// The URL or file read.
        what: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// A range that ends past the end of the blob.
    #[error("{digest}: range {offset}+{len} is past the end ({size} bytes)")]
    RangeBeyondEnd {
        /// The blob.
        digest: String,
        /// Start of the range asked for.
        offset: u64,
        /// Its length.
        len: u64,
        /// The blob's size.
        size: u64,
    },
    /// The server answered with an unexpected status.
    #[error("{method} {url}: HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        /// HTTP method.
        method: String,
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
        /// The registry error code from the body (`MANIFEST_UNKNOWN`, ...), if any.
        code: Option<String>,
        /// The `Retry-After` delay the server asked for, if any.
        retry_after: Option<Duration>,
    },
    /// The server broke the distribution protocol.
    #[error("{url}: {problem}")]
    Protocol {
        /// The URL requested.
        url: String,
        /// What was wrong with the answer.
        problem: &'static str,
    },
    /// A body read whole into memory ran past the most read for it: the size its descriptor
    /// declares, or [`MAX_MANIFEST_SIZE`] for a manifest. What was read is dropped.
    #[error("{what}: the body runs past {max} bytes, the most read for it")]
    BodyTooLong {
        /// The URL or file read.
        what: String,
        /// The most read for it.
        max: u64,
    },
    /// A blob to be read whole into memory is declared larger than its kind may be.
    #[error("{what}: declared {size} bytes, more than the {max} read for it")]
    TooLarge {
        /// The blob and what it is for.
        what: String,
        /// Its size as declared (by the manifest that names it).
        size: u64,
        /// The most read for it.
        max: u64,
    },
    /// A manifest or blob does not exist.
    #[error("{what}: not found")]
    NotFound {
        /// The manifest reference or blob digest with its repository.
        what: String,
    },
    /// The registry refused our credentials (or we had none).
    #[error("{registry}: unauthorized for {repository}{}", if *had_credentials { "" } else { " (no credentials found)" })]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The repository.
        repository: String,
        /// Whether credentials were sent.
        had_credentials: bool,
    },
    /// The token endpoint failed or answered nonsense.
    #[error("{registry}: token request to {realm} failed")]
    Token {
        /// The registry host.
        registry: String,
        /// The token endpoint.
        realm: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Content does not hash to its digest.
    #[error("{digest}: content does not match digest (got {actual})")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// The digest of what was received.
        actual: String,
    },
    /// A digest algorithm we cannot verify.
    #[error("{0}: unsupported digest algorithm")]
    DigestAlgorithm(String),
    /// A manifest, index or config is not valid JSON of the expected shape.
    #[error("{what}: invalid JSON")]
    Json {
        /// What was parsed (with its digest or path).
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest of a kind we do not handle (e.g. Docker schema1).
    #[error("{reference}: unsupported manifest type {media_type:?}")]
    MediaType {
        /// The manifest reference.
        reference: String,
        /// Its media type.
        media_type: String,
    },
    /// An index has no manifest for the wanted platform.
    #[error("{reference}: no image for platform {platform} (has: {available})")]
    NoPlatform {
        /// The index reference.
        reference: String,
        /// The platform wanted.
        platform: Platform,
        /// The platforms the index offers, comma-separated.
        available: String,
    },
    /// A `--platform` value that is not `OS/ARCH[/VARIANT]`.
    #[error("{0:?}: platform must be OS/ARCH[/VARIANT]")]
    Platform(String),
    /// A `--creds` value that is not `USER[:PASS]`.
    #[error("credentials must be USER[:PASS]")]
    Creds,
    /// A mirror location that is not `HOST[:PORT][/PREFIX]`.
    #[error("{0:?}: mirror must be HOST[:PORT][/PREFIX]")]
    Mirror(String),
    /// An auth file could not be read or parsed.
    #[error("auth file {}", path.display())]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// The read or parse error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An auth file entry whose `auth` is not base64 of `user:password`.
    #[error("auth file {}: bad entry for {registry}", path.display())]
    AuthEntry {
        /// The file.
        path: PathBuf,
        /// The registry whose entry is bad.
        registry: String,
    },
    /// A file of an OCI layout could not be read or written.
    #[error("layout file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The layout has no image with this tag.
    #[error("{}: no image named {tag:?} (has: {available})", dir.display())]
    LayoutTag {
        /// The layout directory.
        dir: PathBuf,
        /// The tag asked for.
        tag: String,
        /// The `ref.name`s present, comma-separated.
        available: String,
    },
    /// The layout holds several images and no tag was given.
    #[error("{}: {count} images, name one with oci:DIR:TAG (has: {available})", dir.display())]
    LayoutAmbiguous {
        /// The layout directory.
        dir: PathBuf,
        /// How many manifests `index.json` lists.
        count: usize,
        /// The `ref.name`s present, comma-separated.
        available: String,
    },
    /// An operation the backend does not offer.
    #[error("{operation} is not supported by {backend}")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
        /// The backend (e.g. "an oci: layout").
        backend: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("cannot build HTTP client")]
    Client(#[source] reqwest::Error),
    /// A file of a certificate directory could not be read or parsed.
    #[error("certificate file {}", path.display())]
    CertFile {
        /// The file (or the directory, if it could not be listed).
        path: PathBuf,
        /// The read or parse error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The registry's TLS certificate did not verify (unknown CA, wrong name, expired).
    #[error("{method} {url}: TLS certificate of {registry} not trusted ({})", trust_hint(registry, cert_dir.as_deref(), ca_files))]
    Certificate {
        /// HTTP method.
        method: String,
        /// The URL requested.
        url: String,
        /// The registry host (`HOST[:PORT]`).
        registry: String,
        /// The certificate directory whose `*.crt` files were trusted besides the system
        /// roots, if any.
        cert_dir: Option<PathBuf>,
        /// The CA files a `hosts.toml` names for the host (its `ca`), trusted too.
        ca_files: Box<[PathBuf]>,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
}

/// What was trusted, and where a CA for `registry` would go.
fn trust_hint(registry: &str, cert_dir: Option<&std::path::Path>, ca_files: &[PathBuf]) -> String {
    let mut trusted: Vec<String> = cert_dir
        .map(|dir| format!("{}/*.crt", dir.display()))
        .into_iter()
        .chain(ca_files.iter().map(|f| f.display().to_string()))
        .collect();
    if trusted.is_empty() {
        return format!(
            "trusted: system roots only; a private CA for it goes in /etc/containers/certs.d/{registry}/*.crt"
        );
    }
    trusted.insert(0, "system roots".to_owned());
    format!("trusted: {}", trusted.join(", "))
}

impl Error {
    /// Whether trying again may succeed: dropped connections, broken or short bodies, HTTP
    /// 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Body { .. } | Error::ShortRead { .. } => true,
            Error::Status { status, .. } => *status == 429 || (500..600).contains(status),
            _ => false,
        }
    }

    /// Whether this is a "does not exist" answer.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A platform to select from a multi-arch index: `OS/ARCH[/VARIANT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// OCI OS name (`linux`).
    pub os: String,
    /// OCI architecture name (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Architecture variant (`v8`, `v7`), if any.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this program runs on, with Rust arch names mapped to OCI ones.
    pub fn host() -> Self {
        let (architecture, variant) = oci_arch(std::env::consts::ARCH);
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Whether an index entry's platform fits: same OS and architecture, and the same
    /// variant when we name one (`arm64` without a variant counts as `v8`).
    pub fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        if p.os().to_string() != self.os || p.architecture().to_string() != self.architecture {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let have = p
            .variant()
            .clone()
            .or_else(|| (self.architecture == "arm64").then(|| "v8".to_owned()));
        have.as_deref() == Some(want.as_str())
    }
}

/// Rust `std::env::consts::ARCH` → OCI architecture and default variant.
fn oci_arch(rust_arch: &str) -> (&str, Option<&str>) {
    match rust_arch {
        "x86_64" => ("amd64", None),
        "x86" => ("386", None),
        "aarch64" => ("arm64", None),
        "arm" => ("arm", Some("v7")),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "powerpc64" => ("ppc64", None),
        "powerpc" => ("ppc", None),
        "loongarch64" => ("loong64", None),
        "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
        "mips" if cfg!(target_endian = "little") => ("mipsle", None),
        other => (other, None),
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::Platform(s.to_owned()));
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How hard to retry transient failures: at most `max_attempts` tries in all, waiting
/// `initial_backoff`, doubling up to `max_backoff`, and never starting a wait that would end
/// past `max_elapsed` since the first try.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total tries, including the first (1 = no retry).
    pub max_attempts: u32,
    /// First wait.
    pub initial_backoff: Duration,
    /// Longest single wait (also caps a server's `Retry-After`).
    pub max_backoff: Duration,
    /// Time budget for all tries of one operation.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(60),
        }
    }
}

/// A mirror of the origin registry, tried before it for reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `HOST[:PORT][/PREFIX]`: the repository `R` is read as `PREFIX/R` from `HOST`.
    pub location: String,
    /// Plain HTTP / no certificate check for this mirror.
    pub insecure: bool,
}

/// How to reach a registry. The defaults: TLS verified, credentials from the auth files,
/// no mirrors, [`RetryPolicy::default`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Talk to the origin without TLS verification, falling back to plain HTTP
    /// (podman `--tls-verify=false`). Never implied, not even for `localhost`.
    pub insecure: bool,
    /// The certificate directory for every registry contacted, origin and mirrors
    /// (skopeo/podman `--cert-dir`): its `*.crt` CA certificates are trusted besides the
    /// system roots, and a `NAME.cert` + `NAME.key` pair is sent as the client certificate.
    /// `None`: each host's `HOST[:PORT]` directory under [`Options::cert_roots`].
    pub cert_dir: Option<PathBuf>,
    /// Where to look for `HOST[:PORT]/` certificate directories when `cert_dir` is `None`;
    /// `None`: [`cert_roots`] (`~/.config/containers/certs.d`, `/etc/containers/certs.d`,
    /// `/etc/docker/certs.d`). `Some(vec![])` looks nowhere.
    pub cert_roots: Option<Vec<PathBuf>>,
    /// Credentials for the origin (`--creds`); they win over the auth files.
    pub creds: Option<Credentials>,
    /// The one auth file to read (`--authfile`), instead of the default search list.
    pub authfile: Option<PathBuf>,
    /// Mirrors tried in order before the origin for reads.
    pub mirrors: Vec<Mirror>,
    /// containerd's registry host directory (`/etc/containerd/certs.d`): the origin's
    /// `hosts.toml` adds its mirrors after [`Options::mirrors`], gives each host (mirror or
    /// origin) its `ca` and `client` files and headers, and may make the origin
    /// plain HTTP ([`hosts`]).
    pub hosts_dir: Option<PathBuf>,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
    /// Connect timeout for one request.
    pub connect_timeout: Duration,
    /// Longest silence while reading one response.
    pub read_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            insecure: false,
            cert_dir: None,
            cert_roots: None,
            creds: None,
            authfile: None,
            mirrors: Vec::new(),
            hosts_dir: None,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of one store, for observability. Bytes are those received from the source: the
/// network for a registry, the disk for a layout.
#[derive(Debug, Default)]
pub struct Stats {
    bytes_fetched: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Stats {
    /// Body bytes received so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.bytes_fetched.load(Ordering::Relaxed)
    }

    /// Requests sent (HTTP requests, or blob opens for a layout).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Tries repeated after a transient failure.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn add_bytes(&self, n: usize) {
        self.bytes_fetched.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// A manifest as fetched, before interpretation.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The exact bytes (what the digest covers).
    pub bytes: Bytes,
    /// Its media type (from `Content-Type`, the descriptor, or the JSON `mediaType`).
    pub media_type: String,
    /// Its digest (verified when it was asked for by digest).
    pub digest: Digest,
}

/// An image resolved for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The image manifest.
    pub manifest: ImageManifest,
    /// Digest of the image manifest (not of the index it was picked from).
    pub manifest_digest: Digest,
    /// The manifest bytes as fetched.
    pub manifest_bytes: Bytes,
    /// The manifest media type (OCI or Docker schema2).
    pub manifest_media_type: String,
    /// Digest of the index the manifest was picked from, if the reference named an index.
    pub index_digest: Option<Digest>,
    /// The image configuration.
    pub config: ImageConfiguration,
    /// The config bytes as fetched (verified against the manifest's config digest).
    pub config_bytes: Bytes,
}

impl ResolvedImage {
    /// A descriptor of the image manifest (to use as an artifact's `subject`).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.manifest_media_type.as_str().into(),
            self.manifest_bytes.len() as u64,
            self.manifest_digest.clone(),
        )
    }
}

/// An image manifest resolved for one platform, its configuration not fetched yet
/// ([`BlobStore::resolve_manifest`]).
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    /// The image manifest.
    pub manifest: ImageManifest,
    /// Digest of the image manifest (not of the index it was picked from).
    pub manifest_digest: Digest,
    /// The manifest bytes as fetched.
    pub manifest_bytes: Bytes,
    /// The manifest media type (OCI or Docker schema2).
    pub manifest_media_type: String,
    /// Digest of the index the manifest was picked from, if the reference named an index.
    pub index_digest: Option<Digest>,
}

impl ResolvedManifest {
    /// The resolved image, with the configuration [`BlobStore::fetch_config`] returned.
    pub fn with_config(self, (config, config_bytes): (ImageConfiguration, Bytes)) -> ResolvedImage {
        ResolvedImage {
            manifest: self.manifest,
            manifest_digest: self.manifest_digest,
            manifest_bytes: self.manifest_bytes,
            manifest_media_type: self.manifest_media_type,
            index_digest: self.index_digest,
            config,
            config_bytes,
        }
    }
}

/// A referrer found for a subject: an artifact manifest whose layers are read through the
/// same store ([`BlobStore::fetch_blob`], [`BlobStore::open_stream`], ...).
#[derive(Debug, Clone)]
pub struct Referrer {
    /// The referrer's manifest digest.
    pub digest: Digest,
    /// The artifact manifest.
    pub manifest: ImageManifest,
    /// Its bytes as fetched.
    pub manifest_bytes: Bytes,
}

/// Where images and blobs come from: a registry or an OCI layout.
#[derive(Debug, Clone)]
pub enum BlobStore {
    /// A remote registry (`docker://`).
    Remote(RemoteStore),
    /// An OCI image layout directory (`oci:`).
    Layout(LayoutStore),
}

impl BlobStore {
    /// Opens the store a reference points into; no network traffic for a secure registry.
    pub async fn open(reference: &Reference, options: &Options) -> Result<Self> {
        match reference {
            Reference::Registry(r) => Ok(BlobStore::Remote(RemoteStore::open(r, options).await?)),
            Reference::Layout(l) => Ok(BlobStore::Layout(LayoutStore::open(l)?)),
        }
    }

    /// The store's counters.
    pub fn stats(&self) -> &Stats {
        match self {
            BlobStore::Remote(r) => r.stats(),
            BlobStore::Layout(l) => l.stats(),
        }
    }

    /// Bytes received from the source so far (see [`Stats`]).
    pub fn bytes_fetched(&self) -> u64 {
        self.stats().bytes_fetched()
    }

    /// Fetches a manifest or index by tag or digest (`None`: the reference's own).
    pub async fn fetch_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        match self {
            BlobStore::Remote(r) => r.fetch_manifest(reference).await,
            BlobStore::Layout(l) => l.fetch_manifest(reference).await,
        }
    }

    /// Resolves the reference to an image manifest and config, picking `platform` (default:
    /// [`Platform::host`]) from an index.
    pub async fn resolve(&self, platform: Option<&Platform>) -> Result<ResolvedImage> {
        let manifest = self.resolve_manifest(platform).await?;
        let config = self.fetch_config(&manifest.manifest).await?;
        Ok(manifest.with_config(config))
    }

    /// The manifest half of [`BlobStore::resolve`]: what a caller needs to start looking for
    /// the image's other artifacts while [`BlobStore::fetch_config`] runs.
    pub async fn resolve_manifest(&self, platform: Option<&Platform>) -> Result<ResolvedManifest> {
        let host = Platform::host();
        let platform = platform.unwrap_or(&host);
        let mut raw = self.fetch_manifest(None).await?;
        let mut index_digest = None;
        if is_index(&raw.media_type) {
            let what = format!("index {}", raw.digest);
            let index: ImageIndex = parse_json(&raw.bytes, &what)?;
            let chosen = pick_platform(&index, platform, &raw.digest)?;
            tracing::debug!(index = %raw.digest, manifest = %chosen.digest(), %platform, "picked platform");
            index_digest = Some(raw.digest.clone());
            let digest = chosen.digest().to_string();
            raw = self.fetch_manifest(Some(&digest)).await?;
            if raw.media_type.is_empty() {
                raw.media_type = chosen.media_type().to_string();
            }
        }
        if !is_manifest(&raw.media_type) {
            return Err(Error::MediaType {
                reference: raw.digest.to_string(),
                media_type: raw.media_type,
            });
        }
        let manifest: ImageManifest = parse_json(&raw.bytes, &format!("manifest {}", raw.digest))?;
        Ok(ResolvedManifest {
            manifest,
            manifest_digest: raw.digest,
            manifest_bytes: raw.bytes,
            manifest_media_type: raw.media_type,
            index_digest,
        })
    }

    /// The image configuration `manifest` names, parsed, with its bytes as fetched (verified
    /// against the manifest's config digest).
    pub async fn fetch_config(
        &self,
        manifest: &ImageManifest,
    ) -> Result<(ImageConfiguration, Bytes)> {
        let config_digest = manifest.config().digest().clone();
        let config_bytes = self
            .fetch_blob(&config_digest, manifest.config().size())
            .await?;
        let config = parse_json(&config_bytes, &format!("config {config_digest}"))?;
        Ok((config, config_bytes))
    }

    /// Reads `len` bytes of a blob at `offset`: exactly `len` bytes, or an error.
    pub async fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if offset.checked_add(len).is_none() {
            return Err(Error::RangeBeyondEnd {
                digest: digest.to_string(),
                offset,
                len,
                size: u64::MAX,
            });
        }
        match self {
            BlobStore::Remote(r) => r.read_range(digest, offset, len).await,
            BlobStore::Layout(l) => l.read_range(digest, offset, len).await,
        }
    }

    /// Reads `len` bytes of a blob at `offset` like [`BlobStore::read_range`], unless the
    /// server ignores `Range:` and sends the whole blob (a pull-through cache on a cold
    /// cache does): then that whole blob, as a verified stream from byte 0, for the caller
    /// to keep ([`crate::blobcache`]) rather than discard.
    pub async fn read_range_or_whole(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<RangeRead> {
        self.read_range_or_whole_seen(digest, offset, len, None)
            .await
    }

    /// [`BlobStore::read_range_or_whole`], showing a range's bytes to `seen` as they arrive
    /// (a consumer can start on the front of a large range while the rest is on its way);
    /// the whole range is still returned. Not called for a whole blob sent instead of the
    /// range, nor for a layout (its read is one `pread`).
    pub async fn read_range_or_whole_seen(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        seen: Option<RangeSeen<'_>>,
    ) -> Result<RangeRead> {
        match self {
            BlobStore::Remote(r) if len > 0 && offset.checked_add(len).is_some() => {
                r.read_range_or_whole(digest, offset, len, seen).await
            }
            _ => self
                .read_range(digest, offset, len)
                .await
                .map(RangeRead::Range),
        }
    }

    /// Whether the source answers range reads of `digest` with just the range: always for a
    /// layout; for a registry, as the endpoint a request for the blob goes to first answered
    /// its last request carrying `Range:` (`206`: yes; the whole blob, as a pull-through cache
    /// on a cold cache does: no), `None` before it answered one. The one place that is known.
    pub fn serves_ranges(&self, digest: &Digest) -> Option<bool> {
        match self {
            BlobStore::Remote(r) => r.serves_ranges(digest),
            BlobStore::Layout(_) => Some(true),
        }
    }

    /// Opens a streaming read of a whole blob like [`BlobStore::open_stream`] and tells
    /// whether the source serves ranges of it ([`BlobStore::serves_ranges`]). Not known yet,
    /// the server is asked first with a one-byte range read: answered with the whole blob,
    /// that answer is the stream returned (one download either way); a probe that fails
    /// leaves it unknown (`false`: the caller keeps what it would keep without ranges).
    pub async fn open_stream_ranges(&self, digest: &Digest) -> Result<(BlobStream, bool)> {
        if let Some(ranges) = self.serves_ranges(digest) {
            return Ok((self.open_stream(digest).await?, ranges));
        }
        match self.read_range_or_whole(digest, 0, 1).await {
            Ok(RangeRead::Whole(stream)) => Ok((*stream, false)),
            Ok(RangeRead::Range(_)) => Ok((self.open_stream(digest).await?, true)),
            Err(e) => {
                tracing::debug!(%digest, error = %e, "probing range reads failed");
                Ok((self.open_stream(digest).await?, false))
            }
        }
    }

    /// Opens a streaming read of a whole blob; the stream checks the digest at its end.
    pub async fn open_stream(&self, digest: &Digest) -> Result<BlobStream> {
        match self {
            BlobStore::Remote(r) => r.open_stream(digest).await,
            BlobStore::Layout(l) => l.open_stream(digest).await,
        }
    }

    /// Reads a whole (small) blob into memory, verified against its digest. `size` is the
    /// size its descriptor declares: no more is read, and a blob that runs past it is
    /// refused ([`Error::BodyTooLong`]) without being kept, so a registry cannot grow the
    /// daemon's memory beyond what the (digest-bound) manifest promised.
    pub async fn fetch_blob(&self, digest: &Digest, size: u64) -> Result<Bytes> {
        match self {
            BlobStore::Remote(r) => r.fetch_blob(digest, size).await,
            BlobStore::Layout(l) => l.fetch_blob(digest, size).await,
        }
    }

    /// Pushes an artifact manifest of `artifact_type` with `blobs` (media type, content) as
    /// its layers and `subject` (an image manifest in the same repository or layout) as its
    /// subject, and makes it findable as a referrer. Returns the artifact manifest's digest.
    ///
    /// A registry without the referrers API gets the `sha256-HEX` tag fallback: an index
    /// read, extended and written back, so two concurrent pushes for one subject may lose
    /// one entry. A layout gets a descriptor (with `artifactType`, without a name) in its
    /// `index.json`.
    pub async fn push_artifact(
        &self,
        subject: &Digest,
        artifact_type: &str,
        blobs: Vec<(String, Bytes)>,
    ) -> Result<Digest> {
        let subject_raw = self.fetch_manifest(Some(subject.as_ref())).await?;
        let artifact = build_artifact(&subject_raw, artifact_type, blobs);
        let digest = artifact.digest.clone();
        match self {
            BlobStore::Remote(r) => r.push_artifact(subject, artifact).await?,
            BlobStore::Layout(l) => l.push_artifact(artifact).await?,
        }
        Ok(digest)
    }

    /// Lists the referrers of `subject`, optionally only those of `artifact_type`.
    pub async fn list_referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        match self {
            BlobStore::Remote(r) => r.list_referrers(subject, artifact_type).await,
            BlobStore::Layout(l) => l.list_referrers(subject, artifact_type).await,
        }
    }

    /// Finds the newest referrer of `subject` with `artifact_type` (by its
    /// [`ANNOTATION_CREATED`], else the last listed).
    pub async fn find_referrer(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Referrer>> {
        let mut listed = self.list_referrers(subject, Some(artifact_type)).await?;
        newest_first(&mut listed);
        match listed.first() {
            Some(desc) => self.fetch_referrer(desc).await.map(Some),
            None => Ok(None),
        }
    }

    /// The manifest a referrer descriptor names.
    pub async fn fetch_referrer(&self, desc: &Descriptor) -> Result<Referrer> {
        let digest = desc.digest().to_string();
        let raw = self.fetch_manifest(Some(&digest)).await?;
        let manifest = parse_json(&raw.bytes, &format!("referrer {digest}"))?;
        Ok(Referrer {
            digest: raw.digest,
            manifest,
            manifest_bytes: raw.bytes,
        })
    }

    /// Stores `blobs`, then `manifest` (an OCI image manifest) under `tag` (a signature
    /// beside the manifest it signs, for example). Registries only.
    pub async fn push_tagged(
        &self,
        tag: &str,
        manifest: Bytes,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Result<()> {
        match self {
            BlobStore::Remote(r) => r.push_tagged(tag, manifest, blobs).await,
            BlobStore::Layout(_) => Err(Error::Unsupported {
                operation: "storing a manifest under a tag",
                backend: "an oci: layout",
            }),
        }
    }
}

/// The annotation carrying an artifact's creation time (RFC 3339); the newest referrer wins.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// An artifact manifest ready to store.
struct Artifact {
    /// The manifest bytes.
    manifest: Bytes,
    /// Their digest.
    digest: Digest,
    /// The descriptor to list it under in a referrers index.
    entry: serde_json::Value,
    /// Blobs to store first (the empty config, then the layers).
    blobs: Vec<(Digest, Bytes)>,
}

/// Builds an OCI 1.1 artifact manifest: empty config, `blobs` as layers, `subject`.
fn build_artifact(
    subject: &RawManifest,
    artifact_type: &str,
    blobs: Vec<(String, Bytes)>,
) -> Artifact {
    let empty = Bytes::from_static(b"{}");
    let empty_digest = sha256_digest(&empty);
    let created = rfc3339(std::time::SystemTime::now());
    let mut stored = vec![(empty_digest.clone(), empty)];
    let mut layers = Vec::new();
    for (media_type, data) in blobs {
        let digest = sha256_digest(&data);
        layers.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest.to_string(),
            "size": data.len(),
        }));
        stored.push((digest, data));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": MEDIA_OCI_EMPTY, "digest": empty_digest.to_string(), "size": 2},
        "layers": layers,
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest.to_string(),
            "size": subject.bytes.len(),
        },
        "annotations": {ANNOTATION_CREATED: created},
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest).expect("JSON value serializes"));
    let digest = sha256_digest(&manifest);
    let entry = serde_json::json!({
        "mediaType": MEDIA_OCI_MANIFEST,
        "digest": digest.to_string(),
        "size": manifest.len(),
        "artifactType": artifact_type,
        "annotations": {ANNOTATION_CREATED: created},
    });
    Artifact {
        manifest,
        digest,
        entry,
        blobs: stored,
    }
}

/// Adds `entry` to the `manifests` of an index (JSON kept as is otherwise), replacing an
/// entry with the same digest.
fn add_index_entry(
    index: &mut serde_json::Value,
    entry: serde_json::Value,
    what: &str,
) -> Result<()> {
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| Error::MediaType {
            reference: what.to_owned(),
            media_type: "index without manifests".to_owned(),
        })?;
    manifests.retain(|m| m.get("digest") != entry.get("digest"));
    manifests.push(entry);
    Ok(())
}

/// The newest descriptor by [`ANNOTATION_CREATED`], the last listed among equals.
/// Orders referrer descriptors newest first: by [`ANNOTATION_CREATED`], a later listing
/// before an earlier one among equals.
pub fn newest_first(descriptors: &mut Vec<Descriptor>) {
    let created = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_CREATED))
            .cloned()
    };
    let mut listed: Vec<(usize, Descriptor)> = descriptors.drain(..).enumerate().collect();
    listed.sort_by(|(i, a), (j, b)| created(b).cmp(&created(a)).then(j.cmp(i)));
    descriptors.extend(listed.into_iter().map(|(_, d)| d));
}

/// `YYYY-MM-DDTHH:MM:SS.NNNNNNNNNZ` (fixed width, so it sorts as text).
fn rfc3339(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = rfc3339_secs(since.as_secs() as i64);
    // Seconds precision ends in `Z`: put the nanoseconds before it.
    format!("{}.{:09}Z", &secs[..secs.len() - 1], since.subsec_nanos())
}

/// Seconds since the epoch (negative too) as RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339_secs(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

/// Works out a manifest's media type when the server or descriptor did not say: its
/// `mediaType` field, else `manifests` → OCI index, else OCI manifest.
fn sniff_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Probe {
            manifests: Some(_), ..
        }) => MEDIA_OCI_INDEX.to_owned(),
        _ => MEDIA_OCI_MANIFEST.to_owned(),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        what: what.to_owned(),
        source,
    })
}

fn pick_platform<'a>(
    index: &'a ImageIndex,
    platform: &Platform,
    index_digest: &Digest,
) -> Result<&'a Descriptor> {
    index
        .manifests()
        .iter()
        .find(|d| d.platform().as_ref().is_some_and(|p| platform.matches(p)))
        .ok_or_else(|| Error::NoPlatform {
            reference: index_digest.to_string(),
            platform: platform.clone(),
            available: index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Incremental digest check of a whole blob.
pub(crate) struct Verifier {
    digest: Digest,
    hasher: Hasher,
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Verifier {
    pub(crate) fn new(digest: &Digest) -> Result<Self> {
        let hasher = match digest.algorithm() {
            DigestAlgorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestAlgorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
            _ => return Err(Error::DigestAlgorithm(digest.to_string())),
        };
        Ok(Verifier {
            digest: digest.clone(),
            hasher,
        })
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match &mut self.hasher {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub(crate) fn finish(self) -> Result<()> {
        let (algo, hex) = match self.hasher {
            Hasher::Sha256(h) => ("sha256", hex::encode(h.finalize())),
            Hasher::Sha512(h) => ("sha512", hex::encode(h.finalize())),
        };
        if hex == self.digest.digest() {
            Ok(())
        } else {
            Err(Error::DigestMismatch {
                digest: self.digest.to_string(),
                actual: format!("{algo}:{hex}"),
            })
        }
    }
}

/// Checks `data` against `digest` in one go.
pub(crate) fn verify(digest: &Digest, data: &[u8]) -> Result<()> {
    let mut v = Verifier::new(digest)?;
    v.update(data);
    v.finish()
}

/// The sha256 digest of `data`.
pub fn sha256_digest(data: &[u8]) -> Digest {
    let hex = hex::encode(sha2::Sha256::digest(data));
    Digest::from_str(&format!("sha256:{hex}")).expect("sha256 hex is a valid digest")
}

/// Sees a range read's bytes as they arrive ([`BlobStore::read_range_or_whole_seen`]): the
/// range's first bytes, as many as are in so far, after each piece. A read retried after a
/// broken response starts again from the range's start with the same bytes (a blob is
/// content-addressed).
pub type RangeSeen<'a> = &'a (dyn Fn(&[u8]) + Send + Sync);

/// What [`BlobStore::read_range_or_whole`] got.
#[derive(Debug)]
pub enum RangeRead {
    /// The bytes asked for.
    Range(Bytes),
    /// The server ignored `Range:`: the whole blob, from byte 0.
    Whole(Box<BlobStream>),
}

/// A streaming read of a whole blob, verified at its end.
///
/// Chunks come out as they arrive; the digest is checked when the source is exhausted, so
/// the last call to [`BlobStream::chunk`] returns an error instead of `Ok(None)` on a
/// mismatch. Treat the data as unverified until `Ok(None)`. A remote stream that breaks off
/// is resumed at its offset with a `Range:` request, within the store's retry policy.
pub struct BlobStream {
    digest: Digest,
    position: u64,
    verifier: Option<Verifier>,
    /// The digest the content turned out to have, once it failed verification.
    mismatch: Option<String>,
    source: StreamSource,
    stats: Arc<Stats>,
}

enum StreamSource {
    Remote(remote::StreamState),
    Layout(layout::StreamState),
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("digest", &self.digest)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    /// The blob being read.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Bytes handed out so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next chunk; `Ok(None)` once the whole blob was read and verified.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        if let Some(actual) = &self.mismatch {
            // Sticky: a caller that asks again must not read the end as "verified".
            return Err(Error::DigestMismatch {
                digest: self.digest.to_string(),
                actual: actual.clone(),
            });
        }
        if self.verifier.is_none() {
            return Ok(None);
        }
        let next = match &mut self.source {
            StreamSource::Remote(s) => s.next(&self.digest, self.position).await?,
            StreamSource::Layout(s) => s.next().await?,
        };
        match next {
            Some(chunk) => {
                self.stats.add_bytes(chunk.len());
                self.position += chunk.len() as u64;
                if let Some(v) = &mut self.verifier {
                    v.update(&chunk);
                }
                Ok(Some(chunk))
            }
            None => {
                if let Some(v) = self.verifier.take() {
                    if let Err(e) = v.finish() {
                        if let Error::DigestMismatch { actual, .. } = &e {
                            self.mismatch = Some(actual.clone());
                        }
                        return Err(e);
                    }
                }
                Ok(None)
            }
        }
    }

    /// Bytes `offset..offset + len` of the blob, reading the stream up to them and
    /// dropping it there (the rest is never read: unverified, like any range read).
    pub async fn into_slice(mut self, offset: u64, len: u64) -> Result<Bytes> {
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        let end = offset + len;
        while (out.len() as u64) < len {
            let start = self.position;
            let Some(chunk) = self.chunk().await? else {
                return Err(Error::RangeBeyondEnd {
                    digest: self.digest.to_string(),
                    offset,
                    len,
                    size: self.position,
                });
            };
            let from = offset.saturating_sub(start).min(chunk.len() as u64) as usize;
            let to = (end.saturating_sub(start)).min(chunk.len() as u64) as usize;
            out.extend_from_slice(&chunk[from..to.max(from)]);
        }
        Ok(out.freeze())
    }

    /// The stream as a [`futures::Stream`] of chunks (ending with an error on mismatch).
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes>> + Send {
        futures::stream::try_unfold(self, |mut s| async move {
            Ok(s.chunk().await?.map(|chunk| (chunk, s)))
        })
    }

    /// A blocking [`std::io::Read`] over the stream, for a `tar`/`flate2` pass on a blocking
    /// thread (`tokio::task::spawn_blocking`). It must not be used on a runtime thread. A
    /// digest mismatch surfaces as an `InvalidData` read error carrying the [`Error`].
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    pub fn into_blocking_reader(self) -> BlockingBlobReader {
        BlockingBlobReader {
            stream: self,
            handle: tokio::runtime::Handle::current(),
            pending: Bytes::new(),
        }
    }
}

/// See [`BlobStream::into_blocking_reader`].
#[derive(Debug)]
pub struct BlockingBlobReader {
    stream: BlobStream,
    handle: tokio::runtime::Handle,
    pending: Bytes,
}

impl BlockingBlobReader {
    /// Bytes delivered by the underlying stream so far.
    pub fn position(&self) -> u64 {
        self.stream.position() - self.pending.len() as u64
    }
}

impl std::io::Read for BlockingBlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() {
            match self.handle.block_on(self.stream.chunk()) {
                Ok(Some(chunk)) => self.pending = chunk,
                Ok(None) => return Ok(0),
                Err(e) => {
                    let kind = if matches!(e, Error::DigestMismatch { .. }) {
                        std::io::ErrorKind::InvalidData
                    } else {
                        std::io::ErrorKind::Other
                    };
                    return Err(std::io::Error::new(kind, e));
                }
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fill engine spawns these futures on a multi-threaded runtime.
    #[allow(dead_code, clippy::let_underscore_future)]
    fn futures_are_send(store: &BlobStore, d: &Digest, stream: BlobStream) {
        fn send<T: Send>(_: T) {}
        send(store.resolve(None));
        send(store.read_range(d, 0, 1));
        send(store.open_stream(d));
        send(store.fetch_blob(d, 1));
        send(store.push_artifact(d, "t", Vec::new()));
        send(store.find_referrer(d, "t"));
        send(BlobStore::open(
            &"oci:x".parse().unwrap(),
            &Options::default(),
        ));
        send(stream.into_stream());
    }

    #[test]
    fn platform_parse_and_match() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
        let entry = |arch: &str, variant: Option<&str>| {
            let mut b = oci_spec::image::PlatformBuilder::default()
                .os("linux")
                .architecture(arch);
            if let Some(v) = variant {
                b = b.variant(v);
            }
            b.build().unwrap()
        };
        assert!(p.matches(&entry("arm64", None)));
        assert!(p.matches(&entry("arm64", Some("v8"))));
        assert!(!p.matches(&entry("arm64", Some("v9"))));
        assert!(!p.matches(&entry("amd64", None)));
        let any_arm: Platform = "linux/arm".parse().unwrap();
        assert!(any_arm.matches(&entry("arm", Some("v6"))));
    }

    #[test]
    fn host_platform_names() {
        assert_eq!(oci_arch("x86_64"), ("amd64", None));
        assert_eq!(oci_arch("aarch64"), ("arm64", None));
        assert_eq!(oci_arch("x86"), ("386", None));
        assert_eq!(oci_arch("riscv64"), ("riscv64", None));
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host.to_string(), "linux/amd64");
        }
    }

    #[test]
    fn verify_digests() {
        let d = sha256_digest(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        verify(&d, b"hello").unwrap();
        let err = verify(&d, b"hellO").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }));
        assert!(err.to_string().contains(&d.to_string()), "{err}");
        let d512: Digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(b"x")))
            .parse()
            .unwrap();
        verify(&d512, b"x").unwrap();
    }

    #[test]
    fn timestamps_and_newest() {
        let t = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(rfc3339(t(0)), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(t(951_782_400)), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(rfc3339(t(1_798_761_599)), "2026-12-31T23:59:59.000000000Z");
        let desc = |n: u8, created: Option<&str>| {
            let mut d = Descriptor::new(MEDIA_OCI_MANIFEST.into(), 1, sha256_digest(&[n]));
            d.set_annotations(
                created.map(|c| [(ANNOTATION_CREATED.to_owned(), c.to_owned())].into()),
            );
            d
        };
        let a = desc(1, Some("2026-01-02T00:00:00.000000000Z"));
        let b = desc(2, Some("2026-01-01T00:00:00.000000000Z"));
        let c = desc(3, None);
        let sorted = |mut v: Vec<Descriptor>| {
            newest_first(&mut v);
            v
        };
        assert_eq!(
            sorted(vec![a.clone(), b.clone(), c.clone()]),
            vec![a.clone(), b.clone(), c.clone()]
        );
        assert_eq!(
            sorted(vec![c.clone(), b.clone()]),
            vec![b.clone(), c.clone()]
        );
        // Among equals (no creation time), the later listing first.
        assert_eq!(
            sorted(vec![c.clone(), desc(4, None)]),
            vec![desc(4, None), c.clone()]
        );
        assert_eq!(sorted(Vec::new()), Vec::<Descriptor>::new());
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            MEDIA_DOCKER_MANIFEST
        );
        assert_eq!(sniff_media_type(br#"{"manifests":[]}"#), MEDIA_OCI_INDEX);
        assert_eq!(sniff_media_type(br#"{"layers":[]}"#), MEDIA_OCI_MANIFEST);
    }

    #[test]
    fn transient_classes() {
        let status = |status| Error::Status {
            method: "GET".into(),
            url: "u".into(),
            status,
            code: None,
            retry_after: None,
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(403).is_transient());
        assert!(
            Error::ShortRead {
                what: "x".into(),
                got: 1,
                want: 2
            }
            .is_transient()
        );
        assert!(!Error::NotFound { what: "x".into() }.is_transient());
        assert_eq!(status(500).to_string(), "GET u: HTTP 500");
    }
}
