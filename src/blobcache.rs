//! Local copies of layer blobs that had to travel whole.
//!
//! Owns the directory of blobs kept by digest (`DIR/sha256/HEX`). When a layer has no index
//! yet, it is streamed once to build one; the bytes are downloaded anyway, so they are kept
//! here as they pass ([`BlobCache::tee`]) and every later fill of that layer is a local
//! `pread` plus an inflate, not another range request ([`read_range`] picks the cache or
//! the registry). A blob is published (renamed into
//! place) only after its digest was verified at the end of the stream; a partial or wrong
//! download never becomes visible. It never interprets blob contents and never touches
//! placeholders; the cache directory must not be under a marked tree.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// A directory of verified blobs.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// A cache rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> BlobCache {
        BlobCache { dir: dir.into() }
    }

    /// Where the blob `digest` (`sha256:HEX`) lives, if the digest is well formed.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(self.dir.join("sha256").join(hex))
    }

    /// Whether the blob is here.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.is_file())
    }

    /// Reads `len` bytes at `offset` of a cached blob; `None` if the blob is not cached.
    pub fn read_range(&self, digest: &str, offset: u64, len: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(path) = self.path(digest) else {
            return Ok(None);
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Some(buf))
    }

    /// Wraps a reader of the whole blob `digest` so that what is read is also written to a
    /// temporary file, published under the digest by [`Tee::finish`] once the bytes are
    /// verified. Dropping the tee unfinished removes the temporary file. If the cache cannot
    /// be written, the tee only passes the bytes through (the pull must not fail for it).
    pub fn tee<R: Read>(&self, digest: &str, inner: R) -> Tee<R> {
        let tmp = self.path(digest).and_then(|dest| {
            let parent = dest.parent()?.to_path_buf();
            let made = std::fs::create_dir_all(&parent)
                .and_then(|()| tempfile::NamedTempFile::new_in(&parent));
            match made {
                Ok(tmp) => Some((tmp, dest)),
                Err(e) => {
                    tracing::warn!(digest, error = %e, "blob cache unavailable; not keeping the layer");
                    None
                }
            }
        });
        let (tmp, dest) = match tmp {
            Some((t, d)) => (Some(t), d),
            None => (None, PathBuf::new()),
        };
        Tee {
            inner,
            tmp,
            hash: Sha256::new(),
            digest: digest.to_string(),
            dest,
        }
    }
}

/// Reads `len` bytes of blob `digest` at `offset` from `cache` when it holds the blob, else
/// by a range read from `store` (the one place fills choose between the two).
pub async fn read_range(
    cache: Option<&BlobCache>,
    store: &crate::registry::BlobStore,
    digest: &oci_spec::image::Digest,
    offset: u64,
    len: u64,
) -> Result<bytes::Bytes, crate::registry::Error> {
    if let Some(cache) = cache
        && let Ok(Some(bytes)) = cache.read_range(digest.as_ref(), offset, len)
    {
        return Ok(bytes::Bytes::from(bytes));
    }
    store.read_range(digest, offset, len).await
}

/// A reader that keeps a copy; see [`BlobCache::tee`].
pub struct Tee<R> {
    inner: R,
    tmp: Option<tempfile::NamedTempFile>,
    hash: Sha256,
    digest: String,
    dest: PathBuf,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(tmp) = self.tmp.as_mut() {
            self.hash.update(&buf[..n]);
            if let Err(e) = tmp.write_all(&buf[..n]) {
                // A full cache disk must not fail the pull: stop copying, keep reading.
                tracing::warn!(digest = %self.digest, error = %e, "blob cache write failed; not caching");
                self.tmp = None;
            }
        }
        Ok(n)
    }
}

impl<R> Tee<R> {
    /// Publishes the copy if the whole blob passed and matches its digest. Returns whether
    /// it was published. Call after the reader reached its end.
    pub fn finish(mut self) -> io::Result<bool> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(false);
        };
        let got = format!("sha256:{}", hex::encode(self.hash.clone().finalize()));
        if got != self.digest {
            return Ok(false);
        }
        tmp.as_file().sync_all()?;
        tmp.persist(&self.dest).map_err(|e| e.error)?;
        Ok(true)
    }

    /// A tee that keeps nothing.
    pub fn passthrough(inner: R) -> Tee<R> {
        Tee {
            inner,
            tmp: None,
            hash: Sha256::new(),
            digest: String::new(),
            dest: PathBuf::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tee_publishes_only_verified_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let data = b"layer bytes".repeat(1000);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let mut tee = cache.tee(&digest, &data[..]);
        io::copy(&mut tee, &mut io::sink()).unwrap();
        assert!(tee.finish().unwrap());
        assert!(cache.contains(&digest));
        assert_eq!(
            cache.read_range(&digest, 11, 11).unwrap().unwrap(),
            b"layer bytes"
        );

        let wrong = format!("sha256:{}", "0".repeat(64));
        let mut tee = cache.tee(&wrong, &data[..]);
        io::copy(&mut tee, &mut io::sink()).unwrap();
        assert!(!tee.finish().unwrap());
        assert!(!cache.contains(&wrong));
        // Only the verified blob is in the directory: no temporary files left.
        assert_eq!(
            std::fs::read_dir(dir.path().join("sha256"))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(cache.read_range(&wrong, 0, 1).unwrap(), None);
        assert!(cache.path("md5:abc").is_none());
    }
}
