//! The local content cache: complete files by sha256, shared by every image the daemon
//! serves, so a second container of an image (or another image sharing files) fetches
//! nothing for what is cached.
//!
//! Owns `STATE_DIR/cache/`. A file enters the cache only once it is complete in a
//! placeholder tree and its bytes hash to the index's digest (a file the user rewrote never
//! enters). A cached file fills a new placeholder before the placeholder is marked, by
//! `copy_file_range` (which shares extents on xfs and btrfs when the cache is on the same
//! filesystem, and copies in the kernel otherwise). The cache directory is never marked and
//! never read through a marked path, so it cannot deadlock the fill engine. It knows nothing
//! of fanotify or registries.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors of the content cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A cache or placeholder file operation failed.
    #[error("content cache: {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens (creating) the cache at `dir`.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, sha256: &str) -> Option<PathBuf> {
        (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join(sha256.to_ascii_lowercase()))
    }

    /// Whether a file with this digest is cached.
    pub fn contains(&self, sha256: &str) -> bool {
        self.path(sha256).is_some_and(|p| p.exists())
    }

    /// Writes the cached bytes of `sha256` into the (not yet marked) placeholder `dest` of
    /// `size` bytes, keeping its mtime. `Ok(false)`: not cached (or of another size).
    pub fn fill(&self, sha256: &str, dest: &Path, size: u64) -> Result<bool, CacheError> {
        let Some(src_path) = self.path(sha256) else {
            return Ok(false);
        };
        let mut src = match File::open(&src_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&src_path)(e)),
        };
        if src.metadata().map_err(io(&src_path))?.len() != size {
            return Ok(false);
        }
        let mut out = File::options().write(true).open(dest).map_err(io(dest))?;
        let mtime = out
            .metadata()
            .and_then(|m| m.modified())
            .map_err(io(dest))?;
        // std::io::copy between files is copy_file_range on Linux: reflinks where it can.
        std::io::copy(&mut src, &mut out).map_err(io(dest))?;
        out.set_modified(mtime).map_err(io(dest))?;
        Ok(true)
    }

    /// Adds the complete file `src` under `sha256` if its bytes hash to it. `Ok(false)`:
    /// they do not (the file was changed by its user), nothing is added.
    pub fn add(&self, sha256: &str, src: &Path) -> Result<bool, CacheError> {
        let Some(path) = self.path(sha256) else {
            return Ok(false);
        };
        if path.exists() {
            return Ok(true);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::copy(src, &tmp).map_err(io(src))?;
        let mut f = File::open(&tmp).map_err(io(&tmp))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io(&tmp))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        if !hex::encode(h.finalize()).eq_ignore_ascii_case(sha256) {
            let _ = std::fs::remove_file(&tmp);
            return Ok(false);
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_matching_bytes_enter_and_fill_keeps_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        let sha = hex::encode(Sha256::digest(b"hello"));
        assert!(
            !cache
                .add(&hex::encode(Sha256::digest(b"other")), &src)
                .unwrap()
        );
        assert!(cache.add(&sha, &src).unwrap());
        assert!(cache.contains(&sha));
        let dest = dir.path().join("dest");
        let f = File::create(&dest).unwrap();
        f.set_len(5).unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        f.set_modified(t).unwrap();
        drop(f);
        assert!(cache.fill(&sha, &dest, 5).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(&dest).unwrap().modified().unwrap(), t);
        assert!(!cache.fill(&sha, &dest, 6).unwrap());
        assert!(!cache.fill("../../etc/passwd", &dest, 5).unwrap());
    }
}
