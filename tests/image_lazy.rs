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

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::ocibuild::{Compression, write_layout};
use sha2::Digest as _;
use trees::{
    compare, compare_all, indexed_locally, mib, pct, prepare_within, read_bounded, read_sample,
    sample, sha256_file, tar_extract, walk,
};

/// An image of host files (`scale` of the full set) written as a gzip OCI layout under
/// `tmp`, with its plain `tar -x` reference tree.
struct HostImage {
    layout: PathBuf,
    built: fanfill::ocibuild::BuiltImage,
    tree: std::collections::BTreeMap<String, (PathBuf, std::fs::FileType)>,
}

impl HostImage {
    fn build(tmp: &Path, scale: f64) -> HostImage {
        let layout = tmp.join("layout");
        let built = write_layout(&layout, "v1", &host_image::layers(scale), Compression::Gzip)
            .expect("build the image from host files");
        let blobs: Vec<PathBuf> = built
            .layers
            .iter()
            .map(|(d, _, _)| layout.join("blobs/sha256").join(&d[7..]))
            .collect();
        let reference_dir = tmp.join("reference");
        tar_extract(&blobs, &reference_dir);
        let tree = walk(&reference_dir);
        HostImage {
            layout,
            built,
            tree,
        }
    }

    /// The regular files' paths.
    fn files(&self) -> Vec<&String> {
        self.tree
            .iter()
            .filter(|(_, (_, t))| t.is_file())
            .map(|(k, _)| k)
            .collect()
    }
}

#[test]
fn lazy_image_meets_the_issue_figures() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = HostImage::build(tmp.path(), 1.0);
    let (layout, built, tree, files) = (&img.layout, &img.built, &img.tree, img.files());
    let compressed = built.compressed_size();
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
    common::push_layout(layout, "v1", &reg.host(), "lazy/app", &[]);
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
    let prepared = prepare_within(&rt, &engine, &reference, &dest, &opts).expect("prepare");
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
    let read = read_sample(&files, tree, &dest, limit, || {
        prepared.store.bytes_fetched()
    });
    eprintln!(
        "{} ({:.1}% with the bytes before ready)",
        read.report(files.len(), compressed),
        pct(read.fetched + before, compressed)
    );
    assert!(pct(read.fetched, compressed) < 20.0);

    // (3) Every path: same kind, same link target, same content.
    compare_all(
        tree,
        files.len(),
        &dest,
        limit,
        || prepared.store.bytes_fetched(),
        compressed,
    );
    drop(prepared);
    engine.shutdown();
    drop(rt);
}

/// Background completion streams each layer once: a prefetch of a prepared image reads every
/// layer blob with one GET, inflates it once, and leaves every file complete (mark removed)
/// with the bytes of a plain `tar -x`, also while readers fill files on demand at the same
/// time (no chunk written twice, none wrong).
#[test]
fn streaming_prefetch_reads_each_layer_once_and_completes_the_image() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = HostImage::build(tmp.path(), 0.25);
    let (built, tree, files) = (&img.built, &img.tree, img.files());
    let compressed = built.compressed_size();
    common::push_layout(&img.layout, "v1", &reg.host(), "stream/app", &[]);
    let reference = format!("docker://{}/stream/app:v1", reg.host());
    // Index once (streams the layers), then prepare from that local index with no blob
    // cache: every prefetched byte has to come from the registry.
    let (rt, opts) = indexed_locally(&reference, tmp.path());
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let limit = Duration::from_secs(60);
    let check = |dest: &Path, what: &str| {
        let bad = compare(tree, dest, limit);
        assert!(
            bad.is_empty(),
            "{what}: {} differ: {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    };

    // 1. Nobody reading: one GET per layer, about the compressed size in all.
    let dest = tmp.path().join("quiet");
    std::fs::create_dir(&dest).unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .expect("prepare");
    let (bytes0, req0) = (
        prepared.store.bytes_fetched(),
        prepared.store.stats().requests(),
    );
    let t = Instant::now();
    let streamed = prepared.prefetch(&engine, 2).expect("prefetch");
    let (bytes, requests) = (
        prepared.store.bytes_fetched() - bytes0,
        prepared.store.stats().requests() - req0,
    );
    eprintln!(
        "quiet prefetch: {} files, {:.1} MiB written from {} layer streams in {} ms; {:.1} MiB fetched ({:.2}x the compressed image) in {requests} requests",
        streamed.files,
        mib(streamed.bytes_written),
        built.layers.len(),
        t.elapsed().as_millis(),
        mib(bytes),
        bytes as f64 / compressed as f64
    );
    let complete = prepared
        .files
        .iter()
        .filter(|id| engine.is_complete(**id))
        .count();
    assert_eq!(
        complete,
        prepared.files.len(),
        "files complete after prefetch"
    );
    assert!(streamed.bytes_written > 0);
    assert!(
        requests <= 2 * built.layers.len() as u64,
        "{requests} requests"
    );
    assert!(
        bytes <= compressed + compressed / 50,
        "{bytes} bytes fetched"
    );
    check(&dest, "quiet prefetch");

    // 2. Readers filling on demand while the layers stream: every byte right, every file
    // complete.
    let dest = tmp.path().join("busy");
    std::fs::create_dir(&dest).unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .expect("prepare");
    let order = sample(files.len(), files.len(), 0x5eed);
    let errors = std::thread::scope(|s| {
        let readers: Vec<_> = (0..4)
            .map(|r| {
                let (order, files, tree, dest) = (&order, &files, &tree, &dest);
                s.spawn(move || {
                    let mut bad = 0;
                    // Half the readers walk against the streams' direction.
                    let mine: Vec<usize> = order.iter().copied().skip(r).step_by(4).collect();
                    let mine: Vec<usize> = if r % 2 == 1 {
                        mine.into_iter().rev().collect()
                    } else {
                        mine
                    };
                    for i in mine {
                        let rel = files[i];
                        let got =
                            hex::encode(sha2::Sha256::digest(read_bounded(&dest.join(rel), limit)));
                        bad += usize::from(got != sha256_file(&tree[rel].0));
                    }
                    bad
                })
            })
            .collect();
        let streamed = prepared
            .prefetch(&engine, 2)
            .expect("prefetch with readers");
        eprintln!(
            "busy prefetch: {:.1} MiB written from layer streams while 4 readers read every file",
            mib(streamed.bytes_written)
        );
        readers
            .into_iter()
            .map(|r| r.join().expect("reader"))
            .sum::<usize>()
    });
    assert_eq!(errors, 0, "readers saw wrong bytes");
    let complete = prepared
        .files
        .iter()
        .filter(|id| engine.is_complete(**id))
        .count();
    assert_eq!(complete, prepared.files.len());
    check(&dest, "busy prefetch");
    assert_eq!(engine.stats().errors, 0);
    drop(prepared);
    engine.shutdown();
    drop(rt);
}

/// An access profile recorded from one run travels in the index artifact, and the next
/// prepare fills exactly its files in the background, in its order, before anyone reads
/// them.
#[test]
fn access_profile_is_recorded_published_and_filled_ahead() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_layout(&layout, "v1", &host_image::layers(0.1), Compression::Gzip)
        .expect("build the image from host files");
    common::push_layout(&layout, "v1", &reg.host(), "profile/app", &[]);
    let reference = format!("docker://{}/profile/app:v1", reg.host());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let limit = Duration::from_secs(60);

    // Record: prepare, read six files in a known order (one of them twice).
    let mut opts = PrepareOptions::new(tmp.path().join("publisher")).for_recording();
    opts.registry.insecure = true;
    let dest = tmp.path().join("record");
    let recorded = dest.clone();
    std::fs::create_dir(&dest).unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .expect("prepare");
    assert_eq!(prepared.profile_files, 0, "no profile published yet");
    let tree = walk(&dest);
    let files: Vec<&String> = tree
        .iter()
        .filter(|(_, (_, t))| t.is_file())
        .map(|(k, _)| k)
        .collect();
    let picked: Vec<&String> = sample(files.len(), 6, 0xfeed)
        .into_iter()
        .rev()
        .map(|i| files[i])
        .collect();
    for rel in picked.iter().chain(&picked[..1]) {
        read_bounded(&dest.join(rel), limit);
    }
    let profile = prepared.access_profile(&engine);
    // Paths in the profile are the indexes' names; here they are the tree's paths.
    let want: Vec<String> = picked
        .iter()
        .filter(|rel| std::fs::metadata(dest.join(rel)).unwrap().len() > 0)
        .map(|s| s.to_string())
        .collect();
    assert_eq!(profile.files, want, "first access first, each file once");
    rt.block_on(image::index_image_with_profile(
        &reference,
        &opts,
        true,
        Some(&profile),
    ))
    .expect("push the artifact with the profile");
    drop(prepared);

    // A fresh machine: the artifact's profile is filled at once, and nothing else.
    let mut opts = PrepareOptions::new(tmp.path().join("indexes"));
    opts.registry.insecure = true;
    let dest = tmp.path().join("run");
    std::fs::create_dir(&dest).unwrap();
    let complete_before = engine.stats().files_complete;
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .expect("prepare");
    assert_eq!(prepared.profile_files, want.len());
    let deadline = Instant::now() + limit;
    let done = || {
        prepared
            .files
            .iter()
            .filter(|id| engine.is_complete(**id))
            .count()
    };
    while done() < want.len() {
        assert!(
            Instant::now() < deadline,
            "profile files not filled: {}",
            done()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(done(), want.len(), "only the profile's files are filled");
    let events_before = engine.stats().events;
    for rel in &want {
        let got = read_bounded(&dest.join(rel), limit);
        assert!(got == std::fs::read(recorded.join(rel)).unwrap(), "{rel}");
    }
    assert_eq!(
        engine.stats().events,
        events_before,
        "reading the profile's files raised no fill event: they were complete"
    );
    eprintln!(
        "profile of {} files filled ahead by the next prepare; {} files complete before, {} after",
        want.len(),
        complete_before,
        engine.stats().files_complete
    );
    drop(prepared);
    engine.shutdown();
    drop(rt);
}

/// A published access profile is filled ahead together with the image's start set, start
/// set first: a profile recorded outside a container (a chroot) lacks what the runtime
/// reads to start one, such as the user and group files. With the start set off, only the
/// profile's files are filled; a file neither names is filled by nobody.
#[test]
fn the_start_set_is_filled_ahead_beside_a_published_profile() {
    use fanfill::ocibuild::LayerItem;
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let file = |path: &str, len: usize| {
        LayerItem::file(path, (0..len).map(|i| (i * 7 % 251) as u8).collect())
    };
    let dir = LayerItem::dir;
    let layer = vec![
        dir("etc"),
        file("etc/passwd", 3_000),
        file("etc/group", 2_000),
        dir("app"),
        file("app/x", 40_000),
        file("app/y", 40_000),
    ];
    write_layout(&layout, "v1", &[layer], Compression::Gzip).unwrap();
    common::push_layout(&layout, "v1", &reg.host(), "startset/app", &[]);
    let reference = format!("docker://{}/startset/app:v1", reg.host());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let mut opts = PrepareOptions::new(tmp.path().join("publisher"));
    opts.registry.insecure = true;
    let profile = image::AccessProfile {
        version: 1,
        files: vec!["app/x".into()],
    };
    rt.block_on(image::index_image_with_profile(
        &reference,
        &opts,
        true,
        Some(&profile),
    ))
    .expect("push the artifact with the profile");
    for on in [true, false] {
        let mut opts = PrepareOptions::new(tmp.path().join(format!("indexes-{on}")));
        opts.registry.insecure = true;
        opts.start_set = on;
        let dest = tmp.path().join(format!("run-{on}"));
        std::fs::create_dir(&dest).unwrap();
        let prepared = rt
            .block_on(image::prepare(&engine, &reference, &dest, &opts))
            .expect("prepare");
        let ahead: &[&str] = if on {
            &["etc/passwd", "etc/group", "app/x"]
        } else {
            &["app/x"]
        };
        assert_eq!(prepared.profile_files, ahead.len(), "start set {on}");
        let id = |rel: &str| {
            let m = std::fs::symlink_metadata(dest.join(rel)).unwrap();
            use std::os::unix::fs::MetadataExt;
            fanfill::fill::FileId::new(m.dev(), m.ino())
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ahead.iter().all(|p| engine.is_complete(id(p))) {
            assert!(
                Instant::now() < deadline,
                "not filled ahead (start set {on})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        for p in ["etc/passwd", "etc/group", "app/y"] {
            assert_eq!(
                engine.is_complete(id(p)),
                ahead.contains(&p),
                "{p} with the start set {on}"
            );
        }
        drop(prepared);
    }
    engine.shutdown();
    drop(rt);
}
