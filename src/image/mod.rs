//! Image preparation: from an image reference to a served placeholder tree.
//!
//! Owns the sequence that makes an image lazy: resolve the reference to one manifest, get
//! one [`LayerIndex`](crate::index::LayerIndex) per layer (the local index store first,
//! then the index artifact in the registry, else one streaming pass over the layer), unpack
//! the placeholders (direct or overlay), and register every placeholder with the fill
//! engine together with its layer's reader (one per layer, keyed by entry: [`FileSource`])
//! that fetches a file range as an HTTP range read of the compressed span and inflates it,
//! and checks every filled byte against the index's digests. It also builds and pushes the index artifact (`fanfill index
//! --push`).
//!
//! Layers that carry their own table of contents (eStargz, zstd:chunked: [`crate::toc`])
//! need no index: their TOC is fetched by range and verified, and their files are served by
//! a [`TocLayerReader`](crate::toc::TocLayerReader); [`ImageSources::file_source`] is the
//! one place that picks a file's source and the digests the engine checks.
//!
//! Every layer pulls: a layer whose TOC cannot be read (an unknown or broken TOC, an
//! unexpected footer) or whose media type announces no TOC is streamed once, indexed as it
//! passes and kept in the blob cache, and its files are served from there; a warning names
//! the layer and the reason. A pull fails only when the image itself cannot be had: its
//! manifest or config, a layer's bytes (unreachable, or not hashing to the digest the
//! manifest names), or a layer that is not a tar stream.
//!
//! Only index *metadata* travels before the placeholders are ready. The checkpoint windows
//! stay where they are (the artifact's windows blob in the registry, the `.win` file of the
//! local index store) and a layer's reader reads the one window a fill needs, once, by
//! a range read, through a cache shared by the image's layers ([`WINDOW_CACHE_BYTES`]). It never speaks HTTP
//! itself ([`crate::registry`]), parses tar or gzip ([`crate::index`]), creates files
//! ([`crate::unpack`]) or touches fanotify ([`crate::fill`]).
//!
//! Layout: this file holds the public types (the errors, [`PrepareOptions`], [`Prepared`],
//! [`AccessProfile`]) and re-exports the rest, one submodule per concern: `indexes` gets
//! every layer's index (and builds and pushes the artifact), `sources` reads a file's bytes,
//! `register` unpacks the placeholders and registers them (`prepare`), `stream` completes an
//! image one sequential read per layer, `profile` fills an access profile ahead of the
//! workload.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::fill::{FileId, FillError};
use crate::index::IndexError;
use crate::registry::{self, BlobStore, Platform};
use crate::signature::VerifyKey;
use crate::unpack::{Mode, UnpackError, Unpacked};

mod indexes;
mod profile;
mod register;
mod sources;
mod startset;
mod stream;
pub use indexes::{
    ImageIndexes, RANDOM_ACCESS_GAP_MAX, index_image, index_image_with_profile, load_indexes, open,
    random_access_gap, sign_artifact,
};
pub use profile::{EntryKey, GAP_MAX, ProfileFill, ProfileRead, SPAN_MAX, SpanFile};
pub use register::{
    PrefillFn, Registration, SourceFn, TREE_XATTR, mark_tree, mark_tree_dir, prepare,
    remove_tree_contents, tree_image,
};
pub use sources::{FileSource, ImageSources, READ_AROUND, pipelined_reads, verify_for};
pub use startset::start_set;
pub use stream::{STREAM_PARALLEL, StreamFill, stream_fill_layer, stream_parallel};

/// `artifactType` of the layer-index artifact a `fanfill index --push` attaches to an image
/// manifest as a referrer.
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.fanfill.index.v2";
/// Media type of one layer's encoded index metadata inside that artifact (see
/// `docs/index-format.md`). `prepare` downloads these blobs whole.
pub const INDEX_LAYER_MEDIA_TYPE: &str = "application/vnd.fanfill.layer-index.v2";
/// Media type of one layer's windows pack inside that artifact. Never downloaded whole: a
/// fill reads the one window it needs by a range read.
pub const INDEX_WINDOWS_MEDIA_TYPE: &str = "application/vnd.fanfill.layer-index.windows.v2";
/// Media type of the access profile an index artifact may carry (`fanfill index --push
/// --profile`): the files a recorded run of the image's workload read, in the order it first
/// read them ([`AccessProfile`]). `prepare` fills them in the background at once.
pub const ACCESS_PROFILE_MEDIA_TYPE: &str = "application/vnd.fanfill.access-profile.v1+json";
/// Memory for checkpoint windows shared by the layers of one prepared image (256 windows).
pub const WINDOW_CACHE_BYTES: usize = 8 << 20;

/// Errors while preparing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference did not parse.
    #[error("bad image reference")]
    Reference(#[from] crate::reference::Error),
    /// The registry or layout failed.
    #[error("image {reference}")]
    Registry {
        /// The image.
        reference: String,
        /// The registry error.
        #[source]
        source: Box<registry::Error>,
    },
    /// A layer could not be indexed or its index could not be read.
    #[error("layer {layer} of {reference}")]
    Index {
        /// The image.
        reference: String,
        /// The layer digest.
        layer: String,
        /// The index error.
        #[source]
        source: IndexError,
    },
    /// An index does not describe the layer it was filed under.
    #[error("index for layer {layer} describes blob {found}")]
    IndexMismatch {
        /// The layer digest.
        layer: String,
        /// The blob digest recorded in the index.
        found: String,
    },
    /// Unpacking placeholders failed.
    #[error("unpacking {reference} into {dest}")]
    Unpack {
        /// The image.
        reference: String,
        /// The destination.
        dest: PathBuf,
        /// The unpack error.
        #[source]
        source: Box<UnpackError>,
    },
    /// Registering placeholders with the fill engine failed.
    #[error("serving placeholders of {reference}")]
    Fill {
        /// The image.
        reference: String,
        /// The engine error.
        #[source]
        source: FillError,
    },
    /// A layer's bytes, read whole by its background completion, do not hash to its
    /// digest: the registry (or the local copy) serves another blob than the manifest names.
    #[error("layer {layer}: its bytes hash to {actual}, not to the layer's digest")]
    LayerDigest {
        /// The layer digest.
        layer: String,
        /// The sha256 its bytes have.
        actual: String,
    },
    /// Streaming a layer into its placeholders failed (prefetch).
    #[error("streaming layer {layer} into its placeholders")]
    Stream {
        /// The layer digest.
        layer: String,
        /// What failed: the blob read or its decompression.
        #[source]
        source: io::Error,
    },
    /// An internal task failed.
    #[error("background task failed: {0}")]
    Task(String),
}

/// The files a workload read, in the order it first read them, by their paths in the image
/// (as the layer indexes name them). Recorded from a served tree ([`Prepared::access_profile`],
/// `fanfill pull --record-profile`), published in the index artifact, and filled ahead of
/// the workload by the next `prepare` ([`PrepareOptions::profile_prefetch`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessProfile {
    /// Format version (1).
    pub version: u32,
    /// Image paths, first access first.
    pub files: Vec<String>,
}

impl AccessProfile {
    /// Most paths a profile may list (a hostile artifact cannot make `prepare` spend more).
    pub const MAX_FILES: usize = 100_000;

    /// Parses a profile, refusing unknown versions and oversized lists.
    pub fn from_json(bytes: &[u8]) -> Result<AccessProfile, String> {
        let p: AccessProfile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if p.version != 1 {
            return Err(format!(
                "access profile version {} (this build reads 1)",
                p.version
            ));
        }
        if p.files.len() > Self::MAX_FILES {
            return Err(format!(
                "access profile lists {} files (at most {})",
                p.files.len(),
                Self::MAX_FILES
            ));
        }
        Ok(p)
    }
}

/// Where a layer's index came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexOrigin {
    /// The local index store (an earlier pull or `fanfill index`).
    Local,
    /// The index artifact in the registry (nothing but the index travelled).
    Artifact,
    /// Built now by streaming the whole layer once.
    Built,
    /// The layer's own table of contents (eStargz, zstd:chunked): no index needed, only the
    /// TOC travelled.
    Toc,
}

impl IndexOrigin {
    /// One word for reports: `local`, `artifact`, `built`, `toc`.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexOrigin::Local => "local",
            IndexOrigin::Artifact => "artifact",
            IndexOrigin::Built => "built",
            IndexOrigin::Toc => "toc",
        }
    }
}

/// How to prepare an image.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Direct (one flattened tree) or overlay (one tree per layer).
    pub mode: Mode,
    /// Registry access: TLS, credentials, mirrors, retries.
    pub registry: registry::Options,
    /// Platform to pick from a multi-arch index (default: this host).
    pub platform: Option<Platform>,
    /// Where layer indexes are kept, by layer digest.
    pub index_dir: PathBuf,
    /// Look for the index artifact in the registry before streaming layers.
    pub use_artifact: bool,
    /// Keep layers that have to be streamed whole (no index yet) here, so their fills are
    /// local reads instead of second downloads (`None`: do not keep them).
    pub blob_cache: Option<PathBuf>,
    /// Under the `signed` index policy: the key an index artifact must be signed with
    /// (`None`: an artifact is taken unsigned, when `use_artifact` allows one at all).
    pub index_key: Option<VerifyKey>,
    /// Reads of the artifact's access profile in flight at once ([`ImageSources::start_profile`]:
    /// coalesced range reads started as soon as the indexes are in, written once the
    /// placeholders exist); 0: ignore profiles. Default 8.
    pub profile_prefetch: usize,
    /// Fill the image's start set ahead like an access profile's files, before them when
    /// there is a profile ([`start_set`]: the user, group and loader files, the shell, the
    /// time zone, the program interpreter and C library, the config's entrypoint). Default
    /// true.
    pub start_set: bool,
    /// Bytes of a layer's stream a whole-file read of a small file also reads past it,
    /// filling the files wholly inside ([`ImageSources::read_around`]); 0: off. Default
    /// [`READ_AROUND`].
    pub read_around: u64,
}

/// Which layer indexes a prepare takes file digests and metadata from (`--index-policy`).
/// An eStargz or zstd:chunked TOC whose digest the manifest names is bound to the image
/// under every policy.
#[derive(Debug, Clone, Default)]
pub enum IndexPolicy {
    /// Only indexes built on this node from the layer stream, which is verified against the
    /// layer digest the manifest names: an image pulled by digest keeps its integrity. The
    /// first prepare of a layer streams it whole. The default.
    #[default]
    Local,
    /// Also an index artifact among the image's referrers, but only one signed with this
    /// key (a cosign signature, [`crate::signature`]) and whose subject is the image: the
    /// newest such artifact; unsigned ones, or ones signed with another key, are ignored
    /// (logged). A lazy first start without trusting every writer of the repository.
    Signed(VerifyKey),
    /// Also the newest index artifact among the image's referrers, trusted on sight: anyone
    /// with push rights to the repository can attach one, and nothing binds it to the
    /// image. Only for repositories whose every writer is trusted.
    Referrer,
}

impl IndexPolicy {
    /// `opts` restricted to this policy (a referrer artifact is looked for only under
    /// [`IndexPolicy::Signed`] and [`IndexPolicy::Referrer`], and then only if the options
    /// ask for it; under `Signed` it must carry the key's signature).
    pub fn apply(&self, opts: &mut PrepareOptions) {
        match self {
            IndexPolicy::Local => opts.use_artifact = false,
            IndexPolicy::Signed(key) => opts.index_key = Some(key.clone()),
            IndexPolicy::Referrer => {}
        }
    }

    /// The policy's name, as `--index-policy` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            IndexPolicy::Local => "local",
            IndexPolicy::Signed(_) => "signed",
            IndexPolicy::Referrer => "referrer",
        }
    }
}

/// Registry settings that do not parse (`creds`, `platform`).
#[derive(Debug, thiserror::Error)]
#[error("bad {what}: {message}")]
pub struct SettingsError {
    /// Which setting.
    pub what: &'static str,
    /// Why.
    pub message: String,
}

impl PrepareOptions {
    /// Options from the registry settings of a request (or the CLI's flags).
    pub fn from_settings(
        index_dir: impl Into<PathBuf>,
        r: &crate::api::RegistrySettings,
    ) -> Result<PrepareOptions, SettingsError> {
        let bad = |what, e: &dyn std::fmt::Display| SettingsError {
            what,
            message: e.to_string(),
        };
        let mut o = PrepareOptions::new(index_dir);
        o.registry.insecure = r.insecure;
        o.registry.creds = r
            .creds
            .as_deref()
            .map(str::parse::<registry::Credentials>)
            .transpose()
            .map_err(|e| bad("--creds", &e))?;
        o.registry.authfile = r.authfile.clone();
        o.registry.cert_dir = r.cert_dir.clone();
        o.registry.hosts_dir = r.hosts_dir.clone();
        o.registry.mirrors = r
            .mirrors
            .iter()
            .map(|m| registry::Mirror {
                location: m.clone(),
                insecure: r.insecure,
            })
            .collect();
        o.platform = r
            .platform
            .as_deref()
            .map(str::parse::<Platform>)
            .transpose()
            .map_err(|e| bad("--platform", &e))?;
        o.use_artifact = !r.no_index_artifact;
        Ok(o)
    }

    /// Defaults: direct mode, the host platform, indexes under `index_dir`.
    /// Streamed layers are kept in `blobs` beside `index_dir`.
    pub fn new(index_dir: impl Into<PathBuf>) -> PrepareOptions {
        let index_dir: PathBuf = index_dir.into();
        PrepareOptions {
            mode: Mode::Direct,
            registry: registry::Options::default(),
            platform: None,
            blob_cache: Some(index_dir.with_file_name("blobs")),
            index_dir,
            use_artifact: true,
            index_key: None,
            profile_prefetch: 8,
            start_set: true,
            read_around: READ_AROUND,
        }
    }

    /// These options for a prepare that records an access profile
    /// ([`Prepared::access_profile`]): nothing is filled ahead of the workload (no start
    /// set, no read-around, no published profile), since a file is recorded when a reader
    /// misses it and one filled ahead would be left out. Run no background completion
    /// beside it either.
    pub fn for_recording(mut self) -> PrepareOptions {
        self.start_set = false;
        self.read_around = 0;
        self.profile_prefetch = 0;
        self
    }
}

/// An image whose placeholders are ready and served.
#[derive(Debug)]
pub struct Prepared {
    /// The reference as given.
    pub reference: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// The placeholder tree (direct) or the directory of layer trees (overlay).
    pub dest: PathBuf,
    /// What the unpack created; in overlay mode also the lower directories.
    pub unpacked: Unpacked,
    /// The engine's ids of the registered placeholders.
    pub files: Vec<FileId>,
    /// The same ids in prefetch order: the files TOC layers name to prefetch first (eStargz
    /// `.prefetch.landmark`), then the rest (see [`Engine::fill_files`](crate::fill::Engine::fill_files)).
    pub prefetch_order: Vec<FileId>,
    /// Where each layer's index came from, lowest layer first.
    pub index_origins: Vec<IndexOrigin>,
    /// Bytes the prepare waited for from the registry or layout: manifest, configuration,
    /// indexes or TOCs, and any layer streamed to build its index. The start set's and the
    /// access profile's files, fetched ahead while the placeholders are unpacked, are left
    /// out (how far they get by then depends on the unpack's pace); `store` counts them.
    pub bytes_before_ready: u64,
    /// Sum of the compressed layer sizes.
    pub image_size: u64,
    /// The store the placeholders fill from (its counters keep running).
    pub store: Arc<BlobStore>,
    /// The sources of the image's files, by layer (for [`Prepared::prefetch`] and
    /// [`Prepared::access_profile`]).
    pub sources: ImageSources,
    /// Files being filled ahead of the workload: the start set's and the access profile's
    /// (0: neither, or [`PrepareOptions::profile_prefetch`] is 0).
    pub profile_files: usize,
    /// How long each step of the prepare took.
    pub timings: PrepareTimings,
}

/// Wall time of the steps of one [`prepare`]: what `examples/placeholder_bench.rs` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareTimings {
    /// Resolving the reference and getting every layer's index (or TOC).
    pub indexes: std::time::Duration,
    /// Creating the placeholder tree.
    pub unpack: std::time::Duration,
    /// Registering every placeholder with the engine (its inode mark included) and the
    /// bookkeeping after it.
    pub register: std::time::Duration,
    /// The whole prepare, from the reference to served placeholders.
    pub total: std::time::Duration,
}
