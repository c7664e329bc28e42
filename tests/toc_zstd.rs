//! zstd:chunked images read lazily through their own TOC, against a real `docker-registry`.
//!
//! The images are written by skopeo (`--dest-compress-format zstd:chunked`, the
//! containers/image compressor) from layouts of host files, and pushed to a local registry.
//! A plain client's eager read of the same blobs (GNU tar `--zstd`, no fanfill code) is the
//! reference every placeholder must match. Shown here:
//! 1. an image of >= 2,000 files: only the TOCs travel before the placeholders are ready
//!    (bounded by the annotations' TOC lengths), what reading 5% of the files fetches, and
//!    every file's sha256 equal to the eager extraction, in direct mode;
//! 2. the same in overlay mode (through overlayfs) and through the daemon;
//! 3. owners, modes, xattrs, devices, fifos and whiteouts from the TOC;
//! 4. a corrupted frame in the registry gives EIO (not zeros); a layer whose TOC does not
//!    match its checksum annotation is streamed once instead (a pull that then fails only
//!    when the streamed bytes do not match the layer digest); without the annotations the
//!    TOC is found through the footer.

mod common;
mod fsutil;
#[path = "support/host_image.rs"]
mod host_image;
#[path = "support/trees.rs"]
mod trees;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fanfill::api::RegistrySettings;
use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::ocibuild::{Compression, LayerItem, write_layout};
use fanfill::overlay::OverlayWatcher;
use fanfill::toc::zstd_chunked::{self, POSITION_ANNOTATIONS, TocPosition};
use fanfill::unpack::Mode;
use fsutil::daemonproc::DaemonProc;
use fsutil::{LoopFs, OverlayMount};
use trees::{
    compare, compare_all, mib, pct, prepare_within, read_bounded, read_sample, tar_extract,
    try_read_bounded, walk,
};

const READ_LIMIT: Duration = Duration::from_secs(60);

/// One plain HTTP/1.0 request to the test registry: `(status, body)`.
fn http(host: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let accept = "application/vnd.oci.image.manifest.v1+json";
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAccept: {accept}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, resp[split + 4..].to_vec())
}

/// A zstd:chunked image in the registry, and the blobs a plain client would download.
struct ChunkedImage {
    reference: String,
    manifest: serde_json::Value,
    /// The layer blobs as the registry stores them, lowest first.
    blobs: Vec<PathBuf>,
    /// Sum of the layer sizes.
    compressed: u64,
    /// Sum of the TOC lengths the `manifest-position` annotations give.
    toc_total: u64,
}

/// Writes `layers` as a gzip layout and pushes it to `reg` as `repo:v1`, recompressed to
/// zstd:chunked by skopeo.
fn push_chunked(
    reg: &common::TestRegistry,
    tmp: &Path,
    repo: &str,
    layers: &[Vec<LayerItem>],
) -> ChunkedImage {
    let layout = tmp.join(format!("layout-{}", repo.replace('/', "-")));
    write_layout(&layout, "v1", layers, Compression::Gzip).expect("write the layout");
    push_layout_chunked(reg, &layout, "v1", repo)
}

fn push_layout_chunked(
    reg: &common::TestRegistry,
    layout: &Path,
    tag: &str,
    repo: &str,
) -> ChunkedImage {
    common::push_layout(
        layout,
        tag,
        &reg.host(),
        repo,
        &["--dest-compress-format", "zstd:chunked"],
    );
    let (status, body) = http(
        &reg.host(),
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        "",
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut image = ChunkedImage {
        reference: format!("docker://{}/{repo}:{tag}", reg.host()),
        blobs: Vec::new(),
        compressed: 0,
        toc_total: 0,
        manifest: manifest.clone(),
    };
    for l in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let ann = &l["annotations"];
        let position = POSITION_ANNOTATIONS
            .iter()
            .find_map(|k| ann[*k].as_str())
            .unwrap_or_else(|| panic!("skopeo wrote no zstd:chunked annotation: {l}"));
        let toc_len: u64 = position.split(':').nth(1).unwrap().parse().unwrap();
        image.toc_total += toc_len;
        image.compressed += l["size"].as_u64().unwrap();
        image
            .blobs
            .push(reg.blob_data_path(l["digest"].as_str().unwrap()));
    }
    image
}

/// Puts `manifest` into the registry as `repo:tag` (a hand-edited copy of a pushed one).
fn put_manifest(
    reg: &common::TestRegistry,
    repo: &str,
    tag: &str,
    manifest: &serde_json::Value,
) -> String {
    let body = serde_json::to_vec(manifest).unwrap();
    let (status, resp) = http(
        &reg.host(),
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
        &body,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&resp));
    format!("docker://{}/{repo}:{tag}", reg.host())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(dir: &Path, mode: Mode) -> PrepareOptions {
    let mut opts = PrepareOptions::new(dir.join("indexes"));
    opts.registry.insecure = true;
    opts.mode = mode;
    opts
}

/// [`prepare_within`] into a new directory `name` below `tmp`, with its own index directory.
fn prepare_fresh(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    reference: &str,
    tmp: &Path,
    name: &str,
) -> Result<image::Prepared, String> {
    let dest = tmp.join(name);
    std::fs::create_dir(&dest).unwrap();
    prepare_within(
        rt,
        engine,
        reference,
        &dest,
        &options(&tmp.join(format!("{name}-state")), Mode::Direct),
    )
}

#[test]
fn zstd_chunked_image_meets_the_issue_figures() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let img = push_chunked(&reg, tmp.path(), "chunked/app", &host_image::layers(1.0));
    let push_ms = t.elapsed().as_millis();

    // The reference: a plain client's eager read of the zstd:chunked blobs.
    let reference_dir = tmp.path().join("reference");
    tar_extract(&img.blobs, &reference_dir);
    let tree = walk(&reference_dir);
    let files: Vec<&String> = tree
        .iter()
        .filter(|(_, (_, t))| t.is_file())
        .map(|(k, _)| k)
        .collect();
    eprintln!(
        "image: {} zstd:chunked layers (skopeo, {push_ms} ms), {:.1} MiB compressed, TOCs {} bytes, {} files, {} paths",
        img.blobs.len(),
        mib(img.compressed),
        img.toc_total,
        files.len(),
        tree.len()
    );
    assert!(files.len() >= 2000, "{} files", files.len());
    assert!(tree.values().any(|(_, t)| t.is_symlink()));

    let rt = runtime();
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let dest = tmp.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let t = Instant::now();
    let prepared = prepare_within(
        &rt,
        &engine,
        &img.reference,
        &dest,
        &options(tmp.path(), Mode::Direct),
    )
    .expect("prepare");
    let ready_ms = t.elapsed().as_millis();
    assert!(
        prepared
            .index_origins
            .iter()
            .all(|o| *o == IndexOrigin::Toc),
        "{:?}",
        prepared.index_origins
    );
    assert!(
        !tmp.path().join("blobs").exists()
            || std::fs::read_dir(tmp.path().join("blobs")).unwrap().count() == 0,
        "no layer travelled whole"
    );
    // (1) Before ready: the manifest, the config and the TOCs, nothing else.
    let before = prepared.bytes_before_ready;
    let manifest_len = serde_json::to_vec(&img.manifest).unwrap().len() as u64;
    let config_len = img.manifest["config"]["size"].as_u64().unwrap();
    let bound = img.toc_total + manifest_len + config_len + 4096;
    eprintln!(
        "(1) placeholders ready in {ready_ms} ms after {before} bytes = {:.3}% of the compressed image (TOCs {} bytes, manifest ~{manifest_len}, config {config_len}; bound {bound})",
        pct(before, img.compressed),
        img.toc_total
    );
    assert!(before >= img.toc_total, "{before} < TOCs {}", img.toc_total);
    assert!(before <= bound, "{before} > {bound}");

    // (2) A seeded random 5% of the files.
    let read = read_sample(&files, &tree, &dest, READ_LIMIT, || {
        prepared.store.bytes_fetched()
    });
    eprintln!("{}", read.report(files.len(), img.compressed));
    assert!(pct(read.fetched, img.compressed) < 20.0);

    // (3) Every path equal to the eager extraction.
    compare_all(
        &tree,
        files.len(),
        &dest,
        READ_LIMIT,
        || prepared.store.bytes_fetched(),
        img.compressed,
    );
    drop(prepared);
    engine.shutdown();
}

#[test]
fn overlay_mode_and_the_daemon_serve_zstd_chunked_images() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let fs = LoopFs::new("ext4", 1024);
    let img = push_chunked(&reg, &fs.mnt, "chunked/small", &host_image::layers(0.15));
    let reference_dir = fs.mnt.join("reference");
    tar_extract(&img.blobs, &reference_dir);
    let tree = walk(&reference_dir);

    // Overlay: one placeholder tree per layer, read through overlayfs.
    let rt = runtime();
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let layers = fs.mnt.join("layers");
    std::fs::create_dir(&layers).unwrap();
    let prepared = prepare_within(
        &rt,
        &engine,
        &img.reference,
        &layers,
        &options(&fs.mnt, Mode::Overlay),
    )
    .expect("prepare overlay");
    assert!(
        prepared
            .index_origins
            .iter()
            .all(|o| *o == IndexOrigin::Toc)
    );
    assert_eq!(prepared.unpacked.lowerdirs.len(), img.blobs.len());
    let ovl = OverlayMount::new(&prepared.unpacked.lowerdir_option(), &fs.mnt.join("ovl"));
    let lower_dev = std::fs::metadata(&fs.mnt).unwrap().dev();
    let watch = OverlayWatcher::start_on(&engine, &ovl.merged, lower_dev).unwrap();
    let mismatches = compare(&tree, &ovl.merged, READ_LIMIT);
    eprintln!(
        "overlay: {} paths compared through overlayfs, {} mismatches, {} opens held, {:.1} MiB fetched of {:.1} MiB",
        tree.len(),
        mismatches.len(),
        watch.opens(),
        mib(prepared.store.bytes_fetched()),
        mib(img.compressed)
    );
    assert!(
        mismatches.is_empty(),
        "{:#?}",
        &mismatches[..mismatches.len().min(10)]
    );
    assert!(watch.opens() > 0);
    drop(watch);
    drop(ovl);
    drop(prepared);
    engine.shutdown();

    // The daemon.
    let state = fs.mnt.join("state");
    std::fs::create_dir(&state).unwrap();
    let d = DaemonProc::start(&state, &[]);
    let dest = fs.mnt.join("daemon-root");
    std::fs::create_dir(&dest).unwrap();
    let status = d.prepare_with(
        &img.reference,
        &dest,
        false,
        RegistrySettings {
            insecure: true,
            ..RegistrySettings::default()
        },
    );
    let before = status.bytes_fetched;
    let mismatches = compare(&tree, &dest, READ_LIMIT);
    let (_, images) = d.status();
    eprintln!(
        "daemon: {before} bytes fetched for fills before any read (TOCs {} at prepare), {} paths compared, {} mismatches, {} of {} files complete, {:.1} MiB fetched",
        img.toc_total,
        tree.len(),
        mismatches.len(),
        images[0].files_complete,
        images[0].files,
        mib(images[0].bytes_fetched)
    );
    assert!(before < img.toc_total + 16384, "{before}");
    assert!(
        mismatches.is_empty(),
        "{:#?}",
        &mismatches[..mismatches.len().min(10)]
    );
    assert_eq!(images[0].errors, 0);
}

#[test]
fn metadata_corruption_and_trust() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    // Every kind of member, xattrs and owners (the fixture's generator).
    let layout = tmp.path().join("kinds");
    let st = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/make_zstd_chunked.py"
        ))
        .arg(&layout)
        .status()
        .unwrap();
    assert!(st.success());
    let img = push_layout_chunked(&reg, &layout, "t", "chunked/kinds");
    // The reference: GNU tar's eager read of the blob (one layer: its whiteout has nothing
    // below it to delete, and the fifo is not read).
    let reference_dir = tmp.path().join("reference");
    std::fs::create_dir(&reference_dir).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&img.blobs[0])
        .arg("-C")
        .arg(&reference_dir)
        .status()
        .unwrap();
    assert!(st.success());
    let regular = ["etc/hello", "etc/empty", "bin/words", "bin/holes"];

    let rt = runtime();
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let dest = tmp.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let prepared = prepare_within(
        &rt,
        &engine,
        &img.reference,
        &dest,
        &options(tmp.path(), Mode::Direct),
    )
    .expect("prepare");
    let md = std::fs::symlink_metadata(dest.join("etc/hello")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777, md.len()),
        (1000, 1001, 0o644, 20)
    );
    assert_eq!(md.mtime(), 1_700_000_000);
    assert_eq!(
        xattr::get(dest.join("etc/hello"), "user.note")
            .unwrap()
            .as_deref(),
        Some(&b"fixture"[..])
    );
    assert_eq!(
        std::fs::read_link(dest.join("etc/link")).unwrap(),
        Path::new("hello")
    );
    assert_eq!(
        std::fs::metadata(dest.join("etc/hard")).unwrap().ino(),
        md.ino(),
        "hard link"
    );
    // The TOC's character device is read (prepare does not make devices: skipped); its
    // whiteout is applied, not created.
    assert!(!dest.join("dev/null").exists());
    assert!(!dest.join("gone/.wh.old").exists());
    let stats = &prepared.unpacked.stats;
    assert_eq!(
        (stats.skipped, stats.fifos, stats.hardlinks, stats.symlinks),
        (1, 1, 1, 1)
    );
    assert!(
        std::fs::symlink_metadata(dest.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    for rel in regular {
        assert_eq!(
            read_bounded(&dest.join(rel), READ_LIMIT),
            read_bounded(&reference_dir.join(rel), READ_LIMIT),
            "{rel}"
        );
    }
    drop(prepared);

    // A corrupted frame: the read fails with EIO, no zeros reach the reader.
    let words = read_bounded(&reference_dir.join("bin/words"), READ_LIMIT);
    let blob = &img.blobs[0];
    let mut bytes = std::fs::read(blob).unwrap();
    let intact = bytes.clone();
    // Flip bytes in the middle of bin/words' last frame (found through the TOC, so that
    // reading the file's head, readahead included, stays clear of it).
    let layer: oci_spec::image::Descriptor =
        serde_json::from_value(img.manifest["layers"][0].clone()).unwrap();
    let size = bytes.len() as u64;
    let pos = TocPosition::from_annotations("t", size, layer.annotations().as_ref().unwrap())
        .unwrap()
        .unwrap();
    let toc_bytes = &bytes[pos.offset as usize..(pos.offset + pos.len) as usize];
    let toc = zstd_chunked::parse("t", size, &pos, toc_bytes).unwrap();
    let words_idx = toc.index.find("bin/words").unwrap();
    let last = toc.chunks[words_idx].last().unwrap().clone();
    assert!(last.file_offset > 128 << 10, "{last:?}");
    let mid = ((last.compressed_offset + last.compressed_end) / 2) as usize;
    for b in &mut bytes[mid..mid + 8] {
        *b ^= 0x5a;
    }
    std::fs::write(blob, &bytes).unwrap();
    let prepared = prepare_fresh(&rt, &engine, &img.reference, tmp.path(), "corrupt")
        .expect("prepare (the TOC is intact)");
    let dest2 = tmp.path().join("corrupt");
    let err =
        try_read_bounded(&dest2.join("bin/words"), READ_LIMIT).expect_err("corrupt frame read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Again (nothing was left half-filled), and the other files of the layer still read.
    let again = try_read_bounded(&dest2.join("bin/words"), READ_LIMIT).expect_err("again");
    assert_eq!(again.raw_os_error(), Some(libc::EIO));
    let holes = read_bounded(&dest2.join("bin/holes"), READ_LIMIT);
    assert_eq!(
        holes,
        read_bounded(&reference_dir.join("bin/holes"), READ_LIMIT)
    );
    assert_eq!(words.len(), 244_751);
    eprintln!("corrupt frame: reading bin/words gave \"{err}\" twice; bin/holes read correctly");
    drop(prepared);

    // A TOC checksum that does not match: the layer is not read through that TOC but
    // streamed once (its bytes still verified against the layer digest) and served from the
    // blob cache; every file reads right.
    let mut bad = img.manifest.clone();
    let ann = bad["layers"][0]["annotations"].as_object_mut().unwrap();
    let key = ann
        .keys()
        .find(|k| k.ends_with("zstd-chunked.manifest-checksum"))
        .unwrap()
        .clone();
    ann.insert(key.clone(), format!("sha256:{}", "0".repeat(64)).into());
    let bad_ref = put_manifest(&reg, "chunked/kinds", "bad-checksum", &bad);
    // While the registry still serves the corrupted blob, the stream does not hash to the
    // layer digest: that pull fails, naming the layer.
    let err = prepare_fresh(&rt, &engine, &bad_ref, tmp.path(), "bad-corrupt")
        .expect_err("bytes that do not match the layer digest");
    eprintln!("checksum mismatch on a corrupted blob: {err}");
    assert!(err.contains(layer.digest().as_ref()), "{err}");
    std::fs::write(blob, &intact).unwrap();
    let prepared = prepare_fresh(&rt, &engine, &bad_ref, tmp.path(), "bad")
        .expect("a layer whose TOC does not match its checksum still pulls");
    assert_eq!(prepared.index_origins, [IndexOrigin::Built]);
    let dest3 = tmp.path().join("bad");
    for rel in regular {
        assert_eq!(
            read_bounded(&dest3.join(rel), READ_LIMIT),
            read_bounded(&reference_dir.join(rel), READ_LIMIT),
            "{rel}"
        );
    }
    eprintln!(
        "checksum mismatch: streamed once ({} bytes before ready), files read right",
        prepared.bytes_before_ready
    );
    drop(prepared);

    // No annotations at all: found through the footer (one more small range read).
    let mut plain = img.manifest.clone();
    plain["layers"][0]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let plain_ref = put_manifest(&reg, "chunked/kinds", "no-annotations", &plain);
    let prepared = prepare_fresh(&rt, &engine, &plain_ref, tmp.path(), "footer")
        .expect("prepare through the footer");
    let dest4 = tmp.path().join("footer");
    assert_eq!(prepared.index_origins, [IndexOrigin::Toc]);
    eprintln!(
        "footer: ready after {} bytes (TOC {} + footer)",
        prepared.bytes_before_ready, img.toc_total
    );
    assert!(prepared.bytes_before_ready >= img.toc_total + 64);
    assert_eq!(
        std::fs::symlink_metadata(dest4.join("etc/hello"))
            .unwrap()
            .len(),
        20
    );
    drop(prepared);
    engine.shutdown();
}
