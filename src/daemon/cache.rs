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
//!
//! What the cache holds is bytes, never metadata: the directory is 0700 and every entry is
//! a root-owned 0400 file whatever the image's file was (a setuid binary of an image never
//! becomes a setuid file on the host); a placeholder filled from the cache gets its owner,
//! mode, xattrs (its capability) and mtime from the index entry. Both sides are opened with
//! `O_NOFOLLOW | O_NONBLOCK` and checked to be regular files: a served file is read only
//! while it is the inode the engine registered (a container that swaps it for a symlink or
//! a FIFO gets [`CacheError::Replaced`], never a read elsewhere or a hang).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest as _;

use crate::digest::Sha256;
use crate::index::Entry;

/// Mode of a cache entry: readable by its owner (root), nothing else.
pub const ENTRY_MODE: u32 = 0o400;

/// Mode of the cache directory.
pub const DIR_MODE: u32 = 0o700;

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
    /// The path no longer leads to the registered file (a symlink, a FIFO, another inode):
    /// nothing was read from it.
    #[error("content cache: {path} is no longer the served file")]
    Replaced {
        /// The path.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens `path` without following a final symlink and without blocking on a FIFO.
fn open_nofollow(path: &Path, write: bool) -> std::io::Result<File> {
    File::options()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    present: Arc<Presence>,
}

/// Which digests the cache may hold: one bit per value of a digest's first
/// [`PRESENCE_BITS`] bits, set for every entry found at open and every entry added, never
/// cleared. A clear bit means "not cached" without a lookup in the directory: a prepare asks
/// for every one of its placeholders, nearly always in vain, and 50,000 failed opens cost a
/// 50,000-file prepare 9 % of its time. A set bit is only a maybe (the directory decides).
#[derive(Debug)]
struct Presence(Box<[AtomicU64]>);

/// 2^22 bits (512 KiB of the daemon's memory): about 5 % of lookups of an absent digest
/// still reach the directory when the cache holds 200,000 entries.
const PRESENCE_BITS: u32 = 22;

impl Presence {
    fn new() -> Presence {
        Presence(
            (0..(1usize << PRESENCE_BITS) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    fn slot(d: &Sha256) -> (usize, u64) {
        let v = u32::from_be_bytes([d.0[0], d.0[1], d.0[2], d.0[3]]) >> (32 - PRESENCE_BITS);
        ((v / 64) as usize, 1u64 << (v % 64))
    }

    fn insert(&self, d: &Sha256) {
        let (i, bit) = Presence::slot(d);
        self.0[i].fetch_or(bit, Ordering::Relaxed);
    }

    fn may_hold(&self, d: &Sha256) -> bool {
        let (i, bit) = Presence::slot(d);
        self.0[i].load(Ordering::Relaxed) & bit != 0
    }
}

impl Cache {
    /// Opens (creating) the cache at `dir`: the directory is made 0700 and every entry a
    /// root-owned 0400 file (entries of older versions kept the image's mode, setuid bits
    /// included); anything else found there is removed.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(io(dir))?;
        let cache = Cache {
            dir: dir.to_path_buf(),
            present: Arc::new(Presence::new()),
        };
        let mut fixed = 0u64;
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let path = e.path();
            let name = e.file_name();
            let digest = Sha256::from_hex(&name.to_string_lossy()).ok();
            let is_entry = digest.is_some_and(|d| cache.path(&d) == path);
            if let Some(d) = digest.filter(|_| is_entry) {
                cache.present.insert(&d);
            }
            // The common case, an entry as it should be, costs one lstat.
            if is_entry
                && std::fs::symlink_metadata(&path).is_ok_and(|m| {
                    m.is_file() && (m.uid(), m.gid()) == (0, 0) && m.mode() & 0o7777 == ENTRY_MODE
                })
            {
                continue;
            }
            let f = match open_nofollow(&path, false) {
                Ok(f) if is_entry => f,
                _ => {
                    // Not an entry (a temp file of a crashed add, a symlink): gone.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            let m = f.metadata().map_err(io(&path))?;
            if !m.is_file() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if (m.uid(), m.gid()) != (0, 0) || m.mode() & 0o7777 != ENTRY_MODE {
                nix::unistd::fchown(
                    &f,
                    Some(nix::unistd::Uid::from_raw(0)),
                    Some(nix::unistd::Gid::from_raw(0)),
                )
                .map_err(|e| io(&path)(e.into()))?;
                f.set_permissions(std::fs::Permissions::from_mode(ENTRY_MODE))
                    .map_err(io(&path))?;
                fixed += 1;
            }
        }
        if fixed > 0 {
            tracing::info!(
                fixed,
                "content cache entries made root-owned and read-only (0400)"
            );
        }
        Ok(cache)
    }

    fn path(&self, sha256: &Sha256) -> PathBuf {
        self.dir.join(sha256.to_hex())
    }

    /// Whether a file with this digest is cached.
    pub fn contains(&self, sha256: &Sha256) -> bool {
        self.present.may_hold(sha256) && self.path(sha256).exists()
    }

    /// Writes the cached bytes of `sha256` into the (not yet marked) placeholder open as
    /// `out` (at `dest`, for messages) made from the index entry `meta`, through that
    /// descriptor, then gives it `meta`'s owner, mode, xattrs and mtime (a write strips
    /// `security.capability`; nothing is taken from the cache entry). `Ok(false)`: not
    /// cached (or of another size), or `out` is not a regular file of `meta`'s size.
    pub fn fill(
        &self,
        sha256: &Sha256,
        out: &File,
        dest: &Path,
        meta: &Entry,
    ) -> Result<bool, CacheError> {
        if !self.present.may_hold(sha256) {
            return Ok(false);
        }
        let src_path = self.path(sha256);
        let mut src = match open_nofollow(&src_path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&src_path)(e)),
        };
        let sm = src.metadata().map_err(io(&src_path))?;
        if !sm.is_file() || sm.len() != meta.size {
            return Ok(false);
        }
        let dm = out.metadata().map_err(io(dest))?;
        if !dm.is_file() || dm.len() != meta.size {
            return Ok(false);
        }
        // std::io::copy between files is copy_file_range on Linux: reflinks where it can.
        // Written at offset 0 whatever the descriptor's position.
        use std::io::Seek as _;
        let mut w = out;
        w.seek(std::io::SeekFrom::Start(0)).map_err(io(dest))?;
        std::io::copy(&mut src, &mut w).map_err(io(dest))?;
        crate::unpack::finish_file(out, meta).map_err(io(dest))?;
        Ok(true)
    }

    /// Adds the complete file at `src` under `sha256` if `src` is still the regular file
    /// `(dev, ino)` and its bytes hash to `sha256`. `Ok(false)`: they do not (the file was
    /// changed by its user), nothing is added.
    pub fn add(&self, sha256: &Sha256, src: &Path, expect: (u64, u64)) -> Result<bool, CacheError> {
        let path = self.path(sha256);
        if path.exists() {
            self.present.insert(sha256);
            return Ok(true);
        }
        let replaced = || CacheError::Replaced {
            path: src.to_path_buf(),
        };
        let mut from = match open_nofollow(src, false) {
            Ok(f) => f,
            // ELOOP: a symlink now; ENOENT: moved or deleted.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOENT)) => {
                return Err(replaced());
            }
            Err(e) => return Err(io(src)(e)),
        };
        let m = from.metadata().map_err(io(src))?;
        if !m.is_file() || (m.dev(), m.ino()) != expect {
            return Err(replaced());
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .mode(ENTRY_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let added = (|| {
            std::io::copy(&mut from, &mut out)?;
            drop(out);
            let mut f = open_nofollow(&tmp, false)?;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            if Sha256(h.finalize().into()) != *sha256 {
                return Ok(false);
            }
            std::fs::rename(&tmp, &path)?;
            self.present.insert(sha256);
            Ok(true)
        })();
        if !matches!(added, Ok(true)) {
            let _ = std::fs::remove_file(&tmp);
        }
        added.map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::EntryKind;

    fn key(p: &Path) -> (u64, u64) {
        let m = std::fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn only_matching_bytes_enter_and_fill_takes_the_index_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let sha = Sha256::of(b"hello");
        let other = Sha256::of(b"other");
        assert!(!cache.add(&other, &src, key(&src)).unwrap());
        assert!(cache.add(&sha, &src, key(&src)).unwrap());
        assert!(cache.contains(&sha));
        let m = std::fs::metadata(dir.path().join("cache").join(sha.to_hex())).unwrap();
        assert_eq!(m.mode() & 0o7777, ENTRY_MODE);
        let dm = std::fs::metadata(dir.path().join("cache")).unwrap();
        assert_eq!(dm.mode() & 0o7777, DIR_MODE);
        let dest = dir.path().join("dest");
        let f = File::create(&dest).unwrap();
        f.set_len(5).unwrap();
        drop(f);
        let mut meta = Entry::new("dest", EntryKind::File, 0o2711);
        meta.size = 5;
        meta.mtime = 1_000_000;
        let out = open_nofollow(&dest, true).unwrap();
        assert!(cache.fill(&sha, &out, &dest, &meta).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        let m = std::fs::metadata(&dest).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o2711);
        assert_eq!(m.mtime(), 1_000_000);
        meta.size = 6;
        assert!(!cache.fill(&sha, &out, &dest, &meta).unwrap());
        // Not cached: answered from the presence bits alone, without a lookup (the cache
        // directory replaced by a file: a lookup fails with ENOTDIR).
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        std::fs::write(dir.path().join("cache"), b"").unwrap();
        meta.size = 5;
        assert!(!cache.fill(&other, &out, &dest, &meta).unwrap());
        assert!(!cache.contains(&other));
        assert!(cache.fill(&sha, &out, &dest, &meta).is_err());
    }

    #[test]
    fn a_swapped_path_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let served = dir.path().join("served");
        std::fs::write(&served, b"data").unwrap();
        let k = key(&served);
        let sha = Sha256::of(b"data");
        // Another file with the same bytes: the right content, the wrong inode.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"data").unwrap();
        std::fs::remove_file(&served).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &served).unwrap();
        assert!(matches!(
            cache.add(&sha, &served, k),
            Err(CacheError::Replaced { .. })
        ));
        std::fs::remove_file(&served).unwrap();
        std::fs::rename(&elsewhere, &served).unwrap();
        assert!(matches!(
            cache.add(&sha, &served, k),
            Err(CacheError::Replaced { .. })
        ));
        // A FIFO: refused at once, no reader blocked on it.
        std::fs::remove_file(&served).unwrap();
        nix::unistd::mkfifo(&served, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let k = key(&served);
        assert!(matches!(
            cache.add(&sha, &served, k),
            Err(CacheError::Replaced { .. })
        ));
        assert!(!cache.contains(&sha));
    }

    #[test]
    fn open_strips_old_entries_to_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let cdir = dir.path().join("cache");
        std::fs::create_dir(&cdir).unwrap();
        std::fs::set_permissions(&cdir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sha = Sha256::of(b"x");
        let hex = sha.to_hex();
        std::fs::write(cdir.join(&hex), b"x").unwrap();
        std::fs::set_permissions(cdir.join(&hex), std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::fs::write(cdir.join(format!("{hex}.tmp1")), b"x").unwrap();
        let cache = Cache::open(&cdir).unwrap();
        assert!(cache.contains(&sha));
        let m = std::fs::metadata(cdir.join(&hex)).unwrap();
        assert_eq!(m.mode() & 0o7777, ENTRY_MODE);
        assert_eq!(std::fs::metadata(&cdir).unwrap().mode() & 0o7777, DIR_MODE);
        assert!(!cdir.join(format!("{hex}.tmp1")).exists());
    }
}
