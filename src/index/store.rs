//! A directory of stored indexes, one file per layer digest, written atomically.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use super::{IndexError, LayerIndex};

/// A directory holding `<algorithm>-<hex>.idx` files, one per layer blob digest.
#[derive(Debug, Clone)]
pub struct IndexStore {
    /// The directory (created by [`IndexStore::save`] if missing).
    pub dir: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Check a digest is `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>` and return
/// (algorithm, hex). Anything else could name a path outside the store.
fn split_digest(digest: &str) -> Result<(&str, &str), IndexError> {
    let bad = || IndexError::InvalidDigest(digest.to_owned());
    let (alg, hex) = digest.split_once(':').ok_or_else(bad)?;
    let want = match alg {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(bad()),
    };
    if hex.len() != want
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok((alg, hex))
}

impl IndexStore {
    /// A store rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The file that holds (or would hold) the index of the blob with this digest.
    pub fn path_for(&self, digest: &str) -> Result<PathBuf, IndexError> {
        let (alg, hex) = split_digest(digest)?;
        Ok(self.dir.join(format!("{alg}-{hex}.idx")))
    }

    /// Load the index of `digest`. `Ok(None)` when there is none, or when the stored file is
    /// of another format version or names another blob (it is a cache: rebuild it). A file
    /// that is present but damaged is an error.
    pub fn load(&self, digest: &str) -> Result<Option<LayerIndex>, IndexError> {
        let path = self.path_for(digest)?;
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IndexError::Store { path, source }),
        };
        match LayerIndex::decode(&data) {
            Ok(idx) if idx.blob_digest == digest => Ok(Some(idx)),
            Ok(idx) => {
                warn!(path = %path.display(), stored = %idx.blob_digest, "stored index names another blob; ignoring");
                Ok(None)
            }
            Err(IndexError::UnsupportedVersion(v)) => {
                debug!(path = %path.display(), version = v, "stored index has another format version; ignoring");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Store `index` under its [`LayerIndex::blob_digest`]: written to a temporary file in
    /// the same directory, synced, renamed over the final name, directory synced. Readers
    /// see the old file or the new one, never a mix. Returns the final path.
    pub fn save(&self, index: &LayerIndex) -> Result<PathBuf, IndexError> {
        let path = self.path_for(&index.blob_digest)?;
        let store_err = |path: &Path| {
            let path = path.to_owned();
            move |source| IndexError::Store { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(store_err(&self.dir))?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("idx")
        ));
        let data = index.encode();
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(source) = result {
            let _ = fs::remove_file(&tmp);
            return Err(IndexError::Store { path, source });
        }
        debug!(path = %path.display(), bytes = data.len(), "index saved");
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        let s = IndexStore::new("/x");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            s.path_for(&d).unwrap(),
            Path::new(&format!("/x/sha256-{}.idx", "a".repeat(64)))
        );
        for bad in [
            "sha256:../../etc",
            "md5:abc",
            "sha256",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(s.path_for(bad), Err(IndexError::InvalidDigest(_))),
                "{bad}"
            );
        }
    }
}
