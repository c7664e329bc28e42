//! The image issue's figures, proved against a real registry: a 3-layer gzip image of host
//! files (>= 2,000 files, >= 50 MiB compressed, with whiteouts, symlinks and hard links) is
//! pushed to a local `docker-registry` with its index artifact; a fresh index directory and
//! a fresh engine then prepare it and
//! 1. the placeholders are ready after < 2% of the compressed image has travelled;
//! 2. reading a seeded random 5% of the files fetches < 20% of it;
//! 3. every file read through the placeholders has the sha256 of a plain `tar -x` of the
//!    same layers (whiteouts applied), and the trees hold the same paths and link targets.

mod common;
#[path = "support/host_image.rs"]
mod host_image;
#[path = "support/trees.rs"]
mod trees;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::ocibuild::{Compression, write_layout};
use sha2::Digest as _;
use trees::{compare, mib, pct, read_bounded, sample, sha256_file, tar_extract, walk};

#[test]
fn lazy_image_meets_the_issue_figures() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let built = write_layout(&layout, "v1", &host_image::layers(1.0), Compression::Gzip)
        .expect("build the image from host files");
    let compressed = built.compressed_size();
    let blobs: Vec<PathBuf> = built
        .layers
        .iter()
        .map(|(d, _, _)| layout.join("blobs/sha256").join(&d[7..]))
        .collect();
    let reference_dir = tmp.path().join("reference");
    tar_extract(&blobs, &reference_dir);
    let tree = walk(&reference_dir);
    let files: Vec<&String> = tree
        .iter()
        .filter(|(_, (_, t))| t.is_file())
        .map(|(k, _)| k)
        .collect();
    eprintln!(
        "image: {} layers, {:.1} MiB compressed, {:.1} MiB uncompressed, {} files, {} paths",
        built.layers.len(),
        mib(compressed),
        mib(built.layers.iter().map(|l| l.2).sum()),
        files.len(),
        tree.len()
    );
    assert_eq!(built.layers.len(), 3);
    assert!(files.len() >= 2000, "{} files", files.len());
    assert!(compressed >= 50 << 20, "{compressed} bytes compressed");
    assert!(tree.values().any(|(_, t)| t.is_symlink()));

    // The publisher: push the image, index it once, attach the index as a referrer.
    common::push_layout(&layout, "v1", &reg.host(), "lazy/app", &[]);
    let reference = format!("docker://{}/lazy/app:v1", reg.host());
    let mut publisher = PrepareOptions::new(tmp.path().join("publisher-indexes"));
    publisher.registry.insecure = true;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_, artifact) = rt
        .block_on(image::index_image(&reference, &publisher, true))
        .expect("index and push");
    assert!(artifact.is_some());

    // A fresh machine: empty index directory, fresh engine.
    let mut opts = PrepareOptions::new(tmp.path().join("indexes"));
    opts.registry.insecure = true;
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let dest = tmp.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let t = Instant::now();
    let prepared = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(120),
                image::prepare(&engine, &reference, &dest, &opts),
            )
            .await
        })
        .expect("prepare within 120 s")
        .expect("prepare");
    let ready_ms = t.elapsed().as_millis();
    assert_eq!(prepared.image_size, compressed);
    assert!(
        prepared
            .index_origins
            .iter()
            .all(|o| *o == IndexOrigin::Artifact),
        "{:?}",
        prepared.index_origins
    );
    let before = prepared.bytes_before_ready;
    eprintln!(
        "(1) placeholders ready in {ready_ms} ms after {} bytes = {:.2}% of the compressed image",
        before,
        pct(before, compressed)
    );
    assert!(pct(before, compressed) < 2.0);

    // (2) A seeded random 5% of the files, read through the placeholders.
    let limit = Duration::from_secs(60);
    let picked = sample(files.len(), files.len().div_ceil(20), 0x00c0_ffee);
    let start = prepared.store.bytes_fetched();
    let t = Instant::now();
    let mut sampled_bytes = 0u64;
    for &i in &picked {
        let rel = files[i];
        let data = read_bounded(&dest.join(rel), limit);
        sampled_bytes += data.len() as u64;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&data)),
            sha256_file(&tree[rel].0),
            "{rel}"
        );
    }
    let fetched = prepared.store.bytes_fetched() - start;
    eprintln!(
        "(2) read {} of {} files ({:.1} MiB of content) in {} ms: fetched {:.2} MiB = {:.1}% of the compressed image ({:.1}% with the bytes before ready)",
        picked.len(),
        files.len(),
        mib(sampled_bytes),
        t.elapsed().as_millis(),
        mib(fetched),
        pct(fetched, compressed),
        pct(fetched + before, compressed)
    );
    assert!(pct(fetched, compressed) < 20.0);

    // (3) Every path: same kind, same link target, same content.
    let t = Instant::now();
    let mismatches = compare(&tree, &dest, limit);
    let total = prepared.store.bytes_fetched();
    eprintln!(
        "(3) all {} paths ({} files) compared in {} ms: {} mismatches; fetched in all {:.1} MiB = {:.1}% of the compressed image",
        tree.len(),
        files.len(),
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
    drop(prepared);
    engine.shutdown();
    drop(rt);
}
