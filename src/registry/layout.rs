//! The OCI image layout backend: `oci:DIR[:TAG]`.
//!
//! Reads `index.json` and `blobs/ALGO/HEX` of a layout directory; range reads are `pread`s
//! on a blocking thread. The only writes are [`super::BlobStore::push_artifact`]'s: new blobs
//! (written aside, then renamed in) and one more unnamed descriptor in `index.json`
//! (replaced by rename). It never changes or removes what is there.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest};
use tokio::io::AsyncReadExt as _;

use super::{
    Artifact, BlobStream, Error, MAX_MANIFEST_SIZE, RawManifest, Result, Stats, StreamSource,
    Verifier, add_index_entry, parse_json, sniff_media_type, verify,
};
use crate::reference::LayoutRef;

/// The annotation naming an image in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

const STREAM_CHUNK: usize = 256 << 10;

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct LayoutStore {
    dir: PathBuf,
    tag: Option<String>,
    stats: Arc<Stats>,
}

impl LayoutStore {
    /// Opens a layout: checks that `DIR/oci-layout` exists.
    pub fn open(reference: &LayoutRef) -> Result<Self> {
        let marker = reference.dir.join("oci-layout");
        std::fs::metadata(&marker).map_err(|source| Error::Io {
            path: marker,
            source,
        })?;
        Ok(LayoutStore {
            dir: reference.dir.clone(),
            tag: reference.tag.clone(),
            stats: Arc::default(),
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's counters (bytes read from disk).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The path of a blob in the layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().as_ref())
            .join(digest.digest())
    }

    async fn index(&self) -> Result<ImageIndex> {
        let path = self.dir.join("index.json");
        let bytes = tokio::fs::read(&path).await.map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        parse_json(&bytes, &path.display().to_string())
    }

    /// The descriptor `index.json` gives for `tag`, or for the only image when `tag` is None.
    async fn lookup(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.index().await?;
        let name = |d: &Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        let available = || {
            let names: Vec<String> = index.manifests().iter().filter_map(name).collect();
            names.join(", ")
        };
        match tag {
            Some(tag) => index
                .manifests()
                .iter()
                .rev()
                .find(|d| name(d).as_deref() == Some(tag))
                .cloned()
                .ok_or_else(|| Error::LayoutTag {
                    dir: self.dir.clone(),
                    tag: tag.to_owned(),
                    available: available(),
                }),
            None => {
                // Artifacts we stored (referrers) are not images to pick.
                let images: Vec<&Descriptor> = index
                    .manifests()
                    .iter()
                    .filter(|d| d.artifact_type().is_none())
                    .collect();
                match images.as_slice() {
                    [only] => Ok((*only).clone()),
                    all => Err(Error::LayoutAmbiguous {
                        dir: self.dir.clone(),
                        count: all.len(),
                        available: available(),
                    }),
                }
            }
        }
    }

    pub(super) async fn fetch_manifest(&self, reference: Option<&str>) -> Result<RawManifest> {
        let (digest, media_type, size) = match reference {
            Some(r) if crate::reference::valid_digest(r) => (
                r.parse::<Digest>().expect("valid digest"),
                None,
                MAX_MANIFEST_SIZE as u64,
            ),
            other => {
                let desc = self.lookup(other.or(self.tag.as_deref())).await?;
                let size = desc.size().min(MAX_MANIFEST_SIZE as u64);
                (
                    desc.digest().clone(),
                    Some(desc.media_type().to_string()),
                    size,
                )
            }
        };
        let bytes = self.fetch_blob(&digest, size).await?;
        let media_type = media_type.unwrap_or_else(|| sniff_media_type(&bytes));
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    pub(super) async fn fetch_blob(&self, digest: &Digest, size: u64) -> Result<Bytes> {
        let path = self.blob_path(digest);
        self.stats.add_request();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = tokio::fs::File::open(&path).await.map_err(io)?;
        // One byte past `size` is enough to know the file runs past it.
        let mut bytes = Vec::new();
        file.take(size.saturating_add(1))
            .read_to_end(&mut bytes)
            .await
            .map_err(io)?;
        self.stats.add_bytes(bytes.len());
        if bytes.len() as u64 > size {
            return Err(Error::BodyTooLong {
                what: path.display().to_string(),
                max: size,
            });
        }
        verify(digest, &bytes)?;
        Ok(Bytes::from(bytes))
    }

    pub(super) async fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let path = self.blob_path(digest);
        self.stats.add_request();
        let stats = self.stats.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::RangeBeyondEnd {
                    digest: digest.to_string(),
                    offset,
                    len,
                    size,
                });
            }
            let mut buf = BytesMut::zeroed(len as usize);
            let mut got = 0usize;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => {
                        return Err(Error::ShortRead {
                            what: path.display().to_string(),
                            got: got as u64,
                            want: len,
                        });
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            stats.add_bytes(got);
            Ok(buf.freeze())
        })
        .await
        .expect("pread task panicked")
    }

    pub(super) async fn open_stream(&self, digest: &Digest) -> Result<BlobStream> {
        let verifier = Verifier::new(digest)?;
        let path = self.blob_path(digest);
        self.stats.add_request();
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok(BlobStream {
            digest: digest.clone(),
            position: 0,
            verifier: Some(verifier),
            mismatch: None,
            source: StreamSource::Layout(StreamState { file, path }),
            stats: self.stats.clone(),
        })
    }
}

impl LayoutStore {
    pub(super) async fn push_artifact(&self, artifact: Artifact) -> Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            for (digest, data) in &artifact.blobs {
                this.write_blob(digest, data)?;
            }
            this.write_blob(&artifact.digest, &artifact.manifest)?;
            let path = this.dir.join("index.json");
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            let bytes = std::fs::read(&path).map_err(io)?;
            let mut index: serde_json::Value = parse_json(&bytes, &path.display().to_string())?;
            add_index_entry(&mut index, artifact.entry, &path.display().to_string())?;
            let text = serde_json::to_vec(&index).expect("JSON value serializes");
            write_replace(&path, &text)?;
            tracing::debug!(artifact = %artifact.digest, dir = %this.dir.display(), "artifact stored in layout");
            Ok(())
        })
        .await
        .expect("layout write task panicked")
    }

    /// Writes a blob unless present (aside, then renamed in).
    fn write_blob(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        write_replace(&path, data)
    }

    pub(super) async fn list_referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let mut found = Vec::new();
        for desc in self.index().await?.manifests() {
            let Some(t) = desc.artifact_type() else {
                continue;
            };
            if artifact_type.is_some_and(|want| t.to_string() != want) {
                continue;
            }
            let size = desc.size().min(MAX_MANIFEST_SIZE as u64);
            let bytes = self.fetch_blob(desc.digest(), size).await?;
            let manifest: ImageManifest =
                parse_json(&bytes, &format!("artifact {}", desc.digest()))?;
            if manifest
                .subject()
                .as_ref()
                .is_some_and(|s| s.digest() == subject)
            {
                found.push(desc.clone());
            }
        }
        Ok(found)
    }
}

/// Writes `path` through a temporary file in the same directory and a rename.
fn write_replace(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, data).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The read side of a layout [`BlobStream`].
pub(super) struct StreamState {
    file: tokio::fs::File,
    path: PathBuf,
}

impl StreamState {
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>> {
        let mut buf = BytesMut::with_capacity(STREAM_CHUNK);
        let n = self
            .file
            .read_buf(&mut buf)
            .await
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok((n > 0).then(|| buf.freeze()))
    }
}
