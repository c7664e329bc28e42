//! Loading an image's layer indexes: from a reference to one index (or TOC entry table) per
//! layer, and the index artifact that publishes them.
//!
//! Owns resolving the reference ([`open`]) and finding every layer's index ([`load_indexes`]):
//! the local index store first, then the layer's own TOC, then the index artifact among the
//! image's referrers ([`artifact_indexes`]), else one streaming pass over the layer that
//! builds the index and keeps the blob; an index whose random-access points lie too far apart
//! ([`random_access_gap`]) is dropped for that pass. Also the access profile that comes with
//! the indexes (the artifact's, else the TOC layers' landmark files) and building and pushing
//! the artifact ([`index_image`]). Only index metadata moves here: it never reads a file's
//! bytes ([`super::sources`]), never touches the placeholder tree or the engine
//! ([`super::register`]).

use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use oci_spec::image::Digest;
use tracing::{debug, info, warn};

use super::sources::RemoteWindows;
use super::{
    ACCESS_PROFILE_MEDIA_TYPE, AccessProfile, INDEX_ARTIFACT_TYPE, INDEX_LAYER_MEDIA_TYPE,
    INDEX_WINDOWS_MEDIA_TYPE, ImageError, IndexOrigin, PrepareOptions,
};
use crate::blobcache::{BlobCache, Tee};
use crate::index::{IndexError, IndexOptions, IndexStore, LayerIndex, WindowSource};
use crate::reference::Reference;
use crate::registry::{self, BlobStore};
use crate::signature::{self, VerifyKey};
use crate::toc::{self, TocLayer};

/// The indexes of an image's layers, with where each came from.
pub struct ImageIndexes {
    /// The resolved image.
    pub image: registry::ResolvedImage,
    /// One index per layer, lowest first.
    pub layers: Vec<(Digest, Arc<LayerIndex>, IndexOrigin)>,
    /// Where each layer's checkpoint windows are read from, lowest first.
    pub windows: Vec<Arc<dyn WindowSource>>,
    /// Where layers that travelled whole are kept (read before the registry).
    pub blob_cache: Option<BlobCache>,
    /// The access profile to fill ahead: the image's start set first
    /// ([`PrepareOptions::start_set`]), then the index artifact's profile, when it was read
    /// and carries one, else the files TOC layers name to prefetch first (an optimized
    /// eStargz's prioritized files).
    pub profile: Option<AccessProfile>,
    /// Per layer, lowest first: its table of contents when it is a TOC layer
    /// ([`IndexOrigin::Toc`]; `layers` then holds the TOC's entry table).
    pub tocs: Vec<Option<Arc<TocLayer>>>,
}

type Found = (Arc<LayerIndex>, Arc<dyn WindowSource>, IndexOrigin);

fn reg_err(reference: &str) -> impl Fn(registry::Error) -> ImageError + '_ {
    move |source| ImageError::Registry {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}

/// Opens the store of `reference` and resolves it to one image manifest (its configuration
/// is fetched by [`load_indexes`], beside the indexes).
pub async fn open(
    reference: &str,
    opts: &PrepareOptions,
) -> Result<(Arc<BlobStore>, registry::ResolvedManifest), ImageError> {
    let parsed: Reference = reference.parse()?;
    let store = BlobStore::open(&parsed, &opts.registry)
        .await
        .map_err(reg_err(reference))?;
    let image = store
        .resolve_manifest(opts.platform.as_ref())
        .await
        .map_err(reg_err(reference))?;
    Ok((Arc::new(store), image))
}

/// Gets an index for every layer of the image: local store, artifact, or one streaming pass
/// (the result is saved locally). The image's configuration is fetched at the same time: it
/// is needed only for the start set, at the end, and each round trip before the
/// placeholders is one the container waits for.
pub async fn load_indexes(
    store: &Arc<BlobStore>,
    image: registry::ResolvedManifest,
    reference: &str,
    opts: &PrepareOptions,
) -> Result<ImageIndexes, ImageError> {
    let config = async {
        store
            .fetch_config(&image.manifest)
            .await
            .map_err(reg_err(reference))
    };
    let (config, found) =
        futures::future::try_join(config, find_indexes(store, &image, reference, opts)).await?;
    let FoundIndexes {
        layers,
        windows,
        blob_cache,
        tocs,
        profile,
    } = found;
    let image = image.with_config(config);
    // Without a recorded profile, the files an optimized eStargz lists before its
    // `.prefetch.landmark` (`ctr-remote image optimize`: what its workload read) are one.
    let mut profile = profile.or_else(|| landmark_profile(&tocs));
    if opts.start_set {
        // What nearly every start reads (a hint: no file of it is required), first, then
        // the profile's files: a profile recorded by running the workload outside a
        // container (`pull --record-profile` and a chroot) lacks what the runtime reads
        // to start it (the user and group files, the shell of `sh -c`). A map of every
        // entry of every layer: off the async threads.
        let ixs: Vec<Arc<LayerIndex>> = layers.iter().map(|l| l.1.clone()).collect();
        let config = image.config.clone();
        let t = std::time::Instant::now();
        let start = tokio::task::spawn_blocking(move || super::start_set(&config, &ixs))
            .await
            .map_err(|e| ImageError::Task(e.to_string()))?;
        debug!(files = ?start, us = t.elapsed().as_micros() as u64, "start set");
        match &mut profile {
            None => info!(
                files = start.len(),
                "no access profile: the image's start set is filled ahead"
            ),
            Some(p) if !start.is_empty() => info!(
                files = p.files.len(),
                start_set = start.len(),
                "the start set is filled ahead before the access profile"
            ),
            Some(_) => {}
        }
        profile = with_start_set(profile, start);
    }
    Ok(ImageIndexes {
        image,
        layers,
        windows,
        blob_cache,
        tocs,
        profile,
    })
}

/// What [`find_indexes`] finds: the fields of [`ImageIndexes`] but the image, and the index
/// artifact's own access profile.
struct FoundIndexes {
    layers: Vec<(Digest, Arc<LayerIndex>, IndexOrigin)>,
    windows: Vec<Arc<dyn WindowSource>>,
    blob_cache: Option<BlobCache>,
    tocs: Vec<Option<Arc<TocLayer>>>,
    profile: Option<AccessProfile>,
}

/// [`load_indexes`] but for the configuration and the start set.
async fn find_indexes(
    store: &Arc<BlobStore>,
    image: &registry::ResolvedManifest,
    reference: &str,
    opts: &PrepareOptions,
) -> Result<FoundIndexes, ImageError> {
    let local = IndexStore::new(&opts.index_dir);
    let idx_err = |layer: &Digest| {
        let (reference, layer) = (reference.to_string(), layer.to_string());
        move |source| ImageError::Index {
            reference,
            layer,
            source,
        }
    };
    let blob_cache = opts.blob_cache.as_ref().map(BlobCache::new);
    let mut found: Vec<Option<Found>> = Vec::new();
    let mut profile = None;
    let mut tocs: Vec<Option<Arc<TocLayer>>> = Vec::new();
    let toc_found = |t: TocLayer| -> (Option<Found>, Option<Arc<TocLayer>>) {
        info!(layer = %t.index.blob_digest, format = ?t.format, entries = t.index.entries.len(), toc_bytes = t.toc_bytes_fetched, "layer read through its table of contents");
        let ix: Arc<LayerIndex> = Arc::new(t.index.clone());
        let windows: Arc<dyn WindowSource> = Arc::new(crate::index::NoWindows);
        (Some((ix, windows, IndexOrigin::Toc)), Some(Arc::new(t)))
    };
    // Per layer: whether its TOC (announced or found by a footer probe) was tried already.
    let mut toc_tried = Vec::new();
    for desc in image.manifest.layers() {
        let digest = desc.digest().to_string();
        // An index built by streaming the layer (an earlier pull that could not read it
        // lazily) comes first: it is local, and its TOC would fail again.
        let hit = match local.load_shared(&digest).map_err(idx_err(desc.digest()))? {
            Some(ix) => {
                let windows = local.open_windows(&ix).map_err(idx_err(desc.digest()))?;
                Some((ix, windows, IndexOrigin::Local))
            }
            None => None,
        };
        // A layer that announces its TOC needs nothing else, if the TOC reads.
        let announced = toc::detect(desc).filter(|_| hit.is_none());
        toc_tried.push(announced.is_some());
        if let Some(format) = announced {
            match toc::load(store, desc, blob_cache.as_ref()).await {
                Ok(Some(t)) => {
                    let (f, t) = toc_found(t);
                    found.push(f);
                    tocs.push(t);
                    continue;
                }
                Ok(None) => warn!(
                    layer = %digest,
                    media_type = %desc.media_type(),
                    format = format.as_str(),
                    reason = "the layer announces a TOC but has none",
                    "cannot read the layer lazily; it will be streamed once and served from the blob cache"
                ),
                Err(e) => warn!(
                    layer = %digest,
                    media_type = %desc.media_type(),
                    format = format.as_str(),
                    reason = %crate::fill::error_chain(&e),
                    "cannot read the layer lazily; it will be streamed once and served from the blob cache"
                ),
            }
        }
        tocs.push(None);
        found.push(hit);
    }
    if opts.use_artifact && found.iter().any(Option::is_none) {
        match artifact_indexes(store, &image.manifest_digest, opts.index_key.as_ref()).await {
            Ok((mut list, p)) => {
                profile = p;
                // Artifact metadata is not stored locally: it is small, and its windows stay
                // in the registry (the local store keeps only complete pairs).
                for (slot, desc) in found.iter_mut().zip(image.manifest.layers()) {
                    if slot.is_some() {
                        continue;
                    }
                    let want = desc.digest().to_string();
                    if let Some(pos) = list.iter().position(|(ix, _)| ix.blob_digest == want) {
                        let (ix, windows) = list.swap_remove(pos);
                        *slot = Some((Arc::new(ix), windows, IndexOrigin::Artifact));
                    }
                }
            }
            Err(e) => debug!(error = %crate::fill::error_chain(&e), "no usable index artifact"),
        }
    }
    // An index that cannot serve ranges cheaply (a zstd layer written as one frame, or
    // frames far apart: every fill would inflate from a frame start it has to fetch again) is
    // worth less than the layer itself: stream the layer once into the blob cache instead.
    if let Some(cache) = &blob_cache {
        for (slot, desc) in found.iter_mut().zip(image.manifest.layers()) {
            let Some((ix, _, origin)) = slot.as_ref().filter(|f| f.2 != IndexOrigin::Toc) else {
                continue;
            };
            let gap = random_access_gap(ix);
            if gap > RANDOM_ACCESS_GAP_MAX && !cache.contains(desc.digest().as_ref()) {
                warn!(
                    layer = %desc.digest(),
                    media_type = %desc.media_type(),
                    index = origin.as_str(),
                    gap,
                    reason = "its random-access points lie too far apart",
                    "cannot read the layer lazily; it will be streamed once and served from the blob cache"
                );
                *slot = None;
            }
        }
    }
    // No index anywhere: a gzip layer may still be eStargz without the annotation (its
    // footer tells, for one small range read).
    for (((slot, toc_slot), desc), tried) in found
        .iter_mut()
        .zip(tocs.iter_mut())
        .zip(image.manifest.layers())
        .zip(&toc_tried)
    {
        if slot.is_some() || *tried {
            continue;
        }
        match toc::load(store, desc, blob_cache.as_ref()).await {
            Ok(Some(t)) => (*slot, *toc_slot) = toc_found(t),
            Ok(None) => {}
            Err(e) => warn!(
                layer = %desc.digest(),
                media_type = %desc.media_type(),
                reason = %crate::fill::error_chain(&e),
                "cannot read the layer lazily (its footer names a TOC that does not read); it will be streamed once and served from the blob cache"
            ),
        }
    }
    let mut layers = Vec::new();
    let mut windows = Vec::new();
    for (slot, desc) in found.into_iter().zip(image.manifest.layers()) {
        let digest = desc.digest().clone();
        let (ix, win, origin) = match slot {
            Some(hit) => hit,
            None => {
                info!(layer = %digest, size = desc.size(), "no index for layer: streaming it once");
                let stream = store
                    .open_stream(&digest)
                    .await
                    .map_err(reg_err(reference))?;
                let reader = stream.into_blocking_reader();
                let iopts = IndexOptions {
                    media_type: Some(desc.media_type().to_string()),
                    ..IndexOptions::default()
                };
                // The layer travels whole anyway: keep it, so fills read it locally.
                let mut reader = match &opts.blob_cache {
                    Some(dir) => BlobCache::new(dir).tee(digest.as_ref(), reader),
                    None => Tee::passthrough(reader),
                };
                let (built, pack) = tokio::task::spawn_blocking(move || {
                    let built = LayerIndex::build(&mut reader, &iopts)?;
                    if let Err(e) = reader.finish() {
                        warn!(error = %e, "keeping the streamed layer failed");
                    }
                    Ok::<_, IndexError>(built)
                })
                .await
                .map_err(|e| ImageError::Task(e.to_string()))?
                .map_err(idx_err(&digest))?;
                local.save(&built, &pack).map_err(idx_err(&digest))?;
                let win = local.open_windows(&built).map_err(idx_err(&digest))?;
                (Arc::new(built), win, IndexOrigin::Built)
            }
        };
        if ix.blob_digest != digest.to_string() {
            return Err(ImageError::IndexMismatch {
                layer: digest.to_string(),
                found: ix.blob_digest.clone(),
            });
        }
        layers.push((digest, ix, origin));
        windows.push(win);
    }
    Ok(FoundIndexes {
        layers,
        windows,
        blob_cache,
        tocs,
        profile,
    })
}

/// `start` (the image's start set), then the files of `profile` not in it, as one
/// profile (at most [`AccessProfile::MAX_FILES`]); `None` when both are empty.
fn with_start_set(profile: Option<AccessProfile>, start: Vec<String>) -> Option<AccessProfile> {
    let mut seen: std::collections::HashSet<String> = start.iter().cloned().collect();
    let mut files = start;
    for f in profile.map(|p| p.files).unwrap_or_default() {
        if files.len() >= AccessProfile::MAX_FILES {
            break;
        }
        if seen.insert(f.clone()) {
            files.push(f);
        }
    }
    (!files.is_empty()).then_some(AccessProfile { version: 1, files })
}

/// The files the TOC layers name to prefetch first (eStargz entries before
/// `.prefetch.landmark`, lowest layer first, in TOC order) as an access profile, filled
/// ahead of the workload like a recorded one; `None` when no layer names any.
fn landmark_profile(tocs: &[Option<Arc<TocLayer>>]) -> Option<AccessProfile> {
    let mut seen = std::collections::HashSet::new();
    let files: Vec<String> = tocs
        .iter()
        .flatten()
        .flat_map(|t| {
            t.prefetch_first
                .iter()
                .filter_map(|&e| t.index.entries.get(e).map(|e| e.path.to_string()))
        })
        .filter(|p| seen.insert(p.clone()))
        .take(AccessProfile::MAX_FILES)
        .collect();
    if files.is_empty() {
        return None;
    }
    info!(
        files = files.len(),
        "the layers' prioritized files (before the eStargz landmark) are filled ahead as a profile"
    );
    Some(AccessProfile { version: 1, files })
}

/// Largest distance, in compressed bytes, between a layer's random-access points
/// ([`random_access_gap`]) for it to be read by ranges: farther apart, a fill would fetch
/// and inflate up to this much from the point before it, again for every fill.
pub const RANDOM_ACCESS_GAP_MAX: u64 = 8 << 20;

/// The largest compressed distance between consecutive checkpoints of `ix` (and from the
/// last one to the blob's end); 0 for an uncompressed layer, which needs none.
pub fn random_access_gap(ix: &LayerIndex) -> u64 {
    if ix.compression == crate::index::Compression::None {
        return 0;
    }
    let mut points: Vec<u64> = ix.checkpoints.iter().map(|c| c.compressed_offset).collect();
    points.push(ix.compressed_size);
    let first = points.first().copied().unwrap_or(0);
    points
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0)
        .max(first)
}

/// The layer indexes of the image's index artifact, each with its windows pack blob as a
/// window source, and its access profile if it has one. Downloads the metadata blobs only.
async fn artifact_indexes(
    store: &Arc<BlobStore>,
    subject: &Digest,
    key: Option<&VerifyKey>,
) -> Result<
    (
        Vec<(LayerIndex, Arc<dyn WindowSource>)>,
        Option<AccessProfile>,
    ),
    ImageError,
> {
    let found = match key {
        Some(key) => signed_referrer(store, subject, key).await?,
        None => {
            let referrer = store
                .find_referrer(subject, INDEX_ARTIFACT_TYPE)
                .await
                .map_err(reg_err("index artifact"))?;
            match referrer {
                Some(r) => {
                    let fetched = fetch_metadata(store, &r).await;
                    Some((r, fetched))
                }
                None => None,
            }
        }
    };
    let Some((referrer, mut fetched)) = found else {
        return Ok((Vec::new(), None));
    };
    let blobs = referrer.manifest.layers();
    let profile_blob = profile_blob(&referrer);
    let mut out = Vec::new();
    let mut profile = None;
    let decoding = std::time::Instant::now();
    let mut pending = Vec::new();
    for (i, blob) in blobs.iter().enumerate() {
        let media_type = blob.media_type().to_string();
        if Some(i) == profile_blob
            && let Some(got) = fetched[i].take()
        {
            let parsed = got
                .map_err(|e| e.to_string())
                .and_then(|bytes| AccessProfile::from_json(&bytes));
            match parsed {
                Ok(p) => profile = Some(p),
                Err(e) => {
                    warn!(blob = %blob.digest(), error = %e, "ignoring the artifact's access profile")
                }
            }
            continue;
        }
        if media_type != INDEX_LAYER_MEDIA_TYPE {
            continue;
        }
        let Some(bytes) = fetched[i].take() else {
            continue;
        };
        pending.push((i, bytes.map_err(reg_err("index artifact"))?));
    }
    // Decoded off the async threads, side by side.
    let decoded = futures::future::join_all(pending.into_iter().map(|(i, bytes)| async move {
        (
            i,
            tokio::task::spawn_blocking(move || LayerIndex::decode(&bytes)).await,
        )
    }))
    .await;
    for (i, ix) in decoded {
        let blob = &blobs[i];
        let ix = match ix.map_err(|e| ImageError::Task(e.to_string()))? {
            Ok(ix) => ix,
            Err(e) => {
                warn!(blob = %blob.digest(), error = %e, "skipping undecodable index blob");
                continue;
            }
        };
        let windows: Arc<dyn WindowSource> = match &ix.windows_digest {
            None => Arc::new(crate::index::NoWindows),
            Some(want) => {
                let pack = blobs.iter().find(|b| {
                    b.digest().to_string() == *want
                        && b.size() == ix.windows_size
                        && b.media_type().to_string() == INDEX_WINDOWS_MEDIA_TYPE
                });
                let Some(pack) = pack else {
                    warn!(blob = %blob.digest(), windows = %want, "index artifact lacks the windows pack of a layer index; skipping it");
                    continue;
                };
                Arc::new(RemoteWindows {
                    store: store.clone(),
                    digest: pack.digest().clone(),
                })
            }
        };
        out.push((ix, windows));
    }
    debug!(
        artifact = %referrer.digest,
        indexes = out.len(),
        decode_us = decoding.elapsed().as_micros() as u64,
        "index artifact read"
    );
    Ok((out, profile))
}

/// Largest index artifact blob read into memory (a layer index, an access profile). The
/// index of a layer of 100,000 files is about 6 MB.
const MAX_METADATA_BLOB: u64 = 256 << 20;

/// Which of `referrer`'s blobs is the access profile read (the first).
fn profile_blob(referrer: &registry::Referrer) -> Option<usize> {
    referrer
        .manifest
        .layers()
        .iter()
        .position(|b| b.media_type().to_string() == ACCESS_PROFILE_MEDIA_TYPE)
}

/// The metadata blobs of index artifact `referrer` (its layer indexes and first access
/// profile), fetched concurrently: one round trip each, and every one is needed before the
/// placeholders. Per blob of the artifact, in order: `None` for one not wanted (a windows
/// pack: read a window at a time later), else what the fetch gave.
async fn fetch_metadata(
    store: &BlobStore,
    referrer: &registry::Referrer,
) -> Vec<Option<Result<Bytes, registry::Error>>> {
    use futures::stream::{self, StreamExt};
    let profile_blob = profile_blob(referrer);
    let fetches: Vec<BoxFuture<'_, Option<Result<Bytes, registry::Error>>>> = referrer
        .manifest
        .layers()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let wanted =
                Some(i) == profile_blob || b.media_type().to_string() == INDEX_LAYER_MEDIA_TYPE;
            let (digest, size) = (b.digest().clone(), b.size());
            async move {
                match wanted {
                    true if size > MAX_METADATA_BLOB => Some(Err(registry::Error::TooLarge {
                        what: format!("index artifact blob {digest}"),
                        size,
                        max: MAX_METADATA_BLOB,
                    })),
                    true => Some(store.fetch_blob(&digest, size).await),
                    false => None,
                }
            }
            .boxed()
        })
        .collect();
    stream::iter(fetches).buffered(8).collect().await
}

/// Largest simple-signing payload read (cosign's are a few hundred bytes).
const MAX_SIGNATURE_PAYLOAD: u64 = 64 << 10;

/// The artifact a [`signed_referrer`] found, with its metadata blobs ([`fetch_metadata`]).
type SignedArtifact = (
    registry::Referrer,
    Vec<Option<Result<Bytes, registry::Error>>>,
);

/// Under the `signed` index policy: the newest index artifact of image `subject` whose
/// subject is that image and that carries a cosign signature by `key`, with its metadata
/// blobs. Artifacts that do not qualify are logged with the reason and skipped.
async fn signed_referrer(
    store: &BlobStore,
    subject: &Digest,
    key: &VerifyKey,
) -> Result<Option<SignedArtifact>, ImageError> {
    let mut listed = store
        .list_referrers(subject, Some(INDEX_ARTIFACT_TYPE))
        .await
        .map_err(reg_err("index artifact"))?;
    registry::newest_first(&mut listed);
    for desc in &listed {
        let digest = desc.digest().to_string();
        // The artifact's manifest, then its metadata blobs, travel while its signature is
        // checked (two round trips less): they are used only if the signature holds, and a
        // failed check drops them, unread. The reason given is the signature's whenever it
        // fails, whichever finished first.
        let fetch = async {
            let referrer = store
                .fetch_referrer(desc)
                .await
                .map_err(|e| crate::fill::error_chain(&e))?;
            let blobs = fetch_metadata(store, &referrer).await;
            Ok::<_, String>((referrer, blobs))
        };
        let sig = signed_by(store, &digest, key);
        futures::pin_mut!(fetch, sig);
        let fetched = match futures::future::select(sig, fetch).await {
            futures::future::Either::Left((signed, fetch)) => match signed {
                Ok(()) => fetch.await,
                Err(why) => Err(why),
            },
            futures::future::Either::Right((fetched, sig)) => sig.await.and(fetched),
        };
        let checked = fetched.and_then(|(r, blobs)| {
            let named = r.manifest.subject().as_ref().map(|s| s.digest().clone());
            match named {
                Some(s) if s == *subject => Ok((r, blobs)),
                other => Err(format!(
                    "its subject is {}, not the image",
                    other.map_or("missing".to_string(), |s| s.to_string())
                )),
            }
        });
        match checked {
            Ok(found) => {
                info!(artifact = %digest, key = key.name(), "index artifact signed by the index key");
                return Ok(Some(found));
            }
            Err(reason) => warn!(
                artifact = %digest,
                key = key.name(),
                reason,
                "index artifact ignored: not signed by the index key"
            ),
        }
    }
    Ok(None)
}

/// Whether manifest `digest` has a cosign signature by `key` (`Err`: why not).
async fn signed_by(store: &BlobStore, digest: &str, key: &VerifyKey) -> Result<(), String> {
    let tag = signature::signature_tag(digest);
    let raw = match store.fetch_manifest(Some(&tag)).await {
        Ok(raw) => raw,
        Err(e) if e.is_not_found() => return Err(format!("no signature (no tag {tag})")),
        Err(e) => return Err(crate::fill::error_chain(&e)),
    };
    let manifest: oci_spec::image::ImageManifest = serde_json::from_slice(&raw.bytes)
        .map_err(|e| format!("signature manifest {tag} does not parse: {e}"))?;
    let mut why = format!("signature manifest {tag} has no signed payload");
    for layer in manifest.layers() {
        let sig = layer
            .annotations()
            .as_ref()
            .and_then(|a| a.get(signature::SIGNATURE_ANNOTATION));
        let Some(sig) =
            sig.filter(|_| layer.media_type().to_string() == signature::PAYLOAD_MEDIA_TYPE)
        else {
            continue;
        };
        if layer.size() > MAX_SIGNATURE_PAYLOAD {
            why = format!("payload {} is {} bytes", layer.digest(), layer.size());
            continue;
        }
        let payload = match store.fetch_blob(layer.digest(), layer.size()).await {
            Ok(p) => p,
            Err(e) => {
                why = crate::fill::error_chain(&e);
                continue;
            }
        };
        match key.verify(&payload, sig, digest) {
            Ok(()) => return Ok(()),
            Err(e) => why = e.to_string(),
        }
    }
    Err(why)
}

/// Signs the index artifact `artifact` of the image `reference` with `key`, as `cosign sign
/// --key` would: a simple-signing payload for the artifact's digest, its signature in the
/// payload layer's annotation, stored under the tag `sha256-HEX.sig` beside it (replacing
/// signatures stored there before). Returns the tag. Registries only.
pub async fn sign_artifact(
    reference: &str,
    opts: &PrepareOptions,
    artifact: &Digest,
    key: &signature::SignKey,
) -> Result<String, ImageError> {
    let parsed: Reference = reference.parse()?;
    let repository = match &parsed {
        Reference::Registry(r) => format!("{}/{}", r.registry, r.repository),
        Reference::Layout(l) => l.dir.display().to_string(),
    };
    let store = BlobStore::open(&parsed, &opts.registry)
        .await
        .map_err(reg_err(reference))?;
    let payload = signature::payload(&repository, artifact.as_ref());
    let (manifest, blobs) = signature::signature_manifest(&payload, &key.sign(&payload));
    let tag = signature::signature_tag(artifact.as_ref());
    store
        .push_tagged(&tag, manifest, blobs)
        .await
        .map_err(reg_err(reference))?;
    Ok(tag)
}

/// Builds (or loads) the indexes of every layer and, with `push`, attaches them to the image
/// manifest in the registry as one artifact. Returns the indexes and the artifact digest.
pub async fn index_image(
    reference: &str,
    opts: &PrepareOptions,
    push: bool,
) -> Result<(ImageIndexes, Option<Digest>), ImageError> {
    index_image_with_profile(reference, opts, push, None).await
}

/// [`index_image`], with an access profile added to the pushed artifact.
pub async fn index_image_with_profile(
    reference: &str,
    opts: &PrepareOptions,
    push: bool,
    profile: Option<&AccessProfile>,
) -> Result<(ImageIndexes, Option<Digest>), ImageError> {
    let (store, image) = open(reference, opts).await?;
    let subject = image.manifest_digest.clone();
    let mut no_artifact = opts.clone();
    no_artifact.use_artifact = false;
    let indexes = load_indexes(&store, image, reference, &no_artifact).await?;
    if !push {
        return Ok((indexes, None));
    }
    // Every index is in the local store now (loaded from it, or built and saved).
    let local = IndexStore::new(&opts.index_dir);
    let mut blobs = Vec::new();
    for (digest, ix, origin) in &indexes.layers {
        if *origin == IndexOrigin::Toc {
            // Read through its own TOC: nothing to attach.
            continue;
        }
        blobs.push((INDEX_LAYER_MEDIA_TYPE.to_string(), Bytes::from(ix.encode())));
        let pack = local.load_windows(ix).map_err(|source| ImageError::Index {
            reference: reference.to_string(),
            layer: digest.to_string(),
            source,
        })?;
        if let Some(pack) = pack {
            blobs.push((INDEX_WINDOWS_MEDIA_TYPE.to_string(), pack.bytes().clone()));
        }
    }
    if blobs.is_empty() {
        info!(
            reference,
            "every layer carries its own TOC: no index artifact to push"
        );
        return Ok((indexes, None));
    }
    if let Some(p) = profile {
        let json = serde_json::to_vec(p).map_err(|e| ImageError::Task(e.to_string()))?;
        blobs.push((ACCESS_PROFILE_MEDIA_TYPE.to_string(), Bytes::from(json)));
    }
    let digest = store
        .push_artifact(&subject, INDEX_ARTIFACT_TYPE, blobs)
        .await
        .map_err(reg_err(reference))?;
    info!(reference, artifact = %digest, "index artifact pushed");
    Ok((indexes, Some(digest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob of index artifact metadata is read whole into memory, so one whose manifest
    /// declares it larger than [`MAX_METADATA_BLOB`] is refused before any read; the others
    /// are read as usual.
    #[tokio::test]
    async fn metadata_declared_too_large_is_not_read() {
        use oci_spec::image::{DescriptorBuilder, ImageManifestBuilder, MediaType};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let small = b"index".to_vec();
        let small_digest = registry::sha256_digest(&small);
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(small_digest.digest()), &small).unwrap();
        let descriptor = |digest: Digest, size: u64| {
            DescriptorBuilder::default()
                .media_type(MediaType::Other(INDEX_LAYER_MEDIA_TYPE.into()))
                .digest(digest)
                .size(size)
                .build()
                .unwrap()
        };
        let huge = registry::sha256_digest(b"never read");
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .config(descriptor(small_digest.clone(), small.len() as u64))
            .layers(vec![
                descriptor(small_digest, small.len() as u64),
                descriptor(huge.clone(), MAX_METADATA_BLOB + 1),
            ])
            .build()
            .unwrap();
        let referrer = registry::Referrer {
            digest: huge,
            manifest,
            manifest_bytes: Bytes::new(),
        };
        let store = BlobStore::Layout(
            registry::LayoutStore::open(&crate::reference::LayoutRef {
                dir: dir.path().to_owned(),
                tag: None,
            })
            .unwrap(),
        );
        let mut fetched = fetch_metadata(&store, &referrer).await;
        assert_eq!(&fetched[0].take().unwrap().unwrap()[..], b"index");
        let refused = fetched[1].take().unwrap().unwrap_err();
        assert!(
            matches!(refused, registry::Error::TooLarge { size, .. } if size == MAX_METADATA_BLOB + 1),
            "{refused}"
        );
        assert_eq!(
            store.stats().requests(),
            1,
            "the declared-too-large blob was read"
        );
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_start_set_comes_first_and_each_file_once() {
        let profile = AccessProfile {
            version: 1,
            files: names(&["app/x", "etc/passwd", "app/y"]),
        };
        let merged = with_start_set(Some(profile), names(&["etc/passwd", "bin/sh"])).unwrap();
        assert_eq!(
            merged.files,
            names(&["etc/passwd", "bin/sh", "app/x", "app/y"])
        );
        let alone = with_start_set(None, names(&["bin/sh"])).unwrap();
        assert_eq!(alone.files, names(&["bin/sh"]));
        assert!(with_start_set(None, Vec::new()).is_none());
        let empty_start = AccessProfile {
            version: 1,
            files: names(&["app/x"]),
        };
        let kept = with_start_set(Some(empty_start), Vec::new()).unwrap();
        assert_eq!(kept.files, names(&["app/x"]));
    }

    #[test]
    fn a_merged_profile_stays_within_the_limit() {
        let many = AccessProfile {
            version: 1,
            files: (0..AccessProfile::MAX_FILES)
                .map(|i| format!("f{i}"))
                .collect(),
        };
        let merged = with_start_set(Some(many), names(&["etc/passwd"])).unwrap();
        assert_eq!(merged.files.len(), AccessProfile::MAX_FILES);
        assert_eq!(merged.files[0], "etc/passwd");
    }
}
