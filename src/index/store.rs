//! A directory of stored indexes: per layer digest the metadata (`.idx`) and, for gzip
//! layers with mid-member checkpoints, the windows pack (`.win`), each written atomically.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{debug, warn};

use super::windows::{WindowPack, WindowSource};
use super::{IndexError, LayerIndex};

/// A directory holding `<algorithm>-<hex>.idx` files (the index metadata) and
/// `<algorithm>-<hex>.win` files (windows packs), one pair per layer blob digest.
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

    /// The file that holds (or would hold) the windows pack of the blob with this digest.
    pub fn windows_path_for(&self, digest: &str) -> Result<PathBuf, IndexError> {
        let (alg, hex) = split_digest(digest)?;
        Ok(self.dir.join(format!("{alg}-{hex}.win")))
    }

    /// Load the index of `digest`. `Ok(None)` when there is none, when the stored file is
    /// of another format version or names another blob, or when its windows pack is missing
    /// or of the wrong size (it is a cache: rebuild it). A file that is present but damaged
    /// is an error.
    pub fn load(&self, digest: &str) -> Result<Option<LayerIndex>, IndexError> {
        let path = self.path_for(digest)?;
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IndexError::Store { path, source }),
        };
        match LayerIndex::decode(&data) {
            Ok(idx) if idx.blob_digest == digest => Ok(self.windows_ok(&idx)?.then_some(idx)),
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

    /// Whether the windows pack `idx` needs is there, of its size.
    fn windows_ok(&self, idx: &LayerIndex) -> Result<bool, IndexError> {
        if idx.windows_digest.is_none() {
            return Ok(true);
        }
        let win = self.windows_path_for(&idx.blob_digest)?;
        let size = fs::metadata(&win).map(|m| m.len()).ok();
        if size != Some(idx.windows_size) {
            warn!(path = %win.display(), ?size, expected = idx.windows_size, "windows pack missing or of the wrong size; ignoring the stored index");
            return Ok(false);
        }
        Ok(true)
    }

    /// [`IndexStore::load`], sharing the index with every other holder in this process of
    /// the same stored file (same path, device, inode, size and mtime): a second tree of an
    /// image costs no second copy of its indexes (nor a second decode).
    pub fn load_shared(&self, digest: &str) -> Result<Option<Arc<LayerIndex>>, IndexError> {
        use std::os::unix::fs::MetadataExt as _;
        type Key = (PathBuf, u64, u64, u64, i64, i64);
        static LOADED: std::sync::LazyLock<
            std::sync::Mutex<std::collections::HashMap<Key, std::sync::Weak<LayerIndex>>>,
        > = std::sync::LazyLock::new(Default::default);
        let path = self.path_for(digest)?;
        let m = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IndexError::Store { path, source }),
        };
        let key = (path, m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
        let held = LOADED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .and_then(std::sync::Weak::upgrade);
        if let Some(idx) = held {
            return Ok(self.windows_ok(&idx)?.then_some(idx));
        }
        let Some(idx) = self.load(digest)?.map(Arc::new) else {
            return Ok(None);
        };
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|_, w| w.strong_count() > 0);
        loaded.insert(key, Arc::downgrade(&idx));
        Ok(Some(idx))
    }

    /// Opens the stored windows pack of `index` for reading windows on demand (a layer
    /// without windows gets a source that has none).
    pub fn open_windows(&self, index: &LayerIndex) -> Result<Arc<dyn WindowSource>, IndexError> {
        if index.windows_digest.is_none() {
            return Ok(Arc::new(super::windows::NoWindows));
        }
        let path = self.windows_path_for(&index.blob_digest)?;
        let file = fs::File::open(&path).map_err(|source| IndexError::Store {
            path: path.clone(),
            source,
        })?;
        Ok(Arc::new(StoredWindows {
            file: Arc::new(file),
        }))
    }

    /// Reads the whole stored windows pack of `index` and checks it against
    /// [`LayerIndex::windows_digest`] (to push it, or to copy it elsewhere). `Ok(None)` for
    /// a layer without windows.
    pub fn load_windows(&self, index: &LayerIndex) -> Result<Option<WindowPack>, IndexError> {
        let Some(want) = &index.windows_digest else {
            return Ok(None);
        };
        let path = self.windows_path_for(&index.blob_digest)?;
        let data = fs::read(&path).map_err(|source| IndexError::Store {
            path: path.clone(),
            source,
        })?;
        let pack = WindowPack::from_bytes(data);
        if pack.digest() != *want {
            return Err(IndexError::CorruptIndex(format!(
                "windows pack {} does not match its index",
                path.display()
            )));
        }
        Ok(Some(pack))
    }

    /// Store `index` and its windows `pack` (ignored when the index names none) under its
    /// [`LayerIndex::blob_digest`]: the pack first, then the metadata, each written to a
    /// temporary file in the same directory, synced, renamed over the final name, directory
    /// synced. Readers see the old files or the new ones, never a torn file; a reader that
    /// catches a new pack with an old metadata file finds its sizes or window checksums
    /// disagree. Returns the metadata file's path.
    pub fn save(&self, index: &LayerIndex, pack: &WindowPack) -> Result<PathBuf, IndexError> {
        let path = self.path_for(&index.blob_digest)?;
        if index.windows_digest.is_some() {
            if pack.len() != index.windows_size {
                return Err(IndexError::CorruptIndex(
                    "windows pack does not belong to the index".into(),
                ));
            }
            self.write_atomic(&self.windows_path_for(&index.blob_digest)?, pack.bytes())?;
        }
        let data = index.encode();
        self.write_atomic(&path, &data)?;
        debug!(path = %path.display(), bytes = data.len(), windows = index.windows_size, "index saved");
        Ok(path)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), IndexError> {
        let path = path.to_path_buf();
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
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(source) = result {
            let _ = fs::remove_file(&tmp);
            return Err(IndexError::Store { path, source });
        }
        Ok(())
    }
}

/// A windows pack in the local index store, read a window at a time.
#[derive(Debug)]
pub struct StoredWindows {
    file: Arc<fs::File>,
}

impl WindowSource for StoredWindows {
    fn read_pack(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Bytes>> {
        let file = self.file.clone();
        async move {
            let len = usize::try_from(len).map_err(io::Error::other)?;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(io::Error::other)?
        }
        .boxed()
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
