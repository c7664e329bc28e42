//! Local copies of layer blobs that had to travel whole.
//!
//! Owns the directory of blobs kept by digest (`DIR/sha256/HEX`). A blob travels whole when
//! a layer has no index yet (it is streamed once to build one: [`BlobCache::tee`]), when the
//! background completion reads a layer from a registry that ignores `Range:` (one that
//! serves ranges answers misses with their ranges: nothing is kept,
//! [`crate::registry::BlobStore::serves_ranges`]), and when a server answers a range
//! request with the whole blob (a pull-through cache on a cold cache does: `200`, not
//! `206`). The bytes are downloaded anyway, so they are kept here as they pass, and every
//! later fill of that layer is a local `pread` plus an inflate, not another request
//! ([`read_range`] picks the cache, a copy in flight, or the registry). A whole-blob download
//! is a [`Copy`]: one per blob in the process, written at link speed whoever started it; a
//! miss whose range the server answered with the whole blob waits until the copy passes its
//! range instead of discarding a download per miss, and the background completion follows
//! a copy in flight instead of starting a second download ([`Copy::reader`]). A blob is
//! published (renamed into place) only after its digest was verified at the end of the
//! stream; a partial or wrong download never becomes visible under its digest. It never
//! interprets blob contents and never touches placeholders; the cache directory must not be
//! under a marked tree.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::registry::{BlobStore, BlobStream, RangeRead};

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

    /// Deletes the blob if it is here; returns whether it was. A copy of it in flight is
    /// not stopped (it publishes the blob again when it ends).
    pub fn remove(&self, digest: &str) -> io::Result<bool> {
        let Some(path) = self.path(digest) else {
            return Ok(false);
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
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

/// Reads `len` bytes of blob `digest` at `offset`: from `cache` when it holds the blob,
/// from a whole-blob copy in flight when the server is known to ignore `Range:` for it,
/// else by a range read from `store`; a server that answers that range read with the whole
/// blob starts (or joins) the one [`Copy`] of it, and the read waits until the copy passes
/// the range. The one place fills choose between the cache and the registry.
pub async fn read_range(
    cache: Option<&BlobCache>,
    store: &BlobStore,
    digest: &oci_spec::image::Digest,
    offset: u64,
    len: u64,
) -> Result<bytes::Bytes, crate::registry::Error> {
    read_range_seen(cache, store, digest, offset, len, None).await
}

/// [`read_range`], showing the bytes of a range read from the registry to `seen` as they
/// arrive ([`BlobStore::read_range_or_whole_seen`]); bytes read locally (the cache, a copy)
/// come back whole, unseen.
pub async fn read_range_seen(
    cache: Option<&BlobCache>,
    store: &BlobStore,
    digest: &oci_spec::image::Digest,
    offset: u64,
    len: u64,
    seen: Option<crate::registry::RangeSeen<'_>>,
) -> Result<bytes::Bytes, crate::registry::Error> {
    let Some(cache) = cache else {
        return match store
            .read_range_or_whole_seen(digest, offset, len, seen)
            .await?
        {
            RangeRead::Range(bytes) => Ok(bytes),
            RangeRead::Whole(stream) => stream.into_slice(offset, len).await,
        };
    };
    let key = digest.as_ref();
    if let Some(copy) = cache.copying(key).filter(|c| c.ranges_ignored())
        && let Some(bytes) = copy.read(offset, len).await?
    {
        return Ok(bytes);
    }
    if let Ok(Some(bytes)) = cache.read_range(key, offset, len) {
        return Ok(bytes::Bytes::from(bytes));
    }
    let stream = match store
        .read_range_or_whole_seen(digest, offset, len, seen)
        .await?
    {
        RangeRead::Range(bytes) => return Ok(bytes),
        RangeRead::Whole(stream) => stream,
    };
    let copy = match cache.copy(stream) {
        Ok(copy) => copy,
        // A copy ended and published the blob while this range read was on its way.
        Err((e, _)) if e.kind() == io::ErrorKind::AlreadyExists => {
            if let Ok(Some(bytes)) = cache.read_range(key, offset, len) {
                return Ok(bytes::Bytes::from(bytes));
            }
            return store.read_range(digest, offset, len).await;
        }
        Err((e, stream)) => {
            tracing::warn!(digest = key, error = %e, "blob cache unavailable; reading the range from the whole blob");
            return stream.into_slice(offset, len).await;
        }
    };
    copy.unpace();
    match copy.read(offset, len).await? {
        Some(bytes) => Ok(bytes),
        // The copy failed: read the range again (its error, if any, is the answer).
        None => store.read_range(digest, offset, len).await,
    }
}

/// Whole-blob copies being written, by destination: at most one per blob in the process.
static COPIES: LazyLock<Mutex<HashMap<PathBuf, Arc<Copy>>>> = LazyLock::new(Default::default);

/// How far a [`Copy`] got.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Bytes of the blob written to the temporary file, from byte 0.
    written: u64,
    /// Set once the copy ended.
    end: Option<CopyEnd>,
}

#[derive(Debug, Clone)]
enum CopyEnd {
    /// The whole blob was written and verified (and published, unless that failed).
    Complete,
    /// The blob did not hash to its digest: nothing published.
    Mismatch,
    /// The download or the write failed: nothing published.
    Failed(String),
}

/// Bytes a paced [`Copy`] downloads ahead of what its readers asked for.
const COPY_AHEAD: u64 = 4 << 20;

/// One download of a whole blob into the cache, readable while it is written: the bytes
/// below [`Copy::read`]'s wait are on disk. Started by [`BlobCache::copy`]; the blob is
/// published under its digest when the stream ends verified.
///
/// A copy is paced by its readers: it downloads at most [`COPY_AHEAD`] past the furthest
/// byte asked for, so a background completion that follows it ([`Copy::reader`]) keeps its
/// own pace (its rate limit, its pauses for readers' misses) on the network too. Once a
/// server answered a range read with the whole blob the copy runs at link speed (that
/// answer is the only way to the bytes), and a paced copy whose follower stopped is
/// abandoned (nothing kept).
#[derive(Debug)]
pub struct Copy {
    digest: String,
    /// A read handle of the temporary file (still valid once it is renamed into place).
    file: File,
    progress: watch::Receiver<Progress>,
    /// The furthest byte a reader asked for (`u64::MAX`: no pacing).
    demand: watch::Sender<u64>,
    /// A range read of this blob was answered with the whole blob: later misses wait for
    /// the copy rather than ask again, and the copy is no longer paced.
    ranges_ignored: AtomicBool,
    /// Readers following the copy ([`Copy::reader`]).
    followers: AtomicUsize,
    /// The last follower of a paced copy stopped: the copy ends, keeping nothing.
    abandoned: AtomicBool,
}

impl Copy {
    /// Runs the copy at link speed from now on (see [`Copy::ranges_ignored`]).
    fn unpace(&self) {
        self.ranges_ignored.store(true, Ordering::SeqCst);
        self.demand.send_replace(u64::MAX);
    }

    /// Asks the copy for the bytes up to `end`.
    fn want(&self, end: u64) {
        self.demand.send_if_modified(|d| {
            let more = *d < end;
            if more {
                *d = end;
            }
            more
        });
    }

    /// Whether the server answered a range read of this blob with the whole blob.
    pub fn ranges_ignored(&self) -> bool {
        self.ranges_ignored.load(Ordering::SeqCst)
    }

    /// Bytes `offset..offset + len`, once the copy has written them; `None` if the copy
    /// failed before (the caller reads elsewhere). A range past the end of a complete blob
    /// is [`crate::registry::Error::RangeBeyondEnd`].
    pub async fn read(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<bytes::Bytes>, crate::registry::Error> {
        let end = offset.saturating_add(len);
        self.want(end);
        let mut rx = self.progress.clone();
        let progress = match rx.wait_for(|p| p.written >= end || p.end.is_some()).await {
            Ok(p) => p.clone(),
            // The copying task is gone without a word (a runtime shut down).
            Err(_) => return Ok(None),
        };
        if progress.written >= end {
            let mut buf = vec![0u8; len as usize];
            return match self.file.read_exact_at(&mut buf, offset) {
                Ok(()) => Ok(Some(bytes::Bytes::from(buf))),
                Err(e) => {
                    tracing::warn!(digest = %self.digest, error = %e, "reading a blob copy failed");
                    Ok(None)
                }
            };
        }
        match progress.end {
            Some(CopyEnd::Complete) => Err(crate::registry::Error::RangeBeyondEnd {
                digest: self.digest.clone(),
                offset,
                len,
                size: progress.written,
            }),
            _ => Ok(None),
        }
    }

    /// A blocking reader of the whole blob from byte 0, following the copy as it is written
    /// (for a plain thread, never a runtime's). It ends where the blob ends, also when the
    /// blob turned out not to match its digest (the caller's own hash tells); a failed copy
    /// is an error at the point it reached.
    pub fn reader(self: &Arc<Self>) -> CopyReader {
        self.followers.fetch_add(1, Ordering::SeqCst);
        CopyReader {
            copy: self.clone(),
            progress: self.progress.clone(),
            position: 0,
        }
    }
}

/// See [`Copy::reader`].
#[derive(Debug)]
pub struct CopyReader {
    copy: Arc<Copy>,
    progress: watch::Receiver<Progress>,
    position: u64,
}

impl Read for CopyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.copy
                .want(self.position.saturating_add(buf.len() as u64));
            let progress = self.progress.borrow_and_update().clone();
            if progress.written > self.position && !buf.is_empty() {
                let n = (progress.written - self.position).min(buf.len() as u64) as usize;
                let got = self.copy.file.read_at(&mut buf[..n], self.position)?;
                self.position += got as u64;
                return Ok(got);
            }
            match progress.end {
                Some(CopyEnd::Complete | CopyEnd::Mismatch) => return Ok(0),
                Some(CopyEnd::Failed(why)) => {
                    return Err(io::Error::other(format!(
                        "copy of {} failed at byte {}: {why}",
                        self.copy.digest, progress.written
                    )));
                }
                None if buf.is_empty() => return Ok(0),
                None => {}
            }
            if futures::executor::block_on(self.progress.changed()).is_err() {
                return Err(io::Error::other(format!(
                    "copy of {} stopped at byte {}",
                    self.copy.digest, progress.written
                )));
            }
        }
    }
}

impl Drop for CopyReader {
    fn drop(&mut self) {
        let last = self.copy.followers.fetch_sub(1, Ordering::SeqCst) == 1;
        if last && !self.copy.ranges_ignored() {
            self.copy.abandoned.store(true, Ordering::SeqCst);
            // Wakes a copy waiting for demand, which then sees it was abandoned.
            self.copy.demand.send_replace(u64::MAX);
        }
    }
}

impl BlobCache {
    /// The copy of `digest` in flight, if one is.
    pub fn copying(&self, digest: &str) -> Option<Arc<Copy>> {
        let dest = self.path(digest)?;
        let copies = COPIES.lock().unwrap();
        copies
            .get(&dest)
            .filter(|c| !c.abandoned.load(Ordering::SeqCst))
            .cloned()
    }

    /// Copies the whole blob `stream` reads into the cache, on the current tokio runtime,
    /// and returns the copy to read from; if a copy of that blob is already in flight, that
    /// one (and `stream` is dropped unread). If the blob is already kept (a copy ended while
    /// the caller's request was on its way), the stream comes back with an
    /// [`io::ErrorKind::AlreadyExists`] error; if the cache cannot be written, with that
    /// error.
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    pub fn copy(&self, stream: Box<BlobStream>) -> Result<Arc<Copy>, (io::Error, Box<BlobStream>)> {
        let digest = stream.digest().to_string();
        let Some(dest) = self.path(&digest) else {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a sha256 digest: {digest}"),
            );
            return Err((e, stream));
        };
        let mut copies = COPIES.lock().unwrap();
        if let Some(copy) = copies.get(&dest) {
            return Ok(copy.clone());
        }
        // A copy publishes its blob before it leaves the map: no copy in the map and no
        // file means none has ended since.
        if dest.is_file() {
            let e = io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{digest} is kept already"),
            );
            return Err((e, stream));
        }
        let made = dest
            .parent()
            .ok_or_else(|| io::Error::other("no parent"))
            .and_then(|parent| {
                std::fs::create_dir_all(parent)?;
                let tmp = tempfile::NamedTempFile::new_in(parent)?;
                let read = tmp.reopen()?;
                Ok((tmp, read))
            });
        let (tmp, read) = match made {
            Ok(m) => m,
            Err(e) => return Err((e, stream)),
        };
        let (tx, rx) = watch::channel(Progress::default());
        let (demand, demand_rx) = watch::channel(0);
        let copy = Arc::new(Copy {
            digest: digest.clone(),
            file: read,
            progress: rx,
            demand,
            ranges_ignored: AtomicBool::new(false),
            followers: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
        });
        copies.insert(dest.clone(), copy.clone());
        drop(copies);
        tracing::debug!(digest, "copying the whole blob into the blob cache");
        let paced = Arc::downgrade(&copy);
        tokio::runtime::Handle::current().spawn(async move {
            let end = write_copy(stream, tmp, &dest, &tx, demand_rx, paced).await;
            match &end {
                CopyEnd::Complete => tracing::debug!(digest, "blob kept"),
                CopyEnd::Mismatch => {
                    tracing::warn!(digest, "blob did not match its digest; not kept")
                }
                CopyEnd::Failed(why) => {
                    tracing::warn!(digest, error = %why, "copying the blob failed")
                }
            }
            // Published (or failed) before it stops being found in flight.
            COPIES.lock().unwrap().remove(&dest);
            tx.send_modify(|p| p.end = Some(end));
        });
        Ok(copy)
    }
}

/// Writes `stream` into `tmp` from byte 0, at most [`COPY_AHEAD`] past `demand`, telling
/// `tx` how far it got, and publishes it at `dest` once it ends verified.
async fn write_copy(
    mut stream: Box<BlobStream>,
    tmp: tempfile::NamedTempFile,
    dest: &std::path::Path,
    tx: &watch::Sender<Progress>,
    mut demand: watch::Receiver<u64>,
    copy: std::sync::Weak<Copy>,
) -> CopyEnd {
    let mut written = 0u64;
    loop {
        // The copy lives in the map until this task ends, so `copy` upgrades.
        let waited = demand
            .wait_for(|d| d.saturating_add(COPY_AHEAD) > written)
            .await
            .is_ok();
        let abandoned = copy
            .upgrade()
            .is_none_or(|c| c.abandoned.load(Ordering::SeqCst) && !c.ranges_ignored());
        if !waited || abandoned {
            return CopyEnd::Failed("abandoned: nobody reads it any more".into());
        }
        match stream.chunk().await {
            Ok(Some(chunk)) => {
                if let Err(e) = tmp.as_file().write_all_at(&chunk, written) {
                    return CopyEnd::Failed(format!("writing {}: {e}", tmp.path().display()));
                }
                written += chunk.len() as u64;
                tx.send_modify(|p| p.written = written);
            }
            Ok(None) => {
                let kept = tmp
                    .as_file()
                    .sync_all()
                    .and_then(|()| tmp.persist(dest).map(drop).map_err(|e| e.error));
                if let Err(e) = kept {
                    // Readers of this copy still have every byte; later fills go remote.
                    tracing::warn!(dest = %dest.display(), error = %e, "publishing the blob failed");
                }
                return CopyEnd::Complete;
            }
            Err(crate::registry::Error::DigestMismatch { .. }) => return CopyEnd::Mismatch,
            Err(e) => return CopyEnd::Failed(e.to_string()),
        }
    }
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
