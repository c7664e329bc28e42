//! Trees for comparing a placeholder tree with a plain extraction: walking, bounded reads,
//! GNU tar extraction with whiteouts, seeded samples.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use sha2::Digest as _;

/// What a path is in a tree: a file's sha256, a symlink's target, or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File(String),
    Link(String),
    Dir,
}

/// Every path below `root` (not following symlinks), without reading file contents.
pub fn walk(root: &Path) -> BTreeMap<String, (PathBuf, std::fs::FileType)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let t = e.file_type().unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if t.is_dir() {
                stack.push(p.clone());
            }
            out.insert(rel, (p, t));
        }
    }
    out
}

pub fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Reads `path` on another thread; panics if that takes longer than `limit` (a fill that
/// never completes must fail the test, not hang it).
pub fn read_bounded(path: &Path, limit: Duration) -> Vec<u8> {
    try_read_bounded(path, limit).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// [`read_bounded`] that hands back the read's error (a fill refused with EIO, say).
pub fn try_read_bounded(path: &Path, limit: Duration) -> std::io::Result<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(&p));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("reading {} took longer than {limit:?}", path.display()))
}

/// A plain extraction of the layers, lowest first, with OCI whiteouts applied: the reference
/// the placeholders must match. Uses GNU tar only (no fanfill code), which recognises gzip
/// and zstd blobs by their magic.
pub fn tar_extract(blobs: &[PathBuf], dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for blob in blobs {
        let list = Command::new("tar").arg("-tf").arg(blob).output().unwrap();
        assert!(list.status.success());
        for name in String::from_utf8(list.stdout).unwrap().lines() {
            let name = name.trim_start_matches("./");
            let (dir, base) = match name.rsplit_once('/') {
                Some((d, b)) => (format!("{d}/"), b),
                None => (String::new(), name),
            };
            if let Some(victim) = base.strip_prefix(".wh.") {
                assert_ne!(victim, ".wh..opq", "opaque whiteouts are not used here");
                let target = dest.join(format!("{dir}{victim}"));
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target).unwrap(),
                    Ok(_) => std::fs::remove_file(&target).unwrap(),
                    Err(_) => panic!("whiteout {name} of a missing path"),
                }
            }
        }
        let st = Command::new("tar")
            .args(["-xf"])
            .arg(blob)
            .arg("-C")
            .arg(dest)
            .args(["--exclude=.wh.*", "--no-same-owner"])
            .status()
            .unwrap();
        assert!(st.success(), "tar -x {}", blob.display());
    }
}

/// What reading a sample of files cost.
pub struct SampleRead {
    /// Files read.
    pub files: usize,
    /// Their content, bytes.
    pub content: u64,
    /// Bytes fetched meanwhile.
    pub fetched: u64,
    /// How long it took.
    pub ms: u128,
}

impl SampleRead {
    /// The figure line: `(2) read N of M files ... fetched X MiB = P% of the compressed image`.
    pub fn report(&self, of_files: usize, compressed: u64) -> String {
        format!(
            "(2) read {} of {of_files} files ({:.2} MiB of content) in {} ms: fetched {:.2} MiB = {:.1}% of the compressed image",
            self.files,
            mib(self.content),
            self.ms,
            mib(self.fetched),
            pct(self.fetched, compressed)
        )
    }
}

/// Reads a seeded random 5% of `files` (paths of the reference `tree`) below `dest`, each
/// checked against the reference's sha256; `bytes_fetched` is the store's counter.
pub fn read_sample(
    files: &[&String],
    tree: &BTreeMap<String, (PathBuf, std::fs::FileType)>,
    dest: &Path,
    limit: Duration,
    bytes_fetched: impl Fn() -> u64,
) -> SampleRead {
    let (start, t) = (bytes_fetched(), std::time::Instant::now());
    let picked = sample(files.len(), files.len().div_ceil(20), 0x00c0_ffee);
    let mut content = 0u64;
    for &i in &picked {
        let rel = files[i];
        let data = read_bounded(&dest.join(rel), limit);
        content += data.len() as u64;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&data)),
            sha256_file(&tree[rel].0),
            "{rel}"
        );
    }
    SampleRead {
        files: picked.len(),
        content,
        fetched: bytes_fetched() - start,
        ms: t.elapsed().as_millis(),
    }
}

/// The full check: [`compare`] every path of `tree` (`files` of them regular files) with
/// `dest`, print the figure line with the bytes fetched in all (`bytes_fetched`, the store's
/// counter) against the `compressed` image size, and fail on any mismatch.
pub fn compare_all(
    tree: &BTreeMap<String, (PathBuf, std::fs::FileType)>,
    files: usize,
    dest: &Path,
    limit: Duration,
    bytes_fetched: impl Fn() -> u64,
    compressed: u64,
) {
    let t = std::time::Instant::now();
    let mismatches = compare(tree, dest, limit);
    let total = bytes_fetched();
    eprintln!(
        "(3) all {} paths ({files} files) compared in {} ms: {} mismatches; fetched in all {:.1} MiB = {:.1}% of the compressed image",
        tree.len(),
        t.elapsed().as_millis(),
        mismatches.len(),
        mib(total),
        pct(total, compressed)
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
}

/// xorshift64: the sample is the same on every run.
pub fn sample(n: usize, k: usize, mut seed: u64) -> Vec<usize> {
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < k.min(n) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        picked.insert((seed % n as u64) as usize);
    }
    picked.into_iter().collect()
}

pub fn pct(part: u64, whole: u64) -> f64 {
    part as f64 * 100.0 / whole as f64
}

pub fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Compares every path of `tree` (a [`walk`] of the reference) with the same path below
/// `dest`: same kind, same link target, same content (read by four threads, each read
/// bounded by `limit`); paths only below `dest` are mismatches too.
pub fn compare(
    tree: &BTreeMap<String, (PathBuf, std::fs::FileType)>,
    dest: &Path,
    limit: Duration,
) -> Vec<String> {
    let ours = walk(dest);
    let node = |p: &Path, t: &std::fs::FileType, read: &dyn Fn(&Path) -> String| {
        if t.is_symlink() {
            Node::Link(
                std::fs::read_link(p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if t.is_dir() {
            Node::Dir
        } else {
            Node::File(read(p))
        }
    };
    // Four readers at once, like a container starting several processes.
    let entries: Vec<_> = tree.iter().collect();
    let mut mismatches: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = entries
            .chunks(entries.len().div_ceil(4))
            .map(|part| {
                let (ours, node) = (&ours, &node);
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for (rel, (p, t)) in part {
                        let want = node(p, t, &sha256_file);
                        let got = ours.get(*rel).map(|(q, u)| {
                            node(q, u, &|q| {
                                hex::encode(sha2::Sha256::digest(read_bounded(q, limit)))
                            })
                        });
                        if got.as_ref() != Some(&want) {
                            bad.push(format!("{rel}: want {want:?}, got {got:?}"));
                        }
                    }
                    bad
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("reader thread"))
            .collect()
    });
    for rel in ours.keys() {
        if !tree.contains_key(rel) {
            mismatches.push(format!("{rel}: only in the placeholder tree"));
        }
    }
    mismatches
}

/// `image::prepare` on `rt`, failing the test after 120 s; the error as one line.
pub fn prepare_within(
    rt: &tokio::runtime::Runtime,
    engine: &fanfill::fill::Engine,
    reference: &str,
    dest: &Path,
    opts: &fanfill::image::PrepareOptions,
) -> Result<fanfill::image::Prepared, String> {
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(120),
            fanfill::image::prepare(engine, reference, dest, opts),
        )
        .await
        .expect("prepare within 120 s")
        .map_err(|e| fanfill::fill::error_chain(&e))
    })
}

/// A runtime, and options that prepare `reference` (on the test registry) from an index
/// built here under `tmp` (no artifact) with no blob cache: every fill reads the registry.
pub fn indexed_locally(
    reference: &str,
    tmp: &Path,
) -> (tokio::runtime::Runtime, fanfill::image::PrepareOptions) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut opts = fanfill::image::PrepareOptions::new(tmp.join("indexes"));
    opts.registry.insecure = true;
    opts.use_artifact = false;
    opts.blob_cache = None;
    rt.block_on(fanfill::image::index_image(reference, &opts, false))
        .expect("index");
    (rt, opts)
}
